"""The checkpoint format shared by the trainer, object storage and the operator.

Layout under a job's output (a local directory or ``s3://bucket/prefix``)::

    <output>/checkpoints/step-<N>/<any files and subdirectories>
    <output>/checkpoints/step-<N>/manifest.json      <- written LAST

``manifest.json``::

    {"step": N, "files": [{"path": "model.safetensors", "sha256": "...", "size": 123}, ...],
     "configHash": "<sha256 of the canonical JSON of the training config>",
     "createdAt": "2025-01-01T00:00:00Z", "formatVersion": 1, ...extra metadata}

Rules that make resuming safe:

- A checkpoint is *complete* only when its manifest exists; the manifest is written after every
  other file is in place (locally: atomic temp file + rename; on S3: uploaded after all other
  objects succeeded and were seen in a listing with the right sizes). ``latest()`` only ever
  returns complete checkpoints, so a crash or outage mid-upload can never be resumed from.
- Re-publishing a step first deletes its old manifest, so stale files never look complete.
- Pruning deletes a checkpoint only when ``keep_last`` newer *complete* ones exist, never a
  protected one (the best step), and deletes the manifest before the other files.
- To S3, :meth:`CheckpointStore.publish` returns at once; a background thread uploads the files
  (in parallel, large ones in multipart), retrying transient failures (endpoint down, timeouts,
  503 SlowDown) with exponential backoff and jitter until a generous deadline while training goes
  on. Permanent failures (403, missing bucket) fail at once and are raised by :meth:`wait`.

:class:`CheckpointStore` is thread-safe: ``publish``, ``latest``, ``prune``, ``pending`` and ``wait``
may be called from any thread. Only one process (rank 0) should publish to a given output.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubetune import storage
from kubetune.storage import S3Options, StorageError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = f".{MANIFEST}.tmp"


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or does not match its manifest."""


class CheckpointUploadError(CheckpointError):
    """A background upload finally failed (permanent error, or the retry deadline passed)."""

    def __init__(self, message: str, steps: list[int]) -> None:
        super().__init__(message)
        self.steps = steps


# ----- hashing and manifests -----


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of a config (dict or pydantic model)."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json", by_alias=True)
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 4 * 1024 * 1024) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def step_name(step: int) -> str:
    """Directory name of a step: ``step-<N>``."""
    return f"{STEP_PREFIX}{int(step)}"


def parse_step(name: str) -> int | None:
    """``step-<N>`` -> N; anything else -> None."""
    match = _STEP_RE.match(name.rstrip("/"))
    return int(match.group(1)) if match else None


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _checkpoint_files(local_dir: Path) -> list[str]:
    out = []
    for dirpath, _dirs, names in os.walk(local_dir):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(local_dir).as_posix()
            if rel == MANIFEST or name.startswith(_TMP_PREFIX):
                continue
            out.append(rel)
    return sorted(out)


def write_manifest(
    local_dir: str | os.PathLike[str],
    step: int,
    config_hash: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Hash every file in ``local_dir`` and write ``manifest.json`` atomically (temp + rename).

    Call it after every other file of the checkpoint is written and closed. ``extra`` adds
    metadata (for example loss, epoch, tokens, ``best``); it cannot override the fixed keys.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    files = [
        {"path": rel, "sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
        for rel in _checkpoint_files(root)
    ]
    manifest: dict[str, Any] = dict(extra or {})
    manifest.update(
        {
            "step": int(step),
            "files": files,
            "configHash": config_hash,
            "createdAt": _now_rfc3339(),
            "formatVersion": FORMAT_VERSION,
        }
    )
    data = json.dumps(manifest, indent=1, sort_keys=False).encode("utf-8") + b"\n"
    tmp = root / f"{_TMP_PREFIX}-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(local_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed manifest of a local checkpoint, or None when missing or unreadable."""
    try:
        manifest = json.loads((Path(local_dir) / MANIFEST).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if _valid_manifest(manifest) else None


def _valid_manifest(manifest: Any) -> bool:
    return (
        isinstance(manifest, dict)
        and isinstance(manifest.get("step"), int)
        and isinstance(manifest.get("files"), list)
        and all(isinstance(f, dict) and {"path", "sha256", "size"} <= f.keys() for f in manifest["files"])
    )


def verify_checkpoint(local_dir: str | os.PathLike[str], *, hashes: bool = True) -> bool:
    """True if the manifest exists and every file in it exists with its size (and sha256)."""
    root = Path(local_dir)
    manifest = read_manifest(root)
    if manifest is None:
        return False
    for entry in manifest["files"]:
        path = root / entry["path"]
        try:
            if path.stat().st_size != entry["size"]:
                return False
        except OSError:
            return False
        if hashes and sha256_file(path) != entry["sha256"]:
            return False
    return True


# ----- the store -----


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint: its step, where it is, and its manifest."""

    step: int
    uri: str
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def created_at(self) -> str | None:
        return self.manifest.get("createdAt")


class CheckpointStore:
    """Checkpoints of one job under ``<output_uri>/checkpoints/`` (a local directory or S3).

    ``upload_workers`` background threads upload published checkpoints (one by default, so
    checkpoints finish in step order); within one checkpoint files and parts go in parallel.
    Transient upload failures are retried with exponential backoff (``backoff_base`` doubling up
    to ``backoff_max`` seconds, with jitter) until ``retry_deadline`` seconds after publishing.
    ``on_complete(ref)`` is called (from the upload thread) when a checkpoint becomes complete.
    """

    def __init__(
        self,
        output_uri: str,
        s3_options: S3Options | None = None,
        *,
        upload_workers: int = 1,
        retry_deadline: float = 24 * 3600.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        staging_dir: str | os.PathLike[str] | None = None,
        on_complete: Callable[[CheckpointRef], None] | None = None,
    ) -> None:
        self.output_uri = str(output_uri)
        self.is_s3 = storage.is_s3(self.output_uri)
        self.options = (s3_options or S3Options.from_env()) if self.is_s3 else s3_options
        self.root = storage.join(self.output_uri, CHECKPOINTS_DIR)
        self.retry_deadline = retry_deadline
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.on_complete = on_complete
        self._staging = Path(staging_dir) if staging_dir else None
        self._lock = threading.RLock()
        self._prune_lock = threading.Lock()
        self._futures: dict[int, concurrent.futures.Future[CheckpointRef]] = {}
        self._closing = threading.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, upload_workers), thread_name_prefix="kubetune-ckpt-upload"
        )

    # --- addresses ---

    def step_uri(self, step: int) -> str:
        """Where step N lives (``<output>/checkpoints/step-N``)."""
        return storage.join(self.root, step_name(step))

    def step_dir(self, step: int) -> Path:
        """An empty local directory to save step N into before :meth:`publish`.

        For a local output this is the checkpoint's final place; for S3 a staging directory
        (``staging_dir``, or a temporary one). An old directory of the same step is removed.
        """
        if self.is_s3:
            if self._staging is None:
                self._staging = Path(tempfile.mkdtemp(prefix="kubetune-ckpt-"))
            path = self._staging / step_name(step)
        else:
            path = storage.local_path(self.step_uri(step))
        if path.exists():
            (path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    # --- reading ---

    def _scan(self) -> tuple[list[int], list[int]]:
        """(every step with files, steps whose manifest exists) from one recursive listing."""
        files = storage.list_tree(self.root, options=self.options)
        steps: set[int] = set()
        with_manifest: set[int] = set()
        for rel in files:
            head, _, rest = rel.partition("/")
            step = parse_step(head)
            if step is None or not rest:
                continue
            steps.add(step)
            if rest == MANIFEST:
                with_manifest.add(step)
        return sorted(steps), sorted(with_manifest)

    def all_steps(self) -> list[int]:
        """Every step directory with files in it, complete or not, ascending."""
        return self._scan()[0]

    def complete_steps(self) -> list[int]:
        """Steps whose manifest exists (locally: and whose files have the listed sizes), ascending.

        On S3 the manifest is the last object of a checkpoint to be stored, so its presence in
        the (strongly consistent) listing means every file is there.
        """
        _steps, with_manifest = self._scan()
        if self.is_s3:
            return with_manifest
        return [s for s in with_manifest if verify_checkpoint(self.step_uri(s), hashes=False)]

    def manifest(self, step: int) -> dict[str, Any] | None:
        """The manifest of step N, or None when it has none (or an unreadable one)."""
        if not self.is_s3:
            return read_manifest(self.step_uri(step))
        try:
            data = storage.read_bytes(storage.join(self.step_uri(step), MANIFEST), options=self.options)
        except StorageError as exc:
            if exc.code == "NoSuchKey":
                return None
            raise
        try:
            manifest = json.loads(data)
        except ValueError:
            log.warning("checkpoint %s: unreadable manifest, ignored", self.step_uri(step))
            return None
        return manifest if _valid_manifest(manifest) and manifest["step"] == step else None

    def latest(self) -> CheckpointRef | None:
        """The newest complete checkpoint, or None."""
        for step in reversed(self.complete_steps()):
            manifest = self.manifest(step)
            if manifest is not None:
                return CheckpointRef(step, self.step_uri(step), manifest)
        return None

    def fetch(self, step: int, local_dir: str | os.PathLike[str]) -> Path:
        """A verified local copy of step N.

        From S3: downloads the files the manifest lists into ``local_dir``, checks size and sha256
        of each, then writes the manifest last (an existing verified copy is reused). For a local
        output: verifies the checkpoint in place and returns its directory.
        """
        if not self.is_s3:
            path = storage.local_path(self.step_uri(step))
            if not verify_checkpoint(path):
                raise CheckpointError(f"checkpoint {path} is incomplete or does not match its manifest")
            return path
        manifest = self.manifest(step)
        if manifest is None:
            raise CheckpointError(f"checkpoint {self.step_uri(step)} is not complete (no manifest)")
        dest = Path(local_dir)
        if read_manifest(dest) == manifest and verify_checkpoint(dest):
            return dest
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MANIFEST).unlink(missing_ok=True)
        wanted = {f["path"] for f in manifest["files"]}
        storage.download_tree(self.step_uri(step), dest, options=self.options, only=wanted)
        for entry in manifest["files"]:
            path = dest / entry["path"]
            if (
                not path.is_file()
                or path.stat().st_size != entry["size"]
                or sha256_file(path) != entry["sha256"]
            ):
                raise CheckpointError(
                    f"checkpoint {self.step_uri(step)}: {entry['path']} does not match the manifest "
                    f"(size or sha256 differ): the object was changed after the manifest was written"
                )
        tmp = dest / f"{_TMP_PREFIX}-fetch"
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", "utf-8")
        os.replace(tmp, dest / MANIFEST)
        return dest

    # --- writing ---

    def publish(
        self,
        local_ckpt_dir: str | os.PathLike[str],
        step: int,
        config_hash: str,
        extra: dict[str, Any] | None = None,
        *,
        keep_last: int | None = None,
        protect: Iterable[int] = (),
    ) -> concurrent.futures.Future[CheckpointRef]:
        """Make a saved checkpoint complete: write its manifest, then (for S3) upload it.

        For S3 this returns at once; the upload runs in the background and the future (also
        awaited by :meth:`wait`) gives the :class:`CheckpointRef` when the remote manifest is in
        place. Leave ``local_ckpt_dir`` alone until then; a staging directory made by
        :meth:`step_dir` is removed once its upload completed. For a local output the directory is (or is copied to) ``<output>/checkpoints/step-N``
        and the future is already done. With ``keep_last``, :meth:`prune` runs once the new
        checkpoint is complete, sparing ``protect``.
        """
        src = Path(local_ckpt_dir)
        manifest = write_manifest(src, step, config_hash, extra)
        protect = frozenset(protect)
        if not self.is_s3:
            dest = storage.local_path(self.step_uri(step))
            future: concurrent.futures.Future[CheckpointRef] = concurrent.futures.Future()
            try:
                if src.resolve() != dest.resolve():
                    (dest / MANIFEST).unlink(missing_ok=True)
                    storage.upload_tree(src, str(dest), last=(MANIFEST,))
                ref = CheckpointRef(step, str(dest), manifest)
                self._after_complete(ref, keep_last, protect)
                future.set_result(ref)
            except BaseException as exc:
                future.set_exception(exc)
                raise
            return future
        with self._lock:
            if self._closing.is_set():
                raise CheckpointError("checkpoint store is closed")
            previous = self._futures.get(step)
            if previous is not None and not previous.done():
                raise CheckpointError(f"step {step} is already being uploaded")
            future = self._executor.submit(self._upload, src, step, manifest, keep_last, protect)
            self._futures[step] = future
        return future

    def _backoff(self, attempt: int) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2 ** max(0, attempt - 1))
        return delay / 2 + random.uniform(0, delay / 2)

    def _upload(
        self, src: Path, step: int, manifest: dict[str, Any], keep_last: int | None, protect: frozenset[int]
    ) -> CheckpointRef:
        step_uri = self.step_uri(step)
        manifest_uri = storage.join(step_uri, MANIFEST)
        deadline = time.monotonic() + self.retry_deadline
        done: set[str] = set()
        stale_removed = False
        attempt = 0
        started = time.monotonic()
        while True:
            try:
                if not stale_removed:
                    storage.delete(manifest_uri, options=self.options)
                    stale_removed = True
                storage.upload_tree(
                    src, step_uri, last=(), options=self.options, skip=done | {MANIFEST}, on_uploaded=done.add
                )
                remote = storage.list_tree(step_uri, options=self.options)
                missing = [f["path"] for f in manifest["files"] if remote.get(f["path"]) != f["size"]]
                if missing:
                    done.difference_update(missing)
                    raise StorageError(
                        f"checkpoint {step_uri}: {len(missing)} uploaded file(s) not found with the right size "
                        f"(first: {missing[0]}); uploading them again",
                        uri=step_uri,
                        retryable=True,
                    )
                storage.upload_file(src / MANIFEST, manifest_uri, options=self.options)
                break
            except StorageError as exc:
                attempt += 1
                delay = self._backoff(attempt)
                if not exc.retryable:
                    log.error("checkpoint step %d: upload failed permanently: %s", step, exc)
                    raise
                if time.monotonic() + delay > deadline:
                    log.error("checkpoint step %d: giving up after %d attempts: %s", step, attempt, exc)
                    raise
                log.warning(
                    "checkpoint step %d: upload attempt %d failed (%s); retrying in %.1fs",
                    step,
                    attempt,
                    exc,
                    delay,
                )
                if self._closing.wait(delay):
                    raise CheckpointUploadError(
                        f"checkpoint step {step}: store closed before the upload completed", [step]
                    ) from exc
        ref = CheckpointRef(step, step_uri, manifest)
        if self._staging is not None and src.parent.resolve() == self._staging.resolve():
            shutil.rmtree(src, ignore_errors=True)  # a staging copy made by step_dir(): no longer needed
        total = sum(f["size"] for f in manifest["files"])
        log.info(
            "checkpoint step %d complete at %s (%.1f MB, %.1fs, %d retries)",
            step,
            step_uri,
            total / 1e6,
            time.monotonic() - started,
            attempt,
        )
        self._after_complete(ref, keep_last, protect)
        return ref

    def _after_complete(self, ref: CheckpointRef, keep_last: int | None, protect: frozenset[int]) -> None:
        if keep_last is not None:
            try:
                self.prune(keep_last, protect)
            except (StorageError, OSError) as exc:  # pruning is best effort; the next one catches up
                log.warning("pruning checkpoints after step %d failed: %s", ref.step, exc)
        if self.on_complete is not None:
            try:
                self.on_complete(ref)
            except Exception:  # noqa: BLE001
                log.exception("on_complete callback failed for step %d", ref.step)

    def prune(self, keep_last: int, protect: Iterable[int] = ()) -> list[int]:
        """Delete old checkpoints; returns the steps deleted.

        Keeps the newest ``keep_last`` complete checkpoints and every step in ``protect`` (the best
        one). Deletes complete checkpoints older than those, and incomplete leftovers older than
        the latest complete one (newer incomplete ones may still be uploading). Steps this store is
        uploading are never touched. Manifests are deleted first.
        """
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        protected = set(protect)
        with self._lock:
            protected |= {s for s, f in self._futures.items() if not f.done()}
        with self._prune_lock:
            complete = self.complete_steps()
            if not complete:
                return []
            kept = set(complete[-keep_last:])
            oldest_kept = min(kept)
            latest = complete[-1]
            doomed = [
                s
                for s in self.all_steps()
                if s not in kept
                and s not in protected
                and ((s in complete and s < oldest_kept) or (s not in complete and s < latest))
            ]
            for step in doomed:
                storage.delete_tree(self.step_uri(step), options=self.options, first=(MANIFEST,))
                log.info("pruned checkpoint %s", self.step_uri(step))
            return doomed

    # --- background uploads ---

    def pending(self) -> int:
        """Number of background uploads not finished yet."""
        with self._lock:
            return sum(1 for f in self._futures.values() if not f.done())

    def wait(self, timeout: float | None = None) -> list[CheckpointRef]:
        """Wait for the background uploads; returns the checkpoints completed since the last wait.

        Raises :class:`TimeoutError` if some are still running after ``timeout`` seconds, and
        :class:`CheckpointUploadError` (chained to the first cause) if any finally failed; each
        failure is reported once.
        """
        with self._lock:
            futures = dict(self._futures)
        _done, not_done = concurrent.futures.wait(list(futures.values()), timeout=timeout)
        finished = {s: f for s, f in futures.items() if f.done()}
        with self._lock:
            for step, future in finished.items():
                if self._futures.get(step) is future:
                    del self._futures[step]
        refs = [f.result() for s, f in sorted(finished.items()) if f.exception() is None]
        failed = [(s, f.exception()) for s, f in sorted(finished.items()) if f.exception() is not None]
        if failed:
            steps = [s for s, _ in failed]
            first = failed[0][1]
            raise CheckpointUploadError(
                f"checkpoint upload failed for step(s) {steps}: {first}", steps
            ) from first
        if not_done:
            raise TimeoutError(f"{len(not_done)} checkpoint upload(s) still running after {timeout}s")
        return refs

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop accepting checkpoints; with ``wait`` flush the uploads first, else abandon retries."""
        try:
            if wait:
                self.wait(timeout)
        finally:
            self._closing.set()
            self._executor.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(wait=exc_info[0] is None)
