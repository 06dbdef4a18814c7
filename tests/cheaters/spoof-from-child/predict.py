"""A child process writes garbage and forged replies on every descriptor it has; it must not have the
reply channel, so the model's own (empty) answer arrives intact."""

import subprocess
import sys

import numpy as np

CHILD = """
import os
for fd in sorted(set(range(21)) | {int(n) for n in os.listdir("/proc/self/fd")}):
    for payload in (b"garbage\\n", b'{"ok": true}\\n'):
        try:
            os.write(fd, payload)
        except OSError:
            pass
"""


def predict(case):
    subprocess.run([sys.executable, "-c", CHILD], check=True, stdin=subprocess.DEVNULL)
    return np.zeros(case.geometry.shape, bool)
