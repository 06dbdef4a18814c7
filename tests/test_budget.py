"""Equal training budgets, the trainer's device policy, the resolution policy and the augmentation that
comes with it (scale and blur), and nnU-Net's cross-validation, plan edits and postprocessing rule.

Everything here runs on the CPU in seconds: the CUDA policy is checked as data, training runs are a
handful of steps on the session's tiny synthetic dataset.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.models import build_trainable
from bench.models.recipe import (
    TRAINING_BUDGETS,
    BudgetError,
    BudgetUsed,
    MonaiSchedule,
    RecipeError,
    override_schedule,
    parse_recipe,
    plan_steps,
    training_budget,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("unet-monai", "unet-monai-pretrained", "attention-unet", "aniso-unet", "segresnet", "swin-unetr", "nnunet-baseline")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def manifest_recipe(name: str) -> dict:
    from bench.submissions import load_submission

    return dict(load_submission(REPO / "submissions" / name).manifest.recipe)


# --------------------------------------------------------------------------------------------------
# One budget per schedule
# --------------------------------------------------------------------------------------------------


def test_every_schedule_has_one_budget_in_patch_voxels() -> None:
    assert set(TRAINING_BUDGETS) == {"cpu", "gpu"}
    for name, value in TRAINING_BUDGETS.items():
        budget = training_budget(name)
        assert budget.unit == "patch_voxels" and budget.planned == value > 0 and budget.schedule == name
    with pytest.raises(RecipeError, match="no training budget for schedule 'tpu'"):
        training_budget("tpu")


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "nnunet-baseline"])
def test_shipped_monai_entrants_train_exactly_the_budget(name: str) -> None:
    recipe = parse_recipe(manifest_recipe(name))
    for schedule in ("cpu", "gpu"):
        plan = recipe.step_plan(schedule)
        assert plan.derived, f"{name} {schedule}: no explicit epochs, the budget decides"
        assert 0 <= plan.budget.planned - plan.voxels < plan.voxels_per_step, "stops within one step of the budget"


def test_derived_plan_cuts_the_last_epoch_and_explicit_epochs_must_fit() -> None:
    budget = training_budget("cpu")
    per_step = 2 * 16 * 32 * 32
    plan = plan_steps(budget, batch_size=2, patch_size=(16, 32, 32), iterations_per_epoch=7)
    assert plan.steps_per_model == budget.planned // per_step
    assert plan.epochs == math.ceil(plan.steps_per_model / 7)
    assert sum(plan.steps_in_epoch(e) for e in range(plan.epochs)) == plan.steps_per_model
    assert plan.steps_in_epoch(plan.epochs - 1) == plan.steps_per_model - 7 * (plan.epochs - 1)
    assert plan.steps_in_epoch(plan.epochs) == 0
    # a larger patch gets proportionally fewer steps: the unit is fair across patch sizes
    big = plan_steps(budget, batch_size=2, patch_size=(32, 64, 64), iterations_per_epoch=7)
    assert big.steps_per_model == budget.planned // (8 * per_step)
    asked = plan_steps(budget, batch_size=2, patch_size=(16, 32, 32), iterations_per_epoch=10, epochs=3)
    assert (asked.steps_per_model, asked.derived) == (30, False)
    with pytest.raises(BudgetError, match=r"schedule: 1000 epochs x 10 iterations .* exceed .*; set epochs to at most \d+, or leave epochs out"):
        plan_steps(budget, batch_size=2, patch_size=(16, 32, 32), iterations_per_epoch=10, epochs=1000)
    with pytest.raises(BudgetError, match="one step .* exceeds"):
        plan_steps(budget, batch_size=2, patch_size=(512, 512, 512), iterations_per_epoch=10)


def test_nnunet_plan_shares_the_budget_between_its_folds_in_equal_epochs() -> None:
    budget = training_budget("gpu")
    plan = plan_steps(budget, batch_size=2, patch_size=(64, 160, 160), iterations_per_epoch=250, models=5, partial_last_epoch=False)
    assert plan.models == 5 and plan.steps == 5 * plan.steps_per_model
    assert plan.steps_per_model == plan.epochs * plan.iterations_per_epoch, "nnU-Net's epochs are never cut"
    assert plan.iterations_per_epoch >= 250
    assert 0 <= budget.planned - plan.voxels < 5 * plan.epochs * plan.voxels_per_step


def test_a_recipe_asking_for_more_than_its_budget_is_refused_when_built(tmp_path: Path) -> None:
    recipe = override_schedule(manifest_recipe("unet-monai"), "cpu", epochs=10_000, num_workers=0)
    with pytest.raises(BudgetError, match=r"submission.yaml: schedules.cpu: 10000 epochs x 15 iterations .* exceed the .*cpu schedule.*set epochs to at most"):
        build_trainable(recipe, submission_dir=tmp_path, preprocessing=None, schedule="cpu")
    # nnU-Net with a fixed patch and batch is checked at build time too; a planned patch after planning
    nnunet = override_schedule(manifest_recipe("nnunet-baseline"), "cpu", epochs=10_000, plan={"patch_size": [16, 32, 32]}, batch_size=2)
    with pytest.raises(BudgetError, match=r"schedules.cpu: 10000 epochs .* x \d models"):
        build_trainable(nnunet, submission_dir=tmp_path, preprocessing=None, schedule="cpu")


def test_budget_used_round_trips_as_a_record() -> None:
    plan = plan_steps(training_budget("cpu"), batch_size=2, patch_size=(8, 16, 16), iterations_per_epoch=4, epochs=2)
    used = BudgetUsed.from_plan(plan, 6, stopped_early=True)
    assert (used.unit, used.planned, used.used, used.steps, used.requested) == ("patch_voxels", TRAINING_BUDGETS["cpu"], 6 * 4096, 6, 8 * 4096)
    assert BudgetUsed.from_dict(json.loads(json.dumps(used.to_dict()))) == used
    assert used.to_dict()["fraction"] == pytest.approx(used.used / used.planned)


# --------------------------------------------------------------------------------------------------
# The MONAI trainer keeps to the budget and records it
# --------------------------------------------------------------------------------------------------

TINY = {"iterations_per_epoch": 2, "batch_size": 2, "patch_size": [8, 16, 16], "num_workers": 0, "network_params": {"channels": [8, 16, 32, 64]}}


def tiny_unet(tmp_budget_steps: int, monkeypatch, **changes):
    """unet-monai with a tiny patch and a cpu budget of ``tmp_budget_steps`` steps (plus a remainder)."""
    from bench.submissions import load_submission

    monkeypatch.setitem(TRAINING_BUDGETS, "cpu", tmp_budget_steps * 2 * 8 * 16 * 16 + 100)
    submission = load_submission(REPO / "submissions" / "unet-monai")
    recipe = override_schedule(dict(submission.manifest.recipe), "cpu", **{**TINY, **changes})
    return build_trainable(recipe, submission_dir=submission.path, preprocessing=submission.preprocessing, schedule="cpu", device="cpu")


@pytest.mark.slow
def test_trainer_stops_exactly_at_the_budget_and_records_it(synthetic_dataset, tmp_path: Path, monkeypatch) -> None:
    import pandas as pd
    import torch.utils.data

    from bench.models.runfolder import read_budget_used, read_training_record

    made = []
    real_loader = torch.utils.data.DataLoader

    class CountingLoader(real_loader):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", CountingLoader)
    cases = list(synthetic_dataset.cases)
    trainable = tiny_unet(5, monkeypatch)
    predictor = trainable.fit(cases[:4], cases[4:5], tmp_path / "run")
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(history["steps"]) == [2, 2, 1], "5 steps of 2: the last epoch is cut at the budget"
    assert len(made) == 1, "one DataLoader for the whole run, not one per epoch"
    used = read_budget_used(tmp_path / "run")
    assert used == predictor.budget_used
    assert (used.unit, used.planned, used.used, used.steps) == ("patch_voxels", TRAINING_BUDGETS["cpu"], 5 * 4096, 5)
    record = read_training_record(tmp_path / "run")
    assert record["policy"]["device"] == "cpu" and record["policy"]["amp"] is False and record["policy"]["amp_dtype"] is None
    assert record["device"]["torch"] == torch.__version__ and record["inference_amp_dtype"] is None
    identity = json.loads((tmp_path / "run" / "run.json").read_text())["identity"]
    assert identity["budget"] == {"schedule": "cpu", "planned": TRAINING_BUDGETS["cpu"], "unit": "patch_voxels"}
    assert record["target_spacing"] is not None, "unet-monai resamples to the median spacing"
    # the bundle holds the resolved spacing, so a case is preprocessed alone at prediction
    from bench.models.monai_model import ModelBundle

    bundle = ModelBundle.load(tmp_path / "run" / "model.pt")
    assert bundle.preprocessing["target_spacing"] == record["target_spacing"]
    mask = predictor.predict(cases[5])
    assert mask.shape == tuple(cases[5].geometry.shape)


@pytest.mark.slow
def test_a_trainer_that_would_step_past_its_budget_fails(synthetic_dataset, tmp_path: Path, monkeypatch) -> None:
    from bench.models.recipe import StepPlan
    from bench.models.trainer import BudgetExceededError

    monkeypatch.setattr(StepPlan, "steps_in_epoch", lambda self, epoch: self.iterations_per_epoch + 1)
    cases = list(synthetic_dataset.cases)
    with pytest.raises(BudgetExceededError, match="would exceed the budget"):
        tiny_unet(3, monkeypatch).fit(cases[:4], [], tmp_path / "run")
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.slow
def test_the_loss_is_read_from_the_device_once_per_epoch(synthetic_dataset, tmp_path: Path, monkeypatch) -> None:
    """No ``float(loss)`` per step: the epoch's summed loss is the only tensor the training loop reads
    back to the host (reads inside the data pipeline, on CPU tensors, are not counted)."""
    import sys

    import bench.models.trainer as trainer_module

    reads = []
    real_float, real_item = torch.Tensor.__float__, torch.Tensor.item

    def counting(real):
        def read(self, *args):
            if sys._getframe(1).f_code.co_filename == trainer_module.__file__:
                reads.append(tuple(self.shape))
            return real(self, *args)

        return read

    monkeypatch.setattr(torch.Tensor, "__float__", counting(real_float))
    monkeypatch.setattr(torch.Tensor, "item", counting(real_item))
    monkeypatch.setattr(trainer_module, "write_curves", lambda *a, **k: None)
    cases = list(synthetic_dataset.cases)
    tiny_unet(6, monkeypatch).fit(cases[:4], [], tmp_path / "run")  # no validation cases: no validation
    assert len(reads) == 3, f"3 epochs of 2 steps: 3 reads, got {len(reads)}"


# --------------------------------------------------------------------------------------------------
# Device policy (checked as data: no GPU needed)
# --------------------------------------------------------------------------------------------------


def test_training_policy_on_cuda_and_cpu() -> None:
    from bench.models.trainer import COMPILE_MIN_ITERATIONS, training_policy

    schedule = MonaiSchedule(iterations_per_epoch=250, batch_size=2, patch_size=(32, 128, 128), num_workers=8)
    bf16 = training_policy(schedule, "cuda", total_steps=75_000, bf16_supported=True)
    assert (bf16.amp, bf16.amp_dtype, bf16.grad_scaler) == (True, "bfloat16", False)
    assert bf16.cudnn_benchmark and bf16.pin_memory and bf16.channels_last and bf16.compile
    assert (bf16.num_workers, bf16.persistent_workers, bf16.prefetch_factor) == (8, True, 4)
    fp16 = training_policy(schedule, "cuda:1", total_steps=10, bf16_supported=False)
    assert (fp16.amp_dtype, fp16.grad_scaler, fp16.compile) == ("float16", True, False), "float16 needs a gradient scaler; short runs are not compiled"
    assert training_policy(schedule, "cuda", total_steps=COMPILE_MIN_ITERATIONS).compile
    off = training_policy(schedule.model_copy(update={"amp": False, "channels_last": False}), "cuda", total_steps=10)
    assert (off.amp, off.amp_dtype, off.channels_last, off.cudnn_benchmark) == (False, None, False, True)
    cpu = training_policy(schedule.model_copy(update={"num_workers": 0}), "cpu", total_steps=75_000, bf16_supported=True)
    assert (cpu.amp, cpu.amp_dtype, cpu.cudnn_benchmark, cpu.pin_memory, cpu.persistent_workers, cpu.compile) == (False, None, False, False, False, False)


def test_patches_depend_only_on_seed_epoch_and_index() -> None:
    from bench.models.trainer import PatchDataset

    class Echo:
        def set_random_state(self, seed):
            self.seed = seed

        def __call__(self, sample):
            return {"seed": self.seed}

    samples = [{"i": 0}, {"i": 1}]
    whole_run = PatchDataset(samples, Echo(), patches_per_epoch=6, seed=3, length=18)
    again = PatchDataset(samples, Echo(), patches_per_epoch=6, seed=3, length=18)
    assert whole_run[13] == again[13]  # epoch 2, patch 1, in any process, after any resume
    assert whole_run[13] != whole_run[7]  # epoch 1, patch 1


def test_inference_records_the_autocast_dtype() -> None:
    from bench.models.monai_model import inference_amp_dtype

    assert inference_amp_dtype("cpu") is None
    assert inference_amp_dtype("cuda") == "float16"


# --------------------------------------------------------------------------------------------------
# Scale and blur augmentation
# --------------------------------------------------------------------------------------------------


def test_scale_shows_more_tissue_and_blur_smooths() -> None:
    from bench.models.augmentation import RandBlurd, RandRotateScaleCropd, context_size
    from bench.models.recipe import AugmentationConfig, BlurAug, RotateAug, ScaleAug

    image = np.zeros((1, 8, 64, 64), np.float32)
    image[:, :, 24:40, 24:40] = 1.0
    label = image.astype(np.uint8)
    data = {"image": image, "label": label}

    def crop(scale: float, degrees: float = 0.0):
        transform = RandRotateScaleCropd(["image", "label"], (8, 32, 32), RotateAug(prob=1.0, inplane_degrees=degrees), ScaleAug(prob=1.0, range=(scale, scale)))
        transform.set_random_state(0)
        return transform(data)

    same = crop(1.0)
    assert np.allclose(same["image"].numpy(), image[:, :, 16:48, 16:48], atol=1e-5), "no rotation, scale 1: the centre patch"
    wider, closer = crop(1.4), crop(0.7)
    assert wider["label"].sum() < same["label"].sum() < closer["label"].sum(), "scale > 1 shows more tissue, so the square is smaller"
    assert set(np.unique(closer["label"].numpy())) <= {0, 1} and closer["label"].dtype == torch.uint8
    assert np.allclose(wider["label"].numpy().sum(axis=(2, 3)), wider["label"].numpy()[:, :1].sum(), atol=0), "in-plane only: every slice alike"
    base = context_size((8, 32, 32), AugmentationConfig(scale=ScaleAug(prob=0.0)))
    grown = context_size((8, 32, 32), AugmentationConfig(scale=ScaleAug(prob=0.2, range=(0.7, 1.4))))
    assert grown[0] == base[0] and grown[1] > base[1], "the context covers the largest scaled, rotated patch"

    noisy = {"image": np.random.default_rng(0).normal(size=(2, 8, 32, 32)).astype(np.float32)}
    blur = RandBlurd(["image"], BlurAug(prob=1.0, prob_per_channel=1.0, sigma=(1.0, 1.0)))
    blur.set_random_state(0)
    smoothed = blur(noisy)["image"].numpy()
    assert smoothed.std() < 0.6 * noisy["image"].std()
    never = RandBlurd(["image"], BlurAug(prob=0.0))
    assert never(noisy)["image"] is noisy["image"]


def test_shipped_monai_entrants_use_scale_blur_and_the_median_spacing() -> None:
    from bench.submissions import load_submission

    for name in ("unet-monai", "unet-monai-pretrained", "attention-unet", "aniso-unet", "segresnet", "swin-unetr"):
        submission = load_submission(REPO / "submissions" / name)
        recipe = parse_recipe(dict(submission.manifest.recipe))
        assert recipe.augmentation.scale.prob > 0 and recipe.augmentation.blur.prob > 0
        assert submission.preprocessing.target_spacing == "median" and submission.preprocessing.resolution == "median"


# --------------------------------------------------------------------------------------------------
# nnU-Net: cross-validation split, plan edits, postprocessing rule
# --------------------------------------------------------------------------------------------------


def test_internal_splits_are_nnunets_own() -> None:
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from bench.models.nnunet import NnUNetError, internal_splits

    train, val = [f"c{i:02d}" for i in range(9)], ["c09", "c10"]
    five = internal_splits(train, val, 5)
    assert five == generate_crossval_split(sorted(train + val), seed=12345, n_splits=5), "the split nnU-Net draws itself"
    assert sorted(c for split in five for c in split["val"]) == sorted(train + val), "every case validated once"
    assert internal_splits(train, val, 1) == [{"train": train, "val": val}]
    assert internal_splits(train, [], 1) == [{"train": train, "val": train}]
    with pytest.raises(NnUNetError, match="needs at least 5 training cases"):
        internal_splits(train[:3], [], 5)


def nnunet_plans() -> dict:
    """The plans nnU-Net made for the synthetic 'small' cohort (one configuration, trimmed)."""
    return {
        "configurations": {
            "3d_fullres": {
                "batch_size": 2,
                "patch_size": [14, 48, 40],
                "spacing": [6.97, 2.66, 2.66],
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": 4,
                        "features_per_stage": [32, 64, 128, 256],
                        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]],
                        "n_conv_per_stage": [2, 2, 2, 2],
                        "n_conv_per_stage_decoder": [2, 2, 2],
                    },
                },
            }
        }
    }


def test_plan_edits_are_data_in_nnunets_plans() -> None:
    from bench.models.nnunet import PLAN_EDITS_KEY, apply_plan_edits
    from bench.models.recipe import NnUNetPlanEdits

    plans = nnunet_plans()
    edited = apply_plan_edits(plans, "3d_fullres", NnUNetPlanEdits(base_features=16, max_features=128), batch_size=4)
    arch = edited["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["features_per_stage"] == [16, 32, 64, 128] and edited["configurations"]["3d_fullres"]["batch_size"] == 4
    assert arch["strides"] == plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"], "topology unchanged"
    assert plans["configurations"]["3d_fullres"]["batch_size"] == 2, "the input plans are not modified"
    assert edited[PLAN_EDITS_KEY]["planned"]["features_per_stage"] == [32, 64, 128, 256]

    smaller = apply_plan_edits(plans, "3d_fullres", NnUNetPlanEdits(patch_size=(16, 32, 32), max_stages=3, n_conv_per_stage=1))
    config = smaller["configurations"]["3d_fullres"]
    arch = config["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == 3 == len(arch["strides"]) == len(arch["kernel_sizes"]) == len(arch["features_per_stage"]) == len(arch["n_conv_per_stage"])
    assert len(arch["n_conv_per_stage_decoder"]) == 2 and set(arch["n_conv_per_stage"]) == {1}
    total = np.prod(np.array(arch["strides"]), axis=0)
    assert all(p % t == 0 for p, t in zip(config["patch_size"], total)), "re-planned strides divide the patch"
    assert arch["kernel_sizes"][0] == [1, 3, 3], "nnU-Net's planner keeps in-plane kernels for thick slices"
    assert PLAN_EDITS_KEY not in apply_plan_edits(plans, "3d_fullres", NnUNetPlanEdits())


def test_postprocessing_follows_nnunets_rule() -> None:
    from bench.models.nnunet import determine_postprocessing_in_process

    def case(*boxes):
        seg = np.zeros((8, 32, 32), np.uint8)
        for z, y, x, n in boxes:
            seg[z : z + 2, y : y + n, x : x + n] = 1
        return seg

    references = {"a": case((2, 4, 4, 8)), "b": case((3, 10, 10, 6)), "c": np.zeros((8, 32, 32), np.uint8)}
    # predictions with small false-positive blobs: keeping the largest component helps
    spurious = {"a": case((2, 4, 4, 8), (5, 25, 25, 2)), "b": case((3, 10, 10, 6), (0, 0, 28, 2)), "c": np.zeros((8, 32, 32), np.uint8)}
    fns, kwargs, report = determine_postprocessing_in_process(spurious, references)
    assert [f.__name__ for f in fns] == ["remove_all_but_largest_component_from_segmentation"] and kwargs == [{"labels_or_regions": [1]}]
    assert report["postprocessed"]["foreground_mean"]["Dice"] > report["input_folder"]["foreground_mean"]["Dice"]
    assert report["cases"] == 3, "an empty-empty case counts as NaN and is left out of the mean, as in nnU-Net"
    # two real lesions: removing one would hurt, so nothing is chosen
    references["a"] = case((2, 4, 4, 8), (5, 22, 22, 6))
    fns, _, _ = determine_postprocessing_in_process({**references}, references)
    assert fns == []


def test_postprocessing_files_are_read_by_name_only(tmp_path: Path) -> None:
    from bench.inference.nnunet import NnUNetRunError
    from bench.inference.nnunet import load_postprocessing
    from bench.models.nnunet import POSTPROCESSING_JSON, determine_postprocessing_in_process, save_postprocessing

    reference = np.zeros((4, 16, 16), np.uint8)
    reference[1:3, 2:8, 2:8] = 1
    prediction = reference.copy()
    prediction[0, 14, 14] = 1
    fns, kwargs, report = determine_postprocessing_in_process({"a": prediction}, {"a": reference})
    save_postprocessing(tmp_path, fns, kwargs, report)
    assert (tmp_path / "postprocessing.pkl").is_file(), "where nnUNetv2_apply_postprocessing looks"
    postprocess = load_postprocessing(tmp_path / POSTPROCESSING_JSON)
    assert np.array_equal(postprocess(prediction.astype(bool)), reference.astype(bool))
    assert load_postprocessing(tmp_path / "missing" / POSTPROCESSING_JSON) is None
    (tmp_path / "postprocessing.json").write_text(json.dumps({"postprocessing_fns": ["os.system"], "postprocessing_kwargs": [{}]}))
    with pytest.raises(NnUNetRunError, match="unknown postprocessing function"):
        load_postprocessing(tmp_path / POSTPROCESSING_JSON)


# --------------------------------------------------------------------------------------------------
# One resolution policy: nnU-Net's target spacing, named in the preprocessing id
# --------------------------------------------------------------------------------------------------


def planner_target_spacing(spacings, shapes):
    """nnU-Net's own ``determine_fullres_target_spacing`` on a fingerprint (no dataset on disk)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    planner = ExperimentPlanner.__new__(ExperimentPlanner)
    planner.dataset_fingerprint = {"spacings": [list(s) for s in spacings], "shapes_after_crop": [list(s) for s in shapes]}
    planner.overwrite_target_spacing = None
    planner.anisotropy_threshold = 3
    return tuple(float(v) for v in planner.determine_fullres_target_spacing())


@pytest.mark.parametrize(
    "spacings, shapes",
    [
        ([(6.97, 2.66, 2.66), (5.77, 2.43, 2.43), (7.21, 2.91, 2.91)], [(14, 42, 35), (14, 44, 36), (13, 40, 33)]),
        ([(8.0, 1.0, 1.0), (6.0, 0.9, 0.9), (4.0, 1.1, 1.1), (5.0, 1.0, 1.0)], [(20, 200, 180), (25, 210, 190), (30, 190, 170), (24, 205, 185)]),
        ([(4.0, 1.0, 1.0), (1.0, 1.0, 1.0)], [(40, 100, 100), (120, 100, 100)]),
    ],
)
def test_median_target_spacing_is_nnunets(spacings, shapes) -> None:
    from bench.preprocess import nnunet_target_spacing

    assert nnunet_target_spacing(spacings, shapes) == pytest.approx(planner_target_spacing(spacings, shapes), abs=1e-5)


def test_median_is_named_in_the_id_and_resolved_before_use(synthetic_dataset) -> None:
    from bench.preprocess import PreprocessingConfig, PreprocessingError, preprocess

    native, median = PreprocessingConfig(), PreprocessingConfig(target_spacing="median")
    assert native.id != median.id and json.loads(median.canonical_json())["config"]["target_spacing"] == "median"
    assert (native.resolution, median.resolution, PreprocessingConfig(target_spacing=(2, 1, 1)).resolution) == ("native", "median", "2x1x1 mm")
    cases = list(synthetic_dataset.cases)[:4]
    with pytest.raises(PreprocessingError, match="resolve it first"):
        preprocess(cases[0], median)
    resolved = median.resolved(cases)
    assert resolved.is_resolved and isinstance(resolved.target_spacing, tuple) and resolved.id not in (median.id, native.id)
    assert native.resolved(cases) is native
    prepared = preprocess(cases[0], resolved)
    assert prepared.spacing == pytest.approx(resolved.target_spacing)
    with pytest.raises(PreprocessingError, match="at least one case"):
        median.resolved([])
