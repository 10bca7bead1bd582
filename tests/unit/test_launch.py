import sys

import torch

from lfdist.launch.commands import Nodes, deepspeed_command, shell_line, torchrun_command
from lfdist.train.feed import StepFeeder


def test_torchrun_single_node():
    argv, env = torchrun_command("/o/job.json", 2, "fsdp2")
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in argv
    assert argv[argv.index("--nproc-per-node") + 1] == "2"
    assert argv[-3:] == ["-m", "lfdist.launch.worker", "/o/job.json"]
    assert "DS_ACCELERATOR" not in env and env["LFDIST_ENGINE"] == "fsdp2"


def test_torchrun_multi_node_passes_rendezvous():
    argv, _ = torchrun_command(
        "j.json", 8, "ddp", Nodes(nnodes=2, node_rank=1, rdzv_endpoint="node0:29500")
    )
    assert "--standalone" not in argv
    for flag, value in [
        ("--nnodes", "2"),
        ("--node-rank", "1"),
        ("--rdzv-endpoint", "node0:29500"),
    ]:
        assert argv[argv.index(flag) + 1] == value


def test_deepspeed_cpu_env_and_num_gpus():
    argv, env = deepspeed_command("j.json", 2, cuda=False)
    assert argv[argv.index("--num_gpus") + 1] == "2"  # else the launcher starts a world of 1
    assert env["DS_ACCELERATOR"] == "cpu"
    _, env_gpu = deepspeed_command("j.json", 2, cuda=True)
    assert "DS_ACCELERATOR" not in env_gpu  # never forced on GPU machines
    line = shell_line(argv, env)
    assert line.startswith("DS_ACCELERATOR=cpu ")


def test_deepspeed_hostfile():
    argv, _ = deepspeed_command(
        "j.json", 8, Nodes(nnodes=2, hostfile="hosts", rdzv_endpoint="n0:29600")
    )
    assert argv[argv.index("--hostfile") + 1] == "hosts"
    assert argv[argv.index("--master_addr") + 1] == "n0"


def _data(n):
    ids = torch.arange(n).unsqueeze(1).repeat(1, 4)
    return {"input_ids": ids, "labels": ids}


def test_feeder_partitions_the_global_batch_exactly():
    data = _data(24)
    f0 = StepFeeder(data, batch_size=2, grad_accum=2, world_size=2, rank=0, seed=0)
    f1 = StepFeeder(data, batch_size=2, grad_accum=2, world_size=2, rank=1, seed=0)
    assert f0.steps_per_epoch == 3
    seen = []
    for step in range(3):
        a, b = f0.indices(step).tolist(), f1.indices(step).tolist()
        assert not set(a) & set(b)
        seen += a + b
    assert sorted(seen) == list(range(24))  # one epoch covers every example once
    single = StepFeeder(data, batch_size=4, grad_accum=2, world_size=1, rank=0, seed=0)
    assert sorted(single.indices(1).tolist()) == sorted(
        f0.indices(1).tolist() + f1.indices(1).tolist()
    )


def test_feeder_is_deterministic_and_reshuffles_per_epoch():
    f = StepFeeder(_data(8), 2, 1, 2, 0, seed=1)
    g = StepFeeder(_data(8), 2, 1, 2, 0, seed=1)
    assert all(torch.equal(f.indices(s), g.indices(s)) for s in range(6))
    first = [f.indices(s).tolist() for s in range(2)]
    second = [f.indices(s).tolist() for s in range(2, 4)]
    assert first != second
    mb = f.micro_batches(0, torch.device("cpu"))
    assert len(mb) == 1 and mb[0]["input_ids"].shape == (2, 4)
