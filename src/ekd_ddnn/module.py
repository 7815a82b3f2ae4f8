"""EKDModule: joins a depth-dynamic network, the EKD loss and Lightning.

``training_step`` runs every depth on the batch through the shared prefix tree and minimises
the EKD loss; validation and test evaluate every depth in the same single pass, with one
torchmetrics collection (top-1, top-5) per depth.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ekd_ddnn.errors import DivergedError, UserError
from ekd_ddnn.losses import EKDLoss, EKDTerms
from ekd_ddnn.models import DepthDynamicNet
from ekd_ddnn.optim import param_groups
from ekd_ddnn.sampling import check_num_sampled, sample_depths

SPLITS = ("val", "test")


def accuracy_metrics(num_classes: int) -> MetricCollection:
    """Top-1 and top-5 accuracy (top-k capped at the class count), micro-averaged. Without
    torchmetrics' argument checks: they count the targets' distinct values (``unique``), a
    device sync per update on a GPU; the datasets' labels are checked when they are read."""
    return MetricCollection(
        {
            f"top{k}": MulticlassAccuracy(
                num_classes, top_k=min(k, num_classes), average="micro", validate_args=False
            )
            for k in (1, 5)
        }
    )


class EKDModule(L.LightningModule):
    """Train a DDNN with EKD (or its baselines) and evaluate each of its depths.

    Args:
        net: the depth-dynamic network; its full depth and sub-nets are what is trained.
        loss: the objective; ``mode="individual"`` trains the full depth alone.
        optimizer: a partial taking parameter groups (Hydra ``_partial_: true``); None for a
            module that only evaluates.
        scheduler: a partial taking ``(optimizer, total_steps=, steps_per_epoch=)``, or None.
        no_weight_decay_bn_bias: exempt BatchNorm and bias parameters from weight decay.
        config: the resolved run configuration, stored in checkpoints for reference.
        seed: the run's seed; with ``loss.sampling="lattice"`` the depths of step ``s`` are
            drawn from ``(seed, s)`` (:func:`~ekd_ddnn.sampling.sample_depths`).

    Metric keys: ``train/loss``, ``train/{ce,kl,mse}/<net>`` (for the full-net ``kl``/``mse``
    are the ensemble terms), ``{val,test}/{top1,top5,top1_err,top5_err}/<net>`` in percent, and
    ``{val,test}/top1_err/mean`` over the depths (the default checkpoint monitor) and
    ``{val,test}/top1_err/subnets_mean`` over the sub-nets.
    """

    def __init__(
        self,
        net: DepthDynamicNet,
        loss: EKDLoss,
        optimizer: Callable[..., Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        *,
        no_weight_decay_bn_bias: bool = False,
        config: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.no_weight_decay_bn_bias = no_weight_decay_bn_bias
        self.depths = [net.full_depth] if loss.mode == "individual" else net.depths
        self.names = [net.name_of(depth) for depth in self.depths]
        self.seed = seed
        self.lattice = net.lattice() if loss.sampling == "lattice" else None
        if self.lattice is not None:
            check_num_sampled(self.lattice, loss.num_sampled)
            # the full-net and the smallest depth, trained every step, under their own names
            self.lattice_names = [net.name_of(d) for d in (self.lattice[0], self.lattice[-1])]
            # what compiles for one set of depths, and its fix: every one named in one line
            one_set = [
                (
                    self.cuda_graphs,
                    "model.compile_mode=reduce-overhead records CUDA graphs",
                    "model.compile_mode=default or max-autotune-no-cudagraphs",
                ),
                (
                    self.compiles_step,
                    "model.compile_scope=step compiles the step",
                    "model.compile_scope=blocks",
                ),
            ]
            chosen = [(what, fix) for on, what, fix in one_set if on]
            if chosen:
                raise UserError(
                    f"{' and '.join(what for what, _ in chosen)} for one set of depths and "
                    "ekd.sampling=lattice draws a new set every step; use "
                    f"{' and '.join(fix for _, fix in chosen)}"
                )
        if net.config.get("compile") and not self.compiles_step:
            # the loss runs between the blocks' graphs, on tensors they made: CUDA graphs
            # (reduce-overhead) are recorded for the blocks alone
            mode = net.config.get("compile_mode", "default")
            loss.compile(mode="default" if self.cuda_graphs else mode)
        self.save_hyperparameters(
            {"net_config": net.config, "loss": asdict(loss), "config": config or {}}
        )
        num_classes = net.config["num_classes"]
        self.metrics = nn.ModuleDict(
            {
                split: nn.ModuleDict({name: accuracy_metrics(num_classes) for name in self.names})
                for split in SPLITS
            }
        )
        # first global step whose loss was NaN or inf (-1: none), kept on the device so that
        # watching for divergence costs no host sync per step
        self.register_buffer("first_nonfinite_step", torch.tensor(-1), persistent=False)
        # the training loss of the last logging step, for the progress bar
        self.last_logged_loss: float | None = None
        # the global step this process's fit started training from (None: the fit trained
        # nothing, having continued a checkpoint that had already reached the end)
        self.fit_start_step: int | None = None

    def metric_keys(self) -> set[str]:
        """Every key this module logs (what a checkpoint or early-stopping monitor may name)."""
        keys = {"train/loss"}
        trained = self.names if self.lattice is None else [*self.lattice_names, "sampled_mean"]
        for name in trained:
            keys |= {f"train/{term}/{name}" for term in ("ce", "kl", "mse")}
        for split in SPLITS:
            for name in self.names:
                keys |= {f"{split}/{m}/{name}" for m in ("top1", "top5", "top1_err", "top5_err")}
            keys.add(f"{split}/top1_err/mean")
            if len(self.names) > 1:
                keys.add(f"{split}/top1_err/subnets_mean")
        return keys

    def check_finite(self) -> None:
        """Stop the run if any training loss so far was NaN or inf (one host sync)."""
        step = int(self.first_nonfinite_step)
        if step < 0:
            return
        lrs = sorted({g["lr"] for opt in self.trainer.optimizers for g in opt.param_groups})
        raise DivergedError(
            f"training diverged: the loss became NaN or infinite at step {step} (learning rate "
            f"{', '.join(f'{lr:g}' for lr in lrs)}); lower optimizer.lr or ekd.w / ekd.a, or clip "
            "gradients (trainer.gradient_clip_val=1.0); no results were written and "
            "checkpoints/ keeps the last finite state"
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every trained depth, full-net first."""
        return [logits for logits, _ in self.net.forward_depths(x, self.depths)]

    def step_depths(self) -> tuple[list[tuple[int, ...]], list[str]]:
        """The depths this training step trains, full-net first, and the names their terms
        are logged under (lattice sampling: the full-net, the smallest, then ``sampled``)."""
        if self.lattice is None:
            return self.depths, self.names
        depths = sample_depths(
            self.lattice, self.loss.num_sampled, seed=self.seed, step=self.global_step
        )
        return depths, self.lattice_names + ["sampled"] * (len(depths) - 2)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.cuda_graphs:
            # one CUDA-graph generation per step: blocks of equal configuration share one
            # compiled function, and each region call would otherwise count as a new
            # invocation (a "pending, uninvoked backwards" warning and path checks per block)
            torch.compiler.cudagraph_mark_step_begin()
        depths, names = self.step_depths()
        if self.compiles_step:  # the network and the loss as one graph
            compiled = _compiled_terms(self.net.config.get("compile_mode", "default"))
            terms = compiled(self, x, y, depths)
        else:
            terms = self._terms(x, y, depths)
        unseen = (self.first_nonfinite_step < 0) & ~torch.isfinite(terms.total.detach())
        self.first_nonfinite_step.copy_(
            torch.where(unseen, self.global_step, self.first_nonfinite_step)
        )
        # Each self.log call costs ~1 ms of Python: log the terms only on the steps the
        # loggers write (every trainer.log_every_n_steps), as Lightning would keep them.
        # Divergence is checked on the same steps (one device sync) and before every
        # checkpoint. The progress bar's loss is a number read on those steps too
        # (callbacks.LossProgressBar): a tensor logged with prog_bar=True would be read back
        # at every step's end.
        trainer = self.trainer
        if not trainer.fast_dev_run and (self.global_step + 1) % trainer.log_every_n_steps:
            return terms.total
        self.check_finite()
        self.last_logged_loss = terms.total.item()
        logs: dict[str, Tensor] = {"train/loss": terms.total}
        sampled: dict[str, list[Tensor]] = {}
        for name, *values in zip(names, terms.ce, terms.kl, terms.mse, strict=True):
            for term, value in zip(("ce", "kl", "mse"), values, strict=True):
                if value is None:
                    continue
                if name == "sampled":  # a different depth every step: their mean
                    sampled.setdefault(f"train/{term}/sampled_mean", []).append(value)
                else:
                    logs[f"train/{term}/{name}"] = value
        logs.update({key: torch.stack(v).mean() for key, v in sampled.items()})
        self.log_dict(logs, batch_size=len(y))
        return terms.total

    def _terms(self, x: Tensor, y: Tensor, depths: list[tuple[int, ...]]) -> EKDTerms:
        """The loss terms of ``depths`` on one batch (compiled whole under
        ``model.compile_scope=step``)."""
        return self.loss(self.net.forward_depths(x, depths), y)

    @property
    def compiles_step(self) -> bool:
        """Whether the whole training step is compiled (``model.compile_scope=step``)."""
        config = self.net.config
        return bool(config.get("compile")) and config.get("compile_scope") == "step"

    @property
    def cuda_graphs(self) -> bool:
        """Whether the blocks, or the whole step, are compiled with CUDA graphs
        (``model.compile_mode=reduce-overhead``)."""
        config = self.net.config
        return bool(config.get("compile")) and config.get("compile_mode") == "reduce-overhead"

    def eval_logits(self, x: Tensor) -> list[Tensor]:
        """The logits of every trained depth as validation and test compute them. Eager under
        CUDA graphs: with no backward pending, each compiled block would start a new CUDA-graph
        generation and overwrite the previous block's output, its own input
        (pytorch/pytorch#152887, open)."""
        eager = self.cuda_graphs
        with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
            return self(x)

    def _eval_step(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        x, y = batch
        for name, logits in zip(self.names, self.eval_logits(x), strict=True):
            self.metrics[split][name].update(logits, y)

    def _log_epoch(self, split: str) -> None:
        """Compute (synced across ranks by torchmetrics), log and reset every depth's metrics."""
        errors = []
        for name, metrics in self.metrics[split].items():
            values = metrics.compute()
            metrics.reset()
            for key in ("top1", "top5"):
                acc = 100.0 * values[key]
                self.log(f"{split}/{key}/{name}", acc)
                self.log(f"{split}/{key}_err/{name}", 100.0 - acc)
            errors.append(100.0 - 100.0 * values["top1"])
        self.log(f"{split}/top1_err/mean", torch.stack(errors).mean(), prog_bar=split == "val")
        if len(errors) > 1:  # the default objective of hyper-parameter searches
            self.log(f"{split}/top1_err/subnets_mean", torch.stack(errors[1:]).mean())

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def on_train_start(self) -> None:
        self.fit_start_step = self.global_step

    def on_train_epoch_end(self) -> None:
        self.check_finite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()  # a diverged state is never saved: the last finite one stays
        # Lightning does not store the random state; with it, a run resumed from an epoch-end
        # checkpoint draws the same shuffles and augmentations as one never interrupted.
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("rng_state")
        if state and self.trainer.state.fn == "fit":
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                # saved for every GPU the saving process saw: resumed where fewer are visible,
                # the ones present take theirs
                torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])

    def configure_optimizers(self) -> dict:
        if self.optimizer_factory is None:
            raise RuntimeError("EKDModule was built without an optimizer: it can only evaluate")
        groups = param_groups(self.net, no_weight_decay_bn_bias=self.no_weight_decay_bn_bias)
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        if self.trainer.num_training_batches == float("inf"):
            # max_epochs=-1 with max_steps: Lightning has not loaded the training data yet
            self.trainer.fit_loop.setup_data()
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(
            1, int(self.trainer.num_training_batches) // self.trainer.accumulate_grad_batches
        )
        scheduler = self.scheduler_factory(optimizer, total_steps=total, steps_per_epoch=per_epoch)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


@functools.cache
def _compiled_terms(mode: str) -> Callable[..., EKDTerms]:
    """:meth:`EKDModule._terms` compiled in ``mode`` (``model.compile_scope=step``): one
    compiled function per mode rather than per module, so that a module holds no compiled
    state (a copy or a pickle stays plain); modules of one structure share its graphs (the
    parameters are the graph's inputs, not its constants). A graph per batch size, set of
    depths and structure: more than Dynamo's default cap of 8 over the runs of a sweep in
    one process; set for this function's calls only (one per step)."""
    patch = torch._dynamo.config.patch(recompile_limit=64)
    return patch(torch.compile(EKDModule._terms, mode=mode, dynamic=False))
