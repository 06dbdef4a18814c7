"""``bench submission new NAME --kind K``: a new submission folder that passes ``verify`` once it is signed.

Every scaffold implements the BONBID-HIE baseline (lesion = Z-ADC < -2 inside the brain) in its
kind's format, so the model runs as written and shows exactly where a real model goes. Authors and
description not given are written as the placeholders :data:`PLACEHOLDER_AUTHOR` and
:data:`PLACEHOLDER_MARK` ("TODO: ..."), which ``verify`` refuses: nobody enters a leaderboard as
"Your Name" by accident. With ``authors`` and ``description`` given, the folder verifies as written.

- ``python``: ``predict.py`` with ``predict(case, **options)``;
- ``predictions``: ``predictions/<probe case>.nii.gz``, an empty mask for the probe case (replace the
  folder's content with one mask per dataset case);
- ``torchscript``: ``model.pt``, a scripted module turning Z-ADC into lesion logits;
- ``onnx``: ``model.onnx``, the same network as an ONNX graph (needs the ``onnx`` package).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Callable

import numpy as np

from bench.imageio import write_text_atomic
from bench.submissions.core import Problem, SubmissionError
from bench.submissions.manifest import MANIFEST_NAME, NAME_PATTERN
from bench.submissions.probe import PROBE_CASE_ID, probe_geometry

#: Kinds ``new`` can scaffold.
SCAFFOLD_KINDS: tuple[str, ...] = ("python", "predictions", "torchscript", "onnx")
#: Author written when none is given; ``verify`` reports it as an error.
PLACEHOLDER_AUTHOR = "Your Name"
#: Word that marks text still to write (the default description starts with it); ``verify`` refuses it.
PLACEHOLDER_MARK = "TODO"

_NETWORK_FIELDS = """\
inputs:
  channels: [ADC, Z-ADC]
  space: preprocessed      # the standard preprocessing: RAS, brain crop, ADC z-scored, Z-ADC in its units
patch_size: [8, 64, 64]    # sliding window, voxels (z, y, x)
overlap: 0.5
activation: sigmoid        # the network outputs logits; lesion = sigmoid(logit) > threshold
lesion_channel: 0
threshold: 0.5
time_limit_s: 300
"""


def _manifest(name: str, kind: str, authors: list[str], description: str, body: str) -> str:
    authors_yaml = "\n".join(f"  - {a!r}" for a in authors)
    return (
        f"# HIE-Bench submission manifest: see docs/submissions.md for every field.\n"
        f"name: {name}\nversion: \"0.1.0\"\nauthors:\n{authors_yaml}\n"
        f"description: >-\n  {description}\nlicence: Apache-2.0\nkind: {kind}\n{body}"
    )


def _write_python(folder: Path) -> str:
    write_text_atomic(folder / "predict.py", textwrap.dedent('''\
        """Predictor of this submission: ``predict(case, **options) -> mask``.

        ``case`` is a bench.data.dataset.Case on its native grid (no label). Each channel reader returns
        a pair: ``array, geometry = case.load_channel("Z-ADC")`` (array: float32, order z, y, x;
        geometry: spacing, origin, direction). Return a boolean (or 0/1) numpy array of that shape.
        ``options`` come from submission.yaml.
        Load weights relative to this file (Path(__file__).parent), once, e.g. with functools.cache.
        """

        import numpy as np


        def predict(case, threshold: float = -2.0) -> np.ndarray:
            """Replace with your model. Baseline: lesion = Z-ADC below ``threshold`` inside the brain."""
            adc, _ = case.load_channel("ADC")
            zadc, _ = case.load_channel("Z-ADC")
            return (zadc < threshold) & (adc > 0)
        '''))
    return "entry: predict.py:predict\ninputs:\n  channels: [ADC, Z-ADC]\n  space: native\noptions:\n  threshold: -2.0\ntime_limit_s: 300\n"


def _write_predictions(folder: Path) -> str:
    from bench.imageio import write_image

    geometry = probe_geometry()
    write_image(np.zeros(geometry.shape, np.uint8), geometry, folder / "predictions" / f"{PROBE_CASE_ID}.nii.gz")
    return "folder: predictions\n"


def _write_torchscript(folder: Path) -> str:
    import torch

    class ZadcThresholdNet(torch.nn.Module):
        """Lesion logits ``scale * (threshold - Z-ADC)``: positive exactly where Z-ADC < threshold."""

        def __init__(self, channel: int = 1, threshold: float = -2.0, scale: float = 10.0):
            super().__init__()
            self.channel, self.threshold, self.scale = channel, threshold, scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.threshold - x[:, self.channel : self.channel + 1]) * self.scale

    torch.jit.save(torch.jit.script(ZadcThresholdNet()), str(folder / "model.pt"))
    return "model: model.pt\n" + _NETWORK_FIELDS


def _write_onnx(folder: Path) -> str:
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise SubmissionError(folder, [Problem("error", "onnx", "scaffolding an onnx submission needs the 'onnx' package",
                                               "pip install onnx (or scaffold --kind torchscript)")]) from exc
    constants = {
        "starts": np.array([1], np.int64), "ends": np.array([2], np.int64), "axes": np.array([1], np.int64),
        "threshold": np.array(-2.0, np.float32), "scale": np.array(10.0, np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["zadc"]),
            helper.make_node("Sub", ["threshold", "zadc"], ["difference"]),
            helper.make_node("Mul", ["difference", "scale"], ["logits"]),
        ],
        "zadc_threshold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 2, "z", "y", "x"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, "z", "y", "x"])],
        initializer=[numpy_helper.from_array(value, key) for key, value in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hie-bench scaffold")
    model.ir_version = 8  # readable by every onnxruntime since 1.14
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    return "model: model.onnx\n" + _NETWORK_FIELDS


_WRITERS: dict[str, Callable[[Path], str]] = {
    "python": _write_python,
    "predictions": _write_predictions,
    "torchscript": _write_torchscript,
    "onnx": _write_onnx,
}

_README = """\
# {name}

A HIE-Bench submission of kind `{kind}`, scaffolded by `bench submission new`. As written it runs the
BONBID-HIE baseline (lesion = Z-ADC < -2 inside the brain). Fill in `submission.yaml` (authors and
description: `verify` refuses the placeholders "{author}" and "{mark}"; licence), replace the model, then run
`bench submission verify {folder}`. Field reference: docs/submissions.md.
"""


def scaffold_submission(
    name: str,
    kind: str,
    submissions_dir: str | Path = "submissions",
    *,
    authors: list[str] | None = None,
    description: str | None = None,
) -> Path:
    """Create ``<submissions_dir>/<name>/`` for ``kind`` (one of :data:`SCAFFOLD_KINDS`) and return it.

    Raises:
        SubmissionError: bad name, unsupported kind, or the folder exists.
    """
    submissions_dir = Path(submissions_dir)
    target = submissions_dir / name
    if not re.fullmatch(NAME_PATTERN, name):
        raise SubmissionError(target, [Problem("error", "NAME", f"{name!r} is not a valid submission name",
                                               "use 1-64 lower-case letters, digits, '.', '_' or '-'")])
    if kind not in _WRITERS:
        raise SubmissionError(target, [Problem("error", "--kind", f"cannot scaffold kind {kind!r}",
                                               f"use one of {', '.join(SCAFFOLD_KINDS)}; write other kinds by hand (docs/submissions.md)")])
    if target.exists():
        raise SubmissionError(target, [Problem("error", str(target), "already exists", "choose another name or remove the folder")])
    submissions_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".new-", dir=submissions_dir))
    try:
        body = _WRITERS[kind](staging)
        placeholder = f"{PLACEHOLDER_MARK}: describe {name}: model, training data, training."
        text = _manifest(name, kind, authors or [PLACEHOLDER_AUTHOR], description or placeholder, body)
        write_text_atomic(staging / MANIFEST_NAME, text)
        readme = _README.format(name=name, kind=kind, folder=target.as_posix(), author=PLACEHOLDER_AUTHOR, mark=PLACEHOLDER_MARK)
        write_text_atomic(staging / "README.md", readme)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
