/*
 * The receive buffer: in-order bytes held for the upper layer and bounded
 * out-of-order reassembly (RFC 9293 3.10.7.4 "seventh, process the segment
 * text"; RFC 2018 for the ranges reported in SACK blocks).
 *
 * Layout: one ring of rcv_buf bytes per connection, taken from the shard's
 * pool on the first byte and given back when it is empty. The rheld
 * in-order bytes start at rhead; the byte with sequence number s >= rcv_nxt
 * lives rheld + (s - rcv_nxt) bytes after rhead. The window is what is left:
 * rcv_buf - rheld, so every byte the window admits has its place and
 * nothing admitted is ever dropped for lack of room (only for lack of a
 * free ring in the pool: counted as tcp_rcv_nobuf, the peer retransmits).
 *
 * Out-of-order data is remembered as at most TCP_OOO_MAX sequence ranges,
 * ooo[0] the one updated last (the first SACK block). A segment that would
 * need a fifth range is dropped (tcp_ooo_drop); overlapping and duplicate
 * segments merge into existing ranges. The last quarter of the pool is
 * kept for in-order data: a connection without a ring does not take one
 * for out-of-order bytes then (tcp_ooo_drop too).
 */
#include <string.h>

#include "net/net_priv.h"

uint32_t
tcp_rcv_space(const struct tcp_conn *c)
{
	return c->st->cfg.limits.rcv_buf - c->rheld;
}

static void
ring_write(struct tcp_conn *c, uint32_t pos, const uint8_t *p, uint32_t n)
{
	uint32_t size = c->st->cfg.limits.rcv_buf;
	uint8_t *base = tcp_rcv_base(c);
	uint32_t first;

	pos &= c->st->rcv_mask;
	first = FD_MIN(n, size - pos);
	memcpy(base + pos, p, first);
	if (n > first)
		memcpy(base, p + first, n - first);
}

static void
ooo_remove(struct tcp_conn *c, unsigned i)
{
	memmove(&c->ooo[i], &c->ooo[i + 1],
		(c->n_ooo - i - 1) * sizeof(c->ooo[0]));
	c->n_ooo--;
}

/* Record [s, e): merge with what it touches, put it first. */
static bool
ooo_insert(struct tcp_conn *c, uint32_t s, uint32_t e)
{
	bool touches = false;

	for (unsigned i = 0; i < c->n_ooo; i++)
		if (seq_leq(c->ooo[i].start, e) && seq_leq(s, c->ooo[i].end))
			touches = true;
	if (!touches && c->n_ooo == TCP_OOO_MAX)
		return false;
	for (unsigned i = 0; i < c->n_ooo;) {
		struct tcp_ooo *r = &c->ooo[i];
		if (seq_leq(r->start, e) && seq_leq(s, r->end)) {
			if (seq_lt(r->start, s))
				s = r->start;
			if (seq_gt(r->end, e))
				e = r->end;
			ooo_remove(c, i);
			continue;
		}
		i++;
	}
	memmove(&c->ooo[1], &c->ooo[0], c->n_ooo * sizeof(c->ooo[0]));
	c->ooo[0].start = s;
	c->ooo[0].end = e;
	c->n_ooo++;
	return true;
}

bool
tcp_reass(struct tcp_conn *c, uint32_t seq, const uint8_t *p, uint32_t n)
{
	struct net_stack *st = c->st;
	uint32_t off = seq - c->rcv_nxt;

	if (!n)
		return false;
	/* Bytes ahead of a gap pin a ring until the gap is filled, and a
	 * peer may never fill it: one such byte on each of a few hundred
	 * connections would take the whole pool, and in-order data, which
	 * the upper layer empties at once, would find none. A connection
	 * without a ring takes one for out-of-order data only while more
	 * than a quarter of the pool is free (RFC 2018 lets a receiver drop
	 * data it has not acknowledged; the peer sends it again). */
	if (off && c->rslot == NET_NIL &&
	    st->n_rcv_free <= st->cfg.limits.rcv_slots / 4) {
		st->ctr.tcp_ooo_drop++;
		return false;
	}
	if (!tcp_rcv_buf_get(c)) {
		st->ctr.tcp_rcv_nobuf++;
		return false;
	}
	if (off) {
		/* out of order: keep the bytes only if a range can say so */
		if (!ooo_insert(c, seq, seq + n)) {
			st->ctr.tcp_ooo_drop++;
			return false;
		}
		ring_write(c, c->rhead + c->rheld + off, p, n);
		return false;
	}
	ring_write(c, c->rhead + c->rheld, p, n);
	c->rheld += n;
	c->rcv_nxt += n;
	/* pull in the ranges this segment reached */
	for (unsigned i = 0; i < c->n_ooo;) {
		struct tcp_ooo *r = &c->ooo[i];
		if (seq_leq(r->start, c->rcv_nxt)) {
			if (seq_gt(r->end, c->rcv_nxt)) {
				c->rheld += r->end - c->rcv_nxt;
				c->rcv_nxt = r->end;
			}
			ooo_remove(c, i);
			i = 0;
			continue;
		}
		i++;
	}
	return true;
}

void
tcp_rcv_consume(struct tcp_conn *c, uint32_t n)
{
	c->rhead = (c->rhead + n) & c->st->rcv_mask;
	c->rheld -= n;
	if (c->rheld == 0 && c->n_ooo == 0)
		tcp_rcv_buf_put(c);
}
