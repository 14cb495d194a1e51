"""Test helper (not a test): a tiny distill run on a random-weight Llama, in one process or under torchrun.

    python tests/distill_worker.py OUT [--steps N] [--lambda-cka X] [--resume] [--kill-at STEP] [--kill-in-save STEP]
                                       [--teacher-offload] [--grad-checkpointing] [--arch qwen3_moe]

--kill-at sends SIGKILL to this process right after step STEP (and its checkpoint, if any) is done;
--kill-in-save sends SIGKILL while checkpoint STEP is being written, before its COMPLETE marker;
--sigint-at sends SIGINT (Ctrl-C) to this process at the end of step STEP; the run then exits with code 130;
--sigterm-at sends SIGTERM (a job scheduler's stop) instead, with the same outcome.
Rank 0 prints the summary as JSON, with the number of forward calls of the student's first attention module (a
recomputed layer runs it again); under torchrun it adds, for student and teacher, whether each decoder layer's FSDP2
unit offloads its parameters to the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
from rich.console import Console

from ckaqad_cli import checkpoints, distributed
from ckaqad_cli.models import decoder_layers
from ckaqad_cli.stages.distill import DistillConfig, split_heldout, train
from fixtures import SEQ_LEN, tiny_models, tiny_sequences


def _cpu_offload(model: torch.nn.Module) -> list[bool]:
    """Per FSDP2 unit inside ``model``: is its offload policy CPUOffloadPolicy (FSDP2 has no public getter for it)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    return [isinstance(m._get_fsdp_state()._fsdp_param_group.offload_policy, CPUOffloadPolicy)
            for m in model.modules() if isinstance(m, FSDPModule)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lambda-cka", type=float, default=None)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--scheme", default="w4a4")
    p.add_argument("--arch", default="llama", help="model type of the tiny teacher (qwen3_moe: fused MoE experts)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--kill-in-save", type=int, default=None)
    p.add_argument("--sigint-at", type=int, default=None)
    p.add_argument("--sigterm-at", type=int, default=None)
    p.add_argument("--teacher-offload", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    args = p.parse_args(argv)

    ctx = distributed.setup("cpu")
    cfg = DistillConfig(
        teacher="tiny", scheme=args.scheme, steps=args.steps, batch_size=args.batch_size, seq_len=SEQ_LEN, lr=3e-3,
        lambda_cka=args.lambda_cka, cka_layers="all", cka_tokens=32, eval_every=3, eval_sequences=8,
        save_every=args.save_every, keep=2, resume=args.resume, eval_tokens=64, teacher_offload=args.teacher_offload,
        grad_checkpointing=args.grad_checkpointing,
    ).resolved()
    models = tiny_models(scheme=args.scheme, arch=args.arch)
    attention_calls = []
    decoder_layers(models.student)[0].self_attn.register_forward_hook(lambda *a: attention_calls.append(1))
    train_ids, eval_ids = split_heldout(tiny_sequences(), cfg.eval_sequences, ctx.world_size)

    if args.kill_in_save is not None:
        original = checkpoints.atomic_write_text

        def dying_marker(path, text):
            if os.path.basename(path) == checkpoints.COMPLETE and f"step {args.kill_in_save}" in text:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(path, text)

        checkpoints.atomic_write_text = dying_marker

    def on_step(step: int) -> None:
        if step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.sigint_at:
            os.kill(os.getpid(), signal.SIGINT)
        if step == args.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        summary = train(cfg, models, train_ids, eval_ids, args.out, ctx, console=Console(stderr=True, quiet=True),
                        on_step=on_step, show_progress=False)
    except KeyboardInterrupt:
        sys.exit(130)
    if ctx.is_main:
        summary["attention_calls"] = len(attention_calls)
        if ctx.distributed:
            summary["cpu_offload"] = {"student": _cpu_offload(models.student), "teacher": _cpu_offload(models.teacher)}
        json.dump(summary, sys.stdout)
    del models  # nothing holds the process group when it is destroyed (as run_distill)
    distributed.teardown(ctx)


if __name__ == "__main__":
    main()
