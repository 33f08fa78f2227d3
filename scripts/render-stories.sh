#!/usr/bin/env bash
# Render a folder of stories: keyframes (storydiff generate), then videos (storydiff animate)
# of the stories this process finished. Rerun the same command after a failure or a kill: what is
# done is skipped, the rest resumes. Logs: one file per story in LOGS (default OUT/logs).
#
#   scripts/render-stories.sh STORIES OUT [extra generate options...]
#   scripts/render-stories.sh stories/ outputs --model tiny
#   DECODER=animatediff ANIMATE_OPTS="--frames 16" scripts/render-stories.sh stories/ outputs
#
# Under a launcher, every process runs this script and renders its own share: torchrun and
# `accelerate launch` set RANK/WORLD_SIZE, SLURM arrays SLURM_ARRAY_TASK_ID/COUNT; storydiff
# reads them (or pass SHARD=INDEX/COUNT). See scripts/render-torchrun.sh and
# scripts/render-slurm.sbatch.
#
# Exit code: 0 when every story was rendered, else the first failing command's (3: some stories
# failed, the others are done; 2: invalid input).
set -uo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,9p' "$0" >&2
    exit 2
fi
stories=$1
out=$2
shift 2
storydiff=${STORYDIFF:-storydiff}
logs=${LOGS:-$out/logs}
decoder=${DECODER:-crossfade}
shard_opts=()
if [ -n "${SHARD:-}" ]; then
    shard_opts=(--shard "$SHARD")
fi
rank=${RANK:-${SLURM_ARRAY_TASK_ID:-${SLURM_PROCID:-0}}}
mkdir -p "$logs"

# 1. Keyframes: one JSON line per story of this share; the model is loaded once.
records="$logs/generate-$rank.jsonl"
"$storydiff" generate "$stories" --out "$out" --log-dir "$logs" "${shard_opts[@]}" "$@" \
    --json >"$records"
generate_status=$?

# 2. Videos of the stories whose keyframes are complete here (a story shared over several
# processes is finished, grid and all, by the last of them; only that one animates it).
folders=()
while IFS= read -r grid; do
    folders+=("$(dirname "$grid")")
done < <(grep -o '"grid": "[^"]*"' "$records" | cut -d'"' -f4)

animate_status=0
if [ ${#folders[@]} -gt 0 ]; then
    # --shard 0/1: these folders are this process's already; do not share them out again.
    # shellcheck disable=SC2086  # ANIMATE_OPTS is a list of options, split on purpose
    "$storydiff" animate "${folders[@]}" --decoder "$decoder" --shard 0/1 \
        --log-dir "$logs/animate" ${ANIMATE_OPTS:-}
    animate_status=$?
fi

echo "render-stories: ${#folders[@]} story folder(s) animated; logs in $logs" >&2
if [ "$generate_status" -ne 0 ]; then
    exit "$generate_status"
fi
exit "$animate_status"
