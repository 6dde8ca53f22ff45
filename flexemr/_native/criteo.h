/* Text columns (Arrow layout: validity bitmap, int32 offsets, bytes) parsed into integers, and
   categorical values hashed into bags, for flexemr.core.textcols.  Each call is one pass over its
   input and holds no Python state, so cffi releases the GIL around it.

   A value is missing when its validity bit is 0 (valid == NULL: every value valid) or it is empty.
   The parsers return -1 when every value is well formed, the row of the first malformed value
   (>= 0), or -2 - row for the first row whose offsets decrease or leave [0, data_len]; their
   outputs are unspecified from that row on. */

/* Decimal integers: an optional '-' then at least one digit, within [lo, hi] (int64 overflow is
   out of range).  out[i] = value (0 when missing), missing[i] = 1 when missing; with missing_ok == 0
   a missing value is malformed. */
int64_t fxc_parse_dec(const uint8_t *valid, int64_t bit0, const int32_t *offsets, const uint8_t *data,
                      int64_t data_len, int64_t n, int64_t lo, int64_t hi, int missing_ok, int64_t *out, uint8_t *missing);

/* Hex strings: 1 to max_digits (<= 15) digits 0-9a-fA-F.  out[i] = value, or -1 when missing. */
int64_t fxc_parse_hex(const uint8_t *valid, int64_t bit0, const int32_t *offsets, const uint8_t *data,
                      int64_t data_len, int64_t n, int max_digits, int64_t *out);

/* Bags of nfeat features of n samples: value v = values[f * feature_stride + i * sample_stride]
   (elements); v < 0 is missing (an empty bag), else the bag holds one row
   splitmix64_finaliser(v + 0x9E3779B97F4A7C15 * (salt[f] + 1)) % num_rows[f].
   ids receives the rows, feature-major, and offsets (nfeat * n + 1) the start of each bag in ids:
   offsets[f * n + i + 1] - offsets[f * n + i] is 0 or 1.  Returns how many ids (ids must hold
   nfeat * n). */
int64_t fxc_hash_bags(const int64_t *values, int64_t feature_stride, int64_t sample_stride, int64_t n,
                      int64_t nfeat, const int64_t *salt, const uint64_t *num_rows, int64_t *ids,
                      int64_t *offsets);

/* Where the first empty line of data[0:len] starts (line ends: \n, \r and \r\n), or -1. */
int64_t fxc_empty_line(const uint8_t *data, int64_t len);
