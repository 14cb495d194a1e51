"""Loading teachers and students (built-in, local HF dir, hub id, packed NVFP4 dir, distilled student dir) offline
when the files are local, and finding a model's decoder layers for hooks."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.settings import BUILTIN_TEACHERS
from ckaqad_kernels.nvfp4_spec import DEFAULT_ACTIVATION_ARITHMETIC, DEFAULT_SCALE_RULE

if TYPE_CHECKING:
    from ckaqad_cli.quant import QuantRecipe

RECIPE_FILE = "quant_recipe.json"  # the same name as quant.RECIPE_FILE; checked before quant is imported


def resolve_spec(spec: str | os.PathLike) -> str:
    """A local path for a built-in teacher's name ("builtin", "builtin-reasoner"), otherwise the spec unchanged."""
    if str(spec) in BUILTIN_TEACHERS:
        from ckaqad_cli.builtin import TEACHER_DIRS

        directory = TEACHER_DIRS[str(spec)]
        if not (directory / "config.json").exists():
            raise CkaqadError(f"the built-in teacher {spec} is missing from {directory} (reinstall ckaqad)")
        return str(directory)
    return str(spec)


def check_spec(spec: str | os.PathLike, option: str) -> None:
    """Refuse, before anything loads or the run directory is touched, a model ``spec`` that is neither a built-in
    teacher's name, an existing directory, nor a well-formed hub id ("org/name"): a missing local path such as
    ``/data/model``, ``./out``, ``~/m`` or ``a/b/c`` would otherwise be tried (and recorded) as a hub id."""
    name = str(spec)
    if name in BUILTIN_TEACHERS:
        return
    path = Path(name)
    if path.is_dir():
        return
    if path.exists():
        raise CkaqadError(f"{option} {spec} is a file; give a model directory (with config.json) or a hub id")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
        hub_id = os.sep == "/" or os.sep not in name
    except ValueError:  # HFValidationError
        hub_id = False
    if not hub_id:
        raise CkaqadError(f"{option} {spec}: no such directory (and not a hub id of the form org/name)")


# JSON files of a model directory that transformers or ckaqad parse; checked up front so that a damaged one is named.
_JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
               "special_tokens_map.json", "model.safetensors.index.json", RECIPE_FILE)


def check_local_files(path: Path) -> None:
    """A one-line CkaqadError naming the file when a local model directory holds a JSON file that does not parse or
    a safetensors file whose header or size is damaged (no tensor is read)."""
    import json

    from ckaqad_cli.safetensors_io import check_file

    for name in _JSON_FILES:
        file = path / name
        if file.is_file():
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise CkaqadError(f"{file} is not valid JSON ({str(e).splitlines()[0]}): the model directory is "
                                  "damaged; copy or save it again") from None
    for file in sorted(path.glob("*.safetensors")):
        check_file(file)


def _hub_unreachable(repo_id: str) -> str | None:
    """Why the Hub cannot be reached for ``repo_id`` (one quick request for its config.json, no retries), or None
    when it answers (also with an error such as 404 or a gated repo, which transformers then reports) or offline mode
    is set (transformers then reads the local cache without a request)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    if constants.is_offline_mode():
        return None
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status is not None and status < 500 and status not in (408, 429):
            return None
        return f"the Hub answered HTTP {status}"
    except Exception as e:  # connection refused, name resolution, timeout: what huggingface_hub retries for a minute
        return str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def _packed_format(path: Path) -> str | None:
    if not path.is_dir():
        return None
    from ckaqad_cli import formats

    return formats.detect_format(path)


def load_model(
    spec: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    trust_remote_code: bool = False,
):
    """(model in eval mode without gradients, tokenizer) for a built-in / local / hub / packed / distilled spec.

    A packed NVFP4 directory (``ckaqad pack``) is decoded by our own unpacker into the dense model; a directory with
    ``quant_recipe.json`` (a distilled student) gets its recipe re-applied so that it runs fake-quantized.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name = resolve_spec(spec)
    path = Path(name)
    local = path.is_dir()
    if not local and (path.exists() or name.startswith((".", "/", "~"))):
        raise CkaqadError(f"model {spec} is not a directory")
    check_spec(name, "model")
    unreachable = None
    if local:
        check_local_files(path)
    else:  # no network: read the local cache at once instead of huggingface_hub's minute of retries per file
        unreachable = _hub_unreachable(name)
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": local or unreachable is not None}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        packed = _packed_format(path)
        if packed is not None:
            hf_config = AutoConfig.from_pretrained(name, **kwargs)
            model = load_packed(path, dtype=dtype, hf_config=hf_config, trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except CkaqadError:
        raise
    except (OSError, ValueError) as e:
        where = "local directory" if local else "hub id (offline runs need it in the local cache)"
        why = f" (the Hub is unreachable: {unreachable})" if unreachable else ""
        raise CkaqadError(f"cannot load model {spec} as a {where}: {str(e).splitlines()[0]}{why}") from None
    if local and (path / RECIPE_FILE).exists():
        from ckaqad_cli.quant import QuantRecipe, apply_recipe

        apply_recipe(model, QuantRecipe.load(path))
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def dispatch(model: nn.Module) -> nn.Module:
    """Spread a model loaded on the CPU over the visible GPUs and the CPU with accelerate, as
    ``from_pretrained(device_map="auto")`` does: the memory each GPU has free now, decoder layers never split, modules
    placed on the CPU offloaded there and run on the first GPU. Fake-quantized models are dispatched once wrapped
    (accelerate hooks the offloaded Linears themselves; a wrapper put in later would run without its weights)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = sorted(model._no_split_modules or [])
    memory = get_balanced_memory(model, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    return dispatch_model(model, device_map=device_map, skip_keys=getattr(model, "_skip_keys_device_placement", None))


# -- packed NVFP4 directories (ckaqad pack, any format of ckaqad_cli.formats) -------------------------------------


def is_moe(config: dict[str, Any]) -> bool:
    """True for MoE models: transformers 5 fuses their experts in memory, so its compressed-tensors loader cannot
    be trusted with per-expert packed checkpoints (it leaves them random, silently)."""
    text = config.get("text_config") or config
    return any(text.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts"))


def load_packed_pretrained(directory: str | os.PathLike, *, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    """The packed model in ``directory`` decoded by our unpacker (bit-exact to the fake-quantized weights ckaqad
    trained with), saved as a dense checkpoint in a temporary directory beside it and loaded through
    ``from_pretrained`` in ``dtype`` on ``device``, in eval mode. A packed MoE stores its experts one by one: only
    transformers' loader fuses them into the in-memory 3-D expert tensors. (pack's verify loads through here.)"""
    import json
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from ckaqad_cli import formats

    directory = Path(directory)
    state = formats.load_dequantized_state_dict(directory)
    with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(formats.dense_config(formats.read_config(directory))))
        weights = {k: v.contiguous() for k, v in state.items()}
        save_file(weights, Path(tmp) / "model.safetensors", metadata={"format": "pt"})
        del state
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()


def load_packed(
    directory: str | os.PathLike, *, dtype: torch.dtype, hf_config=None, trust_remote_code: bool = False
) -> nn.Module:
    """The dense model of a packed directory, on the CPU, in ``dtype``: built from its config (``hf_config``, a
    transformers config; default: read from the directory) and filled by our unpacker; a MoE model through
    :func:`load_packed_pretrained`. (load_model loads packed directories through here.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ckaqad_cli import formats

    directory = Path(directory)
    stored = formats.read_config(directory)
    if is_moe(stored):
        model = load_packed_pretrained(directory, dtype=formats.model_dtype(stored))
        return model if model.dtype == dtype else model.to(dtype)  # .to casts float32 buffers (rotary) as well
    config = hf_config or AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    for attr in formats.CONFIG_KEYS:  # the dense model must not be quantized again
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in formats.load_dequantized_state_dict(directory).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise CkaqadError(
            f"packed model {directory} does not match its config: missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    if tied:
        model.tie_weights()
    return model


def ptq_student(
    teacher: nn.Module,
    scheme: str,
    *,
    exclude: tuple[str, ...] = (),
    dtype: torch.dtype | None = None,
    scale_rule: str = DEFAULT_SCALE_RULE,
    activation_arithmetic: str = DEFAULT_ACTIVATION_ARITHMETIC,
    fp8: tuple[str, ...] = (),
) -> tuple[nn.Module, QuantRecipe]:
    """A deep copy of ``teacher`` with NVFP4 fake quantization (``scheme`` "w4a4" or "w4a16") on its Linears, in eval
    mode without gradients; the teacher is left untouched.

    ``exclude`` globs stay in high precision on top of ``quant.DEFAULT_EXCLUDE``, ``fp8`` globs are FP8; ``dtype``
    casts the copy before it is wrapped (distill trains float32 master weights); ``scale_rule`` and
    ``activation_arithmetic`` as in docs/nvfp4.md (an mse-act student needs
    :func:`quant_calibration.fit_channel_weights` before its weights are quantized with it).
    Returns (student, its ``QuantRecipe``): the recipe to save with it, so that pack and load_model apply the same
    exclusions and rules.
    """
    from ckaqad_cli.quant import apply_fake_quant

    student = copy.deepcopy(teacher)
    if dtype is not None:
        student.to(dtype)
    recipe = apply_fake_quant(student, scheme=scheme, exclude=exclude, scale_rule=scale_rule,
                              activation_arithmetic=activation_arithmetic, fp8=fp8)
    student.eval()
    student.requires_grad_(False)
    return student, recipe


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype of diagnose and plan: auto is bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise CkaqadError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


@contextlib.contextmanager
def capture_residuals(model: nn.Module, device: torch.device | None = None) -> Iterator[list[torch.Tensor]]:
    """Yield a list that each forward fills with [embeddings, layer 1 output, ..., layer L output, final hidden].

    The last entry is the input of the output head (after the final norm), used to make logits later. With
    ``device`` every entry is moved there (a model spread over several devices by a device map).
    """
    out: list[torch.Tensor] = []

    def store(hidden: torch.Tensor) -> None:
        out.append(hidden if device is None else hidden.to(device))

    def keep(_module, _inputs, output):
        store(output[0] if isinstance(output, (tuple, list)) else output)

    def keep_head_input(_module, inputs):
        store(inputs[0])

    modules = [model.get_input_embeddings(), *decoder_layers(model)]
    handles = [m.register_forward_hook(keep) for m in modules]
    handles.append(model.get_output_embeddings().register_forward_pre_hook(keep_head_input))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: the ModuleList whose length is ``config.num_hidden_layers``."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise CkaqadError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def max_positions(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)
