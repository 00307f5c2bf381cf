"""Export a log on Kafka to an Avro archive: its header, one snapshot, and every batch
after that snapshot up to the End record (the debugging use: replay it offline).  The
archive holds the history only: the reader applies the epoch rule, so neither Epoch
records nor what an old primary wrote after its successor's seal go in."""
from __future__ import annotations

from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING

from kvmrr_log.kafka import KafkaLogError, topics
from replayer.follow import choose_snapshot
from kvmrr_log.topic_reader import LogTopicReader, read_header, read_snapshots
from schemas import ArchiveWriter


def export_archive(bootstrap: str, vm: str, path: Path, *, start: str = "first") -> dict:
    header = read_header(bootstrap, vm, role="archive")
    snapshot = choose_snapshot(read_snapshots(bootstrap, vm, start=start, role="archive"),
                               start, None)
    offset = snapshot["log_offset"] if snapshot.get("log_offset", -1) >= 0 else OFFSET_BEGINNING
    reader = LogTopicReader(bootstrap, vm, topics(vm).log, offset, snapshot.get("epoch", 0),
                            role="archive")
    batches = events = 0
    ended = False
    try:
        with ArchiveWriter(path, header) as out:
            out.write(dict(snapshot, log_offset=-1))
            for record, _ in reader.records(0):
                if record["kind"] != "EventBatch":
                    continue
                if record["first_seq"] + len(record["events"]) <= snapshot["next_seq"]:
                    continue
                out.write(record)
                batches += 1
                events += len(record["events"])
                if any(ev["kind"] == "End" for ev in record["events"]):
                    ended = True
                    break
    finally:
        reader.close()
    if not ended:
        raise KafkaLogError(f"{topics(vm).log}: the log has no End record yet; the archive "
                            f"{path} holds what is committed so far")
    return {"batches": batches, "events": events, "start_icount": snapshot["icount"],
            "path": str(path)}
