"""The only module that touches cffi's `ffi` and `lib`.

It checks every return code, turns failures into typed exceptions, owns C pointers with
`ffi.gc`, and converts events between `struct kvmrr_event` and the plain dicts the rest of
kvmrr (and the Avro schemas) use.  cffi releases the GIL around every call, so a Kafka
thread keeps running while the vCPU runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from libkvmrr._kvmrr import ffi, lib

ABI_VERSION = 6
_ERR_LEN = 512
_TAKE_BATCH = 1024

REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15", "rip", "rflags")

KIND_NAMES = {
    lib.KVMRR_EV_INTERRUPT: "Interrupt",
    lib.KVMRR_EV_DMA: "Dma",
    lib.KVMRR_EV_PORT_IN: "PortIn",
    lib.KVMRR_EV_MMIO_READ: "MmioRead",
    lib.KVMRR_EV_INSN: "Insn",
    lib.KVMRR_EV_OUTPUT: "Output",
    lib.KVMRR_EV_CHECKSUM: "Checksum",
}
KIND_CODES = {name: code for code, name in KIND_NAMES.items()}
STOP_NAMES = {
    lib.KVMRR_STOP_EXITED: "exited",
    lib.KVMRR_STOP_ICOUNT: "icount",
    lib.KVMRR_STOP_DEADLINE: "deadline",
    lib.KVMRR_STOP_EVENTS_FULL: "events_full",
    lib.KVMRR_STOP_NEED_EVENTS: "need_events",
    lib.KVMRR_STOP_DIVERGED: "diverged",
    lib.KVMRR_STOP_ERROR: "error",
}
MODES = {"run": lib.KVMRR_MODE_RUN, "record": lib.KVMRR_MODE_RECORD,
         "replay": lib.KVMRR_MODE_REPLAY}
SREG_NAMES = ("cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base", "cr0", "cr2", "cr3",
              "cr4", "cr8", "efer")
DEBUG_WHY = {
    lib.KVMRR_DEBUG_ICOUNT: "icount",
    lib.KVMRR_DEBUG_BREAK: "break",
    lib.KVMRR_DEBUG_WATCH: "watch",
    lib.KVMRR_DEBUG_DEADLINE: "deadline",
    lib.KVMRR_DEBUG_RUN_STOP: "run_stop",
    lib.KVMRR_DEBUG_ERROR: "error",
}
DEBUG_MAX_BREAK = lib.KVMRR_DEBUG_MAX_BREAK
DEBUG_MAX_WATCH = lib.KVMRR_DEBUG_MAX_WATCH
DEBUG_READ_MAX = lib.KVMRR_DEBUG_READ_MAX
COUNTERS = {"step": lib.KVMRR_COUNTER_STEP, "fast": lib.KVMRR_COUNTER_FAST}
MACHINES = {"kvmrr": lib.KVMRR_MACHINE_KVMRR, "pc": lib.KVMRR_MACHINE_PC}


class KvmrrError(Exception):
    """The replay core refused or failed; the message is one line for the user."""


class GuestError(KvmrrError):
    """The guest or KVM failed while running (triple fault, unknown port, ...)."""


if lib.kvmrr_abi_version() != ABI_VERSION:
    raise ImportError(f"libkvmrr ABI {lib.kvmrr_abi_version()} but this binding speaks "
                      f"{ABI_VERSION}: rebuild with `make build`")


@dataclass(frozen=True)
class DebugResult:
    why: str                  # DEBUG_WHY's names
    index: int                # the breakpoint or watchpoint hit, else -1
    icount: int
    address: int
    steps: int
    run_stop: str | None      # why == "run_stop": the run loop's stop (STOP_NAMES)
    exit_code: int
    message: str


@dataclass(frozen=True)
class RunResult:
    stop: str
    icount: int
    exit_code: int
    message: str


def _err_buf():
    return ffi.new("char[]", _ERR_LEN)


def _str(buf) -> str:
    return ffi.string(buf).decode("utf-8", "replace")


def calibrate() -> tuple[str, str]:
    """(best exact counter name, why) for this host."""
    why = _err_buf()
    code = lib.kvmrr_calibrate(why, _ERR_LEN)
    if code < 0:
        raise KvmrrError(f"cannot calibrate the instruction counter: {_str(why)}")
    return ("fast" if code == lib.KVMRR_COUNTER_FAST else "step"), _str(why)


def cpu_model() -> str:
    """The CPU a guest sees on this host: the model's name and the hash of the CPUID
    answers a probe guest actually got ('kvmrr-x86-64-v1:0123456789abcdef').  A log states
    it; a host that gives other answers cannot replay the log."""
    name = ffi.new("char[]", 64)
    lib.kvmrr_cpu_model(name, 64, ffi.NULL)
    seen = ffi.new("uint64_t *")
    err = _err_buf()
    if lib.kvmrr_cpu_seen(ffi.NULL, 0, seen, err, _ERR_LEN) < 0:
        raise KvmrrError(f"cannot probe the CPU model a guest sees: {_str(err)}")
    return f"{_str(name)}:{seen[0]:016x}"


def hash64(data: bytes, seed: int = 0) -> int:
    return lib.kvmrr_hash64(data, len(data), seed)


def _event_to_dict(ev) -> dict:
    kind = KIND_NAMES.get(ev.kind)
    d = {"kind": kind, "icount": ev.icount, "rip": ev.rip}
    if ev.kind == lib.KVMRR_EV_INTERRUPT:
        d["vector"] = ev.a
    elif ev.kind == lib.KVMRR_EV_DMA:
        d["gpa"] = ev.a
        d["data"] = bytes(ffi.buffer(ev.data, ev.len)) if ev.len else b""
    elif ev.kind == lib.KVMRR_EV_PORT_IN:
        d.update(port=ev.a, size=ev.b, value=ev.c)
    elif ev.kind == lib.KVMRR_EV_MMIO_READ:
        d.update(gpa=ev.a, size=ev.b, value=ev.c)
    elif ev.kind == lib.KVMRR_EV_INSN:
        d.update(opcode=ev.a, rax=ev.b, rdx=ev.c, rcx=ev.d)
    elif ev.kind == lib.KVMRR_EV_OUTPUT:
        d.update(channel=ev.a, seq=ev.b)
        d["data"] = bytes(ffi.buffer(ev.data, ev.len)) if ev.len else b""
    elif ev.kind == lib.KVMRR_EV_CHECKSUM:
        d["state_hash"] = ev.a
        d["regs"] = list(ev.regs)
    return d


def _dict_to_event(d: dict, slot, keep: list) -> None:
    kind = KIND_CODES.get(d["kind"])
    if kind is None:
        raise KvmrrError(f"event kind {d['kind']!r} cannot be replayed by the core")
    slot.kind = kind
    slot.icount = d["icount"]
    slot.rip = d["rip"]
    slot.a = slot.b = slot.c = slot.d = 0
    slot.len = 0
    slot.data = ffi.NULL
    if kind == lib.KVMRR_EV_INTERRUPT:
        slot.a = d["vector"]
    elif kind in (lib.KVMRR_EV_DMA, lib.KVMRR_EV_OUTPUT):
        data = d["data"]
        if kind == lib.KVMRR_EV_DMA:
            slot.a = d["gpa"]
        else:
            slot.a, slot.b = d["channel"], d["seq"]
        buf = ffi.from_buffer(data)
        keep.append(buf)
        slot.data = buf
        slot.len = len(data)
    elif kind in (lib.KVMRR_EV_PORT_IN,):
        slot.a, slot.b, slot.c = d["port"], d["size"], d["value"]
    elif kind == lib.KVMRR_EV_MMIO_READ:
        slot.a, slot.b, slot.c = d["gpa"], d["size"], d["value"]
    elif kind == lib.KVMRR_EV_INSN:
        slot.a, slot.b, slot.c, slot.d = d["opcode"], d["rax"], d["rdx"], d["rcx"]
    elif kind == lib.KVMRR_EV_CHECKSUM:
        slot.a = d["state_hash"]
        for i, v in enumerate(d.get("regs") or ()):
            if i < lib.KVMRR_NREGS:
                slot.regs[i] = v


class VmHandle:
    """One C VM.  Not thread-safe except nic_push() and interrupt()."""

    def __init__(self, *, elf: bytes, bootargs: str, mem_size: int, mode: str,
                 counter: str, checksum_every: int, machine: str = "kvmrr",
                 host_cpu: int = -1):
        cfg = ffi.new("struct kvmrr_config *")
        cfg.mem_size = mem_size
        cfg.mode = MODES[mode]
        cfg.counter = COUNTERS[counter]
        cfg.checksum_every = checksum_every
        if machine not in MACHINES:
            raise KvmrrError(f"unknown machine {machine!r} ({', '.join(MACHINES)})")
        cfg.machine = MACHINES[machine]
        cfg.host_cpu = host_cpu
        err = _err_buf()
        ptr = lib.kvmrr_vm_create(cfg, elf, len(elf), bootargs.encode(), err, _ERR_LEN)
        if ptr == ffi.NULL:
            raise KvmrrError(_str(err))
        self._vm = ffi.gc(ptr, lib.kvmrr_vm_destroy)
        self._limits = ffi.new("struct kvmrr_limits *")
        self._result = ffi.new("struct kvmrr_result *")
        self._events = ffi.new("struct kvmrr_event[]", _TAKE_BATCH)

    def close(self) -> None:
        if self._vm is not None:
            ffi.release(self._vm)
            self._vm = None

    def run(self, stop_icount: int = -1, deadline_ns: int = 0,
            stop_at_output: bool = False) -> RunResult:
        self._limits.stop_icount = stop_icount
        self._limits.deadline_ns = deadline_ns
        self._limits.stop_at_output = int(stop_at_output)
        lib.kvmrr_vm_run(self._vm, self._limits, self._result)
        r = self._result
        return RunResult(STOP_NAMES.get(r.stop, str(r.stop)), r.icount, r.exit_code,
                         _str(r.message))

    @property
    def host_cpu(self) -> int:
        return lib.kvmrr_vm_host_cpu(self._vm)

    @property
    def icount(self) -> int:
        return lib.kvmrr_vm_icount(self._vm)

    def take_events(self) -> list[dict]:
        out = []
        while True:
            n = lib.kvmrr_vm_take_events(self._vm, self._events, _TAKE_BATCH)
            out.extend(_event_to_dict(self._events[i]) for i in range(n))
            if n < _TAKE_BATCH:
                return out

    def feed_events(self, events: list[dict]) -> None:
        if not events:
            return
        arr = ffi.new("struct kvmrr_event[]", len(events))
        keep: list = []
        for i, d in enumerate(events):
            try:
                _dict_to_event(d, arr[i], keep)
            except (OverflowError, TypeError, ValueError, KeyError, AttributeError) as exc:
                # a corrupt or forged log: a field missing, of the wrong type, or beyond
                # the machine word the core holds it in
                kind = d.get("kind") if isinstance(d, dict) else None
                raise KvmrrError(f"event {i} ({kind or 'no kind'}) has a field that is "
                                 f"missing or out of range: "
                                 f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
        err = _err_buf()
        if lib.kvmrr_vm_feed_events(self._vm, arr, len(events), err, _ERR_LEN) < 0:
            raise KvmrrError(_str(err))

    def go_live(self, checksum_every: int) -> None:
        err = _err_buf()
        if lib.kvmrr_vm_go_live(self._vm, checksum_every, err, _ERR_LEN) < 0:
            raise KvmrrError(_str(err))

    def set_horizon(self, icount: int) -> None:
        lib.kvmrr_vm_set_horizon(self._vm, icount)

    def pending_events(self) -> int:
        return lib.kvmrr_vm_pending_events(self._vm)

    def nic_push(self, packet: bytes) -> bool:
        return lib.kvmrr_vm_nic_push(self._vm, packet, len(packet)) == 0

    def interrupt(self) -> None:
        lib.kvmrr_vm_interrupt(self._vm)

    def regs(self) -> dict[str, int]:
        arr = ffi.new("uint64_t[]", lib.KVMRR_NREGS)
        if lib.kvmrr_vm_get_regs(self._vm, arr) < 0:
            raise KvmrrError("cannot read the vCPU registers")
        return dict(zip(REG_NAMES, arr))

    def state_hash(self) -> int:
        return lib.kvmrr_vm_state_hash(self._vm)

    def divergence(self) -> dict:
        d = ffi.new("struct kvmrr_divergence *")
        lib.kvmrr_vm_divergence(self._vm, d)
        expected = _event_to_dict(d.expected) if d.expected.kind else None
        if expected and "data" in expected:
            expected["data"] = b""   # payloads are not kept for the report
        return {
            "icount": d.icount,
            "reason": _str(d.reason),
            "expected": expected,
            "actual_kind": KIND_NAMES.get(d.actual_kind),
            "actual_regs": dict(zip(REG_NAMES, d.actual)),
            "actual_hash": d.actual_hash,
        }

    def msrs_skipped(self) -> list[int]:
        """MSRs KVM lists that a snapshot cannot carry (they do not read or write back)."""
        out = ffi.new("uint32_t[]", 512)
        n = lib.kvmrr_vm_msrs_skipped(self._vm, out, 512)
        return [out[i] for i in range(min(n, 512))]

    def stats(self) -> dict[str, int]:
        s = ffi.new("struct kvmrr_stats *")
        lib.kvmrr_vm_stats(self._vm, s)
        return {k: getattr(s, k) for k in ("exits", "kicks", "steps", "events", "peak_rate",
                                              "breakpoints")}

    def snapshot(self) -> bytes:
        size = lib.kvmrr_vm_snapshot_size(self._vm)
        buf = ffi.new("uint8_t[]", size)
        n = ffi.new("size_t *")
        if lib.kvmrr_vm_snapshot_save(self._vm, buf, size, n) < 0:
            raise KvmrrError("cannot save a snapshot of the VM")
        return bytes(ffi.buffer(buf, n[0]))

    def restore(self, blob: bytes) -> None:
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise KvmrrError(f"a snapshot blob must be bytes, not {type(blob).__name__}")
        err = _err_buf()
        if lib.kvmrr_vm_snapshot_restore(self._vm, blob, len(blob), err, _ERR_LEN) < 0:
            raise KvmrrError(_str(err))

    # -- for a debugger (docs/debugging.md) ------------------------------------------
    def sregs(self) -> dict[str, int]:
        s = ffi.new("struct kvmrr_sregs *")
        if lib.kvmrr_vm_get_sregs(self._vm, s) < 0:
            raise KvmrrError("cannot read the vCPU's segment and control registers")
        return {k: getattr(s, k) for k in SREG_NAMES}

    def read_virt(self, address: int, length: int) -> bytes:
        """Guest memory by virtual address; short at the first unmapped page."""
        if length < 0 or length > DEBUG_READ_MAX or not 0 <= address < 1 << 64:
            raise KvmrrError(f"cannot read {length} bytes at {address:#x}")
        buf = ffi.new("uint8_t[]", max(length, 1))
        n = lib.kvmrr_vm_read_virt(self._vm, address, buf, length)
        if n < 0:
            raise KvmrrError(f"cannot read guest memory at {address:#x}")
        return bytes(ffi.buffer(buf, n))

    def debug_run(self, breaks: list[int], watches: list[tuple[int, int]],
                  stop_icount: int = -1, deadline_ns: int = 0) -> DebugResult:
        if len(breaks) > DEBUG_MAX_BREAK or len(watches) > DEBUG_MAX_WATCH:
            raise KvmrrError(f"at most {DEBUG_MAX_BREAK} breakpoints and "
                             f"{DEBUG_MAX_WATCH} watchpoints")
        st = ffi.new("struct kvmrr_debug_stops *")
        st.nbreak, st.nwatch = len(breaks), len(watches)
        for i, a in enumerate(breaks):
            st.breaks[i] = a
        for i, (a, n) in enumerate(watches):
            st.watch_addr[i] = a
            st.watch_len[i] = n
        r = ffi.new("struct kvmrr_debug_result *")
        lib.kvmrr_vm_debug_run(self._vm, st, stop_icount, deadline_ns, r)
        return DebugResult(DEBUG_WHY.get(r.why, str(r.why)), r.index, r.icount, r.address,
                           r.steps, STOP_NAMES.get(r.run_stop) if r.run_stop else None,
                           r.exit_code, _str(r.message))
