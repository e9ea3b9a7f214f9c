#!/usr/bin/env bash
# Installs what the real-Linux-guest test (tests/qemu_linux.rs) needs on a
# Debian machine: QEMU (run with TCG: this machine's KVM cannot boot Linux),
# qemu-img, a static busybox for the guest's initramfs, e2fsprogs (mkfs.ext4
# -d builds the guest's disks), and a Debian kernel: the package that
# linux-image-cloud-amd64 points to is fetched with `apt-get download`, and its
# vmlinuz plus the virtio modules the guest needs are extracted with
# `dpkg-deb -x` into $CKPTFS_LINUX_CACHE (default /var/cache/ckptfs/linux).
# Idempotent: apt runs only when something is missing, a cached kernel is kept.
set -euo pipefail

cache=${CKPTFS_LINUX_CACHE:-/var/cache/ckptfs/linux}
# The cloud flavour: virtio and ext4 support, few other drivers, so it boots
# quickly under TCG. Any Debian linux-image package works (see the README).
kernel_meta=${CKPTFS_LINUX_PACKAGE:-linux-image-cloud-amd64}
# Modules for a virtio-blk disk on PCI, in load order (each after what it
# depends on). ext4 and the MBR partition parser are built in (checked below).
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

apt_updated=
apt_update() {
  [ -n "$apt_updated" ] || apt-get update -qq
  apt_updated=1
}

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v dpkg-deb >/dev/null || need+=(dpkg)
# busybox (dynamic) and busybox-static both install /bin/busybox: the initramfs
# has no libc, so it must be the static one.
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
  need+=(busybox-static)
if ((${#need[@]})); then
  echo "setup-qemu: installing ${need[*]}" >&2
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# A cached kernel is complete when its load-order file exists (written last).
if [ -e "$cache/current/load-order" ]; then
  exit 0
fi

apt_update
pkg=$(apt-cache depends "$kernel_meta" 2>/dev/null |
  awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
# A concrete package name (linux-image-6.1.0-56-cloud-amd64) has no such dependency.
[ -n "$pkg" ] || pkg=$kernel_meta
echo "setup-qemu: downloading $pkg into $cache" >&2
mkdir -p "$cache"
work=$(mktemp -d "$cache/.download.XXXXXX")
trap 'rm -rf "$work"' EXIT
# _apt cannot write into a root-only directory; download as root instead.
(cd "$work" && apt-get download -o APT::Sandbox::User=root "$pkg" >/dev/null)
dpkg-deb -x "$work"/*.deb "$work/x"

out="$work/$pkg"
mkdir -p "$out/modules"
cp "$work"/x/boot/vmlinuz-* "$out/vmlinuz"
cp "$work"/x/boot/config-* "$out/config"
moddir=$(echo "$work"/x/lib/modules/*)
for opt in CONFIG_EXT4_FS CONFIG_MSDOS_PARTITION CONFIG_SERIAL_8250_CONSOLE CONFIG_BLK_DEV_INITRD; do
  grep -qx "$opt=y" "$out/config" || {
    echo "setup-qemu: error: $pkg does not build in $opt; the guest needs it" >&2
    exit 1
  }
done
: >"$out/load-order.tmp"
for m in "${modules[@]}"; do
  if grep -q "/$m.ko\$" "$moddir/modules.builtin"; then
    continue
  fi
  ko=$(find "$moddir" -name "$m.ko" -print -quit)
  if [ -z "$ko" ]; then
    echo "setup-qemu: error: $pkg has no module $m (compressed modules are not supported)" >&2
    exit 1
  fi
  cp "$ko" "$out/modules/"
  echo "$m.ko" >>"$out/load-order.tmp"
done
mv "$out/load-order.tmp" "$out/load-order"
rm -rf "${cache:?}/$pkg"
mv "$out" "$cache/$pkg"
ln -sfn "$pkg" "$cache/current"
echo "setup-qemu: kernel $pkg ready in $cache/current" >&2
