"""The MONAI trainer: fits a registered network on preprocessed cases, resumably.

:class:`MonaiTrainable` implements :class:`bench.predictor.Trainable`. One ``fit`` call:

1. claims the run folder (``run.json``); a finished ``model.pt`` is simply loaded;
2. preprocesses the cases with the submission's :class:`~bench.preprocess.PreprocessingConfig` (cached);
3. builds the network from the registry for the data's channels, patch size and median spacing, and
   initialises it from a transfer checkpoint if the recipe names one;
4. trains for ``epochs`` x ``iterations_per_epoch`` batches of augmented patches (foreground-oversampled),
   with the recipe's loss, optimizer and learning-rate schedule; AMP, channels-last and ``torch.compile``
   on CUDA; the encoder optionally frozen for the first epochs;
5. validates on the held-out cases (sliding-window Dice on the preprocessed grid), keeps the best
   weights and stops early when the Dice stops improving;
6. checkpoints every epoch (``checkpoint.pt``, resumed after an interruption), writes ``history.csv`` and
   ``curves.png``, and finally ``model.pt``.

Randomness is keyed by (seed, epoch, sample index), so a resumed run draws the same patches as an
uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from bench.models.recipe import InferenceConfig, MonaiRecipe, MonaiSchedule, ScheduleName
from bench.models.runfolder import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    append_log,
    claim_run_dir,
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


class PatchDataset:
    """``length`` augmented patches drawn from ``samples`` for one epoch (a map-style torch dataset).

    Item ``i`` of epoch ``e`` depends only on (seed, e, i), whichever worker process draws it.
    """

    def __init__(self, samples: Sequence[dict[str, Any]], transform: Any, length: int, seed: int, epoch: int) -> None:
        self.samples, self.transform, self.length, self.seed, self.epoch = samples, transform, length, seed, epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample = self.samples[int(rng.integers(len(self.samples)))]
        self.transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about meta-data conversions on every call
            return self.transform(sample)


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
    from bench.models.inference import dice, sliding_window_probabilities

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

        if schedule_name not in recipe.schedules:
            raise ValueError(f"recipe has no '{schedule_name}' schedule (it has: {', '.join(recipe.schedules)})")
        self.recipe = recipe
        self.schedule_name = schedule_name
        self.schedule: MonaiSchedule = recipe.schedules[schedule_name]
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
        """Train (or resume, or just load) the model of one fold; see the module docstring."""
        from bench.models.monai_model import MonaiPredictor

        run_dir = Path(run_dir)
        if not train_cases:
            raise TrainingError("fit() needs at least one training case")
        claim_run_dir(run_dir, self.identity(train_cases, val_cases), info={"source": self.source})
        if not (run_dir / MODEL_FILE).is_file():
            self._train(list(train_cases), list(val_cases), run_dir)
        return MonaiPredictor.from_run_dir(run_dir, device=self.device_preference, cache_dir=self.cache_dir)

    def identity(self, train_cases: Sequence["Case"], val_cases: Sequence["Case"]) -> dict[str, Any]:
        """What makes two trainings the same (recorded in ``run.json``)."""
        return {
            "trainer": "monai",
            "recipe": self.recipe.model_dump(mode="json"),
            "schedule": self.schedule_name,
            "preprocessing_id": self.preprocessing.id,
            "train_cases": [c.case_id for c in train_cases],
            "val_cases": [c.case_id for c in val_cases],
        }

    # -- training ---------------------------------------------------------------------------------------

    def _prepare(self, cases: Sequence["Case"]) -> list["PreprocessedCase"]:
        from bench.preprocess import preprocess

        prepared = []
        for case in cases:
            item = preprocess(case, self.preprocessing, self.cache_dir, with_label=True)
            if item.label is None:
                raise TrainingError(f"case {case.case_id} has no reference label ({case.label_path}); it cannot be used for training")
            prepared.append(item)
        return prepared

    def _train(self, train_cases: list["Case"], val_cases: list["Case"], run_dir: Path) -> None:
        import torch

        from bench.models.augmentation import build_train_transform, context_size, pad_to
        from bench.models.losses import build_loss
        from bench.models.monai_model import ModelBundle
        from bench.models.networks import NetworkContext, build_network, get_entry

        recipe, schedule = self.recipe, self.schedule
        inference = recipe.inference_for(self.schedule_name)
        device = select_device(self.device_preference)
        cuda = device.type == "cuda"
        amp = cuda and schedule.amp in (True, "auto")
        amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        channels_last = cuda and schedule.channels_last in (True, "auto")
        total_iterations = schedule.epochs * schedule.iterations_per_epoch
        use_compile = schedule.compile is True or (schedule.compile == "auto" and cuda and total_iterations >= COMPILE_MIN_ITERATIONS)

        start = time.perf_counter()
        train, val = self._prepare(train_cases), self._prepare(val_cases)
        append_log(run_dir, f"preprocessed {len(train)} training and {len(val)} validation cases in {time.perf_counter() - start:.1f}s")
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
        if recipe.transfer.freeze_encoder_epochs and not encoder_prefixes:
            raise ValueError(f"network {recipe.network.name} does not declare its encoder, so transfer.freeze_encoder_epochs cannot be used")

        state = TrainingState()
        checkpoint_path = run_dir / CHECKPOINT_FILE
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True) if checkpoint_path.is_file() else None
        if checkpoint is None and recipe.transfer.checkpoint:
            transfer = Path(recipe.transfer.checkpoint)
            if not transfer.is_absolute() and self.submission_dir is not None:
                transfer = self.submission_dir / transfer
            loaded, total = load_transfer_weights(net, transfer)
            append_log(run_dir, f"initialised {loaded}/{total} tensors from {transfer}")

        net.to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last_3d)
        optimizer = build_optimizer(net.parameters(), recipe)
        scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
        loss_fn = build_loss(recipe.loss).to(device)
        if checkpoint is not None:
            net.load_state_dict(checkpoint["network_state"])
            optimizer.load_state_dict(checkpoint["optimizer_state"])
            scaler.load_state_dict(checkpoint["scaler_state"])
            state = TrainingState(**checkpoint["training_state"])
            append_log(run_dir, f"resumed from {checkpoint_path} at epoch {state.epoch}")
        model = torch.compile(net) if use_compile else net

        from bench.models.inference import MirroredSoftmax

        validator = MirroredSoftmax(net)  # no TTA during training: cheaper, and consistent across epochs
        encoder_params = [p for name, p in net.named_parameters() if encoder_prefixes and name.startswith(encoder_prefixes)]
        patches = schedule.iterations_per_epoch * schedule.batch_size

        while state.epoch < schedule.epochs and not state.stopped_early:
            epoch = state.epoch
            lr = lr_at(epoch, schedule.epochs, recipe)
            for group in optimizer.param_groups:
                group["lr"] = lr
            frozen = epoch < recipe.transfer.freeze_encoder_epochs
            for p in encoder_params:
                p.requires_grad_(not frozen)
            torch.manual_seed(recipe.seed * 100_003 + epoch)
            loader = torch.utils.data.DataLoader(
                PatchDataset(samples, transform, patches, recipe.seed, epoch),
                batch_size=schedule.batch_size,
                num_workers=schedule.num_workers,
                pin_memory=cuda,
            )
            model.train()
            epoch_start = time.perf_counter()
            losses = []
            for batch in loader:
                x = batch["image"].to(device, non_blocking=True)
                y = batch["label"].to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss).backward()
                if recipe.optimizer.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.optimizer.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss.detach()))
            train_s = time.perf_counter() - epoch_start

            val_dice = float("nan")
            last = epoch == schedule.epochs - 1
            if val and ((epoch + 1) % recipe.validation.every == 0 or last):
                val_dice = validation_dice(validator, val, schedule.patch_size, inference, device, amp=amp, channels_last=channels_last)
                if val_dice > state.best_dice + recipe.validation.min_delta:
                    state.best_dice, state.best_epoch, state.stale_validations = val_dice, epoch, 0
                    state.best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
                else:
                    state.stale_validations += 1
                    if recipe.validation.patience and state.stale_validations >= recipe.validation.patience:
                        state.stopped_early = True
            state.history.append(
                {
                    "epoch": epoch,
                    "lr": lr,
                    "train_loss": float(np.mean(losses)),
                    "val_dice": val_dice,
                    "train_s": train_s,
                    "epoch_s": time.perf_counter() - epoch_start,
                    "patches_per_s": patches / train_s if train_s > 0 else float("nan"),
                    "encoder_frozen": frozen,
                }
            )
            state.epoch = epoch + 1
            append_log(
                run_dir,
                f"epoch {epoch}: loss {state.history[-1]['train_loss']:.4f} val_dice {val_dice:.4f} lr {lr:.2e} "
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

        for p in net.parameters():
            p.requires_grad_(True)
        use_best = recipe.validation.select == "best" and state.best_state is not None
        final_state = state.best_state if use_best else {k: v.detach().cpu() for k, v in net.state_dict().items()}
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
            preprocessing=self.preprocessing.model_dump(mode="json"),
            info={
                "schedule": self.schedule_name,
                "epochs_run": state.epoch,
                "stopped_early": state.stopped_early,
                "selected_epoch": state.best_epoch if use_best else state.epoch - 1,
                "best_val_dice": state.best_dice if state.best_epoch >= 0 else None,
                "train_cases": [c.case_id for c in train_cases],
                "val_cases": [c.case_id for c in val_cases],
                "device": str(device),
            },
        )
        bundle.save(run_dir / MODEL_FILE)
        write_curves(run_dir, state.history)
        checkpoint_path.unlink(missing_ok=True)
        append_log(run_dir, f"finished: {run_dir / MODEL_FILE} (epoch {bundle.info['selected_epoch']})")
