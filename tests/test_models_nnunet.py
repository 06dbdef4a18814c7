"""The nnU-Net v2 adapter: splits, raw dataset, environment, and one tiny training run on the CPU.

The training test plans (with the shipped CPU plan edits), preprocesses and cross-validates the shipped
nnunet-baseline with two internal folds of one epoch of two iterations on a benchmark fold of the tiny
synthetic dataset, determines the postprocessing on the cross-validation predictions, predicts held-out
cases with the two-fold ensemble, and exports the fold as an ``nnunet`` submission that
``bench submission verify`` accepts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bench.models import build_trainable, export_fold
from bench.models.nnunet import NnUNetWorkspace, nnunet_environment, write_raw_dataset, write_splits_final
from bench.models.recipe import override_schedule

REPO = Path(__file__).resolve().parents[1]
NNUNET_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA")


@pytest.fixture(scope="module")
def dataset(synthetic_dataset):
    """The session's tiny synthetic dataset (tests/conftest.py; 32 x 32 x 8 voxels), read-only here."""
    return synthetic_dataset


def test_splits_final_equals_the_benchmark_folds(dataset, tmp_path: Path) -> None:
    from bench.data.splits import to_nnunet_splits

    for protocol in ("kfold", "loso"):
        folds = dataset.splits(protocol, k=3)
        path = write_splits_final(tmp_path / protocol, to_nnunet_splits(folds))
        written = json.loads(path.read_text())
        assert len(written) == len(folds)
        for entry, fold in zip(written, folds):
            assert entry == {"train": list(fold.train), "val": list(fold.test)}
            assert not set(entry["train"]) & set(entry["val"])


def test_raw_dataset_links_the_fold_cases_in_channel_order(dataset, tmp_path: Path) -> None:
    cases = list(dataset.cases[:3])
    folder = write_raw_dataset(tmp_path / "Dataset501_HIEBench", cases, ("Z-ADC", "ADC"))
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "Z-ADC", "1": "ADC"} and meta["numTraining"] == 3
    assert meta["overwrite_image_reader_writer"] == "SimpleITKIO"
    first = folder / "imagesTr" / f"{cases[0].case_id}_0000.nii.gz"
    assert first.resolve() == cases[0].image_paths[cases[0].channel_names.index("Z-ADC")].resolve()
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == sorted(f"{c.case_id}.nii.gz" for c in cases)


def test_environment_is_set_only_inside_the_adapter(tmp_path: Path, monkeypatch) -> None:
    for name in NNUNET_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("nnUNet_results", "/somewhere/else")
    workspace = NnUNetWorkspace(tmp_path / "nnunet", 501)
    with nnunet_environment(workspace, data_workers=0):
        from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results

        assert Path(os.fspath(nnUNet_raw)) == workspace.raw.resolve()
        assert Path(os.fspath(nnUNet_preprocessed)) == workspace.preprocessed.resolve()
        assert Path(os.fspath(nnUNet_results)) == workspace.results.resolve()
        assert os.environ["nnUNet_n_proc_DA"] == "0"
    assert os.environ["nnUNet_results"] == "/somewhere/else"
    assert "nnUNet_raw" not in os.environ and "nnUNet_n_proc_DA" not in os.environ


@pytest.mark.slow
def test_nnunet_baseline_cross_validates_ensembles_and_exports_a_verified_submission(dataset, tmp_path: Path) -> None:
    from bench.harness import split_validation
    from bench.models.nnunet import PLAN_EDITS_KEY, TRAINER_NAME, cross_validation_folder, internal_splits, nnunet_export_spec
    from bench.models.recipe import TRAINING_BUDGETS
    from bench.models.runfolder import read_budget_used, read_training_record
    from bench.submissions import load_submission, verify_submission

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        submission = load_submission(REPO / "submissions" / "nnunet-baseline")
        recipe = override_schedule(
            dict(submission.manifest.recipe), "cpu", folds=2, epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1, batch_size=2, fingerprint_foreground_samples=10_000
        )
        trainable = build_trainable(recipe, submission_dir=submission.path, preprocessing=submission.preprocessing, schedule="cpu", device="cpu")
        fold = dataset.splits("kfold", k=3)[0]
        train_ids, val_ids = split_validation(dataset, fold.train, 0.25, seed=0)
        run_dir = tmp_path / "run"
        before = {name: os.environ.get(name) for name in NNUNET_VARIABLES}
        predictor = trainable.fit([dataset.case(i) for i in train_ids], [dataset.case(i) for i in val_ids], run_dir)
        assert {name: os.environ.get(name) for name in NNUNET_VARIABLES} == before, "nnU-Net's variables do not leak"

        workspace = NnUNetWorkspace(run_dir / "nnunet", 501)
        splits = json.loads((workspace.preprocessed_dataset / "splits_final.json").read_text())
        assert splits == internal_splits(train_ids, val_ids, 2), "nnU-Net's own split of the fold's training cases"
        assert sorted(c for split in splits for c in split["val"]) == sorted([*train_ids, *val_ids])
        linked = {p.name.split(".")[0] for p in (workspace.raw_dataset / "labelsTr").iterdir()}
        assert linked == set(train_ids) | set(val_ids), "the fold's test cases never reach nnU-Net's planning"
        assert {"history.csv", "curves.png", "nnunet.log"} <= {p.name for p in run_dir.iterdir()}

        model_folder = trainable.model_folder(run_dir)
        assert model_folder.name == f"{TRAINER_NAME}__nnUNetPlans__3d_fullres"
        for internal in (0, 1):
            assert (model_folder / f"fold_{internal}" / "checkpoint_final.pth").is_file()
        validated = {p.name.split(".")[0] for internal in (0, 1) for p in (model_folder / f"fold_{internal}" / "validation").glob("*.nii.gz")}
        assert validated == set(train_ids) | set(val_ids), "a cross-validation prediction of every training case"
        assert (cross_validation_folder(model_folder, 2) / "postprocessing.json").is_file()
        assert (cross_validation_folder(model_folder, 2) / "postprocessing.pkl").is_file()

        plans = json.loads((model_folder / "plans.json").read_text())
        arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        assert arch["features_per_stage"][0] == 16 and max(arch["features_per_stage"]) <= 128, "the CPU plan is data in nnU-Net's plans"
        assert PLAN_EDITS_KEY in plans

        assert predictor.folds == [0, 1], "the ensemble of the internal folds"
        used = read_budget_used(run_dir)
        assert used == predictor.budget_used and used.models == 2 and used.steps == 2 * 1 * 2
        assert used.unit == "patch_voxels" and used.planned == TRAINING_BUDGETS["cpu"] and 0 < used.used <= used.planned
        record = read_training_record(run_dir)
        assert record["nnunet"]["checkpoint"] == "checkpoint_final.pth" and record["nnunet"]["folds"] == [0, 1]
        assert record["policy"]["amp"] is False
        spec = nnunet_export_spec(run_dir)
        assert spec["folds"] == [0, 1] and (run_dir / spec["model_folder"] / "fold_1").is_dir()
        assert (run_dir / spec["postprocessing_file"]).is_file() and spec["use_mirroring"] is False

        for case_id in fold.test:
            case = dataset.case(case_id)
            mask = predictor.predict(case)
            assert mask.dtype == bool and mask.shape == tuple(case.geometry.shape)

        # a finished fold is loaded, not retrained
        checkpoint = model_folder / "fold_1" / "checkpoint_final.pth"
        stamp = checkpoint.stat().st_mtime_ns
        trainable.fit([dataset.case(i) for i in train_ids], [dataset.case(i) for i in val_ids], run_dir)
        assert checkpoint.stat().st_mtime_ns == stamp

        out = export_fold(run_dir, tmp_path / "nnunet-export", "nnunet")
        problems = verify_submission(out, isolate=False, device="cpu")
        assert not [p for p in problems if p.severity == "error"], [str(p) for p in problems]
        exported = load_submission(out).manifest
        assert exported.kind == "nnunet" and exported.name == "nnunet-baseline-nnunet" and not exported.allow_code
        with pytest.raises(ValueError, match="cannot be exported as torchscript"):
            export_fold(run_dir, tmp_path / "other", "torchscript")
    finally:
        torch.set_num_threads(previous_threads)
