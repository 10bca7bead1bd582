"""ProbeResult and probe.json: statistics, model and data description, timings, curves.

probe.json holds the raw mergeable statistics (tensors as base64 of little-endian bytes, so a
round trip is bit-exact) next to readable derived curves; `select` reads nothing else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from lfdist.errors import UserError
from lfdist.plan import Fingerprint, atomic_write_text, read_json
from lfdist.probe.stats import ProbeStats, merge_all, stats_from_dict, stats_to_dict

PROBE_VERSION = 1
PROBE_FILE = "probe.json"


@dataclass
class ProbeResult:
    task: str
    stats: ProbeStats
    model_info: dict[str, Any]
    data_info: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)  # per-layer lists; pilot records

    @property
    def n_blocks(self) -> int:
        return int(self.model_info["n_blocks"])

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(**self.model_info["fingerprint"])

    @property
    def deviation(self) -> list[float]:
        return self.curves["deviation"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PROBE_VERSION,
            "task": self.task,
            "model": self.model_info,
            "data": self.data_info,
            "timings": self.timings,
            "curves": self.curves,
            "stats": stats_to_dict(self.stats),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        return cls(
            d["task"],
            stats_from_dict(d["stats"]),
            d["model"],
            d["data"],
            d.get("timings", {}),
            d.get("curves", {}),
        )

    def save(self, path: str) -> str:
        """Write probe.json atomically (path: the file, or a folder to hold it)."""
        if os.path.isdir(path):
            path = os.path.join(path, PROBE_FILE)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def load_probe(path: str) -> ProbeResult:
    if os.path.isdir(path):
        path = os.path.join(path, PROBE_FILE)
    d = read_json(
        path, "probe file", "run `lfdist probe` first or check the path", "rerun `lfdist probe`"
    )
    if not isinstance(d, dict) or d.get("version") != PROBE_VERSION:
        version = d.get("version") if isinstance(d, dict) else None
        raise UserError(
            f"probe file {path!r} has format version {version!r}, this lfdist reads "
            f"{PROBE_VERSION}; rerun `lfdist probe`"
        )
    try:
        result = ProbeResult.from_dict(d)
        result.fingerprint  # noqa: B018  (validates the fingerprint fields)
        _check_block_count(result.model_info)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"probe file {path!r} is missing or has malformed fields ({e}); rerun `lfdist probe`"
        ) from None
    return result


def _check_block_count(info: dict[str, Any]) -> None:
    n, lists = info["n_blocks"], len(info["per_block_params"])
    if isinstance(n, bool) or not isinstance(n, int) or n != lists:
        raise ValueError(
            f"model n_blocks is {n!r}, not the whole number of blocks its per-block lists "
            f"hold ({lists})"
        )
    if info["fingerprint"]["n_blocks"] != n:
        raise ValueError(f"fingerprint n_blocks {info['fingerprint']['n_blocks']!r} is not {n}")


def merge_results(parts: list[ProbeResult]) -> ProbeResult:
    """One ProbeResult from disjoint shards (the Ray data-sharded backend merges with this)."""
    from lfdist.probe.deviation import derive_curves

    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    for p in parts[1:]:
        if p.model_info["fingerprint"] != first.model_info["fingerprint"]:
            raise ValueError("cannot merge probes of different models")
    stats = merge_all([p.stats for p in parts])
    data_info = dict(
        first.data_info,
        n_samples=stats.examples,
        n_targets=stats.count,
        seq_len=max(p.data_info["seq_len"] for p in parts),
    )
    keys = {k for p in parts for k in p.timings}
    # Shards run side by side: wall-clock is the slowest shard.
    timings = {k: max(p.timings.get(k, 0.0) for p in parts) for k in sorted(keys)}
    return ProbeResult(
        first.task,
        stats,
        dict(first.model_info),
        data_info,
        timings,
        derive_curves(stats, first.model_info),
    )
