"""Export a trained fold as a submission folder (``torchscript``, ``nnunet`` or ``python``).

* ``torchscript`` (MONAI-trainer runs): the network wrapped with its flip test-time augmentation
  (:class:`~bench.inference.MirroredSoftmax`) is traced at the training patch size, so the
  exported model outputs class *probabilities* and the manifest says ``activation: none``; sliding
  windows, Gaussian blending, threshold and preprocessing are those the run used. With mirroring the
  traced module also outputs the flip-TTA variance of the lesion probability as its last channel
  (``MirroredSoftmax(..., with_variance=True)``, no extra pass) and the manifest says
  ``uncertainty_channel: -1``, so the prediction records ``uncertainty_source: tta-variance``.
* ``nnunet`` (nnU-Net runs): nnU-Net's trained-model folder (``plans.json``, ``dataset.json`` and
  ``fold_<f>/checkpoint_final.pth`` for every internal fold, so the export predicts with the same
  ensemble) and the ``postprocessing.json`` that nnU-Net's ``determine_postprocessing`` chose. The checkpoint is rewritten to hold only tensors and plain data
  (weights, configuration name, mirroring axes), so it loads with ``torch.load(weights_only=True)``
  and needs no ``allow_code``; it names ``nnUNetTrainer`` as its trainer, whose network is the one
  every schedule trains.
* ``python`` (logistic-regression runs): the fitted ``model.json`` and a ``predict.py`` that runs the
  benchmark's own :class:`~bench.models.logreg.LogRegPredictor` on it (mask and probability map).

The manifest's descriptive fields (name, version, authors, description, licence) come from the source
submission recorded in the run folder. The folder is written to a temporary sibling, checked against
:mod:`bench.submissions.manifest`, then renamed into place.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

from bench.models.runfolder import MODEL_FILE, RunFolderError, read_run_record

ExportFormat = Literal["torchscript", "nnunet", "python"]
#: The trainer whose runs each format exports.
FORMAT_TRAINER = {"torchscript": "monai", "nnunet": "nnunet", "python": "logreg"}
MANIFEST_NAME = "submission.yaml"
DEFAULT_LICENCE = "Apache-2.0"


class ExportError(ValueError):
    """A run folder cannot be exported in the requested format; the message says why."""


def export_fold(run_dir: Path, out_dir: Path, format: ExportFormat = "torchscript", *, name: str | None = None, overwrite: bool = False) -> Path:
    """Write the trained fold in ``run_dir`` as a submission folder ``out_dir`` (see the module docstring)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    record = read_run_record(run_dir)
    trainer = record["identity"].get("trainer")
    if format not in FORMAT_TRAINER:
        raise ExportError(f"unknown export format {format!r}; use one of {sorted(FORMAT_TRAINER)}")
    if FORMAT_TRAINER[format] != trainer:
        usable = [f for f, t in FORMAT_TRAINER.items() if t == trainer]
        raise ExportError(f"{run_dir}: a '{trainer}' run cannot be exported as {format}"
                          + (f"; use format={usable[0]!r}" if usable else " (its trainer has no exported form)"))
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir}: already exists (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=out_dir.parent))
    try:
        common = _descriptive_fields(record, run_dir, format, name)
        exporters = {"torchscript": _export_torchscript, "nnunet": _export_nnunet, "python": _export_logreg}
        manifest = exporters[format](run_dir, record, tmp)
        _write_manifest(tmp, {**common, **manifest})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _descriptive_fields(record: dict[str, Any], run_dir: Path, format: str, name: str | None) -> dict[str, Any]:
    source = record.get("info", {}).get("source", {}) or {}
    identity = record["identity"]
    base = source.get("name") or run_dir.name
    export_name = name or re.sub(r"[^a-z0-9._-]+", "-", f"{base}-{format}".lower()).strip("-.")[:64]
    n_train, n_val = len(identity.get("train_cases", [])), len(identity.get("val_cases", []))
    description = (
        f"{source.get('description', 'Model trained by HIE-Bench.').strip()} "
        f"Exported from the trained fold {run_dir.name} ({n_train} training and {n_val} validation cases, schedule '{identity.get('schedule')}')."
    )
    return {
        "name": export_name,
        "version": str(source.get("version", "1.0.0")),
        "authors": list(source.get("authors") or ["HIE-Bench"]),
        "description": description,
        "licence": source.get("licence", DEFAULT_LICENCE),
    }


def _export_torchscript(run_dir: Path, record: dict[str, Any], folder: Path) -> dict[str, Any]:
    import torch

    from bench.inference import MirroredSoftmax
    from bench.models.monai_model import ModelBundle

    bundle = ModelBundle.load(run_dir / MODEL_FILE)
    # With flip TTA the trace appends the flip variance of the lesion class as one more channel (no extra
    # pass; the first channels are bit for bit those of the plain module), named in the manifest.
    mirrored = bool(bundle.inference.mirror_axes)
    model = MirroredSoftmax(bundle.build_network(), bundle.inference.mirror_axes, with_variance=mirrored, lesion_channel=1).eval()
    example = torch.zeros((1, bundle.in_channels, *bundle.patch_size), dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        # shape checks inside MONAI/torch layers become constants of the trace: harmless here, because
        # the exported model is only ever run on windows of the traced patch size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, str(folder / "model.pt"))
    preprocessing = bundle.preprocessing_config()
    return {
        "kind": "torchscript",
        "model": "model.pt",
        "inputs": {"channels": list(preprocessing.channels), "space": "preprocessed"},
        "preprocessing": preprocessing.model_dump(mode="json"),
        "patch_size": list(bundle.patch_size),
        "overlap": bundle.inference.overlap,
        "blend": "gaussian",
        "sigma_scale": bundle.inference.gaussian_sigma_scale,
        "activation": "none",  # the traced model already averages softmax probabilities over flips
        "lesion_channel": 1,
        **({"uncertainty_channel": -1} if mirrored else {}),  # the flip-TTA variance ("tta-variance")
        "threshold": bundle.inference.threshold,
        "sw_batch_size": bundle.inference.sw_batch_size,
    }


def _export_nnunet(run_dir: Path, record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Every internal fold of the trained nnU-Net (its ensemble), its mirroring and its postprocessing."""
    import torch

    from bench.models.nnunet import load_nnunet_checkpoint, nnunet_export_spec

    spec = nnunet_export_spec(run_dir)
    source = run_dir / spec["model_folder"]
    model = folder / "model"
    model.mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, model / name)
    for fold in spec["folds"]:
        checkpoint_path = source / f"fold_{fold}" / spec["checkpoint"]
        if not checkpoint_path.is_file():
            raise RunFolderError(f"{checkpoint_path}: missing; the nnU-Net fold has not finished training")
        checkpoint = load_nnunet_checkpoint(checkpoint_path)
        mirroring = checkpoint.get("inference_allowed_mirroring_axes")
        (model / f"fold_{fold}").mkdir()
        torch.save(  # tensors and plain data only: loads with weights_only=True, needs no allow_code
            {
                "network_weights": checkpoint["network_weights"],
                "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": checkpoint["init_args"]["configuration"], "fold": fold},
                "inference_allowed_mirroring_axes": tuple(int(a) for a in mirroring) if mirroring is not None else None,
                "current_epoch": int(checkpoint.get("current_epoch", 0)),
            },
            model / f"fold_{fold}" / spec["checkpoint"],
        )
    manifest: dict[str, Any] = {}
    if spec.get("postprocessing_file") and (run_dir / spec["postprocessing_file"]).is_file():
        shutil.copy2(run_dir / spec["postprocessing_file"], folder / "postprocessing.json")
        manifest["postprocessing"] = "postprocessing.json"
    channels = json.loads((model / "dataset.json").read_text())["channel_names"]
    return {
        "kind": "nnunet",
        "model_folder": "model",
        "folds": list(spec["folds"]),
        "checkpoint": spec["checkpoint"],
        "tile_step_size": spec["tile_step_size"],
        "use_mirroring": spec["use_mirroring"],
        "inputs": {"channels": [channels[str(i)] for i in range(len(channels))], "space": "native"},
        **manifest,
    }


#: The entry of an exported logistic-regression fold: the benchmark's own predictor on the fitted model.
LOGREG_ENTRY = '''"""A logistic-regression fold exported by HIE-Bench: the fitted model is model.json."""

import json
from pathlib import Path

from bench.models.logreg import LogRegModel, LogRegPredictor

_PREDICTOR = LogRegPredictor(LogRegModel.from_json(json.loads((Path(__file__).parent / "model.json").read_text())))


def predict(case):
    return _PREDICTOR.predict_with_probability(case)
'''


def _export_logreg(run_dir: Path, record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The fitted coefficients and threshold, and a ``python`` entry that runs the benchmark's predictor."""
    from bench.models.logreg import LOGREG_MODEL_FILE, LogRegPredictor

    LogRegPredictor.from_run_dir(run_dir)  # refuses an unreadable model here, not at prediction time
    shutil.copy2(run_dir / LOGREG_MODEL_FILE, folder / "model.json")
    (folder / "predict.py").write_text(LOGREG_ENTRY, encoding="utf-8")
    channels = record["identity"].get("channels") or ["ADC", "Z-ADC"]
    return {"kind": "python", "entry": "predict.py:predict", "inputs": {"channels": list(channels), "space": "native"}}


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Validate against the submission schema (a mismatch is a bug here, reported as such), then write."""
    import yaml

    from bench.submissions.manifest import parse_manifest

    try:
        parse_manifest(manifest)
    except Exception as exc:
        raise ExportError(f"the exported manifest does not match bench.submissions' schema: {exc}") from exc
    (folder / MANIFEST_NAME).write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
