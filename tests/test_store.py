"""The results database (bench.store) on SQLite and, when its server answers, PostgreSQL.

Every PostgreSQL test runs in its own schema (dropped afterwards), so reruns and parallel sessions
never see each other's rows. Concurrency is tested with real processes writing at the same time.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from support import PG_URL, pg_schema, postgres_unavailable_reason  # noqa: F401
import sqlalchemy as sa

from bench.metrics import METRICS, lesion_matches
from bench.store import LOG_TAIL_CHARS, METRIC_COLUMNS, Store, StoreError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def postgres_unavailable() -> str | None:
    return postgres_unavailable_reason()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path, postgres_unavailable):
    """A fresh database: a SQLite file, or a private schema on the PostgreSQL server (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'results' / 'bench.db'}"
        return
    if postgres_unavailable:
        pytest.skip(postgres_unavailable)
    with pg_schema() as url:
        yield url


@pytest.fixture
def store(db_url):
    with Store.from_url(db_url) as store:
        store.create_all()
        yield store


def make_dataset(n_cases: int = 6, sites: str = "AB", version: str = "v1", name: str = "toy"):
    cases = [
        SimpleNamespace(case_id=f"c{i:03d}", site=sites[i % len(sites)], metadata={"pattern": "wm", "n_lesions": np.int64(2), "lesion_volume_ml": np.float32(1.5), "scanner": float("nan")})
        for i in range(n_cases)
    ]
    return SimpleNamespace(version=version, name=name, root=Path("/data/toy"), channel_names=("ADC", "Z-ADC"), cases=cases)


def make_submission(content_hash: str = "hash-a", name: str = "unet", version: str = "1.0"):
    manifest = SimpleNamespace(name=name, version=version, kind="onnx", model_dump=lambda mode: {"name": name, "version": version, "kind": "onnx"})
    return SimpleNamespace(content_hash=content_hash, path=Path(f"/subs/{name}"), manifest=manifest)


def register(store: Store, run_id: str = "run-1", *, submission=None, dataset=None, protocol: str = "loso") -> str:
    dataset = dataset or make_dataset()
    submission = submission or make_submission()
    store.upsert_dataset(dataset)
    store.upsert_submission(submission)
    return store.start_run(run_id=run_id, submission=submission, dataset=dataset, protocol=protocol, convention="bench", preprocessing_id="prep", code_version="0.1.0", config={"k": 5}, environment={"host": "h", "device": "cpu", "gpu": None})


def case_row(case_id: str, run_id: str = "run-1", status: str = "ok", **values) -> dict:
    site = "AB"[int(case_id[1:]) % 2]
    return {"run_id": run_id, "case_id": case_id, "site": site, "fold": site, "status": status} | values


# -- schema and registration ----------------------------------------------------------------------------------


def test_create_all_is_idempotent_and_has_results(db_url):
    store = Store(db_url)
    if store.dialect == "sqlite":
        assert not store.has_results()
        assert not Path(store.url.database).exists(), "has_results must not create the database file"
    store.create_all()
    store.create_all()
    assert store.has_results()
    columns = {column["name"] for column in sa.inspect(store.engine).get_columns("case_results")}
    assert set(METRIC_COLUMNS) <= columns and {"run_id", "case_id", "status", "empty", "prediction_path"} <= columns
    store.dispose()


def test_create_all_adds_a_metric_column_missing_from_an_old_database(store):
    with store.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE case_results DROP COLUMN lesion_f1"))
    store.dispose()  # SQLite caches the schema per connection
    store.create_all()
    assert "lesion_f1" in {column["name"] for column in sa.inspect(store.engine).get_columns("case_results")}


def test_sqlite_runs_in_wal_mode(tmp_path):
    store = Store(tmp_path / "bench.db")
    store.create_all()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_url_comes_from_argument_settings_or_environment(tmp_path, monkeypatch):
    from bench.settings import BenchSettings

    monkeypatch.setenv("HIE_BENCH_DB_URL", f"sqlite:///{tmp_path}/from-env.db")
    assert Store().url.database == f"{tmp_path}/from-env.db"
    assert Store(BenchSettings(db_url=f"sqlite:///{tmp_path}/s.db")).url.database == f"{tmp_path}/s.db"
    assert Store(str(tmp_path / "plain.db")).url.database == f"{tmp_path}/plain.db"
    monkeypatch.delenv("HIE_BENCH_DB_URL")
    assert Store(BenchSettings(results_dir=tmp_path)).url.database == f"{tmp_path}/bench.db"
    assert "secret" not in repr(Store("postgresql+psycopg://user:secret@127.0.0.1:1/x"))


def test_dataset_and_submission_upserts_keep_one_row(store):
    register(store)
    store.upsert_dataset(make_dataset(name="renamed"))
    store.upsert_submission(make_submission(version="1.1"))
    datasets = store.table_frame("datasets")
    assert datasets[["version", "name", "n_cases"]].values.tolist() == [["v1", "renamed", 6]]
    cases = store.table_frame("dataset_cases")
    assert len(cases) == 6 and set(cases["site"]) == {"A", "B"}
    assert cases["n_lesions"].tolist() == [2] * 6 and cases["scanner"].isna().all()
    assert cases["case_metadata"].iloc[0] == {"pattern": "wm", "n_lesions": 2, "lesion_volume_ml": 1.5, "scanner": None}
    submissions = store.table_frame("submissions")
    assert submissions[["content_hash", "name", "version", "kind"]].values.tolist() == [["hash-a", "unet", "1.1", "onnx"]]
    assert submissions["manifest"].iloc[0]["version"] == "1.1"


def test_start_run_needs_registered_submission_and_dataset(store):
    with pytest.raises(StoreError, match="not registered"):
        store.start_run(run_id="r", submission="nope", dataset="nope", protocol="loso")


# -- case results ---------------------------------------------------------------------------------------------


def test_case_results_roundtrip_keeps_infinity_and_nulls_nan(store):
    register(store)
    written = store.record_case_result(
        case_row("c000", dice=np.float32(0.5), hd95=math.inf, nsd=math.nan, empty="pred", predict_s=1.5, prediction_path=Path("/p/c000.nii.gz"), spacing="2x1x1", voxels=np.int64(7)),
    )
    assert written
    frame = store.case_results_frame()
    row = frame.iloc[0]
    assert row["dice"] == 0.5 and row["hd95"] == math.inf and math.isnan(row["nsd"]) and math.isnan(row["hd"])
    assert (row["submission"], row["submission_hash"], row["dataset"], row["protocol"], row["convention"]) == ("unet 1.0", "hash-a", "toy", "loso", "bench")
    assert (row["empty"], row["prediction_path"], row["predict_s"], row["site"], row["fold"]) == ("pred", "/p/c000.nii.gz", 1.5, "A", "A")
    extra = store.table_frame("case_results")["extra"].iloc[0]
    assert extra == {"spacing": "2x1x1", "voxels": 7}


def test_rerun_skips_ok_rows_and_replaces_failed_ones(store):
    register(store)
    lesion = [{"kind": "ref", "lesion_id": 1, "detected": True, "volume_ml": 0.2}]
    assert store.record_case_result(case_row("c000", dice=0.5), lesion)
    assert not store.record_case_result(case_row("c000", dice=0.9), [])  # a rerun: kept as it was
    assert store.record_case_result(case_row("c001", status="failed", error="no prediction"))
    assert store.finished_case_ids("run-1") == {"c000"}
    assert store.finished_case_ids("run-1", include_failed=True) == {"c000", "c001"}
    assert store.record_case_result(case_row("c001", dice=0.7), [{"kind": "pred", "lesion_id": 3, "false_positive": True, "volume_ml": 0.01}])
    frame = store.case_results_frame().set_index("case_id")
    assert frame.loc["c000", "dice"] == 0.5 and frame.loc["c001", "dice"] == 0.7 and frame.loc["c001", "status"] == "ok"
    assert frame.loc["c001", "error"] is None
    assert store.record_case_result(case_row("c000", dice=0.9), [], replace=True)
    assert store.case_results_frame().set_index("case_id").loc["c000", "dice"] == 0.9
    lesions = store.lesion_frame()
    assert lesions[["case_id", "kind", "lesion_id", "detected"]].values.tolist() == [["c001", "pred", 3, False]]


def test_batch_write_is_one_transaction(store):
    register(store)
    rows = [case_row("c000", dice=0.1), case_row("c001", dice=0.2), case_row("c002", run_id="no-such-run", dice=0.3)]
    with pytest.raises(StoreError, match="not started"):
        store.record_case_results(rows)
    assert store.case_results_frame().empty, "a failed batch must leave nothing behind"
    assert store.record_case_results(rows[:2], [[], []]) == 2
    with pytest.raises(StoreError, match="twice"):
        store.record_case_results([rows[0], rows[0]])


def test_bad_rows_raise_clear_errors(store):
    register(store)
    with pytest.raises(StoreError, match="case status"):
        store.record_case_result(case_row("c000", status="weird"))
    with pytest.raises(StoreError, match="without case_id"):
        store.record_case_result({"run_id": "run-1", "status": "ok"})
    with pytest.raises(StoreError, match="dice: expected a number"):
        store.record_case_result(case_row("c000", dice="high"))
    with pytest.raises(StoreError, match="kind must be"):
        store.record_case_result(case_row("c000"), [{"kind": "blob", "lesion_id": 1, "detected": True}])
    with pytest.raises(StoreError, match="unknown metric"):
        store.case_results_frame(metrics=["dicey"])


def test_lesion_rows_from_bench_metrics(store):
    register(store)
    ref = np.zeros((5, 9, 9), bool)
    ref[2, 1:3, 1:3] = True
    ref[2, 6:8, 6:8] = True
    pred = np.zeros_like(ref)
    pred[2, 1, 1] = True
    pred[0, 8, 0] = True
    matches = lesion_matches(pred, ref, (2.0, 1.0, 1.0))
    store.record_case_result(case_row("c000", dice=0.3), matches)
    lesions = store.lesion_frame().sort_values(["kind", "lesion_id"])
    assert lesions[["kind", "lesion_id", "detected", "voxels"]].values.tolist() == [["pred", 1, False, 1], ["pred", 2, True, 1], ["ref", 1, True, 4], ["ref", 2, False, 4]]
    assert lesions["volume_ml"].tolist() == pytest.approx([0.002, 0.002, 0.008, 0.008])
    assert lesions[["centroid_z", "centroid_y", "centroid_x"]].iloc[2].tolist() == pytest.approx([2.0, 1.5, 1.5])
    assert set(lesions["site"]) == {"A"} and set(lesions["submission"]) == {"unet 1.0"}


def test_frames_filter_by_site_protocol_dataset_and_submission(store):
    register(store, "run-loso")
    register(store, "run-kfold", protocol="kfold")
    register(store, "run-b", submission=make_submission("hash-b", name="nnunet", version="2"))
    for run_id in ("run-loso", "run-kfold", "run-b"):
        store.record_case_results([case_row(f"c{i:03d}", run_id=run_id, dice=i / 10) for i in range(6)])
    assert len(store.case_results_frame()) == 18
    assert set(store.case_results_frame(protocol="kfold")["run_id"]) == {"run-kfold"}
    assert set(store.case_results_frame(site="A")["site"]) == {"A"}
    assert len(store.case_results_frame(site=["A", "B"])) == 18
    assert set(store.case_results_frame(submissions=["nnunet"])["run_id"]) == {"run-b"}
    assert set(store.case_results_frame(submissions=["hash-a"], protocol="loso")["run_id"]) == {"run-loso"}
    assert len(store.case_results_frame(dataset="toy")) == 18 and len(store.case_results_frame(dataset="v1")) == 18
    assert store.case_results_frame(dataset="other").empty
    lean = store.case_results_frame(metrics=["dice"], details=False)
    assert list(lean.columns)[-4:] == ["case_id", "site", "status", "dice"] and "fold" not in lean
    # Rows come sorted by submission, protocol, case.
    assert lean[["submission", "protocol", "case_id"]].astype(str).values.tolist() == sorted(lean[["submission", "protocol", "case_id"]].astype(str).values.tolist())


def test_latest_run_of_a_submission_wins(store):
    register(store, "old")
    store.record_case_result(case_row("c000", run_id="old", dice=0.1))
    time.sleep(0.01)
    register(store, "new")
    store.record_case_result(case_row("c000", run_id="new", dice=0.9))
    assert store.case_results_frame()["run_id"].tolist() == ["new"]
    assert sorted(store.case_results_frame(latest_only=False)["run_id"]) == ["new", "old"]


def _scored_run(store: Store, run_id: str, dices: list, *, protocol: str = "loso", finish: bool = True, hd95: float | None = None) -> None:
    """A run of the default submission with one case per value (``None``: a failed case)."""
    register(store, run_id, protocol=protocol)
    rows = [case_row(f"c{i:03d}", run_id=run_id, dice=d, hd95=hd95) if d is not None else case_row(f"c{i:03d}", run_id=run_id, status="failed", error="x")
            for i, d in enumerate(dices)]
    store.record_case_results(rows, [[{"kind": "ref", "lesion_id": 1, "detected": True, "volume_ml": 1.0}]] * len(rows))
    if finish:
        store.finish_run(run_id)
    time.sleep(0.01)


def test_select_latest_and_best_runs_of_one_submission(store):
    """Two runs of one submission, the older better: latest picks the newer, best (mean Dice) the older."""
    _scored_run(store, "older-better", [0.8, 0.8, 0.8, 0.8], hd95=9.0)
    _scored_run(store, "newer-worse", [0.5, 0.5, 0.5, 0.5], hd95=3.0)
    assert store.case_results_frame()["run_id"].unique().tolist() == ["newer-worse"]
    assert store.case_results_frame(select="latest")["run_id"].unique().tolist() == ["newer-worse"]
    assert store.case_results_frame(select="best")["run_id"].unique().tolist() == ["older-better"]
    assert store.select_runs(select="best")["run_id"].tolist() == ["older-better"]
    assert store.run_scores(store.select_runs(latest_only=False)) == pytest.approx({"older-better": 0.8, "newer-worse": 0.5})
    # The other readers follow the same choice.
    assert store.lesion_frame(select="best")["run_id"].unique().tolist() == ["older-better"]
    assert store.runs_frame(select="best")["run_id"].tolist() == ["older-better"]
    assert sorted(store.runs_frame()["run_id"]) == ["newer-worse", "older-better"], "runs_frame lists every run by default"
    # A site filter keeps the run chosen over all the cases.
    assert store.case_results_frame(select="best", site="B")["run_id"].unique().tolist() == ["older-better"]
    # A lower-is-better metric picks the lowest mean.
    assert store.select_runs(select="best", rank_metric="hd95")["run_id"].tolist() == ["newer-worse"]
    assert store.select_runs(select="best", rank_metric="lesion_f1")["run_id"].tolist() == ["newer-worse"], "no values: a tie, the latest wins"


def test_best_run_counts_failed_and_missing_cases_as_the_worst_value(store):
    _scored_run(store, "complete", [0.5, 0.5, 0.5, 0.5])
    _scored_run(store, "half", [0.9, None])  # mean (0.9 + 0 + 0 + 0) / 4 over the scope's cases
    _scored_run(store, "other-protocol", [0.1], protocol="kfold")
    best = store.select_runs(select="best")
    assert dict(zip(best["protocol"], best["run_id"])) == {"kfold": "other-protocol", "loso": "complete"}
    assert store.run_scores(store.select_runs(latest_only=False))["half"] == pytest.approx(0.225)
    latest = store.select_runs()
    assert dict(zip(latest["protocol"], latest["run_id"])) == {"kfold": "other-protocol", "loso": "half"}


def test_a_learning_curve_run_never_replaces_the_full_run_on_a_leaderboard(store):
    """``bench run --train-fraction 0.25`` after the full run: the leaderboard keeps the full run."""
    store.upsert_dataset(make_dataset())
    store.upsert_submission(make_submission())
    for run_id, config in (("full", {}), ("quarter", {"train_fraction": 0.25})):
        store.start_run(run_id=run_id, submission=make_submission(), dataset=make_dataset(), protocol="loso", config=config)
        store.record_case_result(case_row("c000", run_id=run_id, dice=0.9 if run_id == "full" else 0.4))
        store.finish_run(run_id)
        time.sleep(0.01)
    assert store.select_runs()["run_id"].tolist() == ["full"]
    assert store.case_results_frame()["run_id"].unique().tolist() == ["full"]
    assert store.select_runs(select="best")["run_id"].tolist() == ["full"]
    assert store.select_runs(train_fraction=0.25)["run_id"].tolist() == ["quarter"]
    # two scopes, not one: with the fraction filter off, each fraction keeps its own latest run
    assert sorted(store.select_runs(train_fraction=None)["run_id"]) == ["full", "quarter"]
    assert sorted(store.runs_frame()["run_id"]) == ["full", "quarter"], "every run is listed"
    assert store.case_results_frame(run_ids=["quarter"])["run_id"].unique().tolist() == ["quarter"], "named runs are not filtered"


def test_latest_is_the_run_finished_last(store):
    _scored_run(store, "started-first", [0.1], finish=False)
    _scored_run(store, "started-second", [0.2])
    assert store.select_runs()["run_id"].tolist() == ["started-second"]
    store.finish_run("started-first")
    assert store.select_runs()["run_id"].tolist() == ["started-first"], "finished after the other"


def test_unknown_run_selection_or_metric_is_refused(store):
    _scored_run(store, "a", [0.5])
    _scored_run(store, "b", [0.6])
    with pytest.raises(StoreError, match="run selection"):
        store.case_results_frame(select="oldest")
    with pytest.raises(StoreError, match="unknown metric"):
        store.select_runs(select="best", rank_metric="dicey")
    with pytest.raises(StoreError, match="no better direction"):
        store.select_runs(select="best", rank_metric=next(k for k, info in METRICS.items() if info.higher_is_better is None))


def test_same_label_different_content_gets_a_hash_suffix(store):
    register(store, "r1", submission=make_submission("aaaaaaa111"))
    register(store, "r2", submission=make_submission("bbbbbbb222"))
    store.record_case_results([case_row("c000", run_id="r1", dice=0.1), case_row("c000", run_id="r2", dice=0.2)])
    assert sorted(store.case_results_frame()["submission"]) == ["unet 1.0 #aaaaaaa", "unet 1.0 #bbbbbbb"]


def test_finish_run_and_runs_frame(store):
    register(store)
    store.record_case_results([case_row("c000", dice=0.5), case_row("c001", status="failed", error="boom")])
    store.finish_run("run-1", status="done", timings={"train_s": 3.0}, peak_memory_mb=512)
    run = store.get_run("run-1")
    assert (run.status, run.timings, run.peak_memory_mb, run.device, run.config) == ("done", {"train_s": 3.0}, 512.0, "cpu", {"k": 5})
    assert run.finished_at.tzinfo is not None and run.finished_at >= run.started_at
    runs = store.runs_frame()
    assert runs[["run_id", "n_cases", "n_ok", "n_failed", "run_status"]].values.tolist() == [["run-1", 2, 1, 1, "done"]]
    with pytest.raises(StoreError, match="no run"):
        store.finish_run("missing")
    with pytest.raises(StoreError, match="run status"):
        store.finish_run("run-1", status="great")
    register(store)  # resuming marks it running again, keeping its rows
    assert store.get_run("run-1").status == "running" and len(store.case_results_frame()) == 2


def test_artifacts_and_fingerprint(store):
    register(store)
    before = store.results_fingerprint()
    store.record_artifact("run-1", "model", "/m/fold0", fold="A")
    store.record_artifact("run-1", "model", "/m/fold0-v2", fold="A")
    assert store.table_frame("artifacts")[["kind", "fold", "path"]].values.tolist() == [["model", "A", "/m/fold0-v2"]]
    store.record_case_result(case_row("c000", dice=0.5))
    assert store.results_fingerprint() != before
    with pytest.raises(StoreError, match="unknown table"):
        store.table_frame("nope")


# -- jobs -------------------------------------------------------------------------------------------------------------


def test_job_queue_lifecycle(store):
    first = store.enqueue_job({"submission": "submissions/unet", "protocol": "loso"})
    second = store.enqueue_job({"submission": "submissions/b"}, kind="report")
    assert [job.status for job in store.list_jobs()] == ["queued", "queued"]
    claimed = store.claim_job("worker-1")
    assert (claimed.id, claimed.status, claimed.worker, claimed.spec) == (first, "running", "worker-1", {"submission": "submissions/unet", "protocol": "loso"})
    assert claimed.started_at is not None
    assert store.claim_job("worker-2", kinds=["run"]) is None
    assert store.claim_job("worker-2").id == second
    assert store.claim_job() is None
    store.update_job(first, log="line 1\n", run_id="run-1")
    job = store.update_job(first, log="x" * LOG_TAIL_CHARS, status="done")
    assert job.status == "done" and job.finished_at is not None and job.run_id == "run-1"
    assert len(job.log_tail) == LOG_TAIL_CHARS and job.log_tail.endswith("x")
    store.update_job(second, status="failed", error="CUDA out of memory", log_tail="tail only")
    assert store.get_job(second).log_tail == "tail only" and store.get_job(second).error == "CUDA out of memory"
    assert [job.id for job in store.list_jobs(status="failed")] == [second]
    store.update_job(second, status="queued")
    requeued = store.get_job(second)
    assert (requeued.status, requeued.worker, requeued.started_at) == ("queued", None, None)
    with pytest.raises(StoreError, match="job status"):
        store.update_job(first, status="paused")
    with pytest.raises(StoreError, match="no job"):
        store.get_job(999)


# -- concurrency: real processes ------------------------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bench.store import Store

    url, worker, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    store = Store(url)
    store.create_all()  # concurrent and idempotent
    Path(f"{go}.ready.{worker}").touch()
    while not go.exists():
        time.sleep(0.005)
    written = 0
    for i in range(n):
        # Even cases are written by both workers (the second write is a no-op), odd ones by one.
        case = i if i % 2 == 0 else n * (worker + 1) + i
        row = {"run_id": "run-1", "case_id": f"c{case:05d}", "site": "A", "status": "ok", "dice": float(worker)}
        if i % 10 == 9:  # some multi-row transactions too
            rows = [row | {"case_id": f"b{worker}-{i}-{j}"} for j in range(5)]
            written += store.record_case_results(rows, [[{"kind": "ref", "lesion_id": 1, "detected": True}]] * 5)
        written += store.record_case_result(row, [{"kind": "ref", "lesion_id": 1, "detected": True, "volume_ml": 0.1}])
    print(written)
    """
)

_CLAIMER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from bench.store import Store

    url, worker, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    store = Store(url)
    store.list_jobs(limit=1)  # connected
    Path(f"{go}.ready.{worker}").touch()
    while not go.exists():
        time.sleep(0.005)
    claimed = []
    while (job := store.claim_job(worker)) is not None:
        claimed.append(job.id)
        store.update_job(job.id, status="done", log=f"done by {worker}")
    print(json.dumps(claimed))
    """
)


def run_together(tmp_path: Path, script: str, arguments: list[list[str]]) -> list[str]:
    """Start one process per argument list, release them at once when all are ready, return their stdout.

    A script gets the start-signal path as its last argument, touches ``<signal>.ready.<worker>``
    (``worker`` being its second argument) when set up, and waits for the signal file.
    """
    go = tmp_path / f"go-{uuid.uuid4().hex}"
    env = os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    processes = [
        subprocess.Popen([sys.executable, "-c", script, *args, str(go)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in arguments
    ]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob(f"{go.name}.ready.*"))) < len(processes):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "a worker died before starting"
        time.sleep(0.01)
    go.touch()
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        outputs.append(out.strip())
    return outputs


def test_two_processes_writing_at_once_lose_and_duplicate_nothing(db_url, tmp_path):
    n = 60
    with Store(db_url) as store:
        store.create_all()
        register(store)
    outputs = run_together(tmp_path, _WRITER, [[db_url, "0", str(n)], [db_url, "1", str(n)]])
    shared, unique_per_worker, batches_per_worker = n // 2, n // 2, (n // 10) * 5
    expected = shared + 2 * (unique_per_worker + batches_per_worker)
    assert sum(int(out) for out in outputs) == expected, "each case is written exactly once"
    with Store(db_url) as store:
        frame = store.table_frame("case_results")
        assert len(frame) == expected and not frame.duplicated(["run_id", "case_id"]).any()
        lesions = store.table_frame("lesions")
        assert len(lesions) == expected and not lesions.duplicated(["run_id", "case_id", "kind", "lesion_id"]).any()


def test_two_workers_never_claim_the_same_job(db_url, tmp_path):
    with Store(db_url) as store:
        store.create_all()
        job_ids = [store.enqueue_job({"n": i}) for i in range(40)]
    outputs = run_together(tmp_path, _CLAIMER, [[db_url, "w1"], [db_url, "w2"]])
    claimed = [json.loads(out) for out in outputs]
    assert sorted(claimed[0] + claimed[1]) == job_ids, "every job claimed exactly once"
    with Store(db_url) as store:
        jobs = store.list_jobs(limit=None)
        assert {job.status for job in jobs} == {"done"}
        assert all(job.log_tail == f"done by {job.worker}" for job in jobs)


def test_metric_columns_follow_bench_metrics():
    assert METRIC_COLUMNS == tuple(METRICS)
