"""Configuration errors found at start, before anything is built, naming the key; and ``build``, the one
``instantiate`` that reports a constructor's own error.

Hydra's struct mode already rejects ``foo=1`` for a key that does not exist. What it cannot see is a key added
with ``+`` (or written in a preset) inside a node that ``hydra.utils.instantiate`` turns into a constructor
call, or a value of the wrong type for that constructor: those would fail minutes later, deep in a stack
trace, or not at all. :func:`check_config` walks every ``_target_`` node, resolves its class or function and
compares the node's keys and plain values with the signature, before anything is built.
"""

from __future__ import annotations

import collections.abc
import inspect
import os
import types
import typing
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

__all__ = ["ConfigError", "build", "check_config", "check_output_dir"]

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


class ConfigError(ValueError):
    """A configuration value that cannot work, named by its full key."""


# values the app resolves before they reach the constructor (trainer.precision=auto)
RESOLVED_BY_APP = ("trainer.precision",)


def check_config(cfg: DictConfig, resolved_by_app: tuple[str, ...] = RESOLVED_BY_APP) -> None:
    """Raise :class:`ConfigError` for the first unknown constructor key or mistyped plain value under ``cfg``.

    ``resolved_by_app``: full keys whose values the app translates itself, so they are not type-checked.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    for key, value in container.items():
        _walk(value, str(key), set(resolved_by_app))


def _walk(node: Any, path: str, exempt: set[str]) -> None:
    if isinstance(node, dict):
        if "_target_" in node:
            _check_target(node, path, exempt)
        for k, v in node.items():
            _walk(v, f"{path}.{k}", exempt)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _walk(v, f"{path}[{i}]", exempt)


def _check_target(node: dict, path: str, exempt: set[str]) -> None:
    target = node["_target_"]
    try:
        obj = get_object(target)
    except Exception as e:
        raise ConfigError(f"{path}._target_: cannot import {target!r} ({e})") from None
    func = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in node if k not in _HYDRA_KEYS and k not in params]
        if unknown:
            valid = sorted(k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
            raise ConfigError(
                f"{path}.{unknown[0]}: {target} has no parameter {unknown[0]!r} (typo?); valid keys: {valid}"
            )
    try:
        hints = typing.get_type_hints(func)
    except Exception:
        return
    for key, value in node.items():
        if key in _HYDRA_KEYS or key not in hints or f"{path}.{key}" in exempt:
            continue
        if isinstance(value, dict) and "_target_" in value:
            continue
        ok = _matches(value, hints[key])
        if ok is False:
            raise ConfigError(
                f"{path}.{key}: expected {_type_name(hints[key])} for {target}, got {value!r} ({type(value).__name__})"
            )


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool | None:
    """True/False when ``tp`` is a plain type this check understands, None when it cannot tell."""
    if tp is Any:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, a) for a in args]
        if any(r is True for r in results):
            return True
        return False if all(r is False for r in results) else None
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        item = args[0] if args and (origin is not tuple or len(args) == 2 and args[1] is Ellipsis) else None
        if item is None:
            return True
        results = [_matches(v, item) for v in value]
        return not any(r is False for r in results)
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        return isinstance(value, dict)
    return None


def check_output_dir(output_dir: str | os.PathLike | None, key: str = "output_dir") -> Path:
    """Create ``output_dir`` if needed and prove it is writable; :class:`ConfigError` naming the key if not."""
    if output_dir is None or str(output_dir).strip() == "":
        raise ConfigError(f"{key} is not set (the run directory for checkpoints, logs and metrics)")
    path = Path(output_dir)
    probe = path / f".write_test_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}={path}: cannot create or write the run directory ({e})") from None
    return path


def build(cfg: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` for every node the entry points build: constructors get plain dicts and lists
    (``_convert_="all"``), never config objects, and the constructor's own error is raised (e.g. a
    FileNotFoundError naming the missing file) instead of Hydra's wrapper around it."""
    try:
        return instantiate(cfg, _convert_="all", **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, TypeError):  # e.g. an unexpected keyword: name the config node
            raise TypeError(f"{cfg._get_full_key(None) or cfg.get('_target_')}: {e.__cause__}") from None
        if e.__cause__ is not None:
            raise e.__cause__ from None
        raise
