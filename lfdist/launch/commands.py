"""Pure builders of (argv, env) for torchrun and the deepspeed launcher; no side effects."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Nodes:
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of node 0 for multi-node
    hostfile: str | None = None  # deepspeed only


def _threads_per_rank(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


def base_env(nproc: int, engine: str, cuda: bool) -> dict[str, str]:
    env = {
        "OMP_NUM_THREADS": str(_threads_per_rank(nproc)),
        "LFDIST_ENGINE": engine,
        "TOKENIZERS_PARALLELISM": "false",
    }
    if engine == "deepspeed" and not cuda:
        env["DS_ACCELERATOR"] = "cpu"  # never set on GPU machines
    return env


def torchrun_command(
    job_path: str, nproc: int, engine: str, nodes: Nodes = Nodes(), cuda: bool = False
) -> tuple[list[str], dict[str, str]]:
    argv = [sys.executable, "-m", "torch.distributed.run"]
    if nodes.nnodes == 1 and nodes.rdzv_endpoint is None:
        argv += ["--standalone"]
    else:
        argv += [
            "--nnodes",
            str(nodes.nnodes),
            "--node-rank",
            str(nodes.node_rank),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            str(nodes.rdzv_endpoint),
        ]
    argv += ["--nproc-per-node", str(nproc), "-m", "lfdist.launch.worker", job_path]
    return argv, base_env(nproc, engine, cuda)


def deepspeed_command(
    job_path: str, nproc: int, nodes: Nodes = Nodes(), cuda: bool = False
) -> tuple[list[str], dict[str, str]]:
    # --num_gpus is needed even on CPU, else the launcher starts a world of 1.
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc)]
    if nodes.hostfile:
        argv += ["--hostfile", nodes.hostfile]
    if nodes.nnodes > 1:
        argv += ["--num_nodes", str(nodes.nnodes)]
        if nodes.rdzv_endpoint:
            host, _, port = nodes.rdzv_endpoint.partition(":")
            argv += ["--master_addr", host] + (["--master_port", port] if port else [])
    else:
        argv += ["--master_port", str(_free_port())]
    # --no_local_rank: the worker reads LOCAL_RANK from the environment, like under torchrun.
    argv += ["--no_local_rank", "--module", "lfdist.launch.worker", job_path]
    return argv, base_env(nproc, "deepspeed", cuda)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shell_line(argv: list[str], env: dict[str, str]) -> str:
    import shlex

    return " ".join(
        [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())] + [shlex.quote(a) for a in argv]
    )
