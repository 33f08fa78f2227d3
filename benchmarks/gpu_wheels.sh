#!/usr/bin/env bash
# Download, on a machine with the package index, the wheels the lent GPU machine lacks
# (/work/shared/spec/gpu-machine.md: diffusers, pydantic and its parts, typer, click,
# typing_extensions; fonttools, which captions need since render/ reads fonts with it; gguf,
# which diffusers' GGUF loader and csa_dit.py's Q8_0 part need) into
# benchmarks/.whl/, for Python 3.12 on x86_64 Linux. The versions are
# the ones installed in .venv, so the GPU run uses what the tests here ran with (diffusers is
# pinned to 0.42.1 either way). imageio-ffmpeg is left out: `generate` does not need it.
#
#   bash benchmarks/gpu_wheels.sh            # ≈ 9 MB; then carry benchmarks/.whl to the GPU
#   PIP=/path/to/pip bash benchmarks/gpu_wheels.sh
#   PY=3.11 bash benchmarks/gpu_wheels.sh    # for another Python (a rehearsal of the GPU run here)
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-.venv/bin/pip}
PY=${PY:-3.12} # the GPU machine's python3
DEST=benchmarks/.whl

# "name==version" as installed where $PIP points, else the bare name (pip picks the newest).
pin() {
    local version
    version=$("$PIP" show "$1" 2>/dev/null | sed -n 's/^Version: //p')
    if [ -n "$version" ]; then echo "$1==$version"; else echo "$1"; fi
}

packages=(diffusers==0.42.1)
for name in pydantic pydantic_core annotated-types typing-inspection typer click typing_extensions \
    fonttools gguf; do
    packages+=("$(pin "$name")")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl # an older version left here would be installed next to the new one
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp --platform manylinux2014_x86_64 -d "$DEST" "${packages[@]}"
echo "wheels in $DEST:"
ls -l "$DEST"
du -sh "$DEST"
