/* rdmaio verbs data path: declarations shared by the cffi cdef and verbs.c.
 *
 * Parsed by cffi's cdef (see verbs_build.py): plain declarations only.  The
 * Python side (rdmaio/_verbs.py) owns the policy (handshake, recovery,
 * credits); this file is the hot path: one ibv_post_send per batch chunk,
 * completions polled in batches into plain arrays.
 */

typedef struct rv_ctx rv_ctx;
typedef struct rv_worker rv_worker;
typedef struct rv_qp rv_qp;
typedef struct rv_mr rv_mr;

/* ---- devices ------------------------------------------------------------ */
/* Number of devices with at least one ACTIVE port (>= 0), or -errno.
 * Writes a human-readable summary of what was found into info. */
int rv_probe(char *info, int info_len);

struct rv_ctx {
    char name[64];         /* device name, e.g. "rxe0" */
    uint32_t port;
    int32_t gid_index;
    uint8_t gid[16];
    uint16_t lid;
    int32_t link_layer;    /* 1 InfiniBand, 2 Ethernet */
    int32_t gid_type;      /* 0 IB/RoCEv1, 1 RoCEv2, -1 unknown */
    int32_t active_mtu;    /* enum ibv_mtu: 1=256 .. 5=4096 */
    uint64_t max_msg_sz;
    int32_t max_qp_wr;
    int32_t max_cqe;
    int32_t max_qp_rd_atom;
    int32_t max_qp_init_rd_atom;
    int32_t atomic_cap;
    int32_t gid_tbl_len;
    int32_t num_comp_vectors;
    ...;
};

/* Open a device (name NULL/"" = first with an active port), pick a port (0 =
 * first active) and a GID (gid_index < 0 = automatic: RoCEv2 IPv4-mapped
 * first), allocate a PD.  NULL on failure with the reason in err. */
rv_ctx *rv_open(const char *name, uint32_t port, int32_t gid_index, char *err, int err_len);
void rv_close(rv_ctx *c);
/* GID idx of the port into out[16]: 0, or -errno (empty entries are all zero) */
int rv_gid(rv_ctx *c, int32_t idx, uint8_t *out);

/* ---- memory ------------------------------------------------------------- */
struct rv_mr {
    uint32_t lkey;
    uint32_t rkey;
    ...;
};
/* access: rdmaio Access bits (1 read, 2 write, 4 atomic); local write is always granted.
 * NULL on failure with errno in *err. */
rv_mr *rv_reg(rv_ctx *c, uint64_t addr, uint64_t length, uint32_t access, int *err);
int rv_dereg(rv_mr *m);

/* ---- workers: one completion channel + CQ each ---------------------------- */
struct rv_worker {
    int fd;                /* completion channel fd (non-blocking) */
    int wakefd;
    uint32_t ncq;          /* completions collected by the last round */
    uint32_t cq_cap;
    uint32_t *cq_conn;     /* conn id (wr_id >> 32) */
    uint64_t *cq_wr;       /* wr_id */
    int32_t *cq_status;    /* enum ibv_wc_status (0 = success) */
    uint64_t *cq_value;    /* byte_len */
    uint32_t *cq_qpn;      /* qp_num */
    uint32_t nev;          /* always 0: deaths arrive through the control connection */
    uint32_t ev_cap;
    uint32_t *ev_conn;
    int32_t *ev_code;
    uint32_t nrx;          /* WRITE_WITH_IMM receive events collected by the last round */
    uint32_t *rx_conn;     /* conn id of the QP the write landed through */
    uint32_t *rx_imm;      /* the immediate, host byte order */
    uint32_t woken;
    uint64_t rounds;
    uint64_t events;       /* completion-channel events consumed */
    uint64_t rq_refills;   /* chained ibv_post_recv calls that topped a receive queue up */
    uint64_t rq_errors;    /* ibv_post_recv failures (the peer then sees RNR back-pressure) */
    uint64_t handoffs;     /* rounds of rv_worker_poll that returned completions */
    uint64_t spins;        /* busy polls (rv_worker_spin) */
    uint64_t spin_hits;    /* busy polls that collected completions themselves */
    uint64_t spin_ns;      /* time spent in busy polls */
    int32_t domain;        /* 1: the worker's QPs and CQ live in its own thread domain (parent domain) */
    int32_t domain_call;   /* what failed when domain == 0 and one was asked for: 1 ibv_alloc_td,
                              2 ibv_alloc_parent_domain, 3 ibv_create_cq_ex in the parent domain */
    int32_t domain_errno;
    int32_t cq_single;     /* 1: the CQ is single-threaded (provider lock elided: the poll lock serialises it) */
    int32_t comp_vector;
    ...;
};

/* flags: RV_WORKER_TD (1) = try a thread domain + parent domain for the worker's QPs and CQ */
rv_worker *rv_worker_new(rv_ctx *c, uint32_t cq_cap, uint32_t cqe, int32_t comp_vector, uint32_t flags);
void rv_worker_free(rv_worker *w);
int rv_worker_wake(rv_worker *w);
/* One round: drain channel events, poll the CQ, re-arm and poll again when it
 * ran dry; when nothing was found and timeout_ms != 0, block in poll() on the
 * channel fd and the wake fd (GIL released by cffi, poll lock released) and repeat: once
 * for timeout_ms > 0; for timeout_ms < 0 until completions arrive or rv_worker_wake.
 * Send completions go to the cq_* arrays, WRITE_WITH_IMM arrivals to rx_*
 * (receive queues are refilled here, below half depth); flushed receive WRs
 * are dropped.  Returns ncq + nrx, or -errno, ALWAYS with the worker's poll
 * lock held: copy the arrays out, then rv_worker_release. */
int rv_worker_poll(rv_worker *w, int timeout_ms);
/* Busy poll for the event loop: poll the CQ (under the poll lock, no channel
 * events) until it yields completions, budget_us passed, or a round
 * of rv_worker_poll delivered completions (handoffs != seen).  When it found
 * nothing it re-arms the CQ (and polls once more) before returning; after a hit
 * the CQ stays un-armed until rv_worker_rearm.  Returns ncq + nrx
 * (> 0), 0 (budget spent), -1 (the worker's own round took them) or -errno,
 * ALWAYS with the poll lock held (then rv_worker_release). */
int rv_worker_spin(rv_worker *w, uint32_t budget_us, uint64_t seen);
void rv_worker_release(rv_worker *w);
/* After busy polls that found completions the CQ is left un-armed (no event, no worker wake-up
 * per depth-1 operation); the event loop calls this once it is back to other work: arm the CQ
 * (unless armed or a busy poll is running) and poll once more.  Returns ncq + nrx or -errno,
 * ALWAYS with the poll lock held (then rv_worker_release). */
int rv_worker_rearm(rv_worker *w);
/* rv_post_one (on q, whose CQ is w's), then rv_worker_spin -- one call for a depth-1 caller.
 * Returns 0x10000 when the one completion polled was this WR's, successful, and nothing else
 * (the poll lock is then RELEASED and the arrays empty); else what rv_worker_spin returns (lock
 * held), or -(0x10000 + errno) when ibv_post_send failed (lock held, arrays empty). */
int rv_post_spin(rv_qp *q, rv_worker *w, uint64_t wr_id, int op, uint64_t raddr, uint64_t length, uint64_t local,
                 uint32_t rkey, uint32_t lkey, uint64_t max_msg, uint32_t budget_us, uint64_t seen);
/* 1 when the last round filled the arrays (more completions may be waiting) */
uint32_t rv_worker_backlog(rv_worker *w);

/* ---- queue pairs (RC) --------------------------------------------------- */
struct rv_qp {
    uint32_t qpn;
    uint32_t conn_id;
    uint32_t max_wr;       /* send queue depth = most WRs one post may chain */
    uint32_t rq_depth;     /* zero-length receive WRs kept posted (WRITE_WITH_IMM targets) */
    ...;
};

/* Create an RC QP on w's CQ (INIT) with rq_depth receive WRs posted; w refills them. */
rv_qp *rv_qp_new(rv_ctx *c, rv_worker *w, uint32_t conn_id, uint32_t max_wr, uint32_t rq_depth, uint32_t rd_atomic,
                 int *err);
void rv_qp_free(rv_qp *q);
/* RESET -> INIT (remote read/write/atomic allowed on this QP) */
int rv_qp_init(rv_qp *q);
/* receive WRs currently posted (for tests and diagnostics) */
uint32_t rv_qp_rq_posted(rv_qp *q);
/* INIT -> RTR */
int rv_qp_rtr(rv_qp *q, uint32_t dest_qpn, uint32_t rq_psn, const uint8_t *dgid, uint16_t dlid, int32_t mtu);
/* RTR -> RTS; timeout/retry chosen so a dead peer errors within ~2 s */
int rv_qp_rts(rv_qp *q, uint32_t sq_psn);
/* any state -> RESET -> INIT, with a new generation of receive WRs posted */
int rv_qp_reset(rv_qp *q);
/* any state -> ERR (outstanding WRs flush) */
int rv_qp_error(rv_qp *q);
/* current state (enum ibv_qp_state), or -errno */
int rv_qp_state(rv_qp *q);

/* op: 1 read, 2 write.  Entry i moves lengths[i] bytes between local[i] and
 * rbase + roffs[i]; entries longer than max_msg are split, empty ones skipped.
 * One chained WR list, one ibv_post_send, only the last WR signalled.
 * Returns the number of WRs posted (0 when every entry was empty) or -errno. */
int rv_post_rw(rv_qp *q, uint64_t wr_id, int op, uint32_t n, uint64_t rbase, const uint64_t *roffs,
               const uint64_t *lengths, const uint64_t *local, uint32_t rkey, uint32_t lkey, uint64_t max_msg);
/* one contiguous read/write (same splitting rule) */
int rv_post_one(rv_qp *q, uint64_t wr_id, int op, uint64_t raddr, uint64_t length, uint64_t local,
                uint32_t rkey, uint32_t lkey, uint64_t max_msg);
/* RDMA WRITE of length bytes (split at max_msg) whose last WR is WRITE_WITH_IMM
 * carrying imm (sent big-endian as the verbs API wants; the target reads it back
 * in host order).  length 0 sends only the immediate.  Returns WRs posted or -errno. */
int rv_post_write_imm(rv_qp *q, uint64_t wr_id, uint64_t raddr, uint64_t length, uint64_t local, uint32_t rkey,
                      uint32_t lkey, uint32_t imm, uint64_t max_msg);
/* op: 3 fetch-and-add (a = addend), 4 compare-and-swap (a = expected, b = desired);
 * the old value lands in the 8 bytes at local (lkey). Returns 1 or -errno. */
int rv_post_atomic(rv_qp *q, uint64_t wr_id, int op, uint64_t raddr, uint32_t rkey, uint64_t a, uint64_t b,
                   uint64_t local, uint32_t lkey);

/* number of WRs rv_post_rw would build */
uint64_t rv_count_wrs(uint32_t n, const uint64_t *lengths, uint64_t max_msg);
