"""Asks for far more memory than its limit: 1 TiB at once, then 64 MiB blocks until something gives."""

import numpy as np


def predict(case):
    try:
        np.ones(1 << 40, dtype=np.uint8)
    except MemoryError as exc:
        print("one huge block refused:", exc)
    blocks = []
    while True:
        blocks.append(np.ones(64 << 20, dtype=np.uint8))  # touched, so really used
