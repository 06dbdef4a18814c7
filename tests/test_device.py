"""The device policy (bench.device) on a CPU machine: what ``auto`` picks and why, what a run records,
how workers are pinned to GPUs. GPUs are simulated with :class:`TorchFacts`; nothing here needs one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench import device
from bench.device import DeviceError, GpuInfo, TorchFacts, describe_environment, resolve_device, schedule_for, worker_environment

TWO_H200 = TorchFacts("2.13.0", "cuda", "12.8", True, (GpuInfo("NVIDIA H200", 143_000.0, "9.0"), GpuInfo("NVIDIA H200", 143_000.0, "9.0")), True, source="test")
CPU_BUILD = TorchFacts("2.13.0+cpu", "cpu", None)
BROKEN_DRIVER = TorchFacts("2.13.0", "cuda", "12.8", False, error="RuntimeError: CUDA driver version is insufficient")


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet) and return its stdout."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout


def test_this_machine_is_read_without_importing_torch() -> None:
    out = _fresh_python(
        "import sys, time; t = time.perf_counter(); import bench.device as d, bench.harness as h\n"
        "facts = d.torch_facts(); env = h.describe_environment(); schedule = h.resolve_schedule('auto'); peak = h.peak_memory_mb()\n"
        "print(facts.build, facts.source, env['device'], env['torch'], schedule, 'torch' in sys.modules, peak > 0)"
    )
    build, source, recorded, torch_version, schedule, imported, peak = out.split()
    import torch  # this machine's truth, asked directly

    assert build == ("cuda" if torch.version.cuda else "cpu") and torch_version == torch.__version__
    assert recorded == ("cuda" if torch.cuda.is_available() else "cpu") and schedule == ("gpu" if torch.cuda.is_available() else "cpu")
    assert imported == "False" and peak == "True"  # planning and peak memory never import torch
    if build == "cpu":
        assert source == "version.py"  # a CPU build needs no probe process at all


def test_auto_on_a_cpu_build_picks_the_cpu_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    choice = resolve_device("auto", facts=CPU_BUILD)
    assert (choice.device, choice.amp_dtype, choice.schedule) == ("cpu", None, "cpu")
    assert "CPU-only build" in choice.reason and "Installing on a CUDA machine" in choice.reason
    # The bug this policy removes: a driver (nvidia-smi) beside a CPU torch is not a GPU machine.
    monkeypatch.setattr(device.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    choice = resolve_device("auto", facts=CPU_BUILD)
    assert choice.device == "cpu" and "although an NVIDIA driver is installed" in choice.reason
    assert schedule_for("auto", facts=CPU_BUILD) == "cpu"


def test_auto_with_a_usable_gpu_picks_cuda_and_its_amp_dtype() -> None:
    choice = resolve_device("auto", facts=TWO_H200)
    assert (choice.device, choice.name, choice.amp_dtype, choice.gpu_count, choice.schedule) == ("cuda", "NVIDIA H200", "bfloat16", 2, "gpu")
    assert "sees 2 GPU(s)" in choice.reason
    assert resolve_device("cuda:1", facts=TWO_H200).device == "cuda:1"
    assert resolve_device("gpu", facts=TWO_H200).device == "cuda"
    fp16_only = TorchFacts("2.13.0", "cuda", "12.8", True, (GpuInfo("Tesla T4", 15_000.0, "7.5"),), bf16=False)
    assert resolve_device("auto", facts=fp16_only).amp_dtype == "float16"


@pytest.mark.parametrize(("requested", "facts", "message"), [
    ("cuda", CPU_BUILD, "CPU-only build"),
    ("cuda", BROKEN_DRIVER, "driver version is insufficient"),
    ("cuda:2", TWO_H200, "sees 2 GPU(s)"),
    ("tpu", TWO_H200, "use auto, cpu, cuda or cuda:N"),
])
def test_a_device_that_cannot_be_used_is_a_one_line_error_with_the_fix(requested: str, facts: TorchFacts, message: str) -> None:
    with pytest.raises(DeviceError) as error:
        resolve_device(requested, facts=facts)
    assert message in str(error.value) and "fix" in str(error.value) and "\n" not in str(error.value)


def test_a_broken_driver_makes_auto_fall_back_to_the_cpu_with_the_reason() -> None:
    choice = resolve_device("auto", facts=BROKEN_DRIVER)
    assert choice.device == "cpu" and "driver version is insufficient" in choice.reason


def test_schedules_pass_through_and_auto_follows_the_device() -> None:
    assert schedule_for("gpu", facts=CPU_BUILD) == "gpu"  # a cluster's planning node need not have the GPU
    assert schedule_for("cpu", facts=TWO_H200) == "cpu"
    assert schedule_for("auto", facts=TWO_H200) == "gpu"
    with pytest.raises(ValueError, match="use auto, cpu or gpu"):
        schedule_for("fast")


def test_the_harness_uses_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import harness

    monkeypatch.setattr(device, "torch_facts", lambda: TWO_H200)
    assert harness.resolve_schedule("auto") == "gpu"
    env = harness.describe_environment()
    assert (env["device"], env["gpu"], env["torch"], env["torch_cuda"], env["amp_dtype"], env["gpu_count"]) == ("cuda", "NVIDIA H200", "2.13.0", "12.8", "bfloat16", 2)
    monkeypatch.setattr(device, "torch_facts", lambda: CPU_BUILD)
    assert harness.resolve_schedule("auto") == "cpu"
    env = harness.describe_environment()
    assert (env["device"], env["gpu"], env["amp_dtype"]) == ("cpu", None, None) and "CPU-only" in env["device_reason"]


def test_what_a_run_records(tmp_path: Path) -> None:
    env = describe_environment(facts=TWO_H200)
    for key in ("host", "python", "cpus", "device", "gpu", "torch", "torch_cuda", "amp_dtype", "device_reason"):
        assert key in env
    from bench.store import Store

    store = Store(f"sqlite:///{tmp_path / 'bench.db'}")
    store.create_all()
    store.upsert_dataset(type("D", (), {"version": "v", "name": "d", "root": "", "channel_names": (), "cases": []})())
    store.upsert_submission(content_hash="h", name="s")
    store.start_run(run_id="r", submission="h", dataset="v", protocol="kfold", environment=env)
    record = store.get_run("r")
    assert (record.device, record.gpu_name, record.environment["torch_cuda"], record.environment["amp_dtype"]) == ("cuda", "NVIDIA H200", "12.8", "bfloat16")


def test_workers_are_pinned_round_robin_to_one_gpu_each() -> None:
    assert [worker_environment(i, 2, visible="") for i in range(4)] == [{"CUDA_VISIBLE_DEVICES": d} for d in "0101"]
    # A parent already limited to GPUs 4 and 6 spreads its workers over those two.
    assert [worker_environment(i, 2, visible="4,6")["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["4", "6", "4"]
    assert worker_environment(0, 0, visible="") == {}


def test_a_hidden_gpu_set_needs_no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert device._visible_devices_hidden()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert not device._visible_devices_hidden()


def test_the_probe_subprocess_reports_this_torch() -> None:
    import torch

    static = device._facts_from_version_file()
    started = time.perf_counter()
    facts = device._facts_from_subprocess(static)
    elapsed = time.perf_counter() - started
    assert facts.source == "subprocess" and facts.torch_version == torch.__version__
    assert facts.cuda_available == torch.cuda.is_available() and elapsed < device.PROBE_TIMEOUT_S
    print(f"probe subprocess: {elapsed:.2f} s")


@dataclass(frozen=True)
class _Fold:
    name: str


@dataclass(frozen=True)
class _Spec:
    db_url: str
    submission: Path = Path("env-unit")


@dataclass(frozen=True)
class _EnvUnit:
    """A unit that reports the GPU its worker process was pinned to (in ``error``) and its pid."""

    spec: _Spec
    run_id: str
    fold: _Fold
    cost: int = 0

    def execute(self):
        from bench.harness import UnitResult

        time.sleep(0.5)  # long enough that both pool workers get units
        return UnitResult(self.run_id, self.fold.name, error=f"{os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}")


def test_local_workers_each_see_their_own_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.harness import LocalExecutor
    from bench.store import Store

    db_url = f"sqlite:///{tmp_path / 'bench.db'}"
    Store(db_url).create_all()
    monkeypatch.setattr(device, "torch_facts", lambda: TWO_H200)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    results = LocalExecutor(2).map([_EnvUnit(_Spec(db_url), "r", _Fold(f"f{i}")) for i in range(6)])
    pinned = {}
    for result in results:
        pid, gpu = result.error.split()
        assert pinned.setdefault(pid, gpu) == gpu  # one worker, one GPU, for all its units
    assert set(pinned.values()) <= {"0", "1"} and len(set(pinned.values())) == len(pinned)


def test_parallel_workers_share_the_cpu_threads_and_keep_what_the_user_set() -> None:
    from bench.device import worker_thread_environment

    assert worker_thread_environment(2, cpus=2, environ={}) == {name: "1" for name in device.THREAD_VARIABLES}
    assert worker_thread_environment(4, cpus=16, environ={})["OMP_NUM_THREADS"] == "4"
    assert worker_thread_environment(8, cpus=2, environ={})["OMP_NUM_THREADS"] == "1"  # never zero
    assert "OMP_NUM_THREADS" not in worker_thread_environment(2, cpus=2, environ={"OMP_NUM_THREADS": "2"})


def test_units_run_longest_first_and_stably() -> None:
    from bench.harness import longest_first

    units = [_EnvUnit(_Spec("x"), "r", _Fold(name), cost) for name, cost in (("a", 0), ("b", 1), ("c", 2), ("d", 1))]
    assert [unit.fold.name for unit in longest_first(units)] == ["c", "b", "d", "a"]


# -- bench doctor -------------------------------------------------------------------------------------------


def _doctor(*args: str):
    import typer
    from typer.testing import CliRunner

    from bench.cli.doctor import doctor_command

    app = typer.Typer()
    app.command()(doctor_command)
    return CliRunner().invoke(app, list(args))


def test_doctor_tells_the_truth_about_this_machine() -> None:
    import importlib.util
    import shutil

    import torch

    from bench.doctor import diagnose

    report = diagnose()
    gpu = torch.cuda.is_available()
    assert report.check("torch").detail.startswith(torch.__version__)
    assert ("CPU-only build" in report.check("torch").detail) == (torch.version.cuda is None)
    assert report.schedule == ("gpu" if gpu else "cpu") and report.device == ("cuda" if gpu else "cpu")
    assert report.check("GPUs").detail.startswith(f"{torch.cuda.device_count()} usable" if gpu else "none usable by torch")
    assert (report.check("ray").status == "ok") == (importlib.util.find_spec("ray") is not None)
    assert (report.check("chromium").status == "ok") == any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))
    assert report.check("sandbox").status in ("ok", "warn", "info") and report.exit_code == 0
    result = _doctor()
    assert result.exit_code == 0 and f"{report.schedule} schedule" in result.output


def test_doctor_fails_when_a_required_gpu_run_cannot_happen() -> None:
    import torch

    result = _doctor("--require-gpu")
    if torch.cuda.is_available():
        assert result.exit_code == 0
    else:
        assert result.exit_code == 1 and "[FAIL] GPU run" in result.output and "fix:" in result.output


def test_doctor_checks_the_database_it_is_given(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from bench.store import Store

    assert _doctor("--db", "postgresql+psycopg://nobody@127.0.0.1:1/none").exit_code == 1
    missing = tmp_path / "none.db"
    assert _doctor("--db", f"sqlite:///{missing}").exit_code == 1 and not missing.exists()  # reported, not created
    Store(f"sqlite:///{tmp_path / 'bench.db'}").create_all()
    result = _doctor("--db", f"sqlite:///{tmp_path / 'bench.db'}")
    assert result.exit_code == 0 and "with results" in result.output
    pg = os.environ.get("HIE_BENCH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    try:
        sa.create_engine(pg, connect_args={"connect_timeout": 3}).connect().close()
    except Exception:
        pytest.skip(f"no PostgreSQL server at {pg}")
    result = _doctor("--db", pg)
    assert result.exit_code == 0 and "(postgresql)" in result.output


# -- bench perf gpu: the CPU dry run ----------------------------------------------------------------------


def test_the_full_gpu_check_refuses_to_run_for_hours_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.gpu_check import GpuCheckConfig, run_gpu_check, shipped_trainables

    monkeypatch.setattr(device, "torch_facts", lambda: CPU_BUILD)
    with pytest.raises(DeviceError, match="the full GPU check needs a GPU.*--device cpu --tiny"):
        run_gpu_check(GpuCheckConfig())
    with pytest.raises(DeviceError, match="CPU-only build"):
        run_gpu_check(GpuCheckConfig.dry_run("cuda"))
    names = [path.name for path in shipped_trainables()]
    assert names[0] == "nnunet-baseline" and "unet-monai" in names and "zadc-threshold" not in names


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_on_the_cpu(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bench.gpu_check import shipped_trainables
    from bench.cli.perf import app

    started = time.perf_counter()
    result = CliRunner().invoke(app, ["gpu", "--device", "cpu", "--tiny", "--work-dir", str(tmp_path), "--output", str(tmp_path / "gpu.csv")])
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output + repr(result.exception)
    import pandas as pd

    frame = pd.read_csv(tmp_path / "gpu.csv")
    entrants = [path.name for path in shipped_trainables()]
    assert list(frame["entrant"]) == entrants and "nnunet-baseline" in entrants
    assert (frame["device"] == "cpu").all() and frame["parity_ok"].all()
    assert (frame["train_patches_per_s"] > 0).all() and (frame["infer_s_per_case"] > 0).all()
    assert frame.loc[frame["entrant"] == "nnunet-baseline", "infer_vs_nnunet"].item() == pytest.approx(1.0)
    assert "bench perf gpu on cpu" in result.output and "parity" in result.output
    print(f"gpu check dry run: {elapsed:.1f} s for {len(entrants)} entrants")
