"""Transfer learning and training fractions (issue 16): bench pretrain, strict loading, the run identity,
site-stratified subsampling and the learning curve. Tiny volumes and a few steps throughout."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _unet(channels):
    from bench.models.networks import NetworkContext, build_network

    return build_network("unet", {"channels": list(channels), "strides": "auto", "num_res_units": 1},
                         NetworkContext(2, 2, (16, 32, 32), (3.0, 1.0, 1.0)))


def _save(state, path: Path) -> Path:
    import torch

    torch.save(state, path)
    return path


def _config(**fields):
    from bench.models.recipe import TransferConfig

    return TransferConfig(**fields)


# -- strict loading -----------------------------------------------------------------------------------


def test_a_narrow_checkpoint_into_a_wide_network_is_refused_listing_the_tensors(tmp_path: Path) -> None:
    from bench.models.transfer import TransferError, apply_transfer

    narrow = _save(_unet((4, 8, 16)).state_dict(), tmp_path / "narrow.pt")
    wide = _unet((8, 16, 32))
    with pytest.raises(TransferError) as caught:
        apply_transfer(wide, _config(checkpoint=str(narrow)), submission_dir=tmp_path)
    message = str(caught.value)
    assert "strict transfer refused" in message and "differ in shape" in message
    first = next(iter(wide.state_dict()))
    assert f"{first}: checkpoint" in message, "names the first tensor that did not match, with both shapes"
    assert "... and" in message and "more" in message, "lists the first few names and counts the rest"


def test_strict_false_loads_what_matches_and_records_the_share(tmp_path: Path) -> None:
    import torch

    from bench.models.transfer import TransferError, apply_transfer

    source = _unet((4, 8, 16)).state_dict()
    kept = dict(list(source.items())[: len(source) // 2])  # half the tensors: a partial checkpoint
    path = _save(kept, tmp_path / "half.pt")
    with pytest.raises(TransferError, match=r"only 50% of the network's tensors load \(min_share 90%\)"):
        apply_transfer(_unet((4, 8, 16)), _config(checkpoint="half.pt"), submission_dir=tmp_path)
    net = _unet((4, 8, 16))
    report, loaded = apply_transfer(net, _config(checkpoint="half.pt", strict=False), submission_dir=tmp_path)
    assert report.share == pytest.approx(0.5) and report.loaded == len(kept) and report.missing == len(source) - len(kept)
    assert loaded == set(kept) and all(torch.equal(net.state_dict()[k], v) for k, v in kept.items())
    assert report.to_dict()["share"] == pytest.approx(0.5) and len(report.sha256) == 64


def test_reinit_head_keeps_the_output_layer_fresh_and_a_full_load_passes(tmp_path: Path) -> None:
    import torch

    from bench.models.transfer import apply_transfer, head_prefixes

    trained = _unet((4, 8, 16))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    _save(trained.state_dict(), tmp_path / "w.pt")
    net = _unet((4, 8, 16))
    heads = head_prefixes(net)
    assert heads, "the UNet's output convolution is found"
    report, loaded = apply_transfer(net, _config(checkpoint="w.pt", reinit_head=True, lr_loaded=1e-3), submission_dir=tmp_path)
    assert report.share == 1.0 and report.head_reinitialised > 0 and not any(name.startswith(heads) for name in loaded)


def test_checkpoints_are_read_weights_only_and_paths_stay_in_the_submission(tmp_path: Path) -> None:
    import pickle

    from bench.models.transfer import TransferError, read_checkpoint, resolve_checkpoint

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Case("x", "y")))  # an arbitrary object, not tensors
    with pytest.raises(TransferError, match="weights-only"):
        read_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "sub").mkdir()
    with pytest.raises(TransferError, match="inside the submission folder"):
        resolve_checkpoint("../evil.pt", submission_dir=tmp_path / "sub")
    with pytest.raises(TransferError, match="no pretrain run with this id.*bench pretrain"):
        resolve_checkpoint("0123456789abcdef", submission_dir=tmp_path / "sub", results_dirs=[tmp_path])


def test_the_compact_int8_file_is_small_and_close(tmp_path: Path) -> None:
    import torch

    from bench.models.transfer import compact_state_dict, read_checkpoint

    state = _unet((8, 16, 32)).state_dict()
    _save(compact_state_dict(state, "int8"), tmp_path / "w8.pt")
    _save(state, tmp_path / "w32.pt")
    assert (tmp_path / "w8.pt").stat().st_size < 0.4 * (tmp_path / "w32.pt").stat().st_size
    back = read_checkpoint(tmp_path / "w8.pt")
    for name, value in state.items():
        if value.is_floating_point() and value.numel():
            assert torch.allclose(back[name], value.float(), atol=float(value.abs().max()) / 100 + 1e-6), name


# -- training fractions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Case:
    case_id: str
    site: str


class _Dataset:
    def __init__(self, sites: dict[str, int]) -> None:
        self.cases = {f"{s}_{i:03d}": _Case(f"{s}_{i:03d}", s) for s, n in sites.items() for i in range(n)}

    def case(self, case_id: str) -> _Case:
        return self.cases[case_id]


def test_train_fraction_subsampling_is_site_stratified_nested_and_deterministic() -> None:
    from bench.fractions import subsample_training

    dataset = _Dataset({"SiteA": 12, "SiteB": 8, "SiteC": 1})
    ids = list(dataset.cases)
    half = subsample_training(dataset, ids, 0.5, seed=0)
    assert half == subsample_training(dataset, ids, 0.5, seed=0), "deterministic"
    by_site = {s: sum(dataset.case(i).site == s for i in half) for s in ("SiteA", "SiteB", "SiteC")}
    assert by_site == {"SiteA": 6, "SiteB": 4, "SiteC": 1}, "per site, at least one"
    quarter = subsample_training(dataset, ids, 0.25, seed=0)
    assert set(quarter) <= set(half), "a smaller fraction's cases are among a larger one's"
    assert subsample_training(dataset, ids, 0.5, seed=1) != half, "the seed draws another subsample"
    assert subsample_training(dataset, ids, 1.0, seed=0) == ids
    assert [i for i in ids if i in set(half)] == half, "original order kept"


def test_train_fraction_enters_the_run_spec_and_cli_parses_space_separated_values(tmp_path: Path) -> None:
    from bench.cli.run import _split_fractions
    from bench.harness import RunSpec

    assert RunSpec(submission=tmp_path, dataset=tmp_path, db_url="sqlite://").train_fraction == 1.0
    folders, fractions = _split_fractions([str(REPO / "submissions" / "zadc-threshold"), "0.5", "1.0"], [0.25])
    assert [f.name for f in folders] == ["zadc-threshold"] and fractions == [0.25, 0.5, 1.0]


# -- pretrain, the run identity, the learning curve -------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """The default synthetic pool, tiny: 6 cases over 2 Pretrain* sites."""
    from bench.models.pretrain import synthetic_pool

    return synthetic_pool(tmp_path_factory.mktemp("pool") / "pool", cases=6, sites=2, size="tiny")


def test_the_pool_has_its_own_case_ids_and_an_overlap_is_refused(pool) -> None:
    from bench.models.pretrain import PoolOverlapError, check_no_overlap

    assert all(c.case_id.startswith("PretrainSite") for c in pool) and set(pool.sites) == {"PretrainSiteA", "PretrainSiteB"}
    with pytest.raises(PoolOverlapError, match="6 case id"):
        check_no_overlap(pool, pool)


@pytest.mark.slow
def test_pretrain_writes_a_run_folder_whose_hash_enters_the_run_id(pool, tmp_path: Path) -> None:
    from bench.harness import RunSpec, plan_run
    from bench.models.pretrain import pretrain
    from bench.models.transfer import file_sha256

    results = tmp_path / "results"
    result = pretrain(results_dir=results, submission=REPO / "submissions" / "unet-monai", params={"channels": [4, 8, 16]},
                      pool=pool.root, epochs=1, device="cpu", log=lambda *_: None)
    manifest = result.manifest
    assert manifest["network"]["name"] == "unet" and manifest["pool"]["version"] == pool.version and manifest["seed"] == 0
    assert manifest["budget"]["steps"] == 15 and manifest["epochs_run"] == 1
    assert manifest["weights_sha256"] == file_sha256(result.weights) and (result.run_dir / "model" / "run.json").is_file()
    again = pretrain(results_dir=results, submission=REPO / "submissions" / "unet-monai", params={"channels": [4, 8, 16]},
                     pool=pool.root, epochs=1, device="cpu", log=lambda *_: None)
    assert again.run_id == result.run_id and not again.trained, "the same command finds the finished run"

    # a submission naming the pretrain run id: the weights' hash is in the benchmark's run id
    submission = tmp_path / "sub"
    shutil.copytree(REPO / "submissions" / "unet-monai", submission)
    manifest_path = submission / "submission.yaml"
    data = yaml.safe_load(manifest_path.read_text())
    data["recipe"]["network"]["params"]["channels"] = [4, 8, 16]
    data["recipe"]["transfer"] = {"checkpoint": result.run_id}
    manifest_path.write_text(yaml.safe_dump(data))
    on_pool = RunSpec(submission=submission, dataset=pool.root, folds=2, schedule="cpu", results_dir=results, db_url=f"sqlite:///{tmp_path / 'b.db'}")
    from bench.models.pretrain import PoolOverlapError

    with pytest.raises(PoolOverlapError, match="pre-trained on"):
        plan_run(on_pool)  # benchmarking on the pre-training pool itself is refused before anything trains
    from bench.data.synth import generate_synthetic_dataset

    other = generate_synthetic_dataset(tmp_path / "bench-data", cases=4, sites=2, seed=1, size="tiny", workers=1)
    spec = on_pool.model_copy(update={"dataset": other.root})
    first = plan_run(spec).run_id
    assert plan_run(spec).run_id == first
    result.weights.write_bytes(result.weights.read_bytes() + b"\0")  # other weights under the same id
    assert plan_run(spec).run_id != first, "the checkpoint's content hash is part of the run id"
    assert plan_run(spec.model_copy(update={"train_fraction": 0.5})).run_id != plan_run(spec).run_id
    assert {unit.cost for unit in plan_run(spec).units} == {1}, "a trainable unit is scheduled before scoring-only units"


def test_the_shipped_twin_differs_from_unet_monai_only_by_its_transfer() -> None:
    from bench.models.transfer import read_checkpoint

    twin = yaml.safe_load((REPO / "submissions" / "unet-monai-pretrained" / "submission.yaml").read_text())
    base = yaml.safe_load((REPO / "submissions" / "unet-monai" / "submission.yaml").read_text())
    twin_recipe, base_recipe = dict(twin["recipe"]), dict(base["recipe"])
    transfer = twin_recipe.pop("transfer")
    assert transfer["strict"] and transfer["checkpoint"] == "pretrained/unet-monai-cpu.pt"
    twin_recipe["schedules"]["gpu"].pop("transfer")
    assert twin_recipe == base_recipe and twin["preprocessing"] == base["preprocessing"]
    weights = REPO / "submissions" / "unet-monai-pretrained" / transfer["checkpoint"]
    assert weights.stat().st_size < 2_000_000
    assert len(read_checkpoint(weights)) == 49
    # the leaderboard's own twin rule (bench.report.run_facts) finds the pair, in that direction only
    from bench.models.transfer import is_transfer_twin

    twin, base = (yaml.safe_load((REPO / "submissions" / n / "submission.yaml").read_text()) for n in ("unet-monai-pretrained", "unet-monai"))
    assert is_transfer_twin(twin, base) and not is_transfer_twin(base, twin) and not is_transfer_twin(twin, twin)
    nnunet = yaml.safe_load((REPO / "submissions" / "nnunet-baseline" / "submission.yaml").read_text())
    assert not is_transfer_twin(twin, nnunet)


@pytest.mark.slow
def test_learning_curve_end_to_end_on_a_tiny_dataset(pool, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bench.cli import app

    results = tmp_path / "results"
    arguments = ["run", str(REPO / "submissions" / "zadc-logreg"), str(REPO / "submissions" / "zadc-threshold"),
                 "--dataset", str(pool.root), "--folds", "2", "--train-fraction", "0.5", "1.0", "--results", str(results), "--unsafe-no-sandbox"]
    outcome = CliRunner().invoke(app, arguments)
    assert outcome.exit_code == 0, outcome.output
    assert "Learning curve (kfold)" in outcome.output and "zadc-logreg" in outcome.output
    assert (results / "learning-curve-kfold.png").stat().st_size > 1000


def test_nnunet_gets_the_checked_tensors_through_its_own_loader(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from bench.models.transfer import TransferError, prepare_nnunet_weights

    class Net(nn.Module):  # nnU-Net's naming: the output convolutions live under decoder.seg_layers
        def __init__(self, width: int) -> None:
            super().__init__()
            self.encoder = nn.Conv3d(2, width, 3)
            self.decoder = nn.Module()
            self.decoder.seg_layers = nn.ModuleList([nn.Conv3d(width, 2, 1)])

    source = Net(4)
    torch.save({"network_weights": source.state_dict()}, tmp_path / "nnunet.pth")
    target = Net(4)
    report = prepare_nnunet_weights(target, _config(checkpoint="nnunet.pth"), submission_dir=tmp_path, results_dirs=[], out=tmp_path / "handover.pth")
    assert report.share == 1.0 and report.head_reinitialised == 2, "seg layers are the head, as for nnU-Net"
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    load_pretrained_weights(target, str(tmp_path / "handover.pth"), verbose=False)
    assert torch.equal(target.encoder.weight, source.encoder.weight)
    with pytest.raises(TransferError, match="did not match: encoder.weight: checkpoint"):
        prepare_nnunet_weights(Net(8), _config(checkpoint="nnunet.pth"), submission_dir=tmp_path, results_dirs=[], out=tmp_path / "h2.pth")
    with pytest.raises(TransferError, match="freeze is not supported"):
        prepare_nnunet_weights(Net(4), _config(checkpoint="nnunet.pth", freeze=("encoder.",)), submission_dir=tmp_path, results_dirs=[], out=tmp_path / "h3.pth")


def test_bench_run_refuses_weights_pre_trained_on_the_dataset_it_benchmarks(tmp_path: Path) -> None:
    """The pool check at run time (issue 16): the pool's dataset version, and its case ids where listed,
    must differ from the benchmark's; the shipped twin's provenance names its own synthetic pool."""
    from types import SimpleNamespace

    from bench.models.pretrain import PoolOverlapError, check_pool_disjoint, checkpoint_provenance

    dataset = SimpleNamespace(name="bonbid", version="v" * 64, cases=[SimpleNamespace(case_id=f"MGHNICU_{i:03d}") for i in range(4)])
    weights = tmp_path / "w.pt"
    with pytest.raises(PoolOverlapError, match="pre-trained on bonbid"):
        check_pool_disjoint({"pool": {"version": "v" * 12}}, dataset, weights=weights)  # a shortened id too
    with pytest.raises(PoolOverlapError, match="MGHNICU_001"):
        check_pool_disjoint({"pool": {"version": "other", "synthetic": False, "train_cases": ["MGHNICU_001"]}}, dataset, weights=weights)
    check_pool_disjoint({"pool": {"version": "other", "train_cases": ["PretrainSiteA-000"]}}, dataset, weights=weights)
    check_pool_disjoint(None, dataset, weights=weights)  # unknown origin: nothing to compare
    shipped = checkpoint_provenance(REPO / "submissions" / "unet-monai-pretrained" / "pretrained" / "unet-monai-cpu.pt")
    assert shipped is not None and shipped["pool"]["synthetic"] and shipped["pool"]["seed"] == 9001
    assert all(site.startswith("Pretrain") for site in shipped["pool"]["sites"])


@pytest.mark.slow
def test_bench_pretrain_command_writes_weights_and_their_provenance(tmp_path: Path) -> None:
    """`bench pretrain` end to end on the CLI: a tiny synthetic pool of its own, one epoch, an int8 export
    with the provenance file `bench run` checks the benchmark dataset against."""
    import json

    from typer.testing import CliRunner

    from bench.cli import app

    out = tmp_path / "w.pt"
    result = CliRunner().invoke(app, ["pretrain", str(REPO / "submissions" / "unet-monai"), "--params", '{"channels": [4, 8, 16]}',
                                      "--pool-cases", "4", "--pool-sites", "2", "--pool-size", "tiny", "--epochs", "1", "--device", "cpu",
                                      "--results", str(tmp_path / "results"), "--export", str(out), "--precision", "int8"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    provenance = json.loads(out.with_name(out.name + ".provenance.json").read_text())
    assert out.is_file() and provenance["pool"]["synthetic"] and provenance["pool"]["cases"] == 4
    assert all(site.startswith("Pretrain") for site in provenance["pool"]["sites"])
