"""The assembled SegLLM replays the ORIGINAL's multi-round conversation (../shared/golden/segllm).

Every ``seed*.npz`` in ``SEGLLM_GOLDEN_SEGLLM`` is replayed through ``MultiRoundSession`` in both
incremental and recompute mode, with weights from the recipe loaded through the real converter
(release-layout folder). Nothing about the image, the seed or the number of rounds is assumed.
"""

from __future__ import annotations

import numpy as np
import pytest

from segllm_jax import checkpoint
from segllm_jax.session import MultiRoundSession
from segllm_jax.tokenizer import SegTokenizer

from .conftest import REPO, golden_files

pytestmark = pytest.mark.golden
FILES = golden_files()


def _close(name, ours, golden, rtol=1e-4):
    ours, golden = np.asarray(ours, np.float64), np.asarray(golden, np.float64)
    err = np.abs(ours - golden).max()
    scale = np.abs(golden).max()
    print(f"  {name:<22} max-abs {err:.2e}  rel {err / max(scale, 1e-30):.2e}")
    np.testing.assert_allclose(ours, golden, rtol=rtol, atol=rtol * scale, err_msg=name)


def _iou(a, b):
    return np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1)


@pytest.mark.skipif(not FILES, reason="no golden SegLLM files (set SEGLLM_GOLDEN_SEGLLM)")
@pytest.mark.parametrize("mode", ["incremental", "recompute"])
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_golden_multiround_replay(path, mode, golden_segllm_checkpoints):
    g = np.load(path)
    kind, cfg, model = checkpoint.load_model(golden_segllm_checkpoints(int(g["seed"])))
    assert kind == "segllm"
    ckpt = golden_segllm_checkpoints(int(g["seed"]))
    tokenizer = SegTokenizer.from_pretrained(ckpt)
    assert tokenizer.video_id == int(g["video_token_id"]) and tokenizer.seg_id == int(g["seg_token_id"])
    image = REPO.parent / "shared" / "images" / "wii.jpg"
    session = MultiRoundSession(model, image, tokenizer, mode=mode)
    np.testing.assert_array_equal(session.ctx.frame_u8, g["hipie_image_u8"].transpose(1, 2, 0))
    for k in range(1, int(g["num_rounds"]) + 1):
        text = str(g["round_texts"][k - 1])
        result = session.ask(text)
        print(f"round {k} ({mode}): {text!r}")
        np.testing.assert_array_equal(session._conversation.input_ids, g[f"r{k}_input_ids"])
        np.testing.assert_array_equal(session._conversation.seg_positions, g[f"r{k}_seg_positions"])
        _close("seg_prompt_hidden", result.prompt_hidden, g[f"r{k}_seg_prompt_hidden"][-1])
        _close("predictor_out", result.prompt.reshape(-1), g[f"r{k}_predictor_out"][-1])
        golden_mask = np.unpackbits(g[f"r{k}_masks_packed"][-1]).reshape(result.mask_frame.shape).astype(bool)
        iou = _iou(result.mask_frame, golden_mask)
        print(f"  mask IoU {iou:.6f}  area {result.mask_frame.sum()} vs {golden_mask.sum()}")
        assert iou >= 0.99
        np.testing.assert_allclose(result.box_frame, g[f"r{k}_boxes_xyxy"][-1], atol=0.05)
        np.testing.assert_allclose(result.score, g[f"r{k}_sel_score"][-1], atol=1e-4)
        np.testing.assert_array_equal(result.ref_box, g[f"r{k}_out_box_encode"])
        _close("out_mask_encode_crop", result.ref_crop, g[f"r{k}_out_mask_encode_crop"].transpose(1, 2, 0))
