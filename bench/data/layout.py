"""The on-disk layout of a HIE-Bench dataset, and the one way to write it.

This module is the single place that knows file names, and it builds none from an unsafe name: case ids
and site names are safe identifiers (:mod:`bench.ids`), checked by :func:`image_path`,
:func:`label_path`, :func:`read_case_table` and :func:`write_case`, and the file ending must be one of
:data:`bench.imageio.IMAGE_SUFFIXES`. A dataset folder is an nnU-Net v2 *raw* dataset
(``imagesTr/{case}_{channel:04d}.nii.gz``, ``labelsTr/{case}.nii.gz``, ``dataset.json``) plus HIE-Bench's
own ``cases.csv`` (one row per case, :data:`~bench.data.dataset.CASE_COLUMNS`) and ``splits.json``
(the cross-validation folds).

Writes are atomic at the level of the whole dataset: :class:`DatasetWriter` fills a hidden temporary
folder next to the destination and renames it into place only when every case, table and split is
written. An interrupted generation or import leaves no half-written dataset (only the hidden temporary
folder is removed, or, after a hard kill, left behind with a ``.tmp-`` name that nothing reads).

**Dataset version.** A content hash (12 hex digits of SHA-256) over every case's id, site and voxel data
with its grid (array bytes, dtype, shape, spacing, origin, direction), the channel names and the stored
folds. It is computed once, when the dataset is written, from the arrays in memory and the headers as
written, and stored in ``dataset.json`` (``hie_bench.version``) and in the ``version`` column of
``cases.csv``. It does not depend on gzip settings, file timestamps or the folder's location, so a copy has the same
version anywhere; :meth:`~bench.data.dataset.Dataset.compute_version` recomputes it from the files to
verify one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from bench.ids import IDENTIFIER_PATTERN, IdentifierError, check_identifier, identifier_problem
from bench.imageio import IMAGE_SUFFIXES, Geometry, read_geometry, write_image, write_text_atomic

IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
FILE_ENDING = ".nii.gz"
DATASET_JSON = "dataset.json"
CASES_CSV = "cases.csv"
SPLITS_JSON = "splits.json"
#: nnU-Net label map of every HIE-Bench dataset.
LABELS: dict[str, int] = {"background": 0, "lesion": 1}
#: Version of this layout (``hie_bench.format`` in ``dataset.json``).
LAYOUT_FORMAT = 1
#: Case ids are safe identifiers (:mod:`bench.ids`: they become file names, and nnU-Net finds them by
#: cutting ``_NNNN<ending>`` off the image names). Site names follow the same rule.
CASE_ID_PATTERN = re.compile(IDENTIFIER_PATTERN)
#: Voxel connectivity used to count lesions (26 = faces, edges and corners touch).
LESION_CONNECTIVITY = 26


class LayoutError(ValueError):
    """Something to be written does not fit the layout (bad case id, duplicate case, ...)."""


def image_path(root: str | Path, case_id: str, channel: int, file_ending: str = FILE_ENDING) -> Path:
    """Path of one channel of a case: ``imagesTr/{case_id}_{channel:04d}{file_ending}``.

    The case id and ending are checked (:func:`check_case_id`, :func:`check_file_ending`): no path is
    ever built from an unsafe name, whichever caller passes it.
    """
    return Path(root) / IMAGES_DIR / f"{check_case_id(case_id)}_{int(channel):04d}{check_file_ending(file_ending)}"


def label_path(root: str | Path, case_id: str, file_ending: str = FILE_ENDING) -> Path:
    """Path of the reference label of a case: ``labelsTr/{case_id}{file_ending}`` (checked as :func:`image_path`)."""
    return Path(root) / LABELS_DIR / f"{check_case_id(case_id)}{check_file_ending(file_ending)}"


def check_file_ending(file_ending: str, source: str = "file_ending") -> str:
    """Return ``file_ending`` if it is one of :data:`bench.imageio.IMAGE_SUFFIXES`, else raise :class:`LayoutError`."""
    if file_ending not in IMAGE_SUFFIXES:
        raise LayoutError(f"{source}: file ending {ascii(file_ending)} is not one of {', '.join(IMAGE_SUFFIXES)} (set it to .nii.gz)")
    return file_ending


def read_case_table(path: str | Path, error: type[ValueError] = LayoutError) -> "pd.DataFrame":  # noqa: F821
    """Read a per-case CSV (``cases.csv`` or an importer's site table) and check what every such table needs.

    The table must parse, have ``case_id`` and ``site`` columns (read as strings) and no duplicate case
    id. Problems raise ``error`` (the caller's exception class) naming the file.
    """
    import pandas as pd

    path = Path(path)
    data = path.read_bytes()
    if b"\x00" in data:  # pandas would silently cut a value at the NUL ("case\x00x" reads as "case")
        raise error(f"{path}: contains a NUL byte at offset {data.find(0)} (write the table as plain UTF-8 text)")
    try:
        table = pd.read_csv(io.BytesIO(data), dtype={"case_id": str, "site": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not a readable CSV table ({' '.join(str(exc).split())})") from exc
    missing = {"case_id", "site"} - set(table.columns)
    if missing:
        raise error(f"{path}: missing columns {sorted(missing)} (needs case_id and site)")
    duplicated = table["case_id"][table["case_id"].duplicated()].tolist()
    if duplicated:
        raise error(f"{path}: duplicate case ids {duplicated[:5]}")
    for row, case_id in enumerate(table["case_id"].tolist(), start=2):
        try:
            check_identifier("" if pd.isna(case_id) else case_id, "case id", f"{path}, line {row}")
        except IdentifierError as exc:
            raise error(str(exc)) from None
    return table


def is_dataset_folder(path: str | Path) -> bool:
    """Whether ``path`` looks like a HIE-Bench dataset (has ``dataset.json`` and ``cases.csv``)."""
    path = Path(path)
    return (path / DATASET_JSON).is_file() and (path / CASES_CSV).is_file()


def check_case_id(case_id: str, source: str = "") -> str:
    """Return ``case_id`` if it is a safe identifier (:func:`bench.ids.check_identifier`), else raise :class:`LayoutError`."""
    reason = identifier_problem(case_id)
    if reason is not None:
        raise LayoutError(f"{source + ': ' if source else ''}case id {ascii(case_id)[:80]} is not usable as a file name stem: it {reason} "
                          "(use 1-64 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit)")
    return case_id


def check_site(site: str, source: str = "site") -> str:
    """Return ``site`` if it is a safe identifier (site names become fold and folder names), else raise :class:`LayoutError`."""
    try:
        return check_identifier(site, "site", source)
    except IdentifierError as exc:
        raise LayoutError(str(exc)) from None


# --------------------------------------------------------------------------------------------------
# Content hashing


def geometry_key(geometry: Geometry) -> str:
    """Geometry rounded to 1e-4 mm as text: the grid part of the content hash."""
    # "+ 0.0" turns -0.0 into 0.0: header-only reads report some zero direction cosines as -0.0.
    parts = [",".join(f"{round(float(v), 4) + 0.0:.4f}" for v in values) for values in (geometry.spacing, geometry.origin, geometry.direction)]
    return "|".join(parts)


def array_digest(array: np.ndarray, geometry: Geometry) -> str:
    """SHA-256 of one image: dtype, shape and grid, then the voxel bytes."""
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}|{tuple(array.shape)}|{geometry_key(geometry)}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def case_digest(file_digests: Sequence[str]) -> str:
    """SHA-256 of a case from the digests of its channels and label, in order."""
    return hashlib.sha256("|".join(file_digests).encode()).hexdigest()


def dataset_version(
    cases: Iterable[tuple[str, str, str]], channel_names: Sequence[str], splits: Mapping[str, Any] | None
) -> str:
    """Dataset version from ``(case_id, site, case digest)`` triples, channel names and stored splits."""
    digest = hashlib.sha256()
    digest.update(json.dumps(list(channel_names)).encode())
    for case_id, site, content in sorted(cases):
        digest.update(f"\n{case_id}|{site}|{content}".encode())
    digest.update(json.dumps(_splits_for_hash(splits), sort_keys=True).encode())
    return digest.hexdigest()[:12]


def _splits_for_hash(splits: Mapping[str, Any] | None) -> Any:
    """The part of ``splits.json`` that changes results: which cases each named fold holds."""
    if not splits:
        return None
    return {
        protocol: [(fold["name"], sorted(fold["train"]), sorted(fold["test"])) for fold in entry.get("folds", [])]
        for protocol, entry in sorted(splits.items())
        if isinstance(entry, Mapping)
    }


# --------------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class CaseRecord:
    """What writing one case produced: its ``cases.csv`` row (without ``version``) and content digest."""

    row: dict[str, Any]
    digest: str

    @property
    def case_id(self) -> str:
        return str(self.row["case_id"])

    @property
    def site(self) -> str:
        return str(self.row["site"])


def case_statistics(brain_channel: np.ndarray, label: np.ndarray, geometry: Geometry) -> dict[str, Any]:
    """Brain and lesion volume (ml) and number of lesions of one case.

    The brain is every non-zero voxel of ``brain_channel`` (the skull-stripped ADC); lesions are counted
    as connected components of the label with :data:`LESION_CONNECTIVITY`.
    """
    import cc3d

    voxel_ml = geometry.voxel_volume_ml
    mask = np.asarray(label).astype(bool)
    n_lesions = int(cc3d.connected_components(mask.astype(np.uint8), connectivity=LESION_CONNECTIVITY, return_N=True)[1]) if mask.any() else 0
    return {
        "brain_volume_ml": round(float(np.count_nonzero(brain_channel)) * voxel_ml, 3),
        "lesion_volume_ml": round(float(mask.sum()) * voxel_ml, 4),
        "n_lesions": n_lesions,
    }


def write_case(
    root: str | Path,
    case_id: str,
    site: str,
    channels: Sequence[np.ndarray],
    label: np.ndarray,
    geometry: Geometry,
    metadata: Mapping[str, Any] | None = None,
    *,
    file_ending: str = FILE_ENDING,
) -> CaseRecord:
    """Write one case into the dataset folder ``root`` and return its table row and digest.

    Channels are stored as float32 and the label as uint8 in {0, 1}; every array must have the shape of
    ``geometry``. ``metadata`` fills the remaining ``cases.csv`` columns (scanner, field strength,
    pattern, ...); spacing, shape, volumes and lesion count are computed here.
    """
    check_case_id(case_id)
    if not site or not str(site).strip():
        raise LayoutError(f"case {case_id}: empty site name")
    check_site(site, f"case {case_id}")
    label = np.asarray(label)
    if label.dtype != bool and not ((label == 0) | (label == 1)).all():
        raise LayoutError(f"case {case_id}: label values {np.unique(label).tolist()[:10]} are not in {{0, 1}}")
    digests: list[str] = []
    arrays = [np.asarray(channel, dtype=np.float32) for channel in channels] + [label.astype(np.uint8)]
    paths = [image_path(root, case_id, i, file_ending) for i in range(len(channels))] + [label_path(root, case_id, file_ending)]
    for array, path in zip(arrays, paths):
        if tuple(array.shape) != tuple(geometry.shape):
            raise LayoutError(f"case {case_id}: array of shape {array.shape} for {path.name} does not match the grid {geometry.shape}")
        write_image(array, geometry, path)
        # Hash the grid exactly as the file header stores it (NIfTI keeps float32 spacing and origin).
        digests.append(array_digest(array, read_geometry(path)))
    row: dict[str, Any] = {
        "case_id": case_id,
        "site": str(site),
        "scanner": "unknown",
        "field_strength_t": float("nan"),
        "pattern": "unknown",
    }
    row.update(dict(metadata or {}))
    spacing, shape = geometry.spacing, geometry.shape
    row.update(
        {
            "spacing_z": round(float(spacing[0]), 4),
            "spacing_y": round(float(spacing[1]), 4),
            "spacing_x": round(float(spacing[2]), 4),
            "shape_z": int(shape[0]),
            "shape_y": int(shape[1]),
            "shape_x": int(shape[2]),
        }
    )
    row.update(case_statistics(arrays[0], arrays[-1], geometry))
    return CaseRecord(row=row, digest=case_digest(digests))


# --------------------------------------------------------------------------------------------------
# Whole datasets


@dataclass
class DatasetWriter:
    """Write a dataset atomically: cases go to a hidden temporary folder that is renamed on :meth:`commit`.

    Use as a context manager; leaving the block without committing (an exception, Ctrl-C) deletes the
    temporary folder and leaves ``out`` untouched::

        with DatasetWriter(out, channel_names=("ADC", "Z-ADC"), description="...") as writer:
            writer.add(write_case(writer.root, "case_001", "SiteA", (adc, zadc), label, geometry))
            dataset = writer.commit()
    """

    out: Path
    channel_names: tuple[str, ...]
    description: str = ""
    overwrite: bool = False
    licence: str = "see description"
    extra: Mapping[str, Any] = field(default_factory=dict)
    file_ending: str = FILE_ENDING
    records: list[CaseRecord] = field(default_factory=list, init=False)
    _root: Path | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.channel_names = tuple(self.channel_names)

    @property
    def root(self) -> Path:
        """The temporary folder cases are written into (valid inside the ``with`` block)."""
        if self._root is None:
            raise RuntimeError("DatasetWriter is not open; use it as a context manager")
        return self._root

    def __enter__(self) -> "DatasetWriter":
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out}: already exists (pass overwrite / --force to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._root = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        (self._root / IMAGES_DIR).mkdir()
        (self._root / LABELS_DIR).mkdir()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._root is not None and self._root.exists():
            shutil.rmtree(self._root, ignore_errors=True)
        self._root = None

    def add(self, record: CaseRecord) -> None:
        """Register a case written with :func:`write_case` into :attr:`root`."""
        if any(r.case_id == record.case_id for r in self.records):
            raise LayoutError(f"case {record.case_id} is written twice")
        self.records.append(record)

    def commit(self, *, folds: int = 5, split_seed: int = 0, holdout_test: Sequence[str] | None = None) -> "Dataset":  # noqa: F821 - imported lazily
        """Write ``cases.csv``, ``splits.json`` and ``dataset.json``, then move the dataset into place.

        ``holdout_test``: the source's own test cases (a release's partition), stored as the holdout split.
        """
        import pandas as pd

        from bench.data.dataset import CASE_COLUMNS, Dataset
        from bench.data.splits import build_splits_payload

        if not self.records:
            raise LayoutError(f"{self.out}: no cases to write")
        root = self.root
        table = pd.DataFrame([record.row for record in self.records])
        base_columns = [c for c in CASE_COLUMNS if c != "version"]
        extra_columns = [c for c in table.columns if c not in CASE_COLUMNS]
        table = table[base_columns + extra_columns]
        has_lesion = (table["lesion_volume_ml"] > 0).tolist()
        splits = build_splits_payload(
            table["case_id"].tolist(), table["site"].tolist(), has_lesion, k=folds, seed=split_seed, holdout_test=holdout_test
        )
        version = dataset_version(
            ((r.case_id, r.site, r.digest) for r in self.records), self.channel_names, splits
        )
        table.insert(len(base_columns), "version", version)
        write_text_atomic(root / CASES_CSV, table.to_csv(index=False, lineterminator="\n"))
        write_text_atomic(root / SPLITS_JSON, json.dumps(splits, indent=1) + "\n")
        sites = list(dict.fromkeys(table["site"]))
        dataset_json = {
            "name": self.out.name,
            "description": self.description,
            "licence": self.licence,
            "channel_names": {str(i): name for i, name in enumerate(self.channel_names)},
            "labels": dict(LABELS),
            "numTraining": len(self.records),
            "file_ending": self.file_ending,
            "hie_bench": {"format": LAYOUT_FORMAT, "version": version, "sites": sites, **dict(self.extra)},
        }
        write_text_atomic(root / DATASET_JSON, json.dumps(dataset_json, indent=2) + "\n")
        make_shareable(root)
        _replace_folder(root, self.out)
        self._root = None
        return Dataset.load(self.out)


def make_shareable(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permissions of a normally created file
    or folder. Temporary files and folders are created private (0600 / 0700); the final dataset should
    be readable like anything else the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def _replace_folder(source: Path, destination: Path) -> None:
    """Move ``source`` to ``destination``; an existing ``destination`` is swapped out, then deleted."""
    if destination.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
        os.replace(destination, trash / destination.name)
        os.replace(source, destination)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, destination)
