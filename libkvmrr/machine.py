"""Idiomatic Python over the replay core: a Machine runs one guest image."""
from __future__ import annotations

import functools

from libkvmrr._bindings import DebugResult, KvmrrError, RunResult, VmHandle, calibrate
from libkvmrr._bindings import cpu_model as _probe_cpu_model

DEFAULT_MEM_SIZE = 8 << 20


@functools.lru_cache(maxsize=1)
def best_counter() -> tuple[str, str]:
    """The exact counter this host supports, and why (calibrated once per process)."""
    return calibrate()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU model a guest sees on this host, with the hash of its CPUID answers
    (probed once per process)."""
    return _probe_cpu_model()


def resolve_counter(requested: str) -> tuple[str, str]:
    """`auto` picks the best exact counter; `fast` is refused where it is not exact."""
    if requested == "step":
        return "step", "requested"
    best, why = best_counter()
    if requested == "auto":
        return best, why
    if requested == "fast" and best != "fast":
        raise KvmrrError(f"counter 'fast' is not exact on this host: {why}")
    if requested != "fast":
        raise KvmrrError(f"unknown counter {requested!r} (fast, step or auto)")
    return "fast", why


class Machine:
    """A VM with one vCPU running `elf` in mode run, record or replay."""

    def __init__(self, elf: bytes, *, mode: str, counter: str, bootargs: str = "",
                 mem_size: int = DEFAULT_MEM_SIZE, checksum_every: int = 0,
                 machine: str = "kvmrr", host_cpu: int = -1):
        """machine: 'kvmrr' (an ELF on kvmrr's ports) or 'pc' (a Linux vmlinux on PC
        devices, bootargs its command line).  host_cpu: the host CPU the vCPU runs on,
        -1 for the current one; a replay passes the one its log names."""
        self.mode = mode
        self.counter = counter
        self.mem_size = mem_size
        self.machine = machine
        self._vm = VmHandle(elf=elf, bootargs=bootargs, mem_size=mem_size, mode=mode,
                            counter=counter, checksum_every=checksum_every,
                            machine=machine, host_cpu=host_cpu)

    @property
    def host_cpu(self) -> int:
        """The host CPU the vCPU runs on (CPUID shows the guest its APIC ID)."""
        return self._vm.host_cpu

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._vm.close()

    def run(self, *, stop_icount: int | None = None, deadline_ns: int = 0,
            stop_at_output: bool = False) -> RunResult:
        """stop_at_output: return (stop "deadline") right after the guest's next response
        on the NIC: the recorder's slice ends there (docs/ARCHITECTURE.md §4.5)."""
        return self._vm.run(-1 if stop_icount is None else stop_icount, deadline_ns,
                            stop_at_output)

    @property
    def icount(self) -> int:
        return self._vm.icount

    def take_events(self) -> list[dict]:
        return self._vm.take_events()

    def feed(self, events: list[dict]) -> None:
        self._vm.feed_events(events)

    def go_live(self, checksum_every: int = 0) -> None:
        """Takeover: stop replaying and record from the current instruction on."""
        self._vm.go_live(checksum_every)
        self.mode = "record"

    def set_horizon(self, icount: int) -> None:
        """Replay: no events before icount beyond those fed; the replay may run to it."""
        self._vm.set_horizon(icount)

    @property
    def pending(self) -> int:
        return self._vm.pending_events()

    def nic_push(self, packet: bytes) -> bool:
        return self._vm.nic_push(packet)

    def interrupt(self) -> None:
        self._vm.interrupt()

    def regs(self) -> dict[str, int]:
        return self._vm.regs()

    def state_hash(self) -> str:
        return f"{self._vm.state_hash():016x}"

    def divergence(self) -> dict:
        return self._vm.divergence()

    def stats(self) -> dict[str, int]:
        return self._vm.stats()

    def snapshot(self) -> bytes:
        return self._vm.snapshot()

    def restore(self, blob: bytes) -> None:
        self._vm.restore(blob)

    def msrs_skipped(self) -> list[int]:
        """MSRs KVM lists here that snapshots cannot carry."""
        return self._vm.msrs_skipped()

    # -- for a debugger (replayer/gdbstub) ---------------------------------------------
    def sregs(self) -> dict[str, int]:
        """Segment selectors, fs/gs bases, cr0/cr2/cr3/cr4/cr8 and efer."""
        return self._vm.sregs()

    def read_virt(self, address: int, length: int) -> bytes:
        """Guest memory by virtual address (the guest's page tables); short at the first
        unmapped page."""
        return self._vm.read_virt(address, length)

    def debug_run(self, breaks: list[int], watches: list[tuple[int, int]], *,
                  stop_icount: int | None = None, deadline_ns: int = 0) -> DebugResult:
        """Step the replay until RIP reaches a breakpoint, a watched range changes,
        stop_icount or the deadline; or the run loop stops for another reason."""
        return self._vm.debug_run(breaks, watches,
                                  -1 if stop_icount is None else stop_icount, deadline_ns)
