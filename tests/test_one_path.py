"""One prediction path (issue 11): a trained fold and its export predict identical masks; the package
layering has no import loop between ``bench.submissions`` and ``bench.models``; every predictor,
fitted trainables included, passes the one guard."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "patch_size": [8, 16, 16], "num_workers": 0}


def _imports(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (top level and inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_submissions_never_import_models() -> None:
    """models depend on the submission contract (they export submissions), never the reverse."""
    offenders = {
        str(path.relative_to(REPO)): sorted(name for name in _imports(path) if name == "bench.models" or name.startswith("bench.models."))
        for path in (REPO / "bench" / "submissions").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_trainable_kind_says_it_trains() -> None:
    from bench.submissions import load_submission

    assert load_submission(REPO / "submissions" / "unet-monai").trains
    assert not load_submission(REPO / "submissions" / "zadc-threshold").trains
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "bench").rglob("*.py") if '== "trainable"' in p.read_text() or '!= "trainable"' in p.read_text()]
    assert not offenders, "use Submission.trains"


@pytest.mark.slow
def test_trained_fold_and_its_export_give_identical_masks(synthetic_dataset, tmp_path: Path) -> None:
    import torch

    from bench.harness import fold_predictor
    from bench.models import build_trainable
    from bench.models.recipe import override_schedule
    from bench.submissions import load_submission

    torch.set_num_threads(1)
    submission = load_submission(REPO / "submissions" / "unet-monai")
    # the export must carry the flip TTA: set on the schedule, whose inference block overrides the recipe's
    recipe = override_schedule(dict(submission.manifest.recipe), "cpu", **TINY, inference={"mirror_axes": [0, 2]})
    recipe["network"]["params"] = {**recipe["network"].get("params", {}), "channels": [8, 16, 32, 64]}
    trainable = build_trainable(recipe, submission_dir=submission.path, preprocessing=submission.preprocessing, schedule="cpu", device="cpu")
    cases = list(synthetic_dataset.cases)
    fitted = trainable.fit(cases[:4], cases[4:5], tmp_path / "fold")
    assert tuple(fitted.bundle.inference.mirror_axes) == (0, 2)
    direct = [fitted.predict(case) for case in cases[6:9]]
    probabilities = [fitted.predict_probabilities(case) for case in cases[6:9]]
    with fold_predictor(fitted, tmp_path / "fold") as exported:
        via_export = [exported.predict(case) for case in cases[6:9]]
    assert (tmp_path / "fold" / "submission" / "submission.yaml").is_file()
    for mask, other, probability in zip(direct, via_export, probabilities):
        assert mask.dtype == bool and other.dtype == bool
        assert np.array_equal(mask, other), "one set of weights, one way of scoring"
        assert mask.sum() == int((probability > 0.5).sum())


def test_fitted_predictor_without_export_is_guarded(synthetic_dataset) -> None:
    from bench.submissions import InvalidPrediction
    from bench.submissions.guard import FittedPredictor

    seen = []

    class Peeking:
        def predict(self, case):
            seen.append((case.label_path, dict(case.metadata)))
            return np.zeros(case.geometry.shape, dtype=np.float32) + 0.5

    case = synthetic_dataset.cases[0]
    with pytest.raises(InvalidPrediction, match="values other than 0 and 1"):
        FittedPredictor(Peeking()).predict(case)
    assert seen == [(None, {})], "the model never sees the label path or the metadata"


def test_prediction_paths_are_absolute_whatever_the_working_folder(synthetic_dataset, tmp_path: Path, monkeypatch) -> None:
    """Friction 3: an app started elsewhere must find the masks the run wrote."""
    from bench.harness import RunSpec, run_benchmark
    from bench.store import Store

    monkeypatch.chdir(tmp_path)
    spec = RunSpec(submission=REPO / "submissions" / "zadc-threshold", dataset=synthetic_dataset.root, protocol="loso",
                   results_dir=Path("results"), db_url=f"sqlite:///{tmp_path / 'bench.db'}")
    run_benchmark([spec])
    paths = Store.from_url(spec.db_url).case_results_frame(details=True)["prediction_path"]
    assert len(paths) == len(synthetic_dataset.cases)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths)


def test_bench_perf_harness_measures_the_overhead_per_case(tmp_path: Path) -> None:
    """The benchmark runs at a tiny size and reports both isolation settings (no timing is asserted)."""
    from bench.perf.harness import run_harness_benchmark

    frame = run_harness_benchmark(cases=4, sites=2, size="tiny", cli=False, work_dir=tmp_path)
    assert list(frame["isolation"]) == ["bubblewrap", "none"] and (frame["cases"] == 4).all()
    assert (frame["overhead_per_case_s"] > -1).all()
