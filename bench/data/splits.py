"""Cross-validation folds, stored with the dataset so that every consumer uses the same ones.

Two protocols:

``kfold``
    site-stratified k-fold: within every stratum (site x lesion present / absent) the cases are shuffled
    with ``seed`` and dealt round-robin over the folds, continuing the rotation from one stratum to the
    next, so each fold has about the same number of cases, the same site mix and the same share of
    lesion-free cases. The result depends only on the case ids, their strata, ``k`` and ``seed``, not on
    the order of the cases.
``loso``
    leave-one-site-out: one fold per site, holding out all of that site's cases.

The folds of a dataset are written to ``splits.json`` when the dataset is generated or imported;
:meth:`bench.data.dataset.Dataset.splits` reads them, and :func:`to_nnunet_splits` converts them into
nnU-Net's ``splits_final.json`` format, so the benchmark harness and nnU-Net train on exactly the same
cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Dataset

Protocol = Literal["kfold", "loso"]
PROTOCOLS: tuple[str, ...] = ("kfold", "loso")
#: Version of the ``splits.json`` format.
SPLITS_FORMAT = 1


class SplitError(ValueError):
    """Folds cannot be built (too few cases or sites) or a stored split does not match the dataset."""


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: ``train`` cases to fit on, held-out ``test`` cases scored by the harness."""

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "train": list(self.train), "test": list(self.test)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Fold":
        return cls(name=str(data["name"]), train=tuple(map(str, data["train"])), test=tuple(map(str, data["test"])))


def _check_ids(case_ids: Sequence[str]) -> None:
    if len(set(case_ids)) != len(case_ids):
        duplicates = sorted({c for c in case_ids if list(case_ids).count(c) > 1})
        raise SplitError(f"duplicate case ids: {duplicates[:5]}")


def kfold_from_strata(case_ids: Sequence[str], strata: Sequence[str], k: int = 5, seed: int = 0) -> list[Fold]:
    """Stratified k-fold over ``case_ids``; ``strata[i]`` is the stratum of ``case_ids[i]``.

    Folds list their cases in the order of ``case_ids``.
    """
    case_ids = [str(c) for c in case_ids]
    _check_ids(case_ids)
    if len(strata) != len(case_ids):
        raise SplitError(f"{len(strata)} strata for {len(case_ids)} cases")
    if k < 2:
        raise SplitError(f"k-fold needs k >= 2, got {k}")
    if k > len(case_ids):
        raise SplitError(f"cannot make {k} folds from {len(case_ids)} cases")
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    position = 0
    by_stratum: dict[str, list[str]] = {}
    for case_id, stratum in zip(case_ids, strata):
        by_stratum.setdefault(str(stratum), []).append(case_id)
    for stratum in sorted(by_stratum):
        members = sorted(by_stratum[stratum])
        for case_index in rng.permutation(len(members)):
            fold_of[members[case_index]] = position % k
            position += 1
    folds = []
    for index in range(k):
        test = tuple(c for c in case_ids if fold_of[c] == index)
        train = tuple(c for c in case_ids if fold_of[c] != index)
        folds.append(Fold(name=f"kfold-{index}", train=train, test=test))
    return folds


def loso_from_sites(case_ids: Sequence[str], sites: Sequence[str]) -> list[Fold]:
    """Leave-one-site-out folds, one per site in first-seen order, named ``loso-<site>``."""
    case_ids = [str(c) for c in case_ids]
    _check_ids(case_ids)
    site_names = list(dict.fromkeys(map(str, sites)))
    if len(site_names) < 2:
        raise SplitError(f"leave-one-site-out needs at least two sites, found {site_names}")
    folds = []
    for site in site_names:
        test = tuple(c for c, s in zip(case_ids, sites) if str(s) == site)
        train = tuple(c for c, s in zip(case_ids, sites) if str(s) != site)
        folds.append(Fold(name=f"loso-{site}", train=train, test=test))
    return folds


def _case_strata(dataset: "Dataset") -> list[str]:
    strata = []
    for case in dataset.cases:
        volume = case.metadata.get("lesion_volume_ml")
        has_lesion = bool(volume is not None and float(volume) > 0)
        strata.append(f"{case.site}|{'lesion' if has_lesion else 'empty'}")
    return strata


def kfold_splits(dataset: "Dataset", k: int = 5, seed: int = 0) -> list[Fold]:
    """Site-stratified (and lesion / no-lesion stratified) k-fold of a dataset, computed afresh."""
    return kfold_from_strata([c.case_id for c in dataset.cases], _case_strata(dataset), k=k, seed=seed)


def loso_splits(dataset: "Dataset") -> list[Fold]:
    """Leave-one-site-out folds of a dataset."""
    return loso_from_sites([c.case_id for c in dataset.cases], [c.site for c in dataset.cases])


def to_nnunet_splits(folds: Sequence[Fold]) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` content: ``[{"train": [...], "val": [...]}, ...]`` in fold order."""
    return [{"train": list(fold.train), "val": list(fold.test)} for fold in folds]


def build_splits_payload(
    case_ids: Sequence[str], sites: Sequence[str], has_lesion: Sequence[bool], *, k: int = 5, seed: int = 0
) -> dict[str, Any]:
    """The content of ``splits.json``: k-fold (when there are at least ``k`` cases) and leave-one-site-out
    (when there are at least two sites)."""
    payload: dict[str, Any] = {"format": SPLITS_FORMAT}
    strata = [f"{site}|{'lesion' if lesion else 'empty'}" for site, lesion in zip(sites, has_lesion)]
    if len(case_ids) >= max(k, 2):
        folds = kfold_from_strata(case_ids, strata, k=k, seed=seed)
        payload["kfold"] = {"k": k, "seed": seed, "folds": [f.to_dict() for f in folds]}
    if len(set(sites)) >= 2:
        payload["loso"] = {"folds": [f.to_dict() for f in loso_from_sites(case_ids, sites)]}
    return payload


def folds_from_payload(payload: Mapping[str, Any], protocol: str, *, k: int, seed: int) -> list[Fold] | None:
    """Stored folds for ``protocol`` (``None`` when absent or stored with another ``k`` / ``seed``)."""
    entry = payload.get(protocol)
    if not isinstance(entry, Mapping):
        return None
    if protocol == "kfold" and (entry.get("k") != k or entry.get("seed") != seed):
        return None
    return [Fold.from_dict(fold) for fold in entry.get("folds", [])]


def check_partition(folds: Sequence[Fold], case_ids: Sequence[str], *, source: str = "folds") -> None:
    """Raise :class:`SplitError` unless each fold splits ``case_ids`` into train and test, and the test
    sets together cover every case exactly once."""
    expected = set(map(str, case_ids))
    seen: list[str] = []
    for fold in folds:
        train, test = set(fold.train), set(fold.test)
        if train & test:
            raise SplitError(f"{source}: fold {fold.name} has cases in both train and test: {sorted(train & test)[:5]}")
        if train | test != expected:
            unknown = sorted((train | test) - expected)
            missing = sorted(expected - (train | test))
            raise SplitError(f"{source}: fold {fold.name} does not match the dataset (unknown {unknown[:5]}, missing {missing[:5]})")
        seen.extend(fold.test)
    if sorted(seen) != sorted(expected):
        raise SplitError(f"{source}: test sets do not cover every case exactly once")
