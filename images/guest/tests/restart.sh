# The host restarts twinsum under this guest (kill -9 several times, once
# SIGTERM) while it writes and reads back; QEMU reconnects (reconnect=1).
# The host answers "host:restart N": run N rounds, each announced with a
# ROUND marker so the host can pick its moment. Per round:
#   - 2 MiB of fresh random data written with O_DIRECT and never flushed,
#     read back at once and again at the end (after later restarts);
#   - a short fio job with verify (random 4 KiB writes, read back and
#     checked by fio's own headers).
# At the end the kernel log must hold no I/O error and no virtio complaint:
# a request lost, failed or completed twice would show there (or hang fio).
. /tests/lib.sh

wait_host restart
rounds=$HOST_REPLY

r=1
while [ "$r" -le "$rounds" ]; do
  marker "ROUND $r"
  head -c $((2 * MIB)) /dev/urandom >/tmp/p$r
  write_mib /tmp/p$r $((4 * r)) 2
  expect_mib /tmp/p$r $((4 * r)) 2
  fio --name=round$r --filename=$DISK --direct=1 --ioengine=libaio --iodepth=16 \
    --rw=randwrite --bs=4k --offset=128M --size=4M --verify=xxhash --verify_fatal=1 \
    --do_verify=1 --randrepeat=0 --output-format=terse --terse-version=3 \
    >/tmp/fio.out 2>/tmp/fio.err || {
    cat /tmp/fio.out /tmp/fio.err
    die "fio round $r failed"
  }
  r=$((r + 1))
done

r=1
while [ "$r" -le "$rounds" ]; do
  expect_mib /tmp/p$r $((4 * r)) 2
  r=$((r + 1))
done
say "every unflushed O_DIRECT write read back after the restarts"

if dmesg | grep -iE 'I/O error|blk_update_request|critical|timeout|virtio.*(error|broken|not a head)|id [0-9]+ is not a head' >/tmp/bad; then
  cat /tmp/bad
  die "the kernel log reports I/O trouble"
fi
say "no I/O error in the kernel log"
