# Shared helpers for the platform lanes (sourced, not run).
#
# A lane is one way of running goheap's tests on a platform this x86-64/4 KiB
# machine is not: fake big pages (pagesize.sh), arm64 user mode (arm64.sh),
# real 16K/64K kernels (kernels.sh).  Every lane installs its own tools (CI is a
# fresh machine, as root) and tells two kinds of trouble apart:
#   - its *setup* cannot run here (no binfmt_misc, the archive refuses a fetch,
#     a tool will not install): print "LANE SKIPPED" with the reason, exit 0;
#   - the tests ran and failed, or the guest never reported: exit non-zero.
# Slow artefacts (Debian root filesystems, kernels) are cached in lanes/work/
# (gitignored; LANES_WORK overrides it) and rebuilt when their recipe changes.

set -euo pipefail

LANES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$LANES_DIR/.." && pwd)
WORK=${LANES_WORK:-$LANES_DIR/work}
SUITE=${LANES_SUITE:-bookworm}
mkdir -p "$WORK"

# The Debian mirror this host's apt already uses (the only archive reachable).
if [ -z "${MIRROR:-}" ]; then
    MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
        | grep -v security | head -1 || true)
    [ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb" && $2 !~ /security/ {print $2; exit}' \
        /etc/apt/sources.list 2>/dev/null || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

LANE=${LANE:-lane}
say() { printf '[%s] %s\n' "$LANE" "$*" >&2; }

# Exit 0 with a message that CI logs show plainly: the lane could not be set up here.
# (SKIP_EXIT lets a script that runs several lanes in subshells tell a skip from a pass.)
skip() {
    printf '\n==== LANE SKIPPED (%s): %s\n\n' "$LANE" "$*" >&2
    exit "${SKIP_EXIT:-0}"
}

die() {
    printf '\n==== LANE FAILED (%s): %s\n\n' "$LANE" "$*" >&2
    exit 1
}

# timed LABEL CMD...: run CMD, report its wall time (the lanes' figures come from these lines).
timed() {
    local label=$1 start=$SECONDS rc=0
    shift
    "$@" || rc=$?
    printf '[%s] TIME %-28s %4ds%s\n' "$LANE" "$label" $((SECONDS - start)) \
        "$([ $rc = 0 ] || echo " (rc=$rc)")" >&2
    return $rc
}

# lock_work ARCH: lanes share the cached root of an architecture in $WORK
# (arm64.sh and the arm64-16k kernel lane); one lane at a time uses it.
lock_work() {
    exec 9>"$WORK/.lock-$1"
    flock -w 3600 9 || die "another lane held $WORK/.lock-$1 for an hour"
}

# logged FILE CMD...: run CMD with its output appended to FILE.
logged() {
    local f=$1
    shift
    "$@" >>"$f" 2>&1
}

need_root() { [ "$(id -u)" = 0 ] || skip "needs root (debootstrap, chroot, binfmt_misc)"; }

# host_install PKG...: apt-get install what is missing; skip the lane if apt cannot.
_apt_updated=
host_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} = 0 ] && return 0
    command -v apt-get >/dev/null || skip "no apt-get to install ${missing[*]}"
    say "installing ${missing[*]}"
    if [ -z "$_apt_updated" ]; then
        apt-get update -qq >/dev/null 2>&1 || skip "apt-get update failed (archive unreachable?)"
        _apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null 2>"$WORK/apt-host.err" \
        || skip "apt-get install ${missing[*]} failed: $(tail -2 "$WORK/apt-host.err")"
}

# binfmt ARCH: make the kernel run ARCH binaries through qemu-user-static.
# The VM this was written on has binfmt_misc unmounted, so the package's
# entries install disabled; mount it and enable ours.
binfmt() {
    local arch=$1 entry=/proc/sys/fs/binfmt_misc/qemu-$1
    host_install qemu-user-static binfmt-support
    if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
            || skip "cannot mount binfmt_misc (not permitted in this container?)"
    fi
    update-binfmts --enable "qemu-$arch" >/dev/null 2>&1 || true
    [ -f "$entry" ] && head -1 "$entry" | grep -q enabled \
        || skip "binfmt_misc entry qemu-$arch is not enabled"
}

# Packages every guest userland needs: a compiler and Python headers to build
# goheap's cffi extension, and the test dependencies, all from Debian so that
# no PyPI is needed inside (and none of it is fetched by emulated code).
# The suite is bookworm (Python 3.11, as on the host).  trixie was tried: its
# debootstrap second stage ran over 25 minutes emulated here (bookworm: ~5),
# and its ppc64el pool lacks files (below).  The cffi and hypothesis goheap
# needs come as wheels (GUEST_WHEELS below).
# python3-ply is named because debootstrap cannot resolve the virtual package
# pycparser needs.
GUEST_PKGS=python3,python3-dev,python3-cffi,python3-ply,python3-setuptools,python3-psutil,python3-pytest,python3-hypothesis,python3-numpy,gcc,libc6-dev

# suite_for ARCH: the Debian release of that architecture's guest root and kernel.
# ppc64el stays on bookworm even if LANES_SUITE says trixie: on the archive
# reachable here, trixie's ppc64el pool lacks the latest point release's files
# (libc6, apt, base-files and the kernel answer 404).
# LANES_SUITE_<arch> overrides.
suite_for() {
    case $1 in
        arm64) echo "${LANES_SUITE_arm64:-$SUITE}" ;;
        ppc64el) echo "${LANES_SUITE_ppc64el:-bookworm}" ;;
        *) echo "$SUITE" ;;
    esac
}

# Debian's cffi is below what build_ffi.py needs: it builds with
# py_limited_api=False (PyGILState_Check is not in the limited API), and only
# cffi >= 2.0 turns that into _CFFI_NO_LIMITED_API when building through
# setuptools (bookworm has 1.15, trixie 1.17).  bookworm's hypothesis (6.67)
# is also below pyproject's floor, and so is its setuptools (66): pyproject's
# SPDX license string needs setuptools >= 77, which needs packaging >= 24.2
# (bookworm: 23.0; both pure-Python wheels).  So these
# wheels are fetched on the host with pip (from PyPI, as `make test` does) and
# unpacked into the guest's
# /usr/local, which Debian's python3 searches first; pip never runs emulated.
GUEST_WHEELS="cffi==2.1.1 hypothesis==6.170.17 setuptools==80.9.0 packaging==25.0"

# guest_wheels ARCH ROOT: (re)install GUEST_WHEELS into ROOT unless it has them.
guest_wheels() {
    local arch=$1 root=$2 plat dir=$WORK/wheels-$1 pyver site w
    [ "$(cat "$root/.lane-wheels" 2>/dev/null)" = "$GUEST_WHEELS" ] && return 0
    case $arch in
        arm64) plat=manylinux2014_aarch64 ;;
        ppc64el) plat=manylinux2014_ppc64le ;;
        *) die "no wheel platform for $arch" ;;
    esac
    pyver=$(cd "$root/usr/lib" && ls -d python3.[0-9]* | sort -V | tail -1)
    pyver=${pyver#python}
    [ -n "$pyver" ] || die "no python3 in the $arch root"
    rm -rf "$dir"
    # shellcheck disable=SC2086
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --platform "$plat" --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" \
        -d "$dir" $GUEST_WHEELS >"$WORK/wheels-$arch.log" 2>&1 \
        || skip "pip download of $GUEST_WHEELS for $arch failed: $(tail -2 "$WORK/wheels-$arch.log")"
    site=$root/usr/local/lib/python$pyver/dist-packages
    rm -rf "$site"
    mkdir -p "$site"
    for w in "$dir"/*.whl; do
        python3 -m zipfile -e "$w" "$site" || die "cannot unpack $w"
    done
    rm -rf "$dir"
    echo "$GUEST_WHEELS" >"$root/.lane-wheels"
}

# rootfs ARCH: set ROOTFS to the path of a cached Debian $SUITE minbase root for ARCH
# holding GUEST_PKGS, building it first if the cache is missing or stale.
# Built in a temporary directory and renamed at the end, so an interrupted
# build never leaves a half root that a later run would trust.
rootfs() {
    local arch=$1 root=$WORK/rootfs-$1 suite
    suite=$(suite_for "$1")
    local recipe="$suite $MIRROR $GUEST_PKGS v1"
    if [ -f "$root/.lane-recipe" ] && [ "$(cat "$root/.lane-recipe")" = "$recipe" ]; then
        timed "wheels ($arch)" guest_wheels "$arch" "$root"
        ROOTFS=$root
        return 0
    fi
    host_install debootstrap
    binfmt "$(qemu_arch "$arch")"
    local tmp=$root.tmp
    umount_under "$tmp"
    rm -rf "$tmp" "$root"
    say "debootstrap $suite/$arch (first stage, on the host)"
    : >"$WORK/debootstrap-$arch.log"
    local try
    for try in 1 2 3; do  # the archive answers the odd fetch with an error: retry
        timed "debootstrap $arch stage 1" logged "$WORK/debootstrap-$arch.log" \
            debootstrap --arch="$arch" --foreign --variant=minbase --include="$GUEST_PKGS" \
            "$suite" "$tmp" "$MIRROR" && break
        [ $try = 3 ] \
            && skip "debootstrap $arch could not fetch from $MIRROR: $(tail -3 "$WORK/debootstrap-$arch.log")"
        sleep 10
    done
    say "debootstrap $suite/$arch (second stage, emulated)"
    timed "debootstrap $arch stage 2" logged "$WORK/debootstrap-$arch.log" \
        chroot "$tmp" /debootstrap/debootstrap --second-stage \
        || die "debootstrap second stage for $arch failed: $(tail -5 "$WORK/debootstrap-$arch.log")"
    rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*_Packages
    timed "wheels ($arch)" guest_wheels "$arch" "$tmp"
    echo "$recipe" >"$tmp/.lane-recipe"
    mv "$tmp" "$root"
    ROOTFS=$root
}

# Debian's architecture name -> qemu's.
qemu_arch() {
    case $1 in
        arm64) echo aarch64 ;;
        ppc64el) echo ppc64le ;;
        *) echo "$1" ;;
    esac
}

umount_under() {
    local dir=$1 m
    [ -d "$dir" ] || return 0
    # deepest first
    for m in $(awk -v d="$dir" '$2 ~ "^"d {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
}

# copy_checkout DEST: the working tree as git sees it (tracked plus untracked,
# not ignored: no .venv, no build output, no lanes/work), so the guest builds
# exactly what a fresh clone with the current edits would.
copy_checkout() {
    local dest=$1
    rm -rf "$dest"
    mkdir -p "$dest"
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -xf - -C "$dest"
}

# The build step run inside a guest root: cffi compiles goheap/_sys.c into
# goheap._ffi in place; the tests import the package from the source tree.
GUEST_BUILD='cd /proj && python3 setup.py -q build_ext --inplace'

# mount_guest ROOT: the pseudo filesystems a chroot'ed Python and pytest need;
# unmounted again by the EXIT trap.  Only ever unmounts what it mounted.
_guest_mounts=()
mount_guest() {
    local r=$1
    mkdir -p "$r/proc" "$r/sys" "$r/dev" "$r/tmp"
    mount -t proc proc "$r/proc" && _guest_mounts=("$r/proc" "${_guest_mounts[@]}")
    mount -t sysfs sys "$r/sys" && _guest_mounts=("$r/sys" "${_guest_mounts[@]}")
    mount --bind /dev "$r/dev" && _guest_mounts=("$r/dev" "${_guest_mounts[@]}")
    mount -t tmpfs tmp "$r/tmp" && _guest_mounts=("$r/tmp" "${_guest_mounts[@]}")
    trap umount_guest EXIT
}
umount_guest() {
    local m
    for m in "${_guest_mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
    _guest_mounts=()
}

# in_guest ROOT CMD: run a shell command in the chroot with a clean environment
# (nothing of the host's Python, virtualenv or LD_PRELOAD leaks in).
in_guest() {
    local r=$1
    shift
    chroot "$r" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 /bin/sh -c "$*"
}
