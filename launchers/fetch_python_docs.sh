#!/usr/bin/env bash
# bash launchers/fetch_python_docs.sh
#
# Unpacks (does not install) Debian's python3.X-doc package into $LFDIST_CACHE/data/python-docs
# so that the data spec `pkg:python-docs` can read the reST sources of the Python documentation
# (usr/share/doc/python3.X/html/_sources/**/*.rst.txt). Idempotent: does nothing when unpacked.
# Needs apt-get and dpkg (Debian/Ubuntu); no root needed unless the apt lists must be refreshed.
set -euo pipefail

cache="${LFDIST_CACHE:-$HOME/.cache/lfdist}"
dest="$cache/data/python-docs"

if compgen -G "$dest/usr/share/doc/python3.*/html/_sources" > /dev/null; then
  echo "python docs already unpacked in $dest"
  exit 0
fi

for tool in apt-get apt-cache dpkg; do
  command -v "$tool" > /dev/null || {
    echo "error: $tool not found; this script needs a Debian/Ubuntu machine (or set LFDIST_PYTHON_DOCS to an unpacked docs folder)" >&2
    exit 2
  }
done

# The python3.X-doc package this distribution offers (python3.11-doc on Debian 12).
pick_package() {
  apt-cache search --names-only '^python3\.[0-9]+-doc$' | awk '{print $1}' | sort -V | tail -n 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo > /dev/null; then sudo "$@"; else
    echo "error: '$*' needs root; run it as root, then run this script again" >&2
    exit 2
  fi
}

pkg="$(pick_package || true)"
if [ -z "$pkg" ]; then
  as_root apt-get update -qq
  pkg="$(pick_package || true)"
fi
if [ -z "$pkg" ]; then
  echo "error: apt offers no python3.X-doc package; enable the main component of your Debian/Ubuntu sources" >&2
  exit 2
fi

mkdir -p "$cache/data"
work="$(mktemp -d "$cache/data/.python-docs.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download "$pkg" > /dev/null 2>&1; then
  # The package lists may be stale (the .deb version moved on): refresh once and retry.
  as_root apt-get update -qq
  apt-get download "$pkg"
fi
deb="$(ls ./*.deb | head -n 1)"
dpkg -x "$deb" unpacked
# Rename into place so a crash or a concurrent run never leaves a half folder behind.
if mv -T unpacked "$dest" 2> /dev/null; then
  echo "unpacked $(basename "$deb") into $dest"
elif compgen -G "$dest/usr/share/doc/python3.*/html/_sources" > /dev/null; then
  echo "python docs already unpacked in $dest (by a concurrent run)"
else
  echo "error: $dest exists but holds no python docs; remove it, then run this script again" >&2
  exit 2
fi
