"""Tables that describe datasets: what ``bench data list`` and ``bench data info`` print, and how a
cohort's realism compares with BONBID-HIE (docs/datasets.md).

All are plain pandas frames or dicts (tested directly, reused by the app and the docs); the CLI only
renders them. The realism functions read every case's images, so they cost a pass over the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from bench.data.dataset import Dataset, DatasetError, list_datasets

#: Columns of :func:`site_summary`, in display order.
SITE_SUMMARY_COLUMNS: tuple[str, ...] = (
    "site",
    "cases",
    "scanner",
    "field (T)",
    "spacing x×y×z (mm)",
    "shape x×y×z",
    "lesion ml median",
    "lesion ml range",
    "empty",
    "patterns",
)


def _span(values: Iterable[float], digits: int) -> str:
    """``"0.86"`` when all values agree (at ``digits`` decimals), else ``"0.80-0.88"``."""
    values = [float(v) for v in values if not pd.isna(v)]
    if not values:
        return "?"
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}-{high}"


def _grid(rows: pd.DataFrame, prefix: str, digits: int) -> str:
    return "×".join(_span(rows[f"{prefix}_{axis}"], digits) for axis in ("x", "y", "z"))


def _patterns(rows: pd.DataFrame) -> str:
    if "pattern" not in rows:
        return "?"
    lesion = rows["lesion_volume_ml"] > 0 if "lesion_volume_ml" in rows else pd.Series(True, index=rows.index)
    counts = rows.loc[lesion, "pattern"].fillna("unknown").astype(str).value_counts()
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))) or "-"


def _site_row(site: str, rows: pd.DataFrame) -> dict[str, object]:
    volumes = rows["lesion_volume_ml"].astype(float)
    fields = sorted({f"{v:g}" for v in rows["field_strength_t"] if not pd.isna(v)}) if "field_strength_t" in rows else []
    scanners = sorted({str(s) for s in rows.get("scanner", pd.Series(dtype=str)).dropna()})
    return {
        "site": site,
        "cases": int(len(rows)),
        "scanner": "; ".join(scanners) if len(scanners) <= 2 else f"{len(scanners)} scanners",
        "field (T)": ", ".join(fields) or "?",
        "spacing x×y×z (mm)": _grid(rows, "spacing", 2),
        "shape x×y×z": _grid(rows, "shape", 0),
        "lesion ml median": round(float(np.median(volumes)), 2),
        "lesion ml range": f"{volumes.min():.2f}-{volumes.max():.2f}",
        "empty": int((volumes <= 0).sum()),
        "patterns": _patterns(rows),
    }


def site_summary(dataset: Dataset, *, total: bool = True) -> pd.DataFrame:
    """One row per site (in dataset order) plus, with ``total``, a last row ``all``.

    Columns are :data:`SITE_SUMMARY_COLUMNS`: number of cases, scanners and field strengths, spacing and
    shape ranges (x × y × z), median and range of the lesion volume in ml, lesion-free cases, and the
    injury patterns of the cases with a lesion.
    """
    table = dataset.table
    required = {"lesion_volume_ml", *(f"{p}_{a}" for p in ("spacing", "shape") for a in "xyz")}
    missing = required - set(table.columns)
    if missing:
        raise DatasetError(f"{dataset.root / 'cases.csv'}: missing columns {sorted(missing)}")
    rows = [_site_row(site, table[table["site"] == site]) for site in dataset.sites]
    if total and len(dataset.sites) > 1:
        rows.append(_site_row("all", table))
    return pd.DataFrame(rows, columns=list(SITE_SUMMARY_COLUMNS))


def datasets_overview(data_root: str | Path) -> pd.DataFrame:
    """One row per dataset under ``data_root``: name, cases, sites, version, path (broken ones say why)."""
    rows = []
    for folder in list_datasets(data_root):
        try:
            dataset = Dataset.load(folder)
            rows.append({"name": dataset.name, "cases": len(dataset), "sites": ", ".join(dataset.sites), "version": dataset.version, "path": str(folder)})
        except DatasetError as exc:
            rows.append({"name": folder.name, "cases": 0, "sites": "", "version": f"broken: {exc}", "path": str(folder)})
    return pd.DataFrame(rows, columns=["name", "cases", "sites", "version", "path"])


# --------------------------------------------------------------------------------------------------
# Realism: how a cohort's Z-ADC and lesion burden compare with BONBID-HIE

#: The classical rule (and the zadc-threshold baseline): lesion where Z-ADC < -2.
ZADC_LESION_THRESHOLD = -2.0
#: Bin edges of :func:`zadc_histograms` (Z-ADC is clipped to +-10).
ZADC_BINS = np.linspace(-10.0, 10.0, 81)
#: BONBID-HIE's own description of its lesion burden: over half of the patients under 1 % of the brain.
SMALL_LESION_FRACTION = 0.01


def case_realism(case) -> dict[str, object]:
    """Z-ADC and lesion-burden facts of one case (reads its ADC, Z-ADC and label).

    ``normal_below`` / ``lesion_below``: voxels with Z-ADC < -2 among the brain's non-lesion voxels
    (the threshold baseline's false positives) and among the lesion voxels (its sensitivity), as counts
    with their totals, so cohorts can be pooled; ``lesion_fraction``: lesion over brain volume.
    """
    adc, geometry = case.load_channel("ADC")
    zadc, _ = case.load_channel("Z-ADC")
    label = case.load_label()
    brain = adc > 0
    normal = brain & ~label
    below = zadc < ZADC_LESION_THRESHOLD
    metadata = getattr(case, "metadata", {}) or {}
    return {
        "case_id": case.case_id,
        "site": case.site,
        "orientation": metadata.get("orientation", "?"),
        "normal_voxels": int(normal.sum()),
        "normal_below": int((below & normal).sum()),
        "lesion_voxels": int(label.sum()),
        "lesion_below": int((below & label).sum()),
        "false_positive_ml": float((below & normal).sum() * geometry.voxel_volume_ml),
        "lesion_fraction": float(label.sum() / max(int(brain.sum()), 1)),
        "spacing_inplane": float(geometry.spacing[1]),
        "spacing_slice": float(geometry.spacing[0]),
        "n_slices": int(geometry.shape[0]),
        "oblique": bool(np.abs(np.abs(np.asarray(geometry.direction)) - np.round(np.abs(np.asarray(geometry.direction)))).max() > 1e-3),
    }


def realism_table(dataset: Dataset, case_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """:func:`case_realism` of every case (or of ``case_ids``), one row each."""
    wanted = None if case_ids is None else set(case_ids)
    return pd.DataFrame([case_realism(case) for case in dataset.cases if wanted is None or case.case_id in wanted])


def realism_summary(rows: pd.DataFrame) -> dict[str, object]:
    """One cohort's numbers for the comparison with BONBID-HIE (docs/datasets.md): size, grids, lesion
    burden, and the Z-ADC < -2 shares pooled over voxels and as the median over cases."""
    normal_share = rows["normal_below"] / rows["normal_voxels"].clip(lower=1)
    lesion_rows = rows[rows["lesion_voxels"] > 0]
    return {
        "cases": int(len(rows)),
        "in-plane (mm)": _span(rows["spacing_inplane"], 2),
        "slice (mm)": _span(rows["spacing_slice"], 1),
        "slices": _span(rows["n_slices"], 0),
        "lesion-free": int((rows["lesion_voxels"] == 0).sum()),
        "lesion < 1 % of brain": f"{100 * float((rows['lesion_fraction'] < SMALL_LESION_FRACTION).mean()):.0f} %",
        "lesion % of brain, median [max]": f"{100 * float(lesion_rows['lesion_fraction'].median()):.2f} [{100 * float(rows['lesion_fraction'].max()):.1f}]",
        "normal Z<-2, pooled (case median)": f"{100 * rows['normal_below'].sum() / max(rows['normal_voxels'].sum(), 1):.1f} % ({100 * float(normal_share.median()):.1f} %)",
        "lesion Z<-2, pooled": f"{100 * lesion_rows['lesion_below'].sum() / max(lesion_rows['lesion_voxels'].sum(), 1):.0f} %",
        "oblique or flipped": int((rows["oblique"] | ~rows["orientation"].isin(["LPS", "?"])).sum()),
    }


def zadc_histograms(dataset: Dataset, case_ids: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(bin edges, normal counts, lesion counts)``: Z-ADC histograms of the brain's non-lesion voxels and
    of the lesion voxels, summed over the cases (:data:`ZADC_BINS`)."""
    wanted = None if case_ids is None else set(case_ids)
    normal = np.zeros(len(ZADC_BINS) - 1, np.int64)
    lesion = np.zeros(len(ZADC_BINS) - 1, np.int64)
    for case in dataset.cases:
        if wanted is not None and case.case_id not in wanted:
            continue
        adc, _ = case.load_channel("ADC")
        zadc, _ = case.load_channel("Z-ADC")
        label = case.load_label()
        brain = adc > 0
        normal += np.histogram(zadc[brain & ~label], ZADC_BINS)[0]
        lesion += np.histogram(zadc[label], ZADC_BINS)[0]
    return ZADC_BINS, normal, lesion
