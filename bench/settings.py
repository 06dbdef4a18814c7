"""Where HIE-Bench keeps its data and results: one settings object, passed explicitly.

Values come from arguments first, then environment variables prefixed ``HIE_BENCH_`` (for example
``HIE_BENCH_DB_URL=postgresql+psycopg://127.0.0.1:5432/test``), then the defaults below, which are
relative to the current working directory (the repository root in the README's commands).
"""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class BenchSettings(BaseSettings):
    """Paths and the database URL used by the CLI, the harness and the app."""

    model_config = SettingsConfigDict(env_prefix="HIE_BENCH_", extra="ignore")

    #: Folder holding one sub-folder per dataset (nnU-Net raw layout plus ``cases.csv``).
    data_root: Path = Path("datasets")
    #: Folder for run outputs: predictions, trained models, caches, reports.
    results_dir: Path = Path("results")
    #: SQLAlchemy URL of the results database; ``None`` means ``sqlite:///<results_dir>/bench.db``.
    db_url: str | None = None

    @property
    def database_url(self) -> str:
        """The effective database URL."""
        return self.db_url or f"sqlite:///{(self.results_dir / 'bench.db').as_posix()}"

    @property
    def cache_dir(self) -> Path:
        """Preprocessing cache, keyed by (case, preprocessing id)."""
        return self.results_dir / "cache"

    def dataset_path(self, name_or_path: str | Path) -> Path:
        """A dataset given by name (a folder under :attr:`data_root`) or by path; the one resolution rule.

        An existing folder wins; otherwise the name is looked up under the data root. Raises
        ``FileNotFoundError`` with the fix when neither holds a ``dataset.json``.
        """
        given = Path(name_or_path)
        path = given if given.is_dir() else self.data_root / given
        if not (path / "dataset.json").is_file():
            raise FileNotFoundError(
                f"no dataset at {path} (a name under {self.data_root}/ or a folder with dataset.json; "
                f"create one with `bench data synth --out {path}`)"
            )
        return path.resolve()

