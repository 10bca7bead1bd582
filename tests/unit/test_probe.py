"""Probe: latent spaces at the right positions, mergeable stats, logit lens, probe.json."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lfdist.errors import UserError
from lfdist.model.blocks import find_blocks
from lfdist.model.tiny import build_tiny
from lfdist.probe import ProbeStats, load_probe, merge, merge_results, run_probe
from lfdist.probe.deviation import classify_deviation
from lfdist.probe.hooks import LatentHooks, find_final_norm, target_positions

PAD = 256


def _padded(n=6, t=12, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, t), generator=g)
    lengths = lengths or [t - (i % 4) * 2 for i in range(n)]
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _close(a, b, rel=1e-6):
    """Equal to `rel` relative to the tensor's scale (sums near zero carry absolute noise)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = float(b.abs().max()) if b.numel() else 0.0
    assert torch.allclose(a, b, rtol=rel, atol=rel * scale + 1e-12), (a - b).abs().max()


@pytest.fixture(scope="module")
def llama():
    return build_tiny("llama", "lm").eval()


def test_hooks_capture_every_latent_space(llama):
    """h_0..h_{L-1} equal HF's hidden_states; h_L is the last block's output, before the final norm."""
    ids, mask, _ = _padded()
    bi, ti = torch.tensor([0, 1, 3]), torch.tensor([2, 9, 5])
    got = {}
    bmap = find_blocks(llama)
    with (
        torch.no_grad(),
        LatentHooks(llama, bmap, lambda layer, h: got.__setitem__(layer, h.clone())) as hooks,
    ):
        hooks.run(llama, (bi, ti), input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        hs = llama(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        normed = find_final_norm(llama, bmap)(got[8])
    assert sorted(got) == list(range(9))
    for layer in range(8):
        _close(got[layer], hs[layer][bi, ti])
    _close(normed, hs[8][bi, ti])  # HF applies the final norm to its last hidden state


def test_target_positions_lm_and_classify():
    ids, mask, labels = _padded(n=3, t=6, lengths=[6, 4, 2])
    bi, ti, y = target_positions("lm", None, ids, mask, labels)
    # position t predicts labels[t+1]: row 1 (length 4) has targets from positions 0..2
    assert [(int(b), int(t)) for b, t in zip(bi, ti) if b == 1] == [(1, 0), (1, 1), (1, 2)]
    assert torch.equal(y, labels[bi, ti + 1])
    decoder = build_tiny("gpt2", "classify")
    _, ti, _ = target_positions("classify", decoder, ids, mask, torch.tensor([0, 1, 0]))
    assert ti.tolist() == [5, 3, 1]  # last real token
    encoder = build_tiny("bert", "classify")
    _, ti, _ = target_positions("classify", encoder, ids, mask, torch.tensor([0, 1, 0]))
    assert ti.tolist() == [0, 0, 0]  # [CLS]


@pytest.mark.parametrize("arch,task", [("llama", "lm"), ("gpt2", "classify"), ("bert", "classify")])
def test_padding_does_not_change_statistics(arch, task):
    """A padded batch gives the same sums as each example alone, unpadded."""
    model = build_tiny(arch, task, num_labels=2).eval()
    ids, mask, labels = _padded(n=4, t=10, lengths=[10, 7, 5, 8])
    if task == "classify":
        labels = torch.tensor([0, 1, 1, 0])
    batched = run_probe(
        model,
        dict(input_ids=ids, attention_mask=mask, labels=labels),
        task,
        batch_size=4,
        progress=False,
    ).stats
    singles = []
    for i, n in enumerate([10, 7, 5, 8]):
        lab = labels[i : i + 1] if task == "classify" else labels[i : i + 1, :n]
        singles.append(
            run_probe(
                model,
                dict(input_ids=ids[i : i + 1, :n], labels=lab),
                task,
                batch_size=1,
                progress=False,
                example_offset=i,
            ).stats
        )
    one_by_one = singles[0]
    for s in singles[1:]:
        one_by_one = merge(one_by_one, s)
    assert batched.count == one_by_one.count == (26 if task == "lm" else 4)
    _close(batched.sum, one_by_one.sum, 1e-5)
    _close(batched.sumsq, one_by_one.sumsq, 1e-5)


@pytest.mark.parametrize(
    "arch", ["llama", "gemma", "phi", "gpt_neox", "falcon", "gpt2", "opt", "qwen2"]
)
def test_logit_lens_last_layer_is_the_models_loss(arch):
    model = build_tiny(arch, "lm").eval()
    ids, mask, labels = _padded()
    r = run_probe(
        model,
        dict(input_ids=ids, attention_mask=mask, labels=labels),
        "lm",
        batch_size=len(ids),
        progress=False,
    )
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert len(r.deviation) == 9
    assert math.isclose(r.deviation[-1], float(loss), rel_tol=1e-5)


def _shards(model, data, task, gradnorm=False):
    """Two halves (split on a batch boundary) merged, and one pass."""
    full = run_probe(model, data, task, batch_size=4, progress=False, gradnorm=gradnorm)
    a = run_probe(
        model,
        {k: v[:8] for k, v in data.items()},
        task,
        batch_size=4,
        progress=False,
        gradnorm=gradnorm,
    )
    b_data = {k: v[8:] for k, v in data.items()}
    merged = run_probe(
        model,
        b_data,
        task,
        batch_size=4,
        progress=False,
        gradnorm=gradnorm,
        example_offset=8,
        reduce=lambda s: merge(a.stats, s),
    )
    return full, a, merged


def _assert_same(x, y):
    assert x.stats.count == y.stats.count and x.stats.examples == y.stats.examples
    for name in ("sum", "sumsq", "ce_sum", "class_sum", "class_count", "sketch", "grad_sq_sum"):
        u, v = getattr(x.stats, name), getattr(y.stats, name)
        assert (u is None) == (v is None), name
        if u is not None:
            _close(u, v)
    for key in x.curves:
        _close(x.curves[key], y.curves[key])


def test_merge_of_halves_equals_one_pass_lm(llama):
    ids, mask, labels = _padded(n=14, t=10)
    full, a, merged = _shards(
        llama, dict(input_ids=ids, attention_mask=mask, labels=labels), "lm", gradnorm=True
    )
    _assert_same(full, merged)
    b = run_probe(
        llama,
        dict(input_ids=ids[8:], attention_mask=mask[8:], labels=labels[8:]),
        "lm",
        batch_size=4,
        progress=False,
        gradnorm=True,
        example_offset=8,
    )
    _assert_same(full, merge_results([a, b]))
    assert "gradnorm" in full.curves and len(full.curves["gradnorm"]) == 8


def test_merge_of_halves_equals_one_pass_classify():
    model = build_tiny("bert", "classify", num_labels=3).eval()
    ids, mask, _ = _padded(n=16, t=10)
    labels = torch.arange(16) % 3
    full, a, merged = _shards(
        model, dict(input_ids=ids, attention_mask=mask, labels=labels), "classify"
    )
    _assert_same(full, merged)
    assert merged.stats.sketch_index.tolist() == list(range(16))
    with pytest.raises(ValueError, match="example_offset"):
        merge(a.stats, a.stats)


def test_no_autograd_graph_and_model_left_as_found(llama):
    seen = []
    handle = (
        find_blocks(llama)
        .blocks(llama)[3]
        .register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    )
    llama.train()
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    try:
        ids, mask, labels = _padded()
        run_probe(
            llama, dict(input_ids=ids, attention_mask=mask, labels=labels), "lm", progress=False
        )
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert all(p.grad is None for p in llama.parameters())
    assert llama.training  # mode restored
    llama.eval()
    run_probe(llama, dict(input_ids=ids, labels=labels), "lm", progress=False, gradnorm=True)
    assert all(p.grad is None for p in llama.parameters())  # autograd.grad, never .grad
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags


def test_save_load_round_trip_is_exact(tmp_path, llama):
    ids, mask, labels = _padded()
    r = run_probe(
        llama,
        dict(input_ids=ids, attention_mask=mask, labels=labels),
        "lm",
        progress=False,
        gradnorm=True,
        data_fingerprint="abc123",
    )
    path = r.save(str(tmp_path))
    assert path.endswith("probe.json")
    back = load_probe(path)
    assert back.curves == r.curves and back.model_info == r.model_info
    assert (
        back.data_info
        == r.data_info
        == {
            "fingerprint": "abc123",
            "n_samples": 6,
            "seq_len": 12,
            "n_targets": int((labels[:, 1:] != -100).sum()),
        }
    )
    assert back.timings == r.timings and back.fingerprint == r.fingerprint
    for name in ("sum", "sumsq", "ce_sum", "grad_sq_sum"):
        assert torch.equal(getattr(back.stats, name), getattr(r.stats, name))
    d = json.loads(open(path).read())
    assert sorted(d) == ["curves", "data", "model", "stats", "task", "timings", "version"]


def test_load_probe_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="run `lfdist probe`"):
        load_probe(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_probe(str(bad))
    bad.write_text(json.dumps({"version": 1, "task": "lm"}))
    with pytest.raises(UserError, match="malformed"):
        load_probe(str(bad))
    bad.write_text(json.dumps({"version": 99}))
    with pytest.raises(UserError, match="version"):
        load_probe(str(bad))


def test_bad_data_is_a_user_error(llama):
    with pytest.raises(UserError, match="empty"):
        run_probe(llama, dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), "lm", progress=False)
    model = build_tiny("bert", "classify", num_labels=2)
    with pytest.raises(UserError, match="num_labels"):
        run_probe(
            model,
            dict(input_ids=torch.ones(2, 4, dtype=torch.long), labels=torch.tensor([0, 5])),
            "classify",
            progress=False,
        )


def _stats(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> ProbeStats:
    s = ProbeStats.empty("classify", x.shape[1], x.shape[2], n_classes)
    s.add_sketch(x, torch.arange(len(y)), y)
    return s


def test_centroid_deviation_separable_vs_random():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    centers = torch.randn(3, 16, generator=g) * 10
    noise = torch.randn(60, 16, generator=g)
    # latent 0: pure noise (no class information), latent 1: well separated classes
    x = torch.stack([noise, centers[y] + noise], 1)
    d, beta = classify_deviation(_stats(x, y, 3))
    assert abs(d[0] - math.log(3)) < 0.1  # no information: chance
    assert d[1] < 0.05 and beta[1] > 0


def test_samples_are_spread_over_sorted_data():
    model = build_tiny("bert", "classify", num_labels=2)
    labels = torch.tensor([0] * 8 + [1] * 8)  # sorted by class, like a corpus read topic by topic
    ids = torch.randint(0, 256, (16, 6), generator=torch.Generator().manual_seed(0))
    r = run_probe(model, dict(input_ids=ids, labels=labels), "classify", samples=4, progress=False)
    assert r.stats.class_count.tolist() == [2, 2] and r.data_info["n_samples"] == 4
