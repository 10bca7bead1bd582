"""Experiment tracking from rank 0 while a job runs: out/metrics.jsonl always, and TensorBoard
or Weights & Biases where `train.report_to` names them (HF Trainer's `report_to`).

Each record: step, loss, learning rate per treatment group, gradient norm, tokens/s, step time
and peak memory so far, at the log interval. TensorBoard needs the `tensorboard` package
(`pip install tensorboard`); W&B needs `wandb` and works offline with WANDB_MODE=offline.
"""

from __future__ import annotations

import json
import os

from lfdist.config import parse_report_to
from lfdist.errors import UserError


def check_trackers(value: str) -> None:
    """Before anything starts: each named tracker's package is importable (one line if not)."""
    import importlib.util

    for name in parse_report_to(value):
        if importlib.util.find_spec(name) is None:
            raise UserError(
                f"train.report_to names {name}, which is not installed; pip install {name} "
                "(or drop it from train.report_to)"
            )


class Tracker:
    """Rank 0's sink for step records; other ranks get a Tracker that writes nothing."""

    def __init__(self, out: str, report_to: str, config: dict, active: bool, resumed: bool):
        self.active = active
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not active:
            return
        self._jsonl = open(os.path.join(out, "metrics.jsonl"), "a" if resumed else "w")
        names = parse_report_to(report_to)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(out, "tensorboard"))
        if "wandb" in names:
            import wandb

            self._wandb = wandb.init(project="lfdist", dir=out, config=config, resume="allow")

    def log(self, step: int, record: dict) -> None:
        if not self.active:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self._jsonl.flush()  # a long job's progress is readable while it runs
        flat = _flatten(record)
        if self._tb is not None:
            for key, value in flat.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(flat, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _flatten(record: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, int | float):
            out[name] = float(value)
    return out
