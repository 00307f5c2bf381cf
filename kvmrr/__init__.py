"""kvmrr: the application on top of the runtime: the CLI, the gateway and the demo."""
from kvmrr_log.version import __version__  # noqa: F401
