"""The pipeline's denoising step as it runs (jit of shard_map over the device mesh) against the same per-device
step function under `jax.pmap`, in one process, alternating, so both see the same machine state:

    .venv/bin/python bench/jit_vs_pmap.py --model ~/.cache/sdxl-serve/tiny-model --steps 20 --rounds 12

Each round runs `--steps` guided steps of 64x64 (the tiny model's size) with each; the parameters are stacked on
a leading device axis for pmap, as the pipeline kept them before. Reports the median and best wall time of a
round and the process's CPU seconds per round. One JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

FOUR_DEVICES = "--xla_force_host_platform_device_count=4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FOUR_DEVICES}"
    loops = _loops(args.model, args.steps)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, loop in loops.items():
            wall, cpu = time.perf_counter(), time.process_time()
            loop()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    report: dict[str, Any] = {"steps": args.steps, "rounds": args.rounds, "load": os.getloadavg()[0]}
    for name, pairs in times.items():
        walls = [w for w, _ in pairs]
        report[name] = {
            "wall_p50_s": statistics.median(walls),
            "wall_min_s": min(walls),
            "cpu_p50_s": statistics.median(c for _, c in pairs),
        }
    print(json.dumps(report))


def _loops(model: str, steps: int) -> dict[str, Callable[[], None]]:
    """The jit loop (the pipeline's own executables) and the pmap loop, each warmed up once."""
    from common.protocol import Size
    from worker import pipeline as p

    pipeline = p.SDXLPipeline.load(model, None, p.PipelineOptions(images_per_request=4))
    size = Size(width=64, height=64)
    pipeline.compile(size)
    stepwise = pipeline._compiled[size][True]
    schedule = pipeline._schedule("euler", steps, 7.5)
    params = pipeline._step_params
    prompt = pipeline._prompt("a lighthouse", "", 0, 7.5)
    begun, conditioning = stepwise.begin(params.begin, prompt, schedule)

    def run_jit() -> None:
        import jax

        state: Any = jax.tree_util.tree_map(jax.numpy.copy, begun)  # the step donates it: a fresh copy per round
        for i in range(steps):
            state, _ = stepwise.step(params.step, state, conditioning, schedule, pipeline._numbers[i])
        state.latents.block_until_ready()

    step_fn = pipeline._traced(p._step, p._Variant(pipeline._pipe, size, True))  # the per-device function both run
    loops = {"jit": run_jit, "pmap": _pmap_loop(step_fn, pipeline, (schedule, begun, conditioning), steps)}
    for loop in loops.values():
        loop()
    return loops


def _pmap_loop(step_fn: Any, pipeline: Any, inputs: tuple[Any, Any, Any], steps: int) -> Callable[[], None]:
    """`steps` steps of `step_fn` under `jax.pmap`, with the parameters and constants stacked on a device axis."""
    import jax
    import numpy as np

    devices = pipeline.devices
    on_devices = jax.pmap(lambda x: x)

    def stacked(tree: Any) -> Any:  # one copy per device on a leading axis
        return on_devices(jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * devices), tree))

    def split(tree: Any) -> Any:  # per-image arrays as [devices, images per device, ...]
        return on_devices(jax.tree_util.tree_map(lambda x: np.asarray(x).reshape(devices, -1, *x.shape[1:]), tree))

    step = jax.pmap(step_fn, donate_argnums=(1,))
    schedule, begun, conditioning = inputs
    params, schedule = stacked((pipeline._step_params.step, schedule))
    indices = [stacked(np.int32(i)) for i in range(steps)]
    conditioning = split(conditioning)

    def run() -> None:
        state = split(begun)
        for i in range(steps):
            state, _ = step(params, state, conditioning, schedule, indices[i])
        state.latents.block_until_ready()

    return run


if __name__ == "__main__":
    main()
