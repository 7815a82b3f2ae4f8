"""CIFAR-10 / CIFAR-100 from the official "python version" files, read without running code.

Training: 4-pixel zero-pad + random 32x32 crop + horizontal flip, per-channel normalisation
(He et al. 2016); with ``on_device`` the same operations on batches of the uint8 pixels held on
the device. A seeded fraction of the training images is held out for validation.

The batch files are pickles, and ``pickle.load`` runs whatever a file names (a crafted
``data_batch_1`` can call ``os.system``). :class:`CIFARUnpickler` therefore admits only the
globals the official files hold (numpy's array and dtype reconstruction) and every file's
structure is checked after loading; anything else is a :class:`UserError` naming the file.
Items come out as from torchvision's ``CIFAR10``: a PIL image (``Image.fromarray``) through
the transform, so results stay identical.

torchvision checks every file against the official release's MD5 sums, which rejects subsets
of the same format (e.g. ``../shared/data/cifar10-subset``, whose batches hold fewer rows). We
check instead that the files exist and load, warn once when their sums differ from the
official ones, and read them as they are.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision.datasets import CIFAR10, CIFAR100, VisionDataset
from torchvision.datasets.utils import check_integrity, download_and_extract_archive
from torchvision.transforms import v2

from ekd_ddnn.data.base import ImageDataModule, check_fixed
from ekd_ddnn.data.device import Augmentation
from ekd_ddnn.errors import UserError

log = logging.getLogger(__name__)

STATS = {  # per-channel mean and std of the training images
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# name -> (torchvision class for file names and the download, class count, labels key)
DATASETS: dict[str, tuple[type[CIFAR10], int, str]] = {
    "cifar10": (CIFAR10, 10, "labels"),
    "cifar100": (CIFAR100, 100, "fine_labels"),
}

PIXELS = 3 * 32 * 32  # values per image row: 1024 red, 1024 green, 1024 blue
PAD = 4  # zero padding of the training crop


class _Refused(pickle.UnpicklingError):
    """A pickle names a global outside the CIFAR format (it could run code on load)."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


class _NotCIFAR(pickle.UnpicklingError):
    """A pickle of the admitted kinds whose content is not a CIFAR file (e.g. an object array)."""


class _Stub:
    """What a pickle's ``numpy.ndarray`` global resolves to: only ever an argument of
    ``_reconstruct``; calling it (``ndarray(shape, dtype, buffer)``) or rebuilding it is
    refused."""

    __slots__ = ()

    def __call__(self, *args: Any) -> None:
        raise _NotCIFAR("numpy.ndarray is called directly, not through _reconstruct")

    def __setstate__(self, state: Any) -> None:
        raise _NotCIFAR("numpy.ndarray is rebuilt with state")


class _DType:
    """Stands in for a numpy dtype while loading: numbers only (bool, int, unsigned, float),
    no fields, no sub-arrays, no flags; only the byte order is taken from its state."""

    __slots__ = ("dtype",)

    def __init__(self, spec: Any) -> None:
        if not (isinstance(spec, str) and re.fullmatch(r"[biuf][1-9][0-9]?", spec)):
            raise _NotCIFAR(f"it holds an array of dtype {spec!r}, not numbers")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state: Any) -> None:
        if not (
            isinstance(state, tuple)
            and len(state) in (8, 9)
            and state[1] in ("<", ">", "|", "=")
            and state[2:5] == (None, None, None)
        ):
            raise _NotCIFAR("a numpy dtype with fields or sub-arrays")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


class _Array:
    """Stands in for a numpy array while loading; ``array`` is built with ``np.frombuffer``
    from the pickled bytes (numpy's own ``__setstate__`` never sees the file's data)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray | None = None) -> None:
        self.array = array

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # (version, shape, dtype, is_fortran, raw)
        if not (isinstance(state, tuple) and len(state) == 4):
            raise _NotCIFAR("a numpy array with an unknown state")
        shape, dtype, is_fortran, raw = state
        self.array = _array(raw, dtype, shape, "F" if is_fortran else "C")


def _array(raw: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """A writable array of ``shape`` read from ``raw`` bytes; _NotCIFAR unless well-formed."""
    if isinstance(raw, str):  # Python 2 str, decoded as latin-1
        raw = raw.encode("latin1")
    if not isinstance(raw, bytes | bytearray) or not isinstance(dtype, _DType):
        raise _NotCIFAR("a numpy array whose data is not raw numbers")
    if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
        raise _NotCIFAR(f"a numpy array of shape {shape!r}")
    if order not in ("C", "F") or len(raw) != math.prod(shape) * dtype.dtype.itemsize:
        raise _NotCIFAR(f"a numpy array of shape {shape} whose data has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order=order).copy()


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> _DType:
    """``numpy.dtype(spec, align, copy)`` as pickled: a plain numeric dtype's stand-in."""
    return _DType(spec)


def _reconstruct(subtype: Any, shape: Any, code: Any) -> _Array:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b"b")``: an empty array to fill."""
    if not isinstance(subtype, _Stub):
        raise _NotCIFAR("numpy's _reconstruct called with something other than ndarray")
    return _Array()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> _Array:
    """``numpy.core.numeric._frombuffer``, as numpy pickles arrays with protocol 5."""
    return _Array(_array(buf, dtype, shape, order))


def _latin1_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 writes ``bytes`` into protocol 0-2 pickles
    (``encode(text, "latin1")``); any other codec is refused."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _NotCIFAR(f"_codecs.encode with codec {encoding!r}")
    return obj.encode("latin1")


class CIFARUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of the CIFAR "python version" files.

    The official files (Python 2 pickles) name ``numpy.core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype``; files re-written by Python 3 add
    ``_codecs.encode`` for ``bytes`` (protocol <= 2, latin-1 only) or numpy's
    ``_frombuffer`` (protocol 5). Every other global raises before anything is called, so
    loading never runs code a file names. Even the admitted names resolve to stand-ins
    (:class:`_DType`, :class:`_Array`) that build plain numeric arrays with
    ``np.frombuffer``: numpy's own constructors would make object arrays from raw bytes (as
    pointers) or take dtype flags from the file. Use :func:`load_cifar_pickle`, which
    replaces the stand-ins by their arrays.
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 str -> str, as torchvision reads
        stub = _Stub()
        self.admitted: dict[tuple[str, str], Any] = {
            ("numpy", "ndarray"): stub,
            ("numpy", "dtype"): _dtype,
            ("_codecs", "encode"): _latin1_encode,
        }
        for core in ("numpy.core", "numpy._core"):
            self.admitted[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
            self.admitted[(f"{core}.numeric", "_frombuffer")] = _frombuffer

    def find_class(self, module: str, name: str) -> Any:
        """The stand-in for an admitted global; anything else raises before it is imported."""
        try:
            return self.admitted[(module, name)]
        except KeyError:
            raise _Refused(module, name) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_cifar_pickle(path: Path, dataset: str, what: str) -> Any:
    """Unpickle one CIFAR file with :class:`CIFARUnpickler` (arrays in a top-level dict come
    back as numpy arrays); any failure is a one-line :class:`UserError` naming the file
    (``what`` names the kind of file expected, e.g. "a CIFAR batch")."""
    try:
        with open(path, "rb") as f:
            loaded = CIFARUnpickler(f).load()
    except _Refused as exc:
        raise UserError(
            f"cannot read {dataset} file {path}: it holds a Python object "
            f"({exc.qualified_name}) that would run code on load; use the official "
            f"python-version files"
        ) from None
    except OSError as exc:
        reason = exc.strerror or _first_line(exc)
        raise UserError(
            f"cannot read {dataset} file {path}: {reason}; check the file's permissions"
        ) from None
    except _NotCIFAR as exc:
        raise UserError(f"cannot read {dataset} file {path}: not {what} ({exc})") from None
    except Exception as exc:  # truncated or garbage bytes, a malformed stream, ...
        reason = f"unreadable pickle: {_first_line(exc)}"
        raise UserError(f"cannot read {dataset} file {path}: not {what} ({reason})") from None
    if isinstance(loaded, dict):
        for key, value in loaded.items():
            if isinstance(value, _Array) and value.array is not None:
                loaded[key] = value.array
    return loaded


def _batch_arrays(entry: Any, num_classes: int, labels_key: str) -> tuple[np.ndarray, list[int]]:
    """Images (N, 32, 32, 3) uint8 and labels of an unpickled batch; ValueError says what is
    wrong with its structure."""
    if not isinstance(entry, dict):
        raise ValueError(f"it holds a {type(entry).__name__}, not a dict")
    for key in ("data", labels_key):
        if key not in entry:
            raise ValueError(f"no {key!r} entry")
    data, labels = entry["data"], entry[labels_key]
    if not isinstance(data, np.ndarray):
        raise ValueError(f"'data' is a {type(data).__name__}, not a numpy array")
    if data.dtype.kind not in "biuf":
        raise ValueError(f"'data' has dtype {data.dtype}, not numbers")
    if data.ndim < 2 or data.size != data.shape[0] * PIXELS:
        raise ValueError(f"'data' has shape {data.shape}, not one row of {PIXELS} values per image")
    if data.dtype != np.uint8:
        with np.errstate(invalid="ignore"):  # NaN or inf: refused just below
            as_bytes = data.astype(np.uint8)
        if not np.array_equal(as_bytes, data):
            raise ValueError(f"'data' ({data.dtype}) holds values other than the integers 0..255")
        data = as_bytes
    if not isinstance(labels, list):
        raise ValueError(f"{labels_key!r} is a {type(labels).__name__}, not a list of ints")
    for label in labels:
        if type(label) is not int:
            raise ValueError(f"{labels_key!r} holds a {type(label).__name__}, not only ints")
        if not 0 <= label < num_classes:
            raise ValueError(f"{labels_key!r} holds {label}, outside 0..{num_classes - 1}")
    if len(labels) != len(data):
        raise ValueError(f"{len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1)), labels


def read_cifar_batch(
    path: Path, dataset: str, num_classes: int, labels_key: str
) -> tuple[np.ndarray, list[int]]:
    """Images (N, 32, 32, 3) uint8 and labels of one batch file, checked; else a UserError."""
    entry = load_cifar_pickle(path, dataset, "a CIFAR batch")
    try:
        return _batch_arrays(entry, num_classes, labels_key)
    except ValueError as exc:
        raise UserError(f"cannot read {dataset} file {path}: not a CIFAR batch ({exc})") from None


def read_cifar_meta(path: Path, dataset: str, num_classes: int, key: str) -> list[str]:
    """The class names in the meta file (``key``), checked; else a UserError."""
    entry = load_cifar_pickle(path, dataset, "a CIFAR meta file")
    names = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(entry, dict) and key not in entry:
        reason = f"no {key!r} entry"
    elif not isinstance(entry, dict):
        reason = f"it holds a {type(entry).__name__}, not a dict"
    elif not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        reason = f"{key!r} is not a list of str"
    elif len(names) != num_classes:
        reason = f"{key!r} has {len(names)} names, not {num_classes}"
    else:
        return names
    raise UserError(f"cannot read {dataset} file {path}: not a CIFAR meta file ({reason})")


class CIFARImages(VisionDataset):
    """CIFAR images in memory: item ``i`` is ``(transform(PIL image), label)``, exactly as
    torchvision's ``CIFAR10`` gives it (``data`` is (N, 32, 32, 3) uint8, ``targets`` ints)."""

    def __init__(
        self,
        root: Path,
        data: np.ndarray,
        targets: list[int],
        classes: list[str],
        transform: Callable | None = None,
    ) -> None:
        super().__init__(root, transform=transform)
        self.data = data
        self.targets = targets
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.data[index])  # the PIL path, as torchvision's CIFAR10
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def __len__(self) -> int:
        return len(self.data)


class CIFARDataModule(ImageDataModule):
    """CIFAR-10 or CIFAR-100 from ``data_dir`` (which holds ``cifar-10-batches-py/`` etc.)."""

    in_channels = 3
    image_size = 32

    def __init__(
        self,
        *,
        name: str = "cifar10",
        data_dir: str = "data",
        num_classes: int | None = None,
        in_channels: int | None = None,
        image_size: int | None = None,
        download: bool = False,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        **loader_kwargs,
    ) -> None:
        super().__init__(**loader_kwargs)
        if name not in DATASETS:
            raise UserError(f"unknown CIFAR dataset {name!r}; choose cifar10 or cifar100")
        self.name = name
        official, self.num_classes, self.labels_key = DATASETS[name]
        check_fixed(
            name,
            num_classes=(num_classes, self.num_classes),
            in_channels=(in_channels, 3),
            image_size=(image_size, 32),
        )
        if not 0 < val_fraction < 1:
            raise UserError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.data_dir = Path(data_dir)
        self.folder = self.data_dir / official.base_folder
        self.download = download
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    @property
    def _official(self) -> type[CIFAR10]:
        return DATASETS[self.name][0]

    def _files(self, split: str) -> list[tuple[str, str]]:
        files = self._official.train_list if split == "train" else self._official.test_list
        return [tuple(f) for f in files]

    def _missing(self, split: str) -> list[str]:
        return [name for name, _ in self._files(split) if not (self.folder / name).is_file()]

    @property
    def has_test_split(self) -> bool:
        return not self._missing("test")

    def prepare_data(self) -> None:
        """Download and unpack the official archive (MD5-checked) unless every file is the
        official one already; torchvision's download alone, never its unpickling."""
        if not self.download:
            return
        files = self._files("train") + self._files("test")
        if all(check_integrity(str(self.folder / n), md5) for n, md5 in files):
            return
        official = self._official
        download_and_extract_archive(
            official.url, str(self.data_dir), filename=official.filename, md5=official.tgz_md5
        )

    def _check_files(self) -> None:
        missing = self._missing("train")
        meta = self._official.meta["filename"]
        if not (self.folder / meta).is_file():
            missing.append(meta)
        if missing:
            where = f"missing {', '.join(missing)}" if self.folder.is_dir() else "no such directory"
            raise UserError(
                f"{self.name} not found in {self.folder} ({where}): put the official "
                f"python-version files there (set data.data_dir to the folder that holds "
                f"{self.folder.name}/), or set data.download=true where there is internet"
            )
        present = [f for split in ("train", "test") for f in self._files(split)]
        present = [(n, m) for n, m in present if (self.folder / n).is_file()]
        changed = [n for n, m in present if not check_integrity(str(self.folder / n), m)]
        if changed:
            log.warning(
                "%s files in %s differ from the official release (MD5 of %s); using them as "
                "they are (a subset or a re-export of the same format)",
                self.name,
                self.folder,
                ", ".join(changed),
            )

    def _read(self, split: str) -> tuple[np.ndarray, list[int]]:
        """Images (N, 32, 32, 3) uint8 and labels of all batch files of ``split``, checked."""
        arrays = [
            read_cifar_batch(self.folder / n, self.name, self.num_classes, self.labels_key)
            for n, _ in self._files(split)
        ]
        data = np.concatenate([images for images, _ in arrays])
        return data, [label for _, labels in arrays for label in labels]

    def device_split(self) -> tuple[torch.Tensor, torch.Tensor, Augmentation]:
        """The training images as their uint8 pixels (N, 3, 32, 32), read once; crop, flip and
        normalisation as the per-image transform does them."""
        images = self.train_set.dataset.data[self.train_set.indices]
        labels = torch.tensor(self.train_set.dataset.targets)[self.train_set.indices]
        mean, std = STATS[self.name]
        augmentation = Augmentation(pad=PAD, flip=True, mean=mean, std=std)
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, augmentation

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._check_files()
        meta = self._official.meta
        classes = read_cifar_meta(
            self.folder / meta["filename"], self.name, self.num_classes, meta["key"]
        )
        mean, std = STATS[self.name]
        to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        train_tf = v2.Compose(
            [v2.RandomCrop(32, padding=PAD), v2.RandomHorizontalFlip(), *to_tensor]
        )
        eval_tf = v2.Compose(to_tensor)
        data, targets = self._read("train")
        n = len(data)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        n_val = max(1, round(self.val_fraction * n))
        if n - n_val < self.batch_size:
            raise UserError(
                f"{n - n_val} training images remain after the validation split, fewer than "
                f"data.batch_size={self.batch_size}; lower data.val_fraction or data.batch_size"
            )
        # train and val share the arrays (read once), each with its own transform
        train_full = CIFARImages(self.data_dir, data, targets, classes, train_tf)
        val_full = CIFARImages(self.data_dir, data, targets, classes, eval_tf)
        test_set = None
        if self.has_test_split:
            test_set = CIFARImages(self.data_dir, *self._read("test"), classes, eval_tf)
        # assigned last: a failed setup leaves nothing half-built behind
        self.train_set, self.val_set, self.test_set = (
            Subset(train_full, order[n_val:]),
            Subset(val_full, order[:n_val]),
            test_set,
        )
