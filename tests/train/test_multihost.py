"""Two processes x 4 CPU devices (jax.distributed, gloo) train exactly like one process x 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from segllm_jax.data.mrshapes_prepare import prepare_tiny_mrshapes

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "segllm_jax.apps.cli", "train", "--config", str(REPO / "configs/tiny_train.py"),
            "--workdir", str(workdir)]


def _losses(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path):
    data = tmp_path / "data"
    prepare_tiny_mrshapes(str(data), n_scenes=8, seed=0)
    base = {**os.environ, "SEGLLM_TINY_DATA": str(data), "SEGLLM_TINY_STEPS": str(STEPS),
            "SEGLLM_TINY_EVERY": "100", "SEGLLM_TINY_BATCH": "4", "SEGLLM_TINY_MESH": "1,-1,1"}
    one = subprocess.run(_cmd(tmp_path / "one"), capture_output=True, text=True, timeout=600,
                         env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert one.returncode == 0, one.stderr[-3000:]

    port = _free_port()
    procs = [subprocess.Popen(_cmd(tmp_path / "two"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                   "SEGLLM_COORDINATOR": f"127.0.0.1:{port}", "SEGLLM_NUM_PROCESSES": "2",
                                   "SEGLLM_PROCESS_ID": str(i)}) for i in range(2)]
    try:
        errors = [p.communicate(timeout=600)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 0, err[-3000:]

    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [r["step"] for r in b] == list(range(STEPS))
    print("1 process:", [r["loss"] for r in a], "\n2 processes:", [r["loss"] for r in b])
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "loss_lm", "loss_prompt_l2", "grad_norm", "tokens"):
            np.testing.assert_allclose(y[key], x[key], rtol=1e-5, err_msg=key)
    assert (tmp_path / "two" / "checkpoints" / str(STEPS)).exists()
