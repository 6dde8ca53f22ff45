/* rdmaio verbs data path (compiled by cffi, see verbs_build.py; API in verbs.h).
 *
 * Hot-path rules: posting builds ONE chained ibv_send_wr list per call from
 * plain arrays and rings the doorbell once (ibv_post_send), with only the last
 * WR signalled; completions are polled in batches into plain arrays that the
 * Python side unpacks once per round.  No Python object per WR or per CQE.
 *
 * Threading: posting and QP state changes happen on the event-loop thread;
 * rv_worker_poll runs on the worker's thread (or the loop thread in loop
 * mode), rv_worker_spin (busy polling) on the loop thread.  Everything that
 * touches a worker's CQ -- polling, re-arming, destroying or resetting one of
 * its QPs (a provider may clean the QP's entries out of the CQ) -- holds the
 * worker's poll lock (plock), so the CQ is used by one thread at a time and
 * may be created single-threaded (IBV_CREATE_CQ_ATTR_SINGLE_THREADED: the
 * provider drops its own lock).  A round returns with plock held and the
 * caller releases it once it has copied the arrays out and queued them: a busy
 * poll that takes plock next therefore sees, in the worker's queue, every
 * completion polled before its own, and delivers those first (order kept).
 *
 * Thread domains: with RV_WORKER_TD a worker allocates an ibv_td and a parent
 * domain (ibv_alloc_parent_domain over the engine's PD) and creates its CQ
 * and QPs in it, telling the provider that one thread at a time uses them
 * (mlx5 then gives the worker its own doorbell register and drops the QP
 * locks).  That holds: a QP's send queue is posted only from the event loop,
 * its receive queue only under the worker's table lock (w->lock).  Providers
 * without thread domains (rxe: EOPNOTSUPP) get the engine's PD; which call
 * failed and its errno are kept in domain_call / domain_errno.
 *
 * Receive queues (WRITE_WITH_IMM targets): every QP keeps rq_depth zero-length
 * receive WRs posted.  rv_worker_poll, on the thread that sees the completions,
 * turns IBV_WC_RECV_RDMA_WITH_IMM into (conn id, imm) rx entries and re-posts
 * the pool in one chained ibv_post_recv once it drops below half.  It finds
 * the QP through its worker's qpn table; the table, rq_posted and rq_gen are
 * guarded by the worker's mutex (the loop thread resets and destroys QPs).
 * Receive wr_ids are conn_id << 32 | RV_RECV_TAG | generation: the generation
 * changes on every reset, so flushes of a previous incarnation are not counted,
 * and errored receives (flushes) are never reported as messages.
 */

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <infiniband/verbs.h>

typedef struct rv_ctx rv_ctx;
typedef struct rv_worker rv_worker;
typedef struct rv_qp rv_qp;
typedef struct rv_mr rv_mr;

int rv_qp_init(rv_qp *q);
int rv_post_one(rv_qp *q, uint64_t wr_id, int op, uint64_t raddr, uint64_t length, uint64_t local,
                uint32_t rkey, uint32_t lkey, uint64_t max_msg);

struct rv_ctx {
    char name[64];
    uint32_t port;
    int32_t gid_index;
    uint8_t gid[16];
    uint16_t lid;
    int32_t link_layer;
    int32_t gid_type;
    int32_t active_mtu;
    uint64_t max_msg_sz;
    int32_t max_qp_wr;
    int32_t max_cqe;
    int32_t max_qp_rd_atom;
    int32_t max_qp_init_rd_atom;
    int32_t atomic_cap;
    int32_t gid_tbl_len;
    int32_t num_comp_vectors;
    struct ibv_context *ctx;
    struct ibv_pd *pd;
};

struct rv_mr {
    uint32_t lkey;
    uint32_t rkey;
    struct ibv_mr *mr;
};

struct rv_worker {
    int fd;
    int wakefd;
    uint32_t ncq;
    uint32_t cq_cap;
    uint32_t *cq_conn;
    uint64_t *cq_wr;
    int32_t *cq_status;
    uint64_t *cq_value;
    uint32_t *cq_qpn;
    uint32_t nev;
    uint32_t ev_cap;
    uint32_t *ev_conn;
    int32_t *ev_code;
    uint32_t nrx;
    uint32_t *rx_conn;
    uint32_t *rx_imm;
    uint32_t woken;
    uint64_t rounds;
    uint64_t events;
    uint64_t rq_refills;
    uint64_t rq_errors;
    uint64_t handoffs;
    uint64_t spins;
    uint64_t spin_hits;
    uint64_t spin_ns;
    int32_t domain;
    int32_t domain_call;
    int32_t domain_errno;
    int32_t cq_single;
    int32_t comp_vector;
    struct ibv_comp_channel *ch;
    pthread_mutex_t lock;   /* the qpn table, rq_posted, rq_gen */
    int lock_ok;
    pthread_mutex_t plock;  /* the CQ: polls, re-arms, QP destroy/reset (see the top of this file) */
    int plock_ok;
    struct ibv_td *td;
    struct ibv_pd *ppd;     /* the parent domain (NULL: QPs use the engine's PD) */
    struct ibv_cq_ex *cqx;  /* set when the CQ was made with ibv_create_cq_ex */
    rv_qp **qps;       /* sorted by qpn: the QPs whose receive queues this worker refills */
    uint32_t nqps;
    uint32_t qps_cap;
    struct ibv_cq *cq;
    int armed;
    int spinning;          /* a busy poll owns the CQ (plock) */
    unsigned int unacked;
    struct ibv_wc wcs[64];
};

struct rv_qp {
    uint32_t qpn;
    uint32_t conn_id;
    uint32_t max_wr;
    uint32_t rq_depth;
    uint32_t rq_posted;  /* guarded by w->lock */
    uint32_t rq_gen;     /* guarded by w->lock */
    struct ibv_qp *qp;
    rv_ctx *c;
    rv_worker *w;       /* set while the QP is in w's table (receive refills) */
    rv_worker *pw;      /* the worker whose CQ the QP uses (its poll lock guards destroy/reset) */
    uint32_t rd_atomic;
    struct ibv_send_wr *wrs;
    struct ibv_sge *sges;
    struct ibv_recv_wr *rwrs;
};

#define RV_ACK_BATCH 64u
#define RV_WORKER_TD 1u
#define RV_SPIN_MINE 0x10000   /* rv_post_spin: the completion polled was the posted WR's, alone, successful */
#define RV_POSTED_NOT 0x10000  /* rv_post_spin: -(RV_POSTED_NOT + errno) when ibv_post_send failed */
#define RV_MAX_SGE_BYTES (1ull << 30)
#define RV_RECV_TAG 0x80000000u  /* low 32 bits of a receive wr_id; send wr_ids keep this bit clear */
#define RV_GEN_MASK 0x7fffffffu

/* ---- devices -------------------------------------------------------------- */

static int rv_is_v4_mapped(const uint8_t *g)
{
    for (int i = 0; i < 10; i++)
        if (g[i])
            return 0;
    return g[10] == 0xff && g[11] == 0xff;
}

static int rv_is_zero(const uint8_t *g)
{
    for (int i = 0; i < 16; i++)
        if (g[i])
            return 0;
    return 1;
}

/* "RoCE v2" -> 1, "IB/RoCE v1" -> 0, unknown -> -1 (sysfs fallback for old kernels/libraries) */
static int rv_sysfs_gid_type(const char *dev, uint32_t port, int idx)
{
    char path[256], buf[64];
    snprintf(path, sizeof path, "/sys/class/infiniband/%s/ports/%u/gid_attrs/types/%d", dev, port, idx);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    if (strstr(buf, "v2"))
        return 1;
    if (n > 0)
        return 0;
    return -1;
}

/* one GID entry: 0 and *type (1 RoCEv2, 0 IB/RoCEv1, -1 unknown), or -errno */
static int rv_gid_entry(struct ibv_context *ctx, const char *dev, uint32_t port, int idx, uint8_t *gid, int *type)
{
    struct ibv_gid_entry e;
    memset(&e, 0, sizeof e);
    if (ibv_query_gid_ex(ctx, port, (uint32_t)idx, &e, 0) == 0) {
        memcpy(gid, e.gid.raw, 16);
        *type = e.gid_type == IBV_GID_TYPE_ROCE_V2 ? 1 : 0;
        return 0;
    }
    union ibv_gid g;
    if (ibv_query_gid(ctx, (uint8_t)port, idx, &g))
        return -(errno ? errno : EINVAL);
    memcpy(gid, g.raw, 16);
    *type = rv_sysfs_gid_type(dev, port, idx);
    return 0;
}

/* best GID index for the port, or -1: RoCEv2 + IPv4-mapped > RoCEv2 > v4-mapped > any */
static int rv_pick_gid(struct ibv_context *ctx, const char *dev, uint32_t port, int tbl_len, int link_layer)
{
    int best = -1, best_rank = 0;
    for (int i = 0; i < tbl_len; i++) {
        uint8_t gid[16];
        int type = -1;
        if (rv_gid_entry(ctx, dev, port, i, gid, &type) || rv_is_zero(gid))
            continue;
        int rank;
        if (link_layer != IBV_LINK_LAYER_ETHERNET)
            rank = 4;  /* InfiniBand: the first valid GID (index 0) is the port GID */
        else if (type == 1 && rv_is_v4_mapped(gid))
            rank = 4;
        else if (type == 1)
            rank = 3;
        else if (type == -1 && rv_is_v4_mapped(gid))
            rank = 2;
        else
            rank = 1;
        if (rank > best_rank) {
            best_rank = rank;
            best = i;
        }
        if (rank == 4)
            break;
    }
    return best;
}

int rv_probe(char *info, int info_len)
{
    int n = 0, active = 0;
    size_t used = 0;
    if (info && info_len > 0)
        info[0] = 0;
    errno = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (!list)
        return -(errno ? errno : ENOSYS);
    for (int d = 0; d < n; d++) {
        const char *name = ibv_get_device_name(list[d]);
        struct ibv_context *ctx = ibv_open_device(list[d]);
        int dev_active = 0;
        char states[128] = "";
        if (ctx) {
            struct ibv_device_attr da;
            if (ibv_query_device(ctx, &da) == 0) {
                for (uint32_t p = 1; p <= da.phys_port_cnt; p++) {
                    struct ibv_port_attr pa;
                    if (ibv_query_port(ctx, (uint8_t)p, &pa))
                        continue;
                    size_t l = strlen(states);
                    snprintf(states + l, sizeof states - l, "%sport %u %s", l ? ", " : "", p,
                             ibv_port_state_str(pa.state));
                    if (pa.state == IBV_PORT_ACTIVE)
                        dev_active = 1;
                }
            }
            ibv_close_device(ctx);
        } else {
            snprintf(states, sizeof states, "cannot open: %s", strerror(errno));
        }
        active += dev_active;
        if (info && info_len > 0 && used < (size_t)info_len) {
            int w = snprintf(info + used, (size_t)info_len - used, "%s%s (%s)", used ? "; " : "",
                             name ? name : "?", states);
            if (w > 0)
                used += (size_t)w;
        }
    }
    ibv_free_device_list(list);
    return active;
}

static int rv_find_port(struct ibv_context *ctx, uint32_t want, uint32_t nports, struct ibv_port_attr *pa)
{
    for (uint32_t p = 1; p <= nports; p++) {
        if (want && p != want)
            continue;
        if (ibv_query_port(ctx, (uint8_t)p, pa) == 0 && pa->state == IBV_PORT_ACTIVE)
            return (int)p;
    }
    return -1;
}

rv_ctx *rv_open(const char *name, uint32_t port, int32_t gid_index, char *err, int err_len)
{
    int n = 0;
    errno = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (!list) {
        snprintf(err, (size_t)err_len, "ibv_get_device_list failed: %s", strerror(errno ? errno : ENOSYS));
        return NULL;
    }
    rv_ctx *c = calloc(1, sizeof *c);
    if (!c) {
        ibv_free_device_list(list);
        snprintf(err, (size_t)err_len, "out of memory");
        return NULL;
    }
    int found_dev = 0;
    struct ibv_port_attr pa;
    struct ibv_device_attr da;
    for (int d = 0; d < n && !c->ctx; d++) {
        const char *dn = ibv_get_device_name(list[d]);
        if (name && name[0] && (!dn || strcmp(dn, name) != 0))
            continue;
        found_dev = 1;
        struct ibv_context *ctx = ibv_open_device(list[d]);
        if (!ctx)
            continue;
        int p = -1;
        if (ibv_query_device(ctx, &da) == 0)
            p = rv_find_port(ctx, port, da.phys_port_cnt, &pa);
        if (p < 0) {
            ibv_close_device(ctx);
            continue;
        }
        c->ctx = ctx;
        c->port = (uint32_t)p;
        snprintf(c->name, sizeof c->name, "%s", dn ? dn : "?");
    }
    ibv_free_device_list(list);
    if (!c->ctx) {
        if (name && name[0] && !found_dev)
            snprintf(err, (size_t)err_len, "no RDMA device named %s", name);
        else if (port)
            snprintf(err, (size_t)err_len, "no active port %u on %s", port, name && name[0] ? name : "any device");
        else
            snprintf(err, (size_t)err_len, "no active RDMA device (ibv_get_device_list found none with an ACTIVE port)");
        free(c);
        return NULL;
    }
    c->lid = pa.lid;
    c->link_layer = pa.link_layer == IBV_LINK_LAYER_ETHERNET ? 2 : 1;
    c->active_mtu = pa.active_mtu;
    c->max_msg_sz = pa.max_msg_sz ? pa.max_msg_sz : (1u << 31);
    c->max_qp_wr = da.max_qp_wr;
    c->max_cqe = da.max_cqe;
    c->max_qp_rd_atom = da.max_qp_rd_atom;
    c->max_qp_init_rd_atom = da.max_qp_init_rd_atom;
    c->atomic_cap = da.atomic_cap;
    c->gid_tbl_len = pa.gid_tbl_len;
    c->num_comp_vectors = c->ctx->num_comp_vectors > 0 ? c->ctx->num_comp_vectors : 1;
    int link = pa.link_layer == IBV_LINK_LAYER_ETHERNET ? IBV_LINK_LAYER_ETHERNET : IBV_LINK_LAYER_INFINIBAND;
    if (gid_index < 0)
        gid_index = rv_pick_gid(c->ctx, c->name, c->port, pa.gid_tbl_len, link);
    if (gid_index < 0 || gid_index >= pa.gid_tbl_len) {
        snprintf(err, (size_t)err_len, "%s port %u: no usable GID%s", c->name, c->port,
                 gid_index >= 0 ? " at that index" : " (is the netdev up with an IP address?)");
        ibv_close_device(c->ctx);
        free(c);
        return NULL;
    }
    int type = -1;
    if (rv_gid_entry(c->ctx, c->name, c->port, gid_index, c->gid, &type) || rv_is_zero(c->gid)) {
        snprintf(err, (size_t)err_len, "%s port %u: GID index %d is empty", c->name, c->port, gid_index);
        ibv_close_device(c->ctx);
        free(c);
        return NULL;
    }
    c->gid_index = gid_index;
    c->gid_type = type;
    c->pd = ibv_alloc_pd(c->ctx);
    if (!c->pd) {
        snprintf(err, (size_t)err_len, "ibv_alloc_pd failed on %s: %s", c->name, strerror(errno));
        ibv_close_device(c->ctx);
        free(c);
        return NULL;
    }
    return c;
}

int rv_gid(rv_ctx *c, int32_t idx, uint8_t *out)
{
    int type = -1;
    if (!c || idx < 0 || idx >= c->gid_tbl_len)
        return -EINVAL;
    return rv_gid_entry(c->ctx, c->name, c->port, idx, out, &type);
}

void rv_close(rv_ctx *c)
{
    if (!c)
        return;
    if (c->pd)
        ibv_dealloc_pd(c->pd);
    if (c->ctx)
        ibv_close_device(c->ctx);
    free(c);
}

/* ---- memory ----------------------------------------------------------------- */

rv_mr *rv_reg(rv_ctx *c, uint64_t addr, uint64_t length, uint32_t access, int *err)
{
    int flags = IBV_ACCESS_LOCAL_WRITE;
    if (access & 1)
        flags |= IBV_ACCESS_REMOTE_READ;
    if (access & 2)
        flags |= IBV_ACCESS_REMOTE_WRITE;
    if (access & 4)
        flags |= IBV_ACCESS_REMOTE_ATOMIC;
    rv_mr *m = calloc(1, sizeof *m);
    if (!m) {
        *err = ENOMEM;
        return NULL;
    }
    errno = 0;
    m->mr = ibv_reg_mr(c->pd, (void *)(uintptr_t)addr, (size_t)length, flags);
    if (!m->mr) {
        *err = errno ? errno : EINVAL;
        free(m);
        return NULL;
    }
    m->lkey = m->mr->lkey;
    m->rkey = m->mr->rkey;
    *err = 0;
    return m;
}

int rv_dereg(rv_mr *m)
{
    if (!m)
        return 0;
    int rc = ibv_dereg_mr(m->mr);
    free(m);
    return -rc;
}

/* ---- workers ------------------------------------------------------------------ */

void rv_worker_free(rv_worker *w)
{
    if (!w)
        return;
    if (w->cq) {
        if (w->unacked)
            ibv_ack_cq_events(w->cq, w->unacked);
        ibv_destroy_cq(w->cq);
    }
    if (w->ppd)
        ibv_dealloc_pd(w->ppd);
    if (w->td)
        ibv_dealloc_td(w->td);
    if (w->ch)
        ibv_destroy_comp_channel(w->ch);
    if (w->wakefd >= 0)
        close(w->wakefd);
    free(w->cq_conn);
    free(w->cq_wr);
    free(w->cq_status);
    free(w->cq_value);
    free(w->cq_qpn);
    free(w->ev_conn);
    free(w->ev_code);
    free(w->rx_conn);
    free(w->rx_imm);
    free(w->qps);
    if (w->lock_ok)
        pthread_mutex_destroy(&w->lock);
    if (w->plock_ok)
        pthread_mutex_destroy(&w->plock);
    free(w);
}

/* A thread domain and a parent domain for w (flags RV_WORKER_TD); on failure w keeps none and says why */
static void rv_worker_domain(rv_ctx *c, rv_worker *w)
{
    struct ibv_td_init_attr ta;
    memset(&ta, 0, sizeof ta);
    errno = 0;
    w->td = ibv_alloc_td(c->ctx, &ta);
    if (!w->td) {
        w->domain_call = 1;
        w->domain_errno = errno ? errno : EOPNOTSUPP;
        return;
    }
    struct ibv_parent_domain_init_attr pa;
    memset(&pa, 0, sizeof pa);
    pa.pd = c->pd;
    pa.td = w->td;
    errno = 0;
    w->ppd = ibv_alloc_parent_domain(c->ctx, &pa);
    if (!w->ppd) {
        w->domain_call = 2;
        w->domain_errno = errno ? errno : EOPNOTSUPP;
        ibv_dealloc_td(w->td);
        w->td = NULL;
    }
}

/* The worker's CQ: in its parent domain if it has one, single-threaded where the provider allows
 * (every use is serialised by plock), else a plain ibv_create_cq.  0 or -1. */
static int rv_worker_cq(rv_ctx *c, rv_worker *w, uint32_t cqe)
{
    struct ibv_cq_init_attr_ex ca;
    memset(&ca, 0, sizeof ca);
    ca.cqe = cqe;
    ca.cq_context = w;
    ca.channel = w->ch;
    ca.comp_vector = (uint32_t)w->comp_vector;
    ca.wc_flags = IBV_WC_STANDARD_FLAGS;
    ca.comp_mask = IBV_CQ_INIT_ATTR_MASK_FLAGS;
    ca.flags = IBV_CREATE_CQ_ATTR_SINGLE_THREADED;
    if (w->ppd) {
        ca.comp_mask |= IBV_CQ_INIT_ATTR_MASK_PD;
        ca.parent_domain = w->ppd;
        errno = 0;
        w->cqx = ibv_create_cq_ex(c->ctx, &ca);
        if (!w->cqx) {  /* no CQ in the parent domain: give the domain up, QPs use the engine's PD */
            w->domain_call = 3;
            w->domain_errno = errno ? errno : EOPNOTSUPP;
            ibv_dealloc_pd(w->ppd);
            w->ppd = NULL;
            ibv_dealloc_td(w->td);
            w->td = NULL;
            ca.comp_mask &= ~(uint32_t)IBV_CQ_INIT_ATTR_MASK_PD;
            ca.parent_domain = NULL;
        }
    }
    if (!w->cqx)
        w->cqx = ibv_create_cq_ex(c->ctx, &ca);
    if (w->cqx) {
        w->cq = ibv_cq_ex_to_cq(w->cqx);
        w->cq_single = 1;
        w->domain = w->ppd != NULL;
        return 0;
    }
    w->cq = ibv_create_cq(c->ctx, (int)cqe, w, w->ch, w->comp_vector);
    return w->cq ? 0 : -1;
}

rv_worker *rv_worker_new(rv_ctx *c, uint32_t cq_cap, uint32_t cqe, int32_t comp_vector, uint32_t flags)
{
    rv_worker *w = calloc(1, sizeof *w);
    if (!w)
        return NULL;
    w->wakefd = -1;
    w->fd = -1;
    if (cq_cap == 0)
        cq_cap = 1;
    w->cq_cap = cq_cap;
    w->ev_cap = 1;
    w->cq_conn = calloc(cq_cap, sizeof *w->cq_conn);
    w->cq_wr = calloc(cq_cap, sizeof *w->cq_wr);
    w->cq_status = calloc(cq_cap, sizeof *w->cq_status);
    w->cq_value = calloc(cq_cap, sizeof *w->cq_value);
    w->cq_qpn = calloc(cq_cap, sizeof *w->cq_qpn);
    w->ev_conn = calloc(1, sizeof *w->ev_conn);
    w->ev_code = calloc(1, sizeof *w->ev_code);
    w->rx_conn = calloc(cq_cap, sizeof *w->rx_conn);
    w->rx_imm = calloc(cq_cap, sizeof *w->rx_imm);
    if (!w->cq_conn || !w->cq_wr || !w->cq_status || !w->cq_value || !w->cq_qpn || !w->ev_conn || !w->ev_code ||
        !w->rx_conn || !w->rx_imm)
        goto fail;
    if (pthread_mutex_init(&w->lock, NULL))
        goto fail;
    w->lock_ok = 1;
    if (pthread_mutex_init(&w->plock, NULL))
        goto fail;
    w->plock_ok = 1;
    w->comp_vector = comp_vector >= 0 ? comp_vector % (c->num_comp_vectors > 0 ? c->num_comp_vectors : 1) : 0;
    w->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->wakefd < 0)
        goto fail;
    w->ch = ibv_create_comp_channel(c->ctx);
    if (!w->ch)
        goto fail;
    w->fd = w->ch->fd;
    int fl = fcntl(w->fd, F_GETFL);
    if (fl < 0 || fcntl(w->fd, F_SETFL, fl | O_NONBLOCK) < 0)
        goto fail;
    if (flags & RV_WORKER_TD)
        rv_worker_domain(c, w);
    if (rv_worker_cq(c, w, cqe))
        goto fail;
    if (ibv_req_notify_cq(w->cq, 0))
        goto fail;
    w->armed = 1;
    return w;
fail:
    rv_worker_free(w);
    return NULL;
}

int rv_worker_wake(rv_worker *w)
{
    uint64_t one = 1;
    return write(w->wakefd, &one, sizeof one) == (ssize_t)sizeof one ? 0 : -errno;
}

static void rv_drain_events(rv_worker *w)
{
    struct ibv_cq *cq;
    void *ctx;
    while (ibv_get_cq_event(w->ch, &cq, &ctx) == 0) {
        w->unacked++;
        w->events++;
        w->armed = 0;
    }
    if (w->unacked >= RV_ACK_BATCH) {
        ibv_ack_cq_events(w->cq, w->unacked);
        w->unacked = 0;
    }
}

/* the QP with this qpn among the worker's (w->lock held), or NULL */
static rv_qp *rv_table_find(rv_worker *w, uint32_t qpn)
{
    uint32_t lo = 0, hi = w->nqps;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        uint32_t v = w->qps[mid]->qpn;
        if (v == qpn)
            return w->qps[mid];
        if (v < qpn)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static int rv_table_add(rv_worker *w, rv_qp *q)
{
    if (w->nqps == w->qps_cap) {
        uint32_t cap = w->qps_cap ? w->qps_cap * 2 : 16;
        rv_qp **n = realloc(w->qps, cap * sizeof *n);
        if (!n)
            return -ENOMEM;
        w->qps = n;
        w->qps_cap = cap;
    }
    uint32_t i = 0;
    while (i < w->nqps && w->qps[i]->qpn < q->qpn)
        i++;
    memmove(&w->qps[i + 1], &w->qps[i], (w->nqps - i) * sizeof *w->qps);
    w->qps[i] = q;
    w->nqps++;
    return 0;
}

static void rv_table_del(rv_worker *w, rv_qp *q)
{
    for (uint32_t i = 0; i < w->nqps; i++) {
        if (w->qps[i] == q) {
            memmove(&w->qps[i], &w->qps[i + 1], (w->nqps - i - 1) * sizeof *w->qps);
            w->nqps--;
            return;
        }
    }
}

/* Top the receive queue up to rq_depth with one chained ibv_post_recv (w->lock held).
 * Returns WRs posted or -errno. */
static int rv_rq_fill(rv_qp *q)
{
    if (q->rq_posted >= q->rq_depth)
        return 0;
    uint32_t n = q->rq_depth - q->rq_posted;
    uint64_t id = ((uint64_t)q->conn_id << 32) | RV_RECV_TAG | (q->rq_gen & RV_GEN_MASK);
    for (uint32_t i = 0; i < n; i++) {
        struct ibv_recv_wr *r = &q->rwrs[i];
        r->wr_id = id;
        r->sg_list = NULL;
        r->num_sge = 0;  /* WRITE_WITH_IMM puts its data where the writer said: nothing lands here */
        r->next = i + 1 < n ? &q->rwrs[i + 1] : NULL;
    }
    struct ibv_recv_wr *bad = NULL;
    int rc = ibv_post_recv(q->qp, q->rwrs, &bad);
    if (rc) {
        uint32_t ok = bad ? (uint32_t)(bad - q->rwrs) : 0;
        if (ok > n)
            ok = 0;
        q->rq_posted += ok;
        if (q->w)
            q->w->rq_errors++;
        return -rc;
    }
    q->rq_posted += n;
    if (q->w)
        q->w->rq_refills++;
    return (int)n;
}

/* a receive completion: a message (WRITE_WITH_IMM landed) or a flushed receive WR */
static void rv_on_recv(rv_worker *w, const struct ibv_wc *wc)
{
    uint32_t conn = (uint32_t)(wc->wr_id >> 32);
    uint32_t gen = (uint32_t)wc->wr_id & RV_GEN_MASK;
    int ok = wc->status == IBV_WC_SUCCESS;
    if (ok && wc->opcode == IBV_WC_RECV_RDMA_WITH_IMM && (wc->wc_flags & IBV_WC_WITH_IMM)) {
        uint32_t k = w->nrx++;
        w->rx_conn[k] = conn;
        w->rx_imm[k] = ntohl(wc->imm_data);
    }
    /* else: a flush after a QP error (never a message), or a plain SEND nobody should issue */
    pthread_mutex_lock(&w->lock);
    rv_qp *q = rv_table_find(w, wc->qp_num);
    if (q && q->conn_id == conn && (q->rq_gen & RV_GEN_MASK) == gen) {
        if (q->rq_posted)
            q->rq_posted--;
        /* refill only while healthy: receives posted to a QP in ERR would flush straight back */
        if (ok && q->rq_posted < q->rq_depth / 2)
            rv_rq_fill(q);
    }
    pthread_mutex_unlock(&w->lock);
}

static int rv_poll_into(rv_worker *w)
{
    while (w->ncq + w->nrx < w->cq_cap) {
        uint32_t room = w->cq_cap - w->ncq - w->nrx;
        int want = room < 64 ? (int)room : 64;
        int n = ibv_poll_cq(w->cq, want, w->wcs);
        if (n < 0)
            return -EIO;
        for (int i = 0; i < n; i++) {
            const struct ibv_wc *wc = &w->wcs[i];
            if ((uint32_t)wc->wr_id & RV_RECV_TAG) {
                rv_on_recv(w, wc);
                continue;
            }
            uint32_t k = w->ncq++;
            w->cq_conn[k] = (uint32_t)(wc->wr_id >> 32);
            w->cq_wr[k] = wc->wr_id;
            w->cq_status[k] = (int32_t)wc->status;
            w->cq_value[k] = wc->byte_len;
            w->cq_qpn[k] = wc->qp_num;
        }
        if (n < want)
            break;
    }
    return 0;
}

int rv_worker_poll(rv_worker *w, int timeout_ms)
{
    pthread_mutex_lock(&w->plock);
    w->ncq = 0;
    w->nev = 0;
    w->nrx = 0;
    w->woken = 0;
    w->rounds++;
    for (int pass = 0;; pass++) {
        rv_drain_events(w);
        if (w->spinning) {
            /* a busy poll is taking the completions: leave the CQ (and its re-arming) to it (see
             * rv_spin_loop: it re-arms when it found nothing, else the loop does, rv_worker_rearm) */
        } else {
            if (rv_poll_into(w))
                return -EIO;
        }
        if (!w->spinning && w->ncq + w->nrx < w->cq_cap && !w->armed) {
            if (ibv_req_notify_cq(w->cq, 0))
                return -EIO;
            w->armed = 1;
            /* completions that arrived before the re-arm raise no event: poll once more */
            if (rv_poll_into(w))
                return -EIO;
        }
        /* blocking for good (timeout_ms < 0): an event that brought nothing (a busy poll took the
         * completions) does not return to Python -- no GIL round trip per busy-polled operation --
         * only completions or rv_worker_wake (stop) do */
        if (w->ncq + w->nrx > 0 || timeout_ms == 0 || w->woken || (pass >= 1 && timeout_ms > 0))
            break;
        struct pollfd p[2] = {{w->fd, POLLIN, 0}, {w->wakefd, POLLIN, 0}};
        pthread_mutex_unlock(&w->plock);  /* never held while blocked: a busy poll may take the CQ meanwhile */
        int r = poll(p, 2, timeout_ms);
        int e = errno;
        pthread_mutex_lock(&w->plock);
        if (r < 0 && e != EINTR)
            return -e;
        if (r > 0 && (p[1].revents & POLLIN)) {
            uint64_t v;
            if (read(w->wakefd, &v, sizeof v) < 0) { /* EAGAIN: someone else drained it */ }
            w->woken = 1;
        }
    }
    if (w->ncq + w->nrx > 0)
        __atomic_add_fetch(&w->handoffs, 1, __ATOMIC_RELAXED);
    return (int)(w->ncq + w->nrx);
}

void rv_worker_release(rv_worker *w)
{
    pthread_mutex_unlock(&w->plock);
}

static uint64_t rv_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* The busy poll's loop (see rv_worker_spin); plock held on return.  While it runs, a round of the
 * worker leaves the CQ alone (w->spinning) and the busy poll wakes the worker when it ends if one did. */
static int rv_spin_loop(rv_worker *w, uint64_t start, uint32_t budget_us, uint64_t seen)
{
    uint64_t budget = (uint64_t)budget_us * 1000u;
    int n;
    w->spins++;
    pthread_mutex_lock(&w->plock);
    w->spinning = 1;
    for (uint32_t i = 1;; i++) {
        w->ncq = 0;
        w->nev = 0;
        w->nrx = 0;
        if (__atomic_load_n(&w->handoffs, __ATOMIC_RELAXED) != seen) {
            n = -1;  /* a round that began before the busy poll took completions: they wait in its queue */
            break;
        }
        if (rv_poll_into(w)) {
            n = -EIO;
            break;
        }
        n = (int)(w->ncq + w->nrx);
        if (n > 0) {
            w->spin_hits++;
            break;
        }
        pthread_mutex_unlock(&w->plock);
        /* the clock may be slow to read (an emulated HPET): every 8th pass */
        int spent = (i & 7) == 0 && rv_now_ns() - start >= budget;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        pthread_mutex_lock(&w->plock);
        if (spent)
            break;
    }
    w->spinning = 0;
    if ((n == 0 || n == -1) && !w->armed) {
        /* nothing of ours came in time: the operation is now awaited through the worker, whose
         * event needs the CQ armed (and what arrived before the arm raises none: poll once more) */
        if (ibv_req_notify_cq(w->cq, 0)) {
            n = -EIO;
        } else {
            w->armed = 1;
            if (rv_poll_into(w))
                n = -EIO;
            else if (w->ncq + w->nrx > 0)
                n = (int)(w->ncq + w->nrx);
        }
    }
    /* after a hit the CQ stays un-armed: a depth-1 caller's next busy poll takes its completion
     * without an event (no wake-up of the worker thread, no re-arm syscall per operation); the
     * loop re-arms it once it gets back to its other work (rv_worker_rearm, call_soon) */
    w->spin_ns += rv_now_ns() - start;
    return n;
}

int rv_worker_rearm(rv_worker *w)
{
    pthread_mutex_lock(&w->plock);
    w->ncq = 0;
    w->nev = 0;
    w->nrx = 0;
    if (w->spinning || w->armed)
        return 0;
    if (ibv_req_notify_cq(w->cq, 0))
        return -EIO;
    w->armed = 1;
    if (rv_poll_into(w))
        return -EIO;
    return (int)(w->ncq + w->nrx);
}

int rv_worker_spin(rv_worker *w, uint32_t budget_us, uint64_t seen)
{
    return rv_spin_loop(w, rv_now_ns(), budget_us, seen);
}

int rv_post_spin(rv_qp *q, rv_worker *w, uint64_t wr_id, int op, uint64_t raddr, uint64_t length, uint64_t local,
                 uint32_t rkey, uint32_t lkey, uint64_t max_msg, uint32_t budget_us, uint64_t seen)
{
    uint64_t start = rv_now_ns();
    int rc = rv_post_one(q, wr_id, op, raddr, length, local, rkey, lkey, max_msg);
    if (rc < 0) {
        pthread_mutex_lock(&w->plock);
        w->ncq = 0;
        w->nev = 0;
        w->nrx = 0;
        return -RV_POSTED_NOT - (-rc);
    }
    int n = rv_spin_loop(w, start, budget_us, seen);
    if (n == 1 && w->ncq == 1 && w->cq_wr[0] == wr_id && w->cq_status[0] == IBV_WC_SUCCESS) {
        w->ncq = 0;
        pthread_mutex_unlock(&w->plock);
        return RV_SPIN_MINE;
    }
    return n;
}

uint32_t rv_worker_backlog(rv_worker *w)
{
    return w->ncq + w->nrx >= w->cq_cap;
}

/* ---- queue pairs ------------------------------------------------------------- */

void rv_qp_free(rv_qp *q)
{
    if (!q)
        return;
    if (q->w) {  /* the poll thread must not refill a QP that is going away */
        pthread_mutex_lock(&q->w->lock);
        rv_table_del(q->w, q);
        pthread_mutex_unlock(&q->w->lock);
        q->w = NULL;
    }
    if (q->qp) {
        rv_worker *pw = q->pw;
        if (pw)  /* a provider may clean the QP's entries out of the CQ */
            pthread_mutex_lock(&pw->plock);
        ibv_destroy_qp(q->qp);
        if (pw)
            pthread_mutex_unlock(&pw->plock);
    }
    free(q->wrs);
    free(q->sges);
    free(q->rwrs);
    free(q);
}

rv_qp *rv_qp_new(rv_ctx *c, rv_worker *w, uint32_t conn_id, uint32_t max_wr, uint32_t rq_depth, uint32_t rd_atomic,
                 int *err)
{
    if (!c || !w || !err) {
        if (err)
            *err = EINVAL;
        return NULL;
    }
    rv_qp *q = calloc(1, sizeof *q);
    if (!q) {
        *err = ENOMEM;
        return NULL;
    }
    if (max_wr == 0)
        max_wr = 1;
    if (rq_depth < 2)
        rq_depth = 2;
    q->c = c;
    q->conn_id = conn_id;
    q->rd_atomic = rd_atomic ? rd_atomic : 1;
    q->rq_depth = rq_depth;
    q->wrs = calloc(max_wr, sizeof *q->wrs);
    q->sges = calloc(max_wr, sizeof *q->sges);
    q->rwrs = calloc(rq_depth, sizeof *q->rwrs);
    if (!q->wrs || !q->sges || !q->rwrs) {
        *err = ENOMEM;
        rv_qp_free(q);
        return NULL;
    }
    struct ibv_qp_init_attr ia;
    memset(&ia, 0, sizeof ia);
    ia.send_cq = w->cq;
    ia.recv_cq = w->cq;
    ia.qp_type = IBV_QPT_RC;
    ia.sq_sig_all = 0;
    ia.cap.max_send_wr = max_wr;
    ia.cap.max_recv_wr = rq_depth;
    ia.cap.max_send_sge = 1;
    ia.cap.max_recv_sge = 1;
    errno = 0;
    q->qp = ibv_create_qp(w->ppd ? w->ppd : c->pd, &ia);
    if (!q->qp) {
        *err = errno ? errno : EINVAL;
        rv_qp_free(q);
        return NULL;
    }
    q->pw = w;
    q->max_wr = max_wr;
    q->qpn = q->qp->qp_num;
    int rc = rv_qp_init(q);
    if (rc) {
        *err = -rc;
        rv_qp_free(q);
        return NULL;
    }
    pthread_mutex_lock(&w->lock);
    rc = rv_table_add(w, q);
    if (rc == 0) {
        q->w = w;
        rc = rv_rq_fill(q);  /* receives may be posted from INIT on */
        rc = rc < 0 ? rc : 0;
    }
    pthread_mutex_unlock(&w->lock);
    if (rc) {
        *err = -rc;
        rv_qp_free(q);
        return NULL;
    }
    *err = 0;
    return q;
}

int rv_qp_init(rv_qp *q)
{
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_INIT;
    a.pkey_index = 0;
    a.port_num = (uint8_t)q->c->port;
    a.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE |
                        IBV_ACCESS_REMOTE_ATOMIC;
    return -ibv_modify_qp(q->qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
}

int rv_qp_rtr(rv_qp *q, uint32_t dest_qpn, uint32_t rq_psn, const uint8_t *dgid, uint16_t dlid, int32_t mtu)
{
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_RTR;
    a.path_mtu = (enum ibv_mtu)(mtu >= 1 && mtu <= 5 ? mtu : q->c->active_mtu);
    a.dest_qp_num = dest_qpn & 0xffffff;
    a.rq_psn = rq_psn & 0xffffff;
    a.max_dest_rd_atomic = (uint8_t)q->rd_atomic;
    a.min_rnr_timer = 12;
    a.ah_attr.port_num = (uint8_t)q->c->port;
    a.ah_attr.dlid = dlid;
    a.ah_attr.sl = 0;
    a.ah_attr.src_path_bits = 0;
    if (q->c->link_layer == 2 || dlid == 0) {
        a.ah_attr.is_global = 1;
        memcpy(a.ah_attr.grh.dgid.raw, dgid, 16);
        a.ah_attr.grh.sgid_index = (uint8_t)q->c->gid_index;
        a.ah_attr.grh.hop_limit = 64;
        a.ah_attr.grh.traffic_class = 0;
        a.ah_attr.grh.flow_label = 0;
    }
    return -ibv_modify_qp(q->qp, &a,
                          IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                              IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
}

int rv_qp_rts(rv_qp *q, uint32_t sq_psn)
{
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_RTS;
    a.timeout = 16;   /* 4.096 us * 2^16 = 268 ms per try */
    a.retry_cnt = 6;  /* 7 tries: a dead peer errors after ~1.9 s */
    a.rnr_retry = 7;
    a.sq_psn = sq_psn & 0xffffff;
    a.max_rd_atomic = (uint8_t)q->rd_atomic;
    return -ibv_modify_qp(q->qp, &a,
                          IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                              IBV_QP_MAX_QP_RD_ATOMIC);
}

int rv_qp_reset(rv_qp *q)
{
    /* a new generation: completions of the old receive WRs (flushes) no longer count */
    if (q->w) {
        pthread_mutex_lock(&q->w->lock);
        q->rq_gen = (q->rq_gen + 1) & RV_GEN_MASK;
        q->rq_posted = 0;
        pthread_mutex_unlock(&q->w->lock);
    }
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_RESET;
    if (q->pw)  /* to RESET, a provider may clean the QP's entries out of the CQ */
        pthread_mutex_lock(&q->pw->plock);
    int rc = ibv_modify_qp(q->qp, &a, IBV_QP_STATE);
    if (q->pw)
        pthread_mutex_unlock(&q->pw->plock);
    if (rc)
        return -rc;
    rc = rv_qp_init(q);
    if (rc)
        return rc;
    if (q->w) {  /* RESET dropped every receive WR: post a full pool again */
        pthread_mutex_lock(&q->w->lock);
        rc = rv_rq_fill(q);
        pthread_mutex_unlock(&q->w->lock);
        if (rc < 0)
            return rc;
    }
    return 0;
}

uint32_t rv_qp_rq_posted(rv_qp *q)
{
    if (!q || !q->w)
        return 0;
    pthread_mutex_lock(&q->w->lock);
    uint32_t n = q->rq_posted;
    pthread_mutex_unlock(&q->w->lock);
    return n;
}

int rv_qp_error(rv_qp *q)
{
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_ERR;
    return -ibv_modify_qp(q->qp, &a, IBV_QP_STATE);
}

int rv_qp_state(rv_qp *q)
{
    struct ibv_qp_attr a;
    struct ibv_qp_init_attr ia;
    int rc = ibv_query_qp(q->qp, &a, IBV_QP_STATE, &ia);
    return rc ? -rc : (int)a.qp_state;
}

static uint64_t rv_clamp_msg(uint64_t max_msg)
{
    if (max_msg == 0 || max_msg > RV_MAX_SGE_BYTES)
        return RV_MAX_SGE_BYTES;
    return max_msg;
}

uint64_t rv_count_wrs(uint32_t n, const uint64_t *lengths, uint64_t max_msg)
{
    max_msg = rv_clamp_msg(max_msg);
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++)
        total += (lengths[i] + max_msg - 1) / max_msg;
    return total;
}

static int rv_add_rw(rv_qp *q, uint32_t *k, uint64_t wr_id, enum ibv_wr_opcode opcode, uint64_t raddr,
                     uint64_t len, uint64_t local, uint32_t rkey, uint32_t lkey, uint64_t max_msg)
{
    while (len > 0) {
        if (*k >= q->max_wr)
            return -E2BIG;
        uint64_t part = len < max_msg ? len : max_msg;
        struct ibv_sge *s = &q->sges[*k];
        struct ibv_send_wr *wr = &q->wrs[*k];
        s->addr = local;
        s->length = (uint32_t)part;
        s->lkey = lkey;
        memset(wr, 0, sizeof *wr);
        wr->wr_id = wr_id;
        wr->sg_list = s;
        wr->num_sge = 1;
        wr->opcode = opcode;
        wr->wr.rdma.remote_addr = raddr;
        wr->wr.rdma.rkey = rkey;
        if (*k > 0)
            q->wrs[*k - 1].next = wr;
        (*k)++;
        raddr += part;
        local += part;
        len -= part;
    }
    return 0;
}

static int rv_ring(rv_qp *q, uint32_t k)
{
    if (k == 0)
        return 0;
    q->wrs[k - 1].next = NULL;
    q->wrs[k - 1].send_flags = IBV_SEND_SIGNALED;
    struct ibv_send_wr *bad = NULL;
    int rc = ibv_post_send(q->qp, q->wrs, &bad);
    return rc ? -rc : (int)k;
}

int rv_post_rw(rv_qp *q, uint64_t wr_id, int op, uint32_t n, uint64_t rbase, const uint64_t *roffs,
               const uint64_t *lengths, const uint64_t *local, uint32_t rkey, uint32_t lkey, uint64_t max_msg)
{
    if (op != 1 && op != 2)
        return -EINVAL;
    enum ibv_wr_opcode opcode = op == 1 ? IBV_WR_RDMA_READ : IBV_WR_RDMA_WRITE;
    max_msg = rv_clamp_msg(max_msg);
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        int rc = rv_add_rw(q, &k, wr_id, opcode, rbase + roffs[i], lengths[i], local[i], rkey, lkey, max_msg);
        if (rc)
            return rc;
    }
    return rv_ring(q, k);
}

int rv_post_one(rv_qp *q, uint64_t wr_id, int op, uint64_t raddr, uint64_t length, uint64_t local,
                uint32_t rkey, uint32_t lkey, uint64_t max_msg)
{
    if (op != 1 && op != 2)
        return -EINVAL;
    uint32_t k = 0;
    int rc = rv_add_rw(q, &k, wr_id, op == 1 ? IBV_WR_RDMA_READ : IBV_WR_RDMA_WRITE, raddr, length, local, rkey,
                       lkey, rv_clamp_msg(max_msg));
    return rc ? rc : rv_ring(q, k);
}

int rv_post_write_imm(rv_qp *q, uint64_t wr_id, uint64_t raddr, uint64_t length, uint64_t local, uint32_t rkey,
                      uint32_t lkey, uint32_t imm, uint64_t max_msg)
{
    if ((uint32_t)wr_id & RV_RECV_TAG)
        return -EINVAL;
    uint32_t k = 0;
    if (length > 0) {
        int rc = rv_add_rw(q, &k, wr_id, IBV_WR_RDMA_WRITE, raddr, length, local, rkey, lkey, rv_clamp_msg(max_msg));
        if (rc)
            return rc;
    } else {  /* zero-length: only the immediate travels (no rkey check at the target, C9-88) */
        struct ibv_send_wr *wr = &q->wrs[0];
        memset(wr, 0, sizeof *wr);
        wr->wr_id = wr_id;
        wr->sg_list = NULL;
        wr->num_sge = 0;
        wr->wr.rdma.remote_addr = raddr;
        wr->wr.rdma.rkey = rkey;
        k = 1;
    }
    /* the last WR carries the immediate: the target hears of it after every byte landed */
    struct ibv_send_wr *last = &q->wrs[k - 1];
    last->opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
    last->imm_data = htonl(imm);
    return rv_ring(q, k);
}

int rv_post_atomic(rv_qp *q, uint64_t wr_id, int op, uint64_t raddr, uint32_t rkey, uint64_t a, uint64_t b,
                   uint64_t local, uint32_t lkey)
{
    if (op != 3 && op != 4)
        return -EINVAL;
    struct ibv_sge *s = &q->sges[0];
    struct ibv_send_wr *wr = &q->wrs[0];
    s->addr = local;
    s->length = 8;
    s->lkey = lkey;
    memset(wr, 0, sizeof *wr);
    wr->wr_id = wr_id;
    wr->sg_list = s;
    wr->num_sge = 1;
    wr->opcode = op == 3 ? IBV_WR_ATOMIC_FETCH_AND_ADD : IBV_WR_ATOMIC_CMP_AND_SWP;
    wr->wr.atomic.remote_addr = raddr;
    wr->wr.atomic.rkey = rkey;
    wr->wr.atomic.compare_add = a;
    wr->wr.atomic.swap = b;
    return rv_ring(q, 1);
}
