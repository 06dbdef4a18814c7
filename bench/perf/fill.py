"""Synthetic results for tests, demos and timings: dev-only, never imported by the library.

Three kinds of filled database, and the timings that use them (``bench perf leaderboard``, ``bench perf
app``):

:func:`build_sample_results` / :func:`sample_results`
    A small but *real* results database: a ``tiny`` synthetic dataset
    (:func:`bench.data.synth.generate_synthetic_dataset`) benchmarked with :func:`bench.harness.run_benchmark`
    under both protocols by three submissions, so the app's viewer has real masks. What the app's,
    the browser's and the worker's tests run against, and a quick way to look at the app::

        python -m bench.perf.fill /tmp/hie-sample        # then:
        HIE_BENCH_DB_URL=sqlite:////tmp/hie-sample/bench.db streamlit run app.py

    ``zadc-threshold``: the BONBID-HIE baseline (``kind: python``), the repository's
    ``submissions/zadc-threshold``. ``shifted-reference`` (``kind: predictions``): each reference mask
    moved by one voxel, with the smallest lesion of every other case dropped (misses) and a
    false-positive blob in every third case: a good model with every kind of error. ``largest-lesion``
    (``kind: predictions``): only the largest lesion, grown by one voxel; an empty mask for one case and
    no mask at all for another (a failed case): a weak model.
:func:`fill_synthetic_results`
    Plausible random per-case rows (no images) of submissions of increasing skill under several
    protocols, with lesion rows if asked: the leaderboard's and the report's tests.
:func:`fill_database`
    Many rows fast (one LOSO run per submission, vectorized): the app's page timing.

:func:`time_leaderboard` times :func:`bench.report.leaderboard_table` on a database of ``n_rows``
per-case rows; :func:`time_leaderboard_page` times what the app's leaderboard page computes:

``data_path_s``
    What the page computes on a cold cache, called directly: the data version, the list of scopes, the
    per-case frame (one query) and the leaderboard (:func:`bench.stats.leaderboard`: means, bootstrap
    CIs, ranks, rank stability) for the page's default metrics.
``query_s`` / ``stats_s``
    The two big parts of it: reading the per-case rows, and the statistics.
``page_cold_s`` / ``page_warm_s``
    Server time of one run of the leaderboard page in Streamlit's AppTest with empty caches, then again
    with warm ones (:func:`bench.app.perf.time_page`: Streamlit stays inside ``bench/app/``).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.constants import CROSS_VALIDATION_PROTOCOLS
from bench.report import DEFAULT_METRICS

if TYPE_CHECKING:
    from bench.store import Store

__all__ = [
    "PAGE_METRICS",
    "SAMPLE_DATASET",
    "SampleResults",
    "build_sample_results",
    "fill_database",
    "fill_synthetic_results",
    "print_timings",
    "sample_results",
    "time_leaderboard",
    "time_leaderboard_page",
]

#: Metrics the leaderboard page shows by default (those of `bench leaderboard`; the first ranks).
PAGE_METRICS: tuple[str, ...] = DEFAULT_METRICS


# -- the sample: real harness runs on a tiny synthetic dataset ----------------------------------------------------

#: Name of the sample dataset folder.
SAMPLE_DATASET = "hie-synth-sample"
#: The repository's baseline submission, used when the package runs from a checkout.
BASELINE = Path(__file__).resolve().parents[2] / "submissions" / "zadc-threshold"


@dataclass(frozen=True)
class SampleResults:
    """Paths of a sample built by :func:`build_sample_results`."""

    root: Path
    dataset: Path
    submissions: dict[str, Path]
    results_dir: Path
    db_url: str
    run_ids: tuple[str, ...]


def build_sample_results(root: str | Path, *, cases: int = 8, sites: int = 2, folds: int = 2, seed: int = 0, size: str = "tiny") -> SampleResults:
    """Generate the dataset, write the submissions and run the benchmark into ``root/bench.db``.

    Idempotent: an existing dataset and submissions are reused and the harness skips stored cases.
    """
    from bench.data.dataset import Dataset
    from bench.data.synth import generate_synthetic_dataset
    from bench.harness import RunSpec, run_benchmark

    root = Path(root).resolve()
    dataset_dir = root / "datasets" / SAMPLE_DATASET
    if (dataset_dir / "dataset.json").is_file():
        dataset = Dataset.load(dataset_dir)
    else:
        dataset = generate_synthetic_dataset(dataset_dir, cases=cases, sites=sites, seed=seed, size=size, workers=1, folds=folds)
    submissions_dir = root / "submissions"
    submissions = {
        "zadc-threshold": _baseline(submissions_dir),
        "shifted-reference": _predictions_submission(submissions_dir, "shifted-reference", dataset, _shifted_reference, "each reference mask moved by one voxel, some lesions dropped, some false positives"),
        "largest-lesion": _predictions_submission(submissions_dir, "largest-lesion", dataset, _largest_lesion, "only the largest lesion, grown by one voxel; one empty and one missing mask"),
    }
    results_dir = root / "results"
    db_url = f"sqlite:///{(root / 'bench.db').as_posix()}"
    specs = [
        RunSpec(submission=path, dataset=dataset_dir, protocol=protocol, folds=folds, seed=seed, results_dir=results_dir, db_url=db_url)
        for path in submissions.values()
        for protocol in CROSS_VALIDATION_PROTOCOLS
    ]
    by_run = run_benchmark(specs)
    return SampleResults(root, dataset_dir, submissions, results_dir, db_url, tuple(by_run))


def sample_results(root: str | Path) -> SampleResults:
    """:func:`build_sample_results` once per folder: later calls (other test modules, other processes)
    read the description it leaves in ``root/sample.json``."""
    root = Path(root).resolve()
    marker = root / "sample.json"
    if marker.is_file():
        stored = json.loads(marker.read_text(encoding="utf-8"))
        return SampleResults(
            root=Path(stored["root"]),
            dataset=Path(stored["dataset"]),
            submissions={name: Path(path) for name, path in stored["submissions"].items()},
            results_dir=Path(stored["results_dir"]),
            db_url=stored["db_url"],
            run_ids=tuple(stored["run_ids"]),
        )
    sample = build_sample_results(root)
    from bench.imageio import write_text_atomic

    write_text_atomic(marker, json.dumps(asdict(sample), default=str, indent=2))
    return sample


def _baseline(submissions_dir: Path) -> Path:
    """The repository's zadc-threshold submission, or the scaffolded Z-ADC baseline outside a checkout."""
    if BASELINE.is_dir():
        return BASELINE
    from bench.submissions import scaffold_submission

    target = submissions_dir / "zadc-threshold"
    if target.is_dir():
        return target
    description = "The BONBID-HIE baseline: lesion = Z-ADC < -2 inside the brain."
    return scaffold_submission("zadc-threshold", "python", submissions_dir, authors=["HIE-Bench developers"], description=description)


def _predictions_submission(submissions_dir: Path, name: str, dataset, make_mask, description: str) -> Path:
    """A ``predictions`` submission holding ``make_mask(index, reference)`` for every case (``None``: no file)."""
    import yaml

    from bench.imageio import write_image

    folder = submissions_dir / name
    if (folder / "submission.yaml").is_file():
        return folder
    staging = submissions_dir / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "predictions").mkdir(parents=True)
    manifest = {
        "name": name,
        "version": "1.0.0",
        "authors": ["HIE-Bench sample"],
        "description": f"Sample submission for the app's tests: {description}.",
        "licence": "Apache-2.0",
        "kind": "predictions",
        "folder": "predictions",
    }
    (staging / "submission.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    (staging / "README.md").write_text(f"# {name}\n\nA sample submission generated by `bench.perf.fill`: {description}.\n", encoding="utf-8")
    for index, case in enumerate(dataset.cases):
        mask = make_mask(index, case.load_label())
        if mask is not None:
            write_image(mask.astype(np.uint8), case.geometry, staging / "predictions" / f"{case.case_id}.nii.gz")
    staging.rename(folder)
    return folder


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components and their sizes (index 0: background)."""
    import cc3d

    labels = cc3d.connected_components(mask, connectivity=26)
    return labels, np.bincount(labels.ravel())


def _shifted_reference(index: int, reference: np.ndarray) -> np.ndarray:
    mask = np.roll(reference, 1, axis=2)
    labels, sizes = _components(reference)
    if index % 2 == 1 and sizes.size > 2:  # drop the smallest lesion: a miss
        smallest = 1 + int(np.argmin(sizes[1:]))
        mask &= ~np.roll(labels == smallest, 1, axis=2)
    if index % 3 == 0:  # a false-positive blob in the opposite corner of the field of view
        z, y, x = reference.shape
        mask[z // 2, y // 4 : y // 4 + 2, x - x // 4 - 2 : x - x // 4] = True
    return mask


def _largest_lesion(index: int, reference: np.ndarray) -> np.ndarray | None:
    from scipy.ndimage import binary_dilation

    if index == 1:
        return None  # no file: the harness stores a failed case
    if index == 2:
        return np.zeros_like(reference)  # empty: infinite surface distances, capped in statistics
    labels, sizes = _components(reference)
    if sizes.size < 2:
        return np.zeros_like(reference)
    largest = labels == 1 + int(np.argmax(sizes[1:]))
    return binary_dilation(largest, iterations=1)


# -- random per-case rows -------------------------------------------------------------------------------------------


def fill_synthetic_results(
    store: Store,
    *,
    n_submissions: int = 3,
    n_cases: int = 20,
    n_sites: int = 3,
    protocols: Sequence[str] = ("loso",),
    failed_fraction: float = 0.0,
    with_lesions: bool = False,
    dataset: str = "synthetic",
    seed: int = 0,
) -> list[str]:
    """Fill a store with plausible random results (for timings, demos and tests); returns the run ids.

    Registers a dataset of ``n_cases`` cases over ``n_sites`` sites and ``n_submissions`` submissions of
    increasing skill, each run under every protocol (k-fold scores a little higher than leave-one-site-out,
    as on real data). About ``failed_fraction`` of the cases fail; 2 % of the distances are infinite.
    """
    rng = np.random.default_rng(seed)
    version = f"{dataset}-v1"
    store.create_all()
    store.upsert_dataset(_synthetic_dataset(dataset, version, n_cases, n_sites, digits=5))
    run_ids = []
    for s in range(n_submissions):
        content_hash = f"{dataset}-sub{s:04d}"
        store.upsert_submission(content_hash=content_hash, name=f"model-{s:03d}", version="1", kind="synthetic")
        for protocol in protocols:
            run_id = f"{dataset}-{protocol}-{s:04d}"
            store.start_run(run_id=run_id, submission=content_hash, dataset=version, protocol=protocol)
            skill = 0.3 + 0.5 * (s + 1) / (n_submissions + 1) + (0.05 if protocol == "kfold" else 0.0)
            cases = [_synthetic_case(run_id, c, n_sites, protocol, skill, rng, failed_fraction, with_lesions) for c in range(n_cases)]
            store.record_case_results([row for row, _ in cases], [lesions for _, lesions in cases])
            store.finish_run(run_id)
            run_ids.append(run_id)
    return run_ids


def _synthetic_case(run_id: str, c: int, n_sites: int, protocol: str, skill: float, rng: np.random.Generator,
                    failed_fraction: float, with_lesions: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One random case row of :func:`fill_synthetic_results` and its lesion rows."""
    from bench.metrics import METRICS

    site = f"site{c % n_sites}"
    row = {"run_id": run_id, "case_id": f"case{c:05d}", "site": site, "fold": site if protocol == "loso" else f"fold{c % 5}"}
    if rng.random() < failed_fraction:
        return row | {"status": "failed", "error": "synthetic failure"}, []
    row |= {"status": "ok", "empty": "none", **{key: _synthetic_value(METRICS[key], skill, rng) for key in METRICS}}
    lesions = []
    if with_lesions:
        for lesion_id in range(1, int(rng.integers(1, 4)) + 1):
            volume = float(rng.lognormal(-1.5, 1.2))
            lesions.append({"kind": "ref", "lesion_id": lesion_id, "detected": bool(rng.random() < skill + 0.2 * min(volume, 1.0)), "volume_ml": volume})
        if rng.random() < 1.0 - skill:
            lesions.append({"kind": "pred", "lesion_id": 1, "false_positive": True, "volume_ml": float(rng.lognormal(-3.0, 1.0))})
    return row, lesions


def _synthetic_dataset(name: str, version: str, n_cases: int, n_sites: int, *, digits: int) -> SimpleNamespace:
    """Just enough of :class:`bench.data.dataset.Dataset` for :meth:`Store.upsert_dataset`."""
    cases = [SimpleNamespace(case_id=f"case{c:0{digits}d}", site=f"site{c % n_sites}", metadata={}) for c in range(n_cases)]
    return SimpleNamespace(name=name, version=version, root="", channel_names=("ADC", "Z-ADC"), cases=cases)


def _synthetic_value(info: Any, skill: float, rng: Any) -> float:
    """A plausible random value of a metric for a submission of some skill (0..1)."""
    if info.range == (0.0, 1.0):
        return float(min(1.0, max(0.0, rng.normal(skill, 0.15))))
    if info.inf_cap is not None and rng.random() < 0.02:
        return math.inf  # an empty prediction: infinite distance, capped when aggregated
    return float(abs(rng.normal(10.0 * (1.0 - skill), 3.0)))


def fill_database(db_url: str, n_rows: int, *, n_submissions: int = 50, n_sites: int = 4, seed: int = 0) -> int:
    """Write ``n_rows`` plausible per-case rows (one LOSO run per submission) into an empty database; returns the row count."""
    from bench.metrics import METRICS
    from bench.store import Store

    rng = np.random.default_rng(seed)
    n_cases = max(1, n_rows // n_submissions)
    store = Store(db_url)
    store.create_all()
    dataset = _synthetic_dataset("perf", "perf-v1", n_cases, n_sites, digits=6)
    store.upsert_dataset(dataset)
    for s in range(n_submissions):
        content_hash = f"{s:064x}"
        store.upsert_submission(content_hash=content_hash, name=f"model-{s:03d}", version="1", kind="predictions")
        run_id = f"run-{s:04d}"
        store.start_run(run_id=run_id, submission=content_hash, dataset="perf-v1", protocol="loso")
        skill = rng.uniform(0.3, 0.8)
        values = {key: _values(info, skill, rng, n_cases) for key, info in METRICS.items()}
        rows = [
            {"run_id": run_id, "case_id": case.case_id, "site": case.site, "fold": f"loso-{case.site}", "status": "ok", **{k: v[c] for k, v in values.items()}}
            for c, case in enumerate(dataset.cases)
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


# -- timings ----------------------------------------------------------------------------------------------------------


def time_leaderboard(
    n_rows: int = 100_000,
    *,
    n_submissions: int = 50,
    n_sites: int = 4,
    metrics: Sequence[str] = DEFAULT_METRICS,
    n_boot: int = 1000,
    repeats: int = 3,
    db_url: str | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Time :func:`bench.report.leaderboard_table` on a synthetic database of ``n_rows`` per-case rows.

    Fills a fresh SQLite file in a temporary folder (or ``db_url``, which must be empty) with
    ``n_submissions`` runs of ``n_rows / n_submissions`` cases each (:func:`fill_synthetic_results`),
    then times a leaderboard the way a page view computes it, best of ``repeats``. Returns ``rows``,
    ``fill_s``, ``query_s`` (reading the rows), ``stats_s`` (bootstrap CIs and ranks), ``total_s``
    (:func:`~bench.report.leaderboard_table`, both together; wall clock) and ``total_cpu_s`` (its CPU
    time, which other processes on a busy machine inflate less).
    """
    from bench.store import Store

    with tempfile.TemporaryDirectory(prefix="hie-bench-timing-") as folder:
        store = Store(db_url or f"sqlite:///{folder}/bench.db")
        started = time.perf_counter()
        fill_synthetic_results(store, n_submissions=n_submissions, n_cases=max(1, n_rows // n_submissions), n_sites=n_sites, seed=seed, dataset="timing")
        fill_s = time.perf_counter() - started
        timings = [_time_leaderboard_once(store, list(metrics), n_boot, seed) for _ in range(repeats)]
        store.dispose()
    best = {key: min(timing[key] for timing in timings) for key in timings[0]}
    return {"rows": best.pop("rows"), "fill_s": fill_s, **best}


def _time_leaderboard_once(store: Store, metrics: list[str], n_boot: int, seed: int) -> dict[str, float]:
    """Seconds of reading the LOSO rows, of their statistics, and of the whole leaderboard (wall and CPU)."""
    from bench import stats
    from bench.report import leaderboard_table

    started = time.perf_counter()
    frame = store.case_results_frame(protocol="loso", metrics=metrics, details=False)
    query_s = time.perf_counter() - started
    started = time.perf_counter()
    stats.leaderboard(frame, metrics, n_boot=n_boot, seed=seed)
    stats_s = time.perf_counter() - started
    started, started_cpu = time.perf_counter(), time.process_time()
    leaderboard_table(store, metrics=metrics, protocol="loso", n_boot=n_boot, seed=seed)
    total_s, total_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
    return {"rows": float(len(frame)), "query_s": query_s, "stats_s": stats_s, "total_s": total_s, "total_cpu_s": total_cpu_s}


def time_leaderboard_page(n_rows: int = 100_000, *, n_submissions: int = 50, n_sites: int = 4, db_url: str | None = None, repeats: int = 3) -> dict[str, float]:
    """Fill a database with ``n_rows`` per-case rows and time the leaderboard page (see the module docstring).

    Every timing is the best of ``repeats`` (the machine may be busy); returns seconds and ``rows``.
    """
    from bench.app.perf import time_page

    with tempfile.TemporaryDirectory(prefix="hie-bench-app-perf-") as folder:
        url = db_url or f"sqlite:///{folder}/bench.db"
        started = time.perf_counter()
        rows = fill_database(url, n_rows, n_submissions=n_submissions, n_sites=n_sites)
        fill_s = time.perf_counter() - started
        timings = {"rows": float(rows), "fill_s": fill_s}
        timings |= _time_data_path(url, repeats)
        timings |= time_page(url, repeats)
    return timings


def _time_data_path(url: str, repeats: int) -> dict[str, float]:
    """What the leaderboard page computes on a cold cache, called directly (best of ``repeats``)."""
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


def print_timings(result: dict[str, float]) -> None:
    """Print the timings of :func:`time_leaderboard` or :func:`time_leaderboard_page`, one per line."""
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:,.0f}" if key == "rows" else f"{key:<{width}}  {value:.3f} s")


if __name__ == "__main__":  # pragma: no cover - a convenience for trying the app
    sample = build_sample_results(sys.argv[1] if len(sys.argv) > 1 else "results/sample")
    print(f"sample results in {sample.root}\n  HIE_BENCH_DB_URL={sample.db_url} streamlit run app.py")
