"""The web app: its data layer on a real (small) results database, the viewer, uploads, and every page
rendered with Streamlit's AppTest.

The database comes from :func:`bench.perf.fill.sample_results`: a tiny synthetic dataset benchmarked
by the harness with the zadc-threshold submission and two ``predictions`` submissions, under k-fold and
leave-one-site-out. It is built once per test session (about 20 s) and shared with the browser test.
"""

from __future__ import annotations

import io
import math
import stat
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.app import queries, uploads, viewer
from bench.perf.fill import SampleResults, sample_results
from bench.app.source import database_url, resolve_source
from bench.settings import BenchSettings
from bench.store import Store

APP = Path(__file__).resolve().parents[1] / "app.py"
PAGES = "bench/app/pages"


@pytest.fixture(scope="session")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleResults:
    return sample_results(tmp_path_factory.getbasetemp() / "hie-bench-app-sample")


@pytest.fixture(scope="session")
def store(sample: SampleResults) -> Store:
    return Store(sample.db_url)


@pytest.fixture(scope="session")
def scope(store: Store) -> tuple[str, str]:
    """(dataset version, convention) of the sample."""
    row = queries.scopes(store).iloc[0]
    return row["dataset_version"], row["convention"]


def app_test(monkeypatch: pytest.MonkeyPatch, db_url: str, page: str | None = None, **query: str):
    """An AppTest of app.py on ``db_url``, started on ``page`` (a file in bench/app/pages)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("HIE_BENCH_DB_URL", db_url)
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params.update(query)
    if page:
        at.switch_page(f"{PAGES}/{page}.py")
    return at.run()


def copy_database(sample: SampleResults, target: Path) -> Path:
    """A private copy of the sample database (SQLite's backup API: the WAL journal is included)."""
    import sqlite3

    with sqlite3.connect(sample.db_url.removeprefix("sqlite:///")) as source, sqlite3.connect(target) as copy:
        source.backup(copy)
    return target


def shown_table(at, *columns: str) -> pd.DataFrame:
    """The first table on the page with these columns (AppTest keys only selectable tables)."""
    for frame in at.dataframe:
        value = frame.value
        if set(columns) <= set(value.columns):
            return value
    raise AssertionError(f"no table with columns {columns}; tables: {[list(f.value.columns) for f in at.dataframe]}")


def assert_clean(at) -> None:
    """No exception on the page (AppTest records them as elements instead of raising)."""
    assert not at.exception, "\n".join(e.value + "\n" + "\n".join(e.stack_trace) for e in at.exception)


# -- where the data comes from ----------------------------------------------------------------------------------


def test_source_defaults_to_the_settings(tmp_path: Path) -> None:
    settings = BenchSettings(results_dir=tmp_path)
    source = resolve_source({}, [], settings)
    assert source.db_url == f"sqlite:///{tmp_path.as_posix()}/bench.db"
    assert not source.overridden
    assert source.uploads_dir == tmp_path / "submissions"


def test_source_db_from_argv_then_query_parameter(tmp_path: Path) -> None:
    settings = BenchSettings(results_dir=tmp_path)
    from_argv = resolve_source({}, ["--db", "other/bench.db", "--unrelated"], settings)
    assert from_argv.db_url == "sqlite:///other/bench.db" and from_argv.overridden
    both = resolve_source({"db": ["sqlite:///first.db", "postgresql+psycopg://u:secret@h/db"]}, ["--db", "x.db"], settings)
    assert both.db_url == "postgresql+psycopg://u:secret@h/db"
    assert "secret" not in both.display_url
    assert database_url(" results/demo/bench.db ") == "sqlite:///results/demo/bench.db"


# -- queries --------------------------------------------------------------------------------------------------------


def test_scopes_list_both_protocols(store: Store) -> None:
    table = queries.scopes(store)
    assert set(table["protocol"]) == {"kfold", "loso"}
    assert (table["n_submissions"] == 3).all()
    assert queries.data_version(store) == queries.data_version(store) != queries.EMPTY_VERSION


def test_leaderboard_equals_the_cli_table(store: Store, scope: tuple[str, str]) -> None:
    """The app shows exactly the numbers of `bench leaderboard` (same store rows, same statistics)."""
    from bench.report import leaderboard_table

    version, convention = scope
    metrics = ["dice", "hd95"]
    frame = queries.case_frame(store, version, "loso", convention, metrics)
    board = queries.leaderboard(frame, metrics, n_boot=200)
    cli = leaderboard_table(store, metrics=metrics, dataset=version, protocol="loso", n_boot=200)
    columns = ["rank", "submission", "n_cases", "n_failed", "dice", "dice_lo", "dice_hi", "hd95", "rank_stability"]
    pd.testing.assert_frame_equal(board[columns].reset_index(drop=True), cli[columns].reset_index(drop=True), check_dtype=False)
    assert board["submission_hash"].str.len().eq(64).all()


def test_site_view_bootstraps_within_the_site(store: Store, scope: tuple[str, str]) -> None:
    version, convention = scope
    frame = queries.case_frame(store, version, "loso", convention, ["dice"])
    site = sorted(frame["site"].astype(str).unique())[0]
    board = queries.leaderboard(frame, ["dice"], site=site, n_boot=100)
    assert (board["n_cases"] == (frame["site"].astype(str) == site).groupby(frame["submission"].astype(str)).sum().max()).all()
    summary = queries.site_summary(frame, "dice", n_boot=100)
    overall = summary[summary["site"] == "overall"].set_index("submission")["mean"]
    full = queries.leaderboard(frame, ["dice"], n_boot=100).set_index("submission")["dice"]
    pd.testing.assert_series_equal(overall.sort_index(), full.sort_index(), check_names=False)


def test_scored_values_give_failed_cases_the_worst_value(store: Store, scope: tuple[str, str]) -> None:
    version, convention = scope
    frame = queries.case_frame(store, version, "loso", convention, ["dice", "hd95"])
    dice = queries.scored_values(frame, "dice")
    failed = dice[dice["state"] == "failed"]
    assert len(failed) == 1 and failed["value"].iloc[0] == 0.0  # largest-lesion has no mask for one case
    hd95 = queries.scored_values(frame, "hd95")
    assert (hd95.loc[hd95["state"] == "capped", "value"] == 350.0).all() and (hd95["state"] == "capped").any()
    paired = queries.paired_values(frame, "dice", "zadc-threshold 1.0.0", "shifted-reference 1.0.0")
    assert len(paired) == 8 and list(paired.columns) == ["case_id", "site", "first", "second"]


def test_best_run_choice_keeps_the_better_rerun(tmp_path: Path) -> None:
    """Two runs of one submission (e.g. a new code version): 'latest' keeps the newer, 'best' the better."""
    from types import SimpleNamespace

    store = Store(tmp_path / "bench.db")
    store.create_all()
    cases = [SimpleNamespace(case_id=f"c{i}", site="A" if i < 3 else "B", metadata={}) for i in range(6)]
    store.upsert_dataset(SimpleNamespace(name="d", version="v1", root="", channel_names=("ADC", "Z-ADC"), cases=cases))
    store.upsert_submission(content_hash="h1", name="model", version="1")
    store.upsert_submission(content_hash="h2", name="other", version="1")
    for run_id, submission, code, dice in (("old", "h1", "a", 0.8), ("new", "h1", "b", 0.5), ("o", "h2", "a", 0.6)):
        store.start_run(run_id=run_id, submission=submission, dataset="v1", protocol="loso", code_version=code)
        store.record_case_results([{"run_id": run_id, "case_id": c.case_id, "site": c.site, "status": "ok", "dice": dice} for c in cases])
        store.finish_run(run_id)
    latest = queries.case_frame(store, "v1", "loso", "bench", ["dice"], run_choice="latest")
    best = queries.case_frame(store, "v1", "loso", "bench", ["dice"], run_choice="best")
    assert set(latest["run_id"]) == {"new", "o"}
    assert set(best["run_id"]) == {"old", "o"}
    assert queries.leaderboard(best, ["dice"], n_boot=50)["submission"].iloc[0] == "model 1"
    with pytest.raises(ValueError, match="run choice"):
        queries.case_frame(store, "v1", "loso", "bench", ["dice"], run_choice="random")  # type: ignore[arg-type]


def test_data_version_changes_with_new_results(tmp_path: Path, sample: SampleResults) -> None:
    store = Store(copy_database(sample, tmp_path / "bench.db"))
    before = queries.data_version(store)
    run_id = store.runs_frame()["run_id"].iloc[0]
    store.record_case_result({"run_id": run_id, "case_id": "extra-case", "site": "SiteA", "status": "ok", "dice": 0.5})
    assert queries.data_version(store) != before
    assert queries.data_version(Store(tmp_path / "missing.db")) == queries.EMPTY_VERSION


def test_case_table_lesions_and_hard_cases(store: Store, scope: tuple[str, str]) -> None:
    version, convention = scope
    frame = queries.case_frame(store, version, "loso", convention, ["dice", "lesion_f1"])
    cases = queries.dataset_cases(store, version)
    table = queries.case_table(frame, "shifted-reference 1.0.0", cases, ["dice", "lesion_f1"])
    assert len(table) == 8 and table["pattern"].notna().all() and {"prediction_path", "run_id"} <= set(table.columns)
    row = table.iloc[0]
    lesions = queries.case_lesions(store, row["run_id"], row["case_id"])
    assert set(lesions["kind"]) <= {"reference", "predicted"}
    assert set(lesions["outcome"]) <= {"detected", "missed", "matched", "false positive"}
    assert (lesions.loc[lesions["kind"] == "reference", "detected"] == (lesions["outcome"] == "detected")[lesions["kind"] == "reference"]).all()
    hard = queries.failed_by_all(frame, "dice", threshold=1.01)  # every case fails a threshold above the range
    assert len(hard) == 8
    assert queries.failed_by_all(frame, "dice", threshold=0.0).empty


def test_submission_card_and_dataset_geometry(store: Store, sample: SampleResults) -> None:
    subs = store.table_frame("submissions")
    content_hash = subs.loc[subs["name"] == "shifted-reference", "content_hash"].iloc[0]
    card = queries.submission_card(store, content_hash[:8])
    assert card is not None and card.name == "shifted-reference" and card.kind == "predictions"
    assert card.readme and "shifted-reference" in card.readme
    assert len(card.runs) == 2
    assert queries.submission_card(store, "no-such-submission") is None
    geometry = queries.dataset_geometry(sample.dataset)
    assert len(geometry) == 8 and (geometry["spacing_z"] > geometry["spacing_y"]).all()  # thick slices, array order


# -- viewer -----------------------------------------------------------------------------------------------------------


def test_error_map_and_overlay_colours() -> None:
    reference = np.zeros((1, 4, 4), bool)
    prediction = np.zeros((1, 4, 4), bool)
    reference[0, 0, :2] = True
    prediction[0, 0, 1:3] = True
    errors = viewer.error_map(reference, prediction)
    assert errors[0, 0].tolist() == [viewer.FALSE_NEGATIVE, viewer.TRUE_POSITIVE, viewer.FALSE_POSITIVE, viewer.BACKGROUND]
    image = np.full((4, 4), 5.0, np.float32)
    rgb = viewer.render_slice(image, errors[0], window=(0.0, 10.0), alpha=1.0, height=4)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    colours = {key: value[1] for key, value in viewer.OVERLAY_CLASSES.items()}
    assert tuple(rgb[0, 0]) == colours["fn"] and tuple(rgb[0, 1]) == colours["tp"] and tuple(rgb[0, 2]) == colours["fp"]
    assert tuple(rgb[0, 3]) == (127, 127, 127)
    only_tp = viewer.render_slice(image, errors[0], window=(0.0, 10.0), alpha=1.0, height=4, show=("tp",))
    assert tuple(only_tp[0, 0]) == (127, 127, 127)
    outside = viewer.render_slice(image, None, window=(0.0, 10.0), foreground=np.zeros((4, 4), bool), height=4)
    assert not outside.any()


def test_render_keeps_the_physical_aspect_ratio() -> None:
    image = np.zeros((10, 20), np.float32)
    rgb = viewer.render_slice(image, window=(0.0, 1.0), pixel_mm=(2.0, 1.0), height=100)
    assert rgb.shape[0] / rgb.shape[1] == pytest.approx(1.0)  # 10 rows of 2 mm, 20 columns of 1 mm
    assert viewer.to_png(rgb).startswith(b"\x89PNG")
    assert viewer.montage([rgb, rgb[:50]], columns=2).shape[1] == 2 * rgb.shape[1] + 3 * 6


def test_focus_box_frames_every_lesion_and_error() -> None:
    errors = np.zeros((3, 100, 80), np.uint8)
    assert viewer.focus_box(errors) == (slice(0, 100), slice(0, 80))
    errors[0, 40:44, 30:32] = viewer.FALSE_NEGATIVE
    errors[2, 50, 60] = viewer.FALSE_POSITIVE
    rows, cols = viewer.focus_box(errors, min_size=24)
    assert rows.start <= 40 and rows.stop >= 51 and cols.start <= 30 and cols.stop >= 61
    assert rows.stop - rows.start >= 24 and cols.stop - cols.start < 80
    corner = np.zeros((1, 10, 10), np.uint8)
    corner[0, 0, 9] = viewer.TRUE_POSITIVE
    rows, cols = viewer.focus_box(corner)
    assert rows.start == 0 and cols.stop == 10  # clipped to the image


def test_slice_navigation() -> None:
    errors = np.zeros((6, 2, 2), np.uint8)
    errors[1, 0, 0] = viewer.FALSE_POSITIVE
    errors[4, 1, 1] = viewer.FALSE_NEGATIVE
    errors[3, 0, 1] = viewer.TRUE_POSITIVE
    assert viewer.slices_with(errors, (viewer.FALSE_POSITIVE, viewer.FALSE_NEGATIVE)).tolist() == [1, 4]
    assert viewer.step_to(1, [1, 4], +1) == 4 and viewer.step_to(4, [1, 4], +1) == 1  # wraps around
    assert viewer.step_to(0, [1, 4], -1) == 4 and viewer.step_to(2, [], +1) is None
    assert viewer.best_slice(errors) in (1, 3, 4) and viewer.best_slice(np.zeros((5, 2, 2), np.uint8)) == 2
    assert viewer.display_window(np.array([0.0, -3.0, 1.0, 2.0]), symmetric=True)[0] == -viewer.display_window(np.array([0.0, -3.0, 1.0, 2.0]), symmetric=True)[1]


def test_case_volumes_come_through_the_case_api(store: Store, sample: SampleResults, scope: tuple[str, str]) -> None:
    version, convention = scope
    frame = queries.case_frame(store, version, "loso", convention, ["dice"])
    row = frame[(frame["status"] == "ok") & (frame["submission"].astype(str) == "shifted-reference 1.0.0")].iloc[0]
    volumes = viewer.load_case_volumes(sample.dataset, row["case_id"], row["prediction_path"])
    assert list(volumes.channels) == ["ADC", "Z-ADC"] and volumes.prediction is not None
    errors = volumes.errors
    assert ((errors == viewer.TRUE_POSITIVE) | (errors == viewer.FALSE_NEGATIVE)).sum() == volumes.reference.sum()
    no_prediction = viewer.load_case_volumes(sample.dataset, row["case_id"], sample.root / "missing.nii.gz")
    assert no_prediction.prediction is None
    with pytest.raises(viewer.ViewerError, match="no case"):
        viewer.load_case_volumes(sample.dataset, "no-such-case", None)


def test_heat_overlays_colour_bars_and_the_zoomed_inset() -> None:
    image = np.full((20, 20), 5.0, np.float32)
    probability = np.zeros((20, 20), np.float32)
    probability[5, 5], probability[6, 6] = 1.0, 0.01  # a certain voxel, and one below the overlay's floor
    rgb = viewer.render_slice(image, window=(0.0, 10.0), alpha=1.0, height=20, heat=probability, heat_overlay="probability")
    assert tuple(rgb[5, 5]) == tuple(viewer.colour_table("inferno")[255]) and tuple(rgb[6, 6]) == (127, 127, 127)
    signed = np.zeros((20, 20), np.float32)
    signed[1, 1], signed[2, 2] = 2.0, -2.0
    low, high = viewer.heat_range_of(signed, "saliency")
    assert (low, high) == pytest.approx((-2.0, 2.0))
    diverging = viewer.render_slice(image, window=(0.0, 10.0), alpha=1.0, height=20, heat=signed, heat_overlay="saliency", heat_range=(low, high))
    assert tuple(diverging[0, 0]) == (127, 127, 127) and diverging[1, 1, 0] > diverging[1, 1, 2] and diverging[2, 2, 2] > diverging[2, 2, 0]
    bar = viewer.colourbar_html("uncertainty")
    assert "linear-gradient" in bar and "entropy [bits]" in bar
    full = viewer.render_slice(image, window=(0.0, 10.0), height=200)
    box = (slice(2, 6), slice(12, 18))
    crop = viewer.render_slice(image[box], window=(0.0, 10.0), height=90)
    composed = viewer.with_inset(full, crop, box, image.shape)
    assert composed.shape == full.shape and tuple(composed[20, 125]) == viewer.INSET_COLOUR  # the frame on the slice
    assert tuple(composed[-1, 0]) == viewer.INSET_COLOUR, "the inset goes to the corner farthest from the lesions"
    assert tuple(composed[100, 100]) == tuple(full[100, 100]), "the rest of the slice is untouched"


@pytest.fixture(scope="module")
def soft_db(sample: SampleResults, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The sample database plus a python submission that returns a probability map, run under loso."""
    from bench.harness import RunSpec, run_benchmark
    from bench.submissions.sandbox import sandbox_unavailable_reason

    root = tmp_path_factory.mktemp("soft")
    db = copy_database(sample, root / "bench.db")
    folder = root / "soft-zadc"
    folder.mkdir()
    (folder / "predict.py").write_text(
        "import numpy as np\n\n"
        "def predict(case):\n"
        "    adc, _ = case.load_channel('ADC')\n"
        "    zadc, _ = case.load_channel('Z-ADC')\n"
        "    p = np.where(adc > 0, 1 / (1 + np.exp(2 * (zadc + 2))), 0).astype(np.float32)\n"
        "    return {'mask': p > 0.5, 'probability': p}\n"
    )
    (folder / "submission.yaml").write_text(
        "name: soft-zadc\nversion: '1.0.0'\nauthors: [tests]\ndescription: Z-ADC threshold with a soft edge\nlicence: MIT\n"
        "kind: python\nentry: predict.py:predict\ninputs: {channels: [ADC, Z-ADC], space: native}\n"
    )
    url = f"sqlite:///{db}"
    run_benchmark([RunSpec(submission=folder, dataset=sample.dataset, protocol="loso", results_dir=root / "results", db_url=url,
                           sandbox=sandbox_unavailable_reason() is None)])
    return url


def test_cases_page_shows_probability_uncertainty_and_calibration(monkeypatch: pytest.MonkeyPatch, soft_db: str) -> None:
    at = app_test(monkeypatch, soft_db, "cases", protocol="loso")
    assert_clean(at)
    at.selectbox(key="submission").set_value("soft-zadc 1.0.0").run()
    assert_clean(at)
    assert len(at.get("image")) == 4, "ADC and Z-ADC with the errors, then the probability and the uncertainty"
    captions = [c.value for c in at.caption]
    assert any("Saliency not available for this submission" in c for c in captions)
    assert any(m.label.startswith("brier") and m.value != "not available" for m in at.metric)
    assert at.get("plotly_chart"), "the submission's reliability diagram"
    at.slider(key="overlay_opacity").set_value(0.9).run()
    at.toggle(key="viewer_zoom").set_value(False).run()
    assert_clean(at)
    table = at.dataframe(key="cases_table").value
    assert table["brier"].notna().all()

    at.selectbox(key="submission").set_value("zadc-threshold 1.0.0").run()
    assert_clean(at)
    assert len(at.get("image")) == 2
    captions = [c.value for c in at.caption]
    assert any("Probability and uncertainty: not available" in c for c in captions)
    assert any("Reliability diagram: not available" in c for c in captions)
    assert any(m.label.startswith("brier") and m.value == "not available" for m in at.metric)


def test_probability_board_and_reliability_from_the_app_queries(soft_db: str) -> None:
    from bench.report import leaderboard_table

    store = Store(soft_db)
    row = queries.scopes(store)
    row = row[row["protocol"] == "loso"].iloc[0]
    frame = queries.case_frame(store, row["dataset_version"], "loso", row["convention"], ["dice"], details=False)
    board = queries.probability_board(store, frame, n_boot=100).set_index("submission")
    cli = leaderboard_table(store, metrics=["dice"], dataset=row["dataset_version"], protocol="loso", n_boot=100).set_index("submission")
    assert board.loc["soft-zadc 1.0.0", "ece"] == pytest.approx(cli.loc["soft-zadc 1.0.0", "ece"])
    assert (board.drop("soft-zadc 1.0.0")["brier_n"] == 0).all()
    shown = queries.probability_display(board.reset_index()).set_index("Submission")
    assert shown.loc["zadc-threshold 1.0.0", "brier ↓"] == "not available" and shown.loc["soft-zadc 1.0.0", "ece ↓"].count("[") == 1
    diagram = queries.reliability(store, frame)
    assert set(diagram["submission"]) == {"soft-zadc 1.0.0"} and set(diagram["site"]) == {"overall", "SiteA", "SiteB"}


# -- uploads ------------------------------------------------------------------------------------------------------------


def _zip(members: dict[str, bytes], *, symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _prediction_masks(sample: SampleResults) -> dict[str, bytes]:
    folder = sample.submissions["shifted-reference"] / "predictions"
    return {f"my-masks/{path.name}": path.read_bytes() for path in sorted(folder.glob("*.nii.gz"))}


def test_zip_of_predictions_becomes_a_verified_submission(tmp_path: Path, sample: SampleResults) -> None:
    data = _zip(_prediction_masks(sample) | {"my-masks/notes.txt": b"ignored"})
    assert not uploads.has_manifest(data)
    refused = uploads.install_upload(data, "masks.zip", tmp_path)
    assert not refused.ok and "no submission.yaml" in refused.problems[0].message
    card = uploads.PredictionsCard(name="my-unet", authors=("A. Author",))
    result = uploads.install_upload(data, "masks.zip", tmp_path, predictions=card, dataset_root=sample.dataset)
    assert result.ok, result.problems
    assert result.kind == "predictions" and result.path == tmp_path / "my-unet"
    assert len(list((result.path / "predictions").glob("*.nii.gz"))) == 8
    again = uploads.install_upload(data, "masks.zip", tmp_path, predictions=card)
    assert not again.ok and "already exists" in again.problems[0].message
    assert uploads.install_upload(data, "masks.zip", tmp_path, predictions=card, replace=True).ok


def test_predictions_missing_a_case_fail_verification(tmp_path: Path, sample: SampleResults) -> None:
    masks = _prediction_masks(sample)
    masks.pop(sorted(masks)[0])
    result = uploads.install_upload(_zip(masks), "masks.zip", tmp_path, predictions=uploads.PredictionsCard(name="partial"), dataset_root=sample.dataset)
    assert result.path is None and not result.ok and result.name == "partial"
    assert any("no mask for 1 of 8" in p.message for p in result.problems)
    assert not (tmp_path / "partial").exists()  # a refused upload claims no name


@pytest.mark.parametrize(
    ("members", "symlinks", "expected"),
    [
        ({"../evil.nii.gz": b"x", "submission.yaml": b"name: x"}, (), "'..'"),
        ({"/abs/case.nii.gz": b"x"}, (), "absolute path"),
        ({"submission.yaml": b"name: x"}, ("link.nii.gz",), "symbolic link"),
    ],
)
def test_unsafe_archives_are_refused_before_anything_is_written(tmp_path: Path, members: dict, symlinks: tuple, expected: str) -> None:
    result = uploads.install_upload(_zip(members, symlinks=symlinks), "bad.zip", tmp_path, predictions=uploads.PredictionsCard(name="bad"))
    assert not result.ok and result.path is None
    assert any(expected in p.message for p in result.problems), result.problems
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []


def test_upload_limits(tmp_path: Path, sample: SampleResults) -> None:
    data = _zip(_prediction_masks(sample))
    card = uploads.PredictionsCard(name="big")
    assert "over the limit" in uploads.install_upload(data, "m.zip", tmp_path, predictions=card, limits=uploads.UploadLimits(max_upload_bytes=100)).problems[0].message
    too_many = uploads.install_upload(data, "m.zip", tmp_path, predictions=card, limits=uploads.UploadLimits(max_files=3))
    assert any("more than the limit of 3" in p.message for p in too_many.problems)
    assert "not a zip" in uploads.install_upload(b"not a zip", "m.zip", tmp_path).problems[0].message


def test_submission_folder_archive_and_queued_run(tmp_path: Path, sample: SampleResults) -> None:
    from bench.harness import RunSpec

    folder = sample.submissions["zadc-threshold"]
    data = _zip({f"zadc-threshold/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts})
    assert uploads.has_manifest(data)
    result = uploads.install_upload(data, "zadc.zip", tmp_path / "uploads")
    assert result.ok and result.kind == "python" and result.name == "zadc-threshold"
    store = Store(tmp_path / "queue.db")
    spec = uploads.run_spec(result.path, sample.dataset, db_url=store.url.render_as_string(), results_dir=tmp_path / "results", protocol="kfold", folds=2)
    job_id = uploads.queue_run(store, spec)
    job = store.get_job(job_id)
    assert job.status == "queued" and job.kind == "run"
    parsed = RunSpec.model_validate(job.spec)
    assert parsed.submission.is_absolute() and parsed.folds == 2 and parsed.protocol == "kfold"
    assert [j.id for j in uploads.jobs_table(store)] == [job_id]
    assert set(uploads.available_datasets(store, sample.dataset.parent).values()) == {sample.dataset.resolve()}


# -- pages (AppTest) --------------------------------------------------------------------------------------------------------


def test_every_page_says_how_to_get_results_when_the_database_is_empty(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"sqlite:///{(tmp_path / 'none' / 'bench.db').as_posix()}"
    for page in ("leaderboard", "compare", "cases", "datasets"):
        at = app_test(monkeypatch, url, page)
        assert_clean(at)
        assert any("No benchmark results yet" in info.value for info in at.info), page
        assert any("make demo" in md.value for md in at.markdown), page
    submit = app_test(monkeypatch, url, "submit")
    assert_clean(submit)
    assert submit.title[0].value == "Submit a model"
    assert not (tmp_path / "none" / "bench.db").exists()  # looking never creates a database


def test_leaderboard_page(monkeypatch: pytest.MonkeyPatch, store: Store, sample: SampleResults, scope: tuple[str, str]) -> None:
    from bench.report import leaderboard_table

    at = app_test(monkeypatch, sample.db_url)  # the default page
    assert_clean(at)
    assert at.title[0].value == "Leaderboard"
    table = shown_table(at, "Rank", "Card")
    assert table["Rank"].tolist() == [1, 2, 3] and len(table) == 3
    assert "dice ↑" in table.columns and "hd95 [mm] ↓" in table.columns
    assert table["Card"].str.startswith("./submission?id=").all()
    assert {"Training budget used", "Resolution"} <= set(table.columns), "as on the CLI leaderboard"
    expected = leaderboard_table(store, metrics=["dice"], dataset=scope[0], protocol=at.radio(key="scope_protocol").value)
    assert np.allclose(table["dice ↑"], expected["dice"])
    assert any("Higher is better" in caption.value for caption in at.caption)
    assert at.get("download_button")
    pairs = shown_table(at, "pair", "why tested")  # each rank against the next, as `bench leaderboard` prints them
    assert len(pairs) == 2 and set(pairs["why tested"]) == {"next rank"}
    assert any("Holm-corrected over the pairs shown" in caption.value for caption in at.caption)

    at.radio(key="scope_protocol").set_value("kfold").run()
    at.selectbox(key="board_metric").set_value("hd95").run()
    assert_clean(at)
    table = shown_table(at, "Rank", "Card")
    assert "hd95 [mm] ↓" in table.columns and table["hd95 [mm] ↓"].is_monotonic_increasing  # lower is better ranks first
    assert any("Lower is better" in caption.value for caption in at.caption)

    at.segmented_control(key="board_view").set_value("Per site").run()
    assert_clean(at)
    site = at.selectbox(key="board_site").value
    per_site = shown_table(at, "Rank", "Card")
    assert (per_site["Cases"] == 4).all(), site  # 4 cases per site in the sample
    at.toggle(key="board_blobs").set_value(True).run()
    assert_clean(at)
    at.radio(key="scope_runs").set_value("best").run()
    assert_clean(at)


def test_compare_page(monkeypatch: pytest.MonkeyPatch, sample: SampleResults) -> None:
    at = app_test(monkeypatch, sample.db_url, "compare")
    assert_clean(at)
    assert len(at.multiselect(key="compare_submissions").value) == 3
    tests = shown_table(at, "p_holm")
    assert len(tests) == 3 and {"p_holm", "significant", "relation"} <= set(tests.columns)
    assert (tests["relation"] == "").all(), "no transfer twins in the sample"
    gap = shown_table(at, "gap", "gap_lo")  # both protocols exist in the sample
    assert set(gap["site"]) == {"overall", "SiteA", "SiteB"}
    at.segmented_control(key="compare_plot").set_value("Strip").run()
    assert_clean(at)
    at.multiselect(key="compare_submissions").set_value(["zadc-threshold 1.0.0"]).run()
    assert_clean(at)
    assert any("at least two" in info.value for info in at.info)


def test_cases_page_names_a_missing_prediction_file(monkeypatch: pytest.MonkeyPatch, sample: SampleResults, tmp_path: Path) -> None:
    """Friction item 3: a prediction file that is not where the run stored it is named, with the reason."""
    import sqlite3

    import sqlalchemy as sa

    db = tmp_path / "copy.db"
    with sqlite3.connect(sample.db_url.removeprefix("sqlite:///")) as source, sqlite3.connect(db) as target:
        source.backup(target)  # the WAL's pages too
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        case_id = conn.execute(sa.text("SELECT case_id FROM case_results WHERE status = 'ok' ORDER BY case_id LIMIT 1")).scalar_one()
        conn.execute(sa.text("UPDATE case_results SET prediction_path = '/moved/elsewhere/pred.nii.gz' WHERE case_id = :c"), {"c": case_id})
    engine.dispose()
    at = app_test(monkeypatch, f"sqlite:///{db}", "cases")
    at.selectbox(key="case").set_value(case_id).run()
    assert_clean(at)
    assert any("/moved/elsewhere/pred.nii.gz" in i.value and "not on this machine" in i.value for i in at.info), [i.value for i in at.info]


def test_cases_page_table_selection_and_viewer(monkeypatch: pytest.MonkeyPatch, sample: SampleResults) -> None:
    at = app_test(monkeypatch, sample.db_url, "cases")
    assert_clean(at)
    at.selectbox(key="submission").set_value("shifted-reference 1.0.0").run()
    table = at.dataframe(key="cases_table").value
    assert len(table) == 8 and table["dice"].is_monotonic_increasing  # worst first
    # Select the best case in the table: the viewer opens it.
    at.session_state["cases_table"] = {"selection": {"rows": [7], "columns": [], "cells": []}}
    at.run()
    assert_clean(at)
    case_id = table["case_id"].iloc[7]
    assert at.selectbox(key="case").value == case_id
    images = at.get("image")
    assert len(images) == 2  # ADC and Z-ADC with the overlays
    slider_key = f"slice::{case_id}"
    first = at.slider(key=slider_key).value  # 1-based
    caption = next(c.value for c in at.caption if "slices with errors: " in c.value)
    error_slices = [int(z) for z in caption.split("slices with errors: ")[1].split(", ")] if "none" not in caption else []
    at.button(key="next_error").click().run()
    assert_clean(at)
    expected = viewer.step_to(first - 1, [z - 1 for z in error_slices], +1)
    assert at.slider(key=slider_key).value == (first if expected is None else expected + 1)
    lesions = at.dataframe(key="lesion_table").value
    assert set(lesions["kind"]) <= {"reference", "predicted"} and "outcome" in lesions.columns
    # Selecting a lesion jumps to its centroid slice.
    at.session_state["lesion_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert_clean(at)
    assert at.slider(key=slider_key).value == int(lesions["slice"].iloc[0])
    hard = next((d.value for d in at.dataframe if d.key == "hard_table"), None)
    assert (hard is not None and {"case_id", "best"} <= set(hard.columns)) or any("solved" in s.value for s in at.success)

    # A failed case: the reason is shown, the reference still is.
    at.selectbox(key="submission").set_value("largest-lesion 1.0.0").run()
    at.selectbox(key="case").set_value(at.dataframe(key="cases_table").value["case_id"].iloc[0]).run()
    assert_clean(at)
    assert any("This case failed" in error.value for error in at.error)
    assert any("prediction file" in info.value for info in at.info)


def test_submit_page_uploads_checks_and_queues(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sample: SampleResults) -> None:
    db = copy_database(sample, tmp_path / "bench.db")
    monkeypatch.setenv("HIE_BENCH_RESULTS_DIR", str(tmp_path / "results"))
    at = app_test(monkeypatch, f"sqlite:///{db.as_posix()}", "submit")
    assert_clean(at)
    assert at.button(key="check_upload").disabled
    at.file_uploader(key="upload").upload("masks.zip", _zip(_prediction_masks(sample)), "application/zip")
    at.run()
    assert_clean(at)
    at.text_input(key="card_name").set_value("browser-unet")
    at.text_input(key="card_authors").set_value("A. Author, B. Author")
    at.run()
    at.button(key="check_upload").click().run()
    assert_clean(at)
    assert any("passes the checks" in s.value for s in at.success), [e.value for e in at.error]
    assert (tmp_path / "results" / "submissions" / "browser-unet" / "submission.yaml").is_file()
    at.button(key="queue_run").click().run()
    assert_clean(at)
    assert any("is queued" in s.value for s in at.success)
    jobs = Store(db).list_jobs()
    assert len(jobs) == 1 and jobs[0].status == "queued" and jobs[0].spec["submission"].endswith("browser-unet")
    assert shown_table(at, "job", "status")["job"].tolist() == [jobs[0].id]

    # A refused archive shows every problem in a table.
    at.file_uploader(key="upload").set_value(("evil.zip", _zip({"../evil.nii.gz": b"x", "submission.yaml": b"name: e"}), "application/zip"))
    at.run()
    at.button(key="check_upload").click().run()
    assert_clean(at)
    assert any("refused" in error.value for error in at.error)
    assert "'..'" in " ".join(shown_table(at, "problem", "how to fix")["problem"])


def test_datasets_page(monkeypatch: pytest.MonkeyPatch, sample: SampleResults) -> None:
    at = app_test(monkeypatch, sample.db_url, "datasets")
    assert_clean(at)
    sites = shown_table(at, "site", "cases")
    assert sites["site"].tolist() == ["SiteA", "SiteB"] and sites["cases"].tolist() == [4, 4]
    assert {"in_plane_mm", "slice_mm"} <= set(sites.columns)
    assert len(at.get("image")) == 6  # 3 examples per site
    at.segmented_control(key="datasets_channel").set_value("Z-ADC").run()
    assert_clean(at)


def test_submission_card_page_from_a_link(monkeypatch: pytest.MonkeyPatch, store: Store, sample: SampleResults) -> None:
    subs = store.table_frame("submissions")
    content_hash = subs.loc[subs["name"] == "zadc-threshold", "content_hash"].iloc[0]
    at = app_test(monkeypatch, sample.db_url, "submission", id=content_hash)
    assert_clean(at)
    assert at.title[0].value == "zadc-threshold 1.0.0"
    assert len(shown_table(at, "run_id", "run_status")) == 2
    assert any("Z-ADC" in md.value for md in at.markdown)
    by_name = app_test(monkeypatch, sample.db_url, "submission", id="largest")  # a name prefix works too
    assert by_name.title[0].value == "largest-lesion 1.0.0"


def test_query_parameter_picks_the_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sample: SampleResults) -> None:
    monkeypatch.setenv("HIE_BENCH_DB_URL", f"sqlite:///{(tmp_path / 'empty.db').as_posix()}")
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["db"] = sample.db_url.removeprefix("sqlite:///")  # a plain path works like --db
    at.run()
    assert_clean(at)
    assert at.title[0].value == "Leaderboard" and len(shown_table(at, "Rank", "Card")) == 3
    assert any("from --db / ?db=" in caption.value for caption in at.caption)
    assert not math.isnan(shown_table(at, "Rank", "Card")["dice ↑"].iloc[0])


def test_the_submit_page_defaults_to_a_dataset_with_results_not_the_first_folder_by_name(store: Store, sample: SampleResults, tmp_path: Path) -> None:
    """Regression: after `make demo`, datasets/hie-synth-demo sorted first and the Submit page checked an
    upload against it instead of the dataset the results are about."""
    other = tmp_path / "aaa-first-by-name"
    other.mkdir()
    choices = {"aaa-first-by-name": other, "the sample": sample.dataset}
    assert uploads.default_dataset(choices, store) == 1
    assert uploads.default_dataset(choices, None) == 0 and uploads.default_dataset({}, store) == 0
