"""Guest images: a built-in name (hello, ticks, kvstore, linux) or a path to an ELF file,
or the image a log carries.  `linux` is the kernel `make linux-guest` builds
(guests/linux/build), run on the PC machine (docs/guests.md, "Linux")."""
from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from libkvmrr import DEFAULT_MEM_SIZE, KvmrrError
from kvmrr_log.paths import REPO

BUILTIN = ("hello", "ticks", "kvstore")
LINUX = "linux"
# The Linux guest's machine: 64 MiB of RAM (the kernel loads at 16 MiB), and a command line
# whose every parameter docs/guests.md explains: the console on the UART, early output
# too; no XSAVE (the core cannot execute XRSTOR, docs/ARCHITECTURE.md §2.7); no local APIC
# or IO-APIC, so the PIT ticks through the 8259 PIC; no ACPI; a fixed loops-per-jiffy, so
# no delay-loop calibration spins on jiffies; no legacy ptys; KUnit's end reboots, and
# reboot=k reboots by the keyboard controller's reset (the end of the run); a panic
# reboots at once (also an end, with the panic on the console).
LINUX_MEM_SIZE = 64 << 20
LINUX_CMDLINE = ("console=ttyS0 earlyprintk=serial,ttyS0 noxsave nolapic noapic acpi=off "
                 "lpj=100000 pty.legacy_count=0 kunit_shutdown=reboot reboot=k panic=-1")
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
    machine: str = "kvmrr"        # 'kvmrr' or 'pc' (a Linux vmlinux): libkvmrr.Machine
    mem_size: int = DEFAULT_MEM_SIZE


# A header carries an image larger than this deflated (a Kafka record is at most 2 MiB;
# a tinyconfig vmlinux is 12 MB, 1.1 MB deflated).
DEFLATE_ABOVE = 1 << 20


def image_fields(elf: bytes) -> dict:
    """The LogHeader fields that carry an image: as is, or deflated when it is large."""
    if len(elf) > DEFLATE_ABOVE:
        return {"guest_image": b"", "guest_image_deflated": zlib.compress(elf, 6)}
    return {"guest_image": elf, "guest_image_deflated": b""}


def carried_image(header: dict) -> bytes:
    """The image a header carries (b"" if none), inflated at most to MAX_GUEST_BYTES."""
    if header.get("guest_image"):
        return header["guest_image"]
    packed = header.get("guest_image_deflated") or b""
    if not packed:
        return b""
    d = zlib.decompressobj()
    try:
        elf = d.decompress(packed, MAX_GUEST_BYTES + 1)
    except zlib.error as exc:
        raise KvmrrError(f"the log's deflated guest image is corrupt: {exc}") from None
    if len(elf) > MAX_GUEST_BYTES or d.unconsumed_tail:
        raise KvmrrError(f"the log's guest image inflates beyond {MAX_GUEST_BYTES >> 20} MiB")
    return elf


def guest_from_bytes(name: str, elf: bytes, origin: str, machine: str = "kvmrr") -> GuestImage:
    """An image held in memory (a log's): origin says where it came from, for messages."""
    if elf[:4] != b"\x7fELF":
        raise KvmrrError(f"guest image {origin} is not an ELF file")
    return GuestImage(name=name, path=Path(origin), elf=bytes(elf),
                      sha256=hashlib.sha256(elf).hexdigest(), machine=machine,
                      mem_size=LINUX_MEM_SIZE if machine == "pc" else DEFAULT_MEM_SIZE)


def load_guest(spec: str, machine: str | None = None) -> GuestImage:
    """Resolve GUEST as the CLI takes it; a clear error if the image is missing, is not a
    regular file, or is larger than MAX_GUEST_BYTES.  machine: 'pc' for a Linux vmlinux
    given by path (`linux` is one always)."""
    if spec == LINUX:
        machine = "pc"
    machine = machine or "kvmrr"
    path = (guest_dir() / f"{spec}.elf" if spec in BUILTIN
            else guest_dir() / "linux.vmlinux" if spec == LINUX else Path(spec))
    try:
        if not path.is_file():
            if path.exists():
                raise KvmrrError(f"guest image {path} is not a regular file")
            raise FileNotFoundError(2, "No such file or directory")
        with path.open("rb") as f:
            elf = f.read(MAX_GUEST_BYTES + 1)
    except OSError as exc:
        hint = (" (run `make build`)" if spec in BUILTIN
                else " (run `make linux-guest`)" if spec == LINUX else "")
        raise KvmrrError(f"cannot read guest image {path}: {exc.strerror}{hint}") from None
    if len(elf) > MAX_GUEST_BYTES:
        raise KvmrrError(f"guest image {path} is larger than {MAX_GUEST_BYTES >> 20} MiB")
    name = spec if spec in BUILTIN or spec == LINUX else path.stem
    image = guest_from_bytes(name, elf, str(path), machine)
    return GuestImage(name=image.name, path=path, elf=image.elf, sha256=image.sha256,
                      machine=image.machine, mem_size=image.mem_size)
