#!/usr/bin/env bash
# OS builds: a cold build of a minimal Debian 12 image through the server against
# mmdebstrap and the same disk steps run directly (same package set, same run, both
# with an empty package cache), a warm build (same OS and packages, other files and
# commands), a boot of the image under qemu (TCG, UEFI) to a marker on its console, and
# a warm build with the server's boot check (verify=boot).
# Prints one line per figure; BENCHMARKS.md records a run.
#
#   bench/os.sh            (bench/run.sh runs it too)
#
# Needs root, the packages tools/os-packages.sh installs, and a Debian mirror in this
# machine's apt sources (nothing here names a host).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/os-packages.sh --boot
# CONDUCTOR_BIN runs another build of the server (the time is the tools', not ours).
if [ -z "${CONDUCTOR_BIN:-}" ]; then cargo build --locked --release --quiet; fi
BIN=${CONDUCTOR_BIN:-$PWD/target/release/conductor}
WORK=$(mktemp -d /var/tmp/conductor-os-bench.XXXXXX)
trap 'kill $(cat "$WORK/pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$WORK"' EXIT
MIRROR=$(grep -hoE '^(URIs: *|deb +)(\[[^]]*\] +)?https?://[^ ]*debian/?( |$)' \
           /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
         | grep -oE 'https?://[^ ]*' | grep -v security | head -n1 || true)
SECURITY=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
             /etc/apt/sources.list.d/*.list 2>/dev/null | grep -oE 'https?://[^ ]*-security/?' | head -n1 || true)
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }

# --- direct: the same tools, by hand ------------------------------------------------
D=$WORK/direct; mkdir -p "$D/cache"
SOURCES=("deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main")
[ -n "$SECURITY" ] && SOURCES+=("deb $SECURITY bookworm-security main")
t0=$(now)
mmdebstrap --mode=unshare --variant=minbase --quiet \
  --include=systemd-sysv,udev,initramfs-tools,systemd-boot-efi,zstd,e2fsprogs \
  --skip=essential/unlink --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
  --setup-hook="sync-in $D/cache /var/cache/apt/archives/" \
  --essential-hook='mkdir -p "$1"/etc/initramfs-tools/conf.d && echo FSTYPE=ext4 > "$1"/etc/initramfs-tools/conf.d/rootfs' \
  --customize-hook='chroot "$1" apt-get install -y --no-install-recommends linux-image-amd64' \
  --customize-hook="sync-out /var/cache/apt/archives $D/cache" \
  --customize-hook='echo hello > "$1"/etc/motd; : > "$1"/etc/machine-id; rm -rf "$1"/var/lib/apt/lists/*' \
  bookworm "$D/tree" "${SOURCES[@]}" </dev/null >"$WORK/direct.log" 2>&1 || { tail -20 "$WORK/direct.log" >&2; exit 1; }
cp -L "$D/tree/vmlinuz" "$D/tree/initrd.img" "$D/"
mkfs.ext4 -q -F -L root -d "$D/tree" "$D/root.img" 1790M
mkfs.vfat -C -F 32 -h 2048 -n ESP "$D/esp.img" 262144 >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$D/esp.img" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries ::/syslinux
mcopy -i "$D/esp.img" "$D/tree/usr/lib/systemd/boot/efi/systemd-bootx64.efi" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$D/esp.img" "$D/vmlinuz" "$D/initrd.img" ::/
syslinux --install --directory /syslinux "$D/esp.img"
truncate -s 2G "$D/disk.raw"
printf 'label: gpt\nstart=1MiB, size=256MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\nstart=257MiB, size=1790MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709\n' \
  | sfdisk -q "$D/disk.raw"
dd if="$D/esp.img" of="$D/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$D/root.img" of="$D/disk.raw" bs=1M seek=257 conv=notrunc,sparse status=none
t1=$(now)
direct=$(secs "$t0" "$t1")
rm -rf "$D"

# --- through the server --------------------------------------------------------------
DATA=$WORK/data
CONDUCTOR_ADMIN_PASSWORD=bench "$BIN" serve --listen 127.0.0.1:3917 --data "$DATA" \
  >"$WORK/server.log" 2>&1 & echo $! > "$WORK/pid"
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:3917/healthz >/dev/null && break; sleep 0.2; done
build() { # $1: template name, $2: file content, $3: command, $4: more of the request; prints seconds to COMPLETE
  local tdl="<template><name>$1</name><os><name>Debian</name><version>12</version><arch>x86_64</arch><install type='url'><url>$MIRROR</url></install></os><files><file name='/etc/motd'>$2</file></files><commands><command name='c'>$3</command></commands><disk><size>2G</size></disk></template>"
  local start ti status
  start=$(now)
  ti=$(curl -sf -u admin:bench -X POST http://127.0.0.1:3917/api/images \
         -d "<image><targets>mock</targets><tdl>$tdl</tdl>${4:-}</image>" | grep -oE 'target_image href="[^"]*"' | grep -oE 'http[^"]*')
  while :; do
    status=$(curl -sf -u admin:bench "$ti" | grep -oE '<status>[A-Z]+' | cut -c9-)
    case $status in COMPLETE) break;; FAILED|CANCELLED) echo "build $1 $status" >&2; exit 1;; esac
    sleep 0.5
  done
  secs "$start" "$(now)"
  echo "$ti" > "$WORK/last"
}
cold=$(build cold hello 'true')
warm=$(build warm "other $(date +%s)" 'echo warm > /etc/warm')

# --- boot to a marker ----------------------------------------------------------------
marker=$(build boot marker "printf '[Unit]\nAfter=multi-user.target\n[Service]\nType=oneshot\nExecStart=/bin/sh -c \"echo BENCH-MARKER > /dev/ttyS0\"\n[Install]\nWantedBy=multi-user.target\n' > /etc/systemd/system/m.service; systemctl enable m.service")
curl -sf -u admin:bench -o "$WORK/boot.raw" "$(cat "$WORK/last")/data"
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$WORK/vars.fd"
t0=$(now)
qemu-system-x86_64 -accel tcg -cpu max -machine q35 -smp 1 -m 1024 -nodefaults -display none \
  -no-reboot -nic none -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
  -drive if=pflash,format=raw,file="$WORK/vars.fd" -drive file="$WORK/boot.raw",format=raw,if=virtio,snapshot=on \
  -serial file:"$WORK/console" & qemu=$!
until grep -q BENCH-MARKER "$WORK/console" 2>/dev/null; do
  sleep 0.5
  if [ "$(echo "$(secs "$t0" "$(now)") > 600" | bc)" = 1 ]; then echo "no marker after 600 s" >&2; break; fi
done
boot=$(secs "$t0" "$(now)")
kill $qemu

# --- a warm build with the server's boot check --------------------------------------------
checked=$(build checked "checked $(date +%s)" 'true' "<parameters><parameter name='verify'>boot</parameter></parameters>")
check=$(curl -sf -u admin:bench "$(cat "$WORK/last")" | grep -oE '<boot_check [^>]*' )
check_result=$(echo "$check" | grep -oE 'result="[^"]*"' | cut -d'"' -f2)
check_secs=$(echo "$check" | grep -oE 'seconds="[0-9]+"' | cut -d'"' -f2)

ratio=$(echo "scale=2; $cold / $direct" | bc)
quarter=$(echo "scale=2; $warm / $cold" | bc)
printf 'os cold build        %6.1f s   direct mmdebstrap + disk steps %6.1f s   ratio %s   budget 1.15  %s\n' \
  "$cold" "$direct" "$ratio" "$( [ "$(echo "$ratio <= 1.15" | bc)" = 1 ] && echo met || echo MISSED)"
printf 'os warm build        %6.1f s   of cold %s   budget < 30 s and < 0.25  %s\n' \
  "$warm" "$quarter" "$( [ "$(echo "$warm < 30 && $quarter < 0.25" | bc)" = 1 ] && echo met || echo MISSED)"
printf 'os build with a unit %6.1f s   (warm)\n' "$marker"
printf 'os boot to marker    %6.1f s   qemu TCG, UEFI, 1 vCPU\n' "$boot"
printf 'os checked build     %6.1f s   (warm) of which the boot check %s s, %s\n' "$checked" "$check_secs" "$check_result"
