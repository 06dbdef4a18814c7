"""Trainable entrants: custom MONAI U-Nets and the nnU-Net v2 baseline.

The harness only needs two functions from here:

* :func:`build_trainable` turns a ``trainable`` submission's ``recipe`` into a
  :class:`bench.predictor.Trainable`, whose ``fit(train_cases, val_cases, run_dir)`` trains one fold
  (resumably) and returns a :class:`bench.predictor.Predictor`;
* :func:`export_fold` turns a trained run folder into a ``torchscript`` or ``nnunet`` submission.

Recipes are described in :mod:`bench.models.recipe`, architectures in :mod:`bench.models.networks`,
the trainer in :mod:`bench.models.trainer`, the nnU-Net adapter in :mod:`bench.models.nnunet`, speed
measurements in :mod:`bench.perf.models`. This module imports nothing heavy: torch, MONAI and nnU-Net
are imported when a model is actually built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from bench.predictor import Trainable
    from bench.preprocess import PreprocessingConfig


def build_trainable(
    recipe: dict[str, Any],
    *,
    submission_dir: Path,
    preprocessing: "PreprocessingConfig | None",
    schedule: str = "auto",
    cache_dir: Path | None = None,
    device: str | None = None,
) -> "Trainable":
    """Build the trainer a recipe describes.

    Args:
        recipe: the ``recipe`` mapping of a ``trainable`` submission (see :mod:`bench.models.recipe`).
        submission_dir: the submission folder (relative paths in the recipe are resolved there; its
            ``submission.yaml``, if present, names the model in exports).
        preprocessing: the inputs' preprocessing for the MONAI trainer (``None``: the standard
            pipeline); nnU-Net preprocesses by itself and only takes the channel selection from it.
        schedule: ``"cpu"``, ``"gpu"`` or ``"auto"`` (``gpu`` when CUDA is available).
        cache_dir: preprocessing cache shared between folds (``None``: no cache).
        device: force a torch device (``"cpu"``, ``"cuda"``); default CUDA when present.

    Raises:
        bench.models.recipe.RecipeError: the recipe is invalid or lacks the requested schedule.
    """
    from bench.models.recipe import MonaiRecipe, parse_recipe, resolve_schedule_name, select_schedule

    submission_dir = Path(submission_dir)
    source = str(submission_dir / "submission.yaml")
    parsed = parse_recipe(recipe, source=source)
    select_schedule(parsed, schedule, source=source)  # fail now, not at fit time, if it is missing
    schedule_name = resolve_schedule_name(schedule)
    identity = submission_identity(submission_dir)
    if isinstance(parsed, MonaiRecipe):
        from bench.models.trainer import MonaiTrainable

        return MonaiTrainable(
            parsed, schedule_name, preprocessing=preprocessing, submission_dir=submission_dir, cache_dir=cache_dir, device=device, source=identity
        )
    from bench.models.logreg import LogRegRecipe

    if isinstance(parsed, LogRegRecipe):
        from bench.models.logreg import LogRegTrainable

        return LogRegTrainable(parsed, schedule_name, preprocessing=preprocessing, submission_dir=submission_dir, source=identity)
    from bench.models.nnunet import NnUNetTrainable

    return NnUNetTrainable(parsed, schedule_name, preprocessing=preprocessing, submission_dir=submission_dir, device=device, source=identity)


class ExportUnsupported(ValueError):
    """The trained fold's trainer has no exported form (the harness then predicts with it in-process)."""


#: The exported form of each trainer's folds (``format="auto"``).
EXPORT_FORMATS = {"monai": "torchscript", "nnunet": "nnunet", "logreg": "python"}


def export_fold(
    run_dir: Path,
    out_dir: Path,
    format: Literal["torchscript", "nnunet", "python", "auto"] = "torchscript",
    *,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a trained fold as a submission folder that ``bench submission verify`` accepts.

    ``torchscript`` works for MONAI-trainer runs, ``nnunet`` for nnU-Net runs; ``auto`` picks by the run's
    trainer (:data:`EXPORT_FORMATS`) and raises :class:`ExportUnsupported` for a trainer with no export. ``name`` defaults to the
    source submission's name plus ``-export``. Returns ``out_dir``.
    """
    from bench.models.export import export_fold as _export

    if format == "auto":
        from bench.models.runfolder import read_run_record

        trainer = read_run_record(Path(run_dir))["identity"].get("trainer")
        if trainer not in EXPORT_FORMATS:
            raise ExportUnsupported(f"{run_dir}: folds of the '{trainer}' trainer have no exported form")
        format = EXPORT_FORMATS[trainer]  # type: ignore[assignment]
    return _export(Path(run_dir), Path(out_dir), format, name=name, overwrite=overwrite)


def submission_identity(submission_dir: Path) -> dict[str, Any]:
    """Name, version, authors, description and licence of the submission in ``submission_dir`` (if any)."""
    manifest = Path(submission_dir) / "submission.yaml"
    if not manifest.is_file():
        return {"name": Path(submission_dir).name or "model"}
    from bench.submissions.manifest import read_manifest_data

    data = read_manifest_data(manifest) or {}
    keys = ("name", "version", "authors", "description", "licence", "license")
    identity = {k: data[k] for k in keys if k in data}
    if "license" in identity:
        identity.setdefault("licence", identity.pop("license"))
    return identity


__all__ = ["EXPORT_FORMATS", "ExportUnsupported", "build_trainable", "export_fold", "submission_identity"]
