"""``bench submission add ARCHIVE.zip``: unpack a submission from someone else, safely.

Archives come from other people, so the whole central directory is checked *before* anything is
written, and every problem found is reported at once (:func:`member_problem`, :func:`archive_problems`):

- at most :attr:`ArchiveLimits.max_files` members (counted from the end record first,
  :func:`declared_entries_in`, before Python's ``zipfile`` parses the directory) and :attr:`ArchiveLimits.max_total_bytes` declared bytes;
- names: no NUL, no absolute or drive-letter path, no ``..``, ``.`` or empty component, each component
  a plain file name (:func:`bench.ids.check_file_name`: ASCII, at most 255 characters, so unicode
  look-alikes of ``/`` and ``.`` are refused), at most :attr:`ArchiveLimits.max_name_length`
  characters and :attr:`ArchiveLimits.max_depth` folders deep (a 2,000-deep path fails at once);
- no symbolic links, devices, FIFOs or sockets, no encrypted members, no duplicate names, and no name
  that is both a file and a folder (``a`` and ``a/b``).

Members are then streamed into a temporary folder inside the submissions folder: each one is
decompressed in chunks with its CRC-32 checked by ``zipfile``, and must produce exactly its declared
size (a "lying size" in either direction is refused) within the total. The manifest and files are
checked statically (no submission code runs), the manifest's name must be a safe identifier, and only
then is the folder renamed to ``<submissions_dir>/<name>`` in one step. Any failure, from a bad CRC or a
corrupt deflate stream to a full disk, is an :class:`ArchiveError` (or :class:`SubmissionError`) naming
the member and the fix, and the temporary folder is removed: nothing stays installed.

The archive may hold the submission at its root or inside one top-level folder; macOS ``__MACOSX/``
metadata and ``.DS_Store`` files are ignored (never written).
"""

from __future__ import annotations

import io
import lzma
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable

from bench.ids import IdentifierError, check_submission_name, file_name_problem
from bench.submissions.core import Problem, SubmissionError
from bench.submissions.manifest import MANIFEST_NAME

_IGNORED_PREFIXES = ("__MACOSX/",)
_IGNORED_NAMES = {".DS_Store"}
_CHUNK = 1 << 20
_FIX = "re-create the archive from the submission folder with relative paths only (e.g. zip -r sub.zip sub/)"
_CORRUPT_FIX = "the archive is damaged or was altered: create it again and re-upload"
#: Problems listed in one error, so that 10,000 bad members do not make a 10,000-line message.
_MAX_LISTED = 20
#: What reading a damaged member can raise, besides OSError: bad CRC / header, corrupt deflate, bzip2
#: or LZMA stream, truncated data, an unsupported compression method, a password.
_UNPACK_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, RuntimeError, ValueError, struct.error)


@dataclass(frozen=True)
class ArchiveLimits:
    """Limits on what an archive may unpack to."""

    max_total_bytes: int = 2 * 1024**3
    max_files: int = 10_000
    #: Longest member name (the whole relative path), in characters.
    max_name_length: int = 1024
    #: Most folders a member may sit in.
    max_depth: int = 32


class ArchiveError(ValueError):
    """The archive is unsafe or unusable; ``problems`` names each offending member."""

    def __init__(self, archive: Path, problems: list[Problem]):
        self.archive = archive
        self.problems = problems
        super().__init__(f"{archive}: refused\n" + "\n".join(f"  - {p}" for p in problems))


def member_problem(info: zipfile.ZipInfo, limits: ArchiveLimits = ArchiveLimits()) -> Problem | None:
    """Why one member is unsafe to extract (its name, type or encryption), or ``None``."""
    name = info.filename
    if "\x00" in info.orig_filename:  # zipfile cuts the name at a NUL; the archive still holds the rest
        return Problem("error", ascii(info.orig_filename), "member name contains a NUL byte", _FIX)
    shown = ascii(name)[1:-1] if len(name) <= 120 else ascii(name[:100])[1:-1] + f"... ({len(name)} characters)"
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        return Problem("error", shown, "absolute path", _FIX)
    parts = normalized.rstrip("/").split("/")
    if ".." in parts:
        return Problem("error", shown, "path contains '..' (it would be written outside the target folder)", _FIX)
    if len(name) > limits.max_name_length:
        return Problem("error", shown, f"name of {len(name)} characters, over the limit of {limits.max_name_length}", "use shorter file and folder names")
    if len(parts) - 1 > limits.max_depth:
        return Problem("error", shown, f"{len(parts) - 1} folders deep, over the limit of {limits.max_depth}", "flatten the folder structure")
    if any(part in ("", ".") for part in parts):
        return Problem("error", shown, "path has an empty or '.' component", _FIX)
    for part in parts:
        if (reason := file_name_problem(part)) is not None:
            return Problem("error", shown, f"name {ascii(part)[:80]} {reason}", "rename the file or folder with letters, digits, '.', '_', '+' or '-' only")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return Problem("error", shown, "symbolic link", "replace links with copies of the files (zip without -y)")
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return Problem("error", shown, "special file (device, FIFO or socket)", "archive regular files only")
    if info.flag_bits & 0x1:
        return Problem("error", shown, "encrypted member", "archive without a password")
    return None


def is_ignored(info: zipfile.ZipInfo) -> bool:
    """macOS metadata, never written (``__MACOSX/...``, ``.DS_Store``)."""
    name = info.filename.replace("\\", "/")
    return name.startswith(_IGNORED_PREFIXES) or PurePosixPath(name).name in _IGNORED_NAMES


def archive_problems(where: str, infos: list[zipfile.ZipInfo], limits: ArchiveLimits, *, fix_limits: str = "") -> list[Problem]:
    """Every problem of an archive's directory: unsafe members, counts, sizes, duplicates, file/folder clashes.

    ``fix_limits`` is appended to the fix of a count or size problem (``LIMIT`` is replaced by the option
    that raises that limit, e.g. ``", or raise LIMIT"``).
    """
    problems = [p for p in (member_problem(i, limits) for i in infos) if p is not None]
    if len(infos) > limits.max_files:
        problems.append(Problem("error", where, f"{len(infos)} members, more than the limit of {limits.max_files}",
                                "remove caches and intermediate files" + fix_limits.replace("LIMIT", "--max-files")))
    total = sum(i.file_size for i in infos)
    if total > limits.max_total_bytes:
        problems.append(Problem("error", where, f"unpacks to {total} bytes, more than the limit of {limits.max_total_bytes}",
                                "ship smaller files" + fix_limits.replace("LIMIT", "--max-bytes")))
    if not problems:
        problems += _layout_problems(infos)
    return problems


def _layout_problems(infos: list[zipfile.ZipInfo]) -> list[Problem]:
    """Duplicate members, and names that are a file in one member and a folder in another."""
    files: dict[str, str] = {}
    folders: set[str] = set()
    problems = []
    for info in infos:
        path = info.filename.replace("\\", "/")
        parts = path.rstrip("/").split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if info.is_dir() or path.endswith("/"):
            folders.add("/".join(parts))
        elif "/".join(parts) in files:
            problems.append(Problem("error", info.filename, "duplicate member", "archive each file once"))
        else:
            files["/".join(parts)] = info.filename
    for clash in sorted(folders & files.keys()):
        problems.append(Problem("error", files[clash], "is a file in one member and a folder in another", _FIX))
    return problems


def _raise(archive: Path, problems: list[Problem]) -> None:
    if problems:
        shown = problems[:_MAX_LISTED]
        if len(problems) > _MAX_LISTED:
            shown.append(Problem("error", archive.name, f"... and {len(problems) - _MAX_LISTED} more problems", "fix the ones above first"))
        raise ArchiveError(archive, shown)


def declared_entries_in(source: str | Path | bytes) -> int | None:
    """The member count that an archive's end record declares (``None`` when there is none to read).

    Read from the last 64 KiB of a file (``str``/``Path``) or of the bytes of an upload, before
    ``zipfile`` parses (and allocates) the whole central directory.
    """
    with (io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")) as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - (65535 + 22)))
        tail = handle.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return None
        entries = struct.unpack("<H", tail[at + 10 : at + 12])[0]
        locator = tail.rfind(b"PK\x06\x07", 0, at)
        if entries == 0xFFFF and locator >= 0 and len(tail) >= locator + 16:  # ZIP64: the count is in the ZIP64 end record
            handle.seek(struct.unpack("<Q", tail[locator + 8 : locator + 16])[0])
            record = handle.read(56)
            if record[:4] == b"PK\x06\x06" and len(record) == 56:
                entries = struct.unpack("<Q", record[32:40])[0]
    return entries


def copy_member(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, destination: BinaryIO, budget: int) -> int:
    """Stream one member into ``destination`` and return its size.

    ``zipfile`` checks the CRC-32 at the end of the member; here the member must produce exactly its
    declared size and at most ``budget`` bytes. Every failure is an :class:`ArchiveError` naming it.
    """
    produced = 0
    try:
        with zf.open(info) as source:
            while block := source.read(_CHUNK):
                produced += len(block)
                if produced > info.file_size or produced > budget:
                    raise ArchiveError(archive, [Problem("error", info.filename, "unpacks to more bytes than declared or allowed", _CORRUPT_FIX)])
                destination.write(block)
    except ArchiveError:
        raise
    except _UNPACK_ERRORS as exc:
        raise ArchiveError(archive, [Problem("error", info.filename, f"cannot be unpacked ({_reason(exc)})", _CORRUPT_FIX)]) from exc
    if produced != info.file_size:
        raise ArchiveError(archive, [Problem("error", info.filename, f"unpacks to {produced} bytes, not the {info.file_size} it declares", _CORRUPT_FIX)])
    return produced


def add_submission_archive(
    archive: str | Path,
    submissions_dir: str | Path = "submissions",
    *,
    limits: ArchiveLimits = ArchiveLimits(),
    replace: bool = False,
    check: Callable[[Path], list[Problem]] | None = None,
) -> tuple[Path, list[Problem]]:
    """Unpack ``archive`` into ``<submissions_dir>/<manifest name>`` and return it with any warnings.

    ``check`` (optional) runs on the unpacked folder after the static checks and before it is renamed
    into place; an error it returns refuses the archive like any other.

    Raises:
        ArchiveError: the archive is not a zip, is unsafe or is damaged (see the module docstring).
        SubmissionError: the unpacked submission fails the static checks or ``check``, its name is not a
            safe identifier, or the target exists and ``replace`` is false. Nothing is left behind.
    """
    archive = Path(archive)
    submissions_dir = Path(submissions_dir)
    zf = _open(archive, limits)
    with zf:
        members = _checked_members(archive, zf, limits)
        submissions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=submissions_dir))
        try:
            _extract(archive, zf, members, staging, limits)
            return _install(archive, staging, submissions_dir, replace, check)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _open(archive: Path, limits: ArchiveLimits) -> zipfile.ZipFile:
    fix = "pass a .zip file (e.g. zip -r sub.zip sub/)"
    try:
        entries = declared_entries_in(archive)
        if entries is not None and entries > limits.max_files:
            raise ArchiveError(archive, [Problem("error", archive.name, f"declares {entries:,} members, more than the limit of {limits.max_files:,}",
                                                 "remove caches and intermediate files, or raise --max-files")])
        return zipfile.ZipFile(archive)
    except (*_UNPACK_ERRORS, OSError) as exc:
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveError(archive, [Problem("error", archive.name, f"not a readable zip archive ({_reason(exc)})", fix)]) from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "its data ends before its declared size"
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _checked_members(archive: Path, zf: zipfile.ZipFile, limits: ArchiveLimits) -> dict[str, zipfile.ZipInfo]:
    """Relative destination path -> member, after every safety check (raises :class:`ArchiveError`)."""
    infos = [i for i in zf.infolist() if not is_ignored(i)]
    _raise(archive, archive_problems(archive.name, infos, limits, fix_limits=", or raise LIMIT if the size is expected"))
    files = [i for i in infos if not i.is_dir()]
    names = [PurePosixPath(i.filename.replace("\\", "/")) for i in files]
    prefix = _common_top_folder(names)
    members = {}
    for info, name in zip(files, names):
        relative = PurePosixPath(*name.parts[len(prefix.parts):]) if prefix else name
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
    """Stream every member into ``staging`` (:func:`copy_member`), within the total of ``limits``."""
    written = 0
    for relative, info in members.items():
        target = staging.joinpath(*relative.split("/"))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as destination:
                written += copy_member(archive, zf, info, destination, limits.max_total_bytes - written)
        except OSError as exc:
            raise ArchiveError(archive, [Problem("error", info.filename, f"cannot be written ({exc.strerror or _reason(exc)})",
                                                 "free disk space or check the submissions folder's permissions")]) from exc


def _install(archive: Path, staging: Path, submissions_dir: Path, replace: bool,
             check: Callable[[Path], list[Problem]] | None) -> tuple[Path, list[Problem]]:
    from bench.submissions.core import load_submission
    from bench.submissions.verify import verify_submission

    problems = verify_submission(staging, run_model=False)
    if not any(p.severity == "error" for p in problems) and check is not None:
        problems += check(staging)
    if any(p.severity == "error" for p in problems):
        raise SubmissionError(staging, problems)
    name = load_submission(staging).name
    try:
        check_submission_name(name, f"{archive.name}: {MANIFEST_NAME}")
    except IdentifierError as exc:
        raise SubmissionError(staging, [Problem("error", f"{MANIFEST_NAME}: name", f"{ascii(name)} {exc.reason}",
                                                "use 1-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit")]) from exc
    target = submissions_dir / name
    if target.exists():
        if not replace:
            raise SubmissionError(target, [Problem("error", str(target), "a submission with this name already exists",
                                                   "pass --replace to overwrite it, or change 'name' in submission.yaml")])
        retired = Path(tempfile.mkdtemp(prefix=".replaced-", dir=submissions_dir))
        target.rename(retired / name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)
    return target, problems
