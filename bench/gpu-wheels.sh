#!/usr/bin/env bash
# Fill a folder with every wheel bench/gpu.sh installs, for CPython 3.12 on manylinux x86_64, to carry to a GPU
# machine that cannot reach a package index: the pins of bench/gpu-wheels.txt, no dependencies resolved, and this
# project's own wheel built from this checkout's last commit.
#
#   bench/gpu-wheels.sh DIR          (needs pip and PyPI; PYTHON=... picks the interpreter that runs pip)
set -euo pipefail

dir=${1:?usage: bench/gpu-wheels.sh DIR}
python=${PYTHON:-python3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

mkdir -p "$dir"
# Each manylinux tag is matched exactly by pip, so name the ones these wheels are published under.
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --dest "$dir" --requirement "$root/bench/gpu-wheels.txt"
# From the committed tree, in a folder of its own: a build in the checkout would reuse a stale build/ folder.
source=$(mktemp -d)
trap 'rm -rf "$source"' EXIT
git -C "$root" archive HEAD | tar -x -C "$source"
"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$dir" "$source"
ls -l "$dir"
