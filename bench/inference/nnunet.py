"""The one nnU-Net runner: trained nnU-Net v2 folds predicted with nnU-Net's own predictor.

Used by ``kind: nnunet`` submissions and by the nnU-Net baseline's trained folds alike. The network is
built from the plans with ``nnUNetTrainer.build_network_architecture`` and handed, with the weights of
every requested fold (an ensemble when there are several), to ``nnUNetPredictor.manual_initialization``.
nnU-Net is never asked to look a trainer class up by name: that path imports timm and a torchvision that
does not load beside the pinned torch, and it would run whatever class a checkpoint names. The
consequence: a model folder must use the standard nnU-Net architecture its plans describe.

Checkpoints are loaded with ``torch.load(weights_only=True)`` (plus numpy scalars, which nnU-Net's logs
contain). A checkpoint that needs more can only be loaded with ``trust_code=True``.

nnU-Net preprocesses by itself, so it receives the native channels exactly as its SimpleITK reader would
give them: ``(C, z, y, x)`` arrays with ``{'spacing': (z, y, x)}``; it predicts with Gaussian-weighted
sliding windows and mirroring and resamples the segmentation back to the input grid.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Case


class NnUNetRunError(RuntimeError):
    """A model folder or checkpoint cannot be used; the message names the file."""


def numpy_safe_globals() -> list[Any]:
    """numpy types that plain numeric training logs pickle; constructing them runs no user code."""
    core = getattr(np, "_core", None) or np.core
    safe: list[Any] = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    safe.extend(getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType"))
    return safe


def load_checkpoint(path: Path, *, trust_code: bool = False) -> dict[str, Any]:
    """An nnU-Net checkpoint, loaded with the restricted unpickler unless ``trust_code``."""
    import torch

    if trust_code:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(numpy_safe_globals()):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def unsafe_checkpoint_reason(path: Path) -> str | None:
    """``None`` if ``path`` loads with the restricted unpickler, else why it does not."""
    try:
        load_checkpoint(path)
    except Exception as exc:  # UnpicklingError names the offending global
        text = " ".join(str(exc).split())
        found = re.search(r"GLOBAL ([\w.]+)", text)
        return f"it pickles {found.group(1)}" if found else text[:300]
    return None


class NnUNetRunner:
    """``predict(case) -> bool mask``, ``predict_with_probability`` (both, one pass) and
    ``predict_probabilities`` for folds of an nnU-Net model folder.

    Args:
        model_folder: holds ``plans.json``, ``dataset.json`` and ``fold_<f>/<checkpoint>``.
        folds: the folds to ensemble (nnU-Net averages their softmax outputs).
        channels: the case's channel names in nnU-Net's channel order.
        postprocess: applied to the boolean mask (the step nnU-Net's ``determine_postprocessing`` chose).
    """

    def __init__(
        self,
        model_folder: Path,
        *,
        folds: Sequence[int | str] = (0,),
        checkpoint: str = "checkpoint_final.pth",
        channels: Sequence[str] = ("ADC", "Z-ADC"),
        device: str = "cpu",
        tile_step_size: float = 0.5,
        use_gaussian: bool = True,
        use_mirroring: bool = True,
        lesion_label: int = 1,
        trust_code: bool = False,
        postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.model_folder = Path(model_folder)
        self.channels = tuple(channels)
        self.lesion_label = lesion_label
        self.postprocess = postprocess
        states = [self._state(fold, checkpoint, trust_code) for fold in folds]
        plans_manager, configuration, dataset_json, network = self._network(states[0])
        device_ = torch.device(device)
        self.predictor = nnUNetPredictor(
            tile_step_size=tile_step_size,
            use_gaussian=use_gaussian,
            use_mirroring=use_mirroring,
            perform_everything_on_device=device_.type == "cuda",
            device=device_,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        self.predictor.manual_initialization(
            network.to(device_),
            plans_manager,
            configuration,
            [state["network_weights"] for state in states],
            dataset_json,
            "nnUNetTrainer",
            states[0].get("inference_allowed_mirroring_axes"),
        )

    def _state(self, fold: int | str, checkpoint: str, trust_code: bool) -> dict[str, Any]:
        path = self.model_folder / f"fold_{fold}" / checkpoint
        if not path.is_file():
            raise NnUNetRunError(f"{path}: no trained nnU-Net checkpoint (train the fold, or correct 'folds'/'checkpoint')")
        try:
            return load_checkpoint(path, trust_code=trust_code)
        except Exception as exc:
            raise NnUNetRunError(f"{path}: cannot be loaded as tensors and plain data ({' '.join(str(exc).split())[:300]})") from exc

    def _network(self, state: dict[str, Any]):
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        try:
            dataset_json = json.loads((self.model_folder / "dataset.json").read_text())
            plans_manager = PlansManager(json.loads((self.model_folder / "plans.json").read_text()))
        except (OSError, ValueError) as exc:
            raise NnUNetRunError(f"{self.model_folder}: plans.json / dataset.json unreadable ({exc})") from exc
        configuration = plans_manager.get_configuration(state["init_args"]["configuration"])
        n_inputs = determine_num_input_channels(plans_manager, configuration, dataset_json)
        n_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration, n_inputs, n_outputs, enable_deep_supervision=False)
        network.load_state_dict(state["network_weights"])
        return plans_manager, configuration, dataset_json, network

    def _inputs(self, case: "Case") -> tuple[np.ndarray, dict[str, Any], tuple[int, ...]]:
        arrays, geometry = [], None
        for name in self.channels:
            array, channel_geometry = case.load_channel(name)
            geometry = geometry or channel_geometry
            arrays.append(array)
        return np.stack(arrays).astype(np.float32), {"spacing": list(geometry.spacing)}, tuple(geometry.shape)

    def predict_probabilities(self, case: "Case") -> np.ndarray:
        """Lesion probability on the native grid, float32 ``(z, y, x)`` (the ensemble's softmax)."""
        return self.predict_with_probability(case)[1]

    def predict(self, case: "Case") -> np.ndarray:
        """Boolean lesion mask on the case's native grid ``(z, y, x)``."""
        image, properties, shape = self._inputs(case)
        segmentation = np.asarray(self.predictor.predict_single_npy_array(image, properties, None, None, False))
        return self._mask(segmentation, shape, case.case_id)

    def predict_with_probability(self, case: "Case") -> tuple[np.ndarray, np.ndarray]:
        """``(mask, lesion probability)`` on the native grid from one nnU-Net prediction (never two).

        The mask is nnU-Net's own segmentation (argmax, then :attr:`postprocess`), exactly what
        :meth:`predict` returns; the probability is the lesion channel of the softmax it came from,
        float32 clipped to [0, 1] (half-precision softmax can overshoot 1 by a rounding step).
        """
        image, properties, shape = self._inputs(case)
        segmentation, probabilities = self.predictor.predict_single_npy_array(image, properties, None, None, True)
        probability = np.clip(np.asarray(probabilities)[self.lesion_label].astype(np.float32), 0.0, 1.0)
        if probability.shape != shape:
            raise NnUNetRunError(f"case {case.case_id}: nnU-Net returned shape {probability.shape}, the native grid is {shape}")
        return self._mask(np.asarray(segmentation), shape, case.case_id), probability

    def _mask(self, segmentation: np.ndarray, shape: tuple[int, ...], case_id: str) -> np.ndarray:
        if segmentation.shape != shape:
            raise NnUNetRunError(f"case {case_id}: nnU-Net returned shape {segmentation.shape}, the native grid is {shape}")
        mask = segmentation == self.lesion_label
        return self.postprocess(mask) if self.postprocess is not None else mask


def load_postprocessing(path: Path, lesion_label: int = 1) -> Callable[[np.ndarray], np.ndarray] | None:
    """The postprocessing nnU-Net's ``determine_postprocessing`` chose, as a ``bool mask -> bool mask``.

    ``path`` is the ``postprocessing.json`` written beside nnU-Net's ``postprocessing.pkl``; ``None``
    when the file is absent or lists no step. Only nnU-Net's own component removal is accepted, by name:
    the pickle (which could hold any callable) is never loaded.
    """
    path = Path(path)
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    names, kwargs = report.get("postprocessing_fns", []), report.get("postprocessing_kwargs", [])
    if not names:
        return None
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    known = {"remove_all_but_largest_component_from_segmentation": remove_all_but_largest_component_from_segmentation}
    steps = []
    for name, arguments in zip(names, kwargs):
        if name not in known:
            raise NnUNetRunError(f"{path}: unknown postprocessing function {name!r} (known: {', '.join(known)})")
        steps.append((known[name], dict(arguments)))

    def postprocess(mask: np.ndarray) -> np.ndarray:
        segmentation = mask.astype(np.uint8) * lesion_label
        for function, arguments in steps:
            segmentation = function(segmentation, **arguments)
        return segmentation == lesion_label

    return postprocess

