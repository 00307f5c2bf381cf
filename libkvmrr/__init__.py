"""libkvmrr: the replay core (C) and its Python binding."""
from libkvmrr._bindings import (REG_NAMES, GuestError, KvmrrError, RunResult, calibrate,
                                hash64)
from libkvmrr.machine import (DEFAULT_MEM_SIZE, Machine, best_counter, cpu_model,
                              resolve_counter)

__all__ = ["DEFAULT_MEM_SIZE", "REG_NAMES", "GuestError", "KvmrrError", "Machine",
           "RunResult", "best_counter", "calibrate", "cpu_model", "hash64", "resolve_counter"]
