"""Guest images: a built-in name (hello, ticks, kvstore) or a path to an ELF file, or the
image a log carries."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from libkvmrr import KvmrrError
from kvmrr_log.paths import REPO

BUILTIN = ("hello", "ticks", "kvstore")
# Every log carries its image: a bound on what is read, held in memory and logged.
MAX_GUEST_BYTES = 64 << 20


def guest_dir() -> Path:
    return Path(os.environ.get("KVMRR_GUEST_DIR", REPO / "build" / "guests"))


@dataclass(frozen=True)
class GuestImage:
    name: str
    path: Path
    elf: bytes
    sha256: str


def guest_from_bytes(name: str, elf: bytes, origin: str) -> GuestImage:
    """An image held in memory (a log's): origin says where it came from, for messages."""
    if elf[:4] != b"\x7fELF":
        raise KvmrrError(f"guest image {origin} is not an ELF file")
    return GuestImage(name=name, path=Path(origin), elf=bytes(elf),
                      sha256=hashlib.sha256(elf).hexdigest())


def load_guest(spec: str) -> GuestImage:
    """Resolve GUEST as the CLI takes it; a clear error if the image is missing, is not a
    regular file, or is larger than MAX_GUEST_BYTES."""
    path = guest_dir() / f"{spec}.elf" if spec in BUILTIN else Path(spec)
    try:
        if not path.is_file():
            if path.exists():
                raise KvmrrError(f"guest image {path} is not a regular file")
            raise FileNotFoundError(2, "No such file or directory")
        with path.open("rb") as f:
            elf = f.read(MAX_GUEST_BYTES + 1)
    except OSError as exc:
        hint = " (run `make build`)" if spec in BUILTIN else ""
        raise KvmrrError(f"cannot read guest image {path}: {exc.strerror}{hint}") from None
    if len(elf) > MAX_GUEST_BYTES:
        raise KvmrrError(f"guest image {path} is larger than {MAX_GUEST_BYTES >> 20} MiB")
    name = spec if spec in BUILTIN else path.stem
    image = guest_from_bytes(name, elf, str(path))
    return GuestImage(name=image.name, path=path, elf=image.elf, sha256=image.sha256)
