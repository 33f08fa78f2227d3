#!/usr/bin/env bash
# Render a folder of stories with N processes on this machine (one per GPU), under torchrun:
# each process renders its share of the stories (one story: its share of the frames) and
# takes the GPU of its LOCAL_RANK. Rerun to resume.
#
#   scripts/render-torchrun.sh N STORIES OUT [extra generate options...]
#   scripts/render-torchrun.sh 4 stories/ outputs
#   scripts/render-torchrun.sh 2 stories/ /tmp/out --model tiny --device cpu
#
# Several machines: run it on each with torchrun's --nnodes/--node-rank/--rdzv-endpoint
# (TORCHRUN_OPTS="--nnodes 2 --node-rank 0 --rdzv-endpoint host:29500").
set -euo pipefail

if [ $# -lt 3 ]; then
    sed -n '2,9p' "$0" >&2
    exit 2
fi
procs=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC2086  # TORCHRUN_OPTS is a list of options, split on purpose
exec "${TORCHRUN:-torchrun}" --nproc_per_node "$procs" ${TORCHRUN_OPTS:-} --no-python \
    bash "$here/render-stories.sh" "$@"
