#!/usr/bin/env bash
# Builds the two images with podman, unchanged Dockerfiles, the way CI does:
#   tools/images.sh               base stand-in (if absent), then both images
#   tools/images.sh base          only the stand-in base
# Tags: soundcheck-poller:VERSION and soundcheck-operator:VERSION (poller.__version__).
#
# Registries cannot be reached from the machines this project is tested on, so the base,
# python:3.11-slim-bookworm, is a local stand-in made from Debian packages: debootstrap's
# minbase of bookworm plus Debian's python3.11 and venv, imported under the base's
# name (docs/operator.md, "Images", says how it differs). With registry access set
# BASE_IMAGE=python:3.11-slim-bookworm@sha256:… (the Dockerfiles' default) and skip it.
#
# Settings: BASE_IMAGE (default: the stand-in's name), DEBIAN_MIRROR, CONTAINERS_CONF
# (default: tools/containers.conf).
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/tools/containers.conf}"
standin=python:3.11-slim-bookworm
base="${BASE_IMAGE:-$standin}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' poller/__init__.py)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
source_url=$(git remote get-url origin 2>/dev/null || echo unknown)

build_standin() {
    if podman image exists "$standin"; then
        echo "images: base stand-in $standin already present"
        return
    fi
    local root
    root=$(mktemp -d)
    trap 'rm -rf "$root"' RETURN
    echo "images: debootstrap minbase bookworm + python3.11 into $root"
    debootstrap --variant=minbase \
        --include=python3.11,python3.11-venv,python3-distutils,ca-certificates \
        bookworm "$root" "$mirror" >/dev/null \
        || { tail -30 "$root/debootstrap/debootstrap.log"; return 1; }
    # As in the official image: `python` is the interpreter; no package caches left behind.
    ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python"
    ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | podman import \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' --quiet - "$standin" >/dev/null
    echo "images: base stand-in $standin imported"
}

build_image() {  # $1 Dockerfile, $2 tag
    # pip inside the build needs this host's CA bundle and pip configuration (TLS may go
    # through an intercepting proxy): mounted read-only, so nothing of them is in a layer.
    local mounts=()
    for f in /etc/ssl/certs/ca-certificates.crt /etc/pip.conf /etc/xdg/pip; do
        [ -e "$f" ] && mounts+=(--volume "$f:$f:ro")
    done
    podman build --quiet --file "$1" --tag "$2" \
        --build-arg "BASE_IMAGE=$base" --build-arg "VERSION=$version" \
        --build-arg "REVISION=$revision" --build-arg "SOURCE_URL=$source_url" \
        "${mounts[@]}" . >/dev/null
    echo "images: built $2 ($(podman image inspect --format '{{.Size}}' "$2") bytes)"
}

[ "$base" = "$standin" ] && build_standin
[ "${1:-}" = base ] && exit 0
build_image Dockerfile.poller "soundcheck-poller:$version"
build_image Dockerfile.operator "soundcheck-operator:$version"
