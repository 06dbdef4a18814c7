"""A finished MONAI-trainer model (``model.pt``) and the predictor that runs it on a case.

``model.pt`` holds only tensors and plain data (loadable with ``torch.load(weights_only=True)``): the
network's name, parameters and build context, its weights, and the preprocessing and inference settings
needed to predict, so a run folder is self-contained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from bench.models.recipe import InferenceConfig
from bench.models.runfolder import MODEL_FILE, RunFolderError, select_device, torch_save_atomic

if TYPE_CHECKING:
    import torch

    from bench.data.dataset import Case
    from bench.inference import WindowSettings
    from bench.preprocess import PreprocessingConfig

MODEL_FORMAT = "hie-bench/monai-model"
MODEL_FORMAT_VERSION = 1


@dataclass
class ModelBundle:
    """Everything needed to rebuild and run a trained network."""

    network_name: str
    network_params: dict[str, Any]
    in_channels: int
    out_channels: int
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    channel_names: tuple[str, ...]
    state_dict: dict[str, Any]
    inference: InferenceConfig
    preprocessing: dict[str, Any]
    #: Training facts for humans and exports: epochs, best validation Dice, case ids, source submission.
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "network": {"name": self.network_name, "params": self.network_params},
            "context": {
                "in_channels": self.in_channels,
                "out_channels": self.out_channels,
                "patch_size": list(self.patch_size),
                "spacing": list(self.spacing),
                "channel_names": list(self.channel_names),
            },
            "state_dict": self.state_dict,
            "inference": self.inference.model_dump(mode="json"),
            "preprocessing": self.preprocessing,
            "info": self.info,
        }

    def save(self, path: Path) -> Path:
        return torch_save_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path) -> "ModelBundle":
        import torch

        path = Path(path)
        if not path.is_file():
            raise RunFolderError(f"{path}: no trained model here")
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
            raise RunFolderError(f"{path}: not a HIE-Bench MONAI model file (format {data.get('format') if isinstance(data, dict) else type(data).__name__!r})")
        if data.get("format_version") != MODEL_FORMAT_VERSION:
            raise RunFolderError(f"{path}: model format version {data.get('format_version')} is not supported (expected {MODEL_FORMAT_VERSION})")
        context = data["context"]
        return cls(
            network_name=data["network"]["name"],
            network_params=dict(data["network"]["params"]),
            in_channels=int(context["in_channels"]),
            out_channels=int(context["out_channels"]),
            patch_size=tuple(int(s) for s in context["patch_size"]),  # type: ignore[arg-type]
            spacing=tuple(float(s) for s in context["spacing"]),  # type: ignore[arg-type]
            channel_names=tuple(context["channel_names"]),
            state_dict=data["state_dict"],
            inference=InferenceConfig(**data["inference"]),
            preprocessing=data["preprocessing"],
            info=dict(data.get("info", {})),
        )

    def build_network(self) -> "torch.nn.Module":
        """The architecture with the trained weights, in eval mode, on the CPU."""
        from bench.models.networks import NetworkContext, build_network

        context = NetworkContext(self.in_channels, self.out_channels, self.patch_size, self.spacing)
        net = build_network(self.network_name, self.network_params, context)
        net.load_state_dict(self.state_dict)
        return net.eval()

    def preprocessing_config(self) -> "PreprocessingConfig":
        from bench.preprocess import PreprocessingConfig

        return PreprocessingConfig.model_validate(self.preprocessing)


def window_settings(patch_size: Sequence[int], config: InferenceConfig) -> WindowSettings:
    """The :class:`bench.inference.WindowSettings` a recipe's inference configuration describes (Gaussian blending)."""
    from bench.inference import WindowSettings

    return WindowSettings(tuple(int(s) for s in patch_size), config.overlap, "gaussian", config.gaussian_sigma_scale, config.sw_batch_size)


def sliding_window_probabilities(
    model: torch.nn.Module,
    image: np.ndarray,
    patch_size: Sequence[int],
    config: InferenceConfig,
    device: torch.device,
    *,
    amp: bool = False,
    channels_last: bool = False,
) -> np.ndarray:
    """Lesion probability ``(z, y, x)`` float32 for a ``(C, z, y, x)`` image, by the one inference path
    (:func:`bench.inference.window_output`, then :func:`~bench.inference.lesion_probability`) configured
    from a recipe; ``model`` outputs class probabilities (a :class:`bench.inference.MirroredSoftmax`)."""
    from bench.inference import lesion_probability, window_output

    output = window_output(model, image, window_settings(patch_size, config), device, amp=amp, channels_last=channels_last)
    return lesion_probability(output, image.shape[1:], "none", 1)


def inference_amp_dtype(device) -> str | None:
    """The autocast dtype of sliding-window inference on ``device``: CUDA runs under ``torch.autocast``
    with its default CUDA dtype (float16), the CPU in float32 (``None``)."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return str(torch.get_autocast_dtype("cuda")).removeprefix("torch.")


class MonaiPredictor:
    """Predicts a case with a trained network: preprocess, sliding window + flip TTA, back to native.

    Satisfies :class:`bench.predictor.Predictor`. Probabilities are mapped back to the native grid with
    linear interpolation and thresholded there, which gives smoother lesion borders than resampling a
    mask when the preprocessing changed the spacing. On CUDA the windows run under AMP
    (:func:`inference_amp_dtype`) with ``cudnn.benchmark`` (every window has the patch size).

    The bundle's preprocessing is the resolved one (a ``median`` target spacing is stored as the
    spacing the training cases gave), so a case is preprocessed alone, exactly as in training.
    """

    #: Set by ``MonaiTrainable.fit``: the :class:`~bench.models.recipe.BudgetUsed` of the training.
    budget_used = None

    def __init__(self, bundle: ModelBundle, *, device: str | None = None, cache_dir: Path | None = None) -> None:
        from bench.inference import MirroredSoftmax

        self.bundle = bundle
        self.device = select_device(device)
        self.cache_dir = cache_dir
        self.preprocessing = bundle.preprocessing_config()
        self.amp_dtype = inference_amp_dtype(self.device)
        self.model = MirroredSoftmax(bundle.build_network(), bundle.inference.mirror_axes).to(self.device).eval()

    @classmethod
    def from_run_dir(cls, run_dir: Path, **kwargs: Any) -> "MonaiPredictor":
        return cls(ModelBundle.load(Path(run_dir) / MODEL_FILE), **kwargs)

    def predict_probabilities(self, case: "Case") -> np.ndarray:
        """Lesion probability on the case's native grid, float32 ``(z, y, x)``."""
        from bench.preprocess import preprocess

        from bench.models.trainer import cudnn_benchmark

        prepared = preprocess(case, self.preprocessing, self.cache_dir, with_label=False)
        cuda = self.device.type == "cuda"
        with cudnn_benchmark(cuda):
            probabilities = sliding_window_probabilities(self.model, prepared.image, self.bundle.patch_size, self.bundle.inference, self.device, amp=cuda)
        return prepared.to_native(probabilities)

    def predict(self, case: "Case") -> np.ndarray:
        """Boolean lesion mask with the shape of ``case.geometry.shape``."""
        mask = self.predict_probabilities(case) > self.bundle.inference.threshold
        expected = tuple(case.geometry.shape)
        if mask.shape != expected:
            raise RuntimeError(f"case {case.case_id}: prediction shape {mask.shape} differs from the native grid {expected}")
        return mask
