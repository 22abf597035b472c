"""The eight benchmark tasks read from fake on-disk trees in every supported layout.

Every fake image of canonical class ``i`` is filled with colour ``(i % 256, i // 256, k)``,
so a loaded sample's pixels say which class the writer meant, independently of the loader's
folder-to-label mapping.
"""

from __future__ import annotations

import csv
import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tasks.vision8 as v8
from tasks.base import TaskDataError, build_task

N_TRAIN, N_TEST = 3, 1
EXPECTED_CLASSES = {"sun397": 397, "cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10,
                    "gtsrb": 43, "mnist": 10, "dtd": 47}


def raw(image: Image.Image) -> torch.Tensor:
    """Identity preprocessing: uint8 [3, H, W], so tests can read back the colour code."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def colour(label: int, k: int) -> tuple[int, int, int]:
    return (label % 256, label // 256, k)


def decode(image: torch.Tensor) -> int:
    return int(image[0, 0, 0]) + 256 * int(image[1, 0, 0])


def write_image(path: Path, label: int, k: int, size: int = 6, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour(label, k)).save(path, format=fmt)


def folder_names(name: str) -> list[str]:
    """Class-folder names as the usual exports spell them (canonical order)."""
    spec = v8.SPECS[name]
    if name == "sun397":
        return [c[0] + "_" + c.replace(" ", "_") for c in spec.classnames]
    if name == "eurosat":
        return list(v8._EUROSAT_FOLDERS)
    if name == "gtsrb":
        return [f"{i:05d}" for i in range(43)]
    return [c.replace(" ", "_").replace("/", "_") for c in spec.classnames]


DIRS = {"sun397": "sun397", "cars": "stanford_cars_folder_based", "resisc45": "resisc45",
        "eurosat": "EuroSAT_splits", "svhn": "svhn", "gtsrb": "GTSRB", "mnist": "mnist", "dtd": "dtd"}


def write_imagefolder(root: Path, name: str, folders: list[str] | None = None, test_dir: str = "test",
                      n_test: int = N_TEST) -> None:
    folders = folders if folders is not None else folder_names(name)
    base = root / DIRS[name]
    for label, folder in enumerate(folders):
        for k in range(N_TRAIN):
            write_image(base / "train" / folder / f"{k}.png", label, k)
        for k in range(n_test):
            write_image(base / test_dir / folder / f"t{k}.png", label, 100 + k)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vision8")
    for name in EXPECTED_CLASSES:
        # task_vectors' DTD export has train/ and val/ (evaluated as test)
        write_imagefolder(root, name, test_dir="val" if name == "dtd" else "test")
    return root


def reference_split(n: int, fraction: float = 0.1, cap: int = 5000) -> tuple[list[int], list[int]]:
    """random_split's definition: one seeded randperm, the first n - v train, the rest val."""
    n_val = min(int(n * fraction), cap)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    return perm[: n - n_val], perm[n - n_val:]


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_imagefolder_layout(folder_root: Path, name: str) -> None:
    n_cls = EXPECTED_CLASSES[name]
    task = build_task(name, data_root=str(folder_root), image_size=32)
    assert isinstance(task, v8.Vision8Task) and task.num_classes == n_cls
    n = n_cls * N_TRAIN
    ref_train, ref_val = reference_split(n)
    assert task.indices("train") == ref_train and task.indices("val") == ref_val
    assert set(ref_train).isdisjoint(ref_val) and len(ref_train) + len(ref_val) == n
    assert len(task.dataset("test")) == n_cls * N_TEST
    for split in ("train", "val", "test"):
        labels = task.labels(split)
        assert 0 <= int(labels.min()) and int(labels.max()) < n_cls
    image, label = task.dataset("val")[0]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32) and isinstance(label, int)

    again = build_task(name, data_root=str(folder_root), image_size=32)
    assert again.indices("val") == task.indices("val")

    # every sample's label is the class its writer meant (pixel code), in every split
    exact = v8.Vision8Task(v8.SPECS[name], folder_root, preprocess=raw)
    for split in ("train", "val", "test"):
        ds = exact.dataset(split)
        decoded = [decode(ds[i][0]) for i in range(len(ds))]
        assert decoded == ds.labels.tolist()
    if name == "dtd":
        assert all(int(ds[i][0][2, 0, 0]) >= 100 for i in range(len(ds)))  # test came from val/


def test_cars_folders_map_by_name_not_position(folder_root: Path) -> None:
    """Devkit order is not alphabetical; name matching must keep the devkit labels."""
    names = folder_names("cars")
    assert sorted(names) != names
    task = v8.cars(str(folder_root))
    idx = v8._CARS.index("Acura Integra Type R 2001")
    ds = task.dataset("test")
    pos = [i for i, p in enumerate(ds.source.paths) if "Acura_Integra_Type_R_2001" in p]
    assert pos and all(int(ds.source.labels[i]) == idx == 5 for i in pos)


def test_val_cap_and_fraction(folder_root: Path) -> None:
    task = v8.sun397(str(folder_root), val_fraction=0.25, val_cap=7)
    n = 397 * N_TRAIN
    assert len(task.dataset("val")) == 7 and len(task.dataset("train")) == n - 7
    assert (task.indices("train"), task.indices("val")) == reference_split(n, 0.25, 7)


def test_templates_and_prompts(folder_root: Path) -> None:
    gtsrb = v8.gtsrb(str(folder_root))
    assert gtsrb.prompts()[14] == ['a zoomed in photo of a "stop" traffic sign.',
                                   'a centered photo of a "stop" traffic sign.',
                                   'a close up photo of a "stop" traffic sign.']
    assert v8.mnist(str(folder_root)).prompts()[3] == ['a photo of the number: "3".']
    euro = v8.eurosat(str(folder_root))
    assert euro.classnames[2] == "brushland or shrubland" and len(euro.templates) == 3
    assert len(v8.resisc45(str(folder_root)).templates) == 18


def test_default_preprocess_matches_open_clip() -> None:
    import open_clip

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    ours = v8.clip_preprocess(32)(image)
    ref = open_clip.image_transform(32, is_train=False)(image)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_positional_fallback_sorts_numerically(tmp_path: Path) -> None:
    # GTSRB folders 0..42 without padding: lexicographic order would put "10" before "2"
    write_imagefolder(tmp_path, "gtsrb", folders=[str(i) for i in range(43)])
    ds = v8.gtsrb(str(tmp_path), preprocess=raw).dataset("test")
    assert [decode(ds[i][0]) for i in range(len(ds))] == ds.labels.tolist()
    # numbers inside names too: as text, class_10 would sort before class_2 and take its label
    write_imagefolder(tmp_path / "prefixed", "gtsrb", folders=[f"class_{i}" for i in range(43)])
    ds = v8.gtsrb(str(tmp_path / "prefixed"), preprocess=raw).dataset("test")
    assert [decode(ds[i][0]) for i in range(len(ds))] == ds.labels.tolist()
    # unmatched names: sorted folder names map in order onto the canonical list
    write_imagefolder(tmp_path, "mnist", folders=[f"class_{c}" for c in "abcdefghij"])
    ds = v8.mnist(str(tmp_path), preprocess=raw).dataset("test")
    assert [decode(ds[i][0]) for i in range(len(ds))] == ds.labels.tolist() == list(range(10))


def test_folders_named_after_classes_but_one_are_refused_not_relabelled(tmp_path: Path) -> None:
    """One misspelt Cars folder used to send all 196 to sorted position: 143 test images got
    another class's label, silently. The misspelt folder is named, with the class it meant."""
    names = folder_names("cars")
    names[5] = "Acura Integra Type-R 01"
    write_imagefolder(tmp_path, "cars", folders=names)
    with pytest.raises(TaskDataError) as err:
        v8.cars(str(tmp_path))
    assert "'Acura Integra Type-R 01' matches no class; did you mean 'Acura Integra Type R 2001'?" in str(err.value)
    # two folders for one class (and so one class without its folder) are refused too
    write_imagefolder(tmp_path / "twice", "mnist", folders=[str(d) for d in range(9)] + ["8_"])
    with pytest.raises(TaskDataError, match="8 and 8_ are both '8'"):
        v8.mnist(str(tmp_path / "twice"))


# --- native formats ---------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)


def test_mnist_idx_matches_torchvision(tmp_path: Path) -> None:
    from torchvision.datasets import MNIST

    rng = np.random.default_rng(1)
    raw_dir = tmp_path / "MNIST" / "raw"
    arrays = {}
    for prefix, n in (("train", 30), ("t10k", 7)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)

    task = v8.mnist(str(tmp_path), preprocess=raw)
    assert task.layout.startswith("mnist-idx")
    for split, train in (("train", True), ("val", True), ("test", False)):
        ref = MNIST(str(tmp_path), train=train, download=False)
        ds = task.dataset(split)
        for i, j in enumerate(ds.indices):
            image, label = ds[i]
            assert label == int(ref.targets[j])
            assert torch.equal(image[0], ref.data[j]) and torch.equal(image[1], ref.data[j])

    # the gzip-compressed files read the same
    gz = tmp_path / "gz"
    for prefix, (images, labels) in arrays.items():
        write_idx(gz / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte.gz", images, compress=True)
        write_idx(gz / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte.gz", labels, compress=True)
    task_gz = v8.mnist(str(gz), preprocess=raw)
    assert task_gz.labels("test").tolist() == arrays["t10k"][1].tolist()
    assert torch.equal(task_gz.dataset("test")[3][0][0], torch.from_numpy(arrays["t10k"][0][3]))


def test_mnist_idx_missing_file_is_named(tmp_path: Path) -> None:
    write_idx(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(TaskDataError, match="train-labels-idx1-ubyte"):
        v8.mnist(str(tmp_path))


def test_svhn_mat(tmp_path: Path) -> None:
    import scipy.io as sio

    rng = np.random.default_rng(2)
    truth = {}
    for split, n in (("train", 20), ("test", 5)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # 1..10, 10 meaning digit 0
        y[0, 0] = 10
        (tmp_path / "svhn").mkdir(exist_ok=True)
        sio.savemat(str(tmp_path / "svhn" / f"{split}_32x32.mat"), {"X": x, "y": y})
        truth[split] = (x, y[:, 0] % 10)
    task = v8.svhn(str(tmp_path), preprocess=raw)
    ds = task.dataset("test")
    x, y = truth["test"]
    assert ds.labels.tolist() == y.tolist() and ds.labels[0] == 0
    for i in range(len(ds)):
        assert torch.equal(ds[i][0], torch.from_numpy(x[..., i]).permute(2, 0, 1))
    assert sorted(task.indices("train") + task.indices("val")) == list(range(20))


def test_unreadable_or_foreign_mat_files_are_one_error_naming_them(tmp_path: Path) -> None:
    """scipy's errors (a truncated download, another file under the expected name) name no file:
    they came out as tracebacks from deep in scipy (OSError: could not read bytes; KeyError: 'X')."""
    import scipy.io as sio

    svhn = tmp_path / "svhn"
    svhn.mkdir()
    x, y = np.zeros((32, 32, 3, 4), dtype=np.uint8), np.ones((4, 1), dtype=np.uint8)
    sio.savemat(str(svhn / "train_32x32.mat"), {"X": x, "y": y})
    sio.savemat(str(svhn / "test_32x32.mat"), {"X": x, "y": y})
    data = (svhn / "test_32x32.mat").read_bytes()
    (svhn / "test_32x32.mat").write_bytes(data[: len(data) // 2])
    with pytest.raises(TaskDataError, match=r"task 'svhn': .*test_32x32.mat: not a readable MATLAB file"):
        v8.svhn(str(tmp_path))
    sio.savemat(str(svhn / "test_32x32.mat"), {"images": x})
    with pytest.raises(TaskDataError, match=r"test_32x32.mat: holds no 'X' or 'y' \(its variables: images\)"):
        v8.svhn(str(tmp_path))

    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    (base / "cars_train").mkdir()
    (base / "cars_test").mkdir()
    records = np.zeros(2, dtype=[("fname", "O"), ("bbox_x1", "O")])  # test annotations without labels
    for annos in (base / "devkit" / "cars_train_annos.mat", base / "cars_test_annos_withlabels.mat"):
        sio.savemat(str(annos), {"annotations": records})
    with pytest.raises(TaskDataError, match="cars_train_annos.mat: 'annotations' has no 'fname' and 'class' fields"):
        v8.cars(str(tmp_path))


def test_gtsrb_native_matches_torchvision(tmp_path: Path) -> None:
    from torchvision.datasets import GTSRB

    base = tmp_path / "gtsrb"
    for c in range(43):
        for k in range(2):
            write_image(base / "GTSRB" / "Training" / f"{c:05d}" / f"{c:05d}_{k:05d}.ppm", c, k)
    rows = [(f"{i:05d}.ppm", (i * 7) % 43) for i in range(6)]
    for fname, c in rows:
        write_image(base / "GTSRB" / "Final_Test" / "Images" / fname, c, 200)
    with open(base / "GT-final_test.csv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter=";")
        w.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        for fname, c in rows:
            w.writerow([fname, 6, 6, 0, 0, 5, 5, c])

    task = v8.gtsrb(str(tmp_path), preprocess=raw)
    assert task.layout.startswith("gtsrb-native")
    for split, tv_split in (("train", "train"), ("val", "train"), ("test", "test")):
        ref = GTSRB(str(tmp_path), split=tv_split, download=False)
        ds = task.dataset(split)
        for i, j in enumerate(ds.indices):
            ref_image, ref_label = ref[j]
            image, label = ds[i]
            assert label == ref_label == decode(image)
            assert torch.equal(image, raw(ref_image))


def test_a_gtsrb_test_list_without_labels_is_named(tmp_path: Path) -> None:
    """GTSRB's Final_Test archive ships GT-final_test.test.csv, without ClassId: under the expected
    name it was a KeyError traceback."""
    base = tmp_path / "gtsrb"
    for c in range(43):
        write_image(base / "GTSRB" / "Training" / f"{c:05d}" / f"{c:05d}_00000.ppm", c, 0)
        write_image(base / "GTSRB" / "Training" / f"{c:05d}" / f"{c:05d}_00001.ppm", c, 1)
    write_image(base / "GTSRB" / "Final_Test" / "Images" / "00000.ppm", 0, 0)
    (base / "GT-final_test.csv").write_text("Filename;Width;Height\n00000.ppm;6;6\n")
    with pytest.raises(TaskDataError, match=r"GT-final_test.csv: no column 'ClassId' \(its header: Filename;Width;Height"):
        v8.gtsrb(str(tmp_path))
    (base / "GT-final_test.csv").write_text("Filename;ClassId\n00000.ppm;stop\n")
    with pytest.raises(TaskDataError, match="ClassId 'stop' of 00000.ppm is not a class number"):
        v8.gtsrb(str(tmp_path))


def test_cars_devkit(tmp_path: Path) -> None:
    import scipy.io as sio

    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    sio.savemat(str(base / "devkit" / "cars_meta.mat"), {"class_names": np.array(v8._CARS, dtype=object)})
    rng = np.random.default_rng(3)
    for split, n, annos in (("train", 20, base / "devkit" / "cars_train_annos.mat"),
                            ("test", 6, base / "cars_test_annos_withlabels.mat")):
        records = np.zeros(n, dtype=[("fname", "O"), ("class", "O")])
        for i in range(n):
            cls = int(rng.integers(1, 197))
            records[i] = (f"{i:05d}.png", cls)
            write_image(base / f"cars_{split}" / f"{i:05d}.png", cls - 1, i)
        sio.savemat(str(annos), {"annotations": records})
    task = v8.cars(str(tmp_path), preprocess=raw)
    assert task.layout.startswith("stanford-cars-devkit")
    for split in ("train", "val", "test"):
        ds = task.dataset(split)
        assert [decode(ds[i][0]) for i in range(len(ds))] == ds.labels.tolist()


def test_resisc45_split_lists(tmp_path: Path) -> None:
    base = tmp_path / "resisc45"
    listed = {"train": [], "test": []}
    for c, name in enumerate(v8._RESISC45):
        folder = name.replace(" ", "_")
        for k in range(3):
            fname = f"{folder}_{k:03d}.jpg"
            write_image(base / "NWPU-RESISC45" / folder / fname, c * 5, 0, fmt="PNG")
            listed["test" if k == 2 else "train"].append(fname)
    # the unlisted images (none here for val) must not leak into either split
    write_image(base / "NWPU-RESISC45" / "airplane" / "airplane_999.jpg", 0, 0, fmt="PNG")
    for split, names in listed.items():
        (base / f"resisc45-{split}.txt").write_text("\n".join(names) + "\n")
    task = v8.resisc45(str(tmp_path), preprocess=raw)
    assert len(task.dataset("train")) + len(task.dataset("val")) == 90 and len(task.dataset("test")) == 45
    for split in ("train", "val", "test"):
        ds = task.dataset(split)
        assert [decode(ds[i][0]) // 5 for i in range(len(ds))] == ds.labels.tolist()


def test_resisc45_listed_images_that_are_missing_are_named(tmp_path: Path) -> None:
    """A partly extracted NWPU-RESISC45 used to give a smaller test split silently."""
    base = tmp_path / "resisc45"
    for c, name in enumerate(v8._RESISC45):
        folder = name.replace(" ", "_")
        for k in range(3):
            write_image(base / "NWPU-RESISC45" / folder / f"{folder}_{k:03d}.jpg", c, k, fmt="PNG")
    (base / "resisc45-train.txt").write_text("".join(f"{n.replace(' ', '_')}_000.jpg\n{n.replace(' ', '_')}_001.jpg\n"
                                                     for n in v8._RESISC45))
    (base / "resisc45-test.txt").write_text("".join(f"{n.replace(' ', '_')}_002.jpg\n" for n in v8._RESISC45))
    assert len(v8.resisc45(str(tmp_path)).dataset("test")) == 45
    (base / "NWPU-RESISC45" / "wetland" / "wetland_002.jpg").unlink()
    with pytest.raises(TaskDataError, match=r"resisc45-test.txt lists 1 of its 45 images that are not in any class "
                                            r"folder of .*NWPU-RESISC45 \(first: wetland_002.jpg\)"):
        v8.resisc45(str(tmp_path))


# --- errors -------------------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(TaskDataError, match=r"task 'dtd': data_root .*nope does not exist"):
        v8.dtd(str(missing))


def test_missing_dataset_folder_names_layout(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError) as err:
        v8.mnist(str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "mnist/{train,test}/<class>" in msg and "MNIST/raw" in msg


def test_missing_dataset_folder_says_every_name_is_read_in_any_case(tmp_path: Path) -> None:
    """The expected layout says what is read: any case of the folder's name (``EuroSAT``), for a
    task with other folder names too, not "accepted as any case" for a task with one name only."""
    for task, expected in (("mnist", "(ImageFolder; the folder in any case)"),
                           ("eurosat", "(ImageFolder; the folder in any case, or named eurosat_splits)"),
                           ("cars", "in any case, or named stanford_cars or stanford_cars_folder_based)")):
        with pytest.raises(TaskDataError) as err:
            build_task(task, data_root=str(tmp_path))
        assert expected in str(err.value), str(err.value)


def test_missing_test_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "dtd" / "train" / "banded" / "0.png", 0, 0)
    with pytest.raises(TaskDataError, match=r"neither .*dtd/test nor .*dtd/val"):
        v8.dtd(str(tmp_path))


def test_empty_split(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, "eurosat")
    for p in (tmp_path / "EuroSAT_splits" / "test").rglob("*.png"):
        p.unlink()
    with pytest.raises(TaskDataError, match=r"task 'eurosat': split 'test' is empty"):
        v8.eurosat(str(tmp_path))


def test_class_count_mismatch(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, "dtd", folders=["banded", "blotchy", "braided"])
    with pytest.raises(TaskDataError, match=r"3 class folders but the task has 47 classes"):
        v8.dtd(str(tmp_path))


def test_val_would_be_empty_and_unknown_split(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, "svhn")  # 30 train images
    with pytest.raises(TaskDataError, match=r"split 'val' would be empty"):
        v8.svhn(str(tmp_path), val_fraction=0.02)
    with pytest.raises(TaskDataError, match=r"has no split 'dev'"):
        v8.svhn(str(tmp_path)).dataset("dev")


def test_train_and_test_class_folders_must_agree(tmp_path: Path) -> None:
    """Mapped apart, a renamed folder would shift every later class's test labels."""
    write_imagefolder(tmp_path, "eurosat")
    base = tmp_path / "EuroSAT_splits"
    (base / "test" / "Forest").rename(base / "test" / "Zforest")
    with pytest.raises(TaskDataError, match=r"only in train: Forest; only in test: Zforest"):
        v8.eurosat(str(tmp_path))


def test_identity_follows_the_files_and_labels(tmp_path: Path) -> None:
    """Job keys hold the task identity: relabelled, removed or added images must change it, and
    an identical tree must not."""
    write_imagefolder(tmp_path, "eurosat")
    base = tmp_path / "EuroSAT_splits"
    first = v8.eurosat(str(tmp_path)).identity()
    assert v8.eurosat(str(tmp_path)).identity() == first
    test = base / "test"
    (test / "Forest" / "t0.png").rename(test / "River" / "moved.png")  # one image relabelled
    relabelled = v8.eurosat(str(tmp_path)).identity()
    assert relabelled["data"]["test"] != first["data"]["test"] and relabelled["data"]["train"] == first["data"]["train"]
    (test / "River" / "moved.png").unlink()
    assert v8.eurosat(str(tmp_path)).identity() not in (first, relabelled)


def test_identity_does_not_follow_the_data_root(tmp_path: Path) -> None:
    """The same files under another root (a copy on node-local scratch) keep the identity, so
    results cached for them are reused; a copy with one image relabelled does not."""
    write_imagefolder(tmp_path / "a", "eurosat")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first = v8.eurosat(str(tmp_path / "a")).identity()
    assert v8.eurosat(str(tmp_path / "b")).identity() == first
    test = tmp_path / "b" / "EuroSAT_splits" / "test"
    (test / "Forest" / "t0.png").rename(test / "River" / "moved.png")
    assert v8.eurosat(str(tmp_path / "b")).identity() != first


def test_identity_of_native_layouts_does_not_follow_the_data_root(tmp_path: Path) -> None:
    """MNIST's raw files and GTSRB's native tree copied under another root (node-local scratch)
    keep the identity, as ImageFolder trees do: the folder they were found in is named relative
    to the root, not as the absolute path error messages show."""
    _write_mnist(tmp_path / "a")
    base = tmp_path / "a" / "gtsrb"
    for c in range(43):
        write_image(base / "GTSRB" / "Training" / f"{c:05d}" / "0.ppm", c, 0)
        write_image(base / "GTSRB" / "Training" / f"{c:05d}" / "1.ppm", c, 1)
    write_image(base / "GTSRB" / "Final_Test" / "Images" / "00000.ppm", 3, 200)
    (base / "GT-final_test.csv").write_text("Filename;ClassId\n00000.ppm;3\n")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in ("mnist", "gtsrb"):
        first = build_task(name, data_root=str(tmp_path / "a")).identity()
        assert str(tmp_path) not in str(first), first["layout"]
        assert build_task(name, data_root=str(tmp_path / "b")).identity() == first, name


def _scaled(k: float):
    """A new function object each call, the same code: as a preprocess built in each process."""
    return lambda image: raw(image) * k


class _Resize:
    """A preprocess object without a ``repr`` of its own (the default names its address)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return raw(image.resize((self.size, self.size)))


class _Named(_Resize):
    def __repr__(self) -> str:
        return f"Named(size={self.size})"


def test_a_preprocess_of_one_s_own_is_identified_by_its_code_not_its_address(tmp_path: Path) -> None:
    """Two function objects of the same code (as two processes build them) are one identity,
    which a repr naming the address never is; other code, or an object's other attributes, is
    another; a repr of its own is kept as it is."""
    write_imagefolder(tmp_path, "eurosat")
    ident = lambda pre: v8.eurosat(str(tmp_path), preprocess=pre).identity()["preprocess"]  # noqa: E731
    first, again = _scaled(2), _scaled(2)
    assert first is not again and " at 0x" in repr(first) and repr(first) != repr(again)
    assert ident(first) == ident(again) and " at 0x" not in ident(first)
    assert ident(first) != ident(raw) and ident(first) != ident(_scaled(3))
    assert ident(_Resize(8)) == ident(_Resize(8)) != ident(_Resize(9))
    assert ident(_Named(8)) == "Named(size=8)"


def test_identity_of_array_layouts_follows_the_pixels(tmp_path: Path) -> None:
    raw_dir = tmp_path / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = np.arange(30, dtype=np.uint8) % 10
    for prefix in ("train", "t10k"):
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", labels)
    first = v8.mnist(str(tmp_path)).identity()
    images[3, 0, 0] ^= 1
    write_idx(raw_dir / "t10k-images-idx3-ubyte", images)
    second = v8.mnist(str(tmp_path)).identity()
    assert second["data"]["test"] != first["data"]["test"] and second["data"]["train"] == first["data"]["train"]


@pytest.mark.parametrize("label", [43, -1])
def test_a_test_label_outside_the_classes_is_refused(tmp_path: Path, label: int) -> None:
    """GTSRB has classes 0..42: a ClassId 43 in the test list matches no class name (it would be
    scored as always wrong), nor does -1 (indexing would read it as the last class), so the task
    refuses it, naming the labels' range."""
    base = tmp_path / "gtsrb"
    for c in range(43):
        for k in range(2):
            write_image(base / "GTSRB" / "Training" / f"{c:05d}" / f"{c:05d}_{k:05d}.ppm", c, k)
    write_image(base / "GTSRB" / "Final_Test" / "Images" / "00000.ppm", 0, 0)
    (base / "GT-final_test.csv").write_text(f"Filename;ClassId\n00000.ppm;{label}\n")
    with pytest.raises(TaskDataError, match=rf"split 'test' has labels in \[{label}, {label}\] but the task has 43 "
                                            "classes"):
        v8.gtsrb(str(tmp_path))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_a_val_fraction_outside_0_to_1_is_refused(fraction: float, tmp_path: Path) -> None:
    """A whole train split as val (its cap keeping it short of empty train) is no fraction."""
    write_imagefolder(tmp_path, "svhn")  # 30 train images
    with pytest.raises(TaskDataError, match=r"val_fraction must be in \(0, 1\)"):
        v8.svhn(str(tmp_path), val_fraction=fraction, val_cap=5)


# --- label order ------------------------------------------------------------------------------


def _sha256_lines(names) -> str:
    import hashlib

    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def test_class_lists_are_in_the_published_heads_label_order() -> None:
    """A head row is scored as the class at its position: two names swapped in a list would
    swap those classes' labels (and their zero-shot heads) silently. task_vectors reads DTD,
    EuroSAT, RESISC45 and SUN397 with sorted class folders, so their lists are sorted in folder
    form; GTSRB and Cars follow the datasets' own class ids (CLIP's prompts.md, the Stanford
    Cars devkit's cars_meta.mat), pinned here by a few ids and a digest of the whole list."""
    assert list(v8._DTD) == sorted(v8._DTD)
    resisc = [c.replace(" ", "_") for c in v8._RESISC45]
    assert resisc == sorted(resisc)
    assert list(v8._EUROSAT_FOLDERS) == sorted(v8._EUROSAT_FOLDERS)
    sun = [f"{c[0]}_{c.replace(' ', '_')}" for c in v8._SUN397]
    assert sun == sorted(sun)
    assert v8._DIGITS == tuple("0123456789")
    # task_vectors' EuroSAT names, by sorted folder
    assert dict(zip(v8._EUROSAT_FOLDERS, v8._EUROSAT)) == {
        "AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
        "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
        "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
        "Residential": "residential buildings or homes or apartments", "River": "river", "SeaLake": "lake or sea"}
    cars = {0: "AM General Hummer SUV 2000", 1: "Acura RL Sedan 2012", 2: "Acura TL Sedan 2012",
            5: "Acura Integra Type R 2001", 11: "Audi RS 4 Convertible 2008",
            38: "Bentley Continental Supersports Conv. Convertible 2012", 97: "Eagle Talon Hatchback 1998",
            122: "Geo Metro Convertible 1993", 173: "Ram C/V Cargo Van Minivan 2012",
            195: "smart fortwo Convertible 2012"}
    assert {i: v8._CARS[i] for i in cars} == cars
    assert _sha256_lines(v8._CARS) == "93d089469409bbd00725ce041797cad929e156fba50c3e19a0f49ef65efcb990"
    gtsrb = {0: "red and white circle 20 kph speed limit", 6: "end / de-restriction of 80 kph speed limit",
             14: "stop", 17: "red circle with white horizonal stripe no entry",
             32: "white circle with gray strike bar no speed limit",
             42: "white circle with gray strike bar indicating no passing for trucks has ended"}
    assert {i: v8._GTSRB[i] for i in gtsrb} == gtsrb
    assert _sha256_lines(v8._GTSRB) == "953036bc5aedbe6ba1f4f38a3d09da17e8e062ca3e4bfed6a8074e9f03f884c6"


def test_a_test_folder_beside_val_is_the_test_split(tmp_path: Path) -> None:
    """task_vectors' EuroSAT_splits holds train/, val/ and test/ (EuroSAT scores test/,
    EuroSATVal val/): val/ stands for test/ only where there is no test/."""
    write_imagefolder(tmp_path, "eurosat")
    for label, folder in enumerate(v8._EUROSAT_FOLDERS):
        for k in range(2):
            write_image(tmp_path / "EuroSAT_splits" / "val" / folder / f"v{k}.png", label, 50 + k)
    ds = v8.eurosat(str(tmp_path), preprocess=raw).dataset("test")
    assert len(ds) == 10 * N_TEST
    assert [int(ds[i][0][2, 0, 0]) for i in range(len(ds))] == [100] * len(ds)  # written to test/ only


def test_gtsrb_training_annotation_files_are_not_images(tmp_path: Path) -> None:
    """Each class folder of GTSRB's Training archive holds its GT-000NN.csv beside the .ppm
    images: a train split with those in would fail when one is decoded."""
    base = tmp_path / "gtsrb"
    for c in range(43):
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        for k in range(2):
            write_image(folder / f"{c:05d}_{k:05d}.ppm", c, k)
        (folder / f"GT-{c:05d}.csv").write_text("Filename;ClassId\n")
    write_image(base / "GTSRB" / "Final_Test" / "Images" / "00000.ppm", 3, 0)
    (base / "GT-final_test.csv").write_text("Filename;ClassId\n00000.ppm;3\n")
    task = v8.gtsrb(str(tmp_path), preprocess=raw)
    assert len(task.dataset("train")) + len(task.dataset("val")) == 86
    for split in ("train", "val"):
        ds = task.dataset(split)
        assert all(p.endswith(".ppm") for p in ds.source.paths)
        assert [decode(ds[i][0]) for i in range(len(ds))] == ds.labels.tolist()


def test_hidden_folders_are_not_classes(tmp_path: Path) -> None:
    """A hidden folder beside the class folders (Jupyter's .ipynb_checkpoints, a sync tool's
    cache) is neither a class nor a source of images."""
    write_imagefolder(tmp_path, "eurosat")
    for split in ("train", "test"):
        write_image(tmp_path / "EuroSAT_splits" / split / ".ipynb_checkpoints" / "x.png", 0, 0)
    task = v8.eurosat(str(tmp_path), preprocess=raw)
    assert len(task.dataset("train")) + len(task.dataset("val")) == 10 * N_TRAIN
    assert len(task.dataset("test")) == 10 * N_TEST
    assert not any(".ipynb_checkpoints" in p for p in task.dataset("test").source.paths)


def test_identity_follows_a_relabelled_gtsrb_test_list(tmp_path: Path) -> None:
    """GT-final_test.csv gives each test image its label: a corrected ClassId keeps every path
    but must change the identity, or results scored against the old labels would be reused."""
    base = tmp_path / "gtsrb"
    for c in range(43):
        for k in range(2):
            write_image(base / "GTSRB" / "Training" / f"{c:05d}" / f"{c:05d}_{k:05d}.ppm", c, k)
    for i in range(2):
        write_image(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", 0, i)
    (base / "GT-final_test.csv").write_text("Filename;ClassId\n00000.ppm;7\n00001.ppm;8\n")
    first = v8.gtsrb(str(tmp_path)).identity()
    (base / "GT-final_test.csv").write_text("Filename;ClassId\n00000.ppm;7\n00001.ppm;9\n")
    second = v8.gtsrb(str(tmp_path)).identity()
    assert second["data"]["test"] != first["data"]["test"] and second["data"]["train"] == first["data"]["train"]


def test_identity_follows_the_val_split_and_the_image_size(tmp_path: Path) -> None:
    """Another val fraction or cap draws other val and train images, another image size feeds
    the model other pixels: each must change the identity (job keys), or results scored under
    the old settings would be reused."""
    write_imagefolder(tmp_path, "eurosat")  # 30 train images
    base = v8.eurosat(str(tmp_path)).identity()
    assert v8.eurosat(str(tmp_path)).identity() == base
    for options in ({"val_fraction": 0.2}, {"val_fraction": 0.2, "val_cap": 3}, {"image_size": 32}):
        assert v8.eurosat(str(tmp_path), **options).identity() != base, options
    assert v8.eurosat(str(tmp_path), val_fraction=0.2, val_cap=3).identity() != v8.eurosat(
        str(tmp_path), val_fraction=0.2).identity()


def _write_mnist(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """MNIST's raw files, 30 random 28 x 28 images labelled 0..9 in turn, as train and test:
    (their folder, images, labels)."""
    raw_dir = tmp_path / "MNIST" / "raw"
    images = np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = np.arange(30, dtype=np.uint8) % 10
    for prefix in ("train", "t10k"):
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", labels)
    return raw_dir, images, labels


def test_identity_of_array_layouts_follows_the_labels(tmp_path: Path) -> None:
    """MNIST's and SVHN's labels are arrays read with the pixels: one test label changed (the same
    images) is another identity, so results cached for the old labels are not read back."""
    raw_dir, images, labels = _write_mnist(tmp_path)
    first = v8.mnist(str(tmp_path)).identity()
    labels[3] = 4
    write_idx(raw_dir / "t10k-labels-idx1-ubyte", labels)
    second = v8.mnist(str(tmp_path)).identity()
    assert second["data"]["test"] != first["data"]["test"] and second["data"]["train"] == first["data"]["train"]


def test_identity_follows_a_preprocess_of_ones_own(tmp_path: Path) -> None:
    """Images fed through another preprocess give other scores: a task read with one of its own
    is not the default-preprocessed task at the same image size."""
    write_imagefolder(tmp_path, "eurosat")
    default = v8.eurosat(str(tmp_path), image_size=32).identity()
    own = v8.eurosat(str(tmp_path), preprocess=v8.clip_preprocess(16), image_size=32).identity()
    assert own["preprocess"] != default["preprocess"] and own != default


def test_every_task_has_task_vectors_templates(folder_root: Path) -> None:
    """The zero-shot heads average task_vectors' templates (src/datasets/templates.py): 2 for
    SUN397, 8 for Cars and DTD, 3 for EuroSAT and GTSRB, 18 for RESISC45, 1 for the digits."""
    counts = {"sun397": 2, "cars": 8, "dtd": 8, "eurosat": 3, "gtsrb": 3, "resisc45": 18, "svhn": 1, "mnist": 1}
    assert {name: len(spec.templates) for name, spec in v8.SPECS.items()} == counts
    assert v8.sun397(str(folder_root)).prompts()[0] == ["a photo of a abbey.", "a photo of the abbey."]


def test_positional_fallback_sorts_case_sensitively_as_imagefolder(tmp_path: Path) -> None:
    """Folders named after no class map in torchvision ImageFolder's order (task_vectors reads
    them with it), where upper case sorts before lower case."""
    from torchvision.datasets.folder import find_classes

    folders = ["a", "b", "c", "d", "e", "Q", "R", "S", "T", "U"]
    write_imagefolder(tmp_path, "eurosat", folders=folders)
    _, truth = find_classes(str(tmp_path / DIRS["eurosat"] / "train"))
    assert truth["Q"] == 0 and truth["a"] == 5
    task = v8.Vision8Task(v8.SPECS["eurosat"], tmp_path, preprocess=raw)
    ds = task.dataset("test")
    assert {Path(p).parent.name: int(y) for p, y in zip(ds.source.paths, ds.labels)} == truth


def test_a_gtsrb_test_list_out_of_file_order_keeps_each_images_label(tmp_path: Path) -> None:
    """GT-final_test.csv's rows are read as listed: a list not in file-name order still gives
    each image the ClassId of its own row (truth: the class its writer painted into it)."""
    base = tmp_path / "gtsrb"
    for c in range(43):
        for k in range(2):
            write_image(base / "GTSRB" / "Training" / f"{c:05d}" / f"{c:05d}_{k:05d}.ppm", c, k)
    rows = [(f"{i:05d}.ppm", (i * 5 + 1) % 43) for i in (3, 0, 5, 1, 4, 2)]
    for fname, c in rows:
        write_image(base / "GTSRB" / "Final_Test" / "Images" / fname, c, 200)
    (base / "GT-final_test.csv").write_text("Filename;ClassId\n" + "".join(f"{f};{c}\n" for f, c in rows))
    ds = v8.gtsrb(str(tmp_path), preprocess=raw).dataset("test")
    assert [ds[i][1] for i in range(len(ds))] == [c for _, c in rows]
    assert all(decode(ds[i][0]) == ds[i][1] for i in range(len(ds)))


def test_identity_of_array_layouts_follows_the_image_shape(tmp_path: Path) -> None:
    """The same bytes under other dimensions are other images: a test file of 30 images of
    28 x 28 pixels and one of 30 images of 14 x 56 are two identities."""
    raw_dir, images, labels = _write_mnist(tmp_path)
    first = v8.mnist(str(tmp_path)).identity()
    write_idx(raw_dir / "t10k-images-idx3-ubyte", images.reshape(30, 14, 56))
    assert v8.mnist(str(tmp_path)).identity()["data"]["test"] != first["data"]["test"]


def test_defaults_are_task_vectors_val_cap_and_open_clip_image_size(tmp_path: Path) -> None:
    """Without options a task carves at most 5000 val images (task_vectors' max_val_samples) and
    preprocesses at 224 px (CLIP ViT-B/32's input), through the registry and the class alike."""
    write_imagefolder(tmp_path, "eurosat")
    for task in (build_task("eurosat", data_root=str(tmp_path)), v8.Vision8Task(v8.SPECS["eurosat"], tmp_path)):
        assert (task.val_cap, task.val_fraction, task.image_size) == (5000, 0.1, 224)
        assert task.dataset("test")[0][0].shape == (3, 224, 224)


def test_a_preprocess_of_one_s_own_gets_rgb_images_from_grey_and_rgba_files(tmp_path: Path) -> None:
    """Files in other modes reach a preprocess as RGB (a grey or RGBA file would else give it one
    or four channels), the grey value in every channel."""
    write_imagefolder(tmp_path, "eurosat")
    folder = tmp_path / DIRS["eurosat"] / "test" / v8._EUROSAT_FOLDERS[0]
    Image.new("L", (6, 6), 77).save(folder / "t0.png")
    Image.new("RGBA", (6, 6), (1, 2, 3, 4)).save(folder / "t1.png")
    task = v8.eurosat(str(tmp_path), preprocess=lambda im: (im.mode, im.getpixel((0, 0))))
    test = task.dataset("test")
    got = {Path(test.source.paths[i]).name: test[i][0] for i in range(2)}
    assert got == {"t0.png": ("RGB", (77, 77, 77)), "t1.png": ("RGB", (1, 2, 3))}


def test_of_folders_differing_in_case_only_the_exact_name_else_the_first_in_code_point_order_is_read(
        tmp_path: Path) -> None:
    """``EUROSAT`` and ``EuroSAT`` both match the task's ``eurosat``: with no ``eurosat`` the first
    in code-point order (capitals first) is read, and ``eurosat`` itself wins once it is there."""
    def tree(folder: str, n_test: int) -> None:
        for label, name in enumerate(folder_names("eurosat")):
            for k in range(N_TRAIN):
                write_image(tmp_path / folder / "train" / name / f"{k}.png", label, k)
            for k in range(n_test):
                write_image(tmp_path / folder / "test" / name / f"t{k}.png", label, 100 + k)

    tree("EuroSAT", 1)
    tree("EUROSAT", 2)
    assert len(build_task("eurosat", data_root=str(tmp_path), image_size=32).dataset("test")) == 20
    tree("eurosat", 3)
    assert len(build_task("eurosat", data_root=str(tmp_path), image_size=32).dataset("test")) == 30
