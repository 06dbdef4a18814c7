"""The recorded uncertainty end to end: prediction, guard, sandbox reply, scoring, store.

An exported MONAI fold with flip TTA carries the flip variance it already computes (its manifest names the
``uncertainty_channel``) and its rows record ``uncertainty_source: tta-variance``; every other submission
that returns a probability records ``entropy`` (the legacy ``single`` is read, never written); a python
submission may return its own ``uncertainty`` map, validated like the probability.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from support import write_python_submission

from bench.submissions import InvalidPrediction
from bench.submissions.guard import Prediction, validate_output
from bench.submissions.sandbox import sandbox_unavailable_reason

REPO = Path(__file__).resolve().parents[1]
SANDBOX = sandbox_unavailable_reason() is None
SHAPE = (4, 6, 5)
#: A one-epoch, two-iteration schedule with a small network and flip TTA on two axes.
TINY_MIRRORED = {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "patch_size": [8, 16, 16], "num_workers": 0,
                 "inference": {"mirror_axes": [0, 2]}}

#: Probability only, or with its own uncertainty; ``broken`` breaks the uncertainty per case.
PYTHON_UNCERTAINTY = '''
import numpy as np

def predict(case, with_uncertainty=False, source=None, broken=None):
    adc, _ = case.load_channel("ADC")
    zadc, _ = case.load_channel("Z-ADC")
    probability = np.where(adc > 0, 1.0 / (1.0 + np.exp(2.0 * (zadc + 2.0))), 0.0).astype(np.float32)
    out = {"mask": probability > 0.5, "probability": probability}
    if with_uncertainty:
        out["uncertainty"] = (probability * (1.0 - probability)).astype(np.float32)  # a variance-like map in [0, 0.25]
        if source is not None:
            out["uncertainty_source"] = source
    if broken:
        out["uncertainty"] = {"nan": np.full(adc.shape, np.nan, np.float32), "negative": np.full(adc.shape, -0.1, np.float32),
                              "range": np.full(adc.shape, 0.5, np.float32), "shape": np.zeros((adc.shape[0] - 1, *adc.shape[1:]), np.float32)}[broken]
    return out
'''


# -- the guard's contract -------------------------------------------------------------------------------------------------


def _probability() -> np.ndarray:
    return np.random.default_rng(0).random(SHAPE).astype(np.float32)


def test_guard_accepts_an_uncertainty_with_its_source() -> None:
    p = _probability()
    variance = (p * (1 - p)).astype(np.float64)
    checked = validate_output({"mask": p > 0.5, "probability": p, "uncertainty": variance}, SHAPE, "c1")
    assert checked.uncertainty.dtype == np.float32 and checked.uncertainty_source == "model-variance"
    np.testing.assert_allclose(checked.uncertainty, variance, atol=1e-7)
    assert checked.voxel_uncertainty.source == "model-variance" and checked.voxel_uncertainty.kind == "variance"
    named = validate_output(Prediction(p > 0.5, p, variance.astype(np.float32), "tta-variance"), SHAPE, "c1")
    assert named.uncertainty_source == "tta-variance"
    legacy = validate_output({"mask": p > 0.5, "probability": p, "uncertainty": np.full(SHAPE, 0.9, np.float32),
                              "uncertainty_source": "single"}, SHAPE, "c1")
    assert legacy.uncertainty_source == "entropy", "the legacy name is never written for a new row"
    # uint8 levels over the source's range are the stored form (what the sandbox sends back)
    from bench.uncertainty import quantize_uncertainty

    levels = validate_output({"mask": p > 0.5, "probability": p, "uncertainty": quantize_uncertainty(variance, "variance")}, SHAPE, "c1")
    assert np.abs(levels.uncertainty - variance).max() <= 0.25 / 255
    assert validate_output({"mask": p > 0.5, "probability": p}, SHAPE, "c1").uncertainty is None


@pytest.mark.parametrize(
    "uncertainty, source, message",
    [
        (np.full(SHAPE, np.nan, np.float32), None, "NaN or infinite"),
        (np.full(SHAPE, np.inf, np.float32), None, "NaN or infinite"),
        (np.full(SHAPE, -0.01, np.float32), None, "outside"),
        (np.full(SHAPE, 0.3, np.float32), "tta-variance", "outside"),  # a variance is at most 0.25
        (np.full(SHAPE[:-1], 0.1, np.float32), None, "shape"),
        (np.zeros(SHAPE, np.int64), None, "dtype"),
        ([[0.1]], None, "type list"),
        (np.zeros(SHAPE, np.float32), "flip", "not a known source"),
        (np.zeros(SHAPE, np.float32), 3, "not a known source"),
    ],
)
def test_guard_refuses_a_broken_uncertainty(uncertainty, source, message) -> None:
    p = _probability()
    output = {"mask": p > 0.5, "probability": p, "uncertainty": uncertainty}
    if source is not None:
        output["uncertainty_source"] = source
    with pytest.raises(InvalidPrediction, match=message):
        validate_output(output, SHAPE, "c1")


def test_guard_refuses_an_uncertainty_without_probability_and_unknown_keys() -> None:
    p = _probability()
    with pytest.raises(InvalidPrediction, match="without a probability"):
        validate_output({"mask": p > 0.5, "uncertainty": p * 0.1}, SHAPE, "c1")
    with pytest.raises(InvalidPrediction, match="unknown key"):
        validate_output({"mask": p > 0.5, "probability": p, "uncertainties": p * 0.1}, SHAPE, "c1")


def test_manifest_uncertainty_channel_defaults_to_none() -> None:
    from bench.submissions.manifest import parse_manifest

    base = {"name": "net", "version": "1", "authors": ["t"], "description": "d", "licence": "MIT", "kind": "torchscript",
            "patch_size": [8, 16, 16]}
    assert parse_manifest(base).uncertainty_channel is None
    assert parse_manifest({**base, "uncertainty_channel": -1}).uncertainty_channel == -1


# -- scoring ----------------------------------------------------------------------------------------------------------------


def test_scores_use_the_recorded_map() -> None:
    from bench.results import LesionRow, ProbabilityScores
    from bench.uncertainty import VoxelUncertainty

    p = _probability()
    mask = p > 0.5
    reference = np.roll(mask, 1, axis=2)
    brain = np.ones(SHAPE, np.float32)
    from bench.metrics import lesion_matches

    rows = LesionRow.from_matches(lesion_matches(mask, reference, (1.0, 1.0, 1.0)))
    entropy = ProbabilityScores.of(p, mask, reference, adc=brain, lesions=rows)
    assert entropy.uncertainty_source == "entropy"
    wrong = (mask != reference).astype(np.float32)
    variance = VoxelUncertainty(np.where(wrong > 0, 0.2, 0.01).astype(np.float32), "tta-variance")
    scored = ProbabilityScores.of(p, mask, reference, adc=brain, lesions=rows, uncertainty=variance)
    assert scored.uncertainty_source == "tta-variance" and scored.uncertainty_error_auroc == pytest.approx(1.0)
    assert scored.brier == entropy.brier and scored.ece == entropy.ece, "calibration does not depend on the uncertainty"
    assert set(scored.lesion_uncertainty) == set(entropy.lesion_uncertainty)
    assert all(0.0 <= value <= 0.25 for value in scored.lesion_uncertainty.values())


# -- end to end: a trained MONAI fold with flip TTA, exported and run in the sandbox; python submissions ----------------------


@pytest.fixture(scope="module")
def mirrored_fold(synthetic_dataset, tmp_path_factory: pytest.TempPathFactory):
    """A tiny MONAI fold trained with flip TTA on two axes, and its direct masks on three cases."""
    import torch

    from bench.models import build_trainable
    from bench.models.recipe import override_schedule
    from bench.submissions import load_submission

    torch.set_num_threads(1)
    submission = load_submission(REPO / "submissions" / "unet-monai")
    recipe = override_schedule(dict(submission.manifest.recipe), "cpu", **TINY_MIRRORED)  # the cpu schedule's mirror_axes: [] replaced
    recipe["network"]["params"] = {**recipe["network"].get("params", {}), "channels": [8, 16, 32, 64]}
    trainable = build_trainable(recipe, submission_dir=submission.path, preprocessing=submission.preprocessing, schedule="cpu", device="cpu")
    cases = list(synthetic_dataset.cases)
    fold_dir = tmp_path_factory.mktemp("wiring") / "fold"
    fitted = trainable.fit(cases[:4], cases[4:5], fold_dir)
    assert tuple(fitted.bundle.inference.mirror_axes) == (0, 2)
    direct = [fitted.predict(case) for case in cases[6:9]]
    return fitted, fold_dir, cases[6:9], direct


@pytest.mark.slow
def test_exported_mirrored_fold_records_tta_variance(mirrored_fold, tmp_path: Path) -> None:
    from bench.harness import fold_predictor, score_case

    fitted, fold_dir, cases, direct = mirrored_fold
    with fold_predictor(fitted, fold_dir, sandbox=SANDBOX) as exported:
        manifest = yaml.safe_load((fold_dir / "submission" / "submission.yaml").read_text())
        assert manifest["uncertainty_channel"] == -1 and manifest["lesion_channel"] == 1
        predictions = [exported.predict_with_probability(case) for case in cases]
        results = [score_case(exported, case, tmp_path / "predictions" / f"{case.case_id}.nii.gz", "bench") for case in cases]
    for case, mask, prediction, result in zip(cases, direct, predictions, results):
        assert np.array_equal(prediction.mask, mask), "the variance channel changes neither mask nor probability"
        assert prediction.uncertainty_source == "tta-variance"
        assert prediction.uncertainty.shape == case.geometry.shape and prediction.uncertainty.dtype == np.float32
        assert prediction.uncertainty.min() >= 0.0 and prediction.uncertainty.max() <= 0.25
        assert result.ok and result.uncertainty_source == "tta-variance"
        assert all(0.0 <= row.uncertainty <= 0.25 for row in result.lesions if row.kind == "pred")
    assert any(prediction.uncertainty.max() > 0 for prediction in predictions), "a trained U-Net is not mirror-invariant"


@pytest.mark.slow
def test_a_run_stores_tta_variance_for_the_fold_and_entropy_for_a_python_probability(synthetic_dataset, tmp_path: Path) -> None:
    import torch

    from bench.harness import RunSpec, run_benchmark
    from bench.store import Store

    torch.set_num_threads(1)
    folder = shutil.copytree(REPO / "submissions" / "unet-monai", tmp_path / "unet-mirrored")
    manifest = yaml.safe_load((folder / "submission.yaml").read_text())
    manifest["name"] = "unet-mirrored"
    manifest["recipe"]["network"]["params"]["channels"] = [8, 16, 32, 64]
    manifest["recipe"]["schedules"]["cpu"] = TINY_MIRRORED
    (folder / "submission.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    python = write_python_submission(tmp_path / "py-probability", PYTHON_UNCERTAINTY, "py-probability")
    db_url = f"sqlite:///{tmp_path / 'bench.db'}"
    specs = [RunSpec(submission=path, dataset=synthetic_dataset.root, protocol="holdout", schedule="cpu", sandbox=SANDBOX,
                     results_dir=tmp_path / "results", db_url=db_url) for path in (folder, python)]
    run_benchmark(specs)
    frame = Store(db_url).case_results_frame(details=True)
    assert (frame["status"] == "ok").all()
    sources = frame.groupby("submission_name")["uncertainty_source"].agg(set).to_dict()
    assert sources == {"unet-mirrored": {"tta-variance"}, "py-probability": {"entropy"}}
    lesions = Store(db_url).lesion_frame(kind="pred")
    assert lesions.loc[lesions["submission_name"] == "unet-mirrored", "uncertainty"].between(0, 0.25).all()


@pytest.mark.parametrize("options, expected", [({}, None), ({"with_uncertainty": True}, "model-variance"),
                                                ({"with_uncertainty": True, "source": "mc-dropout"}, "mc-dropout")])
def test_python_submission_uncertainty_through_the_worker(synthetic_dataset, tmp_path: Path, options, expected) -> None:
    from bench.harness import score_case
    from bench.submissions import load_submission

    folder = write_python_submission(tmp_path / "py", PYTHON_UNCERTAINTY, "py-uncertainty")
    manifest = yaml.safe_load((folder / "submission.yaml").read_text())
    (folder / "submission.yaml").write_text(yaml.safe_dump({**manifest, "options": options}, sort_keys=False))
    case = synthetic_dataset.cases[0]
    with load_submission(folder).predictor(sandbox=SANDBOX) as predictor:
        prediction = predictor.predict_with_probability(case)
        result = score_case(predictor, case, tmp_path / "predictions" / f"{case.case_id}.nii.gz", "bench")
    assert prediction.uncertainty_source == expected and result.uncertainty_source == (expected or "entropy")
    if expected is not None:
        assert prediction.uncertainty.dtype == np.float32 and prediction.uncertainty.shape == case.geometry.shape
        assert prediction.uncertainty.min() >= 0 and prediction.uncertainty.max() <= 0.25


def test_a_broken_python_uncertainty_fails_the_case(synthetic_dataset, tmp_path: Path) -> None:
    from bench.submissions import load_submission

    case = synthetic_dataset.cases[0]
    for broken, message in (("nan", "NaN or infinite"), ("negative", "outside"), ("range", "outside"), ("shape", "shape")):
        folder = write_python_submission(tmp_path / broken, PYTHON_UNCERTAINTY, f"py-{broken}")
        manifest = yaml.safe_load((folder / "submission.yaml").read_text())
        (folder / "submission.yaml").write_text(yaml.safe_dump({**manifest, "options": {"broken": broken}}, sort_keys=False))
        with load_submission(folder).predictor(sandbox=SANDBOX) as predictor, pytest.raises(InvalidPrediction, match=message):
            predictor.predict_with_probability(case)
