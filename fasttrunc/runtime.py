"""Process-wide runtime settings that runs change and must give back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def cpu_threads(n: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads when ``device`` is a CPU, then restore.

    The toy models' matrices are at most a few hundred wide: too small for intra-op threads to
    pay, and on a busy 2-core machine their synchronisation made steps 4-30x slower (measured by
    each experiment). On other devices the block runs unchanged.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
