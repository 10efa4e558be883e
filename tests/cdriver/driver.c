/* A C-level driver of goheap's C core, for valgrind memcheck and sanitizers.
 *
 * Python is not involved: the driver sets up a gh_mheap over memory it maps
 * itself with the core's own OS layer (spans table, bitmap, arena), carves a
 * few spans per size class with gh_mspan_carve, installs them in the mcache,
 * and runs the fast path (gh_mcache_alloc / gh_mcache_free), markspan /
 * unmarkspan, lookup and mspan_check, checking every result.  Under memcheck
 * any read of uninitialised or unmapped memory by the core is a report; the
 * driver itself exits non-zero on any wrong answer.
 *
 * "driver bench N" times N alloc+free pairs of the fast path instead (used
 * for the A/B of the free-list link validation, Makefile target valgrind).
 * The size classes here are a simple 16-byte ladder, not Go's table: the C
 * core takes whatever tables its caller installs.
 */
#define _GNU_SOURCE 1
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "_sys.h"

#define ARENA (16UL << 20)
#define NCLASS 16 /* classes 1..NCLASS: sizes 16, 32, ... 256 */
#define SPAN_PAGES 2
#define NSPANS_PER_CLASS 3

static int failures;
#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        if (!(cond)) {                                                      \
            fprintf(stderr, "driver: %s:%d: ", __FILE__, __LINE__);         \
            fprintf(stderr, __VA_ARGS__);                                   \
            fputc('\n', stderr);                                            \
            failures++;                                                     \
        }                                                                   \
    } while (0)

static gh_mheap heap;
static gh_mspan spans[NCLASS + 1][NSPANS_PER_CLASS];
static gh_mspan markspan_span;
static uintptr_t next_page; /* bump allocator over the arena */

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void setup(void)
{
    size_t pg;
    uintptr_t p, spans_sz = ARENA / GH_PAGE_SIZE * 8, bitmap_sz = ARENA / 16;
    size_t total;
    int cl, i;

    CHECK(gh_sys_pagesize(&pg) == GH_OK, "pagesize");
    total = spans_sz + bitmap_sz + ARENA + GH_PAGE_SIZE;
    total = (total + pg - 1) / pg * pg;
    CHECK(gh_sys_reserve(0, total, pg, 0, &p) == GH_OK, "reserve");
    p = (p + GH_PAGE_SIZE - 1) & ~(uintptr_t)GH_PAGE_MASK;
    memset(&heap, 0, sizeof heap);
    heap.spans = p;
    heap.arena_start = p + spans_sz + bitmap_sz;
    /* Map everything but the last heap page of the arena, so an access past
     * arena_used would fault (memcheck and ASan would say so too). */
    CHECK(gh_sys_map(p, spans_sz + bitmap_sz + ARENA - GH_PAGE_SIZE, pg) == GH_OK, "map");
    heap.arena_used = heap.arena_start + ARENA - GH_PAGE_SIZE;
    next_page = heap.arena_start;

    for (cl = 1; cl <= NCLASS; cl++)
        heap.class_to_size[cl] = (uint32_t)(cl * 16);
    for (i = 0; i < 129; i++) {
        unsigned size = (unsigned)i * 8, c = (size + 15) / 16;
        heap.size_to_class8[i] = (uint8_t)(c == 0 ? 1 : c <= NCLASS ? c : 0);
    }

    for (cl = 1; cl <= NCLASS; cl++) {
        for (i = 0; i < NSPANS_PER_CLASS; i++) {
            gh_mspan *s = &spans[cl][i];
            memset(s, 0, sizeof *s);
            s->start = next_page;
            s->npages = SPAN_PAGES;
            s->state = GH_MSPAN_IN_USE;
            s->sizeclass = (uint8_t)cl;
            s->needzero = (uint8_t)(i & 1);
            next_page += SPAN_PAGES * GH_PAGE_SIZE;
            CHECK(gh_spans_set(&heap, s->start, SPAN_PAGES, s) == GH_OK, "spans_set");
            CHECK(gh_mspan_carve(&heap, s, (uintptr_t)cl * 16) == GH_OK, "carve %d", cl);
        }
    }
}

/* Make span i the one class cl allocates from, unless the core already
 * keeps it (cached, or on its nonempty list, from which alloc pulls). */
static void install(int cl, int i)
{
    uintptr_t old;
    gh_mspan *s = &spans[cl][i];
    if (s->incache || s->inlist)
        return;
    CHECK(gh_mcache_swap(&heap, (uint32_t)cl, s, &old) == GH_OK, "swap");
}

static void check_all(const char *when)
{
    int cl, i;
    uint32_t nfree, what;
    for (cl = 1; cl <= NCLASS; cl++)
        for (i = 0; i < NSPANS_PER_CLASS; i++) {
            int st = gh_mspan_check(&heap, &spans[cl][i], &nfree, &what);
            CHECK(st == GH_OK, "%s: mspan_check class %d span %d: status %d rule %u", when, cl, i,
                  st, what);
        }
}

/* Allocate every object of every span through the fast path (one span per
 * class at a time), verify, free half in random order, re-allocate, free all. */
static void exercise(void)
{
    enum { MAXLIVE = 20000 };
    static uintptr_t live[MAXLIVE];
    static uintptr_t livesize[MAXLIVE];
    size_t nlive = 0, k;
    int cl, i;
    uintptr_t v, base, size;

    for (cl = 1; cl <= NCLASS; cl++) {
        for (i = 0; i < NSPANS_PER_CLASS; i++) {
            install(cl, i);
            for (;;) {
                uintptr_t want = (uintptr_t)cl * 16 - (rnd() % 16);
                v = gh_mcache_alloc(&heap, want);
                if (v == (uintptr_t)-GH_MISS)
                    break;
                CHECK(v >= 4096, "alloc(%lu): status %ld", (unsigned long)want, -(long)v);
                if (v < 4096)
                    return;
                CHECK(*(uintptr_t *)v == 0, "object %lx not zeroed", (unsigned long)v);
                memset((void *)v, cl, (size_t)cl * 16);
                CHECK(gh_mheap_lookup(&heap, v + want - 1, &base, &size) == GH_OK && base == v &&
                          size == (uintptr_t)cl * 16,
                      "lookup %lx", (unsigned long)v);
                CHECK(nlive < MAXLIVE, "too many");
                live[nlive] = v;
                livesize[nlive++] = (uintptr_t)cl * 16;
            }
        }
    }
    check_all("full");
    /* Bad frees change nothing. */
    CHECK(gh_mcache_free(&heap, live[0] + 8) == GH_EINVALID, "interior free");
    CHECK(gh_mcache_free(&heap, heap.arena_start - 8) == GH_EINVALID, "below arena");
    CHECK(gh_mcache_free(&heap, heap.arena_used) == GH_EINVALID, "above arena");
    CHECK(gh_mcache_free(&heap, live[0] + 1) == GH_EINVALID, "misaligned");
    for (k = 0; k < nlive; k++) { /* shuffle */
        size_t j = (size_t)(rnd() % nlive);
        uintptr_t t = live[k], u = livesize[k];
        live[k] = live[j];
        livesize[k] = livesize[j];
        live[j] = t;
        livesize[j] = u;
    }
    for (k = nlive / 2; k < nlive; k++) {
        unsigned char *p = (unsigned char *)live[k];
        CHECK(p[livesize[k] - 1] == (unsigned char)(livesize[k] / 16), "contents %p", (void *)p);
        CHECK(gh_mcache_free(&heap, live[k]) >= 0, "free %lx", (unsigned long)live[k]);
        CHECK(gh_mcache_free(&heap, live[k]) == GH_EDOUBLE, "double free %lx",
              (unsigned long)live[k]);
    }
    nlive /= 2;
    check_all("half");
    for (k = 0; k < nlive; k++)
        CHECK(gh_mcache_free(&heap, live[k]) >= 0, "free %lx", (unsigned long)live[k]);
    check_all("empty");
}

/* A corrupted link is refused by the fast path and named by mspan_check. */
static void corruption(void)
{
    gh_mspan *s;
    uintptr_t a, b, c, saved, sp;
    uint32_t nfree, what;
    a = gh_mcache_alloc(&heap, 48);
    b = gh_mcache_alloc(&heap, 48);
    c = gh_mcache_alloc(&heap, 48);
    CHECK(a > 4096 && b > 4096 && c > 4096, "allocs");
    CHECK(gh_spans_get(&heap, b, &sp) == GH_OK, "spans_get");
    s = (gh_mspan *)sp;
    CHECK(heap.alloc[3] == s, "b comes from the cached span");
    CHECK(gh_mcache_free(&heap, b) >= 0, "free b");
    saved = *(uintptr_t *)b;
    *(uintptr_t *)b = a; /* link to a live object */
    CHECK(gh_mspan_check(&heap, s, &nfree, &what) == GH_ECORRUPT && what == 1, "check names it");
    CHECK(gh_mcache_alloc(&heap, 48) == (uintptr_t)-GH_ECORRUPT, "alloc refuses the link");
    *(uintptr_t *)b = b; /* link to itself */
    CHECK(gh_mcache_alloc(&heap, 48) == (uintptr_t)-GH_ECORRUPT, "alloc refuses a self link");
    *(uintptr_t *)b = saved;
    CHECK(gh_mspan_check(&heap, s, &nfree, &what) == GH_OK, "repaired");
    CHECK(gh_mcache_free(&heap, a) >= 0 && gh_mcache_free(&heap, c) >= 0, "free a c");
}

/* carving's markspan, unmarkspan and bitmap counts on a span of its own. */
static void marking(void)
{
    gh_mspan *s = &markspan_span;
    uint64_t na, nb;
    uintptr_t n = 4 * GH_PAGE_SIZE / 96;
    memset(s, 0, sizeof *s);
    s->start = next_page;
    s->npages = 4;
    next_page += 4 * GH_PAGE_SIZE;
    s->state = GH_MSPAN_IN_USE;
    CHECK(gh_mspan_carve(&heap, s, 96) == GH_OK, "carve (markspan)");
    CHECK(gh_bitmap_count(&heap, s->start, 4 * GH_PAGE_SIZE, &na, &nb) == GH_OK, "count");
    CHECK(na == 0 && nb == n + 1, "markspan bits: %lu %lu", (unsigned long)na, (unsigned long)nb);
    CHECK(gh_bitmap_unmarkspan(&heap, s->start, 4 * GH_PAGE_SIZE) == GH_OK, "unmarkspan");
    CHECK(gh_bitmap_count(&heap, s->start, 4 * GH_PAGE_SIZE, &na, &nb) == GH_OK && na + nb == 0,
          "unmarked");
    s->start = heap.arena_used; /* a span past arena_used is refused before any write */
    CHECK(gh_mspan_carve(&heap, s, 96) == GH_EARG, "past arena_used");
}

static int bench(long n)
{
    struct timespec t0, t1;
    long i;
    uintptr_t v;
    install(2, 0);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (i = 0; i < n; i++) {
        v = gh_mcache_alloc(&heap, 32);
        if (v < 4096 || gh_mcache_free(&heap, v) < 0)
            return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%.2f ns per malloc+free pair\n",
           ((double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec)) / (double)n);
    return 0;
}

int main(int argc, char **argv)
{
    int round;
    setup();
    if (argc == 3 && strcmp(argv[1], "bench") == 0)
        return bench(atol(argv[2]));
    for (round = 0; round < 3; round++)
        exercise();
    corruption();
    marking();
    check_all("end");
    if (failures) {
        fprintf(stderr, "driver: %d failures\n", failures);
        return 1;
    }
    printf("driver: ok\n");
    return 0;
}
