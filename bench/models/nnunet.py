"""The nnU-Net v2 baseline, driven through nnU-Net's Python API inside a benchmark run folder.

nnU-Net finds its data through three environment variables. This adapter points them at folders inside
the run folder, only while it runs nnU-Net (:func:`nnunet_environment`), so several folds, runs and
users never share or overwrite an nnU-Net tree, and nothing outside the adapter depends on them::

    <run_dir>/run.json
    <run_dir>/train.log, nnunet.log                     the adapter's progress, nnU-Net's console output
    <run_dir>/nnunet/raw/Dataset501_HIEBench/            links to the fold's training cases + dataset.json
    <run_dir>/nnunet/preprocessed/Dataset501_HIEBench/   plans, fingerprint, splits_final.json, arrays
    <run_dir>/nnunet/results/Dataset501_HIEBench/<trainer>__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth

One :meth:`NnUNetTrainable.fit` call

1. links the fold's training and validation cases into an nnU-Net *raw* dataset (the benchmark dataset is
   already in that layout; only the fold's cases are linked, so planning never sees the test cases);
2. extracts the fingerprint, plans and preprocesses the ``3d_fullres`` configuration
   (:mod:`nnunetv2.experiment_planning.plan_and_preprocess_api`);
3. writes ``splits_final.json`` with the benchmark's train/validation split as nnU-Net's fold 0, so
   nnU-Net validates on exactly the cases every other entrant validates on (:func:`write_splits_final`);
4. trains: ``nnUNetTrainer`` itself for the default (GPU) schedule, or
   :class:`~bench.models.nnunet_trainer.ShortScheduleTrainer` when the recipe shortens it (CPU tests, demo); an interrupted training resumes from
   ``checkpoint_latest.pth`` as ``nnUNetv2_train --c`` would;
5. returns a predictor that runs ``nnUNetPredictor`` on a case's native arrays.

nnU-Net's lookup of trainer classes by name (``recursive_find_python_class``) imports every module of
its trainer package, some of which need torchvision; the adapter therefore constructs its trainer class
directly (as ``nnunetv2.run.run_training`` does after the lookup) and builds the inference network with
the trainer's ``build_network_architecture`` plus ``nnUNetPredictor.manual_initialization``.
"""

from __future__ import annotations

import contextlib
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
from bench.models.recipe import NnUNetRecipe, NnUNetSchedule, ScheduleName
from bench.models.runfolder import append_log, claim_run_dir, select_device, write_curves, write_history

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
    ``splits[i]``. :meth:`NnUNetTrainable.fit` writes the one split it trains; for a whole
    cross-validation with nnU-Net's own tools, pass :func:`bench.data.splits.to_nnunet_splits` of the
    benchmark's folds.
    """
    cleaned = []
    for index, split in enumerate(splits):
        train, val = [str(c) for c in split["train"]], [str(c) for c in split["val"]]
        if not train:
            raise NnUNetError(f"split {index} has no training case")
        cleaned.append({"train": train, "val": val})
    return write_text_atomic(preprocessed_dataset / SPLITS_FILE, json.dumps(cleaned, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Planning, preprocessing, training
# --------------------------------------------------------------------------------------------------


def plan_and_preprocess(workspace: NnUNetWorkspace, recipe: NnUNetRecipe, schedule: NnUNetSchedule, num_processes: int = 1) -> dict[str, Any]:
    """Fingerprint, plan and preprocess the workspace's dataset (skipped when already done); returns the plans.

    Mirrors ``nnUNetv2_plan_and_preprocess`` through :mod:`nnunetv2.experiment_planning.plan_and_preprocess_api`,
    with the classes passed directly (no lookup by name, hence no package scan) and only the recipe's
    configuration preprocessed. Must run inside :func:`nnunet_environment`.
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
        preprocess_dataset(
            workspace.dataset_id, PLANS_NAME, configurations=(recipe.configuration,), num_processes=[num_processes], verbose=False, show_progress_bar=False
        )
        marker.write_text("done\n")
    return json.loads(plans_file.read_text())


def uses_nnunet_schedule(schedule: NnUNetSchedule) -> bool:
    """True when the schedule is nnU-Net's own, which trains with ``nnUNetTrainer`` itself."""
    return schedule.is_default and schedule.save_every is None


def trainer_class_name(schedule: NnUNetSchedule) -> str:
    """Name of the trainer class a schedule trains with (it names nnU-Net's model folder)."""
    return "nnUNetTrainer" if uses_nnunet_schedule(schedule) else "ShortScheduleTrainer"


def trainer_class_for(schedule: NnUNetSchedule):
    """``nnUNetTrainer`` for nnU-Net's own schedule, :class:`~bench.models.nnunet_trainer.ShortScheduleTrainer` otherwise."""
    if uses_nnunet_schedule(schedule):
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    from bench.models.nnunet_trainer import ShortScheduleTrainer

    return ShortScheduleTrainer


def make_trainer(workspace: NnUNetWorkspace, recipe: NnUNetRecipe, schedule: NnUNetSchedule, device, *, continue_training: bool):
    """Construct the trainer as ``nnunetv2.run.run_training.get_trainer_from_args`` does, minus the class lookup.

    ``plans["continue_training"]`` is what ``get_trainer_from_args`` sets and the trainer pops: it tells
    nnU-Net's logger to append to the existing log instead of starting a new one. A batch-size override
    is written into the plans, which the trainer copies to the model folder for inference.
    """
    plans = json.loads((workspace.preprocessed_dataset / f"{PLANS_NAME}.json").read_text())
    dataset_json = json.loads((workspace.preprocessed_dataset / "dataset.json").read_text())
    if recipe.configuration not in plans["configurations"]:
        raise NnUNetError(f"nnU-Net planned no '{recipe.configuration}' configuration for this dataset (it has {sorted(plans['configurations'])})")
    if schedule.batch_size is not None:
        plans["configurations"][recipe.configuration]["batch_size"] = schedule.batch_size
    plans["continue_training"] = continue_training
    cls = trainer_class_for(schedule)
    trainer = cls(plans=plans, configuration=recipe.configuration, fold=FOLD, dataset_json=dataset_json, device=device)
    if not uses_nnunet_schedule(schedule):
        trainer.configure_schedule(schedule)
    return trainer


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
        if schedule_name not in recipe.schedules:
            raise ValueError(f"recipe has no '{schedule_name}' schedule (it has: {', '.join(recipe.schedules)})")
        self.recipe = recipe
        self.schedule_name = schedule_name
        self.schedule: NnUNetSchedule = recipe.schedules[schedule_name]
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
            "channels": list(self.channels),
            "train_cases": [c.case_id for c in train_cases],
            "val_cases": [c.case_id for c in val_cases],
        }

    def workspace(self, run_dir: Path) -> NnUNetWorkspace:
        return NnUNetWorkspace(Path(run_dir) / "nnunet", self.recipe.dataset_id)

    def fit(self, train_cases: Sequence["Case"], val_cases: Sequence["Case"], run_dir: Path) -> "NnUNetRunPredictor":
        """Plan, preprocess and train nnU-Net on this fold (or resume, or load the finished model)."""
        run_dir = Path(run_dir)
        if not train_cases:
            raise NnUNetError("fit() needs at least one training case")
        claim_run_dir(run_dir, self.identity(train_cases, val_cases), info={"source": self.source})
        workspace = self.workspace(run_dir)
        trainer_name = trainer_class_name(self.schedule)
        fold_folder = workspace.model_folder(trainer_name, self.recipe.configuration) / f"fold_{FOLD}"
        if not (fold_folder / "checkpoint_final.pth").is_file():
            self._train(list(train_cases), list(val_cases), run_dir, workspace, fold_folder)
        return NnUNetRunPredictor(
            fold_folder.parent,
            channels=self.channels,
            device=self.device_preference,
            tile_step_size=self.recipe.inference_for(self.schedule_name).tile_step_size,
            use_mirroring=self.recipe.inference_for(self.schedule_name).mirroring,
        )

    def _train(self, train_cases: list["Case"], val_cases: list["Case"], run_dir: Path, workspace: NnUNetWorkspace, fold_folder: Path) -> None:
        device = select_device(self.device_preference)
        data_workers = self.schedule.data_workers
        if data_workers is None and device.type == "cpu":
            data_workers = 0  # background augmentation processes only pay off next to a GPU
        # planning sets torch's thread count to nnUNet_n_proc_DA for a moment, so it must be >= 1 there
        with nnunet_environment(workspace, data_workers=1), output_to_log(run_dir / NNUNET_LOG):
            start = time.perf_counter()
            write_raw_dataset(workspace.raw_dataset, [*train_cases, *val_cases], self.channels)
            plan_and_preprocess(workspace, self.recipe, self.schedule)
            append_log(run_dir, f"nnU-Net planned and preprocessed {len(train_cases) + len(val_cases)} cases in {time.perf_counter() - start:.1f}s")
            train_ids = [c.case_id for c in train_cases]
            # nnU-Net needs validation cases; without any, it validates on the training cases (as its fold "all" does)
            val_ids = [c.case_id for c in val_cases] or train_ids
            write_splits_final(workspace.preprocessed_dataset, [{"train": train_ids, "val": val_ids}])

        with nnunet_environment(workspace, data_workers), output_to_log(run_dir / NNUNET_LOG):
            # as maybe_load_checkpoint() for `nnUNetv2_train --c`: the latest checkpoint, else the best one
            resume_from = next((p for p in (fold_folder / "checkpoint_latest.pth", fold_folder / "checkpoint_best.pth") if p.is_file()), None)
            trainer = make_trainer(workspace, self.recipe, self.schedule, device, continue_training=resume_from is not None)
            if resume_from is not None:
                trainer.load_checkpoint(str(resume_from))
                append_log(run_dir, f"nnU-Net resumed from {resume_from} at epoch {trainer.current_epoch}")
            elif self.recipe.pretrained_weights:
                from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

                weights = Path(self.recipe.pretrained_weights)
                if not weights.is_absolute() and self.submission_dir is not None:
                    weights = self.submission_dir / weights
                if not weights.is_file():
                    raise FileNotFoundError(f"{weights}: pretrained nnU-Net checkpoint not found")
                trainer.initialize()
                load_pretrained_weights(trainer.network, str(weights), verbose=False)
                append_log(run_dir, f"nnU-Net initialised from {weights}")
            start = time.perf_counter()
            trainer.run_training()
            history = nnunet_history(trainer)
            write_history(run_dir, history)
            write_curves(run_dir, history)
            last = history[-1]["patches_per_s"] if history else float("nan")
            append_log(run_dir, f"nnU-Net trained {trainer.num_epochs} epochs in {time.perf_counter() - start:.1f}s ({last:.2f} patches/s in the last epoch)")


def nnunet_history(trainer) -> list[dict[str, Any]]:
    """Per-epoch rows from nnU-Net's logger in the columns of the MONAI trainer's ``history.csv``.

    ``val_dice`` is nnU-Net's pseudo Dice (on validation patches); ``train_s`` and ``patches_per_s``
    exist for the epochs this process trained with :class:`~bench.models.nnunet_trainer.ShortScheduleTrainer`.
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


class NnUNetRunPredictor:
    """Runs a trained nnU-Net fold with ``nnUNetPredictor`` on a case's native channels.

    The network is built with ``nnUNetTrainer.build_network_architecture`` (the short-schedule trainer
    builds the very same network) and handed to ``nnUNetPredictor.manual_initialization``. nnU-Net
    preprocesses, predicts with Gaussian-weighted sliding windows and mirroring, and resamples the
    segmentation back to the input grid itself; the mask therefore has the case's native shape.
    """

    def __init__(
        self,
        model_folder: Path,
        *,
        channels: Sequence[str] = ("ADC", "Z-ADC"),
        fold: int = FOLD,
        checkpoint: str = "checkpoint_final.pth",
        device: str | None = None,
        tile_step_size: float = 0.5,
        use_mirroring: bool = True,
    ) -> None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.model_folder = Path(model_folder)
        self.channels = tuple(channels)
        self.device = select_device(device)
        checkpoint_path = self.model_folder / f"fold_{fold}" / checkpoint
        if not checkpoint_path.is_file():
            raise NnUNetError(f"{checkpoint_path}: no trained nnU-Net checkpoint")
        state = load_nnunet_checkpoint(checkpoint_path)
        dataset_json = json.loads((self.model_folder / "dataset.json").read_text())
        plans_manager = PlansManager(json.loads((self.model_folder / "plans.json").read_text()))
        configuration = plans_manager.get_configuration(state["init_args"]["configuration"])
        n_inputs = determine_num_input_channels(plans_manager, configuration, dataset_json)
        n_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration, n_inputs, n_outputs, enable_deep_supervision=False)
        network.load_state_dict(state["network_weights"])
        self.predictor = nnUNetPredictor(
            tile_step_size=tile_step_size,
            use_gaussian=True,
            use_mirroring=use_mirroring,
            perform_everything_on_device=self.device.type == "cuda",
            device=self.device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        self.predictor.manual_initialization(
            network.to(self.device),
            plans_manager,
            configuration,
            [state["network_weights"]],
            dataset_json,
            state.get("trainer_name", "nnUNetTrainer"),
            state.get("inference_allowed_mirroring_axes"),
        )

    def predict(self, case: "Case") -> np.ndarray:
        """Boolean lesion mask on the case's native grid ``(z, y, x)``."""
        arrays, geometry = [], None
        for name in self.channels:
            array, channel_geometry = case.load_channel(name)
            geometry = geometry or channel_geometry
            arrays.append(array)
        image = np.stack(arrays).astype(np.float32)
        segmentation = np.asarray(self.predictor.predict_single_npy_array(image, {"spacing": list(geometry.spacing)}))
        if segmentation.shape != tuple(geometry.shape):
            raise NnUNetError(f"case {case.case_id}: nnU-Net returned shape {segmentation.shape}, the native grid is {tuple(geometry.shape)}")
        return segmentation == LESION_LABEL
