"""A finished log, whole, for the time-travel session: its header, its first snapshot,
its events from there on and its End record.  From an archive (file:) or a finished log
on Kafka (kafka://), as `kvmrr replay` reads them."""
from __future__ import annotations

from dataclasses import dataclass

from kvmrr_log.urls import FileLog, parse_log_url
from replayer.errors import ReplayError
from schemas import read_archive


@dataclass
class LoadedLog:
    header: dict
    snapshot: dict
    events: list[dict]
    end: dict | None


class _Collector:
    def __init__(self, header: dict):
        self.header = header
        self.snapshot: dict | None = None
        self.events: list[dict] = []
        self.end: dict | None = None
        self.next_seq = 0

    def snapshot_record(self, rec: dict) -> None:
        if self.snapshot is None:
            if rec.get("chunks", 1) != 1:
                raise ReplayError("a chunked snapshot must be joined before replay")
            self.snapshot = rec
            self.next_seq = rec["next_seq"]

    def batch(self, rec: dict) -> bool:
        """False once the End is seen."""
        if self.snapshot is None:
            raise ReplayError("the log has events before any snapshot")
        first, events = rec["first_seq"], rec["events"]
        if first + len(events) <= self.next_seq:
            return True
        if first > self.next_seq:
            raise ReplayError(f"gap in the log: expected event seq {self.next_seq}, next "
                              f"batch starts at {first}")
        for ev in events[self.next_seq - first:]:
            self.next_seq += 1
            if ev["kind"] == "End":
                self.end = ev
                return False
            self.events.append(ev)
        return True

    def done(self) -> LoadedLog:
        if self.snapshot is None:
            raise ReplayError("the log holds no snapshot to start from")
        if self.end is None:
            raise ReplayError("the log has no End record: the debugger needs a finished log")
        return LoadedLog(self.header, self.snapshot, self.events, self.end)


def load_log(url: str) -> LoadedLog:
    log = parse_log_url(url)
    if isinstance(log, FileLog):
        header, records = read_archive(log.path)
        c = _Collector(header)
        for rec in records:
            if rec["kind"] == "Snapshot":
                c.snapshot_record(rec)
            elif rec["kind"] == "EventBatch" and not c.batch(rec):
                break
        return c.done()
    from confluent_kafka import OFFSET_BEGINNING

    from kvmrr_log.kafka import topics
    from kvmrr_log.topic_reader import LogTopicReader, read_header, read_snapshots
    header = read_header(log.bootstrap, log.vm_id)
    snaps = read_snapshots(log.bootstrap, log.vm_id)
    if not snaps:
        raise ReplayError("no committed snapshot to start from")
    c = _Collector(header)
    c.snapshot_record(snaps[0])
    offset = snaps[0].get("log_offset", -1)
    reader = LogTopicReader(log.bootstrap, log.vm_id, topics(log.vm_id).log,
                            offset if offset >= 0 else OFFSET_BEGINNING,
                            snaps[0].get("epoch", 0), role="gdb")
    try:
        for rec, _ in reader.records(0):
            if rec["kind"] == "EventBatch" and not c.batch(rec):
                break
    finally:
        reader.close()
    return c.done()
