"""One rank of the DeepSpeed engine checks (run by test_deepspeed.py under torchrun, 2 ranks).

Usage: torchrun --standalone --nproc-per-node 2 deepspeed_worker.py OUT.json STAGE [STAGE ...]

For each ZeRO stage it runs every case of CASES for STEPS steps and rank 0 writes, per case:
the step losses, every rank's local_counts (mid-accumulation, after the last backward, after
the step), whether frozen weights stayed bit-identical and trainable ones moved, and for the
resumable cases the losses and weights of a run resumed from a checkpoint. The module also
holds what the test needs without a process group: the models, the batches, the reference.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time

import torch

STEPS, MICRO, ACCUM, SEQ = 3, 2, 2, 16
WORLD = 2
HYPER = dict(
    steps=STEPS,
    batch_size=MICRO,
    grad_accum=ACCUM,
    lr=1e-3,
    weight_decay=0.01,
    warmup_steps=1,
    max_grad_norm=1.0,
    seed=0,
)
# name: (model, frozen blocks or None, with a save/resume round, ZeRO-3 replicated frozen)
CASES = {
    "full": ("tiny", None, False, False),
    "prefix": ("tiny", "prefix", True, False),
    "sparse_odd": ("odd", (1, 4, 6), False, False),
    "prefix_replicated": ("tiny", "prefix", True, True),  # ZeRO-3 only
}


def cases_for(stage: int) -> list[str]:
    return [c for c, spec in CASES.items() if not spec[3] or stage == 3]


def make_model(kind: str, frozen):
    """The tiny llama, or a variant with odd-sized MLP biases so that partitions need padding."""
    from lfdist.model.tiny import build_tiny, tiny_config

    if kind == "tiny":
        model = build_tiny("llama", "lm", seed=0)
    else:
        import transformers

        cfg = tiny_config("llama")
        cfg.intermediate_size, cfg.mlp_bias = 129, True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(cfg)
    if frozen is not None:
        blocks = range(4) if frozen == "prefix" else frozen
        if frozen == "prefix":
            model.model.embed_tokens.requires_grad_(False)
        for i in blocks:
            model.model.layers[i].requires_grad_(False)
    return model


def batch(step: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    ids = torch.randint(0, 256, (MICRO, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@functools.cache
def reference_losses(case: str) -> tuple[float, ...]:
    """Single process, plain PyTorch, the same global batch (every rank's micro-batches)."""
    from lfdist.config import TrainConfig
    from lfdist.engines.base import make_optimizer, make_scheduler, trainable_parameters

    kind, frozen, _, _ = CASES[case]
    model = make_model(kind, frozen)
    cfg = TrainConfig(engine="single", **HYPER)
    params = trainable_parameters(model)
    opt, losses = make_optimizer(params, cfg), []
    sched = make_scheduler(opt, cfg)
    for step in range(STEPS):
        micro_losses = []
        for m in range(ACCUM):
            for r in range(WORLD):
                loss = model(**batch(step, m, r)).loss
                (loss / (ACCUM * WORLD)).backward()
                micro_losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=False)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(sum(micro_losses) / len(micro_losses))
    return tuple(losses)


# ------------------------------------------------------------------ per-rank part


def _config(stage: int, replicate: bool):
    from lfdist.config import TrainConfig

    return TrainConfig(
        engine="deepspeed", zero_stage=stage, nproc=WORLD, zero3_replicate_frozen=replicate, **HYPER
    )


def _frozen_weights(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    module = engine.model.module
    named = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    named += [
        (f"{m}.{n}" if m else n, b)
        for m, mod in module.named_modules()
        for n, b in mod.named_buffers(recurse=False)
        if n in ("weight", "bias")
    ]
    params = [p for _, p in named if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        return {n: p.detach().clone() for n, p in named}


def _gather(obj):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _train(engine, rank: int, steps, record: dict | None = None) -> list[float]:
    import torch.distributed as dist

    losses = []
    for step in steps:
        micro = []
        for m in range(ACCUM):
            micro.append(engine.micro_step(batch(step, m, rank), 1.0 / ACCUM))
            if record is not None and step == 0 and m == 0:
                record["mid_accumulation"] = engine.local_counts()
        if record is not None and step == 0:
            record["after_backward"] = engine.local_counts()
            record["frozen_grads"] = sum(
                p.grad is not None for p in engine.model.module.parameters() if not p.requires_grad
            )
        engine.optimizer_step()
        if record is not None and step == 0:
            record["after_step"] = engine.local_counts()
        mean = torch.tensor([torch.stack(micro).mean().item()], dtype=torch.float64)
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    return losses


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def run_case(stage: int, case: str, world, tmp: str) -> dict:
    import torch.distributed as dist

    from lfdist.engines import build_engine

    kind, frozen, resume, replicate = CASES[case]
    cfg = _config(stage, replicate)
    model = make_model(kind, frozen)
    names = {n: p.numel() for n, p in model.named_parameters()}
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    trainable_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }
    frozen_ptrs = {n: p.data_ptr() for n, p in model.named_parameters() if not p.requires_grad}
    t0 = time.perf_counter()
    engine = build_engine("deepspeed", model, None, cfg, world)
    build_s = time.perf_counter() - t0
    record: dict = {}
    t0 = time.perf_counter()
    losses = _train(engine, world.rank, range(STEPS - 1), record)
    folder = os.path.join(tmp, f"z{stage}-{case}")
    if resume:
        os.makedirs(folder, exist_ok=True)
        engine.save(folder)
    losses += _train(engine, world.rank, [STEPS - 1])
    train_s = time.perf_counter() - t0
    after = engine.full_trainable_state()
    frozen_after = _frozen_weights(engine)
    out = {
        "losses": losses,
        "counts": record,
        "param_order": [(n, names[n]) for n in trainable_names],
        "frozen_numels": [v.numel() for v in frozen_before.values()],
        "frozen_identical": sorted(frozen_before) == sorted(frozen_after)
        and all(torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before),
        # Replicated frozen weights are the very tensors the model had: never re-allocated.
        "frozen_never_gathered": replicate
        and {t.data_ptr() for _, _, t in engine.frozen_buffers} == set(frozen_ptrs.values())
        and not any(hasattr(t, "ds_id") for _, _, t in engine.frozen_buffers),
        "trainable_names_match": sorted(after) == sorted(trainable_before),
        "trainable_unchanged": [
            k for k in trainable_before if torch.equal(trainable_before[k], after[k])
        ],
        "build_s": build_s,
        "train_s": train_s,
    }
    if resume:
        # A fresh model and engine, restored from the checkpoint, must redo the last step exactly.
        engine2 = build_engine("deepspeed", make_model(kind, frozen), None, cfg, world)
        engine2.load(folder)
        out["resumed_losses"] = _train(engine2, world.rank, [STEPS - 1])
        out["resumed_weight_max_diff"] = _max_diff(after, engine2.full_trainable_state())
        out["resumed_global_steps"] = int(engine2.model.global_steps)
        out["resumed_lr"] = engine2.optimizer.param_groups[0]["lr"]
        out["lr"] = engine.optimizer.param_groups[0]["lr"]
    dist.barrier()
    return out


def main(argv: list[str]) -> None:
    import logging

    import deepspeed
    import torch.distributed as dist

    from lfdist.engines.base import World
    from lfdist.engines.deepspeed import release_shm_name

    deepspeed.init_distributed(dist_backend="gloo")
    dist.barrier()
    release_shm_name(dist.get_rank())  # no 66 MB of /dev/shm left per rank
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    world = World(rank, world_size, int(os.environ.get("LOCAL_RANK", rank)), torch.device("cpu"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = _gather(tmp)[0]  # rank 0's folder: checkpoints need one shared place
        for stage in map(int, argv[1:]):
            for case in cases_for(stage):
                mine = run_case(stage, case, world, tmp)
                everyone = _gather(mine)
                results[f"{stage}/{case}"] = {
                    **{k: v for k, v in mine.items() if k != "counts"},
                    "ranks": [r["counts"] for r in everyone],
                    "resumed_ranks": [r.get("resumed_losses") for r in everyone],
                }
        dist.barrier()
    if rank == 0:
        with open(argv[0], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    code = 0
    try:
        main(sys.argv[1:])
    except Exception:  # noqa: BLE001 — report, then leave cleanly
        import traceback

        traceback.print_exc()
        code = 1
    import torch.distributed as dist

    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gloo can abort at interpreter exit (SPEC 8)
