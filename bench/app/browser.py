"""Drive the app in a real browser: Debian's headless Chromium through Playwright.

Used by ``tests/test_browser.py`` and to refresh the screenshots of the docs::

    python -m bench.app.browser --db results/demo/bench.db --out docs/img --all-pages

:func:`streamlit_server` starts ``streamlit run app.py`` on a free port; :func:`tour` opens the
leaderboard, goes to Cases, picks a submission, clicks a row of the case table, checks that the viewer
shows the case, steps to the next error and saves screenshots. The browser is the system's
``/usr/bin/chromium`` (``apt-get install chromium``): nothing is downloaded, ``playwright install`` is
never needed.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

#: Debian's Chromium.
CHROMIUM = Path("/usr/bin/chromium")
#: Flags for a quiet, sandbox-free headless Chromium in a container (no network chatter, no updates).
CHROMIUM_ARGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
REPO = Path(__file__).resolve().parents[2]
#: Pixel height of a table row in Streamlit's data grid (the header is one row).
_GRID_ROW_PX = 35


@dataclass
class TourReport:
    """What :func:`tour` saw."""

    screenshots: dict[str, Path] = field(default_factory=dict)
    selected_case: str = ""
    viewer_images: int = 0
    image_captions: list[str] = field(default_factory=list)
    url: str = ""
    #: Address of the leaderboard after it loaded (the scope is in it).
    leaderboard_url: str = ""
    #: Every URL the browser requested (the app must need no other host).
    requests: list[str] = field(default_factory=list)
    #: ``href`` of the page's icon link, as the browser resolved it.
    favicon: str = ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def streamlit_server(db_url: str, *, results_dir: str | Path, log_path: str | Path, timeout_s: float = 45.0) -> Iterator[str]:
    """Run ``streamlit run app.py`` (headless, free port) on ``db_url``; yields the app's URL, stops it after."""
    port = free_port()
    env = os.environ | {"HIE_BENCH_DB_URL": db_url, "HIE_BENCH_RESULTS_DIR": str(results_dir)}
    command = [
        sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"),
        "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while not _healthy(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not start; its log:\n{Path(log_path).read_text()[-3000:]}")
                time.sleep(0.3)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.read().strip() == b"ok"
    except OSError:
        return False


def tour(
    url: str,
    out_dir: str | Path,
    *,
    submission: str | None = None,
    case_row: int = 2,
    extra_pages: Sequence[tuple[str, str]] = (),
    profile_dir: str | Path | None = None,
    viewport: tuple[int, int] = (1400, 1100),
) -> TourReport:
    """Leaderboard, then Cases: pick ``submission``, click row ``case_row`` of the case table, step to
    the next error; screenshot ``app_leaderboard.png`` and ``app_cases.png`` (and ``app_<page>.png``
    for each ``(url path, heading)`` of ``extra_pages``) into ``out_dir``."""
    from playwright.sync_api import sync_playwright

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = Path(profile_dir) if profile_dir else out_dir / ".chromium-profile"
    report = TourReport()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=list(CHROMIUM_ARGS),
            viewport={"width": viewport[0], "height": viewport[1]},
            device_scale_factor=1,
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.on("request", lambda request: report.requests.append(request.url))

            page.goto(url)  # the leaderboard is the default page, at the root
            page.get_by_role("heading", name="Leaderboard").wait_for()
            page.locator('[data-testid="stDataFrame"]').first.wait_for()
            page.get_by_text("is better.").first.wait_for()
            _settle(page)
            report.leaderboard_url = page.url
            report.favicon = page.evaluate("() => document.querySelector(\"link[rel*='icon']\")?.href ?? ''")
            report.screenshots["leaderboard"] = _screenshot(page, out_dir, "leaderboard")

            page.get_by_role("link", name="Cases").click()
            page.get_by_role("heading", name="Slice viewer").wait_for()
            _settle(page)
            if submission:
                page.get_by_role("combobox", name="Submission", exact=True).click()
                page.get_by_role("option", name=submission, exact=True).click()
                _settle(page)
            grid = page.locator('[data-testid="stDataFrame"]').first
            grid.scroll_into_view_if_needed()
            box = grid.bounding_box()
            if box is None:
                raise RuntimeError("the case table is not visible")
            # The first column of a selectable grid holds the row checkboxes; row 0 is the header.
            page.mouse.click(box["x"] + 14, box["y"] + _GRID_ROW_PX * (case_row + 1.5))
            _settle(page)
            report.selected_case = page.get_by_role("combobox", name="Case", exact=True).input_value().strip()
            page.locator('[data-testid="stImage"] img').first.wait_for()
            report.viewer_images = page.locator('[data-testid="stImage"] img').count()
            report.image_captions = page.locator('[data-testid="stImage"]').all_inner_texts()
            page.get_by_role("button", name="error ▶").click()
            _settle(page)
            page.locator('[data-testid="stImage"]').first.scroll_into_view_if_needed()
            report.url = page.url
            report.screenshots["cases"] = _screenshot(page, out_dir, "cases")

            for path, heading in extra_pages:
                page.goto(f"{url}/{path}")
                page.get_by_role("heading", name=heading).wait_for()
                _settle(page)
                report.screenshots[path] = _screenshot(page, out_dir, path)
        finally:
            browser.close()
    return report


def _settle(page) -> None:
    """Wait until Streamlit has finished running the script (its status widget is gone) and drawn."""
    page.wait_for_timeout(300)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=30_000)
    page.wait_for_timeout(400)


def _screenshot(page, out_dir: Path, name: str) -> Path:
    path = out_dir / f"app_{name}.png"
    page.screenshot(path=str(path))
    return path


#: Pages besides the leaderboard and cases shown in the docs: (url path, heading).
DOC_PAGES: tuple[tuple[str, str], ...] = (("compare", "Compare submissions"), ("datasets", "Datasets"), ("submit", "Submit a model"))


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - a maintenance script
    parser = argparse.ArgumentParser(description="Screenshots of the HIE-Bench app in headless Chromium.")
    parser.add_argument("--db", required=True, help="Results database (URL or SQLite file).")
    parser.add_argument("--out", default="docs/img", help="Folder for app_*.png.")
    parser.add_argument("--submission", default=None, help="Submission label to open on the Cases page.")
    parser.add_argument("--case-row", type=int, default=2, help="Row of the case table to click (0 = worst case).")
    parser.add_argument("--all-pages", action="store_true", help="Also Compare, Datasets and Submit.")
    args = parser.parse_args(argv)
    from bench.app.source import database_url

    import tempfile

    out = Path(args.out)
    scratch = Path(tempfile.mkdtemp(prefix="hie-bench-screenshots-"))
    with streamlit_server(database_url(args.db), results_dir=scratch / "results", log_path=scratch / "streamlit.log") as url:
        report = tour(url, out, submission=args.submission, case_row=args.case_row, extra_pages=DOC_PAGES if args.all_pages else (), profile_dir=scratch / "profile")
    for name, path in report.screenshots.items():
        print(f"{name}: {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
