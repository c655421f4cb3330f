/* A null FUSE file server in C, for measuring what the kernel's FUSE interface costs per
 * request, through /dev/fuse read/write or through FUSE over io_uring (Linux 6.14+).
 *
 *   fuse_transport MODE MOUNTPOINT SIZE [ENTRIES]      MODE: dev | uring
 *
 * Mounts a file system whose root holds one file, "volume", of SIZE bytes: writes are
 * acknowledged and dropped, reads answer zeros. It serves until unmounted. Driven by
 * benchmarks/fuse_transport_bench.py, which puts a loop device on the file and runs fio.
 *
 * "dev": one thread, blocking read() of a request, one write() per reply: the least a
 * /dev/fuse server can do per request. "uring": after INIT, ENTRIES ring entries per queue
 * (one queue per possible CPU) are registered with IORING_OP_URING_CMD on one io_uring that
 * one thread serves: every reply is committed with the fetch of the next request, and all
 * the replies of one batch of completions go in with one io_uring_enter. A second thread
 * reads /dev/fuse for what never goes through the ring (forgets, interrupts).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/fuse.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <sys/uio.h>
#include <unistd.h>

/* linux/fuse.h 7.42 (the build machine's header is older) */
#define OVER_IO_URING (1ULL << 41)
#define URING_CMD_REGISTER 1
#define URING_CMD_COMMIT_AND_FETCH 2
struct uring_ent_in_out {
    uint64_t flags;
    uint64_t commit_id;
    uint32_t payload_sz;
    uint32_t padding;
    uint64_t reserved;
};
struct uring_req_header {
    char in_out[128];
    char op_in[128];
    struct uring_ent_in_out ent;
};
struct uring_cmd_req {
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

#define MAX_WRITE (1u << 20)
#define BUFFER (MAX_WRITE + 4096)
#define ROOT 1
#define FILE_INO 2

static uint64_t size;
static int fuse_fd = -1;

static void fail(const char *what) {
    perror(what);
    exit(1);
}

static void attr(struct fuse_attr *a, uint64_t ino) {
    memset(a, 0, sizeof *a);
    a->ino = ino;
    a->blksize = 4096;
    if (ino == ROOT) {
        a->mode = S_IFDIR | 0755;
        a->nlink = 2;
    } else {
        a->mode = S_IFREG | 0600;
        a->nlink = 1;
        a->size = size;
        a->blocks = size / 512;
    }
}

/* The reply to one request: its bytes after the fuse_out_header go to OUT (at most BUFFER);
 * returns their count, or -errno. INIT is answered by the caller. */
static int answer(const struct fuse_in_header *in, const void *arg, char *out) {
    switch (in->opcode) {
    case FUSE_WRITE: {
        const struct fuse_write_in *w = arg;
        struct fuse_write_out *o = (void *)out;
        o->size = w->size;
        o->padding = 0;
        return sizeof *o;
    }
    case FUSE_READ: {
        const struct fuse_read_in *r = arg;
        uint64_t n = r->offset >= size ? 0 : size - r->offset;
        if (n > r->size)
            n = r->size;
        memset(out, 0, n);
        return (int)n;
    }
    case FUSE_LOOKUP: {
        struct fuse_entry_out *e = (void *)out;
        if (in->nodeid != ROOT || strcmp(arg, "volume") != 0)
            return -ENOENT;
        memset(e, 0, sizeof *e);
        e->nodeid = FILE_INO;
        e->generation = 1;
        e->entry_valid = e->attr_valid = 3600;
        attr(&e->attr, FILE_INO);
        return sizeof *e;
    }
    case FUSE_GETATTR:
    case FUSE_SETATTR: {
        struct fuse_attr_out *a = (void *)out;
        memset(a, 0, sizeof *a);
        a->attr_valid = 3600;
        attr(&a->attr, in->nodeid);
        return sizeof *a;
    }
    case FUSE_OPEN:
    case FUSE_OPENDIR: {
        struct fuse_open_out *o = (void *)out;
        memset(o, 0, sizeof *o);
        o->open_flags = 1u << 6; /* FOPEN_PARALLEL_DIRECT_WRITES */
        return sizeof *o;
    }
    case FUSE_STATFS: {
        struct fuse_statfs_out *s = (void *)out;
        memset(s, 0, sizeof *s);
        s->st.bsize = s->st.frsize = 4096;
        s->st.namelen = 255;
        return sizeof *s;
    }
    case FUSE_FLUSH:
    case FUSE_FSYNC:
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:
    case FUSE_ACCESS:
    case FUSE_FALLOCATE:
        return 0;
    default:
        return -ENOSYS;
    }
}

static int init_reply(const struct fuse_in_header *in, const struct fuse_init_in *i, char *out,
                      int uring) {
    struct fuse_init_out *o = (void *)out;
    uint64_t want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES |
                    FUSE_INIT_EXT;
    uint64_t offered = i->flags;
    (void)in;
    if (i->flags & FUSE_INIT_EXT)
        offered |= (uint64_t)i->flags2 << 32;
    if (uring)
        want |= OVER_IO_URING;
    want &= offered;
    if (uring && !(want & OVER_IO_URING)) {
        fprintf(stderr, "the kernel does not offer FUSE over io_uring\n");
        exit(2);
    }
    memset(o, 0, sizeof *o);
    o->major = 7;
    o->minor = i->minor < 42 ? i->minor : 42;
    o->max_readahead = i->max_readahead;
    o->flags = (uint32_t)want;
    o->flags2 = (uint32_t)(want >> 32);
    o->max_background = 64;
    o->congestion_threshold = 48;
    o->max_write = MAX_WRITE;
    o->time_gran = 1;
    o->max_pages = MAX_WRITE / 4096;
    return sizeof *o;
}

/* -- /dev/fuse ------------------------------------------------------------------------- */

static int initialized;
static unsigned long served_dev, served_ring; /* requests answered each way */

/* Serve /dev/fuse until it is unmounted; with stop_after_init, return once INIT is answered. */
static void serve_dev(int uring, int stop_after_init) {
    char *buf = malloc(BUFFER), *out = malloc(BUFFER);
    if (!buf || !out)
        fail("malloc");
    for (;;) {
        ssize_t n = read(fuse_fd, buf, BUFFER);
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT || errno == EAGAIN)
                continue;
            if (errno == ENODEV)
                break;
            fail("read /dev/fuse");
        }
        struct fuse_in_header *in = (void *)buf;
        if ((size_t)n < sizeof *in)
            continue;
        if (in->opcode == FUSE_FORGET || in->opcode == FUSE_BATCH_FORGET ||
            in->opcode == FUSE_INTERRUPT)
            continue;
        int r;
        __atomic_fetch_add(&served_dev, 1, __ATOMIC_RELAXED);
        if (in->opcode == FUSE_INIT)
            r = init_reply(in, (void *)(in + 1), out + sizeof(struct fuse_out_header), uring);
        else
            r = answer(in, in + 1, out + sizeof(struct fuse_out_header));
        struct fuse_out_header *oh = (void *)out;
        oh->unique = in->unique;
        oh->error = r < 0 ? r : 0;
        oh->len = sizeof *oh + (r < 0 ? 0 : r);
        if (write(fuse_fd, out, oh->len) < 0 && errno != ENOENT) {
            if (errno == ENODEV)
                break;
            fail("write /dev/fuse");
        }
        if (in->opcode == FUSE_INIT) {
            __atomic_store_n(&initialized, 1, __ATOMIC_RELEASE);
            if (stop_after_init)
                break;
        }
    }
    free(buf);
    free(out);
}

static void *dev_thread(void *arg) {
    (void)arg;
    serve_dev(1, 0);
    return NULL;
}

/* -- io_uring -------------------------------------------------------------------------- */

struct ring {
    int fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes; /* 128-byte entries: index with sqe_at() */
    struct io_uring_cqe *cqes;
    unsigned sq_entries;
};

struct entry {
    struct uring_req_header header;
    struct iovec iov[2];
    uint16_t qid;
};

static struct io_uring_sqe *sqe_at(struct ring *r, unsigned index) {
    return (struct io_uring_sqe *)((char *)r->sqes + 128 * (size_t)index);
}

static void ring_setup(struct ring *r, unsigned entries) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SQE128;
    r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (r->fd < 0)
        fail("io_uring_setup");
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                    IORING_OFF_SQ_RING);
    char *cq = mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                    IORING_OFF_CQ_RING);
    void *sqes = mmap(NULL, 128 * (size_t)p.sq_entries, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED)
        fail("mmap io_uring");
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->sqes = sqes;
    r->sq_entries = p.sq_entries;
}

/* Queue one command for entry E (not yet submitted). */
static void queue_cmd(struct ring *r, struct entry *e, unsigned op, uint64_t commit_id) {
    unsigned tail = *r->sq_tail, index = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = sqe_at(r, index);
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fuse_fd;
    sqe->cmd_op = op;
    sqe->addr = (uint64_t)(uintptr_t)e->iov;
    sqe->len = 2;
    sqe->user_data = (uint64_t)(uintptr_t)e;
    struct uring_cmd_req *req = (void *)sqe->cmd;
    req->commit_id = commit_id;
    req->qid = e->qid;
    r->sq_array[index] = index;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
}

static int enter(struct ring *r, unsigned submit, unsigned wait) {
    for (;;) {
        int n = (int)syscall(__NR_io_uring_enter, r->fd, submit, wait,
                             wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
        if (n >= 0 || errno != EINTR)
            return n;
    }
}

static void serve_uring(unsigned per_queue) {
    unsigned queues = (unsigned)get_nprocs_conf(), count = queues * per_queue;
    struct ring r;
    unsigned ring_size = 1;
    while (ring_size < count)
        ring_size <<= 1;
    ring_setup(&r, ring_size);
    struct entry *entries = calloc(count, sizeof *entries);
    if (!entries)
        fail("calloc");
    for (unsigned k = 0; k < count; k++) {
        struct entry *e = &entries[k];
        void *payload = mmap(NULL, BUFFER, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                             -1, 0);
        if (payload == MAP_FAILED)
            fail("mmap payload");
        e->qid = (uint16_t)(k % queues);
        e->iov[0].iov_base = &e->header;
        e->iov[0].iov_len = sizeof e->header;
        e->iov[1].iov_base = payload;
        e->iov[1].iov_len = BUFFER;
        queue_cmd(&r, e, URING_CMD_REGISTER, 0);
    }
    if (enter(&r, count, 0) < 0)
        fail("io_uring_enter (register)");
    fprintf(stderr, "fuse_transport: %u ring entries on %u queues\n", count, queues);
    fflush(stderr);
    for (;;) {
        if (enter(&r, 0, 1) < 0)
            fail("io_uring_enter");
        unsigned head = *r.cq_head, tail = __atomic_load_n(r.cq_tail, __ATOMIC_ACQUIRE);
        unsigned submit = 0;
        for (; head != tail; head++) {
            struct io_uring_cqe *cqe = &r.cqes[head & *r.cq_mask];
            struct entry *e = (void *)(uintptr_t)cqe->user_data;
            if (cqe->res < 0) {
                if (cqe->res == -ENOTCONN || cqe->res == -ECONNABORTED ||
                    cqe->res == -ECANCELED || cqe->res == -ENODEV) {
                    __atomic_store_n(r.cq_head, head + 1, __ATOMIC_RELEASE);
                    fprintf(stderr, "fuse_transport: %lu requests through the ring, %lu "
                            "through /dev/fuse\n", served_ring,
                            __atomic_load_n(&served_dev, __ATOMIC_RELAXED));
                    return; /* unmounted */
                }
                errno = -cqe->res;
                fail("ring entry");
            }
            struct fuse_in_header *in = (void *)e->header.in_out;
            uint64_t commit_id = e->header.ent.commit_id;
            const void *arg = in->opcode == FUSE_LOOKUP ? e->iov[1].iov_base
                                                         : (void *)e->header.op_in;
            int n = answer(in, arg, e->iov[1].iov_base);
            served_ring++;
            struct fuse_out_header *oh = (void *)e->header.in_out;
            uint64_t unique = in->unique;
            oh->unique = unique;
            oh->error = n < 0 ? n : 0;
            oh->len = sizeof *oh + (n < 0 ? 0 : n);
            e->header.ent.payload_sz = n < 0 ? 0 : (uint32_t)n;
            queue_cmd(&r, e, URING_CMD_COMMIT_AND_FETCH, commit_id);
            submit++;
        }
        __atomic_store_n(r.cq_head, head, __ATOMIC_RELEASE);
        if (submit && enter(&r, submit, 0) < 0)
            fail("io_uring_enter (commit)");
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s dev|uring MOUNTPOINT SIZE [ENTRIES]\n", argv[0]);
        return 2;
    }
    int uring = strcmp(argv[1], "uring") == 0;
    size = strtoull(argv[3], NULL, 0);
    unsigned per_queue = argc > 4 ? (unsigned)atoi(argv[4]) : 32;
    fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fuse_fd < 0)
        fail("open /dev/fuse");
    char options[128];
    snprintf(options, sizeof options,
             "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", fuse_fd);
    if (mount("null", argv[2], "fuse.null", MS_NOSUID | MS_NODEV, options) < 0)
        fail("mount");
    if (!uring) {
        serve_dev(0, 0);
        return 0;
    }
    serve_dev(1, 1); /* INIT, through /dev/fuse */
    pthread_t thread;
    if (pthread_create(&thread, NULL, dev_thread, NULL))
        fail("pthread_create");
    serve_uring(per_queue);
    return 0;
}
