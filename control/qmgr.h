/*
 * The queue manager (private to the control plane): owns the queue
 * (queue.h), the per-destination scheduler, the delivery log's in-memory
 * state and the segment references, on one thread. See qmgr.c for the
 * scheduling rules.
 *
 * The functions below that take a struct cplane and are not marked otherwise
 * run on the queue manager's thread only (the tailer runs there too).
 */
#ifndef FINALDOT_CONTROL_QMGR_H
#define FINALDOT_CONTROL_QMGR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "control/queue.h"
#include "finaldot/envelope.h"

struct cplane;

/* The segment of worker/use_seq, made (and its file opened) if new. */
struct q_seg *qm_seg_get(struct cplane *q, unsigned worker, uint64_t file_no,
			 uint64_t use_seq);
void qm_seg_ref(struct cplane *q, struct q_seg *s);
void qm_seg_unref(struct cplane *q, struct q_seg *s);
/* A worker says msgid's 250 may not have reached its client. */
void qm_indoubt(struct cplane *q, unsigned worker, uint64_t msgid);
/* The tailer walked all of it and the worker writes elsewhere. */
void qm_seg_seal(struct cplane *q, struct q_seg *s);
/* RECLAIMED: the segment has a new epoch. */
void qm_seg_reclaimed(struct cplane *q, unsigned worker, uint64_t file_no,
		      uint64_t use_seq);

/*
 * A committed message found in the spool (at start by the scan, later by a
 * tailer). Everything is copied; the message takes a reference on each
 * distinct segment of its pieces and on env_seg/end_seg. 0 or -ENOMEM.
 */
int qm_msg_add(struct cplane *q, unsigned worker, uint64_t id,
	       const struct fd_envelope *env, uint64_t body_len,
	       uint32_t body_crc, const struct q_piece *pieces,
	       size_t n_pieces, struct q_seg *env_seg, struct q_seg *end_seg);

/*
 * A message the spool announced FAILED (its client was answered 4xx and
 * will send it again) that the tailer found whole on disk: it must never
 * be delivered, also not after a restart, whose scan would find it whole.
 * Queued finished: every recipient DELETED in the delivery log (flushed at
 * once) and kept, like any finished message, until its segments are
 * reclaimed, so that checkpoints remember it as long as they must.
 * Arguments and result as qm_msg_add().
 */
int qm_msg_refused(struct cplane *q, unsigned worker, uint64_t id,
		   const struct fd_envelope *env, uint64_t body_len,
		   uint32_t body_crc, const struct q_piece *pieces,
		   size_t n_pieces, struct q_seg *env_seg,
		   struct q_seg *end_seg);

#endif
