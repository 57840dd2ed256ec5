"""The web demo through ``gradio_client``: same masks as ``MultiRoundSession``, errors as one sentence."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the web demo needs the `demo` extra: pip install 'segllm-jax[demo]'")
gradio_client = pytest.importorskip("gradio_client")

from segllm_jax.apps.cli import main  # noqa: E402
from segllm_jax.apps.web_demo import compose_query, round_color  # noqa: E402
from segllm_jax.session import MultiRoundSession  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*future.no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

# (typed text, ticked rounds) per round, and what MultiRoundSession gets for the same input
ROUNDS = [("Segment the red square.", []),
          ("Segment the shape next to it.[REF:1]", []),
          ("Segment the shape between them.", [1, 2])]
SESSION_TEXT = ["Segment the red square.", "Segment the shape next to it.[REF:1]",
                "Segment the shape between them.[REF:1,2]"]


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _client(served, tmp_path):
    return gradio_client.Client(served.url, verbose=False, download_files=str(tmp_path),
                                analytics_enabled=False)


def test_compose_query():
    assert compose_query("  the dog  ", []) == "the dog"
    assert compose_query("the dog", [2, 1]) == "the dog[REF:1,2]"
    assert compose_query("[REF:2] the dog", ["1", "2"]) == "[REF:2] the dog[REF:1]"
    assert [compose_query(t, c) for t, c in ROUNDS] == SESSION_TEXT


def test_three_rounds_with_references_match_the_session(served, tiny, tmp_path):
    root, loaded = tiny
    client = _client(served, tmp_path)
    try:
        client.predict(gradio_client.handle_file(str(root / "scene.png")), api_name="/set_image")
        outs = [client.predict(text, checked, api_name="/ask") for text, checked in ROUNDS]
        key = client.session_hash
        assert served.store.get(key) is not None
    finally:
        client.close()

    session = MultiRoundSession(loaded, root / "scene.png")
    want = [session.ask(t) for t in SESSION_TEXT]
    assert [r.refs for r in want] == [(), (1,), (1, 2)]

    for k, (out, result) in enumerate(zip(outs, want, strict=True), start=1):
        overlay, gallery, refs, masks, history, status, query = out
        assert f"Round {k}:" in status and query == ""
        # the round's overlay, in the round's colour, at the original resolution
        np.testing.assert_array_equal(_png(overlay), np.asarray(session.overlay(result, round_color(k))))
        assert len(gallery) == k and len(masks) == k
        # every mask so far, downloadable as PNG, equal to the session's masks
        for mask_file, r in zip(masks, want[:k], strict=True):
            assert mask_file.endswith(f"round_{r.index}_mask.png")
            np.testing.assert_array_equal(_png(mask_file) > 127, r.mask)
        assert refs["choices"] == [[str(i), i] for i in range(1, k + 1)] or \
            [tuple(c) for c in refs["choices"]] == [(str(i), i) for i in range(1, k + 1)]
    assert "references round 1, 2" in outs[2][5]
    assert outs[2][4].count("<tr>") == 4  # header + 3 rounds

    # the client went away: Gradio's unload event released its session
    deadline = time.monotonic() + 30
    while key in served.store.keys() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert key not in served.store.keys(), "closing the client did not release its session"


def test_errors_are_one_sentence_and_keep_the_session(served, tiny, tmp_path):
    root, _ = tiny
    client = _client(served, tmp_path)
    try:
        with pytest.raises(Exception, match="upload or pick an image first"):
            client.predict("Segment the dog.", [], api_name="/ask")
        client.predict(gradio_client.handle_file(str(root / "scene.png")), api_name="/set_image")
        with pytest.raises(Exception, match="only 0 earlier round"):
            client.predict("Segment it.[REF:1]", [], api_name="/ask")
        with pytest.raises(Exception, match="question is empty"):
            client.predict("   ", [], api_name="/ask")
        first = client.predict("Segment the red square.", [], api_name="/ask")
        assert "Round 1:" in first[5]  # the failed rounds left the session unchanged
        cleared = client.predict(api_name="/clear_history")
        assert "History cleared" in cleared[5] and cleared[1] == [] and not cleared[3]
        again = client.predict("Segment the red square.", [], api_name="/ask")
        assert "Round 1:" in again[5]
        np.testing.assert_array_equal(_png(again[0]), _png(first[0]))
        # not a picture: refused by the session's image checks
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        with pytest.raises(Exception):  # noqa: B017 - gradio_client's error type for an app error varies by version
            client.predict(gradio_client.handle_file(str(bad)), api_name="/set_image")
        client.predict(gradio_client.handle_file(str(root / "scene.png")), api_name="/set_image")
        assert client.session_hash in served.store.keys()
        client.predict(api_name="/new_image")
        assert client.session_hash not in served.store.keys()
    finally:
        client.close()


def test_upload_limit(tiny, tmp_path):
    from segllm_jax.apps.web_demo import build_app, launch

    from .conftest import free_port

    root, loaded = tiny
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(big)
    app = build_app(loaded, examples=None, max_upload_mb=0.1)
    _, url, _ = launch(app, port=free_port(), prevent_thread_lock=True, quiet=True)
    client = gradio_client.Client(url, verbose=False, download_files=str(tmp_path), analytics_enabled=False)
    try:
        with pytest.raises(Exception, match="(?i)size|large|limit"):
            client.predict(gradio_client.handle_file(str(big)), api_name="/set_image")
        assert len(app.store) == 0
        client.predict(gradio_client.handle_file(str(root / "scene.png")), api_name="/set_image")
        assert len(app.store) == 1
    finally:
        client.close()
        app.close()


def test_serve_loads_once_and_launches(tiny, monkeypatch):
    from segllm_jax.apps import web_demo

    root, _ = tiny
    calls = []
    monkeypatch.setattr(web_demo, "launch", lambda app, **kw: calls.append((app, kw)))
    assert main(["serve", "--checkpoint", str(root / "converted"), "--no-warmup", "--port", "7999",
                 "--max-sessions", "3", "--max-upload-mb", "2"]) == 0
    (app, kw), = calls
    assert kw == {"host": "127.0.0.1", "port": 7999}
    assert app.max_file_size == 2 * 2**20 and app.store.max_sessions == 3
    assert len(app.example_dirs) == 1  # two generated MR-Shapes scenes (the folder has no examples/)
