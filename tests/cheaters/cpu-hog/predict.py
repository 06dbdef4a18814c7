"""Spins on the CPU past its limit (the manifest's limits.cpu_s), well inside the wall-clock limit."""


def predict(case):
    total = 0
    while True:
        total += 1
