#!/usr/bin/env bash
# The GPU check of issues 19 (SDXL) and 22 (FLUX.1 DiT, benchmarks/csa_dit.py) on the lent GPU
# machine (/work/shared/spec/gpu-machine.md), ≤ 6 min:
# installs the wheels that machine lacks (diffusers, pydantic, gguf, …) from benchmarks/.whl/ when
# they cannot be imported, puts the checkout and them on PYTHONPATH, and runs
# benchmarks/gpu_check.py. Results go to $OUT (what the device tool brings back) when it is
# set, else benchmarks/results/. Extra arguments go to gpu_check.py (e.g. --budget-s 300).
# With --video first, the same preamble runs benchmarks/video_decoders.py --device cuda instead
# (the Wan2.1 FLF2V and LTX-Video decoders at real size, random weights; ≤ 6 min), the other
# arguments going to it.
#
#   bash benchmarks/gpu_wheels.sh             # first, on a machine with the package index
#   bash benchmarks/gpu_check.sh              # then on the GPU machine, benchmarks/.whl carried
#   bash benchmarks/gpu_check.sh --video      # or the video decoders' benchmark
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
pythonpath=$PWD

if ! "$PYTHON" -c "import diffusers, pydantic, fontTools, gguf" 2>/dev/null; then
    shopt -s nullglob
    wheels=(benchmarks/.whl/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu_check: diffusers or pydantic is missing and benchmarks/.whl/ has no wheels;" \
            "run benchmarks/gpu_wheels.sh where the package index is, and carry benchmarks/.whl" >&2
        exit 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "${wheels[@]}"
    pythonpath=$pythonpath:$SITE
fi
export PYTHONPATH=$pythonpath${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

if [ "${1:-}" = "--video" ]; then
    shift
    exec "$PYTHON" benchmarks/video_decoders.py --device cuda --out "${OUT:-benchmarks/results}" "$@"
fi
exec "$PYTHON" benchmarks/gpu_check.py --out "${OUT:-benchmarks/results}" "$@"
