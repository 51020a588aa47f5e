"""Reproducibility records and run configs read from files.

:func:`run_record` gathers what a result needs to be rerun: the model id and revision (and the
hub's commit hash when the hub answers), the tokenizer, each task file's sha256, the split, the
SVD method and seed, and the versions (:func:`fasttrunc.runs.environment`).

:func:`load_run_config` reads options from a ``.toml`` file or from a previous ``results.json``
(its ``config`` entry), so every result can be fed back to rerun it. Unknown keys are a one-line
error naming them and the file. Lists become tuples (the configs' sequence type).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from fasttrunc.runs import environment, jsonable

# Seconds to wait for the hub: a reachable hub answers in well under a second.
HUB_TIMEOUT = 5.0


def hub_commit(model: str, revision: str | None = None, timeout: float = HUB_TIMEOUT) -> str | None:
    """The hub's commit hash of ``model`` at ``revision``; None for a local directory or when the hub does not answer."""
    if Path(model).expanduser().exists():
        return None
    try:
        from huggingface_hub import model_info

        return model_info(model, revision=revision, timeout=timeout).sha
    except Exception:  # offline, DNS, timeout, unknown id or revision: no hash to record
        return None


def tokenizer_record(tokenizer: Any) -> dict[str, Any] | None:
    """Name (hub id or directory it was loaded from), class and vocabulary size of a tokenizer."""
    if tokenizer is None:
        return None
    try:
        size: int | None = len(tokenizer)
    except TypeError:
        size = None
    return {
        "name": getattr(tokenizer, "name_or_path", None) or None,
        "class": type(tokenizer).__name__,
        "vocab_size": size,
    }


def run_record(
    model: str,
    revision: str | None = None,
    tokenizer: Any = None,
    task_files: Mapping[str, str] | None = None,
    split: Any = None,
    svd_method: str | None = None,
    svd_seed: int | None = None,
    hub: bool = True,
    timeout: float = HUB_TIMEOUT,
) -> dict[str, Any]:
    """JSON-ready record of a run. ``task_files``: task name -> sha256 (``TaskFile.sha256``);
    ``split``: a :class:`fasttrunc.selection.Split` or its dict; ``hub=False`` skips the hub query."""
    return {
        "model": model,
        "revision": revision,
        "hub_commit": hub_commit(model, revision, timeout) if hub else None,
        "tokenizer": tokenizer_record(tokenizer),
        "task_files": dict(task_files or {}),
        "split": jsonable(split),
        "svd": {"method": svd_method, "seed": svd_seed},
        "environment": environment(),
    }


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _allowed_keys(allowed: Collection[str] | type) -> set[str]:
    if isinstance(allowed, type) and dataclasses.is_dataclass(allowed):
        return {f.name for f in dataclasses.fields(allowed)}
    if isinstance(allowed, str):
        raise TypeError("allowed must be a collection of option names or a config dataclass, not a string")
    return set(allowed)  # type: ignore[arg-type]


def load_run_config(path: str | os.PathLike[str], allowed: Collection[str] | type) -> dict[str, Any]:
    """Options from ``path`` (``.toml``, or a ``results.json`` whose ``config`` entry is used).

    ``allowed`` is the option names, or a config dataclass whose fields they are. Returns keyword
    options (lists as tuples); the caller builds its config from them, so the config's own checks
    apply. In TOML, a table ``[config]`` may hold the options instead of the top level.
    """
    shown = str(path)
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ValueError(
            f"{shown}: unknown config file extension {file.suffix!r}; allowed: .toml, .json (a results.json)"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{shown}: cannot read the config file ({exc.strerror or type(exc).__name__})") from None
    body: Any
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ValueError(f"{shown}: reading TOML needs Python 3.11 or later; pass a results.json") from None
        try:
            body = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{shown}: not valid TOML ({exc})") from None
        if isinstance(body.get("config"), dict) and len(body) == 1:
            body = body["config"]
    else:
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{shown}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(body, dict) or not isinstance(body.get("config"), dict):
            raise ValueError(f"{shown}: a JSON config must be a results.json with a 'config' object")
        body = body["config"]
    keys = _allowed_keys(allowed)
    unknown = sorted(set(body) - keys)
    if unknown:
        raise ValueError(f"{shown}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(keys))}")
    return {key: _tuples(value) for key, value in body.items()}


__all__ = ["hub_commit", "load_run_config", "run_record", "tokenizer_record"]
