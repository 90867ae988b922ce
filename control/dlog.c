/*
 * The delivery log (contract in dlog.h; format, compaction, replay and
 * crash rules in docs/delivery-log.md).
 *
 * Threads and data flow:
 *
 *   appenders --encode under mu--> pend --swap--> wbuf --pwrite, fdatasync
 *                                                         |
 *            dlog_wait() <-- cv_durable, durable_lsn <----+  (writer thread)
 *
 * Invariants:
 * - records reach the file in LSN order; one batch is one pwrite (plus zeros
 *   when the file needs another preallocated chunk) and one fdatasync;
 * - durable_lsn only grows, and only after the fdatasync covering it
 *   returned 0;
 * - after the first I/O error `err` is set for good: nothing more is
 *   written, every wait fails and appends return 0 (a partial batch left
 *   in the file is a torn tail for the next replay);
 * - while ckpt_active, appends wait and the writer has nothing to write
 *   (the checkpoint first waited for every pending record to be durable),
 *   so the checkpointing thread swaps the file without racing the writer;
 * - bytes after `off` in the current file are zero (preallocated, or a
 *   torn tail cut off at open) until a write fails.
 *
 * Limits: one directory, one writer; a record is at most DLOG_REC_MAX
 * bytes; a checkpoint blocks appends for as long as it takes to write and
 * sync the state.
 *
 * Errors: a full filesystem (ENOSPC, EDQUOT) is waited out. A refused
 * growth ahead (zeros past the records) is skipped: the batch was written
 * and is synced; the next batch tries again. A refused batch write (nothing
 * synced yet, so the page cache holds no unknown state) is retried at the
 * same offset every SPACE_RETRY_US until it succeeds; appenders meanwhile
 * fill `pend` and then wait for room, and waiters wait: delivery pauses and
 * goes on by itself once there is room again. Any other I/O error, and
 * every failed fdatasync, fails the log for good (after a failed fdatasync
 * the kernel may have dropped the dirty pages: a retry could report
 * success for data that is gone); recovering means closing and reopening
 * it, which replays what is durable and cuts the partial batch off.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "dlog.h"
#include "finaldot/crc32c.h"
#include "finaldot/fsync.h"
#include "finaldot/log.h"
#include "finaldot/msgid.h"
#include "finaldot/spool_format.h"
#include "finaldot/thread.h"

#define COMP "dlog"
#define FILE_HDR_CRC_OFF 60u
#define PREALLOC_CHUNK (1u << 20)
#define SCAN_WIN (1u << 20)
#define PEND_INIT (64u << 10)
#define PEND_MAX_DEFAULT (16u << 20)
#define LAZY_DELAY_DEFAULT_US 10000u
#define ROTATE_DEFAULT (64ull << 20)
#define CKPT_BUF (256u << 10)
#define NAME_MAX_LEN 32
#define SPACE_RETRY_US 1000000u /* a batch refused for want of space */

static const uint8_t rec_magic[4] = { 'F', 'D', 'D', 'L' };
static const uint8_t file_magic[4] = { 'F', 'D', 'L', 'H' };
static const uint8_t zeros[4096];

/* ---- codec ------------------------------------------------------------ */

static bool
type_known(unsigned t)
{
	return (t >= DLOG_ATTEMPT && t <= DLOG_INDOUBT) || t == DLOG_CKPT_BEGIN ||
	       t == DLOG_CKPT_END;
}

static bool
type_ckpt(unsigned t)
{
	return t == DLOG_CKPT_BEGIN || t == DLOG_CKPT_END;
}

bool
dlog_type_is_public(enum dlog_type t)
{
	return (unsigned)t >= DLOG_ATTEMPT && (unsigned)t <= DLOG_INDOUBT;
}

const char *
dlog_type_name(enum dlog_type t)
{
	switch (t) {
	case DLOG_ATTEMPT: return "attempt";
	case DLOG_DELIVERED: return "delivered";
	case DLOG_DEFERRED: return "deferred";
	case DLOG_BOUNCED: return "bounced";
	case DLOG_EXPIRED: return "expired";
	case DLOG_DELETED: return "deleted";
	case DLOG_HELD: return "held";
	case DLOG_RELEASED: return "released";
	case DLOG_DSN_DONE: return "dsn_done";
	case DLOG_SUPPRESSED: return "suppressed";
	case DLOG_NOTE: return "note";
	case DLOG_INDOUBT: return "indoubt";
	case DLOG_CKPT_BEGIN: return "ckpt_begin";
	case DLOG_CKPT_END: return "ckpt_end";
	}
	return "unknown";
}

const char *
dlog_dec_name(enum dlog_dec d)
{
	switch (d) {
	case DLOG_DEC_OK: return "ok";
	case DLOG_DEC_AGAIN: return "again";
	case DLOG_DEC_ERR_MAGIC: return "magic";
	case DLOG_DEC_ERR_VERSION: return "version";
	case DLOG_DEC_ERR_TYPE: return "type";
	case DLOG_DEC_ERR_LEN: return "len";
	case DLOG_DEC_ERR_CRC: return "crc";
	case DLOG_DEC_ERR_FIELD: return "field";
	}
	return "unknown";
}

const char *
dlog_io_name(enum dlog_io op)
{
	switch (op) {
	case DLOG_IO_SYNC: return "sync";
	case DLOG_IO_SYNC_NEW: return "sync_new";
	case DLOG_IO_RENAME: return "rename";
	case DLOG_IO_SYNC_DIR: return "sync_dir";
	case DLOG_IO_UNLINK: return "unlink";
	case DLOG_IO_WRITE: return "write";
	case DLOG_IO_GROW: return "grow";
	}
	return "unknown";
}

size_t
dlog_rec_size(size_t text_len)
{
	if (text_len > DLOG_TEXT_MAX)
		text_len = DLOG_TEXT_MAX;
	return DLOG_REC_HDR_LEN + (size_t)spool_align8(text_len);
}

/*
 * Seeding the CRC with the file's salt means a record is only valid in the
 * file it was written for: text copied from a remote reply cannot carry a
 * record that resynchronisation would accept (the salt never leaves the
 * disk), and a record can't be spliced from one file into another.
 */
static uint32_t
rec_crc(uint64_t salt, const uint8_t *hdr, const uint8_t *text, size_t tlen)
{
	static const uint8_t zero4[4];
	uint8_t s[8];
	uint32_t c;

	spool_put64(s, salt);
	c = fd_crc32c(0, s, sizeof(s));
	c = fd_crc32c(c, hdr, 8);
	c = fd_crc32c(c, zero4, sizeof(zero4));
	c = fd_crc32c(c, hdr + 12, DLOG_REC_HDR_LEN - 12);
	if (tlen)
		c = fd_crc32c(c, text, tlen);
	return c;
}

size_t
dlog_encode_salted(const struct dlog_rec *r, uint64_t salt, uint8_t *out,
		   size_t cap)
{
	size_t tlen, need;

	if (!r || !out || !type_known((unsigned)r->type))
		return 0;
	tlen = r->text_len > DLOG_TEXT_MAX ? DLOG_TEXT_MAX : r->text_len;
	if ((tlen && !r->text) || (tlen && type_ckpt((unsigned)r->type)))
		return 0;
	need = dlog_rec_size(tlen);
	if (cap < need)
		return 0;
	memcpy(out, rec_magic, sizeof(rec_magic));
	out[4] = (uint8_t)DLOG_VERSION;
	out[5] = (uint8_t)r->type;
	spool_put16(out + 6, (uint16_t)tlen);
	spool_put32(out + 8, 0);
	spool_put32(out + 12, r->rcpt);
	spool_put64(out + 16, r->msgid);
	spool_put64(out + 24, r->time_us);
	spool_put64(out + 32, r->next_us);
	spool_put64(out + 40, r->aux);
	spool_put32(out + 48, r->attempts);
	spool_put32(out + 52, 0);
	if (tlen)
		memcpy(out + DLOG_REC_HDR_LEN, r->text, tlen);
	memset(out + DLOG_REC_HDR_LEN + tlen, 0,
	       need - DLOG_REC_HDR_LEN - tlen);
	spool_put32(out + 8, rec_crc(salt, out, out + DLOG_REC_HDR_LEN, tlen));
	return need;
}

size_t
dlog_encode(const struct dlog_rec *r, uint8_t *out, size_t cap)
{
	return dlog_encode_salted(r, 0, out, cap);
}

/*
 * Checks run in byte order so that any prefix of a valid record is AGAIN
 * and a prefix that already shows damage is an error: a truncated record is
 * never OK, and a torn tail is told from garbage as early as possible.
 */
enum dlog_dec
dlog_decode_salted(const uint8_t *p, size_t n, uint64_t salt,
		   struct dlog_rec *r, size_t *used)
{
	size_t tlen, need;

	if (!p || !r || !used)
		return n ? DLOG_DEC_ERR_FIELD : DLOG_DEC_AGAIN;
	for (size_t i = 0; i < n && i < sizeof(rec_magic); i++)
		if (p[i] != rec_magic[i])
			return DLOG_DEC_ERR_MAGIC;
	if (n > 4 && p[4] != DLOG_VERSION)
		return DLOG_DEC_ERR_VERSION;
	if (n > 5 && !type_known(p[5]))
		return DLOG_DEC_ERR_TYPE;
	if (n < 8)
		return DLOG_DEC_AGAIN;
	tlen = spool_get16(p + 6);
	if (tlen > DLOG_TEXT_MAX || (tlen && type_ckpt(p[5])))
		return DLOG_DEC_ERR_LEN;
	if (n < DLOG_REC_HDR_LEN)
		return DLOG_DEC_AGAIN;
	if (spool_get32(p + 52) != 0)
		return DLOG_DEC_ERR_FIELD;
	need = dlog_rec_size(tlen);
	if (n < need)
		return DLOG_DEC_AGAIN;
	for (size_t i = DLOG_REC_HDR_LEN + tlen; i < need; i++)
		if (p[i])
			return DLOG_DEC_ERR_FIELD;
	if (spool_get32(p + 8) !=
	    rec_crc(salt, p, p + DLOG_REC_HDR_LEN, tlen))
		return DLOG_DEC_ERR_CRC;
	r->type = (enum dlog_type)p[5];
	r->rcpt = spool_get32(p + 12);
	r->msgid = spool_get64(p + 16);
	r->time_us = spool_get64(p + 24);
	r->next_us = spool_get64(p + 32);
	r->aux = spool_get64(p + 40);
	r->attempts = spool_get32(p + 48);
	r->text_len = (uint16_t)tlen;
	r->text = tlen ? (const char *)(p + DLOG_REC_HDR_LEN) : NULL;
	*used = need;
	return DLOG_DEC_OK;
}

enum dlog_dec
dlog_decode(const uint8_t *p, size_t n, struct dlog_rec *r, size_t *used)
{
	return dlog_decode_salted(p, n, 0, r, used);
}

void
dlog_file_hdr_encode(const struct dlog_file_hdr *h, uint8_t *out)
{
	memset(out, 0, DLOG_FILE_HDR_LEN);
	memcpy(out, file_magic, sizeof(file_magic));
	spool_put16(out + 4, h->version ? h->version : DLOG_FILE_VERSION);
	spool_put16(out + 6, (uint16_t)DLOG_FILE_HDR_LEN);
	spool_put64(out + 8, h->generation);
	spool_put64(out + 16, h->prev_generation);
	spool_put64(out + 24, h->created_us);
	spool_put64(out + 32, h->salt);
	spool_put32(out + FILE_HDR_CRC_OFF,
		    fd_crc32c(0, out, FILE_HDR_CRC_OFF));
}

enum dlog_dec
dlog_file_hdr_decode(const uint8_t *p, size_t n, struct dlog_file_hdr *h)
{
	if (!p || !h)
		return n ? DLOG_DEC_ERR_FIELD : DLOG_DEC_AGAIN;
	for (size_t i = 0; i < n && i < sizeof(file_magic); i++)
		if (p[i] != file_magic[i])
			return DLOG_DEC_ERR_MAGIC;
	if (n < DLOG_FILE_HDR_LEN)
		return DLOG_DEC_AGAIN;
	if (spool_get16(p + 4) != 1 && spool_get16(p + 4) != DLOG_FILE_VERSION)
		return DLOG_DEC_ERR_VERSION;
	if (spool_get16(p + 6) != DLOG_FILE_HDR_LEN)
		return DLOG_DEC_ERR_LEN;
	if (spool_get32(p + FILE_HDR_CRC_OFF) !=
	    fd_crc32c(0, p, FILE_HDR_CRC_OFF))
		return DLOG_DEC_ERR_CRC;
	for (size_t i = 40; i < FILE_HDR_CRC_OFF; i++)
		if (p[i])
			return DLOG_DEC_ERR_FIELD;
	if (spool_get64(p + 8) == 0)
		return DLOG_DEC_ERR_FIELD;
	h->version = spool_get16(p + 4);
	h->generation = spool_get64(p + 8);
	h->prev_generation = spool_get64(p + 16);
	h->created_us = spool_get64(p + 24);
	h->salt = spool_get64(p + 32);
	return DLOG_DEC_OK;
}

/* ---- scanner ---------------------------------------------------------- */

/*
 * Reads a file (or memory image) through a window, so memory stays bounded
 * whatever the file size. The window always holds DLOG_REC_MAX bytes from
 * the position asked for, unless the end of the source is nearer.
 */
struct scan {
	spool_read_fn rd;
	void *rd_ctx;
	uint64_t size;
	uint64_t want_gen; /* 0: take the header's */
	bool stop_at_end;  /* completeness check only */
	const char *name;  /* for logs */
	uint8_t *win;
	size_t win_cap;
	uint64_t win_off;
	size_t win_have;
	struct dlog_scan_result res;
};

static int
win_get(struct scan *s, uint64_t pos, size_t want, const uint8_t **p,
	size_t *avail)
{
	uint64_t left = pos < s->size ? s->size - pos : 0;
	size_t lim = left < want ? (size_t)left : want;

	if (pos < s->win_off || pos + lim > s->win_off + s->win_have) {
		size_t n = left < s->win_cap ? (size_t)left : s->win_cap;
		long r = n ? s->rd(s->rd_ctx, pos, s->win, n) : 0;

		if (r < 0)
			return (int)r;
		s->win_off = pos;
		s->win_have = (size_t)r;
		if ((size_t)r < n) /* the source shrank under us */
			s->size = pos + (uint64_t)r;
		if (lim > (size_t)r)
			lim = (size_t)r;
	}
	*p = s->win + (pos - s->win_off);
	*avail = lim;
	return 0;
}

struct mem_src {
	const uint8_t *p;
	size_t n;
};

static long
mem_read(void *ctx, uint64_t off, void *buf, size_t n)
{
	const struct mem_src *m = ctx;

	if (off >= m->n)
		return 0;
	if (n > m->n - off)
		n = m->n - (size_t)off;
	memcpy(buf, m->p + off, n);
	return (long)n;
}

/*
 * Copy 0, else copy 1 where its version puts it: at 64 in a version 1 file
 * (tried first: in a version 2 file those bytes are zero), at 4096 in a
 * version 2 one. A copy is taken only at its own version's place, and the
 * records start where that version says. A read error on one copy (a bad
 * block 0) leaves the other; it is returned only when no copy was read.
 */
static int
scan_header(struct scan *s)
{
	static const struct {
		uint64_t off;
		uint16_t version; /* 0: either */
	} copies[] = {
		{ 0, 0 },
		{ DLOG_FILE_V1_HDR1_OFF, 1 },
		{ DLOG_FILE_HDR1_OFF, 2 },
	};
	int err = 0;

	for (unsigned c = 0; c < sizeof(copies) / sizeof(copies[0]); c++) {
		struct dlog_file_hdr h;
		const uint8_t *p;
		size_t n;
		int rc = win_get(s, copies[c].off, DLOG_FILE_HDR_LEN, &p, &n);

		if (rc) {
			err = rc;
			continue;
		}
		if (n < DLOG_FILE_HDR_LEN ||
		    dlog_file_hdr_decode(p, n, &h) != DLOG_DEC_OK ||
		    (copies[c].version && h.version != copies[c].version) ||
		    (s->want_gen && h.generation != s->want_gen))
			continue;
		s->res.hdr = h;
		s->res.hdr_ok = true;
		s->res.data_off = h.version == 1 ? DLOG_FILE_V1_DATA_OFF
						 : DLOG_FILE_DATA_OFF;
		if (c)
			fd_log(FD_LOG_WARN, COMP,
			       "event=damage file=%s what=header_copy0 "
			       "action=used_copy1",
			       s->name);
		return 0;
	}
	return err;
}

/* The next position after `bad` where a valid record starts, or UINT64_MAX
 * when none follows (a torn tail, or the zeros after the last record). */
static int
resync(struct scan *s, uint64_t bad, uint64_t *next)
{
	for (uint64_t q = bad + 8; q < s->size; q += 8) {
		const uint8_t *p;
		size_t n, used;
		struct dlog_rec r;
		int rc = win_get(s, q, DLOG_REC_MAX, &p, &n);

		if (rc)
			return rc;
		if (n < sizeof(rec_magic) ||
		    memcmp(p, rec_magic, sizeof(rec_magic)) != 0)
			continue;
		if (dlog_decode_salted(p, n, s->res.hdr.salt, &r, &used) ==
		    DLOG_DEC_OK) {
			*next = q;
			return 0;
		}
	}
	*next = UINT64_MAX;
	return 0;
}

static int
tail_check(struct scan *s)
{
	s->res.tail_clean = true;
	for (uint64_t off = s->res.end; off < s->size;) {
		const uint8_t *p;
		size_t n;
		int rc = win_get(s, off, s->win_cap, &p, &n);

		if (rc)
			return rc;
		if (!n)
			break;
		for (size_t i = 0; i < n; i++)
			if (p[i]) {
				s->res.tail_clean = false;
				return 0;
			}
		off += n;
	}
	return 0;
}

static int
scan_records(struct scan *s, dlog_replay_fn fn, void *ctx)
{
	uint64_t pos = s->res.data_off, gen = s->res.hdr.generation;
	bool begun = false;

	s->res.end = s->res.data_off;
	while (pos < s->size) {
		const uint8_t *p;
		size_t n, used;
		struct dlog_rec r;
		enum dlog_dec d;
		uint64_t next;
		int rc = win_get(s, pos, DLOG_REC_MAX, &p, &n);

		if (rc)
			return rc;
		if (!n)
			break;
		d = dlog_decode_salted(p, n, s->res.hdr.salt, &r, &used);
		if (d != DLOG_DEC_OK) {
			rc = resync(s, pos, &next);
			if (rc)
				return rc;
			if (next == UINT64_MAX)
				break;
			s->res.records_bad++;
			fd_log(FD_LOG_WARN, COMP,
			       "event=damage file=%s off=%" PRIu64
			       " skipped=%" PRIu64 " reason=%s",
			       s->name, pos, next - pos, dlog_dec_name(d));
			pos = next;
			continue;
		}
		pos += used;
		s->res.end = pos;
		if (r.type == DLOG_CKPT_BEGIN || r.type == DLOG_CKPT_END) {
			bool ok = r.msgid == gen && !s->res.complete &&
				  (r.type == DLOG_CKPT_END || !begun);

			if (!ok) {
				/* Only a bug could write this; the
				 * record carries no delivery state. */
				s->res.records_bad++;
				fd_log(FD_LOG_WARN, COMP,
				       "event=damage file=%s off=%" PRIu64
				       " reason=stray_%s",
				       s->name, pos - used,
				       dlog_type_name(r.type));
				continue;
			}
			if (r.type == DLOG_CKPT_BEGIN) {
				begun = true;
				continue;
			}
			s->res.complete = true;
			s->res.ckpt_expected = r.aux;
			s->res.ckpt_end = pos;
			if (s->stop_at_end)
				return 0;
			continue;
		}
		s->res.records++;
		if (!s->res.complete)
			s->res.ckpt_records++;
		if (fn) {
			rc = fn(ctx, &r);
			if (rc)
				return rc;
		}
	}
	return tail_check(s);
}

static int
scan_run(struct scan *s, dlog_replay_fn fn, void *ctx)
{
	int rc;

	s->res.size = s->size;
	rc = scan_header(s);
	if (rc || !s->res.hdr_ok)
		return rc;
	rc = scan_records(s, fn, ctx);
	if (!rc && s->res.complete && !s->stop_at_end &&
	    s->res.ckpt_records != s->res.ckpt_expected)
		fd_log(FD_LOG_WARN, COMP,
		       "event=damage file=%s what=checkpoint records=%" PRIu64
		       " expected=%" PRIu64,
		       s->name, s->res.ckpt_records, s->res.ckpt_expected);
	return rc;
}

int
dlog_scan_mem(const uint8_t *p, size_t n, dlog_replay_fn fn, void *ctx,
	      struct dlog_scan_result *res)
{
	struct mem_src src = { p, p ? n : 0 };
	struct scan s;
	int rc;

	memset(&s, 0, sizeof(s));
	s.rd = mem_read;
	s.rd_ctx = &src;
	s.size = src.n;
	s.name = "memory";
	s.win_cap = n < DLOG_REC_MAX ? DLOG_REC_MAX : n;
	if (s.win_cap > SCAN_WIN)
		s.win_cap = SCAN_WIN;
	s.win = malloc(s.win_cap);
	if (!s.win)
		return -ENOMEM;
	rc = scan_run(&s, fn, ctx);
	if (res)
		*res = s.res;
	free(s.win);
	return rc;
}

/* ---- the handle ------------------------------------------------------- */

struct dlog {
	pthread_mutex_t mu;
	pthread_cond_t cv_work;    /* writer: records pending, or stop */
	pthread_cond_t cv_durable; /* waiters: durable_lsn moved, or err */
	pthread_cond_t cv_room;    /* appenders: room, checkpoint over, err */
	pthread_t writer;

	struct dlog_params p;
	char *dir;
	int dirfd;

	/* current file: changed only by the checkpoint, with the writer
	 * idle (see the invariants at the top) */
	int fd;
	uint64_t gen;
	uint64_t max_gen; /* highest generation ever seen in the dir */
	uint64_t salt;
	uint64_t off;   /* end of records; read lock-free */
	uint64_t alloc; /* file size: zeros from off to alloc */
	uint64_t ckpt_size; /* off right after this file's checkpoint */
	uint64_t data_off;  /* where this file's records start */

	uint8_t *pend;
	size_t pend_len, pend_cap;
	uint8_t *wbuf; /* the writer's, between swaps */
	size_t wbuf_cap;
	uint64_t last_lsn;    /* last handed out */
	uint64_t durable_lsn; /* read lock-free */
	int err;
	bool stop;
	bool hurry; /* someone waits for room, a checkpoint or a record still
		     * pending: no delay */
	bool urgent; /* pending holds a record not appended lazily */
	uint64_t swapped_lsn; /* last LSN handed to the writer */
	bool ckpt_active;
	pthread_t ckpt_thread;
	uint64_t no_space_since_us; /* st.no_space: since when (monotonic) */

	void (*cb)(void *ctx, uint64_t durable_lsn);
	void *cb_ctx;

	struct dlog_stats st;
};

#ifdef FINALDOT_FAULT_INJECTION
static dlog_io_hook_fn io_hook;
static void *io_hook_ctx;

/* FINALDOT_DELIVERY_FAULT=dlog-fail: once the log is open, its batch
 * fdatasyncs fail (EIO), as a disk that went bad would make them. */
static bool fail_batches;

static int
fail_batches_hook(void *ctx, enum dlog_io op, uint64_t gen)
{
	(void)ctx;
	(void)gen;
	if (op != DLOG_IO_SYNC ||
	    !__atomic_load_n(&fail_batches, __ATOMIC_ACQUIRE))
		return 0;
	return -EIO;
}

/* FINALDOT_DELIVERY_FAULT=dlog-hold: a batch's fdatasync waits while the
 * file DIR/hold exists (at most 60 s): a slow disk under the log, so that
 * a test can see what answers before a record is durable. */
static char hold_path[4200];

static int
hold_batches_hook(void *ctx, enum dlog_io op, uint64_t gen)
{
	(void)ctx;
	(void)gen;
	for (int i = 0; op == DLOG_IO_SYNC && i < 6000 &&
			access(hold_path, F_OK) == 0;
	     i++)
		usleep(10000);
	return 0;
}

void
dlog_set_io_hook(dlog_io_hook_fn fn, void *ctx)
{
	io_hook = fn;
	io_hook_ctx = ctx;
}
#endif

static int
io_check(enum dlog_io op, uint64_t gen)
{
#ifdef FINALDOT_FAULT_INJECTION
	if (io_hook) {
		int rc = io_hook(io_hook_ctx, op, gen);
		return rc > 0 ? -EIO : rc;
	}
#else
	(void)op;
	(void)gen;
#endif
	return 0;
}

static int
sync_file(int fd, enum dlog_io op, uint64_t gen)
{
	int rc = io_check(op, gen);

	if (rc)
		return rc;
	return fdatasync(fd) ? -errno : 0;
}

static int
sync_dir(int dirfd, uint64_t gen)
{
	int rc = io_check(DLOG_IO_SYNC_DIR, gen);

	if (rc)
		return rc;
	return fsync(dirfd) ? -errno : 0;
}

static uint64_t
now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static uint64_t
new_salt(void)
{
	uint64_t v = 0;

	if (getrandom(&v, sizeof(v), 0) == (ssize_t)sizeof(v))
		return v;
	/* XXX: without getrandom() the salt is guessable: damage resync
	 * still works, only the forged-record protection is weaker. */
	fd_log(FD_LOG_WARN, COMP, "event=no_random errno=%d", errno);
	return (now_us() * (uint64_t)0x9e3779b97f4a7c15u) ^ (uint64_t)getpid();
}

static void
file_name(char *buf, size_t len, uint64_t gen, const char *ext)
{
	snprintf(buf, len, "%016" PRIx64 ".%s", gen, ext);
}

enum name_kind { NK_NONE, NK_LOG, NK_TMP, NK_BAD };

static enum name_kind
parse_name(const char *s, uint64_t *gen)
{
	uint64_t g = 0;

	for (unsigned i = 0; i < 16; i++) {
		unsigned c = (unsigned char)s[i], v;

		if (c >= '0' && c <= '9')
			v = c - '0';
		else if (c >= 'a' && c <= 'f')
			v = c - 'a' + 10;
		else
			return NK_NONE;
		g = g << 4 | v;
	}
	if (g == 0)
		return NK_NONE;
	*gen = g;
	if (strcmp(s + 16, ".log") == 0)
		return NK_LOG;
	if (strcmp(s + 16, ".tmp") == 0)
		return NK_TMP;
	if (strcmp(s + 16, ".bad") == 0)
		return NK_BAD;
	return NK_NONE;
}

static int
pwrite_all(int fd, const void *buf, size_t n, uint64_t off)
{
	const uint8_t *p = buf;

	while (n) {
		ssize_t w = pwrite(fd, p, n, (off_t)off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -errno;
		if (w == 0)
			return -EIO;
		p += w;
		n -= (size_t)w;
		off += (uint64_t)w;
	}
	return 0;
}

/*
 * Grow the file to the next chunk boundary past `need` with written zeros
 * (not just fallocate: an unwritten extent costs a journal commit at its
 * first overwrite). The caller's next fdatasync makes the new size durable,
 * so appends inside the chunk are pure overwrites that need no metadata.
 */
static int
prealloc(int fd, uint64_t gen, uint64_t *alloc, uint64_t data_end)
{
	uint64_t end = (data_end + PREALLOC_CHUNK - 1) &
		       ~(uint64_t)(PREALLOC_CHUNK - 1);
	uint64_t from = *alloc > data_end ? *alloc : data_end;
	int rc;

	if (end <= from) {
		*alloc = from;
		return 0;
	}
	rc = io_check(DLOG_IO_GROW, gen);
	if (rc)
		return rc;
	/* Best effort (contiguous extents); the zeros below decide. */
	(void)fallocate(fd, 0, (off_t)from, (off_t)(end - from));
	for (uint64_t o = from; o < end;) {
		size_t k = end - o < sizeof(zeros) ? (size_t)(end - o)
						   : sizeof(zeros);
		rc = pwrite_all(fd, zeros, k, o);
		if (rc)
			return rc;
		o += k;
	}
	*alloc = end;
	return 0;
}

/* ---- new files: the first one and checkpoints ------------------------- */

struct newfile {
	int fd;
	uint64_t gen;
	uint64_t salt;
	uint64_t off;
	uint64_t alloc;
	uint64_t count; /* state records */
	uint8_t *buf;
	size_t len;
	int err;
	bool renamed;
};

static int
nf_flush(struct newfile *nf)
{
	int rc;

	if (!nf->len)
		return 0;
	rc = pwrite_all(nf->fd, nf->buf, nf->len, nf->off);
	if (rc)
		return rc;
	nf->off += nf->len;
	nf->len = 0;
	return 0;
}

static int
nf_put(struct newfile *nf, const struct dlog_rec *r)
{
	size_t k;

	if (nf->err)
		return nf->err;
	if (CKPT_BUF - nf->len < DLOG_REC_MAX) {
		nf->err = nf_flush(nf);
		if (nf->err)
			return nf->err;
	}
	k = dlog_encode_salted(r, nf->salt, nf->buf + nf->len,
			       CKPT_BUF - nf->len);
	if (!k)
		return nf->err = -EINVAL;
	nf->len += k;
	return 0;
}

static int
emit_cb(void *ectx, const struct dlog_rec *r)
{
	struct newfile *nf = ectx;
	int rc;

	/* Errors stick: a snapshot that ignores emit's result still fails. */
	if (!r || !dlog_type_is_public(r->type))
		return nf->err = -EINVAL;
	rc = nf_put(nf, r);
	if (!rc)
		nf->count++;
	return rc;
}

/*
 * Write GEN.tmp: headers, CKPT_BEGIN, the state from snap, CKPT_END, a
 * zeroed chunk; fdatasync it, rename it to GEN.log, fsync the directory.
 * Until the rename nothing visible has changed; nf->renamed tells a failure
 * after it (the directory fsync) from one before.
 */
static int
make_file(struct dlog *l, uint64_t gen, uint64_t prev, dlog_snapshot_fn snap,
	  void *ctx, struct newfile *nf)
{
	char tmp[NAME_MAX_LEN], fin[NAME_MAX_LEN];
	uint8_t hdr[DLOG_FILE_DATA_OFF];
	struct dlog_file_hdr h = {
		.generation = gen,
		.prev_generation = prev,
		.created_us = now_us(),
		.salt = new_salt(),
	};
	struct dlog_rec mark = {
		.type = DLOG_CKPT_BEGIN,
		.msgid = gen,
		.rcpt = DLOG_ALL,
		.time_us = h.created_us,
		.aux = prev,
	};
	int rc;

	memset(nf, 0, sizeof(*nf));
	nf->gen = gen;
	nf->salt = h.salt;
	nf->off = DLOG_FILE_DATA_OFF;
	file_name(tmp, sizeof(tmp), gen, "tmp");
	file_name(fin, sizeof(fin), gen, "log");
	nf->buf = malloc(CKPT_BUF);
	if (!nf->buf)
		return -ENOMEM;
	(void)unlinkat(l->dirfd, tmp, 0);
	nf->fd = openat(l->dirfd, tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC,
			0640);
	if (nf->fd < 0) {
		rc = -errno;
		goto out_free;
	}
	memset(hdr, 0, sizeof(hdr));
	dlog_file_hdr_encode(&h, hdr);
	memcpy(hdr + DLOG_FILE_HDR1_OFF, hdr, DLOG_FILE_HDR_LEN);
	rc = pwrite_all(nf->fd, hdr, sizeof(hdr), 0);
	if (rc)
		goto out_unlink;
	rc = nf_put(nf, &mark);
	if (rc)
		goto out_unlink;
	if (snap) {
		rc = snap(ctx, emit_cb, nf);
		if (!rc && nf->err)
			rc = nf->err;
		if (rc)
			goto out_unlink;
	}
	mark.type = DLOG_CKPT_END;
	mark.aux = nf->count;
	mark.time_us = now_us();
	rc = nf_put(nf, &mark);
	if (!rc)
		rc = nf_flush(nf);
	nf->alloc = nf->off;
	if (!rc)
		rc = prealloc(nf->fd, gen, &nf->alloc, nf->off);
	if (!rc)
		rc = sync_file(nf->fd, DLOG_IO_SYNC_NEW, gen);
	if (!rc) {
		rc = io_check(DLOG_IO_RENAME, gen);
		if (!rc && renameat(l->dirfd, tmp, l->dirfd, fin) != 0)
			rc = -errno;
	}
	if (rc)
		goto out_unlink;
	nf->renamed = true;
	rc = sync_dir(l->dirfd, gen);
	if (rc)
		goto out_close;
	free(nf->buf);
	nf->buf = NULL;
	return 0;

out_unlink:
	(void)unlinkat(l->dirfd, tmp, 0);
out_close:
	close(nf->fd);
	nf->fd = -1;
out_free:
	free(nf->buf);
	nf->buf = NULL;
	return rc;
}

/* Delete every GEN.log other than `keep` (all older when only_older).
 * Failures are logged: the next open deletes what is left. */
static uint64_t
remove_others(struct dlog *l, uint64_t keep, bool only_older)
{
	int dfd = dup(l->dirfd);
	DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
	struct dirent *e;
	uint64_t n = 0;

	if (!d) {
		if (dfd >= 0)
			close(dfd);
		fd_log(FD_LOG_WARN, COMP, "event=cleanup_failed errno=%d",
		       errno);
		return 0;
	}
	rewinddir(d);
	while ((e = readdir(d))) {
		uint64_t g;
		int rc;

		if (parse_name(e->d_name, &g) != NK_LOG || g == keep ||
		    (only_older && g > keep))
			continue;
		rc = io_check(DLOG_IO_UNLINK, g);
		if (!rc && unlinkat(l->dirfd, e->d_name, 0) != 0)
			rc = -errno;
		if (rc) {
			fd_log(FD_LOG_WARN, COMP,
			       "event=unlink_failed file=%s err=%d",
			       e->d_name, rc);
			continue;
		}
		fd_log(FD_LOG_INFO, COMP, "event=removed file=%s kept=%016"
		       PRIx64, e->d_name, keep);
		n++;
	}
	closedir(d);
	if (n) {
		int rc = sync_dir(l->dirfd, keep);
		if (rc)
			fd_log(FD_LOG_WARN, COMP,
			       "event=sync_dir_failed err=%d", rc);
	}
	return n;
}

/* ---- writer thread ---------------------------------------------------- */

static void deadline_after(struct timespec *ts, uint64_t us);

static bool
no_space(int rc)
{
	return rc == -ENOSPC || rc == -EDQUOT;
}

/* One batch: its records, zeros ahead, one fdatasync. *again: the records
 * were refused for want of space before anything was synced (retry the
 * same write); *grow_failed: only the zeros ahead were (not an error). */
static int
write_batch(struct dlog *l, int fd, uint64_t gen, const uint8_t *buf,
	    size_t n, uint64_t off, uint64_t *alloc, bool *synced, bool *again,
	    bool *grow_failed)
{
	int rc = io_check(DLOG_IO_WRITE, gen);

	if (!rc)
		rc = pwrite_all(fd, buf, n, off);
	if (rc) {
		*again = no_space(rc);
		return rc;
	}
	rc = prealloc(fd, gen, alloc, off + n);
	if (no_space(rc)) {
		*grow_failed = true;
		rc = 0;
	}
	if (!rc && !l->p.no_sync) {
		rc = sync_file(fd, DLOG_IO_SYNC, gen);
		*synced = true;
	}
	return rc;
}

/* Wait SPACE_RETRY_US or until the log stops; under mu. True: stopping. */
static bool
space_wait(struct dlog *l)
{
	struct timespec dl;

	deadline_after(&dl, SPACE_RETRY_US);
	while (!l->stop &&
	       pthread_cond_timedwait(&l->cv_work, &l->mu, &dl) != ETIMEDOUT)
		;
	return l->stop;
}

static void
deadline_after(struct timespec *ts, uint64_t us)
{
	clock_gettime(CLOCK_MONOTONIC, ts);
	ts->tv_sec += (time_t)(us / 1000000u);
	ts->tv_nsec += (long)(us % 1000000u) * 1000;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

static void *
writer_main(void *arg)
{
	struct dlog *l = arg;

	(void)fd_thread_nice_by(l->p.nice, COMP);

	pthread_mutex_lock(&l->mu);
	for (;;) {
		uint64_t last, off, alloc, gen;
		uint8_t *buf;
		size_t n, cap;
		bool synced = false, failed;
		int fd, rc = 0;
		void (*cb)(void *, uint64_t);
		void *cb_ctx;

		while (!l->pend_len && !l->stop)
			pthread_cond_wait(&l->cv_work, &l->mu);
		if (!l->pend_len)
			break;
		/* Lazy records alone: wait for a record or a waiter that
		 * wants a flush now, at most lazy_delay_us. */
		if (!l->urgent && !l->hurry && !l->stop &&
		    l->p.lazy_delay_us) {
			struct timespec dl;

			deadline_after(&dl, l->p.lazy_delay_us);
			while (!l->urgent && !l->hurry && !l->stop &&
			       pthread_cond_timedwait(&l->cv_work, &l->mu,
						      &dl) != ETIMEDOUT)
				;
		}
		if (l->p.flush_delay_us && !l->stop && !l->hurry) {
			struct timespec dl;

			deadline_after(&dl, l->p.flush_delay_us);
			while (!l->stop && !l->hurry &&
			       pthread_cond_timedwait(&l->cv_work, &l->mu,
						      &dl) != ETIMEDOUT)
				;
		}
		l->hurry = false;
		l->urgent = false;
		buf = l->pend;
		cap = l->pend_cap;
		n = l->pend_len;
		l->pend = l->wbuf;
		l->pend_cap = l->wbuf_cap;
		l->wbuf = buf;
		l->wbuf_cap = cap;
		l->pend_len = 0;
		last = l->last_lsn;
		l->swapped_lsn = last;
		pthread_cond_broadcast(&l->cv_room);
		fd = l->fd;
		gen = l->gen;
		off = l->off;
		alloc = l->alloc;
		failed = l->err != 0;
		pthread_mutex_unlock(&l->mu);

		while (!failed) {
			bool again = false, grow_failed = false;

			rc = write_batch(l, fd, gen, buf, n, off, &alloc,
					 &synced, &again, &grow_failed);
			pthread_mutex_lock(&l->mu);
			if (grow_failed && l->st.grow_failed++ == 0)
				fd_log(FD_LOG_WARN, COMP,
				       "event=grow_failed generation=%016" PRIx64
				       " off=%" PRIu64 " note=\"no room to "
				       "grow the log ahead; records still go "
				       "in, each batch tries again\"",
				       gen, off + n);
			if (!again) {
				if (!rc && l->st.no_space)
					fd_log(FD_LOG_INFO, COMP,
					       "event=space_again "
					       "waited_ms=%" PRIu64,
					       (fd_now_monotonic_us() -
						l->no_space_since_us) /
						       1000);
				__atomic_store_n(&l->st.no_space, false,
						 __ATOMIC_RELEASE);
				pthread_mutex_unlock(&l->mu);
				break;
			}
			l->st.space_waits++;
			if (!l->st.no_space) {
				__atomic_store_n(&l->st.no_space, true,
						 __ATOMIC_RELEASE);
				l->no_space_since_us = fd_now_monotonic_us();
				fd_log(FD_LOG_ERR, COMP,
				       "event=no_space generation=%016" PRIx64
				       " off=%" PRIu64 " bytes=%zu err=%d "
				       "action=\"records wait, and deliveries "
				       "with them, retried every second; free "
				       "space on the spool's filesystem\"",
				       gen, off, n, rc);
			}
			if (space_wait(l)) {
				/* Stopping: the batch stays unwritten, its
				 * waiters fail (nothing they wait for was
				 * made durable). */
				pthread_mutex_unlock(&l->mu);
				break;
			}
			pthread_mutex_unlock(&l->mu);
		}

		pthread_mutex_lock(&l->mu);
		if (failed)
			continue;
		l->st.syncs += synced;
		if (rc) {
			__atomic_store_n(&l->err, rc, __ATOMIC_RELEASE);
			fd_log(FD_LOG_ERR, COMP,
			       "event=failed generation=%016" PRIx64
			       " off=%" PRIu64 " bytes=%zu err=%d lsn=%" PRIu64,
			       gen, off, n, rc, last);
			pthread_cond_broadcast(&l->cv_durable);
			pthread_cond_broadcast(&l->cv_room);
			continue;
		}
		__atomic_store_n(&l->off, off + n, __ATOMIC_RELEASE);
		l->alloc = alloc;
		__atomic_store_n(&l->durable_lsn, last, __ATOMIC_RELEASE);
		l->st.flushes++;
		l->st.bytes += n;
		pthread_cond_broadcast(&l->cv_durable);
		cb = l->cb;
		cb_ctx = l->cb_ctx;
		if (cb) {
			pthread_mutex_unlock(&l->mu);
			cb(cb_ctx, last);
			pthread_mutex_lock(&l->mu);
		}
	}
	pthread_mutex_unlock(&l->mu);
	return NULL;
}

/* ---- open ------------------------------------------------------------- */

void
dlog_params_defaults(struct dlog_params *p)
{
	memset(p, 0, sizeof(*p));
	p->rotate_bytes = ROTATE_DEFAULT;
	p->pending_max = PEND_MAX_DEFAULT;
	p->lazy_delay_us = LAZY_DELAY_DEFAULT_US;
}

static int
cmp_gen_desc(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? 1 : x > y ? -1 : 0;
}


/* The *.log generations (sorted newest first) and the highest generation
 * of any kind; leftover *.tmp files (interrupted creations) are deleted. */
static int
list_dir(struct dlog *l, uint64_t **gens, size_t *n, uint64_t *max_gen)
{
	int dfd = dup(l->dirfd);
	DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
	struct dirent *e;
	size_t cap = 0;
	int rc = 0;

	*gens = NULL;
	*n = 0;
	*max_gen = 0;
	if (!d) {
		rc = -errno;
		if (dfd >= 0)
			close(dfd);
		return rc;
	}
	rewinddir(d);
	while ((errno = 0, e = readdir(d))) {
		uint64_t g;
		enum name_kind k = parse_name(e->d_name, &g);

		if (k == NK_NONE)
			continue;
		if (g > *max_gen)
			*max_gen = g;
		if (k == NK_TMP) {
			fd_log(FD_LOG_INFO, COMP,
			       "event=removed file=%s reason=interrupted",
			       e->d_name);
			(void)unlinkat(l->dirfd, e->d_name, 0);
			continue;
		}
		if (k != NK_LOG)
			continue;
		if (*n == cap) {
			size_t nc = cap ? cap * 2 : 8;
			uint64_t *ng = realloc(*gens, nc * sizeof(*ng));
			if (!ng) {
				rc = -ENOMEM;
				break;
			}
			*gens = ng;
			cap = nc;
		}
		(*gens)[(*n)++] = g;
	}
	if (!rc && errno)
		rc = -errno;
	closedir(d);
	if (rc) {
		free(*gens);
		*gens = NULL;
		*n = 0;
		return rc;
	}
	if (*n)
		qsort(*gens, *n, sizeof(**gens), cmp_gen_desc);
	return 0;
}

static void
scan_init_fd(struct scan *s, int *fd, uint64_t size, uint64_t gen,
	     const char *name, uint8_t *win)
{
	memset(s, 0, sizeof(*s));
	s->rd = spool_read_fd;
	s->rd_ctx = fd;
	s->size = size;
	s->want_gen = gen;
	s->name = name;
	s->win = win;
	s->win_cap = SCAN_WIN;
}

static int
open_log_file(struct dlog *l, uint64_t gen, int *fd, uint64_t *size)
{
	char name[NAME_MAX_LEN];
	struct stat sb;

	file_name(name, sizeof(name), gen, "log");
	*fd = openat(l->dirfd, name, O_RDWR | O_CLOEXEC);
	if (*fd < 0)
		return -errno;
	if (fstat(*fd, &sb) != 0) {
		int rc = -errno;
		close(*fd);
		*fd = -1;
		return rc;
	}
	*size = (uint64_t)sb.st_size;
	return 0;
}

/* A file whose header no copy can vouch for is kept for the operator as
 * GEN.bad, out of the log's way. */
static void
set_aside(struct dlog *l, uint64_t gen, const char *what)
{
	char from[NAME_MAX_LEN], to[NAME_MAX_LEN];

	file_name(from, sizeof(from), gen, "log");
	file_name(to, sizeof(to), gen, "bad");
	if (renameat(l->dirfd, from, l->dirfd, to) != 0)
		fd_log(FD_LOG_WARN, COMP, "event=rename_failed file=%s errno=%d",
		       from, errno);
	else
		fd_log(FD_LOG_ERR, COMP,
		       "event=damage file=%s what=%s action=renamed to=%s",
		       from, what, to);
}

/*
 * Choose the file to replay: the newest one with a complete checkpoint.
 * Without one (only damage can cause that: files appear by rename once
 * complete), the newest usable file if it is the only one, else the second
 * newest (the newest taken for an interrupted checkpoint); *complete says
 * which case it was. -1 in *pick: no usable file.
 */
static int
choose_file(struct dlog *l, const uint64_t *gens, size_t n, uint8_t *win,
	    bool *usable, long *pick, bool *complete)
{
	long first = -1, second = -1;

	*pick = -1;
	*complete = false;
	for (size_t i = 0; i < n; i++) {
		char name[NAME_MAX_LEN];
		struct scan s;
		uint64_t size;
		int fd, rc;

		file_name(name, sizeof(name), gens[i], "log");
		rc = open_log_file(l, gens[i], &fd, &size);
		if (rc)
			return rc;
		scan_init_fd(&s, &fd, size, gens[i], name, win);
		s.stop_at_end = true;
		rc = scan_run(&s, NULL, NULL);
		close(fd);
		if (rc)
			return rc;
		usable[i] = s.res.hdr_ok;
		if (!usable[i])
			continue;
		if (s.res.complete) {
			*pick = (long)i;
			*complete = true;
			return 0;
		}
		fd_log(FD_LOG_WARN, COMP, "event=incomplete file=%s", name);
		if (first < 0)
			first = (long)i;
		else if (second < 0)
			second = (long)i;
	}
	*pick = second >= 0 ? second : first;
	return 0;
}

static int
replay_file(struct dlog *l, uint64_t gen, uint8_t *win, dlog_replay_fn fn,
	    void *ctx, struct dlog_open_stats *st, bool *tail_clean)
{
	char name[NAME_MAX_LEN];
	struct scan s;
	uint64_t size;
	int fd, rc;

	file_name(name, sizeof(name), gen, "log");
	rc = open_log_file(l, gen, &fd, &size);
	if (rc)
		return rc;
	scan_init_fd(&s, &fd, size, gen, name, win);
	rc = scan_run(&s, fn, ctx);
	if (rc)
		goto out_close;
	st->records = s.res.records;
	st->records_bad = s.res.records_bad;
	st->bytes = s.res.end;
	st->checkpoint_used = s.res.complete && s.res.hdr.prev_generation != 0;
	*tail_clean = s.res.tail_clean;
	l->fd = fd;
	l->gen = gen;
	l->salt = s.res.hdr.salt;
	l->off = s.res.end;
	l->alloc = s.size;
	l->ckpt_size = s.res.ckpt_end;
	l->data_off = s.res.data_off;
	return 0;

out_close:
	close(fd);
	return rc;
}

/*
 * After the replay: drop what follows the last valid record unless it is
 * all zeros (a torn batch). None of it decodes (the scan would have
 * resynchronised on it) and appends before it cannot change that, so this
 * is hygiene: the file ends in zeros again and the next open sees a clean
 * end. Made durable before the first append.
 */
static int
cut_tail(struct dlog *l, struct dlog_open_stats *st)
{
	char name[NAME_MAX_LEN];

	file_name(name, sizeof(name), l->gen, "log");
	st->tail_bytes = l->alloc - l->off;
	fd_log(FD_LOG_INFO, COMP,
	       "event=torn_tail file=%s off=%" PRIu64 " bytes=%" PRIu64, name,
	       l->off, st->tail_bytes);
	if (ftruncate(l->fd, (off_t)l->off) != 0)
		return -errno;
	l->alloc = l->off;
	return sync_file(l->fd, DLOG_IO_SYNC, l->gen);
}

/* Pick, replay and tidy the directory; or start a new log. */
static int
recover(struct dlog *l, dlog_replay_fn fn, void *ctx,
	struct dlog_open_stats *st)
{
	uint64_t *gens = NULL;
	bool *usable = NULL, complete = false, tail_clean = true;
	uint8_t *win = NULL;
	size_t n = 0;
	long pick = -1;
	int rc;

	rc = list_dir(l, &gens, &n, &l->max_gen);
	if (rc)
		return rc;
	st->files = n;
	usable = calloc(n ? n : 1, sizeof(*usable));
	win = malloc(SCAN_WIN);
	if (!usable || !win) {
		rc = -ENOMEM;
		goto out_free;
	}
	rc = choose_file(l, gens, n, win, usable, &pick, &complete);
	if (rc)
		goto out_free;
	if (pick >= 0) {
		rc = replay_file(l, gens[pick], win, fn, ctx, st,
				 &tail_clean);
		if (rc)
			goto out_free;
	}
	for (size_t i = 0; i < n; i++) {
		if ((long)i == pick)
			continue;
		if (pick >= 0 && complete && gens[i] > gens[pick]) {
			/* Newer than the complete file chosen: files appear
			 * under .log only once complete, so this is damage
			 * (its header, or its checkpoint's end), never a
			 * crash, and it may hold outcomes appended after its
			 * checkpoint. Kept for the operator; those outcomes
			 * are not replayed (their deliveries may repeat). */
			set_aside(l, gens[i], usable[i] ? "no_checkpoint_end"
							: "header");
			st->files_bad++;
			continue;
		}
		if (!usable[i] && (pick < 0 || !complete)) {
			/* With a complete file, remove_others() deletes an
			 * older one like any other; otherwise keep it for
			 * the operator. */
			set_aside(l, gens[i], "header");
			st->files_bad++;
		}
	}
	st->complete = complete;
	if (pick >= 0 && complete) /* older ones: superseded */
		st->files_removed = remove_others(l, gens[pick], true);
	else if (pick >= 0)
		fd_log(FD_LOG_ERR, COMP,
		       "event=damage what=no_complete_checkpoint "
		       "using=%016" PRIx64 " action=kept_all",
		       gens[pick]);
	if (pick >= 0) {
		if (!tail_clean)
			rc = cut_tail(l, st);
		goto out_free;
	}
	{
		struct newfile nf;

		rc = make_file(l, l->max_gen + 1, 0, NULL, NULL, &nf);
		if (rc)
			goto out_free;
		l->fd = nf.fd;
		l->gen = l->max_gen = nf.gen;
		l->salt = nf.salt;
		l->off = l->ckpt_size = nf.off;
		l->data_off = DLOG_FILE_DATA_OFF;
		l->alloc = nf.alloc;
		st->complete = true;
	}
out_free:
	free(win);
	free(usable);
	free(gens);
	return rc;
}

struct dlog *
dlog_open(const char *dir, const struct dlog_params *p, dlog_replay_fn fn,
	  void *ctx, struct dlog_open_stats *st, int *err)
{
	struct dlog_open_stats local;
	pthread_condattr_t ca;
	struct dlog *l;
	int rc;

	if (!st)
		st = &local;
	memset(st, 0, sizeof(*st));
	if (!dir || !*dir) {
		rc = -EINVAL;
		goto out;
	}
	l = calloc(1, sizeof(*l));
	if (!l) {
		rc = -ENOMEM;
		goto out;
	}
	if (p)
		l->p = *p;
	else
		dlog_params_defaults(&l->p);
	if (l->p.pending_max < DLOG_REC_MAX)
		l->p.pending_max = DLOG_REC_MAX;
#ifdef FINALDOT_FAULT_INJECTION
	/* Test seam: FINALDOT_DELIVERY_FAULT=no-dlog-sync leaves out the
	 * batch fdatasync (no_sync), a mutant the power-cut test must catch
	 * (docs/powercut.md). A release build never reads it. */
	if (fd_delivery_fault("no-dlog-sync"))
		l->p.no_sync = true;
	if (fd_delivery_fault("dlog-fail"))
		dlog_set_io_hook(fail_batches_hook, NULL);
	if (fd_delivery_fault("dlog-hold")) {
		snprintf(hold_path, sizeof(hold_path), "%s/hold", dir);
		dlog_set_io_hook(hold_batches_hook, NULL);
	}
#endif
	l->fd = -1;
	l->dir = strdup(dir);
	if (!l->dir) {
		rc = -ENOMEM;
		goto out_free;
	}
	rc = fd_mkdir_durable(dir, 0750);
	if (rc)
		goto out_free;
	l->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (l->dirfd < 0) {
		rc = -errno;
		goto out_free;
	}
	rc = recover(l, fn, ctx, st);
	if (rc) {
		if (l->fd >= 0) /* a file replayed, then its tail not cut */
			close(l->fd);
		goto out_close_dir;
	}
	st->generation = l->gen;

	l->pend_cap = l->wbuf_cap = l->p.pending_max < PEND_INIT
					    ? (size_t)l->p.pending_max
					    : PEND_INIT;
	l->pend = malloc(l->pend_cap);
	l->wbuf = malloc(l->wbuf_cap);
	if (!l->pend || !l->wbuf) {
		rc = -ENOMEM;
		goto out_close_file;
	}
	pthread_mutex_init(&l->mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&l->cv_work, &ca);
	pthread_condattr_destroy(&ca);
	pthread_cond_init(&l->cv_durable, NULL);
	pthread_cond_init(&l->cv_room, NULL);
	l->st.generation = l->gen;
	rc = -pthread_create(&l->writer, NULL, writer_main, l);
	if (rc)
		goto out_destroy;
	/* named like the other control-plane threads (top -H, perf) */
	pthread_setname_np(l->writer, "fd-dlog");
#ifdef FINALDOT_FAULT_INJECTION
	if (io_hook == fail_batches_hook)
		__atomic_store_n(&fail_batches, true, __ATOMIC_RELEASE);
#endif
	fd_log(FD_LOG_INFO, COMP,
	       "event=open dir=%s generation=%016" PRIx64 " files=%" PRIu64
	       " records=%" PRIu64 " bad=%" PRIu64 " bytes=%" PRIu64
	       " checkpoint=%d complete=%d",
	       dir, l->gen, st->files, st->records, st->records_bad,
	       st->bytes, st->checkpoint_used, st->complete);
	return l;

out_destroy:
	pthread_cond_destroy(&l->cv_room);
	pthread_cond_destroy(&l->cv_durable);
	pthread_cond_destroy(&l->cv_work);
	pthread_mutex_destroy(&l->mu);
out_close_file:
	free(l->pend);
	free(l->wbuf);
	close(l->fd);
out_close_dir:
	close(l->dirfd);
out_free:
	free(l->dir);
	free(l);
out:
	if (err)
		*err = rc;
	return NULL;
}

/* ---- appending -------------------------------------------------------- */

/* Room for `need` more pending bytes, growing the buffer up to the cap.
 * A buffer holding nothing always has room for one record. */
static bool
pend_room(struct dlog *l, size_t need)
{
	size_t want = l->pend_len + need, cap = l->pend_cap;
	uint8_t *nb;

	if (want <= cap)
		return true;
	if (want > l->p.pending_max)
		return false;
	while (cap < want)
		cap *= 2;
	if (cap > l->p.pending_max)
		cap = (size_t)l->p.pending_max;
	nb = realloc(l->pend, cap);
	if (!nb)
		return false; /* wait for the writer to drain it instead */
	l->pend = nb;
	l->pend_cap = cap;
	return true;
}

static uint64_t
append(struct dlog *l, const struct dlog_rec *r, bool lazy)
{
	size_t need;
	uint64_t lsn;
	bool wake;

	if (!l || !r || !dlog_type_is_public(r->type) ||
	    (r->text_len && !r->text))
		return 0;
	need = dlog_rec_size(r->text_len);
	pthread_mutex_lock(&l->mu);
	for (;;) {
		if (l->err || l->stop)
			goto out_refuse;
		if (l->ckpt_active) {
			if (pthread_equal(l->ckpt_thread, pthread_self())) {
				fd_log(FD_LOG_ERR, COMP,
				       "event=misuse what=append_in_snapshot");
				goto out_refuse;
			}
			pthread_cond_wait(&l->cv_room, &l->mu);
			continue;
		}
		if (pend_room(l, need))
			break;
		l->st.room_waits++;
		l->hurry = true;
		pthread_cond_signal(&l->cv_work);
		pthread_cond_wait(&l->cv_room, &l->mu);
	}
	(void)dlog_encode_salted(r, l->salt, l->pend + l->pend_len, need);
	/* The writer waits for the first record, and then, while all it
	 * has is lazy, for the first one that is not. */
	wake = l->pend_len == 0 || (!lazy && !l->urgent);
	l->pend_len += need;
	if (!lazy)
		l->urgent = true;
	lsn = ++l->last_lsn;
	l->st.appended++;
	if (wake)
		pthread_cond_signal(&l->cv_work);
	pthread_mutex_unlock(&l->mu);
	return lsn;

out_refuse:
	pthread_mutex_unlock(&l->mu);
	return 0;
}

uint64_t
dlog_append(struct dlog *l, const struct dlog_rec *r)
{
	return append(l, r, false);
}

uint64_t
dlog_append_lazy(struct dlog *l, const struct dlog_rec *r)
{
	return append(l, r, true);
}

int
dlog_wait(struct dlog *l, uint64_t lsn)
{
	int rc;

	if (!l)
		return -EINVAL;
	/* Durable already (the common case for all but the first message
	 * of a delivery batch) and the log not failed (a failed log fails
	 * every wait): no lock, which 30 threads contend. */
	if (lsn && lsn <= __atomic_load_n(&l->durable_lsn, __ATOMIC_ACQUIRE) &&
	    __atomic_load_n(&l->err, __ATOMIC_ACQUIRE) == 0)
		return 0;
	pthread_mutex_lock(&l->mu);
	if (lsn > l->last_lsn) {
		pthread_mutex_unlock(&l->mu);
		return -EINVAL;
	}
	if (!l->err && lsn > l->swapped_lsn && !l->hurry) {
		/* Still pending: maybe behind lazy records only, which
		 * the writer holds back. */
		l->hurry = true;
		pthread_cond_signal(&l->cv_work);
	}
	while (!l->err && l->durable_lsn < lsn)
		pthread_cond_wait(&l->cv_durable, &l->mu);
	rc = l->err;
	pthread_mutex_unlock(&l->mu);
	return rc;
}

int
dlog_error(const struct dlog *l)
{
	return l ? __atomic_load_n(&l->err, __ATOMIC_ACQUIRE) : 0;
}

uint64_t
dlog_durable(const struct dlog *l)
{
	return __atomic_load_n(&l->durable_lsn, __ATOMIC_ACQUIRE);
}

uint64_t
dlog_appended(const struct dlog *l)
{
	/* The mutex is the one mutable part of a logically const handle. */
	pthread_mutex_t *mu = (pthread_mutex_t *)&l->mu;
	uint64_t v;

	pthread_mutex_lock(mu);
	v = l->last_lsn;
	pthread_mutex_unlock(mu);
	return v;
}

void
dlog_set_durable_cb(struct dlog *l, void (*cb)(void *ctx, uint64_t lsn),
		    void *ctx)
{
	pthread_mutex_lock(&l->mu);
	l->cb = cb;
	l->cb_ctx = ctx;
	pthread_mutex_unlock(&l->mu);
}

bool
dlog_want_checkpoint(const struct dlog *l)
{
	uint64_t off = __atomic_load_n(&l->off, __ATOMIC_ACQUIRE);
	uint64_t base = __atomic_load_n(&l->ckpt_size, __ATOMIC_ACQUIRE);
	uint64_t start = __atomic_load_n(&l->data_off, __ATOMIC_ACQUIRE);

	/* Not while a batch waits for space: the checkpoint would wait for
	 * it, and its new file needs room too. */
	if (__atomic_load_n(&l->st.no_space, __ATOMIC_ACQUIRE))
		return false;
	/* Record bytes, not file offsets: the headers' blocks are not
	 * growth. Read apart from a swap of files, a stale mix only moves
	 * the checkpoint by one call. */
	off = off > start ? off - start : 0;
	base = base > start ? base - start : 0;
	return off > l->p.rotate_bytes && off > 2 * base;
}

void
dlog_get_stats(const struct dlog *l, struct dlog_stats *st)
{
	/* The mutex is the one mutable part of a logically const handle. */
	pthread_mutex_t *mu = (pthread_mutex_t *)&l->mu;

	pthread_mutex_lock(mu);
	*st = l->st;
	st->generation = l->gen;
	st->durable_lsn = l->durable_lsn;
	st->file_bytes = l->off;
	st->error = l->err;
	pthread_mutex_unlock(mu);
}

/* ---- checkpoint ------------------------------------------------------- */

int
dlog_checkpoint(struct dlog *l, dlog_snapshot_fn snap, void *ctx)
{
	struct newfile nf;
	uint64_t target, gen, prev;
	int rc, old_fd;

	pthread_mutex_lock(&l->mu);
	while (l->ckpt_active && !l->err)
		pthread_cond_wait(&l->cv_room, &l->mu);
	if (l->err || l->stop) {
		rc = l->err ? l->err : -EINVAL;
		pthread_mutex_unlock(&l->mu);
		return rc;
	}
	l->ckpt_active = true;
	l->ckpt_thread = pthread_self();
	/* Records appended so far go to the old file and must be durable
	 * there before the new file can supersede it. */
	target = l->last_lsn;
	l->hurry = true;
	pthread_cond_signal(&l->cv_work);
	while (!l->err && l->durable_lsn < target)
		pthread_cond_wait(&l->cv_durable, &l->mu);
	if (l->err) {
		rc = l->err;
		goto out_unblock;
	}
	gen = l->max_gen + 1;
	prev = l->gen;
	pthread_mutex_unlock(&l->mu);

	rc = make_file(l, gen, prev, snap, ctx, &nf);

	pthread_mutex_lock(&l->mu);
	if (rc) {
		fd_log(FD_LOG_WARN, COMP,
		       "event=checkpoint_failed generation=%016" PRIx64
		       " err=%d renamed=%d",
		       gen, rc, nf.renamed);
		if (nf.renamed) {
			__atomic_store_n(&l->err, rc, __ATOMIC_RELEASE);
			l->max_gen = gen;
			pthread_cond_broadcast(&l->cv_durable);
		}
		goto out_unblock;
	}
	old_fd = l->fd;
	l->fd = nf.fd;
	l->gen = l->max_gen = gen;
	l->salt = nf.salt;
	__atomic_store_n(&l->ckpt_size, nf.off, __ATOMIC_RELEASE);
	__atomic_store_n(&l->data_off, DLOG_FILE_DATA_OFF, __ATOMIC_RELEASE);
	__atomic_store_n(&l->off, nf.off, __ATOMIC_RELEASE);
	l->alloc = nf.alloc;
	l->st.checkpoints++;
	l->ckpt_active = false;
	pthread_cond_broadcast(&l->cv_room);
	pthread_mutex_unlock(&l->mu);

	close(old_fd);
	fd_log(FD_LOG_INFO, COMP,
	       "event=checkpoint generation=%016" PRIx64 " records=%" PRIu64
	       " bytes=%" PRIu64,
	       gen, nf.count, nf.off);
	(void)remove_others(l, gen, true);
	return 0;

out_unblock:
	l->ckpt_active = false;
	pthread_cond_broadcast(&l->cv_room);
	pthread_mutex_unlock(&l->mu);
	return rc;
}

int
dlog_set_affinity(struct dlog *l, const cpu_set_t *cpus)
{
	return -pthread_setaffinity_np(l->writer, sizeof(*cpus), cpus);
}

/* ---- close ------------------------------------------------------------ */

void
dlog_close(struct dlog *l)
{
	if (!l)
		return;
	pthread_mutex_lock(&l->mu);
	l->stop = true;
	pthread_cond_signal(&l->cv_work);
	pthread_cond_broadcast(&l->cv_room);
	pthread_mutex_unlock(&l->mu);
	pthread_join(l->writer, NULL);
	fd_log(FD_LOG_INFO, COMP,
	       "event=close generation=%016" PRIx64 " appended=%" PRIu64
	       " flushes=%" PRIu64 " bytes=%" PRIu64 " err=%d",
	       l->gen, l->st.appended, l->st.flushes, l->st.bytes, l->err);
	pthread_cond_destroy(&l->cv_room);
	pthread_cond_destroy(&l->cv_durable);
	pthread_cond_destroy(&l->cv_work);
	pthread_mutex_destroy(&l->mu);
	close(l->fd);
	close(l->dirfd);
	free(l->pend);
	free(l->wbuf);
	free(l->dir);
	free(l);
}
