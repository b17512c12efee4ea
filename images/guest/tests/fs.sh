# Filesystem test: mkfs.ext4 (which also discards the whole disk), mount,
# fill with files of known checksums, sync, unmount, fsck must find nothing;
# mount again and every file must read back; delete half, fstrim, fsck again.
. /tests/lib.sh

mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 $DISK
mkdir -p /mnt/t
mount -t ext4 $DISK /mnt/t

# A mix: many small files, a few big ones, and a deep directory.
i=0
while [ $i -lt 200 ]; do
  dd if=/dev/urandom of=/mnt/t/small.$i bs=$((512 + i * 37)) count=1 status=none
  i=$((i + 1))
done
for n in 1 2 3 4; do dd if=/dev/urandom of=/mnt/t/big.$n bs=1M count=6 status=none; done
mkdir -p /mnt/t/d/e/e/p
cp /mnt/t/big.1 /mnt/t/d/e/e/p/copy
(cd /mnt/t && find . -type f | sort | xargs md5sum >/tmp/sums)
sync
umount /mnt/t

e2fsck -fn $DISK || die "e2fsck found problems after the first unmount"

drop_caches
mount -t ext4 $DISK /mnt/t
(cd /mnt/t && md5sum -c -s /tmp/sums) || die "files changed across unmount/mount"
rm /mnt/t/big.2 /mnt/t/big.4 /mnt/t/small.1*
fstrim /mnt/t || say "fstrim not supported (no discard), continuing"
sync
umount /mnt/t
e2fsck -fn $DISK || die "e2fsck found problems after delete + fstrim"
say "filesystem ok"
