"""Progress from the trainer to the FineTuneJob's status.

In a cluster the operator gives each job a ServiceAccount whose Role allows `get` and `patch` on
`finetunejobs/status` for that one job (resourceNames). Rank 0 merge-patches
`.status.progress`, `.status.checkpoint`, `.status.metrics` and `.status.artifacts`; the operator
owns every other status field. Patches go out from a background thread at most every
`min_interval` seconds (default 10 s, so the CR is never more than ~10 s behind the trainer);
failures are logged once and never stop training. Outside a cluster nothing is sent.

Environment: KUBETUNE_JOB_NAME, KUBETUNE_JOB_NAMESPACE (set by the operator), the standard
KUBERNETES_SERVICE_HOST/PORT, and the ServiceAccount token and CA at
KUBETUNE_SA_DIR (default /var/run/secrets/kubernetes.io/serviceaccount).
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class StatusReporter:
    """Rate-limited, non-blocking merge-patches of one FineTuneJob's status."""

    def __init__(self, url: str, token_file: Path, ca_file: Path | None, min_interval: float = 10.0):
        self.url = url
        self.token_file = token_file
        self.ca_file = ca_file
        self.min_interval = min_interval
        self._pending: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._last_sent = 0.0
        self._warned = False
        self._thread = threading.Thread(target=self._loop, name="kubetune-status", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls) -> StatusReporter | None:
        """A reporter when running in a pod of a FineTuneJob, else None."""
        name = os.environ.get("KUBETUNE_JOB_NAME")
        namespace = os.environ.get("KUBETUNE_JOB_NAMESPACE")
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        sa_dir = Path(os.environ.get("KUBETUNE_SA_DIR", SA_DIR))
        if not (name and namespace and host and (sa_dir / "token").exists()):
            return None
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        url = (
            f"https://{host}:{port}/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs/"
            f"{name}/status"
        )
        ca = sa_dir / "ca.crt"
        interval = float(os.environ.get("KUBETUNE_STATUS_INTERVAL", "10"))
        return cls(url, sa_dir / "token", ca if ca.exists() else None, interval)

    def report(self, force: bool = False, **fields: Any) -> None:
        """Queue status fields (progress=..., checkpoint=..., metrics=..., artifacts=...)."""
        with self._lock:
            self._pending.update({k: v for k, v in fields.items() if v is not None})
        if force or time.time() - self._last_sent >= self.min_interval:
            self._wake.set()

    def close(self, timeout: float = 30.0) -> None:
        """Send what is pending and stop the thread."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.min_interval)
            self._wake.clear()
            with self._lock:
                body, self._pending = self._pending, {}
            if body:
                if not self._send(body):
                    with self._lock:  # keep the newest values, retry later
                        self._pending = {**body, **self._pending}
            if self._stop:
                with self._lock:
                    if not self._pending:
                        return
                if not self._send(self._pending):
                    return

    def _send(self, fields: dict[str, Any]) -> bool:
        data = json.dumps({"status": fields}).encode()
        request = urllib.request.Request(
            self.url,
            data=data,
            method="PATCH",
            headers={
                "Content-Type": "application/merge-patch+json",
                "Authorization": f"Bearer {self.token_file.read_text().strip()}",
            },
        )
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as response:
                response.read()
            self._last_sent = time.time()
            return True
        except (urllib.error.URLError, OSError) as error:
            if not self._warned:
                detail = getattr(error, "code", None) or getattr(error, "reason", error)
                print(
                    f"[kubetune] cannot update the FineTuneJob status ({detail}); training goes on",
                    flush=True,
                )
                self._warned = True
            return False
