"""One loader per submission kind, in one registry: :data:`KIND_LOADERS`.

A loader knows one model format and nothing else. It has two class methods:

- ``check(submission, trust_code=False) -> list[Problem]``: static checks of the folder (files exist,
  formats parse, manifest and files agree). Never runs code from the submission.
- ``build(submission, options) -> object with predict(case)``: loads the model, in the current
  process. :class:`~bench.submissions.predictors.SubmissionPredictor` calls it inside a worker
  subprocess when the predictor is isolated, and validates every returned mask.

Adding a kind means one manifest class in :mod:`bench.submissions.manifest` and one loader registered
here; nothing scans packages or evaluates names from files.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import sys
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from bench.imageio import IMAGE_SUFFIXES, ImageError, read_geometry, read_image, strip_image_suffix
from bench.submissions.core import (
    MissingPrediction,
    InvalidPrediction,
    Problem,
    SubmissionError,
    validate_mask,
)

if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Case
    from bench.submissions.core import PredictorOptions, Submission


class KindLoader:
    """Base class of the loaders; see the module docstring."""

    kind: ClassVar[str]
    #: Whether running the kind executes model code (then predictors are isolated by default).
    runs_code: ClassVar[bool] = True
    #: Whether the harness trains it per fold (``fit``) before it can predict.
    trains: ClassVar[bool] = False

    @classmethod
    def check(cls, submission: "Submission", trust_code: bool = False) -> list[Problem]:
        return []

    @classmethod
    def build(cls, submission: "Submission", options: "PredictorOptions") -> Any:
        raise NotImplementedError


def _file_problem(submission: "Submission", field: str, relative: str, what: str) -> list[Problem]:
    """A problem if the manifest's ``field`` does not name an existing file inside the folder."""
    try:
        path = submission.resolve(relative)
    except SubmissionError as exc:
        return [Problem("error", f"submission.yaml: {field}", exc.problems[0].message, "name a file inside the submission folder")]
    if not path.is_file():
        return [Problem("error", f"submission.yaml: {field}", f"{what} {relative!r} not found in {submission.path.name}/",
                        f"add the file or correct '{field}'")]
    return []


# --------------------------------------------------------------------------------------------------
# python
# --------------------------------------------------------------------------------------------------


class PythonLoader(KindLoader):
    """``predict(case, **options)`` from a file (``predict.py:predict``) or module in the folder."""

    kind = "python"

    @classmethod
    def entry_file(cls, submission: "Submission") -> tuple[str, str, str]:
        """``(target, function, relative source file)`` of the manifest's entry."""
        target, function = submission.manifest.entry.rsplit(":", 1)
        if target.endswith(".py") or "/" in target:
            return target, function, target
        module_path = target.replace(".", "/")
        for candidate in (f"{module_path}.py", f"{module_path}/__init__.py"):
            if (submission.path / candidate).is_file():
                return target, function, candidate
        return target, function, f"{module_path}.py"

    @classmethod
    def check(cls, submission: "Submission", trust_code: bool = False) -> list[Problem]:
        _, function, source = cls.entry_file(submission)
        problems = _file_problem(submission, "entry", source, "entry file")
        if problems:
            return problems
        path = submission.resolve(source)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError) as exc:
            return [Problem("error", source, f"cannot be parsed: {exc}", "fix the Python syntax")]
        if function not in _top_level_names(tree):
            return [Problem("error", "submission.yaml: entry", f"{source} defines no top-level '{function}'",
                            f"define 'def {function}(case, **options)' in {source} or correct 'entry'")]
        return []

    @classmethod
    def build(cls, submission: "Submission", options: "PredictorOptions") -> "PythonFunctionPredictor":
        return PythonFunctionPredictor(submission, options, load_entry_function(submission))


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def load_entry_function(submission: "Submission") -> Callable[..., Any]:
    """Import the entry's module (by file path, or by name with the folder on ``sys.path``).

    This executes the submission's code: call it only in the worker process.
    """
    target, function, source = PythonLoader.entry_file(submission)
    folder = str(submission.path)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # so the entry module can import its sibling files
    if target.endswith(".py") or "/" in target:
        path = submission.resolve(source)
        module_name = "hiebench_submission_" + hashlib.sha256(str(path).encode()).hexdigest()[:10]
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise TypeError(f"{source}: '{function}' is not a function")
    return fn


class PythonFunctionPredictor:
    """Calls the entry function with a native :class:`Case` or a :class:`PreprocessedCase`.

    The function returns a mask, or ``{"mask": ..., "probability": ...}`` (the contract of
    :mod:`bench.submissions.guard`). On the native grid the output goes to the guard as it is; from the
    preprocessed grid both are checked there and mapped back: the mask by nearest neighbour, the
    probability by linear interpolation (clipped to [0, 1]), as :mod:`bench.inference` does.
    """

    def __init__(self, submission: "Submission", options: "PredictorOptions", function: Callable[..., Any]):
        self.function = function
        self.kwargs = dict(submission.manifest.options)
        self.preprocessing = submission.preprocessing
        self.cache_dir = options.cache_dir

    def predict(self, case: "Case") -> Any:
        if self.preprocessing is None:
            return self.function(case, **self.kwargs)
        from bench.preprocess import preprocess

        from bench.submissions.guard import Prediction, split_output, validate_probability

        prepared = preprocess(case, self.preprocessing, self.cache_dir, with_label=False)
        source = "the model (on the preprocessed grid)"
        mask, probability = split_output(self.function(prepared, **self.kwargs), case.case_id, source=source)
        mask = prepared.to_native(validate_mask(mask, prepared.shape, case.case_id, source=source))
        if probability is None:
            return mask
        validate_probability(probability, prepared.shape, case.case_id, source=source)  # refuse NaN / range before resampling
        values = np.asarray(probability, dtype=np.float32) / (255.0 if probability.dtype == np.uint8 else 1.0)
        return Prediction(mask, np.clip(prepared.to_native(values), 0.0, 1.0))


# --------------------------------------------------------------------------------------------------
# predictions
# --------------------------------------------------------------------------------------------------


class PredictionsLoader(KindLoader):
    """Precomputed masks ``<folder>/<case_id>.nii.gz`` (any suffix of :data:`bench.imageio.IMAGE_SUFFIXES`),
    and optionally lesion probability maps ``probabilities/<case_id>.nii.gz`` (:data:`PROBABILITY_FOLDER`)."""

    kind = "predictions"
    runs_code = False

    @classmethod
    def folder(cls, submission: "Submission") -> Path:
        return submission.resolve(submission.manifest.folder)

    @classmethod
    def files(cls, submission: "Submission") -> dict[str, Path]:
        """Mask file per case id."""
        folder = cls.folder(submission)
        found: dict[str, Path] = {}
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            case_id = strip_image_suffix(path)
            if case_id is not None and path.is_file():
                found[case_id] = path
        return found

    @classmethod
    def check(cls, submission: "Submission", trust_code: bool = False) -> list[Problem]:
        relative = submission.manifest.folder
        try:
            folder = cls.folder(submission)
        except SubmissionError as exc:
            return [Problem("error", "submission.yaml: folder", exc.problems[0].message, "name a folder inside the submission")]
        if not folder.is_dir():
            return [Problem("error", "submission.yaml: folder", f"prediction folder {relative!r} not found",
                            f"create {relative}/ with one mask per case named <case_id>.nii.gz")]
        problems: list[Problem] = []
        files = cls.files(submission)
        for path in sorted(folder.iterdir()):
            if strip_image_suffix(path) is None and not path.name.startswith("."):
                problems.append(Problem("warning", f"{relative}/{path.name}", "not an image file; ignored",
                                        f"use one of {', '.join(IMAGE_SUFFIXES)} or move it out of {relative}/"))
        if not files:
            problems.append(Problem("error", f"{relative}/", "contains no prediction masks",
                                    "add one mask per case named <case_id>.nii.gz (see docs/submissions.md)"))
        for case_id, path in files.items():
            where = f"{relative}/{path.name}"
            try:
                array, _ = read_image(path)
            except ImageError as exc:
                problems.append(Problem("error", where, str(exc).split(": ", 1)[-1], "write a 3-D NIfTI/MHA mask"))
                continue
            values = np.unique(array)
            bad = [v for v in values.tolist() if v not in (0, 1)]
            if bad:
                problems.append(Problem("error", where, f"label values other than 0 and 1: {bad[:5]}",
                                        "write a binary mask: 1 for lesion, 0 elsewhere"))
        return problems

    @classmethod
    def build(cls, submission: "Submission", options: "PredictorOptions") -> "PredictionsPredictor":
        return PredictionsPredictor(submission)


#: Folder of a ``predictions`` submission that may hold one float lesion probability image per case.
PROBABILITY_FOLDER = "probabilities"


class PredictionsPredictor:
    """Reads the shipped mask of a case (and its probability map, when the folder has one) and checks that
    both lie on the case's grid; a probability must be a float image with values in [0, 1]."""

    def __init__(self, submission: "Submission"):
        self.submission = submission
        self.relative = submission.manifest.folder
        self.files = PredictionsLoader.files(submission)
        folder = submission.path / PROBABILITY_FOLDER
        self.probabilities = {strip_image_suffix(p): p for p in sorted(folder.iterdir()) if p.is_file() and strip_image_suffix(p)} if folder.is_dir() else {}

    def predict(self, case: "Case") -> Any:
        path = self.files.get(case.case_id)
        if path is None:
            raise MissingPrediction(case.case_id, f"no mask {self.relative}/{case.case_id}.nii.gz in {self.submission.name}",
                                    f"add {self.relative}/{case.case_id}.nii.gz (one mask per case of the dataset)")
        array, geometry = self._read_on_grid(case, path, f"{self.relative}/{path.name}")
        mask = validate_mask(array, geometry.shape, case.case_id, source=f"{self.relative}/{path.name}")
        probability_path = self.probabilities.get(case.case_id)
        if probability_path is None:
            return mask
        from bench.submissions.guard import Prediction, validate_probability

        where = f"{PROBABILITY_FOLDER}/{probability_path.name}"
        values, _ = self._read_on_grid(case, probability_path, where)
        if values.dtype.kind != "f":  # an integer image would be read as levels or as 0/1: say which is meant
            raise InvalidPrediction(case.case_id, f"{where} has dtype {values.dtype}, expected a float image",
                                    "write the lesion probability as float32 values in [0, 1]")
        return Prediction(mask, validate_probability(values, geometry.shape, case.case_id, source=where))

    def _read_on_grid(self, case: "Case", path: Path, where: str) -> tuple[np.ndarray, Any]:
        """A shipped image, checked to have the header of the case's image."""
        try:
            array, geometry = read_image(path)
        except ImageError as exc:
            raise InvalidPrediction(case.case_id, str(exc), "write a 3-D NIfTI/MHA image") from exc
        try:
            differences = geometry.differences(read_geometry(case.image_paths[0]))
        except ImageError as exc:
            raise InvalidPrediction(case.case_id, f"the case's image cannot be read to check the grid of {where}: {exc}",
                                    "check the dataset with `bench data verify`") from exc
        if differences:
            raise InvalidPrediction(case.case_id, f"{where} is not on the case's grid: {'; '.join(differences)}",
                                    "write the image with the header (shape, spacing, origin, direction) of the case's image")
        return array, geometry


# --------------------------------------------------------------------------------------------------
# torchscript, onnx, monai-bundle
# --------------------------------------------------------------------------------------------------


class TorchScriptLoader(KindLoader):
    kind = "torchscript"

    @classmethod
    def check(cls, submission: "Submission", trust_code: bool = False) -> list[Problem]:
        """The model file is a sound TorchScript archive (:func:`torchscript_problem`); torch is not imported."""
        problems = _file_problem(submission, "model", submission.manifest.model, "TorchScript model")
        if problems:
            return problems
        reason = torchscript_problem(submission.resolve(submission.manifest.model))
        if reason is not None:
            problems.append(Problem("error", submission.manifest.model, f"is not a TorchScript archive: {reason}",
                                    "save the model with torch.jit.save(torch.jit.script(model), 'model.pt')"))
        return problems

    @classmethod
    def build(cls, submission: "Submission", options: "PredictorOptions") -> Any:
        from bench.submissions.networks import SlidingWindowPredictor, load_torchscript, resolve_device

        forward = load_torchscript(submission.resolve(submission.manifest.model), resolve_device(options.device))
        return SlidingWindowPredictor(forward, submission, options)


class OnnxLoader(KindLoader):
    kind = "onnx"

    @classmethod
    def check(cls, submission: "Submission", trust_code: bool = False) -> list[Problem]:
        """The model parses and passes ``onnx.checker`` (nothing runs); external data stays in the folder."""
        problems = _file_problem(submission, "model", submission.manifest.model, "ONNX model")
        if problems:
            return problems
        return onnx_problems(submission, submission.manifest.model)

    @classmethod
    def build(cls, submission: "Submission", options: "PredictorOptions") -> Any:
        from bench.submissions.networks import SlidingWindowPredictor, load_onnx, resolve_device

        forward = load_onnx(submission.resolve(submission.manifest.model), resolve_device(options.device))
        return SlidingWindowPredictor(forward, submission, options)


#: Entries every ``torch.jit.save`` archive has under its one top folder (``code/`` holds the TorchScript).
_TORCHSCRIPT_ENTRIES = ("data.pkl", "constants.pkl", "version")


def torchscript_problem(path: Path) -> str | None:
    """Why ``path`` is not a TorchScript archive, or ``None``: read as a zip with the archive checks
    (bounded directory, CRC of every member), it must hold one top folder with ``data.pkl``,
    ``constants.pkl`` (pickles), ``version`` and TorchScript sources under ``code/``. A ``torch.save``
    state dict has no ``code/`` and is refused with that reason. Nothing is unpickled.
    """
    from bench.submissions.archive import ArchiveLimits, declared_entries_in

    limits = ArchiveLimits()
    try:
        entries = declared_entries_in(path)
        if entries is None:
            return "not a zip archive (empty, truncated or another format)"
        if entries > limits.max_files:
            return f"its directory declares {entries} members, more than {limits.max_files}"
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if sum(i.file_size for i in infos) > limits.max_total_bytes:
                return f"it unpacks to more than {limits.max_total_bytes} bytes"
            tops = {i.filename.split("/", 1)[0] for i in infos}
            if len(tops) != 1:
                return f"expected one top folder, found {len(tops)}"
            top = tops.pop()
            names = {i.filename for i in infos}
            missing = [n for n in _TORCHSCRIPT_ENTRIES if f"{top}/{n}" not in names]
            if not any(n.startswith(f"{top}/code/") for n in names):
                missing.append("code/")
            if missing:
                return f"no {', '.join(missing)} in {top}/ (a torch.save() file or another zip, not torch.jit.save())"
            if any(not archive.read(f"{top}/{n}")[:1] == b"\x80" for n in ("data.pkl", "constants.pkl")):
                return "data.pkl or constants.pkl is not a pickle"
            bad = archive.testzip()
            if bad is not None:
                return f"member {bad} fails its CRC check (the file is damaged)"
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError, ValueError) as exc:
        return f"unreadable zip ({' '.join(str(exc).split())[:160]})"
    return None


def onnx_problems(submission: "Submission", relative: str) -> list[Problem]:
    """Parse an ONNX model and run ``onnx.checker`` on it (no inference, no operator runs).

    The graph is parsed without its external data first, and every initializer stored as external data
    must name a file inside the submission folder; only then does the checker see the model by its path
    (it resolves external data beside the model).
    """
    fix = "export the model again (torch.onnx.export or onnx.save) and check it with onnx.checker.check_model"
    path = submission.resolve(relative)
    try:
        import onnx
        import onnx.checker
    except ImportError:  # onnx is a development extra; onnxruntime is always installed
        reason = _onnxruntime_problem(path)
        return [Problem("error", relative, f"is not a valid ONNX model ({reason})", fix)] if reason else []
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends for garbage
        return [Problem("error", relative, f"is not a valid ONNX model ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})", fix)]
    problems = _onnx_external_problems(submission, relative, model)
    if problems:
        return problems
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # ValidationError, ValueError, ... for malformed graphs
        return [Problem("error", relative, f"is not a valid ONNX model ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})", fix)]
    if not model.graph.node:
        return [Problem("error", relative, "is an ONNX model with an empty graph", fix)]
    return []


def _onnxruntime_problem(path: Path) -> str | None:
    """Why onnxruntime cannot load ``path`` (parse, validate, resolve external data inside the model's
    folder; no graph optimisation and no inference), or ``None``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidArgument classes
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None


def _onnx_external_problems(submission: "Submission", relative: str, model: Any) -> list[Problem]:
    """External-data locations of ``model`` that leave the submission folder or name no file."""
    import onnx

    problems = []
    base = Path(relative).parent
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        try:
            target = submission.resolve((base / location).as_posix() if location else "")
        except SubmissionError as exc:
            problems.append(Problem("error", relative, f"external data {location!r} of {tensor.name}: {exc.problems[0].message}",
                                    "keep external data files beside the model, inside the submission folder"))
            continue
        if not target.is_file():
            problems.append(Problem("error", relative, f"external data file {location!r} of {tensor.name} not found", "ship the data file beside the model"))
    return problems


class MonaiBundleLoader(KindLoader):
    kind = "monai-bundle"

    @classmethod
    def check(cls, submission: "Submission", trust_code: bool = False) -> list[Problem]:
        from bench.submissions.networks import code_in_section, network_section, read_bundle_config

        m = submission.manifest
        config_rel, weights_rel = str(Path(m.bundle) / m.config), str(Path(m.bundle) / m.weights)
        problems = _file_problem(submission, "config", config_rel, "bundle configuration") + _file_problem(
            submission, "weights", weights_rel, "bundle weights"
        )
        if problems:
            return problems
        try:
            config = read_bundle_config(submission.resolve(config_rel))
            section = network_section(config, m.network_key)
        except KeyError as exc:
            return [Problem("error", config_rel, f"has no entry {exc.args[0]!r} (needed by '{m.network_key}')",
                            "set network_key to the network definition's key, and define every @reference")]
        except ValueError as exc:
            return [Problem("error", config_rel, f"cannot be parsed: {exc}", "write valid JSON or YAML")]
        code = code_in_section(section)
        if code and not (m.allow_code and trust_code):
            fix = ("review the bundle, then run with --trust-code" if m.allow_code else
                   "write the network definition with plain values and a monai.networks.nets class, or set "
                   "allow_code: true and run with --trust-code after reviewing the bundle")
            return [Problem("error", config_rel, f"the network definition needs code evaluation: {'; '.join(code)}", fix)]
        return []

    @classmethod
    def build(cls, submission: "Submission", options: "PredictorOptions") -> Any:
        from bench.submissions.networks import SlidingWindowPredictor, load_monai_bundle, resolve_device

        device = resolve_device(options.device)
        return SlidingWindowPredictor(load_monai_bundle(submission, options, device), submission, options)


# --------------------------------------------------------------------------------------------------
# nnunet
# --------------------------------------------------------------------------------------------------


class NnunetLoader(KindLoader):
    kind = "nnunet"

    @classmethod
    def check(cls, submission: "Submission", trust_code: bool = False) -> list[Problem]:
        from bench.submissions.nnunet import checkpoint_paths, dataset_channel_names, unsafe_checkpoint_reason

        m = submission.manifest
        problems: list[Problem] = []
        for name in ("dataset.json", "plans.json"):
            problems += _file_problem(submission, "model_folder", f"{m.model_folder}/{name}", "nnU-Net file")
        for path in checkpoint_paths(submission):
            relative = path.relative_to(submission.path).as_posix()
            if not path.is_file():
                problems.append(Problem("error", "submission.yaml: folds", f"checkpoint {relative} not found",
                                        "list only folds that were trained in 'folds', or correct 'checkpoint'"))
            elif not (m.allow_code and trust_code):
                reason = unsafe_checkpoint_reason(path)
                if reason is not None:
                    problems.append(Problem("error", relative, f"holds Python objects beyond tensors and plain data ({reason})",
                                            "re-save it with plain data only, or set allow_code: true and run with "
                                            "--trust-code after reviewing where it comes from"))
        names = dataset_channel_names(submission)
        if names is not None and len(names) != len(m.inputs.channels):
            problems.append(Problem("error", "submission.yaml: inputs.channels",
                                    f"the model expects {len(names)} channels {names}, inputs.channels lists {list(m.inputs.channels)}",
                                    "list the benchmark channels in the order of the model's dataset.json channel_names"))
        elif names is not None and [n.lower() for n in names] != [n.lower() for n in m.inputs.channels]:
            problems.append(Problem("warning", "submission.yaml: inputs.channels",
                                    f"model channel names {names} differ from inputs.channels {list(m.inputs.channels)}",
                                    "check that the channel order matches the one the model was trained with"))
        return problems

    @classmethod
    def build(cls, submission: "Submission", options: "PredictorOptions") -> Any:
        from bench.submissions.networks import resolve_device
        from bench.submissions.nnunet import NnunetPredictor

        return NnunetPredictor(submission, options, resolve_device(options.device))


# --------------------------------------------------------------------------------------------------
# trainable
# --------------------------------------------------------------------------------------------------


class TrainableLoader(KindLoader):
    """The harness trains it per fold: ``bench.models.build_trainable`` (imported when needed)."""

    kind = "trainable"
    trains = True
    #: Where the builder of trainables lives, resolved by name at first use (lm-eval style), so that
    #: ``bench.submissions`` never imports ``bench.models``: models depend on the submission contract,
    #: not the other way round.
    builder: ClassVar[str] = "bench.models:build_trainable"
    #: Where a trained fold is turned into a submission folder of a predicting kind (same lazy lookup).
    exporter: ClassVar[str] = "bench.models:export_fold"

    #: Schedules a recipe may provide; it must build for at least one of them.
    schedules: ClassVar[tuple[str, ...]] = ("cpu", "gpu")

    @classmethod
    def check(cls, submission: "Submission", trust_code: bool = False) -> list[Problem]:
        """Build the trainable for each schedule (nothing is trained): the recipe must be accepted."""
        failures: dict[str, str] = {}
        for schedule in cls.schedules:
            try:
                submission.trainable(schedule=schedule)
            except ImportError as exc:
                return [Problem("warning", "submission.yaml: recipe", f"bench.models.build_trainable is not available ({exc})",
                                "install HIE-Bench with its models package to check the recipe")]
            except Exception as exc:  # the recipe was rejected: say why
                failures[schedule] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        if len(failures) == len(cls.schedules):
            messages = list(dict.fromkeys(failures.values()))
            return [Problem("error", "submission.yaml: recipe", "; ".join(messages), "correct the recipe (see docs/models.md)")]
        return [
            Problem("warning", "submission.yaml: recipe", f"cannot be trained with schedule '{schedule}': {message}",
                    f"add a '{schedule}' schedule to run it on {'a CPU-only machine' if schedule == 'cpu' else 'a GPU'}")
            for schedule, message in failures.items()
        ]

    @classmethod
    def build(cls, submission: "Submission", options: "PredictorOptions") -> Any:
        raise SubmissionError(submission.path, [Problem("error", "kind", "trainable submissions are trained by the harness",
                                                        "use submission.trainable(...)")])

    @classmethod
    def build_trainable(cls, submission: "Submission", **options: Any) -> Any:
        """The :class:`~bench.predictor.Trainable` of the submission's recipe (see ``bench.models.build_trainable``)."""
        return _resolve(cls.builder)(dict(submission.manifest.recipe), submission_dir=submission.path, **options)

    @classmethod
    def export_fold(cls, model_dir: Path, out_dir: Path) -> Path:
        """Write a trained fold as a submission folder of a predicting kind (``bench.models.export_fold``, ``auto``)."""
        return _resolve(cls.exporter)(model_dir, out_dir, "auto", overwrite=True)


def _resolve(reference: str) -> Any:
    """The object named ``module:attribute``, imported on first use."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


#: The registry: kind -> loader. Manifest classes and this mapping are the only places kinds are named.
KIND_LOADERS: dict[str, type[KindLoader]] = {
    loader.kind: loader
    for loader in (NnunetLoader, MonaiBundleLoader, TorchScriptLoader, OnnxLoader, PythonLoader, PredictionsLoader, TrainableLoader)
}
