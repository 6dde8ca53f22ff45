/* rdmaio native data path for the software ("tcp") transport.
 *
 * Theory of operation
 * -------------------
 * A *worker* owns an epoll set, a completion queue (plain arrays) and a lock.
 * One call to rio_worker_poll() is one progress round: it blocks in
 * epoll_wait() (the GIL is released by cffi), then, under the worker lock,
 * services every ready connection and returns how many completions/events it
 * collected.  The Python side hands that batch to the event loop in one
 * wake-up.
 *
 * A *responder* connection is the target side of a queue pair: it parses
 * requests and executes READ / WRITE / atomics directly on registered memory,
 * after checking the key, bounds and access rights against the region table.
 * No Python code runs per request.  Read payloads are sent with sendmsg()
 * straight from registered memory (small ones are copied into the output
 * buffer, which is cheaper than an extra iovec); write payloads are received
 * straight into registered memory.
 *
 * An *initiator* connection is the requester side.  The event-loop thread
 * posts requests (rio_post_*) and flushes them; the worker reads responses and
 * scatters read payloads straight into the local buffers recorded in the
 * request's slot, then records a completion.  Slots are owned by the poster
 * until the completion is recorded, then handed back through Python.
 *
 * Invariants
 * - A responder touches region memory only between busy++ and busy-- on the
 *   region entry, after re-checking valid && key under busy.  A region whose
 *   busy count is non-zero is never released (Python defers the release).
 * - An initiator writes into local memory only for an active slot whose wr_id
 *   matches the response, and only the number of bytes the slot expects.
 * - Any malformed input marks the connection dead with a protocol error; it
 *   never touches memory outside a region or a slot's buffers.
 * - A closed conn is freed only after every worker that could see it has
 *   finished a round after the close (graveyard + reference count).
 *
 * Same-host single copy ("pulled" writes).  On a UNIX-socket connection
 * whose responder may read the initiator's memory (process_vm_readv; checked
 * at attach time, see transports/tcp.py), a large WRITE / WRITE_IMM carries no
 * payload: the responder validates it as usual, then copies the bytes from the
 * initiator's buffer straight into region memory.  One copy instead of two
 * (into the socket, out of it), and none by the initiator.  The buffer's
 * lifetime is the initiator's usual contract (untouched until the
 * completion); after the initiator closes the connection (and may release its
 * memory) a pull still queued must not land, so each pulled request names a
 * generation word in the initiator's memory and its value at posting time:
 * the responder reads it before and after the copy, and a changed value turns
 * the write into an error, without its immediate.  rio_conn_close bumps the
 * word before the initiator can release anything.
 *
 * Wire layout (little-endian; see rdmaio/_wire.py for the reference codec):
 *   request  48 B: u8 op, u8 flags, u16 0, u32 count, u64 wr_id, u64 key,
 *                  u64 remote, u64 arg0, u64 arg1
 *            batch ops append count x {u64 remote, u64 length};
 *            writes append the payload, or with flag PULL (1; WRITE and
 *            WRITE_IMM only) 24 B {u64 source address, u64 generation word
 *            address, u64 generation} in the initiator's memory.
 *   response 24 B: u8 op, u8 status, u16 0, u32 0, u64 wr_id, u64 value
 *            successful reads append `value` payload bytes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "rdmaio's native data path assumes a little-endian host"
#endif

#define RIO_OP_READ 1
#define RIO_OP_WRITE 2
#define RIO_OP_FETCH_ADD 3
#define RIO_OP_CMP_SWAP 4
#define RIO_OP_READ_BATCH 5
#define RIO_OP_WRITE_BATCH 6
#define RIO_OP_NOP 7
#define RIO_OP_WRITE_IMM 8 /* WRITE, then a receive event (conn, imm) at the target */

#define RIO_ST_OK 0
#define RIO_ST_INV_KEY 1
#define RIO_ST_ACCESS 2
#define RIO_ST_BOUNDS 3
#define RIO_ST_ALIGN 4
#define RIO_ST_INV_REQ 5

#define RIO_PE_BAD_OP 1
#define RIO_PE_BAD_COUNT 2
#define RIO_PE_TOO_BIG 3
#define RIO_PE_BAD_WR 4
#define RIO_PE_BAD_LEN 5
#define RIO_PE_NOMEM 6
#define RIO_PE_MISUSE 7

#define RIO_F_PULL 1u /* request flag: the payload is pulled from the initiator's memory */
#define PULL_TRAILER 24
#define PULL_SLOTS 4096u /* initiators that post pulled writes at once (per process) */

#define RIO_ACC_READ 1u
#define RIO_ACC_WRITE 2u
#define RIO_ACC_ATOMIC 4u

#define REQ_HDR 48
#define RESP_HDR 24
#define ENTRY 16
#define MAX_BATCH 65536u
#define MAX_OP_BYTES (1ull << 30)
#define INBUF 65536
#define DIRECT_MIN 8192
#define SMALL_COPY 2048
#define OUT_HIGH (8u << 20)
#define MAX_IOV 512
#define ROUND_BYTES (4u << 20)

#define KIND_RESPONDER 1
#define KIND_INITIATOR 2

#define WAKE_TOKEN 0

typedef struct rio_rtable rio_rtable;
typedef struct rio_worker rio_worker;
typedef struct rio_conn rio_conn;

int rio_worker_wake(rio_worker *w);
void rio_worker_free(rio_worker *w);

/* ------------------------------------------------------------------------ */
/* region table                                                             */

typedef struct {
    uint64_t key; /* 0: never used */
    uint64_t addr;
    uint64_t length;
    uint32_t access;
    int32_t valid;
    int64_t busy;
} rio_region;

struct rio_rtable {
    uint32_t capacity; /* power of two */
    rio_region *e;
};

rio_rtable *rio_rtable_new(uint32_t capacity) {
    uint32_t cap = 16;
    while (cap < capacity * 2u && cap < (1u << 30)) cap <<= 1;
    rio_rtable *t = calloc(1, sizeof(*t));
    if (!t) return NULL;
    t->e = calloc(cap, sizeof(rio_region));
    if (!t->e) { free(t); return NULL; }
    t->capacity = cap;
    return t;
}

void rio_rtable_free(rio_rtable *t) {
    if (!t) return;
    free(t->e);
    free(t);
}

static inline uint32_t key_hash(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (uint32_t)k;
}

/* Called with the GIL held (Python serialises registration). */
int32_t rio_rtable_insert(rio_rtable *t, uint64_t key, uint64_t addr, uint64_t length, uint32_t access) {
    if (key == 0) return -1;
    uint32_t mask = t->capacity - 1;
    uint32_t i = key_hash(key) & mask;
    for (uint32_t n = 0; n < t->capacity; n++, i = (i + 1) & mask) {
        rio_region *r = &t->e[i];
        uint64_t k = __atomic_load_n(&r->key, __ATOMIC_ACQUIRE);
        int reusable = (k == 0) || (__atomic_load_n(&r->valid, __ATOMIC_SEQ_CST) == 0 &&
                                    __atomic_load_n(&r->busy, __ATOMIC_SEQ_CST) == 0);
        if (!reusable) continue;
        __atomic_store_n(&r->valid, 0, __ATOMIC_SEQ_CST);
        r->addr = addr;
        r->length = length;
        r->access = access;
        __atomic_store_n(&r->key, key, __ATOMIC_SEQ_CST);
        __atomic_store_n(&r->valid, 1, __ATOMIC_SEQ_CST);
        return (int32_t)i;
    }
    return -1;
}

void rio_rtable_invalidate(rio_rtable *t, int32_t index) {
    if (index < 0 || (uint32_t)index >= t->capacity) return;
    __atomic_store_n(&t->e[index].valid, 0, __ATOMIC_SEQ_CST);
}

int64_t rio_rtable_busy(rio_rtable *t, int32_t index) {
    if (index < 0 || (uint32_t)index >= t->capacity) return 0;
    return __atomic_load_n(&t->e[index].busy, __ATOMIC_SEQ_CST);
}

/* Find a valid region for key and take a busy reference on it. */
static rio_region *region_acquire(rio_rtable *t, uint64_t key) {
    if (key == 0) return NULL;
    uint32_t mask = t->capacity - 1;
    uint32_t i = key_hash(key) & mask;
    for (uint32_t n = 0; n < t->capacity; n++, i = (i + 1) & mask) {
        rio_region *r = &t->e[i];
        uint64_t k = __atomic_load_n(&r->key, __ATOMIC_ACQUIRE);
        if (k == 0) return NULL; /* end of the probe chain */
        if (k != key) continue;
        __atomic_add_fetch(&r->busy, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&r->valid, __ATOMIC_SEQ_CST) &&
            __atomic_load_n(&r->key, __ATOMIC_SEQ_CST) == key)
            return r;
        __atomic_sub_fetch(&r->busy, 1, __ATOMIC_SEQ_CST);
        return NULL;
    }
    return NULL;
}

static inline void region_release(rio_region *r) {
    if (r) __atomic_sub_fetch(&r->busy, 1, __ATOMIC_SEQ_CST);
}

/* ------------------------------------------------------------------------ */
/* connections                                                              */

typedef struct {
    uint64_t base; /* pointer into memory, or offset into obuf when region == BUF_SEG */
    uint64_t len;
    rio_region *region; /* busy reference released once sent */
    int is_buf;
} seg_t;

typedef struct {
    uint64_t wr_id;
    int op;
    int active;
    uint64_t expect; /* payload bytes a successful read brings */
    const uint64_t *sge_addr;
    const uint64_t *sge_len;
    uint32_t nsge;
    uint64_t one_addr, one_len; /* inline sge for single reads */
} slot_t;

enum { IN_HDR = 0, IN_ENTRIES, IN_PAYLOAD, IN_PULL };

struct rio_conn {
    int fd;
    uint32_t id;
    int kind;
    int dead;
    uint32_t sq_depth;
    uint64_t out_pending;
    uint64_t ops_served;
    uint64_t ops_pulled;   /* responder: writes whose payload it pulled; initiator: pulled writes posted */
    /* private */
    int32_t pull_pid;      /* responder: the initiator's pid, whose memory pulled writes read (0: refused) */
    uint64_t pull_min;     /* initiator: writes of at least this many bytes are posted pulled (0: never) */
    int32_t gen_slot;      /* initiator: its generation word in pull_gens (-1: none) */
    rio_rtable *rt;
    pthread_mutex_t in_lock;
    int closed;
    int nref;              /* workers attached */
    rio_worker *workers[8];
    int nworkers;
    int want_out;          /* EPOLLOUT registered (responder) */
    int in_paused;         /* EPOLLIN removed for backpressure (responder) */
    /* input */
    uint8_t *in;
    uint32_t in_len, in_pos;
    int in_state;
    uint8_t hdr[REQ_HDR];
    /* current request (responder) */
    int r_op;
    int r_pull;
    uint64_t round_pulled; /* bytes pulled since the round (or feed) began: counts against ROUND_BYTES */
    uint8_t r_trailer[PULL_TRAILER];
    uint32_t r_trailer_have;
    uint32_t r_count;
    uint64_t r_wr, r_key, r_remote, r_arg0, r_arg1;
    uint8_t *ebuf;
    uint32_t ebuf_cap, ebuf_have;
    /* payload sink: a list of (ptr, len) destinations, or discard */
    uint64_t p_left;       /* bytes of payload still to consume */
    uint64_t p_seg_left;   /* bytes left in the current destination */
    uint64_t p_ptr;        /* current destination pointer (0: discard) */
    uint32_t p_idx;        /* destination index */
    int p_status;          /* responder: status to send when done */
    rio_region *p_region;  /* responder: region the payload lands in */
    slot_t *p_slot;        /* initiator: slot whose sges receive the payload */
    /* output */
    uint8_t *obuf;
    uint64_t ob_len, ob_cap;
    seg_t *segs;
    uint32_t nseg, seg_head, seg_cap;
    uint64_t seg_off; /* bytes of segs[seg_head] already sent */
    uint32_t nregion_segs; /* queued segments that reference region memory */
    /* initiator slots */
    slot_t *slots;
};

typedef struct grave {
    rio_conn *c;
    struct grave *next;
} grave_t;

struct rio_worker {
    /* public (mirrored in rio.h) */
    int epfd;
    int wakefd;
    uint32_t ncq;
    uint32_t cq_cap;
    uint32_t *cq_conn;
    uint64_t *cq_wr;
    int32_t *cq_status;
    uint64_t *cq_value;
    uint32_t nev;
    uint32_t ev_cap;
    uint32_t *ev_conn;
    int32_t *ev_code;
    uint32_t woken;
    uint64_t rounds;
    uint32_t spin_us;
    uint32_t nrx;
    uint32_t rx_cap;
    uint32_t *rx_conn;
    uint32_t *rx_imm;
    uint64_t spins;
    uint64_t spin_hits;
    uint64_t spin_skips;
    /* private */
    int did_work;
    uint32_t spin_misses;  /* waits in a row after a busy round longer than 8 x spin_us (at most 4) */
    pthread_mutex_t lock;
    grave_t *graves;
    rio_conn **backlog;
    uint32_t nbacklog, backlog_cap;
};


static int ensure_ev(rio_worker *w) {
    if (w->nev < w->ev_cap) return 0;
    uint32_t cap = w->ev_cap ? w->ev_cap * 2 : 64;
    uint32_t *c = realloc(w->ev_conn, cap * sizeof(uint32_t));
    if (!c) return -1;
    w->ev_conn = c;
    int32_t *e = realloc(w->ev_code, cap * sizeof(int32_t));
    if (!e) return -1;
    w->ev_code = e;
    w->ev_cap = cap;
    return 0;
}

static void conn_set_events(rio_conn *c);

/* a WRITE_IMM landed: tell the target's application (like a receive completion) */
static int record_rx(rio_worker *w, uint32_t conn, uint32_t imm) {
    if (!w) return 0;
    if (w->nrx == w->rx_cap) {
        uint32_t cap = w->rx_cap ? w->rx_cap * 2 : 64;
        uint32_t *c = realloc(w->rx_conn, cap * sizeof(uint32_t));
        if (!c) return -RIO_PE_NOMEM;
        w->rx_conn = c;
        uint32_t *i = realloc(w->rx_imm, cap * sizeof(uint32_t));
        if (!i) return -RIO_PE_NOMEM;
        w->rx_imm = i;
        w->rx_cap = cap;
    }
    w->rx_conn[w->nrx] = conn;
    w->rx_imm[w->nrx] = imm;
    w->nrx++;
    return 0;
}

static void mark_dead(rio_worker *w, rio_conn *c, int code) {
    if (c->dead) return;
    c->dead = code == 0 ? -1000 : code; /* -1000: EOF */
    for (int i = 0; i < c->nworkers; i++) epoll_ctl(c->workers[i]->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    if (w && ensure_ev(w) == 0) {
        w->ev_conn[w->nev] = c->id;
        w->ev_code[w->nev] = code;
        w->nev++;
    }
    if (c->kind == KIND_RESPONDER) {
        /* the worker owns a responder's output: drop it and the region
         * references it holds.  An initiator's output belongs to the posting
         * thread and is left alone (it is freed with the conn). */
        for (uint32_t i = c->seg_head; i < c->nseg; i++) {
            region_release(c->segs[i].region);
            c->segs[i].region = NULL;
        }
        c->seg_head = c->nseg = 0;
        c->ob_len = 0;
        c->out_pending = 0;
        c->nregion_segs = 0;
    }
    region_release(c->p_region);
    c->p_region = NULL;
}

/* Generation words of initiators that post pulled writes: never freed (a
 * responder may read one after its connection is gone); a slot is reused
 * after its word was bumped, so requests posted under an old value fail. */
static uint64_t pull_gens[PULL_SLOTS];
static uint32_t pull_free[PULL_SLOTS];
static uint32_t pull_nfree;
static int pull_init;
static pthread_mutex_t pull_lock = PTHREAD_MUTEX_INITIALIZER;

static int32_t gen_slot_take(void) {
    int32_t slot = -1;
    pthread_mutex_lock(&pull_lock);
    if (!pull_init) {
        for (uint32_t i = 0; i < PULL_SLOTS; i++) pull_free[i] = PULL_SLOTS - 1 - i;
        pull_nfree = PULL_SLOTS;
        pull_init = 1;
    }
    if (pull_nfree) slot = (int32_t)pull_free[--pull_nfree];
    pthread_mutex_unlock(&pull_lock);
    return slot;
}

/* end every pull posted under the slot's current value, then give the slot back */
static void gen_slot_give(int32_t slot) {
    __atomic_add_fetch(&pull_gens[slot], 1, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&pull_lock);
    pull_free[pull_nfree++] = (uint32_t)slot;
    pthread_mutex_unlock(&pull_lock);
}

rio_conn *rio_conn_new(int fd, uint32_t id, int kind, rio_rtable *t, uint32_t sq_depth) {
    rio_conn *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    c->gen_slot = -1;
    c->fd = fd;
    c->id = id;
    c->kind = kind;
    c->rt = t;
    c->sq_depth = sq_depth;
    pthread_mutex_init(&c->in_lock, NULL);
    c->in = malloc(INBUF);
    c->ob_cap = 4096;
    c->obuf = malloc(c->ob_cap);
    c->seg_cap = 64;
    c->segs = malloc(c->seg_cap * sizeof(seg_t));
    if (kind == KIND_INITIATOR && sq_depth) c->slots = calloc(sq_depth, sizeof(slot_t));
    if (!c->in || !c->obuf || !c->segs || (kind == KIND_INITIATOR && sq_depth && !c->slots)) {
        free(c->in); free(c->obuf); free(c->segs); free(c->slots); free(c);
        return NULL;
    }
    return c;
}

static void conn_free(rio_conn *c) {
    for (uint32_t i = c->seg_head; i < c->nseg; i++) region_release(c->segs[i].region);
    region_release(c->p_region);
    pthread_mutex_destroy(&c->in_lock);
    free(c->in); free(c->obuf); free(c->segs); free(c->slots); free(c->ebuf);
    free(c);
}

int rio_conn_attach(rio_conn *c, rio_worker *w) {
    if (c->nworkers >= 8) return -EINVAL;
    rio_worker *p = w;
    pthread_mutex_lock(&p->lock);
    struct epoll_event ev = {0};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.ptr = c;
    int rc = epoll_ctl(w->epfd, EPOLL_CTL_ADD, c->fd, &ev);
    if (rc == 0) {
        c->workers[c->nworkers++] = w;
        c->nref++;
    }
    pthread_mutex_unlock(&p->lock);
    return rc == 0 ? 0 : -errno;
}

int rio_conn_pull(rio_conn *c, int32_t pid, uint64_t min_bytes) {
    if (c->closed) return -RIO_PE_MISUSE;
    if (c->kind == KIND_RESPONDER) {
        if (pid < 0) return -RIO_PE_MISUSE;
        c->pull_pid = pid;
        return 0;
    }
    if (c->gen_slot < 0 && min_bytes) {
        c->gen_slot = gen_slot_take();
        if (c->gen_slot < 0) return -RIO_PE_NOMEM;
    }
    c->pull_min = min_bytes;
    return 0;
}

void rio_conn_close(rio_conn *c) {
    if (c->closed) return;
    /* before the caller may release local memory: pulls still queued at the peer fail */
    if (c->gen_slot >= 0) {
        gen_slot_give(c->gen_slot);
        c->gen_slot = -1;
    }
    int n = c->nworkers;
    if (n == 0) {
        c->closed = 1;
        conn_free(c);
        return;
    }
    for (int i = 0; i < n; i++) {
        rio_worker *w = c->workers[i];
        rio_worker *p = w;
        pthread_mutex_lock(&p->lock);
        c->closed = 1;
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        for (uint32_t j = 0; j < p->nbacklog; j++) {
            if (p->backlog[j] == c) {
                p->backlog[j] = p->backlog[--p->nbacklog];
                break;
            }
        }
        grave_t *g = malloc(sizeof(*g));
        if (g) {
            g->c = c;
            g->next = p->graves;
            p->graves = g;
        }
        pthread_mutex_unlock(&p->lock);
        rio_worker_wake(w);
    }
}

static void bury(rio_worker *w) {
    rio_worker *p = w;
    grave_t *g = p->graves;
    p->graves = NULL;
    while (g) {
        grave_t *next = g->next;
        if (__atomic_sub_fetch(&g->c->nref, 1, __ATOMIC_SEQ_CST) == 0) conn_free(g->c);
        free(g);
        g = next;
    }
}

/* ---- output queue --------------------------------------------------------- */

static int ob_reserve(rio_conn *c, uint64_t n) {
    if (c->ob_len + n <= c->ob_cap) return 0;
    uint64_t cap = c->ob_cap;
    while (cap < c->ob_len + n) cap *= 2;
    uint8_t *b = realloc(c->obuf, cap);
    if (!b) return -1;
    c->obuf = b;
    c->ob_cap = cap;
    return 0;
}

static int seg_push(rio_conn *c, uint64_t base, uint64_t len, rio_region *region, int is_buf) {
    if (len == 0) return 0;
    seg_t *last = c->nseg > c->seg_head ? &c->segs[c->nseg - 1] : NULL;
    if (last && last->is_buf == is_buf && last->region == NULL && region == NULL &&
        last->base + last->len == base) {
        last->len += len; /* merge adjacent pieces */
        c->out_pending += len;
        return 0;
    }
    if (c->nseg == c->seg_cap) {
        if (c->seg_head > 0) {
            memmove(c->segs, c->segs + c->seg_head, (c->nseg - c->seg_head) * sizeof(seg_t));
            c->nseg -= c->seg_head;
            c->seg_head = 0;
        }
        if (c->nseg == c->seg_cap) {
            seg_t *s = realloc(c->segs, c->seg_cap * 2 * sizeof(seg_t));
            if (!s) return -1;
            c->segs = s;
            c->seg_cap *= 2;
        }
    }
    c->segs[c->nseg].base = base;
    c->segs[c->nseg].len = len;
    c->segs[c->nseg].region = region;
    c->segs[c->nseg].is_buf = is_buf;
    c->nseg++;
    if (region) c->nregion_segs++;
    c->out_pending += len;
    return 0;
}

/* append bytes to obuf and queue them */
static int out_bytes(rio_conn *c, const void *data, uint64_t n) {
    if (ob_reserve(c, n)) return -1;
    uint64_t off = c->ob_len;
    memcpy(c->obuf + off, data, n);
    c->ob_len += n;
    return seg_push(c, off, n, NULL, 1);
}

static void out_reset_if_empty(rio_conn *c) {
    if (c->seg_head == c->nseg) {
        c->seg_head = c->nseg = 0;
        c->seg_off = 0;
        c->ob_len = 0;
        c->out_pending = 0;
    }
}

/* 0: all sent, 1: pending, <0: -errno */
static int out_flush(rio_conn *c) {
    struct iovec iov[MAX_IOV];
    while (c->seg_head < c->nseg) {
        int n = 0;
        for (uint32_t i = c->seg_head; i < c->nseg && n < MAX_IOV; i++, n++) {
            seg_t *s = &c->segs[i];
            uint64_t skip = (i == c->seg_head) ? c->seg_off : 0;
            uint8_t *p = s->is_buf ? c->obuf + s->base : (uint8_t *)(uintptr_t)s->base;
            iov[n].iov_base = p + skip;
            iov[n].iov_len = s->len - skip;
        }
        struct msghdr mh = {0};
        mh.msg_iov = iov;
        mh.msg_iovlen = n;
        ssize_t sent = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 1;
            return -errno;
        }
        uint64_t left = (uint64_t)sent;
        c->out_pending -= left;
        while (left > 0) {
            seg_t *s = &c->segs[c->seg_head];
            uint64_t rem = s->len - c->seg_off;
            if (left >= rem) {
                left -= rem;
                if (s->region) c->nregion_segs--;
                region_release(s->region);
                s->region = NULL;
                c->seg_head++;
                c->seg_off = 0;
            } else {
                c->seg_off += left;
                left = 0;
            }
        }
    }
    out_reset_if_empty(c);
    return 0;
}

int rio_flush(rio_conn *c) {
    if (c->dead) return -EPIPE;
    return out_flush(c);
}

uint64_t rio_take_output(rio_conn *c, uint8_t *out, uint64_t cap) {
    uint64_t done = 0;
    while (c->seg_head < c->nseg && done < cap) {
        seg_t *s = &c->segs[c->seg_head];
        uint8_t *p = s->is_buf ? c->obuf + s->base : (uint8_t *)(uintptr_t)s->base;
        uint64_t rem = s->len - c->seg_off;
        uint64_t n = rem < cap - done ? rem : cap - done;
        memcpy(out + done, p + c->seg_off, n);
        done += n;
        c->out_pending -= n;
        if (n == rem) {
            if (s->region) c->nregion_segs--;
            region_release(s->region);
            s->region = NULL;
            c->seg_head++;
            c->seg_off = 0;
        } else {
            c->seg_off += n;
        }
    }
    out_reset_if_empty(c);
    return done;
}

/* ---- little-endian field access ------------------------------------------- */

static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

static int respond(rio_conn *c, int op, int status, uint64_t wr, uint64_t value) {
    uint8_t h[RESP_HDR] = {0};
    h[0] = (uint8_t)op;
    h[1] = (uint8_t)status;
    st64(h + 8, wr);
    st64(h + 16, value);
    return out_bytes(c, h, RESP_HDR);
}

/* ---- responder ------------------------------------------------------------ */

static int check_range(rio_region *r, uint64_t off, uint64_t len) {
    return off <= r->length && len <= r->length - off;
}

/* Validate the current request against the region table.  On success *rp
 * holds a busy reference the caller must pass on or release. */
static int validate(rio_conn *c, uint32_t need_access, rio_region **rp) {
    *rp = NULL;
    rio_region *r = region_acquire(c->rt, c->r_key);
    if (!r) return RIO_ST_INV_KEY;
    if ((r->access & need_access) != need_access) { region_release(r); return RIO_ST_ACCESS; }
    if (c->r_op == RIO_OP_READ_BATCH || c->r_op == RIO_OP_WRITE_BATCH) {
        for (uint32_t i = 0; i < c->r_count; i++) {
            uint64_t off = ld64(c->ebuf + i * ENTRY), len = ld64(c->ebuf + i * ENTRY + 8);
            if (!check_range(r, off, len)) { region_release(r); return RIO_ST_BOUNDS; }
        }
    } else {
        uint64_t len = (c->r_op == RIO_OP_READ || c->r_op == RIO_OP_WRITE || c->r_op == RIO_OP_WRITE_IMM)
                           ? c->r_arg0 : 8;
        if (!check_range(r, c->r_remote, len)) { region_release(r); return RIO_ST_BOUNDS; }
        if ((c->r_op == RIO_OP_FETCH_ADD || c->r_op == RIO_OP_CMP_SWAP) && ((r->addr + c->r_remote) & 7)) {
            region_release(r);
            return RIO_ST_ALIGN;
        }
    }
    *rp = r;
    return RIO_ST_OK;
}

static uint64_t batch_total(rio_conn *c) {
    uint64_t t = 0;
    for (uint32_t i = 0; i < c->r_count; i++) t += ld64(c->ebuf + i * ENTRY + 8);
    return t;
}

/* queue a read response: header + payload pieces from region memory */
static int queue_read(rio_conn *c, rio_region *r) {
    uint64_t total = c->r_op == RIO_OP_READ ? c->r_arg0 : batch_total(c);
    if (respond(c, c->r_op, RIO_ST_OK, c->r_wr, total)) return -1;
    uint32_t n = c->r_op == RIO_OP_READ ? 1 : c->r_count;
    int holds = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t off = c->r_op == RIO_OP_READ ? c->r_remote : ld64(c->ebuf + i * ENTRY);
        uint64_t len = c->r_op == RIO_OP_READ ? c->r_arg0 : ld64(c->ebuf + i * ENTRY + 8);
        uint8_t *src = (uint8_t *)(uintptr_t)(r->addr + off);
        if (len <= SMALL_COPY) {
            if (out_bytes(c, src, len)) return -1;
        } else {
            /* zero-copy: the segment keeps the region busy until sent */
            __atomic_add_fetch(&r->busy, 1, __ATOMIC_SEQ_CST);
            if (seg_push(c, (uint64_t)(uintptr_t)src, len, r, 0)) { region_release(r); return -1; }
            holds++;
        }
    }
    (void)holds;
    return 0;
}

static int do_atomic(rio_conn *c, rio_region *r) {
    uint64_t *p = (uint64_t *)(uintptr_t)(r->addr + c->r_remote);
    uint64_t old;
    if (c->r_op == RIO_OP_FETCH_ADD) {
        old = __atomic_fetch_add(p, c->r_arg0, __ATOMIC_SEQ_CST);
    } else {
        uint64_t expected = c->r_arg0;
        __atomic_compare_exchange_n(p, &expected, c->r_arg1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        old = expected; /* on success expected is unchanged == old value */
    }
    return respond(c, c->r_op, RIO_ST_OK, c->r_wr, old);
}

/* start consuming a write payload into region memory (or discard it) */
static void start_payload(rio_conn *c, uint64_t total, rio_region *r, int status) {
    c->p_left = total;
    c->p_status = status;
    c->p_region = r;
    c->p_idx = 0;
    if (!r) {
        c->p_ptr = 0;
        c->p_seg_left = total;
    } else if (c->r_op == RIO_OP_WRITE || c->r_op == RIO_OP_WRITE_IMM) {
        c->p_ptr = r->addr + c->r_remote;
        c->p_seg_left = total;
    } else {
        c->p_ptr = 0;
        c->p_seg_left = 0;
    }
    c->in_state = IN_PAYLOAD;
}

/* Requests on one queue pair execute in order: a read's payload is the memory
 * as it was when the read executed.  Zero-copy read segments still queued are
 * therefore copied into the output buffer before a write or atomic changes
 * memory (only when both are in the queue at once: rare, and then cheap). */
static int materialize_reads(rio_conn *c) {
    if (c->nregion_segs == 0) return 0;
    for (uint32_t i = c->seg_head; i < c->nseg; i++) {
        seg_t *s = &c->segs[i];
        if (!s->region) continue;
        if (ob_reserve(c, s->len)) return -RIO_PE_NOMEM;
        memcpy(c->obuf + c->ob_len, (void *)(uintptr_t)s->base, s->len);
        s->base = c->ob_len;
        s->is_buf = 1;
        c->ob_len += s->len;
        region_release(s->region);
        s->region = NULL;
        c->nregion_segs--;
    }
    return 0;
}

static int pull_range(pid_t pid, uint64_t dst, uint64_t src, uint64_t n) {
    while (n > 0) {
        struct iovec l = {(void *)(uintptr_t)dst, n}, r = {(void *)(uintptr_t)src, n};
        ssize_t got = process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return -1;
        dst += (uint64_t)got;
        src += (uint64_t)got;
        n -= (uint64_t)got;
    }
    return 0;
}

int rio_pull_read(int32_t pid, uint64_t remote, uint8_t *out, uint64_t n) {
    if (pid <= 0) return -EINVAL;
    return pull_range((pid_t)pid, (uint64_t)(uintptr_t)out, remote, n) ? -errno : 0;
}

/* the initiator's generation word at gen_at still holds gen (it can be read, and did not move) */
static int gen_holds(pid_t pid, uint64_t gen_at, uint64_t gen) {
    uint64_t now = 0;
    return pull_range(pid, (uint64_t)(uintptr_t)&now, gen_at, 8) == 0 && now == gen;
}

/* A pulled write's payload, copied from the initiator into region r (held
 * busy): RIO_ST_OK, or RIO_ST_INV_REQ when this connection takes no pulls,
 * the initiator's memory cannot be read, or its generation word moved (the
 * initiator closed the connection: its memory may be reused). */
static int pull_payload(rio_conn *c, rio_region *r) {
    uint64_t src = ld64(c->r_trailer), gen_at = ld64(c->r_trailer + 8), gen = ld64(c->r_trailer + 16);
    pid_t pid = (pid_t)c->pull_pid;
    if (pid <= 0) return RIO_ST_INV_REQ;
    if (!gen_holds(pid, gen_at, gen)) return RIO_ST_INV_REQ;
    c->round_pulled += c->r_arg0;
    if (pull_range(pid, r->addr + c->r_remote, src, c->r_arg0)) return RIO_ST_INV_REQ;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!gen_holds(pid, gen_at, gen)) return RIO_ST_INV_REQ;
    c->ops_pulled++;
    return RIO_ST_OK;
}

/* called once a request's header (and entries) are complete */
static int responder_dispatch(rio_worker *w, rio_conn *c) {
    rio_region *r = NULL;
    int st;
    c->ops_served++;
    switch (c->r_op) {
    case RIO_OP_NOP:
        c->in_state = IN_HDR;
        return respond(c, RIO_OP_NOP, RIO_ST_OK, c->r_wr, c->r_arg0);
    case RIO_OP_READ:
    case RIO_OP_READ_BATCH:
        c->in_state = IN_HDR;
        st = validate(c, RIO_ACC_READ, &r);
        if (st != RIO_ST_OK) return respond(c, c->r_op, st, c->r_wr, 0);
        {
            int rc = queue_read(c, r);
            region_release(r);
            return rc;
        }
    case RIO_OP_FETCH_ADD:
    case RIO_OP_CMP_SWAP:
        c->in_state = IN_HDR;
        if (materialize_reads(c)) return -RIO_PE_NOMEM;
        st = validate(c, RIO_ACC_ATOMIC, &r);
        if (st != RIO_ST_OK) return respond(c, c->r_op, st, c->r_wr, 0);
        {
            int rc = do_atomic(c, r);
            region_release(r);
            return rc;
        }
    case RIO_OP_WRITE:
    case RIO_OP_WRITE_IMM:
    case RIO_OP_WRITE_BATCH: {
        uint64_t total = c->r_op == RIO_OP_WRITE_BATCH ? batch_total(c) : c->r_arg0;
        if (materialize_reads(c)) return -RIO_PE_NOMEM;
        st = validate(c, RIO_ACC_WRITE, &r);
        if (c->r_pull && st == RIO_ST_OK && total) st = pull_payload(c, r);
        if (total == 0 || c->r_pull) {
            region_release(r);
            c->in_state = IN_HDR;
            if (c->r_op == RIO_OP_WRITE_IMM && st == RIO_ST_OK && record_rx(w, c->id, (uint32_t)c->r_arg1))
                return -RIO_PE_NOMEM;
            return respond(c, c->r_op, st, c->r_wr, 0);
        }
        start_payload(c, total, st == RIO_ST_OK ? r : NULL, st);
        return 0;
    }
    }
    return -RIO_PE_BAD_OP;
}

/* advance to the next batch destination with a non-zero length */
static void payload_next_dest(rio_conn *c) {
    if (c->kind == KIND_RESPONDER) {
        while (c->p_idx < c->r_count) {
            uint64_t off = ld64(c->ebuf + c->p_idx * ENTRY), len = ld64(c->ebuf + c->p_idx * ENTRY + 8);
            c->p_idx++;
            if (len) {
                c->p_ptr = c->p_region->addr + off;
                c->p_seg_left = len;
                return;
            }
        }
    } else {
        slot_t *s = c->p_slot;
        while (c->p_idx < s->nsge) {
            uint64_t len = s->sge_len[c->p_idx], addr = s->sge_addr[c->p_idx];
            c->p_idx++;
            if (len) {
                c->p_ptr = addr;
                c->p_seg_left = len;
                return;
            }
        }
    }
}

static int payload_done(rio_worker *w, rio_conn *c);

/* sink n payload bytes from src (NULL: the bytes were already received in place) */
static int payload_consume(rio_worker *w, rio_conn *c, const uint8_t *src, uint64_t n) {
    while (n > 0) {
        if (c->p_seg_left == 0) {
            if (c->p_ptr == 0 && (c->p_region || c->p_slot)) {
                payload_next_dest(c);
            }
            if (c->p_seg_left == 0) { /* discard mode */
                c->p_seg_left = c->p_left;
                c->p_ptr = 0;
            }
        }
        uint64_t k = n < c->p_seg_left ? n : c->p_seg_left;
        if (c->p_ptr && src) memcpy((void *)(uintptr_t)c->p_ptr, src, k);
        if (c->p_ptr) c->p_ptr += k;
        if (src) src += k;
        n -= k;
        c->p_seg_left -= k;
        c->p_left -= k;
        if (c->p_seg_left == 0 && (c->p_region || c->p_slot)) c->p_ptr = 0;
        if (c->p_left == 0) {
            int rc = payload_done(w, c);
            if (rc) return rc;
            if (n) return -RIO_PE_BAD_LEN; /* callers never pass bytes past the payload */
        }
    }
    return 0;
}

static int complete(rio_worker *w, rio_conn *c, uint64_t wr, int status, uint64_t value);

static int payload_done(rio_worker *w, rio_conn *c) {
    c->in_state = IN_HDR;
    if (c->kind == KIND_RESPONDER) {
        region_release(c->p_region);
        c->p_region = NULL;
        if (c->r_op == RIO_OP_WRITE_IMM && c->p_status == RIO_ST_OK && record_rx(w, c->id, (uint32_t)c->r_arg1))
            return -RIO_PE_NOMEM;
        return respond(c, c->r_op, c->p_status, c->r_wr, 0);
    }
    slot_t *s = c->p_slot;
    c->p_slot = NULL;
    return complete(w, c, s->wr_id, RIO_ST_OK, s->expect);
}

/* ---- initiator ------------------------------------------------------------ */

static int complete(rio_worker *w, rio_conn *c, uint64_t wr, int status, uint64_t value) {
    uint32_t idx = (uint32_t)(wr & 0xffffffffu);
    if (idx < c->sq_depth) c->slots[idx].active = 0;
    if (w->ncq >= w->cq_cap) return -RIO_PE_NOMEM; /* cannot happen: checked before parsing */
    w->cq_conn[w->ncq] = c->id;
    w->cq_wr[w->ncq] = wr;
    w->cq_status[w->ncq] = status;
    w->cq_value[w->ncq] = value;
    w->ncq++;
    return 0;
}

static int initiator_header(rio_worker *w, rio_conn *c, const uint8_t *h) {
    int op = h[0], status = h[1];
    uint64_t wr = ld64(h + 8), value = ld64(h + 16);
    uint32_t idx = (uint32_t)(wr & 0xffffffffu);
    if (idx >= c->sq_depth) return -RIO_PE_BAD_WR;
    slot_t *s = &c->slots[idx];
    if (!s->active || s->wr_id != wr || s->op != op) return -RIO_PE_BAD_WR;
    if (status > RIO_ST_INV_REQ) return -RIO_PE_BAD_OP;
    if ((op == RIO_OP_READ || op == RIO_OP_READ_BATCH) && status == RIO_ST_OK) {
        if (value != s->expect) return -RIO_PE_BAD_LEN;
        if (value == 0) return complete(w, c, wr, RIO_ST_OK, 0);
        c->p_slot = s;
        c->p_left = value;
        c->p_seg_left = 0;
        c->p_ptr = 0;
        c->p_idx = 0;
        c->p_region = NULL;
        c->in_state = IN_PAYLOAD;
        payload_next_dest(c);
        return 0;
    }
    return complete(w, c, wr, status, value);
}

/* ---- input pump ------------------------------------------------------------ */

static int responder_header(rio_worker *w, rio_conn *c, const uint8_t *h) {
    c->r_op = h[0];
    if (h[1] & ~RIO_F_PULL) return -RIO_PE_BAD_OP;
    c->r_pull = h[1] & RIO_F_PULL;
    if (c->r_pull && c->r_op != RIO_OP_WRITE && c->r_op != RIO_OP_WRITE_IMM) return -RIO_PE_BAD_OP;
    c->r_count = ld32(h + 4);
    c->r_wr = ld64(h + 8);
    c->r_key = ld64(h + 16);
    c->r_remote = ld64(h + 24);
    c->r_arg0 = ld64(h + 32);
    c->r_arg1 = ld64(h + 40);
    if (c->r_op < RIO_OP_READ || c->r_op > RIO_OP_WRITE_IMM) return -RIO_PE_BAD_OP;
    if (c->r_op == RIO_OP_READ_BATCH || c->r_op == RIO_OP_WRITE_BATCH) {
        if (c->r_count == 0 || c->r_count > MAX_BATCH) return -RIO_PE_BAD_COUNT;
        uint32_t need = c->r_count * ENTRY;
        if (need > c->ebuf_cap) {
            uint8_t *b = realloc(c->ebuf, need);
            if (!b) return -RIO_PE_NOMEM;
            c->ebuf = b;
            c->ebuf_cap = need;
        }
        c->ebuf_have = 0;
        c->in_state = IN_ENTRIES;
        return 0;
    }
    if (c->r_count != 1) return -RIO_PE_BAD_COUNT;
    if ((c->r_op == RIO_OP_READ || c->r_op == RIO_OP_WRITE || c->r_op == RIO_OP_WRITE_IMM) && c->r_arg0 > MAX_OP_BYTES)
        return -RIO_PE_TOO_BIG;
    if (c->r_pull) {
        c->r_trailer_have = 0;
        c->in_state = IN_PULL;
        return 0;
    }
    return responder_dispatch(w, c);
}

static int entries_done(rio_worker *w, rio_conn *c) {
    uint64_t total = 0;
    for (uint32_t i = 0; i < c->r_count; i++) {
        uint64_t len = ld64(c->ebuf + i * ENTRY + 8);
        if (len > MAX_OP_BYTES) return -RIO_PE_TOO_BIG;
        total += len;
        if (total > MAX_OP_BYTES) return -RIO_PE_TOO_BIG;
    }
    return responder_dispatch(w, c);
}

/* Process bytes in [p, p+n); returns bytes consumed (>= 0) or -RIO_PE_*.
 * Stops early (returning fewer bytes) when the completion queue is full. */
static int64_t process(rio_worker *w, rio_conn *c, const uint8_t *p, uint64_t n) {
    uint64_t used = 0;
    while (used < n) {
        if (c->in_state == IN_PAYLOAD) {
            uint64_t k = n - used < c->p_left ? n - used : c->p_left;
            int rc = payload_consume(w, c, p + used, k);
            if (rc) return rc;
            used += k;
            continue;
        }
        if (c->in_state == IN_PULL) {
            uint32_t need = PULL_TRAILER - c->r_trailer_have;
            uint64_t k = n - used < need ? n - used : need;
            memcpy(c->r_trailer + c->r_trailer_have, p + used, k);
            c->r_trailer_have += (uint32_t)k;
            used += k;
            if (c->r_trailer_have == PULL_TRAILER) {
                int rc = responder_dispatch(w, c);
                if (rc) return rc;
            }
            continue;
        }
        if (c->in_state == IN_ENTRIES) {
            uint32_t need = c->r_count * ENTRY - c->ebuf_have;
            uint64_t k = n - used < need ? n - used : need;
            memcpy(c->ebuf + c->ebuf_have, p + used, k);
            c->ebuf_have += (uint32_t)k;
            used += k;
            if (c->ebuf_have == c->r_count * ENTRY) {
                int rc = entries_done(w, c);
                if (rc) return rc;
            }
            continue;
        }
        uint32_t hsz = c->kind == KIND_RESPONDER ? REQ_HDR : RESP_HDR;
        if (n - used < hsz) break;
        if (c->kind == KIND_INITIATOR && w->ncq >= w->cq_cap) break;
        if (c->kind == KIND_RESPONDER && c->out_pending > OUT_HIGH) break;
        /* pulled writes copy many bytes per request: they share the round's budget */
        if (c->kind == KIND_RESPONDER && c->round_pulled >= ROUND_BYTES) break;
        int rc = c->kind == KIND_RESPONDER ? responder_header(w, c, p + used) : initiator_header(w, c, p + used);
        if (rc) return rc;
        used += hsz;
    }
    return (int64_t)used;
}

int rio_feed(rio_worker *w, rio_conn *c, const uint8_t *data, uint64_t n) {
    if (c->dead) return c->dead;
    /* keep partial headers across calls, exactly like the socket path does */
    while (n > 0) {
        uint64_t room = INBUF - c->in_len;
        if (room == 0) {
            if (c->in_pos > 0) {
                memmove(c->in, c->in + c->in_pos, c->in_len - c->in_pos);
                c->in_len -= c->in_pos;
                c->in_pos = 0;
                continue;
            }
            return -RIO_PE_NOMEM;
        }
        uint64_t k = n < room ? n : room;
        memcpy(c->in + c->in_len, data, k);
        c->in_len += (uint32_t)k;
        data += k;
        n -= k;
        c->round_pulled = 0; /* no rounds here: every call may pull a round's worth */
        int64_t used = process(w, c, c->in + c->in_pos, c->in_len - c->in_pos);
        if (used < 0) {
            c->dead = (int)used;
            return (int)used;
        }
        c->in_pos += (uint32_t)used;
        if (c->in_pos == c->in_len) c->in_pos = c->in_len = 0;
    }
    return 0;
}

/* Read and process what the socket has, within a per-round budget.
 * Returns 0 (drained), 1 (stopped with data left: come back), or <0 / -1000
 * (dead; code already recorded). */
static int pump(rio_worker *w, rio_conn *c) {
    uint64_t budget = ROUND_BYTES;
    c->round_pulled = 0;
    for (;;) {
        /* first, whatever is buffered */
        if (c->in_pos < c->in_len) {
            int64_t used = process(w, c, c->in + c->in_pos, c->in_len - c->in_pos);
            if (used < 0) { mark_dead(w, c, (int)used); return -1; }
            c->in_pos += (uint32_t)used;
            if (c->in_pos < c->in_len) {
                /* stopped early: CQ full or output backpressure, or a partial header */
                uint32_t hsz = c->kind == KIND_RESPONDER ? REQ_HDR : RESP_HDR;
                int partial = c->in_state == IN_HDR && c->in_len - c->in_pos < hsz;
                if (!partial) return 1;
            }
        }
        if (c->in_pos == c->in_len) c->in_pos = c->in_len = 0;
        if (budget == 0) return 1;
        if (c->kind == KIND_INITIATOR && w->ncq >= w->cq_cap) return 1;
        if (c->kind == KIND_RESPONDER && c->out_pending > OUT_HIGH) return 1;
        ssize_t got;
        if (c->in_state == IN_PAYLOAD && c->in_len == 0 && c->p_ptr && c->p_seg_left >= DIRECT_MIN) {
            /* large payload: receive straight into its destination */
            got = recv(c->fd, (void *)(uintptr_t)c->p_ptr, c->p_seg_left, MSG_DONTWAIT);
            if (got > 0) {
                uint64_t g = (uint64_t)got;
                c->p_ptr += g;
                c->p_seg_left -= g;
                c->p_left -= g;
                budget = g >= budget ? 0 : budget - g;
                if (c->p_seg_left == 0) c->p_ptr = 0;
                if (c->p_left == 0) {
                    int rc = payload_done(w, c);
                    if (rc) { mark_dead(w, c, rc); return -1; }
                }
                continue;
            }
        } else {
            if (c->in_pos > 0) {
                memmove(c->in, c->in + c->in_pos, c->in_len - c->in_pos);
                c->in_len -= c->in_pos;
                c->in_pos = 0;
            }
            uint32_t room = INBUF - c->in_len;
            got = recv(c->fd, c->in + c->in_len, room, MSG_DONTWAIT);
            if (got > 0) {
                c->in_len += (uint32_t)got;
                budget = (uint64_t)got >= budget ? 0 : budget - (uint64_t)got;
                if ((uint32_t)got < room) {
                    /* a short read drained the socket: process and stop here
                     * instead of paying for a recv that returns EAGAIN (epoll
                     * is level-triggered, so later bytes raise a new event) */
                    int64_t used = process(w, c, c->in + c->in_pos, c->in_len - c->in_pos);
                    if (used < 0) { mark_dead(w, c, (int)used); return -1; }
                    c->in_pos += (uint32_t)used;
                    if (c->in_pos == c->in_len) { c->in_pos = c->in_len = 0; return 0; }
                    uint32_t hsz = c->kind == KIND_RESPONDER ? REQ_HDR : RESP_HDR;
                    if (c->in_state == IN_HDR && c->in_len - c->in_pos < hsz) return 0;
                    if (c->in_state != IN_HDR) return 0; /* mid-payload: wait for more bytes */
                    return 1; /* stopped early (CQ full / backpressure) */
                }
                continue;
            }
        }
        if (got == 0) { mark_dead(w, c, 0); return -1; }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        mark_dead(w, c, errno);
        return -1;
    }
}

static void conn_set_events(rio_conn *c) {
    for (int i = 0; i < c->nworkers; i++) {
        struct epoll_event ev = {0};
        ev.events = (c->in_paused ? 0 : EPOLLIN | EPOLLRDHUP) | (c->want_out ? EPOLLOUT : 0);
        ev.data.ptr = c;
        epoll_ctl(c->workers[i]->epfd, EPOLL_CTL_MOD, c->fd, &ev);
    }
}

static void backlog_add(rio_worker *w, rio_conn *c) {
    rio_worker *p = w;
    for (uint32_t i = 0; i < p->nbacklog; i++)
        if (p->backlog[i] == c) return;
    if (p->nbacklog == p->backlog_cap) {
        uint32_t cap = p->backlog_cap ? p->backlog_cap * 2 : 16;
        rio_conn **b = realloc(p->backlog, cap * sizeof(*b));
        if (!b) return;
        p->backlog = b;
        p->backlog_cap = cap;
    }
    p->backlog[p->nbacklog++] = c;
}

static void service(rio_worker *w, rio_conn *c, uint32_t events) {
    if (c->closed || c->dead) return;
    int shared = c->nworkers > 1;
    if (shared) pthread_mutex_lock(&c->in_lock);
    if (c->closed || c->dead) goto out;
    int more = 0;
    w->did_work = 1;
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)) {
        int rc = pump(w, c);
        if (rc < 0) goto out;
        more = rc;
    }
    if (c->kind == KIND_RESPONDER) {
        int rc = out_flush(c);
        if (rc < 0) { mark_dead(w, c, -rc); goto out; }
        int want_out = rc == 1;
        int paused = c->out_pending > OUT_HIGH;
        if (want_out != c->want_out || paused != c->in_paused) {
            c->want_out = want_out;
            c->in_paused = paused;
            conn_set_events(c);
        }
        /* output drained below the mark: what is buffered may now proceed */
        if (!paused && c->in_pos < c->in_len) more = 1;
    }
    /* a paused responder waits for EPOLLOUT instead of spinning */
    if (more && !(c->kind == KIND_RESPONDER && c->in_paused)) backlog_add(w, c);
out:
    if (shared) pthread_mutex_unlock(&c->in_lock);
}

/* ---- workers --------------------------------------------------------------- */

rio_worker *rio_worker_new(uint32_t cq_cap) {
    rio_worker *w = calloc(1, sizeof(*w));
    if (!w) return NULL;
    w->epfd = w->wakefd = -1;
    pthread_mutex_init(&w->lock, NULL);
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    w->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    w->cq_cap = cq_cap ? cq_cap : 4096;
    w->cq_conn = calloc(w->cq_cap, sizeof(uint32_t));
    w->cq_wr = calloc(w->cq_cap, sizeof(uint64_t));
    w->cq_status = calloc(w->cq_cap, sizeof(int32_t));
    w->cq_value = calloc(w->cq_cap, sizeof(uint64_t));
    if (w->epfd < 0 || w->wakefd < 0 || !w->cq_conn || !w->cq_wr || !w->cq_status || !w->cq_value) {
        rio_worker_free(w);
        return NULL;
    }
    struct epoll_event ev = {0};
    ev.events = EPOLLIN;
    ev.data.ptr = NULL; /* WAKE_TOKEN */
    epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->wakefd, &ev);
    return w;
}

void rio_worker_free(rio_worker *w) {
    if (!w) return;
    rio_worker *p = w;
    bury(w);
    if (w->epfd >= 0) close(w->epfd);
    if (w->wakefd >= 0) close(w->wakefd);
    free(w->cq_conn); free(w->cq_wr); free(w->cq_status); free(w->cq_value);
    free(w->ev_conn); free(w->ev_code);
    free(w->rx_conn); free(w->rx_imm);
    free(p->backlog);
    pthread_mutex_destroy(&p->lock);
    free(w);
}

uint32_t rio_worker_backlog(rio_worker *w) { return w->nbacklog; }

int rio_worker_wake(rio_worker *w) {
    uint64_t one = 1;
    ssize_t n = write(w->wakefd, &one, 8);
    return n == 8 ? 0 : -errno;
}

/* microseconds since t0 (CLOCK_MONOTONIC) */
static int64_t us_since(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000LL + (t.tv_nsec - t0->tv_nsec) / 1000;
}

int rio_worker_poll(rio_worker *w, int timeout_ms) {
    rio_worker *p = w;
    struct epoll_event evs[64];
    if (p->nbacklog) timeout_ms = 0;
    int n = 0;
    /* Adaptive poll-before-block: right after a round that did work, the
     * next request usually follows within a round trip.  Polling for a
     * bounded time avoids a sleep/wake-up (very costly on virtual CPUs);
     * sched_yield hands the CPU to any runnable thread meanwhile.  Idle
     * workers never spin: did_work is cleared by an empty round.  Where the
     * next request does not come that soon (a server whose requests each
     * take milliseconds of work elsewhere), spinning only burns the CPU: the
     * worker times how long it then waits, and after four waits in a row
     * longer than 8 x spin_us it stops spinning until a wait is shorter
     * (a depth-1 stream whose round trip is about the spin misses now and
     * then by a little, and keeps spinning). */
    int learn = w->spin_us && w->did_work && timeout_ms != 0;
    struct timespec t0;
    if (learn) clock_gettime(CLOCK_MONOTONIC, &t0);
    if (learn && w->spin_misses >= 4) {
        w->spin_skips++;
    } else if (learn) {
        w->spins++;
        for (;;) {
            n = epoll_wait(w->epfd, evs, 64, 0);
            if (n != 0) break;
            if (us_since(&t0) >= (int64_t)w->spin_us) break;
            sched_yield();
        }
        if (n != 0) {
            w->spin_hits++;
            w->spin_misses = 0;
        }
    }
    if (n == 0) {
        n = epoll_wait(w->epfd, evs, 64, timeout_ms);
        if (learn) {
            if (us_since(&t0) > 8 * (int64_t)w->spin_us) {
                if (w->spin_misses < 4) w->spin_misses++;
            } else {
                w->spin_misses = 0;
            }
        }
    }
    w->did_work = 0;
    if (n < 0 && errno != EINTR) return -errno;
    if (n < 0) n = 0;
    pthread_mutex_lock(&p->lock);
    w->ncq = 0;
    w->nev = 0;
    w->nrx = 0;
    w->woken = 0;
    /* connections that stopped early last round go first */
    uint32_t nb = p->nbacklog;
    rio_conn *carry[64];
    uint32_t ncarry = 0;
    for (uint32_t i = 0; i < nb && ncarry < 64; i++) carry[ncarry++] = p->backlog[i];
    if (nb > ncarry) {
        memmove(p->backlog, p->backlog + ncarry, (nb - ncarry) * sizeof(rio_conn *));
        p->nbacklog = nb - ncarry;
    } else {
        p->nbacklog = 0;
    }
    for (uint32_t i = 0; i < ncarry; i++) service(w, carry[i], EPOLLIN);
    for (int i = 0; i < n; i++) {
        rio_conn *c = evs[i].data.ptr;
        if (c == NULL) {
            uint64_t v;
            while (read(w->wakefd, &v, 8) == 8) {}
            w->woken = 1;
            continue;
        }
        service(w, c, evs[i].events);
    }
    bury(w);
    w->rounds++;
    pthread_mutex_unlock(&p->lock);
    return (int)(w->ncq + w->nev + w->nrx);
}

/* ---- posting (event-loop thread) --------------------------------------------- */

static int post_header(rio_conn *c, int op, int flags, uint32_t count, uint64_t wr, uint64_t key, uint64_t remote,
                       uint64_t arg0, uint64_t arg1) {
    uint8_t h[REQ_HDR] = {0};
    h[0] = (uint8_t)op;
    h[1] = (uint8_t)flags;
    st32(h + 4, count);
    st64(h + 8, wr);
    st64(h + 16, key);
    st64(h + 24, remote);
    st64(h + 32, arg0);
    st64(h + 40, arg1);
    return out_bytes(c, h, REQ_HDR) ? -RIO_PE_NOMEM : 0;
}

static slot_t *claim(rio_conn *c, uint32_t slot, uint64_t wr, int op) {
    if (c->kind != KIND_INITIATOR || slot >= c->sq_depth || (uint32_t)(wr & 0xffffffffu) != slot) return NULL;
    slot_t *s = &c->slots[slot];
    if (s->active) return NULL;
    memset(s, 0, sizeof(*s));
    s->wr_id = wr;
    s->op = op;
    return s;
}

int rio_post_single(rio_conn *c, uint32_t slot, uint64_t wr_id, int op, uint64_t key,
                    uint64_t remote, uint64_t arg0, uint64_t arg1, uint64_t local) {
    if (c->dead || c->closed) return -RIO_PE_MISUSE;
    if (op != RIO_OP_READ && op != RIO_OP_WRITE && op != RIO_OP_FETCH_ADD && op != RIO_OP_CMP_SWAP && op != RIO_OP_NOP &&
        op != RIO_OP_WRITE_IMM)
        return -RIO_PE_BAD_OP;
    if ((op == RIO_OP_READ || op == RIO_OP_WRITE || op == RIO_OP_WRITE_IMM) && arg0 > MAX_OP_BYTES) return -RIO_PE_TOO_BIG;
    slot_t *s = claim(c, slot, wr_id, op);
    if (!s) return -RIO_PE_MISUSE;
    if (op == RIO_OP_READ) {
        s->one_addr = local;
        s->one_len = arg0;
        s->sge_addr = &s->one_addr;
        s->sge_len = &s->one_len;
        s->nsge = 1;
        s->expect = arg0;
    }
    int pull = (op == RIO_OP_WRITE || op == RIO_OP_WRITE_IMM) && c->pull_min && arg0 >= c->pull_min &&
               c->gen_slot >= 0;
    if (post_header(c, op, pull ? RIO_F_PULL : 0, 1, wr_id, key, remote, arg0, arg1)) return -RIO_PE_NOMEM;
    if (pull) {
        uint8_t t[PULL_TRAILER];
        uint64_t *word = &pull_gens[c->gen_slot];
        st64(t, local);
        st64(t + 8, (uint64_t)(uintptr_t)word);
        st64(t + 16, __atomic_load_n(word, __ATOMIC_SEQ_CST));
        if (out_bytes(c, t, PULL_TRAILER)) return -RIO_PE_NOMEM;
        c->ops_pulled++;
    } else if (op == RIO_OP_WRITE || op == RIO_OP_WRITE_IMM) {
        if (arg0 <= SMALL_COPY ? out_bytes(c, (void *)(uintptr_t)local, arg0)
                               : seg_push(c, local, arg0, NULL, 0))
            return -RIO_PE_NOMEM;
    }
    s->active = 1;
    return 0;
}

int rio_post_batch(rio_conn *c, uint32_t slot, uint64_t wr_id, int op, uint64_t key,
                   uint32_t count, const uint64_t *remote, const uint64_t *lengths,
                   const uint64_t *local) {
    if (c->dead || c->closed) return -RIO_PE_MISUSE;
    if (op != RIO_OP_READ_BATCH && op != RIO_OP_WRITE_BATCH) return -RIO_PE_BAD_OP;
    if (count == 0 || count > MAX_BATCH) return -RIO_PE_BAD_COUNT;
    uint64_t total = 0;
    for (uint32_t i = 0; i < count; i++) {
        if (lengths[i] > MAX_OP_BYTES) return -RIO_PE_TOO_BIG;
        total += lengths[i];
    }
    if (total > MAX_OP_BYTES) return -RIO_PE_TOO_BIG;
    slot_t *s = claim(c, slot, wr_id, op);
    if (!s) return -RIO_PE_MISUSE;
    if (op == RIO_OP_READ_BATCH) {
        s->sge_addr = local;
        s->sge_len = lengths;
        s->nsge = count;
        s->expect = total;
    }
    if (post_header(c, op, 0, count, wr_id, key, 0, 0, 0)) return -RIO_PE_NOMEM;
    if (ob_reserve(c, (uint64_t)count * ENTRY)) return -RIO_PE_NOMEM;
    uint8_t *e = c->obuf + c->ob_len;
    for (uint32_t i = 0; i < count; i++) {
        st64(e + i * ENTRY, remote[i]);
        st64(e + i * ENTRY + 8, lengths[i]);
    }
    uint64_t off = c->ob_len;
    c->ob_len += (uint64_t)count * ENTRY;
    if (seg_push(c, off, (uint64_t)count * ENTRY, NULL, 1)) return -RIO_PE_NOMEM;
    if (op == RIO_OP_WRITE_BATCH) {
        for (uint32_t i = 0; i < count; i++) {
            if (lengths[i] <= SMALL_COPY ? out_bytes(c, (void *)(uintptr_t)local[i], lengths[i])
                                         : seg_push(c, local[i], lengths[i], NULL, 0))
                return -RIO_PE_NOMEM;
        }
    }
    s->active = 1;
    return 0;
}
