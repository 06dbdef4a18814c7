"""From an uploaded zip to a verified submission folder and a queued benchmark run.

The Submit page accepts two kinds of archive:

* a **submission folder** archive: ``submission.yaml`` at the top (or inside one top-level folder),
  any kind (``python``, ``onnx``, ``predictions``, ...);
* a **zip of predictions**: one mask per case (``<case_id>.nii.gz``), no manifest; the page asks for
  name, authors and description and wraps the masks into a ``predictions`` submission.

Both go through :func:`bench.submissions.add_submission_archive`, which refuses absolute paths, ``..``
components, symbolic links, special files, encrypted members and archives over the size limits before
writing anything, and installs the folder atomically. Verification in the app runs no submission code:
``predictions`` are checked mask by mask against the dataset; other kinds get the static checks here
and the full probe run in ``bench worker`` (:mod:`bench.worker`), which also runs the benchmark. The
Streamlit process never runs a model.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.store import Store
    from bench.submissions import Problem

#: Folder name of the masks inside a wrapped predictions submission.
PREDICTIONS_FOLDER = "predictions"


@dataclass(frozen=True)
class UploadLimits:
    """Limits on an upload: the zip itself, what it unpacks to, and how many files it holds."""

    max_upload_bytes: int = 200 * 1024**2
    max_unpacked_bytes: int = 2 * 1024**3
    max_files: int = 10_000


@dataclass(frozen=True)
class PredictionsCard:
    """Manifest fields of a zip of predictions (the masks come without a ``submission.yaml``)."""

    name: str
    version: str = "1.0.0"
    authors: tuple[str, ...] = ("anonymous",)
    description: str = "Precomputed lesion masks uploaded in the HIE-Bench app."
    licence: str = "CC-BY-4.0"

    def manifest(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "authors": list(self.authors),
            "description": self.description,
            "licence": self.licence,
            "kind": "predictions",
            "folder": PREDICTIONS_FOLDER,
        }


@dataclass
class UploadResult:
    """What became of an upload: the installed folder (``None`` when refused) and every problem found."""

    path: Path | None
    problems: list[Problem] = field(default_factory=list)
    kind: str | None = None
    name: str | None = None

    @property
    def ok(self) -> bool:
        """Installed, and no problem of severity ``error``."""
        return self.path is not None and not any(p.severity == "error" for p in self.problems)


def has_manifest(data: bytes) -> bool:
    """Whether a zip holds ``submission.yaml`` at its top or inside its single top-level folder."""
    from bench.submissions import MANIFEST_NAME

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [PurePosixPath(n.replace("\\", "/")) for n in archive.namelist() if not n.startswith("__MACOSX/")]
    except zipfile.BadZipFile:
        return False
    return any(name.name == MANIFEST_NAME and len(name.parts) <= 2 for name in names)


def install_upload(
    data: bytes,
    filename: str,
    uploads_dir: str | Path,
    *,
    predictions: PredictionsCard | None = None,
    dataset_root: str | Path | None = None,
    limits: UploadLimits = UploadLimits(),
    replace: bool = False,
) -> UploadResult:
    """Unpack an uploaded zip safely into ``uploads_dir/<name>`` and verify it without running code.

    Args:
        data: The uploaded bytes.
        filename: The uploaded file's name (for messages).
        uploads_dir: Folder of uploaded submissions.
        predictions: Manifest fields used when the zip holds masks but no ``submission.yaml``.
        dataset_root: Check a ``predictions`` submission against every case of this dataset.
        limits: Size and file-count limits.
        replace: Overwrite an uploaded submission of the same name.

    Returns every problem (archive safety, manifest, files, masks) as
    :class:`bench.submissions.Problem` rows; nothing is left on disk when the archive is refused.
    """
    from bench.submissions import ArchiveError, ArchiveLimits, Problem, SubmissionError, add_submission_archive, load_submission

    if len(data) > limits.max_upload_bytes:
        return UploadResult(None, [Problem("error", filename, f"upload of {len(data):,} bytes is over the limit of {limits.max_upload_bytes:,}",
                                           "upload fewer or smaller files (compressed NIfTI, .nii.gz)")])
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return UploadResult(None, [Problem("error", filename, "not a zip archive", "upload a .zip of the submission folder or of the masks")])
    if not has_manifest(data):
        if predictions is None:
            return UploadResult(None, [Problem("error", filename, "no submission.yaml and no details for a predictions submission",
                                               "fill in the name and authors of the predictions, or zip a submission folder")])
        try:
            data = wrap_predictions(data, filename, predictions, limits)
        except ArchiveError as exc:
            return UploadResult(None, list(exc.problems))
    uploads_dir = Path(uploads_dir)
    uploads_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".upload-", dir=uploads_dir) as staging:
        archive = Path(staging) / Path(filename).name
        archive.write_bytes(data)
        try:
            path, problems = add_submission_archive(
                archive, uploads_dir, limits=ArchiveLimits(max_total_bytes=limits.max_unpacked_bytes, max_files=limits.max_files), replace=replace
            )
        except (ArchiveError, SubmissionError) as exc:
            return UploadResult(None, list(exc.problems))
    submission = load_submission(path)
    return UploadResult(path, problems + verify_without_code(path, dataset_root=dataset_root), kind=submission.kind, name=submission.name)


def verify_without_code(path: str | Path, *, dataset_root: str | Path | None = None) -> list[Problem]:
    """The checks the app may run itself: everything for ``predictions`` (masks read and checked
    against the dataset's cases), static checks (manifest, files, formats) for kinds that run code.

    Problems already reported by the static check of :func:`add_submission_archive` are not repeated.
    """
    from bench.submissions import load_submission, verify_submission

    kind = load_submission(path).kind
    if kind != "predictions":
        return []  # add_submission_archive has run the static checks; the probe run is the worker's
    problems = verify_submission(path, dataset=dataset_root, run_model=True)
    return [p for p in problems if p.severity == "error" or "ignored" not in p.message]


def wrap_predictions(data: bytes, filename: str, card: PredictionsCard, limits: UploadLimits = UploadLimits()) -> bytes:
    """A submission archive (``submission.yaml`` + ``predictions/``) made from a zip of masks.

    Every member is checked with :func:`bench.submissions.archive.member_problem` before it is read;
    masks may sit in sub-folders (they are flattened), other files are left out.

    Raises:
        ArchiveError: an unsafe member, too many files or bytes, two masks with the same name, or no mask.
    """
    import yaml

    from bench.imageio import strip_image_suffix
    from bench.submissions import MANIFEST_NAME, ArchiveError, Problem
    from bench.submissions.archive import member_problem

    where = Path(filename)
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        infos = [info for info in source.infolist() if not info.filename.startswith("__MACOSX/")]
        problems = [p for p in map(member_problem, infos) if p is not None]
        if len(infos) > limits.max_files:
            problems.append(Problem("error", filename, f"{len(infos)} files, more than the limit of {limits.max_files}", "upload fewer files"))
        total = sum(info.file_size for info in infos)
        if total > limits.max_unpacked_bytes:
            problems.append(Problem("error", filename, f"unpacks to {total:,} bytes, more than the limit of {limits.max_unpacked_bytes:,}",
                                    "upload compressed masks (.nii.gz)"))
        if problems:
            raise ArchiveError(where, problems)
        masks: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            base = PurePosixPath(info.filename.replace("\\", "/")).name
            if info.is_dir() or strip_image_suffix(base) is None:
                continue
            if base in masks:
                raise ArchiveError(where, [Problem("error", info.filename, f"a second mask named {base}", "keep one mask per case id")])
            masks[base] = info
        if not masks:
            raise ArchiveError(where, [Problem("error", filename, "holds no mask files (.nii.gz, .nii, .mha, .nrrd)",
                                               "zip one mask per case named <case_id>.nii.gz")])
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as target:
            target.writestr(MANIFEST_NAME, yaml.safe_dump(card.manifest(), sort_keys=False))
            for base, info in sorted(masks.items()):
                # zipfile stops reading at the declared size, which the checks above bounded.
                target.writestr(f"{PREDICTIONS_FOLDER}/{base}", source.read(info))
    return out.getvalue()


# -- datasets and the queue ----------------------------------------------------------------------------------------


def available_datasets(store: Store | None, data_root: str | Path) -> dict[str, Path]:
    """Dataset folders a run can use: those registered in the store that still exist, and those in ``data_root``.

    Returns ``label -> folder`` (label: the folder name, with the version when the store knows it).
    """
    from bench.data.dataset import list_datasets

    found: dict[Path, str] = {}
    if store is not None and store.has_results():
        for row in store.datasets_frame().itertuples():
            if row.root and Path(row.root).is_dir():
                found.setdefault(Path(row.root).resolve(), f"{row.name} ({row.version})")
    for folder in list_datasets(data_root):
        found.setdefault(folder.resolve(), folder.name)
    return {label: folder for folder, label in sorted(found.items(), key=lambda item: item[1])}


def run_spec(
    submission: str | Path,
    dataset: str | Path,
    *,
    db_url: str,
    results_dir: str | Path,
    protocol: str = "loso",
    folds: int = 5,
    seed: int = 0,
    convention: str = "bench",
    schedule: str = "auto",
) -> dict[str, Any]:
    """The JSON spec of a ``run`` job: a :class:`bench.harness.RunSpec` with absolute paths."""
    from bench.harness import RunSpec

    spec = RunSpec(
        submission=Path(submission).resolve(),
        dataset=Path(dataset).resolve(),
        protocol=protocol,  # type: ignore[arg-type]
        folds=folds,
        seed=seed,
        convention=convention,
        schedule=schedule,  # type: ignore[arg-type]
        results_dir=Path(results_dir).resolve(),
        db_url=db_url,
    )
    return spec.model_dump(mode="json")


def queue_run(store: Store, spec: dict[str, Any]) -> int:
    """Put a run on the store's job queue for ``bench worker``; returns the job id."""
    store.create_all()
    return store.enqueue_job(spec, kind="run")


def jobs_table(store: Store, *, limit: int = 50) -> Sequence[Any]:
    """The most recent jobs (newest first) as :class:`bench.store.JobRecord` objects."""
    if not store.has_results():
        return []
    return store.list_jobs(limit=limit)
