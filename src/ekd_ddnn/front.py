"""Any depth of a checkpoint: which depths to evaluate, their errors in as few passes as memory
allows, the accuracy-cost front, and the depth that fits a budget.

A checkpoint names the depths it trained (the full-net and ``model.subnets``); its lattice
holds every per-stage block count from ``model.min_blocks`` up. A depth whose BatchNorm
statistics were never estimated for it alone (every depth of a lattice-trained net, the
untrained depths of a fixed one) gets them re-estimated from training images first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch import Trainer

from ekd_ddnn.calibration import calibration_batches, recalibrate_bn
from ekd_ddnn.data.base import ImageDataModule
from ekd_ddnn.errors import UserError
from ekd_ddnn.losses import EKDLoss
from ekd_ddnn.models import DepthDynamicNet
from ekd_ddnn.module import EKDModule
from ekd_ddnn.results import add_errors, depth_rows, is_finite_number
from ekd_ddnn.run.checkpoint import data_config
from ekd_ddnn.run.trainer import trainer_settings_errors

log = logging.getLogger(__name__)

Depth = tuple[int, ...]


def checkpoint_depths(ckpt: Mapping[str, Any], net: DepthDynamicNet) -> tuple[list[Depth], bool]:
    """(the depths a checkpoint trained, whether they have BatchNorm statistics of their own
    to evaluate with). A lattice-trained net has none: shared statistics mixed hundreds of
    depths, and a named depth's private ones were updated only in the steps that drew it."""
    loss = ckpt["hyper_parameters"].get("loss", {})
    trained = [net.full_depth] if loss.get("mode") == "individual" else net.depths
    return trained, loss.get("sampling") != "lattice"


def depth_ready(
    ckpt: Mapping[str, Any],
    net: DepthDynamicNet,
    depth: Depth,
    recalibrate: int | str,
    *,
    data: Any = None,
    seed: int = 0,
) -> DepthDynamicNet:
    """A net that can extract ``depth`` with the right BatchNorm statistics: ``recalibrate``
    as in :func:`evaluate_depths`, on the training images of ``data`` (a data config; default
    the checkpoint's)."""
    trained, trained_stats = checkpoint_depths(ckpt, net)
    stale = not trained_stats or depth not in trained
    needed = recalibrate != 0 and (recalibrate != "auto" or stale)
    if depth not in net.depths or needed:
        net = net.with_depths([depth])
    if needed:
        num_images = 2048 if recalibrate == "auto" else int(recalibrate)
        datamodule = instantiate(data_config(ckpt, data))
        recalibrate_bn(
            net, datamodule, num_images, seed=seed, depths=[depth], at_most=recalibrate == "auto"
        )
    return net


def choose_depths(
    net: DepthDynamicNet,
    trained: Sequence[Depth],
    spec: str | Sequence[Sequence[int]],
    *,
    max_depths: int | None = None,
    seed: int = 0,
) -> list[Depth]:
    """The depths to evaluate, full-net first: ``trained``, ``lattice`` (with ``max_depths``:
    the trained depths plus that many drawn from the rest of the lattice) or a list."""
    if isinstance(spec, str):
        if spec == "trained":
            return list(trained)
        if spec != "lattice":
            raise UserError(f"depths must be trained, lattice or a list of depths, got {spec!r}")
        lattice = net.lattice()
        if max_depths is None or max_depths >= len(lattice):
            return lattice
        rest = [d for d in lattice if d not in trained]
        rng = np.random.default_rng([seed % 2**32, len(lattice)])
        picked = sorted(rng.choice(len(rest), size=min(max_depths, len(rest)), replace=False))
        return [*trained, *(rest[i] for i in picked)]
    depths = [net.check_depth(d) for d in spec]
    return [net.full_depth, *dict.fromkeys(d for d in depths if d != net.full_depth)]


def evaluate_depths(
    net: DepthDynamicNet,
    depths: Sequence[Depth],
    datamodule: ImageDataModule,
    make_trainer: Callable[..., Trainer],
    *,
    split: str,
    trained: Sequence[Depth],
    recalibrate: int | str,
    per_pass: int,
    seed: int = 0,
    trained_stats: bool = True,
) -> list[dict[str, Any]]:
    """One row per depth (full-net first): name, blocks, params, MACs, top-1/top-5 error,
    whether it was trained, and the images its BatchNorm statistics were re-estimated from.

    The depths run ``per_pass`` at a time through the prefix tree (each shared block once).
    ``recalibrate``: ``auto`` re-estimates (from up to 2048 training images) the depths
    without statistics of their own (every depth when ``trained_stats`` is false, as after
    lattice training); an integer, every depth from that many images; 0, none.
    """
    names = net.names_of(depths)
    if recalibrate == "auto":
        stale = [d for d in depths if not trained_stats or d not in trained]
        num_images, at_most = (2048, True) if stale else (0, False)
    else:
        stale, num_images, at_most = list(depths), int(recalibrate), False
    chunks = [list(depths[i : i + per_pass]) for i in range(0, len(depths), per_pass)]
    metrics: dict[Depth, dict[str, float]] = {}
    used, seconds = 0, 0.0
    batches: list = []
    if num_images:  # drawn once for every pass: the same images for every depth
        device = next(net.parameters()).device
        drawn = calibration_batches(datamodule, num_images, seed, at_most=at_most)
        batches = [b.to(device) for b in drawn]
        used = sum(len(b) for b in batches)
    base = net
    if len(chunks) > 1 and num_images and net.full_depth in stale:
        # every pass holds the full-net: re-estimate its statistics once, not once per pass
        base = net.with_depths([])
        start = time.perf_counter()
        base.recalibrate_bn_stats(batches)
        seconds += time.perf_counter() - start
    done = set() if base is net else {net.full_depth}  # re-estimated once, above
    for k, chunk in enumerate(chunks):
        if len(chunks) > 1:
            log.info("depths %d-%d of %d", k * per_pass + 1, k * per_pass + len(chunk), len(depths))
        part = base.with_depths(chunk)  # one pass's copy, freed after the pass
        redo = [d for d in part.depths if d in stale and d not in done]
        if num_images and redo:
            start = time.perf_counter()
            part.recalibrate_bn_stats(batches, redo)
            seconds += time.perf_counter() - start
        module = EKDModule(part, EKDLoss(mode="ddnn", w=0.0, a=0.0))
        trainer = make_trainer(enable_progress_bar=len(chunks) == 1)
        run = trainer.test if split == "test" else trainer.validate
        with trainer_settings_errors("cannot evaluate"):
            run(module, datamodule=datamodule, verbose=False)
        values = {key: float(v) for key, v in trainer.callback_metrics.items()}
        for depth, name in zip(part.depths, module.names, strict=True):
            metrics[depth] = {
                key.rsplit("/", 1)[0]: v for key, v in values.items() if key.endswith(f"/{name}")
            }
    if stale and num_images:
        log.info(
            "BatchNorm statistics of %d depths re-estimated from %d training images in %.1f s "
            "(%.2f s per depth)",
            len(stale),
            used,
            seconds,
            seconds / len(stale),
        )
    size = datamodule.image_size
    rows = depth_rows(net.shared_stats_copy(), depths, image_size=size)  # costs only
    for row, name in zip(rows, names, strict=True):
        row["name"] = name
    flat = {
        f"{key}/{row['name']}": v
        for depth, row in zip(depths, rows, strict=True)
        for key, v in metrics[depth].items()
    }
    rows = add_errors(rows, flat, split)
    for depth, row in zip(depths, rows, strict=True):
        row["trained"] = depth in trained
        row["bn_images"] = used if (num_images and depth in stale) else 0
        if size != net.config["image_size"]:
            row["image_size"] = size
    return pareto_flags(rows)


def pareto_flags(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``pareto``: no other depth has lower-or-equal error and lower-or-equal MACs, one of
    them strictly lower. Rows without an error are never on the front."""
    for row in rows:
        err, macs = row.get("top1_err"), row["macs"]
        row["pareto"] = err is not None and not any(
            other is not row
            and other.get("top1_err") is not None
            and other["top1_err"] <= err
            and other["macs"] <= macs
            and (other["top1_err"] < err or other["macs"] < macs)
            for other in rows
        )
    return rows


BUDGET_KEYS = ("macs", "params", "latency_ms")


def check_budget(budget: Mapping[str, Any]) -> dict[str, float]:
    """The budgets given (``None`` entries dropped): known keys, positive numbers, at least
    one; else one line."""
    limits = {key: value for key, value in budget.items() if value is not None}
    unknown = sorted(set(limits) - set(BUDGET_KEYS))
    if unknown:
        raise UserError(f"unknown budget {unknown[0]}; give budget.macs, budget.params or "
                        "budget.latency_ms")  # fmt: skip
    if not limits:
        raise UserError("give a budget: budget.macs=<count>, budget.params=<count> or "
                        "budget.latency_ms=<ms> (several must all hold)")  # fmt: skip
    for key, value in limits.items():
        if not is_finite_number(value) or not value > 0:
            raise UserError(f"budget.{key} must be a positive finite number, got {value!r}")
    return limits


def pick_for_budget(
    rows: Sequence[Mapping[str, Any]], budget: Mapping[str, float | None]
) -> Mapping[str, Any]:
    """The depth with the lowest top-1 error among those within every given budget (a row
    must hold each budgeted key); ties go to the cheaper depth (MACs, then params).

    An impossible budget raises one line naming the cheapest depth and its costs.
    """
    limits = check_budget(budget)
    candidates = [r for r in rows if r.get("top1_err") is not None]
    fits = [
        r for r in candidates if all(r.get(k) is not None and r[k] <= v for k, v in limits.items())
    ]
    if not fits:
        cheapest = min(candidates or rows, key=lambda r: (r["macs"], r["params"]))
        costs = ", ".join(
            f"{key} {_format(key, cheapest[key])}"
            for key in BUDGET_KEYS
            if cheapest.get(key) is not None
        )
        wanted = ", ".join(f"{key} <= {_format(key, v)}" for key, v in limits.items())
        raise UserError(
            f"no depth fits the budget ({wanted}): the cheapest is {cheapest['name']} "
            f"{list(cheapest['blocks'])} with {costs}; raise the budget"
        )
    return min(fits, key=lambda r: (r["top1_err"], r["macs"], r["params"]))


def _format(key: str, value: float) -> str:
    if key == "latency_ms":
        return f"{value:.3g} ms"
    return f"{value / 1e6:.3g}M"


def default_device(device: str) -> str:
    """``auto``: ``cuda`` where a GPU is visible, else ``cpu``."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
