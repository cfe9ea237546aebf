"""cffi build script for the SPOP frame codec (out-of-line API mode).

setuptools runs it from the project root (see setup.py); `python build_ffi.py`
builds in place for quick experiments.
"""

from cffi import FFI

# The subset of csrc/spop.h that Python calls; the C compiler checks it
# against the real header when the module is built.
CDEF = """
typedef struct spop_item {
    uint64_t num;
    uint32_t name_off;
    uint32_t name_len;
    uint32_t val_off;
    uint32_t val_len;
    uint8_t kind;
    uint8_t type;
    uint8_t nargs;
    uint8_t action;
    uint8_t scope;
    uint8_t pad_[3];
} spop_item;

typedef struct spop_frame {
    uint64_t sid;
    uint64_t fid;
    uint32_t flags;
    uint32_t offset;
    uint32_t length;
    uint32_t payload_off;
    uint32_t payload_len;
    uint32_t first_item;
    uint32_t n_items;
    uint8_t type;
    uint8_t items_parsed;
    uint8_t pad_[2];
} spop_frame;

int spop_varint_decode(const uint8_t *buf, size_t len, uint64_t *value);
int spop_varint_encode(uint64_t value, uint8_t *out, size_t cap);
int spop_decode_frames(const uint8_t *buf, size_t len, uint32_t max_frame_size,
                       spop_frame *frames, uint32_t max_frames,
                       spop_item *items, uint32_t max_items,
                       uint32_t *n_frames);
int spop_encode_frames(uint8_t *out, size_t cap, uint32_t max_frame_size,
                       spop_frame *frames, uint32_t n_frames,
                       const spop_item *items, uint32_t n_items,
                       const uint8_t *strings, size_t strings_len);
int spop_encode_acks(uint8_t *out, size_t cap, uint32_t max_frame_size,
                     const uint64_t *ids, const uint32_t *ends, uint32_t n,
                     const uint8_t *payload, size_t payload_len);
#define SPOP_INDEX_OTHER ...
enum spop_batch_out { SPOP_OUT_FRAMES, SPOP_OUT_PLAIN, SPOP_OUT_ITEMS, SPOP_OUT_END,
                      SPOP_OUT_STATUS, SPOP_OUT_HEAD, ... };
#define SPOP_FRAME_MIN_LEN ...
#define SPOP_MIN_FRAME_SIZE ...
#define SPOP_DEFAULT_FRAME_SIZE ...
#define SPOP_MAX_FRAME_SIZE ...
#define SPOP_FRAME_HDR_MAX ...
typedef struct spop_batch {
    spop_frame *frames;
    spop_item *items;
    uint64_t *out;
    const uint8_t *names;
    uint32_t names_len;
    uint32_t n_names;
    uint32_t max_frames;
    uint32_t max_items;
} spop_batch;
int spop_decode_batch(const uint8_t *buf, size_t len, size_t start, uint32_t max_frame_size,
                      spop_batch *b);
const char *spop_status_reason(int status);
"""

# --- load generator (csrc/loadgen.h), the hot loop of `spoa-mp bench` ---
LOADGEN_CDEF = """
#define SPOP_LG_HIST_BUCKETS ...
#define SPOP_LG_MAX_CONNECTIONS ...
#define SPOP_LG_MAX_IN_FLIGHT ...
enum spop_lg_rc { SPOP_LG_OK, SPOP_LG_E_ADDR, SPOP_LG_E_ARG, SPOP_LG_E_NOMEM,
                  SPOP_LG_E_SYS, SPOP_LG_E_CODEC, SPOP_LG_E_STATE, ... };
enum spop_lg_sids { SPOP_LG_SIDS_3X, SPOP_LG_SIDS_26, ... };
enum spop_lg_err { SPOP_LG_ERR_CONNECT, SPOP_LG_ERR_CLOSED, SPOP_LG_ERR_HELLO,
                   SPOP_LG_ERR_DISCONNECT, SPOP_LG_ERR_MALFORMED, SPOP_LG_ERR_ACK_UNKNOWN,
                   SPOP_LG_ERR_ACK_DUPLICATE, SPOP_LG_ERR_UNEXPECTED, SPOP_LG_ERR_UNANSWERED,
                   SPOP_LG_ERR_KINDS, ... };
enum spop_lg_phase { SPOP_LG_PHASE_OPEN, SPOP_LG_PHASE_WARMUP, SPOP_LG_PHASE_RUNNING,
                     SPOP_LG_PHASE_DRAINING, SPOP_LG_PHASE_CLOSING, SPOP_LG_PHASE_DONE, ... };

typedef struct spop_lg_config {
    const char *host;
    const char *unix_path;
    const char *capabilities;
    uint32_t port;
    uint32_t connections;
    uint32_t in_flight;
    uint32_t ipv6_percent;
    uint32_t sid_style;
    uint32_t max_frame_size;
    uint32_t pool_size;
    uint32_t reserved_;
    uint64_t warmup_ns;
    uint64_t duration_ns;
    uint64_t max_messages;
    uint64_t drain_ns;
    uint64_t seed;
} spop_lg_config;

typedef struct spop_lg_result {
    uint64_t sent;
    uint64_t acked;
    uint64_t measured;
    uint64_t measured_ns;
    uint64_t elapsed_ns;
    uint64_t lat_count;
    uint64_t lat_min_ns;
    uint64_t lat_max_ns;
    uint64_t lat_sum_ns;
    uint64_t errors_total;
    uint64_t errors[...];
    int32_t sys_errno;
    int32_t last_status;
    uint32_t phase;
    uint32_t connections_open;
    uint32_t connections_ready;
    uint32_t no_pipelining;
    uint32_t max_frame_size;
    uint32_t reserved_;
    char last_message[...];
    uint64_t hist[...];
} spop_lg_result;

typedef struct spop_lg_state spop_lg_state;

size_t spop_lg_state_size(void);
int spop_lg_open(spop_lg_state *st, const spop_lg_config *cfg, spop_lg_result *res);
int spop_lg_run(spop_lg_state *st, uint64_t slice_ns);
void spop_lg_stop(spop_lg_state *st);
void spop_lg_close(spop_lg_state *st);
uint32_t spop_lg_hist_index(uint64_t ns);
uint64_t spop_lg_hist_value(uint32_t index);
uint64_t spop_lg_percentile(const spop_lg_result *res, double q);
const char *spop_lg_error_name(int kind);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.cdef(LOADGEN_CDEF)
ffibuilder.set_source(
    "spoa_mp._spop",
    '#include "spop.h"\n#include "loadgen.h"',
    sources=["csrc/spop.c", "csrc/loadgen.c"],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
