# Run (CPU or GPU, 2 ranks, DDP through the Trainer):
#   torchrun --standalone --nproc-per-node 2 configs/hf_trainer_example.py \
#       --model tiny:llama --plan plan.yaml --out runs/hf
# Run (DeepSpeed ZeRO-2 through the Trainer; also runs on CPU under torchrun, see docs/hf_trainer.md):
#   torchrun --nproc-per-node 8 configs/hf_trainer_example.py --model <hub id or folder> \
#       --data <data spec> --plan plan.yaml --out runs/hf --deepspeed configs/deepspeed/zero2.json --bf16
"""lfdist plan + transformers.Trainer: apply the plan first, then let the Trainer do the rest.

What transformers 5.24 does with a planned model (read in its source, checked by
tests/integration/test_hf_trainer.py):

- `Trainer.create_optimizer` builds two groups (weight decay / none, names from
  `get_decay_parameter_names`) and keeps a parameter only if `p.requires_grad`. So frozen
  parameters get no optimizer state, provided requires_grad is set before `trainer.train()`
  (the optimizer is created lazily inside it). With a DeepSpeed config that has its own
  "optimizer" section, `deepspeed_init` hands DeepSpeed `filter(requires_grad, ...)` as well.
  A group can come out empty (a plan that trains only norms: all no-decay); torch accepts
  that and DeepSpeed 0.19.8 drops empty groups before ZeRO sees them. Not covered by the
  filter: optimizer factories (Muon, Dion), GaLore and LOMO get the whole model, and an
  optimizer passed in `Trainer(optimizers=...)` is whatever you built.
- `TrainingArguments(gradient_checkpointing=True)` (alias of `activation_checkpointing`)
  calls `model.activation_checkpointing_enable`, which calls `enable_input_require_grads()` for
  every model whose input is `input_ids`, even with `use_reentrant: False`. That makes the
  embedding output require grad, so backward runs through every frozen block again. Hence this
  script never sets that flag; `--activation-checkpointing` wraps the trainable blocks only,
  non-reentrant, with lfdist's helper.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

import torch

import lfdist
from lfdist.data import load_task_data
from lfdist.model.specs import load_model


class Examples(torch.utils.data.Dataset):
    """Rows of lfdist's tensors (input_ids, attention_mask, labels) as the Trainer wants them."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="tiny:<arch>, pkg:<name>, a folder or a hub id")
    p.add_argument("--plan", required=True, help="plan.yaml from `lfdist select`")
    p.add_argument("--out", required=True, help="output folder (the trained HF model)")
    p.add_argument("--data", default="synthetic:lm:200")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2, help="per device")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--deepspeed",
        default=None,
        help="DeepSpeed JSON; its 'auto' values are filled from TrainingArguments",
    )
    p.add_argument("--bf16", action="store_true")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="checkpoint the trainable blocks only, non-reentrant",
    )
    p.add_argument("--report", default=None, help="write a JSON of verifiable facts (for tests)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import transformers

    args = parse_args(argv)
    loaded = load_model(args.model, "lm")
    model = loaded.model
    train, _heldout, _info = load_task_data(args.data, "lm", loaded.tokenizer, args.seq_len)

    # The one lfdist call: requires_grad per the plan, BEFORE the Trainer exists, so DDP,
    # DeepSpeed and FSDP all see the final trainable set. No enable_input_require_grads.
    applied = lfdist.apply_plan(model, lfdist.load_plan(args.plan))
    if args.activation_checkpointing:
        from lfdist.model.checkpointing import checkpoint_trainable_blocks

        checkpoint_trainable_blocks(model)
    report = Report(model) if args.report else None

    targs = transformers.TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        bf16=args.bf16,
        deepspeed=args.deepspeed,
        # Every trainable parameter gets a gradient each step: no unused-parameter search.
        ddp_find_unused_parameters=False,
        # On a machine without a GPU, only use_cpu=True makes accelerate set up gloo DDP under
        # torchrun; without it every rank silently trains alone on the full data.
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        # Never gradient_checkpointing=True here: see the module docstring.
    )
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=Examples(train))
    trainer.train()
    trainer.save_model(args.out)  # a full HF folder: frozen base weights + trained blocks
    if trainer.is_world_process_zero():
        shutil.copy(args.plan, os.path.join(args.out, "plan.yaml"))
    if report is not None:
        report.write(args.report, trainer, applied)


class Report:
    """Facts a test can check exactly: optimizer state per rank, frozen weights untouched."""

    def __init__(self, model: torch.nn.Module):
        from lfdist.model.blocks import find_blocks
        from lfdist.train.measure import BackwardTracer

        self.model = model
        self.before = {"frozen": _digest(model, False), "trainable": _digest(model, True)}
        self.tracer = BackwardTracer(find_blocks(model).blocks(model))

    def write(self, path: str, trainer, applied) -> None:
        import torch.distributed as dist

        opt = trainer.optimizer
        while hasattr(opt, "optimizer"):  # AcceleratedOptimizer / DeepSpeed ZeRO wrap a torch one
            opt = opt.optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        rank = {
            "rank": dist.get_rank() if dist.is_initialized() else 0,
            "parallel_mode": str(trainer.args.parallel_mode.value),
            "wrapper": type(trainer.model_wrapped).__name__,
            "optimizer": type(opt).__name__,
            "param_group_elements": [sum(p.numel() for p in g["params"]) for g in opt.param_groups],
            "frozen_params_in_optimizer": sum(1 for p in params if not p.requires_grad),
            "optimizer_state_elements": sum(
                v.numel()
                for s in opt.state.values()
                for k, v in s.items()
                if k != "step" and isinstance(v, torch.Tensor)
            ),
            "frozen_params_with_grad": sum(
                1 for p in self.model.parameters() if not p.requires_grad and p.grad is not None
            ),
            "backward_blocks": sorted(self.tracer.reached),
            "frozen_sha256": {"before": self.before["frozen"], "after": _digest(self.model, False)},
            "trainable_sha256": {
                "before": self.before["trainable"],
                "after": _digest(self.model, True),
            },
        }
        ranks = [rank]
        if dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, rank)
        if trainer.is_world_process_zero():
            losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
            out = {
                "world_size": len(ranks),
                "trainable_elements": applied.trainable,
                "frozen_elements": applied.frozen,
                "losses": losses,
                "ranks": ranks,
            }
            with open(path, "w") as f:
                json.dump(out, f, indent=1)


def _digest(model: torch.nn.Module, trainable: bool) -> str:
    """sha256 over the bytes of the frozen (or trainable) parameters, by name."""
    from lfdist.engines.base import clean_name

    named = sorted(
        (clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad == trainable
    )
    h = hashlib.sha256()
    for name, p in named:
        # ZeRO-3 partitions every parameter: gather it (GPU runs only).
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                data = p.detach().cpu().contiguous()
        else:
            data = p.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(data.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    main()
    # gloo can abort a rank at interpreter exit after a good run: leave explicitly.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
