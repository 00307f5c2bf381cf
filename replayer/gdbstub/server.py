"""The TCP side: accept gdb connections one at a time and serve the remote protocol over
one Timeline (its snapshots outlive a connection, so a second gdb starts where the
first left off)."""
from __future__ import annotations

import os
import select
import socket
from typing import Callable

import structlog

from replayer.gdbstub.handlers import GdbSession
from replayer.gdbstub.packets import PacketReader, frame
from replayer.gdbstub.timeline import Timeline

RECV = 65536
TRACE = bool(os.environ.get("KVMRR_GDB_TRACE"))   # log every packet and reply


class Connection:
    def __init__(self, sock: socket.socket, timeline: Timeline, log: Callable[[str], None]):
        self.sock = sock
        self.reader = PacketReader()
        self.session = GdbSession(timeline, log)
        self.session.interrupted = self._interrupted
        self.pending: list = []
        self.log = log

    def _interrupted(self) -> bool:
        """A ^C waiting on the socket (looked at between slices of a long motion)."""
        try:
            r, _, _ = select.select([self.sock], [], [], 0)
            if not r:
                return False
            data = self.sock.recv(RECV)
        except OSError:
            return True
        if not data:
            return True
        items = self.reader.feed(data)
        hit = any(kind == "interrupt" for kind, _ in items)
        self.pending.extend(i for i in items if i[0] != "interrupt")
        return hit

    def serve(self) -> None:
        while not self.session.closed:
            items, self.pending = self.pending, []
            if not items:
                try:
                    data = self.sock.recv(RECV)
                except OSError:
                    return
                if not data:
                    return
                items = self.reader.feed(data)
            for kind, payload in items:
                if kind == "bad":
                    self.sock.sendall(b"-")
                elif kind == "interrupt":
                    # not running: the stop we are at is the answer
                    self.sock.sendall(frame(self.session.handle(b"?")))
                elif kind == "packet":
                    self.sock.sendall(b"+")
                    reply = self.session.handle(payload)
                    if TRACE:
                        self.log(f"gdb> {payload[:200]!r}\ngdb< {(reply or b'')[:200]!r}")
                    if reply is None:
                        return
                    self.sock.sendall(frame(reply))
                    if self.session.closed:
                        return


def serve(timeline: Timeline, host: str, port: int, *, once: bool = False,
          ready: Callable[[int], None] | None = None,
          log: Callable[[str], None] | None = None) -> None:
    """Listen on host:port; serve connections one after another (once: just one).  log:
    where the session's notes go (default: a `gdb` event on the structured log)."""
    if log is None:
        events = structlog.get_logger().bind(role="gdb")

        def log(note: str) -> None:
            events.info("gdb", note=note)
    lsock = socket.create_server((host, port), reuse_port=False)
    try:
        if ready:
            ready(lsock.getsockname()[1])
        while True:
            sock, peer = lsock.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            log(f"kvmrr gdb: connection from {peer[0]}:{peer[1]}")
            try:
                Connection(sock, timeline, log).serve()
            except OSError as exc:
                log(f"kvmrr gdb: connection lost: {exc}")
            finally:
                sock.close()
            log(f"kvmrr gdb: disconnected at icount {timeline.icount}")
            if once:
                return
    finally:
        lsock.close()
