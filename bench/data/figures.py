"""Pictures of cases and cohorts (matplotlib, Agg backend): a per-case slice montage, a per-site
overview, and the realism figures of docs/datasets.md (Z-ADC distributions, lesion burden).

Cases are stored in many orientations (LPS, RAS, LAS, oblique), so every picture first reorients the
arrays through their header to LPS (:func:`display_orientation`; the nearest axis-aligned frame for an
oblique grid, no interpolation). :func:`display_transform` gives that permutation and those flips as an
object that reorients any array of the grid and maps voxel indices (the app's slice viewer uses it for
the channels, masks, maps and lesion centroids alike). Axial slices are then drawn in radiological convention: anterior at the
top, the patient's left on the viewer's right, whatever the file's array order. ADC uses one fixed grey
scale (0-2500 x 10^-6 mm^2/s) for every case, so site intensity differences stay visible; Z-ADC uses a
diverging map (-6..6, lesions are negative); the reference label is drawn as an outline.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np


if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Case, Dataset
    from bench.imageio import Geometry

#: Orientation every picture is drawn in (ITK "to" code: x index -> Left, y -> Posterior, z -> Superior).
DISPLAY_ORIENTATION = "LPS"
ADC_RANGE = (0.0, 2500.0)
ZADC_RANGE = (-6.0, 6.0)
OUTLINE_COLOR = "#ffd400"


class DisplayTransform(NamedTuple):
    """How a grid's arrays become :data:`DISPLAY_ORIENTATION` arrays: a permutation and flips, no resampling.

    Display array axis ``i`` is native axis ``axes[i]``, reversed when ``flips[i]``; ``shape`` is the
    native shape. Found by :func:`display_transform` from the header, it applies to any array on that grid
    (channels, masks, probability and uncertainty maps, saliency) and maps voxel indices (lesion
    centroids) the same way, so everything drawn on a case stays registered. A tuple, so it can key caches.
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    shape: tuple[int, int, int]

    @property
    def is_identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)

    @property
    def display_shape(self) -> tuple[int, int, int]:
        return tuple(int(self.shape[a]) for a in self.axes)  # type: ignore[return-value]

    def apply(self, volume: np.ndarray) -> np.ndarray:
        """``volume`` (native array order, shape :attr:`shape`) in display orientation (a contiguous copy)."""
        volume = np.asarray(volume)
        if tuple(volume.shape) != tuple(self.shape):
            raise ValueError(f"array of shape {volume.shape} is not on this grid {tuple(self.shape)}")
        flipped = [i for i, flip in enumerate(self.flips) if flip]
        return np.ascontiguousarray(np.flip(np.transpose(volume, self.axes), flipped) if flipped else np.transpose(volume, self.axes))

    def invert(self, volume: np.ndarray) -> np.ndarray:
        """A display-orientation array back in native array order (inverse of :meth:`apply`)."""
        volume = np.asarray(volume)
        if tuple(volume.shape) != self.display_shape:
            raise ValueError(f"array of shape {volume.shape} is not in this display frame {self.display_shape}")
        flipped = [i for i, flip in enumerate(self.flips) if flip]
        unflipped = np.flip(volume, flipped) if flipped else volume
        return np.ascontiguousarray(np.transpose(unflipped, np.argsort(self.axes)))

    def index(self, zyx: Sequence[float]) -> tuple[float, float, float]:
        """A native voxel index (z, y, x; fractional, e.g. a centroid) as the display array's index."""
        out = []
        for axis, flip in zip(self.axes, self.flips):
            value = float(zyx[axis])
            out.append(float(self.shape[axis] - 1) - value if flip else value)
        return out[0], out[1], out[2]

    def spacing(self, spacing: Sequence[float]) -> tuple[float, float, float]:
        """Voxel size (mm, native array order) in display array order."""
        return tuple(float(spacing[a]) for a in self.axes)  # type: ignore[return-value]


def display_transform(geometry: "Geometry") -> DisplayTransform:
    """The :class:`DisplayTransform` of a 3-D grid to :data:`DISPLAY_ORIENTATION`.

    SimpleITK's ``DICOMOrient`` decides (for an oblique grid: the nearest axis-aligned frame); it runs on
    a 2 x 2 x 2 probe with the grid's direction cosines whose voxels hold their own flat index, so the
    permutation and flips are read off exactly, whatever the volume's size.
    """
    import SimpleITK as sitk

    from bench.imageio import Geometry, to_sitk

    shape = tuple(int(s) for s in geometry.shape)
    if len(shape) != 3:
        raise ValueError(f"display orientation needs a 3-D grid, got shape {shape}")
    probe_geometry = Geometry(shape=(2, 2, 2), spacing=tuple(geometry.spacing), origin=tuple(geometry.origin), direction=tuple(geometry.direction))
    probe = np.arange(8, dtype=np.int16).reshape(2, 2, 2)  # value = 4 z + 2 y + x
    oriented = sitk.GetArrayFromImage(sitk.DICOMOrient(to_sitk(probe, probe_geometry), DISPLAY_ORIENTATION)).astype(int)
    strides = {4: 0, 2: 1, 1: 2}
    axes, flips = [], []
    for axis in range(3):
        step = [0, 0, 0]
        step[axis] = 1
        delta = int(oriented[tuple(step)]) - int(oriented[0, 0, 0])
        axes.append(strides[abs(delta)])
        flips.append(delta < 0)
    if sorted(axes) != [0, 1, 2]:  # pragma: no cover - DICOMOrient always permutes
        raise RuntimeError(f"DICOMOrient gave no permutation of the axes: {axes}")
    return DisplayTransform(tuple(axes), tuple(flips), shape)  # type: ignore[arg-type]


def display_orientation(volume: np.ndarray, geometry: "Geometry") -> tuple[np.ndarray, tuple[float, ...]]:
    """``volume`` (array order z, y, x on ``geometry``) permuted / flipped to :data:`DISPLAY_ORIENTATION`,
    and its spacing in the new array order. Values are not interpolated; the dtype is kept.

    The same permutation and flips as ``SimpleITK.DICOMOrient`` (:func:`display_transform`), applied in
    numpy: every array of a case (masks, probability, uncertainty, saliency) can be reoriented alike.
    """
    transform = display_transform(geometry)
    return transform.apply(volume), transform.spacing(geometry.spacing)


def _load_for_display(case: "Case") -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]]:
    """ADC, Z-ADC (or ADC again for one-channel data) and label of a case, in display orientation."""
    image, geometry = case.load_image()
    adc, spacing = display_orientation(image[0], geometry)
    zadc, _ = display_orientation(image[min(1, image.shape[0] - 1)], geometry)
    label = display_orientation(case.load_label(), geometry)[0] if case.label_path is not None else np.zeros(adc.shape, bool)
    return adc, zadc, label, spacing


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
    """Save a figure atomically (:func:`bench.imageio.atomic_output`: temporary file, then rename)."""
    from bench.imageio import atomic_output

    out = Path(out)
    with atomic_output(out) as tmp:
        figure.savefig(tmp, dpi=figure.dpi, facecolor="black", format=(out.suffix.lstrip(".") or "png"))
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

    adc, zadc, label, spacing = _load_for_display(case)
    crop = brain_crop(adc != 0)
    adc, zadc, label = adc[crop], zadc[crop], label[crop]
    slices = pick_slices(adc != 0, label, n_slices)
    spacing_yx = spacing[1:]
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
        chosen = example_cases([c for c in dataset.cases if c.site == site], cases_per_site)
        for index in range(cases_per_site):
            ax_adc, ax_z = axes[row, 2 * index], axes[row, 2 * index + 1]
            if index >= len(chosen):
                ax_adc.set_axis_off()
                ax_z.set_axis_off()
                continue
            _draw_case_pair(ax_adc, ax_z, chosen[index], cmap_z)
        sample = next((c for c in dataset.cases if c.site == site), None)
        scanner = sample.metadata.get("scanner", "") if sample is not None else ""
        axes[row, 0].text(-0.08, 0.5, f"{site}\n{scanner}", transform=axes[row, 0].transAxes, rotation=90, color="white", fontsize=8, ha="right", va="center")
    figure.suptitle(f"{dataset.name}: ADC and Z-ADC with lesion outline, per site", color="white", fontsize=11)
    figure.tight_layout(rect=(0.03, 0, 1, 0.96))
    try:
        return _save(figure, Path(out))
    finally:
        plt.close(figure)


def _draw_case_pair(ax_adc, ax_z, case: "Case", cmap_z) -> None:
    """ADC and Z-ADC of ``case`` with the label outline, at its slice of largest lesion area (mid-brain
    slice when lesion-free), titled with the id, the pattern and the lesion volume."""
    adc, zadc, label, spacing = _load_for_display(case)
    crop = brain_crop(adc != 0)
    adc, zadc, label = adc[crop], zadc[crop], label[crop]
    area = label.reshape(label.shape[0], -1).sum(axis=1)
    brain_slices = np.flatnonzero((adc != 0).reshape(adc.shape[0], -1).any(axis=1))
    z = int(np.argmax(area)) if area.any() else int(brain_slices[len(brain_slices) // 2]) if brain_slices.size else adc.shape[0] // 2
    spacing_yx = spacing[1:]
    _draw(ax_adc, adc[z], spacing_yx=spacing_yx, cmap="gray", value_range=ADC_RANGE, outline=label[z])
    _draw(ax_z, np.ma.masked_where(adc[z] == 0, zadc[z]), spacing_yx=spacing_yx, cmap=cmap_z, value_range=ZADC_RANGE, outline=label[z])
    meta = case.metadata
    orientation = f" | {meta['orientation']}" if meta.get("orientation") else ""
    ax_adc.set_title(f"{case.case_id} ADC{orientation}", color="white", fontsize=8)
    ax_z.set_title(f"Z-ADC | {meta.get('pattern', '?')} {_ml(meta.get('lesion_volume_ml'))}", color="white", fontsize=8)


def render_case_grid(cases: Sequence["Case"], out: str | Path, *, columns: int = 4, title: str = "") -> Path:
    """``cases`` as ADC / Z-ADC pairs (as in :func:`render_site_montage`), ``columns`` cases per row:
    the overview for a single-site cohort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(cases) // columns))
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(2.2 * 2 * columns, 2.5 * rows), dpi=100, squeeze=False)
    figure.patch.set_facecolor("black")
    cmap_z = matplotlib.colormaps["RdBu_r"].with_extremes(bad="black")
    for index in range(rows * columns):
        ax_adc, ax_z = axes[index // columns, 2 * (index % columns)], axes[index // columns, 2 * (index % columns) + 1]
        if index < len(cases):
            _draw_case_pair(ax_adc, ax_z, cases[index], cmap_z)
        else:
            ax_adc.set_axis_off()
            ax_z.set_axis_off()
    figure.suptitle(title, color="white", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    try:
        return _save(figure, Path(out))
    finally:
        plt.close(figure)


def example_cases(cases: Sequence["Case"], count: int) -> list["Case"]:
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


# --------------------------------------------------------------------------------------------------
# Realism figures (docs/datasets.md)


def _figure(n_panels: int, width: float = 4.2, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, height), dpi=110, squeeze=False)
    return plt, figure, list(axes[0])


def _save_white(plt, figure, out: str | Path) -> Path:
    figure.tight_layout()
    figure.patch.set_facecolor("white")
    try:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=figure.dpi, facecolor="white")
        return out
    finally:
        plt.close(figure)


def render_zadc_distributions(histograms: "dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]", out: str | Path) -> Path:
    """One panel per cohort: the Z-ADC distribution of normal brain voxels and of lesion voxels (density,
    log scale), with the Z = -2 rule and the share of each class below it.

    ``histograms`` maps a cohort's title to :func:`bench.data.summary.zadc_histograms` output.
    """
    plt, figure, axes = _figure(len(histograms))
    for ax, (title, (edges, normal, lesion)) in zip(axes, histograms.items()):
        centres = (edges[:-1] + edges[1:]) / 2
        width = float(edges[1] - edges[0])
        below = centres < -2.0
        for counts, colour, name in ((normal, "#4477aa", "normal brain"), (lesion, "#ee6677", "lesion")):
            total = max(int(counts.sum()), 1)
            share = 100.0 * counts[below].sum() / total
            ax.step(centres, counts / total / width, where="mid", color=colour, label=f"{name}: {share:.1f} % below -2")
        ax.axvline(-2.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(1e-5, 2.0)
        ax.set_xlim(-10, 10)
        ax.set_xlabel("Z-ADC")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylabel("density")
    return _save_white(plt, figure, out)


def render_lesion_burden(fractions: "dict[str, np.ndarray]", out: str | Path) -> Path:
    """Cumulative distribution of lesion burden (lesion volume over brain volume, %) per cohort, with
    BONBID-HIE's published fact: over half of the patients under 1 %."""
    plt, figure, (ax,) = _figure(1, width=5.2, height=3.4)
    for name, values in fractions.items():
        values = np.sort(100.0 * np.asarray(values, float))
        ax.step(np.maximum(values, 1e-3), np.arange(1, values.size + 1) / values.size, where="post", label=f"{name} (n={values.size})")
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=0.8)
    ax.scatter([1.0], [0.5], marker="v", color="black", zorder=5, label="BONBID-HIE: over half < 1 %")
    ax.set_xscale("log")
    ax.set_xlim(1e-2, 20)
    ax.set_xlabel("lesion volume, % of brain (lesion-free cases at the left edge)")
    ax.set_ylabel("share of cases")
    ax.legend(fontsize=7, loc="lower right")
    return _save_white(plt, figure, out)
