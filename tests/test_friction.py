"""The friction a first run as a new user found (issue 11, "A run as a new user would do it also found
these"), one test per item, each failing on the code before its fix.

Item 3 (prediction paths relative to the starting folder) is tested with the harness. The app tests
use Streamlit's AppTest on small synthetic results databases (:func:`bench.perf.fill.fill_synthetic_results`:
no images, so the pages' tables and figures are exercised without the slice viewer) or on the shared
sample of :mod:`bench.perf.fill` where real masks are needed.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.app import uploads
from bench.perf.fill import SampleResults, sample_results
from bench.cli import app as bench_app
from bench.perf.fill import fill_synthetic_results
from bench.report import metric_header, submission_colours, write_report
from bench.store import Store

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app.py"
PAGES = REPO / "bench" / "app" / "pages"


@pytest.fixture(scope="session")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleResults:
    return sample_results(tmp_path_factory.getbasetemp() / "hie-bench-app-sample")


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``alpha`` (3 submissions, k-fold and LOSO; model-002 best) written first, then ``zeta``
    (2 submissions, LOSO): the latest results are zeta's, the first dataset by name is alpha."""
    url = f"sqlite:///{(tmp_path_factory.mktemp('friction') / 'bench.db').as_posix()}"
    with Store(url) as store:
        fill_synthetic_results(store, n_submissions=3, n_cases=12, n_sites=2, protocols=("kfold", "loso"), with_lesions=True, dataset="alpha", seed=1)
        time.sleep(1.1)  # SQLite keeps second resolution: zeta's runs start strictly later
        fill_synthetic_results(store, n_submissions=1, n_cases=12, n_sites=2, protocols=("loso",), with_lesions=True, dataset="zeta", seed=2)
    return url


def app_test(monkeypatch: pytest.MonkeyPatch, db_url: str, page: str | None = None, **query: str):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("HIE_BENCH_DB_URL", db_url)
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params.update(query)
    if page:
        at.switch_page(str(PAGES / f"{page}.py"))
    at.run()
    assert not at.exception, "\n".join(e.value for e in at.exception)
    return at


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _masks(sample: SampleResults) -> dict[str, bytes]:
    folder = sample.submissions["shifted-reference"] / "predictions"
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.nii.gz"))}


# -- 1. a refused upload keeps its name free; the hint names the page's checkbox ----------------------------------


def test_friction_01_refused_upload_claims_no_name_and_hints_at_the_checkbox(tmp_path: Path, sample: SampleResults) -> None:
    card = uploads.PredictionsCard(name="my-unet", authors=("A. Author",))
    masks = _masks(sample)
    partial = dict(list(masks.items())[1:])
    refused = uploads.install_upload(_zip(partial), "masks.zip", tmp_path, predictions=card, dataset_root=sample.dataset)
    assert not refused.ok and refused.path is None
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    fixed = uploads.install_upload(_zip(masks), "masks.zip", tmp_path, predictions=card, dataset_root=sample.dataset)
    assert fixed.ok, fixed.problems  # the retry with every mask is accepted under the same name
    clash = uploads.install_upload(_zip(masks), "masks.zip", tmp_path, predictions=card)
    assert not clash.ok and clash.path is None
    assert uploads.REPLACE_LABEL in clash.problems[-1].fix and "--replace" not in clash.problems[-1].fix
    assert fixed.path is not None and (fixed.path / "submission.yaml").is_file()  # the accepted one is kept


def test_friction_01_the_hint_names_a_control_the_submit_page_has(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HIE_BENCH_RESULTS_DIR", str(tmp_path / "results"))
    at = app_test(monkeypatch, f"sqlite:///{(tmp_path / 'empty.db').as_posix()}", "submit")
    assert at.checkbox(key="submit_replace").label == uploads.REPLACE_LABEL


# -- 2. the report's lesion-size table lists only the submissions of its section -------------------------------------------


def test_friction_02_lesion_size_table_lists_only_submissions_with_runs_in_the_section(two_datasets: str, tmp_path: Path) -> None:
    page = write_report(Store(two_datasets), tmp_path / "report.html", n_boot=20).read_text(encoding="utf-8")
    sections = {section.split("</h2>")[0]: section for section in page.split("<h2>")[1:]}
    zeta = next(body for title, body in sections.items() if title.startswith("zeta"))
    lesions = zeta.split("Reference lesions detected, by lesion volume")[1]
    assert "model-000 1" in lesions
    assert "model-001" not in lesions and "model-002" not in lesions  # alpha's submissions have no run on zeta


# -- 4. load_channel returns (array, geometry), and the docs and the scaffold say so -----------------------------------------


def test_friction_04_load_channel_is_documented_as_it_returns(tmp_path: Path) -> None:
    from bench.imageio import Geometry
    from bench.submissions import scaffold_submission, write_probe_case

    probe = write_probe_case(tmp_path / "probe")
    array, geometry = probe.load_channel("Z-ADC")
    assert isinstance(array, np.ndarray) and isinstance(geometry, Geometry)
    docs = (REPO / "docs" / "submissions.md").read_text(encoding="utf-8")
    assert "(array, geometry)" in docs and 'adc, geometry = case.load_channel("ADC")' in docs
    folder = scaffold_submission("reader", "python", tmp_path, authors=["Ada"], description="Reads channels.")
    predict = (folder / "predict.py").read_text(encoding="utf-8")
    assert 'array, geometry = case.load_channel("Z-ADC")' in predict
    # The scaffold's own code follows what it says: it runs on a case as written.
    namespace: dict = {}
    exec(compile(predict, str(folder / "predict.py"), "exec"), namespace)
    assert namespace["predict"](probe).shape == array.shape


# -- 5. torch.onnx.export works in the shipped environment ---------------------------------------------------------------------


def test_friction_05_torch_onnx_export_of_a_small_conv_net(tmp_path: Path) -> None:
    import onnxruntime
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 1, 1)).eval()
    image = torch.randn(1, 2, 4, 8, 8)
    torch.onnx.export(net, (image,), str(tmp_path / "net.onnx"), input_names=["image"], output_names=["logits"])
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(image).numpy(), rtol=1e-4, atol=1e-5)


# -- 6. leaderboard tables leave the terminal whole; --format csv|markdown ------------------------------------------------------


WIDE_METRICS = ("dice", "hd95", "nsd", "lesion_f1", "assd")


def test_friction_06_piped_leaderboard_is_not_cut_to_80_columns(two_datasets: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    command = [str(Path(sys.executable).with_name("bench")), "leaderboard", "--db", two_datasets, "--dataset", "alpha", "--protocol", "loso", "--bootstrap", "20"]
    command += [arg for metric in WIDE_METRICS for arg in ("-m", metric)]
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=True, cwd=REPO).stdout  # a pipe, not a terminal
    header = next(line for line in output.splitlines() if "Submission" in line)
    assert all(metric_header(m) in header for m in WIDE_METRICS), header  # one header line, nothing folded
    assert max(map(len, output.splitlines())) > 80 and "…" not in output


def test_friction_06_leaderboard_as_csv_and_markdown(two_datasets: str) -> None:
    runner = CliRunner()
    base = ["leaderboard", "--db", two_datasets, "--dataset", "alpha", "--bootstrap", "20", "-m", "dice", "-m", "hd95"]
    csv = runner.invoke(bench_app, [*base, "--format", "csv"])
    assert csv.exit_code == 0, csv.output
    table = pd.read_csv(io.StringIO(csv.output))
    assert set(table["protocol"]) == {"kfold", "loso"} and {"dice", "dice_lo", "hd95_hi", "rank_stability"} <= set(table.columns)
    markdown = runner.invoke(bench_app, [*base, "--format", "markdown"])
    assert markdown.exit_code == 0, markdown.output
    rows = [line for line in markdown.output.splitlines() if line.startswith("|")]
    # two groups: header, rule and three submissions each; then its paired tests: header, rule, two neighbour pairs
    assert len(rows) == 2 * (2 + 3) + 2 * (2 + 2)
    assert markdown.output.count("Paired tests:") == 2
    assert "| Rank | Submission |" in rows[0] and "dice ↑" in rows[0] and markdown.output.count("### HIE-Bench leaderboard") == 2


# -- 7. verify --dataset takes a name under the data root, as bench run does ---------------------------------------------------


def test_friction_07_verify_resolves_a_dataset_name(sample: SampleResults, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    folder = str(sample.submissions["shifted-reference"])
    with monkeypatch.context() as env:
        env.setenv("HIE_BENCH_DATA_ROOT", str(sample.dataset.parent))
        by_settings = runner.invoke(bench_app, ["submission", "verify", folder, "--dataset", sample.dataset.name])
    assert by_settings.exit_code == 0, by_settings.output
    by_option = runner.invoke(bench_app, ["submission", "verify", folder, "--dataset", sample.dataset.name, "--data-root", str(sample.dataset.parent)])
    assert by_option.exit_code == 0, by_option.output
    monkeypatch.setenv("HIE_BENCH_DATA_ROOT", str(sample.dataset.parent))
    unknown = runner.invoke(bench_app, ["submission", "verify", folder, "--dataset", "no-such-dataset"])
    assert unknown.exit_code == 1 and sample.dataset.name in unknown.output  # the error lists what exists


# -- 8. verify refuses the scaffold's placeholders ---------------------------------------------------------------------------------


def test_friction_08_verify_refuses_placeholders_and_says_what_to_fill_in(tmp_path: Path) -> None:
    from bench.submissions import scaffold_submission, verify_submission

    unsigned = scaffold_submission("unsigned", "python", tmp_path)
    errors = [p for p in verify_submission(unsigned, run_model=False) if p.severity == "error"]
    assert {p.where for p in errors} == {"submission.yaml: authors", "submission.yaml: description"}
    assert "Your Name" in errors[0].message and all(p.fix for p in errors)
    runner = CliRunner()
    refused = runner.invoke(bench_app, ["submission", "verify", str(unsigned), "--static"])
    assert refused.exit_code == 1 and "placeholder" in refused.output
    created = runner.invoke(bench_app, ["submission", "new", "signed", "--kind", "python", "--dir", str(tmp_path), "--author", "Ada", "--description", "A baseline."])
    assert created.exit_code == 0, created.output
    assert runner.invoke(bench_app, ["submission", "verify", str(tmp_path / "signed"), "--static"]).exit_code == 0


# -- 9. synth --folds is stored with that k, or refused when it cannot be ---------------------------------------------------------


def test_friction_09_synth_folds_are_stored_or_refused(tmp_path: Path) -> None:
    runner = CliRunner()
    common = ["data", "synth", "--size", "tiny", "--sites", "2", "--workers", "1"]
    made = runner.invoke(bench_app, [*common, "--cases", "6", "--folds", "3", "--out", str(tmp_path / "three")])
    assert made.exit_code == 0, made.output
    splits = json.loads((tmp_path / "three" / "splits.json").read_text())
    assert splits["kfold"]["k"] == 3 and len(splits["kfold"]["folds"]) == 3
    assert "k=3" in made.output and "--folds 3" in made.output
    refused = runner.invoke(bench_app, [*common, "--cases", "4", "--folds", "5", "--out", str(tmp_path / "too-few")])
    assert refused.exit_code == 1 and "--folds 5 needs at least 5 cases" in refused.output
    assert not (tmp_path / "too-few").exists()


# -- 10. the scope is in the address; the default dataset is stable ---------------------------------------------------------------


def test_friction_10_default_dataset_is_the_first_by_name_not_the_latest(monkeypatch: pytest.MonkeyPatch, two_datasets: str) -> None:
    at = app_test(monkeypatch, two_datasets)
    assert at.selectbox(key="scope_dataset").value == "alpha-v1"  # zeta was written last
    assert at.query_params["dataset"] == "alpha-v1" and at.query_params["protocol"] == "kfold"
    assert {"convention", "runs"} <= set(at.query_params)


def test_friction_10_an_address_reproduces_the_view(monkeypatch: pytest.MonkeyPatch, two_datasets: str) -> None:
    shared = app_test(monkeypatch, two_datasets, "cases", dataset="alpha", protocol="loso", submission="model-001 1")  # a name works too
    assert shared.selectbox(key="scope_dataset").value == "alpha-v1" and shared.radio(key="scope_protocol").value == "loso"
    assert shared.selectbox(key="submission").value == "model-001 1"
    # The user's own change goes into the address and is not undone by the address of the last run.
    shared.radio(key="scope_protocol").set_value("kfold").run()
    assert shared.radio(key="scope_protocol").value == "kfold" and shared.query_params["protocol"] == "kfold"
    assert shared.query_params["submission"] == "model-001 1"


# -- 11. the Cases page opens on the best submission --------------------------------------------------------------------------------


def test_friction_11_cases_page_opens_on_the_best_submission(monkeypatch: pytest.MonkeyPatch, two_datasets: str) -> None:
    at = app_test(monkeypatch, two_datasets, "cases")
    options = at.selectbox(key="submission").options
    assert at.selectbox(key="submission").value == "model-002 1" == options[0]  # best on dice, last by name
    assert options == ["model-002 1", "model-001 1", "model-000 1"]


# -- 12. one colour per submission, in every view of the app and in the report ------------------------------------------------------


def _trace_colours(spec: dict) -> dict[str, str]:
    colours = {}
    for trace in spec["data"]:
        colour = trace.get("marker", {}).get("color")
        if isinstance(colour, list):  # the forest plot: one trace, one colour per point
            colours.update(zip(trace["y"], colour))
        elif colour is not None and trace.get("name"):
            colours[trace["name"]] = colour
    return colours


def test_friction_12_submission_colours_are_the_same_everywhere(monkeypatch: pytest.MonkeyPatch, two_datasets: str, tmp_path: Path) -> None:
    labels = ["model-000 1", "model-001 1", "model-002 1"]
    expected = submission_colours(labels)
    assert len(set(expected.values())) == 3 and submission_colours(reversed(labels)) == expected
    board = app_test(monkeypatch, two_datasets)
    compare = app_test(monkeypatch, two_datasets, "compare")
    for at in (board, compare):
        spec = json.loads(at.get("plotly_chart")[0].proto.spec)
        assert _trace_colours(spec) == expected
    page = write_report(Store(two_datasets), tmp_path / "report.html", dataset="alpha", protocol="kfold", n_boot=20).read_text(encoding="utf-8")
    boxes = [json.loads(m) for m in re.findall(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*\{', page)]
    assert boxes and all(expected[t["name"]] == t["marker"]["color"] for traces in boxes for t in traces if t.get("type") == "box")


# -- 13. no remote asset: the page icon is local --------------------------------------------------------------------------------------


def test_friction_13_page_icon_is_drawn_locally(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import streamlit
    from streamlit.commands.page_config import _get_favicon_string

    given: dict = {}
    original = streamlit.set_page_config

    def recording(**kwargs):
        given.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(streamlit, "set_page_config", recording)
    app_test(monkeypatch, f"sqlite:///{(tmp_path / 'empty.db').as_posix()}")
    # Streamlit turns an emoji into an inline SVG in the browser; a ":material/..." icon is fetched from
    # fonts.gstatic.com, which fails offline (tests/test_browser.py checks the browser's requests).
    assert _get_favicon_string(given["page_icon"]).startswith("emoji:")


def test_friction_13_app_code_names_no_remote_host() -> None:
    sources = [APP, *sorted((REPO / "bench" / "app").rglob("*.py"))]
    local = re.compile(r"https?://(127\.0\.0\.1|localhost)[:/\"{]")
    remote = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if re.search(r"https?://", line) and not local.search(line)
    ]
    assert remote == []
    assert "page_icon=\":material" not in (REPO / "bench" / "app" / "ui.py").read_text(encoding="utf-8")
