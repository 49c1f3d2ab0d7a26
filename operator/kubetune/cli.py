"""The `kubetune` command: run a FineTuneJob on this machine, validate it, estimate it.

Exit codes of every subcommand: 0 success; 3 the manifest, the data or an argument is invalid (the
message names the file, line or field); 4 storage or a service could not be reached, or credentials
are missing or refused (the message names the URI); 130 interrupted. No expected error prints a
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from kubetune.manifest import ManifestError, dump_job, load_job
from kubetune.spec import EXIT_CONFIG_ERROR

EXIT_UNAVAILABLE = 4  # storage, network or credentials: fix access (or pass estimate's overrides) and retry


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        job = load_job(args.manifest)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    spec = job.spec
    if args.platform_defaults:
        from kubetune.render import PlatformDefaults, RenderError, effective_spec

        try:
            defaults = PlatformDefaults.from_file(args.platform_defaults)
            namespace = args.namespace or job.metadata.namespace or "default"
            effective_spec(
                {
                    "metadata": {"name": job.metadata.name, "namespace": namespace},
                    "spec": dump_job(job)["spec"],
                },
                defaults,
            )
        except (RenderError, ValueError, OSError) as error:
            print(f"error: {args.manifest}: {error}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
    print(
        f"{args.manifest}: valid FineTuneJob {job.metadata.name!r}: {spec.method.type} {spec.task.type} on "
        f"{spec.model.source}, {len(spec.datasets)} dataset(s), exports {', '.join(spec.output.exports or [])}"
    )
    if args.show:
        import yaml

        print(yaml.safe_dump(dump_job(job), sort_keys=False))
    return 0


def _format_summary(summary: dict) -> str:
    from kubetune.cluster import held_out_lines

    metrics = summary["metrics"]
    minutes, seconds = divmod(int(summary["durationSeconds"]), 60)
    lines = [
        "",
        f"Finished {summary['job']}: {summary['steps']} steps, {summary['trainedTokens']:,} tokens trained "
        f"in {minutes}m{seconds:02d}s ({summary['tokensPerSecond']:.0f} tokens/s)",
    ]
    lines += held_out_lines(metrics, summary.get("objective"))
    for report in summary.get("data", {}).get("datasets", []):
        dropped = {
            k: report[k] for k in ("invalid", "empty", "duplicates", "too_short", "too_long") if report[k]
        }
        detail = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in dropped.items()) or "none dropped"
        lines.append(
            f"  data       {report['source']}: {report['kept']} of {report['read']} rows kept ({detail})"
        )
    for artifact in summary["artifacts"]:
        lines.append(
            f"  {artifact['kind']:<10} {artifact['uri']}  sha256:{artifact['sha256'][:12]}  "
            f"{artifact['sizeBytes']:,} bytes"
        )
    lines.append(f"  summary    {summary['output'].rstrip('/')}/summary.json")
    return "\n".join(lines)


def _cmd_run(args: argparse.Namespace) -> int:
    if args.nproc > 1:
        # Several local processes (DDP / DeepSpeed / FSDP over gloo on CPU) through torchrun.
        command = [
            sys.executable,
            "-m",
            "kubetune_trainer.launch",
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            "-m",
            "kubetune_trainer",
            "--config",
            args.manifest,
            "--resume",
            args.resume,
        ]
        if args.output:
            command += ["--output", args.output]
        code = subprocess.call(
            command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        )
        if code == 0:
            from kubetune import storage

            job = load_job(args.manifest)
            output = args.output or job.spec.output.uri or f"runs/{job.metadata.name}"
            summary = json.loads(storage.read_bytes(output.rstrip("/") + "/summary.json"))
            print(_format_summary(summary))
        return code
    from kubetune_trainer.__main__ import run_trainer

    code, summary = run_trainer(args.manifest, args.output, None, args.resume, show_progress=not args.quiet)
    if summary and not summary.get("preempted"):
        print(_format_summary(summary))
    return code


def _cmd_estimate(args: argparse.Namespace) -> int:
    from kubetune_trainer.estimate import main as estimate_main

    return estimate_main(args)


def _cmd_crd(args: argparse.Namespace) -> int:
    from kubetune.crd import render_yaml

    sys.stdout.write(render_yaml())
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from kubetune.spec import FineTuneJob

    print(json.dumps(FineTuneJob.model_json_schema(by_alias=True), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune", description="Fine-tune LLMs from a FineTuneJob manifest."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train on this machine (no cluster needed)")
    run.add_argument("manifest", help="FineTuneJob YAML")
    run.add_argument(
        "--output", help="output directory or s3://bucket/prefix (default: spec.output.uri or ./runs/<name>)"
    )
    run.add_argument(
        "--resume",
        choices=["auto", "latest", "never"],
        default="auto",
        help="continue from the latest complete checkpoint in the output (default auto)",
    )
    run.add_argument("--nproc", type=int, default=1, help="training processes on this machine (torchrun)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", help="check a manifest without running it")
    validate.add_argument("manifest")
    validate.add_argument("--show", action="store_true", help="print the manifest with defaults filled in")
    validate.add_argument(
        "--platform-defaults",
        metavar="FILE",
        help="also check the platform's defaults and tenant policy (the chart's defaults.yaml: "
        "kubectl get cm kubetune-defaults -o jsonpath='{.data.defaults\\.yaml}')",
    )
    validate.add_argument(
        "-n",
        "--namespace",
        help="the namespace the job would run in (for the policy's "
        "per-namespace prefixes; default: the manifest's)",
    )
    validate.set_defaults(func=_cmd_validate)

    estimate = sub.add_parser("estimate", help="tokens, steps, FLOPs, time, cost and memory of a job")
    estimate.add_argument("manifest", nargs="?")
    estimate.add_argument("--list-gpus", action="store_true", help="print the GPU table and exit")
    estimate.add_argument("--gpu", help="GPU type (see --list-gpus)")
    estimate.add_argument("--gpus", type=int, help="total GPUs (default: nodes x gpusPerNode)")
    estimate.add_argument("--mfu", type=float, help="model FLOPs utilization to assume (default per GPU)")
    estimate.add_argument(
        "--gpu-table", help="YAML/JSON file overriding the GPU table (TFLOPS, memory, price)"
    )
    estimate.add_argument("--calibrate", action="store_true", help="time a few real steps on this machine")
    estimate.add_argument("--json", action="store_true", help="print JSON")
    estimate.add_argument(
        "--model-config",
        metavar="PATH",
        help="the model's config.json (or its directory): no access to the model needed",
    )
    estimate.add_argument(
        "--tokens", type=int, metavar="N", help="training tokens per epoch: no access to the data needed"
    )
    estimate.add_argument(
        "--sequences",
        type=int,
        metavar="N",
        help="training sequences per epoch with --tokens (default: tokens / maxSeqLength)",
    )
    estimate.set_defaults(func=_cmd_estimate)

    crd = sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition")
    crd.set_defaults(func=_cmd_crd)
    schema = sub.add_parser("schema", help="print the JSON schema of a FineTuneJob")
    schema.set_defaults(func=_cmd_schema)

    from kubetune.cluster import add_cluster_commands  # submit, get, describe, watch, logs, ... on a cluster

    add_cluster_commands(sub)
    return parser


def _expected_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(invalid input, unavailable) exception types; the trainer's exist only where it is installed."""
    from kubetune.storage import StorageError

    invalid: tuple[type[BaseException], ...] = (ManifestError,)
    try:
        from kubetune_trainer.errors import ConfigError

        invalid += (ConfigError,)
    except ImportError:  # the operator image has no trainer
        pass
    return invalid, (StorageError,)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kubetune` console script: expected errors are one line and an exit code."""
    args = build_parser().parse_args(argv)
    invalid, unavailable = _expected_errors()
    try:
        return int(args.func(args) or 0)
    except invalid as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except unavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except FileNotFoundError as error:
        print(f"error: {error.filename or ''}: {error.strerror}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
