"""Every plot fasttrunc draws (matplotlib, Agg backend, imported only when a plot is made).

One section per experiment; each function takes a result object and an output directory and
returns the paths of the PNG files it wrote.
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


# --- noisy in-context recall -------------------------------------------------------------------


# --- associative memory ------------------------------------------------------------------------


def plot_memory(result, out: Path) -> list[Path]:
    """memory_dynamics.png (spectrum, noise share, predictions over steps), memory_truncation.png."""
    return [_memory_dynamics(result, Path(out)), _memory_truncation(result, Path(out))]


def _memory_dynamics(result, out: Path) -> Path:
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
        ax_p.plot(steps, metrics["p_noise"], "C3" + style, label=f"{name}: P(noise)")
        ax_p.plot(steps, metrics["accuracy"], "C0" + style, label=f"{name}: clean accuracy")
    ax_p.set(xlabel="step", ylabel="on clean data", ylim=(-0.02, 1.02), title="Predictions of W and its truncations")
    ax_p.legend(fontsize=7)
    for ax in (ax_s, ax_n, ax_p):
        ax.set_xscale("symlog", linthresh=max(1, result.config.record_every))
        ax.set_xlim(0, steps[-1])
    return _save(fig, out / "memory_dynamics.png")


def _memory_truncation(result, out: Path) -> Path:
    plt = _pyplot()
    final = result.summary["final"]
    names = list(final)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names)), 4.2))
    width = 0.27
    for j, (metric, label) in enumerate((("accuracy", "clean accuracy"), ("p_clean", "P(f(x))"), ("p_noise", "P(noise)"))):
        ax.bar([i + (j - 1) * width for i in x], [final[n][metric] for n in names], width, label=label)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set(ylabel="on clean data", ylim=(0, 1.02), title=f"After step {result.steps[-1]}: which truncation restores the clean map")
    ax.legend(fontsize=8)
    return _save(fig, out / "memory_truncation.png")


# --- Pythia / LASER sweeps ---------------------------------------------------------------------
