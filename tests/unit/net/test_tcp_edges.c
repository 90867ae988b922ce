/*
 * TCP edges found by a review of the stack (each red before its fix): the
 * RST's sequence number after a retransmission timeout, zero-window probe
 * ACKs taken for duplicate ACKs, a new SYN on a half-open entry, an orphan
 * held by a zero window, and RFC 6298 5.7's 3 s after a lost SYN-ACK.
 * (TIME_WAIT acknowledging an ACK is in test_tcp_close, with the other
 * TIME_WAIT cases.)
 */
#include <criterion/criterion.h>
#include <string.h>
#include <stdio.h>
#include <stdlib.h>

#include "harness.h"
#include "net/net_priv.h"

TestSuite(tcp_edges);

static uint8_t buf[65536];

static struct harness *
setup(struct h_peer *p, unsigned opts, const struct net_config *cfg)
{
	struct harness *h = h_new_ready(cfg);

	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (uint8_t)(i * 7 + 3);
	h_peer_init(h, p, 42000, opts);
	h_connect(h, p, opts);
	return h;
}

/* after an RTO rewound snd_nxt, tcp_abort() sends its RST at the
 * rewound snd_nxt, left of what the peer already received (SND.MAX): an
 * RFC 5961 / RFC 9293 receiver finds it outside its window and drops it,
 * so the peer never learns of the abort. */
Test(tcp_edges, abort_after_rto_rst_at_snd_max)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;
	uint32_t s0 = 0, end;
	unsigned n = 0;

	cr_assert_eq(tcp_send(p.u->c, buf, 3 * 1460), 3 * 1460);
	while (h_next(h, &k)) {
		if (n++ == 0)
			s0 = k.seq;
		/* the peer got everything; its ACKs are lost */
		h_peer_saw(&p, &k);
	}
	cr_assert_eq(n, 3);
	end = s0 + 3 * 1460;
	cr_assert_eq(p.rcv_nxt, end);
	h_advance(h, 1000); /* RTO: first segment again */
	h_expect_tcp(h, &k);
	cr_assert_eq(k.seq, s0);
	h_drain(h);
	tcp_abort(p.u->c);
	h_expect_tcp(h, &k);
	cr_assert(k.flags & TH_RST);
	cr_assert_eq(k.seq, end,
		     "RST seq %u is %d bytes left of the peer's RCV.NXT %u: "
		     "the peer drops it as out of window",
		     k.seq, (int)(end - k.seq), end);
	h_free(h);
}

/* the same on the retransmission-timeout give-up path. */
Test(tcp_edges, timeout_rst_at_snd_max)
{
	struct net_config cfg;
	struct h_peer p;
	struct harness *h;
	struct h_pkt k, last;
	uint32_t end;
	unsigned n = 0;

	h_config(&cfg);
	cfg.data_retries = 2;
	h = setup(&p, HO_MSS, &cfg);
	cr_assert_eq(tcp_send(p.u->c, buf, 3 * 1460), 3 * 1460);
	while (h_next(h, &k))
		n++;
	end = k.seq + 1460;
	memset(&last, 0, sizeof(last));
	for (int i = 0; i < 20000 && p.u->closed_calls == 0; i++) {
		h_advance(h, 1);
		while (h_next(h, &k))
			last = k;
	}
	cr_assert_eq(p.u->closed_reason, TCP_CLOSE_TIMEOUT);
	cr_assert(last.flags & TH_RST);
	cr_assert_eq(last.seq, end, "RST seq %u, SND.MAX %u", last.seq, end);
	h_free(h);
}

/* persist-probe ACKs (ack == SND.UNA, window 0, the probe byte
 * "outstanding") are counted as duplicate ACKs: the third one starts a
 * NewReno fast retransmit that sends a full segment into the zero window,
 * halves ssthresh and arms the retransmission timer (which then backs off
 * and bumps rxtshift) though nothing was lost. */
Test(tcp_edges, persist_probe_acks_are_not_dupacks)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;
	uint32_t una;
	unsigned big = 0, probes = 0;

	cr_assert_eq(tcp_send(p.u->c, buf, 100), 100);
	h_expect_tcp(h, &k);
	una = k.seq + 100;
	/* the peer takes the 100 bytes and closes its window */
	h_send_tcp(h, p.port, p.snd_nxt, una, TH_ACK, 0, NULL, 0, NULL, 0);
	cr_assert_eq(tcp_send(p.u->c, buf, 4000), 4000);
	cr_assert_eq(h_pending(h), 0);
	for (uint64_t ms = 0; ms < 30000; ms++) {
		h_advance(h, 1);
		while (h_next(h, &k)) {
			if (!k.tcp || (k.flags & TH_RST))
				continue;
			if (k.dlen > 1)
				big++;
			else
				probes++;
			/* alive: ACK, window still zero */
			h_send_tcp(h, p.port, p.snd_nxt, una, TH_ACK, 0, NULL,
				   0, NULL, 0);
		}
	}
	cr_assert_eq(big, 0,
		     "%u segment(s) of >1 byte sent into a zero window "
		     "(fast retransmits: %llu, probes %u)", big,
		     (unsigned long long)net_stack_counters(h->st)
			     ->tcp_fast_retransmits,
		     probes);
	h_free(h);
}

/* a SYN with a new ISN on a 4-tuple in SYN_RECEIVED (client gave up
 * and reconnected from the same port, or a NAT reused it) is dropped
 * silently: RFC 9293 3.10.7.4 (fourth, SYN-RECEIVED, passive open: back
 * to LISTEN) or at least an ACK (RFC 5961 4.2) that draws the client's
 * RST. Neither happens: the client gets no answer until the stale entry's
 * SYN-ACK retries run out (~63 s). */
Test(tcp_edges, new_syn_in_syn_received_answered)
{
	struct harness *h = h_new_ready(NULL);
	struct h_peer p;
	struct h_pkt k;
	int answered_at = -1;

	h_peer_init(h, &p, 42500, HO_MSS);
	h_peer_syn(h, &p, HO_MSS, &k); /* SYN_RECEIVED, ISN A */
	/* the client starts over: same port, new ISN B */
	for (int t = 0; t < 70 && answered_at < 0; t++) {
		h_send_tcp(h, p.port, p.iss + 5000000, 0, TH_SYN, 65535, NULL,
			   0, NULL, 0);
		/* any segment now is an answer to this SYN (a SYN-ACK for B,
		 * or an ACK that draws the client's RST) */
		if (h_pending(h))
			answered_at = t;
		/* only the stale SYN-ACK retransmissions (ack A+1) come */
		h_advance(h, 1000);
		h_drain(h);
	}
	cr_assert_eq(answered_at, 0,
		     "new SYN first answered after %d s (-1: never in 70 s)",
		     answered_at);
	h_free(h);
}

/* ... and the exchange it starts: the ACK names the old entry's RCV.NXT,
 * the client (SYN-SENT, RFC 9293 3.10.7.3) answers it with a RST at
 * exactly that number, which frees the entry, and its next SYN gets a
 * SYN-ACK for its new ISN. */
Test(tcp_edges, new_syn_in_syn_received_clears_the_stale_entry)
{
	struct harness *h = h_new_ready(NULL);
	struct h_peer p;
	struct h_pkt k;
	uint32_t isn_b = 0x5000000u;

	h_peer_init(h, &p, 42501, HO_MSS);
	h_peer_syn(h, &p, HO_MSS, &k);
	h_send_tcp(h, p.port, isn_b, 0, TH_SYN, 65535, NULL, 0, NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_ACK);
	h_send_tcp(h, p.port, k.ack, 0, TH_RST, 0, NULL, 0, NULL, 0);
	cr_assert_eq(net_stack_conn_count(h->st), 0, "the RST did not free it");
	h_send_tcp(h, p.port, isn_b, 0, TH_SYN, 65535, NULL, 0, NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_SYN | TH_ACK);
	cr_assert_eq(k.ack, isn_b + 1);
	h_free(h);
}

static void
answer_arp(struct harness *h, const struct h_pkt *k)
{
	uint8_t f[64];
	size_t fl = h_build_arp(f, 2, h_peer_mac, H_PEER_IP, h_our_mac,
				H_OUR_IP, h_our_mac);
	(void)k;
	h_input(h, f, fl);
}

/* after tcp_close() (the upper layer is gone: SMTP QUIT), a client
 * that keeps its window at zero and answers the persist probes holds the
 * entry and its send buffer forever: FIN_WAIT_1 never ends. A few
 * hundred such clients fill the table (then new clients only get SYN
 * cookies whose ACKs find no free entry). */
Test(tcp_edges, orphan_in_zero_window_is_bounded, .timeout = 120)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS, NULL);
	struct h_pkt k;
	struct tcp_conn *c = p.u->c;
	uint32_t una;
	unsigned probes = 0;

	cr_assert_eq(tcp_send(c, buf, 100), 100);
	h_expect_tcp(h, &k);
	una = k.seq + 100;
	h_send_tcp(h, p.port, p.snd_nxt, una, TH_ACK, 0, NULL, 0, NULL, 0);
	cr_assert_eq(tcp_send(c, "221 2.0.0 Bye\r\n", 15), 15);
	tcp_close(c);
	cr_assert_eq(tcp_conn_state(c), TCPS_FIN_WAIT_1);
	for (uint64_t ms = 0; ms < 4ull * 3600 * 1000 &&
			      net_stack_conn_count(h->st) != 0;
	     ms++) {
		h_advance(h, 1);
		while (h_next(h, &k)) {
			if (k.arp && k.arp_op == 1)
				answer_arp(h, &k);
			if (!k.tcp || (k.flags & TH_RST))
				continue;
			probes++;
			h_send_tcp(h, p.port, p.snd_nxt, una, TH_ACK, 0, NULL,
				   0, NULL, 0);
		}
	}
	cr_assert_eq(net_stack_conn_count(h->st), 0,
		     "after 4 h and %u probes the orphan (state %s) still "
		     "holds its entry and send buffer", probes,
		     tcp_state_name(tcp_conn_state(c)));
	cr_assert_geq(probes, 3, "given up without probing");
	h_free(h);
}

/* RFC 6298 5.7: when the SYN(-ACK) timed out and RTO < 3 s, RTO MUST
 * be re-initialised to 3 s when data transmission begins. */
Test(tcp_edges, rto_3s_after_synack_timeout)
{
	struct harness *h = h_new_ready(NULL);
	struct h_peer p;
	struct h_pkt k;
	uint32_t seq;
	uint64_t waited = 0;

	h_peer_init(h, &p, 42600, HO_MSS);
	h_peer_syn(h, &p, HO_MSS, &k);
	h_advance(h, 1000); /* the SYN-ACK is lost: retransmitted */
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_SYN | TH_ACK);
	h->last_accepted = NULL;
	h_peer_seg(h, &p, p.snd_nxt, TH_ACK, NULL, 0);
	p.u = h->last_accepted;
	cr_assert_not_null(p.u);
	cr_assert_eq(tcp_send(p.u->c, buf, 100), 100);
	h_expect_tcp(h, &k);
	seq = k.seq;
	while (h_pending(h) == 0 && waited < 10000) {
		h_advance(h, 1);
		waited++;
	}
	h_expect_tcp(h, &k);
	cr_assert_eq(k.seq, seq);
	cr_assert_geq(waited, 3000, "first data RTO %llu ms (< 3 s)",
		      (unsigned long long)waited);
	h_free(h);
}
