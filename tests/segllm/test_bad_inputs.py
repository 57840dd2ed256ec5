"""Bad input never crashes a session: one clear sentence, and the session stays usable."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from segllm_jax import preprocess
from segllm_jax.errors import InputError
from segllm_jax.session import MultiRoundSession

from .conftest import REPO


@pytest.fixture(scope="module")
def session(tiny):
    root, loaded = tiny
    return MultiRoundSession(loaded, root / "scene.png")


def _image_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_unreadable_and_truncated_images(tiny, tmp_path):
    _, loaded = tiny
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(InputError, match="not a picture PIL can read"):
        MultiRoundSession(loaded, tmp_path / "notes.png")
    jpeg = (REPO.parent / "shared" / "images" / "cat.jpg").read_bytes()
    with pytest.raises(InputError, match="truncated or corrupt"):
        MultiRoundSession(loaded, jpeg[: len(jpeg) // 2])
    with pytest.raises(InputError, match="does not exist"):
        MultiRoundSession(loaded, tmp_path / "missing.jpg")


def test_too_large_image_is_refused_before_decoding(tiny):
    _, loaded = tiny
    huge = _image_bytes(Image.new("L", (12000, 9000)), "PNG")  # 108 MP, tiny file
    with pytest.raises(InputError, match="megapixel limit"):
        MultiRoundSession(loaded, huge)


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "RGBA", "L", "LA", "1"])
def test_unusual_pixel_formats_are_converted(tiny, mode):
    _, loaded = tiny
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    img = rgb.convert("I").point(lambda v: v * 200).convert("I;16") if mode == "I;16" else rgb.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    s = MultiRoundSession(loaded, _image_bytes(img, fmt))
    result = s.ask("Segment the shape.")
    assert s.image.mode == "RGB" and result.mask.shape == (30, 50)


def test_image_arrays(tiny):
    _, loaded = tiny
    s = MultiRoundSession(loaded, np.full((20, 30, 3), 90, np.uint8))
    assert s.ask("Segment it.").mask.shape == (20, 30)
    with pytest.raises(InputError, match="uint8"):
        MultiRoundSession(loaded, np.zeros((20, 30, 3), np.float32))


def test_one_pixel_image(tiny):
    _, loaded = tiny
    s = MultiRoundSession(loaded, Image.new("RGB", (1, 1), (200, 10, 10)))
    assert s.ask("Segment it.").mask.shape == (1, 1)


def test_exif_orientation_is_applied(tiny):
    """A portrait photo stored landscape with EXIF orientation 6: masks follow what the user sees."""
    _, loaded = tiny
    stored = Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    s = MultiRoundSession(loaded, _image_bytes(stored, "JPEG", exif=exif))
    assert s.image.size == (30, 60) and s.ask("Segment it.").mask.shape == (60, 30)


@pytest.mark.parametrize("text, message", [
    ("Segment the next one.[REF:2]", "round"),  # the current round
    ("Segment the next one.[REF:5]", "round"),  # a future round
    ("Segment the next one.[REF:0]", "round"),  # rounds count from 1
    ("Segment the next one.[REF:x]", "REF"),
    ("[REF:1]", "empty"),
])
def test_bad_references_leave_the_session_usable(tiny, text, message):
    root, loaded = tiny
    s = MultiRoundSession(loaded, root / "scene.png")
    first = s.ask("Segment the red square.")
    with pytest.raises(InputError, match=message):
        s.ask(text)
    assert len(s.rounds) == 1 and s.rounds[0] is first
    assert s.ask("Segment the shape next to it.[REF:1]").index == 2


def test_reference_to_an_empty_mask_uses_the_minimum_box(tiny, monkeypatch):
    import segllm_jax.session as session_module

    root, loaded = tiny
    real_predict = session_module.predict

    def empty_predict(*args, **kwargs):
        pred = real_predict(*args, **kwargs)
        return pred._replace(masks=np.zeros_like(pred.masks), boxes_xyxy=np.full_like(pred.boxes_xyxy, -5.0))

    s = MultiRoundSession(loaded, root / "scene.png")
    monkeypatch.setattr(session_module, "predict", empty_predict)
    first = s.ask("Segment the purple unicorn.")
    assert first.empty and tuple(first.ref_box * loaded.config.hipie_image_size) == (0, 0, 2, 2)
    assert not first.ref_crop.any() or np.allclose(first.ref_crop, first.ref_crop[0, 0])  # an all-black crop
    monkeypatch.setattr(session_module, "predict", real_predict)
    assert s.ask("Segment the shape next to it.[REF:1]").index == 2


def test_overlong_conversation_says_how_many_rounds_fit(tiny):
    root, loaded = tiny
    s = MultiRoundSession(loaded, root / "scene.png")
    s.ask("Segment the red square.")
    long_question = "Segment " + "the very small red square " * 200
    with pytest.raises(InputError, match=r"only the first 1 of its 2 rounds fit"):
        s.ask(long_question)
    assert len(s.rounds) == 1 and s.ask("Segment it.").index == 2


def test_min_box_rule():
    assert preprocess.reference_box(np.array([-3.7, 5.2, -1.0, 5.9])) == (0, 5, 2, 7)
    assert preprocess.reference_box(np.array([1020.0, 1023.9, 2000.0, 1030.0])) == (1020, 1023, 1024, 1024)
