#!/bin/bash
# Real-kernel lanes: boot Debian kernels whose OS page is not 4 KiB under
# full-system emulation (TCG, no KVM needed) and run the page-size-sensitive
# tests (pytest -m pagesize) inside, on a root filesystem holding goheap.
#   arm64-16k: Debian's linux-image-arm64-16k (trixie; bookworm-backports,
#              CONFIG_ARM64_16K_PAGES) under qemu-system-aarch64 -M virt
#   ppc64el-64k: Debian's ppc64el kernel (CONFIG_PPC_64K_PAGES) under
#              qemu-system-ppc64 -M pseries; Debian has no 64K arm64 kernel,
#              and for the page-size rules the architecture does not matter
# Unlike the shim, these are the kernel's own rules, all of them, for every
# caller (glibc's internal calls included).
#
# Usage: lanes/kernels.sh [LANE...] [-- PYTEST-ARGS...]
#   LANE: arm64-16k, ppc64el-64k (default both); PYTEST-ARGS default: -m "pagesize and not slow and not heavy" --durations=15
#   (the slow-marked full sweeps would take hours under TCG)
#   LANE_VM_TIMEOUT bounds each boot-and-test (seconds, default 1200).
# A lane passes only if the guest prints "GOHEAP-LANE-RESULT: PASS" after
# checking its page size and running pytest; anything else (a failure, a
# panic, a hang cut off by the timeout) fails it.
LANE=kernels
. "$(dirname "$0")/lib.sh"

lanes=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do lanes+=("$1"); shift; done
[ "${1:-}" = -- ] && shift
[ ${#lanes[@]} -gt 0 ] || lanes=(arm64-16k ppc64el-64k)
[ $# -gt 0 ] || set -- -m "pagesize and not slow and not heavy" --durations=15
pytest_args=$(printf ' %q' "$@")

need_root

# apt for a foreign architecture in a private state directory: it only
# downloads .debs (the host's dpkg is never touched, nothing foreign runs).
xapt_opts() {
    local d=$WORK/apt-$1
    echo "-o Dir::State::Lists=$d/lists -o Dir::Cache=$d/cache -o Dir::Etc::SourceList=$d/sources.list" \
        "-o Dir::Etc::SourceParts=/dev/null -o Dir::Etc::Preferences=/dev/null" \
        "-o Dir::Etc::PreferencesParts=/dev/null -o APT::Architecture=$1 -o APT::Architectures::=$1"
}

# fetch_kernel ARCH META: unpack the kernel META depends on, plus a static
# busybox, into $WORK/kernel-ARCH, and build its initrd.  Sets KDIR and KVER.
fetch_kernel() {
    local arch=$1 meta=$2 d=$WORK/apt-$1 suite
    suite=$(suite_for "$1")
    KDIR=$WORK/kernel-$arch
    mkdir -p "$d/lists/partial" "$d/cache/archives/partial"
    # bookworm has the 16K kernel only in backports; trixie has it in main
    printf 'deb [arch=%s] %s %s main\n' "$arch" "$MIRROR" "$suite" >"$d/sources.list"
    [ "$suite" != bookworm ] \
        || printf 'deb [arch=%s] %s %s main\n' "$arch" "$MIRROR" bookworm-backports >>"$d/sources.list"
    # shellcheck disable=SC2046
    apt-get $(xapt_opts "$arch") update -qq >/dev/null 2>"$d/update.err" \
        || skip "cannot fetch the $arch package lists: $(tail -2 "$d/update.err")"
    local pkg
    # shellcheck disable=SC2046
    pkg=$(apt-cache $(xapt_opts "$arch") depends "$meta" 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$pkg" ] || skip "no $meta for $arch in $suite"
    KVER=${pkg#linux-image-}
    if [ -f "$KDIR/.lane-recipe" ] && [ "$(cat "$KDIR/.lane-recipe")" = "$pkg" ]; then
        return 0
    fi
    rm -rf "$KDIR" "$d/cache/archives/"*.deb
    # shellcheck disable=SC2046
    (cd "$d/cache/archives" && apt-get $(xapt_opts "$arch") download "$pkg" busybox-static \
        >/dev/null 2>"$d/download.err") \
        || skip "cannot download $pkg for $arch: $(tail -2 "$d/download.err")"
    mkdir -p "$KDIR/bb"
    dpkg-deb -x "$d/cache/archives/${pkg}_"*.deb "$KDIR"
    dpkg-deb -x "$d/cache/archives/busybox-static_"*.deb "$KDIR/bb"
    bash "$LANES_DIR/mkinitrd.sh" "$KDIR" "$KVER" "$KDIR/bb/bin/busybox" "$KDIR/initrd.gz"
    rm -f "$d/cache/archives/"*.deb
    # keep only what the boot needs: the modules are in the initrd now
    find "$KDIR" -mindepth 1 -maxdepth 1 ! -name boot ! -name initrd.gz -exec rm -rf {} +
    echo "$pkg" >"$KDIR/.lane-recipe"
}

# The guest's init: mounts, checks the page size it was booted for, runs the
# tests, prints the verdict and powers off.  The verdict word comes from a
# variable, so the script's own text never contains a passing marker.
write_guest_init() {
    local root=$1 want_page=$2
    cat >"$root/lane-init" <<EOF
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
# Debian's ppc64el kernel turns transparent huge pages on for every mapping
# (16 MiB each at 64 KiB pages): one byte touched per 1 MiB span would then
# fault in 16 MiB.  The tests measure goheap, not that policy: use the
# madvise setting most distributions ship.
[ -w /sys/kernel/mm/transparent_hugepage/enabled ] && echo madvise > /sys/kernel/mm/transparent_hugepage/enabled
verdict=FAIL
page=\$(getconf PAGESIZE)
echo "GOHEAP-LANE-GUEST: \$(uname -srm) PAGESIZE=\$page nproc=\$(nproc) THP=\$(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
if [ "\$page" != "$want_page" ]; then
    echo "guest page size is \$page, this lane needs $want_page"
    rc=wrong-page-size
else
    cd /proj && python3 -m pytest -p no:cacheprovider$pytest_args
    rc=\$?
    [ \$rc = 0 ] && verdict=PASS
fi
echo "GOHEAP-LANE-RESULT: \$verdict (pytest rc=\$rc)"
sync
echo o >/proc/sysrq-trigger
sleep 30
EOF
    chmod +x "$root/lane-init"
}

# run_lane NAME ARCH META PAGE: one kernel, booted once.
run_lane() {
    local name=$1 arch=$2 meta=$3 page=$4
    LANE=$name
    lock_work "$arch"
    timed "rootfs $arch (cached if warm)" rootfs "$arch"
    local root=$ROOTFS
    timed "kernel $arch (cached if warm)" fetch_kernel "$arch" "$meta"
    say "kernel $KVER"
    # The extension is built in the guest root on the host (emulated user
    # mode is faster than the VM), then the root becomes an ext4 image:
    # mke2fs -d needs no loop device.
    timed "copy checkout" copy_checkout "$root/proj"
    mount_guest "$root"
    timed "build extension ($arch)" in_guest "$root" "$GUEST_BUILD" \
        || die "goheap's extension does not build on $arch"
    umount_guest
    write_guest_init "$root" "$page"
    local img=$WORK/$name.img log=$WORK/$name.log
    rm -f "$img"
    timed "ext4 image" mke2fs -q -F -t ext4 -d "$root" "$img" 3G || die "mke2fs failed"
    rm -rf "$root/proj" "$root/lane-init"

    local qemu common=(-smp 2 -m 4096 -nographic -no-reboot -nic none
        -drive "file=$img,format=raw,if=virtio"
        -initrd "$KDIR/initrd.gz")
    local append="root=/dev/vda rw quiet loglevel=3 panic=-1 init=/lane-init"
    case $arch in
        arm64)
            # max,pauth=off: fastest TCG model that has the 16K granule
            # (a64fx hangs: no 16K granule).  -nic none: no romfile needed.
            qemu=(qemu-system-aarch64 -M virt -cpu max,pauth=off "${common[@]}"
                -kernel "$KDIR/boot/vmlinuz-$KVER" -append "console=ttyAMA0 $append")
            ;;
        ppc64el)
            qemu=(qemu-system-ppc64 -M pseries -cpu power9 -vga none "${common[@]}"
                -kernel "$KDIR/boot/vmlinux-$KVER" -append "console=hvc0 $append")
            ;;
    esac
    say "booting: ${qemu[*]}"
    local t=${LANE_VM_TIMEOUT:-1200}
    timed "boot + pytest ($name)" timeout --kill-after=15 "$t" "${qemu[@]}" </dev/null 2>&1 \
        | sed -u 's/\r$//' | tee "$log" >&2 || true
    rm -f "$img"
    grep -a -q '^GOHEAP-LANE-RESULT: PASS' "$log" && return 0
    if grep -a -q '^GOHEAP-LANE-RESULT: FAIL' "$log"; then
        say "guest reported: $(grep -a '^GOHEAP-LANE-RESULT' "$log" | tail -1)"
    else
        say "no result marker from the guest (panic, hang or ${t}s timeout); log: $log"
    fi
    return 1
}

host_install qemu-user-static binfmt-support debootstrap qemu-system-arm qemu-system-ppc \
    e2fsprogs cpio kmod xz-utils zstd
failed=() skipped=() passed=()
for lane in "${lanes[@]}"; do
    rc=0
    # each lane in a subshell: a skip (77) or failure of one leaves the other to run
    case $lane in
        arm64-16k) (SKIP_EXIT=77; binfmt aarch64; run_lane arm64-16k arm64 linux-image-arm64-16k 16384) || rc=$? ;;
        ppc64el-64k) (SKIP_EXIT=77; binfmt ppc64le; run_lane ppc64el-64k ppc64el linux-image-powerpc64le 65536) || rc=$? ;;
        *) die "unknown lane $lane (arm64-16k, ppc64el-64k)" ;;
    esac
    case $rc in
        0) passed+=("$lane") ;;
        77) skipped+=("$lane") ;;
        *) failed+=("$lane") ;;
    esac
done
say "passed: ${passed[*]:-none}; skipped: ${skipped[*]:-none}; failed: ${failed[*]:-none}"
[ ${#failed[@]} = 0 ] || die "failed: ${failed[*]}"
