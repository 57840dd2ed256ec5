"""One optimisation step as pure functions (architecture.md §T10, §T12): what trains, the loss, the update.

* :func:`is_trainable` is architecture.md §T12 as path patterns: ``embed_tokens``, ``lm_head``, the CLIP tower,
  HIPIE's FrozenBN buffers and its stem + res2 (detectron2 ``FREEZE_AT=2``) are frozen; the rest
  trains. Frozen parameters live apart from trainable ones in :class:`TrainState`, so they get no
  gradient and no Adam moments (less memory, and they cannot drift). A model trained from scratch
  (``TrainConfig.freeze_pretrained=False``) trains all of them but the FrozenBN buffers.
* :func:`loss_fn` = next-token cross-entropy on the structural labels + ``1e-3 * mean(prompt²)``
  over the prompts sent to HIPIE + an optional HIPIE term (a callable, see :data:`HipieTerm`).
  The reference gates of the batch (1 = real reference, 0 = padding) are multiplied by a fresh
  Bernoulli(0.5) draw here, on device, from the step key (architecture.md §D6, §O22: no 1/p rescaling).
* :func:`make_train_step` returns ``train_step(state, batch) -> (state, metrics)``, jit-able; the
  caller (``loop.py`` / tests) jits it with the shardings of :func:`state_shardings`; its batch, a
  :class:`~segllm_jax.train.batching.TrainBatch`, comes from ``batching.py``.

Parameters are handled as flat ``{"a/b/c": array}`` dicts: easy to split by path, to shard, to
checkpoint, and independent of NNX internals; :class:`ModelStructure` turns them back into a
``SegLLM`` inside traced code.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from segllm_jax.batch import forward
from segllm_jax.config import SegLLMConfig
from segllm_jax.models.segllm import SegLLM
from segllm_jax.prompt import IGNORE_INDEX
from segllm_jax.sharding import logical_to_spec
from segllm_jax.train import aids
from segllm_jax.train import lora as lora_lib
from segllm_jax.train.batching import TrainBatch
from segllm_jax.train.config import TrainConfig
from segllm_jax.train.state import TrainState

if TYPE_CHECKING:
    from segllm_jax.train.hipie_loss import HipieLossDetails


# architecture.md §T12; the HIPIE patterns follow segllm_jax/models/hipie/resnet.py's parameter paths
FROZEN_PATTERNS: tuple[str, ...] = (
    r"^llm/embed_tokens/",
    r"^llm/lm_head/",
    r"^vision_tower/",
    r"^segmentator/backbone/(stem|res2)/",
    r"^segmentator/backbone/.*/norm/(weight|bias|running_mean|running_var)$",  # FrozenBN buffers
)
_FROZEN = re.compile("|".join(FROZEN_PATTERNS))
_BUFFERS = re.compile(FROZEN_PATTERNS[-1])  # never trained: FrozenBN statistics are not parameters


def is_trainable(path: str, freeze_pretrained: bool = True) -> bool:
    """Whether the parameter at ``path`` ('/'-joined) is updated in training (architecture.md §T12).

    ``freeze_pretrained=False`` (``TrainConfig.freeze_pretrained``) trains everything but the FrozenBN
    buffers: for a model trained from scratch, where the frozen parts would be random weights.
    """
    return (_FROZEN if freeze_pretrained else _BUFFERS).search(path) is None


def trains(path: str, cfg: TrainConfig) -> bool:
    """``cfg``'s freezing rule: :func:`is_trainable` (within ``cfg.train_only`` when set), or with ``cfg.lora``
    only the adapters and ``lora.train``; the training aids' heads (:data:`segllm_jax.train.aids.BOX_AID`) always
    train."""
    if aids.is_aid_param(path):
        return True
    if cfg.lora is None:
        return is_trainable(path, cfg.freeze_pretrained) and (
            cfg.train_only is None or any(re.search(p, path) for p in cfg.train_only))
    return lora_lib.is_trainable_lora(path, cfg.lora, lambda p: is_trainable(p, cfg.freeze_pretrained))


def split_trainable(flat: Mapping[str, Any], cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trainable, frozen)`` halves of a flat ``{path: value}`` dict under ``cfg``'s freezing rule."""
    trainable = {k: v for k, v in flat.items() if trains(k, cfg)}
    return trainable, {k: v for k, v in flat.items() if k not in trainable}


# ---------------------------------------------------------------------------------------------
# model <-> flat parameter dicts


def _key(path: Sequence[Any]) -> str:
    return "/".join(map(str, path))


class ModelStructure:
    """The static half of a model (graph + variable metadata): rebuilds it from flat arrays."""

    def __init__(self, model: nnx.Module):
        graphdef, state = nnx.split(model)
        self.graphdef = graphdef
        self.flat = list(nnx.to_flat_state(state))  # [(path, Variable)]; values may be abstract

    @property
    def keys(self) -> list[str]:
        return [_key(p) for p, _ in self.flat]

    def values(self, model: nnx.Module) -> dict[str, jax.Array]:
        return {_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}

    def abstract(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {_key(p): jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype) for p, v in self.flat}

    def logical_axes(self) -> dict[str, tuple | None]:
        return {_key(p): v.get_metadata().get("logical_axes") for p, v in self.flat}

    def merge(self, values: Mapping[str, jax.Array]) -> nnx.Module:
        flat = [(p, v.replace(values[_key(p)])) for p, v in self.flat]
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))


def training_model_config(cfg: SegLLMConfig, compute_dtype: str) -> SegLLMConfig:
    """float32 master weights, ``compute_dtype`` activations (every sub-model)."""
    rep = dataclasses.replace
    return rep(cfg, llm=rep(cfg.llm, param_dtype="float32", dtype=compute_dtype),
               vision=rep(cfg.vision, param_dtype="float32", dtype=compute_dtype),
               hipie=rep(cfg.hipie, param_dtype="float32", dtype=compute_dtype))


# ---------------------------------------------------------------------------------------------
# rematerialisation


REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing inside a layer: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class _RematLayer(nnx.Module):
    """Wraps one decoder layer so its activations are recomputed in the backward pass."""

    def __init__(self, inner: nnx.Module, policy: Callable | None):
        self.inner = inner
        self._call = nnx.remat(lambda layer, *args: layer(*args), policy=policy)

    def __call__(self, *args):
        return self._call(self.inner, *args)


def apply_remat(model: SegLLM, remat: str) -> SegLLM:
    """``remat`` over every LLM decoder layer (in place; the model is a fresh traced copy)."""
    if remat == "none":
        return model
    policy = REMAT_POLICIES[remat]
    for i in range(len(model.llm.layers)):
        model.llm.layers[i] = _RematLayer(model.llm.layers[i], policy)
    return model


# ---------------------------------------------------------------------------------------------
# loss


# (model, prompts [M, 8, 768] of the selected <seg>s, batch, key) -> (loss, metrics)
HipieTerm = Callable[[SegLLM, jax.Array, TrainBatch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


PROMPT_IOU = "prompt_iou"  # HIPIE metric [M, 2]: (intersection, union) pixels per selected prompt


def hipie_term_from_loss(hipie_loss_details: Callable) -> HipieTerm:
    """Adapts ``segllm_jax.train.hipie_loss.hipie_loss_details`` to :data:`HipieTerm`: image features of
    every conversation's HIPIE image, then the criterion on the selected prompts. The metrics are the
    criterion's plus :data:`PROMPT_IOU`, from which the loop logs per-round IoU (:func:`round_ious`)."""

    def term(model: SegLLM, prompts: jax.Array, batch: TrainBatch, key: jax.Array):
        levels = model.segmentator.image_features(batch.hipie_images)
        image_index = batch.conv.seg_rows[batch.hipie_index]  # one image per conversation row
        details = hipie_loss_details(model.segmentator, model.segmentator_dn_resizer, levels, prompts, image_index,
                                     batch.target_masks, batch.aux_masks, batch.has_aux, key)
        return details.loss, {**details.metrics, PROMPT_IOU: prompt_iou_parts(details, batch.target_masks)}

    return term


def prompt_iou_parts(details: HipieLossDetails, target_masks: jax.Array) -> jax.Array:
    """[M, 2] (intersection, union) in pixels, per prompt, of the prediction ``iou_train`` pools (§T10: the
    final layer's last matched fg query, up-sampled to the frame, > 0), so ``iou_train`` is
    ``sum(I) / (sum(U) + 1e-4)`` and each round's own IoU can be told apart. target_masks [M, S, S]."""
    last = details.fg_masks[-1]  # [M, K, h, w]
    pos = jnp.maximum(jnp.sum(details.fg_indices.valid[-1], axis=1) - 1, 0)  # [M]
    logits = jnp.take_along_axis(last, pos[:, None, None, None], axis=1)[:, 0]  # [M, h, w]
    pred = jax.image.resize(logits.astype(jnp.float32), target_masks.shape, "bilinear", antialias=False) > 0
    target = target_masks > 0
    parts = jnp.stack([jnp.sum(pred & target, axis=(1, 2)), jnp.sum(pred | target, axis=(1, 2))], axis=-1)
    return jax.lax.stop_gradient(parts.astype(jnp.float32))


def round_ious(parts: np.ndarray, rounds: np.ndarray) -> dict[str, float]:
    """``hipie/iou_round{k}`` (k = 1 for a conversation's first round): the mean IoU of the step's prompts of
    round k. Only rounds that had prompts in the batch get a value: an absent round logs nothing (not a 0 or
    a NaN that would drag its curve). parts [M, 2] from :func:`prompt_iou_parts`, rounds [M] 0-based."""
    iou = parts[:, 0] / (parts[:, 1] + 1e-4)  # [M]
    return {f"hipie/iou_round{k + 1}": float(iou[rounds == k].mean()) for k in np.unique(rounds)}


def loss_fn(model: SegLLM, batch: TrainBatch, key: jax.Array, *, prompt_l2_weight: float = 1e-3,
            hipie_term: HipieTerm | None = None, box_aid_weight: float = 0.0,
            attention_aid_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``CE_LM + HIPIE + w * mean(prompt²)`` (architecture.md §T10) and its terms; ``hipie_term=None`` skips HIPIE.
    The image-reading aids (:mod:`segllm_jax.train.aids`) are added with their weights, when not 0."""
    k_gate, k_hipie = jax.random.split(key)
    conv = batch.conv
    # one key per reference from its (global row, column): the draw does not depend on padding or on
    # how hosts split the batch
    ref_ids = conv.ref_rows * 1_000_003 + conv.ref_mask_cols  # [R]
    draws = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(k_gate, i), 0.5, (2,)))(ref_ids)  # [R, 2]
    gates = conv.ref_gates * draws.astype(conv.ref_gates.dtype)
    out, prompts = forward(model, dataclasses.replace(conv, ref_gates=gates),  # prompts [N, 8, 768]
                           return_layer_outputs=attention_aid_weight > 0)
    # next-token CE: logits at t predict the label at t + 1; mean over non-ignored tokens (HF)
    labels = conv.labels[:, 1:]  # [B, T-1]
    valid = labels != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1].astype(jnp.float32),
                                                         jnp.where(valid, labels, 0))
    tokens = valid.sum()
    ce = jnp.where(valid, ce, 0.0).sum() / jnp.maximum(tokens, 1)
    # 1e-3 * mean(prompt²) over the (n_sel, 8, 768) prompts sent to HIPIE
    w = batch.seg_weight
    per_prompt = jnp.mean(jnp.square(prompts.astype(jnp.float32)), axis=(1, 2))  # [N]
    l2 = (per_prompt * w).sum() / jnp.maximum(w.sum(), 1.0)
    loss = ce + prompt_l2_weight * l2
    metrics = {"loss_lm": ce, "loss_prompt_l2": l2, "tokens": tokens.astype(jnp.float32)}
    selected = prompts[batch.hipie_index]  # [M, 8, C] the prompts HIPIE and the aids train on
    if box_aid_weight > 0:
        box, box_metrics = aids.box_aid_loss(getattr(model, aids.BOX_AID), selected, batch.target_masks,
                                             batch.aux_masks, batch.has_aux)
        loss = loss + box_aid_weight * box
        metrics.update({"loss_box_aid": box, **box_metrics})
    if attention_aid_weight > 0:
        rows = conv.seg_rows[batch.hipie_index]  # the prompt is read at the column before its <seg>
        look, look_metrics = aids.attention_aid_loss(
            model.llm, out, conv.token_mask, rows, conv.seg_cols[batch.hipie_index] - 1,
            aids.image_patch_columns(conv, rows, batch.target_patches.shape[1]), batch.target_patches)
        loss = loss + attention_aid_weight * look
        metrics.update({"loss_attention_aid": look, **look_metrics})
    if hipie_term is not None:
        hipie, hipie_metrics = hipie_term(model, selected, batch, k_hipie)
        loss = loss + hipie
        metrics.update({"loss_hipie": hipie, **{f"hipie/{k}": v for k, v in hipie_metrics.items()}})
    metrics["loss"] = loss
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# optimiser and step


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """HF ``cosine`` with ``warmup_ratio``: linear 0 -> lr over ceil(3 %) of the steps, cosine to 0."""
    warmup = cfg.warmup_steps
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1), 0.0)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """HF ``adamw_torch`` (decoupled weight decay), optional global-norm clipping (config docstring)."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
    parts.append(optax.adamw(make_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def make_train_step(structure: ModelStructure, cfg: TrainConfig,
                    hipie_term: HipieTerm | None = None) -> Callable[[TrainState, TrainBatch],
                                                                       tuple[TrainState, dict[str, jax.Array]]]:
    """``train_step(state, batch) -> (state, metrics)``: pure, jit-able, deterministic given the state."""
    tx, schedule = make_optimizer(cfg), make_schedule(cfg)

    def train_step(state: TrainState, batch: TrainBatch) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(state.rng, state.step)

        def objective(params):
            model = structure.merge({**params, **state.frozen})
            if cfg.lora is not None and cfg.lora.dropout > 0:
                lora_lib.set_dropout_rngs(model, jax.random.fold_in(key, 1 << 20))
            model = apply_remat(model, cfg.remat)
            return loss_fn(model, batch, key, prompt_l2_weight=cfg.prompt_l2_weight, hipie_term=hipie_term,
                           box_aid_weight=cfg.box_aid_weight, attention_aid_weight=cfg.attention_aid_weight)

        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


# ---------------------------------------------------------------------------------------------
# initialisation, sharded from the start


def param_shardings(structure: ModelStructure, mesh: Mesh) -> dict[str, NamedSharding]:
    out = {}
    for key, axes in structure.logical_axes().items():
        shape = structure.abstract()[key].shape if axes is not None else ()
        out[key] = NamedSharding(mesh, PartitionSpec() if axes is None else logical_to_spec(axes, shape, mesh))
    return out


def state_shardings(structure: ModelStructure, cfg: TrainConfig, mesh: Mesh) -> TrainState:
    """Shardings of every leaf of the :class:`TrainState`: Adam moments follow their parameters."""
    flat = param_shardings(structure, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    trainable, frozen = split_trainable(flat, cfg)
    abstract = split_trainable(structure.abstract(), cfg)[0]
    tx = make_optimizer(cfg)
    opt_abstract = jax.eval_shape(tx.init, abstract)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, trainable,
                                   transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=trainable, frozen=frozen, opt_state=opt_sh, rng=replicated)


def param_array_shardings(shardings: TrainState) -> dict[str, NamedSharding]:
    """Where each parameter of a plain checkpoint goes (``init_checkpoint``, ``init_state(init_params=...)``): a
    QLoRA kernel where its quantized values go; adapters and quantization scales have no plain counterpart."""
    flat = {**shardings.params, **shardings.frozen}
    return {plain: v for k, v in flat.items() if (plain := lora_lib.plain_key(k)) is not None}


def build_training_model(cfg: TrainConfig, seed: int | None = None,
                         values: Mapping[str, jax.Array] | None = None) -> SegLLM:
    """The model a training step differentiates: ``SegLLM``, with its DN label encoder
    (``segmentator_dn_resizer``) when the HIPIE term is on (the term is its only user), and with ``cfg.lora`` the
    qwix adapters (:mod:`segllm_jax.train.lora`), and with ``cfg.box_aid_weight`` the box aid's heads
    (:mod:`segllm_jax.train.aids`). ``values`` (plain parameter paths, e.g. a checkpoint's) replace the random
    weights before the adapters are added, so a QLoRA base is quantized from them."""
    seed = cfg.seed if seed is None else seed
    model = SegLLM(training_model_config(cfg.model, cfg.compute_dtype), rngs=nnx.Rngs(seed),
                   dn_rngs=nnx.Rngs(seed + 1) if cfg.use_hipie_loss else None)
    if values:
        flat = [(p, v.replace(jnp.asarray(values[k], v.get_value().dtype)) if (k := _key(p)) in values else v)
                for p, v in nnx.to_flat_state(nnx.state(model))]
        nnx.update(model, nnx.from_flat_state(flat))
    if cfg.box_aid_weight > 0:
        setattr(model, aids.BOX_AID, aids.BoxAidHeads(cfg.model.hipie.text_dim, rngs=nnx.Rngs(seed + 3)))
    if cfg.lora is None:
        return model
    return lora_lib.add_adapters(model, cfg.lora, cfg.base_weights_qtype, seed + 2)


def abstract_structure(cfg: TrainConfig) -> ModelStructure:
    """The model's structure from shapes only (``nnx.eval_shape``: no parameter is allocated)."""
    return ModelStructure(nnx.eval_shape(lambda: build_training_model(cfg)))


def init_state(cfg: TrainConfig, mesh: Mesh, structure: ModelStructure | None = None,
               init_params: Mapping[str, np.ndarray | jax.Array] | None = None) -> tuple[TrainState, ModelStructure]:
    """A fresh :class:`TrainState` created directly in its shardings (``jit(out_shardings=...)``), so
    no host ever holds the full tree; ``init_params`` (e.g. a checkpoint restored straight into the
    state's shardings by ``loop.restore_init_params``) replace the random weights. Device arrays
    among them are donated: they become the state's buffers instead of being copied."""
    structure = structure or abstract_structure(cfg)
    shardings = state_shardings(structure, cfg, mesh)
    tx = make_optimizer(cfg)

    def init(given: Mapping[str, jax.Array] | None) -> TrainState:
        # keys the source lacks (e.g. the DN label encoder) keep their fresh init
        values = structure.values(build_training_model(cfg, values=given))
        params, frozen = split_trainable(values, cfg)
        params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
        frozen = lora_lib.store_frozen(frozen, cfg.base_weights_qtype)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(cfg.seed))

    if init_params is None:
        state = jax.jit(lambda: init(None), out_shardings=shardings)()
    else:
        known = {lora_lib.plain_key(k) for k in structure.keys}
        unknown = sorted(set(init_params) - known)
        if unknown:
            raise ValueError(f"init parameters not in the model: {', '.join(unknown[:10])}")
        where = param_array_shardings(shardings)
        values = {k: jax.device_put(v, where[k]) for k, v in init_params.items()}
        state = jax.jit(init, out_shardings=shardings, donate_argnums=0)(values)
    return state, structure
