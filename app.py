"""HIE-Bench web app: ``streamlit run app.py`` (``make app`` opens it on the demo's results).

Pages (in ``bench/app/pages/``): Leaderboard, Compare, Cases, Submit, Datasets. The app reads the
results database of :class:`bench.settings.BenchSettings` (``HIE_BENCH_DB_URL``, else
``<HIE_BENCH_RESULTS_DIR>/bench.db``, default ``results/bench.db``); pick another one with
``streamlit run app.py -- --db PATH_OR_URL`` or ``?db=PATH_OR_URL`` in the address. Queued runs are
processed by ``bench worker`` started beside the app. See docs/app.md.
"""

from bench.app.ui import argv_for_app, run_app

run_app(argv_for_app())
