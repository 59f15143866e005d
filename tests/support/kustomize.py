"""Render the repository's manifests with components, as a user's kustomization would."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent


def kustomize(tmp_path: Path, *components: Path,
              namespace: str | None = None) -> list[dict[str, Any]]:
    """`kubectl kustomize` of manifests/ plus `components`, exactly as the README shows it
    (`resources: [<repo>/manifests]`, `components: [...]`), and with `namespace:` if given."""
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "manifests", tmp_path)],
        "components": [os.path.relpath(c, tmp_path) for c in components]}
    if namespace is not None:
        kustomization["namespace"] = namespace
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]
