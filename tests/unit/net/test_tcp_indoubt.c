/* RFC 1047's in-doubt decision on the stack's side: when a connection
 * ends, the closed() upcall says how many octets the peer had not yet
 * acknowledged, so the transport can tell whether a 250 it sent was read.
 * Virtual clock, in memory (harness.c). */
#include <criterion/criterion.h>
#include <string.h>

#include "harness.h"

TestSuite(tcp_indoubt);

static const char reply[] = "250 2.0.0 Ok: queued as 0123456789ABCDEF\r\n";
#define RLEN (sizeof(reply) - 1)

static struct harness *
setup(struct h_peer *p, const struct net_config *cfg)
{
	struct harness *h = h_new_ready(cfg);

	h_peer_init(h, p, 42100, HO_MSS);
	h_connect(h, p, HO_MSS);
	return h;
}

/* The stack sends the reply; the peer sees it (but acks nothing yet). */
static void
send_reply(struct harness *h, struct h_peer *p, const char *r, size_t n)
{
	struct h_pkt k;

	cr_assert_eq(tcp_send(p->u->c, r, n), n);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.dlen, n);
	h_peer_saw(p, &k);
}

Test(tcp_indoubt, acknowledged_reply_then_reset_is_not_in_doubt)
{
	struct h_peer p;
	struct harness *h = setup(&p, NULL);
	struct h_upper *u = p.u;

	send_reply(h, &p, reply, RLEN);
	h_peer_ack(h, &p);
	h_peer_seg(h, &p, p.snd_nxt, TH_RST, NULL, 0);
	cr_assert_eq(u->closed_calls, 1);
	cr_assert_eq(u->closed_reason, TCP_CLOSE_RESET);
	cr_assert_eq(u->closed_unacked, 0, "all acknowledged");
	h_free(h);
}

Test(tcp_indoubt, unacknowledged_reply_then_reset_is_in_doubt)
{
	struct h_peer p;
	struct harness *h = setup(&p, NULL);
	struct h_upper *u = p.u;

	send_reply(h, &p, reply, RLEN);
	/* the ACK never comes: the client gave up and reset */
	h_peer_seg(h, &p, p.snd_nxt, TH_RST, NULL, 0);
	cr_assert_eq(u->closed_calls, 1);
	cr_assert_eq(u->closed_reason, TCP_CLOSE_RESET);
	cr_assert_eq(u->closed_unacked, RLEN, "%zu unacked", u->closed_unacked);
	h_free(h);
}

Test(tcp_indoubt, unacknowledged_reply_then_timeout_is_in_doubt)
{
	struct h_peer p;
	struct harness *h = setup(&p, NULL);
	struct h_upper *u = p.u;

	send_reply(h, &p, reply, RLEN);
	/* nothing ever comes back: retransmissions run out */
	for (int i = 0; i < 600 && u->closed_calls == 0; i++) {
		h_advance(h, 1000);
		h_drain(h);
	}
	cr_assert_eq(u->closed_calls, 1, "the connection timed out");
	cr_assert_eq(u->closed_reason, TCP_CLOSE_TIMEOUT);
	cr_assert_eq(u->closed_unacked, RLEN);
	h_free(h);
}

Test(tcp_indoubt, partially_acknowledged_counts_the_rest)
{
	struct h_peer p;
	struct harness *h = setup(&p, NULL);
	struct h_upper *u = p.u;
	const char first[] = "354 go ahead\r\n";
	size_t n1 = sizeof(first) - 1;

	/* The 354 is acknowledged; the 250 after it is not. */
	send_reply(h, &p, first, n1);
	h_peer_ack(h, &p);
	send_reply(h, &p, reply, RLEN);
	h_peer_seg(h, &p, p.snd_nxt, TH_RST, NULL, 0);
	cr_assert_eq(u->closed_calls, 1);
	cr_assert_eq(u->closed_unacked, RLEN,
		     "only the 250 is unacknowledged (%zu)", u->closed_unacked);
	h_free(h);
}
