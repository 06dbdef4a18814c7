"""The Dataset / Case API: how every stage of the benchmark reads data.

A dataset is a folder in nnU-Net v2 *raw* layout plus a ``cases.csv`` table::

    datasets/<name>/
        dataset.json                 nnU-Net v2 metadata (channel_names, labels, numTraining, file_ending)
        imagesTr/<case>_0000.nii.gz  channel 0: ADC (10^-6 mm^2/s)
        imagesTr/<case>_0001.nii.gz  channel 1: Z-ADC (deviation from a normative ADC atlas)
        labelsTr/<case>.nii.gz       binary lesion mask
        cases.csv                    one row per case: case_id, site, ... (see CASE_COLUMNS)
        splits.json                  the evaluation folds (k-fold, leave-one-site-out, holdout)

Nothing outside :mod:`bench.data` globs these file names: the harness, preprocessing, models and the
app all receive :class:`Case` objects, which load their arrays lazily. The names themselves live in
:mod:`bench.data.layout`, which also writes datasets (atomically) and defines the dataset version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from bench.data import layout
from bench.ids import IdentifierError, check_identifier
from bench.imageio import Geometry, ImageError, read_geometry, read_image

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from bench.constants import ProtocolName
    from bench.data.splits import Fold


class DatasetError(ValueError):
    """A dataset folder is missing files or its files disagree; the message names the file."""


class DatasetVersionError(DatasetError):
    """The dataset's files no longer hash to its stored version (:meth:`Dataset.verify_version`)."""


#: File name of :meth:`Dataset.verify_version`'s digest cache inside a dataset folder (hidden; not content).
VERSION_CACHE = ".hie-bench-digests.json"
_CACHE_FORMAT = 1


#: Columns of ``cases.csv`` every dataset has; importers and the generator fill them all.
CASE_COLUMNS: tuple[str, ...] = (
    "case_id",
    "site",
    "scanner",
    "field_strength_t",
    "spacing_z",
    "spacing_y",
    "spacing_x",
    "shape_z",
    "shape_y",
    "shape_x",
    "brain_volume_ml",
    "lesion_volume_ml",
    "n_lesions",
    "pattern",
    "version",
)


@dataclass(frozen=True)
class Case:
    """One subject: its channels, its reference mask and its metadata.

    Arrays are loaded on demand and never cached on the object, so a list of thousands of cases costs
    nothing until a stage actually reads one.
    """

    case_id: str
    site: str
    image_paths: tuple[Path, ...]
    label_path: Path | None
    channel_names: tuple[str, ...] = ("ADC", "Z-ADC")
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def geometry(self) -> Geometry:
        """Geometry of the first channel (all channels and the label share it; ``verify`` checks this)."""
        return read_geometry(self.image_paths[0])

    def load_channel(self, index_or_name: int | str) -> tuple[np.ndarray, Geometry]:
        """Read one channel as float32 with its geometry."""
        index = self.channel_names.index(index_or_name) if isinstance(index_or_name, str) else index_or_name
        array, geometry = read_image(self.image_paths[index])
        return array.astype(np.float32, copy=False), geometry

    def load_image(self) -> tuple[np.ndarray, Geometry]:
        """All channels stacked as ``(C, z, y, x)`` float32, with the geometry of channel 0."""
        arrays, geometry = [], None
        for index in range(len(self.image_paths)):
            array, channel_geometry = self.load_channel(index)
            if geometry is None:
                geometry = channel_geometry
            elif problems := geometry.differences(channel_geometry):
                raise DatasetError(f"{self.image_paths[index]}: channel grid differs from channel 0 ({'; '.join(problems)})")
            arrays.append(array)
        return np.stack(arrays), geometry  # type: ignore[return-value]

    def load_label(self) -> np.ndarray:
        """The reference lesion mask as a boolean array (``DatasetError`` if the case has none)."""
        if self.label_path is None:
            raise DatasetError(f"case {self.case_id} has no reference label")
        array, _ = read_image(self.label_path)
        return array.astype(bool)


@dataclass(frozen=True)
class Dataset:
    """A dataset folder and its cases (see the module docstring for the layout)."""

    root: Path
    name: str
    channel_names: tuple[str, ...]
    cases: tuple[Case, ...]
    file_ending: str = ".nii.gz"

    @classmethod
    def load(cls, root: str | Path) -> "Dataset":
        """Open a dataset folder, checking that every case listed in ``cases.csv`` has its files.

        Only file existence is checked here (opening is cheap); :meth:`verify` reads every file.
        """
        # Absolute paths: cases travel to worker processes (submission runners, executors) that run in
        # other working directories, where a relative path would name nothing.
        root = Path(root).resolve()
        dataset_json = root / layout.DATASET_JSON
        cases_csv = root / layout.CASES_CSV
        for required in (dataset_json, cases_csv):
            if not required.is_file():
                raise DatasetError(f"{required}: missing (is {root} a HIE-Bench dataset folder?)")
        meta = _read_json(dataset_json)
        names = meta.get("channel_names")
        if not isinstance(names, Mapping) or not names:
            raise DatasetError(f"{dataset_json}: 'channel_names' must be a non-empty mapping like {{\"0\": \"ADC\"}}")
        try:
            channel_names = tuple(str(names[str(i)]) for i in range(len(names)))
        except KeyError as exc:
            raise DatasetError(f"{dataset_json}: channel_names keys must be 0..{len(names) - 1}, missing {exc}") from None
        try:
            file_ending = layout.check_file_ending(str(meta.get("file_ending", layout.FILE_ENDING)), str(dataset_json))
        except layout.LayoutError as exc:
            raise DatasetError(str(exc)) from None
        table = layout.read_case_table(cases_csv, DatasetError)
        cases = tuple(_load_case(root, line, row, channel_names, file_ending) for line, row in enumerate(table.to_dict(orient="records"), start=2))
        return cls(root=root, name=root.name, channel_names=channel_names, cases=cases, file_ending=file_ending)

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    def __len__(self) -> int:
        return len(self.cases)

    def case(self, case_id: str) -> Case:
        """The case with this id (``KeyError`` naming the dataset if absent)."""
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise KeyError(f"dataset {self.name} has no case {case_id!r}")

    @property
    def sites(self) -> tuple[str, ...]:
        """Site names in first-seen order."""
        return tuple(dict.fromkeys(case.site for case in self.cases))

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """The content of ``dataset.json``."""
        return _read_json(self.root / layout.DATASET_JSON)

    @cached_property
    def table(self) -> "pd.DataFrame":
        """``cases.csv`` as a pandas frame, one row per case, in dataset order."""
        import pandas as pd

        return pd.read_csv(self.root / layout.CASES_CSV, dtype={"case_id": str, "site": str})

    @cached_property
    def version(self) -> str:
        """Content hash of the dataset, as stored when it was written (see :mod:`bench.data.layout`).

        Twelve hex digits of SHA-256 over every case's voxels and grid, its site, the channel names and the
        stored folds; two folders with the same content have the same version wherever they live, so
        results stay comparable across machines. Reading the stored value keeps this instant; a folder
        without one (made by hand) is hashed on first access. :meth:`compute_version` always re-hashes.
        """
        stored = self.metadata.get("hie_bench", {}).get("version") if isinstance(self.metadata.get("hie_bench"), Mapping) else None
        return str(stored) if stored else self.compute_version()

    def compute_version(self) -> str:
        """Re-hash every image and label (seconds for a full-size dataset): the check behind ``bench data verify``."""
        return self._hash_version(lambda path, is_label: _file_digest(path, is_label))

    def verify_version(self, cache: str | Path | None = None) -> str:
        """Check that the files still hash to the stored :attr:`version`, cheaply; return the version.

        The content version is recomputed as :meth:`compute_version` does, but each file's digest is
        taken from a cache when the file's ``(size, mtime_ns, ctime_ns, inode, device)`` are unchanged, so
        a repeated check costs one ``stat`` per file (an edit, a copy or a restore always changes
        ``ctime``). The cache is JSON at ``cache`` (default ``<root>/`` :data:`VERSION_CACHE`); when it
        cannot be written (a read-only dataset) the check still runs, uncached.

        Raises:
            DatasetVersionError: the files (images, labels, ``cases.csv`` sites, ``splits.json``) no
                longer hash to the stored version; the message names the dataset and the fix.
            DatasetError: a file cannot be read.
        """
        cache_path = Path(cache) if cache is not None else self.root / VERSION_CACHE
        entries = _read_digest_cache(cache_path)
        used: dict[str, list[Any]] = {}

        def digest(path: Path, is_label: bool) -> str:
            key = path.relative_to(self.root).as_posix()
            stamp = _stat_stamp(path)
            cached = entries.get(key)
            value = cached[-1] if isinstance(cached, list) and cached[:-1] == stamp else _file_digest(path, is_label)
            used[key] = [*stamp, value]
            return value

        actual = self._hash_version(digest)
        if used != entries:
            _write_digest_cache(cache_path, used)
        stored = self.metadata.get("hie_bench", {}).get("version") if isinstance(self.metadata.get("hie_bench"), Mapping) else None
        if stored and str(stored) != actual:
            raise DatasetVersionError(
                f"{self.root / layout.DATASET_JSON}: stored version {stored} but the files hash to {actual}: images, labels, "
                f"cases.csv or splits.json changed after the dataset was written (fix: restore the original files, or write the "
                f"edited data as a new dataset with 'bench data import', which gives it its own version; 'bench data verify {self.name}' "
                "lists other problems)"
            )
        return actual

    def _hash_version(self, digest: Callable[[Path, bool], str]) -> str:
        """The content version with each file's digest from ``digest(path, is_label)``."""
        digests = []
        for case in self.cases:
            file_digests = [digest(path, False) for path in case.image_paths]
            file_digests.append("no-label" if case.label_path is None else digest(case.label_path, True))
            digests.append((case.case_id, case.site, layout.case_digest(file_digests)))
        return layout.dataset_version(digests, self.channel_names, self.stored_splits())

    def stored_splits(self) -> dict[str, Any] | None:
        """The content of ``splits.json`` (``None`` when the dataset has none)."""
        path = self.root / layout.SPLITS_JSON
        return _read_json(path) if path.is_file() else None

    def splits(self, protocol: "ProtocolName" = "kfold", k: int = 5, seed: int = 0) -> list["Fold"]:
        """Folds of ``protocol`` (``kfold``, ``loso`` or ``holdout``): the stored ones from ``splits.json``
        when they were made with this ``k`` (k-fold) and ``seed`` (k-fold, stratified holdout), else
        computed (deterministically) with :func:`bench.data.splits.compute_splits`. Stored folds that do
        not partition the cases raise :class:`DatasetError`.

        ``holdout`` gives one fold named ``holdout`` (train = every training case, test = the test
        cases). A ``splits.json`` written before the holdout existed has none; it is then computed, the
        same split a fresh generation with this seed would store. A release's own partition (stored by
        the BONBID-HIE importer) is returned whatever ``seed`` is.
        """
        from bench.data import splits as splitting

        if protocol not in splitting.PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(splitting.PROTOCOLS)}")
        stored = self.stored_splits()
        folds = splitting.folds_from_payload(stored, protocol, k=k, seed=seed) if stored else None
        if folds is not None:
            try:
                splitting.check_folds(protocol, folds, [c.case_id for c in self.cases], source=str(self.root / layout.SPLITS_JSON))
                for fold in folds:  # fold names become folder names of runs (results/<run>/models/<fold>)
                    check_identifier(fold.name, f"{protocol} fold name", self.root / layout.SPLITS_JSON)
            except (splitting.SplitError, IdentifierError) as exc:
                raise DatasetError(str(exc)) from exc
            return folds
        try:
            return splitting.compute_splits(self, protocol, k=k, seed=seed)
        except splitting.SplitError as exc:
            raise DatasetError(f"{self.root}: {exc}") from exc

    def verify(self, *, check_version: bool = True) -> list[str]:
        """Read every file and return the problems found (an empty list means the dataset is sound).

        Checks: each file reads as a 3-D image; channels and label share one grid; images are finite;
        labels hold only 0 and 1; stored folds partition the cases; and, with ``check_version``, that the
        content still hashes to the stored :attr:`version`.
        """
        from bench.data import splits as splitting

        problems: list[str] = []
        for case in self.cases:
            if case.label_path is None:
                problems.append(f"{layout.label_path(self.root, case.case_id, self.file_ending)}: label of case {case.case_id} is missing")
            reference: tuple[Path, Geometry] | None = None
            for path in (*case.image_paths, case.label_path):
                if path is None:
                    continue
                try:
                    array, geometry = _read_case_file(path)
                except DatasetError as exc:
                    problems.append(str(exc))
                    continue
                if reference is None:
                    reference = (path, geometry)
                elif differences := reference[1].differences(geometry):
                    problems.append(f"{path}: grid differs from {reference[0].name} ({'; '.join(differences)})")
                if path == case.label_path:
                    values = np.unique(array)
                    if not np.isin(values, (0, 1)).all():
                        problems.append(f"{path}: label values {values.tolist()[:10]} are not in {{0, 1}}")
                elif not np.isfinite(array).all():
                    problems.append(f"{path}: {int((~np.isfinite(array)).sum())} voxels are NaN or infinite")
        stored = self.stored_splits()
        for protocol in splitting.PROTOCOLS:
            entry = (stored or {}).get(protocol)
            if isinstance(entry, Mapping):
                folds = [splitting.Fold.from_dict(f) for f in entry.get("folds", [])]
                try:
                    splitting.check_folds(protocol, folds, [c.case_id for c in self.cases], source=f"{self.root / layout.SPLITS_JSON} ({protocol})")
                except splitting.SplitError as exc:
                    problems.append(str(exc))
        if check_version and not problems:
            stored_version = (self.metadata.get("hie_bench") or {}).get("version")
            actual = self.compute_version()
            if stored_version and stored_version != actual:
                problems.append(
                    f"{self.root / layout.DATASET_JSON}: stored version {stored_version} but the files hash to {actual} "
                    "(the data was modified after it was written)"
                )
        return problems


def _load_case(root: Path, line: int, row: dict[str, Any], channel_names: tuple[str, ...], file_ending: str) -> Case:
    """One ``cases.csv`` row as a :class:`Case`: safe ids, files present, none a link out of ``root``."""
    cases_csv = root / layout.CASES_CSV
    case_id, site = row["case_id"], row["site"]
    try:
        check_identifier("" if _missing(site) else site, "site", f"{cases_csv}, line {line}")
    except IdentifierError as exc:
        raise DatasetError(str(exc)) from None
    images = tuple(layout.image_path(root, case_id, i, file_ending) for i in range(len(channel_names)))
    for path in images:
        if not path.is_file():
            raise DatasetError(f"{path}: image of case {case_id} listed in {cases_csv} is missing")
        _check_inside(root, path)
    label = layout.label_path(root, case_id, file_ending)
    if label.is_file():
        _check_inside(root, label)
    return Case(
        case_id=case_id,
        site=str(site),
        image_paths=images,
        label_path=label if label.is_file() else None,
        channel_names=channel_names,
        metadata={k: _plain(v) for k, v in row.items() if k not in ("case_id", "site")},
    )


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _check_inside(root: Path, path: Path) -> None:
    """Refuse a file that is (or sits in a folder that is) a symbolic link out of the dataset folder.

    The dataset's version and every score describe the files inside it; a link out would let the
    content change (or point at another dataset's labels) while the folder looks the same.
    """
    resolved = path.resolve()
    if root not in resolved.parents:
        raise DatasetError(f"{path}: is a symbolic link to {resolved}, outside the dataset folder {root} "
                           "(copy the file into the dataset instead of linking it)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _file_digest(path: Path, is_label: bool) -> str:
    """The content digest of one image or label file, as the dataset version hashes it."""
    array, geometry = _read_case_file(path)
    array = array.astype(np.uint8 if is_label else np.float32, copy=False)
    return layout.array_digest(array, geometry)


def _stat_stamp(path: Path) -> list[int]:
    """What must be unchanged for a cached digest to hold: size, mtime, ctime, inode, device."""
    info = path.stat()
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]


def _read_digest_cache(path: Path) -> dict[str, Any]:
    """The digest cache of :meth:`Dataset.verify_version` (empty when missing or unreadable: it is only a cache)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _write_digest_cache(path: Path, files: dict[str, list[Any]]) -> None:
    from bench.imageio import write_text_atomic

    try:
        write_text_atomic(path, json.dumps({"format": _CACHE_FORMAT, "files": files}, separators=(",", ":")))
    except OSError:
        pass  # a read-only dataset: the check ran, it just cannot be remembered


def _read_case_file(path: Path) -> tuple[np.ndarray, Geometry]:
    try:
        return read_image(path)
    except ImageError as exc:
        raise DatasetError(str(exc)) from exc


def _plain(value: Any) -> Any:
    """numpy scalars from pandas to plain Python values (metadata is printed, compared and serialised)."""
    return value.item() if isinstance(value, np.generic) else value


def find_dataset(name_or_path: str | Path, data_root: str | Path) -> Path:
    """Resolve a dataset given as a folder path or as a name under ``data_root``.

    Raises :class:`DatasetError` listing the datasets that exist when nothing matches.
    """
    candidate = Path(name_or_path)
    if layout.is_dataset_folder(candidate):
        return candidate
    under_root = Path(data_root) / str(name_or_path)
    if layout.is_dataset_folder(under_root):
        return under_root
    available = ", ".join(p.name for p in list_datasets(data_root)) or "none"
    raise DatasetError(f"no dataset {str(name_or_path)!r} (looked at {candidate} and {under_root}; datasets in {data_root}: {available})")


def list_datasets(data_root: str | Path) -> list[Path]:
    """Dataset folders directly under ``data_root``, sorted by name (hidden temporary folders skipped)."""
    root = Path(data_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and layout.is_dataset_folder(p))
