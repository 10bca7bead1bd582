"""The oracle sweep of `lfdist bench quality` (SPEC 6): every split k trained with one recipe.

Split k freezes the bottom k blocks and trains the rest. Every split, and every other plan the
scoring needs, is trained by `lfdist.train.local.train_plan` (the run's engine, feeder and loop)
from the same loaded weights, with the same steps, lr, batch and seeds. Results are cached in
`oracle-<task>.json` (written after the sweep and after every further plan), so the strategies
can be re-scored with `--reuse DIR` without re-training.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from lfdist.plan import atomic_write_text

EVAL_BATCH = 16  # held-out forwards in batches of this size, whatever the training batch


def metric_of(task: str) -> str:
    return "perplexity" if task == "lm" else "accuracy"


def quality_value(task: str, quality: dict) -> float:
    """The user's metric: perplexity for lm, accuracy in points (0-100) for classifiers."""
    return quality["perplexity"] if task == "lm" else 100.0 * quality["accuracy"]


def plan_key(treatments: list[str], strategy: str = "split", options: dict | None = None) -> str:
    """What makes two trained plans the same run: treatments, plus lisa's schedule (its
    treatments show only the first draw) and lora's adapter shape."""
    key = "".join(
        {"frozen": "-", "full": "F", "lora": "L", "bias": "b", "mask": "m"}[t] for t in treatments
    )
    if strategy == "lisa":
        key += f"|lisa:n={options['n']},period={options['period']},seed={options['seed']}"
    if any(t == "lora" for t in treatments):
        extra = {k: v for k, v in (options or {}).items() if k.startswith("lora_")}
        key += "|" + json.dumps(extra, sort_keys=True)
    return key


# What a cached run depends on. The grid (ks), the seeds and the probe's settings may change
# between runs: runs are keyed by plan and seed, so a --reuse run trains only what is new.
RECIPE = ("model", "data", "task", "seq_len", "steps", "lr", "batch", "warmup", "max_examples")


def _recipe(settings: dict) -> dict:
    return {k: settings.get(k) for k in (*RECIPE, "max_eval", "n_eval")}


def train_one(model, plan, prepared, task: str, tc, seed: int) -> dict:
    """One run of `plan` (the only place the sweep trains)."""
    from lfdist.train.local import train_plan

    return train_plan(model, plan, prepared.train, prepared.heldout, task, tc, seed, EVAL_BATCH)


def prefix(n_blocks: int, k: int) -> list[str]:
    return ["frozen"] * k + ["full"] * (n_blocks - k)


class Oracle:
    """Trained runs of one task, keyed by plan and seed; persisted after every addition."""

    def __init__(self, path: str, settings: dict, n_blocks: int, log=print):
        self.path, self.settings, self.n_blocks, self.log = path, settings, n_blocks, log
        self.runs: dict[str, dict[str, dict]] = {}  # plan key -> seed -> run record

    @classmethod
    def load(cls, path: str, settings: dict, n_blocks: int, log=print) -> Oracle:
        oracle = cls(path, settings, n_blocks, log)
        with open(path) as f:
            blob = json.load(f)
        if _recipe(blob["settings"]) != _recipe(settings):
            from lfdist.errors import UserError

            raise UserError(
                f"--reuse: {path} was trained with another recipe ({_recipe(blob['settings'])}); "
                "rerun without --reuse"
            )
        oracle.runs = blob["runs"]
        return oracle

    def train(self, model, plan, prepared, tc, seeds: list[int]) -> list[dict]:
        """The runs of `plan` for every seed, training only those not cached."""
        key = plan_key(plan.treatments, plan.strategy, plan.options)
        done = self.runs.setdefault(key, {})
        for seed in seeds:
            if str(seed) in done:
                continue
            t0 = time.perf_counter()
            r = train_one(model, plan, prepared, self.task, tc, seed)
            done[str(seed)] = {
                "quality": quality_value(self.task, r["quality"]),
                "loss": r["quality"]["loss"],
                "median_step_s": r["median_step_s"],
                "train_s": sum(r["step_times"]),
                "wall_s": time.perf_counter() - t0,
                "final_train_loss": r["losses"][-1],
                "trainable_params": r["trainable_params"],
                "lr": r["lr"],
            }
            self.log(
                f"  {plan.strategy} {key} seed {seed}: {metric_of(self.task)} "
                f"{done[str(seed)]['quality']:.3f}, {r['median_step_s']:.3f} s/step"
            )
            self.save()
        return [done[str(s)] for s in seeds]

    @property
    def task(self) -> str:
        return self.settings["task"]

    def summary(self, key: str, seeds: list[int]) -> dict:
        """Mean and std (between seeds) of quality; median step seconds over the seeds."""
        rows = [self.runs[key][str(s)] for s in seeds]
        q = [r["quality"] for r in rows]
        return {
            "quality": q,
            "mean": statistics.fmean(q),
            "std": statistics.stdev(q) if len(q) > 1 else 0.0,
            "step_s": statistics.median(r["median_step_s"] for r in rows),
            "trainable_params": rows[0]["trainable_params"],
        }

    def splits(self, seeds: list[int]) -> dict[int, dict]:
        """Summaries of every frozen-prefix split k trained so far."""
        out = {}
        for k in range(self.n_blocks):
            key = plan_key(prefix(self.n_blocks, k))
            if key in self.runs and all(str(s) in self.runs[key] for s in seeds):
                out[k] = self.summary(key, seeds)
        return out

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        seeds = self.settings["seeds"]
        blob = {
            "settings": self.settings,
            "n_blocks": self.n_blocks,
            "metric": metric_of(self.task),
            "splits": {str(k): v for k, v in self.splits(seeds).items()},
            "runs": self.runs,
        }
        atomic_write_text(self.path, json.dumps(blob, indent=1))
