#!/usr/bin/env bash
# Installs everything aiomooncake needs on a fresh Debian machine without a GPU (idempotent):
# the RDMA user-space libraries the CPU Transfer Engine wheel links against, the CPU build of
# torch (pinned, so pip does not pull several GB of CUDA packages), and this package with its
# CPU engine and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ldconfig -p 2>/dev/null | grep -q 'libibverbs.so.1' || ! ldconfig -p 2>/dev/null | grep -q 'librdmacm.so.1'; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libibverbs1 librdmacm1 >/dev/null
fi
PY=${PYTHON:-python3}
$PY -c 'import torch' 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[cpu,test,bench]" 2>&1 | grep -v -i "warning" || true
$PY -c 'import aiomooncake, mooncake.engine' || { echo "install failed" >&2; exit 1; }
