"""The benchmark harness: runs submissions over cross-validation folds and stores every score.

A *run* is one submission evaluated on one dataset under one protocol. It is identified by the hash
of everything that can change its numbers (:func:`run_id`): the submission's content, the dataset
version, the preprocessing id, the protocol and its fold parameters, the metric convention and the
code version. Re-running the same command therefore finds the same run and only does what is missing.

A run expands into independent, idempotent work units, one per fold (:class:`FoldUnit`): train the
fold's model if the submission is ``trainable`` (itself resumable from its checkpoints), then predict
and score each held-out case not yet stored, committing each case in its own transaction. An
:class:`Executor` runs the units; :class:`LocalExecutor` uses local processes. A unit carries only plain
data (paths, URL, ids), so another executor (a Ray cluster, for instance) can run the very same units.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Literal, Protocol, Sequence

import typer
from pydantic import BaseModel, ConfigDict, Field

from bench import __version__
from bench.data.dataset import Case, Dataset
from bench.data.splits import Fold
from bench.results import CaseResult, LesionRow

ProtocolName = Literal["kfold", "loso"]

#: Version of the harness + metric code whose changes invalidate stored numbers. Bumped by hand when
#: scoring changes; stored in every run id so old and new numbers are never mixed.
CODE_VERSION = __version__


class RunSpec(BaseModel):
    """Everything that defines one run, as data (HELM-style run spec). Hash-stable and JSON-serializable."""

    model_config = ConfigDict(frozen=True)

    submission: Path
    dataset: Path
    protocol: ProtocolName = "kfold"
    folds: int = Field(5, ge=2, description="Number of folds for k-fold (ignored by leave-one-site-out).")
    seed: int = 0
    convention: str = "bench"
    schedule: Literal["auto", "cpu", "gpu"] = "auto"
    results_dir: Path = Path("results")
    db_url: str
    #: Fraction of each training fold held out for validation / early stopping of trainable submissions.
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)


def run_id(
    *,
    submission_hash: str,
    dataset_version: str,
    preprocessing_id: str,
    protocol: str,
    folds: int,
    seed: int,
    convention: str,
    code_version: str = CODE_VERSION,
    training: dict | None = None,
) -> str:
    """Identity of a run: 16 hex digits of SHA-256 over the fields that change its numbers.

    ``training`` holds what changes a trained model (resolved schedule, validation fraction, seed); it
    is ``None`` for submissions that do not train, whose numbers do not depend on it.
    """
    fields = {
        "training": training,
        "submission": submission_hash,
        "dataset": dataset_version,
        "preprocessing": preprocessing_id,
        "protocol": protocol,
        "folds": folds if protocol == "kfold" else None,
        "seed": seed if protocol == "kfold" else None,
        "convention": convention,
        "code": code_version,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class UnitResult:
    """What one work unit did (for logs and progress; the numbers themselves are in the store)."""

    run_id: str
    fold: str
    scored: int = 0
    failed: int = 0
    skipped: int = 0
    train_s: float = 0.0
    #: Wall time of the unit and peak memory of the process that ran it (the unit's own, with workers > 1).
    wall_s: float = 0.0
    peak_memory_mb: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class FoldUnit:
    """Train (if needed) and score the held-out cases of one fold of one run. Idempotent."""

    spec: RunSpec
    run_id: str
    fold: Fold

    def execute(self) -> UnitResult:
        from bench.store import Store

        store = Store.from_url(self.spec.db_url)
        done = store.finished_case_ids(self.run_id)
        todo = [case_id for case_id in self.fold.test if case_id not in done]
        if not todo:
            return UnitResult(self.run_id, self.fold.name, skipped=len(self.fold.test))
        dataset = Dataset.load(self.spec.dataset)
        try:
            predictor, train_s = self._predictor(dataset)
        except Exception as exc:  # a broken submission fails its cases, never the whole benchmark
            message = f"model could not be loaded or trained: {type(exc).__name__}: {exc}"
            for case_id in todo:
                store.record_case_result(self._failed(dataset.case(case_id), message))
            return UnitResult(self.run_id, self.fold.name, failed=len(todo), error=traceback.format_exc(limit=5))
        scored = failed = 0
        try:
            for case_id in todo:
                case = dataset.case(case_id)
                try:
                    result = score_case(predictor, case, self._prediction_path(case_id), self.spec.convention)
                except Exception as exc:  # unreadable reference, full disk, ...: this case fails, the run goes on
                    result = CaseResult.failed("", case.case_id, f"scoring failed: {type(exc).__name__}: {exc}", site=case.site)
                result = result.with_run(self.run_id, self.fold.name)
                store.record_case_result(result)
                scored += result.ok
                failed += not result.ok
        finally:  # stops a submission's worker process, if its kind runs one
            getattr(predictor, "close", lambda: None)()
        return UnitResult(self.run_id, self.fold.name, scored=scored, failed=failed, skipped=len(self.fold.test) - len(todo), train_s=train_s)

    # -- helpers -------------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self.spec.results_dir.resolve() / "runs" / self.run_id

    def _prediction_path(self, case_id: str) -> Path:
        return self.run_dir / "predictions" / f"{case_id}.nii.gz"

    def _failed(self, case: Case, error: str) -> CaseResult:
        return CaseResult.failed(self.run_id, case.case_id, error, site=case.site, fold=self.fold.name)

    def _predictor(self, dataset: Dataset):
        """The fold's predictor, always behind the submission guard (blinding, sandbox, limits, mask check)."""
        from bench.submissions import load_submission

        submission = load_submission(self.spec.submission)
        cache_dir = self.spec.results_dir.resolve() / "cache"
        if not submission.trains:
            return submission.predictor(cache_dir=cache_dir), 0.0
        train_ids, val_ids = split_validation(dataset, self.fold.train, self.spec.val_fraction, self.spec.seed)
        trainable = submission.trainable(schedule=self.spec.schedule, cache_dir=cache_dir)
        start = time.perf_counter()
        model_dir = self.run_dir / "models" / self.fold.name
        fitted = trainable.fit([dataset.case(i) for i in train_ids], [dataset.case(i) for i in val_ids], model_dir)
        return fold_predictor(fitted, model_dir, cache_dir=cache_dir), time.perf_counter() - start


def fold_predictor(fitted, model_dir: Path, *, cache_dir: Path | None = None):
    """A trained fold's predictor on the one prediction path.

    The fold is exported once into ``model_dir/submission`` (TorchScript for MONAI-trainer folds, nnU-Net's
    own format for nnU-Net folds) and run like any uploaded submission of that kind, through the same
    guard, sandbox and inference code; so a trained fold and its export give identical masks by
    construction. A trainer without an exported form runs in this process behind the same guard.
    """
    from bench.models import ExportUnsupported, export_fold
    from bench.submissions import load_submission
    from bench.submissions.guard import FittedPredictor

    export_dir = Path(model_dir) / EXPORT_FOLDER
    try:
        if not (export_dir / "submission.yaml").is_file():
            export_fold(model_dir, export_dir, "auto", overwrite=True)
    except ExportUnsupported:
        return FittedPredictor(fitted)
    getattr(fitted, "close", lambda: None)()  # the exported copy predicts; free the trained one
    return load_submission(export_dir).predictor(cache_dir=cache_dir)


#: Sub-folder of a trained fold's folder that holds its exported submission.
EXPORT_FOLDER = "submission"


def split_validation(dataset: Dataset, train_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``fraction`` of a training fold for validation, stratified by site, deterministically."""
    import numpy as np

    if fraction <= 0 or len(train_ids) < 3:
        return list(train_ids), []
    rng = np.random.default_rng(seed)
    by_site: dict[str, list[str]] = {}
    for case_id in train_ids:
        by_site.setdefault(dataset.case(case_id).site, []).append(case_id)
    val: list[str] = []
    for site in sorted(by_site):
        ids = sorted(by_site[site])
        n_val = int(round(fraction * len(ids)))
        val.extend(rng.permutation(ids)[:n_val].tolist())
    if not val:
        val = [sorted(train_ids)[0]]
    return [i for i in train_ids if i not in set(val)], sorted(val)


def score_case(predictor, case: Case, prediction_path: Path, convention: str) -> CaseResult:
    """Predict one case, save the mask, score it; returns its :class:`~bench.results.CaseResult`.

    ``predictor`` is a guarded predictor (:meth:`bench.submissions.Submission.predictor` or
    :func:`fold_predictor`): it has already blinded the case and checked the mask. Any failure of the
    predictor becomes a failed result with the reason (and the fix); the benchmark goes on.
    The result has no run id yet (:meth:`CaseResult.with_run`).
    """
    import numpy as np

    from bench.imageio import write_image
    from bench.metrics import METRICS, compute_metrics_with_lesions
    from bench.submissions import PredictionError

    geometry = case.geometry
    start = time.perf_counter()
    try:
        mask = predictor.predict(case)
    except PredictionError as exc:  # the submission layer already says what happened and how to fix it
        return CaseResult.failed("", case.case_id, f"{exc.message} (fix: {exc.fix})" if exc.fix else exc.message, site=case.site)
    except Exception as exc:
        return CaseResult.failed("", case.case_id, f"prediction failed: {type(exc).__name__}: {exc}", site=case.site)
    predict_s = time.perf_counter() - start
    prediction_path = Path(prediction_path).resolve()
    write_image(mask.astype(np.uint8), geometry, prediction_path)
    start = time.perf_counter()
    metrics, lesions = compute_metrics_with_lesions(mask, case.load_label(), geometry.spacing, convention=convention)
    return CaseResult(
        run_id="",
        case_id=case.case_id,
        site=case.site,
        metrics={key: value for key, value in metrics.items() if key in METRICS},
        empty=metrics.get("empty"),
        lesions=LesionRow.from_matches(lesions),
        prediction_path=str(prediction_path),
        predict_s=predict_s,
        score_s=time.perf_counter() - start,
    )


class Executor(Protocol):
    """Runs work units. Units are independent and idempotent, so any order and any retry is safe."""

    def map(self, units: Sequence[FoldUnit], on_result: Callable[[UnitResult], None] | None = None) -> list[UnitResult]: ...


def _execute(unit: FoldUnit) -> UnitResult:
    """Run one unit, timing it; an unexpected error becomes the unit's result instead of stopping the others."""
    from dataclasses import replace

    started = time.perf_counter()
    try:
        result = unit.execute()
    except Exception:
        result = UnitResult(unit.run_id, unit.fold.name, error=traceback.format_exc(limit=5))
    return replace(result, wall_s=time.perf_counter() - started, peak_memory_mb=peak_memory_mb())


@dataclass
class LocalExecutor:
    """Runs units in this process (``workers=1``) or in a pool of spawned local processes."""

    workers: int = 1
    results: list[UnitResult] = field(default_factory=list)

    def map(self, units: Sequence[FoldUnit], on_result: Callable[[UnitResult], None] | None = None) -> list[UnitResult]:
        results: list[UnitResult] = []
        if self.workers <= 1:
            for unit in units:
                results.append(_execute(unit))
                if on_result:
                    on_result(results[-1])
            return results
        # spawn, not fork: torch and SQLAlchemy engines must not be inherited by children.
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn")) as pool:
            for result in pool.map(_execute, units):
                results.append(result)
                if on_result:
                    on_result(result)
        return results


@dataclass(frozen=True)
class PlannedRun:
    """A run as registered in the store, with the units that produce its rows."""

    run_id: str
    submission_name: str
    units: tuple[FoldUnit, ...]


def plan_run(spec: RunSpec) -> PlannedRun:
    """Register dataset, submission and run in the store; return the run's units (nothing is executed)."""
    from bench.store import Store
    from bench.submissions import load_submission

    dataset = Dataset.load(spec.dataset)
    submission = load_submission(spec.submission)
    preprocessing_id = submission.preprocessing_id
    training = None
    if submission.trains:
        # "auto" resolves here, once, so a CPU run and a GPU run of the same recipe are different runs.
        spec = spec.model_copy(update={"schedule": resolve_schedule(spec.schedule)})
        training = {"schedule": spec.schedule, "val_fraction": spec.val_fraction, "seed": spec.seed}
    identity = run_id(
        training=training,
        submission_hash=submission.content_hash,
        dataset_version=dataset.version,
        preprocessing_id=preprocessing_id,
        protocol=spec.protocol,
        folds=spec.folds,
        seed=spec.seed,
        convention=spec.convention,
    )
    folds = dataset.splits(spec.protocol, k=spec.folds, seed=spec.seed)
    store = Store.from_url(spec.db_url)
    store.create_all()
    store.upsert_dataset(dataset)
    store.upsert_submission(submission)
    store.start_run(
        run_id=identity,
        submission=submission,
        dataset=dataset,
        protocol=spec.protocol,
        convention=spec.convention,
        preprocessing_id=preprocessing_id,
        code_version=CODE_VERSION,
        config=json.loads(spec.model_dump_json()),
        environment=describe_environment(),
    )
    return PlannedRun(identity, submission.name, tuple(FoldUnit(spec, identity, fold) for fold in folds))


def resolve_schedule(schedule: str) -> str:
    """``auto`` -> ``gpu`` when torch can use a CUDA device here, else ``cpu`` (:func:`bench.device.schedule_for`)."""
    from bench.device import schedule_for

    return schedule_for(schedule)


def describe_environment() -> dict:
    """Host, device, GPU name, torch and CUDA versions, AMP dtype: recorded with each run.

    See :func:`bench.device.describe_environment`; it does not import torch into this process.
    """
    from bench.device import describe_environment as describe

    return describe()


def peak_memory_mb() -> float:
    """Peak resident memory of this process (and CUDA peak if this process used CUDA), in MB.

    Reads torch's counter only when torch is already imported and CUDA initialised: importing torch
    just to learn that nothing was allocated cost ~3.8 s per run.
    """
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
    return peak


def run_benchmark(specs: Sequence[RunSpec], *, workers: int = 1, on_result: Callable[[UnitResult], None] | None = None) -> dict[str, list[UnitResult]]:
    """Plan every run, execute all their units with a :class:`LocalExecutor`, close the runs.

    Returns the unit results per run id. Safe to call again after an interruption: finished cases are
    skipped, finished trainings are loaded from their run folder.
    """
    from bench.store import Store

    planned = [plan_run(spec) for spec in specs]
    results = LocalExecutor(workers).map([unit for run in planned for unit in run.units], on_result)
    by_run: dict[str, list[UnitResult]] = {run.run_id: [] for run in planned}
    for result in results:
        by_run[result.run_id].append(result)
    for spec, run in zip(specs, planned):
        unit_results = by_run[run.run_id]
        Store.from_url(spec.db_url).finish_run(
            run.run_id,
            status="failed" if any(r.error for r in unit_results) else "done",
            timings={"train_s": sum(r.train_s for r in unit_results), "wall_s": sum(r.wall_s for r in unit_results)},
            peak_memory_mb=max((r.peak_memory_mb for r in unit_results), default=None),
        )
    return by_run


def run_command(
    submissions: list[Path] = typer.Argument(..., help="Submission folders (each with a submission.yaml).", exists=True, file_okay=False),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset name under the data root, or a path to a dataset folder."),
    protocol: list[str] = typer.Option(["kfold"], "--protocol", "-p", help="kfold and/or loso (repeat the option for both)."),
    folds: int = typer.Option(5, "--folds", min=2, help="Number of folds of the site-stratified k-fold."),
    seed: int = typer.Option(0, "--seed", help="Seed of the k-fold split."),
    convention: str = typer.Option("bench", "--convention", help="Metric convention (docs/metrics.md)."),
    schedule: str = typer.Option("auto", "--schedule", help="Training schedule of trainable submissions: auto (gpu if CUDA), cpu or gpu."),
    workers: int = typer.Option(1, "--workers", min=1, help="Run this many fold units in parallel local processes."),
    data_root: Path | None = typer.Option(None, "--data-root", help="Folder holding the datasets (default: datasets/)."),
    results_dir: Path | None = typer.Option(None, "--results", help="Folder for predictions, models and the default database (default: results/)."),
    db: str | None = typer.Option(None, "--db", help="SQLAlchemy URL of the results database (default: sqlite:///<results>/bench.db)."),
) -> None:
    """Benchmark submissions on a dataset: train per fold if trainable, predict held-out cases, score, store.

    Rerunning the same command resumes: finished cases are skipped and trained folds are reloaded.
    """
    from rich.console import Console

    from bench.settings import BenchSettings

    console = Console()
    settings = BenchSettings(**{k: v for k, v in {"data_root": data_root, "results_dir": results_dir, "db_url": db}.items() if v is not None})
    dataset_path = Path(dataset) if Path(dataset).is_dir() else settings.data_root / dataset
    if not (dataset_path / "dataset.json").is_file():
        console.print(f"[red]error:[/red] no dataset at {dataset_path} (create one with `bench data synth --out {dataset_path}`)")
        raise typer.Exit(2)
    from bench.metrics import CONVENTIONS

    problems = [f"unknown protocol {name!r}: use kfold or loso" for name in protocol if name not in ("kfold", "loso")]
    if convention not in CONVENTIONS:
        problems.append(f"unknown convention {convention!r}: use one of {', '.join(CONVENTIONS)}")
    if schedule not in ("auto", "cpu", "gpu"):
        problems.append(f"unknown schedule {schedule!r}: use auto, cpu or gpu")
    for problem in problems:
        console.print(f"[red]error:[/red] {problem}")
    if problems:
        raise typer.Exit(2)
    specs = [
        RunSpec(submission=path, dataset=dataset_path, protocol=name, folds=folds, seed=seed, convention=convention,
                schedule=schedule, results_dir=settings.results_dir, db_url=settings.database_url)
        for path in submissions
        for name in protocol
    ]

    def report(result: UnitResult) -> None:
        status = "[red]failed[/red]" if result.error or result.failed else "[green]ok[/green]"
        console.print(f"  {status} run {result.run_id} {result.fold}: scored {result.scored}, failed {result.failed}, "
                      f"already stored {result.skipped}" + (f", trained in {result.train_s:.1f} s" if result.train_s else ""))
        if result.error:
            console.print(f"[dim]{result.error.strip().splitlines()[-1]}[/dim]")

    console.print(f"Benchmarking {len(submissions)} submission(s) on {dataset_path} ({', '.join(protocol)}); results in {settings.database_url}")
    try:
        by_run = run_benchmark(specs, workers=workers, on_result=report)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    failed = sum(r.failed for results in by_run.values() for r in results)
    console.print(f"Done: {len(by_run)} run(s); {failed} case(s) failed. See `bench leaderboard --db {settings.database_url}`.")
