"""The run folder of one trained fold: file names, the identity check, atomic writes, devices.

Layout written by the MONAI trainer (the nnU-Net adapter adds ``nnunet/``, see :mod:`bench.models.nnunet`)::

    <run_dir>/run.json        what is trained here (identity: recipe, schedule, budget, preprocessing id,
                              case ids) and, once trained, what the training did (training: budget used,
                              device, speed policy, selected epoch)
    <run_dir>/checkpoint.pt   resumable training state (removed when training finishes)
    <run_dir>/model.pt        the finished model (its presence means "done")
    <run_dir>/history.csv     per-epoch loss, validation Dice, learning rate, throughput
    <run_dir>/curves.png      loss and validation curves
    <run_dir>/train.log       human-readable progress

A run folder belongs to exactly one training: if ``run.json`` describes a different recipe or other
cases, :func:`claim_run_dir` refuses to touch it rather than resume someone else's checkpoint.

Reading what a finished training used: :func:`read_budget_used` (a
:class:`~bench.models.recipe.BudgetUsed`: ``unit``, ``planned``, ``used``, ``steps``, ...) and
:func:`read_training_record` (the whole ``training`` section).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.imageio import write_text_atomic

if TYPE_CHECKING:
    from bench.models.recipe import BudgetUsed

RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"
LOG_FILE = "train.log"


class RunFolderError(ValueError):
    """A run folder holds something other than the training asked for; the message names the file."""


def claim_run_dir(run_dir: Path, identity: dict[str, Any], info: dict[str, Any] | None = None) -> None:
    """Create ``run_dir`` and record ``identity`` in ``run.json``, or check it matches the recorded one.

    ``info`` (for example the source submission's name and authors, used by exports) is stored beside
    the identity but not compared, so renaming a submission does not orphan its trained folds.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_FILE
    canonical = json.loads(json.dumps(identity, sort_keys=True, default=str))
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RunFolderError(f"{path}: not valid JSON ({exc}); delete the run folder to start again") from exc
        recorded_identity = recorded.get("identity", {})
        if recorded_identity != canonical:
            changed = sorted(k for k in set(recorded_identity) | set(canonical) if recorded_identity.get(k) != canonical.get(k))
            raise RunFolderError(
                f"{path}: this run folder was made for a different training (differs in: {', '.join(changed)}); "
                "use another run folder or delete this one"
            )
        return
    record = {"identity": canonical, "info": json.loads(json.dumps(info or {}, default=str))}
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run folder: ``{"identity": {...}, "info": {...}}``."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise RunFolderError(f"{path}: missing (is {run_dir} a run folder of bench.models?)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or "identity" not in record:
        raise RunFolderError(f"{path}: not a bench.models run record")
    return record


def record_training(run_dir: Path, training: dict[str, Any]) -> None:
    """Store what a finished training did (budget used, device, policy, ...) in ``run.json`` under
    ``training``, beside the identity (which it never changes)."""
    record = read_run_record(run_dir)
    record["training"] = json.loads(json.dumps(training, default=str))
    write_text_atomic(Path(run_dir) / RUN_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_training_record(run_dir: Path) -> dict[str, Any] | None:
    """The ``training`` section of ``run.json`` (``None`` while the fold is not trained, or for a folder
    trained before budgets were recorded)."""
    training = read_run_record(run_dir).get("training")
    return dict(training) if isinstance(training, dict) else None


def read_budget_used(run_dir: Path) -> "BudgetUsed | None":
    """The :class:`~bench.models.recipe.BudgetUsed` of a trained fold (``None`` when not recorded)."""
    from bench.models.recipe import BudgetUsed

    training = read_training_record(run_dir)
    if not training or not isinstance(training.get("budget"), dict):
        return None
    return BudgetUsed.from_dict(training["budget"])


def torch_save_atomic(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename (never a half-written file)."""
    import torch

    from bench.imageio import atomic_output

    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
    return path


def append_log(run_dir: Path, message: str) -> None:
    """Append one timestamped line to ``train.log``."""
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as handle:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def select_device(preference: str | None = None):
    """``torch.device`` of :func:`bench.device.resolve_device` (the one device rule): ``preference`` if
    given (``"cpu"``, ``"cuda"``, ``"cuda:1"``), else (``None`` or ``"auto"``) CUDA when torch can use it.
    An impossible request is a :class:`bench.device.DeviceError` naming the fix."""
    import torch  # imported first, so the device probe reads torch in-process (no subprocess)

    from bench.device import resolve_device

    return torch.device(resolve_device(preference or "auto").device)


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """``history.csv``: one row per epoch (written atomically)."""
    import pandas as pd

    from bench.imageio import write_text_atomic

    write_text_atomic(run_dir / HISTORY_FILE, pd.DataFrame(history).to_csv(index=False))


def write_curves(run_dir: Path, history: list[dict[str, Any]]) -> Path | None:
    """``curves.png``: training loss and validation Dice per epoch (skipped when matplotlib is missing).

    ``history`` rows need ``epoch``, ``train_loss`` and ``val_dice`` (NaN where not validated).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency, but curves are optional
        return None
    epochs = [row["epoch"] for row in history]
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], color="tab:blue", label="training loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    dice_axis = loss_axis.twinx()
    validated = [(row["epoch"], row["val_dice"]) for row in history if not math.isnan(row["val_dice"])]
    if validated:
        dice_axis.plot(*zip(*validated), "o-", color="tab:orange", label="validation Dice")
    dice_axis.set_ylabel("validation Dice", color="tab:orange")
    dice_axis.set_ylim(0, 1)
    fig.tight_layout()
    from bench.imageio import atomic_output

    path = run_dir / CURVES_FILE
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return path
