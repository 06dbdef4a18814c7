"""Fill predictions/ with one mask per case of a dataset, computed by another submission.

Usage (from the repository root):

    python submissions/example-predictions/make_predictions.py datasets/<name> [submissions/zadc-threshold]

Each mask is written as predictions/<case_id>.nii.gz with the header of the case's image, which is what
a `predictions` submission must contain. The benchmark never runs this file: it only reads the masks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from bench.data.dataset import Dataset
from bench.imageio import write_image
from bench.submissions import load_submission


def main(dataset_root: str, source: str = "submissions/zadc-threshold") -> None:
    dataset = Dataset.load(dataset_root)
    out = Path(__file__).resolve().parent / "predictions"
    with load_submission(source).predictor() as predictor:
        for case in dataset:
            mask = predictor.predict(case)
            write_image(mask.astype(np.uint8), case.geometry, out / f"{case.case_id}.nii.gz")
            print(f"{case.case_id}: {int(mask.sum())} lesion voxels")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(*sys.argv[1:])
