# Power-cut test, first boot: an ext4 workload that fsyncs each new file and
# prints "FSYNCED NAME MD5" once the fsync returned, with unsynced scratch
# writes in between and O_DIRECT writes from a background writer. After the number of files the host asks for, it prints
# CUT-NOW and goes on writing without waiting: the host cuts twinsum's
# simulated power (SIGUSR2) while it does, then kills QEMU. The next boot
# (crash-check.sh) checks what the files look like after the cut.
. /tests/lib.sh

mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 $DISK
mkdir -p /mnt/t
mount -t ext4 $DISK /mnt/t
mkdir /mnt/t/files /mnt/t/scratch
sync

wait_host crash
cut_after=$HOST_REPLY
say "cutting after $cut_after fsynced files"

# A background writer keeps O_DIRECT writes that nothing syncs on their way
# to the disk, so the cut always finds data in the disk's volatile cache.
# It appends 256 KiB at a time to a file, wrapping at 16 MiB.
dd if=/dev/urandom of=/tmp/chunk bs=256k count=1 status=none
(
  k=0
  while dd if=/tmp/chunk of=/mnt/t/scratch/direct bs=256k seek=$((k % 64)) count=1 \
    oflag=direct conv=notrunc status=none 2>/dev/null; do
    k=$((k + 1))
  done
) &

# Sizes cycle through small, odd and multi-block ones so that files end
# inside blocks and extents of different lengths are written.
size_of() { echo $((($1 * 7919) % 196608 + 1 + ($1 % 3) * 4096)); }

i=0
while :; do
  f=/mnt/t/files/f.$i
  if ! dd if=/dev/urandom of=$f bs=$(size_of $i) count=1 status=none ||
    ! sync $f /mnt/t/files; then
    # Expected once the power is gone: the disk answers every request
    # with an I/O error.
    say "write or fsync of f.$i failed"
    break
  fi
  marker "FSYNCED f.$i $(md5sum <$f | cut -d' ' -f1)"
  # Never synced: ext4 writes it back whenever it likes.
  dd if=/dev/urandom of=/mnt/t/scratch/s.$i bs=64k count=$((i % 4 + 1)) status=none || break
  i=$((i + 1))
  [ $i -eq "$cut_after" ] && marker "CUT-NOW"
done
# The host kills QEMU; never report PASS from here.
sleep 3600
