# Helpers shared by the guest tests; sourced by each /tests/NAME.sh.
# busybox ash has -e, -u and pipefail: a failing step fails the test.
set -eu
set -o pipefail

DISK=/dev/vda
MIB=1048576

say() { echo "guest: $*"; }
marker() { echo "@@TWINSUM $*@@"; }
die() { say "FAILED: $*"; exit 1; }

disk_bytes() { echo $(($(cat /sys/block/vda/size) * 512)); }
logical_block() { cat /sys/block/vda/queue/logical_block_size; }

# Make the next buffered read come from the disk, not the page cache.
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# Copy COUNT MiB of FILE to the disk at MiB offset OFF, bypassing the page
# cache (O_DIRECT): every write reaches the backend before dd returns.
write_mib() { dd if="$1" of=$DISK bs=1M seek="$2" count="$3" oflag=direct conv=notrunc status=none; }
# Read COUNT MiB at MiB offset OFF with O_DIRECT to stdout.
read_mib() { dd if=$DISK bs=1M skip="$1" count="$2" iflag=direct status=none; }

# Compare COUNT MiB of the disk at OFF with FILE, naming the region on error.
expect_mib() {
  read_mib "$2" "$3" | cmp - "$1" || die "disk at ${2} MiB (+${3} MiB) differs from $1"
}

# Hand over to the host: print "WAIT WHAT" and read console lines until the
# host answers "host:WHAT ARGS..."; ARGS lands in HOST_REPLY. The console
# echoes what the host types, which is harmless.
wait_host() {
  marker "WAIT $1"
  while read -r word rest; do
    if [ "$word" = "host:$1" ]; then
      HOST_REPLY=$rest
      return 0
    fi
  done
  die "console closed while waiting for host:$1"
}

# A record in one logical block at MiB offset 100, so that a later boot can
# check what an earlier one wrote: "twinsum-record KEY VALUE".
RECORD_MIB=100
write_record() {
  printf 'twinsum-record %s %s\n' "$1" "$2" >/tmp/record
  dd if=/tmp/record of=$DISK bs=1M seek=$RECORD_MIB count=1 conv=sync oflag=direct status=none
}
# Print the VALUE of the record if its KEY matches, nothing otherwise. Read
# exactly one logical block: a reader that stops early would SIGPIPE dd.
read_record() {
  bs=$(logical_block)
  dd if=$DISK bs="$bs" skip=$((RECORD_MIB * MIB / bs)) count=1 iflag=direct status=none |
    tr -d '\000' | sed -n "s/^twinsum-record $1 \\([^ ]*\\)\$/\\1/p"
}
