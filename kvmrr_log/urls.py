"""Where a log lives: `file:PATH.avro` (an archive) or `kafka://HOST:PORT/VM`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


class LogUrlError(ValueError):
    pass


@dataclass(frozen=True)
class FileLog:
    path: Path


@dataclass(frozen=True)
class KafkaLog:
    bootstrap: str
    vm_id: str


def parse_log_url(url: str) -> FileLog | KafkaLog:
    if url.startswith("file:"):
        path = url[len("file:"):]
        if not path:
            raise LogUrlError("file: log needs a path, e.g. file:run.avro")
        return FileLog(Path(path))
    if url.startswith("kafka://"):
        u = urlparse(url)
        vm = u.path.strip("/")
        if not u.netloc or not vm or "/" in vm:
            raise LogUrlError(f"kafka log must be kafka://HOST:PORT/VM, not {url!r}")
        return KafkaLog(u.netloc, vm)
    raise LogUrlError(f"log {url!r} must be file:PATH or kafka://HOST:PORT/VM")
