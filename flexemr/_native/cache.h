/* flexemr ranker row cache: the native parts of flexemr.core.cache.RowCache.
 *
 * This header is also the cffi cdef (flexemr/_native/cache_build.py): plain
 * declarations only.  Every array is owned by the caller (numpy); nothing is
 * allocated here, so a cache is freed with its arrays.
 *
 * Index: an open-addressing hash table of `mask + 1` (a power of two) int64
 * keys and values, linear probing; a key is >= 0, an empty entry holds
 * FXC_EMPTY and a deleted one FXC_TOMB.  A key's home entry is
 *     (uint64)key * 0x9E3779B97F4A7C15 >> shift
 * with shift = 64 - log2(mask + 1).  The caller keeps the table at most half
 * full (live + tombstones), so every probe ends at an empty entry.
 *
 * LRU log: (tick, slot) pairs in non-decreasing tick order, appended when a
 * slot's last use is set.  An entry is current when the slot is occupied
 * (slot_key[slot] >= 0) and last_use[slot] == tick; stale entries are
 * skipped (and dropped) lazily.  The current entries, head to tail, are the
 * occupied slots from least to most recently used.
 */

#define FXC_EMPTY -1
#define FXC_TOMB -2

/* Table position of every key (-1 when absent); returns how many were found. */
int64_t fxc_find(const int64_t *tkeys, int64_t mask, int shift, const int64_t *keys, int64_t n, int64_t *out_pos);

/* Insert n distinct keys known to be absent with their values; returns how
 * many empty entries (not tombstones) they took. */
int64_t fxc_put(int64_t *tkeys, int64_t *tvals, int64_t mask, int shift, const int64_t *keys, const int64_t *vals,
                int64_t n);

/* Delete keys (absent ones are ignored, duplicates counted once); returns how many were deleted. */
int64_t fxc_delete(int64_t *tkeys, int64_t mask, int shift, const int64_t *keys, int64_t n);

/* A lookup's uses: for every id (key = key_base | ids[i]), its slot (the
 * index value) or -1 in out_slot[i]; a hit's last use becomes
 * max(last_use, tick0 + i) and its frequency grows by one.  With log_slot
 * non-NULL the hits are appended to the LRU log at *log_tail (room for n
 * entries is the caller's).  Returns the number of hits. */
int64_t fxc_probe(const int64_t *tkeys, const int64_t *tvals, int64_t mask, int shift, const int64_t *ids, int64_t n,
                  int64_t key_base, int64_t tick0, int64_t *last_use, int64_t *freq, int64_t *out_slot,
                  int64_t *log_tick, int64_t *log_slot, int64_t *log_tail);

/* Pop up to k least recently used unprotected slots from the LRU log
 * [*head, tail) into victims; protect[slot] != 0 marks slots that must stay
 * (their current entries are kept in the log).  Returns how many were
 * found; *head moves past what was consumed. */
int64_t fxc_lru_victims(int64_t *log_tick, int64_t *log_slot, int64_t *head, int64_t tail, const int64_t *last_use,
                        const int64_t *slot_key, const uint8_t *protect, int64_t k, int64_t *victims);

/* Move the current entries of the LRU log [head, tail) to its front, in
 * order; returns their count (the new tail, head being 0). */
int64_t fxc_lru_compact(int64_t *log_tick, int64_t *log_slot, int64_t head, int64_t tail, const int64_t *last_use,
                        const int64_t *slot_key);

/* A pooled lookup's occurrences probed and split by what the cache does with
 * them, without a sort: ids[0..n) (bags by offsets[0..num_bags]) are
 * deduplicated with a scratch hash table (dkeys/didx, dmask + 1 entries, a
 * power of two >= 2n; filled with FXC_EMPTY here), each distinct id probed
 * once in order of first occurrence (ticks tick0, tick0 + 1, ...: a use of a
 * hit, logged as in fxc_probe).  A miss whose id occurs at least `admit`
 * times is admitted (read raw, then cached).  Out, in occurrence order and
 * grouped by bag: hit_slot[0..nh), hit_off[num_bags + 1], hit_w (weights,
 * when w != NULL); adm_pos[0..na) (positions k), adm_off[num_bags + 1]; every miss (admitted or not)
 * likewise in miss_pos[0..n - nh), miss_off[num_bags + 1] (what is read raw when the table is not pooled
 * by servers: one read per table);
 * here[k] = 1 for hits and admitted occurrences, else 0; inv[k] the
 * distinct id's index.  uslot and ucount
 * are scratch of n entries.  counts[0] receives the distinct ids, counts[1]
 * the distinct hits, counts[2] the admitted occurrences, counts[3] the
 * other occurrences ("the rest") that lie in bags holding 2 or more of them.  Returns the hit
 * occurrences, -1 when the offsets are not non-decreasing from 0 to n, or -2 when an id lies outside
 * [0, max_id] (counts[0]: its position; nothing but the scratch changed).  Each id is read once, so
 * what is checked is what is used (the GIL is released: another thread may write the arrays). */
int64_t fxc_probe_split(const int64_t *tkeys, const int64_t *tvals, int64_t mask, int shift, int64_t key_base,
                        int64_t tick0, int64_t *last_use, int64_t *freq, int64_t *log_tick, int64_t *log_slot,
                        int64_t *log_tail, const int64_t *ids, int64_t n, const int64_t *offsets, int64_t num_bags,
                        const float *w, int64_t admit, int64_t max_id, int64_t *dkeys, int64_t *didx, int64_t dmask,
                        int64_t *uslot, int64_t *ucount, int64_t *inv, int64_t *hit_slot, int64_t *hit_off,
                        float *hit_w, int64_t *adm_pos, int64_t *adm_off, int64_t *miss_pos, int64_t *miss_off,
                        uint8_t *here, int64_t *counts);

/* RowCache.insert of n sorted unique ids (keys key_base | ids[i]) with an LRU log, n <= capacity: row i
 * (row_bytes bytes at rows + i * row_bytes) is copied into its slot of the arena (slot_bytes per slot) and
 * used at tick tick0 + i.  Cached ids are overwritten in place; new ids evict the least recently used
 * slots that this insert does not use (victims freed onto free_stack[0..*nfree) first), then take
 * free_stack's last entries in order, and go into the index (the caller made room: at most half full
 * after it).  Every use is appended to the log (room for n entries is the caller's).  protect (capacity
 * entries, zero) and scratch (3n) are working space.  counts receives [new ids, evictions, empty index
 * entries taken].  Returns 0; -1 when the log held fewer evictable slots than needed (not expected:
 * then nothing changed but the log's head, which was consumed: the caller relogs every slot and inserts
 * by itself); -2, nothing changed, when the ids are not strictly increasing within [0, max_id] (each is
 * read once, then used as checked: the GIL is released). */
int64_t fxc_insert(int64_t *tkeys, int64_t *tvals, int64_t mask, int shift, int64_t key_base, const int64_t *ids,
                   int64_t n, const uint8_t *rows, int64_t row_bytes, uint8_t *arena, int64_t slot_bytes,
                   int64_t *slot_key, int64_t *last_use, int64_t *freq, int64_t *free_stack, int64_t *nfree,
                   int64_t tick0, int64_t *log_tick, int64_t *log_slot, int64_t *log_head, int64_t *log_tail,
                   uint8_t *protect, int64_t max_id, int64_t *scratch, int64_t *counts);
