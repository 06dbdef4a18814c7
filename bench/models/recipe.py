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
          cpu: {epochs: 2, iterations_per_epoch: 4, batch_size: 2, patch_size: [8, 32, 32]}
          gpu: {epochs: 300, iterations_per_epoch: 250, batch_size: 4, patch_size: [32, 128, 128], num_workers: 8}

``trainer: nnunet``
    nnU-Net v2 through its Python API (:mod:`bench.models.nnunet`); nnU-Net plans, preprocesses and
    builds its own network, so only the schedule and inference options are set here::

        trainer: nnunet
        configuration: 3d_fullres
        schedules:
          cpu: {epochs: 1, iterations_per_epoch: 2, val_iterations_per_epoch: 1, batch_size: 2}
          gpu: {}          # nnU-Net's own schedule: 1000 epochs x 250 iterations

Patch sizes and spatial axes are in **array-axis order (z, y, x)**, like every array in HIE-Bench: axis 0
is the slice axis, which is the thick one in BONBID-HIE's diffusion scans.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

ScheduleName = Literal["cpu", "gpu"]
Auto = Literal["auto"]


class RecipeError(ValueError):
    """A recipe is malformed; the message names its source and the offending field."""


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


class AugmentationConfig(_Config):
    """Training augmentation (MONAI dictionary transforms); a probability of 0 switches one off."""

    flip: FlipAug = FlipAug()
    rotate: RotateAug = RotateAug()
    elastic: ElasticAug = ElasticAug()
    intensity_scale: IntensityScaleAug = IntensityScaleAug()
    intensity_shift: IntensityShiftAug = IntensityShiftAug()
    gamma: GammaAug = GammaAug()
    noise: NoiseAug = NoiseAug()
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
    """Initialise from a checkpoint (path relative to the submission folder) and optionally keep the
    encoder frozen for the first epochs, so the decoder adapts before the pretrained features move."""

    checkpoint: str | None = None
    freeze_encoder_epochs: int = Field(0, ge=0)


class MonaiSchedule(_Config):
    """How long and how big: one per machine class (``cpu``, ``gpu``)."""

    epochs: int = Field(ge=1)
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


# --------------------------------------------------------------------------------------------------
# nnU-Net
# --------------------------------------------------------------------------------------------------


class NnUNetInference(_Config):
    tile_step_size: float = Field(0.5, gt=0, le=1)
    #: Mirroring test-time augmentation over the axes nnU-Net allowed during training.
    mirroring: bool = True


class NnUNetSchedule(_Config):
    """Overrides of nnU-Net's training schedule; every ``None`` keeps nnU-Net's default (1000 epochs of
    250 iterations, 50 validation iterations, the planned batch size). Any override selects the
    short-schedule trainer subclass; none at all trains with ``nnUNetTrainer`` itself."""

    epochs: int | None = Field(None, ge=1)
    iterations_per_epoch: int | None = Field(None, ge=1)
    val_iterations_per_epoch: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
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
    def is_default(self) -> bool:
        """True when nothing about the training itself is overridden."""
        return all(getattr(self, name) is None for name in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch", "batch_size"))


class NnUNetRecipe(_Config):
    """Recipe of the nnU-Net v2 adapter."""

    trainer: Literal["nnunet"]
    configuration: Literal["3d_fullres", "2d"] = "3d_fullres"
    #: Dataset id of the nnU-Net dataset created inside each run folder (never shared between runs).
    dataset_id: int = Field(501, ge=1, le=999)
    #: nnU-Net's GPU-memory target for planning (GB); ``None`` keeps nnU-Net's default (8 GB).
    gpu_memory_target_gb: float | None = Field(None, gt=0)
    inference: NnUNetInference = NnUNetInference()
    #: nnU-Net checkpoint (path relative to the submission folder) to initialise the network from.
    pretrained_weights: str | None = None
    schedules: dict[ScheduleName, NnUNetSchedule]

    def inference_for(self, schedule: ScheduleName) -> NnUNetInference:
        """The schedule's ``inference`` if it has one, else the recipe's."""
        return self.schedules[schedule].inference or self.inference


Recipe = Annotated[Union[MonaiRecipe, NnUNetRecipe], Field(discriminator="trainer")]
_RECIPE_ADAPTER: TypeAdapter = TypeAdapter(Recipe)


def parse_recipe(recipe: dict[str, Any] | MonaiRecipe | NnUNetRecipe, *, source: str = "recipe") -> MonaiRecipe | NnUNetRecipe:
    """Validate a recipe mapping; :class:`RecipeError` names ``source`` and every problem found."""
    if isinstance(recipe, (MonaiRecipe, NnUNetRecipe)):
        return recipe
    if not isinstance(recipe, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping, got {type(recipe).__name__}")
    if recipe.get("trainer") not in ("monai", "nnunet"):
        raise RecipeError(f"{source}: 'trainer' must be 'monai' or 'nnunet', got {recipe.get('trainer')!r}")
    try:
        return _RECIPE_ADAPTER.validate_python(recipe)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or '<root>'}: {err['msg']}" for err in exc.errors())
        raise RecipeError(f"{source}: invalid recipe ({problems})") from exc


def resolve_schedule_name(schedule: str) -> ScheduleName:
    """``"auto"`` means ``"gpu"`` when CUDA is available, else ``"cpu"``."""
    if schedule == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    if schedule not in ("cpu", "gpu"):
        raise RecipeError(f"schedule must be 'auto', 'cpu' or 'gpu', got {schedule!r}")
    return schedule  # type: ignore[return-value]


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
