"""The layers stay layered: imports point down only, nothing imports in a cycle, and the library below the
Lightning layer loads neither Lightning nor Hydra/OmegaConf (no config object below the entry points).

Layers, lowest first: ``files``; ``modeling``, ``fcos``, ``data`` (peers: none imports another);
``checkpoint``, ``analysis`` (peers); ``convert``, ``evaluation``, ``runtime`` (peers); ``lightning``; ``app``.
``analysis`` (the COCO scorers and what explains a score) sits below ``evaluation``, whose evaluator scores with it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fcos_lightning"
RANKS = {
    "__init__": 0,
    "files": 0,
    "modeling": 1,
    "fcos": 1,
    "data": 1,
    "checkpoint": 2,
    "analysis": 2,
    "convert": 3,
    "evaluation": 3,
    "runtime": 3,
    "lightning": 4,
    "app": 5,
}
LIGHTNING = {"pytorch_lightning", "lightning", "lightning_fabric"}
CONFIG = {"hydra", "omegaconf"}
#: third-party packages each layer must not load: the library neither Lightning nor Hydra, the Lightning layer
#: no config system; only the entry points (app) see a DictConfig.
FORBIDDEN = dict.fromkeys(range(4), LIGHTNING | CONFIG) | {4: CONFIG, 5: set()}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    """``fcos_lightning.fcos.loss`` -> ``fcos``; ``fcos_lightning`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, wherever the import statement stands (function bodies included)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return found


GRAPH = {m: {i for i in imports(p, m) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_every_module_belongs_to_a_layer():
    assert {layer(m) for m in MODULES} <= set(RANKS), {layer(m) for m in MODULES} - set(RANKS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_only(module):
    own = layer(module)
    upward = sorted(i for i in GRAPH[module] if layer(i) != own and RANKS[layer(i)] >= RANKS[own])
    assert not upward, f"{module} ({own}) imports {upward} of a layer not below it"
    third_party = {i.split(".")[0] for i in imports(MODULES[module], module)}
    assert not third_party & FORBIDDEN[RANKS[own]], f"{module} imports {sorted(third_party & FORBIDDEN[RANKS[own]])}"


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for child in sorted(GRAPH[module]):
            if state.get(child) == "open":
                cycle = path[path.index(child) :] + [child] if child in path else [module, child]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if child not in state:
                visit(child, [*path, child])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


# Each module is imported in a process that has loaded nothing of fcos_lightning, Lightning, Hydra or OmegaConf:
# one interpreter imports the heavy libraries every layer may use, then forks a child per module.
PROBE = """
import importlib, json, os, sys
import numpy, timm, torch, torchvision  # allowed everywhere; loaded once, before forking
WATCHED = ("fcos_lightning", "pytorch_lightning", "lightning", "lightning_fabric", "hydra", "omegaconf")
assert not [m for m in sys.modules if m.split(".")[0] in WATCHED], "the probe itself loaded a watched package"
results = {}
for name in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        importlib.import_module(name)
        loaded = sorted({m.split(".")[0] for m in sys.modules} & set(WATCHED[1:]))
        os.write(write, json.dumps(loaded).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    results[name] = json.loads(text) if status == 0 and text else f"import failed (status {status})"
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def loaded_by_import() -> dict[str, list[str]]:
    """Third-party packages of the watched set that importing each module loads, in a fresh process each."""
    below_app = sorted(m for m in MODULES if RANKS[layer(m)] < RANKS["app"])
    proc = subprocess.run([sys.executable, "-c", PROBE, *below_app], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_library_loads_neither_lightning_nor_hydra(loaded_by_import):
    library = {m for m in loaded_by_import if RANKS[layer(m)] < RANKS["lightning"]}
    assert {layer(m) for m in library} >= {"modeling", "fcos", "data", "evaluation", "runtime", "convert"}
    bad = {m: loaded for m, loaded in loaded_by_import.items() if m in library and loaded}
    assert not bad, f"library modules that load Lightning/Hydra/OmegaConf: {bad}"


def test_the_lightning_layer_loads_no_config_system(loaded_by_import):
    lightning = {m: loaded for m, loaded in loaded_by_import.items() if layer(m) == "lightning"}
    assert lightning and all(isinstance(v, list) for v in lightning.values()), lightning
    bad = {m: sorted(set(loaded) & CONFIG) for m, loaded in lightning.items() if set(loaded) & CONFIG}
    assert not bad, f"Lightning-layer modules that load Hydra/OmegaConf: {bad}"
