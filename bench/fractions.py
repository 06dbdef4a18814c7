"""Training-data fractions and learning curves: how an entrant's Dice grows with its labelled data.

``bench run --train-fraction 0.25 0.5 1.0`` runs each trainable submission once per fraction
(``RunSpec.train_fraction``, part of the run id when it is not 1). In each fold the harness keeps
:func:`subsample_training` of the fold's training cases before it holds out the validation cases:
per site, ``round(fraction x n)`` cases (at least one), drawn by a permutation seeded with the run's
seed and the site name, so the subsample is site-stratified, deterministic, and *nested* (the cases of
a smaller fraction are among those of a larger one). The test cases never change, so the runs of one
submission are paired case by case.

:func:`learning_curve` reads the stored per-case Dice of those runs into a table (mean Dice per
submission and fraction, over the scored cases, a failed case counted as Dice 0 by the benchmark's
worst-value rule) and :func:`plot_learning_curve` draws it (matplotlib, PNG); ``bench run`` prints the
table and writes ``<results>/learning-curve-<protocol>.png`` whenever it ran more than one fraction.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import pandas as pd

    from bench.data.dataset import Dataset


def subsample_training(dataset: "Dataset", train_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """Keep ``fraction`` of ``train_ids``, site by site (at least one case per site), deterministically.

    ``fraction >= 1`` returns ``train_ids`` unchanged. The kept ids keep their order in ``train_ids``.
    """
    import numpy as np

    if fraction >= 1.0:
        return list(train_ids)
    if not 0.0 < fraction:
        raise ValueError(f"train fraction must be in (0, 1], got {fraction}")
    by_site: dict[str, list[str]] = {}
    for case_id in train_ids:
        by_site.setdefault(dataset.case(case_id).site, []).append(case_id)
    kept: set[str] = set()
    for site, ids in by_site.items():
        order = np.random.default_rng([int(seed), zlib.crc32(site.encode())]).permutation(sorted(ids))
        kept.update(order[: max(1, int(round(fraction * len(ids))))].tolist())
    return [case_id for case_id in train_ids if case_id in kept]


def learning_curve(db_url: str, run_ids: Sequence[str], *, metric: str = "dice") -> "pd.DataFrame":
    """Mean ``metric`` per (submission, train fraction) over the runs ``run_ids``.

    Columns: ``submission``, ``fraction``, ``cases`` (scored), ``mean``, ``run_id``. A submission that
    does not train has one run whatever the fraction; it is shown at every fraction of the others.
    """
    import numpy as np
    import pandas as pd

    from bench.stats import counted_values
    from bench.store import Store

    store = Store.from_url(db_url)
    frame = store.case_results_frame(run_ids=list(dict.fromkeys(run_ids)), metrics=(metric,), latest_only=False, details=False)
    rows: list[dict[str, Any]] = []
    constant: list[dict[str, Any]] = []
    for run_id, group in frame.groupby("run_id", observed=True):
        record = store.get_run(str(run_id))
        config = (record.config or {}) if record is not None else {}
        ok = (group["status"] == "ok").to_numpy()
        values, _ = counted_values(group[metric].to_numpy(float), ok, metric)
        row = {"submission": str(group["submission"].iloc[0]), "fraction": float(config.get("train_fraction", 1.0)),
               "cases": int(ok.sum()), "mean": float(np.nanmean(values)) if len(values) else float("nan"), "run_id": str(run_id)}
        (rows if record is not None and record.budget else constant).append(row)
    fractions = sorted({r["fraction"] for r in rows}) or [1.0]
    rows += [{**row, "fraction": f} for row in constant for f in fractions]
    table = pd.DataFrame(rows, columns=["submission", "fraction", "cases", "mean", "run_id"])
    return table.sort_values(["submission", "fraction"], ignore_index=True)


def pivot(table: "pd.DataFrame") -> "pd.DataFrame":
    """Submissions as rows, fractions as columns, the mean as values (for printing)."""
    return table.pivot_table(index="submission", columns="fraction", values="mean", aggfunc="first")


def plot_learning_curve(table: "pd.DataFrame", path: Path, *, metric: str = "dice", title: str = "") -> Path:
    """Draw ``table`` (from :func:`learning_curve`): one line per submission, mean ``metric`` vs fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(6, 4))
    for submission, group in table.groupby("submission", sort=True):
        axes.plot(group["fraction"], group["mean"], marker="o", label=str(submission))
    axes.set_xlabel("fraction of each fold's training cases")
    axes.set_ylabel(f"mean {metric} (held-out cases)")
    axes.set_xticks(sorted(table["fraction"].unique()))
    axes.set_title(title or f"Learning curve ({metric})")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
