/*
 * ICMP (RFC 792): answer echo requests with an echo reply carrying the same
 * identifier, sequence number and data (RFC 1122 3.2.2.6). Every other type
 * is counted and ignored; we send no ICMP errors (XXX: RFC 1122 3.2.2.1
 * suggests port/protocol unreachable; TCP answers RST instead).
 */
#include <string.h>

#include "net/net_priv.h"

#define ICMP_ECHO_REPLY 0u
#define ICMP_ECHO 8u
#define ICMP_HLEN 8

void
icmp_input(struct net_stack *st, uint32_t src, const uint8_t *p, size_t len)
{
	uint8_t *h = st->hdr + ETH_HLEN + IP_HLEN;
	struct net_iov iov[2];
	uint32_t sum;

	st->ctr.icmp_rx++;
	if (len < ICMP_HLEN) {
		st->ctr.icmp_too_short++;
		return;
	}
	if (net_csum_fold(net_csum_add(0, p, len)) != 0) {
		st->ctr.icmp_bad_cksum++;
		return;
	}
	if (p[0] != ICMP_ECHO || p[1] != 0 ||
	    len + IP_HLEN > st->cfg.mtu) {
		st->ctr.icmp_other++;
		return;
	}
	h[0] = ICMP_ECHO_REPLY;
	h[1] = 0;
	net_wr16(h + 2, 0);
	memcpy(h + 4, p + 4, 4); /* identifier, sequence number */
	sum = net_csum_add(0, h, ICMP_HLEN);
	sum = net_csum_add(sum, p + ICMP_HLEN, len - ICMP_HLEN);
	net_wr16(h + 2, net_csum_fold(sum));
	iov[0].base = st->hdr;
	iov[0].len = ETH_HLEN + IP_HLEN + ICMP_HLEN;
	iov[1].base = p + ICMP_HLEN;
	iov[1].len = len - ICMP_HLEN;
	st->ctr.icmp_echo_replied++;
	ipv4_output(st, src, IP_PROTO_ICMP, iov, iov[1].len ? 2 : 1, 0, 0);
}
