/* Reads of files in threads of their own, which never take the GIL (stores/diskreads.py).
 *
 * The data server's event loop hands over a read that would wait for the disk and goes on
 * serving; a worker preads into a bytes object made for it beforehand, and completions come
 * back through an eventfd the loop watches. Python threads did the same at ~70 us of CPU per
 * read (every completion fought the event loop for the GIL); here a read costs the loop one
 * call to submit it and a share of one call that collects a batch.
 *
 * Built by the package's own build (setup.py, optional, warnings as errors); without it
 * diskreads.py uses Python threads. tests/unit/test_diskreads.py runs both, and once more
 * against a build with AddressSanitizer and UndefinedBehaviorSanitizer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define MAX_THREADS 256
#define MAX_LENGTH (64 << 20)

typedef struct Job {
    struct Job *next;
    int fd;
    int error;            /* errno of a failed pread, 0 if none */
    long long offset;
    Py_ssize_t length;
    Py_ssize_t got;       /* bytes read (fewer at the end of the file) */
    char *buffer;         /* data's bytes, written by one worker only */
    PyObject *data;       /* owned: a bytes object of length bytes */
    PyObject *tag;        /* owned: handed back with the data */
} Job;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    pthread_cond_t wake;
    Job *head, *tail;     /* waiting for a worker, oldest first */
    Job *done;            /* finished, newest first */
    pthread_t *threads;
    int started;
    int stopping;
    int efd;
    Py_ssize_t pending;   /* submitted, not collected yet */
} Pool;

static void job_free(Job *j) {
    Py_XDECREF(j->data);
    Py_XDECREF(j->tag);
    PyMem_Free(j);
}

static void *worker(void *arg) {
    Pool *p = arg;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->head && !p->stopping)
            pthread_cond_wait(&p->wake, &p->lock);
        if (p->stopping)
            break;
        Job *j = p->head;
        p->head = j->next;
        if (!p->head)
            p->tail = NULL;
        pthread_mutex_unlock(&p->lock);

        Py_ssize_t got = 0;
        while (got < j->length) {
            ssize_t n = pread(j->fd, j->buffer + got, (size_t)(j->length - got),
                              (off_t)(j->offset + got));
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                j->error = errno;
                break;
            }
            if (n == 0)
                break;
            got += n;
        }
        j->got = got;

        pthread_mutex_lock(&p->lock);
        j->next = p->done;
        p->done = j;
        uint64_t one = 1;
        if (write(p->efd, &one, sizeof one) < 0) {
            /* the counter cannot overflow at one per read; nothing else can fail here */
        }
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

static void pool_stop(Pool *p) {
    if (p->efd < 0)
        return;
    pthread_mutex_lock(&p->lock);
    p->stopping = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < p->started; i++)
        pthread_join(p->threads[i], NULL);
    Py_END_ALLOW_THREADS
    p->started = 0;
    for (Job *lists[2] = {p->head, p->done}, **l = lists; l < lists + 2; l++) {
        for (Job *j = *l, *next; j; j = next) {
            next = j->next;
            job_free(j);
        }
    }
    p->head = p->tail = p->done = NULL;
    p->pending = 0;
    close(p->efd);
    p->efd = -1;
}

static int pool_init(Pool *p, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"threads", NULL};
    int threads;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i", names, &threads))
        return -1;
    if (p->threads) {
        PyErr_SetString(PyExc_RuntimeError, "a pool is initialized once");
        return -1;
    }
    if (threads < 1 || threads > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be 1 to %d", MAX_THREADS);
        return -1;
    }
    p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    p->threads = PyMem_Calloc((size_t)threads, sizeof(pthread_t));
    if (!p->threads) {
        close(p->efd);
        p->efd = -1;
        PyErr_NoMemory();
        return -1;
    }
    /* the workers take no signal: Python's handlers run in the main thread */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int error = 0;
    for (int i = 0; i < threads && !error; i++) {
        error = pthread_create(&p->threads[i], NULL, worker, p);
        if (!error)
            p->started++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (error) {
        pool_stop(p);
        errno = error;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *pool_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    Pool *p = (Pool *)type->tp_alloc(type, 0);
    if (!p)
        return NULL;
    p->efd = -1;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    return (PyObject *)p;
}

static void pool_dealloc(Pool *p) {
    pool_stop(p);
    PyMem_Free(p->threads);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->wake);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *pool_submit(Pool *p, PyObject *args) {
    int fd;
    long long offset;
    Py_ssize_t length;
    PyObject *tag;
    if (!PyArg_ParseTuple(args, "iLnO", &fd, &offset, &length, &tag))
        return NULL;
    if (p->efd < 0 || p->stopping) {
        PyErr_SetString(PyExc_ValueError, "the pool is closed");
        return NULL;
    }
    if (fd < 0 || offset < 0 || length < 1 || length > MAX_LENGTH) {
        PyErr_Format(PyExc_ValueError, "a read needs fd >= 0, offset >= 0 and 1 to %d bytes",
                     MAX_LENGTH);
        return NULL;
    }
    Job *j = PyMem_Calloc(1, sizeof(Job));
    if (!j)
        return PyErr_NoMemory();
    j->data = PyBytes_FromStringAndSize(NULL, length);
    if (!j->data) {
        PyMem_Free(j);
        return NULL;
    }
    j->buffer = PyBytes_AS_STRING(j->data);
    j->fd = fd;
    j->offset = offset;
    j->length = length;
    Py_INCREF(tag);
    j->tag = tag;
    pthread_mutex_lock(&p->lock);
    if (p->tail)
        p->tail->next = j;
    else
        p->head = j;
    p->tail = j;
    p->pending++;
    pthread_cond_signal(&p->wake);
    pthread_mutex_unlock(&p->lock);
    Py_RETURN_NONE;
}

/* (tag, bytes) for a read, (tag, OSError) for one that failed; oldest first. */
static PyObject *pool_completed(Pool *p, PyObject *unused) {
    if (p->efd < 0)
        return PyList_New(0);
    uint64_t count;
    if (read(p->efd, &count, sizeof count) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    pthread_mutex_lock(&p->lock);
    Job *done = p->done;
    p->done = NULL;
    pthread_mutex_unlock(&p->lock);
    Job *oldest = NULL; /* reverse: newest first -> oldest first */
    while (done) {
        Job *next = done->next;
        done->next = oldest;
        oldest = done;
        done = next;
    }
    PyObject *out = PyList_New(0);
    for (Job *j = oldest, *next; j; j = next) {
        next = j->next;
        p->pending--;
        PyObject *value;
        if (j->error) {
            value = PyObject_CallFunction(PyExc_OSError, "is", j->error, strerror(j->error));
        } else if (j->got < j->length) {
            value = PyBytes_FromStringAndSize(j->buffer, j->got);
        } else {
            value = j->data;
            Py_INCREF(value);
        }
        PyObject *item = value && out ? PyTuple_Pack(2, j->tag, value) : NULL;
        Py_XDECREF(value);
        if (!item || PyList_Append(out, item) < 0)
            Py_CLEAR(out);
        Py_XDECREF(item);
        job_free(j);
    }
    return out;
}

static PyObject *pool_fileno(Pool *p, PyObject *unused) {
    if (p->efd < 0) {
        PyErr_SetString(PyExc_ValueError, "the pool is closed");
        return NULL;
    }
    return PyLong_FromLong(p->efd);
}

static PyObject *pool_close(Pool *p, PyObject *unused) {
    pool_stop(p);
    Py_RETURN_NONE;
}

static PyObject *pool_pending(Pool *p, void *closure) {
    return PyLong_FromSsize_t(p->pending);
}

static PyMethodDef pool_methods[] = {
    {"submit", (PyCFunction)pool_submit, METH_VARARGS,
     "submit(fd, offset, length, tag): read length bytes at offset in a worker"},
    {"completed", (PyCFunction)pool_completed, METH_NOARGS,
     "the reads done since the last call: [(tag, bytes or OSError)], oldest first"},
    {"fileno", (PyCFunction)pool_fileno, METH_NOARGS,
     "an eventfd, readable while completed() has something to give"},
    {"close", (PyCFunction)pool_close, METH_NOARGS,
     "stop the workers; reads not collected are dropped"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pool_getset[] = {
    {"pending", (getter)pool_pending, NULL, "reads submitted and not collected yet", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cargohold.stores._diskreads.Pool",
    .tp_doc = "Pool(threads): reads of files in threads that never take the GIL",
    .tp_basicsize = sizeof(Pool),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = pool_new,
    .tp_init = (initproc)pool_init,
    .tp_dealloc = (destructor)pool_dealloc,
    .tp_methods = pool_methods,
    .tp_getset = pool_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_diskreads", "Reads of files in threads without the GIL.", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__diskreads(void) {
    if (PyType_Ready(&PoolType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&PoolType);
    if (PyModule_AddObject(m, "Pool", (PyObject *)&PoolType) < 0) {
        Py_DECREF(&PoolType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
