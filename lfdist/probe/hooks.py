"""Capture every latent space h_0..h_L at the positions that carry a target.

A pre-hook on block 0 sees h_0 (the embedding output, after any scaling the model applies);
a hook on block i sees h_{i+1}. Nothing after the last block is needed, so the last hook stops
the forward pass: the model's head, and its [B, T, V] logits, never run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lfdist.errors import UserError
from lfdist.model.blocks import BlockMap

# Encoders pool the first token ([CLS] / <s>); decoder classifiers pool the last real token.
ENCODER_TYPES = {
    "bert",
    "roberta",
    "mpnet",
    "distilbert",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "electra",
    "deberta",
    "deberta-v2",
    "albert",
    "ernie",
    "megatron-bert",
    "mobilebert",
    "roberta-prelayernorm",
    "data2vec-text",
    "nomic_bert",
    "xlm",
}
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "final_norm")


class _StopForward(Exception):
    """Raised by the last block's hook: the probe has everything it needs."""


def is_encoder(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", None) in ENCODER_TYPES


def target_positions(
    task: str,
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """(batch index, time index, target) of every position whose hidden state is scored.

    lm: the model shifts labels, so position t predicts labels[t+1]; positions whose next
    label is -100 carry no target. The model's own loss counts exactly these positions.
    classify: the position the model's head pools from, target = the class id.
    """
    b, t = input_ids.shape
    if task == "lm":
        nxt = torch.full_like(labels, -100)
        nxt[:, :-1] = labels[:, 1:]
        bi, ti = (nxt != -100).nonzero(as_tuple=True)
        return bi, ti, nxt[bi, ti]
    bi = torch.arange(b, device=input_ids.device)
    if is_encoder(model):
        ti = torch.zeros(b, dtype=torch.long, device=input_ids.device)
    else:
        pad = getattr(model.config, "pad_token_id", None)
        # Same rule as transformers' decoder classifiers: the rightmost token that is not pad;
        # without a pad id, the rightmost position the attention mask keeps.
        keep = (input_ids != pad) if pad is not None else attention_mask.bool()
        idx = torch.arange(t, device=input_ids.device)
        ti = (idx * keep.long()).argmax(-1)
    return bi, ti, labels.reshape(-1)


def _parent_names(model: nn.Module, bmap: BlockMap, group: str) -> list[str]:
    names = {
        n.rsplit(".", 1)[0]
        for n, _ in model.named_parameters()
        if bmap.block_of(n) is None and bmap.group_of(n) == group
    }
    return sorted(names)


def find_final_norm(model: nn.Module, bmap: BlockMap) -> nn.Module | None:
    """The norm applied between the last block and the head, if the model has one.

    Found among the block map's `final_norm` group (modules whose class is a norm), else by
    the usual attribute names outside the blocks. Post-LN encoders (BERT) have none.
    """
    cands = [model.get_submodule(n) for n in _parent_names(model, bmap, "final_norm")]
    norms = [m for m in cands if "norm" in type(m).__name__.lower()]
    if len(norms) == 1:
        return norms[0]
    blocks_prefix = bmap.path + "."
    named = [
        (n, m)
        for n, m in model.named_modules()
        if n.split(".")[-1] in FINAL_NORM_NAMES and not n.startswith(blocks_prefix)
    ]
    if len(named) == 1:
        return named[0][1]
    if len(norms) > 1 or len(named) > 1:
        raise UserError(
            f"cannot tell which module is the final norm of {type(model).__name__}; "
            "name it in lfdist.probe.hooks.FINAL_NORM_NAMES"
        )
    return None


def logit_lens(model: nn.Module, bmap: BlockMap) -> Callable[[torch.Tensor], torch.Tensor]:
    """h -> the model's own next-token logits head applied to h: W_U · final_norm(h)."""
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None:
        raise UserError(
            f"{type(model).__name__} has no output embeddings, so the logit lens has "
            "nothing to read; probe a causal LM with task lm, or use task classify"
        )
    norm = find_final_norm(model, bmap)
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def head(h: torch.Tensor) -> torch.Tensor:
        h = h.to(unembed.weight.device)
        logits = unembed(norm(h) if norm is not None else h)
        if softcap:  # Gemma 2 caps its logits; the lens must read them as the model does
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return head


class LatentHooks:
    """Context manager calling `on_latent(l, h_l[bi, ti])` for l = 0..L during a forward."""

    def __init__(
        self, model: nn.Module, bmap: BlockMap, on_latent: Callable[[int, torch.Tensor], None]
    ):
        self.blocks = bmap.blocks(model)
        self.on_latent = on_latent
        self.positions: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles = []

    def _take(self, layer: int, h: torch.Tensor) -> None:
        bi, ti = self.positions
        # Blocks may sit on different devices (device_map="auto"): index where h lives.
        self.on_latent(layer, h[bi.to(h.device), ti.to(h.device)])

    def __enter__(self) -> LatentHooks:
        def pre(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self._take(0, h)

        def post(i):
            def hook(module, args, out):
                self._take(i + 1, out[0] if isinstance(out, (tuple, list)) else out)
                if i == len(self.blocks) - 1:
                    raise _StopForward

            return hook

        self._handles.append(self.blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_hook(post(i)))
        return self

    def run(self, model: nn.Module, positions: tuple[torch.Tensor, torch.Tensor], **inputs) -> None:
        self.positions = positions
        try:
            model(**inputs)
        except _StopForward:
            pass
        else:
            raise RuntimeError("the forward pass never reached the last block's hook")

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
