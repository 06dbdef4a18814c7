"""Hostile and damaged input never gets through (issue 17, items 2 and 3).

Every input comes from the generated corpus in ``tests/adversarial.py``. Each test asserts a clear
error (one line that names the file or member) and that nothing stays stored or installed; the
identifier sweep also snapshots the whole temporary tree to show that nothing was written outside the
roots. The file runs in well under a minute on one core.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import adversarial as adv
from bench.data.dataset import Dataset, DatasetError, DatasetVersionError
from bench.data.importers import ImportProblem, import_nnunet
from bench.data.layout import LayoutError, write_case
from bench.ids import IdentifierError, check_identifier
from bench.imageio import ImageError, read_geometry, read_image, strip_image_suffix, write_image
from bench.submissions import ArchiveError, SubmissionError, add_submission_archive, load_submission, verify_submission
from bench.submissions.core import content_hash, resolve_inside


def one_line(message: str) -> bool:
    return "\n" not in message and len(message) < 600


def problem_lines(problems) -> list[str]:
    return [str(p) for p in problems]


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gzip-bomb mask (about 1 MB on disk, 1 GiB inflated), built once."""
    return adv.gzip_bomb_nifti(tmp_path_factory.mktemp("bomb") / "bomb.nii.gz")


def hostile_image(kind: str, folder: Path, bomb: Path) -> tuple[Path, str]:
    """A damaged image of ``kind`` and a phrase its error must contain."""
    if kind.startswith("truncated"):
        full = adv.write(folder / "full.nii.gz", adv.label_array())
        return adv.truncated(full, folder / f"{kind}.nii.gz", None if kind == "truncated-header" else 0.55), "truncated"
    if kind.startswith("nan"):
        _, role, suffix = kind.split("-", 2)
        return adv.nonfinite(folder / f"{role}.{suffix}", label=role == "label"), "3 voxels are NaN or infinite"
    if kind == "overflow-mha":
        return adv.overflowing_mha(folder / "overflow.mha"), "over the limit"
    return shutil.copy(bomb, folder / "bomb.nii.gz"), "more than the 1,072 bytes its header declares"


IMAGE_KINDS = ("truncated-header", "truncated-55", "nan-label-nii.gz", "nan-image-nii.gz", "nan-label-nii", "nan-label-mha",
               "nan-image-mha", "overflow-mha", "gzip-bomb")


# --------------------------------------------------------------------------------------------------
# Images: one reader, bounded and strict


@pytest.fixture(params=["libdeflate", "zlib"])
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both decompression paths of the reader: libdeflate at once (imagecodecs), and zlib streaming."""
    if request.param == "zlib":
        monkeypatch.setitem(sys.modules, "imagecodecs", None)  # the import fails: the streaming path runs
    return request.param


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_damaged_images_are_refused_in_one_line_naming_the_file(kind: str, tmp_path: Path, bomb: Path, inflater: str) -> None:
    path, phrase = hostile_image(kind, tmp_path, bomb)
    started = time.perf_counter()
    with pytest.raises(ImageError) as caught:
        read_image(path)
    assert time.perf_counter() - started < 2
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and phrase in message and one_line(message), message


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_sound_images_read_the_same_on_both_paths(suffix: str, tmp_path: Path, inflater: str) -> None:
    array = adv.image_array()
    path = adv.write(tmp_path / f"sound{suffix}", array)
    loaded, geometry = read_image(path)
    assert loaded.dtype == np.float32 and np.array_equal(loaded, array) and geometry.shape == adv.GRID
    loaded[0, 0, 0] = 0.0  # the array is the caller's to change


def test_nifti_sees_nan_and_inf_as_stored(tmp_path: Path) -> None:
    # SimpleITK's NIfTI reader returns 0 for NaN and Inf; the one reader returns what the file holds.
    path = adv.nonfinite(tmp_path / "label.nii.gz", label=True)
    array, _ = read_image(path, finite=False)
    assert np.isnan(array).sum() == 1 and np.isposinf(array).sum() == 1 and np.isneginf(array).sum() == 1


def test_the_gzip_bomb_costs_no_memory(bomb: Path) -> None:
    assert bomb.stat().st_size < 2 * 1024**2
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        with pytest.raises(ImageError, match="more than the 1,072 bytes"):
            read_image(bomb)
    assert read_geometry(bomb).shape == adv.GRID  # the header itself is fine
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64, f"reading the bomb grew the process by {grown_mib:.0f} MiB"


def test_evaluate_fails_a_truncated_reference(tmp_path: Path) -> None:
    from bench.evaluate import CasePair, score_pair

    reference = adv.truncated(adv.write(tmp_path / "full.nii.gz", adv.label_array()), tmp_path / "ref.nii.gz")
    prediction = adv.write(tmp_path / "pred.nii.gz", adv.label_array())
    row = score_pair(CasePair("c1", reference, prediction))
    assert row["status"] == "failed" and str(reference) in row["error"] and "truncated" in row["error"]


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_a_damaged_dataset_file_is_reported_by_verify(damage: str, synthetic_dataset_copy: Dataset) -> None:
    case = synthetic_dataset_copy.cases[0]
    if damage == "truncated":
        adv.truncated(case.label_path, case.label_path)
    else:
        array, geometry = read_image(case.image_paths[0])
        array[0, 0, 0] = np.nan
        write_image(array, geometry, case.image_paths[0])
    damaged = case.label_path if damage == "truncated" else case.image_paths[0]
    problems = synthetic_dataset_copy.verify()
    assert any(p.startswith(f"{damaged}: ") for p in problems), problems
    with pytest.raises(DatasetError, match=str(damaged)):
        synthetic_dataset_copy.verify_version(cache=synthetic_dataset_copy.root.parent / "cache.json")


@pytest.mark.parametrize("damage", ["truncated", "nan", "bomb"])
def test_the_nnunet_importer_imports_nothing_damaged(damage: str, nnunet_raw_dataset, tmp_path: Path, bomb: Path) -> None:
    source = nnunet_raw_dataset()
    image = source / "imagesTr" / "HOSPA_002_0000.nii.gz"
    if damage == "truncated":
        adv.truncated(image, image)
    elif damage == "nan":
        array, geometry = read_image(image)
        array[1, 1, 1] = np.inf
        write_image(array, geometry, image)
    else:
        shutil.copy(bomb, source / "labelsTr" / "HOSPA_002.nii.gz")
        image = source / "labelsTr" / "HOSPA_002.nii.gz"
    with pytest.raises(ImportProblem, match=str(image)):
        import_nnunet(source, tmp_path / "out", sites=r"^(HOSP.)")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------------
# YAML


@pytest.mark.parametrize("text", [adv.alias_bomb_yaml(), adv.deep_yaml(), "x: 1\n" * 60_000], ids=["alias-bomb", "deep", "huge"])
def test_hostile_manifests_get_one_clear_error(text: str, tmp_path: Path) -> None:
    folder = tmp_path / "sub"
    folder.mkdir()
    (folder / "submission.yaml").write_text(text)
    (folder / "predict.py").write_text(adv.PREDICT_PY)
    started = time.perf_counter()
    problems = verify_submission(folder, run_model=False)
    assert time.perf_counter() - started < 2
    assert len(problems) == 1 and problems[0].severity == "error" and one_line(str(problems[0])), problems
    assert any(word in problems[0].message for word in ("alias", "nested", "limit"))
    with pytest.raises(SubmissionError):
        load_submission(folder)


def test_the_alias_bomb_is_refused_as_an_archive_too(tmp_path: Path) -> None:
    archive = tmp_path / "laughs.zip"
    archive.write_bytes(adv.zip_bytes({"submission.yaml": adv.alias_bomb_yaml().encode(), "predict.py": adv.PREDICT_PY.encode()}))
    assert len(adv.alias_bomb_yaml()) < 700
    with pytest.raises(SubmissionError, match="alias"):
        add_submission_archive(archive, tmp_path / "subs")
    assert list((tmp_path / "subs").iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Archives: the CLI path and the app's upload path


@pytest.mark.parametrize("kind", adv.ARCHIVE_KINDS)
def test_broken_archives_are_refused_and_install_nothing(kind: str, tmp_path: Path) -> None:
    archive = tmp_path / "incoming" / f"{kind}.zip"
    archive.parent.mkdir()
    archive.write_bytes(adv.broken_archive(kind))
    before = adv.snapshot(tmp_path)
    started = time.perf_counter()
    with pytest.raises(ArchiveError) as caught:
        add_submission_archive(archive, tmp_path / "subs")
    assert time.perf_counter() - started < 2, "a hostile archive fails fast"
    assert str(caught.value).splitlines()[0] == f"{archive}: refused"
    assert caught.value.problems and all(one_line(line) for line in problem_lines(caught.value.problems))
    subs = tmp_path / "subs"
    assert not subs.exists() or list(subs.iterdir()) == [], "nothing stays installed"
    after = {k: v for k, v in adv.snapshot(tmp_path).items() if k != "subs"}
    assert after == before, "nothing is written anywhere else"


@pytest.mark.parametrize("kind", adv.ARCHIVE_KINDS)
def test_broken_uploads_are_refused_on_the_page_and_claim_nothing(kind: str, tmp_path: Path) -> None:
    from bench.app import uploads

    card = uploads.PredictionsCard(name="corpus")
    result = uploads.install_upload(adv.broken_archive(kind), f"{kind}.zip", tmp_path / "uploads", predictions=card)
    assert not result.ok and result.path is None
    assert result.problems and all(one_line(line) for line in problem_lines(result.problems)), result.problems
    assert not (tmp_path / "uploads").exists() or list((tmp_path / "uploads").iterdir()) == []


def mask_zip(dataset: Dataset, damaged: dict[str, Path]) -> bytes:
    """A zip of one mask per case of ``dataset`` (its own labels), some replaced by damaged files."""
    members = {}
    for case in dataset.cases:
        path = damaged.get(case.case_id, case.label_path)
        suffix = path.name[len(strip_image_suffix(path)):]
        members[f"masks/{case.case_id}{suffix}"] = path.read_bytes()
    return adv.zip_bytes(members, compression=zipfile.ZIP_STORED)


@pytest.mark.parametrize("kind", ["truncated-55", "nan-label-nii.gz", "nan-label-mha", "overflow-mha", "gzip-bomb"])
def test_a_damaged_mask_upload_leaves_nothing_installed(kind: str, synthetic_dataset: Dataset, tmp_path: Path, bomb: Path) -> None:
    from bench.app import uploads

    case = synthetic_dataset.cases[0]
    if kind == "truncated-55":
        path = adv.truncated(case.label_path, tmp_path / f"{case.case_id}.nii.gz")
    else:
        path, _ = hostile_image(kind, tmp_path, bomb)
    data = mask_zip(synthetic_dataset, {case.case_id: path})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = uploads.install_upload(data, "masks.zip", tmp_path / "uploads", predictions=uploads.PredictionsCard(name="hostile-masks"),
                                    dataset_root=synthetic_dataset.root)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 64
    assert not result.ok and result.path is None
    errors = [p for p in result.problems if p.severity == "error"]
    assert errors and all(case.case_id in p.where and one_line(str(p)) for p in errors), errors
    assert list((tmp_path / "uploads").iterdir()) == [], "a refused mask upload stays nowhere and claims no name"


# --------------------------------------------------------------------------------------------------
# Content, not links


def predictions_folder(folder: Path) -> Path:
    (folder / "predictions").mkdir(parents=True)
    (folder / "submission.yaml").write_text(adv.BASE_MANIFEST.format(name=folder.name) + "kind: predictions\n")
    return folder


def test_a_prediction_linked_out_of_the_folder_is_refused(synthetic_dataset: Dataset, tmp_path: Path) -> None:
    folder = predictions_folder(tmp_path / "cheat")
    case = synthetic_dataset.cases[0]
    (folder / "predictions" / f"{case.case_id}.nii.gz").symlink_to(case.label_path)  # Dice 1.0, if it got through
    with pytest.raises(SubmissionError) as caught:
        content_hash(folder)
    assert "outside the submission folder" in str(caught.value.problems[0]) and one_line(str(caught.value.problems[0]))
    assert any("symbolic link" in p.message for p in verify_submission(folder, run_model=False))


def test_a_label_hard_linked_into_a_submission_is_refused(synthetic_dataset_copy: Dataset, tmp_path: Path) -> None:
    """A hard link is no symlink, but shares the file: a python model reading /submission/labels/<case>
    would read the reference itself. Refused by the content hash (so `bench run`) and by verify."""
    folder = tmp_path / "cheat"
    (folder / "labels").mkdir(parents=True)
    (folder / "submission.yaml").write_text(adv.BASE_MANIFEST.format(name="cheat") + "kind: python\nentry: predict.py:predict\n"
                                           "inputs: {channels: [ADC, Z-ADC], space: native}\n")
    (folder / "predict.py").write_text("def predict(case):\n    return None\n")
    case = synthetic_dataset_copy.cases[0]
    os.link(case.label_path, folder / "labels" / case.label_path.name)
    with pytest.raises(SubmissionError) as caught:
        content_hash(folder)
    assert "hard link" in str(caught.value.problems[0]) and one_line(str(caught.value.problems[0]))
    assert any("hard link" in p.message for p in verify_submission(folder, run_model=False))


def test_a_symlinked_manifest_is_refused_not_read(synthetic_dataset: Dataset, tmp_path: Path) -> None:
    folder = tmp_path / "linked-manifest"
    folder.mkdir()
    (folder / "submission.yaml").symlink_to(synthetic_dataset.root / "cases.csv")
    problems = verify_submission(folder, run_model=False)
    assert [p.message for p in problems] == ["is a symbolic link"] and problems[0].where == "submission.yaml"


def test_a_link_inside_the_folder_is_hashed_by_its_content(tmp_path: Path) -> None:
    folder = predictions_folder(tmp_path / "linked")
    real = adv.write(folder / "store" / "mask.nii.gz", adv.label_array())
    (folder / "predictions" / "case_001.nii.gz").symlink_to(Path("..") / "store" / "mask.nii.gz")
    first = content_hash(folder)
    label = adv.label_array()
    label[0, 0, 0] = 1
    adv.write(real, label)
    assert content_hash(folder) != first, "a rerun after the target changed must not keep the stale score"


@pytest.mark.parametrize("what", ["image", "label", "folder"])
def test_dataset_files_linked_out_of_the_dataset_are_refused(what: str, synthetic_dataset_copy: Dataset, tmp_path: Path) -> None:
    root = synthetic_dataset_copy.root
    case = synthetic_dataset_copy.cases[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    if what == "folder":
        shutil.move(root / "labelsTr", outside / "labelsTr")
        (root / "labelsTr").symlink_to(outside / "labelsTr")
        linked = case.label_path
    else:
        linked = case.image_paths[0] if what == "image" else case.label_path
        shutil.move(linked, outside / linked.name)
        linked.symlink_to(outside / linked.name)
    with pytest.raises(DatasetError) as caught:
        Dataset.load(root)
    assert str(caught.value).startswith(f"{linked}: ") and "outside the dataset folder" in str(caught.value)


# --------------------------------------------------------------------------------------------------
# Dataset version against its files


def test_an_edited_label_no_longer_matches_the_version(synthetic_dataset_copy: Dataset) -> None:
    dataset = synthetic_dataset_copy
    assert dataset.verify_version() == dataset.version  # cold: hashes every file, fills the cache
    started = time.perf_counter()
    assert Dataset.load(dataset.root).verify_version() == dataset.version
    assert time.perf_counter() - started < 0.5, "warm: one stat per file"
    label_path = dataset.cases[3].label_path
    stamp = label_path.stat()
    label, geometry = read_image(label_path)
    label[label.shape[0] // 2] = 1  # a hand-edit of the reference
    write_image(label, geometry, label_path)
    os.utime(label_path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # even with its old time stamp
    with pytest.raises(DatasetVersionError) as caught:
        Dataset.load(dataset.root).verify_version()
    message = str(caught.value)
    assert one_line(message) and f"stored version {dataset.version}" in message and "fix:" in message


# --------------------------------------------------------------------------------------------------
# Safe identifiers: the sweep through every entry point


NAMES = list(adv.HOSTILE_NAMES.items())


def assert_refused_without_writes(tmp_path: Path, action, errors, allowed: tuple[str, ...] = ()) -> str:
    """Run ``action``; it must raise one of ``errors`` (one line naming where) and write nothing but ``allowed`` (empty) folders."""
    before = adv.snapshot(tmp_path)
    with pytest.raises(errors) as caught:
        action()
    after = adv.snapshot(tmp_path)
    new = {k for k in after.keys() - before.keys() if k not in allowed}
    assert not new and all(after[k] == v for k, v in before.items() if k in after), f"written: {sorted(new)}"
    assert all(not list((tmp_path / folder).iterdir()) for folder in allowed if (tmp_path / folder).is_dir())
    return str(caught.value)


@pytest.mark.parametrize(("label", "name"), NAMES, ids=[n for n, _ in NAMES])
def test_check_identifier_refuses_every_hostile_name(label: str, name: str) -> None:
    with pytest.raises(IdentifierError) as caught:
        check_identifier(name, "case id", "cases.csv, line 2")
    assert str(caught.value).startswith("cases.csv, line 2: case id ") and one_line(str(caught.value))
    assert "\x00" not in str(caught.value) and "\u202e" not in str(caught.value)


@pytest.mark.parametrize(("label", "name"), NAMES, ids=[n for n, _ in NAMES])
def test_hostile_names_in_datasets_are_refused(label: str, name: str, synthetic_dataset_copy: Dataset, tmp_path: Path) -> None:
    root = synthetic_dataset_copy.root
    cases_csv = root / "cases.csv"
    pristine = cases_csv.read_text()
    first = synthetic_dataset_copy.cases[0]
    for column in ("case_id", "site"):
        value = first.case_id if column == "case_id" else first.site
        cases_csv.write_text(pristine.replace(f"\n{value},", f"\n{name},", 1) if column == "case_id" else
                             pristine.replace(f"\n{first.case_id},{value},", f"\n{first.case_id},{name},", 1))
        message = assert_refused_without_writes(tmp_path, lambda: Dataset.load(root), DatasetError)
        assert str(cases_csv) in message and one_line(message)
    cases_csv.write_text(pristine)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": name}))
    assert "file ending" in assert_refused_without_writes(tmp_path, lambda: Dataset.load(root), DatasetError)
    (root / "dataset.json").write_text(json.dumps(meta))
    splits = json.loads((root / "splits.json").read_text())
    splits["kfold"]["folds"][0]["name"] = name
    (root / "splits.json").write_text(json.dumps(splits))
    dataset = Dataset.load(root)
    k = len(splits["kfold"]["folds"])
    assert "fold name" in assert_refused_without_writes(tmp_path, lambda: dataset.splits("kfold", k=k, seed=splits["kfold"].get("seed", 0)), DatasetError)
    geometry = adv.geometry()
    image = adv.image_array()
    for case_id, site in ((name, "SiteA"), ("case_ok", name)):
        assert_refused_without_writes(tmp_path, lambda: write_case(tmp_path / "written", case_id, site, (image,), adv.label_array(), geometry), LayoutError)


@pytest.mark.parametrize(("label", "name"), NAMES, ids=[n for n, _ in NAMES])
def test_hostile_names_in_imports_are_refused(label: str, name: str, nnunet_raw_dataset, tmp_path: Path) -> None:
    source = nnunet_raw_dataset()
    table = tmp_path / "sites.csv"
    table.write_text("case_id,site\nHOSPA_001,A\nHOSPA_002,A\nHOSPB_001,B\n" + f"HOSPB_002,{json.dumps(name)}\n")
    assert_refused_without_writes(tmp_path, lambda: import_nnunet(source, tmp_path / "out", sites=table), ImportProblem)
    if name.startswith(".") or not name:
        return  # as a file name it would be hidden (or empty): the importer skips hidden files
    try:  # as a case id in a file name, where the file system allows such a name at all
        for path in (source / "imagesTr").glob("HOSPB_002_*"):
            path.rename(path.with_name(path.name.replace("HOSPB_002", name)))
        (source / "labelsTr" / "HOSPB_002.nii.gz").rename(source / "labelsTr" / f"{name}.nii.gz")
    except (OSError, ValueError):
        return
    message = assert_refused_without_writes(tmp_path, lambda: import_nnunet(source, tmp_path / "out", sites=r"^(HOSP.)"), ImportProblem)
    assert "case id" in message or "name is not" in message


@pytest.mark.parametrize(("label", "name"), NAMES, ids=[n for n, _ in NAMES])
def test_hostile_names_in_submissions_and_uploads_are_refused(label: str, name: str, tmp_path: Path) -> None:
    from bench.app import uploads

    folder = tmp_path / "sub"
    folder.mkdir()
    (folder / "submission.yaml").write_text(adv.BASE_MANIFEST.format(name=json.dumps(name)) + "kind: predictions\nfolder: " + json.dumps(name) + "\n")
    (folder / "predictions").mkdir()
    assert_refused_without_writes(tmp_path, lambda: load_submission(folder), SubmissionError)

    def resolve() -> None:
        resolved = resolve_inside(folder, name)
        if resolved == folder.resolve() or folder.resolve() in resolved.parents:
            raise SubmissionError(folder, [])  # stays inside: not an escape either

    assert_refused_without_writes(tmp_path, resolve, SubmissionError)
    mask = adv.write(tmp_path / "mask.nii.gz", adv.label_array()).read_bytes()
    card = uploads.PredictionsCard(name=name)

    def upload(data: bytes, filename: str, **kw) -> None:
        result = uploads.install_upload(data, filename, tmp_path / "uploads", **kw)
        if not result.ok:
            raise ArchiveError(Path(filename), result.problems)
        shutil.rmtree(result.path)

    assert_refused_without_writes(tmp_path, lambda: upload(adv.zip_bytes({"case_001.nii.gz": mask}), "masks.zip", predictions=card), ArchiveError, ("uploads",))
    member = f"predictions/{name}.nii.gz" if name else "predictions/.nii.gz"
    good = uploads.PredictionsCard(name="fine")
    assert_refused_without_writes(tmp_path, lambda: upload(adv.submission_zip({f"{name}/x.py": b"x = 1\n"}), "sub.zip"), ArchiveError, ("uploads",))
    assert_refused_without_writes(tmp_path, lambda: upload(adv.zip_bytes({member: mask, "case_001.nii.gz": mask}), "m.zip", predictions=good), ArchiveError, ("uploads",))
    # A hostile browser file name is only ever a label: the upload itself is fine and lands in uploads/.
    before = adv.snapshot(tmp_path)
    result = uploads.install_upload(adv.zip_bytes({"case_001.nii.gz": mask}), name + ".zip", tmp_path / "uploads", predictions=good)
    assert result.path == tmp_path / "uploads" / "fine"
    new = adv.snapshot(tmp_path).keys() - before.keys()
    assert all(k == "uploads" or k.startswith("uploads/fine") for k in new), sorted(new)


# --------------------------------------------------------------------------------------------------
# verify --static parses model files


def model_submission(folder: Path, kind: str, data: bytes) -> Path:
    model = "model.onnx" if kind == "onnx" else "model.pt"
    folder.mkdir(parents=True)
    (folder / "submission.yaml").write_text(adv.BASE_MANIFEST.format(name=folder.name) + f"kind: {kind}\nmodel: {model}\npatch_size: [8, 8, 8]\n")
    (folder / model).write_bytes(data)
    return folder


#: Every damaged model file; ONNX ones also with onnxruntime as the parser (onnx is a development extra).
MODEL_CASES = [(kind, "onnx") for kind in adv.MODEL_FILES] + [(kind, "onnxruntime") for kind, (k, _) in adv.MODEL_FILES.items() if k == "onnx"]


@pytest.mark.parametrize(("kind", "onnx_package"), MODEL_CASES, ids=[f"{k}-{p}" for k, p in MODEL_CASES])
def test_verify_static_refuses_corrupt_model_files(kind: str, onnx_package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    submission_kind = adv.MODEL_FILES[kind][0]
    folder = model_submission(tmp_path / "model", submission_kind, adv.model_file(kind))
    if onnx_package == "onnxruntime":
        monkeypatch.setitem(sys.modules, "onnx", None)  # onnx is a development extra: onnxruntime checks then
    errors = [p for p in verify_submission(folder, run_model=False) if p.severity == "error"]
    assert len(errors) == 1 and errors[0].where.startswith("model.") and one_line(str(errors[0])), errors


def test_verify_static_accepts_sound_model_files(tmp_path: Path) -> None:
    assert verify_submission(model_submission(tmp_path / "onnx", "onnx", adv.onnx_model_bytes()), run_model=False) == []
    assert verify_submission(model_submission(tmp_path / "ts", "torchscript", adv.torchscript_like_zip()), run_model=False) == []
    inside = model_submission(tmp_path / "external", "onnx", adv.onnx_model_bytes(external="weights.bin"))
    (inside / "weights.bin").write_bytes(np.ones(2, np.float32).tobytes())
    assert verify_submission(inside, run_model=False) == []
