/* bench_peers.c: the benchmark's C side: peer allocators behind one call shape, and C loops.
 *
 * Design note. The benchmark compares goheap with the allocators a Python user could reach for.
 * For the C allocators the comparison is only fair if each is called the same way, so every peer
 * goes through the same table of function pointers: glibc's entry points are the process's own
 * malloc/free, and jemalloc, mimalloc and tcmalloc are dlopen'ed with RTLD_LOCAL from Debian's
 * shared libraries. RTLD_LOCAL matters: with LD_PRELOAD, or a global dlopen, the library would
 * replace the malloc that CPython, numpy and pyarrow use, and we would be measuring the whole
 * process instead of one allocator. dlsym on the handle finds the library's own malloc first.
 *
 * Electric Fence and DUMA need one more flag. Their malloc calls their own memalign (DUMA: its
 * _duma_allocate ...) through the PLT, and with RTLD_LOCAL alone that call binds to glibc's,
 * which comes first in the global scope: Electric Fence's free then aborts ("address not from
 * malloc()") and DUMA refuses to start ("malloc() is not bound to duma"). RTLD_DEEPBIND puts the
 * library's own definitions ahead of the global scope for its own references only, so the
 * library is whole inside itself while CPython, numpy and pyarrow keep glibc.
 *
 * The C loops take a struct bp_pair, the shape goheap's C fast path is plugged in through. A peer
 * reaches its allocator through an adapter (pair -> table -> malloc: two indirect calls); goheap
 * is wrapped by bp_forward_pair so it pays the same two calls and the loop compares allocators,
 * not calling conventions.
 */
#define _GNU_SOURCE
#include "bench_peers.h"

#include <dlfcn.h>
#include <malloc.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

typedef void *(*bp_malloc_fn)(size_t);
typedef void (*bp_free_fn)(void *);
typedef void *(*bp_calloc_fn)(size_t, size_t);

struct bp_table {
    bp_malloc_fn malloc;  /* the peer's malloc, resolved from its own handle */
    bp_free_fn free;      /* its free */
    bp_calloc_fn calloc;  /* its calloc (only glibc's is offered to Python) */
    void *release;        /* its "return memory to the OS" entry point, or NULL */
    void *handle;         /* dlopen handle; NULL for glibc, which is already in the process */
};

static struct bp_table tables[BP_NPEERS] = {
    [BP_LIBC] = {malloc, free, calloc, NULL, NULL},
};

static char last_error[512];

/* The symbol each peer offers for giving freed memory back (glibc's is called directly). */
static const char *const release_symbol[BP_NPEERS] = {
    [BP_JEMALLOC] = "mallctl",
    [BP_MIMALLOC] = "mi_collect",
    [BP_TCMALLOC] = "MallocExtension_ReleaseFreeMemory",
};

/* The peers whose internal calls must bind inside the library (see the design note). */
static const bool deep_bind[BP_NPEERS] = {
    [BP_EFENCE] = true,
    [BP_DUMA] = true,
};

/* ------------------------------------------------------------------------------------------ */
/* Loading the peers                                                                           */

static int fail(const char *what, const char *detail)
{
    snprintf(last_error, sizeof last_error, "%s: %s", what, detail ? detail : "unknown error");
    return -1;
}

int bp_open(int peer, const char *path)
{
    if (peer <= BP_LIBC || peer >= BP_NPEERS)
        return fail("bp_open", "not a loadable peer");
    if (tables[peer].handle != NULL)
        return 0;
    /* tcmalloc and jemalloc link libstdc++. Loaded first as their dependency, libstdc++ would be
     * relocated inside their local scope and bind its internal operator delete to theirs while
     * every other C++ extension's operator new stays glibc's: the first mixed free aborts
     * ("Attempt to free invalid pointer"). Loaded on its own first, it binds to itself. */
    dlopen("libstdc++.so.6", RTLD_NOW | RTLD_LOCAL);
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL | (deep_bind[peer] ? RTLD_DEEPBIND : 0));
    if (h == NULL)
        return fail(path, dlerror());
    bp_malloc_fn m = (bp_malloc_fn)dlsym(h, "malloc");
    bp_free_fn f = (bp_free_fn)dlsym(h, "free");
    if (m == NULL || f == NULL || m == malloc) {
        /* A library that does not define its own malloc would silently benchmark glibc. */
        dlclose(h);
        return fail(path, "no malloc/free of its own");
    }
    tables[peer].malloc = m;
    tables[peer].free = f;
    tables[peer].calloc = (bp_calloc_fn)dlsym(h, "calloc");
    tables[peer].release = release_symbol[peer] ? dlsym(h, release_symbol[peer]) : NULL;
    tables[peer].handle = h;
    return 0;
}

int bp_peer_int(int peer, const char *symbol, int *out)
{
    if (peer <= BP_LIBC || peer >= BP_NPEERS || tables[peer].handle == NULL)
        return fail("bp_peer_int", "not an opened peer");
    if (symbol == NULL || out == NULL)
        return fail("bp_peer_int", "NULL argument");
    const int *v = dlsym(tables[peer].handle, symbol);
    if (v == NULL)
        return fail(symbol, dlerror());
    *out = *v;
    return 0;
}

const char *bp_error(void)
{
    return last_error;
}

uintptr_t bp_malloc_address(int peer)
{
    /* 0 for a peer that is not in the table: Python compares it with a library's address. */
    if (peer < BP_LIBC || peer >= BP_NPEERS)
        return 0;
    return (uintptr_t)tables[peer].malloc;
}

/* ------------------------------------------------------------------------------------------ */
/* The Python call shape                                                                       */

uintptr_t bp_libc_malloc(size_t size) { return (uintptr_t)tables[BP_LIBC].malloc(size); }
void bp_libc_free(uintptr_t p) { tables[BP_LIBC].free((void *)p); }
uintptr_t bp_libc_calloc(size_t size) { return (uintptr_t)tables[BP_LIBC].calloc(1, size); }
uintptr_t bp_jemalloc_malloc(size_t size) { return (uintptr_t)tables[BP_JEMALLOC].malloc(size); }
void bp_jemalloc_free(uintptr_t p) { tables[BP_JEMALLOC].free((void *)p); }
uintptr_t bp_mimalloc_malloc(size_t size) { return (uintptr_t)tables[BP_MIMALLOC].malloc(size); }
void bp_mimalloc_free(uintptr_t p) { tables[BP_MIMALLOC].free((void *)p); }
uintptr_t bp_tcmalloc_malloc(size_t size) { return (uintptr_t)tables[BP_TCMALLOC].malloc(size); }
void bp_tcmalloc_free(uintptr_t p) { tables[BP_TCMALLOC].free((void *)p); }
uintptr_t bp_efence_malloc(size_t size) { return (uintptr_t)tables[BP_EFENCE].malloc(size); }
void bp_efence_free(uintptr_t p) { tables[BP_EFENCE].free((void *)p); }
uintptr_t bp_duma_malloc(size_t size) { return (uintptr_t)tables[BP_DUMA].malloc(size); }
void bp_duma_free(uintptr_t p) { tables[BP_DUMA].free((void *)p); }

int bp_release(int peer)
{
    void *r = tables[peer].release;
    switch (peer) {
    case BP_LIBC:
        malloc_trim(0);
        return 0;
    case BP_JEMALLOC: {
        /* "arena.4096.purge": 4096 is MALLCTL_ARENAS_ALL, every arena at once. */
        int (*mallctl)(const char *, void *, size_t *, void *, size_t) =
            (int (*)(const char *, void *, size_t *, void *, size_t))r;
        return mallctl != NULL && mallctl("arena.4096.purge", NULL, NULL, NULL, 0) == 0 ? 0 : -1;
    }
    case BP_MIMALLOC:
        if (r == NULL)
            return -1;
        ((void (*)(bool))r)(true);
        return 0;
    case BP_TCMALLOC:
        if (r == NULL)
            return -1;
        ((void (*)(void))r)();
        return 0;
    default:
        return -1;
    }
}

void bp_touch_addr(uintptr_t p, size_t size, size_t step)
{
    bp_touch((char *)p, size, step);
}

void bp_touch(char *p, size_t size, size_t step)
{
    for (size_t off = 0; off < size; off += step)
        p[off] = 1;
}

/* ------------------------------------------------------------------------------------------ */
/* C loops                                                                                     */

static void *table_alloc(void *ctx, size_t size)
{
    return ((struct bp_table *)ctx)->malloc(size);
}

static void table_free(void *ctx, void *p)
{
    ((struct bp_table *)ctx)->free(p);
}

void bp_peer_pair(int peer, struct bp_pair *out)
{
    out->alloc = table_alloc;
    out->free = table_free;
    out->ctx = &tables[peer];
}

static void *forward_alloc(void *ctx, size_t size)
{
    struct bp_pair *inner = ctx;
    return inner->alloc(inner->ctx, size);
}

static void forward_free(void *ctx, void *p)
{
    struct bp_pair *inner = ctx;
    inner->free(inner->ctx, p);
}

void bp_forward_pair(struct bp_pair *inner, struct bp_pair *out)
{
    out->alloc = forward_alloc;
    out->free = forward_free;
    out->ctx = inner;
}

static void *status_alloc(void *ctx, size_t size)
{
    struct bp_status_fns *f = ctx;
    uintptr_t v = f->alloc(f->ctx, size);
    if (v < f->status_limit) {
        f->last_bad_alloc = v;
        return NULL;
    }
    return (void *)v;
}

static void status_free(void *ctx, void *p)
{
    struct bp_status_fns *f = ctx;
    int st = f->free(f->ctx, (uintptr_t)p);
    if (st != 0 && f->first_bad_free == 0)
        f->first_bad_free = st;
}

void bp_status_pair(struct bp_status_fns *in, struct bp_pair *out)
{
    out->alloc = status_alloc;
    out->free = status_free;
    out->ctx = in;
}

/* The thread's CPU time, as run.py's Python loops use: a loop that loses the CPU to another
 * process on a shared machine is not charged for it. */
static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t bp_c_pairs(const struct bp_pair *a, size_t size, size_t count)
{
    int64_t t0 = now_ns();
    for (size_t i = 0; i < count; i++) {
        void *p = a->alloc(a->ctx, size);
        if (p == NULL)
            return -1;
        a->free(a->ctx, p);
    }
    return now_ns() - t0;
}

int64_t bp_c_batch(const struct bp_pair *a, const uint32_t *sizes, const uint32_t *order,
                   void **slots, size_t n, size_t passes)
{
    int64_t t0 = now_ns();
    for (size_t pass = 0; pass < passes; pass++) {
        for (size_t i = 0; i < n; i++) {
            slots[i] = a->alloc(a->ctx, sizes[i]);
            if (slots[i] == NULL) {
                for (size_t j = 0; j < i; j++)
                    a->free(a->ctx, slots[j]);
                return -1;
            }
        }
        for (size_t i = 0; i < n; i++)
            a->free(a->ctx, slots[order[i]]);
    }
    return now_ns() - t0;
}
