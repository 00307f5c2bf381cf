"""The log carries its guest image; forged logs and guest files are refused in one line."""
import hashlib
import random
import shutil

import pytest

from conftest import REPO, kvmrr, kvmrr_json
from kvmrr import cli
from schemas import ArchiveWriter, read_archive

GUESTS = REPO / "build" / "guests"


def _one_line_error(proc_or_pair):
    code, stderr = proc_or_pair
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvmrr: error: "), stderr
    return lines[0]


def _run(*args):
    p = kvmrr(*args, check=False)
    return p.returncode, p.stderr


@pytest.fixture(scope="module")
def user_log(tmp_path_factory):
    """A user ELF (a copy of hello under another name) recorded, then the file deleted."""
    d = tmp_path_factory.mktemp("user")
    elf = d / "trap1.elf"
    shutil.copy(GUESTS / "hello.elf", elf)
    log = d / "trap1.avro"
    rec = kvmrr_json("record", elf, "--log", f"file:{log}", "--mode", "fast")
    elf.unlink()
    return log, rec


def test_a_user_elf_replays_from_the_log_alone(user_log):
    log, rec = user_log
    rep = kvmrr_json("replay", "--log", f"file:{log}")
    assert rep["guest"] == "trap1" and rep["verified"]
    assert rep["state_hash"] == rec["state_hash"]


def test_a_guest_whose_hash_differs_is_refused(user_log):
    log, _ = user_log
    line = _one_line_error(_run("replay", "--log", f"file:{log}", "--guest",
                                GUESTS / "ticks.elf"))
    assert "another guest" in line


def test_inspect_shows_the_image_name_and_hash(user_log):
    log, _ = user_log
    sha = hashlib.sha256((GUESTS / "hello.elf").read_bytes()).hexdigest()
    text = kvmrr("inspect", f"file:{log}").stdout
    assert f"image: trap1 sha256 {sha}" in text and "carried in the log" in text
    out = kvmrr_json("inspect", f"file:{log}")
    assert out["header"]["guest_name"] == "trap1" and out["header"]["guest_sha256"] == sha
    assert out["header"]["guest_image_bytes"] == (GUESTS / "hello.elf").stat().st_size


def _relabel(src, dst, as_guest, carry):
    """hello's log presented as another guest's: header and snapshots relabelled."""
    elf = (GUESTS / f"{as_guest}.elf").read_bytes()
    sha = hashlib.sha256(elf).hexdigest()
    header, records = read_archive(src)
    fake = dict(header, guest_name=as_guest, guest_sha256=sha, guest_image=elf if carry else b"")
    with ArchiveWriter(dst, fake) as out:
        for r in records:
            out.write(dict(r, guest_sha256=sha) if r["kind"] == "Snapshot" else r)


@pytest.mark.parametrize("carry", [True, False])
def test_a_relabelled_log_is_refused(tmp_path, carry):
    log = tmp_path / "hello.avro"
    kvmrr_json("record", "hello", "--log", f"file:{log}", "--mode", "fast")
    fake = tmp_path / "as-ticks.avro"
    _relabel(log, fake, "ticks", carry)
    line = _one_line_error(_run("replay", "--log", f"file:{fake}"))
    assert "boots into" in line


def test_a_log_whose_image_does_not_match_its_hash_is_refused(user_log, tmp_path):
    log, _ = user_log
    header, records = read_archive(log)
    image = bytearray(header["guest_image"])
    image[100] ^= 1
    bad = tmp_path / "bad-image.avro"
    with ArchiveWriter(bad, dict(header, guest_image=bytes(image))) as out:
        for r in records:
            out.write(r)
    assert "corrupt" in _one_line_error(_run("replay", "--log", f"file:{bad}"))


def test_a_log_of_an_older_format_is_refused(user_log, tmp_path):
    """Format version 1 hashed the state without the x87/SSE/AVX registers: its checksums
    would not verify here, so it is refused in one line, never reported as diverged."""
    log, _ = user_log
    header, records = read_archive(log)
    old = tmp_path / "v1.avro"
    with ArchiveWriter(old, dict(header, format_version=1)) as out:
        for r in records:
            out.write(r)
    assert "log format version 1" in _one_line_error(_run("replay", "--log", f"file:{old}"))


def test_huge_and_endless_guest_files_are_refused(tmp_path):
    big = tmp_path / "big.elf"
    with big.open("wb") as f:
        f.write(b"\x7fELF")
        f.truncate(1 << 30)            # 1 GiB, sparse
    assert "larger than 64 MiB" in _one_line_error(_run("run", big))
    assert "not a regular file" in _one_line_error(_run("run", "/dev/zero"))
    assert "not a regular file" in _one_line_error(
        _run("record", "/dev/zero", "--log", f"file:{tmp_path / 'z.avro'}"))


# Forged event payloads in an archive: each replay ends verified, in a divergence (exit 1),
# or in one line with exit 2 - never a traceback.
MUTATIONS = {
    "Interrupt": [("vector", -5), ("vector", 2**31 - 1), ("vector", 0), ("vector", 3),
                  ("icount", -1), ("icount", 2**62), ("rip", 0)],
    "PortIn": [("port", 70000), ("size", 3), ("size", 0), ("value", 2**64 - 1),
               ("icount", -7)],
    "Output": [("channel", 9), ("data", b"x" * 5000), ("seq", 2**63)],
    "Dma": [("data", b"y" * 4000), ("gpa", 2**64 - 1)],
    "Checksum": [("state_hash", 0), ("regs", [])],
}


def _cli(args, capsys):
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_forged_event_payloads_exit_2_in_one_line_or_diverge(tmp_path, capsys):
    log = tmp_path / "kv.avro"
    kvmrr_json("record", "kvstore", "--log", f"file:{log}", "--mode", "fast",
               "--max-instructions", 150_000, "--checksum-every", 20_000)
    header, records = read_archive(log)
    records = list(records)
    rng = random.Random(11)
    outcomes = {0: 0, 1: 0, 2: 0}
    tried = 0
    for kind, changes in MUTATIONS.items():
        places = [(i, j) for i, r in enumerate(records) if r["kind"] == "EventBatch"
                  for j, ev in enumerate(r["events"]) if ev["kind"] == kind]
        if not places:
            continue
        for field, value in changes:
            i, j = rng.choice(places)
            forged = [dict(r) for r in records]
            events = [dict(ev) for ev in forged[i]["events"]]
            events[j][field] = value
            forged[i]["events"] = events
            path = tmp_path / f"forged-{tried}.avro"
            try:
                with ArchiveWriter(path, header) as out:
                    for r in forged:
                        out.write(r)
            except Exception as exc:   # the schema itself refuses it: nothing to replay
                assert type(exc).__name__ == "InvalidRecordError", exc
                continue
            code, err = _cli(["replay", "--log", f"file:{path}", "--quiet"], capsys)
            assert "Traceback" not in err, (kind, field, value, err)
            assert code in (0, 1, 2), (kind, field, value, code, err)
            if code == 2:
                _one_line_error((code, err))
            outcomes[code] += 1
            tried += 1
    assert tried >= 15 and outcomes[2] >= 5, outcomes
