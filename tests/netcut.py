"""A network cut between one process and the broker, for the tests.

The process runs in a network namespace of its own (unshare -n).  Its only way out is a
bridge the test holds: inside the namespace a forwarder listens on the broker's loopback
port and passes each connection through a Unix socket (the filesystem crosses namespaces);
outside, Bridge forwards that socket to the real broker.  The broker advertises
127.0.0.1:PORT, which inside the namespace is the forwarder, so every connection of the
process goes through the bridge.  cut() drops them all and refuses new ones; restore()
lets them through again.

    python netcut.py inner PORT UNIX_PATH     (the forwarder, started by wrap())
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import threading
from pathlib import Path


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _join(r1, w1, r2, w2) -> None:
    await asyncio.gather(_pipe(r1, w2), _pipe(r2, w1))


def wrap(cmd: list[str], port: int, unix_path: Path) -> list[str]:
    """cmd, run in a new network namespace whose port `port` leads to the bridge."""
    inner = shlex.join([sys.executable, str(Path(__file__).resolve()), "inner", str(port),
                        str(unix_path)])
    return ["unshare", "-n", "sh", "-c",
            f"ip link set lo up && {{ {inner} & }} && sleep 0.5 && exec {shlex.join(cmd)}"]


async def _inner(port: int, path: str) -> None:
    parent = os.getppid()

    async def conn(r, w):
        try:
            r2, w2 = await asyncio.open_unix_connection(path)
        except OSError:
            w.close()
            return
        await _join(r, w, r2, w2)

    server = await asyncio.start_server(conn, "127.0.0.1", port)
    async with server:
        while os.getppid() == parent:      # the wrapped process is gone: so are we
            await asyncio.sleep(0.5)


class Bridge:
    """Outside the namespace: Unix socket -> the real broker, on a thread."""

    def __init__(self, unix_path: Path, port: int):
        self.path, self.port = Path(unix_path), port
        self._cut = False
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Bridge":
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        async def conn(r, w):
            if self._cut:
                w.close()
                return
            try:
                r2, w2 = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                w.close()
                return
            self._open.update((w, w2))
            try:
                await _join(r, w, r2, w2)
            finally:
                self._open.difference_update((w, w2))

        self._server = await asyncio.start_unix_server(conn, str(self.path))
        self._ready.set()
        async with self._server:
            try:
                await self._server.serve_forever()
            except asyncio.CancelledError:     # close(): the test is done with it
                pass

    def cut(self) -> None:
        def drop():
            self._cut = True
            for w in list(self._open):
                w.transport.abort()
        self._loop.call_soon_threadsafe(drop)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "_cut", False)

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._server.close)


if __name__ == "__main__" and sys.argv[1:2] == ["inner"]:
    asyncio.run(_inner(int(sys.argv[2]), sys.argv[3]))
