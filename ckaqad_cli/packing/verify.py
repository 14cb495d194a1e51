"""pack's verify: the packed checkpoint against the fake-quantized student it was packed from, weight by weight (decoded
by our unpacker) and by the logits of a few sequences (through our unpacker, and through transformers where it reads
the format)."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ckaqad_cli.formats import layout
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.models import is_moe, load_packed_pretrained
from ckaqad_cli.packing.calibrate import load_student
from ckaqad_cli.packing.plan import PackPlan
from ckaqad_cli.packing.write import scale_rule_args
from ckaqad_cli.quant import QuantRecipe, group_weight_global_scale
from ckaqad_cli.safetensors_io import SafetensorsSource
from ckaqad_kernels import fp8_ref, nvfp4_ref

VERIFY_TOP1_MIN = 0.8
VERIFY_MAX_ABS_REL = 0.25
"""Verify's logits must match the student's exactly, except when some global scales cannot be stored exactly: then
top-1 agreement at least VERIFY_TOP1_MIN, and with activation quantization off, max |diff| within VERIFY_MAX_ABS_REL
times the student's max |logit| (see verify_logits)."""
VERIFY_SEQUENCES = 4
VERIFY_SEQ_LEN = 32


def verify_weights(plan: PackPlan, src: SafetensorsSource, out: Path) -> dict[str, Any]:
    """Decode every quantized module with our unpacker and compare with the student's fake-quantized weight.

    Our unpacker decodes as the format's readers do (``block_divisors``). Bit-exact is required, with one exception:
    where the readers' block divisors differ from ours (compressed-tensors divides each block scale by its stored
    reciprocal of g, which for some pairs of block scale and g lands one float32 step from our s * g, and for about
    one g in seven cannot be the exact reciprocal at all), a value may differ by the divisors' relative difference
    plus one rounding step of the dtype, and by no more; such a module is counted apart.
    """
    exact, inexact_scale, max_diff, mismatched = 0, [], 0.0, []
    with SafetensorsSource(out) as packed:
        for group in plan.groups:
            weights = {m: src.get(f"{m}.weight") for m in group}
            g = group_weight_global_scale(list(weights.values()))
            for m, w in weights.items():
                # In the source's dtype; in float32 when deployed in another (a widening cast would show there what
                # the source's rounding hides: a global scale that the format cannot store exactly)
                if plan.dtype != w.dtype:
                    w = w.float()
                names = [spec.name for spec in layout.module_specs(plan.fmt, m, *plan.shapes[m], plan.scheme)]
                tensors = {n: packed.get(n) for n in names}
                got = layout.decode(plan.fmt, tensors, m, w.dtype)
                want = nvfp4_ref.fake_quantize(w, g, **scale_rule_args(plan, m, plan.second_moments, "cpu"))
                if same_bits(got, want):
                    exact += 1
                    continue
                diff = (got.float() - want.float()).abs()
                max_diff = max(max_diff, float(diff.max()))
                theirs = layout.divisors(plan.fmt, tensors, m).double()
                ours = nvfp4_ref.block_divisors(tensors[names[1]], g).double()
                differ = theirs != ours
                rel = float(((theirs - ours).abs() / ours)[differ].max()) if bool(differ.any()) else 0.0
                if rel and bool((diff <= want.float().abs() * (rel + torch.finfo(w.dtype).eps)).all()):
                    inexact_scale.append(m)
                else:
                    mismatched.append(m)
        for m in plan.fp8:  # FP8 scales are stored as computed: the decode is exact
            w = src.get(f"{m}.weight")
            if plan.dtype != w.dtype:
                w = w.float()
            codes, scales = (packed.get(f"{m}.{p}") for p in plan.fmt.FP8_PARAMS)
            got, want = fp8_ref.dequantize(codes, scales, w.dtype), fp8_ref.fake_quantize_weight(w)
            if same_bits(got, want):
                exact += 1
            else:
                mismatched.append(m)
                max_diff = max(max_diff, float((got.float() - want.float()).abs().max()))
    return {
        "modules": len(plan.shapes) + len(plan.fp8),
        "bit_exact": exact,
        "reciprocal_scale_inexact": inexact_scale,
        "mismatched": mismatched,
        "max_abs_diff": max_diff,
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN, -0 != +0), unlike torch.equal on floats."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(ints[a.element_size()]), b.reshape(-1).view(ints[b.element_size()]))



def _verify_ids(tokenizer, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (VERIFY_SEQUENCES, VERIFY_SEQ_LEN), generator=g)



def _packed_through_unpacker(out: Path, plan: PackPlan, device: str):
    """The packed model decoded by our unpacker into a dense model, with W4A4 activations fake-quantized from the
    stored input scales (weights are not quantized again: they already are the quantized values)."""
    from ckaqad_cli.quant import apply_recipe, stop_weight_quantization

    model = load_packed_pretrained(out, dtype=plan.dtype, device=device)
    recipe = QuantRecipe(**{**asdict(plan.recipe), "quantized": list(plan.shapes), "fp8": list(plan.fp8),
                            "input_amax": plan.input_amax})
    recipe.fused_groups = [g for g in plan.groups if len(g) > 1]
    apply_recipe(model, recipe)
    stop_weight_quantization(model)
    return model


@contextlib.contextmanager
def _cpu_linears_in_float32() -> Iterator[None]:
    """Within the block, a bf16 or fp16 ``F.linear`` on the CPU runs as a float32 GEMM rounded once to its dtype.

    A CPU without native bf16 matrix instructions computes a bf16 GEMM tens of times slower than a float32 one (on
    AVX2 it was most of verify's time). Every model verify compares runs through the same path, so the comparisons
    are as exact as before: equal weights give equal logits, and a weight that differs shows.
    """
    native = F.linear

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
            return native(x, weight, bias)
        return native(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)

    F.linear = linear
    try:
        yield
    finally:
        F.linear = native


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), _cpu_linears_in_float32():
        return model(input_ids=ids).logits.float()


def _set_activation_quant(student, packed, on: bool, through_transformers: bool) -> None:
    """Switch W4A4 input quantization on or off in both models (weights stay quantized)."""
    from ckaqad_cli.quant import FP8Linear, NVFP4Experts, NVFP4Linear

    for model in (student, packed):
        for module in model.modules():
            if isinstance(module, (NVFP4Linear, NVFP4Experts, FP8Linear)):
                module.quantize_input = on
            scheme = getattr(module, "quantization_scheme", None) if through_transformers else None
            if scheme is not None:
                if not hasattr(module, "_ckaqad_inputs"):
                    module._ckaqad_inputs = scheme.input_activations
                scheme.input_activations = module._ckaqad_inputs if on else None


def _compare(student, packed, ids: torch.Tensor, scheme: str, through_transformers: bool
             ) -> tuple[dict[str, float], torch.Tensor]:
    """(weights-only max |diff| of the logits, then (W4A4 activations on, for that scheme) max |diff| and top-1;
    the packed model's weights-only logits)."""
    _set_activation_quant(student, packed, False, through_transformers)
    want, got = _logits(student, ids), _logits(packed, ids)
    weights_only, weights_only_logits = float((got - want).abs().max()), got
    if scheme == "w4a4":
        _set_activation_quant(student, packed, True, through_transformers)
        want, got = _logits(student, ids), _logits(packed, ids)
    return {
        "weights_only_max_abs_diff": weights_only,
        "max_abs_diff": float((got - want).abs().max()),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
        "student_max_abs_logit": float(want.abs().max()),
    }, weights_only_logits


def _transformers_reads(plan: PackPlan) -> bool:
    """Whether transformers can load the packed model as the student ran: a format it loads quantized (through the
    format's TRANSFORMERS_LIBRARY, compressed-tensors), dense, bf16 (transformers loads compressed-tensors models in
    bf16 only), the library installed."""
    library = plan.fmt.TRANSFORMERS_LIBRARY
    if library is None or is_moe(plan.config) or plan.dtype != torch.bfloat16:
        return False
    try:
        importlib.import_module(library)
    except ImportError:
        return False
    return True


def verify_logits(plan: PackPlan, out: Path, device: str, *, weights_exact: bool = True) -> dict[str, Any]:
    """Compare the packed model's logits with the fake-quantized student's on a few sequences.

    The gate is the packed model decoded by our own unpacker, W4A4 activations quantized from the stored input
    scales: its logits must equal the student's exactly, weights only and with activations. Where transformers reads
    the checkpoint (see _transformers_reads) it is loaded there too: its weights-only logits must also be exact,
    which proves the real loader reads every tensor as written. Its W4A4 logits are reported, not gated:
    compressed-tensors computes each activation block's scale in the activation dtype (bf16) where the NVFP4 spec
    (docs/nvfp4.md) and the engines' kernels use float32, so some activation codes differ.
    When some global scales cannot be stored exactly (``weights_exact`` false), exactness is replaced by top-1
    agreement >= VERIFY_TOP1_MIN and, weights only, max |diff| <= VERIFY_MAX_ABS_REL x the student's max |logit|.
    """
    from ckaqad_cli.quant import freeze_quantized_weights, set_input_amax, stop_weight_quantization

    with SafetensorsSource(plan.source) as src:  # the dtype the weights were quantized from
        source_dtype = src.spec(f"{next(iter(plan.shapes or plan.fp8))}.weight").dtype
    student, tokenizer = load_student(plan.source, plan.recipe, device, plan.dtype, plan.second_moments)
    if plan.dtype != source_dtype:
        # Deployed in another dtype: the weights quantized in float32 (what the checkpoint decodes from), each
        # rounded once into plan.dtype as the checkpoint decodes; the model itself loaded as the packed one is.
        reference, _ = load_student(plan.source, plan.recipe, device, torch.float32, plan.second_moments)
        freeze_quantized_weights(reference)
        student.load_state_dict(reference.state_dict())
        stop_weight_quantization(student)
        del reference
    else:
        freeze_quantized_weights(student)  # quantized once, not again in each forward below: the same values
    if plan.scheme == "w4a4":
        set_input_amax(student, plan.input_amax)
    ids = _verify_ids(tokenizer, int(student.config.vocab_size)).to(device)
    through_transformers = None
    if _transformers_reads(plan):
        from transformers import AutoModelForCausalLM

        packed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device).eval()
        through_transformers, transformers_logits = _compare(student, packed, ids, plan.scheme, True)
        del packed
    packed = _packed_through_unpacker(out, plan, device)
    ours, unpacker_logits = _compare(student, packed, ids, plan.scheme, False)
    if through_transformers is not None:  # the real loader decodes every weight as our unpacker does
        through_transformers["same_as_unpacker"] = bool(torch.equal(transformers_logits, unpacker_logits))
    path = "ckaqad unpacker" + (" (MoE: transformers fuses experts)" if is_moe(plan.config) else "")
    if through_transformers is not None:
        path += f"; transformers + {plan.fmt.NAME} (weights only)"
    if not weights_exact:  # some global scales could not be stored exactly (verify_weights): near, not equal
        # A weight one rounding step off can flip a W4A4 activation code, which moves a logit far: the max |diff|
        # is bounded with activations off, the W4A4 logits must agree on top-1.
        bound = VERIFY_MAX_ABS_REL * (ours["student_max_abs_logit"] or 1.0)
        ok = ours["top1_agreement"] >= VERIFY_TOP1_MIN and ours["weights_only_max_abs_diff"] <= bound
        tolerance = (f"weights-only max |diff| <= {bound:.3g}, top-1 >= {VERIFY_TOP1_MIN} (the format's readers "
                     "decode some scales one rounding step from ours)")
    else:
        ok = ours["weights_only_max_abs_diff"] == 0.0 and ours["max_abs_diff"] == 0.0
        tolerance = "exact (0 difference)"
    if through_transformers is not None:
        ok = ok and through_transformers["same_as_unpacker"]
        tolerance += "; through transformers, weights only, the same logits as our unpacker"
    result = {"path": path, **{k: v for k, v in ours.items() if k != "student_max_abs_logit"},
              "tolerance": tolerance, "passed": ok}
    if through_transformers is not None:
        result["transformers"] = {k: v for k, v in through_transformers.items() if k != "student_max_abs_logit"}
    return result



def raise_if_failed(verification: dict[str, Any]) -> None:
    w, lg = verification["weights"], verification["logits"]
    if w["mismatched"]:
        raise CkaqadError(
            f"verify failed: {len(w['mismatched'])} of {w['modules']} packed weights do not decode to the student's "
            f"fake-quantized weights (max |diff| {w['max_abs_diff']:.3g}, e.g. {', '.join(w['mismatched'][:3])})"
        )
    if not lg["passed"]:
        theirs = lg.get("transformers")
        also = "" if theirs is None else (
            f"; through transformers, weights only: max |diff| {theirs['weights_only_max_abs_diff']:.4g}, "
            f"{'the same as' if theirs['same_as_unpacker'] else 'not the same as'} our unpacker's")
        raise CkaqadError(
            f"verify failed ({lg['path']}): ckaqad unpacker logits max |diff| {lg['max_abs_diff']:.4g} (weights "
            f"only {lg['weights_only_max_abs_diff']:.4g}), top-1 agreement {lg['top1_agreement']:.3f}{also}; "
            f"tolerance {lg['tolerance']}"
        )
