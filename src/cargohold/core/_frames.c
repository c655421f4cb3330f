/* The data protocol's frame headers decoded in C (core/wire.py is the reference).
 *
 * Every request a data server receives and every answer an engine receives starts with one
 * of these headers; wire.py decodes them with struct, a cached hex of the volume id and a
 * check of magic, version and payload length, ~1.3 us each. Here the same in one call.
 *
 * The first part is plain C (no Python): tests/fuzz/frames_fuzz.c includes it alone and
 * feeds it libFuzzer's input under AddressSanitizer and UndefinedBehaviorSanitizer. The
 * Python functions below it give wire.py's answers exactly, errors included
 * (tests/unit/test_frames.py compares both on hypothesis's headers).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define FRAME_VERSION 1
#define FRAME_MAX_PAYLOAD (16u << 20)
#define REQUEST_SIZE 56
#define RESPONSE_SIZE 12

enum frame_error { FRAME_OK, FRAME_SHORT, FRAME_MAGIC, FRAME_VERSION_BAD, FRAME_TOO_BIG };

struct request_header {
    uint8_t magic[2], version, op;
    uint32_t request_id;
    uint8_t volume[16];
    uint64_t epoch, offset;
    uint32_t length;
    uint64_t generation;
    uint32_t payload_length;
};

struct response_header {
    uint8_t magic[2], version, status;
    uint32_t request_id, payload_length;
};

static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t be64(const uint8_t *p) {
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

static enum frame_error check_frame(const uint8_t magic[2], uint8_t version, uint32_t plen) {
    if (magic[0] != 'C' || magic[1] != 'H')
        return FRAME_MAGIC;
    if (version != FRAME_VERSION)
        return FRAME_VERSION_BAD;
    if (plen > FRAME_MAX_PAYLOAD)
        return FRAME_TOO_BIG;
    return FRAME_OK;
}

static enum frame_error parse_request(const uint8_t *p, size_t size, struct request_header *h) {
    if (size < REQUEST_SIZE)
        return FRAME_SHORT;
    memcpy(h->magic, p, 2);
    h->version = p[2];
    h->op = p[3];
    h->request_id = be32(p + 4);
    memcpy(h->volume, p + 8, 16);
    h->epoch = be64(p + 24);
    h->offset = be64(p + 32);
    h->length = be32(p + 40);
    h->generation = be64(p + 44);
    h->payload_length = be32(p + 52);
    return check_frame(h->magic, h->version, h->payload_length);
}

static enum frame_error parse_response(const uint8_t *p, size_t size,
                                       struct response_header *h) {
    if (size < RESPONSE_SIZE)
        return FRAME_SHORT;
    memcpy(h->magic, p, 2);
    h->version = p[2];
    h->status = p[3];
    h->request_id = be32(p + 4);
    h->payload_length = be32(p + 8);
    return check_frame(h->magic, h->version, h->payload_length);
}

#ifndef FRAMES_WITHOUT_PYTHON
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* What wire.py gives configure(): its header types and how it makes its errors. */
static PyObject *request_type, *response_type, *frame_error, *short_error;

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *req, *resp, *error, *shortage;
    if (!PyArg_ParseTuple(args, "OOOO", &req, &resp, &error, &shortage))
        return NULL;
    Py_INCREF(req);
    Py_INCREF(resp);
    Py_INCREF(error);
    Py_INCREF(shortage);
    Py_XSETREF(request_type, req);
    Py_XSETREF(response_type, resp);
    Py_XSETREF(frame_error, error);
    Py_XSETREF(short_error, shortage);
    Py_RETURN_NONE;
}

/* The error wire.py raises for a bad header (its message, word for word). */
static PyObject *raise_frame(enum frame_error e, const uint8_t magic[2], uint8_t version,
                             uint32_t plen, Py_ssize_t have, Py_ssize_t offset,
                             Py_ssize_t size) {
    PyObject *detail = NULL;
    if (e == FRAME_SHORT) {
        PyErr_Format(short_error, "unpack_from requires a buffer of at least %zd bytes for "
                     "unpacking %zd bytes at offset %zd (actual buffer size is %zd)",
                     offset + size, size, offset, have);
        return NULL;
    }
    if (e == FRAME_MAGIC) {
        PyObject *raw = PyBytes_FromStringAndSize((const char *)magic, 2);
        if (raw) {
            detail = PyUnicode_FromFormat("bad magic %R", raw);
            Py_DECREF(raw);
        }
    } else if (e == FRAME_VERSION_BAD) {
        detail = PyUnicode_FromFormat("unsupported protocol version %u", version);
    } else {
        detail = PyUnicode_FromFormat("payload of %u bytes is too big", plen);
    }
    if (!detail)
        return NULL;
    PyObject *exc = PyObject_CallOneArg(frame_error, detail);
    Py_DECREF(detail);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* An instance of a NamedTuple class (a tuple subclass without a dict) from ``n`` new
 * references, as tuple.__new__ would make it; NULL (and every item released) on failure. */
static PyObject *header(PyObject *type, Py_ssize_t n, PyObject **items) {
    PyObject *made = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!items[i])
            goto done;
    made = ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, n);
    if (made) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyTuple_SET_ITEM(made, i, items[i]);
            items[i] = NULL;
        }
    }
done:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    return made;
}

/* A call's (buffer, offset=0): the header's bytes there (fewer at the buffer's end). */
struct call {
    Py_ssize_t offset, have;
    size_t left;
    uint8_t bytes[REQUEST_SIZE];
};

static int fetch(PyObject *const *args, Py_ssize_t nargs, size_t size, struct call *c) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "expected (buffer, offset=0)");
        return -1;
    }
    if (!request_type) {
        PyErr_SetString(PyExc_RuntimeError, "_frames.configure() was not called");
        return -1;
    }
    c->offset = 0;
    if (nargs == 2) {
        c->offset = PyLong_AsSsize_t(args[1]);
        if (c->offset == -1 && PyErr_Occurred())
            return -1;
    }
    if (c->offset < 0) {  /* wire.py's callers never ask for one */
        PyErr_SetString(PyExc_ValueError, "a negative offset");
        return -1;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return -1;
    c->have = view.len;
    size_t left = c->offset < view.len ? (size_t)(view.len - c->offset) : 0;
    c->left = left < size ? left : size;
    if (c->left)
        memcpy(c->bytes, (const uint8_t *)view.buf + c->offset, c->left);
    PyBuffer_Release(&view);
    return 0;
}

static PyObject *volume_hex(const uint8_t volume[16]) {
    static const char digits[] = "0123456789abcdef";
    int zero = 1;
    for (int i = 0; i < 16; i++)
        zero &= volume[i] == 0;
    if (zero)
        return PyUnicode_New(0, 127);
    PyObject *text = PyUnicode_New(32, 127);
    if (!text)
        return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(text);
    for (int i = 0; i < 16; i++) {
        out[2 * i] = (Py_UCS1)digits[volume[i] >> 4];
        out[2 * i + 1] = (Py_UCS1)digits[volume[i] & 15];
    }
    return text;
}

static PyObject *decode_request_header(PyObject *self, PyObject *const *args,
                                       Py_ssize_t nargs) {
    struct call c;
    if (fetch(args, nargs, REQUEST_SIZE, &c) < 0)
        return NULL;
    struct request_header h = {0};
    enum frame_error e = parse_request(c.bytes, c.left, &h);
    if (e != FRAME_OK)
        return raise_frame(e, h.magic, h.version, h.payload_length, c.have, c.offset,
                           REQUEST_SIZE);
    PyObject *items[8] = {
        PyLong_FromUnsignedLong(h.op), PyLong_FromUnsignedLong(h.request_id),
        volume_hex(h.volume), PyLong_FromUnsignedLongLong(h.epoch),
        PyLong_FromUnsignedLongLong(h.offset), PyLong_FromUnsignedLong(h.length),
        PyLong_FromUnsignedLongLong(h.generation), PyLong_FromUnsignedLong(h.payload_length),
    };
    return header(request_type, 8, items);
}

static PyObject *decode_response_header(PyObject *self, PyObject *const *args,
                                        Py_ssize_t nargs) {
    struct call c;
    if (fetch(args, nargs, RESPONSE_SIZE, &c) < 0)
        return NULL;
    struct response_header h = {0};
    enum frame_error e = parse_response(c.bytes, c.left, &h);
    if (e != FRAME_OK)
        return raise_frame(e, h.magic, h.version, h.payload_length, c.have, c.offset,
                           RESPONSE_SIZE);
    PyObject *items[3] = {
        PyLong_FromUnsignedLong(h.status), PyLong_FromUnsignedLong(h.request_id),
        PyLong_FromUnsignedLong(h.payload_length),
    };
    return header(response_type, 3, items);
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(RequestHeader, ResponseHeader, make_frame_error, struct.error)"},
    {"decode_request_header", (PyCFunction)(void (*)(void))decode_request_header,
     METH_FASTCALL, "decode_request_header(buffer, offset=0) -> RequestHeader"},
    {"decode_response_header", (PyCFunction)(void (*)(void))decode_response_header,
     METH_FASTCALL, "decode_response_header(buffer, offset=0) -> ResponseHeader"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_frames", "The data protocol's frame headers decoded in C.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__frames(void) {
    return PyModule_Create(&module);
}
#endif
