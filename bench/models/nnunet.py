"""The nnU-Net v2 baseline, run as nnU-Net intends inside one benchmark fold, through its Python API.

nnU-Net finds its data through three environment variables. This adapter points them at folders inside
the run folder, only while it runs nnU-Net (:func:`nnunet_environment`), so several folds, runs and
users never share or overwrite an nnU-Net tree, and nothing outside the adapter depends on them::

    <run_dir>/run.json                                   identity, and (training) budget used, folds, postprocessing
    <run_dir>/train.log, nnunet.log                      the adapter's progress, nnU-Net's console output
    <run_dir>/history.csv, curves.png                    per epoch, every internal fold
    <run_dir>/nnunet/raw/Dataset501_HIEBench/            links to the fold's training cases + dataset.json
    <run_dir>/nnunet/preprocessed/Dataset501_HIEBench/   plans (nnUNetPlans.json, as edited; .planned.json, as
                                                         nnU-Net planned it), fingerprint, splits_final.json, arrays
    <run_dir>/nnunet/results/Dataset501_HIEBench/BudgetTrainer__nnUNetPlans__3d_fullres/
        fold_<f>/checkpoint_final.pth, fold_<f>/validation/<case>.nii.gz     one model per internal fold
        crossval_results_folds_0_1_.../summary.json, postprocessing.pkl, postprocessing.json

One :meth:`NnUNetTrainable.fit` call, on a benchmark fold's training cases (the harness's training
*and* validation cases: nnU-Net validates internally, on its own folds)

1. links those cases into an nnU-Net *raw* dataset (the benchmark dataset is already in that layout; the
   fold's test cases never reach nnU-Net, not even its fingerprint);
2. extracts the fingerprint, plans the configuration with nnU-Net's default ``ExperimentPlanner``,
   applies the schedule's plan edits (:func:`apply_plan_edits`: a CPU-sized network or patch, written
   into ``nnUNetPlans.json`` as data, the topology re-planned by nnU-Net's own function) and preprocesses;
3. writes ``splits_final.json``: nnU-Net's own seeded k-fold split of those cases
   (``generate_crossval_split``, seed 12345; ``folds: 5`` is exactly the split nnU-Net draws itself),
   or with ``folds: 1`` the benchmark's train/validation split as the one fold;
4. trains each internal fold with :class:`~bench.models.nnunet_trainer.BudgetTrainer` (``nnUNetTrainer``
   with the epoch count set from the budget: network, loss, augmentation, optimizer and learning-rate
   schedule are nnU-Net's), each for ``1/folds`` of the schedule's budget; an interrupted fold resumes
   from ``checkpoint_latest.pth`` as ``nnUNetv2_train --c`` would; the trainer refuses any step past its
   share;
5. predicts each fold's validation cases with that fold's model (the cross-validation predictions nnU-Net's
   ``perform_actual_validation`` writes) and applies nnU-Net's ``determine_postprocessing`` rule to them
   (:func:`determine_postprocessing_in_process`): keep only the largest lesion component when that raises
   the mean Dice over the cases, computed with nnU-Net's own functions;
6. returns a predictor (:class:`NnUNetEnsemblePredictor`) that ensembles every fold's
   ``checkpoint_final.pth`` (nnU-Net's default checkpoint) with ``nnUNetPredictor``, mirroring as the
   schedule says, and applies the chosen postprocessing.

``find_best_configuration`` chooses among trained configurations and their ensembles and then
determines the postprocessing of the best; with one configuration trained there is nothing to choose,
so only its postprocessing step applies. nnU-Net's own ``determine_postprocessing``,
``accumulate_cv_results`` and ``perform_actual_validation`` each start a pool of spawned processes, each
of which imports torch (several seconds each, tens of seconds per benchmark fold on a small CPU); the adapter
therefore runs the same steps in-process with the same nnU-Net functions, and writes
``postprocessing.pkl``/``.json`` where nnU-Net writes them, so ``nnUNetv2_apply_postprocessing`` reads them.

nnU-Net's lookup of trainer classes by name (``recursive_find_python_class``) imports every module of
its trainer package, some of which need torchvision; the adapter therefore constructs its trainer class
directly (as ``nnunetv2.run.run_training`` does after the lookup, including
``plans["continue_training"]`` and, on CUDA, ``cudnn.benchmark``) and predicts with
:class:`bench.inference.nnunet.NnUNetRunner`, which builds the network with
``build_network_architecture`` and hands it to ``nnUNetPredictor.manual_initialization``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from bench.imageio import strip_image_suffix, write_text_atomic
from bench.models.recipe import (
    bound_schedule,
    NNUNET_VAL_ITERATIONS_PER_EPOCH,
    BudgetUsed,
    NnUNetPlanEdits,
    NnUNetRecipe,
    NnUNetSchedule,
    ScheduleName,
    training_budget,
)
from bench.models.transfer import default_results_dirs, prepare_nnunet_weights, transfer_config
from bench.models.runfolder import (
    append_log,
    claim_run_dir,
    read_budget_used,
    read_training_record,
    record_training,
    select_device,
    write_curves,
    write_history,
)

if TYPE_CHECKING:
    from bench.data.dataset import Case
    from bench.preprocess import PreprocessingConfig

DATASET_NAME = "HIEBench"
PLANS_NAME = "nnUNetPlans"
SPLITS_FILE = "splits_final.json"
#: nnU-Net's console output, inside the run folder.
NNUNET_LOG = "nnunet.log"
FOLD = 0
#: Written after preprocessing finished, so an interrupted preprocessing is redone rather than trusted.
PREPROCESSED_MARKER = ".hie-bench-preprocessed"
#: The nnU-Net label value of lesions in the benchmark's masks.
LESION_LABEL = 1


class NnUNetError(RuntimeError):
    """The nnU-Net adapter cannot proceed; the message names the file or case."""


# --------------------------------------------------------------------------------------------------
# Folders and environment
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NnUNetWorkspace:
    """nnU-Net's three folders inside a run folder, and the dataset's name in them."""

    root: Path
    dataset_id: int

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{DATASET_NAME}"

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def raw_dataset(self) -> Path:
        return self.raw / self.dataset_name

    @property
    def preprocessed_dataset(self) -> Path:
        return self.preprocessed / self.dataset_name

    def model_folder(self, trainer_name: str, configuration: str) -> Path:
        """nnU-Net's trained-model folder (holds plans.json, dataset.json and fold_0/)."""
        return self.results / self.dataset_name / f"{trainer_name}__{PLANS_NAME}__{configuration}"


@contextmanager
def nnunet_environment(workspace: NnUNetWorkspace, data_workers: int | None = None) -> Iterator[None]:
    """Point nnU-Net at ``workspace`` (and set its augmentation worker count) for the ``with`` block.

    nnU-Net reads ``nnUNet_raw`` etc. from ``os.environ`` whenever it builds a path (``nnunetv2.paths``
    wraps them lazily) and its spawned worker processes inherit the environment, so setting the
    variables for the duration of the call is enough; the previous values are restored afterwards.
    """
    values = {
        "nnUNet_raw": str(workspace.raw.resolve()),
        "nnUNet_preprocessed": str(workspace.preprocessed.resolve()),
        "nnUNet_results": str(workspace.results.resolve()),
    }
    if data_workers is not None:
        values["nnUNet_n_proc_DA"] = str(data_workers)
    previous = {key: os.environ.get(key) for key in values}
    for folder in (workspace.raw, workspace.preprocessed, workspace.results):
        folder.mkdir(parents=True, exist_ok=True)
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def output_to_log(path: Path) -> Iterator[None]:
    """Send nnU-Net's console output (plans, per-epoch progress) to ``path`` instead of the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle, contextlib.redirect_stdout(handle):
        yield


# --------------------------------------------------------------------------------------------------
# Raw dataset and splits
# --------------------------------------------------------------------------------------------------


def _file_ending(path: Path) -> str:
    stem = strip_image_suffix(path)
    if stem is None:
        raise NnUNetError(f"{path}: not an image file nnU-Net can read")
    return path.name[len(stem) :]


def _link(source: Path, target: Path) -> None:
    """Symlink ``target`` -> ``source`` (absolute), or copy where symlinks are not allowed."""
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copy2(source, target)


def write_raw_dataset(folder: Path, cases: Sequence["Case"], channels: Sequence[str]) -> Path:
    """Create an nnU-Net raw dataset at ``folder`` holding ``cases`` (links, not copies).

    The channels are taken by name, in the order of ``channels``; ``dataset.json`` pins nnU-Net's
    SimpleITK reader, whose array order (z, y, x) and spacing order match :mod:`bench.imageio`.
    Written to a temporary folder and renamed, so a half-written dataset never exists.
    """
    if folder.exists():
        return folder
    if not cases:
        raise NnUNetError("an nnU-Net dataset needs at least one case")
    ending = _file_ending(cases[0].image_paths[0])
    folder.parent.mkdir(parents=True, exist_ok=True)
    from bench.data import layout  # the benchmark's layout is nnU-Net's raw layout: one naming rule

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        (tmp / layout.IMAGES_DIR).mkdir()
        (tmp / layout.LABELS_DIR).mkdir()
        for case in cases:
            if case.label_path is None:
                raise NnUNetError(f"case {case.case_id} has no reference label; it cannot be used to train nnU-Net")
            for index, name in enumerate(channels):
                if name not in case.channel_names:
                    raise NnUNetError(f"case {case.case_id} has no channel {name!r} (it has {list(case.channel_names)})")
                source = case.image_paths[case.channel_names.index(name)]
                if _file_ending(source) != ending:
                    raise NnUNetError(f"{source}: file type differs from {cases[0].image_paths[0].name}; nnU-Net needs one file ending per dataset")
                _link(source, layout.image_path(tmp, case.case_id, index, ending))
            _link(case.label_path, layout.label_path(tmp, case.case_id, ending))
        dataset_json = {
            "name": DATASET_NAME,
            "description": "HIE-Bench training fold (links to the benchmark dataset)",
            "channel_names": {str(i): name for i, name in enumerate(channels)},
            "labels": {"background": 0, "lesion": LESION_LABEL},
            "numTraining": len(cases),
            "file_ending": ending,
            "overwrite_image_reader_writer": "SimpleITKIO",
        }
        (tmp / layout.DATASET_JSON).write_text(json.dumps(dataset_json, indent=2))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_splits_final(preprocessed_dataset: Path, splits: Sequence[Mapping[str, Sequence[str]]]) -> Path:
    """Write ``splits_final.json`` (a list of ``{"train": [...], "val": [...]}``) atomically.

    nnU-Net uses this file instead of drawing its own 5-fold split, so its fold ``i`` is exactly
    ``splits[i]``. :meth:`NnUNetTrainable.fit` writes nnU-Net's own split of the benchmark fold's
    training cases (:func:`internal_splits`); for a cross-validation over the benchmark's folds with
    nnU-Net's own tools, pass :func:`bench.data.splits.to_nnunet_splits` of the benchmark's folds.
    """
    cleaned = []
    for index, split in enumerate(splits):
        train, val = [str(c) for c in split["train"]], [str(c) for c in split["val"]]
        if not train:
            raise NnUNetError(f"split {index} has no training case")
        cleaned.append({"train": train, "val": val})
    return write_text_atomic(preprocessed_dataset / SPLITS_FILE, json.dumps(cleaned, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Planning, plan edits, preprocessing
# --------------------------------------------------------------------------------------------------

#: nnU-Net's copy of its plans before :func:`apply_plan_edits` (kept for comparison; nnU-Net reads
#: ``nnUNetPlans.json``).
PLANNED_FILE = f"{PLANS_NAME}.planned.json"
#: Where :func:`apply_plan_edits` records what it changed, inside the plans (nnU-Net ignores the key).
PLAN_EDITS_KEY = "hie_bench_plan_edits"


def apply_plan_edits(plans: dict[str, Any], configuration: str, edits: NnUNetPlanEdits, batch_size: int | None = None) -> dict[str, Any]:
    """A copy of nnU-Net's ``plans`` with ``edits`` (and a batch size) applied to ``configuration``.

    Everything is data in the plans file: ``patch_size`` re-plans strides and kernels for the new patch
    with nnU-Net's own ``get_pool_and_conv_props`` (as its planner does, on the configuration's target
    spacing and a minimum feature-map edge of 4), ``max_stages`` drops the deepest stages, features per
    stage are ``min(base x 2^i, max)``, and the per-stage convolution counts are set. What changed is
    recorded under :data:`PLAN_EDITS_KEY`.
    """
    import copy

    plans = copy.deepcopy(plans)
    if configuration not in plans["configurations"]:
        raise NnUNetError(f"nnU-Net planned no '{configuration}' configuration for this dataset (it has {sorted(plans['configurations'])})")
    config = plans["configurations"][configuration]
    arch = config["architecture"]["arch_kwargs"]
    before = {"patch_size": list(config["patch_size"]), "batch_size": config["batch_size"], "features_per_stage": list(arch["features_per_stage"]), "n_stages": arch["n_stages"]}
    if edits.patch_size is not None:
        from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

        _, strides, kernels, patch, _ = get_pool_and_conv_props(config["spacing"], list(edits.patch_size), 4, 999999)
        config["patch_size"] = [int(s) for s in patch]
        arch["strides"] = [list(s) for s in strides]
        arch["kernel_sizes"] = [list(k) for k in kernels]
        arch["n_stages"] = len(strides)
    n_stages = int(arch["n_stages"])
    if edits.max_stages is not None and edits.max_stages < n_stages:
        n_stages = edits.max_stages
        arch["strides"] = arch["strides"][:n_stages]
        arch["kernel_sizes"] = arch["kernel_sizes"][:n_stages]
    arch["n_stages"] = n_stages
    base = edits.base_features or int(arch["features_per_stage"][0])
    largest = edits.max_features or max(int(f) for f in arch["features_per_stage"])
    if edits.base_features is not None or edits.max_features is not None or len(arch["features_per_stage"]) != n_stages:
        arch["features_per_stage"] = [min(largest, base * 2**i) for i in range(n_stages)]
    encoder = edits.n_conv_per_stage or int(arch["n_conv_per_stage"][0])
    decoder = edits.n_conv_per_stage_decoder or int(arch["n_conv_per_stage_decoder"][0])
    arch["n_conv_per_stage"] = [encoder] * n_stages
    arch["n_conv_per_stage_decoder"] = [decoder] * (n_stages - 1)
    if batch_size is not None:
        config["batch_size"] = int(batch_size)
    after = {"patch_size": list(config["patch_size"]), "batch_size": config["batch_size"], "features_per_stage": list(arch["features_per_stage"]), "n_stages": n_stages}
    if after != before or not edits.is_empty:
        plans[PLAN_EDITS_KEY] = {"configuration": configuration, "edits": edits.model_dump(mode="json"), "batch_size": batch_size, "planned": before, "edited": after}
    return plans


def plan_and_preprocess(workspace: NnUNetWorkspace, recipe: NnUNetRecipe, schedule: NnUNetSchedule, num_processes: int = 1) -> dict[str, Any]:
    """Fingerprint, plan, edit the plans and preprocess the workspace's dataset (skipped when already
    done); returns the plans nnU-Net trains with.

    Mirrors ``nnUNetv2_plan_and_preprocess`` through :mod:`nnunetv2.experiment_planning.plan_and_preprocess_api`,
    with the classes passed directly (no lookup by name, hence no package scan) and only the recipe's
    configuration preprocessed; the schedule's plan edits (:func:`apply_plan_edits`) are written into
    ``nnUNetPlans.json`` before preprocessing (nnU-Net's copy: :data:`PLANNED_FILE`). Must run inside
    :func:`nnunet_environment`.
    """
    plans_file = workspace.preprocessed_dataset / f"{PLANS_NAME}.json"
    marker = workspace.preprocessed_dataset / PREPROCESSED_MARKER
    if not marker.is_file():
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
        from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset, preprocess_dataset

        # what extract_fingerprint_dataset() does, with the option of fewer intensity samples
        extractor = DatasetFingerprintExtractor(workspace.dataset_id, num_processes, verbose=False)
        extractor.show_progress_bar = False
        if schedule.fingerprint_foreground_samples is not None:
            extractor.num_foreground_voxels_for_intensitystats = schedule.fingerprint_foreground_samples
        extractor.run(overwrite_existing=True)
        plan_experiment_dataset(workspace.dataset_id, ExperimentPlanner, gpu_memory_target_in_gb=recipe.gpu_memory_target_gb)
        planned = json.loads(plans_file.read_text())
        write_text_atomic(workspace.preprocessed_dataset / PLANNED_FILE, json.dumps(planned, indent=2) + "\n")
        edited = apply_plan_edits(planned, recipe.configuration, schedule.plan, schedule.batch_size)
        write_text_atomic(plans_file, json.dumps(edited, indent=2) + "\n")
        preprocess_dataset(
            workspace.dataset_id, PLANS_NAME, configurations=(recipe.configuration,), num_processes=[num_processes], verbose=False, show_progress_bar=False
        )
        marker.write_text("done\n")
    return json.loads(plans_file.read_text())


def internal_splits(train_ids: Sequence[str], val_ids: Sequence[str], folds: int) -> list[dict[str, list[str]]]:
    """nnU-Net's cross-validation of a benchmark fold's training cases (``train_ids`` + ``val_ids``).

    ``folds >= 2``: nnU-Net's own ``generate_crossval_split`` of the sorted case ids with its seed 12345
    (for 5 folds, the very split ``nnUNetTrainer.do_split`` draws when no ``splits_final.json`` exists).
    ``folds == 1``: one split, the benchmark's (``val_ids``; the training cases themselves when there
    are none, as nnU-Net's fold ``all`` does).
    """
    if folds == 1:
        return [{"train": list(train_ids), "val": list(val_ids) or list(train_ids)}]
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    cases = sorted({*train_ids, *val_ids})
    if len(cases) < folds:
        raise NnUNetError(f"{folds}-fold cross-validation needs at least {folds} training cases, the fold has {len(cases)}; lower schedules.<name>.folds")
    return [{"train": [str(c) for c in split["train"]], "val": [str(c) for c in split["val"]]} for split in generate_crossval_split(cases, seed=12345, n_splits=folds)]


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

#: The trainer class every schedule trains with (it names nnU-Net's model folder).
TRAINER_NAME = "BudgetTrainer"


def trainer_class_name(schedule: NnUNetSchedule | None = None) -> str:
    """Name of the trainer class (:class:`~bench.models.nnunet_trainer.BudgetTrainer`); it names nnU-Net's
    model folder. Every schedule trains with it, since every schedule has a budget."""
    return TRAINER_NAME


def make_trainer(workspace: NnUNetWorkspace, recipe: NnUNetRecipe, fold: int, device, *, continue_training: bool):
    """Construct the trainer as ``nnunetv2.run.run_training.get_trainer_from_args`` does, minus the class lookup.

    ``plans["continue_training"]`` is what ``get_trainer_from_args`` sets and the trainer pops: it tells
    nnU-Net's logger to append to the existing log instead of starting a new one. The plans are the
    edited ones (:func:`plan_and_preprocess`), which the trainer copies to the model folder for inference.
    """
    from bench.models.nnunet_trainer import BudgetTrainer

    plans = json.loads((workspace.preprocessed_dataset / f"{PLANS_NAME}.json").read_text())
    dataset_json = json.loads((workspace.preprocessed_dataset / "dataset.json").read_text())
    if recipe.configuration not in plans["configurations"]:
        raise NnUNetError(f"nnU-Net planned no '{recipe.configuration}' configuration for this dataset (it has {sorted(plans['configurations'])})")
    plans["continue_training"] = continue_training
    return BudgetTrainer(plans=plans, configuration=recipe.configuration, fold=fold, dataset_json=dataset_json, device=device)


def cross_validation_folder(model_folder: Path, folds: int) -> Path:
    """Where nnU-Net's ``find_best_configuration`` merges the folds' validation predictions."""
    return Path(model_folder) / f"crossval_results_folds_{'_'.join(str(f) for f in range(folds))}"


# --------------------------------------------------------------------------------------------------
# Postprocessing: nnU-Net's determine_postprocessing rule, in-process
# --------------------------------------------------------------------------------------------------

POSTPROCESSING_JSON = "postprocessing.json"
POSTPROCESSING_PKL = "postprocessing.pkl"


def _mean_dice(predictions: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray], label: int) -> tuple[float, dict[str, float]]:
    """nnU-Net's per-case Dice of ``label`` (``compute_tp_fp_fn_tn``; NaN when both are empty) and their
    ``nanmean``, as ``compute_metrics_on_folder`` aggregates them."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    per_case = {}
    for case_id, prediction in predictions.items():
        tp, fp, fn, _ = compute_tp_fp_fn_tn(references[case_id] == label, prediction == label)
        per_case[case_id] = float("nan") if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))
    values = [v for v in per_case.values() if not np.isnan(v)]
    return (float(np.mean(values)) if values else float("nan")), per_case


def determine_postprocessing_in_process(
    predictions: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray], labels: Sequence[int] = (LESION_LABEL,)
) -> tuple[list, list[dict[str, Any]], dict[str, Any]]:
    """nnU-Net v2's ``determine_postprocessing`` on in-memory segmentations (case id -> label array).

    Removing all but the largest foreground component (nnU-Net's
    ``remove_all_but_largest_component_from_segmentation``) is kept when it raises the foreground mean
    Dice over the cases and lowers no class's mean Dice; with more than one label the same test then
    runs per label, as nnU-Net does. Returns ``(pp_fns, pp_fn_kwargs, report)`` in nnU-Net's format.
    """
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    labels = [int(label) for label in labels]

    def scores(segs):
        per_label = {label: _mean_dice(segs, references, label) for label in labels}
        return float(np.mean([per_label[label][0] for label in labels])), {label: per_label[label][0] for label in labels}

    baseline_fg, baseline = scores(predictions)
    pp_fns: list = []
    pp_kwargs: list[dict[str, Any]] = []
    kwargs = {"labels_or_regions": labels}
    candidate = {k: remove_all_but_largest_component_from_segmentation(v, **kwargs) for k, v in predictions.items()}
    candidate_fg, candidate_scores = scores(candidate)
    keep = candidate_fg > baseline_fg and all(candidate_scores[label] >= baseline[label] for label in labels)
    source, source_scores = (candidate, candidate_scores) if keep else (predictions, baseline)
    if keep:
        pp_fns.append(remove_all_but_largest_component_from_segmentation)
        pp_kwargs.append(kwargs)
    if len(labels) > 1:
        for label in labels:
            kwargs_label = {"labels_or_regions": label}
            trial = {k: remove_all_but_largest_component_from_segmentation(v, **kwargs_label) for k, v in source.items()}
            _, trial_scores = scores(trial)
            if trial_scores[label] > source_scores[label]:
                source, source_scores = trial, trial_scores
                pp_fns.append(remove_all_but_largest_component_from_segmentation)
                pp_kwargs.append(kwargs_label)
    final_fg, final = scores(source)
    report = {
        "input_folder": {"foreground_mean": {"Dice": baseline_fg}, "mean": {str(k): {"Dice": v} for k, v in baseline.items()}},
        "postprocessed": {"foreground_mean": {"Dice": final_fg}, "mean": {str(k): {"Dice": v} for k, v in final.items()}},
        "postprocessing_fns": [fn.__name__ for fn in pp_fns],
        "postprocessing_kwargs": pp_kwargs,
        "cases": len(predictions),
        "how": "nnU-Net's determine_postprocessing rule, evaluated in-process with nnU-Net's functions (bench.models.nnunet)",
    }
    return pp_fns, pp_kwargs, report


def save_postprocessing(folder: Path, pp_fns: list, pp_kwargs: list[dict[str, Any]], report: dict[str, Any]) -> None:
    """``postprocessing.pkl`` (nnU-Net's format, for ``nnUNetv2_apply_postprocessing``) and ``.json``."""
    from batchgenerators.utilities.file_and_folder_operations import save_pickle

    folder.mkdir(parents=True, exist_ok=True)
    save_pickle((pp_fns, pp_kwargs), str(folder / POSTPROCESSING_PKL))
    write_text_atomic(folder / POSTPROCESSING_JSON, json.dumps(report, indent=2, default=float) + "\n")


# --------------------------------------------------------------------------------------------------
# The Trainable and its predictor
# --------------------------------------------------------------------------------------------------


class NnUNetTrainable:
    """A recipe with ``trainer: nnunet`` bound to a schedule (see the module docstring)."""

    def __init__(
        self,
        recipe: NnUNetRecipe,
        schedule_name: ScheduleName,
        *,
        preprocessing: "PreprocessingConfig | None" = None,
        submission_dir: Path | None = None,
        device: str | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        self.recipe = recipe
        self.schedule_name = schedule_name
        self.schedule: NnUNetSchedule = bound_schedule(recipe, schedule_name)
        self.budget = training_budget(schedule_name)
        recipe.step_plan(schedule_name)  # a fixed patch and batch are checked against the budget now
        # nnU-Net normalises and resamples by itself; only the channel selection is taken from the
        # benchmark's preprocessing.
        self.channels: tuple[str, ...] = tuple(preprocessing.channels) if preprocessing is not None else ("ADC", "Z-ADC")
        self.submission_dir = Path(submission_dir) if submission_dir is not None else None
        self.device_preference = device
        self.source = dict(source or {})

    def identity(self, train_cases: Sequence["Case"], val_cases: Sequence["Case"]) -> dict[str, Any]:
        return {
            "trainer": "nnunet",
            "recipe": self.recipe.model_dump(mode="json"),
            "schedule": self.schedule_name,
            "budget": self.budget.to_dict(),
            "channels": list(self.channels),
            "train_cases": [c.case_id for c in train_cases],
            "val_cases": [c.case_id for c in val_cases],
        }

    def workspace(self, run_dir: Path) -> NnUNetWorkspace:
        return NnUNetWorkspace(Path(run_dir) / "nnunet", self.recipe.dataset_id)

    def model_folder(self, run_dir: Path) -> Path:
        return self.workspace(run_dir).model_folder(TRAINER_NAME, self.recipe.configuration)

    def fit(self, train_cases: Sequence["Case"], val_cases: Sequence["Case"], run_dir: Path) -> "NnUNetEnsemblePredictor":
        """Plan, preprocess, cross-validate and train nnU-Net on this fold's cases (or resume, or load).

        The returned predictor ensembles the folds, with mirroring per the schedule and the chosen
        postprocessing; its ``budget_used`` is also in ``run.json`` (``training.budget``).
        """
        run_dir = Path(run_dir)
        if not train_cases:
            raise NnUNetError("fit() needs at least one training case")
        claim_run_dir(run_dir, self.identity(train_cases, val_cases), info={"source": self.source})
        if read_training_record(run_dir) is None:
            self._train(list(train_cases), list(val_cases), run_dir)
        return self.predictor(run_dir)

    def predictor(self, run_dir: Path) -> "NnUNetEnsemblePredictor":
        """The trained fold's predictor (every internal fold, mirroring and postprocessing as recorded)."""
        record = read_training_record(run_dir) or {}
        nnunet = record.get("nnunet", {})
        inference = self.recipe.inference_for(self.schedule_name)
        model_folder = self.model_folder(run_dir)
        predictor = NnUNetEnsemblePredictor(
            model_folder,
            folds=nnunet.get("folds", list(range(self.schedule.folds))),
            checkpoint=nnunet.get("checkpoint", self.recipe.checkpoint),
            channels=self.channels,
            device=self.device_preference,
            tile_step_size=inference.tile_step_size,
            use_mirroring=inference.mirroring,
            postprocessing_folder=Path(run_dir) / nnunet["postprocessing_folder"] if nnunet.get("postprocessing_folder") else None,
        )
        predictor.budget_used = read_budget_used(run_dir)
        return predictor

    def _train(self, train_cases: list["Case"], val_cases: list["Case"], run_dir: Path) -> None:
        import torch

        device = select_device(self.device_preference)
        workspace = self.workspace(run_dir)
        data_workers = self.schedule.data_workers
        if data_workers is None and device.type == "cpu":
            data_workers = 0  # background augmentation processes only pay off next to a GPU
        cases = {c.case_id: c for c in [*train_cases, *val_cases]}
        # planning sets torch's thread count to nnUNet_n_proc_DA for a moment, so it must be >= 1 there
        with nnunet_environment(workspace, data_workers=1), output_to_log(run_dir / NNUNET_LOG):
            start = time.perf_counter()
            write_raw_dataset(workspace.raw_dataset, list(cases.values()), self.channels)
            plans = plan_and_preprocess(workspace, self.recipe, self.schedule)
            splits = internal_splits([c.case_id for c in train_cases], [c.case_id for c in val_cases], self.schedule.folds)
            write_splits_final(workspace.preprocessed_dataset, splits)
            append_log(run_dir, f"nnU-Net planned and preprocessed {len(cases)} cases in {time.perf_counter() - start:.1f}s; {len(splits)} internal fold(s)")

        config = plans["configurations"][self.recipe.configuration]
        plan = self.recipe.step_plan(self.schedule_name, patch_size=tuple(config["patch_size"]), batch_size=int(config["batch_size"]))
        assert plan is not None
        edits = plans.get(PLAN_EDITS_KEY)
        if edits:
            append_log(run_dir, f"plan edits: {edits['planned']} -> {edits['edited']}")
        append_log(run_dir, f"budget: {plan.describe()}; each fold {plan.epochs} epochs x {plan.iterations_per_epoch} iterations")
        model_folder = self.model_folder(run_dir)
        val_iterations = self.schedule.val_iterations_per_epoch or NNUNET_VAL_ITERATIONS_PER_EPOCH
        histories: list[dict[str, Any]] = []
        steps_done = 0
        previous_benchmark = torch.backends.cudnn.benchmark
        if device.type == "cuda":  # what nnunetv2.run.run_training does before training
            torch.backends.cudnn.deterministic = False
            torch.backends.cudnn.benchmark = True
        try:
            for fold in range(len(splits)):
                fold_folder = model_folder / f"fold_{fold}"
                with nnunet_environment(workspace, data_workers), output_to_log(run_dir / NNUNET_LOG):
                    if not (fold_folder / "checkpoint_final.pth").is_file():
                        history = self._train_fold(workspace, fold, fold_folder, plan, val_iterations, device, run_dir)
                    else:
                        history = []
                    steps_done += int(load_nnunet_checkpoint(fold_folder / "checkpoint_final.pth").get("current_epoch", 0)) * plan.iterations_per_epoch
                histories.extend(history)
                if histories:
                    write_history(run_dir, histories)
                    write_curves(run_dir, [{**row, "epoch": index} for index, row in enumerate(histories)])
        finally:
            torch.backends.cudnn.benchmark = previous_benchmark

        pp_folder, pp_report = None, None
        if self.recipe.postprocessing == "determine":
            start = time.perf_counter()
            pp_folder, pp_report = self._determine_postprocessing(workspace, model_folder, splits, cases, device)
            append_log(
                run_dir,
                f"postprocessing (nnU-Net's rule on {pp_report['cases']} cross-validation predictions, {time.perf_counter() - start:.1f}s): "
                f"{pp_report['postprocessing_fns'] or 'none'}; mean Dice {pp_report['input_folder']['foreground_mean']['Dice']:.4f} -> "
                f"{pp_report['postprocessed']['foreground_mean']['Dice']:.4f}",
            )
        used = BudgetUsed.from_plan(plan, steps_done)
        inference = self.recipe.inference_for(self.schedule_name)
        cuda = device.type == "cuda"
        record_training(
            run_dir,
            {
                "budget": used.to_dict(),
                "device": {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda, "name": torch.cuda.get_device_name(device) if cuda else "cpu"},
                "policy": {
                    "amp": cuda,
                    "amp_dtype": "float16" if cuda else None,  # nnU-Net's autocast (default CUDA dtype) with a GradScaler
                    "grad_scaler": cuda,
                    "cudnn_benchmark": cuda,
                    "compile": cuda and os.environ.get("nnUNet_compile", "true").lower() in ("true", "1", "t"),
                    "data_workers": data_workers,
                },
                "inference_amp_dtype": "float16" if cuda else None,
                **({"transfer": self.transfer_report} if getattr(self, "transfer_report", None) else {}),
                "nnunet": {
                    "trainer": TRAINER_NAME,
                    "configuration": self.recipe.configuration,
                    "model_folder": str(model_folder.relative_to(run_dir)),
                    "folds": list(range(len(splits))),
                    "checkpoint": self.recipe.checkpoint,
                    "epochs_per_fold": plan.epochs,
                    "iterations_per_epoch": plan.iterations_per_epoch,
                    "val_iterations_per_epoch": val_iterations,
                    "patch_size": list(config["patch_size"]),
                    "batch_size": int(config["batch_size"]),
                    "spacing": list(config["spacing"]),
                    "plan_edits": edits,
                    "mirroring": inference.mirroring,
                    "tile_step_size": inference.tile_step_size,
                    "postprocessing": pp_report["postprocessing_fns"] if pp_report else "not determined (recipe: none)",
                    "postprocessing_folder": str(pp_folder.relative_to(run_dir)) if pp_folder else None,
                },
            },
        )
        append_log(run_dir, f"finished: {len(splits)} fold(s); {used}")

    def _train_fold(self, workspace: NnUNetWorkspace, fold: int, fold_folder: Path, plan, val_iterations: int, device, run_dir: Path) -> list[dict[str, Any]]:
        # as maybe_load_checkpoint() for `nnUNetv2_train --c`: the latest checkpoint, else the best one
        resume_from = next((p for p in (fold_folder / "checkpoint_latest.pth", fold_folder / "checkpoint_best.pth") if p.is_file()), None)
        trainer = make_trainer(workspace, self.recipe, fold, device, continue_training=resume_from is not None)
        trainer.configure_budget(
            epochs=plan.epochs,
            iterations_per_epoch=plan.iterations_per_epoch,
            val_iterations_per_epoch=val_iterations,
            save_every=self.schedule.save_every,
            max_steps=plan.steps_per_model,
        )
        if resume_from is not None:
            trainer.load_checkpoint(str(resume_from))
            append_log(run_dir, f"nnU-Net fold {fold} resumed from {resume_from.name} at epoch {trainer.current_epoch}")
        elif (transfer := transfer_config(self.recipe)) is not None:
            # the strict check and a weights-only read are bench.models.transfer's; the matched tensors
            # are then loaded by nnU-Net's own mechanism (its seg layers are never transferred)
            from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

            trainer.initialize()
            handover = fold_folder / "pretrained_weights.pth"
            report = prepare_nnunet_weights(trainer.network, transfer, submission_dir=self.submission_dir,
                                            results_dirs=default_results_dirs(), out=handover)
            load_pretrained_weights(trainer.network, str(handover), verbose=False)
            handover.unlink(missing_ok=True)
            self.transfer_report = report.to_dict()
            append_log(run_dir, f"nnU-Net fold {fold} initialised {report.loaded}/{report.expected} tensors ({report.share:.0%}) "
                                f"from {transfer.checkpoint} (sha256 {report.sha256[:12]})")
        start = time.perf_counter()
        trainer.run_training()
        history = [{**row, "fold": fold} for row in nnunet_history(trainer)]
        last = history[-1]["patches_per_s"] if history else float("nan")
        append_log(run_dir, f"nnU-Net fold {fold} trained {trainer.num_epochs} epochs x {trainer.num_iterations_per_epoch} iterations in {time.perf_counter() - start:.1f}s ({last:.2f} patches/s in the last epoch)")
        return history

    def _determine_postprocessing(self, workspace: NnUNetWorkspace, model_folder: Path, splits, cases: Mapping[str, "Case"], device) -> tuple[Path, dict[str, Any]]:
        """Cross-validation predictions (each fold's model on its validation cases, written to
        ``fold_<f>/validation/`` as nnU-Net does) and nnU-Net's postprocessing rule on them."""
        from bench.imageio import write_image

        inference = self.recipe.inference_for(self.schedule_name)
        predictions: dict[str, np.ndarray] = {}
        references: dict[str, np.ndarray] = {}
        for fold, split in enumerate(splits):
            runner = NnUNetEnsemblePredictor(
                model_folder, folds=[fold], checkpoint=self.recipe.checkpoint, channels=self.channels, device=str(device),
                tile_step_size=inference.tile_step_size, use_mirroring=inference.mirroring,
            )
            folder = model_folder / f"fold_{fold}" / "validation"
            folder.mkdir(parents=True, exist_ok=True)
            for case_id in split["val"]:
                if case_id in predictions:  # folds: 1 without validation cases validates on training cases
                    continue
                case = cases[case_id]
                mask = runner.predict(case)
                predictions[case_id] = mask.astype(np.uint8) * LESION_LABEL
                references[case_id] = (case.load_label() > 0).astype(np.uint8) * LESION_LABEL
                write_image(predictions[case_id], case.geometry, folder / f"{case_id}.nii.gz")
            runner.close()
        pp_fns, pp_kwargs, report = determine_postprocessing_in_process(predictions, references)
        folder = cross_validation_folder(model_folder, len(splits))
        save_postprocessing(folder, pp_fns, pp_kwargs, report)
        return folder, report


def nnunet_history(trainer) -> list[dict[str, Any]]:
    """Per-epoch rows from nnU-Net's logger in the columns of the MONAI trainer's ``history.csv``.

    ``val_dice`` is nnU-Net's pseudo Dice (on validation patches); ``train_s`` and ``patches_per_s``
    exist for the epochs this process trained with :class:`~bench.models.nnunet_trainer.BudgetTrainer`.
    """
    logged = {key: list(trainer.logger.get_value(key, step=None)) for key in ("train_losses", "val_losses", "mean_fg_dice", "lrs", "epoch_start_timestamps", "epoch_end_timestamps")}
    n_epochs = len(logged["train_losses"])
    seconds = list(getattr(trainer, "train_seconds", []))
    first_timed = n_epochs - len(seconds)
    patches = trainer.num_iterations_per_epoch * trainer.batch_size
    rows = []
    for epoch in range(n_epochs):
        train_s = seconds[epoch - first_timed] if epoch >= first_timed else float("nan")
        rows.append(
            {
                "epoch": epoch,
                "lr": float(logged["lrs"][epoch]) if epoch < len(logged["lrs"]) else float("nan"),
                "train_loss": float(logged["train_losses"][epoch]),
                "val_loss": float(logged["val_losses"][epoch]) if epoch < len(logged["val_losses"]) else float("nan"),
                "val_dice": float(logged["mean_fg_dice"][epoch]) if epoch < len(logged["mean_fg_dice"]) else float("nan"),
                "epoch_s": float(logged["epoch_end_timestamps"][epoch] - logged["epoch_start_timestamps"][epoch])
                if epoch < min(len(logged["epoch_end_timestamps"]), len(logged["epoch_start_timestamps"]))
                else float("nan"),
                "train_s": train_s,
                "steps": trainer.num_iterations_per_epoch,
                "patches_per_s": patches / train_s if train_s > 0 else float("nan"),
            }
        )
    return rows


def load_nnunet_checkpoint(path: Path) -> dict[str, Any]:
    """Load an nnU-Net checkpoint with the restricted unpickler (tensors, plain data, numpy scalars)."""
    import torch

    core = getattr(np, "_core", None) or np.core
    safe = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    safe += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    with torch.serialization.safe_globals(safe):
        return torch.load(path, map_location="cpu", weights_only=True)


class NnUNetEnsemblePredictor:
    """The trained nnU-Net of one benchmark fold: every internal fold's checkpoint ensembled by
    ``nnUNetPredictor`` (softmax-averaged logits), mirroring as configured, then the postprocessing
    nnU-Net's rule chose (``postprocessing_folder/postprocessing.json``), on a case's native channels.

    Runs on :class:`bench.inference.nnunet.NnUNetRunner`, the one nnU-Net runner that ``kind: nnunet``
    submissions use too, so a trained fold and its export predict alike.
    """

    #: Set by ``NnUNetTrainable.fit``: the :class:`~bench.models.recipe.BudgetUsed` of the training.
    budget_used = None

    def __init__(
        self,
        model_folder: Path,
        *,
        folds: Sequence[int] = (FOLD,),
        checkpoint: str = "checkpoint_final.pth",
        channels: Sequence[str] = ("ADC", "Z-ADC"),
        device: str | None = None,
        tile_step_size: float = 0.5,
        use_mirroring: bool = True,
        postprocessing_folder: Path | None = None,
    ) -> None:
        from bench.inference.nnunet import NnUNetRunner

        self.model_folder = Path(model_folder)
        self.folds = [int(f) for f in folds]
        self.checkpoint = checkpoint
        self.device = select_device(device)
        self.postprocessing_folder = Path(postprocessing_folder) if postprocessing_folder is not None else None
        from bench.inference.nnunet import load_postprocessing

        self.postprocess = load_postprocessing(Path(self.postprocessing_folder) / POSTPROCESSING_JSON) if self.postprocessing_folder is not None else None
        for fold in self.folds:
            if not (self.model_folder / f"fold_{fold}" / checkpoint).is_file():
                raise NnUNetError(f"{self.model_folder / f'fold_{fold}' / checkpoint}: no trained nnU-Net checkpoint")
        # nnUNetPredictor prints a note about perform_everything_on_device on every CPU construction
        with contextlib.redirect_stdout(io.StringIO()):
            self.runner = NnUNetRunner(
                self.model_folder,
                folds=self.folds,
                checkpoint=checkpoint,
                channels=channels,
                device=str(self.device),
                tile_step_size=tile_step_size,
                use_mirroring=use_mirroring,
                lesion_label=LESION_LABEL,
                postprocess=self.postprocess,
            )

    @property
    def postprocessing(self) -> list[str]:
        """Names of the postprocessing steps applied (nnU-Net's functions); empty for none."""
        if self.postprocessing_folder is None or not (self.postprocessing_folder / POSTPROCESSING_JSON).is_file():
            return []
        return list(json.loads((self.postprocessing_folder / POSTPROCESSING_JSON).read_text()).get("postprocessing_fns", []))

    def predict(self, case: "Case") -> np.ndarray:
        """Boolean lesion mask on the case's native grid ``(z, y, x)``."""
        mask = self.runner.predict(case)
        if mask.shape != tuple(case.geometry.shape):
            raise NnUNetError(f"case {case.case_id}: nnU-Net returned shape {mask.shape}, the native grid is {tuple(case.geometry.shape)}")
        return mask

    def predict_probabilities(self, case: "Case") -> np.ndarray:
        """The ensemble's lesion probability on the native grid (before postprocessing)."""
        return self.runner.predict_probabilities(case)

    def close(self) -> None:
        """Release the network (nothing runs in another process)."""
        self.runner = None  # type: ignore[assignment]


def nnunet_export_spec(run_dir: Path) -> dict[str, Any]:
    """What an export of a trained nnU-Net fold must carry to predict as the fold does: the model
    folder, every internal fold, the checkpoint, mirroring and the postprocessing file (relative to
    ``run_dir``), from ``run.json``. For :mod:`bench.models.export`."""
    record = read_training_record(run_dir)
    if not record or "nnunet" not in record:
        raise NnUNetError(f"{run_dir}: the nnU-Net fold has not finished training (no training record in run.json)")
    nnunet = record["nnunet"]
    return {
        "model_folder": nnunet["model_folder"],
        "folds": list(nnunet["folds"]),
        "checkpoint": nnunet["checkpoint"],
        "use_mirroring": bool(nnunet["mirroring"]),
        "tile_step_size": float(nnunet["tile_step_size"]),
        "postprocessing_file": f"{nnunet['postprocessing_folder']}/{POSTPROCESSING_JSON}" if nnunet.get("postprocessing_folder") else None,
        "postprocessing": nnunet.get("postprocessing"),
    }
