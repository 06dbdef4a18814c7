"""``kind: nnunet``: an nnU-Net v2 trained-model folder, run with nnU-Net's own predictor.

nnU-Net preprocesses by itself, so it receives the native channels exactly as its SimpleITK reader would
give them: ``(C, z, y, x)`` arrays with ``{'spacing': (z, y, x)}`` (nnU-Net's ``SimpleITKIO`` reverses
SimpleITK's x, y, z spacing into array order, as :mod:`bench.imageio` does).

Prediction runs on :class:`bench.inference.nnunet.NnUNetRunner` (network built from the plans, weights
handed to ``nnUNetPredictor.manual_initialization``; nnU-Net never looks a class up by name). Every
checkpoint must load with ``torch.load(weights_only=True)`` (plus numpy scalars and arrays, which
nnU-Net's training logs contain) unless the manifest says ``allow_code: true`` and the user passes
``--trust-code``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.inference.nnunet import load_postprocessing, unsafe_checkpoint_reason

if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Case
    from bench.submissions.core import PredictorOptions, Submission


def checkpoint_paths(submission: "Submission") -> list[Path]:
    """The checkpoint file of every configured fold (not checked for existence)."""
    m = submission.manifest
    folder = submission.resolve(m.model_folder)
    return [folder / f"fold_{fold}" / m.checkpoint for fold in m.folds]


def dataset_channel_names(submission: "Submission") -> list[str] | None:
    """Channel names from the model folder's ``dataset.json`` in index order (``None`` if unreadable)."""
    path = submission.resolve(submission.manifest.model_folder) / "dataset.json"
    try:
        names = json.loads(path.read_text())["channel_names"]
        return [names[str(i)] for i in range(len(names))]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class NnunetPredictor:
    """``kind: nnunet`` on :class:`bench.inference.nnunet.NnUNetRunner`, the one nnU-Net runner."""

    def __init__(self, submission: "Submission", options: "PredictorOptions", device: str):
        from bench.inference.nnunet import NnUNetRunner

        m = submission.manifest
        trusted = bool(m.allow_code and options.trust_code)
        if not trusted:
            for path in checkpoint_paths(submission):
                reason = unsafe_checkpoint_reason(path)
                if reason is not None:
                    raise PermissionError(
                        f"{path.name} of {path.parent.name} holds Python objects beyond tensors and plain data; "
                        f"loading it could execute code ({reason})"
                    )
        self.runner = NnUNetRunner(
            submission.resolve(m.model_folder), folds=m.folds, checkpoint=m.checkpoint, channels=m.inputs.channels, device=device,
            tile_step_size=m.tile_step_size, use_gaussian=m.use_gaussian, use_mirroring=m.use_mirroring,
            lesion_label=m.lesion_label, trust_code=trusted,
            postprocess=load_postprocessing(submission.resolve(m.postprocessing), m.lesion_label) if m.postprocessing else None,
        )

    def predict(self, case: "Case") -> np.ndarray:
        return self.runner.predict(case)

    def predict_probabilities(self, case: "Case") -> np.ndarray:
        return self.runner.predict_probabilities(case)

    def predict_with_probability(self, case: "Case") -> Any:
        """The mask and the lesion softmax of one nnU-Net prediction (the worker's entry)."""
        from bench.submissions.guard import Prediction

        return Prediction(*self.runner.predict_with_probability(case))
