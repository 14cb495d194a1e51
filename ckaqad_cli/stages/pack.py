"""The pack stage: write a real NVFP4 checkpoint (compressed-tensors or ModelOpt) from a distilled student or any
local HF causal LM, one tensor at a time.

Flow: resolve the source -> the quantization recipe (the student's own, or quant's selection for plain PTQ) -> W4A4
input amax calibration on the fake-quantized model -> a write plan (every output tensor's name, dtype and shape)
-> disk-space check -> stream: read a fused group's weights, share one global scale, quantize-and-pack with the
kernels, write -> configs, tokenizer files, model card -> optional verify -> summary. The jobs live in
``ckaqad_cli/packing/`` (plan, calibrate, write, verify); this module is the stage: its options, the orchestration,
the run.json record and the summary.

The packed weights are exactly the student's fake-quantized weights: the same kernels, the same group global scale
(``quant.group_weight_global_scale``), so decoding the output gives the weights distill's forward pass used.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ckaqad_cli import formats
from ckaqad_cli.atomic import OUTPUT_MARKER, atomic_directory, atomic_write_json, atomic_write_text
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.packing.calibrate import calibrate_inputs, fill_input_amax, load_student
from ckaqad_cli.packing.plan import PackPlan, build_recipe, deploy_dtype, linear_weight_bits, plan_pack
from ckaqad_cli.packing.verify import raise_if_failed, verify_logits, verify_weights
from ckaqad_cli.packing.write import kernel_description, write_configs, write_tensors
from ckaqad_cli.planning.recipe import exclude_or_plan
from ckaqad_cli.quant import QuantRecipe
from ckaqad_cli.quant_calibration import SECOND_MOMENTS_FILE, load_second_moments
from ckaqad_cli.records import LinearPrecision, PackRecord
from ckaqad_cli.rundir import RunDir, describe_input
from ckaqad_cli.safetensors_io import SafetensorsSource
from ckaqad_cli.safetensors_write import ShardedWriter, copy_files, ensure_disk_space, ensure_writable
from ckaqad_cli.settings.pack import AUTO_VERIFY_MAX_BYTES, PackConfig, parse_size
from ckaqad_cli.units import format_bytes

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
    check_target(target, force)


def check_target(target: Path, force: bool) -> None:
    """An existing output needs ``--force``, and then must be one of ckaqad's own."""
    if target.exists() and not force:
        raise CkaqadError(f"output {target} exists; pass --force to replace it")
    check_replaceable(target)


def check_replaceable(target: Path) -> None:
    """Refuse to replace ``target`` unless it is absent, an empty directory, or a directory ckaqad wrote (it holds
    :data:`OUTPUT_MARKER`): ``--force`` must never delete a user's files."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if target.is_dir() and not target.is_symlink() and ((target / OUTPUT_MARKER).is_file() or not any(target.iterdir())):
        return
    what = "a directory ckaqad did not write" if target.is_dir() and not target.is_symlink() else "not a directory"
    raise CkaqadError(f"{target} is {what}; --force replaces only ckaqad's own outputs: choose another output path")


def check_source(source: Path) -> None:
    """The source must be a local model directory with a config.json (checked before anything is recorded)."""
    if not source.is_dir():
        raise CkaqadError(f"model {source} is not a directory: give --model a local Hugging Face model directory")
    if not (source / "config.json").is_file():
        raise CkaqadError(f"model {source} has no config.json: give --model a local Hugging Face model directory")


def _calibration_source(cfg: PackConfig, run: RunDir | None) -> str:
    if cfg.calib_data is not None:
        return cfg.calib_data
    entry = run.stage_entry("distill") if run is not None else None
    return str(((entry or {}).get("config") or {}).get("data") or "builtin")


# -- the stage -------------------------------------------------------------------------------------------------


@dataclass
class PackResult:
    out: Path
    format: str
    scheme: str
    summary: dict[str, Any]
    input_digests: dict[str, str]
    """{weight file: its digest} as the pack read it (safetensors_io.SafetensorsSource.digests), for run.json."""
    precision: LinearPrecision


def _files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


def _calibration(
    cfg: PackConfig, run: RunDir | None, source: Path, recipe: QuantRecipe
) -> tuple[dict[str, float], dict[str, str], dict[str, torch.Tensor] | None]:
    """(W4A4 input amax per module, how the uncalibrated ones were filled, mse-act second moments): a student's own
    where it recorded them, else measured on the calibration text (one pass for both)."""
    amax_needed = recipe.scheme == "w4a4" and not recipe.input_amax
    moments_needed = recipe.scale_rule == "mse-act" and not (source / SECOND_MOMENTS_FILE).is_file()
    recorded, moments = dict(recipe.input_amax), None
    if recipe.scale_rule == "mse-act" and not moments_needed:
        moments = load_second_moments(source)
    if amax_needed or moments_needed:
        student, tokenizer = load_student(source, recipe, cfg.device)
        record = calibrate_inputs(student, tokenizer, _calibration_source(cfg, run), cfg.calib_tokens,
                                  cfg.calib_seq_len)
        del student
        recorded = dict(record.amax) if amax_needed else recorded
        moments = record.second_moments() if moments_needed else moments
    if recipe.scheme != "w4a4":
        return {}, {}, moments
    return (*fill_input_amax(recipe.quantized, recorded), moments)


@contextlib.contextmanager
def _output_dir(target: Path, force: bool) -> Iterator[Path]:
    check_target(target, force)  # again: the target may have appeared while the model was calibrated
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
    with SafetensorsSource(source, digest=True) as src:
        config = formats.read_config(source)
        selection = exclude_or_plan(cfg.exclude, run if cfg.model else None, cfg.fp8)  # a student's is fixed
        recipe = build_recipe(source, config, cfg.scheme, selection.exclude, src, cfg.scale_rule, selection.fp8)
        verify = cfg.verify if cfg.verify is not None else src.total_bytes <= AUTO_VERIFY_MAX_BYTES
        input_amax, fallbacks, second_moments = _calibration(cfg, run, source, recipe)
        plan = plan_pack(source, src, config, recipe, fmt, input_amax, fallbacks, deploy_dtype(cfg.dtype, source, config))
        plan.second_moments = second_moments
        shard_bytes = parse_size(cfg.max_shard_size)
        planned = ShardedWriter(target, plan.specs, shard_bytes).file_bytes  # plans only, writes nothing
        extra = sum((source / n).stat().st_size for n in COPIED_FILES if (source / n).is_file())
        ensure_disk_space(target, planned + extra)
        kernel = kernel_description(plan, src, cfg.backend, cfg.device)
        precision = LinearPrecision(len(plan.shapes), len(plan.fp8), len(plan.kept), linear_weight_bits(plan, src))
        with _output_dir(target, cfg.force) as tmp:
            writer = ShardedWriter(tmp, plan.specs, shard_bytes)
            try:
                write_tensors(plan, src, writer, cfg.backend, cfg.device, plan.second_moments)
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
                raise_if_failed(verification)
            _write_card(tmp, target, run, plan, precision)
    summary = {
        "source": str(source),
        "out": str(target),
        "format": fmt.NAME,
        "scheme": plan.scheme,
        "scale_rule": plan.recipe.scale_rule,
        "modules_quantized": precision.nvfp4 + precision.fp8,
        "modules_fp8": precision.fp8,
        "modules_kept": precision.kept,
        "linear_weight_bits": precision.bits,
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
    digests = src.digests()
    return PackResult(out=target, format=fmt.NAME, scheme=plan.scheme, summary=summary, input_digests=digests,
                      precision=precision)




def _write_card(folder: Path, target: Path, run: RunDir | None, plan: PackPlan, precision: LinearPrecision) -> None:
    """The model card, written into the temporary ``folder`` and naming the model by its final path ``target``."""
    from ckaqad_cli.card import CARD_FILE, base_model_from_manifest, render_model_card

    manifest = run.read() if run is not None else None
    student = run.stage_output("distill", "student") if run is not None else None
    if manifest and not (isinstance(student, Path) and student.resolve() == plan.source.resolve()):
        # not the run's distilled student (pack --model PATH in a run): its distill record describes another model
        manifest = {**manifest, "stages": {k: v for k, v in manifest["stages"].items() if k != "distill"}}
    base = (base_model_from_manifest(manifest) if manifest else None) or str(plan.source)
    text = render_model_card(folder, manifest=manifest, base_model=base, fmt=plan.fmt.NAME, scheme=plan.scheme,
                             model_path=target.resolve(), precision=precision)
    atomic_write_text(folder / CARD_FILE, text)


SUMMARY_ROWS = (
    ("weight scale rule", "scale_rule"),
    ("modules quantized", "modules_quantized"),
    ("modules kept", "modules_kept"),
    ("bits per Linear weight", "linear_weight_bits"),
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
        elif key == "linear_weight_bits":
            value = f"{value:.4f}"
        elif isinstance(value, float):
            value = f"{value:.2f}"
        elif isinstance(value, dict):
            value = str(len(value))
        rows.append((label, str(value)))
    verify = summary.get("verify")
    if verify:
        w, lg = verify["weights"], verify["logits"]
        inexact = len(w["reciprocal_scale_inexact"])
        note = f" ({inexact} within 1 step: the reader divides by 1/g)" if inexact else ""
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
    formats.format_module(cfg.format)
    source = resolve_source(cfg, run)
    out = Path(cfg.out) if cfg.out else run.stage_dir(STAGE) / OUTPUT_DIR
    check_source(source)  # argument checks before the run is touched: a bad --model leaves a finished pack alone
    ensure_writable(run.path, "--run")  # before anything loads: a read-only place is one line naming it
    ensure_writable(out, "--out" if cfg.out else "--run", replaced=True)
    if cfg.force:  # (without it, a finished stage is refused first, below)
        check_output(out, source, force=True)
    inputs = {"model": {"path": str(source.resolve())}}  # and its files' digests once pack has read them
    with run.stage(STAGE, config=asdict(cfg), inputs=inputs, force=cfg.force, atomic_outputs=True) as rec:
        result = pack_model(cfg, run=run, out=out)
        rec.inputs["model"] = describe_input(source, digests=result.input_digests)
        s = result.summary
        PackRecord.write(rec, model=run.relpath(out), format=result.format, scheme=result.scheme,
                         scale_rule=result.summary["scale_rule"], files=_files(out), precision=result.precision)
        rec.metrics.update(
            {k: s[k] for k in ("modules_quantized", "modules_kept", "linear_weight_bits", "bytes_before", "bytes_after",
                               "seconds")}
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
