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

from fasttrunc.cli._common import INT_RULES, check_models, emit, fail, make_table, progress_bar, ranged_int, stderr
from fasttrunc.cli.apps import sweep_app
from fasttrunc.cli.pythia import (
    BATCH_OPT,
    DEVICE_OPT,
    DTYPE_OPT,
    JSON_OPT,
    METHOD_OPT,
    METRIC_ROWS,
    MODEL_OPT,
    N_HELP,
    REVISION_OPT,
    REVISIONS_OPT,
    SEED_OPT,
    _fmt,
    parse_layers,
    parse_revisions,
    split_list,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.table import Table

    from fasttrunc.experiments.sweep import SweepResult


def _sweep_tables(result: SweepResult) -> list[Table]:
    cfg = result.config
    tables = []
    for rev in result.revisions:
        for task, best in rev.best.items():
            title = (
                f"{cfg.model} {rev.revision or ''} {task}: best cell on {rev.n_select[task]} selection prompts "
                f"(by {cfg.select_by}) = layer {best.layer} {best.matrix} rank {best.rank}; "
                f"reported on the other {rev.n_report[task]}"
            )
            rows = [
                [label, _fmt(getattr(best.baseline_report, key)), _fmt(getattr(best.report, key))]
                for label, key in METRIC_ROWS
            ]
            tables.append(make_table(title, ["metric", "baseline", "best cell"], rows))
            grid_rows = []
            for row_key in dict.fromkeys((c.layer, c.matrix) for c in rev.cells):
                cells = [c for c in rev.cells if (c.layer, c.matrix) == row_key]
                grid_rows.append(
                    [f"L{row_key[0]} {row_key[1]}"]
                    + [_grid_value(getattr(c.select[task], cfg.select_by), c.evaluated) for c in cells]
                )
            grid_title = f"{task}: {cfg.select_by} on the selection prompts (baseline {getattr(rev.baseline_select[task], cfg.select_by):.4f})"
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


def _write_outputs(result: SweepResult, out: Path) -> list[Path]:
    """results.json and the plots, each written beside its place and renamed onto it."""
    import json

    from fasttrunc.plots import sweep_plots
    from fasttrunc.runs import atomic_write_text

    written = [atomic_write_text(out / "results.json", json.dumps(result.to_dict(), indent=2) + "\n")]
    with tempfile.TemporaryDirectory(dir=out, prefix=".plots-") as tmp:
        for path in sweep_plots(result, Path(tmp)):
            os.replace(path, out / path.name)
            written.append(out / path.name)
    return written


@sweep_app.command("pythia")
def sweep_pythia(
    model: str = MODEL_OPT,
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
    task: str = typer.Option("ioi", "--task", help="Tasks, comma-separated: ioi, factual."),
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
    select_by: str = typer.Option(
        "mean_p_correct",
        "--select-by",
        help="The selection metric: mean_p_correct, accuracy, mean_of_ratios, ratio_of_means or mean_logit_diff.",
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
    config = sweep.SweepConfig(
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
        cache_budget_mb=opts["cache_budget"],
        search=opts["search"],
        keep=opts["keep"],
    )
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
    if out is not None:
        written = _write_outputs(result, out)
        if not as_json:
            stderr.print("wrote " + ", ".join(str(p) for p in written), highlight=False)
    emit(result, as_json=as_json, out=None, tables=_sweep_tables)
    sys.stdout.flush()
