# Power-cut test, second boot (after crash-write.sh and the cut): mounting
# replays the ext4 journal, after which fsck must find nothing; every file
# is listed with its md5 ("FILE NAME MD5") for the host to compare with the
# FSYNCED markers of the first boot; the whole disk must read without an
# I/O error (twinsum fails a read only on a checksum mismatch).
. /tests/lib.sh

mkdir -p /mnt/t
mount -t ext4 $DISK /mnt/t
umount /mnt/t
e2fsck -fn $DISK || die "e2fsck found problems after journal replay"

mount -t ext4 -o ro $DISK /mnt/t
n=0
for f in /mnt/t/files/f.*; do
  [ -e "$f" ] || continue
  marker "FILE $(basename $f) $(md5sum <$f | cut -d' ' -f1)"
  n=$((n + 1))
done
umount /mnt/t
say "$n files listed"

dd if=$DISK of=/dev/null bs=1M iflag=direct status=none || die "full read of the disk failed"
marker "FULL-READ ok"
