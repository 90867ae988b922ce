/*
 * The spool on a simulated ring: the real spool code, in shared-ring mode,
 * against a kernel this test plays. SQEs are taken out of the ring without
 * being submitted, completed in an order and with results the test
 * chooses (at random, or scripted) and their CQEs handed to
 * spool_handle_cqe(). Nothing reaches the segment files but the
 * preparer's zeros: what the disk holds is what the model below says.
 *
 * The durability model is what the spool itself can know of the disk:
 *  - a write with RWF_DSYNC is durable when it completes ok;
 *  - an fdatasync covers its own linked write and the ok writes of its
 *    file that had completed when it was taken from the ring (it runs
 *    later and may cover more, never less);
 *  - strict: a failed fdatasync poisons the completed writes it covered
 *    that were not durable yet. Their state is unknown from then on,
 *    whatever a later flush reports: the kernel reports a writeback error
 *    once and marks the pages clean, so a later fdatasync may succeed
 *    without writing them again. Not strict: a later flush makes them
 *    durable (an optimistic kernel).
 * A verdict with status 0 is checked when it is given: the message must
 * be recoverable from durable, unpoisoned writes alone (its ENV, every
 * body byte in DATA records holding the right bytes, an END with the
 * body's length and CRC). Every committed message gets exactly one
 * verdict, none before its commit, FAILED is announced before a failed
 * verdict, no write's buffer changes while it is in flight, every write
 * goes to an announced segment, and the spool leaves no fd behind.
 *
 * The scripted cases pin down the two bugs this model found (both fixed
 * in spool.c: a batch resubmitted after RWF_DSYNC was refused carries its
 * own fdatasync; a failed flush fails every message begun so far, noted
 * when its error arrives) and what the code promises around them. The
 * randomized ones run fixed seeds with injected errors, short writes and
 * refused RWF_DSYNC in each sync mode.
 *
 * Needs io_uring (the ring is real, only never submitted) and O_DIRECT in
 * /var/tmp (the segment files are real, and opened so); skips without
 * them.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <liburing.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../testdir.h"
#include "finaldot/crc32c.h"
#include "finaldot/log.h"
#include "finaldot/spool_format.h"
#include "spool.h"

#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif

#define SIM_SESSIONS 6
#define SIM_OPS 256      /* pending operations: bounded by the ring */
#define SIM_SEGS 256     /* segments announced in one run */
#define SIM_ROOM_WAIT_MS 5000
#define SIM_SEEDS 20     /* per randomized mode */
#define SIM_STEPS 6000
#define SIM_WRITES 400   /* no new message after this many writes */

enum op_kind { OP_WRITE, OP_FSYNC, OP_NOP };
enum wr_state { WR_PENDING, WR_OK, WR_FAILED };

struct sim_write {
	ino_t ino;
	uint64_t off;
	uint32_t len;
	const uint8_t *addr; /* the spool's buffer */
	uint32_t crc;        /* of its bytes when the SQE was taken */
	uint64_t ud;
	uint64_t t_done;
	enum wr_state state;
	bool dsync;
	bool durable;
	bool poisoned;
};

struct sim_op {
	enum op_kind kind;
	uint64_t ud;
	int wi;      /* OP_WRITE: its sim_write */
	int link_wi; /* OP_FSYNC linked to this write, or -1 */
	ino_t ino;
	uint64_t t_taken;
};

/* A record of a message, as taken from the ring in write wi. */
struct sim_rec {
	int wi;
	uint8_t type;
	bool bytes_ok; /* DATA: the body's bytes at offset */
	uint64_t offset;
	uint32_t len;
	uint32_t aux;
};

struct sim_msg {
	uint64_t id;
	uint8_t *body; /* all of it, made at begin; freed at the verdict */
	size_t len;
	struct sim_rec *recs;
	unsigned n_recs, cap_recs;
	unsigned verdicts;
	int status;
	bool committed;
	bool detached;
	bool failed_an;        /* FAILED was announced */
	bool durable_at_verdict;
};

enum sess_state { SS_IDLE, SS_OPEN, SS_COMMITTED };

struct sim_sess {
	enum sess_state st;
	struct spool_msg *m;
	int mi; /* its sim_msg */
	size_t have;
};

struct sim_seg {
	uint64_t use_seq;
	ino_t ino;
};

/* One sync mode of a randomized run, or a scripted case's setup. */
struct sim_mode {
	bool linked;       /* linked_fdatasync from the start */
	bool big;          /* mostly bodies of several batches */
	bool strict;       /* failed flushes poison what they covered */
	unsigned flush_inflight;
	bool refuse_dsync; /* RWF_DSYNC refused from some write on */
	unsigned pct_write_err, pct_fsync_err, pct_short;
};

static struct {
	struct sim_mode mode;
	char dir[128];
	struct io_uring ring;
	bool ring_up;
	struct spool *sp;
	uint64_t rs; /* xorshift state */
	uint64_t now;
	bool faults;
	int refuse_from; /* refuse_dsync: from this many writes on */

	struct sim_write *w;
	int nw, cap_w;
	struct sim_op ops[SIM_OPS];
	int nops;
	struct sim_msg *msgs;
	int nmsgs, cap_msgs;
	struct sim_sess sess[SIM_SESSIONS];
	struct sim_seg segs[SIM_SEGS];
	int nsegs;

	unsigned long n_viol;
	char first_viol[256];
	unsigned long n_ok, n_fail;
	unsigned fds; /* open before the spool was made */
} sim;

static char root[64];

static void
violation(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Recorded, not fatal: the run goes on (a hang it caused is its own
 * violation) and the test asserts at its end with the first one's text. */
static void
violation(const char *fmt, ...)
{
	va_list ap;

	if (sim.n_viol++)
		return;
	va_start(ap, fmt);
	vsnprintf(sim.first_viol, sizeof(sim.first_viol), fmt, ap);
	va_end(ap);
}

static uint64_t
rnd(void)
{
	sim.rs ^= sim.rs << 13;
	sim.rs ^= sim.rs >> 7;
	sim.rs ^= sim.rs << 17;
	return sim.rs;
}

static unsigned
rn(unsigned n)
{
	return (unsigned)(rnd() % n);
}

static unsigned
seq_of(uint64_t ud)
{
	return (unsigned)((ud >> 40) & 0x7fffff);
}

/* ---- messages --------------------------------------------------------- */

static struct sim_msg *
msg_find(uint64_t id)
{
	for (int i = sim.nmsgs - 1; i >= 0; i--)
		if (sim.msgs[i].id == id)
			return &sim.msgs[i];
	return NULL;
}

static void
msg_release(struct sim_msg *r)
{
	free(r->body);
	free(r->recs);
	r->body = NULL;
	r->recs = NULL;
	r->n_recs = r->cap_recs = 0;
}

static void
msg_add_rec(struct sim_msg *r, const struct sim_rec *rec)
{
	if (r->n_recs == r->cap_recs) {
		r->cap_recs = r->cap_recs ? 2 * r->cap_recs : 8;
		r->recs = realloc(r->recs, r->cap_recs * sizeof(*r->recs));
		cr_assert_not_null(r->recs);
	}
	r->recs[r->n_recs++] = *rec;
}

/* Could r be recovered from the writes durable now? If not, why. */
static bool
recoverable(const struct sim_msg *r, char *why, size_t wn)
{
	uint8_t *cov = calloc(r->len + 1, 1);
	bool env = false, end = false, ok = true;
	uint64_t end_len = 0;
	uint32_t end_crc = 0;

	cr_assert_not_null(cov);
	for (unsigned i = 0; i < r->n_recs; i++) {
		const struct sim_rec *c = &r->recs[i];
		const struct sim_write *w = &sim.w[c->wi];

		if (w->state != WR_OK || !w->durable || w->poisoned)
			continue;
		if (c->type == SPOOL_REC_ENV) {
			env = true;
		} else if (c->type == SPOOL_REC_END) {
			end = true;
			end_len = c->offset;
			end_crc = c->aux;
		} else if (c->type == SPOOL_REC_DATA && c->bytes_ok) {
			memset(cov + c->offset, 1, c->len);
		}
	}
	if (!env) {
		snprintf(why, wn, "no durable ENV");
		ok = false;
	} else if (!end) {
		snprintf(why, wn, "no durable END");
		ok = false;
	} else if (end_len != r->len) {
		snprintf(why, wn, "END says %" PRIu64 " octets, not %zu",
			 end_len, r->len);
		ok = false;
	} else if (end_crc != fd_crc32c(0, r->body, r->len)) {
		snprintf(why, wn, "END has the wrong CRC");
		ok = false;
	}
	for (size_t i = 0; ok && i < r->len; i++) {
		if (!cov[i]) {
			snprintf(why, wn, "body octet %zu of %zu not durable",
				 i, r->len);
			ok = false;
		}
	}
	free(cov);
	return ok;
}

static void
verdict(uint64_t id, int status, bool orphan)
{
	struct sim_msg *r = msg_find(id);
	char why[96] = "its body is gone";

	if (!r) {
		violation("verdict for unknown id %016" PRIx64, id);
		return;
	}
	if (++r->verdicts > 1) {
		violation("%016" PRIx64 ": %u verdicts", id, r->verdicts);
		return;
	}
	r->status = status;
	if (!r->committed)
		violation("%016" PRIx64 ": verdict before commit", id);
	if (orphan != r->detached)
		violation("%016" PRIx64 ": orphan_done=%d, detached=%d", id,
			  orphan, r->detached);
	r->durable_at_verdict = r->body && recoverable(r, why, sizeof(why));
	if (status == 0 && !r->durable_at_verdict)
		violation("%016" PRIx64 ": status 0 but not durable: %s", id,
			  why);
	if (status != 0 && !r->failed_an)
		violation("%016" PRIx64 ": status %d before FAILED", id,
			  status);
	if (status == 0)
		sim.n_ok++;
	else
		sim.n_fail++;
	msg_release(r);
}

static void
on_done(void *ctx, uint64_t id, int status)
{
	struct sim_sess *s = ctx;

	verdict(id, status, false);
	if (s->st != SS_COMMITTED || sim.msgs[s->mi].id != id)
		violation("%016" PRIx64 ": done() for a session not waiting "
			  "for it",
			  id);
	s->st = SS_IDLE;
}

static void
on_orphan(void *ctx, uint64_t id, int status)
{
	(void)ctx;
	verdict(id, status, true);
}

/*
 * DURABLE must not cover a write still in flight. Whether the writes it
 * covers are durable in the model is deliberately not checked (the
 * review's harness had that check; off here): after a failed flush,
 * DURABLE covers the unflushed writes before the failed batch and those
 * the failure poisoned, a known over-announcement that spool.h allows
 * ("failed and abandoned"). Harmless: every message with records there
 * was announced FAILED before its verdict (checked in verdict()), and a
 * reader skips those.
 */
static void
on_announce(void *actx, const struct spool_announce *a)
{
	char path[256];
	struct stat st;
	ino_t ino = 0;

	(void)actx;
	if (a->type == SPOOL_AN_SEGMENT) {
		snprintf(path, sizeof(path), "%s/w05/%08" PRIx64 ".seg",
			 sim.dir, a->file_no);
		if (stat(path, &st) != 0) {
			violation("SEGMENT %s: no such file", path);
			return;
		}
		if (sim.nsegs == SIM_SEGS) {
			violation("more than %d segments", SIM_SEGS);
			return;
		}
		sim.segs[sim.nsegs].use_seq = a->use_seq;
		sim.segs[sim.nsegs].ino = st.st_ino;
		sim.nsegs++;
	} else if (a->type == SPOOL_AN_FAILED) {
		struct sim_msg *r = msg_find(a->msgid);

		if (r)
			r->failed_an = true;
	} else if (a->type == SPOOL_AN_DURABLE) {
		for (int i = sim.nsegs - 1; i >= 0; i--) {
			if (sim.segs[i].use_seq == a->use_seq) {
				ino = sim.segs[i].ino;
				break;
			}
		}
		if (!ino)
			violation("DURABLE in segment %" PRIu64
				  ", never announced",
				  a->use_seq);
		for (int i = 0; i < sim.nw; i++) {
			const struct sim_write *w = &sim.w[i];

			if (w->ino == ino && w->off + w->len <= a->off &&
			    w->state == WR_PENDING)
				violation("DURABLE to %" PRIu64
					  " covers the write at %" PRIu64
					  " in flight",
					  a->off, w->off);
		}
	}
}

/* ---- the simulated kernel -------------------------------------------- */

/* The records of a write, noted in their messages (DATA compared now:
 * the bodies are made whole at begin). */
static void
parse_write(int wi, const uint8_t *p, size_t len)
{
	size_t pos = 0;

	while (pos + SPOOL_REC_HDR_LEN <= len) {
		struct spool_rec_hdr h;
		struct sim_msg *r;
		struct sim_rec c;

		if (spool_get32(p + pos) == 0) {
			/* padding: the rest of the block is zeros */
			pos = (pos / SPOOL_BLOCK + 1) * SPOOL_BLOCK;
			continue;
		}
		if (spool_rec_hdr_decode(p + pos, len - pos, &h) !=
		    SPOOL_DEC_OK) {
			violation("undecodable record in a write at %" PRIu64,
				  sim.w[wi].off);
			return;
		}
		r = msg_find(h.msgid);
		if (!r) {
			violation("record of unknown id %016" PRIx64, h.msgid);
		} else if (r->body) {
			c.wi = wi;
			c.type = h.type;
			c.offset = h.offset;
			c.len = h.len;
			c.aux = h.aux;
			c.bytes_ok = h.type == SPOOL_REC_DATA &&
				     h.offset + h.len <= r->len &&
				     memcmp(p + pos + SPOOL_REC_HDR_LEN,
					    r->body + h.offset, h.len) == 0;
			msg_add_rec(r, &c);
		}
		pos += spool_rec_size(h.len);
	}
}

static ino_t
sqe_file(int fd)
{
	struct stat st;

	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
		violation("SQE for fd %d: no open file", fd);
		return 0;
	}
	for (int i = 0; i < sim.nsegs; i++)
		if (sim.segs[i].ino == st.st_ino)
			return st.st_ino;
	violation("SQE for fd %d: no announced segment", fd);
	return 0;
}

/* What a submission would do: every SQE the spool queued becomes a
 * pending operation, and the ring's space comes back. */
static void
take_sqes(void)
{
	struct io_uring_sq *sq = &sim.ring.sq;
	int link_wi = -1;

	while (sq->sqe_head != sq->sqe_tail) {
		struct io_uring_sqe *s;
		struct sim_op *o;
		bool link;

		s = &sq->sqes[sq->sqe_head++ & sq->ring_mask];
		link = s->flags & IOSQE_IO_LINK;
		if (sim.nops == SIM_OPS) {
			violation("more than %d operations pending", SIM_OPS);
			continue;
		}
		o = &sim.ops[sim.nops++];
		memset(o, 0, sizeof(*o));
		o->ud = s->user_data;
		o->t_taken = ++sim.now;
		o->link_wi = -1;
		switch (s->opcode) {
		case IORING_OP_WRITE:
		case IORING_OP_WRITE_FIXED: {
			struct sim_write *w;

			if (sim.nw == sim.cap_w) {
				sim.cap_w = sim.cap_w ? 2 * sim.cap_w : 256;
				sim.w = realloc(sim.w,
						sim.cap_w * sizeof(*sim.w));
				cr_assert_not_null(sim.w);
			}
			w = &sim.w[sim.nw];
			memset(w, 0, sizeof(*w));
			o->kind = OP_WRITE;
			o->wi = sim.nw++;
			o->ino = w->ino = sqe_file(s->fd);
			w->off = s->off;
			w->len = s->len;
			w->addr = (const uint8_t *)(uintptr_t)s->addr;
			w->crc = fd_crc32c(0, w->addr, w->len);
			w->ud = s->user_data;
			w->dsync = (s->rw_flags & RWF_DSYNC) != 0;
			if (w->off % SPOOL_BLOCK || w->len % SPOOL_BLOCK)
				violation("unaligned write at %" PRIu64,
					  w->off);
			parse_write(o->wi, w->addr, w->len);
			break;
		}
		case IORING_OP_FSYNC:
			o->kind = OP_FSYNC;
			o->ino = sqe_file(s->fd);
			o->link_wi = link_wi;
			if (!(s->fsync_flags & IORING_FSYNC_DATASYNC))
				violation("fsync, not fdatasync");
			break;
		case IORING_OP_NOP:
			o->kind = OP_NOP;
			break;
		default:
			violation("unexpected opcode %u", s->opcode);
			sim.nops--;
			continue;
		}
		if (link && o->kind != OP_WRITE)
			violation("IOSQE_IO_LINK on a non-write");
		link_wi = link && o->kind == OP_WRITE ? o->wi : -1;
	}
	*sq->khead = sq->sqe_tail;
}

static void
deliver(uint64_t ud, int res)
{
	struct io_uring_cqe c;

	memset(&c, 0, sizeof(c));
	c.user_data = ud;
	c.res = res;
	spool_handle_cqe(sim.sp, &c);
	take_sqes();
}

/* A linked fdatasync waits for its write. */
static bool
eligible(const struct sim_op *o)
{
	return o->kind != OP_FSYNC || o->link_wi < 0 ||
	       sim.w[o->link_wi].state != WR_PENDING;
}

static int
write_result(const struct sim_write *w)
{
	const struct sim_mode *m = &sim.mode;

	if (!sim.faults)
		return (int)w->len;
	if (w->dsync && m->refuse_dsync && w - sim.w >= sim.refuse_from)
		return -EINVAL;
	if (rn(100) < m->pct_write_err)
		return rn(2) ? -EIO : -ENOSPC;
	if (w->len > SPOOL_BLOCK && rn(100) < m->pct_short)
		return (int)(w->len - SPOOL_BLOCK);
	return (int)w->len;
}

/* Complete pending operation i (removed from the list) with res, or with
 * a result drawn at random if !forced. For a write, res 0 means all of
 * it. */
static void
complete(int i, bool forced, int res)
{
	struct sim_op o = sim.ops[i];

	sim.ops[i] = sim.ops[--sim.nops];
	sim.now++;
	if (o.kind == OP_WRITE) {
		struct sim_write *w = &sim.w[o.wi];

		if (fd_crc32c(0, w->addr, w->len) != w->crc)
			violation("the buffer of the write at %" PRIu64
				  " changed in flight",
				  w->off);
		if (!forced)
			res = write_result(w);
		else if (res == 0)
			res = (int)w->len;
		w->state = res == (int)w->len ? WR_OK : WR_FAILED;
		w->t_done = sim.now;
		w->durable = w->state == WR_OK && w->dsync;
	} else if (o.kind == OP_FSYNC) {
		bool cancelled = o.link_wi >= 0 &&
				 sim.w[o.link_wi].state != WR_OK;

		if (cancelled)
			res = -ECANCELED;
		else if (!forced)
			res = sim.faults && rn(100) < sim.mode.pct_fsync_err
				      ? -EIO
				      : 0;
		for (int k = 0; k < sim.nw && !cancelled; k++) {
			struct sim_write *w = &sim.w[k];

			if (w->ino != o.ino || w->state != WR_OK ||
			    w->durable ||
			    (w->t_done > o.t_taken && k != o.link_wi))
				continue;
			if (res == 0)
				w->durable = !w->poisoned;
			else if (sim.mode.strict)
				w->poisoned = true;
		}
	} else {
		res = 0;
	}
	deliver(o.ud, res);
}

static void
complete_random(void)
{
	int cand[SIM_OPS], n = 0;

	for (int i = 0; i < sim.nops; i++)
		if (eligible(&sim.ops[i]))
			cand[n++] = i;
	if (n)
		complete(cand[rn((unsigned)n)], false, 0);
}

/* Scripted: the pending write (OP_WRITE) or fdatasync (OP_FSYNC) of batch
 * seq completes with res. */
static void
complete_op(unsigned seq, enum op_kind kind, int res)
{
	for (int i = 0; i < sim.nops; i++) {
		const struct sim_op *o = &sim.ops[i];

		if (o->kind == kind && seq_of(o->ud) == seq) {
			cr_assert(eligible(o), "fdatasync of batch %u before "
					       "its linked write",
				  seq);
			complete(i, true, res);
			return;
		}
	}
	cr_assert_fail("no pending %s of batch %u",
		       kind == OP_WRITE ? "write" : "fdatasync", seq);
}

/* Scripted: every pending operation completes ok, oldest first. */
static void
complete_all(void)
{
	while (sim.nops) {
		int first = -1;

		for (int i = 0; i < sim.nops; i++)
			if (eligible(&sim.ops[i]) &&
			    (first < 0 ||
			     sim.ops[i].t_taken < sim.ops[first].t_taken))
				first = i;
		complete(first, true, 0);
	}
}

static bool
pending(unsigned seq, enum op_kind kind)
{
	for (int i = 0; i < sim.nops; i++)
		if (sim.ops[i].kind == kind && seq_of(sim.ops[i].ud) == seq)
			return true;
	return false;
}

/* ---- the spool's user ------------------------------------------------- */

static const char *const rcpt1[] = { "rcpt@example.org" };

static unsigned
count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	unsigned n = 0;

	cr_assert_not_null(d);
	while (readdir(d))
		n++;
	closedir(d);
	return n;
}

static void
sim_start(const struct sim_mode *mode, uint64_t seed)
{
	struct spool_params p;
	static unsigned run;
	int r;

	memset(&sim, 0, sizeof(sim));
	sim.mode = *mode;
	sim.rs = seed * 2654435761u + 1;
	/* RWF_DSYNC refused from the start (several writes in flight, each
	 * refused, in any order: the fallback's hard case); in one run of
	 * four from some write on, or never */
	sim.refuse_from = seed % 4 ? 0 : (int)rn(2 * SIM_WRITES);
	snprintf(sim.dir, sizeof(sim.dir), "%s/run%u", root, run++);
	cr_assert_eq(mkdir(sim.dir, 0700), 0);
	r = io_uring_queue_init(256, &sim.ring, 0);
	if (r < 0)
		cr_skip_test("no io_uring (%d)", r);
	sim.ring_up = true;
	sim.fds = count_fds();
	spool_params_defaults(&p);
	p.dir = sim.dir;
	p.worker = 5;
	p.batch_size = 8192;
	p.batches = 6;
	p.max_msgs = SIM_SESSIONS;
	/* Room for 16 buffers (77824 octets: batch_size and a maximal
	 * ENV), a switch every 140 batches or so: a run crosses a few
	 * files' ends, and does not wait for many new files. */
	p.segment_size = SPOOL_BLOCK + 16 * 77824;
	/* No batch reaches the files: unwritten extents spare the disk the
	 * zeros (nearly 500 MB over the randomized runs). */
	p.fallocate_segments = true;
	p.spare_segments = 2;
	p.ring = &sim.ring;
	p.done = on_done;
	p.orphan_done = on_orphan;
	p.announce = on_announce;
	p.linked_fdatasync = mode->linked;
	p.flush_inflight = mode->flush_inflight ? mode->flush_inflight : 1;
	sim.sp = spool_create(&p);
	if (!sim.sp && (errno == EINVAL || errno == ENOSYS ||
			errno == EPERM || errno == EOPNOTSUPP))
		cr_skip_test("io_uring or O_DIRECT unavailable (errno %d)",
			     errno);
	cr_assert_not_null(sim.sp, "spool_create: %s", strerror(errno));
	take_sqes();
}

/* Frees what a run holds; also after a failed assertion (from fini). */
static void
sim_stop(void)
{
	if (sim.sp) {
		spool_abandon(sim.sp);
		spool_destroy(sim.sp);
		sim.sp = NULL;
	}
	if (sim.ring_up)
		io_uring_queue_exit(&sim.ring);
	sim.ring_up = false;
	for (int i = 0; i < sim.nmsgs; i++)
		msg_release(&sim.msgs[i]);
	free(sim.msgs);
	free(sim.w);
	sim.msgs = NULL;
	sim.w = NULL;
	sim.nmsgs = sim.nw = 0;
	if (sim.dir[0])
		fd_test_dir_remove(sim.dir);
	sim.dir[0] = '\0';
}

/* The preparer's wake: a spare segment is ready (or none will come). */
static bool
wait_for_room(void)
{
	struct pollfd pfd = { .fd = spool_wake_fd(sim.sp), .events = POLLIN };
	uint64_t v;

	if (spool_out_of_space(sim.sp)) {
		violation("out of space");
		return false;
	}
	if (poll(&pfd, 1, SIM_ROOM_WAIT_MS) != 1) {
		violation("no room for %d ms, nothing in flight",
			  SIM_ROOM_WAIT_MS);
		return false;
	}
	if (read(pfd.fd, &v, sizeof(v)) != sizeof(v))
		violation("wake fd: %s", strerror(errno));
	spool_flush(sim.sp);
	take_sqes();
	return true;
}

/* Begin a message of len octets (random) for session i; NULL and *err as
 * spool_msg_begin(). */
static struct sim_sess *
msg_begin(int i, size_t len, int *err)
{
	struct fd_envelope e = {
		.mail_from = "from@example.org",
		.rcpts = rcpt1,
		.n_rcpts = 1,
		.helo = "client.example",
		.client_addr = "192.0.2.1",
		.proto = "ESMTP",
	};
	struct sim_sess *s = &sim.sess[i];
	struct sim_msg *r;
	uint64_t id = 0;

	cr_assert_eq(s->st, SS_IDLE);
	s->m = spool_msg_begin(sim.sp, &e, s, &id, err);
	take_sqes();
	if (!s->m)
		return NULL;
	if (sim.nmsgs == sim.cap_msgs) {
		sim.cap_msgs = sim.cap_msgs ? 2 * sim.cap_msgs : 64;
		sim.msgs = realloc(sim.msgs, sim.cap_msgs * sizeof(*sim.msgs));
		cr_assert_not_null(sim.msgs);
	}
	r = &sim.msgs[sim.nmsgs];
	memset(r, 0, sizeof(*r));
	r->id = id;
	r->len = len;
	r->body = malloc(len + 1);
	cr_assert_not_null(r->body);
	for (size_t k = 0; k < len; k++)
		r->body[k] = (uint8_t)rnd();
	s->mi = sim.nmsgs++;
	s->st = SS_OPEN;
	s->have = 0;
	return s;
}

/* Up to n more body octets (what spool_room() allows): how many. */
static size_t
msg_append(struct sim_sess *s, size_t n)
{
	struct sim_msg *r = &sim.msgs[s->mi];
	size_t room = spool_room(sim.sp);
	int e;

	if (n > r->len - s->have)
		n = r->len - s->have;
	if (n > room)
		n = room;
	if (!n)
		return 0;
	e = spool_msg_append(sim.sp, s->m, r->body + s->have, n);
	take_sqes();
	if (e) {
		violation("append %zu (room %zu): %d", n, room, e);
		return 0;
	}
	s->have += n;
	return n;
}

static void
msg_abort(struct sim_sess *s)
{
	spool_msg_abort(sim.sp, s->m);
	take_sqes();
	msg_release(&sim.msgs[s->mi]);
	s->st = SS_IDLE;
}

static int
msg_commit(struct sim_sess *s)
{
	struct sim_msg *r = &sim.msgs[s->mi];
	int e;

	r->committed = true;
	s->st = SS_COMMITTED;
	e = spool_msg_commit(sim.sp, s->m);
	take_sqes();
	if (e == -ENOSPC) {
		/* no END: the caller aborts and answers 452 */
		r->committed = false;
		s->st = SS_OPEN;
		msg_abort(s);
	} else if (e) {
		violation("commit: %d", e);
	}
	return e;
}

static void
msg_detach(struct sim_sess *s)
{
	spool_msg_detach(sim.sp, s->m);
	sim.msgs[s->mi].detached = true;
	s->st = SS_IDLE;
}

static void
flush(void)
{
	spool_flush(sim.sp);
	take_sqes();
}

/* Nothing can move but the preparer: no room, nothing in flight. */
static void
unstick(void)
{
	flush();
	if (!sim.nops && !spool_room(sim.sp))
		wait_for_room();
}

/*
 * Without faults, every open message is completed and committed and every
 * operation completes (in random order), until every committed message
 * has its verdict.
 */
static void
drain(void)
{
	sim.faults = false;
	for (int round = 0; round < 100000; round++) {
		bool busy = false, moved = false;

		for (int i = 0; i < SIM_SESSIONS; i++) {
			struct sim_sess *s = &sim.sess[i];

			if (s->st != SS_OPEN)
				continue;
			busy = true;
			if (s->have < sim.msgs[s->mi].len) {
				moved |= msg_append(s, SIZE_MAX) > 0;
			} else {
				msg_commit(s);
				moved = true;
			}
		}
		flush();
		if (sim.nops) {
			complete_random();
			continue;
		}
		if (moved)
			continue;
		for (int i = 0; i < sim.nmsgs && !busy; i++)
			busy = sim.msgs[i].committed && !sim.msgs[i].verdicts;
		if (!busy && !spool_inflight(sim.sp))
			break;
		if (!wait_for_room())
			break;
	}
	for (int i = 0; i < sim.nmsgs; i++)
		if (sim.msgs[i].committed && !sim.msgs[i].verdicts)
			violation("%016" PRIx64 " committed, no verdict",
				  sim.msgs[i].id);
	if (spool_inflight(sim.sp) || sim.nops)
		violation("drained with %u batches, %d operations left",
			  spool_inflight(sim.sp), sim.nops);
}

/* Drain, destroy the spool, and check that it left no fd behind. */
static void
sim_finish(void)
{
	unsigned n;

	drain();
	spool_destroy(sim.sp);
	sim.sp = NULL;
	n = count_fds();
	if (n != sim.fds)
		violation("%u fds open after the spool's destroy, %u before "
			  "its create",
			  n, sim.fds);
}

static void
assert_no_violation(void)
{
	cr_assert_eq(sim.n_viol, 0, "%lu violations, the first: %s",
		     sim.n_viol, sim.first_viol);
}

static void
setup(void)
{
	fd_log_set_level(FD_LOG_ERR);
	fd_test_dir_make(root, sizeof(root), "/var/tmp", "spoolmodel");
	memset(&sim, 0, sizeof(sim));
}

static void
teardown(void)
{
	sim_stop();
	fd_test_dir_remove(root);
}

TestSuite(spool_model, .init = setup, .fini = teardown, .timeout = 60);

/* ---- scripted cases --------------------------------------------------- */

static const struct sim_mode scripted_dsync = { .strict = true };
static const struct sim_mode scripted_linked = {
	.linked = true, .strict = true, .flush_inflight = 4,
};

static struct sim_msg *
msg_of(const struct sim_sess *s)
{
	return &sim.msgs[s->mi];
}

static struct sim_sess *
begin_ok(int i, size_t len)
{
	int err = 0;
	struct sim_sess *s = msg_begin(i, len, &err);

	cr_assert_not_null(s, "begin: %d", err);
	return s;
}

static void
append_ok(struct sim_sess *s, size_t n)
{
	cr_assert_eq(msg_append(s, n), n, "append %zu: room %zu", n,
		     spool_room(sim.sp));
}

/* A 100-octet message for session i, committed, its END flushed in a
 * batch of its own. */
static struct sim_sess *
small_msg(int i)
{
	struct sim_sess *s = begin_ok(i, 100);

	append_ok(s, 100);
	cr_assert_eq(msg_commit(s), 0);
	flush();
	return s;
}

/*
 * Refused RWF_DSYNC, later batch first: X's body spans batches 0 and 1
 * (END in 1), both written with RWF_DSYNC and both refused, batch 1's CQE
 * first. Batch 1 goes again as write + fdatasync; batch 0, resubmitted
 * after it, needs an fdatasync of its own (the one of batch 1 was issued
 * before it): without one X was answered 250 with its first half never
 * flushed. Once every operation left has completed ok, X has its 250 and
 * is on disk.
 */
Test(spool_model, dsync_refused_later_batch_first)
{
	struct sim_sess *x, *w;

	sim_start(&scripted_dsync, 7);
	x = begin_ok(0, 8192 + 500);
	append_ok(x, 8192 + 500); /* batch 0 full */
	cr_assert_eq(msg_commit(x), 0); /* END in batch 1 */
	w = begin_ok(1, 9000);
	append_ok(w, 7600); /* batch 1 full */
	flush();
	cr_assert(pending(0, OP_WRITE) && pending(1, OP_WRITE));
	cr_assert(sim.w[0].dsync && sim.w[1].dsync);
	complete_op(1, OP_WRITE, -EINVAL);
	complete_op(0, OP_WRITE, -EINVAL);
	complete_op(1, OP_WRITE, 0);
	complete_op(1, OP_FSYNC, 0);
	complete_op(0, OP_WRITE, 0);
	complete_all();
	cr_assert_eq(msg_of(x)->verdicts, 1);
	cr_assert_eq(msg_of(x)->status, 0);
	cr_assert(msg_of(x)->durable_at_verdict, "X: 250, not on disk");
	sim_finish();
	assert_no_violation();
	cr_assert_eq(msg_of(w)->status, 0);
}

/*
 * A late fdatasync covers later batches, fails, and a later flush
 * succeeds: batch 1's fdatasync, issued once the unflushed batch 0 was
 * written, also covers batch 2 (X's ENV and DATA), complete by then. It
 * fails; X's END goes in batch 3, whose flush succeeds without batch 2
 * being written again. X must not be answered 250; nor Y (END in 1) or Z
 * (begun in 0).
 */
Test(spool_model, failed_late_fdatasync_fails_later_batches)
{
	struct sim_sess *x, *y, *z;

	sim_start(&scripted_linked, 11);
	z = begin_ok(0, 8192 + 100);
	append_ok(z, 8192 + 50); /* batch 0 full, no END: unflushed */
	flush();
	y = begin_ok(1, 10);
	append_ok(y, 10);
	cr_assert_eq(msg_commit(y), 0); /* Y's END in batch 1 */
	flush();
	x = begin_ok(2, 9000);
	append_ok(x, 8200); /* batch 2 full: X's ENV and DATA */
	flush();
	cr_assert(!pending(1, OP_FSYNC), "batch 1's fdatasync not late");
	complete_op(2, OP_WRITE, 0);
	complete_op(1, OP_WRITE, 0);
	complete_op(0, OP_WRITE, 0);
	complete_op(1, OP_FSYNC, -EIO); /* covered batches 0, 1 and 2 */
	append_ok(x, 800);
	cr_assert_eq(msg_commit(x), 0); /* X's END in batch 3 */
	flush();
	complete_op(3, OP_WRITE, 0);
	complete_op(3, OP_FSYNC, 0);
	cr_assert_eq(msg_of(y)->status, -EIO);
	cr_assert_eq(msg_of(x)->verdicts, 1);
	cr_assert_eq(msg_of(x)->status, -EIO);
	cr_assert(!msg_of(x)->durable_at_verdict, "batch 2 not poisoned");
	sim_finish();
	assert_no_violation();
	cr_assert_eq(msg_of(z)->status, -EIO);
}

/*
 * Batch 2's fdatasync fails and its CQE arrives before batch 1's, which
 * succeeds. Both were issued once the unflushed batch 0 was written, and
 * each covers batches 0 to 2. M (ENV and DATA in 0, END in 1) completes
 * first, in batch order: the failure must already count against it.
 */
Test(spool_model, failed_fdatasync_reaped_before_an_earlier_one)
{
	struct sim_sess *m, *n;

	sim_start(&scripted_linked, 13);
	m = begin_ok(0, 8192 + 100);
	append_ok(m, 8192 + 50); /* batch 0 full, no END: unflushed */
	flush();
	append_ok(m, 50);
	cr_assert_eq(msg_commit(m), 0); /* M's END in batch 1 */
	flush();
	n = small_msg(1); /* batch 2 */
	complete_op(1, OP_WRITE, 0);
	complete_op(2, OP_WRITE, 0);
	complete_op(0, OP_WRITE, 0);
	complete_op(2, OP_FSYNC, -EIO);
	complete_op(1, OP_FSYNC, 0);
	cr_assert_eq(msg_of(m)->verdicts, 1);
	cr_assert_eq(msg_of(m)->status, -EIO);
	cr_assert(!msg_of(m)->durable_at_verdict, "M's writes not poisoned");
	cr_assert_eq(msg_of(n)->status, -EIO);
	sim_finish();
	assert_no_violation();
}

/*
 * The same order with no record of A covered by the failed flush:
 * batch 1's linked fdatasync fails before batch 0's write completed, and
 * batch 0's own flush succeeds. A is durable, yet note_flush_failure()
 * promises no more than "every message begun so far fails": A is answered
 * 451 (and announced FAILED, so its copy is never delivered), a resend
 * the price of not tracking which writes each flush covered. A message
 * begun after the failure stands on its own writes and flushes.
 */
Test(spool_model, failed_fdatasync_fails_every_message_begun)
{
	struct sim_sess *a, *b, *c;

	sim_start(&scripted_linked, 17);
	a = small_msg(0); /* batch 0 */
	b = small_msg(1); /* batch 1 */
	complete_op(1, OP_WRITE, 0);
	complete_op(1, OP_FSYNC, -EIO);
	complete_op(0, OP_WRITE, 0);
	complete_op(0, OP_FSYNC, 0);
	cr_assert_eq(msg_of(a)->status, -EIO);
	cr_assert(msg_of(a)->durable_at_verdict, "A's write not durable");
	cr_assert(msg_of(a)->failed_an);
	cr_assert_eq(msg_of(b)->status, -EIO);
	c = small_msg(2);
	complete_op(2, OP_WRITE, 0);
	complete_op(2, OP_FSYNC, 0);
	cr_assert_eq(msg_of(c)->status, 0);
	sim_finish();
	assert_no_violation();
}

/*
 * A failed write (not a flush: its linked fdatasync is cancelled) fails
 * the messages with records in it and no other: B, wholly in the later
 * batch, is answered 250 although it completes after the failure.
 */
Test(spool_model, failed_write_fails_only_its_messages)
{
	struct sim_sess *a, *b;

	sim_start(&scripted_linked, 19);
	a = small_msg(0); /* batch 0 */
	b = small_msg(1); /* batch 1 */
	complete_op(1, OP_WRITE, 0);
	complete_op(1, OP_FSYNC, 0);
	complete_op(0, OP_WRITE, -EIO);
	complete_op(0, OP_FSYNC, 0); /* cancelled: its write failed */
	cr_assert_eq(msg_of(a)->status, -EIO);
	cr_assert_eq(msg_of(b)->status, 0);
	sim_finish();
	assert_no_violation();
}

/* ---- randomized runs -------------------------------------------------- */

static void
step(void)
{
	int i = (int)rn(SIM_SESSIONS);
	struct sim_sess *s = &sim.sess[i];
	unsigned a = rn(100), kind;
	size_t len;
	int err = 0;

	if (a < 40) {
		complete_random();
		return;
	}
	if (a < 48) {
		flush();
		return;
	}
	switch (s->st) {
	case SS_IDLE:
		if (sim.nw >= SIM_WRITES)
			return;
		kind = rn(10);
		if (sim.mode.big)
			len = kind < 3 ? 1 + rn(3000) : 8192 + rn(60000);
		else
			len = kind < 6 ? 1 + rn(3000)
			      : kind < 9 ? rn(40000)
					 : rn(120000);
		if (msg_begin(i, len, &err))
			return;
		if (err == -EAGAIN && !sim.nops)
			unstick();
		else if (err != -EAGAIN && err != -EMFILE)
			violation("begin: %d", err);
		return;
	case SS_OPEN:
		if (rn(200) == 0) {
			msg_abort(s);
		} else if (s->have < msg_of(s)->len) {
			if (!msg_append(s, 1 + rn(20000)) && !sim.nops)
				unstick();
		} else {
			msg_commit(s);
		}
		return;
	case SS_COMMITTED:
		if (rn(100) == 0)
			msg_detach(s);
		return;
	}
}

static void
random_runs(const struct sim_mode *mode)
{
	unsigned long writes = 0, ok = 0, failed = 0;

	for (uint64_t seed = 1; seed <= SIM_SEEDS; seed++) {
		sim_start(mode, seed);
			sim.faults = true;
		for (int k = 0; k < SIM_STEPS && !sim.n_viol; k++)
			step();
		sim_finish();
		cr_assert_eq(sim.n_viol, 0,
			     "seed %" PRIu64 ": %lu violations, the first: %s",
			     seed, sim.n_viol, sim.first_viol);
		writes += (unsigned long)sim.nw;
		ok += sim.n_ok;
		failed += sim.n_fail;
		sim_stop();
	}
	/* the runs did what they are for */
	cr_assert_gt(writes, SIM_SEEDS * SIM_WRITES / 2);
	cr_assert_gt(ok, 100);
	cr_assert_gt(failed, 10);
}

#define ERRS .pct_write_err = 3, .pct_fsync_err = 3, .pct_short = 2

Test(spool_model, random_dsync_strict)
{
	const struct sim_mode m = {
		.big = true, .strict = true, .flush_inflight = 2,
		.refuse_dsync = true, ERRS,
	};

	random_runs(&m);
}

Test(spool_model, random_dsync)
{
	const struct sim_mode m = {
		.big = true, .flush_inflight = 2, .refuse_dsync = true, ERRS,
	};

	random_runs(&m);
}

Test(spool_model, random_linked_strict)
{
	const struct sim_mode m = { .linked = true, .strict = true, ERRS };

	random_runs(&m);
}

Test(spool_model, random_linked)
{
	const struct sim_mode m = { .linked = true, ERRS };

	random_runs(&m);
}

/* Bodies of several batches and two flushes in flight: most flushes wait
 * for unflushed writes and go late. */
Test(spool_model, random_late_strict)
{
	const struct sim_mode m = {
		.linked = true, .big = true, .strict = true,
		.flush_inflight = 2, ERRS,
	};

	random_runs(&m);
}

Test(spool_model, random_late)
{
	const struct sim_mode m = {
		.linked = true, .big = true, .flush_inflight = 2, ERRS,
	};

	random_runs(&m);
}
