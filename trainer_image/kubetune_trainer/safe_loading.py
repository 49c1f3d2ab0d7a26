"""Checkpoint loading that never unpickles arbitrary objects (resume, and the best-model reload).

Whoever can write the output prefix (a directory or s3://...) controls the files the next attempt
loads when it resumes, and several of them are pickles: optimizer, scheduler and RNG state,
DeepSpeed ZeRO model and optimizer states, FSDP (torch.distributed.checkpoint) metadata and items.
Unpickling runs code, so resuming from them would hand that person the trainer. Two layers:

1. `verify_checkpoint()`, before resuming, on every rank, before any collective (a refusal cannot
   leave other ranks waiting): every file a loader may unpickle is opened with torch's weights-only
   unpickler (`map_location="meta"`: the tensors' bytes are not read), DCP `.metadata` with a
   restricted unpickler. A file holding anything but tensors, plain containers and the few classes
   of `allowed_globals()` is refused with `UnsafeCheckpointError` (exit code 3), which names it.
2. `weights_only_loading()`, around `trainer.train()` (resume, and `load_best_model_at_end`):
   torch's `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` makes every `torch.load` weights-only even where a
   library asks for `weights_only=False` (DeepSpeed's TorchCheckpointEngine, DCP's byte items), with
   only `allowed_globals()` added through `torch.serialization.safe_globals`; DCP's `.metadata`, which
   torch reads with plain `pickle.load`, goes through the restricted unpickler. This layer does not
   depend on the scan having seen the same bytes (a file replaced after the scan is still refused).

Why not DeepSpeed's pluggable `checkpoint_engine` (its `load()` does `torch.load(weights_only=False)`):
DeepSpeedEngine builds it from its config in `__init__` (`create_checkpoint_engine` takes no custom
class), and transformers calls `engine.load_checkpoint` right after accelerate has built the engine,
inside `Trainer._prepare_for_training`, so swapping `engine.checkpoint_engine` would mean overriding
private Trainer internals. The torch switch covers that `torch.load` and every other library's.
transformers' own loads (`_load_rng_state`, `_load_optimizer_and_scheduler`, `_load_scaler`, model
and adapter weights) already pass `weights_only=True`; the switch keeps them so if that ever changes.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetune_trainer.errors import UnsafeCheckpointError

# Files that hold pickles by convention (torch.save, DeepSpeed, transformers); any file that starts
# like a zip archive (torch.save's format) or a binary pickle is scanned too, whatever its name.
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}
# Written by transformers for reference and never read back by a resume: it pickles the whole
# TrainingArguments object, which no allowlist should admit, so it is neither scanned nor loaded.
NEVER_LOADED = {"training_args.bin"}
DCP_METADATA = re.compile(r"(__\d+)?\.metadata")  # torch.distributed.checkpoint's index (global, or per rank)
DCP_SUFFIX = ".distcp"  # its data files: torch.save'd items at the offsets the metadata lists
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


def allowed_globals(deepspeed: bool = False) -> list[Any]:
    """The classes and functions, besides tensors and plain containers, that checkpoint files may hold.

    Each entry is what a library we use genuinely writes into a checkpoint; none of them runs
    anything but an attribute assignment or a plain constructor when unpickled.
    """
    import numpy as np

    numpy_core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    allowed: list[Any] = [
        # transformers' Trainer._save_rng_state (rng_state*.pth): np.random.get_state() is a tuple
        # holding a uint32 ndarray, pickled by numpy as _reconstruct(ndarray, shape, dtype) + state.
        numpy_core.multiarray._reconstruct,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),  # numpy.dtypes.UInt32DType: the dtype's state is built onto it
    ]
    if deepspeed:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [
            LossScaler,  # ZeRO-1/2/3 *_optim_states.pt, key "loss_scaler": static scale (fp32, bf16)
            DynamicLossScaler,  # the same key with fp16 dynamic loss scaling (precision fp16 on GPUs)
            ZeroStageEnum,  # ZeRO *_optim_states.pt, key "zero_stage"
            fragment_address,  # ZeRO-1/2 and bf16 *_optim_states.pt, key "param_slice_mappings"
        ]
    return allowed


def _dcp_metadata_globals() -> dict[str, Any]:
    """What torch.distributed.checkpoint pickles into `.metadata` (its own dataclasses, sizes, paths)."""
    import pathlib

    import torch
    from torch.distributed.checkpoint import filesystem, metadata

    objects: list[Any] = [
        metadata.Metadata,
        metadata.TensorStorageMetadata,
        metadata.BytesStorageMetadata,
        metadata.ChunkStorageMetadata,
        metadata.TensorProperties,
        metadata.MetadataIndex,
        metadata.StorageMeta,
        metadata._MEM_FORMAT_ENCODING,  # TensorProperties.memory_format
        filesystem._StorageInfo,  # where each item lies in the .distcp files
        torch.Size,
        torch.serialization._get_layout,  # how torch.layout pickles (TensorProperties.layout); looks up layouts only
        pathlib.PurePosixPath,
        pathlib.PosixPath,  # StorageMeta.checkpoint_id
    ]
    return {f"{o.__module__}.{o.__qualname__}": o for o in objects}


class _RestrictedUnpickler(pickle.Unpickler):
    """The `find_class` allowlist of Python's pickle documentation ("Restricting Globals")."""

    def __init__(self, file: Any, allowed: dict[str, Any]):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        import torch

        key = f"{module}.{name}"
        if key in self.allowed:
            return self.allowed[key]
        dtype = vars(torch).get(name) if module == "torch" else None  # vars: no lazy submodule imports
        if isinstance(dtype, torch.dtype):
            return dtype  # TensorProperties.dtype
        raise pickle.UnpicklingError(f"GLOBAL {key} is not an allowed global")


def load_dcp_metadata(file: Any) -> Any:
    """Unpickle a torch.distributed.checkpoint `.metadata` stream, admitting only DCP's own types."""
    return _RestrictedUnpickler(file, _dcp_metadata_globals()).load()


# ----- 1. the scan before resuming


def _offending_global(message: str) -> str | None:
    for pattern in (
        r"GLOBAL (\S+) (?:was not|is not) an allowed global",
        r"GLOBAL (\S+) whose module \S+ is blocked",
        r"but got <class '([^']+)'>",
        r"call reduce for unrecognized function <(?:built-in )?function (\S+?)>",
    ):
        match = re.search(pattern, message)
        if match:
            return match.group(1).rstrip(".,")
    return None


def _refusal(label: str, relative: str, error: BaseException) -> UnsafeCheckpointError:
    message = str(error)
    if isinstance(error, pickle.UnpicklingError):
        offender = _offending_global(message)
        reason = (
            f"contains a non-allowlisted object{f' ({offender})' if offender else ''}: weights-only loading "
            "admits only tensors, plain containers and a few known library classes"
        )
    else:
        first = message.splitlines()[0][:200] if message else ""
        # torch's own messages go on to suggest weights_only=False: not advice to pass on here
        detail = f": {first}" if first and "weights_only" not in first else ""
        reason = f"cannot be read with weights-only loading ({type(error).__name__}{detail})"
    return UnsafeCheckpointError(
        f"checkpoint {label}: file {relative} {reason}; refusing to resume from it. Checkpoint files are never "
        "unpickled beyond that: whoever can write the output could otherwise run code in the trainer. Check who "
        "wrote it, then delete that checkpoint (an older complete one is resumed instead) or use a new output.uri"
    )


def _sniff_pickle(path: Path) -> bool:
    """Whether a loader could unpickle this file: by name, or by content (a zip archive, a binary pickle)."""
    if path.name in NEVER_LOADED or path.suffix == ".safetensors":
        return False  # safetensors is parsed without pickle
    if path.suffix in PICKLE_SUFFIXES:
        return True
    with path.open("rb") as handle:
        head = handle.read(4)
    return head == _ZIP_MAGIC or (len(head) > 0 and head[0] == _PICKLE_PROTO)


def _check_torch_file(file: Any, allowed: list[Any], byte_item: bool = False) -> None:
    """Run torch's weights-only unpickler over a torch.save stream; tensors stay on the meta device."""
    import torch

    with torch.serialization.safe_globals(allowed):
        if byte_item:  # a DCP byte item: a small torch.save'd object, loaded whole
            torch.load(file, map_location="cpu", weights_only=True)
        else:
            torch.load(file, map_location="meta", weights_only=True)


class _FileSlice(io.RawIOBase):
    """A seekable read-only view of `length` bytes at `offset` of an open file (one DCP item)."""

    def __init__(self, handle: Any, offset: int, length: int):
        super().__init__()
        self._handle, self._offset, self._length, self._position = handle, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + position)
        return self._position

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self._length - self._position)
        if count <= 0:
            return 0
        self._handle.seek(self._offset + self._position)
        data = self._handle.read(count)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def _check_dcp_metadata(metadata_file: Path, root: Path, label: str, allowed: list[Any]) -> None:
    """A DCP `.metadata` (or a rank's `__N.metadata`) and every item of the `.distcp` files it lists."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    directory = metadata_file.parent
    try:
        with metadata_file.open("rb") as handle:
            metadata = load_dcp_metadata(handle)
        storage = dict(getattr(metadata, "storage_data", None) or {})
        kinds = dict(getattr(metadata, "state_dict_metadata", None) or {})
    except Exception as error:  # noqa: BLE001 - whatever it is, it is not a loadable index
        raise _refusal(label, metadata_file.relative_to(root).as_posix(), error) from None
    by_file: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in storage.items():
        by_file.setdefault(str(info.relative_path), []).append((index, info))
    for relative, items in sorted(by_file.items()):
        data_file = (directory / relative).resolve()
        if not data_file.is_relative_to(root.resolve()) or not data_file.is_file():
            raise UnsafeCheckpointError(
                f"checkpoint {label}: {metadata_file.relative_to(root).as_posix()} lists "
                f"{relative!r}, which is not a file of this checkpoint; refusing to resume"
            )
        shown = data_file.relative_to(root.resolve()).as_posix()
        with data_file.open("rb") as handle:
            for index, info in items:
                if info.transform_descriptors:
                    continue  # an encoded item (not written by our runs): left to layer 2 at load time
                byte_item = isinstance(kinds.get(getattr(index, "fqn", None)), BytesStorageMetadata)
                view = _FileSlice(handle, int(info.offset), int(info.length))
                try:
                    _check_torch_file(
                        io.BytesIO(view.read()) if byte_item else view, allowed, byte_item=byte_item
                    )
                except Exception as error:  # noqa: BLE001 - any failure means the loader cannot have it either
                    raise _refusal(label, f"{shown} (item {getattr(index, 'fqn', index)})", error) from None


def _check_deepspeed_tag(root: Path, label: str) -> None:
    """DeepSpeed reads the tag to load from `latest`: it must name a directory of this checkpoint."""
    latest = root / "latest"
    if not latest.is_file():
        return
    tag = latest.read_text(errors="replace").strip()
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag or not (root / tag).is_dir():
        raise UnsafeCheckpointError(
            f"checkpoint {label}: file latest names {tag[:100]!r}, which is not a directory "
            "of this checkpoint; refusing to resume from it"
        )


def _best_checkpoint(root: Path, label: str) -> Path | None:
    """The best checkpoint trainer_state.json names (reloaded at the end with early stopping), if any."""
    import json

    try:
        state = json.loads((root / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    best = state.get("best_model_checkpoint") if isinstance(state, dict) else None
    if not isinstance(best, str) or not best:
        return None
    path = Path(best)
    if not path.is_dir():
        return None  # transformers ignores a best checkpoint that no longer exists
    if path.resolve() == root.resolve():
        return None
    if path.resolve().parent != root.resolve().parent:
        raise UnsafeCheckpointError(
            f"checkpoint {label}: trainer_state.json names {best} as the best checkpoint, "
            "which is not a checkpoint of this output; refusing to resume from it"
        )
    return path


def _files(root: Path) -> list[Path]:
    """Every file under root, sorted; symlinked directories are not followed (as os.walk does)."""
    return sorted(Path(directory) / name for directory, _dirs, names in os.walk(root) for name in names)


def _uses_deepspeed_layout(root: Path) -> bool:
    return (root / "latest").is_file() or any(p.is_dir() for p in root.glob("global_step*"))


def verify_checkpoint(path: str | os.PathLike[str], label: str | None = None) -> None:
    """Refuse (UnsafeCheckpointError, naming the file) a checkpoint with any file weights-only loading rejects.

    `label` is how the checkpoint is named in the message (its output URI); the local path otherwise.
    """
    root = Path(path)
    label = label or str(root)
    roots = [root]
    best = _best_checkpoint(root, label)
    if best is not None:
        roots.append(best)
    for checkpoint in roots:
        shown = label if checkpoint is root else f"{label} (best checkpoint {checkpoint.name})"
        _check_deepspeed_tag(checkpoint, shown)
        allowed = allowed_globals(deepspeed=_uses_deepspeed_layout(checkpoint))
        files = [f for f in _files(checkpoint) if f.is_file()]
        dcp_metadata = [f for f in files if DCP_METADATA.fullmatch(f.name)]
        for metadata_file in dcp_metadata:
            _check_dcp_metadata(metadata_file, checkpoint, shown, allowed)
        dcp_dirs = {f.parent for f in dcp_metadata}
        for file in files:
            if file in dcp_metadata or (file.parent in dcp_dirs and file.suffix == DCP_SUFFIX):
                continue  # checked through their metadata
            if not _sniff_pickle(file):
                continue
            try:
                _check_torch_file(str(file), allowed)
            except Exception as error:  # noqa: BLE001 - any failure means the loader cannot have it either
                raise _refusal(shown, file.relative_to(checkpoint).as_posix(), error) from None


# ----- 2. enforcement while the Trainer loads

_refusals: list[
    UnsafeCheckpointError
] = []  # what the load-time hooks refused, whatever wraps it on the way up


def _restricted_dcp_read_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
    """FileSystemReader.read_metadata, with the restricted unpickler instead of pickle.load."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as metadata_file:
        try:
            metadata = load_dcp_metadata(metadata_file)
        except pickle.UnpicklingError as error:
            refusal = _refusal(str(Path(path).parent), Path(path).name, error)
            _refusals.append(refusal)  # DCP's load() reports it only as text inside its own exception
            raise refusal from None
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


@contextlib.contextmanager
def _restricted_dcp_metadata() -> Iterator[None]:
    # The one global patch, on purpose: torch.distributed.checkpoint's FileSystemReader.read_metadata
    # unpickles `.metadata` with plain pickle.load and has no option not to, and accelerate's
    # load_fsdp_model/load_fsdp_optimizer (which transformers' Trainer calls on an FSDP resume)
    # construct their FileSystemReader themselves, so there is no reader of ours to hand in. The
    # method is swapped only while the Trainer runs, and restored after.
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    original = FileSystemReader.__dict__["read_metadata"]
    FileSystemReader.read_metadata = _restricted_dcp_read_metadata  # type: ignore[method-assign]  # see above
    try:
        yield
    finally:
        FileSystemReader.read_metadata = original  # type: ignore[method-assign]  # restored


@contextlib.contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def weights_only_loading(deepspeed: bool = False, checkpoint: str | None = None) -> Iterator[None]:
    """Every checkpoint load inside is weights-only with `allowed_globals()`; a refusal exits 3.

    `checkpoint` (the resumed directory) is named in the error when a load is refused here; the
    scan before resuming normally refuses first, naming the file.
    """
    import torch

    with contextlib.ExitStack() as stack:
        # torch.load reads these at every call: FORCE wins over an explicit weights_only=False;
        # FORCE_NO (a user's escape hatch) must not re-open the hole while we load checkpoints.
        stack.enter_context(
            _environment(TORCH_FORCE_WEIGHTS_ONLY_LOAD="1", TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=None)
        )
        stack.enter_context(torch.serialization.safe_globals(allowed_globals(deepspeed=deepspeed)))
        stack.enter_context(_restricted_dcp_metadata())
        start = len(_refusals)
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            found = _find_refusal(error) or (_refusals[start] if len(_refusals) > start else None)
            if isinstance(found, UnsafeCheckpointError):
                raise found from None
            if found is None:
                raise
            offender = _offending_global(str(found))
            where = f"checkpoint {checkpoint}" if checkpoint else "a checkpoint"
            raise UnsafeCheckpointError(
                f"{where}: a file contains a non-allowlisted object{f' ({offender})' if offender else ''}: weights-only "
                "loading refused it (delete that checkpoint, or use a new output.uri)"
            ) from None
        finally:
            del _refusals[start:]


def _find_refusal(error: BaseException) -> BaseException | None:
    """A weights-only refusal behind `error`: itself, its causes, or a DCP CheckpointException's failures."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (UnsafeCheckpointError, pickle.UnpicklingError)):
            return current
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending += [
                f[0] if isinstance(f, tuple) else f
                for f in failures.values()
                if isinstance(f[0] if isinstance(f, tuple) else f, BaseException)
            ]
    return None
