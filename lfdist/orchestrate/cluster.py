"""Start or join Ray, quietly and cheaply, and shut down only what we started.

- `address` (from `probe.ray_address`) or RAY_ADDRESS: join that cluster (multi-node).
- Ray already initialized in this process (a test fixture, a user's notebook): reuse it.
- Otherwise start a local Ray: no dashboard, a bounded object store, a short temp folder (Unix
  socket paths must stay under ~107 bytes) and RAY_AUTH_MODE=disabled unless the user set it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lfdist.errors import UserError

OBJECT_STORE_BYTES = 256 * 2**20  # probe shards and statistics are small; leave RAM to the model
TEMP_DIR = "/tmp/lfdist-ray"


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float
    nodes: int
    min_node_cpus: float


def temp_dir() -> str:
    # /tmp, not $TMPDIR: macOS and some schedulers set long TMPDIRs that overflow socket paths.
    base = "/tmp" if os.path.isdir("/tmp") else os.path.realpath(os.environ.get("TMPDIR", "."))
    return os.path.join(base, f"lfdist-ray-{os.getuid()}") if hasattr(os, "getuid") else TEMP_DIR


def start(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray; True when this call started (or joined) it and owns it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = dict(logging_level=logging.ERROR, log_to_driver=False)
    if address:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"cannot join the Ray cluster at {address!r} ({first}); check probe.ray_address / "
                "RAY_ADDRESS, or unset both to start a local Ray"
            ) from None
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        _temp_dir=temp_dir(),
        **quiet,
    )
    return True


def stop(started: bool) -> None:
    import ray

    if started and ray.is_initialized():
        ray.shutdown()


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Resources]:
    """`with ray_session(cfg.probe.ray_address, num_cpus=...) as res:` -> the cluster's resources."""
    started = start(address, num_cpus)
    try:
        yield resources()
    finally:
        stop(started)


def resources() -> Resources:
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [float(n.get("Resources", {}).get("CPU", 0.0)) for n in alive]
    total = ray.cluster_resources()
    return Resources(
        cpus=float(total.get("CPU", 0.0)),
        gpus=float(total.get("GPU", 0.0)),
        nodes=len(alive),
        min_node_cpus=min((c for c in cpus if c > 0), default=0.0),
    )


def threads_per_actor(res: Resources, workers: int) -> int:
    """CPU threads for each of `workers` actors: the cluster's CPUs shared out, whole nodes kept."""
    per_node = max(1, int(res.min_node_cpus) or 1)
    spread = max(1, int(res.cpus // max(1, workers))) if res.cpus else 1
    return max(1, min(per_node, spread))
