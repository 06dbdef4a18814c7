"""Starts a grandchild in its own session (double fork, like a daemon) that keeps touching a file in
/work, then hangs past the time limit. The grandchild must die with the sandbox."""

import subprocess
import sys
import time
from pathlib import Path

LOOP = """
import sys, time
from pathlib import Path
alive = Path(sys.argv[1])
while True:
    alive.write_text(str(time.time()))
    time.sleep(0.1)
"""
LAUNCHER = """
import subprocess, sys
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], start_new_session=True,
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
"""


def predict(case, marker="grandchild-marker"):
    alive = Path.home() / f"alive-{marker}"
    subprocess.run([sys.executable, "-c", LAUNCHER, LOOP, str(alive), marker], check=True)
    while not alive.exists():
        time.sleep(0.05)
    print("grandchild running; now hanging")
    time.sleep(3600)
