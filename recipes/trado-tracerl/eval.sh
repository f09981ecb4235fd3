#!/usr/bin/env bash
# TraDo's evaluation (dLLM-RL configs): 3 samples per task, 2,000 tokens; "dynamic" = low_confidence_dynamic at
# 0.9 with top-k 0 (their "static" rows use top-k 1, low_confidence_static). Reported TraDo-8B-Instruct
# (static / dynamic): MATH500 78.5 / 75.5, AIME24 13.3 / 11.0, GSM8K 92.3 / 91.2.
set -euo pipefail
RUN=runs/trado-tracerl/rl/checkpoints
MODEL=${1:-$RUN/$(cat $RUN/latest)/model}  # the newest RL checkpoint unless named
for SET in MATH500 AIME2024 GSM8K; do
  gtpo eval "$SET" --model "$MODEL" --k 3 --max-new-tokens 2000 --temperature 1.0 --top-k 0 --threshold 0.9 \
    --out "runs/trado-tracerl/eval/$SET.json"
done
