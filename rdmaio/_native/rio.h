/* rdmaio native data path: declarations shared by the cffi cdef and rio.c.
 *
 * This header is parsed by cffi's cdef (see build.py), so it may only contain
 * declarations that pycparser understands: no macros with arguments, no
 * attributes, no includes.  The wire layout is documented in rdmaio/_wire.py,
 * which is the reference (sans-I/O) codec; rio.c is its hot-path twin and the
 * conformance tests check that both agree byte for byte.
 */

typedef struct rio_rtable rio_rtable;
typedef struct rio_worker rio_worker;
typedef struct rio_conn rio_conn;

/* ---- region table: what a responder may touch ------------------------- */
rio_rtable *rio_rtable_new(uint32_t capacity);
void rio_rtable_free(rio_rtable *t);
/* returns the entry index, or -1 when the table is full */
int32_t rio_rtable_insert(rio_rtable *t, uint64_t key, uint64_t addr, uint64_t length, uint32_t access);
void rio_rtable_invalidate(rio_rtable *t, int32_t index);
int64_t rio_rtable_busy(rio_rtable *t, int32_t index);

/* ---- workers: one epoll set, one completion queue, one lock ------------- */
struct rio_worker {
    int epfd;
    int wakefd;
    uint32_t ncq;          /* completions collected by the last poll round */
    uint32_t cq_cap;
    uint32_t *cq_conn;     /* conn id */
    uint64_t *cq_wr;       /* wr_id */
    int32_t *cq_status;    /* RIO_ST_* */
    uint64_t *cq_value;    /* atomics: old value; reads: bytes */
    uint32_t nev;          /* connection events (death) from the last round */
    uint32_t ev_cap;
    uint32_t *ev_conn;
    int32_t *ev_code;      /* 0: orderly EOF, >0: errno, <0: -RIO_PE_* protocol error */
    uint32_t woken;        /* the wake fd fired during the last round */
    uint64_t rounds;
    uint32_t spin_us;      /* poll-before-block budget after a busy round (0: never spin) */
    uint32_t nrx;          /* WRITE_IMM receive events (conn id, imm) from the last round */
    uint32_t rx_cap;
    uint32_t *rx_conn;
    uint32_t *rx_imm;
    uint64_t spins;        /* polls before blocking made (spin_us > 0) */
    uint64_t spin_hits;    /* ... that found work before spin_us ran out */
    uint64_t spin_skips;   /* chances to spin skipped: the last waits after busy rounds were long */
    ...;
};

rio_worker *rio_worker_new(uint32_t cq_cap);
void rio_worker_free(rio_worker *w);
int rio_worker_wake(rio_worker *w);
/* One progress round: wait up to timeout_ms (0: do not block, -1: forever)
 * for readiness, service every ready connection, and return the number of
 * completions, events and receive events collected (w->ncq / w->nev / w->nrx).  Releases the
 * GIL (cffi does), takes the worker's lock only while servicing. */
int rio_worker_poll(rio_worker *w, int timeout_ms);
/* connections left with buffered input by the last round (poll again soon) */
uint32_t rio_worker_backlog(rio_worker *w);

/* ---- connections ------------------------------------------------------- */
struct rio_conn {
    int fd;
    uint32_t id;
    int kind;              /* 1 responder, 2 initiator */
    int dead;              /* set once the input side saw EOF/error */
    uint32_t sq_depth;
    uint64_t out_pending;  /* bytes queued for output, not yet sent */
    uint64_t ops_served;   /* responder: requests executed */
    uint64_t ops_pulled;   /* responder: writes whose payload it pulled; initiator: pulled writes posted */
    ...;
};

rio_conn *rio_conn_new(int fd, uint32_t id, int kind, rio_rtable *t, uint32_t sq_depth);
/* add to a worker's epoll set (a conn may be shared by several workers) */
int rio_conn_attach(rio_conn *c, rio_worker *w);
/* Same-host single copy (see rio.c).  Responder: take pulled writes from the
 * process pid (0: refuse them).  Initiator: post writes of at least min_bytes
 * pulled (0: never).  Returns 0, or -RIO_PE_* (no generation word free). */
int rio_conn_pull(rio_conn *c, int32_t pid, uint64_t min_bytes);
/* copy n bytes at remote in process pid into out (process_vm_readv): 0 or -errno */
int rio_pull_read(int32_t pid, uint64_t remote, uint8_t *out, uint64_t n);
/* detach from every worker and free once no worker can still see it;
 * the fd is not closed (the Python socket object owns it) */
void rio_conn_close(rio_conn *c);

/* initiator posting (event-loop thread only).  Return 0, or -RIO_PE_* on misuse. */
int rio_post_single(rio_conn *c, uint32_t slot, uint64_t wr_id, int op, uint64_t key,
                    uint64_t remote, uint64_t arg0, uint64_t arg1, uint64_t local);
int rio_post_batch(rio_conn *c, uint32_t slot, uint64_t wr_id, int op, uint64_t key,
                   uint32_t count, const uint64_t *remote, const uint64_t *lengths,
                   const uint64_t *local);
/* write queued output: 0 everything sent, 1 output still pending, -errno on error */
int rio_flush(rio_conn *c);

/* ---- sans-I/O entry points (used by tests and fuzzers) ------------------ */
/* feed bytes to a conn exactly as if they had been received; completions and
 * events land in w.  Returns 0, or -RIO_PE_* once the stream is invalid. */
int rio_feed(rio_worker *w, rio_conn *c, const uint8_t *data, uint64_t n);
/* copy up to cap bytes of queued output into out, consuming them */
uint64_t rio_take_output(rio_conn *c, uint8_t *out, uint64_t cap);
