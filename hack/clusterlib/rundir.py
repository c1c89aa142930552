"""A run directory: where one cluster keeps its files and the record of what it started.

Certificates, kubeconfigs, etcd's data and the logs live under it; state.json records every
process the moment it starts, so that `down` finds it even after a failed `up`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .build import cache_dir


class RunDir:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.pki = self.root / "pki"
        self.logs = self.root / "logs"
        self.etcd_data = self.root / "etcd"
        self.state_file = self.root / "state.json"
        self.kubeconfig = self.root / "kubeconfig"

    def component_kubeconfig(self, name: str) -> Path:
        return self.root / f"{name}.kubeconfig"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {}
        state.setdefault("processes", {})
        state.setdefault("ports", {})
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_file)


def default_run_dir() -> Path:
    return cache_dir() / "run" / "cluster"
