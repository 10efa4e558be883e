/* goheap's CPython binding for the two hot calls: malloc and free as builtin methods.
 *
 * See goheap/malloc.py for the overview.
 *
 * Why this file exists: through cffi, a Python method wrapping the C fast path
 * costs a Python frame plus a two-argument cffi call (METH_VARARGS: a tuple is
 * built and parsed), which is more than the allocator itself by a factor of
 * ten and more than glibc's malloc called through cffi.  Here malloc and free
 * are METH_FASTCALL methods of a small object that holds the heap's gh_mheap
 * pointer, so a call is one vectorcall into C, like a call to a built-in.
 *
 * This is binding glue, not the C core: it lives apart from _sys.c, includes
 * Python.h, and is the one place where C calls Python -- the heap's slow paths
 * (refill, large objects, errors), reached through weak references so that
 * the methods never keep a Heap alive.  Every decision stays in Python: on
 * anything but a plain hit the arguments go to the slow path untouched.
 *
 * Invariants: h stays valid while the object lives (it holds `owner`, the
 * Python object that owns h's memory); a closed heap has arena_start == 0, so
 * the C core refuses it and the slow path raises HeapClosed.
 *
 * The file's second half is the C base of goheap.Block (BlockBase): the
 * buffer protocol and its export count, which only a C type can give on
 * every Python goheap supports.  See that section's comment.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* T_PYSSIZET, READONLY: the spelling 3.10 and 3.11 know */

#include "_sys.h"

#define GHPY_EXPORT __attribute__((visibility("default")))

typedef struct {
    PyObject_HEAD
    gh_mheap *h;           /* the heap's C half                               */
    PyObject *owner;       /* keeps h's memory alive                          */
    PyObject *slow_malloc; /* weakref.WeakMethod of Heap._malloc_slow(size, zero, status[, align]) */
    PyObject *slow_free;   /* weakref.WeakMethod of Heap._free_slow(v, status)           */
    PyObject *slow_realloc; /* weakref.WeakMethod of Heap.realloc(v, size)                */
} ghpy_fast;

static PyObject *fast_type; /* created on first use */

/* Call the method behind a WeakMethod with args[0..n) (and kwnames, or NULL). */
static PyObject *call_slow(PyObject *weak, PyObject *const *args, Py_ssize_t n,
                           PyObject *kwnames)
{
    PyObject *m, *r;
    m = PyObject_CallNoArgs(weak);
    if (m == NULL)
        return NULL;
    if (m == Py_None) {
        Py_DECREF(m);
        PyErr_SetString(PyExc_ReferenceError, "goheap: the Heap behind this method is gone");
        return NULL;
    }
    r = PyObject_Vectorcall(m, args, (size_t)n, kwnames);
    Py_DECREF(m);
    return r;
}

/* The status handed to the slow path: what gh_mcache_alloc returned, or 0
 * when the argument never reached C (not an exact int, or out of range, or
 * an alignment: which class or span serves it is Python's choice). */
static PyObject *to_slow_malloc(ghpy_fast *self, PyObject *size, PyObject *zero, uintptr_t status,
                                PyObject *align)
{
    PyObject *args[4], *st, *r;
    st = PyLong_FromUnsignedLongLong((unsigned long long)status);
    if (st == NULL)
        return NULL;
    args[0] = size;
    args[1] = zero;
    args[2] = st;
    args[3] = align;
    r = call_slow(self->slow_malloc, args, align != NULL ? 4 : 3, NULL);
    Py_DECREF(st);
    return r;
}

static PyObject *fast_malloc(ghpy_fast *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    PyObject *size = nargs > 0 ? args[0] : NULL;
    PyObject *zero = nargs > 1 ? args[1] : Py_True;
    PyObject *align = NULL;
    Py_ssize_t i, nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    unsigned long long n;
    uintptr_t v;
    int z;

    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "malloc() takes at most 2 arguments (%zd given)", nargs);
        return NULL;
    }
    for (i = 0; i < nkw; i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i), **slot;
        if (PyUnicode_CompareWithASCIIString(k, "size") == 0)
            slot = &size;
        else if (PyUnicode_CompareWithASCIIString(k, "zero") == 0)
            slot = &zero;
        else if (PyUnicode_CompareWithASCIIString(k, "align") == 0) {
            if (args[nargs + i] != Py_None)
                align = args[nargs + i]; /* keyword-only: never also positional */
            continue;
        } else {
            PyErr_Format(PyExc_TypeError, "malloc() got an unexpected keyword argument '%U'", k);
            return NULL;
        }
        if (nargs > (slot == &size ? 0 : 1)) { /* also given by position */
            PyErr_Format(PyExc_TypeError, "malloc() got multiple values for argument '%U'", k);
            return NULL;
        }
        *slot = args[nargs + i];
    }
    if (size == NULL) {
        PyErr_SetString(PyExc_TypeError, "malloc() missing required argument 'size'");
        return NULL;
    }
    z = PyObject_IsTrue(zero);
    if (z < 0)
        return NULL;
    if (!PyLong_CheckExact(size) || align != NULL)
        return to_slow_malloc(self, size, z ? Py_True : Py_False, 0, align);
    n = PyLong_AsUnsignedLongLong(size);
    if (n == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* negative or huge: the slow path names the error */
        return to_slow_malloc(self, size, z ? Py_True : Py_False, 0, NULL);
    }
    v = z ? gh_mcache_alloc(self->h, (uintptr_t)n) : gh_mcache_alloc_nozero(self->h, (uintptr_t)n);
    if (v >= 4096)
        return PyLong_FromUnsignedLongLong((unsigned long long)v);
    return to_slow_malloc(self, size, z ? Py_True : Py_False, v, NULL);
}

static PyObject *fast_free(ghpy_fast *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *a[2], *st, *r;
    unsigned long long v;
    int status;

    if (nargs != 1) {
        PyErr_Format(PyExc_TypeError, "free() takes exactly one argument (%zd given)", nargs);
        return NULL;
    }
    if (!PyLong_Check(args[0]) && !PyIndex_Check(args[0])) {
        st = Py_NewRef(Py_None); /* not an address at all: TypeError from the slow path */
    } else {
        /* An __index__ int (numpy.uint64) is an address as malloc's sizes are. */
        PyObject *idx = PyNumber_Index(args[0]);
        if (idx == NULL)
            return NULL;
        v = PyLong_AsUnsignedLongLong(idx);
        Py_DECREF(idx);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            status = GH_EINVALID; /* negative or beyond 64 bits: in no heap */
        } else {
            status = gh_mcache_free(self->h, (uintptr_t)v);
            if (status == GH_OK)
                Py_RETURN_NONE;
        }
        st = PyLong_FromLong(status);
        if (st == NULL)
            return NULL;
    }
    a[0] = args[0];
    a[1] = st;
    r = call_slow(self->slow_free, a, 2, NULL);
    Py_DECREF(st);
    return r;
}

/* realloc(v, size): the in-place case in C; anything else -- a move, a bad
 * address, keywords, arguments that are not plain ints -- goes to
 * Heap.realloc untouched, which decides and names the error. */
static PyObject *fast_realloc(ghpy_fast *self, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    if (kwnames == NULL && nargs == 2 && PyLong_CheckExact(args[0]) &&
        PyLong_CheckExact(args[1])) {
        unsigned long long v = PyLong_AsUnsignedLongLong(args[0]);
        unsigned long long n = v == (unsigned long long)-1 && PyErr_Occurred()
                                   ? 0
                                   : PyLong_AsUnsignedLongLong(args[1]);
        if (PyErr_Occurred())
            PyErr_Clear(); /* negative or huge: the slow path names the error */
        else if (gh_realloc_in_place(self->h, (uintptr_t)v, (uintptr_t)n) == GH_OK)
            return Py_NewRef(args[0]);
    }
    return call_slow(self->slow_realloc, args, nargs, kwnames);
}

static void fast_dealloc(ghpy_fast *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(self->owner);
    Py_XDECREF(self->slow_malloc);
    Py_XDECREF(self->slow_free);
    Py_XDECREF(self->slow_realloc);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef fast_methods[] = {
    {"malloc", (PyCFunction)(void (*)(void))fast_malloc, METH_FASTCALL | METH_KEYWORDS,
     "malloc(size, zero=True, *, align=None) -> int: see goheap.Heap.malloc."},
    {"free", (PyCFunction)(void (*)(void))fast_free, METH_FASTCALL,
     "free(v) -> None: see goheap.Heap.free."},
    {"realloc", (PyCFunction)(void (*)(void))fast_realloc, METH_FASTCALL | METH_KEYWORDS,
     "realloc(v, size) -> int: see goheap.Heap.realloc."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot fast_slots[] = {
    {Py_tp_dealloc, (void *)fast_dealloc},
    {Py_tp_methods, fast_methods},
    {Py_tp_doc, (void *)"goheap's fast malloc/free for one heap (see goheap/_pyfast.c)."},
    {0, NULL},
};

/* Only ghpy_fast_new makes one: instantiating the type from Python (or
 * copy/pickle, which go through tp_new) would give a FastPath with no heap. */
static PyType_Spec fast_spec = {
    "goheap._ffi.FastPath", sizeof(ghpy_fast), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION, fast_slots,
};

/* A new FastPath for heap h.  Called through ctypes.PyDLL (with the GIL held)
 * by goheap/_native.py; the three objects are borrowed and kept. */
GHPY_EXPORT PyObject *ghpy_fast_new(uintptr_t h, PyObject *owner, PyObject *slow_malloc,
                                    PyObject *slow_free, PyObject *slow_realloc)
{
    ghpy_fast *self;
    if (h == 0 || owner == NULL || slow_malloc == NULL || slow_free == NULL ||
        slow_realloc == NULL) {
        PyErr_SetString(PyExc_ValueError, "ghpy_fast_new: missing argument");
        return NULL;
    }
    if (fast_type == NULL) {
        fast_type = PyType_FromSpec(&fast_spec);
        if (fast_type == NULL)
            return NULL;
    }
    self = PyObject_New(ghpy_fast, (PyTypeObject *)fast_type);
    if (self == NULL)
        return NULL;
    self->h = (gh_mheap *)h;
    self->owner = Py_NewRef(owner);
    self->slow_malloc = Py_NewRef(slow_malloc);
    self->slow_free = Py_NewRef(slow_free);
    self->slow_realloc = Py_NewRef(slow_realloc);
    return (PyObject *)self;
}

/* ---- Block: one heap object as a buffer ------------------------------------
 *
 * The C half of goheap.Block (block.py subclasses it) and, with heap None,
 * the exporter behind Heap.view()'s memoryviews.  It is C because only a C
 * type can export a buffer before Python 3.12 (PEP 688), and because the
 * buffer protocol is where exports must be counted: free() under a live
 * export is a BufferError, and a freed Block exports nothing.
 *
 * Invariants: [addr, addr + size) stays mapped while the object lives (it
 * holds `owner`, the heap's arena owner, which unmaps when the last reference
 * goes); live == 0 means freed (or never made by ghpy_block_new: a zeroed
 * object is a freed one), and then nothing reads addr; exports counts the
 * Py_buffers handed out and not yet released.  Python decides when to free
 * (block.py); C only refuses what would reach freed memory.
 */

typedef struct {
    PyObject_HEAD
    uintptr_t addr;      /* the object's first byte                           */
    Py_ssize_t size;     /* bytes exported: the size asked for                */
    Py_ssize_t exports;  /* Py_buffers not yet released                       */
    int live;            /* 0 once freed: no export, no access                */
    PyObject *heap;      /* the Heap (a Block), or None (a view's exporter)   */
    PyObject *owner;     /* keeps [addr, addr + size) mapped                  */
} ghpy_block;

static PyObject *block_type; /* created on first use */

static int block_refuse_freed(ghpy_block *self)
{
    PyErr_Format(PyExc_ValueError, "operation on a freed goheap.Block (was %p)",
                 (void *)self->addr);
    return -1;
}

static int block_getbuffer(ghpy_block *self, Py_buffer *view, int flags)
{
    if (!self->live) {
        view->obj = NULL;
        return block_refuse_freed(self);
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, (void *)self->addr, self->size, 0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void block_releasebuffer(ghpy_block *self, Py_buffer *view)
{
    (void)view;
    self->exports--;
}

/* The atomic half of Block.free(): True if the caller must now free the
 * object, False if it was freed already; BufferError while an export lives
 * (then nothing changes).  Under the GIL nothing can export in between. */
static PyObject *block_release(ghpy_block *self, PyObject *unused)
{
    (void)unused;
    if (!self->live)
        Py_RETURN_FALSE;
    if (self->exports > 0) {
        PyErr_Format(PyExc_BufferError, "goheap.Block %p: %zd exported buffer(s) still alive",
                     (void *)self->addr, self->exports);
        return NULL;
    }
    self->live = 0;
    Py_RETURN_TRUE;
}

static PyObject *block_get_addr(ghpy_block *self, void *closure)
{
    (void)closure;
    return PyLong_FromSize_t((size_t)self->addr);
}

static PyObject *block_get_freed(ghpy_block *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(!self->live);
}

static PyObject *block_get_heap(ghpy_block *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->heap != NULL ? self->heap : Py_None);
}

static int block_traverse(ghpy_block *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self)); /* heap types own a reference to their type */
    Py_VISIT(self->heap);
    Py_VISIT(self->owner);
    return 0;
}

static int block_clear(ghpy_block *self)
{
    /* The GC may clear a Block that a cycle still reaches (Python code could
     * then call it): freed first, so nothing reads addr once owner is gone. */
    self->live = 0;
    Py_CLEAR(self->heap);
    Py_CLEAR(self->owner);
    return 0;
}

static void block_dealloc(ghpy_block *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    block_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef block_methods[] = {
    {"_release", (PyCFunction)block_release, METH_NOARGS,
     "Mark the Block freed: True if the caller must free the object now."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef block_getset[] = {
    {"_addr", (getter)block_get_addr, NULL, "the object's address (also after free)", NULL},
    {"freed", (getter)block_get_freed, NULL, "Whether free() has run.", NULL},
    {"_heap", (getter)block_get_heap, NULL, "the Heap, or None for a view's exporter", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef block_members[] = {
    {"_size", T_PYSSIZET, offsetof(ghpy_block, size), READONLY, "bytes exported"},
    {"_exports", T_PYSSIZET, offsetof(ghpy_block, exports), READONLY, "live exports"},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot block_slots[] = {
    {Py_tp_dealloc, (void *)block_dealloc},
    {Py_tp_traverse, (void *)block_traverse},
    {Py_tp_clear, (void *)block_clear},
    {Py_tp_methods, block_methods},
    {Py_tp_getset, block_getset},
    {Py_tp_members, block_members},
    {Py_bf_getbuffer, (void *)block_getbuffer},
    {Py_bf_releasebuffer, (void *)block_releasebuffer},
    {Py_tp_doc, (void *)"The C half of goheap.Block, and the exporter behind Heap.view()."},
    {0, NULL},
};

/* Only block_new makes a live one (from goheap._native): a Block built by
 * Python (a subclass's __new__, copy, pickle) would export any address. */
static PyType_Spec block_spec = {
    "goheap._ffi.BlockBase", sizeof(ghpy_block), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC |
        Py_TPFLAGS_DISALLOW_INSTANTIATION,
    block_slots,
};

/* block_new(cls, heap, owner, addr, size): a live cls (BlockBase or a
 * subclass) over [addr, addr + size).  The caller vouches for the range. */
static PyObject *block_new(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyTypeObject *cls;
    ghpy_block *self;
    unsigned long long addr;
    Py_ssize_t size;
    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "block_new(cls, heap, owner, addr, size)");
        return NULL;
    }
    if (!PyType_Check(args[0]) ||
        !PyType_IsSubtype((PyTypeObject *)args[0], (PyTypeObject *)block_type)) {
        PyErr_SetString(PyExc_TypeError, "block_new: cls must be a BlockBase type");
        return NULL;
    }
    cls = (PyTypeObject *)args[0];
    addr = PyLong_AsUnsignedLongLong(args[3]);
    if (addr == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    size = PyLong_AsSsize_t(args[4]);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size < 0 || (addr == 0 && size > 0)) {
        PyErr_SetString(PyExc_ValueError, "block_new: bad range");
        return NULL;
    }
    self = (ghpy_block *)cls->tp_alloc(cls, 0);
    if (self == NULL)
        return NULL;
    self->addr = (uintptr_t)addr;
    self->size = size;
    self->heap = Py_NewRef(args[1]);
    self->owner = Py_NewRef(args[2]);
    self->live = 1;
    return (PyObject *)self;
}

static PyMethodDef block_new_def = {
    "block_new", (PyCFunction)(void (*)(void))block_new, METH_FASTCALL,
    "block_new(cls, heap, owner, addr, size): a live Block over [addr, addr + size).",
};

/* (BlockBase, block_new).  Called once through ctypes.PyDLL (with the GIL
 * held) by goheap/_native.py. */
GHPY_EXPORT PyObject *ghpy_block_api(void)
{
    PyObject *fn;
    if (block_type == NULL) {
        block_type = PyType_FromSpec(&block_spec);
        if (block_type == NULL)
            return NULL;
    }
    fn = PyCFunction_New(&block_new_def, NULL);
    if (fn == NULL)
        return NULL;
    return Py_BuildValue("(ON)", block_type, fn);
}
