#!/usr/bin/env bash
# `make run`: serve a 1 GiB demo disk on ./twinsum.sock in the foreground.
#
# The Makefile builds the release binary first. The image and metadata are
# created once (sparse, so they cost no disk space until written) and reused,
# so data written by a guest survives restarts of the demo.
#
#   DEMO_DIR=dir    where the image and metadata live (default: ./demo)
#   SOCKET=path     the vhost-user socket (default: ./twinsum.sock)
#
# tests/run_demo.rs runs this script as it is and starts QEMU with the line
# it prints, so the printed lines are the ones that are tested.
set -euo pipefail

cd "$(dirname "$0")/.."
bin=${TWINSUM_BIN:-target/release/twinsum}
dir=${DEMO_DIR:-$PWD/demo}
img=$dir/disk.img
meta=$dir/disk.meta
sock=${SOCKET:-$PWD/twinsum.sock}
# serve --queues and --queue-size (the largest ring a front-end may set).
queues=2
queue_size=1024
# The ring the VM lines ask for: cloud-hypervisor's default, within
# queue_size.
ring=128

if [[ ! -x $bin ]]; then
    echo "run-demo: $bin is missing; run 'make run' (it builds it first)" >&2
    exit 1
fi

mkdir -p "$dir"
if [[ ! -e $img || ! -e $meta ]]; then
    if [[ -e $img ]]; then
        # An image without metadata: format keeps its contents and sizes
        # the metadata from it.
        "$bin" format --data "$img" --meta "$meta"
    else
        "$bin" format --data "$img" --meta "$meta" --size 1G
    fi
fi

# accel=kvm:tcg falls back to TCG where KVM is missing. cloud-hypervisor
# refuses more queues than boot vCPUs (TooManyQueues), and boots one vCPU
# by default: hence --cpus boot=$queues.
cat <<EOF
twinsum: serving $img on $sock ($queues queues). Ctrl-C stops it cleanly.

QEMU:
  qemu-system-x86_64 -machine q35,accel=kvm:tcg -m 1G \\
    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
    -chardev socket,id=disk0,path=$sock \\
    -device vhost-user-blk-pci,chardev=disk0,num-queues=$queues,queue-size=$ring \\
    ...

cloud-hypervisor (it allows no more queues than boot vCPUs, hence --cpus):
  cloud-hypervisor --cpus boot=$queues --memory size=1G,shared=on \\
    --disk vhost_user=true,socket=$sock,num_queues=$queues,queue_size=$ring \\
    ...

EOF

exec "$bin" serve --socket "$sock" --data "$img" --meta "$meta" \
    --queues "$queues" --queue-size "$queue_size"
