"""`fasttrunc sweep pythia`: LASER's layer x matrix x rank search, streamed, resumable, torchrun-aware.

Thin: options -> config, progress on stderr (rank 0), tables / JSON, and with ``--out DIR`` the
cells streamed to DIR/cells.jsonl, then results.json and the plots written atomically. Under
``torchrun`` every rank runs this command; rank 0 alone prints and writes.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from fasttrunc.cli._common import (
    INT_RULES,
    check_models,
    emit,
    fail,
    given_on_command_line,
    make_table,
    progress_bar,
    ranged_int,
    stderr,
)
from fasttrunc.cli.apps import sweep_app
from fasttrunc.cli.pythia import (
    BATCH_OPT,
    DEVICE_OPT,
    DTYPE_OPT,
    JSON_OPT,
    METHOD_OPT,
    METRIC_ROWS,
    MODEL_HELP,
    N_HELP,
    REVISION_OPT,
    REVISIONS_OPT,
    SEED_OPT,
    _fmt,
    parse_layers,
    parse_revisions,
    split_list,
)
from fasttrunc.rules import SELECT_TASKS_RULE

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.table import Table

    from fasttrunc.experiments.sweep import SweepResult


ANSWER_ROWS = (
    ("accuracy (choice argmax / every token top-1)", "accuracy"),
    ("top-5 accuracy", "top5_accuracy"),
    ("top-10 accuracy", "top10_accuracy"),
    ("mean log P(answer)", "mean_log_prob"),
    ("log-loss (per answer token)", "log_loss"),
    ("mean of ratios P(answer)/P(distractor)", "mean_of_ratios"),
    ("ratio of means P(answer)/P(distractor)", "ratio_of_means"),
)


def _rows_of(metrics: object) -> tuple[tuple[str, str], ...]:
    """The table rows of a task's metrics: LASER's for a task file, the paper's for a built-in task."""
    return ANSWER_ROWS if hasattr(metrics, "log_loss") else METRIC_ROWS


def _metric_table(title: str, baseline: object, edited: object, label: str) -> Table:
    rows = [[name, _fmt(getattr(baseline, key)), _fmt(getattr(edited, key))] for name, key in _rows_of(baseline)]
    return make_table(title, ["metric", "baseline", label], rows)


def _sweep_tables(result: SweepResult) -> list[Table]:
    cfg = result.config
    tables = []
    for rev in result.revisions:
        for task, best in rev.best.items():
            title = (
                f"{cfg.model} {rev.revision or ''} {task}: best cell on {rev.n_select[task]} selection prompts "
                f"(by {cfg.metric}, split {rev.splits.get(task, {}).get('mode', '?')}) = layer {best.layer} "
                f"{best.matrix} rank {best.rank} {best.kind}; reported on the other {rev.n_report[task]}"
            )
            tables.append(_metric_table(title, best.baseline_report, best.report, "best cell"))
        if rev.joint is not None:
            j = rev.joint
            for task in cfg.tasks:
                title = (
                    f"{task}: the one cell chosen for {', '.join(j.tasks)} = layer {j.layer} {j.matrix} rank "
                    f"{j.rank} {j.kind} (combined score {j.score:+.4f}); report prompts"
                )
                tables.append(_metric_table(title, j.baseline_report[task], j.report[task], "joint cell"))
        if rev.composition is not None:
            c = rev.composition
            steps = "; ".join(
                "+"
                + ", ".join(f"{e['module']} {e['rank']} {e['kind']}" for e in step["edits"])
                + " -> "
                + "/".join(f"{v:.4f}" for v in step["key"])
                for step in c.steps
            )
            start_key = "/".join(f"{v:.4f}" for v in c.start_key)  # the metric, then its tie-break
            for task in cfg.tasks:
                title = (
                    f"{task}: greedy composition ({c.order} layers) from L{c.start[0]} {c.start[1]} {c.start[2]} "
                    f"({start_key}): {len(c.edits)} edits, {c.trials} steps tried, {c.rejected} rejected"
                    + (f"; accepted: {steps}" if steps else "; no step improved")
                    + "; report prompts"
                )
                tables.append(_metric_table(title, c.baseline_report[task], c.report[task], "composition"))
        kinds = len(cfg.kinds) > 1
        for task in cfg.tasks:
            metric = cfg.metric_for(task)
            grid_rows = []
            for row_key in dict.fromkeys((c.layer, c.matrix, c.kind) for c in rev.cells):
                cells = [c for c in rev.cells if (c.layer, c.matrix, c.kind) == row_key]
                label = f"L{row_key[0]} {row_key[1]}" + (f" {row_key[2]}" if kinds else "")
                grid_rows.append([label] + [_grid_value(getattr(c.select[task], metric), c.evaluated) for c in cells])
            base = getattr(rev.baseline_select[task], metric)
            grid_title = f"{task}: {metric} on the selection prompts (baseline {_fmt(base)})"
            if kinds:
                grid_title += "; keep-top keeps the rank, remove-top removes it, magnitude keeps as many weights"
            if rev.cells_evaluated < len(rev.cells):
                grid_title += (
                    f"; screened: {rev.cells_evaluated} of {len(rev.cells)} cells evaluated exactly, "
                    "~ marks an estimate on fewer selection prompts"
                )
            tables.append(make_table(grid_title, ["cell"] + [str(r) for r in cfg.ranks], grid_rows))
    return tables


def _grid_value(value: object, evaluated: bool) -> object:
    return value if evaluated or not isinstance(value, float) else f"~{value:.4f}"


def _rated(progress: Callable[[str, int, int, str], None] | None) -> Callable[[str, int, int, str], None] | None:
    """``progress`` with cells per second in the sweep's detail (the bar shows done / total and eta)."""
    if progress is None:
        return None
    start: dict[str, tuple[float, int]] = {}

    def update(stage: str, done: int, total: int, detail: str = "") -> None:
        t0, d0 = start.setdefault(stage, (time.perf_counter(), done))
        elapsed = time.perf_counter() - t0
        if stage == "sweep" and done > d0 and elapsed > 0:
            detail = f"{detail} ({(done - d0) / elapsed:.2f} cells/s)".strip()
        progress(stage, done, total, detail)

    return update


# --option name -> the SweepConfig field it sets (for --config: the command line wins).
CONFIG_FIELDS = {
    "model": "model", "layers": "layers", "matrices": "matrices", "ranks": "ranks", "task": "tasks",
    "revision": "revisions", "revisions": "revisions", "n": "n", "seed": "seed", "device": "device",
    "dtype": "dtype", "batch_size": "batch_size", "method": "method", "select_fraction": "select_fraction",
    "select_by": "select_by", "select_tasks": "select_tasks", "split": "split", "edit": "kinds",
    "compose": "compose", "cache_budget": "cache_budget_mb", "search": "search", "keep": "keep",
}  # fmt: skip


def _with_config_file(kwargs: dict[str, Any], path: Path, ctx: typer.Context) -> dict[str, Any]:
    """``kwargs`` with the options of ``path`` wherever the command line did not give them."""
    from fasttrunc.experiments.sweep import SweepConfig
    from fasttrunc.records import load_run_config

    given = {CONFIG_FIELDS[name] for name in given_on_command_line(ctx) if name in CONFIG_FIELDS}
    from_file = load_run_config(path, SweepConfig)
    from_file.pop("save_predictions", None)  # the command line says where predictions go
    return {**kwargs, **{k: v for k, v in from_file.items() if k not in given}}


def _write_predictions(result: SweepResult, path: Path) -> Path:
    """One JSON line per example: revision, edit (baseline / best), task, split and its values."""
    import json

    from fasttrunc.runs import atomic_write_text, jsonable

    lines = []
    for rev in result.revisions:
        for which, tasks in (rev.predictions or {}).items():
            for task, rows in tasks.items():
                for row in rows:
                    lines.append(json.dumps(jsonable({"revision": rev.revision, "edit": which, "task": task, **row})))
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def _write_outputs(result: SweepResult, out: Path) -> list[Path]:
    """results.json, edits.json (a composition) and the plots, each written beside its place and renamed onto it."""
    import json

    from fasttrunc.edits import save_edits
    from fasttrunc.plots import sweep_plots
    from fasttrunc.runs import atomic_write_text

    written = [atomic_write_text(out / "results.json", json.dumps(result.to_dict(), indent=2) + "\n")]
    composed = [rev for rev in result.revisions if rev.composition is not None]
    for rev in composed:
        c = rev.composition
        assert c is not None
        name = "edits.json" if len(composed) == 1 else f"edits_{rev.revision or 'default'}.json"
        info = {"model": result.config.model, "revision": rev.revision, "start": c.start, "steps": c.steps,
                "score": c.score, "key": c.key, "select_by": result.config.metric}  # fmt: skip
        written.append(save_edits(out / name, c.edits, **info))
    with tempfile.TemporaryDirectory(dir=out, prefix=".plots-") as tmp:
        for path in sweep_plots(result, Path(tmp)):
            os.replace(path, out / path.name)
            written.append(out / path.name)
    return written


@sweep_app.command("pythia")
def sweep_pythia(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP + " Required here or in --config."),
    layers: str = typer.Option(
        "all", "--layers", help="Layers to sweep: comma-separated indices, ranges such as 8-15, or all."
    ),
    matrices: str = typer.Option(
        "mlp_in,mlp_out",
        "--matrices",
        help="Grid rows per layer, comma-separated: mlp_in, mlp_out, attn_qkv, attn_out, or a group (mlp, attn, all) truncated together.",
    ),
    ranks: str = typer.Option(
        "0.9,0.8,0.6,0.4,0.2,0.1,0.05,0.01,0.005",
        "--ranks",
        help="Ranks to sweep, comma-separated: ints are absolute, floats in [0, 1] are fractions of the full rank (LASER's grid by default).",
    ),
    task: str = typer.Option(
        "ioi",
        "--task",
        help="Tasks, comma-separated: ioi, factual, or task files (.jsonl / .csv: prompt, answer, optional distractor and choices), scored with LASER's metrics.",
    ),
    revision: str | None = REVISION_OPT,
    revisions: str | None = REVISIONS_OPT,
    n: int | None = typer.Option(
        None,
        "--n-prompts",
        "--n",
        parser=ranged_int("--n", *INT_RULES["--n"]),
        metavar="INTEGER",
        help=N_HELP + f" ({INT_RULES['--n'][0]} to {INT_RULES['--n'][1]}; --n is an alias, which torchrun swallows).",
    ),
    seed: int = SEED_OPT,
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    batch_size: int = BATCH_OPT,
    method: str = METHOD_OPT,
    select_fraction: float = typer.Option(
        0.2, "--select-fraction", help="Fraction of the prompts that selects the best cell; the rest report it."
    ),
    select_by: str | None = typer.Option(
        None,
        "--select-by",
        help="The selection metric: any metric of the tasks (mean_p_correct, accuracy, log_loss, mean_log_prob, mean_of_ratios, ...); default mean_p_correct, or accuracy with a task file. accuracy breaks ties by the lower log-loss, as LASER does.",
    ),
    select_tasks: str | None = typer.Option(
        None,
        "--select-tasks",
        help="Tasks (comma-separated, of --task) that choose one cell together: " + SELECT_TASKS_RULE + ".",
    ),
    split: str = typer.Option(
        "shuffled",
        "--split",
        help="How a task file's examples split into selection and report: shuffled (seeded by --seed) or laser (the first --select-fraction in file order). Built-in prompts are generated in a seeded order; the first ones select.",
    ),
    edit: str = typer.Option(
        "keep-top",
        "--edit",
        help="Edit kinds to sweep, comma-separated, each its own grid rows: keep-top (LASER's), remove-top (the weight less its top-k components), magnitude (the k*(in+out) largest weights kept: as many parameters).",
    ),
    compose: str | None = typer.Option(
        None,
        "--compose",
        help="greedy: from the best cell, visit the layers last to first, add the best cell of each layer on top of the accepted edits when it strictly improves the selection score; writes DIR/edits.json with --out.",
    ),
    config_file: Path | None = typer.Option(
        None,
        "--config",
        help="Read the options from a .toml file (or a results.json, to rerun it); options given on the command line win.",
    ),
    save_predictions: Path | None = typer.Option(
        None,
        "--save-predictions",
        help="Write per-example values of the baseline and the best cell (every task, both splits) to this .jsonl file.",
    ),
    cache_budget: float = typer.Option(
        1024.0, "--cache-budget", help="Device memory (MB) for the cached outputs of the blocks before each layer."
    ),
    search: str = typer.Option(
        "exhaustive",
        "--search",
        help="exhaustive: every cell evaluated; screened: every cell estimated on a few selection prompts, halved round by round, the last --keep evaluated exactly.",
    ),
    keep: int | None = typer.Option(
        None, "--keep", help="Screened search: cells evaluated exactly (default: 1 in 20)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Stream cells to DIR/cells.jsonl; at the end write results.json and the plots."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep in --out DIR/cells.jsonl."),
    as_json: bool = JSON_OPT,
) -> None:
    """Sweep layers x matrices x ranks as LASER does, factorizing each matrix once, and report the best cell.

    Under torchrun (torchrun --nproc-per-node N $(which fasttrunc) sweep pythia ...) the cells are
    shared among the ranks and gathered on rank 0; the numbers equal a single-process run's.
    """
    from fasttrunc import distributed

    shard = None
    try:
        if distributed.launched():
            shard, device = distributed.start(device)
        _sweep(locals(), shard)
    except (ValueError, FileNotFoundError) as exc:
        if shard is None or shard.rank == 0:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise typer.Exit(code=2) from None
    finally:
        distributed.stop()


def _sweep(opts: dict[str, Any], shard: Any) -> None:
    from fasttrunc.experiments import sweep
    from fasttrunc.experiments.cells_log import CellLog
    from fasttrunc.ranks import parse_rank
    from fasttrunc.runs import check_output_dir

    lead = shard is None or shard.rank == 0
    out: Path | None = opts["out"]
    if opts["resume"] and out is None:
        raise ValueError("--resume continues the sweep in --out DIR; give --out")
    if out is not None and lead:
        out = check_output_dir(out)
    swept = parse_layers(opts["layers"])
    kwargs: dict[str, Any] = dict(
        model=opts["model"],
        layers=None if swept is None else tuple(swept),
        matrices=tuple(split_list(opts["matrices"], "matrices")),
        ranks=tuple(parse_rank(r) for r in split_list(opts["ranks"], "ranks")),
        tasks=tuple(split_list(opts["task"], "tasks")),
        revisions=parse_revisions(opts["revision"], opts["revisions"]),
        n=opts["n"],
        seed=opts["seed"],
        device=opts["device"],
        dtype=opts["dtype"],
        batch_size=opts["batch_size"],
        method=opts["method"],
        select_fraction=opts["select_fraction"],
        select_by=opts["select_by"],
        select_tasks=None if opts["select_tasks"] is None else tuple(split_list(opts["select_tasks"], "select tasks")),
        split=opts["split"],
        kinds=tuple(split_list(opts["edit"], "edit kinds")),
        compose=opts["compose"],
        cache_budget_mb=opts["cache_budget"],
        search=opts["search"],
        keep=opts["keep"],
    )
    if opts["config_file"] is not None:
        kwargs = _with_config_file(kwargs, opts["config_file"], opts["ctx"])
    if kwargs["model"] is None:
        raise ValueError("no model: give --model, or a --config that names one")
    save_to: Path | None = opts["save_predictions"]
    if save_to is not None and save_to.suffix.lower() != ".jsonl":
        raise ValueError(f"--save-predictions {save_to}: write predictions to a .jsonl file")
    kwargs["save_predictions"] = save_to is not None
    config = sweep.SweepConfig(**kwargs)
    check_models(config.model, config.revisions)
    log = CellLog(out, config) if out is not None else None
    done: dict = {}
    loaded: tuple[str, Any] = ("ok", ({}, []))
    if log is not None and lead:
        try:
            loaded = ("ok", log.load(opts["resume"]))
        except ValueError as exc:
            loaded = ("error", str(exc))
    if shard is not None:
        loaded = shard.broadcast(loaded)  # type: ignore[assignment]
    if loaded[0] == "error":
        raise ValueError(loaded[1])
    done, notes = loaded[1]
    for note in notes if lead else []:
        stderr.print(f"note: {note}", highlight=False, soft_wrap=True)
    on_cell = log.append if (log is not None and lead) else None
    as_json = opts["as_json"]
    with progress_bar(lead and not as_json) as progress:
        result = sweep.run(config, _rated(progress), done=done, on_cell=on_cell, shard=shard)
    if not lead:
        return
    written = [] if out is None else _write_outputs(result, out)
    if save_to is not None:
        written.append(_write_predictions(result, save_to))
    if written and not as_json:
        stderr.print("wrote " + ", ".join(str(p) for p in written), highlight=False)
    emit(result, as_json=as_json, out=None, tables=_sweep_tables)
    sys.stdout.flush()
