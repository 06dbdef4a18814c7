"""The one device policy: which torch device a run uses, which training schedule ``auto`` means, and
what each run records about the machine.

Contract:

- ``auto`` means *a CUDA device that torch can use*: the installed torch is a CUDA build and
  ``torch.cuda.is_available()`` is true. A driver (``nvidia-smi``) beside a CPU build of torch is *not*
  a GPU machine for the benchmark; :func:`resolve_device` says so in its ``reason``.
- :func:`resolve_device` turns ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` (``gpu`` is read as ``cuda``)
  into a :class:`DeviceChoice`; asking for CUDA where there is none raises :class:`DeviceError` with
  the fix. :func:`schedule_for` maps a requested training schedule to ``cpu`` or ``gpu`` with the
  same rule. Everything that picks a device (harness, trainers, the nnU-Net adapter, predictors)
  goes through these two functions.
- :func:`describe_environment` is what a run records (host, device, GPU name, torch and CUDA
  versions, AMP dtype). :func:`worker_environment` pins one worker process to one GPU.

Cost: importing torch takes seconds, and planning a run must not pay it. The probe is therefore
layered (:func:`torch_facts`): if torch is already imported it is asked directly (free); otherwise
``torch/version.py`` is read as text (about a millisecond), and a CPU-only build ends the question
there; only a CUDA build is probed, once per process, in a short-lived subprocess. The subprocess
costs what ``import torch`` costs (about 2 s here) but keeps torch and the CUDA runtime out of the
planning process: its memory stays small, its ``peak_memory_mb`` stays true, and it can still fork or
spawn workers that each choose their own GPU. A probe that hangs (a wedged driver) is cut off after
:data:`PROBE_TIMEOUT_S` and reads as "no usable GPU", with that reason.

This module imports only the standard library.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

__all__ = [
    "DeviceChoice",
    "DeviceError",
    "GpuInfo",
    "TorchFacts",
    "describe_environment",
    "resolve_device",
    "schedule_for",
    "torch_facts",
    "worker_environment",
    "worker_thread_environment",
    "default_workers",
]

#: Seconds the subprocess probe may take before the machine is treated as having no usable GPU.
PROBE_TIMEOUT_S = 60.0
#: Where the README explains how to get a CUDA build of torch.
INSTALL_HINT = "see README.md, 'Installing on a CUDA machine'"

Build = Literal["cpu", "cuda", "rocm", "missing"]


class DeviceError(ValueError):
    """A requested device cannot be used here; the message ends with the fix."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as torch sees it (after ``CUDA_VISIBLE_DEVICES``)."""

    name: str
    memory_mb: float
    capability: str = ""


@dataclass(frozen=True)
class TorchFacts:
    """What the installed torch offers, and how that was found out."""

    #: ``torch.__version__`` (``None`` when torch is not installed).
    torch_version: str | None
    #: ``cpu``, ``cuda``, ``rocm`` or ``missing`` (torch not installed).
    build: Build
    #: CUDA (or ROCm/HIP) version torch was built with; ``None`` for a CPU build.
    cuda_version: str | None
    #: ``torch.cuda.is_available()``.
    cuda_available: bool = False
    gpus: tuple[GpuInfo, ...] = ()
    #: ``torch.cuda.is_bf16_supported()`` on the first GPU.
    bf16: bool = False
    #: Why CUDA is unusable although torch is a CUDA build (driver error, probe timeout).
    error: str = ""
    #: ``version.py`` (no import), ``in-process`` (torch was imported) or ``subprocess``.
    source: str = "version.py"


@dataclass(frozen=True)
class DeviceChoice:
    """The device a run uses and why."""

    #: ``cpu``, ``cuda`` or ``cuda:N`` (a torch device string).
    device: str
    #: One sentence: why this device (what ``auto`` saw, or "requested").
    reason: str
    #: GPU name, or the CPU's model name.
    name: str
    torch_version: str | None
    cuda_version: str | None
    #: ``bfloat16`` / ``float16`` for mixed precision on CUDA; ``None`` on the CPU (AMP off).
    amp_dtype: str | None
    gpu_count: int = 0
    gpu_memory_mb: float | None = None

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def schedule(self) -> str:
        """The training schedule this device runs: ``gpu`` on CUDA, else ``cpu``."""
        return "gpu" if self.is_cuda else "cpu"


# -- probing torch --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def torch_facts() -> TorchFacts:
    """What torch offers on this machine, found as cheaply as possible (see the module docstring).

    Cached for the life of the process; ``torch_facts.cache_clear()`` forgets it (tests, or after
    changing ``CUDA_VISIBLE_DEVICES``).
    """
    if "torch" in sys.modules:
        return _facts_from_torch(sys.modules["torch"], source="in-process")
    static = _facts_from_version_file()
    if static.build not in ("cuda", "rocm"):
        return static
    if _visible_devices_hidden():
        return TorchFacts(static.torch_version, static.build, static.cuda_version, error=f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides every GPU")
    return _facts_from_subprocess(static)


def _facts_from_version_file() -> TorchFacts:
    """torch's version and CUDA build read from ``torch/version.py`` without importing torch."""
    spec = importlib.util.find_spec("torch")  # locates the package; runs none of its code
    if spec is None or not spec.submodule_search_locations:
        return TorchFacts(None, "missing", None)
    values: dict[str, object] = {}
    try:
        tree = ast.parse((Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text())
    except (OSError, SyntaxError, StopIteration):
        tree = ast.Module(body=[], type_ignores=[])
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and getattr(node, "value", None) is not None:
            try:
                values[target.id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    version = values.get("__version__") or _distribution_version("torch")
    cuda, hip = values.get("cuda"), values.get("hip")
    build: Build = "cuda" if cuda else "rocm" if hip else "cpu"
    return TorchFacts(str(version) if version else None, build, str(cuda or hip) if (cuda or hip) else None)


def _facts_from_torch(torch, *, source: str) -> TorchFacts:
    """Ask an imported torch directly."""
    cuda, hip = torch.version.cuda, getattr(torch.version, "hip", None)
    build: Build = "cuda" if cuda else "rocm" if hip else "cpu"
    try:
        available = bool(torch.cuda.is_available())
        error = ""
    except Exception as exc:  # a broken driver raises here on some builds
        available, error = False, f"{type(exc).__name__}: {exc}"
    gpus: list[GpuInfo] = []
    bf16 = False
    if available:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(GpuInfo(props.name, props.total_memory / 2**20, f"{props.major}.{props.minor}"))
        bf16 = bool(torch.cuda.is_bf16_supported())
    return TorchFacts(torch.__version__, build, str(cuda or hip) if (cuda or hip) else None, available and bool(gpus), tuple(gpus), bf16, error, source)


def _print_torch_facts() -> None:
    """Entry point of the probe subprocess: import torch, print :class:`TorchFacts` as JSON."""
    import torch

    print(json.dumps(asdict(_facts_from_torch(torch, source="subprocess"))))


def _facts_from_subprocess(static: TorchFacts) -> TorchFacts:
    command = [sys.executable, "-c", "from bench.device import _print_torch_facts; _print_torch_facts()"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return TorchFacts(static.torch_version, static.build, static.cuda_version, error=f"the CUDA probe did not answer within {PROBE_TIMEOUT_S:g} s (a hung driver?)", source="subprocess")
    try:
        data = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return TorchFacts(static.torch_version, static.build, static.cuda_version, error=f"the CUDA probe failed: {tail}", source="subprocess")
    data["gpus"] = tuple(GpuInfo(**gpu) for gpu in data.get("gpus", ()))
    return TorchFacts(**data)


def _visible_devices_hidden() -> bool:
    """``CUDA_VISIBLE_DEVICES`` set to nothing (or ``-1``): torch will see no GPU; no need to ask it."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1")


def _distribution_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# -- the policy ----------------------------------------------------------------------------------------------


def why_no_cuda(facts: TorchFacts) -> str:
    """One sentence: why torch cannot use a CUDA device here, with the fix."""
    if facts.build == "missing":
        return "torch is not installed (fix: pip install -c constraints.txt -e .)"
    if facts.build == "cpu":
        driver = " although an NVIDIA driver is installed (nvidia-smi found)" if shutil.which("nvidia-smi") else ""
        return f"torch {facts.torch_version} is a CPU-only build{driver} (fix: install the CUDA build of torch; {INSTALL_HINT})"
    if facts.error:
        return (f"torch {facts.torch_version} is built for CUDA {facts.cuda_version} but cannot use a GPU: {facts.error} "
                "(fix: check the driver with nvidia-smi; it must support this CUDA version)")
    return (f"torch {facts.torch_version} is built for CUDA {facts.cuda_version} but finds no GPU "
            "(fix: check the driver with nvidia-smi and that CUDA_VISIBLE_DEVICES names a GPU)")


def resolve_device(requested: str = "auto", *, facts: TorchFacts | None = None) -> DeviceChoice:
    """The device for ``requested`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; ``gpu`` means ``cuda``).

    ``auto`` gives ``cuda`` when torch can use a CUDA device, else ``cpu``. ``cuda`` where torch cannot
    use one raises :class:`DeviceError`. ``facts`` replaces the probe (tests, or a caller that probed).
    """
    name = (requested or "auto").strip().lower()
    name = "cuda" if name == "gpu" else name
    if name != "auto" and name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise DeviceError(f"unknown device {requested!r} (fix: use auto, cpu, cuda or cuda:N)")
    if name == "cpu":
        facts = facts or _facts_from_version_file()  # versions only: no probe for a CPU run
        return DeviceChoice("cpu", "cpu requested", cpu_name(), facts.torch_version, facts.cuda_version, None)
    facts = facts or torch_facts()
    if not (facts.cuda_available and facts.gpus):
        reason = why_no_cuda(facts)
        if name != "auto":
            raise DeviceError(f"device {requested!r} requested but {reason}")
        return DeviceChoice("cpu", f"auto picked cpu: {reason}", cpu_name(), facts.torch_version, facts.cuda_version, None)
    index = int(name[5:]) if name.startswith("cuda:") else 0
    if index >= len(facts.gpus):
        raise DeviceError(f"device {requested!r} requested but torch sees {len(facts.gpus)} GPU(s) (fix: use cuda:0..cuda:{len(facts.gpus) - 1})")
    gpu = facts.gpus[index]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"torch {facts.torch_version} (CUDA {facts.cuda_version}) sees {len(facts.gpus)} GPU(s)" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
    reason = f"auto picked cuda: {seen}" if name == "auto" else f"{name} requested; {seen}"
    return DeviceChoice(
        "cuda" if name == "auto" else name, reason, gpu.name, facts.torch_version, facts.cuda_version,
        "bfloat16" if facts.bf16 else "float16", len(facts.gpus), gpu.memory_mb,
    )


def schedule_for(requested_schedule: str = "auto", *, facts: TorchFacts | None = None) -> str:
    """``auto`` -> ``gpu`` when :func:`resolve_device` (``auto``) picks CUDA, else ``cpu``.

    ``cpu`` and ``gpu`` are returned as given: a schedule is a recipe choice, and on a cluster the
    planning machine need not have the GPU the workers have (the unit's own device check decides).
    """
    if requested_schedule in ("cpu", "gpu"):
        return requested_schedule
    if requested_schedule != "auto":
        raise ValueError(f"unknown schedule {requested_schedule!r} (fix: use auto, cpu or gpu)")
    return resolve_device("auto", facts=facts).schedule


def describe_environment(*, facts: TorchFacts | None = None) -> dict:
    """Host, device, GPU and library versions, recorded with each run (``runs.environment``).

    ``device`` and ``gpu`` are the keys :meth:`bench.store.Store.start_run` copies into its columns.
    """
    choice = resolve_device("auto", facts=facts)
    info: dict = {
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "device": "cuda" if choice.is_cuda else "cpu",
        "gpu": choice.name if choice.is_cuda else None,
        "gpu_count": choice.gpu_count,
        "gpu_memory_mb": choice.gpu_memory_mb,
        "cpu_name": cpu_name(),
        "torch": choice.torch_version,
        "torch_cuda": choice.cuda_version,
        "amp_dtype": choice.amp_dtype,
        "device_reason": choice.reason,
    }
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        info["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    for package in ("monai", "nnunetv2"):
        if version := _distribution_version(package):
            info[package] = version
    return info


def worker_environment(worker_index: int, n_gpus: int, *, visible: str | None = None) -> dict[str, str]:
    """Environment variables that pin worker ``worker_index`` to one GPU, round-robin over ``n_gpus``.

    ``visible`` is the parent's ``CUDA_VISIBLE_DEVICES`` (default: read from the environment): when the
    parent is itself restricted to some GPUs, workers are spread over those. No GPU: no variable (the
    worker runs on the CPU either way). Must be applied before the worker imports torch.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    ids = [part.strip() for part in visible.split(",") if part.strip()] if visible else [str(i) for i in range(n_gpus)]
    ids = ids[:n_gpus] if n_gpus > 0 else []
    if not ids:
        return {}
    return {"CUDA_VISIBLE_DEVICES": ids[worker_index % len(ids)]}


#: Thread-count variables of the math libraries torch and numpy use (OpenMP, MKL, OpenBLAS).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


#: Most parallel fold units ``default_workers`` picks: beyond this, memory (about 1-2 GB per CPU training)
#: rather than cores becomes the limit on a small machine.
MAX_DEFAULT_WORKERS = 4


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which a container or ``taskset`` narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    """Parallel fold units for a CPU run on this machine: one per CPU, at most :data:`MAX_DEFAULT_WORKERS`."""
    return max(1, min(MAX_DEFAULT_WORKERS, available_cpus()))


def worker_thread_environment(workers: int, *, cpus: int | None = None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Thread counts for one of ``workers`` parallel worker processes on this machine's CPUs.

    Each worker gets ``cpus // workers`` threads (at least one), so that ``workers`` processes never ask
    for more threads than there are cores: small 3D convolutions scale poorly over threads, and two
    one-thread trainings on two cores run about twice as fast as two two-thread ones fighting over them.
    Variables the user already set are left alone. Must be applied before the worker imports torch.
    """
    environ = os.environ if environ is None else environ
    cpus = cpus if cpus is not None else available_cpus()
    threads = str(max(1, cpus // max(1, workers)))
    return {name: threads for name in THREAD_VARIABLES if name not in environ}


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
