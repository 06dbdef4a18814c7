"""The Ray executor (bench.executors.RayExecutor) on a local Ray cluster against PostgreSQL: it stores
exactly the rows (and so the leaderboard) the local executor stores, and a Ray worker killed with -9 in
the middle of a unit loses and duplicates nothing after Ray's retry. Ray leaves no process behind."""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from support import PG_URL, write_python_submission
import sqlalchemy as sa

from bench.harness import LocalExecutor, RunSpec, run_benchmark
from bench.store import Store

ray = pytest.importorskip("ray", reason="the Ray executor needs ray (pip install -e '.[ray]')")

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[1]
ZADC = REPO / "submissions" / "zadc-threshold"
#: Columns that legitimately differ between two executions of the same unit.
VOLATILE = {"id", "prediction_path", "predict_s", "score_s", "recorded_at"}


@pytest.fixture(scope="module")
def pg_schema():
    """Factory of private PostgreSQL schemas (URLs), all dropped after the module; skip without a server."""
    try:
        admin = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        pytest.skip(f"no PostgreSQL server answers at {PG_URL} ({type(exc).__name__}); set HIE_BENCH_TEST_PG_URL to test it")
    schemas: list[str] = []

    def make() -> str:
        schemas.append(f"hie_test_{uuid.uuid4().hex[:12]}")
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schemas[-1]}"))
        return f"{PG_URL}?options=-csearch_path%3D{schemas[-1]}"

    yield make
    with admin.begin() as conn:
        for schema in schemas:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture(scope="module")
def ray_cluster():
    """A private local Ray instance with two CPUs; shut down after the module, leaving no process."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    started = {pid: command for pid in _descendants(os.getpid()) if "/ray/" in (command := _command(pid))}
    assert started, "no Ray process found under this one: the leak check would check nothing"
    ray.shutdown()
    deadline = time.monotonic() + 20
    while (alive := [pid for pid in started if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"Ray left processes behind: {[started[pid] for pid in alive]}"


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.data.synth import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("ray") / "hie-tiny"
    generate_synthetic_dataset(root, cases=6, sites=2, seed=3, size="tiny", workers=1)
    return root


def _rows(db_url: str, table: str) -> list[tuple]:
    """Every row of ``table`` without the columns that differ between executions, sorted."""
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        result = conn.execute(sa.text(f"SELECT * FROM {table}"))
        keep = [i for i, name in enumerate(result.keys()) if name not in VOLATILE]
        rows = sorted((tuple(row[i] for i in keep) for row in result), key=repr)
    engine.dispose()
    return rows


def test_ray_stores_exactly_the_rows_the_local_executor_stores(ray_cluster, pg_schema, dataset_dir: Path, tmp_path: Path) -> None:
    from bench.executors import RayExecutor
    from bench.report import leaderboard_table

    low_adc = write_python_submission(tmp_path / "low-adc", """\
        def predict(case):
            adc, _ = case.load_channel("ADC")
            return (adc > 0) & (adc < 900)
        """, "low-adc")
    urls = {"local": pg_schema(), "ray": pg_schema()}
    results = {}
    for name, executor in (("local", LocalExecutor(1)), ("ray", RayExecutor())):
        specs = [RunSpec(submission=path, dataset=dataset_dir, protocol=protocol, folds=2, results_dir=tmp_path / name, db_url=urls[name])
                 for path in (ZADC, low_adc) for protocol in ("kfold", "loso")]
        results[name] = run_benchmark(specs, executor=executor)
    ray_units = [r for units in results["ray"].values() for r in units]
    assert len(ray_units) == 8 and not any(r.error for r in ray_units) and sum(r.scored for r in ray_units) == 24
    assert results["ray"].keys() == results["local"].keys()  # the same run ids
    for table in ("case_results", "lesions"):
        assert _rows(urls["ray"], table) == _rows(urls["local"], table), table
    assert len(_rows(urls["ray"], "case_results")) == 24  # 2 submissions x 2 protocols x 6 cases, each once
    boards = [leaderboard_table(Store(urls[name]), n_boot=50) for name in ("local", "ray")]
    assert boards[0].equals(boards[1])
    assert Store(urls["ray"]).list_leases() == []


def test_a_ray_worker_killed_mid_unit_loses_and_duplicates_nothing(ray_cluster, pg_schema, dataset_dir: Path, tmp_path: Path) -> None:
    from bench.executors import RayExecutor

    slow = write_python_submission(tmp_path / "slow", """\
        import time
        def predict(case):
            time.sleep(1.0)
            zadc, _ = case.load_channel("Z-ADC")
            return zadc < -2
        """, "slow-threshold")
    db_url = pg_schema()
    store = Store(db_url)
    spec = RunSpec(submission=slow, dataset=dataset_dir, protocol="kfold", folds=2, results_dir=tmp_path, db_url=db_url)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(run_benchmark([spec], executor=RayExecutor(max_retries=3))))
    runner.start()
    victim, before = _wait_for_a_unit_half_done(store, deadline_s=90)
    os.kill(victim["pid"], signal.SIGKILL)
    retry = None
    while runner.is_alive() and retry is None:  # Ray's retry, on a new worker, takes the dead worker's lease over
        held = store.get_lease(victim["resource"])
        retry = held if held is not None and held["token"] != victim["token"] else None
        time.sleep(0.05)
    runner.join(timeout=180)
    assert not runner.is_alive()
    assert retry is not None and retry["pid"] != victim["pid"] and retry["claims"] == 2
    units = [r for results in outcome.values() for r in results]
    assert len(units) == 2 and not any(r.error for r in units), [r.error for r in units]
    rows = store.case_results_frame()
    assert len(rows) == 6 and rows["case_id"].is_unique and (rows["status"] == "ok").all()
    # The cases stored before the kill were not predicted again by the retry: their files are untouched.
    assert {case: Path(path).stat().st_mtime_ns for case, (path, _) in before.items()} == {case: mtime for case, (_, mtime) in before.items()}
    assert not _alive(victim["pid"]) and store.list_leases() == []


def _wait_for_a_unit_half_done(store: Store, deadline_s: float) -> tuple[dict, dict[str, tuple[str, int]]]:
    """A held unit lease whose fold has some, not all, of its 3 cases stored; those cases' files and mtimes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            frame = store.case_results_frame()
            leases = store.list_leases("unit:")
        except sa.exc.SQLAlchemyError:  # tables not created yet
            continue
        for lease in leases:
            done = frame[frame["fold"] == lease["resource"].rsplit(":", 1)[1]]
            if 1 <= len(done) < 3 and not lease["expired"]:
                return lease, {row.case_id: (row.prediction_path, Path(row.prediction_path).stat().st_mtime_ns) for row in done.itertuples()}
    raise AssertionError("no unit was seen half done")


def _descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    from bench.leases import _process_alive

    return _process_alive(pid)


def test_training_units_ask_for_a_gpu_only_on_the_gpu_schedule(ray_cluster, dataset_dir: Path, tmp_path: Path) -> None:
    from bench.data.splits import Fold
    from bench.executors import RayExecutor, RayUnavailable, _needs_gpu
    from bench.harness import FoldUnit

    def unit(submission: Path, schedule: str) -> FoldUnit:
        spec = RunSpec(submission=submission, dataset=dataset_dir, schedule=schedule, results_dir=tmp_path, db_url=f"sqlite:///{tmp_path / 'b.db'}")
        return FoldUnit(spec, "r", Fold("kfold-0", train=("a",), test=("b",)))

    unet = REPO / "submissions" / "unet-monai"
    assert _needs_gpu(unit(unet, "gpu")) and not _needs_gpu(unit(unet, "cpu")) and not _needs_gpu(unit(ZADC, "gpu"))
    assert RayExecutor().schedule_for("auto") == ("gpu" if ray.cluster_resources().get("GPU") else "cpu")
    if not ray.cluster_resources().get("GPU"):  # this cluster has no GPU: refused at once, not left pending forever
        with pytest.raises(RayUnavailable, match="has no GPU"):
            RayExecutor().map([unit(unet, "gpu")])
