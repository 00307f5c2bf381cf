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


def _reseal(blob: bytearray) -> bytes:
    from libkvmrr import hash64
    blob[-8:] = hash64(bytes(blob[:-8])).to_bytes(8, "little")
    return bytes(blob)


def _serial_len_offset(blob: bytes) -> int:
    # header (64 bytes; vcpu_size at 40), vCPU state, then the core state whose devices
    # start at 32 and hold serial_len at 56 (libkvmrr/src/snapshot_format.h)
    vcpu_size = int.from_bytes(blob[40:44], "little")
    return 64 + vcpu_size + 32 + 56


@pytest.mark.parametrize("forgery", ["serial_len=300", "serial_len=2^31-1", "bit flip",
                                     "truncated", "version 1"])
def test_a_forged_snapshot_is_refused_in_one_line(tmp_path, forgery):
    from conftest import kvmrr
    from schemas import ArchiveWriter
    log = tmp_path / "hello.avro"
    kvmrr_json("record", "hello", "--log", f"file:{log}", "--mode", "fast")
    header, records = read_archive(log)
    records = list(records)
    snap = next(r for r in records if r["kind"] == "Snapshot")
    blob = bytearray(snap["blob"])
    if forgery.startswith("serial_len"):
        value = 300 if forgery.endswith("300") else 2**31 - 1
        off = _serial_len_offset(blob)
        blob[off:off + 4] = value.to_bytes(4, "little")
        forged = _reseal(blob)
    elif forgery == "bit flip":
        blob[len(blob) // 3] ^= 0x10
        forged = bytes(blob)
    elif forgery == "truncated":
        forged = bytes(blob[: len(blob) // 2])
    else:
        blob[8:12] = (1).to_bytes(4, "little")
        forged = _reseal(blob)
    path = tmp_path / "forged.avro"
    with ArchiveWriter(path, header) as out:
        for r in records:
            out.write(dict(r, blob=forged) if r is snap else r)
    proc = kvmrr("replay", "--log", f"file:{path}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvmrr: error: "), proc.stderr
    word = {"bit flip": "checksum", "truncated": "truncated", "version 1": "version 1"}
    assert word.get(forgery, "serial line") in lines[0]
