/*
 * spop.h - SPOP 2.0 frame codec (HAProxy Stream Processing Offload Protocol).
 *
 * One header, no allocation, no global state. Every function works on
 * caller-owned buffers and checks bounds before every read or write.
 *
 * Return contract, the same for every function that returns an int:
 *   < 0   failure: the value is -(SPOP status code), the status an agent
 *         puts in its AGENT-DISCONNECT (enum spop_status);
 *   >= 0  success: a count, which each function names:
 *           spop_varint_decode   bytes consumed; 0 = incomplete, more input needed
 *           spop_varint_encode   bytes written (never 0)
 *           spop_decode_frames   0 (the frame count is in *n_frames)
 *           spop_encode_frames   frames written (fewer than asked: `cap` ran out)
 *           spop_encode_acks     bytes written
 *           spop_decode_batch    frames decoded
 * A decoder that fails after whole frames still reports them (n_frames,
 * out[SPOP_OUT_FRAMES]): the failure is the frame after them.
 *
 * Decoded records never copy: names and values are (offset, length) pairs
 * into the buffer that was decoded. Record layouts are fixed-width with
 * explicit padding so that a non-C caller can read them as packed structs.
 */
#ifndef SPOP_H
#define SPOP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SPOP_FRAME_HDR_MAX 25       /* type + flags + two 10-byte varints */
#define SPOP_FRAME_MIN_LEN 7        /* type + flags + two 1-byte varints */
#define SPOP_MIN_FRAME_SIZE 256     /* smallest max-frame-size either side may ask for */
#define SPOP_DEFAULT_FRAME_SIZE 16380
#define SPOP_MAX_FRAME_SIZE (1u << 24) /* the largest max-frame-size this agent takes */
#define SPOP_VARINT_MAX 10          /* bytes in the longest valid varint (2^64 - 1) */

#define SPOP_FLAG_FIN 0x00000001u
#define SPOP_FLAG_ABORT 0x00000002u

enum spop_frame_type {
    SPOP_FRAME_UNSET = 0,
    SPOP_FRAME_HAPROXY_HELLO = 1,
    SPOP_FRAME_HAPROXY_DISCONNECT = 2,
    SPOP_FRAME_NOTIFY = 3,
    SPOP_FRAME_AGENT_HELLO = 101,
    SPOP_FRAME_AGENT_DISCONNECT = 102,
    SPOP_FRAME_ACK = 103,
};

/* Typed data: the type lives in the low nibble of the type byte; BOOL keeps
 * its value in bit 0x10. Codes 10..15 are reserved and rejected. */
enum spop_data_type {
    SPOP_DATA_NULL = 0,
    SPOP_DATA_BOOL = 1,
    SPOP_DATA_INT32 = 2,
    SPOP_DATA_UINT32 = 3,
    SPOP_DATA_INT64 = 4,
    SPOP_DATA_UINT64 = 5,
    SPOP_DATA_IPV4 = 6,
    SPOP_DATA_IPV6 = 7,
    SPOP_DATA_STRING = 8,
    SPOP_DATA_BINARY = 9,
};

enum spop_action_type {
    SPOP_ACTION_SET_VAR = 1,
    SPOP_ACTION_UNSET_VAR = 2,
};

enum spop_scope {
    SPOP_SCOPE_PROC = 0,
    SPOP_SCOPE_SESS = 1,
    SPOP_SCOPE_TXN = 2,
    SPOP_SCOPE_REQ = 3,
    SPOP_SCOPE_RES = 4,
};

/* DISCONNECT status codes; decoders return their negation on failure. */
enum spop_status {
    SPOP_ST_NORMAL = 0,
    SPOP_ST_IO = 1,
    SPOP_ST_TIMEOUT = 2,
    SPOP_ST_TOO_BIG = 3,
    SPOP_ST_INVALID = 4,
    SPOP_ST_NO_VSN = 5,
    SPOP_ST_NO_FRAME_SIZE = 6,
    SPOP_ST_NO_CAP = 7,
    SPOP_ST_BAD_VSN = 8,
    SPOP_ST_BAD_FRAME_SIZE = 9,
    SPOP_ST_FRAG_NOT_SUPPORTED = 10,
    SPOP_ST_INTERLACED_FRAMES = 11,
    SPOP_ST_FRAMEID_NOTFOUND = 12,
    SPOP_ST_RES = 13,
    SPOP_ST_UNKNOWN = 99,
};

/* What an item record describes. */
enum spop_item_kind {
    SPOP_ITEM_KV = 1,       /* HELLO / DISCONNECT: name = key, typed value */
    SPOP_ITEM_MESSAGE = 2,  /* NOTIFY: name = message name, nargs ARG items follow */
    SPOP_ITEM_ARG = 3,      /* NOTIFY: name = argument name (may be empty), typed value */
    SPOP_ITEM_ACTION = 4,   /* ACK: action, scope, name = variable name, typed value (set-var) */
};

/*
 * One decoded (or to-be-encoded) element of a payload. 32 bytes.
 * Typed value: `type` is the data type (0..9). BOOL, INT32, UINT32, INT64 and
 * UINT64 keep their value in `num` (integers as the raw 64-bit two's
 * complement pattern, booleans as 0/1). IPV4 (4 bytes), IPV6 (16 bytes),
 * STRING and BINARY are `val_off`/`val_len` into the buffer; a decoded IPV4
 * is also in `num`, as a host-order integer (the encoder ignores it).
 */
typedef struct spop_item {
    uint64_t num;
    uint32_t name_off;
    uint32_t name_len;
    uint32_t val_off;
    uint32_t val_len;
    uint8_t kind;           /* enum spop_item_kind */
    uint8_t type;           /* enum spop_data_type */
    uint8_t nargs;          /* MESSAGE: argument count; ACTION: NB-ARGS */
    uint8_t action;         /* ACTION: enum spop_action_type */
    uint8_t scope;          /* ACTION: enum spop_scope */
    uint8_t pad_[3];
} spop_item;

/*
 * One frame. 48 bytes.
 * Decoding fills every field. `items_parsed` is 1 when the payload was walked
 * into items: HELLO, DISCONNECT, NOTIFY and ACK frames that carry FIN and not
 * ABORT. Other frames (UNSET continuations, fragments without FIN, unknown
 * types) only report their payload's position, for the caller to reassemble
 * or skip.
 * Encoding reads type, flags, sid, fid, first_item and n_items (and, for a
 * frame whose payload is raw, payload_off/payload_len into the strings
 * buffer), and writes back offset, length and n_items (see spop_encode_frames).
 */
typedef struct spop_frame {
    uint64_t sid;
    uint64_t fid;
    uint32_t flags;
    uint32_t offset;        /* position of the 4-byte length prefix */
    uint32_t length;        /* LENGTH field: bytes after the prefix */
    uint32_t payload_off;
    uint32_t payload_len;
    uint32_t first_item;    /* index of the frame's first record in the item array */
    uint32_t n_items;
    uint8_t type;           /* enum spop_frame_type, or any unknown value */
    uint8_t items_parsed;
    uint8_t pad_[2];
} spop_frame;

/*
 * Varints: HAProxy's encoding (not LEB128), at most SPOP_VARINT_MAX bytes.
 * spop_varint_decode returns the bytes used (*value set), 0 when buf ends
 * inside the varint (len 0 included), -SPOP_ST_INVALID past 10 bytes or
 * 2^64-1. spop_varint_encode returns the bytes written, -SPOP_ST_TOO_BIG
 * when `cap` is short (SPOP_VARINT_MAX always fits).
 */
int spop_varint_decode(const uint8_t *buf, size_t len, uint64_t *value);
int spop_varint_encode(uint64_t value, uint8_t *out, size_t cap);

/*
 * Decode every complete frame at the start of buf[0..len).
 *
 * Stops at the first incomplete frame, when `max_frames` frames were
 * decoded, or when the next frame's items would not fit in the
 * `max_items` records left. A LENGTH above `max_frame_size` is refused as
 * soon as the 4-byte prefix is buffered, before any of the body is read.
 *
 * Sets *n_frames to the number of valid frames decoded (their records are in
 * frames[0..n), their items in items[]). Returns 0 when it stopped cleanly
 * (the bytes consumed are frames[n-1].offset + 4 + frames[n-1].length), or
 * -(status) when the frame after the n valid ones is malformed; no record of
 * the malformed frame is kept. A first frame that cannot fit in `max_items`
 * records gives -SPOP_ST_RES: size the array for (max_frame_size / 2 + 1).
 */
int spop_decode_frames(const uint8_t *buf, size_t len, uint32_t max_frame_size,
                       spop_frame *frames, uint32_t max_frames,
                       spop_item *items, uint32_t max_items,
                       uint32_t *n_frames);

/*
 * Encode frames[0..n_frames) back to back into out[0..cap), each one whole,
 * length prefix included. Names and values of items, and raw payloads, are
 * (offset, length) pairs into strings[0..strings_len).
 *
 * A frame with n_items > 0 gets its payload built from those items (its type
 * says which kind: KV, MESSAGE+ARG or ACTION). A frame with n_items == 0 gets
 * strings[payload_off .. + payload_len) as its payload, copied as is: UNSET
 * fragments, or a payload encoded earlier (an ACK's action list kept for
 * reuse). A raw payload that exceeds max_frame_size gives -SPOP_ST_TOO_BIG.
 *
 * A frame whose items would exceed `max_frame_size` keeps only the items that
 * fit (whole items; a MESSAGE with its args counts as one) and its n_items is
 * lowered to the number encoded; compare it to what you asked for. For each
 * frame written, offset and length are set.
 *
 * Returns the number of frames written; fewer than n_frames when `cap` ran
 * out (the bytes written end at frames[k-1].offset + 4 + frames[k-1].length).
 * Returns -SPOP_ST_INVALID for a record that cannot be encoded (unknown
 * kind, type, scope or action, an out-of-range reference, an IPv4/IPv6 value
 * of the wrong length, a frame whose items do not match its type, items on a
 * frame type that has none), and
 * -SPOP_ST_BAD_FRAME_SIZE when max_frame_size is below SPOP_FRAME_MIN_LEN.
 */
int spop_encode_frames(uint8_t *out, size_t cap, uint32_t max_frame_size,
                       spop_frame *frames, uint32_t n_frames,
                       const spop_item *items, uint32_t n_items,
                       const uint8_t *strings, size_t strings_len);

/*
 * Encode n ACK frames, the hot path of an agent: ACK i carries stream-id
 * ids[2i], frame-id ids[2i+1] and, as its action list, the pre-encoded bytes
 * payload[ends[i-1] .. ends[i]) (ends[-1] = 0), e.g. actions kept encoded.
 * With ends == NULL, each ACK carries exactly one action, the next one in
 * payload (the caller concatenates them and needs no lengths).
 * Returns the bytes written (every frame whole, back to back), or
 * -SPOP_ST_INVALID when ends are not increasing within payload_len (or,
 * without ends, payload is not exactly n well-formed actions),
 * -SPOP_ST_TOO_BIG when one ACK would exceed max_frame_size (drop actions
 * first), -SPOP_ST_RES when `cap` is short: n * 29 + payload_len always
 * fits (length prefix and the longest header, per ACK).
 */
int spop_encode_acks(uint8_t *out, size_t cap, uint32_t max_frame_size,
                     const uint64_t *ids, const uint32_t *ends, uint32_t n,
                     const uint8_t *payload, size_t payload_len);

/*
 * Decoding for a caller that pays for every call and every field it reads (an
 * interpreter): spop_decode_batch() decodes like spop_decode_frames() into
 * the arrays below, then indexes the frames in the same call, so that the
 * caller reads one flat array of integers, `out`, instead of records.
 *
 * The caller sets every field once; every call rewrites `out` (and the
 * records). With n = out[SPOP_OUT_FRAMES] frames decoded, `out` holds:
 *   out[0..SPOP_OUT_HEAD)   the counts below (SPOP_OUT_*);
 *   then 2n ids             stream-id and frame-id of each frame, in pairs;
 *   then n name indexes     for a NOTIFY carrying exactly one message, the
 *                           index in `names` of that message's name (n_names
 *                           when it is not listed); SPOP_INDEX_OTHER for any
 *                           other frame (fragments, several messages, HELLO...);
 *   then n first records    that message's first argument record (else 0);
 *   then n argument counts  its argument count (else 0).
 * That is SPOP_OUT_HEAD + 5n integers: size `out` for
 * SPOP_BATCH_OUT(max_frames).
 * `names` holds n_names names back to back, each an SPOP string (varint
 * length, then the bytes): the messages the caller has handlers for (NULL
 * with names_len 0 for none).
 */
#define SPOP_INDEX_OTHER 0xFFFFFFFFu

enum spop_batch_out {
    SPOP_OUT_FRAMES = 0,    /* frames decoded */
    SPOP_OUT_PLAIN = 1,     /* how many of them are one-message NOTIFYs */
    SPOP_OUT_ITEMS = 2,     /* item records used */
    SPOP_OUT_END = 3,       /* offset in buf where the decoded frames end (start if none) */
    SPOP_OUT_STATUS = 4,    /* 0, or the status of the malformed frame at SPOP_OUT_END */
    SPOP_OUT_HEAD = 5,
};
#define SPOP_BATCH_OUT(max_frames) (SPOP_OUT_HEAD + 5 * (size_t)(max_frames))

typedef struct spop_batch {
    spop_frame *frames;     /* [max_frames] */
    spop_item *items;       /* [max_items] */
    uint64_t *out;          /* [SPOP_BATCH_OUT(max_frames)] */
    const uint8_t *names;
    uint32_t names_len;
    uint32_t n_names;
    uint32_t max_frames;
    uint32_t max_items;
} spop_batch;

/*
 * Decode and index the complete frames of buf[start..len), as
 * spop_decode_frames() does (same stops, same errors: out[SPOP_OUT_STATUS]
 * is the status it would return, negated). Offsets in the records and in
 * out[SPOP_OUT_END] count from buf, not from start: a caller decoding a
 * buffer in rounds passes the previous round's end as the next start.
 *
 * Returns the number of frames decoded (>= 0, also in out[SPOP_OUT_FRAMES]),
 * or -SPOP_ST_INVALID, with nothing written, when `names` is not exactly
 * n_names strings in names_len bytes or start > len.
 */
int spop_decode_batch(const uint8_t *buf, size_t len, size_t start, uint32_t max_frame_size,
                      spop_batch *b);

/* The text HAProxy uses for a status code ("frame is too big", ...). */
const char *spop_status_reason(int status);

#ifdef __cplusplus
}
#endif

#endif /* SPOP_H */
