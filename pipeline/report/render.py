"""The key image: the selected slice in bone window, the ROI outline and a text panel."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BONE_WINDOW = (400.0, 1800.0)  # centre, width (HU)
IMAGE_PX = 512
PANEL_PX = 420


def _window(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    lo = centre - width / 2
    return (np.clip((hu.astype(np.float32) - lo) / width, 0, 1) * 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: bitmap font, still legible
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        trial = f"{line} {w}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = w
    if line:
        lines.append(line)
    return lines


def render_key_image(
    hu_slice: np.ndarray,
    pixel_spacing: tuple[float, float],
    roi_polygon_rc: np.ndarray | None,
    title: str,
    lines: list[str],
    footer: str,
    bars: list[tuple[str, float]] | None = None,
    bars_title: str = "",
    overlay: np.ndarray | None = None,
    window: tuple[float, float] = BONE_WINDOW,
) -> np.ndarray:
    """RGB uint8 image (rows, cols, 3) of the slice and the panel.

    The slice is resampled to square pixels and scaled so its longer side is 512 px. ``overlay``: the
    attention map of the model that made the result, on the slice's pixels, drawn as a heat map.
    """
    rows, cols = hu_slice.shape
    h_mm, w_mm = rows * pixel_spacing[0], cols * pixel_spacing[1]
    scale_mm = IMAGE_PX / max(h_mm, w_mm)
    out_h, out_w = int(round(h_mm * scale_mm)), int(round(w_mm * scale_mm))
    gray = _window(hu_slice, *window)
    base = Image.fromarray(_heat(gray, overlay) if overlay is not None else gray)
    img = base.resize((out_w, out_h), Image.BILINEAR).convert("RGB")
    sy, sx = out_h / rows, out_w / cols
    draw = ImageDraw.Draw(img)
    if roi_polygon_rc is not None:
        pts = [(float(c * sx + sx / 2), float(r * sy + sy / 2)) for r, c in roi_polygon_rc]
        draw.line(pts, fill=(255, 60, 60), width=2)

    big, small = _font(20), _font(15)
    # Measure the panel first: the canvas grows below the image rather than let the chart run over the
    # research-use footer (a busy study: contrast and calibration flags, a fracture, ten labs).
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_rows = _wrap(scratch, title, big, PANEL_PX - 24)
    text_rows = [_wrap(scratch, text, small, PANEL_PX - 24) for text in lines]
    footer_rows = _wrap(scratch, footer, small, PANEL_PX - 24)
    needed = (12 + 26 * len(title_rows) + 6 + sum(19 * len(r) + 3 for r in text_rows)
              + (6 + 20 + 19 * len(bars) if bars else 0) + 10 + 19 * len(footer_rows) + 12)
    canvas = Image.new("RGB", (out_w + PANEL_PX, max(out_h, IMAGE_PX, needed)), (0, 0, 0))
    canvas.paste(img, (0, 0))
    d = ImageDraw.Draw(canvas)
    x, y = out_w + 14, 12
    for t in title_rows:
        d.text((x, y), t, fill=(255, 255, 255), font=big)
        y += 26
    y += 6
    for rows_of_text in text_rows:
        for t in rows_of_text:
            d.text((x, y), t, fill=(230, 230, 230), font=small)
            y += 19
        y += 3
    if bars:
        y = _bar_chart(d, x, y + 6, PANEL_PX - 28, bars, bars_title, small)
    fy = canvas.height - 12
    for t in reversed(footer_rows):
        fy -= 19
        d.text((x, fy), t, fill=(255, 200, 0), font=small)
    return np.asarray(canvas)


def _heat(gray: np.ndarray, overlay: np.ndarray) -> np.ndarray:
    """Blend a heat map (dark red -> yellow, opacity rising with the value) over a grey image; below 15 % of
    the peak nothing is drawn, so the anatomy stays readable."""
    peak = float(overlay.max())
    v = np.clip(overlay / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(overlay, dtype=float)
    alpha = np.where(v >= 0.15, 0.25 + 0.45 * v, 0.0)[..., None]
    heat = np.stack([np.full_like(v, 255.0), 40.0 + 215.0 * v, np.zeros_like(v)], axis=-1)
    rgb = np.repeat(gray[..., None].astype(np.float32), 3, axis=-1)
    return np.clip((1.0 - alpha) * rgb + alpha * heat, 0, 255).astype(np.uint8)


def _bar_chart(d: ImageDraw.ImageDraw, x: int, y: int, width: int, bars: list[tuple[str, float]], title: str,
               font) -> int:
    """Signed horizontal bars (red raises risk, blue lowers it) around a centre line."""
    d.text((x, y), title, fill=(230, 230, 230), font=font)
    y += 20
    label_w = 120
    half = (width - label_w - 50) / 2
    centre = x + label_w + half
    top = max(abs(v) for _, v in bars) or 1.0
    for name, v in bars:
        while name and d.textlength(name, font=font) > label_w - 6:  # fit, never overrun the bars
            name = name[:-2] + "."
        d.text((x, y), name, fill=(210, 210, 210), font=font)
        length = half * abs(v) / top
        x0, x1 = (centre, centre + length) if v >= 0 else (centre - length, centre)
        d.rectangle([x0, y + 3, x1, y + 14], fill=(220, 70, 70) if v >= 0 else (80, 140, 230))
        d.text((centre + half + 6, y), f"{v:+.3f}", fill=(210, 210, 210), font=font)
        y += 19
    d.line([(centre, y - 19 * len(bars)), (centre, y)], fill=(160, 160, 160), width=1)
    return y
