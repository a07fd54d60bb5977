#!/usr/bin/env bash
# Installs the Debian packages conductor's OS installs need (mmdebstrap and the disk
# tools; docs/os-builds.md), and with --boot also what boots an image for a check (qemu
# and OVMF). Does nothing when they are all there; on a machine without apt it says
# what is missing and leaves the server to report it (it starts anyway, and builds
# blank disks for templates it cannot install).
set -euo pipefail

packages=(mmdebstrap bubblewrap e2fsprogs dosfstools mtools fdisk syslinux syslinux-common)
programs=(mmdebstrap bwrap mkfs.ext4 debugfs mkfs.vfat mcopy sfdisk syslinux)
if [ "${1:-}" = --boot ]; then
  packages+=(qemu-system-x86 ovmf)
  programs+=(qemu-system-x86_64)
fi

missing=()
for program in "${programs[@]}"; do
  command -v "$program" >/dev/null || PATH=$PATH:/usr/sbin:/sbin command -v "$program" >/dev/null || missing+=("$program")
done
if [ "${1:-}" = --boot ] && [ ! -e /usr/share/OVMF/OVMF_CODE_4M.fd ]; then missing+=(OVMF); fi
if [ "${1:-}" = --boot ] && [ ! -e /usr/lib/syslinux/mbr/gptmbr.bin ]; then missing+=(gptmbr.bin); fi
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
  echo "conductor: OS installs need ${missing[*]} (Debian packages: ${packages[*]});" \
       "install them as root to build real OS images" >&2
  exit 0
fi

echo "== installing the Debian packages OS builds need: ${packages[*]}"
apt-get update -qq
extra=()
# qemu-system-x86 must match an installed qemu-utils: machines of this kind carry
# qemu-utils from bookworm-backports, and bookworm's own qemu-system-x86 would remove
# it (and qemu-img with it). Then take qemu-system-x86 from the same backports suite of
# the mirror this machine already uses, for this one command.
utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
if [ "${1:-}" = --boot ] && [[ "$utils" == *bpo12* ]]; then
  mirror=$(grep -hoE '^(URIs: *|deb +)(\[[^]]*\] +)?https?://[^ ]*debian/?( |$)' \
             /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
           | grep -oE 'https?://[^ ]*' | grep -v security | head -n1 || true)
  if [ -z "$mirror" ]; then
    echo "conductor: no Debian mirror in this machine's apt sources to take qemu from" >&2
    exit 1
  fi
  list=$(mktemp)
  echo "deb $mirror bookworm-backports main" > "$list"
  apt-get update -qq -o Dir::Etc::sourceparts=- -o Dir::Etc::sourcelist="$list" -o APT::Get::List-Cleanup=0
  extra=(-o Dir::Etc::sourceparts=/etc/apt/sources.list.d -o Dir::Etc::sourcelist="$list")
  # Both lists at once: bookworm for the rest, backports for qemu.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${extra[@]}" \
    "qemu-system-x86=$utils" "qemu-system-common=$utils" "qemu-system-data=$utils" "qemu-utils=$utils" \
    -t bookworm-backports >/dev/null
  rm -f "$list"
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
