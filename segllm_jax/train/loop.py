"""``train(config, workdir)``: the training loop, resumable by construction.

Re-running the same command continues a killed run: the latest complete checkpoint (parameters,
optimizer state, step, RNG, data-iterator position) is restored, metric lines of steps after it are
dropped from ``metrics.jsonl``, and because the step key is ``fold_in(rng, step)`` and the host-side
prompt selection is seeded by ``(seed, step)``, the resumed run is bit-identical on the same
hardware and mesh to one that was never interrupted.

Outputs under ``workdir``: ``checkpoints/<step>/`` (orbax), ``metrics.jsonl`` (one line per step:
every loss term, lr, grad norm, step time, tokens/s, with the HIPIE term also its train IoU overall
and per round), ``train_config.txt``, ``loss.png`` / ``iou_train.png`` (smoothed curves, written when
the run ends) and, with ``tensorboard=True``, the same scalars as TensorBoard events under
``tensorboard/``. A non-finite loss stops the run with :class:`NonFiniteLossError` naming the step and
the conversation ids; the state of that step is never saved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import runpy
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from segllm_jax.errors import ConfigError, SegLLMError
from segllm_jax.models.segllm import DN_RESIZER
from segllm_jax.sharding import make_mesh
from segllm_jax.train import aids, batching, clip_pretrain
from segllm_jax.train import lora as lora_lib
from segllm_jax.train import step as train_step_lib
from segllm_jax.train.checkpointing import Checkpointer
from segllm_jax.train.clip_pretrain import ClipPretrainConfig
from segllm_jax.train.config import TrainConfig
from segllm_jax.train.state import TrainState

log = logging.getLogger(__name__)


class NonFiniteLossError(SegLLMError):
    """The loss became NaN or infinite; names the step and the conversations of its batch."""


def load_config(path: str | Path) -> TrainConfig | ClipPretrainConfig:
    """A config file is Python exposing ``CONFIG``: a :class:`TrainConfig`, or the learning recipe's CLIP stage
    (:class:`segllm_jax.train.clip_pretrain.ClipPretrainConfig`, trained by its own ``train``)."""
    try:
        namespace = runpy.run_path(str(path))
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror}.") from None
    config = namespace.get("CONFIG")
    if not isinstance(config, (TrainConfig, ClipPretrainConfig)):
        raise ConfigError(f"{path} must define CONFIG = TrainConfig(...) (e.g. segllm_jax.train.config.tiny_cpu) "
                          "or ClipPretrainConfig(...).")
    return config


def initialize_distributed() -> None:
    """Joins a multi-process run when asked to by the environment (before JAX touches a device).

    ``SEGLLM_DISTRIBUTED=auto``: ``jax.distributed.initialize()`` with JAX's cluster auto-detection
    (TPU pod slices, SLURM, ...). ``SEGLLM_COORDINATOR=host:port``, ``SEGLLM_NUM_PROCESSES``,
    ``SEGLLM_PROCESS_ID``: explicit (CPU processes use gloo collectives).
    """
    import os

    if os.environ.get("SEGLLM_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    elif os.environ.get("SEGLLM_NUM_PROCESSES"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(os.environ["SEGLLM_COORDINATOR"], int(os.environ["SEGLLM_NUM_PROCESSES"]),
                                   int(os.environ["SEGLLM_PROCESS_ID"]))


def _local_value(x) -> np.ndarray:
    """A replicated (possibly multi-process) array's value, read from this process's copy."""
    return np.asarray(x.addressable_data(0))


def _host_metrics(metrics: dict[str, jax.Array], rounds: np.ndarray) -> dict[str, float]:
    """A step's metrics as floats; HIPIE's per-prompt IoU parts become ``hipie/iou_round{k}``
    (rounds [M]: the batch's ``hipie_round``)."""
    values = {k: _local_value(v) for k, v in metrics.items()}
    parts = values.pop(f"hipie/{train_step_lib.PROMPT_IOU}", None)
    out = {k: float(v) for k, v in values.items()}
    if parts is not None:
        out.update(train_step_lib.round_ious(parts, rounds))
    return out


def mesh_for(cfg: TrainConfig):
    sizes = list(cfg.mesh_shape)
    n = len(jax.devices()) if -1 in sizes else int(np.prod(sizes))
    return make_mesh(sizes, jax.devices()[:n])


def _hipie_term(cfg: TrainConfig):
    if not cfg.use_hipie_loss:
        return None
    try:
        from segllm_jax.train.hipie_loss import hipie_loss_details
    except ImportError as e:
        raise ConfigError(f"use_hipie_loss=True but segllm_jax.train.hipie_loss cannot be imported ({e}); "
                          "set use_hipie_loss=False to train the LM and prompt terms only.") from None
    from segllm_jax.train.criterion import CriterionConfig
    from segllm_jax.train.hipie_loss import HipieLossOptions

    options = HipieLossOptions(criterion=CriterionConfig(num_points=cfg.mask_points,
                                                         class_weight=cfg.class_loss_weight),
                               ranking_weight=cfg.ranking_loss_weight)
    return train_step_lib.hipie_term_from_loss(functools.partial(hipie_loss_details, options=options))


class _MetricsWriter:
    """``metrics.jsonl`` (truncated to steps before ``start`` on resume) and optional TensorBoard.

    A resumed run appends a new events file whose ``purge_step`` hides the old file's events from
    ``start`` on (those steps are run again), as ``metrics.jsonl`` drops their lines.
    """

    def __init__(self, workdir: Path, start: int, tensorboard: bool):
        self.path = workdir / "metrics.jsonl"
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < start]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start or None)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _progress(total: int, initial: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    except ImportError:  # pragma: no cover - tqdm is a dependency of our dependencies
        return None


def make_pipeline(cfg: TrainConfig, tokenizer, num_epochs: int | None = None):
    """The host's grain pipeline for ``cfg`` (enough epochs for ``cfg.steps``)."""
    from segllm_jax.data.pipeline import Pipeline

    def build(epochs: int) -> Pipeline:
        hosts = jax.process_count()
        if cfg.batch_size % hosts:
            raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {hosts} processes.")
        pipe = Pipeline.from_config(cfg.data, tokenizer, batch_size=cfg.batch_size // hosts, seed=cfg.seed,
                                    shard_index=jax.process_index(), shard_count=hosts, num_epochs=epochs,
                                    worker_count=cfg.worker_count, clip_size=cfg.clip_size,
                                    frame=cfg.frame, max_length=cfg.model.context_length,
                                    num_image_tokens=cfg.model.num_image_tokens)
        return pipe

    if num_epochs is None:
        num_epochs = math.ceil(cfg.steps / build(1).steps_per_epoch)
    return build(num_epochs)


def train(config: TrainConfig | ClipPretrainConfig, workdir: str | Path) -> list[dict[str, Any]]:
    """Runs (or resumes) training to ``config.steps``; returns this invocation's metric records."""
    from segllm_jax.tokenizer import SegTokenizer

    if isinstance(config, ClipPretrainConfig):
        return clip_pretrain.train(config, workdir)
    cfg = config
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if cfg.prepare_data is not None:  # the config describes its data; the command writes it (idempotent)
        cfg.prepare_data.prepare()
    initialize_distributed()
    primary = jax.process_index() == 0
    if primary:
        (workdir / "train_config.txt").write_text(repr(cfg) + "\n")
    mesh = mesh_for(cfg)
    tokenizer = SegTokenizer.from_pretrained(cfg.tokenizer_dir)
    tokenizer.check_vocab_size(cfg.model.llm.vocab_size)

    pipeline = make_pipeline(cfg, tokenizer)
    iterator = iter(pipeline)

    structure = train_step_lib.abstract_structure(cfg)
    shardings = train_step_lib.state_shardings(structure, cfg, mesh)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing)
    latest = ckpt.latest_step()
    if latest is None:
        init_params = restore_init_params(cfg.init_checkpoint, structure, shardings) if cfg.init_checkpoint else None
        state, _ = train_step_lib.init_state(cfg, mesh, structure, init_params)
        start = 0
    else:
        abstract = abstract_train_state(structure, cfg, shardings)
        if cfg.lora is not None:  # the checkpoint has no frozen base: rebuild it (deterministic) from the init weights
            init_params = (restore_init_params(cfg.init_checkpoint, structure, shardings) if cfg.init_checkpoint
                           else None)
            frozen = train_step_lib.init_state(cfg, mesh, structure, init_params)[0].frozen
        state, data = ckpt.restore(latest, abstract)
        if cfg.lora is not None:
            state = dataclasses.replace(state, frozen=frozen)
        iterator.set_state(data["iterator"])
        start = int(data["step"])
        log.info("resumed from %s at step %d", workdir / "checkpoints" / str(latest), start)

    step_fn = jax.jit(train_step_lib.make_train_step(structure, cfg, _hipie_term(cfg)),
                      out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)
    writer = _MetricsWriter(workdir, start, cfg.tensorboard) if primary else None
    bar = _progress(cfg.steps, start) if primary else None
    records = []
    try:
        for step in range(start, cfg.steps):
            host = next(iterator)
            conv_ids = [e.conv_id for e in host["examples"]]
            rows_per_host = cfg.batch_size // jax.process_count()
            batch = batching.make_train_batch(host["examples"], cfg, step,
                                                    row_offset=jax.process_index() * rows_per_host)
            if jax.process_count() > 1:
                batch = batching.put_global(batching.global_batch(batch, rows_per_host), mesh)
                conv_ids = f"{', '.join(conv_ids)} on host {jax.process_index()}"
            else:
                batch = jax.device_put(batch, batching.batch_shardings(batch, mesh))
                conv_ids = ", ".join(conv_ids)
            t0 = time.perf_counter()
            new_state, metrics = step_fn(state, batch)
            metrics = _host_metrics(metrics, _local_value(batch.hipie_round))
            dt = time.perf_counter() - t0
            if not math.isfinite(metrics["loss"]):
                ckpt.wait()  # earlier saves complete; this step's state is dropped
                raise NonFiniteLossError(
                    f"the loss is {metrics['loss']} at step {step} (conversations: {conv_ids}); "
                    f"terms: {', '.join(f'{k}={v}' for k, v in sorted(metrics.items()) if k.startswith('loss'))}. "
                    f"Nothing of this step was saved; the latest checkpoint holds {ckpt.latest_step()} updates "
                    "(steps before this one).")
            state = new_state
            record = {"step": step, **metrics, "step_time_s": dt, "tokens_per_s": metrics["tokens"] / dt,
                      "skipped_conversations": iterator.skipped}
            if primary:
                writer.write(record)
            records.append(record)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                bar.update(1)
            done = step + 1
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                saved = state if cfg.lora is None else dataclasses.replace(state, frozen={})
                ckpt.save(done, saved, {"step": done, "iterator": iterator.get_state()})
        if records and primary:
            from segllm_jax.eval.charts import training_curves

            training_curves(workdir / "metrics.jsonl", workdir)  # loss.png, iou_train.png
        if records and cfg.export_model and jax.process_count() == 1:
            export_model(state, cfg, tokenizer, workdir / "model")
        elif records and cfg.export_model and primary:
            log.info("multi-process run: no model/ export (the training checkpoint holds the weights).")
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        ckpt.close()
        iterator.close()
    return records


def restore_init_params(directory: str | Path, structure: train_step_lib.ModelStructure,
                        shardings: TrainState) -> dict[str, jax.Array]:
    """``init_checkpoint``'s weights for ``structure``, each restored straight into its sharding of the
    TrainState (float32): every host reads only its shards, none holds the model.

    HIPIE's DN label encoder (trained with the HIPIE term) comes from the folder's ``training_params/``,
    where the converter keeps the source's ``detr.resizer`` and ``export_model`` the trained one; a
    checkpoint without it leaves the encoder at its fresh init, with a warning.
    """
    from segllm_jax import checkpoint

    kind, _ = checkpoint.read_config(directory)
    if kind != "segllm":
        raise ConfigError(f"init_checkpoint {directory} holds a {kind!r} model; training starts from a "
                          "'segllm' checkpoint (`segllm-jax convert` of a release, or of --llava --clip --hipie).")
    where = train_step_lib.param_array_shardings(shardings)
    targets = {}  # adapters and aid heads start fresh; a QLoRA kernel is read as the plain float kernel it is
    for k, v in structure.abstract().items():  # quantized from
        if (source := lora_lib.plain_key(k)) is not None and not aids.is_aid_param(k):
            targets[source] = jax.ShapeDtypeStruct(v.shape, np.float32, sharding=where[source])
    prefix = DN_RESIZER + "/"
    dn = {k: v for k, v in targets.items() if k.startswith(prefix)}
    values = checkpoint.restore_sharded(directory, {k: v for k, v in targets.items() if k not in dn})
    if dn and (Path(directory) / checkpoint.TRAINING_PARAMS).is_dir():
        values.update(checkpoint.restore_sharded(directory, dn, checkpoint.TRAINING_PARAMS))
    elif dn:
        log.warning("%s has no HIPIE DN label encoder (%s/%s*; its source had no detr.resizer tensors): "
                    "the encoder starts from a fresh init.", directory, checkpoint.TRAINING_PARAMS, prefix)
    return values


def export_model(state, cfg: TrainConfig, tokenizer, directory: Path) -> Path:
    """The trained weights as a segllm-jax checkpoint folder (``segllm_jax.load``, ``segllm-jax chat``):
    the model's own parameters in its ``param_dtype``; the DN label encoder goes to
    ``training_params/`` (inference never reads it, a later ``init_checkpoint`` does); the training aids' heads
    are left out (:mod:`segllm_jax.train.aids`). A LoRA run exports
    the merged weights (a plain model) and its adapters apart, in ``adapters/`` next to ``directory``."""
    import shutil

    from segllm_jax.checkpoint import save

    params = {k: v for k, v in jax.device_get(state.params).items() if not aids.is_aid_param(k)}
    values = {**params, **jax.device_get(state.frozen)}
    if cfg.lora is not None:
        lora_lib.write_adapters(directory.with_name("adapters"), params, cfg)
        values = jax.device_get(lora_lib.merge(values, cfg.lora.scale, cfg.base_weights_qtype))
    dtype = jnp.dtype(cfg.model.llm.param_dtype)  # the loader casts each parameter to its module's dtype
    arrays = {k: np.asarray(jnp.asarray(v, dtype)) for k, v in values.items()}
    dn = {k: arrays.pop(k) for k in list(arrays) if k.startswith(DN_RESIZER + "/")}
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp, "segllm", cfg.model, arrays, training_arrays=dn)
    tokenizer.save(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    log.info("exported the trained model to %s", directory)
    return directory


def abstract_train_state(structure, cfg: TrainConfig, shardings):
    """ShapeDtypeStructs (with shardings) of the TrainState: where a restore puts every array (no allocation).
    A LoRA run's checkpoints hold no frozen base, so its ``frozen`` is empty."""
    abstract_params = structure.abstract()
    tx = train_step_lib.make_optimizer(cfg)
    trainable, frozen = train_step_lib.split_trainable(abstract_params, cfg)
    f32 = lambda d: {k: jax.ShapeDtypeStruct(v.shape, np.float32) for k, v in d.items()}  # noqa: E731
    if cfg.lora is not None:
        frozen, shardings = {}, dataclasses.replace(shardings, frozen={})
    shapes = TrainState(step=jax.ShapeDtypeStruct((), np.int32), params=f32(trainable), frozen=f32(frozen),
                        opt_state=jax.eval_shape(tx.init, f32(trainable)),
                        rng=jax.ShapeDtypeStruct((2,), np.uint32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
