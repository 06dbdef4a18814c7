"""Training recipes: what a ``trainable`` submission's ``recipe`` mapping may contain.

A recipe is plain data (YAML in ``submission.yaml``, a dict in Python) validated by the pydantic models
below, so a typo (``epocs: 10``) is an error naming the field instead of a silently ignored setting.
Two trainers exist, chosen by the ``trainer`` key:

``trainer: monai``
    A network from :data:`bench.models.networks.NETWORKS` trained by :mod:`bench.models.trainer` on the
    benchmark's preprocessed cases (:mod:`bench.preprocess`)::

        trainer: monai
        seed: 0
        network: {name: aniso_unet, params: {features: [16, 32, 64, 128], deep_supervision: true}}
        loss: {name: dice_ce, class_weights: [1.0, 2.0]}
        optimizer: {name: sgd, lr: 0.01, momentum: 0.99, nesterov: true, weight_decay: 3.0e-5}
        lr_schedule: {name: poly, power: 0.9}
        sampling: {foreground_probability: 0.5}
        augmentation: {rotate: {prob: 0.2, inplane_degrees: 15}, gamma: {prob: 0.15}}
        validation: {every: 1, patience: 30}
        inference: {overlap: 0.5, mirror_axes: [0, 1, 2]}
        transfer: {checkpoint: null, freeze_encoder_epochs: 0}
        schedules:
          cpu: {iterations_per_epoch: 4, batch_size: 2, patch_size: [8, 32, 32]}            # the cpu budget
          gpu: {epochs: 100, iterations_per_epoch: 250, batch_size: 4, patch_size: [32, 128, 128], num_workers: 8}

``trainer: nnunet``
    nnU-Net v2 through its Python API (:mod:`bench.models.nnunet`): nnU-Net plans, preprocesses and
    builds its own network and cross-validates on the fold's training cases, so only the schedule
    (internal folds, plan edits) and inference options are set here::

        trainer: nnunet
        configuration: 3d_fullres
        schedules:
          cpu: {folds: 2, iterations_per_epoch: 100, val_iterations_per_epoch: 2, batch_size: 2,
                plan: {patch_size: [8, 32, 32], base_features: 16, max_features: 128}}
          gpu: {folds: 5}  # nnU-Net's plan and 250 iterations per epoch, for the gpu budget

**Training budgets** (:data:`TRAINING_BUDGETS`): every schedule of every entrant trains for one budget
per schedule name, in patch-voxels (``batch x patch voxels`` summed over optimizer steps). Without
``epochs`` a schedule trains exactly the budget; an explicit ``epochs`` asks for less, and a recipe
asking for more is refused by :func:`parse_recipe` (:class:`BudgetError`, with the fix). nnU-Net's
internal folds share the budget. :class:`BudgetUsed` is what a finished training records.

Patch sizes and spatial axes are in **array-axis order (z, y, x)**, like every array in HIE-Bench: axis 0
is the slice axis, which is the thick one in BONBID-HIE's diffusion scans.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_serializer

ScheduleName = Literal["cpu", "gpu"]
Auto = Literal["auto"]


class RecipeError(ValueError):
    """A recipe is malformed; the message names its source and the offending field."""


class BudgetError(RecipeError):
    """A schedule asks for more training than its budget allows (or too little for one step); the
    message says by how much and how to fix it."""


# --------------------------------------------------------------------------------------------------
# Training budgets: one per schedule, for every trainable entrant
# --------------------------------------------------------------------------------------------------

#: The unit of every training budget: **patch-voxels**, the sum over optimizer steps of
#: ``batch_size x voxels of one patch`` (``patch_size`` multiplied out). It is fair across patch
#: sizes (a step on a patch twice as large costs twice as much), deterministic and device-independent,
#: so it can enter run identities and is the same on a laptop and on a GPU. Validation and inference
#: are not counted (they are timed separately).
BUDGET_UNIT = "patch_voxels"

#: The training budget of each schedule, in :data:`BUDGET_UNIT`, for every trainable entrant of the
#: benchmark (nnU-Net included, its internal cross-validation folds together). Written as reference
#: optimizer steps x batch x patch voxels so the numbers read; a schedule may ask for less (explicit
#: ``epochs``), never for more. Adding a named schedule means adding a row here.
TRAINING_BUDGETS: dict[str, int] = {
    # 300 steps of 2 patches of 16 x 32 x 32: a few minutes of every entrant on 2 CPU cores
    "cpu": 300 * 2 * (16 * 32 * 32),
    # 75,000 steps of 2 patches of 32 x 128 x 128 (300 epochs of 250 iterations): 78.6 G patch-voxels
    "gpu": 75_000 * 2 * (32 * 128 * 128),
}


def format_voxels(value: float) -> str:
    """``4915200`` -> ``"4.92 M"`` (patch-voxels, for messages and tables)."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value:.0f}"


@dataclass(frozen=True)
class TrainingBudget:
    """The training budget of one schedule: ``planned`` patch-voxels (:data:`TRAINING_BUDGETS`)."""

    schedule: str
    planned: int
    unit: str = BUDGET_UNIT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{format_voxels(self.planned)} patch-voxels ({self.schedule} schedule)"


def training_budget(schedule: str) -> TrainingBudget:
    """The budget of ``schedule`` (``cpu``, ``gpu``, ...; ``auto`` must be resolved first)."""
    if schedule not in TRAINING_BUDGETS:
        raise RecipeError(f"no training budget for schedule {schedule!r} (budgets exist for: {', '.join(TRAINING_BUDGETS)})")
    return TrainingBudget(schedule, int(TRAINING_BUDGETS[schedule]))


def patch_voxels(patch_size: tuple[int, ...] | list[int]) -> int:
    return int(math.prod(int(s) for s in patch_size))


@dataclass(frozen=True)
class StepPlan:
    """How a schedule spends its budget: the optimizer steps of each model, in epochs of iterations.

    ``models`` > 1 for nnU-Net's internal cross-validation: each fold's model gets ``1/models`` of the
    budget. The last epoch of a MONAI run may be shorter (:meth:`steps_in_epoch`), so that training
    stops exactly at the budget; nnU-Net's epochs are all equally long.
    """

    budget: TrainingBudget
    batch_size: int
    patch_size: tuple[int, ...]
    epochs: int
    iterations_per_epoch: int
    steps_per_model: int
    models: int = 1
    #: True when the recipe left ``epochs`` out and the plan fills the budget.
    derived: bool = True

    @property
    def voxels_per_step(self) -> int:
        return self.batch_size * patch_voxels(self.patch_size)

    @property
    def steps(self) -> int:
        """Optimizer steps of all models together."""
        return self.steps_per_model * self.models

    @property
    def voxels(self) -> int:
        """Patch-voxels the plan trains (at most ``budget.planned``)."""
        return self.steps * self.voxels_per_step

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps of ``epoch`` (0-based) of one model; 0 past the end."""
        return max(0, min(self.iterations_per_epoch, self.steps_per_model - epoch * self.iterations_per_epoch))

    def describe(self) -> str:
        models = f"{self.models} models x " if self.models > 1 else ""
        patch = "x".join(str(s) for s in self.patch_size)
        return (
            f"{models}{self.steps_per_model} steps x batch {self.batch_size} x {patch} voxels = "
            f"{format_voxels(self.voxels)} of the {self.budget}"
        )


def plan_steps(
    budget: TrainingBudget,
    *,
    batch_size: int,
    patch_size: tuple[int, ...] | list[int],
    iterations_per_epoch: int,
    epochs: int | None = None,
    models: int = 1,
    partial_last_epoch: bool = True,
    where: str = "schedule",
) -> StepPlan:
    """The :class:`StepPlan` of a schedule under ``budget`` (:class:`BudgetError` if it cannot keep to it).

    ``epochs=None`` fills the budget: ``budget // (models x batch x patch voxels)`` steps per model, as
    ``ceil(steps / iterations_per_epoch)`` epochs whose last one is shorter (``partial_last_epoch``, the
    MONAI trainer) or as ``steps // iterations_per_epoch`` equal epochs of slightly more iterations
    (nnU-Net, whose epochs cannot be cut short; fewer than ``epochs`` steps stay unused). An explicit
    ``epochs`` asks for ``epochs x iterations_per_epoch`` steps, which must fit.
    """
    patch = tuple(int(s) for s in patch_size)
    per_step = int(batch_size) * patch_voxels(patch)
    share = budget.planned // models
    max_steps = share // per_step
    patch_text = "x".join(str(s) for s in patch)
    if max_steps < 1:
        raise BudgetError(
            f"{where}: one step of batch {batch_size} x {patch_text} voxels ({format_voxels(per_step)} patch-voxels)"
            + (f" for each of {models} models" if models > 1 else "")
            + f" exceeds the {budget}; use a smaller patch or batch"
        )
    if epochs is not None:
        steps = int(epochs) * int(iterations_per_epoch)
        if steps > max_steps:
            allowed = max_steps // int(iterations_per_epoch)
            fix = f"set epochs to at most {allowed}" if allowed >= 1 else f"set iterations_per_epoch to at most {max_steps} and epochs to 1"
            raise BudgetError(
                f"{where}: {epochs} epochs x {iterations_per_epoch} iterations x batch {batch_size} x {patch_text} voxels"
                + (f" x {models} models" if models > 1 else "")
                + f" = {format_voxels(steps * per_step * models)} patch-voxels exceed the {budget} "
                f"(bench.models.recipe.TRAINING_BUDGETS); {fix}, or leave epochs out to train for exactly the budget"
            )
        return StepPlan(budget, int(batch_size), patch, int(epochs), int(iterations_per_epoch), steps, models, derived=False)
    if partial_last_epoch:
        return StepPlan(budget, int(batch_size), patch, math.ceil(max_steps / iterations_per_epoch), int(iterations_per_epoch), max_steps, models)
    n_epochs = max(1, max_steps // int(iterations_per_epoch))
    iterations = max_steps // n_epochs
    return StepPlan(budget, int(batch_size), patch, n_epochs, iterations, n_epochs * iterations, models)


@dataclass(frozen=True)
class BudgetUsed:
    """The training an entrant actually did, beside its schedule's budget; written into ``run.json``
    (``training.budget``) by every ``fit`` and readable with :func:`bench.models.runfolder.read_budget_used`.

    ``planned`` is the schedule's budget (the cap), ``used`` the patch-voxels trained; ``used <
    planned`` when the recipe asked for less, stopped early, or (nnU-Net) left less than one epoch's
    worth unused.
    """

    schedule: str
    unit: str
    planned: int
    used: int
    steps: int
    batch_size: int
    patch_size: tuple[int, ...]
    models: int = 1
    #: Patch-voxels the recipe's plan asked for (``<= planned``).
    requested: int | None = None
    stopped_early: bool = False

    @property
    def fraction(self) -> float:
        """``used / planned``."""
        return self.used / self.planned if self.planned else float("nan")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["patch_size"] = list(self.patch_size)
        data["fraction"] = self.fraction
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BudgetUsed":
        names = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in names}
        values["patch_size"] = tuple(int(s) for s in values.get("patch_size", ()))
        return cls(**values)

    @classmethod
    def from_plan(cls, plan: StepPlan, steps_done: int, *, stopped_early: bool = False) -> "BudgetUsed":
        """What ``steps_done`` optimizer steps (all models together) of ``plan`` used."""
        return cls(
            schedule=plan.budget.schedule,
            unit=plan.budget.unit,
            planned=plan.budget.planned,
            used=int(steps_done) * plan.voxels_per_step,
            steps=int(steps_done),
            batch_size=plan.batch_size,
            patch_size=tuple(plan.patch_size),
            models=plan.models,
            requested=plan.voxels,
            stopped_early=stopped_early,
        )

    def __str__(self) -> str:
        if self.steps == 0 and self.used == 0:  # a closed-form fit (the logistic regression)
            return f"no gradient steps: closed-form fit (0 of {format_voxels(self.planned)} patch-voxels, {self.schedule} schedule)"
        return f"{format_voxels(self.used)} of {format_voxels(self.planned)} patch-voxels ({self.fraction:.0%}, {self.schedule} schedule)"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------------
# Sections shared by the MONAI trainer
# --------------------------------------------------------------------------------------------------


class NetworkSpec(_Config):
    """Which architecture (a key of :data:`bench.models.networks.NETWORKS`) and its keyword arguments."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class LossConfig(_Config):
    """Segmentation loss on two softmax channels (background, lesion).

    ``dice_ce`` is nnU-Net's choice; ``dice_focal``, ``focal`` and ``tversky`` trade precision for recall
    on small lesions (Tversky with ``beta > alpha`` penalises missed lesion voxels more than false ones).
    ``class_weights`` weights the cross-entropy / focal term per class (background, lesion).
    """

    name: Literal["dice_ce", "dice_focal", "focal", "tversky", "dice"] = "dice_ce"
    class_weights: tuple[float, float] | None = None
    lambda_dice: float = Field(1.0, ge=0)
    lambda_ce: float = Field(1.0, ge=0, description="Weight of the cross-entropy or focal term.")
    focal_gamma: float = Field(2.0, ge=0)
    tversky_alpha: float = Field(0.3, ge=0, description="Tversky weight of false positives.")
    tversky_beta: float = Field(0.7, ge=0, description="Tversky weight of false negatives.")
    #: Dice computed over the whole batch (nnU-Net's "batch dice"): stabler for patches without lesion.
    batch_dice: bool = True


class OptimizerConfig(_Config):
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = Field(1e-2, gt=0)
    momentum: float = Field(0.99, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(3e-5, ge=0)
    #: Gradient-norm clipping (nnU-Net uses 12); ``None`` disables it.
    grad_clip: float | None = Field(12.0, gt=0)


class LRScheduleConfig(_Config):
    """Learning-rate decay over epochs: ``poly`` (nnU-Net: (1 - epoch/epochs)^0.9), ``cosine`` or ``constant``."""

    name: Literal["poly", "cosine", "constant"] = "poly"
    power: float = Field(0.9, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_epochs: int = Field(0, ge=0)


class SamplingConfig(_Config):
    """Patch sampling: the share of patches centred on a lesion voxel (class-imbalance handling)."""

    foreground_probability: float = Field(0.33, ge=0, le=1)


class FlipAug(_Config):
    prob: float = Field(0.5, ge=0, le=1)
    axes: tuple[int, ...] = (0, 1, 2)

    @field_validator("axes")
    @classmethod
    def _spatial(cls, axes: tuple[int, ...]) -> tuple[int, ...]:
        if any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"flip axes must be spatial axes 0 (z), 1 (y), 2 (x); got {axes}")
        return axes


class RotateAug(_Config):
    """Random rotation; in-plane (about the slice axis) and through-plane ranges are separate because the
    slice axis of thick-slice data tolerates much less rotation."""

    prob: float = Field(0.2, ge=0, le=1)
    inplane_degrees: float = Field(15.0, ge=0, le=180)
    through_plane_degrees: float = Field(0.0, ge=0, le=180)


class ElasticAug(_Config):
    prob: float = Field(0.0, ge=0, le=1)
    sigma: tuple[float, float] = (5.0, 8.0)
    magnitude: tuple[float, float] = (50.0, 150.0)


class IntensityScaleAug(_Config):
    """Multiply intensities by ``1 + u``, ``u ~ U(-factor, factor)``."""

    prob: float = Field(0.15, ge=0, le=1)
    factor: float = Field(0.1, ge=0)


class IntensityShiftAug(_Config):
    """Add ``u ~ U(-offset, offset)`` to intensities (z-scored units)."""

    prob: float = Field(0.15, ge=0, le=1)
    offset: float = Field(0.1, ge=0)


class GammaAug(_Config):
    prob: float = Field(0.15, ge=0, le=1)
    range: tuple[float, float] = (0.7, 1.5)


class NoiseAug(_Config):
    prob: float = Field(0.1, ge=0, le=1)
    std: float = Field(0.1, ge=0)


class LowResolutionAug(_Config):
    """Down-sample then up-sample a patch (simulates coarser acquisitions from other sites)."""

    prob: float = Field(0.125, ge=0, le=1)
    zoom: tuple[float, float] = (0.5, 1.0)


class ScaleAug(_Config):
    """Random scaling of the sampling grid, as nnU-Net's spatial transform (probability 0.2, scale
    0.7-1.4, one factor for all scaled axes): a region of ``patch x scale`` voxels is resized to the
    patch, so ``scale > 1`` shows more tissue (structures smaller), ``< 1`` zooms in. Image trilinear,
    label nearest neighbour. ``through_plane: false`` scales in-plane only, which is what nnU-Net does
    when it trains anisotropic patches with 2-D augmentation (thick slices; the default here)."""

    prob: float = Field(0.2, ge=0, le=1)
    range: tuple[float, float] = (0.7, 1.4)
    through_plane: bool = False

    @field_validator("range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"scale range must be 0 < low <= high, got {value}")
        return value


class BlurAug(_Config):
    """Gaussian blur of the image, as nnU-Net's: with probability ``prob`` per patch, each channel with
    probability ``prob_per_channel``, a sigma drawn from ``sigma`` (voxels) per channel and per axis.
    ``through_plane: false`` blurs in-plane only."""

    prob: float = Field(0.2, ge=0, le=1)
    sigma: tuple[float, float] = (0.5, 1.0)
    prob_per_channel: float = Field(0.5, ge=0, le=1)
    through_plane: bool = True

    @field_validator("sigma")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] <= value[1]:
            raise ValueError(f"blur sigma range must be 0 <= low <= high, got {value}")
        return value


class AugmentationConfig(_Config):
    """Training augmentation (MONAI dictionary transforms); a probability of 0 switches one off."""

    flip: FlipAug = FlipAug()
    rotate: RotateAug = RotateAug()
    elastic: ElasticAug = ElasticAug()
    scale: ScaleAug = ScaleAug()
    intensity_scale: IntensityScaleAug = IntensityScaleAug()
    intensity_shift: IntensityShiftAug = IntensityShiftAug()
    gamma: GammaAug = GammaAug()
    noise: NoiseAug = NoiseAug()
    blur: BlurAug = BlurAug()
    low_resolution: LowResolutionAug = LowResolutionAug()


class ValidationConfig(_Config):
    """Validation on the held-out part of the training fold (Dice on the preprocessed grid).

    ``patience``: stop when the validation Dice has not improved for that many validations (``None``:
    never stop early). ``select``: keep the weights of the best validation (``best``) or the last epoch.
    """

    every: int = Field(1, ge=1, description="Validate every N epochs (and always after the last one).")
    patience: int | None = Field(None, ge=1)
    select: Literal["best", "last"] = "best"
    #: Minimum Dice gain that counts as an improvement.
    min_delta: float = Field(0.0, ge=0)


class InferenceConfig(_Config):
    """Sliding-window inference with Gaussian weighting and flip test-time augmentation."""

    overlap: float = Field(0.5, ge=0, lt=1)
    sw_batch_size: int = Field(2, ge=1)
    gaussian_sigma_scale: float = Field(0.125, gt=0)
    #: Spatial axes (0 z, 1 y, 2 x) mirrored for TTA; every combination is averaged (2^n passes, as in
    #: nnU-Net). Empty: no TTA.
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    threshold: float = Field(0.5, gt=0, lt=1)

    @field_validator("mirror_axes")
    @classmethod
    def _spatial(cls, axes: tuple[int, ...]) -> tuple[int, ...]:
        if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"mirror axes must be distinct spatial axes among 0 (z), 1 (y), 2 (x); got {axes}")
        return axes


class TransferConfig(_Config):
    """Initialise from a pre-trained checkpoint (:mod:`bench.models.transfer`).

    ``checkpoint`` is a path inside the submission folder or a ``bench pretrain`` run id (16 hex digits,
    resolved under the results folder). Strict by default: every tensor the network and the checkpoint
    share must have the same shape and at least ``min_share`` of the network's tensors must load,
    otherwise the run is refused with the tensors that did not match; ``strict: false`` loads what
    matches and records the share. ``freeze``: state-dict name prefixes kept frozen for the whole
    training; ``freeze_encoder_epochs``: the network's declared encoder frozen for the first epochs;
    ``reinit_head``: the output layers keep their fresh initialisation; ``lr_loaded``: learning rate of
    the loaded tensors (the optimizer's ``lr`` for the others; the schedule scales both alike).
    """

    checkpoint: str | None = None
    freeze_encoder_epochs: int = Field(0, ge=0)
    freeze: tuple[str, ...] = ()
    reinit_head: bool = False
    lr_loaded: float | None = Field(None, gt=0)
    strict: bool = True
    min_share: float = Field(0.9, gt=0, le=1)

    @model_serializer(mode="wrap")
    def _stable(self, handler):
        """Leave the fields added with strict transfer out of dumps while they keep their defaults, so
        the recorded identities of folds trained before them stay the same (their folders resume)."""
        data = handler(self)
        for name in ("freeze", "reinit_head", "lr_loaded", "strict", "min_share"):
            if name in data and getattr(self, name) == type(self).model_fields[name].default:
                del data[name]
        return data


class MonaiSchedule(_Config):
    """How long and how big: one per machine class (``cpu``, ``gpu``).

    How long is set by the schedule's training budget (:data:`TRAINING_BUDGETS`): without ``epochs``
    the run trains for exactly the budget (``budget // (batch x patch voxels)`` steps, in epochs of
    ``iterations_per_epoch``, the last one possibly shorter); an explicit ``epochs`` asks for less and
    is refused when ``epochs x iterations x batch x patch voxels`` exceeds the budget.
    """

    epochs: int | None = Field(None, ge=1, description="Epochs; leave out to train for exactly the schedule's budget.")
    iterations_per_epoch: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    patch_size: tuple[int, int, int]
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes for patch sampling and augmentation.")
    #: Mixed precision (CUDA only); "auto" = on whenever the device is CUDA.
    amp: bool | Auto = "auto"
    #: channels-last-3d memory format (CUDA only); "auto" = on whenever the device is CUDA.
    channels_last: bool | Auto = "auto"
    #: torch.compile; "auto" = on CUDA when the run is long enough to repay the compilation time.
    compile: bool | Auto = "auto"
    #: Network params replaced for this schedule only (e.g. narrower layers for a quick CPU run).
    network_params: dict[str, Any] = Field(default_factory=dict)
    #: Inference settings for models trained with this schedule; ``None``: the recipe's ``inference``
    #: (the shipped CPU schedules switch flip TTA off to keep the demo quick).
    inference: InferenceConfig | None = None
    #: Transfer for models trained with this schedule (replaces the recipe's ``transfer``; e.g.
    #: ``{checkpoint: null}`` where the recipe's checkpoint is of another schedule's network).
    transfer: TransferConfig | None = None

    @model_serializer(mode="wrap")
    def _stable(self, handler):
        """``transfer`` is left out of dumps while unset, so folds trained before it keep their identity."""
        data = handler(self)
        if "transfer" in data and self.transfer is None:
            del data["transfer"]
        return data

    @field_validator("patch_size")
    @classmethod
    def _positive(cls, size: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s < 1 for s in size):
            raise ValueError(f"patch_size must be positive, got {size}")
        return size


class MonaiRecipe(_Config):
    """Recipe of the MONAI trainer (see the module docstring for an example)."""

    trainer: Literal["monai"]
    seed: int = 0
    network: NetworkSpec
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_schedule: LRScheduleConfig = LRScheduleConfig()
    sampling: SamplingConfig = SamplingConfig()
    augmentation: AugmentationConfig = AugmentationConfig()
    validation: ValidationConfig = ValidationConfig()
    inference: InferenceConfig = InferenceConfig()
    transfer: TransferConfig = TransferConfig()
    schedules: dict[ScheduleName, MonaiSchedule]

    def network_params(self, schedule: ScheduleName) -> dict[str, Any]:
        """``network.params`` with the schedule's ``network_params`` applied."""
        return {**self.network.params, **self.schedules[schedule].network_params}

    def inference_for(self, schedule: ScheduleName) -> InferenceConfig:
        """The schedule's ``inference`` if it has one, else the recipe's."""
        return self.schedules[schedule].inference or self.inference

    def transfer_for(self, schedule: str) -> TransferConfig:
        """The schedule's ``transfer`` if it has one, else the recipe's."""
        spec = self.schedules.get(schedule)  # type: ignore[call-overload]
        return spec.transfer if spec is not None and spec.transfer is not None else self.transfer

    def step_plan(self, schedule: ScheduleName) -> StepPlan:
        """How the schedule spends its budget (:class:`BudgetError` when it asks for more)."""
        spec = self.schedules[schedule]
        return plan_steps(
            training_budget(schedule),
            batch_size=spec.batch_size,
            patch_size=spec.patch_size,
            iterations_per_epoch=spec.iterations_per_epoch,
            epochs=spec.epochs,
            where=f"schedules.{schedule}",
        )


# --------------------------------------------------------------------------------------------------
# nnU-Net
# --------------------------------------------------------------------------------------------------


class NnUNetInference(_Config):
    tile_step_size: float = Field(0.5, gt=0, le=1)
    #: Mirroring test-time augmentation over the axes nnU-Net allowed during training.
    mirroring: bool = True


#: nnU-Net's own numbers of training and validation iterations per epoch.
NNUNET_ITERATIONS_PER_EPOCH = 250
NNUNET_VAL_ITERATIONS_PER_EPOCH = 50


class NnUNetPlanEdits(_Config):
    """Edits of the configuration nnU-Net planned, written into ``nnUNetPlans.json`` before preprocessing
    (data in nnU-Net's own plans file; no nnU-Net code is changed). ``None`` keeps nnU-Net's choice.

    ``patch_size`` re-plans the network topology for the new patch with nnU-Net's own planner function
    (``get_pool_and_conv_props``: strides and kernels from the target spacing); ``max_stages`` then
    drops the deepest resolution stages; features per stage are ``min(base_features x 2^i,
    max_features)`` (nnU-Net: 32 and 320).
    """

    patch_size: tuple[int, int, int] | None = None
    base_features: int | None = Field(None, ge=1)
    max_features: int | None = Field(None, ge=1)
    max_stages: int | None = Field(None, ge=2)
    n_conv_per_stage: int | None = Field(None, ge=1)
    n_conv_per_stage_decoder: int | None = Field(None, ge=1)

    @property
    def is_empty(self) -> bool:
        return all(value is None for value in self.model_dump().values())


class NnUNetSchedule(_Config):
    """nnU-Net within a benchmark fold: its own cross-validation, trained for the schedule's budget.

    ``folds`` models are trained (nnU-Net's 5-fold cross-validation on the benchmark fold's training
    cases, by nnU-Net's own seeded split), each for ``1/folds`` of the budget; ``folds: 1`` trains a
    single model on the fold's training cases and validates it on the benchmark's validation cases.
    Without ``epochs`` each model trains ``budget / folds / (batch x patch voxels)`` steps in equal
    epochs of about ``iterations_per_epoch`` (nnU-Net's 250 by default); an explicit ``epochs`` must fit.
    """

    folds: int = Field(5, ge=1, le=10)
    epochs: int | None = Field(None, ge=1)
    iterations_per_epoch: int | None = Field(None, ge=1)
    val_iterations_per_epoch: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    #: Edits of nnU-Net's planned configuration (a CPU-sized network, a smaller patch).
    plan: NnUNetPlanEdits = NnUNetPlanEdits()
    #: Background augmentation processes (nnUNet_n_proc_DA); 0 runs augmentation in the main process.
    data_workers: int | None = Field(None, ge=0)
    #: Write checkpoint_latest.pth every N epochs (nnU-Net: 50); smaller makes interrupted runs resume later.
    save_every: int | None = Field(None, ge=1)
    #: Foreground voxels sampled (in total, over all cases) for the intensity statistics of nnU-Net's
    #: fingerprint; ``None`` keeps nnU-Net's 10^8, which on a handful of tiny cases means tens of
    #: millions of samples per case with replacement and dominates a CPU test's run time.
    fingerprint_foreground_samples: int | None = Field(None, ge=1000)
    #: Inference settings for models trained with this schedule; ``None``: the recipe's ``inference``.
    inference: NnUNetInference | None = None

    @property
    def iterations(self) -> int:
        return self.iterations_per_epoch or NNUNET_ITERATIONS_PER_EPOCH


class NnUNetRecipe(_Config):
    """Recipe of the nnU-Net v2 adapter."""

    trainer: Literal["nnunet"]
    configuration: Literal["3d_fullres", "2d"] = "3d_fullres"
    #: Dataset id of the nnU-Net dataset created inside each run folder (never shared between runs).
    dataset_id: int = Field(501, ge=1, le=999)
    #: nnU-Net's GPU-memory target for planning (GB); ``None`` keeps nnU-Net's default (8 GB).
    gpu_memory_target_gb: float | None = Field(None, gt=0)
    inference: NnUNetInference = NnUNetInference()
    #: Checkpoint each fold predicts with: nnU-Net's default ``checkpoint_final.pth`` (the last epoch);
    #: ``checkpoint_best.pth`` is the epoch of the best EMA pseudo-Dice on the fold's validation patches.
    checkpoint: Literal["checkpoint_final.pth", "checkpoint_best.pth"] = "checkpoint_final.pth"
    #: ``determine``: nnU-Net's ``determine_postprocessing`` rule on the cross-validation predictions
    #: (keep only the largest lesion component if that raises the mean Dice); ``none``: no postprocessing.
    postprocessing: Literal["determine", "none"] = "determine"
    #: nnU-Net checkpoint (path relative to the submission folder) to initialise the network from; the
    #: same as ``transfer.checkpoint`` (checked strictly by bench.models.transfer, then handed to
    #: nnU-Net's load_pretrained_weights).
    pretrained_weights: str | None = None
    #: The transfer declaration (as for the MONAI trainer; ``freeze`` and ``lr_loaded`` are not supported).
    transfer: TransferConfig = TransferConfig()

    @model_serializer(mode="wrap")
    def _stable(self, handler):
        """``transfer`` is left out of dumps while it is the default, so nnU-Net folds trained before it resume."""
        data = handler(self)
        if "transfer" in data and self.transfer == TransferConfig():
            del data["transfer"]
        return data
    schedules: dict[ScheduleName, NnUNetSchedule]

    def inference_for(self, schedule: ScheduleName) -> NnUNetInference:
        """The schedule's ``inference`` if it has one, else the recipe's."""
        return self.schedules[schedule].inference or self.inference

    def step_plan(self, schedule: ScheduleName, *, patch_size: tuple[int, ...] | None = None, batch_size: int | None = None) -> StepPlan | None:
        """How the schedule spends its budget once the patch and batch are known (planned by nnU-Net,
        or fixed in ``plan``/``batch_size``); ``None`` while they are not. :class:`BudgetError` when it
        asks for more than the budget."""
        spec = self.schedules[schedule]
        patch = patch_size or spec.plan.patch_size
        batch = batch_size or spec.batch_size
        if patch is None or batch is None:
            return None
        return plan_steps(
            training_budget(schedule),
            batch_size=batch,
            patch_size=patch,
            iterations_per_epoch=spec.iterations,
            epochs=spec.epochs,
            models=spec.folds,
            partial_last_epoch=False,
            where=f"schedules.{schedule}",
        )


from bench.models.logreg import LogRegRecipe  # noqa: E402  (logreg does not import this module: no cycle)

#: The trainers a ``trainable`` submission can name.
TRAINERS: tuple[str, ...] = ("monai", "nnunet", "logreg")
Recipe = Annotated[Union[MonaiRecipe, NnUNetRecipe, LogRegRecipe], Field(discriminator="trainer")]
_RECIPE_ADAPTER: TypeAdapter = TypeAdapter(Recipe)


def parse_recipe(recipe: dict[str, Any] | MonaiRecipe | NnUNetRecipe, *, source: str = "recipe") -> MonaiRecipe | NnUNetRecipe:
    """Validate a recipe mapping; :class:`RecipeError` names ``source`` and every problem found."""
    if isinstance(recipe, (MonaiRecipe, NnUNetRecipe, LogRegRecipe)):
        return recipe
    if not isinstance(recipe, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping, got {type(recipe).__name__}")
    if recipe.get("trainer") not in TRAINERS:
        raise RecipeError(f"{source}: 'trainer' must be one of {', '.join(TRAINERS)}, got {recipe.get('trainer')!r}")
    try:
        parsed = _RECIPE_ADAPTER.validate_python(recipe)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or '<root>'}: {err['msg']}" for err in exc.errors())
        raise RecipeError(f"{source}: invalid recipe ({problems})") from exc
    check_budgets(parsed, source=source)
    return parsed


def check_budgets(recipe: MonaiRecipe | NnUNetRecipe, *, source: str = "recipe") -> None:
    """Refuse a recipe whose schedules ask for more than their budgets (:class:`BudgetError` naming
    ``source``, the schedule and the fix). nnU-Net schedules whose patch is planned from the data are
    checked again once nnU-Net has planned it, before any training."""
    if isinstance(recipe, LogRegRecipe):  # no optimizer steps on patches: nothing to budget
        return
    for name in recipe.schedules:
        try:
            recipe.step_plan(name)
        except BudgetError as exc:
            raise BudgetError(f"{source}: {exc}") from None


def resolve_schedule_name(schedule: str) -> ScheduleName:
    """``"auto"`` means ``"gpu"`` when CUDA is available, else ``"cpu"``."""
    if schedule == "auto":
        from bench.device import schedule_for

        return schedule_for("auto")  # type: ignore[return-value]  (the one device policy)
    if schedule not in ("cpu", "gpu"):
        raise RecipeError(f"schedule must be 'auto', 'cpu' or 'gpu', got {schedule!r}")
    return schedule  # type: ignore[return-value]


def bound_schedule(recipe: Any, schedule_name: str) -> Any:
    """The schedule a trainable is bound to (every trainer's constructor); ``ValueError`` naming the ones there are."""
    if schedule_name not in recipe.schedules:
        raise ValueError(f"recipe has no '{schedule_name}' schedule (it has: {', '.join(recipe.schedules)})")
    return recipe.schedules[schedule_name]


def select_schedule(recipe: MonaiRecipe | NnUNetRecipe, schedule: str, *, source: str = "recipe"):
    """The recipe's schedule for ``schedule`` (``auto``/``cpu``/``gpu``), with a clear error if absent."""
    name = resolve_schedule_name(schedule)
    if name not in recipe.schedules:
        raise RecipeError(f"{source}: the recipe has no '{name}' schedule (it has: {', '.join(recipe.schedules) or 'none'})")
    return recipe.schedules[name]


def override_schedule(recipe: dict[str, Any], schedule: str, **fields: Any) -> dict[str, Any]:
    """A copy of the recipe mapping whose ``schedule`` (``auto`` resolved) has ``fields`` replaced.

    Used to run an entrant briefly (tests, ``bench perf models``) without editing its submission.
    """
    import copy

    name = resolve_schedule_name(schedule)
    result = copy.deepcopy(recipe)
    schedules = result.setdefault("schedules", {})
    if name not in schedules:
        raise RecipeError(f"the recipe has no '{name}' schedule to override (it has: {', '.join(schedules) or 'none'})")
    schedules[name] = {**(schedules[name] or {}), **fields}
    return result
