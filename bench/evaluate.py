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

import typer

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


def score_pair(pair: CasePair, convention: str = "bench", nsd_tolerance_mm: float = 2.0) -> dict:
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
        metrics = compute_metrics(pred, ref, ref_geometry.spacing, convention=convention, nsd_tolerance_mm=nsd_tolerance_mm)
        row |= {"spacing": "x".join(f"{s:g}" for s in ref_geometry.spacing)} | metrics
    except (ImageError, ValueError) as exc:
        row |= {"status": "failed", "error": str(exc)}
    return row


def evaluate_pairs(pairs: Iterable[CasePair], *, convention: str = "bench", nsd_tolerance_mm: float = 2.0, workers: int = 1) -> Iterator[dict]:
    """Score pairs, in parallel processes when ``workers > 1``; yields rows as they finish, in input order."""
    pairs = list(pairs)
    if workers <= 1:
        for pair in pairs:
            yield score_pair(pair, convention, nsd_tolerance_mm)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(score_pair, pairs, [convention] * len(pairs), [nsd_tolerance_mm] * len(pairs), chunksize=4)


def evaluate_folders(
    pred_dir: Path,
    ref_dir: Path,
    *,
    convention: str = "bench",
    nsd_tolerance_mm: float = 2.0,
    workers: int = 1,
    progress: bool = False,
    pairs: list[CasePair] | None = None,
):
    """Score every reference in ``ref_dir`` against ``pred_dir``; return the per-case table (pandas).

    ``pairs`` (from :func:`match_folders`) saves indexing the folders again when the caller has them.
    """
    import pandas as pd

    from bench.metrics import CONVENTIONS

    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    if pairs is None:
        pairs, _ = match_folders(Path(pred_dir), Path(ref_dir))
    rows = evaluate_pairs(pairs, convention=convention, nsd_tolerance_mm=nsd_tolerance_mm, workers=workers)
    if progress:
        from rich.progress import track

        rows = track(rows, total=len(pairs), description="Scoring", transient=True)
    return pd.DataFrame(list(rows))


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


def evaluate_command(
    pred_dir: Path = typer.Argument(..., help="Folder of predicted masks, one file per case id.", exists=True, file_okay=False),
    ref_dir: Path = typer.Argument(..., help="Folder of reference masks, one file per case id.", exists=True, file_okay=False),
    out: Path | None = typer.Option(None, "--out", help="Write the per-case table here (.csv or .parquet)."),
    convention: str = typer.Option("bench", "--convention", help="Metric convention: bench, medpy, monai or deepmind (see docs/metrics.md)."),
    nsd_tolerance_mm: float = typer.Option(2.0, "--nsd-tolerance", help="Tolerance of the normalized surface Dice, in mm."),
    workers: int = typer.Option(1, "--workers", min=1, help="Score cases in this many processes."),
) -> None:
    """Score a folder of predicted masks against reference masks, case by case.

    Files are matched by case id (.nii, .nii.gz, .mha). A reference with no prediction is listed as a
    failed row. Exits with status 1 when any case failed.
    """
    from rich.console import Console
    from rich.table import Table

    console = Console()
    try:
        pairs, unmatched = match_folders(pred_dir, ref_dir)
        table = evaluate_folders(pred_dir, ref_dir, convention=convention, nsd_tolerance_mm=nsd_tolerance_mm, workers=workers, progress=True, pairs=pairs)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if unmatched:
        console.print(f"[yellow]{len(unmatched)} prediction(s) have no reference and were ignored:[/yellow] {', '.join(unmatched[:10])}")
    failed = table[table["status"] != "ok"]
    for row in failed.itertuples():
        console.print(f"[red]{row.case_id}[/red] {row.status}: {row.error}")
    summary = summarize(table)
    view = Table(title=f"{len(table) - len(failed)} of {len(table)} cases scored · convention {convention}")
    for column in ("metric", "unit", "better", "mean", "median", "sd", "n_inf_capped", "n_failed_as_worst"):
        view.add_column(column, justify="left" if column in ("metric", "unit", "better") else "right")
    for rec in summary.itertuples():
        view.add_row(rec.metric, rec.unit, rec.better, f"{rec.mean:.4g}", f"{rec.median:.4g}", f"{rec.sd:.4g}", str(rec.n_inf_capped), str(rec.n_failed_as_worst))
    console.print(view)
    if out is not None:
        write_table(table, out)
        console.print(f"per-case table written to {out}")
    if len(failed):
        raise typer.Exit(1)
