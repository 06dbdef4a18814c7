"""``bench doctor``: what this machine offers the benchmark, checked rather than assumed.

Contract: :func:`diagnose` returns a :class:`DoctorReport` of :class:`Check` rows (torch build, CUDA,
GPUs and their memory, the schedule ``auto`` picks and why, the databases, Ray, the prediction sandbox,
chromium) and :attr:`DoctorReport.exit_code`: non-zero exactly when something the caller *asked for*
cannot happen here: a GPU run (``require_gpu``) or the database named with ``db_url``. Optional extras
that are missing (Ray, chromium) are reported, never fatal. Nothing is created or installed; the probe
imports torch in a subprocess (:mod:`bench.device`), so the doctor takes a few seconds.

:func:`format_report` renders the report as plain text; the typer command lives in
:mod:`bench.cli.doctor` (library modules do not import typer).
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from typing import Literal

__all__ = ["Check", "DoctorReport", "diagnose", "format_report"]

Status = Literal["ok", "info", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, what was found, and the fix where it is not fine."""

    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class DoctorReport:
    checks: tuple[Check, ...]
    #: ``cpu`` or ``gpu``: what ``--schedule auto`` means here.
    schedule: str
    device: str
    #: Where something asked for cannot happen: the exit code is 1.
    failures: tuple[str, ...] = field(default=())

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def check(self, name: str) -> Check:
        return next(check for check in self.checks if check.name == name)


def diagnose(*, db_url: str | None = None, require_gpu: bool = False, default_db_url: str | None = None) -> DoctorReport:
    """Check this machine; ``db_url`` and ``require_gpu`` are what the caller is about to ask for."""
    from bench.device import resolve_device, torch_facts, why_no_cuda

    facts = torch_facts()
    choice = resolve_device("auto", facts=facts)
    checks = [_torch_check(facts), _gpu_check(facts, why_no_cuda(facts) if not choice.is_cuda else "")]
    why, _ = _split_fix(choice.reason)
    amp = f", AMP {choice.amp_dtype}" if choice.amp_dtype else ""
    checks.append(Check("schedule auto", "ok", f"{choice.schedule} schedule on {choice.device} ({choice.name}{amp}); {why}"))
    failures: list[str] = []
    if require_gpu and not choice.is_cuda:
        text, fix = _split_fix(why_no_cuda(facts))
        failures.append(f"a GPU run was required but {text}")
        checks.append(Check("GPU run", "fail", f"required (--require-gpu) but not possible: {text}", fix))
    checks.append(_database_check("database (default)", default_db_url or _default_db_url(), asked=False))
    if db_url:
        database = _database_check("database (--db)", db_url, asked=True)
        checks.append(database)
        if database.status == "fail":
            failures.append(database.detail)
    checks += [_ray_check(), _sandbox_check(), _chromium_check()]
    return DoctorReport(tuple(checks), choice.schedule, choice.device, tuple(failures))


def format_report(report: DoctorReport) -> str:
    """Plain text: one line per check (``[ok]``, ``[--]``, ``[!!]``, ``[FAIL]``), fixes indented below."""
    marks = {"ok": "[ok]  ", "info": "[--]  ", "warn": "[!!]  ", "fail": "[FAIL]"}
    width = max(len(check.name) for check in report.checks)
    lines = []
    for check in report.checks:
        lines.append(f"{marks[check.status]} {check.name.ljust(width)}  {check.detail}")
        if check.fix:
            lines.append(f"       {' ' * width}  fix: {check.fix}")
    verdict = "cannot do what was asked: " + "; ".join(report.failures) if report.failures else f"ready: `--schedule auto` trains on the {report.schedule} schedule"
    return "\n".join(lines + ["", verdict])


# -- the checks ---------------------------------------------------------------------------------------------


def _torch_check(facts) -> Check:
    if facts.build == "missing":
        return Check("torch", "warn", "not installed", "pip install -c constraints.txt -e .")
    build = {"cpu": "CPU-only build", "cuda": f"CUDA {facts.cuda_version} build", "rocm": f"ROCm {facts.cuda_version} build"}[facts.build]
    return Check("torch", "ok", f"{facts.torch_version}, {build}")


def _gpu_check(facts, reason: str) -> Check:
    driver = _nvidia_driver()
    if facts.cuda_available and facts.gpus:
        gpus = ", ".join(f"{i}: {gpu.name} ({gpu.memory_mb / 1024:.0f} GiB, sm {gpu.capability})" for i, gpu in enumerate(facts.gpus))
        return Check("GPUs", "ok", f"{len(facts.gpus)} usable by torch: {gpus}" + (f"; driver {driver}" if driver else ""))
    text, fix = _split_fix(reason)
    seen = f" (nvidia-smi sees driver {driver})" if driver else ""
    # A driver beside a torch that cannot use it is the trap worth a warning: it looks like a GPU machine.
    return Check("GPUs", "warn" if driver else "info", f"none usable by torch{seen}: {text}", fix)


def _split_fix(sentence: str) -> tuple[str, str]:
    """``"what (fix: how)"`` -> ``("what", "how")``."""
    if sentence.endswith(")") and " (fix: " in sentence:
        text, fix = sentence[:-1].rsplit(" (fix: ", 1)
        return text, fix
    return sentence, ""


def _nvidia_driver() -> str:
    """The NVIDIA driver version from nvidia-smi, or ``""`` (no driver, or it does not answer)."""
    import subprocess

    if not shutil.which("nvidia-smi"):
        return ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    first = out.strip().splitlines()[0] if out.strip() else ""
    return first.replace(",", " on", 1)


def _default_db_url() -> str:
    from bench.settings import BenchSettings

    return BenchSettings().database_url


def _database_check(name: str, url: str, *, asked: bool) -> Check:
    from bench.store import Store, StoreError

    try:
        store = Store(url)
    except Exception as exc:  # a malformed URL or a missing driver
        return Check(name, "fail" if asked else "warn", f"{url}: {type(exc).__name__}: {exc}", "pass a SQLAlchemy URL such as postgresql+psycopg://user@host:5432/db")
    shown = store.url.render_as_string(hide_password=True)
    try:
        store.ping()
    except StoreError as exc:
        missing_file = store.dialect == "sqlite" and "no SQLite database" in str(exc)
        if missing_file and not asked:
            return Check(name, "info", f"{shown}: not created yet (the first `bench run` creates it)")
        return Check(name, "fail" if asked else "warn", str(exc), "start the server, or check the URL, user and network" if not missing_file else "run `bench run` (or `bench demo`) to create it")
    finally:
        store.dispose()
    tables = "with results" if _has_results(url) else "reachable, no results yet"
    return Check(name, "ok", f"{shown} ({store.dialect}): {tables}")


def _has_results(url: str) -> bool:
    from bench.store import Store

    with Store(url) as store:
        try:
            return store.has_results()
        except Exception:  # reachable but unreadable: the ping said what matters
            return False


def _ray_check() -> Check:
    if importlib.util.find_spec("ray") is None:
        return Check("ray", "info", "not installed: `bench run --executor ray` is unavailable", "pip install -e '.[ray]'")
    return Check("ray", "ok", f"{metadata.version('ray')} installed (`--executor ray`; a cluster with --ray-address)")


def _sandbox_check() -> Check:
    try:
        from bench.submissions.sandbox import sandbox_unavailable_reason
    except ImportError:
        found = shutil.which("bwrap")
        return Check("sandbox", "info", f"bubblewrap {'at ' + found if found else 'not found'} (this version has no sandbox module)")
    reason = sandbox_unavailable_reason()
    if reason is None:
        return Check("sandbox", "ok", f"bubblewrap can isolate predictions ({shutil.which('bwrap')})")
    return Check("sandbox", "warn", f"predictions cannot be sandboxed: {reason}", "install bubblewrap (make system-deps) and allow user namespaces")


def _chromium_check() -> Check:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return Check("chromium", "ok", f"{path} (browser tests, figure export)")
    return Check("chromium", "info", "not found: the browser tests are skipped", "make system-deps (Debian's chromium)")
