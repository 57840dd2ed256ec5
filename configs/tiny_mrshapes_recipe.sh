#!/usr/bin/env bash
# The learning proof, end to end: data + tokenizer, stage 1 (grounding), stage 2 (multi-round), evaluation.
#
#   bash configs/tiny_mrshapes_recipe.sh [RUN_DIR]        # default runs/tiny_mrshapes_recipe
#
# Every stage is an ordinary `segllm-jax train` with its own workdir (rerun the script to resume a stage
# that was interrupted; a finished stage is not trained again) and stage 2 starts from stage 1's exported
# model through `init_checkpoint`. Wall times go to RUN_DIR/timings.json, the evidence to
# RUN_DIR/stage2/model/RESULTS.json (configs/tiny_mrshapes_results.py). docs/learning_proof.md has the
# numbers of the shipped run and what each part of the recipe buys.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/tiny_mrshapes_recipe}
SEG=${SEGLLM_JAX:-segllm-jax}
export SEGLLM_MRSHAPES_DATA=${SEGLLM_MRSHAPES_DATA:-$RUN/data}
export SEGLLM_MRSHAPES_STAGE1=$RUN/stage1/model
mkdir -p "$RUN"
stamp() { date +%s.%N; }

t0=$(stamp)
[ -f "$RUN/stage1/model/config.json" ] || \
  "$SEG" train --config configs/tiny_mrshapes_stage1.py --workdir "$RUN/stage1"   # data + tokenizer on first use
t1=$(stamp)
[ -f "$RUN/stage2/model/config.json" ] || \
  "$SEG" train --config configs/tiny_mrshapes.py --workdir "$RUN/stage2"
t2=$(stamp)
"$SEG" eval --checkpoint "$RUN/stage2/model" --data "mrshapes:$SEGLLM_MRSHAPES_DATA:test" --mode both \
  --ablate-memory --out "$RUN/eval_test"
t3=$(stamp)
python3 - "$RUN" "$t0" "$t1" "$t2" "$t3" <<'PY'
import json, sys
run, t0, t1, t2, t3 = sys.argv[1], *map(float, sys.argv[2:])
times = {"stage1_with_data_s": round(t1 - t0, 1), "stage2_s": round(t2 - t1, 1), "eval_s": round(t3 - t2, 1),
         "total_s": round(t3 - t0, 1)}
open(f"{run}/timings.json", "w").write(json.dumps(times, indent=1) + "\n")
print(times)
PY
# RESULTS.json (test, fresh seed, CI subset, demo); INSTALL=checkpoints/tiny_mrshapes also ships the model
"${PYTHON:-python}" configs/tiny_mrshapes_results.py "$RUN" ${INSTALL:+--install "$INSTALL"}
