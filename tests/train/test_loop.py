"""The training loop: SIGKILL-and-resume is bit-exact (full fine-tune, and LoRA on an nf4 base with adapter dropout),
a NaN loss stops with step and conversations named."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segllm_jax.data.mrshapes_prepare import prepare_tiny_mrshapes
from segllm_jax.train import batching as B
from segllm_jax.train import loop
from segllm_jax.train import step as S
from segllm_jax.train.checkpointing import Checkpointer
from segllm_jax.train.config import tiny_cpu

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 8, 2
TIMING = ("step_time_s", "tokens_per_s")
# variant -> (extra environment of configs/tiny_train.py, steps, the checkpoints after which the run is killed;
# the first kill lands in a save in progress if one is caught, and a later kill or an earlier checkpoint leaves
# something to resume from). LoRA is kept short: one kill, one resume.
VARIANTS = {"full": ({}, STEPS, (4, 6)), "lora": ({"SEGLLM_TINY_LORA": "nf4"}, 4, (2,))}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    prepare_tiny_mrshapes(str(root / "data"), n_scenes=8, seed=0)  # the config file finds it ready
    return {**os.environ, "SEGLLM_TINY_DATA": str(root / "data"), "SEGLLM_TINY_STEPS": str(STEPS),
            "SEGLLM_TINY_EVERY": str(EVERY), "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "segllm_jax.apps.cli", "train", "--config", str(REPO / "configs/tiny_train.py"),
            "--workdir", str(workdir)]


def _complete_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _run_and_kill(workdir: Path, env: dict, until) -> bool:
    """Starts training and SIGKILLs it once ``until(workdir)`` holds; False if it finished first."""
    proc = subprocess.Popen(_command(workdir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None:
            if until(workdir):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.01)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _params(workdir: Path, cfg) -> dict:
    structure = S.abstract_structure(cfg)
    mesh = loop.mesh_for(cfg)
    abstract = loop.abstract_train_state(structure, cfg, S.state_shardings(structure, cfg, mesh))
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        state, data = ckpt.restore(ckpt.latest_step(), abstract)
    finally:
        ckpt.close()
    return jax.device_get(state), data


@pytest.mark.parametrize("variant", VARIANTS)
def test_sigkill_and_resume_is_bit_exact(env, tmp_path, monkeypatch, variant):
    extra, steps, kills = VARIANTS[variant]
    env = {**env, **extra, "SEGLLM_TINY_STEPS": str(steps)}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(_command(straight), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    # 1) kill while a checkpoint is being written, if we catch one (a temporary folder exists)
    saving = lambda w: (w / "checkpoints").exists() and any(  # noqa: E731
        not p.name.isdigit() for p in (w / "checkpoints").iterdir())
    caught_saving = []

    def first_kill(w):
        if saving(w) and (kills[1:] or _complete_steps(w)):
            caught_saving.append(sorted(p.name for p in (w / "checkpoints").iterdir()))
            return True
        return _complete_steps(w)[-1:] >= [kills[0]]

    _run_and_kill(killed, env, first_kill)
    print("first SIGKILL during a save:", caught_saving or f"no (after checkpoint {kills[0]})")
    # 2) kill right after later checkpoints are complete
    for after in kills[1:]:
        _run_and_kill(killed, env, lambda w, after=after: _complete_steps(w)[-1:] >= [after])
    assert 0 < _complete_steps(killed)[-1] < steps  # resumes from a checkpoint
    resumed = subprocess.run(_command(killed), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(steps))
    assert strip(a) == strip(b)  # every loss term, lr and grad norm, bit for bit
    for name, value in {"SEGLLM_TINY_DATA": env["SEGLLM_TINY_DATA"], **extra}.items():
        monkeypatch.setenv(name, value)
    cfg = loop.load_config(REPO / "configs/tiny_train.py")
    cfg = dataclasses.replace(cfg, steps=steps, checkpoint_every=EVERY)
    (sa, da), (sb, db) = _params(straight, cfg), _params(killed, cfg)
    assert int(sa.step) == int(sb.step) == steps and da == db
    for tree_a, tree_b in ((sa.params, sb.params), (sa.frozen, sb.frozen)):
        for k in tree_a:
            np.testing.assert_array_equal(tree_a[k], tree_b[k], err_msg=k)
    for x, y in zip(jax.tree.leaves(sa.opt_state), jax.tree.leaves(sb.opt_state), strict=True):
        np.testing.assert_array_equal(x, y)

    if variant == "lora":  # no frozen base in LoRA checkpoints; the adapters written at the end are the state's
        assert not sa.frozen and not sb.frozen
        for run in (straight, killed):
            with np.load(run / "adapters/adapters.npz") as npz:
                assert sorted(npz.files) == sorted(k.replace("/", ".") for k in sa.params)
                for k, v in sa.params.items():
                    np.testing.assert_array_equal(npz[k.replace("/", ".")], v, err_msg=k)
        return
    # the exported model folder loads like a converted checkpoint, with the trained weights
    from segllm_jax.checkpoint import flat_arrays, load

    loaded = load(straight / "model")
    assert loaded.tokenizer is not None and loaded.kind == "segllm"
    exported = flat_arrays(loaded.model)
    assert set(exported) == set(sa.params) | set(sa.frozen)
    for k, v in exported.items():
        np.testing.assert_array_equal(v, sa.params[k] if k in sa.params else sa.frozen[k], err_msg=k)


def test_nan_loss_stops_naming_step_and_conversations(env, tmp_path, monkeypatch):
    mixture, tokenizer_dir, vocab = prepare_tiny_mrshapes(env["SEGLLM_TINY_DATA"])
    cfg = tiny_cpu(mixture, tokenizer_dir, vocab, steps=5, checkpoint_every=1, async_checkpointing=True)
    real = B.make_train_batch
    seen = []

    def poisoned(examples, c, step, **kwargs):
        batch = real(examples, c, step, **kwargs)
        seen.append([str(e.conv_id) for e in examples])
        if len(seen) == 3:  # step 2: NaN pixels -> NaN image features -> NaN loss
            batch = dataclasses.replace(batch, conv=dataclasses.replace(
                batch.conv, clip_images=jnp.full_like(batch.conv.clip_images, jnp.nan)))
        return batch

    monkeypatch.setattr(B, "make_train_batch", poisoned)
    with pytest.raises(loop.NonFiniteLossError) as info:
        loop.train(cfg, tmp_path / "run")
    message = str(info.value)
    print(message)
    assert "at step 2" in message and all(conv_id in message for conv_id in seen[2])
    assert _complete_steps(tmp_path / "run") == [1, 2]  # nothing after the last finite step
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
