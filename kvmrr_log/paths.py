"""Where the source tree is: the one definition every module that finds a file of the
checkout (built guests, the Kafka scripts, bench configs) uses."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
