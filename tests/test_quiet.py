"""The Flax deprecation notices are dropped and every other library message still reaches the operator."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROGRAM = """
import logging, sys
logging.basicConfig(stream=sys.stderr, format="ROOT %(name)s %(message)s")
from worker.quiet import silence_flax_deprecation
silence_flax_deprecation()
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging
for log in (transformers_logging.get_logger("transformers.modeling_flax_utils"),
            diffusers_logging.get_logger("diffusers.models.modeling_flax_utils")):
    log.warning("TensorFlow and JAX classes are deprecated and will be removed in Transformers v5.")
    log.warning("Flax classes are deprecated and will be removed in Diffusers v1.0.0.")
    log.warning("news from %s", log.name)
"""


@pytest.mark.parametrize("ci", ["", "1"], ids=["plain", "CI=1"])
def test_only_the_flax_notices_are_dropped_whatever_the_environment(ci: str) -> None:
    """transformers propagates its records to the root logger when CI=1: the notices must not come that way."""
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert not [line for line in lines if "deprecated" in line], done.stderr
    news = [line for line in lines if line.startswith("news from")]
    expected = ["news from diffusers.models.modeling_flax_utils", "news from transformers.modeling_flax_utils"]
    assert sorted(news) == expected
