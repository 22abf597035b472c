"""Rendered objects: vehicles (the Cars analog), traffic signs (GTSRB), house numbers (SVHN)
and garment silhouettes (the stand-in used when Fashion-MNIST is not installed)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from tasks.embedded.render import (
    CANVAS, COLOURS, SIGNAGE_FONTS, arrow, clutter_background, finish, font, jitter, new_canvas,
    pick, shape_points, shrink,
)

VEHICLE_CLASSES = (
    "sedan", "hatchback", "station wagon", "pickup truck", "van",
    "bus", "sports car", "SUV", "limousine", "box truck",
)

# Side profiles in units of the vehicle's length (x, 0 = front) and height (y, up), with the
# wheel positions and radius. Classes differ in roof line, rear shape, height and wheelbase.
_PROFILES: dict[str, dict] = {
    "sedan": dict(aspect=0.36, wheels=(0.18, 0.8), r=0.1, body=[
        (0, .12), (0, .38), (.26, .44), (.38, .7), (.66, .7), (.8, .46), (1, .44), (1, .12)]),
    "hatchback": dict(aspect=0.44, wheels=(0.2, 0.8), r=0.11, body=[
        (0, .12), (0, .38), (.25, .45), (.4, .75), (.8, .75), (.97, .5), (1, .14)]),
    "station wagon": dict(aspect=0.38, wheels=(0.17, 0.8), r=0.1, body=[
        (0, .12), (0, .38), (.24, .44), (.36, .72), (.95, .72), (1, .46), (1, .12)]),
    "pickup truck": dict(aspect=0.42, wheels=(0.17, 0.8), r=0.12, body=[
        (0, .15), (0, .45), (.2, .5), (.3, .8), (.55, .8), (.57, .5), (1, .5), (1, .15)]),
    "van": dict(aspect=0.52, wheels=(0.17, 0.82), r=0.1, body=[
        (0, .12), (0, .42), (.12, .55), (.22, .92), (.98, .92), (1, .85), (1, .12)]),
    "bus": dict(aspect=0.34, wheels=(0.14, 0.78), r=0.07, body=[
        (0, .08), (0, .9), (.02, .96), (.98, .96), (1, .9), (1, .08)]),
    "sports car": dict(aspect=0.27, wheels=(0.18, 0.8), r=0.12, body=[
        (0, .15), (0, .3), (.35, .42), (.5, .68), (.7, .66), (1, .42), (1, .15)]),
    "SUV": dict(aspect=0.48, wheels=(0.18, 0.8), r=0.13, body=[
        (0, .2), (0, .5), (.22, .55), (.32, .86), (.92, .86), (1, .78), (1, .2)]),
    "limousine": dict(aspect=0.24, wheels=(0.12, 0.87), r=0.08, body=[
        (0, .12), (0, .38), (.17, .44), (.25, .7), (.85, .7), (.9, .46), (1, .44), (1, .12)]),
    "box truck": dict(aspect=0.5, wheels=(0.15, 0.65, 0.85), r=0.1, body=[
        (0, .12), (0, .45), (.07, .6), (.12, .72), (.28, .72), (.28, .98), (1, .98), (1, .12)]),
}
_WINDOW_LINE = {  # (x0, x1, y0, y1) of the glass band along the roof line
    "sedan": (.36, .68, .48, .66), "hatchback": (.38, .82, .5, .71), "station wagon": (.35, .92, .48, .68),
    "pickup truck": (.3, .54, .55, .76), "van": (.2, .9, .6, .86), "bus": (.04, .96, .55, .86),
    "sports car": (.48, .68, .45, .63), "SUV": (.3, .9, .58, .82), "limousine": (.24, .86, .48, .66),
    "box truck": (.09, .26, .48, .68),
}


def vehicle(rng: np.random.Generator, label: int, clean: bool = False) -> np.ndarray:
    """Side view of one vehicle; ``clean`` = plain light background and no pose noise."""
    name = VEHICLE_CLASSES[label]
    prof = _PROFILES[name]
    length = rng.uniform(46, 60) if not clean else 54.0
    height = length * prof["aspect"] * (1.0 if clean else rng.uniform(0.9, 1.1))
    x0 = (CANVAS - length) / 2 + (0 if clean else rng.uniform(-5, 5))
    ground = CANVAS * (0.62 if clean else rng.uniform(0.55, 0.75)) + height / 2
    if clean:
        img, d = new_canvas(jitter(rng, (225, 225, 228), 10))
    else:
        horizon = int(rng.uniform(0.3, 0.7) * CANVAS)
        bg = clutter_background(rng)
        bg[horizon:] = bg[horizon:] * 0.5 + 0.5 * np.asarray(jitter(rng, (110, 110, 105), 30), np.float32)
        img, d = new_canvas(bg)
    flip = bool(rng.random() < 0.5)

    def pt(x: float, y: float) -> tuple[float, float]:
        if flip:
            x = 1 - x
        return (x0 + x * length, ground - y * height)

    body = jitter(rng, COLOURS[pick(rng, list(COLOURS))], 25)
    d.polygon([pt(x, y) for x, y in prof["body"]], fill=body)
    wx0, wx1, wy0, wy1 = _WINDOW_LINE[name]
    glass = jitter(rng, (150, 185, 215), 20)
    if name == "bus":
        n = 6
        for k in range(n):
            a = wx0 + (wx1 - wx0) * k / n
            b = a + (wx1 - wx0) / n * 0.8
            d.polygon([pt(a, wy0), pt(b, wy0), pt(b, wy1), pt(a, wy1)], fill=glass)
    else:
        d.polygon([pt(wx0, wy0), pt(wx1, wy0), pt(wx1 - 0.03, wy1), pt(wx0 + 0.04, wy1)], fill=glass)
        if name in ("sedan", "station wagon", "limousine", "SUV", "hatchback", "van"):
            mid = (wx0 + wx1) / 2
            d.line([pt(mid, wy0), pt(mid, wy1)], fill=body, width=2)
    if name == "pickup truck":
        d.line([pt(0.58, 0.5), pt(1.0, 0.5)], fill=tuple(int(c * 0.6) for c in body), width=2)
    r = prof["r"] * length
    for wx in prof["wheels"]:
        cx, cy = pt(wx, 0.0)
        cy = ground - r * 0.55
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(25, 25, 28))
        d.ellipse([cx - r * 0.45, cy - r * 0.45, cx + r * 0.45, cy + r * 0.45], fill=jitter(rng, (160, 160, 165), 15))
    if clean:
        return finish(img)
    return finish(img, rng, blur=rng.uniform(0, 0.3), noise=4.0, colour=(0.2, 0.2, 10))


SIGN_CLASSES = (
    "stop", "yield", "no entry", "speed limit 30", "speed limit 50", "speed limit 80",
    "general caution", "turn left ahead", "turn right ahead", "ahead only", "priority road",
    "end of all restrictions",
)


def draw_sign(d: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float,
              rng: np.random.Generator, font_name: str = "DejaVuSans-Bold.ttf") -> None:
    """Draw sign ``name`` (one of SIGN_CLASSES) centred at (cx, cy) with radius r."""
    red, white, black = jitter(rng, (200, 30, 35), 20), jitter(rng, (238, 238, 238), 12), jitter(rng, (25, 25, 25), 10)
    blue, yellow = jitter(rng, (30, 70, 170), 20), jitter(rng, (240, 190, 30), 15)
    if name == "stop":
        pts = shape_points("octagon", cx, cy, r)
        d.polygon(pts, fill=white)
        d.polygon(shrink(pts, cx, cy, 0.9), fill=red)
        d.text((cx, cy), "STOP", font=font(font_name, max(int(r * 0.62), 6)), fill=white, anchor="mm")
    elif name in ("yield", "general caution"):
        kind = "inverted triangle" if name == "yield" else "triangle"
        pts = shape_points(kind, cx, cy, r * 1.1)
        d.polygon(pts, fill=red)
        inner_c = (cx, cy - 0.15 * r) if name == "yield" else (cx, cy + 0.15 * r)
        d.polygon(shrink(pts, *inner_c, 0.6), fill=white)
        if name == "general caution":
            d.text((cx, cy + 0.2 * r), "!", font=font(font_name, max(int(r * 0.8), 6)), fill=black, anchor="mm")
    elif name == "no entry":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=red)
        d.rectangle([cx - 0.7 * r, cy - 0.18 * r, cx + 0.7 * r, cy + 0.18 * r], fill=white)
    elif name.startswith("speed limit"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=red)
        d.ellipse([cx - 0.78 * r, cy - 0.78 * r, cx + 0.78 * r, cy + 0.78 * r], fill=white)
        d.text((cx, cy), name.split()[-1], font=font(font_name, max(int(r * 0.95), 6)), fill=black, anchor="mm")
    elif name in ("turn left ahead", "turn right ahead", "ahead only"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=blue)
        direction = {"turn left ahead": "left", "turn right ahead": "right", "ahead only": "up"}[name]
        d.polygon(arrow(cx, cy, r, direction), fill=white)
    elif name == "priority road":
        pts = shape_points("diamond", cx, cy, r * 1.05)
        d.polygon(pts, fill=white)
        d.polygon(shrink(pts, cx, cy, 0.68), fill=yellow)
    elif name == "end of all restrictions":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter(rng, (90, 90, 90), 10))
        d.ellipse([cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r], fill=white)
        k = 0.62 * r
        d.line([(cx - k, cy + k), (cx + k, cy - k)], fill=black, width=max(int(r * 0.22), 2))
    else:
        raise ValueError(name)


def sign(rng: np.random.Generator, label: int, clean: bool = False) -> np.ndarray:
    """A traffic sign on clutter, with pose, scale, lighting and blur variation."""
    name = SIGN_CLASSES[label]
    font_name = pick(rng, SIGNAGE_FONTS)
    if clean:
        layer = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)
        draw_sign(d, name, CANVAS / 2, CANVAS / 2, 24, rng, font_name)
        img, _ = new_canvas(jitter(rng, (225, 225, 228), 10))
        img.paste(layer, (0, 0), layer)
        return finish(img)
    bg = clutter_background(rng)
    img, d = new_canvas(bg)
    r = rng.uniform(13, 26)
    cx, cy = CANVAS / 2 + rng.uniform(-6, 6, 2)
    if rng.random() < 0.4:
        d.rectangle([cx - 1.5, cy, cx + 1.5, CANVAS], fill=jitter(rng, (120, 120, 120), 20))
    layer = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    draw_sign(ImageDraw.Draw(layer), name, cx, cy, r, rng, font_name)
    layer = layer.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR, center=(cx, cy))
    img.paste(layer, (0, 0), layer)
    return finish(img, rng, blur=rng.uniform(0, 0.7), noise=4.0, colour=(0.4, 0.15, 15))


HOUSENUM_CLASSES = tuple(str(d) for d in range(10))


def house_number(rng: np.random.Generator, label: int, clean: bool = False) -> np.ndarray:
    """The centre digit ``label`` of a house number, with neighbouring digits cut by the frame."""
    font_name = pick(rng, SIGNAGE_FONTS)
    if clean:
        img, d = new_canvas(jitter(rng, (225, 225, 228), 10))
        d.text((CANVAS / 2, CANVAS / 2), str(label), font=font(font_name, 44), fill=(25, 25, 25), anchor="mm")
        return finish(img)
    bg = clutter_background(rng, spread=45.0, max_rects=4)
    bg_level = float(bg.mean())
    target = rng.uniform(0, bg_level - 90) if bg_level > 127 else rng.uniform(bg_level + 90, 255)
    hue = rng.uniform(0, 255, 3)
    fg_t = tuple(int(v) for v in np.clip(hue - hue.mean() + target, 0, 255))
    size = int(rng.uniform(38, 54))
    fnt = font(font_name, size)
    left = str(rng.integers(0, 10)) if rng.random() < 0.45 else ""
    right = str(rng.integers(0, 10)) if rng.random() < 0.45 else ""
    text = left + str(label) + right
    x_label = fnt.getlength(left) + fnt.getlength(str(label)) / 2
    spacing = rng.uniform(0.02, 0.2) * size
    layer = Image.new("RGBA", (CANVAS * 2, CANVAS), (0, 0, 0, 0))
    ld = ImageDraw.Draw(layer)
    x = CANVAS - x_label
    for k, ch in enumerate(text):
        ld.text((x, CANVAS / 2), ch, font=fnt, fill=fg_t + (255,), anchor="lm")
        x += fnt.getlength(ch) + (spacing if k < len(text) - 1 else 0)
    centre_shift = spacing if left else 0.0
    layer = layer.crop((int(CANVAS / 2 + centre_shift), 0, int(CANVAS / 2 + centre_shift) + CANVAS, CANVAS))
    layer = layer.rotate(rng.uniform(-5, 5), resample=Image.BILINEAR,
                         translate=(float(rng.uniform(-2, 2)), float(rng.uniform(-3, 3))))
    img, _ = new_canvas(bg)
    img.paste(layer, (0, 0), layer)
    return finish(img, rng, blur=rng.uniform(0, 0.7), noise=4.0, colour=(0.25, 0.2, 10))


GARMENT_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
_GARMENTS: dict[str, list[tuple[float, float]]] = {
    "t-shirt": [(.36, .12), (.45, .16), (.55, .16), (.64, .12), (.9, .3), (.8, .42), (.72, .36),
                (.72, .9), (.28, .9), (.28, .36), (.2, .42), (.1, .3)],
    "trouser": [(.3, .06), (.7, .06), (.74, .94), (.57, .94), (.5, .35), (.43, .94), (.26, .94)],
    "pullover": [(.36, .1), (.64, .1), (.82, .2), (.93, .86), (.81, .88), (.72, .42), (.72, .9),
                 (.28, .9), (.28, .42), (.19, .88), (.07, .86), (.18, .2)],
    "dress": [(.4, .06), (.6, .06), (.62, .34), (.8, .94), (.2, .94), (.38, .34)],
    "coat": [(.36, .06), (.64, .06), (.84, .16), (.95, .9), (.83, .92), (.74, .4), (.74, .96),
             (.26, .96), (.26, .4), (.17, .92), (.05, .9), (.16, .16)],
    "sandal": [(.04, .62), (.96, .6), (.96, .74), (.04, .76)],
    "shirt": [(.36, .1), (.5, .2), (.64, .1), (.82, .2), (.93, .86), (.81, .88), (.72, .42), (.72, .92),
              (.28, .92), (.28, .42), (.19, .88), (.07, .86), (.18, .2)],
    "sneaker": [(.04, .56), (.42, .46), (.58, .34), (.74, .36), (.96, .6), (.96, .76), (.04, .76)],
    "bag": [(.14, .34), (.86, .34), (.9, .9), (.1, .9)],
    "ankle boot": [(.34, .1), (.66, .1), (.68, .55), (.96, .68), (.96, .86), (.1, .86), (.12, .6), (.32, .55)],
}


def garment(rng: np.random.Generator, label: int, clean: bool = False) -> np.ndarray:
    """A grey garment silhouette on black in Fashion-MNIST's layout (28x28 padded to 32).

    Pose (scale per axis, shift, tilt, flip), outline jitter, tone, shading and fabric
    stripes vary so that the silhouettes are not separable by a linear model on pixels."""
    name = GARMENT_CLASSES[label]
    s = 56
    img = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(img)
    sx, sy = (1.0, 1.0) if clean else tuple(rng.uniform(0.72, 1.05, 2))
    off = (0.0, 0.0) if clean else tuple(rng.uniform(-0.08, 0.08, 2))
    amt = 0.0 if clean else 0.04

    def tr(p):
        x, y = p
        x, y = x + rng.uniform(-amt, amt), y + rng.uniform(-amt, amt)
        return ((0.5 + (x - 0.5) * sx + off[0]) * s, (0.5 + (y - 0.5) * sy + off[1]) * s)

    tone = int(rng.uniform(90, 240))
    d.polygon([tr(p) for p in _GARMENTS[name]], fill=tone)
    dark = max(tone - 70, 20)
    if name == "coat":
        d.line([tr((.5, .1)), tr((.5, .95))], fill=dark, width=2)
    if name == "shirt":
        for y in np.arange(.3, .9, .12):
            cx, cy = tr((.5, y))
            d.ellipse([cx - 1, cy - 1, cx + 1, cy + 1], fill=dark)
    if not clean and name in ("t-shirt", "pullover", "dress", "coat", "shirt") and rng.random() < 0.35:
        period = rng.uniform(0.06, 0.12)
        for y in np.arange(.2, .9, period):
            d.line([tr((.3, y)), tr((.7, y))], fill=dark)
    if name == "sandal":
        for k in range(int(rng.integers(2, 5))):
            x = .2 + .2 * k
            d.line([tr((x, .62)), tr((x + .15, .35)), tr((x + .3, .6))], fill=tone, width=3)
    if name == "sneaker":
        for x in np.arange(.45, .7, .06):
            d.line([tr((x, .44)), tr((x + .05, .52))], fill=dark)
        d.polygon([tr((.04, .7)), tr((.96, .7)), tr((.96, .76)), tr((.04, .76))], fill=min(tone + 40, 255))
    if name == "bag":
        (x0, y0), (x1, y1) = tr((.3, .1)), tr((.7, .55))
        d.arc([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], 180, 360, fill=tone, width=3)
    if name == "ankle boot":
        d.polygon([tr((.12, .84)), tr((.26, .84)), tr((.26, .95)), tr((.12, .95))], fill=dark)
    if not clean:
        img = img.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(img.resize((28, 28), Image.BOX), np.float32)
    if not clean:
        shade = np.linspace(rng.uniform(0.6, 1.1), rng.uniform(0.6, 1.1), 28, dtype=np.float32)[:, None]
        arr = arr * shade * (0.85 + 0.3 * rng.random(arr.shape).astype(np.float32)) * (arr > 8)
    out = np.zeros((32, 32), np.float32)
    out[2:30, 2:30] = arr
    return np.repeat(np.clip(np.rint(out), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
