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

With ``ekd`` the whole objective (cross-entropies, KL and attention terms of every depth
and stage at once) is one ``torch.autograd.Function`` with a written-out backward
(``_Objective``): one autograd node and about 43 kernel-making operations forward and 19
backward (the attention maps' gradient is made in the forward, the backward scales it),
rather than a hundred nodes; ``ddnn`` and ``individual`` are six operations of autograd.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import operator
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.linalg import vecdot, vector_norm

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
        its ~43 small operations forward and ~19 backward run as one compiled graph each.

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
        options = self.__dict__.get("_compile_options")
        if options is None:
            return self._evaluate(logits, features, targets)
        if self.__dict__.get("_compiled") is None:
            # a graph per (batch size, sharing pattern): more than Dynamo's default cap
            # of 8 per function with lattice sampling; set for this function's calls only
            patch = torch._dynamo.config.patch(recompile_limit=64)
            self._compiled = patch(torch.compile(self._evaluate, dynamic=False, **options))
        # lists, whatever sequences came: one graph, not one per container type
        return self._compiled(list(logits), [list(f) for f in features], targets)

    def __getstate__(self) -> dict[str, Any]:
        # the compiled function is bound to this object: a copy compiles its own
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def _evaluate(
        self, logits: Sequence[Tensor], features: Sequence[Sequence[Tensor]], targets: Tensor
    ) -> EKDTerms:
        depths, batch = len(logits), len(targets)
        if self.mode == "individual" and depths > 1:
            raise ValueError(f"mode 'individual' trains one net, got {depths} outputs")
        if not self.distills:
            # the depths stacked along a leading axis: a few kernels, not a few per depth
            stacked = torch.stack(logits)  # (D, B, classes)
            # at least float32 from here on, whatever autocast's lists say (bf16 logits of a
            # bf16-mixed step): no term and no weighting is rounded to bf16
            log_probs = F.log_softmax(stacked, dim=-1, dtype=_accumulation(stacked.dtype))
            picked = log_probs.gather(-1, targets.view(1, -1, 1).expand(depths, -1, 1))
            log_likelihood = picked.sum(dim=(1, 2))  # -B * CE per depth
            weights = _ce_weights(depths, batch)
            total = (log_likelihood * _constant(weights, targets.device, log_probs.dtype)).sum()
            return EKDTerms(total, log_likelihood, (-1.0 / batch,) * depths, depths)
        spatial = tuple(f.shape[2:] for f in features[0])
        plan = _plan(sharing_pattern(features), spatial, self.ensemble, self.attention_stages)
        dtype = _accumulation(logits[0].dtype)
        map_dtype = torch.promote_types(dtype, features[0][0].dtype) if features[0] else dtype
        constants = _constants(
            plan, self.w, self.a, self.temperature, batch, targets.device, dtype, map_dtype
        )
        stage_outputs = [features[d][s] for d, s in plan.inputs]
        total, raw = _Objective.apply(constants, targets, *logits, *stage_outputs)
        return EKDTerms(total, raw, constants.scales, depths, plan.students)


def _ce_weights(depths: int, batch: int) -> tuple[float, ...]:
    """The weight of each depth's summed target log-probability in the total: the full-net's
    CE plus the sub-nets' mean CE."""
    return (-1.0 / batch,) + (-1.0 / (batch * max(depths - 1, 1)),) * (depths - 1)


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


@dataclass(frozen=True, eq=False)
class _Plan:
    """Where the attention terms of one sharing pattern read their maps, and how they sum.

    The channel sums of every computed stage (one where some sub-net's output is not the
    full-net's) are joined into one (depths, B, ``width``) tensor: per depth and sample,
    stage after stage, each stage's pixels row-major. ``ensemble``: whether the full-net is
    a student too (of the depths' mean); ``inputs``: the (depth, stage) of each distinct
    stage output of a computed stage; ``rows``: per depth, full-net first, the index in
    ``inputs`` of its output of each computed stage; ``sizes``: each computed stage's
    pixels; ``counts``: per student, the stages its MSE averages over
    (``attention_stages``); ``places``: per input, the (depth, stage start) of each place
    its sums lie in the joined maps (more than one where depths share the output);
    ``slots``: per input, the (student, stage start) of each place its gradient lies in
    the students' joined maps; ``strides``: per input, the strides of its (B, H, W) sums in
    the joined maps; ``spatial``: per input, its (H, W).

    Compared and hashed by identity: :func:`_plan` makes one per pattern, and the key of
    :func:`_constants` is then cheap to hash.
    """

    ensemble: bool
    inputs: tuple[tuple[int, int], ...]
    rows: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    counts: tuple[int, ...]
    width: int
    places: tuple[tuple[tuple[int, int], ...], ...]
    slots: tuple[tuple[tuple[int, int], ...], ...]
    strides: tuple[tuple[int, ...], ...]
    spatial: tuple[tuple[int, ...], ...]

    @property
    def students(self) -> int:
        """The number of KL (and of MSE) terms."""
        return len(self.counts)

    @property
    def depths(self) -> int:
        """The number of depths, full-net first."""
        return len(self.rows)


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
    *starts, width = itertools.accumulate(sizes, initial=0)
    places: list[list[tuple[int, int]]] = [[] for _ in inputs]
    slots: list[list[tuple[int, int]]] = [[] for _ in inputs]
    for d, row in enumerate(rows):
        for i, start in zip(row, starts, strict=True):
            places[i].append((d, start))
            if d >= len(rows) - len(counts):  # a student's
                slots[i].append((d - len(rows) + len(counts), start))
    return _Plan(
        ensemble,
        tuple(inputs),
        rows,
        sizes,
        tuple(counts),
        width,
        tuple(map(tuple, places)),
        tuple(map(tuple, slots)),
        tuple((width, *_contiguous_strides(spatial[s])) for _, s in inputs),
        tuple(tuple(spatial[s]) for _, s in inputs),
    )


def _contiguous_strides(size: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``size``."""
    return tuple(math.prod(size[d + 1 :]) for d in range(len(size)))


@dataclass(frozen=True, eq=False)
class _Constants:
    """The constant tensors of one :class:`_Plan`'s loss, in the loss's dtype (``dtype``) or
    the attention maps' (``map_dtype``), on its device.

    ``weights`` (raw,): each entry of ``EKDTerms.raw``'s weight in the total; ``factors``
    (raw,): the derivative of each entry's summand by its student-side input, up to the
    input itself (1 for a target's log-probability, -1 for ``p_teacher * log p_student``, 2
    for a squared map difference), so that ``weights * factors`` (``coefficients``) times
    the incoming gradient is all the backward needs of the total; ``pixel_weights``
    (pixels,): ``1 / (B * H_s W_s)``, so that a weighted sum of squared differences is the
    sum of the stage MSEs; ``stage_of_pixel`` (pixels,): each pixel's stage, to spread a
    per-stage value over its pixels.

    ``batch``: the batch size; ``scales``: ``EKDTerms.scales``; ``sums`` / ``gradients``:
    per input, the ``as_strided`` arguments of each place its channel sums lie in the joined
    maps / its gradient lies in the students' joined maps (size, strides, offset; the
    latter broadcast over channels); ``buffers``: on a CPU, each thread's
    :class:`_MapsBuffer`, by thread id.
    """

    plan: _Plan
    batch: int
    temperature: float
    dtype: torch.dtype
    map_dtype: torch.dtype
    scales: tuple[float, ...]
    sums: tuple[tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...], ...]
    gradients: tuple[tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...], ...]
    weights: Tensor
    factors: Tensor
    coefficients: Tensor
    pixel_weights: Tensor
    stage_of_pixel: Tensor
    buffers: dict[int, _MapsBuffer] | None


@_built_once
def _constants(
    plan: _Plan,
    w: float,
    a: float,
    temperature: float,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    map_dtype: torch.dtype,
) -> _Constants:
    """The :class:`_Constants` of ``plan`` for the loss's weights ``w`` and ``a``, built once."""
    depths, students = plan.depths, plan.students
    kl_scales = (temperature**2 / batch,) * students
    mse_scales = tuple(1.0 / count for count in plan.counts)
    weights = (
        _ce_weights(depths, batch)
        + tuple(w / depths * v for v in kl_scales)
        + tuple(a / depths * v for v in mse_scales)
    )
    factors = [1.0] * depths + [-1.0] * students + [2.0] * students
    pixel_weights = [
        torch.full((n,), 1.0 / (batch * n), dtype=map_dtype, device=device) for n in plan.sizes
    ]
    block = batch * plan.width
    sums = tuple(
        tuple(((batch, *size), strides, d * block + start) for d, start in places)
        for places, strides, size in zip(plan.places, plan.strides, plan.spatial, strict=True)
    )
    gradients = tuple(
        tuple(
            ((batch, 1, *size), (strides[0], 0, *strides[1:]), k * block + start)
            for k, start in slots
        )
        for slots, strides, size in zip(plan.slots, plan.strides, plan.spatial, strict=True)
    )
    weights_tensor = torch.tensor(weights, dtype=dtype, device=device)
    factors_tensor = torch.tensor(factors, dtype=dtype, device=device)
    return _Constants(
        plan,
        batch,
        temperature,
        dtype,
        map_dtype,
        (-1.0 / batch,) * depths + kl_scales + mse_scales,
        sums,
        gradients,
        weights_tensor,
        factors_tensor,
        weights_tensor * factors_tensor,
        torch.cat(pixel_weights) if pixel_weights else weights_tensor.new_zeros(0, dtype=map_dtype),
        torch.arange(len(plan.sizes), device=device).repeat_interleave(
            torch.tensor(plan.sizes, dtype=torch.long, device=device), output_size=plan.width
        ),
        {} if device.type == "cpu" else None,
    )


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off where it is on: its lists would run some of the loss's operations in
    bf16; here each runs in the loss's dtype."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _Objective(torch.autograd.Function):
    """The EKD total and its terms' sums (``EKDTerms.raw``) from the depths' logits and the
    stage outputs a :class:`_Plan` names, as one autograd node with a written-out backward.

    Why not autograd: a node per operation costs several microseconds of host time on a
    CPU and a kernel launch or more on a GPU, and a step of a small net is bound by such
    overheads rather than by arithmetic (issue 15). Here every term is computed for all
    depths at once: the logits stacked (depths, B, classes); every stage's channel sums
    summed into one (depths * B, pixels) tensor, normalised per stage, each student's
    difference from its teacher one subtraction for all; and the backward is the closed
    form, written for all terms together. No matrix products: a ``float32_matmul_precision``
    below ``highest`` (the GPU configs' ``high``: TF32; ``medium``: bf16, on a CPU too) would
    keep 10 or 8 bits of their operands, too few for the difference of two nearly equal
    maps. It equals autograd of
    the plain formulas, values and gradients (``tests/test_losses.py``). The teachers are
    constants, so only the student side of each term moves. Once differentiable: no
    gradient of a gradient.
    """

    @staticmethod
    def forward(ctx: Any, constants: _Constants, targets: Tensor, *inputs: Tensor) -> Any:
        c, plan = constants, constants.plan
        depths = plan.depths
        logits, stage_outputs = inputs[:depths], inputs[depths:]
        ctx.set_materialize_grads(False)
        ctx.constants = c
        ctx.logits_dtype = logits[0].dtype
        ctx.stage_outputs = [(f.shape, f.dtype) for f in stage_outputs]
        with _autocast_off(targets.device.type):
            stacked = torch.stack(logits)  # (D, B, classes)
            log_probs = torch.log_softmax(stacked, -1, dtype=c.dtype)
            index = targets.view(1, -1, 1).expand(depths, -1, 1)
            log_likelihood = log_probs.gather(-1, index).sum(dim=(1, 2))  # -B * CE per depth
            probs = soft_probs = log_probs.exp()
            soft_log_probs = log_probs
            if c.temperature != 1:
                soft_log_probs = torch.log_softmax(stacked / c.temperature, -1, dtype=c.dtype)
                soft_probs = soft_log_probs.exp()
            teacher = soft_probs[:1]  # the sub-nets' (broadcast over them)
            if plan.ensemble:  # and the depths' mean, the full-net's
                rest = teacher.expand(depths - 1, -1, -1)
                teacher = torch.cat([soft_probs.mean(dim=0, keepdim=True), rest])
            student = soft_log_probs if plan.ensemble else soft_log_probs[1:]
            kl = torch.kl_div(student, teacher, 0).sum(dim=(1, 2))  # B * KL / T^2 per student
            saved = [probs, soft_probs, teacher, index]
            if plan.sizes:
                maps, stages = _joined_maps(c, stage_outputs)  # (D * B, pixels), per stage
                norms = torch.stack([vector_norm(m, dim=-1) for m in stages], dim=-1)
                # F.normalize's u / max(|u|, eps), per stage: each stage's scale on its pixels
                scale = norms.clamp_min(_EPS).reciprocal_().index_select(-1, c.stage_of_pixel)
                maps.mul_(scale)
                joined = maps.view(depths, -1)
                diff = joined[depths - plan.students :] - joined[:1]  # m_k - m_0
                if plan.ensemble:  # and for the full-net m_0 - mean(m) = -sum_k (m_k - m_0) / D
                    diff[0].add_(diff.sum(dim=0), alpha=-1 / depths)
                weighted = diff.view(-1, plan.width) * c.pixel_weights
                mse = vecdot(weighted.view(plan.students, -1), diff.view(plan.students, -1))
                if mse.dtype != c.dtype:
                    mse = mse.to(c.dtype)
                if any(ctx.needs_input_grad[2 + depths :]):
                    saved.append(_unit_map_grads(c, weighted, maps, scale, norms))
            else:
                mse = kl.new_zeros(plan.students)
            raw = torch.cat([log_likelihood, kl, mse])
            total = vecdot(raw, c.weights)  # a dot product: no matmul precision lowers it
        ctx.save_for_backward(*saved)
        return total, raw

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_total: Tensor | None, grad_raw: Tensor | None) -> Any:
        c, plan = ctx.constants, ctx.constants.plan
        depths, students = plan.depths, plan.students
        needs = ctx.needs_input_grad
        probs, soft_probs, teacher, index, *saved = ctx.saved_tensors
        with _autocast_off(probs.device.type):
            coefficients = None if grad_total is None else c.coefficients * grad_total
            if grad_raw is not None:
                extra = grad_raw * c.factors
                coefficients = extra if coefficients is None else coefficients + extra
            ce, kl, mse = coefficients.split_with_sizes((depths, students, students))
            logit_grads: Sequence[Tensor | None] = [None] * depths
            if any(needs[2 : 2 + depths]):
                grad = _logit_grads(c, probs, soft_probs, teacher, index, ce, kl)
                if grad.dtype != ctx.logits_dtype:  # bf16 logits: bf16
                    grad = grad.to(ctx.logits_dtype)
                logit_grads = grad.unbind(0)
            stage_grads: list[Tensor | None] = [None] * len(ctx.stage_outputs)
            if saved and any(needs[2 + depths :]):
                (unit,) = saved
                grad_maps = (unit.view(students, -1) * mse.view(-1, 1)).view_as(unit)
                stage_grads = _channel_sum_grads(ctx, grad_maps)
        return None, None, *logit_grads, *stage_grads


def _logit_grads(
    c: _Constants,
    probs: Tensor,
    soft_probs: Tensor,
    teacher: Tensor,
    index: Tensor,
    ce: Tensor,
    kl: Tensor,
) -> Tensor:
    """The gradient of the stacked logits (D, B, classes) from the CE and KL terms'
    coefficients: ``g - p * sum(g)`` through each log-softmax."""
    grad = teacher * kl.view(-1, 1, 1)  # of the students' (tempered) log-probabilities
    if not c.plan.ensemble:  # the full-net's row is the sub-nets' teacher only
        grad = F.pad(grad, (0, 0, 0, 0, 1, 0))
    targets = ce.view(-1, 1, 1).expand(index.shape)
    if c.temperature == 1:  # one log-softmax: the CE terms' gradient joins the KL terms'
        grad.scatter_add_(-1, index, targets)
        return torch.addcmul(grad, probs, grad.sum(-1, keepdim=True), value=-1)
    grad = torch.addcmul(grad, soft_probs, grad.sum(-1, keepdim=True), value=-1)
    grad.div_(c.temperature)  # through logits / T
    grad.scatter_add_(-1, index, targets)
    return grad.addcmul_(probs, ce.view(-1, 1, 1), value=-1)


@dataclass(frozen=True, eq=False)
class _MapsBuffer:
    """A (depths * B, pixels) tensor for one plan's joined maps, with its views: per input,
    each place its channel sums are summed into (``_Constants.sums``), and each stage's
    pixels. Nothing the backward keeps aliases it, so on a CPU each thread reuses one from
    call to call: its views are made once, and its memory is still in the cache from the
    last step (4-5 % of the distillation's cost at ``bench/step_cost.py``'s small size)."""

    maps: Tensor
    sums: list[list[Tensor]]
    stages: tuple[Tensor, ...]


def _maps_buffer(c: _Constants, like: Tensor) -> _MapsBuffer:
    """A new :class:`_MapsBuffer` for ``c`` on ``like``'s device."""
    maps = like.new_empty((c.plan.depths * c.batch, c.plan.width), dtype=c.map_dtype)
    sums = [[maps.as_strided(*view) for view in places] for places in c.sums]
    return _MapsBuffer(maps, sums, maps.split_with_sizes(c.plan.sizes, dim=-1))


def _joined_maps(c: _Constants, stage_outputs: Sequence[Tensor]) -> tuple[Tensor, Sequence[Tensor]]:
    """Every depth's channel sums of every computed stage, summed straight into their places
    in one (depths * B, pixels) tensor (``_Plan.places``): no copies, no concatenation; and
    its per-stage views. Dynamo cannot trace a reduction into a strided ``out=``; a compiled
    loss concatenates (which inductor fuses)."""
    plan, dtype = c.plan, c.map_dtype
    if torch.compiler.is_compiling():
        sums = [f.sum(dim=1, dtype=dtype).view(c.batch, -1) for f in stage_outputs]
        maps = torch.cat([torch.cat([sums[i] for i in row], dim=1) for row in plan.rows])
        return maps, maps.split_with_sizes(plan.sizes, dim=-1)
    if c.buffers is None:  # a GPU's caching allocator already hands back warm memory
        buffer = _maps_buffer(c, stage_outputs[0])
    else:
        buffer = c.buffers.get(threading.get_ident())
        if buffer is None:  # kept: never an inference tensor, though an evaluation made it
            with torch.inference_mode(False):
                buffer = c.buffers[threading.get_ident()] = _maps_buffer(c, stage_outputs[0])
    for f, (first, *copies) in zip(stage_outputs, buffer.sums, strict=True):
        torch.sum(f, dim=1, dtype=dtype, out=first)
        for place in copies:
            place.copy_(first)
    return buffer.maps, buffer.stages


def _unit_map_grads(
    c: _Constants, weighted: Tensor, maps: Tensor, scale: Tensor, norms: Tensor
) -> Tensor:
    """The gradient of the students' joined channel sums (students * B, pixels) per unit of
    each MSE term's coefficient (the backward scales it by the coefficients): per stage
    ``(g - m <g, m>) / |u|`` of the normalised maps' gradient ``g`` (``weighted``, which this
    overwrites), without the projection where the norm was clamped. Linear in ``g``, so made
    in the forward, where its inputs are at hand, and only scaled in the backward."""
    if not c.plan.ensemble:  # the full-net's maps are the teacher's only
        rows = len(weighted)
        maps, scale, norms = (t.narrow(0, len(t) - rows, rows) for t in (maps, scale, norms))
    products = (weighted * maps).split_with_sizes(c.plan.sizes, dim=-1)
    along = torch.stack([p.sum(dim=-1) for p in products], dim=-1)  # <g, m> per stage
    along.masked_fill_(norms <= _EPS, 0)  # a clamped map is u / eps: no projection
    return weighted.addcmul_(maps, along.index_select(-1, c.stage_of_pixel), value=-1).mul_(scale)


def _channel_sum_grads(ctx: Any, grad_maps: Tensor) -> list[Tensor | None]:
    """The gradient of each stage output from the gradient of the students' joined maps
    (students * B, pixels): its pixels' gradients (summed where depths share the output)
    broadcast over the channels (``_Constants.gradients``), as views where the dtypes agree.
    ``grad_maps`` is contiguous and its storage's own (a fresh product): a pixel's offset is
    where it lies."""
    grads: list[Tensor | None] = []
    needs = ctx.needs_input_grad[2 + ctx.constants.plan.depths :]
    for views, (shape, dtype), need in zip(
        ctx.constants.gradients, ctx.stage_outputs, needs, strict=True
    ):
        if not views or not need:  # a teacher's alone: a constant
            grads.append(None)
        elif len(views) == 1 and dtype == grad_maps.dtype:
            ((_, strides, offset),) = views
            grads.append(grad_maps.as_strided(shape, strides, offset))
        else:
            parts = [grad_maps.as_strided(*view) for view in views]
            grads.append(functools.reduce(operator.add, parts).to(dtype).expand(shape))
    return grads


@_built_once
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """``values`` as a tensor on ``device``."""
    return torch.tensor(values, device=device, dtype=dtype)
