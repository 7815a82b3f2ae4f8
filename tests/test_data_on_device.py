"""``data.on_device=true``: the training split on the device, augmented there in batches.

The batched augmentation must equal the per-image transforms for the same offsets and flips,
draw them with the same distribution, visit every image once per epoch in a seeded order that
changes between epochs, shard it across ranks, and run under the real command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.calibration import calibration_batches
from ekd_ddnn.data import DigitsDataModule, ImageNetDataModule, SyntheticDataModule
from ekd_ddnn.data.base import ON_DEVICE_DATA
from ekd_ddnn.data.cifar import STATS
from ekd_ddnn.data.device import Augmentation, DeviceBatches, EpochDraws, augment
from ekd_ddnn.errors import UserError
from ekd_ddnn.train import train
from tests.conftest import SHARED_CIFAR, run_cli
from tests.test_data import PER_BATCH, cifar10, cifar_batch, dump, write_cifar10

MEAN, STD = STATS["cifar10"]
UNSUPPORTED = (
    "data.on_device=true is supported for cifar10, cifar100, digits, synthetic, not for "
    "ImageNetDataModule; set data.on_device=false"
)


def write_random_cifar10(root: Path) -> Path:
    """The generated CIFAR-10 folder of ``tests.test_data`` with random pixels (a crop or a
    flip of a constant-colour image would be the image itself)."""
    folder = write_cifar10(root)
    rng = np.random.default_rng(0)
    for b in range(1, 6):
        rows = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        dump(folder / f"data_batch_{b}", cifar_batch(data=rows))
    return folder


def per_image(image: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    """torchvision's per-image path for one uint8 (3, 32, 32) image at a given crop and flip:
    PIL image, zero pad 4, crop, mirror, ToImage, ToDtype(scale=True), Normalize."""
    img = TF.pad(Image.fromarray(image.permute(1, 2, 0).numpy()), [4], fill=0)
    img = TF.crop(img, top, left, 32, 32)
    if flip:
        img = TF.hflip(img)
    return TF.normalize(TF.to_dtype(TF.to_image(img), torch.float32, scale=True), MEAN, STD)


# --------------------------------------------------------------------------- augmentation


def test_augment_equals_per_image_transforms_bit_for_bit():
    """Given the same offsets and flips, the batched augmentation of uint8 images equals the
    per-image torchvision path exactly (every float bit), over all 9 x 9 offsets and both flips."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (162, 3, 32, 32), dtype=torch.uint8, generator=gen)
    offsets = torch.cartesian_prod(torch.arange(9), torch.arange(9)).repeat(2, 1)
    flips = torch.arange(162) >= 81
    batched = augment(images, offsets, flips, MEAN, STD)
    assert batched.shape == (162, 3, 32, 32) and batched.dtype == torch.float32
    assert batched.is_contiguous()
    for i in range(162):
        top, left = offsets[i].tolist()
        assert torch.equal(batched[i], per_image(images[i], top, left, bool(flips[i]))), i


def test_augment_without_normalisation_is_a_zero_padded_crop():
    """Float images without mean/std (digits): crops of the zero-padded images at the offsets,
    values unchanged; what ``random_shift`` (the digits collate) computes."""
    images = torch.randn(6, 1, 16, 16)
    offsets = torch.tensor([[0, 0], [4, 4], [0, 4], [4, 0], [2, 1], [3, 2]])
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    out = augment(images, offsets, None, None, None, pad=2)
    for i, (top, left) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, top : top + 16, left : left + 16])
    assert torch.equal(out[1][:, -2:], torch.zeros(1, 2, 16))  # shifted by 2: zero border


def test_cifar_module_per_image_transform_is_one_of_the_batched_crops(tmp_path):
    """Each item of the CIFAR module's real per-image training transform equals the batched
    augmentation of its stored pixels at one of the 162 offset/flip choices."""
    write_random_cifar10(tmp_path)
    dm = cifar10(tmp_path)
    dm.setup("fit")
    images, _, augmentation = dm.device_split()
    assert augmentation == Augmentation(pad=4, flip=True, mean=MEAN, std=STD)
    offsets = torch.cartesian_prod(torch.arange(9), torch.arange(9)).repeat(2, 1)
    flips = torch.arange(162) >= 81
    torch.manual_seed(0)
    seen = set()
    for i in range(40):
        item, _ = dm.train_set[i]
        candidates = augment(images[i].expand(162, -1, -1, -1), offsets, flips, MEAN, STD)
        found = [k for k in range(162) if torch.equal(candidates[k], item)]
        assert found, i
        seen.add(found[0] >= 81)
    assert seen == {False, True}  # both flip states occurred


def test_offsets_uniform_and_flips_half_as_per_image():
    """Over 90,000 draws: each of the 9 offsets per axis within 5% of 10,000 (expected, std
    94), each of the 81 (top, left) pairs within 15% of 1,111 (std 33), flips within 1% of
    45,000 (std 150); and torchvision's per-image RandomCrop(32, padding=4) draws the same
    offsets 0..8."""
    _, offsets, flips = EpochDraws(90_000, Augmentation(pad=4, flip=True), seed=0).draw()
    assert offsets.min() == 0 and offsets.max() == 8
    for axis in range(2):
        counts = torch.bincount(offsets[:, axis], minlength=9)
        assert ((counts - 10_000).abs() < 500).all(), counts
    pairs = torch.bincount(offsets[:, 0] * 9 + offsets[:, 1], minlength=81)
    assert ((pairs - 1_111).abs() < 167).all(), pairs
    assert abs(int(flips.sum()) - 45_000) < 450

    from torchvision.transforms import v2

    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    candidates = augment(
        image.expand(81, -1, -1, -1),
        torch.cartesian_prod(torch.arange(9), torch.arange(9)),
        None,
        None,
        None,
    )
    crop = v2.RandomCrop(32, padding=4)
    torch.manual_seed(0)
    drawn = set()
    for _ in range(300):  # P(an offset pair of one axis unseen) < 9 * (8/9)^300 = 4e-15
        out = crop(image)
        drawn |= {k for k in range(81) if torch.equal(candidates[k], out)}
    assert {k // 9 for k in drawn} == {k % 9 for k in drawn} == set(range(9))


# --------------------------------------------------------------------------- order


def numbered(n: int, batch_size: int, seed: int, **draws) -> DeviceBatches:
    """A loader over images whose every pixel is the image's index (so batches name them)."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4)
    draw = EpochDraws(n, Augmentation(), seed=seed, **draws)
    return DeviceBatches(images.contiguous(), torch.arange(n), draw, batch_size=batch_size)


def epoch(loader: DeviceBatches, number: int) -> list[int]:
    """The image indices of one epoch in the order the batches give them (labels too)."""
    loader.sampler.set_epoch(number)
    seen = []
    for images, labels in loader:
        assert torch.equal(images[:, 0, 0, 0].long(), labels)
        seen += labels.tolist()
    return seen


def test_every_image_once_per_epoch_in_a_seeded_order():
    """64 images, batch 8: each image exactly once per epoch; the order differs between
    epochs and seeds, and the same (seed, epoch) gives the same order in a fresh loader (so a
    run resumed at an epoch boundary continues with the order it would have drawn)."""
    loader = numbered(64, 8, seed=42)
    assert len(loader) == 8
    first, second = epoch(loader, 0), epoch(loader, 1)
    assert sorted(first) == sorted(second) == list(range(64))
    assert first != second
    assert epoch(numbered(64, 8, seed=42), 1) == second
    assert epoch(numbered(64, 8, seed=43), 0) != first
    assert epoch(loader, 0) == first


def test_last_incomplete_batch_is_dropped():
    """50 images, batch 8: 6 batches of 8, 48 distinct images; which 2 wait changes by epoch."""
    loader = numbered(50, 8, seed=0)
    assert len(loader) == 6
    first, second = epoch(loader, 0), epoch(loader, 1)
    assert len(first) == len(set(first)) == 48
    assert set(range(50)) - set(first) != set(range(50)) - set(second)


def test_ranks_take_disjoint_equal_shards_of_one_order():
    """Under DDP (world size 2) the ranks share one permutation of 65 images: 32 each,
    disjoint (4 batches of 8 on both), the 65th left out; rank r takes positions r, r + 2, ..."""
    ranks = [numbered(65, 8, seed=7, rank=r, world_size=2) for r in (0, 1)]
    assert [len(loader) for loader in ranks] == [4, 4]
    seen = [epoch(loader, 3) for loader in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 64
    order = epoch(numbered(65, 1, seed=7), 3)
    assert seen[0] == order[0:64:2] and seen[1] == order[1:64:2]


# --------------------------------------------------------------------------- data modules


def cifar_module(tmp_path: Path, **kwargs):
    write_random_cifar10(tmp_path)
    return cifar10(tmp_path, **kwargs)


MODULES = {
    "cifar10": cifar_module,
    "digits": lambda _, **kw: DigitsDataModule(**kw),
    "synthetic": lambda _, **kw: SyntheticDataModule(num_train=40, image_size=8, **kw),
}


@pytest.mark.parametrize("name", MODULES)
def test_device_batches_are_augment_of_the_stored_split(name, tmp_path):
    """The loader's batches are :func:`augment` of the stored training images at the epoch's
    draws (CIFAR: uint8 pixels, normalised; digits: float32, shifted by 2; synthetic: as
    stored), labels alike; every stored image is one of the per-image path's."""
    dm = MODULES[name](tmp_path, on_device=True, batch_size=8)
    dm.setup("fit")
    images, labels, aug = dm.device_split()
    expected = {"cifar10": torch.uint8, "digits": torch.float32, "synthetic": torch.float32}
    assert images.dtype == expected[name] and len(images) == len(dm.train_set) == len(labels)
    if name != "cifar10":  # the per-image path's stored tensors, exactly
        assert torch.equal(images, dm.train_set.tensors[0])
    else:
        for i in (0, 17, len(images) - 1):
            assert torch.equal(
                TF.to_image(Image.fromarray(images[i].permute(1, 2, 0).numpy())), images[i]
            )
            assert labels[i] == dm.train_set[i][1]
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceBatches) and len(loader) == len(images) // 8
    loader.sampler.set_epoch(2)
    index, offsets, flips = loader.sampler.draw()
    for b, (x, y) in enumerate(loader):
        rows = slice(8 * b, 8 * b + 8)
        f = None if flips is None else flips[rows]
        want = augment(images[index[rows]], offsets[rows], f, aug.mean, aug.std, pad=aug.pad)
        assert torch.equal(x, want) and torch.equal(y, labels[index[rows]])


def test_digits_collate_is_the_same_batched_crop():
    """The digits DataLoader collate (``random_shift``) and :func:`augment` give the same
    crops for the same offsets (one implementation, drawn the way the collate always drew)."""
    from ekd_ddnn.data.digits import random_shift

    images = torch.randn(12, 1, 16, 16)
    torch.manual_seed(5)
    shifted = random_shift(images, 2)
    torch.manual_seed(5)
    dy, dx = torch.randint(0, 5, (12, 1)), torch.randint(0, 5, (12, 1))
    assert torch.equal(shifted, augment(images, torch.cat([dy, dx], 1), None, None, None, pad=2))


def test_calibration_images_on_device_depend_only_on_the_seed():
    """recalibrate_bn's images from an on-device loader: the same for the same seed whatever
    the global random state, other images for another seed."""
    dm = DigitsDataModule(on_device=True, batch_size=32)
    a = calibration_batches(dm, 40, seed=3)
    torch.manual_seed(99)
    b = calibration_batches(dm, 40, seed=3)
    c = calibration_batches(dm, 40, seed=4)
    assert [len(x) for x in a] == [32, 8]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_unsupported_data_module_refuses_on_device(tmp_path):
    """ImageNet folders (decoded per image) refuse on_device in one line naming the supported
    data; every shipped data config takes the option, true exactly where it is supported."""
    with pytest.raises(UserError) as info:
        ImageNetDataModule(data_dir=str(tmp_path), on_device=True)
    assert str(info.value) == UNSUPPORTED
    configs = sorted(p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml"))
    assert set(ON_DEVICE_DATA) < set(configs)
    for name in configs:
        node = OmegaConf.load(Path(CONFIG_DIR) / "data" / f"{name}.yaml")
        assert node.on_device is False, name
        node.on_device = True
        if "data_dir" in node:  # ${paths.data_dir} outside a run; never read by __init__
            node.data_dir = str(tmp_path)
        if name in ON_DEVICE_DATA:
            assert instantiate(node).on_device is True
        else:
            with pytest.raises(Exception, match="on_device=true is supported for"):
                instantiate(node)


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_train_on_device_through_the_command_line(tmp_path):
    """``python -m ekd_ddnn.train data.on_device=true trainer.max_epochs=1`` on digits: every
    step fed by DeviceBatches (float32 batches on the CPU), 1437 // 128 = 11 steps, results
    for the three depths on the test split."""
    result = run_cli(
        "train",
        "data.on_device=true",
        "data.batch_size=128",
        "trainer.max_epochs=1",
        "+callbacks.record._target_=tests.helpers.RecordTrainLoader",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "train_loader.txt").read_text() == "DeviceBatches cpu torch.float32\n"
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (0, 11)
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["name"], r["split"]) for r in rows] == [
        ("resnet20", "test"),
        ("resnet14", "test"),
        ("resnet8", "test"),
    ]


@pytest.mark.slow
def test_cifar_subset_trains_on_device(compose_train, tmp_path):
    """cifar10_r20 on the real subset with data.on_device=true: 3 steps fed by DeviceBatches
    whose split holds exactly the subset's training pixels."""
    if not SHARED_CIFAR.is_dir():
        pytest.skip("../shared/data/cifar10-subset is not beside the repository")
    cfg = compose_train(
        "experiment=cifar10_r20",
        f"data.data_dir={SHARED_CIFAR}",
        "data.on_device=true",
        "data.num_workers=0",
        "trainer.max_steps=3",
        "+trainer.limit_val_batches=2",
        "+callbacks.record._target_=tests.helpers.RecordTrainLoader",
    )
    _, objects = train(cfg)
    dm, trainer = objects["datamodule"], objects["trainer"]
    assert (tmp_path / "train_loader.txt").read_text() == "DeviceBatches cpu torch.float32\n"
    assert trainer.global_step == 3
    images, labels, _ = dm.device_split()
    source = dm.train_set.dataset
    assert images.shape == (len(dm.train_set), 3, 32, 32) == (4577, 3, 32, 32)
    assert torch.equal(
        images.permute(0, 2, 3, 1), torch.from_numpy(source.data[dm.train_set.indices])
    )
    assert labels.tolist() == [source.targets[i] for i in dm.train_set.indices]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["name"], r["split"]) for r in rows] == [("resnet20", "val"), ("resnet14", "val")]


def test_resume_may_switch_on_device():
    """data.on_device changes where batches are made, not what is trained (the same
    distribution, as data.num_workers): a resume may switch it, also for a run recorded
    before the option existed, and the change is reported."""
    from ekd_ddnn.run.checks import changed_settings

    stored = {"data": {"batch_size": 64}, "seed": 1}
    current = {"data": {"batch_size": 64, "on_device": True}, "seed": 1}
    assert changed_settings(stored, current) == ([], ["data.on_device <unset> -> True"])


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_split_without_a_full_batch_per_rank_is_refused(on_device, world_size):
    """Training batches drop the last incomplete one, so a rank whose share of the split is
    below one batch would train nothing: refused in one line while fitting, exactly where
    the rank's real loader (the distributed sampler's share, or the on-device shard) would
    yield no batch. Outside a fit (BatchNorm recalibration) the loader is left to say so."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    from ekd_ddnn.data.device import Augmentation, EpochDraws
    from ekd_ddnn.data.synthetic import SyntheticDataModule
    from ekd_ddnn.errors import UserError

    data = SyntheticDataModule(num_train=9, batch_size=5, image_size=4, on_device=on_device)
    data.setup()
    if on_device:
        share = len(EpochDraws(9, Augmentation(), seed=0, rank=0, world_size=world_size))
    else:
        share = len(DistributedSampler(data.train_set, num_replicas=world_size, rank=0))
    data.trainer = SimpleNamespace(
        state=SimpleNamespace(fn="fit"),
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        global_rank=0,
        world_size=world_size,
    )
    if share >= 5:
        assert len(data.train_dataloader()) == 1
        return
    with pytest.raises(UserError) as info:
        data.train_dataloader()
    ranks = f", {share} per rank on {world_size} ranks," if world_size > 1 else ""
    assert str(info.value) == (
        f"9 training images{ranks} make no batch of data.batch_size=5: no training step; "
        f"lower data.batch_size to at most {share} or train on more images"
    )
    data.trainer.state.fn = "validate"  # not fitting (recalibration reads it): no check
    data.train_dataloader()
