"""Guest images: a built-in name (hello, ticks, kvstore) or a path to an ELF file."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from libkvmrr import KvmrrError
from kvmrr_log.paths import REPO

BUILTIN = ("hello", "ticks", "kvstore")


def guest_dir() -> Path:
    return Path(os.environ.get("KVMRR_GUEST_DIR", REPO / "build" / "guests"))


@dataclass(frozen=True)
class GuestImage:
    name: str
    path: Path
    elf: bytes
    sha256: str


def load_guest(spec: str) -> GuestImage:
    """Resolve GUEST as the CLI takes it; a clear error if the image is missing."""
    path = guest_dir() / f"{spec}.elf" if spec in BUILTIN else Path(spec)
    try:
        elf = path.read_bytes()
    except OSError as exc:
        hint = " (run `make build`)" if spec in BUILTIN else ""
        raise KvmrrError(f"cannot read guest image {path}: {exc.strerror}{hint}") from None
    if elf[:4] != b"\x7fELF":
        raise KvmrrError(f"guest image {path} is not an ELF file")
    name = spec if spec in BUILTIN else path.stem
    return GuestImage(name=name, path=path, elf=elf, sha256=hashlib.sha256(elf).hexdigest())
