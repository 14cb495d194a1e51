"""`ckaqad distill`: CKA-regularized QAD of an NVFP4 fake-quantized student (options -> DistillConfig -> stage)."""

from __future__ import annotations

from pathlib import Path

import typer

from ckaqad_cli.cli.common import RunOption, console, handle_errors
from ckaqad_cli.cli.config import ConfigOption
from ckaqad_cli.rundir import RunDir

_P = "Default: the built-in preset with the built-in teacher, else the real-model preset (docs/distill.md)."


@handle_errors
def distill(
    run: Path = RunOption,
    config: Path = ConfigOption,
    teacher: str = typer.Option("builtin", help="Teacher: 'builtin', a local HF directory or a hub id."),
    data: str = typer.Option("builtin", help="Training text: 'builtin', a .txt, a .jsonl or a saved datasets dir."),
    text_field: str = typer.Option("text", help="Field of a .jsonl / dataset that holds the text."),
    scheme: str = typer.Option("w4a4", help="w4a4 (weights and activations NVFP4) or w4a16 (weights only)."),
    exclude: list[str] = typer.Option(
        [], help="Glob of module names left in high precision, on top of lm_head/embeddings/norms/routers. Repeatable."
    ),
    steps: int = typer.Option(None, help=f"Optimizer steps. Real models 1000, built-in 300. {_P}"),
    batch_size: int = typer.Option(None, help=f"Sequences per micro-batch over all processes. 8 / built-in 32. {_P}"),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    seq_len: int = typer.Option(None, help=f"Tokens per packed sequence. 2048 / built-in 128. {_P}"),
    lr: float = typer.Option(None, help=f"Peak learning rate (AdamW). 1e-5 (NVIDIA's QAD) / built-in 3e-4. {_P}"),
    warmup: float = typer.Option(0.05, help="Warmup: below 1 a fraction of --steps, else steps."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm (0 = none)."),
    grad_checkpointing: bool = typer.Option(
        False, help="Activation checkpointing of the student's decoder layers: their activations are recomputed in "
        "the backward pass instead of kept (less memory, one more student forward per step, the same losses). "
        "Default: off."
    ),
    seed: int = typer.Option(0, help="Seed of data order and CKA token sampling."),
    temperature: float = typer.Option(1.0, help="KL temperature T (loss scaled by T^2)."),
    kl_topk: int = typer.Option(
        None, help="KL over the teacher's K most likely tokens only, both distributions renormalized over them "
        "(top-k logit distillation; also the held-out KL). K >= vocabulary = full KL. Default: full vocabulary."
    ),
    kl_chunk_tokens: int = typer.Option(1024, help="Tokens per KL chunk (bounds logits memory)."),
    lambda_cka: float = typer.Option(
        None, help="Fixed CKA weight lambda; 0 = KL-only QAD (the baseline). Default: balanced (--cka-balance)."
    ),
    cka_balance: float = typer.Option(
        0.5, help="Balanced lambda = this factor x KL / CKA-term each step (detached)."
    ),
    cka_layers: str = typer.Option(
        None, help=f"Decoder layers of the CKA term: all, every:K, '0,3,5-7' or '2:10:2'. every:4 / built-in all. {_P}"
    ),
    cka_tokens: int = typer.Option(
        512, help="Token positions per step for the CKA term, spread over the batch's sequences, the same for student "
        "and teacher (never BOS / position 0 or padding)."
    ),
    cka_debiased: bool = typer.Option(
        False, help="Debiased CKA (unbiased HSIC) in the loss instead of linear CKA; the held-out metric stays "
        "linear CKA. Default: off."
    ),
    cka_drop_massive: bool = typer.Option(
        False, help="Leave out of the CKA term (and the held-out CKA) every token whose largest teacher activation "
        "exceeds 100 x that layer's median |activation| in a layer used (massive activations). Default: off."
    ),
    cka_standardize: bool = typer.Option(
        False, help="Divide student and teacher features by the teacher's per-feature std (fitted once on held-out "
        "rows) before CKA in the loss, so a few huge teacher dimensions do not dominate it. Default: off."
    ),
    max_tokens: int = typer.Option(None, help="Cap on the packed training + held-out tokens. Default: all data."),
    eval_every: int = typer.Option(None, help=f"Held-out KL / layer CKA every N steps. 100 / built-in 50. {_P}"),
    eval_sequences: int = typer.Option(None, help=f"Held-out sequences. 32 / built-in 64. {_P}"),
    eval_tokens: int = typer.Option(2048, help="Held-out token positions for the per-layer CKA metric."),
    save_every: int = typer.Option(None, help=f"Checkpoint every N steps. 200 / built-in 100. {_P}"),
    keep: int = typer.Option(2, help="Checkpoints kept (the latest ones)."),
    resume: bool = typer.Option(False, help="Continue from the latest complete checkpoint of this run."),
    force: bool = typer.Option(False, help="Run again even if distill finished, discarding old checkpoints."),
    device: str = typer.Option("auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N."),
    teacher_offload: bool = typer.Option(
        False, help="Under torchrun: keep the teacher's FSDP2 shards in CPU memory and copy each layer to the GPU "
        "for its forward (FSDP2 CPUOffloadPolicy), for a teacher that does not fit beside the student. Needs torchrun "
        "(--nproc-per-node 1 for one GPU); a plain single process refuses it. Default: off."
    ),
    trust_remote_code: bool = typer.Option(
        False, help="Run model code from the teacher's repository (off: only transformers' own architectures)."
    ),
) -> None:
    """Distill the teacher into an NVFP4 fake-quantized student with KL + lambda * (1 - layer CKA).

    Writes distill/metrics.jsonl, distill/checkpoints/step-N/ and distill/student/ (for pack and diagnose).

    Examples:

      ckaqad distill --run runs/demo                      # built-in teacher and data, built-in preset

      ckaqad distill --run runs/q3 --teacher Qwen/Qwen3-4B --data corpus.jsonl --steps 2000

      ckaqad distill --run runs/q3 --resume               # after a crash or Ctrl-C

      torchrun --nproc-per-node 8 -m ckaqad_cli.app distill --run-dir runs/q3 --teacher Qwen/Qwen3-4B --data c.jsonl
    """
    from ckaqad_cli.stages.distill import DistillConfig, run_distill

    cfg = DistillConfig(
        teacher=teacher, data=data, text_field=text_field, scheme=scheme, exclude=tuple(exclude), steps=steps,
        batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr, warmup=warmup,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, grad_checkpointing=grad_checkpointing, seed=seed,
        temperature=temperature, kl_topk=kl_topk, kl_chunk_tokens=kl_chunk_tokens, lambda_cka=lambda_cka,
        cka_balance=cka_balance, cka_layers=cka_layers, cka_tokens=cka_tokens, cka_debiased=cka_debiased,
        cka_drop_massive=cka_drop_massive, cka_standardize=cka_standardize, max_tokens=max_tokens,
        eval_every=eval_every, eval_sequences=eval_sequences, eval_tokens=eval_tokens, save_every=save_every,
        keep=keep, resume=resume, force=force, device=device, teacher_offload=teacher_offload,
        trust_remote_code=trust_remote_code,
    )
    rundir = RunDir(run, on_message=lambda msg: console.print(msg, highlight=False))
    summary = run_distill(cfg, rundir, console=console)
    if not summary:  # a non-zero rank under torchrun: rank 0 reports
        return
    from ckaqad_cli.report import FitTable, fmt

    keys = ("eval_kl", "mean_cka", "min_cka")
    rows = [["PTQ (step 0)", *(fmt(summary[f"ptq_{k}"]) for k in keys)]] if "ptq_eval_kl" in summary else []
    rows.append(["student", *(fmt(summary[k]) for k in keys)])
    console.print(FitTable(f"distill ({summary['mode']}, {summary['steps']} steps)",
                           ["", "held-out KL", "mean layer CKA", "min layer CKA"], rows))
    console.print(f"student: {rundir.path / 'distill' / 'student'}", highlight=False)
