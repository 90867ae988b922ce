/* TCP data transfer: delivery, delayed ACKs, segmentation, reassembly with
 * SACK, duplicates and overlaps, flow control to the upper layer, the
 * peer's zero window and persist probes. */
#include <criterion/criterion.h>
#include <string.h>

#include "harness.h"

TestSuite(tcp_data);

static const struct net_counters *
ctr(struct harness *h)
{
	return net_stack_counters(h->st);
}

static uint8_t pattern[200000];

static void
init_pattern(void)
{
	for (size_t i = 0; i < sizeof(pattern); i++)
		pattern[i] = (uint8_t)(i * 7 + (i >> 8));
}

static struct harness *
setup(struct h_peer *p, unsigned opts)
{
	struct harness *h = h_new_ready(NULL);

	init_pattern();
	h_peer_init(h, p, 41000, opts);
	h_connect(h, p, opts);
	return h;
}

Test(tcp_data, delivered_and_delayed_ack)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS);
	struct h_pkt k;

	h_peer_send(h, &p, "HELO x\r\n", 8);
	cr_assert_eq(p.u->rx_len, 8);
	cr_assert(memcmp(p.u->rx, "HELO x\r\n", 8) == 0);
	cr_assert_eq(h_pending(h), 0, "ACK is delayed");
	h_advance(h, 39);
	cr_assert_eq(h_pending(h), 0);
	h_advance(h, 1);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_ACK);
	cr_assert_eq(k.ack, p.snd_nxt);
	cr_assert_eq(k.dlen, 0);
	cr_assert_eq(ctr(h)->tcp_delayed_acks, 1);
	h_free(h);
}

Test(tcp_data, ack_every_second_segment)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS);
	struct h_pkt k;

	h_peer_send(h, &p, pattern, 1460);
	cr_assert_eq(h_pending(h), 0);
	h_peer_send(h, &p, pattern + 1460, 1460);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, p.snd_nxt);
	cr_assert_eq(p.u->rx_len, 2920);
	cr_assert(memcmp(p.u->rx, pattern, 2920) == 0);
	h_free(h);
}

Test(tcp_data, reply_piggybacks_ack)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS);
	struct h_pkt k;

	h_peer_send(h, &p, "NOOP\r\n", 6);
	cr_assert_eq(tcp_send(p.u->c, "250 ok\r\n", 8), 8);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, p.snd_nxt, "data segment carries the ACK");
	cr_assert_eq(k.dlen, 8);
	cr_assert(k.flags & TH_PSH);
	h_advance(h, 100);
	cr_assert_eq(h_pending(h), 0, "no separate delayed ACK");
	h_free(h);
}

Test(tcp_data, segmentation_and_send_buffer)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS);
	struct h_pkt k;
	uint32_t seq0;
	size_t got = 0;

	cr_assert_eq(tcp_send(p.u->c, pattern, 3000), 3000);
	h_expect_tcp(h, &k);
	seq0 = k.seq;
	cr_assert_eq(k.dlen, 1460);
	cr_assert(memcmp(k.data, pattern, 1460) == 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.seq, seq0 + 1460);
	cr_assert_eq(k.dlen, 1460);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.seq, seq0 + 2920);
	cr_assert_eq(k.dlen, 80);
	cr_assert(memcmp(k.data, pattern + 2920, 80) == 0);
	p.rcv_nxt = seq0 + 3000;
	h_peer_ack(h, &p);
	cr_assert_eq(tcp_conn_snd_queued(p.u->c), 0);

	/* a full buffer: short write, then sent() as ACKs free room */
	got = tcp_send(p.u->c, pattern, 20000);
	cr_assert_eq(got, 16384);
	cr_assert_eq(tcp_send(p.u->c, pattern, 10), 0);
	while (h_next(h, &k))
		h_peer_saw(&p, &k);
	h_peer_ack(h, &p);
	cr_assert_geq(p.u->sent_calls, 1);
	cr_assert_gt(tcp_send_room(p.u->c), 0);
	h_free(h);
}

Test(tcp_data, out_of_order_with_sack)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_ALL);
	struct h_pkt k;
	uint32_t b = p.snd_nxt;

	h_peer_seg(h, &p, b, TH_ACK, pattern, 100);
	h_peer_seg(h, &p, b + 200, TH_ACK, pattern + 200, 100);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, b + 100, "dup ACK at once");
	cr_assert_eq(k.n_sack, 1);
	cr_assert_eq(k.sack[0][0], b + 200);
	cr_assert_eq(k.sack[0][1], b + 300);
	h_peer_seg(h, &p, b + 400, TH_ACK, pattern + 400, 100);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, b + 100);
	cr_assert_eq(k.n_sack, 2);
	cr_assert_eq(k.sack[0][0], b + 400, "most recent block first");
	cr_assert_eq(k.sack[1][0], b + 200);
	cr_assert_eq(p.u->rx_len, 100);
	/* the hole fills: ACK at once, one block left */
	h_peer_seg(h, &p, b + 100, TH_ACK, pattern + 100, 100);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, b + 300);
	cr_assert_eq(k.n_sack, 1);
	cr_assert_eq(k.sack[0][0], b + 400);
	cr_assert_eq(p.u->rx_len, 300);
	h_peer_seg(h, &p, b + 300, TH_ACK, pattern + 300, 100);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, b + 500);
	cr_assert_eq(k.n_sack, 0);
	cr_assert_eq(p.u->rx_len, 500);
	cr_assert(memcmp(p.u->rx, pattern, 500) == 0);
	cr_assert_eq(ctr(h)->tcp_ooo_segs, 2);
	h_free(h);
}

Test(tcp_data, overlapping_and_duplicate_segments)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS | HO_SACK);
	struct h_pkt k;
	uint32_t b = p.snd_nxt;

	h_peer_seg(h, &p, b, TH_ACK, pattern, 100);
	h_peer_seg(h, &p, b + 50, TH_ACK, pattern + 50, 100); /* overlap */
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, b + 150);
	cr_assert_eq(p.u->rx_len, 150);
	cr_assert(memcmp(p.u->rx, pattern, 150) == 0);
	/* exact duplicate: ACK at once, nothing delivered */
	h_peer_seg(h, &p, b + 50, TH_ACK, pattern + 50, 100);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, b + 150);
	cr_assert_eq(p.u->rx_len, 150);
	cr_assert_geq(ctr(h)->tcp_dup_data, 1);
	/* overlapping out-of-order pieces merge into one SACK block */
	h_peer_seg(h, &p, b + 200, TH_ACK, pattern + 200, 100);
	h_peer_seg(h, &p, b + 250, TH_ACK, pattern + 250, 100);
	h_expect_tcp(h, &k);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.n_sack, 1);
	cr_assert_eq(k.sack[0][0], b + 200);
	cr_assert_eq(k.sack[0][1], b + 350);
	h_peer_seg(h, &p, b + 140, TH_ACK, pattern + 140, 70);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, b + 350);
	cr_assert_eq(p.u->rx_len, 350);
	cr_assert(memcmp(p.u->rx, pattern, 350) == 0);
	h_free(h);
}

Test(tcp_data, reassembly_bounded)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS | HO_SACK);
	uint32_t b = p.snd_nxt;

	for (uint32_t i = 1; i <= 6; i++)
		h_peer_seg(h, &p, b + i * 200, TH_ACK, pattern + i * 200, 100);
	cr_assert_eq(ctr(h)->tcp_ooo_drop, 2, "4 ranges kept, 2 dropped");
	/* beyond the window: trimmed away, not stored */
	h_peer_seg(h, &p, b + 16384, TH_ACK, pattern, 100);
	cr_assert_geq(ctr(h)->tcp_out_of_window, 1);
	h_free(h);
}

Test(tcp_data, flow_control_reaches_upper_layer)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS);
	struct h_pkt k;
	uint32_t sent = 0;

	p.u->consume_max = 0; /* the SMTP engine is busy */
	while (sent < 16384) {
		uint32_t n = 16384 - sent < 1460 ? 16384 - sent : 1460;
		h_peer_send(h, &p, pattern + sent, n);
		sent += n;
	}
	h_advance(h, 50);
	while (h_next(h, &k))
		h_peer_saw(&p, &k);
	cr_assert_eq(p.rcv_nxt, k.seq);
	cr_assert_eq(k.ack, p.snd_nxt, "everything acknowledged");
	cr_assert_eq(k.wnd, 0, "window closed (%u)", k.wnd);
	cr_assert_eq(tcp_conn_rcv_held(p.u->c), 16384);
	cr_assert_eq(p.u->recv_calls, 1, "not re-offered until resume");
	/* a probe beyond the window: ACK, window still 0, byte not taken */
	h_peer_send(h, &p, "X", 1);
	p.snd_nxt--;
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, p.snd_nxt);
	cr_assert_eq(k.wnd, 0);
	cr_assert_eq(ctr(h)->tcp_window_probes_rx, 1);
	/* the engine can go on: all bytes arrive, the window reopens */
	p.u->consume_max = SIZE_MAX;
	tcp_resume(p.u->c);
	cr_assert_eq(p.u->rx_len, 16384);
	cr_assert(memcmp(p.u->rx, pattern, 16384) == 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.wnd, 16384, "window update (%u)", k.wnd);
	cr_assert_eq(tcp_conn_rcv_held(p.u->c), 0);
	h_free(h);
}

Test(tcp_data, partial_consumption_keeps_rest)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS);

	p.u->consume_max = 3;
	h_peer_send(h, &p, "abcdefgh", 8);
	cr_assert_eq(p.u->rx_len, 3);
	cr_assert_eq(tcp_conn_rcv_held(p.u->c), 5);
	h_peer_send(h, &p, "ij", 2);
	cr_assert_eq(p.u->rx_len, 3, "blocked until resume");
	cr_assert_eq(tcp_conn_rcv_held(p.u->c), 7);
	p.u->consume_max = SIZE_MAX;
	tcp_resume(p.u->c);
	cr_assert_eq(p.u->rx_len, 10);
	cr_assert(memcmp(p.u->rx, "abcdefghij", 10) == 0);
	h_free(h);
}

Test(tcp_data, peer_zero_window_and_persist)
{
	struct h_peer p;
	struct harness *h = h_new_ready(NULL);
	struct h_pkt k;
	uint32_t seq0;

	init_pattern();
	h_peer_init(h, &p, 41001, HO_MSS);
	h_peer_syn(h, &p, HO_MSS, &k);
	/* complete the handshake with a zero window */
	h_send_tcp(h, 41001, p.snd_nxt, p.rcv_nxt, TH_ACK, 0, NULL, 0, NULL,
		   0);
	p.u = h->last_accepted;
	cr_assert_not_null(p.u);
	cr_assert_eq(tcp_send(p.u->c, pattern, 100), 100);
	cr_assert_eq(h_pending(h), 0, "zero window: nothing sent");
	h_advance(h, 999);
	cr_assert_eq(h_pending(h), 0);
	h_advance(h, 1);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.dlen, 1, "one-byte probe");
	seq0 = k.seq;
	cr_assert_eq(ctr(h)->tcp_persist_probes, 1);
	/* still closed: probes back off */
	h_send_tcp(h, 41001, p.snd_nxt, seq0, TH_ACK, 0, NULL, 0, NULL, 0);
	h_advance(h, 1999);
	cr_assert_eq(h_pending(h), 0);
	h_advance(h, 1);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.seq, seq0);
	cr_assert_eq(k.dlen, 1);
	/* the window opens: the data flows */
	h_send_tcp(h, 41001, p.snd_nxt, seq0, TH_ACK, 8192, NULL, 0, NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.seq, seq0);
	cr_assert_eq(k.dlen, 100);
	cr_assert(memcmp(k.data, pattern, 100) == 0);
	h_free(h);
}

Test(tcp_data, bad_checksum_not_delivered)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS);
	uint8_t f[256];
	size_t n = h_build_tcp(f, H_PEER_IP, p.port, H_PORT, p.snd_nxt,
			       p.rcv_nxt, TH_ACK, 65535, NULL, 0, "abc", 3);

	f[n - 1] ^= 0xff;
	h_input(h, f, n);
	cr_assert_eq(p.u->rx_len, 0);
	cr_assert_eq(ctr(h)->tcp_bad_cksum, 1);
	cr_assert_eq(h_pending(h), 0);
	h_free(h);
}

Test(tcp_data, nobuf_when_pool_empty)
{
	struct net_config cfg;
	struct harness *h;
	struct h_peer a, b;

	h_config(&cfg);
	cfg.limits.rcv_slots = 1;
	h = h_new_ready(&cfg);
	init_pattern();
	h_peer_init(h, &a, 41010, HO_MSS);
	h_connect(h, &a, HO_MSS);
	h_peer_init(h, &b, 41011, HO_MSS);
	h_connect(h, &b, HO_MSS);
	a.u->consume_max = 0;
	h_peer_send(h, &a, "x", 1); /* a holds the only receive buffer */
	h_peer_send(h, &b, "y", 1);
	cr_assert_eq(b.u->rx_len, 0);
	cr_assert_eq(ctr(h)->tcp_rcv_nobuf, 1);
	a.u->consume_max = SIZE_MAX;
	tcp_resume(a.u->c); /* a's buffer goes back to the pool */
	h_peer_seg(h, &b, b.snd_nxt - 1, TH_ACK, "y", 1); /* retransmit */
	cr_assert_eq(b.u->rx_len, 1);
	h_free(h);
}

/* Peers that send one byte beyond a gap and never fill it hold a receive
 * ring each for as long as their connection lives. They get three quarters
 * of the pool at most: a connection sending in order still finds a ring. */
Test(tcp_data, out_of_order_bytes_leave_rings_for_in_order_data)
{
	struct net_config cfg;
	struct harness *h;
	struct h_peer p[9];

	h_config(&cfg);
	cfg.limits.rcv_slots = 8;
	h = h_new_ready(&cfg);
	for (unsigned i = 0; i < 9; i++) {
		h_peer_init(h, &p[i], (uint16_t)(41100 + i), HO_MSS);
		h_connect(h, &p[i], HO_MSS);
	}
	for (unsigned i = 0; i < 8; i++)
		h_peer_seg(h, &p[i], p[i].snd_nxt + 100, TH_ACK, "o", 1);
	cr_assert_eq(ctr(h)->tcp_ooo_segs, 8);
	cr_assert_eq(ctr(h)->tcp_ooo_drop, 2, "6 kept, 2 dropped: %llu",
		     (unsigned long long)ctr(h)->tcp_ooo_drop);
	h_peer_send(h, &p[8], "z", 1);
	cr_assert_eq(p[8].u->rx_len, 1, "in-order data found no ring");
	cr_assert_eq(ctr(h)->tcp_rcv_nobuf, 0);
	h_free(h);
}

Test(tcp_data, send_buffer_wait_and_wake)
{
	struct net_config cfg;
	struct harness *h;
	struct h_peer a, b;
	struct h_pkt k;

	h_config(&cfg);
	cfg.limits.snd_slots = 1;
	h = h_new_ready(&cfg);
	h_peer_init(h, &a, 41020, HO_MSS);
	h_connect(h, &a, HO_MSS);
	h_peer_init(h, &b, 41021, HO_MSS);
	h_connect(h, &b, HO_MSS);
	cr_assert_eq(tcp_send(a.u->c, "250 a\r\n", 7), 7);
	cr_assert_eq(tcp_send_room(b.u->c), 16384);
	cr_assert_eq(tcp_send(b.u->c, "250 b\r\n", 7), 0, "pool empty");
	cr_assert_eq(net_stack_counters(h->st)->tcp_snd_nobuf, 1);
	cr_assert_eq(b.u->sent_calls, 0);
	h_expect_tcp(h, &k);
	h_peer_saw(&a, &k);
	h_peer_ack(h, &a); /* a's ring goes back, b is woken */
	cr_assert_eq(b.u->sent_calls, 1);
	cr_assert_eq(tcp_send(b.u->c, "250 b\r\n", 7), 7);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.dport, 41021);
	cr_assert(memcmp(k.data, "250 b\r\n", 7) == 0);
	h_free(h);
}

Test(tcp_data, send_ring_wrap_odd_split_checksum)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS);
	struct h_pkt k;
	uint32_t base, got, total = 1001 + 16382;

	/* 1001 bytes sent, 999 ACKed: the ring's head sits at an odd offset
	 * (the ring stays taken), so a later segment spans the wrap with an
	 * odd first piece; h_next() checks every TCP checksum independently */
	cr_assert_eq(tcp_send(p.u->c, pattern, 1001), 1001);
	h_expect_tcp(h, &k);
	base = k.seq;
	p.rcv_nxt = base + 999;
	h_peer_ack(h, &p);
	got = 999;
	cr_assert_eq(tcp_send(p.u->c, pattern + 1001, 16382), 16382);
	for (int round = 0; got < total && round < 100; round++) {
		while (h_next(h, &k)) {
			uint32_t off = k.seq - base;
			cr_assert(memcmp(k.data, pattern + off, k.dlen) == 0);
			if (k.dlen && off <= got && off + k.dlen > got)
				got = off + (uint32_t)k.dlen;
		}
		p.rcv_nxt = base + got;
		h_peer_ack(h, &p);
		h_advance(h, 10);
	}
	cr_assert_eq(got, total);
	h_free(h);
}

Test(tcp_data, fin_out_of_order)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS | HO_SACK);
	struct h_pkt k;
	uint32_t b = p.snd_nxt;

	/* data+FIN arrives before the data in front of it */
	h_peer_seg(h, &p, b + 5, TH_ACK | TH_FIN, "world", 5);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, b);
	cr_assert_eq(p.u->eof_calls, 0);
	cr_assert_eq(tcp_conn_state(p.u->c), TCPS_ESTABLISHED);
	h_peer_seg(h, &p, b, TH_ACK, "hello", 5);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.ack, b + 11, "data and FIN acknowledged");
	cr_assert_eq(p.u->rx_len, 10);
	cr_assert(memcmp(p.u->rx, "helloworld", 10) == 0);
	cr_assert_eq(p.u->eof_calls, 1);
	cr_assert_eq(tcp_conn_state(p.u->c), TCPS_CLOSE_WAIT);
	h_free(h);
}

Test(tcp_data, segment_straddling_right_edge_trimmed)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS);
	struct h_pkt k;
	uint32_t b = p.snd_nxt;

	p.u->consume_max = 0;
	/* 16384-byte window: 16000 fit, a 1000-byte segment at 16000 is cut
	 * to 384 and its FIN dropped */
	for (uint32_t off = 0; off < 16000; off += 1000)
		h_peer_seg(h, &p, b + off, TH_ACK, pattern + off, 1000);
	h_peer_seg(h, &p, b + 16000, TH_ACK | TH_FIN, pattern + 16000, 1000);
	h_advance(h, 50);
	while (h_next(h, &k))
		;
	cr_assert_eq(k.ack, b + 16384);
	cr_assert_eq(k.wnd, 0);
	cr_assert_eq(tcp_conn_rcv_held(p.u->c), 16384);
	cr_assert_eq(tcp_conn_state(p.u->c), TCPS_ESTABLISHED, "FIN cut off");
	p.u->consume_max = SIZE_MAX;
	tcp_resume(p.u->c);
	cr_assert(memcmp(p.u->rx, pattern, 16384) == 0);
	h_free(h);
}

Test(tcp_data, segment_without_ack_ignored)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS);

	h_peer_seg(h, &p, p.snd_nxt, TH_PSH, "abc", 3);
	cr_assert_eq(p.u->rx_len, 0);
	cr_assert_eq(net_stack_counters(h->st)->tcp_no_ack, 1);
	h_free(h);
}

Test(tcp_data, old_ack_gets_challenge)
{
	struct h_peer p;
	struct harness *h = setup(&p, HO_MSS);
	struct h_pkt k;
	uint32_t rn = p.rcv_nxt;

	/* far below SND.UNA - MAX.SND.WND (RFC 5961 5.2) */
	p.rcv_nxt = rn - 200000;
	h_peer_send(h, &p, "abc", 3);
	p.snd_nxt -= 3;
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_ACK);
	cr_assert_eq(p.u->rx_len, 0, "data with a bogus ACK is dropped");
	cr_assert_eq(net_stack_counters(h->st)->tcp_ack_too_old, 1);
	h_free(h);
}

Test(tcp_data, close_while_waiting_for_send_buffer)
{
	struct net_config cfg;
	struct harness *h;
	struct h_peer a, b, c;
	struct h_pkt k;

	h_config(&cfg);
	cfg.limits.snd_slots = 1;
	h = h_new_ready(&cfg);
	h_peer_init(h, &a, 41030, HO_MSS);
	h_connect(h, &a, HO_MSS);
	h_peer_init(h, &b, 41031, HO_MSS);
	h_connect(h, &b, HO_MSS);
	h_peer_init(h, &c, 41032, HO_MSS);
	h_connect(h, &c, HO_MSS);
	cr_assert_eq(tcp_send(a.u->c, "x", 1), 1);
	cr_assert_eq(tcp_send(b.u->c, "y", 1), 0);
	cr_assert_eq(tcp_send(c.u->c, "z", 1), 0);
	tcp_abort(b.u->c); /* leaves the wait list */
	h_expect_tcp(h, &k);
	h_peer_saw(&a, &k);
	h_drain(h);
	h_peer_ack(h, &a);
	cr_assert_eq(c.u->sent_calls, 1, "the next waiter is woken");
	cr_assert_eq(tcp_send(c.u->c, "z", 1), 1);
	h_free(h);
}

Test(tcp_data, admission_control_on_buffer_pool)
{
	struct net_config cfg;
	struct harness *h;
	struct h_peer a, b;
	struct h_pkt k;

	h_config(&cfg);
	cfg.limits.rcv_slots = 2;
	cfg.limits.admit_min_rcv_free = 2;
	h = h_new_ready(&cfg);
	h_peer_init(h, &a, 41040, HO_MSS);
	h_connect(h, &a, HO_MSS);
	a.u->consume_max = 0;
	h_peer_send(h, &a, "x", 1); /* a busy session holds a buffer */
	h_peer_init(h, &b, 41041, HO_MSS);
	h_send_tcp(h, 41041, b.iss, 0, TH_SYN, 65535, NULL, 0, NULL, 0);
	h_advance(h, 50);
	while (h_next(h, &k))
		cr_assert_neq(k.dport, 41041, "SYN must be refused");
	cr_assert_eq(net_stack_counters(h->st)->tcp_syn_overload, 1);
	a.u->consume_max = SIZE_MAX;
	tcp_resume(a.u->c); /* buffer back: admitted again */
	h_drain(h);
	h_connect(h, &b, HO_MSS);
	h_free(h);
}

/* Property test of reassembly: random pieces of a 16 KiB stream, in random
 * order, overlapping and repeated; then the whole stream in order. The
 * upper layer must see exactly the stream, and every ACK/SACK must describe
 * only bytes that were sent. */
Test(tcp_data, reassembly_random_overlaps)
{
	uint64_t x = 0x2545f4914f6cdd1dULL;

	init_pattern();
	for (int round = 0; round < 200; round++) {
		struct h_peer p;
		struct harness *h = h_new_ready(NULL);
		static uint8_t have[16384];
		struct h_pkt k;
		uint32_t b;

		h_peer_init(h, &p, (uint16_t)(42000 + round), HO_ALL);
		h_connect(h, &p, HO_ALL);
		b = p.snd_nxt;
		memset(have, 0, sizeof(have));
		for (int i = 0; i < 12; i++) {
			uint32_t off, len;
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			off = (uint32_t)(x % 15000);
			len = 1 + (uint32_t)((x >> 20) % 1400);
			if (off + len > 16383)
				len = 16383 - off;
			h_peer_seg(h, &p, b + off, TH_ACK, pattern + off, len);
			memset(have + off, 1, len);
			while (h_next(h, &k)) {
				cr_assert(k.tcp);
				for (unsigned s = 0; s < k.n_sack; s++) {
					uint32_t lo = k.sack[s][0] - b;
					uint32_t hi = k.sack[s][1] - b;
					cr_assert_lt(lo, hi);
					cr_assert_leq(hi, 16383);
					cr_assert_gt(lo, k.ack - b,
						     "SACK block below ACK");
					for (uint32_t q = lo; q < hi; q++)
						cr_assert(have[q],
							  "SACKed byte %u never sent",
							  q);
				}
				for (uint32_t q = 0; q < k.ack - b; q++)
					cr_assert(have[q], "ACKed byte %u never sent",
						  q);
			}
		}
		/* fill in order, 1000 bytes at a time */
		for (uint32_t off = 0; off < 16383; off += 1000) {
			uint32_t len = 16383 - off < 1000 ? 16383 - off : 1000;
			h_peer_seg(h, &p, b + off, TH_ACK, pattern + off, len);
		}
		cr_assert_eq(p.u->rx_len, 16383, "round %d: got %zu", round,
			     p.u->rx_len);
		cr_assert(memcmp(p.u->rx, pattern, 16383) == 0,
			  "round %d: stream corrupted", round);
		h_free(h);
	}
}
