"""The prediction sandbox: a bubblewrap (``bwrap``) container that holds only one case's inputs.

Contract. A submission's worker (``python -m bench.submissions.runner``) runs in a fresh set of Linux
namespaces (mount, PID, network, IPC, UTS, cgroup, and a user namespace where the kernel allows one) in
which the file system holds only:

=================================  ==========================================  =====
inside                             host                                        mode
=================================  ==========================================  =====
``/usr``, ``/bin``, ``/lib*`` ...  the system's programs and libraries         ro
``/etc/ld.so.cache`` and a few     the host's (``passwd`` and ``group`` are    ro
other ``/etc`` files               generated: the sandbox user only)
the Python installation, the venv  the same paths as on the host               ro
the ``bench`` package              the same path as on the host                ro
``/submission``                    the submission folder                       ro
``/work`` (``HOME``, cwd)          a private folder of this predictor          rw
``/work/inputs``                   the current case's channels, nothing else   ro
``/cache/<preprocessing id>``      this submission's own preprocessing cache   rw
``/train``, ``/model`` (training    the fold's training cases with labels, and  ro/rw
sandboxes only)                    its model folder (:mod:`.training`)
``/tmp``, ``/dev/shm``             size-limited tmpfs                          rw
``/proc``, ``/dev``                a new procfs (this PID namespace only) and  rw
                                   a minimal ``/dev`` (plus the NVIDIA devices
                                   when the model runs on a GPU)
=================================  ==========================================  =====

The dataset root, the labels, other cases, the results folder and its database are never mounted, and
:meth:`SandboxConfig.check_hidden` refuses a case whose folder lies inside a mounted path (a dataset under
``/usr``, say). The environment is rebuilt from scratch (:func:`sandbox_env`): no ``HIE_BENCH_*``
variables, database URLs or dataset paths. Every capability is dropped, user namespaces cannot be nested,
``--die-with-parent`` and the PID namespace make killing bwrap's process group end every descendant.

Resource limits (:class:`Limits`) come from the optional ``limits:`` mapping of ``submission.yaml``,
clamped to :data:`CEILING_LIMITS`, and are set with ``setrlimit`` in the child before bwrap is executed,
so they bind bwrap, the worker and everything it starts; no untrusted code runs before they apply.

What this module does not do: talk to the worker (that is :mod:`bench.submissions.predictors`), or decide
whether to sandbox (``PredictorOptions.sandbox``). docs/security.md explains the threat model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import shutil
import site
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from bench.submissions.core import PredictionError

#: Where things appear inside the sandbox.
SANDBOX_WORK = PurePosixPath("/work")
SANDBOX_INPUTS = SANDBOX_WORK / "inputs"
SANDBOX_OUT = SANDBOX_WORK / "out"
SANDBOX_SUBMISSION = PurePosixPath("/submission")
SANDBOX_CACHE = PurePosixPath("/cache")
#: Training sandboxes only (:mod:`bench.submissions.training`): the fold's cases with labels, and the
#: fold's model folder.
SANDBOX_TRAIN = PurePosixPath("/train")
SANDBOX_MODEL = PurePosixPath("/model")
#: Paths the sandbox mounts itself; host paths needed inside may not lie under the ones it cannot nest in.
_UNNESTABLE = (PurePosixPath("/proc"), PurePosixPath("/dev"), SANDBOX_SUBMISSION, SANDBOX_CACHE, SANDBOX_INPUTS,
               SANDBOX_TRAIN, SANDBOX_MODEL)

#: Uid and gid of the sandbox user, where a user namespace lets bwrap choose them.
SANDBOX_UID = 1000
SANDBOX_USER = "hiebench"

#: System folders mounted read-only (or recreated as symlinks on merged-/usr systems).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Host files of /etc that the dynamic loader and Python's standard library read; nothing else of /etc.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "alternatives", "mime.types", "fonts")
#: Variables passed through from the host when set: thread counts and GPU selection. Nothing that names a
#: path or a secret (LD_LIBRARY_PATH is filtered separately, see :func:`sandbox_env`).
PASSED_ENV = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUBLAS_WORKSPACE_CONFIG",
)


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed worker (see docs/security.md).

    Attributes:
        memory_mb: address space (``RLIMIT_AS``) on CPU; writable private memory (``RLIMIT_DATA``) always.
            With a GPU only ``RLIMIT_DATA`` applies: CUDA reserves address space far beyond physical memory.
        cpu_s: CPU seconds per case (model loading counts towards the first). Enforced by ``RLIMIT_CPU``'s
            soft limit, which the worker moves forward before each case; the wall-clock time limit is the
            bound a model cannot lift.
        file_size_mb: largest file the model may write (``RLIMIT_FSIZE``), also the size of ``/tmp`` and
            ``/dev/shm``.
        open_files: open file descriptors per process (``RLIMIT_NOFILE``).
    """

    memory_mb: int
    cpu_s: int
    file_size_mb: int
    open_files: int


#: What a submission gets when its manifest asks for nothing. 8 GiB of address space holds torch, MONAI,
#: ONNX Runtime or nnU-Net (about 1.5 GiB after import) plus a full-resolution sliding-window inference.
DEFAULT_LIMITS = Limits(memory_mb=8192, cpu_s=3600, file_size_mb=1024, open_files=1024)
#: The most a manifest can ask for; larger requests are clamped.
CEILING_LIMITS = Limits(memory_mb=65536, cpu_s=4 * 3600, file_size_mb=8192, open_files=8192)
#: Glibc reserves 64 MiB of address space per malloc arena (up to 8 per core); a few arenas keep a
#: many-threaded model's reservations, which count against RLIMIT_AS, far below its real use.
MALLOC_ARENA_MAX = "4"


class SandboxUnavailable(PredictionError):
    """The sandbox cannot start here, or cannot hide this case's dataset: nothing of the model ran."""


def effective_limits(requested: Any = None) -> Limits:
    """The manifest's ``limits`` (any object with the fields of :class:`Limits`, or ``None``), with
    defaults for missing fields and every value clamped to :data:`CEILING_LIMITS`."""
    values = {}
    for item in dataclasses.fields(Limits):
        asked = getattr(requested, item.name, None) if requested is not None else None
        value = getattr(DEFAULT_LIMITS, item.name) if asked is None else int(asked)
        values[item.name] = max(1, min(value, getattr(CEILING_LIMITS, item.name)))
    return Limits(**values)


def rlimits(limits: Limits, *, gpu: bool) -> dict[int, tuple[int, int]]:
    """``setrlimit`` values for ``limits``: resource -> (soft, hard)."""
    mib = 1 << 20
    memory = limits.memory_mb * mib
    values = {
        resource.RLIMIT_DATA: (memory, memory),
        # Soft only: the worker moves it forward before each case (hard stays open so that it can).
        resource.RLIMIT_CPU: (limits.cpu_s, resource.RLIM_INFINITY),
        resource.RLIMIT_FSIZE: (limits.file_size_mb * mib, limits.file_size_mb * mib),
        resource.RLIMIT_NOFILE: (limits.open_files, limits.open_files),
        resource.RLIMIT_CORE: (0, 0),  # SIGXCPU and crashes must not dump cores into /work
    }
    if not gpu:
        values[resource.RLIMIT_AS] = (memory, memory)
    return values


def limit_setter(limits: Limits, *, gpu: bool) -> Callable[[], None]:
    """A ``preexec_fn`` that applies :func:`rlimits` in the child before it executes bwrap.

    Only ``resource.setrlimit`` runs between fork and exec (no imports, no allocation of note), which is
    what keeps ``preexec_fn`` safe enough in a process that has threads.
    """
    values = [(which, _within_hard_limit(which, value)) for which, value in rlimits(limits, gpu=gpu).items()]
    setrlimit = resource.setrlimit

    def apply() -> None:
        for which, value in values:
            setrlimit(which, value)

    return apply


def _within_hard_limit(which: int, value: tuple[int, int]) -> tuple[int, int]:
    """``value`` lowered to this process's own hard limit, which an unprivileged child cannot exceed."""
    infinity = resource.RLIM_INFINITY
    soft, hard = value
    current = resource.getrlimit(which)[1]
    if current != infinity and (hard == infinity or hard > current):
        hard = current
    if hard != infinity and (soft == infinity or soft > hard):
        soft = hard
    return soft, hard


# --------------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------------


#: Namespace flags, most isolated first; :func:`sandbox_unavailable_reason` keeps the first that starts.
#: The second set serves a setuid bwrap on kernels without unprivileged user namespaces.
_NAMESPACE_FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)),
    ("--unshare-all",),
)
_COMMON_FLAGS = ("--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox")


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[tuple[str, ...] | None, str | None]:
    """(namespace flags that work, None) or (None, why the sandbox cannot start). Run once per process."""
    if not sys.platform.startswith("linux"):
        return None, f"the sandbox needs Linux namespaces; this is {sys.platform}"
    bwrap = bwrap_path()
    if bwrap is None:
        return None, "bubblewrap (bwrap) is not installed"
    true = shutil.which("true", path="/usr/bin:/bin") or "/bin/true"
    errors = []
    for flags in _NAMESPACE_FLAG_SETS:
        # The features the real command line uses (an old bwrap lacks --size, say) on a minimal root.
        command = [bwrap, *flags, *_COMMON_FLAGS, "--clearenv", *_system_mounts(), "--proc", "/proc", "--dev", "/dev",
                   "--size", str(1 << 20), "--tmpfs", "/tmp", "--remount-ro", "/", "--chdir", "/tmp", true]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        if done.returncode == 0:
            return flags, None
        errors.append(" ".join(done.stderr.split()) or f"exit code {done.returncode}")
    hint = ("user namespaces look disabled (check sysctl user.max_user_namespaces, "
            "kernel.unprivileged_userns_clone, or AppArmor's kernel.apparmor_restrict_unprivileged_userns)")
    return None, f"bwrap cannot create namespaces: {errors[0]}; {hint}"


def sandbox_unavailable_reason() -> str | None:
    """``None`` when bwrap can start a sandbox here, else one line saying why not (cached)."""
    return _probe()[1]


def namespace_flags() -> tuple[str, ...]:
    flags, reason = _probe()
    if flags is None:
        raise RuntimeError(reason)
    return flags


# --------------------------------------------------------------------------------------------------
# Layout and command line
# --------------------------------------------------------------------------------------------------


#: Prefix of the sandboxes' temporary folders; :func:`reap_stale_layouts` removes those of dead processes.
LAYOUT_PREFIX = "hiebench-sandbox-"
_LOCK_NAME = ".owner.lock"
#: A folder younger than this may be one whose owner has not locked it yet.
_REAP_MIN_AGE_S = 120.0


@dataclass(frozen=True)
class SandboxLayout:
    """Host folders of one predictor's sandbox, all inside one private temporary folder (mode 0700).

    ``work`` is ``/work`` (the model may write there), ``inputs`` is ``/work/inputs`` (read-only inside;
    only the parent puts files there), ``log`` receives the model's stdout and stderr, ``etc`` holds the
    generated ``passwd`` and ``group``. The owner holds an ``flock`` on ``.owner.lock`` while the folder
    lives, so that a folder left behind by a process that died (``kill -9``, a pool worker that exits
    without running ``atexit``) is recognised and removed by the next :meth:`create`.
    """

    root: Path
    lock_fd: int = -1

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def out(self) -> Path:
        return self.work / "out"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def log(self) -> Path:
        return self.root / "model.log"

    @classmethod
    def create(cls) -> "SandboxLayout":
        import fcntl

        reap_stale_layouts()
        root = Path(tempfile.mkdtemp(prefix=LAYOUT_PREFIX))
        lock_fd = os.open(root / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        layout = cls(root, lock_fd)
        for folder in (layout.out, layout.inputs, layout.etc):
            folder.mkdir(parents=True)
        home = str(SANDBOX_WORK)
        (layout.etc / "passwd").write_text(f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_UID}::{home}:/bin/sh\n"
                                           f"root:x:0:0::/:/usr/sbin/nologin\n")
        (layout.etc / "group").write_text(f"{SANDBOX_USER}:x:{SANDBOX_UID}:\nroot:x:0:\n")
        return layout

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)  # rmtree never follows links the model may have planted
        if self.lock_fd >= 0:
            try:
                os.close(self.lock_fd)
            except OSError:
                pass


def reap_stale_layouts(base: Path | None = None) -> list[Path]:
    """Remove sandbox folders in ``base`` (the temporary folder) whose owner has died; returns them.

    A folder is stale when nobody holds the lock on its ``.owner.lock`` (locks die with their process).
    Folders younger than two minutes are left alone: their owner may not have locked them yet.
    """
    import fcntl
    import time

    removed = []
    for folder in Path(base or tempfile.gettempdir()).glob(f"{LAYOUT_PREFIX}*"):
        lock = folder / _LOCK_NAME
        try:
            if folder.is_symlink() or time.time() - lock.stat().st_mtime < _REAP_MIN_AGE_S:
                continue
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its owner is alive
            os.close(fd)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)
        removed.append(folder)
    return removed


@dataclass(frozen=True)
class SandboxConfig:
    """Everything bwrap needs for one predictor's worker."""

    layout: SandboxLayout
    submission_dir: Path
    limits: Limits
    gpu: bool = False
    #: Host folder bound read-write at ``/cache/<cache_name>`` (this submission's own cache), or ``None``.
    cache: Path | None = None
    cache_name: str | None = None
    #: Further mounts ``(host folder, path inside, writable)``: a training sandbox's cases and model folder.
    extra: tuple[tuple[Path, PurePosixPath, bool], ...] = ()

    def readonly_sources(self) -> list[Path]:
        """Every host path mounted in the sandbox (for :meth:`check_hidden`)."""
        system = [Path(d) for d in SYSTEM_DIRS if Path(d).is_dir() and not Path(d).is_symlink()]
        etc = [Path("/etc") / name for name in ETC_FILES]
        mounted = [*system, *etc, *python_mounts(), self.submission_dir, self.layout.work, self.layout.inputs]
        mounted += [host for host, _, _ in self.extra]
        return mounted + ([self.cache] if self.cache is not None else []) + [Path(p) for p in gpu_mounts(self.gpu)]

    @functools.cached_property
    def _real_sources(self) -> list[Path]:  # the mounts never change during a worker's life
        return [_real(p) for p in self.readonly_sources()]

    def check_hidden(self, secrets: Iterable[Path], case_id: str) -> None:
        """Refuse (:class:`SandboxUnavailable`) when a folder the model must not see lies inside a mount."""
        sources = self._real_sources
        for secret in secrets:
            real = _real(secret)
            for source in sources:
                if real == source or source in real.parents:
                    raise SandboxUnavailable(
                        case_id, f"{secret} lies inside {source}, which the sandbox shows to the model, so the model could read it",
                        f"move the dataset (and the results folder) out of {source}")

    def command(self, argv: list[str]) -> list[str]:
        """The bwrap command line running ``argv`` (paths as inside the sandbox)."""
        bwrap = bwrap_path()
        if bwrap is None:
            raise RuntimeError("bwrap is not installed")
        args = [bwrap, *namespace_flags(), *_COMMON_FLAGS, "--clearenv"]
        for name, value in sandbox_env().items():
            args += ["--setenv", name, value]
        args += _system_mounts()
        for name in ETC_FILES:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        for name in ("passwd", "group"):  # generated: the sandbox user only, no names of the host's users
            args += ["--ro-bind", str(self.layout.etc / name), f"/etc/{name}"]
        tmpfs_size = str(self.limits.file_size_mb << 20)
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--size", tmpfs_size, "--tmpfs", "/dev/shm", "--size", tmpfs_size, "--tmpfs", "/tmp"]  # tmpfs is memory: bound it
        args += gpu_mounts_args(self.gpu)
        args += ["--bind", str(self.layout.work), str(SANDBOX_WORK), "--ro-bind", str(self.layout.inputs), str(SANDBOX_INPUTS)]
        args += ["--ro-bind", str(self.submission_dir), str(SANDBOX_SUBMISSION)]
        if self.cache is not None:
            args += ["--bind", str(self.cache), str(SANDBOX_CACHE / str(self.cache_name))]
        for host, inside, writable in self.extra:
            args += ["--bind" if writable else "--ro-bind", str(host), str(inside)]
        # Python last: a venv under /work or /tmp is mounted on top of those (bwrap creates the mount points).
        for path in python_mounts():
            args += ["--ro-bind", str(path), str(path)]
        args += ["--remount-ro", "/", "--chdir", str(SANDBOX_WORK), "--", *argv]
        return args

    def popen_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``subprocess.Popen`` of :meth:`command`: clean environment, limits."""
        # bwrap's own environment is readable inside as /proc/1/environ: it must be as clean as the model's.
        return {"env": sandbox_env(), "cwd": str(self.layout.root), "preexec_fn": limit_setter(self.limits, gpu=self.gpu)}


def _system_mounts() -> list[str]:
    args: list[str] = []
    for name in SYSTEM_DIRS:
        path = Path(name)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), name]
        elif path.is_dir():
            args += ["--ro-bind", name, name]
    return args


@functools.lru_cache(maxsize=1)
def python_mounts() -> list[Path]:
    """The Python installation, the venv, site-packages and the ``bench`` package, outermost first.

    Folders under a system folder (already mounted) or under another entry are dropped. ``sys.path`` as a
    whole is *not* mounted: it may hold the current folder, which can be a repository with datasets in it.
    """
    import bench

    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()}
    candidates.add(str(Path(bench.__file__).resolve().parent))
    paths = sorted({Path(os.path.realpath(p)) for p in candidates if os.path.isdir(p)}, key=lambda p: (len(p.parts), str(p)))
    system = [Path(d) for d in SYSTEM_DIRS if not Path(d).is_symlink()]
    kept: list[Path] = []
    for path in paths:
        if any(path == base or base in path.parents for base in [*system, *kept]):
            continue
        for reserved in _UNNESTABLE:
            if PurePosixPath(path).is_relative_to(reserved):
                raise RuntimeError(f"{path} (Python) lies under {reserved}, which the sandbox mounts itself")
        kept.append(path)
    return kept


def package_root() -> str:
    """The folder holding the ``bench`` package (``PYTHONPATH`` inside and outside the sandbox)."""
    import bench

    return str(Path(bench.__file__).resolve().parent.parent)


def sandbox_env() -> dict[str, str]:
    """The whole environment of the sandboxed worker (and of bwrap itself)."""
    env = {
        "HOME": str(SANDBOX_WORK),
        "USER": SANDBOX_USER,
        "LOGNAME": SANDBOX_USER,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PYTHONPATH": package_root(),
        "PYTHONDONTWRITEBYTECODE": "1",  # the submission is read-only anyway; no stray caches in /work
        "PYTHONNOUSERSITE": "1",
        "PYTHONUNBUFFERED": "1",  # the model's prints reach the log even when it is killed
        "MALLOC_ARENA_MAX": MALLOC_ARENA_MAX,
    }
    env.update({name: os.environ[name] for name in PASSED_ENV if name in os.environ})
    # Library folders help a GPU build find its driver; only those the sandbox mounts anyway are kept.
    visible = [Path(d) for d in SYSTEM_DIRS] + python_mounts()
    libraries = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":")
                 if p and any(Path(p) == v or v in Path(p).parents for v in visible)]
    if libraries:
        env["LD_LIBRARY_PATH"] = ":".join(libraries)
    return env


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------

#: Read-only parts of /sys that the CUDA driver reads (PCI topology, NUMA nodes); they hold no files.
GPU_SYS_DIRS = ("/sys/bus/pci", "/sys/devices", "/sys/dev/char", "/sys/module/nvidia")


def wants_gpu(device: str) -> bool:
    """Whether the worker for ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) needs the GPU devices."""
    if device == "cpu":
        return False
    return device.startswith("cuda") or Path("/dev/nvidiactl").exists()


def gpu_mounts(gpu: bool) -> list[str]:
    if not gpu:
        return []
    devices = sorted(str(p) for p in Path("/dev").glob("nvidia*") if not p.is_dir())
    caps = ["/dev/nvidia-caps"] if Path("/dev/nvidia-caps").is_dir() else []
    return devices + caps


def gpu_mounts_args(gpu: bool) -> list[str]:
    args: list[str] = []
    for device in gpu_mounts(gpu):
        args += ["--dev-bind", device, device]
    if gpu:
        for folder in GPU_SYS_DIRS:
            args += ["--ro-bind-try", folder, folder]
    return args


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def stage_inputs(image_paths: Iterable[Path], inputs: Path, inside: PurePosixPath = SANDBOX_INPUTS) -> list[PurePosixPath]:
    """Put the case's channels into ``inputs`` (hard links, copies across file systems); their paths inside
    (``inputs`` appears as ``inside``).

    Files get fixed names (``0000.nii.gz``, ...), so nothing of the host's names or layout reaches the model.
    """
    clear_inputs(inputs)
    return [stage_file(source, inputs, f"{index:04d}", inside) for index, source in enumerate(image_paths)]


def stage_file(source: Path, folder: Path, stem: str, inside: PurePosixPath) -> PurePosixPath:
    """Link (or copy) one image into ``folder`` as ``stem`` plus its suffix (``.mhd`` with its voxel file)."""
    source = Path(source)
    suffix = _suffix(source)
    _link_or_copy(source, folder / f"{stem}{suffix}")
    if suffix == ".mhd":  # its voxels live in a companion file that the header names
        for companion in _mhd_data_files(source):
            _link_or_copy(source.parent / companion, folder / companion)
    return inside / f"{stem}{suffix}"


def clear_inputs(inputs: Path) -> None:
    for entry in inputs.iterdir():
        entry.unlink()


def _suffix(path: Path) -> str:
    from bench.imageio import IMAGE_SUFFIXES

    return next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), "".join(path.suffixes[-2:]))


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # the model sees it read-only: /work/inputs is a read-only mount
    except OSError:  # another file system, or a file we may not link (fs.protected_hardlinks)
        shutil.copyfile(source, target)


def _mhd_data_files(header: Path) -> list[str]:
    for line in header.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile":
            name = value.strip()
            if name and name not in ("LOCAL", "LIST") and "/" not in name and not name.startswith("."):
                return [name]
            raise OSError(f"{header}: ElementDataFile {name!r} is not a plain file name next to the header")
    return []


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def describe_exit(code: int | None, *, sandboxed: bool) -> str:
    """``exit code 3`` / ``signal SIGKILL``; bwrap reports a child killed by signal N as exit code 128+N."""
    import signal

    if code is None:
        return "exit code unknown"
    number = -code if code < 0 else (code - 128 if sandboxed and 128 < code < 128 + 65 else None)
    if number is None:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(number).name}"
    except ValueError:
        return f"signal {number}"
