"""Submissions: a folder with ``submission.yaml`` is a model entered in the benchmark.

Only this package knows model formats. The rest of HIE-Bench uses::

    submission = load_submission("submissions/zadc-threshold")    # validates the manifest
    submission.content_hash, submission.preprocessing_id           # stored in run ids / result rows
    with submission.predictor() as predictor:                      # every kind except trainable
        mask = predictor.predict(case)                             # bool, case's native grid
    trainable = submission.trainable(schedule="auto")              # kind trainable: fit() per fold

and ``verify_submission(path)`` / ``scaffold_submission(name, kind)`` / ``add_submission_archive(zip)``
behind ``bench submission verify|new|add``. Modules: :mod:`.manifest` (schema), :mod:`.core`
(Submission, errors, content hash), :mod:`.kinds` (the registry of loaders), :mod:`.predictors` (worker
processes with time limits), :mod:`.verify`, :mod:`.archive`, :mod:`.scaffold`, :mod:`.probe`.
"""

from bench.submissions.archive import ArchiveError, ArchiveLimits, add_submission_archive
from bench.submissions.core import (
    NATIVE_PREPROCESSING_ID,
    InvalidPrediction,
    MissingPrediction,
    PredictionCrash,
    PredictionError,
    PredictionTimeout,
    PredictorOptions,
    Problem,
    Submission,
    SubmissionError,
    content_hash,
    load_submission,
    validate_mask,
)
from bench.submissions.kinds import KIND_LOADERS, KindLoader
from bench.submissions.manifest import KINDS, MANIFEST_NAME, SubmissionManifest, parse_manifest
from bench.submissions.predictors import SubmissionPredictor
from bench.submissions.probe import PROBE_CASE_ID, write_probe_case
from bench.submissions.sandbox import SandboxUnavailable, effective_limits, sandbox_unavailable_reason
from bench.submissions.scaffold import SCAFFOLD_KINDS, scaffold_submission
from bench.submissions.verify import verify_submission

__all__ = [
    "ArchiveError",
    "ArchiveLimits",
    "InvalidPrediction",
    "KINDS",
    "KIND_LOADERS",
    "KindLoader",
    "MANIFEST_NAME",
    "MissingPrediction",
    "NATIVE_PREPROCESSING_ID",
    "PROBE_CASE_ID",
    "PredictionCrash",
    "PredictionError",
    "PredictionTimeout",
    "PredictorOptions",
    "Problem",
    "SCAFFOLD_KINDS",
    "SandboxUnavailable",
    "Submission",
    "SubmissionError",
    "SubmissionManifest",
    "SubmissionPredictor",
    "add_submission_archive",
    "content_hash",
    "effective_limits",
    "load_submission",
    "parse_manifest",
    "sandbox_unavailable_reason",
    "scaffold_submission",
    "validate_mask",
    "verify_submission",
    "write_probe_case",
]
