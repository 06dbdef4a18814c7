"""Opens network connections: to a port the benchmark's host listens on, and to the internet."""

import socket

import numpy as np


def predict(case, port=0):
    for address in (("127.0.0.1", port), ("1.1.1.1", 53), ("8.8.8.8", 443)):
        try:
            connection = socket.create_connection(address, timeout=2)
        except OSError as exc:
            print("no connection to", address, exc)
            continue
        connection.sendall(case.case_id.encode())
        connection.close()
        raise RuntimeError(f"network reachable: connected to {address}")
    return np.zeros(case.geometry.shape, bool)
