"""Import real data into the HIE-Bench layout, so that it is used exactly like the synthetic data.

``import_bonbid``
    The BONBID-HIE release layout (2023: one hospital, MGH; 2024: a second hospital, BCH)::

        1ADC_ss/MGHNICU_<id>-VISIT_01-ADC_ss.mha
        2Z_ADC/Zmap_MGHNICU_<id>-VISIT_01-ADC_smooth2mm_clipped10.mha
        3LABEL/MGHNICU_<id>-VISIT_01_lesion.mha
        BCH_data_Train_release/1ADC_ss/BCHNICU_<id>-VISIT_01-ADC_ss.mha
        BCH_data_Train_release/2ZMAP/Zmap_BCHNICU_<id>-VISIT_01-ADC_smooth2mm_clipped10.mha

    Files are recognised by their *names* anywhere below the given folder (sub-folder names differ
    between releases); the site is the file prefix without ``NICU`` (``MGH``, ``BCH``). When the folder
    holds the release's test data as well (a sub-folder whose name has the word ``test``, such as
    ``BONBID2023_Test/``), that training / test partition is stored as the dataset's ``holdout`` split
    (:func:`bonbid_partition`); otherwise the holdout is the site-stratified one.
``import_nnunet``
    Any nnU-Net v2 raw dataset (``imagesTr``, ``labelsTr``, ``dataset.json``) with a binary label, plus
    a site for every case, from a CSV table or a regular expression on the case id.

Both read every file, check it (readable 3-D image, finite values, binary label, channels and label on
one grid), and write the dataset atomically with :class:`~bench.data.layout.DatasetWriter`: an error
names the file and the problem, and an interrupted import leaves nothing behind.

**Orientation is kept.** Arrays are written in their stored order with the source's full geometry
(spacing, origin and direction cosines, read by :func:`bench.imageio.read_image`), never reoriented: a
case stored LPS, RAS, LAS (left-handed), oblique or sagittal (axes permuted) keeps its header, and
every later stage maps results back onto that grid (``tests/test_orientation.py`` imports each of these
as BONBID-HIE ``.mha`` files and checks the header and physical positions after the import).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from bench.data.dataset import Dataset, DatasetError
from bench.data.layout import DatasetWriter, read_case_table, write_case
from bench.ids import identifier_problem
from bench.imageio import IMAGE_SUFFIXES, Geometry, ImageError, read_image, strip_image_suffix

Progress = Callable[[int, int], None]


class ImportProblem(DatasetError):
    """The source data cannot be imported; the message names every offending file and the problem."""


# --------------------------------------------------------------------------------------------------
# Shared reading and checking


@dataclass(frozen=True)
class SourceCase:
    """One case found in a source folder: where its channels and label are, and its site."""

    case_id: str
    site: str
    channels: tuple[Path, ...]
    label: Path
    metadata: Mapping[str, object] = field(default_factory=dict)


def _read(path: Path) -> tuple[np.ndarray, Geometry]:
    try:
        return read_image(path)
    except ImageError as exc:
        raise ImportProblem(str(exc)) from exc


def load_source_case(case: SourceCase) -> tuple[list[np.ndarray], np.ndarray, Geometry]:
    """Read and check one source case: finite channels, binary label, everything on one grid."""
    channels: list[np.ndarray] = []
    reference: Geometry | None = None
    for path in (*case.channels, case.label):
        array, geometry = _read(path)
        if reference is None:
            reference = geometry
        elif problems := reference.differences(geometry):
            raise ImportProblem(f"{path}: grid does not match {case.channels[0]} ({'; '.join(problems)})")
        if path == case.label:
            label = array
        else:
            if not np.issubdtype(array.dtype, np.number):
                raise ImportProblem(f"{path}: voxel type {array.dtype} is not numeric")
            bad = int(np.count_nonzero(~np.isfinite(array))) if np.issubdtype(array.dtype, np.floating) else 0
            if bad:
                raise ImportProblem(f"{path}: {bad} voxels are NaN or infinite")
            channels.append(array.astype(np.float32, copy=False))
    binary = (label == 0) | (label == 1)
    if not binary.all():
        values = np.unique(label[~binary])[:8].tolist()
        raise ImportProblem(f"{case.label}: label must hold only 0 and 1, found also {values}")
    assert reference is not None
    return channels, label.astype(np.uint8), reference


def _write_dataset(
    cases: Sequence[SourceCase],
    out: Path,
    *,
    channel_names: Sequence[str],
    description: str,
    licence: str,
    source: Mapping[str, object],
    overwrite: bool,
    folds: int,
    split_seed: int,
    progress: Progress | None,
    holdout_test: Sequence[str] | None = None,
) -> Dataset:
    with DatasetWriter(out, channel_names=tuple(channel_names), description=description, licence=licence, overwrite=overwrite, extra={"source": dict(source)}) as writer:
        for done, case in enumerate(cases, start=1):
            channels, label, geometry = load_source_case(case)
            writer.add(write_case(writer.root, case.case_id, case.site, channels, label, geometry, case.metadata))
            if progress:
                progress(done, len(cases))
        if holdout_test:  # the source's own test set becomes the stored holdout split
            return writer.commit(folds=folds, split_seed=split_seed, holdout_test=holdout_test)
        return writer.commit(folds=folds, split_seed=split_seed)


def _raise_all(problems: list[str], what: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ImportProblem(f"{what}: {len(problems)} problem(s)\n  {shown}{more}")


# --------------------------------------------------------------------------------------------------
# BONBID-HIE

#: File-name stems (without the image suffix) of the BONBID-HIE releases, by role.
BONBID_NAME_PATTERNS: dict[str, re.Pattern[str]] = {
    "adc": re.compile(r"^(?P<prefix>[A-Za-z]+)_(?P<number>[A-Za-z0-9]+)-VISIT_(?P<visit>\d+)-ADC_ss$"),
    "zadc": re.compile(r"^Zmap_(?P<prefix>[A-Za-z]+)_(?P<number>[A-Za-z0-9]+)-VISIT_(?P<visit>\d+)-ADC_smooth2mm_clipped10$"),
    "label": re.compile(r"^(?P<prefix>[A-Za-z]+)_(?P<number>[A-Za-z0-9]+)-VISIT_(?P<visit>\d+)_lesion$"),
}
BONBID_LICENCE = "CC BY-NC-ND 4.0 (BONBID-HIE); not redistributable with HIE-Bench"


def bonbid_site(prefix: str) -> str:
    """Site name from a BONBID file prefix: ``MGHNICU`` -> ``MGH``, ``BCHNICU`` -> ``BCH``."""
    return prefix[: -len("NICU")] if prefix.upper().endswith("NICU") and len(prefix) > 4 else prefix


def find_bonbid_cases(root: str | Path, *, skip_unlabeled: bool = False) -> list[SourceCase]:
    """Find the cases of a BONBID-HIE release (2023 and / or 2024 layout) anywhere below ``root``.

    Every ADC map needs its Z-ADC map and (unless ``skip_unlabeled``) its lesion label; a Z-ADC map or
    label without ADC, or the same file name found twice, is an error. All problems are reported at once.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImportProblem(f"{root}: not a folder")
    found: dict[tuple[str, str, str], dict[str, Path]] = {}
    problems: list[str] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        stem = strip_image_suffix(path)
        if stem is None:
            continue
        for role, pattern in BONBID_NAME_PATTERNS.items():
            match = pattern.match(stem)
            if match:
                key = (match["prefix"], match["number"], match["visit"])
                files = found.setdefault(key, {})
                if role in files:
                    problems.append(f"{path}: duplicate of {files[role]} (same case and role)")
                else:
                    files[role] = path
                break
    if not found and not problems:
        raise ImportProblem(
            f"{root}: no BONBID-HIE files found (expected names like 1ADC_ss/MGHNICU_001-VISIT_01-ADC_ss.mha, "
            "2Z_ADC/Zmap_MGHNICU_001-VISIT_01-ADC_smooth2mm_clipped10.mha, 3LABEL/MGHNICU_001-VISIT_01_lesion.mha)"
        )
    cases: list[SourceCase] = []
    for (prefix, number, visit), files in sorted(found.items()):
        name = f"{prefix}_{number}-VISIT_{visit}"
        any_file = next(iter(files.values()))
        if "adc" not in files:
            problems.append(f"{any_file}: no ADC map {name}-ADC_ss.mha for it")
            continue
        if "zadc" not in files:
            problems.append(f"{files['adc']}: Z-ADC map Zmap_{name}-ADC_smooth2mm_clipped10.mha is missing")
            continue
        if "label" not in files:
            if not skip_unlabeled:
                problems.append(f"{files['adc']}: lesion label {name}_lesion.mha is missing (use --skip-unlabeled to leave such cases out)")
            continue
        case_id = f"{prefix}_{number}" if visit == "01" else f"{prefix}_{number}_V{visit}"
        if (reason := identifier_problem(case_id) or identifier_problem(bonbid_site(prefix))) is not None:
            problems.append(f"{files['adc']}: case id {case_id!r} or site {bonbid_site(prefix)!r} {reason}")
            continue
        cases.append(
            SourceCase(
                case_id=case_id,
                site=bonbid_site(prefix),
                channels=(files["adc"], files["zadc"]),
                label=files["label"],
                metadata={"source": files["adc"].relative_to(root).as_posix()},
            )
        )
    _raise_all(problems, f"{root}: cannot import the BONBID-HIE data")
    if not cases:
        raise ImportProblem(f"{root}: no labelled BONBID-HIE case found")
    return cases


#: A folder name that marks a release's test data: the word ``test`` or ``testing`` on its own or
#: between separators (``Test``, ``BONBID2023_Test``, ``BCH_data_Test_release``; not ``Contest``).
BONBID_TEST_FOLDER = re.compile(r"(?:^|[^a-z])test(?:ing)?(?:[^a-z]|$)", re.IGNORECASE)


def bonbid_partition(cases: Sequence[SourceCase]) -> tuple[str, ...]:
    """The case ids the release itself puts in its test set: those whose ADC map lies in a sub-folder
    of the import folder whose name has the word ``test`` (:data:`BONBID_TEST_FOLDER`; the import
    folder's own name does not count, so importing ``BONBID2023_Test`` alone is not a partition).

    Every other case is a training case. Empty when no case, or every case, is in a test folder: then
    the release gives no partition, and the dataset gets the site-stratified holdout.
    """
    test = []
    for case in cases:
        relative = str(case.metadata.get("source", ""))  # the ADC map's path below the import folder
        folders = relative.split("/")[:-1]
        if any(BONBID_TEST_FOLDER.search(folder) for folder in folders):
            test.append(case.case_id)
    return tuple(test) if 0 < len(test) < len(cases) else ()


def import_bonbid(
    path: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    skip_unlabeled: bool = False,
    folds: int = 5,
    split_seed: int = 0,
    progress: Progress | None = None,
) -> Dataset:
    """Import a BONBID-HIE release folder (2023 and / or 2024 layout) into a dataset at ``out``.

    When the folder holds the release's training and test folders, the release's partition is the
    dataset's ``holdout`` split (:func:`bonbid_partition`).
    """
    cases = find_bonbid_cases(path, skip_unlabeled=skip_unlabeled)
    sites = sorted({c.site for c in cases})
    holdout_test = bonbid_partition(cases)
    return _write_dataset(
        cases,
        Path(out),
        channel_names=("ADC", "Z-ADC"),
        description=f"BONBID-HIE imported from {Path(path).name}: {len(cases)} cases from {', '.join(sites)}"
        + (f", {len(holdout_test)} of them in the release's test set." if holdout_test else "."),
        licence=BONBID_LICENCE,
        source={"kind": "bonbid-hie", "path": str(Path(path).resolve())},
        overwrite=overwrite,
        folds=folds,
        split_seed=split_seed,
        progress=progress,
        holdout_test=holdout_test,
    )


# --------------------------------------------------------------------------------------------------
# nnU-Net v2 raw datasets

#: ``cases.csv`` metadata a site table may provide besides ``case_id`` and ``site``.
SITE_TABLE_METADATA = ("scanner", "field_strength_t", "pattern")


def _nnunet_metadata(folder: Path) -> dict:
    dataset_json = folder / "dataset.json"
    if not dataset_json.is_file():
        raise ImportProblem(f"{dataset_json}: missing (is {folder} an nnU-Net v2 raw dataset?)")
    try:
        meta = json.loads(dataset_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ImportProblem(f"{dataset_json}: not valid JSON ({exc})") from exc
    for key in ("labels", "file_ending"):
        if key not in meta:
            raise ImportProblem(f"{dataset_json}: key {key!r} is missing")
    if "channel_names" not in meta and "modality" not in meta:
        raise ImportProblem(f"{dataset_json}: key 'channel_names' is missing")
    if "dataset" in meta:
        raise ImportProblem(f"{dataset_json}: explicit 'dataset' file lists are not supported; use imagesTr / labelsTr folders")
    labels = {str(k): v for k, v in meta["labels"].items()}
    values = sorted(v for v in labels.values() if isinstance(v, int))
    if values != [0, 1] or len(labels) != 2:
        raise ImportProblem(f"{dataset_json}: HIE-Bench needs a binary label (background 0, lesion 1), found labels {labels}")
    return meta


def read_site_table(path: str | Path) -> dict[str, dict[str, object]]:
    """Read a CSV with columns ``case_id`` and ``site`` (optionally scanner, field_strength_t, pattern)."""
    import pandas as pd

    path = Path(path)
    table = read_case_table(path, ImportProblem)
    if table["site"].isna().any():
        raise ImportProblem(f"{path}: empty site for cases {table['case_id'][table['site'].isna()].tolist()[:5]}")
    for line, site in enumerate(table["site"].tolist(), start=2):
        if (reason := identifier_problem(site)) is not None:
            raise ImportProblem(f"{path}, line {line}: site {ascii(site)[:80]} {reason} (use 1-64 ASCII letters, digits, '.', '_' or '-')")
    rows = {}
    for row in table.to_dict(orient="records"):
        rows[str(row["case_id"])] = {k: row[k] for k in ("site", *SITE_TABLE_METADATA) if k in row and not pd.isna(row[k])}
    return rows


def site_assigner(sites: str | Path) -> Callable[[str], dict[str, object] | None]:
    """Site lookup from ``sites``: an existing CSV file (see :func:`read_site_table`) or a regular
    expression searched in the case id, whose group ``site`` (or first group, or whole match) is the site."""
    if Path(sites).is_file():
        table = read_site_table(sites)
        return lambda case_id: table.get(case_id)
    try:
        pattern = re.compile(str(sites))
    except re.error as exc:
        raise ImportProblem(f"--sites {sites!r}: neither an existing CSV file nor a valid regular expression ({exc})") from exc

    def from_regex(case_id: str) -> dict[str, object] | None:
        match = pattern.search(case_id)
        if not match:
            return None
        if "site" in pattern.groupindex:
            site = match["site"]
        elif pattern.groups:
            site = match[1]
        else:
            site = match[0]
        return {"site": site} if site else None

    return from_regex


def find_nnunet_cases(folder: str | Path, sites: str | Path, *, skip_unlabeled: bool = False) -> tuple[list[SourceCase], dict]:
    """Cases of an nnU-Net v2 raw dataset with their sites, and its ``dataset.json`` content."""
    folder = Path(folder)
    meta = _nnunet_metadata(folder)
    names = meta.get("channel_names") or meta.get("modality")
    n_channels = len(names)
    ending = str(meta["file_ending"])
    if ending not in IMAGE_SUFFIXES:  # it becomes part of every path read below
        raise ImportProblem(f"{folder / 'dataset.json'}: file_ending {ascii(ending)} is not one of {', '.join(IMAGE_SUFFIXES)}")
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    for required in (images_dir, labels_dir):
        if not required.is_dir():
            raise ImportProblem(f"{required}: missing folder")
    channel_pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
    channels: dict[str, dict[int, Path]] = {}
    problems: list[str] = []
    for path in sorted(images_dir.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue
        match = channel_pattern.match(path.name[: -len(ending)])
        if not match:
            problems.append(f"{path}: name is not <case>_<channel:04d>{ending}")
            continue
        channels.setdefault(match["case"], {})[int(match["channel"])] = path
    assign = site_assigner(sites)
    cases: list[SourceCase] = []
    for case_id, files in sorted(channels.items()):
        expected = set(range(n_channels))
        if set(files) != expected:
            missing = sorted(expected - set(files))
            extra = sorted(set(files) - expected)
            if missing:
                problems.append(f"{images_dir / f'{case_id}_{missing[0]:04d}{ending}'}: missing channel(s) {missing} of case {case_id}")
            if extra:
                problems.append(f"{files[extra[0]]}: channel(s) {extra} not declared in dataset.json ({n_channels} channels)")
            continue
        if (reason := identifier_problem(case_id)) is not None:
            problems.append(f"{files[0]}: case id {ascii(case_id)[:80]} {reason}: HIE-Bench does not allow it in file names")
            continue
        label = labels_dir / f"{case_id}{ending}"
        if not label.is_file():
            if not skip_unlabeled:
                problems.append(f"{label}: label of case {case_id} is missing (use --skip-unlabeled to leave such cases out)")
            continue
        info = assign(case_id)
        if not info:
            problems.append(f"{files[0]}: no site for case {case_id} in --sites {sites}")
            continue
        if (reason := identifier_problem(info["site"])) is not None:
            problems.append(f"{files[0]}: site {ascii(info['site'])[:80]} of case {case_id} {reason} (use 1-64 ASCII letters, digits, '.', '_' or '-')")
            continue
        metadata = {k: v for k, v in info.items() if k != "site"}
        cases.append(SourceCase(case_id, str(info["site"]), tuple(files[i] for i in range(n_channels)), label, metadata))
    for path in sorted(labels_dir.iterdir()) if labels_dir.is_dir() else []:
        if path.name.endswith(ending) and not path.name.startswith(".") and path.name[: -len(ending)] not in channels:
            problems.append(f"{path}: label without images in {images_dir}")
    _raise_all(problems, f"{folder}: cannot import the nnU-Net dataset")
    if not cases:
        raise ImportProblem(f"{folder}: no labelled case found in {images_dir}")
    return cases, meta


def nnunet_dataset_name(folder: str | Path) -> str:
    """Default HIE-Bench name of an nnU-Net dataset folder: ``Dataset042_BonBid`` -> ``bonbid``."""
    name = Path(folder).resolve().name
    match = re.match(r"^Dataset\d{3}_(.+)$", name)
    return (match[1] if match else name).lower()


def import_nnunet(
    folder: str | Path,
    out: str | Path,
    *,
    sites: str | Path,
    overwrite: bool = False,
    skip_unlabeled: bool = False,
    folds: int = 5,
    split_seed: int = 0,
    progress: Progress | None = None,
) -> Dataset:
    """Import an nnU-Net v2 raw dataset (binary label) into a HIE-Bench dataset at ``out``.

    ``sites`` is a CSV file (``case_id,site[,scanner,field_strength_t,pattern]``) or a regular expression
    on the case id (see :func:`site_assigner`). Channel names are kept from ``dataset.json``; HIE-Bench's
    models expect ``ADC`` and ``Z-ADC``.
    """
    cases, meta = find_nnunet_cases(folder, sites, skip_unlabeled=skip_unlabeled)
    names = meta.get("channel_names") or meta.get("modality")
    channel_names = [str(names[str(i)]) for i in range(len(names))]
    return _write_dataset(
        cases,
        Path(out),
        channel_names=channel_names,
        description=str(meta.get("description") or f"Imported from the nnU-Net dataset {Path(folder).name}"),
        licence=str(meta.get("licence") or meta.get("license") or "see the source dataset"),
        source={"kind": "nnunet", "path": str(Path(folder).resolve()), "sites": str(sites)},
        overwrite=overwrite,
        folds=folds,
        split_seed=split_seed,
        progress=progress,
    )
