"""Training aids that teach a small LLM to read its image (not in the original SegLLM; off by default).

SegLLM's LLM arrives already reading images (LLaVA's pretraining); a tiny LLM trained from scratch does not
learn to. On MR-Shapes its prompt says no more about where the target is with the image than with the image
zeroed (``docs/learning_proof.md``): finding "the red circle" is a two-hop lookup (gather the question's
words, then attend to the patches that match) whose halves get no gradient until the other exists. Two aids
break that plateau, each weighted by a ``TrainConfig`` field and used only by the training step:

* **box aid** (``box_aid_weight``): a small head reads each supervised prompt's target half (its last 4
  tokens) and says the target's box; another reads the reference half (first 4) and says the reference's box.
  L1 on ``(cx, cy, w, h)`` in frame units: a direct signal of *where*, which the prompt must carry.
* **attention aid** (``attention_aid_weight``): the negative log of the attention mass that query head 0 of
  the LLM's last layer, at each supervised prompt's position, puts on the CLIP patches its target covers
  (:func:`segllm_jax.preprocess.clip_patch_cover`, at least a quarter of a patch or the best-covered one):
  it tells one head *where to look*.

The heads (:class:`BoxAidHeads`, parameters under :data:`BOX_AID`) live only in the training model: they are
saved in training checkpoints (exact resume) but neither exported nor read from an ``init_checkpoint``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segllm_jax.batch import ConversationBatch
from segllm_jax.models.hipie.heads import MLP
from segllm_jax.models.llama import Llama, LlamaOutput, apply_rope, rope_tables
from segllm_jax.preprocess import clip_patch_cover
from segllm_jax.train.box_ops import boxes_from_masks

BOX_AID = "box_aid"  # parameter prefix of the box heads in the training model
COVER_MIN = 0.25  # a CLIP patch belongs to a target it covers at least this much


def is_aid_param(path: str) -> bool:
    """Whether a training-model parameter path belongs to an aid's heads (trained, never exported)."""
    return path.startswith(BOX_AID + "/")


class BoxAidHeads(nnx.Module):
    """Two MLPs from a prompt half (4 tokens x ``text_dim``, flattened) to a box ``(cx, cy, w, h)``."""

    def __init__(self, text_dim: int, *, rngs: nnx.Rngs, hidden: int = 128):
        self.target = MLP(4 * text_dim, hidden, 4, 2, rngs=rngs, hidden_axis=None, in_axis=None)
        self.reference = MLP(4 * text_dim, hidden, 4, 2, rngs=rngs, hidden_axis=None, in_axis=None)


def _cxcywh(masks: jax.Array) -> jax.Array:
    """Boxes ``[M, 4]`` of masks ``[M, S, S]`` as (cx, cy, w, h) in frame units."""
    b = boxes_from_masks(masks) / masks.shape[-1]  # xyxy
    return jnp.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], axis=-1)


def box_aid_loss(heads: BoxAidHeads, prompts: jax.Array, target_masks: jax.Array, aux_masks: jax.Array,
                 has_aux: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L1 of the target box read from ``prompts [M, 8, C]``'s last 4 tokens (mean over prompts) plus that of the
    reference box read from the first 4 (mean over prompts that have a reference); metrics include the target
    centre's error ``|dx| + |dy|``."""
    m = prompts.shape[0]
    p = prompts.astype(jnp.float32)
    target_box = heads.target(p[:, 4:].reshape(m, -1))  # [M, 4]
    ref_box = heads.reference(p[:, :4].reshape(m, -1))
    tb, rb = _cxcywh(target_masks), _cxcywh(aux_masks)
    target_l1 = jnp.abs(target_box - tb).sum(-1).mean()
    has = has_aux.astype(jnp.float32)
    ref_l1 = (jnp.abs(ref_box - rb).sum(-1) * has).sum() / jnp.maximum(has.sum(), 1.0)
    centre = jnp.abs(target_box[:, :2] - tb[:, :2]).sum(-1).mean()
    return target_l1 + ref_l1, {"box_aid/target_l1": target_l1, "box_aid/reference_l1": ref_l1,
                                "box_aid/target_centre_error": centre}


def target_patches(target_masks: np.ndarray, hipie_sizes: np.ndarray, grid: int) -> np.ndarray:
    """Host side: ``[M, grid * grid]`` bool, the CLIP patches each target covers at least :data:`COVER_MIN`
    of (or, if none, the one it covers most; none if the target is outside CLIP's centre crop)."""
    cover = np.stack([clip_patch_cover(m, hw, grid) for m, hw in zip(target_masks, hipie_sizes, strict=True)])
    best = cover >= cover.max(axis=-1, keepdims=True)
    return (cover >= COVER_MIN) | (best & (cover > 0))


def image_patch_columns(conv: ConversationBatch, rows: jax.Array, num_patches: int) -> jax.Array:
    """``[M, P]`` token column of each CLIP patch of the image in conversation row ``rows [M]`` (one image a row,
    as in SegLLM's conversations)."""
    table = jnp.zeros((conv.input_ids.shape[0], num_patches), jnp.int32)
    return table.at[conv.image_slot_rows, conv.image_slot_patch].set(conv.image_slot_cols)[rows]


def attention_aid_loss(llm: Llama, out: LlamaOutput, token_mask: jax.Array, rows: jax.Array, cols: jax.Array,
                       patch_cols: jax.Array, patches: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``-log`` (attention mass of query head 0 of ``llm``'s last layer at tokens ``(rows, cols)`` ``[M]`` on the
    columns ``patch_cols [M, P]`` selected by ``patches [M, P]``), mean over prompts with a selected patch.

    ``out`` is the pass's output with its layer outputs (``return_layer_outputs``): the last layer's input at
    the prompt gives the query, its keys are in ``out.cache`` (RoPE applied). Metric: the mean mass itself."""
    cfg = llm.cfg
    layer = llm.layers[-1]
    x = out.layer_outputs[-2][rows, cols]  # [M, D] input of the last layer at the prompt positions
    positions = (jnp.cumsum(token_mask, axis=-1) - 1)[rows, cols]  # [M] RoPE positions (real tokens counted)
    q = layer.self_attn.q_proj(layer.input_layernorm(x)).reshape(-1, 1, cfg.num_heads, cfg.head_dim)
    cos, sin = rope_tables(positions[:, None], cfg.head_dim, cfg.rope_theta)
    q = apply_rope(q, cos, sin)[:, 0, 0].astype(jnp.float32)  # [M, H] query head 0
    k = out.cache.k[-1][rows][:, :, 0].astype(jnp.float32)  # [M, C, H] its kv head (0)
    scores = jnp.einsum("mh,mch->mc", q, k) * cfg.head_dim ** -0.5
    slots = jnp.arange(k.shape[1])
    seen = (slots[None, :] <= cols[:, None]) & out.cache.valid[rows]  # causal, real tokens
    logp = jax.nn.log_softmax(jnp.where(seen, scores, -1e9), axis=-1)  # [M, C]
    on_target = jnp.zeros(logp.shape, bool).at[jnp.arange(logp.shape[0])[:, None], patch_cols].max(patches)
    has = on_target.any(-1)
    # log mass on the target's patches (finite fill: a prompt without patches gets no NaN gradient)
    mass = jnp.where(has, jax.nn.logsumexp(jnp.where(on_target, logp, -1e30), axis=-1), 0.0)
    n = jnp.maximum(has.sum(), 1)
    return -mass.sum() / n, {"attention_aid/mass": jnp.where(has, jnp.exp(mass), 0.0).sum() / n}
