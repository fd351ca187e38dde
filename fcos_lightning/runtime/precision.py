"""Choosing the numeric precision a run can afford on the hardware it lands on.

bf16 autocast is the fast path on GPUs and on CPUs with native bf16 matrix units (AMX, AVX512-BF16): about 3x
faster convolutions there. On CPUs without them (AVX2 only) oneDNN emulates bf16 and convolutions run tens of
times *slower* than fp32, so ``precision=auto`` picks fp32 there.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """True when this CPU has AMX tiles or AVX512-BF16 (the instructions that make bf16 convolutions fast)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and all(hasattr(cpu, c) for c in checks):
        return any(getattr(cpu, c)() for c in checks)
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto`` -> ``bf16-mixed`` on GPUs with bf16 and on CPUs with native bf16, ``16-mixed`` on older GPUs,
    ``32-true`` elsewhere. Any other value is returned unchanged."""
    if str(precision) != "auto":
        return str(precision)
    use_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if use_gpu:
        chosen = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    else:
        chosen = "bf16-mixed" if cpu_has_native_bf16() else "32-true"
        if chosen == "32-true":
            log.info("precision=auto: this CPU has no AMX/AVX512-BF16, bf16 would be slower; using fp32")
    return chosen
