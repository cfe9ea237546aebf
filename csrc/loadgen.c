/*
 * loadgen.c - SPOP load generator (see loadgen.h).
 *
 * One epoll loop over C connections. Per connection: a read buffer that
 * holds at least one frame of the announced max-frame-size, a write buffer
 * sized for P NOTIFYs plus the handshake, and the P outstanding
 * (stream-id, send time) pairs. The NOTIFY payloads are encoded once, at
 * open, by the codec; the loop only picks one, gives it ids and lets
 * spop_encode_frames write the frames of a batch (header + copied payload).
 * Replies are decoded by spop_decode_frames, one call per read.
 */
#define _GNU_SOURCE
#include "loadgen.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "spop.h"

#define LG_MAGIC 0x53504c47u     /* "SPLG": the state is open */
#define RX_FRAMES 256u           /* frame records per decode call */
#define EVENTS 256
#define RBUF_EXTRA 16384u        /* read-buffer room beyond one whole frame */
#define NOTIFY_MAX 64u           /* 4 + 25 header + 35 payload (IPV6 argument) */
#define WBUF_EXTRA 1024u         /* HELLO and DISCONNECT frames */
#define SID_MAX 0x7fffffffull    /* HAProxy matches ids as 31/32-bit values */
#define CAPS_MAX 128u
#define HOST_MAX 64u

static const char MESSAGE_NAME[] = "check-client-ip";

enum conn_phase {
    C_DEAD = 0,      /* closed (or never opened) */
    C_CONNECTING,    /* non-blocking connect() in progress */
    C_HELLO,         /* HAPROXY-HELLO queued, waiting for AGENT-HELLO */
    C_READY,         /* sending NOTIFYs */
    C_CLOSING,       /* HAPROXY-DISCONNECT queued, waiting for AGENT-DISCONNECT or EOF */
};

struct lg_conn {
    int fd;
    uint8_t phase;
    uint8_t out_armed;       /* EPOLLOUT in the interest set */
    uint8_t sid_wrapped;
    uint8_t pad_;
    uint32_t limit;          /* in flight allowed: P, or 1 without pipelining */
    uint32_t n_out;
    uint32_t mfs;            /* frame-size limit: announced, then negotiated */
    uint64_t next_sid;       /* SPOP_LG_SIDS_3X */
    uint64_t *out_sid;       /* outstanding NOTIFYs (fid is always 1) */
    uint64_t *out_t;         /* their send time, ns */
    uint8_t *rbuf;
    uint32_t rlen, rcap;
    uint8_t *wbuf;
    uint32_t woff, wlen, wcap;
};

struct spop_lg_state {
    uint32_t magic;
    int fatal;               /* sticky local failure, returned by spop_lg_run */
    int epfd;
    int phase;               /* enum spop_lg_phase */
    spop_lg_config cfg;
    spop_lg_result *res;
    char host[HOST_MAX];
    char caps[CAPS_MAX];
    struct sockaddr_storage addr;
    socklen_t addrlen;
    uint32_t mfs;            /* announced max-frame-size */
    struct lg_conn *conns;
    uint32_t n_conns;
    uint32_t n_live;         /* connections not C_DEAD */
    /* pre-encoded NOTIFY frames (ids 0/0): payload i is
     * pool[pool_off[i] .. + pool_len[i]) */
    uint8_t *pool;
    size_t pool_bytes;
    uint32_t *pool_off;
    uint32_t *pool_len;
    uint32_t pool_n, pool_next;
    spop_frame *tx;          /* in_flight records, one batch of NOTIFYs */
    spop_frame *rx;          /* RX_FRAMES records */
    spop_item *items;
    uint32_t max_items;
    uint8_t hello[512];
    uint32_t hello_len;
    uint8_t bye[128];        /* HAPROXY-DISCONNECT status 0 "normal" */
    uint32_t bye_len;
    uint64_t t_start, t_warm, t_stop, t_stopped, t_drain_end, t_close_end;
    uint64_t next_gsid;      /* SPOP_LG_SIDS_26 */
    int gsid_wrapped;
    int stop_requested;
    uint64_t sent_window;    /* NOTIFYs sent in the measured window */
    uint64_t n_out_total;
    uint64_t rng;
};

/* ------------------------------------------------------------ helpers */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static size_t bounded_strlen(const char *s, size_t max)
{
    size_t n = 0;
    while (n < max && s[n])
        n++;
    return n;
}

static void count_error(spop_lg_state *st, int kind, uint64_t n)
{
    if (!n)
        return;
    st->res->errors[kind] += n;
    st->res->errors_total += n;
}

/* ------------------------------------------------------------ histogram */

uint32_t spop_lg_hist_index(uint64_t ns)
{
    if (ns < (1u << SPOP_LG_HIST_SUB_BITS))
        return (uint32_t)ns;
    if (ns >> (SPOP_LG_HIST_MAX_EXP + 1))
        return SPOP_LG_HIST_BUCKETS - 1;
    unsigned e = 63u - (unsigned)__builtin_clzll(ns);   /* 7 .. MAX_EXP */
    unsigned sub = (unsigned)(ns >> (e - SPOP_LG_HIST_SUB_BITS)) & ((1u << SPOP_LG_HIST_SUB_BITS) - 1);
    return ((e - (SPOP_LG_HIST_SUB_BITS - 1)) << SPOP_LG_HIST_SUB_BITS) + sub;
}

uint64_t spop_lg_hist_value(uint32_t index)
{
    if (index < (1u << SPOP_LG_HIST_SUB_BITS))
        return index;
    if (index >= SPOP_LG_HIST_BUCKETS)
        index = SPOP_LG_HIST_BUCKETS - 1;
    unsigned e = (index >> SPOP_LG_HIST_SUB_BITS) + (SPOP_LG_HIST_SUB_BITS - 1);
    uint64_t sub = index & ((1u << SPOP_LG_HIST_SUB_BITS) - 1);
    unsigned shift = e - SPOP_LG_HIST_SUB_BITS;
    uint64_t low = ((1ull << SPOP_LG_HIST_SUB_BITS) + sub) << shift;
    return low + ((1ull << shift) >> 1);
}

uint64_t spop_lg_percentile(const spop_lg_result *res, double q)
{
    if (!res || !res->lat_count)
        return 0;
    if (!(q > 0.0))
        return res->lat_min_ns;
    if (q >= 1.0)
        return res->lat_max_ns;
    double r = q * (double)res->lat_count;
    uint64_t rank = (uint64_t)r;
    if ((double)rank < r)
        rank++;
    if (rank < 1)
        rank = 1;
    uint64_t cum = 0;
    for (uint32_t i = 0; i < SPOP_LG_HIST_BUCKETS; i++) {
        cum += res->hist[i];
        if (cum >= rank) {
            uint64_t v = spop_lg_hist_value(i);
            if (v < res->lat_min_ns)
                v = res->lat_min_ns;
            if (v > res->lat_max_ns)
                v = res->lat_max_ns;
            return v;
        }
    }
    return res->lat_max_ns;
}

static void record_latency(spop_lg_result *res, uint64_t ns)
{
    res->hist[spop_lg_hist_index(ns)]++;
    if (!res->lat_count || ns < res->lat_min_ns)
        res->lat_min_ns = ns;
    if (ns > res->lat_max_ns)
        res->lat_max_ns = ns;
    res->lat_sum_ns += ns;
    res->lat_count++;
}

const char *spop_lg_error_name(int kind)
{
    switch (kind) {
    case SPOP_LG_ERR_CONNECT: return "connect";
    case SPOP_LG_ERR_CLOSED: return "closed";
    case SPOP_LG_ERR_HELLO: return "hello";
    case SPOP_LG_ERR_DISCONNECT: return "disconnect";
    case SPOP_LG_ERR_MALFORMED: return "malformed";
    case SPOP_LG_ERR_ACK_UNKNOWN: return "ack_unknown";
    case SPOP_LG_ERR_ACK_DUPLICATE: return "ack_duplicate";
    case SPOP_LG_ERR_UNEXPECTED: return "unexpected";
    case SPOP_LG_ERR_UNANSWERED: return "unanswered";
    default: return "?";
    }
}

size_t spop_lg_state_size(void)
{
    return sizeof(struct spop_lg_state);
}

/* ------------------------------------------------------------ encoding */

/* A strings buffer for the codec: append bytes, get their offset. */
typedef struct {
    uint8_t *buf;
    uint32_t len, cap;
    int overflow;
} strbuf;

static uint32_t sb_add(strbuf *sb, const void *p, uint32_t n)
{
    uint32_t off = sb->len;
    if (n > sb->cap - sb->len) {
        sb->overflow = 1;
        return 0;
    }
    memcpy(sb->buf + sb->len, p, n);
    sb->len += n;
    return off;
}

static void kv_string(spop_item *it, strbuf *sb, const char *key, const char *val, uint32_t val_len)
{
    memset(it, 0, sizeof(*it));
    it->kind = SPOP_ITEM_KV;
    it->name_len = (uint32_t)strlen(key);
    it->name_off = sb_add(sb, key, it->name_len);
    it->type = SPOP_DATA_STRING;
    it->val_len = val_len;
    it->val_off = sb_add(sb, val, val_len);
}

static void kv_uint(spop_item *it, strbuf *sb, const char *key, uint64_t v)
{
    memset(it, 0, sizeof(*it));
    it->kind = SPOP_ITEM_KV;
    it->name_len = (uint32_t)strlen(key);
    it->name_off = sb_add(sb, key, it->name_len);
    it->type = SPOP_DATA_UINT32;
    it->num = v;
}

/* Encode one KV-list frame with ids 0/0; returns its size or 0. */
static uint32_t encode_kv_frame(uint8_t *out, size_t cap, uint8_t type,
                                const spop_item *items, uint32_t n, const strbuf *sb)
{
    spop_frame f;
    memset(&f, 0, sizeof(f));
    f.type = type;
    f.flags = SPOP_FLAG_FIN;
    f.n_items = n;
    if (sb->overflow)
        return 0;
    int rc = spop_encode_frames(out, cap, SPOP_DEFAULT_FRAME_SIZE, &f, 1, items, n, sb->buf, sb->len);
    if (rc != 1 || f.n_items != n)
        return 0;
    return 4 + f.length;
}

static uint32_t encode_disconnect(uint8_t *out, size_t cap, int status)
{
    uint8_t strings[128];
    strbuf sb = {strings, 0, sizeof(strings), 0};
    spop_item it[2];
    const char *msg = spop_status_reason(status);
    kv_uint(&it[0], &sb, "status-code", (uint64_t)(uint32_t)status);
    kv_string(&it[1], &sb, "message", msg, (uint32_t)strlen(msg));
    return encode_kv_frame(out, cap, SPOP_FRAME_HAPROXY_DISCONNECT, it, 2, &sb);
}

static int encode_hello(spop_lg_state *st)
{
    static const char hex[] = "0123456789abcdef";
    char uuid[37];
    uint64_t a = splitmix64(&st->rng), b = splitmix64(&st->rng);
    uint8_t raw[16];
    for (int i = 0; i < 8; i++) {
        raw[i] = (uint8_t)(a >> (8 * i));
        raw[8 + i] = (uint8_t)(b >> (8 * i));
    }
    raw[6] = (uint8_t)((raw[6] & 0x0f) | 0x40); /* UUID version 4 */
    raw[8] = (uint8_t)((raw[8] & 0x3f) | 0x80); /* variant 1 */
    int p = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            uuid[p++] = '-';
        uuid[p++] = hex[raw[i] >> 4];
        uuid[p++] = hex[raw[i] & 15];
    }
    uuid[p] = 0;

    uint8_t strings[384];
    strbuf sb = {strings, 0, sizeof(strings), 0};
    spop_item it[4];
    kv_string(&it[0], &sb, "supported-versions", "2.0", 3);
    kv_uint(&it[1], &sb, "max-frame-size", st->mfs);
    kv_string(&it[2], &sb, "capabilities", st->caps, (uint32_t)strlen(st->caps));
    kv_string(&it[3], &sb, "engine-id", uuid, 36);
    st->hello_len = encode_kv_frame(st->hello, sizeof(st->hello), SPOP_FRAME_HAPROXY_HELLO, it, 4, &sb);
    st->bye_len = encode_disconnect(st->bye, sizeof(st->bye), SPOP_ST_NORMAL);
    return st->hello_len && st->bye_len ? 0 : SPOP_LG_E_CODEC;
}

/* Encode the pool of NOTIFY payloads: the first round(n * ipv6%) carry an
 * IPV6 address, then the order is shuffled. */
static int encode_pool(spop_lg_state *st)
{
    enum { CHUNK = 64 };
    uint32_t n = st->pool_n;
    uint32_t n6 = (uint32_t)(((uint64_t)n * st->cfg.ipv6_percent + 50) / 100);
    const uint32_t name_len = (uint32_t)(sizeof(MESSAGE_NAME) - 1);
    size_t done = 0;
    for (uint32_t base = 0; base < n; base += CHUNK) {
        uint8_t strings[sizeof(MESSAGE_NAME) + CHUNK * 16];
        strbuf sb = {strings, 0, sizeof(strings), 0};
        spop_frame fr[CHUNK];
        spop_item it[2 * CHUNK];
        uint32_t k = n - base < CHUNK ? n - base : CHUNK;
        uint32_t name_off = sb_add(&sb, MESSAGE_NAME, name_len);
        memset(fr, 0, sizeof(fr));
        memset(it, 0, sizeof(it));
        for (uint32_t j = 0; j < k; j++) {
            int v6 = base + j < n6;
            uint8_t ip[16];
            uint64_t r1 = splitmix64(&st->rng), r2 = splitmix64(&st->rng);
            memcpy(ip, &r1, 8);
            memcpy(ip + 8, &r2, 8);
            if (v6)
                ip[0] = (uint8_t)(0x20 | (ip[0] & 0x1f)); /* 2000::/3, global unicast */
            spop_item *m = &it[2 * j], *a = &it[2 * j + 1];
            m->kind = SPOP_ITEM_MESSAGE;
            m->name_off = name_off;
            m->name_len = name_len;
            m->nargs = 1;
            a->kind = SPOP_ITEM_ARG;
            a->type = v6 ? SPOP_DATA_IPV6 : SPOP_DATA_IPV4;
            a->val_len = v6 ? 16 : 4;
            a->val_off = sb_add(&sb, ip, a->val_len);
            fr[j].type = SPOP_FRAME_NOTIFY;
            fr[j].flags = SPOP_FLAG_FIN;
            fr[j].first_item = 2 * j;
            fr[j].n_items = 2;
        }
        if (sb.overflow)
            return SPOP_LG_E_CODEC;
        int rc = spop_encode_frames(st->pool + done, st->pool_bytes - done, st->mfs,
                                    fr, k, it, 2 * k, sb.buf, sb.len);
        if (rc != (int)k)
            return SPOP_LG_E_CODEC;
        for (uint32_t j = 0; j < k; j++) {
            if (fr[j].n_items != 2 || fr[j].length < 7)
                return SPOP_LG_E_CODEC;
            /* ids 0/0 take one byte each: the payload starts 4 + 7 bytes in */
            st->pool_off[base + j] = (uint32_t)(done + fr[j].offset + 11);
            st->pool_len[base + j] = fr[j].length - 7;
        }
        done += fr[k - 1].offset + 4 + fr[k - 1].length;
    }
    for (uint32_t i = n; i > 1; i--) { /* Fisher-Yates */
        uint32_t j = (uint32_t)(splitmix64(&st->rng) % i);
        uint32_t t = st->pool_off[i - 1];
        st->pool_off[i - 1] = st->pool_off[j];
        st->pool_off[j] = t;
        t = st->pool_len[i - 1];
        st->pool_len[i - 1] = st->pool_len[j];
        st->pool_len[j] = t;
    }
    return 0;
}

/* ------------------------------------------------------------ connections */

static void set_interest(spop_lg_state *st, struct lg_conn *c, int out)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | (out ? EPOLLOUT : 0);
    ev.data.u32 = (uint32_t)(c - st->conns);
    if (epoll_ctl(st->epfd, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->out_armed = (uint8_t)(out != 0);
}

/* Close a connection. Its outstanding NOTIFYs are lost: counted unanswered
 * unless the run already counted them (closing phase). */
static void conn_close(spop_lg_state *st, struct lg_conn *c)
{
    if (c->phase == C_DEAD)
        return;
    if (st->phase < SPOP_LG_PHASE_CLOSING)
        count_error(st, SPOP_LG_ERR_UNANSWERED, c->n_out);
    st->n_out_total -= c->n_out;
    c->n_out = 0;
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->phase = C_DEAD;
    c->out_armed = 0;
    c->rlen = c->woff = c->wlen = 0;
    st->n_live--;
    st->res->connections_open--;
}

static void conn_fail(spop_lg_state *st, struct lg_conn *c, int kind, int err)
{
    count_error(st, kind, 1);
    if (err)
        st->res->sys_errno = err;
    conn_close(st, c);
}

/* Send what is queued; arm EPOLLOUT for the rest. Returns 0 if the
 * connection is still open. */
static int conn_flush(spop_lg_state *st, struct lg_conn *c)
{
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            c->woff += (uint32_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->out_armed)
                set_interest(st, c, 1);
            return 0;
        }
        if (c->phase == C_CLOSING)
            conn_close(st, c);
        else
            conn_fail(st, c, SPOP_LG_ERR_CLOSED, n < 0 ? errno : EPIPE);
        return -1;
    }
    c->woff = c->wlen = 0;
    if (c->out_armed)
        set_interest(st, c, 0);
    return 0;
}

/* Room for n more bytes at the end of the write buffer (compacts it). */
static int conn_wroom(struct lg_conn *c, uint32_t n)
{
    if (c->woff) {
        memmove(c->wbuf, c->wbuf + c->woff, c->wlen - c->woff);
        c->wlen -= c->woff;
        c->woff = 0;
    }
    return c->wcap - c->wlen >= n;
}

static void conn_queue(struct lg_conn *c, const uint8_t *p, uint32_t n)
{
    if (conn_wroom(c, n)) {
        memcpy(c->wbuf + c->wlen, p, n);
        c->wlen += n;
    }
}

static uint64_t take_sid(spop_lg_state *st, struct lg_conn *c)
{
    uint64_t s;
    if (st->cfg.sid_style == SPOP_LG_SIDS_26) {
        s = st->next_gsid;
        if (s >= SID_MAX) {
            st->next_gsid = 0;
            st->gsid_wrapped = 1;
        } else {
            st->next_gsid = s + 1;
        }
        return s;
    }
    s = c->next_sid;
    if (s + 2 > SID_MAX) {
        c->next_sid = 1;
        c->sid_wrapped = 1;
    } else {
        c->next_sid = s + 2;
    }
    return s;
}

/* Whether (sid, fid) was ever handed out (for telling duplicates from
 * unknown ids). */
static int was_issued(const spop_lg_state *st, const struct lg_conn *c, uint64_t sid, uint64_t fid)
{
    if (fid != 1 || sid > SID_MAX)
        return 0;
    if (st->cfg.sid_style == SPOP_LG_SIDS_26)
        return st->gsid_wrapped || sid < st->next_gsid;
    return (sid & 1) && (c->sid_wrapped || sid < c->next_sid);
}

/* Top the connection up to its in-flight limit: one encode call, one send. */
static void conn_fill(spop_lg_state *st, struct lg_conn *c)
{
    if (c->phase != C_READY || st->fatal)
        return;
    if (st->phase != SPOP_LG_PHASE_WARMUP && st->phase != SPOP_LG_PHASE_RUNNING)
        return;
    uint64_t room = c->limit - c->n_out;
    if (st->phase == SPOP_LG_PHASE_RUNNING && st->cfg.max_messages) {
        uint64_t left = st->cfg.max_messages - st->sent_window;
        if (left < room)
            room = left;
    }
    if (!room)
        return;
    uint32_t k = (uint32_t)room;
    if (!conn_wroom(c, k * NOTIFY_MAX)) { /* cannot happen: wcap holds P NOTIFYs */
        st->fatal = SPOP_LG_E_CODEC;
        return;
    }
    for (uint32_t i = 0; i < k; i++) {
        spop_frame *f = &st->tx[i];
        uint32_t p = st->pool_next;
        st->pool_next = p + 1 == st->pool_n ? 0 : p + 1;
        f->sid = take_sid(st, c);
        f->fid = 1;
        f->flags = SPOP_FLAG_FIN;
        f->type = SPOP_FRAME_NOTIFY;
        f->first_item = 0;
        f->n_items = 0;
        f->payload_off = st->pool_off[p];
        f->payload_len = st->pool_len[p];
        c->out_sid[c->n_out + i] = f->sid;
    }
    int rc = spop_encode_frames(c->wbuf + c->wlen, c->wcap - c->wlen, c->mfs, st->tx, k,
                                NULL, 0, st->pool, st->pool_bytes);
    if (rc != (int)k) {
        st->fatal = SPOP_LG_E_CODEC;
        return;
    }
    c->wlen += st->tx[k - 1].offset + 4 + st->tx[k - 1].length;
    uint64_t t = now_ns();
    for (uint32_t i = 0; i < k; i++)
        c->out_t[c->n_out + i] = t;
    c->n_out += k;
    st->n_out_total += k;
    st->res->sent += k;
    if (st->phase == SPOP_LG_PHASE_RUNNING)
        st->sent_window += k;
    conn_flush(st, c);
}

static int key_is(const uint8_t *base, const spop_item *it, const char *key)
{
    size_t n = strlen(key);
    return it->name_len == n && memcmp(base + it->name_off, key, n) == 0;
}

/* "M.m" with blanks around, HAProxy's rule: 1000 * M + m == 2000. */
static int version_is_20(const uint8_t *p, uint32_t n)
{
    uint32_t i = 0, major = 0, minor = 0, digits = 0;
    while (i < n && (p[i] == ' ' || p[i] == '\t'))
        i++;
    for (digits = 0; i < n && p[i] >= '0' && p[i] <= '9' && digits < 4; i++, digits++)
        major = major * 10 + (uint32_t)(p[i] - '0');
    if (!digits || i >= n || p[i] != '.')
        return 0;
    i++;
    for (digits = 0; i < n && p[i] >= '0' && p[i] <= '9' && digits < 4; i++, digits++)
        minor = minor * 10 + (uint32_t)(p[i] - '0');
    if (!digits || minor > 999)
        return 0;
    while (i < n && (p[i] == ' ' || p[i] == '\t'))
        i++;
    return i == n && major * 1000 + minor == 2000;
}

/* Whether a comma/blank separated capability list holds `name`. */
static int has_capability(const uint8_t *p, uint32_t n, const char *name)
{
    size_t len = strlen(name);
    uint32_t i = 0;
    while (i < n) {
        while (i < n && (p[i] == ',' || p[i] == ' ' || p[i] == '\t'))
            i++;
        uint32_t start = i;
        while (i < n && p[i] != ',' && p[i] != ' ' && p[i] != '\t')
            i++;
        if (i - start == len && memcmp(p + start, name, len) == 0)
            return 1;
    }
    return 0;
}

/* Check an AGENT-HELLO; returns 0 (connection ready) or the SPOP status
 * HAProxy would send. */
static int check_hello(spop_lg_state *st, struct lg_conn *c, const uint8_t *base, const spop_frame *f)
{
    if (!(f->flags & SPOP_FLAG_FIN))
        return SPOP_ST_FRAG_NOT_SUPPORTED;
    if (f->sid || f->fid || !f->items_parsed)
        return SPOP_ST_INVALID;
    int have_version = 0, pipelining = 0;
    uint64_t mfs = 0;
    for (uint32_t k = 0; k < f->n_items; k++) {
        const spop_item *it = &st->items[f->first_item + k];
        if (key_is(base, it, "version")) {
            if (it->type != SPOP_DATA_STRING)
                return SPOP_ST_INVALID;
            if (!version_is_20(base + it->val_off, it->val_len))
                return SPOP_ST_BAD_VSN;
            have_version = 1;
        } else if (key_is(base, it, "max-frame-size")) {
            if (it->type < SPOP_DATA_INT32 || it->type > SPOP_DATA_UINT64)
                return SPOP_ST_INVALID;
            mfs = it->num;
            if (mfs < SPOP_MIN_FRAME_SIZE || mfs > st->mfs)
                return SPOP_ST_BAD_FRAME_SIZE;
        } else if (key_is(base, it, "capabilities")) {
            if (it->type != SPOP_DATA_STRING)
                return SPOP_ST_INVALID;
            pipelining = has_capability(base + it->val_off, it->val_len, "pipelining");
        }
    }
    if (!have_version)
        return SPOP_ST_NO_VSN;
    if (!mfs)
        return SPOP_ST_NO_FRAME_SIZE;
    c->mfs = (uint32_t)mfs;
    c->limit = pipelining ? st->cfg.in_flight : 1;
    if (!pipelining && st->cfg.in_flight > 1)
        st->res->no_pipelining++;
    st->res->max_frame_size = (uint32_t)mfs;
    return 0;
}

/* AGENT-DISCONNECT: its status-code (-1 if absent); with `keep`, record it
 * and its message in the result. */
static int read_disconnect(spop_lg_state *st, const uint8_t *base, const spop_frame *f, int keep)
{
    int status = -1;
    for (uint32_t k = 0; f->items_parsed && k < f->n_items; k++) {
        const spop_item *it = &st->items[f->first_item + k];
        if (key_is(base, it, "status-code") && it->type >= SPOP_DATA_INT32 &&
            it->type <= SPOP_DATA_UINT64) {
            status = it->num > INT32_MAX ? INT32_MAX : (int)it->num;
        } else if (keep && key_is(base, it, "message") && it->type == SPOP_DATA_STRING) {
            char *msg = st->res->last_message;
            uint32_t cap = (uint32_t)sizeof(st->res->last_message) - 1;
            uint32_t n = it->val_len < cap ? it->val_len : cap;
            memcpy(msg, base + it->val_off, n);
            msg[n] = 0;
        }
    }
    if (keep)
        st->res->last_status = status;
    return status;
}

static void on_ack(spop_lg_state *st, struct lg_conn *c, const spop_frame *f, uint64_t now)
{
    uint32_t n = c->n_out;
    uint32_t j = 0;
    if (f->fid == 1)
        while (j < n && c->out_sid[j] != f->sid)
            j++;
    else
        j = n;
    if (j == n) {
        count_error(st, was_issued(st, c, f->sid, f->fid) ? SPOP_LG_ERR_ACK_DUPLICATE
                                                          : SPOP_LG_ERR_ACK_UNKNOWN, 1);
        return;
    }
    uint64_t lat = now > c->out_t[j] ? now - c->out_t[j] : 0;
    c->out_sid[j] = c->out_sid[n - 1];
    c->out_t[j] = c->out_t[n - 1];
    c->n_out = n - 1;
    st->n_out_total--;
    st->res->acked++;
    if (st->phase == SPOP_LG_PHASE_RUNNING || st->phase == SPOP_LG_PHASE_DRAINING) {
        record_latency(st->res, lat);
        if (st->phase == SPOP_LG_PHASE_RUNNING)
            st->res->measured++;
    }
}

enum { FRAME_NEXT = 0, FRAME_DEAD = -1, FRAME_REDECODE = 1 };

static int on_frame(spop_lg_state *st, struct lg_conn *c, const uint8_t *base,
                    const spop_frame *f, uint64_t now)
{
    switch (f->type) {
    case SPOP_FRAME_ACK:
        if (c->phase == C_CLOSING)
            return FRAME_NEXT; /* HAProxy ignores everything but AGENT-DISCONNECT now */
        if (c->phase != C_READY) {
            conn_fail(st, c, SPOP_LG_ERR_UNEXPECTED, 0);
            return FRAME_DEAD;
        }
        if (!(f->flags & SPOP_FLAG_FIN) || (f->flags & SPOP_FLAG_ABORT) || !f->items_parsed) {
            conn_fail(st, c, SPOP_LG_ERR_MALFORMED, 0);
            return FRAME_DEAD;
        }
        on_ack(st, c, f, now);
        return FRAME_NEXT;
    case SPOP_FRAME_AGENT_HELLO: {
        if (c->phase != C_HELLO) {
            conn_fail(st, c, SPOP_LG_ERR_UNEXPECTED, 0);
            return FRAME_DEAD;
        }
        int status = check_hello(st, c, base, f);
        if (status) {
            uint8_t frame[128];
            uint32_t n = encode_disconnect(frame, sizeof(frame), status);
            st->res->last_status = status;
            if (n) { /* best effort, as HAProxy does */
                conn_queue(c, frame, n);
                (void)send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL | MSG_DONTWAIT);
            }
            conn_fail(st, c, SPOP_LG_ERR_HELLO, 0);
            return FRAME_DEAD;
        }
        c->phase = C_READY;
        st->res->connections_ready++;
        return FRAME_REDECODE; /* the rest must be decoded under the negotiated size */
    }
    case SPOP_FRAME_AGENT_DISCONNECT: {
        if (c->phase == C_CLOSING && read_disconnect(st, base, f, 0) == 0) {
            conn_close(st, c); /* the answer to our HAPROXY-DISCONNECT */
            return FRAME_DEAD;
        }
        st->res->last_message[0] = 0;
        read_disconnect(st, base, f, 1);
        conn_fail(st, c, SPOP_LG_ERR_DISCONNECT, 0);
        return FRAME_DEAD;
    }
    default:
        count_error(st, SPOP_LG_ERR_UNEXPECTED, 1); /* skipped, as the spec allows */
        return FRAME_NEXT;
    }
}

/* Decode and handle every whole frame buffered; returns 0 if still open. */
static int conn_process(spop_lg_state *st, struct lg_conn *c, uint64_t now)
{
    uint32_t pos = 0;
    for (;;) {
        uint32_t n = 0;
        const uint8_t *base = c->rbuf + pos;
        int rc = spop_decode_frames(base, c->rlen - pos, c->mfs, st->rx, RX_FRAMES,
                                    st->items, st->max_items, &n);
        int redecode = 0;
        uint32_t i;
        for (i = 0; i < n; i++) {
            int r = on_frame(st, c, base, &st->rx[i], now);
            if (r == FRAME_DEAD)
                return -1;
            if (r == FRAME_REDECODE) {
                redecode = 1;
                i++;
                break;
            }
        }
        if (i)
            pos += st->rx[i - 1].offset + 4 + st->rx[i - 1].length;
        if (redecode)
            continue;
        if (rc < 0) {
            st->res->last_status = -rc;
            conn_fail(st, c, SPOP_LG_ERR_MALFORMED, 0);
            return -1;
        }
        if (!n)
            break;
    }
    if (pos == c->rlen) {
        c->rlen = 0;
    } else if (pos) {
        memmove(c->rbuf, c->rbuf + pos, c->rlen - pos);
        c->rlen -= pos;
    }
    return 0;
}

static void conn_read(spop_lg_state *st, struct lg_conn *c)
{
    ssize_t n;
    for (;;) {
        if (c->rlen >= c->rcap) { /* cannot happen: rcap holds a whole frame */
            conn_fail(st, c, SPOP_LG_ERR_MALFORMED, 0);
            return;
        }
        n = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, MSG_DONTWAIT);
        if (n > 0)
            break;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (c->phase == C_CLOSING)
            conn_close(st, c); /* EOF or reset after our DISCONNECT: fine */
        else
            conn_fail(st, c, SPOP_LG_ERR_CLOSED, n < 0 ? errno : 0);
        return;
    }
    c->rlen += (uint32_t)n;
    if (conn_process(st, c, now_ns()) == 0)
        conn_fill(st, c);
}

static void conn_connected(spop_lg_state *st, struct lg_conn *c)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err) {
        conn_fail(st, c, SPOP_LG_ERR_CONNECT, err);
        return;
    }
    c->phase = C_HELLO;
    conn_queue(c, st->hello, st->hello_len);
    conn_flush(st, c);
}

static void conn_start(spop_lg_state *st, struct lg_conn *c)
{
    int family = st->addr.ss_family;
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        count_error(st, SPOP_LG_ERR_CONNECT, 1);
        st->res->sys_errno = errno;
        return;
    }
    if (family != AF_UNIX) {
        int one = 1;
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    c->fd = fd;
    c->phase = C_CONNECTING;
    st->n_live++;
    st->res->connections_open++;
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | EPOLLOUT;
    ev.data.u32 = (uint32_t)(c - st->conns);
    if (epoll_ctl(st->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        conn_fail(st, c, SPOP_LG_ERR_CONNECT, errno);
        return;
    }
    c->out_armed = 1;
    if (connect(fd, (const struct sockaddr *)&st->addr, st->addrlen) < 0 && errno != EINPROGRESS) {
        conn_fail(st, c, SPOP_LG_ERR_CONNECT, errno);
        return;
    }
    /* connected or in progress: EPOLLOUT reports either way */
}

/* ------------------------------------------------------------ phases */

static void begin_closing(spop_lg_state *st, uint64_t now)
{
    st->phase = SPOP_LG_PHASE_CLOSING;
    st->t_close_end = now + SPOP_LG_CLOSE_WAIT_NS;
    for (uint32_t i = 0; i < st->n_conns; i++) {
        struct lg_conn *c = &st->conns[i];
        count_error(st, SPOP_LG_ERR_UNANSWERED, c->n_out);
        st->n_out_total -= c->n_out;
        c->n_out = 0;
        switch (c->phase) {
        case C_READY:
            c->phase = C_CLOSING;
            conn_queue(c, st->bye, st->bye_len);
            conn_flush(st, c);
            break;
        case C_CONNECTING:
            conn_fail(st, c, SPOP_LG_ERR_CONNECT, ETIMEDOUT);
            break;
        case C_HELLO:
            conn_fail(st, c, SPOP_LG_ERR_HELLO, ETIMEDOUT);
            break;
        default:
            break;
        }
    }
}

static void finish(spop_lg_state *st, uint64_t now)
{
    for (uint32_t i = 0; i < st->n_conns; i++)
        conn_close(st, &st->conns[i]);
    st->phase = SPOP_LG_PHASE_DONE;
    st->res->elapsed_ns = now - st->t_start;
}

static void stop_window(spop_lg_state *st, uint64_t now)
{
    st->t_stopped = now;
    st->phase = SPOP_LG_PHASE_DRAINING;
    uint64_t drain = st->cfg.drain_ns ? st->cfg.drain_ns : SPOP_LG_DEFAULT_DRAIN_NS;
    st->t_drain_end = now + drain;
}

static void advance(spop_lg_state *st, uint64_t now)
{
    if (st->phase == SPOP_LG_PHASE_WARMUP) {
        if (st->stop_requested || !st->n_live) {
            stop_window(st, now);
            st->t_warm = now;
        } else if (now >= st->t_warm) {
            st->phase = SPOP_LG_PHASE_RUNNING;
            for (uint32_t i = 0; i < st->n_conns; i++)
                conn_fill(st, &st->conns[i]); /* the quota may have been 0 */
        }
    }
    if (st->phase == SPOP_LG_PHASE_RUNNING) {
        int quota_done = st->cfg.max_messages && st->sent_window >= st->cfg.max_messages &&
                         !st->n_out_total;
        if (now >= st->t_stop || st->stop_requested || quota_done || !st->n_live)
            stop_window(st, now);
    }
    if (st->phase == SPOP_LG_PHASE_DRAINING) {
        if (!st->n_out_total || now >= st->t_drain_end || !st->n_live)
            begin_closing(st, now);
    }
    if (st->phase == SPOP_LG_PHASE_CLOSING) {
        if (!st->n_live || now >= st->t_close_end)
            finish(st, now);
    }
    spop_lg_result *res = st->res;
    res->phase = (uint32_t)st->phase;
    if (st->phase != SPOP_LG_PHASE_DONE)
        res->elapsed_ns = now - st->t_start;
    if (st->phase == SPOP_LG_PHASE_RUNNING)
        res->measured_ns = now - st->t_warm;
    else if (st->phase > SPOP_LG_PHASE_RUNNING)
        res->measured_ns = st->t_stopped > st->t_warm ? st->t_stopped - st->t_warm : 0;
}

static uint64_t phase_deadline(const spop_lg_state *st)
{
    switch (st->phase) {
    case SPOP_LG_PHASE_WARMUP: return st->t_warm;
    case SPOP_LG_PHASE_RUNNING: return st->t_stop;
    case SPOP_LG_PHASE_DRAINING: return st->t_drain_end;
    case SPOP_LG_PHASE_CLOSING: return st->t_close_end;
    default: return UINT64_MAX;
    }
}

/* ------------------------------------------------------------ API */

static void free_all(spop_lg_state *st)
{
    if (st->conns) {
        for (uint32_t i = 0; i < st->n_conns; i++) {
            struct lg_conn *c = &st->conns[i];
            if (c->fd >= 0)
                close(c->fd);
            free(c->out_sid);
            free(c->out_t);
            free(c->rbuf);
            free(c->wbuf);
        }
        free(st->conns);
    }
    if (st->epfd >= 0)
        close(st->epfd);
    free(st->pool);
    free(st->pool_off);
    free(st->pool_len);
    free(st->tx);
    free(st->rx);
    free(st->items);
    st->conns = NULL;
    st->pool = NULL;
    st->pool_off = st->pool_len = NULL;
    st->tx = st->rx = NULL;
    st->items = NULL;
    st->epfd = -1;
    st->magic = 0;
}

static int resolve(spop_lg_state *st, const spop_lg_config *cfg)
{
    memset(&st->addr, 0, sizeof(st->addr));
    if (cfg->unix_path) {
        struct sockaddr_un *un = (struct sockaddr_un *)&st->addr;
        size_t n = bounded_strlen(cfg->unix_path, sizeof(un->sun_path));
        if (!n || n >= sizeof(un->sun_path))
            return SPOP_LG_E_ADDR;
        un->sun_family = AF_UNIX;
        memcpy(un->sun_path, cfg->unix_path, n);
        st->addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
        return 0;
    }
    if (!cfg->host || cfg->port < 1 || cfg->port > 65535)
        return cfg->host ? SPOP_LG_E_ARG : SPOP_LG_E_ADDR;
    size_t n = bounded_strlen(cfg->host, HOST_MAX);
    if (n >= HOST_MAX)
        return SPOP_LG_E_ADDR;
    memcpy(st->host, cfg->host, n + 1);
    struct sockaddr_in *in4 = (struct sockaddr_in *)&st->addr;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&st->addr;
    if (inet_pton(AF_INET, st->host, &in4->sin_addr) == 1) {
        /* loopback only: this tool must never load an outside host */
        if (ntohl(in4->sin_addr.s_addr) != INADDR_LOOPBACK)
            return SPOP_LG_E_ADDR;
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)cfg->port);
        st->addrlen = sizeof(*in4);
        return 0;
    }
    if (inet_pton(AF_INET6, st->host, &in6->sin6_addr) == 1) {
        if (memcmp(&in6->sin6_addr, &in6addr_loopback, sizeof(in6addr_loopback)) != 0)
            return SPOP_LG_E_ADDR;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)cfg->port);
        st->addrlen = sizeof(*in6);
        return 0;
    }
    return SPOP_LG_E_ADDR; /* names are not resolved */
}

static int check_config(const spop_lg_config *cfg)
{
    if (cfg->connections < 1 || cfg->connections > SPOP_LG_MAX_CONNECTIONS)
        return SPOP_LG_E_ARG;
    if (cfg->in_flight < 1 || cfg->in_flight > SPOP_LG_MAX_IN_FLIGHT)
        return SPOP_LG_E_ARG;
    if (cfg->ipv6_percent > 100 || cfg->sid_style > SPOP_LG_SIDS_26)
        return SPOP_LG_E_ARG;
    if (cfg->max_frame_size &&
        (cfg->max_frame_size < SPOP_MIN_FRAME_SIZE || cfg->max_frame_size > SPOP_DEFAULT_FRAME_SIZE))
        return SPOP_LG_E_ARG;
    if (cfg->pool_size > SPOP_LG_MAX_POOL)
        return SPOP_LG_E_ARG;
    if (!cfg->duration_ns && !cfg->max_messages)
        return SPOP_LG_E_ARG;
    if (cfg->capabilities && bounded_strlen(cfg->capabilities, CAPS_MAX) >= CAPS_MAX)
        return SPOP_LG_E_ARG;
    return 0;
}

int spop_lg_open(spop_lg_state *st, const spop_lg_config *cfg, spop_lg_result *res)
{
    if (!st || !cfg || !res)
        return SPOP_LG_E_ARG;
    memset(st, 0, sizeof(*st));
    st->epfd = -1;
    memset(res, 0, sizeof(*res));
    res->last_status = -1;
    res->phase = SPOP_LG_PHASE_OPEN;
    int rc = check_config(cfg);
    if (rc)
        return rc;
    rc = resolve(st, cfg);
    if (rc)
        return rc;
    st->cfg = *cfg;
    st->cfg.host = NULL; /* copied into st->host; the caller's pointers may go */
    st->cfg.unix_path = NULL;
    st->cfg.capabilities = NULL;
    const char *caps = cfg->capabilities ? cfg->capabilities : "pipelining,async";
    memcpy(st->caps, caps, strlen(caps) + 1);
    st->res = res;
    st->mfs = cfg->max_frame_size ? cfg->max_frame_size : SPOP_DEFAULT_FRAME_SIZE;
    st->pool_n = cfg->pool_size ? cfg->pool_size : SPOP_LG_DEFAULT_POOL;
    st->rng = cfg->seed;
    st->magic = LG_MAGIC;

    uint32_t C = cfg->connections, P = cfg->in_flight;
    st->max_items = st->mfs / 2 + 1;
    st->pool_bytes = (size_t)st->pool_n * NOTIFY_MAX;
    st->pool = malloc(st->pool_bytes);
    st->pool_off = calloc(st->pool_n, sizeof(uint32_t));
    st->pool_len = calloc(st->pool_n, sizeof(uint32_t));
    st->tx = calloc(P, sizeof(spop_frame));
    st->rx = calloc(RX_FRAMES, sizeof(spop_frame));
    st->items = calloc(st->max_items, sizeof(spop_item));
    st->conns = calloc(C, sizeof(struct lg_conn));
    if (!st->pool || !st->pool_off || !st->pool_len || !st->tx || !st->rx || !st->items ||
        !st->conns) {
        free_all(st);
        return SPOP_LG_E_NOMEM;
    }
    st->n_conns = C;
    for (uint32_t i = 0; i < C; i++) {
        struct lg_conn *c = &st->conns[i];
        c->fd = -1;
        c->phase = C_DEAD;
        c->limit = P;
        c->mfs = st->mfs;
        c->next_sid = 1;
        c->rcap = st->mfs + 4 + RBUF_EXTRA;
        c->wcap = P * NOTIFY_MAX + WBUF_EXTRA;
        c->out_sid = calloc(P, sizeof(uint64_t));
        c->out_t = calloc(P, sizeof(uint64_t));
        c->rbuf = malloc(c->rcap);
        c->wbuf = malloc(c->wcap);
        if (!c->out_sid || !c->out_t || !c->rbuf || !c->wbuf) {
            free_all(st);
            return SPOP_LG_E_NOMEM;
        }
    }
    if ((rc = encode_hello(st)) != 0 || (rc = encode_pool(st)) != 0) {
        free_all(st);
        return rc;
    }
    st->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (st->epfd < 0) {
        res->sys_errno = errno;
        free_all(st);
        return SPOP_LG_E_SYS;
    }
    for (uint32_t i = 0; i < C; i++)
        conn_start(st, &st->conns[i]);
    return 0;
}

int spop_lg_run(spop_lg_state *st, uint64_t slice_ns)
{
    if (!st || st->magic != LG_MAGIC)
        return SPOP_LG_E_STATE;
    if (st->fatal)
        return st->fatal;
    if (st->phase == SPOP_LG_PHASE_DONE)
        return 0;
    uint64_t now = now_ns();
    if (st->phase == SPOP_LG_PHASE_OPEN) {
        st->t_start = now;
        st->t_warm = now + st->cfg.warmup_ns;
        st->t_stop = st->cfg.duration_ns ? st->t_warm + st->cfg.duration_ns : UINT64_MAX;
        if (st->t_stop < st->t_warm)
            st->t_stop = UINT64_MAX;
        st->phase = SPOP_LG_PHASE_WARMUP;
    }
    uint64_t slice_end = slice_ns > UINT64_MAX - now ? UINT64_MAX : now + slice_ns;
    struct epoll_event evs[EVENTS];
    for (;;) {
        advance(st, now);
        if (st->fatal)
            return st->fatal;
        if (st->phase == SPOP_LG_PHASE_DONE)
            return 0;
        if (now >= slice_end)
            return 1;
        uint64_t deadline = phase_deadline(st);
        if (deadline > slice_end)
            deadline = slice_end;
        uint64_t wait = deadline > now ? (deadline - now + 999999) / 1000000 : 0;
        int timeout = wait > INT_MAX ? INT_MAX : (int)wait;
        int n = epoll_wait(st->epfd, evs, EVENTS, timeout);
        if (n < 0) {
            if (errno != EINTR) {
                st->res->sys_errno = errno;
                st->fatal = SPOP_LG_E_SYS;
                return st->fatal;
            }
            n = 0;
        }
        for (int i = 0; i < n; i++) {
            uint32_t idx = evs[i].data.u32;
            if (idx >= st->n_conns)
                continue;
            struct lg_conn *c = &st->conns[idx];
            uint32_t e = evs[i].events;
            if (c->phase == C_DEAD)
                continue; /* closed earlier in this batch */
            if (c->phase == C_CONNECTING) {
                if (e & (EPOLLOUT | EPOLLERR | EPOLLHUP))
                    conn_connected(st, c);
                continue;
            }
            if ((e & EPOLLOUT) && conn_flush(st, c) < 0)
                continue;
            if (e & (EPOLLIN | EPOLLERR | EPOLLHUP))
                conn_read(st, c);
        }
        now = now_ns();
    }
}

void spop_lg_stop(spop_lg_state *st)
{
    if (st && st->magic == LG_MAGIC)
        st->stop_requested = 1;
}

void spop_lg_close(spop_lg_state *st)
{
    if (!st || st->magic != LG_MAGIC)
        return;
    free_all(st); /* closes every socket */
}
