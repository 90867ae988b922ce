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
 * later one says more). Only when the backlog itself is full is an
 * announcement lost, and counted: the control plane's reader then still
 * finds every message by walking to the next durable point it hears of;
 * what it may miss is one FAILED/ABORTED id (logged).
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

struct fd_ctl_port {
	struct fd_ring up;
	struct fd_ring down;
	unsigned worker;
	/* producer (worker) side only */
	unsigned n_backlog;
	uint64_t lost;
	struct fd_ctl_event backlog[FD_CTL_BACKLOG];
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
	p->lost = 0;
	return 0;
}

static inline void
fd_ctl_port_fini(struct fd_ctl_port *p)
{
	fd_ring_fini(&p->up);
	fd_ring_fini(&p->down);
}

/* Worker: push the backlog, in order, as far as the ring takes it. */
static inline void
fd_ctl_port_flush(struct fd_ctl_port *p)
{
	unsigned i = 0;

	while (i < p->n_backlog && fd_ring_push(&p->up, &p->backlog[i]))
		i++;
	if (i == 0)
		return;
	for (unsigned k = i; k < p->n_backlog; k++)
		p->backlog[k - i] = p->backlog[k];
	p->n_backlog -= i;
}

/* Worker: announce e (see the top of this file). */
static inline void
fd_ctl_port_publish(struct fd_ctl_port *p, const struct fd_ctl_event *e)
{
	if (p->n_backlog)
		fd_ctl_port_flush(p);
	if (p->n_backlog == 0 && fd_ring_push(&p->up, e))
		return;
	if (e->type == FD_CTL_DURABLE && p->n_backlog &&
	    p->backlog[p->n_backlog - 1].type == FD_CTL_DURABLE) {
		p->backlog[p->n_backlog - 1] = *e;
		return;
	}
	if (p->n_backlog == FD_CTL_BACKLOG) {
		p->lost++;
		return;
	}
	p->backlog[p->n_backlog++] = *e;
}

#endif
