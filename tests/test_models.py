"""bench.models: networks, recipes, the MONAI trainer, exports and ``bench perf models``.

The slow tests train each shipped MONAI entrant for two epochs of two iterations on tiny synthetic
volumes (8 x 32 x 32, patches 8 x 16 x 16) on the CPU and predict a held-out case; the nnU-Net baseline
has its own module (test_models_nnunet.py).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.models import build_trainable, export_fold
from bench.models.recipe import RecipeError, override_schedule, parse_recipe

REPO = Path(__file__).resolve().parents[1]
MONAI_ENTRANTS = ("unet-monai", "attention-unet", "aniso-unet")
#: Tiny schedule: 2 epochs x 2 iterations of 2 patches of 8 x 16 x 16 voxels.
TINY_SCHEDULE = {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "patch_size": [8, 16, 16], "num_workers": 0}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny convolutions are fastest single-threaded, and the test machine's cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def dataset(synthetic_dataset):
    """The session's tiny synthetic dataset (tests/conftest.py; 32 x 32 x 8 voxels), read-only here."""
    return synthetic_dataset


def shipped(name: str):
    from bench.submissions import load_submission

    return load_submission(REPO / "submissions" / name)


#: Narrower layers for the tests (the shipped widths are built by the static verification test).
TINY_NETWORK_PARAMS = {"aniso-unet": {"features": [8, 16, 32, 64]}, "unet-monai": {"channels": [8, 16, 32, 64]}, "attention-unet": {"channels": [8, 16, 32, 64]}}


def tiny_trainable(name: str, schedule_changes: dict | None = None, **recipe_changes):
    """The shipped entrant with the tiny CPU schedule, narrower layers and optional changes."""
    submission = shipped(name)
    recipe = override_schedule(dict(submission.manifest.recipe), "cpu", **TINY_SCHEDULE, **(schedule_changes or {}))
    network = recipe["network"]
    network["params"] = {**network.get("params", {}), **TINY_NETWORK_PARAMS[name]}
    recipe.update(recipe_changes)
    return build_trainable(recipe, submission_dir=submission.path, preprocessing=submission.preprocessing, schedule="cpu", device="cpu")


def split(dataset):
    """Four training cases, one validation case, one held-out case."""
    cases = list(dataset.cases)
    return cases[:4], cases[4:5], cases[5]


#: The aniso fixture keeps flip TTA (the shipped CPU schedule switches it off) so exports trace it.
ANISO_WITH_TTA = {"inference": {"mirror_axes": [0, 1, 2]}}


@pytest.fixture(scope="module")
def aniso_run(dataset, tmp_path_factory):
    """A trained aniso-unet fold with flip TTA, shared by the export and transfer tests."""
    train, val, _ = split(dataset)
    run_dir = tmp_path_factory.mktemp("runs") / "aniso"
    predictor = tiny_trainable("aniso-unet", ANISO_WITH_TTA).fit(train, val, run_dir)
    return run_dir, predictor


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet", "basic_unet", "segresnet", "attention_unet", "dynunet", "aniso_unet"])
def test_every_registered_network_follows_the_output_convention(name: str) -> None:
    from bench.models.networks import NETWORKS, NetworkContext, build_network

    context = NetworkContext(in_channels=2, out_channels=2, patch_size=(16, 32, 32), spacing=(3.0, 1.0, 1.0))
    net = build_network(name, {}, context)
    x = torch.randn(2, 2, 16, 32, 32)
    net.train()
    out = net(x)
    outputs = out if isinstance(out, list) else [out]
    assert tuple(outputs[0].shape) == (2, 2, 16, 32, 32), "full-resolution logits come first"
    assert (len(outputs) > 1) == NETWORKS[name].deep_supervision
    net.eval()
    with torch.no_grad():
        assert tuple(net(x).shape) == (2, 2, 16, 32, 32)


def test_unknown_network_and_bad_params_are_clear_errors() -> None:
    from bench.models.networks import NetworkContext, build_network

    context = NetworkContext(2, 2, (8, 16, 16))
    with pytest.raises(KeyError, match="registered networks"):
        build_network("no_such_net", {}, context)
    with pytest.raises(ValueError, match="network unet: invalid params"):
        build_network("unet", {"no_such_param": 1}, context)
    with pytest.raises(ValueError, match="basic_unet.*not divisible by 16"):
        build_network("basic_unet", {}, context)


def test_aniso_plan_pools_in_plane_until_slices_are_no_longer_thick() -> None:
    from bench.models.networks import plan_stages

    plan = plan_stages((16, 128, 128), (6.0, 1.0, 1.0), max_stages=6)
    assert plan.strides[0] == (1, 2, 2) and plan.kernels[0] == (1, 3, 3)
    assert plan.strides[1] == (1, 2, 2), "6 mm slices vs 2 mm pixels: still in-plane only"
    assert plan.strides[2] == (2, 2, 2), "6 mm vs 4 mm: close enough to pool all axes"
    assert all(k == (3, 3, 3) for k in plan.kernels[2:])


@settings(max_examples=60, deadline=None)
@given(
    patch=st.tuples(st.sampled_from([4, 6, 8, 12, 16, 24, 32]), st.sampled_from([8, 16, 24, 48, 64]), st.sampled_from([8, 16, 24, 48, 64])),
    spacing=st.tuples(st.floats(0.5, 8.0), st.floats(0.5, 2.0), st.floats(0.5, 2.0)),
    stages=st.integers(1, 6),
)
def test_planned_strides_always_fit_the_patch(patch, spacing, stages) -> None:
    from bench.models.networks.base import plan_stages, total_strides

    plan = plan_stages(patch, spacing, max_stages=stages, min_size=4)
    assert len(plan.kernels) == len(plan.strides) + 1 <= stages
    totals = total_strides(plan.strides)
    assert all(p % t == 0 for p, t in zip(patch, totals))
    assert all(p // t >= min(4, p) for p, t in zip(patch, totals))


# --------------------------------------------------------------------------------------------------
# Recipes, losses, sampling, schedules
# --------------------------------------------------------------------------------------------------


def test_recipe_errors_name_the_source_and_field(tmp_path: Path) -> None:
    base = {"trainer": "monai", "network": {"name": "unet"}, "schedules": {"cpu": TINY_SCHEDULE}}
    with pytest.raises(RecipeError, match=r"sub/submission.yaml.*schedules.cpu.epocs"):
        build_trainable({**base, "schedules": {"cpu": {**TINY_SCHEDULE, "epocs": 3}}}, submission_dir=tmp_path / "sub", preprocessing=None, schedule="cpu")
    with pytest.raises(RecipeError, match="no 'gpu' schedule"):
        build_trainable(base, submission_dir=tmp_path, preprocessing=None, schedule="gpu")
    with pytest.raises(RecipeError, match="'trainer' must be"):
        parse_recipe({"network": {"name": "unet"}})
    with pytest.raises(KeyError, match="unknown network"):
        build_trainable({**base, "network": {"name": "transformer9000"}}, submission_dir=tmp_path, preprocessing=None, schedule="cpu")


def test_shipped_entrants_pass_static_verification() -> None:
    from bench.submissions import verify_submission

    for name in ("nnunet-baseline", *MONAI_ENTRANTS):
        problems = verify_submission(REPO / "submissions" / name)
        assert not problems, f"{name}: {[str(p) for p in problems]}"


@pytest.mark.parametrize("name", ["dice_ce", "dice_focal", "focal", "tversky", "dice"])
def test_losses_prefer_the_right_answer_and_handle_deep_supervision(name: str) -> None:
    from bench.models.losses import build_loss
    from bench.models.recipe import LossConfig

    loss = build_loss(LossConfig(name=name, class_weights=(1.0, 3.0)))
    target = torch.zeros(2, 1, 8, 16, 16)
    target[:, :, 2:5, 4:9, 4:9] = 1
    perfect = torch.cat([(1 - target) * 10 - 5, target * 10 - 5], dim=1)
    wrong = -perfect
    assert float(loss(perfect, target)) < float(loss(wrong, target))
    coarse = torch.nn.functional.avg_pool3d(perfect, 2)
    assert math.isfinite(float(loss([perfect, coarse], target)))


def test_foreground_oversampling_centres_patches_on_lesions() -> None:
    from bench.models.augmentation import build_train_transform, context_size, pad_to
    from bench.models.recipe import AugmentationConfig, SamplingConfig

    label = np.zeros((1, 8, 40, 40), dtype=np.uint8)
    label[0, 4, 30, 31] = 1  # a one-voxel lesion far from the centre
    augmentation = AugmentationConfig()
    size = context_size((8, 16, 16), augmentation)
    label = pad_to(label, size)
    sample = {"image": pad_to(np.random.default_rng(0).normal(size=(2, 8, 40, 40)).astype(np.float32), size), "label": label, "foreground": np.argwhere(label[0])}
    always = build_train_transform((8, 16, 16), augmentation, SamplingConfig(foreground_probability=1.0))
    never = build_train_transform((8, 16, 16), augmentation, SamplingConfig(foreground_probability=0.0))
    hits_always = hits_never = 0
    for seed in range(20):
        always.set_random_state(seed)
        never.set_random_state(seed)
        out = always(sample)
        assert tuple(out["image"].shape) == (2, 8, 16, 16) and tuple(out["label"].shape) == (1, 8, 16, 16)
        hits_always += bool(out["label"].sum() > 0)
        hits_never += bool(never(sample)["label"].sum() > 0)
    assert hits_always >= 17  # rotation can move a single voxel out of the patch now and then
    assert hits_never < hits_always


def test_learning_rate_schedules() -> None:
    from bench.models.trainer import lr_at

    def recipe(**lr_schedule):
        return parse_recipe({"trainer": "monai", "network": {"name": "unet"}, "lr_schedule": lr_schedule, "schedules": {"cpu": TINY_SCHEDULE}})

    poly = [lr_at(e, 10, recipe(name="poly")) for e in range(10)]
    assert poly[0] == pytest.approx(0.01) and all(a > b for a, b in zip(poly, poly[1:]))
    cosine = recipe(name="cosine", warmup_epochs=2, min_lr=1e-4)
    assert lr_at(0, 10, cosine) < lr_at(1, 10, cosine) < lr_at(2, 10, cosine) == pytest.approx(0.01)
    assert lr_at(9, 10, cosine) > 1e-4 - 1e-12 and lr_at(9, 10, cosine) < 0.001
    assert lr_at(5, 10, recipe(name="constant")) == pytest.approx(0.01)


# --------------------------------------------------------------------------------------------------
# Training the MONAI entrants
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet-monai", "attention-unet"])
def test_monai_entrant_trains_and_predicts_a_case(name: str, dataset, tmp_path: Path) -> None:
    train, val, held_out = split(dataset)
    predictor = tiny_trainable(name).fit(train, val, tmp_path / "run")
    mask = predictor.predict(held_out)
    assert mask.dtype == bool and mask.shape == tuple(held_out.geometry.shape)


@pytest.mark.slow
def test_aniso_run_folder_has_model_curves_and_no_checkpoint(aniso_run, dataset) -> None:
    import pandas as pd

    run_dir, predictor = aniso_run
    _, _, held_out = split(dataset)
    mask = predictor.predict(held_out)
    assert mask.dtype == bool and mask.shape == tuple(held_out.geometry.shape)
    assert {"model.pt", "history.csv", "curves.png", "run.json", "train.log"} <= {p.name for p in run_dir.iterdir()}
    assert not (run_dir / "checkpoint.pt").exists()
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [0, 1]
    assert history["val_dice"].notna().iloc[-1], "validated after the last epoch"
    assert (history["patches_per_s"] > 0).all()


@pytest.mark.slow
def test_finished_run_is_loaded_not_retrained_and_foreign_run_is_refused(aniso_run, dataset) -> None:
    from bench.models.runfolder import RunFolderError

    run_dir, _ = aniso_run
    train, val, held_out = split(dataset)
    before = (run_dir / "model.pt").stat().st_mtime_ns
    tiny_trainable("aniso-unet", ANISO_WITH_TTA).fit(train, val, run_dir)
    assert (run_dir / "model.pt").stat().st_mtime_ns == before
    with pytest.raises(RunFolderError, match="different training.*train_cases"):
        tiny_trainable("aniso-unet", ANISO_WITH_TTA).fit(train[:3], val, run_dir)
    with pytest.raises(RunFolderError, match="different training.*recipe"):
        tiny_trainable("aniso-unet").fit(train, val, run_dir)


@pytest.mark.slow
def test_interrupted_training_resumes_from_its_checkpoint(dataset, tmp_path: Path, monkeypatch) -> None:
    import pandas as pd

    import bench.models.trainer as trainer_module

    class Interrupted(Exception):
        pass

    real_write_history = trainer_module.write_history

    def crash_after_first_epoch(run_dir, history):
        real_write_history(run_dir, history)
        raise Interrupted

    train, val, _ = split(dataset)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(trainer_module, "write_history", crash_after_first_epoch)
    with pytest.raises(Interrupted):
        tiny_trainable("unet-monai").fit(train, val, run_dir)
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "model.pt").exists()
    monkeypatch.setattr(trainer_module, "write_history", real_write_history)
    tiny_trainable("unet-monai").fit(train, val, run_dir)
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [0, 1]


@pytest.mark.slow
def test_transfer_learning_initialises_from_a_checkpoint_and_freezes_the_encoder(aniso_run, dataset, tmp_path: Path) -> None:
    from bench.models.monai_model import ModelBundle

    source_dir, _ = aniso_run
    train, val, _ = split(dataset)
    trainable = tiny_trainable("aniso-unet", transfer={"checkpoint": str(source_dir / "model.pt"), "freeze_encoder_epochs": 2})
    trainable.fit(train, val, tmp_path / "run")
    assert "initialised" in (tmp_path / "run" / "train.log").read_text()
    before = ModelBundle.load(source_dir / "model.pt").state_dict
    after = ModelBundle.load(tmp_path / "run" / "model.pt").state_dict
    encoder = [k for k in after if k.startswith("encoder.") and after[k].dtype.is_floating_point and "weight" in k]
    decoder = [k for k in after if k.startswith("decoder.") and "weight" in k]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder), "frozen encoder keeps the transferred weights"
    assert any(not torch.equal(before[k], after[k]) for k in decoder), "the decoder trains"


@pytest.mark.slow
def test_exported_torchscript_submission_verifies_and_matches_the_run(aniso_run, tmp_path: Path) -> None:
    from bench.inference import MirroredSoftmax
    from bench.models.monai_model import ModelBundle
    from bench.submissions import load_submission, verify_submission

    run_dir, _ = aniso_run
    out = export_fold(run_dir, tmp_path / "aniso-export", "torchscript")
    problems = verify_submission(out, isolate=False, device="cpu")
    assert not [p for p in problems if p.severity == "error"], [str(p) for p in problems]
    manifest = load_submission(out).manifest
    assert manifest.kind == "torchscript" and manifest.name == "aniso-unet-torchscript" and manifest.activation == "none"
    bundle = ModelBundle.load(run_dir / "model.pt")
    assert bundle.inference.mirror_axes == (0, 1, 2), "the traced model carries the flip TTA"
    reference = MirroredSoftmax(bundle.build_network(), bundle.inference.mirror_axes).eval()
    traced = torch.jit.load(str(out / "model.pt"))
    x = torch.randn(1, 2, 8, 16, 16)
    with torch.no_grad():
        output = traced(x)
        # the class probabilities, then the TTA variance of the lesion probability (uncertainty_channel: -1)
        assert manifest.uncertainty_channel == -1 and output.shape[1] == 3
        torch.testing.assert_close(output[:, :2], reference(x), rtol=1e-4, atol=1e-5)
        assert float(output[:, 2].min()) >= 0.0
    with pytest.raises(ValueError, match="cannot be exported as nnunet"):
        export_fold(run_dir, tmp_path / "other", "nnunet")
    with pytest.raises(ValueError, match="already exists"):
        export_fold(run_dir, out, "torchscript")


# --------------------------------------------------------------------------------------------------
# bench perf models
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_perf_models_reports_throughput_and_inference_time(dataset, tmp_path: Path) -> None:
    from bench.perf.models import run_models_benchmark

    frame = run_models_benchmark(
        [REPO / "submissions" / "unet-monai"],
        dataset=dataset.root,
        train_cases=2,
        iterations=1,
        repeats=1,
        schedule="cpu",
        device="cpu",
        work_dir=tmp_path / "perf",
        schedule_overrides={"patch_size": [8, 16, 16]},
    )
    from bench.models.recipe import TRAINING_BUDGETS

    row = frame.iloc[0]
    assert row["entrant"] == "unet-monai" and row["device"] == "cpu" and row["patch_size"] == "8x16x16"
    assert row["train_patches_per_s"] > 0 and row["infer_s_per_case"] > 0
    assert math.isnan(row["infer_vs_nnunet"]), "no nnU-Net row to compare with"
    assert row["budget"] == TRAINING_BUDGETS["cpu"] and row["models"] == 1
    assert row["budget_steps"] == TRAINING_BUDGETS["cpu"] // (2 * 16 * 32 * 32), "the shipped schedule's steps within the budget"
    assert row["train_voxels_per_s"] == pytest.approx(row["train_patches_per_s"] * 8 * 16 * 16)
    assert row["est_train_s"] == pytest.approx(row["budget_used"] / row["train_voxels_per_s"])


def test_perf_models_command_prints_the_table_and_writes_csv(tmp_path: Path, monkeypatch) -> None:
    import pandas as pd
    import typer
    from typer.testing import CliRunner

    import bench.perf.models as perf
    from bench.cli.perf import models_command

    calls = {}

    def fake_benchmark(submissions, **options):
        calls.update(options, submissions=submissions)
        return pd.DataFrame(
            [{"entrant": "aniso-unet", "trainer": "monai", "network": "aniso_unet", "device": "cpu", "patch_size": "8x16x16", "batch_size": 2,
              "train_patches_per_s": 12.5, "train_voxels_per_s": 51200.0, "budget": 9830400, "models": 1, "budget_steps": 300,
              "budget_used": 9830400, "est_train_s": 192.0, "infer_s_per_case": 0.8, "case_shape": "8x32x32", "infer_vs_nnunet": 0.5}]
        )

    monkeypatch.setattr(perf, "run_models_benchmark", fake_benchmark)
    app = typer.Typer()
    app.command()(models_command)
    result = CliRunner().invoke(app, ["submissions/aniso-unet", "--iterations", "3", "--schedule", "cpu", "--output", str(tmp_path / "perf.csv")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "aniso-unet" in result.output and "12.50" in result.output
    assert "9.83 M" in result.output and "300" in result.output and "192" in result.output, "budget, steps and estimated time"
    assert calls["iterations"] == 3 and calls["schedule"] == "cpu" and calls["submissions"] == [Path("submissions/aniso-unet")]
    assert pd.read_csv(tmp_path / "perf.csv")["entrant"].tolist() == ["aniso-unet"]


def test_importing_bench_models_stays_light() -> None:
    import subprocess
    import sys

    code = "import sys, bench.models, bench.perf.models, bench.models.recipe; print(any(m in sys.modules for m in ('torch', 'monai', 'nnunetv2')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False"


def test_run_json_records_identity_and_source(aniso_run) -> None:
    run_dir, _ = aniso_run
    record = json.loads((run_dir / "run.json").read_text())
    assert record["identity"]["trainer"] == "monai" and record["identity"]["schedule"] == "cpu"
    assert record["info"]["source"]["name"] == "aniso-unet"
