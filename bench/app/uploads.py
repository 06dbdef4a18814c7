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
#: Label of the Submit page's checkbox that lets an upload replace an earlier one of the same name
#: (named here too, so that the problem raised by a name clash can point at it).
REPLACE_LABEL = "Replace an earlier upload with the same name"


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
    from bench.submissions.archive import declared_entries_in

    try:
        if (declared_entries_in(data) or 0) > UploadLimits().max_files:
            # Too many members to list safely: treat it as a submission archive, which
            # add_submission_archive then refuses (with the count) before parsing its directory.
            return True
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [PurePosixPath(n.replace("\\", "/")) for n in archive.namelist() if not n.startswith("__MACOSX/")]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return False
    return any(name.name == MANIFEST_NAME and len(name.parts) <= 2 for name in names)


def staged_name(filename: str) -> str:
    """The name the upload is saved under while it is checked: the browser's file name when it is a
    plain file name (it appears in messages), else ``upload.zip`` (the name comes from the browser:
    ``..``, NUL or a path must never become a path here)."""
    from bench.ids import file_name_problem

    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return name if file_name_problem(name) is None else "upload.zip"


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
    :class:`bench.submissions.Problem` rows. A refused upload (any error) leaves nothing on disk and
    claims no name: ``path`` is ``None`` and the same name can be uploaded again once fixed.
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
        archive = Path(staging) / staged_name(filename)
        archive.write_bytes(data)
        try:
            # Unpacked and verified inside the private staging folder: the submission's name is claimed
            # only by an upload that passed, so a refused one can be fixed and uploaded again as it is.
            unpacked, problems = add_submission_archive(
                archive, Path(staging) / "unpacked", limits=ArchiveLimits(max_total_bytes=limits.max_unpacked_bytes, max_files=limits.max_files)
            )
        except (ArchiveError, SubmissionError) as exc:
            return UploadResult(None, list(exc.problems))
        submission = load_submission(unpacked)
        problems += verify_without_code(unpacked, dataset_root=dataset_root)
        path = None
        if not any(p.severity == "error" for p in problems):
            path, clash = claim_name(unpacked, uploads_dir / submission.name, replace=replace)
            problems += [clash] if clash else []
    return UploadResult(path, problems, kind=submission.kind, name=submission.name)


def claim_name(folder: Path, target: Path, *, replace: bool) -> tuple[Path | None, Problem | None]:
    """Move a verified upload to ``target`` (``<uploads>/<name>``) in one rename; returns (path, problem).

    An earlier upload of that name stays unless ``replace``; the problem returned then names the page's
    checkbox (:data:`REPLACE_LABEL`), the control a person in the browser has, not a CLI flag.
    """
    import shutil

    from bench.submissions import Problem

    clash = Problem("error", target.name, "a submission with this name already exists",
                    f"tick '{REPLACE_LABEL}' above and check again, or change the name")
    if target.exists() and not replace:
        return None, clash
    retired = Path(tempfile.mkdtemp(prefix=".replaced-", dir=target.parent))
    try:
        if target.exists():
            target.rename(retired / target.name)
        try:
            folder.rename(target)
        except OSError:  # another session claimed the name between the check and the rename
            if (retired / target.name).exists() and not target.exists():
                (retired / target.name).rename(target)
            return None, clash
    finally:
        shutil.rmtree(retired, ignore_errors=True)
    return target, None


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

    The card's name must be a safe submission name (:func:`bench.ids.check_submission_name`), and the
    whole directory passes :func:`bench.submissions.archive.archive_problems` (names, links, counts,
    sizes, clashes) before any member is read; masks may sit in sub-folders (they are flattened), other
    files are left out, and each mask must be named after a safe case id. Each mask is copied in chunks
    with its CRC and declared size checked.

    Raises:
        ArchiveError: a bad name, an unsafe or damaged member, too many files or bytes, two masks with
            the same name, or no mask.
    """
    import yaml

    from bench.ids import IdentifierError, check_submission_name
    from bench.submissions import MANIFEST_NAME, ArchiveError, ArchiveLimits, Problem
    from bench.submissions.archive import archive_problems, copy_member, declared_entries_in, is_ignored

    where = Path(staged_name(filename))
    try:
        check_submission_name(card.name, "the predictions form")
    except IdentifierError as exc:
        raise ArchiveError(where, [Problem("error", "name", f"{ascii(card.name)} {exc.reason}",
                                           "use 1-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit")]) from exc
    entries = declared_entries_in(data)
    if entries is not None and entries > limits.max_files:
        raise ArchiveError(where, [Problem("error", where.name, f"declares {entries} members, more than the limit of {limits.max_files}", "upload fewer files")])
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        infos = [info for info in source.infolist() if not is_ignored(info)]
        archive_limits = ArchiveLimits(max_total_bytes=limits.max_unpacked_bytes, max_files=limits.max_files)
        problems = archive_problems(where.name, infos, archive_limits, fix_limits=" (upload fewer files, or compressed masks: .nii.gz)")
        if problems:
            raise ArchiveError(where, problems[:20])
        masks = _mask_members(where, infos)
        out, budget = io.BytesIO(), limits.max_unpacked_bytes
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as target:
            target.writestr(MANIFEST_NAME, yaml.safe_dump(card.manifest(), sort_keys=False))
            for base, info in sorted(masks.items()):
                with target.open(f"{PREDICTIONS_FOLDER}/{base}", "w") as destination:
                    budget -= copy_member(where, source, info, destination, budget)
    return out.getvalue()


def _mask_members(where: Path, infos: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """Mask file name -> member: image files only, each named ``<safe case id><image suffix>``, each once."""
    from bench.ids import identifier_problem
    from bench.imageio import strip_image_suffix
    from bench.submissions import ArchiveError, Problem

    masks: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        base = PurePosixPath(info.filename.replace("\\", "/")).name
        case_id = strip_image_suffix(base)
        if info.is_dir() or case_id is None:
            continue
        if (reason := identifier_problem(case_id)) is not None:
            raise ArchiveError(where, [Problem("error", info.filename, f"mask name {ascii(base)} is not <case_id>.nii.gz: the case id {reason}",
                                               "name each mask after its case id, e.g. case_001.nii.gz")])
        if base in masks:
            raise ArchiveError(where, [Problem("error", info.filename, f"a second mask named {base}", "keep one mask per case id")])
        masks[base] = info
    if not masks:
        raise ArchiveError(where, [Problem("error", where.name, "holds no mask files (.nii.gz, .nii, .mha, .nrrd)",
                                           "zip one mask per case named <case_id>.nii.gz")])
    return masks


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


def default_dataset(choices: dict[str, Path], store: Store | None, scope_version: str | None = None) -> int:
    """Index in ``choices`` (from :func:`available_datasets`) of the dataset a run should default to: the
    one in the sidebar's scope (``scope_version``), else the first the results database knows, else the
    first folder; never merely the first name under the data root (a demo cohort beside other results)."""
    labels = list(choices)
    if store is None or not labels or not store.has_results():
        return 0
    roots = store.datasets_frame()
    wanted = [Path(r).resolve() for r in roots.loc[roots["version"] == scope_version, "root"].dropna()] if scope_version else []
    wanted += [Path(r).resolve() for r in roots["root"].dropna()]
    for root in wanted:
        for index, label in enumerate(labels):
            if choices[label].resolve() == root:
                return index
    return 0


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
