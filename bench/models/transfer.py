"""Transfer learning: load a pre-trained checkpoint into a network, strictly, and say what was loaded.

A ``trainable`` submission declares transfer as data, in its recipe (:class:`bench.models.recipe.TransferConfig`)::

    transfer:
      checkpoint: pretrained/unet-cpu.pt   # a file inside the submission folder, or a `bench pretrain` run id
      freeze: []                           # state-dict name prefixes kept frozen for the whole training
      reinit_head: false                   # re-initialise the output layers instead of loading them
      lr_loaded: 0.003                     # learning rate of the loaded tensors (default: the optimizer's)
      strict: true                         # shapes must match and at least min_share must load
      min_share: 0.9

What this module does with it:

* :func:`resolve_checkpoint` finds the file: a relative path that stays inside the submission folder
  (the submission's content hash covers it; an absolute path is accepted for scripted use, its hash
  enters the run id all the same), or a 16-hex-digit run id of ``bench pretrain``, looked up as
  ``<results>/pretrain/<id>/weights.pt`` under the results folders given (the harness's, then
  ``HIE_BENCH_RESULTS_DIR``).
* :func:`read_checkpoint` reads it with ``torch.load(weights_only=True)`` (never arbitrary pickles) and
  accepts a bare state dict, a HIE-Bench ``model.pt`` / ``checkpoint.pt``, an nnU-Net checkpoint
  (``network_weights``) or the compact file ``bench pretrain --export`` writes (float16 or per-channel
  int8, dequantised here).
* :func:`match_state_dict` compares it with the network: each network tensor is *loaded* (same name and
  shape), *mismatched* (same name, other shape), *missing* (not in the checkpoint) or *head*
  (``reinit_head``); checkpoint tensors the network lacks are *unexpected*. The **share** is loaded /
  (network tensors - head tensors). Strict (the default): any mismatched shape, or a share below
  ``min_share``, is a :class:`TransferError` listing the first tensors that did not match and their
  count. ``strict: false`` loads what matches and records the share.
* :func:`apply_transfer` does all of it for the MONAI trainer and returns a :class:`TransferReport`
  (recorded in the fold's ``run.json`` under ``training.transfer`` and with its budget);
  :func:`prepare_nnunet_weights` does the same check for nnU-Net and writes the matched tensors in
  nnU-Net's checkpoint layout, which ``nnunetv2.run.load_pretrained_weights`` then loads.
* :func:`transfer_identity` is what enters the benchmark's run id: the declaration plus the SHA-256 of
  the checkpoint file, so other weights are another run.

Training-data fractions for learning curves are in :mod:`bench.fractions`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    import torch

#: File name of the weights in a ``bench pretrain`` run folder (``<results>/pretrain/<run id>/``).
PRETRAIN_WEIGHTS = "weights.pt"
#: Sub-folder of a results folder that holds ``bench pretrain`` runs.
PRETRAIN_FOLDER = "pretrain"
#: Format tag of the compact weights file written by ``bench pretrain --export``.
COMPACT_FORMAT = "hie-bench-weights"
#: How many non-matching tensor names an error lists before "... and N more".
LIST_FIRST = 8

_RUN_ID = re.compile(r"^[0-9a-f]{16}$")


class TransferError(ValueError):
    """A transfer checkpoint cannot be used as declared; the message says which tensors and how to fix it."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_run_id(reference: str) -> bool:
    """A ``bench pretrain`` run id (16 lower-case hex digits) rather than a path."""
    return bool(_RUN_ID.match(reference))


def default_results_dirs(results_dir: Path | None = None) -> list[Path]:
    """Where pretrain run ids are looked up: ``results_dir`` (the harness's), then ``HIE_BENCH_RESULTS_DIR``
    (default ``results``)."""
    dirs = [Path(results_dir)] if results_dir is not None else []
    dirs.append(Path(os.environ.get("HIE_BENCH_RESULTS_DIR", "results")))
    return list(dict.fromkeys(d.resolve() for d in dirs))


def resolve_checkpoint(reference: str, *, submission_dir: Path | None, results_dirs: Iterable[Path] = ()) -> Path:
    """The checkpoint file a recipe's ``transfer.checkpoint`` names (:class:`TransferError` when absent).

    A 16-hex-digit run id is ``<results>/pretrain/<id>/weights.pt`` in the first results folder that has
    it; anything else is a path relative to the submission folder that must stay inside it.
    """
    if is_run_id(reference):
        searched = [Path(d) / PRETRAIN_FOLDER / reference / PRETRAIN_WEIGHTS for d in results_dirs]
        for path in searched:
            if path.is_file():
                return path
        raise TransferError(
            f"transfer.checkpoint {reference}: no pretrain run with this id (looked for {', '.join(map(str, searched)) or 'nothing'}); "
            "run `bench pretrain` to produce it, or set --results / HIE_BENCH_RESULTS_DIR to the folder that holds it"
        )
    path = Path(reference)
    if submission_dir is None or path.is_absolute():  # scripted use; the file's hash still enters the run id
        if not path.is_file():
            raise TransferError(f"transfer.checkpoint {reference}: not found")
        return path
    root = Path(submission_dir).resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise TransferError(
            f"transfer.checkpoint {reference}: a relative path must stay inside the submission folder {root} (its content hash covers it); "
            "copy the weights into the submission folder or name a `bench pretrain` run id"
        )
    if not resolved.is_file():
        raise TransferError(f"transfer.checkpoint {reference}: {resolved} not found; produce it with `bench pretrain --export {resolved}`")
    return resolved


def read_checkpoint(path: Path) -> dict[str, "torch.Tensor"]:
    """The state dict stored at ``path``, read with ``torch.load(weights_only=True)``, as float tensors."""
    import torch

    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # an arbitrary pickle is refused here, as is a damaged file
        raise TransferError(f"{path}: not a weights-only torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(data, dict) and data.get("format") == COMPACT_FORMAT:
        return _dequantise(data)
    for key in ("state_dict", "network_state", "network_weights"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise TransferError(f"{path}: holds no state dict (a mapping of tensor names to tensors)")
    return dict(data)


def compact_state_dict(state: Mapping[str, "torch.Tensor"], precision: str = "int8", info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A small, weights-only serialisable form of ``state``: ``float32``, ``float16`` or ``int8``
    (symmetric, one scale per output channel of every tensor of 2+ dimensions; 1-D tensors stay float16)."""
    import torch

    if precision not in ("float32", "float16", "int8"):
        raise ValueError(f"precision must be float32, float16 or int8, got {precision!r}")
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        value = value.detach().cpu()
        if not value.is_floating_point():
            tensors[name] = value.clone()
        elif precision == "float32":
            tensors[name] = value.float().clone()
        elif precision == "float16" or value.dim() < 2:
            tensors[name] = value.half().clone()
        else:
            flat = value.float().reshape(value.shape[0], -1)
            scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            tensors[name] = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(value.shape)
            scales[name] = scale.half()
    return {"format": COMPACT_FORMAT, "precision": precision, "tensors": tensors, "scales": scales, "info": dict(info or {})}


def _dequantise(data: Mapping[str, Any]) -> dict[str, "torch.Tensor"]:
    import torch

    scales = data.get("scales") or {}
    out: dict[str, torch.Tensor] = {}
    for name, value in (data.get("tensors") or {}).items():
        if name in scales:
            shape = value.shape
            out[name] = (value.reshape(shape[0], -1).float() * scales[name].float()[:, None]).reshape(shape)
        elif value.is_floating_point():
            out[name] = value.float()
        else:
            out[name] = value
    return out


def head_prefixes(net: "torch.nn.Module", out_channels: int = 2) -> tuple[str, ...]:
    """State-dict prefixes of the output layers: every convolution or linear layer producing the
    network's ``out_channels`` logits (the deep-supervision heads included)."""
    from torch import nn

    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d, nn.Linear)
    prefixes = []
    for name, module in net.named_modules():
        channels = getattr(module, "out_channels", getattr(module, "out_features", None))
        if isinstance(module, kinds) and channels == out_channels and name:
            prefixes.append(name + ".")
    return tuple(prefixes)


@dataclass
class TransferMatch:
    """How a checkpoint's tensors line up with a network's (names, by outcome)."""

    loaded: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: checkpoint (a, b) vs network (c, d)"
    missing: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def expected(self) -> int:
        return len(self.loaded) + len(self.mismatched) + len(self.missing)

    @property
    def share(self) -> float:
        """Loaded tensors over the network's tensors that should load (the head left out when re-initialised)."""
        return len(self.loaded) / self.expected if self.expected else 0.0

    def not_loaded(self) -> list[str]:
        return [*self.mismatched, *(f"{name}: not in the checkpoint" for name in self.missing)]


def match_state_dict(own: Mapping[str, "torch.Tensor"], checkpoint: Mapping[str, "torch.Tensor"], *, skip: Sequence[str] = ()) -> TransferMatch:
    """Compare a network's state dict with a checkpoint's; names starting with a ``skip`` prefix are the head."""
    match = TransferMatch()
    skip = tuple(skip)
    for name, tensor in own.items():
        if skip and name.startswith(skip):
            match.head.append(name)
        elif name not in checkpoint:
            match.missing.append(name)
        elif tuple(checkpoint[name].shape) != tuple(tensor.shape):
            match.mismatched.append(f"{name}: checkpoint {tuple(checkpoint[name].shape)} vs network {tuple(tensor.shape)}")
        else:
            match.loaded.append(name)
    match.unexpected = [name for name in checkpoint if name not in own]
    return match


def _listing(names: Sequence[str]) -> str:
    shown = "; ".join(names[:LIST_FIRST])
    return shown + (f"; ... and {len(names) - LIST_FIRST} more" if len(names) > LIST_FIRST else "")


def check_match(match: TransferMatch, *, strict: bool, min_share: float, source: str) -> None:
    """Refuse a strict transfer with a shape mismatch or a share below ``min_share`` (and any transfer that
    loads nothing), listing the first tensors that did not load and their count."""
    problems = match.not_loaded()
    if not match.loaded:
        raise TransferError(f"{source}: no tensor of the checkpoint matches the network by name and shape ({len(problems)} did not match: "
                            f"{_listing(problems)}); is it a checkpoint of the same architecture and network params?")
    if not strict:
        return
    if match.mismatched or match.share < min_share:
        why = f"{len(match.mismatched)} tensor(s) differ in shape" if match.mismatched else f"only {match.share:.0%} of the network's tensors load (min_share {min_share:.0%})"
        raise TransferError(
            f"{source}: strict transfer refused: {why}; {len(problems)} of {match.expected} tensors did not match: {_listing(problems)}"
            + (f" ({len(match.unexpected)} checkpoint tensors are not in the network)" if match.unexpected else "")
            + ". Fix: pre-train the same network with the same params (`bench pretrain SUBMISSION`), or set transfer.strict: false to load only what matches"
        )


@dataclass(frozen=True)
class TransferReport:
    """What a transfer loaded (``run.json``: ``training.transfer``)."""

    checkpoint: str
    sha256: str
    loaded: int
    expected: int
    share: float
    strict: bool
    head_reinitialised: int = 0
    mismatched: int = 0
    missing: int = 0
    unexpected: int = 0
    frozen: int = 0
    lr_loaded: float | None = None
    not_loaded: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["not_loaded"] = list(self.not_loaded[:LIST_FIRST])
        return data

    def summary(self) -> str:
        return f"from {self.sha256[:12]} ({self.loaded}/{self.expected} tensors, {self.share:.0%})"


def apply_transfer(net: "torch.nn.Module", config: Any, *, submission_dir: Path | None, results_dirs: Iterable[Path] = (),
                   out_channels: int = 2) -> tuple[TransferReport, set[str]]:
    """Load ``config.checkpoint`` into ``net`` as ``config`` declares (see the module docstring).

    Returns the report and the names of the loaded tensors (the trainer gives their parameters
    ``lr_loaded``). Freezing is the trainer's (:func:`frozen_names`).
    """
    path = resolve_checkpoint(config.checkpoint, submission_dir=submission_dir, results_dirs=results_dirs)
    checkpoint = read_checkpoint(path)
    own = net.state_dict()
    skip = head_prefixes(net, out_channels) if config.reinit_head else ()
    match = match_state_dict(own, checkpoint, skip=skip)
    check_match(match, strict=config.strict, min_share=config.min_share, source=f"transfer.checkpoint {config.checkpoint}")
    own.update({name: checkpoint[name].to(own[name].dtype) for name in match.loaded})
    net.load_state_dict(own)
    frozen = frozen_names(net, config.freeze)
    report = TransferReport(
        checkpoint=str(config.checkpoint), sha256=file_sha256(path), loaded=len(match.loaded), expected=match.expected,
        share=round(match.share, 6), strict=bool(config.strict), head_reinitialised=len(match.head), mismatched=len(match.mismatched),
        missing=len(match.missing), unexpected=len(match.unexpected), frozen=len(frozen), lr_loaded=config.lr_loaded,
        not_loaded=tuple(match.not_loaded()),
    )
    return report, set(match.loaded)


def frozen_names(net: "torch.nn.Module", prefixes: Sequence[str]) -> list[str]:
    """Parameter names under the ``freeze`` prefixes (a prefix that matches nothing is an error)."""
    names = [name for name, _ in net.named_parameters()]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in names):
            raise TransferError(f"transfer.freeze: no parameter of the network starts with {prefix!r} (the first are: {', '.join(names[:5])})")
    return [name for name in names if prefixes and name.startswith(tuple(prefixes))]


def parameter_groups(net: "torch.nn.Module", loaded: set[str], lr_loaded: float | None, base_lr: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: loaded parameters at ``lr_loaded`` (as ``lr_scale`` of the base
    rate, which the trainer's schedule multiplies), the rest at the base rate."""
    params = list(net.named_parameters())
    if lr_loaded is None or not loaded:
        return [{"params": [p for _, p in params], "lr_scale": 1.0}]
    groups = [
        {"params": [p for n, p in params if n in loaded], "lr_scale": float(lr_loaded) / float(base_lr)},
        {"params": [p for n, p in params if n not in loaded], "lr_scale": 1.0},
    ]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------------------------------
# nnU-Net: the same check, then nnU-Net's own loader
# --------------------------------------------------------------------------------------------------

#: nnU-Net's load_pretrained_weights never transfers these (its segmentation heads).
NNUNET_HEAD = ".seg_layers."


def prepare_nnunet_weights(net: "torch.nn.Module", config: Any, *, submission_dir: Path | None, results_dirs: Iterable[Path], out: Path) -> TransferReport:
    """Check ``config.checkpoint`` against nnU-Net's network as :func:`apply_transfer` does, and write the
    tensors to hand over to ``nnunetv2.run.load_pretrained_weights`` at ``out``.

    The checkpoint is read weights-only here; the file written holds only tensors (the matched ones, and
    the network's own initial values where nothing matched, so nnU-Net's all-keys assertion holds with
    ``strict: false``), in nnU-Net's ``{"network_weights": ...}`` layout. nnU-Net's segmentation layers
    (``.seg_layers.``) are never transferred by nnU-Net, so they count as the head here.
    """
    import torch

    from bench.models.runfolder import torch_save_atomic

    for name in ("freeze", "lr_loaded"):
        if getattr(config, name):
            raise TransferError(f"transfer.{name} is not supported with trainer: nnunet (nnU-Net builds its own optimizer); leave it out")
    path = resolve_checkpoint(config.checkpoint, submission_dir=submission_dir, results_dirs=results_dirs)
    checkpoint = read_checkpoint(path)
    own = getattr(net, "_orig_mod", net).state_dict()  # torch.compile'd: nnU-Net's loader unwraps it too
    heads = tuple(name for name in own if NNUNET_HEAD in name)
    match = match_state_dict(own, checkpoint, skip=heads)
    check_match(match, strict=config.strict, min_share=config.min_share, source=f"transfer.checkpoint {config.checkpoint}")
    weights = {name: (checkpoint[name] if name in set(match.loaded) else tensor).detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype).clone()
               for name, tensor in own.items()}
    torch_save_atomic({"network_weights": weights}, Path(out))
    return TransferReport(
        checkpoint=str(config.checkpoint), sha256=file_sha256(path), loaded=len(match.loaded), expected=match.expected,
        share=round(match.share, 6), strict=bool(config.strict), head_reinitialised=len(match.head), mismatched=len(match.mismatched),
        missing=len(match.missing), unexpected=len(match.unexpected), not_loaded=tuple(match.not_loaded()),
    )


# --------------------------------------------------------------------------------------------------
# The run identity
# --------------------------------------------------------------------------------------------------


def transfer_identity(recipe: Mapping[str, Any] | Any, submission_dir: Path, *, schedule: str | None = None,
                      results_dir: Path | None = None) -> dict[str, Any] | None:
    """What a recipe's transfer adds to a run's identity: the declaration and the SHA-256 of the
    checkpoint file (``None`` without transfer). :class:`TransferError` when the checkpoint is missing,
    so a run is never planned against weights that are not there."""
    found = declared_checkpoint(recipe, submission_dir, schedule=schedule, results_dir=results_dir)
    return None if found is None else checkpoint_identity(*found)


def checkpoint_identity(config: Any, path: Path) -> dict[str, Any]:
    """The transfer declaration ``config`` and the SHA-256 of the checkpoint ``path`` it names."""
    return {**config.model_dump(mode="json"), "sha256": file_sha256(path)}


def declared_checkpoint(recipe: Mapping[str, Any] | Any, submission_dir: Path, *, schedule: str | None = None,
                        results_dir: Path | None = None) -> tuple[Any, Path] | None:
    """The recipe's transfer declaration and the checkpoint file it names (``None`` without transfer);
    :class:`TransferError` when the file is missing."""
    from bench.models.recipe import parse_recipe

    parsed = parse_recipe(dict(recipe) if isinstance(recipe, Mapping) else recipe, source=str(Path(submission_dir) / "submission.yaml"))
    config = transfer_config(parsed, schedule)
    if config is None:
        return None
    return config, resolve_checkpoint(config.checkpoint, submission_dir=submission_dir, results_dirs=default_results_dirs(results_dir))


def transfer_config(recipe: Any, schedule: str | None = None) -> Any | None:
    """The recipe's :class:`~bench.models.recipe.TransferConfig` (for ``schedule``, when its schedule
    replaces it) when it names a checkpoint (nnU-Net's legacy ``pretrained_weights`` counts as
    ``transfer.checkpoint``), else ``None``."""
    config = recipe.transfer_for(schedule) if schedule and hasattr(recipe, "transfer_for") else getattr(recipe, "transfer", None)
    legacy = getattr(recipe, "pretrained_weights", None)
    if legacy and (config is None or not config.checkpoint):
        from bench.models.recipe import TransferConfig

        config = TransferConfig(checkpoint=legacy) if config is None else config.model_copy(update={"checkpoint": legacy})
    return config if config is not None and config.checkpoint else None


# --------------------------------------------------------------------------------------------------
# The budget record, with the transfer beside it (what the harness stores per fold for the card)
# --------------------------------------------------------------------------------------------------


def with_transfer(budget: Any, transfer: Mapping[str, Any] | None) -> Any:
    """``budget`` (a :class:`~bench.models.recipe.BudgetUsed`) whose ``to_dict()`` also holds ``transfer``,
    so the run's stored per-fold budget says what the fold was initialised from."""
    if budget is None or not transfer:
        return budget
    from dataclasses import fields

    return TransferBudgetUsed(**{f.name: getattr(budget, f.name) for f in fields(budget)}, transfer=dict(transfer))


def _budget_class():
    from bench.models.recipe import BudgetUsed

    return BudgetUsed


@dataclass(frozen=True)
class TransferBudgetUsed(_budget_class()):  # type: ignore[misc]
    """A :class:`~bench.models.recipe.BudgetUsed` of a fold initialised from a checkpoint."""

    transfer: dict | None = None

    def __str__(self) -> str:
        text = super().__str__()
        if self.transfer:
            text += f", pre-trained {str(self.transfer.get('sha256', ''))[:12]} ({float(self.transfer.get('share', 0)):.0%} loaded)"
        return text


#: Manifest fields that must be equal for two submissions to be transfer twins (besides the recipe).
TWIN_FIELDS = ("kind", "inputs", "preprocessing")


def _without_transfer(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """``recipe`` with every ``transfer`` declaration removed (top level and per schedule)."""
    stripped = {key: value for key, value in recipe.items() if key != "transfer"}
    if isinstance(stripped.get("schedules"), Mapping):
        stripped["schedules"] = {name: {k: v for k, v in (schedule or {}).items() if k != "transfer"}
                                 for name, schedule in stripped["schedules"].items()}
    return stripped


def is_transfer_twin(manifest: Mapping[str, Any], scratch: Mapping[str, Any]) -> bool:
    """Whether ``manifest`` (a stored ``submission.yaml``) is ``scratch`` initialised from a checkpoint:
    its recipe declares a ``transfer`` checkpoint, and everything else that trains or feeds the model
    (the recipe without ``transfer``, :data:`TWIN_FIELDS`) is the same. Such a pair's paired test
    measures the pre-training alone; the leaderboard shows it (:func:`bench.report.leaderboard_table`)."""
    recipe, other = manifest.get("recipe"), scratch.get("recipe")
    if not isinstance(recipe, Mapping) or not isinstance(other, Mapping) or manifest is scratch:
        return False
    if not (recipe.get("transfer") or {}).get("checkpoint") or (other.get("transfer") or {}).get("checkpoint"):
        return False
    return _without_transfer(recipe) == _without_transfer(other) and all(manifest.get(f) == scratch.get(f) for f in TWIN_FIELDS)
