/*
 * The spool's on-disk format: segment header, record header, envelope items,
 * and the segment walk that recovery uses. Pure C (no liburing, no threads):
 * the writer (dataplane/spool), the reader (control/spool_reader) and the
 * fuzz targets all share this one codec. docs/spool-format.md is the prose
 * description; this header is the reference for the byte layout.
 *
 * Everything on disk is little-endian and (de)serialised field by field: no
 * struct is ever copied to or from disk.
 *
 * Segment file (dir/wNN/SSSSSSSS.seg, NN and SSSSSSSS lower-case hex):
 *   block 0        segment header (64 bytes used, rest zero)
 *   block 1..      batches; each starts on a 4096-byte boundary and is a run
 *                  of records packed back to back (8-byte aligned), followed
 *                  by zeros up to the next block boundary.
 *
 * Segment header (SPOOL_SEG_HDR_LEN = 64):
 *    0 u32 magic "FDSG"   4 u16 version   6 u16 header length (64)
 *    8 u32 worker        12 u32 flags (0)
 *   16 u64 file number   24 u64 use sequence (per worker, grows with every
 *                                 (re)use of any segment: orders segments)
 *   32 u64 epoch (secret random)  40 u64 created (CLOCK_REALTIME us)
 *   48 u64 segment size  56 u32 reserved (0)   60 u32 CRC32C of bytes 0..59
 *
 * Record header (SPOOL_REC_HDR_LEN = 48), then `len` payload bytes, then
 * zero padding to a multiple of 8:
 *    0 u32 magic "FDRC"   4 u8 version   5 u8 type   6 u16 flags (0)
 *    8 u32 payload length
 *   12 u32 crc  = CRC32C over (payload, then the 48 header bytes with this
 *               field zeroed): crc32c(crc32c(0, payload), header)
 *   16 u64 epoch (the segment's)
 *   24 u64 message id
 *   32 u64 offset: DATA: body offset of the payload; END: total body length;
 *               ENV: 0
 *   40 u32 aux: END: CRC32C of the whole body; otherwise 0
 *   44 u32 reserved (0)
 *
 * ENV payload: envelope items, each  u8 type, u16 length, bytes; strings
 * carry no NUL; the last item is SPOOL_ITEM_END (length 0) and ends the
 * payload exactly. The DSN items (10-13) are written only when the
 * envelope has them, so an envelope without DSN parameters encodes exactly
 * as before they existed; RCPT_NOTIFY and RCPT_ORCPT belong to the RCPT
 * item they follow (directly, or after that RCPT's other DSN item).
 */
#ifndef FINALDOT_SPOOL_FORMAT_H
#define FINALDOT_SPOOL_FORMAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "finaldot/envelope.h"

#define SPOOL_BLOCK 4096u
#define SPOOL_FORMAT_VERSION 1u
#define SPOOL_SEG_MAGIC 0x47534446u /* "FDSG" on disk */
#define SPOOL_REC_MAGIC 0x43524446u /* "FDRC" on disk */
#define SPOOL_SEG_HDR_LEN 64u
#define SPOOL_REC_HDR_LEN 48u
#define SPOOL_ENV_MAX 65536u /* largest ENV payload */
#define SPOOL_REC_MAX (1u << 30) /* largest payload of any record */
#define SPOOL_ITEM_HDR_LEN 3u
#define SPOOL_ITEM_MAX 65535u

enum spool_rec_type {
	SPOOL_REC_ENV = 1,  /* opens a message: envelope items */
	SPOOL_REC_DATA = 2, /* body bytes at `offset` */
	SPOOL_REC_END = 3,  /* commits: offset = length, aux = body CRC32C */
};

enum spool_item_type {
	SPOOL_ITEM_END = 0,
	SPOOL_ITEM_MAIL_FROM = 1,
	SPOOL_ITEM_RCPT = 2, /* repeated, in RCPT order */
	SPOOL_ITEM_HELO = 3,
	SPOOL_ITEM_CLIENT_ADDR = 4,
	SPOOL_ITEM_PROTO = 5,
	SPOOL_ITEM_ARRIVAL_US = 6, /* u64 */
	SPOOL_ITEM_SIZE = 7,       /* u64 */
	SPOOL_ITEM_BODY = 8,       /* u8 enum fd_body_type */
	SPOOL_ITEM_SMTPUTF8 = 9,   /* u8 0/1 */
	SPOOL_ITEM_ENVID = 10,       /* string (xtext), not empty */
	SPOOL_ITEM_RET = 11,         /* u8 enum fd_dsn_ret, 1 or 2 */
	SPOOL_ITEM_RCPT_NOTIFY = 12, /* u8 fd_dsn_notify bits, not 0 */
	SPOOL_ITEM_RCPT_ORCPT = 13,  /* string (addr-type;xtext), not empty */
};

/* Decoder results: AGAIN (need more bytes) is never an error. */
enum spool_dec {
	SPOOL_DEC_OK = 0,
	SPOOL_DEC_AGAIN,
	SPOOL_DEC_ERR_MAGIC,
	SPOOL_DEC_ERR_VERSION,
	SPOOL_DEC_ERR_TYPE,
	SPOOL_DEC_ERR_LEN,
	SPOOL_DEC_ERR_FIELD, /* a reserved/flags/type-specific field is wrong */
	SPOOL_DEC_ERR_PAD,
	SPOOL_DEC_ERR_CRC,
	SPOOL_DEC_ERR_EPOCH, /* well-formed, CRC ok, other epoch: stale/forged */
	SPOOL_DEC_ERR_ITEM,  /* envelope item malformed */
};
const char *spool_dec_name(enum spool_dec d);

struct spool_seg_hdr {
	uint32_t worker;
	uint64_t file_no;
	uint64_t use_seq;
	uint64_t epoch;
	uint64_t created_us;
	uint64_t size;
};

struct spool_rec_hdr {
	uint8_t type;    /* enum spool_rec_type */
	uint32_t len;    /* payload bytes */
	uint32_t crc;
	uint64_t epoch;
	uint64_t msgid;
	uint64_t offset;
	uint32_t aux;
};

/* Little-endian field access. */
static inline void
spool_put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}
static inline void
spool_put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static inline void
spool_put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint16_t
spool_get16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}
static inline uint32_t
spool_get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
	       (uint32_t)p[3] << 24;
}
static inline uint64_t
spool_get64(const uint8_t *p)
{
	return (uint64_t)spool_get32(p) | (uint64_t)spool_get32(p + 4) << 32;
}

static inline uint64_t
spool_align8(uint64_t n)
{
	return (n + 7) & ~(uint64_t)7;
}
static inline uint64_t
spool_align_block(uint64_t n)
{
	return (n + SPOOL_BLOCK - 1) & ~(uint64_t)(SPOOL_BLOCK - 1);
}
/* Bytes a record with this payload occupies (header, payload, padding). */
static inline uint64_t
spool_rec_size(uint64_t len)
{
	return SPOOL_REC_HDR_LEN + spool_align8(len);
}

/* Segment header: out must hold SPOOL_SEG_HDR_LEN bytes. */
void spool_seg_hdr_encode(const struct spool_seg_hdr *h, uint8_t *out);
enum spool_dec spool_seg_hdr_decode(const uint8_t *p, size_t n,
				    struct spool_seg_hdr *h);

/*
 * Record header. encode writes the 48 bytes with h->crc as given;
 * spool_rec_crc() computes the record CRC from those bytes (crc field
 * ignored) and the CRC32C of the payload; spool_rec_seal() stores it.
 */
void spool_rec_hdr_encode(const struct spool_rec_hdr *h, uint8_t *out);
uint32_t spool_rec_crc(const uint8_t *hdr, uint32_t payload_crc);
void spool_rec_seal(uint8_t *hdr, uint32_t payload_crc);

/*
 * A whole record (header, payload, zero padding) into out (cap bytes).
 * h->len is taken from len and h->crc is computed. Returns the bytes
 * written (spool_rec_size(len)) or 0 if cap is too small.
 */
size_t spool_rec_encode(const struct spool_rec_hdr *h, const void *payload,
			size_t len, uint8_t *out, size_t cap);

/*
 * Header checks that need no payload (magic, version, type, reserved fields,
 * length limits, type rules). AGAIN when n < SPOOL_REC_HDR_LEN.
 */
enum spool_dec spool_rec_hdr_decode(const uint8_t *p, size_t n,
				    struct spool_rec_hdr *h);
/*
 * A whole record at p (n bytes available), for a segment of this epoch.
 * OK: *h filled, *payload points into p, *used = spool_rec_size(h->len).
 * AGAIN: p holds a valid prefix of a record but not all of it.
 * ERR_EPOCH: the record is intact but belongs to another epoch.
 */
enum spool_dec spool_rec_decode(const uint8_t *p, size_t n, uint64_t epoch,
				struct spool_rec_hdr *h,
				const uint8_t **payload, size_t *used);

/*
 * Envelope items. spool_env_encoded_len() is 0 when the envelope cannot be
 * encoded (a string longer than SPOOL_ITEM_MAX, the total above
 * SPOOL_ENV_MAX, a ret or notify value outside its enum). A NULL envid
 * counts as "". spool_env_encode() returns bytes written or 0.
 */
size_t spool_env_encoded_len(const struct fd_envelope *env);
/* The most one recipient adds to spool_env_encoded_len(): an item for its
 * address, one for NOTIFY (a value octet) and one for ORCPT. For the SMTP
 * engine, which bounds a transaction's recipients by it without encoding
 * (orcpt_len 0: none). */
static inline size_t
spool_env_rcpt_max(size_t addr_len, size_t orcpt_len)
{
	return 3 * SPOOL_ITEM_HDR_LEN + addr_len + 1 + orcpt_len;
}
size_t spool_env_encode(const struct fd_envelope *env, uint8_t *out,
			size_t cap);
/*
 * Decode into env, whose strings and its rcpts, notify and orcpts arrays are
 * placed in scratch (scratch_len >= spool_env_scratch_len(n), any
 * alignment). The envelope is valid while scratch is. envid is "" and
 * notify / orcpts NULL when no item carried them; otherwise the array has
 * n_rcpts entries (0 / "" for a recipient without).
 */
size_t spool_env_scratch_len(size_t n);
enum spool_dec spool_env_decode(const uint8_t *p, size_t n,
				struct fd_envelope *env, void *scratch,
				size_t scratch_len);

/*
 * CRC32C of A||B from crc(A), crc(B) and |B| (no access to the bytes).
 * The writer folds each DATA record's payload CRC into the message's body
 * CRC with it, so body bytes are checksummed once.
 */
uint32_t spool_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

/*
 * The segment walk: recovery's record scanner, shared by the writer (is a
 * leftover segment empty?) and the reader. It reads through read(), keeps a
 * window of win_len bytes (>= SPOOL_WALK_WIN_MIN), and calls on_rec() for
 * every valid record of `epoch`, in file order. After anything invalid it
 * resynchronises at the next 4096-byte boundary; a zero magic means "rest
 * of this block is padding" and is not counted as bad.
 *
 * on_rec() gets the payload when it fits the window (always for ENV and
 * END) and NULL otherwise; payload_crc is crc32c(0, payload) either way.
 * A non-zero return from on_rec() stops the walk and is returned.
 * read() returns the bytes read (short only at the end of the source) or
 * -errno; a read error stops the walk and is returned.
 */
#define SPOOL_WALK_WIN_MIN (SPOOL_ENV_MAX + 4 * SPOOL_BLOCK)

typedef long (*spool_read_fn)(void *ctx, uint64_t off, void *buf, size_t n);
/* A spool_read_fn over a file: ctx points at the int file descriptor.
 * pread() until n bytes or the end of the file; retries EINTR. */
long spool_read_fd(void *ctx, uint64_t off, void *buf, size_t n);

struct spool_walk_rec {
	struct spool_rec_hdr h;
	uint64_t off; /* of the record header in the segment */
	const uint8_t *payload;
	uint32_t payload_crc;
};

typedef int (*spool_walk_fn)(void *ctx, const struct spool_walk_rec *r);

struct spool_walk {
	spool_read_fn read;
	void *read_ctx;
	uint64_t size;  /* bytes of the segment to walk (header block incl.) */
	uint64_t start; /* where to begin (0: after the header block); a
			 * record boundary or a block boundary */
	uint64_t epoch; /* from the segment header */
	uint8_t *win;   /* caller's buffer */
	size_t win_len;
	uint64_t stop_at; /* 0, or stop at the first record that starts at
			   * or past it (a clean resume point, see end) */
	/* results */
	uint64_t records_ok;
	uint64_t records_bad;   /* resyncs after a damaged/torn record */
	uint64_t records_stale; /* intact records of another epoch */
	uint64_t end; /* where the walk stopped: past the last record handed
		       * to on_rec() (also when it stopped the walk), or at
		       * or past `size` when the walk ran to the end; a
		       * later walk of a longer prefix resumes there */
	/* private */
	uint64_t win_off;
	size_t win_have;
};

int spool_walk_segment(struct spool_walk *w, spool_walk_fn on_rec, void *ctx);

#endif
