"""The memory a distill run needs on each device, estimated before it starts (``distill --dry-run``).

Per device (one rank), in bytes:

- **static**: the teacher's weights (bf16 on a GPU, float32 on the CPU), the student's float32 master weights, and
  AdamW's two float32 moments, each divided by the world size under FSDP2; under FSDP2 also the unsharded root unit
  of both models (embeddings, final norm and head: FSDP2 does not reshard the root after its forward) and two
  unsharded decoder layers (the one running and the one prefetched). ``--teacher-offload`` moves the teacher's
  shards to the CPU.
- **activations**: what autograd keeps for the backward pass. They are counted, not modelled: :func:`model_sizes`
  runs one decoder layer of the model's own code, fake-quantized as distill does, at 1/s of its width (s = 16 and
  8 for large models, 1 for small ones; at most 16 experts, each token still reaching as many), records the bytes
  of every tensor that autograd saves on two token counts, and extrapolates the cost per token linearly in the width
  and the cost per layer (the fake-quantized weight copies) in proportion to the layer's parameters. With
  ``--grad-checkpointing`` each layer keeps only its input, and one layer's activations are rebuilt at a time.
- **the KL chunk**: :func:`~ckaqad_cli.kl.chunked_kl` recomputes each chunk's logits in the backward pass; about
  :data:`KL_CHUNK_COPIES` float32 ``chunk x vocab`` tensors are alive at its peak.
- **CKA**: the teacher's hooks hold the whole outputs of the selected layers until its forward ends; the sampled
  rows and the loss are small.
- **gradients** (float32, sharded) from the end of the backward pass to the optimizer step, and the step's own
  temporaries (on a GPU AdamW's foreach path makes one more copy of the moments; on the CPU one parameter at a time).

The peak is the largest of five moments of a step: the teacher's forward, the KL chunk's backward on top of all
activations, a layer rebuilt by checkpointing late in the backward pass (the gradients nearly all there), the end
of the backward pass, and the optimizer step. What this leaves out: the CUDA context and the
allocator's fragmentation (:data:`DEVICE_RESERVE` of each device is kept free for them), and on the CPU the Python
runtime and libraries.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ckaqad_cli.report import FitTable
from ckaqad_cli.units import format_bytes

KL_CHUNK_COPIES = 9
"""float32 ``chunk x vocab`` tensors alive at the KL chunk's peak: both logits, their float32 scaled copies, both
log-softmaxes, the teacher's probabilities, their difference and its product with them."""
DEVICE_RESERVE = 0.1
"""The share of each device's memory an estimate leaves free: the CUDA context, the allocator's fragmentation."""
_PROBE_SCALES = (16, 8, 4, 2, 1)  # width divisors tried for the probe layer, largest first
_PROBE_TOKENS = (16, 48)  # tokens of the probe's two forwards: the difference is the per-token cost
_WIDTH_KEYS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")


@dataclass(frozen=True)
class Settings:
    """The options of a distill run that decide its memory."""

    batch_size: int  # the global micro-batch, in sequences
    seq_len: int
    grad_accum: int = 1
    grad_checkpointing: bool = False
    kl_chunk_tokens: int = 1024
    cka_layers: int = 0  # the number of layers with a CKA term (0: KL only)
    cka_tokens: int = 512
    teacher_offload: bool = False

    @classmethod
    def of(cls, cfg: Any, cka_layers: int) -> Settings:
        """From a resolved ``stages.distill.DistillConfig``; ``cka_layers`` = the number its --cka-layers selects."""
        return cls(
            batch_size=cfg.batch_size, seq_len=cfg.seq_len, grad_accum=cfg.grad_accum,
            grad_checkpointing=cfg.grad_checkpointing, kl_chunk_tokens=cfg.kl_chunk_tokens,
            cka_layers=0 if cfg.lambda_cka == 0 else cka_layers, cka_tokens=cfg.cka_tokens,
            teacher_offload=cfg.teacher_offload,
        )


@dataclass(frozen=True)
class ModelSizes:
    """What the estimate needs to know of a model (see :func:`model_sizes`)."""

    name: str
    params: int
    root_params: int  # outside the decoder layers: embeddings, final norm, head (FSDP2's root unit)
    layer_params: int  # the largest decoder layer
    layers: int
    hidden: int
    vocab: int
    act_token_layer: float  # bytes autograd keeps per token and decoder layer
    act_token_root: float  # bytes it keeps per token outside the decoder layers
    act_layer: float  # bytes a decoder layer keeps whatever the tokens (fake-quantized weight copies)


# -- counting what autograd saves ----------------------------------------------------------------------------------
def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _probe_scale(config: Any) -> int:
    """The largest divisor of the widths that keeps every Linear input a multiple of NVFP4's block of 16 and the
    head dimension even (rotary embeddings rotate pairs)."""
    widths = [getattr(config, k) for k in _WIDTH_KEYS if getattr(config, k, None)]
    widths.append(_head_dim(config) * config.num_attention_heads)
    for s in _PROBE_SCALES:
        if all(w % (16 * s) == 0 for w in widths) and _head_dim(config) % (2 * s) == 0:
            return s
    return 1


def _probe_config(config: Any, scale: int) -> Any:
    """``config`` with one decoder layer, a small vocabulary and every width divided by ``scale``."""
    probe = copy.deepcopy(config)
    probe.head_dim = _head_dim(config) // scale
    for key in _WIDTH_KEYS:
        if getattr(config, key, None):
            setattr(probe, key, getattr(config, key) // scale)
    if getattr(config, "num_experts", None):  # each token still reaches as many experts
        probe.num_experts = min(config.num_experts, max(16, 2 * config.num_experts_per_tok))
    probe.num_hidden_layers = 1
    probe.vocab_size = 128
    for key in ("mlp_only_layers", "layer_types"):  # per-layer lists sized for the full depth
        if getattr(probe, key, None):
            setattr(probe, key, list(getattr(probe, key))[:1])
    return probe


def _saved_bytes(config: Any, scheme: str, exclude: Sequence[str], tokens: int, bf16_autocast: bool
                 ) -> tuple[int, int, int]:
    """(inside the decoder layer, outside it, the layer's parameters): bytes of the tensors autograd saves in one
    training forward of the fake-quantized student of ``config`` on ``tokens`` tokens (parameters themselves not
    counted), and the number of parameters of its decoder layer."""
    from transformers import AutoModelForCausalLM

    from ckaqad_cli.models import decoder_layers, ptq_student

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    student, _ = ptq_student(teacher, scheme, exclude=tuple(exclude), dtype=torch.float32)
    student.requires_grad_(True).train()
    params = {p.untyped_storage().data_ptr() for p in student.parameters()}
    layer = decoder_layers(student)[0]
    inside = [False]
    seen: dict[int, tuple[bool, int]] = {}  # storage -> (first saved inside the layer, bytes)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), (inside[0], storage.nbytes()))
        return t

    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        student.model(input_ids=ids).last_hidden_state.float().norm()
    return (sum(n for is_inside, n in seen.values() if is_inside),
            sum(n for is_inside, n in seen.values() if not is_inside), sum(p.numel() for p in layer.parameters()))


def _per_token(config: Any, scheme: str, exclude: Sequence[str], bf16_autocast: bool) -> tuple[float, float, float]:
    """Saved bytes of the probe ``config``: per token and layer, per token outside the layers, and per parameter of
    the layer (whatever the tokens: the copies of fake-quantized weights)."""
    (l1, r1, params), (l2, r2, _) = (_saved_bytes(config, scheme, exclude, t, bf16_autocast) for t in _PROBE_TOKENS)
    span = _PROBE_TOKENS[1] - _PROBE_TOKENS[0]
    per_token = (l2 - l1) / span
    return per_token, (r2 - r1) / span, max(0.0, l1 - _PROBE_TOKENS[0] * per_token) / params


def model_sizes(config: Any, scheme: str, *, exclude: Sequence[str] = (), device_type: str = "cuda",
                name: str | None = None) -> ModelSizes:
    """Parameter counts (from the model built on the meta device) and the activation bytes of the fake-quantized
    student of ``config`` (a transformers config), counted on scaled-down probe layers (module docstring).

    ``device_type`` "cuda" counts the activations under bf16 autocast, as distill runs on a GPU; "cpu" in float32.
    """
    from transformers import AutoModelForCausalLM

    from ckaqad_cli.models import decoder_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = decoder_layers(model)
    params = sum(p.numel() for p in model.parameters())
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    root_params = params - sum(p.numel() for layer in layers for p in layer.parameters())
    autocast = device_type == "cuda"
    scale = _probe_scale(config)
    token, root, per_param = _per_token(_probe_config(config, scale), scheme, exclude, autocast)
    if scale > 1:  # bytes per token = a + b / s (a: what does not scale with the width, such as per-head values)
        token_h, root_h, _ = _per_token(_probe_config(config, scale // 2), scheme, exclude, autocast)
        token, root = _extrapolate(token, token_h, scale), _extrapolate(root, root_h, scale)
    return ModelSizes(
        name=name or getattr(config, "name_or_path", "") or config.model_type, params=params,
        root_params=root_params, layer_params=layer_params, layers=len(layers), hidden=config.hidden_size,
        vocab=config.vocab_size, act_token_layer=token, act_token_root=root, act_layer=per_param * layer_params,
    )


def _extrapolate(at_s: float, at_half_s: float, s: int) -> float:
    """The value at scale 1 of a + b / scale, given it at scales ``s`` and ``s / 2``."""
    b = (at_half_s - at_s) / (2 / s - 1 / s)
    return at_s + b * (1 - 1 / s)


# -- the estimate --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """The estimated peak memory of one rank, with its parts (bytes)."""

    model: str
    device_type: str
    world_size: int
    settings: Settings
    parts: dict[str, float]  # what is resident at the peak, by name
    peak_moment: str  # which moment of a step is the peak
    moments: dict[str, float]  # the total at each moment

    @property
    def peak(self) -> float:
        return self.moments[self.peak_moment]


def estimate(sizes: ModelSizes, settings: Settings, *, world_size: int = 1, device_type: str = "cuda") -> Estimate:
    """The peak memory of one rank of a distill run (module docstring)."""
    w = world_size
    sharded = w > 1
    t_bytes = 2 if device_type == "cuda" else 4
    tokens = math.ceil(settings.batch_size / w) * settings.seq_len  # this rank's tokens per micro-batch
    chunk = min(settings.kl_chunk_tokens, tokens)
    teacher = 0.0 if settings.teacher_offload else sizes.params * t_bytes / w
    student = sizes.params * 4 / w
    static = {
        "teacher weights": teacher,
        "student master weights": student,
        "AdamW moments": 2 * student,
    }
    if sharded:
        static["FSDP2 unsharded root and layers"] = sizes.root_params * (4 + t_bytes) + 2 * sizes.layer_params * 4
    static_total = sum(static.values())
    layer = tokens * sizes.act_token_layer + sizes.act_layer  # what one layer keeps for its backward
    kept = tokens * sizes.hidden * 4 if settings.grad_checkpointing else layer  # what each layer keeps
    activations = sizes.layers * kept + tokens * sizes.act_token_root
    teacher_hidden = tokens * sizes.hidden * t_bytes
    kl = KL_CHUNK_COPIES * chunk * sizes.vocab * 4
    cka_hooks = settings.cka_layers * tokens * sizes.hidden * t_bytes
    cka_term = 6 * settings.cka_layers * settings.cka_tokens * sizes.hidden * 4
    grads = student
    earlier_grads = grads if settings.grad_accum > 1 else 0.0
    step_temp = student if device_type == "cuda" else sizes.root_params * 4 / w
    dynamic = {
        "teacher forward (CKA hooks)": {"CKA hooks": cka_hooks, "teacher output": teacher_hidden,
                                        "gradients": earlier_grads},
        "KL backward": {"activations": activations, "KL chunk": kl, "CKA term": cka_term,
                        "teacher output": teacher_hidden, "gradients": earlier_grads},
        "end of backward": {"gradients": grads, "teacher output": teacher_hidden},
        "optimizer step": {"gradients": grads, "AdamW temporaries": step_temp},
    }
    if settings.grad_checkpointing:
        dynamic["layer recompute"] = {"activations": activations, "recomputed layer": layer, "gradients": grads,
                                      "teacher output": teacher_hidden}
    moments = {name: static_total + sum(parts.values()) for name, parts in dynamic.items()}
    peak = max(moments, key=moments.get)
    return Estimate(model=sizes.name, device_type=device_type, world_size=w, settings=settings,
                    parts={**static, **{k: v for k, v in dynamic[peak].items() if v}}, peak_moment=peak,
                    moments=moments)


# -- the devices and the verdict -------------------------------------------------------------------------------------
def device_memory(device_type: str) -> list[int]:
    """Total memory of each visible device: every CUDA GPU, or the host's RAM once for the CPU."""
    if device_type == "cuda":
        return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    return [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]


def usable(total: float) -> float:
    return total * (1 - DEVICE_RESERVE)


def fits(est: Estimate, devices: Sequence[int]) -> bool:
    """Whether every rank fits: on GPUs one rank per device; on the CPU all ranks share the host's memory."""
    if not devices:
        return False
    if est.device_type == "cuda":
        return len(devices) >= est.world_size and est.peak <= usable(min(devices[: est.world_size]))
    return est.peak * est.world_size <= usable(devices[0])


_WORLD_SIZES = (2, 4, 8, 16, 32, 64)  # the world sizes the verdict tries


def _fits_on(est: Estimate, devices: Sequence[int]) -> bool:
    """Whether it fits ``devices``, or on as many more GPUs of the smallest visible kind (more nodes)."""
    if est.device_type == "cuda" and est.world_size > len(devices) and devices:
        return est.peak <= usable(min(devices))
    return fits(est, devices)


def _world_label(world: int, devices: Sequence[int]) -> str:
    return f"--nproc-per-node {world}" if world <= len(devices) else f"{world} GPUs (torchrun over several nodes)"


def what_to_change(sizes: ModelSizes, est: Estimate, devices: Sequence[int]) -> list[str]:
    """Changes that make the run fit, each with its estimated peak per rank (empty when it fits as it is): the
    smallest world size, then each option alone, then the smallest world size with checkpointing and offload."""
    if fits(est, devices):
        return []
    s, w, kind = est.settings, est.world_size, est.device_type

    def trial(settings: Settings, world: int) -> Estimate:
        return estimate(sizes, settings, world_size=world, device_type=kind)

    out = []
    if kind == "cuda":
        more = next((n for n in _WORLD_SIZES if n > w and _fits_on(trial(s, n), devices)), None)
        if more:
            out.append(f"{_world_label(more, devices)}: {format_bytes(trial(s, more).peak)} per rank")
    options = [("--grad-checkpointing", replace(s, grad_checkpointing=True), not s.grad_checkpointing),
               ("--teacher-offload (under torchrun)", replace(s, teacher_offload=True), not s.teacher_offload),
               (f"--batch-size {max(w, s.batch_size // 2)} --grad-accum {s.grad_accum * 2}",
                replace(s, batch_size=max(w, s.batch_size // 2), grad_accum=s.grad_accum * 2), s.batch_size > w),
               (f"--seq-len {s.seq_len // 2}", replace(s, seq_len=s.seq_len // 2), s.seq_len > 512),
               ("--kl-chunk-tokens 256", replace(s, kl_chunk_tokens=256), s.kl_chunk_tokens > 256)]
    for label, settings, applies in options:
        if applies and fits(trial(settings, w), devices):
            out.append(f"{label}: {format_bytes(trial(settings, w).peak)} per rank")
    if not out and kind == "cuda":
        both = replace(s, grad_checkpointing=True, teacher_offload=True)
        world = next((n for n in (w, *_WORLD_SIZES) if n >= w and _fits_on(trial(both, n), devices)), None)
        if world:
            out.append(f"{_world_label(world, devices)} with --grad-checkpointing --teacher-offload: "
                       f"{format_bytes(trial(both, world).peak)} per rank")
    return out or ["no change tried fits: use more memory per rank (more or larger devices)"]


def table(est: Estimate, devices: Sequence[int]) -> FitTable:
    """The estimate as a table: each part, the peak and, per visible device, whether it fits."""
    rows = [[name, format_bytes(value)] for name, value in est.parts.items()]
    rows.append([f"peak per rank ({est.peak_moment})", format_bytes(est.peak)])
    for moment, value in est.moments.items():
        if moment != est.peak_moment:
            rows.append([f"  at {moment}", format_bytes(value)])
    kind = "GPU" if est.device_type == "cuda" else "host"
    usable_text = ", ".join(format_bytes(usable(d)) for d in devices) or "none visible"
    rows.append([f"usable {kind} memory ({100 * (1 - DEVICE_RESERVE):.0f}%)", usable_text])
    title = (f"Estimated memory per rank: {est.model}, {est.world_size} rank(s), "
             f"{est.settings.batch_size} x {est.settings.seq_len} tokens")
    return FitTable(title, ["part", "bytes"], rows)


def verdict(sizes: ModelSizes, est: Estimate, devices: Sequence[int]) -> str:
    """One line saying whether the run fits the visible devices, and what to change when it does not."""
    if fits(est, devices):
        return f"fits: {format_bytes(est.peak)} per rank"
    changes = what_to_change(sizes, est, devices)
    return f"does not fit ({format_bytes(est.peak)} per rank); what would fit: " + "; ".join(changes)
