"""The MONAI trainer: fits a registered network on preprocessed cases, resumably, for exactly its budget.

:class:`MonaiTrainable` implements :class:`bench.predictor.Trainable`. One ``fit`` call:

1. claims the run folder (``run.json``); a finished ``model.pt`` is simply loaded;
2. resolves the preprocessing's target spacing (``median``: nnU-Net's rule on the fold's training and
   validation cases, the very cases nnU-Net plans from) and preprocesses the cases (cached);
3. builds the network from the registry for the data's channels, patch size and median spacing, and
   initialises it from a transfer checkpoint if the recipe names one;
4. trains for the schedule's budget (:func:`bench.models.recipe.plan_steps`: ``budget // (batch x patch
   voxels)`` optimizer steps, in epochs of ``iterations_per_epoch``, the last one cut so that training
   stops exactly at the budget) on augmented, foreground-oversampled patches with the recipe's loss,
   optimizer and learning-rate schedule; the encoder optionally frozen for the first epochs;
5. validates on the held-out cases (sliding-window Dice on the preprocessed grid), keeps the best
   weights and stops early when the Dice stops improving;
6. checkpoints every epoch (``checkpoint.pt``, resumed after an interruption), writes ``history.csv`` and
   ``curves.png``, finally ``model.pt``, and records the budget used, the device and the speed policy in
   ``run.json`` (``training``; :func:`bench.models.runfolder.read_budget_used`).

GPU work (:func:`training_policy`, recorded with the run): AMP (bfloat16 where supported, else float16
with a gradient scaler), channels-last-3d, ``torch.compile`` for long runs, ``cudnn.benchmark`` (every
training patch and every sliding window has the same size), one DataLoader for the whole run with
persistent workers and pinned memory, and no host synchronisation per step (the loss is summed on the
device and read once per epoch). On a CPU with ``num_workers: 0`` the loader is a plain in-process loop.

Randomness is keyed by (seed, epoch, sample index), so a resumed run draws the same patches as an
uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from bench.models.recipe import BudgetUsed, InferenceConfig, bound_schedule, MonaiRecipe, MonaiSchedule, ScheduleName, StepPlan
from bench.models.runfolder import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    append_log,
    claim_run_dir,
    read_budget_used,
    record_training,
    select_device,
    torch_save_atomic,
    write_curves,
    write_history,
)

if TYPE_CHECKING:
    import torch

    from bench.data.dataset import Case
    from bench.models.monai_model import MonaiPredictor
    from bench.preprocess import PreprocessedCase, PreprocessingConfig

#: Output channels of every network: background and lesion logits.
OUT_CHANNELS = 2
#: ``compile="auto"`` compiles only runs with at least this many iterations (compilation takes ~1 min).
COMPILE_MIN_ITERATIONS = 5000


class TrainingError(RuntimeError):
    """Training cannot proceed (e.g. a training case without a label); the message names the case."""


class BudgetExceededError(TrainingError):
    """A trainer was about to take a step beyond its budget; training stops instead of running longer."""


@dataclass
class TrainingState:
    """What a checkpoint restores besides the weights and optimizer."""

    epoch: int = 0  # next epoch to run
    history: list[dict[str, Any]] = field(default_factory=list)
    best_dice: float = -1.0
    best_epoch: int = -1
    best_state: dict[str, Any] | None = None
    stale_validations: int = 0
    stopped_early: bool = False
    #: Optimizer steps taken so far (all epochs).
    steps: int = 0


@dataclass(frozen=True)
class TrainingPolicy:
    """How the trainer uses its device (recorded in ``run.json`` as ``training.policy``)."""

    device: str
    amp: bool
    #: ``bfloat16`` / ``float16`` under AMP, ``None`` (float32) otherwise.
    amp_dtype: str | None
    grad_scaler: bool
    channels_last: bool
    compile: bool
    cudnn_benchmark: bool
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_policy(schedule: MonaiSchedule, device: str, *, total_steps: int, bf16_supported: bool = False) -> TrainingPolicy:
    """The speed settings for ``schedule`` on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``); pure, so
    tests check the CUDA policy without a GPU.

    On CUDA: AMP unless ``amp: false`` (bfloat16 when the GPU supports it, else float16 with a gradient
    scaler), channels-last unless switched off, ``torch.compile`` for runs of at least
    :data:`COMPILE_MIN_ITERATIONS` steps (``compile: auto``), ``cudnn.benchmark`` (fixed patch sizes),
    pinned host memory. Everywhere: worker processes, when the schedule has any, persist for the whole
    run and prefetch 4 batches each.
    """
    cuda = device.startswith("cuda")
    amp = cuda and schedule.amp in (True, "auto")
    dtype = ("bfloat16" if bf16_supported else "float16") if amp else None
    workers = int(schedule.num_workers)
    return TrainingPolicy(
        device=device,
        amp=amp,
        amp_dtype=dtype,
        grad_scaler=dtype == "float16",
        channels_last=cuda and schedule.channels_last in (True, "auto"),
        compile=schedule.compile is True or (schedule.compile == "auto" and cuda and total_steps >= COMPILE_MIN_ITERATIONS),
        cudnn_benchmark=cuda,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


@contextmanager
def cudnn_benchmark(enabled: bool):
    """``torch.backends.cudnn.benchmark`` on for the ``with`` block (restored afterwards)."""
    import torch

    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(enabled) or previous
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


class PatchDataset:
    """Augmented patches for a whole run (a map-style torch dataset indexed by the run's patch number).

    Patch ``g`` is patch ``g % patches_per_epoch`` of epoch ``g // patches_per_epoch`` and depends only on
    (seed, epoch, index), whichever worker process draws it and whether the run was resumed, so one
    DataLoader serves every epoch.
    """

    def __init__(self, samples: Sequence[dict[str, Any]], transform: Any, patches_per_epoch: int, seed: int, length: int) -> None:
        self.samples, self.transform, self.patches_per_epoch, self.seed, self.length = samples, transform, patches_per_epoch, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, within = divmod(int(index), self.patches_per_epoch)
        rng = np.random.default_rng([self.seed, epoch, within])
        sample = self.samples[int(rng.integers(len(self.samples)))]
        self.transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about meta-data conversions on every call
            return self.transform(sample)


def patch_loader(dataset: PatchDataset, batch_size: int, first_patch: int, policy: TrainingPolicy):
    """The run's one DataLoader: patches ``first_patch ..`` in order, in batches (workers persist)."""
    import torch

    options: dict[str, Any] = {}
    if policy.num_workers > 0:
        options = {"persistent_workers": policy.persistent_workers, "prefetch_factor": policy.prefetch_factor}
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=range(first_patch, len(dataset)),
        num_workers=policy.num_workers,
        pin_memory=policy.pin_memory,
        **options,
    )


def lr_at(epoch: int, epochs: int, recipe: MonaiRecipe) -> float:
    """Learning rate of ``epoch`` (0-based): linear warm-up, then poly / cosine decay or constant."""
    schedule, base = recipe.lr_schedule, recipe.optimizer.lr
    if epoch < schedule.warmup_epochs:
        return base * (epoch + 1) / (schedule.warmup_epochs + 1)
    span = max(1, epochs - schedule.warmup_epochs)
    progress = min(1.0, (epoch - schedule.warmup_epochs) / span)
    if schedule.name == "poly":
        factor = (1.0 - progress) ** schedule.power
    elif schedule.name == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0
    return schedule.min_lr + (base - schedule.min_lr) * factor


def validation_dice(model, cases: Sequence["PreprocessedCase"], patch_size: Sequence[int], inference: InferenceConfig, device, **options: bool) -> float:
    """Mean Dice over ``cases`` of sliding-window predictions on the preprocessed grid (a case without
    lesion counts 1 when nothing is predicted, 0 otherwise)."""
    from bench.inference import dice
    from bench.models.monai_model import sliding_window_probabilities

    scores = [
        dice(sliding_window_probabilities(model, item.image, patch_size, inference, device, **options) > inference.threshold, item.label)
        for item in cases
    ]
    return float(np.mean(scores))


def build_optimizer(parameters, recipe: MonaiRecipe) -> "torch.optim.Optimizer":
    import torch

    opt = recipe.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(parameters, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov and opt.momentum > 0, weight_decay=opt.weight_decay)
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return cls(parameters, lr=opt.lr, weight_decay=opt.weight_decay)


def load_transfer_weights(net: "torch.nn.Module", path: Path) -> tuple[int, int]:
    """Copy every tensor of the checkpoint at ``path`` whose name and shape match into ``net``.

    Accepts a HIE-Bench ``model.pt``, a training ``checkpoint.pt``, an nnU-Net-style dict with
    ``network_weights`` or a bare state dict. Returns (loaded, total) parameter counts; loading nothing
    is an error (the checkpoint is for another architecture).
    """
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"{path}: transfer checkpoint not found")
    data = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "network_state", "network_weights"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    own = net.state_dict()
    matching = {k: v for k, v in data.items() if k in own and getattr(v, "shape", None) == own[k].shape}
    if not matching:
        raise ValueError(f"{path}: no tensor matches the network by name and shape; is it a checkpoint of the same architecture?")
    own.update(matching)
    net.load_state_dict(own)
    return len(matching), len(own)


class MonaiTrainable:
    """A recipe with ``trainer: monai`` bound to a schedule and a preprocessing (see the module docstring).

    Args:
        recipe: the validated recipe.
        schedule_name: ``"cpu"`` or ``"gpu"`` (already resolved from ``"auto"``).
        preprocessing: the inputs' preprocessing (``None``: the standard pipeline).
        submission_dir: folder the recipe came from (relative transfer checkpoints are resolved there).
        cache_dir: preprocessing cache (``None``: no cache).
        device: force a device (``"cpu"``, ``"cuda"``); default CUDA if present.
        source: identity of the submission (name, version, authors, ...), recorded in ``run.json`` for exports.

    Raises:
        bench.models.recipe.BudgetError: the schedule asks for more than its budget.
    """

    def __init__(
        self,
        recipe: MonaiRecipe,
        schedule_name: ScheduleName,
        *,
        preprocessing: "PreprocessingConfig | None" = None,
        submission_dir: Path | None = None,
        cache_dir: Path | None = None,
        device: str | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        from bench.preprocess import PreprocessingConfig

        self.recipe = recipe
        self.schedule_name = schedule_name
        self.schedule: MonaiSchedule = bound_schedule(recipe, schedule_name)
        #: Optimizer steps and epochs within the schedule's budget (checked now, not after training).
        self.step_plan: StepPlan = recipe.step_plan(schedule_name)
        self.preprocessing = preprocessing or PreprocessingConfig()
        self.submission_dir = Path(submission_dir) if submission_dir is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device_preference = device
        self.source = dict(source or {})
        self._check_network()

    def _check_network(self) -> None:
        """Build the network once for the schedule's patch size, so a wrong name, bad params or a patch
        the architecture cannot take fail when the submission is loaded, not hours into a run.

        Isotropic spacing is assumed here; automatic plans never down-sample an axis that cannot be
        halved, so the real (anisotropic) spacing cannot make a checked patch size invalid.
        """
        from bench.models.networks import NetworkContext, build_network

        context = NetworkContext(len(self.preprocessing.channels), OUT_CHANNELS, tuple(self.schedule.patch_size))  # type: ignore[arg-type]
        build_network(self.recipe.network.name, self.recipe.network_params(self.schedule_name), context)

    # -- public API -------------------------------------------------------------------------------------

    def fit(self, train_cases: Sequence["Case"], val_cases: Sequence["Case"], run_dir: Path) -> "MonaiPredictor":
        """Train (or resume, or just load) the model of one fold; see the module docstring.

        The returned predictor's ``budget_used`` (a :class:`~bench.models.recipe.BudgetUsed`, also in
        ``run.json`` under ``training.budget``) says how much of the budget the training used.
        """
        from bench.models.monai_model import MonaiPredictor

        run_dir = Path(run_dir)
        if not train_cases:
            raise TrainingError("fit() needs at least one training case")
        claim_run_dir(run_dir, self.identity(train_cases, val_cases), info={"source": self.source})
        if not (run_dir / MODEL_FILE).is_file():
            self._train(list(train_cases), list(val_cases), run_dir)
        predictor = MonaiPredictor.from_run_dir(run_dir, device=self.device_preference, cache_dir=self.cache_dir)
        predictor.budget_used = read_budget_used(run_dir)
        if self.recipe.transfer_for(self.schedule_name).checkpoint:  # the stored per-fold budget says what the fold started from
            from bench.models.runfolder import read_training_record
            from bench.models.transfer import with_transfer

            predictor.budget_used = with_transfer(predictor.budget_used, (read_training_record(run_dir) or {}).get("transfer"))
        return predictor

    def identity(self, train_cases: Sequence["Case"], val_cases: Sequence["Case"]) -> dict[str, Any]:
        """What makes two trainings the same (recorded in ``run.json``)."""
        return {
            "trainer": "monai",
            "recipe": self.recipe.model_dump(mode="json"),
            "schedule": self.schedule_name,
            "budget": self.step_plan.budget.to_dict(),
            "preprocessing_id": self.preprocessing.id,
            "train_cases": [c.case_id for c in train_cases],
            "val_cases": [c.case_id for c in val_cases],
        }

    # -- training ---------------------------------------------------------------------------------------

    def _prepare(self, cases: Sequence["Case"], config: "PreprocessingConfig") -> list["PreprocessedCase"]:
        from bench.preprocess import preprocess

        prepared = []
        for case in cases:
            item = preprocess(case, config, self.cache_dir, with_label=True)
            if item.label is None:
                raise TrainingError(f"case {case.case_id} has no reference label ({case.label_path}); it cannot be used for training")
            prepared.append(item)
        return prepared

    def _train(self, train_cases: list["Case"], val_cases: list["Case"], run_dir: Path) -> None:
        import torch

        from bench.models.augmentation import build_train_transform, context_size, pad_to
        from bench.models.losses import build_loss
        from bench.models.monai_model import ModelBundle, inference_amp_dtype
        from bench.models.networks import NetworkContext, build_network, get_entry

        recipe, schedule, plan = self.recipe, self.schedule, self.step_plan
        transfer = recipe.transfer_for(self.schedule_name)
        inference = recipe.inference_for(self.schedule_name)
        device = select_device(self.device_preference)
        cuda = device.type == "cuda"
        policy = training_policy(schedule, str(device), total_steps=plan.steps, bf16_supported=cuda and torch.cuda.is_bf16_supported())
        amp_dtype = getattr(torch, policy.amp_dtype) if policy.amp_dtype else torch.float32

        start = time.perf_counter()
        # the target spacing of "median" is planned from all of the fold's non-test cases, as nnU-Net does
        preprocessing = self.preprocessing.resolved([*train_cases, *val_cases])
        train, val = self._prepare(train_cases, preprocessing), self._prepare(val_cases, preprocessing)
        append_log(
            run_dir,
            f"preprocessed {len(train)} training and {len(val)} validation cases in {time.perf_counter() - start:.1f}s "
            f"(target spacing {preprocessing.resolution})",
        )
        append_log(run_dir, f"budget: {plan.describe()} in {plan.epochs} epochs")
        in_channels = int(train[0].image.shape[0])
        spacing = tuple(float(s) for s in np.median([c.spacing for c in train], axis=0))
        context = NetworkContext(in_channels, OUT_CHANNELS, tuple(schedule.patch_size), spacing)  # type: ignore[arg-type]

        crop = context_size(schedule.patch_size, recipe.augmentation)
        samples = []
        for item in train:
            label = pad_to(item.label[None].astype(np.uint8), crop)
            samples.append({"image": pad_to(item.image, crop), "label": label, "foreground": np.argwhere(label[0])})
        transform = build_train_transform(schedule.patch_size, recipe.augmentation, recipe.sampling)

        torch.manual_seed(recipe.seed)
        network_params = recipe.network_params(self.schedule_name)
        net = build_network(recipe.network.name, network_params, context)
        encoder_prefixes = get_entry(recipe.network.name).encoder_prefixes
        if transfer.freeze_encoder_epochs and not encoder_prefixes:
            raise ValueError(f"network {recipe.network.name} does not declare its encoder, so transfer.freeze_encoder_epochs cannot be used")

        state = TrainingState()
        checkpoint_path = run_dir / CHECKPOINT_FILE
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True) if checkpoint_path.is_file() else None
        # transfer learning (bench.models.transfer): strict by default; also on resume, where the
        # checkpoint's weights then replace the loaded ones but the loaded names set the optimizer groups
        transfer_report, loaded_names, frozen_names = None, set(), set()
        if transfer.checkpoint:
            from bench.models.transfer import apply_transfer, default_results_dirs, parameter_groups

            results_dir = self.cache_dir.parent if self.cache_dir is not None else None  # the harness's <results>/cache
            transfer_report, loaded_names = apply_transfer(
                net, transfer, submission_dir=self.submission_dir, results_dirs=default_results_dirs(results_dir), out_channels=OUT_CHANNELS
            )
            frozen_names = {n for n, _ in net.named_parameters() if transfer.freeze and n.startswith(tuple(transfer.freeze))}
            if checkpoint is None:
                append_log(run_dir, f"initialised {transfer_report.loaded}/{transfer_report.expected} tensors ({transfer_report.share:.0%}) "
                                    f"from {transfer.checkpoint} (sha256 {transfer_report.sha256[:12]})")

        net.to(device)
        if policy.channels_last:
            net = net.to(memory_format=torch.channels_last_3d)
        groups = parameter_groups(net, loaded_names, transfer.lr_loaded, recipe.optimizer.lr) if transfer_report else net.parameters()
        optimizer = build_optimizer(groups, recipe)
        scaler = torch.amp.GradScaler("cuda", enabled=policy.grad_scaler)
        loss_fn = build_loss(recipe.loss).to(device)
        if checkpoint is not None:
            net.load_state_dict(checkpoint["network_state"])
            optimizer.load_state_dict(checkpoint["optimizer_state"])
            scaler.load_state_dict(checkpoint["scaler_state"])
            state = TrainingState(**checkpoint["training_state"])
            append_log(run_dir, f"resumed from {checkpoint_path} at epoch {state.epoch}")
        model = torch.compile(net) if policy.compile else net

        from bench.inference import MirroredSoftmax

        validator = MirroredSoftmax(net)  # no TTA during training: cheaper, and consistent across epochs
        encoder_params = [p for name, p in net.named_parameters() if encoder_prefixes and name.startswith(encoder_prefixes)]
        batch_size = plan.batch_size
        # steps are counted from the epochs done, so a checkpoint of an older trainer resumes correctly
        state.steps = min(state.epoch * plan.iterations_per_epoch, plan.steps_per_model)
        dataset = PatchDataset(samples, transform, plan.iterations_per_epoch * batch_size, recipe.seed, plan.steps_per_model * batch_size)
        loader = patch_loader(dataset, batch_size, state.steps * batch_size, policy)
        batches = iter(loader)

        with cudnn_benchmark(policy.cudnn_benchmark):
            while state.epoch < plan.epochs and not state.stopped_early:
                epoch = state.epoch
                lr = lr_at(epoch, plan.epochs, recipe)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_scale: transfer.lr_loaded of the loaded tensors
                frozen = epoch < transfer.freeze_encoder_epochs
                for p in encoder_params:
                    p.requires_grad_(not frozen)
                for name, p in net.named_parameters():  # transfer.freeze: frozen for the whole training
                    if name in frozen_names:
                        p.requires_grad_(False)
                torch.manual_seed(recipe.seed * 100_003 + epoch)
                model.train()
                epoch_start = time.perf_counter()
                n_steps = plan.steps_in_epoch(epoch)
                loss_sum = torch.zeros((), device=device)
                for _ in range(n_steps):
                    if state.steps >= plan.steps_per_model:  # never reached by construction: the guard of the budget
                        raise BudgetExceededError(f"step {state.steps + 1} would exceed the budget ({plan.describe()})")
                    batch = next(batches)
                    x = batch["image"].to(device, non_blocking=True)
                    y = batch["label"].to(device, non_blocking=True)
                    if policy.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last_3d)
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=policy.amp):
                        loss = loss_fn(model(x), y)
                    scaler.scale(loss).backward()
                    if recipe.optimizer.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.optimizer.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    loss_sum += loss.detach().float()  # stays on the device: no host sync per step
                    state.steps += 1
                train_loss = float(loss_sum) / max(1, n_steps)  # the epoch's one host sync
                train_s = time.perf_counter() - epoch_start

                val_dice = float("nan")
                last = epoch == plan.epochs - 1
                if val and ((epoch + 1) % recipe.validation.every == 0 or last):
                    val_dice = validation_dice(validator, val, schedule.patch_size, inference, device, amp=policy.amp, channels_last=policy.channels_last)
                    if val_dice > state.best_dice + recipe.validation.min_delta:
                        state.best_dice, state.best_epoch, state.stale_validations = val_dice, epoch, 0
                        state.best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
                    else:
                        state.stale_validations += 1
                        if recipe.validation.patience and state.stale_validations >= recipe.validation.patience:
                            state.stopped_early = True
                patches = n_steps * batch_size
                state.history.append(
                    {
                        "epoch": epoch,
                        "lr": lr,
                        "train_loss": train_loss,
                        "val_dice": val_dice,
                        "train_s": train_s,
                        "epoch_s": time.perf_counter() - epoch_start,
                        "steps": n_steps,
                        "patches_per_s": patches / train_s if train_s > 0 else float("nan"),
                        "encoder_frozen": frozen,
                    }
                )
                state.epoch = epoch + 1
                append_log(
                    run_dir,
                    f"epoch {epoch}: loss {train_loss:.4f} val_dice {val_dice:.4f} lr {lr:.2e} "
                    f"{state.history[-1]['patches_per_s']:.1f} patches/s" + (" (early stop)" if state.stopped_early else ""),
                )
                torch_save_atomic(
                    {
                        "network_state": net.state_dict(),
                        "optimizer_state": optimizer.state_dict(),
                        "scaler_state": scaler.state_dict(),
                        "training_state": copy.copy(state.__dict__),
                    },
                    checkpoint_path,
                )
                write_history(run_dir, state.history)
        del batches, loader  # ends the persistent worker processes

        for p in net.parameters():
            p.requires_grad_(True)
        used = BudgetUsed.from_plan(plan, state.steps, stopped_early=state.stopped_early)
        use_best = recipe.validation.select == "best" and state.best_state is not None
        final_state = state.best_state if use_best else {k: v.detach().cpu() for k, v in net.state_dict().items()}
        training_record = {
            "budget": used.to_dict(),
            "policy": policy.to_dict(),
            "device": device_facts(device),
            "inference_amp_dtype": inference_amp_dtype(device),
            "epochs_run": state.epoch,
            "stopped_early": state.stopped_early,
            "selected_epoch": state.best_epoch if use_best else state.epoch - 1,
            "selection": "best validation Dice" if use_best else "last epoch",
            "target_spacing": list(preprocessing.target_spacing) if preprocessing.target_spacing else None,
        }
        if transfer_report is not None:
            training_record["transfer"] = transfer_report.to_dict()
        bundle = ModelBundle(
            network_name=recipe.network.name,
            network_params=network_params,
            in_channels=in_channels,
            out_channels=OUT_CHANNELS,
            patch_size=tuple(schedule.patch_size),  # type: ignore[arg-type]
            spacing=spacing,  # type: ignore[arg-type]
            channel_names=tuple(train[0].channel_names),
            state_dict=final_state,  # type: ignore[arg-type]
            inference=inference,
            preprocessing=preprocessing.model_dump(mode="json"),
            info={
                "schedule": self.schedule_name,
                "epochs_run": state.epoch,
                "stopped_early": state.stopped_early,
                "selected_epoch": training_record["selected_epoch"],
                "best_val_dice": state.best_dice if state.best_epoch >= 0 else None,
                "train_cases": [c.case_id for c in train_cases],
                "val_cases": [c.case_id for c in val_cases],
                "device": str(device),
                "budget": used.to_dict(),
                "amp_dtype": policy.amp_dtype,
                "preprocessing_id": self.preprocessing.id,
            },
        )
        bundle.save(run_dir / MODEL_FILE)
        record_training(run_dir, training_record)
        write_curves(run_dir, state.history)
        checkpoint_path.unlink(missing_ok=True)
        append_log(run_dir, f"finished: {run_dir / MODEL_FILE} (epoch {training_record['selected_epoch']}; {used})")


def device_facts(device) -> dict[str, Any]:
    """Device name and library versions of a training run (``run.json``: ``training.device``)."""
    import torch

    facts: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        facts["name"] = torch.cuda.get_device_name(index)
        facts["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    else:
        import platform

        facts["name"] = platform.processor() or platform.machine()
        facts["threads"] = torch.get_num_threads()
    return facts
