/* goheap C core: declarations and constants.
 *
 * See goheap/malloc.py for the overview.  This header is the contract between
 * the hand-written C core (_sys.c) and Python; goheap/_sys.cdef lists the subset
 * Python may call.  Constants defined here are the single source of truth and
 * are read by Python through cffi's "..." mechanism.
 *
 * Status convention (every exported function):
 *   0             success; results come back through out-parameters
 *   > 0           an errno from the OS call named by the function
 *   GH_EARG  (<0) an argument was rejected before any syscall (Python: ValueError)
 *   other GH_E*   a heap-level verdict (see each function)
 */
#ifndef GOHEAP_SYS_H
#define GOHEAP_SYS_H

#include <stddef.h>
#include <stdint.h>

/* ---- heap geometry ---------------------------------------------------- */
#define GH_PAGE_SHIFT      13                      /* heap page: 8 KiB, whatever the OS page */
#define GH_PAGE_SIZE       (1UL << GH_PAGE_SHIFT)
#define GH_PAGE_MASK       (GH_PAGE_SIZE - 1)
#define GH_MAX_SMALL_SIZE  32768
#define GH_NUM_SIZE_CLASSES 67
#define GH_PTR_SIZE        8
#define GH_WORDS_PER_BITMAP_WORD 16                /* 4 bits per heap word in 64-bit words */

/* GC bitmap bit kinds, grouped by kind in each bitmap word (Go 1.2 layout). */
#define GH_BIT_ALLOCATED     1UL
#define GH_BIT_BOUNDARY      (1UL << 16)
#define GH_BIT_MARKED        (1UL << 32)
#define GH_BIT_SPECIAL       (1UL << 48)

/* ---- status codes ----------------------------------------------------- */
#define GH_OK          0
#define GH_EARG       (-1)   /* bad argument: misaligned, zero length, out of range */
#define GH_EEXIST     (-2)   /* an exact reservation could not be placed where asked */
#define GH_MISS       (-3)   /* fast path: cache has nothing, Python must refill */
#define GH_EINVALID   (-4)   /* free: not the start of a live object */
#define GH_EDOUBLE    (-5)   /* free: the object is already free */
#define GH_ECORRUPT   (-6)   /* a free-list link points outside its span */
#define GH_EBUSY      (-7)   /* the heap is frozen for check(): retry under the heap lock */

/* ---- span states (MSpan.state) ------------------------------------------ */
#define GH_MSPAN_IN_USE    0
#define GH_MSPAN_FREE      1
#define GH_MSPAN_LIST_HEAD 2
#define GH_MSPAN_DEAD      3
#define GH_MSPAN_FAULTED   4   /* goheap: efence span whose object was freed and faulted */
#define GH_MSPAN_CACHED    5   /* goheap: freed large span kept by the large cache */

/* ---- the large-span cache ----------------------------------------------
 * Freed large spans of GH_LCACHE_MIN_PAGES..GH_LCACHE_MAX_PAGES pages (the
 * sizes NumPy buffers come in) are kept, binned by page count, so a large
 * malloc/free round trip stays in C (jemalloc's large tcache bins).  A freed
 * span coalesces with cached neighbours, and a request no bin fits is cut
 * from a larger cached span, so distinct sizes keep reusing the same (cache
 * warm) memory, as glibc's top chunk does; spans coalesced past
 * GH_LCACHE_MAX_PAGES wait in one more list, GH_LCACHE_OVERSIZE.
 * To MHeap a cached span is still allocated (heap_inuse); stats report it
 * idle.  Python sets the cap, lends the spare span structs a cut needs
 * (a coalescing gives one back) and flushes the cache back to MHeap before
 * growing and when scavenging; at check() time it lists it. */
#define GH_LCACHE_MIN_PAGES 5    /* ceil((32 KiB + 1) / 8 KiB): the smallest large object */
#define GH_LCACHE_MAX_PAGES 512  /* 4 MiB */
#define GH_LCACHE_BINS (GH_LCACHE_MAX_PAGES - GH_LCACHE_MIN_PAGES + 1)
#define GH_LCACHE_OVERSIZE GH_LCACHE_BINS  /* the list of spans > MAX_PAGES */
#define GH_LCACHE_LISTS (GH_LCACHE_BINS + 1)
#define GH_LCACHE_MASK_WORDS ((GH_LCACHE_LISTS + 63) / 64)

/* ---- efence layouts (gh_mheap.efq_guard) and ready spans ------------------ */
#define GH_EFENCE_GUARD_NONE   0
#define GH_EFENCE_GUARD_AFTER  1  /* object right-aligned against a faulted unit */
#define GH_EFENCE_GUARD_BEFORE 2  /* a faulted unit, then the object */
#define GH_EFR_LISTS 8            /* ready spans for objects of 1..8 efence units */
#define GH_EFQ_DROP_BATCH 16      /* faulted spans whose pages C drops in one go */
/* gh_mspan.marked: how a faulted span's pages were made to fault, so that
 * opening them again takes the matching call (or both, when unknown). */
#define GH_FAULT_PROT 0           /* mprotect(PROT_NONE)                       */
#define GH_FAULT_MARKS 1          /* guard markers: pages gone, read zero after */
#define GH_FAULT_EITHER 2         /* faulted by Python's sys_fault: one of them */
#define GH_EFQ_DROP_BYTES (1UL << 20) /* ... or fewer, once they span this many bytes */
#define GH_EFR_MAX_CARVE 4096    /* spare structs one gh_efence_ready_carve may take */
#define GH_CARVE_GUARDS_DONE 1   /* gh_efence_ready_carve: the caller faulted the guards */

/* ---- free-span event bits returned by gh_mcache_free -------------------- */
#define GH_FREED_LARGE        4  /* a large/efence object: Python frees its span */

#endif

#ifndef GOHEAP_SYS_STRUCTS
#define GOHEAP_SYS_STRUCTS

/* One span: a run of heap pages (Go's MSpan, the part C needs).
 * Python's goheap.mspan.MSpan wraps one of these and keeps the page heap's
 * own bookkeeping (released pages, idle time, list membership) beside it.
 * Invariants (checked by gh_mspan_check and MHeap.check):
 *   start is heap-page aligned; [start, start + npages*PAGE_SIZE) is the span;
 *   small span (sizeclass > 0): objects of elemsize at start + i*elemsize,
 *     i < nelems, limit = start + nelems*elemsize, ref + len(freelist) == nelems;
 *   large span (sizeclass == 0): one object [base, base + elemsize), limit = base + elemsize. */
typedef struct gh_mspan {
    uintptr_t start;      /* address of the first byte                        */
    uintptr_t npages;     /* length in heap pages                             */
    uintptr_t freelist;   /* first free object (MLink chain through word 0)   */
    uintptr_t limit;      /* end of the usable data                           */
    uintptr_t elemsize;   /* object size in bytes                             */
    uintptr_t base;       /* large/efence: where the one object starts        */
    uint32_t  ref;        /* objects handed out                               */
    uint32_t  nelems;     /* objects the span holds                           */
    uint8_t   state;      /* GH_MSPAN_*                                       */
    uint8_t   sizeclass;  /* 0 = one large (or efence) object                 */
    uint8_t   incache;    /* owned by the mcache: C allocates from it         */
    uint8_t   needzero;   /* memory may be dirty: carve writes zero markers   */
    uint8_t   inlist;     /* on its class's nonempty list (h->nonempty[cl])  */
    uint8_t   efence;     /* large span holding an efence object (live or faulted) */
    uint8_t   undropped; /* faulted, pages not dropped yet (gh_mheap.efq_undropped) */
    uint8_t   marked;    /* faulted with: GH_FAULT_PROT, _MARKS or _EITHER (below) */
    struct gh_mspan *next;  /* nonempty list links, valid while inlist        */
    struct gh_mspan *prev;
} gh_mspan;

/* The part of MHeap, MCache and MStats that the C fast path reads or writes.
 * Python owns everything else.  One per Heap; lives in Python-allocated memory. */
typedef struct gh_mheap {
    uintptr_t arena_start;                 /* first arena byte; 0 once closed  */
    uintptr_t arena_used;                  /* end of the mapped arena          */
    uintptr_t spans;                       /* spans table: gh_mspan* per page  */
    gh_mspan *alloc[GH_NUM_SIZE_CLASSES];  /* mcache: the span each class pops */
    gh_mspan *nonempty[GH_NUM_SIZE_CLASSES]; /* mcentral: uncached spans with a free object */
    uint32_t  class_to_size[GH_NUM_SIZE_CLASSES];
    uint8_t   size_to_class8[129];         /* index (size+7)>>3, size <= 1024  */
    uint8_t   size_to_class128[249];       /* index (size-1024+127)>>7         */
    uint8_t   pad[6];
    uint64_t  nmalloc[GH_NUM_SIZE_CLASSES];/* small objects handed out         */
    uint64_t  nfree[GH_NUM_SIZE_CLASSES];  /* small objects freed              */
    int32_t   lock;                        /* spinlock: each C call is atomic  */
    int32_t   frozen;                      /* check() runs: fast paths defer   */
    int32_t   efence;                      /* efence mode: realloc always moves */
    /* Large objects (> 32 KiB, efence ones too): counts and bytes, kept here
     * so that a cache hit counts without Python.  Python's paths add through
     * gh_large_account. */
    uint64_t  nlargealloc, nlargefree, largealloc, largefree;
    /* The large cache.  Invariants (gh_lcache_list, Heap.check): every span
     * on lcache[npages - MIN] is CACHED, sizeclass 0, ref 0, its object's
     * start carries a boundary bit and no allocated bit (so a second free is
     * a double free), every page maps to it; bit b of lcache_mask is set iff
     * lcache[b] is not empty; lcache_bytes and lcache_nspans add them up and
     * lcache_bytes <= lcache_limit (0: no cache, as in efence mode).
     * lcache[GH_LCACHE_OVERSIZE] holds the spans of more pages.  Lists are
     * doubly linked (next/prev), so coalescing unlinks a neighbour in O(1);
     * no two cached spans touch (a free coalesces with both neighbours).
     * Spares: lcache_nspare DEAD structs Python lent, linked through next. */
    gh_mspan *lcache[GH_LCACHE_LISTS];
    uint64_t  lcache_mask[GH_LCACHE_MASK_WORDS];
    uint64_t  lcache_bytes;
    uint64_t  lcache_nspans;
    uint64_t  lcache_limit;
    gh_mspan *lcache_spare;                /* DEAD structs for cutting spans  */
    uint64_t  lcache_nspare;
    uint64_t  next_tick_ns;  /* Python's next scavenger tick (monotonic ns): the
                              * large paths defer to Python once it has passed */
    /* heap_alloc kept as one figure beside the class counts it equals, so
     * that its high-water mark costs the fast path an add and a compare:
     * a peak derived from the counts would be known only at stats() time. */
    uint64_t  live_bytes;
    uint64_t  peak_bytes;    /* max of live_bytes since creation or reset */
    /* Sampled efence (Heap(efence_sample=N)): every allocation that reaches
     * C counts sample_left down; the one that takes it to zero misses, adds
     * one to sample_pending (Python's slow path takes it and makes an efence
     * object) and re-arms it with a random interval of mean N.  sample_left
     * == 0: sampling off, and the fast path pays one load and a branch. */
    uint32_t  sample_rate;   /* N (1 <= N < 2^31), 0 = off                 */
    uint32_t  sample_left;   /* allocations until the next sample, 0 = off */
    uint64_t  sample_pending;/* samples drawn in C, not yet taken by Python */
    uint64_t  sample_rng;    /* xorshift64 state, never 0 while sampling   */
    /* The efence quarantine (efence.py's books, kept here so that a sampled
     * malloc+free stays in C).  Every FAULTED span is on one list, oldest
     * first, linked through next/prev (a FAULTED span is on no other list);
     * efq_bytes and efq_nspans add it up.  Python sets the bounds (efq_max_*,
     * UINT64_MAX: none), the efence unit and the OS page (efq_unit,
     * efq_pagesize), and efq_on: C may make the efence system calls itself.
     * efq_hook points at the OS layer's "calls are being injected or traced"
     * flag (mem.SysMemory): while it is set every efence call goes to Python,
     * so each system call is seen there.  efq_reuse: C hands the oldest span
     * of the page count asked for to the next sampled object once the
     * quarantine is full.  Counts: efence_sampled_c (sampled objects C made),
     * efence_reused (spans reused, by C or Python). */
    gh_mspan *efq_head, *efq_tail;
    uint64_t  efq_bytes, efq_nspans;
    uint64_t  efq_max_bytes, efq_max_spans;
    uint64_t  efq_unit, efq_pagesize;
    const int32_t *efq_hook;
    int32_t   efq_on, efq_reuse;
    uint64_t  efence_sampled_c, efence_reused;
    /* Ready efence spans (GWP-ASan's free slots): fresh spans Python made in
     * a batch, guard already faulted, for objects of k data units on
     * efr[k - 1], linked through next; C hands them out with no system call
     * and no Python.  A ready span is IN_USE, marked efence, ref 0, with no
     * bitmap bits.  efq_guard: the layout (GH_EFENCE_GUARD_*); efq_align:
     * the usable size's rounding (0: malloc's, 8 or 16, for sampled objects). */
    gh_mspan *efr[GH_EFR_LISTS];
    uint64_t  efr_nspans, efr_bytes;
    uint32_t  efq_align;
    int32_t   efq_guard;
    /* Freed efence spans C faulted but whose pages it has not dropped yet:
     * PROT_NONE at once (a use after free faults), their pages given back
     * (MADV_DONTNEED) GH_EFQ_DROP_BATCH at a time, one call per run of
     * adjacent spans, which a stream of frees mostly is.  Each is on the
     * quarantine list with undropped set and needzero set; no other span
     * has undropped set; efq_undropped_bytes adds them up and stays below
     * GH_EFQ_DROP_BYTES.  Leaving the quarantine takes a span off. */
    gh_mspan *efq_undropped[GH_EFQ_DROP_BATCH];
    uint32_t  efq_nundropped;
    uint32_t  efq_pad;
    uint64_t  efq_undropped_bytes;
} gh_mheap;


/* ---- OS layer (section 1 of _sys.c) -------------------------------------
 * pagesize is the OS page the caller works with: the real one, or a larger
 * power of two for simulation.  v and n must be whole pages of it, n > 0,
 * else GH_EARG before any syscall.  Errors: an errno (ENOMEM, EINVAL, ...). */
int gh_sys_pagesize(size_t *out);                                  /* real OS page */
int gh_sys_alloc(size_t n, size_t pagesize, uintptr_t *out);       /* None -> Ready */
int gh_sys_reserve(uintptr_t hint, size_t n, size_t pagesize, int exact,
                   uintptr_t *out);                                /* None -> Reserved; GH_EEXIST */
int gh_sys_map(uintptr_t v, size_t n, size_t pagesize);           /* Reserved -> Ready */
int gh_sys_unused(uintptr_t v, size_t n, size_t pagesize);        /* Ready -> Prepared */
int gh_sys_used(uintptr_t v, size_t n, size_t pagesize);          /* Prepared -> Ready */
int gh_sys_fault(uintptr_t v, size_t n, size_t pagesize);         /* Ready -> Reserved */
int gh_sys_free(uintptr_t v, size_t n, size_t pagesize);          /* any -> None */
/* Whether efence faults with guard markers (MADV_GUARD_INSTALL) rather than
 * mprotect: set -1 asks, 0 or 1 sets (1: ENOTSUP unless the kernel has them);
 * *on the setting, *kernel the probe's answer (either may be NULL). */
int gh_sys_guards(int set, int *on, int *kernel);

/* ---- GC bitmap and spans table -------------------------------------------
 * Addresses must lie in [arena_start, arena_used) of h, else GH_EARG. */
int gh_bitmap_unmarkspan(gh_mheap *h, uintptr_t v, uintptr_t n);  /* v, n: 128-byte groups */
int gh_bitmap_get(gh_mheap *h, uintptr_t v, uint64_t *out);
int gh_bitmap_count(gh_mheap *h, uintptr_t v, uintptr_t n, uint64_t *nalloc, uint64_t *nboundary);
int gh_bitmap_set(gh_mheap *h, uintptr_t v, uint64_t set, uint64_t clear);
int gh_spans_set(gh_mheap *h, uintptr_t v, uintptr_t npages, gh_mspan *s);
int gh_spans_get(gh_mheap *h, uintptr_t v, uintptr_t *out);
int gh_spans_mismatch(gh_mheap *h, uintptr_t v, uintptr_t npages, gh_mspan *s, uintptr_t *out);
int gh_mheap_lookup(gh_mheap *h, uintptr_t v, uintptr_t *base, uintptr_t *size); /* GH_EINVALID */

/* ---- spans and the mcache fast path --------------------------------------- */
int gh_mspan_carve(gh_mheap *h, gh_mspan *s, uintptr_t size);
int gh_mspan_check(gh_mheap *h, gh_mspan *s, uint32_t *nfree, uint32_t *what); /* GH_ECORRUPT */
uintptr_t gh_mcache_alloc(gh_mheap *h, uintptr_t size);        /* address, or -GH_* (< 4096) */
uintptr_t gh_mcache_alloc_nozero(gh_mheap *h, uintptr_t size);
uintptr_t gh_mcache_alloc_unsampled(gh_mheap *h, uintptr_t size, int zero); /* the slow path's */
int gh_mcache_free(gh_mheap *h, uintptr_t v);                  /* 0, GH_E* < 0, GH_FREED_* > 0 */
int gh_mcache_swap(gh_mheap *h, uint32_t cl, gh_mspan *s, uintptr_t *old);
int gh_mcentral_take_empty(gh_mheap *h, uint32_t cl, uintptr_t *out, uintptr_t max, uintptr_t *n);
int gh_mcentral_list(gh_mheap *h, uint32_t cl, uintptr_t *out, uintptr_t max, uintptr_t *n);
int gh_mcache_counts(gh_mheap *h, uint64_t *nmalloc, uint64_t *nfree);
int gh_large_free(gh_mheap *h, uintptr_t v);                  /* 0, GH_EDOUBLE, GH_EINVALID */
int gh_mheap_freeze(gh_mheap *h, int frozen);
int gh_mheap_close(gh_mheap *h);                                 /* every later call: closed */
int gh_memclr(uintptr_t v, uintptr_t n);
int gh_large_account(gh_mheap *h, uint64_t nalloc, uint64_t alloc_bytes, uint64_t nfree,
                     uint64_t free_bytes);
int gh_lcache_list(gh_mheap *h, uintptr_t *out, uintptr_t max, uintptr_t *n);
int gh_lcache_flush(gh_mheap *h, uintptr_t *out, uintptr_t max, uintptr_t *n);
int gh_lcache_spare_put(gh_mheap *h, gh_mspan *s);              /* s DEAD, else GH_EARG */
int gh_lcache_spare_take(gh_mheap *h, uintptr_t *out, uintptr_t max, uintptr_t *n);
int gh_object_size(gh_mheap *h, uintptr_t v, uintptr_t *size, uint32_t *sizeclass);
int gh_realloc_in_place(gh_mheap *h, uintptr_t v, uintptr_t n); /* 0, GH_MISS, free's verdict */
int gh_mheap_peak(gh_mheap *h, int reset, uint64_t *live, uint64_t *peak);

/* ---- sampled efence ---------------------------------------------------------
 * gh_efence_sample_init: rate N (0 = off, else 1 <= N < 2^31; GH_EARG) and a
 * seed for the interval generator (0 is replaced).  The first interval is
 * drawn at once.  gh_efence_sample_take: with tick != 0 count one allocation
 * that never reached the fast path first; then *out = 1 and one pending
 * sample is used up if there is one, else *out = 0. */
int gh_efence_sample_init(gh_mheap *h, uint32_t rate, uint64_t seed);
int gh_efence_sample_take(gh_mheap *h, int tick, int *out);

/* ---- the efence quarantine (invariants at gh_mheap.efq_head) ---------------
 * gh_efence_q_push: s, FAULTED and marked efence, joins the list as the
 * newest.  gh_efence_q_oldest: *out = the oldest span of npages pages (0:
 * of any), or 0; nothing changes.  gh_efence_q_unlink: s leaves the list
 * (GH_EARG unless it is on it).  gh_efence_q_list: the list, oldest first,
 * into out[max]; GH_ECORRUPT if links, states or totals disagree. */
int gh_efence_q_push(gh_mheap *h, gh_mspan *s);
int gh_efence_q_oldest(gh_mheap *h, uintptr_t npages, uintptr_t *out);
int gh_efence_q_unlink(gh_mheap *h, gh_mspan *s);
int gh_efence_q_list(gh_mheap *h, uintptr_t *out, uintptr_t max, uintptr_t *n);
/* gh_efence_q_drop: give back now the pages of every faulted span C has
 * not dropped yet (scavenge; *n: how many spans). */
int gh_efence_q_drop(gh_mheap *h, uintptr_t *n);
/* Ready spans: gh_efence_ready_put adds s (IN_USE, efence, ref 0, data of
 * 1..GH_EFR_LISTS units, else GH_EARG); gh_efence_ready_take: *out = one
 * span of units data units (0: any), unlisted, or 0; gh_efence_ready_list:
 * every ready span into out[max], GH_ECORRUPT if lists and totals disagree. */
int gh_efence_ready_put(gh_mheap *h, gh_mspan *s);
int gh_efence_ready_take(gh_mheap *h, uintptr_t units, uintptr_t *out);
int gh_efence_ready_list(gh_mheap *h, uintptr_t *out, uintptr_t max, uintptr_t *n);
/* gh_efence_ready_carve: npieces ready spans cut off the top of fresh
 * IN_USE span s (s the last if they fill it), guards faulted unless the
 * caller did (GH_CARVE_GUARDS_DONE); *made listed; an errno if a guard was
 * refused (s: the rest, uncarved). */
int gh_efence_ready_carve(gh_mheap *h, gh_mspan *s, uintptr_t units, uintptr_t npieces,
                          gh_mspan *const *spares, uintptr_t nspare, int flags, uintptr_t *made);

/* ---- fault reporter (efence diagnosis) ------------------------------------
 * gh_fault_register: h joins the fixed registry the reporter searches
 * (GH_FAULT_MAX_HEAPS; GH_EBUSY when full, GH_OK if already there);
 * gh_mheap_close takes it out before Python may unmap anything.
 * gh_fault_reporter_install: SIGSEGV/SIGBUS handler writing one line for a
 * fault in a registered heap, then chaining to the handler it replaced;
 * idempotent; 0 or the errno of sigaction. */
#define GH_FAULT_MAX_HEAPS 256
int gh_fault_register(gh_mheap *h);
int gh_fault_reporter_install(void);
int gh_fault_reporter_installed(void);  /* 1 while it is SIGSEGV's and SIGBUS's handler */
int gh_fault_reporter_set_fd(int fd);  /* where the line goes (default 2); GH_EARG if not open */
int gh_fault_reporter_fd(void);

#endif

