"""Score a folder of predicted masks against a folder of reference masks (``bench evaluate``).

Files are matched by case id, the file name without its image suffix (``.nii.gz``, ``.nii``, ``.mha``,
...). Each pair must share its voxel grid (shape, spacing, origin, direction); the spacing handed to
the metric engine is read from the reference header and converted to array-axis order by
:mod:`bench.imageio`. A reference without a prediction is a *failed* row, never a silent skip, so the
summary cannot look better than the submission is.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator


from bench.constants import DEFAULT_CONVENTION, DEFAULT_LESION_RULE, DEFAULT_NSD_TOLERANCE_MM
from bench.imageio import IMAGE_SUFFIXES, ImageError, read_image, strip_image_suffix


@dataclass(frozen=True)
class CasePair:
    """A reference mask and the prediction for the same case id (``prediction`` is None when missing)."""

    case_id: str
    reference: Path
    prediction: Path | None


def index_image_folder(folder: Path) -> dict[str, Path]:
    """Map case id -> image file for every image in ``folder`` (not recursive).

    Raises ``ValueError`` when two files claim the same case id (``a.nii`` and ``a.nii.gz``), because
    silently preferring one would score a file the user did not mean.
    """
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    index: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        case_id = strip_image_suffix(path) if path.is_file() else None
        if case_id is None or case_id.startswith("."):
            continue
        if case_id in index:
            raise ValueError(f"{folder}: case {case_id!r} has two files, {index[case_id].name} and {path.name}")
        index[case_id] = path
    return index


def match_folders(pred_dir: Path, ref_dir: Path) -> tuple[list[CasePair], list[str]]:
    """Pair references with predictions by case id; also return prediction ids with no reference."""
    references = index_image_folder(ref_dir)
    if not references:
        raise ValueError(f"{ref_dir}: no reference images ({', '.join(IMAGE_SUFFIXES)})")
    predictions = index_image_folder(pred_dir)
    pairs = [CasePair(case_id, path, predictions.get(case_id)) for case_id, path in references.items()]
    unmatched = sorted(set(predictions) - set(references))
    return pairs, unmatched


def score_pair(pair: CasePair, convention: str = DEFAULT_CONVENTION, nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
               lesion_rule: str = DEFAULT_LESION_RULE) -> dict:
    """Score one pair; never raises for bad data: problems become a failed row with the reason."""
    from bench.masks import check_mask
    from bench.metrics import compute_metrics

    row: dict = {"case_id": pair.case_id, "status": "ok", "error": "", "convention": convention}
    if pair.prediction is None:
        return row | {"status": "missing", "error": f"no prediction for case {pair.case_id}"}
    try:
        ref, ref_geometry = read_image(pair.reference)
        pred, pred_geometry = read_image(pair.prediction)
        differences = ref_geometry.differences(pred_geometry)
        if differences:
            raise ValueError(f"prediction {pair.prediction.name} does not lie on the reference grid: {'; '.join(differences)}")
        ref = check_mask(ref, ref.shape, source=f"reference {pair.reference.name}")  # exact: soft masks are not labels
        pred = check_mask(pred, ref.shape, source=f"prediction {pair.prediction.name}")
        metrics = compute_metrics(pred, ref, ref_geometry.spacing, convention=convention, nsd_tolerance_mm=nsd_tolerance_mm, lesion_rule=lesion_rule)
        row |= {"spacing": "x".join(f"{s:g}" for s in ref_geometry.spacing)} | metrics
    except (ImageError, ValueError) as exc:
        row |= {"status": "failed", "error": str(exc)}
    return row


def evaluate_pairs(pairs: Iterable[CasePair], *, convention: str = DEFAULT_CONVENTION, nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                   lesion_rule: str = DEFAULT_LESION_RULE, workers: int = 1) -> Iterator[dict]:
    """Score pairs, in parallel processes when ``workers > 1``; yields rows as they finish, in input order."""
    pairs = list(pairs)
    if workers <= 1:
        for pair in pairs:
            yield score_pair(pair, convention, nsd_tolerance_mm, lesion_rule)
        return
    n = len(pairs)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(score_pair, pairs, [convention] * n, [nsd_tolerance_mm] * n, [lesion_rule] * n, chunksize=4)


def evaluate_folders(
    pred_dir: Path,
    ref_dir: Path,
    *,
    convention: str = DEFAULT_CONVENTION,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    lesion_rule: str = DEFAULT_LESION_RULE,
    workers: int = 1,
    progress: bool = False,
    pairs: list[CasePair] | None = None,
):
    """Score every reference in ``ref_dir`` against ``pred_dir``; return the per-case table (pandas).

    ``pairs`` (from :func:`match_folders`) saves indexing the folders again when the caller has them.
    """
    import pandas as pd

    from bench.lesionwise import check_rule
    from bench.metrics import CONVENTIONS

    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    check_rule(lesion_rule)
    if pairs is None:
        pairs, _ = match_folders(Path(pred_dir), Path(ref_dir))
    rows = evaluate_pairs(pairs, convention=convention, nsd_tolerance_mm=nsd_tolerance_mm, lesion_rule=lesion_rule, workers=workers)
    if progress:
        from rich.progress import track

        rows = track(rows, total=len(pairs), description="Scoring", transient=True)
    return pd.DataFrame(list(rows))


def official_summary(table, metrics: tuple[str, ...] = ("dice", "masd", "nsd")) -> "pandas.DataFrame":  # noqa: F821
    """The challenge's own means (:func:`bench.stats.official_mean`: NaN cases dropped), per metric.

    Only meaningful for conventions that reproduce a published evaluation (``bonbid2023``, ``bonbid2024``),
    whose MASD is NaN when exactly one mask is empty; ``n_dropped`` says how many cases each mean left out.
    Failed cases are left out too, as the challenge had no row for them; ``n_failed`` counts them.
    """
    import pandas as pd

    from bench.stats import official_mean

    ok = table[table["status"] == "ok"] if "status" in table else table
    records = []
    for key in metrics:
        if key in ok:
            result = official_mean(pd.to_numeric(ok[key], errors="coerce"))
            records.append({"metric": key, "mean": result.mean, "std": result.std, "n": result.n,
                            "n_dropped": result.n_dropped, "n_failed": len(table) - len(ok)})
    return pd.DataFrame.from_records(records)


def summarize(table) -> "pandas.DataFrame":  # noqa: F821
    """Mean, median and sd per metric over all cases, as the leaderboard counts them.

    A failed or missing case counts as the metric's worst value (:func:`bench.stats.worst_value`), so
    the summary never looks better than the submission is; metrics without a finite worst value (volume
    differences, lesion counts) leave those cases out. Infinite distances (exactly one mask empty) are
    capped at each metric's documented ``inf_cap``. Both counts are reported beside the statistics.
    """
    import numpy as np
    import pandas as pd

    from bench.metrics import METRICS
    from bench.stats import counted_values, worst_value

    ok = (table["status"] == "ok").to_numpy() if "status" in table else np.ones(len(table), bool)
    records = []
    for key, info in METRICS.items():
        if key not in table:
            continue
        raw = pd.to_numeric(table[key], errors="coerce").to_numpy(dtype=float)
        n_inf = int(np.isinf(raw[ok]).sum())
        values, _ = counted_values(raw, ok, key)
        worst = worst_value(key)
        values = values[np.isfinite(values)]
        records.append(
            {
                "metric": key,
                "unit": info.unit,
                "better": {True: "higher", False: "lower", None: "-"}[info.higher_is_better],
                "n": values.size,
                "mean": float(values.mean()) if values.size else math.nan,
                "median": float(np.median(values)) if values.size else math.nan,
                "sd": float(values.std(ddof=1)) if values.size > 1 else math.nan,
                "n_inf_capped": n_inf,
                "n_failed_as_worst": int((~ok).sum()) if np.isfinite(worst) else 0,
            }
        )
    return pd.DataFrame.from_records(records)


def write_table(table, out: Path) -> Path:
    """Write a table as CSV or Parquet (by suffix), atomically."""
    from bench.imageio import atomic_output

    out = Path(out)
    if out.suffix not in (".csv", ".parquet"):
        raise ValueError(f"{out}: use a .csv or .parquet file name")
    with atomic_output(out) as tmp:
        if out.suffix == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)
    return out
