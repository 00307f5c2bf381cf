"""KUnit's KTAP results as the Linux guest prints them on its console (issue 13): read by
tests/test_linux_guest.py and bench/linux.py alike."""
from __future__ import annotations

import re

# a result line, after printk's time stamp: indent (4 spaces a level), verdict, number, name
RESULT = re.compile(r"^\[[ 0-9.]+\] (\s*)(not ok|ok) (\d+) (.*)$")


def ktap_results(console: str) -> list[tuple[int, str, str]]:
    """(nesting depth, 'ok' or 'not ok', name) of every KTAP result line."""
    out = []
    for line in console.splitlines():
        m = RESULT.match(line.rstrip("\r"))
        if m:
            out.append((len(m.group(1)) // 4, m.group(2), m.group(4)))
    return out
