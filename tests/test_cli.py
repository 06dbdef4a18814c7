"""The top-level CLI: every command is mounted, ``--version`` works, and the app benchmark runs."""

from typer.testing import CliRunner

from bench import __version__
from bench.cli import app

COMMANDS = ("evaluate", "run", "leaderboard", "report", "export", "demo", "worker", "data", "perf", "submission")


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_perf_app_prints_the_page_timings_on_a_small_database() -> None:
    # A benchmark, not a timed test: only checks that it runs and reports each figure.
    result = CliRunner().invoke(app, ["perf", "app", "--rows", "200", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    for key in ("rows", "query_s", "stats_s", "page_cold_s", "page_warm_s"):
        assert key in result.output


def test_the_demo_runs_every_submission_under_both_protocols_but_the_twin_under_loso(tmp_path) -> None:
    from pathlib import Path

    from bench.demo import DEMO_SUBMISSIONS, demo_specs

    specs = demo_specs(Path("submissions"), DEMO_SUBMISSIONS, data=tmp_path, results=tmp_path, db_url="sqlite://", folds=3, sandbox=True)
    protocols = {}
    for spec in specs:
        protocols.setdefault(spec.submission.name, []).append(spec.protocol)
    assert protocols.pop("unet-monai-pretrained") == ["loso"]
    assert all(p == ["kfold", "loso"] for p in protocols.values()) and len(protocols) == len(DEMO_SUBMISSIONS) - 1
    assert {spec.schedule for spec in specs} == {"cpu"} and all(spec.sandbox for spec in specs)
