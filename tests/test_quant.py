"""Model-level NVFP4 (ckaqad_cli.quant) on a tiny transformers Llama built from a config."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from ckaqad_cli import quant, quant_calibration
from ckaqad_cli.errors import CkaqadError
from ckaqad_kernels import nvfp4_ref as ref
from fixtures import tiny_model


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A float32 Llama whose MLP width (40) is no multiple of 16."""
    return tiny_model(seed=seed, vocab_size=96, hidden_size=32, intermediate_size=40, head_dim=8,
                      tie_word_embeddings=False)


IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 4]])


def test_exclusions_skips_and_state_dict_names():
    model = tiny_llama()
    keys = list(model.state_dict())
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    recipe = quant.apply_fake_quant(model, scheme="w4a4", exclude=["*.o_proj"])
    assert list(model.state_dict()) == keys
    assert model.model.layers[0].self_attn.q_proj.weight is q_weight
    assert isinstance(model.model.layers[0].self_attn.q_proj, quant.NVFP4Linear)
    assert type(model.lm_head) is torch.nn.Linear and "lm_head" not in recipe.quantized
    assert type(model.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    assert recipe.skipped["model.layers.1.self_attn.o_proj"] == "excluded by '*.o_proj'"
    # in_features 40 (the intermediate size) is not a multiple of 16: left alone and reported
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert "not a multiple of 16" in recipe.skipped["model.layers.0.mlp.down_proj"]
    assert len(recipe.quantized) == 2 * 5  # q, k, v, gate, up per layer
    with pytest.raises(CkaqadError, match="already"):
        quant.apply_fake_quant(model)


def test_fused_groups_from_plain_names():
    names = [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.experts.0.gate_proj", "model.layers.0.mlp.experts.0.up_proj",
        "model.layers.0.mlp.experts.0.down_proj", "model.layers.0.mlp.experts.1.gate_proj",
        "model.layers.0.mlp.experts.1.up_proj",
        "model.layers.1.block_sparse_moe.experts.3.w1", "model.layers.1.block_sparse_moe.experts.3.w2",
        "model.layers.1.block_sparse_moe.experts.3.w3", "model.layers.2.self_attn.q_proj",
    ]
    assert quant.fused_groups(names) == [
        names[0:3], names[4:6], names[7:9],
        ["model.layers.1.block_sparse_moe.experts.3.w1", "model.layers.1.block_sparse_moe.experts.3.w3"],
    ]


def test_fused_group_shares_the_max_amax_global_scale():
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.mul_(10)  # k now holds the group's largest amax
    recipe = quant.apply_fake_quant(model, scheme="w4a16")
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"] in recipe.fused_groups
    expected = ref.global_scale_from_amax(attn.k_proj.weight.abs().amax())
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert float(proj.weight_global_scale()) == float(expected)
    assert float(quant.group_weight_global_scale([attn.q_proj.weight, attn.k_proj.weight])) == float(expected)
    x = torch.randn(3, 32)
    fq_q = ref.fake_quantize(attn.q_proj.weight.detach(), expected)
    assert torch.equal(attn.q_proj(x), F.linear(x, fq_q))  # w4a16: input untouched
    assert not torch.equal(fq_q, ref.fake_quantize(attn.q_proj.weight.detach()))  # its own scale would differ


def test_w4a4_quantizes_inputs_dynamically_then_with_a_calibrated_amax():
    model = tiny_llama()
    quant.apply_fake_quant(model, scheme="w4a4")
    up = model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 3, 32)
    w = ref.fake_quantize(up.weight.detach(), up.weight_global_scale())
    assert torch.equal(up(x), F.linear(ref.fake_quantize(x), w))
    with quant_calibration.record_input_amax(model) as amax:
        model(IDS)
        model(IDS[:, :4])
    assert set(amax) == {n for n, m in model.named_modules() if isinstance(m, quant.NVFP4Linear)}
    assert not up._forward_pre_hooks  # hooks removed
    quant.set_input_amax(model, {"model.layers.0.mlp.up_proj": 7.5})
    g_in = ref.global_scale_from_amax(7.5)
    assert torch.equal(up(x), F.linear(ref.fake_quantize(x, g_in), w))


def test_gradients_reach_the_weights_through_the_ste():
    model = tiny_llama()
    quant.apply_fake_quant(model)
    model(IDS, labels=IDS).loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_recipe_round_trip_reproduces_the_model(tmp_path):
    model = tiny_llama()
    recipe = quant.apply_fake_quant(model, scheme="w4a4")
    with quant_calibration.record_input_amax(model) as amax:
        model(IDS)
    recipe.input_amax = dict(amax)
    quant.set_input_amax(model, recipe.input_amax)
    path = recipe.save(tmp_path)
    assert path.name == quant.RECIPE_FILE
    loaded = quant.QuantRecipe.load(tmp_path)
    assert loaded == recipe
    fresh = tiny_llama()
    quant.apply_recipe(fresh, loaded)
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)
    assert not torch.equal(fresh(IDS).logits, tiny_llama()(IDS).logits)


def test_recipe_errors(tmp_path):
    with pytest.raises(CkaqadError, match="no quant_recipe.json"):
        quant.QuantRecipe.load(tmp_path)
    (tmp_path / quant.RECIPE_FILE).write_text(json.dumps({"version": 99}))
    with pytest.raises(CkaqadError, match="version"):
        quant.QuantRecipe.load(tmp_path)
    with pytest.raises(CkaqadError, match="scheme"):
        quant.QuantRecipe(scheme="w8a8")
    bad = quant.QuantRecipe(quantized=["model.layers.9.mlp.up_proj"])
    with pytest.raises(CkaqadError, match="does not have"):
        quant.apply_recipe(tiny_llama(), bad)
    with pytest.raises(CkaqadError, match="not a quantizable"):
        quant.apply_recipe(tiny_llama(), quant.QuantRecipe(quantized=["model.layers.0.mlp.down_proj"]))


def test_moe_router_excluded_and_fused_experts_reported():
    model = tiny_model("qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       head_dim=8)
    recipe = quant.apply_fake_quant(model, scheme="w4a16")
    assert not any(".mlp.gate" in name for name in recipe.quantized)
    assert "model.layers.0.mlp.experts" not in recipe.skipped
    assert "model.layers.0.mlp.experts.3.down_proj" in recipe.quantized
    assert recipe.fused_groups[0] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert ["model.layers.0.mlp.experts.0.gate_proj", "model.layers.0.mlp.experts.0.up_proj"] in recipe.fused_groups


@pytest.mark.parametrize("rule", ["four-over-six", "mse"])
def test_the_scale_rule_reaches_the_student_and_its_frozen_weights_are_the_packed_ones(rule):
    from ckaqad_kernels import dispatch

    model = tiny_llama()
    recipe = quant.apply_fake_quant(model, scheme="w4a16", scale_rule=rule)
    assert recipe.scale_rule == rule
    q = model.model.layers[0].self_attn.q_proj
    g = q.weight_global_scale()
    weight = q.weight.detach().clone()
    want = ref.fake_quantize(weight, g, scale_rule=rule)
    assert torch.equal(q.quantized_weight().detach(), want)
    assert not torch.equal(want, ref.fake_quantize(weight, g))  # the rule changes some scales
    packed, scales, gs = dispatch.quantize_and_pack(weight, g, scale_rule=rule)
    assert torch.equal(ref.dequantize(packed, scales, gs), want)
    quant.freeze_quantized_weights(model)
    assert torch.equal(q.weight.detach(), want)


def test_recipe_scale_rule_round_trip_old_recipes_and_bad_values(tmp_path):
    recipe = quant.QuantRecipe(scheme="w4a4", scale_rule="mse", activation_arithmetic="reciprocal")
    recipe.save(tmp_path)
    assert quant.QuantRecipe.load(tmp_path) == recipe
    data = json.loads((tmp_path / quant.RECIPE_FILE).read_text())
    del data["scale_rule"], data["activation_arithmetic"]  # a recipe written before the fields existed
    (tmp_path / quant.RECIPE_FILE).write_text(json.dumps(data))
    old = quant.QuantRecipe.load(tmp_path)
    assert (old.scale_rule, old.activation_arithmetic) == ("amax", "divide")
    with pytest.raises(CkaqadError, match=r"^scale_rule must be one of amax, four-over-six, mse, mse-act, not 'x'$"):
        quant.QuantRecipe(scale_rule="x")
    with pytest.raises(CkaqadError, match=r"^--scale-rule must be one of .* not 'best'$"):
        quant.check_scale_rule("best")
    with pytest.raises(CkaqadError, match=r"^--activation-arithmetic must be one of divide, reciprocal, not 'rcp'$"):
        quant.check_activation_arithmetic("rcp")


def test_mse_act_needs_the_calibrated_second_moments(tmp_path):
    model = tiny_llama()
    recipe = quant.apply_fake_quant(model, scheme="w4a4", scale_rule="mse-act")
    with pytest.raises(CkaqadError, match="second moments"):
        model(IDS)
    q = model.model.layers[0].self_attn.q_proj
    seen = []
    hook = q.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, 32)))
    with torch.no_grad(), quant_calibration.record_inputs(model) as record:
        model(IDS)
        model(IDS[:, :5])
    hook.remove()
    moments = record.second_moments()
    assert set(moments) == set(recipe.quantized) == set(record.amax)
    name = "model.layers.0.self_attn.q_proj"
    inputs = torch.cat(seen).double()
    torch.testing.assert_close(moments[name], inputs.square().mean(0).float())
    assert torch.equal(moments[name], moments["model.layers.0.self_attn.k_proj"])  # one input
    assert record.amax[name] == float(inputs.abs().max())
    quant.set_channel_weights(model, moments)
    g = q.weight_global_scale()
    want = ref.fake_quantize(q.weight.detach(), g, scale_rule="mse-act", channel_weights=moments[name])
    assert torch.equal(q.quantized_weight().detach(), want)
    logits = model(IDS).logits
    quant_calibration.save_second_moments(tmp_path, moments)
    loaded = quant_calibration.load_second_moments(tmp_path)
    assert loaded.keys() == moments.keys() and all(torch.equal(loaded[k], moments[k]) for k in moments)
    fresh = tiny_llama()
    quant.apply_recipe(fresh, recipe, loaded)
    assert torch.equal(fresh(IDS).logits, logits)
    with pytest.raises(CkaqadError, match="no input second moments for model.layers.0.self_attn.k_proj"):
        quant.set_channel_weights(tiny_llama_quantized("mse-act"), {name: moments[name]})
    with pytest.raises(CkaqadError, match="no input_second_moments.safetensors"):
        quant_calibration.load_second_moments(tmp_path / "elsewhere")


def tiny_llama_quantized(rule: str):
    model = tiny_llama()
    quant.apply_fake_quant(model, scheme="w4a16", scale_rule=rule)
    return model


def test_w4a4_inputs_follow_the_activation_arithmetic():
    model = tiny_llama()
    quant.apply_fake_quant(model, scheme="w4a4", activation_arithmetic="reciprocal")
    up = model.model.layers[0].mlp.up_proj
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32)
    w = ref.fake_quantize(up.weight.detach(), up.weight_global_scale())
    assert torch.equal(up(x), F.linear(ref.fake_quantize(x, arithmetic="reciprocal"), w))


def test_fp8_units_are_fp8_linears_with_the_reference_values_and_a_straight_through_gradient(tmp_path):
    from ckaqad_cli.quant_fp8 import FP8Linear
    from ckaqad_kernels import fp8_ref

    model = tiny_llama()
    keys = list(model.state_dict())
    recipe = quant.apply_fake_quant(model, scheme="w4a4", fp8=["*.o_proj", "model.layers.0.mlp.down_proj"])
    assert list(model.state_dict()) == keys
    o_proj = model.model.layers[1].self_attn.o_proj
    assert isinstance(o_proj, FP8Linear) and o_proj.quantize_input
    # FP8 needs no blocks of 16: down_proj (in_features 40) is FP8 where NVFP4 would have skipped it
    assert recipe.fp8 == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                          "model.layers.1.self_attn.o_proj"]
    assert not set(recipe.fp8) & set(recipe.quantized) and not set(recipe.fp8) & set(recipe.skipped)
    x = torch.randn(2, 3, 32, requires_grad=True)
    out = o_proj(x)
    expected = F.linear(fp8_ref.fake_quantize_tokens(x.detach()), fp8_ref.fake_quantize_weight(o_proj.weight.detach()))
    assert torch.equal(out, expected)
    out.sum().backward()
    # straight through: d(sum)/dW is the sum of the quantized inputs, d(sum)/dx the column sums of the FP8 weight
    inputs = fp8_ref.fake_quantize_tokens(x.detach()).reshape(6, 32)
    assert torch.allclose(o_proj.weight.grad, inputs.sum(0).expand(32, 32))
    assert torch.allclose(x.grad, fp8_ref.fake_quantize_weight(o_proj.weight.detach()).sum(0).expand(2, 3, 32))
    # the recipe round trip builds the same model; w4a16 leaves FP8 inputs alone
    recipe.save(tmp_path)
    fresh = tiny_llama()
    quant.apply_recipe(fresh, quant.QuantRecipe.load(tmp_path))
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)
    w4a16 = tiny_llama()
    quant.apply_fake_quant(w4a16, scheme="w4a16", fp8=["*.o_proj"])
    assert not w4a16.model.layers[0].self_attn.o_proj.quantize_input
    # frozen: the stored weight is the FP8 value and is not quantized again
    quant.freeze_quantized_weights(model)
    assert torch.equal(o_proj.weight, fp8_ref.fake_quantize_weight(o_proj.weight)) and not o_proj.quantize_weight


def test_fp8_errors():
    with pytest.raises(CkaqadError, match="one GEMM in one format"):
        quant.apply_fake_quant(tiny_llama(), fp8=["*.q_proj"])
    # an exclusion wins over --fp8: the module stays unquantized
    recipe = quant.apply_fake_quant(tiny_llama(), exclude=["*.o_proj"], fp8=["*.o_proj"])
    assert recipe.fp8 == [] and "excluded" in recipe.skipped["model.layers.0.self_attn.o_proj"]
    bad = quant.QuantRecipe(quantized=["model.layers.0.self_attn.q_proj"], fp8=["model.layers.0.self_attn.q_proj"])
    with pytest.raises(CkaqadError, match="FP8"):
        quant.apply_recipe(tiny_llama(), bad)
    with pytest.raises(CkaqadError, match="FP8"):
        quant.apply_recipe(tiny_llama(), quant.QuantRecipe(fp8=["model.layers.0.mlp"]))


def test_a_fused_group_quantizes_a_shared_dynamic_input_once_with_the_same_values_and_gradients(monkeypatch):
    calls = []
    real = quant.fake_quantize_ste

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(quant, "fake_quantize_ste", counting)

    def forward_backward(share: bool):
        model = tiny_llama()
        recipe = quant.apply_fake_quant(model, scheme="w4a4")
        groups = {id(m.fused_group): m.fused_group for m in model.modules() if getattr(m, "fused_group", None)}
        if not share:
            for group in groups.values():
                group.shares_input = lambda: False
        calls.clear()
        loss = model(IDS, labels=IDS).loss
        inputs = len([c for c in calls if c[:-1] == tuple(IDS.shape)])  # activations, not weights
        loss.backward()
        assert all(g._shared is None for g in groups.values())  # every member took the copy: nothing kept
        return loss, inputs, {n: p.grad for n, p in model.named_parameters()}, recipe

    loss, inputs, grads, recipe = forward_backward(share=True)
    loss_alone, inputs_alone, grads_alone, _ = forward_backward(share=False)
    assert inputs_alone == len(recipe.quantized)  # every NVFP4 Linear its own input
    assert inputs == len(recipe.quantized) - sum(len(g) - 1 for g in recipe.fused_groups) < inputs_alone  # once a group
    assert torch.equal(loss, loss_alone)
    assert all(torch.equal(grads[n], grads_alone[n]) for n in grads)


def test_a_fused_group_quantizes_again_when_the_input_changed_or_its_members_differ():
    model = tiny_llama()
    quant.apply_fake_quant(model, scheme="w4a4")
    mlp = model.model.layers[0].mlp
    torch.manual_seed(3)
    x = torch.randn(2, 3, 32)

    def alone(proj, x, g=None):
        return F.linear(ref.fake_quantize(x, g), ref.fake_quantize(proj.weight.detach(), proj.weight_global_scale()))

    assert torch.equal(mlp.gate_proj(x), alone(mlp.gate_proj, x))
    x.mul_(3)  # changed in place after gate_proj quantized it: up_proj must not take the old copy
    assert torch.equal(mlp.up_proj(x), alone(mlp.up_proj, x))
    leaf = torch.randn(2, 3, 32, requires_grad=True)
    with torch.no_grad():
        mlp.gate_proj(leaf)
    mlp.up_proj(leaf).sum().backward()  # a copy made without gradients is not taken with them on
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    mlp.gate_proj(torch.randn(2, 3, 32, requires_grad=True))  # leaves a pending copy that is part of a graph
    assert mlp.gate_proj.fused_group._shared is not None
    twin = copy.deepcopy(model)  # such a tensor cannot be deep-copied: the copy of the model starts without it
    assert twin.model.layers[0].mlp.gate_proj.fused_group._shared is None
    quant.set_input_amax(model, {"model.layers.0.mlp.up_proj": 7.5})  # up now static: each quantizes its own
    assert torch.equal(mlp.gate_proj(x), alone(mlp.gate_proj, x))
    assert torch.equal(mlp.up_proj(x), alone(mlp.up_proj, x, ref.global_scale_from_amax(7.5)))
