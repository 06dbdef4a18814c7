"""The prediction sandbox against real cheating submissions (tests/cheaters/, docs/security.md).

Each cheater is a ``python`` submission copied into tmp_path with the host paths a well-informed cheater
would know filled into its manifest's ``options``. In the sandbox every one must end in a clear
:class:`PredictionError` or a mask no better than blind (empty). Where it makes sense the same cheater
runs once with the sandbox off (``--unsafe-no-sandbox``) and does get the reference, which shows that
the trick is real and the test is not vacuous. Cases are tiny nnU-Net raw datasets from conftest's
``nnunet_raw_dataset`` factory: ``imagesTr/`` with ``labelsTr/`` beside it, as in the benchmark.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from bench.data.dataset import Case
from bench.submissions import (
    InvalidPrediction,
    PredictionCrash,
    PredictionError,
    PredictionTimeout,
    load_submission,
    write_probe_case,
)
from bench.submissions.core import PredictorOptions
from bench.submissions.manifest import parse_manifest
from bench.submissions.predictors import SubmissionPredictor, make_predictor
from bench.submissions.sandbox import (
    CEILING_LIMITS,
    DEFAULT_LIMITS,
    Limits,
    SandboxUnavailable,
    _probe,
    effective_limits,
    python_mounts,
    sandbox_unavailable_reason,
)

CHEATERS = Path(__file__).resolve().parent / "cheaters"
needs_sandbox = pytest.mark.skipif(sandbox_unavailable_reason() is not None,
                                   reason=f"bubblewrap sandbox unavailable: {sandbox_unavailable_reason()}")
HONEST = """
import numpy as np

def predict(case):
    adc, _ = case.load_channel("ADC")
    zadc, _ = case.load_channel("Z-ADC")
    return (zadc < -4.5) & (adc > 0)  # the fixture lesions have Z-ADC -5, the noise is N(0, 1)
"""


def cheater(name: str, tmp_path: Path, **options: Any) -> Path:
    """A copy of ``tests/cheaters/<name>`` with ``options`` merged into its manifest."""
    folder = shutil.copytree(CHEATERS / name, tmp_path / name)
    manifest = yaml.safe_load((folder / "submission.yaml").read_text())
    manifest["options"] = {**manifest.get("options", {}), **options}
    (folder / "submission.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder


@pytest.fixture
def case(nnunet_raw_dataset) -> Case:
    """One case of a dataset folder in the benchmark's layout (labelsTr/ next to imagesTr/)."""
    root = nnunet_raw_dataset(cases={"HOSPA_001": True, "HOSPA_002": True})
    images = root / "imagesTr"
    return Case(case_id="HOSPA_001", site="HOSPA", image_paths=(images / "HOSPA_001_0000.nii.gz", images / "HOSPA_001_0001.nii.gz"),
                label_path=root / "labelsTr" / "HOSPA_001.nii.gz")


def run(folder: Path, case: Case, *, sandbox: bool = True, time_limit_s: float | None = None) -> np.ndarray:
    submission = load_submission(folder)
    with make_predictor(submission, PredictorOptions(sandbox=sandbox, time_limit_s=time_limit_s), isolate=True) as predictor:
        return predictor.predict(case)


def assert_blind(mask: np.ndarray, case: Case) -> None:
    label = case.load_label()
    assert label.any(), "the fixture case must have a lesion"
    assert not mask.any(), f"the cheater found {int(mask.sum())} lesion voxels: it saw the reference"


# --------------------------------------------------------------------------------------------------
# reading the labels
# --------------------------------------------------------------------------------------------------


@needs_sandbox
def test_honest_submission_gets_the_right_mask_in_the_sandbox(tmp_path: Path, case: Case) -> None:
    folder = tmp_path / "honest"
    folder.mkdir()
    (folder / "predict.py").write_text(HONEST)
    (folder / "submission.yaml").write_text(yaml.safe_dump({
        "name": "honest", "version": "1", "authors": ["A. Author"], "description": "Z-ADC threshold.", "licence": "MIT",
        "kind": "python", "entry": "predict.py:predict", "time_limit_s": 60}))
    sandboxed = run(folder, case)
    np.testing.assert_array_equal(sandboxed, run(folder, case, sandbox=False))
    np.testing.assert_array_equal(sandboxed, case.load_label())


INVENTORY = """
import os
import numpy as np

def predict(case):
    inputs = sorted(os.listdir("/work/inputs"))
    assert inputs == ["0000.nii.gz", "0001.nii.gz"], f"/work/inputs holds {inputs}"
    assert [str(p) for p in case.image_paths] == ["/work/inputs/0000.nii.gz", "/work/inputs/0001.nii.gz"], case.image_paths
    leaked = sorted(k for k in os.environ if k.startswith("HIE_BENCH") or "DB" in k)
    assert not leaked and os.environ["HOME"] == "/work", f"environment: {dict(os.environ)}"
    system = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc", "dev", "tmp", "work", "submission"}
    top = set(os.listdir("/")) - system
    assert top <= ALLOWED, f"unexpected top-level entries {sorted(top)}"
    assert os.getuid() != 0 or open("/proc/self/status").read().count("CapEff:\t0000000000000000") == 1, "capabilities kept"
    with open("/work/inputs/0000.nii.gz", "ab") as handle:  # must fail: the inputs are read-only
        handle.write(b"x")
"""


@needs_sandbox
def test_the_model_sees_only_this_cases_inputs_read_only(tmp_path: Path, case: Case, nnunet_raw_dataset, monkeypatch) -> None:
    monkeypatch.setenv("HIE_BENCH_DATA_ROOT", str(case.image_paths[0].parent.parent))
    folder = tmp_path / "inventory"
    folder.mkdir()
    # Beyond the system folders only the mount points of the Python installation and the bench package
    # may show (a clean clone in CI lives under /check, a developer's under /root or /work).
    allowed = {"cache"} | {path.parts[1] for path in python_mounts()}
    (folder / "predict.py").write_text(f"ALLOWED = set({sorted(allowed)!r})\n" + INVENTORY)
    (folder / "submission.yaml").write_text(yaml.safe_dump({
        "name": "inventory", "version": "1", "authors": ["A. Author"], "description": "Looks around.", "licence": "MIT",
        "kind": "python", "entry": "predict.py:predict", "time_limit_s": 60}))
    before = case.image_paths[0].read_bytes()
    other = Case(case_id="HOSPA_002", site="HOSPA", label_path=None,
                 image_paths=tuple(p.with_name(p.name.replace("HOSPA_001", "HOSPA_002")) for p in case.image_paths))
    with make_predictor(load_submission(folder), PredictorOptions(), isolate=True) as predictor:
        for each in (case, other):  # the second case sees its own inputs only, none of the first's
            with pytest.raises(PredictionCrash, match="Read-only file system"):
                predictor.predict(each)
    assert case.image_paths[0].read_bytes() == before, "the model changed the dataset through the hard link"


@needs_sandbox
def test_label_by_relative_path(tmp_path: Path, case: Case) -> None:
    folder = cheater("label-relative", tmp_path)
    np.testing.assert_array_equal(run(folder, case, sandbox=False), case.load_label())  # the trick is real
    assert_blind(run(folder, case), case)


@needs_sandbox
def test_label_by_environment_and_absolute_path(tmp_path: Path, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = case.image_paths[0].parent.parent
    monkeypatch.setenv("HIE_BENCH_DATA_ROOT", str(dataset.parent))
    monkeypatch.setenv("HIE_BENCH_DB_URL", f"sqlite:///{dataset / 'bench.db'}")
    folder = cheater("label-from-env", tmp_path)
    np.testing.assert_array_equal(run(folder, case, sandbox=False), case.load_label())
    assert_blind(run(folder, case), case)
    # Knowing the dataset's host path does not help either: it is not mounted.
    assert_blind(run(cheater("label-from-env", tmp_path / "abs", dataset=str(dataset)), case), case)


@needs_sandbox
def test_label_through_proc(tmp_path: Path, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(case.image_paths[0].parent.parent)  # the benchmark's cwd is the dataset: /proc/<ppid>/cwd
    monkeypatch.setenv("HIE_BENCH_DATA_ROOT", str(case.image_paths[0].parent.parent))
    folder = cheater("label-from-proc", tmp_path)
    np.testing.assert_array_equal(run(folder, case, sandbox=False), case.load_label())
    assert_blind(run(folder, case), case)


@needs_sandbox
def test_label_through_the_database(tmp_path: Path, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    database = tmp_path / "results" / "bench.db"
    database.parent.mkdir()
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE cases (case_id TEXT, label_path TEXT)")
        connection.execute("INSERT INTO cases VALUES (?, ?)", (case.case_id, str(case.label_path)))
    monkeypatch.setenv("HIE_BENCH_DB_URL", f"sqlite:///{database}")
    folder = cheater("label-from-database", tmp_path, database=str(database))
    np.testing.assert_array_equal(run(folder, case, sandbox=False), case.load_label())
    assert_blind(run(folder, case), case)


@needs_sandbox
def test_a_dataset_inside_a_mounted_folder_is_refused(tmp_path: Path, nnunet_raw_dataset) -> None:
    """The sandbox mounts the submission; a dataset kept inside it would be visible, so the case is refused."""
    folder = cheater("label-relative", tmp_path)
    shutil.copytree(nnunet_raw_dataset(cases={"HOSPA_001": True}), folder / "data")
    images = folder / "data" / "imagesTr"
    inside = Case(case_id="HOSPA_001", site="HOSPA", image_paths=(images / "HOSPA_001_0000.nii.gz", images / "HOSPA_001_0001.nii.gz"),
                  label_path=folder / "data" / "labelsTr" / "HOSPA_001.nii.gz")
    with pytest.raises(SandboxUnavailable, match="which the sandbox shows to the model") as caught:
        run(folder, inside)
    assert "move the dataset" in caught.value.fix


# --------------------------------------------------------------------------------------------------
# network, processes, reply channel
# --------------------------------------------------------------------------------------------------


@needs_sandbox
def test_no_network(tmp_path: Path, case: Case) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        folder = cheater("network", tmp_path, port=server.getsockname()[1])
        with pytest.raises(PredictionCrash, match="network reachable"):
            run(folder, case, sandbox=False)  # the trick is real: the host's port answers
        server.accept()[0].close()
        assert_blind(run(folder, case), case)
        with pytest.raises(socket.timeout):
            server.accept()  # nobody connected from the sandbox


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes() and "State:\tZ" not in (entry / "status").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@needs_sandbox
def test_a_setsid_grandchild_dies_with_the_time_limit(tmp_path: Path, case: Case) -> None:
    marker = f"hiebench-grandchild-{os.getpid()}-{time.monotonic_ns()}"
    folder = cheater("grandchild", tmp_path, marker=marker)
    predictor = make_predictor(load_submission(folder), PredictorOptions(time_limit_s=8), isolate=True)
    try:
        with pytest.raises(PredictionTimeout):
            predictor.predict(case)
        alive = predictor._worker.layout.work / f"alive-{marker}"
        assert alive.exists(), "the grandchild never started: the test proves nothing"
        deadline = time.monotonic() + 10
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = _processes_with(marker)
        stamp = alive.read_text()
        time.sleep(0.5)
        assert alive.read_text() == stamp, "something still touches the grandchild's file"
    finally:
        predictor.close()
        for pid in _processes_with(marker):  # clean up before failing
            os.kill(pid, 9)
    assert not survivors, f"the grandchild outlived the time limit: pids {survivors}"


@needs_sandbox
@pytest.mark.parametrize("mode", ["garbage", "forged", "wrong-nonce", "oversized"])
def test_spoofed_replies_become_a_clear_crash(tmp_path: Path, case: Case, mode: str) -> None:
    folder = cheater("spoof-reply", tmp_path, mode=mode)
    with pytest.raises(PredictionCrash, match="reply channel") as caught:
        run(folder, case)
    assert "JSONDecodeError" not in str(caught.value)


def test_spoofed_replies_are_caught_without_the_sandbox_too(tmp_path: Path, case: Case) -> None:
    with pytest.raises(PredictionCrash, match="reply channel"):
        run(cheater("spoof-reply", tmp_path, mode="forged"), case, sandbox=False)


@needs_sandbox
@pytest.mark.parametrize("mode", ["symlink", "fifo", "huge-header"])
def test_a_forged_output_file_is_refused_without_following_or_blocking(tmp_path: Path, case: Case, mode: str) -> None:
    with pytest.raises(InvalidPrediction, match="could not be read back|not a plain file"):
        run(cheater("forge-output", tmp_path, mode=mode), case)


@needs_sandbox
def test_children_of_the_model_cannot_reach_the_reply_channel(tmp_path: Path, case: Case) -> None:
    assert_blind(run(cheater("spoof-from-child", tmp_path), case), case)


# --------------------------------------------------------------------------------------------------
# resource limits
# --------------------------------------------------------------------------------------------------


@needs_sandbox
def test_allocating_beyond_the_memory_limit_is_a_clean_failure(tmp_path: Path, case: Case) -> None:
    with pytest.raises(PredictionCrash, match="MemoryError") as caught:
        run(cheater("memory-hog", tmp_path), case)
    assert "1024 MB" in caught.value.fix and "limits.memory_mb" in caught.value.fix


@needs_sandbox
def test_spinning_past_the_cpu_limit_is_a_clean_failure(tmp_path: Path, case: Case) -> None:
    with pytest.raises(PredictionCrash, match="CPU time limit of 2 s per case"):
        run(cheater("cpu-hog", tmp_path), case)


def test_limits_take_defaults_and_are_clamped_to_the_ceilings() -> None:
    assert effective_limits(None) == DEFAULT_LIMITS
    manifest = parse_manifest({"name": "x", "version": "1", "authors": ["A"], "description": "d", "licence": "MIT",
                               "kind": "python", "entry": "p.py:predict", "limits": {"memory_mb": 10**9, "cpu_s": 5}})
    limits = effective_limits(manifest.limits)
    assert limits == Limits(memory_mb=CEILING_LIMITS.memory_mb, cpu_s=5, file_size_mb=DEFAULT_LIMITS.file_size_mb,
                            open_files=DEFAULT_LIMITS.open_files)
    for bad in ({"memory": 1}, {"cpu_s": 0}):
        with pytest.raises(ValueError):
            parse_manifest({"name": "x", "version": "1", "authors": ["A"], "description": "d", "licence": "MIT",
                            "kind": "python", "entry": "p.py:predict", "limits": bad})


@needs_sandbox
@pytest.mark.slow
def test_a_torch_model_runs_under_the_default_limits(tmp_path: Path) -> None:
    """torch reserves much address space at import; the default RLIMIT_AS must leave room for it."""
    from bench.submissions import scaffold_submission

    probe = write_probe_case(tmp_path / "probe")
    folder = scaffold_submission("net-torchscript", "torchscript", tmp_path)
    with load_submission(folder).predictor(time_limit_s=300, cache_dir=tmp_path / "cache") as predictor:
        assert predictor.sandboxed
        np.testing.assert_array_equal(predictor.predict(probe), probe.load_label())
    entries = list((tmp_path / "cache").iterdir())
    assert entries and all(".sandbox-" in p.name for p in entries), "its own cache, never the shared one (which holds labels)"


def test_folders_of_dead_owners_are_reaped_and_live_ones_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys
    import tempfile

    from bench.submissions.sandbox import SandboxLayout, reap_stale_layouts

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = ("import os, tempfile; tempfile.tempdir = os.environ['BASE']\n"
            "from bench.submissions.sandbox import SandboxLayout\nprint(SandboxLayout.create().root)\nos._exit(0)")
    dead = Path(subprocess.run([sys.executable, "-c", code], env={**os.environ, "BASE": str(tmp_path)}, capture_output=True,
                               text=True, check=True).stdout.strip())
    live = SandboxLayout.create()
    try:
        for layout_root in (dead, live.root):
            os.utime(layout_root / ".owner.lock", (0, 0))  # old enough to be judged
        assert reap_stale_layouts(tmp_path) == [dead]
        assert not dead.exists() and live.work.is_dir()
    finally:
        live.remove()


# --------------------------------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_bwrap(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("bench.submissions.sandbox.bwrap_path", lambda: None)
    _probe.cache_clear()
    yield
    monkeypatch.undo()
    _probe.cache_clear()


def test_without_bubblewrap_the_sandboxed_run_refuses_with_the_fix(tmp_path: Path, no_bwrap) -> None:
    assert sandbox_unavailable_reason() == "bubblewrap (bwrap) is not installed"
    folder = cheater("label-relative", tmp_path)
    probe = write_probe_case(tmp_path / "probe")
    predictor = load_submission(folder).predictor()
    assert isinstance(predictor, SubmissionPredictor) and predictor.sandboxed
    with predictor, pytest.raises(SandboxUnavailable) as caught:
        predictor.predict(probe)
    assert isinstance(caught.value, PredictionError)
    assert "bubblewrap (bwrap) is not installed" in caught.value.message
    assert "make system-deps" in caught.value.fix and "--unsafe-no-sandbox" in caught.value.fix
    # Opting out runs it as before, in a plain worker process.
    with make_predictor(load_submission(folder), PredictorOptions(sandbox=False), isolate=True) as unsafe:
        assert not unsafe.sandboxed and unsafe.predict(probe).dtype == bool

