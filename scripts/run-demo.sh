#!/usr/bin/env bash
# `make run`: serve a 1 GiB demo disk on ./twinsum.sock in the foreground.
#
# The Makefile builds the release binary first. The image and metadata are
# created once (sparse, so they cost no disk space until written) and reused,
# so data written by a guest survives restarts of the demo.
set -euo pipefail

cd "$(dirname "$0")/.."
bin=${TWINSUM_BIN:-target/release/twinsum}
dir=$PWD/demo
img=$dir/disk.img
meta=$dir/disk.meta
sock=$PWD/twinsum.sock
queues=2

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

cat <<EOF
twinsum: serving $img on $sock ($queues queues). Ctrl-C stops it cleanly.

QEMU:
  qemu-system-x86_64 -machine q35,accel=kvm -m 1G \\
    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
    -chardev socket,id=disk0,path=$sock \\
    -device vhost-user-blk-pci,chardev=disk0,num-queues=$queues \\
    ...

cloud-hypervisor:
  cloud-hypervisor --memory size=1G,shared=on \\
    --disk vhost_user=true,socket=$sock,num_queues=$queues \\
    ...

EOF

exec "$bin" serve --socket "$sock" --data "$img" --meta "$meta" --queues "$queues"
