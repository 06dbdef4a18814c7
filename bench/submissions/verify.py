"""``bench submission verify``: strict checks that a submission will run in the benchmark.

:func:`verify_submission` returns every :class:`~bench.submissions.core.Problem` it finds, each with
where it is and how to fix it; a submission passes when none has severity ``error``. It checks, in order:

1. the manifest: YAML syntax, schema (required fields, unknown fields, values of its kind), and no
   placeholder left from the scaffold (an author "Your Name", a "TODO" in the description or authors);
2. the folder: no symbolic links, every file the manifest names exists inside the folder, model
   formats parse, MONAI bundles and nnU-Net checkpoints need no code evaluation (unless trusted);
3. a probe run (unless ``run_model=False``): the model predicts the built-in synthetic probe case
   (:mod:`bench.submissions.probe`) twice, in a worker process under the time limit; crashes, timeouts,
   wrong shapes or label values and non-deterministic output are errors. ``predictions`` submissions are
   checked file by file instead, and against every case of ``dataset`` when one is given; other kinds
   also predict the first case of ``dataset``.

``dataset`` is resolved as ``bench run --dataset`` resolves it: a dataset folder, or a name under the
data root (:func:`bench.data.dataset.find_dataset`; ``HIE_BENCH_DATA_ROOT``, default ``datasets``).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.submissions.core import PredictionError, Problem, Submission, _load_manifest, iter_content_files
from bench.submissions.manifest import MANIFEST_NAME
from bench.submissions.probe import PROBE_CASE_ID, write_probe_case
from bench.submissions.scaffold import PLACEHOLDER_AUTHOR, PLACEHOLDER_MARK

if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Case

_MAX_LISTED_CASES = 10


def verify_submission(
    path: str | Path,
    *,
    dataset: str | Path | None = None,
    trust_code: bool = False,
    time_limit_s: float | None = None,
    run_model: bool = True,
    device: str = "auto",
    isolate: bool | None = None,
    data_root: str | Path | None = None,
    sandbox: bool = True,
) -> list[Problem]:
    """Check a submission folder; an empty list (or only warnings) means it passes.

    Args:
        path: the submission folder.
        dataset: optional dataset, a folder or a name under ``data_root``; ``predictions`` are checked
            against all its cases, models are also run on its first case.
        trust_code: allow code evaluation where the manifest has ``allow_code: true``.
        time_limit_s: per-case limit for the probe runs; default the manifest's ``time_limit_s``.
        run_model: ``False`` limits verification to static checks (no submission code runs); used when
            an archive is added.
        device: device for the probe runs.
        isolate: run the model in a worker process (default: yes for every kind that runs code;
            ``python`` submissions are always isolated). ``False`` skips the worker start-up, for tests.
        data_root: where dataset names are looked up (default: the settings' data root).
    """
    folder = Path(path).resolve()
    manifest, problems = _load_manifest(folder)
    if manifest is None:
        return problems
    submission = Submission(path=folder, manifest=manifest)
    problems += _placeholder_problems(manifest)
    problems += _folder_problems(submission)
    from bench.submissions.kinds import KIND_LOADERS

    problems += KIND_LOADERS[submission.kind].check(submission, trust_code=trust_code)
    if _has_errors(problems) or not run_model or submission.trains:
        # the model does not run, but the dataset named is still checked, so one call reports every problem
        return problems + _header_problems(_dataset_cases(dataset, problems, data_root))
    dataset_cases = _dataset_cases(dataset, problems, data_root)
    with tempfile.TemporaryDirectory(prefix="hiebench-probe-") as probe_dir:
        probe = write_probe_case(probe_dir)
        predictor = submission.predictor(time_limit_s=time_limit_s, device=device, trust_code=trust_code, isolate=isolate, sandbox=sandbox)
        with predictor:
            if submission.kind == "predictions":
                problems += _check_predictions(predictor, probe, dataset_cases)
            else:
                problems += _probe_model(predictor, probe, dataset_cases[:1])
    return problems


def _has_errors(problems: list[Problem]) -> bool:
    return any(p.severity == "error" for p in problems)


def _placeholder_problems(manifest: Any) -> list[Problem]:
    """The scaffold's placeholders still in the manifest: a leaderboard would show them as if real."""
    problems = []
    for author in manifest.authors:
        if author.strip().casefold() == PLACEHOLDER_AUTHOR.casefold() or _marked(author):
            problems.append(Problem("error", f"{MANIFEST_NAME}: authors", f"placeholder author {author!r}",
                                    "list the real author names under 'authors' (or scaffold with --author NAME)"))
    if _marked(manifest.description):
        problems.append(Problem("error", f"{MANIFEST_NAME}: description", f"the description still holds the placeholder {PLACEHOLDER_MARK!r}",
                                "describe the model: architecture, training data and schedule (or scaffold with --description TEXT)"))
    return problems


def _marked(text: str) -> bool:
    return re.search(rf"\b{PLACEHOLDER_MARK}\b", text) is not None


def _folder_problems(submission: Submission) -> list[Problem]:
    """Every entry that is a link or not a regular file (each reported, not only the first)."""
    from bench.submissions.core import SubmissionError, _content_target

    problems = []
    for relative in iter_content_files(submission.path):
        if (submission.path / relative).is_symlink():
            problems.append(Problem("error", relative.as_posix(), "is a symbolic link",
                                    "replace the link with a copy of the file: submissions must be self-contained"))
            continue
        try:
            _content_target(submission.path, relative)
        except SubmissionError as exc:
            problems += exc.problems
    return problems


def _dataset_cases(dataset: str | Path | None, problems: list[Problem], data_root: str | Path | None) -> list["Case"]:
    if dataset is None:
        return []
    from bench.data.dataset import Dataset, DatasetError, find_dataset
    from bench.settings import BenchSettings

    try:
        folder = find_dataset(dataset, data_root if data_root is not None else BenchSettings().data_root)
        return list(Dataset.load(folder).cases)
    except DatasetError as exc:
        problems.append(Problem("error", f"--dataset {dataset}", str(exc),
                                "pass a dataset folder or the name of one under the data root (bench data list shows them)"))
        return []


def _header_problems(cases: list["Case"]) -> list[Problem]:
    """One problem per dataset image whose header cannot be read or declares an impossible grid
    (:func:`bench.imageio.read_header`: bounded, no voxel is read)."""
    from bench.imageio import ImageError, read_header

    problems = []
    for case in cases:
        for path in case.image_paths:
            try:
                read_header(path)
            except ImageError as exc:
                problems.append(Problem("error", f"dataset case {case.case_id}", str(exc), "repair or re-export the image (bench data verify checks a whole dataset)"))
    return problems


def _problem_from(error: PredictionError, where: str) -> Problem:
    return Problem("error", where, error.message, error.fix)


def _probe_model(predictor: Any, probe: "Case", extra_cases: list["Case"]) -> list[Problem]:
    where = f"probe case {PROBE_CASE_ID}"
    try:
        first = predictor.predict(probe)
        second = predictor.predict(probe)
    except PredictionError as exc:
        return [_problem_from(exc, where)]
    problems = []
    if not np.array_equal(first, second):
        differing = int(np.count_nonzero(first != second))
        problems.append(Problem("error", where, f"two runs on the same case differ in {differing} voxels (non-deterministic output)",
                                "seed every random generator, disable dropout (model.eval()) and test-time randomness, "
                                "and use deterministic algorithms"))
    for case in extra_cases:
        try:
            predictor.predict(case)
        except PredictionError as exc:
            problems.append(_problem_from(exc, f"dataset case {case.case_id}"))
    return problems


def _check_predictions(predictor: Any, probe: "Case", dataset_cases: list["Case"]) -> list[Problem]:
    from bench.submissions.core import MissingPrediction

    problems: list[Problem] = []
    shipped = predictor.submission.manifest.folder
    if PROBE_CASE_ID in _shipped_case_ids(predictor.submission):
        try:
            predictor.predict(probe)
        except PredictionError as exc:
            problems.append(_problem_from(exc, f"{shipped}/{PROBE_CASE_ID}"))
    missing = []
    for case in dataset_cases:
        try:
            predictor.predict(case)
        except MissingPrediction:
            missing.append(case.case_id)
        except PredictionError as exc:
            problems.append(_problem_from(exc, f"dataset case {case.case_id}"))
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED_CASES]) + (" ..." if len(missing) > _MAX_LISTED_CASES else "")
        problems.append(Problem("error", f"{shipped}/", f"no mask for {len(missing)} of {len(dataset_cases)} dataset cases: {listed}",
                                f"add {shipped}/<case_id>.nii.gz for every case of the dataset"))
    return problems


def _shipped_case_ids(submission: Submission) -> set[str]:
    from bench.submissions.kinds import PredictionsLoader

    return set(PredictionsLoader.files(submission))
