"""Probe: forward-only statistics of every latent space, mergeable across shards.

Pure torch: a cross-rank reduction is passed in as a callable, never imported here.
"""

from lfdist.probe.result import PROBE_FILE, ProbeResult, load_probe, merge_results
from lfdist.probe.run import run_probe
from lfdist.probe.stats import ProbeStats, merge, merge_all

__all__ = [
    "PROBE_FILE",
    "ProbeResult",
    "ProbeStats",
    "load_probe",
    "merge",
    "merge_all",
    "merge_results",
    "run_probe",
]
