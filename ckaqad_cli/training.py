"""Training-loop parts that do not depend on the objective: optimizer and schedule, RNG state capture, the NaN
guard, Ctrl-C handling and the per-line-flushed metrics log."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ckaqad_cli.errors import CkaqadError


class NonFiniteLossError(CkaqadError):
    """The loss or the gradient norm became NaN or Inf."""


# -- optimizer and schedule ------------------------------------------------------------------------------------
def cosine_factor(step: int, *, warmup: int, total: int, floor: float = 0.0) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warmup to 1, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, total_steps: int, warmup: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9/0.95 as in NVIDIA's QAD recipe) and a warmup + cosine schedule, one call per step."""
    optimizer = torch.optim.AdamW(list(params), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, warmup=warmup, total=total_steps)
    )
    return optimizer, scheduler


# -- random number generators ----------------------------------------------------------------------------------
def capture_rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state of every generator a run uses: torch's CPU and CUDA default generators, Python's ``random``, and
    the named explicit generators. Returns (tensors for safetensors, JSON-able extras)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    for name, gen in generators.items():
        tensors[f"generator_{name}"] = gen.get_state()
    version, internal, gauss = random.getstate()
    return tensors, {"python_random": [version, list(internal), gauss]}


def restore_rng_state(
    tensors: dict[str, torch.Tensor], extras: dict[str, Any], generators: dict[str, torch.Generator]
) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda_{i}" in tensors]
        if states:
            torch.cuda.set_rng_state_all(states)
    for name, gen in generators.items():
        gen.set_state(tensors[f"generator_{name}"])
    version, internal, gauss = extras["python_random"]
    random.setstate((version, tuple(internal), gauss))


# -- NaN guard -------------------------------------------------------------------------------------------------
def check_finite(step: int, what: str, value: float, details: dict[str, float | None], last_good: str | None) -> None:
    """Stop the run with a message naming the step when ``value`` is NaN or Inf."""
    if math.isfinite(value):
        return
    shown = ", ".join(f"{k}={v:.6g}" for k, v in details.items() if v is not None)
    kept = f"the last good checkpoint is kept: {last_good}" if last_good else "no checkpoint was written yet"
    raise NonFiniteLossError(
        f"{what} is {value} at step {step} ({shown}); stopped before the optimizer step, {kept}. "
        "Lower --lr, or check the data and the teacher."
    )


# -- Ctrl-C ----------------------------------------------------------------------------------------------------
class StopRequest:
    """Catches the first SIGINT (Ctrl-C) or SIGTERM (what job schedulers and ``kill`` send before SIGKILL) so the loop
    can finish its step, save a checkpoint and stop cleanly.

    A second signal of either kind acts at once (the previous handlers are back after the first).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals only reach the main thread; nothing to install
            return
        self._previous = {signum: signal.signal(signum, self._handler) for signum in self.SIGNALS}
        try:
            yield self
        finally:
            self._restore()


# -- metrics log -----------------------------------------------------------------------------------------------
class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, flushed and fsynced as it is written, so a killed run keeps every
    line it reported. ``truncate_after(step)`` drops the lines a killed run wrote past the checkpoint it resumes from.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate_after(self, step: int, *, drop_evals_at_step: bool = False) -> None:
        """Keep the lines of steps up to ``step`` (and not the eval lines of ``step`` itself when asked: a run resumed
        from its last step evaluates that step again)."""
        from ckaqad_cli.atomic import atomic_write_text

        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            at = record.get("step", 0)
            if at < step or (at == step and not (drop_evals_at_step and record.get("type") == "eval")):
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def reset(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
