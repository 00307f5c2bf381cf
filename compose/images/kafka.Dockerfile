# kvmrr/kafka: Apache Kafka (KRaft, broker + controller) from the Maven-fetched jars.
# `kafkactl container` writes this node's server.properties from the environment,
# formats its storage on first start and runs the broker in the foreground.
FROM kvmrr/base:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless python3 \
    && rm -rf /var/lib/apt/lists/*
COPY libs/ /opt/kafka/libs/
COPY kafkactl kafkasecrets.py log4j2.yaml pom.xml /opt/kafka/
ENV KVMRR_KAFKA_HOME=/opt/kafka \
    KAFKA_HEAP_OPTS="-Xmx512m -Xms128m" \
    KAFKA_DATA=/var/lib/kafka
VOLUME /var/lib/kafka
EXPOSE 9092 9093 9094
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python3", "/opt/kafka/kafkactl", "container", "--check"]
ENTRYPOINT ["python3", "/opt/kafka/kafkactl", "container"]
