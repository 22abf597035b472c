"""Procedural outdoor scenes (the SUN397 analog) and land-cover maps (the EuroSAT analog).

Scenes share their sky, horizon and lighting randomisation across classes, so a class is
told apart by its layout (dunes, peaks, buildings, water, road, furrows), not by one colour.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import ImageDraw

from tasks.embedded.render import (
    CANVAS, blend, coords, finish, fractal_noise, jitter, new_canvas, pick, smooth_noise,
    vertical_gradient,
)

SCENE_CLASSES = (
    "beach", "desert", "forest", "mountain", "city skyline",
    "lake", "snowy field", "night sky", "country road", "farm field",
)

_SKIES = {
    "day": ((60, 110, 200), (165, 200, 235)),
    "dusk": ((60, 50, 110), (240, 150, 90)),
    "overcast": ((115, 118, 128), (190, 190, 196)),
    "hazy": ((150, 170, 200), (225, 220, 205)),
}


def _sky(rng: np.random.Generator, horizon: int, kind: str | None = None) -> tuple[np.ndarray, str]:
    kind = kind or pick(rng, list(_SKIES))
    top, bottom = _SKIES[kind]
    arr = vertical_gradient(jitter(rng, top, 25), jitter(rng, bottom, 25), max(horizon, 1))
    sky = np.zeros((CANVAS, CANVAS, 3), np.float32)
    sky[:] = arr[-1]
    sky[: arr.shape[0]] = arr
    return sky, kind


def _textured(rng: np.random.Generator, c0, c1, octaves=(4, 8, 16), strength: float = 1.0) -> np.ndarray:
    t = fractal_noise(rng, octaves)
    return blend(0.5 + (t - 0.5) * strength, c0, c1)


def _paste_below(base: np.ndarray, ground: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """Ground where the row index is below ``boundary[x]`` (a per-column horizon)."""
    rows = np.arange(CANVAS)[:, None]
    mask = (rows >= boundary[None, :])[..., None]
    return np.where(mask, ground, base)


def _clouds(rng: np.random.Generator, draw: ImageDraw.ImageDraw, horizon: int, kind: str) -> None:
    if kind == "overcast" or horizon < 12:
        return
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = rng.uniform(0, CANVAS), rng.uniform(2, horizon - 6)
        col = jitter(rng, (245, 245, 250) if kind != "dusk" else (240, 190, 170), 10)
        for _ in range(3):
            rx, ry = rng.uniform(4, 9), rng.uniform(2, 4)
            ox = rng.uniform(-6, 6)
            draw.ellipse([cx + ox - rx, cy - ry, cx + ox + rx, cy + ry], fill=col)


def _hills(rng: np.random.Generator, sky: np.ndarray, horizon: int) -> np.ndarray:
    """Low distant hills on the horizon: shared by several classes so that a silhouette
    above the horizon alone does not give a mountain away."""
    img, d = new_canvas(sky)
    col = jitter(rng, (110, 120, 140), 25)
    for _ in range(int(rng.integers(1, 4))):
        px, ph, pw = rng.uniform(0, CANVAS), rng.uniform(3, 9), rng.uniform(10, 24)
        d.polygon([(px - pw, horizon + 1), (px, horizon - ph), (px + pw, horizon + 1)], fill=jitter(rng, col, 8))
    return np.asarray(img, np.float32)


def _trees(rng: np.random.Generator, d: ImageDraw.ImageDraw, horizon: int) -> None:
    for _ in range(int(rng.integers(1, 4))):
        x, base = rng.uniform(0, CANVAS), rng.uniform(horizon + 2, CANVAS - 2)
        h = rng.uniform(6, 14)
        d.rectangle([x - 0.7, base - 1, x + 0.7, base + 2], fill=(70, 45, 25))
        d.polygon([(x, base - h), (x - h / 3, base), (x + h / 3, base)], fill=jitter(rng, (35, 80, 40), 15))


def scene(rng: np.random.Generator, label: int, clean: bool = False) -> np.ndarray:
    """One 32x32 scene of class ``label``; ``clean`` drops clouds, distractors, noise, tilt,
    flips and lighting changes."""
    name = SCENE_CLASSES[label]
    horizon = int(rng.uniform(0.28, 0.62) * CANVAS)
    tilt = 0.0 if clean else rng.uniform(-0.08, 0.08)
    flat = horizon + tilt * (np.arange(CANVAS) - CANVAS / 2)
    if name == "night sky":
        kind = "night"
        top, bottom = jitter(rng, (5, 8, 30), 6), jitter(rng, (30, 35, 75), 15)
        sky = np.zeros((CANVAS, CANVAS, 3), np.float32)
        sky[:] = vertical_gradient(top, bottom, CANVAS)
    else:
        if name == "snowy field":
            kind = pick(rng, ["overcast", "day", "hazy"])
        else:
            kind = pick(rng, list(_SKIES))
        sky, kind = _sky(rng, horizon, kind)
        if not clean and name != "mountain" and rng.random() < 0.3:
            sky = _hills(rng, sky, horizon)
    s = 0.0 if clean else 1.0
    if name == "beach":
        sea_end = horizon + rng.uniform(0.12, 0.3) * CANVAS
        water = _textured(rng, jitter(rng, (30, 90, 160), 20), jitter(rng, (70, 140, 190), 20), (2, 16), s)
        sand = _textured(rng, jitter(rng, (215, 190, 140), 20), jitter(rng, (190, 160, 110), 20), (4, 16), s)
        shore = sea_end + 3 * np.sin(np.arange(CANVAS) / rng.uniform(4, 9) + rng.uniform(0, 6))
        arr = _paste_below(_paste_below(sky, water, flat.astype(int)), sand, shore.astype(int))
        img, d = new_canvas(arr)
        for _ in range(int(rng.integers(2, 6))):
            y = rng.uniform(horizon + 2, sea_end - 1)
            x0 = rng.uniform(-10, CANVAS - 10)
            d.line([x0, y, x0 + rng.uniform(6, 20), y], fill=jitter(rng, (200, 225, 240), 15), width=1)
    elif name == "desert":
        phase, period, amp = rng.uniform(0, 6), rng.uniform(8, 20), rng.uniform(2, 6)
        ridge = flat + amp * np.sin(np.arange(CANVAS) / period + phase)
        sand = _textured(rng, jitter(rng, (225, 175, 105), 20), jitter(rng, (185, 120, 60), 20), (2, 4, 8), 1.0)
        y, x = coords()
        bands = 0.5 + 0.5 * np.sin((y * CANVAS - horizon) / rng.uniform(3, 6) + 2 * np.sin(x * rng.uniform(4, 9)))
        sand = sand * (0.85 + 0.15 * bands[..., None])
        arr = _paste_below(sky, sand, ridge.astype(int))
        img, d = new_canvas(arr)
        if rng.random() < 0.6:
            r = rng.uniform(3, 6)
            cx, cy = rng.uniform(8, CANVAS - 8), rng.uniform(4, max(horizon - 6, 5))
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter(rng, (250, 230, 150), 5))
    elif name == "forest":
        ground = _textured(rng, jitter(rng, (35, 80, 35), 15), jitter(rng, (70, 110, 45), 15), (4, 16), s)
        arr = _paste_below(sky, ground, flat.astype(int))
        img, d = new_canvas(arr)
        for row in range(2):
            base = horizon + 3 + row * rng.uniform(6, 14)
            for _ in range(int(rng.integers(5, 11))):
                x = rng.uniform(-4, CANVAS + 4)
                h, w = rng.uniform(12, 26), rng.uniform(5, 10)
                col = jitter(rng, (25 + 15 * row, 75, 35), 18)
                d.rectangle([x - 1, base - 2, x + 1, base + 3], fill=(70, 45, 25))
                d.polygon([(x, base - h), (x - w, base), (x + w, base)], fill=col)
    elif name == "mountain":
        ground = _textured(rng, jitter(rng, (70, 110, 55), 25), jitter(rng, (120, 110, 70), 25), (4, 16), s)
        arr = _paste_below(sky, ground, flat.astype(int))
        img, d = new_canvas(arr)
        rock = jitter(rng, (105, 100, 110), 25)
        for _ in range(int(rng.integers(2, 5))):
            px, ph, pw = rng.uniform(0, CANVAS), rng.uniform(14, min(horizon + 6, 40)), rng.uniform(14, 30)
            col = jitter(rng, rock, 15)
            d.polygon([(px - pw, horizon + 2), (px, horizon - ph), (px + pw, horizon + 2)], fill=col)
            if rng.random() < 0.75:
                f = rng.uniform(0.25, 0.4)
                d.polygon([(px - pw * f, horizon - ph * (1 - f)), (px, horizon - ph),
                           (px + pw * f, horizon - ph * (1 - f))], fill=jitter(rng, (240, 240, 245), 8))
    elif name == "city skyline":
        ground = _textured(rng, jitter(rng, (85, 85, 90), 15), jitter(rng, (120, 120, 120), 15), (4, 16), s)
        arr = _paste_below(sky, ground, flat.astype(int))
        img, d = new_canvas(arr)
        x = rng.uniform(-6, 0)
        while x < CANVAS:
            w, h = rng.uniform(5, 12), rng.uniform(8, min(horizon, 42))
            col = jitter(rng, pick(rng, [(90, 90, 100), (130, 110, 90), (70, 85, 110), (150, 150, 155)]), 15)
            d.rectangle([x, horizon - h, x + w, horizon + 2], fill=col)
            lit = jitter(rng, (235, 215, 120) if kind in ("dusk",) else (200, 215, 230), 15)
            for wy in np.arange(horizon - h + 2, horizon - 1, 3):
                for wx in np.arange(x + 1.5, x + w - 1, 3):
                    if rng.random() < 0.6:
                        d.rectangle([wx, wy, wx + 1, wy + 1], fill=lit)
            x += w + rng.uniform(-1, 3)
    elif name == "lake":
        hills = flat - rng.uniform(2, 7) - 2 * smooth_noise(rng, 4)[0] * 4
        treeline = np.broadcast_to(np.array(jitter(rng, (40, 75, 45), 15), np.float32), sky.shape)
        arr = _paste_below(sky, treeline, hills.astype(int))
        mirror = sky[np.clip(2 * horizon - np.arange(CANVAS), 0, CANVAS - 1)]
        water = 0.55 * mirror + 0.45 * np.array(jitter(rng, (30, 70, 120), 20), np.float32)
        water = water * (0.9 + 0.2 * smooth_noise(rng, 16)[..., None] * s)
        arr = _paste_below(arr, water, (flat + 2).astype(int))
        if rng.random() < 0.5:
            shore = CANVAS - rng.uniform(3, 10) + 2 * np.sin(np.arange(CANVAS) / 5)
            grass = np.broadcast_to(np.array(jitter(rng, (80, 120, 60), 20), np.float32), sky.shape)
            arr = _paste_below(arr, grass, shore.astype(int))
        img, d = new_canvas(arr)
        for _ in range(int(rng.integers(2, 6))):
            y = rng.uniform(horizon + 4, CANVAS - 2)
            x0 = rng.uniform(0, CANVAS - 12)
            d.line([x0, y, x0 + rng.uniform(4, 14), y], fill=jitter(rng, (170, 195, 215), 15))
    elif name == "snowy field":
        snow = _textured(rng, jitter(rng, (235, 238, 245), 8), jitter(rng, (195, 205, 220), 10), (2, 4, 8), 1.0)
        ridge = flat + 2 * np.sin(np.arange(CANVAS) / rng.uniform(6, 14))
        arr = _paste_below(sky, snow, ridge.astype(int))
        img, d = new_canvas(arr)
        for _ in range(int(rng.integers(0, 4))):
            x, base = rng.uniform(0, CANVAS), rng.uniform(horizon, CANVAS - 4)
            h = rng.uniform(6, 14)
            d.polygon([(x, base - h), (x - h / 3, base), (x + h / 3, base)], fill=jitter(rng, (40, 60, 45), 10))
    elif name == "night sky":
        ground_col = jitter(rng, (15, 18, 22), 8)
        ridge = flat + 4 * smooth_noise(rng, 5)[0] * 3 - 4
        arr = _paste_below(sky, np.broadcast_to(np.array(ground_col, np.float32), sky.shape), ridge.astype(int))
        img, d = new_canvas(arr)
        for _ in range(int(rng.integers(15, 45))):
            x, y = rng.uniform(0, CANVAS), rng.uniform(0, max(horizon - 2, 2))
            b = int(rng.uniform(150, 255))
            d.point((x, y), fill=(b, b, min(255, b + 10)))
        if rng.random() < 0.6:
            r = rng.uniform(3, 7)
            cx, cy = rng.uniform(r, CANVAS - r), rng.uniform(r, max(horizon - r, r + 1))
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter(rng, (240, 235, 200), 10))
    elif name == "country road":
        ground = _textured(rng, jitter(rng, (70, 120, 50), 25), jitter(rng, (130, 140, 70), 25), (4, 16), s)
        arr = _paste_below(sky, ground, flat.astype(int))
        img, d = new_canvas(arr)
        vx = rng.uniform(0.3, 0.7) * CANVAS
        half = rng.uniform(14, 30)
        bx = vx + rng.uniform(-12, 12)
        d.polygon([(vx - 1, horizon), (vx + 1, horizon), (bx + half, CANVAS), (bx - half, CANVAS)],
                  fill=jitter(rng, (85, 85, 90), 15))
        line = jitter(rng, pick(rng, [(240, 240, 240), (235, 200, 60)]), 10)
        for t in np.arange(0.1, 1.0, 0.2):
            t2 = t + 0.08
            d.line([vx + (bx - vx) * t, horizon + (CANVAS - horizon) * t,
                    vx + (bx - vx) * t2, horizon + (CANVAS - horizon) * t2], fill=line, width=1 + int(t * 2))
    else:  # farm field
        c0 = jitter(rng, pick(rng, [(110, 150, 50), (200, 170, 70), (120, 90, 55)]), 20)
        c1 = jitter(rng, c0, 45)
        y, x = coords()
        vx = rng.uniform(0.2, 0.8)
        hz = horizon / CANVAS
        depth = np.maximum(y - hz, 1e-3)
        furrow = np.sin((x - vx) / depth * rng.uniform(8, 14))
        ground = blend(0.5 + 0.5 * furrow, c0, c1)
        arr = _paste_below(sky, ground, flat.astype(int))
        img, d = new_canvas(arr)
        if rng.random() < 0.4:
            bx, bw, bh = rng.uniform(4, CANVAS - 14), rng.uniform(6, 10), rng.uniform(5, 8)
            d.rectangle([bx, horizon - bh, bx + bw, horizon + 1], fill=jitter(rng, (150, 40, 35), 15))
    if clean:
        return finish(img)
    if name not in ("night sky", "forest", "snowy field", "desert") and rng.random() < 0.3:
        _trees(rng, d, horizon)
    if name != "night sky":
        _clouds(rng, d, horizon, kind)
    arr = np.asarray(img, np.float32)
    if name != "night sky" and rng.random() < 0.15:  # late evening light
        arr = arr * rng.uniform(0.3, 0.55) * np.asarray([0.8, 0.85, 1.1], np.float32)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return finish(np.ascontiguousarray(arr), rng, blur=rng.uniform(0, 0.4), noise=3.0, colour=(0.25, 0.2, 12),
                  zoom=1.5, hue=0.1)


LANDCOVER_CLASSES = (
    "annual crop land", "forest", "brushland or shrubland", "highway or road",
    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
    "residential buildings or homes or apartments", "river", "lake or sea",
)


def _rotated(angle: float):
    y, x = coords()
    c, s = math.cos(angle), math.sin(angle)
    return (x - 0.5) * c - (y - 0.5) * s, (x - 0.5) * s + (y - 0.5) * c


def _vegetation(rng: np.random.Generator, dark: bool = False) -> np.ndarray:
    base = (45, 80, 40) if dark else (95, 125, 60)
    light = (base[0] + 40, base[1] + 25, base[2] + 10)
    return _textured(rng, jitter(rng, base, 15), jitter(rng, light, 15), (4, 8, 16))


def _band(rng: np.random.Generator, width: float, wiggle: float):
    """Signed distance (pixels) to a wiggly line crossing the canvas at a random angle."""
    u, v = _rotated(rng.uniform(0, math.pi))
    centre = rng.uniform(-0.15, 0.15) + wiggle * np.sin(u * rng.uniform(4, 9) + rng.uniform(0, 6))
    return np.abs(v - centre) * CANVAS - width / 2


def landcover(rng: np.random.Generator, label: int, clean: bool = False) -> np.ndarray:
    """A top-down land-cover tile; ``clean`` removes haze and colour jitter."""
    name = LANDCOVER_CLASSES[label]
    if name == "annual crop land":
        u, v = _rotated(rng.uniform(0, math.pi))
        fw, fh = rng.uniform(0.25, 0.6, 2)
        fid = (np.floor(u / fw) * 7 + np.floor(v / fh)).astype(int) % 5
        base = [(150, 160, 70), (190, 170, 90), (110, 140, 55), (160, 120, 70), (200, 190, 120)]
        palette = [jitter(rng, c, 20) for c in base]
        period = rng.uniform(0.04, 0.09)
        stripe = 0.5 + 0.5 * np.sin(2 * math.pi * v / period + fid)
        cols = np.stack([np.asarray(p, np.float32) for p in palette])[fid]
        arr = cols * (0.82 + 0.18 * stripe[..., None])
    elif name == "forest":
        arr = _vegetation(rng, dark=True)
        crowns = smooth_noise(rng, int(rng.integers(18, 28)))
        arr = arr * (0.55 + 0.7 * crowns)[..., None]
    elif name == "brushland or shrubland":
        t = fractal_noise(rng, (4, 8, 16, 32))
        arr = blend(t, jitter(rng, (120, 115, 70), 15), jitter(rng, (70, 95, 50), 15))
        arr = arr * (0.9 + 0.2 * smooth_noise(rng, 24)[..., None])
    elif name == "highway or road":
        if rng.random() < 0.6:
            arr = _vegetation(rng)
        else:
            arr = _textured(rng, jitter(rng, (160, 150, 110), 20), jitter(rng, (120, 130, 80), 20))
        dist = _band(rng, rng.uniform(6, 11), rng.uniform(0.0, 0.05))
        road = np.array(jitter(rng, (110, 110, 115), 15), np.float32)
        arr = np.where((dist < 0)[..., None], road, arr)
        arr = np.where((np.abs(dist + rng.uniform(2, 3)) < 0.5)[..., None], np.float32(200), arr)
        if rng.random() < 0.35:
            d2 = _band(rng, rng.uniform(3, 6), 0.0)
            arr = np.where((d2 < 0)[..., None], road, arr)
    elif name == "industrial buildings or commercial buildings":
        arr = _textured(rng, jitter(rng, (120, 120, 115), 15), jitter(rng, (150, 145, 140), 15))
        img, d = new_canvas(arr)
        for _ in range(int(rng.integers(3, 7))):
            x0, y0 = rng.uniform(-8, CANVAS - 8, 2)
            w, h = rng.uniform(12, 30, 2)
            col = jitter(rng, pick(rng, [(200, 200, 205), (170, 180, 190), (150, 150, 150), (210, 205, 190)]), 15)
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=col, outline=jitter(rng, (90, 90, 90), 10))
        arr = np.asarray(img, np.float32)
    elif name == "pasture land":
        arr = _textured(rng, jitter(rng, (125, 160, 75), 20), jitter(rng, (150, 170, 90), 20), (2, 4), 0.7)
        if rng.random() < 0.5:
            dist = _band(rng, 1.0, 0.0)
            arr = np.where((dist < 0)[..., None], arr * 0.8, arr)
    elif name == "permanent crop land":
        soil = _textured(rng, jitter(rng, (150, 125, 85), 20), jitter(rng, (120, 120, 70), 20))
        u, v = _rotated(rng.uniform(0, math.pi))
        sp = rng.uniform(0.06, 0.1)
        sv = sp * rng.uniform(0.6, 1.0)
        du = (u / sp) - np.round(u / sp)
        dv = (v / sv) - np.round(v / sv)
        tree = (du * du + dv * dv) < rng.uniform(0.06, 0.12)
        arr = np.where(tree[..., None], np.array(jitter(rng, (50, 95, 40), 15), np.float32), soil)
    elif name == "residential buildings or homes or apartments":
        arr = _vegetation(rng)
        img, d = new_canvas(arr)
        street = jitter(rng, (130, 130, 130), 15)
        roofs = [(170, 70, 55), (120, 110, 105), (150, 100, 80), (200, 190, 180)]
        step = rng.uniform(10, 16)
        off = rng.uniform(0, step)
        for k in range(-1, int(CANVAS / step) + 2):
            y = off + k * step
            d.rectangle([0, y, CANVAS, y + 2], fill=street)
            widths, gaps, depths = rng.uniform(4, 7, 14), rng.uniform(1.5, 4, 14), rng.uniform(3, step - 5, 14)
            kinds, shades = rng.integers(0, 4, 14), rng.uniform(-15, 15, 14)
            x = rng.uniform(-4, 2)
            for j in range(14):
                if x >= CANVAS:
                    break
                roof = tuple(int(min(255, max(0, c + shades[j]))) for c in roofs[kinds[j]])
                d.rectangle([x, y + 3.5, x + widths[j], y + 3.5 + depths[j]], fill=roof)
                x += widths[j] + gaps[j]
        arr = np.asarray(img.rotate(float(pick(rng, [0, 90])) + rng.uniform(-20, 20), fillcolor=street), np.float32)
    elif name == "river":
        if rng.random() < 0.6:
            arr = _vegetation(rng)
        else:
            arr = _textured(rng, jitter(rng, (150, 150, 90), 20), jitter(rng, (100, 130, 60), 20))
        dist = _band(rng, rng.uniform(5, 12), rng.uniform(0.05, 0.15))
        water = _textured(rng, jitter(rng, (45, 75, 95), 15), jitter(rng, (70, 95, 100), 15), (4, 8))
        arr = np.where((dist < 0)[..., None], water, arr)
    else:  # lake or sea
        arr = _textured(rng, jitter(rng, (25, 55, 100), 15), jitter(rng, (45, 85, 125), 15), (2, 8, 16), 0.6)
        if rng.random() < 0.5:
            y, x = coords()
            cy, cx = rng.choice([-0.2, 1.2], 2)
            r = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) + 0.1 * smooth_noise(rng, 6)
            arr = np.where((r < rng.uniform(0.5, 0.8))[..., None], _vegetation(rng), arr)
    arr = np.rot90(arr, int(rng.integers(0, 4)))
    if clean:
        return finish(np.ascontiguousarray(arr))
    haze = rng.uniform(0, 0.25)
    arr = arr * (1 - haze) + haze * 200
    return finish(arr, rng, blur=rng.uniform(0, 0.3), noise=3.0, colour=(0.15, 0.15, 8))
