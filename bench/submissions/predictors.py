"""Running a submission on cases: in this process, or in a sandboxed worker subprocess with a time limit.

:class:`SubmissionPredictor` is what :meth:`Submission.predictor` returns. For every case it

1. hides the answer: the model receives the case *without* its label path and without the
   ``cases.csv`` metadata (which holds lesion volumes);
2. runs the kind's loader-built model, in the current process or in a worker (``python -m
   bench.submissions.runner``) that is killed when a case exceeds the time limit and restarted for the
   next case. With ``PredictorOptions.sandbox`` (the default) the worker runs in the bubblewrap sandbox of
   :mod:`bench.submissions.sandbox`: it sees its submission read-only, a private ``/work`` and only this
   case's input channels, under the manifest's resource limits; without a working sandbox it refuses
   with :class:`~bench.submissions.sandbox.SandboxUnavailable`;
3. checks that the result is a binary mask on the case's native grid and returns it as ``bool``, and
   that the lesion probability map a model may return beside it (the contract of
   :mod:`bench.submissions.guard`) lies on the same grid with values in [0, 1]:
   :meth:`SubmissionPredictor.predict_with_probability` returns both as a
   :class:`~bench.submissions.guard.Prediction`, :meth:`SubmissionPredictor.predict` the mask.

The worker loads the model once and serves every case of the predictor. Requests go over its stdin;
replies come back over a dedicated pipe (see :mod:`bench.submissions.runner`), each echoing the request's
random nonce. A reply that is malformed, too long, out of sequence or carries the wrong nonce means
something else wrote on the channel: the worker is killed and the case fails with a
:class:`~bench.submissions.core.PredictionCrash`. The prediction itself comes back as an ``.npy`` file,
opened without following links and no larger than a mask of the case's shape can be; the probability,
when the reply announces one, as a second ``.npy`` of ``uint8`` levels read with the same checks and a
cap of one byte a voxel; a voxel uncertainty (the reply names its source) likewise as a third.

Failures on a case raise a :class:`~bench.submissions.core.PredictionError` subclass (timeout, crash,
invalid output, missing prediction, sandbox unavailable) carrying the case id, a message and a fix, so
the harness can record a failed row and go on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from bench.submissions.core import (
    InvalidPrediction,
    MissingPrediction,
    PredictionCrash,
    PredictionError,
    PredictionTimeout,
    PredictorOptions,
)
from bench.submissions.guard import Prediction, blind_case, guarded_predict, model_output  # noqa: F401  (blind_case re-exported)
from bench.submissions.manifest import DEFAULT_TIME_LIMIT_S
from bench.submissions.sandbox import (
    SANDBOX_CACHE,
    SANDBOX_OUT,
    SANDBOX_SUBMISSION,
    SandboxConfig,
    SandboxLayout,
    SandboxUnavailable,
    clear_inputs,
    describe_exit,
    effective_limits,
    package_root,
    sandbox_unavailable_reason,
    stage_inputs,
    wants_gpu,
)

if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Case
    from bench.submissions.core import Submission
    from bench.submissions.sandbox import Limits

#: Error classes a worker may report, by name (anything else becomes a crash).
ERROR_CLASSES: dict[str, type[PredictionError]] = {
    cls.__name__: cls for cls in (PredictionTimeout, PredictionCrash, InvalidPrediction, MissingPrediction)
}
_STDERR_TAIL_LINES = 15
#: Seconds a worker may take to start (interpreter and HIE-Bench imports, before any model code runs).
WORKER_STARTUP_TIMEOUT_S = 180.0
#: Longest reply line the worker may send; its messages are cut well below this (see the runner).
MAX_REPLY_BYTES = 64 * 1024
#: What the benchmark tells a model that wrote on its reply channel.
_CHANNEL_FIX = "write only to stdout/stderr or your own files; never to file descriptors you did not open"
SANDBOX_FIX = "install bubblewrap (make system-deps), or run without the sandbox with --unsafe-no-sandbox"


def case_to_json(case: "Case", image_paths: list[str] | None = None) -> dict[str, Any]:
    return {
        "case_id": case.case_id,
        "site": case.site,
        "image_paths": image_paths if image_paths is not None else [str(p) for p in case.image_paths],
        "channel_names": list(case.channel_names),
    }


def case_from_json(data: dict[str, Any]) -> "Case":
    from bench.data.dataset import Case

    return Case(
        case_id=data["case_id"],
        site=data["site"],
        image_paths=tuple(Path(p) for p in data["image_paths"]),
        label_path=None,
        channel_names=tuple(data["channel_names"]),
    )


def hidden_paths(case: "Case", cache_dir: str | None = None) -> list[Path]:
    """Folders the model must not see: where the case's images and its label live (the dataset), and the
    shared preprocessing cache (its training entries hold labels)."""
    folders = {Path(p).parent for p in case.image_paths}
    if case.label_path is not None:
        folders.add(Path(case.label_path).parent)
    if cache_dir is not None:
        folders.add(Path(cache_dir))
    return sorted(folders)


def make_predictor(submission: "Submission", options: PredictorOptions, *, isolate: bool | None) -> "SubmissionPredictor":
    from bench.submissions.kinds import KIND_LOADERS

    loader = KIND_LOADERS[submission.kind]
    if submission.kind == "python":
        isolate = True  # arbitrary user code always runs in its own process, under a time limit
    elif isolate is None:
        isolate = loader.runs_code
    return SubmissionPredictor(submission, options, isolate=isolate)


class SubmissionPredictor:
    """``predict(case) -> np.ndarray[bool]`` on the case's native grid, and ``predict_with_probability(case)
    -> Prediction`` (mask and probability levels, or ``None``, from the same forward pass); see the module docstring.

    Use as a context manager, or call :meth:`close`, to end the worker process. Use it from one thread:
    the sandbox ends when the thread that started it ends (``--die-with-parent`` follows the thread that
    forked), and the next case then starts a fresh worker.
    """

    def __init__(self, submission: "Submission", options: PredictorOptions, *, isolate: bool):
        self.submission = submission
        self.options = options
        self.isolate = isolate
        #: Whether the worker runs in the bubblewrap sandbox (every isolated predictor, unless opted out).
        self.sandboxed = isolate and options.sandbox
        manifest_limit = getattr(submission.manifest, "time_limit_s", DEFAULT_TIME_LIMIT_S)
        self.time_limit_s = float(options.time_limit_s or manifest_limit)
        self.limits = effective_limits(getattr(submission.manifest, "limits", None))
        self._inner: Any = None
        self._worker: _Worker | None = None

    def predict(self, case: "Case") -> np.ndarray:
        """Predict the lesion mask of ``case`` (bool, ``case.geometry.shape``) through the one guard."""
        return self.predict_with_probability(case).mask

    def predict_with_probability(self, case: "Case") -> Prediction:
        """The guarded mask and lesion probability levels of ``case`` (``probability`` ``None`` when the
        submission gives none)."""
        if not self.isolate:
            return guarded_predict(self._predict_in_process, case)
        hidden = hidden_paths(case, self.options.cache_dir)  # from the full case: where its label lives
        shape = case.geometry.shape

        def in_worker(blinded: "Case") -> Any:
            if self._worker is None:
                self._worker = self._new_worker(case.case_id)
            return self._worker.predict(blinded, hidden=hidden, shape=shape)

        return guarded_predict(in_worker, case)

    def _new_worker(self, case_id: str) -> "_Worker":
        if not self.sandboxed:
            return _Worker(self.submission, self.options, self.time_limit_s, sandbox=None)
        reason = sandbox_unavailable_reason()
        if reason is not None:
            raise SandboxUnavailable(case_id, f"the prediction sandbox cannot start: {reason}", SANDBOX_FIX)
        return _Worker(self.submission, self.options, self.time_limit_s, sandbox=self._sandbox_config())

    def _sandbox_config(self) -> SandboxConfig:
        cache, cache_name = None, None
        preprocessing = self.submission.preprocessing
        if self.options.cache_dir is not None and preprocessing is not None:
            # Never the shared cache: training entries there hold labels, and another submission's
            # sandbox could poison entries this one reads. Its own folder, by content hash, is safe.
            cache_name = preprocessing.id
            cache = Path(self.options.cache_dir) / f"{cache_name}.sandbox-{self.submission.content_hash[:16]}"
            cache.mkdir(parents=True, exist_ok=True)
        return SandboxConfig(layout=SandboxLayout.create(), submission_dir=self.submission.path.resolve(), limits=self.limits,
                             gpu=wants_gpu(self.options.device), cache=cache, cache_name=cache_name)

    def _predict_in_process(self, case: "Case") -> Any:
        from bench.submissions.kinds import KIND_LOADERS

        try:
            if self._inner is None:
                self._inner = KIND_LOADERS[self.submission.kind].build(self.submission, self.options)
            return model_output(self._inner, case)
        except PredictionError:
            raise
        except Exception as exc:
            raise PredictionCrash(case.case_id, describe_exception(exc), "run the model on this case locally and fix the error shown") from exc

    def close(self) -> None:
        """End the worker process (if any) and release the model."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        self._inner = None

    def __enter__(self) -> "SubmissionPredictor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten predictor must not leave a process behind
        try:
            self.close()
        except Exception:
            pass


#: Longest exception message shown to a submitter (a model may raise megabytes of text).
MAX_ERROR_CHARS = 300


def describe_exception(exc: BaseException, *, frames: int = 3) -> str:
    """One line for a submitter: ``Type: message (at predict.py:12 in predict; ...)``, the message cut
    at :data:`MAX_ERROR_CHARS` and the place its last ``frames`` frames in the submission's own code
    (the innermost frames anywhere when none is). Stored with the failed case and shown by verify."""
    import traceback

    message = " ".join(str(exc).split())
    if len(message) > MAX_ERROR_CHARS:
        message = f"{message[:MAX_ERROR_CHARS]}... ({len(message):,} characters)"
    stack = traceback.extract_tb(exc.__traceback__)
    own = [f for f in stack if f.filename.startswith(f"{SANDBOX_SUBMISSION}/")] or stack[-1:]
    where = "; ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in own[-frames:])
    return f"{type(exc).__name__}: {message}" + (f" (at {where})" if where else "")


def _npy_size_cap(shape: tuple[int, ...], bytes_per_voxel: int = 16) -> int:
    """Largest ``.npy`` an output of ``shape`` can be: ``bytes_per_voxel`` (a mask: up to complex128, 16;
    probability levels: ``uint8``, 1) plus a header."""
    return int(np.prod(shape, dtype=np.int64)) * bytes_per_voxel + (1 << 16)


class _ChannelViolation(Exception):
    """Something other than the worker's protocol arrived on the reply channel."""


class _Worker:
    """One ``python -m bench.submissions.runner`` process (sandboxed when ``sandbox`` is given).

    Requests go to its stdin; replies come on a pipe passed as an extra file descriptor; the model's
    stdout and stderr go to a log whose tail is shown when it crashes.
    """

    def __init__(self, submission: "Submission", options: PredictorOptions, time_limit_s: float, *, sandbox: SandboxConfig | None):
        self.submission = submission
        self.options = options
        self.time_limit_s = time_limit_s
        self.sandbox = sandbox
        self.layout = sandbox.layout if sandbox is not None else SandboxLayout.create()
        self.stderr_path = self.layout.log
        # Predictions are read through this descriptor: replacing /work/out by a link cannot redirect us.
        self._out_fd = os.open(self.layout.out, os.O_RDONLY | os.O_DIRECTORY)
        self.process: subprocess.Popen[bytes] | None = None
        self._reply_fd: int | None = None
        self._buffer = b""
        self._count = 0

    # -- start-up ------------------------------------------------------------------------------------

    def _start(self, case_id: str, *, load: bool = True) -> None:
        """Start the worker, wait for its ready line, and (``load``) load the model in it."""
        self._spawn(case_id)
        try:
            ready = self._read_line(time.monotonic() + WORKER_STARTUP_TIMEOUT_S)
        except _ChannelViolation as exc:
            self._protocol_crash(case_id, str(exc))
        if ready is None:
            self._raise_crash(case_id, f"the worker process did not start within {WORKER_STARTUP_TIMEOUT_S:g} s")
        if ready == b"" or _loads(ready) != {"ok": True, "ready": True}:
            self._raise_crash(case_id, "the worker process did not start" if ready == b"" else "the worker process started badly")
        if not load:
            return
        try:
            self._exchange({"submission": self._submission_path(), "options": self._worker_options().to_json()}, case_id,
                           f"loading the model took longer than {self.time_limit_s:g} s")
        except PredictionError:
            self.kill()  # a worker without a model is useless; the next case starts a fresh one
            raise

    def _spawn(self, case_id: str) -> None:
        read_fd, write_fd = os.pipe()
        try:
            command, extra = self._command([sys.executable, "-m", "bench.submissions.runner", "--reply-fd", str(write_fd)], case_id)
            with open(self.stderr_path, "ab") as log:
                self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=(write_fd,),
                                                start_new_session=True,  # its own process group: a timeout kills it all
                                                **extra)
        except (OSError, subprocess.SubprocessError, SandboxUnavailable) as exc:  # SubprocessError: preexec_fn failed
            os.close(read_fd)
            if isinstance(exc, SandboxUnavailable):
                raise
            error = SandboxUnavailable if self.sandbox is not None else PredictionCrash
            raise error(case_id, f"the worker process could not be started: {exc}", SANDBOX_FIX if self.sandbox else "") from exc
        finally:
            os.close(write_fd)  # only the worker holds the writing end: end of file means it is gone
        self._reply_fd, self._buffer = read_fd, b""

    def _command(self, argv: list[str], case_id: str) -> tuple[list[str], dict[str, Any]]:
        """The command line and ``Popen`` arguments: in the sandbox, or a plain subprocess (unsafe)."""
        if self.sandbox is not None:
            try:
                return self.sandbox.command(argv), self.sandbox.popen_kwargs()
            except RuntimeError as exc:  # bwrap vanished, or Python lives where the sandbox mounts its own folders
                raise SandboxUnavailable(case_id, f"the prediction sandbox cannot start: {exc}", SANDBOX_FIX) from exc
        env = dict(os.environ)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # importing the entry must not change the folder's content hash
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root(), env.get("PYTHONPATH", "")) if p)
        return argv, {"env": env, "cwd": str(self.layout.work)}

    def _submission_path(self) -> str:
        return str(SANDBOX_SUBMISSION) if self.sandbox is not None else str(self.submission.path)

    def _worker_options(self) -> PredictorOptions:
        if self.sandbox is None:
            return self.options
        return dataclasses.replace(self.options, cache_dir=str(SANDBOX_CACHE) if self.sandbox.cache is not None else None)

    def train(self, request: dict[str, Any], label: str, *, hidden: list[Path]) -> dict[str, Any]:
        """Send one training request (:mod:`bench.submissions.training`) to a fresh worker; its reply."""
        if self.sandbox is not None:
            self.sandbox.check_hidden(hidden, label)  # before any training code runs with these mounts
        self._start(label, load=False)
        return self._exchange(request, label, f"training took longer than {self.time_limit_s:g} s")

    # -- one case ------------------------------------------------------------------------------------

    def predict(self, case: "Case", *, hidden: list[Path], shape: tuple[int, ...]) -> dict[str, Any]:
        """``{"mask": array, "probability": uint8 array or None, "uncertainty": uint8 array or None,
        "uncertainty_source": str or None}`` as read back (the guard checks them)."""
        if self.sandbox is not None:
            self.sandbox.check_hidden(hidden, case.case_id)  # before any model code runs with these mounts
        if self.process is None or self.process.poll() is not None:
            self._start(case.case_id)
        self._count += 1
        names = (f"prediction-{self._count}.npy", f"probability-{self._count}.npy", f"uncertainty-{self._count}.npy")
        out_dir = SANDBOX_OUT if self.sandbox is not None else self.layout.out
        image_paths = [str(p) for p in self._stage(case)] if self.sandbox is not None else None
        request = {"case": case_to_json(case, image_paths), "output": str(out_dir / names[0]), "probability_output": str(out_dir / names[1]),
                   "uncertainty_output": str(out_dir / names[2])}
        try:
            reply = self._exchange(request, case.case_id, f"no prediction within the time limit of {self.time_limit_s:g} s")
            mask = self._read_prediction(names[0], case.case_id, _npy_size_cap(shape))
            probability = self._read_prediction(names[1], case.case_id, _npy_size_cap(shape, 1), "probability") if reply.get("probability") else None
            source = reply.get("uncertainty")  # the source name (the guard checks it), when a third file was written
            uncertainty = self._read_prediction(names[2], case.case_id, _npy_size_cap(shape, 1), "uncertainty") if source is not None else None
            if uncertainty is not None and uncertainty.dtype != np.uint8:
                raise InvalidPrediction(case.case_id, f"the model's uncertainty came back as {uncertainty.dtype}, not uint8 levels",
                                        "return the uncertainty as a float numpy array (the worker sends its uint8 levels)")
            return {"mask": mask, "probability": probability, "uncertainty": uncertainty, "uncertainty_source": source}
        finally:
            if self.sandbox is not None:
                clear_inputs(self.layout.inputs)
            for name in names:
                _unlink_at(name, self._out_fd)

    def _stage(self, case: "Case") -> list[Any]:
        try:
            return stage_inputs(case.image_paths, self.layout.inputs)
        except OSError as exc:
            raise SandboxUnavailable(case.case_id, f"the case's inputs could not be put into the sandbox: {exc}",
                                     "check that the case's image files exist and are readable") from exc

    def _read_prediction(self, name: str, case_id: str, max_bytes: int, what: str = "output") -> np.ndarray:
        """The ``.npy`` the worker saved as ``name``: a plain file (no link, no FIFO) of at most ``max_bytes``."""
        fix = "return a numeric or boolean numpy array"
        try:  # no links followed, and a FIFO planted there must not block us
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self._out_fd)
        except OSError as exc:
            raise InvalidPrediction(case_id, f"the model's {what} could not be read back ({exc.strerror})", fix) from exc
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
                raise InvalidPrediction(case_id, f"the model's {what} file is not a plain file of at most {max_bytes} bytes", fix)
            try:
                return _load_npy(handle, max_bytes)
            except (OSError, ValueError, EOFError) as exc:
                raise InvalidPrediction(case_id, f"the model's {what} could not be read back ({exc})", fix) from exc

    # -- the protocol --------------------------------------------------------------------------------

    def _exchange(self, request: dict[str, Any], case_id: str, timeout_message: str) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        nonce = secrets.token_hex(16)
        try:
            self.process.stdin.write((json.dumps({"nonce": nonce, **request}) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            self._raise_crash(case_id)
        try:
            line = self._read_line(time.monotonic() + self.time_limit_s)
            if line is None:
                self.kill()
                raise PredictionTimeout(case_id, timeout_message,
                                        "make the model faster, or raise time_limit_s in submission.yaml if the limit is too strict")
            if line == b"":
                self._raise_crash(case_id)
            reply = _parse_reply(line, nonce)
            if self._buffer:
                raise _ChannelViolation("a second reply arrived for one request")
        except _ChannelViolation as exc:
            self._protocol_crash(case_id, str(exc))
        if not reply["ok"]:
            error_class = ERROR_CLASSES.get(reply.get("error", ""), PredictionCrash)
            raise error_class(case_id, reply.get("message") or "the model failed", reply.get("fix", ""))
        return reply

    def _read_line(self, deadline: float) -> bytes | None:
        """The next reply line; ``b""`` when the worker closed the channel, ``None`` at the deadline."""
        assert self._reply_fd is not None
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise _ChannelViolation(f"a reply longer than {MAX_REPLY_BYTES} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            poller = select.poll()  # not select.select: it fails for descriptors above 1023
            poller.register(self._reply_fd, select.POLLIN)
            if not poller.poll(remaining * 1000):
                continue
            chunk = os.read(self._reply_fd, 1 << 16)
            if not chunk:
                if self._buffer:
                    raise _ChannelViolation("an unterminated reply")
                return b""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        if len(line) > MAX_REPLY_BYTES:
            raise _ChannelViolation(f"a reply longer than {MAX_REPLY_BYTES} bytes")
        return line

    def _protocol_crash(self, case_id: str, what: str) -> NoReturn:
        self.kill()
        raise PredictionCrash(case_id, f"the reply channel carried {what}: the model (or a process it started) wrote to the "
                                       "benchmark's reply channel, so its answer cannot be trusted", _CHANNEL_FIX)

    def _raise_crash(self, case_id: str, what: str | None = None) -> NoReturn:
        code = None
        if self.process is not None:
            try:
                code = self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # alive but silent: it closed the reply channel itself
                what = what or "the model closed the benchmark's reply channel"
        if what is None:
            what = f"the model's process died ({describe_exit(code, sandboxed=self.sandbox is not None)}){self._limit_hint(code)}"
        self.kill()
        tail = self.stderr_tail()
        raise PredictionCrash(case_id, f"{what}\n{tail}" if tail else what,
                              "run the model on this case locally and fix the error shown")

    def _limit_hint(self, code: int | None) -> str:
        if self.sandbox is None:
            return ""
        limits: "Limits" = self.sandbox.limits
        described = describe_exit(code, sandboxed=True)
        if described == "signal SIGXCPU":
            return f": it used more than its CPU time limit of {limits.cpu_s} s per case (limits.cpu_s in submission.yaml)"
        if described == "signal SIGXFSZ":
            return f": it wrote a file larger than its limit of {limits.file_size_mb} MB (limits.file_size_mb)"
        if described in ("signal SIGKILL", "signal SIGSEGV", "signal SIGABRT"):
            return f" (its memory limit is {limits.memory_mb} MB: limits.memory_mb in submission.yaml)"
        return ""

    def stderr_tail(self) -> str:
        try:
            with open(self.stderr_path, "rb") as handle:  # the log may be large: read its end only
                handle.seek(max(0, os.fstat(handle.fileno()).st_size - 16384))
                text = handle.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-_STDERR_TAIL_LINES:])

    # -- ending --------------------------------------------------------------------------------------

    def kill(self) -> None:
        """Kill the worker's process group; in the sandbox that ends its PID namespace, every descendant."""
        if self.process is not None:
            if self.process.poll() is None:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait()
            if self.process.stdin is not None:
                try:
                    self.process.stdin.close()
                except OSError:
                    pass
            self.process = None
        if self._reply_fd is not None:
            os.close(self._reply_fd)
            self._reply_fd = None
        self._buffer = b""

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None and self.process.stdin is not None:
            try:  # ask politely first: closing stdin ends the worker's loop
                self.process.stdin.close()
                self.process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        if self._out_fd is not None:
            os.close(self._out_fd)
            self._out_fd = None  # type: ignore[assignment]
        self.layout.remove()


def _loads(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None


def _parse_reply(line: bytes, nonce: str) -> dict[str, Any]:
    """The worker's reply to the request carrying ``nonce``; :class:`_ChannelViolation` for anything else."""
    reply = _loads(line)
    if reply is None:
        raise _ChannelViolation("a line that is not JSON")
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise _ChannelViolation("JSON that is not a reply")
    if reply.get("nonce") != nonce:
        raise _ChannelViolation("a reply to another request (wrong nonce)")
    if (not all(isinstance(reply.get(key, ""), str) for key in ("error", "message", "fix")) or not isinstance(reply.get("probability", False), bool)
            or not isinstance(reply.get("uncertainty", ""), str) or len(reply.get("uncertainty", "")) > 64):
        raise _ChannelViolation("a reply with malformed fields")
    return reply


def _load_npy(handle: Any, max_bytes: int) -> np.ndarray:
    """``np.load`` after checking the header: numpy allocates what the header declares before reading."""
    from numpy.lib import format as npy

    version = npy.read_magic(handle)
    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, _, dtype = readers[version](handle)
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > max_bytes:
        raise ValueError(f"its header declares shape {shape} of {dtype}, more than an output of the case can be")
    handle.seek(0)
    return np.load(handle, allow_pickle=False)


def _unlink_at(name: str, dir_fd: int | None) -> None:
    if dir_fd is None:
        return
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        import shutil

        shutil.rmtree(name, dir_fd=dir_fd, ignore_errors=True)
