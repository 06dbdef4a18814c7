"""Shared helpers of the speed benchmarks: thread pinning, CPU timing, printing a result table."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")


# ---------------------------------------------------------------------------
# Shared measurement helpers
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def single_thread(*, torch: bool = False) -> Iterator[str]:
    """Limit BLAS/OpenMP pools (threadpoolctl) and, with ``torch=True``, torch to one thread.

    Yields a sentence describing what was pinned, for the report. Torch is imported
    only when asked for (it takes seconds).
    """
    from threadpoolctl import threadpool_limits

    pinned = ["BLAS/OpenMP pools limited to 1 thread (threadpoolctl)"]
    with threadpool_limits(limits=1), contextlib.ExitStack() as restore:
        if torch:
            import torch as torch_module

            restore.callback(torch_module.set_num_threads, torch_module.get_num_threads())
            torch_module.set_num_threads(1)
            pinned.append("torch.set_num_threads(1)")
        yield "; ".join(pinned)


def median_cpu_ms(function: Callable[[], T], repeats: int) -> tuple[float, T]:
    """Median CPU time of ``repeats`` calls in milliseconds, and the last result.

    CPU time of the whole process (``time.process_time``): with every pool pinned to
    one thread it equals the wall time on an idle machine, and unlike the wall time
    it does not grow when other jobs share the cores.
    """
    times = []
    for _ in range(max(1, repeats)):
        start = time.process_time()
        result = function()
        times.append(time.process_time() - start)
    return 1000.0 * statistics.median(times), result


def print_frame(frame: pd.DataFrame, title: str, columns: dict[str, str], caption: str = "") -> None:
    """Print selected columns of a frame as a rich table (``columns``: name -> header)."""
    import pandas as pd
    from rich.table import Table

    from bench.report import table_console

    table = Table(title=title, caption=caption, caption_justify="left")
    for name, header in columns.items():
        numeric = pd.api.types.is_numeric_dtype(frame[name]) and not pd.api.types.is_bool_dtype(frame[name])
        table.add_column(header, justify="right" if numeric else "left")
    for _, row in frame.iterrows():
        table.add_row(*(_format_cell(row[name]) for name in columns))
    table_console().print(table)  # full width when piped or redirected (friction item 6)


def _format_cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
