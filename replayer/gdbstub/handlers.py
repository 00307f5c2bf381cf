"""The packets gdb sends, answered over a Timeline.

Every handler gets the packet's bytes and returns the reply's bytes; anything it cannot
parse is an error reply (E01), anything it does not know the empty reply, and nothing a
peer sends raises out of handle() (docs/debugging.md, "Hostile input")."""
from __future__ import annotations

import re
from typing import Callable

from libkvmrr import KvmrrError
from replayer.errors import ReplayError
from replayer.gdbstub.packets import MAX_PACKET
from replayer.gdbstub.target import REGS, TARGET_XML, encode_all, encode_reg
from replayer.gdbstub.timeline import Stop, Timeline

E_BAD = b"E01"          # malformed packet
E_MEM = b"E14"          # memory not mapped (EFAULT)
E_RO = b"E1e"           # the replay is read-only (EROFS)
E_FAIL = b"E05"         # the replay failed (EIO)
MAX_READ = MAX_PACKET // 2 - 8
MONITOR_HELP = ("kvmrr monitor commands:\n"
                "  icount          the current instruction count\n"
                "  goto ICOUNT     move the replay to exactly ICOUNT (forwards or back);\n"
                "                  then `maintenance flush register-cache`\n"
                "  snapshots       the automatic snapshots taken so far\n"
                "  info            the log's range and the snapshot interval\n")
_HEX = re.compile(rb"^[0-9a-fA-F]+$")


class BadPacket(Exception):
    pass


def _hex(b: bytes) -> int:
    if not b or len(b) > 16 or not _HEX.match(b):
        raise BadPacket()
    return int(b, 16)


class GdbSession:
    """One gdb connection's view: breakpoints, watchpoints and the stop to report."""

    def __init__(self, timeline: Timeline, log: Callable[[str], None] | None = None):
        self.tl = timeline
        self.breaks: dict[int, set[str]] = {}          # address -> {'sw', 'hw'}
        self.watches: dict[tuple[int, int], int] = {}  # (address, len) -> refs
        self.last: Stop = Stop("icount", timeline.icount)
        self.interrupted: Callable[[], bool] = lambda: False
        self.log = log or (lambda msg: None)
        self.closed = False

    # -- dispatch -----------------------------------------------------------------------
    def handle(self, pkt: bytes) -> bytes | None:
        """The reply (None: no reply, the connection ends)."""
        try:
            return self._dispatch(pkt)
        except BadPacket:
            return E_BAD
        except (ValueError, IndexError, UnicodeDecodeError, OverflowError):
            return E_BAD
        except (KvmrrError, ReplayError) as exc:
            self.log(f"kvmrr gdb: {exc}")
            if pkt[:1] in (b"s", b"c", b"b"):
                # a motion must answer with a stop: where the replay stands now
                return self._stop_reply(Stop("icount", self.tl.icount))
            return E_FAIL

    def _dispatch(self, pkt: bytes) -> bytes | None:
        if not pkt:
            return b""
        c, rest = pkt[:1], pkt[1:]
        if c == b"?":
            return self._stop_reply(self.last)
        if c == b"g":
            return self._read_all() if not rest else E_BAD
        if c == b"p":
            return self._read_one(rest)
        if c in (b"G", b"P", b"M", b"X"):
            return E_RO
        if c == b"m":
            return self._read_mem(rest)
        if c == b"s":
            return self._stop_reply(self.tl.step(self._breaks(), self._watches()))
        if c == b"c":
            return self._stop_reply(self.tl.cont(self._breaks(), self._watches(),
                                                 self.interrupted))
        if c == b"b" and rest == b"s":
            return self._stop_reply(self.tl.reverse_step())
        if c == b"b" and rest == b"c":
            return self._stop_reply(self.tl.reverse_cont(self._breaks(), self._watches(),
                                                         self.interrupted))
        if c in (b"Z", b"z"):
            return self._break_packet(c == b"Z", rest)
        if c == b"H" or c == b"T":
            return b"OK"
        if c == b"D":
            self.closed = True
            return b"OK"
        if c == b"k":
            self.closed = True
            return None
        if pkt.startswith(b"qSupported"):
            return (f"PacketSize={MAX_PACKET:x};qXfer:features:read+;swbreak+;hwbreak+;"
                    "ReverseStep+;ReverseContinue+").encode()
        if pkt.startswith(b"qXfer:features:read:"):
            return self._xfer(pkt[len(b"qXfer:features:read:"):])
        if pkt == b"qAttached":
            return b"1"
        if pkt == b"qC":
            return b"QC1"
        if pkt == b"qfThreadInfo":
            return b"m1"
        if pkt == b"qsThreadInfo":
            return b"l"
        if pkt.startswith(b"qRcmd,"):
            return self._monitor(bytes.fromhex(pkt[6:].decode("ascii")).decode("utf-8"))
        if pkt == b"vKill;1" or pkt.startswith(b"vKill"):
            self.closed = True
            return b"OK"
        return b""           # unknown: the protocol's "not supported"

    # -- state ----------------------------------------------------------------------------
    def _breaks(self) -> list[int]:
        return sorted(self.breaks)

    def _watches(self) -> list[tuple[int, int]]:
        return sorted(self.watches)

    def _read_all(self) -> bytes:
        m = self.tl.machine
        return encode_all(m.regs(), m.sregs()).encode()

    def _read_one(self, rest: bytes) -> bytes:
        n = _hex(rest)
        if n >= len(REGS):
            return E_BAD
        m = self.tl.machine
        return encode_reg(REGS[n], m.regs(), m.sregs()).encode()

    def _read_mem(self, rest: bytes) -> bytes:
        addr_s, _, len_s = rest.partition(b",")
        addr, length = _hex(addr_s), _hex(len_s)
        if length > MAX_READ or addr >= 1 << 64:
            return E_BAD
        if length == 0:
            return b""
        data = self.tl.machine.read_virt(addr, min(length, (1 << 64) - addr))
        return data.hex().encode() if data else E_MEM

    def _break_packet(self, insert: bool, rest: bytes) -> bytes:
        parts = rest.split(b";")[0].split(b",")
        if len(parts) != 3:
            return E_BAD
        kind, addr, length = _hex(parts[0]), _hex(parts[1]), _hex(parts[2])
        if addr >= 1 << 64:
            return E_BAD
        if kind in (0, 1):
            tag = "sw" if kind == 0 else "hw"
            if insert:
                if addr not in self.breaks and len(self.breaks) >= 64:
                    return E_BAD
                self.breaks.setdefault(addr, set()).add(tag)
            elif addr in self.breaks:
                self.breaks[addr].discard(tag)
                if not self.breaks[addr]:
                    del self.breaks[addr]
            return b"OK"
        if kind == 2:
            if not 1 <= length <= 8:
                return E_BAD
            key = (addr, length)
            if insert:
                if key not in self.watches and len(self.watches) >= 16:
                    return E_BAD
                self.watches[key] = self.watches.get(key, 0) + 1
            elif key in self.watches:
                self.watches[key] -= 1
                if not self.watches[key]:
                    del self.watches[key]
            return b"OK"
        return b""           # read and access watchpoints: not supported

    def _xfer(self, rest: bytes) -> bytes:
        annex, _, span = rest.partition(b":")
        if annex != b"target.xml":
            return b"E00"
        off_s, _, len_s = span.partition(b",")
        off, length = _hex(off_s), _hex(len_s)
        chunk = TARGET_XML[off:off + min(length, MAX_READ)]
        more = off + len(chunk) < len(TARGET_XML)
        return (b"m" if more else b"l") + chunk

    # -- stops ----------------------------------------------------------------------------
    def _stop_reply(self, stop: Stop) -> bytes:
        self.last = stop
        extra = ""
        if stop.why == "break":
            kinds = self.breaks.get(stop.address, {"sw"})
            extra = "swbreak:;" if "sw" in kinds else "hwbreak:;"
        elif stop.why == "watch":
            extra = f"watch:{stop.address:x};"
        elif stop.why == "begin":
            extra = "replaylog:begin;"
        elif stop.why == "end":
            extra = "replaylog:end;"
        sig = "02" if stop.why == "interrupted" else "05"
        return f"T{sig}thread:1;{extra}".encode()

    # -- monitor --------------------------------------------------------------------------
    def _monitor(self, cmd: str) -> bytes:
        words = cmd.split()
        tl = self.tl
        if not words or words[0] == "help":
            return _console(MONITOR_HELP)
        if words[0] == "icount" and len(words) == 1:
            return _console(f"{tl.icount}\n")
        if words[0] == "goto" and len(words) == 2:
            try:
                target = int(words[1], 0)
            except ValueError:
                return _console(f"goto: {words[1]!r} is not an instruction count\n")
            if not tl.begin <= target <= tl.end:
                return _console(f"goto: the log spans icount {tl.begin} to {tl.end}\n")
            stop = tl.goto(target, self.interrupted)
            self.last = stop
            return _console(f"at icount {tl.icount}\n")
        if words[0] == "snapshots" and len(words) == 1:
            snaps = tl.snapshots
            return _console(f"{len(snaps)} snapshots, {tl.snapshot_bytes()} bytes "
                            f"held: {snaps[:8]}{' ...' if len(snaps) > 8 else ''}\n")
        if words[0] == "info" and len(words) == 1:
            return _console(f"log icount {tl.begin} to {tl.end}, snapshot every "
                            f"{tl.snapshot_every} instructions, now at {tl.icount}\n")
        return _console(f"unknown monitor command {cmd!r}\n" + MONITOR_HELP)


def _console(text: str) -> bytes:
    """A qRcmd reply: the text hex-encoded (gdb prints it)."""
    return text.encode().hex().encode()
