"""``kind: nnunet``: an nnU-Net v2 trained-model folder, run with nnU-Net's own predictor.

nnU-Net preprocesses by itself, so it receives the native channels exactly as its SimpleITK reader would
give them: ``(C, z, y, x)`` arrays with ``{'spacing': (z, y, x)}`` (nnU-Net's ``SimpleITKIO`` reverses
SimpleITK's x, y, z spacing into array order, as :mod:`bench.imageio` does).

Safety: ``nnUNetPredictor.initialize_from_trained_model_folder`` unpickles checkpoints with
``weights_only=False``, which can execute code stored in the file. Before calling it, every checkpoint is
loaded once with ``torch.load(weights_only=True)`` (plus numpy scalars and arrays, which nnU-Net's
training logs contain); only if that restricted load succeeds, or the manifest says ``allow_code: true``
and the user passes ``--trust-code``, does nnU-Net load it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Case
    from bench.submissions.core import PredictorOptions, Submission


def checkpoint_paths(submission: "Submission") -> list[Path]:
    """The checkpoint file of every configured fold (not checked for existence)."""
    m = submission.manifest
    folder = submission.resolve(m.model_folder)
    return [folder / f"fold_{fold}" / m.checkpoint for fold in m.folds]


def unsafe_checkpoint_reason(path: Path) -> str | None:
    """``None`` if ``path`` loads with the restricted unpickler, else why it does not."""
    import torch

    with torch.serialization.safe_globals(_numpy_safe_globals()):
        try:
            torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError names the offending global
            text = " ".join(str(exc).split())
            found = re.search(r"GLOBAL ([\w.]+)", text)
            return f"it pickles {found.group(1)}" if found else text[:300]
    return None


def _numpy_safe_globals() -> list[Any]:
    """numpy types that plain numeric training logs pickle; constructing them runs no user code."""
    import numpy

    core = getattr(numpy, "_core", None) or numpy.core
    safe: list[Any] = [core.multiarray.scalar, core.multiarray._reconstruct, numpy.ndarray, numpy.dtype]
    safe.extend(getattr(numpy.dtypes, name) for name in dir(numpy.dtypes) if name.endswith("DType"))
    return safe


def dataset_channel_names(submission: "Submission") -> list[str] | None:
    """Channel names from the model folder's ``dataset.json`` in index order (``None`` if unreadable)."""
    path = submission.resolve(submission.manifest.model_folder) / "dataset.json"
    try:
        names = json.loads(path.read_text())["channel_names"]
        return [names[str(i)] for i in range(len(names))]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class NnunetPredictor:
    """Runs ``nnUNetPredictor.predict_single_npy_array`` on the case's native channels."""

    def __init__(self, submission: "Submission", options: "PredictorOptions", device: str):
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        m = submission.manifest
        if not (m.allow_code and options.trust_code):
            for path in checkpoint_paths(submission):
                reason = unsafe_checkpoint_reason(path)
                if reason is not None:
                    raise PermissionError(
                        f"{path.name} of {path.parent.name} holds Python objects beyond tensors and plain data; "
                        f"loading it could execute code ({reason})"
                    )
        self.manifest = m
        self.predictor = nnUNetPredictor(
            tile_step_size=m.tile_step_size,
            use_gaussian=m.use_gaussian,
            use_mirroring=m.use_mirroring,
            perform_everything_on_device=device.startswith("cuda"),
            device=torch.device(device),
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        self.predictor.initialize_from_trained_model_folder(
            str(submission.resolve(m.model_folder)),
            use_folds=tuple(m.folds),
            checkpoint_name=m.checkpoint,
        )

    def predict(self, case: "Case") -> np.ndarray:
        arrays, geometry = [], None
        for name in self.manifest.inputs.channels:
            array, channel_geometry = case.load_channel(name)
            geometry = geometry or channel_geometry
            arrays.append(array)
        image = np.stack(arrays).astype(np.float32)
        segmentation = self.predictor.predict_single_npy_array(image, {"spacing": list(geometry.spacing)}, None, None, False)
        return np.asarray(segmentation) == self.manifest.lesion_label
