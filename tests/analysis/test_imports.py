"""The analysis package is library code: importing all of it loads neither Lightning nor Hydra nor OmegaConf."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import fcos_lightning.analysis


def test_no_lightning_hydra_or_omegaconf():
    modules = [m.name for m in pkgutil.iter_modules(fcos_lightning.analysis.__path__, "fcos_lightning.analysis.")]
    assert "fcos_lightning.analysis.plots" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pytorch_lightning', 'lightning', 'hydra', 'omegaconf', 'matplotlib.pyplot'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
