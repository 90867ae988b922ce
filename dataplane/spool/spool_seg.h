/*
 * Segment files and the preparer thread that keeps zeroed spares ready
 * (private to the spool). See spool_seg.c.
 */
#ifndef FINALDOT_SPOOL_SEG_H
#define FINALDOT_SPOOL_SEG_H

#include <sched.h>
#include <stdbool.h>
#include <stdint.h>

/* One segment in use by the worker. Owned by the worker once taken. */
struct spool_seg {
	struct spool_seg *next; /* preparer's ready list */
	int fd;                 /* O_RDWR | O_DIRECT */
	uint64_t file_no;
	uint64_t use_seq;
	uint64_t epoch; /* secret: never logged */
	uint64_t size;
	uint64_t off;      /* worker: where the next batch goes */
	unsigned inflight; /* worker: closed batches not yet completed */
	bool retired;      /* worker: no longer active */
};

struct spool_prep;

/*
 * Start the preparer for wdir (created if missing): it first classifies the
 * segments already there (those holding no valid record become spares; one
 * whose header is damaged stays sealed if it holds any intact record) and
 * writes the segment list (spool_ledger.h), then keeps `spares` zeroed
 * segments of seg_size ready. min_free: no new segment file while the
 * filesystem would be left with less than min(min_free, a tenth of its
 * size) available (-ENOSPC, as a full disk; reused files need no room);
 * 0: none. no_space: make nothing, report -ENOSPC (fault injection). cpus: the thread's affinity
 * (NULL: inherited). Returns NULL with *err set.
 */
struct spool_prep *spool_prep_start(const char *wdir, unsigned worker,
				    uint64_t seg_size, unsigned spares,
				    uint64_t max_segments, uint64_t min_free,
				    bool no_space,
				    bool falloc, const cpu_set_t *cpus,
				    int wake_fd, int *err);
/*
 * Room events so far (a relaxed read): it grows each time a spare joins
 * the ready list, which is when spool room may come back, and when the
 * preparer finds the disk full (ENOSPC, the spool_min_free reserve), so
 * that sessions waiting for a segment are answered 452 at once. The
 * preparer also adds 1 to the eventfd wake_fd (if >= 0) each time, so a
 * worker blocked in its ring wakes up (issue 10: a session waiting for
 * room was otherwise woken only by a write completion).
 */
uint64_t spool_prep_published(const struct spool_prep *pp);
/* The last segment could not be made for want of space (ENOSPC, EDQUOT,
 * the spool_min_free reserve) and none has been made since. */
bool spool_prep_out_of_space(struct spool_prep *pp);
/* Blocks until one spare is ready (0) or the preparer failed (-errno). */
int spool_prep_wait_ready(struct spool_prep *pp);
/* Non-blocking: 0 and *out, -EAGAIN (not ready yet), -ENOSPC or -errno. */
int spool_prep_take(struct spool_prep *pp, struct spool_seg **out);
/* Spares ready now (a relaxed read: for spool_room()). */
unsigned spool_prep_ready(const struct spool_prep *pp);
/*
 * Hand a sealed segment back (spool_reclaim()): the preparer writes it a
 * new header (new epoch, next use sequence) and fsyncs it, then keeps it as
 * a spare (ready, or in reserve up to `spares` more) or deletes it. The
 * file is checked first: its header must still say use_seq. Non-blocking.
 */
int spool_prep_recycle(struct spool_prep *pp, uint64_t file_no,
		       uint64_t use_seq);
/* Segments recycle() finished since the last call (up to max): their
 * file_no/use_seq (the old one) pairs, for the RECLAIMED announcement.
 * Non-blocking; returns the count. */
unsigned spool_prep_recycled(struct spool_prep *pp, uint64_t *file_no,
			     uint64_t *use_seq, unsigned max);
/* A relaxed read: are there recycled segments to report? */
bool spool_prep_has_recycled(const struct spool_prep *pp);

/* Stops and joins the thread; untaken spares stay on disk as spares. */
void spool_prep_stop(struct spool_prep *pp);
/* The worker's batch writes in flight now (the preparer's zeroing gives
 * way to them). Worker thread; a relaxed store. */
void spool_prep_flights(struct spool_prep *pp, unsigned n);
#ifdef FINALDOT_FAULT_INJECTION
/* Test seam ("prep-slow:MS"): sleep ms per chunk of zeros. */
void spool_prep_set_slow(struct spool_prep *pp, unsigned ms);
#endif

void spool_seg_free(struct spool_seg *s);

#endif
