"""The pack stage: write a real NVFP4 checkpoint (compressed-tensors or ModelOpt) from a distilled student or any
local HF causal LM, one tensor at a time.

Flow: resolve the source -> the quantization recipe (the student's own, or quant's selection for plain PTQ) -> W4A4
input amax calibration on the fake-quantized model -> a write plan (every output tensor's name, dtype and shape)
-> disk-space check -> stream: read a fused group's weights, share one global scale, quantize-and-pack with the
kernels, write -> configs, tokenizer files, model card -> optional verify -> summary.

The packed weights are exactly the student's fake-quantized weights: the same kernels, the same group global scale
(``quant.group_weight_global_scale``), so decoding the output gives the weights distill's forward pass used.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from rich.console import Console

from ckaqad_cli import formats
from ckaqad_cli.atomic import atomic_directory, atomic_write_json, atomic_write_text, check_replaceable
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.progress import LoggedProgress, make_progress
from ckaqad_cli.quant import (
    SCHEMES,
    QuantRecipe,
    fused_groups,
    group_global_scale_from_amaxes,
    group_weight_global_scale,
)
from ckaqad_cli.rundir import RunDir, describe_input
from ckaqad_cli.safetensors_io import (
    SafetensorsSource,
    ShardedWriter,
    TensorSpec,
    copy_files,
    ensure_disk_space,
    ensure_writable,
    format_bytes,
    parse_size,
)
from ckaqad_kernels import dispatch, nvfp4_cpu, nvfp4_ref

STAGE = "pack"
OUTPUT_DIR = "model"
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DTYPES = ("auto", "bfloat16", "float16", "float32")
AUTO_VERIFY_MAX_BYTES = 2 * 10**9
"""--verify defaults to on for sources up to this size (it loads the student and the packed model in memory)."""
VERIFY_TOP1_MIN = 0.8
VERIFY_MAX_ABS_REL = 0.25
"""Verify's logits must match the student's exactly, except when some global scales cannot be stored exactly: then
top-1 agreement at least VERIFY_TOP1_MIN, and with activation quantization off, max |diff| within VERIFY_MAX_ABS_REL
times the student's max |logit| (see verify_logits)."""
VERIFY_SEQUENCES = 4
VERIFY_SEQ_LEN = 32

_console = Console(stderr=True)


@dataclass
class PackConfig:
    """Options of ``ckaqad pack`` (what run.json records)."""

    model: str | None = None
    """Source HF directory; None = the run's distilled student."""
    out: str | None = None
    """Output directory; None = RUN/pack/model."""
    format: str = formats.DEFAULT_FORMAT
    scheme: str | None = None
    """w4a4 | w4a16; None = the student's recipe scheme (w4a4 for plain PTQ)."""
    exclude: list[str] = field(default_factory=list)
    max_shard_size: str = "5GB"
    calib_data: str | None = None
    calib_tokens: int = 4096
    calib_seq_len: int = 256
    verify: bool | None = None
    force: bool = False
    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "auto"
    """dtype of the tensors left unquantized (and config.json's): auto = the source's, but bfloat16 for a distilled
    student (distill keeps float32 master weights)."""

    def __post_init__(self) -> None:
        formats.format_module(self.format)
        if self.dtype not in DTYPES:
            raise CkaqadError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.scheme is not None and self.scheme not in SCHEMES:
            raise CkaqadError(f"--scheme must be one of {', '.join(SCHEMES)}, not {self.scheme!r}")
        if self.calib_tokens < 1 or self.calib_seq_len < 2:
            raise CkaqadError("--calib-tokens must be positive and --calib-seq-len at least 2")
        if self.backend not in dispatch.BACKENDS:
            raise CkaqadError(f"--backend must be one of {', '.join(dispatch.BACKENDS)}, not {self.backend!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise CkaqadError(f"--device must be cpu, cuda or cuda:N, not {self.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise CkaqadError(f"--device must be cpu, cuda or cuda:N, not {self.device!r}")
        if self.backend == "triton" and device.type != "cuda" and not dispatch.triton_interpreted():
            raise CkaqadError("--backend triton needs --device cuda (Triton kernels run on the GPU)")
        if self.backend == "c" and device.type != "cpu":
            raise CkaqadError(f"--backend c runs on the CPU; it cannot quantize on --device {self.device}")
        if self.backend == "c" and not nvfp4_cpu.available():
            raise CkaqadError(f"--backend c: the C kernel is not available ({nvfp4_cpu.unavailable_reason()})")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CkaqadError(f"--device {self.device}: no CUDA device is available")
        parse_size(self.max_shard_size)


@dataclass
class PackPlan:
    """Everything decided before the first byte is written."""

    source: Path
    config: dict[str, Any]
    fmt: ModuleType
    scheme: str
    recipe: QuantRecipe
    shapes: dict[str, tuple[int, int]]
    """Quantized module -> (out_features, in_features)."""
    kept: dict[str, str]
    """Linear modules left in high precision -> why."""
    groups: list[list[str]]
    """Units of work in write order: a fused group, or one module."""
    input_amax: dict[str, float]
    input_fallbacks: dict[str, str]
    specs: list[TensorSpec]
    steps: list[tuple[str, Any]]
    """("copy", tensor name) or ("quantize", group) in write order."""
    dtype: torch.dtype
    """dtype of the floating tensors copied unquantized, and of config.json."""


# -- source and recipe -----------------------------------------------------------------------------------------


def resolve_source(cfg: PackConfig, run: RunDir | None) -> Path:
    if cfg.model is not None:
        return Path(cfg.model)
    student = run.stage_output("distill", "student") if run is not None else None
    if student is None:
        where = f"run {run.path}" if run is not None else "no run"
        raise CkaqadError(f"{where} has no finished distill stage: run `ckaqad distill` first, or pass --model PATH")
    return Path(student)


def check_output(target: Path, source: Path, force: bool) -> None:
    """The output may not hold the source, and ``--force`` replaces only an earlier output of ckaqad's."""
    if target.resolve() == source.resolve() or target.resolve() in source.resolve().parents:
        raise CkaqadError(f"output {target} would replace the model it is packed from ({source}); choose another --out")
    if target.exists() and not force:
        raise CkaqadError(f"output {target} exists; pass --force to replace it")
    check_replaceable(target)


def check_source(source: Path) -> None:
    """The source must be a local model directory with a config.json (checked before anything is recorded)."""
    if not source.is_dir():
        raise CkaqadError(f"model {source} is not a directory: give --model a local Hugging Face model directory")
    if not (source / "config.json").is_file():
        raise CkaqadError(f"model {source} has no config.json: give --model a local Hugging Face model directory")


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
    source: Path, config: dict[str, Any], scheme: str | None, exclude: list[str], src: SafetensorsSource
) -> QuantRecipe:
    """The student's recorded recipe, or quant's own selection (DEFAULT_EXCLUDE + ``exclude``) for plain PTQ: from
    the checkpoint's names for the dense decoders of DENSE_DECODER_TYPES, else from the model built on the meta
    device."""
    from ckaqad_cli.quant import RECIPE_FILE, apply_fake_quant, recipe_for_linears

    if (source / RECIPE_FILE).is_file():
        recipe = QuantRecipe.load(source)
        if exclude:
            raise CkaqadError(f"{source} is a distilled student: its recipe fixes the modules; drop --exclude")
    elif (linears := dense_decoder_linears(config, src)) is not None:
        recipe = recipe_for_linears(linears, scheme=scheme or "w4a4", exclude=exclude)
    else:
        recipe = apply_fake_quant(_meta_model(config), scheme=scheme or "w4a4", exclude=exclude)
    if scheme is not None and scheme != recipe.scheme:
        recipe = QuantRecipe(**{**asdict(recipe), "scheme": scheme})
    return recipe


def _tied_head(config: dict[str, Any]) -> bool:
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


# -- calibration -----------------------------------------------------------------------------------------------


def _calibration_source(cfg: PackConfig, run: RunDir | None) -> str:
    if cfg.calib_data is not None:
        return cfg.calib_data
    entry = run.stage_entry("distill") if run is not None else None
    return str(((entry or {}).get("config") or {}).get("data") or "builtin")


def load_student(source: Path, recipe: QuantRecipe, device: str, dtype: torch.dtype = torch.bfloat16):
    """(the fake-quantized student as distill ran it, tokenizer)."""
    from ckaqad_cli.models import RECIPE_FILE, load_model
    from ckaqad_cli.quant import apply_recipe

    model, tokenizer = load_model(source, device=device, dtype=dtype)
    if not (source / RECIPE_FILE).is_file():
        apply_recipe(model, recipe)
    return model, tokenizer


def calibrate_input_amax(model, tokenizer, data: str, tokens: int, seq_len: int, device: str) -> dict[str, float]:
    """{module: max |input|} of every fake-quantized Linear over ``tokens`` tokens of ``data``."""
    from ckaqad_cli.data import load_texts, pack_sequences
    from ckaqad_cli.quant import record_input_amax

    ids = pack_sequences(load_texts(data), tokenizer, seq_len, max_tokens=max(tokens, seq_len))
    with torch.no_grad(), record_input_amax(model) as amax:
        for row in range(0, ids.shape[0], 8):
            model(input_ids=ids[row : row + 8].to(device))
    return dict(amax)


_EXPERT = re.compile(r"^(?P<layer>.*\.experts)\.\d+\.(?P<leaf>.+)$")


def fill_input_amax(quantized: list[str], recorded: dict[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    """A finite, positive input amax for every quantized module, and {module: how it was filled} for the others.

    An MoE expert that calibration never routed a token to has none (and a zero or missing input scale becomes inf,
    then NaN, in vLLM): it takes the largest amax of the same projection over the same layer's experts; failing
    that, of the same projection anywhere; failing that, the largest amax recorded.
    """
    good = {m: a for m, a in recorded.items() if math.isfinite(a) and a > 0}
    out: dict[str, float] = {}
    fallbacks: dict[str, str] = {}

    def leaf_of(name: str) -> str:
        return name.rpartition(".")[2]

    for module in quantized:
        if module in good:
            out[module] = good[module]
            continue
        m = _EXPERT.match(module)
        same_layer = [
            a
            for n, a in good.items()
            if m and (e := _EXPERT.match(n)) and (e["layer"], e["leaf"]) == (m["layer"], m["leaf"])
        ]
        same_leaf = [a for n, a in good.items() if leaf_of(n) == leaf_of(module)]
        if same_layer:
            out[module], fallbacks[module] = max(same_layer), "max over the same layer's experts"
        elif same_leaf:
            out[module], fallbacks[module] = max(same_leaf), f"max over all {leaf_of(module)} modules"
        elif good:
            out[module], fallbacks[module] = max(good.values()), "max over all modules"
        else:
            raise CkaqadError("calibration recorded no input amax at all: check --calib-data")
    return out, fallbacks


# -- planning --------------------------------------------------------------------------------------------------


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
    quantized = list(recipe.quantized)
    kept = dict(recipe.skipped)
    if _tied_head(config):
        for name in [m for m in quantized if m.endswith("lm_head")]:
            quantized.remove(name)
            kept[name] = "tied to the input embeddings"
    shapes: dict[str, tuple[int, int]] = {}
    for module in list(quantized):
        name = f"{module}.weight"
        if name not in src:
            raise CkaqadError(f"the recipe quantizes {module}, but the checkpoint has no tensor {name}")
        spec = src.spec(name)
        if len(spec.shape) != 2 or not spec.dtype.is_floating_point:
            raise CkaqadError(f"{name} is {spec.dtype} {list(spec.shape)}, not a 2-D floating Linear weight")
        if spec.shape[1] % nvfp4_ref.BLOCK_SIZE:
            quantized.remove(module)
            kept[module] = f"in_features {spec.shape[1]} is not a multiple of {nvfp4_ref.BLOCK_SIZE}"
            continue
        shapes[module] = (spec.shape[0], spec.shape[1])
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
        if param == "weight" and module in unit_of:
            unit = unit_of[module]
            if unit[0] in done:
                continue
            done.update(unit)
            groups.append(unit)
            steps.append(("quantize", unit))
            for m in unit:
                specs += fmt.module_specs(m, *shapes[m], scheme)
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
        kept=kept,
        groups=groups,
        input_amax=input_amax,
        input_fallbacks=input_fallbacks,
        specs=specs,
        steps=steps,
        dtype=dtype,
    )


def ignore_list(plan: PackPlan) -> list[str]:
    """Linear modules left unquantized, by exact name (the formats' ignore / exclude_modules)."""
    return sorted(plan.kept)


# -- writing ---------------------------------------------------------------------------------------------------


def _progress() -> LoggedProgress:
    return make_progress(_console, label="pack", unit="bytes", transient=True)


def _checked_amax(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """max |x| (one aminmax pass), refusing NaN/Inf: the amax is NaN or Inf exactly when one is there."""
    amax = nvfp4_ref.tensor_amax(tensor)
    if not bool(torch.isfinite(amax)):
        raise CkaqadError(f"tensor {name} contains NaN or Inf; fix the checkpoint before packing")
    return amax


def input_global_scale(amax: float) -> torch.Tensor:
    return nvfp4_ref.global_scale_from_amax(torch.tensor(amax, dtype=torch.float32))


def _prepare_step(
    plan: PackPlan, src: SafetensorsSource, kind: str, item: Any, backend: str, device: str
) -> tuple[list[tuple[str, torch.Tensor]], int]:
    """One step of the plan made ready to write: ([(name, tensor), ...] in plan order, source bytes it covers)."""
    if kind == "copy":
        tensor = src.get(item)
        if tensor.is_floating_point():
            amax = _checked_amax(item, tensor)
            if amax > torch.finfo(plan.dtype).max:
                raise CkaqadError(f"tensor {item} holds {float(amax):.4g}, beyond the range of {plan.dtype}")
            tensor = tensor.to(plan.dtype)
        return [(item, tensor)], src.spec(item).nbytes
    weights = _read_group(src, [f"{m}.weight" for m in item])
    g = group_global_scale_from_amaxes([_checked_amax(f"{m}.weight", w) for m, w in weights.items()])
    out: list[tuple[str, torch.Tensor]] = []
    for m, w in weights.items():
        packed, scales, gs = dispatch.quantize_and_pack(w.to(device), g.to(device), backend=backend, name=f"{m}.weight")
        g_in = input_global_scale(plan.input_amax[m]) if plan.scheme == "w4a4" else None
        out += plan.fmt.encode(m, packed.cpu(), scales.cpu(), gs.cpu(), g_in).items()
    return out, sum(w.numel() * w.element_size() for w in weights.values())


_SCRATCH = threading.local()
_ALIGN = 64


def _read_group(src: SafetensorsSource, names: list[str]) -> dict[str, torch.Tensor]:
    """{module: weight} of one step to quantize, read into this thread's scratch buffer (grown when too small).

    The weights only live until this step's outputs are made, so the next step of the same thread reuses the memory.
    """
    sizes = [-(-src.spec(n).nbytes // _ALIGN) * _ALIGN for n in names]
    scratch = getattr(_SCRATCH, "buffer", None)
    if scratch is None or scratch.numel() < sum(sizes):
        _SCRATCH.buffer = scratch = None  # the smaller buffer is freed before the larger one is allocated
        scratch = _SCRATCH.buffer = torch.empty(sum(sizes), dtype=torch.uint8)
    out, offset = {}, 0
    for name, size in zip(names, sizes):
        out[name.removesuffix(".weight")] = src.get(name, scratch[offset : offset + size])
        offset += size
    return out


MAX_CPU_WORKERS = 4
"""Threads that prepare steps on the CPU: the steps in flight (memory) grow with it, the disk bounds the gain."""


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_tensors(plan: PackPlan, src: SafetensorsSource, writer: ShardedWriter, backend: str, device: str) -> None:
    """Stream every step of the plan into ``writer``, in plan order.

    On the CPU, steps (read, check, quantize) run on a pool of worker threads (as many as torch had, at most
    MAX_CPU_WORKERS), which share torch's threads between them (single-threaded on a small machine), while this
    thread writes the finished ones in order: reading, quantizing and writing overlap, and a loaded CPU cannot stall
    the work on intra-op thread barriers (measured: 4x slower with 2 intra-op threads when other processes take a
    core). At most workers + 1 steps (one fused group or one tensor each) are in memory.
    """
    threads = max(1, torch.get_num_threads())
    workers = min(threads, MAX_CPU_WORKERS) if device == "cpu" else 1
    pending: collections.deque[Future] = collections.deque()
    shared = _torch_threads(threads // workers) if device == "cpu" else contextlib.nullcontext()
    with _progress() as progress, shared:
        task = progress.add_task(plan.source.name, total=src.total_bytes)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckaqad-pack")

        def write_oldest() -> None:
            tensors, nbytes = pending.popleft().result()
            for name, tensor in tensors:
                writer.write(name, tensor)
            progress.advance(task, nbytes)

        try:
            for kind, item in plan.steps:
                pending.append(pool.submit(_prepare_step, plan, src, kind, item, backend, device))
                if len(pending) > workers:
                    write_oldest()
            while pending:
                write_oldest()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def write_configs(plan: PackPlan, out: Path) -> None:
    ignore = ignore_list(plan)
    config = dict(plan.config)
    config.pop("compression_config", None)
    dtype_keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]  # transformers 5 / 4 spelling
    config.update(dict.fromkeys(dtype_keys, str(plan.dtype).removeprefix("torch.")))
    config["quantization_config"] = plan.fmt.quantization_config(plan.scheme, ignore)
    atomic_write_json(out / "config.json", config)
    if plan.fmt is formats.modelopt:
        atomic_write_json(out / formats.modelopt.HF_QUANT_CONFIG, formats.modelopt.hf_quant_config(plan.scheme, ignore))


# -- verify ----------------------------------------------------------------------------------------------------


def verify_weights(plan: PackPlan, src: SafetensorsSource, out: Path) -> dict[str, Any]:
    """Decode every quantized module with our unpacker and compare with the student's fake-quantized weight.

    Bit-exact is required, with one exception: a compressed-tensors module whose global scale has no float32 whose
    reciprocal rounds back to it (about one in seven) cannot be stored exactly in that format's reciprocal
    convention; its values may then differ by the relative error of the decoded scale plus one rounding step of the
    dtype, and it is counted apart.
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
                names = [spec.name for spec in plan.fmt.module_specs(m, *plan.shapes[m], plan.scheme)]
                got = plan.fmt.decode({n: packed.get(n) for n in names}, m, w.dtype)
                want = nvfp4_ref.fake_quantize(w, g)
                if same_bits(got, want):
                    exact += 1
                    continue
                diff = (got.float() - want.float()).abs()
                max_diff = max(max_diff, float(diff.max()))
                representable = plan.fmt is not formats.compressed_tensors or (
                    formats.compressed_tensors.reciprocal_is_exact(g)
                )
                # The stored reciprocal decodes to g' != g: each value may move by the relative error of g' plus
                # one rounding step of the dtype, and by no more.
                g_decoded = formats.compressed_tensors.global_scale(formats.compressed_tensors.stored_reciprocal(g))
                rel = float((g_decoded.double() - g.double()).abs() / g.double()) + torch.finfo(w.dtype).eps
                if not representable and bool((diff <= want.float().abs() * rel).all()):
                    inexact_scale.append(m)
                else:
                    mismatched.append(m)
    return {
        "modules": len(plan.shapes),
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


def _is_moe(config: dict[str, Any]) -> bool:
    """True for MoE models: transformers 5 fuses their experts in memory, so its compressed-tensors loader cannot
    be trusted with per-expert packed checkpoints (it leaves them random, silently)."""
    text = config.get("text_config") or config
    return any(text.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts"))


def _verify_ids(tokenizer, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (VERIFY_SEQUENCES, VERIFY_SEQ_LEN), generator=g)


def _packed_through_unpacker(out: Path, plan: PackPlan, device: str):
    """The packed model decoded by our unpacker into a dense model, with W4A4 activations fake-quantized from the
    stored input scales (weights are not quantized again: they already are the quantized values)."""
    from transformers import AutoModelForCausalLM

    from ckaqad_cli.quant import apply_recipe, stop_weight_quantization

    state = formats.load_dequantized_state_dict(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        config = dict(plan.config)
        config.pop("quantization_config", None)
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        from safetensors.torch import save_file

        weights = {k: v.contiguous() for k, v in state.items()}
        save_file(weights, Path(tmp) / "model.safetensors", metadata={"format": "pt"})
        del state
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=plan.dtype).to(device).eval()
    recipe = QuantRecipe(**{**asdict(plan.recipe), "quantized": list(plan.shapes), "input_amax": plan.input_amax})
    recipe.fused_groups = [g for g in plan.groups if len(g) > 1]
    apply_recipe(model, recipe)
    stop_weight_quantization(model)
    return model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _set_activation_quant(student, packed, on: bool, through_transformers: bool) -> None:
    """Switch W4A4 input quantization on or off in both models (weights stay quantized)."""
    from ckaqad_cli.quant import NVFP4Experts, NVFP4Linear

    for model in (student, packed):
        for module in model.modules():
            if isinstance(module, (NVFP4Linear, NVFP4Experts)):
                module.quantize_input = on
            scheme = getattr(module, "quantization_scheme", None) if through_transformers else None
            if scheme is not None:
                if not hasattr(module, "_ckaqad_inputs"):
                    module._ckaqad_inputs = scheme.input_activations
                scheme.input_activations = module._ckaqad_inputs if on else None


def _compare(student, packed, ids: torch.Tensor, scheme: str, through_transformers: bool) -> dict[str, float]:
    """Weights-only max |diff| of the logits, then (W4A4 activations on, for that scheme) max |diff| and top-1."""
    _set_activation_quant(student, packed, False, through_transformers)
    weights_only = float((_logits(packed, ids) - _logits(student, ids)).abs().max())
    if scheme == "w4a4":
        _set_activation_quant(student, packed, True, through_transformers)
    want, got = _logits(student, ids), _logits(packed, ids)
    return {
        "weights_only_max_abs_diff": weights_only,
        "max_abs_diff": float((got - want).abs().max()),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
        "student_max_abs_logit": float(want.abs().max()),
    }


def _transformers_reads(plan: PackPlan) -> bool:
    """Whether transformers (with compressed-tensors) can load the packed model as the student ran: compressed-tensors
    format, dense, bf16 (transformers loads compressed-tensors models in bf16 only), the library installed."""
    if plan.fmt is not formats.compressed_tensors or _is_moe(plan.config) or plan.dtype != torch.bfloat16:
        return False
    try:
        import compressed_tensors  # noqa: F401
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
        source_dtype = src.get(f"{next(iter(plan.shapes))}.weight").dtype
    student, tokenizer = load_student(plan.source, plan.recipe, device, plan.dtype)
    if plan.dtype != source_dtype:
        # Deployed in another dtype: the weights quantized in float32 (what the checkpoint decodes from), each
        # rounded once into plan.dtype as the checkpoint decodes; the model itself loaded as the packed one is.
        reference, _ = load_student(plan.source, plan.recipe, device, torch.float32)
        freeze_quantized_weights(reference)
        student.load_state_dict(reference.state_dict())
        stop_weight_quantization(student)
        del reference
    if plan.scheme == "w4a4":
        set_input_amax(student, plan.input_amax)
    ids = _verify_ids(tokenizer, int(student.config.vocab_size)).to(device)
    through_transformers = None
    if _transformers_reads(plan):
        from transformers import AutoModelForCausalLM

        packed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device).eval()
        through_transformers = _compare(student, packed, ids, plan.scheme, True)
        del packed
    packed = _packed_through_unpacker(out, plan, device)
    ours = _compare(student, packed, ids, plan.scheme, False)
    path = "ckaqad unpacker" + (" (MoE: transformers fuses experts)" if _is_moe(plan.config) else "")
    if through_transformers is not None:
        path += "; transformers + compressed-tensors (weights only)"
    if not weights_exact:  # some global scales could not be stored exactly (verify_weights): near, not equal
        # A weight one rounding step off can flip a W4A4 activation code, which moves a logit far: the max |diff|
        # is bounded with activations off, the W4A4 logits must agree on top-1.
        bound = VERIFY_MAX_ABS_REL * (ours["student_max_abs_logit"] or 1.0)
        ok = ours["top1_agreement"] >= VERIFY_TOP1_MIN and ours["weights_only_max_abs_diff"] <= bound
        tolerance = (f"weights-only max |diff| <= {bound:.3g}, top-1 >= {VERIFY_TOP1_MIN} (reciprocal scales "
                     "inexact)")
    else:
        exact = [ours["weights_only_max_abs_diff"], ours["max_abs_diff"]]
        exact += [through_transformers["weights_only_max_abs_diff"]] if through_transformers else []
        ok = all(d == 0.0 for d in exact)
        tolerance = "exact (0 difference)"
    result = {"path": path, **{k: v for k, v in ours.items() if k != "student_max_abs_logit"},
              "tolerance": tolerance, "passed": ok}
    if through_transformers is not None:
        result["transformers"] = {k: v for k, v in through_transformers.items() if k != "student_max_abs_logit"}
    return result


# -- the stage -------------------------------------------------------------------------------------------------


@dataclass
class PackResult:
    out: Path
    format: str
    scheme: str
    summary: dict[str, Any]


def _files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def _output_dir(target: Path, force: bool) -> Iterator[Path]:
    if target.exists() and not force:
        raise CkaqadError(f"output {target} exists; pass --force to replace it")
    check_replaceable(target)
    with atomic_directory(target, overwrite=force) as tmp:
        yield tmp


def pack_model(cfg: PackConfig, *, run: RunDir | None = None, out: Path | None = None) -> PackResult:
    """Pack ``cfg``'s source into ``out`` (default: cfg.out, else RUN/pack/model); no run.json record."""
    start = time.perf_counter()
    source = resolve_source(cfg, run)
    target = Path(cfg.out) if cfg.out else out
    if target is None:
        raise CkaqadError("no output directory: pass --out DIR or --run DIR")
    fmt = formats.format_module(cfg.format)
    check_output(target, source, cfg.force)
    with SafetensorsSource(source) as src:
        config = formats.read_config(source)
        recipe = build_recipe(source, config, cfg.scheme, list(cfg.exclude), src)
        verify = cfg.verify if cfg.verify is not None else src.total_bytes <= AUTO_VERIFY_MAX_BYTES
        input_amax: dict[str, float] = {}
        fallbacks: dict[str, str] = {}
        if recipe.scheme == "w4a4":
            recorded = dict(recipe.input_amax)
            if not recorded:
                student, tokenizer = load_student(source, recipe, cfg.device)
                data = _calibration_source(cfg, run)
                recorded = calibrate_input_amax(
                    student, tokenizer, data, cfg.calib_tokens, cfg.calib_seq_len, cfg.device
                )
                del student
            input_amax, fallbacks = fill_input_amax(recipe.quantized, recorded)
        plan = plan_pack(source, src, config, recipe, fmt, input_amax, fallbacks, deploy_dtype(cfg.dtype, source, config))
        shard_bytes = parse_size(cfg.max_shard_size)
        planned = ShardedWriter(target, plan.specs, shard_bytes).file_bytes  # plans only, writes nothing
        extra = sum((source / n).stat().st_size for n in COPIED_FILES if (source / n).is_file())
        ensure_disk_space(target, planned + extra)
        kernel = kernel_description(plan, src, cfg.backend, cfg.device)
        with _output_dir(target, cfg.force) as tmp:
            writer = ShardedWriter(tmp, plan.specs, shard_bytes)
            try:
                write_tensors(plan, src, writer, cfg.backend, cfg.device)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            write_configs(plan, tmp)
            copied = copy_files(source, tmp, COPIED_FILES)
            verification: dict[str, Any] = {}
            if verify:
                verification["weights"] = verify_weights(plan, src, tmp)
                exact = not verification["weights"]["reciprocal_scale_inexact"]
                verification["logits"] = verify_logits(plan, tmp, cfg.device, weights_exact=exact)
                _raise_if_failed(verification)
            _write_card(tmp, target, run, plan)
    summary = {
        "source": str(source),
        "out": str(target),
        "format": fmt.NAME,
        "scheme": plan.scheme,
        "modules_quantized": len(plan.shapes),
        "modules_kept": len(plan.kept),
        "kept": plan.kept,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "fused_groups": sum(1 for g in plan.groups if len(g) > 1),
        "input_scale_fallbacks": plan.input_fallbacks,
        "bytes_before": src.total_bytes,
        "bytes_after": writer.file_bytes,
        "compression_ratio": src.total_bytes / max(writer.file_bytes, 1),
        "shards": len(writer.shards),
        "kernel": kernel,
        "copied": copied,
        "verify": verification or None,
        "seconds": time.perf_counter() - start,
    }
    return PackResult(out=target, format=fmt.NAME, scheme=plan.scheme, summary=summary)


def kernel_description(plan: PackPlan, src: SafetensorsSource, backend: str, device: str) -> str:
    """Which code quantizes the weights, in words (for the summary): Triton, C or the PyTorch reference, and why not C."""
    if not plan.shapes:
        return "none (nothing quantized)"
    dtype = src.spec(f"{next(iter(plan.shapes))}.weight").dtype
    used = dispatch.quantize_and_pack_backend(torch.empty(0, 16, dtype=dtype, device=device), backend)
    if used == "torch" and backend == "auto" and device == "cpu" and not nvfp4_cpu.available():
        return f"PyTorch reference (C kernel unavailable: {nvfp4_cpu.unavailable_reason()})"
    return {"triton": "Triton", "c": "C (CPU)", "torch": "PyTorch reference"}[used]


def _raise_if_failed(verification: dict[str, Any]) -> None:
    w, lg = verification["weights"], verification["logits"]
    if w["mismatched"]:
        raise CkaqadError(
            f"verify failed: {len(w['mismatched'])} of {w['modules']} packed weights do not decode to the student's "
            f"fake-quantized weights (max |diff| {w['max_abs_diff']:.3g}, e.g. {', '.join(w['mismatched'][:3])})"
        )
    if not lg["passed"]:
        raise CkaqadError(
            f"verify failed ({lg['path']}): logits max |diff| {lg['max_abs_diff']:.4g}, top-1 agreement "
            f"{lg['top1_agreement']:.3f}; tolerance {lg['tolerance']}"
        )


def _write_card(folder: Path, target: Path, run: RunDir | None, plan: PackPlan) -> None:
    """The model card, written into the temporary ``folder`` and naming the model by its final path ``target``."""
    from ckaqad_cli.card import CARD_FILE, base_model_from_manifest, render_model_card

    manifest = run.read() if run is not None else None
    student = run.stage_output("distill", "student") if run is not None else None
    if manifest and not (isinstance(student, Path) and student.resolve() == plan.source.resolve()):
        # not the run's distilled student (pack --model PATH in a run): its distill record describes another model
        manifest = {**manifest, "stages": {k: v for k, v in manifest["stages"].items() if k != "distill"}}
    base = (base_model_from_manifest(manifest) if manifest else None) or str(plan.source)
    text = render_model_card(folder, manifest=manifest, base_model=base, fmt=plan.fmt.NAME, scheme=plan.scheme,
                             model_path=target.resolve())
    atomic_write_text(folder / CARD_FILE, text)


SUMMARY_ROWS = (
    ("modules quantized", "modules_quantized"),
    ("modules kept", "modules_kept"),
    ("unquantized tensors in", "dtype"),
    ("fused groups", "fused_groups"),
    ("input scale fallbacks", "input_scale_fallbacks"),
    ("bytes before", "bytes_before"),
    ("bytes after", "bytes_after"),
    ("compression ratio", "compression_ratio"),
    ("shards", "shards"),
    ("quantized by", "kernel"),
    ("time (s)", "seconds"),
)


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for label, key in SUMMARY_ROWS:
        value = summary[key]
        if key.startswith("bytes"):
            value = format_bytes(value)
        elif isinstance(value, float):
            value = f"{value:.2f}"
        elif isinstance(value, dict):
            value = str(len(value))
        rows.append((label, str(value)))
    verify = summary.get("verify")
    if verify:
        w, lg = verify["weights"], verify["logits"]
        inexact = len(w["reciprocal_scale_inexact"])
        note = f" ({inexact} within 1 ulp: reciprocal scale)" if inexact else ""
        rows.append(("verify weights", f"{w['bit_exact']}/{w['modules']} bit-exact{note}"))
        rows.append(("verify logits", f"ckaqad unpacker: max |diff| {lg['max_abs_diff']:.4g}, top-1 "
                                      f"{lg['top1_agreement']:.3f} ({lg['tolerance']})"))
        if "transformers" in lg:
            t = lg["transformers"]
            w4a4 = (f"; W4A4 top-1 {t['top1_agreement']:.3f}, not gated (compressed-tensors computes activation "
                    "scales in bf16)") if summary["scheme"] == "w4a4" else ""
            rows.append(("verify transformers", f"weights-only max |diff| {t['weights_only_max_abs_diff']:.4g}{w4a4}"))
    else:
        rows.append(("verify", "skipped"))
    return rows


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# pack: {summary['format']} {summary['scheme']}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(summary)]
    if summary["kept"]:
        lines += ["", "Kept in high precision:", ""] + [f"- `{m}`: {why}" for m, why in sorted(summary["kept"].items())]
    if summary["input_scale_fallbacks"]:
        lines += ["", "Input scales not calibrated directly:", ""]
        lines += [f"- `{m}`: {how}" for m, how in sorted(summary["input_scale_fallbacks"].items())]
    return "\n".join(lines) + "\n"


def run_pack(cfg: PackConfig, run: RunDir) -> PackResult:
    """The pack stage of a run: pack, record outputs/metrics in run.json, write pack/summary.json and summary.md."""
    source = resolve_source(cfg, run)
    out = Path(cfg.out) if cfg.out else run.stage_dir(STAGE) / OUTPUT_DIR
    check_source(source)  # argument checks before the run is touched: a bad --model leaves a finished pack alone
    ensure_writable(run.path, "--run")  # before anything loads: a read-only place is one line naming it
    ensure_writable(out, "--out" if cfg.out else "--run", replaced=True)
    if cfg.force:  # (without it, a finished stage is refused first, below)
        check_output(out, source, force=True)
    inputs = {"model": describe_input(source)}
    with run.stage(STAGE, config=asdict(cfg), inputs=inputs, force=cfg.force, atomic_outputs=True) as rec:
        result = pack_model(cfg, run=run, out=out)
        s = result.summary
        rec.outputs.update(model=run.relpath(out), format=result.format, scheme=result.scheme, files=_files(out))
        rec.metrics.update(
            {k: s[k] for k in ("modules_quantized", "modules_kept", "bytes_before", "bytes_after", "seconds")}
        )
        rec.metrics["compression_ratio"] = s["compression_ratio"]
        rec.metrics["input_scale_fallbacks"] = len(s["input_scale_fallbacks"])
        if s["verify"]:
            rec.metrics["verify"] = {
                "path": s["verify"]["logits"]["path"],
                "max_abs_diff": s["verify"]["logits"]["max_abs_diff"],
                "top1_agreement": s["verify"]["logits"]["top1_agreement"],
                "weights_bit_exact": s["verify"]["weights"]["bit_exact"],
                "weights_reciprocal_inexact": len(s["verify"]["weights"]["reciprocal_scale_inexact"]),
            }
            if "transformers" in s["verify"]["logits"]:
                rec.metrics["verify"]["transformers"] = s["verify"]["logits"]["transformers"]
        atomic_write_json(run.stage_dir(STAGE) / "summary.json", s)
        atomic_write_text(run.stage_dir(STAGE) / "summary.md", summary_markdown(s))
    return result
