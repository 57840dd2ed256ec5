"""Public entry point: input validation, implementation dispatch, custom VJP.

``ms_deform_attn`` keeps the PyTorch op's layout so that ported modules can call
it with the tensors they already have.  The Pallas kernels have no autodiff,
so each backend provides a forward and a backward kernel that are glued
together with ``jax.custom_vjp``.  The blocked pure-JAX path (``xla.py``) has its
own custom VJP (so that its backward is blocked too); the dense reference is
differentiated by JAX itself.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ms_deform_attn.reference import SpatialShapes, ms_deform_attn_dense
from pallas_kernels.ms_deform_attn.xla import ms_deform_attn_xla

Impl = Literal["auto", "xla", "xla_dense", "pallas", "pallas_gpu", "pallas_tpu"]
IMPLS: tuple[str, ...] = ("auto", "xla", "xla_dense", "pallas", "pallas_gpu", "pallas_tpu")
_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float64))


def _normalise_spatial_shapes(spatial_shapes: Any) -> SpatialShapes:
    try:
        shapes = np.asarray(spatial_shapes)
    except jax.errors.TracerArrayConversionError as err:
        raise ValueError(
            "spatial_shapes must be static (a tuple of (H_l, W_l)), not a traced array"
        ) from err
    if shapes.ndim != 2 or shapes.shape[1] != 2 or shapes.shape[0] == 0:
        raise ValueError(f"spatial_shapes must have shape [L, 2] with L >= 1, got {shapes.shape}")
    out = tuple((int(h), int(w)) for h, w in shapes)
    if any(h <= 0 or w <= 0 for h, w in out):
        raise ValueError(f"spatial_shapes entries must be positive, got {out}")
    return out


def _check_level_start_index(level_start_index: Any, spatial_shapes: SpatialShapes) -> tuple[int, ...]:
    """Returns the exclusive prefix sums; a concrete argument must equal them."""
    expected = tuple(int(s) for s in np.cumsum([0] + [h * w for h, w in spatial_shapes])[:-1])
    try:
        given = np.asarray(level_start_index)
    except jax.errors.TracerArrayConversionError:
        return expected  # traced under jit: it can only be the prefix sums, use the static ones
    if given.shape != (len(spatial_shapes),) or tuple(int(s) for s in given) != expected:
        raise ValueError(
            f"level_start_index must be the exclusive prefix sums of H_l*W_l, {expected}, "
            f"got {given.tolist()} (shape {given.shape})"
        )
    return expected


def _validate(
    value: jax.Array,
    spatial_shapes: SpatialShapes,
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
) -> None:
    for name, arr in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if jnp.dtype(arr.dtype) not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating array (f32/bf16/f16/f64), got dtype {arr.dtype}")
    if value.ndim != 4:
        raise ValueError(f"value must have shape [B, S, H, Dh], got {value.shape}")
    batch, seq, heads, _ = value.shape
    total = sum(h * w for h, w in spatial_shapes)
    if seq != total:
        raise ValueError(
            f"value has S={seq} rows (shape {value.shape}) but spatial_shapes {spatial_shapes} sum to {total}"
        )
    levels = len(spatial_shapes)
    if (
        sampling_locations.ndim != 6
        or sampling_locations.shape[0] != batch
        or sampling_locations.shape[2] != heads
        or sampling_locations.shape[3] != levels
        or sampling_locations.shape[5] != 2
    ):
        raise ValueError(
            f"sampling_locations must have shape [B={batch}, Q, H={heads}, L={levels}, P, 2], "
            f"got {sampling_locations.shape}"
        )
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(
            f"attention_weights must have shape {sampling_locations.shape[:5]} ([B, Q, H, L, P]), "
            f"got {attention_weights.shape}"
        )


def _resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl == "auto":
        return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla")
    if impl == "pallas":
        # On CPU this is the GPU kernel in interpret mode.
        return "pallas_tpu" if backend == "tpu" else "pallas_gpu"
    return impl


def _kernel_module(impl: str) -> Any:
    # Imported lazily: Pallas/Mosaic imports are not free and the xla path needs neither.
    if impl == "pallas_gpu":
        from pallas_kernels.ms_deform_attn import gpu

        return gpu
    from pallas_kernels.ms_deform_attn import tpu

    return tpu


def _batch_folding_kernel(impl: str, entry: str, spatial_shapes: SpatialShapes, starts: tuple[int, ...]):
    """A kernel entry point whose ``vmap`` folds the mapped axis into the batch axis.

    Every kernel operand and result has the batch axis first, so a vmapped
    call is the same kernel on ``N * B`` items.  This avoids Pallas' generic
    batching rule, which adds a grid axis (and would need the TPU
    ``dimension_semantics`` to grow with it) and launches a bigger grid anyway.
    """
    fn = getattr(_kernel_module(impl), entry)

    @jax.custom_batching.custom_vmap
    def call(*arrays: jax.Array) -> Any:
        return fn(arrays[0], spatial_shapes, starts, *arrays[1:])

    @call.def_vmap
    def _fold(axis_size: int, in_batched: list[bool], *arrays: jax.Array) -> tuple[Any, Any]:
        arrays = tuple(a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
                       for a, batched in zip(arrays, in_batched, strict=True))
        out = call(*(a.reshape(axis_size * a.shape[1], *a.shape[2:]) for a in arrays))

        def unfold(o: jax.Array) -> jax.Array:
            return o.reshape(axis_size, o.shape[0] // axis_size, *o.shape[1:])

        return jax.tree.map(unfold, out), jax.tree.map(lambda _: True, out)

    return call


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _pallas_msda(
    impl: str,
    spatial_shapes: SpatialShapes,
    level_start_index: tuple[int, ...],
    value: jax.Array,
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
) -> jax.Array:  # [B, Q, H, Dh]
    forward = _batch_folding_kernel(impl, "forward", spatial_shapes, level_start_index)
    return forward(value, sampling_locations, attention_weights)


def _pallas_msda_fwd(impl, spatial_shapes, level_start_index, value, sampling_locations, attention_weights):
    out = _pallas_msda(impl, spatial_shapes, level_start_index, value, sampling_locations, attention_weights)
    return out, (value, sampling_locations, attention_weights)


def _pallas_msda_bwd(impl, spatial_shapes, level_start_index, residuals, grad_out):
    backward = _batch_folding_kernel(impl, "backward", spatial_shapes, level_start_index)
    return backward(*residuals, grad_out)


_pallas_msda.defvjp(_pallas_msda_fwd, _pallas_msda_bwd)


def ms_deform_attn(
    value: jax.Array,  # [B, S, H, Dh]
    spatial_shapes: Sequence[tuple[int, int]],
    level_start_index: Sequence[int],
    sampling_locations: jax.Array,  # [B, Q, H, L, P, 2]
    attention_weights: jax.Array,  # [B, Q, H, L, P]
    *,
    impl: Impl = "auto",
) -> jax.Array:  # [B, Q, H * Dh]
    """Multi-scale deformable attention core (Deformable-DETR ``MSDeformAttnFunction``).

    ``out[b, q, h*Dh:(h+1)*Dh] = sum_{l,p} aw[b,q,h,l,p] * bilerp(V[b,l,h], loc[b,q,h,l,p])``
    with ``grid_sample(align_corners=False, padding_mode="zeros")`` bilinear
    sampling; ``loc`` is normalised (x, y).  Output dtype is ``value.dtype``;
    accumulation is float32 (float64 for float64 inputs).

    Args:
      value: ``[B, S, H, Dh]``, ``S = sum_l H_l * W_l`` (levels row-major, concatenated).
      spatial_shapes: static ``((H_0, W_0), ...)``.
      level_start_index: exclusive prefix sums of ``H_l * W_l``; checked when concrete.
      sampling_locations: ``[B, Q, H, L, P, 2]``.
      attention_weights: ``[B, Q, H, L, P]``.
      impl: ``"xla"`` (pure JAX in query blocks, bounded memory), ``"xla_dense"`` (the
        all-queries-at-once reference, for tests and before/after benchmarks), ``"pallas"`` (kernel for
        this backend; on CPU the GPU kernel in interpret mode), ``"pallas_gpu"`` / ``"pallas_tpu"`` (a
        specific kernel, interpret mode off-device), or ``"auto"`` (pallas on GPU/TPU, xla elsewhere).
    """
    shapes = _normalise_spatial_shapes(spatial_shapes)
    starts = _check_level_start_index(level_start_index, shapes)
    _validate(value, shapes, sampling_locations, attention_weights)
    resolved = _resolve_impl(impl)
    if resolved == "xla":
        return ms_deform_attn_xla(value, shapes, starts, sampling_locations, attention_weights)
    if resolved == "xla_dense":
        return ms_deform_attn_dense(value, shapes, starts, sampling_locations, attention_weights)
    batch, num_queries, heads = sampling_locations.shape[:3]
    out = _pallas_msda(resolved, shapes, starts, value, sampling_locations, attention_weights)
    return out.reshape(batch, num_queries, heads * value.shape[-1])
