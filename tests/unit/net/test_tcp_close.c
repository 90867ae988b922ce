/* TCP teardown and resets: passive, active and simultaneous close,
 * TIME_WAIT, FIN_WAIT_2 and idle timeouts, RST validation (RFC 5961),
 * abort, PAWS. */
#include <criterion/criterion.h>
#include <string.h>

#include "harness.h"

TestSuite(tcp_close);

static const struct net_counters *
ctr(struct harness *h)
{
	return net_stack_counters(h->st);
}

static struct harness *
setup(struct h_peer *p, unsigned opts, const struct net_config *cfg)
{
	struct harness *h = h_new_ready(cfg);

	h_peer_init(h, p, 42000, opts);
	h_connect(h, p, opts);
	return h;
}

static void
peer_fin(struct harness *h, struct h_peer *p)
{
	h_peer_seg(h, p, p->snd_nxt, TH_ACK | TH_FIN, NULL, 0);
	p->snd_nxt++;
}

/* Our close, the peer's ACK and its FIN: TIME_WAIT (*k: our ACK of it). */
static void
to_time_wait(struct harness *h, struct h_peer *p, struct h_pkt *k)
{
	tcp_close(p->u->c);
	h_expect_tcp(h, k);
	cr_assert(k->flags & TH_FIN);
	h_peer_saw(p, k);
	h_peer_ack(h, p);
	peer_fin(h, p);
	h_expect_tcp(h, k);
	cr_assert_eq(tcp_conn_state(p->u->c), TCPS_TIME_WAIT);
}

Test(tcp_close, passive_close)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;
	struct tcp_conn *c = p.u->c;

	peer_fin(h, &p);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_ACK);
	cr_assert_eq(k.ack, p.snd_nxt, "FIN acknowledged at once");
	cr_assert_eq(tcp_conn_state(c), TCPS_CLOSE_WAIT);
	cr_assert_eq(p.u->eof_calls, 1);
	/* we may still send in CLOSE_WAIT */
	cr_assert_eq(tcp_send(c, "221 bye\r\n", 9), 9);
	h_expect_tcp(h, &k);
	h_peer_saw(&p, &k);
	tcp_close(c);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_FIN | TH_ACK);
	cr_assert_eq(k.seq, p.rcv_nxt);
	h_peer_saw(&p, &k);
	h_peer_ack(h, &p);
	cr_assert_eq(net_stack_conn_count(h->st), 0, "LAST_ACK -> CLOSED");
	cr_assert_eq(h_pending(h), 0);
	cr_assert_eq(p.u->closed_calls, 0, "detached: no callback");
	h_free(h);
}

Test(tcp_close, close_from_eof_sends_fin_ack)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;

	p.u->close_on_eof = true;
	h_peer_send(h, &p, "QUIT\r\n", 6);
	peer_fin(h, &p);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_FIN | TH_ACK);
	cr_assert_eq(k.ack, p.snd_nxt);
	cr_assert_eq(p.u->rx_len, 6, "data before the FIN delivered first");
	h_peer_saw(&p, &k);
	h_peer_ack(h, &p);
	cr_assert_eq(net_stack_conn_count(h->st), 0);
	h_free(h);
}

Test(tcp_close, active_close_time_wait)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS | HO_TS, NULL);
	struct h_pkt k;
	struct tcp_conn *c = p.u->c;

	cr_assert_eq(tcp_send(c, "221 bye\r\n", 9), 9);
	tcp_close(c);
	h_expect_tcp(h, &k);
	h_peer_saw(&p, &k);
	if (!(k.flags & TH_FIN)) {
		h_expect_tcp(h, &k);
		h_peer_saw(&p, &k);
	}
	cr_assert(k.flags & TH_FIN);
	cr_assert_eq(tcp_conn_state(c), TCPS_FIN_WAIT_1);
	h_peer_ack(h, &p);
	cr_assert_eq(tcp_conn_state(c), TCPS_FIN_WAIT_2);
	peer_fin(h, &p);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_ACK);
	cr_assert_eq(k.ack, p.snd_nxt);
	cr_assert_eq(tcp_conn_state(c), TCPS_TIME_WAIT);
	h_advance(h, 30000);
	/* a retransmitted FIN is ACKed again and restarts 2*MSL */
	h_peer_seg(h, &p, p.snd_nxt - 1, TH_ACK | TH_FIN, NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, p.snd_nxt);
	h_advance(h, 59999);
	cr_assert_eq(net_stack_conn_count(h->st), 1);
	/* an RST does not end TIME_WAIT early (RFC 1337) */
	h_peer_seg(h, &p, p.snd_nxt, TH_RST, NULL, 0);
	cr_assert_eq(net_stack_conn_count(h->st), 1);
	h_advance(h, 1);
	cr_assert_eq(net_stack_conn_count(h->st), 0);
	cr_assert_eq(ctr(h)->tcp_time_wait_expired, 1);
	h_free(h);
}

/* What a shutdown waits for (dpdk.c): every state but TIME_WAIT, counted
 * in and out of TIME_WAIT by each way an entry leaves it (2*MSL expiry,
 * reuse by a new SYN). */
Test(tcp_close, live_count_leaves_out_time_wait)
{
	struct h_peer p, q;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;

	cr_assert_eq(net_stack_conn_count_live(h->st), 1);
	h_peer_init(h, &q, 42001, HO_MSS);
	h_connect(h, &q, HO_MSS);
	cr_assert_eq(net_stack_conn_count_live(h->st), 2);
	tcp_close(p.u->c);
	h_expect_tcp(h, &k);
	h_peer_saw(&p, &k);
	h_peer_ack(h, &p);
	cr_assert_eq(tcp_conn_state(p.u->c), TCPS_FIN_WAIT_2);
	cr_assert_eq(net_stack_conn_count_live(h->st), 2,
		     "FIN_WAIT_2 still waits for the peer's FIN");
	peer_fin(h, &p);
	h_expect_tcp(h, &k);
	cr_assert_eq(net_stack_conn_count(h->st), 2);
	cr_assert_eq(net_stack_conn_count_live(h->st), 1, "TIME_WAIT");
	to_time_wait(h, &q, &k);
	cr_assert_eq(net_stack_conn_count_live(h->st), 0);
	/* q's 4-tuple reused by a new SYN: one entry out of TIME_WAIT,
	 * a new one in SYN_RECEIVED */
	h_send_tcp(h, q.port, q.snd_nxt + 100000, 0, TH_SYN, 65535, NULL, 0,
		   NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_SYN | TH_ACK);
	cr_assert_eq(net_stack_conn_count(h->st), 2);
	cr_assert_eq(net_stack_conn_count_live(h->st), 1);
	h_advance(h, 60000); /* p's 2*MSL over: no TIME_WAIT left */
	cr_assert_eq(ctr(h)->tcp_time_wait_expired, 1);
	cr_assert_eq(net_stack_conn_count_live(h->st),
		     net_stack_conn_count(h->st));
	h_free(h);
}

Test(tcp_close, simultaneous_close)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;
	struct tcp_conn *c = p.u->c;
	uint32_t our_fin;

	tcp_close(c);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_FIN | TH_ACK);
	our_fin = k.seq;
	/* the peer's FIN crosses ours: it does not ACK our FIN */
	h_peer_seg(h, &p, p.snd_nxt, TH_ACK | TH_FIN, NULL, 0);
	p.snd_nxt++;
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, p.snd_nxt);
	cr_assert_eq(tcp_conn_state(c), TCPS_CLOSING);
	p.rcv_nxt = our_fin + 1;
	h_peer_ack(h, &p);
	cr_assert_eq(tcp_conn_state(c), TCPS_TIME_WAIT);
	h_advance(h, 60000);
	cr_assert_eq(net_stack_conn_count(h->st), 0);
	h_free(h);
}

Test(tcp_close, fin_wait_2_timeout)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;

	tcp_close(p.u->c);
	h_expect_tcp(h, &k);
	h_peer_saw(&p, &k);
	h_peer_ack(h, &p);
	h_advance(h, 59999);
	cr_assert_eq(net_stack_conn_count(h->st), 1);
	h_advance(h, 1);
	cr_assert_eq(net_stack_conn_count(h->st), 0);
	cr_assert_eq(ctr(h)->tcp_fin_wait2_timeouts, 1);
	h_free(h);
}

Test(tcp_close, fin_retransmitted)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;
	uint32_t seq;

	tcp_close(p.u->c);
	h_expect_tcp(h, &k);
	seq = k.seq;
	h_advance(h, 1000);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_FIN | TH_ACK);
	cr_assert_eq(k.seq, seq);
	h_free(h);
}

Test(tcp_close, rst_exact_resets)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_upper *u = p.u;

	h_peer_seg(h, &p, p.snd_nxt, TH_RST, NULL, 0);
	cr_assert_eq(u->closed_calls, 1);
	cr_assert_eq(u->closed_reason, TCP_CLOSE_RESET);
	cr_assert_eq(net_stack_conn_count(h->st), 0);
	cr_assert_eq(h_pending(h), 0);
	h_free(h);
}

Test(tcp_close, rst_in_window_gets_challenge_ack)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;

	h_peer_seg(h, &p, p.snd_nxt + 1000, TH_RST, NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_ACK);
	cr_assert_eq(k.ack, p.snd_nxt);
	cr_assert_eq(ctr(h)->tcp_challenge_acks, 1);
	cr_assert_eq(tcp_conn_state(p.u->c), TCPS_ESTABLISHED);
	cr_assert_eq(p.u->closed_calls, 0);
	h_free(h);
}

Test(tcp_close, rst_out_of_window_ignored)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);

	h_peer_seg(h, &p, p.snd_nxt + 100000, TH_RST, NULL, 0);
	h_peer_seg(h, &p, p.snd_nxt - 1, TH_RST, NULL, 0);
	cr_assert_eq(h_pending(h), 0);
	cr_assert_eq(ctr(h)->tcp_rst_bad, 2);
	cr_assert_eq(tcp_conn_state(p.u->c), TCPS_ESTABLISHED);
	h_free(h);
}

Test(tcp_close, idle_timeout)
{
	struct net_config cfg;
	struct h_peer p;
	struct harness *h;
	struct h_pkt k;
	struct h_upper *u;

	h_config(&cfg);
	cfg.idle_ms = 5000;
	h = setup(&p, HO_MSS, &cfg);
	u = p.u;
	h_advance(h, 4000);
	h_peer_send(h, &p, "x", 1); /* activity restarts it */
	h_advance(h, 4999);
	h_drain(h);
	cr_assert_eq(u->closed_calls, 0);
	h_advance(h, 1);
	h_expect_tcp(h, &k);
	cr_assert(k.flags & TH_RST);
	cr_assert_eq(u->closed_calls, 1);
	cr_assert_eq(u->closed_reason, TCP_CLOSE_IDLE);
	h_free(h);
}

Test(tcp_close, abort_sends_rst)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;

	tcp_abort(p.u->c);
	h_expect_tcp(h, &k);
	cr_assert(k.flags & TH_RST);
	cr_assert_eq(k.seq, p.rcv_nxt);
	cr_assert_eq(net_stack_conn_count(h->st), 0);
	cr_assert_eq(p.u->closed_calls, 0);
	h_free(h);
}

Test(tcp_close, data_after_close_acked_and_discarded)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;

	tcp_close(p.u->c);
	h_expect_tcp(h, &k);
	h_peer_send(h, &p, "late", 4);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, p.snd_nxt);
	cr_assert_eq(p.u->rx_len, 0);
	cr_assert_eq(ctr(h)->tcp_data_after_close, 1);
	h_free(h);
}

Test(tcp_close, ack_of_unsent_data)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;

	p.rcv_nxt += 5000;
	h_peer_ack(h, &p);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_ACK);
	cr_assert_eq(ctr(h)->tcp_ack_unsent, 1);
	h_free(h);
}

Test(tcp_close, paws_drops_old_timestamp)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_ALL, NULL);
	struct h_pkt k;
	uint8_t o[12] = {1, 1, 8, 10};

	h_advance(h, 10);
	h_peer_send(h, &p, "a", 1); /* TS.Recent = now */
	h_advance(h, 100);
	h_drain(h);
	/* TSval from the past */
	o[4] = 0;
	o[7] = 1;
	h_send_tcp(h, p.port, p.snd_nxt, p.rcv_nxt, TH_ACK, 65535, o, 12, "b",
		   1);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, p.snd_nxt, "not accepted");
	cr_assert_eq(p.u->rx_len, 1);
	cr_assert_eq(ctr(h)->tcp_paws_drop, 1);
	h_free(h);
}

/* TIME_WAIT answers a retransmitted FIN or an unacceptable segment, not
 * an acceptable pure ACK (RFC 9293 3.10.7.4): two such ends ACK each other
 * for ever. (It did.) */
Test(tcp_close, time_wait_does_not_ack_an_ack)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;

	to_time_wait(h, &p, &k);
	h_peer_ack(h, &p); /* acceptable, in sequence, pure ACK */
	cr_assert_eq(h_pending(h), 0, "TIME_WAIT answered a pure ACK");
	h_free(h);
}

Test(tcp_close, time_wait_reused_by_new_syn)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;

	to_time_wait(h, &p, &k);
	/* an old duplicate SYN is only ACKed */
	h_send_tcp(h, p.port, p.iss, 0, TH_SYN, 65535, NULL, 0, NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_ACK);
	/* a new incarnation with a higher ISN is accepted */
	h->last_accepted = NULL;
	h_send_tcp(h, p.port, p.snd_nxt + 100000, 0, TH_SYN, 65535, NULL, 0,
		   NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_SYN | TH_ACK);
	cr_assert_eq(k.ack, p.snd_nxt + 100001);
	cr_assert_eq(net_stack_counters(h->st)->tcp_time_wait_reused, 1);
	cr_assert_eq(net_stack_conn_count(h->st), 1);
	h_free(h);
}

Test(tcp_close, rst_with_data_judged_on_its_own_seq)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;

	/* starts before RCV.NXT, ends inside the window: trimming must not
	 * make it an exact-match RST (RFC 5961 3.2) */
	h_peer_seg(h, &p, p.snd_nxt - 10, TH_RST, "0123456789abcdef", 16);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_ACK);
	cr_assert_eq(tcp_conn_state(p.u->c), TCPS_ESTABLISHED);
	cr_assert_eq(p.u->closed_calls, 0);
	h_free(h);
}

Test(tcp_close, challenge_acks_rate_limited)
{
	struct net_config cfg;
	struct h_peer p;
	struct harness *h;

	h_config(&cfg);
	cfg.challenge_ack_limit = 10;
	h = setup(&p, HO_MSS, &cfg);
	for (int i = 0; i < 40; i++)
		h_peer_seg(h, &p, p.snd_nxt + 100 + (uint32_t)i, TH_RST, NULL,
			   0);
	/* the limit of each second is drawn from [5, 15) */
	cr_assert_geq(h_pending(h), 5);
	cr_assert_lt(h_pending(h), 15);
	cr_assert_eq(net_stack_counters(h->st)->tcp_challenge_limited,
		     40 - h_pending(h));
	h_drain(h);
	h_advance(h, 1000); /* next second: allowed again */
	h_peer_seg(h, &p, p.snd_nxt + 100, TH_RST, NULL, 0);
	cr_assert_eq(h_pending(h), 1);
	h_free(h);
}

Test(tcp_close, full_table_recycles_oldest_time_wait)
{
	struct net_config cfg;
	struct harness *h;
	struct h_peer p[3];
	struct h_pkt k;

	h_config(&cfg);
	cfg.limits.max_conns = 2;
	h = h_new_ready(&cfg);
	for (unsigned i = 0; i < 2; i++) {
		h_peer_init(h, &p[i], (uint16_t)(42100 + i), HO_MSS);
		h_connect(h, &p[i], HO_MSS);
		to_time_wait(h, &p[i], &k);
		h_advance(h, 10);
	}
	cr_assert_eq(net_stack_conn_count(h->st), 2, "both in TIME_WAIT");
	cr_assert_eq(net_stack_conn_count_live(h->st), 0);
	/* a new client: the oldest TIME_WAIT entry gives way, no cookie */
	h_peer_init(h, &p[2], 42102, HO_ALL);
	h_connect(h, &p[2], HO_ALL);
	cr_assert_eq(net_stack_counters(h->st)->tcp_time_wait_recycled, 1);
	cr_assert_eq(net_stack_counters(h->st)->tcp_syncookies_sent, 0);
	cr_assert_eq(net_stack_conn_count(h->st), 2);
	cr_assert_eq(net_stack_conn_count_live(h->st), 1,
		     "the recycled entry left the TIME_WAIT count");
	/* the survivor is the younger one: its FIN is still answered */
	h_peer_seg(h, &p[1], p[1].snd_nxt, TH_ACK | TH_FIN, NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_ACK);
	cr_assert_eq(k.dport, 42101);
	h_free(h);
}
