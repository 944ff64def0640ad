"""Print the median function size and every function over a limit; fail on a function over the bound (50 lines)
that is not listed below with its reason, or when the median grows past its bound.

A function's size is the lines of its body, from the first statement after the docstring to its last line, so
docstrings and multi-line signatures do not count. Nested functions count on their own and inside their parent.

    python .ci/function_sizes.py common gateway worker
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef

# Functions allowed over --max-lines, by path (as given on the command line) and name, each with its reason.
# An entry is a debt, not a licence: take it out when the function is split.
OVER_THE_BOUND: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Function:
    """One function or method, where it is and how long its body is."""

    path: Path
    line: int
    name: str
    size: int


def body_size(node: FunctionNode) -> int:
    """Lines from the first statement after the docstring to the function's last line."""
    body = node.body
    if len(body) > 1 and ast.get_docstring(node, clean=False) is not None:
        body = body[1:]
    end = node.end_lineno if node.end_lineno is not None else body[-1].lineno
    return end - body[0].lineno + 1


def functions_in(path: Path) -> Iterator[Function]:
    """Every function and method defined in one source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, FunctionNode):
            yield Function(path, node.lineno, node.name, body_size(node))


def source_files(roots: list[Path]) -> Iterator[Path]:
    """The Python files under each root (a file or a folder), skipping roots that do not exist."""
    for root in roots:
        if root.is_file():
            yield root
        elif root.is_dir():
            yield from sorted(root.rglob("*.py"))


def allowed(function: Function) -> bool:
    """Whether the function is listed in OVER_THE_BOUND (its path ending as listed)."""
    path = function.path.as_posix()
    return any(path.endswith(where) and function.name == name for where, name in OVER_THE_BOUND)


def main(argv: list[str] | None = None) -> int:
    """Print the figures; exit 1 when a function not in OVER_THE_BOUND is longer than --max-lines, or the median
    body longer than --max-median lines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="packages or files to measure")
    parser.add_argument("--long", type=int, default=40, help="list functions longer than this (default 40 lines)")
    parser.add_argument("--max-lines", type=int, default=50, help="fail on a longer function (default 50 lines)")
    parser.add_argument("--max-median", type=float, default=15, help="fail above this median (default 15 lines)")
    args = parser.parse_args(argv)
    functions = [f for path in source_files(args.paths) for f in functions_in(path)]
    if not functions:
        print("no functions found", file=sys.stderr)
        return 1
    median = statistics.median(f.size for f in functions)
    long = sorted((f for f in functions if f.size > args.long), key=lambda f: -f.size)
    print(f"{len(functions)} functions, median body {median:g} lines, {len(long)} over {args.long} lines")
    for f in long:
        print(f"  {f.size:4d}  {f.path}:{f.line} {f.name}")
    over = [f for f in functions if f.size > args.max_lines and not allowed(f)]
    for f in over:
        print(f"{f.path}:{f.line} {f.name} is {f.size} lines, over {args.max_lines}: split it", file=sys.stderr)
    failed = bool(over)
    if median > args.max_median:
        print(f"median body {median:g} lines is over {args.max_median:g}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
