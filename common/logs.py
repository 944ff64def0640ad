"""Logging setup shared by every entry point."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def setup_logging(level: str) -> None:
    """One line per event on stderr."""
    logging.basicConfig(level=level.upper(), format=FORMAT, stream=sys.stderr, force=True)
    # JAX reports at INFO that it found no TPU or GPU plugin on every CPU-only start.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
