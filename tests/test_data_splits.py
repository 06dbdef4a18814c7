"""Cross-validation folds: partitions, stratification, determinism, storage and nnU-Net format."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.data.dataset import Dataset, DatasetError
from bench.data.splits import (
    Fold,
    SplitError,
    check_partition,
    kfold_from_strata,
    kfold_splits,
    loso_from_sites,
    loso_splits,
    to_nnunet_splits,
)


def assert_partition(folds: list[Fold], case_ids: list[str]) -> None:
    check_partition(folds, case_ids)
    tested = [c for fold in folds for c in fold.test]
    assert sorted(tested) == sorted(case_ids)
    for fold in folds:
        assert set(fold.train).isdisjoint(fold.test)
        assert set(fold.train) | set(fold.test) == set(case_ids)


cases_and_strata = st.lists(
    st.tuples(st.text("abcdefgh0123456789", min_size=1, max_size=6), st.sampled_from(["A", "B", "C", "D"])),
    min_size=5,
    max_size=40,
    unique_by=lambda item: item[0],
)


@settings(max_examples=60, deadline=None)
@given(cases=cases_and_strata, k=st.integers(2, 5), seed=st.integers(0, 10), shuffle_seed=st.randoms(use_true_random=False))
def test_kfold_partitions_stratifies_and_ignores_input_order(cases, k, seed, shuffle_seed) -> None:
    ids = [c for c, _ in cases]
    strata = [s for _, s in cases]
    folds = kfold_from_strata(ids, strata, k=k, seed=seed)
    assert [f.name for f in folds] == [f"kfold-{i}" for i in range(k)]
    assert_partition(folds, ids)
    sizes = [len(f.test) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    # Every stratum is spread over the folds as evenly as possible.
    stratum_of = dict(cases)
    for stratum in set(strata):
        per_fold = [sum(stratum_of[c] == stratum for c in f.test) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1
    # Same cases in another order: same folds.
    shuffled = list(cases)
    shuffle_seed.shuffle(shuffled)
    again = kfold_from_strata([c for c, _ in shuffled], [s for _, s in shuffled], k=k, seed=seed)
    assert [set(f.test) for f in again] == [set(f.test) for f in folds]


def test_kfold_seed_changes_folds_and_errors() -> None:
    ids = [f"c{i:02d}" for i in range(30)]
    strata = ["A"] * 15 + ["B"] * 15
    assert kfold_from_strata(ids, strata, k=5, seed=0) == kfold_from_strata(ids, strata, k=5, seed=0)
    assert kfold_from_strata(ids, strata, k=5, seed=0) != kfold_from_strata(ids, strata, k=5, seed=1)
    with pytest.raises(SplitError, match="cannot make 5 folds from 3 cases"):
        kfold_from_strata(ids[:3], strata[:3], k=5)
    with pytest.raises(SplitError, match="k >= 2"):
        kfold_from_strata(ids, strata, k=1)
    with pytest.raises(SplitError, match="duplicate"):
        kfold_from_strata(["a", "a", "b"], ["A", "A", "A"], k=2)


def test_loso_holds_out_each_site() -> None:
    ids = ["a1", "b1", "a2", "c1", "b2"]
    sites = ["A", "B", "A", "C", "B"]
    folds = loso_from_sites(ids, sites)
    assert [f.name for f in folds] == ["loso-A", "loso-B", "loso-C"]
    assert folds[0].test == ("a1", "a2") and folds[0].train == ("b1", "c1", "b2")
    assert_partition(folds, ids)
    with pytest.raises(SplitError, match="at least two sites"):
        loso_from_sites(ids, ["A"] * 5)


def test_nnunet_format_matches_the_folds() -> None:
    folds = loso_from_sites(["a", "b", "c"], ["X", "Y", "Y"])
    assert to_nnunet_splits(folds) == [{"train": ["b", "c"], "val": ["a"]}, {"train": ["a"], "val": ["b", "c"]}]
    assert json.loads(json.dumps(to_nnunet_splits(folds))) == to_nnunet_splits(folds)


def test_dataset_splits_are_stored_and_shared(synthetic_dataset: Dataset) -> None:
    ids = [c.case_id for c in synthetic_dataset]
    stored = synthetic_dataset.stored_splits()
    assert stored["kfold"]["k"] == 5 and stored["kfold"]["seed"] == 0
    kfold = synthetic_dataset.splits("kfold")
    assert kfold == kfold_splits(synthetic_dataset, k=5, seed=0)
    assert_partition(kfold, ids)
    loso = synthetic_dataset.splits("loso")
    assert loso == loso_splits(synthetic_dataset)
    assert [f.name for f in loso] == [f"loso-{s}" for s in synthetic_dataset.sites]
    # The harness scores fold.test; nnU-Net validates on "val": the same cases.
    assert [set(entry["val"]) for entry in to_nnunet_splits(kfold)] == [set(f.test) for f in kfold]
    # Other k / seed: computed on the fly, still a partition.
    three = synthetic_dataset.splits("kfold", k=3, seed=7)
    assert len(three) == 3
    assert_partition(three, ids)
    # Lesion-free cases are spread over the folds too.
    empty = {c.case_id for c in synthetic_dataset if c.metadata["lesion_volume_ml"] == 0}
    counts = Counter(sum(c in empty for c in f.test) for f in kfold)
    assert max(counts) - min(counts) <= 1
    with pytest.raises(ValueError, match="unknown protocol"):
        synthetic_dataset.splits("random")  # type: ignore[arg-type]


def test_tampered_splits_are_rejected(synthetic_dataset_copy: Dataset) -> None:
    path = synthetic_dataset_copy.root / "splits.json"
    payload = json.loads(path.read_text())
    payload["kfold"]["folds"][0]["test"].pop()
    path.write_text(json.dumps(payload))
    with pytest.raises(DatasetError, match="splits.json"):
        Dataset.load(synthetic_dataset_copy.root).splits("kfold")
    assert any("splits.json" in problem for problem in Dataset.load(synthetic_dataset_copy.root).verify())
