#!/usr/bin/env bash
# A newcomer's path: a fresh clone of REV, then `make demo`, timed to its `ready:` line.
#
#   bench/newcomer.sh [REV]     (default HEAD; run from the repository)
#
# The clone, its virtualenv and the per-user cache (the tiny model, compiled executables) are new and removed
# after; pip's download cache and the apt packages already on the machine are kept, so the figure is the install
# and the first start, not the download.
set -euo pipefail
rev=${1:-HEAD}
repo=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'kill -- -"$demo" 2>/dev/null || true; rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
git -C "$work/clone" checkout -q "$rev"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
started=$(date +%s.%N)
mkdir -p "$work/run"
XDG_CACHE_HOME="$work/cache" XDG_RUNTIME_DIR="$work/run" setsid make -C "$work/clone" demo PORT="$port" \
  >"$work/demo.log" 2>&1 &
demo=$!  # setsid, not a group leader here, runs make in a new session whose id is this pid
until grep -q '^ready:' "$work/demo.log"; do
  kill -0 "$demo" 2>/dev/null || { tail -20 "$work/demo.log"; echo "make demo exited before ready" >&2; exit 1; }
  sleep 1
done
echo "$rev: $(python3 -c "print(f'{$(date +%s.%N) - $started:.0f}')") s from a fresh clone to ready:"
