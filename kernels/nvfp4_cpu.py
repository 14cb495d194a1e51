"""NVFP4 quantize-and-pack and fake quantization on the CPU in C (nvfp4_cpu.c): the same bytes and values as
nvfp4_ref, several times faster per core.

The C file is compiled at first use with the system's C compiler (``$CC``, else cc, gcc or clang) into
``$CKAQAD_CACHE/kernels`` (default ``~/.cache/ckaqad/kernels``), keyed by the source, the compiler and the machine,
and loaded with ctypes. Without a compiler, or with ``CKAQAD_CPU_KERNEL=0``, :func:`available` is False and callers
use the PyTorch reference (dispatch does). Large tensors are split into chunks of rows run on
``torch.get_num_threads()`` threads: a ctypes call releases the GIL.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Unpack

import torch

from . import nvfp4_ref as ref
from .nvfp4_spec import BLOCK_SIZE, DEFAULT_SCALE_RULE, SCALE_RULES

SOURCE = Path(__file__).with_name("nvfp4_cpu.c")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""Inputs taken; float16 is converted to float32 (exactly) a chunk of rows at a time."""
_KIND = {torch.float32: 0, torch.bfloat16: 1}
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-march=native", "-shared", "-fPIC"]
_ROWS_PER_TASK_ELEMENTS = 1 << 20


def cache_dir() -> Path:
    root = os.environ.get("CKAQAD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ckaqad"
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's model and flags."""
    parts = [platform.machine(), platform.system()]
    try:
        text = Path("/proc/cpuinfo").read_text()
        parts += [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        pass
    return "\n".join(parts)


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler and CPU: built into the cache (atomically) unless already there."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), version.encode(), _cpu_signature().encode(),
                                     " ".join(_FLAGS).encode()])).hexdigest()[:16]
    target = cache_dir() / key / "nvfp4_cpu.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        proc = subprocess.run([compiler, *_FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode:
            raise OSError(f"{compiler} failed on {SOURCE.name}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(built, target)
    return target


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, '') or (None, why not)."""
    if os.environ.get("CKAQAD_CPU_KERNEL", "1") == "0":
        return None, "disabled by CKAQAD_CPU_KERNEL=0"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC)"
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as err:
        return None, str(err)
    fn = lib.nvfp4_quantize_pack
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    fake = lib.nvfp4_fake_quantize
    fake.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p,
                     ctypes.c_void_p]
    fake.restype = None
    return lib, ""


def available() -> bool:
    """Whether the C kernel can run here (compiled, or compilable now)."""
    return _library()[0] is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ('' when it is True)."""
    return _library()[1]


def _run_rows(
    x2: torch.Tensor, g: float, rule: int, weights: torch.Tensor | None, packed: torch.Tensor, scales: torch.Tensor
) -> bool:
    """Quantize rows x2 [R, K] into packed [R, K/2] and scales [R, K/16] (contiguous); True if NaN/Inf was seen."""
    if x2.dtype == torch.float16:
        x2 = x2.to(torch.float32)
    lib = _library()[0]
    rows, k = x2.shape
    w = None if weights is None else weights.data_ptr()
    return bool(lib.nvfp4_quantize_pack(x2.data_ptr(), _KIND[x2.dtype], rows, k, g, rule, w, packed.data_ptr(),
                                        scales.data_ptr()))


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count, kept for the process: fake quantization runs about a hundred times a step."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nvfp4-cpu")


def _over_row_chunks(rows: int, k: int, run: Callable[[slice], Any]) -> list[Any]:
    """``run(rows slice)`` over chunks of about a million elements, on ``torch.get_num_threads()`` threads."""
    step = max(1, _ROWS_PER_TASK_ELEMENTS // k)
    tasks = [slice(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]
    threads = min(torch.get_num_threads(), len(tasks))
    if threads > 1:
        return list(_pool(threads).map(run, tasks))
    return [run(rs) for rs in tasks]


def _check_kernel_input(x: torch.Tensor) -> None:
    """Raise unless the kernel is here and takes x."""
    if not available():
        raise RuntimeError(f"the NVFP4 C kernel is not available: {unavailable_reason()}")
    if x.device.type != "cpu" or x.dtype not in DTYPES:
        raise ValueError(f"the NVFP4 C kernel takes CPU tensors of {', '.join(map(str, DTYPES))}, got {x.dtype} "
                         f"on {x.device}")


def _flat_weights(weights: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """Resolved channel weights as the kernel reads them: contiguous float32 [K] (None for rules without)."""
    return None if weights is None else weights.reshape(k).contiguous()


def quantize_and_pack(
    x: torch.Tensor, global_scale: torch.Tensor | float | None = None, **options: Unpack[ref.EncodeOptions]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nvfp4_ref.quantize_and_pack, in C: the same (packed uint8 [..., K/2], E4M3 scales [..., K/16], g) bit for bit.

    x must be a CPU tensor of a dtype in DTYPES. NaN or Inf in x raises a ValueError naming ``name``; the options are
    nvfp4_ref.EncodeOptions.
    """
    _check_kernel_input(x)
    k, g, weights, scale_rule, name = ref.encoding(x, global_scale, **options)
    weights = _flat_weights(weights, k)
    rule = SCALE_RULES.index(scale_rule)
    x2 = x.detach().reshape(-1, k).contiguous()
    rows = x2.shape[0]
    packed = torch.empty(rows, k // 2, dtype=torch.uint8)
    scales = torch.empty(rows, k // BLOCK_SIZE, dtype=torch.uint8)
    gf = float(g)

    def run(rs: slice) -> bool:
        return _run_rows(x2[rs], gf, rule, weights, packed[rs], scales[rs])

    if any(_over_row_chunks(rows, k, run)):
        raise ref.nonfinite_error(name)
    lead = x.shape[:-1]
    return packed.reshape(*lead, k // 2), scales.view(torch.float8_e4m3fn).reshape(*lead, k // BLOCK_SIZE), g


def fake_quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    scale_rule: str = DEFAULT_SCALE_RULE,
    channel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """nvfp4_ref.fake_quantize (divide arithmetic), in C: the same values bit for bit, in x's dtype.

    x must be a CPU tensor of a dtype in DTYPES. NaN and Inf propagate as in the reference: a block holding one gives
    NaN. A global scale that is not finite and positive (NaN everywhere in the reference) is left to the reference.
    """
    _check_kernel_input(x)
    ref.check_last_dim(x)
    k = x.shape[-1]
    weights = _flat_weights(ref.resolve_channel_weights(scale_rule, channel_weights, k, x.device), k)
    g = ref.resolve_global_scale(x, global_scale)
    gf = float(g)
    if not (math.isfinite(gf) and gf > 0):
        return ref.fake_quantize(x, g, scale_rule=scale_rule, channel_weights=channel_weights)
    x2 = x.detach().reshape(-1, k).to(torch.float32).contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, k, dtype=torch.float32)
    rule = SCALE_RULES.index(scale_rule)
    lib = _library()[0]
    w = None if weights is None else weights.data_ptr()

    def run(rs: slice) -> None:
        lib.nvfp4_fake_quantize(x2[rs].data_ptr(), rs.stop - rs.start, k, gf, rule, w, out[rs].data_ptr())

    _over_row_chunks(rows, k, run)
    return out.to(x.dtype).reshape(x.shape)
