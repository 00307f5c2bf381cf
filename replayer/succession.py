"""Which backup takes over (docs/ARCHITECTURE.md §6.2): exactly one, the one holding the single
partition of kvmrr.<vm>.succession in the consumer group kvmrr.<vm>.successors.

The group coordinator gives that partition to one live member at a time; the sticky
assignor leaves it where it is when other backups come and go.  A backup that dies loses it
after the session timeout, and another member gets it.  A member that has just been given
it waits a whole failover timeout before acting, so a role handed over while a new primary
is starting up does not start a second takeover.  The epoch rule keeps the log safe even
if two backups did act: the first Epoch record of the number wins, and the other backup
reads it while catching up and follows again (kvmrr_log.epochs, docs/ARCHITECTURE.md §6.3).
"""
from __future__ import annotations

import time

from confluent_kafka import Consumer

from kvmrr_log.kafka import client_conf, client_id, topics

# The broker's default group.min.session.timeout.ms: the shortest every broker accepts.
SESSION_TIMEOUT_MS = 6000


class Succession:
    def __init__(self, bootstrap: str, vm: str, backup_id: str):
        self.topic = topics(vm).succession
        conf = client_conf(bootstrap, client_id(vm, f"backup.{backup_id}"))
        self.consumer = Consumer(dict(conf, **{
            "group.id": f"kvmrr.{vm}.successors",
            "session.timeout.ms": SESSION_TIMEOUT_MS, "heartbeat.interval.ms": 500,
            "partition.assignment.strategy": "cooperative-sticky",
            "enable.auto.commit": False, "auto.offset.reset": "latest"}))
        self._since: float | None = None
        self.consumer.subscribe([self.topic], on_assign=self._assigned,
                                on_revoke=self._revoked, on_lost=self._revoked)

    def _assigned(self, consumer, partitions) -> None:
        if any(p.topic == self.topic for p in partitions):
            self._since = time.monotonic()

    def _revoked(self, consumer, partitions) -> None:
        if any(p.topic == self.topic for p in partitions):
            self._since = None

    def poll(self) -> None:
        """Serve the group's callbacks (the topic itself carries no messages)."""
        self.consumer.poll(0)

    def designated_for(self) -> float:
        """Seconds this backup has been the one to take over (0: it is not)."""
        self.poll()
        return 0.0 if self._since is None else time.monotonic() - self._since

    def close(self) -> None:
        """Leave the group: the role passes to another backup at once."""
        self.consumer.close()
