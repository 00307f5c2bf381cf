"""cffi build script for the replay core (out-of-line API mode).

The cdef is the public header itself, minus its preprocessor lines, so the binding can
never drift from the C declarations.  setup.py names this in `cffi_modules`.
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in (HERE / "src").glob("*.c"))


def _cdef_text() -> str:
    header = (HERE / "include" / "kvmrr.h").read_text()
    lines = [ln for ln in header.splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "libkvmrr._kvmrr",
    '#include "kvmrr.h"',
    sources=SOURCES,
    include_dirs=[str(HERE / "include")],
    extra_compile_args=["-O2", "-Wall", "-Werror", "-std=gnu11"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
