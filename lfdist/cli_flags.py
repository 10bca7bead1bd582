"""The CLI flags that set a config key, in one table: the parser is built from it and the
given values land in the typed config (lfdist.config.with_values), after --config and the
dotted overrides. Every flag's help names its key, so a flag and `key=value` are one thing."""

from __future__ import annotations

import argparse
from typing import Any

from lfdist.constants import ENGINES

_ON = {"action": "store_true"}

# command -> [(flag, config key, argparse options)]
CONFIG_FLAGS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "probe": [
        ("--samples", "probe.samples", {"type": int, "help": "calibration examples"}),
        ("--orchestrator", "probe.orchestrator", {"choices": ["local", "ray"]}),
        ("--workers", "probe.workers", {"type": int, "help": "Ray probe replicas"}),
        ("--gradnorm", "probe.gradnorm", {**_ON, "help": "also one backward pass (gradnorm)"}),
        (
            "--ray-address",
            "probe.ray_address",
            {"help": "join this Ray cluster (default: RAY_ADDRESS or a local Ray)"},
        ),
        (
            "--stream-layers",
            "probe.stream_layers",
            {
                **_ON,
                "help": "load one block at a time (default: where the whole model would not "
                "fit in memory)",
            },
        ),
        (
            "--pilots",
            "probe.pilots",
            {
                **_ON,
                "help": "salf pilot fine-tunes, sized to probe.pilot_budget (5%%) of the "
                "train.steps run",
            },
        ),
        (
            "--pilot-steps",
            "probe.pilot_steps",
            {
                "type": int,
                "help": "salf pilots of this many steps (and half as many) per depth, ignoring "
                "the budget",
            },
        ),
        (
            "--critical-steps",
            "probe.critical_steps",
            {"type": int, "help": "all-block pilot for the critical strategy"},
        ),
    ],
    "train": [
        ("--engine", "train.engine", {"choices": list(ENGINES)}),
        ("--zero-stage", "train.zero_stage", {"type": int, "choices": [1, 2, 3]}),
        ("--nproc", "train.nproc", {"type": int, "help": "processes per node"}),
        ("--steps", "train.steps", {"type": int}),
        (
            "--eval-data",
            "data.eval_spec",
            {"help": "held-out data (default: held-out split of --data)"},
        ),
        (
            "--cache-frozen-prefix",
            "train.cache_frozen_prefix",
            {
                **_ON,
                "help": "replay the frozen prefix's outputs after the first epoch (skips its "
                "forward); held in memory up to train.cache_max_gib, or in a memory-mapped file "
                "per rank with train.cache_spill_dir=DIR",
            },
        ),
        (
            "--activation-checkpointing",
            "train.activation_checkpointing",
            {**_ON, "help": "non-reentrant checkpointing of the trainable blocks only"},
        ),
    ],
}


def add_config_flags(parser: argparse.ArgumentParser, command: str) -> None:
    for flag, key, options in CONFIG_FLAGS.get(command, []):
        help_text = options.get("help")
        options = {**options, "help": f"{help_text}; sets {key}" if help_text else f"sets {key}"}
        if "action" not in options and "choices" not in options:
            options["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, dest=key, default=None, **options)


def given_values(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """{config key: value} for the command's config flags the user gave."""
    return {
        key: getattr(args, key)
        for _, key, _ in CONFIG_FLAGS.get(command, [])
        if getattr(args, key, None) is not None
    }
