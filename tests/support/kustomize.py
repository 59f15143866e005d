"""Render the repository's manifests with components, as a user's kustomization would."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent


def kustomize(tmp_path: Path, *components: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of manifests/ plus `components`, in the namespace soundcheck."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "soundcheck",
        "resources": [os.path.relpath(ROOT / "manifests", tmp_path)],
        "components": [os.path.relpath(c, tmp_path) for c in components]}))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]
