"""The real node's sandbox image (pause), built without a registry or Docker.

An OCI archive that umoci builds from a busybox-static rootfs, cached under
$SPOTRUN_CACHE/images by IMAGE_FORMAT; the node imports it into its containerd. The images
the pods run are the Dockerfile's (imagebuild.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .build import cache_dir
from .console import say
from .processes import sh

PAUSE_IMAGE = "spotrun.local/pause:3.10"

PASSWD = """root:x:0:0:root:/root:/bin/sh
spotrun:x:10001:10001:spotrun:/home/spotrun:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP_FILE = "root:x:0:\nspotrun:x:10001:\nnogroup:x:65534:\n"
BUSYBOX_APPLETS = (
    "sh",
    "sleep",
    "cat",
    "ls",
    "env",
    "id",
    "ps",
    "kill",
    "nslookup",
    "wget",
    "true",
)


def _busybox_rootfs(rootfs: Path) -> None:
    for d in ("bin", "etc", "tmp", "home/spotrun", "root", "proc", "sys", "dev", "usr/lib64"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        link = rootfs / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text(PASSWD)
    (rootfs / "etc" / "group").write_text(GROUP_FILE)
    (rootfs / "tmp").chmod(0o1777)
    (rootfs / "root").chmod(0o755)
    os.chown(rootfs / "home" / "spotrun", 10001, 10001)


# name -> (reference, rootfs builder, umoci config args)
IMAGES: dict[str, tuple[str, Callable[[Path], None], tuple[str, ...]]] = {
    "pause": (
        PAUSE_IMAGE,
        _busybox_rootfs,
        (
            # A pause that exits on TERM/INT and reaps zombies through the shell's wait.
            "--config.entrypoint=/bin/sh",
            "--config.cmd=-c",
            "--config.cmd=trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done",
            "--config.user=65534:65534",
        ),
    ),
}
IMAGE_FORMAT = "2"  # bump when a builder above changes: cached archives are rebuilt


def image_archive(name: str) -> Path:
    return cache_dir() / "images" / f"{name}-{IMAGE_FORMAT}.tar"


def build_image(name: str) -> Path:
    """An OCI image archive built with umoci from a busybox-static rootfs, cached."""
    ref, builder, config = IMAGES[name]
    out = image_archive(name)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"image-{name}-", dir=out.parent))
    try:
        layout, bundle, tag = work / "layout", work / "bundle", ref.rsplit(":", 1)[1]
        sh("umoci", "init", f"--layout={layout}")
        sh("umoci", "new", f"--image={layout}:{tag}")
        sh("umoci", "unpack", f"--image={layout}:{tag}", str(bundle))
        builder(bundle / "rootfs")
        sh("umoci", "repack", f"--image={layout}:{tag}", str(bundle))
        sh(
            "umoci",
            "config",
            f"--image={layout}:{tag}",
            "--os=linux",
            "--architecture=amd64",
            *config,
        )
        sh("umoci", "gc", f"--layout={layout}")
        tmp = out.with_suffix(".tmp")
        sh("tar", "-C", str(layout), "-cf", str(tmp), ".")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"built image {ref} ({out})")
    return out
