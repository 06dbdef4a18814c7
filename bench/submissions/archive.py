"""``bench submission add ARCHIVE.zip``: unpack a submission from someone else, safely.

Archives come from other people, so every member is checked *before* anything is written:
absolute paths, ``..`` components, symbolic links and other special files, encrypted members, too many
files and too many uncompressed bytes are all refused (a "zip slip" or "zip bomb" never touches the
disk). Members are then extracted into a temporary folder inside the submissions folder, counting bytes
as they are written, the manifest and files are checked statically (no submission code runs), and only
then is the folder renamed to ``<submissions_dir>/<name>`` in one step.

The archive may hold the submission at its root or inside one top-level folder; macOS ``__MACOSX/``
metadata is ignored.
"""

from __future__ import annotations

import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bench.submissions.core import Problem, SubmissionError
from bench.submissions.manifest import MANIFEST_NAME

_IGNORED_PREFIXES = ("__MACOSX/",)
_IGNORED_NAMES = {".DS_Store"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """Limits on what an archive may unpack to."""

    max_total_bytes: int = 2 * 1024**3
    max_files: int = 10_000


class ArchiveError(ValueError):
    """The archive is unsafe or unusable; ``problems`` names each offending member."""

    def __init__(self, archive: Path, problems: list[Problem]):
        self.archive = archive
        self.problems = problems
        super().__init__(f"{archive}: refused\n" + "\n".join(f"  - {p}" for p in problems))


def member_problem(info: zipfile.ZipInfo) -> Problem | None:
    """Why one member is unsafe to extract, or ``None``."""
    name = info.filename
    fix = "re-create the archive from the submission folder with relative paths only (e.g. zip -r sub.zip sub/)"
    if "\x00" in name:
        return Problem("error", repr(name), "member name contains a NUL byte", fix)
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        return Problem("error", name, "absolute path", fix)
    if ".." in normalized.split("/"):
        return Problem("error", name, "path contains '..' (it would be written outside the target folder)", fix)
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return Problem("error", name, "symbolic link", "replace links with copies of the files (zip without -y)")
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return Problem("error", name, "special file (device, FIFO or socket)", "archive regular files only")
    if info.flag_bits & 0x1:
        return Problem("error", name, "encrypted member", "archive without a password")
    return None


def add_submission_archive(
    archive: str | Path,
    submissions_dir: str | Path = "submissions",
    *,
    limits: ArchiveLimits = ArchiveLimits(),
    replace: bool = False,
) -> tuple[Path, list[Problem]]:
    """Unpack ``archive`` into ``<submissions_dir>/<manifest name>`` and return it with any warnings.

    Raises:
        ArchiveError: the archive is not a zip, or is unsafe (see the module docstring).
        SubmissionError: the unpacked submission fails the static checks, or the target exists and
            ``replace`` is false. Nothing is left behind in either case.
    """
    archive = Path(archive)
    submissions_dir = Path(submissions_dir)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(archive, [Problem("error", archive.name, f"not a readable zip archive ({exc})", "pass a .zip file")]) from exc
    with zf:
        members = _checked_members(archive, zf, limits)
        submissions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=submissions_dir))
        try:
            _extract(archive, zf, members, staging, limits)
            return _install(staging, submissions_dir, replace)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _checked_members(archive: Path, zf: zipfile.ZipFile, limits: ArchiveLimits) -> dict[str, zipfile.ZipInfo]:
    """Relative destination path -> member, after every safety check (raises :class:`ArchiveError`)."""
    infos = [i for i in zf.infolist() if not i.filename.startswith(_IGNORED_PREFIXES)]
    problems = [p for p in map(member_problem, infos) if p is not None]
    if len(infos) > limits.max_files:
        problems.append(Problem("error", archive.name, f"{len(infos)} members, more than the limit of {limits.max_files}",
                                "remove caches and intermediate files, or raise --max-files"))
    total = sum(i.file_size for i in infos)
    if total > limits.max_total_bytes:
        problems.append(Problem("error", archive.name, f"unpacks to {total} bytes, more than the limit of {limits.max_total_bytes}",
                                "ship smaller files, or raise --max-bytes if the size is expected"))
    if problems:
        raise ArchiveError(archive, problems)
    files = [i for i in infos if not i.is_dir() and PurePosixPath(i.filename).name not in _IGNORED_NAMES]
    names = [PurePosixPath(i.filename.replace("\\", "/")) for i in files]
    prefix = _common_top_folder(names)
    members = {}
    for info, name in zip(files, names):
        relative = PurePosixPath(*name.parts[len(prefix.parts):]) if prefix else name
        if relative.as_posix() in members:
            raise ArchiveError(archive, [Problem("error", info.filename, "duplicate member", "archive each file once")])
        members[relative.as_posix()] = info
    if MANIFEST_NAME not in members:
        raise ArchiveError(archive, [Problem("error", archive.name, f"no {MANIFEST_NAME} at the top of the archive (or of its only folder)",
                                             f"zip the submission folder that contains {MANIFEST_NAME}")])
    return members


def _common_top_folder(names: list[PurePosixPath]) -> PurePosixPath | None:
    """The single top-level folder holding everything, when the manifest is not at the root."""
    if not names or any(len(n.parts) < 2 for n in names):
        return None
    tops = {n.parts[0] for n in names}
    return PurePosixPath(tops.pop()) if len(tops) == 1 else None


def _extract(archive: Path, zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], staging: Path, limits: ArchiveLimits) -> None:
    written = 0
    root = staging.resolve()
    for relative, info in members.items():
        target = (staging / relative).resolve()
        if root not in target.parents:  # defence in depth: the member checks already exclude this
            raise ArchiveError(archive, [Problem("error", info.filename, "would be written outside the target folder", "use relative paths")])
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as source, open(target, "wb") as destination:
            member_bytes = 0
            while block := source.read(_CHUNK):
                member_bytes += len(block)
                written += len(block)
                # zipfile stops at the declared size, but count anyway: declared sizes come from the sender
                if member_bytes > info.file_size or written > limits.max_total_bytes:
                    raise ArchiveError(archive, [Problem("error", info.filename, "unpacks to more bytes than declared or allowed",
                                                         "re-create the archive; it looks corrupt or malicious")])
                destination.write(block)


def _install(staging: Path, submissions_dir: Path, replace: bool) -> tuple[Path, list[Problem]]:
    from bench.submissions.core import load_submission
    from bench.submissions.verify import verify_submission

    problems = verify_submission(staging, run_model=False)
    if any(p.severity == "error" for p in problems):
        raise SubmissionError(staging, problems)
    name = load_submission(staging).name
    target = submissions_dir / name
    if target.exists():
        if not replace:
            raise SubmissionError(target, [Problem("error", str(target), "a submission with this name already exists",
                                                   "pass --replace to overwrite it, or change 'name' in submission.yaml")])
        retired = Path(tempfile.mkdtemp(prefix=".replaced-", dir=submissions_dir))
        target.rename(retired / name)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)
    return target, problems
