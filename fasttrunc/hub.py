"""Load a causal LM and its tokenizer from a Hugging Face hub id or a local directory.

transformers is imported inside the functions, so ``import fasttrunc`` stays light.

Local directories may hold training checkpoints as ``DIR/revisions/<name>/`` (what
:func:`fasttrunc.models.tiny_neox.make_tiny_neox` writes); ``revision="<name>"`` then loads that
subdirectory, the way a hub id's ``revision="step1000"`` loads a Pythia training checkpoint, and
``"main"`` the directory itself. A hub id that cannot be fetched is a one-line ValueError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fasttrunc import checks
from fasttrunc.runs import parse_dtype

REVISIONS_DIR = "revisions"


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).exists()


def resolve_source(model: object, revision: str | None) -> tuple[str, str | None, bool]:
    """``(where, hub_revision, is_local)`` for a hub id or a local directory plus a revision."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model {model!r} is empty; give a hub id (EleutherAI/pythia-1b) or a local directory")
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is None or revision == "main":  # "main": the hub's name for the latest weights
            return str(path), None, True
        sub = path / REVISIONS_DIR / revision
        if not sub.is_dir():
            found = sorted(p.name for p in (path / REVISIONS_DIR).glob("*") if p.is_dir())
            raise ValueError(
                f"revision {revision!r} is not in local model directory {model}; "
                f"available under {REVISIONS_DIR}/: {', '.join(found) if found else 'none'}"
            )
        return str(sub), None, True
    if _looks_like_path(model):
        raise ValueError(f"model directory {model} does not exist")
    return model, revision, False


def _hub_problem(repo_id: str, revision: str | None) -> str | None:
    """None when the hub answers for ``repo_id``; otherwise why not, in a few words."""
    from huggingface_hub import model_info

    try:
        # 10 s: a reachable hub answers in well under a second; an unreachable one fails at DNS.
        model_info(repo_id, revision=revision, timeout=10)
    except Exception as exc:  # offline mode, DNS, timeout, unknown repo or revision: all mean "not here"
        return type(exc).__name__
    return None


def load_model(
    model: str, revision: str | None = None, dtype: str = "float32", device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a hub id (with ``revision``) or a local directory, in eval mode.

    A hub id that cannot be fetched (no network, unknown id or revision) is a one-line ValueError
    that names it and suggests a local directory.
    """
    torch_dtype = parse_dtype(dtype)
    if revision is not None:
        checks.text("revision", revision)
    where, hub_revision, is_local = resolve_source(model, revision)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # One quick request first: when the hub cannot be reached, load from the local cache only
    # instead of letting every file request retry with backoff (~20 s each).
    hub_problem = None if is_local else _hub_problem(where, hub_revision)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # callers draw their own progress; restored below
    try:
        kwargs: dict[str, Any] = {"revision": hub_revision, "local_files_only": hub_problem is not None}
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        lm: Any = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, ConnectionError) as exc:  # hub errors subclass OSError or ValueError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_local:
            raise ValueError(f"cannot load model from {where}: {reason}") from None
        rev = f" at revision {hub_revision}" if hub_revision else ""
        raise ValueError(
            f"cannot fetch model {model!r}{rev} from the Hugging Face hub ({hub_problem or type(exc).__name__}); "
            f"download it where the hub is reachable and pass --model /path/to/local/dir"
        ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    lm.to(device)
    lm.eval()
    return lm, tokenizer
