"""A build context as `docker build` sends it: .dockerignore's rules, and a digest of what passes.

hack/images keys its image cache by this digest, so it has to see exactly the files a build
can COPY: the rules are those of Docker's (moby/patternmatcher `MatchesOrParentMatches`, as
BuildKit applies them), not .gitignore's. In short: patterns are matched against the path
relative to the context root after `filepath.Clean` (a trailing `/` is dropped); `*` and
`?` do not cross `/`, `**` matches any number of directories; a pattern that matches a
parent directory matches everything under it; `!` re-includes; the last matching pattern
wins. Pure (no I/O but reading the context), so the unit tests pin it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import re
import stat
from collections.abc import Iterable
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Pattern:
    text: str
    exclusion: bool
    regex: re.Pattern[str]


def _compile(pattern: str) -> re.Pattern[str]:
    """moby/patternmatcher's regexp of PATTERN (already cleaned, '/'-separated)."""
    out = "^"
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                i += 1
                if i + 1 < n and pattern[i + 1] == "/":
                    i += 1
                if i + 1 >= n:
                    out += ".*"  # `**` at the end: everything (as .gitignore)
                else:
                    out += "(.*/)?"
            else:
                out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < n:
            i += 1
            out += re.escape(pattern[i])
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out += re.escape(ch)
            else:
                out += pattern[i : end + 1]  # a class, as Go's filepath.Match (`[^...]`)
                i = end
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + "$")


def parse_dockerignore(text: str) -> list[Pattern]:
    """The patterns of a .dockerignore file, in order (comments and blank lines dropped)."""
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        if exclusion:
            line = line[1:].strip()
        cleaned = posixpath.normpath(line).lstrip("/")
        if cleaned in ("", "."):
            continue
        patterns.append(Pattern(cleaned, exclusion, _compile(cleaned)))
    return patterns


def ignored(path: str, patterns: Iterable[Pattern]) -> bool:
    """Whether PATH (relative, '/'-separated) is left out of the context by PATTERNS."""
    parts = path.split("/")
    parents = ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
    matched = False
    for p in patterns:
        # An inclusion cannot change a path already matched, nor an exclusion one that is not.
        if p.exclusion != matched:
            continue
        if p.regex.match(path) or any(p.regex.match(parent) for parent in parents):
            matched = not p.exclusion
    return matched


def context_files(root: Path, dockerignore: Path | None = None) -> list[str]:
    """Every file and symlink under ROOT that a build can COPY, sorted ('/'-separated)."""
    ignore = dockerignore if dockerignore is not None else root / ".dockerignore"
    patterns = parse_dockerignore(ignore.read_text()) if ignore.exists() else []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        for name in sorted(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                filenames.append(name)  # a symlink to a directory is copied as a link
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in filenames:
            rel = prefix + name
            if not ignored(rel, patterns):
                found.append(rel)
    return sorted(found)


def context_digest(root: Path, dockerignore: Path | None = None) -> str:
    """sha256 over the path, executable bit and content (or link target) of every file sent."""
    h = hashlib.sha256()
    for rel in context_files(root, dockerignore):
        path = root / rel
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            kind, data = "l", os.readlink(path).encode()
        else:
            kind, data = ("x" if st.st_mode & 0o111 else "f"), path.read_bytes()
        h.update(f"{rel}\0{kind}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()
