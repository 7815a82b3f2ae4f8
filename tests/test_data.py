"""Data modules on real torchvision datasets built from files the tests generate.

CIFAR files are written in the official "python version" pickle layout, image folders as PNG
files; every image has a known constant colour per channel so that normalised tensors can be
checked value by value.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import re
import struct
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler
from torchvision.datasets import CIFAR10

from ekd_ddnn.data import (
    CIFARDataModule,
    DigitsDataModule,
    ImageNetDataModule,
    SyntheticDataModule,
)
from ekd_ddnn.data.cifar import STATS
from ekd_ddnn.data.imagenet import MEAN as IMAGENET_MEAN
from ekd_ddnn.data.imagenet import STD as IMAGENET_STD
from ekd_ddnn.data.synthetic import make_synthetic
from ekd_ddnn.errors import UserError

PER_BATCH = 20  # images per generated CIFAR-10 training batch (5 batches -> 100 images)
N_TEST = 20
SHARED_SUBSET = Path(__file__).resolve().parents[2] / "shared/data/cifar10-subset"


# --------------------------------------------------------------------------- helpers


def colour(index: int) -> tuple[int, int, int]:
    """The constant (red, green, blue) of generated image ``index``; distinct per index < 256."""
    v = (7 * index + 3) % 256
    return v, 255 - v, (v * 3 + 11) % 256


def cifar_rows(indices: range) -> np.ndarray:
    """CIFAR rows (N, 3072): 1024 red, 1024 green, 1024 blue values per image."""
    rows = np.empty((len(indices), 3072), dtype=np.uint8)
    for row, index in enumerate(indices):
        r, g, b = colour(index)
        rows[row, :1024], rows[row, 1024:2048], rows[row, 2048:] = r, g, b
    return rows


def dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, *, with_test: bool = True) -> Path:
    """``root/cifar-10-batches-py`` with 5 x PER_BATCH training and N_TEST test images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(5):
        indices = range(b * PER_BATCH, (b + 1) * PER_BATCH)
        dump(
            folder / f"data_batch_{b + 1}",
            {
                "batch_label": f"training batch {b + 1} of 5",
                "labels": [i % 10 for i in indices],
                "data": cifar_rows(indices),
                "filenames": [f"img_{i}.png" for i in indices],
            },
        )
    if with_test:
        indices = range(200, 200 + N_TEST)
        dump(
            folder / "test_batch",
            {
                "batch_label": "testing batch 1 of 1",
                "labels": [(i + 3) % 10 for i in indices],
                "data": cifar_rows(indices),
            },
        )
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    dump(
        folder / "batches.meta",
        {"num_cases_per_batch": PER_BATCH, "label_names": names, "num_vis": 3072},
    )
    return folder


def write_cifar100(root: Path, *, n_train: int = 60, n_test: int = 15) -> Path:
    """``root/cifar-100-python`` with ``train``, ``test`` and ``meta``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = range(n_train)
    dump(
        folder / "train",
        {
            "fine_labels": [(2 * i) % 100 for i in train],
            "coarse_labels": [i % 20 for i in train],
            "data": cifar_rows(train),
        },
    )
    test = range(100, 100 + n_test)
    dump(
        folder / "test",
        {
            "fine_labels": [i % 100 for i in test],
            "coarse_labels": [i % 20 for i in test],
            "data": cifar_rows(test),
        },
    )
    dump(
        folder / "meta",
        {
            "fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)],
        },
    )
    return folder


def expected_pixel(rgb: tuple[int, int, int], mean, std) -> torch.Tensor:
    """Per-channel value of a normalised constant-colour image: (v/255 - mean_c) / std_c."""
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, mean, std, strict=True)])


def cifar10(data_dir: Path, **kwargs) -> CIFARDataModule:
    kwargs.setdefault("batch_size", 8)
    return CIFARDataModule(name="cifar10", data_dir=str(data_dir), num_workers=0, **kwargs)


def write_image_folder(
    root: Path, split: str, classes: list[str], sizes: list[tuple[int, int]]
) -> dict[str, tuple[int, int, int]]:
    """PNG images ``root/split/<class>/<k>.png`` of constant colour; returns path -> colour."""
    colours = {}
    for c, name in enumerate(classes):
        (root / split / name).mkdir(parents=True)
        for k, (w, h) in enumerate(sizes):
            rgb = colour(31 * c + k + len(split))
            path = root / split / name / f"{k}.png"
            Image.new("RGB", (w, h), rgb).save(path)
            colours[str(path)] = rgb
    return colours


IMG_SIZES = [(40, 50), (64, 48), (33, 37), (50, 40)]


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """An image folder with 3 classes, 4 training and 2 validation images per class."""
    root = tmp_path / "imgs"
    write_image_folder(root, "train", ["ant", "bee", "cat"], IMG_SIZES)
    write_image_folder(root, "val", ["ant", "bee", "cat"], IMG_SIZES[:2])
    return root


# --------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize(("val_fraction", "n_val"), [(0.1, 10), (0.25, 25), (0.001, 1)])
def test_cifar10_split_sizes(tmp_path, val_fraction, n_val):
    """val_fraction of the 100 training images go to val (at least 1), the rest to train."""
    write_cifar10(tmp_path)
    dm = cifar10(tmp_path, val_fraction=val_fraction)
    dm.setup("fit")
    assert len(dm.val_set) == n_val
    assert len(dm.train_set) == 5 * PER_BATCH - n_val
    assert dm.num_classes == 10 and dm.in_channels == 3 and dm.image_size == 32


def test_cifar10_split_is_seeded_and_partitions_training_images(tmp_path):
    """Same split_seed -> same indices; another seed -> others; train+val = all, disjoint."""
    write_cifar10(tmp_path)
    a, b, c = (cifar10(tmp_path, split_seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup("fit")
    assert a.train_set.indices == b.train_set.indices
    assert a.val_set.indices == b.val_set.indices
    assert a.val_set.indices != c.val_set.indices
    for dm in (a, c):
        train, val = set(dm.train_set.indices), set(dm.val_set.indices)
        assert train.isdisjoint(val)
        assert train | val == set(range(5 * PER_BATCH))
        assert len(dm.train_set.indices) == len(train)  # no index twice
    # The split is a permutation, not the first images of the file.
    assert sorted(a.val_set.indices) != list(range(10))


def test_cifar10_eval_tensors_are_normalised_exactly(tmp_path):
    """Val and test tensors hold (v/255 - mean_c)/std_c for each channel's value v."""
    write_cifar10(tmp_path)
    dm = cifar10(tmp_path)
    dm.setup("fit")
    mean, std = STATS["cifar10"]
    for k, index in enumerate(dm.val_set.indices):
        image, label = dm.val_set[k]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert label == index % 10
        want = expected_pixel(colour(index), mean, std).view(3, 1, 1).expand(3, 32, 32)
        torch.testing.assert_close(image, want.float(), atol=1e-5, rtol=0)
    assert len(dm.test_set) == N_TEST
    for k in range(N_TEST):
        image, label = dm.test_set[k]
        assert label == (200 + k + 3) % 10
        want = expected_pixel(colour(200 + k), mean, std).view(3, 1, 1).expand(3, 32, 32)
        torch.testing.assert_close(image, want.float(), atol=1e-5, rtol=0)


def test_cifar10_train_tensors_are_augmented_copies_of_the_image(tmp_path):
    """A training tensor is a shifted/flipped crop: its centre keeps the normalised colour."""
    write_cifar10(tmp_path)
    dm = cifar10(tmp_path)
    dm.setup("fit")
    mean, std = STATS["cifar10"]
    torch.manual_seed(0)
    for k, index in enumerate(dm.train_set.indices[:10]):
        image, label = dm.train_set[k]
        assert image.shape == (3, 32, 32)
        assert label == index % 10
        want = expected_pixel(colour(index), mean, std).view(3, 1, 1).expand(3, 24, 24)
        # A shift of at most 4 pixels never moves padding into the central 24x24 window.
        torch.testing.assert_close(image[:, 4:28, 4:28], want.float(), atol=1e-5, rtol=0)


def test_cifar10_padding_of_the_random_crop_is_zero_before_normalisation(tmp_path):
    """Some training crops show the zero padding, which becomes -mean_c/std_c."""
    write_cifar10(tmp_path)
    dm = cifar10(tmp_path)
    dm.setup("fit")
    mean, std = STATS["cifar10"]
    pad = expected_pixel((0, 0, 0), mean, std)
    torch.manual_seed(0)
    corners = torch.stack([dm.train_set[0][0][:, 0, 0] for _ in range(50)])
    assert any(torch.allclose(corner, pad.float(), atol=1e-5) for corner in corners)


def test_cifar10_test_split_and_loaders(tmp_path):
    """With test_batch present, test_dataloader yields all N_TEST images in order."""
    write_cifar10(tmp_path)
    dm = cifar10(tmp_path, batch_size=8, eval_batch_size=6)
    assert dm.has_test_split
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert [len(y) for _, y in batches] == [6, 6, 6, 2]
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == [(200 + k + 3) % 10 for k in range(N_TEST)]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)


def test_cifar100_variant(tmp_path):
    """cifar100 reads cifar-100-python/{train,test,meta} with fine labels, 100 classes."""
    write_cifar100(tmp_path)
    dm = CIFARDataModule(
        name="cifar100", data_dir=str(tmp_path), num_classes=100, batch_size=4, val_fraction=0.2
    )
    assert dm.num_classes == 100
    assert dm.has_test_split
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (48, 12, 15)
    assert dm.train_set.dataset.classes == [f"fine_{i}" for i in range(100)]
    mean, std = STATS["cifar100"]
    for k, index in enumerate(dm.val_set.indices):
        image, label = dm.val_set[k]
        assert label == (2 * index) % 100
        want = expected_pixel(colour(index), mean, std).view(3, 1, 1).expand(3, 32, 32)
        torch.testing.assert_close(image, want.float(), atol=1e-5, rtol=0)
    image, label = dm.test_set[3]
    assert label == 103 % 100
    torch.testing.assert_close(
        image[:, 0, 0], expected_pixel(colour(103), mean, std).float(), atol=1e-5, rtol=0
    )


def test_cifar_config_contradictions_are_user_errors(tmp_path):
    """Unknown names, wrong shape overrides and bad val_fraction raise UserError."""
    with pytest.raises(UserError, match="unknown CIFAR dataset 'cifar1000'"):
        CIFARDataModule(name="cifar1000", data_dir=str(tmp_path))
    msg = "cifar100 has num_classes=100 but data.num_classes=10; remove the override"
    with pytest.raises(UserError, match=msg):
        CIFARDataModule(name="cifar100", data_dir=str(tmp_path), num_classes=10)
    with pytest.raises(UserError, match="cifar10 has image_size=32 but data.image_size=64"):
        CIFARDataModule(name="cifar10", data_dir=str(tmp_path), image_size=64)
    for bad in (0, 1, 1.5):
        with pytest.raises(UserError, match=rf"data.val_fraction must be in \(0, 1\), got {bad}"):
            CIFARDataModule(name="cifar10", data_dir=str(tmp_path), val_fraction=bad)


# --------------------------------------------------------------------------- CIFAR errors


def test_cifar_missing_test_split(tmp_path):
    """Without test_batch: no test split, setup still works, test_dataloader is a UserError."""
    write_cifar10(tmp_path, with_test=False)
    dm = cifar10(tmp_path)
    assert dm.has_test_split is False
    dm.setup("fit")
    assert dm.has_test_split is False
    assert dm.test_set is None
    assert len(dm.train_set) + len(dm.val_set) == 5 * PER_BATCH
    with pytest.raises(UserError) as info:
        dm.test_dataloader()
    assert str(info.value) == "CIFARDataModule has no test split; evaluate on validation"


def test_cifar_missing_directory(tmp_path):
    """A data_dir without cifar-10-batches-py/ -> UserError naming the folder and the fix."""
    dm = cifar10(tmp_path / "nowhere")
    assert dm.has_test_split is False
    with pytest.raises(UserError) as info:
        dm.setup("fit")
    msg = str(info.value)
    folder = tmp_path / "nowhere" / "cifar-10-batches-py"
    assert msg.startswith(f"cifar10 not found in {folder} (no such directory): ")
    assert "put the official python-version files there" in msg
    assert "set data.data_dir to the folder that holds cifar-10-batches-py/" in msg
    assert "data.download=true" in msg
    assert dm.train_set is None


@pytest.mark.parametrize("missing", ["data_batch_3", "batches.meta"])
def test_cifar_missing_training_file(tmp_path, missing):
    """A missing training batch or meta file is named in the UserError."""
    folder = write_cifar10(tmp_path)
    (folder / missing).unlink()
    with pytest.raises(UserError) as info:
        cifar10(tmp_path).setup("fit")
    msg = str(info.value)
    assert f"cifar10 not found in {folder} (missing {missing})" in msg
    assert "data.data_dir" in msg


def test_cifar100_missing_files_named(tmp_path):
    """CIFAR-100 names its own folder and files (train, meta) when they are absent."""
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(UserError) as info:
        CIFARDataModule(name="cifar100", data_dir=str(tmp_path)).setup()
    msg = str(info.value)
    assert f"cifar100 not found in {tmp_path / 'cifar-100-python'} (missing train, meta)" in msg
    assert "folder that holds cifar-100-python/" in msg


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("garbage", "invalid load key, '\\xff'."), ("truncated", "pickle data was truncated")],
    ids=["garbage", "truncated"],
)
def test_cifar_unreadable_batch(tmp_path, kind, reason):
    """A garbage or truncated data_batch file -> UserError naming that file."""
    folder = write_cifar10(tmp_path)
    path = folder / "data_batch_2"
    content = path.read_bytes()
    path.write_bytes(b"\xff\xd8 JPEG" if kind == "garbage" else content[: len(content) // 2])
    with pytest.raises(UserError) as info:
        cifar10(tmp_path).setup("fit")
    assert str(info.value) == (
        f"cannot read cifar10 file {path}: not a CIFAR batch (unreadable pickle: {reason})"
    )


def test_cifar_unreadable_test_batch(tmp_path):
    """A truncated test_batch is reported as a UserError too (not a raw pickle error)."""
    folder = write_cifar10(tmp_path)
    path = folder / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError) as info:
        cifar10(tmp_path).setup("fit")
    assert str(info.value).startswith(f"cannot read cifar10 file {path}: not a CIFAR batch (")


def test_cifar_generated_files_warn_about_md5(tmp_path, caplog):
    """Files that differ from the official release are used, with one MD5 warning."""
    folder = write_cifar10(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ekd_ddnn.data.cifar"):
        cifar10(tmp_path).setup("fit")
    warnings = [r for r in caplog.records if r.name == "ekd_ddnn.data.cifar"]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert f"cifar10 files in {folder} differ from the official release" in msg
    assert "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch" in msg


# --------------------------------------------------------------------------- CIFAR pickles


class RunsCode:
    """Pickles as ``os.system(command)``: what a crafted batch file runs under pickle.load."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def cifar_batch(n: int = PER_BATCH, **changes) -> dict:
    """A valid CIFAR-10 batch dict of n images, with entries replaced by ``changes``."""
    batch = {"batch_label": "b", "labels": [i % 10 for i in range(n)], "data": cifar_rows(range(n))}
    return {**batch, **changes}


def copy_cifar_folder(source: Path, root: Path) -> Path:
    """Copy the files of ``source/cifar-10-batches-py`` to ``root`` (writable copies)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for path in (source / "cifar-10-batches-py").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.fixture(params=["generated", "shared"])
def cifar_files(request, tmp_path) -> Path:
    """A writable cifar-10-batches-py folder: generated files, or copies of the real subset."""
    if request.param == "generated":
        return write_cifar10(tmp_path)
    if not (SHARED_SUBSET / "cifar-10-batches-py").is_dir():
        pytest.skip(f"shared CIFAR-10 subset not found at {SHARED_SUBSET}")
    return copy_cifar_folder(SHARED_SUBSET, tmp_path)


def test_cifar_batch_that_runs_code_is_refused(cifar_files, tmp_path):
    """A data_batch_1 whose unpickling calls os.system is refused before anything runs; the
    same file does run the command under plain pickle.load (the threat is real)."""
    marker = tmp_path / "marker"
    path = cifar_files / "data_batch_1"
    dump(path, cifar_batch(data=RunsCode(f"touch {marker}")))
    with pytest.raises(UserError) as info:
        cifar10(tmp_path).setup("fit")
    assert str(info.value) == (
        f"cannot read cifar10 file {path}: it holds a Python object (posix.system) that would "
        "run code on load; use the official python-version files"
    )
    assert not marker.exists()
    with open(path, "rb") as f:
        pickle.load(f, encoding="latin1")  # what torchvision's CIFAR10 does with it
    assert marker.exists()


@pytest.mark.parametrize(
    "content",
    [b"this is not a pickle", b"", b"\x80\x02}q\x00(X"],
    ids=["garbage", "empty", "truncated"],
)
def test_cifar_garbage_meta_is_refused(cifar_files, tmp_path, content):
    """Garbage, empty or truncated batches.meta -> UserError naming the file."""
    path = cifar_files / "batches.meta"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        cifar10(tmp_path).setup("fit")
    prefix = f"cannot read cifar10 file {path}: not a CIFAR meta file (unreadable pickle: "
    assert str(info.value).startswith(prefix)
    assert "\n" not in str(info.value)


def test_cifar_object_array_is_refused(tmp_path):
    """A batch whose data is an object array (its items unpickle as arbitrary objects) is
    refused, however harmless its items."""
    folder = write_cifar10(tmp_path)
    path = folder / "data_batch_3"
    dump(path, cifar_batch(data=cifar_rows(range(PER_BATCH)).astype(object)))
    with pytest.raises(UserError) as info:
        cifar10(tmp_path).setup("fit")
    assert str(info.value) == (
        f"cannot read cifar10 file {path}: not a CIFAR batch "
        "(it holds an array of dtype 'O8', not numbers)"
    )


class NDArrayWithBuffer:
    """Pickles as ``numpy.ndarray(shape, dtype, buffer)``: numpy builds arrays straight from
    the file's bytes that way (object arrays from raw pointers); only _reconstruct may."""

    def __reduce__(self):
        return np.ndarray, ((4,), np.dtype(np.uint8), b"\x00" * 4)


BAD_BATCHES = {  # name -> (unpickled content, reason in the message)
    "a list": ([1, 2, 3], "it holds a list, not a dict"),
    "no labels": ({"data": cifar_rows(range(3))}, "no 'labels' entry"),
    "labels too big": (cifar_batch(3, labels=[0, 10, 1]), "'labels' holds 10, outside 0..9"),
    "negative label": (cifar_batch(3, labels=[0, -1, 1]), "'labels' holds -1, outside 0..9"),
    "str label": (cifar_batch(2, labels=[0, "1"]), "'labels' holds a str, not only ints"),
    "bool label": (cifar_batch(2, labels=[0, True]), "'labels' holds a bool, not only ints"),
    "labels array": (
        cifar_batch(2, labels=np.zeros(2, np.int64)),
        "'labels' is a ndarray, not a list of ints",
    ),
    "labels count": (cifar_batch(3, labels=[0, 1]), "3 images but 2 labels"),
    "row length": (
        cifar_batch(2, data=np.zeros((2, 100), np.uint8)),
        "'data' has shape (2, 100), not one row of 3072 values per image",
    ),
    "data list": (cifar_batch(1, data=[0] * 3072), "'data' is a list, not a numpy array"),
    "float data": (
        cifar_batch(2, data=np.full((2, 3072), 0.5)),
        "'data' (float64) holds values other than the integers 0..255",
    ),
    "int data out of range": (
        cifar_batch(2, data=np.full((2, 3072), 256, np.int64)),
        "'data' (int64) holds values other than the integers 0..255",
    ),
    "complex data": (
        cifar_batch(2, data=np.zeros((2, 3072), np.complex64)),
        "it holds an array of dtype 'c8', not numbers",
    ),
    "ndarray called": (
        cifar_batch(2, extra=NDArrayWithBuffer()),
        "numpy.ndarray is called directly, not through _reconstruct",
    ),
}


@pytest.mark.parametrize(("batch", "reason"), BAD_BATCHES.values(), ids=BAD_BATCHES.keys())
def test_cifar_batch_structure_is_checked(tmp_path, batch, reason):
    """Batches that unpickle but are not CIFAR batches -> UserError naming file and reason."""
    folder = write_cifar10(tmp_path)
    path = folder / "data_batch_4"
    dump(path, batch)
    with pytest.raises(UserError) as info:
        cifar10(tmp_path).setup("fit")
    assert str(info.value) == f"cannot read cifar10 file {path}: not a CIFAR batch ({reason})"


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({"names": []}, "no 'label_names' entry"),
        ({"label_names": "airplane"}, "'label_names' is not a list of str"),
        ({"label_names": [1, 2]}, "'label_names' is not a list of str"),
        ({"label_names": ["a", "b"]}, "'label_names' has 2 names, not 10"),
        (("label_names",), "it holds a tuple, not a dict"),
    ],
)
def test_cifar_meta_structure_is_checked(tmp_path, meta, reason):
    """A meta file without a list of class names -> UserError naming file and reason."""
    path = write_cifar10(tmp_path) / "batches.meta"
    dump(path, meta)
    with pytest.raises(UserError) as info:
        cifar10(tmp_path).setup("fit")
    assert str(info.value) == f"cannot read cifar10 file {path}: not a CIFAR meta file ({reason})"


def test_cifar_other_globals_are_refused_too(tmp_path):
    """Any class outside the format is refused, harmless or not (here an OrderedDict)."""
    path = write_cifar10(tmp_path) / "batches.meta"
    dump(path, collections.OrderedDict(label_names=["x"] * 10))
    with pytest.raises(UserError, match=re.escape("(collections.OrderedDict) that would run")):
        cifar10(tmp_path).setup("fit")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_cifar_batches_of_every_pickle_protocol_load(tmp_path, protocol):
    """Files re-written by Python 3 with any pickle protocol load to the same images; data
    of another integer dtype holding 0..255 is read as uint8."""
    folder = write_cifar10(tmp_path)
    reference = cifar10(tmp_path)
    reference.setup("fit")
    for b in range(5):
        path = folder / f"data_batch_{b + 1}"
        with open(path, "rb") as f:
            batch = pickle.load(f)
        if b == 0:
            batch["data"] = batch["data"].astype(">i4")
        if b == 1:
            batch["data"] = np.asfortranarray(batch["data"])
        with open(path, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    dm = cifar10(tmp_path)
    dm.setup("fit")
    assert dm.train_set.dataset.data.dtype == np.uint8
    assert np.array_equal(dm.train_set.dataset.data, reference.train_set.dataset.data)
    assert dm.train_set.dataset.targets == reference.train_set.dataset.targets


def py2_pickle(label_names: list[str], rows: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as Python 2's cPickle writes the official files (protocol 2, str as
    BINSTRING, ``numpy.core.multiarray._reconstruct``), built opcode by opcode."""

    def s(raw: bytes) -> bytes:  # a Python 2 str: SHORT_BINSTRING or BINSTRING
        if len(raw) < 256:
            return b"U" + bytes([len(raw)]) + raw
        return b"T" + struct.pack("<i", len(raw)) + raw

    def ints(values: list[int]) -> bytes:
        return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values)

    shape = b"".join(b"J" + struct.pack("<i", d) for d in rows.shape) + b"\x86"
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
        b"(K\x01" + shape + b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
        b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        b"\x89" + s(rows.tobytes()) + b"tb"
    )
    names = b"(" + b"".join(s(n.encode()) for n in label_names) + b"l"
    return (
        b"\x80\x02}("
        + s(b"data")
        + array
        + s(b"labels")
        + ints(labels)
        + b"l"
        + s(b"label_names")
        + names
        + b"u."
    )


def test_cifar_python2_pickles_load_as_torchvision_reads_them(tmp_path):
    """Python-2 pickles (the official release's format) give what torchvision's CIFAR10
    reads from the same files."""
    folder = write_cifar10(tmp_path)
    names = [f"class_{i}" for i in range(10)]
    for b in range(5):
        indices = range(b * PER_BATCH, (b + 1) * PER_BATCH)
        raw = py2_pickle(names, cifar_rows(indices), [(i * 7) % 10 for i in indices])
        (folder / f"data_batch_{b + 1}").write_bytes(raw)
    (folder / "batches.meta").write_bytes(py2_pickle(names, cifar_rows(range(1)), [0]))
    dm = cifar10(tmp_path)
    dm.setup("fit")
    official = torchvision_cifar10(tmp_path)
    assert np.array_equal(dm.train_set.dataset.data, official.data)
    assert dm.train_set.dataset.targets == official.targets == [(i * 7) % 10 for i in range(100)]
    assert dm.train_set.dataset.classes == official.classes == names


def torchvision_cifar10(root: Path, train: bool = True) -> CIFAR10:
    """torchvision's own CIFAR10 on ``root`` (plain pickle.load; MD5 checks off for subsets)."""

    class Unchecked(CIFAR10):
        meta = {**CIFAR10.meta, "md5": None}

        def _check_integrity(self) -> bool:
            return True

    return Unchecked(str(root), train=train)


# --------------------------------------------------------------------------- shared subset


@pytest.fixture(scope="module")
def shared_subset():
    if not (SHARED_SUBSET / "cifar-10-batches-py").is_dir():
        pytest.skip(f"shared CIFAR-10 subset not found at {SHARED_SUBSET}")
    return SHARED_SUBSET


def test_shared_cifar10_subset(shared_subset, caplog):
    """The real 5085-image subset loads without a test split, with an MD5 warning."""
    dm = cifar10(shared_subset, batch_size=16)
    assert dm.has_test_split is False
    with caplog.at_level(logging.WARNING, logger="ekd_ddnn.data.cifar"):
        dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 5085
    assert len(dm.val_set) == round(0.1 * 5085) == 508
    assert dm.test_set is None
    warned = [r.getMessage() for r in caplog.records if r.name == "ekd_ddnn.data.cifar"]
    assert len(warned) == 1
    assert "differ from the official release" in warned[0]
    assert "data_batch_1" in warned[0] and "data_batch_5" in warned[0]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    labels = dm.train_set.dataset.targets
    assert sorted(set(labels)) == list(range(10))
    with pytest.raises(UserError, match="has no test split"):
        dm.test_dataloader()


def test_shared_cifar10_subset_reads_as_torchvision_does(shared_subset):
    """The real subset gives exactly torchvision CIFAR10's data, targets, classes and items."""
    dm = cifar10(shared_subset, batch_size=16)
    dm.setup("fit")
    ours = dm.train_set.dataset
    official = torchvision_cifar10(shared_subset)
    assert ours.data.dtype == official.data.dtype == np.uint8
    assert np.array_equal(ours.data, official.data)
    assert ours.targets == official.targets
    assert ours.classes == official.classes and ours.class_to_idx == official.class_to_idx
    official.transform = ours.transform  # the same training augmentation, same seed
    for index in (0, 1234, 5084):
        torch.manual_seed(index)
        mine = ours[index]
        torch.manual_seed(index)
        theirs = official[index]
        assert torch.equal(mine[0], theirs[0]) and mine[1] == theirs[1]


# --------------------------------------------------------------------------- image folders


def test_imagenet_folder_batches(image_root):
    """Train and val batches are (B, 3, image_size, image_size) whatever the source size."""
    dm = ImageNetDataModule(
        data_dir=str(image_root), num_classes=3, image_size=32, batch_size=4, eval_batch_size=4
    )
    assert dm.has_test_split is False
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (12, 6)
    assert dm.train_set.classes == ["ant", "bee", "cat"]
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
        assert set(y.tolist()) <= {0, 1, 2}
    val = list(dm.val_dataloader())
    assert [tuple(x.shape) for x, _ in val] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert torch.cat([y for _, y in val]).tolist() == [0, 0, 1, 1, 2, 2]
    assert dm.test_set is None
    with pytest.raises(UserError, match="ImageNetDataModule has no test split"):
        dm.test_dataloader()


def test_imagenet_eval_tensors_are_normalised(tmp_path):
    """A constant-colour image resized and centre-cropped keeps (v/255 - mean_c)/std_c."""
    root = tmp_path / "imgs"
    write_image_folder(root, "train", ["a", "b"], IMG_SIZES[:1])
    colours = write_image_folder(root, "val", ["a", "b"], [(40, 50), (70, 45)])
    dm = ImageNetDataModule(data_dir=str(root), num_classes=2, image_size=32, batch_size=2)
    dm.setup()
    for k, (path, _) in enumerate(dm.val_set.samples):
        image, _ = dm.val_set[k]
        assert image.shape == (3, 32, 32)
        want = expected_pixel(colours[path], IMAGENET_MEAN, IMAGENET_STD)
        torch.testing.assert_close(
            image, want.float().view(3, 1, 1).expand(3, 32, 32), atol=1e-5, rtol=0
        )


def test_imagenet_class_count_mismatch(image_root):
    """num_classes=5 with 3 class folders -> UserError naming both counts."""
    dm = ImageNetDataModule(data_dir=str(image_root), num_classes=5, image_size=32)
    with pytest.raises(UserError) as info:
        dm.setup()
    assert str(info.value) == (
        f"{image_root / 'train'} has 3 class folders but data.num_classes=5; set data.num_classes=3"
    )


def test_imagenet_missing_val_folder(tmp_path):
    """A missing val/ folder -> UserError naming it and the expected layout."""
    root = tmp_path / "imgs"
    write_image_folder(root, "train", ["ant", "bee", "cat"], IMG_SIZES[:1])
    dm = ImageNetDataModule(data_dir=str(root), num_classes=3, image_size=32)
    with pytest.raises(UserError) as info:
        dm.setup()
    msg = str(info.value)
    assert msg.startswith(f"image folder {root / 'val'} does not exist: ")
    assert f"{root}/train and {root}/val, or set data.data_dir" in msg


def test_imagenet_missing_data_dir(tmp_path):
    """A data_dir that does not exist -> UserError about its train/ folder."""
    dm = ImageNetDataModule(data_dir=str(tmp_path / "none"), num_classes=3, image_size=32)
    with pytest.raises(
        UserError, match="^" + re.escape(f"image folder {tmp_path / 'none' / 'train'} does not")
    ):
        dm.setup()


def test_imagenet_val_with_other_classes(image_root):
    """val/ with the same count but other class names -> UserError."""
    write_image_folder(image_root, "val2", ["ant", "bee", "dog"], IMG_SIZES[:1])
    (image_root / "val").rename(image_root / "val_old")
    (image_root / "val2").rename(image_root / "val")
    dm = ImageNetDataModule(data_dir=str(image_root), num_classes=3, image_size=32)
    with pytest.raises(UserError) as info:
        dm.setup()
    assert str(info.value) == f"{image_root}/val has other class folders than {image_root}/train"


def test_imagenet_empty_class_folder(image_root):
    """A class folder without images -> UserError 'cannot read image folder'."""
    for png in (image_root / "val" / "cat").iterdir():
        png.unlink()
    dm = ImageNetDataModule(data_dir=str(image_root), num_classes=3, image_size=32)
    with pytest.raises(
        UserError, match="^" + re.escape(f"cannot read image folder {image_root / 'val'}: ")
    ):
        dm.setup()


def test_imagenet_test_split_when_test_folder_exists(image_root):
    """has_test_split turns True with a test/ folder, and the test loader reads it."""
    dm = ImageNetDataModule(
        data_dir=str(image_root), num_classes=3, image_size=24, batch_size=2, eval_batch_size=5
    )
    assert dm.has_test_split is False
    write_image_folder(image_root, "test", ["ant", "bee", "cat"], IMG_SIZES[:3])
    assert dm.has_test_split is True
    dm.setup()
    assert len(dm.test_set) == 9
    shapes = [tuple(x.shape) for x, _ in dm.test_dataloader()]
    assert shapes == [(5, 3, 24, 24), (4, 3, 24, 24)]


def test_imagenet_in_channels_must_be_3(tmp_path):
    """in_channels other than 3 is rejected up front."""
    with pytest.raises(UserError, match="an image folder has in_channels=3 but data.in_channels=1"):
        ImageNetDataModule(data_dir=str(tmp_path), in_channels=1)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("bad.jpg", "not an image format PIL recognises"), ("cut.png", "image file is truncated")],
    ids=["garbage", "truncated"],
)
def test_imagenet_corrupt_image_is_one_line_user_error(image_root, name, reason):
    """A file PIL cannot read -> UserError naming it, while iterating the train loader."""
    path = image_root / "train" / "bee" / name
    if name == "bad.jpg":
        path.write_bytes(b"this is not a JPEG")
    else:
        Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    dm = ImageNetDataModule(data_dir=str(image_root), num_classes=3, image_size=16, batch_size=13)
    dm.setup("fit")
    assert len(dm.train_set) == 13  # one batch holds every image, the bad one included
    with pytest.raises(UserError) as info:
        list(dm.train_dataloader())
    assert str(info.value) == f"cannot read image {path}: {reason}; remove or replace the file"


def test_imagenet_loader_reads_images_as_torchvision_does(image_root):
    """load_rgb gives the same RGB image as torchvision's default loader (also for grey)."""
    from torchvision.datasets.folder import pil_loader

    from ekd_ddnn.data.imagenet import load_rgb

    grey = image_root / "train" / "ant" / "grey.png"
    Image.new("L", (9, 7), 77).save(grey)
    for path in (grey, image_root / "train" / "bee" / "1.png"):
        mine, theirs = load_rgb(str(path)), pil_loader(str(path))
        assert mine.mode == theirs.mode == "RGB"
        assert np.array_equal(np.asarray(mine), np.asarray(theirs))


@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_imagenet_num_classes_below_two(tmp_path, num_classes):
    """An image folder with fewer than two classes configured is refused up front."""
    with pytest.raises(UserError) as info:
        ImageNetDataModule(data_dir=str(tmp_path), num_classes=num_classes)
    assert str(info.value) == (
        f"data.num_classes must be >= 2 (a classifier needs two classes), got {num_classes}"
    )


# --------------------------------------------------------------------------- digits


def test_digits_split_sizes_and_shapes():
    """1797 images: 180 val, 180 test, 1437 train, each (1, 16, 16), labels 0..9."""
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    sizes = (len(dm.train_set), len(dm.val_set), len(dm.test_set))
    assert sizes == (1437, 180, 180)
    assert sum(sizes) == 1797
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 16)
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        image, label = dataset[0]
        assert image.shape == (1, 16, 16)
        assert 0 <= int(label) <= 9
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 16, 16) and y.shape == (32,)


def test_digits_custom_fractions_and_size():
    """Other fractions and image_size change the split sizes and the image shape."""
    dm = DigitsDataModule(val_fraction=0.2, test_fraction=0.3, image_size=24, batch_size=8)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (899, 359, 539)
    assert dm.val_set[0][0].shape == (1, 24, 24)
    assert dm.train_set[0][0].shape == (1, 24, 24)


def test_digits_normalised_with_training_statistics():
    """The un-augmented training images have mean 0 and std 1 (to 1e-4)."""
    dm = DigitsDataModule()
    dm.setup()
    train_images = dm.train_set.tensors[0]
    assert train_images.shape == (1437, 1, 16, 16)
    assert abs(float(train_images.mean())) < 1e-4
    assert abs(float(train_images.std()) - 1) < 1e-4
    # Val images use the same (training) statistics, so they are not exactly standardised.
    val_images = dm.val_set.tensors[0]
    assert abs(float(val_images.mean())) > 1e-4


def test_digits_split_is_seeded_and_disjoint():
    """Same seed -> identical sets; another seed -> a different val set; splits disjoint."""
    a, b, c = (DigitsDataModule(split_seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert torch.equal(a.train_set.tensors[1], b.train_set.tensors[1])
    assert not torch.equal(a.val_set.tensors[1], c.val_set.tensors[1])
    # The three splits together hold every image once: same label counts as the full data.
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10).tolist()
    for dm in (a, c):
        parts = [dm.train_set.tensors[1], dm.val_set.tensors[1], dm.test_set.tensors[1]]
        assert torch.bincount(torch.cat(parts), minlength=10).tolist() == full


def test_digits_training_batches_are_shifted_crops():
    """Each training image is a crop of its zero-padded original (pad image_size // 8 = 2),
    offset per image: RandomCrop(padding=2), applied to the whole batch at once."""
    dm = DigitsDataModule(batch_size=1437)
    dm.setup()
    torch.manual_seed(0)
    dm.train_dataloader()  # the loader shuffles: match images to originals through labels
    images, labels = dm.train_set.tensors
    shifted, _ = dm.train_collate([(images[i], labels[i]) for i in range(64)])
    padded = torch.nn.functional.pad(images[:64], (2, 2, 2, 2))
    offsets = []
    for i in range(64):
        found = [
            (a, b)
            for a in range(5)
            for b in range(5)
            if torch.equal(shifted[i], padded[i, :, a : a + 16, b : b + 16])
        ]
        assert found, i
        offsets.append(found[0])
    assert len(set(offsets)) > 5  # offsets differ between images
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (1437, 1, 16, 16) and y.shape == (1437,)


def test_digits_config_errors():
    """Wrong num_classes / in_channels or bad fractions raise UserError with exact messages."""
    with pytest.raises(UserError) as info:
        DigitsDataModule(num_classes=5)
    assert str(info.value) == (
        "digits has num_classes=10 but data.num_classes=5; "
        "remove the override or set data.num_classes=10"
    )
    with pytest.raises(UserError, match="digits has in_channels=1 but data.in_channels=3"):
        DigitsDataModule(in_channels=3)
    msg = "data.val_fraction and data.test_fraction must be > 0 and sum to < 1"
    for fractions in ((0, 0.1), (0.1, 0), (0.5, 0.5)):
        with pytest.raises(UserError, match=msg):
            DigitsDataModule(val_fraction=fractions[0], test_fraction=fractions[1])


# --------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize(
    ("num_classes", "in_channels", "image_size"), [(10, 3, 32), (2, 1, 8), (100, 4, 5)]
)
def test_synthetic_shapes_and_labels(num_classes, in_channels, image_size):
    """Every split has the configured size, image shape and labels in 0..num_classes-1."""
    dm = SyntheticDataModule(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        num_train=40,
        num_val=12,
        num_test=7,
        batch_size=4,
    )
    dm.setup()
    for dataset, n in ((dm.train_set, 40), (dm.val_set, 12), (dm.test_set, 7)):
        images, labels = dataset.tensors
        assert images.shape == (n, in_channels, image_size, image_size)
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert int(labels.min()) >= 0 and int(labels.max()) < num_classes
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, in_channels, image_size, image_size)


def test_synthetic_is_deterministic():
    """Same seed -> identical tensors; another seed or split -> different tensors."""
    a, b, c = (SyntheticDataModule(seed=s, num_train=32) for s in (5, 5, 6))
    for dm in (a, b, c):
        dm.setup()
    for split in ("train_set", "val_set", "test_set"):
        for t_a, t_b in zip(getattr(a, split).tensors, getattr(b, split).tensors, strict=True):
            assert torch.equal(t_a, t_b)
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])
    assert not torch.equal(a.val_set.tensors[0], a.test_set.tensors[0])
    # seed + 1 for val: module(seed=5).val equals make_synthetic(..., seed=6).
    direct = make_synthetic(64, 10, 3, 32, seed=6)
    assert torch.equal(a.val_set.tensors[0], direct.tensors[0])
    assert torch.equal(a.val_set.tensors[1], direct.tensors[1])


def test_synthetic_class_means_separate_classes():
    """Images are shifted by a per-class mean, so class-wise averages differ."""
    images, labels = make_synthetic(4000, 2, 1, 4, seed=0).tensors
    m0, m1 = images[labels == 0].mean(), images[labels == 1].mean()
    means = torch.randn(2, 1, 1, 1, generator=torch.Generator().manual_seed(0)).flatten()
    torch.testing.assert_close(torch.stack([m0, m1]), means, atol=0.05, rtol=0)


# --------------------------------------------------------------------------- loader settings


def test_loaders_batch_sizes_and_drop_last():
    """Train loader drops the incomplete batch; eval loaders keep every sample."""
    dm = SyntheticDataModule(num_train=50, num_val=21, num_test=9, batch_size=8, eval_batch_size=5)
    dm.setup()
    train = dm.train_dataloader()
    assert train.batch_size == 8 and train.drop_last is True
    assert isinstance(train.sampler, RandomSampler)
    train_sizes = [len(y) for _, y in train]
    assert train_sizes == [8] * 6 and sum(train_sizes) == 48
    val = dm.val_dataloader()
    assert val.batch_size == 5 and val.drop_last is False
    assert isinstance(val.sampler, SequentialSampler)
    assert [len(y) for _, y in val] == [5, 5, 5, 5, 1]
    test_labels = torch.cat([y for _, y in dm.test_dataloader()])
    assert torch.equal(test_labels, dm.test_set.tensors[1])


def test_eval_batch_size_defaults_to_batch_size():
    """Without eval_batch_size the eval loaders use batch_size."""
    dm = SyntheticDataModule(num_val=10, batch_size=4)
    dm.setup()
    assert dm.eval_batch_size == 4
    assert [len(y) for _, y in dm.val_dataloader()] == [4, 4, 2]


def test_loader_worker_settings(monkeypatch):
    """persistent_workers only with num_workers > 0; workers pass through, and pin_memory
    where batches go to a CUDA device: the trainer's, else any there is (elsewhere the
    DataLoader would warn on every run or pin for nothing: the cifar and imagenet configs
    pin)."""
    cpu, cuda = (SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(t)),
                                 state=SimpleNamespace(fn="fit"), global_rank=0, world_size=1)
                 for t in ("cpu", "cuda"))  # fmt: skip
    for has_cuda, trainer, pinned in (
        (True, None, True),
        (False, None, False),
        (True, cpu, False),  # trainer.accelerator=cpu on a GPU machine
        (False, cuda, True),
    ):
        monkeypatch.setattr(torch.cuda, "is_available", lambda c=has_cuda: c)
        dm = SyntheticDataModule(num_workers=0, persistent_workers=True, pin_memory=True)
        dm.trainer = trainer
        dm.setup()
        assert dm.persistent_workers is False
        loader = dm.train_dataloader()
        assert loader.persistent_workers is False and loader.num_workers == 0
        assert loader.pin_memory is pinned, (has_cuda, trainer)
    monkeypatch.undo()
    dm = SyntheticDataModule(pin_memory=True)
    dm.setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next(iter(dm.train_dataloader()))
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    dm2 = SyntheticDataModule(num_workers=2, persistent_workers=True)
    dm2.setup()
    loader2 = dm2.val_dataloader()  # built, not iterated: no worker processes start
    assert loader2.persistent_workers is True and loader2.num_workers == 2
    assert SyntheticDataModule(num_workers=2).persistent_workers is False


def test_loader_errors():
    """batch_size < 1 is a UserError; a loader before setup() is a RuntimeError."""
    with pytest.raises(UserError) as info:
        SyntheticDataModule(batch_size=0)
    assert str(info.value) == "data.batch_size must be >= 1, got 0"
    with pytest.raises(RuntimeError, match=r"call setup\(\) before asking for a data loader"):
        SyntheticDataModule().train_dataloader()


@pytest.mark.parametrize("num_workers", [-1, -4])
def test_negative_num_workers(num_workers):
    """num_workers < 0 is a UserError saying what 0 means."""
    with pytest.raises(UserError) as info:
        SyntheticDataModule(num_workers=num_workers)
    assert str(info.value) == (
        f"data.num_workers must be >= 0, got {num_workers} (0 loads in the main process)"
    )
    with pytest.raises(UserError, match="data.num_workers must be >= 0"):
        CIFARDataModule(name="cifar10", num_workers=num_workers)


def test_synthetic_num_classes_below_two():
    """Synthetic data needs at least two classes; two is fine."""
    with pytest.raises(UserError) as info:
        SyntheticDataModule(num_classes=1)
    assert (
        str(info.value) == "data.num_classes must be >= 2 (a classifier needs two classes), got 1"
    )
    with pytest.raises(UserError, match="got 0$"):
        SyntheticDataModule(num_classes=0)
    assert SyntheticDataModule(num_classes=2).num_classes == 2


def test_setup_is_idempotent(tmp_path):
    """A second setup() keeps the first split (same Subset objects)."""
    write_cifar10(tmp_path)
    dm = cifar10(tmp_path)
    dm.setup("fit")
    train, val = dm.train_set, dm.val_set
    dm.setup("test")
    assert dm.train_set is train and dm.val_set is val
