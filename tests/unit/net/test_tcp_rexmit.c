/* Loss recovery on the virtual clock: RTO (RFC 6298) with exponential
 * backoff, giving up, fast retransmit and NewReno (RFC 5681, 6582). */
#include <criterion/criterion.h>
#include <string.h>

#include "harness.h"

TestSuite(tcp_rexmit);

static const struct net_counters *
ctr(struct harness *h)
{
	return net_stack_counters(h->st);
}

static uint8_t buf[65536];

static struct harness *
setup(struct h_peer *p, unsigned opts, const struct net_config *cfg)
{
	struct harness *h = h_new_ready(cfg);

	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (uint8_t)(i ^ (i >> 9));
	h_peer_init(h, p, 43000, opts);
	h_connect(h, p, opts);
	return h;
}

static void
expect_rexmt_after(struct harness *h, uint64_t ms, uint32_t seq)
{
	struct h_pkt k;

	h_advance(h, ms - 1);
	cr_assert_eq(h_pending(h), 0, "retransmitted before %lu ms",
		     (unsigned long)ms);
	h_advance(h, 1);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.seq, seq, "retransmits the first unacked byte");
	cr_assert_gt(k.dlen, 0);
}

Test(tcp_rexmit, initial_rto_and_backoff)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;

	cr_assert_eq(tcp_send(p.u->c, buf, 100), 100);
	h_expect_tcp(h, &k);
	/* no RTT sample yet: RTO = 1 s (RFC 6298 2.1), doubling */
	expect_rexmt_after(h, 1000, k.seq);
	expect_rexmt_after(h, 2000, k.seq);
	expect_rexmt_after(h, 4000, k.seq);
	cr_assert_eq(ctr(h)->tcp_rto, 3);
	/* the ACK stops it */
	p.rcv_nxt = k.seq + 100;
	h_peer_ack(h, &p);
	h_advance(h, 20000);
	cr_assert_eq(h_pending(h), 0);
	h_free(h);
}

Test(tcp_rexmit, rto_from_measured_rtt)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_ALL, NULL);
	struct h_pkt k;

	/* timestamps gave an RTT sample of ~0 at the handshake: RTO is the
	 * 200 ms floor */
	cr_assert_eq(tcp_send(p.u->c, buf, 100), 100);
	h_expect_tcp(h, &k);
	expect_rexmt_after(h, 200, k.seq);
	expect_rexmt_after(h, 400, k.seq);
	/* a 100 ms RTT: RTO = SRTT + 4 * RTTVAR */
	h_free(h);
}

Test(tcp_rexmit, rtt_sample_sets_rto)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;

	cr_assert_eq(tcp_send(p.u->c, buf, 100), 100);
	h_expect_tcp(h, &k);
	h_advance(h, 300);
	p.rcv_nxt = k.seq + 100;
	h_peer_ack(h, &p); /* RTT 300 ms: SRTT 300, RTTVAR 150: RTO 900 */
	cr_assert_eq(tcp_send(p.u->c, buf, 100), 100);
	h_expect_tcp(h, &k);
	expect_rexmt_after(h, 900, k.seq);
	h_free(h);
}

Test(tcp_rexmit, gives_up_after_retries)
{
	struct net_config cfg;
	struct h_peer p;
	struct harness *h;
	struct h_pkt k;
	struct h_upper *u;

	h_config(&cfg);
	cfg.data_retries = 3;
	h = setup(&p, HO_MSS, &cfg);
	u = p.u;
	cr_assert_eq(tcp_send(u->c, buf, 100), 100);
	h_expect_tcp(h, &k);
	expect_rexmt_after(h, 1000, k.seq);
	expect_rexmt_after(h, 2000, k.seq);
	expect_rexmt_after(h, 4000, k.seq);
	h_advance(h, 8000);
	h_expect_tcp(h, &k);
	cr_assert(k.flags & TH_RST);
	cr_assert_eq(u->closed_calls, 1);
	cr_assert_eq(u->closed_reason, TCP_CLOSE_TIMEOUT);
	cr_assert_eq(net_stack_conn_count(h->st), 0);
	h_free(h);
}

Test(tcp_rexmit, fast_retransmit_and_newreno)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;
	uint32_t s0 = 0;
	unsigned n = 0;

	cr_assert_eq(tcp_send(p.u->c, buf, 14600), 14600);
	while (h_next(h, &k)) {
		if (n == 0)
			s0 = k.seq;
		n++;
	}
	cr_assert_eq(n, 10, "initial window: 10 segments (RFC 6928)");
	/* segment 2 is lost: one ACK for segment 1, then 3 duplicates */
	p.rcv_nxt = s0 + 1460;
	h_peer_ack(h, &p);
	h_drain(h); /* cwnd growth may send more */
	h_peer_ack(h, &p);
	h_peer_ack(h, &p);
	cr_assert_eq(h_pending(h), 0, "no retransmission before 3 dupacks");
	h_peer_ack(h, &p);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.seq, s0 + 1460, "fast retransmit of the hole");
	cr_assert_eq(k.dlen, 1460);
	cr_assert_eq(ctr(h)->tcp_fast_retransmits, 1);
	h_drain(h);
	/* partial ACK: the next hole is retransmitted at once */
	p.rcv_nxt = s0 + 5 * 1460;
	h_peer_ack(h, &p);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.seq, s0 + 5 * 1460);
	cr_assert_eq(ctr(h)->tcp_partial_acks, 1);
	h_drain(h);
	/* full ACK ends recovery */
	p.rcv_nxt = s0 + 14600;
	h_peer_ack(h, &p);
	cr_assert_eq(tcp_conn_snd_queued(p.u->c), 0);
	cr_assert_eq(ctr(h)->tcp_rto, 0, "recovered without a timeout");
	h_free(h);
}
