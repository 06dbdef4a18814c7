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

Three continuous overlays go next to it (:data:`HEAT_OVERLAYS`), each with a colour bar
(:func:`colourbar_html`) and an opacity: the stored lesion **probability** (inferno, 0-1), its voxel
**uncertainty** (predictive entropy in bits, viridis, 0-1; :func:`bench.uncertainty.binary_entropy` of the
stored levels, exactly what the scores used) and, on demand, the **saliency** of one predicted lesion
(integrated gradients of a trained MONAI fold, :func:`saliency_map`; diverging, symmetric around 0).

The full slice is always shown; :func:`with_inset` adds a zoomed inset of the lesions and errors (the
frame of :func:`focus_box`, outlined in yellow on the slice) in the corner farthest from them, so small
HIE lesions are readable without hiding the anatomy around them.

Every case is shown in one radiological orientation, whatever its file's header (LPS, RAS, LAS, oblique,
axis-permuted): :func:`load_case_volumes` reorients the channels, the reference, the prediction and the
probability with :func:`bench.data.figures.display_transform` (the permutation and flips of
:func:`bench.data.figures.display_orientation`, no interpolation), so axial slices have anterior at the
top and the patient's left on the viewer's right. Whatever else is drawn on a case goes through the same
:attr:`CaseVolumes.display` transform: uncertainty maps, saliency (:func:`display_saliency`, computed on
the native grid and reoriented) and the stored lesion centroids (:func:`display_lesion_slices`, native
voxel indices mapped to display slices). Stored results stay in native space; only the picture turns.

This is display, not scoring: the numbers in the tables come from the store. Images are rendered with
numpy and saved as PNG (Pillow), which is fast enough to re-render on every slider move; slices are
scaled with nearest-neighbour sampling to square pixels in millimetres (thick slices stay visible as
such in the through-plane views).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from bench.data.figures import DisplayTransform

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
#: Colour of the zoom frame on the full slice and of the inset's border.
INSET_COLOUR = (255, 221, 0)


@dataclass(frozen=True)
class HeatOverlay:
    """A continuous overlay: matplotlib colour map, value range (``None``: symmetric around 0, from the
    data), legend title, and the share of the range below which voxels stay grey (so anatomy shows)."""

    cmap: str
    value_range: tuple[float, float] | None
    title: str
    floor: float = 0.02


#: The continuous overlays of the viewer, by key.
HEAT_OVERLAYS: dict[str, HeatOverlay] = {
    "probability": HeatOverlay("inferno", (0.0, 1.0), "lesion probability"),
    "uncertainty": HeatOverlay("viridis", (0.0, 1.0), "uncertainty: predictive entropy [bits]"),
    "saliency": HeatOverlay("RdBu_r", None, "saliency: integrated gradients (red: towards lesion)", floor=0.05),
}


@dataclass(frozen=True)
class CaseVolumes:
    """The arrays one case view needs, in display orientation (array order z, y, x of the LPS frame).

    Attributes:
        channels: Channel name -> float32 volume (ADC, Z-ADC).
        reference: Reference lesion mask.
        prediction: Predicted mask, or ``None`` when the prediction file is unavailable.
        spacing: Voxel size in mm, display array order.
        probability: Stored lesion probability in [0, 1], or ``None``.
        display: How the case's native arrays became these (:class:`bench.data.figures.DisplayTransform`);
            ``None`` for arrays given already in display orientation. Use it for every other array of
            the case (:meth:`to_display`) and for native voxel indices (lesion centroids).
    """

    channels: dict[str, np.ndarray]
    reference: np.ndarray
    prediction: np.ndarray | None
    spacing: tuple[float, float, float]
    probability: np.ndarray | None = None
    display: "DisplayTransform | None" = None

    def to_display(self, native: np.ndarray) -> np.ndarray:
        """An array on the case's native grid (a map, a mask) in the orientation of these volumes."""
        return native if self.display is None else self.display.apply(native)

    def to_native(self, shown: np.ndarray) -> np.ndarray:
        """An array in the orientation of these volumes back on the case's native grid."""
        return shown if self.display is None else self.display.invert(shown)

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


def load_case_volumes(
    dataset_root: str | Path, case_id: str, prediction_path: str | Path | None, probability_path: str | Path | None = None
) -> CaseVolumes:
    """Read a case's channels and reference through the Case API, its stored prediction and, when given,
    its stored probability (:func:`load_probability`), all reoriented to the display orientation
    (:func:`bench.data.figures.display_transform` of the case's header; :attr:`CaseVolumes.display`).

    Raises:
        ViewerError: the dataset has no such case, or the prediction's grid differs from the case's.
            A missing prediction file is not an error: the case is shown with its reference only.
    """
    from bench.data.dataset import Dataset, DatasetError
    from bench.data.figures import display_transform
    from bench.imageio import ImageError, read_image

    try:
        case = Dataset.load(dataset_root).case(case_id)
        channels = {name: case.load_channel(name)[0] for name in case.channel_names}
        reference = case.load_label()
        display = display_transform(case.geometry)
    except (DatasetError, KeyError, ImageError, OSError, ValueError) as exc:
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
    probability = load_probability(probability_path, reference.shape)
    return CaseVolumes(
        channels={name: display.apply(array) for name, array in channels.items()},
        reference=display.apply(reference),
        prediction=None if prediction is None else display.apply(prediction),
        spacing=display.spacing(case.geometry.spacing),
        probability=None if probability is None else display.apply(probability),
        display=display,
    )


def load_probability(path: str | Path | None, shape: Sequence[int]) -> np.ndarray | None:
    """A stored probability map (``uint8`` levels) as float32 in [0, 1]; ``None`` when there is none.

    Raises:
        ViewerError: the file is unreadable, not ``uint8`` levels, or not on the case's grid.
    """
    from bench.calibration import dequantize
    from bench.imageio import ImageError, read_image

    if not path or not Path(path).is_file():
        return None
    try:
        levels, _ = read_image(path)
        if tuple(levels.shape) != tuple(shape):
            raise ViewerError(f"{path}: probability has shape {levels.shape}, the case has {tuple(shape)}")
        return dequantize(np.asarray(levels))
    except (ImageError, OSError, ValueError) as exc:
        raise ViewerError(f"{path}: {exc}") from exc


def display_heat_maps(probability_path: str | Path | None, display: "DisplayTransform") -> dict[str, np.ndarray]:
    """The stored probability of a case (native grid, checked against ``display.shape``) and its entropy,
    both in display orientation; empty when there is no probability file."""
    probability = load_probability(probability_path, display.shape)
    if probability is None:
        return {}
    shown = display.apply(probability)
    return {"probability": shown, "uncertainty": entropy_map(shown)}


def display_lesion_slices(lesions: "pd.DataFrame", centroids: "pd.DataFrame | None", display: "DisplayTransform | None") -> "pd.DataFrame":
    """``lesions`` (:func:`bench.app.queries.case_lesions`: ``slice`` is the native centroid's axis-0 index)
    with ``slice`` as the display slice of each lesion's centroid.

    ``centroids`` holds the stored lesion rows of the case with ``kind`` (``ref`` / ``pred``), ``lesion_id``
    and ``centroid_z``, ``centroid_y``, ``centroid_x`` (native voxel indices); a lesion without a full
    centroid keeps no slice. When the display only reverses or keeps axis 0 (every axial file), the
    native slice alone is enough and ``centroids`` may be ``None``.
    """
    import pandas as pd

    if display is None or display.is_identity or lesions.empty:
        return lesions
    out = lesions.copy()
    if display.axes[0] == 0 and centroids is None:
        native = out["slice"].astype("Float64")
        out["slice"] = ((display.shape[0] - 1) - native).round().astype("Int64") if display.flips[0] else out["slice"]
        return out
    if centroids is None:
        out["slice"] = pd.array([pd.NA] * len(out), dtype="Int64")
        return out
    kinds = {"reference": "ref", "predicted": "pred"}
    where = {(str(r.kind), int(r.lesion_id)): (r.centroid_z, r.centroid_y, r.centroid_x) for r in centroids.itertuples()}
    slices = []
    for row in out.itertuples():
        centroid = where.get((kinds.get(str(row.kind), str(row.kind)), int(row.lesion_id)))
        if centroid is None or any(pd.isna(c) for c in centroid):
            slices.append(pd.NA)
        else:
            slices.append(int(round(display.index(tuple(float(c) for c in centroid))[0])))
    out["slice"] = pd.array(slices, dtype="Int64")
    return out


def entropy_map(probability: np.ndarray) -> np.ndarray:
    """Voxel uncertainty shown by the viewer: predictive entropy in bits of the (stored) probability."""
    from bench.uncertainty import binary_entropy

    return binary_entropy(probability)


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
    heat: np.ndarray | None = None,
    heat_overlay: str = "probability",
    heat_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """An RGB uint8 image of one 2-D slice with the error classes in ``show`` (or a continuous overlay)
    painted over it.

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
        heat: 2-D slice of a continuous map, painted with :data:`HEAT_OVERLAYS` ``[heat_overlay]``.
        heat_range: Its value range (default: the overlay's, or symmetric from the data).
    """
    low, high = window
    grey = np.clip((np.nan_to_num(image.astype(np.float32)) - low) / (high - low), 0.0, 1.0)
    if foreground is not None:
        grey = np.where(foreground, grey, 0.0)
    rgb = np.repeat((grey * 255.0)[..., None], 3, axis=2)
    if heat is not None:
        rgb = _paint_heat(rgb, heat, HEAT_OVERLAYS[heat_overlay], heat_range, alpha)
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


def heat_range_of(values: np.ndarray, overlay: str) -> tuple[float, float]:
    """The colour scale of a map: the overlay's fixed range, or symmetric around 0 up to the 99th percentile
    of the map's non-zero |values| (attributions are heavy-tailed: the largest few would wash out the rest)."""
    fixed = HEAT_OVERLAYS[overlay].value_range
    if fixed is not None:
        return fixed
    magnitudes = np.abs(values[np.isfinite(values) & (values != 0)])
    top = float(np.percentile(magnitudes, 99)) if magnitudes.size else 0.0
    return (-top, top) if top > 0 else (-1.0, 1.0)


@functools.cache
def colour_table(cmap: str) -> np.ndarray:
    """256 x 3 uint8 lookup table of a matplotlib colour map (read once per map)."""
    import matplotlib

    return (matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).round().astype(np.uint8)


def _paint_heat(rgb: np.ndarray, values: np.ndarray, overlay: HeatOverlay, value_range: tuple[float, float] | None, alpha: float) -> np.ndarray:
    """Blend the colour map of ``values`` over ``rgb`` where they stand out from the background."""
    low, high = value_range or overlay.value_range or heat_range_of(values, "saliency")
    scaled = np.clip((np.nan_to_num(values.astype(np.float32)) - low) / max(high - low, 1e-12), 0.0, 1.0)
    # Grey stays where the map is at its background: 0 for maps from 0, the middle for signed ones.
    rest = 0.0 if overlay.value_range is not None else 0.5
    shown = np.abs(scaled - rest) >= overlay.floor * (1.0 if rest == 0.0 else 0.5)
    colours = colour_table(overlay.cmap)[(scaled * 255.0).round().astype(np.int64)].astype(np.float32)
    rgb = rgb.copy()
    rgb[shown] = (1.0 - alpha) * rgb[shown] + alpha * colours[shown]
    return rgb


def colourbar_html(overlay: str, value_range: tuple[float, float] | None = None) -> str:
    """A horizontal colour bar (CSS gradient with the map's colours) titled and labelled with its range."""
    spec = HEAT_OVERLAYS[overlay]
    low, high = value_range or spec.value_range or (-1.0, 1.0)
    table = colour_table(spec.cmap)
    stops = ", ".join(f"rgb({r},{g},{b}) {100 * i / 10:.0f}%" for i, (r, g, b) in enumerate(table[np.linspace(0, 255, 11).astype(int)]))
    middle = f"<span>{(low + high) / 2:.3g}</span>" if spec.value_range is None else f"<span>{(low + high) / 2:.2g}</span>"
    return (
        '<div style="font-size:0.8rem;max-width:440px;">'
        f'<div>{spec.title}</div>'
        f'<div style="height:0.8rem;border-radius:3px;background:linear-gradient(to right, {stops});"></div>'
        f'<div style="display:flex;justify-content:space-between;"><span>{low:.3g}</span>{middle}<span>{high:.3g}</span></div></div>'
    )


def with_inset(full: np.ndarray, crop: np.ndarray, box: tuple[slice, slice], shape: tuple[int, int]) -> np.ndarray:
    """The rendered full slice with a yellow frame around ``box`` and ``crop`` (that region, rendered
    larger by the caller) pasted as an inset, framed alike, into the corner farthest from the box.

    ``shape`` is the slice's size in voxels (rows, cols); ``full`` and ``crop`` are RGB renderings. A box
    that covers most of the slice is left as it is (there is nothing to zoom)."""
    rows, cols = box
    if (rows.stop - rows.start) * (cols.stop - cols.start) > 0.5 * shape[0] * shape[1]:
        return full
    sy, sx = full.shape[0] / shape[0], full.shape[1] / shape[1]
    out = full.copy()
    top, left = int(rows.start * sy), int(cols.start * sx)
    bottom, right = max(top + 3, int(rows.stop * sy) - 1), max(left + 3, int(cols.stop * sx) - 1)
    _frame(out, top, bottom, left, right)
    h, w = min(crop.shape[0] + 4, out.shape[0]), min(crop.shape[1] + 4, out.shape[1])
    y0 = 0 if (top + bottom) / 2 > out.shape[0] / 2 else out.shape[0] - h
    x0 = 0 if (left + right) / 2 > out.shape[1] / 2 else out.shape[1] - w
    out[y0 + 2 : y0 + h - 2, x0 + 2 : x0 + w - 2] = crop[: h - 4, : w - 4]
    _frame(out, y0, y0 + h - 1, x0, x0 + w - 1)
    return out


def _frame(rgb: np.ndarray, top: int, bottom: int, left: int, right: int, width: int = 2) -> None:
    """Draw a :data:`INSET_COLOUR` rectangle (in place) with inner edges ``top..bottom``, ``left..right``."""
    rgb[top : top + width, left : right + 1] = INSET_COLOUR
    rgb[bottom - width + 1 : bottom + 1, left : right + 1] = INSET_COLOUR
    rgb[top : bottom + 1, left : left + width] = INSET_COLOUR
    rgb[top : bottom + 1, right - width + 1 : right + 1] = INSET_COLOUR


def saliency_run_folder(prediction_path: str | Path | None, fold: str) -> Path | None:
    """The trained MONAI fold behind a stored prediction (``<results>/runs/<run>/models/<fold>``, holding
    ``model.pt``), or ``None`` when the run has none (a submission that was not trained with MONAI)."""
    if not prediction_path:
        return None
    folder = Path(prediction_path).resolve().parent.parent / "models" / str(fold)
    return folder if (folder / "model.pt").is_file() else None


def saliency_map(run_folder: Path, dataset_root: str | Path, case_id: str, prediction: np.ndarray, lesion_id: int, **options) -> tuple[np.ndarray, dict]:
    """Integrated-gradients saliency of predicted lesion ``lesion_id`` (1-based, raster order of the native
    ``prediction``) on the native grid (the viewer shows it through :func:`display_saliency`), and its facts (completeness error, attribution per channel): :func:`bench.saliency.lesion_saliency`,
    cached in ``<run folder>/saliency`` (a second request reads the file)."""
    from dataclasses import asdict

    from bench.data.dataset import Dataset
    from bench.imageio import read_image
    from bench.saliency import lesion_saliency

    case = Dataset.load(dataset_root).case(case_id)
    result = lesion_saliency(Path(run_folder), case, prediction, lesion_id, cache_dir=Path(run_folder) / "saliency", **options)
    values, _ = read_image(result.path)
    return values.astype(np.float32), asdict(result)


def display_saliency(run_folder: Path, dataset_root: str | Path, case_id: str, volumes: CaseVolumes, lesion_id: int, **options) -> tuple[np.ndarray, dict]:
    """:func:`saliency_map` for a case shown as ``volumes``: the prediction goes back to the native grid
    (where the lesion ids and the model live), the attribution comes back in display orientation."""
    if volumes.prediction is None:
        raise ViewerError(f"case {case_id}: no prediction to explain")
    values, facts = saliency_map(run_folder, dataset_root, case_id, volumes.to_native(volumes.prediction), lesion_id, **options)
    return volumes.to_display(values), facts


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
    """One case as a montage tile, in display orientation: the slice with the most reference lesion, lesions highlighted."""
    from bench.data.dataset import Dataset

    from bench.data.figures import display_transform

    case = Dataset.load(dataset_root).case(case_id)
    image, geometry = case.load_channel(channel)
    display = display_transform(geometry)
    name = case.channel_names[channel] if isinstance(channel, int) else channel
    reference = case.load_label() if case.label_path is not None else np.zeros(image.shape, bool)
    image, reference, first = display.apply(image), display.apply(reference), display.apply(case.load_channel(0)[0])
    spacing = display.spacing(geometry.spacing)
    counts = reference.reshape(reference.shape[0], -1).sum(axis=1)
    z = int(np.argmax(counts)) if counts.any() else image.shape[0] // 2
    return render_slice(
        image[z],
        window=display_window(image, symmetric=is_z_score_map(name)),
        foreground=first[z] != 0,
        highlight=reference[z],
        pixel_mm=(spacing[1], spacing[2]),
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
