# First half of the power-off test: write 8 MiB with O_DIRECT and a record of
# its checksum, and do NOT flush: the backend must make the writes durable and
# its metadata current when the guest powers off (init runs poweroff -f).
. /tests/lib.sh

dd if=/dev/urandom of=/tmp/p bs=1M count=8 status=none
write_mib /tmp/p 32 8
write_record persist "$(md5sum </tmp/p | cut -d' ' -f1)"
say "wrote 8 MiB at 32 MiB, unflushed"
