"""HIPIE's training-mode forward as SegLLM runs it (architecture.md §T2, §T3).

Differences from inference (:meth:`Hipie.segment`), all reusing the inference modules:

* **VL-fusion attention dropout** (p = 0.1, training only, §T11): ``deterministic=False`` draws the keep
  masks from ``rngs``; ``fusion_dropout_keep = (keep_v [B, H, S, T], keep_l [B, H, T, S])`` replays recorded
  masks instead (golden ``rand_dropout0`` is the (B·H, S, T) mask = ``keep_v``, ``rand_dropout1`` = ``keep_l``).
* **DN queries** (§T2) are prepended to the bg + fg queries, with the DINO self-attention mask. Their content is
  :class:`DNLabelEncoder` (``detr.resizer``: Linear 768 -> 256, LayerNorm eps 1e-12, dropout 0) of the mean raw
  prompt token; their boxes come from :func:`segllm_jax.train.denoising.prepare_dn_queries`.
* **Deep supervision** (§T3): class / box / IoU heads of *every* decoder layer, for the DN slice ``[0, pad)``, the
  bg slice ``[pad, pad + Qbg)`` and the fg slice ``[pad + Qbg, Q)``, plus the encoder proposals (``_enc``).
* **Masks** for given (prompt, query) pairs per layer (:func:`training_mask_logits`): the CondInst head runs only
  on matched queries. fg reference = centre of the box *entering* layer l, in pixels. DN reference **(quirk, §O30)**
  = the logit-space centre of **fg query j** entering layer l (not scaled, not the DN slot's own box), while the
  dynamic-conv parameters come from DN slot j.
* The two-stage reference of the fg queries is detached before the decoder (DINO two-stage: the proposals get
  gradients only through the ``_enc`` losses); bg references are the learned ``bg_query_refs`` (not detached).

Weights: ``detr.resizer`` is not part of the inference ``Hipie`` (the main converter table ignores it as
"training only"); the trainer's ``SegLLM`` holds a :class:`DNLabelEncoder` next to its ``Hipie``
(``segllm_jax.models.segllm.DN_RESIZER``) and the converter's ``hipie.dn_resizer_table`` maps the four
``detr.resizer.*`` tensors onto it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.heads import inverse_sigmoid
from segllm_jax.models.hipie.image_side import LevelInputs
from segllm_jax.models.hipie.mask_head import aligned_bilinear, dynamic_mask_logits, split_memory_levels
from segllm_jax.models.hipie.model import Hipie
from segllm_jax.models.layers import LayerNorm, Linear


class DNLabelEncoder(nnx.Module):
    """``detr.resizer`` (DYNAMIC_LABEL_ENC, §T2): mean of the raw prompt tokens -> Linear -> LayerNorm (eps 1e-12).

    Its dropout has p = 0.0 (the ``transformer.resizer`` dropout of the README has no numeric effect).
    Parameters ``fc/{kernel,bias}``, ``layer_norm/{scale,bias}``.
    """

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.fc = Linear(cfg.text_dim, cfg.d_model, axes=("hipie_text", "hipie_embed"), **kw)
        self.layer_norm = LayerNorm(cfg.d_model, axis_name="hipie_embed", eps=cfg.resizer_eps, **kw)

    def __call__(self, prompts: jax.Array) -> jax.Array:
        """Raw prompts [B, T, 768] (before VL fusion; text mask all ones -> plain mean) -> [B, 256]."""
        return self.layer_norm(self.fc(jnp.mean(prompts.astype(jnp.float32), axis=1)))


@struct.dataclass
class TrainingOutputs:
    """Everything the criterion needs from one training forward (Q = pad + Qbg + Qfg, L decoder layers)."""

    hs: jax.Array  # [L, B, Q, C] decoder output per layer
    init_reference: jax.Array  # [B, Q, 4] decoder input boxes (DN sigmoid(box), bg raw, fg proposals)
    inter_references: jax.Array  # [L, B, Q, 4] box after each layer (undetached refinement)
    logits: jax.Array  # [L, B, Q, T] VL_Align token logits of every layer
    boxious: jax.Array  # [L, B, Q, 1] IoU-head logits of every layer
    enc_logits: jax.Array  # [B, S, 1] Still_Classifier proposal logits
    enc_boxes: jax.Array  # [B, S, 4] sigmoid(enc_coord_unact) (invalid proposals: 1.0)
    topk_indices: jax.Array  # [B, Qfg] two-stage selection (fg query q <- token topk_indices[:, q])
    lang_fused: jax.Array  # [B, T, 768]
    mask_feats: jax.Array  # [B, H0, W0, 8] stride-8 CondInst pixel features
    pad: int = struct.field(pytree_node=False)  # DN slots in front
    num_bg: int = struct.field(pytree_node=False)
    image_size: tuple[int, int] = struct.field(pytree_node=False)  # (H, W) of the padded input

    @property
    def layer_input_references(self) -> jax.Array:
        """[L, B, Q, 4]: reference *entering* layer l (init for l = 0, else ``inter_references[l-1]``)."""
        return jnp.concatenate([self.init_reference[None], self.inter_references[:-1]], axis=0)

    def group(self, name: str) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(logits [L,B,Qg,T], boxes [L,B,Qg,4], boxious [L,B,Qg,1]) of group 'dn', 'bg' or 'fg'."""
        start, stop = {"dn": (0, self.pad), "bg": (self.pad, self.pad + self.num_bg),
                       "fg": (self.pad + self.num_bg, self.hs.shape[2])}[name]
        return (self.logits[:, :, start:stop], self.inter_references[:, :, start:stop],
                self.boxious[:, :, start:stop])


def training_forward(hipie: Hipie, levels: LevelInputs, prompts: jax.Array, image_index: jax.Array | None,
                     dn_label: jax.Array, dn_bbox_logit: jax.Array, attn_mask: jax.Array, *,
                     deterministic: bool = False, rngs: nnx.Rngs | None = None,
                     fusion_dropout_keep: tuple[jax.Array, jax.Array] | None = None,
                     topk_indices: jax.Array | None = None) -> TrainingOutputs:
    """Training-mode forward (§T2, §T3): fusion (dropout) -> encoder -> two-stage -> decoder with DN prefix -> heads.

    ``prompts`` [B, 8, 768] raw; ``dn_label`` [B, pad, 256] and ``dn_bbox_logit`` [B, pad, 4] (from
    ``prepare_dn_queries``); ``attn_mask`` [pad+Q, pad+Q] or [B, 1, pad+Q, pad+Q] bool (True = blocked);
    ``topk_indices`` [B, Qfg] forces the two-stage order (golden near-tie hook).
    """
    cfg = hipie.cfg
    enc = hipie.encode_prompt(levels, prompts, image_index, deterministic=deterministic, rngs=rngs,
                              fusion_dropout_keep=fusion_dropout_keep)
    shapes = enc.spatial_shapes
    n = cfg.dec_layers
    dec = hipie.decoder
    # same steps as HipieDecoder.__call__, plus the DINO detach of the two-stage reference
    queries = dec.two_stage(enc.memory, shapes, hipie.class_embed[n], hipie.bbox_embed[n], enc.mask_flatten,
                            topk_indices=topk_indices)
    nbg = cfg.num_bg_queries
    ref_match = jnp.concatenate([queries.init_reference[:, :nbg],
                                 jax.lax.stop_gradient(queries.init_reference[:, nbg:])], axis=1)
    tgt = jnp.concatenate([dn_label.astype(queries.tgt.dtype), queries.tgt], axis=1)  # [B, Q, C]
    reference = jnp.concatenate([jax.nn.sigmoid(dn_bbox_logit.astype(jnp.float32)), ref_match], axis=1)
    hs, inter = dec.run_layers(tgt, reference, enc.memory, shapes, enc.level_start_index, hipie.bbox_embed,
                               enc.mask_flatten, attn_mask, enc.valid_ratios)
    logits = jnp.stack([hipie.class_embed[layer](hs[layer], enc.lang_fused) for layer in range(n)])  # [L, B, Q, T]
    boxious = jnp.stack([hipie.iou_head[layer](hs[layer]).astype(jnp.float32) for layer in range(n)])  # [L, B, Q, 1]
    mask_feats = hipie.mask_head(split_memory_levels(enc.memory, shapes))
    h0, w0 = shapes[0]
    stride = cfg.mask_feat_stride
    return TrainingOutputs(
        hs=hs, init_reference=reference, inter_references=inter, logits=logits, boxious=boxious,
        enc_logits=queries.enc_scores[..., None], enc_boxes=jax.nn.sigmoid(queries.enc_coord_unact),
        topk_indices=queries.topk_indices, lang_fused=enc.lang_fused, mask_feats=mask_feats,
        pad=int(dn_label.shape[1]), num_bg=nbg, image_size=(h0 * stride, w0 * stride))


def mask_reference_points(out: TrainingOutputs, group: str, query_idx: jax.Array) -> jax.Array:
    """Reference point [L, B, K, 2] handed to the dynamic mask head for group-relative queries ``query_idx``.

    fg: centre (sigmoid space) of fg query ``idx`` entering layer l, times (W, H) -> pixels.
    dn **(quirk, §O30)**: logit-space centre of **fg** query ``idx`` entering layer l (unscaled).
    """
    refs = out.layer_input_references  # [L, B, Q, 4]
    fg0 = out.pad + out.num_bg
    ref = jnp.take_along_axis(refs[..., :2], (fg0 + query_idx)[..., None], axis=2)  # [L, B, K, 2]
    if group == "fg":
        h, w = out.image_size
        return ref * jnp.asarray([w, h], jnp.float32)
    if group == "dn":
        return inverse_sigmoid(ref)
    raise ValueError(f"mask_reference_points: group must be 'fg' or 'dn', not {group!r}")


def training_mask_logits(hipie: Hipie, out: TrainingOutputs, group: str, query_idx: jax.Array) -> jax.Array:
    """Stride-4 mask logits [L, B, K, H/4, W/4] of group-relative queries ``query_idx`` [L, B, K] per layer.

    Dynamic-conv parameters = ``controller(hs_l)`` of the query itself (fg: query pad + Qbg + idx, dn: slot idx);
    reference points from :func:`mask_reference_points`. Padded (invalid) pairs are computed too (any index is
    fine); the criterion masks them out.
    """
    cfg = hipie.cfg
    q_abs = query_idx + (out.pad + out.num_bg if group == "fg" else 0)
    hs = jnp.take_along_axis(out.hs, q_abs[..., None], axis=2)  # [L, B, K, C]
    params = hipie.controller(hs).astype(jnp.float32)  # [L, B, K, 169]
    ref = mask_reference_points(out, group, query_idx)  # [L, B, K, 2]
    factor = cfg.mask_feat_stride // cfg.mask_out_stride

    def one_layer(r: jax.Array, p: jax.Array) -> jax.Array:
        return aligned_bilinear(dynamic_mask_logits(cfg, out.mask_feats, r, p), factor)

    return jax.vmap(one_layer)(ref, params)


__all__ = ["DNLabelEncoder", "TrainingOutputs", "mask_reference_points", "training_forward", "training_mask_logits"]
