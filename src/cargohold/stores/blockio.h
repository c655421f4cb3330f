/* What stores/_blockio.c offers other C extensions (through the capsule
 * cargohold.stores._blockio.API): the data server's compiled request path
 * (adapters/dataserver/_fastio.c) writes through a replica's BlockIO without a
 * Python call. */
#ifndef CARGOHOLD_BLOCKIO_H
#define CARGOHOLD_BLOCKIO_H

#include <Python.h>
#include <stdint.h>

#define BLOCKIO_CAPSULE "cargohold.stores._blockio.API"

struct blockio_api {
    PyTypeObject *type;
    /* BlockIO.write: 1 written, 0 left to the Python path (nothing done), -1 failed
     * with a Python exception set (the data may be partly written, its checksums not). */
    int (*write)(PyObject *writer, uint64_t offset, const char *data, Py_ssize_t length,
                 uint64_t generation);
    /* BlockIO.read_cached into `into`: 1 read, 0 left to the Python path, -1 failed
     * with a Python exception set. */
    int (*read)(PyObject *writer, uint64_t offset, char *into, Py_ssize_t length);
    /* The replica's epoch as the writer knows it; 0 once closed. */
    uint64_t (*epoch)(PyObject *writer);
};

#endif
