# Pattern test: random data written at the start, middle and end of the
# disk, from both vCPUs at once (so both virtqueues carry requests), read back
# with O_DIRECT and again through the page cache after a flush.
. /tests/lib.sh

mib=$(($(disk_bytes) / MIB))
bs=$(logical_block)
say "disk ${mib} MiB, logical block ${bs} B"
[ "$mib" -ge 64 ] || die "disk too small for the pattern test (${mib} MiB)"

for p in a b c; do dd if=/dev/urandom of=/tmp/$p bs=1M count=8 status=none; done
start=0
mid=$((mib / 2))
end=$((mib - 8))

# One writer per CPU: blk-mq maps each CPU to its own queue.
taskset 1 sh -c ". /tests/lib.sh; write_mib /tmp/a $start 8" &
wa=$!
taskset 2 sh -c ". /tests/lib.sh; write_mib /tmp/c $end 8" &
wc=$!
wait $wa || die "writer on cpu0 failed"
wait $wc || die "writer on cpu1 failed"

# The middle through the page cache, made durable by a flush (fsync).
dd if=/tmp/b of=$DISK bs=1M seek=$mid count=8 conv=notrunc,fsync status=none

expect_mib /tmp/a $start 8
expect_mib /tmp/b $mid 8
expect_mib /tmp/c $end 8

# Single logical blocks at odd addresses, the smallest request a guest sends.
for blk in 1 4097 $(((mib * MIB / bs) - 3)); do
  dd if=/dev/urandom of=/tmp/one bs="$bs" count=1 status=none
  dd if=/tmp/one of=$DISK bs="$bs" seek="$blk" oflag=direct conv=notrunc status=none
  dd if=$DISK bs="$bs" skip="$blk" count=1 iflag=direct status=none | cmp - /tmp/one ||
    die "block $blk (${bs} B) did not read back"
done

# The same regions again through the page cache, after dropping it.
drop_caches
dd if=$DISK bs=1M skip=$mid count=8 status=none | cmp - /tmp/b || die "buffered read of the middle differs"
say "pattern ok"
