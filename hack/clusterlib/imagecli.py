"""The command line of hack/images: build, list and check the Dockerfile's images."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .console import PROG, Failure, fmt_secs, say
from .imagebuild import NAMES, RUN_NAMES, ensure, image_info, key, node_ref
from .imagecheck import check

HELP = """Builds the Dockerfile's images here, without a Docker engine (buildah), cached by content.

Images: base (the stand-in for python:3.11-slim-bookworm, from Debian packages), operator
and runtime (the Dockerfile's targets), examples (examples/Dockerfile, FROM runtime: the
node tier's training image). Each is kept in the OCI layout ${SPOTRUN_CACHE:-~/.cache/spotrun}/images/oci
under a key over everything its build reads; a build whose key is there does nothing.
Needs root. `hack/cluster up --real-node` imports operator, runtime and examples into its
node as spotrun.local/<image>:dev.

Usage:
  hack/images build [NAME...] [--rebuild NAME]   build what is not cached (default: all)
  hack/images list                               cached images: size, layers, build time
  hack/images check [NAME...]                    what each image must hold, and must not
  hack/images key NAME                           print NAME's content key (builds nothing)

See docs/images.md.
"""


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hack/images", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("build", help="build the images that are not cached")
    p.add_argument("names", nargs="*", metavar="NAME", choices=[[], *NAMES], help=", ".join(NAMES))
    p.add_argument(
        "--rebuild", action="append", default=[], metavar="NAME", help="build NAME even if cached"
    )
    sub.add_parser("list", help="the cached images")
    p = sub.add_parser("check", help="check what each image holds")
    p.add_argument("names", nargs="*", metavar="NAME", help=", ".join(RUN_NAMES))
    p = sub.add_parser("key", help="print an image's content key")
    p.add_argument("name", metavar="NAME", choices=NAMES)
    args = parser.parse_args(argv)
    PROG[0] = "images"
    try:
        if args.cmd == "build":
            keys = ensure(args.names, rebuild=args.rebuild)
            for name, k in keys.items():
                print(f"{name:12} {k}  {node_ref(name) if name in RUN_NAMES else ''}".rstrip())
        elif args.cmd == "key":
            print(key(args.name))
        elif args.cmd == "list":
            print(
                f"{'image':12} {'key':16} {'unpacked':>9} {'zstd':>9} {'layers':>6} "
                f"{'built in':>9}  digest"
            )
            for name in NAMES:
                k = key(name)
                try:
                    info = image_info(name, k)
                except Failure:
                    print(f"{name:12} {k:16} {'(not built)':>9}")
                    continue
                took = info["build_seconds"]
                print(
                    f"{name:12} {k:16} {info['unpacked'] / 1e9:8.2f}G "
                    f"{info['compressed'] / 1e9:8.2f}G {info['layers']:6} "
                    f"{fmt_secs(took) if took is not None else '-':>9}  {info['digest']}"
                )
        elif args.cmd == "check":
            problems = check(args.names or list(RUN_NAMES))
            for line in problems:
                print(line)
            return 1 if problems else 0
        return 0
    except Failure as e:
        say(str(e))
        return 1
    except KeyboardInterrupt:
        return 130
