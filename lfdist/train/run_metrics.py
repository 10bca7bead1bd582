"""out/metrics.json: what one run did and measured, written by rank 0 when the run ends."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch

from lfdist.engines.base import optimizer_lrs
from lfdist.errors import UserError
from lfdist.plan import atomic_write_text


def run_metrics(run, result: dict, ended: dict) -> dict:
    """`run`: the rank's Run (lfdist.train.recipe); `ended`: what finish() measured after the
    loop (done, stopped signal, per_rank, eval, frozen digest after)."""
    cfg, tc, plan, added, engine = run.cfg, run.tc, run.plan, run.added, run.engine
    cache = added.cache
    return {
        "engine": tc.engine,
        "zero_stage": tc.zero_stage if tc.engine == "deepspeed" else None,
        "world_size": run.world.world_size,
        "device": str(run.world.device),
        # the dtypes the run held (bytes per parameter: predicted_run)
        "precision": dataclasses.asdict(engine.precision),
        # the cost model for this run as it started (engine, world, precision, batch),
        # next to the measured peak in per_rank[].memory
        "predicted_run": predicted_run(cfg, tc, plan, run.source, run.world),
        "plan": {
            "strategy": plan.strategy,
            "treatments": plan.treatments,
            "modules": plan.modules,
            "boundary": plan.boundary,
            "predicted": plan.predicted,
        },
        "params": {"trainable": run.applied.trainable, "frozen": run.applied.frozen},
        "losses": {str(k): v for k, v in result["losses"].items()},
        "step_times": result["step_times"],
        "engine_build_seconds": run.build_s,
        "per_rank": ended["per_rank"],
        "data": run.prepared.data_info,
        "eval": ended["eval"],
        "eval_before": run.eval_before,
        "resumed_from": run.start,
        "checkpointed_blocks": added.checkpointed,
        "prefix_cache": (
            {"hits": cache.hits, "misses": cache.misses, "spilled": cache.spilled}
            if cache
            else None
        ),
        "frozen_digest": {"before": run.frozen_before, "after": ended["frozen_after"]},
        "comms": engine.comm_volume(),
        "lrs": optimizer_lrs(engine.optimizer),  # peak lr of each treatment's group
        "trained_blocks": (
            {str(k): v for k, v in result["trained_blocks"].items()} if run.redraw else None
        ),
        "stopped": ended["stopped"],
    }


def predicted_run(cfg, tc, plan, source, world) -> dict:
    from lfdist.cost import predict_plan
    from lfdist.model.info import meta_model_info

    try:
        info = meta_model_info(source.spec, cfg.model.task, source.num_labels)
        return predict_plan(
            info,
            plan,
            engine=tc.engine,
            zero_stage=tc.zero_stage,
            world_size=world.world_size,
            dtype=cfg.model.dtype,
            precision=tc.precision,
            batch_size=tc.batch_size,
            seq_len=cfg.data.seq_len,
            activation_checkpointing=tc.activation_checkpointing,
        )
    except (UserError, KeyError, ValueError, OSError) as e:  # a model the cost model lacks
        return {"error": str(e).splitlines()[0]}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names and bytes: frozen weights unchanged bit for bit."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_metrics(out: str, metrics: dict) -> None:
    # A resumed run extends the losses of the run it continues.
    path = os.path.join(out, "metrics.json")
    if metrics["resumed_from"] and os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        metrics["losses"] = {
            **{k: v for k, v in old.get("losses", {}).items() if int(k) < metrics["resumed_from"]},
            **metrics["losses"],
        }
    atomic_write_text(path, json.dumps(metrics, indent=1, default=str))
