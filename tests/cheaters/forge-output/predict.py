"""Replaces numpy.save in its own process (the worker saves the prediction with it), so the benchmark
finds a symbolic link to a host file, a FIFO that would block a reader, or an .npy header declaring
a terabyte, instead of the prediction (option ``mode``)."""

import os

import numpy as np
from numpy.lib import format as npy


def _forge(mode):
    def save(path, array, allow_pickle=False):
        if mode == "symlink":
            os.symlink("/etc/hostname", path)  # resolved on the benchmark's side, where it exists
        elif mode == "fifo":
            os.mkfifo(path)
        else:
            with open(path, "wb") as handle:
                npy.write_array_header_1_0(handle, {"descr": "|b1", "fortran_order": False, "shape": (1 << 40,)})
    return save


def predict(case, mode="symlink"):
    np.save = _forge(mode)
    return np.zeros(case.geometry.shape, bool)
