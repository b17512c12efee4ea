# Verifying workload with fio, O_DIRECT, queue depth 16, two jobs (one per
# 64 MiB region). Every block carries an xxhash header that fio checks when it
# reads the block back (verify_backlog also verifies while writing).
#   1. random writes of mixed sizes: each block written once;
#   2. the same regions rewritten in 4 KiB blocks before any flush, with an
#      fsync every 64 writes: overwrites of blocks written since the last
#      flush are the case where twinsum must sync data before it may reuse a
#      checksum slot, and the fsyncs make it forget old slots meanwhile.
. /tests/lib.sh

run_fio() {
  name=$1
  shift
  fio --name="$name" --filename=$DISK --direct=1 --ioengine=libaio --iodepth=16 \
    --rw=randwrite --size=24M --numjobs=2 --offset_increment=64M \
    --verify=xxhash --verify_fatal=1 --verify_backlog=256 --do_verify=1 \
    --randrepeat=0 --group_reporting --output-format=terse --terse-version=3 \
    "$@" >/tmp/fio.out 2>/tmp/fio.err || {
    cat /tmp/fio.out /tmp/fio.err
    die "fio job $name failed"
  }
  # Fields: version;fio;jobname;groupid;error;read KiB;... (read = verified).
  say "$(grep ';' /tmp/fio.out | cut -d';' -f3-6)"
}

run_fio mixed --bsrange=4k-64k
run_fio overwrite --bs=4k --fsync=64
say "fio verify ok"
