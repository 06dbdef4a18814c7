"""Every CLI error is one line with its fix, never a traceback; ``--debug`` shows the traceback (issue 17).

The cases the adversarial run found crashing: ``bench evaluate --out`` with an unknown suffix or a
folder, a malformed ``--db`` URL, and ``bench submission verify --dataset`` on a dataset whose image
header overflows (reported together with the submission's own static errors). And: no library module
imports the CLI framework (issue 11), which the last test checks by walking the package's sources.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import adversarial as adv
from bench.cli import app

REPO = Path(__file__).resolve().parents[1]


def _masks(tmp_path: Path) -> tuple[Path, Path]:
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    for folder in (pred, ref):
        adv.write(folder / "case1.nii.gz", adv.label_array())
    return pred, ref


def _overflowing_nifti(path: Path) -> Path:
    """A gzipped NIfTI whose header declares 32767^3 float voxels (and holds 64 bytes)."""
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((32767, 32767, 32767))
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 68))
    return path


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output and lines and lines[-1].startswith("error:"), result.output
    return lines[-1]


@pytest.mark.parametrize("out", ["table.xlsx", "folder"])
def test_evaluate_out_with_an_unknown_suffix_or_a_folder_is_one_line(tmp_path: Path, out: str) -> None:
    pred, ref = _masks(tmp_path)
    (tmp_path / "folder").mkdir()
    line = _one_line_error(CliRunner().invoke(app, ["evaluate", str(pred), str(ref), "--out", str(tmp_path / out)], env={"COLUMNS": "250"}))
    assert "--out" in line and ".csv or .parquet" in line


def test_a_malformed_database_url_is_one_line(tmp_path: Path) -> None:
    bad = "postgresql+nodriver://x@/y"
    for arguments in (["leaderboard", "--db", bad], ["export", str(tmp_path / "x.csv"), "--db", bad], ["worker", "--db", bad, "--once"]):
        result = CliRunner().invoke(app, arguments, env={"COLUMNS": "250"})
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output
        assert any(bad in line and "fix: use sqlite" in line and "internal error" not in line for line in lines), result.output


def test_debug_shows_the_traceback_of_the_same_error(tmp_path: Path) -> None:
    pred, ref = _masks(tmp_path)
    command = [sys.executable, "-m", "bench.cli", "evaluate", str(pred), str(ref), "--out", str(tmp_path / "t.xlsx")]
    plain = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr + plain.stdout
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_verify_dataset_reports_an_overflowing_header_beside_the_static_errors(tmp_path: Path) -> None:
    from bench.data.synth import generate_synthetic_dataset
    from support import write_python_submission

    dataset = generate_synthetic_dataset(tmp_path / "data", cases=4, sites=2, seed=0, size="tiny", workers=1)
    _overflowing_nifti(dataset.cases[0].image_paths[0])  # the file the dataset lists, now hostile
    submission = write_python_submission(tmp_path / "sub", "def predict(case):\n    return None\n", "sub")
    (submission / "predict.py").unlink()  # a static error: the entry file is missing
    result = CliRunner().invoke(app, ["submission", "verify", str(submission), "--dataset", str(dataset.root)], env={"COLUMNS": "250"})
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "predict.py" in result.output, result.output
    assert "over the limit" in result.output or "overflow" in result.output.lower(), result.output


def test_no_library_module_imports_the_cli_framework() -> None:
    offenders = []
    for path in sorted((REPO / "bench").rglob("*.py")):
        if "cli" in path.relative_to(REPO / "bench").parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name == "typer" or name.startswith("typer.") or name in ("click",) for name in names):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == [], f"typer/click imported outside bench/cli/: {offenders}"


def test_sigterm_unwinds_and_leaves_no_temporary_folders(tmp_path: Path) -> None:
    """`timeout` or a scheduler stopping `bench submission verify` mid-probe: the probe's and the sandbox's
    temporary folders are removed, as on Ctrl-C."""
    import os
    import signal
    import time

    from support import write_python_submission

    slow = write_python_submission(tmp_path / "slow", "import time\n\ndef predict(case):\n    time.sleep(60)\n", "slow")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "bench.cli", "submission", "verify", str(slow)], cwd=REPO,
                               env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not list(scratch.glob("hiebench-probe-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(scratch.glob("hiebench-probe-*")), "the probe started"
    time.sleep(2.0)  # the predictor is running
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode != 0
    assert not list(scratch.glob("hiebench-probe-*")) and not [p for p in scratch.glob("hiebench-sandbox-*") if p.is_dir()], \
        sorted(p.name for p in scratch.iterdir())


def test_a_models_error_is_one_bounded_line_naming_where_it_was_raised() -> None:
    from bench.submissions.predictors import MAX_ERROR_CHARS, describe_exception

    def predict():
        raise RuntimeError("x" * 5000 + "\nsecond line")

    try:
        predict()
    except RuntimeError as exc:
        text = describe_exception(exc)
    assert "\n" not in text and len(text) < MAX_ERROR_CHARS + 200
    assert text.startswith("RuntimeError: xxx") and "(5,012 characters)" in text and "in predict" in text
