"""`python -m kubetune_trainer.launch TORCHRUN_ARGS`: torchrun whose exit code is the workers'.

torchrun exits 1 whenever a worker fails, whatever the worker's own code. The operator decides from
the pod's exit code (spec.EXIT_*): 3, a configuration or data error, must not be retried, and 143, a
preemption after a checkpoint was saved, must not count as a failure. This wrapper runs torchrun's
own `run()` unchanged and, when workers failed, exits with the code that matters most: 3 if any
worker exited 3, else 143 if any exited 143, else the first failed worker's code. SIGTERM to the
launcher (the pod being stopped) ends it with 143 once torchrun has stopped the workers.
"""

from __future__ import annotations

import sys

from kubetune.spec import EXIT_CONFIG_ERROR, EXIT_PREEMPTED, EXIT_RETRYABLE


def exit_code_of(codes: list[int]) -> int:
    """The launcher's exit code from the failed workers' exit codes (negative: killed by a signal)."""
    for code in (EXIT_CONFIG_ERROR, EXIT_PREEMPTED):
        if code in codes:
            return code
    return next((c for c in codes if c > 0), EXIT_RETRYABLE)


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with `argv`; return the exit code the pod should end with."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as error:
        codes = [failure.exitcode for failure in error.failures.values()]
        code = exit_code_of(codes)
        print(f"[kubetune] worker exit codes {sorted(codes)}: exiting {code}", file=sys.stderr, flush=True)
        return code
    except SignalException as error:
        print(
            f"[kubetune] launcher stopped by {error.sigval.name}: workers stopped",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
