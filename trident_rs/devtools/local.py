"""A private local Ray + Serve for tests, benchmarks and demos on one machine."""
from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


def free_port(preferred: int | None = None) -> int:
    """`preferred` if it is free on loopback, else any free port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


@contextmanager
def private_serve(num_gpus: int = 0, num_cpus: int = 2, **ray_options) -> Iterator[int]:
    """Start a private Ray (never joining another cluster on this machine) and Serve's HTTP
    proxy on a free loopback port; yield the port; shut both down afterwards."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(address="local", num_gpus=num_gpus, num_cpus=num_cpus, include_dashboard=False, **ray_options)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
