"""Executors beyond this machine: :class:`RayExecutor` runs the harness's work units as Ray tasks.

Contract (the same as :class:`bench.harness.LocalExecutor`): ``map(units, on_result)`` runs every
unit once through :func:`bench.harness._execute` (which holds the unit's lease), calls ``on_result`` as
each unit finishes, and returns one :class:`~bench.harness.UnitResult` per unit, in the units' order.
Units are frozen dataclasses of plain data (a pydantic ``RunSpec``, ids, a ``Fold``), so Ray ships
them as they are; each unit writes its own rows to the one store named in its spec.

- A unit whose spec schedule is ``gpu`` and whose submission trains asks Ray for one GPU
  (``num_gpus=1``; Ray sets ``CUDA_VISIBLE_DEVICES`` for the task); every other unit asks for a CPU.
- A worker process that dies (``kill -9``, a lost node, out of memory) is Ray's to retry
  (``max_retries``). The retried unit skips the cases already stored, and its lease is taken over
  at once on the same node (the dead pid) or after the lease's expiry elsewhere: nothing is lost and
  nothing is done twice. Exceptions inside a unit are not retried: they are the unit's result.
- Relative paths in a spec are made absolute against the driver's working directory before the
  units leave: on a cluster every node must see the dataset, the submissions and the results root at
  the same path (a shared mount), and the store must be a server every node reaches (PostgreSQL).
- ``ray`` is an optional extra (``pip install -e .[ray]``), imported only when a Ray executor runs.

Per-case fan-out (predict-and-score units after a fold is trained) needs the unit split in two:
see docs/cluster.md.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from bench.harness import Executor, FoldUnit, UnitResult

__all__ = ["EXECUTORS", "RayExecutor", "RayUnavailable", "make_executor"]

#: Names ``bench run --executor`` accepts.
EXECUTORS: tuple[str, ...] = ("local", "ray")


class RayUnavailable(RuntimeError):
    """Ray is not installed or the cluster cannot be reached; the message says how to fix it."""


@dataclass
class RayExecutor:
    """Run units as Ray tasks on a local Ray instance or an existing cluster.

    Args:
        address: ``None``: a private local Ray instance (or the cluster in ``RAY_ADDRESS`` if set);
            ``"auto"``: the cluster already running on this machine (``ray start``); ``"HOST:6379"``
            or ``"ray://HOST:10001"``: a remote cluster.
        num_cpus: CPUs of the local instance (ignored when connecting to a cluster).
        max_retries: how often Ray re-runs a unit whose worker process died.
        require_gpus: fail at once when a unit needs a GPU and the cluster has none (an autoscaling
            cluster that adds GPU nodes on demand wants ``False``).
        cpus_per_unit: CPUs each unit reserves. Ray sets ``OMP_NUM_THREADS`` to it, so CPU training
            on big nodes wants more than 1 (e.g. the node's cores divided by the units it should run).
    """

    address: str | None = None
    num_cpus: int | None = None
    max_retries: int = 3
    require_gpus: bool = True
    cpus_per_unit: float = 1
    _started_here: bool = field(default=False, init=False, repr=False)

    def map(self, units: Sequence[FoldUnit], on_result: Callable[[UnitResult], None] | None = None) -> list[UnitResult]:
        from bench.harness import UnitResult, _execute

        if not units:
            return []
        ray = self._connect()
        pending: dict = {}
        try:
            pending = self._submit(ray, _execute, units)
            results: list[UnitResult | None] = [None] * len(units)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                position, unit = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayError as exc:  # retries spent (the worker kept dying) or the task was cancelled
                    result = UnitResult(unit.run_id, unit.fold.name, error=f"Ray could not run the unit after {self.max_retries} retries: {type(exc).__name__}: {exc}")
                results[position] = result
                if on_result:
                    on_result(result)
            return [result for result in results if result is not None]
        except BaseException:
            for ref in pending:  # Ctrl-C or a refused unit: do not leave tasks running on a shared cluster
                ray.cancel(ref, force=True)
            raise
        finally:
            if self._started_here:
                ray.shutdown()
                self._started_here = False

    def _submit(self, ray, execute, units: Sequence[FoldUnit]) -> dict:
        """One Ray task per unit (a GPU for gpu-schedule training units); ``{ref: (position, unit)}``."""
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(execute)
        planned = [(unit, _needs_gpu(unit)) for unit in map(_absolute, units)]
        for unit, needs_gpu in planned:  # refuse before anything is submitted
            if needs_gpu and not gpus and self.require_gpus:
                raise RayUnavailable(f"run {unit.run_id} trains on the gpu schedule but the Ray cluster has no GPU "
                                     "(fix: add GPU nodes, use --schedule cpu, or RayExecutor(require_gpus=False) on an autoscaling cluster)")
        pending = {}
        for position, (unit, needs_gpu) in enumerate(planned):
            ref = task.options(
                num_cpus=self.cpus_per_unit, num_gpus=1 if needs_gpu else 0, max_retries=self.max_retries, retry_exceptions=False,
                name=f"hie-bench {unit.run_id} {unit.fold.name}",
            ).remote(unit)
            pending[ref] = (position, unit)
        return pending

    def schedule_for(self, requested: str) -> str:
        """``auto`` -> ``gpu`` when the *cluster* has a GPU (the driver may have none), else ``cpu``."""
        if requested != "auto":
            return requested
        ray = self._connect()
        return "gpu" if ray.cluster_resources().get("GPU", 0) else "cpu"

    # -- connection ------------------------------------------------------------------------------------

    def _connect(self):
        """Import Ray and connect (once); remember whether this executor started the Ray instance."""
        try:
            import ray
        except ImportError as exc:
            raise RayUnavailable("ray is not installed (fix: pip install -e '.[ray]')") from exc
        if ray.is_initialized():
            return ray
        address = self.address or os.environ.get("RAY_ADDRESS") or "local"
        options: dict = {"include_dashboard": False, "ignore_reinit_error": True}
        if address == "local" and self.num_cpus is not None:
            options["num_cpus"] = self.num_cpus
        try:
            ray.init(address=address, **options)
        except ConnectionError as exc:
            raise RayUnavailable(f"cannot reach the Ray cluster at {address!r}: {exc} (fix: check `ray status` on the head node and --ray-address)") from exc
        self._started_here = True
        return ray


def make_executor(name: str = "local", *, workers: int = 1, ray_address: str | None = None, ray_num_cpus: int | None = None) -> Executor:
    """The executor ``bench run --executor NAME`` asks for (``local`` or ``ray``)."""
    if name == "local":
        from bench.harness import LocalExecutor

        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(address=ray_address, num_cpus=ray_num_cpus)
    raise ValueError(f"unknown executor {name!r} (fix: use {' or '.join(EXECUTORS)})")


# -- helpers -------------------------------------------------------------------------------------------------


def _absolute(unit: FoldUnit) -> FoldUnit:
    """The unit with the spec's paths (and a SQLite file's path) absolute, as the driver sees them."""
    spec = unit.spec
    update = {name: Path(getattr(spec, name)).absolute() for name in ("submission", "dataset", "results_dir")}
    if spec.db_url.startswith("sqlite:///") and not spec.db_url.startswith("sqlite:////") and spec.db_url != "sqlite:///:memory:":
        update["db_url"] = f"sqlite:///{Path(spec.db_url[len('sqlite:///'):]).absolute().as_posix()}"
    return replace(unit, spec=spec.model_copy(update=update))


def _needs_gpu(unit: FoldUnit) -> bool:
    """A training unit on the ``gpu`` schedule (only trainable submissions train)."""
    return unit.spec.schedule == "gpu" and _is_trainable(str(unit.spec.submission))


@functools.lru_cache(maxsize=256)
def _is_trainable(submission: str) -> bool:
    from bench.submissions import load_submission

    return load_submission(Path(submission)).trains
