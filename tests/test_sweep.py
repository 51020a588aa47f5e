"""The sweep engine: prefix reuse equals the plain forward, the cheaper form of each edit."""

from __future__ import annotations

import pytest
import torch
from test_families import HYBRIDS, hybrid_tiny, jamba_tiny
from test_families import TYPES as FAMILY_TYPES
from test_families import tiny as family_tiny

from fasttrunc.experiments import sweep
from fasttrunc.experiments.prefix import PrefixCache
from fasttrunc.families import detect_family
from fasttrunc.models import tiny_neox
from fasttrunc.tasks.metrics import EncodedPrompts, aggregate, score
from fasttrunc.truncation import Targets, resolve_targets, truncate_


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


def _prompts(vocab: int, n: int = 7, width: int = 9, seed: int = 0) -> EncodedPrompts:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (n, width), generator=g) * mask
    return EncodedPrompts(
        input_ids=ids,
        attention_mask=mask,
        last_index=lengths - 1,
        answer_ids=torch.randint(0, vocab, (n,), generator=g),
        subject_ids=torch.randint(0, vocab, (n,), generator=g),
        the_id=2,
    )


def _neox():
    config = tiny_neox.TinyNeoxConfig(hidden_size=32, num_layers=4, intermediate_size=64, steps=30)
    tok = tiny_neox.build_tiny_tokenizer(config.names)
    model = tiny_neox.tiny_neox_model(len(tok), config, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    return model, "gpt_neox.layers", r"gpt_neox\.layers\.{}\.mlp\.dense_4h_to_h"


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(cfg), "model.layers", r"model\.layers\.{}\.mlp\.down_proj"


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=4, n_head=4, n_positions=32)
    return GPT2LMHeadModel(cfg), "transformer.h", r"transformer\.h\.{}\.mlp\.c_proj"


def _plain_logits(model, enc: EncodedPrompts) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    return logits[torch.arange(len(enc)), enc.last_index]


def _cached_logits(cache: PrefixCache, enc: EncodedPrompts, layer: int, batch: int) -> torch.Tensor:
    parts = []
    with torch.no_grad(), cache.replaying(layer, 0):
        for start in range(0, len(enc), batch):
            mask = enc.attention_mask[start : start + batch]
            width = int(mask.sum(dim=1).max())
            out = cache.lm(enc.input_ids[start : start + batch, :width], mask[:, :width])
            parts.append(out.logits[:, 0])
    return torch.cat(parts)


def _last_mlp_widths(model, cache: PrefixCache, enc: EncodedPrompts) -> set[int]:
    """The sequence widths the last block's mlp_in saw in one cached forward."""
    name = resolve_targets(model, Targets(layers=-1, matrices="mlp_in"))[0]
    widths: set[int] = set()
    module = model.get_submodule(name)
    handle = module.register_forward_pre_hook(lambda m, args: widths.add(args[0].shape[-2]))
    try:
        with torch.no_grad():
            cache.lm(enc.input_ids[:3], enc.attention_mask[:3])
    finally:
        handle.remove()
    return widths


@pytest.mark.parametrize("build", [_neox, _llama, _gpt2], ids=["gpt-neox", "llama", "gpt2"])
def test_prefix_reuse_equals_the_plain_forward(metrics_close, build):
    """First, middle and last layer, unedited and with the layer's MLP output truncated."""
    torch.manual_seed(1)
    model, blocks, pattern = build()
    model.eval()
    enc = _prompts(model.get_output_embeddings().out_features)
    batch = 3  # three batches, the last one short
    cache = PrefixCache.for_model(model, batch)
    assert _last_mlp_widths(model, cache, enc) == {1}  # the last block's MLP runs at the last position only
    assert _last_mlp_widths(model, PrefixCache(model, blocks, batch), enc) == {enc.input_ids.shape[1]}
    n_layers = len(model.get_submodule(blocks))
    layers = [0, n_layers // 2, n_layers - 1]
    baseline = cache.capture([enc], layers)[0]
    assert cache.bytes > 0
    plain = score(model, enc, batch)
    metrics_close(aggregate(baseline), aggregate(plain))
    for layer in layers:
        unedited = _plain_logits(model, enc)
        got = _cached_logits(cache, enc, layer, batch)
        assert ((got - unedited).norm() / unedited.norm()).item() < 1e-5
        with truncate_(model, pattern.format(layer), 3):
            reference = _plain_logits(model, enc)
            got = _cached_logits(cache, enc, layer, batch)
            assert ((got - reference).norm() / reference.norm()).item() < 1e-5
            assert not torch.allclose(reference, unedited, atol=1e-4)  # the edit matters
            edited = cache.score(layer, [enc])[0]
            metrics_close(aggregate(edited), aggregate(score(model, enc, batch)))
    # the stubs are gone: the model is whole again
    assert all(type(b).__name__ != "CachedBlock" for b in model.get_submodule(blocks))


def test_dense_form_is_chosen_by_flops():
    assert sweep.dense_is_cheaper(16, (32, 32)) and not sweep.dense_is_cheaper(15, (32, 32))
    assert sweep.dense_is_cheaper(26, (32, 128)) and not sweep.dense_is_cheaper(25, (32, 128))


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("neox4")
    config = tiny_neox.TinyNeoxConfig(hidden_size=32, num_layers=3, intermediate_size=64)
    tok = tiny_neox.build_tiny_tokenizer(config.names)
    torch.manual_seed(5)
    model = tiny_neox.tiny_neox_model(len(tok), config, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _plain_sweep(model, encoded, splits, cells):
    """The reference: each cell truncated through truncate_ and the whole model scored."""
    out = {}
    for cell in cells:
        with truncate_(model, lambda name, m, ks=cell.ranks: name in ks, cell.ranks):
            scores = score(model, encoded["ioi"], 8)
        n = splits["ioi"]
        out[(cell.layer, cell.matrix, cell.rank)] = (
            aggregate(scores.subset(slice(0, n))),
            aggregate(scores.subset(slice(n, None))),
        )
    return out


def test_sweep_engine_equals_plain_evaluation_and_says_which_form_ran(metrics_close, neox_dir):
    from fasttrunc.experiments.pythia import task_prompts
    from fasttrunc.hub import load_model
    from fasttrunc.tasks.metrics import encode_prompts

    model, tok = load_model(str(neox_dir), None, "float32", torch.device("cpu"))
    encoded = {"ioi": encode_prompts(tok, task_prompts("ioi", tok, 20, 0))}
    splits = {"ioi": 5}
    ranks = [0.9, 0.5, 2, 0]
    grid = sweep.sweep_model(model, encoded, splits, [0, 1, 2], ["mlp_in", "mlp_out"], ranks, batch_size=8)
    assert len(grid.cells) == 3 * 2 * 4
    # rank int(0.9 * 32) = 28: 28 * (32 + 64) >= 32 * 64 runs dense; 0.5 -> 16 runs factored
    assert {c.rank: c.form for c in grid.cells} == {0.9: "dense", 0.5: "factored", 2: "factored", 0: "factored"}
    reference = _plain_sweep(model, encoded, splits, grid.cells)
    for cell in grid.cells:
        select, reported = reference[(cell.layer, cell.matrix, cell.rank)]
        metrics_close(cell.select["ioi"], select), cell
        metrics_close(cell.report["ioi"], reported), cell
    assert grid.cache_mb > 0


def test_cache_budget_too_small_is_one_line(neox_dir):
    config = sweep.SweepConfig(model=str(neox_dir), ranks=[0.5], n=10, cache_budget_mb=1e-6)
    with pytest.raises(ValueError, match="cache budget 1e-06 MB holds less than one batch of one layer"):
        sweep.run(config)
    with pytest.raises(ValueError, match="cache_budget_mb"):
        sweep.SweepConfig(model=str(neox_dir), cache_budget_mb=0)


def test_small_budget_gives_the_same_cells_in_more_captures(neox_dir):
    from fasttrunc.experiments.pythia import task_prompts
    from fasttrunc.hub import load_model
    from fasttrunc.tasks.metrics import encode_prompts

    model, tok = load_model(str(neox_dir), None, "float32", torch.device("cpu"))
    encoded = {"ioi": encode_prompts(tok, task_prompts("ioi", tok, 10, 0))}
    args = (model, encoded, {"ioi": 2}, [0, 1, 2], ["mlp_out"], [0.5, 0])
    big = sweep.sweep_model(*args)
    per_layer = big.cache_mb / 2  # layers 1 and 2 each cache block 0's / block 1's output
    small = sweep.sweep_model(*args, cache_budget_mb=per_layer * 1.5)
    assert (big.captures, small.captures) == (1, 3)
    assert [c.select for c in small.cells] == [c.select for c in big.cells]
    assert [c.report for c in small.cells] == [c.report for c in big.cells]
    # below one layer: one layer at a time, its prompts in chunks of whole batches (batch size 2)
    plain = sweep.sweep_model(*args, batch_size=2)
    budget = plain.cache_mb / 2 * 0.45
    chunked = sweep.sweep_model(*args, batch_size=2, cache_budget_mb=budget)
    assert chunked.captures > 3 and chunked.cache_mb <= budget
    assert [c.select for c in chunked.cells] == [c.select for c in plain.cells]
    assert [c.report for c in chunked.cells] == [c.report for c in plain.cells]
    assert chunked.baseline_select == plain.baseline_select and chunked.baseline_report == plain.baseline_report


def test_screen_bounds_grow_to_every_selection_prompt():
    for n_select, total, keep in [(13, 432, 22), (40, 100, 10), (3, 432, 5), (20, 8, 4)]:
        bounds = sweep._screen_bounds(n_select, total, keep)
        assert bounds[-1] == n_select and bounds[0] >= 1
        assert all(a < b for a, b in zip(bounds, bounds[1:]))


def test_screened_search_evaluates_keep_cells_exactly(metrics_close, neox_dir):
    from fasttrunc.experiments.pythia import task_prompts
    from fasttrunc.hub import load_model
    from fasttrunc.tasks.metrics import encode_prompts

    model, tok = load_model(str(neox_dir), None, "float32", torch.device("cpu"))
    encoded = {"ioi": encode_prompts(tok, task_prompts("ioi", tok, 24, 0))}
    args = (model, encoded, {"ioi": 12}, [0, 1, 2], ["mlp_in", "mlp_out"], [0.9, 0.5, 0.2, 0.05, 0])
    exhaustive = sweep.sweep_model(*args, batch_size=8)
    screened = sweep.sweep_model(*args, batch_size=8, search="screened", keep=3)
    assert len(screened.cells) == 30 and sum(c.evaluated for c in screened.cells) == 3
    exact = {(c.layer, c.matrix, c.rank): c for c in exhaustive.cells}
    for cell in screened.cells:
        if cell.evaluated:
            metrics_close(cell.select["ioi"], exact[(cell.layer, cell.matrix, cell.rank)].select["ioi"])
            metrics_close(cell.report["ioi"], exact[(cell.layer, cell.matrix, cell.rank)].report["ioi"])
            assert cell.estimate_prompts == 0
        else:
            assert cell.report == {} and 1 <= cell.estimate_prompts < 12
    metrics_close(screened.baseline_select["ioi"], exhaustive.baseline_select["ioi"])
    with pytest.raises(ValueError, match="keep 30 is out of range for 30 cells; allowed: 1..29"):
        sweep.sweep_model(*args, search="screened", keep=30)


def test_screened_config_checks(neox_dir):
    with pytest.raises(ValueError, match="keep applies to search screened only"):
        sweep.SweepConfig(model=str(neox_dir), keep=3)
    with pytest.raises(ValueError, match="search"):
        sweep.SweepConfig(model=str(neox_dir), search="greedy")
    config = sweep.SweepConfig(model=str(neox_dir), ranks=(0.5, 0), n=12, search="screened", keep=2)
    rev = sweep.run(config).revisions[0]
    assert rev.cells_evaluated == 2 and len(rev.cells) == 3 * 2 * 2
    assert rev.best["ioi"].select_score == max(c.select["ioi"].mean_p_correct for c in rev.cells if c.evaluated)


def test_sweep_benchmark_reports_floor_baselines_and_screening():
    from fasttrunc.bench.sweep import SweepBenchConfig, run

    small = dict(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=300, n_prompts=10)
    small |= dict(prompt_len=5, batch_size=5, dtype="float32", device="cpu", ranks=(0.9, 0.5, 0.1, 0.0))
    result = run(SweepBenchConfig(**small))
    assert result.cells == result.cells_evaluated == 2 * 2 * 4
    assert result.floor_seconds > 0 and result.recipe_seconds > 0 and result.laser_shipped_seconds > 0
    assert result.floor_ratio == pytest.approx(result.fasttrunc_seconds / result.floor_seconds)
    assert result.max_abs_diff_p_correct_recipe < 0.01 and result.max_abs_diff_p_correct_shipped < 0.01
    assert result.best_matches_exhaustive
    screened = run(SweepBenchConfig(**small, search="screened", keep=3, baselines=False))
    assert screened.cells == 16 and screened.cells_evaluated == 3 and screened.recipe_seconds is None
    assert isinstance(screened.best_matches_exhaustive, bool)


def _assert_prefix_reuse_exact(metrics_close, model, layers, matrices):
    """Cached-prefix logits and metrics of ``model`` equal the plain forward's, ``matrices`` of
    each of ``layers`` truncated to rank 2; the last block's MLP runs at the last position only."""
    family, blocks, n_layers = detect_family(model)
    enc = _prompts(model.get_output_embeddings().out_features)
    batch = 3
    cache = PrefixCache.for_model(model, batch)
    cache.capture([enc], layers)
    if family.mlp_module() is not None and family.in_layer("mlp_in", n_layers - 1):
        assert _last_mlp_widths(model, cache, enc) == {1}, family.name
    for layer in layers:
        with truncate_(model, Targets(layers=layer, matrices=matrices), 2):
            reference = _plain_logits(model, enc)
            got = _cached_logits(cache, enc, layer, batch)
            assert ((got - reference).norm() / reference.norm()).item() < 1e-5, (family.name, layer)
            metrics_close(aggregate(cache.score(layer, [enc])[0]), aggregate(score(model, enc, batch)))
    assert all(type(b).__name__ != "CachedBlock" for b in model.get_submodule(blocks))


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_prefix_reuse_equals_the_plain_forward_for_every_row(metrics_close, model_type):
    """Every family row of tests/test_families.py: first, middle and last layer, with attn_out cut."""
    model = family_tiny(model_type)
    n_layers = detect_family(model)[2]
    _assert_prefix_reuse_exact(metrics_close, model, sorted({0, n_layers // 2, n_layers - 1}), "attn_out")


@pytest.mark.parametrize("model_type", list(HYBRIDS))
def test_prefix_reuse_equals_the_plain_forward_on_hybrids(metrics_close, model_type):
    """Hybrid blocks (a Mamba, convolution or RG-LRU mixer before the MLP; attention in layer 2):
    the cached blocks' outputs carry no recurrent state the later blocks need."""
    model = hybrid_tiny(model_type)
    assert detect_family(model)[0].mlp_module() is not None  # so the last-position MLP is checked
    _assert_prefix_reuse_exact(metrics_close, model, [1, 2, 3], "mlp_out")  # after a mixer, attention, after it


def test_prefix_reuse_equals_the_plain_forward_on_jamba(metrics_close):
    """Jamba's two block classes and its experts layers: layer 0 (a Mamba and a dense MLP) and 2 (attention)."""
    _assert_prefix_reuse_exact(metrics_close, jamba_tiny(), [0, 2], "all")


def test_screen_study_builds_random_models_of_other_families(tmp_path):
    from fasttrunc.bench import screen
    from fasttrunc.families import detect_family

    for kind, family in [("random-llama", "llama"), ("random-gpt2", "gpt2")]:
        model, tok, name = screen._model(kind, 0, tmp_path)
        assert detect_family(model)[0].name == family and detect_family(model)[2] == 6
        assert model.get_output_embeddings().out_features == len(tok) and kind in name
    with pytest.raises(ValueError, match="study model 'nope' is not known; allowed: trained, random, random-llama"):
        screen._model("nope", 0, tmp_path)
