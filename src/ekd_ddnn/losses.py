"""The Embedded Knowledge Distillation loss as pure tensor functions (no Lightning here).

Zhao et al., arXiv 2103.00793, Eq. (1)-(7), with the full-net ``t`` and ``K`` sub-nets ``k``::

    L = CE_t + (1/K) sum_k CE_k
      + w/(K+1) * (KL_t + sum_k KL_k)            KL_k = KL(p_t || p_k),  KL_t = KL(p_et || p_t)
      + a/(K+1) * (MSE_t + sum_k MSE_k)          on L2-normalised channel-sum attention maps

``p = softmax(logits / T)``; KL terms are scaled by ``T^2`` (Hinton et al.). ``p_et`` and
``A_et`` average the full-net and all sub-nets (the "ensemble teacher"). Every teacher-side
quantity is detached, so distillation moves only the student side of each term.

A stage whose output is the very tensor of the full-net's (a sub-net that keeps a stage's
full block count after a shared input) adds an identically zero MSE; ``attention_stages``
chooses whether such stages still count in the mean over stages (``all``, the paper's
formula) or are left out (``differing``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ekd_ddnn.errors import UserError

MODES = ("individual", "ddnn", "ekd")
SAMPLINGS = ("fixed", "lattice")
ATTENTION_STAGES = ("all", "differing")


def attention_maps(features: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    """``norm(A) * scale`` of each of ``features`` (B, C, H, W) of one stage, stacked:
    (len, B, H*W).

    The channel-sum map, flattened, divided by its L2 norm per sample (``F.normalize``).
    Channels are summed with at least float32 accumulation, so a bf16 map is never upcast to
    a float32 copy; a tensor given twice (depths sharing a stage output) is summed once.
    """
    sums: dict[int, Tensor] = {}
    for f in features:
        if id(f) not in sums:
            accumulate = torch.promote_types(f.dtype, torch.float32)
            sums[id(f)] = f.sum(dim=1, dtype=None if f.dtype == accumulate else accumulate)
    maps = torch.stack([sums[id(f)] for f in features]).flatten(2)
    return F.normalize(maps, dim=-1) * scale


@dataclass
class EKDTerms:
    """Every term of one EKD loss evaluation, one entry per depth, full-net first.

    ``ce_per_depth`` (D,) holds ``CE_t, CE_1..CE_K``; ``kl_per_depth`` / ``mse_per_depth``
    hold ``KL_t, KL_1..KL_K`` (without the ensemble terms: ``KL_1..KL_K`` only), or are None
    where the mode computes no distillation. The list views put ``None`` where a term is left
    out.
    """

    total: Tensor
    ce_per_depth: Tensor
    kl_per_depth: Tensor | None = None
    mse_per_depth: Tensor | None = None

    @property
    def ce(self) -> list[Tensor]:
        return list(self.ce_per_depth.unbind())

    @property
    def kl(self) -> list[Tensor | None]:
        return self._listed(self.kl_per_depth)

    @property
    def mse(self) -> list[Tensor | None]:
        return self._listed(self.mse_per_depth)

    def _listed(self, values: Tensor | None) -> list[Tensor | None]:
        depths = len(self.ce_per_depth)
        if values is None:
            return [None] * depths
        return [None] * (depths - len(values)) + list(values.unbind())


@dataclass
class EKDLoss:
    """The training objective of one mode.

    Args:
        mode: ``individual`` (one net, plain CE), ``ddnn`` (CE for every depth) or ``ekd``.
        w: weight of the posterior (KL) distillation terms; the paper's ``w_k``.
        a: weight of the attention (MSE) distillation terms; the paper's ``alpha_k``.
        temperature: softmax temperature ``T`` of the KL terms (the paper uses 1).
        ensemble: keep the ensemble-teacher terms ``KL_t`` and ``MSE_t`` (Fig. 3 ablation).
        attention_stages: the stages each MSE term averages over: ``all`` (the paper) or
            ``differing``: for ``MSE_k`` only the stages whose output tensor is not the
            full-net's own (``is``, as the prefix-tree forward returns shared stages), for
            ``MSE_t`` those where at least one sub-net differs; a term with no such stage is 0.
        sampling: the depths of each step: ``fixed`` (the full-net and the named sub-nets,
            the paper) or ``lattice`` (the full-net, the smallest depth and ``num_sampled``
            more drawn from the depth lattice each step; see ``ekd_ddnn.sampling``).
        num_sampled: the depths drawn per step with ``lattice`` sampling.
    """

    mode: str = "ekd"
    w: float = 1.0
    a: float = 100.0
    temperature: float = 1.0
    ensemble: bool = True
    attention_stages: str = "all"
    sampling: str = "fixed"
    num_sampled: int = 2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown ekd.mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.attention_stages not in ATTENTION_STAGES:
            raise UserError(
                f"ekd.attention_stages must be all or differing, got {self.attention_stages!r}"
            )
        if self.sampling not in SAMPLINGS:
            raise UserError(f"ekd.sampling must be fixed or lattice, got {self.sampling!r}")
        if self.sampling == "lattice" and self.mode == "individual":
            raise UserError(
                "ekd=individual trains one depth; ekd.sampling=lattice needs ekd=ekd or ekd=ddnn"
            )
        if isinstance(self.num_sampled, bool) or not isinstance(self.num_sampled, int):
            raise UserError(f"ekd.num_sampled must be an integer, got {self.num_sampled!r}")
        if self.num_sampled < 0:
            raise UserError(f"ekd.num_sampled must be >= 0, got {self.num_sampled}")
        for key in ("w", "a", "temperature"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UserError(f"ekd.{key} must be a number, got {value!r}")
        if self.w < 0 or self.a < 0:
            raise UserError(
                f"ekd.w and ekd.a must be >= 0 (got w={self.w}, a={self.a}); "
                "use 0 to switch a term off"
            )
        if self.temperature <= 0:
            raise UserError(f"ekd.temperature must be > 0, got {self.temperature}")

    @property
    def distills(self) -> bool:
        """Whether this mode computes the distillation terms."""
        return self.mode == "ekd"

    def __call__(
        self, outputs: Sequence[tuple[Tensor, Sequence[Tensor]]], targets: Tensor
    ) -> EKDTerms:
        """The loss of the network's outputs: ``(logits, per-stage features)`` per depth, full-net
        first (what ``DepthDynamicNet.forward_depths`` returns), against class ``targets``."""
        return self.terms([o[0] for o in outputs], [o[1] for o in outputs], targets)

    def terms(
        self, logits: Sequence[Tensor], features: Sequence[Sequence[Tensor]], targets: Tensor
    ) -> EKDTerms:
        """Evaluate the loss from its parts.

        Args:
            logits: K+1 tensors (B, classes), full-net first.
            features: K+1 lists of per-stage outputs (B, C_s, H_s, W_s), full-net first.
            targets: class indices (B,).
        """
        depths = len(logits)
        if self.mode == "individual" and depths > 1:
            raise ValueError(f"mode 'individual' trains one net, got {depths} outputs")
        # Every term is computed on the depths stacked along a leading axis: a few kernels per
        # loss rather than a few per depth (the GPU step is bound by kernel launches).
        stacked = torch.stack(list(logits))  # (D, B, classes)
        log_probs = F.log_softmax(stacked, dim=-1)
        picked = log_probs.gather(-1, targets.view(1, -1, 1).expand(depths, -1, 1))
        ce = -picked.mean(dim=(1, 2))
        # CE_t + mean of the sub-nets' CE, as one product (indexing would add copies in backward)
        weights = (1.0,) + (1.0 / max(depths - 1, 1),) * (depths - 1)
        total = ce @ _constant(weights, ce.device, ce.dtype)
        if not self.distills:
            return EKDTerms(total, ce)
        kl = self._kl(stacked, log_probs)
        mse = self._mse(features)
        scale = 1.0 / depths
        total = total + self.w * scale * kl.sum() + self.a * scale * mse.sum()
        return EKDTerms(total, ce, kl, mse)

    def _teachers(self, values: Tensor) -> Tensor:
        """The teacher of each student row of ``values`` (D, ...), detached: the depths'
        mean for the full-net (with the ensemble terms), then the full-net for each sub-net."""
        values = values.detach()
        full = values[:1].expand(len(values) - 1, *values.shape[1:])
        if not self.ensemble:
            return full
        return torch.cat([values.mean(dim=0, keepdim=True), full])

    def _students(self, values: Tensor | list) -> Tensor | list:
        """The rows of ``values`` (one per depth) that have a teacher: all, or the sub-nets'
        alone without the ensemble terms."""
        return values if self.ensemble else values[1:]

    def _kl(self, stacked: Tensor, log_probs: Tensor) -> Tensor:
        """``T^2 KL(teacher || student)`` per student, mean over the batch, from the stacked
        logits (``log_probs``: their log-softmax at ``T = 1``, reused where ``T = 1``)."""
        if self.temperature != 1:
            log_probs = F.log_softmax(stacked / self.temperature, dim=-1)
        teachers = self._teachers(log_probs.exp())
        pointwise = F.kl_div(self._students(log_probs), teachers, reduction="none")
        return pointwise.sum(dim=(1, 2)) * (self.temperature**2 / log_probs.shape[1])

    def _mse(self, features: Sequence[Sequence[Tensor]]) -> Tensor:
        """``MSE_t, MSE_1..MSE_K`` (sub-nets only without the ensemble terms): per student
        the mean over its stages (``attention_stages``) of the attention maps' MSE.

        The stages' maps are scaled by ``1/sqrt(B * H_s W_s)`` and joined along the pixels,
        so one difference and one sum give every depth's sum over stages of the per-stage
        MSE. A stage whose output every depth shares adds exactly zero for the sub-nets (and
        a rounding-level zero for ``MSE_t``), so it is not computed; it still counts in the
        mean over stages with ``all``, as in the paper's formula.
        """
        stages = range(len(features[0]))
        full = features[0]
        differs = [[f[s] is not full[s] for s in stages] for f in features]
        computed = [s for s in stages if any(d[s] for d in differs[1:])]
        if not computed:
            dtype = torch.promote_types(full[0].dtype, torch.float32)
            return full[0].new_zeros(len(self._students(features)), dtype=dtype)
        joined = torch.cat(
            [
                attention_maps([f[s] for f in features], 1 / math.sqrt(_batch_pixels(full[s])))
                for s in computed
            ],
            dim=-1,
        )
        sums = (self._students(joined) - self._teachers(joined)).pow(2).sum(dim=(1, 2))
        if self.attention_stages == "all":
            return sums / len(stages)
        counts = [len(computed)] + [max(1, sum(d[s] for s in computed)) for d in differs[1:]]
        return sums / _constant(tuple(self._students(counts)), sums.device, sums.dtype)


def _batch_pixels(feature: Tensor) -> int:
    """``B * H * W`` of a (B, C, H, W) feature map: the element count of its attention map."""
    return feature.shape[0] * math.prod(feature.shape[2:])


@functools.lru_cache(maxsize=256)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """``values`` as a tensor on ``device``, built once per pattern: a host-to-device copy in
    every step would wait for the GPU's queue."""
    with torch.inference_mode(False):  # cached: must serve training even if made in inference
        return torch.tensor(values, device=device, dtype=dtype)
