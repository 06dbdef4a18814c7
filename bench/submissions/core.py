"""The :class:`Submission` object, its content hash, and the errors and problems it reports.

A submission is a folder with a ``submission.yaml``. :func:`load_submission` validates the manifest and
returns a :class:`Submission`; :meth:`Submission.predictor` yields an object with
``predict(case) -> bool mask`` on the case's native grid for every kind except ``trainable``, for
which :meth:`Submission.trainable` yields a :class:`~bench.predictor.Trainable`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from bench.submissions.manifest import KINDS, MANIFEST_NAME, parse_manifest, read_manifest_data

if TYPE_CHECKING:  # pragma: no cover
    from pydantic import ValidationError

    from bench.predictor import Trainable
    from bench.preprocess import PreprocessingConfig
    from bench.submissions.predictors import SubmissionPredictor

#: Files and folders that do not count as a submission's content: caches that running it may create.
IGNORED_NAMES: frozenset[str] = frozenset({"__pycache__", ".DS_Store", ".ipynb_checkpoints", ".pytest_cache"})
IGNORED_SUFFIXES: tuple[str, ...] = (".pyc", ".pyo")

#: What :attr:`Submission.preprocessing_id` is for models that receive native (unpreprocessed) cases.
NATIVE_PREPROCESSING_ID = "native"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a submission, with where it is and how to fix it."""

    severity: Literal["error", "warning"]
    where: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.severity.upper()} {self.where}: {self.message}"
        return f"{text} (fix: {self.fix})" if self.fix else text


class SubmissionError(ValueError):
    """A submission folder cannot be loaded; ``problems`` says what is wrong and how to fix it."""

    def __init__(self, path: Path | str, problems: list[Problem]):
        self.path = Path(path)
        self.problems = problems
        super().__init__(f"{path}: invalid submission\n" + "\n".join(f"  - {p}" for p in problems))


class PredictionError(RuntimeError):
    """A submission failed on one case; the harness records it as a failed row for that case."""

    def __init__(self, case_id: str, message: str, fix: str = ""):
        self.case_id = case_id
        self.message = message
        self.fix = fix
        super().__init__(f"case {case_id}: {message}" + (f" (fix: {fix})" if fix else ""))


class PredictionTimeout(PredictionError):
    """The model did not return within its time limit (the worker process was killed)."""


class PredictionCrash(PredictionError):
    """The model raised an exception or its process died."""


class InvalidPrediction(PredictionError):
    """The model returned something that is not a binary mask on the case's grid."""


class MissingPrediction(PredictionError):
    """A ``predictions`` submission has no mask for the case."""


@dataclass(frozen=True)
class PredictorOptions:
    """How a predictor runs. Plain values, so they can be sent to a worker process as JSON.

    Attributes:
        time_limit_s: limit per case (the first case also pays for loading the model); ``None`` = manifest.
        cache_dir: preprocessing cache folder, or ``None``.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``/``cuda:N``.
        trust_code: the user allows evaluating code from the submission's files where the manifest asks
            for it (``allow_code: true``); ``python`` submissions always run their code.
        sandbox: run every isolated worker in the bubblewrap sandbox (:mod:`bench.submissions.sandbox`);
            ``False`` is ``--unsafe-no-sandbox``: the model then sees the whole file system, and no
            resource limits apply beyond the time limit.
    """

    time_limit_s: float | None = None
    cache_dir: str | None = None
    device: str = "auto"
    trust_code: bool = False
    sandbox: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"time_limit_s": self.time_limit_s, "cache_dir": self.cache_dir, "device": self.device,
                "trust_code": self.trust_code, "sandbox": self.sandbox}


@dataclass(frozen=True)
class Submission:
    """A loaded submission folder: its manifest, content hash and ways to run it."""

    path: Path
    manifest: Any = field(repr=False)  # one of the manifest classes in bench.submissions.manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def trains(self) -> bool:
        """Whether the harness trains this submission per fold (its kind's loader says so)."""
        from bench.submissions.kinds import KIND_LOADERS

        return KIND_LOADERS[self.kind].trains

    @cached_property
    def content_hash(self) -> str:
        """SHA-256 (hex) over the folder's files: sorted relative paths and bytes (see :func:`content_hash`)."""
        return content_hash(self.path)

    @property
    def preprocessing(self) -> "PreprocessingConfig | None":
        """The preprocessing the model's inputs go through (``None``: it receives native cases)."""
        return self.manifest.effective_preprocessing

    @property
    def preprocessing_id(self) -> str:
        """What to store with results: the preprocessing id, or ``"native"`` for native inputs."""
        config = self.preprocessing
        return config.id if config is not None else NATIVE_PREPROCESSING_ID

    def resolve(self, relative: str) -> Path:
        """A path named in the manifest, which must stay inside the folder (``SubmissionError`` otherwise)."""
        return resolve_inside(self.path, relative)

    def check_files(self, *, trust_code: bool = False) -> list[Problem]:
        """Static, kind-specific checks of the folder (files exist, formats parse); runs no model code."""
        from bench.submissions.kinds import KIND_LOADERS

        return KIND_LOADERS[self.kind].check(self, trust_code=trust_code)

    def predictor(
        self,
        *,
        isolate: bool | None = None,
        time_limit_s: float | None = None,
        cache_dir: str | Path | None = None,
        device: str = "auto",
        trust_code: bool = False,
        sandbox: bool = True,
    ) -> "SubmissionPredictor":
        """An object with ``predict(case) -> np.ndarray[bool]`` on the case's native grid.

        Args:
            isolate: run the model in a worker subprocess with a per-case time limit (crashes and
                hangs become :class:`PredictionError` instead of killing the caller). Default: on for
                every kind that runs code; ``python`` submissions are always isolated.
            time_limit_s: seconds per case; default the manifest's ``time_limit_s``.
            cache_dir: preprocessing cache (see :func:`bench.preprocess.preprocess`).
            device: ``auto``, ``cpu`` or ``cuda``.
            trust_code: allow code evaluation for manifests with ``allow_code: true``.
            sandbox: run isolated workers in the bubblewrap sandbox (docs/security.md); ``False`` is
                ``--unsafe-no-sandbox``.

        Use it as a context manager (or call ``close()``) so the worker process ends.
        """
        from bench.submissions.predictors import make_predictor

        if self.trains:
            raise SubmissionError(
                self.path,
                [Problem("error", "kind", "a trainable submission has no predictor before training",
                         "call submission.trainable(...).fit(train_cases, val_cases, run_dir) to get one")],
            )
        options = PredictorOptions(
            time_limit_s=time_limit_s,
            cache_dir=None if cache_dir is None else str(cache_dir),
            device=device,
            trust_code=trust_code,
            sandbox=sandbox,
        )
        return make_predictor(self, options, isolate=isolate)

    def trainable(
        self,
        *,
        schedule: str = "auto",
        preprocessing: "PreprocessingConfig | None" = None,
        **build_options: Any,
    ) -> "Trainable":
        """The :class:`~bench.predictor.Trainable` of a ``trainable`` submission.

        Calls ``bench.models.build_trainable(recipe, submission_dir=..., preprocessing=..., schedule=...)``
        with the manifest's recipe unchanged and the submission's effective preprocessing (or
        ``preprocessing`` when given); ``build_options`` (e.g. ``cache_dir``, ``device``) are passed on.
        """
        if not self.trains:
            raise SubmissionError(
                self.path,
                [Problem("error", "kind", f"kind '{self.kind}' is not trainable", "use submission.predictor(...)")],
            )
        from bench.submissions.kinds import KIND_LOADERS

        return KIND_LOADERS[self.kind].build_trainable(
            self, preprocessing=preprocessing or self.preprocessing, schedule=schedule, **build_options
        )


def load_submission(path: str | Path) -> Submission:
    """Read and validate ``<path>/submission.yaml``.

    Raises:
        SubmissionError: the folder or manifest is missing or invalid; ``problems`` lists every issue
            with a fix, as ``bench submission verify`` prints them.
    """
    path = Path(path).resolve()
    manifest, problems = _load_manifest(path)
    if manifest is None:
        raise SubmissionError(path, problems)
    return Submission(path=path, manifest=manifest)


def _load_manifest(path: Path) -> tuple[Any, list[Problem]]:
    import yaml
    from pydantic import ValidationError

    if not path.is_dir():
        return None, [Problem("error", str(path), "is not a folder", "pass the folder that holds submission.yaml")]
    manifest_path = path / MANIFEST_NAME
    if manifest_path.is_symlink():  # never read a file from elsewhere as the manifest
        return None, [Problem("error", MANIFEST_NAME, "is a symbolic link", f"replace it with the {MANIFEST_NAME} file itself")]
    if not manifest_path.is_file():
        return None, [
            Problem("error", MANIFEST_NAME, "missing", f"create {MANIFEST_NAME} (bench submission new NAME --kind K writes one)")
        ]
    try:
        data = read_manifest_data(manifest_path)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        from bench.submissions.manifest import ManifestYAMLError

        if isinstance(exc, ManifestYAMLError):  # too large, too deep or using aliases: refused before parsing
            return None, [Problem("error", MANIFEST_NAME, _one_line(exc), "write a plain manifest: no anchors or aliases (&, *), under 256 KiB")]
        return None, [Problem("error", MANIFEST_NAME, f"not valid YAML: {_one_line(exc)}", "fix the YAML syntax at the position shown")]
    if not isinstance(data, dict):
        return None, [Problem("error", MANIFEST_NAME, f"must be a mapping of fields, got {type(data).__name__}", "write 'name: ...', 'kind: ...' etc. at the top level")]
    try:
        return parse_manifest(data), []
    except ValidationError as exc:
        return None, validation_problems(exc, data)


def validation_problems(error: "ValidationError", data: dict[str, Any]) -> list[Problem]:
    """Turn pydantic's errors into :class:`Problem` rows naming the field and how to fix it."""
    kind = data.get("kind")
    problems = []
    for item in error.errors(include_url=False):
        loc = [str(part) for part in item["loc"]]
        if loc and loc[0] == kind:  # the discriminated union puts the tag first
            loc = loc[1:]
        field_name = ".".join(loc) or "(top level)"
        where = f"{MANIFEST_NAME}: {field_name}"
        kind_of_error = item["type"]
        message = item["msg"]
        if kind_of_error == "missing":
            fix = f"add '{field_name}' (see docs/submissions.md)"
        elif kind_of_error == "extra_forbidden":
            fix = f"remove '{field_name}' or correct its spelling; it is not a field of kind '{kind}'"
        elif kind_of_error in ("union_tag_invalid", "union_tag_not_found"):
            where = f"{MANIFEST_NAME}: kind"
            message = f"unknown or missing kind {kind!r}"
            fix = f"set 'kind' to one of: {', '.join(KINDS)}"
        elif kind_of_error == "string_pattern_mismatch" and field_name == "name":
            fix = "use 1-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
        else:
            fix = f"correct '{field_name}' (see docs/submissions.md for allowed values)"
        problems.append(Problem("error", where, message, fix))
    return problems


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing absolute paths and paths that leave ``root`` (after symlinks).

    ``relative`` comes from the manifest, so NUL bytes, backslashes and non-ASCII look-alikes of ``/``
    and ``.`` (fullwidth solidus, one-dot leader) are refused before any path is built from it.
    """
    fix = "use a path relative to the folder, with '/' between plain ASCII names"
    if not relative or Path(relative).is_absolute() or relative.startswith(("/", "\\")):
        raise SubmissionError(root, [Problem("error", ascii(relative) if relative else "(empty path)", "must be a relative path inside the submission folder", fix)])
    if "\x00" in relative or "\\" in relative or not relative.isascii():
        raise SubmissionError(root, [Problem("error", ascii(relative), "has a NUL byte, a backslash or non-ASCII characters", fix)])
    root = root.resolve()
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise SubmissionError(root, [Problem("error", relative, "points outside the submission folder", "keep every file inside the folder")])
    return candidate


def iter_content_files(root: Path) -> list[Path]:
    """Entries that make up a submission (sorted, relative), skipping caches in :data:`IGNORED_NAMES`.

    Files (regular or not) and symbolic links to folders are listed; folders are descended into, links
    to folders are not (their target is listed where it lies, or refused by :func:`content_hash`).
    """
    found = []
    for directory, folders, files in os.walk(root, followlinks=False):
        folders[:] = sorted(f for f in folders if f not in IGNORED_NAMES)
        base = Path(directory)
        for name in files:
            if name in IGNORED_NAMES or name.endswith(IGNORED_SUFFIXES):
                continue
            found.append((base / name).relative_to(root))
        found.extend((base / f).relative_to(root) for f in folders if (base / f).is_symlink())
    return sorted(found, key=lambda p: p.as_posix())


def content_hash(root: str | Path) -> str:
    """SHA-256 hex digest of a folder: for each entry in sorted relative-path order, its path and bytes.

    Content, not links: a symbolic link to a file inside the folder contributes the bytes it points to
    (so editing the target changes the hash); a link to a folder inside it contributes its target
    path (that folder's files are hashed where they lie). A link that leaves the folder or dangles, and
    anything that is not a regular file (FIFO, socket, device), raise :class:`SubmissionError`: the
    hash would not describe what runs, and a FIFO would block the reader. Python byte-code caches are
    ignored (running a submission must not change its hash).
    """
    root = Path(root).resolve()
    digest = hashlib.sha256()
    for relative in iter_content_files(root):
        full = root / relative
        name = relative.as_posix().encode()
        digest.update(len(name).to_bytes(8, "little") + name)
        target = _content_target(root, relative)
        if target.is_dir():
            text = target.relative_to(root).as_posix().encode()
            digest.update(b"D" + len(text).to_bytes(8, "little") + text)
            continue
        with open(target, "rb") as handle:
            digest.update(b"F" + os.fstat(handle.fileno()).st_size.to_bytes(8, "little"))
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _content_target(root: Path, relative: Path) -> Path:
    """What an entry's content is read from: itself, or the target of a link that stays inside ``root``."""
    full = root / relative
    fix = "replace the link with a copy of the file: a submission must be self-contained"
    if full.is_symlink():
        try:
            target = full.resolve(strict=True)
        except (OSError, RuntimeError):
            raise SubmissionError(root, [Problem("error", relative.as_posix(), "is a symbolic link that points nowhere (or loops)", fix)]) from None
        if target != root and root not in target.parents:
            raise SubmissionError(root, [Problem("error", relative.as_posix(), f"is a symbolic link to {target}, outside the submission folder", fix)])
        full = target
    info = full.stat()
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise SubmissionError(root, [Problem("error", relative.as_posix(), "is not a regular file (a FIFO, socket or device)", "remove it from the folder")])
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        # a hard link shares its content with a file elsewhere on the host, a dataset's labels for one:
        # the sandbox mounts the submission folder, so the model would read that file through it
        raise SubmissionError(root, [Problem("error", relative.as_posix(), f"is a hard link ({info.st_nlink} names for one file): it shares its "
                                             "content with a file outside the submission", "replace it with a copy of its own (cp, not ln)")])
    return full


def validate_mask(array: Any, expected_shape: tuple[int, ...], case_id: str, *, source: str = "the model") -> np.ndarray:
    """:func:`bench.masks.check_mask` for a submission's output: ``bool`` mask or :class:`InvalidPrediction`."""
    from bench.masks import MaskError, check_mask

    try:
        return check_mask(array, expected_shape, source=source)
    except MaskError as exc:
        raise InvalidPrediction(case_id, exc.message, exc.fix) from None
