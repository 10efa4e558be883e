/* bench_peers.h: what benchmarks/peers.py may call in the benchmark's own C module.
 *
 * peers.py feeds this file to cffi's cdef after dropping the preprocessor lines, so everything
 * between the include guard is plain declarations cffi can parse. Addresses cross into Python
 * as uintptr_t so every peer hands out the same kind of value goheap does (an int), and so no
 * peer pays for a cdata pointer object that the reference does not pay for.
 */
#ifndef BENCH_PEERS_H
#define BENCH_PEERS_H

#include <stddef.h>
#include <stdint.h>

/* The C allocators the benchmark compares; BP_LIBC is the process's own glibc. Electric Fence
 * and DUMA are the page-guarding debug allocators workload (f) sets beside goheap's efence. */
enum bp_peer {
    BP_LIBC = 0,
    BP_JEMALLOC = 1,
    BP_MIMALLOC = 2,
    BP_TCMALLOC = 3,
    BP_EFENCE = 4,
    BP_DUMA = 5,
    BP_NPEERS = 6
};

/* An allocator as the C loop sees it: two calls and the context they share. */
struct bp_pair {
    void *(*alloc)(void *ctx, size_t size);
    void (*free)(void *ctx, void *p);
    void *ctx;
};

/* dlopen(path, RTLD_NOW | RTLD_LOCAL, plus RTLD_DEEPBIND for Electric Fence and DUMA) and
 * resolve malloc/free (and the peer's "give memory back" call, when it has one) into the peer's
 * table. 0 on success, -1 with bp_error() set. */
int bp_open(int peer, const char *path);
/* Read the int variable `symbol` that an opened peer exports (Electric Fence's EF_ALIGNMENT,
 * EF_PROTECT_FREE ...: after its first malloc they hold the values in force). 0 on success, -1
 * with bp_error() set when the peer is not open or has no such symbol. */
int bp_peer_int(int peer, const char *symbol, int *out);
const char *bp_error(void);
/* The address of the malloc the table holds, so Python can check it is the library's own. */
uintptr_t bp_malloc_address(int peer);

/* The Python call shape: one argument in, an integer address out; the same for every peer. */
uintptr_t bp_libc_malloc(size_t size);
void bp_libc_free(uintptr_t p);
/* glibc calloc(1, size), through the same table: the fair reference for zeroed allocations. */
uintptr_t bp_libc_calloc(size_t size);
uintptr_t bp_jemalloc_malloc(size_t size);
void bp_jemalloc_free(uintptr_t p);
uintptr_t bp_mimalloc_malloc(size_t size);
void bp_mimalloc_free(uintptr_t p);
uintptr_t bp_tcmalloc_malloc(size_t size);
void bp_tcmalloc_free(uintptr_t p);
uintptr_t bp_efence_malloc(size_t size);
void bp_efence_free(uintptr_t p);
uintptr_t bp_duma_malloc(size_t size);
void bp_duma_free(uintptr_t p);

/* Ask the peer to return freed memory to the OS (malloc_trim, arena purge, mi_collect,
 * ReleaseFreeMemory). 0 when it did, -1 when the peer has no such call. */
int bp_release(int peer);

/* Write one byte at the start of every `step` bytes of [p, p + size): each OS page is faulted
 * in, as a program that uses the memory would. */
void bp_touch_addr(uintptr_t p, size_t size, size_t step);
void bp_touch(char *p, size_t size, size_t step);

/* Fill *out with the C-loop pair of a peer opened above. */
void bp_peer_pair(int peer, struct bp_pair *out);
/* Fill *out with a pair that forwards to *inner: an outside allocator (goheap) then pays the
 * same two indirect calls per operation as a peer does through its table. */
void bp_forward_pair(struct bp_pair *inner, struct bp_pair *out);

/* An allocator whose C entry points report failure in band, as goheap's fast path does:
 * alloc returns an address, or a status below status_limit (a miss Python must serve, an
 * error); free returns 0, or anything else (an error, or an event Python must handle), which
 * is kept in first_bad_free and stops nothing: the caller checks it after the loop. */
struct bp_status_fns {
    uintptr_t (*alloc)(void *ctx, uintptr_t size);
    int (*free)(void *ctx, uintptr_t p);
    void *ctx;
    uintptr_t status_limit;
    uintptr_t last_bad_alloc;
    int first_bad_free;
};
/* Fill *out with a pair calling *in (two indirect calls per operation, like every peer). */
void bp_status_pair(struct bp_status_fns *in, struct bp_pair *out);

/* The C loops, timed with clock_gettime(CLOCK_THREAD_CPUTIME_ID); both return nanoseconds, or
 * -1 if an allocation returned NULL (everything allocated so far is freed first). */
int64_t bp_c_pairs(const struct bp_pair *a, size_t size, size_t count);
int64_t bp_c_batch(const struct bp_pair *a, const uint32_t *sizes, const uint32_t *order,
                   void **slots, size_t n, size_t passes);

#endif
