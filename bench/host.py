"""The machine line every benchmark report carries, so a figure can be traced to where it was measured."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    """Host name, architecture and core count, e.g. `vm x86_64, 2 cores`."""
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores"
