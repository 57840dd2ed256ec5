"""The typed batch boundary of training: pipeline examples (:class:`~segllm_jax.data.example.Example`) in,
a :class:`TrainBatch` on the mesh out.

* :func:`make_train_batch` (host): collate one host's examples into a ``ConversationBatch``, pick the
  prompts HIPIE trains on, pad everything to bucketed shapes (``ConversationBatch.pad``).
* :func:`global_batch` (multi-host): every host's batch stacked into the global one, indices offset.
* :func:`batch_shardings` / :func:`put_global`: where the arrays live on the mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from segllm_jax.batch import ConversationBatch, collate, pad_axis
from segllm_jax.data.example import Example, collate_inputs
from segllm_jax.errors import ConfigError
from segllm_jax.sharding import logical_to_spec
from segllm_jax.train import aids
from segllm_jax.train.config import TrainConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """A ``ConversationBatch`` plus what the training losses need.

    ``conv.ref_gates`` is 1 for real references and 0 for padding; :func:`loss_fn` multiplies it by
    the Bernoulli(0.5) training gate. References and prompts are padded to a multiple of
    ``ref_pad_multiple`` and tokens to ``pad_multiple`` so batches reuse few compiled shapes.
    """

    conv: ConversationBatch
    seg_weight: jax.Array  # [N] 1.0 for prompts sent to HIPIE (<= max_rounds per conversation), else 0
    hipie_index: jax.Array  # [M] indices into the N prompts of those sent to HIPIE
    hipie_round: jax.Array  # [M] 0-based round of each of them in its conversation (per-round metrics)
    hipie_images: jax.Array | None = None  # [B, S, S, 3] uint8 (one image per conversation)
    target_masks: jax.Array | None = None  # [M, S, S] bool
    aux_masks: jax.Array | None = None  # [M, S, S] bool (the reference mask of that round)
    has_aux: jax.Array | None = None  # [M] bool
    target_patches: jax.Array | None = None  # [M, P] bool, CLIP patches of each target (attention aid only)


def _round_up(n: int, k: int) -> int:
    return max(k, -(-n // k) * k)


def make_train_batch(examples: Sequence[Example], cfg: TrainConfig, step: int, *,
                     row_offset: int = 0) -> TrainBatch:
    """Host side: collate pipeline examples, pick the HIPIE prompts, pad to bucketed shapes.

    The prompt choice of a conversation is seeded by ``(seed, step, global row)``: independent of how
    the global batch is split over hosts (``row_offset`` = this host's first global row) and of resumes.
    """
    conversations, clip_images, image_of_row, references = collate_inputs(examples)
    t = _round_up(max(c.num_tokens for c in conversations), cfg.pad_multiple)
    conv = collate(conversations, clip_images, image_of_row, references, gate=1.0, pad_to=t)
    # at most max_rounds random <seg> prompts per conversation go to HIPIE (and into the L2 term)
    # (an example's k-th <seg> is its round k: every round ends in one)
    selected, rounds, start = [], [], 0
    for row, example in enumerate(examples):
        n = int(example.seg_positions.size)
        rng = np.random.default_rng([cfg.seed, step, row_offset + row])
        pick = np.sort(rng.permutation(n)[:cfg.max_rounds]) if n > cfg.max_rounds else np.arange(n)
        selected.append(start + pick)
        rounds.append(pick)
        start += n
    hipie_index = np.concatenate(selected).astype(np.int32)
    rounds = np.concatenate(rounds).astype(np.int32)
    if cfg.hipie_prompts is not None:
        hipie_index, rounds = _fixed_prompt_count(hipie_index, rounds, cfg, step, row_offset, len(examples))
    n_seg_pad = _round_up(int(conv.seg_rows.shape[0]), cfg.ref_pad_multiple)
    conv = conv.pad(references=_round_up(int(conv.ref_rows.shape[0]), cfg.ref_pad_multiple), prompts=n_seg_pad)
    seg_weight = np.zeros(n_seg_pad, np.float32)
    seg_weight[hipie_index] = 1.0
    extra: dict[str, Any] = {}
    if cfg.needs_masks:
        target_masks = np.concatenate([e.target_masks for e in examples])[hipie_index]
        extra = dict(
            hipie_images=jnp.asarray(np.stack([e.hipie_image for e in examples])),
            target_masks=jnp.asarray(target_masks),
            aux_masks=jnp.asarray(np.concatenate([e.aux_masks for e in examples])[hipie_index]),
            has_aux=jnp.asarray(np.concatenate([e.has_aux for e in examples])[hipie_index]))
        if cfg.attention_aid_weight > 0:
            sizes = np.stack([e.hipie_size for e in examples])[np.asarray(conv.seg_rows)[hipie_index]]
            grid = cfg.model.vision.image_size // cfg.model.vision.patch_size
            extra["target_patches"] = jnp.asarray(aids.target_patches(target_masks, sizes, grid))
    return TrainBatch(conv=conv, seg_weight=jnp.asarray(seg_weight), hipie_index=jnp.asarray(hipie_index),
                      hipie_round=jnp.asarray(rounds), **extra)


def _fixed_prompt_count(index: np.ndarray, rounds: np.ndarray, cfg: TrainConfig, step: int, row_offset: int,
                        rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Exactly ``cfg.hipie_prompts`` prompts for this host's ``rows`` (its share of the global count): a
    random subset when there are more, the selection plus random repeats when there are fewer. One
    static prompt count means one compiled step whatever the conversations' lengths; a repeated prompt
    only weighs twice in its step's mean."""
    want = cfg.hipie_prompts * rows // cfg.batch_size
    rng = np.random.default_rng([cfg.seed, step, row_offset, 1])
    if index.size >= want:
        keep = np.sort(rng.permutation(index.size)[:want])
    else:
        keep = np.concatenate([np.arange(index.size), rng.integers(0, index.size, want - index.size)])
    return index[keep], rounds[keep]


def batch_shardings(batch: TrainBatch, mesh: Mesh) -> Any:
    """Token arrays ``[B, T]`` split over (data, fsdp); the flat slot bookkeeping is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    tokens = lambda x: NamedSharding(mesh, logical_to_spec(("batch", "length"), x.shape, mesh))  # noqa: E731
    conv = batch.conv
    conv_sh = jax.tree.map(lambda _: replicated, conv)
    conv_sh = dataclasses.replace(conv_sh, input_ids=tokens(conv.input_ids), token_mask=tokens(conv.token_mask),
                                  labels=tokens(conv.labels))
    return dataclasses.replace(jax.tree.map(lambda _: replicated, batch), conv=conv_sh)


def global_batch(local: TrainBatch, rows_per_host: int) -> TrainBatch:
    """Every host's TrainBatch -> the global one (NumPy, identical on all hosts), in host order.

    Hosts pad their token length, reference and prompt counts to the largest (padding references
    have gate 0 and padding prompts weight 0, so they change nothing), then the row and slot indices
    of host ``h`` are offset by ``h * rows_per_host`` (and prompt indices by ``h * N``).
    """
    from jax.experimental import multihost_utils

    b = jax.tree.map(np.asarray, local)
    c = b.conv
    sizes = np.array([c.input_ids.shape[1], c.ref_rows.shape[0], c.seg_rows.shape[0], b.hipie_index.shape[0]])
    t, r, n, m = np.asarray(multihost_utils.process_allgather(sizes)).max(0)
    if np.asarray(multihost_utils.process_allgather(sizes))[:, 3].min() != m:
        raise ConfigError("hosts selected different numbers of HIPIE prompts this step; multi-host training "
                          "needs conversations with at least max_rounds rounds each.")

    b = dataclasses.replace(b, conv=c.pad(tokens=t, references=r, prompts=n), seg_weight=pad_axis(b.seg_weight, n))
    g = jax.tree.map(np.asarray, multihost_utils.process_allgather(b))  # every leaf: [hosts, ...]
    hosts = g.seg_weight.shape[0]
    row_offset = (np.arange(hosts) * rows_per_host)[:, None]
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    gc = g.conv
    conv = dataclasses.replace(
        jax.tree.map(flat, gc),
        image_slot_rows=flat(gc.image_slot_rows + row_offset),
        image_slot_image=flat(gc.image_slot_image + row_offset),
        ref_rows=flat(gc.ref_rows + row_offset), seg_rows=flat(gc.seg_rows + row_offset))
    return dataclasses.replace(jax.tree.map(flat, g), conv=conv,
                               hipie_index=flat(g.hipie_index + (np.arange(hosts) * n)[:, None]))


def put_global(batch: TrainBatch, mesh) -> TrainBatch:
    """A host-identical NumPy batch -> global arrays (each process fills its own shards)."""
    shardings = batch_shardings(batch, mesh)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), batch, shardings)
