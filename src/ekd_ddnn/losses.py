"""The Embedded Knowledge Distillation loss as pure tensor functions (no Lightning here).

Zhao et al., arXiv 2103.00793, Eq. (1)-(7), with the full-net ``t`` and ``K`` sub-nets ``k``::

    L = CE_t + (1/K) sum_k CE_k
      + w/(K+1) * (KL_t + sum_k KL_k)            KL_k = KL(p_t || p_k),  KL_t = KL(p_et || p_t)
      + a/(K+1) * (MSE_t + sum_k MSE_k)          on L2-normalised channel-sum attention maps

``p = softmax(logits / T)``; KL terms are scaled by ``T^2`` (Hinton et al.). ``p_et`` and
``A_et`` average the full-net and all sub-nets (the "ensemble teacher"). Every teacher-side
quantity is detached, so distillation moves only the student side of each term.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ekd_ddnn.errors import UserError

MODES = ("individual", "ddnn", "ekd")


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
    """

    mode: str = "ekd"
    w: float = 1.0
    a: float = 100.0
    temperature: float = 1.0
    ensemble: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown ekd.mode {self.mode!r}; choose one of {', '.join(MODES)}")
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
        self, logits: Sequence[Tensor], features: Sequence[Sequence[Tensor]], targets: Tensor
    ) -> EKDTerms:
        """Evaluate the loss.

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
        for k in range(1, len(logits)):
            kl[k] = distill_kl(teacher_probs, logits[k], self.temperature)
            mse[k] = attention_mse(maps[k], teacher_maps)
        if self.ensemble:
            ensemble_probs = torch.stack(probs).mean(dim=0).detach()
            ensemble_maps = [torch.stack(m).mean(dim=0).detach() for m in zip(*maps, strict=True)]
            kl[0] = distill_kl(ensemble_probs, logits[0], self.temperature)
            mse[0] = attention_mse(maps[0], ensemble_maps)
        scale = 1.0 / (num_subnets + 1)
        total = total + self.w * scale * sum(t for t in kl if t is not None)
        total = total + self.a * scale * sum(t for t in mse if t is not None)
        return EKDTerms(total, ce, kl, mse)
