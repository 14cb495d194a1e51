"""NVFP4 fake quantization of transformers' fused MoE experts, per expert: bit-identical to what pack writes for the
per-expert checkpoint tensors, a straight-through gradient, W4A4 inputs with one shared scale per projection, the
recipe round trip, and loading a packed MoE directory through transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ckaqad_cli import formats, quant, quant_calibration, quant_moe
from ckaqad_cli.builtin.tokenizer import VOCAB_SIZE, build_tokenizer
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.models import load_model
from ckaqad_cli.packing.verify import same_bits
from ckaqad_cli.stages.pack import PackConfig, pack_model
from ckaqad_kernels import nvfp4_ref
from fixtures import tiny_model

HIDDEN, INTER, EXPERTS = 32, 16, 4
EXPERTS_OF = "model.layers.{}.mlp.experts"


def tiny_moe(seed: int = 0, **overrides):
    """A tiny bf16 Qwen3-MoE whose experts have very different magnitudes (so a shared scale would show)."""
    model = tiny_model(
        "qwen3_moe", seed=seed, dtype=torch.bfloat16, hidden_size=HIDDEN, intermediate_size=48,
        moe_intermediate_size=INTER, num_attention_heads=2, num_key_value_heads=1, num_experts=EXPERTS,
        max_position_embeddings=64, **overrides,
    )
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(layer.mlp.experts, name)
                weight.mul_(torch.logspace(-2, 1, EXPERTS, dtype=torch.float32).to(weight.dtype).view(-1, 1, 1))
    return model.eval()


def _ids(rows: int = 2, cols: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (rows, cols), generator=torch.Generator().manual_seed(1))


def _save_student(model, recipe: quant.QuantRecipe, directory):
    model.save_pretrained(directory)
    recipe.save(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


def test_recipe_lists_per_expert_checkpoint_linears_and_fuses_gate_up_per_expert():
    model = tiny_moe()
    recipe = quant.apply_fake_quant(model, scheme="w4a16")
    for layer in range(2):
        experts = EXPERTS_OF.format(layer)
        members = [f"{experts}.{e}.{leaf}" for e in range(EXPERTS) for leaf in ("gate_proj", "up_proj", "down_proj")]
        assert set(members) <= set(recipe.quantized)
        assert [[f"{experts}.{e}.gate_proj", f"{experts}.{e}.up_proj"] for e in range(EXPERTS)] == [
            g for g in recipe.fused_groups if g[0].startswith(experts)
        ]
        assert not any(n.startswith(f"model.layers.{layer}.mlp.gate") for n in recipe.quantized)  # the router
        assert isinstance(model.get_submodule(experts), quant.NVFP4Experts)
    assert not any(".experts" in name for name in recipe.skipped)
    assert "model.layers.0.mlp.experts.gate_up_proj" in model.state_dict()  # names unchanged


def test_excluded_experts_stay_dense():
    model = tiny_moe()
    recipe = quant.apply_fake_quant(model, scheme="w4a16", exclude=["model.layers.1.mlp.experts"])
    assert "excluded" in recipe.skipped["model.layers.1.mlp.experts"]
    assert not any(n.startswith("model.layers.1.mlp.experts.") for n in recipe.quantized)
    assert not isinstance(model.model.layers[1].mlp.experts, quant.NVFP4Experts)


@settings(max_examples=15, deadline=None)
@given(
    experts=st.integers(1, 4),
    blocks_in=st.integers(1, 3),
    rows=st.integers(1, 6),
    scales=st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_each_expert_slice_is_the_reference_fake_quant_with_its_own_group_scale(experts, blocks_in, rows, scales, seed):
    """Fused [E, 2I, H]: expert e's gate and up rows use one scale from both (the fused group), blocks along H."""
    g = torch.Generator().manual_seed(seed)
    inter, hidden = rows * 2, blocks_in * 16
    weight = torch.randn(experts, 2 * inter, hidden, generator=g) * torch.tensor(scales[:experts]).view(-1, 1, 1)
    weight = weight.to(torch.bfloat16)
    got = quant_moe._per_expert_fake_quant(weight)
    for e in range(experts):
        gate, up = weight[e, :inter], weight[e, inter:]
        scale = quant.group_weight_global_scale([gate, up])
        assert same_bits(got[e, :inter], nvfp4_ref.fake_quantize(gate, scale))
        assert same_bits(got[e, inter:], nvfp4_ref.fake_quantize(up, scale))


def test_weight_gradient_passes_straight_through():
    model = tiny_moe()
    quant.apply_fake_quant(model, scheme="w4a16")
    experts = model.model.layers[0].mlp.experts
    weight = experts._parameters["gate_up_proj"]
    weight.requires_grad_(True)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)).to(weight.dtype)
    (experts.gate_up_proj * upstream).sum().backward()
    assert same_bits(weight.grad, upstream)
    assert not torch.equal(experts.gate_up_proj, weight.detach())  # the forward value is quantized


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_fused_fake_quant_is_bit_identical_to_packed_per_expert_tensors(tmp_path, fmt):
    model = tiny_moe()
    recipe = quant.apply_fake_quant(model, scheme="w4a16")
    source = _save_student(model, recipe, tmp_path / "student")
    out = tmp_path / "packed"
    pack_model(PackConfig(model=str(source), out=str(out), format=fmt, verify=False))
    decoded = formats.load_dequantized_state_dict(out)
    checked = 0
    for layer in range(2):
        experts = model.get_submodule(EXPERTS_OF.format(layer))
        gate_up_raw, down_raw = experts._parameters["gate_up_proj"], experts._parameters["down_proj"]
        with torch.no_grad():
            gate_up, down = experts.gate_up_proj, experts.down_proj
        for e in range(EXPERTS):
            prefix = f"{EXPERTS_OF.format(layer)}.{e}"
            want = {"gate_proj": gate_up[e, :INTER], "up_proj": gate_up[e, INTER:], "down_proj": down[e]}
            scales = {"gate_proj": gate_up_raw[e], "up_proj": gate_up_raw[e], "down_proj": down_raw[e]}
            for leaf, tensor in want.items():
                got = decoded[f"{prefix}.{leaf}.weight"]
                g = quant.group_weight_global_scale([scales[leaf]])
                if fmt == "modelopt" or formats.scale_is_exact(formats.compressed_tensors, g):
                    assert same_bits(got, tensor), f"{prefix}.{leaf}"
                else:  # compressed-tensors stores 1/g; some g have no exactly invertible float32 (docs/nvfp4.md)
                    torch.testing.assert_close(got, tensor, rtol=torch.finfo(got.dtype).eps, atol=0)
                checked += 1
    assert checked == 2 * EXPERTS * 3
    assert "model.layers.0.mlp.gate.weight" in decoded  # the router stays as stored


def _reference_experts(experts, hidden, top_k_index, top_k_weights, g_in, g_down):
    """Expert by expert as a per-expert Linear deployment computes it: each expert's rows quantized with the
    shared input scales, the per-expert fake-quantized weights."""
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    gate_up, down = experts.gate_up_proj.float(), experts.down_proj.float()
    for token in range(hidden.shape[0]):
        for slot in range(top_k_index.shape[1]):
            e = int(top_k_index[token, slot])
            x = nvfp4_ref.fake_quantize(hidden[token : token + 1], g_in).float()
            gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)
            h = nvfp4_ref.fake_quantize((F.silu(gate) * up).to(hidden.dtype), g_down).float()
            out[token] += float(top_k_weights[token, slot]) * F.linear(h, down[e])[0]
    return out


def test_w4a4_quantizes_expert_inputs_with_one_scale_per_projection():
    model = tiny_moe()
    quant.apply_fake_quant(model, scheme="w4a4")
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(10, HIDDEN, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    top_k_index = torch.tensor([[e % EXPERTS, (e + 1) % EXPERTS] for e in range(10)])
    top_k_weights = torch.full((10, 2), 0.5, dtype=torch.bfloat16)
    with quant_calibration.record_input_amax(model) as amax:
        with torch.no_grad():
            experts(hidden, top_k_index, top_k_weights)
    name = EXPERTS_OF.format(0)
    assert amax[f"{name}.2.up_proj"] == pytest.approx(float(hidden.abs().max()))
    assert len({amax[f"{name}.{e}.down_proj"] for e in range(EXPERTS)}) == 1
    quant.set_input_amax(model, {k: v for k, v in amax.items() if k.startswith(name)})
    g_in = nvfp4_ref.global_scale_from_amax(amax[f"{name}.0.gate_proj"])
    g_down = nvfp4_ref.global_scale_from_amax(amax[f"{name}.0.down_proj"])
    with torch.no_grad():
        got = experts(hidden, top_k_index, top_k_weights).float()
        want = _reference_experts(experts, hidden, top_k_index, top_k_weights, g_in, g_down)
        experts.quantize_input = False
        weight_only = experts(hidden, top_k_index, top_k_weights).float()
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * float(want.abs().max()))
    assert (got - want).abs().max() < (weight_only - want).abs().max()


def test_w4a4_refuses_an_experts_implementation_that_skips_apply_gate():
    model = tiny_moe()
    quant.apply_fake_quant(model, scheme="w4a4")
    model.set_experts_implementation("eager")
    with pytest.raises(CkaqadError, match="grouped_mm or batched_mm"):
        model(input_ids=_ids())


def test_input_amaxes_of_one_projection_must_agree():
    model = tiny_moe()
    quant.apply_fake_quant(model, scheme="w4a4")
    name = EXPERTS_OF.format(1)
    with pytest.raises(CkaqadError, match="share one input scale"):
        quant.set_input_amax(model, {f"{name}.0.down_proj": 1.0, f"{name}.1.down_proj": 2.0})


def test_recipe_round_trip_through_load_model(tmp_path):
    model = tiny_moe()
    recipe = quant.apply_fake_quant(model, scheme="w4a4")
    with torch.no_grad(), quant_calibration.record_input_amax(model) as amax:
        model(input_ids=_ids())
    recipe.input_amax = dict(amax)
    quant.set_input_amax(model, recipe.input_amax)
    source = _save_student(model, recipe, tmp_path / "student")
    loaded, _ = load_model(source, dtype=torch.bfloat16)
    assert isinstance(loaded.model.layers[1].mlp.experts, quant.NVFP4Experts)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits)
    partial = quant.QuantRecipe(scheme="w4a16", quantized=[f"{EXPERTS_OF.format(0)}.0.down_proj"])
    with pytest.raises(CkaqadError, match="all or none"):
        quant.apply_recipe(tiny_moe(), partial)
    unfused = quant.QuantRecipe(scheme="w4a16", quantized=list(recipe.quantized))
    with pytest.raises(CkaqadError, match="does not fuse"):
        quant.apply_recipe(tiny_moe(), unfused)


def test_packed_moe_directory_loads_with_its_experts(tmp_path):
    """load_model on a packed MoE: transformers fuses the per-expert tensors, so the dense model computes exactly
    what the weight-quantized student computes (load_state_dict would leave the experts random)."""
    model = tiny_moe()
    recipe = quant.apply_fake_quant(model, scheme="w4a16")
    source = _save_student(model, recipe, tmp_path / "student")
    out = tmp_path / "packed"
    pack_model(PackConfig(model=str(source), out=str(out), format="modelopt", verify=False))
    packed, _ = load_model(out, dtype=torch.bfloat16)
    student, _ = load_model(source, dtype=torch.bfloat16)  # both through from_pretrained (same rotary buffers)
    assert not isinstance(packed.model.layers[0].mlp.experts, quant.NVFP4Experts)
    with torch.no_grad():
        assert same_bits(packed.model.layers[0].mlp.experts.down_proj, model.model.layers[0].mlp.experts.down_proj)
        assert torch.equal(packed(input_ids=_ids()).logits, student(input_ids=_ids()).logits)


def test_mse_act_experts_use_their_layers_second_moments():
    model = tiny_moe()
    recipe = quant.apply_fake_quant(model, scheme="w4a16", scale_rule="mse-act")
    with torch.no_grad(), quant_calibration.record_inputs(model) as record:
        model(input_ids=_ids())
    moments = record.second_moments()
    assert set(moments) == set(recipe.quantized)
    name = EXPERTS_OF.format(0)
    assert torch.equal(moments[f"{name}.0.gate_proj"], moments[f"{name}.3.up_proj"])  # one input per projection
    assert moments[f"{name}.1.down_proj"].shape == (INTER,)
    assert record.amax[f"{name}.2.down_proj"] > 0
    quant.set_channel_weights(model, moments)
    experts = model.get_submodule(name)
    with torch.no_grad():
        got = experts.gate_up_proj
    raw = experts._parameters["gate_up_proj"].detach()
    for e in range(EXPERTS):
        g = quant.group_weight_global_scale([raw[e]])
        w = moments[f"{name}.{e}.gate_proj"]
        want = nvfp4_ref.fake_quantize(raw[e], g, scale_rule="mse-act", channel_weights=w)
        assert same_bits(got[e], want)


def test_pack_writes_the_students_scale_rule(tmp_path):
    model = tiny_moe()
    recipe = quant.apply_fake_quant(model, scheme="w4a16", scale_rule="mse")
    source = _save_student(model, recipe, tmp_path / "student")
    out = tmp_path / "packed"
    pack_model(PackConfig(model=str(source), out=str(out), format="modelopt", verify=False))
    decoded = formats.load_dequantized_state_dict(out)
    experts = model.get_submodule(EXPERTS_OF.format(1))
    with torch.no_grad():
        down = experts.down_proj
    for e in range(EXPERTS):
        assert same_bits(decoded[f"{EXPERTS_OF.format(1)}.{e}.down_proj.weight"], down[e])
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        assert same_bits(decoded["model.layers.0.self_attn.q_proj.weight"], q.quantized_weight())


def test_an_mse_act_student_loads_with_its_second_moments(tmp_path):
    from ckaqad_cli.packing.calibrate import load_student

    model = tiny_moe()
    recipe = quant.apply_fake_quant(model, scheme="w4a16", scale_rule="mse-act")
    with torch.no_grad(), quant_calibration.record_inputs(model) as record:
        model(input_ids=_ids())
    quant.set_channel_weights(model, record.second_moments())
    source = _save_student(model, recipe, tmp_path / "student")
    quant_calibration.save_second_moments(source, record.second_moments())
    loaded, _ = load_student(source, recipe, "cpu", torch.bfloat16)
    with torch.no_grad():
        assert same_bits(loaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits)
