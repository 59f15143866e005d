"""The images built by tools/images.sh, run with podman the way a cluster runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import poller

ROOT = Path(__file__).resolve().parents[2]
VERSION = poller.__version__
POLLER_IMAGE = f"localhost/soundcheck-poller:{VERSION}"
OPERATOR_IMAGE = f"localhost/soundcheck-operator:{VERSION}"
# OpenShift's kind of UID: arbitrary, with group 0.
ARBITRARY_USER = "1000870000:0"
# What the pod templates and manifests ask for: no capability, read-only root (podman mounts
# a tmpfs on /tmp as the pod's emptyDir does), no privilege escalation.
RESTRICTED = ["--user", ARBITRARY_USER, "--read-only", "--cap-drop", "ALL",
              "--security-opt", "no-new-privileges"]


def podman_env() -> dict[str, str]:
    return {**os.environ,
            "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF",
                                              str(ROOT / "tools" / "containers.conf"))}


def podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(),
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
    return proc.stdout


def require_image(image: str) -> None:
    """Skip (with how to build) where the image is absent; CI sets SOUNDCHECK_REQUIRE_IMAGES=1
    after building them, so an absent image fails there instead of skipping."""
    required = os.environ.get("SOUNDCHECK_REQUIRE_IMAGES") == "1"
    missing = ("podman is not installed" if shutil.which("podman") is None else
               None if subprocess.run(["podman", "image", "exists", image], env=podman_env(),
                                      timeout=30).returncode == 0 else
               f"{image} is not built (tools/images.sh builds it)")
    if missing and required:
        pytest.fail(f"SOUNDCHECK_REQUIRE_IMAGES=1 but {missing}")
    if missing:
        pytest.skip(missing)


def container_logs(name: str) -> str:
    """Everything the container wrote, stdout and stderr (podman logs splits them again)."""
    proc = subprocess.run(["podman", "logs", name], capture_output=True, text=True,
                          env=podman_env(), timeout=60)
    return proc.stdout + proc.stderr
