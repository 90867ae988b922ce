/* IPv4 validation and ICMP echo: every malformed frame is dropped and
 * counted, never answered, never a crash. */
#include <criterion/criterion.h>
#include <string.h>

#include "harness.h"

TestSuite(ipv4);

static size_t
echo_frame(uint8_t *f, const char *data)
{
	uint8_t icmp[64] = {8, 0, 0, 0, 0x12, 0x34, 0, 7};
	size_t dl = strlen(data), n = 8 + dl;
	uint32_t s = 0;

	memcpy(icmp + 8, data, dl);
	for (size_t i = 0; i + 1 < n; i += 2)
		s += (uint32_t)(icmp[i] << 8 | icmp[i + 1]);
	if (n & 1)
		s += (uint32_t)icmp[n - 1] << 8;
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	icmp[2] = (uint8_t)(~s >> 8);
	icmp[3] = (uint8_t)~s;
	return h_build_ip(f, H_PEER_IP, H_OUR_IP, 1, icmp, n);
}

static void
fix_ip_cksum(uint8_t *f)
{
	uint8_t *ip = f + 14;
	size_t hl = (size_t)(ip[0] & 0xf) * 4;
	uint32_t s = 0;

	ip[10] = ip[11] = 0;
	for (size_t i = 0; i < hl; i += 2)
		s += (uint32_t)(ip[i] << 8 | ip[i + 1]);
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	ip[10] = (uint8_t)(~s >> 8);
	ip[11] = (uint8_t)~s;
}

Test(ipv4, echo_reply)
{
	struct harness *h = h_new_ready(NULL);
	struct h_pkt p;
	uint8_t f[128];
	size_t n = echo_frame(f, "hello, odd");

	h_input(h, f, n);
	cr_assert(h_next(h, &p));
	cr_assert(p.icmp);
	cr_assert_eq(p.icmp_type, 0);
	cr_assert_eq(p.icmp_code, 0);
	cr_assert_eq(p.icmp_id, 0x1234);
	cr_assert_eq(p.icmp_seq, 7);
	cr_assert_eq(p.dlen, 10);
	cr_assert(memcmp(p.data, "hello, odd", 10) == 0);
	cr_assert_eq(p.ip_dst, H_PEER_IP);
	cr_assert(memcmp(p.dst, h_peer_mac, 6) == 0);
	cr_assert_eq(net_stack_counters(h->st)->icmp_echo_replied, 1);
	h_free(h);
}

Test(ipv4, ethernet_padding_trimmed)
{
	struct harness *h = h_new_ready(NULL);
	struct h_pkt p;
	uint8_t f[128];
	size_t n = echo_frame(f, "x");

	memset(f + n, 0xee, 20); /* trailer beyond the IP total length */
	h_input(h, f, n + 20);
	cr_assert(h_next(h, &p));
	cr_assert(p.icmp);
	cr_assert_eq(p.dlen, 1);
	h_free(h);
}

#define DROPPED(field)                                                         \
	do {                                                                   \
		h_input(h, f, n);                                              \
		cr_assert_eq(h_pending(h), 0, "answered a bad frame");         \
		cr_assert_eq(net_stack_counters(h->st)->field, 1, #field);     \
	} while (0)

Test(ipv4, runt_and_wrong_mac_and_ethertype)
{
	struct harness *h = h_new_ready(NULL);
	uint8_t f[128];
	size_t n;

	n = 10;
	memset(f, 0, sizeof(f));
	DROPPED(rx_runt);
	n = echo_frame(f, "x");
	f[0] = 0x04;
	DROPPED(rx_not_for_us);
	n = echo_frame(f, "x");
	f[12] = 0x86;
	f[13] = 0xdd; /* IPv6 */
	DROPPED(rx_ethertype);
	h_free(h);
}

Test(ipv4, truncated_header)
{
	struct harness *h = h_new_ready(NULL);
	uint8_t f[128];
	size_t n = echo_frame(f, "x");

	for (size_t cut = 14; cut < 34; cut++)
		h_input(h, f, cut);
	cr_assert_eq(h_pending(h), 0);
	cr_assert_eq(net_stack_counters(h->st)->ip_too_short, 20);
	n = 14 + 21; /* header fine, total length says more */
	DROPPED(ip_bad_len);
	h_free(h);
}

Test(ipv4, bad_version_ihl_len)
{
	struct harness *h = h_new_ready(NULL);
	uint8_t f[128];
	size_t n;

	n = echo_frame(f, "x");
	f[14] = 0x65;
	fix_ip_cksum(f);
	DROPPED(ip_bad_version);
	n = echo_frame(f, "x");
	f[14] = 0x44;
	DROPPED(ip_bad_ihl);
	n = echo_frame(f, "x");
	f[14] = 0x4f; /* 60 bytes > frame */
	h_input(h, f, n);
	cr_assert_eq(h_pending(h), 0);
	cr_assert_eq(net_stack_counters(h->st)->ip_bad_ihl, 2);
	h_free(h);
}

Test(ipv4, bad_total_length)
{
	struct harness *h = h_new_ready(NULL);
	uint8_t f[128];
	size_t n = echo_frame(f, "x");

	f[16] = 0;
	f[17] = 10; /* < header */
	fix_ip_cksum(f);
	DROPPED(ip_bad_len);
	h_free(h);
}

Test(ipv4, bad_checksum)
{
	struct harness *h = h_new_ready(NULL);
	uint8_t f[128];
	size_t n = echo_frame(f, "x");

	f[24] ^= 0x40;
	DROPPED(ip_bad_cksum);
	/* the port said the checksum is good: believed */
	net_stack_input(h->st, f, n, NET_RX_IPV4_CKSUM_GOOD);
	cr_assert_eq(h_pending(h), 1);
	h_free(h);
}

Test(ipv4, fragments_dropped)
{
	struct harness *h = h_new_ready(NULL);
	uint8_t f[128];
	size_t n = echo_frame(f, "x");

	f[20] = 0x20; /* MF */
	f[21] = 0;
	fix_ip_cksum(f);
	DROPPED(ip_fragments);
	n = echo_frame(f, "x");
	f[20] = 0x00;
	f[21] = 0x10; /* offset */
	fix_ip_cksum(f);
	h_input(h, f, n);
	cr_assert_eq(net_stack_counters(h->st)->ip_fragments, 2);
	cr_assert_eq(h_pending(h), 0);
	h_free(h);
}

Test(ipv4, options_dropped)
{
	struct harness *h = h_new_ready(NULL);
	uint8_t f[128], g[128];
	size_t n = echo_frame(g, "x");

	/* insert 4 bytes of options (NOPs + EOL) */
	memcpy(f, g, 34);
	f[34] = 1;
	f[35] = 1;
	f[36] = 1;
	f[37] = 0;
	memcpy(f + 38, g + 34, n - 34);
	n += 4;
	f[14] = 0x46;
	f[17] = (uint8_t)(f[17] + 4);
	fix_ip_cksum(f);
	DROPPED(ip_options);
	h_free(h);
}

Test(ipv4, ttl_zero_not_for_us_bad_source_unknown_proto)
{
	struct harness *h = h_new_ready(NULL);
	uint8_t f[128];
	size_t n;

	n = echo_frame(f, "x");
	f[22] = 0;
	fix_ip_cksum(f);
	DROPPED(ip_ttl_zero);
	n = echo_frame(f, "x");
	f[33] = 9;
	fix_ip_cksum(f);
	DROPPED(ip_not_for_us);
	n = echo_frame(f, "x");
	f[26] = f[27] = f[28] = f[29] = 0xff;
	fix_ip_cksum(f);
	DROPPED(ip_bad_src);
	n = echo_frame(f, "x");
	f[23] = 17;
	fix_ip_cksum(f);
	DROPPED(ip_unknown_proto);
	h_free(h);
}

Test(ipv4, icmp_bad_and_other)
{
	struct harness *h = h_new_ready(NULL);
	uint8_t f[128];
	size_t n;

	n = echo_frame(f, "x");
	f[34 + 8] ^= 1;
	DROPPED(icmp_bad_cksum);
	n = echo_frame(f, "x");
	n = h_build_ip(f, H_PEER_IP, H_OUR_IP, 1, f + 34, 4);
	DROPPED(icmp_too_short);
	h_free(h);
}

Test(ipv4, tx_offload_flags)
{
	struct net_config cfg;
	struct harness *h;
	struct h_pkt p;
	struct h_peer peer;

	h_config(&cfg);
	cfg.tx_offload = NET_OFFLOAD_IPV4_CKSUM | NET_OFFLOAD_L4_CKSUM;
	h = h_new_ready(&cfg);
	h_peer_init(h, &peer, 4000, 0);
	h_send_tcp(h, 4000, 1, 0, TH_SYN, 65535, NULL, 0, NULL, 0);
	cr_assert(h_next(h, &p)); /* parse checks the pseudo-header sum */
	cr_assert(p.tcp);
	cr_assert_eq(p.meta.flags,
		     NET_OFFLOAD_IPV4_CKSUM | NET_OFFLOAD_L4_CKSUM);
	cr_assert_eq(p.raw[24], 0);
	cr_assert_eq(p.raw[25], 0);
	cr_assert_eq(p.meta.l2_len, 14);
	cr_assert_eq(p.meta.l3_len, 20);
	cr_assert_eq(p.meta.l4_len, 24);
	h_free(h);
}

Test(ipv4, offlink_without_gateway_no_route)
{
	struct net_config cfg;
	struct harness *h;
	uint8_t f[128], icmp[8] = {8, 0, 0xf7, 0xff, 0, 0, 0, 0};
	size_t n;

	h_config(&cfg);
	cfg.gateway = 0;
	h = h_new_ready(&cfg);
	n = h_build_ip(f, 0xc0000209, H_OUR_IP, 1, icmp, sizeof(icmp));
	h_input(h, f, n);
	cr_assert_eq(h_pending(h), 0);
	cr_assert_eq(net_stack_counters(h->st)->icmp_echo_replied, 1);
	cr_assert_eq(net_stack_counters(h->st)->ip_no_route, 1);
	h_free(h);
}
