"""Where a distill step of the built-in teacher's preset goes on the CPU (in-process breakdown; run by hand).

Times, in one process, the parts of a training step on one micro-batch of the preset (32 x 128 tokens): the
teacher's forward, the student's forward alone, and the student's forward + KL + backward with the C kernel's fake
quantization, with the PyTorch reference's and with no fake quantization at all. Median of ``--repeats`` after a
warm-up; a breakdown, not a headline (the pipeline's whole-command time is in docs/benchmarks.md).

    python benchmarks/distill_step_breakdown.py --teacher builtin --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

from ckaqad_cli import distributed as D
from ckaqad_cli.kl import chunked_kl
from ckaqad_cli.objective import CausalLMBody
from ckaqad_cli.quant import NVFP4Linear
from ckaqad_cli.settings.distill import DistillConfig
from ckaqad_cli.stages.distill import build_models, load_sequences
from ckaqad_kernels import dispatch


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="builtin", help="a built-in teacher (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per part (default: %(default)s)")
    args = parser.parse_args(argv)
    cfg = DistillConfig(teacher=args.teacher, data=args.teacher).resolved()
    models = build_models(cfg, D.DistContext())
    ids = load_sequences(cfg, models.tokenizer)[: cfg.batch_size]
    student, teacher = CausalLMBody(models.student), CausalLMBody(models.teacher)
    with torch.no_grad():
        teacher_hidden = teacher(ids)

    def train_part() -> None:
        kl = chunked_kl(student(ids), teacher_hidden, student.head, teacher.head, temperature=cfg.temperature,
                        topk=cfg.kl_topk, chunk_tokens=cfg.kl_chunk_tokens)
        kl.backward()

    def forward() -> None:
        with torch.no_grad():
            student(ids)

    with torch.no_grad():
        rows = [("teacher forward", _median_ms(lambda: teacher(ids), args.repeats))]
    rows.append(("student forward (C fake quantization)", _median_ms(forward, args.repeats)))
    rows.append(("student forward + KL + backward (C)", _median_ms(train_part, args.repeats)))
    with mock.patch.object(dispatch, "_use_c", lambda x, backend: False):
        rows.append(("student forward + KL + backward (reference)", _median_ms(train_part, args.repeats)))
    for module in models.student.modules():
        if isinstance(module, NVFP4Linear):
            module.quantize_weight = module.quantize_input = False
    rows.append(("student forward (no fake quantization)", _median_ms(forward, args.repeats)))
    rows.append(("student forward + KL + backward (none)", _median_ms(train_part, args.repeats)))
    print(f"{args.teacher}, {ids.shape[0]} x {ids.shape[1]} tokens, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeats} (ms)")
    for label, ms in rows:
        print(f"  {label:48s} {ms:8.1f}")


if __name__ == "__main__":
    main()
