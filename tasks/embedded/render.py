"""Drawing primitives shared by the procedural tasks and the pretraining pool.

Everything draws from an explicit ``numpy.random.Generator`` so that an image is a pure
function of its seed. Images are drawn at ``CANVAS`` pixels and box-downsampled to ``SIZE``:
drawing at twice the resolution gives anti-aliased edges without PIL's anti-aliasing flags.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIZE = 32
CANVAS = 64

ALL_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf",
    "cmti10.ttf", "cmtt10.ttf",
)
SIGNAGE_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono-Bold.ttf", "STIXGeneralBol.ttf", "cmss10.ttf", "cmb10.ttf",
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 35, 35), "orange": (235, 130, 30), "yellow": (235, 205, 40),
    "green": (45, 150, 60), "blue": (40, 75, 200), "cyan": (50, 185, 205),
    "purple": (125, 55, 160), "pink": (235, 130, 175), "brown": (120, 75, 40),
    "white": (238, 238, 238), "gray": (128, 128, 128), "black": (22, 22, 22),
}


@functools.lru_cache(maxsize=1)
def font_dir() -> Path:
    """matplotlib's bundled TTFs: a declared dependency, so rendered glyphs do not change
    with whatever system fonts are installed. Imported lazily (``import tasks`` stays light)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=512)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_dir() / name), size)


def jitter(rng: np.random.Generator, rgb, amount: float = 20.0) -> tuple[int, int, int]:
    d = rng.uniform(-amount, amount, 3).tolist() if amount else (0.0, 0.0, 0.0)
    return tuple(min(255, max(0, int(float(c) + e))) for c, e in zip(rgb, d))


def distinct_colours(rng: np.random.Generator, k: int, exclude: tuple[str, ...] = ()) -> list[str]:
    names = [n for n in COLOURS if n not in exclude]
    return [names[i] for i in rng.permutation(len(names))[:k]]


_BANK_FIELDS = 48


@functools.lru_cache(maxsize=64)
def _noise_bank(octaves: tuple[int, ...], size: int, persistence: float) -> np.ndarray:
    """Fixed fields at twice ``size`` (so a ``size`` crop has the requested cell counts),
    drawn once per process from a constant seed: per-image noise is then a cheap crop."""
    rng = np.random.default_rng([len(octaves), *octaves, size, int(persistence * 1000)])
    big = 2 * size
    bank = np.zeros((_BANK_FIELDS, big, big), np.float32)
    for f in range(_BANK_FIELDS):
        amp = 1.0
        for cells in octaves:
            grid = rng.random((2 * cells + 1, 2 * cells + 1), dtype=np.float32)
            bank[f] += amp * np.asarray(Image.fromarray(grid, "F").resize((big, big), Image.BICUBIC))
            amp *= persistence
    return bank


def _bank_crop(rng: np.random.Generator, octaves: tuple[int, ...], size: int, persistence: float) -> np.ndarray:
    bank = _noise_bank(tuple(octaves), size, persistence)
    f, y0, x0, orient = rng.integers(0, (_BANK_FIELDS, size, size, 8))
    crop = bank[f, y0:y0 + size, x0:x0 + size]
    if orient & 1:
        crop = crop[::-1]
    if orient & 2:
        crop = crop[:, ::-1]
    if orient & 4:
        crop = crop.T
    return crop


def smooth_noise(rng: np.random.Generator, cells: int, size: int = CANVAS) -> np.ndarray:
    """Value noise in [0, 1] with about ``cells`` bicubic cells across the canvas."""
    crop = _bank_crop(rng, (cells,), size, 0.5)
    lo, hi = crop.min(), crop.max()
    return (crop - lo) / max(hi - lo, 1e-6)


def fractal_noise(rng: np.random.Generator, octaves=(2, 4, 8, 16), size: int = CANVAS,
                  persistence: float = 0.55) -> np.ndarray:
    """Sum of value-noise octaves, rescaled to [0, 1]."""
    crop = _bank_crop(rng, tuple(octaves), size, persistence)
    lo, hi = crop.min(), crop.max()
    return (crop - lo) / max(hi - lo, 1e-6)


def blend(t: np.ndarray, c0, c1) -> np.ndarray:
    """Per-pixel interpolation between two colours; ``t`` in [0, 1], shape [H, W]."""
    c0 = np.asarray(c0, np.float32)
    return c0 + np.clip(t, 0.0, 1.0)[..., None].astype(np.float32) * (np.asarray(c1, np.float32) - c0)


def vertical_gradient(c_top, c_bottom, height: int, size: int = CANVAS) -> np.ndarray:
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None].repeat(size, 1)
    return blend(t, c_top, c_bottom)


def coords(size: int = CANVAS) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre grid in [0, 1): ``(y, x)``."""
    ax = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(ax, ax, indexing="ij")


def to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def finish(img: Image.Image | np.ndarray, rng: np.random.Generator | None = None,
           blur: float = 0.0, noise: float = 0.0, colour: tuple[float, float, float] | None = None,
           zoom: float = 1.0, hue: float = 0.0, size: int = SIZE) -> np.ndarray:
    """Canvas -> ``[size, size, 3]`` uint8. ``zoom`` > 1 crops a random window of 1/zoom of
    the canvas; ``hue`` rotates the hue by up to that fraction of a turn. Blur (radius in
    output pixels), colour jitter ``(brightness, contrast, tint)`` and Gaussian pixel noise
    act on the small image, where they are four times cheaper than on the canvas."""
    if isinstance(img, np.ndarray):
        img = to_image(img)
    box = None
    if zoom > 1.0 and rng is not None:
        w = img.width / rng.uniform(1.0, zoom)
        x0, y0 = rng.uniform(0, img.width - w, 2)
        box = (x0, y0, x0 + w, y0 + w)
    img = img.resize((size, size), Image.BOX, box=box)
    if hue > 0 and rng is not None:
        hsv = np.array(img.convert("HSV"))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-hue, hue) * 256)) % 256
        img = Image.fromarray(hsv, "HSV").convert("RGB")
    if blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    if rng is None or (noise <= 0 and colour is None):
        return np.array(img, dtype=np.uint8)
    out = np.asarray(img, np.float32)
    if colour is not None:
        out = colour_jitter(rng, out, *colour)
    if noise > 0:
        out = out + rng.normal(0.0, noise, (size, size, 3)).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def colour_jitter(rng: np.random.Generator, arr: np.ndarray, brightness: float | tuple[float, float] = 0.2,
                  contrast: float = 0.2, tint: float = 10.0) -> np.ndarray:
    """Contrast about the mean, a brightness factor and a per-channel tint. ``brightness``
    may be a ``(low, high)`` factor range, e.g. to keep bright images from saturating."""
    a = np.asarray(arr, np.float32)
    mean = float(a.mean())
    lo, hi = brightness if isinstance(brightness, tuple) else (1 - brightness, 1 + brightness)
    c, b = rng.uniform(1 - contrast, 1 + contrast), rng.uniform(lo, hi)
    a = (a - mean) * c + mean * b + rng.uniform(-tint, tint, 3).astype(np.float32)
    return np.clip(a, 0, 255)


def pick(rng: np.random.Generator, seq):
    """A uniform element of ``seq`` (``rng.choice`` is slow on small Python sequences)."""
    return seq[int(rng.integers(len(seq)))]


def polygon(cx: float, cy: float, r: float, n: int, rotation: float = 0.0) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rotation + 2 * math.pi * k / n), cy + r * math.sin(rotation + 2 * math.pi * k / n))
        for k in range(n)
    ]


def star(cx: float, cy: float, r: float, points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        rad = r if k % 2 == 0 else r * inner
        ang = -math.pi / 2 + math.pi * k / points
        out.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return out


def arrow(cx: float, cy: float, r: float, direction: str) -> list[tuple[float, float]]:
    """A block arrow inside a circle of radius ``r`` pointing left/right/up/down."""
    shaft, head, length = 0.22 * r, 0.5 * r, 0.75 * r
    pts = [(-length, -shaft), (0.1 * r, -shaft), (0.1 * r, -head), (length, 0.0),
           (0.1 * r, head), (0.1 * r, shaft), (-length, shaft)]
    rot = {"right": 0.0, "down": math.pi / 2, "left": math.pi, "up": -math.pi / 2}[direction]
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def shape_points(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return polygon(cx, cy + 0.15 * r, r, 3, -math.pi / 2)
    if kind == "inverted triangle":
        return polygon(cx, cy - 0.15 * r, r, 3, math.pi / 2)
    if kind == "square":
        return polygon(cx, cy, r * 1.1, 4, math.pi / 4)
    if kind == "diamond":
        return polygon(cx, cy, r, 4, 0.0)
    if kind == "hexagon":
        return polygon(cx, cy, r, 6, 0.0)
    if kind == "octagon":
        return polygon(cx, cy, r, 8, math.pi / 8)
    if kind == "star":
        return star(cx, cy, r * 1.1)
    if kind == "circle":
        return polygon(cx, cy, r, 48)
    raise ValueError(kind)


def shrink(points, cx: float, cy: float, factor: float) -> list[tuple[float, float]]:
    return [(cx + (x - cx) * factor, cy + (y - cy) * factor) for x, y in points]


def draw_text_centered(draw: ImageDraw.ImageDraw, text: str, cx: float, cy: float,
                       fnt: ImageFont.FreeTypeFont, fill) -> None:
    draw.text((cx, cy), text, font=fnt, fill=fill, anchor="mm")


def clutter_background(rng: np.random.Generator, size: int = CANVAS, spread: float = 70.0,
                       max_rects: int = 5) -> np.ndarray:
    """Street-like clutter: a noisy two-colour field with a few random rectangles."""
    c0 = jitter(rng, rng.integers(30, 225, 3), 0)
    c1 = jitter(rng, c0, spread)
    img = to_image(blend(fractal_noise(rng, (2, 4, 8), size), c0, c1))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, max_rects))):
        x0, y0 = rng.integers(-size // 4, size, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        d.rectangle([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=jitter(rng, c0, spread * 0.85))
    return np.asarray(img, np.float32)


def voronoi(rng: np.random.Generator, n_points: int, size: int = CANVAS, wrap: bool = True):
    """Nearest and second-nearest distances to random sites, plus the nearest site's index."""
    pts = rng.random((n_points, 2), dtype=np.float32)
    y, x = coords(size)
    dy = np.abs(y[..., None] - pts[:, 0])
    dx = np.abs(x[..., None] - pts[:, 1])
    if wrap:
        dy = np.minimum(dy, 1 - dy)
        dx = np.minimum(dx, 1 - dx)
    d = np.sqrt(dx * dx + dy * dy)
    nearest = np.argmin(d, axis=-1)
    two = np.partition(d, 1, axis=-1)
    return two[..., 0], two[..., 1], nearest


def new_canvas(background) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = to_image(background) if isinstance(background, np.ndarray) else Image.new("RGB", (CANVAS, CANVAS), background)
    return img, ImageDraw.Draw(img)
