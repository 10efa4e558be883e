#!/bin/bash
# arm64 lane: goheap built and tested in a Debian arm64 userland under
# qemu-user-static (binfmt_misc), on this x86-64 host.  4 KiB pages, like most
# arm64 Linux; what it adds over native is the other ISA: the cffi build with
# the arm64 compiler and ABI, the C core's atomics and memory ordering, and
# the kernel ABI differences qemu passes through (mmap flags, signals).
#
# Usage: lanes/arm64.sh [PYTEST-ARGS...]     (default: the whole suite)
#   e.g. lanes/arm64.sh -m pagesize          (the page-size-sensitive subset)
# Needs root.  The Debian root (python3, gcc, cffi, psutil, pytest,
# hypothesis, numpy from Debian: no PyPI inside) is cached in lanes/work/.
# LANE_TIMEOUT bounds the test run (seconds, default 1800).
LANE=arm64
. "$(dirname "$0")/lib.sh"

need_root
lock_work arm64
host_install qemu-user-static binfmt-support debootstrap
binfmt aarch64
timed "rootfs arm64 (cached if warm)" rootfs arm64
R=$ROOTFS

timed "copy checkout" copy_checkout "$R/proj"
mount_guest "$R"
arch=$(in_guest "$R" 'uname -m')
[ "$arch" = aarch64 ] || die "the chroot runs as $arch, not aarch64: binfmt is not in effect"
timed "build extension (arm64)" in_guest "$R" "$GUEST_BUILD" \
    || die "goheap's extension does not build on arm64"

args=$(printf ' %q' "$@")
say "pytest$args (emulated arm64, $(in_guest "$R" 'python3 -c "import platform; print(platform.machine(), platform.python_version())"'))"
if ! timed "pytest arm64" timeout "${LANE_TIMEOUT:-1800}" \
    chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 GOHEAP_LANE=qemu-user /bin/sh -c "cd /proj && exec python3 -m pytest -p no:cacheprovider$args"
then
    die "the suite failed on arm64 (or hit the ${LANE_TIMEOUT:-1800}s bound)"
fi
say "arm64 lane passed"
