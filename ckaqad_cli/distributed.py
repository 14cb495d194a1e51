"""Running under ``torchrun``: process group, device mesh, FSDP2 sharding, cross-rank reductions and DCP state.

One process (no torchrun) is the plain case: every helper here is then a no-op or the identity, so the training loop
has one code path. Under torchrun, student and teacher are sharded with PyTorch FSDP2 (``fully_shard``) over a 1-D
mesh; on the CPU the mesh is an explicit CPU mesh with gloo (without one, FSDP2 picks CUDA when a GPU exists).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ckaqad_cli.errors import CkaqadError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh when distributed

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto``: the local rank's GPU when there is one, else the CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as given."""
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CkaqadError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CkaqadError(f"--device {device}: no CUDA GPU is visible")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def setup(device: str = "auto") -> DistContext:
    """Join the torchrun process group when launched by torchrun (gloo on the CPU, NCCL on GPUs), else one process."""
    if not launched_by_torchrun():
        return DistContext(device=pick_device(device))
    from torch.distributed.device_mesh import init_device_mesh

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30))
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev, mesh=mesh)


def teardown(ctx: DistContext, *, finished: bool = True) -> None:
    """Leave the process group. ``finished`` (the work ended normally on every rank): first wait for every rank and
    free what still holds the group, so that no rank closes its connections while another still uses them and no
    gloo object is left for the interpreter's exit to destroy (a rank then aborts at exit, after a run that
    succeeded). After an error, leave at once: the other ranks may never reach the barrier."""
    if not (ctx.distributed and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
        gc.collect()
    dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shard(
    root: nn.Module, layers: nn.ModuleList, ctx: DistContext, *, offload: bool = False, mixed_bf16: bool = False
) -> None:
    """FSDP2 ``fully_shard`` each decoder layer, then ``root`` (embeddings, final norm, head), in place.

    ``offload`` keeps the sharded parameters on the CPU and streams them to the device per layer (CPUOffloadPolicy):
    for a teacher that does not fit. ``mixed_bf16`` computes in bf16 with float32 master shards and reductions.
    """
    if not ctx.distributed:
        return
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": ctx.mesh}
    kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if offload else OffloadPolicy()
    if mixed_bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of a (detached) tensor over ranks; the tensor itself in one process."""
    if not ctx.distributed:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True when ``flag`` is true on any rank (so that all ranks stop together)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_rows(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate ``x`` [n_r, d] over ranks in rank order, with gradient (each rank's rows get their gradients back).

    Ranks may hold different row counts: rows are padded to the largest count for the collective and cut after.
    """
    if not ctx.distributed:
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(ctx.world_size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    sizes = [int(c.item()) for c in counts]
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


# -- state dicts -----------------------------------------------------------------------------------------------
def _options(ctx: DistContext, *, full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(
        full_state_dict=full, cpu_offload=full and ctx.distributed, flatten_optimizer_state_dict=True
    )


def full_model_state(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The unsharded model state dict (under torchrun: gathered on rank 0's CPU, empty on the other ranks)."""
    if not ctx.distributed:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(ctx, full=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict[str, Any]:
    """The optimizer state flattened by parameter name: ``state.<fqn>.<key>`` tensors and
    ``param_groups.<fqn>.<key>`` values (torch.distributed.checkpoint's flattened layout, also in one process)."""
    if ctx.distributed:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_options(ctx, full=True))
    names = _param_names(model, optimizer)
    sd = optimizer.state_dict()
    flat: dict[str, Any] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            flat[f"state.{names[index]}.{key}"] = value
    for group in sd["param_groups"]:
        for index in group["params"]:
            for key, value in group.items():
                if key != "params":
                    flat[f"param_groups.{names[index]}.{key}"] = value
    return flat


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict, ctx: DistContext
) -> None:
    """Load an unsharded model state and a flattened optimizer state (every rank passes the same full state)."""
    if ctx.distributed:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=opts)
        set_optimizer_state_dict(model, optimizer, _nest_by_name(optim_state), options=opts)
        return
    model.load_state_dict(model_state, strict=True)
    names = _param_names(model, optimizer)
    sd = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for index, name in names.items():
        prefix = f"state.{name}."
        entries = {k[len(prefix):]: v for k, v in optim_state.items() if k.startswith(prefix)}
        if entries:
            state[index] = entries
    groups = []
    for group in sd["param_groups"]:
        first = names[group["params"][0]]
        prefix = f"param_groups.{first}."
        saved = {k[len(prefix):]: v for k, v in optim_state.items() if k.startswith(prefix)}
        groups.append({**group, **saved, "params": group["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _nest_by_name(flat: dict[str, Any]) -> dict[str, Any]:
    """Flattened optimizer state -> ``{"state": {fqn: {key: value}}, "param_groups": [{..., "params": [fqn]}]}``."""
    state: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        kind, rest = key.split(".", 1)
        name, field = rest.rsplit(".", 1)
        (state if kind == "state" else groups).setdefault(name, {})[field] = value
    merged: list[dict[str, Any]] = []
    for name, values in groups.items():
        same = next((g for g in merged if {k: v for k, v in g.items() if k != "params"} == values), None)
        if same is None:
            merged.append({**values, "params": [name]})
        else:
            same["params"].append(name)
    return {"state": state, "param_groups": merged}


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Optimizer parameter index -> the parameter's name in ``model``."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        return {i: by_id[id(p)] for i, p in enumerate(params)}
    except KeyError:
        raise CkaqadError("the optimizer holds a parameter that the model does not name") from None


def save_dcp(path: os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> None:
    """Sharded save with torch.distributed.checkpoint: every rank writes its shards; loadable at any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options(ctx, full=False))
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.fspath(path))


def load_dcp(path: os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> None:
    """Load a DCP checkpoint written at any world size into this run's (sharded or plain) model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options(ctx, full=False))
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=os.fspath(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=_options(ctx, full=False),
    )


@contextlib.contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. creating a directory), the others after it."""
    if not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.is_main:
        barrier(ctx)
