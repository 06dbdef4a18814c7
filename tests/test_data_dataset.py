"""The Dataset / Case API and the dataset writer: loading errors, version, verify, atomic writes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bench.data.dataset import Dataset, DatasetError, find_dataset, list_datasets
from bench.data.layout import DatasetWriter, LayoutError, write_case
from bench.imageio import Geometry, read_image, write_image


def test_case_loading(synthetic_dataset: Dataset) -> None:
    case = synthetic_dataset.case("SiteB_001")
    assert case.site == "SiteB"
    image, geometry = case.load_image()
    assert image.dtype == np.float32 and image.shape[0] == 2
    adc, _ = case.load_channel("ADC")
    assert np.array_equal(adc, image[0])
    assert case.geometry == geometry
    assert case.load_label().dtype == bool
    assert case.metadata["scanner"].startswith("synthetic 3T")
    with pytest.raises(KeyError, match="no case 'nope'"):
        synthetic_dataset.case("nope")


def test_find_and_list(synthetic_dataset: Dataset, tmp_path) -> None:
    root = synthetic_dataset.root.parent
    assert find_dataset(synthetic_dataset.name, root) == synthetic_dataset.root
    assert find_dataset(synthetic_dataset.root, tmp_path) == synthetic_dataset.root
    assert synthetic_dataset.root in list_datasets(root)
    with pytest.raises(DatasetError, match=f"datasets in {root}: .*{synthetic_dataset.name}"):
        find_dataset("missing", root)
    assert list_datasets(tmp_path / "nowhere") == []


def test_load_errors_name_the_file(synthetic_dataset_copy: Dataset, tmp_path) -> None:
    root = synthetic_dataset_copy.root
    with pytest.raises(DatasetError, match="dataset.json: missing"):
        Dataset.load(tmp_path / "empty")
    image = synthetic_dataset_copy.cases[0].image_paths[1]
    image.unlink()
    with pytest.raises(DatasetError, match=f"{image.name}: image of case"):
        Dataset.load(root)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json: not valid JSON"):
        Dataset.load(root)


def test_verify_finds_modified_and_broken_files(synthetic_dataset_copy: Dataset) -> None:
    dataset = synthetic_dataset_copy
    case = dataset.cases[0]
    label, geometry = read_image(case.label_path)
    label[0, 0, 0] = 1 - label[0, 0, 0]
    write_image(label, geometry, case.label_path)
    problems = Dataset.load(dataset.root).verify()
    assert len(problems) == 1 and "stored version" in problems[0]

    label[0, 0, 0] = 3
    write_image(label, geometry, case.label_path)
    shifted = Geometry(geometry.shape, geometry.spacing, origin=(5.0, 5.0, 5.0))
    adc, _ = read_image(case.image_paths[1])
    write_image(adc, shifted, case.image_paths[1])
    broken = dataset.cases[1].image_paths[0]
    broken.write_bytes(b"not an image")
    problems = "\n".join(Dataset.load(dataset.root).verify())
    assert f"{case.label_path}: label values" in problems
    assert f"{case.image_paths[1]}: grid differs from {case.image_paths[0].name}" in problems
    assert f"{broken}: cannot be read" in problems


def test_version_is_stored_not_rehashed(synthetic_dataset_copy: Dataset) -> None:
    # Opening a dataset never reads the images: the version comes from dataset.json.
    for case in synthetic_dataset_copy:
        case.label_path.write_bytes(b"")
    reopened = Dataset.load(synthetic_dataset_copy.root)
    assert reopened.version == synthetic_dataset_copy.version
    # A hand-made folder without a stored version is hashed instead.
    meta = json.loads((reopened.root / "dataset.json").read_text())
    del meta["hie_bench"]
    (reopened.root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="cannot be read"):
        _ = Dataset.load(reopened.root).version


def test_same_content_same_version_anywhere(synthetic_dataset: Dataset, tmp_path) -> None:
    copy = Dataset.load(shutil.copytree(synthetic_dataset.root, tmp_path / "elsewhere"))
    assert copy.compute_version() == synthetic_dataset.version


def test_write_case_checks_its_input(tmp_path) -> None:
    geometry = Geometry((2, 3, 4), (3.0, 1.0, 1.0))
    image = np.ones((2, 3, 4), np.float32)
    label = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(LayoutError, match="not usable as a file name"):
        write_case(tmp_path, "bad/id", "A", (image,), label, geometry)
    with pytest.raises(LayoutError, match="label values"):
        write_case(tmp_path, "ok", "A", (image,), label + 2, geometry)
    with pytest.raises(LayoutError, match="does not match the grid"):
        write_case(tmp_path, "ok", "A", (np.ones((2, 3, 5)),), label, geometry)
    record = write_case(tmp_path, "ok", "A", (image,), label, geometry, {"pattern": "none"})
    assert record.row["brain_volume_ml"] == pytest.approx(24 * 3.0 / 1000)
    assert record.row["n_lesions"] == 0 and record.row["pattern"] == "none"


def test_writer_is_atomic(tmp_path) -> None:
    geometry = Geometry((2, 3, 4), (3.0, 1.0, 1.0))
    label = np.zeros((2, 3, 4), np.uint8)
    label[0, 0, :2] = 1
    label[1, 2, 3] = 1
    out = tmp_path / "data"
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(out, channel_names=("ADC",)) as writer:
            writer.add(write_case(writer.root, "a", "A", (np.ones((2, 3, 4)),), label, geometry))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with DatasetWriter(out, channel_names=("ADC",)) as writer:
        writer.add(write_case(writer.root, "a", "A", (np.ones((2, 3, 4)),), label, geometry))
        writer.add(write_case(writer.root, "b", "B", (np.ones((2, 3, 4)),), label, geometry))
        with pytest.raises(LayoutError, match="written twice"):
            writer.add(write_case(writer.root, "b", "B", (np.ones((2, 3, 4)),), label, geometry))
        dataset = writer.commit(folds=2)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert dataset.table["n_lesions"].tolist() == [2, 2]
    assert dataset.verify() == []
    with pytest.raises(FileExistsError):
        DatasetWriter(out, channel_names=("ADC",)).__enter__()
