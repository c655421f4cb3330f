/* A replica's plain writes and cached reads in C: the compiled twin of stores/blockio.py.
 *
 * A write of whole blocks to a replica without snapshots, whose checksum and generation pages
 * already have space, is a pwrite, a CRC-32 per block into the sums map, the chunks'
 * generations and four counters. DiskReplica (stores/diskstore.py) does every write through
 * one, and the data server's compiled request path (adapters/dataserver/_fastio.c) calls
 * it without Python in between. Anything else (a range out of bounds, a page that needs space
 * first, a chunk that needs room under a space reserve) is refused (0) with nothing done, and
 * the Python path does it. read_cached() reads back whole blocks the page cache holds whose
 * checksums match, and leaves everything else to the replica's own read.
 *
 * The CRC-32 is the caller's function (isal's, ~10x zlib's on 4 KiB here), called once per
 * block before anything is written. The GIL is held throughout: close() cannot run meanwhile.
 *
 * Built by setup.py (optional, warnings as errors). tests/unit/test_blockio.py gives the
 * same writes to both and compares files, maps and counters, and runs once against a build
 * with AddressSanitizer and UndefinedBehaviorSanitizer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>
#include <sys/uio.h>
#include <unistd.h>

#include "blockio.h"

#define BLOCK 4096

typedef struct {
    PyObject_HEAD
    int fd;
    int open;
    int reserve;             /* a space reserve: a never-written chunk needs room first */
    Py_buffer sums, gens;    /* u32 per block, u64 per chunk, host order (mmaps) */
    Py_buffer sums_backed, gens_backed; /* a byte per page of them: 1 = has space */
    unsigned long long size, epoch, chunk, piece, small, page;
    long long begun, ended, small_writes, chunks_written;
    PyObject *crc32;
    PyObject *small_chunks;  /* a set of chunk numbers */
} BlockIO;

static void release(BlockIO *w) {
    if (!w->open)
        return;
    w->open = 0;
    PyBuffer_Release(&w->sums);
    PyBuffer_Release(&w->gens);
    PyBuffer_Release(&w->sums_backed);
    PyBuffer_Release(&w->gens_backed);
}

static int init(BlockIO *w, PyObject *args, PyObject *kwds) {
    static char *names[] = {"fd", "sums", "gens", "sums_backed", "gens_backed", "size", "epoch",
                            "chunk", "piece", "small", "reserve", "crc32", NULL};
    int fd, reserve;
    PyObject *sums, *gens, *sb, *gb, *crc;
    unsigned long long size, epoch, chunk, piece, small;
    if (w->open) {
        PyErr_SetString(PyExc_RuntimeError, "a BlockIO is made once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOOOO$KKKKKpO", names, &fd, &sums, &gens,
                                     &sb, &gb, &size, &epoch, &chunk, &piece, &small, &reserve,
                                     &crc))
        return -1;
    if (chunk == 0 || chunk % BLOCK || piece == 0 || piece % BLOCK) {
        PyErr_SetString(PyExc_ValueError, "chunk and piece are whole blocks");
        return -1;
    }
    if (!PyCallable_Check(crc)) {
        PyErr_SetString(PyExc_TypeError, "crc32 must be callable");
        return -1;
    }
    if (PyObject_GetBuffer(sums, &w->sums, PyBUF_WRITABLE) < 0)
        return -1;
    if (PyObject_GetBuffer(gens, &w->gens, PyBUF_WRITABLE) < 0)
        goto no_gens;
    if (PyObject_GetBuffer(sb, &w->sums_backed, PyBUF_WRITABLE) < 0)
        goto no_sb;
    if (PyObject_GetBuffer(gb, &w->gens_backed, PyBUF_WRITABLE) < 0)
        goto no_gb;
    w->small_chunks = PySet_New(NULL);
    if (w->small_chunks == NULL)
        goto no_set;
    long page = sysconf(_SC_PAGESIZE);
    w->page = page > 0 ? (unsigned long long)page : 4096;
    w->fd = fd;
    w->reserve = reserve;
    w->size = size;
    w->epoch = epoch;
    w->chunk = chunk;
    w->piece = piece;
    w->small = small;
    Py_INCREF(crc);
    w->crc32 = crc;
    w->open = 1;
    return 0;
no_set:
    PyBuffer_Release(&w->gens_backed);
no_gb:
    PyBuffer_Release(&w->sums_backed);
no_sb:
    PyBuffer_Release(&w->gens);
no_gens:
    PyBuffer_Release(&w->sums);
    return -1;
}

static void dealloc(BlockIO *w) {
    release(w);
    Py_XDECREF(w->crc32);
    Py_XDECREF(w->small_chunks);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

/* Whether every page of bytes [start, end) of a map has space (its backed byte is 1). */
static int backed(const BlockIO *w, const Py_buffer *map, const Py_buffer *flags,
                  unsigned long long start, unsigned long long end) {
    if (end > (unsigned long long)map->len)
        return 0;
    unsigned long long first = start / w->page, last = (end - 1) / w->page;
    if (last >= (unsigned long long)flags->len)
        return 0;
    const unsigned char *f = flags->buf;
    for (unsigned long long p = first; p <= last; p++)
        if (!f[p])
            return 0;
    return 1;
}

static int checksums(BlockIO *w, const char *data, Py_ssize_t count, uint32_t *out) {
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *view = PyMemoryView_FromMemory((char *)data + k * BLOCK, BLOCK, PyBUF_READ);
        if (view == NULL)
            return -1;
        PyObject *crc = PyObject_CallOneArg(w->crc32, view);
        Py_DECREF(view);
        if (crc == NULL)
            return -1;
        unsigned long value = PyLong_AsUnsignedLong(crc);
        Py_DECREF(crc);
        if (value == (unsigned long)-1 && PyErr_Occurred())
            return -1;
        out[k] = (uint32_t)value ? (uint32_t)value : 1;
    }
    return 0;
}

static int do_write(BlockIO *w, uint64_t offset, const char *data, Py_ssize_t length,
                    uint64_t generation, int prepared) {
    if (!w->open || length <= 0 || offset % BLOCK || length % BLOCK || offset > w->size ||
        (uint64_t)length > w->size - offset)
        return 0;
    uint64_t first = offset / BLOCK, count = (uint64_t)length / BLOCK;
    uint64_t c0 = offset / w->chunk, c1 = (offset + (uint64_t)length - 1) / w->chunk;
    if ((first + count) * 4 > (uint64_t)w->sums.len || (c1 + 1) * 8 > (uint64_t)w->gens.len)
        return 0;
    if (!prepared) {
        const uint64_t *gens = w->gens.buf;
        if (w->reserve)
            for (uint64_t c = c0; c <= c1; c++)
                if (!gens[c])
                    return 0;
        if (!backed(w, &w->sums, &w->sums_backed, first * 4, (first + count) * 4))
            return 0;
        if (generation && !backed(w, &w->gens, &w->gens_backed, c0 * 8, (c1 + 1) * 8))
            return 0;
    }
    uint32_t crcs[64], *crc = count <= 64 ? crcs : PyMem_Malloc(count * sizeof(uint32_t));
    if (crc == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int result = -1;
    if (checksums(w, data, (Py_ssize_t)count, crc) < 0)
        goto out;
    /* The checksums are Python calls: a garbage collection in them may have run code that
     * closed this writer (and unmapped its maps). Nothing below calls Python. */
    result = 0;
    if (!w->open)
        goto out;
    result = -1;
    uint32_t *sums = w->sums.buf;
    uint64_t *gens = w->gens.buf;
    w->begun++;
    for (Py_ssize_t done = 0; done < length;) {
        size_t n = (size_t)(length - done) < w->piece ? (size_t)(length - done) : w->piece;
        ssize_t put = pwrite(w->fd, data + done, n, (off_t)(offset + (uint64_t)done));
        if (put < 0 && errno == EINTR)
            continue;
        if (put <= 0) {
            if (put == 0)
                errno = EIO;
            PyErr_SetFromErrno(PyExc_OSError);
            goto out;
        }
        done += put;
    }
    memcpy(sums + first, crc, count * sizeof(uint32_t));
    if (generation)
        for (uint64_t c = c0; c <= c1; c++) {
            uint64_t old = gens[c];
            if (generation > old) {
                gens[c] = generation;
                if (!old)
                    w->chunks_written++;
            }
        }
    if ((uint64_t)length < w->small) {
        w->small_writes++;
        PyObject *number = PyLong_FromUnsignedLongLong(c0);
        if (number == NULL || PySet_Add(w->small_chunks, number) < 0) {
            Py_XDECREF(number);
            PyErr_Clear(); /* only a writeback hint is lost; the write itself is whole */
        } else {
            Py_DECREF(number);
        }
    }
    w->ended++;
    result = 1;
out:
    if (crc != crcs)
        PyMem_Free(crc);
    return result;
}

/* Reads the whole blocks [offset, offset + length) into `into` if every byte is in the page
 * cache and every block's checksum matches (never-written blocks: zeros): 1. 0: left to the
 * replica's own read (out of range, unaligned, not all cached, a checksum that does not
 * match, closed), `into` in any state; -1: a Python exception (a failed checksum call). */
static int do_read(BlockIO *w, uint64_t offset, char *into, Py_ssize_t length) {
    if (!w->open || length <= 0 || offset % BLOCK || length % BLOCK || offset > w->size ||
        (uint64_t)length > w->size - offset)
        return 0;
    uint64_t first = offset / BLOCK, count = (uint64_t)length / BLOCK;
    if ((first + count) * 4 > (uint64_t)w->sums.len)
        return 0;
    uint32_t small[2 * 16];
    uint32_t *want = count <= 16 ? small : PyMem_Malloc(2 * count * sizeof(uint32_t));
    if (want == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    uint32_t *got = want + count;
    /* copied first: the checksums below are Python calls, and a garbage collection in them
     * may close this writer and unmap its sums */
    memcpy(want, (const uint32_t *)w->sums.buf + first, count * sizeof(uint32_t));
    int result = 0, any = 0;
    for (uint64_t k = 0; k < count; k++)
        any |= want[k] != 0;
    if (!any) {
        memset(into, 0, (size_t)length);
        result = 1;
        goto out;
    }
    struct iovec iov = {into, (size_t)length};
    ssize_t n;
    do
        n = preadv2(w->fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
    while (n < 0 && errno == EINTR);
    if (n != length)
        goto out; /* not all cached (EAGAIN, or short at the end of the file), or an error */
    result = -1;
    if (checksums(w, into, (Py_ssize_t)count, got) < 0)
        goto out;
    result = 0;
    for (uint64_t k = 0; k < count; k++) {
        if (!want[k])
            memset(into + k * BLOCK, 0, BLOCK);
        else if (got[k] != want[k])
            goto out;
    }
    result = 1;
out:
    if (want != small)
        PyMem_Free(want);
    return result;
}

static PyObject *read_cached(BlockIO *w, PyObject *args) {
    unsigned long long offset;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "Kn", &offset, &length))
        return NULL;
    if (length <= 0)
        Py_RETURN_NONE;
    PyObject *out = PyBytes_FromStringAndSize(NULL, length);
    if (out == NULL)
        return NULL;
    int done = do_read(w, offset, PyBytes_AS_STRING(out), length);
    if (done > 0)
        return out;
    Py_DECREF(out);
    if (done < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *write_method(BlockIO *w, PyObject *args, PyObject *kwds) {
    static char *names[] = {"offset", "data", "generation", "prepared", NULL};
    unsigned long long offset, generation;
    Py_buffer data;
    int prepared = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Ky*K|p", names, &offset, &data, &generation,
                                     &prepared))
        return NULL;
    int done = do_write(w, offset, data.buf, data.len, generation, prepared);
    PyBuffer_Release(&data);
    if (done < 0)
        return NULL;
    return PyBool_FromLong(done);
}

static PyObject *close_method(BlockIO *w, PyObject *unused) {
    release(w);
    Py_RETURN_NONE;
}

static PyObject *get_small_chunks(BlockIO *w, void *closure) {
    Py_INCREF(w->small_chunks);
    return w->small_chunks;
}

static int set_small_chunks(BlockIO *w, PyObject *value, void *closure) {
    if (value == NULL || !PySet_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "small_chunks is a set");
        return -1;
    }
    Py_INCREF(value);
    Py_SETREF(w->small_chunks, value);
    return 0;
}

static PyObject *get_open(BlockIO *w, void *closure) {
    return PyBool_FromLong(w->open);
}

static int api_write(PyObject *writer, uint64_t offset, const char *data, Py_ssize_t length,
                     uint64_t generation) {
    return do_write((BlockIO *)writer, offset, data, length, generation, 0);
}

static int api_read(PyObject *writer, uint64_t offset, char *into, Py_ssize_t length) {
    return do_read((BlockIO *)writer, offset, into, length);
}

static uint64_t api_epoch(PyObject *writer) {
    BlockIO *w = (BlockIO *)writer;
    return w->open ? w->epoch : 0;
}

static PyMethodDef methods[] = {
    {"write", (PyCFunction)(void (*)(void))write_method, METH_VARARGS | METH_KEYWORDS,
     "write(offset, data, generation, prepared=False) -> bool: False if left to the caller"},
    {"read_cached", (PyCFunction)read_cached, METH_VARARGS,
     "read_cached(offset, length) -> bytes, or None if left to the replica's read"},
    {"close", (PyCFunction)close_method, METH_NOARGS, "Let go of the maps; writes refused."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef members[] = {
    {"epoch", T_ULONGLONG, offsetof(BlockIO, epoch), 0, "the replica's epoch"},
    {"size", T_ULONGLONG, offsetof(BlockIO, size), READONLY, "the replica's size"},
    {"begun", T_LONGLONG, offsetof(BlockIO, begun), 0, "writes begun"},
    {"ended", T_LONGLONG, offsetof(BlockIO, ended), 0, "writes ended"},
    {"small_writes", T_LONGLONG, offsetof(BlockIO, small_writes), 0, "since writeback"},
    {"chunks_written", T_LONGLONG, offsetof(BlockIO, chunks_written), 0,
     "chunks with a generation"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef getset[] = {
    {"small_chunks", (getter)get_small_chunks, (setter)set_small_chunks,
     "chunks small writes went to", NULL},
    {"open", (getter)get_open, NULL, "False once closed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BlockIOType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cargohold.stores._blockio.BlockIO",
    .tp_doc = "A replica's plain writes and cached reads (stores/blockio.py: the reference).",
    .tp_basicsize = sizeof(BlockIO),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)init,
    .tp_dealloc = (destructor)dealloc,
    .tp_methods = methods,
    .tp_members = members,
    .tp_getset = getset,
};

static struct blockio_api api = {&BlockIOType, api_write, api_read, api_epoch};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blockio", "A replica's plain writes and cached reads in C.",
    -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__blockio(void) {
    if (PyType_Ready(&BlockIOType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *capsule = PyCapsule_New(&api, BLOCKIO_CAPSULE, NULL);
    if (capsule == NULL || PyModule_AddObject(m, "API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&BlockIOType);
    if (PyModule_AddObject(m, "BlockIO", (PyObject *)&BlockIOType) < 0) {
        Py_DECREF(&BlockIOType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
