"""Pictures of cases: a per-case slice montage and a per-site overview (matplotlib, Agg backend).

Axial slices are drawn in radiological convention as stored: array row 0 (anterior in an LPS volume)
at the top, the patient's left on the viewer's right. ADC uses one fixed grey scale (0-2500 x 10^-6
mm^2/s) for every case, so site intensity differences stay visible; Z-ADC uses a diverging map
(-6..6, lesions are negative); the reference label is drawn as an outline.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np


if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Case, Dataset

ADC_RANGE = (0.0, 2500.0)
ZADC_RANGE = (-6.0, 6.0)
OUTLINE_COLOR = "#ffd400"


def pick_slices(brain: np.ndarray, label: np.ndarray, n_slices: int) -> list[int]:
    """``n_slices`` slice indices spread evenly over the slices with a fair amount of brain (a fifth of
    the largest brain section), with the slice of largest lesion area always among them."""
    brain_area = brain.reshape(brain.shape[0], -1).sum(axis=1)
    with_brain = np.flatnonzero(brain_area >= 0.2 * brain_area.max()) if brain_area.any() else np.array([], int)
    if with_brain.size == 0:
        with_brain = np.arange(brain.shape[0])
    count = min(n_slices, with_brain.size)
    chosen = [int(with_brain[i]) for i in np.linspace(0, with_brain.size - 1, count).round().astype(int)]
    lesion_area = label.reshape(label.shape[0], -1).sum(axis=1)
    if lesion_area.any():
        biggest = int(np.argmax(lesion_area))
        if biggest not in chosen:
            chosen[int(np.argmin([abs(c - biggest) for c in chosen]))] = biggest
        # Prefer lesion slices over lesion-free neighbours when there are spare lesion slices.
        lesion_slices = [int(z) for z in np.flatnonzero(lesion_area) if int(z) not in chosen]
        for position, z in enumerate(chosen):
            if not lesion_area[z] and lesion_slices:
                nearest = min(lesion_slices, key=lambda s: abs(s - z))
                if abs(nearest - z) <= max(1, brain.shape[0] // (2 * count)):
                    chosen[position] = nearest
                    lesion_slices.remove(nearest)
    return sorted(set(chosen))


def brain_crop(brain: np.ndarray, margin: int = 3) -> tuple[slice, slice, slice]:
    """Index of the in-plane bounding box of the brain (all slices kept), grown by ``margin`` pixels."""
    if not brain.any():
        return (slice(None), slice(None), slice(None))
    rows = np.flatnonzero(brain.any(axis=(0, 2)))
    cols = np.flatnonzero(brain.any(axis=(0, 1)))
    return (
        slice(None),
        slice(max(int(rows[0]) - margin, 0), int(rows[-1]) + margin + 1),
        slice(max(int(cols[0]) - margin, 0), int(cols[-1]) + margin + 1),
    )


def _ml(value: object) -> str:
    try:
        return f"{float(value):.1f} ml"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "? ml"


def _save(figure, out: Path) -> Path:
    """Save a figure atomically (temporary file in the same folder, then rename)."""
    import os
    import tempfile

    from bench.data.layout import make_shareable

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=out.suffix or ".png", dir=out.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=figure.dpi, facecolor="black")
        make_shareable(Path(tmp))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _draw(ax, image: np.ndarray, *, spacing_yx: Sequence[float], cmap: str, value_range: tuple[float, float], outline: np.ndarray | None = None) -> None:
    ax.imshow(image, cmap=cmap, vmin=value_range[0], vmax=value_range[1], aspect=spacing_yx[0] / spacing_yx[1], interpolation="nearest")
    if outline is not None and outline.any():
        ax.contour(outline.astype(np.float32), levels=[0.5], colors=OUTLINE_COLOR, linewidths=0.8)
    ax.set_axis_off()


def render_case(case: "Case", out: str | Path, *, n_slices: int = 8) -> Path:
    """Montage of one case across slices: ADC, Z-ADC, and ADC with the label outline (three rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, geometry = case.load_image()
    crop = brain_crop(image[0] != 0)
    adc, zadc = image[0][crop], image[min(1, image.shape[0] - 1)][crop]
    label = case.load_label()[crop] if case.label_path is not None else np.zeros(adc.shape, bool)
    slices = pick_slices(adc != 0, label, n_slices)
    spacing_yx = geometry.spacing[1:]
    zadc_display = np.ma.masked_where(adc == 0, zadc)
    cmap_z = matplotlib.colormaps["RdBu_r"].with_extremes(bad="black")
    rows = [
        ("ADC", adc, "gray", ADC_RANGE, None),
        ("Z-ADC", zadc_display, cmap_z, ZADC_RANGE, None),
        ("ADC + label", adc, "gray", ADC_RANGE, label),
    ]
    figure, axes = plt.subplots(len(rows), len(slices), figsize=(1.8 * len(slices), 1.9 * len(rows)), dpi=110, squeeze=False)
    figure.patch.set_facecolor("black")
    for row, (title, volume, cmap, value_range, outline) in enumerate(rows):
        for column, z in enumerate(slices):
            ax = axes[row, column]
            _draw(ax, volume[z], spacing_yx=spacing_yx, cmap=cmap, value_range=value_range, outline=None if outline is None else outline[z])
            if row == 0:
                ax.set_title(f"z={z}", color="white", fontsize=8)
        axes[row, 0].text(-0.05, 0.5, title, transform=axes[row, 0].transAxes, rotation=90, color="white", fontsize=9, ha="right", va="center")
    meta = case.metadata
    subtitle = f"{case.case_id} | {case.site} | {meta.get('pattern', '?')} | lesion {_ml(meta.get('lesion_volume_ml'))}"
    figure.suptitle(subtitle, color="white", fontsize=10)
    figure.tight_layout(rect=(0.02, 0, 1, 0.95))
    try:
        return _save(figure, Path(out))
    finally:
        plt.close(figure)


def render_site_montage(dataset: "Dataset", out: str | Path, *, cases_per_site: int = 2) -> Path:
    """Overview of a dataset: for each site (one row) a few cases, each as ADC and Z-ADC with the label
    outline at its slice of largest lesion area (mid-brain slice when lesion-free). Cases with a lesion
    are preferred, with different injury patterns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = dataset.sites
    figure, axes = plt.subplots(len(sites), 2 * cases_per_site, figsize=(2.2 * 2 * cases_per_site, 2.5 * len(sites)), dpi=100, squeeze=False)
    figure.patch.set_facecolor("black")
    cmap_z = matplotlib.colormaps["RdBu_r"].with_extremes(bad="black")
    for row, site in enumerate(sites):
        chosen = _example_cases([c for c in dataset.cases if c.site == site], cases_per_site)
        for index in range(cases_per_site):
            ax_adc, ax_z = axes[row, 2 * index], axes[row, 2 * index + 1]
            if index >= len(chosen):
                ax_adc.set_axis_off()
                ax_z.set_axis_off()
                continue
            case = chosen[index]
            image, geometry = case.load_image()
            crop = brain_crop(image[0] != 0)
            adc, zadc = image[0][crop], image[min(1, image.shape[0] - 1)][crop]
            label = case.load_label()[crop] if case.label_path is not None else np.zeros(adc.shape, bool)
            area = label.reshape(label.shape[0], -1).sum(axis=1)
            brain_slices = np.flatnonzero((adc != 0).reshape(adc.shape[0], -1).any(axis=1))
            z = int(np.argmax(area)) if area.any() else int(brain_slices[len(brain_slices) // 2]) if brain_slices.size else adc.shape[0] // 2
            spacing_yx = geometry.spacing[1:]
            _draw(ax_adc, adc[z], spacing_yx=spacing_yx, cmap="gray", value_range=ADC_RANGE, outline=label[z])
            _draw(ax_z, np.ma.masked_where(adc[z] == 0, zadc[z]), spacing_yx=spacing_yx, cmap=cmap_z, value_range=ZADC_RANGE, outline=label[z])
            meta = case.metadata
            ax_adc.set_title(f"{case.case_id} ADC", color="white", fontsize=8)
            ax_z.set_title(f"Z-ADC | {meta.get('pattern', '?')} {_ml(meta.get('lesion_volume_ml'))}", color="white", fontsize=8)
        sample = next((c for c in dataset.cases if c.site == site), None)
        scanner = sample.metadata.get("scanner", "") if sample is not None else ""
        axes[row, 0].text(-0.08, 0.5, f"{site}\n{scanner}", transform=axes[row, 0].transAxes, rotation=90, color="white", fontsize=8, ha="right", va="center")
    figure.suptitle(f"{dataset.name}: ADC and Z-ADC with lesion outline, per site", color="white", fontsize=11)
    figure.tight_layout(rect=(0.03, 0, 1, 0.96))
    try:
        return _save(figure, Path(out))
    finally:
        plt.close(figure)


def _example_cases(cases: Sequence["Case"], count: int) -> list["Case"]:
    """Up to ``count`` cases with lesions and distinct patterns (then any others), in dataset order."""
    chosen: list[Case] = []
    patterns: set[str] = set()
    with_lesion = [c for c in cases if float(c.metadata.get("lesion_volume_ml") or 0) > 0.5]
    for case in with_lesion:
        pattern = str(case.metadata.get("pattern"))
        if pattern not in patterns and len(chosen) < count:
            chosen.append(case)
            patterns.add(pattern)
    for case in list(with_lesion) + list(cases):
        if len(chosen) >= count:
            break
        if case not in chosen:
            chosen.append(case)
    return chosen
