"""Contrastive denoising (DN) queries of HIPIE's DINO decoder, as SegLLM trains it (architecture.md §T2).

With DN_NUMBER = 1 and at most 2 GT per prompt there is exactly one DN group of ``2M`` slots per prompt
(M = max GT count over the batch): slot ``j`` = positive copy of GT j, slot ``M + j`` = negative copy,
remaining slots (prompts with fewer than M GT) are padding (content 0, box logit 0). The general
multi-group layout of the original is kept (group g occupies slots ``[2Mg, 2M(g+1))``), so a larger
DN_NUMBER works too.

Static shapes: M is the size of the padded GT axis ``G`` of the inputs (a static Python int). The
original uses the *actual* batch maximum; to reproduce it exactly, pad the GT axis to that maximum
(DN padding slots take part in decoder self-attention, so extra padding slots change the numbers).

Randomness: the original draws ``sign = randint(0, 2)`` then ``part = rand`` with shape (2·g·T, 4) over
the GT concatenated prompt-major. Here the draws are laid out padded as ``[2g, B, G, 4]`` (axis 0:
group g's positives at 2g, negatives at 2g+1); :func:`draw_dn_noise` makes them from a JAX key and
:func:`flat_draws_to_padded` converts stored torch-order draws (golden ``{v}_dn_rand_sign01`` /
``_part``) to this layout. The label content is ``label_enc[b]`` for every DN slot of prompt b
(DYNAMIC_LABEL_ENC: ``detr.resizer`` of the mean raw prompt token, computed by the model and passed
in); label noise is never applied with dynamic label encodings (§T2).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segllm_jax.models.hipie.heads import inverse_sigmoid

DN_NUMBER = 1
LABEL_NOISE_RATIO = 0.5  # inactive with dynamic label encodings (architecture.md §T2); kept for the record
BOX_NOISE_SCALE = 1.0


class DNQueries(NamedTuple):
    label: jax.Array         # [B, pad, D] DN content queries
    bbox_logit: jax.Array    # [B, pad, 4] inverse_sigmoid(noisy cxcywh); 0 in padding slots
    attn_mask: jax.Array     # [pad + Q, pad + Q] bool, True = may not attend
    single_padding: int      # 2M (the original's ``dn_meta['single_padding']``)
    num_groups: int          # DN groups (1 in SegLLM)

    @property
    def pad_size(self) -> int:
        return self.single_padding * self.num_groups


def dn_num_groups(max_gt: int, dn_number: int = DN_NUMBER) -> int:
    """``max(1, (2·dn_number) // (2·M))`` (§T2): 1 for SegLLM's DN_NUMBER = 1."""
    return max(1, (2 * dn_number) // (2 * max(max_gt, 1)))


def dn_attention_mask(max_gt: int, num_groups: int, num_queries: int) -> jax.Array:
    """Decoder self-attention mask [pad + Q, pad + Q], True = blocked (§T2).

    Matching queries (rows >= pad) may not see any DN slot; each DN group may not see other groups.
    Within a group everything is visible (positives, negatives and padding slots alike).
    """
    sp = 2 * max_gt
    pad = sp * num_groups
    n = pad + num_queries
    idx = np.arange(n)
    group = np.where(idx < pad, idx // max(sp, 1), -1)  # -1 = matching query
    row_g, col_g = group[:, None], group[None, :]
    blocked = (row_g == -1) & (col_g >= 0)                       # matching -> DN
    blocked |= (row_g >= 0) & (col_g >= 0) & (row_g != col_g)    # DN group -> other DN group
    return jnp.asarray(blocked)


def draw_dn_noise(key: jax.Array, num_groups: int, batch: int, max_gt: int) -> tuple[jax.Array, jax.Array]:
    """Fresh DN draws in the padded layout: (sign01 int32 {0,1}, part f32 U[0,1)), each [2g, B, G, 4]."""
    k_sign, k_part = jax.random.split(key)
    shape = (2 * num_groups, batch, max_gt, 4)
    sign01 = jax.random.bernoulli(k_sign, 0.5, shape).astype(jnp.int32)
    part = jax.random.uniform(k_part, shape, jnp.float32)
    return sign01, part


def flat_draws_to_padded(flat: np.ndarray, counts: Sequence[int], num_groups: int = 1,
                         max_gt: int | None = None) -> np.ndarray:
    """Torch-order DN draws [2g·T, 4] (rows: group-major, positives then negatives, GT prompt-major)
    -> padded [2g, B, G, 4] (zeros in padding slots). Host-side helper for replaying stored draws."""
    flat = np.asarray(flat)
    counts = [int(c) for c in counts]
    total = sum(counts)
    g_max = max(counts) if max_gt is None else max_gt
    out = np.zeros((2 * num_groups, len(counts), g_max, flat.shape[-1]), flat.dtype)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    for k in range(2 * num_groups):
        for b, (off, c) in enumerate(zip(offsets, counts, strict=True)):
            out[k, b, :c] = flat[k * total + off: k * total + off + c]
    return out


def noisy_dn_boxes(gt_boxes: jax.Array, sign01: jax.Array, part: jax.Array,
                   box_noise_scale: float = BOX_NOISE_SCALE) -> jax.Array:
    """Noised DN boxes (§T2), cxcywh [2g, B, G, 4].

    gt_boxes [B, G, 4] cxcywh; sign01, part [2g, B, G, 4]. Positives (even axis-0 index) move each edge
    by part·(w/2 or h/2) with part in [0, 1), negatives (odd) by part + 1; the sign is random per
    coordinate. Corners are clamped to [0, 1] before converting back.
    """
    if box_noise_scale <= 0:
        return jnp.broadcast_to(gt_boxes[None], part.shape)
    xy, wh = gt_boxes[..., :2], gt_boxes[..., 2:]
    xyxy = jnp.concatenate([xy - wh / 2, xy + wh / 2], axis=-1)[None]      # [1, B, G, 4]
    diff = jnp.concatenate([wh / 2, wh / 2], axis=-1)[None]                 # [1, B, G, 4]
    is_neg = (jnp.arange(part.shape[0]) % 2 == 1)[:, None, None, None]
    sign = sign01.astype(jnp.float32) * 2.0 - 1.0
    p = (part + jnp.where(is_neg, 1.0, 0.0)) * sign
    xyxy = jnp.clip(xyxy + (p * diff) * box_noise_scale, 0.0, 1.0)
    return jnp.concatenate([(xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]], axis=-1)


def prepare_dn_queries(gt_boxes: jax.Array, gt_valid: jax.Array, label_enc: jax.Array, *,
                       num_queries: int, key: jax.Array | None = None,
                       draws: tuple[jax.Array, jax.Array] | None = None,
                       box_noise_scale: float = BOX_NOISE_SCALE, dn_number: int = DN_NUMBER) -> DNQueries:
    """DN content/box queries and the self-attention mask (``prepare_for_cdn``, §T2).

    gt_boxes [B, G, 4] cxcywh, gt_valid [B, G] bool (valid GT first), label_enc [B, D];
    ``num_queries`` = matching queries after the DN block (bg + fg = 110 in SegLLM).
    Noise comes from ``draws`` = (sign01, part) [2g, B, G, 4] if given, else from ``key``; with
    ``box_noise_scale = 0`` neither is needed (boxes = GT exactly, no draws, like the original).
    """
    b, g_max, _ = gt_boxes.shape
    groups = dn_num_groups(g_max, dn_number)
    if box_noise_scale > 0:
        if draws is None:
            if key is None:
                raise ValueError("prepare_dn_queries needs a PRNG key or stored draws when box_noise_scale > 0.")
            draws = draw_dn_noise(key, groups, b, g_max)
        sign01, part = (jnp.asarray(d) for d in draws)
    else:
        sign01 = part = jnp.zeros((2 * groups, b, g_max, 4), jnp.float32)
    boxes = noisy_dn_boxes(gt_boxes.astype(jnp.float32), sign01, part.astype(jnp.float32), box_noise_scale)
    logits = inverse_sigmoid(boxes)                                           # [2g, B, G, 4]
    valid = gt_valid[None, :, :, None]                                        # [1, B, G, 1]
    logits = jnp.where(valid, logits, 0.0)
    label = jnp.where(valid, label_enc[None, :, None, :], 0.0)                # [2g, B, G, D]
    label = jnp.broadcast_to(label, (2 * groups, b, g_max, label_enc.shape[-1]))
    # [2g, B, G, .] -> [B, 2g·G, .]: slot (k, j) -> k·G + j (k even = positives of group k/2)
    label = jnp.moveaxis(label, 0, 1).reshape(b, 2 * groups * g_max, -1)
    logits = jnp.moveaxis(logits, 0, 1).reshape(b, 2 * groups * g_max, 4)
    return DNQueries(label=label.astype(label_enc.dtype), bbox_logit=logits,
                     attn_mask=dn_attention_mask(g_max, groups, num_queries),
                     single_padding=2 * g_max, num_groups=groups)


def dn_match_indices(counts: Sequence[int], single_padding: int,
                     num_groups: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fixed DN-group indices (§T6): per prompt src = g·2M + j, tgt = j (positives only)."""
    out = []
    for c in counts:
        t = np.arange(int(c), dtype=np.int64)
        src = (np.arange(num_groups)[:, None] * single_padding + t[None]).reshape(-1)
        out.append((src, np.tile(t, num_groups)))
    return out
