# Verifying workload: two fio jobs, one per region, random writes of mixed
# sizes with an xxhash in every block, each block verified when read back
# (verify_backlog also verifies while writing), queue depth 16, O_DIRECT.
. /tests/lib.sh

fio --name=verify --filename=$DISK --direct=1 --ioengine=libaio --iodepth=16 \
  --rw=randwrite --bsrange=4k-64k --size=24M --numjobs=2 --offset_increment=64M \
  --verify=xxhash --verify_fatal=1 --verify_backlog=256 --do_verify=1 \
  --randrepeat=0 --group_reporting --output-format=terse --terse-version=3 >/tmp/fio.out ||
  { cat /tmp/fio.out; die "fio failed"; }
# Field 6 of the terse line is the number of read KiB: the verify pass ran.
cut -d';' -f1-10 /tmp/fio.out
say "fio verify ok"
