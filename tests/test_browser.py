"""The app in a real browser: Debian's headless Chromium driven by Playwright against `streamlit run app.py`.

Opens the leaderboard, goes to Cases, selects a case by clicking a row of the case table, checks that
the slice viewer shows that case (ADC and Z-ADC), steps to the next error, and saves screenshots in the
test's folder. It also checks that the scope and the case are in the address and that the browser
fetched nothing from another host (the page icon included: the app must work offline). With ``HIE_BENCH_SCREENSHOTS=<folder>`` they are also copied there (the docs use
``python -m bench.app.browser`` on the demo database instead, see docs/app.md).

No browser is downloaded: the test uses ``/usr/bin/chromium`` (``make system-deps`` installs it with
apt-get) and is skipped, saying so, when it is absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench.app.browser import CHROMIUM, streamlit_server, tour
from bench.perf.fill import SampleResults, sample_results

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"needs Debian's chromium at {CHROMIUM} (make system-deps installs it with apt-get)"),
]


@pytest.fixture(scope="session")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleResults:
    return sample_results(tmp_path_factory.getbasetemp() / "hie-bench-app-sample")


def test_leaderboard_case_selection_and_viewer(sample: SampleResults, tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api")
    with streamlit_server(sample.db_url, results_dir=tmp_path / "results", log_path=tmp_path / "streamlit.log") as url:
        report = tour(url, tmp_path / "screenshots", submission="shifted-reference 1.0.0", case_row=2, profile_dir=tmp_path / "profile")

    assert report.selected_case.startswith(("SiteA_", "SiteB_")), report.selected_case
    assert report.viewer_images == 2, "the viewer shows ADC and Z-ADC"
    assert [caption.split(" · ")[0] for caption in report.image_captions] == ["ADC", "Z-ADC"]
    case_id = report.selected_case.split(" ")[0]
    assert f"case={case_id}" in report.url, "the selected case is in the address, so the view can be shared"
    assert "submission=shifted-reference" in report.url and "protocol=" in report.url and "dataset=" in report.leaderboard_url
    assert report.favicon.startswith("data:"), report.favicon  # an emoji drawn by the browser, not a font server's SVG
    hosts = {urlsplit(request).hostname for request in report.requests if urlsplit(request).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, sorted(hosts)
    for name in ("leaderboard", "cases"):
        assert report.screenshots[name].stat().st_size > 20_000, name
    if target := os.environ.get("HIE_BENCH_SCREENSHOTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        for path in report.screenshots.values():
            shutil.copy(path, Path(target) / path.name)
