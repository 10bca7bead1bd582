"""A tiny model written by a rank other than 0 has its weights (issue 18: transformers'
save_pretrained writes weights on rank 0 only once torch.distributed is up, so a rank 1 that took
the cache lock first left a folder with a config and no weights)."""

import os

import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank, store, cache, results):
    os.environ["LFDIST_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    from lfdist.model.source import ModelSource, tiny_folder

    if rank == 1:  # rank 1 writes the model while rank 0 waits
        folder = tiny_folder("llama", "lm", 2, 0)
        results["files"] = sorted(os.listdir(folder))
    dist.barrier()
    if rank == 0:
        from lfdist.model.headers import read_index

        results["tensors"] = len(read_index(ModelSource("tiny:llama").weights_folder()))
    dist.barrier()
    dist.destroy_process_group()


def test_rank_one_writes_a_whole_tiny_model(tmp_path):
    results = mp.Manager().dict()
    args = (str(tmp_path / "store"), str(tmp_path / "cache"), results)
    mp.spawn(_rank, args=args, nprocs=2)
    assert results["files"] == ["config.json", "model.safetensors"]
    assert results["tensors"] == 2 + 8 * 9 + 1  # embeddings, head, 8 blocks of 9, final norm
