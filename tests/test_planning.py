"""ckaqad_cli.planning: units and their bytes, the chooser, the budget's errors, and the scores against a brute-force
recomputation on a tiny model."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from ckaqad_cli.cka import TokenFilter, linear_cka
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.kl import token_kl
from ckaqad_cli.models import decoder_layers
from ckaqad_cli.planning import sensitivity
from ckaqad_cli.planning.budget import average_bits, budget_bytes, check_budget, choose
from ckaqad_cli.planning.recipe import fp8_members, kept_exclude, plan_exclude, plan_fp8, plan_recipe
from ckaqad_cli.planning.switch import prepare
from ckaqad_cli.planning.units import Unit, UnitTable
from ckaqad_cli.quant import apply_fake_quant, group_weight_global_scale
from ckaqad_kernels.fake_quant import fake_quantize_ste
from fixtures import tiny_model, tiny_sequences

QUIET = Console(stderr=True, quiet=True)


def _table(sizes: list[int], fixed: int = 4096, experts: int = 0) -> UnitTable:
    """Units of 16 * n weights in rows of 16 (FP8-able), and ``experts`` more of 1024 weights that cannot be FP8."""
    units = tuple(Unit(f"u{i}", (f"u{i}",), (f"u{i}",), (f"u{i}",), 16 * n, None, n) for i, n in enumerate(sizes))
    units += tuple(Unit(f"e{i}", (f"e{i}",), (f"e{i}",), (f"e{i}",), 1024, None) for i in range(experts))
    return UnitTable(units, {"lm_head": fixed}, "w4a4")


def _bits_for(table: UnitTable, kept) -> float:
    """The budget that exactly affords keeping ``kept`` (a hair above, so that rounding cannot fall below)."""
    return table.bits(table.bytes_of(kept)) + 1e-9


def _prepared(arch: str = "llama", **fields):
    model = tiny_model(arch, **fields).eval().requires_grad_(False)
    table, recipe = prepare(model, "w4a4", ())
    return model, table, recipe


# -- units -----------------------------------------------------------------------------------------------------
def test_dense_units_are_fused_groups_and_single_linears_and_every_linear_weight_counts():
    model = tiny_model()
    teacher = copy.deepcopy(model)
    table, recipe = prepare(model, "w4a4", ())
    layer0 = [u for u in table.units if u.layer == 0]
    assert [u.name for u in layer0] == ["model.layers.0.self_attn.q_proj+k_proj+v_proj",
                                        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj+up_proj",
                                        "model.layers.0.mlp.down_proj"]
    assert {tuple(g) for g in recipe.fused_groups} <= {u.members for u in table.units}
    assert table.fixed == {"lm_head": teacher.lm_head.weight.numel()}
    linears = sum(m.weight.numel() for m in teacher.modules() if isinstance(m, torch.nn.Linear))
    assert table.total_weights == linears
    qkv = layer0[0]
    assert qkv.weights == sum(teacher.get_submodule(n).weight.numel() for n in qkv.members)
    assert (qkv.nvfp4_bytes, qkv.bf16_bytes) == (qkv.weights * 9 // 16, 2 * qkv.weights)
    assert table.bits(table.bytes_of(())) > 4.5 and table.bits(table.bytes_of(u.name for u in table.units)) == 16


def test_moe_experts_of_a_layer_form_one_unit():
    model, table, recipe = _prepared("qwen3_moe")
    experts = table.unit("model.layers.0.mlp.experts")
    assert experts.modules == ("model.layers.0.mlp.experts",) and experts.exclude == ("model.layers.0.mlp.experts",)
    assert set(experts.members) == {n for n in recipe.quantized if n.startswith("model.layers.0.mlp.experts.")}
    module = model.get_submodule("model.layers.0.mlp.experts")
    assert experts.weights == module._parameters["gate_up_proj"].numel() + module._parameters["down_proj"].numel()
    assert list(table.fixed) == ["lm_head"]  # the router is no Linear (nor quantizable by ModelOpt): not counted
    kept = plan_recipe(model.config, "w4a4", kept_exclude(table, [experts.name]))
    assert not any(n.startswith("model.layers.0.mlp.experts.") for n in kept.quantized)
    assert any(n.startswith("model.layers.1.mlp.experts.") for n in kept.quantized)


# -- the chooser ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_budget_is_respected_to_the_byte_and_filled(seed):
    rng = random.Random(seed)
    table = _table([rng.choice([64, 256, 1024, 3072]) for _ in range(rng.randint(1, 12))])
    scores = {u.name: rng.random() for u in table.units}
    low, high = table.bits(table.bytes_of(())), table.bits(table.bytes_of(u.name for u in table.units))
    bits = rng.uniform(low + 1e-9, high - 1e-6)
    choice = choose(table, scores, bits)
    assert choice.weight_bytes == table.bytes_of(choice.kept) <= choice.budget_bytes == budget_bytes(table, bits)
    assert choice.budget_bytes == math.floor(bits * table.total_weights / 8)
    leftover = choice.budget_bytes - choice.weight_bytes
    assert all(u.extra_bytes() > leftover for u in table.units if u.name not in choice.kept)  # nothing else fits
    assert choose(table, scores, bits) == choice  # deterministic


@pytest.mark.parametrize("seed", range(10))
def test_more_budget_never_keeps_fewer_bytes(seed):
    rng = random.Random(seed)
    table = _table([rng.choice([64, 256, 1024, 3072]) for _ in range(10)])
    scores = {u.name: rng.random() for u in table.units}
    low, high = table.bits(table.bytes_of(())), table.bits(table.bytes_of(u.name for u in table.units))
    kept_bytes = [choose(table, scores, low + (high - low) * (k + 0.5) / 200).weight_bytes for k in range(200)]
    assert kept_bytes == sorted(kept_bytes)


def test_chooser_ranks_by_score_per_byte_and_breaks_ties_by_module_order():
    table = _table([100, 100, 300])
    # u2 removes the most score but less per byte than u0 and u1 (equal: module order)
    scores = {"u0": 1.0, "u1": 1.0, "u2": 2.0}
    assert choose(table, scores, _bits_for(table, ["u0", "u1"])).kept == ("u0", "u1")
    assert choose(table, scores, _bits_for(table, ["u0"])).kept == ("u0",)
    assert choose(table, scores, _bits_for(table, ["u2"])).kept == ("u0", "u1")


def test_fused_groups_stay_whole_in_every_plan():
    model, table, recipe = _prepared()
    rng = random.Random(0)
    for _ in range(5):
        kept = [u.name for u in table.units if rng.random() < 0.5]
        planned = plan_recipe(model.config, "w4a4", kept_exclude(table, kept))
        quantized = set(planned.quantized)
        for group in recipe.fused_groups:
            assert set(group) <= quantized or not set(group) & quantized
        assert {tuple(g) for g in planned.fused_groups} <= {tuple(g) for g in recipe.fused_groups}
        assert quantized == {m for u in table.units if u.name not in kept for m in u.members}


@pytest.mark.parametrize("bits", [float("nan"), float("inf"), 4.49, 16.01, -1.0])
def test_budgets_no_model_can_meet_are_one_line(bits):
    with pytest.raises(CkaqadError, match=r"^--budget-bits must be a number from 4\.5") as e:
        check_budget(_table([64]), bits)
    assert "\n" not in str(e.value)


def test_budget_below_what_the_bf16_modules_need_or_keeping_everything_is_one_line():
    table = _table([64, 64], fixed=100_000)  # a large head that stays BF16: the minimum is far above 4.5
    with pytest.raises(CkaqadError, match=r"^--budget-bits 5 is below .*stay BF16 whatever the plan \(lm_head\)") as e:
        check_budget(table, 5.0)
    assert "\n" not in str(e.value)
    with pytest.raises(CkaqadError, match=r"puts every unit it can in BF16.*nothing would be quantized") as e:
        check_budget(table, 16.0)
    assert "\n" not in str(e.value)
    with pytest.raises(CkaqadError, match=r"puts every unit it can in FP8.*nothing would be NVFP4") as e:
        check_budget(_table([64, 64], fixed=16), 11.0, "fp8")  # all FP8: 10.05 bits
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("seed", range(10))
def test_a_budget_over_the_units_counts_their_weights_only_the_fixed_ones_on_top(seed):
    """--budget-over units: floor(bits * unit weights / 8) bytes for the units, 2 bytes per fixed weight on top;
    the same chooser, and the same plan as the budget over every weight that allows the same bytes."""
    rng = random.Random(seed)
    table = _table([rng.choice([64, 256, 1024, 3072]) for _ in range(rng.randint(1, 12))], fixed=rng.choice([16, 4096]))
    scores = {u.name: rng.random() for u in table.units}
    units = table.total_weights - table.fixed_weights
    high = average_bits(table, table.bytes_of(u.name for u in table.units), "units")
    bits = rng.uniform(4.5, high - 1e-6)
    choice = choose(table, scores, bits, "bf16", "units")
    assert choice.budget_bytes == budget_bytes(table, bits, "units") == math.floor(bits * units / 8) \
        + 2 * table.fixed_weights
    assert choice.weight_bytes == table.bytes_of(choice.kept) <= choice.budget_bytes
    assert all(u.extra_bytes() > choice.budget_bytes - choice.weight_bytes for u in table.units
               if u.name not in choice.kept)
    assert choice.effective_bits == table.bits(choice.weight_bytes)  # the report's bits count every Linear weight
    assert average_bits(table, choice.weight_bytes, "units") <= bits
    same = (choice.budget_bytes + 0.5) * 8 / table.total_weights  # the linear budget of the same whole bytes
    assert choose(table, scores, same).kept == choice.kept
    assert budget_bytes(table, bits, "units") >= budget_bytes(table, bits)  # the fixed weights' 16 bits are extra


def test_a_budget_over_the_units_admits_4_5_and_names_its_own_count_when_too_high():
    table = _table([64, 64], fixed=100_000)  # a head so large that 5.0 bits over every weight cannot be met
    assert choose(table, {"u0": 1.0, "u1": 2.0}, 4.5, "bf16", "units").kept == ()
    assert choose(table, {"u0": 1.0, "u1": 2.0}, 10.25, "bf16", "units").kept == ("u1",)  # one of two: 10.25 bits
    with pytest.raises(CkaqadError, match=r"^--budget-bits 16 puts every unit it can in BF16 \(16\.0000 bits per "
                                          r"weight\)") as e:
        check_budget(table, 16.0, "bf16", "units")
    assert "\n" not in str(e.value)
    with pytest.raises(CkaqadError, match=r"puts every unit it can in FP8 \(10\.0000 bits"):
        check_budget(table, 11.0, "fp8", "units")  # 8 bits and a float32 scale per row of 16: 10


def test_a_score_that_is_not_a_number_is_one_line():
    table = _table([64, 64])
    with pytest.raises(CkaqadError, match="the score of u1 is nan"):
        choose(table, {"u0": 1.0, "u1": float("nan")}, 14.0)


# -- scores against a brute-force recomputation --------------------------------------------------------------------
def _alone(teacher, table, unit):
    """The teacher with only ``unit`` fake-quantized, made the way distill makes a student."""
    others = [u.name for u in table.units if u.name != unit.name]
    student = copy.deepcopy(teacher)
    apply_fake_quant(student, "w4a4", kept_exclude(table, others))
    return student


def _scored(layers: int, sequences: int, batch_size: int):
    """A tiny teacher (left unwrapped), calibration ids, and the units and scores ``measure`` gives on a copy."""
    teacher = tiny_model(num_hidden_layers=layers).eval().requires_grad_(False)
    ids = tiny_sequences(sequences)
    model = copy.deepcopy(teacher)
    table, recipe = prepare(model, "w4a4", ())
    measured = sensitivity.measure(model, table, ids, batch_size=batch_size, bos_token_id=1, console=QUIET)
    return teacher, ids, table, recipe, measured


@torch.no_grad()
def test_cka_and_kl_scores_match_a_brute_force_recomputation():
    teacher, ids, table, _, measured = _scored(layers=3, sequences=12, batch_size=5)
    keep = TokenFilter().mask(ids, None, (), 1)

    def layer_outputs(m):
        """Every decoder layer's output (before the final norm) and the logits, in the batches ``measure`` runs
        (W4A4 input scales are per batch)."""
        seen: dict[int, list[torch.Tensor]] = {}
        handles = [layer.register_forward_hook(lambda _m, _a, out, i=i: seen.setdefault(i, []).append(out))
                   for i, layer in enumerate(decoder_layers(m))]
        logits = torch.cat([m(input_ids=b, use_cache=False).logits for b in torch.split(ids, 5)])
        for handle in handles:
            handle.remove()
        return [torch.cat(seen[i]) for i in sorted(seen)], logits

    def cka(a, b):
        return float(linear_cka(a[keep].double(), b[keep].double()))

    want, want_logits = layer_outputs(teacher)
    for unit in table.units:
        got, logits = layer_outputs(_alone(teacher, table, unit))
        assert measured.cka_own[unit.name] == pytest.approx(cka(got[unit.layer], want[unit.layer]), abs=1e-5)
        assert measured.cka_last[unit.name] == pytest.approx(cka(got[-1], want[-1]), abs=1e-5)
        kl = float(token_kl(logits, want_logits).mean())
        assert measured.kl[unit.name] == pytest.approx(kl, rel=1e-4, abs=1e-7), unit.name


def test_gradient_score_matches_autoquantize_rule_recomputed_by_hand():
    teacher, ids, table, recipe, measured = _scored(layers=2, sequences=6, batch_size=3)
    groups = {m: g for g in recipe.fused_groups for m in g}
    want = dict.fromkeys((u.name for u in table.units), 0.0)
    for batch in torch.split(ids, 3):
        inputs, outputs = {}, {}
        hooks = []
        for unit in table.units:
            for name in unit.members:
                def keep(module, args, out, name=name):
                    inputs[name] = args[0].detach()
                    out.retain_grad()
                    outputs[name] = out
                hooks.append(teacher.get_submodule(name).register_forward_hook(keep))
        embed = teacher.get_input_embeddings().register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True))
        logits = teacher(input_ids=batch, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).backward()
        for handle in [*hooks, embed]:
            handle.remove()
        for unit in table.units:
            for name in unit.members:
                weights = [teacher.get_submodule(m).weight for m in groups.get(name, [name])]
                w = fake_quantize_ste(teacher.get_submodule(name).weight, group_weight_global_scale(weights))
                quantized = F.linear(fake_quantize_ste(inputs[name], None), w)
                delta = quantized - outputs[name].detach()
                want[unit.name] += float((outputs[name].grad * delta).square().sum())
    for unit in table.units:
        assert measured.grad[unit.name] == pytest.approx(want[unit.name], rel=1e-3), unit.name
    assert min(want.values()) > 0


def test_cost_is_linear_in_units_and_scores_are_ranked_as_documented():
    model, table, _ = _prepared(num_hidden_layers=2)
    measured = sensitivity.measure(model, table, tiny_sequences(4), batch_size=4, bos_token_id=1, console=QUIET)
    assert measured.batches == 1 and measured.backwards_per_batch == 1
    # a teacher forward per decoder layer, a partial forward per unit, the gradient's forward
    assert measured.forwards_per_batch == 2 + 4 * 1.0 + 4 * 0.5 + 1
    cka = measured.scores("cka")
    name = table.units[0].name
    assert cka[name] == pytest.approx(1 - (measured.cka_own[name] + measured.cka_last[name]) / 2)
    assert measured.scores("kl") == measured.kl and measured.scores("grad") == measured.grad


def test_plan_recipe_round_trips_through_the_exclude_globs():
    model, table, _ = _prepared()
    kept = [table.units[0].name, table.units[3].name]
    planned = plan_recipe(model.config, "w4a4", kept_exclude(table, kept, ["*.layers.1.mlp.down_proj"]))
    again = apply_fake_quant(tiny_model(), "w4a4", plan_exclude(planned))
    assert again == planned
    assert plan_exclude(planned)[0] == "*.layers.1.mlp.down_proj"


# -- FP8 as the upgrade ----------------------------------------------------------------------------------------------
def test_fp8_bytes_are_a_byte_a_weight_and_a_float32_scale_per_output_channel():
    model, table, _ = _prepared()
    qkv = table.units[0]
    rows = sum(model.get_submodule(n).out_features for n in qkv.members)
    assert qkv.rows == rows and qkv.fp8_bytes == qkv.weights + 4 * rows
    assert qkv.extra_bytes("fp8") == qkv.fp8_bytes - qkv.nvfp4_bytes and qkv.extra_bytes() == qkv.extra_bytes("bf16")
    _, moe, _ = _prepared("qwen3_moe")
    experts = moe.unit("model.layers.0.mlp.experts")
    assert experts.fp8_bytes is None and experts not in moe.upgradable("fp8") and experts in moe.upgradable("bf16")


@pytest.mark.parametrize("seed", range(20))
def test_fp8_budget_is_respected_to_the_byte_monotone_and_never_upgrades_experts(seed):
    rng = random.Random(seed)
    table = _table([rng.choice([64, 256, 1024, 3072]) for _ in range(rng.randint(1, 10))], experts=2)
    scores = {u.name: rng.random() for u in table.units}
    fp8_units = [u.name for u in table.upgradable("fp8")]
    low, high = table.bits(table.bytes_of(())), table.bits(table.bytes_of(fp8_units, "fp8"))
    bits = rng.uniform(low + 1e-9, high - 1e-6)
    choice = choose(table, scores, bits, "fp8")
    assert choice.upgrade == "fp8" and not any(name.startswith("e") for name in choice.kept)
    assert choice.weight_bytes == table.bytes_of(choice.kept, "fp8") <= choice.budget_bytes
    leftover = choice.budget_bytes - choice.weight_bytes
    assert all(table.unit(n).extra_bytes("fp8") > leftover for n in fp8_units if n not in choice.kept)
    spent = [choose(table, scores, low + (high - low) * (k + 0.5) / 50, "fp8").weight_bytes for k in range(50)]
    assert spent == sorted(spent)


def test_an_fp8_plan_recipe_puts_the_chosen_units_in_fp8_and_keeps_fused_groups_whole():
    model, table, _ = _prepared()
    rng = random.Random(1)
    chosen = [u.name for u in table.units if rng.random() < 0.5]
    planned = plan_recipe(model.config, "w4a4", (), fp8=fp8_members(table, chosen))
    assert set(planned.fp8) == {m for u in table.units if u.name in chosen for m in u.members}
    assert set(planned.quantized) == {m for u in table.units if u.name not in chosen for m in u.members}
    assert plan_fp8(planned) == planned.fp8 and plan_exclude(planned) == []
