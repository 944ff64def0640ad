"""The tiny model's marker (worker/tiny_model.py): set by its writer, read from a model folder's index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.tiny_model import TINY_MARKER, is_tiny_model


@pytest.mark.parametrize(
    ("index", "tiny"),
    [
        ({"_class_name": "FlaxStableDiffusionXLPipeline", TINY_MARKER: True}, True),
        ({"_class_name": "FlaxStableDiffusionXLPipeline"}, False),  # a real model
        ({TINY_MARKER: "yes"}, False),
        ([TINY_MARKER], False),
    ],
)
def test_the_marker_in_model_index_says_tiny(tmp_path: Path, index: object, tiny: bool) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert is_tiny_model(str(tmp_path)) is tiny


def test_a_hub_id_a_file_or_garbage_is_not_tiny(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{not json")
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    assert not any(map(is_tiny_model, [str(tmp_path), str(single), "stabilityai/stable-diffusion-xl-base-1.0"]))
