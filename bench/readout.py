"""The per-case read-out page: one self-contained HTML file a clinician can read offline.

Contract
--------
:func:`write_readout` renders, for one case and one prediction:

* a summary: total lesion volume (ml) and lesion count, predicted beside reference with the error in
  ml, and the regions involved (:func:`bench.regions.case_readout`, template mapped to the case's
  brain mask, by default ``ADC > 0``);
* the region table (predicted, reference and error in ml per region);
* uncertainty, when an uncertainty map is given: mean entropy inside the predicted lesions, the
  fraction of the brain that is uncertain, how well it flags errors (with a reference) and a table of
  the predicted lesions with their region, volume and uncertainty; calibration (Brier, ECE) when a
  probability map and a reference are given; "not available" otherwise, never an invented value;
* images: up to ``max_slices`` axial slices through the lesions, each the **full slice** (radiological
  convention: patient's right on the left, anterior at the top) with predicted (orange, solid) and
  reference (cyan, dashed) outlines and a zoomed inset on the lesions, then the same slice with the
  region map, and the probability and uncertainty maps when given.

Everything is inline (PNG images as base64 ``data:`` URIs, CSS in the page, no script, no remote
asset or link), and the file is written atomically: the page is built in memory, then written to a
temporary file beside ``out_path`` and renamed, so a reader never sees a half-written page and a
failed render leaves the previous page untouched. Matplotlib runs with the Agg backend.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from bench.regions import OUTSIDE_BRAIN, REGION_TITLES, CaseReadout, RegionMap, case_readout, map_regions

__all__ = ["write_readout", "render_readout"]

PREDICTED_COLOUR = "#ff8c1a"
REFERENCE_COLOUR = "#19d3f3"
#: Region colours (colour-blind-friendly "tab10"), one per region in :data:`bench.regions.REGION_NAMES` order.
REGION_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
#: Voxels whose entropy (bits) exceeds this count as "uncertain" in the summary.
UNCERTAIN_BITS = 0.5


class CaseLike(Protocol):
    """What the page needs from a case (:class:`bench.data.dataset.Case` satisfies it)."""

    case_id: str
    site: str
    channel_names: tuple[str, ...]

    def load_channel(self, index_or_name: int | str) -> tuple[np.ndarray, Any]: ...


# ---------------------------------------------------------------------------
# Display orientation
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _View:
    """Arrays reoriented so that axis 0 runs inferior -> superior, 1 anterior -> posterior, 2 right -> left."""

    order: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    spacing: tuple[float, float, float]

    @classmethod
    def of(cls, geometry: Any) -> "_View":
        direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
        # world direction (LPS) of array axis a is column 2 - a; world axis 2 (S) first, then P, then L
        dominant = [int(np.argmax(np.abs(direction[:, 2 - a]))) for a in range(3)]
        if sorted(dominant) != [0, 1, 2]:
            return cls((0, 1, 2), (False, False, False), tuple(geometry.spacing))  # oblique: keep array order
        order = tuple(dominant.index(w) for w in (2, 1, 0))
        flips = tuple(bool(direction[w, 2 - a] < 0) for a, w in zip(order, (2, 1, 0)))
        return cls(order, flips, tuple(float(geometry.spacing[a]) for a in order))  # type: ignore[arg-type]

    def __call__(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.order)
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis)
        return out


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _slices(pred: np.ndarray, ref: np.ndarray | None, brain: np.ndarray, count: int) -> list[int]:
    """Axial slices with the most lesion voxels (predicted or reference), inferior first."""
    lesion = pred | ref if ref is not None else pred
    per_slice = lesion.sum(axis=(1, 2))
    if per_slice.max() == 0:
        filled = np.flatnonzero(brain.any(axis=(1, 2)))
        return [int(filled[len(filled) // 2])] if filled.size else [pred.shape[0] // 2]
    chosen = [int(k) for k in np.argsort(-per_slice, kind="stable")[:count] if per_slice[k] > 0]
    return sorted(chosen)


def _outline(ax: Any, mask: np.ndarray, colour: str, style: str) -> None:
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.4, linestyles=style)


def _zoom_box(lesion: np.ndarray, margin: int = 6, minimum: int = 18) -> tuple[int, int, int, int] | None:
    where = np.argwhere(lesion)
    if where.size == 0:
        return None
    (r0, c0), (r1, c1) = where.min(axis=0), where.max(axis=0)
    centre_r, centre_c = (r0 + r1) / 2, (c0 + c1) / 2
    half = max(max(r1 - r0, c1 - c0) / 2 + margin, minimum / 2)
    return int(centre_r - half), int(centre_r + half), int(centre_c - half), int(centre_c + half)


def _slice_panel(ax: Any, adc: np.ndarray, pred: np.ndarray, ref: np.ndarray | None, window: tuple[float, float], aspect: float) -> None:
    """The full slice with the lesion outlines and the orientation letters."""
    ax.imshow(adc, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
    _outline(ax, pred, PREDICTED_COLOUR, "solid")
    if ref is not None:
        _outline(ax, ref, REFERENCE_COLOUR, "dashed")
    for text, x, y in (("A", 0.5, 0.97), ("P", 0.5, 0.03), ("R", 0.03, 0.5), ("L", 0.97, 0.5)):
        ax.text(x, y, text, color="white", transform=ax.transAxes, ha="center", va="center", fontsize=9, weight="bold")
    ax.set_axis_off()


def _zoom_panel(ax: Any, full_ax: Any, adc: np.ndarray, pred: np.ndarray, ref: np.ndarray | None, window: tuple[float, float], aspect: float) -> None:
    """The lesions of the slice enlarged, with a yellow box and connectors on the full slice."""
    box = _zoom_box(pred | ref if ref is not None else pred)
    _slice_panel(ax, adc, pred, ref, window, aspect)
    for text in list(ax.texts):
        text.remove()
    if box is None:
        ax.text(0.5, 0.5, "no lesion in this slice", color="white", transform=ax.transAxes, ha="center")
        return
    r0, r1, c0, c1 = box
    ax.set_xlim(c0 - 0.5, c1 + 0.5)
    ax.set_ylim(r1 + 0.5, r0 - 0.5)
    ax.set_axis_on()
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor("#e6c200")
        spine.set_linewidth(2)
    full_ax.indicate_inset_zoom(ax, edgecolor="#e6c200", alpha=1.0, linewidth=1.5)


def _head_box(brain: np.ndarray, margin: int = 4) -> tuple[slice, slice]:
    """In-plane box of the head over all slices plus a margin: the whole anatomy, without the empty field of view."""
    if not brain.any():
        return slice(None), slice(None)
    plane = brain.any(axis=0)
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return (slice(max(int(rows[0]) - margin, 0), int(rows[-1]) + margin + 1),
            slice(max(int(cols[0]) - margin, 0), int(cols[-1]) + margin + 1))


def _region_panel(ax: Any, adc: np.ndarray, labels: np.ndarray, pred: np.ndarray, window: tuple[float, float], aspect: float, names: Sequence[str]) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ax.imshow(adc, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
    shown = np.ma.masked_equal(labels, 0)
    ax.imshow(shown - 1, cmap=ListedColormap(REGION_COLOURS[: len(names)]), vmin=0, vmax=len(names) - 1,
              alpha=0.45, aspect=aspect, interpolation="nearest")
    _outline(ax, pred, PREDICTED_COLOUR, "solid")
    present = [k for k in np.unique(labels) if k > 0]
    handles = [Patch(color=REGION_COLOURS[k - 1], label=REGION_TITLES.get(names[k - 1], names[k - 1])) for k in present]
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), fontsize=7, ncol=2, frameon=False)
    ax.set_axis_off()


def _map_panel(fig: Any, ax: Any, adc: np.ndarray, values: np.ndarray, pred: np.ndarray, window: tuple[float, float],
               aspect: float, cmap: str, label: str, top: float) -> None:
    ax.imshow(adc, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
    shown = np.ma.masked_less_equal(values, 0.02 * top)
    image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=top, alpha=0.75, aspect=aspect, interpolation="nearest")
    _outline(ax, pred, PREDICTED_COLOUR, "solid")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label=label)
    ax.set_axis_off()


def _slice_figure(k: int, volumes: dict[str, np.ndarray | None], names: Sequence[str], window: tuple[float, float], aspect: float) -> str:
    """One axial slice: full slice, zoom and regions on the first row; probability and uncertainty below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = [(key, volumes[key]) for key in ("probability", "uncertainty") if volumes.get(key) is not None]
    rows = 2 if maps else 1
    fig, axes = plt.subplots(rows, 3, figsize=(13.0, 4.6 * rows), squeeze=False)
    box = _head_box(volumes["brain"])
    cut = lambda name: None if volumes.get(name) is None else volumes[name][k][box]  # noqa: E731
    adc, pred, ref = cut("adc"), cut("prediction"), cut("reference")
    _slice_panel(axes[0][0], adc, pred, ref, window, aspect)
    axes[0][0].set_title("ADC, full slice, lesion outlines", fontsize=10)
    _zoom_panel(axes[0][1], axes[0][0], adc, pred, ref, window, aspect)
    axes[0][1].set_title("Zoom on the lesions", fontsize=10)
    if volumes.get("regions") is not None:
        _region_panel(axes[0][2], adc, cut("regions"), pred, window, aspect, names)
        axes[0][2].set_title("Template regions", fontsize=10)
    else:
        axes[0][2].set_axis_off()
    for column, (key, values) in enumerate(maps):
        label = "lesion probability" if key == "probability" else "entropy (bits)"
        cmap = "inferno" if key == "probability" else "viridis"
        _map_panel(fig, axes[1][column], adc, values[k][box], pred, window, aspect, cmap, label, 1.0)
        axes[1][column].set_title("Probability" if key == "probability" else "Uncertainty (predictive entropy)", fontsize=10)
    for column in range(len(maps), 3 if rows == 2 else 0):
        axes[1][column].set_axis_off()
    fig.suptitle(f"Axial slice {k + 1} of {volumes['adc'].shape[0]} (counted from inferior)", fontsize=11)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------
# Numbers and HTML
# ---------------------------------------------------------------------------


def _ml(value: float | None) -> str:
    return "not available" if value is None else f"{value:.2f}"


def _signed_ml(value: float | None) -> str:
    return "not available" if value is None else f"{value:+.2f}"


def _number(value: float | None, digits: int = 3) -> str:
    return "not available" if value is None else f"{value:.{digits}f}"


def _titles(names: Sequence[str] | None) -> str:
    if names is None:
        return "not available"
    return ", ".join(html.escape(REGION_TITLES.get(n, n)) for n in names) or "none"


def _summary_html(readout: CaseReadout) -> str:
    has_ref = readout.reference_ml is not None
    rows = [
        ("Total lesion volume (ml)", _ml(readout.predicted_ml), _ml(readout.reference_ml), _signed_ml(readout.error_ml)),
        ("Lesion count", str(readout.predicted_count), "not available" if readout.reference_count is None else str(readout.reference_count),
         "not available" if readout.reference_count is None else f"{readout.predicted_count - readout.reference_count:+d}"),
    ]
    body = "".join(f"<tr><th>{a}</th><td>{b}</td><td>{c}</td><td>{d}</td></tr>" for a, b, c, d in rows)
    involved = (f"<p><b>Regions involved</b> (at least {readout.involvement_ml:g} ml of lesion): predicted: "
                f"{_titles(readout.involved_predicted)}; reference: {_titles(readout.involved_reference)}.</p>")
    note = "" if has_ref else "<p class='note'>No reference segmentation was given: only the prediction is shown.</p>"
    return ("<table class='summary'><tr><th></th><th>Predicted</th><th>Reference</th><th>Error (pred - ref)</th></tr>"
            f"{body}</table>{involved}{note}")


def _region_table_html(readout: CaseReadout) -> str:
    if not readout.regions:
        return "<p id='regions'>Volume by region: not available.</p>"
    rows = []
    for row in readout.regions:
        if row.region == OUTSIDE_BRAIN and row.predicted_ml == 0 and not row.reference_ml:
            continue
        involved = row.region in readout.involved_predicted or row.region in (readout.involved_reference or ())
        rows.append(f"<tr class='{'involved' if involved else ''}'><td>{html.escape(row.title)}</td><td>{_ml(row.predicted_ml)}</td>"
                    f"<td>{_ml(row.reference_ml)}</td><td>{_signed_ml(row.error_ml)}</td></tr>")
    return ("<table id='regions' class='regions'><tr><th>Region</th><th>Predicted (ml)</th><th>Reference (ml)</th>"
            f"<th>Error (ml)</th></tr>{''.join(rows)}</table>")


def _fit_note(readout: CaseReadout) -> str:
    fit = readout.fit
    if fit is None:
        return "<p class='note'>The region template could not be mapped to this case: region volumes are not available.</p>"
    warning = ""
    if fit.truncated_axes:
        warning = (" <b>The brain mask touches the edge of the image</b> (the acquisition does not cover the whole brain), "
                   "so the mapping along that direction is less reliable.")
    return (f"<p class='note'>Regions come from an approximate parametric template ({html.escape(readout.template)}), "
            f"mapped to this brain by an affine fit ({fit.method.replace('_', ' ')}, scales "
            f"{', '.join(f'{s:.2f}' for s in fit.scales)}, rotation {fit.rotation_deg:.0f} degrees); boundaries are "
            f"approximate to several millimetres and this is not an atlas segmentation.{warning}</p>")


def _uncertainty_html(pred: np.ndarray, ref: np.ndarray | None, brain: np.ndarray, probability: np.ndarray | None,
                      uncertainty: np.ndarray | None, regions: RegionMap | None, spacing: Sequence[float]) -> str:
    from bench.calibration import calibration_metrics
    from bench.uncertainty import lesion_uncertainty, voxel_error_auroc

    calibration = calibration_metrics(probability, ref, brain_mask=brain) if (probability is not None and ref is not None) else None
    calib = ("<p><b>Calibration</b>: not available (needs a probability map and a reference).</p>" if calibration is None else
             f"<p><b>Calibration</b> over the brain: Brier score {_number(calibration['brier'], 4)}, "
             f"expected calibration error {_number(calibration['ece'], 4)} (0 is perfect).</p>")
    if uncertainty is None:
        return calib + "<p><b>Uncertainty</b>: not available for this submission.</p>"
    lesions = lesion_uncertainty(pred, uncertainty, ref)
    inside = float(np.mean(uncertainty[pred])) if pred.any() else None
    uncertain = float(np.mean(uncertainty[brain] > UNCERTAIN_BITS)) * 100 if brain.any() else None
    flags = voxel_error_auroc(uncertainty, pred, ref, brain)
    parts = [calib, "<p><b>Uncertainty</b> (predictive entropy, bits; 0 = certain, 1 = 50/50): mean inside the predicted "
             f"lesions {_number(inside)}; {_number(uncertain, 1)} % of the brain above {UNCERTAIN_BITS} bits; "
             f"how well it flags wrong voxels (AUROC, 0.5 = not at all, 1 = perfectly): {_number(flags)}.</p>"]
    if lesions:
        from bench.uncertainty import label_components

        voxel_ml = float(np.prod(spacing)) / 1000.0
        labels = label_components(pred)[0]
        rows = "".join(
            f"<tr><td>{l.component_id}</td><td>{l.voxels * voxel_ml:.2f}</td><td>{html.escape(_lesion_region(labels, l.component_id, regions))}</td>"
            f"<td>{l.mean_uncertainty:.3f}</td><td>{'-' if l.false_positive is None else ('false positive' if l.false_positive else 'matches reference')}</td></tr>"
            for l in lesions
        )
        parts.append("<table class='lesions'><tr><th>Lesion</th><th>Volume (ml)</th><th>Main region</th>"
                     f"<th>Mean entropy (bits)</th><th>Against reference</th></tr>{rows}</table>")
    return "".join(parts)


def _lesion_region(components: np.ndarray, component_id: int, regions: RegionMap | None) -> str:
    """Title of the region holding most of predicted component ``component_id`` (of the labelled ``components``)."""
    if regions is None:
        return "not available"
    values = regions.labels[components == component_id]
    counts = np.bincount(values, minlength=len(regions.names) + 1)
    k = int(np.argmax(counts))
    return REGION_TITLES[OUTSIDE_BRAIN] if k == 0 else REGION_TITLES.get(regions.names[k - 1], regions.names[k - 1])


_STYLE = """
body{font-family:Helvetica,Arial,sans-serif;margin:24px;color:#1a1a1a;max-width:1400px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:26px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0;font-size:14px}th,td{border:1px solid #bbb;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}tr.involved td{background:#fff4e0;font-weight:bold}
.note{color:#555;font-size:13px}.meta{color:#444;font-size:14px}img{max-width:100%;margin:6px 0}
.key span{display:inline-block;margin-right:18px}.warn{background:#fdecea;padding:6px 10px;border-left:4px solid #c62828}
"""


def render_readout(
    case: CaseLike,
    prediction_mask: np.ndarray,
    *,
    probability: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    submission: str | None = None,
    brain_mask: np.ndarray | None = None,
    regions: RegionMap | None = None,
    max_slices: int = 3,
) -> str:
    """The page of :func:`write_readout` as a string (nothing written)."""
    channel = "ADC" if "ADC" in case.channel_names else 0
    adc, geometry = case.load_channel(channel)
    pred = np.asarray(prediction_mask, bool)
    ref = None if reference is None else np.asarray(reference, bool)
    for name, array in (("prediction", pred), ("reference", ref), ("probability", probability), ("uncertainty", uncertainty)):
        if array is not None and tuple(np.shape(array)) != tuple(adc.shape):
            raise ValueError(f"case {case.case_id}: {name} has shape {np.shape(array)}, the image {adc.shape}")
    brain = np.asarray(brain_mask, bool) if brain_mask is not None else adc > 0
    if regions is None and brain.sum() >= 10:
        try:
            regions = map_regions(brain, geometry)
        except ValueError:
            regions = None
    readout = case_readout(case.case_id, pred, geometry.spacing, regions, ref)
    view = _View.of(geometry)
    volumes = {"adc": view(adc), "prediction": view(pred), "reference": None if ref is None else view(ref),
               "regions": None if regions is None else view(regions.labels),
               "probability": None if probability is None else view(np.asarray(probability, np.float32)),
               "uncertainty": None if uncertainty is None else view(np.asarray(uncertainty, np.float32)),
               "brain": view(brain)}
    positive = volumes["adc"][volumes["adc"] > 0]
    window = (0.0, float(np.percentile(positive, 99.5)) if positive.size else 1.0)
    aspect = view.spacing[1] / view.spacing[2]
    names = () if regions is None else regions.names
    images = "".join(
        f"<img alt='axial slice {k + 1}' src='data:image/png;base64,{_slice_figure(k, volumes, names, window, aspect)}'>"
        for k in _slices(volumes["prediction"], volumes["reference"], volumes["brain"], max_slices)
    )
    title = f"Lesion read-out: case {html.escape(case.case_id)}"
    meta = (f"Site {html.escape(str(getattr(case, 'site', '') or '-'))}; submission {html.escape(submission or '-')}; "
            f"grid {' x '.join(str(s) for s in adc.shape)} voxels of {' x '.join(f'{s:.2f}' for s in geometry.spacing)} mm.")
    nothing = "" if pred.any() else "<p class='warn'>No lesion predicted for this case.</p>"
    key = (f"<p class='key'><span style='color:{PREDICTED_COLOUR}'>&#9472;&#9472; predicted lesion</span>"
           + (f"<span style='color:#0a8fa8'>- - - reference lesion</span>" if ref is not None else "")
           + "<span>yellow box: the zoomed area</span></p>")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{title}</h1><p class='meta'>{meta}</p>"
        "<p class='note'>Research software: the segmentation and the numbers below are model outputs, not a diagnosis.</p>"
        f"{nothing}<h2>Summary</h2>{_summary_html(readout)}"
        f"<h2>Lesion volume by region</h2>{_region_table_html(readout)}{_fit_note(readout)}"
        f"<h2>Confidence</h2>{_uncertainty_html(pred, ref, brain, probability, uncertainty, regions, geometry.spacing)}"
        f"<h2>Images</h2>{key}{images}"
        "</body></html>"
    )


def write_readout(
    case: CaseLike,
    prediction_mask: np.ndarray,
    out_path: str | Path,
    *,
    probability: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    submission: str | None = None,
    brain_mask: np.ndarray | None = None,
    regions: RegionMap | None = None,
    max_slices: int = 3,
) -> Path:
    """Write the read-out page of ``case`` (arrays on its native grid) to ``out_path``, atomically.

    ``probability``: lesion probability in [0, 1]; ``uncertainty``: voxel entropy in bits;
    ``reference``: the reference mask (``None``: none shown, as in clinical use); ``brain_mask``:
    defaults to ``ADC > 0``; ``regions``: a precomputed :class:`~bench.regions.RegionMap`.
    """
    from bench.imageio import write_text_atomic

    page = render_readout(
        case, prediction_mask, probability=probability, uncertainty=uncertainty, reference=reference,
        submission=submission, brain_mask=brain_mask, regions=regions, max_slices=max_slices,
    )
    return write_text_atomic(out_path, page)


def write_stored_readout(store, case_id: str, submission: str, out_path: str | Path, *,
                         dataset: str | None = None, protocol: str | None = None, show_reference: bool = True) -> Path:
    """The read-out page of a case as a stored run predicted it (``bench readout``).

    Finds the latest run of ``submission`` (name, label or content hash) that scored ``case_id`` (filtered
    by ``dataset`` and ``protocol`` when given; the first protocol by name otherwise), loads the stored
    mask and the case from its dataset, and writes the page. Raises ``LookupError`` with the fix when no
    stored prediction matches.
    """
    from bench.data.dataset import Dataset
    from bench.imageio import read_image

    frame = store.case_results_frame(dataset=dataset, protocol=protocol, submissions=[submission], details=True)
    rows = frame[(frame["case_id"] == case_id) & (frame["status"] == "ok")].sort_values("protocol")
    if rows.empty:
        raise LookupError(f"no stored prediction of case {case_id!r} by submission {submission!r}"
                          f" (run `bench run {submission} -d DATASET` first, or check the names with `bench leaderboard`)")
    row = rows.iloc[0]
    datasets = store.datasets_frame()
    root = datasets.loc[datasets["version"] == row["dataset_version"], "root"]
    if root.empty or not root.iloc[0]:
        raise LookupError(f"dataset {row['dataset']} ({row['dataset_version']}) has no stored folder; rerun the benchmark from its folder")
    case = Dataset.load(Path(root.iloc[0])).case(case_id)
    mask, _ = read_image(Path(row["prediction_path"]))
    reference = case.load_label() if show_reference else None
    label = f"{row['submission']} · {row['protocol']}"
    return write_readout(case, np.asarray(mask).astype(bool), out_path, reference=reference, submission=label)
