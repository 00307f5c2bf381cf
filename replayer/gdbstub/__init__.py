"""Time-travel debugging: the GDB remote serial protocol over a replaying VM.

packets (framing), target (registers and the target description), timeline (the VM
moved to any icount, forwards and back, with automatic snapshots), handlers (gdb's
packets), server (TCP), source (a finished log, whole).  docs/debugging.md."""
from replayer.gdbstub.server import serve
from replayer.gdbstub.source import load_log
from replayer.gdbstub.timeline import DEFAULT_SNAPSHOT_EVERY, Stop, Timeline

__all__ = ["DEFAULT_SNAPSHOT_EVERY", "Stop", "Timeline", "load_log", "serve"]
