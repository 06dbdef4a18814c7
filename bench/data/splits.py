"""Evaluation folds, stored with the dataset so that every consumer uses the same ones.

Three protocols (their names are :data:`bench.constants.PROTOCOLS`):

``kfold``
    site-stratified k-fold: within every stratum (site x lesion present / absent) the cases are shuffled
    with ``seed`` and dealt round-robin over the folds, continuing the rotation from one stratum to the
    next, so each fold has about the same number of cases, the same site mix and the same share of
    lesion-free cases. The result depends only on the case ids, their strata, ``k`` and ``seed``, not on
    the order of the cases.
``loso``
    leave-one-site-out: one fold per site, holding out all of that site's cases.
``holdout``
    one train / test split, the fold named ``holdout``: the entrant is trained once on every training
    case (choosing its model on its own internal validation cases, which the harness carves out of
    ``train``) and scored once on ``test``, as in a challenge with a hidden test set. By default the
    split is site-stratified like ``kfold`` (site x lesion present / absent) with
    :data:`HOLDOUT_TEST_FRACTION` of the cases in ``test``; an importer can instead store a release's
    own training / test partition (BONBID-HIE), marked ``"source": "release"``. Unlike the other two,
    the test sets of a holdout do not cover every case, so it has its own check (:func:`check_holdout`).

The folds of a dataset are written to ``splits.json`` when the dataset is generated or imported;
:meth:`bench.data.dataset.Dataset.splits` reads them, and :func:`to_nnunet_splits` converts them into
nnU-Net's ``splits_final.json`` format, so the benchmark harness and nnU-Net train on exactly the same
cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

# The protocol names are defined once in bench.constants; bench.data.dataset reads them from here.
from bench.constants import PROTOCOLS, ProtocolName  # noqa: F401

if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Dataset

#: Version of the ``splits.json`` format. A ``holdout`` entry was added without a bump: readers of
#: format 1 ignore protocols they do not know, and :meth:`~bench.data.dataset.Dataset.splits` computes
#: the holdout of a ``splits.json`` written before it existed (see :func:`holdout_from_strata`).
SPLITS_FORMAT = 1

#: Share of the cases in the holdout test set. BONBID-HIE 2023 released 85 training cases and kept 44
#: for its hidden test set (44 / 129 = 0.34); a third keeps that proportion, leaves two thirds for
#: training (and the entrant's own validation), and gives a test set large enough for per-case
#: confidence intervals on the 60-case synthetic cohort (20 cases).
HOLDOUT_TEST_FRACTION = 1 / 3
#: Name of the single fold of the holdout protocol (the harness's fold column, run folder names).
HOLDOUT_FOLD = "holdout"
#: Fewest cases a holdout can be made from: at least two to train on and one to test.
MIN_HOLDOUT_CASES = 3
#: ``source`` of a stored holdout: computed by :func:`holdout_from_strata`, or a release's own partition.
HOLDOUT_STRATIFIED = "stratified"
HOLDOUT_RELEASE = "release"


class SplitError(ValueError):
    """Folds cannot be built (too few cases or sites) or a stored split does not match the dataset."""


@dataclass(frozen=True)
class Fold:
    """One fold: ``train`` cases to fit on, held-out ``test`` cases scored by the harness (a holdout is
    a single fold whose ``test`` is the holdout test set)."""

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


def holdout_from_strata(
    case_ids: Sequence[str], strata: Sequence[str], *, seed: int = 0, test_fraction: float = HOLDOUT_TEST_FRACTION
) -> Fold:
    """One stratified train / test split: ``round(test_fraction * n)`` cases in ``test``.

    Every stratum gives ``test_fraction`` of its cases, rounded down, and the cases still missing from
    the total go to the strata with the largest remainders (ties broken by a seeded draw), so each
    stratum's test share is within one case of exact. Which members of a stratum are tested is a seeded
    shuffle of its sorted ids: the result depends only on the ids, their strata, the fraction and the
    seed, not on the order of the cases. Cases are listed in the order of ``case_ids``.
    """
    case_ids = [str(c) for c in case_ids]
    _check_ids(case_ids)
    if len(strata) != len(case_ids):
        raise SplitError(f"{len(strata)} strata for {len(case_ids)} cases")
    if not 0 < test_fraction < 1:
        raise SplitError(f"the holdout test fraction must be between 0 and 1, got {test_fraction}")
    if len(case_ids) < MIN_HOLDOUT_CASES:
        raise SplitError(f"a holdout split needs at least {MIN_HOLDOUT_CASES} cases, found {len(case_ids)}")
    by_stratum: dict[str, list[str]] = {}
    for case_id, stratum in zip(case_ids, strata):
        by_stratum.setdefault(str(stratum), []).append(case_id)
    names = sorted(by_stratum)
    rng = np.random.default_rng(seed)
    # Draw every stratum's shuffle first, then the tie-breaks, always in sorted order: a fixed sequence
    # of draws keeps the split independent of how many cases need tie-breaking.
    shuffled = {name: [sorted(by_stratum[name])[i] for i in rng.permutation(len(by_stratum[name]))] for name in names}
    tie_break = dict(zip(names, rng.random(len(names))))
    # At least one case on each side, whatever the rounding.
    total = min(len(case_ids) - 1, max(1, int(round(test_fraction * len(case_ids)))))
    exact = {name: test_fraction * len(by_stratum[name]) for name in names}
    quota = {name: int(np.floor(exact[name])) for name in names}
    # a stratum can only give a case it still has left in training
    open_strata = [name for name in names if quota[name] < len(by_stratum[name])]
    by_remainder = sorted(open_strata, key=lambda name: (-(exact[name] - quota[name]), tie_break[name]))
    for name in by_remainder[: max(0, total - sum(quota.values()))]:
        quota[name] += 1
    test_ids = {case for name in names for case in shuffled[name][: quota[name]]}
    return Fold(
        name=HOLDOUT_FOLD,
        train=tuple(c for c in case_ids if c not in test_ids),
        test=tuple(c for c in case_ids if c in test_ids),
    )


def holdout_from_partition(case_ids: Sequence[str], test_ids: Sequence[str]) -> Fold:
    """The holdout fold of a given partition (a release's own test set): ``test_ids`` against the rest."""
    case_ids = [str(c) for c in case_ids]
    _check_ids(case_ids)
    test = {str(c) for c in test_ids}
    unknown = sorted(test - set(case_ids))
    if unknown:
        raise SplitError(f"holdout test cases that are not in the dataset: {unknown[:5]}")
    if not test or len(test) == len(case_ids):
        raise SplitError(f"a holdout needs cases on both sides; {len(test)} of {len(case_ids)} cases are test cases")
    return Fold(name=HOLDOUT_FOLD, train=tuple(c for c in case_ids if c not in test), test=tuple(c for c in case_ids if c in test))


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


def holdout_splits(dataset: "Dataset", seed: int = 0) -> list[Fold]:
    """The site-stratified (and lesion / no-lesion stratified) holdout of a dataset, computed afresh, as a
    one-fold list like the other protocols."""
    return [holdout_from_strata([c.case_id for c in dataset.cases], _case_strata(dataset), seed=seed)]


def compute_splits(dataset: "Dataset", protocol: str, *, k: int = 5, seed: int = 0) -> list[Fold]:
    """Folds of ``protocol`` computed from the dataset's cases (what would be stored for it)."""
    if protocol == "kfold":
        return kfold_splits(dataset, k=k, seed=seed)
    if protocol == "loso":
        return loso_splits(dataset)
    if protocol == "holdout":
        return holdout_splits(dataset, seed=seed)
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def to_nnunet_splits(folds: Sequence[Fold]) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` content: ``[{"train": [...], "val": [...]}, ...]`` in fold order."""
    return [{"train": list(fold.train), "val": list(fold.test)} for fold in folds]


def build_splits_payload(
    case_ids: Sequence[str],
    sites: Sequence[str],
    has_lesion: Sequence[bool],
    *,
    k: int = 5,
    seed: int = 0,
    holdout_test: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The content of ``splits.json``: k-fold (when there are at least ``k`` cases), leave-one-site-out
    (when there are at least two sites) and the holdout (when there are at least
    :data:`MIN_HOLDOUT_CASES` cases).

    ``holdout_test`` is a partition given by the data's source (the test cases of a release); without
    it the holdout is :func:`holdout_from_strata` with ``seed``.
    """
    payload: dict[str, Any] = {"format": SPLITS_FORMAT}
    strata = [f"{site}|{'lesion' if lesion else 'empty'}" for site, lesion in zip(sites, has_lesion)]
    if len(case_ids) >= max(k, 2):
        folds = kfold_from_strata(case_ids, strata, k=k, seed=seed)
        payload["kfold"] = {"k": k, "seed": seed, "folds": [f.to_dict() for f in folds]}
    if len(set(sites)) >= 2:
        payload["loso"] = {"folds": [f.to_dict() for f in loso_from_sites(case_ids, sites)]}
    if holdout_test:
        fold = holdout_from_partition(case_ids, holdout_test)
        payload["holdout"] = {"source": HOLDOUT_RELEASE, "folds": [fold.to_dict()]}
    elif len(case_ids) >= MIN_HOLDOUT_CASES:
        fold = holdout_from_strata(case_ids, strata, seed=seed)
        payload["holdout"] = {"source": HOLDOUT_STRATIFIED, "seed": seed, "test_fraction": HOLDOUT_TEST_FRACTION, "folds": [fold.to_dict()]}
    return payload


def folds_from_payload(payload: Mapping[str, Any], protocol: str, *, k: int, seed: int) -> list[Fold] | None:
    """Stored folds for ``protocol``; ``None`` when absent or stored with other parameters (a k-fold with
    another ``k`` / ``seed``, a stratified holdout with another ``seed`` or test fraction), which the
    caller then computes. A release's own holdout partition ignores ``seed``: it is not drawn."""
    entry = payload.get(protocol)
    if not isinstance(entry, Mapping):
        return None
    if protocol == "kfold" and (entry.get("k") != k or entry.get("seed") != seed):
        return None
    if protocol == "holdout" and entry.get("source") != HOLDOUT_RELEASE:
        if entry.get("seed") != seed or not np.isclose(float(entry.get("test_fraction", -1)), HOLDOUT_TEST_FRACTION):
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


def check_holdout(folds: Sequence[Fold], case_ids: Sequence[str], *, source: str = "holdout") -> None:
    """Raise :class:`SplitError` unless ``folds`` is one fold named :data:`HOLDOUT_FOLD` whose train and
    test sets are disjoint, both non-empty, and together hold exactly ``case_ids``."""
    if len(folds) != 1 or folds[0].name != HOLDOUT_FOLD:
        raise SplitError(f"{source}: a holdout is one fold named {HOLDOUT_FOLD!r}, found {[f.name for f in folds]}")
    fold = folds[0]
    train, test = set(fold.train), set(fold.test)
    expected = set(map(str, case_ids))
    if train & test:
        raise SplitError(f"{source}: fold {fold.name} has cases in both train and test: {sorted(train & test)[:5]}")
    if train | test != expected:
        unknown = sorted((train | test) - expected)
        missing = sorted(expected - (train | test))
        raise SplitError(f"{source}: fold {fold.name} does not match the dataset (unknown {unknown[:5]}, missing {missing[:5]})")
    if not train or not test:
        raise SplitError(f"{source}: fold {fold.name} needs cases in both train ({len(train)}) and test ({len(test)})")


def check_folds(protocol: str, folds: Sequence[Fold], case_ids: Sequence[str], *, source: str = "folds") -> None:
    """The check that fits ``protocol``: :func:`check_holdout` for ``holdout``, else :func:`check_partition`."""
    if protocol == "holdout":
        check_holdout(folds, case_ids, source=source)
    else:
        check_partition(folds, case_ids, source=source)
