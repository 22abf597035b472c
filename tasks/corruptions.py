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
import os
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from harness.cache import check_digest, record_digest
from harness.progress import counting_bar
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
        return np.array(PIL.Image.fromarray(small).resize((w, h), PIL.Image.BOX))  # PIL's buffer is read-only
    out = np.asarray(_package_corrupt(image, name, severity, seed))
    if out.shape != image.shape:  # a few corruptions return float or resized arrays on odd sizes
        import PIL.Image

        out = np.asarray(PIL.Image.fromarray(np.uint8(np.clip(out, 0, 255))).resize(image.shape[1::-1]))
    return np.uint8(np.clip(np.rint(out), 0, 255))


def corrupt_images(images: np.ndarray | Sequence[np.ndarray], name: str, severity: int, seed: int = 0,
                   advance: Callable[[int], None] | None = None, out: np.ndarray | None = None,
                   rows: range | None = None, indices: Sequence[int] | None = None) -> np.ndarray:
    """uint8 images [N, H, W, 3] (or a sequence of HxWx3 ones), image ``i`` under
    ``image_seed(seed, i, ...)`` (``indices[i]`` in place of ``i`` where the images are those of
    a split at ``indices``); written into ``out`` when given (a memory-mapped file: a large
    split is never held whole). ``rows``: only these images (default all; the others of ``out``
    are left as they are). ``advance(1)`` after each image."""
    if out is None:
        out = np.empty_like(images)
    for i in range(len(images)) if rows is None else rows:
        at = i if indices is None else int(indices[i])
        out[i] = corrupt_image(images[i], name, severity, image_seed(seed, at, name, severity))
        if advance:
            advance(1)
    return out


#: Fewest images each build process is given: for fewer, starting processes costs more than they save.
MIN_IMAGES_PER_PROCESS = 64
#: Images a build process corrupts per request: small enough that the progress bar moves and
#: that an interrupted build stops within seconds, large enough that requests cost nothing.
BUILD_BLOCK = 16


def build_processes(n: int) -> int:
    """Processes corrupting a split of ``n`` images side by side: the cores this job may use
    (every image is corrupted under its own seed, so the images are the same however many), at
    least :data:`MIN_IMAGES_PER_PROCESS` each; one (this process) where processes cannot be forked
    or this one is daemonic (which may not start children)."""
    import multiprocessing

    from harness.evaluation import fork_context, usable_cores

    if fork_context() is None or multiprocessing.current_process().daemon:
        return 1
    return max(1, min(usable_cores(), n // MIN_IMAGES_PER_PROCESS))


#: What the build processes inherit when forked (never pickled: a disk-backed task's dataset may
#: not be, and an in-memory one would be copied): the images, the corruption, the file to fill.
_BUILD: dict[str, Any] = {}


def _build_rows(start: int, stop: int) -> np.ndarray | None:
    """Corrupts images ``start:stop`` into the file being built (in a forked build process);
    returns their labels where the source reads them (a disk-backed task's)."""
    b = _BUILD
    out = np.load(b["file"], mmap_mode="r+")
    corrupt_images(b["images"], b["name"], b["severity"], b["seed"], out=out, rows=range(start, stop),
                   indices=b["indices"])
    out.flush()
    labels = getattr(b["images"], "labels", None)
    return None if labels is None else np.array(labels[start:stop])


#: Seconds between a build process's checks that the job that forked it is alive.
PARENT_POLL_S = 0.2


def _start_build_process(parent: int) -> None:
    """A build process's initializer: a forked helper (:func:`harness.runtime.start_forked_helper`)
    that exits as soon as ``parent`` (the job) is gone. A job killed while it builds (out of memory,
    SIGKILL, a local pool's worker ended with its driver) would otherwise leave its build processes
    waiting forever for blocks on the pool's pipes, whose ends they hold, each still mapping the
    split's temporary file, whose disk space stays taken after the next builder deletes it."""
    import threading
    import time

    from harness.runtime import start_forked_helper

    start_forked_helper()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-job", daemon=True).start()


def _corrupt_in_processes(file: Path, images: np.ndarray | Sequence[np.ndarray], name: str, severity: int,
                          seed: int, processes: int, advance: Callable[[int], None] | None,
                          indices: Sequence[int] | None) -> None:
    """Fills ``file`` (a ``.npy`` of the split's shape) with the corrupted images, ``processes``
    forked processes corrupting blocks of :data:`BUILD_BLOCK` images side by side; a source that
    reads labels (:class:`_PreprocessedImages`) gets each block's labels back. On an error the
    blocks not started are dropped and the error is raised once the running ones end."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from harness.evaluation import fork_context

    n = len(images)
    _BUILD.update(file=str(file), images=images, name=name, severity=severity, seed=seed, indices=indices)
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(fork_context()),
                               initializer=_start_build_process, initargs=(os.getpid(),))
    try:
        pending = {pool.submit(_build_rows, start, min(start + BUILD_BLOCK, n)): start
                   for start in range(0, n, BUILD_BLOCK)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                start = pending.pop(future)
                try:
                    labels = future.result()
                except BrokenProcessPool:
                    raise RuntimeError(f"corrupting {file.name}: a build process ended abruptly (killed, or "
                                       "out of memory)") from None
                if labels is not None:
                    images.labels[start:start + len(labels)] = labels  # type: ignore[union-attr]
                if advance:
                    advance(min(BUILD_BLOCK, n - start))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _BUILD.clear()


def _denormalize(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    img = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return img.permute(1, 2, 0).numpy()


class CorruptedDataset(Dataset):
    """Corrupts a preprocessed dataset's images on the fly, on every read (a task not held in
    memory, when there is no cache folder); ``indices``: only the images at these positions,
    each under its own position's seed."""

    def __init__(self, base: Dataset, name: str, severity: int, seed: int = 0, indices: Sequence[int] | None = None):
        self.base, self.name, self.severity, self.seed = base, name, severity, seed
        self.indices = None if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        at = i if self.indices is None else self.indices[i]
        image, label = self.base[at]
        raw = corrupt_image(_denormalize(image), self.name, self.severity,
                            image_seed(self.seed, at, self.name, self.severity))
        return normalize_uint8(torch.from_numpy(raw)[None])[0], label


class _PreprocessedImages:
    """A dataset's images (``indices``: those at these positions) as the uint8 HxWx3 arrays
    :class:`CorruptedDataset` corrupts; keeps the labels it reads, so one pass gives both."""

    def __init__(self, base: Dataset, indices: Sequence[int] | None = None):
        self.base, self.indices = base, indices
        self.labels = np.zeros(len(base) if indices is None else len(indices), np.int64)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> np.ndarray:
        image, label = self.base[i if self.indices is None else int(self.indices[i])]
        self.labels[i] = int(label)
        return _denormalize(image)


#: What np.load raises on a missing, truncated or foreign cache file (each is rebuilt).
_DAMAGED = (ValueError, OSError, EOFError)


def _read_array(path: Path, shape: tuple[int | None, ...], dtype: type) -> np.ndarray:
    """A cache file memory-mapped, or ValueError when its shape (None: any size) or dtype differ."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.dtype != dtype or arr.ndim != len(shape) or any(w not in (None, h) for h, w in zip(arr.shape, shape)):
        raise ValueError(f"{path}: {arr.dtype} array of shape {arr.shape}, expected {np.dtype(dtype)} of {shape}")
    return arr


def _checked_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """An in-memory task's cached corrupted images, their digest checked."""
    arr = _read_array(path, shape, np.uint8)
    check_digest(path)
    return arr


def _labels_path(path: Path) -> Path:
    return path.with_suffix(".labels.npy")


class CachedCorruptedDataset(Dataset):
    """A disk-backed task's corrupted split read from its cache files (images ``<key>.npy``,
    labels ``<key>.labels.npy``), memory-mapped: pages are read as images are, so a large split
    costs no memory of its own. Items equal :class:`CorruptedDataset`'s (labels as ints)."""

    def __init__(self, path: str | Path, n: int):
        self.path, self.n = Path(path), n
        self.images = _read_array(self.path, (n, None, None, 3), np.uint8)
        self.labels = _read_array(_labels_path(self.path), (n,), np.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        raw = torch.from_numpy(np.array(self.images[i]))
        return normalize_uint8(raw[None])[0], int(self.labels[i])

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "n": self.n}  # a pickled memmap would copy the whole split

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["n"])


def _cache_path(cache_dir: str | Path, task: Task, identity: dict[str, Any] | None, split: str, name: str,
                severity: int, seed: int, indices: Sequence[int] | None = None) -> Path:
    ident: tuple = (task.identity() if identity is None else identity, split, name, severity, seed,
                    _REVISION.get(name, 1))
    if indices is not None:  # a part of the split: its own file (a whole split's key stays as it was)
        ident += (hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest(),)
    key = hashlib.sha256(repr(ident).encode()).hexdigest()[:20]
    return Path(cache_dir) / "corrupted" / f"{task.name}-{name}-s{severity}-{key}.npy"


def _corrupt_to_file(path: Path, images: np.ndarray | Sequence[np.ndarray], name: str, severity: int, seed: int,
                     description: str, progress: bool, before_commit: Callable[[], None] | None = None,
                     processes: int | None = None, indices: Sequence[int] | None = None) -> None:
    """Corrupts ``images`` into a temporary file beside ``path`` (memory-mapped, filled image by
    image, by ``processes`` processes: default :func:`build_processes`) and moves it onto ``path``
    when whole (:func:`harness.cache.atomic_path`): a killed job leaves no file that is read back.
    ``before_commit`` runs before the move (the labels file, written first, so an images file
    always has its labels). ``indices``: the images are a split's at these positions (their seeds)."""
    from harness.cache import atomic_path

    shape = (len(images), *np.asarray(images[0]).shape)
    if processes is None:
        processes = build_processes(len(images))
    with counting_bar(progress, description, len(images)) as advance, atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        if processes > 1:
            del out  # the header is written; the build processes fill the rows
            _corrupt_in_processes(tmp, images, name, severity, seed, processes, advance, indices)
        else:
            corrupt_images(images, name, severity, seed, advance, out=out, indices=indices)
            out.flush()
            del out
        if before_commit is not None:
            before_commit()
        record_digest(path, tmp)


LOCK_STRIPES = 64


def _lock_path(path: Path) -> Path:
    """One of :data:`LOCK_STRIPES` lock files beside the ``corrupted`` folder (whose listing stays
    the cached splits), always the same for one split: a bounded set, since a lock file cannot
    safely be deleted while another job may be waiting on it. Two splits sharing one are built
    one after the other, never at once."""
    stripe = int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % LOCK_STRIPES
    return path.parent.with_name(path.parent.name + ".locks") / f"{stripe:02d}.lock"


_T = TypeVar("_T")


def _built_once(path: Path, read: Callable[[], _T], build: Callable[[], None], progress: bool,
                wait: bool = True) -> _T | None:
    """The split read from ``path``, built first where missing or damaged, by one job at a time
    (:func:`harness.cache.build_lock`): the robustness jobs of a sweep start together on SLURM,
    and each would otherwise corrupt every split itself. The builder first deletes the split's
    temporary files a killed build left (as large as the split): with the lock held, no other
    process is writing them. ``wait=False``: None when another process is building it."""
    from harness.cache import LockBusy, build_lock, remove_stale_temporaries

    try:
        return read()
    except _DAMAGED:
        pass
    try:  # LockBusy comes only from taking the lock: the block raises nothing of the kind
        with build_lock(_lock_path(path), f"{path.name}: waiting for another process that is corrupting images"
                        if progress else None, wait) as held:
            try:
                return read()
            except _DAMAGED:
                pass
            if held:  # unlocked (a lock file this process cannot open), a temporary may be a live builder's
                remove_stale_temporaries(path)
                remove_stale_temporaries(_labels_path(path))
            build()
    except LockBusy:
        return None
    return read()


def _unless_refused(path: Path, cached: Callable[[], _T], uncached: Callable[[], _T]) -> _T:
    """``cached()``, or ``uncached()`` with a warning naming ``path`` when the cache folder refuses
    the split's files (read-only, no permission: a shared cache): the cache saves time, it is not
    needed for the result (the images are the same), so the job is not failed for it. A full disk
    still fails the job, as any refused write does."""
    import errno
    import warnings

    try:
        return cached()
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        warnings.warn(f"could not cache {exc.filename or path}: {exc.strerror}; corrupting without the cache "
                      "(every job, and a disk-backed task at every read)", stacklevel=3)
        return uncached()


def corrupted_split(task: Task, name: str, severity: int, cache_dir: str | Path | None = None,
                    seed: int = 0, split: str = "test", progress: bool = False,
                    identity: dict[str, Any] | None = None, processes: int | None = None,
                    wait: bool = True, indices: Sequence[int] | None = None) -> Dataset | None:
    """A task's split under one corruption, every image corrupted once: with ``cache_dir`` the
    split is written to ``<cache_dir>/corrupted/`` and read back (memory-mapped) by later calls
    and jobs; an in-memory task is returned as tensors. Without ``cache_dir`` an in-memory task is
    corrupted in memory and a disk-backed one on every read (:class:`CorruptedDataset`). The file
    key holds ``identity`` (default ``task.identity()``): other data, another file. ``processes``
    build the file side by side (default :func:`build_processes`: the job's cores). ``wait=False``:
    None, instead of waiting, while another process is building the file. ``indices``: only the
    split's images at these positions, in this order, each as the whole split has it (its own
    position's seed), in a file of their own: a capped evaluation corrupts only what it scores."""
    description = f"corrupting {task.name} {split} ({name}, severity {severity})"
    path = None if cache_dir is None else _cache_path(cache_dir, task, identity, split, name, severity, seed, indices)
    if indices is not None:
        indices = [int(i) for i in indices]
    if not isinstance(task, InMemoryTask):
        base = task.dataset(split)
        if path is None or len(base) == 0:  # type: ignore[arg-type]
            return CorruptedDataset(base, name, severity, seed, indices)
        n = len(base) if indices is None else len(indices)  # type: ignore[arg-type]
        cached_path = path

        def build_disk() -> None:
            source = _PreprocessedImages(base, indices)

            def save_labels() -> None:
                from harness.cache import atomic_path

                with atomic_path(_labels_path(cached_path)) as tmp:
                    with open(tmp, "wb") as fh:  # else np.save adds .npy
                        np.save(fh, source.labels, allow_pickle=False)
                    record_digest(_labels_path(cached_path), tmp)

            _corrupt_to_file(cached_path, source, name, severity, seed, description, progress, save_labels,
                             processes, indices)

        def read_disk() -> CachedCorruptedDataset:
            dataset = CachedCorruptedDataset(cached_path, n)
            check_digest(cached_path)
            check_digest(_labels_path(cached_path))
            return dataset

        return _unless_refused(path, lambda: _built_once(path, read_disk, build_disk, progress, wait),
                               lambda: CorruptedDataset(base, name, severity, seed, indices))
    images, labels = task.raw(split)
    if indices is not None:
        images, labels = images[indices], labels[indices]
    if path is None:
        out = corrupt_images(images.numpy(), name, severity, seed, indices=indices)
    else:
        cached_path = path
        out = _unless_refused(
            path, lambda: _built_once(path, lambda: _checked_array(cached_path, tuple(images.shape)),
                                      lambda: _corrupt_to_file(cached_path, images.numpy(), name, severity, seed,
                                                               description, progress, processes=processes,
                                                               indices=indices),
                                      progress, wait),
            lambda: corrupt_images(images.numpy(), name, severity, seed, indices=indices))
        if out is None:
            return None
        out = np.array(out)  # into memory (the split is normalised whole below); torch wants it writable
    return TensorDataset(normalize_uint8(torch.from_numpy(out)), labels.long())


def corrupted_split_cached(task: Task, name: str, severity: int, cache_dir: str | Path, seed: int = 0,
                           split: str = "test", identity: dict[str, Any] | None = None,
                           indices: Sequence[int] | None = None) -> bool:
    """Whether :func:`corrupted_split` with these arguments reads its cache files instead of
    building them: a dry run counts the splits a robustness study will corrupt, without reading
    or corrupting any image."""
    return _cache_path(cache_dir, task, identity, split, name, severity, seed, indices).is_file()
