"""Tests of the submission contract: manifests, kinds, verify, scaffolding and safe archives.

Models here are tiny Python files, TorchScript/ONNX graphs and MONAI networks written into tmp_path;
cases are the built-in probe (bench.submissions.probe) or a two-case dataset folder written with
bench.imageio. Python submissions always run in a worker process, so crash and timeout tests exercise
the real isolation.
"""

from __future__ import annotations

import json
import stat
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from bench.data.dataset import Case
from bench.imageio import write_image
from bench.preprocess import PreprocessingConfig
from bench.cli.submission import app
from bench.submissions import (
    PROBE_CASE_ID,
    ArchiveError,
    ArchiveLimits,
    MissingPrediction,
    PredictionTimeout,
    SubmissionError,
    add_submission_archive,
    content_hash,
    load_submission,
    scaffold_submission,
    verify_submission,
    write_probe_case,
)
from bench.submissions.probe import probe_arrays, probe_geometry

REPO = Path(__file__).resolve().parent.parent
BASE = {"name": "demo", "version": "1.0", "authors": ["A. Author"], "description": "A test model.", "licence": "MIT"}
BASELINE = """
    import numpy as np

    def predict(case, threshold=-2.0):
        adc, _ = case.load_channel("ADC")
        zadc, _ = case.load_channel("Z-ADC")
        return (zadc < threshold) & (adc > 0)
"""


def write_submission(folder: Path, manifest: dict[str, Any], files: dict[str, str | bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "submission.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    for name, content in (files or {}).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content))
    return folder


def python_submission(folder: Path, code: str = BASELINE, **fields: Any) -> Path:
    manifest = {**BASE, "kind": "python", "entry": "predict.py:predict", "time_limit_s": 30, **fields}
    return write_submission(folder, manifest, {"predict.py": code})


def errors(problems) -> list:
    return [p for p in problems if p.severity == "error"]


def problem_text(problems) -> str:
    return "\n".join(str(p) for p in problems)


@pytest.fixture
def probe(tmp_path: Path) -> Case:
    return write_probe_case(tmp_path / "probe")


def write_dataset(root: Path, case_ids: tuple[str, ...] = ("case-a", "case-b")) -> Path:
    """A minimal HIE-Bench dataset folder (nnU-Net raw layout + cases.csv) of probe-like cases."""
    geometry = probe_geometry()
    for seed, case_id in enumerate(case_ids):
        adc, zadc, lesion = probe_arrays(seed=seed)
        write_image(adc, geometry, root / "imagesTr" / f"{case_id}_0000.nii.gz")
        write_image(zadc, geometry, root / "imagesTr" / f"{case_id}_0001.nii.gz")
        write_image(lesion.astype(np.uint8), geometry, root / "labelsTr" / f"{case_id}.nii.gz")
    meta = {"channel_names": {"0": "ADC", "1": "Z-ADC"}, "labels": {"background": 0, "lesion": 1},
            "numTraining": len(case_ids), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "cases.csv").write_text("case_id,site\n" + "".join(f"{c},A\n" for c in case_ids))
    return root


# --------------------------------------------------------------------------------------------------
# manifests
# --------------------------------------------------------------------------------------------------


def test_valid_manifest_loads_with_defaults(tmp_path: Path) -> None:
    folder = python_submission(tmp_path / "ok")
    submission = load_submission(folder)
    assert submission.kind == "python" and submission.name == "demo"
    assert submission.manifest.inputs.space == "native" and submission.manifest.inputs.channels == ("ADC", "Z-ADC")
    assert submission.preprocessing is None and submission.preprocessing_id == "native"


def test_license_spelling_is_accepted(tmp_path: Path) -> None:
    manifest = {**BASE, "kind": "predictions"}
    manifest["license"] = manifest.pop("licence")
    assert load_submission(write_submission(tmp_path / "s", manifest)).manifest.licence == "MIT"


@pytest.mark.parametrize(
    ("manifest", "where", "fix"),
    [
        ({"kind": "python", "entry": "predict.py:predict"}, "name", "add 'name'"),
        ({**BASE, "kind": "python"}, "entry", "add 'entry'"),
        ({**BASE, "kind": "python", "entry": "predict.py:predict", "entrypoint": "x"}, "entrypoint", "remove 'entrypoint'"),
        ({**BASE, "kind": "docker"}, "kind", "python"),
        ({**BASE}, "kind", "set 'kind'"),
        ({**BASE, "name": "Bad Name!", "kind": "predictions"}, "name", "lower-case"),
        ({**BASE, "authors": [], "kind": "predictions"}, "authors", "authors"),
        ({**BASE, "kind": "python", "entry": "predict"}, "entry", "entry"),
        ({**BASE, "kind": "python", "entry": "p.py:predict", "preprocessing": {}}, "(top level)", "docs"),
        ({**BASE, "kind": "torchscript", "patch_size": [8, 8, 8], "inputs": {"space": "native"}}, "(top level)", "docs"),
        ({**BASE, "kind": "nnunet", "inputs": {"space": "preprocessed"}}, "(top level)", "docs"),
        ({**BASE, "kind": "trainable"}, "recipe", "add 'recipe'"),
        ({**BASE, "kind": "trainable", "recipe": [1, 2]}, "recipe", "recipe"),
        ({**BASE, "kind": "onnx"}, "patch_size", "add 'patch_size'"),
    ],
)
def test_bad_manifests_are_rejected_with_a_fix(tmp_path: Path, manifest: dict, where: str, fix: str) -> None:
    folder = write_submission(tmp_path / "bad", manifest)
    with pytest.raises(SubmissionError) as caught:
        load_submission(folder)
    problems = caught.value.problems
    assert any(where in p.where and fix in (p.fix + p.message) for p in problems), problem_text(problems)
    assert verify_submission(folder) == problems


def test_unparseable_or_missing_manifests(tmp_path: Path) -> None:
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "submission.yaml").write_text("name: [unclosed\n")
    assert "not valid YAML" in problem_text(verify_submission(tmp_path / "yaml"))
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "submission.yaml").write_text("- a\n- b\n")
    assert "must be a mapping" in problem_text(verify_submission(tmp_path / "list"))
    (tmp_path / "empty").mkdir()
    assert "missing" in problem_text(verify_submission(tmp_path / "empty"))
    assert "not a folder" in problem_text(verify_submission(tmp_path / "nowhere"))


def test_preprocessed_inputs_get_the_standard_or_declared_preprocessing(tmp_path: Path) -> None:
    standard = load_submission(python_submission(tmp_path / "a", inputs={"space": "preprocessed"}))
    assert standard.preprocessing == PreprocessingConfig() and standard.preprocessing_id == PreprocessingConfig().id
    custom = load_submission(python_submission(
        tmp_path / "b", inputs={"channels": ["Z-ADC"], "space": "preprocessed"},
        preprocessing={"channels": ["Z-ADC"], "target_spacing": [2.0, 1.0, 1.0]}))
    assert custom.preprocessing.target_spacing == (2.0, 1.0, 1.0) and custom.preprocessing_id == custom.preprocessing.id
    with pytest.raises(SubmissionError, match="must equal inputs.channels"):
        load_submission(python_submission(tmp_path / "c", inputs={"space": "preprocessed"}, preprocessing={"channels": ["Z-ADC"]}))


def test_trainable_manifest_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.models

    recipe = {"trainer": "monai", "schedules": {"cpu": {"epochs": 1}}}
    folder = write_submission(tmp_path / "t", {**BASE, "kind": "trainable", "recipe": recipe})
    submission = load_submission(folder)
    assert submission.manifest.recipe == recipe
    assert submission.preprocessing_id == PreprocessingConfig().id
    with pytest.raises(SubmissionError, match="no predictor before training"):
        submission.predictor()

    calls: list[dict] = []

    def fake_build_trainable(recipe, *, submission_dir, preprocessing, schedule="auto", **options):
        calls.append({"recipe": recipe, "dir": submission_dir, "preprocessing": preprocessing, "schedule": schedule, **options})
        if schedule == "gpu":
            raise ValueError("the recipe has no 'gpu' schedule")
        return object()

    monkeypatch.setattr(bench.models, "build_trainable", fake_build_trainable)
    submission.trainable(schedule="cpu", cache_dir=tmp_path / "cache")
    assert calls[-1] == {"recipe": recipe, "dir": submission.path, "preprocessing": PreprocessingConfig(),
                         "schedule": "cpu", "cache_dir": tmp_path / "cache"}
    problems = verify_submission(folder)
    assert not errors(problems) and "cannot be trained with schedule 'gpu'" in problem_text(problems)
    assert len(calls) == 3, "verify builds each schedule's trainable and trains nothing"


def test_trainable_recipes_rejected_by_the_models_package(tmp_path: Path) -> None:
    folder = write_submission(tmp_path / "t", {**BASE, "kind": "trainable", "recipe": {"trainer": "bogus"}})
    problems = verify_submission(folder)
    assert errors(problems) and problems[0].where == "submission.yaml: recipe"


# --------------------------------------------------------------------------------------------------
# content hash
# --------------------------------------------------------------------------------------------------


def test_content_hash_covers_paths_and_bytes_but_not_caches(tmp_path: Path) -> None:
    folder = python_submission(tmp_path / "h")
    first = content_hash(folder)
    assert first == load_submission(folder).content_hash and len(first) == 64
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "predict.cpython-311.pyc").write_bytes(b"cache")
    assert content_hash(folder) == first
    (folder / "predict.py").write_text((folder / "predict.py").read_text() + "\n# edit\n")
    edited = content_hash(folder)
    assert edited != first
    (folder / "predict.py").rename(folder / "other.py")
    assert content_hash(folder) != edited


def test_running_a_python_submission_keeps_its_hash(tmp_path: Path, probe: Case) -> None:
    submission = load_submission(python_submission(tmp_path / "h"))
    before = content_hash(submission.path)
    with submission.predictor() as predictor:
        predictor.predict(probe)
    assert content_hash(submission.path) == before


# --------------------------------------------------------------------------------------------------
# the shipped examples and the CLI
# --------------------------------------------------------------------------------------------------


def test_zadc_threshold_example_passes_verify_cli() -> None:
    result = CliRunner().invoke(app, ["verify", str(REPO / "submissions" / "zadc-threshold")])
    assert result.exit_code == 0, result.output
    assert "passes verification" in result.output


def test_zadc_threshold_finds_the_probe_lesions(probe: Case) -> None:
    with load_submission(REPO / "submissions" / "zadc-threshold").predictor() as predictor:
        mask = predictor.predict(probe)
    np.testing.assert_array_equal(mask, probe.load_label())


def test_example_predictions_pass_verify() -> None:
    assert verify_submission(REPO / "submissions" / "example-predictions") == []


def test_example_predictions_helper_fills_a_dataset(tmp_path: Path) -> None:
    import runpy
    import shutil

    dataset = write_dataset(tmp_path / "data")
    example = tmp_path / "example-predictions"
    shutil.copytree(REPO / "submissions" / "example-predictions", example)
    helper = runpy.run_path(str(example / "make_predictions.py"))
    helper["main"](str(dataset), str(REPO / "submissions" / "zadc-threshold"))
    assert sorted(p.name for p in (example / "predictions").iterdir()) == [
        "case-a.nii.gz", "case-b.nii.gz", f"{PROBE_CASE_ID}.nii.gz"]
    assert verify_submission(example, dataset=dataset) == []


def test_verify_cli_fails_with_the_fix(tmp_path: Path) -> None:
    folder = write_submission(tmp_path / "bad", {**BASE, "kind": "python", "entry": "predict.py:predict", "colour": "red"})
    result = CliRunner().invoke(app, ["verify", str(folder)])
    assert result.exit_code == 1
    assert "colour" in result.output and "remove" in result.output and "FAILED" in result.output


# --------------------------------------------------------------------------------------------------
# python kind: isolation, time limit, output checks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("def predict(case):\n    raise ValueError('weights file corrupt')\n", "weights file corrupt"),
        ("import os\ndef predict(case):\n    os._exit(3)\n", "process died (exit code 3)"),
        ("raise ImportError('no module named secret_sauce')\ndef predict(case):\n    pass\n", "loading the model failed"),
        ("import numpy as np\ndef predict(case):\n    return np.zeros((32, 32, 8), bool)\n", "axes look reversed"),
        ("import numpy as np\ndef predict(case):\n    return np.full((8, 32, 32), 0.7)\n", "values other than 0 and 1"),
        ("def predict(case):\n    return [[0]]\n", "returned list"),
        ("import numpy as np\ndef predict(case):\n    return np.random.default_rng().random((8, 32, 32)) > 0.5\n", "non-deterministic"),
        ("import time\ndef predict(case):\n    time.sleep(60)\n", "time limit of 2 s"),
    ],
    ids=["raises", "dies", "import-fails", "transposed", "probabilities", "list", "random", "hangs"],
)
def test_verify_rejects_broken_python_models(tmp_path: Path, code: str, expected: str) -> None:
    folder = python_submission(tmp_path / "m", code, time_limit_s=2)
    problems = verify_submission(folder)
    assert errors(problems) and expected in problem_text(problems), problem_text(problems)


def test_worker_recovers_after_a_timeout(tmp_path: Path, probe: Case) -> None:
    code = """
        import time
        import numpy as np
        def predict(case):
            if case.case_id == "slow":
                time.sleep(60)
            return np.zeros(case.geometry.shape, bool)
    """
    slow = write_probe_case(tmp_path / "slow", case_id="slow")
    with load_submission(python_submission(tmp_path / "m", code, time_limit_s=2.0)).predictor() as predictor:
        with pytest.raises(PredictionTimeout) as caught:
            predictor.predict(slow)
        assert caught.value.case_id == "slow"
        assert not predictor.predict(probe).any(), "a fresh worker serves the next case"


def test_models_never_see_the_answer_and_may_print(tmp_path: Path, probe: Case) -> None:
    code = """
        import numpy as np
        def predict(case):
            print("hello from the model")  # must not break the worker protocol
            assert case.label_path is None, "the label leaked"
            assert not case.metadata, "the case table leaked"
            return np.zeros(case.geometry.shape, np.uint8)
    """
    with load_submission(python_submission(tmp_path / "m", code)).predictor() as predictor:
        mask = predictor.predict(probe)
    assert mask.dtype == bool and mask.shape == probe.geometry.shape


def test_python_model_on_preprocessed_inputs_is_mapped_back(tmp_path: Path, probe: Case) -> None:
    code = """
        def predict(case, threshold=-2.0):
            assert case.image.shape[0] == 1 and case.channel_names == ("Z-ADC",)
            return (case.image[0] < threshold) & case.brain_mask
    """
    folder = python_submission(tmp_path / "m", code, inputs={"channels": ["Z-ADC"], "space": "preprocessed"},
                               preprocessing={"channels": ["Z-ADC"], "orientation": "LPS"})
    with load_submission(folder).predictor(cache_dir=tmp_path / "cache") as predictor:
        mask = predictor.predict(probe)
    np.testing.assert_array_equal(mask, probe.load_label())
    assert list((tmp_path / "cache").glob("*/hiebench-probe.*.npz"))


def test_python_entry_points_are_checked_statically(tmp_path: Path) -> None:
    missing_file = python_submission(tmp_path / "a", entry="model.py:predict")
    assert "entry file 'model.py' not found" in problem_text(verify_submission(missing_file))
    missing_function = python_submission(tmp_path / "b", "def run(case):\n    pass\n")
    assert "defines no top-level 'predict'" in problem_text(verify_submission(missing_function))
    syntax = python_submission(tmp_path / "c", "def predict(case)\n")
    assert "cannot be parsed" in problem_text(verify_submission(syntax, run_model=False))
    escaping = python_submission(tmp_path / "d", entry="../outside.py:predict")
    assert "outside the submission folder" in problem_text(verify_submission(escaping))


def test_module_entry_points_import_siblings(tmp_path: Path, probe: Case) -> None:
    files = {
        "mymodel/__init__.py": "",
        "mymodel/core.py": "from mymodel.rules import rule\ndef predict(case):\n    return rule(case)\n",
        "mymodel/rules.py": BASELINE.replace("def predict(case, threshold=-2.0)", "def rule(case, threshold=-2.0)"),
    }
    folder = write_submission(tmp_path / "m", {**BASE, "kind": "python", "entry": "mymodel.core:predict"}, files)
    assert verify_submission(folder) == []


def test_symlinks_inside_a_submission_are_errors(tmp_path: Path) -> None:
    folder = python_submission(tmp_path / "m")
    (folder / "weights.bin").symlink_to("/etc/hostname")
    assert "symbolic link" in problem_text(verify_submission(folder, run_model=False))


# --------------------------------------------------------------------------------------------------
# predictions kind
# --------------------------------------------------------------------------------------------------


def predictions_submission(folder: Path, masks: dict[str, np.ndarray], geometry=None) -> Path:
    write_submission(folder, {**BASE, "kind": "predictions"})
    for case_id, mask in masks.items():
        write_image(mask.astype(np.uint8), geometry or probe_geometry(), folder / "predictions" / f"{case_id}.nii.gz")
    return folder


def test_predictions_against_a_dataset(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "data")
    _, _, lesion = probe_arrays(seed=0)
    folder = predictions_submission(tmp_path / "p", {"case-a": lesion})
    problems = verify_submission(folder, dataset=dataset)
    assert "no mask for 1 of 2 dataset cases: case-b" in problem_text(problems)
    from bench.data.dataset import Dataset

    cases = Dataset.load(dataset)
    with load_submission(folder).predictor() as predictor:
        np.testing.assert_array_equal(predictor.predict(cases.case("case-a")), lesion)
        with pytest.raises(MissingPrediction, match="case-b"):
            predictor.predict(cases.case("case-b"))
    write_image(lesion.astype(np.uint8), probe_geometry(), folder / "predictions" / "case-b.nii.gz")
    assert verify_submission(folder, dataset=dataset) == []


def test_predictions_on_the_wrong_grid_or_with_labels_are_rejected(tmp_path: Path, probe: Case) -> None:
    _, _, lesion = probe_arrays()
    shifted = probe_geometry(origin=(0.0, 0.0, 0.0))
    wrong_grid = predictions_submission(tmp_path / "g", {PROBE_CASE_ID: lesion}, geometry=shifted)
    assert "not on the case's grid: origin" in problem_text(verify_submission(wrong_grid))
    multi_label = predictions_submission(tmp_path / "l", {PROBE_CASE_ID: lesion.astype(np.uint8) * 2})
    assert "label values other than 0 and 1" in problem_text(verify_submission(multi_label))
    empty = write_submission(tmp_path / "e", {**BASE, "kind": "predictions"}, {"predictions/notes.txt": "todo"})
    text = problem_text(verify_submission(empty))
    assert "contains no prediction masks" in text and "not an image file" in text
    no_folder = write_submission(tmp_path / "n", {**BASE, "kind": "predictions"})
    assert "prediction folder 'predictions' not found" in problem_text(verify_submission(no_folder))


# --------------------------------------------------------------------------------------------------
# scaffolding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["python", "predictions"])
def test_new_scaffolds_a_folder_that_verifies_cli(tmp_path: Path, kind: str) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["new", f"my-{kind}", "--kind", kind, "--dir", str(tmp_path), "--author", "Ada", "--description", "A test model."])
    assert result.exit_code == 0, result.output
    folder = tmp_path / f"my-{kind}"
    assert load_submission(folder).manifest.authors == ["Ada"]
    result = runner.invoke(app, ["verify", str(folder)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_network_scaffolds_verify_and_find_the_lesions(tmp_path: Path, kind: str, probe: Case) -> None:
    folder = scaffold_submission(f"net-{kind}", kind, tmp_path, authors=["Ada"], description="A test model.")
    # In this process: the worker start-up (torch + MONAI imports) is covered by the python-kind tests.
    assert verify_submission(folder, isolate=False) == []
    with load_submission(folder).predictor(isolate=False) as predictor:
        np.testing.assert_array_equal(predictor.predict(probe), probe.load_label())


def test_new_refuses_bad_requests(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["new", "x", "--kind", "docker", "--dir", str(tmp_path)]).exit_code == 1
    assert runner.invoke(app, ["new", "Bad Name", "--kind", "python", "--dir", str(tmp_path)]).exit_code == 1
    assert runner.invoke(app, ["new", "twice", "--kind", "python", "--dir", str(tmp_path)]).exit_code == 0
    result = runner.invoke(app, ["new", "twice", "--kind", "python", "--dir", str(tmp_path)])
    assert result.exit_code == 1 and "already exists" in result.output


# --------------------------------------------------------------------------------------------------
# archives
# --------------------------------------------------------------------------------------------------


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def test_add_installs_a_valid_archive(tmp_path: Path) -> None:
    source = python_submission(tmp_path / "source")
    archive = zip_folder(source, tmp_path / "demo.zip", prefix="demo-1.0/")
    target, warnings = add_submission_archive(archive, tmp_path / "submissions")
    assert target == tmp_path / "submissions" / "demo" and warnings == []
    assert content_hash(target) == content_hash(source)
    assert [p.name for p in (tmp_path / "submissions").iterdir()] == ["demo"], "no staging folder left behind"
    with pytest.raises(SubmissionError, match="already exists"):
        add_submission_archive(archive, tmp_path / "submissions")
    (source / "predict.py").write_text((source / "predict.py").read_text() + "\n# v2\n")
    target, _ = add_submission_archive(zip_folder(source, tmp_path / "v2.zip"), tmp_path / "submissions", replace=True)
    assert "# v2" in (target / "predict.py").read_text()


def _crafted(archive: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("submission.yaml", yaml.safe_dump({**BASE, "kind": "python", "entry": "predict.py:predict"}))
        zf.writestr("predict.py", "def predict(case):\n    pass\n")
        for info, data in members:
            zf.writestr(info, data)
    return archive


def _symlink_member(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("members", "limits", "message"),
    [
        ([("../escaped.py", b"print('pwned')")], ArchiveLimits(), "'..'"),
        ([("models/../../escaped.py", b"x")], ArchiveLimits(), "'..'"),
        ([("/tmp/absolute.py", b"x")], ArchiveLimits(), "absolute path"),
        ([("C:/windows.py", b"x")], ArchiveLimits(), "absolute path"),
        ([(_symlink_member("weights.pt", "/etc/passwd"), b"/etc/passwd")], ArchiveLimits(), "symbolic link"),
        ([(f"f{i}.txt", b"x") for i in range(5)], ArchiveLimits(max_files=4), "more than the limit of 4"),
        ([("big.bin", b"0" * 5000)], ArchiveLimits(max_total_bytes=4000), "more than the limit of 4000"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "drive-letter", "symlink", "too-many", "too-big"],
)
def test_add_rejects_unsafe_archives(tmp_path: Path, members: list, limits: ArchiveLimits, message: str) -> None:
    archive = _crafted(tmp_path / "evil.zip", members)
    submissions = tmp_path / "deep" / "submissions"
    with pytest.raises(ArchiveError) as caught:
        add_submission_archive(archive, submissions, limits=limits)
    assert message in problem_text(caught.value.problems)
    assert not (tmp_path / "deep" / "escaped.py").exists() and not (tmp_path / "escaped.py").exists()
    assert not submissions.exists() or not list(submissions.iterdir()), "nothing is written"


def test_add_rejects_archives_without_a_valid_submission(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "nomanifest.zip", "w") as zf:
        zf.writestr("model.pt", b"x")
    with pytest.raises(ArchiveError, match="no submission.yaml"):
        add_submission_archive(tmp_path / "nomanifest.zip", tmp_path / "subs")
    invalid = write_submission(tmp_path / "invalid", {**BASE, "kind": "python", "entry": "missing.py:predict"})
    with pytest.raises(SubmissionError, match="entry file 'missing.py' not found"):
        add_submission_archive(zip_folder(invalid, tmp_path / "invalid.zip"), tmp_path / "subs")
    assert not list((tmp_path / "subs").iterdir())
    (tmp_path / "notzip.zip").write_text("hello")
    with pytest.raises(ArchiveError, match="not a readable zip"):
        add_submission_archive(tmp_path / "notzip.zip", tmp_path / "subs")


def test_add_cli_reports_zip_slip(tmp_path: Path) -> None:
    archive = _crafted(tmp_path / "evil.zip", [("../../escaped.py", b"x")])
    result = CliRunner().invoke(app, ["add", str(archive), "--dir", str(tmp_path / "subs")])
    assert result.exit_code == 1
    assert "'..'" in result.output and "relative paths" in result.output
    good = zip_folder(python_submission(tmp_path / "good"), tmp_path / "good.zip")
    result = CliRunner().invoke(app, ["add", str(good), "--dir", str(tmp_path / "subs")])
    assert result.exit_code == 0 and "has not been run" in result.output


# --------------------------------------------------------------------------------------------------
# monai-bundle, nnunet
# --------------------------------------------------------------------------------------------------


NETWORK = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 2, "out_channels": 1, "channels": [4, 8], "strides": [2], "num_res_units": 0}


def monai_bundle(folder: Path, network: dict, **fields: Any) -> Path:
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=2, out_channels=1, channels=(4, 8), strides=(2,), num_res_units=0)
    config = {"network_def": network, "device": "$torch.device('cpu')", "preprocessing": {"_target_": "Compose", "transforms": "$[]"}}
    manifest = {**BASE, "kind": "monai-bundle", "patch_size": [8, 16, 16], **fields}
    write_submission(folder, manifest, {"configs/inference.json": json.dumps(config)})
    (folder / "models").mkdir()
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder


def test_monai_bundle_runs_only_its_plain_network_definition(tmp_path: Path, probe: Case) -> None:
    folder = monai_bundle(tmp_path / "b", NETWORK)
    assert verify_submission(folder, isolate=False) == [], "expressions outside the network definition are never evaluated"
    with load_submission(folder).predictor(isolate=False) as predictor:
        assert predictor.predict(probe).shape == probe.geometry.shape


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ({**NETWORK, "in_channels": "$__import__('os').system('touch pwned') or 2"}, "is a Python expression"),
        ({**NETWORK, "_target_": "os.system"}, "not a network class of monai.networks.nets"),
        ({**NETWORK, "in_channels": "%other.json#channels"}, "is a macro"),
        ({**NETWORK, "channels": "@secrets"}, "has no entry 'secrets'"),
    ],
    ids=["expression", "target", "macro", "dangling-reference"],
)
def test_monai_bundle_code_is_refused_without_opt_in(tmp_path: Path, network: dict, message: str) -> None:
    folder = monai_bundle(tmp_path / "b", network)
    problems = verify_submission(folder, isolate=False)
    assert message in problem_text(problems)
    assert not (tmp_path / "pwned").exists() and not list(tmp_path.rglob("pwned"))


def test_monai_bundle_code_needs_manifest_opt_in_and_trust(tmp_path: Path, probe: Case) -> None:
    network = {**NETWORK, "in_channels": "$len(['ADC', 'Z-ADC'])"}
    refused = monai_bundle(tmp_path / "no-opt-in", network)
    assert "set allow_code: true" in problem_text(verify_submission(refused, trust_code=True, isolate=False))
    opted_in = monai_bundle(tmp_path / "opt-in", network, allow_code=True)
    assert "run with --trust-code" in problem_text(verify_submission(opted_in, isolate=False))
    assert verify_submission(opted_in, trust_code=True, isolate=False) == []


def test_nnunet_folder_is_checked_statically(tmp_path: Path) -> None:
    folder = write_submission(tmp_path / "n", {**BASE, "kind": "nnunet", "model_folder": "model", "folds": [0, 1]},
                              {"model/dataset.json": json.dumps({"channel_names": {"0": "ADC"}}), "model/plans.json": "{}"})
    (folder / "model" / "fold_0").mkdir()
    import torch

    torch.save({"network_weights": {"w": torch.zeros(1)}, "trainer_name": "nnUNetTrainer"}, folder / "model" / "fold_0" / "checkpoint_final.pth")
    text = problem_text(verify_submission(folder))
    assert "checkpoint model/fold_1/checkpoint_final.pth not found" in text
    assert "the model expects 1 channels ['ADC']" in text
    assert "fold_0" not in text, "a checkpoint of tensors and plain data is accepted"


def write_nnunet_model(model: Path, channels: tuple[str, ...] = ("ADC", "Z-ADC"), extra: dict | None = None) -> None:
    """A tiny but real nnU-Net v2 trained-model folder: plans, dataset.json, one fold of random weights."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    kernels, strides = [[1, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2]]
    arch_kwargs = {
        "n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": kernels,
        "strides": strides, "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    resampling = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [8, 16, 16], "median_image_size_in_voxels": [8, 32, 32], "spacing": [2.0, 0.94, 0.94],
        "normalization_schemes": ["ZScoreNormalization", "NoNormalization"], "use_mask_for_norm": [False, False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_seg_kwargs": {**resampling, "is_seg": True},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": resampling,
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": arch_kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False,
    }
    intensity = {"max": 1.0, "mean": 0.0, "median": 0.0, "min": 0.0, "percentile_00_5": 0.0, "percentile_99_5": 1.0, "std": 1.0}
    plans = {
        "dataset_name": "Dataset999_Probe", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [2.0, 0.94, 0.94],
        "original_median_shape_after_transp": [8, 32, 32], "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": configuration}, "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {str(i): intensity for i in range(len(channels))},
    }
    (model / "fold_0").mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps({"channel_names": {str(i): c for i, c in enumerate(channels)},
                                                   "labels": {"background": 0, "lesion": 1}, "numTraining": 2, "file_ending": ".nii.gz"}))
    (model / "plans.json").write_text(json.dumps(plans))
    torch.manual_seed(0)
    network = PlainConvUNet(len(channels), 2, [4, 8], torch.nn.Conv3d, kernels, strides, [1, 1], 2, [1], conv_bias=True,
                            norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                            nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False)
    checkpoint = {"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                  "init_args": {"configuration": "3d_fullres", "fold": 0}, "inference_allowed_mirroring_axes": (0, 1, 2), **(extra or {})}
    torch.save(checkpoint, model / "fold_0" / "checkpoint_final.pth")


@pytest.mark.slow
def test_nnunet_model_folder_predicts_through_nnunet(tmp_path: Path, probe: Case) -> None:
    import sys

    folder = write_submission(tmp_path / "n", {**BASE, "kind": "nnunet", "model_folder": "model", "use_mirroring": False})
    write_nnunet_model(folder / "model")
    assert verify_submission(folder, run_model=False) == []
    with load_submission(folder).predictor(isolate=False, device="cpu") as predictor:
        first = predictor.predict(probe)
        np.testing.assert_array_equal(predictor.predict(probe), first)
    assert first.shape == probe.geometry.shape and first.dtype == bool
    assert "torchvision" not in sys.modules, "the nnU-Net predictor path must not import torchvision"


def test_nnunet_checkpoints_with_code_need_opt_in_and_trust(tmp_path: Path) -> None:
    import argparse

    manifest = {**BASE, "kind": "nnunet", "model_folder": "model"}
    folder = write_submission(tmp_path / "n", manifest)
    write_nnunet_model(folder / "model", extra={"args": argparse.Namespace(evil=True)})
    text = problem_text(verify_submission(folder, run_model=False))
    assert "holds Python objects beyond tensors and plain data" in text and "argparse" in text
    write_submission(folder, {**manifest, "allow_code": True})
    assert verify_submission(folder, run_model=False, trust_code=True) == []
    assert errors(verify_submission(folder, run_model=False))


def test_a_hung_worker_dies_with_its_parent(tmp_path: Path) -> None:
    """kill -9 of the process running a predictor must not leave the model's worker behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = python_submission(tmp_path / "m", "import time\ndef predict(case):\n    time.sleep(600)\n", time_limit_s=300)
    script = f"""
import threading, time
from bench.submissions import load_submission, write_probe_case
case = write_probe_case({str(tmp_path / 'probe')!r})
predictor = load_submission({str(folder)!r}).predictor()
threading.Thread(target=predictor.predict, args=(case,), daemon=True).start()
while predictor._worker is None or predictor._worker.process is None:
    time.sleep(0.05)
print(predictor._worker.process.pid, flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    worker_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def alive(pid: int) -> bool:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False
        return "State:\tZ" not in status  # a zombie has exited already

    deadline = time.monotonic() + 10
    while alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(worker_pid):  # clean up before failing
        os.kill(worker_pid, signal.SIGKILL)
        pytest.fail("the worker outlived its parent")
