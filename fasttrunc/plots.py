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


# --- Pythia / LASER sweeps ---------------------------------------------------------------------
