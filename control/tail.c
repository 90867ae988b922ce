/*
 * The tailer (contract in tail.h). One per worker, run on the queue
 * manager's thread.
 *
 * Segments: the worker announces each segment it makes active; the tailer
 * keeps them in use order. To walk up to DURABLE(use_seq, off) it finishes
 * every earlier segment (to its size: the worker left it, and batches
 * complete in order, so all of it is final) and walks the announced one up
 * to off, resuming each walk where the last one ended. A segment walked to
 * its end with a later one announced is sealed. The walk to a DURABLE point
 * waits for WALK_BATCH octets behind it, a later segment, an INDOUBT, or
 * WALK_DELAY_US (tail_tick()), so that one read covers many group commits.
 *
 * Limits: a partial message keeps its envelope bytes and its piece list in
 * memory (no body bytes). The announcement a worker's backlog had to drop
 * (ctlport.h) can leave a partial that never completes: it keeps its
 * segments referenced (never reclaimed) until the next start; counted in
 * tail_stats.partials.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "control/qmgr.h"
#include "control/tail.h"
#include "finaldot/crc32c.h"
#include "finaldot/fsync.h"
#include "finaldot/log.h"
#include "finaldot/msgid.h"
#include "finaldot/spool_format.h"

#define WIN_LEN (1u << 20)
#define DEAD_IDS 65536u /* power of two */
/* FAILED ids whose END record was written, followed until the walk passed
 * the batch that held it (tail_event()); a write or flush must fail for
 * one to come, so few. Past this many, a FAILED id is dropped at once. */
#define FAILED_IDS 1024u
/* A DURABLE point is walked once this much is waiting behind it, or once
 * the oldest waiting one is this old (tail_tick()). A walk per group
 * commit read ~22 KiB per pread at 32 pipelining sessions (~1,300 reads a
 * second, each an I/O of its own with O_DIRECT); batched, a few hundred. */
#define WALK_BATCH (512u << 10)
#define WALK_DELAY_US 5000u
/*
 * Without delivery (tail_new()'s direct) nobody takes messages from the
 * queue but an operator's call, which walks first (tail_flush()). The
 * walk's reads then only compete with the workers' writes for the disk
 * (1 MiB messages at 32 pipelining sessions: ~20% more MB/s without them
 * during the load, docs/bench.md). So it waits until the worker has
 * announced nothing new for this long, or until it is asked. Not
 * shorter: a worker waiting for the disk (a flush, a segment being
 * zeroed) is quiet for 50-500 ms under such a load, and a walk then
 * takes the disk from it.
 */
#define WALK_QUIET_US 1000000u
#define WALK_STEP (4u << 20) /* per tail_tick() then */
/* A segment whose header cannot be read (its open failed with EMFILE, an
 * I/O error) is tried again this long, holding up the later ones; then it
 * is passed over but never sealed or given back: its messages, not
 * queued, stay on disk for the next start's scan. */
#define HEADER_RETRY_US 10000000u
#ifdef FINALDOT_FAULT_INJECTION
uint64_t tail_header_retry_us = HEADER_RETRY_US; /* tests shorten it */
#define HEADER_RETRY tail_header_retry_us
#else
#define HEADER_RETRY HEADER_RETRY_US
#endif

struct tseg {
	struct q_seg *qs;
	int dfd; /* O_DIRECT reader for the walk; -1: not open or not usable */
	bool dfd_tried; /* set from the start when the tail reads buffered */
	bool header_ok;
	bool header_read;
	uint64_t header_failed_us; /* first failed read of it (monotonic) */
	uint64_t read_failed_us;   /* first failed walk read since its last
				    * good one (monotonic), 0: none */
	bool gave_up;   /* its walk kept failing: passed over, never sealed */
	bool kept;      /* holds a reference until the next start (below) */
	uint64_t epoch;
	uint64_t size;
	uint64_t walked; /* resume point */
};

struct partial {
	uint64_t id;
	uint8_t *env;
	uint32_t env_len;
	uint64_t next_off;
	uint32_t crc;
	bool broken;
	bool failed; /* its client was answered 4xx (FAILED, its END written) */
	struct q_piece *pieces;
	size_t n_pieces, cap_pieces;
	struct q_seg *env_seg;
	struct q_seg **pin; /* every segment it has records in (grows: a
			     * 32 MiB message spans many small segments) */
	unsigned n_pin, cap_pin;
	struct partial *hnext;
};

struct tail {
	struct cplane *q;
	unsigned worker;
	bool direct; /* O_DIRECT walk reads (delivery off) */
	char wdir[4096];
	struct tseg *segs; /* announced, in use order; [0, cur) finished */
	size_t n_segs, cap_segs;
	size_t cur;
	uint8_t *win;

	struct partial **ph; /* partials by id */
	size_t ph_cap, n_partials;

	uint64_t dead[DEAD_IDS]; /* failed/aborted ids, FIFO */
	size_t dead_head;
	uint64_t *dead_set; /* open addressing over the same ids */

	/* FAILED ids being followed to their END: the batch that holds it */
	struct failed_id {
		uint64_t id, use_seq, off;
	} failed[FAILED_IDS];
	size_t n_failed;

	/* The newest DURABLE point not walked yet (pend: there is one). */
	bool pend;
	uint64_t pend_seq, pend_off;
	uint64_t pend_since_us;
	uint64_t last_durable_us; /* direct: when the last one arrived */

	struct tail_stats st;
};

static size_t
hid(uint64_t id)
{
	id ^= id >> 33;
	id *= 0xff51afd7ed558ccdull;
	id ^= id >> 33;
	return (size_t)id;
}

/* ---- failed/aborted ids ------------------------------------------------- */

/* The set holds exactly the ids in the FIFO: an id leaves the set when the
 * FIFO overwrites it (deletion with backward shift keeps probing right). */
static void
dead_set_del(struct tail *t, uint64_t id)
{
	size_t cap = 2 * DEAD_IDS, i = hid(id) & (cap - 1);

	while (t->dead_set[i] && t->dead_set[i] != id)
		i = (i + 1) & (cap - 1);
	if (!t->dead_set[i])
		return;
	t->dead_set[i] = 0;
	for (size_t j = (i + 1) & (cap - 1); t->dead_set[j];
	     j = (j + 1) & (cap - 1)) {
		size_t home = hid(t->dead_set[j]) & (cap - 1);
		/* Move j back to i if i lies on j's probe path. */
		if ((j > i && (home <= i || home > j)) ||
		    (j < i && home <= i && home > j)) {
			t->dead_set[i] = t->dead_set[j];
			t->dead_set[j] = 0;
			i = j;
		}
	}
}

static bool
dead_has(const struct tail *t, uint64_t id)
{
	size_t cap = 2 * DEAD_IDS, i = hid(id) & (cap - 1);

	while (t->dead_set[i]) {
		if (t->dead_set[i] == id)
			return true;
		i = (i + 1) & (cap - 1);
	}
	return false;
}

static void
dead_add(struct tail *t, uint64_t id)
{
	size_t cap = 2 * DEAD_IDS, i;
	uint64_t old = t->dead[t->dead_head];

	if (id == 0 || dead_has(t, id))
		return;
	if (old)
		dead_set_del(t, old);
	t->dead[t->dead_head] = id;
	t->dead_head = (t->dead_head + 1) & (DEAD_IDS - 1);
	i = hid(id) & (cap - 1);
	while (t->dead_set[i])
		i = (i + 1) & (cap - 1);
	t->dead_set[i] = id;
}

/* ---- failed ids whose END was written ---------------------------------- */

static struct failed_id *
failed_find(struct tail *t, uint64_t id)
{
	for (size_t i = 0; i < t->n_failed; i++)
		if (t->failed[i].id == id)
			return &t->failed[i];
	return NULL;
}

/* Followed no more: any record of it still to come is dropped. */
static void
failed_forget(struct tail *t, struct failed_id *f)
{
	dead_add(t, f->id);
	*f = t->failed[--t->n_failed];
}

/* ---- partial messages -------------------------------------------------- */

static struct partial **
p_slot(struct tail *t, uint64_t id)
{
	return &t->ph[hid(id) & (t->ph_cap - 1)];
}

static struct partial *
p_find(struct tail *t, uint64_t id)
{
	for (struct partial *p = *p_slot(t, id); p; p = p->hnext)
		if (p->id == id)
			return p;
	return NULL;
}

static void
p_free(struct tail *t, struct partial *p)
{
	struct partial **pp = p_slot(t, p->id);

	while (*pp && *pp != p)
		pp = &(*pp)->hnext;
	if (*pp)
		*pp = p->hnext;
	for (unsigned i = 0; i < p->n_pin; i++)
		qm_seg_unref(t->q, p->pin[i]);
	free(p->pin);
	free(p->env);
	free(p->pieces);
	free(p);
	t->n_partials--;
}

/*
 * A message the tailer could not follow (broken records, an envelope that
 * does not decode, the queue manager out of memory) may still be committed
 * on disk: the next start's scan is its way into the queue, so the
 * segments holding its records must outlive this run. Its references stay
 * (never released: a reclaim would write a new epoch over it); the
 * partial's memory goes.
 */
static void
p_keep(struct tail *t, struct partial *p)
{
	p->n_pin = 0; /* the references are not released */
	p_free(t, p);
}

/* A segment holding records of a message this run cannot queue keeps a
 * reference until the next start (above), once. */
static void
seg_keep(struct tail *t, struct tseg *ts)
{
	if (ts->kept)
		return;
	ts->kept = true;
	qm_seg_ref(t->q, ts->qs);
	t->st.segments_kept++;
	fd_log(FD_LOG_WARN, "tail",
	       "worker=%u event=segment_kept file=%08" PRIx64
	       " note=\"holds records of a message not queued: kept for the "
	       "next start's scan\"",
	       t->worker, ts->qs->file_no);
}

/* Records come in segment order: only the last pinned one can repeat. 0
 * or -ENOMEM (the caller stops the walk: retried at the next DURABLE). */
static int
p_pin(struct tail *t, struct partial *p, struct q_seg *s)
{
	if (p->n_pin && p->pin[p->n_pin - 1] == s)
		return 0;
	for (unsigned i = 0; i < p->n_pin; i++)
		if (p->pin[i] == s)
			return 0;
	if (p->n_pin == p->cap_pin) {
		unsigned cap = p->cap_pin ? p->cap_pin * 2 : 4;
		struct q_seg **n = realloc(p->pin, cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		p->pin = n;
		p->cap_pin = cap;
	}
	qm_seg_ref(t->q, s);
	p->pin[p->n_pin++] = s;
	return 0;
}

static struct partial *
p_new(struct tail *t, uint64_t id)
{
	struct partial *p = calloc(1, sizeof(*p));

	if (!p)
		return NULL;
	p->id = id;
	p->hnext = *p_slot(t, id);
	*p_slot(t, id) = p;
	t->n_partials++;
	return p;
}

/* ---- records ----------------------------------------------------------- */

/*
 * A FAILED message whose END the walk found. Whole, it is what the next
 * start's scan would find and deliver beside the copy its client sends
 * again after the 4xx: the queue manager takes it as refused, which keeps
 * it from going out now and after a restart. Not whole, no scan takes it
 * either: dropped, its segments free to be reclaimed.
 */
static void
complete_failed(struct tail *t, struct partial *p,
		const struct spool_rec_hdr *h, struct q_seg *seg)
{
	struct failed_id *f = failed_find(t, p->id);
	struct fd_envelope env;
	void *scratch = NULL;
	size_t sl;
	int r = -EINVAL;

	if (f)
		failed_forget(t, f);
	if (!p->broken && h->offset == p->next_off && h->aux == p->crc &&
	    p->env) {
		sl = spool_env_scratch_len(p->env_len);
		scratch = malloc(sl);
		if (scratch &&
		    spool_env_decode(p->env, p->env_len, &env, scratch, sl) ==
			    SPOOL_DEC_OK)
			r = qm_msg_refused(t->q, t->worker, p->id, &env,
					   h->offset, h->aux, p->pieces,
					   p->n_pieces, p->env_seg, seg);
		else if (!scratch)
			r = -ENOMEM;
		free(scratch);
		if (r != 0)
			fd_log(FD_LOG_ERR, "tail",
			       "worker=%u event=refused_not_recorded "
			       "id=%016" PRIx64 " err=%d note=\"whole on "
			       "disk: a restart before its segment is "
			       "reclaimed delivers it, beside the copy its "
			       "client sends again\"",
			       t->worker, p->id, -r);
	}
	t->st.dropped++;
	p_free(t, p);
}

/* The FAILED messages whose END batch the walk has passed without finding
 * them whole: nothing more of them comes (the worker wrote their END
 * before it announced them). */
static void
failed_expire(struct tail *t)
{
	for (size_t i = 0; i < t->n_failed;) {
		struct failed_id *f = &t->failed[i];
		bool past = true;
		struct partial *p;

		for (size_t k = 0; k < t->n_segs; k++) {
			const struct tseg *ts = &t->segs[k];
			if (ts->qs->use_seq != f->use_seq)
				continue;
			past = k < t->cur || ts->gave_up ||
			       ts->walked >= f->off;
			break;
		}
		if (!past) {
			i++;
			continue;
		}
		if ((p = p_find(t, f->id)) != NULL) {
			t->st.dropped++;
			p_free(t, p);
		}
		failed_forget(t, f); /* the last entry moved to i */
	}
}

static void
complete(struct tail *t, struct partial *p, const struct spool_rec_hdr *h,
	 struct q_seg *seg)
{
	struct fd_envelope env;
	size_t sl;
	void *scratch;
	int r;

	if (p->failed) {
		complete_failed(t, p, h, seg);
		return;
	}
	if (p->broken || h->offset != p->next_off || h->aux != p->crc ||
	    !p->env) {
		t->st.dropped++;
		fd_log(FD_LOG_WARN, "tail",
		       "worker=%u event=message_broken id=%016" PRIx64
		       " action=\"not queued now; its segments are kept for "
		       "the next start's scan\"",
		       t->worker, p->id);
		p_keep(t, p);
		return;
	}
	sl = spool_env_scratch_len(p->env_len);
	scratch = malloc(sl);
	if (!scratch ||
	    spool_env_decode(p->env, p->env_len, &env, scratch, sl) !=
		    SPOOL_DEC_OK) {
		free(scratch);
		t->st.dropped++;
		p_keep(t, p);
		return;
	}
	r = qm_msg_add(t->q, t->worker, p->id, &env, h->offset, h->aux,
		       p->pieces, p->n_pieces, p->env_seg, seg);
	free(scratch);
	if (r == 0) {
		t->st.messages++;
		p_free(t, p);
	} else {
		t->st.dropped++;
		p_keep(t, p);
	}
}

struct walk_ctx {
	struct tail *t;
	struct tseg *ts;
};

static int
on_rec(void *ctx, const struct spool_walk_rec *r)
{
	struct walk_ctx *wc = ctx;
	struct tail *t = wc->t;
	struct q_seg *seg = wc->ts->qs;
	struct partial *p = p_find(t, r->h.msgid);

	t->st.records++;
	if (dead_has(t, r->h.msgid)) {
		if (p)
			p_free(t, p);
		return 0;
	}
	switch ((enum spool_rec_type)r->h.type) {
	case SPOOL_REC_ENV:
		if (p) {
			p->broken = true;
			return p_pin(t, p, seg);
		}
		p = p_new(t, r->h.msgid);
		if (!p)
			return -ENOMEM;
		p->failed = t->n_failed && failed_find(t, r->h.msgid);
		p->env = malloc(r->h.len ? r->h.len : 1);
		if (!p->env)
			return -ENOMEM;
		memcpy(p->env, r->payload, r->h.len);
		p->env_len = r->h.len;
		p->env_seg = seg;
		return p_pin(t, p, seg);
	case SPOOL_REC_DATA:
		if (!p) {
			/* Its ENV was never walked: in a segment passed over,
			 * or in a stretch a read never got (after a start the
			 * worker writes a new epoch, so no message of the last
			 * run continues here). Not queued now. A FAILED one
			 * (its ENV in a write that failed) is queued never. */
			if (!t->n_failed || !failed_find(t, r->h.msgid))
				seg_keep(t, wc->ts);
			return 0;
		}
		if (r->h.offset != p->next_off) {
			p->broken = true;
			return p_pin(t, p, seg);
		}
		if (p->n_pieces == p->cap_pieces) {
			size_t cap = p->cap_pieces ? p->cap_pieces * 2 : 4;
			struct q_piece *n =
				realloc(p->pieces, cap * sizeof(*n));
			if (!n)
				return -ENOMEM;
			p->pieces = n;
			p->cap_pieces = cap;
		}
		p->pieces[p->n_pieces++] = (struct q_piece){
			.seg = seg,
			.file_off = r->off + SPOOL_REC_HDR_LEN,
			.len = r->h.len,
		};
		p->crc = spool_crc32c_combine(p->crc, r->payload_crc,
					      r->h.len);
		p->next_off += r->h.len;
		return p_pin(t, p, seg);
	case SPOOL_REC_END:
		if (!p) {
			/* as DATA above */
			if (!t->n_failed || !failed_find(t, r->h.msgid))
				seg_keep(t, wc->ts);
			return 0;
		}
		if (p_pin(t, p, seg) != 0)
			return -ENOMEM;
		complete(t, p, &r->h, seg);
		return 0;
	}
	return 0;
}

/* ---- segments ---------------------------------------------------------- */

static int
read_header(struct tail *t, struct tseg *ts)
{
	uint8_t hb[SPOOL_SEG_HDR_LEN];
	struct spool_seg_hdr h;
	int fd;

	ts->header_read = true;
	if (ts->qs->fd < 0) /* its open failed (EMFILE...): once more */
		ts->qs->fd = fd_open_noatime(ts->qs->path,
					     O_RDONLY | O_CLOEXEC);
	fd = ts->qs->fd;
	if (fd < 0 ||
	    spool_read_fd(&fd, 0, hb, sizeof(hb)) != (long)sizeof(hb) ||
	    spool_seg_hdr_decode(hb, sizeof(hb), &h) != SPOOL_DEC_OK ||
	    h.use_seq != ts->qs->use_seq) {
		if (!ts->header_failed_us)
			fd_log(FD_LOG_ERR, "tail",
			       "worker=%u event=segment_unreadable "
			       "file=%08" PRIx64 " note=\"retried for %u s\"",
			       t->worker, ts->qs->file_no,
			       (unsigned)(HEADER_RETRY / 1000000u));
		if (!ts->header_failed_us)
			ts->header_failed_us = fd_now_monotonic_us();
		ts->header_read = false; /* tried again at the next walk */
		return -EIO;
	}
	ts->header_ok = true;
	ts->epoch = h.epoch;
	ts->size = h.size;
	return 0;
}

/*
 * The walk reads what the worker wrote with O_DIRECT, so none of it is in
 * the page cache: a buffered pread makes the kernel read it from the device
 * into new page-cache pages and copy it out, about a millisecond of system
 * time per MiB (10 us per 4 KiB message), more than the worker spent
 * writing it. With delivery on that is not waste: a delivery thread reads
 * the same body milliseconds later and finds it in the cache (read direct
 * here, the delivery threads paid the device read instead, and more: 12 ->
 * 33 us per 4 KiB message). With delivery off nothing in this process reads
 * the bodies again, so the walk reads direct, into the window itself. Its
 * reads qualify: the window is block-aligned and every read starts on a
 * block and ends on one (durable points and segment sizes are multiples of
 * SPOOL_BLOCK). Where the filesystem refuses O_DIRECT (tmpfs) or a read is
 * refused (EINVAL), the segment's ordinary descriptor is used instead.
 */
static long
tail_read(void *ctx, uint64_t off, void *buf, size_t n)
{
	struct tseg *ts = ctx;
	long r;

	if (!ts->dfd_tried) {
		ts->dfd_tried = true;
		ts->dfd = fd_open_noatime(ts->qs->path,
					  O_RDONLY | O_DIRECT | O_CLOEXEC);
	}
	if (ts->dfd >= 0 && off % SPOOL_BLOCK == 0 && n % SPOOL_BLOCK == 0) {
		r = spool_read_fd(&ts->dfd, off, buf, n);
		if (r != -EINVAL)
			return r;
		close(ts->dfd);
		ts->dfd = -1;
	}
	return spool_read_fd(&ts->qs->fd, off, buf, n);
}

static void
tseg_done(struct tail *t, struct tseg *ts)
{
	if (ts->dfd >= 0)
		close(ts->dfd);
	ts->dfd = -1;
	qm_seg_unref(t->q, ts->qs);
}

enum walk_res {
	WALK_DONE,   /* up to limit, or no header (yet) to walk by */
	WALK_BUDGET, /* the budget stopped it short of limit */
	WALK_FAILED, /* a read failed (or memory ran out): retried later */
};

/* Walk ts from where it stopped up to `limit`; with a budget (octets, 0:
 * none), stop at the first record boundary that far on. A failed read
 * leaves the resume point at the record it could not read: what came
 * before it was handed on and is not walked twice (a second ENV would
 * break its message). */
static enum walk_res
walk_to(struct tail *t, struct tseg *ts, uint64_t limit, uint64_t budget)
{
	struct walk_ctx wc = {.t = t, .ts = ts};
	struct spool_walk w;
	int r;

	if (!ts->header_read)
		read_header(t, ts);
	if (!ts->header_ok || ts->gave_up)
		return WALK_DONE;
	if (limit > ts->size)
		limit = ts->size;
	if (limit <= ts->walked)
		return WALK_DONE;
	memset(&w, 0, sizeof(w));
	w.read = tail_read;
	w.read_ctx = ts;
	w.size = limit;
	w.start = ts->walked;
	w.epoch = ts->epoch;
	w.win = t->win;
	w.win_len = WIN_LEN;
	w.stop_at = budget ? ts->walked + budget : 0;
	r = spool_walk_segment(&w, on_rec, &wc);
	t->st.walked_bytes += w.end > ts->walked ? w.end - ts->walked : 0;
	t->st.records_bad += w.records_bad;
	if (w.end > ts->walked)
		ts->walked = w.end;
	if (r < 0) {
		if (!ts->read_failed_us) {
			ts->read_failed_us = fd_now_monotonic_us();
			fd_log(FD_LOG_ERR, "tail",
			       "worker=%u event=walk_failed file=%08" PRIx64
			       " off=%" PRIu64 " err=%d note=\"retried for "
			       "%u s\"",
			       t->worker, ts->qs->file_no, w.end, -r,
			       (unsigned)(HEADER_RETRY / 1000000u));
		}
		return WALK_FAILED;
	}
	ts->read_failed_us = 0;
	/* Batches end on block boundaries, so a walk to a durable point
	 * stops at it (or before, mid-header, to be resumed). A walk that
	 * ran out of room for a record header short of the end is done. */
	return w.stop_at && w.end >= w.stop_at && w.end < limit ? WALK_BUDGET
								: WALK_DONE;
}

/* A segment whose walk kept failing for HEADER_RETRY: the rest of it is
 * passed over until the next start, which scans it; it keeps its
 * reference (never reclaimed), and the records of messages that continue
 * past it keep theirs (seg_keep()). */
static bool
walk_give_up(struct tail *t, struct tseg *ts)
{
	if (fd_now_monotonic_us() - ts->read_failed_us < HEADER_RETRY)
		return false;
	fd_log(FD_LOG_ERR, "tail",
	       "worker=%u event=segment_skipped file=%08" PRIx64
	       " off=%" PRIu64 " action=\"the rest of its messages are not "
	       "queued until the next start, which scans it; the segment is "
	       "kept\"",
	       t->worker, ts->qs->file_no, ts->walked);
	t->st.segments_skipped++;
	ts->gave_up = true;
	return true;
}

static struct tseg *
seg_find(struct tail *t, uint64_t use_seq)
{
	for (size_t i = t->cur; i < t->n_segs; i++)
		if (t->segs[i].qs->use_seq == use_seq)
			return &t->segs[i];
	return NULL;
}

static void
on_segment(struct tail *t, uint64_t file_no, uint64_t use_seq)
{
	struct q_seg *qs;

	if (seg_find(t, use_seq))
		return;
	if (t->n_segs == t->cap_segs) {
		size_t cap = t->cap_segs ? t->cap_segs * 2 : 8;
		struct tseg *n = realloc(t->segs, cap * sizeof(*n));
		if (!n)
			return;
		t->segs = n;
		t->cap_segs = cap;
	}
	qs = qm_seg_get(t->q, t->worker, file_no, use_seq);
	if (!qs)
		return;
	qm_seg_ref(t->q, qs); /* ours while we follow it */
	t->segs[t->n_segs++] =
		(struct tseg){.qs = qs, .dfd = -1, .dfd_tried = !t->direct};
}

/* A walk that failed is tried again by tail_tick(), not at once: after
 * the delay a new point would wait (5 ms; direct, 1 s). */
static void
pend_retry(struct tail *t)
{
	uint64_t now = fd_now_monotonic_us();

	t->pend = true;
	t->pend_since_us = now;
	t->last_durable_us = now;
}

/* Walk up to the pending DURABLE point; with a budget (octets, 0: none)
 * only about that much, the point staying pending for the next call. */
static void
catch_up_budget(struct tail *t, uint64_t budget)
{
	struct tseg *target;

	if (!t->pend)
		return;
	t->pend = false;
	target = seg_find(t, t->pend_seq);
	if (!target) {
		fd_log(FD_LOG_ERR, "tail",
		       "worker=%u event=unknown_segment use_seq=%" PRIu64,
		       t->worker, t->pend_seq);
		return;
	}
	while (&t->segs[t->cur] != target) {
		struct tseg *ts = &t->segs[t->cur];
		uint64_t before = ts->walked, used;
		enum walk_res wr = walk_to(t, ts, UINT64_MAX, budget);

		if (wr == WALK_BUDGET) {
			t->pend = true; /* the rest at the next call */
			return;
		}
		if (wr == WALK_FAILED && !walk_give_up(t, ts)) {
			pend_retry(t);
			return;
		}
		if (ts->gave_up) {
			if (ts->dfd >= 0)
				close(ts->dfd);
			ts->dfd = -1; /* our reference stays: never reclaimed */
			t->cur++;
			continue;
		}
		if (!ts->header_ok) {
			/* Never sealed: sealed with no reference it would go
			 * back to its worker, a new epoch over acknowledged
			 * mail nobody queued. */
			if (fd_now_monotonic_us() - ts->header_failed_us <
			    HEADER_RETRY) {
				pend_retry(t);
				return;
			}
			fd_log(FD_LOG_ERR, "tail",
			       "worker=%u event=segment_skipped file=%08" PRIx64
			       " action=\"its messages are not queued until "
			       "the next start, which scans it; the segment is "
			       "kept\"",
			       t->worker, ts->qs->file_no);
			t->st.segments_skipped++;
			if (ts->dfd >= 0)
				close(ts->dfd);
			ts->dfd = -1; /* our reference stays: never reclaimed */
			t->cur++;
			continue;
		}
		used = ts->walked - before;
		qm_seg_seal(t->q, ts->qs);
		tseg_done(t, ts); /* a reference it kept (seg_keep) stays */
		t->cur++;
		if (budget) {
			if (used >= budget) {
				t->pend = true;
				return;
			}
			budget -= used;
		}
	}
	switch (walk_to(t, target, t->pend_off, budget)) {
	case WALK_BUDGET:
		t->pend = true;
		break;
	case WALK_FAILED:
		/* the segment being written: retried until it gives up, then
		 * passed over when a later one is announced (above) */
		if (!walk_give_up(t, target))
			pend_retry(t);
		break;
	case WALK_DONE:
		break;
	}
	/* Compact the finished prefix now and then. */
	if (t->cur > 64) {
		memmove(t->segs, t->segs + t->cur,
			(t->n_segs - t->cur) * sizeof(*t->segs));
		t->n_segs -= t->cur;
		t->cur = 0;
	}
}

/* A walk, then the FAILED ids it passed. */
static void
walk_pending(struct tail *t, uint64_t budget)
{
	catch_up_budget(t, budget);
	if (t->n_failed)
		failed_expire(t);
}

static void
catch_up(struct tail *t)
{
	walk_pending(t, 0);
}

/* Remember the point; walk now only when enough waits behind it or it is
 * in a later segment than the one being walked (so earlier ones are
 * sealed at once). */
static void
on_durable(struct tail *t, uint64_t use_seq, uint64_t off)
{
	const struct tseg *ts = t->cur < t->n_segs ? &t->segs[t->cur] : NULL;
	uint64_t now = fd_now_monotonic_us();

	if (!t->pend)
		t->pend_since_us = now;
	t->pend = true;
	t->pend_seq = use_seq;
	t->pend_off = off;
	t->last_durable_us = now;
	if (t->direct)
		return; /* until the worker is quiet, or asked (above) */
	if (!ts || ts->qs->use_seq != use_seq ||
	    off >= ts->walked + WALK_BATCH)
		catch_up(t);
}

bool
tail_tick(struct tail *t, uint64_t now_us, uint64_t *next_us)
{
	uint64_t due;

	if (!t->pend)
		return false;
	due = t->direct ? t->last_durable_us + WALK_QUIET_US
			: t->pend_since_us + WALK_DELAY_US;
	if (now_us >= due) {
		/* direct: a step at a time, so that a worker busy again
		 * (a new DURABLE moves `due` on) gets the disk back soon */
		walk_pending(t, t->direct ? WALK_STEP : 0);
		return true;
	}
	if (due - now_us < *next_us)
		*next_us = due - now_us;
	return false;
}

void
tail_flush(struct tail *t)
{
	catch_up(t);
}

void
tail_event(struct tail *t, const struct fd_ctl_event *e)
{
	struct partial *p;

	/* An INDOUBT id is looked up in the queue: walk what came before it
	 * (FAILED and ABORTED ids are dropped whether walked yet or not). */
	if (e->type == FD_CTL_INDOUBT)
		catch_up(t);
	switch ((enum fd_ctl_ev_type)e->type) {
	case FD_CTL_SEGMENT:
		on_segment(t, e->file_no, e->use_seq);
		break;
	case FD_CTL_DURABLE:
		on_durable(t, e->use_seq, e->off);
		break;
	case FD_CTL_FAILED:
		/* Its END written (off: the end of the batch that holds it):
		 * followed to it, in case all of it reached the disk. */
		if (e->off && t->n_failed < FAILED_IDS && e->msgid &&
		    !dead_has(t, e->msgid) && !failed_find(t, e->msgid)) {
			t->failed[t->n_failed++] = (struct failed_id){
				.id = e->msgid,
				.use_seq = e->use_seq,
				.off = e->off,
			};
			if ((p = p_find(t, e->msgid)) != NULL)
				p->failed = true;
			break;
		}
		/* no END written (or no room to follow it): dropped */
		/* fallthrough */
	case FD_CTL_ABORTED:
		dead_add(t, e->msgid);
		if ((p = p_find(t, e->msgid)) != NULL) {
			t->st.dropped++;
			p_free(t, p);
		}
		break;
	case FD_CTL_RECLAIMED:
		qm_seg_reclaimed(t->q, t->worker, e->file_no, e->use_seq);
		break;
	case FD_CTL_INDOUBT:
		qm_indoubt(t->q, t->worker, e->msgid);
		break;
	default:
		fd_log(FD_LOG_ERR, "tail", "worker=%u event=bad_event type=%u",
		       t->worker, e->type);
		break;
	}
}

struct tail *
tail_new(struct cplane *q, const char *spool_root, unsigned worker,
	 bool direct)
{
	struct tail *t = calloc(1, sizeof(*t));

	if (!t)
		return NULL;
	t->q = q;
	t->worker = worker;
	t->direct = direct;
	snprintf(t->wdir, sizeof(t->wdir), "%s/w%02x", spool_root, worker);
	t->win = aligned_alloc(SPOOL_BLOCK, WIN_LEN); /* O_DIRECT reads */
	t->ph_cap = 4096;
	t->ph = calloc(t->ph_cap, sizeof(*t->ph));
	t->dead_set = calloc(2 * DEAD_IDS, sizeof(*t->dead_set));
	if (!t->win || !t->ph || !t->dead_set) {
		tail_free(t);
		return NULL;
	}
	return t;
}

void
tail_free(struct tail *t)
{
	if (!t)
		return;
	for (size_t i = 0; t->ph && i < t->ph_cap; i++)
		while (t->ph[i])
			p_free(t, t->ph[i]);
	for (size_t i = t->cur; i < t->n_segs; i++)
		tseg_done(t, &t->segs[i]);
	free(t->segs);
	free(t->ph);
	free(t->dead_set);
	free(t->win);
	free(t);
}

void
tail_get_stats(const struct tail *t, struct tail_stats *st)
{
	*st = t->st;
	st->partials = t->n_partials;
}
