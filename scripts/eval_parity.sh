#!/usr/bin/env bash
# Engine parity of `gtpo eval` on a GPU: the torch engine against LMDeploy, same questions, same seeds, greedy.
#
#   bash scripts/gpu_check.sh prepare          # here, with PyPI (LMDeploy wheels into build/gpu_wheels)
#   bash scripts/gpu_check.sh; bash scripts/eval_parity.sh   # one call on the GPU box, build/gpu_wheels carried:
#                                              # gpu_check installs LMDeploy's dependencies and unpacks it
#   (the CPU variant, torch against the naive decoder oracle, is tests/test_eval_cards.py)
#
# Builds the tiny checkpoint (or uses $MODEL) and a small arithmetic file, runs `gtpo eval --engines $ENGINES
# --temperature 0` and leaves the two eval cards and <name>.parity.json (per-question agreement) in $OUT.
# LMDeploy decodes in bf16 and the torch engine in bf16 with another kernel order, so a few tokens may differ on a
# real model; on the tiny model greedy decoding should agree token for token.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/eval_parity_out}
ENGINES=${ENGINES:-torch,lmdeploy}
mkdir -p "$OUT"
if [[ "$ENGINES" == *lmdeploy* ]] && ! python -c "import lmdeploy" 2>/dev/null; then
    [ -d build/gpu_site/lmdeploy ] || { echo "LMDeploy is not importable: run scripts/gpu_check.sh first" >&2; exit 2; }
    export PYTHONPATH="$PWD/build/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MODEL=${MODEL:-$OUT/tiny}
[[ -e "$MODEL/config.json" ]] || python -c "from shared.model.tiny import init_tiny; init_tiny('$MODEL', seed=0)"
python - "$OUT/questions.jsonl" <<'PY'
import json, sys
rows = [{"question": f"{a}+{b}=", "ground_truth_answer": str(a + b)} for a in range(1, 5) for b in range(1, 5)]
open(sys.argv[1], "w").write("".join(json.dumps(r) + "\n" for r in rows))
PY
timeout 540 python -c "from services.cli import app; app()" eval "$OUT/questions.jsonl" --model "$MODEL" --raw \
    --template '{question}' --engines "$ENGINES" --temperature 0 --k 2 --max-new-tokens 32 --seed 1 \
    --out "$OUT/parity.json" | tee "$OUT/eval_parity.log"
