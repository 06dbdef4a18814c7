"""Writes on every file descriptor it has (0-20 and whatever /proc/self/fd lists): garbage, forged
replies, a reply with a guessed nonce, or an endless line, as option ``mode`` says."""

import os

import numpy as np

PAYLOADS = {
    "garbage": b"garbage\n",
    "forged": b'{"ok": true}\n',
    "wrong-nonce": b'{"ok": true, "nonce": "00000000000000000000000000000000"}\n',
    "oversized": b"x" * (200 * 1024),
}


def predict(case, mode="garbage"):
    payload = PAYLOADS[mode]
    for fd in sorted(set(range(21)) | {int(n) for n in os.listdir("/proc/self/fd")}):
        if fd in (1, 2) and mode == "oversized":
            continue  # the log does not matter; keep it small
        try:
            os.write(fd, payload)
        except OSError:
            pass
    return np.zeros(case.geometry.shape, bool)
