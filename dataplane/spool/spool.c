/*
 * The spool writer (contract in spool.h, format in finaldot/spool_format.h,
 * prose in docs/spool-format.md).
 *
 * A message is a stream of records: ENV at begin(), DATA records as body
 * bytes arrive (one DATA record is extended while the same message keeps
 * appending, and closed when another record is written or the batch
 * closes), END at commit(). Records of all open messages interleave in the
 * batch being filled. Body bytes are copied once, from the caller straight
 * into the batch buffer, and checksummed once: each DATA record's payload
 * CRC is folded into the message's body CRC with spool_crc32c_combine().
 *
 * Batch buffer states:
 *
 *   FREE --open--> FILLING --close--> CLOSED --submit--> INFLIGHT --cqe-->
 *   DONE --(head of the FIFO: completions in submission order)--> FREE
 *
 *   FILLING: at most one (sp->cur); has a sequence number, a segment and an
 *            offset in it fixed at open (so records carry the right epoch).
 *   CLOSED:  zero-padded to a block; waits for a free SQE (or a hold fault).
 *   DONE:    its result is known; callbacks wait until every earlier batch
 *            is DONE too (the completion watermark).
 *
 * Space in a buffer: DATA bytes fill it up to batch_size; ENV records are
 * only started below batch_size and END records always fit: the buffer has
 * room for batch_size + one maximal ENV + one END per open message. So
 * commit() never needs a new buffer unless there is no current one at all,
 * in which case the END waits on sp->pending and is written as soon as a
 * buffer frees (from spool_poll()/spool_handle_cqe()).
 *
 * Message states: FREE -> OPEN -(commit)-> [END_PENDING ->] COMMITTED
 * -(its END batch reaches the watermark)-> callback, FREE. abort() returns
 * an OPEN message to FREE; its records are never followed by an END.
 *
 * Failure: a message fails iff a batch between the one holding its ENV and
 * the one holding its END failed. Batches complete in order, so comparing
 * the last failed sequence number with the message's first one suffices.
 *
 * Room comes back two ways: a batch completes (a buffer frees), or the
 * preparer makes a spare segment ready (a new spare, a reclaimed segment,
 * space found again after ENOSPC: retried each second). The first arrives
 * as a CQE; the second is announced on spool_wake_fd() and counted for
 * spool_room_changed(), so that a transport blocked in its ring wakes and
 * offers held sessions their input again (issue 10). An END record that
 * waited for a segment is written at the next spool_flush() once the
 * spare is there. If the disk stays full, the SMTP engine's message
 * deadline (--data-timeout) ends a session stuck mid-body.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "finaldot/crc32c.h"
#include "finaldot/fsync.h"
#include "finaldot/log.h"
#include "finaldot/msgid.h"
#include "finaldot/spool_format.h"
#include "spool.h"
#include "spool_seg.h"

#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif
#define EXT4_MAGIC 0xEF53 /* statfs f_type of ext2, ext3 and ext4 */

enum batch_state { B_FREE, B_FILLING, B_CLOSED, B_INFLIGHT, B_DONE };
enum msg_state { M_FREE, M_OPEN, M_END_PENDING, M_COMMITTED };
enum ud_op { OP_WRITE = 1, OP_FSYNC = 2, OP_NOP = 3 };
enum fault_kind {
	F_NONE, F_FAIL_FROM, F_FAIL_ONCE, F_ENOSPC, F_HOLD,
	F_FLUSH_FAIL, /* the N-th write lands, but its flush reports -EIO */
	F_NO_DSYNC,  /* mutant: writes without RWF_DSYNC or fdatasync */
	F_PREP_SLOW, /* the preparer sleeps fault_n ms per chunk of zeros */
	F_NO_DIRSYNC, /* mutant: applied by the preparer (spool_seg.c) */
	F_LAZY_LATE,  /* an unflushed batch goes to the kernel only after a
		       * later batch did (the reordering io-wq may cause) */
	F_LAZY_NOWAIT, /* mutant: F_LAZY_LATE, and a flush does not wait for
			* the unflushed writes before it */
	F_LAZY_SEGLAST /* mutant: a segment's last batch may go unflushed */
};

struct batch {
	uint8_t *buf;
	enum batch_state state;
	unsigned idx;
	uint64_t seq;
	struct spool_seg *seg;
	uint64_t off;   /* in the segment file */
	uint64_t epoch; /* == seg->epoch */
	size_t fill;    /* bytes of records (and padding) so far */
	size_t len;     /* write length, a multiple of SPOOL_BLOCK */
	uint64_t payload;
	unsigned cqes_left;
	uint64_t t_submit_ns; /* CLOCK_MONOTONIC at submission */
	uint64_t lat_ns;      /* ... to the reaping of its last completion */
	bool fsync_mode;
	bool seg_last;    /* the last batch of its segment file */
	bool unflushed;   /* written without a flush (see submit_batch) */
	bool fsync_later; /* written plain; its fdatasync follows once the
			   * unflushed writes before it completed */
	bool fsync_sent;
	bool must_flush;  /* resubmitted after RWF_DSYNC was refused: an
			   * fdatasync of its own (one issued for a later
			   * batch before this write may not cover it) */
	bool written;     /* the write's completion arrived */
	bool fault_fail;
	bool fault_flush; /* F_FLUSH_FAIL: written, its flush "fails" */
	int res;
	struct spool_msg *msgs; /* messages whose END is in this batch, */
	struct spool_msg *msgs_tail; /* in commit order */
};

struct spool_msg {
	enum msg_state state;
	bool detached;
	uint64_t id;
	void *ctx;
	uint64_t len;      /* body bytes appended */
	uint32_t crc;      /* CRC32C of the body up to the last closed DATA */
	uint64_t first_seq;
	uint64_t first_use_seq; /* segment of its ENV: reclaim waits for it */
	struct spool_msg *next;
};

/* A reclaim request waiting until no open message may have records in the
 * segment (spool_reclaim()). */
struct reclaim_req {
	uint64_t file_no;
	uint64_t use_seq;
};

struct spool {
	struct spool_params p;
	char *dir;
	/* test seam (fault builds): FINALDOT_MSGID_SKEW_S=-N takes N s off
	 * the clock message ids are made from, as a clock stepped back */
	int64_t msgid_skew_us;
	struct io_uring own;
	struct io_uring *ring;
	bool own_ring;
	/* Buffers 0..nfixed-1 are registered with the ring (write_fixed):
	 * their pages are pinned once, not on every write. The rest, if
	 * RLIMIT_MEMLOCK took fewer, go as plain writes. */
	unsigned nfixed;

	struct batch *b;
	unsigned nb;
	size_t cap; /* bytes per buffer */
	unsigned *free_idx;
	unsigned nfree;
	unsigned *fifo; /* closed batches, in sequence order */
	unsigned fifo_head, fifo_n;
	unsigned kernel; /* batches whose SQEs were submitted */
	struct batch *cur;
	uint64_t next_seq;

	/* the open DATA record, always in cur */
	struct {
		bool open;
		struct spool_msg *m;
		size_t hdr_pos;
		uint32_t len;
		uint32_t crc;
	} rec;

	struct spool_msg *msgs;
	struct spool_msg *free_msgs;
	unsigned n_detached; /* committed messages whose session is gone */
	struct spool_msg *pend_head, *pend_tail;

	bool any_failed;
	uint64_t last_failed_seq;
	int last_fail_res;

	struct spool_seg *active;
	struct spool_prep *prep;
	int wake_fd;             /* eventfd the preparer writes, or -1 */
	uint64_t published_seen; /* spool_room_changed() */
	struct fd_msgid_gen gen;
	bool fsync_mode;
	bool destroying;
	bool abandoned; /* spool_abandon(): destroy waits for nothing */

	enum fault_kind fault;
	uint64_t fault_n;
	uint64_t writes;
	char fault_path[1024];

	struct reclaim_req *reclaims;
	size_t n_reclaims, cap_reclaims;

	struct spool_stats st;
	struct spool_stats *stp; /* == &st: counted from const functions */
};

static void
announce(struct spool *sp, enum spool_an_type type, uint64_t file_no,
	 uint64_t use_seq, uint64_t off, uint64_t msgid)
{
	struct spool_announce a = {
		.type = type,
		.file_no = file_no,
		.use_seq = use_seq,
		.off = off,
		.msgid = msgid,
	};

	if (sp->p.announce)
		sp->p.announce(sp->p.announce_ctx, &a);
}

void
spool_params_defaults(struct spool_params *p)
{
	memset(p, 0, sizeof(*p));
	p->segment_size = 64ull << 20;
	p->flush_inflight = 1;
	p->batch_size = 256u << 10;
	p->batches = 32;
	p->spare_segments = 2;
}

/* ---- fault seam -------------------------------------------------------- */

static int
parse_fault(struct spool *sp, const char *spec)
{
	char *end;

	sp->fault = F_NONE;
	if (!spec || !*spec)
		return 0;
#ifdef FINALDOT_FAULT_INJECTION
	if (strcmp(spec, "fail-write") == 0) {
		sp->fault = F_FAIL_FROM;
		sp->fault_n = 1;
		return 0;
	}
	if (strncmp(spec, "fail-write:", 11) == 0 ||
	    strncmp(spec, "fail-once:", 10) == 0 ||
	    strncmp(spec, "fail-flush:", 11) == 0) {
		const char *n = strchr(spec, ':') + 1;
		unsigned long long v = strtoull(n, &end, 10);
		if (*n < '0' || *n > '9' || *end || v == 0)
			return -EINVAL;
		sp->fault = spec[5] == 'w'   ? F_FAIL_FROM
			    : spec[5] == 'o' ? F_FAIL_ONCE
					     : F_FLUSH_FAIL;
		sp->fault_n = v;
		return 0;
	}
	/* The faults named without an argument; among them the durability
	 * mutants for the power-cut tests (docs/powercut.md): only a
	 * simulated power cut can tell them from the real thing. */
	static const struct {
		const char *name;
		enum fault_kind kind;
	} plain[] = {
		{"enospc", F_ENOSPC},
		{"lazy-late", F_LAZY_LATE},
		{"no-dsync", F_NO_DSYNC},
		{"no-dirsync", F_NO_DIRSYNC},
		{"lazy-nowait", F_LAZY_NOWAIT},
		{"lazy-seglast", F_LAZY_SEGLAST},
	};
	for (size_t i = 0; i < sizeof(plain) / sizeof(plain[0]); i++) {
		if (strcmp(spec, plain[i].name) == 0) {
			sp->fault = plain[i].kind;
			return 0;
		}
	}
	if (strncmp(spec, "prep-slow:", 10) == 0) {
		unsigned long long v = strtoull(spec + 10, &end, 10);
		if (spec[10] < '0' || spec[10] > '9' || *end || v > 10000)
			return -EINVAL;
		sp->fault = F_PREP_SLOW;
		sp->fault_n = v;
		return 0;
	}
	if (strncmp(spec, "hold:", 5) == 0 && spec[5] &&
	    strlen(spec + 5) < sizeof(sp->fault_path)) {
		sp->fault = F_HOLD;
		strcpy(sp->fault_path, spec + 5);
		return 0;
	}
#else
	(void)end;
#endif
	return -EINVAL;
}

#ifdef FINALDOT_FAULT_INJECTION
int
spool_set_fault(struct spool *sp, const char *spec)
{
	struct spool saved = *sp;
	int r;

	if (spec && strcmp(spec, "enospc") == 0)
		return -EINVAL;
	r = parse_fault(sp, spec);
	if (r) {
		sp->fault = saved.fault;
		sp->fault_n = saved.fault_n;
		memcpy(sp->fault_path, saved.fault_path, sizeof(sp->fault_path));
		return r;
	}
	sp->writes = 0;
	return 0;
}
#endif

static bool
held(const struct spool *sp)
{
	return sp->fault == F_HOLD && !sp->destroying &&
	       access(sp->fault_path, F_OK) == 0;
}

/* The i-th closed batch, oldest first (i < fifo_n). */
static struct batch *
fifo_at(const struct spool *sp, unsigned i)
{
	return &sp->b[sp->fifo[(sp->fifo_head + i) % sp->nb]];
}

/* The seam reorders unflushed writes (F_LAZY_LATE, F_LAZY_NOWAIT). */
static bool
lazy_fault(const struct spool *sp)
{
	return sp->fault == F_LAZY_LATE || sp->fault == F_LAZY_NOWAIT;
}

/* ---- user_data --------------------------------------------------------- */

static uint64_t
ud_make(const struct batch *b, enum ud_op op)
{
	return SPOOL_UD_FLAG | (b->seq & 0x7fffffull) << 40 |
	       (uint64_t)op << 32 | b->idx;
}

bool
spool_owns_cqe(const struct io_uring_cqe *cqe)
{
	return (cqe->user_data & SPOOL_UD_FLAG) != 0;
}

/* ---- segments and buffers ---------------------------------------------- */

static void
seg_release(struct spool_seg *s)
{
	if (s->retired && s->inflight == 0)
		spool_seg_free(s);
}

static int
switch_segment(struct spool *sp)
{
	struct spool_seg *s, *old = sp->active;
	int r = spool_prep_take(sp->prep, &s);

	if (r)
		return r;
	sp->active = s;
	sp->stp->segments_used++;
	announce(sp, SPOOL_AN_SEGMENT, s->file_no, s->use_seq, 0, 0);
	if (old) {
		old->retired = true;
		fd_log(FD_LOG_INFO, "spool",
		       "event=segment_switch worker=%u from=%08" PRIx64
		       " to=%08" PRIx64 " used=%" PRIu64,
		       sp->p.worker, old->file_no, s->file_no, old->off);
		seg_release(old);
	} else {
		fd_log(FD_LOG_INFO, "spool",
		       "event=segment_open worker=%u file=%08" PRIx64,
		       sp->p.worker, s->file_no);
	}
	return 0;
}

/* Make a free buffer the current batch. 0, -EAGAIN or -ENOSPC. */
static int
open_current(struct spool *sp)
{
	struct batch *b;
	int r;

	if (sp->cur)
		return 0;
	if (sp->nfree == 0)
		return -EAGAIN;
	if (!sp->active || sp->active->size - sp->active->off < sp->cap) {
		if ((r = switch_segment(sp)) != 0)
			return r;
	}
	b = &sp->b[sp->free_idx[--sp->nfree]];
	b->state = B_FILLING;
	b->seq = sp->next_seq++;
	b->seg = sp->active;
	b->off = sp->active->off;
	b->epoch = sp->active->epoch;
	b->fill = 0;
	b->payload = 0;
	b->res = 0;
	b->msgs = b->msgs_tail = NULL;
	b->fault_fail = b->fault_flush = false;
	b->unflushed = b->fsync_later = b->fsync_sent = b->written = false;
	b->must_flush = false;
	sp->cur = b;
	return 0;
}

static void
close_rec(struct spool *sp)
{
	struct batch *b = sp->cur;
	uint8_t *h;
	size_t end;

	if (!sp->rec.open)
		return;
	h = b->buf + sp->rec.hdr_pos;
	spool_put32(h + 8, sp->rec.len);
	spool_rec_seal(h, sp->rec.crc);
	end = sp->rec.hdr_pos + SPOOL_REC_HDR_LEN + sp->rec.len;
	b->fill = (size_t)spool_align8(end);
	memset(b->buf + end, 0, b->fill - end);
	b->payload += SPOOL_REC_HDR_LEN + sp->rec.len;
	sp->rec.m->crc = spool_crc32c_combine(sp->rec.m->crc, sp->rec.crc,
					      sp->rec.len);
	sp->rec.open = false;
}

static void
close_current(struct spool *sp)
{
	struct batch *b = sp->cur;

	close_rec(sp);
	b->len = (size_t)spool_align_block(b->fill);
	memset(b->buf + b->fill, 0, b->len - b->fill);
	b->seg->off += b->len;
	b->seg->inflight++;
	/* open_current() moves to a new file when this one has no room for
	 * a whole buffer more: then this batch is its last. */
	b->seg_last = b->seg->size - b->seg->off < sp->cap;
	b->state = B_CLOSED;
	sp->fifo[(sp->fifo_head + sp->fifo_n) % sp->nb] = b->idx;
	sp->fifo_n++;
	sp->cur = NULL;
}

/* The current batch reached batch_size: send it if another can follow. */
static void
rotate_if_full(struct spool *sp)
{
	if (!sp->cur || sp->cur->fill < sp->p.batch_size || sp->nfree == 0)
		return;
	close_current(sp);
	(void)open_current(sp); /* may leave cur NULL: handled lazily */
}

/*
 * Unflushed batches. Nobody waits for a batch without an END record (the
 * middle of large messages), so in fdatasync mode it is written without a
 * flush of its own: the fdatasync that makes the next END durable covers
 * it, provided two rules hold.
 *  - That fdatasync is issued only after every unflushed write before it
 *    in the same file has completed: fdatasync covers the writes that
 *    completed before it, not those still in the kernel (io-wq may run
 *    them in any order). A batch with an END whose file still has
 *    unflushed writes in flight goes as a plain write, and its fdatasync
 *    follows from submit_fsyncs() once they completed.
 *  - The last batch of a segment file is always flushed: a message may
 *    end in the next file, and an fdatasync of one file promises nothing
 *    for another.
 * Only in fdatasync mode: with RWF_DSYNC a disk with FUA makes just the
 * write itself durable (no cache flush), which would not cover the
 * others. Messages still complete in batch order, so a message's callback
 * waits for the flushes of every file it has records in.
 */
static bool
batch_unflushed(const struct spool *sp, const struct batch *b)
{
	return sp->fsync_mode && !b->msgs && !b->must_flush &&
	       (!b->seg_last || sp->fault == F_LAZY_SEGLAST);
}

/* An unflushed write before b, in b's file, has not completed. */
static bool
unflushed_before(const struct spool *sp, const struct batch *b)
{
	if (sp->fault == F_LAZY_NOWAIT)
		return false;
	for (unsigned i = 0; i < sp->fifo_n; i++) {
		const struct batch *e = fifo_at(sp, i);

		if (e == b)
			break;
		if (e->seg == b->seg && e->unflushed && !e->written)
			return true;
		if (e->seg == b->seg && e->state == B_CLOSED &&
		    batch_unflushed(sp, e))
			return true;
	}
	return false;
}

static bool
submit_batch(struct spool *sp, struct batch *b)
{
	struct io_uring_sqe *sqe, *sqe2;
	bool fail = false, later = false;

	b->unflushed = false;
	b->fsync_sent = false;
	b->written = false;
	b->fsync_mode = sp->fsync_mode && sp->fault != F_NO_DSYNC;
	if (b->fsync_mode) {
		b->unflushed = batch_unflushed(sp, b);
		later = !b->unflushed && unflushed_before(sp, b);
	}
	if (io_uring_sq_space_left(sp->ring) <
	    (b->fsync_mode && !b->unflushed && !later ? 2u : 1u))
		return false;
	sp->writes++;
	if (sp->fault == F_FAIL_FROM && sp->writes >= sp->fault_n)
		fail = true;
	if (sp->fault == F_FAIL_ONCE && sp->writes == sp->fault_n)
		fail = true;
	b->fault_fail = fail;
	b->fault_flush = sp->fault == F_FLUSH_FAIL && sp->writes == sp->fault_n;
	if (fail) {
		b->fsync_mode = false;
		b->unflushed = false;
		later = false;
	}
	b->fsync_later = later;
	sqe = io_uring_get_sqe(sp->ring);
	sqe2 = b->fsync_mode && !b->unflushed && !later
		       ? io_uring_get_sqe(sp->ring)
		       : NULL;
	if (!sqe)
		return false; /* cannot happen: space was checked */
	if (fail) {
		/* The write is "lost": nothing reaches the disk. */
		io_uring_prep_nop(sqe);
		io_uring_sqe_set_data64(sqe, ud_make(b, OP_NOP));
		b->cqes_left = 1;
	} else {
		if (b->idx < sp->nfixed)
			io_uring_prep_write_fixed(sqe, b->seg->fd, b->buf,
						  (unsigned)b->len, b->off,
						  (int)b->idx);
		else
			io_uring_prep_write(sqe, b->seg->fd, b->buf,
					    (unsigned)b->len, b->off);
		io_uring_sqe_set_data64(sqe, ud_make(b, OP_WRITE));
		b->cqes_left = later ? 2 : 1;
		if (sqe2) {
			sqe->flags |= IOSQE_IO_LINK;
			io_uring_prep_fsync(sqe2, b->seg->fd,
					    IORING_FSYNC_DATASYNC);
			io_uring_sqe_set_data64(sqe2, ud_make(b, OP_FSYNC));
			b->cqes_left = 2;
		} else if (!b->fsync_mode && sp->fault != F_NO_DSYNC) {
			sqe->rw_flags = RWF_DSYNC;
		}
	}
	b->state = B_INFLIGHT;
	b->t_submit_ns = fd_now_monotonic_ns();
	sp->kernel++;
	spool_prep_flights(sp->prep, sp->kernel);
	return true;
}

/* Batches closed or in flight that will carry a flush (what group commit
 * counts: unflushed writes hold nobody's reply). */
static unsigned
flushes_queued(const struct spool *sp)
{
	unsigned n = 0;

	for (unsigned i = 0; i < sp->fifo_n; i++) {
		const struct batch *b = fifo_at(sp, i);

		n += b->state == B_CLOSED ? !batch_unflushed(sp, b)
					  : !b->unflushed;
	}
	return n;
}

/* The fdatasyncs that waited for unflushed writes before them. */
static void
submit_fsyncs(struct spool *sp)
{
	for (unsigned i = 0; i < sp->fifo_n; i++) {
		struct batch *b = fifo_at(sp, i);
		struct io_uring_sqe *sqe;

		if (b->state != B_INFLIGHT || !b->fsync_later ||
		    b->fsync_sent || !b->written || unflushed_before(sp, b))
			continue;
		if (!(sqe = io_uring_get_sqe(sp->ring)))
			return;
		io_uring_prep_fsync(sqe, b->seg->fd, IORING_FSYNC_DATASYNC);
		io_uring_sqe_set_data64(sqe, ud_make(b, OP_FSYNC));
		b->fsync_sent = true;
		sp->stp->late_flushes++;
	}
}

/*
 * F_LAZY_LATE: an unflushed batch goes to the kernel last, as io-wq may
 * order it: only once a later batch was submitted and every later batch
 * in the kernel has completed, or waits for this one (its write done, its
 * fdatasync held back). Not while the spool shuts down, nor when every
 * buffer is taken (no later batch can come).
 */
static bool
lazy_held(const struct spool *sp, unsigned pos, const struct batch *b)
{
	bool later = false;

	if (!lazy_fault(sp) || sp->destroying || sp->nfree == 0 ||
	    !batch_unflushed(sp, b))
		return false;
	for (unsigned i = pos + 1; i < sp->fifo_n; i++) {
		const struct batch *e = fifo_at(sp, i);

		if (e->state == B_CLOSED)
			continue;
		later = true;
		if (e->state == B_INFLIGHT &&
		    !(e->written && e->fsync_later && !e->fsync_sent))
			return true;
	}
	return !later;
}

static void
submit_closed(struct spool *sp)
{
	if (held(sp))
		return;
	submit_fsyncs(sp);
	for (int pass = 0; pass < 2; pass++) {
		for (unsigned i = 0; i < sp->fifo_n; i++) {
			struct batch *b = fifo_at(sp, i);

			if (b->state != B_CLOSED || lazy_held(sp, i, b))
				continue;
			if (!submit_batch(sp, b))
				return;
		}
	}
}

/* ---- records ----------------------------------------------------------- */

static void
hdr_init(struct spool_rec_hdr *h, const struct batch *b, uint8_t type,
	 uint64_t msgid, uint64_t offset, uint32_t aux)
{
	memset(h, 0, sizeof(*h));
	h->type = type;
	h->epoch = b->epoch;
	h->msgid = msgid;
	h->offset = offset;
	h->aux = aux;
}

static void
write_end(struct spool *sp, struct spool_msg *m)
{
	struct batch *b = sp->cur;
	struct spool_rec_hdr h;
	size_t n;

	close_rec(sp);
	hdr_init(&h, b, SPOOL_REC_END, m->id, m->len, m->crc);
	n = spool_rec_encode(&h, NULL, 0, b->buf + b->fill, sp->cap - b->fill);
	b->fill += n; /* n > 0: the buffer reserves one END per message */
	b->payload += n;
	m->state = M_COMMITTED;
	m->next = NULL;
	if (b->msgs_tail)
		b->msgs_tail->next = m;
	else
		b->msgs = m;
	b->msgs_tail = m;
}

static void
free_msg(struct spool *sp, struct spool_msg *m)
{
	if (m->detached) {
		m->detached = false;
		sp->n_detached--;
	}
	m->state = M_FREE;
	m->next = sp->free_msgs;
	sp->free_msgs = m;
}

static void
fail_pending(struct spool *sp, int status)
{
	while (sp->pend_head) {
		struct spool_msg *m = sp->pend_head;
		uint64_t id = m->id;
		void *ctx = m->ctx;
		bool det = m->detached;

		sp->pend_head = m->next;
		if (!sp->pend_head)
			sp->pend_tail = NULL;
		free_msg(sp, m);
		announce(sp, SPOOL_AN_FAILED, 0, 0, 0, id);
		if (!det)
			sp->p.done(ctx, id, status);
		else if (sp->p.orphan_done)
			sp->p.orphan_done(sp->p.orphan_ctx, id, status);
	}
}

/* After completions: rotate a full batch, write waiting END records. */
static void
service(struct spool *sp)
{
	rotate_if_full(sp);
	if (!sp->pend_head)
		return;
	int r = open_current(sp);
	if (r == -EAGAIN)
		return;
	if (r) {
		fd_log(FD_LOG_ERR, "spool",
		       "event=commit_failed worker=%u err=%d", sp->p.worker,
		       -r);
		fail_pending(sp, r);
		return;
	}
	while (sp->pend_head) {
		struct spool_msg *m = sp->pend_head;
		sp->pend_head = m->next;
		write_end(sp, m);
	}
	sp->pend_tail = NULL;
}

/* ---- completions ------------------------------------------------------- */

/* The first bucket holds up to `first`, each next one four times (bytes)
 * or twice (messages) as much; the last, index n, everything above. */
unsigned
spool_flush_bucket(uint64_t v, uint64_t first, unsigned n)
{
	unsigned shift = n == SPOOL_FLUSH_BYTE_BUCKETS ? 2 : 1, i = 0;

	while (i < n && v > first << (shift * i))
		i++;
	return i;
}

static void
complete_in_order(struct spool *sp)
{
	while (sp->fifo_n) {
		struct batch *b = fifo_at(sp, 0);
		struct spool_msg *list;

		if (b->state != B_DONE)
			break;
		sp->fifo_head = (sp->fifo_head + 1) % sp->nb;
		sp->fifo_n--;
		if (!b->unflushed)
			sp->stp->flushes++;
		if (b->res < 0) {
			/* A failed write: the messages with records in it
			 * (a failed flush went further when it arrived,
			 * note_flush_failure()). */
			sp->any_failed = true;
			if (sp->last_failed_seq < b->seq)
				sp->last_failed_seq = b->seq;
			sp->last_fail_res = b->res;
			sp->stp->batch_errors++;
			fd_log(FD_LOG_ERR, "spool",
			       "event=batch_failed worker=%u file=%08" PRIx64
			       " off=%" PRIu64 " len=%zu err=%d",
			       sp->p.worker, b->seg->file_no, b->off, b->len,
			       -b->res);
		} else {
			unsigned nm = 0;

			for (struct spool_msg *m = b->msgs; m; m = m->next)
				nm++;
			sp->stp->batches++;
			sp->stp->bytes += b->len;
			sp->stp->payload_bytes += b->payload;
			sp->stp->flush_bytes[spool_flush_bucket(
				b->len, 4096, SPOOL_FLUSH_BYTE_BUCKETS)]++;
			if (b->unflushed) {
				sp->stp->unflushed++;
			} else {
				sp->stp->flush_msgs[spool_flush_bucket(
					nm, 1, SPOOL_FLUSH_MSG_BUCKETS)]++;
				sp->stp->flush_msgs_sum += nm;
				sp->stp->flush_lat[fd_lat_bucket(b->lat_ns)]++;
				sp->stp->flush_lat_sum_ns += b->lat_ns;
				sp->stp->flush_qlat[fd_qlat_bucket(
					b->lat_ns / 1000u)]++;
			}
		}
		/* Batches complete in order: everything up to the end of
		 * this one is now final, on disk or abandoned. The FAILED
		 * ids of this batch are announced first, so a reader never
		 * takes a failed message whose records did reach the disk.
		 * An unflushed batch is not durable yet: the next flushed
		 * one in its file (there is one: a file's last batch is
		 * flushed) announces both. */
		for (struct spool_msg *m = b->msgs; m; m = m->next)
			if (sp->any_failed && sp->last_failed_seq >= m->first_seq)
				announce(sp, SPOOL_AN_FAILED, b->seg->file_no,
					 b->seg->use_seq, b->off + b->len,
					 m->id);
		if (!b->unflushed || b->res < 0)
			announce(sp, SPOOL_AN_DURABLE, b->seg->file_no,
				 b->seg->use_seq, b->off + b->len, 0);
		b->seg->inflight--;
		seg_release(b->seg);
		b->seg = NULL;
		list = b->msgs;
		b->msgs = b->msgs_tail = NULL;
		b->state = B_FREE;
		sp->free_idx[sp->nfree++] = b->idx;
		while (list) {
			struct spool_msg *m = list;
			int status = sp->any_failed &&
						     sp->last_failed_seq >=
							     m->first_seq
					     ? sp->last_fail_res
					     : 0;
			uint64_t id = m->id;
			void *ctx = m->ctx;
			bool det = m->detached;

			list = m->next;
			free_msg(sp, m);
			if (status == 0)
				sp->stp->messages++;
			if (!det)
				sp->p.done(ctx, id, status);
			else if (sp->p.orphan_done)
				sp->p.orphan_done(sp->p.orphan_ctx, id, status);
		}
	}
	service(sp);
	/* Group commit: the messages committed while that write was in
	 * flight share the next one, sent now rather than at the caller's
	 * next idle point. */
	if (sp->cur && sp->cur->msgs &&
	    flushes_queued(sp) < sp->p.flush_inflight) {
		close_current(sp);
		submit_closed(sp);
	}
}

/*
 * A flush failed (an fdatasync, or a write with RWF_DSYNC, whose error may
 * be the flush's): every message begun so far fails, not only those with
 * records in that batch. A failed flush leaves the state of every write it
 * covered unknown, later batches' completed writes of the file included,
 * and a flush after it may report success without having written them
 * again (with buffered writes the kernel marks the pages clean and reports
 * the error once). Noted when the error arrives, not when its batch
 * completes in order, so that no message completing after it is answered
 * 250 on the strength of a flush the failure may have undone. A message
 * begun after it stands on its own writes and flushes.
 */
static void
note_flush_failure(struct spool *sp, int res)
{
	sp->any_failed = true;
	sp->last_failed_seq = sp->next_seq - 1;
	sp->last_fail_res = res;
}

void
spool_handle_cqe(struct spool *sp, const struct io_uring_cqe *cqe)
{
	uint64_t ud = cqe->user_data;
	unsigned idx = (unsigned)(ud & 0xffffffffu);
	enum ud_op op = (enum ud_op)((ud >> 32) & 0xff);
	struct batch *b;
	int res = cqe->res;

	if (idx >= sp->nb || sp->b[idx].state != B_INFLIGHT ||
	    ((sp->b[idx].seq & 0x7fffff) != ((ud >> 40) & 0x7fffff))) {
		fd_log(FD_LOG_ERR, "spool",
		       "event=stray_cqe worker=%u user_data=%" PRIx64,
		       sp->p.worker, ud);
		return;
	}
	b = &sp->b[idx];
	switch (op) {
	case OP_WRITE:
		b->written = true;
		if (!b->fsync_mode && (res == -EOPNOTSUPP || res == -EINVAL)) {
			/* RWF_DSYNC rejected: nothing was written. Resubmit
			 * as write + fdatasync (once: a batch in that mode
			 * that fails again is a plain failure), never as an
			 * unflushed write: a later batch refused first may
			 * have gone out already with its own fdatasync,
			 * which this write, issued after it, escapes. */
			if (!sp->fsync_mode)
				fd_log(FD_LOG_WARN, "spool",
				       "event=dsync_unsupported worker=%u "
				       "fallback=linked_fdatasync",
				       sp->p.worker);
			sp->fsync_mode = true;
			b->must_flush = true;
			b->state = B_CLOSED;
			sp->kernel--;
			spool_prep_flights(sp->prep, sp->kernel);
			submit_closed(sp);
			return;
		}
		if (res >= 0 && (size_t)res != b->len)
			res = -EIO; /* short write */
		if (res < 0 && b->fsync_later && !b->fsync_sent) {
			/* failed: there is nothing to flush */
			b->fsync_later = false;
			b->cqes_left--;
		}
		/* This write may be what an fdatasync waited for. */
		submit_fsyncs(sp);
		break;
	case OP_FSYNC:
		break;
	case OP_NOP:
		res = -EIO;
		break;
	default:
		return;
	}
	/* F_FLUSH_FAIL: the bytes are in the file, and the completion that
	 * carries the batch's flush reports what a failing one would. */
	if (b->fault_flush && res >= 0 &&
	    (op == OP_FSYNC || (op == OP_WRITE && !b->fsync_mode)))
		res = -EIO;
	if (res < 0 && res != -ECANCELED &&
	    (op == OP_FSYNC ||
	     (op == OP_WRITE && !b->fsync_mode && sp->fault != F_NO_DSYNC)))
		note_flush_failure(sp, res);
	if (res < 0 && b->res == 0)
		b->res = res;
	if (--b->cqes_left) {
		if (lazy_fault(sp))
			submit_closed(sp); /* lazy_held() may let go now */
		return;
	}
	b->state = B_DONE;
	b->lat_ns = fd_now_monotonic_ns() - b->t_submit_ns;
	sp->kernel--;
	spool_prep_flights(sp->prep, sp->kernel);
	complete_in_order(sp);
	if (lazy_fault(sp))
		submit_closed(sp); /* lazy_held() may let go now */
}

int
spool_poll(struct spool *sp)
{
	struct io_uring_cqe *cqe;
	int n = 0;

	submit_closed(sp);
	if (io_uring_sq_ready(sp->ring))
		io_uring_submit(sp->ring);
	while (io_uring_peek_cqe(sp->ring, &cqe) == 0) {
		/* Copy first: a callback may submit and reuse the slot. */
		struct io_uring_cqe c = *cqe;
		io_uring_cqe_seen(sp->ring, cqe);
		if (spool_owns_cqe(&c))
			spool_handle_cqe(sp, &c);
		n++;
	}
	/* What the callbacks and service() queued is submitted by the
	 * caller's spool_submit(), after it sent the 250s these completions
	 * released: the submission is a system call that may do the write
	 * inline, and the replies should not wait for it (RFC 1047's gap). */
	service(sp);
	return n;
}

void
spool_abandon(struct spool *sp)
{
	sp->abandoned = true;
}

void
spool_submit(struct spool *sp)
{
	submit_closed(sp);
	if (io_uring_sq_ready(sp->ring))
		io_uring_submit(sp->ring);
}

int
spool_wait(struct spool *sp)
{
	submit_closed(sp);
	if (sp->kernel) {
		struct io_uring_cqe *cqe;
		io_uring_submit(sp->ring);
		int r = io_uring_wait_cqe(sp->ring, &cqe);
		if (r < 0 && r != -EINTR)
			return r;
	}
	return spool_poll(sp);
}

/* ---- messages ---------------------------------------------------------- */

struct spool_msg *
spool_msg_begin(struct spool *sp, const struct fd_envelope *env, void *ctx,
		uint64_t *msgid, int *err)
{
	struct spool_msg *m = sp->free_msgs;
	struct spool_rec_hdr h;
	struct batch *b;
	size_t elen, pos;
	int r;

	if (!m) {
		/* There is a message per connection. A session gone while
		 * its message commits (a reset after the final dot) leaves it
		 * here until its batch completes, and its connection may be
		 * taken again meanwhile: that session waits (the caller holds
		 * the command until spool room comes back) rather than being
		 * refused. */
		*err = sp->n_detached ? -EAGAIN : -EMFILE;
		return NULL;
	}
	elen = spool_env_encoded_len(env);
	if (elen == 0) {
		*err = -EMSGSIZE;
		return NULL;
	}
	if (sp->cur && sp->cur->fill >= sp->p.batch_size && sp->nfree)
		close_current(sp);
	if (sp->cur && sp->cur->fill >= sp->p.batch_size)
		r = -EAGAIN;
	else
		r = open_current(sp);
	if (r) {
		if (r == -EAGAIN)
			sp->stp->room_waits++;
		*err = r;
		return NULL;
	}
	sp->free_msgs = m->next;
	m->state = M_OPEN;
	m->detached = false;
	m->id = fd_msgid_next(&sp->gen, (uint64_t)((int64_t)fd_now_realtime_us() +
						   sp->msgid_skew_us));
	m->ctx = ctx;
	m->len = 0;
	m->crc = 0;
	m->next = NULL;

	b = sp->cur;
	close_rec(sp);
	pos = b->fill;
	m->first_seq = b->seq;
	m->first_use_seq = b->seg->use_seq;
	spool_env_encode(env, b->buf + pos + SPOOL_REC_HDR_LEN, elen);
	hdr_init(&h, b, SPOOL_REC_ENV, m->id, 0, 0);
	h.len = (uint32_t)elen;
	h.crc = 0;
	spool_rec_hdr_encode(&h, b->buf + pos);
	b->fill = (size_t)spool_align8(pos + SPOOL_REC_HDR_LEN + elen);
	memset(b->buf + pos + SPOOL_REC_HDR_LEN + elen, 0,
	       b->fill - (pos + SPOOL_REC_HDR_LEN + elen));
	spool_rec_seal(b->buf + pos,
		       fd_crc32c(0, b->buf + pos + SPOOL_REC_HDR_LEN, elen));
	b->payload += SPOOL_REC_HDR_LEN + elen;
	*msgid = m->id;
	rotate_if_full(sp);
	return m;
}

/* Body bytes the current batch takes for m without a new buffer. */
static size_t
data_space(const struct spool *sp, const struct spool_msg *m)
{
	const struct batch *b = sp->cur;
	size_t hp;

	if (!b || b->fill >= sp->p.batch_size)
		return 0;
	if (sp->rec.open && sp->rec.m == m)
		return sp->p.batch_size - b->fill;
	hp = (size_t)spool_align8(b->fill) + SPOOL_REC_HDR_LEN;
	return hp < sp->p.batch_size ? sp->p.batch_size - hp : 0;
}

int
spool_msg_append(struct spool *sp, struct spool_msg *m, const void *p,
		 size_t n)
{
	const uint8_t *src = p;

	if (m->state != M_OPEN)
		return -EINVAL;
	while (n) {
		size_t k = data_space(sp, m);
		struct batch *b;

		if (k == 0) {
			int r;
			if (sp->cur)
				close_current(sp);
			if ((r = open_current(sp)) != 0)
				return r; /* n > spool_room(): caller's bug */
			continue;
		}
		b = sp->cur;
		if (!(sp->rec.open && sp->rec.m == m)) {
			struct spool_rec_hdr h;
			close_rec(sp);
			hdr_init(&h, b, SPOOL_REC_DATA, m->id, m->len, 0);
			sp->rec.open = true;
			sp->rec.m = m;
			sp->rec.hdr_pos = b->fill;
			sp->rec.len = 0;
			sp->rec.crc = 0;
			spool_rec_hdr_encode(&h, b->buf + b->fill);
			b->fill += SPOOL_REC_HDR_LEN;
			k = sp->p.batch_size - b->fill;
		}
		if (k > n)
			k = n;
		memcpy(b->buf + b->fill, src, k);
		sp->rec.crc = fd_crc32c(sp->rec.crc, src, k);
		sp->rec.len += (uint32_t)k;
		b->fill += k;
		m->len += k;
		src += k;
		n -= k;
	}
	rotate_if_full(sp);
	return 0;
}

int
spool_msg_commit(struct spool *sp, struct spool_msg *m)
{
	int r = 0;

	if (m->state != M_OPEN)
		return -EINVAL;
	if (sp->rec.open && sp->rec.m == m)
		close_rec(sp);
	if (!sp->cur && (r = open_current(sp)) == -ENOSPC) {
		/* No segment and the disk is full (or down to its reserve):
		 * no room will come from a completion, so 452 now; the
		 * message stays open for the caller's abort. Waiting, it
		 * waited for its data timeout (the preparer wakes the worker
		 * only when room comes back). */
		return -ENOSPC;
	}
	if (!sp->cur && r != 0) {
		/* No buffer now: the END is written by service() later. */
		m->state = M_END_PENDING;
		m->next = NULL;
		if (sp->pend_tail)
			sp->pend_tail->next = m;
		else
			sp->pend_head = m;
		sp->pend_tail = m;
		return 0;
	}
	write_end(sp, m);
	rotate_if_full(sp);
	return 0;
}

void
spool_msg_abort(struct spool *sp, struct spool_msg *m)
{
	if (m->state != M_OPEN)
		return;
	if (sp->rec.open && sp->rec.m == m)
		close_rec(sp);
	announce(sp, SPOOL_AN_ABORTED, 0, 0, 0, m->id);
	free_msg(sp, m);
}

void
spool_msg_detach(struct spool *sp, struct spool_msg *m)
{
	if ((m->state == M_COMMITTED || m->state == M_END_PENDING) &&
	    !m->detached) {
		m->detached = true;
		sp->n_detached++;
	}
}

/* Body octets the current batch still takes (0 without one). */
static size_t
cur_room(const struct spool *sp)
{
	size_t hp;

	if (!sp->cur)
		return 0;
	hp = (size_t)spool_align8(sp->cur->fill) + SPOOL_REC_HDR_LEN;
	return hp < sp->p.batch_size ? sp->p.batch_size - hp : 0;
}

/* Whole batch buffers the active segment still takes after the current
 * batch. */
static uint64_t
seg_slots(const struct spool *sp)
{
	const struct spool_seg *a = sp->active;
	uint64_t rem;

	if (!a)
		return 0;
	rem = a->size - a->off;
	if (sp->cur)
		rem = rem > sp->cap ? rem - sp->cap : 0;
	return rem / sp->cap;
}

size_t
spool_room(const struct spool *sp)
{
	size_t room = cur_room(sp), per = sp->p.batch_size - SPOOL_REC_HDR_LEN;
	uint64_t slots = seg_slots(sp);

	slots += (uint64_t)spool_prep_ready(sp->prep) *
		 ((sp->p.segment_size - SPOOL_BLOCK) / sp->cap);
	if (slots > sp->nfree)
		slots = sp->nfree;
	room += (size_t)slots * per;
	if (room == 0)
		sp->stp->room_waits++;
	return room;
}

bool
spool_out_of_space(struct spool *sp)
{
	if (cur_room(sp) || seg_slots(sp) || spool_prep_ready(sp->prep))
		return false;
	return spool_prep_out_of_space(sp->prep);
}

int
spool_reclaim(struct spool *sp, uint64_t file_no, uint64_t use_seq)
{
	if (sp->n_reclaims == sp->cap_reclaims) {
		size_t cap = sp->cap_reclaims ? sp->cap_reclaims * 2 : 16;
		struct reclaim_req *n =
			realloc(sp->reclaims, cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		sp->reclaims = n;
		sp->cap_reclaims = cap;
	}
	sp->reclaims[sp->n_reclaims++] =
		(struct reclaim_req){.file_no = file_no, .use_seq = use_seq};
	return 0;
}

/* May a message still being written have records in segment use_seq?
 * Its records start in the segment of its ENV and go forward. */
static bool
reclaim_blocked(const struct spool *sp, uint64_t use_seq)
{
	if (sp->active && sp->active->use_seq <= use_seq)
		return true;
	for (unsigned i = 0; i < sp->p.max_msgs; i++)
		if (sp->msgs[i].state != M_FREE &&
		    sp->msgs[i].first_use_seq <= use_seq)
			return true;
	return false;
}

static void
service_reclaims(struct spool *sp)
{
	uint64_t fno[16], useq[16];
	unsigned n;
	size_t keep = 0;

	for (size_t i = 0; i < sp->n_reclaims; i++) {
		struct reclaim_req *q = &sp->reclaims[i];
		if (reclaim_blocked(sp, q->use_seq)) {
			sp->reclaims[keep++] = *q;
			continue;
		}
		if (spool_prep_recycle(sp->prep, q->file_no, q->use_seq) != 0)
			sp->reclaims[keep++] = *q; /* no memory: later */
	}
	sp->n_reclaims = keep;
	while ((n = spool_prep_recycled(sp->prep, fno, useq, 16)) > 0) {
		for (unsigned i = 0; i < n; i++) {
			sp->stp->reclaimed++;
			announce(sp, SPOOL_AN_RECLAIMED, fno[i], useq[i], 0, 0);
		}
	}
}

int
spool_flush(struct spool *sp)
{
	if (sp->n_reclaims || spool_prep_has_recycled(sp->prep))
		service_reclaims(sp);
	/* END records that found no segment: a spare may be ready now (the
	 * preparer's wake, not a completion, brought us here). */
	if (sp->pend_head)
		service(sp);
	/* Only a batch with an END in it has somebody waiting for it; and
	 * while enough writes are in flight, the messages arriving now are
	 * better off sharing the next one (group commit: flushes per message
	 * fall as the load rises). */
	if (sp->cur && sp->cur->msgs &&
	    flushes_queued(sp) < sp->p.flush_inflight)
		close_current(sp);
	submit_closed(sp);
	return 0;
}

int
spool_wake_fd(const struct spool *sp)
{
	return sp->wake_fd;
}

bool
spool_room_changed(struct spool *sp)
{
	uint64_t n = spool_prep_published(sp->prep);

	if (n == sp->published_seen)
		return false;
	sp->published_seen = n;
	return true;
}

unsigned
spool_buffers_registered(const struct spool *sp)
{
	return sp->nfixed;
}

unsigned
spool_inflight(const struct spool *sp)
{
	return sp->fifo_n;
}

const struct spool_stats *
spool_get_stats(const struct spool *sp)
{
	return &sp->st;
}

/* ---- create / destroy -------------------------------------------------- */

static unsigned
ring_entries(unsigned batches)
{
	unsigned n = 8;

	while (n < 2 * batches + 4)
		n <<= 1;
	return n;
}


/* Register the batch buffers with the ring. A refusal (RLIMIT_MEMLOCK for
 * a process without CAP_IPC_LOCK, a ring that has buffers registered
 * already) only costs the per-write pinning of the buffers left out:
 * plain writes for them. */
static void
register_bufs(struct spool *sp)
{
	struct iovec *iov = calloc(sp->nb, sizeof(*iov));
	unsigned n = sp->nb;
	int r = -ENOMEM;

	if (iov) {
		for (unsigned i = 0; i < sp->nb; i++) {
			iov[i].iov_base = sp->b[i].buf;
			iov[i].iov_len = sp->cap;
		}
		/* Pinned pages count against RLIMIT_MEMLOCK (unless the
		 * process may lock memory at will): over it the kernel
		 * refuses the lot, so offer half as many until it takes
		 * them. Buffers leave the free list lowest index first, so
		 * the registered ones carry a light load alone. */
		for (;;) {
			r = io_uring_register_buffers(sp->ring, iov, n);
			if (r != -ENOMEM || n == 1)
				break;
			n /= 2;
		}
		free(iov);
	}
	sp->nfixed = r == 0 ? n : 0;
	/* A warning: every write from an unregistered buffer pins its pages
	 * again (several percent of the worker's CPU for large mail). */
	if (sp->nfixed < sp->nb)
		fd_log(FD_LOG_WARN, "spool",
		       "event=buffers_not_registered worker=%u registered=%u "
		       "batches=%u err=%d note=\"plain writes for the rest: "
		       "raise RLIMIT_MEMLOCK (LimitMEMLOCK=) to %zu KiB per "
		       "worker\"",
		       sp->p.worker, sp->nfixed, sp->nb, r < 0 ? -r : ENOMEM,
		       (size_t)sp->nb * sp->cap / 1024);
}

bool
spool_sync_linked(const char *dir, const char *mode, char *why, size_t n)
{
	char path[96];
	struct stat st;
	int fd = -1;
	char v = 0;

	if (strcmp(mode, "auto") != 0) {
		snprintf(why, n, "configured");
		return strcmp(mode, "fdatasync") == 0;
	}
	if (stat(dir, &st) != 0) {
		snprintf(why, n, "auto: cannot stat the spool (%s)",
			 strerror(errno));
		return false;
	}
	/* The device itself, then (a partition) the disk above it. */
	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/queue/fua",
		 major(st.st_dev), minor(st.st_dev));
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		snprintf(path, sizeof(path),
			 "/sys/dev/block/%u:%u/../queue/fua",
			 major(st.st_dev), minor(st.st_dev));
		fd = open(path, O_RDONLY | O_CLOEXEC);
	}
	if (fd < 0 || read(fd, &v, 1) != 1 || (v != '0' && v != '1')) {
		if (fd >= 0)
			close(fd);
		snprintf(why, n, "auto: no block device %u:%u to ask",
			 major(st.st_dev), minor(st.st_dev));
		return false;
	}
	close(fd);
	snprintf(why, n, "auto: device %u:%u %s FUA", major(st.st_dev),
		 minor(st.st_dev), v == '1' ? "has" : "has no");
	return v == '0';
}

bool
spool_prepare_fallocate(const char *dir, const char *mode, char *why,
			size_t n)
{
	char path[128], link[256], jt[32];
	struct statfs sf;
	struct stat st;
	const char *dev;
	ssize_t k;
	int fd;

	if (strcmp(mode, "auto") != 0) {
		snprintf(why, n, "configured");
		return strcmp(mode, "fallocate") == 0;
	}
	if (statfs(dir, &sf) != 0 || stat(dir, &st) != 0) {
		snprintf(why, n, "auto: cannot stat the spool (%s)",
			 strerror(errno));
		return false;
	}
	if (sf.f_type != EXT4_MAGIC) {
		snprintf(why, n, "auto: not ext4 (f_type 0x%lx)",
			 (unsigned long)sf.f_type);
		return false;
	}
	/* ext4's sysfs directory is named after the block device. */
	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u",
		 major(st.st_dev), minor(st.st_dev));
	k = readlink(path, link, sizeof(link) - 1);
	if (k <= 0) {
		snprintf(why, n, "auto: ext4 on %u:%u, no device to ask",
			 major(st.st_dev), minor(st.st_dev));
		return false;
	}
	link[k] = 0;
	dev = strrchr(link, '/') ? strrchr(link, '/') + 1 : link;
	snprintf(path, sizeof(path), "/sys/fs/ext4/%.64s/journal_task", dev);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	k = fd >= 0 ? read(fd, jt, sizeof(jt) - 1) : -1;
	if (fd >= 0)
		close(fd);
	if (k <= 0) {
		snprintf(why, n, "auto: ext4 on %.64s, journal unknown", dev);
		return false;
	}
	jt[k] = 0;
	if (strncmp(jt, "<none>", 6) != 0) {
		snprintf(why, n, "auto: ext4 on %.64s has a journal", dev);
		return false;
	}
	snprintf(why, n, "auto: ext4 on %.64s has no journal", dev);
	return true;
}

struct spool *
spool_create(const struct spool_params *p)
{
	struct spool *sp;
	char wdir[4096];
	const char *fault;
	int r;

	if (!p->dir || !p->done || p->worker > 255 || p->max_msgs == 0 ||
	    p->batches < 2 || p->batches > 65536 ||
	    p->batch_size < SPOOL_BLOCK || p->segment_size % SPOOL_BLOCK) {
		fd_log(FD_LOG_ERR, "spool", "event=create_failed reason=params");
		errno = EINVAL;
		return NULL;
	}
	sp = calloc(1, sizeof(*sp));
	if (!sp) {
		errno = ENOMEM;
		return NULL;
	}
	sp->p = *p;
	if (sp->p.flush_inflight == 0)
		sp->p.flush_inflight = 1;
	sp->stp = &sp->st;
	sp->nb = p->batches;
	sp->fsync_mode = p->linked_fdatasync;
	sp->cap = (size_t)spool_align_block(
		p->batch_size + 8 + spool_rec_size(SPOOL_ENV_MAX) +
		(uint64_t)p->max_msgs * SPOOL_REC_HDR_LEN + 8);
	if (p->segment_size < SPOOL_BLOCK + sp->cap) {
		fd_log(FD_LOG_ERR, "spool",
		       "event=create_failed reason=segment_too_small need=%zu",
		       SPOOL_BLOCK + sp->cap);
		r = -EINVAL;
		goto out_free;
	}
#ifdef FINALDOT_FAULT_INJECTION
	fault = p->fault ? p->fault : getenv("FINALDOT_SPOOL_FAULT");
#else
	/* A release build has no seam: the environment is never read, so a
	 * stray FINALDOT_SPOOL_FAULT can neither inject a fault nor stop the
	 * daemon (issue 10). params.fault is a test API: refused below. */
	fault = p->fault;
#endif
	if ((r = parse_fault(sp, fault)) != 0) {
		fd_log(FD_LOG_ERR, "spool",
		       "event=create_failed reason=fault_spec");
		goto out_free;
	}
	if (sp->fault != F_NONE)
		fd_log(FD_LOG_WARN, "spool", "event=fault_injection worker=%u",
		       p->worker);
	sp->dir = strdup(p->dir);
	sp->b = calloc(sp->nb, sizeof(*sp->b));
	sp->free_idx = calloc(sp->nb, sizeof(unsigned));
	sp->fifo = calloc(sp->nb, sizeof(unsigned));
	sp->msgs = calloc(p->max_msgs, sizeof(*sp->msgs));
	if (!sp->dir || !sp->b || !sp->free_idx || !sp->fifo || !sp->msgs) {
		r = -ENOMEM;
		goto out_arrays;
	}
	sp->p.dir = sp->dir;
	sp->p.fault = NULL;
	for (unsigned i = 0; i < sp->nb; i++) {
		sp->b[i].idx = i;
		if (posix_memalign((void **)&sp->b[i].buf, SPOOL_BLOCK,
				   sp->cap) != 0) {
			r = -ENOMEM;
			goto out_bufs;
		}
		memset(sp->b[i].buf, 0, sp->cap);
		sp->free_idx[sp->nfree++] = sp->nb - 1 - i;
	}
	for (unsigned i = p->max_msgs; i-- > 0;)
		free_msg(sp, &sp->msgs[i]);
	fd_msgid_init(&sp->gen, (uint8_t)p->worker, p->seed_msgid);
#ifdef FINALDOT_FAULT_INJECTION
	{
		const char *sk = getenv("FINALDOT_MSGID_SKEW_S");

		if (sk)
			sp->msgid_skew_us = strtoll(sk, NULL, 10) * 1000000;
	}
#endif

	if (p->ring) {
		sp->ring = p->ring;
	} else {
		r = io_uring_queue_init(ring_entries(sp->nb), &sp->own, 0);
		if (r < 0) {
			fd_log(FD_LOG_ERR, "spool",
			       "event=create_failed reason=io_uring err=%d",
			       -r);
			goto out_bufs;
		}
		sp->ring = &sp->own;
		sp->own_ring = true;
		if (p->helper_cpus) {
			cpu_set_t set = *p->helper_cpus;
			int ar = io_uring_register_iowq_aff(sp->ring,
							    sizeof(set), &set);
			if (ar < 0)
				fd_log(FD_LOG_WARN, "spool",
				       "event=iowq_affinity_failed worker=%u "
				       "err=%d",
				       p->worker, -ar);
		}
	}
	register_bufs(sp);
	snprintf(wdir, sizeof(wdir), "%s/w%02x", p->dir, p->worker);
	/* A new directory is made durable in its parent: without that a
	 * power cut can take it back with every segment in it (found by the
	 * power-cut simulator). */
	if ((r = fd_mkdir_durable(p->dir, 0750)) != 0 ||
	    (r = fd_mkdir_durable(wdir, 0750)) != 0) {
		fd_log(FD_LOG_ERR, "spool",
		       "event=create_failed reason=mkdir err=%d", -r);
		goto out_ring;
	}
	sp->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (sp->wake_fd < 0) {
		r = -errno;
		goto out_ring;
	}
	sp->prep = spool_prep_start(wdir, p->worker, p->segment_size,
				    p->spare_segments, p->max_segments,
				    p->min_free, sp->fault == F_ENOSPC,
				    p->fallocate_segments, p->helper_cpus,
				    sp->wake_fd, &r);
	if (!sp->prep)
		goto out_wake;
#ifdef FINALDOT_FAULT_INJECTION
	if (sp->fault == F_PREP_SLOW)
		spool_prep_set_slow(sp->prep, (unsigned)sp->fault_n);
#endif
	r = spool_prep_wait_ready(sp->prep);
	if (r && r != -ENOSPC && r != -EDQUOT) {
		fd_log(FD_LOG_ERR, "spool",
		       "event=create_failed reason=segment err=%d", -r);
		goto out_prep;
	}
	fd_log(FD_LOG_INFO, "spool",
	       "event=started worker=%u batch_size=%zu batches=%u "
	       "segment_size=%" PRIu64 " sync=%s buffers=%s",
	       p->worker, p->batch_size, p->batches, p->segment_size,
	       sp->fsync_mode ? "linked_fdatasync" : "rwf_dsync",
	       sp->nfixed == sp->nb ? "registered"
	       : sp->nfixed ? "partly_registered"
			    : "plain");
	return sp;

out_prep:
	spool_prep_stop(sp->prep);
out_wake:
	close(sp->wake_fd);
out_ring:
	if (sp->own_ring)
		io_uring_queue_exit(&sp->own);
	else if (sp->nfixed)
		io_uring_unregister_buffers(sp->ring); /* nothing in flight */
out_bufs:
	for (unsigned i = 0; i < sp->nb; i++)
		free(sp->b[i].buf);
out_arrays:
	free(sp->msgs);
	free(sp->fifo);
	free(sp->free_idx);
	free(sp->b);
	free(sp->dir);
out_free:
	free(sp);
	errno = -r;
	return NULL;
}

void
spool_destroy(struct spool *sp)
{
	bool busy = false;

	if (!sp)
		return;
	sp->destroying = true;
	if (sp->abandoned) {
		fd_log(FD_LOG_WARN, "spool",
		       "event=destroy_abandoned worker=%u inflight=%u "
		       "reason=shutdown_deadline",
		       sp->p.worker, sp->fifo_n);
	} else if (sp->own_ring) {
		for (;;) {
			spool_flush(sp);
			if (!sp->fifo_n && !sp->pend_head)
				break;
			if (!sp->kernel && !sp->fifo_n) {
				service(sp); /* ENDs waiting for a buffer */
				if (!sp->cur)
					break;
				continue;
			}
			if (spool_wait(sp) < 0)
				break;
		}
	} else if (sp->fifo_n) {
		fd_log(FD_LOG_ERR, "spool",
		       "event=destroy_busy worker=%u inflight=%u",
		       sp->p.worker, sp->fifo_n);
		busy = true;
	}
	/* Batches that never completed (the shutdown deadline passed with
	 * writes held or in the kernel): no verdict will come; their
	 * sessions were answered 421 and detached. Drop the segment
	 * references they hold (the kernel holds its own on the file). */
	while (sp->fifo_n) {
		struct batch *b = fifo_at(sp, 0);
		sp->fifo_head = (sp->fifo_head + 1) % sp->nb;
		sp->fifo_n--;
		if (b->seg) {
			b->seg->inflight--;
			seg_release(b->seg);
			b->seg = NULL;
		}
	}
	fail_pending(sp, -ECANCELED);
	spool_prep_stop(sp->prep);
	close(sp->wake_fd);
	free(sp->reclaims);
	if (sp->active) {
		sp->active->retired = true;
		seg_release(sp->active);
	}
	if (sp->own_ring)
		io_uring_queue_exit(&sp->own);
	else if (sp->nfixed && !sp->abandoned && !busy)
		/* The worker's ring outlives us. With writes still in the
		 * kernel, unregistering would wait for them: the ring's
		 * teardown drops the registration instead. */
		io_uring_unregister_buffers(sp->ring);
	for (unsigned i = 0; i < sp->nb; i++)
		free(sp->b[i].buf);
	free(sp->msgs);
	free(sp->fifo);
	free(sp->free_idx);
	free(sp->b);
	free(sp->dir);
	free(sp);
}
