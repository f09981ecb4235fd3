#!/usr/bin/env bash
# Aha-8B evaluation: DiRL's protocol (16 samples at temperature 1.0, 8,192 tokens, dynamic at 0.9), top-k off;
# gtpo eval also prints tokens per step, the speed the reward trains for.
set -euo pipefail
RUN=runs/aha-8b/rl/checkpoints
MODEL=${1:-$RUN/$(cat $RUN/latest)/model}  # the newest RL checkpoint unless named
for SET in MATH500 AIME2024 AIME2025 OlympiadBench GSM8K; do
  gtpo eval "$SET" --model "$MODEL" --k 16 --max-new-tokens 8192 --temperature 1.0 --threshold 0.9 \
    --out "runs/aha-8b/eval/$SET.json"
done
