"""Fixtures for the web demo: one app served on 127.0.0.1 over the tiny SegLLM checkpoint (``tiny``)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
from PIL import Image

# No telemetry or update checks from the server or the client (there is no internet in CI anyway).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A launched app: ``url`` (loopback), ``app`` (the WebApp) and ``store`` (its SessionStore)."""

    def __init__(self, app, url: str):
        self.app, self.url, self.store = app, url, app.store


@pytest.fixture(scope="session")
def served(tiny):
    from segllm_jax.apps.web_demo import build_app, launch

    _, loaded = tiny
    app = build_app(loaded, examples=None, max_sessions=40, idle_timeout_s=600)
    _, url, _ = launch(app, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
    assert url.startswith("http://127.0.0.1:")
    try:
        yield Served(app, url.rstrip("/"))
    finally:
        app.close()


def write_image(path, height: int, width: int, seed: int):
    """A random picture with a bright square (a distinct size per seed makes cross-talk visible)."""
    img = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    img[height // 4: height // 2, width // 4: width // 2] = (255, 0, 0)
    Image.fromarray(img).save(path)
    return path

