"""The run directory: the ``run.json`` manifest, per-stage records, and the lock that keeps one writer.

Layout::

    RUN/
      run.json          versioned manifest (this module is its only writer)
      .lock             present while a process writes to the run
      diagnose/ distill/ pack/ push/ ...   one folder per stage, owned by that stage

Stages talk to each other only through this directory: a later stage asks :meth:`RunDir.stage_output` for what an
earlier one recorded (pack takes distill's ``student``; push takes pack's ``model``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import re
import socket
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckaqad_cli import __version__
from ckaqad_cli.atomic import atomic_write_json, pid_alive
from ckaqad_cli.errors import CkaqadError, RunLockedError, StageDoneError
from ckaqad_cli.settings import BUILTIN_TEACHERS

SCHEMA_VERSION = 1
MANIFEST = "run.json"
LOCK = ".lock"
# Keys that name a secret: "token", "hf_token", "api_key" ... but not "tokenizer.json" or "tokens_seen".
_SECRET_KEY = re.compile(r"(^|[_-])(token|secret|password|passwd|api[_-]?key|authorization)$", re.IGNORECASE)
_HASH_CHUNK = 1 << 20


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str | None]:
    """Versions of ckaqad and the libraries whose numerics a run depends on (read from metadata, no imports)."""
    out: dict[str, str | None] = {"ckaqad": __version__}
    for dist in ("torch", "transformers", "triton", "safetensors", "compressed-tensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def scrub_secrets(obj: Any) -> Any:
    """Drop every mapping entry whose key names a secret (token, password, ...), recursively."""
    if isinstance(obj, dict):
        return {k: scrub_secrets(v) for k, v in obj.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(obj, (list, tuple)):
        return [scrub_secrets(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    """A directory file's digest in run.json: ``tensors-sha256:<hex>`` for a safetensors file (computed a tensor at a
    time; safetensors_io.tensors_sha256 says what it fixes), else the SHA-256 of its bytes (hex)."""
    if path.suffix == ".safetensors":
        from ckaqad_cli.safetensors_io import tensors_sha256  # imports torch: only for a directory of weights

        digest = tensors_sha256(path)
        if digest is not None:
            return digest
    return sha256_file(path)


def describe_input(
    value: str | os.PathLike | None, *, digests: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """Record an input: a local file with its SHA-256, a directory with a digest of each of its files (see
    _file_digest), or a hub id / builtin name. ``digests``: {file relative to the directory: digest} already taken
    (pack's, of the weights it read), used as they are instead of reading those files again."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return {"path": str(path.resolve()), "sha256": sha256_file(path)}
    if path.is_dir():
        given = digests or {}
        files = {}
        for p in sorted(path.rglob("*")):
            name = p.relative_to(path)
            if p.is_file() and not any(part.startswith(".") for part in name.parts):
                files[name.as_posix()] = given.get(name.as_posix()) or _file_digest(p)
        return {"path": str(path.resolve()), "files": files}
    if str(value) in BUILTIN_TEACHERS:
        return {"builtin": str(value)}
    return {"hub_id": str(value)}


@dataclass
class StageRecord:
    """What a running stage fills in; written to run.json when the stage ends."""

    name: str
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    """Inputs described while the stage ran (pack hashes its weights as it reads them), added to those given."""


class RunDir:
    """A run directory. Create it with ``RunDir(path)``; the manifest is created on first write."""

    def __init__(self, path: str | os.PathLike, *, on_message: Callable[[str], None] | None = None):
        self.path = Path(path)
        self._on_message = on_message or (lambda msg: None)
        self._lock_depth = 0

    # -- paths -----------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    # -- manifest --------------------------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        """The manifest, or a fresh empty one when the run has none yet."""
        if not self.manifest_path.exists():
            return {"schema_version": SCHEMA_VERSION, "created": None, "stages": {}}
        try:
            data = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise CkaqadError(f"{self.manifest_path} is not valid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            raise CkaqadError(f"{self.manifest_path} is not a ckaqad run manifest (an object with a 'stages' object)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CkaqadError(
                f"{self.manifest_path} has schema_version {version!r}; this ckaqad reads version {SCHEMA_VERSION}"
            )
        return data

    def _write(self, data: dict[str, Any]) -> None:
        if data.get("created") is None:
            data["created"] = now()
        atomic_write_json(self.manifest_path, scrub_secrets(data))

    def stage_entry(self, stage: str) -> dict[str, Any] | None:
        return self.read()["stages"].get(stage)

    def stage_output(self, stage: str, key: str) -> Any:
        """An output that a finished earlier stage recorded, as a path inside this run when it is one."""
        entry = self.stage_entry(stage)
        if entry is None or entry.get("status") != "done":
            return None
        value = entry.get("outputs", {}).get(key)
        if isinstance(value, str) and value:
            path = Path(value) if os.path.isabs(value) else self.path / value
            if path.exists():  # inside the run (recorded relative) or outside it (pack --out, recorded absolute)
                return path
        return value

    # -- lock ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's lock. Re-entrant within one RunDir object; a stale lock of a dead process is cleared."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire()
        self._lock_depth = 1
        try:
            self._mark_interrupted_stages()
            yield
        finally:
            self._lock_depth = 0
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()

    def _acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_lock()
                if holder is None or self._is_stale(holder):
                    who = f"process {holder['pid']}" if holder else "an unreadable lock"
                    self._on_message(f"cleared a stale lock on {self.path} left by {who}, which is gone")
                    with contextlib.suppress(FileNotFoundError):
                        self.lock_path.unlink()
                    continue
                raise RunLockedError(
                    f"run {self.path} is locked by process {holder['pid']} on {holder['host']} "
                    f"(since {holder.get('since')}); wait for it to finish, or delete {self.lock_path} if it is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return
        raise RunLockedError(f"could not lock run {self.path}: another process keeps taking the lock")

    def _read_lock(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.lock_path.read_text())
            return holder if isinstance(holder.get("pid"), int) else None
        except (OSError, json.JSONDecodeError, AttributeError):
            return None

    def lock_held(self) -> bool:
        """Whether a live process holds the run's lock (a holder on another host counts as live: it cannot be
        checked from here). A stage recorded 'running' while nothing holds the lock was interrupted."""
        holder = self._read_lock()
        return holder is not None and not self._is_stale(holder)

    def shown_stages(self) -> dict[str, Any]:
        """run.json's stages as they stand now: a 'running' stage whose process is gone shows as 'interrupted' (the
        next stage command records it as failed)."""
        stages = self.read()["stages"]
        if any(entry.get("status") == "running" for entry in stages.values()) and not self.lock_held():
            stages = self.read()["stages"]  # a stage that just ended wrote run.json before it let the lock go
            for entry in stages.values():
                if entry.get("status") == "running":
                    entry.update(status="interrupted", error="the process running it is gone")
        return stages

    @staticmethod
    def _is_stale(holder: dict[str, Any]) -> bool:
        return holder.get("host") == socket.gethostname() and not pid_alive(holder["pid"])

    def _mark_interrupted_stages(self) -> None:
        """Stages left 'running' by a process that died become 'failed' (we hold the lock, so none is running)."""
        data = self.read()
        changed = False
        for name, entry in data["stages"].items():
            if entry.get("status") == "running":
                entry.update(status="failed", ended=now(), error="interrupted: the process running it died")
                self._on_message(f"stage {name} of {self.path} was interrupted earlier; marked failed")
                changed = True
        if changed:
            self._write(data)

    # -- stages ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(
        self,
        name: str,
        *,
        config: dict[str, Any],
        inputs: dict[str, Any] | None = None,
        force: bool = False,
        atomic_outputs: bool = False,
    ) -> Iterator[StageRecord]:
        """Run a stage: lock, record 'running', yield a record to fill, then record 'done' or 'failed'.

        ``atomic_outputs``: the stage replaces its outputs only when it succeeds (pack, push), so when a forced re-run
        fails, what it leaves on disk is still the earlier finished run's: the earlier 'done' record is put back,
        with the failure noted under ``last_failed_attempt``, and run.json keeps describing what is on disk.
        """
        with self.lock():
            data = self.read()
            previous = data["stages"].get(name)
            if previous and previous.get("status") == "done" and not force:
                raise StageDoneError(
                    f"stage {name} already finished in {self.path} (at {previous.get('ended')}); "
                    "pass --force to run it again"
                )
            self.stage_dir(name).mkdir(parents=True, exist_ok=True)
            data["stages"][name] = {
                "status": "running",
                "started": now(),
                "ended": None,
                "pid": os.getpid(),
                "config": config,
                "inputs": inputs or {},
                "outputs": {},
                "metrics": {},
                "versions": library_versions(),
            }
            self._write(data)
            record = StageRecord(name)
            try:
                yield record
            except BaseException as e:
                if atomic_outputs and previous and previous.get("status") == "done":
                    self._restore(name, previous, config=config, error=_one_line(e))
                else:
                    self._finish(name, record, "failed", error=_one_line(e))
                raise
            self._finish(name, record, "done")

    def _restore(self, name: str, previous: dict[str, Any], *, config: dict[str, Any], error: str) -> None:
        data = self.read()
        started = data["stages"][name].get("started")
        attempt = {"started": started, "ended": now(), "config": config, "error": error}
        data["stages"][name] = {**previous, "last_failed_attempt": attempt}
        self._write(data)
        self._on_message(f"stage {name} failed; its earlier finished outputs are untouched and stay recorded")

    def record_progress(
        self, name: str, *, metrics: dict[str, Any] | None = None, outputs: dict[str, Any] | None = None
    ) -> None:
        """Update a running stage's metrics/outputs in run.json (e.g. the last checkpoint), under the lock."""
        with self.lock():
            data = self.read()
            entry = data["stages"][name]
            entry["metrics"].update(metrics or {})
            entry["outputs"].update(outputs or {})
            self._write(data)

    def _finish(self, name: str, record: StageRecord, status: str, error: str | None = None) -> None:
        data = self.read()
        entry = data["stages"][name]
        entry.update(status=status, ended=now())
        entry["inputs"].update(record.inputs)
        entry["outputs"].update(record.outputs)
        entry["metrics"].update(record.metrics)
        entry.pop("pid", None)
        if error is not None:
            entry["error"] = error
        self._write(data)

    def relpath(self, path: Path) -> str:
        """A path inside the run as a string relative to it (so a run directory can be moved)."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.path.resolve()))
        except ValueError:
            return str(path.resolve())


def _one_line(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGTERM)"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, CkaqadError):
        return msg
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return f"{type(e).__name__}: {msg}{where}"
