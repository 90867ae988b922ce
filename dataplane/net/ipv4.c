/*
 * IPv4 (RFC 791, RFC 1122 3.2.1): validate and deliver datagrams addressed
 * to our unicast address; route and frame what we send.
 *
 * Input checks, each dropped and counted: length >= 20, version 4,
 * IHL >= 5 and within the frame, total length within the frame (trailing
 * Ethernet padding is trimmed), header checksum (unless the port verified
 * it), no fragment (MF or offset: we never reassemble; RFC 1122 3.3.2 makes
 * reassembly a MUST that we knowingly skip: XXX a TCP peer never fragments
 * with DF and our MSS), no options (IHL > 5: we process none, so we drop
 * rather than misread; RFC 1122 3.2.1.8 would have us accept some), TTL > 0,
 * destination == our address, source neither 0, broadcast, multicast,
 * loopback, our own address nor our subnet's broadcast (RFC 1122 3.2.1.3).
 *
 * Output: DF set, TTL 64, ID 0 (RFC 6864 4.1: atomic datagrams), next hop =
 * destination when on-link (same prefix), else the gateway.
 */
#include <string.h>

#include "net/net_priv.h"

static bool
bad_source(const struct net_stack *st, uint32_t src)
{
	uint32_t bcast = (st->cfg.addr & st->netmask) | ~st->netmask;

	if (src == 0 || src == 0xffffffffu || src == st->cfg.addr)
		return true;
	if ((src >> 28) == 0xe || (src >> 28) == 0xf || (src >> 24) == 127)
		return true;
	return st->netmask != 0xffffffffu && st->netmask != 0xfffffffeu &&
	       src == bcast;
}

void
ipv4_input(struct net_stack *st, const uint8_t *p, size_t len,
	   unsigned rx_flags)
{
	size_t hl, tot;
	uint16_t frag;
	uint32_t src, dst;

	st->ctr.ip_rx++;
	if (len < IP_HLEN) {
		st->ctr.ip_too_short++;
		return;
	}
	if ((p[0] >> 4) != 4) {
		st->ctr.ip_bad_version++;
		return;
	}
	hl = (size_t)(p[0] & 0xf) * 4;
	if (hl < IP_HLEN || hl > len) {
		st->ctr.ip_bad_ihl++;
		return;
	}
	tot = net_rd16(p + 2);
	if (tot < hl || tot > len) {
		st->ctr.ip_bad_len++;
		return;
	}
	if (!(rx_flags & NET_RX_IPV4_CKSUM_GOOD) &&
	    net_csum_fold(net_csum_add(0, p, hl)) != 0) {
		st->ctr.ip_bad_cksum++;
		return;
	}
	frag = net_rd16(p + 6);
	if ((frag & 0x2000u) || (frag & 0x1fffu)) {
		st->ctr.ip_fragments++;
		return;
	}
	if (hl > IP_HLEN) {
		st->ctr.ip_options++;
		return;
	}
	if (p[8] == 0) {
		st->ctr.ip_ttl_zero++;
		return;
	}
	src = net_rd32(p + 12);
	dst = net_rd32(p + 16);
	if (dst != st->cfg.addr) {
		st->ctr.ip_not_for_us++;
		return;
	}
	if (bad_source(st, src)) {
		st->ctr.ip_bad_src++;
		return;
	}
	switch (p[9]) {
	case IP_PROTO_TCP:
		tcp_input(st, src, dst, p + hl, tot - hl, rx_flags);
		break;
	case IP_PROTO_ICMP:
		icmp_input(st, src, p + hl, tot - hl);
		break;
	default:
		st->ctr.ip_unknown_proto++;
		break;
	}
}

void
ipv4_output(struct net_stack *st, uint32_t dst, uint8_t proto,
	    struct net_iov *iov, unsigned n, uint16_t l4_len, unsigned offload)
{
	uint8_t *f = (uint8_t *)(uintptr_t)iov[0].base;
	uint8_t *ip = f + ETH_HLEN;
	struct net_tx_meta meta = {0, ETH_HLEN, IP_HLEN, l4_len};
	size_t len = 0;
	uint32_t next_hop;

	for (unsigned i = 0; i < n; i++)
		len += iov[i].len;
	if ((dst & st->netmask) == (st->cfg.addr & st->netmask)) {
		next_hop = dst;
	} else if (st->cfg.gateway) {
		next_hop = st->cfg.gateway;
	} else {
		st->ctr.ip_no_route++;
		return;
	}
	eth_fill(f, eth_broadcast, st->cfg.mac, ETHERTYPE_IPV4);
	ip[0] = 0x45;
	ip[1] = 0;
	net_wr16(ip + 2, (uint16_t)(len - ETH_HLEN));
	net_wr16(ip + 4, 0);
	net_wr16(ip + 6, 0x4000); /* DF */
	ip[8] = NET_IP_TTL;
	ip[9] = proto;
	net_wr16(ip + 10, 0);
	net_wr32(ip + 12, st->cfg.addr);
	net_wr32(ip + 16, dst);
	if (st->cfg.tx_offload & NET_OFFLOAD_IPV4_CKSUM)
		meta.flags |= NET_OFFLOAD_IPV4_CKSUM;
	else
		net_wr16(ip + 10, net_csum_fold(net_csum_add(0, ip, IP_HLEN)));
	meta.flags |= offload;
	arp_output(st, next_hop, iov, n, &meta);
}
