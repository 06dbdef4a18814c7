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

import atexit
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

from pydantic import BaseModel, ConfigDict, Field

from bench import __version__
from bench.data.dataset import Case, Dataset
from bench.constants import DEFAULT_CONVENTION, DEFAULT_LESION_RULE, FULL_TRAINING, ProtocolName
from bench.data.splits import Fold
from bench.fractions import subsample_training
from bench.results import CaseResult, LesionRow


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
    convention: str = DEFAULT_CONVENTION
    #: How predicted lesions are matched to reference lesions (bench.lesionwise.MATCH_RULES).
    lesion_rule: str = DEFAULT_LESION_RULE
    #: Predict in the bubblewrap sandbox (False is --unsafe-no-sandbox, recorded in the run id).
    sandbox: bool = True
    schedule: Literal["auto", "cpu", "gpu"] = "auto"
    results_dir: Path = Path("results")
    db_url: str
    #: Fraction of each training fold held out for validation / early stopping of trainable submissions.
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    #: Share of each fold's training cases a trainable submission trains on (site-stratified, nested,
    #: by seed: bench.fractions.subsample_training); in the run id only when it is not 1.
    train_fraction: float = Field(FULL_TRAINING, gt=0.0, le=1.0)


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
    lesion_rule: str = DEFAULT_LESION_RULE,
    sandbox: bool = True,
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
        "seed": seed if protocol in ("kfold", "holdout") else None,  # the stratified holdout depends on the seed too
        "convention": convention,
        "lesion_rule": lesion_rule,
        "code": code_version,
    }
    if not sandbox:  # only then, so sandboxed runs keep their ids; an unisolated run is never mistaken for one
        fields["unsafe_no_sandbox"] = True
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
    #: The training budget this fold used (``BudgetUsed.to_dict()``), for trainable submissions.
    budget: dict | None = None
    #: Wall time of the unit and peak memory of the process that ran it (the unit's own, with workers > 1).
    wall_s: float = 0.0
    peak_memory_mb: float = 0.0
    error: str = ""
    #: The submission's folder name (set by :func:`_execute`), for progress lines of parallel runs.
    submission: str = ""


@dataclass(frozen=True)
class FoldUnit:
    """Train (if needed) and score the held-out cases of one fold of one run. Idempotent."""

    spec: RunSpec
    run_id: str
    fold: Fold
    #: Expected relative cost, for ordering units over parallel workers (:func:`longest_first`):
    #: 0 scores a fixed model, 1 trains first, 2 trains nnU-Net (planning, internal folds, ensemble).
    cost: int = 0

    def execute(self) -> UnitResult:
        from bench.store import Store

        store = Store.from_url(self.spec.db_url)
        done = store.finished_case_ids(self.run_id)
        todo = [case_id for case_id in self.fold.test if case_id not in done]
        if not todo:
            return UnitResult(self.run_id, self.fold.name, skipped=len(self.fold.test))
        dataset = Dataset.load(self.spec.dataset)
        try:
            predictor, train_s, shared, budget = self._predictor(dataset)
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
                    result = score_case(predictor, case, self._prediction_path(case_id), self.spec.convention, self.spec.lesion_rule)
                except Exception as exc:  # unreadable reference, full disk, ...: this case fails, the run goes on
                    result = CaseResult.failed("", case.case_id, f"scoring failed: {type(exc).__name__}: {exc}", site=case.site)
                result = result.with_run(self.run_id, self.fold.name)
                store.record_case_result(result)
                scored += result.ok
                failed += not result.ok
        finally:  # a trained fold's predictor is this fold's only; a shared one serves the run's other folds
            if not shared:
                predictor.close()
        return UnitResult(self.run_id, self.fold.name, scored=scored, failed=failed, skipped=len(self.fold.test) - len(todo),
                          train_s=train_s, budget=budget)

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
        from bench.submissions.training import train_fold

        submission = load_submission(self.spec.submission)
        cache_dir = self.spec.results_dir.resolve() / "cache"
        if not submission.trains:  # predictions do not depend on the fold: one predictor process per run
            return shared_predictor(self.run_id, lambda: submission.predictor(cache_dir=cache_dir, sandbox=self.spec.sandbox)), 0.0, True, None
        train_ids, val_ids = split_validation(dataset, subsample_training(dataset, self.fold.train, self.spec.train_fraction, self.spec.seed), self.spec.val_fraction, self.spec.seed)
        # Trained in a sandbox holding this fold's training cases only, then exported and scored like an upload.
        trained = train_fold(submission, [dataset.case(i) for i in train_ids], [dataset.case(i) for i in val_ids],
                             self.run_dir / "models" / self.fold.name, schedule=self.spec.schedule, cache_dir=cache_dir,
                             sandbox=self.spec.sandbox, secrets=[self.spec.results_dir.resolve(), dataset.root.resolve()],
                             results_dir=self.spec.results_dir, label=f"training fold {self.fold.name}")
        predictor = load_submission(trained.export_dir).predictor(cache_dir=cache_dir, sandbox=self.spec.sandbox)
        return predictor, trained.train_s, False, trained.budget


#: The open predictor of a non-training submission, kept for the other folds of its run in this process
#: (starting a sandboxed worker and loading a model costs seconds; doing it once per fold is waste).
_SHARED_PREDICTORS: dict[str, object] = {}


def shared_predictor(run_id: str, open_predictor: Callable[[], object]):
    """The run's predictor in this process, opened on first use; a new run closes the previous one."""
    if run_id not in _SHARED_PREDICTORS:
        close_shared_predictors()
        _SHARED_PREDICTORS[run_id] = open_predictor()
    return _SHARED_PREDICTORS[run_id]


def close_shared_predictors() -> None:
    """End the worker process of every shared predictor (end of a benchmark, or process exit)."""
    while _SHARED_PREDICTORS:
        _, predictor = _SHARED_PREDICTORS.popitem()
        getattr(predictor, "close", lambda: None)()


atexit.register(close_shared_predictors)


def budget_summary(results: Sequence[UnitResult]) -> dict | None:
    """The run's training budget, per fold and in one line for the card and the leaderboard (``None``:
    the submission does not train)."""
    folds = {r.fold: r.budget for r in results if r.budget}
    if not folds:
        return None
    from bench.models.recipe import BudgetUsed

    used = sum(b.get("used", 0) for b in folds.values())
    planned = sum(b.get("planned", 0) for b in folds.values())
    largest = BudgetUsed.from_dict(max(folds.values(), key=lambda b: b.get("used", 0)))
    summary = f"{largest} per fold" if len(folds) > 1 else str(largest)
    return {"summary": summary, "used": used, "planned": planned, "unit": largest.unit, "folds": folds}


def fold_predictor(fitted, model_dir: Path, *, cache_dir: Path | None = None, sandbox: bool = True):
    """The predictor of a fold fitted in this process (the harness itself trains through
    :func:`bench.submissions.training.train_fold`), on the one prediction path.

    The fold is exported once into ``model_dir/submission`` (TorchScript for MONAI-trainer folds, nnU-Net's
    own format for nnU-Net folds, python for the logistic regression) and run like any uploaded submission
    of that kind, through the same guard, sandbox and inference code; so a trained fold and its export
    give identical masks by construction. A trainer without an exported form runs in this process behind
    the same guard.
    """
    from bench.models import ExportUnsupported, export_fold
    from bench.submissions import load_submission
    from bench.submissions.guard import FittedPredictor
    from bench.submissions.training import EXPORT_FOLDER

    export_dir = Path(model_dir) / EXPORT_FOLDER
    try:
        if not (export_dir / "submission.yaml").is_file():
            export_fold(model_dir, export_dir, "auto", overwrite=True)
    except ExportUnsupported:
        return FittedPredictor(fitted)
    getattr(fitted, "close", lambda: None)()  # the exported copy predicts; free the trained one
    return load_submission(export_dir).predictor(cache_dir=cache_dir, sandbox=sandbox)




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


def score_case(predictor, case: Case, prediction_path: Path, convention: str, lesion_rule: str = DEFAULT_LESION_RULE) -> CaseResult:
    """Predict one case, save the mask (and the probability map), score it; returns its :class:`~bench.results.CaseResult`.

    ``predictor`` is a guarded predictor (:meth:`bench.submissions.Submission.predictor` or
    :func:`fold_predictor`): it has already blinded the case and checked the mask and the probability.
    When the model gave a probability map, its ``uint8`` levels are stored in native space beside the mask
    (:func:`bench.results.probability_path_for`, compressed, atomic) and scored
    (:class:`~bench.results.ProbabilityScores`: Brier, ECE over the brain, channel 0 ``> 0``, the AUROC of
    the voxel uncertainty for errors and lesion uncertainty, from the prediction's own uncertainty map
    when it brought one (``tta-variance``), else from the probability's entropy (``entropy``)); without a
    probability those fields stay ``None``. Any failure of the
    predictor becomes a failed result with the reason (and the fix); the benchmark goes on.
    The result has no run id yet (:meth:`CaseResult.with_run`).
    """
    from dataclasses import replace

    import numpy as np

    from bench.calibration import quantize
    from bench.imageio import write_image
    from bench.metrics import METRICS, compute_metrics_with_lesions
    from bench.results import ProbabilityScores, probability_path_for
    from bench.submissions import PredictionError
    from bench.submissions.guard import Prediction
    from bench.uncertainty import UncertaintySettings

    geometry = case.geometry
    start = time.perf_counter()
    try:
        both = getattr(predictor, "predict_with_probability", None)
        prediction = both(case) if both is not None else Prediction(predictor.predict(case))
    except PredictionError as exc:  # the submission layer already says what happened and how to fix it
        return CaseResult.failed("", case.case_id, f"{exc.message} (fix: {exc.fix})" if exc.fix else exc.message, site=case.site)
    except Exception as exc:
        return CaseResult.failed("", case.case_id, f"prediction failed: {type(exc).__name__}: {exc}", site=case.site)
    predict_s = time.perf_counter() - start
    prediction_path = Path(prediction_path).resolve()
    write_image(prediction.mask.astype(np.uint8), geometry, prediction_path)
    start = time.perf_counter()
    reference = case.load_label()
    metrics, lesions = compute_metrics_with_lesions(prediction.mask, reference, geometry.spacing, convention=convention, lesion_rule=lesion_rule)
    result = CaseResult(
        run_id="",
        case_id=case.case_id,
        site=case.site,
        metrics={key: value for key, value in metrics.items() if key in METRICS},
        empty=metrics.get("empty"),
        lesions=LesionRow.from_matches(lesions),
        prediction_path=str(prediction_path),
        predict_s=predict_s,
    )
    if prediction.probability is not None:
        levels = quantize(prediction.probability)  # uint8 already after the guard; what is stored is what is scored
        brain = case.load_channel(0)[0]  # channel 0 is the skull-stripped brain channel: the domain is brain > 0
        # The prediction's own voxel uncertainty (the flip-TTA variance of an exported fold), unless switched
        # off with HIE_BENCH_UNCERTAINTY_TTA=0; without it the entropy of the probability map is scored.
        uncertainty = prediction.voxel_uncertainty
        if uncertainty is not None and uncertainty.source == "tta-variance" and not UncertaintySettings.from_env().tta_variance:
            uncertainty = None
        scores = ProbabilityScores.of(levels, prediction.mask, reference, adc=brain, lesions=result.lesions, uncertainty=uncertainty)
        stored = write_image(levels, geometry, probability_path_for(prediction_path))
        result = result.with_probability(str(stored), scores)
    return replace(result, score_s=time.perf_counter() - start)


class Executor(Protocol):
    """Runs work units. Units are independent and idempotent, so any order and any retry is safe.

    ``map`` runs every unit (each through :func:`_execute`, which holds the unit's lease), calls
    ``on_result`` as each finishes, and returns one :class:`UnitResult` per unit. See
    :class:`LocalExecutor` and :class:`bench.executors.RayExecutor`.
    """

    def map(self, units: Sequence[FoldUnit], on_result: Callable[[UnitResult], None] | None = None) -> list[UnitResult]: ...


#: Seconds a unit's lease lives without renewal (``HIE_BENCH_LEASE_TTL_S`` overrides it): how long a
#: unit whose claimant crashed on another machine waits before it is taken again.
UNIT_LEASE_TTL_S = 60.0


def _execute(unit: FoldUnit) -> UnitResult:
    """Run one unit under its lease, timing it; an unexpected error becomes the unit's result.

    The lease (:func:`bench.leases.hold_unit`) makes sure no two executors, ``bench run`` processes or
    workers do the same unit at once: a second claimant waits while the first works (and then finds
    the unit's cases stored), and takes the unit over when the first one dies.
    """
    from dataclasses import replace

    from bench.leases import hold_unit
    from bench.store import Store

    started = time.perf_counter()
    store = Store.from_url(unit.spec.db_url)
    try:
        with hold_unit(store, unit.run_id, unit.fold.name, float(os.environ.get("HIE_BENCH_LEASE_TTL_S", UNIT_LEASE_TTL_S))):
            result = unit.execute()
    except Exception:
        result = UnitResult(unit.run_id, unit.fold.name, error=traceback.format_exc(limit=5))
    finally:
        store.dispose()
    return replace(result, wall_s=time.perf_counter() - started, peak_memory_mb=peak_memory_mb(), submission=unit.spec.submission.name)


@dataclass
class LocalExecutor:
    """Runs units in this process (``workers=1``) or in a pool of spawned local processes.

    With several workers on a machine with G GPUs, worker i sees only GPU ``i mod G``
    (``CUDA_VISIBLE_DEVICES``, :func:`bench.device.worker_environment`), so its ``cuda`` is its own GPU.
    """

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
        from concurrent.futures import as_completed

        from bench.device import torch_facts

        # spawn, not fork: torch and SQLAlchemy engines must not be inherited by children.
        context = get_context("spawn")
        indices = context.Queue()
        for index in range(self.workers):
            indices.put(index)
        n_gpus = len(torch_facts().gpus)
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=context, initializer=_pin_worker,
                                 initargs=(indices, n_gpus, self.workers)) as pool:
            futures = [pool.submit(_execute, unit) for unit in units]  # in run_benchmark's order: longest first
            for future in as_completed(futures):
                results.append(future.result())
                if on_result:
                    on_result(results[-1])
        return results


def longest_first(units: Sequence[FoldUnit]) -> list[FoldUnit]:
    """``units`` ordered by expected cost, highest first (stable): training before scoring only,
    nnU-Net (planning, internal folds, ensemble) before other trainers."""
    return sorted(units, key=lambda unit: -unit.cost)


def _pin_worker(indices, n_gpus: int, workers: int = 1) -> None:
    """Pool initializer: take this worker's index, pin it to its GPU and its share of the CPU threads
    (before anything imports torch)."""
    from bench.device import worker_environment, worker_thread_environment

    os.environ.update(worker_environment(indices.get(), n_gpus))
    os.environ.update(worker_thread_environment(workers))


@dataclass(frozen=True)
class PlannedRun:
    """A run as registered in the store, with the units that produce its rows."""

    run_id: str
    submission_name: str
    units: tuple[FoldUnit, ...]


def plan_run(spec: RunSpec) -> PlannedRun:
    """Register dataset, submission and run in the store; return the run's units (nothing is executed)."""
    from bench.store import ISOLATION_NONE, ISOLATION_SANDBOX, Store
    from bench.submissions import load_submission

    dataset = Dataset.load(spec.dataset)
    # Edited labels or images must never keep the pristine run id: recompute the version (stat-keyed cache).
    dataset.verify_version(cache=spec.results_dir / "cache" / "dataset-digests" / f"{dataset.name}-{dataset.version[:16]}.json")
    submission = load_submission(spec.submission)
    preprocessing_id = submission.preprocessing_id
    training = None
    if submission.trains:
        # "auto" resolves here, once, so a CPU run and a GPU run of the same recipe are different runs.
        spec = spec.model_copy(update={"schedule": resolve_schedule(spec.schedule)})
        from bench.models.recipe import training_budget

        # The budget is part of what a trained model is: a changed budget table is a different run.
        training = {"schedule": spec.schedule, "val_fraction": spec.val_fraction, "seed": spec.seed,
                    "budget": training_budget(spec.schedule).to_dict()}
        # --- transfer learning and training fractions (bench.models.transfer, bench.fractions) ---
        # added only when used, so the ids of existing runs do not change
        from bench.models.pretrain import check_pool_disjoint, checkpoint_provenance
        from bench.models.transfer import checkpoint_identity, declared_checkpoint

        if (found := declared_checkpoint(submission.manifest.recipe, submission.path, schedule=spec.schedule, results_dir=spec.results_dir)) is not None:
            config, weights = found
            check_pool_disjoint(checkpoint_provenance(weights), dataset, weights=weights)  # never pre-trained on the benchmark's data
            training["transfer"] = checkpoint_identity(config, weights)  # the checkpoint's declaration and content hash
        if spec.train_fraction != FULL_TRAINING:
            training["train_fraction"] = spec.train_fraction
        # --- end ---
    identity = run_id(
        training=training,
        submission_hash=submission.content_hash,
        dataset_version=dataset.version,
        preprocessing_id=preprocessing_id,
        protocol=spec.protocol,
        folds=spec.folds,
        seed=spec.seed,
        convention=spec.convention,
        lesion_rule=spec.lesion_rule,
        sandbox=spec.sandbox,
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
        lesion_rule=spec.lesion_rule,
        isolation=ISOLATION_SANDBOX if spec.sandbox else ISOLATION_NONE,
    )
    cost = 0
    if submission.trains:
        cost = 2 if (submission.manifest.recipe or {}).get("trainer") == "nnunet" else 1
    return PlannedRun(identity, submission.name, tuple(FoldUnit(spec, identity, fold, cost) for fold in folds))


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


def run_benchmark(
    specs: Sequence[RunSpec],
    *,
    workers: int = 1,
    on_result: Callable[[UnitResult], None] | None = None,
    executor: Executor | None = None,
) -> dict[str, list[UnitResult]]:
    """Plan every run, execute all their units with ``executor`` (default a :class:`LocalExecutor` of
    ``workers`` processes), close the runs.

    Returns the unit results per run id. Safe to call again after an interruption: finished cases are
    skipped, finished trainings are loaded from their run folder. An executor that knows better than
    this machine what ``auto`` means (a Ray cluster whose workers have the GPUs) has ``schedule_for``.
    """
    from bench.store import Store

    executor = executor if executor is not None else LocalExecutor(workers)
    if (schedule_for := getattr(executor, "schedule_for", None)) is not None:
        specs = [spec.model_copy(update={"schedule": schedule_for(spec.schedule)}) for spec in specs]
    planned = [plan_run(spec) for spec in specs]
    try:
        # longest first, whatever the executor: the last long unit must not run alone while other workers idle
        results = executor.map(longest_first([unit for run in planned for unit in run.units]), on_result)
    finally:
        close_shared_predictors()
    by_run: dict[str, list[UnitResult]] = {run.run_id: [] for run in planned}
    for result in results:
        by_run[result.run_id].append(result)
    for spec, run in zip(specs, planned):
        unit_results = by_run[run.run_id]
        # a run none of whose cases scored is a failed run, even when every unit finished cleanly
        nothing_scored = bool(unit_results) and not any(r.scored or r.skipped for r in unit_results)
        Store.from_url(spec.db_url).finish_run(
            run.run_id,
            status="failed" if nothing_scored or any(r.error for r in unit_results) else "done",
            error=f"every case failed ({sum(r.failed for r in unit_results)}); the case rows say why" if nothing_scored else None,
            timings={"train_s": sum(r.train_s for r in unit_results), "wall_s": sum(r.wall_s for r in unit_results)},
            peak_memory_mb=max((r.peak_memory_mb for r in unit_results), default=None),
            budget=budget_summary(unit_results),
        )
    return by_run
