"""The remote serial protocol's framing: `$data#cs`, acks, escapes, and the limits that
keep a hostile peer from growing a packet without bound.

PacketReader is fed raw bytes and yields what arrived: ('packet', bytes) for a packet
whose checksum matched, ('bad', reason) for one that did not or was too long (the
session answers '-'), ('interrupt', b'') for a ^C, ('ack', b'+'/b'-')."""
from __future__ import annotations

MAX_PACKET = 0x4000          # what qSupported announces as PacketSize
_LIMIT = MAX_PACKET * 2 + 16 # an escaped packet is at most twice as long


def checksum(data: bytes) -> int:
    return sum(data) & 0xff


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in b"#$}*":
            out += bytes((0x7d, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7d:
            nxt = next(it, None)
            if nxt is None:
                break
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(data: bytes) -> bytes:
    body = escape(data)
    return b"$" + body + b"#" + f"{checksum(body):02x}".encode()


class PacketReader:
    def __init__(self):
        self._buf = bytearray()
        self._in_packet = False
        self._overflow = False

    def feed(self, data: bytes):
        out = []
        for b in data:
            if not self._in_packet:
                if b == 0x24:                       # $
                    self._in_packet = True
                    self._buf.clear()
                    self._overflow = False
                elif b == 0x03:
                    out.append(("interrupt", b""))
                elif b in (0x2b, 0x2d):             # + -
                    out.append(("ack", bytes((b,))))
                continue                            # anything else between packets: noise
            self._buf.append(b)
            if len(self._buf) >= 3 and self._buf[-3] == 0x23:      # '#' and two digits
                body, cs = bytes(self._buf[:-3]), bytes(self._buf[-2:])
                self._in_packet = False
                self._buf.clear()
                if self._overflow:
                    out.append(("bad", b"packet too long"))
                    continue
                try:
                    ok = int(cs, 16) == checksum(body)
                except ValueError:
                    ok = False
                out.append(("packet", unescape(body)) if ok else ("bad", b"bad checksum"))
            elif len(self._buf) > _LIMIT:
                self._overflow = True               # discard, keep looking for '#xx'
                del self._buf[:-2]
        return out
