/* goheap's NumPy data-memory handler (NEP 49): array data on a goheap heap.
 *
 * See goheap/malloc.py for the overview and goheap/numpy_handler.py for the
 * Python half (the context manager, the capsule cache, NumPy's import).
 *
 * Vocabulary: the *handler* is NumPy's PyDataMem_Handler struct, carried in
 * a PyCapsule named "mem_handler"; NumPy keeps the current one in a context
 * variable, and every array that owns its data keeps a reference to the
 * capsule it was made with and frees (or reallocs) through it, whatever the
 * context says later.  The *ctx* is ours: one per heap, holding what the
 * handler's four functions need.
 *
 * Why C: NumPy calls malloc/calloc/realloc/free without promising the GIL
 * (np.fromstring(..., sep=" ") reallocs inside NPY_BEGIN_ALLOW_THREADS), so
 * the fast path must run without it, as the C core does (its own lock).  A
 * miss -- the cached span is empty, a large object, a status Python must
 * judge -- takes the GIL with PyGILState_Ensure and calls the very slow paths
 * the builtin Heap.malloc/free/realloc call (goheap/_pyfast.c), so whatever
 * Python decides there (refill, growth, efence) holds for arrays too.
 *
 * No NumPy headers at build time: the two structs are mirrored below, with
 * their layout asserted, and PyDataMem_SetHandler/GetHandler come from
 * NumPy's C-API table (the capsule numpy_handler.py reads from
 * _multiarray_umath._ARRAY_API), slots 304/305, once its ABI and feature
 * versions say they are there (NumPy >= 1.22).
 *
 * Invariants:
 * - ctx->h stays valid while the capsule lives (ctx holds the cffi struct
 *   behind it), and so does the arena (ctx holds the heap's ArenaOwner): an
 *   array may outlive its `with` block, its Heap object and heap.close().
 * - Nothing here leaves a Python exception set: a failure is NULL to NumPy,
 *   a MemoryError is left for NumPy to raise, anything else is written as
 *   unraisable (as an exception in __del__ is); an exception NumPy had set
 *   before calling us is put back.
 * - A closed heap (arena_start == 0) is never touched: C refuses it before
 *   reading the arena, and free then does nothing (the memory goes with the
 *   arena owner, when the last array does).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "_sys.h"

#define GHPY_EXPORT __attribute__((visibility("default")))

/* Addresses below this are statuses from the alloc fast path (_native.py's
 * STATUS_LIMIT; _pyfast.c tests the same). */
#define NP_STATUS_LIMIT 4096

/* NumPy assumes malloc's alignment (16 bytes on x86-64 and arm64) for
 * complex128 and long double; goheap's classes below 16 bytes are only
 * 8-aligned, every class from 16 up is a multiple of 16, and large objects
 * start on a heap page.  So nothing smaller than this is asked for -- but
 * on an efence heap, whose own `align` places objects (align=1 puts every
 * byte past the end on the guard page), the size stays as NumPy asked. */
#define NP_MIN_SIZE 16

/* ------------------------------------------------------------------------
 * NEP 49's structs (numpy/ndarraytypes.h), mirrored: fields in this order,
 * fields only ever added after free.  The layout is the same from 1.22 on.
 * ------------------------------------------------------------------------ */

typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size); /* size: a hint only */
} ghnp_allocator;

typedef struct {
    char name[127];          /* NUL-terminated UTF-8, get_handler_name's answer */
    uint8_t version;         /* 1: the only one there is                    */
    ghnp_allocator allocator;
} ghnp_handler;

_Static_assert(offsetof(ghnp_handler, version) == 127, "NEP 49 layout: version");
_Static_assert(offsetof(ghnp_handler, allocator) == 128, "NEP 49 layout: allocator");
_Static_assert(offsetof(ghnp_allocator, free) == 4 * sizeof(void *), "NEP 49 layout: free");
_Static_assert(sizeof(ghnp_handler) == 128 + 5 * sizeof(void *), "NEP 49 layout: size");

#define NP_CAPSULE_NAME "mem_handler" /* the capsule keeps the pointer: a literal */

/* One per heap; the capsule's pointer is &handler, which is the struct's
 * start, and handler.allocator.ctx points back at it. */
typedef struct {
    ghnp_handler handler;
    gh_mheap *h;            /* the heap's C half                               */
    PyObject *mheap_ref;    /* the cffi object that owns *h                    */
    PyObject *owner;        /* the heap's ArenaOwner: keeps the arena mapped   */
    PyObject *slow_malloc;  /* WeakMethod of Heap._malloc_slow(size, zero, status) */
    PyObject *slow_free;    /* WeakMethod of Heap._free_slow(v, status)        */
    PyObject *slow_realloc; /* WeakMethod of Heap.realloc(v, size)             */
} ghnp_ctx;

/* ------------------------------------------------------------------------
 * Calling Python from a handler function (the slow paths).  Every function
 * here runs with the GIL held (slow_enter took it).
 * ------------------------------------------------------------------------ */

typedef struct {
    PyGILState_STATE gil;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc;
#else
    PyObject *type, *value, *tb;
#endif
} slow_state;

/* Take the GIL and set aside any exception NumPy has set (an array freed
 * while one propagates): Python code must not run with one pending. */
static void slow_enter(slow_state *st)
{
    st->gil = PyGILState_Ensure();
#if PY_VERSION_HEX >= 0x030C0000
    st->exc = PyErr_GetRaisedException();
#else
    PyErr_Fetch(&st->type, &st->value, &st->tb);
#endif
}

static void slow_leave(slow_state *st)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(st->exc);
#else
    PyErr_Restore(st->type, st->value, st->tb);
#endif
    PyGILState_Release(st->gil);
}

/* The exception a slow path raised, dealt with: a MemoryError is dropped
 * (NumPy raises its own for the NULL it gets), anything else -- HeapClosed,
 * DoubleFree, InvalidFree, HeapCorruption -- is written as unraisable, so
 * the user learns why without NumPy dying of it.  The message names the
 * call: what(n) for an allocation (v == 0), what(v) for a free (n == 0),
 * what(v, n) for a realloc. */
static void slow_report(const char *what, uintptr_t v, size_t n)
{
    PyObject *where;
    if (PyErr_ExceptionMatches(PyExc_MemoryError)) {
        PyErr_Clear();
        return;
    }
    if (v == 0) /* malloc(n) */
        where = PyUnicode_FromFormat("goheap's NumPy handler: %s(%zu)", what, n);
    else if (n == 0) /* free(v) */
        where = PyUnicode_FromFormat("goheap's NumPy handler: %s(%p)", what, (void *)v);
    else /* realloc(v, n) */
        where = PyUnicode_FromFormat("goheap's NumPy handler: %s(%p, %zu)", what, (void *)v, n);
    PyErr_WriteUnraisable(where); /* NULL (no memory) still prints the error */
    Py_XDECREF(where);
}

/* Call the method behind the WeakMethod weak with args[0..n): its result,
 * or NULL with an exception set, or NULL without one when the Heap is gone
 * (then it was closed; its arena owner may still be alive in us). */
static PyObject *slow_call(PyObject *weak, PyObject *const *args, Py_ssize_t n)
{
    PyObject *m, *r;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (args[i] == NULL)
            return NULL; /* an argument could not be made: its error is set */
    }
    m = PyObject_CallNoArgs(weak);
    if (m == NULL)
        return NULL;
    if (m == Py_None) {
        Py_DECREF(m);
        return NULL;
    }
    r = PyObject_Vectorcall(m, args, (size_t)n, NULL);
    Py_DECREF(m);
    return r;
}

/* The address a slow path returned, or 0 with its error dealt with. */
static uintptr_t slow_address(PyObject *r, const char *what, uintptr_t v, size_t n)
{
    unsigned long long w;
    if (r == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ReferenceError, "goheap: the Heap behind this handler is gone");
        slow_report(what, v, n);
        return 0;
    }
    w = PyLong_AsUnsignedLongLong(r);
    Py_DECREF(r);
    if (w == (unsigned long long)-1 && PyErr_Occurred()) {
        slow_report(what, v, n);
        return 0;
    }
    return (uintptr_t)w;
}

/* Heap._malloc_slow(n, zero, status), called as the builtin malloc calls it
 * on a miss (zero a bool, status what the fast path returned). */
static void *slow_malloc(ghnp_ctx *c, size_t n, int zero, uintptr_t status)
{
    slow_state st;
    PyObject *args[3];
    uintptr_t v;
    slow_enter(&st);
    args[0] = PyLong_FromSize_t(n);
    args[1] = zero ? Py_True : Py_False;
    args[2] = PyLong_FromSize_t((size_t)status);
    v = slow_address(slow_call(c->slow_malloc, args, 3), zero ? "calloc" : "malloc", 0, n);
    Py_XDECREF(args[0]);
    Py_XDECREF(args[2]);
    slow_leave(&st);
    return (void *)v;
}

/* Heap._free_slow(v, status): large and efence objects, a frozen heap, and
 * the verdicts (DoubleFree, InvalidFree), which become unraisable.  A Heap
 * that is gone was closed: nothing to free. */
static void slow_free(ghnp_ctx *c, uintptr_t v, int status)
{
    slow_state st;
    PyObject *args[2], *r;
    slow_enter(&st);
    args[0] = PyLong_FromSize_t((size_t)v);
    args[1] = PyLong_FromLong(status);
    r = slow_call(c->slow_free, args, 2);
    if (r == NULL && PyErr_Occurred())
        slow_report("free", v, 0);
    Py_XDECREF(r);
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    slow_leave(&st);
}

/* Heap.realloc(v, n): the moves C does not make (an efence object C cannot
 * see) and every refusal, which Python names. */
static void *slow_realloc(ghnp_ctx *c, uintptr_t v, size_t n)
{
    slow_state st;
    PyObject *args[2];
    uintptr_t w;
    slow_enter(&st);
    args[0] = PyLong_FromSize_t((size_t)v);
    args[1] = PyLong_FromSize_t(n);
    w = slow_address(slow_call(c->slow_realloc, args, 2), "realloc", v, n);
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    slow_leave(&st);
    return (void *)w;
}

/* ------------------------------------------------------------------------
 * The handler's four functions.  No GIL needed on the fast path: the C core
 * takes the heap's own lock.  NumPy hands back ctx as we gave it.
 * ------------------------------------------------------------------------ */

/* The size to ask the heap for (see NP_MIN_SIZE).  h->efence is set before
 * the heap is first used and never changes. */
static inline size_t np_size(const ghnp_ctx *c, size_t n)
{
    return n >= NP_MIN_SIZE || c->h->efence ? n : NP_MIN_SIZE;
}

static void *np_malloc(void *ctx, size_t size)
{
    ghnp_ctx *c = ctx;
    size_t n = np_size(c, size);
    uintptr_t v = gh_mcache_alloc_nozero(c->h, n);
    if (v >= NP_STATUS_LIMIT)
        return (void *)v;
    return slow_malloc(c, n, 0, v);
}

/* Zeroed memory: C's zeroing path, which does not clear what is known to be
 * zero already (fresh from the OS), as Go's mallocgc does not. */
static void *np_calloc(void *ctx, size_t nelem, size_t elsize)
{
    ghnp_ctx *c = ctx;
    size_t n;
    uintptr_t v;
    if (elsize != 0 && nelem > SIZE_MAX / elsize)
        return NULL; /* NumPy raises MemoryError for the NULL */
    n = np_size(c, nelem * elsize);
    v = gh_mcache_alloc(c->h, n);
    if (v >= NP_STATUS_LIMIT)
        return (void *)v;
    return slow_malloc(c, n, 1, v);
}

/* size is NumPy's idea of the object's size, a hint only (argsort frees
 * with a size it never allocated): the heap's metadata is the truth. */
static void np_free(void *ctx, void *ptr, size_t size)
{
    ghnp_ctx *c = ctx;
    int st;
    (void)size;
    if (ptr == NULL)
        return; /* argsort frees NULL */
    st = gh_mcache_free(c->h, (uintptr_t)ptr);
    if (st == GH_OK)
        return;
    if (st == GH_EARG)
        return; /* the heap is closed: the arena goes with its owner, after the last array */
    slow_free(c, (uintptr_t)ptr, st);
}

/* In place when the object's class (or its large span) holds the new size;
 * else malloc, copy, free, all three on the fast path when they can be; a
 * refusal (or a closed heap) goes to Heap.realloc, which names it. */
static void *np_realloc(void *ctx, void *ptr, size_t new_size)
{
    ghnp_ctx *c = ctx;
    uintptr_t v = (uintptr_t)ptr, old = 0;
    size_t n = np_size(c, new_size);
    uint32_t cl = 0;
    void *w;
    int st;

    if (ptr == NULL)
        return np_malloc(ctx, new_size);
    st = gh_realloc_in_place(c->h, v, n);
    if (st == GH_OK)
        return ptr;
    if (st != GH_MISS || gh_object_size(c->h, v, &old, &cl) != GH_OK)
        return slow_realloc(c, v, n);
    w = np_malloc(ctx, n);
    if (w == NULL)
        return NULL; /* the old object stays NumPy's, as realloc(3) leaves it */
    /* Still mapped: the array being resized holds our capsule, which holds
     * the arena owner, whatever another thread does to the heap. */
    memcpy(w, ptr, old < n ? old : n);
    np_free(ctx, ptr, old);
    return w;
}

/* ------------------------------------------------------------------------
 * The capsule
 * ------------------------------------------------------------------------ */

static void handler_destroy(PyObject *capsule)
{
    ghnp_ctx *c = PyCapsule_GetPointer(capsule, NP_CAPSULE_NAME);
    if (c == NULL) {
        PyErr_Clear(); /* not ours: made only by new_handler with this name */
        return;
    }
    /* The owner last: its going may unmap the arena, nothing else reads it. */
    Py_XDECREF(c->slow_malloc);
    Py_XDECREF(c->slow_free);
    Py_XDECREF(c->slow_realloc);
    Py_XDECREF(c->mheap_ref);
    Py_XDECREF(c->owner);
    PyMem_RawFree(c);
}

/* new_handler(h, mheap_ref, owner, slow_malloc, slow_free, slow_realloc):
 * a "mem_handler" capsule named "goheap" for heap h (an int address; the
 * caller vouches for it and for mheap_ref, which owns it). */
static PyObject *new_handler(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    ghnp_ctx *c;
    unsigned long long h;
    PyObject *capsule;
    Py_ssize_t i;
    (void)module;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "new_handler(h, mheap_ref, owner, slow_malloc, slow_free, slow_realloc)");
        return NULL;
    }
    h = PyLong_AsUnsignedLongLong(args[0]);
    if (h == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (h == 0) {
        PyErr_SetString(PyExc_ValueError, "new_handler: no heap");
        return NULL;
    }
    for (i = 3; i < 6; i++) {
        if (!PyCallable_Check(args[i])) {
            PyErr_SetString(PyExc_TypeError, "new_handler: the slow paths must be callable");
            return NULL;
        }
    }
    c = PyMem_RawCalloc(1, sizeof(*c));
    if (c == NULL)
        return PyErr_NoMemory();
    strcpy(c->handler.name, "goheap");
    c->handler.version = 1;
    c->handler.allocator.ctx = c;
    c->handler.allocator.malloc = np_malloc;
    c->handler.allocator.calloc = np_calloc;
    c->handler.allocator.realloc = np_realloc;
    c->handler.allocator.free = np_free;
    c->h = (gh_mheap *)(uintptr_t)h;
    capsule = PyCapsule_New(&c->handler, NP_CAPSULE_NAME, handler_destroy);
    if (capsule == NULL) {
        PyMem_RawFree(c);
        return NULL;
    }
    c->mheap_ref = Py_NewRef(args[1]);
    c->owner = Py_NewRef(args[2]);
    c->slow_malloc = Py_NewRef(args[3]);
    c->slow_free = Py_NewRef(args[4]);
    c->slow_realloc = Py_NewRef(args[5]);
    return capsule;
}

/* ------------------------------------------------------------------------
 * NumPy's C-API table: SetHandler and GetHandler without NumPy's headers
 * ------------------------------------------------------------------------ */

#define NP_API_ABI 0                 /* unsigned PyArray_GetNDArrayCVersion(void)        */
#define NP_API_FEATURE 211           /* unsigned PyArray_GetNDArrayCFeatureVersion(void) */
#define NP_API_SET_HANDLER 304       /* PyObject *PyDataMem_SetHandler(PyObject *)       */
#define NP_API_GET_HANDLER 305       /* PyObject *PyDataMem_GetHandler(void)             */
#define NP_FEATURE_1_22 0x0f         /* NPY_1_22_API_VERSION: the first with slot 304   */

static PyObject *(*np_set_handler)(PyObject *); /* NULL until load_api */
static PyObject *(*np_get_handler)(void);

/* load_api(table) -> (abi version, feature version): table is the capsule
 * _multiarray_umath._ARRAY_API (its name is NULL). */
static PyObject *load_api(PyObject *module, PyObject *table)
{
    void **t;
    unsigned int (*abi_fn)(void), (*feature_fn)(void), abi, feature;
    (void)module;
    if (!PyCapsule_CheckExact(table)) {
        PyErr_SetString(PyExc_TypeError, "load_api: NumPy's _ARRAY_API must be a capsule");
        return NULL;
    }
    t = PyCapsule_GetPointer(table, NULL);
    if (t == NULL)
        return NULL;
    abi_fn = (unsigned int (*)(void))t[NP_API_ABI];
    abi = abi_fn();
    /* 0x01000009 is every 1.x, 0x02000000 the 2.x series; another major
     * could have moved the slots. */
    if (abi != 0x01000009u && (abi >> 24) != 2) {
        PyErr_Format(PyExc_ImportError, "goheap: NumPy's C ABI version %#x is unknown", abi);
        return NULL;
    }
    feature_fn = (unsigned int (*)(void))t[NP_API_FEATURE];
    feature = feature_fn();
    if (feature < NP_FEATURE_1_22) {
        PyErr_Format(PyExc_ImportError,
                     "goheap: NumPy's C API (feature version %#x) has no data-memory handler: "
                     "NumPy >= 1.22 needed",
                     feature);
        return NULL;
    }
    np_set_handler = (PyObject * (*)(PyObject *)) t[NP_API_SET_HANDLER];
    np_get_handler = (PyObject * (*)(void)) t[NP_API_GET_HANDLER];
    return Py_BuildValue("(II)", abi, feature);
}

static int api_loaded(void)
{
    if (np_set_handler != NULL && np_get_handler != NULL)
        return 1;
    PyErr_SetString(PyExc_RuntimeError, "goheap: NumPy's C API is not loaded (load_api)");
    return 0;
}

/* set_handler(capsule or None) -> the previous one: for the current context
 * only; None restores NumPy's default. */
static PyObject *set_handler(PyObject *module, PyObject *capsule)
{
    (void)module;
    if (!api_loaded())
        return NULL;
    return np_set_handler(capsule == Py_None ? NULL : capsule);
}

/* get_handler() -> the current context's capsule. */
static PyObject *get_handler(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    if (!api_loaded())
        return NULL;
    return np_get_handler();
}

static PyMethodDef np_defs[] = {
    {"new_handler", (PyCFunction)(void (*)(void))new_handler, METH_FASTCALL,
     "new_handler(h, mheap_ref, owner, slow_malloc, slow_free, slow_realloc) -> capsule"},
    {"load_api", (PyCFunction)load_api, METH_O, "load_api(_ARRAY_API) -> (abi, feature)"},
    {"set_handler", (PyCFunction)set_handler, METH_O, "set_handler(capsule | None) -> previous"},
    {"get_handler", (PyCFunction)get_handler, METH_NOARGS, "get_handler() -> capsule"},
    {NULL, NULL, 0, NULL},
};

/* (new_handler, load_api, set_handler, get_handler) as builtins.  Called
 * once through ctypes.PyDLL (with the GIL held) by goheap/_native.py. */
GHPY_EXPORT PyObject *ghnp_api(void)
{
    PyObject *out = PyTuple_New(4);
    Py_ssize_t i;
    if (out == NULL)
        return NULL;
    for (i = 0; i < 4; i++) {
        PyObject *fn = PyCFunction_New(&np_defs[i], NULL);
        if (fn == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, fn);
    }
    return out;
}
