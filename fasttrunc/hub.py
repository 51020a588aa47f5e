"""Load a causal LM and its tokenizer from a Hugging Face hub id or a local directory.

transformers is imported inside the functions, so ``import fasttrunc`` stays light.

Local directories may hold training checkpoints as ``DIR/revisions/<name>/`` (what
:func:`fasttrunc.models.tiny_neox.make_tiny_neox` writes); ``revision="<name>"`` then loads that
subdirectory, the way a hub id's ``revision="step1000"`` loads a Pythia training checkpoint, and
``"main"`` the directory itself. A hub id that cannot be fetched is a one-line ValueError, and
so is a local directory that cannot hold a loadable model (:func:`check_local_model`): both are
found before transformers is imported or any weight is read.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from fasttrunc import checks
from fasttrunc.runs import parse_dtype

REVISIONS_DIR = "revisions"

# The weight files AutoModelForCausalLM.from_pretrained looks for in a local directory
# (transformers' SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME):
# spelled out so that checking a directory does not import transformers.
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Files one of which every tokenizer AutoTokenizer can build from a directory needs: the fast
# tokenizer's serialization, the tokenizer's config, or a slow tokenizer's vocabulary.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
# transformers unpickles pytorch_model.bin only with this torch or later (CVE-2025-32434).
SAFE_TORCH_LOAD = "2.6"


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
    if path.exists():
        raise ValueError(
            f"model {model} is a file, not a directory; give the directory that holds config.json and the weights"
        )
    if _looks_like_path(model):
        raise ValueError(f"model directory {model} does not exist")
    return model, revision, False


def _one_line(exc: BaseException) -> str:
    """An exception's whole message on one line (terminal escapes dropped), or its type's name."""
    text = " ".join(str(exc).replace("\x1b[1m", "").replace("\x1b[0m", "").split())
    return text if text else type(exc).__name__


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        # Opening parses and checks the header (names, shapes, dtypes, offsets covering the
        # file) without reading a tensor.
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as exc:
        raise ValueError(f"model file {path} is corrupt or truncated: {_one_line(exc)}") from None
    except OSError as exc:
        raise ValueError(f"model file {path} cannot be read: {exc.strerror or _one_line(exc)}") from None


def check_local_model(directory: str | Path) -> Path:
    """``directory`` if it can hold a model load_model reads; otherwise a one-line ValueError.

    Checks, without importing transformers or reading a weight: a config.json that is JSON, a
    weight file (model.safetensors, pytorch_model.bin or a sharded index), safetensors headers
    that parse, tokenizer files, and, for pickled weights only, a torch that transformers lets
    unpickle them. What only loading finds (a pickle holding objects other than tensors) is left
    to :func:`load_model`, which reports it in one line too.
    """
    path = Path(directory)
    config = path / "config.json"
    if not config.is_file():
        what = "it is empty" if not any(path.iterdir()) else "it has no config.json"
        raise ValueError(
            f"model directory {path} holds no model: {what}; expected config.json, model.safetensors and "
            "tokenizer files (what save_pretrained writes)"
        )
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"model file {config} is not readable JSON: {_one_line(exc)}") from None
    safetensors = [name for name in SAFETENSORS_FILES if (path / name).is_file()]
    pickles = [name for name in PICKLE_FILES if (path / name).is_file()]
    if not safetensors and not pickles:
        raise ValueError(
            f"model directory {path} holds no weights: none of {', '.join(SAFETENSORS_FILES + PICKLE_FILES)} is there"
        )
    for shard in sorted(path.glob("*.safetensors")):
        _check_safetensors(shard)
    if not safetensors:
        from torch.torch_version import TorchVersion

        if TorchVersion(torch.__version__) < SAFE_TORCH_LOAD:
            raise ValueError(
                f"model directory {path} holds only pickled weights ({pickles[0]}), which transformers unpickles "
                f"only with torch >= {SAFE_TORCH_LOAD} (this is {torch.__version__}); upgrade torch, or save the "
                "model as model.safetensors where it loads"
            )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"model directory {path} has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is there")
    return path


def check_source(model: object, revision: str | None = None) -> tuple[str, str | None, bool]:
    """:func:`resolve_source`, and for a local directory :func:`check_local_model`: what can be
    known about ``model`` before loading it (nothing more for a hub id, which needs the network)."""
    where, hub_revision, is_local = resolve_source(model, revision)
    if is_local:
        check_local_model(where)
    return where, hub_revision, is_local


def _load_problem(exc: BaseException) -> str:
    """What a local model's failed load means, in a few words."""
    from safetensors import SafetensorError

    if isinstance(exc, pickle.UnpicklingError):
        return (
            "torch.load(weights_only=True) refused its pickled weights, pytorch_model*.bin (they hold objects other than tensors, "
            "or are not a torch file); load them only if you trust their source, or save the model as "
            "model.safetensors"
        )
    if isinstance(exc, SafetensorError):
        return f"a safetensors file is corrupt: {_one_line(exc)}"
    return _one_line(exc)


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
    where, hub_revision, is_local = check_source(model, revision)
    from safetensors import SafetensorError
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
    # Hub errors subclass OSError or ValueError; a file that is there but broken raises the rest.
    except (OSError, ValueError, ConnectionError, RuntimeError, pickle.UnpicklingError, SafetensorError) as exc:
        broken = isinstance(exc, pickle.UnpicklingError | SafetensorError | RuntimeError)
        if is_local or broken:
            raise ValueError(f"cannot load model from {where}: {_load_problem(exc)}") from None
        raise _unfetchable(model, hub_revision, hub_problem or type(exc).__name__) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    lm.to(device)
    lm.eval()
    return lm, tokenizer


def _unfetchable(model: str, hub_revision: str | None, problem: str) -> ValueError:
    """The one-line error for a hub id (at a revision) that cannot be fetched here."""
    rev = f" at revision {hub_revision}" if hub_revision else ""
    return ValueError(
        f"cannot fetch model {model!r}{rev} from the Hugging Face hub ({problem}); "
        f"download it where the hub is reachable and pass --model /path/to/local/dir"
    )


def load_config(model: str, revision: str | None = None) -> Any:
    """The ``transformers`` config of a hub id or a local directory, without any weights.

    Resolved as :func:`load_model` resolves a model: a local directory (or one of its
    ``revisions/``), else the hub, asked once and then read from the local cache only when it does
    not answer. A config that cannot be fetched is the same one-line ValueError.
    """
    where, hub_revision, is_local = resolve_source(model, revision)
    from transformers import AutoConfig

    problem = None if is_local else _hub_problem(where, hub_revision)
    try:
        return AutoConfig.from_pretrained(where, revision=hub_revision, local_files_only=problem is not None)
    except (OSError, ValueError, KeyError) as exc:  # missing file, unknown model type, hub errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_local:
            raise ValueError(f"cannot read a model config from {where}: {reason}") from None
        raise _unfetchable(model, hub_revision, problem or type(exc).__name__) from None
