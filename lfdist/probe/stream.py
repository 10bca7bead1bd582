"""Layer-streamed probe: blocks loaded one at a time from safetensors, hidden states passed on.

For models larger than one device. The model is built on the meta device; only the embeddings,
the final norm and (causal LM) the head the logit lens reads are loaded for the whole run.
Layer-major: every batch first runs through the embeddings while each block's forward is
replaced by a recorder of its call (masks, position embeddings: whatever the model hands its
blocks); then block 0 is loaded, every batch's hidden state goes through it, it is dropped,
block 1 is loaded, and so on. Resident weights: one block + embeddings + final norm + head.

The statistics are added in run_probe's order (per latent space, batches in order) with the
same ProbeStats code, so they equal the in-process probe's. No ray here: `lfdist probe` calls
`stream_probe` in process (probe.stream_layers, by default where the whole model would not
fit in memory), the Ray actors of lfdist.orchestrate.probe on their data shard.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from lfdist.errors import UserError
from lfdist.model.info import model_info
from lfdist.model.streamed import StreamedModel
from lfdist.probe import ProbeResult, ProbeStats
from lfdist.probe.deviation import derive_curves
from lfdist.probe.hooks import find_final_norm, logit_lens, target_positions
from lfdist.probe.run import _LENS_ELEMENTS, _check_data, add_lens  # same lens, same checks
from lfdist.probe.stats import SKETCH_DIM, sketch_matrix


class _Stop(Exception):
    """Raised by the last block's recorder: the embeddings' work for this batch is done."""


Call = tuple[tuple, dict, bool]  # a block call without its hidden state: args, kwargs, positional


def _call_block(block: nn.Module, call: Call, h: torch.Tensor) -> torch.Tensor:
    rest, kwargs, positional = call
    out = block(h, *rest, **kwargs) if positional else block(hidden_states=h, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _record_calls(
    sm: StreamedModel, batches: list[dict], returns_tuple: bool, only_first: bool = False
) -> tuple[list[torch.Tensor], list[list[Call]]]:
    """Per batch: h_0 (the embeddings' output) and, per block, how the model calls it."""
    blocks = sm.bmap.blocks(sm.model)
    last = 0 if only_first else len(blocks) - 1
    h0: list[torch.Tensor] = []
    calls: list[list[Call]] = []

    def recorder(i: int):
        def forward(*args, **kwargs):
            if args:
                h, call = args[0], (args[1:], kwargs, True)
            else:
                kwargs = dict(kwargs)
                h, call = kwargs.pop("hidden_states"), ((), kwargs, False)
            if i == 0:
                h0.append(h)
            calls[-1].append(call)
            if i == last:
                raise _Stop
            return (h,) if returns_tuple else h  # the next recorder ignores it anyway

        return forward

    with _forwards(blocks, recorder):
        for batch in batches:
            calls.append([])
            try:
                sm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            except _Stop:
                pass
            else:
                raise RuntimeError("the forward pass never reached the last block")
    return h0, calls


@contextlib.contextmanager
def _forwards(blocks: nn.ModuleList, forward_of: Callable[[int], Callable]):
    """Block i's forward is `forward_of(i)` inside; each block's own forward again after."""
    for i, block in enumerate(blocks):
        block.forward = forward_of(i)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


class _Accumulator:
    """What run_probe's on_latent does for one (latent space, batch): the same ProbeStats calls."""

    def __init__(self, sm: StreamedModel, stats: ProbeStats):
        model, task = sm.model, sm.task
        self.stats, self.task = stats, task
        self.lens = logit_lens(model, sm.bmap) if task == "lm" else None
        self.norm = find_final_norm(model, sm.bmap) if task == "classify" else None
        self.proj = sketch_matrix(stats.hidden, stats.sketch_dim) if task == "classify" else None
        vocab = model.get_output_embeddings().weight.shape[0] if task == "lm" else 1
        self.chunk = max(1, _LENS_ELEMENTS // vocab)

    def add(self, layer: int, h: torch.Tensor, y: torch.Tensor, ti, feats: list) -> None:
        s = self.stats
        s.add_latent(layer, h)
        if self.task == "lm":
            add_lens(s, self.lens, self.chunk, layer, h, y, ti)
        else:
            s.add_classes(layer, h, y)
            z = self.norm(h) if self.norm is not None else h
            z = z.double().cpu()
            feats.append(z @ self.proj if self.proj is not None else z)


def _returns_tuple(sm: StreamedModel, batch: dict) -> bool:
    """Call the (loaded) block 0 once: do this architecture's blocks return a tuple?"""
    h0, calls = _record_calls(sm, [batch], False, only_first=True)
    block = sm.bmap.blocks(sm.model)[0]
    rest, kwargs, positional = calls[0][0]
    out = block(h0[0], *rest, **kwargs) if positional else block(hidden_states=h0[0], **kwargs)
    return isinstance(out, (tuple, list))


def _batches(data: dict[str, torch.Tensor], batch_size: int, device) -> list[dict]:
    n = int(data["input_ids"].shape[0])
    return [
        {k: v[s : s + batch_size].to(device) for k, v in data.items()}
        for s in range(0, n, batch_size)
    ]


def _run_blocks(sm, batches, where=(), acc=None, before_block=None) -> dict:
    """Every batch through the blocks, one block resident at a time; with `acc`, each latent
    space's statistics at the positions `where` names, in run_probe's accumulation order
    (latent spaces in order, batches in order within each). Returns the last hidden states
    too."""
    sm.load(None)
    sm.load(0)
    returns = _returns_tuple(sm, batches[0])
    hidden, calls = _record_calls(sm, batches, returns)
    feats: list[list] = [[] for _ in batches]
    for b, (bi, ti, y) in enumerate(where):
        acc.add(0, hidden[b][bi, ti], y, ti, feats[b])
    peak, load_s = 0, 0.0
    for i, block in enumerate(sm.bmap.blocks(sm.model)):
        t = time.perf_counter()
        if i:
            sm.load(i)
        load_s += time.perf_counter() - t
        peak = max(peak, sm.resident_bytes())
        if before_block is not None:
            before_block(i)
        for b in range(len(batches)):
            hidden[b] = _call_block(block, calls[b][i], hidden[b])
        for b, (bi, ti, y) in enumerate(where):
            acc.add(i + 1, hidden[b][bi, ti], y, ti, feats[b])
        sm.drop(i)
    return {"hidden": hidden, "feats": feats, "peak": peak, "load_s": load_s, "tuple": returns}


def stream_probe(
    source,
    data: dict[str, torch.Tensor],
    *,
    batch_size: int = 8,
    data_fingerprint: str | None = None,
    example_offset: int = 0,
    device="cpu",
    before_block: Callable[[int], None] | None = None,
) -> tuple[ProbeResult, dict]:
    """Probe every example of `data` (already picked) streaming the blocks of the model
    `source` (a ModelSource) names. Returns the result and {peak_resident_param_bytes,
    max_block_bytes, non_block_resident_bytes, total_param_bytes}. `before_block(i)`: a test
    hook."""
    t0 = time.perf_counter()
    task = source.task
    sm = StreamedModel(source, device)
    info = model_info(sm.model, task)
    data = _check_data(data, task, info["num_labels"])
    batches = _batches(data, batch_size, sm.device)
    stats = ProbeStats.empty(
        task, sm.bmap.n_blocks + 1, info["hidden_size"], info["num_labels"] or 0, SKETCH_DIM
    )
    with torch.no_grad():
        where = [
            target_positions(task, sm.model, b["input_ids"], b["attention_mask"], b["labels"])
            for b in batches
        ]
        run = _run_blocks(sm, batches, where, _Accumulator(sm, stats), before_block)
    for b, (_, _, y) in enumerate(where):
        if task == "classify":
            index = example_offset + b * batch_size + torch.arange(len(y))
            stats.add_sketch(torch.stack(run["feats"][b], 1), index, y)
        stats.examples += len(batches[b]["input_ids"])
    data_info = {
        "fingerprint": data_fingerprint,
        "n_samples": stats.examples,
        "seq_len": int(data["input_ids"].shape[1]),
        "n_targets": stats.count,
    }
    total = time.perf_counter() - t0
    timings = {"forward_s": total, "load_s": run["load_s"], "total_s": total}
    sizes = sm.group_bytes()
    memory = {
        "peak_resident_param_bytes": run["peak"],
        "max_block_bytes": sizes["max_block"],
        "non_block_resident_bytes": sizes["non_block_resident"],
        "total_param_bytes": sizes["total"],
    }
    return ProbeResult(task, stats, info, data_info, timings, derive_curves(stats, info)), memory


def streams(pc, source, whole_passes: bool = True) -> bool:
    """Whether to stream the blocks: probe.stream_layers where set; by default where the whole
    model would take over half the memory available here and, with `whole_passes` (the
    probe), no pass needs it whole (gradnorm's backward, pilots). Evaluation has none."""
    if whole_passes:
        check_stream(pc)
    if pc.stream_layers is not None:
        return pc.stream_layers
    if whole_passes and (pc.gradnorm or pc.pilots or pc.pilot_steps or pc.critical_steps):
        return False
    from lfdist.train.measure import available_memory_bytes

    available = available_memory_bytes()
    if available is None:
        return False
    info = model_info(source.skeleton(), source.task)
    need = info["total_params"] * torch.empty(0, dtype=source.torch_dtype).element_size()
    return need > available / 2


def check_stream(pc) -> None:
    if pc.stream_layers and pc.gradnorm:
        raise UserError(
            "probe.gradnorm needs a backward pass through the whole model, which layer "
            "streaming never holds; turn off probe.stream_layers or probe.gradnorm"
        )


@torch.no_grad()
def stream_eval(
    source, data: dict[str, torch.Tensor], *, batch_size: int = 8, device="cpu"
) -> tuple[dict, dict]:
    """Held-out quality (evaluate()'s dict) with one block resident at a time. The blocks run
    layer-major as the probe's do; then the model's own forward runs once more per batch with
    its blocks replayed (each hands its input on, the last returns the streamed hidden state),
    so the final norm, pooling and head are the model's own, for language models and
    classifiers alike. Batches stay as bounded as evaluate()'s. Returns (scores, memory facts)."""
    from lfdist.model.streamed import EVAL_GROUPS
    from lfdist.train.evaluate import batch_sums, bounded_batch, scores

    task, n = source.task, int(data["input_ids"].shape[0])
    if n == 0:
        return scores(torch.zeros(3, dtype=torch.float64), 0, task), {}
    sm = StreamedModel(source, device, groups=EVAL_GROUPS)
    batches = _batches(data, bounded_batch(sm.model, data, task, batch_size), sm.device)
    run = _run_blocks(sm, batches)
    totals = torch.zeros(3, dtype=torch.float64)
    with _replayed(sm, run["tuple"]) as last:
        for h, batch in zip(run["hidden"], batches):
            last[0] = h
            totals += batch_sums(sm.model, dict(batch), task)
    sizes = sm.group_bytes()
    return scores(totals, n, task), {
        "peak_resident_param_bytes": run["peak"],
        "total_param_bytes": sizes["total"],
    }


@contextlib.contextmanager
def _replayed(sm: StreamedModel, returns_tuple: bool):
    """Every block's forward replaced: the last returns `last[0]`, the others their input."""
    blocks = sm.bmap.blocks(sm.model)
    last: list = [None]

    def replay(i: int):
        def forward(*args, **kwargs):
            h = last[0] if i == len(blocks) - 1 else (args[0] if args else kwargs["hidden_states"])
            return (h,) if returns_tuple else h

        return forward

    with _forwards(blocks, replay):
        yield last
