"""The machine line every benchmark report carries, so a figure can be traced to where it was measured."""

from __future__ import annotations

import os
import platform

from common.protocol import Size


def describe() -> str:
    """Host name, architecture and core count, e.g. `vm x86_64, 2 cores`."""
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores"


def size_flag(text: str) -> Size:
    """A benchmark's `--size WIDTHxHEIGHT`; exits naming the flag when it is not one."""
    width, _, height = text.partition("x")
    try:
        return Size(width=int(width), height=int(height))
    except ValueError:
        raise SystemExit(f"--size: WIDTHxHEIGHT, e.g. 64x64 (got {text!r})") from None
