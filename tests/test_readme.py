"""Every Python snippet of README.md runs as written (issue 10, item 12).

How snippets are selected and run:
- a snippet is a fenced block that opens with a line of exactly three backticks followed by
  ``python``; ``bash`` and bare fences are not Python and are left alone;
- a Python block whose fence is directly preceded by the line ``<!-- not-run -->`` is illustrative
  and skipped; such blocks must stay few (at most ``MAX_NOT_RUN``);
- each block runs on its own, top to bottom, in a fresh namespace, in an empty temporary working
  directory, with ``FASTTRUNC_BACKEND=torch``;
- a block that loads a hub id through ``from_pretrained`` gets a tiny randomly initialised model of
  the same family and layer count instead (``HUB_MODELS`` below; an id missing there fails the test,
  so a new snippet's model is registered on purpose, never fetched);
- after a block, no module of any model it left in its namespace may still be truncated unless an
  active (not restored, not merged) ``Truncation`` in that namespace holds it: a snippet that loses
  track of a truncation fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fasttrunc import TruncatedLinear, Truncation

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = "<!-- not-run -->"
MAX_NOT_RUN = 1

# hub id -> (model_type, layers) of the real checkpoint; the stand-in keeps both, nothing else.
HUB_MODELS = {
    "EleutherAI/pythia-1b": ("gpt_neox", 16),
}


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number of the fence, code, whether it is marked not-run) for each Python block."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            marked = start > 0 and lines[start - 1].strip() == NOT_RUN
            blocks.append((start + 1, "\n".join(lines[start + 1 : end]) + "\n", marked))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def tiny_model(hub_id: str, *args: Any, **kwargs: Any) -> nn.Module:
    """A small randomly initialised model of the family and depth ``hub_id`` names (seeded: same every call)."""
    if hub_id not in HUB_MODELS:
        raise AssertionError(f"README loads {hub_id!r}; add it to HUB_MODELS in tests/test_readme.py")
    model_type, layers = HUB_MODELS[hub_id]
    assert model_type == "gpt_neox", model_type
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(config).eval()


def test_readme_has_python_snippets_and_few_are_not_run():
    assert BLOCKS, "README.md has no ```python block"
    assert sum(marked for _, _, marked in BLOCKS) <= MAX_NOT_RUN


def test_block_parser_reads_fences_and_markers():
    text = f"x\n```python\na = 1\n```\n{NOT_RUN}\n```python\nb = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n", False), (6, "b = 2\n", True)]


def orphan_truncations(namespace: dict[str, Any]) -> list[str]:
    """Modules left truncated in the namespace's models that no active Truncation there holds."""
    held = {
        id(module)
        for value in namespace.values()
        if isinstance(value, Truncation) and not value.restored and not value.merged
        for module in value.values()
    }
    return [
        f"{key}.{name}"
        for key, value in namespace.items()
        if isinstance(value, nn.Module)
        for name, module in value.named_modules()
        if name and isinstance(module, TruncatedLinear) and id(module) not in held
    ]


@pytest.mark.slow
@pytest.mark.parametrize("line, code", [(line, code) for line, code, marked in BLOCKS if not marked])
def test_readme_snippet_runs_as_written(line, code, tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")
    monkeypatch.chdir(tmp_path)
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModel, transformers.GPTNeoXForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", tiny_model)
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    assert not orphan_truncations(namespace), f"README.md:{line} leaves truncated modules behind"


def test_orphan_check_catches_a_rebound_truncation():
    from fasttrunc import truncate_

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    namespace: dict[str, Any] = {"model": model, "t": truncate_(model, "0", 1)}
    namespace["t"] = truncate_(model, "1", 1)  # the first truncation is lost
    namespace["t"].restore()
    assert orphan_truncations(namespace) == ["model.0"]
