#!/usr/bin/env bash
# Install the Debian packages the tests need (QEMU for the guest tests,
# busybox/cpio/e2fsprogs/fio for the guest image), only those missing.
# Without root it says what to install and carries on: the guest tests then
# skip with a message.
set -euo pipefail

packages=(qemu-system-x86 qemu-system-common busybox-static cpio e2fsprogs fio)
need=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
((${#need[@]})) || exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing ${need[*]}; run: sudo apt-get install ${need[*]}" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}"
