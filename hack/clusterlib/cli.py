"""The command line of hack/cluster: its subcommands, their flags, and exit codes.

Only parsing and dispatch live here; each subcommand is a call into build, controlplane or
node. HELP is the text `hack/cluster --help` prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .build import BINARIES, build, ensure
from .console import Failure, say
from .controlplane import create_node, down, is_up, status, up
from .node import node_deps, print_node_env
from .rundir import RunDir, default_run_dir

HELP = """Builds pinned Kubernetes binaries from their Go modules and runs a local control plane.

Why this exists: the cluster tier of the tests needs a real API server, real controllers and
a real scheduler, but this project runs without Docker (no kind). Every binary comes from the
published Go modules at a pinned version, is built once, and is cached outside the repo in
${SPOTRUN_CACHE:-~/.cache/spotrun}/bin/<name>-<version>/<name>. The control plane listens on
free 127.0.0.1 ports only; KWOK plays the kubelet of fake spot GPU nodes.

Usage:
  hack/cluster build [NAME...]        build every binary (or only NAME...) that is not cached
  hack/cluster bin NAME               print the path of binary NAME, building it if missing
  hack/cluster versions               print the pinned version of every binary
  hack/cluster up [--nodes N] [--run-dir DIR]
  hack/cluster add-node NAME [--gpus N] [--label K=V]... [--run-dir DIR]
  hack/cluster env [--run-dir DIR]    print `export KUBECONFIG=...`
  hack/cluster status [--run-dir DIR]
  hack/cluster down [--run-dir DIR]   stop everything `up` started, even after a failed `up`

See docs/cluster.md.
"""


def parse_labels(values: Sequence[str]) -> dict[str, str]:
    labels = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep:
            raise Failure(f"--label wants KEY=VALUE, got {v!r}")
        labels[key] = val
    return labels


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hack/cluster",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("build", help="build pinned binaries that are not cached")
    p.add_argument("names", nargs="*", metavar="NAME", help=", ".join(BINARIES))
    p = sub.add_parser("bin", help="print a binary's path, building it if missing")
    p.add_argument("name", metavar="NAME", choices=list(BINARIES))
    sub.add_parser("versions", help="print pinned versions")
    sub.add_parser("node-deps", help="apt-get install the real node's Debian packages if missing")
    for cmd, help_ in (
        ("up", "start the local control plane and KWOK nodes"),
        ("down", "stop everything `up` started"),
        ("status", "show processes, ports and health"),
        ("env", "print `export KUBECONFIG=...`"),
        ("add-node", "add a KWOK GPU node"),
    ):
        p = sub.add_parser(cmd, help=help_)
        p.add_argument(
            "--run-dir", type=Path, default=None, help="default: $SPOTRUN_CACHE/run/cluster"
        )
        if cmd == "up":
            p.add_argument(
                "--nodes", type=int, default=None, help="KWOK GPU nodes (4; 0 with --real-node)"
            )
            p.add_argument(
                "--real-node",
                action="store_true",
                help="also run a real node: containerd, runc, CNI bridge, CoreDNS, kubelet (root)",
            )
        if cmd == "add-node":
            p.add_argument("node", metavar="NAME")
            p.add_argument("--gpus", type=int, default=8)
            p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            build(args.names)
        elif args.cmd == "bin":
            print(ensure(args.name))
        elif args.cmd == "node-deps":
            node_deps()
        elif args.cmd == "versions":
            for name, b in BINARIES.items():
                print(f"{name:24} {b.group.module}@{b.group.version}")
        else:
            run = RunDir(args.run_dir or default_run_dir())
            if args.cmd == "up":
                up(run, args.nodes, args.real_node)
            elif args.cmd == "down":
                down(run)
            elif args.cmd == "status":
                return 0 if status(run) else 1
            elif args.cmd == "env":
                if not run.kubeconfig.exists():
                    raise Failure(f"no cluster in {run.root}; run `hack/cluster up` first")
                print(f"export KUBECONFIG={run.kubeconfig}")
                print_node_env(run)
            elif args.cmd == "add-node":
                if not is_up(run):
                    raise Failure(f"no running cluster in {run.root}; run `hack/cluster up` first")
                create_node(run, args.node, args.gpus, parse_labels(args.label))
                say(f"node {args.node} is Ready with nvidia.com/gpu={args.gpus}")
        return 0
    except Failure as e:
        say(str(e))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early, e.g. `hack/cluster status | head`
        sys.stderr.close()
        return 0
