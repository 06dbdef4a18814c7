"""Speed benchmarks (``bench perf <command>``): measured against the anchors, in the same run.

Each benchmark builds its workload itself, measures HIE-Bench beside the reference implementation on the
same inputs, checks that they agree, and returns a ``pandas.DataFrame`` (tested at tiny sizes); the
commands in :mod:`bench.cli.perf` only parse options and print. Speed claims live here, never in timed
unit tests.

- :mod:`bench.perf.metrics`: the metric engine against medpy, MONAI and surface-distance.
- :mod:`bench.perf.harness`: the harness's own per-case overhead beyond the predictor's time.
- :mod:`bench.perf.models`: training and inference speed of every entrant beside nnU-Net's predictor.
- :mod:`bench.perf.sandbox`: the demo's benchmark with and without the prediction sandbox.
- :mod:`bench.gpu_check`: the GPU check.
- :mod:`bench.perf.fill`: synthetic results databases (tests, demos) and the leaderboard's and the app
  page's timings (:mod:`bench.app.perf` holds the Streamlit half).
"""

from bench.perf.common import median_cpu_ms, print_frame, single_thread

__all__ = ["median_cpu_ms", "print_frame", "single_thread"]
