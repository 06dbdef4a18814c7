"""Saliency for one predicted lesion of a trainable MONAI entrant: integrated gradients on a patch.

Contract
--------
* Method: **integrated gradients** (Sundararajan et al. 2017) through Captum. Chosen over Grad-CAM
  because it is model-agnostic (any registered network, no layer to pick: Grad-CAM's answer depends
  on which decoder layer is hooked and is upsampled from that layer's coarse grid) and because it
  satisfies *completeness*: the attributions sum to ``F(x) - F(baseline)``, so the map is an exact
  budget of the model's output, checkable per call (``delta``). The price is ``n_steps`` forward /
  backward passes, which is why it runs on one patch around the lesion. ``n_steps`` Gauss-Legendre
  nodes (32 by default: a few seconds on a CPU for the CPU-schedule networks); with a ``tolerance``
  the steps are doubled until the completeness error is within it or ``max_steps`` is reached. The
  result always records the steps used and the completeness error left, so a viewer can show it.
* Target ``F``: the sum over the chosen lesion's voxels (inside the patch) of the lesion **log-odds**
  ``logit_lesion - logit_background``. With two softmax classes only that difference decides the
  prediction (adding a constant to both logits changes nothing), so it is the lesion logit made
  identifiable. ``target="lesion_logit"`` uses the raw lesion logit instead.
* Baseline: ``"blur"`` (default) is the input smoothed with a Gaussian of ``blur_sigma_mm``: it keeps
  the coarse anatomy and removes the focal signal, so the map answers "which local intensities made
  this a lesion" (Sturmfels et al. 2020, "Visualizing the impact of feature attribution baselines").
  A zero baseline (``"zeros"``: the mean of each z-scored channel) makes the path start at a constant
  image, where instance normalisation (used by every shipped network) is singular, and the integral
  then needs far more steps for the same completeness.
* Patch: ``patch_size`` (default the model's training patch, which its strides are known to fit)
  centred on the lesion's bounding box, shifted to stay inside the image and zero-padded where the
  image is smaller. Lesion voxels outside the patch do not enter ``F``.
* Output of :func:`integrated_gradients`: per-channel attributions on the patch. Of
  :func:`lesion_saliency`: the channel-summed signed map on the case's native grid (0 outside the
  patch), written as ``.nii.gz`` with a JSON sidecar, cached under ``cache_dir`` by (model hash, case,
  lesion, steps); a sidecar whose lesion digest differs is recomputed.

Torch, Captum and MONAI are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

    from bench.data.dataset import Case

__all__ = [
    "Attribution",
    "SaliencyResult",
    "file_digest",
    "integrated_gradients",
    "lesion_patch_box",
    "lesion_saliency",
    "saliency_volume",
]

Target = Literal["log_odds", "lesion_logit"]
Box = tuple[tuple[int, int], ...]

#: Default number of integration steps (Gauss-Legendre nodes).
DEFAULT_STEPS = 32
#: Default width of the blurred baseline, in mm.
DEFAULT_BLUR_MM = 6.0
#: Most steps tried when a completeness ``tolerance`` is asked for (e.g. 0.05).
DEFAULT_MAX_STEPS = 256


@dataclass(frozen=True)
class Attribution:
    """Integrated-gradients attribution of one lesion on one patch.

    ``values``: ``(C, *patch)`` float32. ``box``: ``(start, stop)`` of the patch per spatial axis in
    the input image (may reach outside it, where the patch was zero-padded). ``delta``: Captum's
    convergence delta, ``sum(values) - (target - baseline_target)``.
    """

    values: np.ndarray
    box: Box
    target: float
    baseline_target: float
    delta: float
    n_steps: int
    baseline: str
    method: str = "integrated_gradients"

    @property
    def completeness_error(self) -> float:
        """``|delta|`` relative to ``|target - baseline_target|`` (0 when completeness holds exactly)."""
        return abs(self.delta) / max(abs(self.target - self.baseline_target), 1e-12)

    def channel_totals(self) -> list[float]:
        """Sum of the attribution per input channel (how much each channel contributed)."""
        return [float(v) for v in self.values.reshape(self.values.shape[0], -1).sum(axis=1)]


def lesion_patch_box(lesion: np.ndarray, patch_size: Sequence[int]) -> Box:
    """A ``patch_size`` box centred on the lesion's bounding box, kept inside the image where it fits."""
    where = np.argwhere(lesion)
    if where.size == 0:
        raise ValueError("the lesion mask is empty")
    centre = (where.min(axis=0) + where.max(axis=0) + 1) // 2
    box = []
    for axis, size in enumerate(patch_size):
        extent = lesion.shape[axis]
        start = int(centre[axis]) - int(size) // 2
        start = 0 if size >= extent else min(max(start, 0), extent - int(size))
        box.append((start, start + int(size)))
    return tuple(box)


def _crop(array: np.ndarray, box: Box) -> np.ndarray:
    """``array[..., box]`` with zeros where the box leaves the array (leading axes kept)."""
    lead = array.shape[: array.ndim - len(box)]
    out = np.zeros(lead + tuple(stop - start for start, stop in box), dtype=array.dtype)
    source, target = [], []
    for (start, stop), extent in zip(box, array.shape[len(lead):]):
        lo, hi = max(start, 0), min(stop, extent)
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    out[(..., *target)] = array[(..., *source)]
    return out


def _baseline(image: np.ndarray, baseline: str | np.ndarray, spacing: Sequence[float], sigma_mm: float) -> np.ndarray:
    """The baseline image, same shape as ``image`` (cropped like it, so padding stays 0 in both)."""
    if isinstance(baseline, np.ndarray):
        if baseline.shape != image.shape:
            raise ValueError(f"baseline shape {baseline.shape} differs from the image {image.shape}")
        return baseline.astype(np.float32)
    if baseline == "zeros":
        return np.zeros_like(image)
    if baseline == "blur":
        from scipy import ndimage

        sigma = [0.0, *(sigma_mm / float(s) for s in spacing)]
        return ndimage.gaussian_filter(image, sigma, mode="nearest").astype(np.float32)
    raise ValueError(f"baseline must be 'blur', 'zeros' or an array of the image's shape, got {baseline!r}")


def _target_function(net: "torch.nn.Module", lesion: "torch.Tensor", target: Target):
    """``F(x)`` per batch item: summed lesion log-odds (or lesion logit) over the lesion voxels."""

    def forward(x: "torch.Tensor") -> "torch.Tensor":
        logits = net(x)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        score = logits[:, 1] - logits[:, 0] if target == "log_odds" else logits[:, 1]
        return (score * lesion).sum(dim=(1, 2, 3))

    return forward


def integrated_gradients(
    net: "torch.nn.Module",
    image: np.ndarray,
    lesion: np.ndarray,
    *,
    patch_size: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    n_steps: int = DEFAULT_STEPS,
    baseline: str | np.ndarray = "blur",
    blur_sigma_mm: float = DEFAULT_BLUR_MM,
    target: Target = "log_odds",
    tolerance: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    internal_batch_size: int = 8,
) -> Attribution:
    """Integrated gradients of ``F`` (see the module docstring) for ``lesion`` on a patch of ``image``.

    ``image``: ``(C, z, y, x)`` on the network's grid; ``lesion``: boolean ``(z, y, x)`` on the same
    grid; ``net`` returns logits ``(B, 2, *patch)`` and is put in eval mode (on its own device).
    With a ``tolerance``, the steps are doubled (up to ``max_steps``) until the completeness error is
    within it; the returned ``n_steps`` and ``completeness_error`` say what was reached.
    """
    import torch
    from captum.attr import IntegratedGradients

    image = np.asarray(image, dtype=np.float32)
    lesion = np.asarray(lesion, dtype=bool)
    if image.ndim != 4 or image.shape[1:] != lesion.shape:
        raise ValueError(f"image must be (C, z, y, x) with the lesion's shape {lesion.shape}, got {image.shape}")
    box = lesion_patch_box(lesion, patch_size)
    patch, lesion_patch = _crop(image, box), _crop(lesion, box)
    base = _crop(_baseline(image, baseline, spacing, blur_sigma_mm), box)
    net.eval()
    device = next(net.parameters()).device
    weights = torch.from_numpy(lesion_patch.astype(np.float32))[None].to(device)
    forward = _target_function(net, weights, target)
    inputs, reference = (torch.from_numpy(a)[None].to(device) for a in (patch, base))
    with torch.no_grad():
        f_x, f_0 = float(forward(inputs)[0]), float(forward(reference)[0])
    explainer, steps = IntegratedGradients(forward), int(n_steps)
    while True:
        attributions, delta = explainer.attribute(
            inputs, baselines=reference, n_steps=steps, method="gausslegendre",
            internal_batch_size=internal_batch_size, return_convergence_delta=True,
        )
        error = abs(float(delta.reshape(-1)[0])) / max(abs(f_x - f_0), 1e-12)
        if tolerance is None or error <= tolerance or steps * 2 > max_steps:
            break
        steps *= 2
    return Attribution(
        values=attributions[0].detach().float().cpu().numpy(), box=box, target=f_x, baseline_target=f_0,
        delta=float(delta.reshape(-1)[0]), n_steps=steps, baseline=baseline if isinstance(baseline, str) else "array",
    )


def saliency_volume(attribution: Attribution, shape: Sequence[int]) -> np.ndarray:
    """The channel-summed signed attribution placed on a ``shape`` grid (0 outside the patch), float32."""
    summed = attribution.values.sum(axis=0)
    out = np.zeros(tuple(int(s) for s in shape), np.float32)
    source, target = [], []
    for (start, stop), extent in zip(attribution.box, out.shape):
        lo, hi = max(start, 0), min(stop, extent)
        target.append(slice(lo, hi))
        source.append(slice(lo - start, hi - start))
    out[tuple(target)] = summed[tuple(source)]
    return out


# ---------------------------------------------------------------------------
# One lesion of one case, from a trained run folder (cached)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SaliencyResult:
    """Where the native-space saliency map of one lesion is, and the facts about it."""

    path: Path
    sidecar: Path
    model_hash: str
    case_id: str
    lesion_id: int
    target: float
    baseline_target: float
    delta: float
    completeness_error: float
    n_steps: int
    channel_totals: dict[str, float]
    cached: bool


def file_digest(path: Path, length: int = 16) -> str:
    """First ``length`` hex digits of the SHA-256 of a file (the model hash of the cache key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def _mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(np.asarray(mask, bool)).tobytes() + str(mask.shape).encode()).hexdigest()[:16]


def _lesion_on_grid(lesion: np.ndarray, native: Any, target: Any) -> np.ndarray:
    """A native-grid lesion on the preprocessed grid (linear, >= 0.5; the peak voxel for tiny lesions)."""
    from bench.imageio import to_sitk
    from bench.preprocess import resample_to_grid

    fraction = resample_to_grid(to_sitk(lesion.astype(np.float32), native), target, "linear")
    if fraction.max() <= 0:
        raise ValueError("the lesion lies outside the model's preprocessed (cropped) grid")
    mask = fraction >= 0.5
    return mask if mask.any() else fraction == fraction.max()


def lesion_saliency(
    run_dir: Path,
    case: "Case",
    prediction: np.ndarray,
    lesion_id: int,
    *,
    cache_dir: Path,
    n_steps: int = DEFAULT_STEPS,
    tolerance: float | None = None,
    patch_size: Sequence[int] | None = None,
    device: str = "cpu",
) -> SaliencyResult:
    """Saliency of predicted component ``lesion_id`` (1-based, raster order) of ``prediction`` (native grid).

    Loads ``run_dir/model.pt``, preprocesses ``case`` with the model's configuration, maps the lesion
    to that grid, runs :func:`integrated_gradients` and writes the native-space map; returns the cached
    files when the same (model, case, lesion, steps, lesion digest) was computed before.
    """
    from bench.imageio import write_image, write_text_atomic
    from bench.models.monai_model import ModelBundle
    from bench.models.runfolder import MODEL_FILE
    from bench.preprocess import preprocess
    from bench.uncertainty import label_components

    model_path = Path(run_dir) / MODEL_FILE
    model_hash = file_digest(model_path)
    labels, count = label_components(np.asarray(prediction, bool))
    if not 1 <= lesion_id <= count:
        raise ValueError(f"case {case.case_id}: no predicted lesion {lesion_id} (the prediction has {count})")
    lesion = labels == lesion_id
    stem = f"{model_hash}_{case.case_id}_lesion{lesion_id}_ig{n_steps}" + (f"_tol{tolerance:g}" if tolerance else "")
    path, sidecar = Path(cache_dir) / f"{stem}.nii.gz", Path(cache_dir) / f"{stem}.json"
    digest = _mask_digest(lesion)
    if path.is_file() and sidecar.is_file():
        facts = json.loads(sidecar.read_text(encoding="utf-8"))
        if facts.get("lesion_digest") == digest:
            return _result(path, sidecar, facts, cached=True)
    bundle = ModelBundle.load(model_path)
    prepared = preprocess(case, bundle.preprocessing_config(), with_label=False)
    net = bundle.build_network().to(device)
    attribution = integrated_gradients(
        net, prepared.image, _lesion_on_grid(lesion, prepared.native_geometry, prepared.geometry),
        patch_size=patch_size or bundle.patch_size, spacing=prepared.spacing, n_steps=n_steps, tolerance=tolerance,
    )
    native = prepared.to_native(saliency_volume(attribution, prepared.shape))
    write_image(native.astype(np.float32), prepared.native_geometry, path)
    facts = {
        "model_hash": model_hash, "case_id": case.case_id, "lesion_id": int(lesion_id), "lesion_digest": digest,
        "method": attribution.method, "n_steps": attribution.n_steps, "baseline": attribution.baseline,
        "target": attribution.target, "baseline_target": attribution.baseline_target, "delta": attribution.delta,
        "completeness_error": attribution.completeness_error,
        "channel_totals": dict(zip(prepared.channel_names, attribution.channel_totals())),
        "box": [list(b) for b in attribution.box],
    }
    write_text_atomic(sidecar, json.dumps(facts, indent=2))
    return _result(path, sidecar, facts, cached=False)


def _result(path: Path, sidecar: Path, facts: dict[str, Any], *, cached: bool) -> SaliencyResult:
    return SaliencyResult(
        path=path, sidecar=sidecar, model_hash=str(facts["model_hash"]), case_id=str(facts["case_id"]),
        lesion_id=int(facts["lesion_id"]), target=float(facts["target"]), baseline_target=float(facts["baseline_target"]),
        delta=float(facts["delta"]), completeness_error=float(facts["completeness_error"]), n_steps=int(facts["n_steps"]),
        channel_totals={k: float(v) for k, v in facts["channel_totals"].items()}, cached=cached,
    )
