"""How fast the leaderboard page renders from a large results database.

:func:`time_leaderboard_page` fills a temporary SQLite database with ``n_rows`` per-case rows through
the :class:`~bench.store.Store` API (``n_submissions`` runs over ``n_rows / n_submissions`` cases of
``n_sites`` sites, every metric of :data:`bench.metrics.METRICS`), then measures:

``data_path_s``
    What the page computes on a cold cache, called directly: the data version, the list of scopes, the
    per-case frame (one query) and the leaderboard (:func:`bench.stats.leaderboard`: means, bootstrap
    CIs, ranks, rank stability) for the page's default metrics.
``query_s`` / ``stats_s``
    The two big parts of it: reading the per-case rows, and the statistics.
``page_cold_s``
    Server time of one run of the leaderboard page in Streamlit's AppTest with empty caches (modules
    already imported, as in a running server).
``page_warm_s``
    The same page again: what every later view costs (cached queries).

Run it with ``bench perf app [--rows N]`` (or ``python -m bench.app.perf [n_rows]``).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bench.report import DEFAULT_METRICS

#: Metrics the leaderboard page shows by default (those of `bench leaderboard`; the first ranks).
PAGE_METRICS: tuple[str, ...] = DEFAULT_METRICS


def fill_database(db_url: str, n_rows: int, *, n_submissions: int = 50, n_sites: int = 4, seed: int = 0) -> int:
    """Write ``n_rows`` plausible per-case rows (one LOSO run per submission) into an empty database; returns the row count."""
    from bench.metrics import METRICS
    from bench.store import Store

    rng = np.random.default_rng(seed)
    n_cases = max(1, n_rows // n_submissions)
    store = Store(db_url)
    store.create_all()
    cases = [SimpleNamespace(case_id=f"case{c:06d}", site=f"site{c % n_sites}", metadata={}) for c in range(n_cases)]
    store.upsert_dataset(SimpleNamespace(name="perf", version="perf-v1", root="", channel_names=("ADC", "Z-ADC"), cases=cases))
    for s in range(n_submissions):
        content_hash = f"{s:064x}"
        store.upsert_submission(content_hash=content_hash, name=f"model-{s:03d}", version="1", kind="predictions")
        run_id = f"run-{s:04d}"
        store.start_run(run_id=run_id, submission=content_hash, dataset="perf-v1", protocol="loso")
        skill = rng.uniform(0.3, 0.8)
        values = {key: _values(info, skill, rng, n_cases) for key, info in METRICS.items()}
        rows = [
            {"run_id": run_id, "case_id": case.case_id, "site": case.site, "fold": f"loso-{case.site}", "status": "ok", **{k: v[c] for k, v in values.items()}}
            for c, case in enumerate(cases)
        ]
        store.record_case_results(rows)
        store.finish_run(run_id)
    store.dispose()
    return n_cases * n_submissions


def _values(info, skill: float, rng: np.random.Generator, n: int) -> list[float]:
    """Plausible values of one metric for a submission of some skill (0..1), with 2% infinite distances."""
    if info.range == (0.0, 1.0):
        return np.clip(rng.normal(skill, 0.15, n), 0.0, 1.0).tolist()
    values = np.abs(rng.normal(10.0 * (1.0 - skill), 3.0, n))
    if info.inf_cap is not None:
        values[rng.random(n) < 0.02] = math.inf
    return values.tolist()


def time_leaderboard_page(n_rows: int = 100_000, *, n_submissions: int = 50, n_sites: int = 4, db_url: str | None = None, repeats: int = 3) -> dict[str, float]:
    """Fill a database with ``n_rows`` per-case rows and time the leaderboard page (see the module docstring).

    Every timing is the best of ``repeats`` (the machine may be busy); returns seconds and ``rows``.
    """
    with tempfile.TemporaryDirectory(prefix="hie-bench-app-perf-") as folder:
        url = db_url or f"sqlite:///{folder}/bench.db"
        started = time.perf_counter()
        rows = fill_database(url, n_rows, n_submissions=n_submissions, n_sites=n_sites)
        fill_s = time.perf_counter() - started
        timings = {"rows": float(rows), "fill_s": fill_s}
        timings |= _time_data_path(url, repeats)
        timings |= _time_page(url, repeats)
    return timings


def _time_data_path(url: str, repeats: int) -> dict[str, float]:
    from bench.app import queries
    from bench.app.ui import N_BOOT
    from bench.store import Store

    best: dict[str, float] = {}
    for _ in range(repeats):
        store = Store(url)  # a fresh engine: nothing cached in this process
        started = time.perf_counter()
        queries.data_version(store)
        scope = queries.scopes(store).iloc[0]
        query_started = time.perf_counter()
        frame = queries.case_frame(store, scope["dataset_version"], scope["protocol"], scope["convention"], PAGE_METRICS, details=False)
        stats_started = time.perf_counter()
        board = queries.leaderboard(frame, PAGE_METRICS, n_boot=N_BOOT)
        finished = time.perf_counter()
        assert len(board) > 0
        for key, value in (("data_path_s", finished - started), ("query_s", stats_started - query_started), ("stats_s", finished - stats_started)):
            best[key] = min(best.get(key, math.inf), value)
        store.dispose()
    return best


def _time_page(url: str, repeats: int) -> dict[str, float]:
    """Server time of the leaderboard page in AppTest: cold caches, then warm."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    app = Path(__file__).resolve().parents[2] / "app.py"
    previous = os.environ.get("HIE_BENCH_DB_URL")
    os.environ["HIE_BENCH_DB_URL"] = url
    try:
        # One AppTest session, run once first: imports, page registration and AppTest's own set-up
        # (component discovery) are not server time of a page view.
        at = AppTest.from_file(str(app), default_timeout=120).run()
        cold = warm = math.inf
        for _ in range(repeats):
            st.cache_data.clear()
            st.cache_resource.clear()
            started = time.perf_counter()
            at.run()
            cold = min(cold, time.perf_counter() - started)
            if at.exception:
                raise RuntimeError(at.exception[0].value)
            started = time.perf_counter()
            at.run()
            warm = min(warm, time.perf_counter() - started)
    finally:
        if previous is None:
            os.environ.pop("HIE_BENCH_DB_URL", None)
        else:
            os.environ["HIE_BENCH_DB_URL"] = previous
    return {"page_cold_s": cold, "page_warm_s": warm}


def print_timings(result: dict[str, float]) -> None:
    """Print the timings of :func:`time_leaderboard_page`, one per line."""
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:,.0f}" if key == "rows" else f"{key:<{width}}  {value:.3f} s")


if __name__ == "__main__":  # pragma: no cover
    print_timings(time_leaderboard_page(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
