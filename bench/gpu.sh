#!/usr/bin/env bash
# The pipeline's speed on an NVIDIA GPU, on a machine that cannot reach a package index. About 10 minutes on an H200.
#
# Written for an image with Python 3.12, jax with CUDA and flax, but transformers 5 (no Flax CLIP) and no diffusers.
# It makes a virtual environment that sees the image's packages (jax, flax, numpy, ...), installs over them, offline
# and without resolving anything, the wheels of a folder brought along (bench/gpu-wheels.sh fills it: the pins of
# bench/gpu-wheels.txt and this project's wheel), checks the versions, checks that jax sees a GPU, then runs
#
#   sdxl-serve bench generate --model sdxl-random --size 1024x1024 --steps 20 --images 1,4 \
#       --attention einsum,dot_product --json
#
# and keeps its JSON lines (one per image count and attention path) with the log and the machine's description.
#
#   bench/gpu.sh --wheels DIR [--out DIR] [--venv DIR] [--python PYTHON] [--dry-run] [-- MORE BENCH FLAGS]
#
#   --wheels DIR     the folder of wheels (required)
#   --out DIR        where the results go (default: gpu-bench-DATE in the current directory)
#   --venv DIR       the environment to make, afresh (default: OUT/venv)
#   --python PYTHON  the image's interpreter, the one that holds jax (default: python3)
#   --dry-run        everything up to the GPU: no GPU check, and the benchmark command is written, not run
#   -- FLAGS         appended to the benchmark command (e.g. -- --repeats 5)
#
# SDXL_GPU_BENCH_CMD, when set, runs in place of the environment's `sdxl-serve` (with the environment first on PATH)
# and skips the GPU check: the test suite runs the whole script this way on a machine with no GPU.
set -euo pipefail
shopt -s nullglob nocaseglob

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pins="$here/gpu-wheels.txt"
wheels=""
out="gpu-bench-$(date -u +%Y%m%dT%H%M%SZ)"
venv=""
python=python3
dry_run=0
extra=()

fail() { echo "gpu.sh: $*" >&2; exit 2; }
step() { echo "== $*" >&2; }

while (($#)); do
    case $1 in
        --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
        --out) out=${2:?--out needs a folder}; shift 2 ;;
        --venv) venv=${2:?--venv needs a folder}; shift 2 ;;
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; extra=("$@"); break ;;
        *) fail "unknown argument: $1 (see the header of $0)" ;;
    esac
done
[[ -n $wheels ]] || fail "--wheels DIR is required (bench/gpu-wheels.sh DIR fills one)"
[[ -d $wheels ]] || fail "--wheels $wheels: no such folder"
wheels=$(cd "$wheels" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
venv=${venv:-$out/venv}

# One wheel of each pinned distribution at its pinned version, and this project's: a missing one fails here,
# before anything is made, rather than as an import error minutes later.
check_wheels() {
    local line name version found
    while read -r line; do
        line=${line%%#*}
        [[ $line == *==* ]] || continue
        name=${line%%==*}
        version=${line#*==}
        name=${name//-/_}
        found=("$wheels/${name}-${version// /}-"*.whl)
        ((${#found[@]} == 1)) || fail "$wheels must hold one wheel of ${line// /} (found ${#found[@]})"
    done <"$pins"
    found=("$wheels"/sdxl_serve-*.whl)
    ((${#found[@]} == 1)) || fail "$wheels must hold one sdxl_serve wheel (found ${#found[@]}; bench/gpu-wheels.sh builds it)"
}

make_venv() {
    rm -rf "$venv"
    "$python" -m venv --system-site-packages --without-pip "$venv"
}

# --ignore-installed: pip neither skips a wheel because the image has that version nor uninstalls the image's copy.
install_wheels() {
    "$python" -m pip --python "$venv/bin/python" install --quiet --disable-pip-version-check --no-cache-dir \
        --no-deps --no-index --ignore-installed --find-links "$wheels" "$wheels"/*.whl
}

# A venv made from an interpreter that is itself in a venv (as on the GPU images, /opt/.../.venv/bin/python3) sees
# only the base interpreter's packages, not jax: a .pth file puts the image's site-packages after the venv's own, so
# the wheels installed here win and everything else comes from the image. Written after the install, which must not
# see the image's copies.
see_image_packages() {
    local image_site venv_site
    image_site=$("$python" -c 'import site; print("\n".join(site.getsitepackages()))')
    venv_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    printf '%s\n' "$image_site" >"$venv_site/_image_site_packages.pth"
}

# What the benchmark will import, and from where; fails on a version other than the pins.
record_versions() {
    "$venv/bin/python" - "$venv" <<'PY' | tee "$out/versions.txt" >&2
import importlib.metadata as md
import sys

venv = sys.argv[1]
pinned = {"diffusers": "0.39.0", "transformers": "4.57.6"}
names = ("sdxl-serve", "diffusers", "transformers", "huggingface-hub", "tokenizers", "jax", "jaxlib", "flax", "numpy")
print(f"python {sys.version.split()[0]} at {sys.executable}")
for name in names:
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
        continue
    where = "this venv" if str(dist.locate_file("")).startswith(venv) else "the image"
    print(f"{name} {dist.version} ({where})")
wrong = [f"{name} {md.version(name)} (want {want})" for name, want in pinned.items() if md.version(name) != want]
if not md.version("huggingface-hub").startswith("0.36."):
    wrong.append(f"huggingface-hub {md.version('huggingface-hub')} (want 0.36.x)")
if wrong:
    sys.exit("wrong versions: " + ", ".join(wrong))
PY
}

check_gpu() {
    if command -v nvidia-smi >/dev/null; then nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true; fi
    "$venv/bin/python" -c '
import sys, jax
devices = jax.devices()
print(f"jax {jax.__version__}: {devices}")
if devices[0].platform != "gpu":
    sys.exit(f"jax sees no GPU ({devices}): the benchmark would run on the CPU")
' 2>&1 | tee -a "$out/versions.txt" >&2
}

run_bench() {
    local -a cmd
    read -r -a cmd <<<"${SDXL_GPU_BENCH_CMD:-sdxl-serve}"
    cmd+=(bench generate --model sdxl-random --size 1024x1024 --steps 20 --images 1,4
        --attention einsum,dot_product --json "${extra[@]}")
    printf '%q ' "${cmd[@]}" >"$out/command.txt"
    echo >>"$out/command.txt"
    if ((dry_run)); then
        step "dry run: would run $(cat "$out/command.txt")"
        return
    fi
    # JSON lines on stdout are kept as they come: a run cut short keeps the image counts it finished.
    PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv" "${cmd[@]}" >"$out/generate.jsonl" 2> >(tee "$out/generate.log" >&2)
    step "results: $out/generate.jsonl"
    cat "$out/generate.jsonl"
}

step "checking the wheels in $wheels"
check_wheels
step "making $venv over $python's packages"
make_venv
step "installing the wheels offline"
install_wheels
see_image_packages
step "versions"
record_versions
if ((dry_run == 0)) && [[ -z ${SDXL_GPU_BENCH_CMD:-} ]]; then
    step "checking that jax sees a GPU"
    check_gpu
fi
step "benchmark"
run_bench
