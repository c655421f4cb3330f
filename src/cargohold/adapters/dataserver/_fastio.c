/* The data server's plain writes and cached reads served without Python
 * (adapters/dataserver/fastio.py).
 *
 * A connection's received bytes hold a run of request frames. serve() takes them from the
 * front while each is a WRITE or WRITE_SHARED, or a READ of at most read_max bytes, of a
 * volume this connection was allowed (allow(): the Python path served that volume's I/O at
 * that epoch before), at the epoch its replica holds, that the replica's BlockIO
 * (stores/_blockio.c) takes whole: a write it can make, a read of blocks all in the page
 * cache whose checksums match, within the budget of unread answers the connection allows. It
 * stops at the first frame that is anything else and returns its position, and the Python
 * path serves that one (so requests still run in the order they came). The answers of the
 * run go out as one bytes object appended to the connection's list of answers.
 *
 * A refusal, a failure or a half-received frame is never answered here: nothing was done
 * (or, for a failed pwrite, what was done is done again by the Python path, which then
 * answers with the error and puts the checksums right; a read left here is read again).
 *
 * Built by setup.py (optional, warnings as errors); tests/unit/test_blockio.py feeds it
 * frames once under AddressSanitizer and UndefinedBehaviorSanitizer, and
 * tests/integration/test_fastio.py runs a server with and without it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "blockio.h"

#define REQUEST_SIZE 56
#define RESPONSE_SIZE 12
#define MAX_VOLUMES 32

static struct blockio_api *api;

typedef struct {
    uint8_t volume[16];
    uint64_t epoch;          /* the epoch allowed on this connection; 0: the writer's */
    PyObject *writer;        /* owned; NULL: a free entry */
} Entry;

typedef struct {
    PyObject_HEAD
    uint8_t magic[2], version, write_op, shared_op, read_op, ok;
    uint32_t max_payload, read_max;
    Entry entries[MAX_VOLUMES];
    int next;                /* the entry allow() replaces when all are taken */
    Py_buffer shared;        /* the client's write buffers (SHARE), when has_shared */
    int has_shared;
    unsigned long long served, reads_served;
    Py_ssize_t queued;       /* bytes of read answers the last serve() queued */
} FastIO;

static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t be64(const uint8_t *p) {
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

static void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static int init(FastIO *f, PyObject *args, PyObject *kwds) {
    static char *names[] = {"magic", "version", "write_op", "shared_op", "read_op", "ok",
                            "max_payload", "read_max", NULL};
    Py_buffer magic;
    unsigned char version, write_op, shared_op, read_op, ok;
    unsigned int max_payload, read_max;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "$y*bbbbbII", names, &magic, &version,
                                     &write_op, &shared_op, &read_op, &ok, &max_payload,
                                     &read_max))
        return -1;
    if (magic.len != 2) {
        PyBuffer_Release(&magic);
        PyErr_SetString(PyExc_ValueError, "magic is 2 bytes");
        return -1;
    }
    memcpy(f->magic, magic.buf, 2);
    PyBuffer_Release(&magic);
    f->version = version;
    f->write_op = write_op;
    f->shared_op = shared_op;
    f->read_op = read_op;
    f->ok = ok;
    f->max_payload = max_payload;
    f->read_max = read_max;
    return 0;
}

static void clear_entries(FastIO *f) {
    for (int i = 0; i < MAX_VOLUMES; i++)
        Py_CLEAR(f->entries[i].writer);
}

static void let_go(FastIO *f) {
    if (f->has_shared) {
        f->has_shared = 0;
        PyBuffer_Release(&f->shared);
    }
}

static void dealloc(FastIO *f) {
    clear_entries(f);
    let_go(f);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static int volume_arg(PyObject *volume, uint8_t out[16]) {
    if (!PyBytes_Check(volume) || PyBytes_GET_SIZE(volume) != 16) {
        PyErr_SetString(PyExc_ValueError, "a volume is 16 bytes");
        return -1;
    }
    memcpy(out, PyBytes_AS_STRING(volume), 16);
    return 0;
}

static Entry *find(FastIO *f, const uint8_t volume[16]) {
    for (int i = 0; i < MAX_VOLUMES; i++)
        if (f->entries[i].writer != NULL && !memcmp(f->entries[i].volume, volume, 16))
            return &f->entries[i];
    return NULL;
}

static PyObject *allow(FastIO *f, PyObject *args) {
    PyObject *volume, *writer;
    unsigned long long epoch;
    uint8_t raw[16];
    if (!PyArg_ParseTuple(args, "SOK", &volume, &writer, &epoch) || volume_arg(volume, raw) < 0)
        return NULL;
    if (!PyObject_TypeCheck(writer, api->type)) {
        PyErr_SetString(PyExc_TypeError, "the writer is a compiled BlockIO");
        return NULL;
    }
    Entry *e = find(f, raw);
    if (e == NULL) {
        for (int i = 0; i < MAX_VOLUMES && e == NULL; i++)
            if (f->entries[i].writer == NULL)
                e = &f->entries[i];
    }
    if (e == NULL) {
        e = &f->entries[f->next];
        f->next = (f->next + 1) % MAX_VOLUMES;
    }
    memcpy(e->volume, raw, 16);
    e->epoch = epoch;
    Py_INCREF(writer);
    Py_XSETREF(e->writer, writer);
    Py_RETURN_NONE;
}

static PyObject *forget(FastIO *f, PyObject *volume) {
    uint8_t raw[16];
    if (volume_arg(volume, raw) < 0)
        return NULL;
    Entry *e = find(f, raw);
    if (e != NULL)
        Py_CLEAR(e->writer);
    Py_RETURN_NONE;
}

static PyObject *clear(FastIO *f, PyObject *unused) {
    clear_entries(f);
    Py_RETURN_NONE;
}

static PyObject *share(FastIO *f, PyObject *buffer) {
    Py_buffer view;
    if (PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    let_go(f);
    f->shared = view;
    f->has_shared = 1;
    Py_RETURN_NONE;
}

static PyObject *unshare_method(FastIO *f, PyObject *unused) {
    let_go(f);
    Py_RETURN_NONE;
}

/* The answers of one serve() call: on the stack while they fit, then on the heap. */
typedef struct {
    uint8_t *p, *heap;
    size_t len, cap;
} Out;

/* Room for n more bytes at the end of o (NULL: out of memory, o unchanged). */
static uint8_t *room(Out *o, size_t n) {
    if (o->len + n > o->cap) {
        size_t cap = 2 * o->cap > o->len + n ? 2 * o->cap : o->len + n;
        uint8_t *p = PyMem_Malloc(cap);
        if (p == NULL)
            return NULL;
        memcpy(p, o->p, o->len);
        PyMem_Free(o->heap);
        o->p = o->heap = p;
        o->cap = cap;
    }
    uint8_t *at = o->p + o->len;
    o->len += n;
    return at;
}

static void answer(const FastIO *f, uint8_t *a, const uint8_t *request, uint32_t length) {
    a[0] = f->magic[0];
    a[1] = f->magic[1];
    a[2] = f->version;
    a[3] = f->ok;
    memcpy(a + 4, request + 4, 4); /* the request id, as it came */
    put32(a + 8, length);
}

/* serve(buffer, pos, end, out, budget=0) -> the position of the first frame left to Python.
 * budget: bytes of read answers it may queue (the connection's limit on unread answers). */
static PyObject *serve(FastIO *f, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer buf;
    Py_ssize_t pos, end, budget = 0;
    if ((nargs != 4 && nargs != 5) || !PyList_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "serve(buffer, pos, end, out: list, budget=0)");
        return NULL;
    }
    pos = PyLong_AsSsize_t(args[1]);
    end = PyLong_AsSsize_t(args[2]);
    if (nargs == 5)
        budget = PyLong_AsSsize_t(args[4]);
    if ((pos == -1 || end == -1 || budget == -1) && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    if (pos < 0 || end < pos || end > buf.len) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "pos and end lie in the buffer");
        return NULL;
    }
    const uint8_t *b = buf.buf;
    uint8_t small[64 * RESPONSE_SIZE];
    Out o = {small, NULL, 0, sizeof small};
    Py_ssize_t writes = 0, reads = 0, queued = 0;
    while (end - pos >= REQUEST_SIZE) {
        const uint8_t *h = b + pos;
        uint8_t op = h[3];
        uint64_t epoch = be64(h + 24), offset = be64(h + 32), generation = be64(h + 44);
        uint32_t length = be32(h + 40), plen = be32(h + 52);
        if (h[0] != f->magic[0] || h[1] != f->magic[1] || h[2] != f->version ||
            plen > f->max_payload || (uint64_t)(end - pos - REQUEST_SIZE) < plen)
            break;
        const char *data = NULL;
        if (op == f->write_op) {
            if (plen != length)
                break;
            data = (const char *)h + REQUEST_SIZE;
        } else if (op == f->shared_op) {
            if (plen != 8 || !f->has_shared)
                break;
            uint64_t at = be64(h + REQUEST_SIZE);
            if (at > (uint64_t)f->shared.len || length > (uint64_t)f->shared.len - at)
                break;
            data = (const char *)f->shared.buf + at;
        } else if (op == f->read_op) {
            if (plen != 0 || length == 0 || length > f->read_max ||
                (Py_ssize_t)length > budget - queued)
                break;
        } else {
            break;
        }
        Entry *e = find(f, h + 8);
        if (e == NULL || epoch == 0 || (e->epoch && e->epoch != epoch) ||
            api->epoch(e->writer) != epoch)
            break;
        /* held across the call: its checksums are Python calls, which may run any code */
        PyObject *writer = e->writer;
        Py_INCREF(writer);
        int done;
        uint8_t *a = room(&o, RESPONSE_SIZE + (data == NULL ? length : 0));
        if (a == NULL) {
            done = 0;
        } else if (data != NULL) {
            done = api->write(writer, offset, data, (Py_ssize_t)length, generation);
            if (done > 0)
                answer(f, a, h, 0);
        } else {
            done = api->read(writer, offset, (char *)a + RESPONSE_SIZE, (Py_ssize_t)length);
            if (done > 0)
                answer(f, a, h, length);
        }
        Py_DECREF(writer);
        if (done < 0)
            PyErr_Clear(); /* done again by the Python path, which answers the error */
        if (done <= 0) {
            if (a != NULL)
                o.len -= RESPONSE_SIZE + (data == NULL ? length : 0);
            break;
        }
        if (data == NULL) {
            reads++;
            queued += length;
        } else {
            writes++;
        }
        pos += REQUEST_SIZE + (Py_ssize_t)plen;
    }
    PyBuffer_Release(&buf);
    int failed = 0;
    f->queued = 0;
    if (o.len) {
        PyObject *out = PyBytes_FromStringAndSize((const char *)o.p, (Py_ssize_t)o.len);
        failed = out == NULL || PyList_Append(args[3], out) < 0;
        Py_XDECREF(out);
        if (!failed) {
            f->served += (unsigned long long)writes;
            f->reads_served += (unsigned long long)reads;
            f->queued = queued;
        }
    }
    PyMem_Free(o.heap);
    return failed ? NULL : PyLong_FromSsize_t(pos);
}

static PyObject *get_served(FastIO *f, void *closure) {
    return PyLong_FromUnsignedLongLong(f->served);
}

static PyObject *get_reads_served(FastIO *f, void *closure) {
    return PyLong_FromUnsignedLongLong(f->reads_served);
}

static PyObject *get_queued(FastIO *f, void *closure) {
    return PyLong_FromSsize_t(f->queued);
}

static PyMethodDef methods[] = {
    {"allow", (PyCFunction)allow, METH_VARARGS,
     "allow(volume: 16 bytes, writer, epoch): serve its writes (epoch 0: the writer's)"},
    {"forget", (PyCFunction)forget, METH_O, "forget(volume): its writes go to Python again"},
    {"clear", (PyCFunction)clear, METH_NOARGS, "Forget every volume."},
    {"share", (PyCFunction)share, METH_O, "share(buffer): the client's write buffers"},
    {"unshare", (PyCFunction)unshare_method, METH_NOARGS, "Let go of the write buffers."},
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL,
     "serve(buffer, pos, end, out, budget=0) -> pos of the first frame left to Python"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef getset[] = {
    {"served", (getter)get_served, NULL, "writes served here so far", NULL},
    {"reads_served", (getter)get_reads_served, NULL, "reads served here so far", NULL},
    {"queued", (getter)get_queued, NULL, "bytes of read answers the last serve() queued",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FastIOType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cargohold.adapters.dataserver._fastio.FastIO",
    .tp_doc = "A connection's plain writes and cached reads served in C (see fastio.py).",
    .tp_basicsize = sizeof(FastIO),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)init,
    .tp_dealloc = (destructor)dealloc,
    .tp_methods = methods,
    .tp_getset = getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastio", "A data server's plain I/O served in C.", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastio(void) {
    PyObject *writers = PyImport_ImportModule("cargohold.stores._blockio");
    if (writers == NULL)
        return NULL;
    Py_DECREF(writers);
    api = PyCapsule_Import(BLOCKIO_CAPSULE, 0);
    if (api == NULL)
        return NULL;
    if (PyType_Ready(&FastIOType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FastIOType);
    if (PyModule_AddObject(m, "FastIO", (PyObject *)&FastIOType) < 0) {
        Py_DECREF(&FastIOType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
