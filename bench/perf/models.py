"""Every entrant's training budget and speed on this machine, nnU-Net's beside them (``bench perf models``,
in :mod:`bench.cli.perf`, prints :func:`run_models_benchmark` and :func:`display_frame`).

For each trainable submission the benchmark trains two short epochs of ``iterations`` batches on a few
cases (the schedule the machine would use, ``cpu`` or ``gpu``, with only the epoch and iteration counts
overridden, and nnU-Net reduced to one internal fold), reads the training throughput of the second,
warmed-up epoch from the run's ``history.csv``, then times whole-volume inference of one held-out case
with the returned predictor (sliding windows and flip TTA for the MONAI entrants as their schedule
says; ``nnUNetPredictor`` with mirroring for the nnU-Net baseline, on the same case). The median of
``repeats`` timed predictions after one warm-up prediction is reported, and every entrant's time is
also given relative to nnU-Net's predictor.

Beside the speed, each row shows the schedule's training budget (:data:`bench.models.recipe.TRAINING_BUDGETS`,
the same for every entrant), how the *unmodified* schedule spends it (optimizer steps of how many
models, with nnU-Net's planned patch), the throughput in patch-voxels per second, and the training time
the whole budget would take here at that throughput (``est_train_s``).

Numbers depend on the machine (and, on shared CPUs, on its load); the table says which device ran.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import pandas as pd

#: The entrants shipped in ``submissions/``, the nnU-Net baseline first.
DEFAULT_ENTRANTS: tuple[str, ...] = ("nnunet-baseline", "unet-monai", "attention-unet", "aniso-unet", "segresnet", "swin-unetr")
NNUNET_ENTRANT = "nnunet-baseline"


def run_models_benchmark(
    submissions: Sequence[str | Path] | None = None,
    *,
    dataset: str | Path | None = None,
    size: str = "small",
    train_cases: int = 4,
    iterations: int = 5,
    repeats: int = 2,
    schedule: str = "auto",
    device: str | None = None,
    work_dir: str | Path | None = None,
    schedule_overrides: dict[str, Any] | None = None,
) -> "pd.DataFrame":
    """Measure each entrant; one row per submission.

    Args:
        submissions: submission folders (default: :data:`DEFAULT_ENTRANTS` under ``./submissions``).
        dataset: dataset folder; default a synthetic dataset of ``train_cases + 1`` cases of ``size``
            generated in the work folder.
        size: synthetic size preset when no dataset is given (``tiny``, ``small``, ``full``).
        train_cases: cases trained on; the next case of the dataset is predicted.
        iterations: training iterations per epoch (two epochs; the second is timed).
        repeats: timed predictions of the held-out case (after one untimed warm-up prediction).
        schedule: ``auto``, ``cpu`` or ``gpu``: which recipe schedule sets patch and batch size.
        device: force a torch device; default CUDA when present.
        work_dir: where run folders (and the synthetic dataset) go; default a temporary folder.
        schedule_overrides: further schedule fields to replace in every recipe (e.g. ``patch_size``
            for MONAI entrants); fields a trainer does not know are skipped for it.

    Returns:
        Columns ``entrant, trainer, network, device, patch_size, batch_size, train_patches_per_s,
        infer_s_per_case, infer_vs_nnunet, case_shape``, and the budget columns ``budget`` (patch-voxels
        of the schedule), ``budget_steps`` (optimizer steps of the unmodified schedule, all models),
        ``models`` (nnU-Net's internal folds), ``budget_used`` (patch-voxels those steps train),
        ``train_voxels_per_s`` and ``est_train_s`` (``budget_used / train_voxels_per_s``).
    """
    import pandas as pd

    from bench.data.dataset import Dataset
    from bench.models import build_trainable
    from bench.models.recipe import (
        MonaiSchedule,
        NnUNetSchedule,
        override_schedule,
        parse_recipe,
        patch_voxels,
        resolve_schedule_name,
        training_budget,
    )
    from bench.models.runfolder import HISTORY_FILE, read_training_record, select_device
    from bench.submissions import load_submission

    paths = [Path(p) for p in (submissions or [Path("submissions") / name for name in DEFAULT_ENTRANTS])]
    schedule_name = resolve_schedule_name(schedule)
    torch_device = select_device(device)
    with tempfile.TemporaryDirectory(prefix="hiebench-perf-models-") as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if dataset is None:
            from bench.data.synth import generate_synthetic_dataset

            data = generate_synthetic_dataset(root / f"perf-{size}", cases=train_cases + 1, sites=2, seed=0, size=size, workers=1, overwrite=True)
        else:
            data = Dataset.load(dataset)
        if len(data) < train_cases + 1:
            raise ValueError(f"dataset {data.root} has {len(data)} cases; the benchmark needs {train_cases + 1} (train_cases + 1)")
        train, held_out = list(data.cases[:train_cases]), data.cases[train_cases]
        rows = []
        for path in paths:
            submission = load_submission(path)
            if not submission.trains:
                raise ValueError(f"{path}: kind '{submission.kind}' is not trainable; bench perf models measures trainable entrants")
            recipe = dict(submission.manifest.recipe)
            full = parse_recipe(recipe, source=str(submission.path / "submission.yaml"))  # a clear error before any work
            overrides = {"epochs": 2, "iterations_per_epoch": iterations}
            if recipe["trainer"] == "nnunet":
                overrides |= {"val_iterations_per_epoch": 1, "folds": 1}
            known = (MonaiSchedule if recipe["trainer"] == "monai" else NnUNetSchedule).model_fields
            overrides |= {k: v for k, v in (schedule_overrides or {}).items() if k in known}
            brief = override_schedule(recipe, schedule_name, **overrides)
            trainable = build_trainable(
                brief, submission_dir=submission.path, preprocessing=submission.preprocessing, schedule=schedule_name, device=device
            )
            run_dir = root / "runs" / submission.name
            predictor = trainable.fit(train, [], run_dir)
            history = pd.read_csv(run_dir / HISTORY_FILE)
            predictor.predict(held_out)  # warm-up: lazy initialisation, caches, cuDNN autotuning
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                predictor.predict(held_out)
                times.append(time.perf_counter() - start)
            spec = brief["schedules"][schedule_name]
            if brief["trainer"] == "monai":
                network, patch, batch = brief["network"]["name"], tuple(spec["patch_size"]), int(spec["batch_size"])
                plan = full.step_plan(schedule_name)
            else:
                nnunet = (read_training_record(run_dir) or {}).get("nnunet", {})
                patch, batch = tuple(nnunet.get("patch_size", ())), int(nnunet.get("batch_size", 0))
                network = "nnU-Net PlainConvUNet " + "-".join(str(f) for f in (nnunet.get("plan_edits") or {}).get("edited", {}).get("features_per_stage", [])) or "nnU-Net PlainConvUNet (planned)"
                plan = full.step_plan(schedule_name, patch_size=patch, batch_size=batch) if patch and batch else None
            patches_per_s = float(history["patches_per_s"].iloc[-1])
            voxels_per_s = patches_per_s * patch_voxels(patch) if patch else float("nan")
            rows.append(
                {
                    "entrant": submission.name,
                    "trainer": brief["trainer"],
                    "network": network,
                    "device": str(torch_device),
                    "patch_size": "x".join(str(s) for s in patch) if patch else "planned",
                    "batch_size": batch,
                    "train_patches_per_s": patches_per_s,
                    "train_voxels_per_s": voxels_per_s,
                    "budget": training_budget(schedule_name).planned,
                    "models": plan.models if plan else float("nan"),
                    "budget_steps": plan.steps if plan else float("nan"),
                    "budget_used": plan.voxels if plan else float("nan"),
                    "est_train_s": plan.voxels / voxels_per_s if plan and voxels_per_s > 0 else float("nan"),
                    "infer_s_per_case": statistics.median(times),
                    "case_shape": "x".join(str(s) for s in held_out.geometry.shape),
                }
            )
    frame = pd.DataFrame(rows)
    reference = frame.loc[frame["entrant"] == NNUNET_ENTRANT, "infer_s_per_case"]
    frame["infer_vs_nnunet"] = frame["infer_s_per_case"] / float(reference.iloc[0]) if len(reference) else float("nan")
    return frame


#: Headers of the printed table of :func:`run_models_benchmark`'s columns, in display order.
DISPLAY_COLUMNS: dict[str, str] = {
    "entrant": "entrant",
    "network": "network",
    "device": "device",
    "patch_size": "patch (z×y×x)",
    "batch_size": "batch",
    "budget": "budget (patch-voxels)",
    "budget_steps": "steps in budget",
    "budget_used": "trains",
    "train_patches_per_s": "train patches/s",
    "train_voxels_per_s": "voxels/s",
    "est_train_s": "budget s (est.)",
    "infer_s_per_case": "inference s/case",
    "infer_vs_nnunet": "× nnU-Net",
    "case_shape": "case (z×y×x)",
}


def display_frame(frame: "pd.DataFrame") -> "pd.DataFrame":
    """:func:`run_models_benchmark`'s frame as people read it: voxel counts in k / M, steps with their folds."""
    from bench.models.recipe import format_voxels

    frame = frame.copy()
    for column in ("budget", "budget_used", "train_voxels_per_s"):
        if column in frame:
            frame[column] = [format_voxels(v) if v == v else "-" for v in frame[column]]
    if "budget_steps" in frame:
        models = frame["models"] if "models" in frame else [1] * len(frame)
        frame["budget_steps"] = [
            (f"{int(steps)}" + (f" ({int(n)} folds)" if n == n and n > 1 else "")) if steps == steps else "-" for steps, n in zip(frame["budget_steps"], models)
        ]
    return frame
