/* TCP passive open: option negotiation, SYN-ACK retransmission, duplicate
 * SYNs, bad segments in and around the handshake. */
#include <criterion/criterion.h>
#include <string.h>

#include "harness.h"

TestSuite(tcp_handshake);

static const struct net_counters *
ctr(struct harness *h)
{
	return net_stack_counters(h->st);
}

/* Segments the stack sends for 4000 bytes: their payload sizes. */
static size_t
first_seg_len(struct harness *h, struct h_peer *p)
{
	static uint8_t buf[4000];
	struct h_pkt k;

	memset(buf, 'x', sizeof(buf));
	cr_assert_eq(tcp_send(p->u->c, buf, sizeof(buf)), sizeof(buf));
	h_expect_tcp(h, &k);
	return k.dlen;
}

Test(tcp_handshake, no_options)
{
	struct harness *h = h_new_ready(NULL);
	struct h_peer p;
	struct h_pkt k;

	h_peer_init(h, &p, 40000, 0);
	h_peer_syn(h, &p, 0, &k);
	cr_assert(k.has_mss);
	cr_assert_eq(k.mss, 1460);
	cr_assert_not(k.has_ws);
	cr_assert_not(k.has_ts);
	cr_assert_not(k.sack_ok);
	cr_assert_eq(k.wnd, 16384);
	cr_assert_eq(k.sport, H_PORT);
	cr_assert_eq(k.dport, 40000);
	cr_assert_eq(tcp_state_name(TCPS_SYN_RECEIVED)[0], 'S');
	h_peer_seg(h, &p, p.snd_nxt, TH_ACK, NULL, 0);
	cr_assert_not_null(h->last_accepted);
	p.u = h->last_accepted;
	cr_assert_eq(p.u->remote.addr, H_PEER_IP);
	cr_assert_eq(p.u->remote.port, 40000);
	cr_assert_eq(h_pending(h), 0, "no reply to the final ACK");
	cr_assert_eq(first_seg_len(h, &p), 536, "RFC 9293: default MSS 536");
	cr_assert_eq(ctr(h)->tcp_accepted, 1);
	h_free(h);
}

Test(tcp_handshake, mss_only)
{
	struct harness *h = h_new_ready(NULL);
	struct h_peer p;
	struct h_pkt k;

	h_peer_init(h, &p, 40001, HO_MSS);
	h_peer_syn(h, &p, HO_MSS, &k);
	cr_assert(k.has_mss);
	cr_assert_not(k.has_ws || k.has_ts || k.sack_ok);
	h_peer_seg(h, &p, p.snd_nxt, TH_ACK, NULL, 0);
	p.u = h->last_accepted;
	cr_assert_not_null(p.u);
	cr_assert_eq(first_seg_len(h, &p), 1460);
	h_free(h);
}

Test(tcp_handshake, all_options)
{
	struct net_config cfg;
	struct harness *h;
	struct h_peer p;
	struct h_pkt k;

	h_config(&cfg);
	cfg.limits.rcv_buf = 131072;
	h = h_new_ready(&cfg);
	h_peer_init(h, &p, 40002, HO_ALL);
	h_peer_syn(h, &p, HO_ALL, &k);
	cr_assert(k.has_mss && k.has_ws && k.has_ts && k.sack_ok);
	cr_assert_eq(k.ws, 2, "131072 needs a shift of 2");
	cr_assert_eq(k.wnd, 65535, "SYN window is not scaled");
	cr_assert_eq(k.tsecr, p.ts, "echoes our TSval");
	h_peer_seg(h, &p, p.snd_nxt, TH_ACK, NULL, 0);
	p.u = h->last_accepted;
	cr_assert_not_null(p.u);
	cr_assert_eq(first_seg_len(h, &p), 1448, "1460 - 12 (timestamps)");
	/* every later segment: timestamps, scaled window */
	h_drain(h);
	h_peer_send(h, &p, "a", 1);
	h_advance(h, 50);
	h_expect_tcp(h, &k);
	cr_assert(k.has_ts);
	cr_assert_eq(k.tsecr, p.ts);
	/* 1 byte consumed: the edge moves by less than the SWS threshold,
	 * so it stays where it was: 131072 - 1, scaled down */
	cr_assert_eq(k.wnd, 32767, "window %u", k.wnd);
	h_free(h);
}

Test(tcp_handshake, ws_and_ts_without_sack)
{
	struct harness *h = h_new_ready(NULL);
	struct h_peer p;
	struct h_pkt k;

	h_peer_init(h, &p, 40003, HO_MSS | HO_WS | HO_TS);
	h_peer_syn(h, &p, HO_MSS | HO_WS | HO_TS, &k);
	cr_assert(k.has_ws && k.has_ts);
	cr_assert_not(k.sack_ok);
	cr_assert_eq(k.ws, 0);
	h_free(h);
}

Test(tcp_handshake, closed_port_gets_rst)
{
	struct harness *h = h_new_ready(NULL);
	struct h_pkt k;
	uint8_t f[128];
	size_t n = h_build_tcp(f, H_PEER_IP, 5555, 26, 777, 0, TH_SYN, 1000,
			       NULL, 0, NULL, 0);

	h_input(h, f, n);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_RST | TH_ACK);
	cr_assert_eq(k.seq, 0);
	cr_assert_eq(k.ack, 778);
	cr_assert_eq(ctr(h)->tcp_no_port, 1);
	/* an RST to a closed port is never answered */
	n = h_build_tcp(f, H_PEER_IP, 5555, 26, 777, 0, TH_RST, 0, NULL, 0,
			NULL, 0);
	h_input(h, f, n);
	cr_assert_eq(h_pending(h), 0);
	h_free(h);
}

Test(tcp_handshake, stray_ack_gets_rst)
{
	struct harness *h = h_new_ready(NULL);
	struct h_pkt k;

	h_send_tcp(h, 5556, 100, 123456, TH_ACK, 1000, NULL, 0, NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_RST);
	cr_assert_eq(k.seq, 123456);
	cr_assert_eq(ctr(h)->tcp_syncookies_bad, 1);
	h_free(h);
}

Test(tcp_handshake, duplicate_syn)
{
	struct harness *h = h_new_ready(NULL);
	struct h_peer p;
	struct h_pkt k1, k2;

	h_peer_init(h, &p, 40004, HO_MSS);
	h_peer_syn(h, &p, HO_MSS, &k1);
	h_peer_syn(h, &p, HO_MSS, &k2);
	cr_assert_eq(k1.seq, k2.seq, "same ISS for the same SYN");
	cr_assert_eq(ctr(h)->tcp_dup_syn, 1);
	cr_assert_eq(net_stack_conn_count(h->st), 1);
	/* a SYN with another ISN in SYN_RECEIVED (the client started over
	 * from the same port, a NAT reused it) is answered with an ACK
	 * (RFC 5961 4): the client's RST to it frees the entry. Dropped,
	 * the client heard nothing until the SYN-ACK retries ran out. */
	h_send_tcp(h, 40004, 5, 0, TH_SYN, 1000, NULL, 0, NULL, 0);
	h_expect_tcp(h, &k2);
	cr_assert_eq(k2.flags, TH_ACK);
	cr_assert_eq(k2.ack, p.iss + 1);
	cr_assert_eq(ctr(h)->tcp_syn_bad, 1);
	cr_assert_eq(ctr(h)->tcp_challenge_acks, 1);
	h_peer_seg(h, &p, p.snd_nxt, TH_ACK, NULL, 0);
	cr_assert_not_null(h->last_accepted);
	/* duplicate SYN once established: challenge ACK (RFC 5961 4) */
	h_send_tcp(h, 40004, p.iss, 0, TH_SYN, 1000, NULL, 0, NULL, 0);
	h_expect_tcp(h, &k2);
	cr_assert_eq(k2.flags, TH_ACK);
	cr_assert_eq(k2.ack, p.iss + 1);
	cr_assert_eq(ctr(h)->tcp_challenge_acks, 2);
	cr_assert_eq(tcp_conn_state(h->last_accepted->c), TCPS_ESTABLISHED);
	h_free(h);
}

Test(tcp_handshake, synack_retransmit_backoff_then_give_up)
{
	struct harness *h = h_new_ready(NULL);
	struct h_peer p;
	struct h_pkt k;
	uint64_t expect[] = {1000, 2000, 4000, 8000, 16000};

	h_peer_init(h, &p, 40005, HO_MSS);
	h_peer_syn(h, &p, HO_MSS, &k);
	for (unsigned i = 0; i < 5; i++) {
		h_advance(h, expect[i] - 1);
		cr_assert_eq(h_pending(h), 0, "too early (retry %u)", i);
		h_advance(h, 1);
		h_expect_tcp(h, &k);
		cr_assert_eq(k.flags, TH_SYN | TH_ACK);
	}
	h_advance(h, 32000);
	cr_assert_eq(h_pending(h), 0);
	cr_assert_eq(net_stack_conn_count(h->st), 0);
	cr_assert_eq(ctr(h)->tcp_synack_timeouts, 1);
	h_free(h);
}

Test(tcp_handshake, rst_in_syn_received)
{
	struct harness *h = h_new_ready(NULL);
	struct h_peer p;
	struct h_pkt k;

	h_peer_init(h, &p, 40006, 0);
	h_peer_syn(h, &p, 0, &k);
	h_send_tcp(h, 40006, p.iss + 1, 0, TH_RST, 0, NULL, 0, NULL, 0);
	cr_assert_eq(net_stack_conn_count(h->st), 0);
	cr_assert_eq(h_pending(h), 0);
	h_free(h);
}

Test(tcp_handshake, bad_ack_in_syn_received)
{
	struct harness *h = h_new_ready(NULL);
	struct h_peer p;
	struct h_pkt k;

	h_peer_init(h, &p, 40007, 0);
	h_peer_syn(h, &p, 0, &k);
	h_send_tcp(h, 40007, p.iss + 1, k.seq + 5, TH_ACK, 1000, NULL, 0,
		   NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_RST);
	cr_assert_eq(net_stack_conn_count(h->st), 1, "entry survives");
	cr_assert_null(h->last_accepted);
	h_free(h);
}

Test(tcp_handshake, refused_by_upper_layer)
{
	struct harness *h = h_new_ready(NULL);
	struct h_peer p;
	struct h_pkt k;

	h->refuse_accept = true;
	h_peer_init(h, &p, 40008, 0);
	h_peer_syn(h, &p, 0, &k);
	h_peer_seg(h, &p, p.snd_nxt, TH_ACK, NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert(k.flags & TH_RST);
	cr_assert_eq(net_stack_conn_count(h->st), 0);
	cr_assert_eq(ctr(h)->tcp_accept_refused, 1);
	h_free(h);
}

Test(tcp_handshake, malformed_segments)
{
	struct harness *h = h_new_ready(NULL);
	uint8_t f[128];
	size_t n;

	/* bad checksum */
	n = h_build_tcp(f, H_PEER_IP, 6000, H_PORT, 1, 0, TH_SYN, 1000, NULL,
			0, NULL, 0);
	f[14 + 20 + 4] ^= 1;
	h_input(h, f, n);
	cr_assert_eq(ctr(h)->tcp_bad_cksum, 1);
	/* the port vouched for it: accepted */
	net_stack_input(h->st, f, n, NET_RX_L4_CKSUM_GOOD);
	cr_assert_eq(h_pending(h), 1);
	h_drain(h);
	/* truncated header */
	n = h_build_tcp(f, H_PEER_IP, 6000, H_PORT, 1, 0, TH_SYN, 1000, NULL,
			0, NULL, 0);
	n = h_build_ip(f, H_PEER_IP, H_OUR_IP, 6, f + 34, 12);
	h_input(h, f, n);
	cr_assert_eq(ctr(h)->tcp_too_short, 1);
	/* data offset beyond the segment */
	n = h_build_tcp(f, H_PEER_IP, 6000, H_PORT, 1, 0, TH_SYN, 1000, NULL,
			0, NULL, 0);
	f[34 + 12] = 0xf0;
	h_input(h, f, n);
	cr_assert_eq(ctr(h)->tcp_bad_off + ctr(h)->tcp_bad_cksum, 2);
	/* SYN+FIN */
	n = h_build_tcp(f, H_PEER_IP, 6001, H_PORT, 1, 0, TH_SYN | TH_FIN,
			1000, NULL, 0, NULL, 0);
	h_input(h, f, n);
	cr_assert_eq(ctr(h)->tcp_bad_flags, 1);
	/* option running past the header */
	{
		uint8_t o[4] = {2, 9, 0, 0};
		n = h_build_tcp(f, H_PEER_IP, 6002, H_PORT, 1, 0, TH_SYN,
				1000, o, 4, NULL, 0);
		h_input(h, f, n);
		cr_assert_eq(ctr(h)->tcp_bad_options, 1);
	}
	cr_assert_eq(h_pending(h), 0);
	cr_assert_eq(net_stack_conn_count(h->st), 1);
	h_free(h);
}

Test(tcp_handshake, greeting_sent_from_accept)
{
	struct harness *h = h_new_ready(NULL);
	struct h_peer p;
	struct h_pkt k;

	h->greeting = "220 mx.example ESMTP\r\n";
	h_peer_init(h, &p, 40009, HO_ALL);
	h_connect(h, &p, HO_ALL);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.dlen, strlen(h->greeting));
	cr_assert(memcmp(k.data, h->greeting, k.dlen) == 0);
	cr_assert_eq(k.seq, p.rcv_nxt);
	cr_assert_eq(k.ack, p.snd_nxt);
	cr_assert_eq(h_pending(h), 0);
	h_free(h);
}

Test(tcp_handshake, close_and_abort_from_inside_accept)
{
	struct harness *h = h_new_ready(NULL);
	struct h_peer p;
	struct h_pkt k;

	/* close right after a 421 greeting */
	h->greeting = "421 busy\r\n";
	h->close_in_accept = true;
	h_peer_init(h, &p, 40010, HO_MSS);
	h_peer_syn(h, &p, HO_MSS, &k);
	h_peer_seg(h, &p, p.snd_nxt, TH_ACK, NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.dlen, 10);
	cr_assert(memcmp(k.data, "421 busy\r\n", 10) == 0);
	h_peer_saw(&p, &k);
	if (!(k.flags & TH_FIN)) {
		h_expect_tcp(h, &k);
		h_peer_saw(&p, &k);
	}
	cr_assert(k.flags & TH_FIN, "FIN after the 421");
	cr_assert_not(k.flags & TH_RST);
	cr_assert_eq(h_pending(h), 0);
	h_peer_ack(h, &p);
	h_peer_seg(h, &p, p.snd_nxt, TH_ACK | TH_FIN, NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.flags, TH_ACK);
	/* abort inside accept: RST, entry gone, no callback later */
	h->greeting = NULL;
	h->close_in_accept = false;
	h->abort_in_accept = true;
	h_peer_init(h, &p, 40011, HO_MSS);
	h_peer_syn(h, &p, HO_MSS, &k);
	h_peer_seg(h, &p, p.snd_nxt, TH_ACK, NULL, 0);
	h_expect_tcp(h, &k);
	cr_assert(k.flags & TH_RST);
	cr_assert_eq(net_stack_conn_count(h->st), 1, "only the TIME_WAIT");
	h_free(h);
}
