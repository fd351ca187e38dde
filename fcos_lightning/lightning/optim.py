"""Learning-rate schedules: the factor of the base learning rate at each optimizer step, warm-up included.

:class:`WarmupMultiStep` is detectron2's ``WarmupMultiStepLR`` (AdelaiDet's schedule), :class:`WarmupCosine`
its ``WarmupCosineLR``; both warm up linearly from ``warmup_factor`` over ``warmup_iters`` steps. Counts are in
optimizer steps of the run (the app converts a schedule's reference iterations).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["WarmupCosine", "WarmupMultiStep", "linear_warmup"]


def linear_warmup(step: int, warmup_iters: int, warmup_factor: float) -> float:
    """detectron2's linear warm-up factor: ``warmup_factor`` at step 0 rising to 1 at ``warmup_iters``."""
    if step >= warmup_iters:
        return 1.0
    alpha = step / warmup_iters
    return warmup_factor * (1 - alpha) + alpha


@dataclass(frozen=True)
class WarmupMultiStep:
    """Linear warm-up, then ``gamma`` times at each milestone."""

    milestones: Sequence[int] = field(default=(60000, 80000))
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 1e-3

    def __call__(self, step: int) -> float:
        decay = self.gamma ** bisect.bisect_right(list(self.milestones), step)
        return decay * linear_warmup(step, self.warmup_iters, self.warmup_factor)


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up, then half a cosine from 1 down to ``final_factor`` at ``max_steps``."""

    max_steps: int
    warmup_iters: int = 1000
    warmup_factor: float = 1e-3
    final_factor: float = 0.0

    def __call__(self, step: int) -> float:
        progress = min(step, self.max_steps) / self.max_steps
        cosine = self.final_factor + (1 - self.final_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        return cosine * linear_warmup(step, self.warmup_iters, self.warmup_factor)
