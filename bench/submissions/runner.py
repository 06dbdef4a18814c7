"""Worker process that hosts one submission's model: ``python -m bench.submissions.runner --reply-fd N``.

Started by :class:`bench.submissions.predictors.SubmissionPredictor` (usually inside the sandbox of
:mod:`bench.submissions.sandbox`); not meant to be run by hand.

Channels. Requests arrive as JSON lines on stdin. Replies leave as JSON lines on file descriptor ``N``, a
pipe that only the parent reads. Before any submission code runs, the worker

- marks ``N`` close-on-exec, and moves stdin to a private close-on-exec descriptor with ``/dev/null`` in
  its place, so processes the model starts inherit neither channel;
- leaves stdout and stderr alone: the parent points both at a log (shown when the model crashes), so the
  model's prints never touch the protocol.

The model runs in this process and could still write on ``N`` itself; all it can forge is its own
answer, which the parent checks like any other (docs/security.md).

Protocol. Once its own imports are done the worker says ``{"ok": true, "ready": true}`` (so start-up
never counts against a model's time limit). Every request carries a ``nonce`` that its one reply echoes:
``{"nonce": ..., "submission": folder, "options": {...}}`` loads the model;
``{"nonce": ..., "train": {...}}`` trains one fold and exports it (:func:`bench.submissions.training.fit_and_export`,
replied with ``{"nonce": ..., "ok": true, "budget": ...}``);
``{"nonce": ..., "case": {...}, "output": path.npy, "probability_output": path.npy, "uncertainty_output": path.npy}`` predicts one case
and saves the mask to ``output`` and, when the model returns a lesion probability map
(:mod:`bench.submissions.guard`), its ``uint8`` levels (:func:`bench.calibration.quantize`; NaN and values
outside [0, 1] are refused here) to ``probability_output``; with a probability, a voxel uncertainty the
model returned (``"uncertainty"``, its ``"uncertainty_source"``) as ``uint8`` levels over its source's range
(:func:`bench.uncertainty.quantize_uncertainty`; NaN, negative and out-of-range values are refused here)
to ``uncertainty_output``. Replies are ``{"nonce": ..., "ok": true}`` (with ``"probability": true`` when
the second file was written, and ``"uncertainty": source`` when the third was) or ``{"nonce": ..., "ok": false,
"error": class name, "message": ..., "fix": ...}``, messages cut to :data:`MAX_MESSAGE_CHARS`.

CPU time. The parent sets ``RLIMIT_CPU``'s soft limit to the per-case budget before the worker starts;
before each request the worker moves it to "used so far + budget", so the budget holds per case.
"""

from __future__ import annotations

import io
import json
import math
import os
import resource
import sys
from typing import Any, BinaryIO, TextIO

#: Longest message or fix in a reply (the parent refuses lines over 64 KiB).
MAX_MESSAGE_CHARS = 8000


class _Replies:
    """The reply channel: one JSON line per reply, written whole (a pipe write of up to 4 KiB is atomic)."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, **fields: Any) -> None:
        for key in ("message", "fix"):
            if isinstance(fields.get(key), str) and len(fields[key]) > MAX_MESSAGE_CHARS:
                fields[key] = fields[key][: MAX_MESSAGE_CHARS - 20] + "\n... (cut)"
        data = (json.dumps(fields) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]


class _CpuBudget:
    """Moves RLIMIT_CPU's soft limit forward before each request (see the module docstring)."""

    def __init__(self) -> None:
        soft, self.hard = resource.getrlimit(resource.RLIMIT_CPU)
        self.budget = None if soft == resource.RLIM_INFINITY else soft

    def renew(self) -> None:
        if self.budget is None:
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(usage.ru_utime + usage.ru_stime) + self.budget
        if self.hard != resource.RLIM_INFINITY:
            soft = min(soft, self.hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, self.hard))


def _memory_hint(exc: BaseException) -> str:
    """A fix naming the memory limit, when ``exc`` looks like an allocation failure."""
    text = str(exc).lower()
    if not (isinstance(exc, MemoryError) or "can't allocate memory" in text or "cannot allocate memory" in text):
        return ""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
    shown = "no limit" if limit == resource.RLIM_INFINITY else f"{limit >> 20} MB"
    return (f"the model ran out of memory (its limit: {shown}); use less memory, or raise limits.memory_mb in "
            "submission.yaml (up to the benchmark's ceiling, see docs/security.md)")


def serve(requests: TextIO, replies: _Replies) -> None:
    """Answer requests until stdin closes."""
    import numpy as np

    from bench.submissions.core import PredictionError, PredictorOptions, load_submission
    from bench.submissions.guard import model_output, probability_levels, split_prediction, uncertainty_levels, uncertainty_source_name
    from bench.submissions.kinds import KIND_LOADERS
    from bench.submissions.predictors import case_from_json, describe_exception

    budget = _CpuBudget()
    replies.send(ok=True, ready=True)  # start-up done: the model's time limit starts with the next request
    model = None
    for line in requests:
        request = json.loads(line)
        nonce = request.get("nonce", "")
        budget.renew()
        try:
            if "train" in request:  # a training worker: one request, then stdin closes
                from bench.submissions.training import fit_and_export

                replies.send(nonce=nonce, ok=True, **fit_and_export(request["train"]))
                continue
            if "submission" in request:
                submission = load_submission(request["submission"])
                options = PredictorOptions(**request["options"])
                model = KIND_LOADERS[submission.kind].build(submission, options)
                replies.send(nonce=nonce, ok=True)
                continue
            case = case_from_json(request["case"])
            raw = split_prediction(model_output(model, case), case.case_id)
            mask, probability = raw.mask, raw.probability
            if not isinstance(mask, np.ndarray):
                replies.send(nonce=nonce, ok=False, error="InvalidPrediction",
                             message=f"the model returned {type(mask).__name__}, expected a numpy array",
                             fix="return a numpy array (e.g. mask.astype(bool)); convert tensors with .cpu().numpy()")
                continue
            if mask.dtype == object:
                replies.send(nonce=nonce, ok=False, error="InvalidPrediction", message="the model returned an object array",
                             fix="return a boolean or numeric numpy array")
                continue
            if probability is None and raw.uncertainty is not None:
                replies.send(nonce=nonce, ok=False, error="InvalidPrediction", message="the model returned an uncertainty without a probability map",
                             fix="return the lesion probability with it: the uncertainty is scored with the probability's map")
                continue
            uncertainty = None  # the source name, when a third file is written
            if probability is not None:  # uint8 levels: a quarter of float32 on the way back, and what is stored
                np.save(request["probability_output"], probability_levels(probability, case.case_id), allow_pickle=False)
                if raw.uncertainty is not None:
                    uncertainty = uncertainty_source_name(raw.uncertainty_source, case.case_id)
                    np.save(request["uncertainty_output"], uncertainty_levels(raw.uncertainty, uncertainty, case.case_id), allow_pickle=False)
            np.save(request["output"], mask, allow_pickle=False)
            replies.send(nonce=nonce, ok=True, probability=probability is not None, **({"uncertainty": uncertainty} if uncertainty else {}))
        except PredictionError as exc:
            replies.send(nonce=nonce, ok=False, error=type(exc).__name__, message=exc.message, fix=exc.fix)
        except BaseException as exc:  # the model's own errors, SystemExit included
            stage = "training" if "train" in request else "loading the model" if "submission" in request else "predicting"
            fix = _memory_hint(exc) or "run the model on this case locally and fix the error shown"
            replies.send(nonce=nonce, ok=False, error="PredictionCrash", message=f"{stage} failed: {describe_exception(exc)}", fix=fix)
            if isinstance(exc, KeyboardInterrupt):
                raise


def _exit_when_orphaned(interval_s: float = 1.0) -> None:
    """End this worker if its parent dies (e.g. ``kill -9``) so a hung model cannot outlive the run.

    The worker runs in its own session (so a timeout can kill its whole process group), which also means
    signals sent to the parent's group do not reach it; polling the parent id catches the re-parenting.
    In the sandbox the parent is bwrap's init, which ``--die-with-parent`` ends along with the namespace.
    """
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _reply_fd(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--reply-fd" or not argv[1].isdigit():
        sys.exit("usage: python -m bench.submissions.runner --reply-fd N (started by HIE-Bench, not by hand)")
    return int(argv[1])


def _private_requests() -> BinaryIO:
    """Stdin moved to a close-on-exec descriptor; descriptor 0 becomes /dev/null for everyone else."""
    private = os.dup(0)  # os.dup makes non-inheritable descriptors
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return os.fdopen(private, "rb")


def main() -> None:
    fd = _reply_fd(sys.argv[1:])
    os.set_inheritable(fd, False)  # children of the model must not inherit the channel
    requests = _private_requests()
    _exit_when_orphaned()
    serve(io.TextIOWrapper(requests, encoding="utf-8"), _Replies(fd))


if __name__ == "__main__":
    main()
