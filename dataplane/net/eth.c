/*
 * Ethernet II framing: accept frames addressed to our MAC or broadcast,
 * dispatch IPv4 and ARP, count everything else. No VLAN tags (802.1Q
 * frames are counted as unknown ethertype), no FCS (the port strips it).
 */
#include <string.h>

#include "net/net_priv.h"

const uint8_t eth_broadcast[ETH_ALEN] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

void
eth_fill(uint8_t *hdr, const uint8_t *dst, const uint8_t *src, uint16_t type)
{
	memcpy(hdr, dst, ETH_ALEN);
	memcpy(hdr + ETH_ALEN, src, ETH_ALEN);
	net_wr16(hdr + 12, type);
}

void
eth_input(struct net_stack *st, const uint8_t *f, size_t len,
	  unsigned rx_flags)
{
	uint16_t type;

	if (len < ETH_HLEN) {
		st->ctr.rx_runt++;
		return;
	}
	if (memcmp(f, st->cfg.mac, ETH_ALEN) != 0 &&
	    memcmp(f, eth_broadcast, ETH_ALEN) != 0) {
		st->ctr.rx_not_for_us++;
		return;
	}
	type = net_rd16(f + 12);
	switch (type) {
	case ETHERTYPE_IPV4:
		ipv4_input(st, f + ETH_HLEN, len - ETH_HLEN, rx_flags);
		break;
	case ETHERTYPE_ARP:
		arp_input(st, f + ETH_HLEN, len - ETH_HLEN);
		break;
	default:
		st->ctr.rx_ethertype++;
		break;
	}
}
