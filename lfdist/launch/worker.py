"""One rank of a training job. The same code runs under torchrun, deepspeed and Ray Train:
they all export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.

Usage (built by lfdist.launch.commands): python -m lfdist.launch.worker JOB.json
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _world():
    import torch
    import torch.distributed as dist

    from lfdist.engines.base import World

    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if os.environ.get("LFDIST_ENGINE") == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend=backend)
    return World(rank, world_size, local_rank, device)


def run_job(job: dict) -> None:
    from lfdist.train.job import run_training

    run_training(job, _world())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        job = json.load(f)
    code = 0
    try:
        run_job(job)
    except Exception as e:  # noqa: BLE001 — every failure must end this rank cleanly
        from lfdist.errors import UserError

        code = 2 if isinstance(e, UserError) else 1
        rank = int(os.environ.get("RANK", 0))
        if isinstance(e, UserError):
            if rank == 0:
                print(f"lfdist: error: {e}", file=sys.stderr)
                write_error(job, str(e))
        else:
            traceback.print_exc()
            write_error(job, f"CRASH rank {rank}: {type(e).__name__}: {e}")
    _shutdown(ok=code == 0)
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo can abort at interpreter exit ("terminate called without an active exception"),
    # which makes torchrun report a failure after a good run: leave without the teardown.
    os._exit(code)


def write_error(job: dict, message: str) -> None:
    """Ranks report failures through out/error.txt; a crash (not bad input) starts with CRASH."""
    try:
        with open(os.path.join(job["out"], "error.txt"), "a") as f:
            f.write(message + "\n")
    except OSError:
        pass


def raise_rank_error(error_file: str) -> None:
    """In the launching process: turn what a rank wrote into the right exception, if anything."""
    from lfdist.errors import UserError

    if os.path.exists(error_file):
        with open(error_file) as f:
            message = f.read().strip().splitlines()[0]
        if message.startswith("CRASH"):
            raise RuntimeError(f"training failed: {message}")
        raise UserError(message)


def _shutdown(ok: bool) -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":
    main()
