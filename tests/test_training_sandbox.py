"""Trainable submissions train in a sandbox that holds only the fold's training cases (issue 17).

The layout test runs an inventory program in exactly the sandbox a fold's fit gets
(:func:`bench.submissions.training.training_sandbox`); the end-to-end tests train the logistic regression
through the harness with and without the sandbox and check that the same model comes out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.submissions import load_submission
from bench.submissions.sandbox import SandboxLayout, sandbox_unavailable_reason
from bench.submissions.training import (
    EXPORT_FOLDER,
    _cache_view,
    _case_json,
    _merge_cache_view,
    train_fold,
    training_sandbox,
)

REPO = Path(__file__).resolve().parents[1]
needs_sandbox = pytest.mark.skipif(sandbox_unavailable_reason() is not None,
                                   reason=f"bubblewrap sandbox unavailable: {sandbox_unavailable_reason()}")

INVENTORY = r"""
import json, os, sys
request = json.loads(sys.argv[1])
seen = {"train": sorted(os.listdir("/train")), "model": sorted(os.listdir("/model")), "root": sorted(os.listdir("/")),
        "pretrain": sorted(os.listdir("/results/pretrain")), "weights": os.path.isfile("/results/pretrain/" + "0" * 16 + "/weights.pt")}
for case in request["cases"]:
    for path in case["image_paths"] + [case["label_path"]]:
        assert os.path.isfile(path), path
try:
    open("/train/" + seen["train"][0] + "/label.nii.gz", "ab")
    seen["train_writable"] = True
except OSError:
    seen["train_writable"] = False
open("/model/written-inside", "w").write("x")
seen["hidden_visible"] = [p for p in sys.argv[2:] if os.path.exists(p)]
print(json.dumps(seen))
"""


@needs_sandbox
def test_a_folds_fit_sees_its_training_cases_and_nothing_else(synthetic_dataset, tmp_path: Path) -> None:
    cases = list(synthetic_dataset.cases)
    fold, held_out = cases[:5], cases[5:]
    model_dir = tmp_path / "results" / "runs" / "r" / "models" / "fold-1"
    model_dir.mkdir(parents=True)
    for run in ("0" * 16, "1" * 16):  # two pretrain runs; the recipe names the first
        (tmp_path / "results" / "pretrain" / run).mkdir(parents=True)
        (tmp_path / "results" / "pretrain" / run / "weights.pt").write_bytes(b"w")
    (tmp_path / "results" / "bench.db").write_bytes(b"")
    submission = SimpleNamespace(path=REPO / "submissions" / "unet-monai",
                                 manifest=SimpleNamespace(recipe={"transfer": {"checkpoint": "0" * 16}}))
    request = {"cases": [_case_json(c) for c in fold], "model_dir": str(model_dir), "cache_dir": None,
               "results_dir": str(tmp_path / "results")}
    layout = SandboxLayout.create()
    try:
        config, inside = training_sandbox(submission, request, layout, None)
        config.check_hidden([synthetic_dataset.root, tmp_path / "results"], "training")  # neither is mounted
        secrets = [str(synthetic_dataset.root), str(held_out[0].label_path), str(tmp_path / "results" / "bench.db")]
        argv = [sys.executable, "-c", INVENTORY, json.dumps(inside), *secrets]
        done = subprocess.run(config.command(argv), capture_output=True, text=True, timeout=120, **config.popen_kwargs())
    finally:
        layout.remove()
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["train"] == sorted(c.case_id for c in fold), "only the fold's cases"
    assert sorted(Path(p).name for p in inside["cases"][0]["image_paths"]) == ["0000.nii.gz", "0001.nii.gz"]
    assert not seen["train_writable"], "training data is read-only"
    assert not seen["hidden_visible"], f"visible from the training sandbox: {seen['hidden_visible']}"
    assert (model_dir / "written-inside").is_file(), "the model folder is the one writable output"
    assert seen["pretrain"] == ["0" * 16] and seen["weights"], "only the pretrain run the recipe names"
    assert inside["results_dir"] == "/results"


def test_the_cache_view_holds_this_folds_cases_only_and_merges_back_only_them(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "prep1").mkdir(parents=True)
    for name in ("A_001.0123456789abcdef.npz", "B_002.0123456789abcdef.npz"):
        (cache / "prep1" / name).write_bytes(b"entry")
    view = _cache_view(cache, ["A_001", "C_003"])
    assert sorted(p.name for p in (view / "prep1").iterdir()) == ["A_001.0123456789abcdef.npz"]
    (view / "prep1" / "C_003.fedcba9876543210.npz").write_bytes(b"new")      # a new entry of the fold: kept
    (view / "prep1" / "B_002.ffffffffffffffff.npz").write_bytes(b"poison")   # another case: dropped
    (view / "prep1" / "C_003.aaaaaaaaaaaaaaaa.npz").symlink_to("/etc/passwd")  # a link: dropped
    (view / "prep1" / "notes.txt").write_text("x")                            # not an entry: dropped
    _merge_cache_view(view, cache, {"A_001", "C_003"})
    assert sorted(p.name for p in (cache / "prep1").iterdir()) == [
        "A_001.0123456789abcdef.npz", "B_002.0123456789abcdef.npz", "C_003.fedcba9876543210.npz"]


@needs_sandbox
def test_sandboxed_fit_equals_the_unsandboxed_one_and_is_exported(synthetic_dataset, tmp_path: Path) -> None:
    submission = load_submission(REPO / "submissions" / "zadc-logreg")
    cases = list(synthetic_dataset.cases)
    train, val = cases[:6], cases[6:8]
    models = {}
    for sandbox in (True, False):
        trained = train_fold(submission, train, val, tmp_path / f"fold-{sandbox}", schedule="cpu",
                             cache_dir=tmp_path / "cache", sandbox=sandbox, secrets=[synthetic_dataset.root])
        assert trained.export_dir == (tmp_path / f"fold-{sandbox}" / EXPORT_FOLDER).resolve()
        exported = load_submission(trained.export_dir)
        assert exported.kind == "python" and not exported.trains
        models[sandbox] = {k: v for k, v in json.loads((trained.export_dir / "model.json").read_text()).items() if k != "info"}  # info: timings
        with exported.predictor(sandbox=True) as predictor:
            prediction = predictor.predict_with_probability(cases[9])
        assert prediction.mask.shape == cases[9].geometry.shape and prediction.probability is not None
    assert models[True] == models[False], "the sandbox changes where the fit runs, not what it learns"


@needs_sandbox
def test_a_failing_fit_is_a_clear_error_naming_the_fold(synthetic_dataset, tmp_path: Path) -> None:
    from bench.submissions.core import PredictionError

    submission = load_submission(REPO / "submissions" / "zadc-logreg")
    cases = list(synthetic_dataset.cases)
    unlabelled = [c.__class__(case_id=c.case_id, site=c.site, image_paths=c.image_paths, label_path=None,
                              channel_names=c.channel_names) for c in cases[:3]]
    with pytest.raises(PredictionError, match="training fold x: training failed"):
        train_fold(submission, unlabelled, [], tmp_path / "fold", schedule="cpu", label="training fold x")
    assert not (tmp_path / "fold" / EXPORT_FOLDER).exists()
