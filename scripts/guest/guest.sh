#!/bin/sh
# Runs inside the QEMU guest built by scripts/ublk-guest-test.sh (busybox
# sh, no network). Each check prints "BS3GUEST: ok <what>"; the verdict is
# "BS3GUEST: PASS" or "BS3GUEST: FAIL <what>" (with the end of bs3's log).
mode=$1
LOG=/tmp/bs3.log
CFG=/etc/bs3.toml
pid=

ok() { echo "BS3GUEST: ok $*"; }
fail() {
  echo "BS3GUEST: FAIL $*"
  echo "--- last lines of the bs3 log:"
  tail -n 30 "$LOG" 2>/dev/null
  exit 1
}

# config FRONTEND NULL
config() {
  cat > "$CFG" <<CFG
frontend = "$1"
null = $2
store = "dir"
size = 2
shutdown_timeout = 60
[write]
durable = true
[dir]
path = "/data/objects"
[nbd]
listen = "unix:/tmp/nbd.sock"
[fuse]
mountpoint = "/tmp/fuse"
[cache]
memory_size = 64
CFG
}

# start_bs3 starts bs3 with a fresh $LOG, so that what attach waits for is
# this start's (the previous logs go to $LOG.old).
start_bs3() {
  cat "$LOG" >>"$LOG.old" 2>/dev/null
  : >"$LOG"
  bs3 -c "$CFG" >>"$LOG" 2>&1 &
  pid=$!
}

# wait_for TEST SECONDS: polls a shell test until it holds.
wait_for() {
  i=0
  while ! eval "$1"; do
    i=$((i + 1))
    [ $i -gt $(($2 * 10)) ] && return 1
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
}

stop_bs3() {
  kill -TERM "$pid"
  wait "$pid"
  rc=$?
  [ $rc -eq 0 ] || fail "bs3 exited with status $rc after SIGTERM"
}

DEV=
attach() {
  case "$1" in
  ublk)
    DEV=/dev/ublkb0
    wait_for "grep -q 'ublk device started' $LOG && [ -b $DEV ]" 90 || fail "no $DEV"
    ;;
  nbd)
    DEV=/dev/nbd0
    wait_for "grep -q '^bs3: NBD export' $LOG" 90 || fail "no NBD export"
    nbd-client -unix /tmp/nbd.sock "$DEV" -N bs3 -b 4096 >/dev/null 2>&1 || fail "nbd-client"
    ;;
  fuse)
    wait_for "grep -q '^bs3: block device /dev/loop' $LOG" 90 || fail "no loop device"
    DEV=$(sed -n 's|^bs3: block device \(/dev/loop[0-9]*\).*|\1|p' "$LOG" | head -n 1)
    ;;
  esac
}

detach() {
  [ "$1" = nbd ] && nbd-client -d /dev/nbd0 >/dev/null 2>&1
  return 0
}

fsck_clean() {
  e2fsck -fn "$DEV" >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck $1"; }
  ok "e2fsck clean $1"
}

lifecycle() { # FRONTEND
  fe=$1
  config "$fe" false
  start_bs3
  attach "$fe"
  ok "$fe device $DEV is up"
  if [ "$fe" = ublk ]; then
    [ "$(cat /sys/block/ublkb0/queue/logical_block_size)" = 4096 ] || fail "logical block size $(cat /sys/block/ublkb0/queue/logical_block_size)"
    queues=$(ls /sys/block/ublkb0/mq | wc -l)
    [ "$queues" = "$(grep -c ^processor /proc/cpuinfo)" ] || fail "$queues queues"
    ok "block size 4096, $queues queues"
    [ "$(cat /sys/block/ublkb0/queue/discard_granularity)" = 4096 ] || fail "no discard"
    ok "discard advertised"
  fi
  mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4"
  ok "mkfs.ext4"
  mount -t ext4 "$DEV" /mnt || fail "mount"
  dd if=/dev/urandom of=/mnt/big bs=1M count=8 2>/dev/null || fail "write big"
  mkdir -p /mnt/d
  n=0
  while [ $n -lt 40 ]; do
    dd if=/dev/urandom of=/mnt/d/f$n bs=1k count=$((n + 1)) 2>/dev/null || fail "write f$n"
    n=$((n + 1))
  done
  sync
  (cd /mnt && md5sum big d/* > /tmp/sums) || fail "md5sum"
  umount /mnt || fail "umount"
  ok "files written, unmounted"
  fsck_clean "after unmount"
  detach "$fe"
  stop_bs3
  ok "SIGTERM: bs3 exited 0"
  if [ "$fe" = ublk ]; then
    [ ! -e /dev/ublkb0 ] && [ ! -e /sys/class/ublk-char/ublkc0 ] || fail "ublk device still present after SIGTERM"
    ok "ublk device deleted"
  fi

  start_bs3
  attach "$fe"
  fsck_clean "after restart"
  mount -t ext4 "$DEV" /mnt || fail "mount after restart"
  (cd /mnt && md5sum -c /tmp/sums >/tmp/md5.out 2>&1) || { cat /tmp/md5.out; fail "checksums after restart"; }
  ok "checksums equal after restart"

  # SIGKILL in the middle of fsync'ed writes.
  dd if=/dev/urandom of=/mnt/synced bs=1M count=4 conv=fsync 2>/dev/null || fail "write synced"
  (cd /mnt && md5sum synced > /tmp/synced.sum)
  (
    i=0
    while dd if=/dev/urandom of=/mnt/more$i bs=64k count=8 conv=fsync 2>/dev/null; do i=$((i + 1)); done
  ) &
  writer=$!
  sleep 2
  kill -9 "$pid"
  wait "$pid"
  sleep 1
  kill "$writer" 2>/dev/null
  wait "$writer"
  umount /mnt 2>/dev/null || umount -l /mnt
  detach "$fe"
  ok "SIGKILL during fsync'ed writes"

  start_bs3
  attach "$fe"
  if [ "$fe" = ublk ]; then
    grep -q "removing the stale ublk device" "$LOG" || fail "stale device not reported"
    ok "stale device removed at restart"
  fi
  mount -t ext4 "$DEV" /mnt || fail "mount after SIGKILL"
  (cd /mnt && md5sum -c /tmp/sums /tmp/synced.sum >/tmp/md5.out 2>&1) || { cat /tmp/md5.out; fail "checksums after SIGKILL"; }
  ok "fsync'ed data intact after SIGKILL"
  umount /mnt || fail "umount after SIGKILL"
  fsck_clean "after SIGKILL"
  detach "$fe"
  stop_bs3
  if [ "$fe" = ublk ]; then
    [ ! -e /dev/ublkb0 ] || fail "ublk device still present after the last SIGTERM"
  fi
  ok "final SIGTERM"
}

# bench FRONTEND: fio 4 KiB random writes, then reads, over the null
# backend (FUSE: through the loop device bs3 attaches).
bench() {
  fe=$1
  config "$fe" true
  start_bs3
  attach "$fe"
  for rw in randwrite randread; do
    out=$(fio --name=b --filename="$DEV" --direct=1 --ioengine=libaio --rw=$rw --bs=4k \
      --iodepth=32 --size=256M --time_based --runtime=${BS3_GUEST_FIO_SECONDS:-10} --group_reporting 2>&1) || { echo "$out"; fail "fio $fe $rw"; }
    iops=$(echo "$out" | sed -n 's/.*IOPS=\([0-9.k]*\).*/\1/p' | head -n 1)
    echo "BS3GUEST: bench $fe $rw iops=$iops"
  done
  detach "$fe"
  stop_bs3
}

case "$mode" in
ublk) lifecycle ublk ;;
nbd) lifecycle nbd ;;
bench) mkdir -p /tmp/fuse; bench ublk; bench nbd; bench fuse ;;
*) fail "unknown mode $mode" ;;
esac
echo "BS3GUEST: PASS"
