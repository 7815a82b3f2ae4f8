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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ekd_ddnn.errors import UserError

_EPS = 1e-12  # F.normalize's floor on a norm

MODES = ("individual", "ddnn", "ekd")
SAMPLINGS = ("fixed", "lattice")
ATTENTION_STAGES = ("all", "differing")


def attention_maps(features: Sequence[Tensor]) -> Tensor:
    """The attention map of each of ``features`` (B, C, H, W) of one stage, stacked:
    (len, B, H*W).

    The channel-sum map, flattened, divided by its L2 norm per sample (the arithmetic of
    ``F.normalize``, without its ``expand_as``: one autograd node fewer per stage). Channels
    are summed with at least float32 accumulation, so a bf16 map is never upcast to a float32
    copy; a tensor given twice (depths sharing a stage output) is summed once.
    """
    dtype, accumulate = features[0].dtype, _accumulation(features[0].dtype)
    sums: list[Tensor] = []
    for i, (f, first) in enumerate(zip(features, _firsts(features), strict=True)):
        if first < i:  # the same tensor as an earlier one: summed once
            sums.append(sums[first])
        else:
            sums.append(f.sum(dim=1, dtype=None if dtype == accumulate else accumulate))
    maps = torch.stack(sums).flatten(2)
    return maps / torch.linalg.vector_norm(maps, dim=-1, keepdim=True).clamp_min(_EPS)


def _firsts(tensors: Sequence[Tensor]) -> list[int]:
    """For each tensor, the index of the first that is the very same tensor. Identity, not
    ``id()``: a compiled loss would guard on (and recompile for) every tensor's id."""
    return [next(j for j, t in enumerate(tensors) if t is u) for u in tensors]


def sharing_pattern(features: Sequence[Sequence[Tensor]]) -> tuple[tuple[int, ...], ...]:
    """For each depth and stage, the first depth whose stage output is the very same tensor
    (the prefix tree shares a stage output between depths whose blocks agree up to it). A
    compiled loss (:meth:`EKDLoss.compile`) makes one graph per pattern."""
    per_stage = [_firsts([f[s] for f in features]) for s in range(len(features[0]))]
    return tuple(zip(*per_stage, strict=True))


@dataclass
class EKDTerms:
    """Every term of one EKD loss evaluation, one entry per depth, full-net first.

    ``ce_per_depth`` (D,) holds ``CE_t, CE_1..CE_K``; ``kl_per_depth`` / ``mse_per_depth``
    hold ``KL_t, KL_1..KL_K`` (without the ensemble terms: ``KL_1..KL_K`` only), or are None
    where the mode computes no distillation. The list views put ``None`` where a term is left
    out.

    A step needs only ``total``; the terms are logged on a few steps, so they are kept as
    the sums the total is made of and scaled when read: ``raw`` holds, per depth, the
    summed log-probability of the targets (``-B * CE``), then, per student, ``B * KL / T^2``
    and the sum over stages of the attention MSEs; ``raw * scales`` are the terms.
    ``students`` counts the KL (and the MSE) terms, None where the mode has none.
    """

    total: Tensor
    raw: Tensor
    scales: tuple[float, ...]
    depths: int
    students: int | None = None

    @property
    def ce_per_depth(self) -> Tensor:
        return self._scaled(0, self.depths)

    @property
    def kl_per_depth(self) -> Tensor | None:
        return None if self.students is None else self._scaled(self.depths, self.students)

    @property
    def mse_per_depth(self) -> Tensor | None:
        students = self.students
        return None if students is None else self._scaled(self.depths + students, students)

    @property
    def ce(self) -> list[Tensor]:
        return list(self.ce_per_depth.unbind())

    @property
    def kl(self) -> list[Tensor | None]:
        return self._listed(self.kl_per_depth)

    @property
    def mse(self) -> list[Tensor | None]:
        return self._listed(self.mse_per_depth)

    def _scaled(self, start: int, length: int) -> Tensor:
        scales = self.raw.new_tensor(self.scales[start : start + length])
        return self.raw[start : start + length] * scales

    def _listed(self, values: Tensor | None) -> list[Tensor | None]:
        if values is None:
            return [None] * self.depths
        return [None] * (self.depths - len(values)) + list(values.unbind())


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

    def compile(self, **options: Any) -> None:
        """Evaluate the loss through ``torch.compile`` from now on (``model.compile=true``):
        its ~50 small operations forward and as many backward run as one compiled graph each.

        Dynamo makes one graph per batch size and per pattern of stage outputs shared between
        the depths (fixed depths: one; lattice sampling: a few, see ``docs/performance.md``),
        then reuses them; ``options`` go to ``torch.compile`` (``mode``, ``backend``). A copy
        or an unpickled loss compiles its own evaluation again.
        """
        self._compile_options = options
        self._compiled = None

    def terms(
        self, logits: Sequence[Tensor], features: Sequence[Sequence[Tensor]], targets: Tensor
    ) -> EKDTerms:
        """Evaluate the loss from its parts.

        Args:
            logits: K+1 tensors (B, classes), full-net first.
            features: K+1 lists of per-stage outputs (B, C_s, H_s, W_s), full-net first.
            targets: class indices (B,).
        """
        evaluate = self._evaluate
        options = self.__dict__.get("_compile_options")
        if options is not None:
            if self.__dict__.get("_compiled") is None:
                # a graph per (batch size, sharing pattern): more than Dynamo's default cap
                # of 8 per function with lattice sampling; set for this function's calls only
                patch = torch._dynamo.config.patch(recompile_limit=64)
                self._compiled = patch(torch.compile(self._evaluate, dynamic=False, **options))
            evaluate = self._compiled
        return evaluate(list(logits), [list(f) for f in features], targets)

    def __getstate__(self) -> dict[str, Any]:
        # the compiled function is bound to this object: a copy compiles its own
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def _evaluate(
        self, logits: list[Tensor], features: list[list[Tensor]], targets: Tensor
    ) -> EKDTerms:
        depths = len(logits)
        if self.mode == "individual" and depths > 1:
            raise ValueError(f"mode 'individual' trains one net, got {depths} outputs")
        # Every term is computed on the depths stacked along a leading axis, and every constant
        # factor waits for one weighted sum at the end: a few kernels per loss rather than a
        # few per depth and term (the GPU step is bound by kernel launches).
        stacked = torch.stack(logits)  # (D, B, classes)
        # at least float32 from here on, whatever autocast's lists say (bf16 logits of a
        # bf16-mixed step): no term and no weighting is rounded to bf16
        log_probs = F.log_softmax(stacked, dim=-1, dtype=_accumulation(stacked.dtype))
        picked = log_probs.gather(-1, targets.view(1, -1, 1).expand(depths, -1, 1))
        log_likelihood = picked.sum(dim=(1, 2))  # -B * CE per depth
        batch = len(targets)
        ce_scales = (-1.0 / batch,) * depths
        ce_weights = (-1.0 / batch,) + (-1.0 / (batch * max(depths - 1, 1)),) * (depths - 1)
        if not self.distills:
            device, dtype = log_likelihood.device, log_likelihood.dtype
            total = (log_likelihood * _constant(ce_weights, device, dtype)).sum()
            return EKDTerms(total, log_likelihood, ce_scales, depths)
        kl = self._kl(stacked, log_probs)
        mse, counts = self._mse(features)
        students = len(kl)
        raw = torch.cat([log_likelihood, kl, mse])  # promoted: the total is never summed in bf16
        kl_scales = (self.temperature**2 / batch,) * students
        mse_scales = tuple(1.0 / count for count in counts)
        weights = (
            ce_weights
            + tuple(self.w / depths * v for v in kl_scales)
            + tuple(self.a / depths * v for v in mse_scales)
        )
        total = (raw * _constant(weights, raw.device, raw.dtype)).sum()
        return EKDTerms(total, raw, ce_scales + kl_scales + mse_scales, depths, students)

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
        """``B * KL(teacher || student) / T^2`` per student from the stacked logits
        (``log_probs``: their log-softmax at ``T = 1``, reused where ``T = 1``)."""
        if self.temperature != 1:
            log_probs = F.log_softmax(stacked / self.temperature, dim=-1, dtype=log_probs.dtype)
        teachers = self._teachers(log_probs.detach().exp())
        pointwise = F.kl_div(self._students(log_probs), teachers, reduction="none")
        return pointwise.sum(dim=(1, 2))

    def _mse(self, features: Sequence[Sequence[Tensor]]) -> tuple[Tensor, list[int]]:
        """Per student (``MSE_t, MSE_1..MSE_K``, sub-nets only without the ensemble terms) the
        sum over stages of the attention maps' MSE, and the number of stages its mean is over
        (``attention_stages``).

        The stages' maps are joined along the pixels and weighted by ``1/(B * H_s W_s)``,
        so one difference and one weighted sum give every depth's sum over stages. A stage
        whose output every depth shares adds exactly zero for the sub-nets (and a
        rounding-level zero for ``MSE_t``), so it is not computed; it still counts in the
        mean over stages with ``all``, as in the paper's formula.
        """
        stages = range(len(features[0]))
        full = features[0]
        differs = [[first != 0 for first in depth] for depth in sharing_pattern(features)]
        computed = [s for s in stages if any(d[s] for d in differs[1:])]
        if self.attention_stages == "all":
            counts = [len(stages)] * len(features)
        else:
            counts = [max(1, len(computed))]
            counts += [max(1, sum(d[s] for s in computed)) for d in differs[1:]]
        counts = self._students(counts)
        if not computed:
            return full[0].new_zeros(len(counts), dtype=_accumulation(full[0].dtype)), counts
        joined = torch.cat([attention_maps([f[s] for f in features]) for s in computed], dim=-1)
        shape = tuple(_batch_pixels(full[s]) for s in computed)
        pixel_weights = _pixel_weights(shape, joined.device, joined.dtype)
        squares = (self._students(joined) - self._teachers(joined)).pow(2)
        return (squares * pixel_weights).sum(dim=(1, 2)), counts


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss term of ``dtype`` inputs is computed in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _batch_pixels(feature: Tensor) -> tuple[int, int]:
    """``(B, H * W)`` of a (B, C, H, W) feature map: the shape of its attention map."""
    return feature.shape[0], math.prod(feature.shape[2:])


def _built_once(build: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``build``'s tensor made once per arguments and kept: a host-to-device copy in every
    step would wait for the GPU's queue. Made outside any inference mode, so that a tensor
    first asked for by an evaluation still serves training. Under ``torch.compile`` it is
    built in the trace instead (a constant of the graph; Dynamo warns on cached calls)."""
    cached = functools.lru_cache(maxsize=256)(torch.inference_mode(False)(build))

    @functools.wraps(build)
    def get(*args: Any) -> Tensor:
        return build(*args) if torch.compiler.is_compiling() else cached(*args)

    get.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return get


@_built_once
def _pixel_weights(
    shapes: tuple[tuple[int, int], ...], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``1 / (B * H_s W_s)`` for each pixel of the stages' joined attention maps: a squared
    difference summed with these weights is the sum over stages of the per-stage MSE."""
    weights = [
        torch.full((pixels,), 1.0 / (batch * pixels), dtype=dtype) for batch, pixels in shapes
    ]
    return torch.cat(weights).to(device)


@_built_once
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """``values`` as a tensor on ``device``."""
    return torch.tensor(values, device=device, dtype=dtype)
