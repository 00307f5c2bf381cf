# kvmrr/node: the kvmrr CLI (record, follow, gateway, replay) with the built C core and
# guests.  Debian's python3 is 3.11 like the build venv, whose runtime packages are copied
# into site/ (no pip, no compiler here).  Run it with --device /dev/kvm.
FROM kvmrr/base:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
COPY site/ /opt/kvmrr/site/
COPY app/ /opt/kvmrr/
ENV PYTHONPATH=/opt/kvmrr:/opt/kvmrr/site \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# the settings a user changes; compose/.env and `docker run -e` override them
ENV KVMRR_VM=vm1 \
    KVMRR_GUEST=kvstore \
    KVMRR_COMMIT=log \
    KVMRR_FAILOVER_TIMEOUT=3 \
    KVMRR_BROKERS=kafka1:9092,kafka2:9092,kafka3:9092 \
    KVMRR_MODE=auto \
    KVMRR_SNAPSHOT_EVERY=2000000
# the metrics (--metrics-port 9100) listen on every interface here: 9100 is exposed, and a
# scraper on the network reaches it (outside a container the default stays loopback)
ENV KVMRR_METRICS_ADDR=0.0.0.0
COPY kvmrr-node /usr/local/bin/kvmrr-node
WORKDIR /opt/kvmrr
EXPOSE 7070 9100
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=5 CMD ["kvmrr-node", "health"]
ENTRYPOINT ["kvmrr-node"]
