"""Save and load truncated models: the state dict plus a JSON of name -> rank/method.

Loading rebuilds the swaps on a fresh (untruncated) model of the same architecture, then loads
the weights strictly. ``from_pretrained`` alone would silently re-initialise swapped layers.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from fasttrunc.linear import TruncatedLinear
from fasttrunc.truncation import Truncation, replace_modules_

SPEC_FILE = "truncation.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "fasttrunc-truncation/1"


def truncation_spec(model: nn.Module) -> dict[str, dict[str, object]]:
    """name -> {rank, method, in_features, out_features, bias} for every TruncatedLinear."""
    return {
        name: {
            "rank": m.rank,
            "method": m.method,
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, TruncatedLinear)
    }


def save_truncated(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``truncation.json`` into ``directory`` (created if needed)."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = {"format": FORMAT, "model_class": type(model).__name__, "modules": truncation_spec(model)}
    save_model(model, str(directory / WEIGHTS_FILE))
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return directory


def load_truncated(model: nn.Module, directory: str | Path) -> Truncation:
    """Rebuild the saved swaps on ``model`` (a fresh, untruncated one) and load weights strictly."""
    from safetensors.torch import load_model

    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} does not exist; save with fasttrunc.save_truncated first")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != FORMAT:
        raise ValueError(f"{spec_path} has format {spec.get('format')!r}; expected {FORMAT!r}")
    replacements: dict[str, TruncatedLinear] = {}
    for name, entry in spec["modules"].items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"saved module {name!r} does not exist in {type(model).__name__}") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"saved module {name!r} is a {type(linear).__name__} here, not an nn.Linear")
        shape = (entry["out_features"], entry["in_features"])
        if tuple(linear.weight.shape) != shape:
            raise ValueError(f"saved module {name!r} is {shape} but the model's is {tuple(linear.weight.shape)}")
        module = TruncatedLinear(
            linear.in_features,
            linear.out_features,
            int(entry["rank"]),
            bias=bool(entry["bias"]),
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        module.method = entry["method"]
        replacements[name] = module
    truncation = replace_modules_(model, replacements)
    try:
        load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    except Exception:
        truncation.restore()
        raise
    return truncation
