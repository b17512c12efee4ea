# Corruption as the guest sees it: write 64 blocks of 4 KiB, flush, let the
# host flip a byte in one of them, then read each with O_DIRECT. The host says
# which chunk it damaged and whether the backend should refuse it ("error",
# twinsum) or cannot notice ("ok", a plain backend).
. /tests/lib.sh

chunks=64
dd if=/dev/urandom of=/tmp/data bs=4096 count=$chunks status=none
dd if=/tmp/data of=$DISK bs=4096 count=$chunks oflag=direct conv=notrunc,fsync status=none

wait_host corrupt
set -- $HOST_REPLY
bad=$1
expect=$2
say "host damaged 4 KiB chunk $bad, expecting $expect"

i=0
failed=""
while [ $i -lt $chunks ]; do
  if dd if=$DISK of=/tmp/got bs=4096 skip=$i count=1 iflag=direct status=none 2>/tmp/err; then
    if [ $i -ne "$bad" ]; then
      dd if=/tmp/data bs=4096 skip=$i count=1 status=none | cmp -s - /tmp/got ||
        die "chunk $i read but differs from what was written"
    fi
  else
    say "chunk $i: $(cat /tmp/err)"
    failed="$failed $i"
  fi
  i=$((i + 1))
done

case $expect in
  error) [ "$failed" = " $bad" ] || die "expected exactly chunk $bad to fail, failed:${failed:- none}" ;;
  ok) [ -z "$failed" ] || die "expected every chunk to read, failed:$failed" ;;
  *) die "bad host reply '$HOST_REPLY'" ;;
esac
marker "CORRUPT-READS failed=${failed# }"
say "corruption seen as expected"
