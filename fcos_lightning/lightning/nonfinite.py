"""What to do when a training loss is NaN/Inf: stop naming the batch, or skip the step.

``stop`` (default) raises :class:`NonFiniteLossError` with the step, the batch's image ids, every loss term
and the learning rate; nothing is saved after it, so the last good checkpoint stays. ``skip`` logs the same
report and drops the step (no backward, no update).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, get_args

from torch import Tensor

__all__ = ["ON_NONFINITE_LOSS", "NonFiniteLossError", "OnNonFiniteLoss", "describe_nonfinite"]

OnNonFiniteLoss = Literal["stop", "skip"]
ON_NONFINITE_LOSS = get_args(OnNonFiniteLoss)


class NonFiniteLossError(FloatingPointError):
    """A training loss was NaN or Inf and ``on_nonfinite_loss=stop``."""


def describe_nonfinite(step: int, image_ids: Sequence[int], losses: Mapping[str, Tensor], lr: float | None) -> str:
    """One line naming the step, the batch's image ids, the loss terms and the learning rate."""
    terms = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in losses.items())
    lr_text = "" if lr is None else f", lr={lr:.6g}"
    return f"non-finite loss at step {step}: image ids {list(image_ids)}; {terms}{lr_text}"
