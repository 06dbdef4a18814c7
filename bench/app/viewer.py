"""Slice images for the case viewer: ADC and Z-ADC with the prediction's errors painted on top.

Every voxel of a slice is shown in grey (the channel, windowed) and, where reference and prediction
disagree or agree on lesion, in one of three colours (Okabe-Ito, distinguishable with the common colour
vision deficiencies):

========== ===================================== =========
class      meaning                               colour
========== ===================================== =========
``tp``     lesion in the reference and predicted bluish green
``fp``     predicted, not in the reference       vermillion
``fn``     in the reference, missed              sky blue
========== ===================================== =========

This is display, not scoring: the numbers in the tables come from the store. Images are rendered with
numpy and saved as PNG (Pillow), which is fast enough to re-render on every slider move; slices are
scaled with nearest-neighbour sampling to square pixels in millimetres (thick slices stay visible as
such in the through-plane views).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Codes of the error map (:func:`error_map`).
BACKGROUND, TRUE_POSITIVE, FALSE_POSITIVE, FALSE_NEGATIVE = 0, 1, 2, 3
#: Overlay classes, their error-map code, colour (RGB) and legend text.
OVERLAY_CLASSES: dict[str, tuple[int, tuple[int, int, int], str]] = {
    "tp": (TRUE_POSITIVE, (0, 158, 115), "true positive (lesion found)"),
    "fp": (FALSE_POSITIVE, (213, 94, 0), "false positive (predicted, not lesion)"),
    "fn": (FALSE_NEGATIVE, (86, 180, 233), "false negative (lesion missed)"),
}
#: Colour of the reference lesions when they are shown alone (no prediction), e.g. in dataset montages.
REFERENCE_COLOUR = (240, 228, 66)


@dataclass(frozen=True)
class CaseVolumes:
    """The arrays one case view needs, array order (z, y, x).

    Attributes:
        channels: Channel name -> float32 volume (ADC, Z-ADC).
        reference: Reference lesion mask.
        prediction: Predicted mask, or ``None`` when the prediction file is unavailable.
        spacing: Voxel size in mm, array order.
    """

    channels: dict[str, np.ndarray]
    reference: np.ndarray
    prediction: np.ndarray | None
    spacing: tuple[float, float, float]

    @property
    def foreground(self) -> np.ndarray:
        """Voxels inside the brain: non-zero in the first channel (the maps are skull-stripped)."""
        return next(iter(self.channels.values())) != 0

    @property
    def n_slices(self) -> int:
        return int(self.reference.shape[0])

    @property
    def errors(self) -> np.ndarray:
        """The error map of the case (reference only when there is no prediction)."""
        prediction = self.prediction if self.prediction is not None else np.zeros_like(self.reference)
        return error_map(self.reference, prediction)


class ViewerError(RuntimeError):
    """A case cannot be shown: its dataset folder or prediction file is missing or does not fit."""


def load_case_volumes(dataset_root: str | Path, case_id: str, prediction_path: str | Path | None) -> CaseVolumes:
    """Read a case's channels and reference through the Case API, and its stored prediction.

    Raises:
        ViewerError: the dataset has no such case, or the prediction's grid differs from the case's.
            A missing prediction file is not an error: the case is shown with its reference only.
    """
    from bench.data.dataset import Dataset, DatasetError
    from bench.imageio import ImageError, read_image

    try:
        case = Dataset.load(dataset_root).case(case_id)
        channels = {name: case.load_channel(name)[0] for name in case.channel_names}
        reference = case.load_label()
        spacing = tuple(float(s) for s in case.geometry.spacing)
    except (DatasetError, KeyError, ImageError, OSError) as exc:
        raise ViewerError(f"case {case_id} of {dataset_root}: {exc}") from exc
    prediction = None
    if prediction_path and Path(prediction_path).is_file():
        try:
            array, _ = read_image(prediction_path)
        except (ImageError, OSError) as exc:
            raise ViewerError(f"{prediction_path}: {exc}") from exc
        if array.shape != reference.shape:
            raise ViewerError(f"{prediction_path}: prediction has shape {array.shape}, case {case_id} has {reference.shape}")
        prediction = array > 0
    return CaseVolumes(channels=channels, reference=reference, prediction=prediction, spacing=spacing)  # type: ignore[arg-type]


def error_map(reference: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """uint8 map: 0 background, 1 true positive, 2 false positive, 3 false negative."""
    reference = np.asarray(reference, bool)
    prediction = np.asarray(prediction, bool)
    out = np.zeros(reference.shape, np.uint8)
    out[reference & prediction] = TRUE_POSITIVE
    out[prediction & ~reference] = FALSE_POSITIVE
    out[reference & ~prediction] = FALSE_NEGATIVE
    return out


def display_window(volume: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0), *, symmetric: bool = False) -> tuple[float, float]:
    """Grey-level window of a volume: percentiles of its non-zero finite voxels (the brain).

    ``symmetric`` centres the window on 0 (for z-score maps such as Z-ADC, where 0 is "normal").
    """
    values = volume[np.isfinite(volume) & (volume != 0)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if symmetric:
        half = max(abs(low), abs(high)) or 1.0
        return -half, half
    return (low, high) if high > low else (low, low + 1.0)


def is_z_score_map(channel_name: str) -> bool:
    """Whether a channel is a z-score map (``Z-ADC``): shown with a window centred on 0."""
    return channel_name.upper().startswith("Z")


def slices_with(errors: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Indices (axis 0) of slices that contain any voxel of the given error-map codes."""
    present = np.isin(errors, list(classes))
    return np.flatnonzero(present.reshape(present.shape[0], -1).any(axis=1))


def step_to(current: int, candidates: Sequence[int] | np.ndarray, direction: int) -> int | None:
    """The next candidate after ``current`` (``direction`` +1) or before it (-1), wrapping around."""
    values = sorted({int(c) for c in candidates})
    if not values:
        return None
    if direction > 0:
        later = [c for c in values if c > current]
        return later[0] if later else values[0]
    earlier = [c for c in values if c < current]
    return earlier[-1] if earlier else values[-1]


def best_slice(errors: np.ndarray) -> int:
    """A slice worth showing first: the one with the most lesion or error voxels (middle if none)."""
    counts = (errors > 0).reshape(errors.shape[0], -1).sum(axis=1)
    return int(np.argmax(counts)) if counts.any() else errors.shape[0] // 2


def render_slice(
    image: np.ndarray,
    errors: np.ndarray | None = None,
    *,
    window: tuple[float, float],
    foreground: np.ndarray | None = None,
    highlight: np.ndarray | None = None,
    pixel_mm: tuple[float, float] = (1.0, 1.0),
    show: Iterable[str] = ("tp", "fp", "fn"),
    alpha: float = 0.6,
    height: int = 320,
) -> np.ndarray:
    """An RGB uint8 image of one 2-D slice with the error classes in ``show`` painted over it.

    Args:
        image: 2-D slice of a channel.
        errors: 2-D slice of :func:`error_map` (``None``: grey only).
        window: Grey-level window (low, high).
        foreground: 2-D mask of the brain; voxels outside it are drawn black.
        highlight: 2-D mask painted in :data:`REFERENCE_COLOUR` (the reference lesions, when there
            is no prediction to compare with).
        pixel_mm: Physical size of a row and a column of the slice (mm), for the aspect ratio.
        show: Overlay classes to paint (keys of :data:`OVERLAY_CLASSES`).
        alpha: Opacity of the overlay.
        height: Approximate output height in pixels (nearest-neighbour upscaling, integer factors).
    """
    low, high = window
    grey = np.clip((np.nan_to_num(image.astype(np.float32)) - low) / (high - low), 0.0, 1.0)
    if foreground is not None:
        grey = np.where(foreground, grey, 0.0)
    rgb = np.repeat((grey * 255.0)[..., None], 3, axis=2)
    if errors is not None:
        for key in show:
            code, colour, _ = OVERLAY_CLASSES[key]
            where = errors == code
            rgb[where] = (1.0 - alpha) * rgb[where] + alpha * np.asarray(colour, np.float32)
    if highlight is not None:
        rgb[highlight] = (1.0 - alpha) * rgb[highlight] + alpha * np.asarray(REFERENCE_COLOUR, np.float32)
    rgb = rgb.astype(np.uint8)
    # Integer upscaling to roughly square millimetre pixels, then to the requested height.
    row_mm, col_mm = (float(pixel_mm[0]), float(pixel_mm[1]))
    unit = min(row_mm, col_mm)
    row_factor, col_factor = max(1, round(row_mm / unit)), max(1, round(col_mm / unit))
    scale = max(1, round(height / (image.shape[0] * row_factor)))
    return np.repeat(np.repeat(rgb, row_factor * scale, axis=0), col_factor * scale, axis=1)


def to_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB (or grey) uint8 array."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def montage(tiles: Sequence[np.ndarray], *, columns: int, gap: int = 6, background: int = 14) -> np.ndarray:
    """Tiles (RGB uint8, any sizes) laid out on a grid, each centred in a cell of the largest size."""
    if not tiles:
        return np.zeros((1, 1, 3), np.uint8)
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    cell_h = max(t.shape[0] for t in tiles)
    cell_w = max(t.shape[1] for t in tiles)
    out = np.full((rows * cell_h + (rows + 1) * gap, columns * cell_w + (columns + 1) * gap, 3), background, np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        top = gap + r * (cell_h + gap) + (cell_h - tile.shape[0]) // 2
        left = gap + c * (cell_w + gap) + (cell_w - tile.shape[1]) // 2
        out[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
    return out


def case_tile(dataset_root: str | Path, case_id: str, *, channel: int | str = 0, height: int = 200) -> np.ndarray:
    """One case as a montage tile: the slice with the most reference lesion, lesions highlighted."""
    from bench.data.dataset import Dataset

    case = Dataset.load(dataset_root).case(case_id)
    image, geometry = case.load_channel(channel)
    name = case.channel_names[channel] if isinstance(channel, int) else channel
    reference = case.load_label() if case.label_path is not None else np.zeros(image.shape, bool)
    counts = reference.reshape(reference.shape[0], -1).sum(axis=1)
    z = int(np.argmax(counts)) if counts.any() else image.shape[0] // 2
    first, _ = case.load_channel(0)
    return render_slice(
        image[z],
        window=display_window(image, symmetric=is_z_score_map(name)),
        foreground=first[z] != 0,
        highlight=reference[z],
        pixel_mm=(geometry.spacing[1], geometry.spacing[2]),
        height=height,
    )


def focus_box(errors: np.ndarray, *, margin: float = 0.35, min_size: int = 24) -> tuple[slice, slice]:
    """In-plane rows and columns around every lesion and error voxel of the case (all slices), with a
    margin, at least ``min_size`` voxels wide, clipped to the image: a frame that stays put while the
    slices are scrolled. The whole slice when there is nothing to focus on."""
    rows, cols = errors.shape[1:]
    present = errors > 0
    if not present.any():
        return slice(0, rows), slice(0, cols)
    box = []
    for axis, size in ((1, rows), (2, cols)):
        hit = np.flatnonzero(present.any(axis=tuple(a for a in range(3) if a != axis)))
        low, high = int(hit[0]), int(hit[-1]) + 1
        pad = max(int(round((high - low) * margin)), (min_size - (high - low) + 1) // 2, 2)
        low, high = max(0, low - pad), min(size, high + pad)
        box.append(slice(low, high))
    return box[0], box[1]
