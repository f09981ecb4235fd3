#!/usr/bin/env bash
# DiRL's evaluation: 16 samples per task at temperature 1.0 (top-k 50), 8,192 tokens, block 4, dynamic at 0.9.
# Reported (DiRL-8B-Instruct): MATH500 83.05, AIME24 20.63, AIME25 20.83, OlympiadBench 46.40 (avg@16).
set -euo pipefail
RUN=runs/dirl-dipo/rl/checkpoints
MODEL=${1:-$RUN/$(cat $RUN/latest)/model}  # the newest RL checkpoint unless named
for SET in MATH500 AIME2024 AIME2025 OlympiadBench; do
  gtpo eval "$SET" --model "$MODEL" --k 16 --max-new-tokens 8192 --temperature 1.0 --top-k 50 --threshold 0.9 \
    --out "runs/dirl-dipo/eval/$SET.json"
done
