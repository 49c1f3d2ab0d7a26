"""`kubetune-operator` (or `python -m kubetune.operator_main`): run the FineTuneJob operator.

Watches FineTuneJobs in the given namespaces (default: all), with a liveness endpoint for the
Deployment's probe (port 8081) and Prometheus metrics (port 8080, see kubetune.metrics). Several
replicas coordinate through kopf peering (`--peering NAME`, needs kopf's KopfPeering/ClusterKopfPeering
CRDs): only the highest-priority replica acts, the others stand by (`--priority auto` derives a
distinct priority from the pod's hostname). Without `--peering` it runs standalone (one replica).
With `--namespaced-rbac` the operator holds only Roles in its `--namespace`s and does not list or
watch namespaces and CRDs. Platform defaults come from `--defaults FILE` and KUBETUNE_DEFAULT_*
variables (see render.PlatformDefaults).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import socket
import sys
import zlib

import kopf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kubetune-operator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable; globs allowed); default: all namespaces",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--peering", metavar="NAME", help="coordinate replicas through this kopf peering object"
    )
    peering.add_argument("--standalone", action="store_true", help="no peering (one replica; default)")
    parser.add_argument(
        "--priority",
        type=_priority,
        default=0,
        help="peering priority of this replica, or 'auto' (from the hostname: distinct per pod)",
    )
    parser.add_argument(
        "--peering-lifetime",
        type=int,
        default=15,
        help="seconds a replica's peering record lives without a heartbeat: a standby takes over "
        "this long after the active replica died (kopf's default 60); default %(default)s",
    )
    parser.add_argument(
        "--namespaced-rbac",
        action="store_true",
        help="RBAC is Roles in the --namespace(s) only: do not list/watch namespaces and CRDs",
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("KUBETUNE_LIVENESS", "http://0.0.0.0:8081/healthz"),
        help="liveness endpoint URL (empty to disable); default %(default)s",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=8080,
        help="Prometheus /metrics port (0 to disable); default %(default)s",
    )
    parser.add_argument(
        "--metrics-address",
        default="0.0.0.0",
        help="address the metrics endpoint listens on; default %(default)s",
    )
    parser.add_argument(
        "--defaults", default=None, help="platform defaults YAML file (KUBETUNE_DEFAULTS_FILE)"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=None,
        help="seconds between reconciles of an idle job (KUBETUNE_RECONCILE_INTERVAL, default 60: a resync; watches wake a job for every change)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="reconciles running at once, each in a thread (KUBETUNE_RECONCILE_WORKERS, default 16)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.namespaced_rbac and (not args.namespace or any(set(n) & set("*?[]!,") for n in args.namespace)):
        parser.error("--namespaced-rbac needs exact --namespace names (no globs)")
    return args


def _priority(value: str) -> int:
    if value == "auto":
        return zlib.crc32((os.environ.get("HOSTNAME") or socket.gethostname()).encode()) % 1_000_000 + 1
    return int(value)


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena; with 16 reconcile threads parsing
    JSON the freed memory stays scattered over them (RSS grows with the number of jobs reconciled).
    Two arenas, as MALLOC_ARENA_MAX=2 would (must run before the threads start); no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Configure logging and the handlers, then run kopf until signalled."""
    args = parse_args(argv)
    _limit_malloc_arenas()
    if args.defaults:
        os.environ["KUBETUNE_DEFAULTS_FILE"] = args.defaults
    kopf.configure(debug=args.verbose, verbose=args.verbose)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    if not args.verbose:  # kopf logs every handler call at INFO
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    from kubetune import handlers, render  # registers the handlers

    try:
        defaults = render.PlatformDefaults.from_env()
    except (OSError, ValueError) as error:
        print(f"kubetune-operator: bad platform defaults: {error}", file=sys.stderr)
        return 2
    handlers.configure_operator(defaults, args.interval, args.workers)
    if args.namespaced_rbac:

        @kopf.on.startup(id="namespaced-rbac")
        def _no_cluster_scanning(settings: kopf.OperatorSettings, **_: object) -> None:
            settings.scanning.disabled = True  # no namespace/CRD observation: the namespaces are given

    if args.peering:

        @kopf.on.startup(id="peering-lifetime")
        def _peering_lifetime(settings: kopf.OperatorSettings, **_: object) -> None:
            # heartbeats every lifetime - 5..10 s; a dead replica's record expires after `lifetime`
            settings.peering.lifetime = args.peering_lifetime

    if args.metrics_port:
        from kubetune import metrics

        metrics.serve(args.metrics_port, args.metrics_address)
    namespaces = [] if args.all_namespaces else list(args.namespace)
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
