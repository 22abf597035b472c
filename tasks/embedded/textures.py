"""Texture classes (the DTD analog): crops of GIMP's pattern tiles, or procedural families.

The GIMP tiles come from Debian's ``gimp-data``; each class groups tiles of one describable
kind. The procedural families carry the same class names: they are the stand-in when the
tiles are absent, and the pretraining pool's texture source.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.embedded.render import (
    CANVAS, SIZE, blend, colour_jitter, coords, finish, fractal_noise, jitter, new_canvas,
    smooth_noise, voronoi,
)

TEXTURE_CLASSES = (
    "marbled", "wood grain", "parquet", "stone wall", "cracked", "rippled water",
    "blocky", "wrinkled", "woven", "swirly", "speckled", "bumpy",
)

GIMP_PATTERN_DIR = "/usr/share/gimp/2.0/patterns"
# class -> tiles (``<Category>/<file>``); tiles with transparency are left out.
GIMP_TILES: dict[str, tuple[str, ...]] = {
    "marbled": (
        "Stone/marble1.pat", "Stone/marble2.pat", "Stone/marble3.pat",
        "Stone/pink_marble.pat", "Stone/granite1.pat",
    ),
    "wood grain": (
        "Wood/wood1.pat", "Wood/wood2.pat", "Wood/wood3.pat",
        "Wood/wood4.pat", "Wood/wood5.pat", "Wood/pine.pat",
    ),
    "parquet": ("Wood/parque1.pat", "Wood/parque2.pat", "Wood/parque3.pat"),
    "stone wall": ("Stone/brick.pat", "Stone/rock.pat", "Stone/stone33.pat", "Stone/amethyst.pat"),
    "cracked": ("Stone/ground1.pat", "Stone/cracked.pat"),
    "rippled water": ("Water/pool.pat", "Water/electric.pat", "Legacy/blue.pat"),
    "blocky": (
        "Legacy/redcube.pat", "Legacy/qube1.pat", "Legacy/bluesquares.pat",
        "Legacy/sm_squares.pat", "Legacy/bluegrid.pat",
    ),
    "wrinkled": ("Paper/crinklepaper.pat", "Paper/paper.pat", "Legacy/fibers.pat", "Water/ice.pat"),
    "woven": ("Fabric/burlap.pat", "Stone/terra.pat"),
    "swirly": ("Food/choc_swirl.pat", "Legacy/pastel.pat", "Legacy/nops.pat"),
    "speckled": ("Food/java.pat", "Wood/corkboard.pat", "Wood/burlwood.pat", "Wood/walnut.pat", "Animal/leopard.pat"),
    "bumpy": ("Legacy/3dgreen.pat", "Legacy/blueweb.pat", "Animal/leather.pat", "Legacy/recessed.pat",
              "Stone/Craters.pat", "Stone/Moonfoot.pat", "Stone/slate.pat"),
}


class PatternFormatError(ValueError):
    """A ``.pat`` file whose header does not describe its pixels."""


def read_gimp_pattern(path: str | os.PathLike) -> np.ndarray:
    """A GIMP ``.pat`` tile as uint8 ``[H, W, 3]`` (grey tiles replicated, alpha dropped).

    Header: five big-endian uint32 (header size, version, width, height, bytes per pixel),
    the magic ``GPAT``, then the UTF-8 name; pixels start at the header-size offset.
    """
    raw = Path(path).read_bytes()
    if len(raw) < 24:
        raise PatternFormatError(f"{path}: too short for a GIMP pattern header")
    header_size, _version, width, height, bpp = struct.unpack(">5I", raw[:20])
    if raw[20:24] != b"GPAT" or bpp not in (1, 2, 3, 4):
        raise PatternFormatError(f"{path}: not a GIMP pattern (magic {raw[20:24]!r}, bpp {bpp})")
    pixels = raw[header_size:header_size + width * height * bpp]
    if len(pixels) != width * height * bpp:
        raise PatternFormatError(f"{path}: {len(pixels)} pixel bytes, header says {width * height * bpp}")
    arr = np.frombuffer(pixels, np.uint8).reshape(height, width, bpp)
    if bpp in (1, 2):
        arr = np.repeat(arr[..., :1], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def load_gimp_tiles(root: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Every class's tiles; raises ``FileNotFoundError`` when any listed tile is missing."""
    return {name: [read_gimp_pattern(Path(root) / rel) for rel in rels] for name, rels in GIMP_TILES.items()}


def gimp_crop(rng: np.random.Generator, label: int, tiles: dict[str, list[np.ndarray]]) -> np.ndarray:
    """A random crop of one of the class's seamless tiles (wrapping), rescaled to 32x32,
    with a random quarter turn, flip and colour jitter."""
    tile = tiles[TEXTURE_CLASSES[label]][int(rng.integers(len(tiles[TEXTURE_CLASSES[label]])))]
    h, w = tile.shape[:2]
    crop = int(round(SIZE * rng.uniform(0.6, 1.6)))
    y0, x0 = int(rng.integers(h)), int(rng.integers(w))
    rows = (y0 + np.arange(crop)) % h
    cols = (x0 + np.arange(crop)) % w
    patch = Image.fromarray(np.ascontiguousarray(tile[rows][:, cols]))
    arr = np.asarray(patch.resize((SIZE, SIZE), Image.BILINEAR), np.float32)
    arr = np.rot90(arr, int(rng.integers(4)))
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    # Darken-only brightness: many tiles are near white and would saturate to blank images.
    return np.clip(np.rint(colour_jitter(rng, arr, (0.7, 1.0), 0.2, 10)), 0, 255).astype(np.uint8)


def _palette(rng: np.random.Generator, pairs) -> tuple:
    a, b = pairs[int(rng.integers(len(pairs)))]
    return jitter(rng, a, 20), jitter(rng, b, 20)


def procedural_texture(rng: np.random.Generator, label: int, clean: bool = False) -> np.ndarray:
    """A procedural texture of class ``label`` (same names as the GIMP classes)."""
    name = TEXTURE_CLASSES[label]
    y, x = coords()
    ang = rng.uniform(0, math.pi)
    u = x * math.cos(ang) + y * math.sin(ang)
    v = -x * math.sin(ang) + y * math.cos(ang)
    if name == "marbled":
        c0, c1 = _palette(rng, [
            ((235, 235, 232), (90, 90, 95)),
            ((230, 200, 195), (150, 90, 90)),
            ((60, 60, 60), (210, 210, 210)),
        ])
        t = np.abs(np.sin(u * rng.uniform(8, 18) + 5 * fractal_noise(rng, (2, 4, 8))))
        arr = blend(t ** 0.3, c1, c0)
    elif name == "wood grain":
        c0, c1 = _palette(rng, [
            ((205, 150, 85), (140, 85, 40)),
            ((235, 200, 130), (190, 140, 80)),
            ((120, 70, 35), (70, 40, 20)),
        ])
        r = np.sqrt(((u - rng.uniform(-2, -1)) * 0.2) ** 2 + (v - 0.5) ** 2)
        t = (r * rng.uniform(15, 35) + 1.5 * fractal_noise(rng, (2, 4))) % 1.0
        arr = blend(t, c0, c1)
    elif name == "parquet":
        c0, c1 = _palette(rng, [((195, 130, 70), (150, 90, 45)), ((220, 170, 110), (170, 120, 70))])
        b = rng.uniform(0.16, 0.3)
        cell = (np.floor(x / b) + np.floor(y / b)) % 2
        along = np.where(cell == 0, x, y)
        across = np.where(cell == 0, y, x)
        plank = np.floor(across / (b / rng.integers(3, 5)))
        t = 0.5 + 0.5 * np.sin(plank * 2.3 + along * 25)
        arr = blend(t, c0, c1)
        edge = (np.abs((across / (b / 4)) % 1 - 0.5) > 0.44)
        arr = np.where(edge[..., None], arr * 0.6, arr)
    elif name == "stone wall":
        if rng.random() < 0.5:
            bh = rng.uniform(0.1, 0.18)
            bw = bh * rng.uniform(1.8, 2.6)
            row = np.floor(y / bh)
            xx = x + (row % 2) * bw / 2
            col = np.floor(xx / bw)
            mortar = (np.abs((y / bh) % 1 - 0.5) > 0.42) | (np.abs((xx / bw) % 1 - 0.5) > 0.46)
            shade = 0.8 + 0.4 * ((row * 7 + col * 13) % 5) / 5
            base = np.asarray(jitter(rng, (165, 75, 50), 25), np.float32)
            arr = base * shade[..., None]
        else:
            d1, d2, idx = voronoi(rng, int(rng.integers(8, 20)))
            mortar = (d2 - d1) < 0.025
            shade = 0.7 + 0.6 * ((idx * 37) % 11) / 11
            arr = np.asarray(jitter(rng, (130, 125, 115), 25), np.float32) * shade[..., None]
        arr = np.where(mortar[..., None], np.asarray(jitter(rng, (200, 195, 185), 15), np.float32), arr)
        arr = arr * (0.85 + 0.3 * smooth_noise(rng, 16))[..., None]
    elif name == "cracked":
        c0, c1 = _palette(rng, [
            ((200, 160, 110), (90, 60, 40)),
            ((150, 150, 150), (50, 50, 50)),
            ((220, 200, 170), (120, 100, 80)),
        ])
        d1, d2, _ = voronoi(rng, int(rng.integers(8, 25)))
        crack = np.clip((d2 - d1) * rng.uniform(25, 45), 0, 1)
        arr = blend(crack * (0.8 + 0.2 * fractal_noise(rng)), c1, c0)
    elif name == "rippled water":
        c0, c1 = _palette(rng, [
            ((20, 70, 160), (120, 190, 230)),
            ((10, 40, 110), (60, 140, 210)),
            ((30, 110, 130), (150, 220, 220)),
        ])
        t = np.zeros_like(x)
        for _ in range(3):
            a = rng.uniform(0, 2 * math.pi)
            t += np.sin((x * math.cos(a) + y * math.sin(a)) * rng.uniform(15, 35) + 3 * smooth_noise(rng, 3))
        arr = blend(0.5 + t / 6, c0, c1)
    elif name == "blocky":
        img, d = new_canvas(jitter(rng, (120, 120, 140), 60))
        for _ in range(int(rng.integers(8, 20))):
            x0, y0 = rng.uniform(-10, CANVAS, 2)
            w, h = rng.uniform(6, 22, 2)
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=jitter(rng, rng.integers(0, 256, 3), 0),
                        outline=(30, 30, 30) if rng.random() < 0.5 else None)
        arr = np.asarray(img, np.float32)
    elif name == "wrinkled":
        c0, c1 = _palette(rng, [
            ((235, 225, 205), (170, 160, 140)),
            ((225, 230, 240), (150, 160, 175)),
            ((230, 190, 160), (170, 130, 100)),
        ])
        t = np.abs(fractal_noise(rng, (4, 8, 16)) - 0.5) * 2
        arr = blend(t ** 0.5, c1, c0)
    elif name == "woven":
        c0, c1 = _palette(rng, [
            ((180, 150, 100), (120, 90, 60)),
            ((210, 120, 60), (140, 60, 30)),
            ((200, 190, 170), (120, 110, 100)),
        ])
        p = rng.uniform(0.08, 0.16)
        cu, cv = np.floor(u / p), np.floor(v / p)
        over = (cu + cv) % 2 == 0
        fu, fv = (u / p) % 1, (v / p) % 1
        t = np.where(over, np.sin(math.pi * fv), np.sin(math.pi * fu))
        arr = blend(t * (0.8 + 0.2 * np.where(over, np.sin(fu * 20), np.sin(fv * 20))), c1, c0)
    elif name == "swirly":
        c0, c1 = _palette(rng, [
            ((120, 60, 30), (230, 180, 140)),
            ((90, 40, 140), (240, 200, 90)),
            ((30, 30, 30), (220, 220, 220)),
        ])
        cy, cx = rng.uniform(0.3, 0.7, 2)
        r = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
        th = np.arctan2(y - cy, x - cx)
        t = 0.5 + 0.5 * np.sin(th * rng.integers(2, 6) + r * rng.uniform(15, 35) + 2 * smooth_noise(rng, 4))
        arr = blend(t, c0, c1)
    elif name == "speckled":
        base = jitter(rng, rng.integers(60, 220, 3), 0)
        arr = blend(fractal_noise(rng, (4, 8)), base, jitter(rng, base, 30))
        img, d = new_canvas(arr)
        dot = jitter(rng, rng.integers(0, 256, 3), 0)
        for _ in range(int(rng.integers(40, 120))):
            cx, cy = rng.uniform(0, CANVAS, 2)
            rr = rng.uniform(0.6, 2.0)
            d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=jitter(rng, dot, 30))
        arr = np.asarray(img, np.float32)
    else:  # bumpy
        c0 = jitter(rng, rng.integers(50, 200, 3), 0)
        p = rng.uniform(0.08, 0.16)
        fu, fv = (u / p) % 1 - 0.5, (v / p) % 1 - 0.5
        h = np.clip(1 - 4 * (fu * fu + fv * fv), 0, 1) + 0.3 * smooth_noise(rng, 12)
        light = np.clip(0.6 + 1.5 * (np.roll(h, 1, 0) - h + np.roll(h, 1, 1) - h), 0.2, 1.4)
        arr = np.asarray(c0, np.float32) * light[..., None]
    if clean:
        return finish(np.asarray(arr, np.float32))
    return finish(np.asarray(arr, np.float32), rng, noise=3.0, colour=(0.15, 0.15, 8))
