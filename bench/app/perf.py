"""Server time of the app's leaderboard page in Streamlit's AppTest (the Streamlit half of ``bench perf app``).

The database filling and the rest of the timing live in :mod:`bench.perf.fill`
(:func:`~bench.perf.fill.time_leaderboard_page`); only the part that needs Streamlit is here, since
only ``bench/app/`` imports Streamlit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: The app's entry point, run by AppTest.
APP = Path(__file__).resolve().parents[2] / "app.py"


def time_page(url: str, repeats: int) -> dict[str, float]:
    """Server time of the leaderboard page on the database at ``url``: ``page_cold_s`` (caches cleared
    before each run; modules already imported, as in a running server) and ``page_warm_s`` (the same
    page again: what every later view costs), each the best of ``repeats``."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    previous = os.environ.get("HIE_BENCH_DB_URL")
    os.environ["HIE_BENCH_DB_URL"] = url
    try:
        # One AppTest session, run once first: imports, page registration and AppTest's own set-up
        # (component discovery) are not server time of a page view.
        at = AppTest.from_file(str(APP), default_timeout=120).run()
        cold = warm = math.inf
        for _ in range(repeats):
            st.cache_data.clear()
            st.cache_resource.clear()
            cold = min(cold, _timed_run(at))
            if at.exception:
                raise RuntimeError(at.exception[0].value)
            warm = min(warm, _timed_run(at))
    finally:
        if previous is None:
            os.environ.pop("HIE_BENCH_DB_URL", None)
        else:
            os.environ["HIE_BENCH_DB_URL"] = previous
    return {"page_cold_s": cold, "page_warm_s": warm}


def _timed_run(at) -> float:
    import time

    started = time.perf_counter()
    at.run()
    return time.perf_counter() - started
