"""A captioned, generated image pool for CLIP-style pretraining of the embedded suite.

Captions reuse the tasks' vocabulary (digits, sign names, scene, vehicle, land-cover,
garment and texture names, colours, shapes) so that zero-shot text heads built from the
tasks' class names and templates have something to transfer from. The images differ from
the tasks' in style: frontal, centred, plain or textured backgrounds without the tasks'
clutter, pose and lighting changes; digits and letters come from fonts, never from the real
handwritten or photographed sets. Every image uses the seed stream ``[POOL_STREAM, seed, i]``,
which no task split uses, and no real image enters the pool.
"""

from __future__ import annotations

import re
import string

import numpy as np
import torch
from PIL import Image

from tasks.embedded import objects, scenes, textures
from tasks.embedded.render import (
    ALL_FONTS, CANVAS, COLOURS, blend, distinct_colours, finish, font, jitter, new_canvas, pick,
    shape_points, vertical_gradient,
)

POOL_STREAM = 7919
_ARTICLE = re.compile(r'\ba (?="?[aeiou])')
SHAPES = ("circle", "square", "triangle", "inverted triangle", "diamond", "hexagon", "octagon", "star")
_SIGN_WORDS = {
    "stop": "a red octagon with the word STOP",
    "yield": "a red and white inverted triangle",
    "no entry": "a red circle with a white bar",
    "speed limit 30": "a red ring around the number 30",
    "speed limit 50": "a red ring around the number 50",
    "speed limit 80": "a red ring around the number 80",
    "general caution": "a red triangle with an exclamation mark",
    "turn left ahead": "a blue circle with a white arrow pointing left",
    "turn right ahead": "a blue circle with a white arrow pointing right",
    "ahead only": "a blue circle with a white arrow pointing up",
    "priority road": "a yellow diamond with a white border",
    "end of all restrictions": "a white circle with a black diagonal stripe",
}


def _background(rng: np.random.Generator, exclude: tuple[str, ...]) -> tuple[np.ndarray, str, bool]:
    """A plain, gradient, striped, checkered or textured background, its description, and
    whether it is plain (a busy one gets an outline around glyphs)."""
    kind = pick(rng, ["plain", "plain", "gradient", "striped", "checkered", "texture"])
    name = distinct_colours(rng, 1, exclude)[0]
    c = np.asarray(jitter(rng, COLOURS[name], 15), np.float32)
    if kind == "plain":
        return np.broadcast_to(c, (CANVAS, CANVAS, 3)).copy(), f"a {name} background", True
    if kind == "gradient":
        other = distinct_colours(rng, 1, exclude + (name,))[0]
        return vertical_gradient(c, jitter(rng, COLOURS[other], 15), CANVAS), f"a {name} and {other} background", False
    if kind in ("striped", "checkered"):
        other = np.asarray(jitter(rng, c, 70), np.float32)
        period = int(rng.integers(6, 14))
        yy, xx = np.mgrid[0:CANVAS, 0:CANVAS]
        if kind == "striped":
            mask = ((xx + yy * int(rng.integers(0, 2))) // period) % 2 == 0
        else:
            mask = ((xx // period) + (yy // period)) % 2 == 0
        return np.where(mask[..., None], c, other), f"a {kind} background", False
    label = int(rng.integers(len(textures.TEXTURE_CLASSES)))
    tex = textures.procedural_texture(rng, label, clean=True)
    arr = np.asarray(Image.fromarray(tex).resize((CANVAS, CANVAS), Image.BILINEAR), np.float32)
    return arr, f"a {textures.TEXTURE_CLASSES[label]} background", False


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _glyph(rng: np.random.Generator, text: str) -> tuple[np.ndarray, str, str]:
    fg = distinct_colours(rng, 1)[0]
    close = tuple(n for n, c in COLOURS.items() if abs(_luma(c) - _luma(COLOURS[fg])) < 60)
    bg, bg_desc, plain = _background(rng, exclude=close)
    img, d = new_canvas(bg)
    size = int(rng.uniform(26, 46)) if len(text) == 1 else int(rng.uniform(20, 30))
    cx, cy = CANVAS / 2 + rng.uniform(-6, 6), CANVAS / 2 + rng.uniform(-6, 6)
    d.text((cx, cy), text, font=font(pick(rng, ALL_FONTS), size), fill=jitter(rng, COLOURS[fg], 15),
           anchor="mm", stroke_width=0 if plain else 2,
           stroke_fill=(0, 0, 0) if fg != "black" else (255, 255, 255))
    return finish(img), fg, bg_desc


def _digit(rng):
    d = str(rng.integers(10))
    img, fg, bg = _glyph(rng, d)
    caption = pick(rng, [
        f"a photo of the digit {d}.", f'a photo of the number "{d}".', f"the number {d} in {fg} on {bg}.",
        f"a {fg} digit {d} on {bg}.", f"the digit {d}.",
    ])
    return img, caption


def _number(rng):
    n = str(int(rng.integers(10, 1000)))
    img, fg, bg = _glyph(rng, n)
    caption = pick(rng, [f'a photo of the number "{n}".', f"the number {n} written in {fg}.",
                              f"a house number {n}.", f"the number {n} on {bg}."])
    return img, caption


def _letter(rng):
    ch = pick(rng, list(string.ascii_letters))
    img, fg, bg = _glyph(rng, ch)
    case = "capital " if ch.isupper() else ""
    caption = pick(rng, [f"a photo of the {case}letter {ch}.", f"a {fg} {case}letter {ch} on {bg}.",
                              f"the letter {ch.upper()}."])
    return img, caption


def _shape(rng):
    shape = pick(rng, SHAPES)
    colour = distinct_colours(rng, 1)[0]
    bg, bg_desc, _ = _background(rng, exclude=(colour,))
    img, d = new_canvas(bg)
    r = rng.uniform(12, 24)
    cx, cy = CANVAS / 2 + rng.uniform(-8, 8, 2)
    d.polygon(shape_points(shape, cx, cy, r), fill=jitter(rng, COLOURS[colour], 15))
    caption = pick(rng, [f"a {colour} {shape} on {bg_desc}.", f"a photo of a {colour} {shape}.",
                              f"a {shape} in {colour}."])
    return finish(img), caption


def _sign(rng):
    label = int(rng.integers(len(objects.SIGN_CLASSES)))
    name = objects.SIGN_CLASSES[label]
    img = objects.sign(rng, label, clean=True)
    caption = pick(rng, [f'a "{name}" traffic sign.', f"a photo of a {name} sign.",
                              f"a traffic sign: {_SIGN_WORDS[name]}.", f"{_SIGN_WORDS[name]}, the {name} sign."])
    return img, caption


def _texture(rng):
    label = int(rng.integers(len(textures.TEXTURE_CLASSES)))
    name = textures.TEXTURE_CLASSES[label]
    img = textures.procedural_texture(rng, label, clean=bool(rng.random() < 0.5))
    caption = pick(rng, [f"a photo of a {name} texture.", f"a {name} pattern.",
                              f"a close-up of a {name} surface.", f"{name}."])
    return img, caption


def _scene(rng):
    label = int(rng.integers(len(scenes.SCENE_CLASSES)))
    name = scenes.SCENE_CLASSES[label]
    img = scenes.scene(rng, label, clean=True)
    caption = pick(rng, [f"a photo of a {name}.", f"a drawing of a {name}.", f"a landscape: {name}."])
    return img, caption


def _vehicle(rng):
    label = int(rng.integers(len(objects.VEHICLE_CLASSES)))
    name = objects.VEHICLE_CLASSES[label]
    img = objects.vehicle(rng, label, clean=True)
    caption = pick(rng, [f"a photo of a {name}.", f"a drawing of a {name} seen from the side.",
                              f"a {name}, a type of vehicle."])
    return img, caption


def _aerial(rng):
    label = int(rng.integers(len(scenes.LANDCOVER_CLASSES)))
    name = scenes.LANDCOVER_CLASSES[label]
    img = scenes.landcover(rng, label, clean=True)
    caption = pick(rng, [f"a satellite photo of {name}.", f"an aerial view of {name}.", f"{name} seen from above."])
    return img, caption


def _garment(rng):
    label = int(rng.integers(len(objects.GARMENT_CLASSES)))
    name = objects.GARMENT_CLASSES[label]
    img = objects.garment(rng, label, clean=bool(rng.random() < 0.5))
    if rng.random() < 0.5:  # coloured on a light background: a style the tasks never show
        colour = distinct_colours(rng, 1, ("white", "black"))[0]
        t = img[..., :1].astype(np.float32) / 255.0
        img = blend(t[..., 0], (235, 235, 235), jitter(rng, COLOURS[colour], 15)).astype(np.uint8)
        caption = pick(rng, [f"a {colour} {name}.", f"a photo of a {colour} {name}, a type of clothing."])
    else:
        caption = pick(rng, [f"a photo of a {name}.", f"a {name}, a type of clothing.", f"a picture of a {name}."])
    return img, caption


FAMILIES = {
    "digit": (_digit, 0.16), "number": (_number, 0.06), "letter": (_letter, 0.08), "shape": (_shape, 0.12),
    "sign": (_sign, 0.10), "texture": (_texture, 0.12), "scene": (_scene, 0.10), "vehicle": (_vehicle, 0.09),
    "aerial": (_aerial, 0.09), "garment": (_garment, 0.08),
}
_NAMES = list(FAMILIES)
_PROBS = np.array([FAMILIES[k][1] for k in _NAMES]) / sum(FAMILIES[k][1] for k in _NAMES)


def pool_item(seed: int, index: int) -> tuple[np.ndarray, str, str]:
    """The pool's ``index``-th image, caption and family: a pure function of (seed, index)."""
    rng = np.random.default_rng([POOL_STREAM, seed, index])
    family = _NAMES[int(rng.choice(len(_NAMES), p=_PROBS))]
    img, caption = FAMILIES[family][0](rng)
    return np.ascontiguousarray(img, dtype=np.uint8), _ARTICLE.sub("an ", caption), family


def pretraining_pool(n: int, seed: int = 1, size: str = "full") -> tuple[torch.Tensor, list[str]]:
    """``n`` generated images (uint8 ``[n, 32, 32, 3]``) with captions.

    ``size`` names the task suite the pool is used with ("full" or "tiny"); the images do
    not depend on it, since the pool's seed streams are disjoint from every task's at any
    size. The first ``k`` items of a larger pool equal a smaller pool with the same seed.
    """
    from tasks.embedded.data import SIZES

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if n < 0:
        raise ValueError("n must be >= 0")
    images = np.zeros((n, 32, 32, 3), np.uint8)
    captions: list[str] = []
    for i in range(n):
        images[i], caption, _ = pool_item(seed, i)
        captions.append(caption)
    return torch.from_numpy(images), captions
