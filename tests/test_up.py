"""`sdxl-serve up`'s flags against its children's: every flag `up` takes that a gateway or a worker also takes
reaches that child, as the child's own parser reads the command line `up` starts it with.

The cases are generated from the parsers: a flag added to `up` (or to a child) is checked without a test being
written for it, and a flag of `up` that no child takes must be named here as `up`'s own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from common.config import ConfigError
from sdxl_serve.cli import build_parser
from sdxl_serve.up import Resolved, UpConfig, child_command, children
from worker.cli import worker_config

# Flags only `up` itself reads: how many workers, where the tiny model is made, supervision.
UP_ONLY = frozenset(
    {
        "--workers",
        "--no-join",
        "--cache-dir",
        "--ready-timeout",
        "--restart-delay",
        "--restart-max-delay",
        "--restart-limit",
        "--restart-window",
    }
)
# What `up` settles itself when these are not given (a private redis-server, a directory of the run, the tiny
# model or SDXL base); given, they are passed on as they are.
UNSET = {"--redis-url": "redis://127.0.0.1:1/0", "--blob-store": "file:///run/images", "--model": "/cache/tiny-model"}
SCRATCH = Path("/run")  # the directory of the run
# Values the generic rule below cannot make up (a format of its own, or a rule between two flags).
SAMPLES = {
    "--redis-url": "redis://10.0.0.5:6390/3",
    "--blob-store": "file:///srv/sdxl-images",
    "--sizes": "64x64,128x96",
    "--default-steps": "3",
    "--host": "0.0.0.0",
    "--model": "/models/sdxl",
    "--compile-cache": "/srv/compile-cache",
    "--moderation-url": "http://127.0.0.1:9/moderate",
}
CHILDREN = ("gateway", "worker")
GLOBAL = frozenset({"--log-level", "--log-format"})  # given before the subcommand


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found: argparse.ArgumentParser = sub.choices[name]
    return found


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every long option of `parser` (help, version and removed flags aside), with its action."""
    return {
        flag: action
        for action in parser._actions
        if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
        for flag in action.option_strings
        if flag.startswith("--")
    }


def up_flags() -> dict[str, argparse.Action]:
    """`up`'s flags, the global ones (--log-level, --log-format) included."""
    parser = build_parser(load=["up"])
    return {**options(parser), **options(subparser(parser, "up"))}


def takers(flag: str) -> list[str]:
    """The children whose own parser takes `flag`."""
    parser = build_parser(load=CHILDREN)
    return [name for name in CHILDREN if flag in {**options(parser), **options(subparser(parser, name))}]


FORWARDED = sorted(flag for flag in up_flags() if takers(flag))


def sample(flag: str, action: argparse.Action) -> list[str]:
    """`flag` with a value other than its default, as a person would type it."""
    if action.nargs == 0:
        return [flag]
    if flag in SAMPLES:
        return [flag, SAMPLES[flag]]
    if action.choices:
        return [flag, next(str(c) for c in action.choices if c != action.default)]
    if action.type is int:
        return [flag, str(int(action.default) + 1)]
    if action.type is float:
        return [flag, str(float(action.default) + 1.5)]
    return [flag, f"{action.default}-other"]


def command_line(argv: list[str]) -> list[str]:
    """`sdxl-serve ... up ...` with `argv` where it belongs: a global flag before the subcommand."""
    return [*argv, "up"] if argv and argv[0] in GLOBAL else ["up", *argv]


async def private_redis() -> str:
    return UNSET["--redis-url"]


async def default_model() -> str:
    return UNSET["--model"]


def default(flag: str) -> Any:
    """What `up` reads for `flag` when it is not given (flags that share a destination share a default)."""
    return getattr(build_parser().parse_args(["up"]), up_flags()[flag].dest)


def seen(argv: list[str], flag: str) -> dict[str, Any]:
    """What each child `up` starts for `argv` reads for `flag` through its own parser, by the child's role
    (children that do not take the flag left out)."""
    config = UpConfig.from_args(build_parser().parse_args(command_line(argv)))
    resolved = asyncio.run(Resolved.settle(config, SCRATCH, private_redis, default_model))
    parser = build_parser(load=CHILDREN)
    values = {}
    for child in children(config, resolved):
        role = child.argv[0]
        own = {**options(parser), **options(subparser(parser, role))}
        if flag in own:
            values[role] = getattr(parser.parse_args(child_command(config, child)), own[flag].dest)
    return values


@pytest.fixture(autouse=True)
def _sample_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags whose value `up` checks on disk: a blocklist that parses, a folder for the safety checker, a folder of
    LoRA adapters."""
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("forbidden\n", encoding="utf-8")
    (tmp_path / "checker").mkdir()
    (tmp_path / "loras").mkdir()
    monkeypatch.setitem(SAMPLES, "--lora-dir", str(tmp_path / "loras"))
    monkeypatch.setitem(SAMPLES, "--prompt-blocklist", str(blocklist))
    monkeypatch.setitem(SAMPLES, "--safety-checker", str(tmp_path / "checker"))


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults as the code states them, not as this machine's environment sets them."""
    for name in list(os.environ):
        if name.startswith("SDXL_SERVE_") or name == "PORT":
            monkeypatch.delenv(name)


def test_every_flag_of_up_is_its_own_or_a_childs() -> None:
    stray = sorted(set(up_flags()) - UP_ONLY - set(FORWARDED))
    assert not stray, f"flags of up that no child takes and up does not read itself: {stray}"
    assert not UP_ONLY & set(FORWARDED), "a flag named as up's own is also a child's"


def test_the_prompt_policy_and_the_safety_checker_are_forwarded() -> None:
    """The flags that decide what a cluster refuses and withholds reach the gateway and the workers `up` starts."""
    policy = {"--prompt-blocklist", "--moderation-url", "--moderation-timeout", "--moderation-fail"}
    safety = {"--safety-checker", "--safety-replace", "--watermark"}
    assert {flag: takers(flag) for flag in policy | safety if flag in FORWARDED} == (
        {flag: ["gateway"] for flag in policy} | {flag: ["worker"] for flag in safety}
    )


LORA_FLAGS = ("--lora-dir", "--lora-cache", "--max-loras", "--lora-max-rank", "--lora-max-mb")


def test_the_lora_flags_are_forwarded_to_the_workers() -> None:
    """The adapters a cluster offers, and how many it holds and applies, are the workers' to know."""
    assert {flag: takers(flag) for flag in LORA_FLAGS if flag in FORWARDED} == {flag: ["worker"] for flag in LORA_FLAGS}


def test_every_worker_up_starts_reads_the_lora_flags_into_its_config(tmp_path: Path) -> None:
    folder = tmp_path / "adapters"
    folder.mkdir()
    argv = ["up", "--workers", "2", "--lora-dir", str(folder), "--lora-cache", "6", "--max-loras", "3"]
    argv += ["--lora-max-rank", "32", "--lora-max-mb", "200"]
    config = UpConfig.from_args(build_parser().parse_args(argv))
    resolved = asyncio.run(Resolved.settle(config, SCRATCH, private_redis, default_model))
    workers = [child for child in children(config, resolved) if child.is_worker]
    assert len(workers) == 2
    for child in workers:
        read = worker_config(build_parser(load=CHILDREN).parse_args(child_command(config, child)))
        lora = (read.lora_dir, read.lora_cache, read.max_loras, read.lora_max_rank, read.lora_max_mb)
        assert lora == (str(folder), 6, 3, 32, 200.0) and read.offered_max_loras == 3


def test_a_missing_lora_folder_is_refused_by_up_naming_the_flag(tmp_path: Path) -> None:
    args = build_parser().parse_args(["up", "--lora-dir", str(tmp_path / "absent")])
    with pytest.raises(ConfigError, match=r"^--lora-dir .*absent is not a readable folder: create it"):
        UpConfig.from_args(args)
    args = build_parser().parse_args(["up", "--max-loras", "9"])
    with pytest.raises(ConfigError, match=r"^--max-loras must be 1\.\.8"):
        UpConfig.from_args(args)


@pytest.mark.parametrize("flag", FORWARDED)
def test_the_flag_reaches_every_child_that_takes_it(flag: str) -> None:
    action = up_flags()[flag]
    argv = sample(flag, action)
    given = getattr(build_parser().parse_args(command_line(argv)), action.dest)
    assert given != default(flag), f"{argv} is {flag}'s default: the case would prove nothing"
    values = seen(argv, flag)
    assert set(values) == set(takers(flag)), f"{flag}: children started {sorted(values)}"
    assert values == dict.fromkeys(values, given), f"{flag} {argv[1:]}: the children read {values}"


@pytest.mark.parametrize("flag", FORWARDED)
def test_a_flag_left_out_gives_each_child_ups_default(flag: str) -> None:
    """`up` alone starts its children with `up`'s defaults (or what it settled itself), not theirs."""
    expected = UNSET.get(flag, default(flag))
    assert seen([], flag) == dict.fromkeys(takers(flag), expected)
