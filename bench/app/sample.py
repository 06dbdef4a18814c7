"""A small but real results database: synthetic cases, real prediction files, real harness runs.

:func:`build_sample_results` is what the app's tests run against, and a quick way to look at the app
without ``make demo``::

    python -m bench.app.sample /tmp/hie-sample        # then:
    HIE_BENCH_DB_URL=sqlite:////tmp/hie-sample/bench.db streamlit run app.py

It generates a ``tiny`` synthetic dataset (:func:`bench.data.synth.generate_synthetic_dataset`) and
benchmarks three submissions with :func:`bench.harness.run_benchmark` under both protocols:

``zadc-threshold``
    The BONBID-HIE baseline (``kind: python``), the repository's ``submissions/zadc-threshold``.
``shifted-reference``
    ``kind: predictions``: each reference mask moved by one voxel, with the smallest lesion of every
    other case dropped (misses) and a false-positive blob in every third case: a good model with
    every kind of error.
``largest-lesion``
    ``kind: predictions``: only the largest lesion, grown by one voxel; an empty mask for one case and
    no mask at all for another (a failed case): a weak model.
"""

from __future__ import annotations

from bench.constants import CROSS_VALIDATION_PROTOCOLS

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

#: Name of the sample dataset folder.
SAMPLE_DATASET = "hie-synth-sample"
#: The repository's baseline submission, used when the package runs from a checkout.
BASELINE = Path(__file__).resolve().parents[2] / "submissions" / "zadc-threshold"


@dataclass(frozen=True)
class SampleResults:
    """Paths of a sample built by :func:`build_sample_results`."""

    root: Path
    dataset: Path
    submissions: dict[str, Path]
    results_dir: Path
    db_url: str
    run_ids: tuple[str, ...]


def build_sample_results(root: str | Path, *, cases: int = 8, sites: int = 2, folds: int = 2, seed: int = 0, size: str = "tiny") -> SampleResults:
    """Generate the dataset, write the submissions and run the benchmark into ``root/bench.db``.

    Idempotent: an existing dataset and submissions are reused and the harness skips stored cases.
    """
    from bench.data.dataset import Dataset
    from bench.data.synth import generate_synthetic_dataset
    from bench.harness import RunSpec, run_benchmark

    root = Path(root).resolve()
    dataset_dir = root / "datasets" / SAMPLE_DATASET
    if (dataset_dir / "dataset.json").is_file():
        dataset = Dataset.load(dataset_dir)
    else:
        dataset = generate_synthetic_dataset(dataset_dir, cases=cases, sites=sites, seed=seed, size=size, workers=1, folds=folds)
    submissions_dir = root / "submissions"
    submissions = {
        "zadc-threshold": _baseline(submissions_dir),
        "shifted-reference": _predictions_submission(submissions_dir, "shifted-reference", dataset, _shifted_reference, "each reference mask moved by one voxel, some lesions dropped, some false positives"),
        "largest-lesion": _predictions_submission(submissions_dir, "largest-lesion", dataset, _largest_lesion, "only the largest lesion, grown by one voxel; one empty and one missing mask"),
    }
    results_dir = root / "results"
    db_url = f"sqlite:///{(root / 'bench.db').as_posix()}"
    specs = [
        RunSpec(submission=path, dataset=dataset_dir, protocol=protocol, folds=folds, seed=seed, results_dir=results_dir, db_url=db_url)
        for path in submissions.values()
        for protocol in CROSS_VALIDATION_PROTOCOLS
    ]
    by_run = run_benchmark(specs)
    return SampleResults(root, dataset_dir, submissions, results_dir, db_url, tuple(by_run))


def sample_results(root: str | Path) -> SampleResults:
    """:func:`build_sample_results` once per folder: later calls (other test modules, other processes)
    read the description it leaves in ``root/sample.json``."""
    root = Path(root).resolve()
    marker = root / "sample.json"
    if marker.is_file():
        stored = json.loads(marker.read_text(encoding="utf-8"))
        return SampleResults(
            root=Path(stored["root"]),
            dataset=Path(stored["dataset"]),
            submissions={name: Path(path) for name, path in stored["submissions"].items()},
            results_dir=Path(stored["results_dir"]),
            db_url=stored["db_url"],
            run_ids=tuple(stored["run_ids"]),
        )
    sample = build_sample_results(root)
    from bench.imageio import write_text_atomic

    write_text_atomic(marker, json.dumps(asdict(sample), default=str, indent=2))
    return sample


def _baseline(submissions_dir: Path) -> Path:
    """The repository's zadc-threshold submission, or the scaffolded Z-ADC baseline outside a checkout."""
    if BASELINE.is_dir():
        return BASELINE
    from bench.submissions import scaffold_submission

    target = submissions_dir / "zadc-threshold"
    if target.is_dir():
        return target
    description = "The BONBID-HIE baseline: lesion = Z-ADC < -2 inside the brain."
    return scaffold_submission("zadc-threshold", "python", submissions_dir, authors=["HIE-Bench developers"], description=description)


def _predictions_submission(submissions_dir: Path, name: str, dataset, make_mask, description: str) -> Path:
    """A ``predictions`` submission holding ``make_mask(index, reference)`` for every case (``None``: no file)."""
    import yaml

    from bench.imageio import write_image

    folder = submissions_dir / name
    if (folder / "submission.yaml").is_file():
        return folder
    staging = submissions_dir / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "predictions").mkdir(parents=True)
    manifest = {
        "name": name,
        "version": "1.0.0",
        "authors": ["HIE-Bench sample"],
        "description": f"Sample submission for the app's tests: {description}.",
        "licence": "Apache-2.0",
        "kind": "predictions",
        "folder": "predictions",
    }
    (staging / "submission.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    (staging / "README.md").write_text(f"# {name}\n\nA sample submission generated by `bench.app.sample`: {description}.\n", encoding="utf-8")
    for index, case in enumerate(dataset.cases):
        mask = make_mask(index, case.load_label())
        if mask is not None:
            write_image(mask.astype(np.uint8), case.geometry, staging / "predictions" / f"{case.case_id}.nii.gz")
    staging.rename(folder)
    return folder


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components and their sizes (index 0: background)."""
    import cc3d

    labels = cc3d.connected_components(mask, connectivity=26)
    return labels, np.bincount(labels.ravel())


def _shifted_reference(index: int, reference: np.ndarray) -> np.ndarray:
    mask = np.roll(reference, 1, axis=2)
    labels, sizes = _components(reference)
    if index % 2 == 1 and sizes.size > 2:  # drop the smallest lesion: a miss
        smallest = 1 + int(np.argmin(sizes[1:]))
        mask &= ~np.roll(labels == smallest, 1, axis=2)
    if index % 3 == 0:  # a false-positive blob in the opposite corner of the field of view
        z, y, x = reference.shape
        mask[z // 2, y // 4 : y // 4 + 2, x - x // 4 - 2 : x - x // 4] = True
    return mask


def _largest_lesion(index: int, reference: np.ndarray) -> np.ndarray | None:
    from scipy.ndimage import binary_dilation

    if index == 1:
        return None  # no file: the harness stores a failed case
    if index == 2:
        return np.zeros_like(reference)  # empty: infinite surface distances, capped in statistics
    labels, sizes = _components(reference)
    if sizes.size < 2:
        return np.zeros_like(reference)
    largest = labels == 1 + int(np.argmax(sizes[1:]))
    return binary_dilation(largest, iterations=1)


if __name__ == "__main__":  # pragma: no cover - a convenience for trying the app
    sample = build_sample_results(sys.argv[1] if len(sys.argv) > 1 else "results/sample")
    print(f"sample results in {sample.root}\n  HIE_BENCH_DB_URL={sample.db_url} streamlit run app.py")
