"""The selection rules as plain constants (no torch), so the command line can state them in ``--help``."""

from __future__ import annotations

LOWER_IS_BETTER = frozenset({"log_loss"})
TIE_BREAK = {"accuracy": "log_loss"}  # LASER: equal accuracy, lower log-loss wins
SPLIT_MODES = ("shuffled", "laser")
# Denominator floor of the relative scores: a baseline of 0 (accuracy 0) would divide by zero.
RELATIVE_FLOOR = 1e-3

SELECT_TASKS_RULE = (
    "several tasks choose one cell by the mean over tasks of (score - baseline) / max(|baseline|, 1e-3), "
    "the score oriented so that higher is better (log-loss negated); accuracy ties are broken the same "
    "way on log-loss"
)
