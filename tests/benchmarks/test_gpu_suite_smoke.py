"""``benchmarks/gpu_suite.py --smoke``: every section of the GPU suite runs, at tiny shapes on CPU.

The suite is meant to be run the first minutes a GPU is available; this keeps it from rotting in
between (a renamed flag, a moved function, a broken benchmark) by running exactly its code path,
subprocesses and report included, with the shapes shrunk.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# Part of `make test` (the issue asks for it there, so the suite cannot rot between GPU loans): about
# 113 s of CPU, most of it building and compiling the tiny models of the hipie / multiround / train sections.
def test_gpu_suite_smoke_writes_a_complete_report(tmp_path):
    report = tmp_path / "report.md"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a GPU host
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = report.read_text()
    for heading in ("## env", "## msda", "## hipie", "## multiround", "## train", "## targets"):
        assert heading in text, heading
    statuses = [line for line in text.splitlines() if line.startswith("### ")]
    assert len(statuses) == 5 and all(": ok in " in line for line in statuses), statuses
    # every section produced its table, not just a clean exit
    assert "| enc_b1 | 1 |" in text and "| torch |" in text  # MSDA, both processes
    assert "| 2 | **total** |" in text  # HIPIE forward with 2 prompts
    sections = {part.split("\n", 1)[0]: part for part in text.split("\n## ")}  # "### step" lines stay inside
    assert "| 2 |" in sections["multiround"]  # round 2
    assert "| batched-incremental |" in sections["multiround"]  # --batch 2
    assert "MFU" in sections["train"]
