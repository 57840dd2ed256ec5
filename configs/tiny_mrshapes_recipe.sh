#!/usr/bin/env bash
# The learning proof, end to end: data + tokenizer, the CLIP stage, two LLM reading stages, stage 1 (HIPIE
# grounding), stage 2 (multi-round conversations), the test evaluation and the evidence.
#
#   bash configs/tiny_mrshapes_recipe.sh [RUN_DIR]        # default runs/tiny_mrshapes_recipe
#
# Every stage is an ordinary `segllm-jax train` with its own workdir under RUN_DIR and starts from the previous
# stage's exported model through `init_checkpoint` (the configs find it through $SEGLLM_MRSHAPES_RUN). Rerun the
# script to resume: a finished stage is not trained again, an interrupted one resumes from its last checkpoint.
# Each stage's wall time goes to RUN_DIR/timings.json (a stage finished by an earlier invocation keeps the time
# recorded then), the evidence to RUN_DIR/stage2/model/RESULTS.json (configs/tiny_mrshapes_results.py).
# docs/learning_proof.md has the numbers of the shipped run and what each stage buys.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/tiny_mrshapes_recipe}
SEG=${SEGLLM_JAX:-segllm-jax}
PY=${PYTHON:-python}
export SEGLLM_MRSHAPES_DATA=${SEGLLM_MRSHAPES_DATA:-$RUN/data}
export SEGLLM_MRSHAPES_RUN=$RUN
mkdir -p "$RUN/timings"

# stage NAME CONFIG: train it unless its model/ exists, and record the wall time of this invocation's part
stage() {
  local name=$1 config=$2 t0
  [ -f "$RUN/$name/model/config.json" ] && return 0
  t0=$(date +%s.%N)
  "$SEG" train --config "configs/$config" --workdir "$RUN/$name"
  "$PY" -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 1))" "$t0" > "$RUN/timings/$name"
}

stage clip tiny_mrshapes_clip.py                # data + tokenizer on first use (in this stage's time)
stage reading tiny_mrshapes_reading.py
stage reading_mix tiny_mrshapes_reading_mix.py
stage stage1 tiny_mrshapes_stage1.py
stage stage2 tiny_mrshapes.py
t0=$(date +%s.%N)
"$SEG" eval --checkpoint "$RUN/stage2/model" --data "mrshapes:$SEGLLM_MRSHAPES_DATA:test" --mode both \
  --ablate-memory --out "$RUN/eval_test"
"$PY" -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 1))" "$t0" > "$RUN/timings/eval"
"$PY" - "$RUN" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
times = {f"{p.name}_s": float(p.read_text()) for p in sorted((run / "timings").iterdir())}
times["total_s"] = round(sum(times.values()), 1)
(run / "timings.json").write_text(json.dumps(times, indent=1) + "\n")
print(times)
PY
# RESULTS.json (test, fresh seed, CI subset, demo); INSTALL=checkpoints/tiny_mrshapes also ships the model
"$PY" configs/tiny_mrshapes_results.py "$RUN" ${INSTALL:+--install "$INSTALL"}
