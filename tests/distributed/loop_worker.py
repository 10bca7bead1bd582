"""One rank of the loop tests (tests/distributed/test_loop.py): the real engine and train_loop on
tiny:llama under 2-rank gloo, observed from outside the product code.

Observation: DDP's gradient all-reduce through a counting comm hook (registered again whenever
the engine rebuilds its wrapper), FSDP2's reduce-scatter by wrapping its collective; the weights
of every block, gathered in full, before every step (the loop's `stop` callback runs there on
every rank); what each `save(step)` would write. Results go to out/rank{r}.pt.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

N_BLOCKS = 8


def run(rank: int, world_size: int, port: int, out: str, scenarios: list[dict]) -> None:
    """Runs the scenarios one after another in one process group (a spawn costs seconds)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = [_scenario(rank, world_size, sc) for sc in scenarios]
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _scenario(rank: int, world_size: int, sc: dict) -> dict:
    from lfdist.config import config_from_dict
    from lfdist.engines import build_engine
    from lfdist.engines.base import World
    from lfdist.errors import UserError
    from lfdist.model.apply import apply_plan
    from lfdist.model.tiny import build_tiny
    from lfdist.train.feed import StepFeeder
    from lfdist.train.loop import train_loop
    from tests.helpers import make_plan

    tc = config_from_dict({"train": {"nproc": world_size, **sc["train"]}}).train
    world = World(rank, world_size, rank, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_tiny("llama", "lm")
    plan = make_plan(model, sc["treatments"], strategy=sc.get("strategy", "test"))
    if "options" in sc:
        from dataclasses import replace

        plan = replace(plan, options=sc["options"])
    apply_plan(model, plan)
    redraw = None
    if plan.strategy == "lisa":
        from lfdist.train.redraw import LisaSchedule

        redraw = LisaSchedule(plan)
    engine = build_engine(tc.engine, model, None, tc, world)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 320, (64, 16), generator=g)
    data = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    feeder = StepFeeder(data, tc.batch_size, tc.grad_accum, world_size, rank, tc.seed)

    reduced: list[list[int]] = []  # per step: elements of each gradient reduction
    hooked: list[object] = []

    def counting_hook(state, bucket):
        reduced[-1].append(bucket.buffer().numel())
        buf = bucket.buffer().div_(world_size)
        fut = dist.all_reduce(buf, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    def hook_ddp() -> None:
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(engine.model, DistributedDataParallel) and engine.model not in hooked:
            engine.model.register_comm_hook(None, counting_hook)
            hooked.append(engine.model)

    if tc.engine == "fsdp2":
        _count_reduce_scatter(reduced)
    elif tc.engine == "fsdp1":
        _count_fsdp1_reduce_scatter(reduced)

    if redraw is not None:  # re-register the counting hook on a rebuilt DDP wrapper
        at = redraw.at

        def at_and_hook(engine_, step):
            drawn = at(engine_, step)
            hook_ddp()
            return drawn

        redraw.at = at_and_hook
    hook_ddp()

    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    saved: dict[int, dict[str, torch.Tensor]] = {}
    lr_bomb = sc.get("lr_bomb_at")

    def stop(step: int) -> bool:
        snapshots[step] = _full_blocks(engine)
        reduced.append([])
        if step == lr_bomb:  # from this step on the lr explodes
            engine.scheduler.base_lrs = [1e30] * len(engine.optimizer.param_groups)
            for group in engine.optimizer.param_groups:
                group["lr"] = 1e30
        return False

    def save(step: int) -> None:
        saved[step] = _full_blocks(engine)

    error = None
    result = {}
    try:
        result = train_loop(
            engine, feeder, tc, world, 0, save, log=lambda s: None, redraw=redraw, stop=stop
        )
    except UserError as e:
        error = str(e)
    snapshots[len(snapshots)] = _full_blocks(engine)
    return {
        "error": error,
        "losses": result.get("losses"),
        "trained_blocks": result.get("trained_blocks"),
        "snapshots": snapshots,
        "saved": saved,
        "reduced": reduced,
        "optimizer_state_params": len(engine.optimizer.state),
        "optimizer_params": sum(len(g["params"]) for g in engine.optimizer.param_groups),
        "lrs": {g["treatment"]: g["lr"] for g in engine.optimizer.param_groups},
    }


def _count_reduce_scatter(reduced: list[list[int]]) -> None:
    """FSDP2's reduce-scatter of gradients, counted into reduced[-1] (the current step)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as coll

    cls = coll.DefaultReduceScatter
    original = getattr(cls, "_uncounted", cls.__call__)

    def counting(self, output_tensor, input_tensor, *a, **kw):
        reduced[-1].append(input_tensor.numel())
        return original(self, output_tensor, input_tensor, *a, **kw)

    cls._uncounted = original
    cls.__call__ = counting


def _count_fsdp1_reduce_scatter(reduced: list[list[int]]) -> None:
    """FSDP1 reduce-scatters each unit's flat gradient through dist.reduce_scatter_single."""
    original = getattr(dist, "_uncounted_rs", dist.reduce_scatter_single)

    def counting(output, input, *a, **kw):
        reduced[-1].append(input.numel())
        return original(output, input, *a, **kw)

    dist._uncounted_rs = original
    dist.reduce_scatter_single = counting


def _full_blocks(engine) -> dict[str, torch.Tensor]:
    """Every parameter in full (collective: FSDP2 shards are gathered), by original name."""
    from lfdist.engines.base import clean_name

    out = {}
    for name, p in engine.model.named_parameters():
        full = getattr(p, "full_tensor", None)
        out[clean_name(name)] = (full() if full is not None else p).detach().clone()
    return out
