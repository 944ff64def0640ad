"""What an operator reads when a role cannot start: the real commands, run as a person runs them, and their
output read back. An expected mistake (a port in use, a model that is not there, a hub out of reach) is one
line naming the cause and the flag that fixes it, with the traceback only at --log-level debug; a gateway
started before its Redis says that it waits, stays alive and not ready, and gets ready once Redis is there.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from testkit import RedisOptions, RedisProcess, free_port, redis_process, wait_http
from worker.tiny_formats import write_single_file
from worker.tiny_model import write_tiny_model

TIMEOUT_S = 180.0


def sdxl_serve(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`sdxl-serve ARGV...` to its end; its output (stdout and stderr together)."""
    return subprocess.run(
        [sys.executable, "-m", "sdxl_serve", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=TIMEOUT_S,
    )


def one_line_error(done: subprocess.CompletedProcess[str], command: str) -> str:
    """The error of a command run at --log-level warning: its whole output, one line; exit status 2."""
    lines = done.stdout.splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stdout
    assert lines[0].startswith(f"sdxl-serve {command}: error: "), lines
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_gateway_on_a_busy_port_says_so_in_one_line(redis_server: RedisProcess, busy_port: int) -> None:
    argv = ("gateway", "--redis-url", redis_server.url(0), "--host", "127.0.0.1", "--port", str(busy_port))
    line = one_line_error(sdxl_serve("--log-level", "warning", *argv), "gateway")
    assert f"--port {busy_port}: 127.0.0.1:{busy_port} is in use" in line and "pass a free --port" in line
    at_info = sdxl_serve(*argv)  # the resolved config, then the error: no traceback
    assert "Traceback" not in at_info.stdout and at_info.stdout.splitlines()[-1] == line
    assert "Traceback" in sdxl_serve("--log-level", "debug", *argv).stdout


def test_a_worker_given_a_model_that_is_not_there_says_so_in_one_line(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-model"
    done = sdxl_serve(
        "--log-level", "warning", "worker", "--redis-url", redis_server.url(0), "--model", str(missing),
        "--metrics-port", "0", "--no-compile-cache",
    )  # fmt: skip
    assert f"--model '{missing}': no such file or folder" in one_line_error(done, "worker")


def test_a_worker_given_a_lora_folder_that_is_not_there_says_so_in_one_line(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-loras"
    done = sdxl_serve(
        "--log-level", "warning", "worker", "--redis-url", redis_server.url(0), "--lora-dir", str(missing),
        "--metrics-port", "0", "--no-compile-cache",
    )  # fmt: skip
    line = one_line_error(done, "worker")
    assert f"--lora-dir {missing} is not a readable folder: create it, or name the folder" in line


def test_a_worker_that_cannot_reach_the_hub_says_so_in_one_line(redis_server: RedisProcess, tmp_path: Path) -> None:
    """No network here is the hub's offline mode: the same refusal before any download."""
    done = sdxl_serve(
        "--log-level", "warning", "worker", "--redis-url", redis_server.url(0), "--model", "someone/sdxl-not-cached",
        "--metrics-port", "0", "--no-compile-cache",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
    )  # fmt: skip
    line = one_line_error(done, "worker")
    assert "--model 'someone/sdxl-not-cached': could not be fetched from the Hugging Face hub" in line
    assert "pass a local folder or .safetensors file as --model" in line


async def test_a_gateway_started_before_redis_waits_for_it_alive_and_not_ready(tmp_path: Path) -> None:
    redis_port, port = free_port(), free_port()
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sdxl_serve", "gateway", "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
        "--host", "127.0.0.1", "--port", str(port),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert gateway.stderr is not None
        async with asyncio.timeout(TIMEOUT_S):
            while b"waiting for Redis" not in (line := await gateway.stderr.readline()):
                assert line, "the gateway exited"
        assert re.search(rf"waiting for Redis at redis://127.0.0.1:{redis_port}/0 .*check --redis-url", line.decode())
        drain = asyncio.create_task(_drain(gateway.stderr))  # it must never fill its pipe
        await wait_http(f"http://127.0.0.1:{port}/healthz", TIMEOUT_S)  # alive meanwhile
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as response:
            assert response.status == 503
        with redis_process(RedisOptions(port=redis_port)):
            await wait_http(f"http://127.0.0.1:{port}/readyz", TIMEOUT_S)  # its retries find Redis
        drain.cancel()
    finally:
        gateway.terminate()
        await gateway.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


def test_up_on_a_busy_port_says_which_child_failed_and_why(tiny_model: Path, tmp_path: Path, busy_port: int) -> None:
    done = sdxl_serve(
        "up", "--port", str(busy_port), "--model", str(tiny_model), "--sizes", "64x64", "--max-steps", "2",
        env={"XDG_RUNTIME_DIR": str(tmp_path)},
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stdout, done.stdout
    assert f"sdxl-serve gateway: error: --port {busy_port}: 127.0.0.1:{busy_port} is in use" in done.stdout
    assert lines[-1] == "sdxl-serve up: error: gateway exited during start-up (see its log above)"
    assert not list(tmp_path.glob("sdxl-serve/up-*.json")), "the state file outlived up"


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 9-channel inpainting UNet."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl-inpainting", inpainting=True)


def test_an_inpainting_model_one_request_at_a_time_is_refused_in_one_line_before_its_weights_load(
    redis_server: RedisProcess, inpainting_model: Path
) -> None:
    """`--engine request` runs text-to-image only, which an inpainting model cannot: the worker would run nothing.
    The model's config says so, so the worker stops before loading its weights, naming --engine rows."""
    argv = (
        "worker", "--redis-url", redis_server.url(0), "--model", str(inpainting_model), "--engine", "request",
        "--sizes", "64x64", "--max-steps", "1", "--metrics-port", "0", "--no-compile-cache",
    )  # fmt: skip
    line = one_line_error(sdxl_serve("--log-level", "warning", *argv), "worker")
    assert "is an inpainting model" in line and "serve it with --engine rows" in line, line
    at_info = sdxl_serve(*argv)
    assert "loading weights" not in at_info.stdout and at_info.stdout.splitlines()[-1] == line


def test_an_inpainting_single_file_one_request_at_a_time_is_refused_in_one_line_before_loading(
    redis_server: RedisProcess, inpainting_model: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """A single file's kind is in its header (its first convolution's shape; the configs come from --model-config):
    refused before its weights are loaded."""
    single = write_single_file(inpainting_model, tmp_path / "inpainting.safetensors")
    argv = (
        "worker", "--redis-url", redis_server.url(0), "--model", str(single), "--model-config", str(tiny_model),
        "--engine", "request", "--sizes", "64x64", "--max-steps", "1", "--metrics-port", "0", "--no-compile-cache",
    )  # fmt: skip
    line = one_line_error(sdxl_serve("--log-level", "warning", *argv), "worker")
    assert "serve it with --engine rows" in line, line
    at_info = sdxl_serve(*argv)
    assert "loading weights" not in at_info.stdout and at_info.stdout.splitlines()[-1] == line
