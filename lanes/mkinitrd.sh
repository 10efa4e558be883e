#!/bin/bash
# mkinitrd.sh MODROOT KVER BUSYBOX OUT
# A tiny initramfs for the real-kernel lanes: a static busybox (of the guest's
# architecture) plus the modules for a virtio-blk ext4 root, built on the host
# without running anything foreign.  Debian's own mkinitramfs would have to run
# emulated inside the guest root and takes minutes per kernel; this takes
# well under a second.
#   MODROOT  directory holding lib/modules/KVER (an unpacked kernel .deb)
#   BUSYBOX  static busybox binary for the guest architecture
# If the root cannot be mounted, the initrd prints a failing lane result and
# powers off, so the host sees the failure at once instead of at its timeout.
set -euo pipefail
modroot=$1 kver=$2 busybox=$3 out=$4

[ -d "$modroot/lib/modules/$kver" ] || modroot=$modroot/usr   # usr-merged kernel packages
mods=$modroot/lib/modules/$kver
[ -d "$mods" ] || { echo "mkinitrd: no $mods" >&2; exit 1; }
[ -f "$mods/modules.dep" ] || depmod -b "$modroot" "$kver"   # ppc64el's .deb ships none

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,lib/modules,newroot,proc,sys,dev}
cp "$busybox" "$stage/bin/busybox"
for applet in sh mount umount insmod switch_root sleep cat echo poweroff; do
    ln -s busybox "$stage/bin/$applet"
done

# Resolve the wanted modules and their dependencies, dependencies first.
# A module that is built in has no .ko and is simply not found: fine.
order=()
module_path() {  # name -> relative path in modules.dep ('-' and '_' are the same)
    local re
    re=$(printf '%s' "$1" | sed 's/[-_]/[-_]/g')
    grep -E "(^|/)${re}\.ko(\.xz|\.zst|\.gz)?:" "$mods/modules.dep" | head -1 | cut -d: -f1 || true
}
add_module() {
    local path dep seen
    path=$(module_path "$1")
    [ -n "$path" ] || return 0
    for seen in "${order[@]}"; do [ "$seen" = "$path" ] && return 0; done
    for dep in $(grep -E "^${path}:" "$mods/modules.dep" | cut -d: -f2); do
        add_module "$(basename "$dep" | sed 's/\.ko.*//')"
    done
    order+=("$path")
}
for m in virtio_pci virtio_mmio virtio_blk crc32c_generic crc32c ext4; do add_module "$m"; done

: >"$stage/modlist"
for path in "${order[@]}"; do
    name=$(basename "$path" | sed 's/\.\(xz\|zst\|gz\)$//')
    case $path in
        *.xz) xz -dc "$mods/$path" ;;
        *.zst) zstd -qdc "$mods/$path" ;;
        *.gz) gzip -dc "$mods/$path" ;;
        *) cat "$mods/$path" ;;
    esac >"$stage/lib/modules/$name"
    echo "$name" >>"$stage/modlist"
done

cat >"$stage/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modlist); do insmod /lib/modules/$m 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
init=/sbin/init
for a in $(cat /proc/cmdline); do case $a in init=*) init=${a#init=} ;; esac; done
if ! mount -t ext4 -o rw /dev/vda /newroot; then
    verdict=FAIL
    echo "GOHEAP-LANE-RESULT: $verdict (initrd could not mount /dev/vda)"
    poweroff -f
fi
umount /proc /sys /dev
exec switch_root /newroot "$init"
EOF
chmod +x "$stage/init"
(cd "$stage" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$out"
echo "initrd modules: $(tr '\n' ' ' <"$stage/modlist")" >&2
