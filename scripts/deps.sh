#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine: the NBD clients,
# fio, e2fsprogs, fuse3, s3backer (for a benchmark) and QEMU with busybox
# (for the guest tests) from Debian, and a MinIO server built from the Go
# module proxy into the Go-style cache directory (not into the repo).
# Safe to run again: it only installs what is missing.
set -euo pipefail

MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c
BIN_DIR=${BS3_BIN_DIR:-$HOME/.cache/bs3/bin}

need=()
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdcopy >/dev/null || need+=(libnbd-bin)
command -v fio >/dev/null || need+=(fio)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v losetup >/dev/null || need+=(util-linux)
command -v s3backer >/dev/null || need+=(s3backer) # BenchmarkVsS3backer
# The guest tests (scripts/ublk-guest-test.sh): QEMU, a static busybox for
# the initramfs, nbd-client, xz for the kernel modules.
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# (the initramfs needs a static busybox: ldd fails on it)
{ command -v busybox >/dev/null && ! ldd "$(command -v busybox)" >/dev/null 2>&1; } || need+=(busybox-static)
command -v nbd-client >/dev/null || need+=(nbd-client)
command -v xz >/dev/null || need+=(xz-utils)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: missing packages ${need[*]}; run as root or install them: apt-get install ${need[*]}" >&2
    exit 1
  fi
  echo "deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x "$BIN_DIR/minio" ]; then
  echo "deps: building MinIO $MINIO_VERSION into $BIN_DIR (2-3 minutes the first time)"
  mkdir -p "$BIN_DIR"
  GOBIN="$BIN_DIR" go install "github.com/minio/minio@$MINIO_VERSION"
fi
echo "deps: ready (minio: $BIN_DIR/minio)"
