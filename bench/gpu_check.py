"""The GPU check (``bench perf gpu``): every shipped trainable entrant, trained briefly and timed on the
GPU, and its numbers on the GPU checked against the CPU for the same weights and the same case.

Contract:

1. **Timing** (reuses :func:`bench.perf.models.run_models_benchmark`): every ``submissions/*`` whose
   manifest says ``kind: trainable`` with a network recipe (MONAI or nnU-Net trainer) trains two short
   epochs of a fixed number of iterations on a synthetic dataset (``full`` size: realistic grids;
   ``--tiny``: 32 x 32 x 8), on the device's schedule (``gpu`` on CUDA, ``cpu`` otherwise; nnU-Net
   trains one model, not its 5-fold ensemble). Training patches/s comes from the second, warmed-up
   epoch; inference s/case is the median whole-volume prediction of a held-out case with the recipe's
   test-time augmentation, beside ``nnUNetPredictor`` (the nnU-Net baseline) on the same case.
2. **Parity**: on a tiny dataset (the timing run's own with ``--tiny``), each trained fold is loaded
   twice from its run folder, on the device and on the CPU, and predicts the same held-out case. The
   metrics the harness would store for the two masks must agree: |Dice(device) - Dice(cpu)| and the
   relative lesion-volume difference within :attr:`GpuCheckConfig.dice_tolerance`, and the two masks
   overlap with Dice >= :attr:`GpuCheckConfig.min_mask_agreement`. AMP on the GPU is what can move
   them; the CPU runs in float32.
3. One table (:func:`run_gpu_check` returns it as a frame); the command exits non-zero when a parity
   check fails. On one H200 the full check is sized to finish in about 5 minutes (the issue's budget
   is 8); ``--device cpu --tiny`` is the dry run ``make test`` runs on CPUs in under a minute.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from bench.device import DeviceChoice

__all__ = ["GpuCheckConfig", "GpuCheckReport", "run_gpu_check", "shipped_trainables"]

#: Recipe trainers that train a network on the device (a ``logreg`` recipe, say, is numpy on the CPU).
NETWORK_TRAINERS: tuple[str, ...] = ("monai", "nnunet")
#: Where the shipped entrants live, relative to the repository root.
SUBMISSIONS_DIR = Path(__file__).resolve().parents[1] / "submissions"


@dataclass(frozen=True)
class GpuCheckConfig:
    """What the check runs. The defaults are the full GPU check; :meth:`dry_run` is the CPU dry run."""

    device: str = "auto"
    #: Synthetic size of the timing dataset (``full``: realistic grids).
    size: str = "full"
    train_cases: int = 4
    #: Training iterations per epoch (two epochs; the second is timed).
    iterations: int = 20
    #: Timed whole-volume predictions (after one warm-up).
    repeats: int = 2
    #: Training batch size instead of the recipe's (``None``: the recipe's; the dry run uses 1).
    batch_size: int | None = None
    #: Largest |Dice(device) - Dice(cpu)| and relative lesion-volume difference.
    dice_tolerance: float = 0.02
    #: Smallest Dice between the device's mask and the CPU's mask.
    min_mask_agreement: float = 0.95
    #: Seconds the whole check should take; exceeding it is reported (the GPU machine's budget).
    budget_s: float = 480.0

    @classmethod
    def dry_run(cls, device: str = "cpu") -> GpuCheckConfig:
        """Everything at the smallest size: tiny cases, one iteration per epoch, one timed prediction."""
        return cls(device=device, size="tiny", train_cases=2, iterations=1, repeats=1, batch_size=1, budget_s=120.0)

    @property
    def tiny(self) -> bool:
        return self.size == "tiny"


@dataclass(frozen=True)
class GpuCheckReport:
    frame: pd.DataFrame
    device: DeviceChoice
    elapsed_s: float
    config: GpuCheckConfig

    @property
    def passed(self) -> bool:
        return bool(self.frame["parity_ok"].all())

    @property
    def within_budget(self) -> bool:
        return self.elapsed_s <= self.config.budget_s


def shipped_trainables(root: Path = SUBMISSIONS_DIR) -> list[Path]:
    """Every ``root/*/submission.yaml`` of kind ``trainable`` whose recipe trains a network on the device
    (:data:`NETWORK_TRAINERS`), the nnU-Net baseline first (the reference of the timings)."""
    from bench.perf.models import NNUNET_ENTRANT
    from bench.submissions.kinds import KIND_LOADERS
    from bench.submissions.manifest import read_manifest_data

    found = []
    for path in sorted(root.glob("*/submission.yaml")):
        manifest = read_manifest_data(path) or {}
        loader = KIND_LOADERS.get(str(manifest.get("kind")))
        if loader is not None and loader.trains and (manifest.get("recipe") or {}).get("trainer") in NETWORK_TRAINERS:
            found.append(path.parent)
    return sorted(found, key=lambda path: (path.name != NNUNET_ENTRANT, path.name))


def run_gpu_check(
    config: GpuCheckConfig = GpuCheckConfig(),
    *,
    submissions: Sequence[Path] | None = None,
    work_dir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> GpuCheckReport:
    """Time and parity-check every entrant on ``config.device``; one row per entrant.

    Raises :class:`bench.device.DeviceError` when ``config.device`` asks for a GPU that is not there, or
    is ``auto`` on a machine without one for the full-size check (the CPU must be asked for by name).
    """
    import pandas as pd

    from bench.device import DeviceError, resolve_device
    from bench.perf.models import run_models_benchmark

    started = time.perf_counter()
    choice = resolve_device(config.device)
    if config.device == "auto" and not choice.is_cuda and not config.tiny:  # hours at full size on CPUs: only when asked for
        why = choice.reason.removeprefix("auto picked cpu: ").split(" (fix: ")[0]
        raise DeviceError(f"the full GPU check needs a GPU, and {why} (fix: run it on a CUDA machine, or --device cpu --tiny for the dry run)")
    paths = list(submissions or shipped_trainables())
    echo(f"GPU check on {choice.device} ({choice.name}): {len(paths)} entrant(s), {config.size} cases, schedule {choice.schedule}")
    with tempfile.TemporaryDirectory(prefix="hiebench-gpu-check-") as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        timing_dir = root / "timing"
        overrides = _overrides(config.batch_size)
        timing = run_models_benchmark(paths, size=config.size, train_cases=config.train_cases, iterations=config.iterations, repeats=config.repeats,
                                      schedule=choice.schedule, device=choice.device, work_dir=timing_dir, schedule_overrides=overrides)
        echo(f"timing done after {time.perf_counter() - started:.0f} s; parity on a tiny case")
        if config.tiny:
            parity_dir, train_cases = timing_dir, config.train_cases
        else:  # the parity pass trains once more, on tiny cases, on the device's own schedule
            parity_dir, train_cases = root / "parity", 2
            run_models_benchmark(paths, size="tiny", train_cases=train_cases, iterations=1, repeats=1, schedule=choice.schedule,
                                 device=choice.device, work_dir=parity_dir, schedule_overrides=_overrides(None))
        parity = pd.DataFrame([_parity(path, parity_dir, train_cases, choice.device, config) for path in paths])
    frame = timing.merge(parity, on="entrant", how="left")
    return GpuCheckReport(frame, choice, time.perf_counter() - started, config)


def _overrides(batch_size: int | None) -> dict[str, Any]:
    """Schedule fields replaced in every recipe (each trainer keeps those it knows): one nnU-Net model
    instead of its 5-fold ensemble, so that the short budget times one network like the others."""
    return {"folds": 1} | ({"batch_size": batch_size} if batch_size else {})


# -- parity ----------------------------------------------------------------------------------------------


def _parity(submission_dir: Path, work_dir: Path, train_cases: int, device: str, config: GpuCheckConfig) -> dict[str, Any]:
    """Predict the tiny held-out case with the fold trained in ``work_dir``, on ``device`` and on the CPU."""
    import numpy as np

    from bench.data.dataset import Dataset
    from bench.metrics import compute_metrics
    from bench.submissions import load_submission

    submission = load_submission(submission_dir)
    data = Dataset.load(work_dir / "perf-tiny")  # run_models_benchmark's dataset: first cases train, the next is held out
    train, held_out = list(data.cases[:train_cases]), data.cases[train_cases]
    run_dir = work_dir / "runs" / submission.name
    reference = held_out.load_label()
    spacing = held_out.geometry.spacing
    masks, metrics = {}, {}
    for where in dict.fromkeys((device, "cpu")):
        masks[where] = np.asarray(_reload(run_dir, submission, train, where).predict(held_out), dtype=bool)
        metrics[where] = compute_metrics(masks[where], reference, spacing)
    on_device, on_cpu = masks[device], masks["cpu"]
    agreement = 1.0 if not (on_device.any() or on_cpu.any()) else 2 * float((on_device & on_cpu).sum()) / float(on_device.sum() + on_cpu.sum())
    dice_delta = _delta(_number(metrics[device].get("dice")), _number(metrics["cpu"].get("dice")))
    volume_delta = abs(int(on_device.sum()) - int(on_cpu.sum())) / max(1, int(on_cpu.sum()))
    return {
        "entrant": submission.name,
        "dice_device": _number(metrics[device].get("dice")),
        "dice_cpu": _number(metrics["cpu"].get("dice")),
        "dice_delta": dice_delta,
        "volume_delta": volume_delta,
        "mask_agreement": agreement,
        "parity_ok": dice_delta <= config.dice_tolerance and volume_delta <= config.dice_tolerance and agreement >= config.min_mask_agreement,
    }


def _reload(run_dir: Path, submission, train_cases: list, device: str):
    """The trained fold in ``run_dir`` as a predictor on ``device``: the recorded recipe and schedule,
    rebuilt and ``fit`` again, which finds the finished model and only loads it."""
    from bench.models import build_trainable
    from bench.models.runfolder import read_run_record

    identity = read_run_record(run_dir)["identity"]
    trainable = build_trainable(identity["recipe"], submission_dir=submission.path, preprocessing=submission.preprocessing,
                                schedule=identity["schedule"], device=device)
    return trainable.fit(train_cases, [], run_dir)


def _delta(a: float, b: float) -> float:
    """|a - b|, where two undefined values (NaN: both masks and the reference empty) agree."""
    import math

    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b) if not (math.isnan(a) or math.isnan(b)) else math.inf


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
