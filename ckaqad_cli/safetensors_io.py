"""Streaming safetensors I/O: read a (sharded) checkpoint one tensor at a time, write sharded outputs.

Reading validates each file with ``safe_open``, then reads one tensor at a time straight from the file into a new
tensor (one copy, no mapping left resident), so memory holds one tensor, not the model. Writing is planned
up front: every output tensor's name, dtype and shape is known before the first byte is written (quantization only
changes shapes in known ways), so each shard's header is written first and the tensors' bytes are streamed after it.
Memory therefore stays at one tensor whatever ``max_shard_bytes`` is, and the exact output size is known in advance
for the disk-space check.

Reading can also record each file's digest as it goes (``SafetensorsSource(..., digest=True)``): the input record
of run.json then costs no second read of the weights (see :func:`tensors_sha256`).

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused, never unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ckaqad_cli.atomic import atomic_write_json
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.units import format_bytes

TENSORS_SHA256 = "tensors-sha256"
"""Name of the digest of a safetensors file recorded in run.json (see tensors_sha256)."""
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, dtype and shape, without its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# -- reading ---------------------------------------------------------------------------------------------------


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files holding a checkpoint's weights (via its index when sharded), checked to exist."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CkaqadError(f"{directory} is not a directory")
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CkaqadError(f"{index} is not a valid safetensors index ({e})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CkaqadError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    files = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("."))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CkaqadError(
            f"{directory} holds only pickle checkpoints ({', '.join(pickles[:3])}); ckaqad never unpickles weights: "
            "convert them to safetensors first (e.g. model.save_pretrained(dir, safe_serialization=True))"
        )
    raise CkaqadError(f"{directory} holds no safetensors weights (no *.safetensors, no {INDEX_FILE})")


class SafetensorsSource:
    """The tensors of a safetensors checkpoint directory, one file or sharded, read one tensor at a time.

    Opening reads and validates every file's header (a corrupt or truncated file is a one-line CkaqadError);
    :meth:`get` then loads a single tensor. Use as a context manager or call :meth:`close`.
    With ``digest``, each tensor's SHA-256 is taken as it is first read (on the reading thread, which the hash lets
    run beside others), and :meth:`digests` gives each file's :func:`tensors_sha256` once all its tensors were read.
    """

    def __init__(self, directory: str | os.PathLike, *, digest: bool = False):
        self.directory = Path(directory)
        self.files = weight_files(self.directory)
        self._specs: dict[str, TensorSpec] = {}
        self._file_of: dict[str, Path] = {}
        self._offset: dict[str, int] = {}  # where each tensor's bytes start in its file
        self._headers: dict[Path, _Header] = {}
        self._sha256: dict[str, bytes] | None = {} if digest else None  # tensor -> SHA-256 of its bytes, as read
        for path in self.files:
            with self._open(path) as handle:  # validates the header (size, offsets) before we read it ourselves
                header = self._headers[path] = _read_header(path)
                self._offset.update((name, start) for name, (start, _) in header.ranges.items())
                for name in handle.keys():
                    if name in self._specs:
                        raise CkaqadError(f"tensor {name} appears in both {self._file_of[name].name} and {path.name}")
                    sl = handle.get_slice(name)
                    dtype = _DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CkaqadError(f"{path.name}: tensor {name} has unsupported dtype {sl.get_dtype()}")
                    self._specs[name] = TensorSpec(name, dtype, tuple(sl.get_shape()))
                    self._file_of[name] = path

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CkaqadError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between reads; kept so the source works as a context manager."""

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        """Tensor names, grouped by file in the order the files are listed."""
        return list(self._specs)

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    def specs(self) -> list[TensorSpec]:
        return list(self._specs.values())

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self._specs.values())

    def get(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Load one tensor: its bytes are read from the file straight into a new tensor, or into ``scratch``.

        ``scratch`` (uint8, at least the tensor's bytes) makes the result a view of it, valid until the scratch is
        reused: reading into memory already touched skips the page faults and zeroing of a fresh allocation (for a
        checkpoint in the page cache, 0.22 s against 1.0 s per 2 GB on one core).
        No mapping is used: safe_open's pages would stay resident (and counted in RSS) while a handle holds them,
        and copying out of a mapping costs a second pass over the data.
        """
        spec, path = self._specs[name], self._file_of[name]
        if scratch is None:
            out = torch.empty(spec.shape, dtype=spec.dtype)
            raw = out.reshape(-1).view(torch.uint8)
        else:
            raw = scratch[: spec.nbytes]
            out = raw.view(spec.dtype).reshape(spec.shape)
        data = memoryview(raw.numpy())
        try:
            with open(path, "rb") as f:
                f.seek(self._offset[name])
                got = f.readinto(data) if spec.nbytes else 0
        except OSError as e:
            raise CkaqadError(f"{path}: cannot read tensor {name}: {e}") from None
        if got != spec.nbytes:
            raise CkaqadError(f"{path}: tensor {name} is cut short ({got} of {spec.nbytes} bytes): truncated file?")
        if self._sha256 is not None and name not in self._sha256:
            self._sha256[name] = hashlib.sha256(data).digest()  # releases the GIL: other readers run meanwhile
        return out

    def digests(self) -> dict[str, str]:
        """{file name relative to the directory: its :func:`tensors_sha256`} for each weight file all of whose tensors
        were read since the source was opened with ``digest``."""
        if self._sha256 is None:
            raise ValueError("this SafetensorsSource was opened without digest=True")
        out = {}
        for path, header in self._headers.items():
            if all(name in self._sha256 for name in header.ranges) and header.tiles(path.stat().st_size):
                key = path.relative_to(self.directory).as_posix()
                out[key] = header.digest(self._sha256[name] for name in header.in_file_order())
        return out


def check_file(path: str | os.PathLike) -> None:
    """A one-line CkaqadError naming ``path`` when it is not a readable safetensors file (its header and size are
    checked, no tensor is read)."""
    with SafetensorsSource._open(Path(path)):
        pass


@dataclass(frozen=True)
class _Header:
    """A safetensors file's header as stored (the 8-byte length and the JSON) and each tensor's byte range in the
    file."""

    raw: bytes
    ranges: dict[str, tuple[int, int]]

    def in_file_order(self) -> list[str]:
        return sorted(self.ranges, key=lambda name: (*self.ranges[name], name))

    def tiles(self, file_size: int) -> bool:
        """Whether the tensors' bytes follow the header back to back up to the end of the file (as safetensors
        requires: then the header and the tensors' bytes are the whole file)."""
        end = len(self.raw)
        for name in self.in_file_order():
            start, stop = self.ranges[name]
            if start != end:
                return False
            end = stop
        return end == file_size

    def digest(self, tensor_sha256: Iterable[bytes]) -> str:
        h = hashlib.sha256(self.raw)
        for d in tensor_sha256:
            h.update(d)
        return f"{TENSORS_SHA256}:{h.hexdigest()}"


def _read_header(path: Path) -> _Header:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            (length,) = struct.unpack("<Q", raw)
            if length > os.fstat(f.fileno()).st_size - 8:
                raise ValueError(f"a header of {length} bytes does not fit in the file")
            raw += f.read(length)
        header = json.loads(raw[8:])
        ranges = {name: (8 + length + int(entry["data_offsets"][0]), 8 + length + int(entry["data_offsets"][1]))
                  for name, entry in header.items() if name != "__metadata__"}
        return _Header(raw, ranges)
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CkaqadError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


def tensors_sha256(path: str | os.PathLike) -> str | None:
    """The digest run.json records for a safetensors file: ``tensors-sha256:`` and the hex SHA-256 of the file's
    header as stored (its 8-byte length and JSON) followed by the 32-byte SHA-256 of each tensor's bytes, in the
    order of the tensors in the file; None when the file is not a safetensors file whose tensors fill it.

    Where the tensors fill the file (safetensors requires it, and pack reads only files that safetensors opens), the
    header and the tensors' bytes are the whole file, so this digest fixes every byte of it as surely as the file's
    SHA-256 does (it is not the output of ``sha256sum``). Unlike that, it is computed one tensor at a time in any
    order: pack takes it from the reads it makes anyway (:meth:`SafetensorsSource.digests`).
    """
    path = Path(path)
    try:
        header = _read_header(path)
    except CkaqadError:
        return None
    if not header.tiles(path.stat().st_size):
        return None
    with open(path, "rb") as f:
        sha256 = []
        for name in header.in_file_order():
            start, stop = header.ranges[name]
            f.seek(start)
            h = hashlib.sha256()
            while start < stop and (chunk := f.read(min(stop - start, 1 << 24))):
                h.update(chunk)
                start += len(chunk)
            sha256.append(h.digest())
    return header.digest(sha256)


# -- writing ---------------------------------------------------------------------------------------------------


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger single tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(shard: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in shard:
        header[spec.name] = {
            "dtype": _DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


_STAGING_BYTES = 16 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class _UncachedFile:
    """A new file written front to back through a page-aligned buffer, with O_DIRECT where the filesystem takes it:
    the bytes go from the buffer to the disk without a copy into the page cache. On the 2-core development VM,
    writing 0.8 GB through the page cache took 1.1-3.2 CPU seconds and its fsync 0.5 s; with O_DIRECT, 0.15 CPU
    seconds and the disk's time, during which pack's workers go on. Where O_DIRECT is refused (at open or at a
    write), and for the last partial block, an ordinary write; the bytes are the same either way."""

    def __init__(self, path: Path, buffer: mmap.mmap):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self._fd = os.open(path, flags | _O_DIRECT, 0o666)
        except OSError as e:
            if e.errno != errno.EINVAL or not _O_DIRECT:
                raise
            self._fd = os.open(path, flags, 0o666)  # a filesystem without O_DIRECT (tmpfs on older kernels)
        self._view = memoryview(buffer)
        self._fill = 0

    def write(self, data: memoryview) -> None:
        data = data.cast("B")
        while data:
            n = min(len(data), len(self._view) - self._fill)
            self._view[self._fill : self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == len(self._view):
                self._flush()

    def _flush(self) -> None:
        pending = self._view[: self._fill]
        while pending:
            try:
                pending = pending[os.write(self._fd, pending) :]
            except OSError as e:  # an alignment this device refuses: the rest goes through the page cache
                if e.errno != errno.EINVAL or not self._uncached(False):
                    raise
        self._fill = 0

    def _uncached(self, on: bool) -> bool:
        """Switch O_DIRECT on or off; whether it was on."""
        import fcntl  # POSIX only, as O_DIRECT

        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, (flags | _O_DIRECT) if on else (flags & ~_O_DIRECT))
        return bool(flags & _O_DIRECT)

    def close(self) -> None:
        """Write the tail, fsync, close."""
        if self._fill:
            if _O_DIRECT and self._fill % mmap.PAGESIZE:
                self._uncached(False)  # a partial block: O_DIRECT writes whole ones
            self._flush()
        os.fsync(self._fd)
        os.close(self._fd)

    def abort(self) -> None:
        os.close(self._fd)


class ShardedWriter:
    """Write the planned tensors, in plan order, into shards of ``max_shard_bytes`` (+ the index when sharded).

    Each tensor goes to disk as it is given, through one staging buffer (_UncachedFile); nothing else is buffered.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        specs: Sequence[TensorSpec],
        max_shard_bytes: int,
        *,
        metadata: dict[str, str] | None = None,
    ):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the write plan")
        self.directory = Path(directory)
        self.shards = plan_shards(specs, max_shard_bytes)
        self.file_names = shard_file_names(len(self.shards))
        self.metadata = {"format": "pt", **(metadata or {})}
        self._queue: Iterator[tuple[int, TensorSpec]] = iter(
            [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        )
        self._file: _UncachedFile | None = None
        self._file_index = -1
        self._staging: mmap.mmap | None = None
        self._written = 0

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the output (the index's ``total_size``)."""
        return sum(s.nbytes for shard in self.shards for s in shard)

    @property
    def file_bytes(self) -> int:
        """Bytes the output files take on disk (tensor data plus headers)."""
        return self.total_bytes + sum(len(_header_bytes(s, self.metadata)) for s in self.shards)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            shard_index, spec = next(self._queue)
        except StopIteration:
            raise ValueError(f"tensor {name} was not in the write plan") from None
        if spec.name != name:
            raise ValueError(f"tensors out of plan order: expected {spec.name}, got {name}")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name}: planned {spec.dtype} {list(spec.shape)}, got {tensor.dtype} {list(tensor.shape)}"
            )
        if shard_index != self._file_index:
            self._close_file()
            self._file_index = shard_index
            if self._staging is None:
                self._staging = mmap.mmap(-1, _STAGING_BYTES)  # page-aligned, as O_DIRECT needs
            self._file = _UncachedFile(self.directory / self.file_names[shard_index], self._staging)
            self._file.write(memoryview(_header_bytes(self.shards[shard_index], self.metadata)))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._written += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Finish the last shard and write the index; every planned tensor must have been written."""
        self._close_file()
        planned = sum(len(s) for s in self.shards)
        if self._written != planned:
            raise ValueError(f"only {self._written} of {planned} planned tensors were written")
        if len(self.shards) > 1:
            weight_map = {s.name: self.file_names[i] for i, shard in enumerate(self.shards) for s in shard}
            atomic_write_json(
                self.directory / INDEX_FILE, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            )

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None


def ensure_disk_space(target: str | os.PathLike, needed_bytes: int, *, margin: float = 1.05) -> None:
    """Refuse (CkaqadError) when the filesystem that will hold ``target`` has less than ``needed_bytes * margin``."""
    probe = Path(target).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * margin:
        raise CkaqadError(
            f"not enough disk space for {target}: the output needs {format_bytes(needed_bytes)}, "
            f"{format_bytes(free)} free on that filesystem"
        )


def ensure_writable(directory: str | os.PathLike, option: str, *, replaced: bool = False) -> None:
    """Refuse (CkaqadError naming ``option`` and the path) when ``directory`` cannot be written: an existing one must
    let us create a file in it; a missing one must be creatable under its nearest existing parent. With ``replaced``
    the directory is built beside itself and renamed into place (atomic_directory), so its parent is what must be
    writable. The probe (a temporary file or directory, removed at once) leaves nothing behind, so it runs before
    any model loads."""
    directory = Path(directory)
    probe = directory.parent if replaced else directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CkaqadError(f"{option} {directory}: {probe} is not a directory")
    try:
        if probe == directory:
            fd, name = tempfile.mkstemp(prefix=".ckaqad-write-test-", dir=probe)
            os.close(fd)
            os.unlink(name)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".ckaqad-write-test-", dir=probe))
    except OSError as e:
        problem = "is not writable" if probe == directory else f"cannot be created in {probe}"
        raise CkaqadError(
            f"{option} {directory} {problem} ({e.strerror or e}): choose a directory you can write to"
        ) from None


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> list[str]:
    """Copy the named files that exist in ``src`` into ``dst``; return the names copied."""
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
