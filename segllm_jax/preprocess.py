"""Host-side image preprocessing: loading, and one small function per model pipeline.

Everything here runs on the host with PIL/NumPy, before anything reaches a device: decoding,
EXIF orientation and resampling are exactly the operations the original code ran through PIL, so
doing them with PIL again is what makes the resized pixels bit-identical
(architecture.md §D5). Normalisation is *not* done here: HIPIE normalises on device inside
``Hipie`` (uint8 in, so the host→device transfer is 4× smaller).

Pipelines:

* HIPIE (``hipie_image``, ``hipie_mask``): SAM's ``ResizeLongestSide(1024)`` (PIL bilinear,
  antialiased when shrinking) followed by zero padding at the bottom/right to a square.
* CLIP: added later by the lead, next to these functions.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segllm_jax.errors import InputError

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

HIPIE_IMAGE_SIZE = 1024  # SegLLM's fixed HIPIE input side (architecture.md §D5)
MAX_IMAGE_PIXELS = 100_000_000  # larger pictures are refused before decoding (both models downscale anyway)
MAX_ASPECT_RATIO = 20  # longer/shorter side; beyond it HIPIE's frame keeps a sliver of a few pixels


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, the way people expect the picture to look.

    * palette (``P``) and ``LA``/``RGBA``/``PA``: composited on white where there is
      transparency (plain ``convert("RGB")`` would show the hidden colour under alpha 0);
    * 16/32-bit grayscale (``I;16*``, ``I``, ``F``): rescaled to 0..255 by the type's range
      (``convert("L")`` clips at 255 and would turn most 16-bit photos white);
    * ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``L``, ``1``: PIL's own conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if img.mode.startswith("I;16"):
            scale = 255.0 / 65535.0
            arr = arr.astype(np.float64) * scale
        else:
            arr = arr.astype(np.float64)
            hi = float(arr.max()) if arr.size else 0.0
            if img.mode == "I" and hi > 255.0:
                arr = arr * (255.0 / (65535.0 if hi <= 65535.0 else hi))
            elif img.mode == "F" and hi <= 1.0:
                arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return img.convert("RGB")


def load_image(source: ImageSource, *, exif_transpose: bool = True) -> Image.Image:
    """A picture file (path or bytes) or a PIL image -> 8-bit RGB PIL image, EXIF orientation applied.

    Datasets pass ``exif_transpose=False``: their annotations index the stored pixel grid (the
    original training code never rotated), so rotating would misalign every mask.

    Raises ``InputError`` (one sentence) for missing, unreadable, unsupported or truncated files:
    the image is fully decoded here so that a truncated JPEG fails now, not later inside a model.
    """
    name = "the image"
    try:
        with warnings.catch_warnings():
            # PIL warns about huge images ("decompression bomb", already at open) and odd EXIF; our
            # own limits below say it in one sentence instead
            warnings.simplefilter("ignore")
            if isinstance(source, Image.Image):
                img = source
            elif isinstance(source, np.ndarray):
                channels = source.shape[2] if source.ndim == 3 else 1
                if source.dtype != np.uint8 or source.ndim not in (2, 3) or channels not in (1, 3, 4):
                    raise InputError(f"an image array must be uint8 [H, W], [H, W, 3] or [H, W, 4], not "
                                     f"{source.dtype} {list(source.shape)}.")
                img = Image.fromarray(source)
            elif isinstance(source, (bytes, bytearray)):
                name = f"the {len(source)}-byte image"
                img = Image.open(io.BytesIO(bytes(source)))
            else:
                path = Path(source)
                name = str(path)
                if not path.is_file():
                    raise InputError(f"{name} does not exist or is not a file; pass the path of a picture.")
                img = Image.open(path)
            check_image_size(*img.size, name)  # from the header, before anything is decoded
            img.load()  # decode now: truncated files fail here
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
                check_image_size(*img.size, name)
            return _to_rgb(img)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"{name} declares more pixels than PIL will decode (a decompression bomb?).") from None
    except UnidentifiedImageError:
        raise InputError(f"{name} is not a picture PIL can read (JPEG, PNG, WebP, BMP, TIFF, ...).") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{name} cannot be decoded, it is probably truncated or corrupt "
                         f"({type(e).__name__}: {str(e)[:120]}).") from None


def check_image_size(width: int, height: int, name: str = "the image") -> None:
    """Refuses pictures the models cannot use: empty, over the pixel limit, or so elongated that the
    short side would vanish in HIPIE's frame (and CLIP's resize would blow the long side up).

    Why here: a 1x5000 strip otherwise fails deep inside a resize with a ``ValueError``.
    """
    if width < 1 or height < 1:
        raise InputError(f"{name} is {width}x{height} pixels; it has no pixels to segment.")
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{name} is {width}x{height} ({width * height / 1e6:.0f} megapixels), over the "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit; downscale it first.")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(f"{name} is {width}x{height} pixels, more than {MAX_ASPECT_RATIO}:1 between its sides; "
                         "crop it to a less elongated picture first.")


# --------------------------------------------------------------------------------------------
# HIPIE pipeline (architecture.md §D5)
# --------------------------------------------------------------------------------------------

def hipie_resized_hw(height: int, width: int, size: int = HIPIE_IMAGE_SIZE) -> tuple[int, int]:
    """SAM ``ResizeLongestSide.get_preprocess_shape``: scale = size / long side, round half up.

    The product is formed as ``side * (size / long)`` (not ``side * size / long``), exactly as the
    original, so the rare half-way cases round the same way.
    """
    scale = size * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _pad_bottom_right(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if h > size or w > size:
        raise InputError(f"an image of {h}x{w} pixels does not fit the {size}x{size} HIPIE frame.")
    pad = [(0, size - h), (0, size - w)] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, pad)


def hipie_image(image: Image.Image, size: int = HIPIE_IMAGE_SIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB PIL image -> (uint8 ``[size, size, 3]`` HWC, resized (h, w) before padding).

    Long side resized to ``size`` with PIL bilinear (antialiased when shrinking: what
    torchvision's ``resize`` on a PIL image does), then zero-padded at the bottom and right. The
    padded area is real zeros, i.e. black after normalisation (not masked; architecture.md §D5).
    """
    if image.mode != "RGB":
        image = _to_rgb(image)
    h, w = hipie_resized_hw(image.height, image.width, size)
    if min(h, w) < 1:
        raise InputError(f"an image of {image.width}x{image.height} pixels is too elongated for the {size}x{size} "
                         "HIPIE frame (its short side would vanish); crop it first.")
    resized = np.asarray(image.resize((w, h), Image.BILINEAR), dtype=np.uint8)  # [h, w, 3]
    return _pad_bottom_right(resized, size), (h, w)


def hipie_mask(mask: np.ndarray, size: int = HIPIE_IMAGE_SIZE) -> np.ndarray:
    """A 2-D mask (bool or uint8, original image resolution) -> uint8 ``[size, size]`` in the HIPIE frame.

    Same resize as the image (bilinear on the mask *values*, PIL ``L`` mode), same bottom/right
    zero padding. Values stay 0..max (e.g. 0/1); callers treat any non-zero value as foreground,
    as detectron2's ``BitMasks`` does (slight dilation at edges, architecture.md §D5).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"a mask must be 2-D (H, W), got shape {mask.shape}.")
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8)
    if mask.dtype != np.uint8:
        raise InputError(f"a mask must be bool or uint8, got {mask.dtype}.")
    h, w = hipie_resized_hw(*mask.shape, size)
    resized = np.asarray(Image.fromarray(mask).resize((w, h), Image.BILINEAR), dtype=np.uint8)
    return _pad_bottom_right(resized, size)


# --------------------------------------------------------------------------------------------
# CLIP pipeline (architecture.md §D4): the image for the LLM, and the masked crops of mask-encoding (§D6)
# --------------------------------------------------------------------------------------------

CLIP_IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_image(image: Image.Image | np.ndarray, size: int = CLIP_IMAGE_SIZE) -> np.ndarray:
    """``CLIPImageProcessor`` of openai/clip-vit-large-patch14 -> float32 ``[size, size, 3]`` (NHWC row).

    Shortest side -> ``size`` with PIL bicubic (long side ``int(size * long / short)``), centre
    crop (offsets floored), /255, CLIP mean/std. No pad-to-square: ``image_aspect_ratio`` is
    'square' in SegLLM, so non-square images lose their borders for the LLM (oddity §O24).
    """
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    w, h = pil.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    arr = np.asarray(pil.convert("RGB").resize((new_w, new_h), resample=Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    arr = arr[top:top + size, left:left + size]
    scaled = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def clip_patch_cover(mask_frame: np.ndarray, hipie_size: tuple[int, int], grid: int) -> np.ndarray:
    """Fraction of each CLIP patch ``[grid * grid]`` (row-major, the vision tower's token order) that a mask in
    HIPIE's frame covers.

    The two preprocessors see different parts of an image: HIPIE the whole image resized into the frame's
    top-left ``hipie_size = (h, w)`` corner, CLIP (:func:`clip_image`) only its centred square. So the mask's
    centred ``min(h, w)`` square is cut out and box-averaged onto the patch grid; a mask outside that square
    covers nothing."""
    h, w = (int(v) for v in hipie_size)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = np.asarray(mask_frame[top:top + side, left:left + side], np.float32)
    cover = Image.fromarray(crop).resize((grid, grid), resample=Image.BOX)
    return np.clip(np.asarray(cover, np.float32), 0.0, 1.0).reshape(grid * grid)


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """Extent box ``[x0, y0, x1, y1]`` of a 2-D mask in pixel-edge coordinates (x1, y1 exclusive,
    like detectron2's ``BitMasks.get_bounding_boxes``), or None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)


def reference_box(box_xyxy: np.ndarray, frame: int = HIPIE_IMAGE_SIZE) -> tuple[int, int, int, int]:
    """A predicted box (pixels of the HIPIE frame) -> the integer crop box the original uses (§D6).

    ``int()`` truncation, clipped to the frame, and at least 2 pixels wide and tall.
    """
    x0, y0, x1, y1 = (min(max(int(v), 0), frame) for v in np.asarray(box_xyxy, np.float64))
    return x0, y0, min(max(x1, x0 + 2), frame), min(max(y1, y0 + 2), frame)


def masked_crop(frame_u8: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Mask-encode input image: pixels outside ``mask`` zeroed, cropped to ``box`` (x0, y0, x1, y1),
    pasted at the top-left of a zero square of side max(h, w) (no centring, as the original)."""
    x0, y0, x1, y1 = box
    crop = np.where(mask[y0:y1, x0:x1, None], frame_u8[y0:y1, x0:x1], 0).astype(np.uint8)
    side = max(crop.shape[0], crop.shape[1])
    square = np.zeros((side, side, 3), np.uint8)
    square[: crop.shape[0], : crop.shape[1]] = crop
    return square
