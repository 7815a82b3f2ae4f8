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

The cross-entropy goes through autograd; the distillation terms are one
``torch.autograd.Function`` with a written-out backward (``_Distillation``): a few dozen
operations per step in all rather than a hundred, for every depth and stage at once.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.linalg import vector_norm

from ekd_ddnn.errors import UserError

_EPS = 1e-12  # F.normalize's floor on a norm

MODES = ("individual", "ddnn", "ekd")
SAMPLINGS = ("fixed", "lattice")
ATTENTION_STAGES = ("all", "differing")

_T = TypeVar("_T")


def _firsts(tensors: Sequence[Tensor]) -> list[int]:
    """For each tensor, the index of the first that is the very same tensor. Identity, not
    ``id()``: a compiled loss would guard on (and recompile for) every tensor's id."""
    firsts = []
    for i, u in enumerate(tensors):
        firsts.append(i)
        for j in range(i):
            if tensors[j] is u:
                firsts[i] = j
                break
    return firsts


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
        its ~40 small operations forward and ~30 backward run as one compiled graph each.

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
        if self.temperature != 1:
            log_probs = F.log_softmax(stacked / self.temperature, dim=-1, dtype=log_probs.dtype)
        spatial = tuple(f.shape[2:] for f in features[0])
        plan = _plan(sharing_pattern(features), spatial, self.ensemble, self.attention_stages)
        pixel_weights = (
            _pixel_weights(plan.sizes, batch, log_probs.device, log_probs.dtype)
            if plan.sizes
            else None
        )
        stage_outputs = [features[d][s] for d, s in plan.inputs]
        distilled = _Distillation.apply(plan, pixel_weights, log_probs, *stage_outputs)
        students = plan.students
        raw = torch.cat([log_likelihood, distilled])
        kl_scales = (self.temperature**2 / batch,) * students
        mse_scales = tuple(1.0 / count for count in plan.counts)
        weights = (
            ce_weights
            + tuple(self.w / depths * v for v in kl_scales)
            + tuple(self.a / depths * v for v in mse_scales)
        )
        total = (raw * _constant(weights, raw.device, raw.dtype)).sum()
        return EKDTerms(total, raw, ce_scales + kl_scales + mse_scales, depths, students)


def _teachers(values: Tensor, ensemble: bool, dim: int) -> Tensor:
    """The teacher of each student, from ``values`` with one entry per depth along ``dim``
    (full-net first): the depths' mean for the full-net (the ensemble terms), then the
    full-net for each sub-net; without the ensemble terms the full-net alone, which
    broadcasts against the sub-nets' entries."""
    full = values.narrow(dim, 0, 1)
    if not ensemble:
        return full
    shape = list(values.shape)
    shape[dim] -= 1
    return torch.cat([values.mean(dim=dim, keepdim=True), full.expand(shape)], dim=dim)


def _students(values: Tensor, ensemble: bool, dim: int) -> Tensor:
    """The entries of ``values`` along ``dim`` (one per depth) that have a teacher: all, or the
    sub-nets' alone without the ensemble terms."""
    return values if ensemble else values.narrow(dim, 1, values.shape[dim] - 1)


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss term of ``dtype`` inputs is computed in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _built_once(build: Callable[..., _T]) -> Callable[..., _T]:
    """``build``'s result made once per arguments and kept: a plan is built in Python, a
    tensor by a host-to-device copy that in every step would wait for the GPU's queue. Made
    outside any inference mode, so that a tensor first asked for by an evaluation still
    serves training. Under ``torch.compile`` it is built in the trace instead (a constant of
    the graph; Dynamo warns on cached calls)."""
    cached = functools.lru_cache(maxsize=256)(torch.inference_mode(False)(build))

    @functools.wraps(build)
    def get(*args: Any) -> _T:
        return build(*args) if torch.compiler.is_compiling() else cached(*args)

    get.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return get


@dataclass(frozen=True)
class _Plan:
    """Where the attention terms of one sharing pattern read their maps, and how they sum.

    ``ensemble``: whether the full-net is a student too (of the depths' mean); ``inputs``:
    the (depth, stage) of each distinct stage output of a computed stage (one where some
    sub-net's output is not the full-net's); ``rows``: per depth, full-net first, the index
    in ``inputs`` of its output of each computed stage; ``sizes``: each computed stage's
    pixels, the stages' order in a depth's row of joined maps; ``counts``: per student, the
    stages its MSE averages over (``attention_stages``); ``slots``: per input, where its
    gradient lies in the students' joined maps (B, students, pixels), as the offset of
    (student, stage start): one place, or more where depths share the output; ``strides``:
    per input, the strides that broadcast the pixels at a slot over the channels.
    """

    ensemble: bool
    inputs: tuple[tuple[int, int], ...]
    rows: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    counts: tuple[int, ...]
    slots: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]

    @property
    def students(self) -> int:
        """The number of KL (and of MSE) terms."""
        return len(self.counts)


@_built_once
def _plan(
    pattern: tuple[tuple[int, ...], ...],
    spatial: tuple[tuple[int, ...], ...],
    ensemble: bool,
    attention_stages: str,
) -> _Plan:
    """The plan of a :func:`sharing_pattern` and the stages' spatial sizes: made once, as the
    steps of a fixed set of depths all share one pattern. A stage whose output every depth
    shares adds exactly zero for the sub-nets (and a rounding-level zero for ``MSE_t``), so
    it is not computed; with ``all`` it still counts in the mean over stages, as in the
    paper's formula."""
    pixels = [math.prod(size) for size in spatial]
    differs = [[first != 0 for first in depth] for depth in pattern]
    computed = [s for s in range(len(pixels)) if any(d[s] for d in differs[1:])]
    inputs = [(d, s) for d, depth in enumerate(pattern) for s in computed if depth[s] == d]
    rows = tuple(tuple(inputs.index((depth[s], s)) for s in computed) for depth in pattern)
    sizes = tuple(pixels[s] for s in computed)
    if attention_stages == "all":
        counts = [len(pixels)] * len(pattern)
    else:
        counts = [max(1, len(computed))]
        counts += [max(1, sum(d[s] for s in computed)) for d in differs[1:]]
    counts = counts if ensemble else counts[1:]
    # the students' joined maps of one sample: student after student, each stage's pixels
    # contiguous and row-major
    *starts, width = itertools.accumulate(sizes, initial=0)
    slots: list[list[int]] = [[] for _ in inputs]
    for k, row in enumerate(rows[len(rows) - len(counts) :]):
        for i, start in zip(row, starts, strict=True):
            slots[i].append(k * width + start)
    strides = [(len(counts) * width, 0, *_contiguous_strides(spatial[s])) for _, s in inputs]
    return _Plan(
        ensemble,
        tuple(inputs),
        rows,
        sizes,
        tuple(counts),
        tuple(map(tuple, slots)),
        tuple(strides),
    )


def _contiguous_strides(size: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``size``."""
    return tuple(math.prod(size[d + 1 :]) for d in range(len(size)))


class _Distillation(torch.autograd.Function):
    """The distillation terms' sums, per student: ``B * KL / T^2``, then the attention MSEs
    summed over the stages, from the log-probabilities (D, B, classes) and the stage outputs
    a :class:`_Plan` names; the backward is written out.

    Why not autograd: it replays a backward node for each of the terms' small operations, a
    kernel launch or more each on a GPU and several microseconds each on a CPU, where the
    step is bound by such overheads rather than by arithmetic (issue 15). Here the forward
    works on every stage's maps at once, joined along the pixels of one (B, depths, pixels)
    tensor, and the backward is the closed form: half the backward operations of autograd
    (``bench/step_cost.py`` counts them). It equals autograd of the plain formulas, values
    and gradients (``tests/test_losses.py``). The teachers are constants, so only the
    student side of each term moves. Once differentiable: no gradient of a gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        plan: _Plan,
        pixel_weights: Tensor | None,
        log_probs: Tensor,
        *stage_outputs: Tensor,
    ) -> Tensor:
        teacher = _teachers(log_probs.exp(), plan.ensemble, dim=0)
        student = _students(log_probs, plan.ensemble, dim=0)
        kl = (torch.special.xlogy(teacher, teacher) - teacher * student).sum(dim=(1, 2))
        ctx.plan = plan
        ctx.stage_outputs = [(f.shape, f.dtype) for f in stage_outputs]
        if not plan.sizes:
            ctx.save_for_backward(teacher)
            return torch.cat([kl, kl.new_zeros(plan.students)])
        # in the loss's dtype or the maps', the wider (float32 at least: a bf16 map's channel
        # sums are never rounded to bf16)
        dtype = torch.promote_types(kl.dtype, stage_outputs[0].dtype)
        batch = log_probs.shape[1]
        sums = [f.sum(dim=1, dtype=dtype).view(batch, -1) for f in stage_outputs]
        maps = torch.cat([sums[i] for row in plan.rows for i in row], dim=1)
        maps = maps.view(batch, len(plan.rows), -1)  # (B, depths, every stage's pixels)
        stages = maps.split(plan.sizes, dim=-1)
        norms = torch.stack([vector_norm(m, dim=-1) for m in stages], dim=-1)
        inverse = norms.clamp_min(_EPS).reciprocal_()
        for m, scale in zip(stages, inverse.unbind(-1), strict=True):
            m.mul_(scale.unsqueeze(-1))  # F.normalize's arithmetic, per stage
        diff = _students(maps, plan.ensemble, dim=1) - maps.narrow(1, 0, 1)  # m_k - m_0
        if plan.ensemble:  # and for the full-net m_0 - mean(m) = -sum_k (m_k - m_0) / depths
            diff.select(1, 0).add_(diff.sum(dim=1), alpha=-1 / len(plan.rows))
        weighted = diff * pixel_weights
        mse = (weighted * diff).sum(dim=(0, 2))
        ctx.save_for_backward(teacher, weighted, maps, inverse, norms)
        return torch.cat([kl, mse.to(kl.dtype)])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        plan, students = ctx.plan, ctx.plan.students
        teacher, *saved = ctx.saved_tensors
        grad_log_probs = None
        if ctx.needs_input_grad[2]:
            grad_log_probs = teacher * -grad[:students, None, None]
            if not plan.ensemble:  # the full-net's row is the sub-nets' teacher only
                grad_log_probs = F.pad(grad_log_probs, (0, 0, 0, 0, 1, 0))
        if not plan.sizes or not any(ctx.needs_input_grad[3:]):
            return None, None, grad_log_probs, *[None] * len(ctx.stage_outputs)
        weighted, *per_depth = saved
        maps, inverse, norms = (_students(t, plan.ensemble, dim=1) for t in per_depth)
        grad_maps = weighted * (2 * grad[students:, None])
        stages = (grad_maps * maps).split(plan.sizes, dim=-1)
        along = torch.stack([g.sum(dim=-1) for g in stages], dim=-1)
        # where a norm was clamped, the map is the sums over the floor: no projection
        along = along * (norms > _EPS)
        # now the gradient of the sums: (g - m <g, m>) / |u| per stage
        for g, m, a, scale in zip(
            grad_maps.split(plan.sizes, dim=-1),
            maps.split(plan.sizes, dim=-1),
            along.unbind(-1),
            inverse.unbind(-1),
            strict=True,
        ):
            g.addcmul_(m, a.unsqueeze(-1), value=-1).mul_(scale.unsqueeze(-1))
        return None, None, grad_log_probs, *_channel_sum_grads(ctx, grad_maps)


def _channel_sum_grads(ctx: Any, grad_maps: Tensor) -> list[Tensor | None]:
    """The gradient of each stage output from the gradient of the students' joined maps
    (B, students, pixels): its pixels' gradients (summed where depths share the output)
    broadcast over the channels, as views where the dtypes agree. ``grad_maps`` is
    contiguous and its storage's own (a fresh product): a pixel's offset is where it lies."""
    plan = ctx.plan
    grads: list[Tensor | None] = []
    for i, (slots, strides, (shape, dtype)) in enumerate(
        zip(plan.slots, plan.strides, ctx.stage_outputs, strict=True)
    ):
        if not slots or not ctx.needs_input_grad[3 + i]:  # a teacher's alone: a constant
            grads.append(None)
            continue
        if len(slots) == 1 and dtype == grad_maps.dtype:
            grads.append(grad_maps.as_strided(shape, strides, slots[0]))
            continue
        size = (shape[0], 1, *shape[2:])
        parts = [grad_maps.as_strided(size, strides, slot) for slot in slots]
        grads.append(functools.reduce(operator.add, parts).to(dtype).expand(shape))
    return grads


@_built_once
def _pixel_weights(
    sizes: tuple[int, ...], batch: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``1 / (B * H_s W_s)`` on each pixel of the stages' joined maps (``_Plan.sizes``): a
    squared difference summed with these weights is the sum over stages of the stage MSEs."""
    # made on the device: a compiled loss traces this, and a host tensor would be a copy
    weights = [torch.full((n,), 1.0 / (batch * n), dtype=dtype, device=device) for n in sizes]
    return torch.cat(weights)


@_built_once
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """``values`` as a tensor on ``device``."""
    return torch.tensor(values, device=device, dtype=dtype)
