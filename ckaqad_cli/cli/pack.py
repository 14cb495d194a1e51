"""`ckaqad pack`: write the distilled student (or any local HF model) as a real NVFP4 checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ckaqad_cli.cli.common import RunOption, console, handle_errors
from ckaqad_cli.cli.config import ConfigOption
from ckaqad_cli.cli.push import (
    CommitMessageOption,
    EndpointOption,
    PrivateOption,
    RevisionOption,
    TokenOption,
    push_config,
)
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.rundir import RunDir


@handle_errors
def pack(
    run: Path = RunOption,
    config: Path = ConfigOption,
    model: Path | None = typer.Option(
        None,
        "--model",
        help="A local HF causal-LM directory to quantize (plain PTQ). Default: the run's distilled student.",
    ),
    out: Path | None = typer.Option(None, "--out", help="Output directory. Default: RUN/pack/model."),
    fmt: str = typer.Option(
        "compressed-tensors",
        "--format",
        help="compressed-tensors (vLLM, transformers) or modelopt (TensorRT-LLM, vLLM, SGLang).",
    ),
    scheme: str | None = typer.Option(
        None,
        "--scheme",
        help="w4a4 (weights and activations) or w4a16 (weights only). Default: the student's, else w4a4.",
    ),
    exclude: list[str] = typer.Option(
        [],
        "--exclude",
        help="Extra fnmatch globs of modules to keep in BF16 (plain PTQ only; repeatable). Default: none.",
    ),
    max_shard_size: str = typer.Option(
        "5GB", "--max-shard-size", help="Largest output shard, e.g. 500MB, 5GB."
    ),
    calib_data: str | None = typer.Option(
        None,
        "--calib-data",
        help="W4A4 calibration text: builtin, a .txt / .jsonl file or a datasets dir. Default: the run's distill data.",
    ),
    calib_tokens: int = typer.Option(4096, "--calib-tokens", help="Tokens for W4A4 input calibration."),
    calib_seq_len: int = typer.Option(256, "--calib-seq-len", help="Calibration sequence length."),
    verify: bool | None = typer.Option(
        None,
        "--verify/--no-verify",
        help="Load the output back and compare with the fake-quantized student. Default: on for sources up to 2 GB.",
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing output and re-run a finished stage. Default: off."
    ),
    backend: str = typer.Option(
        "auto",
        "--backend",
        help="Quantization kernels: auto (Triton on a GPU; on the CPU the C kernel where a C compiler is found, else "
        "the PyTorch reference), triton, c or torch. All write the same bytes.",
    ),
    device: str = typer.Option(
        "cpu", "--device", help="Device for quantization, calibration and verify."
    ),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="dtype of the tensors left unquantized (embeddings, norms, head) and of config.json: auto, bfloat16, "
        "float16 or float32. auto keeps the source's, except bfloat16 for a distilled student (its float32 master "
        "weights are for training).",
    ),
    push_to_hub: str | None = typer.Option(
        None, "--push-to-hub", help="Then push the output to this ORG/NAME repo. Default: no push."
    ),
    private: bool = PrivateOption,
    revision: str = RevisionOption,
    endpoint: str | None = EndpointOption,
    token: str | None = TokenOption,
    commit_message: str | None = CommitMessageOption,
) -> None:
    """Write an NVFP4 checkpoint (compressed-tensors or ModelOpt) that vLLM, TensorRT-LLM and transformers load.

    Tensors are streamed one at a time (bounded memory); the output appears only when complete.

    Examples:

      ckaqad pack --run runs/qwen3-4b

      ckaqad pack --model ./Llama-3.2-1B --out ./llama-nvfp4 --scheme w4a16 --format modelopt
    """
    # the stages (torch, huggingface_hub) only once the arguments are good
    from ckaqad_cli.stages.pack import PackConfig, run_pack, summary_rows
    from ckaqad_cli.stages.push import check_repo_id, push_folder, resolve_endpoint, resolve_token

    cfg = PackConfig(
        model=str(model) if model else None,
        out=str(out) if out else None,
        format=fmt,
        scheme=scheme,
        exclude=list(exclude),
        max_shard_size=max_shard_size,
        calib_data=calib_data,
        calib_tokens=calib_tokens,
        calib_seq_len=calib_seq_len,
        verify=verify,
        force=force,
        backend=backend,
        device=device,
        dtype=dtype,
    )
    push_cfg = None
    if push_to_hub:  # check the Hub options now, not after a long pack
        push_cfg = push_config(
            push_to_hub,
            private=private,
            revision=revision,
            endpoint=endpoint,
            commit_message=commit_message,
            force=force,
        )
        check_repo_id(push_cfg.repo_id)
        resolve_endpoint(push_cfg.endpoint)
        token = resolve_token(token)
    rundir = RunDir(run, on_message=lambda msg: console.print(f"[yellow]{msg}[/yellow]"))
    result = run_pack(cfg, rundir)
    # the output path as a line above the table, wrapped at spaces: a long path as a title would be broken
    console.print(f"pack -> {result.out} ({result.format}, {result.scheme})", highlight=False)
    table = Table(show_header=False)
    table.add_column("", overflow="fold")  # fold, never an ellipsis: readable at 80 columns in a log
    table.add_column("", overflow="fold")
    for label, value in summary_rows(result.summary):
        table.add_row(label, value)
    console.print(table)
    if push_cfg is not None:
        try:
            pushed = push_folder(result.out, push_cfg, token=token, run=rundir)
        except CkaqadError as e:
            retry = f"ckaqad push --run {run} --repo-id {push_to_hub}"
            retry += (f" --revision {revision}" if revision != "main" else "") + (
                f" --endpoint {endpoint}" if endpoint else ""
            )
            raise CkaqadError(f"packed {result.out}, but the push failed: {e}. Retry only the push: {retry}") from None
        console.print(f"pushed to {pushed['url']} (commit {pushed['commit_oid']})")
