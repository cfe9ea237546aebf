/*
 * loadgen.h - SPOP load generator: the hot loop of `spoa-mp bench`.
 *
 * Speaks SPOP to an agent the way HAProxy does: HAPROXY-HELLO, then NOTIFY
 * "check-client-ip" frames (one unnamed IPV4 or IPV6 argument), C
 * connections with up to P NOTIFYs in flight on each, checking that every
 * ACK matches an outstanding (stream-id, frame-id) of its connection, and
 * recording each message's latency in a log-linear histogram.
 *
 * Single-threaded, non-blocking sockets, epoll. Every frame is encoded and
 * decoded with the codec of spop.h. All memory is allocated by
 * spop_lg_open() and released by spop_lg_close(); spop_lg_run() allocates
 * nothing. Targets are limited to 127.0.0.1, ::1 and unix sockets: this
 * tool must never load an outside host.
 *
 * Use:
 *     spop_lg_state *st = calloc(1, spop_lg_state_size());   (or ffi.new)
 *     spop_lg_result res;                                     (caller-owned)
 *     spop_lg_config cfg = {...};
 *     if (spop_lg_open(st, &cfg, &res) < 0) ... spop_lg_close(st)
 *     while (spop_lg_run(st, 250000000) > 0)   read res: live progress
 *         ;
 *     spop_lg_close(st);                       res holds the final figures
 *
 * Return contract: >= 0 success (spop_lg_run: 1 = call again, 0 = finished),
 * < 0 one of enum spop_lg_rc (res->sys_errno holds errno for SPOP_LG_E_SYS).
 * Problems on the wire are never return codes: they are counted in
 * res->errors[] by kind (enum spop_lg_err).
 */
#ifndef SPOP_LOADGEN_H
#define SPOP_LOADGEN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SPOP_LG_MAX_CONNECTIONS 1024
#define SPOP_LG_MAX_IN_FLIGHT 1024
#define SPOP_LG_DEFAULT_POOL 4096        /* pre-encoded NOTIFY frames */
#define SPOP_LG_MAX_POOL (1u << 20)
#define SPOP_LG_DEFAULT_DRAIN_NS 1000000000ull
#define SPOP_LG_CLOSE_WAIT_NS 250000000ull /* wait for AGENT-DISCONNECT at the end */

/*
 * Latency histogram, in nanoseconds. Values below 128 ns have a bucket each;
 * above, every power of two is split in 128 linear sub-buckets, so a bucket
 * is at most 1/128 of its value wide and its midpoint is within 0.4% of any
 * value in it. 29 powers of two above 128 ns cover up to 2^35 ns (34 s);
 * longer latencies land in the last bucket (max stays exact).
 */
#define SPOP_LG_HIST_SUB_BITS 7
#define SPOP_LG_HIST_MAX_EXP 34
#define SPOP_LG_HIST_BUCKETS 3712 /* (SPOP_LG_HIST_MAX_EXP - 5) << SPOP_LG_HIST_SUB_BITS */

enum spop_lg_rc {
    SPOP_LG_OK = 0,
    SPOP_LG_E_ADDR = -1,      /* not 127.0.0.1, ::1 or a unix socket path */
    SPOP_LG_E_ARG = -2,       /* a config value out of range */
    SPOP_LG_E_NOMEM = -3,
    SPOP_LG_E_SYS = -4,       /* a system call failed (epoll, socket); see sys_errno */
    SPOP_LG_E_CODEC = -5,     /* the codec refused to encode a frame (a bug) */
    SPOP_LG_E_STATE = -6,     /* call out of order (run before open, ...) */
};

/* Stream-id schemes: HAProxy 3.1+ (per connection 1, 3, 5, ..., fid 1) or
 * 2.6 (one counter for all connections from 0: 0, 1, 2, ..., fid 1). */
enum spop_lg_sids {
    SPOP_LG_SIDS_3X = 0,
    SPOP_LG_SIDS_26 = 1,
};

/* What went wrong, counted in spop_lg_result.errors[]. */
enum spop_lg_err {
    SPOP_LG_ERR_CONNECT = 0,      /* connect() failed */
    SPOP_LG_ERR_CLOSED = 1,       /* the agent closed or reset the connection */
    SPOP_LG_ERR_HELLO = 2,        /* AGENT-HELLO refused (version, max-frame-size, ids) or missing at the end */
    SPOP_LG_ERR_DISCONNECT = 3,   /* the agent sent AGENT-DISCONNECT */
    SPOP_LG_ERR_MALFORMED = 4,    /* a frame the codec rejects, too big, or fragmented */
    SPOP_LG_ERR_ACK_UNKNOWN = 5,  /* ACK for ids never sent on this run */
    SPOP_LG_ERR_ACK_DUPLICATE = 6,/* ACK for ids sent before but no longer outstanding here */
    SPOP_LG_ERR_UNEXPECTED = 7,   /* a frame type that has no business here */
    SPOP_LG_ERR_UNANSWERED = 8,   /* NOTIFY without ACK: left after the drain, or lost with its connection */
    SPOP_LG_ERR_KINDS = 9,
};

enum spop_lg_phase {
    SPOP_LG_PHASE_OPEN = 0,       /* opened, spop_lg_run not called yet */
    SPOP_LG_PHASE_WARMUP = 1,     /* sending; nothing recorded */
    SPOP_LG_PHASE_RUNNING = 2,    /* sending; ACKs counted and timed */
    SPOP_LG_PHASE_DRAINING = 3,   /* no new NOTIFY; waiting for outstanding ACKs */
    SPOP_LG_PHASE_CLOSING = 4,    /* HAPROXY-DISCONNECT sent; waiting for AGENT-DISCONNECT */
    SPOP_LG_PHASE_DONE = 5,
};

/* Caller-owned; copied by spop_lg_open (strings included). Zero means "the
 * default" for max_frame_size, pool_size, drain_ns and capabilities. */
typedef struct spop_lg_config {
    const char *host;            /* "127.0.0.1" or "::1"; unused when unix_path is set */
    const char *unix_path;       /* AF_UNIX socket path, or NULL */
    const char *capabilities;    /* HELLO capabilities; NULL = "pipelining,async" (2.6) */
    uint32_t port;               /* 1..65535 */
    uint32_t connections;        /* 1..SPOP_LG_MAX_CONNECTIONS */
    uint32_t in_flight;          /* NOTIFYs outstanding per connection, 1..SPOP_LG_MAX_IN_FLIGHT */
    uint32_t ipv6_percent;       /* 0..100: share of NOTIFYs carrying an IPV6 address */
    uint32_t sid_style;          /* enum spop_lg_sids */
    uint32_t max_frame_size;     /* announced in HELLO; 0 = 16380; 256..16380 */
    uint32_t pool_size;          /* distinct pre-encoded NOTIFYs; 0 = SPOP_LG_DEFAULT_POOL */
    uint32_t reserved_;
    uint64_t warmup_ns;          /* sent but neither counted nor timed */
    uint64_t duration_ns;        /* measured window after the warmup; 0 = until max_messages */
    uint64_t max_messages;       /* NOTIFYs to send in the window; 0 = until duration_ns */
    uint64_t drain_ns;           /* wait for outstanding ACKs at the end; 0 = 1 s */
    uint64_t seed;               /* IP addresses and engine-id */
} spop_lg_config;

/* Caller-owned, written in place by spop_lg_open / spop_lg_run: the counters
 * may be read between two spop_lg_run calls (live progress). */
typedef struct spop_lg_result {
    uint64_t sent;               /* NOTIFY frames queued, all phases */
    uint64_t acked;              /* matching ACKs, all phases */
    uint64_t measured;           /* matching ACKs received in the measured window */
    uint64_t measured_ns;        /* length of the measured window so far */
    uint64_t elapsed_ns;         /* since the first spop_lg_run */
    uint64_t lat_count;          /* latencies in hist (window and drain) */
    uint64_t lat_min_ns;
    uint64_t lat_max_ns;
    uint64_t lat_sum_ns;
    uint64_t errors_total;
    uint64_t errors[SPOP_LG_ERR_KINDS];
    int32_t sys_errno;           /* errno of the last failed system call (connect, recv, ...) */
    int32_t last_status;         /* status-code of the last AGENT-DISCONNECT, or the HELLO problem; -1 none */
    uint32_t phase;              /* enum spop_lg_phase */
    uint32_t connections_open;   /* sockets currently open */
    uint32_t connections_ready;  /* handshakes completed (cumulative) */
    uint32_t no_pipelining;      /* agents that did not announce pipelining (1 in flight there) */
    uint32_t max_frame_size;     /* negotiated on the last handshake */
    uint32_t reserved_;
    char last_message[256];      /* message of the last AGENT-DISCONNECT, NUL-terminated */
    uint64_t hist[SPOP_LG_HIST_BUCKETS];
} spop_lg_result;

typedef struct spop_lg_state spop_lg_state; /* opaque; caller allocates spop_lg_state_size() bytes */

size_t spop_lg_state_size(void);

/*
 * Check the config, resolve the address, pre-encode the HELLO and the pool of
 * NOTIFYs, allocate every buffer, zero *res and start the connections
 * (non-blocking). On error, everything allocated is released already (calling
 * spop_lg_close is still harmless). *res must stay valid until spop_lg_close.
 */
int spop_lg_open(spop_lg_state *st, const spop_lg_config *cfg, spop_lg_result *res);

/* Run the event loop for at most slice_ns (the first call starts the clock).
 * Returns 1 when there is more to do, 0 when the run is finished (res final),
 * < 0 on a local failure (epoll). */
int spop_lg_run(spop_lg_state *st, uint64_t slice_ns);

/* End the measured window now (Ctrl-C): drain, close, then finish. */
void spop_lg_stop(spop_lg_state *st);

/* Close every socket and free every buffer; idempotent. */
void spop_lg_close(spop_lg_state *st);

/* Histogram helpers. */
uint32_t spop_lg_hist_index(uint64_t ns);
uint64_t spop_lg_hist_value(uint32_t index); /* a bucket's midpoint, ns */
/* The q-quantile (0 <= q <= 1) of res->hist, clamped to [lat_min, lat_max];
 * 0 when nothing was recorded. */
uint64_t spop_lg_percentile(const spop_lg_result *res, double q);

/* "connect", "closed", ... for enum spop_lg_err; "?" when out of range. */
const char *spop_lg_error_name(int kind);

#ifdef __cplusplus
}
#endif

#endif /* SPOP_LOADGEN_H */
