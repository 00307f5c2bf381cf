"""The registers gdb sees: a target description (qXfer:features:read:target.xml) with
gdb's amd64 core and SSE features and a kvmrr system feature for the control registers,
and their encoding in g/p replies.  The x87 and SSE registers are not exposed by the
core; they are sent as unavailable ('x'), which gdb shows as <unavailable>."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str
    source: str | None     # 'gpr', 'sreg' (Machine.sregs()), None: unavailable
    key: str = ""


_GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
_TYPES = {"rbp": "data_ptr", "rsp": "data_ptr"}

CORE = ([Reg(n, 64, _TYPES.get(n, "int64"), "gpr", n) for n in _GPRS]
        + [Reg("rip", 64, "code_ptr", "gpr", "rip"),
           Reg("eflags", 32, "i386_eflags", "gpr", "rflags")]
        + [Reg(n, 32, "int32", "sreg", n) for n in ("cs", "ss", "ds", "es", "fs", "gs")]
        + [Reg(f"st{i}", 80, "i387_ext", None) for i in range(8)]
        + [Reg(n, 32, "int", None) for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff",
                                               "foseg", "fooff", "fop")])
SSE = ([Reg(f"xmm{i}", 128, "vec128", None) for i in range(16)]
       + [Reg("mxcsr", 32, "i386_mxcsr", None)])
SYSTEM = [Reg(n, 64, "int64" if n.endswith("base") or n == "efer" else "int64", "sreg", n)
          for n in ("fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")]
REGS = CORE + SSE + SYSTEM

_FLAGS = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in [
    ("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
    ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19),
    ("VIP", 20), ("ID", 21)])
_MXCSR = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in [
    ("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6), ("IM", 7),
    ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15)])
_VEC128 = """<vector id="v8bf16" type="bfloat16" count="8"/>
<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>
<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>
<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>
<union id="vec128"><field name="v8_bfloat16" type="v8bf16"/><field name="v4_float" type="v4f"/>
<field name="v2_double" type="v2d"/><field name="v16_int8" type="v16i8"/>
<field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/>
<field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/></union>"""


def _regs_xml(regs: list[Reg], first: int) -> str:
    return "".join(f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" '
                   f'regnum="{first + i}"/>' for i, r in enumerate(regs))


TARGET_XML = (
    '<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
    '<target version="1.0"><architecture>i386:x86-64</architecture>'
    '<feature name="org.gnu.gdb.i386.core">'
    f'<flags id="i386_eflags" size="4">{_FLAGS}</flags>'
    + _regs_xml(CORE, 0) + '</feature>'
    '<feature name="org.gnu.gdb.i386.sse">' + _VEC128
    + f'<flags id="i386_mxcsr" size="4">{_MXCSR}</flags>'
    + _regs_xml(SSE, len(CORE)) + '</feature>'
    '<feature name="org.kvmrr.system">' + _regs_xml(SYSTEM, len(CORE) + len(SSE))
    + '</feature></target>').encode()


def encode_reg(reg: Reg, regs: dict[str, int], sregs: dict[str, int]) -> str:
    nbytes = reg.bits // 8
    if reg.source is None:
        return "xx" * nbytes
    value = (regs if reg.source == "gpr" else sregs)[reg.key]
    return (value & ((1 << reg.bits) - 1)).to_bytes(nbytes, "little").hex()


def encode_all(regs: dict[str, int], sregs: dict[str, int]) -> str:
    return "".join(encode_reg(r, regs, sregs) for r in REGS)
