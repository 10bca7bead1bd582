"""Ray orchestration: the only lfdist package that imports ray (../../STYLE.md, layer L5).

- `cluster.ray_session`: join a cluster (`probe.ray_address` or RAY_ADDRESS) or start a quiet,
  bounded local Ray, and shut down only what it started.
- `probe.ray_probe`: data-sharded probing on Ray actors (one GPU each where there are GPUs),
  optionally layer-streamed (`stream.stream_probe`), with bounded retries of lost shards.
- `pilot.ray_pilots`: the salf pilot fine-tunes as one Ray task per depth.
- `train.ray_train`: Ray Train `TorchTrainer` running the same per-rank `run_training` as torchrun.

Importing this package imports neither ray nor torch; the submodules do, when called.
"""

__all__ = ["ray_pilots", "ray_probe", "ray_session", "ray_train", "stream_probe"]


def __getattr__(name: str):
    if name == "ray_probe":
        from lfdist.orchestrate.probe import ray_probe

        return ray_probe
    if name == "ray_pilots":
        from lfdist.orchestrate.pilot import ray_pilots

        return ray_pilots
    if name == "ray_session":
        from lfdist.orchestrate.cluster import ray_session

        return ray_session
    if name == "ray_train":
        from lfdist.orchestrate.train import ray_train

        return ray_train
    if name == "stream_probe":
        from lfdist.probe.stream import stream_probe

        return stream_probe
    raise AttributeError(name)
