"""Small PNG line charts drawn with PIL (no plotting library is a dependency): per-round IoU of an
evaluation and the curves of a training run are pictures people look at, so both are written as PNGs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

COLORS = ((230, 25, 75), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180), (70, 200, 200),
          (240, 50, 230), (128, 128, 0))


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, title: str, *,
               y_range: tuple[float, float] | None = None, x_ticks: Sequence[float] | None = None,
               markers: bool = False, size: tuple[int, int] = (480, 300)) -> Path:
    """``series`` = {name: (xs, ys)} drawn in one box with y ticks at the range ends and middle."""
    w, h = size
    pad = 40
    xs_all = np.concatenate([np.asarray(x, float) for x, _ in series.values()])
    ys_all = np.concatenate([np.asarray(y, float) for _, y in series.values()])
    lo, hi = y_range if y_range is not None else (float(ys_all.min()), float(ys_all.max()))
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = float(xs_all.min()), float(xs_all.max())
    x1 = x1 if x1 > x0 else x0 + 1.0
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.line([(pad, pad), (pad, h - pad), (w - pad, h - pad)], fill="black")

    def to_px(x: float, y: float) -> tuple[float, float]:
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad), h - pad - (y - lo) / (hi - lo) * (h - 2 * pad)

    for y in (lo, (lo + hi) / 2, hi):
        draw.text((2, to_px(x0, y)[1] - 6), f"{y:.3g}", fill="black")
    for x in (x_ticks if x_ticks is not None else (x0, x1)):
        draw.text((to_px(x, lo)[0] - 3, h - pad + 5), f"{x:g}", fill="black")
    for i, (name, (xs, ys)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        pts = [to_px(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        if markers:
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((w - pad - 170, pad + 14 * i), name, fill=color)
    draw.text((pad, 10), title, fill="black")
    img.save(path)
    return Path(path)


def training_curves(metrics_jsonl: str | Path, out_dir: str | Path, window: int = 50) -> list[Path]:
    """``loss.png`` (total, LM, HIPIE) and ``iou_train.png`` (per-round train IoU) of a run's
    ``metrics.jsonl``, each a moving average over ``window`` steps."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    out = Path(out_dir)
    paths = []
    iou_keys = ("hipie/iou_train",) + tuple(f"hipie/iou_round{k}" for k in range(1, 7))
    for name, keys, title in (("loss.png", ("loss", "loss_lm", "loss_hipie"), "training loss"),
                              ("iou_train.png", iou_keys, "IoU of matched predictions on training batches")):
        series = {}
        for key in keys:
            steps = np.asarray([r["step"] for r in rows if key in r], float)
            values = np.asarray([r[key] for r in rows if key in r], float)
            if steps.size >= 2:
                k = min(window, steps.size)
                smooth = np.convolve(values, np.ones(k) / k, mode="valid")
                series[key] = (steps[k - 1:], smooth)
        if series:
            paths.append(line_chart(series, out / name, f"{title} (moving average, {window} steps)"))
    return paths
