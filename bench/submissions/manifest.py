"""``submission.yaml``: the manifest every submission folder starts with, validated by pydantic.

The manifest is a discriminated union on ``kind``: the common fields (name, version, authors,
description, licence, inputs, optional preprocessing) plus the fields of its kind. Unknown fields are
errors, so a typo never silently falls back to a default. ``docs/submissions.md`` documents every field.

The YAML itself comes from other people, so :func:`read_manifest_data` parses it within bounds: at most
:data:`MAX_MANIFEST_BYTES`, nesting at most :data:`MAX_YAML_DEPTH` deep, and no aliases (``*name``,
which includes merge keys ``<<: *name``). Counting aliases would not bound anything (nine aliases of
nine aliases expand to 9^9 nodes once something walks the tree, as storing the manifest does), and a
manifest is short enough to write out, so they are refused outright: a 600-byte "billion laughs"
gets one :class:`ManifestYAMLError` line instead of taking down the run that stores it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    TypeAdapter,
    field_validator,
    model_validator,
)

from bench.ids import SUBMISSION_NAME_PATTERN
from bench.preprocess import PreprocessingConfig

#: File name of the manifest inside a submission folder.
MANIFEST_NAME = "submission.yaml"

#: Submission names are folder names and parts of run ids: lower-case letters, digits, ``.``, ``_``, ``-``
#: (the safe-identifier rule of :mod:`bench.ids`, in lower case).
NAME_PATTERN = SUBMISSION_NAME_PATTERN

#: Largest ``submission.yaml`` read: real manifests are a few hundred bytes.
MAX_MANIFEST_BYTES = 256 * 1024
#: Deepest nesting of YAML collections (a manifest needs four or five levels).
MAX_YAML_DEPTH = 32

#: Default time limit for one case (model loading included for the first case).
DEFAULT_TIME_LIMIT_S = 600.0


class InputSpec(BaseModel):
    """What a model receives.

    ``channels``: the image channels it uses, by name, in the order it expects them.
    ``space``: ``native`` (the raw case: a :class:`~bench.data.dataset.Case`, original grid) or
    ``preprocessed`` (a :class:`~bench.preprocess.PreprocessedCase` made with the manifest's
    ``preprocessing``, or the benchmark's standard preprocessing if it has none).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: tuple[str, ...] = ("ADC", "Z-ADC")
    space: Literal["native", "preprocessed"] = "native"

    @field_validator("channels")
    @classmethod
    def _non_empty_unique(cls, channels: tuple[str, ...]) -> tuple[str, ...]:
        if not channels or len(set(channels)) != len(channels):
            raise ValueError(f"channels must be a non-empty list of distinct names, got {list(channels)}")
        return channels


class ResourceLimits(BaseModel):
    """``limits:``: what the model's sandboxed process may use (docs/security.md).

    Every field is optional; a missing one takes the benchmark's default and every value is clamped to the
    benchmark's ceiling (``DEFAULT_LIMITS`` and ``CEILING_LIMITS`` in :mod:`bench.submissions.sandbox`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Memory (address space on CPU, writable memory on a GPU), MiB.
    memory_mb: PositiveInt | None = None
    #: CPU seconds per case, all threads together (loading the model counts towards the first case).
    cpu_s: PositiveInt | None = None
    #: Largest file the model may write, MiB (also the size of its /tmp).
    file_size_mb: PositiveInt | None = None
    #: Open file descriptors.
    open_files: PositiveInt | None = None


class _ManifestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN, description="Folder-safe name, unique among submissions.")
    version: str = Field(min_length=1, description="Version of the submission, e.g. '1.0.0'.")
    authors: list[str] = Field(min_length=1, description="People or groups responsible for the model.")
    description: str = Field(min_length=1, description="What the model is and how it was trained.")
    licence: str = Field(
        min_length=1,
        validation_alias=AliasChoices("licence", "license"),
        description="Licence of the submission's files (SPDX identifier preferred).",
    )
    inputs: InputSpec = InputSpec()
    preprocessing: PreprocessingConfig | None = Field(
        None, description="Preprocessing for inputs.space 'preprocessed'; default: the standard pipeline."
    )
    limits: ResourceLimits | None = Field(
        None, description="Memory, CPU time, file size and open files of the sandboxed model, within the benchmark's ceilings."
    )

    @field_validator("authors")
    @classmethod
    def _authors_non_blank(cls, authors: list[str]) -> list[str]:
        if any(not author.strip() for author in authors):
            raise ValueError("author names must not be blank")
        return authors

    @model_validator(mode="after")
    def _preprocessing_matches_inputs(self) -> "_ManifestBase":
        if self.preprocessing is not None:
            if self.inputs.space != "preprocessed":
                raise ValueError("'preprocessing' is only used with inputs.space: preprocessed")
            if tuple(self.preprocessing.channels) != tuple(self.inputs.channels):
                raise ValueError(
                    f"preprocessing.channels {list(self.preprocessing.channels)} must equal inputs.channels "
                    f"{list(self.inputs.channels)}"
                )
        return self

    @property
    def effective_preprocessing(self) -> PreprocessingConfig | None:
        """The preprocessing the model's inputs go through, or ``None`` for native inputs."""
        if self.inputs.space == "native":
            return None
        return self.preprocessing or PreprocessingConfig(channels=self.inputs.channels)


class _NeedsPreprocessedInputs(_ManifestBase):
    """Kinds that run on the benchmark's preprocessing (tensors in, tensors out)."""

    inputs: InputSpec = InputSpec(space="preprocessed")

    @model_validator(mode="after")
    def _space_is_preprocessed(self) -> "_NeedsPreprocessedInputs":
        if self.inputs.space != "preprocessed":
            raise ValueError(f"kind '{self.kind}' needs inputs.space: preprocessed")  # type: ignore[attr-defined]
        return self


class _SlidingWindowFields(_NeedsPreprocessedInputs):
    """Fields of the kinds run with the benchmark's own sliding-window inference."""

    #: Patch (window) size in voxels, array order (z, y, x).
    patch_size: tuple[PositiveInt, PositiveInt, PositiveInt]
    #: Fraction of overlap between neighbouring windows.
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    #: How overlapping windows are blended.
    blend: Literal["gaussian", "constant"] = "gaussian"
    #: Width of the Gaussian importance map as a fraction of the window (MONAI's and nnU-Net's 0.125).
    sigma_scale: float = Field(0.125, gt=0.0, le=1.0)
    #: Applied to the network output: ``sigmoid`` or ``softmax`` over logits, ``none`` for probabilities.
    activation: Literal["sigmoid", "softmax", "none"] = "sigmoid"
    #: Output channel holding the lesion probability (negative counts from the end); with an
    #: ``uncertainty_channel`` it indexes the channels left once that one is taken out.
    lesion_channel: int = -1
    #: Output channel holding a voxel uncertainty, not a class: the population variance of the lesion
    #: probability over the flip-TTA copies, in [0, 0.25] (recorded as ``tta-variance``; exported MONAI
    #: folds with mirroring have it as their last channel, ``-1``). Taken out before ``activation`` and
    #: ``lesion_channel``. ``None``: every channel is a class (uploaded models, unless they say otherwise).
    uncertainty_channel: int | None = None
    #: Probability above which a voxel is lesion.
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    sw_batch_size: PositiveInt = 1
    time_limit_s: PositiveFloat = DEFAULT_TIME_LIMIT_S


class PythonManifest(_ManifestBase):
    """``kind: python``: a function ``predict(case, **options) -> mask`` in a file of the folder."""

    kind: Literal["python"]
    #: ``path/to/file.py:function`` (a file inside the folder) or ``package.module:function``
    #: (importable with the folder on ``sys.path``).
    entry: str
    #: Keyword arguments passed to the function (plain YAML values).
    options: dict[str, Any] = Field(default_factory=dict)
    time_limit_s: PositiveFloat = DEFAULT_TIME_LIMIT_S

    @field_validator("entry")
    @classmethod
    def _entry_format(cls, entry: str) -> str:
        if not re.fullmatch(r"[^:\s]+:[A-Za-z_][A-Za-z0-9_]*", entry):
            raise ValueError(f"entry {entry!r} must look like 'predict.py:predict' or 'package.module:predict'")
        return entry


class PredictionsManifest(_ManifestBase):
    """``kind: predictions``: precomputed masks ``<folder>/<case_id>.nii.gz`` (or ``.mha``...)."""

    kind: Literal["predictions"]
    folder: str = "predictions"


class TorchScriptManifest(_SlidingWindowFields):
    """``kind: torchscript``: a ``torch.jit`` model file run with sliding-window inference."""

    kind: Literal["torchscript"]
    model: str = "model.pt"


class OnnxManifest(_SlidingWindowFields):
    """``kind: onnx``: an ONNX model run with onnxruntime and sliding-window inference."""

    kind: Literal["onnx"]
    model: str = "model.onnx"


class MonaiBundleManifest(_SlidingWindowFields):
    """``kind: monai-bundle``: a MONAI bundle; only its network definition and weights are used."""

    kind: Literal["monai-bundle"]
    #: Bundle folder inside the submission.
    bundle: str = "."
    #: Inference configuration inside the bundle (JSON or YAML).
    config: str = "configs/inference.json"
    #: Key of the network definition in the configuration.
    network_key: str = "network_def"
    #: Weights (a ``state_dict``) inside the bundle, loaded with ``torch.load(weights_only=True)``.
    weights: str = "models/model.pt"
    #: The configuration needs code evaluation (``$`` expressions, ``%`` macros, arbitrary ``_target_``);
    #: honoured only when the user also passes ``--trust-code``.
    allow_code: bool = False


class NnunetManifest(_ManifestBase):
    """``kind: nnunet``: an nnU-Net v2 trained-model folder (``dataset.json``, ``plans.json``, ``fold_*``)."""

    kind: Literal["nnunet"]
    model_folder: str = "model"
    folds: tuple[Union[int, Literal["all"]], ...] = (0,)
    checkpoint: str = "checkpoint_final.pth"
    tile_step_size: float = Field(0.5, gt=0.0, le=1.0)
    use_gaussian: bool = True
    use_mirroring: bool = True
    #: nnU-Net label value of lesions.
    lesion_label: PositiveInt = 1
    #: ``postprocessing.json`` chosen by nnU-Net's ``determine_postprocessing`` (path inside the folder).
    postprocessing: str | None = None
    #: The checkpoint holds Python objects beyond tensors and plain data (loading it runs code); honoured
    #: only when the user also passes ``--trust-code``.
    allow_code: bool = False
    time_limit_s: PositiveFloat = DEFAULT_TIME_LIMIT_S

    @model_validator(mode="after")
    def _native_inputs(self) -> "NnunetManifest":
        if self.inputs.space != "native":
            raise ValueError("kind 'nnunet' preprocesses by itself: use inputs.space: native")
        return self


class TrainableManifest(_NeedsPreprocessedInputs):
    """``kind: trainable``: a recipe the harness trains itself per fold (``bench.models.build_trainable``)."""

    kind: Literal["trainable"]
    #: Passed unchanged to ``bench.models.build_trainable``.
    recipe: dict[str, Any]


SubmissionManifest = Annotated[
    Union[
        PythonManifest,
        PredictionsManifest,
        TorchScriptManifest,
        OnnxManifest,
        MonaiBundleManifest,
        NnunetManifest,
        TrainableManifest,
    ],
    Field(discriminator="kind"),
]
"""Any valid manifest; ``manifest.kind`` says which."""

_ADAPTER: TypeAdapter[Any] = TypeAdapter(SubmissionManifest)

#: Every kind, in documentation order.
KINDS: tuple[str, ...] = ("nnunet", "monai-bundle", "torchscript", "onnx", "python", "predictions", "trainable")


def parse_manifest(data: Any) -> Any:
    """Validate a parsed ``submission.yaml`` (a dict); raises ``pydantic.ValidationError``."""
    return _ADAPTER.validate_python(data)


def read_manifest_data(path: Path) -> Any:
    """Parse the YAML of ``path`` safely and within bounds (see the module docstring).

    Raises :class:`ManifestYAMLError` (a ``yaml.YAMLError``) for a file over :data:`MAX_MANIFEST_BYTES`,
    an alias or too deep nesting; ``yaml.YAMLError`` for bad syntax; ``UnicodeDecodeError``; ``OSError``.
    """
    with open(path, "rb") as handle:
        raw = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestYAMLError(f"{path.name} is over the limit of {MAX_MANIFEST_BYTES // 1024} KiB "
                                "(a manifest is a few hundred bytes: move data into files beside it)")
    return load_bounded_yaml(raw.decode("utf-8"), path.name)


def load_bounded_yaml(text: str, source: str = "<yaml>") -> Any:
    """``yaml.safe_load`` without aliases and with nesting at most :data:`MAX_YAML_DEPTH` deep.

    For any YAML that comes from a submission (its manifest, a MONAI bundle's configuration).
    """
    loader = BoundedSafeLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class ManifestYAMLError(yaml.YAMLError):
    """YAML refused for its size, an alias or its depth (see :func:`load_bounded_yaml`)."""


class BoundedSafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (no Python tags) that refuses aliases and deep nesting while composing."""

    source = "<yaml>"
    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ManifestYAMLError(f"{self.source}, line {event.start_mark.line + 1}: alias *{event.anchor} is not allowed "
                                    "(write the value out instead of using &anchors and *aliases)")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise ManifestYAMLError(f"{self.source}, line {mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1
