"""pack's writer: every step of the plan (copy a tensor, quantize-and-pack a fused group with one shared global
scale, or quantize one Linear in FP8) prepared on worker threads and written in order into sharded safetensors; then
config.json and the format's extra files."""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ckaqad_cli import formats
from ckaqad_cli.formats import layout
from ckaqad_cli.atomic import atomic_write_json
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.packing.plan import PackPlan, ignore_list
from ckaqad_cli.progress import LoggedProgress, make_progress
from ckaqad_cli.quant import group_global_scale_from_amaxes
from ckaqad_cli.safetensors_io import SafetensorsSource
from ckaqad_cli.safetensors_write import ShardedWriter
from ckaqad_kernels import dispatch, fp8_ref, nvfp4_cpu, nvfp4_ref

_console = Console(stderr=True)


def _progress() -> LoggedProgress:
    return make_progress(_console, label="pack", unit="bytes", transient=True)


def _refuse_nonfinite(name: str, summary: torch.Tensor) -> None:
    """Refuse tensor ``name`` when ``summary`` (its amax, or per-row amaxes / 448) is not finite: exactly when the
    tensor holds NaN or Inf."""
    if not bool(torch.isfinite(summary).all()):
        raise CkaqadError(f"tensor {name} contains NaN or Inf; fix the checkpoint before packing")


def _checked_amax(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """max |x| (one aminmax pass), refusing NaN/Inf."""
    amax = nvfp4_ref.tensor_amax(tensor)
    _refuse_nonfinite(name, amax)
    return amax


def input_global_scale(amax: float) -> torch.Tensor:
    return nvfp4_ref.global_scale_from_amax(torch.tensor(amax, dtype=torch.float32))


def _prepare_step(
    plan: PackPlan,
    src: SafetensorsSource,
    kind: str,
    item: Any,
    backend: str,
    device: str,
    channel_weights: dict[str, torch.Tensor] | None,
) -> tuple[list[tuple[str, torch.Tensor]], int]:
    """One step of the plan made ready to write: ([(name, tensor), ...] in plan order, source bytes it covers).

    Weights are quantized with the recipe's scale rule; mse-act reads each module's ``channel_weights``."""
    if kind == "copy":
        tensor = src.get(item)
        if tensor.is_floating_point():
            amax = _checked_amax(item, tensor)
            if amax > torch.finfo(plan.dtype).max:
                raise CkaqadError(f"tensor {item} holds {float(amax):.4g}, beyond the range of {plan.dtype}")
            tensor = tensor.to(plan.dtype)
        return [(item, tensor)], src.spec(item).nbytes
    if kind == "fp8":
        weight = src.get(f"{item}.weight")
        codes, scales = fp8_ref.quantize_weight(weight)
        _refuse_nonfinite(f"{item}.weight", scales)
        return list(zip((f"{item}.{p}" for p in plan.fmt.FP8_PARAMS), (codes, scales), strict=True)), weight.nbytes
    weights = _read_group(src, [f"{m}.weight" for m in item])
    g = group_global_scale_from_amaxes([_checked_amax(f"{m}.weight", w) for m, w in weights.items()])
    out: list[tuple[str, torch.Tensor]] = []
    for m, w in weights.items():
        packed, scales, gs = dispatch.quantize_and_pack(w.to(device), g.to(device), backend=backend, name=f"{m}.weight",
                                                        **scale_rule_args(plan, m, channel_weights, device))
        g_in = input_global_scale(plan.input_amax[m]) if plan.scheme == "w4a4" else None
        out += layout.encode(plan.fmt, m, packed.cpu(), scales.cpu(), gs.cpu(), g_in).items()
    return out, sum(w.numel() * w.element_size() for w in weights.values())


def scale_rule_args(
    plan: PackPlan, module: str, channel_weights: dict[str, torch.Tensor] | None, device: str
) -> dict[str, Any]:
    """The scale-rule arguments of one module's quantize-and-pack: the recipe's rule and, for mse-act, its weights."""
    rule = plan.recipe.scale_rule
    if rule != "mse-act":
        return {"scale_rule": rule}
    if channel_weights is None or module not in channel_weights:
        raise CkaqadError(f"the mse-act scale rule needs the input second moments of {module} (calibration)")
    return {"scale_rule": rule, "channel_weights": channel_weights[module].to(device)}


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


def write_tensors(
    plan: PackPlan,
    src: SafetensorsSource,
    writer: ShardedWriter,
    backend: str,
    device: str,
    channel_weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Stream every step of the plan into ``writer``, in plan order. ``channel_weights`` ({module: E[x^2] per input
    channel}, quant_calibration.load_second_moments or calibration) are needed when the recipe's scale rule is mse-act.

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
                pending.append(pool.submit(_prepare_step, plan, src, kind, item, backend, device, channel_weights))
                if len(pending) > workers:
                    write_oldest()
            while pending:
                write_oldest()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def write_configs(plan: PackPlan, out: Path) -> None:
    """config.json (the source's in the deployed dtype, with the format's quantization config) and the format's
    extra files."""
    ignore = ignore_list(plan)
    config = dict(plan.config)
    dtype_keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]  # transformers 5 / 4 spelling
    config.update(dict.fromkeys(dtype_keys, str(plan.dtype).removeprefix("torch.")))
    atomic_write_json(out / "config.json", formats.packed_config(config, plan.fmt, plan.scheme, ignore, list(plan.fp8)))
    for name, content in plan.fmt.extra_files(plan.scheme, ignore).items():
        atomic_write_json(out / name, content)


def kernel_description(plan: PackPlan, src: SafetensorsSource, backend: str, device: str) -> str:
    """Which code quantizes the weights, in words (for the summary): Triton, C or the PyTorch reference, and why not C."""
    if not plan.shapes:
        return "none (nothing quantized)"
    dtype = src.spec(f"{next(iter(plan.shapes))}.weight").dtype
    used = dispatch.quantize_and_pack_backend(torch.empty(0, 16, dtype=dtype, device=device), backend)
    if used == "torch" and backend == "auto" and device == "cpu" and not nvfp4_cpu.available():
        return f"PyTorch reference (C kernel unavailable: {nvfp4_cpu.unavailable_reason()})"
    return {"triton": "Triton", "c": "C (CPU)", "torch": "PyTorch reference"}[used]

