/* ARP: answering, resolving, holding frames, timeouts, gratuitous ARP. */
#include <criterion/criterion.h>
#include <string.h>

#include "harness.h"

static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
static const uint8_t zero[6];

TestSuite(arp);

Test(arp, gratuitous_at_start)
{
	struct harness *h = h_new(NULL);
	struct h_pkt p;

	net_stack_start(h->st);
	cr_assert(h_next(h, &p));
	cr_assert(p.arp);
	cr_assert(memcmp(p.dst, bcast, 6) == 0);
	cr_assert_eq(p.arp_op, 1);
	cr_assert_eq(p.arp_spa, H_OUR_IP);
	cr_assert_eq(p.arp_tpa, H_OUR_IP);
	cr_assert(memcmp(p.arp_sha, h_our_mac, 6) == 0);
	cr_assert_geq(p.len, 60, "padded to the Ethernet minimum");
	cr_assert_eq(net_stack_counters(h->st)->arp_gratuitous_tx, 1);
	cr_assert_not(h_next(h, &p));
	h_free(h);
}

Test(arp, request_for_us_is_answered)
{
	struct harness *h = h_new(NULL);
	struct h_pkt p;
	uint8_t f[64];
	size_t n = h_build_arp(f, 1, h_peer_mac, H_PEER_IP, zero, H_OUR_IP,
			       bcast);

	h_input(h, f, n);
	cr_assert(h_next(h, &p));
	cr_assert(p.arp);
	cr_assert_eq(p.arp_op, 2);
	cr_assert(memcmp(p.dst, h_peer_mac, 6) == 0);
	cr_assert(memcmp(p.arp_sha, h_our_mac, 6) == 0);
	cr_assert_eq(p.arp_spa, H_OUR_IP);
	cr_assert(memcmp(p.arp_tha, h_peer_mac, 6) == 0);
	cr_assert_eq(p.arp_tpa, H_PEER_IP);
	cr_assert_eq(net_stack_counters(h->st)->arp_requests_answered, 1);
	h_free(h);
}

Test(arp, request_for_other_ignored)
{
	struct harness *h = h_new(NULL);
	uint8_t f[64];
	size_t n = h_build_arp(f, 1, h_peer_mac, H_PEER_IP, zero, 0x0a000009,
			       bcast);

	h_input(h, f, n);
	cr_assert_eq(h_pending(h), 0);
	cr_assert_eq(net_stack_counters(h->st)->arp_not_for_us, 1);
	h_free(h);
}

Test(arp, malformed_counted)
{
	struct harness *h = h_new(NULL);
	uint8_t f[64];
	size_t n = h_build_arp(f, 1, h_peer_mac, H_PEER_IP, zero, H_OUR_IP,
			       bcast);

	h_input(h, f, 20); /* truncated */
	f[14 + 4] = 8;     /* hardware length */
	h_input(h, f, n);
	f[14 + 4] = 6;
	f[14 + 7] = 9; /* opcode */
	h_input(h, f, n);
	cr_assert_eq(h_pending(h), 0);
	cr_assert_eq(net_stack_counters(h->st)->arp_malformed, 3);
	h_free(h);
}

/* An echo request from an on-link host we do not know: the reply waits for
 * ARP resolution, then goes out to the learned MAC. */
static void
ping_from(struct harness *h, uint32_t src, uint16_t seq)
{
	uint8_t icmp[16] = {8, 0, 0, 0, 0, 1, 0, 0, 'a', 'b', 'c', 'd'};
	uint8_t f[128];
	uint32_t s = 0;
	size_t n;

	icmp[6] = (uint8_t)(seq >> 8);
	icmp[7] = (uint8_t)seq;
	for (int i = 0; i < 16; i += 2)
		s += (uint32_t)(icmp[i] << 8 | icmp[i + 1]);
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	icmp[2] = (uint8_t)(~s >> 8);
	icmp[3] = (uint8_t)~s;
	n = h_build_ip(f, src, H_OUR_IP, 1, icmp, sizeof(icmp));
	h_input(h, f, n);
}

Test(arp, resolve_holds_frame_until_reply)
{
	struct harness *h = h_new(NULL);
	struct h_pkt p;
	static const uint8_t mac3[6] = {0x02, 0, 0, 0, 0, 0x03};
	uint8_t f[64];
	size_t n;

	ping_from(h, 0x0a000003, 1);
	cr_assert(h_next(h, &p));
	cr_assert(p.arp);
	cr_assert_eq(p.arp_op, 1);
	cr_assert_eq(p.arp_tpa, 0x0a000003);
	cr_assert(memcmp(p.dst, bcast, 6) == 0);
	cr_assert_not(h_next(h, &p), "echo reply must wait for ARP");
	ping_from(h, 0x0a000003, 2); /* a second one waits too, no 2nd req */
	cr_assert_eq(h_pending(h), 0);

	n = h_build_arp(f, 2, mac3, 0x0a000003, h_our_mac, H_OUR_IP,
			h_our_mac);
	h_input(h, f, n);
	cr_assert(h_next(h, &p));
	cr_assert(p.icmp);
	cr_assert_eq(p.icmp_type, 0);
	cr_assert(memcmp(p.dst, mac3, 6) == 0);
	cr_assert_eq(p.icmp_seq, 1);
	cr_assert(h_next(h, &p));
	cr_assert_eq(p.icmp_seq, 2);
	/* cached now: the next reply goes at once */
	ping_from(h, 0x0a000003, 3);
	cr_assert(h_next(h, &p));
	cr_assert(p.icmp);
	cr_assert_eq(p.icmp_seq, 3);
	h_free(h);
}

Test(arp, offlink_goes_to_gateway)
{
	struct harness *h = h_new(NULL);
	struct h_pkt p;
	uint8_t f[64];
	size_t n;

	ping_from(h, 0xc0000209, 1); /* 192.0.2.9 */
	cr_assert(h_next(h, &p));
	cr_assert(p.arp);
	cr_assert_eq(p.arp_tpa, H_GW_IP);
	n = h_build_arp(f, 2, h_gw_mac, H_GW_IP, h_our_mac, H_OUR_IP,
			h_our_mac);
	h_input(h, f, n);
	cr_assert(h_next(h, &p));
	cr_assert(p.icmp);
	cr_assert(memcmp(p.dst, h_gw_mac, 6) == 0);
	cr_assert_eq(p.ip_dst, 0xc0000209);
	h_free(h);
}

Test(arp, resolution_failure_drops_held)
{
	struct harness *h = h_new(NULL);
	struct h_pkt p;
	unsigned reqs = 0;

	ping_from(h, 0x0a000003, 1);
	h_advance(h, 5000);
	while (h_next(h, &p)) {
		cr_assert(p.arp);
		reqs++;
	}
	cr_assert_eq(reqs, 3, "3 requests, 1 s apart (got %u)", reqs);
	cr_assert_eq(net_stack_counters(h->st)->arp_resolve_failed, 1);
	cr_assert_eq(net_stack_counters(h->st)->arp_queued_dropped, 1);
	h_free(h);
}

Test(arp, entry_expires_and_refreshes)
{
	struct harness *h = h_new_ready(NULL);
	struct h_pkt p;

	ping_from(h, H_PEER_IP, 1);
	cr_assert(h_next(h, &p));
	cr_assert(p.icmp);
	h_advance(h, 61000); /* past arp_timeout_ms */
	ping_from(h, H_PEER_IP, 2);
	cr_assert(h_next(h, &p));
	cr_assert(p.arp, "refresh request first");
	cr_assert_eq(p.arp_tpa, H_PEER_IP);
	cr_assert(h_next(h, &p));
	cr_assert(p.icmp, "stale entry still used");
	/* unanswered: retried, then forgotten */
	h_advance(h, 5000);
	h_drain(h);
	ping_from(h, H_PEER_IP, 3);
	cr_assert(h_next(h, &p));
	cr_assert(p.arp);
	cr_assert_not(h_next(h, &p), "held: entry was forgotten");
	h_free(h);
}

Test(arp, hold_queue_bounded)
{
	struct net_config cfg;
	struct harness *h;

	h_config(&cfg);
	cfg.limits.arp_queue = 2;
	h = h_new(&cfg);
	for (uint16_t i = 0; i < 5; i++)
		ping_from(h, 0x0a000003, i);
	cr_assert_eq(net_stack_counters(h->st)->arp_queue_full, 3);
	h_free(h);
}

Test(arp, silent_shard_learns_but_does_not_answer)
{
	struct net_config cfg;
	struct harness *h;
	struct h_pkt p;
	uint8_t f[64];
	size_t n;

	h_config(&cfg);
	cfg.arp_reply = false;
	h = h_new(&cfg);
	n = h_build_arp(f, 1, h_peer_mac, H_PEER_IP, zero, H_OUR_IP, bcast);
	h_input(h, f, n);
	cr_assert_eq(h_pending(h), 0, "another shard answers");
	ping_from(h, H_PEER_IP, 9); /* but the peer's MAC was learned */
	cr_assert(h_next(h, &p));
	cr_assert(p.icmp);
	cr_assert(memcmp(p.dst, h_peer_mac, 6) == 0);
	h_free(h);
}

Test(arp, table_full_of_pending_resolutions)
{
	struct net_config cfg;
	struct harness *h;
	struct h_pkt p;

	h_config(&cfg);
	cfg.limits.arp_entries = 1;
	h = h_new(&cfg);
	ping_from(h, 0x0a000003, 1); /* the only entry: INCOMPLETE */
	cr_assert(h_next(h, &p));
	cr_assert(p.arp);
	ping_from(h, 0x0a000004, 1); /* no entry to evict */
	cr_assert_not(h_next(h, &p));
	cr_assert_eq(net_stack_counters(h->st)->arp_table_full, 1);
	h_free(h);
}
