/*
 * The port between one worker and the control plane: two single-producer
 * single-consumer rings and nothing else: the control plane never touches
 * worker state, and a worker never waits for the control plane.
 *
 *   up   (worker -> control): the spool's announcements (spool.h): a
 *        segment became active, everything up to an offset is durable, a
 *        message failed or was aborted, a segment was reclaimed.
 *   down (control -> worker): "segment (file_no, use_seq) is finished".
 *
 * The worker never blocks on the port. An announcement the ring refuses
 * waits in a small backlog on the worker's side, in order, and is retried
 * on the next announcement and on every fd_ctl_port_flush(); a DURABLE
 * announcement replaces the DURABLE before it at the backlog's end (the
 * later one says more). When the backlog itself is full (the control
 * plane stalled for many seconds under load):
 *   - a DURABLE waits beside it (the newest one only: it covers every
 *     earlier point) and joins its end once there is room;
 *   - a SEGMENT or RECLAIMED goes into a reserve past the backlog's end
 *     (after that waiting DURABLE, so the order stays the worker's). The
 *     reader cannot do without them: a segment it never heard of would be
 *     skipped by its walk, with every message in it, until the next start;
 *     a reclaim it never heard of keeps the segment's objects forever.
 *     There is one of each per segment written, so FD_CTL_RESERVE of them
 *     span gigabytes of mail;
 *   - a FAILED, ABORTED or INDOUBT id is lost, and counted (logged at
 *     exit): a message answered 451 may then be delivered if its records
 *     reached the disk (a duplicate once resent, never a loss), an
 *     aborted one's partial pins its segments until the next start
 *     (tail.c), an in-doubt resend is delivered instead of suppressed.
 */
#ifndef FINALDOT_CTLPORT_H
#define FINALDOT_CTLPORT_H

#include <stdint.h>

#include "finaldot/compiler.h"
#include "finaldot/ring.h"

/* Same values as enum spool_an_type. */
enum fd_ctl_ev_type {
	FD_CTL_SEGMENT = 1,
	FD_CTL_DURABLE = 2,
	FD_CTL_FAILED = 3,
	FD_CTL_ABORTED = 4,
	FD_CTL_RECLAIMED = 5,
	/* msgid's 250 may not have reached the client: its connection ended
	 * with the reply's bytes unacknowledged (RFC 1047) */
	FD_CTL_INDOUBT = 6,
};

struct fd_ctl_event {
	uint32_t type; /* enum fd_ctl_ev_type */
	uint32_t reserved;
	uint64_t file_no;
	uint64_t use_seq;
	uint64_t off;
	uint64_t msgid;
};

struct fd_ctl_reclaim {
	uint64_t file_no;
	uint64_t use_seq;
};

#define FD_CTL_UP_ENTRIES (1u << 16)
#define FD_CTL_DOWN_ENTRIES (1u << 10)
#define FD_CTL_BACKLOG 4096u
#define FD_CTL_RESERVE 256u

struct fd_ctl_port {
	struct fd_ring up;
	struct fd_ring down;
	unsigned worker;
	/* producer (worker) side only */
	unsigned n_backlog; /* <= FD_CTL_BACKLOG, + FD_CTL_RESERVE when full */
	bool has_late;      /* late: the newest DURABLE, the backlog full */
	uint64_t lost;
	struct fd_ctl_event late;
	struct fd_ctl_event backlog[FD_CTL_BACKLOG + FD_CTL_RESERVE];
} fd_cache_aligned;

static inline int
fd_ctl_port_init(struct fd_ctl_port *p, unsigned worker)
{
	int r = fd_ring_init(&p->up, FD_CTL_UP_ENTRIES,
			     sizeof(struct fd_ctl_event));
	if (r)
		return r;
	r = fd_ring_init(&p->down, FD_CTL_DOWN_ENTRIES,
			 sizeof(struct fd_ctl_reclaim));
	if (r) {
		fd_ring_fini(&p->up);
		return r;
	}
	p->worker = worker;
	p->n_backlog = 0;
	p->has_late = false;
	p->lost = 0;
	return 0;
}

static inline void
fd_ctl_port_fini(struct fd_ctl_port *p)
{
	fd_ring_fini(&p->up);
	fd_ring_fini(&p->down);
}

/* Worker: whether announcements wait for room in the ring. */
static inline bool
fd_ctl_port_pending(const struct fd_ctl_port *p)
{
	return p->n_backlog || p->has_late;
}

/* Worker: push the backlog, in order, as far as the ring takes it; the
 * waiting DURABLE joins the backlog's end once there is room. */
static inline void
fd_ctl_port_flush(struct fd_ctl_port *p)
{
	unsigned i = 0;

	while (i < p->n_backlog && fd_ring_push(&p->up, &p->backlog[i]))
		i++;
	if (i) {
		for (unsigned k = i; k < p->n_backlog; k++)
			p->backlog[k - i] = p->backlog[k];
		p->n_backlog -= i;
	}
	if (p->has_late && p->n_backlog < FD_CTL_BACKLOG) {
		p->has_late = false;
		if (p->n_backlog || !fd_ring_push(&p->up, &p->late))
			p->backlog[p->n_backlog++] = p->late;
	}
}

/* Worker: announce e (see the top of this file). */
static inline void
fd_ctl_port_publish(struct fd_ctl_port *p, const struct fd_ctl_event *e)
{
	if (fd_ctl_port_pending(p))
		fd_ctl_port_flush(p);
	if (!fd_ctl_port_pending(p) && fd_ring_push(&p->up, e))
		return;
	if (e->type == FD_CTL_DURABLE) {
		if (p->has_late) {
			p->late = *e;
		} else if (p->n_backlog && p->backlog[p->n_backlog - 1].type ==
						   FD_CTL_DURABLE) {
			p->backlog[p->n_backlog - 1] = *e;
		} else if (p->n_backlog < FD_CTL_BACKLOG) {
			p->backlog[p->n_backlog++] = *e;
		} else {
			p->late = *e;
			p->has_late = true;
		}
		return;
	}
	if (p->n_backlog < FD_CTL_BACKLOG && !p->has_late) {
		p->backlog[p->n_backlog++] = *e;
		return;
	}
	if (e->type != FD_CTL_SEGMENT && e->type != FD_CTL_RECLAIMED) {
		p->lost++;
		return;
	}
	if (p->n_backlog + p->has_late + 1 > FD_CTL_BACKLOG + FD_CTL_RESERVE) {
		p->lost++;
		return;
	}
	if (p->has_late) {
		p->backlog[p->n_backlog++] = p->late;
		p->has_late = false;
	}
	p->backlog[p->n_backlog++] = *e;
}

#endif
