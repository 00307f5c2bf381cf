"""Issue 15: time-travel debugging with Debian's real gdb over `kvmrr replay --gdb`."""
import re
import shutil
import socket
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import pytest

from conftest import kvmrr_json
from kvmrr_log.paths import REPO

GDB = "gdb"        # Debian's, installed by setup/doctor (setup/programs.tsv)
TICKS = 300_000
KVSTORE = 600_000
STEPS = 1500
ELF = REPO / "build" / "guests"

pytestmark = pytest.mark.skipif(not shutil.which("gdb"), reason="gdb is not installed")


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    d = tmp_path_factory.mktemp("gdb")
    out = {}
    for guest, n, extra in (("ticks", TICKS, ()), ("kvstore", KVSTORE, ("--load", 200))):
        path = d / f"{guest}.avro"
        kvmrr_json("record", guest, "--log", f"file:{path}", "--max-instructions", n, *extra)
        out[guest] = path
    return out


class Server:
    """`kvmrr replay --log ... --gdb 127.0.0.1:0 --gdb-once`, on the port it reports."""

    def __init__(self, log, *extra):
        url = log if str(log).startswith("kafka://") else f"file:{log}"
        # its log events go to a file: a pipe nobody reads while it serves would fill
        # and stop the server mid-session
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvmrr.cli", "replay", "--log", url,
             "--gdb", "127.0.0.1:0", "--gdb-once", *map(str, extra)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=self.err, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"on 127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"no server: {line!r} {self._stderr()[-2000:]}")
        self.port = int(m.group(1))

    def close(self) -> str:
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self._stderr()

    def _stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()


def gdb(server: Server, elf, *commands: str, timeout=150) -> str:
    """elf: a guest's name (build/guests/NAME.elf) or the path of an ELF."""
    args = [GDB, "-batch", "-nx", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", f"target remote 127.0.0.1:{server.port}"]
    for c in commands:
        args += ["-ex", c]
    path = elf if isinstance(elf, Path) else ELF / f"{elf}.elf"
    proc = subprocess.run(args + [str(path)], capture_output=True, text=True,
                          timeout=timeout)
    err = server.close()
    out = proc.stdout + proc.stderr
    assert "Traceback" not in err, err
    return out


def icounts(out: str) -> list[int]:
    """The answers of `monitor icount`, in order (lines holding only a number)."""
    return [int(line) for line in out.splitlines() if re.fullmatch(r"\d+", line.strip())]


REG_ORDER = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15", "rip", "eflags"]


def gdb_regs(out: str, n: int) -> list[dict]:
    """Each `info registers` block's general registers."""
    blocks, cur = [], {}
    for line in out.splitlines():
        m = re.match(r"^(\w+)\s+(0x[0-9a-f]+)", line)
        if m and m.group(1) in REG_ORDER:
            cur[m.group(1)] = int(m.group(2), 16)
            if m.group(1) == "eflags":
                blocks.append(cur)
                cur = {}
    assert len(blocks) == n, out
    return blocks


def replay_regs(log, until: int) -> dict:
    rep = kvmrr_json("replay", "--log", f"file:{log}", "--until", until, "--dump", "regs")
    regs = {k: int(v, 16) for k, v in rep["regs"].items()}
    regs["eflags"] = regs.pop("rflags") & 0xffffffff
    return regs


def test_stepi_and_reverse_stepi_match_replay_until(logs):
    s = Server(logs["ticks"])
    out = gdb(s, "ticks", f"stepi {STEPS}", "monitor icount", "info registers",
              "reverse-stepi", "monitor icount", "info registers")
    assert icounts(out) == [STEPS, STEPS - 1], out
    at_n, at_n1 = gdb_regs(out, 2)
    assert at_n == replay_regs(logs["ticks"], STEPS)
    assert at_n1 == replay_regs(logs["ticks"], STEPS - 1)


def test_breakpoint_continue_twice_reverse_continue_and_print(logs):
    s = Server(logs["ticks"])
    out = gdb(s, "ticks", "break on_tick",
              "continue", "monitor icount", "print (unsigned long) timer_ticks",
              "continue", "monitor icount", "print (unsigned long) timer_ticks",
              "reverse-continue", "monitor icount", "print (unsigned long) timer_ticks",
              "info registers rip cr0 cr3 efer cs",
              "delete", "reverse-continue", "monitor icount")
    first, second, back, begin = icounts(out)
    assert 0 < first < second and back == first and begin == 0, out
    ticks = [int(v) for v in re.findall(r"^\$\d+ = (\d+)", out, re.M)]
    assert ticks == [1, 2, 1], out   # the timer ISR counts the tick, then calls on_tick
    assert out.count("Breakpoint 1, 0x") == 3 and "on_tick" in out
    assert re.search(r"^cr0\s+0x8", out, re.M) and re.search(r"^efer\s+0x5", out, re.M), out
    assert "No more reverse-execution history" in out


def test_hbreak_reverse_next_and_monitor_goto(logs):
    s = Server(logs["ticks"])
    out = gdb(s, "ticks", "monitor goto 200000", "maintenance flush register-cache",
              "monitor icount", "info registers rip",
              "hbreak on_tick", "reverse-continue", "monitor icount", "stepi 20",
              "reverse-next", "monitor icount", "monitor snapshots")
    goto, hit, after_next = icounts(out)[:3]
    assert goto == 200000 and hit < goto and hit <= after_next < hit + 20, out
    assert "Hardware assisted breakpoint 1" in out and "snapshots" in out


def test_watchpoint_finds_the_put_that_wrote_a_key(logs):
    """kvstore's entries[0] belongs to the first key stored; watch its version (offset
    16 in struct entry) from a late point backwards: the stop is inside the PUT, and the
    request buffer holds that PUT of that key."""
    s = Server(logs["kvstore"])
    out = gdb(s, "kvstore", f"monitor goto {KVSTORE - 1000}",
              "maintenance flush register-cache",
              "watch *(unsigned int *)((char *)&entries + 16)",
              "reverse-continue", "monitor icount",
              "x/s (char *)&entries + 24", "print *(unsigned short *)((char *)&entries + 20)",
              "x/s (char *)&req",
              "stepi", "monitor icount", timeout=170)
    assert "atchpoint 1" in out, out
    ic = icounts(out)
    assert ic and ic[0] < KVSTORE - 1000, out
    key = re.search(r'<entries\+24>:\s+"([^"]+)"', out)
    klen = re.search(r"^\$\d+ = (\d+)$", out, re.M)
    req = re.search(r'<req>:\s+"([^"]*)', out)
    assert key and klen and req, out
    # the key is klen bytes (offset 20), not NUL-terminated: an entry freed by a DEL and
    # taken by a PUT of a shorter key keeps the old key's tail after it
    assert f" PUT {key.group(1)[:int(klen.group(1))]} " in req.group(1), out


def _raw(port: int, data: bytes) -> bytes:
    """Send data on a fresh connection; what comes back up to a NAK or a whole reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(data)
        got = b""
        while not (got.startswith(b"-") or re.search(rb"\$[^#]*#..", got)):
            chunk = c.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def _pkt(body: bytes) -> bytes:
    return b"$" + body + b"#" + f"{sum(body) & 0xff:02x}".encode()


def test_hostile_packets_get_error_replies(logs):
    """Over a raw socket: bad checksums, huge lengths, bad hex, unknown and random
    packets; the replayer answers each and stays up, and a real gdb then still works."""
    import random
    s = subprocess.Popen([sys.executable, "-m", "kvmrr.cli", "replay", "--log",
                          f"file:{logs['ticks']}", "--gdb", "127.0.0.1:0"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)      # (its events: a pipe nobody reads would fill)
    try:
        port = int(re.search(r":(\d+);", s.stdout.readline()).group(1))
        cases = [
            (b"$g#00", b"-"),                                    # bad checksum
            (_pkt(b"m" + b"f" * 40 + b",10"), b"$E01"),           # huge address
            (_pkt(b"m100000,ffffffff"), b"$E01"),                 # huge length
            (_pkt(b"mzz,10"), b"$E01"),                           # bad hex
            (_pkt(b"m7ffffffff000,10"), b"$E14"),                 # not mapped
            (_pkt(b"m100000,"), b"$E01"),
            (_pkt(b"Z2,100000,40"), b"$E01"),                     # watch too long
            (_pkt(b"Zq"), b"$E01"),
            (_pkt(b"p999"), b"$E01"),
            (_pkt(b"M100000,1:00"), b"$E1e"),                     # read-only
            (_pkt(b"qRcmd,zz"), b"$E01"),
            (_pkt(b"qXfer:features:read:target.xml:zz,10"), b"$E01"),
            (_pkt(b"vFlashErase:0,1"), b"$#00"),                  # unknown: empty
            (_pkt(b"\xff\xfe"), b"$#00"),
            (b"$" + b"A" * 200_000 + b"#00", b"-"),               # far too long
        ]
        for data, want in cases:
            got = _raw(port, data)
            assert want in got, (data[:40], got[:80])
        rng = random.Random(15)
        for _ in range(300):
            body = bytes(rng.choice(b"gpmMZzcsbqQvHXT?0123456789abcdef,:;$#}*x")
                         for _ in range(rng.randrange(1, 40)))
            body = body.replace(b"$", b"").replace(b"#", b"")
            if body[:1] in (b"c", b"s", b"b", b"k", b"D") or body.startswith(b"vKill"):
                continue   # motions and ends are fine but slow the fuzzing down
            got = _raw(port, _pkt(body))
            assert got.startswith(b"+$"), (body, got[:80])
        assert s.poll() is None
        out = subprocess.run([GDB, "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{port}",
                              "-ex", "stepi 3", "-ex", "monitor icount",
                              str(ELF / "ticks.elf")],
                             capture_output=True, text=True, timeout=60)
        assert icounts(out.stdout + out.stderr) == [3], out
    finally:
        s.terminate()
        s.wait(timeout=10)


def test_packet_framing_without_a_vm():
    from replayer.gdbstub.packets import MAX_PACKET, PacketReader, escape, frame, unescape
    raw = bytes(range(256))
    assert unescape(escape(raw)) == raw
    r = PacketReader()
    whole = frame(b"m1000,4") + b"+" + b"\x03" + frame(b"X0,1:}#$*")
    got = []
    for i in range(len(whole)):                    # one byte at a time
        got += r.feed(whole[i:i + 1])
    assert got == [("packet", b"m1000,4"), ("ack", b"+"), ("interrupt", b""),
                   ("packet", b"X0,1:}#$*")]
    assert r.feed(b"$g#ff") == [("bad", b"bad checksum")]
    assert r.feed(b"$" + b"A" * (MAX_PACKET * 3) + b"#41") == [("bad", b"packet too long")]
    assert r.feed(frame(b"?")) == [("packet", b"?")]   # and the reader recovered


def test_a_finished_log_on_kafka(kafka, logs):
    """The same session over kafka://: stepi and reverse-stepi agree with the archive's
    replay of the same guest run (recorded to Kafka here)."""
    import uuid
    url = f"kafka://{kafka}/g{uuid.uuid4().hex[:8]}"
    kvmrr_json("record", "ticks", "--log", url, "--max-instructions", 100_000)
    s = Server(url)
    out = gdb(s, "ticks", "stepi 200", "monitor icount", "info registers",
              "reverse-stepi", "monitor icount", "info registers", "monitor info")
    assert icounts(out) == [200, 199], out
    at_200, at_199 = gdb_regs(out, 2)
    assert at_200["rip"] != at_199["rip"]
    assert "log icount 0 to 100000" in out, out


def test_interrupt_stops_a_long_continue(logs):
    """^C during a continue that steps (a watchpoint on bytes that never change): the
    reply is a stop with SIGINT well before the end of the log."""
    s = Server(logs["ticks"])
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as c:
        def ask(body: bytes) -> bytes:
            c.sendall(_pkt(body))
            got = b""
            while not re.search(rb"\$[^#]*#..", got):
                got += c.recv(65536)
            c.sendall(b"+")
            return got
        assert b"$OK" in ask(b"Z2,7ff000,8")          # the stack's far end: untouched
        c.sendall(_pkt(b"c"))
        time.sleep(1.0)
        c.sendall(b"\x03")
        got = b""
        while not re.search(rb"\$[^#]*#..", got):
            got += c.recv(65536)
        assert b"$T02" in got, got
        c.sendall(b"+")
        qc = ask(b"qRcmd," + b"icount".hex().encode())
        n = int(bytes.fromhex(re.search(rb"\$([0-9a-f]+)#", qc).group(1).decode()))
        assert 0 < n < TICKS, n
        c.sendall(_pkt(b"k"))
    s.close()


def test_breakpoints_in_an_interrupt_handler(logs):
    """Free-running `continue` (hardware breakpoints) stops where the stepping loop
    does: on an interrupt handler's second instruction at each tick, never on its first
    (single-stepped, the delivery and that instruction are one step: docs/debugging.md,
    "Limits"); reverse-continue comes back to the same stop."""
    entry = int(re.search(r"^([0-9a-f]+) T isr_timer$", subprocess.run(
        ["nm", str(ELF / "ticks.elf")], capture_output=True, text=True).stdout, re.M)
        .group(1), 16)
    second = entry + 2                       # after `pushq $0` (6a 00)
    s = Server(logs["ticks"])
    out = gdb(s, "ticks", "x/2i isr_timer", f"break *{entry:#x}", f"break *{second:#x}",
              "continue", "monitor icount", "print/x $pc", "print (unsigned long) timer_ticks",
              "continue", "monitor icount", "print/x $pc", "print (unsigned long) timer_ticks",
              "reverse-continue", "monitor icount", "print/x $pc",
              "print (unsigned long) timer_ticks")
    assert re.search(rf"{entry:#x} <isr_timer>:\s+push\s+\$0x0", out), out
    first, then, back = icounts(out)
    assert 0 < first < then and back == first, out
    pcs = [int(v, 16) for v in re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)]
    assert pcs == [second] * 3, out
    ticks = [int(v) for v in re.findall(r"^\$\d+ = (\d+)$", out, re.M)]
    assert ticks == [0, 1, 0], out     # the handler has not counted its tick yet
    assert replay_regs(logs["ticks"], first)["rip"] == second
