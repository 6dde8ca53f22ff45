/* Binding pooling requests to native jobs (fxk_bind_request, see kernel.h).
 *
 * The request format is flexemr.core.poolwire's (version 2):
 *     HEAD  12 bytes, then per job a 24-byte header
 *           u64 n, u32 B, u32 shard, u16 name_len, u8 id_bytes, u8 flags, 4 x 0,
 *     the names (padded to 8), then per job offsets (B + 1) x i64 (not with
 *     flags & 2: one id per bag, n == B), ids n x id_bytes (padded), and with
 *     flags & 1 weights n x f32 (padded).
 * Only the layout is checked here (sizes, widths, flags, bag counts against
 * the template); ids and offsets are checked by fxk_run like any job's.
 * The sections are 8-byte aligned relative to each other, not to the head
 * (12 + 24 x jobs bytes): the arrays are read where they lie, as the views
 * decode_request makes (x86-64 and aarch64 load them unaligned). */

#define FXK_REQ_HEAD 12
#define FXK_REQ_JOB 24

static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint64_t pad8(uint64_t n) { return (n + 7) & ~(uint64_t)7; }

int fxk_bind_request(fxk_job *jobs, const fxk_job *tmpl, int64_t n_jobs, const uint8_t *req, int64_t size,
                     const int64_t *out_off, char *out_base) {
    if (jobs == NULL || tmpl == NULL || req == NULL || n_jobs < 0 || size < 0 || (size >> 48) != 0) return FXK_EARG;
    uint64_t usize = (uint64_t)size;
    uint64_t pos = FXK_REQ_HEAD + (uint64_t)n_jobs * FXK_REQ_JOB;
    if (pos > usize || rd16(req + 6) != (uint64_t)n_jobs) return FXK_EOFFSETS;
    uint64_t names = 0;
    for (int64_t i = 0; i < n_jobs; i++) names += rd16(req + FXK_REQ_HEAD + i * FXK_REQ_JOB + 16);
    pos += pad8(names);
    if (pos > usize) return FXK_EOFFSETS;
    for (int64_t i = 0; i < n_jobs; i++) {
        const uint8_t *h = req + FXK_REQ_HEAD + i * FXK_REQ_JOB;
        uint64_t n = rd64(h), nb = rd32(h + 8);
        uint32_t id_bytes = h[18], flags = h[19];
        const fxk_job *t = &tmpl[i];
        int one = (flags & 2) != 0;
        if ((id_bytes != 4 && id_bytes != 8) || (flags & ~3u) || (int64_t)nb != t->num_bags || n > usize ||
            ((flags & 1) != 0) != (t->weights != NULL) || (one && (n != nb || t->offsets == NULL)))
            return FXK_EOFFSETS;
        /* n <= size < 2^48 and nb < 2^32: no sum below overflows */
        uint64_t offs = pos, ids = one ? pos : offs + 8 * (nb + 1), w = ids + pad8(n * id_bytes);
        uint64_t end = (flags & 1) ? w + pad8(4 * n) : w;
        if (end > usize) return FXK_EOFFSETS;
        fxk_job *j = &jobs[i];
        *j = *t;
        /* one id per bag: the template's offsets (0 .. B: a request of its kind has the same B) */
        j->offsets = one ? t->offsets : (const int64_t *)(req + offs);
        j->ids = req + ids;
        j->id_bytes = (int32_t)id_bytes;
        j->n_ids = (int64_t)n;
        j->weights = (flags & 1) ? (const float *)(req + w) : NULL;
        j->out = out_base + out_off[i];
        j->status = FXK_OK;
        j->bad_pos = -1;
        pos = end;
    }
    return pos == usize ? FXK_OK : FXK_EOFFSETS;
}
