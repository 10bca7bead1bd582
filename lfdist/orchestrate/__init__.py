"""Ray orchestration: the only lfdist package that imports ray (../../STYLE.md, layer L5).

- `cluster.ray_session`: join a cluster (`probe.ray_address` or RAY_ADDRESS) or start a quiet,
  bounded local Ray, and shut down only what it started.
- `probe.ray_probe`: data-sharded probing on Ray actors (one GPU each where there are GPUs),
  optionally layer-streamed (`stream.stream_probe`), with bounded retries of lost shards.
- `pilot.ray_pilots`: the salf pilot fine-tunes as one Ray task per depth.
- `train.ray_train`: Ray Train `TorchTrainer` running the same per-rank `run_training` as torchrun.

Importing this package imports neither ray nor torch; the submodules do, when called.
"""

from lfdist.lazy import lazy_exports

__all__ = ["ray_pilots", "ray_probe", "ray_session", "ray_train", "stream_probe"]


__getattr__ = lazy_exports(
    {  # name -> module
        "ray_pilots": "lfdist.orchestrate.pilot",
        "ray_probe": "lfdist.orchestrate.probe",
        "ray_session": "lfdist.orchestrate.cluster",
        "ray_train": "lfdist.orchestrate.train",
        "stream_probe": "lfdist.probe.stream",
    }
)
