"""Helpers several test modules share (imported as ``support``: pytest puts ``tests/`` on ``sys.path``).

- :data:`PG_URL`, :func:`postgres_unavailable_reason`, :func:`pg_schema`: a private, dropped-after schema
  on the PostgreSQL server every machine starts (skip, never fail, when none answers);
- :func:`write_python_submission`: a ``python`` submission folder from a function body.
"""

from __future__ import annotations

import contextlib
import os
import textwrap
import uuid
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa

PG_URL = os.environ.get("HIE_BENCH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def postgres_unavailable_reason() -> str | None:
    """Why PostgreSQL cannot be used (``None`` when it can)."""
    try:
        engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # any failure to connect means: skip, do not fail
        return f"no PostgreSQL server answers at {PG_URL} ({type(exc).__name__}); set HIE_BENCH_TEST_PG_URL to test it"
    return None


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """The URL of a fresh private schema on the server, dropped on exit."""
    schema = f"hie_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def write_python_submission(folder: Path, body: str, name: str) -> Path:
    """``folder`` as a ``python`` submission whose ``predict.py`` is ``body`` (dedented)."""
    folder.mkdir(parents=True)
    (folder / "predict.py").write_text(textwrap.dedent(body))
    (folder / "submission.yaml").write_text(textwrap.dedent(f"""\
        name: {name}
        version: "0.1.0"
        authors: [tests]
        description: a test submission
        licence: Apache-2.0
        kind: python
        entry: predict.py:predict
        inputs: {{channels: [ADC, Z-ADC], space: native}}
        time_limit_s: 60
        """))
    return folder
