"""Wall-clock timing of a run's stages, honest on a GPU: a stage's time is taken after the device has finished
the work the stage queued (CUDA runs asynchronously). The command line's timings use it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def timed(times: dict[str, float], key: str, device=None) -> Iterator[None]:
    """Add the block's wall time (seconds, 4 decimals) to `times[key]`; on a CUDA `device`, after synchronizing."""
    start = time.perf_counter()
    yield
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
    times[key] = round(times.get(key, 0.0) + time.perf_counter() - start, 4)
