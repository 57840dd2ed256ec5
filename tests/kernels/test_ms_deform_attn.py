"""Multi-scale deformable attention: reference vs transformers, Pallas kernels vs reference.

The Pallas kernels run in interpret mode on CPU (``impl="pallas"`` is the
Triton GPU kernel, ``impl="pallas_tpu"`` the Mosaic TPU kernel under
``pltpu.InterpretParams``), so shapes are kept tiny.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

from pallas_kernels.ms_deform_attn import ms_deform_attn, ms_deform_attn_dense, ms_deform_attn_xla
from pallas_kernels.ms_deform_attn.api import _resolve_impl
from pallas_kernels.ms_deform_attn.xla import query_block_size

KERNELS = ("pallas", "pallas_tpu")
ALL_IMPLS = ("xla", "xla_dense") + KERNELS
# Non-square levels, a 1x1 level, and a width-1 level.
SHAPES = ((6, 8), (3, 4), (2, 1), (1, 1))


def _starts(shapes) -> tuple[int, ...]:
    return tuple(int(s) for s in np.cumsum([0] + [h * w for h, w in shapes])[:-1])


def _inputs(shapes, batch=2, queries=5, heads=2, head_dim=6, points=3, seed=0, low=-0.1, high=1.1, dtype=np.float32):
    """Random value/locations/weights; head_dim=6 and points=3 are deliberately not powers of two
    (the Triton kernel pads them); kernel tests about other things use points=2 to compile faster."""
    rng = np.random.default_rng(seed)
    seq = sum(h * w for h, w in shapes)
    value = rng.standard_normal((batch, seq, heads, head_dim)).astype(dtype)
    loc = rng.uniform(low, high, (batch, queries, heads, len(shapes), points, 2)).astype(dtype)
    aw = rng.random((batch, queries, heads, len(shapes), points)).astype(dtype)
    return value, loc, aw


def _torch_msda(shapes, value, loc, aw) -> np.ndarray:
    out = multi_scale_deformable_attention(
        torch.from_numpy(np.array(value, np.float32)),
        [tuple(s) for s in shapes],
        torch.from_numpy(np.array(loc, np.float32)),
        torch.from_numpy(np.array(aw, np.float32)),
    )
    return out.numpy()


def _rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def _grads(impl, shapes, value, loc, aw, cotangent):
    def loss(v, loc, a):
        return jnp.sum(ms_deform_attn(v, shapes, _starts(shapes), loc, a, impl=impl) * cotangent)

    return jax.grad(loss, argnums=(0, 1, 2))(value, loc, aw)


@pytest.mark.parametrize("impl", ["xla", "xla_dense"])
def test_xla_forward_and_grads_match_transformers(impl):
    shapes = ((32, 32), (16, 16), (8, 8), (4, 4))  # SegLLM's level ratios, scaled down
    value, loc, aw = _inputs(shapes, batch=2, queries=40, heads=8, head_dim=32, points=4)
    out = ms_deform_attn(value, shapes, _starts(shapes), loc, aw, impl=impl)
    expected = _torch_msda(shapes, value, loc, aw)
    assert out.shape == (2, 40, 8 * 32)
    assert _rel_err(out, expected) <= 1e-5

    cotangent = np.random.default_rng(1).standard_normal(expected.shape).astype(np.float32)
    tensors = [torch.from_numpy(x).requires_grad_() for x in (value, loc, aw)]
    out = multi_scale_deformable_attention(tensors[0], list(shapes), tensors[1], tensors[2])
    (out * torch.from_numpy(cotangent)).sum().backward()
    for got, t in zip(_grads(impl, shapes, value, loc, aw, cotangent), tensors, strict=True):
        assert _rel_err(got, t.grad.numpy()) <= 1e-5


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_forward_matches_transformers(impl):
    value, loc, aw = _inputs(SHAPES)
    out = ms_deform_attn(value, SHAPES, _starts(SHAPES), loc, aw, impl=impl)
    assert out.shape == (2, 5, 2 * 6)
    assert _rel_err(out, _torch_msda(SHAPES, value, loc, aw)) <= 1e-5


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_grads_match_reference(impl):
    value, loc, aw = _inputs(SHAPES, seed=2)
    cotangent = np.random.default_rng(3).standard_normal((2, 5, 12)).astype(np.float32)
    expected = _grads("xla", SHAPES, value, loc, aw, cotangent)
    got = _grads(impl, SHAPES, value, loc, aw, cotangent)
    for name, g, e in zip(("value", "sampling_locations", "attention_weights"), got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        assert _rel_err(g, e) <= 1e-5, name


def _off_lattice_locations(shapes, batch, queries, heads, points, rng) -> np.ndarray:
    """Locations whose pixel coordinates stay >= 0.1 px from cell edges (floor is not differentiable there)."""
    locs = []
    for height, width in shapes:
        size = np.array([width, height], np.float64)
        cell = rng.integers(-1, np.maximum(size, 1) + 1, (batch, queries, heads, points, 2))
        frac = rng.uniform(0.1, 0.9, cell.shape)
        locs.append((cell + frac + 0.5) / size)
    return np.stack(locs, axis=3)


@pytest.mark.parametrize(
    "impl,dtype,eps,tol",
    # The TPU kernel computes in float32 (TPUs have no float64): checked in float32, looser.
    [("xla", "float64", 1e-4, 1e-5), ("pallas", "float64", 1e-4, 1e-5), ("pallas_tpu", "float32", 1e-3, 1e-2)],
)
def test_check_grads_numerically(impl, dtype, eps, tol):
    shapes = ((3, 4), (1, 2))
    rng = np.random.default_rng(4)
    with jax.enable_x64(dtype == "float64"):
        value = jnp.asarray(rng.standard_normal((1, 14, 2, 3)), dtype)
        loc = jnp.asarray(_off_lattice_locations(shapes, 1, 3, 2, 2, rng), dtype)
        aw = jnp.asarray(rng.random((1, 3, 2, 2, 2)), dtype)
        fn = functools.partial(ms_deform_attn, spatial_shapes=shapes, level_start_index=_starts(shapes), impl=impl)
        assert fn(value, sampling_locations=loc, attention_weights=aw).dtype == jnp.dtype(dtype)
        jax.test_util.check_grads(
            lambda v, loc, a: fn(v, sampling_locations=loc, attention_weights=a),
            (value, loc, aw),
            order=1,
            modes=("rev",),
            eps=eps,
            atol=tol,
            rtol=tol,
        )


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_exact_lattice_and_border_locations(impl):
    shapes = ((2, 3), (1, 1))
    value = np.arange(1, 8, dtype=np.float32).reshape(1, 7, 1, 1)  # level 0 rows 1..6, level 1 row 7
    # Level-0 samples (one point each, other level weight 0):
    #   pixel centre of (y=1, x=2) -> exactly value 6; loc (0, 0) -> 0.25 * corner (0, 0) = 0.25;
    #   loc (1, 1) -> 0.25 * corner (1, 2) = 1.5; loc (1, 0.5) -> half of the last column: 0.5 * (3 + 6) / 2;
    #   far outside -> 0.
    level0 = [((2.5 / 3, 1.5 / 2), 6.0), ((0.0, 0.0), 0.25), ((1.0, 1.0), 1.5), ((1.0, 0.5), 2.25), ((-3.0, 2.0), 0.0)]
    # Level-1 (1x1): centre -> 7, on the border x = 1 -> 3.5, exactly outside by half a pixel -> 0.
    level1 = [((0.5, 0.5), 7.0), ((1.0, 0.5), 3.5), ((1.5, 0.5), 0.0)]
    queries = len(level0) + len(level1)
    loc = np.zeros((1, queries, 1, 2, 1, 2), np.float32)
    aw = np.zeros((1, queries, 1, 2, 1), np.float32)
    expected = []
    for q, (level, (xy, want)) in enumerate([(0, s) for s in level0] + [(1, s) for s in level1]):
        loc[0, q, 0, level, 0] = xy
        aw[0, q, 0, level, 0] = 1.0
        expected.append(want)
    out = ms_deform_attn(value, shapes, _starts(shapes), loc, aw, impl=impl)
    np.testing.assert_allclose(np.asarray(out)[0, :, 0], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, _torch_msda(shapes, value, loc, aw), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize(
    "shapes,queries",
    [(((5, 3),), 4), (SHAPES, 1)],
    ids=["one_level", "one_query"],
)
def test_kernel_small_configs(impl, shapes, queries):
    value, loc, aw = _inputs(shapes, batch=1, queries=queries, points=2, low=-0.3, high=1.3, seed=5)
    out = ms_deform_attn(value, shapes, _starts(shapes), loc, aw, impl=impl)
    assert _rel_err(out, _torch_msda(shapes, value, loc, aw)) <= 1e-5
    cotangent = np.ones(out.shape, np.float32)
    expected = _grads("xla", shapes, value, loc, aw, cotangent)
    for g, e in zip(_grads(impl, shapes, value, loc, aw, cotangent), expected, strict=True):
        assert _rel_err(g, e) <= 1e-5


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_bfloat16_inputs(impl):
    value, loc, aw = _inputs(SHAPES, points=2, seed=6)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (value, loc, aw)]
    out = ms_deform_attn(bf16[0], SHAPES, _starts(SHAPES), bf16[1], bf16[2], impl=impl)
    assert out.dtype == jnp.bfloat16
    # Same bf16 inputs evaluated in float32: only the final bf16 rounding may differ.
    expected = _torch_msda(SHAPES, *[np.asarray(x.astype(jnp.float32)) for x in bf16])
    assert _rel_err(out.astype(jnp.float32), expected) <= 2**-8
    grads = _grads(impl, SHAPES, *bf16, jnp.ones(out.shape, jnp.bfloat16))
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    expected_grads = _grads("xla", SHAPES, *[x.astype(jnp.float32) for x in bf16], jnp.ones(out.shape))
    for g, e in zip(grads, expected_grads, strict=True):
        assert _rel_err(g.astype(jnp.float32), e) <= 2**-7


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_jit_and_vmap(impl):
    value, loc, aw = _inputs(SHAPES, batch=1, queries=3, points=2, seed=7)
    stacked = [np.stack([x, 2 * x]) for x in (value, loc, aw)]  # extra leading axis of size 2
    fn = jax.jit(functools.partial(ms_deform_attn, spatial_shapes=SHAPES, level_start_index=_starts(SHAPES), impl=impl))
    batched = jax.vmap(lambda v, loc, a: fn(v, sampling_locations=loc, attention_weights=a))(*stacked)
    for i in range(2):
        expected = _torch_msda(SHAPES, stacked[0][i], stacked[1][i], stacked[2][i])
        assert _rel_err(batched[i], expected) <= 1e-5


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_shard_map_over_batch(impl):
    if len(jax.devices()) < 2:
        pytest.skip("needs >= 2 devices (tests/conftest.py forces 8 CPU devices)")
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    value, loc, aw = _inputs(SHAPES, batch=2, queries=3, points=2, seed=8)
    starts = _starts(SHAPES)

    # JAX's HLO interpreter (used for the Triton kernel off-GPU) does not track
    # varying mesh axes inside the kernel body, so that one case runs unchecked.
    check_vma = impl != "pallas"

    @jax.jit
    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data"), check_vma=check_vma
    )
    def sharded(v, loc, a):
        return ms_deform_attn(v, SHAPES, starts, loc, a, impl=impl)

    args = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (value, loc, aw)]
    out = sharded(*args)
    assert out.sharding.spec == P("data")
    assert _rel_err(out, _torch_msda(SHAPES, value, loc, aw)) <= 1e-5
    grads = jax.grad(lambda v, loc, a: jnp.sum(sharded(v, loc, a) ** 2), argnums=(0, 1, 2))(*args)
    expected = _grads("xla", SHAPES, value, loc, aw, 2 * np.asarray(out))
    for g, e in zip(grads, expected, strict=True):
        assert _rel_err(g, e) <= 1e-5


def test_auto_resolves_to_xla_on_cpu():
    assert jax.default_backend() == "cpu"
    assert _resolve_impl("auto") == "xla"
    assert _resolve_impl("pallas") == "pallas_gpu"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(value=np.zeros((2, 50, 2, 6))), r"value has S=50"),
        (dict(value=np.zeros((2, 56, 6))), r"value must have shape \[B, S, H, Dh\]"),
        (dict(loc=np.zeros((2, 5, 2, 3, 3, 2))), r"sampling_locations must have shape \[B=2, Q, H=2, L=4, P, 2\]"),
        (dict(aw=np.zeros((2, 5, 2, 4, 2))), r"attention_weights must have shape \(2, 5, 2, 4, 3\)"),
        (dict(starts=(0, 48, 60, 61)), r"level_start_index must be the exclusive prefix sums"),
        (dict(shapes=((6, 8, 1),)), r"spatial_shapes must have shape \[L, 2\]"),
        (dict(value=np.zeros((2, 63, 2, 6), np.int32)), r"value must be a floating array"),
        (dict(impl="cuda"), r"impl must be one of"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    value, loc, aw = _inputs(SHAPES)
    args = dict(value=value, shapes=SHAPES, starts=_starts(SHAPES), loc=loc, aw=aw, impl="xla") | kwargs
    with pytest.raises(ValueError, match=match):
        ms_deform_attn(args["value"], args["shapes"], args["starts"], args["loc"], args["aw"], impl=args["impl"])


def _blocked_and_dense(shapes, value, loc, aw, cotangent, block_bytes):
    """(out, grads) of the blocked path with a given budget and of the dense reference."""
    starts = _starts(shapes)

    def run(fn):
        out, pull_back = jax.vjp(lambda v, loc, a: fn(v, shapes, starts, loc, a), value, loc, aw)
        return out, pull_back(jnp.asarray(cotangent, out.dtype))

    blocked = functools.partial(ms_deform_attn_xla, block_bytes=block_bytes)
    return run(jax.jit(blocked, static_argnums=(1, 2))), run(jax.jit(ms_deform_attn_dense, static_argnums=(1, 2)))


@pytest.mark.parametrize(
    "queries,block_q",
    # one block (budget >= everything), whole blocks only, whole blocks + a shorter last one, 8-query minimum
    [(40, 40), (40, 10), (45, 10), (45, 1)],
    ids=["one_block", "whole_blocks", "with_tail", "min_block"],
)
def test_blocked_xla_equals_dense_reference(queries, block_q):
    """Forward bitwise equal to the dense reference; gradients equal up to float32 summation order."""
    shapes = ((16, 16), (8, 8), (4, 4), (2, 2))
    value, loc, aw = _inputs(shapes, batch=2, queries=queries, heads=4, head_dim=8, points=4, low=-0.05, high=1.05)
    per_query = 2 * 4 * (4 * 4 * 4) * 8 * 4  # B * H * K * Dh * itemsize
    cotangent = np.random.default_rng(9).standard_normal((2, queries, 4 * 8)).astype(np.float32)
    (out, grads), (ref_out, ref_grads) = _blocked_and_dense(shapes, value, loc, aw, cotangent, block_q * per_query)
    np.testing.assert_array_equal(out, ref_out)
    for name, g, e in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        assert _rel_err(g, e) <= 1e-6, name


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_blocked_xla_other_dtypes(dtype):
    """bf16: same forward as the dense reference; its gradients accumulate grad_value in float32
    (the dense one rounds each scatter-add to bf16), so they are compared to float32 instead.
    float64: both paths compute in float64."""
    shapes = ((6, 8), (3, 4))
    value, loc, aw = _inputs(shapes, batch=1, queries=21, heads=2, head_dim=4, points=2, seed=10)
    cotangent = np.random.default_rng(11).standard_normal((1, 21, 8))
    with jax.enable_x64(dtype == "float64"):
        args = [jnp.asarray(x, dtype) for x in (value, loc, aw)]
        (out, grads), (ref_out, ref_grads) = _blocked_and_dense(shapes, *args, cotangent, block_bytes=1)
        assert out.dtype == jnp.dtype(dtype) and [g.dtype for g in grads] == [jnp.dtype(dtype)] * 3
        np.testing.assert_array_equal(np.asarray(out, np.float64), np.asarray(ref_out, np.float64))
        if dtype == "float64":
            for g, e in zip(grads, ref_grads, strict=True):
                assert _rel_err(g, e) <= 1e-12
            return
        exact = _grads("xla_dense", shapes, *[x.astype(jnp.float32) for x in args], cotangent.astype(np.float32))
        for g, e in zip(grads, exact, strict=True):
            assert _rel_err(g.astype(jnp.float32), e) <= 2**-8


def test_query_block_size_follows_the_budget():
    # HIPIE encoder, 1 and 8 images: K = 64 corners, Dh = 32, float32 -> 64 KiB of rows per query and image
    assert query_block_size(21760, 1, 8, 64, 32, 4, budget_bytes=16 * 2**20) == 256
    assert query_block_size(21760, 8, 8, 64, 32, 4, budget_bytes=16 * 2**20) == 32
    assert query_block_size(21760, 64, 8, 64, 32, 4, budget_bytes=16 * 2**20) == 8  # floor of 8 queries
    assert query_block_size(5, 1, 8, 64, 32, 4, budget_bytes=2**30) == 5  # never more than Q
    assert query_block_size(3, 64, 8, 64, 32, 4, budget_bytes=1) == 3


def test_blocked_xla_temporaries_do_not_grow_with_queries():
    """Compiled forward+backward temporaries: the blocked path holds one block of gathered rows
    (plus O(inputs) buffers), the dense one all of them (twice: once more as the residual)."""
    shapes = ((64, 64), (32, 32), (16, 16), (8, 8))
    seq = sum(h * w for h, w in shapes)
    value = jax.ShapeDtypeStruct((2, seq, 8, 32), jnp.float32)
    loc = jax.ShapeDtypeStruct((2, seq, 8, 4, 4, 2), jnp.float32)
    aw = jax.ShapeDtypeStruct((2, seq, 8, 4, 4), jnp.float32)
    rows_bytes = 2 * 8 * seq * 64 * 32 * 4  # every gathered row: 1.4 GiB

    def temp_bytes(impl):
        def loss(v, loc, a):
            return jnp.sum(ms_deform_attn(v, shapes, _starts(shapes), loc, a, impl=impl))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(value, loc, aw).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    inputs_bytes = sum(int(np.prod(x.shape)) * 4 for x in (value, loc, aw))
    assert temp_bytes("xla_dense") >= rows_bytes
    assert temp_bytes("xla") <= 16 * 2**20 * 2 + 3 * inputs_bytes  # <= 2 blocks + O(inputs): ~160 MiB, not 1.4 GiB


def _encoder_like_inputs(shapes, batch, heads, head_dim, points, sigma_px, seed):
    """Queries = every pixel of every level, sampling a few pixels around themselves (the encoder)."""
    rng = np.random.default_rng(seed)
    centres = np.concatenate([
        np.stack(np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h), -1).reshape(-1, 2) for h, w in shapes
    ])
    wh = np.array([[w, h] for h, w in shapes], np.float32)  # [L, 2]
    offsets = rng.normal(0.0, sigma_px, (batch, len(centres), heads, len(shapes), points, 2)) / wh[:, None, :]
    loc = (centres[None, :, None, None, None, :] + offsets).astype(np.float32)
    value = rng.standard_normal((batch, len(centres), heads, head_dim)).astype(np.float32)
    aw = rng.random((batch, len(centres), heads, len(shapes), points)).astype(np.float32)
    return value, loc, aw


def test_tpu_visit_table_is_the_exact_tile_range_of_the_valid_corners():
    from pallas_kernels.ms_deform_attn import tpu

    shapes = ((12, 20), (6, 10), (3, 5), (2, 3))
    _, loc, _ = _inputs(shapes, batch=2, queries=37, heads=3, points=2, low=-0.2, high=1.2, seed=12)
    loc[0, 3, 1, 2, 1] = np.nan  # a non-finite sample reaches nothing
    tiling = tpu.Tiling.make(shapes, _starts(shapes), 37, sum(h * w for h, w in shapes), 2, block_q=8, block_s=128)
    table = np.asarray(tpu.visit_table(tpu._head_major_locations(jnp.asarray(loc), tiling), tiling))
    table = table.reshape(2, 3, tiling.num_q_blocks, len(shapes), 2)
    for b in range(2):
        for h in range(3):
            for i in range(tiling.num_q_blocks):
                for level, ((height, width), start) in enumerate(zip(shapes, _starts(shapes), strict=True)):
                    xy = loc[b, i * 8 : (i + 1) * 8, h, level].reshape(-1, 2).astype(np.float64)
                    x, y = xy[:, 0] * width - 0.5, xy[:, 1] * height - 0.5
                    tiles = set()
                    for dy in (0, 1):
                        for dx in (0, 1):
                            cy, cx = np.floor(y) + dy, np.floor(x) + dx
                            ok = (cy >= 0) & (cy <= height - 1) & (cx >= 0) & (cx <= width - 1)
                            tiles |= set(((start + cy * width + cx)[ok] // 128).astype(int).tolist())
                    first, count = table[b, h, i, level]
                    expected = (min(tiles), len(range(min(tiles), max(tiles) + 1))) if tiles else (0, 0)
                    assert (first, count) == expected, (b, h, i, level)


def test_tpu_kernel_visits_only_reachable_tiles_and_matches_reference():
    """Small blocks (16 queries x 128 rows) so that the encoder-like samples reach few tiles:
    forward and all gradients must still equal the XLA path's."""
    from pallas_kernels.ms_deform_attn import tpu

    shapes = ((16, 16), (8, 8), (4, 4), (2, 2))
    starts, seq = _starts(shapes), sum(h * w for h, w in shapes)
    value, loc, aw = _encoder_like_inputs(shapes, batch=1, heads=1, head_dim=8, points=2, sigma_px=1.0, seed=13)
    blocks = dict(block_q=16, block_s=128)
    stats = tpu.visit_stats(jnp.asarray(loc), shapes, starts, seq, **blocks)
    assert stats["dense"] == 22 * 3 and stats["visited"] < 0.85 * stats["dense"]

    out = tpu.forward(value, shapes, starts, loc, aw, **blocks)  # [B, Q, H, Dh]
    expected, pull_back = jax.vjp(lambda v, loc, a: ms_deform_attn(v, shapes, starts, loc, a, impl="xla"),
                                  value, loc, aw)
    assert _rel_err(out.reshape(expected.shape), expected) <= 1e-5
    cotangent = np.random.default_rng(14).standard_normal(expected.shape).astype(np.float32)
    got = tpu.backward(value, shapes, starts, loc, aw, cotangent.reshape(out.shape), **blocks)
    for name, g, e in zip(("value", "sampling_locations", "attention_weights"), got, pull_back(cotangent), strict=True):
        assert _rel_err(g, e) <= 1e-5, name
