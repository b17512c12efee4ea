# Second half of the power-off test, in a new QEMU: the data written by the
# previous boot must read back and match the record.
. /tests/lib.sh

want=$(read_record persist)
[ -n "$want" ] || die "no record from the previous boot"
got=$(read_mib 32 8 | md5sum | cut -d' ' -f1)
[ "$got" = "$want" ] || die "data of the previous boot differs: md5 $got, want $want"
say "previous boot's data read back"
