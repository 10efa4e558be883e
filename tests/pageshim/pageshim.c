/*
 * pageshim: an LD_PRELOAD library that makes an x86-64 Linux process (4 KiB
 * pages) behave, for the calls goheap cares about, like one running on a
 * kernel with 16 KiB or 64 KiB pages.
 *
 * Why: goheap's heap page is 8 KiB.  Wherever the OS page is bigger, every
 * range the heap hands to mprotect/munmap/madvise must be widened or narrowed
 * to whole OS pages, and the kernel rejects (EINVAL) any range that starts off
 * an OS-page boundary.  This machine cannot boot such a kernel quickly, so the
 * shim reproduces its rules at the libc boundary:
 *
 *   - sysconf(_SC_PAGESIZE) (== _SC_PAGE_SIZE), getpagesize() and
 *     getauxval(AT_PAGESZ) report the fake page size;
 *   - mmap without MAP_FIXED returns an address aligned to the fake page and
 *     maps the length rounded up to it (over-map, then trim the excess);
 *   - mmap(MAP_FIXED / MAP_FIXED_NOREPLACE), mprotect, munmap, madvise,
 *     posix_madvise, msync, mincore and mremap fail with EINVAL when the
 *     address (or file offset) is not fake-page aligned, as the real 16K and
 *     64K kernels do; lengths are rounded up to the fake page as they do;
 *   - mincore reports one byte per fake page;
 *   - /proc/<pid>/statm is rescaled to fake pages, because psutil multiplies
 *     those counts by the (fake) page size to get RSS: without this, RSS
 *     would read 4x (16K) or 16x (64K) too high.
 *
 * Select the size with PAGESHIM_SIZE=16384 or 65536 (8192 and 32768 also
 * work).  An unset or bad value aborts the process: a shim that silently does
 * nothing would make the lane green for the wrong reason.  PAGESHIM_TRACE=1
 * logs every call the shim rejects to stderr; PAGESHIM_ABORT=1 aborts on the
 * first one (for a core dump or a gdb backtrace).
 *
 * Limits: only calls made through the dynamic linker's symbol lookup are
 * seen (goheap's cffi extension, CPython's mmap module and obmalloc, psutil).
 * glibc's and ld.so's own internal calls (malloc's large chunks, thread
 * stacks, dlopen) and raw syscall() users are not.  Residency is still
 * decided in 4 KiB units by the real kernel; only the reported counts change.
 *
 * Built by lanes/pagesize.sh with -Wall -Wextra -Werror; selftest.py beside
 * this file proves each rule on the built library before the suite runs.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* glibc's own implementations, reachable under their internal names. */
extern long __sysconf(int name);
extern int __getpagesize(void);

static size_t fake_page;  /* the page size the process is told about */
static size_t host_page;  /* the real one: 4096 on x86-64 */
static int trace_on, abort_on;

static void die(const char *msg, const char *val)
{
    fprintf(stderr, "pageshim: %s%s\n", msg, val ? val : "");
    abort();
}

static void shim_init(void)
{
    if (fake_page)
        return;
    const char *e = getenv("PAGESHIM_SIZE");
    if (!e || !*e)
        die("LD_PRELOAD has pageshim but PAGESHIM_SIZE is unset", NULL);
    char *end;
    unsigned long v = strtoul(e, &end, 0);
    if (*end || v < 4096 || v > 65536 || (v & (v - 1)))
        die("PAGESHIM_SIZE must be a power of two in [4096, 65536], got ", e);
    host_page = (size_t)__getpagesize();
    trace_on = getenv("PAGESHIM_TRACE") != NULL;
    abort_on = getenv("PAGESHIM_ABORT") != NULL;
    fake_page = v;
}

__attribute__((constructor)) static void shim_ctor(void) { shim_init(); }

static size_t round_up(size_t n) { return (n + fake_page - 1) & ~(fake_page - 1); }
static int misaligned(const void *a) { return ((uintptr_t)a & (fake_page - 1)) != 0; }

/* Reject a call as the big-page kernel would; returns EINVAL for the caller. */
static int reject(const char *fn, const void *addr, size_t len)
{
    if (trace_on || abort_on)
        fprintf(stderr, "pageshim: %s(%p, %#zx) rejected: not %zu-aligned\n",
                fn, addr, len, fake_page);
    if (abort_on)
        abort();
    return EINVAL;
}

/* A length so large that rounding it up wraps: the kernel says ENOMEM. */
static int len_wraps(size_t len) { return len > SIZE_MAX - fake_page; }

/* ---- page size queries ------------------------------------------------ */

long sysconf(int name)
{
    shim_init();
    if (name == _SC_PAGESIZE)  /* glibc defines _SC_PAGE_SIZE as the same value */
        return (long)fake_page;
    return __sysconf(name);
}

int getpagesize(void)
{
    shim_init();
    return (int)fake_page;
}

unsigned long getauxval(unsigned long type)
{
    static unsigned long (*real)(unsigned long);
    shim_init();
    if (type == AT_PAGESZ)
        return fake_page;
    if (!real)
        real = (unsigned long (*)(unsigned long))dlsym(RTLD_NEXT, "getauxval");
    return real(type);
}

/* ---- mappings --------------------------------------------------------- */

static void *sys_mmap(void *a, size_t l, int prot, int flags, int fd, off_t off)
{
    return (void *)syscall(SYS_mmap, a, l, prot, flags, fd, off);
}

static int sys_munmap(void *a, size_t l) { return (int)syscall(SYS_munmap, a, l); }

/*
 * Place a non-fixed mapping of len (already rounded) at a fake-page boundary:
 * reserve len plus the worst-case misalignment with PROT_NONE, map the real
 * thing over the aligned part with MAP_FIXED, and give back both ends.  The
 * reservation keeps other threads from taking the aligned hole meanwhile.
 */
static void *map_aligned(size_t len, int prot, int flags, int fd, off_t off)
{
    size_t slack = fake_page - host_page;
    char *res = sys_mmap(NULL, len + slack, PROT_NONE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (res == MAP_FAILED)
        return MAP_FAILED;
    char *a = (char *)(((uintptr_t)res + fake_page - 1) & ~(uintptr_t)(fake_page - 1));
    void *r = sys_mmap(a, len, prot, (flags & ~MAP_FIXED_NOREPLACE) | MAP_FIXED, fd, off);
    if (r == MAP_FAILED) {
        int saved = errno;
        sys_munmap(res, len + slack);
        errno = saved;
        return MAP_FAILED;
    }
    if (a > res)
        sys_munmap(res, (size_t)(a - res));
    if (res + len + slack > a + len)
        sys_munmap(a + len, (size_t)(res + len + slack - (a + len)));
    return a;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    shim_init();
    if (len == 0 || len_wraps(len)) {
        errno = len ? ENOMEM : EINVAL;
        return MAP_FAILED;
    }
    int fixed = (flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)) != 0;
    if ((off & (off_t)(fake_page - 1)) || (fixed && misaligned(addr))) {
        errno = reject("mmap", addr, len);
        return MAP_FAILED;
    }
    size_t l = round_up(len);
    if (fixed)
        return sys_mmap(addr, l, prot, flags, fd, off);
    /* The kernel rounds a hint up to its page and takes it if that range is free. */
    if (addr) {
        void *hint = (void *)round_up((uintptr_t)addr);
        void *r = sys_mmap(hint, l, prot, flags, fd, off);
        if (r == MAP_FAILED || !misaligned(r))
            return r;
        sys_munmap(r, l);
    }
    return map_aligned(l, prot, flags, fd, off);
}

/* x86-64 has no separate 64-bit-offset mmap; glibc exports both names. */
void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
    __attribute__((alias("mmap")));

/*
 * The calls that take a range: the address must be fake-page aligned, the
 * length is rounded up to whole fake pages, as the big-page kernel does.
 * wrap_errno is what the kernel says for a length that cannot be rounded.
 */
static int range_call(const char *fn, long nr, void *addr, size_t len, long arg, int wrap_errno)
{
    shim_init();
    if (misaligned(addr)) {
        errno = reject(fn, addr, len);
        return -1;
    }
    if (len_wraps(len)) {
        errno = wrap_errno;
        return -1;
    }
    return (int)syscall(nr, addr, round_up(len), arg);
}

int munmap(void *addr, size_t len)
{
    if (len == 0) {
        errno = EINVAL;
        return -1;
    }
    return range_call("munmap", SYS_munmap, addr, len, 0, EINVAL);
}

int mprotect(void *addr, size_t len, int prot)
{
    return range_call("mprotect", SYS_mprotect, addr, len, prot, ENOMEM);
}

int madvise(void *addr, size_t len, int advice)
{
    return range_call("madvise", SYS_madvise, addr, len, advice, EINVAL);
}

int posix_madvise(void *addr, size_t len, int advice)
{
    /* posix_madvise returns the error instead of setting errno; glibc maps
     * POSIX_MADV_DONTNEED to nothing at all, which is kept here. */
    if (advice == POSIX_MADV_DONTNEED)
        return 0;
    int saved = errno;
    int r = madvise(addr, len, advice) ? errno : 0;
    errno = saved;
    return r;
}

int msync(void *addr, size_t len, int flags)
{
    return range_call("msync", SYS_msync, addr, len, flags, ENOMEM);
}

/* One byte per fake page: resident if any of its host pages is. */
int mincore(void *addr, size_t len, unsigned char *vec)
{
    shim_init();
    if (misaligned(addr)) {
        errno = reject("mincore", addr, len);
        return -1;
    }
    if (len_wraps(len)) {
        errno = ENOMEM;
        return -1;
    }
    size_t per = fake_page / host_page, n = round_up(len) / fake_page;
    unsigned char sub[65536 / 4096];
    for (size_t i = 0; i < n; i++) {
        if (syscall(SYS_mincore, (char *)addr + i * fake_page, fake_page, sub))
            return -1;
        unsigned char any = 0;
        for (size_t j = 0; j < per; j++)
            any |= sub[j] & 1;
        vec[i] = any;
    }
    return 0;
}

void *mremap(void *old, size_t old_len, size_t new_len, int flags, ...)
{
    shim_init();
    void *dest = NULL;
    if (flags & MREMAP_FIXED) {
        va_list ap;
        va_start(ap, flags);
        dest = va_arg(ap, void *);
        va_end(ap);
    }
    if (misaligned(old) || ((flags & MREMAP_FIXED) && misaligned(dest))) {
        errno = reject("mremap", old, old_len);
        return MAP_FAILED;
    }
    if (new_len == 0 || len_wraps(new_len) || len_wraps(old_len)) {
        errno = EINVAL;
        return MAP_FAILED;
    }
    size_t ol = round_up(old_len), nl = round_up(new_len);
    if ((flags & MREMAP_FIXED) || !(flags & MREMAP_MAYMOVE))
        return (void *)syscall(SYS_mremap, old, ol, nl, flags, dest);
    /* May move: first try in place; if it must move, move it to an aligned hole. */
    void *r = (void *)syscall(SYS_mremap, old, ol, nl, flags & ~MREMAP_MAYMOVE, NULL);
    if (r != MAP_FAILED || errno != ENOMEM)
        return r;
    void *hole = map_aligned(nl, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (hole == MAP_FAILED)
        return MAP_FAILED;
    r = (void *)syscall(SYS_mremap, old, ol, nl, flags | MREMAP_FIXED, hole);
    if (r == MAP_FAILED) {
        int saved = errno;
        sys_munmap(hole, nl);
        errno = saved;
    }
    return r;
}

/* ---- /proc/<pid>/statm ------------------------------------------------ */

/* "/proc/self/statm", "/proc/thread-self/statm", "/proc/123/statm", "/proc/123/task/456/statm" */

/* "123/rest" -> "rest"; NULL unless a decimal id and a slash start p. */
static const char *skip_id(const char *p)
{
    if (*p < '0' || *p > '9')
        return NULL;
    while (*p >= '0' && *p <= '9')
        p++;
    return *p == '/' ? p + 1 : NULL;
}

static int is_statm(const char *path)
{
    if (!path || strncmp(path, "/proc/", 6) != 0)
        return 0;
    size_t n = strlen(path);
    if (n < 12 || strcmp(path + n - 6, "/statm") != 0)
        return 0;
    const char *p = path + 6;
    if (!strncmp(p, "self/", 5))
        p += 5;
    else if (!strncmp(p, "thread-self/", 12))
        p += 12;
    else {
        p = skip_id(p); /* /proc/PID/... */
        if (p != NULL && !strncmp(p, "task/", 5))
            p = skip_id(p + 5); /* /proc/PID/task/TID/... */
        if (p == NULL)
            return 0;
    }
    return !strcmp(p, "statm");
}

/*
 * Read the real statm (counts of 4 KiB pages) and hand back a memfd holding
 * the same counts in fake pages, rounded up, as a big-page kernel reports.
 * Returns -1 with errno set if the real file cannot be read.
 */
static int scaled_statm(int dirfd, const char *path)
{
    int fd = (int)syscall(SYS_openat, dirfd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    char in[256], out[256];
    ssize_t got = read(fd, in, sizeof in - 1);
    int saved = errno;
    close(fd);
    if (got < 0) {
        errno = saved;
        return -1;
    }
    in[got] = '\0';
    size_t per = fake_page / host_page, o = 0;
    char *s = in, *end;
    for (;;) {
        unsigned long long v = strtoull(s, &end, 10);
        if (end == s)
            break;
        int w = snprintf(out + o, sizeof out - o, "%s%llu", o ? " " : "", (v + per - 1) / per);
        if (w < 0 || (size_t)w >= sizeof out - o)
            break;
        o += (size_t)w;
        s = end;
    }
    if (o < sizeof out - 1)
        out[o++] = '\n';
    int mfd = (int)syscall(SYS_memfd_create, "pageshim-statm", MFD_CLOEXEC);
    if (mfd < 0)
        return -1;
    if (write(mfd, out, o) != (ssize_t)o || lseek(mfd, 0, SEEK_SET) != 0) {
        saved = errno;
        close(mfd);
        errno = saved;
        return -1;
    }
    return mfd;
}

typedef int (*openat_fn)(int, const char *, int, ...);

static int open_common(int dirfd, const char *path, int flags, mode_t mode)
{
    static openat_fn real;
    shim_init();
    if ((flags & O_ACCMODE) == O_RDONLY && is_statm(path))
        return scaled_statm(dirfd, path);
    if (!real)
        real = (openat_fn)dlsym(RTLD_NEXT, "openat");
    return real(dirfd, path, flags, mode);
}

static mode_t mode_arg(int flags, va_list ap)
{
    return (flags & (O_CREAT | __O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

int open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return open_common(AT_FDCWD, path, flags, mode);
}

int open64(const char *path, int flags, ...) __attribute__((alias("open")));

int openat(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return open_common(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...) __attribute__((alias("openat")));

/* _FORTIFY_SOURCE builds call these when they cannot see a mode argument. */
int __open_2(const char *path, int flags) { return open_common(AT_FDCWD, path, flags, 0); }
int __open64_2(const char *path, int flags) { return open_common(AT_FDCWD, path, flags, 0); }
