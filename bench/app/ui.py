"""Streamlit glue shared by the pages: navigation, the results source, cached queries, the sidebar.

Caching: every query goes through ``st.cache_data`` keyed by the database URL, a *data version*
(:func:`bench.app.queries.data_version`, re-read at most every few seconds) and the query's own
arguments. New results therefore show up on the next interaction, and repeated views of the same
table cost a dictionary lookup. The engine of each URL is one ``st.cache_resource``.

The address holds the view: the scope (``?dataset=&protocol=&convention=&runs=``, see
:data:`SCOPE_PARAMETERS`), the Cases page's ``submission`` and ``case``, and ``db`` when it was chosen
with ``?db=``. Copying the address reproduces what is on screen. Without a parameter the default is
stable: the first dataset by name (:func:`bench.app.queries.dataset_versions`), the first protocol,
and on the Cases page the submission ranked first.

Nothing the app shows comes from another host: the page icon is an emoji, drawn by the browser
(a ``:material/...:`` page icon would make the browser fetch its picture from a font server).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from bench.app import queries
from bench.app.source import DB_PARAMETER, AppSource, resolve_source

if TYPE_CHECKING:
    import pandas as pd

    from bench.store import Store

PAGES_DIR = Path(__file__).resolve().parent / "pages"
#: Session key of the ``--db`` arguments given to ``streamlit run app.py -- --db URL``.
_ARGV_KEY = "_hie_bench_argv"
#: Session key of a database chosen with ``?db=`` (kept while the user moves between pages).
_DB_KEY = "_hie_bench_db"
#: Seconds a data version is trusted before the database is asked again.
VERSION_TTL_S = 3
#: Bootstrap resamples of the confidence intervals shown (as ``bench leaderboard``).
N_BOOT = 1000
#: The browser tab's icon: an emoji, rendered locally (works offline).
PAGE_ICON = "🧠"
#: Query parameter -> widget key of the sidebar's scope (the widget keys are what pages and tests use).
SCOPE_PARAMETERS: dict[str, str] = {"dataset": "scope_dataset", "protocol": "scope_protocol", "convention": "scope_convention", "runs": "scope_runs"}
#: Widget key of the Leaderboard page's ranking metric (the Cases page orders submissions by it).
LEADERBOARD_METRIC_KEY = "board_metric"
#: Session key prefix of the value this session last wrote into the address, per query parameter.
_WRITTEN_KEY = "_hie_bench_url::"


@dataclass(frozen=True)
class Context:
    """What a page needs to read results: the source, its store and the current data version."""

    source: AppSource
    store: Store
    version: str

    @property
    def url(self) -> str:
        return self.source.db_url


# -- the app ---------------------------------------------------------------------------------------------------


def run_app(argv: Sequence[str] = ()) -> None:
    """Configure the page and run the selected page (called by ``app.py``).

    ``argv``: the arguments after ``--`` of ``streamlit run app.py -- --db URL``.
    """
    st.set_page_config(page_title="HIE-Bench", page_icon=PAGE_ICON, layout="wide")
    st.session_state[_ARGV_KEY] = list(argv)
    page = st.navigation(
        {
            "Results": [
                st.Page(PAGES_DIR / "leaderboard.py", title="Leaderboard", icon=":material/leaderboard:", url_path="leaderboard", default=True),
                st.Page(PAGES_DIR / "compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
                st.Page(PAGES_DIR / "cases.py", title="Cases", icon=":material/frame_inspect:", url_path="cases"),
            ],
            "Contribute": [
                st.Page(PAGES_DIR / "submit.py", title="Submit", icon=":material/upload:", url_path="submit"),
            ],
            "Data": [
                st.Page(PAGES_DIR / "datasets.py", title="Datasets", icon=":material/database:", url_path="datasets"),
                st.Page(PAGES_DIR / "submission.py", title="Submission card", icon=":material/badge:", url_path="submission", visibility="hidden"),
            ],
        }
    )
    page.run()


def current_source() -> AppSource:
    """The source of this session: settings, ``--db`` and a ``?db=`` seen on any page of the session."""
    given = st.query_params.get(DB_PARAMETER)
    if given:
        st.session_state[_DB_KEY] = given
    chosen = st.session_state.get(_DB_KEY)
    if chosen:
        write_to_url(DB_PARAMETER, chosen)  # a page switch drops it from the address; a copied link needs it
    return resolve_source({DB_PARAMETER: chosen} if chosen else {}, st.session_state.get(_ARGV_KEY, []))


def context(*, require_results: bool = True) -> Context:
    """The page's :class:`Context`; with ``require_results``, a page without results shows how to get
    some and stops here."""
    source = current_source()
    try:
        store = get_store(source.db_url)
        version = data_version(source.db_url)
    except Exception as exc:  # a wrong URL, an unreachable server: say so instead of a traceback
        st.error(f"Cannot open the results database `{source.display_url}`: {exc}")
        st.stop()
    if require_results and (version == queries.EMPTY_VERSION or scopes(source.db_url, version).empty):
        empty_state(source)
        st.stop()
    return Context(source, store, version)


def empty_state(source: AppSource) -> None:
    """The friendly page shown while the database holds no results yet."""
    st.title("HIE-Bench")
    st.info(f"No benchmark results yet in `{source.display_url}`.", icon=":material/hourglass_empty:")
    st.markdown(
        """
Results appear here as soon as a benchmark has run. From the repository root:

```bash
make demo                      # synthetic 4-site cohort + the shipped baselines (a few minutes, CPU)
make app                       # this app on the demo's results (results/demo/bench.db)
```

or benchmark your own submission and point the app at its database:

```bash
bench run submissions/zadc-threshold --dataset datasets/hie-synth-demo --protocol loso
HIE_BENCH_DB_URL=sqlite:///results/bench.db streamlit run app.py    # or: streamlit run app.py -- --db results/bench.db
```

You can also upload a submission on the **Submit** page and start `bench worker` beside the app.
"""
    )


# -- cached queries ------------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def get_store(url: str) -> Store:
    """One :class:`~bench.store.Store` (engine and connection pool) per database URL, shared by sessions."""
    from bench.store import Store

    return Store(url)


@st.cache_data(ttl=VERSION_TTL_S, max_entries=16, show_spinner=False)
def data_version(url: str) -> str:
    """The results' fingerprint, re-read at most every few seconds (the key of every other cache)."""
    return queries.data_version(get_store(url))


@st.cache_data(max_entries=16, show_spinner=False)
def scopes(url: str, version: str) -> pd.DataFrame:
    return queries.scopes(get_store(url))


@st.cache_resource(max_entries=12, show_spinner="Reading results…")
def case_frame(url: str, version: str, scope: tuple[str, str | None, str], metrics: tuple[str, ...], run_choice: str, details: bool = True) -> pd.DataFrame:
    """Per-case rows of ``scope`` = (dataset version, protocol or ``None`` for both, convention).

    A shared resource, not a copy per call (100,000 rows would cost a pickle round trip on every
    use): callers must not modify it (every function of :mod:`bench.app.queries` returns new frames).
    """
    dataset_version, protocol, convention = scope
    return queries.case_frame(get_store(url), dataset_version, protocol, convention, metrics, run_choice=run_choice, details=details)  # type: ignore[arg-type]


@st.cache_data(max_entries=64, show_spinner="Bootstrapping confidence intervals…")
def leaderboard(url: str, version: str, scope: tuple[str, str, str], metrics: tuple[str, ...], run_choice: str, site: str | None, n_boot: int = N_BOOT) -> pd.DataFrame:
    frame = case_frame(url, version, scope, metrics, run_choice, details=False)
    return queries.with_run_columns(get_store(url), frame, queries.leaderboard(frame, metrics, site=site, n_boot=n_boot))


@st.cache_data(max_entries=64, show_spinner=False)
def paired_tests(url: str, version: str, scope: tuple[str, str, str], metrics: tuple[str, ...], run_choice: str, site: str | None) -> pd.DataFrame:
    """The paired tests under the leaderboard of these arguments (:func:`bench.app.queries.paired_tests`)."""
    frame = case_frame(url, version, scope, metrics, run_choice, details=False)
    return queries.paired_tests(get_store(url), frame, leaderboard(url, version, scope, metrics, run_choice, site), metrics[0], site=site)


@st.cache_data(max_entries=64, show_spinner=False)
def probability_board(url: str, version: str, scope: tuple[str, str, str], run_choice: str, site: str | None, n_boot: int = N_BOOT) -> pd.DataFrame:
    """Brier, ECE and the uncertainty AUROCs per submission ("not available" without probabilities)."""
    frame = case_frame(url, version, scope, ("dice",), run_choice, details=False)
    return queries.probability_board(get_store(url), frame, site=site, n_boot=n_boot)


@st.cache_data(max_entries=32, show_spinner=False)
def reliability(url: str, version: str, scope: tuple[str, str, str], run_choice: str) -> pd.DataFrame:
    """Pooled reliability-diagram rows per submission and site."""
    return queries.reliability(get_store(url), case_frame(url, version, scope, ("dice",), run_choice, details=False))


@st.cache_data(max_entries=32, show_spinner=False)
def ranked_submissions(url: str, version: str, scope: tuple[str, str, str], metric: str, run_choice: str) -> list[str]:
    """Submission labels of the scope, best first on ``metric`` (the leaderboard's order)."""
    return queries.ranked_submissions(case_frame(url, version, scope, (metric,), run_choice, details=False), metric)


@st.cache_data(max_entries=32, show_spinner=False)
def site_summary(url: str, version: str, scope: tuple[str, str, str], metric: str, run_choice: str, n_boot: int = N_BOOT) -> pd.DataFrame:
    return queries.site_summary(case_frame(url, version, scope, (metric,), run_choice, details=False), metric, n_boot=n_boot)


@st.cache_data(max_entries=32, show_spinner=False)
def rank_distribution(url: str, version: str, scope: tuple[str, str, str], metric: str, run_choice: str, site: str | None, n_boot: int = N_BOOT) -> pd.DataFrame:
    frame = case_frame(url, version, scope, (metric,), run_choice, details=False)
    if site is not None:
        frame = frame[frame["site"].astype(str) == site]
    return queries.rank_distribution(frame, metric, n_boot=n_boot)


@st.cache_data(max_entries=16, show_spinner=False)
def dataset_cases(url: str, version: str, dataset_version: str) -> pd.DataFrame:
    return queries.dataset_cases(get_store(url), dataset_version)


@st.cache_data(max_entries=16, show_spinner=False)
def datasets(url: str, version: str) -> pd.DataFrame:
    return queries.datasets(get_store(url))


@st.cache_data(max_entries=64, show_spinner=False)
def case_lesions(url: str, version: str, run_id: str, case_id: str) -> pd.DataFrame:
    return queries.case_lesions(get_store(url), run_id, case_id)


@st.cache_data(max_entries=8, show_spinner="Reading image headers…")
def dataset_geometry(root: str) -> pd.DataFrame:
    return queries.dataset_geometry(root)


def dataset_root(ctx: Context, dataset_version: str) -> Path | None:
    table = datasets(ctx.url, ctx.version)
    for root in table.loc[table["version"] == dataset_version, "root"].dropna():
        if root and Path(root).is_dir():
            return Path(root)
    return None


# -- widgets -----------------------------------------------------------------------------------------------------------


def scope_sidebar(ctx: Context, *, choose_protocol: bool = True) -> tuple[str, str, str]:
    """The sidebar: dataset, protocol (k-fold / leave-one-site-out), convention and which run counts.

    Returns the scope as (dataset version, protocol, convention). Values persist across pages for the
    whole session and are written into the address (:data:`SCOPE_PARAMETERS`); an address holding
    other values (a shared link) sets them.
    """
    table = scopes(ctx.url, ctx.version)
    with st.sidebar:
        st.markdown("**Scope**")
        dataset_version = _dataset_picker(table)
        here = table[table["dataset_version"] == dataset_version]
        known = list(queries.PROTOCOL_LABELS)
        protocols = sorted(set(here["protocol"]), key=lambda p: (known.index(p) if p in known else len(known), p))
        url_choice("protocol", protocols)
        if choose_protocol:
            protocol = st.radio(
                "Protocol",
                protocols,
                format_func=lambda p: queries.PROTOCOL_LABELS.get(p, p),
                key="scope_protocol",
                persist_state="session",
                help="k-fold: every site is seen in training. Leave-one-site-out: each site is tested by a model that never saw it.",
            )
        else:
            protocol = st.session_state.get("scope_protocol") if st.session_state.get("scope_protocol") in protocols else protocols[0]
        write_to_url("protocol", protocol)
        conventions = sorted(set(here.loc[here["protocol"] == protocol, "convention"]))
        url_choice("convention", conventions)
        convention = (
            st.selectbox("Metric convention", conventions, key="scope_convention", persist_state="session")
            if len(conventions) > 1
            else conventions[0]
        )
        write_to_url("convention", convention)
        url_choice("runs", queries.RUN_CHOICES)
        choice = st.radio(
            "Run of each submission",
            queries.RUN_CHOICES,
            format_func={"latest": "latest run", "best": "best run (on the ranking metric)"}.__getitem__,
            key="scope_runs",
            persist_state="session",
            help="A submission rerun with another code version or preprocessing has several runs.",
        )
        write_to_url("runs", choice)
        database_caption(ctx)
    return (dataset_version, protocol, convention)


def _dataset_picker(table: pd.DataFrame) -> str:
    """The dataset select box, in the stable order of :func:`bench.app.queries.dataset_versions`; the
    address may name a dataset by version or by name (then its first version in that order)."""
    versions = queries.dataset_versions(table)
    names = dict(zip(table["dataset_version"].astype(str), table["dataset"].astype(str)))
    by_name: dict[str, str] = {}
    for version in versions:
        by_name.setdefault(names[version], version)
    url_choice("dataset", versions, aliases=by_name)
    dataset_version = st.selectbox(
        "Dataset", versions, format_func=lambda v: f"{names[v]} · {v}", key="scope_dataset", persist_state="session",
        help="Ordered by name; the first one opens unless the address names another (?dataset=NAME or VERSION).",
    )
    write_to_url("dataset", dataset_version)
    return dataset_version


def url_choice(parameter: str, options: Sequence[Any], *, key: str | None = None, aliases: dict[str, Any] | None = None) -> None:
    """Prepare the widget of ``?parameter=`` before it is drawn: forget a remembered value that is no
    longer an option, and take the address's value when it is one this session did not write itself
    (a shared link or an edited address), so that the user's own clicks are never overridden.

    ``key``: the widget's key (default: from :data:`SCOPE_PARAMETERS`, else the parameter's name).
    """
    key = key or SCOPE_PARAMETERS.get(parameter, parameter)
    keep_valid(key, options)
    given = st.query_params.get(parameter)
    if given is None or given == st.session_state.get(_WRITTEN_KEY + parameter):
        return
    value = (aliases or {}).get(given, given)
    if value in options:
        st.session_state[key] = value


def write_to_url(parameter: str, value: Any) -> None:
    """Show ``value`` in the address as ``?parameter=value`` (and remember it was this session's own)."""
    text = str(value)
    if st.query_params.get(parameter) != text:
        st.query_params[parameter] = text
    st.session_state[_WRITTEN_KEY + parameter] = text


def keep_valid(key: str, options: Sequence[Any] | dict) -> None:
    """Forget a remembered widget value that is no longer among the options (another dataset or
    database was chosen), so the widget falls back to its default instead of failing."""
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]


def ranking_metric() -> str:
    """The metric the Leaderboard page ranks by in this session (its default until it is changed)."""
    from bench.report import DEFAULT_METRICS

    chosen = st.session_state.get(LEADERBOARD_METRIC_KEY)
    return chosen if chosen in queries.rankable_metrics() else DEFAULT_METRICS[0]


def run_choice() -> str:
    """The sidebar's choice of run per submission (``latest`` or ``best``)."""
    return st.session_state.get("scope_runs") or "latest"


def database_caption(ctx: Context) -> None:
    st.caption(f"Database: `{ctx.source.display_url}`" + (" (from --db / ?db=)" if ctx.source.overridden else ""))


def metric_picker(label: str = "Metric", *, key: str, default: str = "dice", help: str | None = None) -> str:
    """A select box of the rankable metrics, labelled with name, unit and direction, with its definition below."""
    from bench.metrics import METRICS

    options = queries.rankable_metrics()
    metric = st.selectbox(
        label, options, index=options.index(default) if default in options else 0, format_func=queries.metric_label, key=key, persist_state="session", help=help
    )
    st.caption(f"**{queries.metric_direction(metric).capitalize()}.** {METRICS[metric].description}")
    return metric


def fmt(value: Any) -> str:
    """Numbers as the CLI prints them: three decimals for ratios, fewer for large values; ``–`` if missing."""
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    magnitude = abs(float(value))
    return f"{value:.0f}" if magnitude >= 100 else f"{value:.1f}" if magnitude >= 10 else f"{value:.3f}"


def colour_map(labels: Sequence[str]) -> dict[str, str]:
    """The colour of each submission label: :func:`bench.report.submission_colours`, the function the
    HTML report uses too (pass every submission of the scope, so each colour is the same on every page)."""
    from bench.report import submission_colours

    return submission_colours(labels)


def plotly_layout(fig: Any, *, height: int = 380, **kwargs: Any) -> Any:
    """The app's plot style: white template, compact margins, legend on top."""
    fig.update_layout(
        template="plotly_white",
        height=height,
        margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
        **kwargs,
    )
    return fig


def card_link(content_hash: str) -> str:
    """Relative link to a submission's card page."""
    return f"./submission?id={content_hash}"


def argv_for_app() -> list[str]:
    """``sys.argv[1:]`` when run by ``streamlit run app.py -- ...``, else nothing (e.g. under a test runner)."""
    return sys.argv[1:] if sys.argv and Path(sys.argv[0]).name == "app.py" else []


@dataclass(frozen=True)
class CaseView:
    """A case ready to draw: its volumes, error map, grey-level windows and the slices worth visiting."""

    volumes: Any  # bench.app.viewer.CaseVolumes
    errors: Any  # numpy uint8 error map
    windows: dict[str, tuple[float, float]]
    foreground: Any  # numpy bool mask of the brain
    lesion_slices: tuple[int, ...]
    error_slices: tuple[int, ...]
    first_slice: int


@st.cache_resource(max_entries=8, show_spinner="Reading images…")
def case_view(root: str, case_id: str, prediction_path: str | None) -> CaseView:
    """Load a case for the viewer once per (dataset, case, prediction); shared read-only by sessions."""
    from bench.app import viewer

    volumes = viewer.load_case_volumes(root, case_id, prediction_path)
    errors = volumes.errors
    return CaseView(
        volumes=volumes,
        errors=errors,
        windows={name: viewer.display_window(array, symmetric=viewer.is_z_score_map(name)) for name, array in volumes.channels.items()},
        foreground=volumes.foreground,
        lesion_slices=tuple(int(z) for z in viewer.slices_with(errors, (viewer.TRUE_POSITIVE, viewer.FALSE_NEGATIVE))),
        error_slices=tuple(int(z) for z in viewer.slices_with(errors, (viewer.FALSE_POSITIVE, viewer.FALSE_NEGATIVE))),
        first_slice=viewer.best_slice(errors),
    )


def legend_html(classes: Sequence[str]) -> str:
    """Coloured swatches naming the overlay classes of the viewer."""
    from bench.app.viewer import OVERLAY_CLASSES

    items = []
    for key in classes:
        _, (r, g, b), text = OVERLAY_CLASSES[key]
        items.append(
            f'<span style="display:inline-flex;align-items:center;margin-right:1.1rem;">'
            f'<span style="width:0.9rem;height:0.9rem;border-radius:3px;background:rgb({r},{g},{b});display:inline-block;margin-right:0.35rem;"></span>'
            f"{text}</span>"
        )
    return '<div style="font-size:0.85rem;">' + "".join(items) + "</div>"


@st.cache_data(max_entries=256, show_spinner=False)
def case_tile(root: str, case_id: str, channel: str) -> bytes:
    """PNG of one case for the dataset montage (cached: tiles only change with the dataset)."""
    from bench.app import viewer

    return viewer.to_png(viewer.case_tile(root, case_id, channel=channel, height=220))
