"""The Dockerfile's images, built without a Docker engine: buildah, on a base made by mmdebstrap.

Why this exists: the chart's operator image and the runtime image are what a user builds
with `docker build`; no Docker engine (nor registry) runs here, so `hack/images build`
builds the same Dockerfile, unchanged, with buildah (daemonless, Debian's package), and
`hack/cluster up --real-node` imports the result into the node's containerd.

- `base`: the stand-in for `python:3.11-slim-bookworm`, which cannot be pulled here:
  Debian bookworm's python3.11 (minbase + ca-certificates, netbase, tzdata, python3-venv,
  python-is-python3) made by mmdebstrap, with pip, setuptools and wheel installed into
  /usr/local as the official image has them, passed to the build as PYTHON_IMAGE.
- `operator`, `runtime`: the Dockerfile's two targets.
- `examples`: examples/Dockerfile, built FROM the runtime image, with the examples/ package:
  the image the node tier's training pods run.

Every image is cached by content: its key is a sha256 over what a build reads (the
Dockerfile, the build context after .dockerignore, the target, the key of the image it
is built FROM, buildah's version), so a second `build` with nothing changed does nothing.
Images are kept as tags `<name>-<key>` of one OCI layout, $SPOTRUN_CACHE/images/oci, whose
blobs the images share (the examples image adds a layer to the runtime image's), their layers
zstd-compressed. Only the newest key of each image is kept, and buildah's own storage keeps
only the base between builds (the runtime image would take its 6 GB twice). See
docs/images.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .build import build_lock, cache_dir
from .console import Failure, fmt_secs, say
from .context import context_digest

REPO = Path(__file__).resolve().parents[2]

# Debian bookworm's packages, checked at every build (apt-get installs them when missing):
# command -> (package, the upstream version `--version` must print).
TOOLS = {
    "buildah": ("buildah", "1.28.2"),  # Debian 1.28.2+ds1-3+deb12u1+b3
    "mmdebstrap": ("mmdebstrap", "1.3.5"),  # Debian 1.3.5-7
    "zstd": ("zstd", "1.5.4"),  # Debian 1.5.4+dfsg2-5; the layout's layers are zstd
}

REGISTRY = "spotrun.local"
# Bump when how images are built or stored changes: every key changes with it.
FORMAT = "1"
GB = 1e9

# Where buildah keeps its images and containers. Outside $SPOTRUN_CACHE on purpose: overlay
# layers (whiteouts, xattrs) do not survive a CI cache's tar, and the OCI layout in the
# cache is what is kept; a fresh machine loads from it.
BUILDAH_ROOT = Path(os.environ.get("SPOTRUN_BUILDAH_ROOT") or "/var/lib/spotrun/buildah")

BASE_SUITE = "bookworm"
BASE_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = (
    "ca-certificates",
    "netbase",
    "tzdata",
    "python3",
    "python3-venv",
    "python-is-python3",
    "python3-wheel-whl",
)
# Run in the new root by mmdebstrap. The official image's Python is not the distribution's:
# pip, setuptools and wheel live in its prefix, and pip may uninstall them (the operator
# target does). Here: Debian's own wheels of them into /usr/local, and no PEP 668 marker.
BASE_HOOK = """set -eu
for whl in /usr/share/python-wheels/pip-*.whl; do pip_whl="$whl"; done
python3 "$pip_whl/pip" install --no-index --no-cache-dir --break-system-packages \\
  --no-warn-script-location --disable-pip-version-check \\
  /usr/share/python-wheels/pip-*.whl /usr/share/python-wheels/setuptools-*.whl \\
  /usr/share/python-wheels/wheel-*.whl
rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
python -m pip --version
"""
BASE_DPKG_OPTS = (
    # As the slim images: no manuals, docs (but their copyright files) or translations.
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
)
BASE_CONFIG = {
    "Env": [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG=C.UTF-8",
    ],
    "Cmd": ["python3"],
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One image of a Dockerfile: where it is, which target, and what it is built FROM."""

    name: str  # the repository part of its reference: spotrun.local/<name>
    dockerfile: str  # relative to the repository
    context: str
    target: str | None
    parent: str  # "base" or another Spec's key in SPECS
    parent_arg: str  # the ARG its FROM reads
    # Other images its stages are built FROM: ARG -> image ("base" or a key of SPECS).
    also: tuple[tuple[str, str], ...] = ()
    # What of the context its key reads: None for all of it, else a function of the
    # context's root to the bytes the build's output depends on.
    inputs: Callable[[Path], bytes] | None = None
    # Whether it is an image pods run (checked by imagecheck), not only one built FROM.
    runs: bool = True
    # Disk a build of it takes at its peak (buildah's storage and TMPDIR), in GB.
    scratch_gb: float = 3.0


SCRATCH_DEPS_GB = 23.0  # measured: 21 GB at the peak of its commit


def _dependencies(context: Path) -> bytes:
    """pyproject.toml's [build-system] and [project] tables: all runtime-deps reads of it
    (the tools' settings there do not change what pip installs)."""
    data = tomllib.loads((context / "pyproject.toml").read_text())
    wanted = {k: data.get(k) for k in ("build-system", "project")}
    return json.dumps(wanted, sort_keys=True).encode()


SPECS: dict[str, Spec] = {
    "operator": Spec("spotrun-operator", "Dockerfile", ".", "operator", "base", "PYTHON_IMAGE"),
    # torch and the rest of the `runtime` extra, a layer that changes only with them.
    "runtime-deps": Spec(
        "spotrun-deps",
        "Dockerfile",
        ".",
        "runtime-deps",
        "base",
        "PYTHON_IMAGE",
        inputs=_dependencies,
        scratch_gb=SCRATCH_DEPS_GB,
        runs=False,
    ),
    "runtime": Spec(
        "spotrun-runtime",
        "Dockerfile",
        ".",
        "runtime",
        "runtime-deps",
        "RUNTIME_DEPS_IMAGE",
        also=(("PYTHON_IMAGE", "base"),),
    ),
    "examples": Spec(
        "spotrun-examples", "examples/Dockerfile", "examples", None, "runtime", "RUNTIME_IMAGE"
    ),
}
RUN_NAMES = tuple(n for n, spec in SPECS.items() if spec.runs)
BASE_NAME = "python"
NAMES = ("base", *SPECS)


def image_name(name: str) -> str:
    return BASE_NAME if name == "base" else SPECS[name].name


# -- keys ------------------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def base_key() -> str:
    """The base's recipe. The mirror's packages move on (security updates), the key does not:
    the base is rebuilt when its recipe changes, or with `hack/images build --rebuild base`."""
    recipe = {
        "format": FORMAT,
        "mmdebstrap": TOOLS["mmdebstrap"][1],
        "suite": BASE_SUITE,
        "packages": BASE_PACKAGES,
        "hook": BASE_HOOK,
        "dpkg": BASE_DPKG_OPTS,
        "config": BASE_CONFIG,
    }
    return _digest(recipe)[:16]


def key(name: str, repo: Path = REPO) -> str:
    """The content key of image NAME: what its build reads, and its parent's key."""
    if name == "base":
        return base_key()
    spec = SPECS[name]
    context = repo / spec.context
    inputs = {
        "format": FORMAT,
        "buildah": TOOLS["buildah"][1],
        "dockerfile": (repo / spec.dockerfile).read_text(),
        "target": spec.target,
        "parent": key(spec.parent, repo),
        "also": {arg: key(image, repo) for arg, image in spec.also},
        "context": (
            hashlib.sha256(spec.inputs(context)).hexdigest()
            if spec.inputs
            else context_digest(context)
        ),
    }
    return _digest(inputs)[:16]


# -- tools -----------------------------------------------------------------------------------


def _version(cmd: str) -> str:
    proc = subprocess.run([cmd, "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"(\d+\.\d+\.\d+)", proc.stdout + proc.stderr)
    return m.group(1) if m else "?"


def ensure_tools() -> None:
    """buildah and mmdebstrap at their pinned versions (apt-get installs them if missing)."""
    if os.geteuid() != 0:
        raise Failure(
            "hack/images needs root: buildah runs here without user namespaces (and "
            "mmdebstrap installs packages into a new root). Run it as root, e.g. sudo."
        )
    missing = [pkg for cmd, (pkg, _) in TOOLS.items() if shutil.which(cmd) is None]
    if missing:
        say(f"installing {' '.join(missing)} (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for apt in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            proc = subprocess.run(apt, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                raise Failure(f"`{' '.join(apt)}` failed:\n{proc.stderr.strip()[-2000:]}")
    for tool, (pkg, want) in TOOLS.items():
        got = _version(tool)
        if got != want:
            raise Failure(
                f"{tool} is {got}, and hack/images is pinned to {want} (Debian bookworm's "
                f"{pkg}); install that one, or move the pin in hack/clusterlib/imagebuild.py "
                "(every image is then rebuilt)"
            )


def _buildah_cmd() -> list[str]:
    return [
        "buildah",
        f"--root={BUILDAH_ROOT / 'storage'}",
        f"--runroot={BUILDAH_ROOT / 'run'}",
        "--storage-driver=overlay",
    ]


def _buildah_env() -> dict[str, str]:
    """buildah's environment: its temporary files beside its storage. A commit copies the
    new layer twice into TMPDIR (/var/tmp by default), which may be a smaller filesystem."""
    tmp = BUILDAH_ROOT / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def buildah(
    *args: str, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [*_buildah_cmd(), *args]
    proc = subprocess.run(
        cmd, text=True, capture_output=True, check=False, cwd=cwd, env=_buildah_env()
    )
    if check and proc.returncode != 0:
        raise Failure(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr or ''}")
    return proc


# -- the OCI layout in the cache ----------------------------------------------------------------


def layout_dir() -> Path:
    return cache_dir() / "images" / "oci"


def tag(name: str, k: str) -> str:
    return f"{image_name(name)}-{k}"


def node_ref(name: str) -> str:
    """The image's name on the real node (`hack/cluster up --real-node` imports it so)."""
    return f"{REGISTRY}/{image_name(name)}:dev"


def local_ref(name: str, k: str) -> str:
    """The image's name in buildah's storage."""
    return f"{REGISTRY}/{image_name(name)}:{k}"


REF_NAME = "org.opencontainers.image.ref.name"


def ref_name(descriptor: dict[str, Any]) -> str:
    """The tag an index entry has in a layout (its ref.name annotation)."""
    return str((descriptor.get("annotations") or {}).get(REF_NAME, ""))


def _read_index(layout: Path) -> dict[str, Any]:
    path = layout / "index.json"
    if not path.exists():
        return {"schemaVersion": 2, "manifests": []}
    index: dict[str, Any] = json.loads(path.read_text())
    return index


def _write_index(layout: Path, index: dict[str, Any]) -> None:
    tmp = layout / "index.json.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, layout / "index.json")


def blob_path(digest: str, layout: Path | None = None) -> Path:
    algo, hexdigest = digest.split(":", 1)
    return (layout or layout_dir()) / "blobs" / algo / hexdigest


def manifest_of(tag_name: str, layout: Path | None = None) -> dict[str, Any] | None:
    """The descriptor of TAG_NAME in the layout's index (None when it is not there)."""
    layout = layout or layout_dir()
    for m in _read_index(layout)["manifests"]:
        if ref_name(m) == tag_name:
            return dict(m)
    return None


def read_json_blob(digest: str, layout: Path | None = None) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(blob_path(digest, layout).read_text())
    return data


def reachable(layout: Path, descriptors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every blob descriptor under DESCRIPTORS (manifests, configs, layers), each once."""
    seen: dict[str, dict[str, Any]] = {}
    todo = list(descriptors)
    while todo:
        d = todo.pop()
        if d["digest"] in seen:
            continue
        seen[d["digest"]] = d
        media = d.get("mediaType", "")
        if media.endswith("manifest.v1+json") or media.endswith("image.index.v1+json"):
            body = read_json_blob(d["digest"], layout)
            todo.extend(body.get("manifests", []))
            if "config" in body:
                todo.append(body["config"])
            todo.extend(body.get("layers", []))
    return list(seen.values())


def gc_layout(layout: Path) -> None:
    """Deletes every blob of LAYOUT that no tag of its index reaches."""
    live = {d["digest"] for d in reachable(layout, _read_index(layout)["manifests"])}
    blobs = layout / "blobs" / "sha256"
    for blob in blobs.iterdir() if blobs.is_dir() else []:
        if f"sha256:{blob.name}" not in live:
            blob.unlink()


# -- building ----------------------------------------------------------------------------------


def metadata_path(name: str, k: str) -> Path:
    return cache_dir() / "images" / f"{tag(name, k)}.json"


def cached(name: str, k: str | None = None) -> bool:
    return manifest_of(tag(name, k or key(name))) is not None


def _in_storage(ref: str) -> bool:
    return buildah("inspect", "--type=image", ref, check=False).returncode == 0


def _ca_bundle() -> str | None:
    """This machine's CA bundle, bind-mounted (read-only) into the build's RUN steps only.

    The images trust only their own CAs; where a TLS proxy stands between this machine and
    PyPI, pip in the build needs the machine's. Nothing of it is written into a layer.
    """
    for path in (os.environ.get("SPOTRUN_BUILD_CA_BUNDLE"), "/etc/ssl/certs/ca-certificates.crt"):
        if path and Path(path).is_file():
            return path
    return None


def _load(name: str, k: str) -> None:
    """Puts image NAME (KEY) into buildah's storage from the layout, if it is not there."""
    ref = local_ref(name, k)
    if not _in_storage(ref):
        # Relative to the layout's parent: buildah 1.28 misreads `oci:` references whose
        # path has a dotted component (~/.cache) as registry names ("invalid reference").
        layout = layout_dir()
        buildah("pull", "--quiet", f"oci:{layout.name}:{tag(name, k)}", cwd=layout.parent)
        buildah("tag", _pulled_id(tag(name, k)), ref)


def _pulled_id(tag_name: str) -> str:
    desc = manifest_of(tag_name)
    assert desc is not None
    config = read_json_blob(desc["digest"])["config"]["digest"]
    return str(config.split(":", 1)[1])


def _push(name: str, k: str) -> None:
    layout = layout_dir()
    layout.mkdir(parents=True, exist_ok=True)
    buildah(
        "push",
        "--quiet",
        # zstd: buildah 1.28 compresses layers pushed to an OCI layout whatever
        # --disable-compression says, and zstd takes a third less time than gzip here.
        "--compression-format=zstd",
        "--format=oci",
        local_ref(name, k),
        f"oci:{layout}:{tag(name, k)}",
    )


def _is_tag_of(name: str, text: str) -> bool:
    """Whether TEXT is a tag of image NAME (spotrun-runtime-<key>, not spotrun-runtime-x-...)."""
    return re.fullmatch(f"{re.escape(image_name(name))}-[0-9a-f]{{16}}", text) is not None


def _forget_older(name: str, k: str) -> None:
    """Older keys of NAME: out of buildah's storage and the layout, once the new one is in."""
    out = buildah("images", "--format={{.Name}}:{{.Tag}}", check=False).stdout.split()
    for ref in out:
        repo_part, _, tag_part = ref.rpartition(":")
        if repo_part == f"{REGISTRY}/{image_name(name)}" and tag_part != k:
            buildah("rmi", "--force", ref, check=False)
    buildah("rmi", "--prune", check=False)
    index = _read_index(layout_dir())
    keep = tag(name, k)
    index["manifests"] = [
        m for m in index["manifests"] if ref_name(m) == keep or not _is_tag_of(name, ref_name(m))
    ]
    _write_index(layout_dir(), index)
    gc_layout(layout_dir())
    for old in (cache_dir() / "images").glob(f"{image_name(name)}-*.json"):
        if old.name != f"{keep}.json" and _is_tag_of(name, old.stem):
            old.unlink()


def _build_base(k: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="base-", dir=cache_dir() / "images"))
    try:
        hook = work / "hook.sh"
        hook.write_text(BASE_HOOK)
        rootfs = work / "rootfs.tar"
        cmd = [
            "mmdebstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            "--aptopt=APT::Install-Recommends false",
            *[f"--dpkgopt={o}" for o in BASE_DPKG_OPTS],
            f"--customize-hook=copy-in {hook} /tmp",
            '--customize-hook=chroot "$1" sh /tmp/hook.sh',
            '--customize-hook=rm -f "$1/tmp/hook.sh"',
            BASE_SUITE,
            str(rootfs),
            BASE_MIRROR,
        ]
        # A clean environment: nothing of this machine's (pip's settings, say) gets in.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise Failure(f"mmdebstrap failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        ctr = buildah("from", "scratch").stdout.strip()
        try:
            buildah("add", ctr, str(rootfs), "/")
            config = [f"--env={e}" for e in BASE_CONFIG["Env"]]
            config += [f"--cmd={json.dumps(BASE_CONFIG['Cmd'])}", "--os=linux", "--arch=amd64"]
            buildah("config", *config, ctr)
            buildah("commit", "--quiet", "--format=oci", ctr, local_ref("base", k))
        finally:
            buildah("rm", ctr, check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_spec(name: str, k: str, repo: Path, keys: Mapping[str, str]) -> None:
    """Builds NAME FROM its parents as KEYS name them (read once, when the build began)."""
    spec = SPECS[name]
    args = [
        "build",
        "--pull=never",
        "--isolation=chroot",
        "--format=oci",
        "--layers=false",
        "--force-rm",  # no working container left behind by a failed build (GBs each)
        f"--file={repo / spec.dockerfile}",
        f"--tag={local_ref(name, k)}",
    ]
    for arg, image in ((spec.parent_arg, spec.parent), *spec.also):
        # The key the parent was built under, not one read again now: a file edited during
        # a long build would name a parent that was never built.
        image_key = keys[image] if image in keys else key(image, repo)
        _load(image, image_key)
        args.append(f"--build-arg={arg}={local_ref(image, image_key)}")
    if spec.target:
        args.append(f"--target={spec.target}")
    ca = _ca_bundle()
    if ca:
        args.append(f"--volume={ca}:/etc/ssl/certs/ca-certificates.crt:ro")
    log = cache_dir() / "images" / f"{tag(name, k)}.log"
    cmd = [*_buildah_cmd(), *args, str(repo / spec.context)]
    step = [""]
    with log.open("w") as out, Ticker(lambda: f"building image {name} ({step[0]})"):
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_buildah_env()
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if re.match(r"\[\d+/\d+\] STEP ", line):
                step[0] = line.strip()[:100]
        rc = proc.wait()
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise Failure(
            f"building {name} ({spec.dockerfile}"
            + (f", --target {spec.target}" if spec.target else "")
            + f") failed (exit {rc}); the build's output is in {log}:\n"
            + "\n".join(tail)
            + f"\n{disk_report()}"
        )
    log.unlink()


class Ticker:
    """Says WHAT() with the time elapsed every 30 s while the block runs (a build is long)."""

    def __init__(self, what: str | Callable[[], str], interval: float = 30.0) -> None:
        self.what = what if callable(what) else lambda: what
        self.interval = interval
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            say(f"{self.what()}: {fmt_secs(time.monotonic() - self.start)} elapsed")


def ensure(names: Sequence[str], repo: Path = REPO, rebuild: Sequence[str] = ()) -> dict[str, str]:
    """Builds every image of NAMES (and what they are built FROM) that is not cached.

    Returns name -> key. REBUILD names images to build even when cached.
    """
    unknown = [n for n in [*names, *rebuild] if n not in NAMES]
    if unknown:
        raise Failure(f"unknown image {', '.join(unknown)}; known: {', '.join(NAMES)}")
    wanted: list[str] = []

    def add(n: str) -> None:
        parent = SPECS[n].parent if n in SPECS else None
        if parent:
            add(parent)
        if n not in wanted:
            wanted.append(n)

    for n in names or SPECS:
        add(n)
    keys = {n: key(n, repo) for n in wanted}
    todo = [n for n in wanted if n in rebuild or not cached(n, keys[n])]
    if not todo:
        return keys
    ensure_tools()
    (cache_dir() / "images").mkdir(parents=True, exist_ok=True)
    with build_lock("images"):
        _clear_leftovers()
        for n in wanted:
            k = keys[n]
            if n not in rebuild and cached(n, k):
                continue
            label = f"{n} ({REGISTRY}/{image_name(n)}:{k})"
            say(f"building image {label}")
            start = time.monotonic()
            if n == "base":
                with Ticker("building image base (mmdebstrap)"):
                    _build_base(k)
            else:
                _check_disk(n)
                _build_spec(n, k, repo, keys)
            with Ticker(f"storing image {n} in {layout_dir()} (zstd)"):
                _push(n, k)
            took = time.monotonic() - start
            write_metadata(n, k, took, unpacked_size(n, k))
            _forget_older(n, k)
            say(f"built image {label} in {fmt_secs(took)}")
        _prune_storage(keep=local_ref("base", keys["base"]))
    return keys


def _clear_leftovers() -> None:
    """What a build killed midway leaves in buildah's storage and TMPDIR: working containers
    and layer copies, several GB each with the runtime's dependencies. No build runs beside
    this one (the images lock), so none of it is in use."""
    buildah("rm", "--all", check=False)
    tmp = BUILDAH_ROOT / "tmp"
    if tmp.is_dir():
        for entry in tmp.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _disk_usage(path: Path) -> Any:
    """shutil.disk_usage of PATH's filesystem (PATH's nearest existing folder)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path)


def disk_report() -> str:
    """Free space where a build writes: buildah's storage and TMPDIR, and the layout."""
    lines = []
    for what, path in (("buildah's storage", BUILDAH_ROOT), ("the image cache", layout_dir())):
        usage = _disk_usage(path)
        lines.append(
            f"  {what} ({path}): {usage.free / GB:.1f} GB free of {usage.total / GB:.1f} GB"
        )
    return "disk:\n" + "\n".join(lines)


def _check_disk(name: str) -> None:
    """Fails before a build that the disk cannot hold, rather than in buildah's commit with
    "io: read/write on closed pipe" (its message for a full disk)."""
    need = SPECS[name].scratch_gb
    free = _disk_usage(BUILDAH_ROOT).free / GB
    if free < need:
        raise Failure(
            f"building image {name} needs about {need:.0f} GB free where buildah works "
            f"({BUILDAH_ROOT}, SPOTRUN_BUILDAH_ROOT), and {free:.1f} GB is free there.\n"
            f"{disk_report()}\nFree some space, or point SPOTRUN_BUILDAH_ROOT at a larger disk."
        )


def _prune_storage(keep: str) -> None:
    """Empties buildah's storage but for the base: the layout holds every image, and the
    runtime's layers would take its several GB twice. A build FROM an image loads it back."""
    for ref in buildah("images", "--format={{.Name}}:{{.Tag}}", check=False).stdout.split():
        if ref.startswith(f"{REGISTRY}/") and ref != keep:
            buildah("rmi", "--force", ref, check=False)
    buildah("rmi", "--prune", check=False)


# -- what an image holds -----------------------------------------------------------------------


def image_info(name: str, k: str) -> dict[str, Any]:
    """Manifest digest, config, layer count and size of the cached image NAME (KEY)."""
    desc = manifest_of(tag(name, k))
    if desc is None:
        raise Failure(f"image {name} ({k}) is not built; run `hack/images build {name}`")
    manifest = read_json_blob(desc["digest"])
    config = read_json_blob(manifest["config"]["digest"])
    meta = metadata_path(name, k)
    recorded = json.loads(meta.read_text()) if meta.exists() else {}
    return {
        "name": name,
        "key": k,
        "tag": tag(name, k),
        "digest": desc["digest"],
        "layers": len(manifest["layers"]),
        # What the layers take in the layout (zstd), and unpacked (recorded at the build).
        "compressed": sum(int(layer["size"]) for layer in manifest["layers"]),
        "unpacked": recorded.get("unpacked", 0),
        "build_seconds": recorded.get("build_seconds"),
        "config": config.get("config", {}),
    }


def unpacked_size(name: str, k: str) -> int:
    """The bytes of the image's layers as tars: what a node unpacks (zstd -d, counted)."""
    manifest = read_json_blob(image_info(name, k)["digest"])
    total = 0
    for layer in manifest["layers"]:
        path = str(blob_path(layer["digest"]))
        if not layer["mediaType"].endswith("+zstd"):
            total += int(layer["size"])  # a layer this layout holds as a plain tar
            continue
        proc = subprocess.Popen(["zstd", "-dcq", path], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            total += len(chunk)
        if proc.wait() != 0:
            raise Failure(f"`zstd -d {path}` failed: the layout's blob is damaged")
    return total


def write_metadata(name: str, k: str, seconds: float, unpacked: int) -> None:
    meta = {
        "name": name,
        "key": k,
        "tag": tag(name, k),
        "unpacked": unpacked,
        "build_seconds": round(seconds, 1),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    metadata_path(name, k).write_text(json.dumps(meta, indent=2) + "\n")


# -- the node's import ---------------------------------------------------------------------------


def write_oci_archive(refs: dict[str, str], out: IO[bytes]) -> None:
    """An OCI archive of images, tag -> full reference, written to OUT as a stream.

    Blobs the images share are written once; index.json names each image by its full
    reference (what `ctr images import --base-name spotrun.local` keeps).
    """
    layout = layout_dir()
    descs = []
    for tag_name, ref in refs.items():
        desc = manifest_of(tag_name, layout)
        if desc is None:
            raise Failure(f"{tag_name} is not in {layout}; run `hack/images build`")
        desc["annotations"] = {REF_NAME: ref}
        descs.append(desc)
    index = json.dumps({"schemaVersion": 2, "manifests": descs}).encode()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            ("oci-layout", (layout / "oci-layout").read_bytes()),
            ("index.json", index),
        ):
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))
        for d in reachable(layout, descs):
            path = blob_path(d["digest"], layout)
            tar.add(str(path), arcname=f"blobs/{d['digest'].replace(':', '/')}")
