/*
 * The worker -> control plane port (finaldot/ctlport.h) when the control
 * plane stops reading: the ring fills, then the backlog; what must still
 * arrive, in the worker's order, once it reads again.
 */
#include <criterion/criterion.h>
#include <stdlib.h>

#include "finaldot/ctlport.h"

static struct fd_ctl_port *port;

static void
setup(void)
{
	port = aligned_alloc(64, sizeof(*port));
	cr_assert_not_null(port);
	cr_assert_eq(fd_ctl_port_init(port, 0), 0);
}

static void
teardown(void)
{
	fd_ctl_port_fini(port);
	free(port);
}

TestSuite(ctlport, .init = setup, .fini = teardown);

static void
publish(uint32_t type, uint64_t use_seq, uint64_t off, uint64_t msgid)
{
	struct fd_ctl_event e = {
		.type = type, .file_no = use_seq, .use_seq = use_seq,
		.off = off, .msgid = msgid};

	fd_ctl_port_publish(port, &e);
}

/* Everything the reader gets from now on, after the worker's flushes. */
static size_t
drain(struct fd_ctl_event *out, size_t cap)
{
	size_t n = 0;
	struct fd_ctl_event e;

	for (int round = 0; round < 64; round++) {
		fd_ctl_port_flush(port);
		while (fd_ring_pop(&port->up, &e)) {
			cr_assert_lt(n, cap);
			out[n++] = e;
		}
		if (!fd_ctl_port_pending(port))
			break;
	}
	cr_assert(!fd_ctl_port_pending(port), "announcements still wait");
	return n;
}

/* A DURABLE's point may only move forward; a SEGMENT comes before any
 * DURABLE in it. */
static void
check_order(const struct fd_ctl_event *ev, size_t n)
{
	uint64_t seq = 0, off = 0, known = 0;

	for (size_t i = 0; i < n; i++) {
		if (ev[i].type == FD_CTL_SEGMENT) {
			cr_assert_gt(ev[i].use_seq, known, "segments in order");
			known = ev[i].use_seq;
		} else if (ev[i].type == FD_CTL_DURABLE) {
			cr_assert_leq(ev[i].use_seq, known,
				      "DURABLE in a segment not announced "
				      "(event %zu)", i);
			cr_assert(ev[i].use_seq > seq ||
				  (ev[i].use_seq == seq && ev[i].off >= off),
				  "DURABLE moved back at event %zu", i);
			seq = ev[i].use_seq;
			off = ev[i].off;
		}
	}
}

static struct fd_ctl_event got[FD_CTL_UP_ENTRIES + FD_CTL_BACKLOG +
			       FD_CTL_RESERVE + 16];

Test(ctlport, stalled_reader_keeps_segments_and_the_last_durable)
{
	uint64_t seq = 1, off = 0, id = 1;
	const uint64_t segs_while_full = 40;
	size_t n, n_seg = 0, n_failed = 0;

	publish(FD_CTL_SEGMENT, seq, 0, 0);
	/* The reader is stalled: fill the ring and the backlog with FAILED
	 * ids and DURABLE points (alternating, so none coalesce). */
	while (port->n_backlog < FD_CTL_BACKLOG) {
		publish(FD_CTL_FAILED, 0, 0, id++);
		off += 4096;
		publish(FD_CTL_DURABLE, seq, off, 0);
	}
	/* Full: the worker goes on through 40 more segments. */
	for (uint64_t k = 0; k < segs_while_full; k++) {
		publish(FD_CTL_FAILED, 0, 0, id++);
		off += 4096;
		publish(FD_CTL_DURABLE, seq, off, 0);
		seq++;
		off = 0;
		publish(FD_CTL_SEGMENT, seq, 0, 0);
		publish(FD_CTL_RECLAIMED, seq - 1, 0, 0);
		off += 4096;
		publish(FD_CTL_DURABLE, seq, off, 0);
	}
	cr_assert_gt(port->lost, 0, "the case never filled the backlog");
	n = drain(got, sizeof(got) / sizeof(got[0]));
	check_order(got, n);
	for (size_t i = 0; i < n; i++) {
		n_seg += got[i].type == FD_CTL_SEGMENT;
		n_failed += got[i].type == FD_CTL_FAILED;
	}
	/* Every segment, every reclaim and the last point arrive; only
	 * FAILED ids were dropped. */
	cr_assert_eq(n_seg, segs_while_full + 1, "segments: %zu", n_seg);
	for (uint64_t s = 1; s <= segs_while_full; s++) {
		bool found = false;
		for (size_t i = 0; i < n && !found; i++)
			found = got[i].type == FD_CTL_RECLAIMED &&
				got[i].use_seq == s;
		cr_assert(found, "RECLAIMED of segment %lu lost",
			  (unsigned long)s);
	}
	cr_assert_eq(got[n - 1].type, FD_CTL_DURABLE);
	cr_assert_eq(got[n - 1].use_seq, seq);
	cr_assert_eq(got[n - 1].off, off);
	cr_assert_eq(n_failed + port->lost, id - 1,
		     "every FAILED arrived or was counted");
}

Test(ctlport, durable_waiting_beside_a_full_backlog_is_not_lost)
{
	uint64_t id = 1;
	struct fd_ctl_event last;
	size_t n;

	publish(FD_CTL_SEGMENT, 1, 0, 0);
	while (port->n_backlog < FD_CTL_BACKLOG)
		publish(FD_CTL_ABORTED, 0, 0, id++);
	/* Points arrive while it is full, then the worker goes quiet: the
	 * newest must reach the reader without another announcement. */
	for (uint64_t off = 4096; off <= 40960; off += 4096)
		publish(FD_CTL_DURABLE, 1, off, 0);
	n = drain(got, sizeof(got) / sizeof(got[0]));
	last = got[n - 1];
	cr_assert_eq(last.type, FD_CTL_DURABLE);
	cr_assert_eq(last.off, 40960);
	check_order(got, n);
	cr_assert_eq(port->lost, 0, "nothing had to be dropped: %lu",
		     (unsigned long)port->lost);
}

Test(ctlport, reserve_full_counts_the_loss)
{
	uint64_t id = 1, seq = 1;

	publish(FD_CTL_SEGMENT, seq, 0, 0);
	while (port->n_backlog < FD_CTL_BACKLOG)
		publish(FD_CTL_FAILED, 0, 0, id++);
	uint64_t before = port->lost;
	for (unsigned k = 0; k < FD_CTL_RESERVE + 10; k++)
		publish(FD_CTL_SEGMENT, ++seq, 0, 0);
	cr_assert_eq(port->n_backlog, FD_CTL_BACKLOG + FD_CTL_RESERVE);
	cr_assert_eq(port->lost - before, 10);
}
