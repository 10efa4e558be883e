#!/bin/bash
# Build the emulated lanes' Debian roots ahead of time, so .ci/run can start
# them in the background while the native suite, lint and the sanitizers run.
# On a cold machine each root is minutes of single-threaded emulation
# (debootstrap's second stage); overlapped with the native lanes on the other
# core, it leaves the critical path.
#
# Usage: lanes/prepare.sh [ARCH...]     (default: arm64 ppc64el)
# Each root is built under the architecture's lock in $WORK (lib.sh's
# lock_work), so a lane that starts before its root is ready waits for it and
# then finds it cached.  A root that cannot be built here is left to its lane,
# which reports LANE SKIPPED or FAILED itself: this script never fails CI.
LANE=prepare
. "$(dirname "$0")/lib.sh"

need_root
host_install qemu-user-static binfmt-support debootstrap
arches=("$@")
[ ${#arches[@]} -gt 0 ] || arches=(arm64 ppc64el)
for arch in "${arches[@]}"; do
    (
        SKIP_EXIT=77
        lock_work "$arch"
        binfmt "$(qemu_arch "$arch")"
        timed "rootfs $arch (prepared)" rootfs "$arch"
    ) || say "root for $arch not prepared (rc=$?); its lane will try again"
done
exit 0
