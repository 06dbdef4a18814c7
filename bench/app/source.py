"""Which results database and folders the app reads: one :class:`AppSource` per browser session.

The source comes from :class:`bench.settings.BenchSettings` (``HIE_BENCH_DB_URL``,
``HIE_BENCH_RESULTS_DIR``, ``HIE_BENCH_DATA_ROOT``; default ``sqlite:///results/bench.db``), and the
database can be overridden like the CLI's ``--db``:

* ``streamlit run app.py -- --db results/demo/bench.db`` (a URL or a SQLite file), or
* the query parameter ``?db=...`` in the app's address (handy to compare two databases side by side).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.settings import BenchSettings

#: Name of the query parameter (``?db=``) and of the script argument (``--db``) that pick a database.
DB_PARAMETER = "db"


@dataclass(frozen=True)
class AppSource:
    """Where the app reads results and writes uploads.

    Attributes:
        db_url: SQLAlchemy URL of the results database.
        results_dir: Folder of run outputs; uploaded submissions go to ``<results_dir>/submissions``.
        data_root: Folder holding the datasets a queued run may use.
        overridden: Whether ``db_url`` came from ``--db`` / ``?db=`` rather than the settings.
    """

    db_url: str
    results_dir: Path
    data_root: Path
    overridden: bool = False

    @property
    def uploads_dir(self) -> Path:
        """Where submissions uploaded in the browser are unpacked."""
        return self.results_dir / "submissions"

    @property
    def display_url(self) -> str:
        """The database URL with any password hidden."""
        import sqlalchemy as sa

        return sa.make_url(self.db_url).render_as_string(hide_password=True)


def database_url(value: str) -> str:
    """A URL as given, or ``sqlite:///<path>`` for a plain file path (as ``bench ... --db`` accepts)."""
    value = value.strip()
    return value if "://" in value else f"sqlite:///{Path(value).as_posix()}"


def resolve_source(
    query_params: Mapping[str, str | Sequence[str]] | None = None,
    argv: Sequence[str] = (),
    settings: BenchSettings | None = None,
) -> AppSource:
    """The source of a session: settings, then ``--db`` in ``argv``, then ``?db=`` (the last given wins).

    Args:
        query_params: The page's query parameters (``st.query_params``).
        argv: Arguments after ``--`` of ``streamlit run app.py -- --db URL``; unknown ones are ignored.
        settings: Defaults to ``BenchSettings()`` (environment variables, then built-in defaults).
    """
    settings = settings or BenchSettings()
    url, overridden = settings.database_url, False
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(f"--{DB_PARAMETER}")
    known, _ = parser.parse_known_args(list(argv))
    if known.db:
        url, overridden = database_url(known.db), True
    value = (query_params or {}).get(DB_PARAMETER)
    if isinstance(value, (list, tuple)):
        value = value[-1] if value else None
    if value:
        url, overridden = database_url(str(value)), True
    return AppSource(db_url=url, results_dir=settings.results_dir, data_root=settings.data_root, overridden=overridden)
