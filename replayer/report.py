"""Divergence reports: where, what the log expected, and both register sets side by side."""
from __future__ import annotations

from libkvmrr import REG_NAMES


def _fmt_event(ev: dict | None) -> str:
    if not ev:
        return "nothing"
    fields = ", ".join(f"{k}={v:#x}" if isinstance(v, int) and k in ("rip", "gpa", "value",
                                                                     "state_hash") else f"{k}={v}"
                       for k, v in ev.items() if k not in ("kind", "regs", "data"))
    return f"{ev['kind']}({fields})"


def format_divergence(div: dict, recorded_regs: list[int] | None,
                      recorded_at: int | None) -> str:
    """recorded_regs: the registers the log holds at div's icount (a Checksum there), or the
    latest ones it holds before (recorded_at says where), or None."""
    lines = [f"divergence at icount {div['icount']}: {div['reason']}",
             f"  log expected: {_fmt_event(div['expected'])}",
             f"  replay did:   {div['actual_kind'] or 'no matching event'}"]
    if div.get("actual_hash"):
        exp = div["expected"] or {}
        lines.append(f"  state hash:   log {exp.get('state_hash', 0):016x}  "
                     f"replay {div['actual_hash']:016x}")
    same_point = recorded_at == div["icount"]
    head = "recorded" if same_point else (
        f"recorded@{recorded_at}" if recorded_at is not None else "recorded")
    lines.append(f"  {'register':<8} {head:>20} {'replay':>20}")
    actual = div["actual_regs"]
    for i, name in enumerate(REG_NAMES):
        exp_val = recorded_regs[i] if recorded_regs else None
        if name == "rip" and div["expected"] and same_point is False:
            exp_val = div["expected"]["rip"]
        left = f"{exp_val:#018x}" if exp_val is not None else "-"
        mark = "  <--" if exp_val is not None and exp_val != actual[name] else ""
        lines.append(f"  {name:<8} {left:>20} {actual[name]:#018x}{mark}")
    return "\n".join(lines)
