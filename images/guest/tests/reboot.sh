# Reboot test, one QEMU: the first boot writes data and a record, then
# `reboot -f` (QEMU resets the device and starts the guest again). The second
# boot finds the record, checks the data, and waits for the host, which
# checks the backend's log before letting the guest power off.
. /tests/lib.sh

want=$(read_record reboot)
if [ -z "$want" ]; then
  dd if=/dev/urandom of=/tmp/p bs=1M count=8 status=none
  write_mib /tmp/p 48 8
  write_record reboot "$(md5sum </tmp/p | cut -d' ' -f1)"
  marker "REBOOTING"
  reboot -f
  sleep 3600
fi

got=$(read_mib 48 8 | md5sum | cut -d' ' -f1)
[ "$got" = "$want" ] || die "data of the first boot differs after reboot: md5 $got, want $want"
# Writes after the reboot must work too (and, for twinsum, run in normal mode).
dd if=/dev/urandom of=/tmp/q bs=1M count=4 status=none
write_mib /tmp/q 60 4
expect_mib /tmp/q 60 4
marker "SECOND-BOOT ok"
wait_host poweroff
