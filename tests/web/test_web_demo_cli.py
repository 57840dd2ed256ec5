"""``segllm-jax serve``: safe defaults, examples, lazy Gradio; no model and no server here."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from segllm_jax.apps.cli import build_parser


def test_import_segllm_jax_does_not_need_gradio():
    code = "import sys, segllm_jax, segllm_jax.apps.web_demo, segllm_jax.apps.cli; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_serve_defaults_to_loopback():
    args = build_parser().parse_args(["serve", "--checkpoint", "ckpt"])
    assert (args.host, args.port, args.mode, args.no_warmup) == ("127.0.0.1", 7860, "incremental", False)
    assert args.max_upload_mb > 0 and args.idle_timeout > 0 and args.max_sessions > 0


def test_exposure_warning():
    from segllm_jax.apps.web_demo import exposure_warning

    assert exposure_warning("127.0.0.1", 7860) is None and exposure_warning("localhost", 1) is None
    assert "WARNING" in exposure_warning("0.0.0.0", 7860) and "0.0.0.0:7860" in exposure_warning("0.0.0.0", 7860)


def test_example_images(tmp_path):
    from segllm_jax.apps.web_demo import example_images

    generated = example_images(tmp_path)
    assert len(generated) == 2 and all(Image.open(p).size == (256, 256) for p in generated)
    (tmp_path / "examples").mkdir()
    for name in ("b.jpg", "a.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "examples" / name)
    (tmp_path / "examples" / "README.txt").write_text("not an image")
    assert [p.rsplit("/", 1)[-1] for p in example_images(tmp_path)] == ["a.png", "b.jpg"]
    assert example_images(None, generate=0) == []
