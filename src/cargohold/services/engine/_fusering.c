/* FUSE over io_uring for the engine's FUSE session (services/engine/fuse.py).
 *
 * Linux 6.14+ lets a FUSE server take its requests from ring entries instead of reading
 * /dev/fuse: each entry is a header buffer and a payload buffer registered with
 * IORING_OP_URING_CMD (FUSE_IO_URING_CMD_REGISTER); the kernel copies a request into a free
 * entry and completes its command; the server writes the reply into the same buffers and
 * commits it with FUSE_IO_URING_CMD_COMMIT_AND_FETCH, which also hands the entry back for the
 * next request. Every reply of one loop turn goes in with one io_uring_enter, and no
 * request costs a read() of its own. The kernel keeps one queue per possible CPU and queues
 * a request on the CPU it was made on, so every queue gets entries.
 *
 * Ring(fuse_fd, queues, per_queue, payload_size, payloads) sets the ring up (``payloads``:
 * a writable buffer of the caller's, entry k's payload at k * payload_size, held meanwhile);
 * register() hands every entry to the kernel (OSError if it refuses: the session stays on
 * /dev/fuse); the ring's fd becomes readable when requests arrived, take() returns them; reply()/reply_data()
 * queue answers, submit() sends what is queued. The kernel's header layout (linux/fuse.h
 * 7.42) is declared here: the build machine's headers may be older than the kernel.
 *
 * Built by the package's own build (setup.py, optional, warnings as errors); without it,
 * or on a kernel without FUSE over io_uring, the session reads /dev/fuse as before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <linux/fuse.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define URING_CMD_REGISTER 1
#define URING_CMD_COMMIT_AND_FETCH 2
#define SQE_SIZE 128 /* IORING_SETUP_SQE128: the command's 80 bytes follow the SQE */
#define MAX_ENTRIES 4096

struct ent_in_out {
    uint64_t flags;
    uint64_t commit_id; /* the request's unique, echoed in the commit */
    uint32_t payload_sz;
    uint32_t padding;
    uint64_t reserved;
};

struct req_header {
    char in_out[128]; /* fuse_in_header from the kernel, fuse_out_header to it */
    char op_in[128];  /* the request's first argument (fuse_write_in, fuse_read_in, ...) */
    struct ent_in_out ent;
};

struct cmd_req {
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

typedef struct {
    struct req_header header;
    struct iovec iov[2];
    uint16_t qid;
    uint8_t ours; /* holds a request that take() returned and no reply answered yet */
} Entry;

typedef struct {
    PyObject_HEAD
    int fuse_fd;
    int ring_fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    char *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map;
    size_t sq_len, cq_len, sqes_len;
    unsigned sq_entries;
    unsigned queued; /* SQEs written, not submitted yet */
    Entry *entries;
    unsigned count;
    Py_buffer payloads; /* held: the caller's mapping, entry k's payload at k * payload_size */
    size_t payload_size;
    int ended; /* the kernel ended the connection (unmounted or aborted) */
} Ring;

static int enter(Ring *r, unsigned submit, unsigned wait) {
    for (;;) {
        long n = syscall(__NR_io_uring_enter, r->ring_fd, submit, wait,
                         wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
        if (n >= 0 || errno != EINTR)
            return (int)n;
    }
}

/* Submit what is queued; -1 with errno set on failure. */
static int flush(Ring *r) {
    while (r->queued) {
        int n = enter(r, r->queued, 0);
        if (n < 0)
            return -1;
        r->queued -= (unsigned)n < r->queued ? (unsigned)n : r->queued;
        if (n == 0)
            break;
    }
    return 0;
}

static int queue_cmd(Ring *r, Entry *e, unsigned op, uint64_t commit_id) {
    unsigned tail = *r->sq_tail;
    if (tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE) >= r->sq_entries) {
        if (flush(r) < 0)
            return -1;
    }
    unsigned index = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)(r->sqes + (size_t)SQE_SIZE * index);
    memset(sqe, 0, SQE_SIZE);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = r->fuse_fd;
    sqe->cmd_op = op;
    sqe->addr = (uint64_t)(uintptr_t)e->iov;
    sqe->len = 2;
    sqe->user_data = (uint64_t)(e - r->entries);
    struct cmd_req *req = (struct cmd_req *)sqe->cmd;
    req->commit_id = commit_id;
    req->qid = e->qid;
    r->sq_array[index] = index;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    r->queued++;
    e->ours = 0;
    return 0;
}

static void ring_release(Ring *r) {
    if (r->ring_fd >= 0) {
        close(r->ring_fd); /* cancels the entries' commands */
        r->ring_fd = -1;
    }
    if (r->sq_map && r->sq_map != MAP_FAILED)
        munmap(r->sq_map, r->sq_len);
    if (r->cq_map && r->cq_map != MAP_FAILED)
        munmap(r->cq_map, r->cq_len);
    if (r->sqes && (void *)r->sqes != MAP_FAILED)
        munmap(r->sqes, r->sqes_len);
    r->sq_map = r->cq_map = NULL;
    r->sqes = NULL;
    if (r->payloads.obj)
        PyBuffer_Release(&r->payloads);
    PyMem_Free(r->entries);
    r->entries = NULL;
}

static PyObject *ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Ring *r = (Ring *)type->tp_alloc(type, 0);
    if (r) {
        r->ring_fd = -1;
        r->fuse_fd = -1;
    }
    return (PyObject *)r;
}

static int ring_init(Ring *r, PyObject *args, PyObject *kwds) {
    static char *names[] = {"fuse_fd", "queues", "per_queue", "payload_size", "payloads", NULL};
    int fuse_fd;
    unsigned queues, per_queue;
    Py_ssize_t payload_size;
    PyObject *payloads;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iIInO", names, &fuse_fd, &queues, &per_queue,
                                     &payload_size, &payloads))
        return -1;
    if (r->ring_fd >= 0 || r->entries || r->payloads.obj) {
        PyErr_SetString(PyExc_RuntimeError, "Ring is set up already");
        return -1;
    }
    if (queues < 1 || queues > 1024 || per_queue < 1 || queues * per_queue > MAX_ENTRIES ||
        payload_size < 4096 || payload_size > (64 << 20) || payload_size % 4096) {
        PyErr_SetString(PyExc_ValueError, "queues, per_queue or payload_size out of range");
        return -1;
    }
    if (PyObject_GetBuffer(payloads, &r->payloads, PyBUF_WRITABLE) < 0)
        return -1;
    r->fuse_fd = fuse_fd;
    r->count = queues * per_queue;
    r->payload_size = (size_t)payload_size;
    if ((size_t)r->payloads.len < r->payload_size * r->count) {
        PyErr_Format(PyExc_ValueError, "payloads of %zd bytes cannot hold %u of %zd",
                     r->payloads.len, r->count, payload_size);
        PyBuffer_Release(&r->payloads);
        return -1;
    }
    unsigned size = 1;
    while (size < r->count)
        size <<= 1;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    /* COOP_TASKRUN: a request arriving while the loop runs is copied in at its next system
     * call, not by interrupting it (QD16 1 MiB reads: ~1.3 GB/s with interrupts, ~2.1 without,
     * /dev/fuse ~2.0 in the same runs) */
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_COOP_TASKRUN;
    r->ring_fd = (int)syscall(__NR_io_uring_setup, size, &p);
    if (r->ring_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    r->sqes_len = (size_t)SQE_SIZE * p.sq_entries;
    r->sq_map = mmap(NULL, r->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     r->ring_fd, IORING_OFF_SQ_RING);
    r->cq_map = mmap(NULL, r->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     r->ring_fd, IORING_OFF_CQ_RING);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   r->ring_fd, IORING_OFF_SQES);
    r->entries = PyMem_Calloc(r->count, sizeof(Entry));
    if (r->sq_map == MAP_FAILED || r->cq_map == MAP_FAILED || (void *)r->sqes == MAP_FAILED ||
        !r->entries) {
        int error = errno ? errno : ENOMEM;
        ring_release(r);
        errno = error;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->sq_entries = p.sq_entries;
    for (unsigned k = 0; k < r->count; k++) {
        Entry *e = &r->entries[k];
        e->qid = (uint16_t)(k % queues);
        e->iov[0].iov_base = &e->header;
        e->iov[0].iov_len = sizeof e->header;
        e->iov[1].iov_base = (char *)r->payloads.buf + r->payload_size * k;
        e->iov[1].iov_len = r->payload_size;
    }
    return 0;
}

static void ring_dealloc(Ring *r) {
    ring_release(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static int usable(Ring *r) {
    if (r->ring_fd < 0 || !r->entries) {
        PyErr_SetString(PyExc_ValueError, "the ring is closed");
        return 0;
    }
    return 1;
}

static int entry_index(Ring *r, PyObject *arg, unsigned *index) {
    long k = PyLong_AsLong(arg);
    if (k == -1 && PyErr_Occurred())
        return -1;
    if (k < 0 || (unsigned long)k >= r->count) {
        PyErr_Format(PyExc_IndexError, "no ring entry %ld", k);
        return -1;
    }
    *index = (unsigned)k;
    return 0;
}

/* register(): hand every entry to the kernel. The kernel answers a refused registration at
 * once: its error (EOPNOTSUPP without fuse.enable_uring, EINVAL, ...) is raised. */
static PyObject *ring_register(Ring *r, PyObject *unused) {
    if (!usable(r))
        return NULL;
    for (unsigned k = 0; k < r->count; k++) {
        if (queue_cmd(r, &r->entries[k], URING_CMD_REGISTER, 0) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (flush(r) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    for (; head != tail; head++) {
        struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
        if (cqe->res < 0) { /* refused (a request's completion is never below 0) */
            __atomic_store_n(r->cq_head, tail, __ATOMIC_RELEASE);
            errno = -cqe->res;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    Py_RETURN_NONE;
}

/* take(): the requests that arrived, as (entry, opcode, unique, nodeid, offset, size): offset
 * and size of a READ or WRITE, 0 for others (``op_in``/``request_size`` and the payload give
 * their arguments). An entry whose command the kernel refused comes as (entry, -errno, 0, 0,
 * 0, 0): it holds no request and is the kernel's no more. The end of the connection comes
 * as ``ended``. */
static PyObject *ring_take(Ring *r, PyObject *unused) {
    if (!usable(r))
        return NULL;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    for (; head != tail; head++) {
        struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
        uint64_t k = cqe->user_data;
        if (k >= r->count)
            continue;
        Entry *e = &r->entries[k];
        int res = cqe->res;
        if (res == -ENOTCONN || res == -ECONNABORTED || res == -ECANCELED || res == -ENODEV) {
            r->ended = 1; /* the connection ended: unmounted, aborted, or the ring closed */
            continue;
        }
        unsigned opcode = 0;
        unsigned long long unique = 0, nodeid = 0, offset = 0, size = 0;
        PyObject *item;
        if (res < 0) { /* the kernel refused this entry's command: (entry, -errno, 0, ...) */
            item = Py_BuildValue("(kiKKKK)", (unsigned long)k, res, unique, nodeid, offset,
                                 size);
            goto append;
        }
        e->ours = 1;
        const struct fuse_in_header *in = (const void *)e->header.in_out;
        opcode = in->opcode;
        unique = in->unique;
        nodeid = in->nodeid;
        if (in->opcode == FUSE_READ || in->opcode == FUSE_WRITE) {
            /* fuse_read_in and fuse_write_in both begin with fh, offset, size */
            const struct fuse_read_in *io = (const void *)e->header.op_in;
            offset = io->offset;
            size = io->size;
            if (in->opcode == FUSE_WRITE && size > e->header.ent.payload_sz)
                size = e->header.ent.payload_sz;
        }
        item = Py_BuildValue("(kIKKKK)", (unsigned long)k, opcode, unique, nodeid, offset,
                             size);
    append:
        if (!item || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
            return NULL;
        }
        Py_DECREF(item);
    }
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    return out;
}

static int commit(Ring *r, unsigned k, int error, size_t size) {
    Entry *e = &r->entries[k];
    if (!e->ours) {
        PyErr_Format(PyExc_ValueError, "ring entry %u holds no request", k);
        return -1;
    }
    if (size > r->payload_size) {
        PyErr_Format(PyExc_ValueError, "a reply of %zu bytes does not fit", size);
        return -1;
    }
    if (r->ended) {
        e->ours = 0;
        return 0; /* nobody waits for it any more */
    }
    struct fuse_out_header *oh = (void *)e->header.in_out;
    uint64_t unique = ((const struct fuse_in_header *)e->header.in_out)->unique;
    uint64_t commit_id = e->header.ent.commit_id;
    oh->unique = unique;
    oh->error = error;
    oh->len = (uint32_t)(sizeof *oh + (error ? 0 : size));
    e->header.ent.payload_sz = error ? 0 : (uint32_t)size;
    if (queue_cmd(r, e, URING_CMD_COMMIT_AND_FETCH, commit_id) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* reply(entry, error, size): answer the entry's request; ``error`` is 0 or -errno, ``size``
 * the bytes of the reply already in its payload (entry k's: ``payloads[k * payload_size:]``). Sent by submit(). */
static PyObject *ring_reply(Ring *r, PyObject *const *args, Py_ssize_t nargs) {
    unsigned k;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "reply(entry, error, size)");
        return NULL;
    }
    if (!usable(r) || entry_index(r, args[0], &k) < 0)
        return NULL;
    long error = PyLong_AsLong(args[1]);
    Py_ssize_t size = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (error > 0 || error < -4095 || size < 0) {
        PyErr_SetString(PyExc_ValueError, "error is 0 or -errno, size not negative");
        return NULL;
    }
    if (commit(r, k, (int)error, (size_t)size) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* reply_data(entry, data): answer with ``data`` (copied into the entry's payload). */
static PyObject *ring_reply_data(Ring *r, PyObject *const *args, Py_ssize_t nargs) {
    unsigned k;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "reply_data(entry, data)");
        return NULL;
    }
    if (!usable(r) || entry_index(r, args[0], &k) < 0)
        return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if ((size_t)data.len > r->payload_size) {
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "a reply of %zd bytes does not fit", data.len);
        return NULL;
    }
    Entry *e = &r->entries[k];
    if (e->ours)
        memcpy(e->iov[1].iov_base, data.buf, (size_t)data.len);
    Py_ssize_t len = data.len;
    PyBuffer_Release(&data);
    if (commit(r, k, 0, (size_t)len) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *ring_submit(Ring *r, PyObject *unused) {
    if (!usable(r))
        return NULL;
    if (flush(r) < 0) {
        if (errno == ENXIO || errno == EBADF) { /* the ring is going away: nothing to send */
            r->queued = 0;
            Py_RETURN_NONE;
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* op_in(entry): the request's first argument (128 bytes) */
static PyObject *ring_op_in(Ring *r, PyObject *arg) {
    unsigned k;
    if (!usable(r) || entry_index(r, arg, &k) < 0)
        return NULL;
    return PyBytes_FromStringAndSize(r->entries[k].header.op_in, 128);
}

/* request_size(entry): how many bytes of the payload the request filled */
static PyObject *ring_request_size(Ring *r, PyObject *arg) {
    unsigned k;
    if (!usable(r) || entry_index(r, arg, &k) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(r->entries[k].header.ent.payload_sz);
}

static PyObject *ring_close(Ring *r, PyObject *unused) {
    ring_release(r);
    Py_RETURN_NONE;
}

static PyObject *get_fd(Ring *r, void *closure) { return PyLong_FromLong(r->ring_fd); }
static PyObject *get_count(Ring *r, void *closure) { return PyLong_FromUnsignedLong(r->count); }
static PyObject *get_ended(Ring *r, void *closure) { return PyBool_FromLong(r->ended); }

static PyMethodDef ring_methods[] = {
    {"register", (PyCFunction)ring_register, METH_NOARGS, "hand every entry to the kernel"},
    {"take", (PyCFunction)ring_take, METH_NOARGS, "the requests that arrived"},
    {"reply", (PyCFunction)(void (*)(void))ring_reply, METH_FASTCALL,
     "reply(entry, error, size): answer from the entry's payload"},
    {"reply_data", (PyCFunction)(void (*)(void))ring_reply_data, METH_FASTCALL,
     "reply_data(entry, data): answer with data"},
    {"submit", (PyCFunction)ring_submit, METH_NOARGS, "send the replies queued"},
    {"op_in", (PyCFunction)ring_op_in, METH_O, "op_in(entry): the request's first argument"},
    {"request_size", (PyCFunction)ring_request_size, METH_O,
     "request_size(entry): payload bytes the request filled"},
    {"close", (PyCFunction)ring_close, METH_NOARGS, "close the ring (cancels its entries)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ring_getset[] = {
    {"fd", (getter)get_fd, NULL, "the ring's fd: readable when requests arrived", NULL},
    {"count", (getter)get_count, NULL, "ring entries", NULL},
    {"ended", (getter)get_ended, NULL, "the kernel ended the connection", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cargohold.services.engine._fusering.Ring",
    .tp_doc = "Ring(fuse_fd, queues, per_queue, payload_size, payloads): FUSE over io_uring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = ring_new,
    .tp_init = (initproc)ring_init,
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_methods = ring_methods,
    .tp_getset = ring_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fusering", "FUSE requests over io_uring.", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fusering(void) {
    if (PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
