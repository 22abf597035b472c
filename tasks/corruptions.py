"""ImageNet-C-style corrupted test splits, deterministic per image and cached on disk.

The corruptions come from ``imagecorruptions`` (PyPI ``imagecorruptions-imaug``, the
maintained fork of the ImageNet-C code that works with current numpy / scikit-image and on
small images). Most corruptions draw from numpy's global random state, so every image is
corrupted under its own seed. Two draw elsewhere, where no global seed reaches: impulse noise
(scikit-image's ``random_noise``) and glass blur (a numba-compiled shuffle, whose generator is
numba's own); the package takes a ``seed`` argument for those, and gets the image's seed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from tasks.base import CLIP_MEAN, CLIP_STD, InMemoryTask, Task, normalize_uint8

#: The paper's seven corruptions (robustness experiments of AdaMerging and WeMoE).
PAPER_CORRUPTIONS = ("motion_blur", "impulse_noise", "gaussian_noise", "pixelate", "spatter", "contrast",
                     "jpeg_compression")
#: Every corruption name accepted (ImageNet-C's 15 + 4 extra, as named by imagecorruptions).
ALL_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)

#: Corruptions whose randomness no global numpy seed reaches: the package's ``seed`` argument does.
SEEDED_BY_ARGUMENT = ("impulse_noise", "glass_blur")
#: Enters the cache key of a corrupted split: a corruption's output for a given seed changed
#: (glass blur was not repeatable before it was given the image's seed).
_REVISION = {"glass_blur": 2}


def image_seed(seed: int, index: int, name: str, severity: int) -> int:
    h = hashlib.sha256(f"{seed}/{index}/{name}/{severity}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def _package_corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """imagecorruptions under a fixed global seed (and ``seed=`` where the global one does not
    reach). Its spatter divides by a maximum that can be zero for some draws (NaN pixels); such a
    draw is replaced by the next seed's, deterministically."""
    import warnings

    from imagecorruptions import corrupt

    state = np.random.get_state()
    try:
        for attempt in range(8):
            np.random.seed((seed + attempt) % 2**32)
            extra = {"seed": (seed + attempt) % 2**32} if name in SEEDED_BY_ARGUMENT else {}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                out = corrupt(image, corruption_name=name, severity=severity, **extra)
            if not any("invalid value" in str(w.message) for w in caught):
                return out
        return out
    finally:
        np.random.set_state(state)


def corrupt_image(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """One uint8 HxWx3 image corrupted; the same (image, name, severity, seed) gives the same output."""
    if name not in ALL_CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(ALL_CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5 (got {severity})")
    h, w = image.shape[:2]
    if min(h, w) < 32:  # imagecorruptions needs >= 32 px: corrupt an upscaled copy, then scale back
        import PIL.Image

        factor = -(-32 // min(h, w))
        big = np.asarray(PIL.Image.fromarray(image).resize((w * factor, h * factor), PIL.Image.NEAREST))
        small = corrupt_image(big, name, severity, seed)
        return np.asarray(PIL.Image.fromarray(small).resize((w, h), PIL.Image.BOX))
    out = np.asarray(_package_corrupt(image, name, severity, seed))
    if out.shape != image.shape:  # a few corruptions return float or resized arrays on odd sizes
        import PIL.Image

        out = np.asarray(PIL.Image.fromarray(np.uint8(np.clip(out, 0, 255))).resize(image.shape[1::-1]))
    return np.uint8(np.clip(np.rint(out), 0, 255))


def corrupt_images(images: np.ndarray, name: str, severity: int, seed: int = 0,
                   advance: Callable[[int], None] | None = None) -> np.ndarray:
    """A stack of uint8 images [N, H, W, 3], each under its own seed."""
    out = np.empty_like(images)
    for i in range(len(images)):
        out[i] = corrupt_image(images[i], name, severity, image_seed(seed, i, name, severity))
        if advance and (i + 1) % 256 == 0:
            advance(256)
    return out


def _denormalize(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    img = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return img.permute(1, 2, 0).numpy()


class CorruptedDataset(Dataset):
    """Corrupts a preprocessed dataset's images on the fly (for tasks not held in memory)."""

    def __init__(self, base: Dataset, name: str, severity: int, seed: int = 0):
        self.base, self.name, self.severity, self.seed = base, name, severity, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        image, label = self.base[i]
        raw = corrupt_image(_denormalize(image), self.name, self.severity,
                            image_seed(self.seed, i, self.name, self.severity))
        return normalize_uint8(torch.from_numpy(raw)[None])[0], label


def corrupted_split(task: Task, name: str, severity: int, cache_dir: str | Path | None = None,
                    seed: int = 0, split: str = "test") -> Dataset:
    """A task's split under one corruption. In-memory tasks are corrupted once and cached."""
    if not isinstance(task, InMemoryTask):
        return CorruptedDataset(task.dataset(split), name, severity, seed)
    images, labels = task.raw(split)
    path = None
    if cache_dir is not None:
        ident = (task.identity(), split, name, severity, seed, _REVISION.get(name, 1))
        key = hashlib.sha256(repr(ident).encode()).hexdigest()[:20]
        path = Path(cache_dir) / "corrupted" / f"{task.name}-{name}-s{severity}-{key}.npy"
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
                if cached.shape == tuple(images.shape):
                    return TensorDataset(normalize_uint8(torch.from_numpy(cached)), labels.long())
            except (ValueError, OSError):
                pass  # a damaged cache file is rebuilt
    out = corrupt_images(images.numpy(), name, severity, seed)
    if path is not None:
        import io

        from harness.cache import atomic_write_bytes

        buf = io.BytesIO()
        np.save(buf, out, allow_pickle=False)
        atomic_write_bytes(path, buf.getvalue())
    return TensorDataset(normalize_uint8(torch.from_numpy(out)), labels.long())
