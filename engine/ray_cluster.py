"""Connecting to a Ray cluster: the one place that knows how `--ray ADDRESS` is read.

`labels --ray` (counting names in captions) and `build-index --ray` (encoding prompts on actors) take the
same addresses: host:port or ray://host:port of a running cluster, "auto" (the cluster this machine is part
of), or "local" (start a Ray instance here, with the CPUs asked for: what the tests use). Ray is an
optional dependency (the `ray` extra), imported only here and in the code that runs on it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import InputError


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when a Ray address cannot be reached (ray.init would retry for a minute)."""
    if address in ("local", "auto"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray {address!r} is not host:port (or ray://host:port, 'local', 'auto')")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise InputError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); start one (`ray start "
                         "--head`) or check --ray") from None


def import_ray():
    """The ray module, or a one-line InputError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'idia-engine[ray]' (or ray[data])") from None
    return ray


@contextmanager
def ray_connection(address: str, local_cpus: int) -> Iterator[object]:
    """Connected to the cluster at `address` for the block (a local instance with `local_cpus` CPUs for
    "local"); the ray module. A connection made by the caller is used as it is and left open."""
    check_ray_address(address)
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        init = {"num_cpus": local_cpus} if address == "local" else {"address": address}
        ray.init(**init, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()
