/* goheap C core: the OS layer, the GC bitmap and the small-object fast path.
 *
 * See goheap/malloc.py for the overview.
 *
 * Vocabulary: an *OS page* is what the kernel maps (4, 16 or 64 KiB); a *heap
 * page* is GH_PAGE_SIZE (8 KiB).  The two differ on almost every machine, which
 * is the bug the seed commit fixed: nothing here assumes one is a multiple of
 * the other.  Every OS call takes the OS page size the caller believes in
 * (the real one, or a larger simulated one for tests) and refuses ranges that
 * are not whole pages of it.
 *
 * Rules of this file:
 *   - Only the OS section calls mmap, mprotect, madvise or munmap.
 *   - Sections call only earlier sections.
 *   - C reports, Python decides: functions return a status (see _sys.h) and
 *     hold no policy beyond what the hot paths need.
 *   - C never calls back into Python and uses no thread-local storage.
 *   - Every heap-touching function takes h->lock, so each call is atomic even
 *     when the caller does not hold the GIL (free-threaded CPython, C drivers),
 *     close included: a closed heap is refused under the lock (heap_lock_open).
 */
#if defined(__APPLE__)
#define _DARWIN_C_SOURCE 1
#else
#define _GNU_SOURCE 1
#endif

#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "_sys.h"

_Static_assert(GH_PAGE_SIZE == 8192, "heap page is 8 KiB");
_Static_assert(sizeof(uintptr_t) == GH_PTR_SIZE, "goheap needs a 64-bit address space");
_Static_assert(GH_WORDS_PER_BITMAP_WORD * 4 == 64, "4 bitmap bits per heap word");
_Static_assert(sizeof(gh_mspan) % 8 == 0, "spans stay word aligned");

#ifndef MAP_NORESERVE
#define MAP_NORESERVE 0
#endif
#ifndef MAP_ANONYMOUS
#define MAP_ANONYMOUS MAP_ANON
#endif

/* Written into word 1 of a freed object larger than two words: "this object is
 * dirty".  Together with carving this keeps the rule "word 1 is zero only if
 * the whole free object is zero", so a zeroed malloc clears only what it must. */
#define GH_DIRTY_MARKER ((uintptr_t)0xfeedfeedfeedfeedULL)

/* ------------------------------------------------------------------------
 * OS layer
 * ------------------------------------------------------------------------ */

int gh_sys_pagesize(size_t *out)
{
    long n = sysconf(_SC_PAGESIZE);
    if (out == NULL)
        return GH_EARG;
    if (n <= 0)
        return errno ? errno : EINVAL;
    *out = (size_t)n;
    return GH_OK;
}

/* The caller's page size must be a power of two and a multiple of the real
 * one; v and n must be whole pages of it, n non-zero.  v == 0 is allowed only
 * where the caller says so (hints). */
static int os_args_ok(uintptr_t v, size_t n, size_t pagesize, int v_may_be_zero)
{
    size_t real;
    if (gh_sys_pagesize(&real) != GH_OK)
        return 0;
    if (pagesize < real || (pagesize & (pagesize - 1)) != 0 || pagesize % real != 0)
        return 0;
    if (n == 0 || n % pagesize != 0 || n > (SIZE_MAX >> 1))
        return 0;
    if (v % pagesize != 0 || (v == 0 && !v_may_be_zero))
        return 0;
    if (v != 0 && v + n < v)
        return 0;
    return 1;
}

/* Map n bytes aligned to pagesize.  When the simulated page is larger than
 * the real one the kernel only aligns to the real page, so ask for the slack
 * and trim both ends, as a kernel with big pages would have placed it. */
static int os_map_aligned(uintptr_t hint, size_t n, size_t pagesize, int prot, int flags,
                          uintptr_t *out)
{
    size_t real, slack;
    uintptr_t p, aligned;
    void *r;

    if (gh_sys_pagesize(&real) != GH_OK)
        return EINVAL;
    slack = pagesize - real;
    if (n + slack < n)
        return ENOMEM;
    r = mmap((void *)hint, n + slack, prot, flags, -1, 0);
    if (r == MAP_FAILED)
        return errno;
    p = (uintptr_t)r;
    aligned = (p + pagesize - 1) & ~(uintptr_t)(pagesize - 1);
    if (aligned > p)
        munmap((void *)p, aligned - p);
    if (p + n + slack > aligned + n)
        munmap((void *)(aligned + n), p + n + slack - (aligned + n));
    *out = aligned;
    return GH_OK;
}

/* None -> Ready: fresh zeroed read-write memory anywhere. */
int gh_sys_alloc(size_t n, size_t pagesize, uintptr_t *out)
{
    if (out == NULL || !os_args_ok(0, n, pagesize, 1))
        return GH_EARG;
    return os_map_aligned(0, n, pagesize, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, out);
}

/* None -> Reserved: address space only (PROT_NONE, no commit charge).
 * With exact == 0 the hint is only a hint.  With exact != 0 the range must
 * start at hint or nothing is mapped (GH_EEXIST): Linux has
 * MAP_FIXED_NOREPLACE; kernels before 4.17 and macOS treat the address as a
 * hint, so the result is checked either way. */
int gh_sys_reserve(uintptr_t hint, size_t n, size_t pagesize, int exact, uintptr_t *out)
{
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    void *r;

    if (out == NULL || !os_args_ok(hint, n, pagesize, !exact))
        return GH_EARG;
    if (!exact)
        return os_map_aligned(hint, n, pagesize, PROT_NONE, flags, out);
#ifdef MAP_FIXED_NOREPLACE
    flags |= MAP_FIXED_NOREPLACE;
#endif
    r = mmap((void *)hint, n, PROT_NONE, flags, -1, 0);
    if (r == MAP_FAILED)
        return errno == EEXIST ? GH_EEXIST : errno;
    if ((uintptr_t)r != hint) {
        munmap(r, n);
        return GH_EEXIST;
    }
    *out = hint;
    return GH_OK;
}

/* Reserved -> Ready: v must lie inside a reservation of the caller's (the
 * fixed mapping would replace anything else).  Contents read as zero. */
int gh_sys_map(uintptr_t v, size_t n, size_t pagesize)
{
    void *r;
    if (!os_args_ok(v, n, pagesize, 0))
        return GH_EARG;
    r = mmap((void *)v, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (r == MAP_FAILED)
        return errno;
    return (uintptr_t)r == v ? GH_OK : EFAULT;
}

/* Ready -> Prepared: the OS may take the pages back.  Linux drops them now
 * (they read back as zero); macOS's MADV_FREE_REUSABLE also lowers the
 * footprint the kernel reports, which plain MADV_FREE does not. */
int gh_sys_unused(uintptr_t v, size_t n, size_t pagesize)
{
    if (!os_args_ok(v, n, pagesize, 0))
        return GH_EARG;
#if defined(__APPLE__) && defined(MADV_FREE_REUSABLE)
    if (madvise((void *)v, n, MADV_FREE_REUSABLE) != 0)
        return errno;
#else
    if (madvise((void *)v, n, MADV_DONTNEED) != 0)
        return errno;
#endif
    return GH_OK;
}

/* Prepared -> Ready.  Nothing to do on Linux; macOS must be told so its
 * accounting of reused pages stays right. */
int gh_sys_used(uintptr_t v, size_t n, size_t pagesize)
{
    if (!os_args_ok(v, n, pagesize, 0))
        return GH_EARG;
#if defined(__APPLE__) && defined(MADV_FREE_REUSE)
    if (madvise((void *)v, n, MADV_FREE_REUSE) != 0)
        return errno;
#endif
    return GH_OK;
}

/* Guard markers (Linux 6.13+, MADV_GUARD_INSTALL / MADV_GUARD_REMOVE): a
 * page-table entry that faults on any touch, installed over a range of an
 * anonymous private mapping without changing its protection, so the mapping
 * is not split in two or three as mprotect splits it, and about four times
 * cheaper here.  Installing one drops the page under it; removing it leaves
 * a page that reads zero.  A fresh mmap over the range (gh_sys_map) or
 * munmap takes the markers away with it.  They do not show in
 * /proc/self/maps; /proc/self/pagemap has a bit for them (6.15+).
 *
 * Whether they are used is one process-wide setting: -1 not probed yet,
 * 0 no (mprotect), 1 yes.  GOHEAP_GUARD_REGIONS=0 says no.  Every span C
 * faults records how (gh_mspan.marked), so flipping the setting (tests do)
 * never leaves a range that the next unfault would not open again. */
#if defined(__linux__)
#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif
#ifndef MADV_GUARD_REMOVE
#define MADV_GUARD_REMOVE 103
#endif
#define GH_HAVE_GUARD_MARKERS 1
#else
#define GH_HAVE_GUARD_MARKERS 0
#endif

static int os_guards = -1;       /* see above */
static int os_guards_kernel = -1; /* the probe's answer, whatever the setting */

/* Whether this kernel really installs guard markers.  The advice being
 * accepted is not enough: an emulator (qemu-user) may accept advice it does
 * not carry out.  So a marked page is handed to write(2), and only the
 * kernel's own EFAULT on copying from it says yes. */
static int os_guards_probe(void)
{
#if GH_HAVE_GUARD_MARKERS
    long ps = sysconf(_SC_PAGESIZE);
    int fds[2], ok = 0, saved = errno;
    void *p;
    if (ps <= 0)
        return 0;
    p = mmap(NULL, (size_t)ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return 0;
    if (madvise(p, (size_t)ps, MADV_GUARD_INSTALL) == 0 && pipe(fds) == 0) {
        ok = write(fds[1], p, 1) < 0 && errno == EFAULT;
        close(fds[0]);
        close(fds[1]);
    }
    munmap(p, (size_t)ps);
    errno = saved;
    return ok;
#else
    return 0;
#endif
}

/* Whether C faults with guard markers now (probing once, racing threads
 * probe alike and store the same answer). */
static inline int os_guards_on(void)
{
    /* Acquire/release: whoever sees the setting sees the probe's answer
     * (gh_efence_q_push records "either" by it). */
    int g = __atomic_load_n(&os_guards, __ATOMIC_ACQUIRE);
    const char *env;
    if (g >= 0)
        return g;
    g = os_guards_probe();
    __atomic_store_n(&os_guards_kernel, g, __ATOMIC_RELAXED);
    env = getenv("GOHEAP_GUARD_REGIONS");
    if (env != NULL && env[0] == '0' && env[1] == '\0')
        g = 0;
    __atomic_store_n(&os_guards, g, __ATOMIC_RELEASE);
    return g;
}

int gh_sys_guards(int set, int *on, int *kernel)
{
    (void)os_guards_on();
    if (set != -1 && set != 0 && set != 1)
        return GH_EARG;
    if (set == 1 && !__atomic_load_n(&os_guards_kernel, __ATOMIC_RELAXED))
        return ENOTSUP;
    if (set != -1)
        __atomic_store_n(&os_guards, set, __ATOMIC_RELEASE);
    if (on != NULL)
        *on = __atomic_load_n(&os_guards, __ATOMIC_ACQUIRE);
    if (kernel != NULL)
        *kernel = __atomic_load_n(&os_guards_kernel, __ATOMIC_RELAXED);
    return GH_OK;
}

/* Guard markers over [v, v+n), whole pages checked by the caller: GH_OK, or
 * an errno with no marker left in the range (a failure part way through,
 * ENOMEM for page tables or EINVAL at a locked mapping, has the ones it made
 * taken away again).  So [v, v+n) must hold no marker the caller means to
 * keep: efence faults a freed object's data pages, never its guard.  Pages
 * marked before the failure were dropped and read zero: the one way a
 * failed fault changes something, and only where the kernel fails midway. */
static int os_guard_install(uintptr_t v, size_t n)
{
#if GH_HAVE_GUARD_MARKERS
    int err;
    if (madvise((void *)v, n, MADV_GUARD_INSTALL) == 0)
        return GH_OK;
    err = errno;
    (void)madvise((void *)v, n, MADV_GUARD_REMOVE);
    return err;
#else
    (void)v;
    (void)n;
    return ENOTSUP;
#endif
}

static int os_guard_remove(uintptr_t v, size_t n)
{
#if GH_HAVE_GUARD_MARKERS
    return madvise((void *)v, n, MADV_GUARD_REMOVE) == 0 ? GH_OK : errno;
#else
    (void)v;
    (void)n;
    return ENOTSUP;
#endif
}

/* Ready -> Reserved, for efence: every later touch faults, the address range
 * stays ours, the pages go back to the OS.
 * Success means exactly "the range is inaccessible"; failure means exactly
 * "nothing changed".  With guard markers that is one call.  Else mprotect,
 * which can fail (ENOMEM when splitting the mapping would pass
 * vm.max_map_count) and leaves the range untouched when it does; dropping
 * the pages comes after and is best effort, as on macOS: madvise refuses
 * locked pages (EINVAL after mlockall(MCL_FUTURE)), and by then the range
 * already faults, so reporting that failure would tell the caller "nothing
 * changed" about memory that no longer answers.  Locked pages stay
 * resident, which is what locking them asked for; the next sys_map of the
 * range (efence's delete_span) replaces them with fresh zero pages. */
int gh_sys_fault(uintptr_t v, size_t n, size_t pagesize)
{
    if (!os_args_ok(v, n, pagesize, 0))
        return GH_EARG;
    /* A refused marker (EINVAL on mlock'ed memory) falls back to mprotect. */
    if (os_guards_on() && os_guard_install(v, n) == GH_OK)
        return GH_OK;
    if (mprotect((void *)v, n, PROT_NONE) != 0)
        return errno;
#if defined(__APPLE__) && defined(MADV_FREE_REUSABLE)
    (void)madvise((void *)v, n, MADV_FREE_REUSABLE);
#else
    (void)madvise((void *)v, n, MADV_DONTNEED);
#endif
    return GH_OK;
}

/* any -> None. */
int gh_sys_free(uintptr_t v, size_t n, size_t pagesize)
{
    if (!os_args_ok(v, n, pagesize, 0))
        return GH_EARG;
    if (munmap((void *)v, n) != 0)
        return errno;
    return GH_OK;
}

/* ------------------------------------------------------------------------
 * Lock
 * ------------------------------------------------------------------------ */

/* A spinlock is enough: every critical section is a handful of loads and
 * stores, and under the GIL (the common build) it is never contended. */
static inline void heap_lock(gh_mheap *h)
{
    while (__atomic_exchange_n(&h->lock, 1, __ATOMIC_ACQUIRE) != 0) {
        while (__atomic_load_n(&h->lock, __ATOMIC_RELAXED) != 0)
            sched_yield();
    }
}

static inline void heap_unlock(gh_mheap *h)
{
    __atomic_store_n(&h->lock, 0, __ATOMIC_RELEASE);
}

/* Take h->lock unless the heap is closed; whether it was taken.  The check
 * is made under the lock because gh_mheap_close clears arena_start under it:
 * a call that gets the lock after close returns without touching the arena,
 * the bitmap, the spans table or a span struct, all of which may be unmapped
 * by then.  A check made before the lock could pass just before close. */
static inline int heap_lock_open(gh_mheap *h)
{
    heap_lock(h);
    if (h->arena_start != 0)
        return 1;
    heap_unlock(h);
    return 0;
}

/* ------------------------------------------------------------------------
 * Heap registry (what the fault reporter may search)
 *
 * The reporter runs in a signal handler: it may take no lock a faulting
 * thread could hold (h->lock included) and may call only async-signal-safe
 * functions.  So the heaps it searches sit in a fixed array of pointers,
 * changed only by atomic compare-and-swap.  A reporter announces itself in
 * fault_active before it reads a slot; registry_remove empties the slot and
 * then waits until no reporter is active, so a heap is never unmapped under
 * a reporter reading it.  Both sides are sequentially consistent: either the
 * reporter finds the slot empty or the remover sees the reporter.
 * ------------------------------------------------------------------------ */

static gh_mheap *fault_heaps[GH_FAULT_MAX_HEAPS];
static int fault_active; /* reporters reading fault_heaps (any thread) */

/* Add h (idempotent).  GH_EBUSY when every slot is taken: the heap works
 * as before, and a fault in it is passed on without a goheap line. */
int gh_fault_register(gh_mheap *h)
{
    int i;
    if (h == NULL)
        return GH_EARG;
    for (i = 0; i < GH_FAULT_MAX_HEAPS; i++)
        if (__atomic_load_n(&fault_heaps[i], __ATOMIC_SEQ_CST) == h)
            return GH_OK;
    for (i = 0; i < GH_FAULT_MAX_HEAPS; i++) {
        gh_mheap *expected = NULL;
        if (__atomic_compare_exchange_n(&fault_heaps[i], &expected, h, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
            return GH_OK;
    }
    return GH_EBUSY;
}

/* Take h out (if it is in) and wait for every reporter that may have read
 * it.  Called by gh_mheap_close, before Python unmaps anything. */
static void registry_remove(gh_mheap *h)
{
    int i;
    for (i = 0; i < GH_FAULT_MAX_HEAPS; i++) {
        gh_mheap *expected = h;
        __atomic_compare_exchange_n(&fault_heaps[i], &expected, NULL, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST);
    }
    while (__atomic_load_n(&fault_active, __ATOMIC_SEQ_CST) != 0)
        sched_yield();
}

/* ------------------------------------------------------------------------
 * GC bitmap
 *
 * Four bits per heap word, grouped by kind: in the bitmap word describing
 * heap words [16k, 16k+16), bit i is "allocated" for word 16k+i and bit 16+i
 * is "block boundary".  The bitmap grows down from arena_start.
 * Meaning (Go 1.2): allocated = a live object starts here; boundary without
 * allocated = a free object starts here; nothing = not an object start.
 * The caller holds h->lock and has checked arena_start <= v < arena_used.
 * ------------------------------------------------------------------------ */

static inline uint64_t *bitmap_word(const gh_mheap *h, uintptr_t v, unsigned *shift)
{
    uintptr_t off = (v - h->arena_start) / GH_PTR_SIZE;
    *shift = (unsigned)(off % GH_WORDS_PER_BITMAP_WORD);
    return (uint64_t *)(h->arena_start - GH_PTR_SIZE * (off / GH_WORDS_PER_BITMAP_WORD + 1));
}

static inline uint64_t bitmap_bits(const gh_mheap *h, uintptr_t v)
{
    unsigned shift;
    uint64_t *w = bitmap_word(h, v, &shift);
    return (*w >> shift) & (GH_BIT_ALLOCATED | GH_BIT_BOUNDARY | GH_BIT_MARKED | GH_BIT_SPECIAL);
}

static inline void bitmap_set(gh_mheap *h, uintptr_t v, uint64_t set, uint64_t clear)
{
    unsigned shift;
    uint64_t *w = bitmap_word(h, v, &shift);
    *w = (*w & ~(clear << shift)) | (set << shift);
}

static int range_ok(const gh_mheap *h, uintptr_t v, uintptr_t n)
{
    return h != NULL && h->arena_start != 0 && v >= h->arena_start && n <= h->arena_used - v &&
           v < h->arena_used;
}

/* markspan: a free-object boundary at each of n object starts, plus one just
 * past the last when the span has a leftover tail.  The caller holds h->lock
 * and has checked that [v, v + n*size) lies in the mapped arena. */
static void bitmap_markspan(gh_mheap *h, uintptr_t v, uintptr_t size, uintptr_t n, int leftover)
{
    uintptr_t i;
    for (i = 0; i < n; i++)
        bitmap_set(h, v + i * size, GH_BIT_BOUNDARY, GH_BIT_ALLOCATED | GH_BIT_BOUNDARY);
    if (leftover)
        bitmap_set(h, v + n * size, GH_BIT_BOUNDARY, GH_BIT_ALLOCATED);
}

/* unmarkspan: forget every bit of [v, v+n); v and n are whole 128-byte
 * groups (one bitmap word each), which any heap page is. */
int gh_bitmap_unmarkspan(gh_mheap *h, uintptr_t v, uintptr_t n)
{
    unsigned shift;
    uint64_t *w;
    uintptr_t i, nwords;
    const uintptr_t group = GH_PTR_SIZE * GH_WORDS_PER_BITMAP_WORD;
    if (v % group != 0 || n % group != 0 || n == 0 || !range_ok(h, v, n))
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    w = bitmap_word(h, v, &shift);
    nwords = n / group;
    for (i = 0; i < nwords; i++)
        *(w - i) = 0;
    heap_unlock(h);
    return GH_OK;
}

/* The four bits of v, right-aligned by kind (allocated = bit 0, boundary =
 * bit 16 ...), for check() and tests. */
int gh_bitmap_get(gh_mheap *h, uintptr_t v, uint64_t *out)
{
    if (out == NULL || v % GH_PTR_SIZE != 0 || !range_ok(h, v, GH_PTR_SIZE))
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    *out = bitmap_bits(h, v);
    heap_unlock(h);
    return GH_OK;
}

/* Count the allocated and boundary bits describing [v, v+n) (whole 128-byte
 * groups): check() compares them with the live and free objects it walked. */
int gh_bitmap_count(gh_mheap *h, uintptr_t v, uintptr_t n, uint64_t *nalloc, uint64_t *nboundary)
{
    unsigned shift;
    uint64_t *w, a = 0, b = 0;
    uintptr_t i;
    const uintptr_t group = GH_PTR_SIZE * GH_WORDS_PER_BITMAP_WORD;
    if (nalloc == NULL || nboundary == NULL || v % group != 0 || n % group != 0 || n == 0 ||
        !range_ok(h, v, n))
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    w = bitmap_word(h, v, &shift);
    for (i = 0; i < n / group; i++) {
        a += (uint64_t)__builtin_popcountll(*(w - i) & 0xffffULL);
        b += (uint64_t)__builtin_popcountll(*(w - i) & 0xffff0000ULL);
    }
    heap_unlock(h);
    *nalloc = a;
    *nboundary = b;
    return GH_OK;
}

/* Set (set) and clear (clear) bits of one word, for large objects, efence and
 * tests.  Only the allocated/boundary kinds may be named. */
int gh_bitmap_set(gh_mheap *h, uintptr_t v, uint64_t set, uint64_t clear)
{
    const uint64_t kinds = GH_BIT_ALLOCATED | GH_BIT_BOUNDARY;
    if (v % GH_PTR_SIZE != 0 || (set & ~kinds) || (clear & ~kinds) || !range_ok(h, v, GH_PTR_SIZE))
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    bitmap_set(h, v, set, clear);
    heap_unlock(h);
    return GH_OK;
}

/* ------------------------------------------------------------------------
 * Spans table
 *
 * One gh_mspan* per heap page of [arena_start, arena_used).  An in-use span
 * maps every page; a free span its first and last (MHeap keeps that rule).
 * ------------------------------------------------------------------------ */

static inline gh_mspan **spans_slot(const gh_mheap *h, uintptr_t v)
{
    return (gh_mspan **)(h->spans + ((v - h->arena_start) >> GH_PAGE_SHIFT) * sizeof(gh_mspan *));
}

/* Point npages entries starting at the page of v at s (s may be NULL). */
/* Point the spans-table entries of npages pages from v at s.  Four entries
 * a step, which the compiler turns into two 16-byte stores: a cut and its
 * join rewrite up to a few hundred entries per round trip, and one store a
 * step made that a third of a 4 MiB round trip (measured). */
static inline void spans_point(gh_mheap *h, uintptr_t v, uintptr_t npages, gh_mspan *s)
{
    gh_mspan **slot = spans_slot(h, v);
    uintptr_t i = 0;
    for (; i + 4 <= npages; i += 4) {
        slot[i] = s;
        slot[i + 1] = s;
        slot[i + 2] = s;
        slot[i + 3] = s;
    }
    for (; i < npages; i++)
        slot[i] = s;
}

int gh_spans_set(gh_mheap *h, uintptr_t v, uintptr_t npages, gh_mspan *s)
{
    uintptr_t i;
    gh_mspan **slot;
    if (v % GH_PAGE_SIZE != 0 || npages == 0 || npages > (UINTPTR_MAX >> GH_PAGE_SHIFT) ||
        !range_ok(h, v, npages << GH_PAGE_SHIFT))
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    slot = spans_slot(h, v);
    for (i = 0; i < npages; i++)
        slot[i] = s;
    heap_unlock(h);
    return GH_OK;
}

int gh_spans_get(gh_mheap *h, uintptr_t v, uintptr_t *out)
{
    if (out == NULL || !range_ok(h, v, 1))
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    *out = (uintptr_t)*spans_slot(h, v);
    heap_unlock(h);
    return GH_OK;
}

/* How many of the npages entries from the page of v do not point at s
 * (check(): an in-use span must own every one of its pages). */
int gh_spans_mismatch(gh_mheap *h, uintptr_t v, uintptr_t npages, gh_mspan *s, uintptr_t *out)
{
    uintptr_t i, bad = 0;
    gh_mspan **slot;
    if (out == NULL || v % GH_PAGE_SIZE != 0 || npages == 0 ||
        npages > (UINTPTR_MAX >> GH_PAGE_SHIFT) || !range_ok(h, v, npages << GH_PAGE_SHIFT))
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    slot = spans_slot(h, v);
    for (i = 0; i < npages; i++)
        bad += slot[i] != s;
    heap_unlock(h);
    *out = bad;
    return GH_OK;
}

/* mlookup: the live object containing v.  GH_EINVALID when v is in no live
 * object (free span, free object, faulted efence span, outside). */
int gh_mheap_lookup(gh_mheap *h, uintptr_t v, uintptr_t *base, uintptr_t *size)
{
    gh_mspan *s;
    uintptr_t b;
    int st = GH_EINVALID;
    if (base == NULL || size == NULL)
        return GH_EARG;
    if (!range_ok(h, v, 1))
        return GH_EINVALID;
    if (!heap_lock_open(h))
        return GH_EINVALID;
    s = *spans_slot(h, v);
    if (s != NULL && s->state == GH_MSPAN_IN_USE && v >= s->start) {
        if (s->sizeclass == 0) {
            b = s->base;
            if (v >= b && v < s->limit && (bitmap_bits(h, b) & GH_BIT_ALLOCATED)) {
                *base = b;
                *size = s->elemsize;
                st = GH_OK;
            }
        } else if (v < s->limit) {
            b = s->start + (v - s->start) / s->elemsize * s->elemsize;
            if (bitmap_bits(h, b) & GH_BIT_ALLOCATED) {
                *base = b;
                *size = s->elemsize;
                st = GH_OK;
            }
        }
    }
    heap_unlock(h);
    return st;
}

/* ------------------------------------------------------------------------
 * Spans: carving and checking (MCentral_Grow's inner loop, mspan validation)
 * ------------------------------------------------------------------------ */

/* Cut s into objects of size in address order, linked through word 0, and
 * mark their starts.  s must be IN_USE, not yet visible to the fast path. */
int gh_mspan_carve(gh_mheap *h, gh_mspan *s, uintptr_t size)
{
    uintptr_t n, i, v, bytes;
    if (s == NULL || size < GH_PTR_SIZE || size % GH_PTR_SIZE != 0 || size > GH_MAX_SMALL_SIZE ||
        s->npages == 0 || s->start % GH_PAGE_SIZE != 0)
        return GH_EARG;
    bytes = s->npages << GH_PAGE_SHIFT;
    if (!range_ok(h, s->start, bytes) || size > bytes)
        return GH_EARG;
    n = bytes / size;
    if (!heap_lock_open(h))
        return GH_EARG;
    for (i = 0; i < n; i++) {
        v = s->start + i * size;
        ((uintptr_t *)v)[0] = i + 1 < n ? v + size : 0;
        if (s->needzero && size > 2 * GH_PTR_SIZE)
            ((uintptr_t *)v)[1] = GH_DIRTY_MARKER;
        else if (s->needzero && size == 2 * GH_PTR_SIZE)
            ((uintptr_t *)v)[1] = 0;
    }
    bitmap_markspan(h, s->start, size, n, n * size < bytes);
    s->freelist = s->start;
    s->elemsize = size;
    s->nelems = (uint32_t)n;
    s->ref = 0;
    s->limit = s->start + n * size;
    s->base = s->start;
    heap_unlock(h);
    return GH_OK;
}

/* A free-list link is trusted only if it names a free object start of the
 * same span: inside [start, limit) and marked "boundary" in the bitmap.  A
 * corrupted link (a user's stray write into freed memory) is refused before
 * it can hand out memory that overlaps something live. */
static inline int link_ok(const gh_mheap *h, const gh_mspan *s, uintptr_t next)
{
    return next >= s->start && next < s->limit && next % GH_PTR_SIZE == 0 &&
           (bitmap_bits(h, next) & (GH_BIT_ALLOCATED | GH_BIT_BOUNDARY)) == GH_BIT_BOUNDARY;
}

/* Walk s: every free-list entry is a free object start inside s, there is no
 * cycle, free + ref == nelems, and the bitmap agrees object by object.
 * Returns GH_ECORRUPT with *what naming the first broken rule (1..6). */
int gh_mspan_check(gh_mheap *h, gh_mspan *s, uint32_t *nfree, uint32_t *what)
{
    uintptr_t v, i;
    uint32_t n = 0, nlive = 0, nboundary = 0;
    uint64_t bits;
    int st = GH_OK;
    if (s == NULL || nfree == NULL || what == NULL || s->sizeclass == 0 || s->elemsize == 0 ||
        !range_ok(h, s->start, s->npages << GH_PAGE_SHIFT))
        return GH_EARG;
    *what = 0;
    if (!heap_lock_open(h))
        return GH_EARG;
    for (v = s->freelist; v != 0; v = *(uintptr_t *)v) {
        if (!link_ok(h, s, v) || (v - s->start) % s->elemsize != 0) {
            *what = 1; /* link outside the span, misaligned, or not a free start */
            st = GH_ECORRUPT;
            break;
        }
        if (++n > s->nelems) {
            *what = 2; /* longer than the span can hold: a cycle */
            st = GH_ECORRUPT;
            break;
        }
    }
    if (st == GH_OK) {
        for (i = 0; i < s->nelems; i++) {
            bits = bitmap_bits(h, s->start + i * s->elemsize);
            if (bits & GH_BIT_ALLOCATED)
                nlive++;
            else if (bits & GH_BIT_BOUNDARY)
                nboundary++;
        }
        if (n + s->ref != s->nelems) {
            *what = 3; /* free count + live count != capacity */
            st = GH_ECORRUPT;
        } else if (nlive != s->ref) {
            *what = 4; /* allocated bits != live objects */
            st = GH_ECORRUPT;
        } else if (nboundary != n) {
            *what = 5; /* boundary bits != free objects */
            st = GH_ECORRUPT;
        } else if (s->limit != s->start + (uintptr_t)s->nelems * s->elemsize) {
            *what = 6;
            st = GH_ECORRUPT;
        }
    }
    *nfree = n;
    heap_unlock(h);
    return st;
}

/* ------------------------------------------------------------------------
 * MCentral nonempty lists
 *
 * Per class, the uncached spans that have a free object, doubly linked
 * through the spans themselves (Go's MSpanList).  They live in C so that the
 * fast path can move a span between cache and list without Python: a free
 * into a full uncached span links it, a cache miss takes the head.  Python
 * (mcentral.py) decides everything else: when to carve a new span, when a
 * span with no live object goes back to MHeap.  Caller holds h->lock.
 * ------------------------------------------------------------------------ */

static inline void nonempty_push(gh_mheap *h, gh_mspan *s)
{
    gh_mspan *head = h->nonempty[s->sizeclass];
    s->prev = NULL;
    s->next = head;
    if (head != NULL)
        head->prev = s;
    h->nonempty[s->sizeclass] = s;
    s->inlist = 1;
}

static inline void nonempty_unlink(gh_mheap *h, gh_mspan *s)
{
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        h->nonempty[s->sizeclass] = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    s->next = s->prev = NULL;
    s->inlist = 0;
}

/* Unlink up to max spans of class cl that hold no live object, for MHeap to
 * take back (MCentral reclaim).  Their addresses go to out[0..*n). */
int gh_mcentral_take_empty(gh_mheap *h, uint32_t cl, uintptr_t *out, uintptr_t max, uintptr_t *n)
{
    gh_mspan *s, *next;
    uintptr_t k = 0;
    if (h == NULL || out == NULL || n == NULL || cl == 0 || cl >= GH_NUM_SIZE_CLASSES)
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    for (s = h->nonempty[cl]; s != NULL && k < max; s = next) {
        next = s->next;
        if (s->ref == 0) {
            nonempty_unlink(h, s);
            out[k++] = (uintptr_t)s;
        }
    }
    heap_unlock(h);
    *n = k;
    return GH_OK;
}

/* The spans on class cl's nonempty list (at most max), for check(). */
int gh_mcentral_list(gh_mheap *h, uint32_t cl, uintptr_t *out, uintptr_t max, uintptr_t *n)
{
    gh_mspan *s;
    uintptr_t k = 0;
    if (h == NULL || out == NULL || n == NULL || cl == 0 || cl >= GH_NUM_SIZE_CLASSES)
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    for (s = h->nonempty[cl]; s != NULL && k < max; s = s->next)
        out[k++] = (uintptr_t)s;
    heap_unlock(h);
    *n = k;
    return s == NULL ? GH_OK : GH_ECORRUPT; /* longer than max: a cycle, or max too small */
}

/* ------------------------------------------------------------------------
 * Sampled efence countdown (Heap(efence_sample=N))
 *
 * GWP-ASan's scheme, kept per heap rather than per thread (this file keeps
 * no thread-local state, and every allocation already holds h->lock): count
 * allocations down; the one that reaches zero is sampled, and the count is
 * re-armed with an interval drawn uniformly from [1, 2N-1].  Its mean is
 * exactly N (GWP-ASan draws from [1, 2N], mean N + 1/2), and N = 1 samples
 * every allocation.  Random rather than every N-th, so that a program whose
 * allocations repeat with a period that divides N does not always sample the
 * same call site.  The generator is xorshift64 (13, 7, 17): two shifts and
 * xors per sample; nothing needs more from it.  Caller holds h->lock.
 * ------------------------------------------------------------------------ */

static uint32_t sample_interval(gh_mheap *h)
{
    uint64_t x = h->sample_rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    h->sample_rng = x;
    return (uint32_t)(1 + x % (2 * (uint64_t)h->sample_rate - 1));
}

/* The cold half: once every N allocations on average. */
static __attribute__((noinline)) void sample_rearm(gh_mheap *h)
{
    h->sample_left = sample_interval(h);
    h->sample_pending++;
}

/* Count one allocation; 1 if it is the one sampled (then it must miss). */
static inline int sample_due(gh_mheap *h)
{
    if (__builtin_expect(h->sample_left == 0 || --h->sample_left != 0, 1))
        return 0;
    sample_rearm(h);
    return 1;
}

int gh_efence_sample_init(gh_mheap *h, uint32_t rate, uint64_t seed)
{
    if (h == NULL || rate >= (1U << 31))
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    h->sample_rate = rate;
    h->sample_pending = 0;
    h->sample_rng = seed != 0 ? seed : 0x9e3779b97f4a7c15ULL; /* xorshift's one bad state is 0 */
    h->sample_left = rate != 0 ? sample_interval(h) : 0;
    heap_unlock(h);
    return GH_OK;
}

/* The slow path's question "is this allocation sampled?".  tick: the
 * allocation never reached the fast path (an alignment, a size that is not
 * a plain int), so it is counted here. */
int gh_efence_sample_take(gh_mheap *h, int tick, int *out)
{
    if (h == NULL || out == NULL)
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    if (tick)
        (void)sample_due(h);
    *out = h->sample_pending != 0;
    h->sample_pending -= (uint64_t)*out;
    heap_unlock(h);
    return GH_OK;
}

/* ------------------------------------------------------------------------
 * MCache fast path
 *
 * Alloc pops the head of the class's cached span, and when that span is
 * exhausted caches the head of the class's nonempty list instead.  Free
 * pushes onto the object's own span (linking it into the nonempty list if it
 * was full and uncached).  Anything else (no span with a free object, large
 * objects, errors) is reported and left to Python.  Statuses come back as
 * small integers (never a valid address) so the hot call needs no
 * out-parameter.
 * ------------------------------------------------------------------------ */

static uintptr_t large_alloc(gh_mheap *h, uintptr_t size, int zero, int sample); /* below */

/* Every path that hands out n bytes counts them here, under h->lock. */
static inline void count_live(gh_mheap *h, uintptr_t n)
{
    h->live_bytes += n;
    if (h->live_bytes > h->peak_bytes)
        h->peak_bytes = h->live_bytes;
}

/* ------------------------------------------------------------------------
 * The efence quarantine (invariants in _sys.h, at gh_mheap.efq_head)
 *
 * A sampled object's malloc+free is two system calls when it stays here
 * (map the data pages, fault them; dropping them is shared with the next
 * few frees, efq_drop_all) and two Python slow paths
 * when it does not; so the steady state of a full quarantine, where each
 * free faults a span and the next sampled malloc of that page count takes
 * the oldest one back, is C's.  Anything else (a quarantine over its bound,
 * a span to delete, growth, a system call that failed) goes to Python,
 * which decides under its heap lock with the same books.  The system calls
 * are made under h->lock: the span must not be seen half changed, and the
 * lock's waiters yield.  Every function here runs with h->lock held.
 * ------------------------------------------------------------------------ */

static inline void efq_push(gh_mheap *h, gh_mspan *s)
{
    s->next = NULL;
    s->prev = h->efq_tail;
    if (h->efq_tail != NULL)
        h->efq_tail->next = s;
    else
        h->efq_head = s;
    h->efq_tail = s;
    h->efq_bytes += s->npages << GH_PAGE_SHIFT;
    h->efq_nspans++;
}

static inline void efq_unlink(gh_mheap *h, gh_mspan *s)
{
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        h->efq_head = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    else
        h->efq_tail = s->prev;
    s->next = s->prev = NULL;
    h->efq_bytes -= s->npages << GH_PAGE_SHIFT;
    h->efq_nspans--;
    if (s->undropped) { /* its pages stay as they are: dirty (needzero set) */
        uint32_t i;
        for (i = 0; i < h->efq_nundropped && h->efq_undropped[i] != s; i++)
            ;
        if (i < h->efq_nundropped) {
            h->efq_undropped[i] = h->efq_undropped[--h->efq_nundropped];
            h->efq_undropped_bytes -= s->npages << GH_PAGE_SHIFT;
        }
        s->undropped = 0;
    }
}

/* Give back the pages of every faulted span not dropped yet, one call per
 * run of adjacent spans (sorted by address first: sixteen at most, so an
 * insertion sort).  A drop the OS refuses leaves the pages resident and
 * needzero set, which is all a later reuse needs to know. */
static void efq_drop_all(gh_mheap *h)
{
    gh_mspan **u = h->efq_undropped, *t;
    uint32_t n = h->efq_nundropped, i, j, k;
    uintptr_t lo, hi;
    int zero;
    for (i = 1; i < n; i++) {
        t = u[i];
        for (j = i; j > 0 && u[j - 1]->start > t->start; j--)
            u[j] = u[j - 1];
        u[j] = t;
    }
    for (i = 0; i < n; i = k) {
        lo = u[i]->start;
        hi = lo + (u[i]->npages << GH_PAGE_SHIFT);
        for (k = i + 1; k < n && u[k]->start == hi; k++)
            hi += u[k]->npages << GH_PAGE_SHIFT;
#if defined(__linux__)
        zero = os_args_ok(lo, hi - lo, h->efq_pagesize, 0) &&
               madvise((void *)lo, hi - lo, MADV_DONTNEED) == 0;
#else
        (void)gh_sys_unused(lo, hi - lo, h->efq_pagesize);
        zero = 0; /* dropped pages may keep their bytes there */
#endif
        for (j = i; j < k; j++) {
            u[j]->undropped = 0;
            u[j]->needzero = (uint8_t)!zero;
        }
    }
    h->efq_nundropped = 0;
    h->efq_undropped_bytes = 0;
}

/* Whether C may make efence's system calls now (Python lets it, and the OS
 * layer is not injecting failures or tracing calls). */
static inline int efq_c_ok(const gh_mheap *h)
{
    return h->efq_on && !h->frozen && (h->efq_hook == NULL || *h->efq_hook == 0) &&
           h->efq_pagesize != 0;
}

/* The data pages [v, v+n) of faulted span s readable and writable again,
 * reading zero, undoing however they were faulted (s->marked); a failure
 * changes nothing.  Guard markers: removed, and the pages read zero
 * because installing them dropped what was there.  mprotect on Linux:
 * cheaper than the fresh mapping gh_sys_map makes (no mapping torn down and
 * built), and the pages read zero once dropped with MADV_DONTNEED (needzero
 * says whether they were).  Elsewhere dropped pages may keep their bytes
 * (MADV_FREE_REUSABLE), so a fresh mapping it is. */
static int efq_map_again(const gh_mspan *s, uintptr_t v, size_t n, size_t pagesize)
{
    if (!os_args_ok(v, n, pagesize, 0))
        return GH_EARG;
    if (s->marked == GH_FAULT_MARKS)
        return os_guard_remove(v, n);
#if defined(__linux__)
    if (s->marked == GH_FAULT_EITHER && os_guard_remove(v, n) != GH_OK &&
        __atomic_load_n(&os_guards_kernel, __ATOMIC_RELAXED) == 1)
        return EAGAIN; /* markers may be there and stay: leave it to Python's sys_map */
    return mprotect((void *)v, n, PROT_READ | PROT_WRITE) == 0 ? GH_OK : errno;
#else
    return gh_sys_map(v, n, pagesize);
#endif
}

/* The oldest quarantined span of npages pages (0: any), or NULL.  A walk:
 * in the steady state (one size sampled over and over) it is the first. */
static gh_mspan *efq_oldest(const gh_mheap *h, uintptr_t npages)
{
    gh_mspan *s;
    for (s = h->efq_head; s != NULL; s = s->next)
        if (npages == 0 || s->npages == npages)
            return s;
    return NULL;
}

/* A sampled object of size bytes in the oldest span of its page count, as
 * efence.py lays one out (malloc's alignment, right against the guard,
 * which stayed faulted): its address, or 0 if the quarantine is not full,
 * holds no span of that length, or the OS will not map the data pages
 * (then nothing changed and Python makes the object). */
/* An object of size bytes as efence.py rounds it: its usable size and its
 * data pages' length; 0 if the heap has no efence unit or size is absurd. */
static inline int efence_geometry(const gh_mheap *h, uintptr_t size, uintptr_t *usable,
                                  uintptr_t *data)
{
    uintptr_t unit = h->efq_unit, a = h->efq_align ? h->efq_align : size >= 16 ? 16 : 8;
    if (unit < GH_PAGE_SIZE || size > ((uintptr_t)1 << 40))
        return 0;
    *usable = ((size > 0 ? size : 1) + a - 1) & ~(a - 1);
    *data = (*usable + unit - 1) & ~(unit - 1);
    return 1;
}

/* Lay out an object of usable bytes in span s (a ready span, or a
 * quarantined one whose data pages, data bytes, were just mapped again) as
 * efence.py's alloc does for the heap's guard mode, and hand it out. */
static uintptr_t efence_hand_out(gh_mheap *h, gh_mspan *s, uintptr_t usable, uintptr_t data,
                                 int zero)
{
    uintptr_t base;
    if (h->efq_guard == GH_EFENCE_GUARD_BEFORE)
        base = s->start + h->efq_unit;
    else if (h->efq_guard == GH_EFENCE_GUARD_AFTER)
        base = s->start + data - usable;
    else
        base = s->start;
    /* needzero: pages from the page heap, or faulted without being dropped. */
    if (zero && s->needzero)
        memset((void *)base, 0, usable);
    s->state = GH_MSPAN_IN_USE;
    s->needzero = 1; /* dirty once handed out */
    s->base = base;
    s->elemsize = usable;
    s->limit = base + usable;
    s->ref = 1;
    bitmap_set(h, base & ~(uintptr_t)(GH_PTR_SIZE - 1), GH_BIT_ALLOCATED, GH_BIT_BOUNDARY);
    h->nlargealloc++;
    h->largealloc += usable;
    count_live(h, usable);
    return base;
}

/* A ready span for an object of size bytes, handed out; 0 if there is none
 * of its length (Python makes a batch on its miss). */
static uintptr_t efence_take_ready(gh_mheap *h, uintptr_t size, int zero)
{
    uintptr_t usable, data, k;
    gh_mspan *s;
    if (!h->efq_on || h->frozen || !efence_geometry(h, size, &usable, &data))
        return 0;
    k = data / h->efq_unit;
    if (k > GH_EFR_LISTS || (s = h->efr[k - 1]) == NULL)
        return 0;
    h->efr[k - 1] = s->next;
    s->next = NULL;
    h->efr_nspans--;
    h->efr_bytes -= s->npages << GH_PAGE_SHIFT;
    return efence_hand_out(h, s, usable, data, zero);
}

static uintptr_t efence_reuse(gh_mheap *h, uintptr_t size, int zero)
{
    uintptr_t unit = h->efq_unit, usable, data, span_bytes, old;
    gh_mspan *s;

    if (!h->efq_reuse || !efq_c_ok(h) || !efence_geometry(h, size, &usable, &data))
        return 0;
    span_bytes = data + unit;
    if (h->efq_nspans < h->efq_max_spans && h->efq_bytes + span_bytes <= h->efq_max_bytes)
        return 0; /* not full: a fresh span keeps the older ones faulted */
    s = efq_oldest(h, span_bytes >> GH_PAGE_SHIFT);
    if (s == NULL || efq_map_again(s, s->start, data, h->efq_pagesize) != GH_OK)
        return 0;
    efq_unlink(h, s);
    s->marked = GH_FAULT_PROT;
    old = s->base & ~(uintptr_t)(GH_PTR_SIZE - 1);
    bitmap_set(h, old, 0, GH_BIT_BOUNDARY); /* the freed object's start is nothing now */
    h->efence_reused++;
    return efence_hand_out(h, s, usable, data, zero);
}

/* The sampled allocation the countdown just drew, served here if it can be
 * (the pending sample is then used up), else 0: the slow path makes it. */
static inline uintptr_t efence_sample_serve(gh_mheap *h, uintptr_t size, int zero)
{
    uintptr_t usable, data, v;
    int full;
    if (!efence_geometry(h, size, &usable, &data))
        return 0;
    /* Full, the quarantine's oldest span or Python (which retires spans);
     * else a fresh span, so the faulted ones stay faulted. */
    full = h->efq_nspans >= h->efq_max_spans || h->efq_bytes + data + h->efq_unit > h->efq_max_bytes;
    v = full ? efence_reuse(h, size, zero) : efence_take_ready(h, size, zero);
    if (v != 0) {
        h->sample_pending--;
        h->efence_sampled_c++;
    }
    return v;
}

/* The data pages of live efence span s, laid out for the heap's guard mode
 * (efence_hand_out): [*lo, *lo + *len); 0 if s is too short to hold them. */
static inline int efence_data(const gh_mheap *h, const gh_mspan *s, uintptr_t *lo,
                              uintptr_t *len)
{
    uintptr_t nbytes = s->npages << GH_PAGE_SHIFT;
    uintptr_t guard = h->efq_guard != GH_EFENCE_GUARD_NONE ? h->efq_unit : 0;
    if (nbytes <= guard)
        return 0;
    *lo = h->efq_guard == GH_EFENCE_GUARD_BEFORE ? s->start + guard : s->start;
    *len = nbytes - guard;
    return 1;
}

/* free(v) of the live efence object of span s: faulted and quarantined
 * here, 1; or 0, nothing changed, when Python must do it (C may not make
 * the calls, v is not the object's start, the quarantine would pass a bound
 * and Python must retire spans, or mprotect failed and Python says why). */
static int efence_free(gh_mheap *h, gh_mspan *s, uintptr_t v)
{
    uintptr_t nbytes = s->npages << GH_PAGE_SHIFT, lo, len;
    int marked;
    if (!efq_c_ok(h) || v != s->base || s->ref != 1 || h->efq_nspans + 1 > h->efq_max_spans ||
        h->efq_bytes + nbytes > h->efq_max_bytes)
        return 0;
    if (!os_args_ok(s->start, nbytes, h->efq_pagesize, 0))
        return 0;
    /* Guard markers fault the data pages and drop them in one call; the
     * guard is faulted already, and os_guard_install's undo on a failure
     * must not open it.  Else gh_sys_fault in two halves: PROT_NONE now, so
     * that a use after free faults at once; the pages dropped with the next
     * few (efq_drop_all), which a stream of frees mostly makes one call for
     * adjacent spans. */
    marked = os_guards_on() && efence_data(h, s, &lo, &len) && os_guard_install(lo, len) == GH_OK;
    if (!marked && mprotect((void *)s->start, nbytes, PROT_NONE) != 0)
        return 0;
    bitmap_set(h, v, GH_BIT_BOUNDARY, GH_BIT_ALLOCATED);
    s->ref = 0;
    s->state = GH_MSPAN_FAULTED;
    s->marked = marked ? GH_FAULT_MARKS : GH_FAULT_PROT;
    efq_push(h, s);
    if (marked) {
        s->needzero = 0; /* the markers dropped the pages: they read zero */
    } else {
        if (h->efq_nundropped == GH_EFQ_DROP_BATCH ||
            h->efq_undropped_bytes + nbytes >= GH_EFQ_DROP_BYTES)
            efq_drop_all(h);
        s->needzero = 1;
        s->undropped = 1;
        h->efq_undropped[h->efq_nundropped++] = s;
        h->efq_undropped_bytes += nbytes;
        if (nbytes >= GH_EFQ_DROP_BYTES)
            efq_drop_all(h); /* a big span goes at once, alone */
    }
    h->nlargefree++;
    h->largefree += s->elemsize;
    h->live_bytes -= s->elemsize;
    return 1;
}

int gh_efence_q_push(gh_mheap *h, gh_mspan *s)
{
    if (h == NULL || s == NULL)
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    /* Python pushes a span it has just faulted, never a listed one. */
    if (s->state != GH_MSPAN_FAULTED || !s->efence || s->sizeclass != 0) {
        heap_unlock(h);
        return GH_EARG;
    }
    /* Its sys_fault used guard markers or mprotect, and did not say which. */
    s->marked = __atomic_load_n(&os_guards_kernel, __ATOMIC_RELAXED) == 1 ? GH_FAULT_EITHER
                                                                          : GH_FAULT_PROT;
    efq_push(h, s);
    heap_unlock(h);
    return GH_OK;
}

int gh_efence_q_oldest(gh_mheap *h, uintptr_t npages, uintptr_t *out)
{
    if (h == NULL || out == NULL)
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    *out = (uintptr_t)efq_oldest(h, npages);
    heap_unlock(h);
    return GH_OK;
}

int gh_efence_q_unlink(gh_mheap *h, gh_mspan *s)
{
    gh_mspan *t;
    if (h == NULL || s == NULL)
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    /* A walk to be sure s is listed: Python retires spans one at a time,
     * each a system call or two, so this is never the cost that counts. */
    for (t = h->efq_head; t != NULL && t != s; t = t->next)
        ;
    if (t == NULL) {
        heap_unlock(h);
        return GH_EARG;
    }
    efq_unlink(h, s);
    heap_unlock(h);
    return GH_OK;
}

/* The data units of ready span s, or 0 if s cannot be one. */
static uintptr_t ready_units(const gh_mheap *h, const gh_mspan *s)
{
    uintptr_t unit = h->efq_unit, nbytes = s->npages << GH_PAGE_SHIFT, guard, k;
    guard = h->efq_guard != GH_EFENCE_GUARD_NONE ? unit : 0;
    if (unit < GH_PAGE_SIZE || nbytes <= guard || (nbytes - guard) % unit != 0)
        return 0;
    k = (nbytes - guard) / unit;
    return k <= GH_EFR_LISTS ? k : 0;
}

int gh_efence_ready_put(gh_mheap *h, gh_mspan *s)
{
    uintptr_t k;
    if (h == NULL || s == NULL)
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    k = ready_units(h, s);
    if (k == 0 || s->state != GH_MSPAN_IN_USE || !s->efence || s->ref != 0 || s->sizeclass != 0) {
        heap_unlock(h);
        return GH_EARG;
    }
    s->next = h->efr[k - 1];
    h->efr[k - 1] = s;
    h->efr_nspans++;
    h->efr_bytes += s->npages << GH_PAGE_SHIFT;
    heap_unlock(h);
    return GH_OK;
}

/* Fault the guard unit at g of a span being made ready.  dirty: the span's
 * pages may hold an earlier user's bytes, so they are dropped too (as
 * gh_sys_fault does, in one call with guard markers); without markers,
 * pages that read zero came fresh from the OS and were never touched, so
 * mprotect alone is enough and saves a system call.  The guard is opened
 * again only by a fresh mapping (efence.py's flush_ready, delete_span), which
 * undoes either kind. */
static int ready_guard_fault(uintptr_t g, uintptr_t unit, uintptr_t pagesize, int dirty)
{
    if (dirty || os_guards_on())
        return gh_sys_fault(g, unit, pagesize);
    if (!os_args_ok(g, unit, pagesize, 0))
        return GH_EARG;
    return mprotect((void *)g, unit, PROT_NONE) == 0 ? GH_OK : errno;
}

/* Fault in, writable, the bitmap pages that describe [lo, hi) of the
 * arena: a batch's objects will each mark a word there, and bitmap_set
 * reads before it writes, so an untouched page costs two faults (the zero
 * page, then a copy); one call for the whole batch instead.  Advice: a
 * kernel without MADV_POPULATE_WRITE (before Linux 5.14) says EINVAL and
 * the faults come as before.  Caller holds h->lock, [lo, hi) in the arena. */
static void ready_bitmap_populate(const gh_mheap *h, uintptr_t lo, uintptr_t hi)
{
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
    unsigned shift;
    uintptr_t ps = h->efq_pagesize;
    uintptr_t a = (uintptr_t)bitmap_word(h, hi - GH_PTR_SIZE, &shift);
    uintptr_t b = (uintptr_t)bitmap_word(h, lo, &shift) + GH_PTR_SIZE;
    if (ps == 0 || (ps & (ps - 1)) != 0)
        return;
    /* The bitmap ends at arena_start, a page boundary, so b rounds up to at
     * most there; a's page holds a mapped word, so it is mapped. */
    a &= ~(ps - 1);
    b = (b + ps - 1) & ~(ps - 1);
    (void)madvise((void *)a, b - a, MADV_POPULATE_WRITE);
#else
    (void)h;
    (void)lo;
    (void)hi;
#endif
}

/* Carve npieces ready spans for objects of units data units off the top
 * of IN_USE span s, fresh from the page heap: each its data units and,
 * with a guard, one more unit, faulted here.  A batch's page-heap work is
 * then one Python allocation, and the rest (the spans table, the guards,
 * the lists) this one call.  Each piece takes the next struct of spares
 * (structs Python's SpanAlloc has just allocated, owned by the caller, who
 * holds the heap lock; C cannot tell an allocated struct from other
 * memory, so it checks only that they are distinct, aligned, and not s),
 * except that when the pieces fill s exactly the lowest is s itself.
 * Cutting from the top down keeps s, always, the part not carved yet, and
 * lists the lowest piece last on its LIFO list, so it is handed out first.
 * GH_CARVE_GUARDS_DONE: the caller faulted every guard already (through
 * the OS layer, while it injects or traces calls), so C makes no call.
 * *made: the pieces listed.  If the OS refuses a guard, carving stops and
 * its errno comes back: s is the rest, plain IN_USE memory as it came
 * (its pages its own in the spans table), and the spares after the *made
 * used ones are unused.  GH_MISS, nothing done, while C may not make
 * efence's calls (efq_c_ok) and the guards are not done. */
int gh_efence_ready_carve(gh_mheap *h, gh_mspan *s, uintptr_t units, uintptr_t npieces,
                          gh_mspan *const *spares, uintptr_t nspare, int flags, uintptr_t *made)
{
    uintptr_t unit, guard, piece_bytes, piece_pages, top, start, g, i, j, whole;
    gh_mspan *t = NULL;
    int st = GH_OK, dirty, done = (flags & GH_CARVE_GUARDS_DONE) != 0;

    if (h == NULL || s == NULL || made == NULL || (spares == NULL && nspare != 0) ||
        units == 0 || units > GH_EFR_LISTS || npieces == 0 || npieces > nspare + 1 ||
        nspare > GH_EFR_MAX_CARVE || (flags & ~GH_CARVE_GUARDS_DONE) != 0)
        return GH_EARG;
    *made = 0;
    if (!heap_lock_open(h))
        return GH_EARG;
    if (!done && !efq_c_ok(h)) {
        heap_unlock(h);
        return GH_MISS;
    }
    unit = h->efq_unit;
    guard = h->efq_guard != GH_EFENCE_GUARD_NONE ? unit : 0;
    piece_bytes = units * unit + guard;
    piece_pages = piece_bytes >> GH_PAGE_SHIFT;
    if (unit < GH_PAGE_SIZE || unit % GH_PAGE_SIZE != 0 || s->state != GH_MSPAN_IN_USE ||
        s->sizeclass != 0 || s->ref != 0 || s->efence || s->incache || s->inlist ||
        s->start % unit != 0 || s->npages < piece_pages * npieces ||
        !range_ok(h, s->start, s->npages << GH_PAGE_SHIFT)) {
        heap_unlock(h);
        return GH_EARG;
    }
    whole = s->npages == piece_pages * npieces; /* s becomes the lowest piece */
    if (nspare < npieces - (uintptr_t)whole) {
        heap_unlock(h);
        return GH_EARG;
    }
    for (i = 0; i < nspare; i++) {
        if (spares[i] == NULL || spares[i] == s ||
            (uintptr_t)spares[i] % _Alignof(gh_mspan) != 0) {
            heap_unlock(h);
            return GH_EARG;
        }
        for (j = 0; j < i; j++)
            if (spares[j] == spares[i]) {
                heap_unlock(h);
                return GH_EARG;
            }
    }
    dirty = s->needzero;
    top = s->start + (s->npages << GH_PAGE_SHIFT);
    if (!done)
        ready_bitmap_populate(h, top - npieces * piece_bytes, top);
    for (i = 0; i < npieces; i++) {
        t = whole && i == npieces - 1 ? s : spares[i];
        start = top - piece_bytes;
        if (guard != 0 && !done) {
            g = h->efq_guard == GH_EFENCE_GUARD_AFTER ? start + piece_bytes - unit : start;
            st = ready_guard_fault(g, unit, h->efq_pagesize, dirty);
            if (st != GH_OK)
                break;
        }
        if (t != s) {
            spans_point(h, start, piece_pages, t);
            s->npages -= piece_pages;
        }
        t->start = start;
        t->npages = piece_pages;
        t->freelist = 0;
        t->elemsize = 0;
        t->base = t->limit = start;
        t->ref = 0;
        t->nelems = 0;
        t->state = GH_MSPAN_IN_USE;
        t->sizeclass = 0;
        t->incache = t->inlist = 0;
        t->needzero = (uint8_t)dirty;
        t->efence = 1;
        t->undropped = 0;
        t->marked = GH_FAULT_PROT;
        t->prev = NULL;
        t->next = h->efr[units - 1];
        h->efr[units - 1] = t;
        h->efr_nspans++;
        h->efr_bytes += piece_bytes;
        top = start;
        (*made)++;
    }
    if (t != s || st != GH_OK) { /* s: the rest, as the page heap gave it */
        s->elemsize = s->npages << GH_PAGE_SHIFT;
        s->base = s->start;
        s->limit = s->start + s->elemsize;
    }
    heap_unlock(h);
    return st;
}

int gh_efence_ready_take(gh_mheap *h, uintptr_t units, uintptr_t *out)
{
    uintptr_t k;
    gh_mspan *s = NULL;
    if (h == NULL || out == NULL || units > GH_EFR_LISTS)
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    for (k = units ? units : 1; k <= (units ? units : GH_EFR_LISTS) && s == NULL; k++) {
        s = h->efr[k - 1];
        if (s != NULL) {
            h->efr[k - 1] = s->next;
            s->next = NULL;
            h->efr_nspans--;
            h->efr_bytes -= s->npages << GH_PAGE_SHIFT;
        }
    }
    *out = (uintptr_t)s;
    heap_unlock(h);
    return GH_OK;
}

int gh_efence_ready_list(gh_mheap *h, uintptr_t *out, uintptr_t max, uintptr_t *n)
{
    uintptr_t i = 0, bytes = 0, k;
    gh_mspan *s;
    int st = GH_OK;
    if (h == NULL || n == NULL || (out == NULL && max != 0))
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    for (k = 1; k <= GH_EFR_LISTS && st == GH_OK; k++) {
        for (s = h->efr[k - 1]; s != NULL; s = s->next) {
            if (ready_units(h, s) != k || s->state != GH_MSPAN_IN_USE || !s->efence ||
                s->ref != 0 || s->sizeclass != 0 || i >= h->efr_nspans) {
                st = GH_ECORRUPT;
                break;
            }
            if (i < max)
                out[i] = (uintptr_t)s;
            i++;
            bytes += s->npages << GH_PAGE_SHIFT;
        }
    }
    if (st == GH_OK && (i != h->efr_nspans || bytes != h->efr_bytes))
        st = GH_ECORRUPT;
    *n = i;
    heap_unlock(h);
    return st;
}

int gh_efence_q_drop(gh_mheap *h, uintptr_t *n)
{
    if (h == NULL || n == NULL)
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    *n = h->efq_nundropped;
    efq_drop_all(h);
    heap_unlock(h);
    return GH_OK;
}

int gh_efence_q_list(gh_mheap *h, uintptr_t *out, uintptr_t max, uintptr_t *n)
{
    gh_mspan *s, *prev = NULL;
    uintptr_t i = 0, bytes = 0, nu = 0, ubytes = 0, k;
    int st = GH_OK;
    if (h == NULL || n == NULL || (out == NULL && max != 0))
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    for (s = h->efq_head; s != NULL; prev = s, s = s->next) {
        if (s->prev != prev || s->state != GH_MSPAN_FAULTED || !s->efence || s->sizeclass != 0 ||
            i >= h->efq_nspans || (s->undropped && !s->needzero) ||
            s->marked > GH_FAULT_EITHER || (s->undropped && s->marked != GH_FAULT_PROT)) {
            st = GH_ECORRUPT;
            break;
        }
        if (i < max)
            out[i] = (uintptr_t)s;
        i++;
        bytes += s->npages << GH_PAGE_SHIFT;
        if (s->undropped) {
            nu++;
            ubytes += s->npages << GH_PAGE_SHIFT;
        }
    }
    if (st == GH_OK && (prev != h->efq_tail || i != h->efq_nspans || bytes != h->efq_bytes))
        st = GH_ECORRUPT;
    /* The undropped spans: the array's, all on the list (counted there), and
     * no other (so the list's count matches); their bytes below the bound. */
    if (st == GH_OK && (nu != h->efq_nundropped || ubytes != h->efq_undropped_bytes ||
                        nu > GH_EFQ_DROP_BATCH || (nu > 0 && ubytes >= GH_EFQ_DROP_BYTES)))
        st = GH_ECORRUPT;
    for (k = 0; st == GH_OK && k < h->efq_nundropped; k++)
        if (h->efq_undropped[k] == NULL || !h->efq_undropped[k]->undropped ||
            h->efq_undropped[k]->state != GH_MSPAN_FAULTED)
            st = GH_ECORRUPT;
    *n = i;
    heap_unlock(h);
    return st;
}

/* mcache_alloc's cold paths, out of line so that the hot one saves no
 * registers: an efence heap's allocation; a sampled one (the countdown just
 * said so, h->lock held and released here); MCache_Refill's common case,
 * swapping in the next span with room (NULL if there is none).  The
 * exhausted span is full, so it belongs on no list. */
static __attribute__((noinline)) uintptr_t mcache_alloc_efence(gh_mheap *h, uintptr_t size,
                                                               int zero)
{
    uintptr_t v;
    if (!heap_lock_open(h))
        return (uintptr_t)-GH_EARG;
    v = efence_take_ready(h, size, zero);
    heap_unlock(h);
    return v != 0 ? v : (uintptr_t)-GH_MISS;
}

static __attribute__((noinline)) uintptr_t mcache_alloc_sampled(gh_mheap *h, uintptr_t size,
                                                                int zero)
{
    uintptr_t v = efence_sample_serve(h, size, zero); /* a quarantined span, or the slow path's */
    heap_unlock(h);
    return v != 0 ? v : (uintptr_t)-GH_MISS;
}

static __attribute__((noinline)) gh_mspan *mcache_refill(gh_mheap *h, uintptr_t cl)
{
    gh_mspan *s = h->alloc[cl], *t = h->nonempty[cl];
    if (t == NULL)
        return NULL;
    nonempty_unlink(h, t);
    if (s != NULL)
        s->incache = 0;
    t->incache = 1;
    h->alloc[cl] = t;
    return t;
}

/* sample: count this allocation in the sampled-efence countdown (0: the slow
 * path, which has made its choice, asking again). */
static inline __attribute__((always_inline)) uintptr_t mcache_alloc(gh_mheap *h, uintptr_t size,
                                                                    int zero, int sample)
{
    gh_mspan *s;
    uintptr_t v, next, cl;

    if (h == NULL || h->arena_start == 0)
        return (uintptr_t)-GH_EARG;
    if (h->efence) /* efence mode: every object a ready span's, or Python's */
        return mcache_alloc_efence(h, size, zero);
    if (size > GH_MAX_SMALL_SIZE)
        return large_alloc(h, size, zero, sample);
    cl = size <= 1024 ? h->size_to_class8[(size + 7) >> 3]
                      : h->size_to_class128[(size - 1024 + 127) >> 7];
    if (!heap_lock_open(h))
        return (uintptr_t)-GH_EARG;
    if (sample && sample_due(h))
        return mcache_alloc_sampled(h, size, zero);
    if (h->frozen) {
        heap_unlock(h);
        return (uintptr_t)-GH_MISS; /* the slow path waits for check() */
    }
    s = h->alloc[cl];
    if (s == NULL || s->freelist == 0) {
        s = mcache_refill(h, cl);
        if (s == NULL) {
            heap_unlock(h);
            return (uintptr_t)-GH_MISS;
        }
    }
    v = s->freelist;
    next = *(uintptr_t *)v;
    /* next == v: a link to itself still looks like a free object (v is not
     * marked yet), and would hand v out twice (issue 8). */
    if (next != 0 && (next == v || !link_ok(h, s, next))) {
        heap_unlock(h);
        return (uintptr_t)-GH_ECORRUPT;
    }
    s->freelist = next;
    s->ref++;
    h->nmalloc[cl]++;
    count_live(h, s->elemsize);
    bitmap_set(h, v, GH_BIT_ALLOCATED, GH_BIT_BOUNDARY);
    /* Zeroed before the unlock, though the object is ours alone: once the
     * lock is free, gh_mheap_close may run and the arena be unmapped (by
     * another thread that holds the GIL) while a caller without it is still
     * here.  Uncontended, the longer hold costs nothing. */
    ((uintptr_t *)v)[0] = 0;
    if (zero && s->elemsize > 2 * GH_PTR_SIZE && ((uintptr_t *)v)[1] != 0)
        memset((void *)v, 0, s->elemsize);
    heap_unlock(h);
    return v;
}

/* ------------------------------------------------------------------------
 * The large-span cache (invariants in _sys.h).  Every function here runs
 * with h->lock held by its caller.
 * ------------------------------------------------------------------------ */

/* The list a cached span of npages pages belongs on. */
static inline uintptr_t lcache_list_of(uintptr_t npages)
{
    return npages > GH_LCACHE_MAX_PAGES ? GH_LCACHE_OVERSIZE : npages - GH_LCACHE_MIN_PAGES;
}

static inline void lcache_push(gh_mheap *h, gh_mspan *s)
{
    uintptr_t b = lcache_list_of(s->npages);
    s->prev = NULL;
    s->next = h->lcache[b];
    if (s->next != NULL)
        s->next->prev = s;
    h->lcache[b] = s;
    h->lcache_mask[b / 64] |= 1ULL << (b % 64);
    h->lcache_bytes += s->npages << GH_PAGE_SHIFT;
    h->lcache_nspans++;
}

/* Take cached span s off its list, wherever it is on it. */
static inline void lcache_unlink(gh_mheap *h, gh_mspan *s)
{
    uintptr_t b = lcache_list_of(s->npages);
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        h->lcache[b] = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    if (h->lcache[b] == NULL)
        h->lcache_mask[b / 64] &= ~(1ULL << (b % 64));
    s->next = s->prev = NULL;
    h->lcache_bytes -= s->npages << GH_PAGE_SHIFT;
    h->lcache_nspans--;
}

static inline gh_mspan *lcache_pop(gh_mheap *h, uintptr_t b)
{
    gh_mspan *s = h->lcache[b];
    lcache_unlink(h, s);
    return s;
}

/* Spare structs: DEAD, lent by Python (gh_lcache_spare_put) for cutting a
 * cached span in two, given back by coalescing. */
static inline void spare_push(gh_mheap *h, gh_mspan *s)
{
    s->state = GH_MSPAN_DEAD;
    s->prev = NULL;
    s->next = h->lcache_spare;
    h->lcache_spare = s;
    h->lcache_nspare++;
}

static inline gh_mspan *spare_pop(gh_mheap *h)
{
    gh_mspan *s = h->lcache_spare;
    h->lcache_spare = s->next;
    s->next = NULL;
    h->lcache_nspare--;
    return s;
}

/* Cut cached span s (off its list, longer than npages) in two: the first
 * npages pages, returned for the caller to hand out, and the rest, which
 * stays cached with a boundary bit at its start.  The shorter part gets a
 * spare struct, so the spans table is rewritten for the fewer pages (both
 * parts map every page, as a cached or in-use span does).  A spare must be
 * there (the caller checked). */
static gh_mspan *lcache_cut(gh_mheap *h, gh_mspan *s, uintptr_t npages)
{
    gh_mspan *t = spare_pop(h), *front, *back;
    uintptr_t rest = s->npages - npages, cut = s->start + (npages << GH_PAGE_SHIFT);

    t->sizeclass = 0;
    t->incache = t->inlist = 0;
    t->freelist = 0;
    t->nelems = 0;
    t->ref = 0;
    t->needzero = 1;
    if (npages <= rest) {
        front = t;
        back = s;
        front->start = s->start;
        spans_point(h, s->start, npages, front);
    } else {
        front = s;
        back = t;
        spans_point(h, cut, rest, back);
    }
    front->npages = npages;
    back->start = cut;
    back->npages = rest;
    back->state = GH_MSPAN_CACHED;
    back->elemsize = rest << GH_PAGE_SHIFT;
    back->base = cut;
    back->limit = cut + back->elemsize;
    bitmap_set(h, cut, GH_BIT_BOUNDARY, GH_BIT_ALLOCATED);
    lcache_push(h, back);
    return front;
}

/* Join cached spans lo and hi (hi starts where lo ends; both off their
 * lists) into one, which is returned off any list.  The longer keeps its
 * struct, so the spans table is rewritten for the shorter one's pages, and
 * the shorter's struct becomes a spare; hi's start is no object start any
 * more and loses its boundary bit. */
static gh_mspan *lcache_join(gh_mheap *h, gh_mspan *lo, gh_mspan *hi)
{
    gh_mspan *keep = lo->npages >= hi->npages ? lo : hi;
    gh_mspan *gone = keep == lo ? hi : lo;
    bitmap_set(h, hi->start, 0, GH_BIT_BOUNDARY | GH_BIT_ALLOCATED);
    spans_point(h, gone->start, gone->npages, keep);
    keep->start = lo->start;
    keep->npages = lo->npages + hi->npages;
    keep->elemsize = keep->npages << GH_PAGE_SHIFT;
    keep->base = keep->start;
    keep->limit = keep->start + keep->elemsize;
    spare_push(h, gone);
    return keep;
}

/* The cached span at address v's page if one starts (start) or ends (end)
 * exactly there, else NULL.  A spans-table entry may be stale (a free
 * span maps only its ends) or NULL, but always points at a struct of this
 * heap, which is read, never trusted: only a CACHED span whose own extent
 * matches counts. */
static inline gh_mspan *cached_at(const gh_mheap *h, uintptr_t page, uintptr_t start, uintptr_t end)
{
    gh_mspan *t = *spans_slot(h, page);
    if (t == NULL || t->state != GH_MSPAN_CACHED)
        return NULL;
    if (start != 0 && t->start != start)
        return NULL;
    if (end != 0 && t->start + (t->npages << GH_PAGE_SHIFT) != end)
        return NULL;
    return t;
}

/* Coalesce cached span s (on no list) with cached neighbours on either
 * side; returns the span holding them all, on no list. */
static gh_mspan *lcache_coalesce(gh_mheap *h, gh_mspan *s)
{
    uintptr_t end = s->start + (s->npages << GH_PAGE_SHIFT);
    gh_mspan *t;
    if (end < h->arena_used && (t = cached_at(h, end, end, 0)) != NULL) {
        lcache_unlink(h, t);
        s = lcache_join(h, s, t);
    }
    if (s->start > h->arena_start &&
        (t = cached_at(h, s->start - GH_PAGE_SIZE, 0, s->start)) != NULL) {
        lcache_unlink(h, t);
        s = lcache_join(h, t, s);
    }
    return s;
}

/* How far behind CLOCK_MONOTONIC the coarse clock may run: one timer tick
 * (1-10 ms) in practice; this margin covers a late one too. */
#define TICK_SLACK_NS 50000000u

/* Whether Python's scavenger tick is due: then the large paths miss, so
 * Python runs and scavenges (C serves, Python governs when). */
static inline int tick_due(const gh_mheap *h)
{
    struct timespec t;
#if defined(CLOCK_MONOTONIC_COARSE) && !defined(__APPLE__)
    /* A large malloc+free reads the clock twice, and the precise read was
     * the largest single cost of an np.empty(100000) round trip under the
     * NumPy handler (12%, perf).  The coarse clock is a cheap read that is
     * never ahead of the precise one and lags it by at most a timer tick:
     * a tick further away than the slack by it is not due by the precise
     * clock either, which is then read only near the tick. */
    if (clock_gettime(CLOCK_MONOTONIC_COARSE, &t) == 0 &&
        (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec + TICK_SLACK_NS < h->next_tick_ns)
        return 0;
#endif
#if defined(__APPLE__)
    clockid_t id = CLOCK_UPTIME_RAW; /* time.monotonic's clock on macOS */
#else
    clockid_t id = CLOCK_MONOTONIC;
#endif
    if (clock_gettime(id, &t) != 0)
        return 1;
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec >= h->next_tick_ns;
}

/* The first non-empty bin in [lo, hi] (bin indexes), or -1. */
static inline long lcache_find(const gh_mheap *h, uintptr_t lo, uintptr_t hi)
{
    uintptr_t w = lo / 64;
    uint64_t bits = h->lcache_mask[w] & (~0ULL << (lo % 64));
    for (;;) {
        if (bits != 0) {
            uintptr_t b = w * 64 + (uintptr_t)__builtin_ctzll(bits);
            return b <= hi ? (long)b : -1;
        }
        if (++w >= GH_LCACHE_MASK_WORDS || w * 64 > hi)
            return -1;
        bits = h->lcache_mask[w];
    }
}

/* Off its list, the shortest cached span longer than hi pages that leaves
 * a cacheable rest (GH_LCACHE_MIN_PAGES or more) after npages are cut from
 * it, or NULL.  The oversize list is searched first fit. */
static gh_mspan *lcache_take_longer(gh_mheap *h, uintptr_t npages, uintptr_t hi)
{
    uintptr_t lo = npages + GH_LCACHE_MIN_PAGES;
    gh_mspan *s;
    long b;
    if (lo <= hi)
        lo = hi + 1;
    if (lo <= GH_LCACHE_MAX_PAGES &&
        (b = lcache_find(h, lo - GH_LCACHE_MIN_PAGES, GH_LCACHE_BINS - 1)) >= 0)
        return lcache_pop(h, (uintptr_t)b);
    for (s = h->lcache[GH_LCACHE_OVERSIZE]; s != NULL; s = s->next) {
        if (s->npages >= lo) {
            lcache_unlink(h, s);
            return s;
        }
    }
    return NULL;
}

/* A large object of size bytes (> GH_MAX_SMALL_SIZE) from the cache, laid
 * out as Python's _malloc_large lays one out: the whole span is the object.
 * A span up to 1/8 longer than asked for is taken whole: a cut costs a
 * spans-table rewrite, and the usable size says what was given.  Else the
 * object is cut from the shortest longer span, oversize ones included,
 * which after coalescing is mostly the memory the last free gave back, still
 * in the CPU cache when it is cleared.  Returns 0 on a miss. */
static uintptr_t lcache_alloc(gh_mheap *h, uintptr_t size, int zero)
{
    uintptr_t npages, hi, nbytes;
    long b;
    gh_mspan *s;

    if (h->lcache_nspans == 0 || size > (GH_LCACHE_MAX_PAGES << GH_PAGE_SHIFT) || tick_due(h))
        return 0;
    npages = (size + GH_PAGE_MASK) >> GH_PAGE_SHIFT;
    hi = npages + (npages >> 3);
    if (hi > GH_LCACHE_MAX_PAGES)
        hi = GH_LCACHE_MAX_PAGES;
    b = lcache_find(h, npages - GH_LCACHE_MIN_PAGES, hi - GH_LCACHE_MIN_PAGES);
    if (b >= 0)
        s = lcache_pop(h, (uintptr_t)b);
    else if (h->lcache_spare != NULL && (s = lcache_take_longer(h, npages, hi)) != NULL)
        s = lcache_cut(h, s, npages);
    else
        return 0;
    nbytes = s->npages << GH_PAGE_SHIFT;
    s->state = GH_MSPAN_IN_USE;
    s->ref = 1;
    s->elemsize = nbytes;
    s->base = s->start;
    s->limit = s->start + nbytes;
    s->needzero = 1;
    bitmap_set(h, s->start, GH_BIT_ALLOCATED, GH_BIT_BOUNDARY);
    h->nlargealloc++;
    h->largealloc += nbytes;
    count_live(h, nbytes);
    /* A cached span was used: dirty (fresh memory never gets here).  Cleared
     * by memset, not by handing the pages back to the kernel: a buffer asked
     * for zeroed is usually filled next, and a page fault per OS page then
     * costs far more than the memset (measured: 30x at 1 MiB, bench (c)). */
    if (zero)
        memset((void *)s->start, 0, nbytes);
    return s->start;
}

/* free(v) of the live large object of span s into the cache, coalesced
 * with its cached neighbours: 1 if taken, 0 if Python must free it (no
 * cache, an efence or odd-shaped object, a size outside the bins, or the
 * cache at its cap).  A second free of v is a DoubleFree while v still
 * starts a cached span, an InvalidFree once it was coalesced away (as for
 * a span the page heap took back). */
static int lcache_put(gh_mheap *h, gh_mspan *s, uintptr_t v)
{
    uintptr_t nbytes = s->npages << GH_PAGE_SHIFT;
    if (h->lcache_limit == 0 || v != s->start || s->elemsize != nbytes || s->ref != 1 ||
        s->npages < GH_LCACHE_MIN_PAGES || s->npages > GH_LCACHE_MAX_PAGES ||
        h->lcache_bytes + nbytes > h->lcache_limit || tick_due(h))
        return 0;
    bitmap_set(h, v, GH_BIT_BOUNDARY, GH_BIT_ALLOCATED);
    s->ref = 0;
    s->state = GH_MSPAN_CACHED;
    lcache_push(h, lcache_coalesce(h, s));
    h->nlargefree++;
    h->largefree += nbytes;
    h->live_bytes -= nbytes;
    return 1;
}

static uintptr_t large_alloc(gh_mheap *h, uintptr_t size, int zero, int sample)
{
    uintptr_t v;
    if (!heap_lock_open(h))
        return (uintptr_t)-GH_EARG;
    /* A sampled allocation is an efence object: a quarantined span, or a miss
     * (the slow path makes one). */
    if (sample && sample_due(h))
        v = efence_sample_serve(h, size, zero);
    else
        v = h->frozen ? 0 : lcache_alloc(h, size, zero);
    heap_unlock(h);
    return v != 0 ? v : (uintptr_t)-GH_MISS;
}

/* Python's large paths count here, under the lock a C caller counts under. */
int gh_large_account(gh_mheap *h, uint64_t nalloc, uint64_t alloc_bytes, uint64_t nfree,
                     uint64_t free_bytes)
{
    if (h == NULL || !heap_lock_open(h))
        return GH_EARG;
    h->nlargealloc += nalloc;
    h->largealloc += alloc_bytes;
    h->nlargefree += nfree;
    h->largefree += free_bytes;
    count_live(h, alloc_bytes);
    h->live_bytes -= free_bytes;
    heap_unlock(h);
    return GH_OK;
}

/* Whether cached span s, found on list b after prev, keeps the cache's
 * invariants (see _sys.h): state, list, links, extent, bitmap, and no
 * cached neighbour after it (so none before it either). */
static int lcache_span_ok(const gh_mheap *h, const gh_mspan *s, uintptr_t b, const gh_mspan *prev)
{
    uintptr_t end;
    uint64_t bits;
    if (s->state != GH_MSPAN_CACHED || s->sizeclass != 0 || s->ref != 0 || s->prev != prev ||
        lcache_list_of(s->npages) != b || s->npages < GH_LCACHE_MIN_PAGES ||
        s->start < h->arena_start || s->start % GH_PAGE_SIZE != 0 ||
        s->npages > (h->arena_used - s->start) >> GH_PAGE_SHIFT)
        return 0;
    bits = bitmap_bits(h, s->start);
    if ((bits & GH_BIT_ALLOCATED) || !(bits & GH_BIT_BOUNDARY))
        return 0;
    end = s->start + (s->npages << GH_PAGE_SHIFT);
    return end >= h->arena_used || cached_at(h, end, end, 0) == NULL;
}

/* Every cached span's struct address into out[0..max), checking the cache's
 * invariants in C memory on the way (the spares' too): GH_ECORRUPT at the
 * first broken one. */
int gh_lcache_list(gh_mheap *h, uintptr_t *out, uintptr_t max, uintptr_t *n)
{
    uintptr_t b, k = 0, bytes = 0, nspare = 0;
    const gh_mspan *t;
    int st = GH_OK;
    if (h == NULL || out == NULL || n == NULL || !heap_lock_open(h))
        return GH_EARG;
    for (b = 0; b < GH_LCACHE_LISTS && st == GH_OK; b++) {
        const gh_mspan *s = h->lcache[b], *prev = NULL;
        if ((s != NULL) != ((h->lcache_mask[b / 64] >> (b % 64)) & 1))
            st = GH_ECORRUPT;
        for (; s != NULL && st == GH_OK; prev = s, s = s->next) {
            if (k == max || !lcache_span_ok(h, s, b, prev)) {
                st = GH_ECORRUPT;
                break;
            }
            out[k++] = (uintptr_t)s;
            bytes += s->npages << GH_PAGE_SHIFT;
        }
    }
    if (st == GH_OK && (k != h->lcache_nspans || bytes != h->lcache_bytes ||
                        bytes > h->lcache_limit))
        st = GH_ECORRUPT;
    for (t = h->lcache_spare; t != NULL && st == GH_OK; t = t->next)
        if (t->state != GH_MSPAN_DEAD || ++nspare > h->lcache_nspare)
            st = GH_ECORRUPT;
    if (st == GH_OK && nspare != h->lcache_nspare)
        st = GH_ECORRUPT;
    *n = k;
    heap_unlock(h);
    return st;
}

/* Take up to max cached spans out of the cache for Python to free into the
 * page heap: each comes back IN_USE with ref 0 and no bitmap bits, as a
 * large span stands just before MHeap frees it.  *n says how many. */
int gh_lcache_flush(gh_mheap *h, uintptr_t *out, uintptr_t max, uintptr_t *n)
{
    uintptr_t b, k = 0;
    if (h == NULL || out == NULL || n == NULL || !heap_lock_open(h))
        return GH_EARG;
    for (b = 0; b < GH_LCACHE_LISTS && k < max; b++) {
        while (h->lcache[b] != NULL && k < max) {
            gh_mspan *s = lcache_pop(h, b);
            bitmap_set(h, s->start, 0, GH_BIT_BOUNDARY);
            s->state = GH_MSPAN_IN_USE;
            out[k++] = (uintptr_t)s;
        }
    }
    *n = k;
    heap_unlock(h);
    return GH_OK;
}

/* Lend C the DEAD struct s as a spare for cutting cached spans.  The
 * caller keeps owning it (Python's wrapper stays) and takes it back with
 * gh_lcache_spare_take before it may reuse or release it. */
int gh_lcache_spare_put(gh_mheap *h, gh_mspan *s)
{
    if (h == NULL || s == NULL || s->state != GH_MSPAN_DEAD)
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    spare_push(h, s);
    heap_unlock(h);
    return GH_OK;
}

/* Take up to max spares back (their addresses into out[0..*n)): the ones
 * Python lent and the ones coalescing freed, all DEAD. */
int gh_lcache_spare_take(gh_mheap *h, uintptr_t *out, uintptr_t max, uintptr_t *n)
{
    uintptr_t k = 0;
    if (h == NULL || out == NULL || n == NULL || !heap_lock_open(h))
        return GH_EARG;
    while (h->lcache_spare != NULL && k < max)
        out[k++] = (uintptr_t)spare_pop(h);
    *n = k;
    heap_unlock(h);
    return GH_OK;
}

/* malloc of a zeroed small object: an address, or a status < 4096 (-GH_*). */
uintptr_t gh_mcache_alloc(gh_mheap *h, uintptr_t size)
{
    return mcache_alloc(h, size, 1, 1);
}

uintptr_t gh_mcache_alloc_nozero(gh_mheap *h, uintptr_t size)
{
    return mcache_alloc(h, size, 0, 1);
}

/* The same, not counted by the sampled-efence countdown: for the slow path,
 * which has already counted this allocation and decided it is not sampled. */
uintptr_t gh_mcache_alloc_unsampled(gh_mheap *h, uintptr_t size, int zero)
{
    return mcache_alloc(h, size, zero != 0, 0);
}

/* The start of the calls that judge v as free() would: GH_EARG for a closed
 * heap, GH_EINVALID for an address no object can start at; on GH_OK the lock
 * is held and *bits, *s are v's bitmap bits and span (or NULL). */
static inline __attribute__((always_inline)) int judge_begin(gh_mheap *h, uintptr_t v, uint64_t *bits,
                                                          gh_mspan **s)
{
    if (h == NULL || h->arena_start == 0)
        return GH_EARG;
    if (v < h->arena_start || v >= h->arena_used || v % GH_PTR_SIZE != 0)
        return GH_EINVALID;
    if (!heap_lock_open(h))
        return GH_EARG;
    *bits = bitmap_bits(h, v);
    *s = *spans_slot(h, v);
    return GH_OK;
}

/* Why v, whose allocated bit is clear, cannot be freed: a boundary bit marks
 * a freed object's start (GH_EDOUBLE), except the tail mark a small span
 * carries at its limit (the leftover past its last object), which was never
 * an object (GH_EINVALID), as is anything without bits.  s: v's span or NULL. */
static inline int not_live_status(const gh_mspan *s, uintptr_t v, uint64_t bits)
{
    if (!(bits & GH_BIT_BOUNDARY))
        return GH_EINVALID;
    if (s != NULL && s->sizeclass != 0 && v >= s->limit)
        return GH_EINVALID;
    return GH_EDOUBLE;
}

/* gh_mcache_free of live large or efence object v of span s, h->lock held
 * and released here; out of line so that the small path saves no registers. */
static __attribute__((noinline)) int mcache_free_large(gh_mheap *h, gh_mspan *s, uintptr_t v)
{
    int cached = s->efence ? efence_free(h, s, v) : lcache_put(h, s, v);
    heap_unlock(h);
    return cached ? GH_OK : GH_FREED_LARGE;
}

/* free(v).  Returns 0, a GH_E* status (< 0, nothing changed), or
 * GH_FREED_LARGE: v is a live large/efence object; nothing is changed yet,
 * Python frees it under the heap lock (gh_large_free, then the span), so
 * that no one ever sees a span half freed. */
int gh_mcache_free(gh_mheap *h, uintptr_t v)
{
    gh_mspan *s;
    uint64_t bits;
    int st = judge_begin(h, v, &bits, &s);

    if (st != GH_OK)
        return st;
    if (h->frozen) {
        heap_unlock(h);
        return GH_EBUSY;
    }
    if (!(bits & GH_BIT_ALLOCATED)) {
        heap_unlock(h);
        return not_live_status(s, v, bits);
    }
    if (s == NULL || s->state != GH_MSPAN_IN_USE || s->ref == 0) {
        heap_unlock(h);
        return GH_ECORRUPT;
    }
    if (s->sizeclass == 0)
        return mcache_free_large(h, s, v);
    bitmap_set(h, v, GH_BIT_BOUNDARY, GH_BIT_ALLOCATED);
    ((uintptr_t *)v)[0] = s->freelist;
    if (s->elemsize > 2 * GH_PTR_SIZE)
        ((uintptr_t *)v)[1] = GH_DIRTY_MARKER;
    else if (s->elemsize == 2 * GH_PTR_SIZE)
        ((uintptr_t *)v)[1] = 0;
    if (s->freelist == 0 && !s->incache && !s->inlist)
        nonempty_push(h, s);
    s->freelist = v;
    s->ref--;
    h->nfree[s->sizeclass]++;
    h->live_bytes -= s->elemsize;
    heap_unlock(h);
    return GH_OK;
}


/* The first half of freeing large/efence object v, under Python's heap lock:
 * check again (another thread may have freed it since gh_mcache_free said
 * GH_FREED_LARGE) and mark it free.  Python then frees or faults the span. */
int gh_large_free(gh_mheap *h, uintptr_t v)
{
    gh_mspan *s;
    uint64_t bits;
    int st = judge_begin(h, v, &bits, &s);
    if (st != GH_OK)
        return st;
    if (!(bits & GH_BIT_ALLOCATED))
        st = not_live_status(s, v, bits);
    else if (s != NULL && s->state == GH_MSPAN_IN_USE && s->sizeclass != 0)
        st = GH_EINVALID; /* a small object now: the large one was freed and reused since */
    else if (s == NULL || s->state != GH_MSPAN_IN_USE || s->ref != 1)
        st = GH_ECORRUPT;
    else {
        bitmap_set(h, v, GH_BIT_BOUNDARY, GH_BIT_ALLOCATED);
        s->ref = 0;
    }
    heap_unlock(h);
    return st;
}

/* free's verdict on v from its bitmap bits and span, changing nothing:
 * GH_OK for the start of a live object (s is then its span). */
static inline int live_status(const gh_mspan *s, uintptr_t v, uint64_t bits)
{
    if (!(bits & GH_BIT_ALLOCATED))
        return not_live_status(s, v, bits);
    if (s == NULL || s->state != GH_MSPAN_IN_USE || s->ref == 0 ||
        (s->sizeclass == 0 && v != s->base))
        return GH_ECORRUPT;
    return GH_OK;
}

/* What free(v) would say, without freeing: GH_OK with the usable size and
 * size class (0: a large or efence object) of the live object starting at v,
 * else free's verdict (GH_EINVALID, GH_EDOUBLE, GH_ECORRUPT).  realloc's
 * first step; whether the object stays where it is, Python decides. */
int gh_object_size(gh_mheap *h, uintptr_t v, uintptr_t *size, uint32_t *sizeclass)
{
    gh_mspan *s;
    uint64_t bits;
    int st;
    if (size == NULL || sizeclass == NULL)
        return GH_EARG;
    st = judge_begin(h, v, &bits, &s);
    if (st != GH_OK)
        return st;
    st = live_status(s, v, bits);
    if (st == GH_OK) {
        *size = s->elemsize;
        *sizeclass = s->sizeclass;
    }
    heap_unlock(h);
    return st;
}

/* realloc(v, n)'s in-place case, decided as Heap.realloc documents it: GH_OK
 * if the live object at v holds n bytes where it is -- n is of its small size
 * class, or it is a large non-efence object whose span holds n and n needs
 * more than half of the span's pages -- GH_MISS if it must move (Python moves
 * it), else free's verdict for v.  Changes nothing. */
int gh_realloc_in_place(gh_mheap *h, uintptr_t v, uintptr_t n)
{
    gh_mspan *s;
    uint64_t bits;
    int st = judge_begin(h, v, &bits, &s);
    if (st != GH_OK)
        return st;
    st = live_status(s, v, bits);
    if (st == GH_OK && h->efence)
        st = GH_MISS;
    else if (st == GH_OK && s->sizeclass != 0) {
        uintptr_t cl = n > GH_MAX_SMALL_SIZE ? 0
                       : n <= 1024           ? h->size_to_class8[(n + 7) >> 3]
                                             : h->size_to_class128[(n - 1024 + 127) >> 7];
        st = cl == s->sizeclass ? GH_OK : GH_MISS;
    } else if (st == GH_OK) {
        uintptr_t pages = (n + GH_PAGE_MASK) >> GH_PAGE_SHIFT;
        st = n <= s->elemsize && 2 * pages > (s->elemsize >> GH_PAGE_SHIFT) ? GH_OK : GH_MISS;
    }
    heap_unlock(h);
    return st;
}

/* live_bytes and peak_bytes read together; with reset != 0 the peak
 * restarts from what is live now (Heap.reset_peak) and *peak is the one it
 * replaced, so no malloc in between is lost to the caller. */
int gh_mheap_peak(gh_mheap *h, int reset, uint64_t *live, uint64_t *peak)
{
    if (h == NULL || live == NULL || peak == NULL)
        return GH_EARG;
    heap_lock(h);
    *live = h->live_bytes;
    *peak = h->peak_bytes;
    if (reset)
        h->peak_bytes = h->live_bytes;
    heap_unlock(h);
    return GH_OK;
}

/* Freeze (1) or thaw (0) the fast paths: while frozen, alloc reports a miss
 * and free GH_EBUSY, so both go to Python's slow path and wait for the heap
 * lock that check() holds.  Calls already inside the C lock finish first. */
int gh_mheap_freeze(gh_mheap *h, int frozen)
{
    if (h == NULL)
        return GH_EARG;
    heap_lock(h);
    h->frozen = frozen != 0;
    heap_unlock(h);
    return GH_OK;
}

/* Close h for every C call: the arena fields, the mcache and the nonempty
 * lists are cleared under the lock, so a call that holds it now finishes
 * first and every later one sees a closed heap (heap_lock_open) and touches
 * nothing; the fault reporter's registry lets go of h too.  Only then may
 * Python give the memory back. */
int gh_mheap_close(gh_mheap *h)
{
    uint32_t cl;
    if (h == NULL)
        return GH_EARG;
    heap_lock(h);
    h->arena_start = h->arena_used = h->spans = 0;
    for (cl = 0; cl < GH_NUM_SIZE_CLASSES; cl++)
        h->alloc[cl] = h->nonempty[cl] = NULL;
    h->frozen = 0;
    heap_unlock(h);
    registry_remove(h); /* the fault reporter stops reading h before any unmap */
    return GH_OK;
}

/* Swap the span the mcache allocates from for class cl; the old one (or 0)
 * comes back in *old, uncached, and on the nonempty list if it has room. */
int gh_mcache_swap(gh_mheap *h, uint32_t cl, gh_mspan *s, uintptr_t *old)
{
    gh_mspan *prev;
    if (h == NULL || old == NULL || cl == 0 || cl >= GH_NUM_SIZE_CLASSES ||
        (s != NULL && (s->sizeclass != cl || s->state != GH_MSPAN_IN_USE || s->inlist)))
        return GH_EARG;
    if (!heap_lock_open(h))
        return GH_EARG;
    prev = h->alloc[cl];
    if (prev != NULL) {
        prev->incache = 0;
        if (prev->freelist != 0)
            nonempty_push(h, prev);
    }
    if (s != NULL)
        s->incache = 1;
    h->alloc[cl] = s;
    heap_unlock(h);
    *old = (uintptr_t)prev;
    return GH_OK;
}

/* Zero n bytes at v (large objects that may be dirty).  The caller owns the
 * range; nothing to check beyond the pointer and overflow. */
int gh_memclr(uintptr_t v, uintptr_t n)
{
    if (v == 0 || v + n < v)
        return GH_EARG;
    memset((void *)v, 0, n);
    return GH_OK;
}

/* Counters read in one locked pass so a stats() snapshot is consistent. */
int gh_mcache_counts(gh_mheap *h, uint64_t *nmalloc, uint64_t *nfree)
{
    int i;
    if (h == NULL || nmalloc == NULL || nfree == NULL)
        return GH_EARG;
    heap_lock(h);
    for (i = 0; i < GH_NUM_SIZE_CLASSES; i++) {
        nmalloc[i] = h->nmalloc[i];
        nfree[i] = h->nfree[i];
    }
    heap_unlock(h);
    return GH_OK;
}

/* ------------------------------------------------------------------------
 * Fault reporter (efence diagnosis)
 *
 * efence turns an overrun or a use-after-free into SIGSEGV (SIGBUS on some
 * systems) at the faulting instruction; this handler says what was hit.  For
 * a fault inside the mapped arena of a registered heap it writes ONE line to
 * stderr, from C data alone (the spans table and the span struct):
 *
 *   goheap: <kind> at 0x<addr>: <n> bytes <past|before|into> object 0x<base>
 *   (<size> bytes), span 0x<start>+<npages> pages
 *
 * (one line in reality; "1 byte", "1 page" in the singular).  <kind>:
 *   use-after-free  the span is FAULTED: its object was freed;
 *   overrun         a live object's span, at or past the object's end (its guard);
 *   underrun        a live object's span, before the object (guard="before");
 *   guard           a faulted page of a live object's span inside the object
 *                   (its protection was changed behind goheap's back).
 * <n> counts as Heap.explain does: "1 byte past" is the first byte after the
 * object, "n bytes before" its start, "n bytes into" from its first byte (0).
 * An arena address with no such object (a free or small span, no span)
 * gets "goheap: wild access at 0x<addr>: no efence object there, span
 * 0x<start>+<npages> pages" (or ", heap 0x<arena_start>" without a span).
 * A fault outside every registered heap, or a signal some process sent
 * (si_code <= 0: its si_addr is no address), gets no line.
 *
 * Then the signal goes on to the handler this one replaced, so Python's
 * faulthandler (or a sanitizer's) still prints its stack: SA_SIGINFO -> its
 * sa_sigaction; a plain handler -> its sa_handler (SA_RESETHAND honoured);
 * SIG_DFL -> reset to it and re-raise, so the process dies of the signal as
 * it would have; SIG_IGN -> nothing for a sent signal, but a real fault is
 * fatal (re-running the instruction would fault forever; the kernel kills a
 * process that ignores a real fault too).  If that handler returns, so does
 * this one and the instruction runs again: a repeat of the address last
 * reported writes no second line.
 *
 * Cycles.  Installed again on top of a handler that itself chains back to
 * this one (faulthandler enabled after the first install: its "previous" is
 * goheap), the re-raise that handler sends after its report would come back
 * here and go round forever; so a sent signal arriving after a real fault
 * was passed on is fatal (SIG_DFL, re-raise).  Installed under faulthandler
 * (goheap first), faulthandler sees the fault first, prints its stack and
 * re-raises: that is a sent signal, passed on untouched, and no goheap line
 * is written; install (again) after faulthandler.enable() to get both.
 *
 * Async-signal-safe: write(2), sigaction(2), sigemptyset, raise(3), memset
 * and atomics; no malloc, no stdio, no lock (the faulting thread may hold
 * h->lock).  The heap is read without its lock while another thread may be
 * changing it: every pointer is checked before it is followed, so a torn
 * read gives at worst a wrong line.  The one unguarded case: a span struct
 * given back to the OS between the table read and the struct read, which
 * takes a concurrent quarantine retirement of that very span; the process
 * then dies of the nested fault, without the line.
 * ------------------------------------------------------------------------ */

#include <fcntl.h>
#include <signal.h>

typedef struct {
    char b[240];
    size_t n;
} fault_line;

static void line_str(fault_line *l, const char *s)
{
    while (*s != '\0' && l->n < sizeof l->b - 1)
        l->b[l->n++] = *s++;
}

static void line_num(fault_line *l, uintptr_t v, unsigned base)
{
    static const char digits[] = "0123456789abcdef";
    char tmp[24];
    size_t k = 0;
    if (base == 16)
        line_str(l, "0x");
    do {
        tmp[k++] = digits[v % base];
        v /= base;
    } while (v != 0);
    while (k > 0 && l->n < sizeof l->b - 1)
        l->b[l->n++] = tmp[--k];
}

/* "<n> byte(s) <what>" */
static void line_count(fault_line *l, uintptr_t n, const char *unit, const char *what)
{
    line_num(l, n, 10);
    line_str(l, " ");
    line_str(l, unit);
    if (n != 1)
        line_str(l, "s");
    line_str(l, what);
}

/* The line for address a in span s (or none) of the heap whose arena starts
 * at arena_start; s has been checked to hold a. */
static void fault_describe_span(fault_line *l, const gh_mspan *s, uintptr_t a,
                                uintptr_t arena_start)
{
    uintptr_t base = 0, size = 0, end;
    const char *kind = "wild access";
    if (s != NULL && (s->state == GH_MSPAN_FAULTED ||
                      (s->state == GH_MSPAN_IN_USE && s->sizeclass == 0))) {
        base = s->base;
        size = s->elemsize;
        end = base + size;
        kind = s->state == GH_MSPAN_FAULTED ? "use-after-free"
               : a >= end                   ? "overrun"
               : a < base                   ? "underrun"
                                            : "guard";
    }
    line_str(l, "goheap: ");
    line_str(l, kind);
    line_str(l, " at ");
    line_num(l, a, 16);
    if (size != 0 || base != 0) {
        end = base + size;
        line_str(l, ": ");
        if (a >= end)
            line_count(l, a - end + 1, "byte", " past object ");
        else if (a < base)
            line_count(l, base - a, "byte", " before object ");
        else
            line_count(l, a - base, "byte", " into object ");
        line_num(l, base, 16);
        line_str(l, " (");
        line_count(l, size, "byte", ")");
    } else {
        line_str(l, ": no efence object there");
    }
    if (s != NULL) {
        line_str(l, ", span ");
        line_num(l, s->start, 16);
        line_str(l, "+");
        line_count(l, s->npages, "page", "");
    } else {
        line_str(l, ", heap ");
        line_num(l, arena_start, 16);
    }
    line_str(l, "\n");
}

/* Whether a lies in the mapped arena of a registered heap; if so, its line
 * goes into l.  The caller has announced itself in fault_active. */
static int fault_describe(uintptr_t a, fault_line *l)
{
    int i;
    for (i = 0; i < GH_FAULT_MAX_HEAPS; i++) {
        gh_mheap *h = __atomic_load_n(&fault_heaps[i], __ATOMIC_SEQ_CST);
        uintptr_t start, used, spans, npages;
        gh_mspan *s;
        if (h == NULL)
            continue;
        start = __atomic_load_n(&h->arena_start, __ATOMIC_RELAXED);
        used = __atomic_load_n(&h->arena_used, __ATOMIC_RELAXED);
        spans = __atomic_load_n(&h->spans, __ATOMIC_RELAXED);
        if (start == 0 || spans == 0 || a < start || a >= used)
            continue;
        s = __atomic_load_n(spans_slot(h, a), __ATOMIC_RELAXED);
        if (s != NULL && (uintptr_t)s % sizeof(uintptr_t) == 0) {
            npages = s->npages;
            if (a < s->start || npages > ((used - start) >> GH_PAGE_SHIFT) ||
                a - s->start >= (npages << GH_PAGE_SHIFT))
                s = NULL; /* a stale entry (a free span's inner page): no span */
        } else {
            s = NULL;
        }
        fault_describe_span(l, s, a, start);
        return 1;
    }
    return 0;
}

static struct sigaction fault_prev[2]; /* what was replaced: [0] SIGSEGV, [1] SIGBUS */
static int fault_chained;              /* a real fault has been passed on */
static uintptr_t fault_last;           /* the address of the last line written */

static void fault_reset_default(int sig)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    (void)sigaction(sig, &dfl, NULL);
}

/* Die of sig as if no handler had been there: the raise stays pending while
 * sig is blocked (this handler's frame) and fires, fatally, on return. */
static void fault_die(int sig)
{
    fault_reset_default(sig);
    (void)raise(sig);
}

static void fault_report(int sig, siginfo_t *si, void *ctx);

/* Where the line goes: stderr unless Python gave another descriptor (the
 * pytest plugin gives a copy of the real stderr, since during a test pytest
 * points fd 2 at a capture file that dies with the process).  Read once per
 * report; an int store is atomic, so no lock is needed. */
static int fault_fd = 2;

/* Pass sig on to the handler fault_report replaced (see the section note). */
static void fault_chain(int sig, siginfo_t *si, void *ctx, int real)
{
    const struct sigaction *p = &fault_prev[sig == SIGBUS];
    if (p->sa_handler == SIG_DFL) {
        fault_die(sig);
    } else if (p->sa_handler == SIG_IGN) {
        if (real)
            fault_die(sig);
    } else if (p->sa_flags & SA_SIGINFO) {
        if (p->sa_sigaction == fault_report) {
            fault_die(sig); /* never chain to itself */
            return;
        }
        if (p->sa_flags & SA_RESETHAND)
            fault_reset_default(sig);
        p->sa_sigaction(sig, si, ctx);
    } else {
        if (p->sa_flags & SA_RESETHAND)
            fault_reset_default(sig);
        p->sa_handler(sig);
    }
}

static void fault_report(int sig, siginfo_t *si, void *ctx)
{
    int saved_errno = errno;
    int real = si != NULL && si->si_code > 0;
    if (real) {
        fault_line l;
        uintptr_t a = (uintptr_t)si->si_addr;
        int found;
        l.n = 0;
        __atomic_add_fetch(&fault_active, 1, __ATOMIC_SEQ_CST);
        found = fault_describe(a, &l);
        __atomic_sub_fetch(&fault_active, 1, __ATOMIC_SEQ_CST);
        if (found && __atomic_exchange_n(&fault_last, a, __ATOMIC_SEQ_CST) != a) {
            size_t off = 0;
            while (off < l.n) {
                ssize_t w = write(__atomic_load_n(&fault_fd, __ATOMIC_RELAXED), l.b + off,
                                  l.n - off);
                if (w > 0)
                    off += (size_t)w;
                else if (w < 0 && errno == EINTR)
                    continue;
                else
                    break;
            }
        }
        __atomic_store_n(&fault_chained, 1, __ATOMIC_SEQ_CST);
    } else if (__atomic_load_n(&fault_chained, __ATOMIC_SEQ_CST)) {
        fault_die(sig); /* the re-raise of a fault already passed on: it ends here */
        errno = saved_errno;
        return;
    }
    fault_chain(sig, si, ctx, real);
    errno = saved_errno;
}

static int fault_is_ours(const struct sigaction *sa)
{
    return (sa->sa_flags & SA_SIGINFO) && sa->sa_sigaction == fault_report;
}

/* Install for sig, remembering what it replaces in *prev; nothing if the
 * reporter is sig's handler already (it must never chain to itself). */
static int fault_install_one(int sig, struct sigaction *prev)
{
    struct sigaction cur, sa;
    if (sigaction(sig, NULL, &cur) != 0)
        return errno;
    if (fault_is_ours(&cur))
        return GH_OK;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = fault_report;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK; /* on faulthandler's alternate stack if there is one */
    sigemptyset(&sa.sa_mask);
    *prev = cur; /* before the switch: a fault right after it finds prev set */
    if (sigaction(sig, &sa, NULL) != 0)
        return errno;
    return GH_OK;
}

/* Install the reporter for SIGSEGV and SIGBUS (idempotent).  0, or the
 * errno of sigaction. */
int gh_fault_reporter_install(void)
{
    int st = fault_install_one(SIGSEGV, &fault_prev[0]);
    return st != GH_OK ? st : fault_install_one(SIGBUS, &fault_prev[1]);
}

/* Send the reporter's lines to fd from now on.  GH_EARG unless fd is an open
 * descriptor: a line written nowhere would be lost exactly when it matters. */
int gh_fault_reporter_set_fd(int fd)
{
    if (fd < 0 || fcntl(fd, F_GETFD) == -1)
        return GH_EARG;
    __atomic_store_n(&fault_fd, fd, __ATOMIC_RELAXED);
    return GH_OK;
}

/* The descriptor the reporter writes to. */
int gh_fault_reporter_fd(void)
{
    return __atomic_load_n(&fault_fd, __ATOMIC_RELAXED);
}

/* 1 if the reporter is SIGSEGV's and SIGBUS's handler now (another
 * handler installed later, or faulthandler.disable(), may have replaced it). */
int gh_fault_reporter_installed(void)
{
    struct sigaction a, b;
    if (sigaction(SIGSEGV, NULL, &a) != 0 || sigaction(SIGBUS, NULL, &b) != 0)
        return 0;
    return fault_is_ours(&a) && fault_is_ours(&b);
}
