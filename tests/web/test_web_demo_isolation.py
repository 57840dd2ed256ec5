"""Per-tab sessions: concurrent users never see each other's results; sessions are released and bounded."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the web demo needs the `demo` extra: pip install 'segllm-jax[demo]'")
gradio_client = pytest.importorskip("gradio_client")

from segllm_jax.apps.web_sessions import SessionStore  # noqa: E402
from segllm_jax.errors import InputError  # noqa: E402
from segllm_jax.session import MultiRoundSession  # noqa: E402

from .conftest import write_image  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*future.no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


def _mask(path) -> np.ndarray:
    return np.asarray(Image.open(path)) > 127


def _conversation(url: str, image, queries, tmp, store) -> list[tuple]:
    client = gradio_client.Client(url, verbose=False, download_files=str(tmp), analytics_enabled=False)
    try:
        client.predict(gradio_client.handle_file(str(image)), api_name="/set_image")
        assert client.session_hash in store.keys()
        outs = [client.predict(q, [], api_name="/ask") for q in queries]
        client.predict(api_name="/new_image")  # releases this client's session
        assert client.session_hash not in store.keys()
        return outs
    finally:
        client.close()


def test_two_concurrent_users_get_their_own_results(served, tiny, tmp_path):
    root, loaded = tiny
    other = write_image(tmp_path / "other.png", 64, 96, seed=7)
    jobs = {root / "scene.png": ["Segment the red square.", "Segment the shape next to it.[REF:1]"],
            other: ["Segment the largest shape.", "Segment the shape left of it.[REF:1]"]}
    with ThreadPoolExecutor(2) as pool:
        futures = {img: pool.submit(_conversation, served.url, img, qs, tmp_path / img.stem, served.store)
                   for img, qs in jobs.items()}
        outs = {img: f.result(timeout=120) for img, f in futures.items()}
    for img, queries in jobs.items():
        session = MultiRoundSession(loaded, img)
        want = [session.ask(q) for q in queries]
        for k, (out, result) in enumerate(zip(outs[img], want, strict=True), start=1):
            assert Image.open(out[0]).size == session.image.size  # this user's picture, not the other's
            assert f"Round {k}:" in out[5] and len(out[3]) == k  # this user's history only
            np.testing.assert_array_equal(_mask(out[3][-1]), result.mask)


def test_twenty_concurrent_sessions(served, tiny, tmp_path):
    _, loaded = tiny
    n = 20
    # a distinct size per session: an answer for someone else's picture has the wrong shape
    images = [write_image(tmp_path / f"img{i}.png", 32 + 2 * i, 48 + 3 * i, seed=100 + i) for i in range(n)]
    queries = [f"Segment object number {i}." for i in range(n)]
    want = [MultiRoundSession(loaded, img).ask(q).mask for img, q in zip(images, queries, strict=True)]
    start = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(_conversation, served.url, img, [q], tmp_path / f"c{i}", served.store)
                   for i, (img, q) in enumerate(zip(images, queries, strict=True))]
        outs = [f.result(timeout=90) for f in futures]
    elapsed = time.monotonic() - start
    for i, (out, mask) in enumerate(zip(outs, want, strict=True)):
        (overlay, gallery, _, masks, history, status, _), = out
        assert f"object number {i}." in status and len(gallery) == 1 and len(masks) == 1
        assert f"object number {i}." in history
        np.testing.assert_array_equal(_mask(masks[0]), mask)
        assert Image.open(overlay).size == Image.open(images[i]).size
    assert elapsed < 60, f"20 one-round sessions took {elapsed:.0f} s"


class FakeSession:
    rounds = ()


def test_store_releases_idle_sessions_and_caps_their_number():
    now = [0.0]
    store = SessionStore(idle_timeout_s=10, max_sessions=2, sweep_interval_s=3600, clock=lambda: now[0])
    try:
        a, b = store.put("a", FakeSession()), store.put("b", FakeSession())
        assert a.files.is_dir() and len(store) == 2
        with pytest.raises(InputError, match="maximum of 2 sessions"):
            store.put("c", FakeSession())
        now[0] = 8.0
        assert store.get("a") is a  # touching a session keeps it alive
        now[0] = 15.0
        assert store.sweep() == 1 and store.keys() == ["a"] and not b.files.exists()
        with a.lock:  # a session busy with a request is never swept
            now[0] = 100.0
            assert store.sweep() == 0
        assert store.sweep() == 1 and len(store) == 0 and not a.files.exists()
        store.put("c", FakeSession())
        assert store.release("c") and not store.release("c") and store.released == 3
    finally:
        store.close()


def test_background_sweeper_runs():
    store = SessionStore(idle_timeout_s=0.05, max_sessions=4, sweep_interval_s=0.05)
    try:
        store.put("a", FakeSession())
        deadline = time.monotonic() + 10
        while len(store) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(store) == 0
    finally:
        store.close()
