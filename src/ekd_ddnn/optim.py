"""Optimiser parameter groups and learning-rate schedules (pure step -> factor functions).

Schedules run per optimiser step with an optional linear warm-up. ``torch.optim.lr_scheduler``
has the pieces (``LinearLR``, ``CosineAnnealingLR``, ``MultiStepLR``) but chaining them with
``SequentialLR`` per step is harder to read and test than one pure function per schedule,
wrapped in a ``LambdaLR``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def param_groups(module: nn.Module, *, no_weight_decay_bn_bias: bool) -> list[dict]:
    """One group of every parameter, or two where BN and bias parameters (1-d) get no decay."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not no_weight_decay_bn_bias:
        return [{"params": params}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup_steps to 1 over the first ``warmup_steps`` steps."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def cosine_factor(step: int, total_steps: int, warmup_steps: int = 0, final: float = 0.0) -> float:
    """Warm-up, then cosine decay from 1 to ``final`` at ``total_steps``."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def multistep_factor(
    step: int, total_steps: int, milestones: Sequence[float], gamma: float, warmup_steps: int = 0
) -> float:
    """Warm-up, then ``gamma ** (milestones passed)``; milestones are fractions of training."""
    passed = sum(step >= round(m * total_steps) for m in milestones)
    return warmup_factor(step, warmup_steps) * gamma**passed


def cosine(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    final_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Per-step cosine schedule with linear warm-up (Hydra: ``scheduler=cosine``)."""
    warmup = round(warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, lambda s: cosine_factor(s, total_steps, warmup, final_lr_ratio))


def multistep(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
) -> LambdaLR:
    """Step decay at fractions of training, with linear warm-up (``scheduler=multistep``)."""
    warmup = round(warmup_epochs * steps_per_epoch)
    milestones = list(milestones)
    return LambdaLR(
        optimizer, lambda s: multistep_factor(s, total_steps, milestones, gamma, warmup)
    )
