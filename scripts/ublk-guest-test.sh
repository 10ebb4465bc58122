#!/usr/bin/env bash
# Boots Debian 12's 6.12 kernel (it ships ublk_drv and nbd as modules) under
# QEMU with TCG, from a busybox initramfs holding a static bs3 and e2fsprogs,
# and runs scripts/guest/guest.sh inside: the ublk frontend's life cycle
# end to end (docs/ARCHITECTURE.md §13), the same for the kernel NBD driver,
# or fio on ublk, NBD and FUSE + loop. The guest has no network: bs3 uses
# the dir store inside it.
#
#   scripts/ublk-guest-test.sh [ublk|nbd|bench]     (default ublk)
#
# Prints the guest console; the guest's verdict is the line
# "BS3GUEST: PASS" (exit 0) or "BS3GUEST: FAIL ..." (exit 1). The kernel
# package is downloaded once with apt-get into ~/.cache/bs3/guest.
set -euo pipefail

MODE=${1:-ublk}
case "$MODE" in ublk|nbd|bench) ;; *) echo "usage: $0 [ublk|nbd|bench]" >&2; exit 2 ;; esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${BS3_GUEST_CACHE:-$HOME/.cache/bs3/guest}
TIMEOUT=${BS3_GUEST_TIMEOUT:-900}
SMP=${BS3_GUEST_CPUS:-2}

die() { echo "ublk-guest-test: $*" >&2; exit 2; }
t0=$(date +%s)
phase() { echo "ublk-guest-test: $* (at $(($(date +%s) - t0)) s)" >&2; }
for c in qemu-system-x86_64 busybox mke2fs e2fsck dpkg-deb xz gzip go; do
  command -v "$c" >/dev/null || die "$c is missing (run scripts/deps.sh)"
done
ldd "$(command -v busybox)" >/dev/null 2>&1 && die "$(command -v busybox) is not static (install busybox-static)"
if [ "$MODE" != ublk ]; then command -v nbd-client >/dev/null || die "nbd-client is missing (run scripts/deps.sh)"; fi
if [ "$MODE" = bench ]; then
  command -v fio >/dev/null || die "fio is missing (run scripts/deps.sh)"
  command -v losetup >/dev/null || die "losetup is missing (run scripts/deps.sh)"
fi

# The kernel: the newest linux-image-6.12.*+deb12-amd64-unsigned, unpacked once.
mkdir -p "$CACHE"
deb=$(ls "$CACHE"/linux-image-6.12.*+deb12-amd64-unsigned_*.deb 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$deb" ]; then
  find_pkg() { apt-cache search --names-only '^linux-image-6\.12\..*\+deb12-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -n 1; }
  pkg=$(find_pkg)
  if [ -z "$pkg" ]; then apt-get update -qq >/dev/null; pkg=$(find_pkg); fi
  [ -n "$pkg" ] || die "no linux-image-6.12.*+deb12-amd64-unsigned package in apt (needs Debian 12 with bookworm-security)"
  echo "ublk-guest-test: downloading $pkg into $CACHE" >&2
  (cd "$CACHE" && apt-get download "$pkg" >/dev/null 2>&1) || die "apt-get download $pkg failed"
  deb=$(ls "$CACHE"/linux-image-6.12.*+deb12-amd64-unsigned_*.deb | sort -V | tail -n 1)
fi
KDIR=${deb%.deb}
if [ ! -d "$KDIR" ]; then
  rm -rf "$KDIR.tmp"
  dpkg-deb -x "$deb" "$KDIR.tmp"
  mv "$KDIR.tmp" "$KDIR"
fi
VMLINUZ=$(ls "$KDIR"/boot/vmlinuz-* | head -n 1)
MODDIR=$(ls -d "$KDIR"/lib/modules/*/kernel | head -n 1)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
IR=$WORK/root
mkdir -p "$IR"/{bin,sbin,lib/mods,etc,proc,sys,dev,tmp,mnt,data}

# Modules in load order (no depmod data ships in the package).
mods="lib/crc16 crypto/crc32c_generic fs/jbd2/jbd2 fs/mbcache fs/ext4/ext4 drivers/block/ublk_drv drivers/block/nbd drivers/block/loop"
for m in $mods; do
  xz -dc "$MODDIR/$m.ko.xz" > "$IR/lib/mods/$(basename "$m").ko"
done
echo "$mods" | tr ' ' '\n' | xargs -n1 basename > "$IR/lib/mods/order"

# Userland: busybox, e2fsprogs (and nbd-client, fio) with their libraries.
cp "$(command -v busybox)" "$IR/bin/busybox"
copy_bin() {
  local src; src=$(command -v "$1")
  cp "$src" "$IR/bin/$1"
  ldd "$src" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$IR$(dirname "$lib")"
    cp -L "$lib" "$IR$lib"
  done
}
copy_bin mke2fs
copy_bin e2fsck
ln -s mke2fs "$IR/bin/mkfs.ext4"
if [ "$MODE" != ublk ]; then copy_bin nbd-client; fi
if [ "$MODE" = bench ]; then copy_bin fio; copy_bin losetup; fi

# bs3 itself, static.
phase "building a static bs3"
(cd "$ROOT" && CGO_ENABLED=0 go build -o "$IR/bin/bs3" .)
cp "$ROOT/scripts/guest/guest.sh" "$IR/guest.sh"
cat > "$IR/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
# Kernel messages (the I/O errors a SIGKILLed server causes) would land in
# the middle of the BS3GUEST marker lines on the shared console; keep them
# in dmesg only.
echo 1 > /proc/sys/kernel/printk
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs data /data
for m in $(cat /lib/mods/order); do
  args=
  [ "$m" = nbd ] && args=nbds_max=4
  insmod "/lib/mods/$m.ko" $args || echo "BS3GUEST: insmod $m failed"
done
mode=$(sed -n 's/.*bs3mode=\([a-z]*\).*/\1/p' /proc/cmdline)
sh /guest.sh "$mode"
echo "BS3GUEST: guest script exited with status $?"
sync
poweroff -f
INIT
chmod +x "$IR/init" "$IR/guest.sh"
(cd "$IR" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$WORK/initrd.gz")

phase "booting $(basename "$VMLINUZ") (mode $MODE, $SMP CPUs, TCG)"
log=$WORK/console.log
set +e
timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -smp "$SMP" -m 2048 -nographic -no-reboot \
  -kernel "$VMLINUZ" -initrd "$WORK/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 bs3mode=$MODE" -nic none </dev/null 2>&1 | tee "$log"
set -e
phase "guest finished"
if grep -q '^BS3GUEST: PASS' "$log"; then
  exit 0
fi
echo "ublk-guest-test: the guest did not report PASS" >&2
exit 1
