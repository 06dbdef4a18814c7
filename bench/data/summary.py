"""Tables that describe datasets: what ``bench data list`` and ``bench data info`` print.

Both are plain pandas frames (tested directly, reused by the app); the CLI only renders them.
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
