#!/usr/bin/env bash
# `make qemu`: boot the test guest interactively against the disk that a
# running `make run` serves on ./twinsum.sock, with a shell on the console,
# so that a person can poke at the disk (/dev/vda) by hand.
#
#   SOCKET=path     another vhost-user-blk socket (default: ./twinsum.sock)
#   GUEST_TEST=fs   run one of images/guest/tests/*.sh instead of a shell
#   ACCEL=kvm       use KVM where it works (default tcg: nested KVM often hangs)
#
# The console is QEMU's stdio; Ctrl-A X quits QEMU, Ctrl-A C its monitor.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
socket=${SOCKET:-$repo/twinsum.sock}
build=$here/build

die() { printf 'qemu.sh: %s\n' "$*" >&2; exit 1; }

command -v qemu-system-x86_64 >/dev/null ||
  die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
[[ -e $build/vmlinuz && -e $build/initramfs.cpio ]] ||
  die "no guest image in $build; run 'make images' first"
# QEMU would only say "Failed to connect"; name the usual cause instead.
[[ -S $socket ]] || die "no socket at $socket; start 'make run' in another terminal first"

case ${ACCEL:-tcg} in
  tcg) accel=(-accel tcg -cpu max) ;;
  kvm) accel=(-accel kvm -cpu host) ;;
  *) die "ACCEL must be tcg or kvm, not '$ACCEL'" ;;
esac

echo "qemu.sh: booting against $socket; the disk is /dev/vda; Ctrl-A X quits" >&2

# The vhost-user backend reads and writes guest RAM directly, so the RAM must
# be a shared memfd, attached to the machine through a NUMA node; its size
# must equal -m. num-queues=2 matches `twinsum serve`'s default --queues.
exec qemu-system-x86_64 \
  "${accel[@]}" -smp 2 -m 512M \
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
  -nodefaults -no-user-config -display none -serial mon:stdio \
  -kernel "$build/vmlinuz" -initrd "$build/initramfs.cpio" \
  -append "console=ttyS0 quiet twinsum.test=${GUEST_TEST:-shell}" \
  -chardev "socket,id=disk,path=$socket" \
  -device vhost-user-blk-pci,chardev=disk,num-queues=2
