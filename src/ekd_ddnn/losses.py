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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ekd_ddnn.errors import UserError

MODES = ("individual", "ddnn", "ekd")
SAMPLINGS = ("fixed", "lattice")
ATTENTION_STAGES = ("all", "differing")


def attention_map(feature: Tensor) -> Tensor:
    """``norm(A)``: the channel-sum map of ``feature`` (B, C, H, W), flattened to (B, H*W)
    and divided by its L2 norm per sample."""
    return F.normalize(feature.sum(dim=1).flatten(1), dim=1)


def distill_kl(teacher_probs: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * KL(teacher || softmax(student / T))``, mean over the batch.

    ``teacher_probs`` (B, classes) is used as given: detach it at the call site.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


def attention_mse(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
    """Mean over stages of the element-wise MSE between normalised attention maps."""
    losses = [F.mse_loss(s, t) for s, t in zip(student_maps, teacher_maps, strict=True)]
    return torch.stack(losses).mean()


def _stage_mse(
    student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], stages: Sequence[int]
) -> Tensor:
    """:func:`attention_mse` over ``stages`` only; 0 where ``stages`` is empty."""
    if not stages:
        return student_maps[0].new_zeros(())
    return attention_mse([student_maps[s] for s in stages], [teacher_maps[s] for s in stages])


@dataclass
class EKDTerms:
    """Every term of one EKD loss evaluation; index 0 is the full-net, 1..K the sub-nets.

    ``kl[0]``/``mse[0]`` are the ensemble terms ``KL_t``/``MSE_t``; an entry is ``None`` where
    the mode or the ensemble switch leaves the term out.
    """

    total: Tensor
    ce: list[Tensor]
    kl: list[Tensor | None]
    mse: list[Tensor | None]


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
        num_subnets = len(logits) - 1
        if self.mode == "individual" and num_subnets:
            raise ValueError(f"mode 'individual' trains one net, got {len(logits)} outputs")
        ce = [F.cross_entropy(lg, targets) for lg in logits]
        total = ce[0] + (torch.stack(ce[1:]).mean() if num_subnets else 0.0)
        kl: list[Tensor | None] = [None] * len(logits)
        mse: list[Tensor | None] = [None] * len(logits)
        if not self.distills:
            return EKDTerms(total, ce, kl, mse)

        probs = [F.softmax(lg / self.temperature, dim=1) for lg in logits]
        maps = [[attention_map(f) for f in stage_features] for stage_features in features]
        teacher_probs = probs[0].detach()
        teacher_maps = [m.detach() for m in maps[0]]
        stages = self._mse_stages(features)
        for k in range(1, len(logits)):
            kl[k] = distill_kl(teacher_probs, logits[k], self.temperature)
            mse[k] = _stage_mse(maps[k], teacher_maps, stages[k])
        if self.ensemble:
            ensemble_probs = torch.stack(probs).mean(dim=0).detach()
            ensemble_maps = [torch.stack(m).mean(dim=0).detach() for m in zip(*maps, strict=True)]
            kl[0] = distill_kl(ensemble_probs, logits[0], self.temperature)
            mse[0] = _stage_mse(maps[0], ensemble_maps, stages[0])
        scale = 1.0 / (num_subnets + 1)
        total = total + self.w * scale * sum(t for t in kl if t is not None)
        total = total + self.a * scale * sum(t for t in mse if t is not None)
        return EKDTerms(total, ce, kl, mse)

    def _mse_stages(self, features: Sequence[Sequence[Tensor]]) -> list[list[int]]:
        """The stage indices each MSE term averages over; index 0 is ``MSE_t``."""
        every = list(range(len(features[0])))
        if self.attention_stages == "all":
            return [every] * len(features)
        own = [[s for s in every if f[s] is not features[0][s]] for f in features]
        own[0] = [s for s in every if any(s in stages for stages in own[1:])]
        return own
