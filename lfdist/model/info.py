"""What select and the cost model know about a model, as plain data (probe.json's model_info).

Read from a loaded model, or from the skeleton the ranks build (meta_model_info): parameters
on the meta device, shapes only, so a 70B config costs a few seconds and no memory.
"""

from __future__ import annotations

from torch import nn

from lfdist.model.apply import bias_like  # the rule apply_plan uses for the `bias` treatment
from lfdist.model.blocks import block_param_counts, find_blocks, fingerprint
from lfdist.model.shapes import lora_in_out, projection_params


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return model.get_input_embeddings().weight.shape[1]


def model_info(model: nn.Module, task: str) -> dict:
    """Everything select and the cost model need to know about the model, as plain data."""
    bmap = find_blocks(model)
    per_block, groups = block_param_counts(model)
    blocks = bmap.blocks(model)
    cfg = model.config
    params = list(model.parameters())
    head = model.get_output_embeddings() if task == "lm" else None
    head_matmul = sum(p.numel() for p in head.parameters()) if head is not None else groups["head"]
    return {
        "fingerprint": vars(fingerprint(model)).copy(),
        "architecture": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "task": task,
        "n_blocks": bmap.n_blocks,
        "block_path": bmap.path,
        "block_names": [f"{bmap.path}.{i}" for i in range(bmap.n_blocks)],
        "per_block_params": per_block,
        "per_block_bias_params": [
            sum(p.numel() for n, p in b.named_parameters() if n in bias_like(b)) for b in blocks
        ],
        "group_params": groups,
        "total_params": sum(per_block) + sum(groups.values()),
        "head_matmul_params": head_matmul,
        "hidden_size": hidden_size(model),
        # For the cost model: LoRA adapter and mask score sizes, gated-MLP activations.
        "per_block_lora_in_out": [lora_in_out(b) for b in blocks],
        "per_block_projection_params": [projection_params(b) for b in blocks],
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None)
        or getattr(cfg, "n_head", None),
        "num_labels": cfg.num_labels if task == "classify" else None,
        "dtype": str(params[0].dtype).replace("torch.", "") if params else "float32",
    }


def meta_model_info(spec: str, task: str = "lm", num_labels: int = 2) -> dict:
    """model_info of the model `spec` names (tiny:<arch>, a folder, pkg:<name>, a hub id or a
    config.json file) from its config alone: no weights."""
    from lfdist.model.source import ModelSource

    return model_info(ModelSource(spec, task, num_labels).skeleton(), task)
