# Crash-states test (tests/guest_crash_states.rs), the one recorded run:
# ext4 (made by the host) with files that are each fsynced, and unsynced
# scratch writes (buffered and O_DIRECT) in between. After each fsync it prints "FSYNCED NAME MD5"
# and waits for the host, which notes how far the write log had got by
# then: every crash state cut later must have that file. The host kills
# QEMU after WRITTEN.
. /tests/lib.sh

mkdir -p /mnt/t
mount -t ext4 $DISK /mnt/t
mkdir -p /mnt/t/files /mnt/t/scratch
sync

wait_host logged
files=$HOST_REPLY

# Sizes cycle through small, odd and multi-block ones (as crash-write.sh).
size_of() { echo $((($1 * 7919) % 196608 + 1 + ($1 % 3) * 4096)); }

i=0
while [ $i -lt "$files" ]; do
  f=/mnt/t/files/f.$i
  dd if=/dev/urandom of=$f bs=$(size_of $i) count=1 status=none
  sync $f /mnt/t/files
  marker "FSYNCED f.$i $(md5sum <$f | cut -d' ' -f1)"
  wait_host next
  # Never synced: ext4 writes it back whenever it likes.
  dd if=/dev/urandom of=/mnt/t/scratch/s.$i bs=64k count=$((i % 4 + 1)) status=none
  # O_DIRECT: on the disk (in its volatile cache) at once, made durable
  # only by the next file's fsync, so cuts in between find them un-synced.
  dd if=/dev/urandom of=/mnt/t/scratch/d.$((i % 3)) bs=16k count=$((i % 4 + 1)) \
    oflag=direct conv=notrunc status=none
  # Rewrites of a scratch file, never synced.
  [ $i -gt 0 ] && dd if=/dev/urandom of=/mnt/t/scratch/s.$((i - 1)) bs=4k count=3 \
    conv=notrunc status=none
  i=$((i + 1))
done
marker "WRITTEN"
sleep 3600
