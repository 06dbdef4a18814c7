"""Training one fold of a trainable submission, in a sandbox that holds only that fold's training cases.

Contract. :func:`train_fold` fits the submission's recipe on a fold's training and validation cases into
the fold's model folder and exports the fitted fold as a submission folder of a predicting kind,
``<model folder>/submission`` (:meth:`~bench.submissions.kinds.TrainableLoader.export_fold`: TorchScript,
nnU-Net or python). The harness scores that export through the per-case prediction sandbox, like any
upload; nothing trained ever predicts in the benchmark's own process. It returns a :class:`TrainedFold`.

With ``sandbox=True`` (the default) the fit runs in a bubblewrap sandbox
(:mod:`bench.submissions.sandbox`) whose file system holds, beyond the system and Python:

==============================  =================================================================  ====
inside                          host                                                               mode
==============================  =================================================================  ====
``/train/<case id>/``           this fold's training and validation cases: ``0000.nii.gz`` ...     ro
                                (the channels, hard links) and ``label.nii.gz``
``/model``                      the fold's model folder (``results/runs/<run>/models/<fold>``)     rw
``/cache``                      a view of the preprocessing cache with this fold's cases only      rw
``/submission``                 the submission folder (its recipe and any files it names)          ro
``/results/pretrain/<id>``      the ``bench pretrain`` runs the recipe names by id, nothing else   ro
``/work``, ``/tmp``             private, as for prediction                                         rw
==============================  =================================================================  ====

The fold's test cases, other cases, the dataset root, the results folder and its database, and the shared
cache (which holds other folds' cases, labels included) are never mounted. The cache view is a folder
beside the shared cache into which the entries of this fold's cases are hard-linked before training;
afterwards new entries are linked back, but only regular files named like cache entries of this fold's
cases (``<preprocessing id>/<case id>.<hash>.npz``). Training limits (:data:`TRAINING_LIMITS`) are the
benchmark's, not the manifest's: a recipe is data that the benchmark's own trainers run, and the
training budget (:mod:`bench.models.recipe`) already bounds the work.

Without the sandbox (``--unsafe-no-sandbox``) :func:`fit_and_export` runs in this process on the host paths.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Sequence

from bench.submissions.sandbox import (
    SANDBOX_CACHE,
    SANDBOX_MODEL,
    SANDBOX_SUBMISSION,
    SANDBOX_TRAIN,
    Limits,
    SandboxConfig,
    SandboxLayout,
    SandboxUnavailable,
    sandbox_unavailable_reason,
    stage_file,
    wants_gpu,
)

if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Case
    from bench.submissions.core import Submission

#: Sub-folder of a fold's model folder that holds its exported submission.
EXPORT_FOLDER = "submission"
#: Limits of a training sandbox. Memory: a CPU fit of the shipped networks needs 3-6 GiB of address space;
#: CPU time is bounded by the training budget, so only the wall clock (below) stops a runaway.
TRAINING_LIMITS = Limits(memory_mb=32768, cpu_s=30 * 24 * 3600, file_size_mb=8192, open_files=8192)
#: Wall-clock limit of one fold's training.
TRAINING_TIME_LIMIT_S = 72 * 3600.0
#: Where the pretrain runs a recipe names by id appear inside (``/results/pretrain/<id>``, read-only).
SANDBOX_RESULTS = PurePosixPath("/results")
#: Sub-folder of a results folder holding ``bench pretrain`` runs (:data:`bench.models.transfer.PRETRAIN_FOLDER`).
PRETRAIN_FOLDER = "pretrain"
_RUN_ID = re.compile(r"^[0-9a-f]{16}$")
#: Cache entries that may come back from a training sandbox: ``<preprocessing id>/<case id>.<hash>.npz``.
_CACHE_ENTRY = re.compile(r"^(?P<case>[A-Za-z0-9][A-Za-z0-9_.-]*)\.[0-9a-f]{8,128}\.npz$")


@dataclass(frozen=True)
class TrainedFold:
    """A fitted fold: its exported submission folder, the training budget it used, its wall time."""

    export_dir: Path
    budget: dict | None
    train_s: float


def train_fold(
    submission: "Submission",
    train_cases: Sequence["Case"],
    val_cases: Sequence["Case"],
    model_dir: Path,
    *,
    schedule: str,
    cache_dir: Path | None = None,
    sandbox: bool = True,
    secrets: Sequence[Path] = (),
    results_dir: Path | None = None,
    label: str = "training",
) -> TrainedFold:
    """Fit and export one fold (see the module docstring); ``secrets`` are folders the fit must not see
    (the results folder, the dataset root), checked against the sandbox's mounts before it starts.
    ``results_dir`` is where ``bench pretrain`` runs that the recipe names by id are found."""
    model_dir = Path(model_dir).resolve()
    model_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cases = [*train_cases, *val_cases]
    request = {"submission": str(submission.path.resolve()), "schedule": schedule, "model_dir": str(model_dir),
               "cache_dir": str(cache_dir) if cache_dir is not None else None,
               "cases": [_case_json(c) for c in cases], "val_ids": [c.case_id for c in val_cases],
               "results_dir": str(Path(results_dir).resolve()) if results_dir is not None else None}
    if sandbox:
        reply = _fit_in_sandbox(submission, request, cases, secrets=[*secrets, *_dataset_folders(cases)], label=label)
    else:
        reply = fit_and_export(request)
    return TrainedFold(model_dir / EXPORT_FOLDER, reply.get("budget"), time.perf_counter() - start)


def fit_and_export(request: dict[str, Any]) -> dict[str, Any]:
    """The fit itself (in the sandboxed worker, or in this process): ``{"budget": dict or None}``."""
    from bench.submissions.core import load_submission
    from bench.submissions.kinds import KIND_LOADERS

    if request.get("results_dir"):  # where the trainers look up pretrain run ids (bench.models.transfer)
        os.environ["HIE_BENCH_RESULTS_DIR"] = request["results_dir"]
    submission = load_submission(request["submission"])
    cases = {c.case_id: c for c in map(_case_from_json, request["cases"])}
    val_ids = set(request["val_ids"])
    train = [c for i, c in cases.items() if i not in val_ids]
    val = [cases[i] for i in request["val_ids"]]
    cache_dir = Path(request["cache_dir"]) if request.get("cache_dir") else None
    trainable = submission.trainable(schedule=request["schedule"], cache_dir=cache_dir)
    model_dir = Path(request["model_dir"])
    fitted = trainable.fit(train, val, model_dir)
    used = getattr(fitted, "budget_used", None)
    getattr(fitted, "close", lambda: None)()  # the export predicts; free the trained one
    KIND_LOADERS[submission.kind].export_fold(model_dir, model_dir / EXPORT_FOLDER)
    return {"budget": used.to_dict() if used is not None else None}


# -- the sandbox ---------------------------------------------------------------------------------------


def _fit_in_sandbox(submission: "Submission", request: dict[str, Any], cases: Sequence["Case"], *,
                    secrets: Sequence[Path], label: str) -> dict[str, Any]:
    from bench.submissions.core import PredictorOptions
    from bench.submissions.predictors import SANDBOX_FIX, _Worker

    reason = sandbox_unavailable_reason()
    if reason is not None:
        raise SandboxUnavailable(label, f"the training sandbox cannot start: {reason}", SANDBOX_FIX)
    host_cache = Path(request["cache_dir"]) if request.get("cache_dir") else None
    layout = SandboxLayout.create()
    view = _cache_view(host_cache, [c.case_id for c in cases]) if host_cache is not None else None
    try:
        config, inside = training_sandbox(submission, request, layout, view)
        worker = _Worker(submission, PredictorOptions(), TRAINING_TIME_LIMIT_S, sandbox=config)
        try:
            return worker.train({"train": inside}, label, hidden=[*secrets, *([host_cache] if host_cache else [])])
        finally:
            worker.close()
            if view is not None:
                _merge_cache_view(view, host_cache, {c.case_id for c in cases})
    finally:
        layout.remove()
        if view is not None:
            shutil.rmtree(view, ignore_errors=True)


def training_sandbox(submission: "Submission", request: dict[str, Any], layout: SandboxLayout,
                     cache_view: Path | None) -> tuple[SandboxConfig, dict[str, Any]]:
    """The sandbox of one fold's fit (the table of the module docstring) and the request as seen inside:
    the fold's cases staged into ``layout``, paths rewritten to ``/train``, ``/model``, ``/cache``."""
    train_root = layout.root / "train"
    inside = {**request, "cases": _stage_cases(request["cases"], train_root), "submission": str(SANDBOX_SUBMISSION),
              "model_dir": str(SANDBOX_MODEL), "cache_dir": str(SANDBOX_CACHE) if cache_view is not None else None,
              "results_dir": str(SANDBOX_RESULTS)}
    extra = [(train_root, SANDBOX_TRAIN, False), (Path(request["model_dir"]), SANDBOX_MODEL, True)]
    extra += [(folder, SANDBOX_RESULTS / PRETRAIN_FOLDER / folder.name, False)
              for folder in pretrain_folders(submission.manifest.recipe, request.get("results_dir"))]
    if cache_view is not None:
        extra.append((cache_view, SANDBOX_CACHE, True))
    config = SandboxConfig(layout=layout, submission_dir=submission.path.resolve(), limits=TRAINING_LIMITS,
                           gpu=wants_gpu("auto"), extra=tuple(extra))
    return config, inside


def pretrain_folders(recipe: Any, results_dir: str | Path | None) -> list[Path]:
    """The ``<results>/pretrain/<run id>`` folders of the pretrain runs a recipe names by id (any
    ``checkpoint`` value of 16 hex digits, at any depth: the recipe's and its schedules' transfer blocks);
    only these, never the rest of the results folder, are mounted into the training sandbox."""
    if results_dir is None:
        return []
    found: list[Path] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "checkpoint" and isinstance(item, str) and _RUN_ID.match(item):
                    found.append(Path(results_dir) / PRETRAIN_FOLDER / item)
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(recipe)
    return sorted({f for f in found if f.is_dir() and not f.is_symlink()})


def _stage_cases(cases: list[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    """Hard-link each case's channels and label into ``root/<case id>/``; the cases with their inside paths."""
    staged = []
    for case in cases:
        folder = root / case["case_id"]
        folder.mkdir(parents=True)
        inside = SANDBOX_TRAIN / case["case_id"]
        images = [str(stage_file(Path(p), folder, f"{i:04d}", inside)) for i, p in enumerate(case["image_paths"])]
        label = str(stage_file(Path(case["label_path"]), folder, "label", inside)) if case.get("label_path") else None
        staged.append({**case, "image_paths": images, "label_path": label})
    return staged


def _cache_view(cache_dir: Path, case_ids: Sequence[str]) -> Path:
    """A folder beside the shared cache holding hard links to the cache entries of ``case_ids`` only."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    view = Path(tempfile.mkdtemp(prefix=".fold-view-", dir=cache_dir))
    wanted = set(case_ids)
    for entry in _entries(cache_dir, wanted):
        target = view / entry.relative_to(cache_dir)
        target.parent.mkdir(exist_ok=True)
        _link(entry, target)
    return view


def _merge_cache_view(view: Path, cache_dir: Path, case_ids: set[str]) -> None:
    """Link entries the fit wrote in ``view`` back into the shared cache (this fold's cases only)."""
    for entry in _entries(view, case_ids):
        target = cache_dir / entry.relative_to(view)
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            _link(entry, target)


def _entries(root: Path, case_ids: set[str]) -> list[Path]:
    """Regular files ``root/<preprocessing id>/<case id>.<hash>.npz`` of ``case_ids`` (no links, no folders)."""
    found = []
    for folder in root.iterdir():
        if folder.name.startswith(".") or folder.is_symlink() or not folder.is_dir():
            continue
        for entry in folder.iterdir():
            match = _CACHE_ENTRY.match(entry.name)
            if match and match["case"] in case_ids and entry.is_file() and not entry.is_symlink():
                found.append(entry)
    return found


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except FileExistsError:
        pass
    except OSError:
        shutil.copy2(source, target)


def _dataset_folders(cases: Sequence["Case"]) -> list[Path]:
    from bench.submissions.predictors import hidden_paths

    return sorted({folder for case in cases for folder in hidden_paths(case)})


def _case_json(case: "Case") -> dict[str, Any]:
    return {"case_id": case.case_id, "site": case.site, "image_paths": [str(p) for p in case.image_paths],
            "label_path": str(case.label_path) if case.label_path is not None else None,
            "channel_names": list(case.channel_names)}


def _case_from_json(data: dict[str, Any]) -> "Case":
    from bench.data.dataset import Case

    return Case(case_id=data["case_id"], site=data["site"], image_paths=tuple(Path(p) for p in data["image_paths"]),
                label_path=Path(data["label_path"]) if data.get("label_path") else None,
                channel_names=tuple(data["channel_names"]))


__all__ = ["EXPORT_FOLDER", "TRAINING_LIMITS", "TrainedFold", "fit_and_export", "train_fold"]
