"""Writing results: datasets, submissions, runs, per-case results with their lesion rows, artifacts.

Every method is one transaction (:meth:`Database._write <bench.store.schema.Database._write>`); upserts
are ``INSERT ... ON CONFLICT`` on SQLite and PostgreSQL alike. A case result is one row per (run, case):
an ``ok`` row already stored is kept (a rerun is a no-op), a ``failed`` one is replaced, and the case's
lesion rows are replaced with it. Values are checked and converted here (:func:`json_safe`,
:func:`optional_float`, ...), so what reaches the database is plain JSON and floats.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import socket
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bench.constants import DEFAULT_LESION_RULE, FULL_TRAINING
from bench.metrics import METRICS
from bench.results import CaseResult
from bench.store.schema import (
    CASE_STATUSES,
    ISOLATION_SANDBOX,
    PROBABILITY_COLUMNS,
    RUN_STATUSES,
    Database,
    StoreError,
    artifacts_table,
    case_results_table,
    check_choice,
    dataset_cases_table,
    datasets_table,
    insert_into,
    lesions_table,
    runs_table,
    submissions_table,
    upsert,
    utc_now,
)

#: Text columns of a case row (stored as strings, None kept).
_TEXT_FIELDS = ("run_id", "case_id", "fold", "site", "status", "empty", "error", "prediction_path",
                "probability_path", "calibration_domain", "uncertainty_source")
#: Columns of a run a resumed run (``start_run`` of a stored run id) replaces.
_RESUMED = ("status", "started_at", "finished_at", "host", "device", "gpu_name", "config", "environment")


class Writes(Database):
    """The write methods of :class:`bench.store.Store`."""

    # -- datasets and submissions --------------------------------------------------------------------

    def upsert_dataset(self, dataset: Any) -> str:
        """Register a :class:`bench.data.dataset.Dataset` (its version, name and cases); returns the version.

        Anything with ``version``, ``name``, ``root``, ``channel_names`` and ``cases`` (objects with
        ``case_id``, ``site`` and a ``metadata`` mapping) works.
        """
        dataset_row, case_rows = _dataset_rows(dataset)
        with self._write() as conn:
            upsert(conn, datasets_table, ["version"], ["name", "root", "channel_names", "n_cases"], dataset_row)
            if case_rows:
                updated = ["site", "pattern", "scanner", "lesion_volume_ml", "n_lesions", "case_metadata"]
                upsert(conn, dataset_cases_table, ["dataset_version", "case_id"], updated, case_rows)
        return dataset_row["version"]

    def upsert_submission(self, submission: Any = None, /, **fields: Any) -> str:
        """Register a submission; returns its content hash.

        Pass a :class:`bench.submissions.Submission` (``content_hash``, ``path`` and a ``manifest`` with
        ``name``, ``version``, ``kind``), or keywords ``content_hash``, ``name``, ``version``, ``kind``,
        ``path``, ``manifest`` (a mapping).
        """
        row = _submission_row(submission, fields)
        with self._write() as conn:
            upsert(conn, submissions_table, ["content_hash"], ["name", "version", "kind", "path", "manifest"], row)
        return row["content_hash"]

    # -- runs ----------------------------------------------------------------------------------------

    def start_run(
        self,
        *,
        run_id: str,
        submission: Any,
        dataset: Any,
        protocol: str,
        convention: str = "bench",
        preprocessing_id: str = "",
        code_version: str = "",
        config: Mapping[str, Any] | None = None,
        environment: Mapping[str, Any] | None = None,
        lesion_rule: str = DEFAULT_LESION_RULE,
        isolation: str = ISOLATION_SANDBOX,
    ) -> str:
        """Create the run, or mark an existing one ``running`` again (a resumed run keeps its rows).

        ``submission`` is a registered submission or its content hash, ``dataset`` a registered dataset
        or its version; ``environment`` may carry ``host``, ``device`` and ``gpu`` (see
        :func:`bench.harness.describe_environment`). Returns the run id.
        """
        row = _run_row(
            run_id=run_id, submission=submission, dataset=dataset, protocol=protocol, convention=convention, lesion_rule=lesion_rule,
            isolation=isolation, preprocessing_id=preprocessing_id, code_version=code_version, config=config, environment=environment,
        )
        try:
            with self._write() as conn:
                insert = insert_into(conn, runs_table)
                set_ = {key: insert.excluded[key] for key in _RESUMED} | {"error": None}
                conn.execute(insert.on_conflict_do_update(index_elements=["run_id"], set_=set_), row)
        except sa.exc.IntegrityError as exc:
            raise StoreError(
                f"cannot start run {run_id}: submission {row['submission_hash']} or dataset {row['dataset_version']} "
                "is not registered (call upsert_submission / upsert_dataset first)"
            ) from exc
        return run_id

    def finish_run(
        self,
        run_id: str,
        *,
        status: str = "done",
        error: str | None = None,
        timings: Mapping[str, float] | None = None,
        peak_memory_mb: float | None = None,
        budget: Mapping[str, Any] | None = None,
    ) -> None:
        """Close a run with ``done`` or ``failed``, its per-stage timings, peak memory and the training
        budget it used (``{"summary": ..., "folds": {fold: BudgetUsed.to_dict()}}``, trainable runs only)."""
        check_choice("run status", status, RUN_STATUSES)
        values: dict[str, Any] = {"status": status, "finished_at": utc_now(), "error": error}
        if budget is not None:
            values["budget"] = json_safe(dict(budget))
        if timings is not None:
            values["timings"] = json_safe(dict(timings))
        if peak_memory_mb is not None:
            values["peak_memory_mb"] = float(peak_memory_mb)
        with self._write() as conn:
            if conn.execute(sa.update(runs_table).where(runs_table.c.run_id == run_id).values(values)).rowcount != 1:
                raise StoreError(f"no run {run_id!r} in {self!r}")

    def record_artifact(self, run_id: str, kind: str, path: str | Path, *, fold: str = "", case_id: str = "") -> None:
        """Remember a file a run produced (a trained model folder, a log); the latest path wins."""
        row = {"run_id": run_id, "kind": kind, "fold": fold, "case_id": case_id, "path": str(path), "recorded_at": utc_now()}
        with self._write() as conn:
            upsert(conn, artifacts_table, ["run_id", "kind", "fold", "case_id"], ["path", "recorded_at"], row)

    # -- per-case results ------------------------------------------------------------------------------

    def record_case_result(self, row: CaseResult | Mapping[str, Any], lesions: Any = (), *, replace: bool = False) -> bool:
        """Store one case result and its lesion rows in one transaction; returns whether it was written.

        The harness passes a :class:`bench.results.CaseResult`, which carries its own lesion rows; a plain
        mapping (described below) is accepted too, for scripts and tests.

        ``row`` holds ``run_id``, ``case_id``, ``status`` (``ok`` / ``failed``), optionally ``fold``,
        ``site``, ``error``, ``prediction_path``, ``predict_s``, ``score_s``, ``empty`` and any metric
        of :data:`bench.metrics.METRICS` (infinite values are kept, NaN is stored as NULL); other keys go
        to the ``extra`` JSON column. ``lesions`` is the case's :class:`bench.metrics.LesionMatches` or
        a list of lesion mappings (see :func:`lesion_rows`). An ``ok`` row already stored is kept (a
        rerun is a no-op) unless ``replace``; a stored ``failed`` row is replaced.
        """
        return self.record_case_results([row], [lesions], replace=replace) == 1

    def record_case_results(
        self,
        rows: Sequence[CaseResult | Mapping[str, Any]],
        lesions: Sequence[Any] | None = None,
        *,
        replace: bool = False,
    ) -> int:
        """Store several case results (``lesions[i]`` belongs to ``rows[i]``) in one transaction.

        Returns how many rows were inserted or replaced (see :meth:`record_case_result`).
        """
        if lesions is not None and len(lesions) != len(rows):
            raise StoreError(f"record_case_results: {len(rows)} rows but {len(lesions)} lesion lists")
        if not rows:
            return 0
        prepared, lesions_by_key = _prepared_case_results(rows, lesions)
        try:
            with self._write() as conn:
                written = _upsert_case_rows(conn, prepared, replace=replace)
                _replace_lesions(conn, written, lesions_by_key)
        except sa.exc.IntegrityError as exc:
            missing = sorted({row["run_id"] for row in prepared})
            raise StoreError(f"cannot store case results: run(s) {missing} not started (call start_run first) or bad row: {exc.orig}") from exc
        return len(written)


# -- rows of the write methods -------------------------------------------------------------------------------


def _dataset_rows(dataset: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``datasets`` row of a dataset and its ``dataset_cases`` rows."""
    version = str(dataset.version)
    dataset_row = {
        "version": version,
        "name": str(dataset.name),
        "root": str(getattr(dataset, "root", "") or ""),
        "channel_names": list(getattr(dataset, "channel_names", ()) or ()),
        "n_cases": len(dataset.cases),
        "registered_at": utc_now(),
    }
    case_rows = []
    for case in dataset.cases:
        meta = json_safe(dict(getattr(case, "metadata", {}) or {}))
        case_rows.append(
            {
                "dataset_version": version,
                "case_id": str(case.case_id),
                "site": str(case.site),
                "pattern": optional_str(meta.get("pattern")),
                "scanner": optional_str(meta.get("scanner")),
                "lesion_volume_ml": optional_float(meta.get("lesion_volume_ml"), "lesion_volume_ml"),
                "n_lesions": optional_int(meta.get("n_lesions")),
                "case_metadata": meta,
            }
        )
    return dataset_row, case_rows


def _submission_row(submission: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """The ``submissions`` row of a submission object and/or keyword fields (the keywords win)."""
    if submission is not None:
        manifest = getattr(submission, "manifest", None)
        fields = {
            "content_hash": submission.content_hash,
            "name": getattr(manifest, "name", None) or getattr(submission, "name", None),
            "version": getattr(manifest, "version", None) or getattr(submission, "version", ""),
            "kind": getattr(manifest, "kind", None) or getattr(submission, "kind", ""),
            "path": getattr(submission, "path", None),
            "manifest": manifest.model_dump(mode="json") if hasattr(manifest, "model_dump") else manifest,
        } | fields
    missing = [key for key in ("content_hash", "name") if not fields.get(key)]
    if missing:
        raise StoreError(f"upsert_submission: missing {', '.join(missing)}")
    return {
        "content_hash": str(fields["content_hash"]),
        "name": str(fields["name"]),
        "version": str(fields.get("version") or ""),
        "kind": str(fields.get("kind") or ""),
        "path": None if fields.get("path") is None else str(fields["path"]),
        "manifest": json_safe(dict(fields.get("manifest") or {})),
        "registered_at": utc_now(),
    }


def _run_row(**arguments: Any) -> dict[str, Any]:
    """The ``runs`` row of :meth:`Writes.start_run`'s arguments."""
    now = utc_now()
    environment = json_safe(dict(arguments["environment"] or {}))
    submission, dataset = arguments["submission"], arguments["dataset"]
    return {
        "run_id": arguments["run_id"],
        "submission_hash": submission if isinstance(submission, str) else submission.content_hash,
        "dataset_version": dataset if isinstance(dataset, str) else dataset.version,
        **{key: arguments[key] for key in ("protocol", "convention", "lesion_rule", "isolation")},
        "preprocessing_id": arguments["preprocessing_id"] or "",
        "code_version": arguments["code_version"] or "",
        "status": "running",
        "created_at": now,
        "started_at": now,
        "finished_at": None,
        "host": environment.get("host") or socket.gethostname(),
        "device": environment.get("device"),
        "gpu_name": environment.get("gpu") or environment.get("gpu_name"),
        "config": json_safe(dict(arguments["config"] or {})),
        "environment": environment,
        "train_fraction": float((arguments["config"] or {}).get("train_fraction", FULL_TRAINING)),
    }


def _prepared_case_results(rows: Sequence[Any], lesions: Sequence[Any] | None) -> tuple[list[dict[str, Any]], dict[tuple[str, str], list[dict]]]:
    """``case_results`` rows and, per (run, case), its ``lesions`` rows; a key twice is an error."""
    if any(isinstance(row, CaseResult) for row in rows):
        lesions = [row.lesions if isinstance(row, CaseResult) else (lesions[i] if lesions else ()) for i, row in enumerate(rows)]
        rows = [row.to_row() if isinstance(row, CaseResult) else row for row in rows]
    now = utc_now()
    prepared = [case_row(row, now) for row in rows]
    keys = [(row["run_id"], row["case_id"]) for row in prepared]
    if len(set(keys)) != len(keys):
        raise StoreError("record_case_results: the same (run_id, case_id) appears twice in one batch")
    return prepared, {key: lesion_rows(key, case_lesions) for key, case_lesions in zip(keys, lesions or [()] * len(rows))}


def _upsert_case_rows(conn: Connection, prepared: list[dict[str, Any]], *, replace: bool) -> set[tuple[str, str]]:
    """Insert the rows, replacing stored ``failed`` ones (every one with ``replace``); returns the keys written."""
    insert = insert_into(conn, case_results_table)
    updated = [column.name for column in case_results_table.columns if column.name not in ("id", "run_id", "case_id")]
    statement = insert.on_conflict_do_update(
        index_elements=["run_id", "case_id"],
        set_={name: insert.excluded[name] for name in updated},
        where=None if replace else case_results_table.c.status != "ok",
    ).returning(case_results_table.c.run_id, case_results_table.c.case_id)
    return {(run_id, case_id) for run_id, case_id in conn.execute(statement, prepared)}


def _replace_lesions(conn: Connection, written: set[tuple[str, str]], lesions_by_key: Mapping[tuple[str, str], list[dict]]) -> None:
    """Delete the stored lesion rows of the written case results and insert their new ones."""
    for run_id in {run_id for run_id, _ in written}:
        case_ids = [case_id for key_run, case_id in written if key_run == run_id]
        conn.execute(sa.delete(lesions_table).where(lesions_table.c.run_id == run_id, lesions_table.c.case_id.in_(case_ids)))
    new_lesions = [lesion for key in written for lesion in lesions_by_key[key]]
    if new_lesions:
        conn.execute(insert_into(conn, lesions_table).on_conflict_do_nothing(), new_lesions)


def case_row(row: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """A case_results row from a harness row: known columns, metric floats, the rest in ``extra``."""
    for required in ("run_id", "case_id"):
        if not row.get(required):
            raise StoreError(f"case result without {required}: {dict(row)!r}")
    status = row.get("status", "ok")
    check_choice("case status", status, CASE_STATUSES)
    out: dict[str, Any] = {name: None for name in (column.name for column in case_results_table.columns) if name != "id"}
    extra: dict[str, Any] = {}
    for key, value in row.items():
        if key in _TEXT_FIELDS:
            out[key] = None if value is None else str(value)
        elif key in ("predict_s", "score_s") or key in METRICS or key in PROBABILITY_COLUMNS:
            out[key] = optional_float(value, key)
        elif key == "calibration_histogram":
            out[key] = None if value is None else json_safe(value)
        else:
            extra[key] = value
    out |= {"fold": out["fold"] or "", "site": out["site"] or "", "status": status, "error": out["error"] or None}
    out["extra"] = json_safe(extra) if extra else None
    out["recorded_at"] = now
    return out


def lesion_rows(key: tuple[str, str], lesions: Any) -> list[dict[str, Any]]:
    """``lesions`` rows of one case result.

    ``lesions`` is a :class:`bench.metrics.LesionMatches` (its ``reference`` lesions and ``predicted``
    components), or a sequence of mappings with ``kind`` (``"ref"`` / ``"pred"``), ``lesion_id`` (or
    ``component_id``), ``detected`` (or, for components, ``false_positive``), ``volume_ml`` and
    optionally ``voxels``, ``centroid`` (z, y, x) and ``uncertainty``.
    """
    if hasattr(lesions, "reference") and hasattr(lesions, "predicted"):
        items = [{"kind": "ref", **_fields(lesion)} for lesion in lesions.reference]
        items += [{"kind": "pred", **_fields(component)} for component in lesions.predicted]
    else:
        items = [_fields(item) for item in lesions or ()]
    return [_lesion_row(key, item) for item in items]


def _lesion_row(key: tuple[str, str], item: Mapping[str, Any]) -> dict[str, Any]:
    """One ``lesions`` row (see :func:`lesion_rows`)."""
    kind = item.get("kind")
    if kind not in ("ref", "pred"):
        raise StoreError(f"lesion row of case {key[1]}: kind must be 'ref' or 'pred', got {kind!r}")
    lesion_id = item.get("lesion_id", item.get("component_id"))
    if lesion_id is None:
        raise StoreError(f"lesion row of case {key[1]} has no lesion_id / component_id: {item!r}")
    if "detected" in item:
        detected = bool(item["detected"])
    elif "false_positive" in item:
        detected = not bool(item["false_positive"])
    else:
        raise StoreError(f"lesion row of case {key[1]} has neither detected nor false_positive: {item!r}")
    centroid = item.get("centroid") or (item.get("centroid_z"), item.get("centroid_y"), item.get("centroid_x"))
    return {
        "run_id": key[0],
        "case_id": key[1],
        "kind": kind,
        "lesion_id": int(lesion_id),
        "detected": detected,
        "voxels": optional_int(item.get("voxels")),
        "volume_ml": optional_float(item.get("volume_ml"), "volume_ml"),
        **{f"centroid_{axis}": optional_float(value, "centroid") for axis, value in zip("zyx", centroid)},
        "match_rule": optional_str(item.get("match_rule")),
        "matched_iou": optional_float(item.get("matched_iou"), "matched_iou"),
        "matched_ids": [int(i) for i in item.get("matched_ids") or ()] or None,
        "uncertainty": optional_float(item.get("uncertainty"), "uncertainty"),
    }


def _fields(record: Any) -> dict[str, Any]:
    """A dataclass instance (or mapping) as a dict."""
    return dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(record)


# -- values ------------------------------------------------------------------------------------------------


def optional_float(value: Any, key: str) -> float | None:
    """A float for a REAL column: NaN and None become NULL, infinities are kept."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise StoreError(f"{key}: expected a number, got {value!r}") from None
    if not isinstance(value, numbers.Real):
        raise StoreError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    value = float(value)
    return None if math.isnan(value) else value


def optional_int(value: Any) -> int | None:
    try:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)
    except (TypeError, ValueError):
        return None


def optional_str(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def json_safe(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN to null, infinities to the strings "inf" / "-inf"."""
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)) or (hasattr(value, "tolist") and not isinstance(value, (str, bytes))):
        items = value.tolist() if hasattr(value, "tolist") else value
        return json_safe(items) if not isinstance(items, (list, tuple, set)) else [json_safe(item) for item in items]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (Path, datetime)):
        return str(value)
    return json.loads(json.dumps(value, default=str))
