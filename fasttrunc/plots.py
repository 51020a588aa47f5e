"""Every plot fasttrunc draws (matplotlib, Agg backend, imported only when a plot is made).

One section per experiment; each function takes a result object and an output directory and
returns the paths of the PNG files it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for annotations only: plots sit below the experiments and import none of them
    from fasttrunc.experiments.memory import MemoryResult
    from fasttrunc.experiments.pythia import PythiaResult
    from fasttrunc.experiments.recall import RecallResult
    from fasttrunc.experiments.sweep import SweepResult
    from fasttrunc.tasks.metrics import TaskMetrics


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


# --- noisy in-context recall -------------------------------------------------------------------


def plot_recall_truncation(result: RecallResult, path: Path) -> Path:
    """Accuracy, P(noise) and both FF2 probes against rho, one line per truncated matrix, the full model dashed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    panels = (
        (axes[0], "accuracy", "accuracy of ybar"),
        (axes[1], "p_noise", "mean P(noise)"),
        (axes[2], "ff2_probe_embedding", "FF2 probe (embedding): noise margin"),
        (axes[3], "ff2_probe_residual", "FF2 probe (residual): noise margin"),
    )
    for ax, key, label in panels:
        for matrix in dict.fromkeys(c.matrix for c in result.cells):
            cells = sorted((c for c in result.cells if c.matrix == matrix), key=lambda c: c.rho)
            ax.plot([c.rho for c in cells], [getattr(c.metrics, key) for c in cells], marker="o", label=matrix)
        ax.axhline(getattr(result.full, key), color="black", linestyle="--", linewidth=1, label="full model")
        ax.set_xlabel("rho (fraction of rank kept)")
        ax.set_ylabel(label)
        if key in ("accuracy", "p_noise"):
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    cfg = result.config
    fig.suptitle(
        f"Noisy in-context recall: truncating one matrix ({cfg.data} data, {cfg.init} unembedding, "
        f"clean test data, alpha {cfg.alpha:g})"
    )
    return _save(fig, path)


def plot_recall_dynamics(result: RecallResult, path: Path) -> Path:
    """Training curves on clean data: accuracy, P(noise), FF2's share of the noise, attention mass, probe."""
    plt = _pyplot()
    dyn = result.dynamics
    if dyn is None:
        raise ValueError("the run has no dynamics to plot; run it with track_every")
    series, appears = dyn.series, dyn.appears
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (
        (axes[0], ("accuracy_full", "accuracy_no_ff2"), "accuracy of ybar"),
        (
            axes[1],
            ("p_noise_full", "p_noise_no_ff2", "ff2_noise_share", "attention_mass"),
            "probability / attention mass",
        ),
        (axes[2], ("ff2_probe_embedding", "ff2_probe_residual"), "FF2 probes: noise logit margin"),
    )
    for ax, names, ylabel in panels:
        for name in names:
            (line,) = ax.plot(dyn.steps, getattr(series, name), label=name)
            step = getattr(appears, name)
            if step is not None:
                ax.axvline(step, color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    first = {True: "yes", False: "no", None: "undecided"}[dyn.ff2_noise_before_in_context]
    fig.suptitle(
        f"Training dynamics (dotted: step where each curve has risen half way to its final value); FF2 noise first: {first}"
    )
    return _save(fig, path)


# --- associative memory ------------------------------------------------------------------------


def plot_memory(result: MemoryResult, out: Path) -> list[Path]:
    """memory_dynamics.png (spectrum, noise share, predictions over steps), memory_truncation.png."""
    return [_memory_dynamics(result, Path(out)), _memory_truncation(result, Path(out))]


def _memory_dynamics(result: MemoryResult, out: Path) -> Path:
    plt = _pyplot()
    steps = result.steps
    fig, (ax_s, ax_n, ax_p) = plt.subplots(1, 3, figsize=(15, 4.2))
    n_lines = min(4, len(result.singular_values[0]))
    for i in range(n_lines):
        ax_s.plot(steps, [row[i] for row in result.singular_values], label=f"$\\sigma_{i + 1}$")
    mid = min(result.config.d, result.config.n_tokens) // 2  # a typical clean association's value
    ax_s.plot(steps, [row[mid] for row in result.singular_values], "k:", label=f"$\\sigma_{{{mid + 1}}}$")
    ax_s.set(xlabel="step", ylabel="singular value of W", title="Spectrum of W")
    ax_s.legend(fontsize=8)
    for i in range(min(3, len(result.noise_share[0]))):
        ax_n.plot(steps, [row[i] for row in result.noise_share], label=f"component {i + 1}: share")
    ax_n.plot(steps, [row[0] for row in result.noise_alignment], "k--", label="component 1: alignment")
    ax_n.set(xlabel="step", ylabel="fraction", title="Noise association per singular component")
    ax_n.legend(fontsize=8)
    k = result.config.ks[0]
    styles = {"full": "-", f"remove_top_{k}": "--", f"keep_top_{k}": ":"}
    for name, style in styles.items():
        metrics = result.metrics[name]
        ax_p.plot(steps, metrics.p_noise, "C3" + style, label=f"{name}: P(noise)")
        ax_p.plot(steps, metrics.accuracy, "C0" + style, label=f"{name}: clean accuracy")
    ax_p.set(xlabel="step", ylabel="on clean data", ylim=(-0.02, 1.02), title="Predictions of W and its truncations")
    ax_p.legend(fontsize=7)
    for ax in (ax_s, ax_n, ax_p):
        ax.set_xscale("symlog", linthresh=max(1, result.config.record_every))
        ax.set_xlim(0, steps[-1])
    return _save(fig, out / "memory_dynamics.png")


def _memory_truncation(result: MemoryResult, out: Path) -> Path:
    plt = _pyplot()
    final = result.summary.final
    names = list(final)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names)), 4.2))
    width = 0.27
    bars = (
        ("clean accuracy", [final[n].accuracy for n in names]),
        ("P(f(x))", [final[n].p_clean for n in names]),
        ("P(noise)", [final[n].p_noise for n in names]),
    )
    for j, (label, heights) in enumerate(bars):
        ax.bar([i + (j - 1) * width for i in x], heights, width, label=label)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set(
        ylabel="on clean data",
        ylim=(0, 1.02),
        title=f"After step {result.steps[-1]}: which truncation restores the clean map",
    )
    ax.legend(fontsize=8)
    return _save(fig, out / "memory_truncation.png")


# --- Pythia / LASER sweeps ---------------------------------------------------------------------


_CHECKPOINT_SERIES = (("mean_p_correct", "P(correct)"), ("mean_p_the", 'P(" the")'), ("mean_p_subject", "P(S)"))


def _checkpoint_lines(
    revisions: list[str],
    before: list[TaskMetrics],
    after: list[TaskMetrics],
    after_label: str,
    title: str,
    path: Path,
) -> Path:
    """P(correct), P(" the"), P(S) per checkpoint, solid without and dashed with the truncation."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = list(range(len(revisions)))
    for (key, label), color in zip(_CHECKPOINT_SERIES, ("tab:green", "tab:red", "tab:blue")):
        base = [getattr(m, key) for m in before]
        if any(v is None for v in base):
            continue
        ax.plot(x, base, "o-", color=color, label=f"{label} baseline")
        ax.plot(x, [getattr(m, key) for m in after], "s--", color=color, label=f"{label} {after_label}")
    ax.set_xticks(x, revisions, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("mean probability")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _pythia_along_training(result: PythiaResult, title: str, path: Path) -> Path:
    """P(" the"), P(correct), IO>S (top-1 for factual) and P(correct)/P(" the") per checkpoint,
    solid before and dashed after the truncation; a log step axis when every revision is stepN."""
    import re

    plt = _pyplot()
    revs = result.revisions
    names = [r.revision or "default" for r in revs]
    steps = [re.fullmatch(r"step(\d+)", n) for n in names]
    by_step = all(steps)
    x = [int(m.group(1)) for m in steps if m] if by_step else list(range(len(revs)))
    first = revs[0].baseline
    assert first is not None  # pythia_plots draws the built-in task only
    accuracy = "logit_diff_accuracy" if first.logit_diff_accuracy is not None else "accuracy"
    panels = (
        ("mean_p_the", 'mean P(" the")'),
        ("mean_p_correct", "mean P(correct)"),
        (accuracy, "IO > S accuracy" if accuracy == "logit_diff_accuracy" else "top-1 accuracy"),
        ("ratio_of_means", 'P(correct) / P(" the") (ratio of means)'),
    )
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(x, [getattr(r.baseline, key) for r in revs], "o-", color="tab:blue", label="baseline")
        ax.plot(x, [getattr(r.truncated, key) for r in revs], "s--", color="tab:red", label="truncated")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "ratio_of_means":
            ax.set_yscale("log")
        if by_step:
            ax.set_xscale("log")
            ax.set_xlabel("training step")
        else:
            ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
            ax.set_xlabel("checkpoint")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}, along training", fontsize=10)
    return _save(fig, path)


def pythia_plots(result: PythiaResult, out: Path) -> list[Path]:
    """Bars of baseline vs truncated for one revision; lines along checkpoints for several.

    Drawn for the built-in task (ioi, factual); task files' metrics are in the tables and results.json.
    """
    cfg = result.config
    revs = result.revisions
    task = cfg.builtin_task
    if task is None:
        return []
    title = f"{task}: {cfg.edit_label()}"
    if len(revs) > 1:
        return [_pythia_along_training(result, title, out / f"pythia_{task}_checkpoints.png")]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    series = [(label, key) for key, label in _CHECKPOINT_SERIES if getattr(revs[0].baseline, key) is not None]
    x = list(range(len(series)))
    ax.bar([i - 0.2 for i in x], [getattr(revs[0].baseline, k) for _, k in series], width=0.4, label="baseline")
    ax.bar([i + 0.2 for i in x], [getattr(revs[0].truncated, k) for _, k in series], width=0.4, label="truncated")
    ax.set_xticks(x, [label for label, _ in series])
    ax.set_ylabel("mean probability")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return [_save(fig, out / f"pythia_{task}.png")]


def _file_name(task: str) -> str:
    """A task's name in a file name: a task file by its stem."""
    return Path(task).stem if task.lower().endswith((".jsonl", ".csv")) else task


def _number(value: object) -> float:
    return float("nan") if value is None else float(value)  # type: ignore[arg-type]


def sweep_plots(result: SweepResult, out: Path) -> list[Path]:
    """One heatmap per task and revision (cells x ranks, selection metric); lines along checkpoints."""
    plt = _pyplot()
    cfg = result.config
    paths = []
    for rev in result.revisions:
        rows = list(dict.fromkeys((c.layer, c.matrix, c.kind) for c in rev.cells))
        kinds = len({row[2] for row in rows}) > 1
        suffix = f"_{rev.revision}" if rev.revision else ""
        for task in cfg.tasks:
            metric = cfg.metric_for(task)
            grid = [
                [_number(getattr(c.select[task], metric)) for c in rev.cells if (c.layer, c.matrix, c.kind) == row]
                for row in rows
            ]
            fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cfg.ranks), 1.2 + 0.3 * len(rows)))
            image = ax.imshow(grid, aspect="auto", cmap="viridis")
            fig.colorbar(image, ax=ax, label=metric)
            ax.set_xticks(range(len(cfg.ranks)), [str(r) for r in cfg.ranks], fontsize=8)
            labels = [f"L{layer} {matrix}" + (f" {kind}" if kinds else "") for layer, matrix, kind in rows]
            ax.set_yticks(range(len(rows)), labels, fontsize=7)
            ax.set_xlabel("rank (kept; removed for remove-top)" if kinds else "rank kept")
            base = getattr(rev.baseline_select[task], metric)
            ax.set_title(
                f"{task} {rev.revision or ''}: {metric} on the selection prompts (baseline {base:.3g})",
                fontsize=9,
            )
            paths.append(_save(fig, out / f"sweep_{_file_name(task)}{suffix}.png"))
    if len(result.revisions) > 1:
        names = [r.revision or "default" for r in result.revisions]
        for task in result.revisions[0].best:
            if not hasattr(result.revisions[0].best[task].report, "mean_p_correct"):
                continue  # the checkpoint lines plot the paper's metrics
            before = [r.best[task].baseline_report for r in result.revisions]
            after = [r.best[task].report for r in result.revisions]
            title = f"{task}: baseline vs the best cell of each checkpoint (report prompts)"
            target = out / f"sweep_{_file_name(task)}_checkpoints.png"
            paths.append(_checkpoint_lines(names, before, after, "best cell", title, target))  # type: ignore[arg-type]
    return paths
