#!/usr/bin/env bash
# Build the guest used by the QEMU tests and `make qemu`:
#   images/build/vmlinuz          Debian cloud kernel (virtio drivers as modules)
#   images/build/initramfs.cpio   busybox + e2fsprogs + fio + our init and tests
#
# Everything comes from Debian packages: the kernel and busybox are fetched
# with `apt-get download` (never a URL), the other tools are copied from the
# host's installed packages together with the libraries `ldd` lists.
# Results are reused: a second run only rebuilds what its inputs changed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$here/build
debs=$out/debs
mkdir -p "$debs"

# Several test runs (or engineers) may build at once; the second waits for
# the first and then finds everything up to date.
exec 9>"$out/.lock"
flock 9

log() { printf 'images: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- Debian packages ------------------------------------------------------

# `apt-get download` needs package lists; a fresh container has none, so
# refresh them once (as root) rather than fail.
apt_ready() {
  apt-cache show "$1" >/dev/null 2>&1 && return 0
  [[ $(id -u) == 0 ]] || die "apt has no package '$1'; run 'apt-get update' as root"
  log "refreshing apt package lists"
  apt-get update -qq
  apt-cache show "$1" >/dev/null 2>&1 || die "apt has no package '$1'"
}

# Fetch one package into $debs unless a .deb of it is already there, then
# print the path of the .deb.
fetch_deb() {
  local pkg=$1 deb
  deb=$(find "$debs" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
  if [[ -z $deb ]]; then
    apt_ready "$pkg"
    log "downloading $pkg"
    # apt-get drops privileges to _apt for downloads; it warns (harmlessly)
    # when _apt cannot write here, so run it quietly from inside $debs.
    (cd "$debs" && apt-get download -qq "$pkg" 2>/dev/null) ||
      (cd "$debs" && apt-get download "$pkg")
    deb=$(find "$debs" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
    [[ -n $deb ]] || die "apt-get download $pkg produced no .deb"
  fi
  printf '%s\n' "$deb"
}

# The kernel: the ABI the distribution's cloud meta-package currently points
# at, in its -unsigned flavour (same kernel and modules, without the Secure
# Boot signature we have no use for). KERNEL_PKG overrides the choice.
if [[ -z ${KERNEL_PKG:-} ]]; then
  apt_ready linux-image-cloud-amd64
  signed=$(apt-cache depends linux-image-cloud-amd64 |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  [[ -n $signed ]] || die "cannot tell which kernel linux-image-cloud-amd64 depends on"
  KERNEL_PKG=$signed-unsigned
fi
kernel_deb=$(fetch_deb "$KERNEL_PKG")
busybox_deb=$(fetch_deb busybox-static)

# Unpack each .deb once, into a directory named after the .deb itself so
# that a newer package version unpacks next to (not over) the old one.
unpack() {
  local deb=$1 dir
  dir=$out/unpacked/$(basename "$deb" .deb)
  if [[ ! -e $dir/.done ]]; then
    rm -rf "$dir" && mkdir -p "$dir"
    dpkg-deb -x "$deb" "$dir"
    touch "$dir/.done"
  fi
  printf '%s\n' "$dir"
}
kroot=$(unpack "$kernel_deb")
bbroot=$(unpack "$busybox_deb")
busybox=$bbroot/bin/busybox
[[ -x $busybox ]] || die "no busybox in $busybox_deb"

kver=$(basename "$(find "$kroot/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)")
[[ -n $kver ]] || die "no /lib/modules in $kernel_deb"
moddir=$kroot/lib/modules/$kver

# The .deb ships no modules.dep (the postinst runs depmod). The host may have
# no kmod, but the static busybox we just unpacked has a depmod that runs here.
[[ -s $moddir/modules.dep ]] || "$busybox" depmod -b "$kroot" "$kver"

# --- kernel modules: virtio_pci and virtio_blk with their dependencies ---

# modules.dep lists, for each module, every module it needs (the transitive
# closure). Visit dependencies first, depth-first, to get an order in which
# each insmod finds its symbols already loaded.
declare -A visited=()
load_order=()
dep_line() { grep -E "(^|/)$1\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | head -n1; }
visit() {
  local path=$1 dep
  [[ -n ${visited[$path]:-} ]] && return 0
  visited[$path]=1
  for dep in $(grep -E "^${path//./\\.}:" "$moddir/modules.dep" | cut -d: -f2); do
    visit "$dep"
  done
  load_order+=("$path")
}
for root in virtio_pci virtio_blk; do
  line=$(dep_line "$root")
  [[ -n $line ]] || die "$root is not a module of $kver (built in? check its config)"
  visit "${line%%:*}"
done

# --- the initramfs --------------------------------------------------------

# Everything that goes into the initramfs, hashed: if nothing changed since
# the last build, keep the old one.
tools=(fio mke2fs mkfs.ext4 e2fsck)
tool_paths=()
for t in "${tools[@]}"; do
  p=$(PATH=$PATH:/sbin:/usr/sbin command -v "$t") || die "$t not found on the host (apt-get install e2fsprogs fio)"
  tool_paths+=("$(readlink -f "$p")")
done
stamp=$( {
  echo "$kernel_deb $busybox_deb ${load_order[*]}"
  sha256sum "$0" $(find "$here/guest" -type f | sort) "${tool_paths[@]}"
} | sha256sum | cut -d' ' -f1)

if [[ -e $out/initramfs.cpio && $(cat "$out/initramfs.stamp" 2>/dev/null) == "$stamp" ]]; then
  log "initramfs up to date ($out/initramfs.cpio)"
else
  log "assembling initramfs for kernel $kver"
  root=$out/rootfs
  rm -rf "$root"
  mkdir -p "$root"/{bin,dev,etc,lib/modules,mnt,proc,sys,tmp,usr/bin}

  # busybox provides the shell and every small utility, as /bin symlinks.
  cp "$busybox" "$root/bin/busybox"
  for applet in $("$busybox" --list); do
    [[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
  done

  # Real tools go to /usr/bin, which init puts first in PATH, so that they
  # win over busybox applets of the same name (mke2fs).
  for i in "${!tools[@]}"; do
    cp "${tool_paths[$i]}" "$root/usr/bin/${tools[$i]}"
    # Each library at the path the dynamic loader expects it.
    ldd "${tool_paths[$i]}" | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }' |
      while read -r lib; do
        [[ -e $root$lib ]] || { mkdir -p "$root$(dirname "$lib")" && cp -L "$lib" "$root$lib"; }
      done
  done
  [[ -e /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$root/etc/"

  # Modules flat in /lib/modules, with the order init loads them in.
  : >"$root/etc/modules.load"
  for m in "${load_order[@]}"; do
    name=$(basename "$m")
    case $name in
      *.ko) cp "$moddir/$m" "$root/lib/modules/$name" ;;
      # Some kernels compress modules; busybox insmod may not, so unpack here.
      *.ko.xz) "$busybox" unxz -c "$moddir/$m" >"$root/lib/modules/${name%.xz}"; name=${name%.xz} ;;
      *) die "unsupported module file $m" ;;
    esac
    echo "$name" >>"$root/etc/modules.load"
  done

  cp "$here/guest/init" "$root/init"
  cp -r "$here/guest/tests" "$root/tests"
  chmod 0755 "$root/init" "$root"/tests/*.sh

  # newc is the format the kernel unpacks. Uncompressed on purpose: under
  # TCG, decompressing in the guest costs more than copying a bigger initrd.
  (cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) >"$out/initramfs.cpio.tmp"
  mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
  echo "$stamp" >"$out/initramfs.stamp"
  # The tree is only the cpio's source; the stamp decides on rebuilds.
  rm -rf "$root"
fi

# The kernel image under a fixed name, for qemu.sh and tests/guest.rs.
cmp -s "$kroot/boot/vmlinuz-$kver" "$out/vmlinuz" 2>/dev/null ||
  cp "$kroot/boot/vmlinuz-$kver" "$out/vmlinuz"
log "ready: $out/vmlinuz ($kver), $out/initramfs.cpio (modules: ${load_order[*]##*/})"
