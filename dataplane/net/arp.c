/*
 * ARP (RFC 826) for Ethernet/IPv4: answer requests for our address, resolve
 * next hops through a small cache, hold a bounded number of frames while a
 * next hop resolves, announce our address with a gratuitous ARP at start.
 *
 * Cache entry life: FREE -> INCOMPLETE (request sent; retried every
 * arp_retry_ms, arp_retries times, then its held frames are dropped and
 * counted) -> REACHABLE (answer seen; valid arp_timeout_ms) -> STALE (still
 * used; a refresh request is sent; freed if unanswered after arp_retries
 * more tries). Learning follows RFC 826's merge rule: any ARP packet updates
 * an existing entry for its sender; a new entry is made only when we are the
 * target. Limits: arp_entries entries (LRU eviction of resolved ones),
 * arp_queue held frames in total for the whole shard.
 */
#include <string.h>

#include "net/net_priv.h"

#define ARP_LEN 28
#define ARP_OP_REQUEST 1u
#define ARP_OP_REPLY 2u

static void
arp_send(struct net_stack *st, uint16_t op, const uint8_t *dst_mac,
	 const uint8_t *tha, uint32_t tpa)
{
	uint8_t f[60];
	struct net_iov iov = {f, sizeof(f)};
	struct net_tx_meta meta = {0, ETH_HLEN, ARP_LEN, 0};
	uint8_t *a = f + ETH_HLEN;

	memset(f, 0, sizeof(f)); /* padded to the 60-byte minimum */
	eth_fill(f, dst_mac, st->cfg.mac, ETHERTYPE_ARP);
	net_wr16(a, 1);
	net_wr16(a + 2, ETHERTYPE_IPV4);
	a[4] = ETH_ALEN;
	a[5] = 4;
	net_wr16(a + 6, op);
	memcpy(a + 8, st->cfg.mac, ETH_ALEN);
	net_wr32(a + 14, st->cfg.addr);
	memcpy(a + 18, tha, ETH_ALEN);
	net_wr32(a + 24, tpa);
	net_tx(st, &iov, 1, &meta);
}

static void
arp_request(struct net_stack *st, uint32_t ip)
{
	static const uint8_t zero[ETH_ALEN];

	st->ctr.arp_requests_tx++;
	arp_send(st, ARP_OP_REQUEST, eth_broadcast, zero, ip);
}

void
arp_announce(struct net_stack *st)
{
	static const uint8_t zero[ETH_ALEN];

	st->ctr.arp_gratuitous_tx++;
	arp_send(st, ARP_OP_REQUEST, eth_broadcast, zero, st->cfg.addr);
}

static struct arp_entry *
arp_find(struct net_stack *st, uint32_t ip)
{
	for (uint32_t i = 0; i < st->cfg.limits.arp_entries; i++) {
		struct arp_entry *e = &st->arp[i];
		if (e->state != ARP_FREE && e->ip == ip)
			return e;
	}
	return NULL;
}

/* A free entry, else the least recently used resolved one. */
static struct arp_entry *
arp_new(struct net_stack *st, uint32_t ip)
{
	struct arp_entry *victim = NULL;

	for (uint32_t i = 0; i < st->cfg.limits.arp_entries; i++) {
		struct arp_entry *e = &st->arp[i];
		if (e->state == ARP_FREE) {
			victim = e;
			break;
		}
		if (e->state != ARP_INCOMPLETE &&
		    (!victim || e->used_ms < victim->used_ms))
			victim = e;
	}
	if (!victim) {
		st->ctr.arp_table_full++;
		return NULL;
	}
	memset(victim, 0, sizeof(*victim));
	victim->ip = ip;
	victim->used_ms = st->now_ms;
	return victim;
}

static void
arp_flush_held(struct net_stack *st, const struct arp_entry *e, bool send)
{
	for (uint32_t i = 0; i < st->cfg.limits.arp_queue; i++) {
		struct arp_held *h = &st->held[i];
		uint8_t *f = st->held_frames + (size_t)i * st->held_stride;

		if (h->next_hop != e->ip)
			continue;
		if (send) {
			struct net_iov iov = {f, h->len};
			memcpy(f, e->mac, ETH_ALEN);
			net_tx(st, &iov, 1, &h->meta);
		} else {
			st->ctr.arp_queued_dropped++;
		}
		h->next_hop = 0;
	}
}

static void
arp_hold(struct net_stack *st, uint32_t next_hop, const struct net_iov *iov,
	 unsigned n, const struct net_tx_meta *meta)
{
	size_t len = 0;

	for (unsigned i = 0; i < n; i++)
		len += iov[i].len;
	for (uint32_t i = 0; i < st->cfg.limits.arp_queue; i++) {
		struct arp_held *h = &st->held[i];
		uint8_t *f = st->held_frames + (size_t)i * st->held_stride;
		size_t off = 0;

		if (h->next_hop != 0)
			continue;
		if (len > st->held_stride)
			break;
		for (unsigned k = 0; k < n; k++) {
			memcpy(f + off, iov[k].base, iov[k].len);
			off += iov[k].len;
		}
		h->next_hop = next_hop;
		h->len = (uint32_t)len;
		h->meta = *meta;
		return;
	}
	st->ctr.arp_queue_full++;
}

void
arp_output(struct net_stack *st, uint32_t next_hop, struct net_iov *iov,
	   unsigned n, const struct net_tx_meta *meta)
{
	struct arp_entry *e = arp_find(st, next_hop);
	uint8_t *eth = (uint8_t *)(uintptr_t)iov[0].base;

	if (e && e->state == ARP_REACHABLE && st->now_ms >= e->deadline_ms) {
		/* expired: keep using it while a refresh is pending */
		e->state = ARP_STALE;
		e->tries = 1;
		e->deadline_ms = st->now_ms + st->cfg.arp_retry_ms;
		arp_request(st, next_hop);
	}
	if (e && (e->state == ARP_REACHABLE || e->state == ARP_STALE)) {
		e->used_ms = st->now_ms;
		memcpy(eth, e->mac, ETH_ALEN);
		net_tx(st, iov, n, meta);
		return;
	}
	if (!e) {
		e = arp_new(st, next_hop);
		if (!e) {
			st->ctr.arp_queue_full++;
			return;
		}
		e->state = ARP_INCOMPLETE;
		e->tries = 1;
		e->deadline_ms = st->now_ms + st->cfg.arp_retry_ms;
		arp_request(st, next_hop);
	}
	arp_hold(st, next_hop, iov, n, meta);
}

void
arp_input(struct net_stack *st, const uint8_t *a, size_t len)
{
	uint16_t op;
	uint32_t spa, tpa;
	const uint8_t *sha;
	struct arp_entry *e;
	bool merged = false;

	st->ctr.arp_rx++;
	if (len < ARP_LEN || net_rd16(a) != 1 ||
	    net_rd16(a + 2) != ETHERTYPE_IPV4 || a[4] != ETH_ALEN ||
	    a[5] != 4) {
		st->ctr.arp_malformed++;
		return;
	}
	op = net_rd16(a + 6);
	sha = a + 8;
	spa = net_rd32(a + 14);
	tpa = net_rd32(a + 24);
	if ((op != ARP_OP_REQUEST && op != ARP_OP_REPLY) ||
	    (sha[0] & 1) != 0) {
		st->ctr.arp_malformed++;
		return;
	}
	/* RFC 826 merge: refresh an entry we already have for the sender */
	if (spa != 0 && spa != st->cfg.addr && (e = arp_find(st, spa))) {
		memcpy(e->mac, sha, ETH_ALEN);
		e->state = ARP_REACHABLE;
		e->tries = 0;
		e->deadline_ms = st->now_ms + st->cfg.arp_timeout_ms;
		arp_flush_held(st, e, true);
		merged = true;
	}
	if (tpa != st->cfg.addr) {
		if (!merged)
			st->ctr.arp_not_for_us++;
		return;
	}
	if (op == ARP_OP_REPLY)
		st->ctr.arp_replies_rx++;
	if (!merged && spa != 0 && spa != st->cfg.addr &&
	    (e = arp_new(st, spa))) {
		memcpy(e->mac, sha, ETH_ALEN);
		e->state = ARP_REACHABLE;
		e->deadline_ms = st->now_ms + st->cfg.arp_timeout_ms;
	}
	if (op == ARP_OP_REQUEST && st->cfg.arp_reply) {
		st->ctr.arp_requests_answered++;
		arp_send(st, ARP_OP_REPLY, sha, sha, spa);
	}
}

void
arp_timers(struct net_stack *st)
{
	for (uint32_t i = 0; i < st->cfg.limits.arp_entries; i++) {
		struct arp_entry *e = &st->arp[i];

		switch ((enum arp_entry_state)e->state) {
		case ARP_FREE:
		case ARP_REACHABLE:
			break;
		case ARP_INCOMPLETE:
		case ARP_STALE:
			if (st->now_ms < e->deadline_ms)
				break;
			if (e->tries >= st->cfg.arp_retries) {
				if (e->state == ARP_INCOMPLETE) {
					st->ctr.arp_resolve_failed++;
					arp_flush_held(st, e, false);
				}
				e->state = ARP_FREE;
				break;
			}
			e->tries++;
			e->deadline_ms = st->now_ms + st->cfg.arp_retry_ms;
			arp_request(st, e->ip);
			break;
		}
	}
}
