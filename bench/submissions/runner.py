"""Worker process that hosts one submission's model: ``python -m bench.submissions.runner``.

Started by :class:`bench.submissions.predictors.SubmissionPredictor`; not meant to be run by hand.
Protocol: JSON lines. Once its own imports are done the worker says ``{"ok": true, "ready": true}``
(so the benchmark's start-up never counts against a model's time limit). The first request ``{"submission": folder, "options": {...}}`` loads the model;
each further request ``{"case": {...}, "output": path.npy}`` predicts one case and saves the array to
``output``. Every request gets one reply line ``{"ok": true}`` or
``{"ok": false, "error": class name, "message": ..., "fix": ...}``.

The model's own prints would corrupt the protocol, so file descriptor 1 is redirected to stderr (which
the parent keeps in a log and shows when the model crashes) and replies go to a private copy of the
original stdout.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO


def _reply(channel: TextIO, **fields: Any) -> None:
    channel.write(json.dumps(fields) + "\n")
    channel.flush()


def serve(requests: TextIO, replies: TextIO) -> None:
    """Answer requests until stdin closes."""
    import numpy as np

    from bench.submissions.core import PredictionError, PredictorOptions, load_submission
    from bench.submissions.kinds import KIND_LOADERS
    from bench.submissions.predictors import case_from_json, describe_exception

    _reply(replies, ok=True, ready=True)  # start-up done: the model's time limit starts with the next request
    model = None
    for line in requests:
        request = json.loads(line)
        try:
            if "submission" in request:
                submission = load_submission(request["submission"])
                options = PredictorOptions(**request["options"])
                model = KIND_LOADERS[submission.kind].build(submission, options)
                _reply(replies, ok=True)
                continue
            case = case_from_json(request["case"])
            result = model.predict(case)  # type: ignore[union-attr]
            if not isinstance(result, np.ndarray):
                _reply(replies, ok=False, error="InvalidPrediction",
                       message=f"the model returned {type(result).__name__}, expected a numpy array",
                       fix="return a numpy array (e.g. mask.astype(bool)); convert tensors with .cpu().numpy()")
                continue
            if result.dtype == object:
                _reply(replies, ok=False, error="InvalidPrediction", message="the model returned an object array",
                       fix="return a boolean or numeric numpy array")
                continue
            np.save(request["output"], result, allow_pickle=False)
            _reply(replies, ok=True)
        except PredictionError as exc:
            _reply(replies, ok=False, error=type(exc).__name__, message=exc.message, fix=exc.fix)
        except BaseException as exc:  # the model's own errors, SystemExit included
            stage = "loading the model" if "submission" in request else "predicting"
            _reply(replies, ok=False, error="PredictionCrash", message=f"{stage} failed: {describe_exception(exc)}",
                   fix="run the model on this case locally and fix the error shown")
            if isinstance(exc, KeyboardInterrupt):
                raise


def _exit_when_orphaned(interval_s: float = 1.0) -> None:
    """End this worker if its parent dies (e.g. ``kill -9``) so a hung model cannot outlive the run.

    The worker runs in its own session (so a timeout can kill its whole process group), which also means
    signals sent to the parent's group do not reach it; polling the parent id catches the re-parenting.
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


def main() -> None:
    _exit_when_orphaned()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()
