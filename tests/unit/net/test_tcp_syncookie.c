/* SYN cookies (RFC 4987 3.6) when the SYN backlog is full. */
#include <criterion/criterion.h>
#include <string.h>

#include "harness.h"

TestSuite(tcp_syncookie);

static const struct net_counters *
ctr(struct harness *h)
{
	return net_stack_counters(h->st);
}

static struct harness *
full_backlog(void)
{
	struct net_config cfg;
	struct harness *h;
	struct h_peer p;
	struct h_pkt k;

	h_config(&cfg);
	cfg.limits.syn_backlog = 2;
	h = h_new_ready(&cfg);
	for (uint16_t i = 0; i < 2; i++) {
		h_peer_init(h, &p, (uint16_t)(44000 + i), HO_MSS);
		h_peer_syn(h, &p, HO_MSS, &k);
	}
	cr_assert_eq(net_stack_conn_count(h->st), 2);
	return h;
}

static void
syn_with_mss(struct harness *h, uint16_t port, uint32_t iss, uint16_t mss,
	     bool all, struct h_pkt *k)
{
	uint8_t o[20] = {2, 4, (uint8_t)(mss >> 8), (uint8_t)mss, 4, 2, 8, 10,
			 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7};

	h_send_tcp(h, port, iss, 0, TH_SYN, 65535, o, all ? 20 : 4, NULL, 0);
	h_expect_tcp(h, k);
	cr_assert_eq(k->flags, TH_SYN | TH_ACK);
	cr_assert_eq(k->ack, iss + 1);
}

Test(tcp_syncookie, cookie_ack_completes_handshake)
{
	struct harness *h = full_backlog();
	struct h_pkt k;
	struct h_upper *u;

	syn_with_mss(h, 45000, 5000, 1460, true, &k);
	cr_assert_eq(ctr(h)->tcp_syncookies_sent, 1);
	cr_assert_eq(net_stack_conn_count(h->st), 2, "no state kept");
	cr_assert(k.has_mss);
	cr_assert_not(k.has_ws || k.has_ts || k.sack_ok,
		      "a cookie carries no other option");
	h_send_tcp(h, 45000, 5001, k.seq + 1, TH_ACK, 65535, NULL, 0, NULL,
		   0);
	cr_assert_eq(ctr(h)->tcp_syncookies_ok, 1);
	cr_assert_not_null(h->last_accepted);
	u = h->last_accepted;
	cr_assert_eq(u->remote.port, 45000);
	cr_assert_eq(tcp_conn_state(u->c), TCPS_ESTABLISHED);
	/* and it works */
	h_send_tcp(h, 45000, 5001, k.seq + 1, TH_ACK | TH_PSH, 65535, NULL, 0,
		   "EHLO a\r\n", 8);
	cr_assert_eq(u->rx_len, 8);
	cr_assert_eq(tcp_send(u->c, "250 hi\r\n", 8), 8);
	h_expect_tcp(h, &k);
	cr_assert_eq(k.dlen, 8);
	cr_assert_eq(k.ack, 5001 + 8);
	h_free(h);
}

Test(tcp_syncookie, data_on_cookie_ack)
{
	struct harness *h = full_backlog();
	struct h_pkt k;

	syn_with_mss(h, 45001, 7000, 1460, false, &k);
	h_send_tcp(h, 45001, 7001, k.seq + 1, TH_ACK | TH_PSH, 65535, NULL, 0,
		   "QUIT\r\n", 6);
	cr_assert_not_null(h->last_accepted);
	cr_assert_eq(h->last_accepted->rx_len, 6);
	h_free(h);
}

Test(tcp_syncookie, mss_is_encoded)
{
	struct harness *h = full_backlog();
	struct h_pkt k;
	static uint8_t big[3000];

	syn_with_mss(h, 45002, 9000, 1400, false, &k);
	h_send_tcp(h, 45002, 9001, k.seq + 1, TH_ACK, 65535, NULL, 0, NULL,
		   0);
	cr_assert_not_null(h->last_accepted);
	cr_assert_eq(tcp_send(h->last_accepted->c, big, sizeof(big)),
		     sizeof(big));
	h_expect_tcp(h, &k);
	cr_assert_eq(k.dlen, 1400);
	h_free(h);
}

Test(tcp_syncookie, forged_and_expired_cookies_rejected)
{
	struct harness *h = full_backlog();
	struct h_pkt k, r;

	syn_with_mss(h, 45003, 1111, 1460, false, &k);
	h_send_tcp(h, 45003, 1112, k.seq + 2, TH_ACK, 65535, NULL, 0, NULL,
		   0);
	h_expect_tcp(h, &r);
	cr_assert_eq(r.flags, TH_RST);
	/* another peer ISN than the cookie was made for */
	h_send_tcp(h, 45003, 1113, k.seq + 1, TH_ACK, 65535, NULL, 0, NULL,
		   0);
	h_expect_tcp(h, &r);
	cr_assert_eq(r.flags, TH_RST);
	cr_assert_eq(ctr(h)->tcp_syncookies_bad, 2);
	/* the right one, too late (> 128 s) */
	h->now_us += 130ull * 1000 * 1000;
	h_send_tcp(h, 45003, 1112, k.seq + 1, TH_ACK, 65535, NULL, 0, NULL,
		   0);
	h_expect_tcp(h, &r);
	cr_assert_eq(r.flags, TH_RST);
	cr_assert_eq(ctr(h)->tcp_syncookies_ok, 0);
	h_free(h);
}

Test(tcp_syncookie, full_table_uses_cookies)
{
	struct net_config cfg;
	struct harness *h;
	struct h_peer p;
	struct h_pkt k;

	h_config(&cfg);
	cfg.limits.max_conns = 2;
	h = h_new_ready(&cfg);
	for (uint16_t i = 0; i < 2; i++) {
		h_peer_init(h, &p, (uint16_t)(46000 + i), HO_MSS);
		h_connect(h, &p, HO_MSS);
	}
	syn_with_mss(h, 46005, 100, 1460, false, &k);
	cr_assert_eq(ctr(h)->tcp_syncookies_sent, 1);
	/* the cookie is good but there is no room: dropped, counted */
	h_send_tcp(h, 46005, 101, k.seq + 1, TH_ACK, 65535, NULL, 0, NULL, 0);
	cr_assert_eq(ctr(h)->tcp_conn_full, 1);
	cr_assert_eq(net_stack_conn_count(h->st), 2);
	h_free(h);
}
