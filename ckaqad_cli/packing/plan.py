"""pack's plan: the quantization recipe of the source and every output tensor's name, dtype and shape, in write order
(everything decided before the first byte is written)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ckaqad_cli import formats
from ckaqad_cli.formats import layout
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.quant import QuantRecipe, fused_groups
from ckaqad_cli.safetensors_io import SafetensorsSource, TensorSpec
from ckaqad_kernels import fp8_ref, nvfp4_ref, nvfp4_spec


@dataclass
class PackPlan:
    """Everything decided before the first byte is written."""

    source: Path
    config: dict[str, Any]
    fmt: ModuleType
    scheme: str
    recipe: QuantRecipe
    shapes: dict[str, tuple[int, int]]
    """Quantized (NVFP4) module -> (out_features, in_features)."""
    fp8: dict[str, tuple[int, int]]
    """FP8 module -> (out_features, in_features)."""
    kept: dict[str, str]
    """Linear modules left in high precision -> why."""
    groups: list[list[str]]
    """Units of work in write order: a fused group, or one module."""
    input_amax: dict[str, float]
    input_fallbacks: dict[str, str]
    specs: list[TensorSpec]
    steps: list[tuple[str, Any]]
    """("copy", tensor name), ("quantize", group) or ("fp8", module) in write order."""
    dtype: torch.dtype
    """dtype of the floating tensors copied unquantized, and of config.json."""
    second_moments: dict[str, torch.Tensor] | None = None
    """The mse-act channel weights ({module: E[x^2] per input channel}); None for the other scale rules."""


# -- recipe ----------------------------------------------------------------------------------------------------


def _meta_model(config: dict[str, Any]):
    """The model's module tree on the meta device (no memory), to find its nn.Linear modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


DENSE_DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""model_types whose transformers model is embeddings, decoder layers of q/k/v/o and gate/up/down projections and
norms, and the head: their Linear modules can be read off the checkpoint's tensor names (see dense_decoder_linears)."""
_DENSE_DECODER_TENSOR = re.compile(
    r"model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight"
    r"|model\.layers\.\d+\.(?:input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm)\.weight"
    r"|model\.layers\.\d+\.self_attn\.[qkvo]_proj\.(?:weight|bias)"
    r"|model\.layers\.\d+\.mlp\.(?:gate|up|down)_proj\.(?:weight|bias)"
)
_DENSE_DECODER_LINEAR = re.compile(r"model\.layers\.\d+\.(?:self_attn|mlp)\.[a-z_]+_proj")


def dense_decoder_linears(config: dict[str, Any], src: SafetensorsSource) -> list[tuple[str, int]] | None:
    """The (name, in_features) of every Linear of a dense decoder checkpoint, in module order, without building the
    model (importing transformers' modeling code costs seconds); None unless config's model_type is one of
    DENSE_DECODER_TYPES, it names no remote code and every tensor has a name of that standard layout. The head is a
    Linear even when tied to the embeddings (then it has no tensor of its own). tests/stages/test_pack_layout.py checks the
    result against the meta model for each of these types, tied and untied."""
    if config.get("model_type") not in DENSE_DECODER_TYPES or "auto_map" in config:
        return None
    specs = {s.name: s for s in src.specs()}
    if not all(_DENSE_DECODER_TENSOR.fullmatch(name) for name in specs):
        return None
    linears = [(n[: -len(".weight")], s.shape[1]) for n, s in specs.items()
               if n.endswith(".weight") and _DENSE_DECODER_LINEAR.fullmatch(n[: -len(".weight")]) and len(s.shape) == 2]
    if not linears or "model.embed_tokens.weight" not in specs:
        return None
    linears.sort(key=lambda item: _module_order(item[0]))
    return [*linears, ("lm_head", specs["model.embed_tokens.weight"].shape[1])]


_MODULE_ORDER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")


def _module_order(name: str) -> tuple[int, int]:
    _, _, layer, rest = name.split(".", 3)
    return int(layer), _MODULE_ORDER.index(rest)


def deploy_dtype(choice: str, source: Path, config: dict[str, Any]) -> torch.dtype:
    """The dtype of the unquantized tensors (--dtype): as chosen, else the source's, but bfloat16 for a distilled
    student, whose float32 master weights are a training device, not a deployment dtype."""
    if choice != "auto":
        return getattr(torch, choice)
    from ckaqad_cli.quant import RECIPE_FILE

    stored = formats.model_dtype(config)
    return torch.bfloat16 if stored == torch.float32 and (source / RECIPE_FILE).is_file() else stored


def build_recipe(
    source: Path, config: dict[str, Any], scheme: str | None, exclude: list[str], src: SafetensorsSource,
    scale_rule: str | None = None, fp8: list[str] | None = None,
) -> QuantRecipe:
    """The student's recorded recipe, or quant's own selection (DEFAULT_EXCLUDE + ``exclude``) for plain PTQ: from
    the checkpoint's names for the dense decoders of DENSE_DECODER_TYPES, else from the model built on the meta
    device. ``scale_rule``: the weights' (None: the student's, else amax); a student is packed with its own.
    ``fp8``: globs of Linears packed in FP8 (plain PTQ only, like ``exclude``)."""
    from ckaqad_cli.quant import RECIPE_FILE, apply_fake_quant, recipe_for_linears

    if (source / RECIPE_FILE).is_file():
        recipe = QuantRecipe.load(source)
        if exclude or fp8:
            option = "--exclude" if exclude else "--fp8"
            raise CkaqadError(f"{source} is a distilled student: its recipe fixes the modules; drop {option}")
        if scale_rule not in (None, recipe.scale_rule):
            raise CkaqadError(f"{source} was trained with the {recipe.scale_rule} scale rule and is packed with it; "
                              f"drop --scale-rule {scale_rule}")
    elif (linears := dense_decoder_linears(config, src)) is not None:
        recipe = recipe_for_linears(linears, scheme=scheme or "w4a4", exclude=exclude, fp8=fp8 or ())
    else:
        recipe = apply_fake_quant(_meta_model(config), scheme=scheme or "w4a4", exclude=exclude, fp8=fp8 or ())
    if scheme is not None and scheme != recipe.scheme:
        recipe = QuantRecipe(**{**asdict(recipe), "scheme": scheme})
    if scale_rule is not None and scale_rule != recipe.scale_rule:
        recipe = QuantRecipe(**{**asdict(recipe), "scale_rule": scale_rule})
    return recipe


def _tied_head(config: dict[str, Any]) -> bool:
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))



# -- the write plan --------------------------------------------------------------------------------------------


def _linear_shape(src: SafetensorsSource, module: str, kind: str) -> tuple[int, int]:
    """(out_features, in_features) of a Linear the recipe quantizes (``kind``: its format, for the error)."""
    name = f"{module}.weight"
    if name not in src:
        raise CkaqadError(f"the recipe puts {module} in {kind}, but the checkpoint has no tensor {name}")
    spec = src.spec(name)
    if len(spec.shape) != 2 or not spec.dtype.is_floating_point:
        raise CkaqadError(f"{name} is {spec.dtype} {list(spec.shape)}, not a 2-D floating Linear weight")
    return spec.shape[0], spec.shape[1]


def plan_pack(
    source: Path,
    src: SafetensorsSource,
    config: dict[str, Any],
    recipe: QuantRecipe,
    fmt: ModuleType,
    input_amax: dict[str, float],
    input_fallbacks: dict[str, str],
    dtype: torch.dtype,
) -> PackPlan:
    if recipe.fp8 and fmt.FP8_PARAMS is None:
        raise CkaqadError(f"the recipe puts {len(recipe.fp8)} module(s) in FP8, which the {fmt.NAME} format does not "
                          "hold here (docs/fp8.md): use --format compressed-tensors")
    quantized = list(recipe.quantized)
    kept = dict(recipe.skipped)
    if _tied_head(config):
        for name in [m for m in quantized if m.endswith("lm_head")]:
            quantized.remove(name)
            kept[name] = "tied to the input embeddings"
    shapes: dict[str, tuple[int, int]] = {}
    for module in list(quantized):
        spec = _linear_shape(src, module, "NVFP4")
        if spec[1] % nvfp4_ref.BLOCK_SIZE:
            quantized.remove(module)
            kept[module] = f"in_features {spec[1]} is not a multiple of {nvfp4_ref.BLOCK_SIZE}"
            continue
        shapes[module] = spec
    fp8 = {m: _linear_shape(src, m, "FP8") for m in recipe.fp8}
    listed = set(quantized)
    grouped = [[m for m in g if m in listed] for g in (recipe.fused_groups or fused_groups(quantized))]
    group_of = {m: g for g in grouped if g for m in g}
    unit_of = {m: group_of.get(m, [m]) for m in quantized}
    scheme = recipe.scheme

    specs: list[TensorSpec] = []
    steps: list[tuple[str, Any]] = []
    groups: list[list[str]] = []
    done: set[str] = set()
    for name in src.names():
        module, _, param = name.rpartition(".")
        if param == "weight" and module in fp8:
            steps.append(("fp8", module))
            codes, scales = (f"{module}.{p}" for p in fmt.FP8_PARAMS)
            specs += [TensorSpec(codes, torch.float8_e4m3fn, fp8[module]),
                      TensorSpec(scales, torch.float32, (fp8[module][0], 1))]
        elif param == "weight" and module in unit_of:
            unit = unit_of[module]
            if unit[0] in done:
                continue
            done.update(unit)
            groups.append(unit)
            steps.append(("quantize", unit))
            for m in unit:
                specs += layout.module_specs(fmt, m, *shapes[m], scheme)
        else:
            steps.append(("copy", name))
            spec = src.spec(name)
            specs.append(TensorSpec(name, dtype, spec.shape) if spec.dtype.is_floating_point else spec)
    return PackPlan(
        source=source,
        config=config,
        fmt=fmt,
        scheme=scheme,
        recipe=recipe,
        shapes=shapes,
        fp8=fp8,
        kept=kept,
        groups=groups,
        input_amax=input_amax,
        input_fallbacks=input_fallbacks,
        specs=specs,
        steps=steps,
        dtype=dtype,
    )


def linear_weight_bits(plan: PackPlan, src: SafetensorsSource) -> float:
    """Average bits per Linear weight as written, counted as ``ckaqad plan`` counts a budget: NVFP4 codes and block
    scales (4.5 bits), FP8 codes and a float32 scale per output channel, and every 2-D weight of a module left
    unquantized in the deployed dtype (a head tied to the input embeddings at the embeddings' size, though it is not
    stored twice). Global and input scales, a few bytes a module, are not counted (the plan does not count them)."""
    weights = sum(out * inp for out, inp in (*plan.shapes.values(), *plan.fp8.values()))
    total = sum(nvfp4_spec.stored_bytes(out * inp) for out, inp in plan.shapes.values())
    total += sum(fp8_ref.stored_bytes(out, inp) for out, inp in plan.fp8.values())
    for module in plan.kept:
        spec = src.spec(f"{module}.weight") if f"{module}.weight" in src else _tied_embedding(plan, src, module)
        if spec is not None and len(spec.shape) == 2:
            weights += spec.numel
            total += spec.numel * plan.dtype.itemsize
    return 8 * total / max(weights, 1)


def _tied_embedding(plan: PackPlan, src: SafetensorsSource, module: str) -> TensorSpec | None:
    """The input embeddings' spec for a head tied to them (named ``embed_tokens`` in the standard layouts)."""
    if not (_tied_head(plan.config) and module.endswith("lm_head")):
        return None
    return next((src.spec(n) for n in src.names() if n.endswith("embed_tokens.weight")), None)


def ignore_list(plan: PackPlan) -> list[str]:
    """Linear modules left unquantized, by exact name (the formats' ignore / exclude_modules)."""
    return sorted(plan.kept)
