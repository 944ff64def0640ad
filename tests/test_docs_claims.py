"""The docs name only what exists: every file path, `sdxl-serve` command and flag, `make` target and link.

A claim in the docs is a test. This one is the floor under all the others: a path that was moved, a flag that
was renamed, a subcommand that was dropped or a link to a heading that was reworded fails here, before a reader
meets it. The docs are README.md, docs/*.md and the READMEs under deploy/.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from bench.cli import BENCHMARKS
from sdxl_serve.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("common", "gateway", "worker", "sdxl_serve", "testkit", "bench", "tests", "deploy", "docs", ".ci")
TOP_FILES = ("Makefile", "pyproject.toml", "README.md", "docker-compose.yml", "docker-compose.ha.yml")
# Flags of other programs that the docs name on their own (redis-server, pytest, pip, XLA, docker, kubectl, ...).
FOREIGN_FLAGS = frozenset(
    {
        "--appendonly",
        "--durations",
        "--xla_force_host_platform_device_count",
        "--xla_cpu_enable_concurrency_optimized_scheduler",
        "--xla_cpu_max_isa",
        "--python",
        "--upgrade",
        "--no-deps",
        "--only-binary",
        "--profile",
        "--scale",
        "--build",
        "--kustomize",
        "--system-site-packages",
        "--build-arg",
        "--replicaof",
        "--stop-timeout",
        "--privileged",
        "--device",
        "--user",
        "--network",
        "--gpus",
        "--enable-autoscaling",
    }
)
# Flags the docs' history of figures names: the command that produced a figure, as it was then.
REMOVED_FLAGS = frozenset({"--shapes"})
_PATH = re.compile(r"^(?:\./)?([\w.{},*-]+(?:/[\w.{},*-]*)*)")
_DEFINED_FLAG = re.compile(r"[\"'](--[a-z][a-z0-9_-]*)[\"']")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```")


@dataclass(frozen=True)
class Span:
    """A piece of code in a doc (an inline span or a line of a fenced block), where it stands."""

    doc: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}: `{self.text}`"


def documents() -> list[Path]:
    """The docs a reader meets."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "deploy").rglob("README.md"))]


def spans(doc: Path) -> Iterator[Span]:
    """Every inline code span and every line of a fenced code block."""
    fenced = False
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if fenced:
            yield Span(doc, number, line.strip())
        else:
            yield from (Span(doc, number, text) for text in re.findall(r"`([^`]+)`", line))


def all_spans() -> list[Span]:
    return [span for doc in documents() for span in spans(doc)]


def _expand_braces(path: str) -> list[str]:
    match = re.search(r"\{([^}]*)\}", path)
    if match is None:
        return [path]
    head, tail = path[: match.start()], path[match.end() :]
    return [expanded for part in match.group(1).split(",") for expanded in _expand_braces(head + part + tail)]


def named_paths(span: Span) -> Iterator[str]:
    """The repository paths a span names: words that begin with a top-level folder or are a top-level file."""
    for word in span.text.split():
        match = _PATH.match(word.strip("'\"(),:;"))
        if match is None:
            continue
        path = match.group(1).rstrip(".,:")
        first = path.split("/", 1)[0]
        if (first in TOP_LEVEL and "/" in path) or path in TOP_FILES:
            yield from _expand_braces(path)


def exists(path: str) -> bool:
    if any(mark in path for mark in "*?"):
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


@cache
def parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every `sdxl-serve` command line, by its words: ("up",), ("keys", "new"), ("bench", "start"), () the top."""
    top = build_parser(load=[command.name for command in COMMANDS if command.name != "bench"])
    found = dict(_walk((), top))
    for name in BENCHMARKS:
        parser = argparse.ArgumentParser(prog=f"sdxl-serve bench {name}", allow_abbrev=False)
        importlib.import_module(f"bench.{name}").add_arguments(parser)
        found[("bench", name)] = parser
    return found


def _walk(
    words: tuple[str, ...], parser: argparse.ArgumentParser
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk((*words, name), sub)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _has_subcommands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(action, argparse._SubParsersAction) for action in parser._actions)


@cache
def known_flags() -> frozenset[str]:
    """Every flag the project defines: its command lines' parsers, and the scripts outside them (bench/*.py)."""
    sources = [path for folder in TOP_LEVEL[:6] for path in (ROOT / folder).rglob("*.py")]
    defined = {flag for path in sources for flag in _DEFINED_FLAG.findall(path.read_text(encoding="utf-8"))}
    parsed = {flag for parser in parsers().values() for flag in _options(parser)}
    return frozenset(parsed | defined | FOREIGN_FLAGS | REMOVED_FLAGS)


def _command_line(text: str) -> tuple[list[str], str] | None:
    """The words after a `sdxl-serve` that begins a command, and the rest of the line."""
    match = re.search(r"(?:^|[;&|(]\s*|\$\s+)sdxl-serve(?=\s|$)(.*)$", text)
    if match is None:
        return None
    rest = match.group(1)
    words = re.match(r"((?:\s+[a-z][\w|\\-]*)*)", rest)
    return (words.group(1).split() if words else []), rest


def _deepest(words: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """The longest command the words name, and the words after it."""
    commands = parsers()
    key: tuple[str, ...] = ()
    for index, word in enumerate(words):
        if (*key, word) not in commands:
            return key, words[index:]
        key = (*key, word)
    return key, []


def command_errors(span: Span) -> Iterator[str]:
    """A `sdxl-serve` command line whose subcommand or flags do not exist."""
    found = _command_line(span.text)
    if found is None:
        return
    words, rest = found
    commands = parsers()
    key, after = _deepest(words)
    alternatives = after[0].replace("\\", "").split("|") if after else []
    if len(alternatives) > 1:
        missing = [name for name in alternatives if (*key, name) not in commands]
        yield from [f"{span}: no command `sdxl-serve {' '.join(key)} {name}`" for name in missing]
        return
    if after and _has_subcommands(commands[key]):
        yield f"{span}: no command `sdxl-serve {' '.join((*key, after[0]))}`"
        return
    allowed = _options(commands[key]) | _options(commands[()]) | REMOVED_FLAGS
    for flag in _FLAG.findall(rest):
        if flag not in allowed:
            yield f"{span}: `sdxl-serve {' '.join(key)}` has no flag {flag}"


def flag_errors(span: Span, flags: frozenset[str]) -> Iterator[str]:
    """A flag named on its own (`--sizes sdxl`) that no program of the project defines."""
    words = span.text.split()
    if words and _FLAG.fullmatch(words[0]) and words[0] not in flags:
        yield f"{span}: nothing here defines {words[0]}"


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([\w.-]+):(?!=)", text, flags=re.MULTILINE))


def make_errors(span: Span) -> Iterator[str]:
    targets = make_targets()
    for target in re.findall(r"(?:^|\s)make\s+([\w-]+)", span.text):
        if target not in targets:
            yield f"{span}: no make target `{target}`"


def link_errors(doc: Path, root: Path = ROOT) -> Iterator[str]:
    """A relative link to a file that does not exist, or to a heading that is not in it."""
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            where = f"{doc.relative_to(root)}:{number}"
            if not linked.exists():
                yield f"{where}: link to a missing file {target}"
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                yield f"{where}: link to a missing heading {target}"


@cache
def anchors(doc: Path) -> frozenset[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^#+\s+(.*)$", line)
        if match:
            text = re.sub(r"[^\w\s-]", "", match.group(1).strip().lower().replace("`", ""))
            found.add(re.sub(r"\s", "-", text))
    return frozenset(found)


@pytest.mark.parametrize("doc", documents(), ids=lambda doc: str(doc.relative_to(ROOT)))
def test_every_named_path_exists(doc: Path) -> None:
    missing = [f"{span}: {path}" for span in spans(doc) for path in named_paths(span) if not exists(path)]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("doc", documents(), ids=lambda doc: str(doc.relative_to(ROOT)))
def test_every_command_and_flag_exists(doc: Path) -> None:
    flags = known_flags()
    errors = [
        error for span in spans(doc) for error in [*command_errors(span), *make_errors(span), *flag_errors(span, flags)]
    ]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("doc", documents(), ids=lambda doc: str(doc.relative_to(ROOT)))
def test_every_link_resolves(doc: Path) -> None:
    errors = list(link_errors(doc))
    assert not errors, "\n".join(errors)


def test_the_check_finds_what_is_missing(tmp_path: Path) -> None:
    """The checks themselves fail on a wrong path, flag, command, target and link."""
    doc = ROOT / "docs" / "example.md"
    spans_of = [Span(doc, 1, text) for text in ("worker/nothing.py", "sdxl-serve up --no-such-flag")]
    assert list(named_paths(spans_of[0])) == ["worker/nothing.py"]
    assert not exists("worker/nothing.py")
    assert list(command_errors(spans_of[1])) == [f"{spans_of[1]}: `sdxl-serve up` has no flag --no-such-flag"]
    assert list(command_errors(Span(doc, 1, "sdxl-serve frobnicate"))) != []
    assert list(command_errors(Span(doc, 1, "sdxl-serve bench nothing --runs 2"))) != []
    assert list(make_errors(Span(doc, 1, "make nothing-such"))) != []
    assert list(flag_errors(Span(doc, 1, "--no-such-flag 3"), known_flags())) != []
    assert list(command_errors(Span(doc, 1, "sdxl-serve bench start --runs 2"))) == []
    page = tmp_path / "page.md"
    page.write_text("# A title\n[ok](#a-title) [gone](missing.md) [bad](#no-title)\n", encoding="utf-8")
    assert len(list(link_errors(page, root=tmp_path))) == 2
