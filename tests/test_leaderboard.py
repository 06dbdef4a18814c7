"""`bench leaderboard`, `bench report` and `bench export` (bench.report) on a synthetic results database."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from bench.cli.report import export_command, leaderboard_command, report_command
from bench.perf.fill import fill_synthetic_results, time_leaderboard
from bench.report import (
    export_results,
    leaderboard_table,
    render_leaderboard,
    write_report,
)
from bench.store import Store

N_CASES = 24


@pytest.fixture(scope="module")
def results_db(tmp_path_factory) -> str:
    """Three submissions of increasing skill (model-002 best), k-fold and LOSO, some failed cases."""
    url = f"sqlite:///{tmp_path_factory.mktemp('results') / 'bench.db'}"
    with Store(url) as store:
        fill_synthetic_results(store, n_submissions=3, n_cases=N_CASES, n_sites=3, protocols=("kfold", "loso"), failed_fraction=0.05, with_lesions=True, seed=1)
    return url


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    """The three commands as the lead registers them in bench.cli."""
    app = typer.Typer()
    app.command("leaderboard")(leaderboard_command)
    app.command("report")(report_command)
    app.command("export")(export_command)
    return app


def invoke(cli, *args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "220", **(env or {})})


def test_leaderboard_table_has_one_ranking_per_protocol(results_db):
    board = leaderboard_table(Store(results_db), metrics=["dice", "hd95"], n_boot=200)
    assert len(board) == 6
    for protocol, group in board.groupby("protocol"):
        assert group["submission"].tolist() == ["model-002 1", "model-001 1", "model-000 1"], protocol
        assert group["rank"].tolist() == [1, 2, 3]
        assert (group["n_cases"] == N_CASES).all() and (group["site"] == "overall").all()
        assert (group["dice_lo"] <= group["dice"]).all() and (group["dice"] <= group["dice_hi"]).all()
    assert set(board["dataset"]) == {"synthetic"} and set(board["convention"]) == {"bench"}
    assert board["n_failed"].sum() > 0 and "hd95_capped" in board


def test_leaderboard_site_filter_and_protocol(results_db):
    board = leaderboard_table(Store(results_db), metrics=["dice"], protocol="loso", site="site0", n_boot=50)
    assert set(board["protocol"]) == {"loso"} and set(board["site"]) == {"site0"}
    assert (board["n_cases"] == N_CASES // 3).all()
    assert leaderboard_table(Store(results_db), site="nowhere").empty


def test_a_submission_run_under_one_protocol_appears_only_there(tmp_path):
    store = Store(tmp_path / "bench.db")
    fill_synthetic_results(store, n_submissions=2, n_cases=9, protocols=("kfold", "loso"))
    store.upsert_submission(content_hash="late", name="late-entry", version="0.1")
    store.start_run(run_id="late-loso", submission="late", dataset="synthetic-v1", protocol="loso")
    store.record_case_results([{"run_id": "late-loso", "case_id": f"case{c:05d}", "site": f"site{c % 3}", "status": "ok", "dice": 0.99, "hd95": 1.0, "lesion_f1": 1.0} for c in range(9)])
    board = leaderboard_table(store, n_boot=20)
    assert board.groupby("protocol")["submission"].apply(set).to_dict() == {
        "kfold": {"model-000 1", "model-001 1"},
        "loso": {"model-000 1", "model-001 1", "late-entry 0.1"},
    }
    assert board.set_index(["protocol", "submission"]).loc[("loso", "late-entry 0.1"), "rank"] == 1


def test_rendered_table_shows_direction_ci_and_rank(results_db):
    metrics = ["dice", "hd95"]
    board = leaderboard_table(Store(results_db), metrics=metrics, protocol="loso", n_boot=100)
    console = Console(record=True, width=250)
    render_leaderboard(board, metrics, console=console)
    text = console.export_text()
    assert "dice ↑" in text and "hd95 [mm] ↓" in text
    assert re.search(r"│ +0\.\d{3} │", text) and re.search(r"│ +\[0\.\d{3}, 0\.\d{3}\] │", text), text
    assert "protocol loso" in text and "stability" in text and "mean rank" in text
    assert text.index("model-002") < text.index("model-001") < text.index("model-000")


def test_leaderboard_command(cli, results_db, tmp_path):
    result = invoke(cli, "leaderboard", "--db", results_db, "--protocol", "loso", "--metric", "dice", "-m", "lesion_f1", "--bootstrap", "100")
    assert result.exit_code == 0, result.output
    assert "dice ↑" in result.output and "lesion_f1 ↑" in result.output and "hd95" not in result.output.split("Mean over")[0]
    assert result.output.index("model-002") < result.output.index("model-000")
    from_env = invoke(cli, "leaderboard", "--site", "site1", "--bootstrap", "50", env={"HIE_BENCH_DB_URL": results_db})
    assert from_env.exit_code == 0 and "site site1" in from_env.output and "protocol kfold" in from_env.output
    missing = invoke(cli, "leaderboard", "--db", str(tmp_path / "none.db"))
    assert missing.exit_code == 1 and "no results database" in missing.output
    unknown = invoke(cli, "leaderboard", "--db", results_db, "--metric", "dicey")
    assert unknown.exit_code == 1 and "unknown metric" in unknown.output
    nothing = invoke(cli, "leaderboard", "--db", results_db, "--protocol", "holdout")
    assert nothing.exit_code == 1 and "no case results" in nothing.output


def test_report_is_a_self_contained_html_page(cli, results_db, tmp_path):
    out = write_report(Store(results_db), tmp_path / "report.html", metrics=["dice", "hd95"], n_boot=100)
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in page
    assert 'src="https://cdn.plot.ly' not in page, "plotly.js is inlined so the report opens offline"
    for heading in ("Leaderboard", "Scores per site", "Rank stability", "Pairwise Wilcoxon", "Failure cases", "Site generalization gap", "detected, by lesion volume"):
        assert heading in page, heading
    assert "model-002 1" in page and "dice ↑" in page and not list(tmp_path.glob(".tmp-*"))
    result = invoke(cli, "report", "--db", results_db, "--out", str(tmp_path / "cli.html"), "--protocol", "loso", "--bootstrap", "50")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli.html").is_file() and "Site generalization gap" not in (tmp_path / "cli.html").read_text()


def test_export_csv_and_parquet(cli, results_db, tmp_path):
    result = invoke(cli, "export", str(tmp_path / "cases.csv"), "--db", results_db)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "cases.csv")
    assert len(table) == 3 * 2 * N_CASES and {"submission", "protocol", "case_id", "site", "status", "dice", "hd95"} <= set(table.columns)
    result = invoke(cli, "export", str(tmp_path / "loso.data"), "--format", "parquet", "--protocol", "loso", "--db", results_db)
    assert result.exit_code == 0, result.output
    loso = pd.read_parquet(tmp_path / "loso.data")
    assert len(loso) == 3 * N_CASES and set(loso["protocol"]) == {"loso"}
    lesions = pd.read_parquet(export_results(Store(results_db), tmp_path / "lesions.parquet", table="lesions"))
    assert {"kind", "detected", "volume_ml", "submission"} <= set(lesions.columns) and len(lesions) > 0
    runs = pd.read_csv(export_results(Store(results_db), tmp_path / "runs.csv", table="runs"))
    assert len(runs) == 6 and (runs["n_cases"] == N_CASES).all()
    submissions = pd.read_csv(export_results(Store(results_db), tmp_path / "subs.csv", table="submissions"))
    assert submissions["manifest"].map(lambda text: text.startswith("{")).all(), "JSON columns are written as JSON"
    bad = invoke(cli, "export", str(tmp_path / "cases.xlsx"), "--db", results_db)
    assert bad.exit_code == 1 and "unknown export format" in bad.output
    bad_table = invoke(cli, "export", str(tmp_path / "x.csv"), "--table", "secrets", "--db", results_db)
    assert bad_table.exit_code == 1 and "unknown table" in bad_table.output


def test_time_leaderboard_runs_on_a_small_database():
    timings = time_leaderboard(600, n_submissions=3, n_boot=50, repeats=1)
    assert timings["rows"] == 600 and all(timings[key] > 0 for key in ("fill_s", "query_s", "stats_s", "total_s"))


@pytest.fixture(scope="module")
def rerun_db(tmp_path_factory) -> str:
    """Three submissions under LOSO (model-002 best); then model-002 is rerun with much worse results:
    its latest run is worse than its first."""
    url = f"sqlite:///{tmp_path_factory.mktemp('rerun') / 'bench.db'}"
    with Store(url) as store:
        fill_synthetic_results(store, n_submissions=3, n_cases=12, n_sites=3, protocols=("loso",), with_lesions=True, seed=1)
        store.start_run(run_id="model-002-rerun", submission="synthetic-sub0002", dataset="synthetic-v1", protocol="loso")
        worse = {"status": "ok", "dice": 0.05, "hd95": 50.0, "lesion_f1": 0.05}
        store.record_case_results([{"run_id": "model-002-rerun", "case_id": f"case{c:05d}", "site": f"site{c % 3}", **worse} for c in range(12)])
        store.finish_run("model-002-rerun")
    return url


def test_select_latest_or_best_run_of_a_rerun_submission(rerun_db):
    latest = leaderboard_table(Store(rerun_db), metrics=["dice", "hd95"], n_boot=50).set_index("submission")
    best = leaderboard_table(Store(rerun_db), metrics=["dice", "hd95"], n_boot=50, select="best").set_index("submission")
    assert latest.loc["model-002 1", "rank"] == 3 and latest.loc["model-002 1", "dice"] == pytest.approx(0.05)
    assert best.loc["model-002 1", "rank"] == 1 and best.loc["model-002 1", "dice"] > 0.5
    assert best.loc["model-000 1", "dice"] == pytest.approx(latest.loc["model-000 1", "dice"]), "one run: both choices agree"
    assert latest.attrs["select"] == "latest" and "model-002-rerun" in latest.attrs["run_ids"]
    assert best.attrs["select"] == "best" and "model-002-rerun" not in best.attrs["run_ids"]
    assert "synthetic-loso-0002" in best.attrs["run_ids"]


def test_select_option_of_leaderboard_and_report(cli, rerun_db, tmp_path):
    import io

    def board(*args: str) -> pd.DataFrame:
        result = invoke(cli, "leaderboard", "--db", rerun_db, "--bootstrap", "50", "--format", "csv", *args)
        assert result.exit_code == 0, result.output
        return pd.read_csv(io.StringIO(result.output)).set_index("submission")

    assert board().loc["model-002 1", "rank"] == 3, "latest by default: the worse rerun"
    assert board("--select", "latest").loc["model-002 1", "rank"] == 3
    assert board("--select", "best").loc["model-002 1", "rank"] == 1
    markdown = invoke(cli, "leaderboard", "--db", rerun_db, "--bootstrap", "50", "--format", "markdown", "--select", "best")
    assert markdown.exit_code == 0 and "Runs: the best run of each submission (highest mean dice" in markdown.output
    table = invoke(cli, "leaderboard", "--db", rerun_db, "--bootstrap", "50")
    assert table.exit_code == 0 and "latest run of each submission" in table.output
    bad = invoke(cli, "leaderboard", "--db", rerun_db, "--select", "oldest")
    assert bad.exit_code == 2 and "oldest" in bad.output
    for choice in ("latest", "best"):
        out = tmp_path / f"{choice}.html"
        result = invoke(cli, "report", "--db", rerun_db, "--out", str(out), "--bootstrap", "30", "--select", choice)
        assert result.exit_code == 0, result.output
        assert f"<code>--select {choice}</code>): the {choice} run of each submission" in out.read_text()


def test_leaderboard_prints_lesion_recall_by_size_bin(cli, results_db):
    """Issue 15: the lesion-size table (bins in ml and voxels, recall and false positives) beside the board."""
    result = CliRunner().invoke(cli, ["leaderboard", "--db", results_db, "--protocol", "loso", "--bootstrap", "50"], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    assert "by reference-lesion volume" in result.output and " vx)" in result.output and "vx) (" not in result.output and "FP" in result.output


def test_text_leaderboards_carry_the_budget_and_the_convention_beside_every_number(cli, results_db):
    markdown = invoke(cli, "leaderboard", "--db", results_db, "--protocol", "loso", "-m", "dice", "-m", "hd95",
                      "--bootstrap", "50", "--format", "markdown")
    assert markdown.exit_code == 0, markdown.output
    header = next(line for line in markdown.output.splitlines() if line.startswith("| Rank"))
    assert "dice ↑ · bench" in header and "hd95 [mm] ↓ · bench" in header and header.rstrip(" |").endswith("training budget used | resolution")
    csv = invoke(cli, "leaderboard", "--db", results_db, "--protocol", "loso", "--bootstrap", "50", "--format", "csv")
    assert csv.exit_code == 0 and {"budget", "convention"} <= set(csv.output.splitlines()[0].split(","))


def test_every_leaderboard_tests_neighbours_and_transfer_twins_in_pairs(tmp_path):
    """Under each leaderboard: paired Wilcoxon tests of each rank against the next and of a pre-trained twin
    (same recipe but ``transfer``) against its scratch submission, Holm-corrected over those pairs."""
    from bench.report import PAIR_NEXT, PAIR_TWIN, board_pairs, leaderboard_text

    url = f"sqlite:///{tmp_path / 'bench.db'}"
    recipe = {"trainer": "monai", "network": {"name": "unet"}, "schedules": {"cpu": {"batch_size": 2}}}
    twin = {**recipe, "transfer": {"checkpoint": "pretrained/w.pt", "strict": True}}
    with Store(url) as store:
        fill_synthetic_results(store, n_submissions=4, n_cases=N_CASES, n_sites=3, protocols=("loso",), seed=3)
        for index, manifest_recipe in ((0, recipe), (3, twin)):  # the twin ranks first, its scratch last: not neighbours
            store.upsert_submission(content_hash=f"synthetic-sub{index:04d}", name=f"model-{index:03d}", version="1", kind="trainable",
                                    manifest={"name": f"model-{index:03d}", "kind": "trainable", "inputs": {"channels": ["ADC"]}, "recipe": manifest_recipe})
        assert not board_pairs(leaderboard_table(store, metrics=["dice"], n_boot=50)).query("relation != @PAIR_NEXT").shape[0], \
            "no twin until its run says it loaded the weights (a schedule may train it from scratch)"
        store.finish_run("synthetic-loso-0003", budget={"folds": {"loso-site0": {"transfer": {"share": 1.0, "loaded": 49}}}})
        board = leaderboard_table(store, metrics=["dice"], n_boot=50)
    pairs = board_pairs(board)
    relations = dict(zip(zip(pairs["submission_a"], pairs["submission_b"]), pairs["relation"]))
    assert relations == {("model-003 1", "model-002 1"): PAIR_NEXT, ("model-002 1", "model-001 1"): PAIR_NEXT,
                         ("model-001 1", "model-000 1"): PAIR_NEXT, ("model-003 1", "model-000 1"): PAIR_TWIN}
    assert (pairs["p_holm"] >= pairs["p_value"]).all() and (pairs["n"] == N_CASES).all()
    twin_row = pairs[pairs["relation"] == PAIR_TWIN].iloc[0]
    assert twin_row["mean_diff"] > 0 and twin_row["better"] == "model-003 1"
    console = Console(width=250, record=True)
    render_leaderboard(board, ["dice"], console=console)
    text = console.export_text()
    assert "Paired tests" in text and "pre-trained twin vs scratch" in text and "Holm" in text
    assert "| model-003 1 vs model-000 1 | pre-trained twin vs scratch |" in leaderboard_text(board, ["dice"], "markdown")
