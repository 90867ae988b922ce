/* The shard as a whole: configuration checks, memory per connection, pools
 * returning to their starting count, the RSS hash and shard ownership. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "harness.h"

TestSuite(net_stack);

Test(net_stack, rejects_bad_config)
{
	struct net_config cfg;
	struct harness *h = h_new(NULL); /* for a valid base */

	cfg = h->cfg;
	cfg.limits.rcv_buf = 3000; /* not a power of two */
	cr_assert_null(net_stack_create(&cfg));
	cfg = h->cfg;
	cfg.mtu = 100;
	cr_assert_null(net_stack_create(&cfg));
	cfg = h->cfg;
	cfg.tx = NULL;
	cr_assert_null(net_stack_create(&cfg));
	cfg = h->cfg;
	cfg.limits.max_conns = 0;
	cr_assert_null(net_stack_create(&cfg));
	cfg = h->cfg;
	cfg.delack_ms = 500;
	cr_assert_null(net_stack_create(&cfg));
	h_free(h);
}

Test(net_stack, memory_per_idle_connection)
{
	struct net_config cfg;
	struct harness *h;
	struct net_memory m;
	struct net_pool_stats ps;
	struct h_peer p;

	h_config(&cfg);
	cfg.limits.max_conns = 10000;
	h = h_new_ready(&cfg);
	net_stack_memory(h->st, &m);
	cr_log_info("bytes per idle connection: %zu (entry %zu + table %zu); "
	       "receive buffer %zu, send buffer %zu, only while in use; "
	       "10000-connection shard total %zu",
	       m.idle_conn, m.per_conn, m.per_conn_table, m.rcv_slot,
	       m.snd_slot, m.total);
	cr_assert_leq(m.per_conn, 320, "connection entry grew: %zu",
		      m.per_conn);
	cr_assert_leq(m.idle_conn, 330);
	/* an idle connection after an exchange holds no buffer */
	h_peer_init(h, &p, 48000, HO_ALL);
	h_connect(h, &p, HO_ALL);
	h_peer_send(h, &p, "EHLO x\r\n", 8);
	tcp_send(p.u->c, "250 ok\r\n", 8);
	{
		struct h_pkt k;
		while (h_next(h, &k))
			h_peer_saw(&p, &k);
	}
	h_peer_ack(h, &p);
	net_stack_pools(h->st, &ps);
	cr_assert_eq(ps.conns_used, 1);
	cr_assert_eq(ps.rcv_free, ps.rcv_slots, "idle: no receive buffer");
	cr_assert_eq(ps.snd_free, ps.snd_slots, "idle: no send buffer");
	h_free(h);
}

Test(net_stack, pools_return_after_close)
{
	struct harness *h = h_new_ready(NULL);
	struct net_pool_stats ps;
	struct h_peer p[8];
	struct h_pkt k;

	for (unsigned i = 0; i < 8; i++) {
		h_peer_init(h, &p[i], (uint16_t)(48100 + i), HO_ALL);
		h_connect(h, &p[i], HO_ALL);
	}
	for (unsigned i = 0; i < 8; i++) {
		p[i].u->consume_max = i & 1 ? 0 : SIZE_MAX;
		h_peer_send(h, &p[i], "data", 4);
		tcp_send(p[i].u->c, "reply", 5);
	}
	net_stack_pools(h->st, &ps);
	cr_assert_lt(ps.rcv_free, ps.rcv_slots);
	for (unsigned i = 0; i < 8; i++) {
		if (i & 2)
			tcp_abort(p[i].u->c);
		else
			tcp_close(p[i].u->c);
	}
	while (h_next(h, &k))
		for (unsigned i = 0; i < 8; i++)
			h_peer_saw(&p[i], &k);
	for (unsigned i = 0; i < 8; i++)
		if (!(i & 2)) {
			h_peer_ack(h, &p[i]);
			h_peer_seg(h, &p[i], p[i].snd_nxt, TH_ACK | TH_FIN,
				   NULL, 0);
		}
	h_advance(h, 61000);
	net_stack_pools(h->st, &ps);
	cr_assert_eq(ps.conns_used, 0);
	cr_assert_eq(ps.rcv_free, ps.rcv_slots);
	cr_assert_eq(ps.snd_free, ps.snd_slots);
	cr_assert_eq(ps.syn_received, 0);
	h_free(h);
}

static uint32_t
ip4(unsigned a, unsigned b, unsigned c, unsigned d)
{
	return (uint32_t)(a << 24 | b << 16 | c << 8 | d);
}

Test(net_stack, toeplitz_known_answers)
{
	/* Microsoft's RSS verification key and vectors */
	static const uint8_t key[40] = {
		0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67,
		0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0, 0xd0, 0xca, 0x2b, 0xcb,
		0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30,
		0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa};
	uint8_t in[12];
	uint32_t s = ip4(66, 9, 149, 187), d = ip4(161, 142, 100, 80);

	in[0] = (uint8_t)(s >> 24);
	in[1] = (uint8_t)(s >> 16);
	in[2] = (uint8_t)(s >> 8);
	in[3] = (uint8_t)s;
	in[4] = (uint8_t)(d >> 24);
	in[5] = (uint8_t)(d >> 16);
	in[6] = (uint8_t)(d >> 8);
	in[7] = (uint8_t)d;
	in[8] = 2794 >> 8;
	in[9] = 2794 & 0xff;
	in[10] = 1766 >> 8;
	in[11] = 1766 & 0xff;
	cr_assert_eq(net_toeplitz(key, 40, in, 8), 0x323e8fc2);
	cr_assert_eq(net_toeplitz(key, 40, in, 12), 0x51ccc178);
}

Test(net_stack, flow_hash_is_symmetric)
{
	uint64_t x = 88172645463325252ULL;

	for (int i = 0; i < 10000; i++) {
		uint32_t a, b;
		uint16_t p, q;
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		a = (uint32_t)x;
		b = (uint32_t)(x >> 32);
		p = (uint16_t)(x >> 11);
		q = (uint16_t)(x >> 27);
		cr_assert_eq(net_flow_hash(a, b, p, q), net_flow_hash(b, a, q, p));
		cr_assert_lt(net_shard_of(net_flow_hash(a, b, p, q), 3), 3);
	}
	cr_assert_eq(net_shard_of(12345, 0), 0);
}

/* The redirection table the port is programmed with puts every flow on
 * the queue of the shard that owns it (net_shard_of), for table sizes that
 * are multiples of 128 and any shard count: with entry i on queue i % n a
 * 512-entry table sent two thirds of the flows of 3 shards to another
 * shard's queue (a hand-off each packet). */
Test(net_stack, reta_agrees_with_the_shard_of_every_hash)
{
	static const unsigned sizes[] = { 128, 256, 512 };
	uint64_t x = 0x9e3779b97f4a7c15ull;

	for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++)
		for (unsigned n = 1; n <= 8; n++)
			for (int i = 0; i < 2000; i++) {
				uint32_t h;

				x ^= x << 13;
				x ^= x >> 7;
				x ^= x << 17;
				h = (uint32_t)x;
				cr_assert_eq(net_reta_queue(h % sizes[k], n),
					     net_shard_of(h, n),
					     "size %u, %u shards, hash %08x",
					     sizes[k], n, h);
			}
	cr_assert_eq(net_reta_queue(5, 0), 0);
}

Test(net_stack, flows_spread_over_shards)
{
	unsigned count[4] = {0};

	for (uint16_t port = 1024; port < 1024 + 4000; port++)
		count[net_shard_of(net_flow_hash(ip4(10, 0, 0, 2), H_OUR_IP,
						 port, 25),
				   4)]++;
	for (int i = 0; i < 4; i++)
		cr_assert_gt(count[i], 600, "shard %d got %u of 4000", i,
			     count[i]);
}

Test(net_stack, state_names)
{
	cr_assert_str_eq(tcp_state_name(TCPS_ESTABLISHED), "ESTABLISHED");
	cr_assert_str_eq(tcp_state_name(TCPS_TIME_WAIT), "TIME_WAIT");
	cr_assert_str_eq(tcp_state_name(TCPS_LAST_ACK), "LAST_ACK");
	cr_assert_str_eq(tcp_state_name((enum tcp_state)99), "?");
}

#include "net/net_priv.h"

static uint16_t
ref_csum(const uint8_t *p, size_t n)
{
	uint32_t s = 0;
	for (size_t i = 0; i + 1 < n; i += 2)
		s += (uint32_t)(p[i] << 8 | p[i + 1]);
	if (n & 1)
		s += (uint32_t)p[n - 1] << 8;
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (uint16_t)~s;
}

Test(net_stack, checksum_matches_reference)
{
	static uint8_t buf[2048];
	uint64_t x = 0x1234567;

	for (size_t i = 0; i < sizeof(buf); i++) {
		x = x * 6364136223846793005ULL + 1442695040888963407ULL;
		buf[i] = (uint8_t)(x >> 56);
	}
	memset(buf + 100, 0xff, 200); /* carries */
	for (size_t off = 0; off < 8; off++)
		for (size_t n = 0; n < 1600; n += (n < 64 ? 1 : 37)) {
			uint16_t got = net_csum_fold(net_csum_add(0, buf + off, n));
			cr_assert_eq(got, ref_csum(buf + off, n),
				     "off %zu len %zu", off, n);
			/* continuing a running sum (even first piece) */
			if (n >= 10)
				cr_assert_eq(net_csum_fold(net_csum_add(
						     net_csum_add(0, buf + off, 10),
						     buf + off + 10, n - 10)),
					     ref_csum(buf + off, n));
		}
}
