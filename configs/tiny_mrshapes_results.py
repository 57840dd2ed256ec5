"""The learning recipe's last step: the evidence file ``RESULTS.json`` of a finished recipe run.

    python configs/tiny_mrshapes_results.py RUN_DIR [--install checkpoints/tiny_mrshapes]

``configs/tiny_mrshapes_recipe.sh`` calls it after stage 2 and the test evaluation. It gathers in
``RUN_DIR/stage2/model/RESULTS.json``:

* the commands, seed, data and machine, and the wall times of ``RUN_DIR/timings.json``;
* the test split's metrics (``RUN_DIR/eval_test/metrics.json``: both modes, with the memory ablation);
* ``fresh_seed``: the autoregressive metrics on MR-Shapes scenes of a seed the recipe never used
  (generated here, ``--fresh-seed``), the check that the numbers are not tuned to the test split;
* ``ci_subset``: the autoregressive metrics on the first 20 test conversations, which CI reproduces
  (``tests/learning/test_shipped_checkpoint.py``);
* ``demo``: the per-round IoUs of ``make demo``'s conversation.

With ``--install DIR`` the model folder, every stage's curves and metric logs and the test report are
copied to ``DIR`` (the shipped checkpoint), replacing what was there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import jax

from segllm_jax.apps.demo import run_demo
from segllm_jax.checkpoint import load
from segllm_jax.data import mrshapes
from segllm_jax.eval.evaluate import EvalData, evaluate

CI_CONVERSATIONS = 20
STAGES = ("clip", "reading", "reading_mix", "stage1", "stage2")  # the recipe's stages, in order (RUN_DIR/<stage>)
COMMAND = ("bash configs/tiny_mrshapes_recipe.sh RUN  (= for each stage S, config C of (clip, tiny_mrshapes_clip.py), "
           "(reading, tiny_mrshapes_reading.py), (reading_mix, tiny_mrshapes_reading_mix.py), "
           "(stage1, tiny_mrshapes_stage1.py), (stage2, tiny_mrshapes.py): SEGLLM_MRSHAPES_RUN=RUN segllm-jax train "
           "--config configs/C --workdir RUN/S; then segllm-jax eval --checkpoint RUN/stage2/model "
           "--data mrshapes:DATA:test --mode both --ablate-memory; python configs/tiny_mrshapes_results.py RUN)")


def _autoregressive(loaded, data: EvalData, limit: int | None = None) -> dict:
    by_type: dict = {}
    summary = evaluate(loaded, data, "autoregressive", limit=limit, by_type=by_type).summary()
    return {**summary, "by_type": {t: m.summary() for t, m in by_type.items()}}


def results(run: Path, fresh_seed: int, fresh_scenes: int) -> dict:
    """Everything RESULTS.json records about the run in ``run`` (see the module docstring)."""
    model = run / "stage2" / "model"
    loaded = load(model)
    timings = json.loads((run / "timings.json").read_text())
    out: dict = {
        "command": COMMAND,
        "seed": 0,
        "data": "MR-Shapes seed 0: 2000 train scenes (the CLIP stage's images; 6-round attribute-only and grounding "
                "conversations for the reading stages and stage 1; their benchmark conversations for stage 2) / "
                "100 val / 100 test scenes, up to 6 rounds; word-level tokenizer",
        "machine": f"{platform.machine()} CPU, {jax.device_count()} JAX device(s), jax {jax.__version__}",
        "model": {"hipie": dataclasses.asdict(loaded.config.hipie),
                  "llm_hidden": loaded.config.llm.hidden_size, "llm_layers": loaded.config.llm.num_layers},
        "train_wall_s": round(sum(timings[f"{stage}_s"] for stage in STAGES), 1),
        "train_wall_includes": "data generation, tokenizer, every stage's compilation and training",
        "timings_s": timings,
        "test": json.loads((run / "eval_test" / "metrics.json").read_text()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        mrshapes.write_split(tmp, "test", fresh_scenes, fresh_seed, max_rounds=6)
        fresh = _autoregressive(loaded, EvalData.parse(f"mrshapes:{tmp}:test"))
        out["fresh_seed"] = {"seed": fresh_seed, "scenes": fresh_scenes, "metrics": {"autoregressive": fresh}}
        mrshapes.write_split(Path(tmp) / "ci", "test", CI_CONVERSATIONS, 0, max_rounds=6)
        ci = evaluate(loaded, EvalData.parse(f"mrshapes:{tmp}/ci:test"), "autoregressive").summary()
        out["ci_subset"] = {"conversations": CI_CONVERSATIONS, "seed": 0, "max_rounds": 6, "autoregressive": ci}
        out["demo"] = {"seed": 7, "ious": [round(float(v), 4) for v in run_demo(Path(tmp) / "demo", seed=7,
                                                                               checkpoint_dir=model)]}
    return out


def install(run: Path, dest: Path) -> None:
    """Copies the model folder plus curves, metric logs and the test report to ``dest`` (replaced)."""
    staging = dest.with_name(dest.name + ".installing")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(run / "stage2" / "model", staging)
    for stage in STAGES:
        for name in ("loss.png", "iou_train.png"):
            if (run / stage / name).is_file():
                shutil.copy(run / stage / name, staging / f"{stage}_{name}")
        shutil.copy(run / stage / "metrics.jsonl", staging / f"train_metrics_{stage}.jsonl")
    for name, target in (("metrics.json", "test_metrics.json"), ("metrics.md", "test_metrics.md"),
                         ("iou_per_round.png", "test_iou_per_round.png")):
        shutil.copy(run / "eval_test" / name, staging / target)
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the recipe's RUN_DIR (a folder per stage, eval_test/, timings.json)")
    parser.add_argument("--fresh-seed", type=int, default=4242, help="seed of the unseen MR-Shapes split")
    parser.add_argument("--fresh-scenes", type=int, default=150)
    parser.add_argument("--install", type=Path, help="copy the model and its evidence here (the shipped checkpoint)")
    args = parser.parse_args(argv)
    record = results(args.run, args.fresh_seed, args.fresh_scenes)
    path = args.run / "stage2" / "model" / "RESULTS.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    if args.install:
        install(args.run, args.install)
        print(f"installed {args.install}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
