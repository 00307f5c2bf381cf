"""Issue 13: a stock Linux kernel (Debian's linux-source-6.1, guests/linux/config) as a
kvmrr guest on the PC machine: booted by the x86-64 boot protocol, its built-in KUnit
suites run, recorded and replayed exactly, the console being the guest's output stream.

The kernel holds RDTSC (get_cycles), so it is recorded with `step` (`fast` refuses it,
docs/ARCHITECTURE.md §2.7) and replayed with `fast`.  The default tier records the first
instructions of the boot (the boot protocol, the UART, the PIT and PIC ticks, the pinned
host CPU) and replays them; the whole boot with KUnit takes minutes under step and is
marked `linux_slow` (make linux-slow)."""
import json

import pytest

from conftest import REPO, kvmrr
from harness.ktap import ktap_results

VMLINUX = REPO / "build" / "guests" / "linux.vmlinux"


@pytest.fixture(scope="module")
def linux():
    if not VMLINUX.exists():
        pytest.skip("the Linux guest is not built here: `make linux-guest` builds it "
                    "(`make test` does first)")
    return VMLINUX


def run_json(*args, timeout=600):
    """kvmrr with --json: (its summary, the guest console it printed on stderr)."""
    proc = kvmrr(*args, "--json", timeout=timeout)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary, proc.stderr


def record_and_replay(tmp_path, *extra, timeout=600):
    log = tmp_path / "linux.avro"
    rec, rec_console = run_json("record", "linux", "--mode", "step", "--log", f"file:{log}",
                                *extra, timeout=timeout)
    rep, rep_console = run_json("replay", "--log", f"file:{log}", "--mode", "fast",
                                timeout=timeout)
    assert rep["verified"] and rep["outputs_verified"], rep
    assert rep["instructions"] == rec["instructions"]
    assert rep["state_hash"] == rec["state_hash"]
    assert rep["outputs_sha256"] == rec["outputs_sha256"]
    assert rep_console == rec_console
    return log, rec, rec_console


def test_ktap_parser_sees_failures():
    """The check below can fail: a failed case or suite is found at any depth."""
    console = ("[    1.0] KTAP version 1\n[    1.1]     ok 1 a\n[    1.2]     not ok 2 b\n"
               "[    1.3] not ok 1 suite\n[    1.4] ok 2 other\n")
    res = ktap_results(console)
    assert [r[1] for r in res] == ["ok", "not ok", "not ok", "ok"]
    assert [r[0] for r in res] == [1, 1, 0, 0]


def test_boot_records_and_replays(linux, tmp_path):
    """The first 2 M instructions: the kernel's own page tables and GDT, early printk on
    the UART, the PIT and PIC programmed and ticking, the RTC read."""
    log, rec, console = record_and_replay(tmp_path, "--max-instructions", 2_000_000,
                                          "--checksum-every", 200_000)
    assert rec["instructions"] == 2_000_000 and rec["reason"] == "budget"
    assert "Linux version 6.1" in console
    assert rec["events_by_kind"].get("Output", 0) > 10
    assert rec["events_by_kind"].get("Checksum", 0) >= 9
    proc = kvmrr("inspect", f"file:{log}", "--json")
    header = json.loads(proc.stdout.strip().splitlines()[-1])["header"]
    assert header["machine"] == "pc" and header["guest_name"] == "linux"
    assert "console=ttyS0" in header["bootargs"] and header["host_cpu"] >= 0


def test_a_log_naming_an_absent_host_cpu_is_refused(linux, tmp_path):
    """The replay runs on the host CPU the log names (its APIC ID is in the guest's RAM)."""
    from schemas import ArchiveWriter, read_archive
    log, _, _ = record_and_replay(tmp_path, "--max-instructions", 300_000)
    header, records = read_archive(log)
    header = dict(header, host_cpu=1000)
    forged = tmp_path / "forged.avro"
    with ArchiveWriter(forged, header) as w:
        for rec in records:
            w.write(rec)
    proc = kvmrr("replay", "--log", f"file:{forged}", "--mode", "fast", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "no CPU 1000" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.linux_slow
def test_kunit_records_and_replays_and_every_suite_passes(linux, tmp_path):
    """The whole boot and every built-in KUnit suite, to the reboot that ends the run."""
    _, rec, console = record_and_replay(tmp_path, timeout=3600)
    assert rec["reason"] == "exited", rec
    assert "reboot: machine restart" in console
    results = ktap_results(console)
    suites = [r for r in results if r[0] == 0]
    assert suites, "no KTAP results on the console"
    assert not [r for r in results if r[1] == "not ok"], [r for r in results if r[1] == "not ok"]
    assert len(suites) >= 10, suites


@pytest.mark.linux_slow
def test_boot_replays_with_step(linux, tmp_path):
    """The reference counter replays a Linux log too (10 M instructions, a quarter of the
    boot: the scheduler and timers running on PIT ticks; minutes under step)."""
    log = tmp_path / "linux.avro"
    rec, rec_console = run_json("record", "linux", "--mode", "step", "--log", f"file:{log}",
                                "--max-instructions", 10_000_000, timeout=3600)
    rep, rep_console = run_json("replay", "--log", f"file:{log}", "--mode", "step",
                                timeout=3600)
    assert rep["verified"] and rep["outputs_verified"], rep
    assert (rep["instructions"], rep["state_hash"]) == (rec["instructions"], rec["state_hash"])
    assert rep_console == rec_console and "Linux version 6.1" in rec_console
    # the 100 Hz tick follows the host's clock: under step (about 50 k instructions/s
    # here) one lands every 100-200 k instructions (66 in a run of 2026-12-01)
    assert rec["events_by_kind"]["Interrupt"] > 20


def test_a_large_image_is_carried_deflated():
    """A Linux kernel is 12 MB; a Kafka record at most 2 MiB: the header deflates an image
    above 1 MiB, and a reader inflates it, never beyond the image cap."""
    import zlib

    from libkvmrr import KvmrrError
    from kvmrr_log.guest_images import MAX_GUEST_BYTES, carried_image, image_fields
    small = b"\x7fELF" + bytes(1000)
    assert image_fields(small) == {"guest_image": small, "guest_image_deflated": b""}
    big = b"\x7fELF" + bytes(range(256)) * 8192
    fields = image_fields(big)
    assert fields["guest_image"] == b"" and len(fields["guest_image_deflated"]) < len(big) // 10
    assert carried_image(fields) == big
    assert carried_image({"guest_image": b"", "guest_image_deflated": b""}) == b""
    bomb = zlib.compress(bytes(MAX_GUEST_BYTES + 1))
    with pytest.raises(KvmrrError, match="inflates beyond"):
        carried_image({"guest_image": b"", "guest_image_deflated": bomb})
    with pytest.raises(KvmrrError, match="corrupt"):
        carried_image({"guest_image": b"", "guest_image_deflated": b"not zlib"})
