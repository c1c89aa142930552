"""The operator's command line: which namespaces, peering, probes, metrics and log format.

`python -m spotrun_operator` is what the Deployment runs and what the cluster tests run;
it is `kopf run` with spotrun's defaults, so that nobody has to remember kopf's flags:
standalone (one replica; see docs/operator.md, "Peering"), JSON logs, metrics on.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import kopf

from spotrun_operator.config import METRICS_ADDRESS_ENV, Config

# Watch handlers that only wake a job's loop: kopf logs each call at INFO, one line per
# pod event, which would drown the operator's own transition logs.
QUIET_HANDLERS = ("pod_changed", "statefulset_changed", "node_changed", "trainjob_changed")


class QuietWakeups(logging.Filter):
    """Drops kopf's "Handler 'pod_changed' succeeded." lines (failures still pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.endswith(" succeeded.")
            and any(message.startswith(f"Handler '{name}'") for name in QUIET_HANDLERS)
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spotrun_operator",
        description="Runs the spotrun operator: reconciles TrainJobs (spotrun.dev/v1alpha1).",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="serve TrainJobs of this namespace only (repeatable; a glob such as 'team-*' works)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="serve every namespace (the default)"
    )
    p.add_argument(
        "--peering",
        metavar="NAME",
        default=os.environ.get("SPOTRUN_PEERING") or None,
        help="coordinate replicas through the ClusterKopfPeering NAME (default: standalone, "
        "for a single replica)",
    )
    p.add_argument(
        "--liveness",
        metavar="URL",
        default=os.environ.get("SPOTRUN_LIVENESS") or None,
        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz",
    )
    p.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        default=os.environ.get(METRICS_ADDRESS_ENV, "0.0.0.0:9090"),
        help=f"serve Prometheus /metrics here; empty for none (env {METRICS_ADDRESS_ENV})",
    )
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=float(os.environ.get("SPOTRUN_RESYNC_SECONDS", "60")),
        help="run each job's loop at least this often, events or not",
    )
    p.add_argument(
        "--log-format",
        choices=("json", "plain"),
        default=os.environ.get("SPOTRUN_LOG_FORMAT", "json"),
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(QuietWakeups())
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    config = Config(resync_seconds=args.resync_seconds, metrics_address=args.metrics_address)

    import spotrun_operator.main  # noqa: F401  (registers the handlers)

    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(config=config, peering=args.peering),
    )
    return 0
