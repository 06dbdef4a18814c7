"""Running a submission on cases: in this process, or in a worker subprocess with a time limit.

:class:`SubmissionPredictor` is what :meth:`Submission.predictor` returns. For every case it

1. hides the answer: the model receives the case *without* its label path and without the
   ``cases.csv`` metadata (which holds lesion volumes);
2. runs the kind's loader-built model, in the current process or in a worker (``python -m
   bench.submissions.runner``) that is killed when a case exceeds the time limit and restarted for the
   next case;
3. checks that the result is a binary mask on the case's native grid and returns it as ``bool``.

Failures on a case raise a :class:`~bench.submissions.core.PredictionError` subclass (timeout, crash,
invalid output, missing prediction) carrying the case id, a message and a fix, so the harness can
record a failed row and go on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import bench
from bench.submissions.core import (
    InvalidPrediction,
    MissingPrediction,
    PredictionCrash,
    PredictionError,
    PredictionTimeout,
    PredictorOptions,
    validate_mask,
)
from bench.submissions.manifest import DEFAULT_TIME_LIMIT_S

if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Case
    from bench.submissions.core import Submission

#: Error classes a worker may report, by name (anything else becomes a crash).
ERROR_CLASSES: dict[str, type[PredictionError]] = {
    cls.__name__: cls for cls in (PredictionTimeout, PredictionCrash, InvalidPrediction, MissingPrediction)
}
_STDERR_TAIL_LINES = 15
#: Seconds a worker may take to start (interpreter and HIE-Bench imports, before any model code runs).
WORKER_STARTUP_TIMEOUT_S = 180.0


def blind_case(case: "Case") -> "Case":
    """The case as a model may see it: no reference label, no metadata table."""
    return dataclasses.replace(case, label_path=None, metadata={})


def case_to_json(case: "Case") -> dict[str, Any]:
    return {
        "case_id": case.case_id,
        "site": case.site,
        "image_paths": [str(p) for p in case.image_paths],
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


def make_predictor(submission: "Submission", options: PredictorOptions, *, isolate: bool | None) -> "SubmissionPredictor":
    from bench.submissions.kinds import KIND_LOADERS

    loader = KIND_LOADERS[submission.kind]
    if submission.kind == "python":
        isolate = True  # arbitrary user code always runs in its own process, under a time limit
    elif isolate is None:
        isolate = loader.runs_code
    return SubmissionPredictor(submission, options, isolate=isolate)


class SubmissionPredictor:
    """``predict(case) -> np.ndarray[bool]`` on the case's native grid; see the module docstring.

    Use as a context manager, or call :meth:`close`, to end the worker process.
    """

    def __init__(self, submission: "Submission", options: PredictorOptions, *, isolate: bool):
        self.submission = submission
        self.options = options
        self.isolate = isolate
        manifest_limit = getattr(submission.manifest, "time_limit_s", DEFAULT_TIME_LIMIT_S)
        self.time_limit_s = float(options.time_limit_s or manifest_limit)
        self._inner: Any = None
        self._worker: _Worker | None = None

    def predict(self, case: "Case") -> np.ndarray:
        """Predict the lesion mask of ``case`` (bool, ``case.geometry.shape``)."""
        expected_shape = case.geometry.shape
        model_case = blind_case(case)
        if self.isolate:
            if self._worker is None:
                self._worker = _Worker(self.submission, self.options, self.time_limit_s)
            result = self._worker.predict(model_case)
        else:
            result = self._predict_in_process(model_case)
        return validate_mask(result, expected_shape, case.case_id)

    def _predict_in_process(self, case: "Case") -> Any:
        from bench.submissions.kinds import KIND_LOADERS

        try:
            if self._inner is None:
                self._inner = KIND_LOADERS[self.submission.kind].build(self.submission, self.options)
            return self._inner.predict(case)
        except PredictionError:
            raise
        except Exception as exc:
            raise PredictionCrash(case.case_id, describe_exception(exc), "see the traceback above; run the model on this case locally") from exc

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


def describe_exception(exc: BaseException, *, lines: int = 8) -> str:
    """``Type: message`` plus the last lines of the traceback, for messages shown to submitters."""
    import traceback

    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip().splitlines()
    return f"{type(exc).__name__}: {exc}\n" + "\n".join(trace[-lines:])


class _Worker:
    """One ``python -m bench.submissions.runner`` process speaking JSON lines over stdin/stdout."""

    def __init__(self, submission: "Submission", options: PredictorOptions, time_limit_s: float):
        self.submission = submission
        self.options = options
        self.time_limit_s = time_limit_s
        self.folder = Path(tempfile.mkdtemp(prefix="hiebench-worker-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._count = 0

    def _start(self, case_id: str) -> None:
        env = dict(os.environ)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # importing the entry must not change the folder's content hash
        package_root = str(Path(bench.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self.stderr_path = self.folder / "stderr.log"
        work_dir = self.folder / "cwd"
        work_dir.mkdir(exist_ok=True)
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.submissions.runner"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=work_dir,
                env=env,
                start_new_session=True,  # its own process group, so a timeout kills its children too
            )
        self._buffer = b""
        ready = self._read_line(time.monotonic() + WORKER_STARTUP_TIMEOUT_S)
        if not ready:
            if ready is None:
                self.kill()
            self._raise_crash(case_id, f"the worker process did not start within {WORKER_STARTUP_TIMEOUT_S:g} s")
        try:
            self._exchange(
                {"submission": str(self.submission.path), "options": self.options.to_json()},
                case_id,
                f"loading the model took longer than {self.time_limit_s:g} s",
            )
        except PredictionError:
            self.kill()  # a worker without a model is useless; the next case starts a fresh one
            raise

    def predict(self, case: "Case") -> np.ndarray:
        if self.process is None or self.process.poll() is not None:
            self._start(case.case_id)
        self._count += 1
        output = self.folder / f"prediction-{self._count}.npy"
        self._exchange(
            {"case": case_to_json(case), "output": str(output)},
            case.case_id,
            f"no prediction within the time limit of {self.time_limit_s:g} s",
        )
        try:
            return np.load(output, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidPrediction(case.case_id, f"the model's output could not be read back ({exc})",
                                    "return a numeric or boolean numpy array") from exc
        finally:
            output.unlink(missing_ok=True)

    def _exchange(self, request: dict[str, Any], case_id: str, timeout_message: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            self._raise_crash(case_id)
        line = self._read_line(time.monotonic() + self.time_limit_s)
        if line is None:
            self.kill()
            raise PredictionTimeout(case_id, timeout_message,
                                    "make the model faster, or raise time_limit_s in submission.yaml if the limit is too strict")
        if line == b"":
            self._raise_crash(case_id)
        reply = json.loads(line)
        if not reply.get("ok"):
            error_class = ERROR_CLASSES.get(reply.get("error", ""), PredictionCrash)
            raise error_class(case_id, reply.get("message", "the model failed"), reply.get("fix", ""))

    def _read_line(self, deadline: float) -> bytes | None:
        """The next protocol line; ``b""`` when the worker died, ``None`` at the deadline."""
        assert self.process is not None and self.process.stdout is not None
        descriptor = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([descriptor], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(descriptor, 1 << 16)
            if not chunk:
                return b""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _raise_crash(self, case_id: str, what: str | None = None) -> None:
        code = self.process.wait(timeout=10) if self.process is not None else None
        self.process = None
        if what is None:
            how = f"exit code {code}" if code is None or code >= 0 else f"signal {signal.Signals(-code).name}"
            what = f"the model's process died ({how})"
        raise PredictionCrash(case_id, f"{what}\n{self.stderr_tail()}", "run the model on this case locally and fix the error shown")

    def stderr_tail(self) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").rstrip().splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_STDERR_TAIL_LINES:])

    def kill(self) -> None:
        """Kill the worker's process group (the worker and anything it started)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self.process = None

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None and self.process.stdin is not None:
            try:  # ask politely first: closing stdin ends the worker's loop
                self.process.stdin.close()
                self.process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)
