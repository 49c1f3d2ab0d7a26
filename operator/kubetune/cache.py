"""A watch-fed cache of FineTuneJobs, worker Jobs and worker pods (what client-go's informers are).

kopf already watches the three kinds (a list, then a watch from the list's resourceVersion, again
after every disconnect or `410 Gone`). `install_watch_hook` taps that stream: every raw event updates
this store before kopf dispatches it, and each (re)listing replaces what the store holds for that
kind and namespace, so objects deleted while no watch was open (an expired watch, an API server
restart) do not linger. The reconcile loop reads from here instead of GET/LIST: a job whose loop
wakes up for a resync costs no request.

Read-your-writes: the operator records what its own writes returned (`record`: a created Job, a
patched FineTuneJob status) and what it deleted (`record_deleting`), and an object is replaced only
by a newer resourceVersion, so the next reconcile never decides on a state older than its own last
write even while the watch event is still on its way. Until a kind's first listing is complete the
store is not `synced` and callers read from the API (and `record` what they read).

Objects are kept as compact JSON (slimmed: no managedFields; Jobs and pods only the fields the
operator reads), parsed on each read: memory stays small with 10,000 jobs and every read is a copy.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kubetune.operator")

FTJ, JOBS, PODS = "finetunejobs", "jobs", "pods"
# (api group, plural) -> kind key of this cache
WATCHED: dict[tuple[str, str], str] = {("kubetune.io", FTJ): FTJ, ("batch", JOBS): JOBS, ("", PODS): PODS}
_DELETING = "1970-01-01T00:00:00Z"  # placeholder deletionTimestamp of an object this process deleted


def _rv(obj: Mapping[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):  # resourceVersions are opaque; etcd's are integers
        return 0


def _slim_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    keep = (
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "labels",
        "ownerReferences",
        "deletionTimestamp",
        "creationTimestamp",
    )
    return {k: meta[k] for k in keep if k in meta}


def slim(kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator reads of an object (Jobs: spec.suspend/completions/parallelism, status; pods:
    spec.nodeName, status; FineTuneJobs: everything but managedFields)."""
    meta = dict(obj.get("metadata") or {})
    if kind == FTJ:
        meta.pop("managedFields", None)
        return {**obj, "metadata": meta}
    spec = obj.get("spec") or {}
    if kind == JOBS:
        kept = {k: spec[k] for k in ("suspend", "completions", "parallelism") if k in spec}
    else:
        kept = {k: spec[k] for k in ("nodeName", "schedulerName") if k in spec}
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": _slim_meta(meta),
        "spec": kept,
        "status": obj.get("status") or {},
    }


@dataclass
class _Entry:
    rv: int
    owner: str  # the kubetune.io/job-name label (the FineTuneJob's name; its own name for FineTuneJobs)
    data: bytes


@dataclass
class _Kind:
    objects: dict[tuple[str, str], _Entry] = field(default_factory=dict)  # (namespace, name) -> entry
    by_owner: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (namespace, owner) -> names
    synced: set[str | None] = field(default_factory=set)  # namespaces listed (None: cluster-wide)
    listing: dict[str | None, set[tuple[str, str]]] = field(default_factory=dict)  # being listed -> seen


class ObjectCache:
    """Thread-safe store; written from kopf's event loop, read from the reconcile threads."""

    def __init__(self, owner_label: str):
        self.owner_label = owner_label
        self._lock = threading.Lock()
        self._kinds: dict[str, _Kind] = {FTJ: _Kind(), JOBS: _Kind(), PODS: _Kind()}
        self.relists: dict[str, int] = {FTJ: 0, JOBS: 0, PODS: 0}  # completed listings per kind

    # ----- fed by the watch -----
    def begin_listing(self, kind: str, namespace: str | None) -> None:
        """A (re)listing of `kind` starts: what it does not bring is dropped when it ends."""
        with self._lock:
            self._kinds[kind].listing[namespace] = set()

    def listed(self, kind: str, namespace: str | None) -> None:
        """The listing is complete: drop what it did not contain; the kind is synced for `namespace`."""
        with self._lock:
            store = self._kinds[kind]
            seen = store.listing.pop(namespace, set())
            gone = [k for k in store.objects if (namespace is None or k[0] == namespace) and k not in seen]
            for key in gone:
                self._remove(store, key)
            dropped = len(gone)
            relisted = namespace in store.synced
            store.synced.add(namespace)
            self.relists[kind] += 1
            held = len(store.objects)
        if relisted:  # a watch expired (410 Gone), the API server restarted, or this replica resumed
            log.info(
                "relisted %s%s: %d held, %d dropped",
                kind,
                f" in {namespace}" if namespace else "",
                held,
                dropped,
            )

    def apply_event(self, kind: str, event_type: str | None, obj: Mapping[str, Any]) -> None:
        """One raw watch event (type None: an object of a listing)."""
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        with self._lock:
            store = self._kinds[kind]
            for seen in store.listing.values():
                seen.add(key)
            current = store.objects.get(key)
            if current is not None and current.rv > _rv(obj):
                return  # older than what this process wrote (or a newer event already brought)
            if event_type == "DELETED":
                self._remove(store, key)
            else:
                self._put(kind, store, key, obj)

    # ----- the operator's own writes -----
    def record(self, kind: str, obj: Mapping[str, Any]) -> None:
        """An object as an API response returned it (own create/patch, or a read while unsynced)."""
        self.apply_event(kind, "MODIFIED", obj)

    def record_deleting(self, kind: str, namespace: str, name: str) -> None:
        """This process asked to delete it: until the watch says more, read it as being deleted."""
        with self._lock:
            store = self._kinds[kind]
            entry = store.objects.get((namespace, name))
            if entry is None:
                return
            obj = json.loads(entry.data)
            obj["metadata"].setdefault("deletionTimestamp", _DELETING)
            entry.data = json.dumps(obj, separators=(",", ":")).encode()

    def record_gone(self, kind: str, namespace: str, name: str) -> None:
        """The API server answered 404 for it."""
        with self._lock:
            self._remove(self._kinds[kind], (namespace, name))

    # ----- reads -----
    def synced(self, kind: str, namespace: str) -> bool:
        """Whether a complete listing of `kind` covering `namespace` has been seen."""
        with self._lock:
            synced = self._kinds[kind].synced
            return None in synced or namespace in synced

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A copy of the object, or None."""
        with self._lock:
            entry = self._kinds[kind].objects.get((namespace, name))
            data = entry.data if entry else None
        return json.loads(data) if data is not None else None

    def owned(self, kind: str, namespace: str, owner: str) -> list[dict[str, Any]]:
        """Copies of the objects labelled `<owner_label>: owner` in `namespace`."""
        with self._lock:
            store = self._kinds[kind]
            names = sorted(store.by_owner.get((namespace, owner), ()))
            blobs = [store.objects[(namespace, n)].data for n in names]
        return [json.loads(b) for b in blobs]

    def size(self) -> dict[str, int]:
        """Objects held per kind."""
        with self._lock:
            return {kind: len(store.objects) for kind, store in self._kinds.items()}

    # ----- internals (lock held) -----
    def _owner_of(self, kind: str, obj: Mapping[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        if kind == FTJ:
            return str(meta.get("name") or "")
        return str((meta.get("labels") or {}).get(self.owner_label) or "")

    def _put(self, kind: str, store: _Kind, key: tuple[str, str], obj: Mapping[str, Any]) -> None:
        old = store.objects.get(key)
        owner = self._owner_of(kind, obj)
        if old is not None and old.owner != owner:
            self._unindex(store, key, old.owner)
        store.objects[key] = _Entry(
            _rv(obj), owner, json.dumps(slim(kind, obj), separators=(",", ":")).encode()
        )
        store.by_owner.setdefault((key[0], owner), set()).add(key[1])

    def _remove(self, store: _Kind, key: tuple[str, str]) -> None:
        old = store.objects.pop(key, None)
        if old is not None:
            self._unindex(store, key, old.owner)

    @staticmethod
    def _unindex(store: _Kind, key: tuple[str, str], owner: str) -> None:
        names = store.by_owner.get((key[0], owner))
        if names is not None:
            names.discard(key[1])
            if not names:
                del store.by_owner[(key[0], owner)]


EventHandler = Callable[[str, "str | None", Mapping[str, Any]], None]


class WatchTap:
    """What the watch hook feeds: the cache, the operator's event handler, kopf's pause switch."""

    def __init__(self, cache: ObjectCache, on_event: EventHandler | None = None):
        self.cache = cache
        # called with (kind, event type, object) after the cache took the event; None for listed objects
        self.on_event = on_event
        # kopf's "operator paused" toggles (peering: another replica is active), once a watch started
        self.operator_paused: Any = None

    def paused(self) -> bool:
        """Whether kopf paused this replica (a standby under peering): it must not act."""
        return self.operator_paused is not None and self.operator_paused.is_on()

    async def wait_until_active(self) -> None:
        """Return once this replica is not paused."""
        if self.paused():
            await self.operator_paused.wait_for(False)


def install_watch_hook(tap: WatchTap, watching: Any = None) -> None:
    """Tap kopf's watch streams (`kopf._cogs.clients.watching`, kopf 1.45): each raw event of a
    watched kind goes into `tap.cache`, then to `tap.on_event`; listings replace what the cache held.

    With an `on_event` handler the events of the watched kinds stop there: kopf sees only the end of
    each listing, so it keeps no per-object state (a worker task, a memory, a body) for 10,000
    FineTuneJobs and their Jobs and pods; it still lists, watches, reconnects after 410 Gone,
    pauses the streams under peering, and runs the probes. kopf has no public hook for raw events
    nor for the end of a listing (its indexes are not replaced on a relist, so a deletion missed
    during a watch gap would stay in them); this wraps the two functions that produce both and the
    pause switch. Raises if kopf's internals changed."""
    if watching is None:
        from kopf._cogs.clients import watching
    original = watching.continuous_watch
    if getattr(original, "_kubetune_tap", None) is not None:
        original._kubetune_tap = tap
        watching.infinite_watch._kubetune_tap = tap
        return
    original_infinite = watching.infinite_watch
    listed_mark = watching.Bookmark.LISTED

    async def infinite_watch(*, operator_paused: Any = None, **kwargs: Any) -> AsyncIterator[Any]:
        if operator_paused is not None:
            infinite_watch._kubetune_tap.operator_paused = operator_paused  # type: ignore[attr-defined]
        async for event in original_infinite(operator_paused=operator_paused, **kwargs):
            yield event

    async def continuous_watch(
        *, settings: Any, resource: Any, namespace: str | None, operator_pause_waiter: Any
    ) -> AsyncIterator[Any]:
        kind = WATCHED.get((resource.group, resource.plural))
        current: WatchTap = continuous_watch._kubetune_tap  # type: ignore[attr-defined]
        if kind is not None:
            current.cache.begin_listing(kind, namespace)
        async for event in original(
            settings=settings,
            resource=resource,
            namespace=namespace,
            operator_pause_waiter=operator_pause_waiter,
        ):
            if kind is not None:
                if event is listed_mark:
                    current.cache.listed(kind, namespace)
                elif (
                    isinstance(event, Mapping)
                    and isinstance(event.get("object"), Mapping)
                    and event.get("type") in (None, "ADDED", "MODIFIED", "DELETED")
                ):
                    current.cache.apply_event(kind, event.get("type"), event["object"])
                    if current.on_event is not None:
                        try:
                            current.on_event(kind, event.get("type"), event["object"])
                        except Exception:  # one bad object must not end the watch of all of them
                            log.exception("handling a %s watch event failed", kind)
                        continue
            yield event

    wrappers: list[tuple[Any, Any]] = [(original, continuous_watch), (original_infinite, infinite_watch)]
    for function, wrapper in wrappers:
        wrapper._kubetune_tap = tap
        wrapper._kubetune_original = function
    watching.continuous_watch = continuous_watch
    watching.infinite_watch = infinite_watch
