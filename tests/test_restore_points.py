"""Restore anywhere: replaying from any snapshot of a run to its End gives the record's
final state hash and outputs, for the built-in guests (snapshots land wherever a record
slice ends: between events, after an injection, in a halted guest)."""
import pytest

from conftest import kvmrr_json
from replayer.session import replay_records
from schemas import read_archive


@pytest.mark.parametrize("guest,n,every", [("ticks", 600_000, 40_000),
                                           ("kvstore", 600_000, 40_000)])
def test_replay_from_every_snapshot_reaches_the_records_end(tmp_path, guest, n, every):
    log = tmp_path / f"{guest}.avro"
    rec = kvmrr_json("record", guest, "--log", f"file:{log}", "--mode", "fast",
                     "--max-instructions", n, "--snapshot-every", every,
                     "--checksum-every", 50_000)
    header, records = read_archive(log)
    records = list(records)
    snaps = [r for r in records if r["kind"] == "Snapshot"]
    assert len(snaps) >= 12, f"{len(snaps)} snapshots"
    starts = []
    for k, snap in enumerate(snaps):
        only = [r for r in records if r["kind"] != "Snapshot" or r is snap]
        counters = ("fast", "step") if k >= len(snaps) - 2 else ("fast",)
        for counter in counters:
            res = replay_records(header, only, counter=counter, start="latest")
            assert res.start_icount == snap["icount"]
            assert res.finished and res.icount == rec["instructions"], (snap["icount"], counter)
            assert res.state_hash == rec["state_hash"], (snap["icount"], counter)
        starts.append(snap["icount"])
    assert starts[0] == 0 and starts[-1] > n // 2
