"""Probability maps through the prediction path, the store and the leaderboard (issue 14).

The contract (docs/submissions.md, "Probabilities"): a submission may return a lesion probability map
beside its mask; network kinds and exported trained folds always do. The guard refuses a hostile map
(NaN, out of range, wrong shape or type) with a clear ``InvalidPrediction``; the harness stores the
``uint8`` levels next to the mask and scores Brier, ECE and the uncertainty AUROC from exactly those
levels; a submission without probabilities stores NULL and the leaderboard says "not available".

Workers run in the bubblewrap sandbox where it is available, unsandboxed otherwise (the contract is the
same; tests/test_sandbox.py covers the sandbox itself).
"""

from __future__ import annotations

import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench.submissions import InvalidPrediction, load_submission, scaffold_submission
from bench.submissions.guard import Prediction, validate_output
from bench.submissions.sandbox import sandbox_unavailable_reason

REPO = Path(__file__).resolve().parents[1]
SANDBOX = sandbox_unavailable_reason() is None
#: A one-epoch, two-iteration schedule with a small network: a real trained fold in seconds.
TINY_SCHEDULE = {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "patch_size": [8, 16, 16], "num_workers": 0,
                 "inference": {"mirror_axes": []}}

PYTHON_WITH_PROBABILITY = '''
import numpy as np

def predict(case, hostile=False):
    adc, _ = case.load_channel("ADC")
    zadc, _ = case.load_channel("Z-ADC")
    probability = np.where(adc > 0, 1.0 / (1.0 + np.exp(2.0 * (zadc + 2.0))), 0.0).astype(np.float32)
    mask = probability > 0.5
    if hostile:  # the case decides how the map is broken, so one worker serves every hostile case
        kind = sorted(hostile)[int(case.case_id[-1]) % len(hostile)]
        probability = {"nan": np.where(adc > 0, np.nan, 0.0), "range": probability * 1.5 + 0.1,
                       "shape": probability[:-1], "bool": probability > 0.5}[kind]
    return {"mask": mask, "probability": probability}
'''


def python_submission(tmp_path: Path, name: str, source: str, **options) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "predict.py").write_text(textwrap.dedent(source))
    manifest = {"name": name, "version": "1.0.0", "authors": ["tests"], "description": "probability contract test", "licence": "MIT",
                "kind": "python", "entry": "predict.py:predict", "inputs": {"channels": ["ADC", "Z-ADC"], "space": "native"},
                "options": options, "time_limit_s": 120}
    (folder / "submission.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder


def assert_levels_follow_mask(prediction: Prediction, shape: tuple[int, ...]) -> None:
    """A guarded prediction with probability: uint8 levels on the grid, the mask where p > 0.5 (up to
    the half level that quantization moves)."""
    assert prediction.mask.dtype == bool and prediction.mask.shape == shape
    assert prediction.probability.dtype == np.uint8 and prediction.probability.shape == shape
    assert np.all(prediction.probability[prediction.mask] >= 127) and np.all(prediction.probability[~prediction.mask] <= 128)


# -- the guard, without any model -------------------------------------------------------------------------------------


def test_the_guard_takes_a_mask_a_mapping_or_a_prediction() -> None:
    shape = (2, 3, 4)
    p = np.linspace(0.0, 1.0, 24, dtype=np.float32).reshape(shape)
    assert validate_output(p > 0.5, shape, "c").probability is None
    for output in ({"mask": p > 0.5, "probability": p}, Prediction(p > 0.5, p), {"mask": p > 0.5, "probability": np.rint(p * 255).astype(np.uint8)}):
        checked = validate_output(output, shape, "c")
        assert checked.probability.dtype == np.uint8
        np.testing.assert_array_equal(checked.probability, np.rint(p * 255).astype(np.uint8))
    assert validate_output({"mask": p > 0.5, "probability": None}, shape, "c").probability is None


@pytest.mark.parametrize(
    ("probability", "message"),
    [
        (np.full((2, 3, 4), np.nan, np.float32), "NaN or infinite"),
        (np.full((2, 3, 4), 1.5), r"in \[0, 1\], found values in \[1.5, 1.5\]"),
        (np.zeros((2, 3, 5), np.float32), r"shape \(2, 3, 5\), the mask's grid is \(2, 3, 4\)"),
        (np.zeros((2, 3, 4), bool), "dtype bool, expected float"),
        ([[0.5]], "type list, expected a numpy array"),
    ],
    ids=["nan", "above-one", "wrong-shape", "bool", "list"],
)
def test_the_guard_refuses_a_hostile_probability(probability, message) -> None:
    with pytest.raises(InvalidPrediction, match=message) as error:
        validate_output({"mask": np.zeros((2, 3, 4), bool), "probability": probability}, (2, 3, 4), "case-x")
    assert error.value.fix, "every refusal says how to fix it"


def test_the_guard_refuses_a_mapping_with_a_typo() -> None:
    with pytest.raises(InvalidPrediction, match=r"unknown key\(s\) \['probabilities'\]"):
        validate_output({"mask": np.zeros((1, 1, 1), bool), "probabilities": np.zeros((1, 1, 1))}, (1, 1, 1), "c")


# -- every kind that can give a probability ------------------------------------------------------------------------------


def test_python_mapping_comes_back_from_the_worker_as_levels(synthetic_dataset, tmp_path: Path) -> None:
    case = synthetic_dataset.cases[0]
    submission = load_submission(python_submission(tmp_path, "soft-zadc", PYTHON_WITH_PROBABILITY))
    with submission.predictor(sandbox=SANDBOX) as predictor:
        prediction = predictor.predict_with_probability(case)
        mask = predictor.predict(case)
    assert_levels_follow_mask(prediction, case.geometry.shape)
    np.testing.assert_array_equal(mask, prediction.mask)
    adc, _ = case.load_channel("ADC")
    zadc, _ = case.load_channel("Z-ADC")
    expected = np.where(adc > 0, 1.0 / (1.0 + np.exp(2.0 * (zadc + 2.0))), 0.0)
    assert np.abs(prediction.probability / 255.0 - expected).max() <= 0.5 / 255 + 1e-6


def test_python_on_the_preprocessed_grid_maps_the_probability_back(synthetic_dataset, tmp_path: Path) -> None:
    """``space: preprocessed``: both come back on the native grid, the probability linearly interpolated."""
    folder = python_submission(tmp_path, "soft-prep", """
        import numpy as np

        def predict(case):
            zadc = case.image[1]
            probability = np.where(case.brain_mask, 1.0 / (1.0 + np.exp(2.0 * (zadc + 2.0))), 0.0).astype(np.float32)
            return {"mask": probability > 0.5, "probability": probability}
        """)
    manifest = yaml.safe_load((folder / "submission.yaml").read_text())
    manifest["inputs"]["space"] = "preprocessed"
    (folder / "submission.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    case = synthetic_dataset.cases[2]
    with load_submission(folder).predictor(sandbox=SANDBOX, cache_dir=tmp_path / "cache") as predictor:
        prediction = predictor.predict_with_probability(case)
    assert prediction.mask.shape == prediction.probability.shape == case.geometry.shape
    assert prediction.probability.dtype == np.uint8 and prediction.probability.max() > 0
    assert prediction.probability[prediction.mask].mean() > prediction.probability[~prediction.mask].mean()


def test_hostile_probabilities_from_the_worker_are_refused(synthetic_dataset, tmp_path: Path) -> None:
    """NaN, values above 1, a map of the wrong shape and a boolean map: each case fails with what is wrong."""
    hostile = ["bool", "nan", "range", "shape"]
    submission = load_submission(python_submission(tmp_path, "hostile", PYTHON_WITH_PROBABILITY, hostile=hostile))
    expected = {"bool": "dtype bool, expected float", "nan": "NaN or infinite", "range": "must lie in \\[0, 1\\]", "shape": "the mask's grid is"}
    seen = set()
    with submission.predictor(sandbox=SANDBOX) as predictor:
        for case in synthetic_dataset.cases[:4]:
            kind = hostile[int(case.case_id[-1]) % len(hostile)]
            seen.add(kind)
            with pytest.raises(InvalidPrediction, match=expected[kind]):
                predictor.predict_with_probability(case)
    assert len(seen) >= 3


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_network_scaffolds_return_the_probability_of_their_one_pass(kind: str, synthetic_dataset, tmp_path: Path) -> None:
    if kind == "onnx":
        pytest.importorskip("onnx")
    case = synthetic_dataset.cases[1]
    folder = scaffold_submission(f"{kind}-probe", kind, tmp_path, authors=["tests"], description="a scaffold")
    with load_submission(folder).predictor(sandbox=SANDBOX, cache_dir=tmp_path / "cache") as predictor:
        prediction = predictor.predict_with_probability(case)
    assert_levels_follow_mask(prediction, case.geometry.shape)
    assert 0 < int(prediction.probability.max()) and prediction.mask.any()


def _predictions_submission(tmp_path: Path, dataset, probability=None) -> Path:
    from bench.imageio import write_image

    folder = tmp_path / "shipped"
    for case in dataset.cases[:2]:
        reference = case.load_label()
        write_image(reference.astype(np.uint8), case.geometry, folder / "predictions" / f"{case.case_id}.nii.gz")
        if probability is not None:
            write_image(probability(reference), case.geometry, folder / "probabilities" / f"{case.case_id}.nii.gz")
    manifest = {"name": "shipped", "version": "1.0.0", "authors": ["tests"], "description": "shipped masks", "licence": "MIT",
                "kind": "predictions", "folder": "predictions"}
    (folder / "submission.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder


def test_predictions_with_and_without_a_probabilities_folder(synthetic_dataset, tmp_path: Path) -> None:
    case = synthetic_dataset.cases[0]
    plain = _predictions_submission(tmp_path / "a", synthetic_dataset)
    with load_submission(plain).predictor() as predictor:
        assert predictor.predict_with_probability(case).probability is None
    soft = _predictions_submission(tmp_path / "b", synthetic_dataset, lambda ref: np.where(ref, 0.75, 0.125).astype(np.float32))
    with load_submission(soft).predictor() as predictor:
        prediction = predictor.predict_with_probability(case)
    assert_levels_follow_mask(prediction, case.geometry.shape)
    assert set(np.unique(prediction.probability).tolist()) == {191, 32}
    integer = _predictions_submission(tmp_path / "c", synthetic_dataset, lambda ref: ref.astype(np.uint8))
    with load_submission(integer).predictor() as predictor, pytest.raises(InvalidPrediction, match="expected a float image"):
        predictor.predict(case)


# -- a run: an exported trained fold and the threshold baseline, stored and on the leaderboard ---------------------------


def _tiny_trainable(tmp_path: Path) -> Path:
    folder = shutil.copytree(REPO / "submissions" / "unet-monai", tmp_path / "unet-tiny")
    manifest = yaml.safe_load((folder / "submission.yaml").read_text())
    manifest["name"] = "unet-tiny"
    manifest["recipe"]["network"]["params"]["channels"] = [8, 16, 32, 64]
    manifest["recipe"]["schedules"]["cpu"] = TINY_SCHEDULE
    (folder / "submission.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def benchmark(synthetic_dataset, tmp_path_factory: pytest.TempPathFactory):
    """zadc-threshold (no probability) and a tiny trained MONAI fold (exported, probability) on the holdout split."""
    import torch

    from bench.harness import RunSpec, run_benchmark

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("probabilities")
    db_url = f"sqlite:///{root / 'bench.db'}"
    specs = [RunSpec(submission=path, dataset=synthetic_dataset.root, protocol="holdout", schedule="cpu", sandbox=SANDBOX,
                     results_dir=root / "results", db_url=db_url)
             for path in (REPO / "submissions" / "zadc-threshold", _tiny_trainable(root))]
    run_benchmark(specs)
    return db_url


def test_a_run_stores_calibration_for_the_model_and_null_for_the_baseline(benchmark, synthetic_dataset) -> None:
    from bench.calibration import ProbabilityHistogram, dequantize, probability_histogram
    from bench.imageio import read_image
    from bench.store import Store

    store = Store(benchmark)
    frame = store.case_results_frame(histograms=True)
    assert (frame["status"] == "ok").all()
    model = frame[frame["submission_name"] == "unet-tiny"]
    baseline = frame[frame["submission_name"] == "zadc-threshold"]
    assert len(model) == len(baseline) > 0
    for column in ("brier", "ece", "uncertainty_error_auroc", "probability_path", "calibration_domain", "uncertainty_source", "calibration_histogram"):
        assert baseline[column].isna().all(), f"{column}: never a stand-in value without a probability map"
    assert model[["brier", "ece"]].notna().all().all() and ((model["brier"] >= 0) & (model["brier"] <= 1)).all()
    assert set(model["calibration_domain"]) == {"adc_positive"} and set(model["uncertainty_source"]) == {"entropy"}  # no flip TTA in TINY_SCHEDULE: the entropy of the map
    row = model.iloc[0]
    levels, _ = read_image(row["probability_path"])
    assert levels.dtype == np.uint8 and str(row["probability_path"]).endswith(f"probabilities/{row['case_id']}.nii.gz")
    mask, _ = read_image(row["prediction_path"])
    assert np.all(levels[mask > 0] >= 127), "the stored mask is the model's threshold of the probability it stored"
    # The stored numbers are those of the stored file, bit for bit.
    case = synthetic_dataset.case(row["case_id"])
    recomputed = probability_histogram(levels, case.load_label(), adc=case.load_channel("ADC")[0])
    assert recomputed.brier == row["brier"] and recomputed.ece == row["ece"]
    assert ProbabilityHistogram.from_dict(row["calibration_histogram"]).n_voxels == recomputed.n_voxels
    assert dequantize(levels).max() <= 1.0
    # The exported fold's probability is the trained fold's own (one set of weights, one inference path).
    from bench.calibration import quantize
    from bench.models.monai_model import MonaiPredictor

    fold_dir = Path(row["prediction_path"]).parents[1] / "models" / row["fold"]
    direct = quantize(MonaiPredictor.from_run_dir(fold_dir, device="cpu").predict_probabilities(case))
    assert np.abs(direct.astype(int) - levels.astype(int)).max() <= 1

    with store.engine.connect() as conn:  # really NULL in SQL, not JSON 'null' or NaN
        nulls = conn.exec_driver_sql("SELECT count(*) FROM case_results WHERE brier IS NULL AND calibration_histogram IS NULL "
                                     "AND probability_path IS NULL").scalar_one()
    assert nulls == len(baseline)

    lesions = store.lesion_frame(kind="pred")
    assert lesions.loc[lesions["submission_name"] == "zadc-threshold", "uncertainty"].isna().all()
    model_lesions = lesions[lesions["submission_name"] == "unet-tiny"]
    assert model_lesions["uncertainty"].between(0, 1).all()


def test_the_leaderboard_says_not_available_for_the_baseline(benchmark, capsys) -> None:
    from bench import stats
    from bench.app import queries
    from bench.report import FP_AUROC, NOT_AVAILABLE, leaderboard_table, leaderboard_text, reliability_table, render_leaderboard, table_console
    from bench.store import Store

    store = Store(benchmark)
    table = leaderboard_table(store, metrics=["dice", "hd95"], n_boot=50).set_index("submission")
    baseline, model = table.loc["zadc-threshold 1.0.0"], table.loc["unet-tiny 1.0.0"]
    assert baseline["brier_n"] == 0 and math.isnan(baseline["brier"]) and math.isnan(baseline[FP_AUROC])
    assert model["brier_n"] == model["n_cases"] and model["brier_lo"] <= model["brier"] <= model["brier_hi"]
    assert table["rank"].notna().all(), "dice still ranks: the probability columns are extra columns"
    render_leaderboard(table.reset_index(), ["dice", "hd95"], console=table_console())
    printed = capsys.readouterr().out
    assert "brier ↓" in printed and "ece ↓" in printed and "uncertainty_error_auroc ↑" in printed and NOT_AVAILABLE in printed
    markdown = leaderboard_text(table.reset_index(), ["dice"], "markdown")
    assert f"| {NOT_AVAILABLE} |" in markdown

    # All-NaN probability columns in the frame do not disturb the statistics that rank.
    frame = store.case_results_frame(metrics=["dice", "brier", "ece"], details=False)
    only_baseline = frame[frame["submission_name"] == "zadc-threshold"]
    assert only_baseline["brier"].isna().all()
    assert stats.leaderboard(only_baseline, ["dice"], n_boot=20)["rank"].tolist() == [1]

    # The app shows the same numbers and the pooled reliability diagram of the model only.
    scope = queries.scopes(store).iloc[0]
    app_frame = queries.case_frame(store, scope["dataset_version"], "holdout", scope["convention"], ["dice"], details=False)
    board = queries.probability_board(store, app_frame, n_boot=50).set_index("submission")
    assert board.loc["unet-tiny 1.0.0", "brier"] == pytest.approx(model["brier"]) and board.loc["zadc-threshold 1.0.0", "brier_n"] == 0
    diagram = queries.reliability(store, app_frame)
    assert set(diagram["submission"]) == {"unet-tiny 1.0.0"} and {"overall"} < set(diagram["site"])
    overall = diagram[diagram["site"] == "overall"]
    assert overall["count"].sum() == overall["n_voxels"].iloc[0]
    assert reliability_table(store.case_results_frame(details=False)).empty, "no histograms read, no diagram"
