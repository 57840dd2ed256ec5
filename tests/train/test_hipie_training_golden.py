"""HIPIE training forward + loss end to end vs the PyTorch training golden, and a jit/grad smoke test.

Golden part (``golden`` in every test name, ``@pytest.mark.golden``): every ``train_seed*_256.npz`` of
``SEGLLM_GOLDEN_HIPIE`` (default ``<repo>/../shared/golden/hipie``). Weights: the golden recipe (seed of the
file) through the real converter (main HIPIE table + ``dn_resizer_table``). Inputs: the image and prompts of
``seed<N>_256.npz``, the stored GT masks. README "Training golden":

* ``det``: no DN noise, no fusion dropout, the stored two-stage order forced (near-tie caveat), point uniforms
  U1/U2 regenerated exactly as the golden run drew them (``default_rng([0, 2024, k])``, shapes from
  ``det_draw_shapes``), importance selection done by the port;
* ``rand``: the stored DN draws, fusion-dropout keep masks and final sample points replayed, top-k free.

Checked: DN inputs, decoder references / hidden states, every layer's fg and DN heads, encoder proposals,
matched indices (exact), mask logits of the matched pairs, every weighted loss term (rel 1e-3), the total and
``iou_train``.
"""

from __future__ import annotations

import functools
import importlib.util
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hipie.conftest import build_random

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.model import Hipie
from segllm_jax.models.hipie.training import DNLabelEncoder
from segllm_jax.train.criterion import CriterionConfig, segllm_targets
from segllm_jax.train.denoising import flat_draws_to_padded
from segllm_jax.train.hipie_loss import HipieLossOptions, HipieReplay, device_targets, hipie_loss, hipie_loss_details

from .golden import REPO_ROOT, golden_dir, golden_params, pad_rows

LOSS_REL = 1e-3
ABS = 1e-3


GOLDEN = golden_params()


def _import_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ plumbing

@functools.lru_cache(maxsize=1)
def _model(seed: int) -> tuple[Hipie, DNLabelEncoder]:
    """Recipe weights (seed) -> .pth -> real converter -> (Hipie, DN label encoder)."""
    torch = pytest.importorskip("torch")
    from segllm_jax_convert.engine import convert, flat_targets, load_arrays
    from segllm_jax_convert.hipie import dn_resizer_table
    from segllm_jax_convert.io import open_checkpoint

    helpers = _import_path("hipie_train_golden_helpers", REPO_ROOT / "tests" / "hipie" / "hipie_helpers.py")
    recipe = _import_path("hipie_train_golden_recipe", golden_dir() / "make_state_dict.py")
    sd = recipe.make_state_dict(recipe.load_keys_json(golden_dir() / "state_dict_keys.json"), seed)
    pth = Path(tempfile.mkdtemp(prefix="hipie_train_golden_")) / "hipie.pth"
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, pth)
    del sd
    hipie = helpers.converted_hipie(str(pth))
    resizer = DNLabelEncoder(hipie.cfg, rngs=nnx.Rngs(0))
    load_arrays(resizer, convert(open_checkpoint(pth), dn_resizer_table(), flat_targets(resizer), progress=False))
    pth.unlink()
    return hipie, resizer


@functools.lru_cache(maxsize=2)
def _load(path: Path) -> dict[str, np.ndarray]:
    return dict(np.load(path))


def _inference_file(path: Path, d: dict) -> dict[str, np.ndarray]:
    inf = path.parent / f"seed{int(d['seed'])}_256.npz"
    if not inf.is_file():
        pytest.skip(f"{inf.name} (image + prompts of the training golden) not found")
    return _load(inf)


def _counts(d: dict, v: str, g: str, layer: int, batch: int) -> list[int]:
    return [len(d[f"{v}_idx_{g}_l{layer}_b{b}_src"]) for b in range(batch)]


def _call_layer(c: int, n_layers: int) -> int:
    """loss_masks call c of a group: 0 = final layer, 1.. = aux layers 0.."""
    return n_layers - 1 if c == 0 else c - 1


def _replay(d: dict, v: str, batch: int, n_layers: int, options: HipieLossOptions, counts_gt) -> HipieReplay:
    ks = {"fg": options.fg_slots, "gt": options.max_gt}
    if v == "det":
        shapes = d["det_draw_shapes"]
        draws = {}
        for c in range(2 * n_layers):
            g = "fg" if c < n_layers else "gt"
            layer = _call_layer(c % n_layers, n_layers)
            cnt = _counts(d, v, g, layer, batch)
            k1, k2 = 12 + 2 * c, 13 + 2 * c
            u1 = np.random.default_rng([0, 2024, k1]).random(tuple(shapes[k1]), dtype=np.float32)
            u2 = np.random.default_rng([0, 2024, k2]).random(tuple(shapes[k2]), dtype=np.float32)
            assert u1.shape[0] == sum(cnt) and u2.shape[0] == sum(cnt)
            draws[f"{g}_l{layer}"] = (jnp.asarray(pad_rows(u1, cnt, ks[g])), jnp.asarray(pad_rows(u2, cnt, ks[g])))
        return HipieReplay(draws=draws, topk_indices=jnp.asarray(d["det_topk_proposals"].astype(np.int32)))
    points = {}
    for g in ("fg", "gt"):
        for c in range(n_layers):
            layer = _call_layer(c, n_layers)
            cnt = _counts(d, v, g, layer, batch)
            points[f"{g}_l{layer}"] = jnp.asarray(pad_rows(d[f"{v}_points_{g}_call{c}"], cnt, ks[g]))
    sign = flat_draws_to_padded(d[f"{v}_dn_rand_sign01"].astype(np.int32), counts_gt, max_gt=options.max_gt)
    part = flat_draws_to_padded(d[f"{v}_dn_rand_part"].astype(np.float32), counts_gt, max_gt=options.max_gt)
    keep = []
    for i in range(2):
        shape = tuple(int(s) for s in d[f"{v}_dropout{i}_shape"])
        bits = np.unpackbits(d[f"{v}_dropout{i}_keep_packed"])[:int(np.prod(shape))]
        keep.append(jnp.asarray(bits.reshape(shape).astype(np.float32)))
    return HipieReplay(dn_draws=(jnp.asarray(sign), jnp.asarray(part)), fusion_keep=tuple(keep), points=points)


_details_jit = nnx.jit(hipie_loss_details, static_argnames=("options",))


@functools.lru_cache(maxsize=2)
def _run(path: Path, v: str):
    d = _load(path)
    inf = _inference_file(path, d)
    hipie, resizer = _model(int(d["seed"]))
    from segllm_jax.models.hipie.model import image_features_jit

    levels = image_features_jit(hipie, jnp.asarray(inf["input_image_u8"].transpose(1, 2, 0)[None]))
    prompts = jnp.asarray(inf["prompts"])
    batch = prompts.shape[0]
    n_layers = hipie.cfg.dec_layers
    tg = segllm_targets(d["gt_target_masks"], d["gt_prev_masks"])
    counts_gt = [int(c) for c in np.asarray(tg.valid).sum(1)]
    options = HipieLossOptions(box_noise_scale=0.0 if v == "det" else 1.0, fusion_dropout=(v == "rand"))
    replay = _replay(d, v, batch, n_layers, options, counts_gt)
    has_aux = jnp.asarray(d["gt_prev_masks"].reshape(batch, -1).any(1))
    det = _details_jit(hipie, resizer, levels, prompts, jnp.zeros(batch, jnp.int32),
                       jnp.asarray(d["gt_target_masks"]), jnp.asarray(d["gt_prev_masks"]), has_aux, None,
                       options=options, replay=replay)
    print(f"\n[{path.name} {v}]")
    return d, jax.device_get(det)


def _cmp(name: str, got, want, atol: float = ABS, rel_absmax: float = 0.0) -> float:
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != golden {want.shape}"
    err = float(np.abs(got - want).max()) if want.size else 0.0
    absmax = float(np.abs(want).max()) if want.size else 0.0
    tol = max(atol, rel_absmax * absmax)
    print(f"  {name:<34s} max|d|={err:.3e} absmax={absmax:.3e} tol={tol:.1e}")
    assert err <= tol, f"{name}: max|d| {err:.3e} > {tol:.1e}"
    return err


# ------------------------------------------------------------------------------------------ golden tests

@pytest.mark.golden
@pytest.mark.parametrize("golden_file,variant", GOLDEN)
def test_golden_training_forward(golden_file, variant) -> None:
    """DN inputs, decoder, per-layer heads of the fg and DN groups, encoder proposals (abs 1e-3)."""
    d, det = _run(golden_file, variant)
    v = variant
    fwd = det.forward
    _cmp("dn_label_enc", det.dn.label[:, 0], d["dn_label_enc"], 1e-4)
    _cmp("dn_input_query_bbox", det.dn.bbox_logit, d[f"{v}_dn_input_query_bbox"], 1e-4)
    np.testing.assert_array_equal(np.asarray(det.dn.attn_mask), d[f"{v}_dn_attn_mask"])
    np.testing.assert_array_equal(np.asarray(fwd.topk_indices), d[f"{v}_topk_proposals"])
    _cmp("dec_init_reference", fwd.init_reference, d[f"{v}_dec_init_reference"])
    _cmp("dec_inter_references", fwd.inter_references, d[f"{v}_dec_inter_references"])
    _cmp("dec_hs", fwd.hs, d[f"{v}_dec_hs"], rel_absmax=1e-4)
    for name, g in (("fg", "fg"), ("gt", "dn")):
        logits, boxes, ious = fwd.group(g)
        for layer in range(fwd.hs.shape[0]):
            _cmp(f"{name}_l{layer}_pred_logits", logits[layer], d[f"{v}_out_{name}_l{layer}_pred_logits"])
            _cmp(f"{name}_l{layer}_pred_boxes", boxes[layer], d[f"{v}_out_{name}_l{layer}_pred_boxes"])
            if f"{v}_out_{name}_l{layer}_pred_boxious" in d:
                _cmp(f"{name}_l{layer}_pred_boxious", ious[layer], d[f"{v}_out_{name}_l{layer}_pred_boxious"])
    _cmp("enc_pred_logits", fwd.enc_logits, d[f"{v}_out_enc_pred_logits"])
    _cmp("enc_pred_boxes", fwd.enc_boxes, d[f"{v}_out_enc_pred_boxes"])


@pytest.mark.golden
@pytest.mark.parametrize("golden_file,variant", GOLDEN)
def test_golden_training_indices_and_masks(golden_file, variant) -> None:
    """simOTA / DN / Hungarian indices exact; mask logits of the matched pairs (1e-4 of absmax, logits are
    raw-pixel large); the DN reference-point quirk is visible through the DN masks."""
    d, det = _run(golden_file, variant)
    v = variant
    n_layers, batch = det.fg_masks.shape[:2]
    for layer in range(n_layers):
        for b in range(batch):
            for name, idx, masks in (("fg", det.fg_indices, det.fg_masks), ("gt", det.dn_indices, det.dn_masks)):
                n = int(np.asarray(idx.valid[layer, b]).sum())
                np.testing.assert_array_equal(np.asarray(idx.src[layer, b, :n]), d[f"{v}_idx_{name}_l{layer}_b{b}_src"],
                                              err_msg=f"{name} src layer {layer} prompt {b}")
                np.testing.assert_array_equal(np.asarray(idx.tgt[layer, b, :n]), d[f"{v}_idx_{name}_l{layer}_b{b}_tgt"],
                                              err_msg=f"{name} tgt layer {layer} prompt {b}")
                _cmp(f"{name}_l{layer}_b{b}_pred_masks", masks[layer, b, :n],
                     d[f"{v}_out_{name}_l{layer}_b{b}_pred_masks"],
                     rel_absmax=1e-4)
    for b in range(batch):
        n = int(np.asarray(det.enc_indices.valid[b]).sum())
        np.testing.assert_array_equal(np.asarray(det.enc_indices.src[b, :n]), d[f"{v}_idx_enc_b{b}_src"])
        np.testing.assert_array_equal(np.asarray(det.enc_indices.tgt[b, :n]), d[f"{v}_idx_enc_b{b}_tgt"])


@pytest.mark.golden
@pytest.mark.parametrize("golden_file,variant", GOLDEN)
def test_golden_training_losses(golden_file, variant) -> None:
    """Every weighted loss term within rel 1e-3 of the original; total (+ prompt L2) and iou_train."""
    d, det = _run(golden_file, variant)
    v = variant
    keys = [str(k) for k in d[f"{v}_loss_weighted_keys"]]
    want = dict(zip(keys, d[f"{v}_loss_weighted"].astype(np.float64), strict=True))
    worst = 0.0
    for k, w in want.items():
        if k in ("total_loss", "iou_train"):
            continue
        assert k in det.metrics, f"missing loss term {k}"
        got = float(det.metrics[k])
        rel = abs(got - w) / abs(w) if w != 0 else abs(got)
        worst = max(worst, rel)
        assert rel <= LOSS_REL if w != 0 else abs(got) <= 1e-6, f"{k}: {got} vs golden {w} (rel {rel:.2e})"
    extra = set(det.metrics) - set(want) - {"loss_hipie", "prompt_l2"}
    assert not extra, f"terms the original does not produce: {sorted(extra)}"
    total = float(det.loss) + float(det.metrics["prompt_l2"])
    print(f"  worst per-term rel {worst:.2e}; total {total:.4f} vs {want['total_loss']:.4f}; "
          f"iou_train {float(det.metrics['iou_train']):.6f} vs {want['iou_train']:.6f}")
    assert abs(total - want["total_loss"]) <= LOSS_REL * abs(want["total_loss"])
    assert abs(float(det.metrics["prompt_l2"]) - float(d[f"{v}_loss_prompt_l2"])) <= 1e-6
    assert abs(float(det.metrics["iou_train"]) - want["iou_train"]) <= 1e-3


@pytest.mark.golden
@pytest.mark.parametrize("golden_file", [p.values[0] for p in GOLDEN[::2]])
def test_golden_device_targets(golden_file) -> None:
    """The jit-able GT builder equals the host ``segllm_targets`` on the golden masks."""
    if golden_file is None:
        pytest.skip("no training golden")
    d = _load(golden_file)
    host = segllm_targets(d["gt_target_masks"], d["gt_prev_masks"])
    dev = device_targets(jnp.asarray(d["gt_target_masks"]), jnp.asarray(d["gt_prev_masks"]),
                         jnp.ones(d["gt_target_masks"].shape[0], bool))
    for a, b in zip(dev, host, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------- jit + grad (tiny)

def _tiny_model(cfg: HipieConfig) -> dict[str, nnx.Module]:
    """Tiny ``{"hipie": Hipie, "dn_resizer": DNLabelEncoder}`` with N(0, .) weights, built abstractly (fast)
    like the HIPIE tests do."""
    return build_random(lambda: {"hipie": Hipie(cfg, rngs=nnx.Rngs(0)), "dn_resizer": DNLabelEncoder(
        cfg, rngs=nnx.Rngs(0))}, seed=0)


@functools.lru_cache(maxsize=1)
def _tiny_inputs():
    """(cfg, model, levels, prompts [2, 8, 48], target masks, aux masks) on a 64x64 random image."""
    cfg = HipieConfig.tiny()
    model = _tiny_model(cfg)
    s, b = 64, 2
    levels = nnx.jit(lambda m, x: m.image_features(x))(
        model["hipie"], jnp.asarray(np.random.default_rng(0).integers(0, 255, (1, s, s, 3), dtype=np.uint8)))
    prompts = jnp.asarray(np.random.default_rng(1).normal(0, 1, (b, 8, cfg.text_dim)).astype(np.float32))
    yy, xx = np.mgrid[:s, :s]
    tm = np.stack([(abs(xx - 20) < 8) & (abs(yy - 30) < 10), (abs(xx - 40) < 12) & (abs(yy - 20) < 6)])
    am = np.stack([(abs(xx - 40) < 8) & (abs(yy - 40) < 10), np.zeros((s, s), bool)])
    return cfg, model, levels, prompts, tm, am


def test_hipie_loss_jit_grad_tiny() -> None:
    """``jax.jit(jax.value_and_grad(hipie_loss))`` on the tiny config: finite loss, finite non-zero gradients
    for the prompts and the decoder-side / fusion parameters (DN noise, dropout and points from the key)."""
    cfg, model, levels, prompts, tm, am = _tiny_inputs()
    b = prompts.shape[0]
    has_aux = jnp.asarray([True, False])  # batch max 2 GT; prompt 1 has one (DN padding slots in use)
    options = HipieLossOptions(k_fg=4, criterion=CriterionConfig(num_points=256))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params, prompts, key):
        m = nnx.merge(graphdef, params, rest)
        return hipie_loss(m["hipie"], m["dn_resizer"], levels, prompts, jnp.zeros(b, jnp.int32),
                          jnp.asarray(tm.astype(np.uint8)), jnp.asarray(am.astype(np.uint8)), has_aux, key,
                          options=options)

    (loss, metrics), (g_params, g_prompts) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        params, prompts, jax.random.key(0))
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert 0.0 <= float(metrics["iou_train"]) <= 1.0
    assert "loss_ce_enc" in metrics and "loss_mask_0" in metrics and "loss_boxiou_0" in metrics
    assert np.all(np.isfinite(np.asarray(g_prompts))) and float(jnp.abs(g_prompts).sum()) > 0
    flat = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g_params)}
    assert all(np.all(np.isfinite(x)) for x in flat.values())
    for must in ("dn_resizer/fc/kernel", "hipie/controller/layers/0/kernel", "hipie/fusion/gamma_l",
                 "hipie/decoder/two_stage/tgt_embed/embedding", "hipie/class_embed/0/bias0",
                 "hipie/bbox_embed/0/layers/0/kernel", "hipie/iou_head/0/kernel", "hipie/mask_head/lay2/kernel",
                 "hipie/encoder/layers/0/linear1/kernel"):
        assert float(np.abs(flat[must]).sum()) > 0, f"zero gradient for {must}"


def test_extra_dn_slots_are_invisible_tiny() -> None:
    """Static DN layout (2G slots) with a batch maximum M = 1 < G = 2: the hidden extra slots leave the real DN
    slots and every matching query exactly as the original's 2M-slot layout computes them."""
    from segllm_jax.models.hipie.training import training_forward
    from segllm_jax.train.denoising import draw_dn_noise, prepare_dn_queries
    from segllm_jax.train.hipie_loss import hide_extra_dn_slots

    cfg, model, levels, prompts, tm, am = _tiny_inputs()
    b = prompts.shape[0]
    tg = device_targets(jnp.asarray(tm), jnp.asarray(am), jnp.zeros(b, bool))  # one GT per prompt -> M = 1
    nq = cfg.num_bg_queries + cfg.num_queries
    sign, part = draw_dn_noise(jax.random.key(3), 1, b, 2)  # [2, B, 2, 4]

    @nnx.jit
    def run(m, lab, box, mask):
        return training_forward(m, levels, prompts, jnp.zeros(b, jnp.int32), lab, box, mask,
                               deterministic=True)

    label = model["dn_resizer"](prompts)
    dn2 = prepare_dn_queries(tg.boxes, tg.valid, label, num_queries=nq, draws=(sign, part))
    mask2, extra = hide_extra_dn_slots(dn2, tg.valid)
    np.testing.assert_array_equal(np.asarray(extra), [False, True, False, True])
    dn1 = prepare_dn_queries(tg.boxes[:, :1], tg.valid[:, :1], label, num_queries=nq,
                             draws=(sign[:, :, :1], part[:, :, :1]))
    out2 = run(model["hipie"], dn2.label, dn2.bbox_logit, mask2)
    out1 = run(model["hipie"], dn1.label, dn1.bbox_logit, dn1.attn_mask)
    keep = np.asarray([0, 2] + list(range(4, 4 + nq)))  # real slots (pos 0, neg 0) + matching queries
    np.testing.assert_allclose(np.asarray(out2.hs)[:, :, keep], np.asarray(out1.hs), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out2.inter_references)[:, :, keep], np.asarray(out1.inter_references),
                               atol=2e-6)
