"""Every version of a FineTuneJob's status, with the local time it was seen (a watch, not polling)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from kubernetes import client, watch

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
PHASE_ORDER = ["Pending", "Initializing", "Running", "Succeeded"]


class StatusWatch:
    """Watch one FineTuneJob; ``seen`` is [(local time, status)], ``phases()`` the phase sequence."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str):
        self.custom = client.CustomObjectsApi(api)
        self.namespace, self.name = namespace, name
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self._watch = watch.Watch()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftj-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        resource_version = None
        while not self._stopped.is_set():
            try:
                for event in self._watch.stream(
                    self.custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    field_selector=f"metadata.name={self.name}",
                    resource_version=resource_version,
                    timeout_seconds=60,
                ):
                    obj = event["object"]
                    resource_version = obj["metadata"]["resourceVersion"]
                    self.seen.append((time.time(), json.loads(json.dumps(obj.get("status") or {}))))
                    if self._stopped.is_set():
                        return
            except Exception:  # noqa: BLE001 - e.g. 410 Gone: start over from now
                resource_version = None
                time.sleep(0.2)

    def stop(self) -> None:
        self._stopped.set()
        self._watch.stop()

    def phases(self) -> list[str]:
        out: list[str] = []
        for _, status in self.seen:
            phase = status.get("phase")
            if phase and (not out or out[-1] != phase):
                out.append(phase)
        return out
