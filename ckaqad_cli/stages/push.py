"""Push a packed NVFP4 model directory and its model card to the Hugging Face Hub (or a Hub-compatible server).

The upload goes through ``HfApi.create_commit`` in a few commits: the weight files first, in batches of at most
``commit_bytes``, then the small files (config, index, tokenizer, card) last, so a repository never shows a config
whose weights are missing. The packed folder is left as pack wrote it: the card and the CKA plot that go up with it
are built in the push's own folder (``RUN/push/``; a temporary one without a run). Before uploading, the files already on the revision with the same content are skipped;
a push that was interrupted therefore resumes when run again without re-sending what arrived (inside one commit,
huggingface_hub's own LFS / Xet deduplication does the same for partly sent large files).

The token is passed to ``HfApi`` and nowhere else: it is not part of :class:`PushConfig`, is never written to
run.json, and every error message is redacted before it is shown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id
from rich.console import Console

from ckaqad_cli import __version__
from ckaqad_cli.atomic import atomic_write_text
from ckaqad_cli.card import (
    CARD_FILE,
    PLOT_FILE,
    base_model_from_manifest,
    copy_plot,
    render_model_card,
)
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.records import DistillRecord, PackRecord
from ckaqad_cli.progress import LoggedProgress, make_progress
from ckaqad_cli import formats
from ckaqad_cli.formats import detect_format
from ckaqad_cli.rundir import RunDir, sha256_file
from ckaqad_cli.settings.push import PushConfig

DEFAULT_ENDPOINT = "https://huggingface.co"
NO_TOKEN = (
    "no Hugging Face token: log in with `hf auth login`, or set HF_TOKEN, or pass --token "
    "(a token with write access to the repository)"
)
INDEX_FILE = "model.safetensors.index.json"
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
_BEARER = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)
_CHUNK = 1 << 20

_console = Console(stderr=True)


@dataclasses.dataclass
class PushPlan:
    """What a push would upload: every file with its size (the card as it will be written) and the commits."""

    folder: Path
    endpoint: str
    files: dict[str, int]
    card: str
    batches: list[list[str]]
    commit_message: str
    plot: Path | None

    def sources(self, staging: Path) -> dict[str, Path]:
        """Where each file is read from: the packed folder, but the card (and the run's plot) from ``staging``, the
        push's own folder, so that the packed folder stays as pack wrote it."""
        own = {CARD_FILE} | ({PLOT_FILE} if self.plot is not None else set())
        return {p: (staging if p in own else self.folder) / p for p in self.files}


# -- small helpers ---------------------------------------------------------------------------------------------
def redact(text: str, token: str | None) -> str:
    """``text`` with the token (and anything shaped like a Hub token or a bearer credential) replaced by ***."""
    if token:
        text = text.replace(token, "***")
    return _BEARER.sub(r"\1***", _TOKEN_LIKE.sub("hf_***", text))


def resolve_token(token: str | None) -> str:
    """``--token``, else HF_TOKEN, else the stored login; a clear error when there is none."""
    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise CkaqadError(NO_TOKEN)
    return token


def resolve_endpoint(endpoint: str | None) -> str:
    """``--endpoint``, else HF_ENDPOINT read now (huggingface_hub reads it only at import), else the public Hub."""
    value = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise CkaqadError(f"endpoint {value!r} is not an http(s) URL")
    return value


def check_repo_id(repo_id: str) -> None:
    if repo_id.count("/") != 1:
        raise CkaqadError(f"repo id {repo_id!r} is not of the form ORG/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise CkaqadError(f"repo id {repo_id!r} is not valid: {str(e).splitlines()[0]}") from None


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file (what the Hub reports as ``oid`` for a regular, non-LFS file)."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _same_content(path: Path, remote: RepoFile | None) -> bool:
    if remote is None or remote.size != path.stat().st_size:
        return False
    if remote.lfs is not None:
        return sha256_file(path) == remote.lfs.sha256
    return git_blob_sha1(path) == remote.blob_id


# -- the packed folder -----------------------------------------------------------------------------------------
def _safetensors_complete(path: Path) -> str | None:
    """None when the file's header parses and its size covers every tensor; otherwise what is wrong."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return "header longer than the file"
            header = json.loads(f.read(n))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        return "not a safetensors file"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) > size:
        return f"truncated ({size} bytes, the header needs {8 + n + max(ends)})"
    return None


def check_pack_output(folder: Path, recorded: dict[str, int] | None = None) -> None:
    """Refuse a folder that is not a complete pack output: config.json with a quantization_config, every shard the
    index names (each a whole safetensors file), and, when the run recorded them, every file at its recorded size.
    The card and the plot are left out of the size check: push rewrites them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CkaqadError(f"{folder} is not a directory")
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise CkaqadError(f"{folder} is not a packed model: no config.json (run `ckaqad pack` first)") from None
    except json.JSONDecodeError as e:
        raise CkaqadError(f"{folder}/config.json is not valid JSON ({e.msg})") from None
    if not isinstance(config, dict) or "quantization_config" not in config:
        raise CkaqadError(f"{folder} is not a packed model: config.json has no quantization_config")
    if (folder / INDEX_FILE).is_file():
        try:
            shards = sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise CkaqadError(f"{folder}/{INDEX_FILE} is not a valid safetensors index") from None
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise CkaqadError(f"{folder} holds no *.safetensors weights")
    for shard in shards:
        if not (folder / shard).is_file():
            raise CkaqadError(f"{folder} is incomplete: {shard} (named in {INDEX_FILE}) is missing")
        problem = _safetensors_complete(folder / shard)
        if problem:
            raise CkaqadError(f"{folder}/{shard} is incomplete: {problem}")
    for name, size in (recorded or {}).items():
        if name in (CARD_FILE, PLOT_FILE):
            continue
        path = folder / name
        if not path.is_file():
            raise CkaqadError(f"{folder} is incomplete: {name}, recorded by pack, is missing")
        if path.stat().st_size != size:
            raise CkaqadError(
                f"{folder}/{name} has {path.stat().st_size} bytes but pack recorded {size}: the folder changed "
                "since pack wrote it; run `ckaqad pack --force` again"
            )


def _quant_description(folder: Path) -> tuple[str, str]:
    """(format, scheme) of a packed folder, as its format module reads them from config.json."""
    fmt = detect_format(folder)
    if fmt is None:
        raise CkaqadError(f"{folder}/config.json's quantization_config is not an NVFP4 format ckaqad writes")
    return fmt, formats.format_module(fmt).scheme_of(json.loads((folder / "config.json").read_text()))


def _batches(files: dict[str, int], pending: list[str], commit_bytes: int) -> list[list[str]]:
    """Weight files in batches of at most ``commit_bytes`` (one file at least), then everything else last."""
    weights = [p for p in pending if p.endswith(".safetensors")]
    rest = [p for p in pending if not p.endswith(".safetensors")]
    batches: list[list[str]] = []
    current: list[str] = []
    size = 0
    for path in weights:
        if current and size + files[path] > commit_bytes:
            batches.append(current)
            current, size = [], 0
        current.append(path)
        size += files[path]
    if current:
        batches.append(current)
    if rest:
        batches.append(rest)
    return batches


def check_pack_is_current(manifest: dict[str, Any], run_path: Path) -> None:
    """Refuse a run's pack output made from an earlier distill than the one the run now records (``distill
    --force`` after pack): it would go out with a card describing the new student."""
    pack, distill = PackRecord.of(manifest), DistillRecord.of(manifest)
    if pack is None or distill is None or pack.from_model is not None or not (distill.ended and pack.started):
        return
    if distill.ended > pack.started:
        raise CkaqadError(
            f"the packed model of run {run_path} (packed {pack.started}) predates its distilled student (distill "
            f"ended {distill.ended}): run `ckaqad pack --run {run_path} --force` first"
        )


def plan_push(folder: Path | None, cfg: PushConfig, *, run: RunDir | None = None) -> PushPlan:
    """Check the folder and render the card; no network. ``folder`` None means the run's pack output."""
    check_repo_id(cfg.repo_id)
    endpoint = resolve_endpoint(cfg.endpoint)
    manifest = run.read() if run is not None else {}
    pack = PackRecord.of(manifest)
    packed = run.stage_output("pack", "model") if run is not None else None
    if folder is None:
        if not isinstance(packed, Path):
            where = f"run {run.path} has no finished pack stage" if run is not None else "no run given"
            raise CkaqadError(f"{where}: run `ckaqad pack` first, or give --folder")
        folder = packed
    from_run = isinstance(packed, Path) and packed.resolve() == Path(folder).resolve()
    check_pack_output(folder, pack.files if from_run and pack.files else None)
    if from_run:
        check_pack_is_current(manifest, run.path)

    fmt, scheme = _quant_description(folder)
    if from_run:
        fmt, scheme = pack.format or fmt, pack.scheme or scheme
    base_model = cfg.base_model or base_model_from_manifest(manifest)
    plot = run.stage_output("diagnose", "plot") if run is not None else None
    plot = Path(plot) if isinstance(plot, Path) and plot.is_file() else None
    existing_path = folder / CARD_FILE
    existing = existing_path.read_text(encoding="utf-8") if existing_path.is_file() else None
    card = render_model_card(
        folder,
        manifest=manifest or None,
        base_model=base_model,
        fmt=fmt,
        scheme=scheme,
        existing=existing,
        mode=cfg.card,
        repo_id=cfg.repo_id,
        with_plot=plot is not None or (folder / PLOT_FILE).is_file(),
        precision=pack.precision if from_run else None,
    )
    files = {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }
    files[CARD_FILE] = len(card.encode("utf-8"))
    if plot is not None:
        files[PLOT_FILE] = plot.stat().st_size
    if cfg.commit_message:
        message = cfg.commit_message
    else:
        source = f" of {base_model}" if base_model else ""
        where = f" (ckaqad run {run.path.resolve().name})" if run is not None else ""
        message = f"Upload NVFP4 {scheme.upper()} ({fmt}) quantization{source} made with CKA-QAD{where}"
    return PushPlan(
        folder=folder,
        endpoint=endpoint,
        files=files,
        card=card,
        batches=_batches(files, list(files), cfg.commit_bytes),
        commit_message=message,
        plot=plot,
    )


# -- errors ----------------------------------------------------------------------------------------------------
_HINTS = {
    401: "the token was rejected: log in again with `hf auth login` or set HF_TOKEN to a valid token",
    403: "the token may not write there: use a token with write access to {ns}",
    404: "repository or revision not found: check --repo-id and that the token can see it",
    409: "the server reported a conflict: run the same command again",
    429: "rate limited: wait a little and run the same command again (what arrived is kept)",
}


def explain_hub_error(e: Exception, *, endpoint: str, repo_id: str, token: str | None) -> CkaqadError:
    """One redacted line for a failure of the Hub client."""
    if isinstance(e, OfflineModeIsEnabled):
        msg = f"HF_HUB_OFFLINE is set, so nothing can be pushed to {endpoint}: unset it (or set HF_HUB_OFFLINE=0)"
    elif isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        server = (e.server_message or "").strip().splitlines()
        detail = f": {server[0]}" if server else ""
        if status >= 500:
            hint = "the server failed; run the same command again to resume (files already there are skipped)"
        else:
            hint = _HINTS.get(status, "see the server's message").format(ns=repo_id.split("/")[0])
        msg = f"the Hub at {endpoint} answered {status} {e.response.reason_phrase}{detail}; {hint}"
    elif isinstance(e, httpx2.HTTPError):
        msg = f"cannot reach {endpoint} ({type(e).__name__}: {e}); check the endpoint and the network, then run again"
    else:
        msg = " ".join(str(e).split())
    return CkaqadError(redact(msg, token))


# -- the push --------------------------------------------------------------------------------------------------
def _progress() -> LoggedProgress:
    return make_progress(_console, label="push", unit="bytes")


def _upload(api: HfApi, plan: PushPlan, cfg: PushConfig, sources: dict[str, Path]) -> dict[str, Any]:
    api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True, repo_type="model")
    if cfg.revision != "main":
        api.create_branch(cfg.repo_id, branch=cfg.revision, exist_ok=True)
    remote = {
        f.path: f
        for f in api.get_paths_info(cfg.repo_id, list(plan.files), revision=cfg.revision)
        if isinstance(f, RepoFile)
    }
    pending = [p for p in plan.files if not _same_content(sources[p], remote.get(p))]
    skipped = len(plan.files) - len(pending)
    if skipped:
        where = f"{cfg.repo_id}@{cfg.revision}"
        _console.print(f"{skipped} of {len(plan.files)} files are already on {where} unchanged; skipping them")
    batches = _batches(plan.files, pending, cfg.commit_bytes)
    commit_oid = None
    with _progress() as progress:
        task = progress.add_task(cfg.repo_id, total=sum(plan.files[p] for p in pending))
        for i, batch in enumerate(batches, 1):
            suffix = f" (part {i}/{len(batches)})" if len(batches) > 1 else ""
            info = api.create_commit(
                repo_id=cfg.repo_id,
                operations=[CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(sources[p])) for p in batch],
                revision=cfg.revision,
                commit_message=plan.commit_message + suffix,
                commit_description=f"Pushed with ckaqad {__version__}.",
            )
            commit_oid = info.oid
            progress.advance(task, sum(plan.files[p] for p in batch))
    if commit_oid is None:
        commit_oid = api.repo_info(cfg.repo_id, revision=cfg.revision).sha
    return {"commit_oid": commit_oid, "uploaded": len(pending), "skipped": skipped, "commits": len(batches)}


@contextlib.contextmanager
def _staging(run: RunDir | None) -> Iterator[Path]:
    """The push's own folder for the card and plot it uploads: RUN/push/ in a run (kept, as a record of what was
    uploaded), else a temporary folder."""
    if run is not None:
        yield run.stage_dir("push")
        return
    with tempfile.TemporaryDirectory(prefix="ckaqad-push-") as tmp:
        yield Path(tmp)


def push_folder(
    folder: str | Path | None, cfg: PushConfig, *, token: str | None = None, run: RunDir | None = None
) -> dict[str, Any]:
    """Push ``folder`` (None: the run's pack output) to ``cfg.repo_id``; returns repo_id, revision, commit_oid, url.

    With ``cfg.dry_run`` nothing is written or sent: the result holds the files with their sizes and the card.
    With ``run``, the push is recorded as the run's ``push`` stage (without the token).
    """
    plan = plan_push(Path(folder) if folder is not None else None, cfg, run=run)
    result: dict[str, Any] = {"repo_id": cfg.repo_id, "revision": cfg.revision, "commit_oid": None, "url": None}
    if cfg.dry_run:
        return {**result, "files": plan.files, "card": plan.card, "commits": len(plan.batches)}
    token = resolve_token(token)
    api = HfApi(endpoint=plan.endpoint, token=token, library_name="ckaqad", library_version=__version__)
    url = f"{plan.endpoint}/{cfg.repo_id}" + (f"/tree/{cfg.revision}" if cfg.revision != "main" else "")
    config = dataclasses.asdict(cfg) | {"folder": str(plan.folder.resolve()), "endpoint": plan.endpoint}
    inputs = {"model": str(plan.folder.resolve())}
    stage = run.stage("push", config=config, inputs=inputs, force=cfg.force) if run else contextlib.nullcontext()
    with stage as record, _staging(run) as staging:
        if plan.plot is not None:
            copy_plot(plan.plot, staging)
        atomic_write_text(staging / CARD_FILE, plan.card)
        try:
            outcome = _upload(api, plan, cfg, plan.sources(staging))
        except (HfHubHTTPError, OfflineModeIsEnabled, httpx2.HTTPError, ValueError) as e:
            raise explain_hub_error(e, endpoint=plan.endpoint, repo_id=cfg.repo_id, token=token) from None
        result.update(commit_oid=outcome["commit_oid"], url=url)
        if record is not None:
            record.outputs.update(repo_id=cfg.repo_id, revision=cfg.revision, commit=outcome["commit_oid"], url=url)
            record.metrics.update(
                files_uploaded=outcome["uploaded"], files_skipped=outcome["skipped"], commits=outcome["commits"]
            )
    return {**result, "files_uploaded": outcome["uploaded"], "files_skipped": outcome["skipped"]}
