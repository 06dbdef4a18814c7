"""Importers on fixture folders that mimic BONBID-HIE (2023, 2024) and nnU-Net raw datasets."""

from __future__ import annotations

import numpy as np
import pytest

from bench.data import importers
from bench.data.dataset import Dataset
from bench.data.importers import ImportProblem, import_bonbid, import_nnunet, nnunet_dataset_name

#: Spacing of the fixture volumes (tests/conftest.py).
FIXTURE_SPACING = (3.0, 0.9, 0.9)


def test_bonbid_2023(bonbid_release, fixture_case_arrays, tmp_path) -> None:
    source = bonbid_release(mgh=3)
    dataset = import_bonbid(source, tmp_path / "bonbid")
    assert [c.case_id for c in dataset] == ["MGHNICU_001", "MGHNICU_002", "MGHNICU_003"]
    assert dataset.sites == ("MGH",)
    assert dataset.channel_names == ("ADC", "Z-ADC")
    case = dataset.case("MGHNICU_002")
    image, geometry = case.load_image()
    adc, zadc, label = fixture_case_arrays(1)
    assert np.array_equal(image[0], adc) and np.array_equal(image[1], zadc)
    assert np.array_equal(case.load_label(), label.astype(bool))
    assert geometry.spacing == pytest.approx(FIXTURE_SPACING)
    row = dataset.table.set_index("case_id").loc["MGHNICU_002"]
    voxel_ml = np.prod(FIXTURE_SPACING) / 1000
    assert row["lesion_volume_ml"] == pytest.approx(label.sum() * voxel_ml, abs=1e-4)
    assert row["brain_volume_ml"] == pytest.approx((adc > 0).sum() * voxel_ml, abs=1e-3)
    assert row["n_lesions"] == 1 and row["source"] == "1ADC_ss/MGHNICU_002-VISIT_01-ADC_ss.mha"
    assert dataset.table.set_index("case_id").loc["MGHNICU_001", "lesion_volume_ml"] == 0
    assert dataset.metadata["licence"].startswith("CC BY-NC")
    assert dataset.verify() == []
    assert "loso" not in dataset.stored_splits()  # one site only


def test_bonbid_2024_adds_a_second_site(bonbid_release, tmp_path) -> None:
    source = bonbid_release(mgh=3, bch=3)
    dataset = import_bonbid(source, tmp_path / "bonbid", folds=3)
    assert dataset.sites == ("BCH", "MGH")
    assert [f.name for f in dataset.splits("loso")] == ["loso-BCH", "loso-MGH"]
    assert len(dataset.splits("kfold", k=3)) == 3


def test_bonbid_problems_name_the_file(bonbid_release, fixture_case_arrays, write_fixture_image, tmp_path) -> None:
    source = bonbid_release(mgh=3)
    zmap = source / "2Z_ADC" / "Zmap_MGHNICU_002-VISIT_01-ADC_smooth2mm_clipped10.mha"
    zmap.unlink()
    label = source / "3LABEL" / "MGHNICU_003-VISIT_01_lesion.mha"
    label.unlink()
    with pytest.raises(ImportProblem) as error:
        import_bonbid(source, tmp_path / "out")
    message = str(error.value)
    assert "2 problem(s)" in message
    assert "MGHNICU_002-VISIT_01-ADC_ss.mha: Z-ADC map Zmap_MGHNICU_002-VISIT_01-ADC_smooth2mm_clipped10.mha is missing" in message
    assert "MGHNICU_003-VISIT_01-ADC_ss.mha: lesion label MGHNICU_003-VISIT_01_lesion.mha is missing" in message
    assert not (tmp_path / "out").exists()
    # Unlabelled cases can be left out on purpose.
    write_fixture_image(zmap, fixture_case_arrays(1)[1])
    dataset = import_bonbid(source, tmp_path / "out", skip_unlabeled=True)
    assert [c.case_id for c in dataset] == ["MGHNICU_001", "MGHNICU_002"]


@pytest.mark.parametrize("damage", ["corrupt", "grid", "label-values", "nan", "orphan"])
def test_bad_files_are_reported(bonbid_release, fixture_case_arrays, write_fixture_image, tmp_path, damage: str) -> None:
    source = bonbid_release(mgh=2)
    adc_path = source / "1ADC_ss" / "MGHNICU_002-VISIT_01-ADC_ss.mha"
    label_path = source / "3LABEL" / "MGHNICU_002-VISIT_01_lesion.mha"
    adc, _, label = fixture_case_arrays(1)
    if damage == "corrupt":
        adc_path.write_bytes(b"ObjectType = Image\nthis is not an image")
        expected = f"{adc_path}: cannot be read"
    elif damage == "grid":
        write_fixture_image(label_path, label, spacing=(2.0, 0.9, 0.9))
        expected = f"{label_path}: grid does not match"
    elif damage == "label-values":
        write_fixture_image(label_path, label * 2)
        expected = f"{label_path}: label must hold only 0 and 1, found also [2]"
    elif damage == "nan":
        adc[0, 0, 0] = np.nan
        write_fixture_image(adc_path, adc)
        expected = f"{adc_path}: 1 voxels are NaN"
    else:
        write_fixture_image(source / "3LABEL" / "MGHNICU_009-VISIT_01_lesion.mha", label)
        expected = "MGHNICU_009-VISIT_01_lesion.mha: no ADC map"
    with pytest.raises(ImportProblem, match=expected.replace("[", r"\[").replace("]", r"\]")):
        import_bonbid(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_import_leaves_nothing(bonbid_release, tmp_path, monkeypatch) -> None:
    source = bonbid_release(mgh=3)
    real_write_case = importers.write_case
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write_case(*args, **kwargs)

    monkeypatch.setattr(importers, "write_case", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_bonbid(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BONBID2023_Train"]
    # An existing dataset survives a failed re-import untouched.
    monkeypatch.setattr(importers, "write_case", real_write_case)
    first = import_bonbid(source, tmp_path / "out")
    monkeypatch.setattr(importers, "write_case", interrupted)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        import_bonbid(source, tmp_path / "out", overwrite=True)
    assert Dataset.load(tmp_path / "out").version == first.version
    with pytest.raises(FileExistsError):
        import_bonbid(source, tmp_path / "out")


def test_nnunet_import_with_regex_and_csv(nnunet_raw_dataset, tmp_path) -> None:
    source = nnunet_raw_dataset()
    assert nnunet_dataset_name(source) == "neo"
    by_regex = import_nnunet(source, tmp_path / "a", sites=r"^(?P<site>HOSP[AB])_", folds=2)
    assert by_regex.sites == ("HOSPA", "HOSPB")
    assert len(by_regex) == 4 and by_regex.verify() == []
    table = tmp_path / "sites.csv"
    table.write_text("case_id,site,scanner,field_strength_t\nHOSPA_001,Boston,GE,3\nHOSPA_002,Boston,GE,3\nHOSPB_001,Paris,Siemens,1.5\nHOSPB_002,Paris,Siemens,1.5\n")
    by_csv = import_nnunet(source, tmp_path / "b", sites=table, folds=2)
    assert by_csv.sites == ("Boston", "Paris")
    assert by_csv.case("HOSPB_001").metadata["scanner"] == "Siemens"
    assert by_csv.case("HOSPB_001").metadata["field_strength_t"] == 1.5
    # Same images, different sites (and so different folds): different versions.
    assert by_csv.version != by_regex.version


def test_nnunet_import_problems(nnunet_raw_dataset, tmp_path) -> None:
    source = nnunet_raw_dataset()
    with pytest.raises(ImportProblem, match="no site for case HOSPB_001"):
        import_nnunet(source, tmp_path / "a", sites=r"^HOSPA")
    (source / "imagesTr" / "HOSPA_002_0001.nii.gz").unlink()
    with pytest.raises(ImportProblem, match=r"HOSPA_002_0001.nii.gz: missing channel\(s\) \[1\] of case HOSPA_002"):
        import_nnunet(source, tmp_path / "a", sites=r"^(HOSP.)")
    with pytest.raises(ImportProblem, match="neither an existing CSV file nor a valid regular expression"):
        import_nnunet(source, tmp_path / "a", sites="([unclosed")
    other = nnunet_raw_dataset(name="Dataset502_Multi")
    meta = (other / "dataset.json").read_text().replace('"lesion": 1', '"lesion": 1, "edema": 2')
    (other / "dataset.json").write_text(meta)
    with pytest.raises(ImportProblem, match="needs a binary label"):
        import_nnunet(other, tmp_path / "a", sites=r"^(HOSP.)")
    assert not (tmp_path / "a").exists()


def test_nnunet_accepts_an_imported_dataset(bonbid_release, tmp_path, capfd: pytest.CaptureFixture[str]) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    dataset = import_bonbid(bonbid_release(mgh=2, bch=2), tmp_path / "bonbid", folds=2)
    verify_dataset_integrity(str(dataset.root), num_processes=1)
    output = capfd.readouterr().out
    assert "verify_dataset_integrity Done" in output
    assert "Error" not in output and "Warning" not in output
