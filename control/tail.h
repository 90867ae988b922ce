/*
 * The tailer: follows one worker's spool as it becomes durable and turns
 * its records into queued messages (private to the control plane).
 *
 * Input: the worker's announcements (finaldot/ctlport.h), in order.
 * SEGMENT says which file the worker writes next; DURABLE(use_seq, off)
 * says every batch up to there is final, so the tailer walks the records of
 * that prefix (and the whole of every earlier segment) with the same walk
 * recovery uses (spool_walk_segment(), reading the files with pread: never
 * worker memory), and never a byte beyond it: a batch still being written
 * could be read torn, and a torn record makes a walk skip to the next
 * block. Records are assembled by the commit rule of docs/spool-format.md
 * (ENV, contiguous DATA, END with matching length and CRC); a complete
 * message goes to the queue manager. ABORTED ids, and FAILED ids with no
 * END written, are remembered (the most recent 65536) so their records are
 * dropped, whether they were walked before or after the announcement. A
 * FAILED id whose END was written (its client got 451, but all of it may
 * be on disk) is followed to that END: whole, it goes to the queue manager
 * as refused (qm_msg_refused(): never delivered, also not after a
 * restart); not whole once the walk passed that batch, it is dropped.
 *
 * A partial message (ENV seen, no END yet) holds a reference on each
 * segment it has records in, so the segment is not reclaimed under a
 * message still being written.
 *
 * What the tailer cannot queue is left for the next start's scan, never
 * reclaimed: a broken message (records missing or walked twice, an
 * envelope that does not decode, the queue manager out of memory) keeps
 * its references; a segment with records of a message whose ENV was
 * never walked keeps one (event=segment_kept); a segment whose header or
 * walk keeps failing for 10 s is passed over unsealed, with its reference
 * (event=segment_skipped). A failed read is retried from the record it
 * could not read, after the walk delay.
 */
#ifndef FINALDOT_CONTROL_TAIL_H
#define FINALDOT_CONTROL_TAIL_H

#include <stdbool.h>
#include <stdint.h>

#include "finaldot/ctlport.h"

struct cplane;
struct tail;

/* spool_root/wNN/ of worker `worker`. direct (delivery off): read the
 * segments with O_DIRECT (no delivery thread will read the bodies soon
 * after: a buffered read leaves them in the page cache for it), and walk
 * only once the worker has announced nothing for 1 s, or when asked
 * (tail_flush()): the reads would compete with its writes for the disk.
 * NULL on allocation failure. */
struct tail *tail_new(struct cplane *q, const char *spool_root, unsigned worker,
		      bool direct);
void tail_free(struct tail *t);

/* One announcement from the worker's ring. A DURABLE point is walked at
 * once only when 512 KiB or more wait behind it or it is in a later
 * segment (never when direct); otherwise by tail_tick() or tail_flush(). */
void tail_event(struct tail *t, const struct fd_ctl_event *e);

/* Walk a DURABLE point that has waited 5 ms (direct: 1 s after the last
 * one, 4 MiB per call) (true: it walked). Otherwise, when one waits,
 * lowers *next_us to the microseconds until it is due. */
bool tail_tick(struct tail *t, uint64_t now_us, uint64_t *next_us);

/* Walk what was announced, now (before answering an operator's call). */
void tail_flush(struct tail *t);

struct tail_stats {
	uint64_t walked_bytes;
	uint64_t records;
	uint64_t records_bad;
	uint64_t messages;
	uint64_t dropped; /* failed/aborted/broken messages not queued */
	uint64_t partials; /* now */
	uint64_t segments_skipped; /* header or walk unreadable: kept, the
				    * rest of it not queued */
	uint64_t segments_kept; /* with records of a message not queued
				 * (broken, or begun where the walk could not
				 * read): kept for the next start's scan */
};
void tail_get_stats(const struct tail *t, struct tail_stats *st);

#ifdef FINALDOT_FAULT_INJECTION
/* Test seam: how long an unreadable segment header is retried before the
 * segment is passed over (10 s). */
extern uint64_t tail_header_retry_us;
#endif

#endif
