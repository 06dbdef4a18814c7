"""Network kinds run with the benchmark's own inference: ``torchscript``, ``onnx`` and ``monai-bundle``.

All three receive the case through the manifest's preprocessing, are run with MONAI's sliding-window
inference (Gaussian blending by default), mapped back to the native grid with
:meth:`~bench.preprocess.PreprocessedCase.to_native` and thresholded there. Only the way the network is
loaded differs. :meth:`SlidingWindowPredictor.predict_with_probability` returns the mask and the native
probability it was thresholded from, of one forward pass: every network kind and every exported
MONAI fold therefore gives a probability map. When the manifest names an ``uncertainty_channel`` (an
exported MONAI fold with flip TTA), that channel is split off the blended output before the
probability is read, mapped to the native grid like the probability
(:func:`bench.inference.native_uncertainty`) and returned with source ``tta-variance``.

MONAI bundles are untrusted configuration: their ``$`` expressions are Python evaluated by
``ConfigParser``, ``%`` macros pull in other files, and ``_target_`` can name any callable. Unless the
manifest says ``allow_code: true`` *and* the user passes ``--trust-code``, only the network definition
(and the plain entries it references with ``@``) is parsed, after checking that it contains no
expression, no macro, no ``_mode_`` and only ``_target_`` classes from ``monai.networks.nets``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from bench.preprocess import preprocess

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from bench.data.dataset import Case
    from bench.submissions.core import PredictorOptions, Submission

#: The ``uncertainty_source`` of a manifest's ``uncertainty_channel`` (:data:`bench.uncertainty.UNCERTAINTY_SOURCES`).
TTA_VARIANCE_SOURCE = "tta-variance"
#: Module whose classes a bundle's network definition may instantiate without ``--trust-code``.
SAFE_TARGET_MODULE = "monai.networks.nets"
_REFERENCE = re.compile(r"@([A-Za-z0-9_\-.]+)")


def resolve_device(device: str) -> str:
    """The torch device string for ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) by the one device
    policy, :func:`bench.device.resolve_device`; a CUDA device torch cannot use raises its ``DeviceError``."""
    import torch  # noqa: F401 - the predictor needs it next; imported, the policy asks it directly (no probe process)

    from bench.device import resolve_device as policy

    return policy(device).device


class SlidingWindowPredictor:
    """Preprocess, :mod:`bench.inference` (windows, activation, back to native, threshold there)."""

    def __init__(self, forward: Callable[["torch.Tensor"], "torch.Tensor"], submission: "Submission", options: "PredictorOptions"):
        from bench.inference import WindowSettings

        m = submission.manifest
        self.forward = forward
        self.manifest = m
        self.preprocessing = submission.preprocessing
        self.cache_dir = options.cache_dir
        self.device = resolve_device(options.device)
        self.windows = WindowSettings(tuple(m.patch_size), m.overlap, m.blend, m.sigma_scale, m.sw_batch_size)

    def predict_probabilities(self, case: "Case") -> np.ndarray:
        """Lesion probability on the case's native grid, float32 ``(z, y, x)``."""
        return self._predict(case)[0]

    def predict(self, case: "Case") -> np.ndarray:
        return self._predict(case)[1]

    def predict_with_probability(self, case: "Case") -> Any:
        """Mask, probability and (with an ``uncertainty_channel``) the flip-TTA variance, all on the native
        grid, of one forward pass (the worker's entry; :mod:`bench.submissions.guard`)."""
        from bench.submissions.guard import Prediction

        probability, mask, variance = self._predict(case)
        if variance is None:
            return Prediction(mask, probability)
        return Prediction(mask, probability, variance, TTA_VARIANCE_SOURCE)

    def _predict(self, case: "Case") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(probability, mask, variance or None)`` on the native grid. The manifest's ``uncertainty_channel``
        is split off the blended output first; the rest is read exactly as without it."""
        from bench.inference import (OutputError, lesion_probability, native_mask, native_uncertainty, split_uncertainty_channel,
                                     tta_variance, window_output)
        from bench.submissions.core import InvalidPrediction

        m = self.manifest
        prepared = preprocess(case, self.preprocessing, self.cache_dir, with_label=False)
        output = window_output(self.forward, prepared.image, self.windows, self.device)
        spatial = prepared.image.shape[1:]
        variance = None
        try:
            if m.uncertainty_channel is not None:
                variance = tta_variance(output, spatial, m.uncertainty_channel)
                output = split_uncertainty_channel(output, m.uncertainty_channel)[0]
            probability = lesion_probability(output, spatial, m.activation, m.lesion_channel)
        except OutputError as exc:
            raise InvalidPrediction(case.case_id, str(exc), "the network must map (N, C, z, y, x) to (N, K, z, y, x) with the same "
                                    "spatial size, and lesion_channel (and uncertainty_channel) in submission.yaml must index its "
                                    "lesion output (and its variance output)") from None
        probability, mask = native_mask(prepared, probability, m.threshold)
        return probability, mask, None if variance is None else native_uncertainty(prepared, variance)


def load_torchscript(path: Path, device: str) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """A TorchScript module in eval mode on ``device`` (TorchScript runs no arbitrary Python)."""
    import torch

    module = torch.jit.load(str(path), map_location=device)
    module.eval()
    return module


def load_onnx(path: Path, device: str) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """Wrap an onnxruntime session as a tensor -> tensor callable (first input, first output)."""
    import onnxruntime as ort
    import torch

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; warnings about unused initializers are noise here
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    input_name = session.get_inputs()[0].name

    def forward(batch: "torch.Tensor") -> "torch.Tensor":
        result = session.run(None, {input_name: batch.detach().cpu().numpy().astype(np.float32)})[0]
        return torch.from_numpy(np.asarray(result)).to(batch.device)

    return forward


# --------------------------------------------------------------------------------------------------
# MONAI bundles
# --------------------------------------------------------------------------------------------------


def read_bundle_config(path: Path) -> dict[str, Any]:
    """Parse a bundle configuration file (JSON or YAML, safe loader) into a dict."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        from bench.submissions.manifest import load_bounded_yaml

        data = load_bounded_yaml(text, source=str(path))  # size-limited, no aliases: a bundle is untrusted
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def network_section(config: dict[str, Any], network_key: str) -> dict[str, Any]:
    """The entries needed to build the network: ``network_key`` and every id it references with ``@``.

    Raises ``KeyError`` naming a missing id.
    """
    wanted, section = [network_key], {}
    while wanted:
        key = wanted.pop()
        root = re.split(r"::|#", key)[0]
        if root in section:
            continue
        if root not in config:
            raise KeyError(root)
        section[root] = config[root]
        wanted.extend(_REFERENCE.findall(json.dumps(config[root])))
    return section


def code_in_section(section: dict[str, Any]) -> list[str]:
    """Why parsing ``section`` would evaluate code: one line per offending entry (empty when safe)."""
    import monai.networks.nets as nets

    found: list[str] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                here = f"{where}::{key}"
                if key == "_target_":
                    if not _is_safe_target(item, nets):
                        found.append(f"{here} = {item!r} is not a network class of {SAFE_TARGET_MODULE}")
                elif key == "_mode_":
                    found.append(f"{here}: '_mode_' changes how the component is called")
                else:
                    walk(item, here)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{where}::{index}")
        elif isinstance(value, str):
            if value.startswith("$"):
                found.append(f"{where} = {value!r} is a Python expression")
            elif value.startswith("%"):
                found.append(f"{where} = {value!r} is a macro (it imports content from another file)")

    for key, value in section.items():
        walk(value, key)
    return found


def _is_safe_target(target: Any, nets: Any) -> bool:
    import torch

    if not isinstance(target, str):
        return False
    name = target.removeprefix(SAFE_TARGET_MODULE + ".")
    if "." in name:
        return False
    candidate = getattr(nets, name, None)
    return isinstance(candidate, type) and issubclass(candidate, torch.nn.Module)


def build_bundle_network(bundle_dir: Path, config_path: Path, network_key: str, *, allow_code: bool) -> "torch.nn.Module":
    """Instantiate the bundle's network; without ``allow_code`` only a checked network section is parsed."""
    from monai.bundle import ConfigParser

    config = read_bundle_config(config_path)
    if allow_code:
        parser = ConfigParser()
        parser.read_config(str(config_path))
        parser["bundle_root"] = str(bundle_dir)
        return parser.get_parsed_content(network_key)
    section = network_section(config, network_key)
    problems = code_in_section(section)
    if problems:
        raise PermissionError("the network definition would evaluate code: " + "; ".join(problems))
    return ConfigParser(section).get_parsed_content(network_key)


def load_state_dict(path: Path) -> dict[str, Any]:
    """Weights with ``torch.load(weights_only=True)`` (no pickled code); unwraps ``{'state_dict': ...}``."""
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "network_weights"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (mapping of parameter names to tensors), got {type(state).__name__}")
    return state


def load_monai_bundle(submission: "Submission", options: "PredictorOptions", device: str) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """The bundle's network with its weights, in eval mode on ``device``."""
    m = submission.manifest
    bundle_dir = submission.resolve(m.bundle)
    network = build_bundle_network(
        bundle_dir,
        submission.resolve(str(Path(m.bundle) / m.config)),
        m.network_key,
        allow_code=m.allow_code and options.trust_code,
    )
    network.load_state_dict(load_state_dict(submission.resolve(str(Path(m.bundle) / m.weights))))
    network.to(device).eval()
    return network
