"""Loading at scale on 2 gloo ranks: the meta-device path against the whole-model load.

- FSDP2, FSDP1, ZeRO-3 and DDP through the real launcher: the same losses as every rank
  loading the whole model (debug.load_whole), and frozen weights bit-identical before and
  after training and between the two paths;
- FSDP2: each rank reads from the safetensors files exactly the elements of its own shards
  (every tensor it reads is a row range of one it owns), and the two ranks together read
  each checkpoint element once.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lfdist.config import config_from_dict
from lfdist.job import Debug, Job
from lfdist.launch.run import launch_training
from lfdist.model.tiny import build_tiny
from lfdist.plan import save_plan
from tests.helpers import make_plan

TOP2 = ["frozen"] * 6 + ["full"] * 2
LORA = ["frozen"] * 5 + ["lora", "full", "full"]


def _run(tmp_path, name, engine, treatments, whole, arch="llama", **train):
    cfg = config_from_dict(
        {
            "model": {"spec": f"tiny:{arch}"},
            "data": {"spec": "synthetic:lm:200", "seq_len": 32},
            "train": {"engine": engine, "nproc": 2, "steps": 3, "batch_size": 2, "lr": 1e-3}
            | train,
        }
    )
    plan = str(tmp_path / f"{name}.yaml")
    save_plan(make_plan(build_tiny(arch, "lm"), treatments), plan)
    debug = Debug(check_frozen=True, load_whole=whole)
    return launch_training(Job(cfg, plan, str(tmp_path / f"{name}-{whole}"), debug=debug))


def _same_run(tmp_path, engine, treatments, arch="llama", **train):
    whole = _run(tmp_path, "p", engine, treatments, True, arch, **train)
    sharded = _run(tmp_path, "p", engine, treatments, False, arch, **train)
    assert list(sharded["losses"]) == ["0", "1", "2"]
    for step, loss in whole["losses"].items():
        assert sharded["losses"][step] == pytest.approx(loss, rel=1e-6, abs=0)
    digests = {
        **whole["frozen_digest"],
        **{f"s{k}": v for k, v in sharded["frozen_digest"].items()},
    }
    assert len(set(digests.values())) == 1  # loaded identically, untouched by training
    assert sharded["params"] == whole["params"]
    return whole, sharded


@pytest.mark.slow
def test_fsdp2_lora_and_activation_checkpointing_same_as_whole_load(tmp_path):
    _, sharded = _same_run(tmp_path, "fsdp2", LORA, activation_checkpointing=True)
    assert sharded["checkpointed_blocks"] == [5, 6, 7]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "ddp", "fsdp1"])
def test_tied_head_same_as_whole_load(tmp_path, engine):
    """GPT-2 ties its head to the embeddings: the fill keeps them one parameter (to_empty
    alone makes one per module, and the embeddings were then never read)."""
    _same_run(tmp_path, engine, TOP2, arch="gpt2")


@pytest.mark.slow
def test_fsdp1_same_as_whole_load(tmp_path):
    _same_run(tmp_path, "fsdp1", TOP2)


@pytest.mark.slow
def test_ddp_with_prefix_cache_same_as_whole_load(tmp_path):
    _, sharded = _same_run(tmp_path, "ddp", TOP2, cache_frozen_prefix=True)
    assert sharded["prefix_cache"]["misses"] > 0


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero3_same_as_whole_load(tmp_path):
    before = _shm_buffers()
    _same_run(tmp_path, "deepspeed", LORA, zero_stage=3)
    # DeepSpeed's CPU all-reduce buffers (66 MB of /dev/shm per rank) are not left behind.
    assert _shm_buffers() - before == set()


def _shm_buffers() -> set[str]:
    shm = "/dev/shm"
    names = os.listdir(shm) if os.path.isdir(shm) else []
    return {n for n in names if n.startswith("deepspeed_allreduce_buffer_")}


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero3_replicated_frozen_prefix_same_as_whole_load(tmp_path):
    _same_run(tmp_path, "deepspeed", TOP2, zero_stage=3, zero3_replicate_frozen=True)


# ----------------------------------------------------------------- what each FSDP2 rank reads


def _fsdp2_rank(rank, store, cache, results):
    os.environ["LFDIST_CACHE"] = cache
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    import math

    from torch.distributed.tensor import DTensor

    from lfdist.engines.base import World
    from lfdist.engines.fsdp import _fsdp2
    from lfdist.model.materialize import Reader, prepare
    from lfdist.model.source import ModelSource

    read = []
    original = Reader.get

    def get(self, key, rows=None):
        t = original(self, key, rows)
        read.append((key, t.numel()))
        return t

    Reader.get = get

    from lfdist.engines import fill

    class CountingReader(fill._Reader):
        """The stock reader (as the fill uses it), counting the elements of every slice it reads."""

        def _process_read_request(self, f, req, planner):
            read.append((req.storage_index.fqn, math.prod(req.lengths)))
            return super()._process_read_request(f, req, planner)

    fill._Reader = CountingReader
    u = prepare(ModelSource("tiny:llama"), make_plan(build_tiny("llama", "lm"), TOP2))
    model, filler = u.model, u.filler
    _fsdp2(model, World(rank, 2, rank, torch.device("cpu")), filler)
    local = sum(p.to_local().numel() for p in model.parameters() if isinstance(p, DTensor))
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    results[rank] = (read, local, sum(p.numel() for p in model.parameters()))
    if rank == 0:
        expected = build_tiny("llama", "lm").state_dict()
        results["equal"] = all(torch.equal(full[k], expected[k]) for k in expected)
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_ranks_read_only_their_shards(tmp_path):
    from lfdist.model.source import tiny_folder

    os.environ["LFDIST_CACHE"] = str(tmp_path / "cache")
    try:
        tiny_folder("llama", "lm", 2, 0)  # written once before the ranks start
    finally:
        del os.environ["LFDIST_CACHE"]
    results = mp.Manager().dict()
    mp.spawn(
        _fsdp2_rank, args=(str(tmp_path / "store"), str(tmp_path / "cache"), results), nprocs=2
    )
    assert results["equal"]
    total = results[0][2]
    for rank in (0, 1):
        read, local, _ = results[rank]
        assert sum(n for _, n in read) == local  # exactly its shards' elements
        assert local < total
    assert sum(results[r][1] for r in (0, 1)) == total  # together: every element once


# ----------------------------------------------------------------- what each ZeRO-3 rank reads


def _zero3_rank(rank, store, cache, results):
    os.environ.update(LFDIST_CACHE=cache, DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    import deepspeed

    from lfdist.engines.zero3_fill import fill_partitioned
    from lfdist.model.materialize import Reader, prepare
    from lfdist.model.source import ModelSource

    deepspeed.init_distributed(dist_backend="gloo")  # wraps the group above
    read = {}
    original = Reader.get

    def get(self, key, rows=None):
        t = original(self, key, rows)
        read[key] = read.get(key, 0) + t.numel()
        return t

    Reader.get = get
    u = prepare(ModelSource("tiny:llama"), make_plan(build_tiny("llama", "lm"), TOP2))
    model, filler = u.model, u.filler
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    fill_partitioned(filler, model, torch.device("cpu"), config)
    # What this rank may read of each tensor: its partition's elements, widened to whole rows
    # (at most one partial row at each end).
    bound = {}
    for name, p in model.named_parameters():
        start = rank * p.ds_tensor.ds_numel
        mine = max(0, min(p.ds_numel, start + p.ds_tensor.ds_numel) - start)
        row = int(torch.Size(p.ds_shape)[1:].numel()) if len(p.ds_shape) > 1 else 1
        bound[name] = (mine, mine + 2 * row, p.ds_numel)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results[rank] = (dict(read), bound)
    if rank == 0:
        expected = build_tiny("llama", "lm").state_dict()
        results["equal"] = all(torch.equal(full[k], expected[k]) for k in expected)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.deepspeed
def test_zero3_ranks_read_only_their_partitions(tmp_path):
    from lfdist.model.source import tiny_folder

    os.environ["LFDIST_CACHE"] = str(tmp_path / "cache")
    try:
        tiny_folder("llama", "lm", 2, 0)
    finally:
        del os.environ["LFDIST_CACHE"]
    results = mp.Manager().dict()
    mp.spawn(
        _zero3_rank, args=(str(tmp_path / "store"), str(tmp_path / "cache"), results), nprocs=2
    )
    assert results["equal"]  # the gathered partitions are the checkpoint, bit for bit
    for rank in (0, 1):
        read, bound = results[rank]
        total_read = sum(read.values())
        total = sum(b[2] for b in bound.values())
        assert sum(b[0] for b in bound.values()) <= total_read <= sum(b[1] for b in bound.values())
        assert total_read < 0.6 * total  # about half of the model, never all of it
