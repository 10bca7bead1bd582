import pytest

from lfdist.errors import UserError
from lfdist.model.apply import apply_plan
from lfdist.model.blocks import find_blocks, fingerprint
from lfdist.model.tiny import build_tiny
from lfdist.plan import BlockPlan, Plan, load_plan, save_plan
from tests import helpers


def make_plan(model, treatments, strategy="test"):
    return helpers.make_plan(
        model,
        treatments,
        strategy,
        budget={"blocks": 4},
        scores={"gain": [0.1] * len(treatments)},
        predicted={"flops_fraction": 0.5},
    )


def test_round_trip(tmp_path):
    model = build_tiny("llama", "lm")
    plan = make_plan(model, ["frozen"] * 5 + ["full"] * 3)
    path = str(tmp_path / "plan.yaml")
    save_plan(plan, path)
    again = load_plan(path)
    assert again == plan
    assert again.boundary == 5 and again.trainable_blocks == [5, 6, 7]
    assert open(path).read().startswith("# lfdist plan")


def test_fingerprint_mismatch_names_both(tmp_path):
    plan = make_plan(build_tiny("llama", "lm"), ["frozen"] * 4 + ["full"] * 4)
    other = build_tiny("gpt2", "lm")
    with pytest.raises(UserError) as e:
        apply_plan(other, plan)
    msg = str(e.value)
    assert "LlamaForCausalLM" in msg and "GPT2LMHeadModel" in msg and "lfdist probe" in msg


def test_same_arch_different_shape_mismatch():
    plan = make_plan(build_tiny("llama", "lm"), ["full"] * 8)
    cls = build_tiny("llama", "classify")
    with pytest.raises(UserError, match="plan was made for model"):
        plan.check_model(fingerprint(cls))


def test_fingerprint_ignores_weights():
    assert fingerprint(build_tiny("llama", "lm", seed=0)) == fingerprint(
        build_tiny("llama", "lm", seed=1)
    )


@pytest.mark.parametrize(
    "text, needle",
    [
        ("strategy: x\n", "missing or has malformed fields"),
        ("- a\n- b\n", "not a mapping"),
        ("strategy: x\nfoo: 1\n", "unknown keys"),
        ("version: 9\n", "format version 9"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_plan_files(tmp_path, text, needle):
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=needle):
        load_plan(str(p))


def test_unknown_treatment():
    with pytest.raises(UserError, match="unknown treatment"):
        BlockPlan(0, "b", "half")


def test_apply_plan_sets_requires_grad():
    model = build_tiny("llama", "lm")
    applied = apply_plan(model, make_plan(model, ["frozen"] * 6 + ["bias", "full"]))
    bmap = find_blocks(model)
    for name, p in model.named_parameters():
        i = bmap.block_of(name)
        if i is None:
            assert p.requires_grad == (bmap.group_of(name) != "embeddings"), name
        elif i < 6:
            assert not p.requires_grad, name
        elif i == 6:
            # Llama has no biases: norm weights stand in for them.
            assert p.requires_grad == ("norm" in name), name
        else:
            assert p.requires_grad, name
    # By hand for tiny llama (hidden 64, 2 of 4 heads for k/v, MLP 128, vocab 320): block 7 full
    # = attention 64*64*2 + 64*32*2 + MLP 3*64*128 + 2 norms*64 = 36,992; block 6's norm weights
    # 128; final norm 64; untied head 320*64 = 20,480.
    assert applied.trainable == 36_992 + 128 + 64 + 20_480
    assert applied.frozen == 320 * 64 + 6 * 36_992 + (36_992 - 128)


def test_apply_all_frozen_refused():
    model = build_tiny("llama", "lm")
    plan = make_plan(model, ["frozen"] * 8)
    plan = Plan(
        plan.strategy,
        plan.fingerprint,
        plan.blocks,
        modules={"embeddings": "frozen", "final_norm": "frozen", "head": "frozen"},
    )
    with pytest.raises(UserError, match="trains no parameter"):
        apply_plan(model, plan)
