"""The HIE-Bench web app (Streamlit): leaderboard, comparisons, per-case errors, submissions, datasets.

``streamlit run app.py`` starts it; ``app.py`` at the repository root only sets the page up and hands
over to :func:`bench.app.ui.run_app`, which declares the pages (files in :mod:`bench.app.pages`) with
``st.navigation``. The app reads the results database and nothing else; everything it shows comes from
:mod:`bench.store` (per-case rows) and :mod:`bench.stats` (confidence intervals, ranks, tests), with
metric names, units and directions from :data:`bench.metrics.METRICS`.

Modules:

:mod:`~bench.app.source`
    Which database and folders the app uses (:class:`~bench.app.source.AppSource`).
:mod:`~bench.app.queries`
    Plain functions from a :class:`~bench.store.Store` to the tables each page shows (no Streamlit,
    tested directly and timed by :mod:`bench.perf.fill`).
:mod:`~bench.app.viewer`
    Slice rendering: ADC / Z-ADC with true-positive, false-positive and false-negative voxels.
:mod:`~bench.app.uploads`
    Turning an uploaded zip into a verified submission folder and a queued job.
:mod:`~bench.app.ui`
    Streamlit glue shared by the pages: cached queries, the sidebar, widgets, the empty state.
:mod:`~bench.app.perf`
    The Streamlit half of ``bench perf app``: server time of the leaderboard page in AppTest.

The sample results database of the app's tests (synthetic data, real predictions) is made by
:mod:`bench.perf.fill`, with the other dev-only fillers.

Only this package imports Streamlit; the job worker that runs queued submissions is :mod:`bench.worker`.
"""
