#!/usr/bin/env bash
# The pipeline's speed on an NVIDIA GPU, on a machine that cannot reach a package index (not yet timed on a GPU).
#
# Written for an image with Python 3.12, jax with CUDA and flax, but transformers 5 (no Flax CLIP) and no diffusers.
# It makes a virtual environment that sees the image's packages (jax, flax, numpy, ...), installs over them, offline
# and without resolving anything, the wheels of a folder brought along (bench/gpu-wheels.sh fills it: the pins of
# bench/gpu-wheels.txt and this project's wheel; pip itself runs from its wheel there), checks the versions, checks
# that jax sees a GPU, then runs, for each variant (1 and 4 images, einsum and dot_product attention, stepwise and
# fused; and the engine's buckets: 1, 2, 4 and 8 rows per device) in a process of its own,
#
#   sdxl-serve bench generate --model sdxl-random --size 1024x1024 --steps 20 --json \
#       --images N --attention A --progress|--no-progress
#   sdxl-serve bench generate --model sdxl-random --size 1024x1024 --steps 20 --json \
#       --engine-rows R --attention einsum --progress
#
# and keeps their JSON lines (OUT/variants/NAME.jsonl, all of them in OUT/generate.jsonl) with their logs and the
# machine's description. Before them, in a process of its own and in seconds, the host's time to pass SDXL's UNet
# parameters to a compiled step (OUT/dispatch.jsonl: whether the host can be on a GPU step's critical path):
#
#   sdxl-serve bench dispatch --calls 200 --rounds 3 --json
#
# and after them, in a process of its own, the engine's step time with LoRA adapters (OUT/lora.jsonl):
#
#   sdxl-serve bench lora --model sdxl-random --size 1024x1024 --ranks 8,32,128 --steps 5 --rows-per-device 2 \
#       --rounds 2 --json
#
# Run again with the same --out, it does only the variants not yet done.
#
#   bench/gpu.sh --wheels DIR [--out DIR] [--venv DIR] [--python PYTHON] [--dry-run] [--lora-flags FLAGS]
#                [-- MORE BENCH FLAGS]
#
#   --wheels DIR     the folder of wheels (required)
#   --out DIR        where the results go (default: gpu-bench-DATE in the current directory)
#   --venv DIR       the environment to make, afresh (default: OUT/venv)
#   --python PYTHON  the image's interpreter, the one that holds jax (default: python3)
#   --dry-run        everything up to the GPU: no GPU check, and the benchmark commands are written, not run
#   --simulate       everything, on the CPU (JAX_PLATFORMS=cpu, no GPU check): with a bare image's environment rebuilt
#                    on a CPU machine, e.g. -- --model DIR --size 64x64 --steps 1 --repeats 1 --cpu-devices 1
#                    (tests/test_bench_gpu.py; one CPU device, as one GPU, so that one image is not split)
#   --lora-flags F   words appended to the LoRA benchmark's command (e.g. "--model DIR --size 64x64 --steps 1")
#   --dispatch-flags F  words appended to the dispatch benchmark's command (e.g. "--calls 5 --cpu-devices 1")
#   -- FLAGS         appended to each `bench generate` command (e.g. -- --repeats 5)
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
simulate=0
extra=()
lora_extra=()
dispatch_extra=()

fail() { echo "gpu.sh: $*" >&2; exit 2; }
step() { echo "== $*" >&2; }

while (($#)); do
    case $1 in
        --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
        --out) out=${2:?--out needs a folder}; shift 2 ;;
        --venv) venv=${2:?--venv needs a folder}; shift 2 ;;
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --simulate) simulate=1; export JAX_PLATFORMS=cpu; shift ;;
        --lora-flags) read -r -a lora_extra <<<"${2?--lora-flags needs words}"; shift 2 ;;
        --dispatch-flags) read -r -a dispatch_extra <<<"${2?--dispatch-flags needs words}"; shift 2 ;;
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

# pip runs from its own wheel, brought in the folder, inside the new environment: the image may have no pip at all
# (a venv built with uv) or one too old for --python. --ignore-installed: pip neither skips a wheel because the
# image has that version nor uninstalls the image's copy.
install_wheels() {
    local pip_wheel=("$wheels"/pip-*.whl) wheel
    local -a install=()
    for wheel in "$wheels"/*.whl; do
        [[ $wheel == "${pip_wheel[0]}" ]] || install+=("$wheel")
    done
    "$venv/bin/python" "${pip_wheel[0]}/pip" install --quiet --disable-pip-version-check --no-cache-dir \
        --no-deps --no-index --ignore-installed --find-links "$wheels" "${install[@]}"
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

# What the benchmark will import, and from where; fails on a version other than the pins. Run from OUT: a script on
# standard input has the current directory on its path, and a checkout's root holds an editable install's metadata.
record_versions() {
    (cd "$out" && "$venv/bin/python" - "$venv") <<'PY' | tee "$out/versions.txt" >&2
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

# One variant: an image count (or rows-R: the engine at R rows per device, seconds per image of a full batch), an
# attention path, stepwise (--progress) or fused (--no-progress).
VARIANTS=(
    "dispatch"
    "1 einsum --progress" "1 einsum --no-progress" "1 dot_product --progress" "1 dot_product --no-progress"
    "4 einsum --progress" "4 einsum --no-progress" "4 dot_product --progress" "4 dot_product --no-progress"
    "rows-1 einsum --progress" "rows-2 einsum --progress" "rows-4 einsum --progress" "rows-8 einsum --progress"
    "lora"
)

variant_command() {
    local images=$1 attention=$2 progress=$3
    local -a batch=(--images "$images")
    read -r -a cmd <<<"${SDXL_GPU_BENCH_CMD:-sdxl-serve}"
    if [[ $images == dispatch ]]; then
        cmd+=(bench dispatch --calls 200 --rounds 3 --json "${dispatch_extra[@]}")
        return
    fi
    if [[ $images == lora ]]; then
        cmd+=(bench lora --model sdxl-random --size 1024x1024 --ranks 8,32,128 --steps 5 --rows-per-device 2
            --rounds 2 --json "${lora_extra[@]}")
        return
    fi
    if [[ $images == rows-* ]]; then batch=(--engine-rows "${images#rows-}"); fi
    cmd+=(bench generate --model sdxl-random --size 1024x1024 --steps 20 --json
        "${batch[@]}" --attention "$attention" "$progress" "${extra[@]}")
}

# Each variant is a process of its own, its JSON lines in a file of its own, written whole when it succeeds: a run
# cut short keeps the variants it finished (run it again with the same --out and it does only the others), and a
# variant that fails (cuDNN refusing the dot_product attention at compile time) loses only itself. They share a
# persistent compile cache under OUT, so a variant cut short after compiling does not compile again. The hub is
# offline: sdxl-random and the tiny model need nothing from it, and a bare GPU machine reaches nothing.
run_bench() {
    local variant name failed=0
    local -a cmd
    mkdir -p "$out/variants" "$out/compile-cache"
    : >"$out/command.txt"
    for variant in "${VARIANTS[@]}"; do
        read -r images attention progress <<<"$variant"
        variant_command "$images" "$attention" "$progress"
        printf '%q ' "${cmd[@]}" >>"$out/command.txt"
        echo >>"$out/command.txt"
        name="images-$images-$attention${progress/--/-}"
        if [[ $images == rows-* ]]; then name="engine-$images-$attention${progress/--/-}"; fi
        if [[ $images == lora || $images == dispatch ]]; then name=$images; fi
        if ((dry_run)) || [[ -s $out/variants/$name.jsonl ]]; then continue; fi
        step "variant $name"
        if PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv" HF_HUB_OFFLINE=1 \
            JAX_COMPILATION_CACHE_DIR="$out/compile-cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
            "${cmd[@]}" >"$out/variants/$name.partial" 2> >(tee "$out/variants/$name.log" >&2); then
            mv "$out/variants/$name.partial" "$out/variants/$name.jsonl"
        else
            step "variant $name failed (exit $?): see $out/variants/$name.log"
            failed=1
        fi
    done
    if ((dry_run)); then
        step "dry run: would run, one process each:"
        cat "$out/command.txt" >&2
        return
    fi
    local -a generated=()
    for name in "$out/variants/"*.jsonl; do
        [[ $name == */lora.jsonl || $name == */dispatch.jsonl ]] || generated+=("$name")
    done
    cat "${generated[@]}" </dev/null >"$out/generate.jsonl"
    for name in lora dispatch; do
        if [[ -s $out/variants/$name.jsonl ]]; then cp "$out/variants/$name.jsonl" "$out/$name.jsonl"; fi
    done
    step "results: $out/generate.jsonl, $out/lora.jsonl, $out/dispatch.jsonl"
    cat "$out/generate.jsonl"
    return $failed
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
if ((dry_run == 0 && simulate == 0)) && [[ -z ${SDXL_GPU_BENCH_CMD:-} ]]; then
    step "checking that jax sees a GPU"
    check_gpu
fi
step "benchmark"
run_bench
