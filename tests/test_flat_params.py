"""worker/flat_params.py: parameters handed to executables as one flat tuple; and `sdxl-serve bench dispatch`.
Assertions are on structure and results, never on the figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_serve.cli import main as cli_main
from worker.flat_params import FlatParams

TREE: dict[str, Any] = {
    "unet": {"b": {"kernel": np.arange(6.0).reshape(2, 3)}, "a": {"bias": np.ones(3)}},
    "vae": {"w": np.zeros(2)},
}


def test_it_flattens_in_one_level_to_the_dicts_leaves_and_reads_as_the_dict() -> None:
    flat = FlatParams.of(TREE)
    children = jax.tree_util.tree_structure(flat).children()  # type: ignore[attr-defined]
    assert len(children) == 3 and all(child.num_leaves == 1 and not child.children() for child in children)
    assert jax.tree_util.tree_leaves(flat) == jax.tree_util.tree_leaves(TREE)  # the same arrays, in the same order
    assert set(flat) == {"unet", "vae"} and len(flat) == 2
    np.testing.assert_array_equal(flat["unet"]["b"]["kernel"], TREE["unet"]["b"]["kernel"])


def test_a_jitted_function_reads_it_by_key_and_one_executable_serves_equal_structures() -> None:
    traces: list[int] = []

    @jax.jit
    def apply(params: FlatParams, x: jax.Array) -> jax.Array:
        traces.append(1)
        result: jax.Array = x @ params["unet"]["b"]["kernel"] + params["unet"]["a"]["bias"]
        return result

    x = jnp.ones((1, 2))
    expected = x @ TREE["unet"]["b"]["kernel"] + 1.0
    np.testing.assert_allclose(apply(FlatParams.of(TREE), x), expected)
    doubled = jax.tree_util.tree_map(lambda leaf: leaf * 2, TREE)
    np.testing.assert_allclose(apply(FlatParams.of(doubled), x), x @ doubled["unet"]["b"]["kernel"] + 2.0)
    assert len(traces) == 1  # equal structures: no retrace


def test_the_pipelines_executables_take_flat_parameters(tiny_model: Path) -> None:
    from worker.pipeline import PipelineOptions, SDXLPipeline

    pipeline = SDXLPipeline.load(str(tiny_model), None, PipelineOptions(images_per_request=4))
    step_params = pipeline._step_params
    for part in (step_params.begin, step_params.step, step_params.finish):
        assert isinstance(part, FlatParams)
    assert set(step_params.step) == {"unet"} and set(step_params.finish) == {"vae"}


def test_bench_dispatch_times_each_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "dispatch", "--calls", "2", "--rounds", "1", "--cpu-devices", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["measurement"] == "dispatch" and report["arrays"] == 1680 and report["calls"] == 2
    assert set(report["host_ms_per_call"]) == {"nested dicts", "flat", "16 buffers"}
    assert min(report["host_ms_per_call"].values()) > 0
