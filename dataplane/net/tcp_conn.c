/*
 * TCP connection entries: the per-shard pool and 4-tuple table, the state
 * machine's single entry point tcp_enter_state(), receive/send buffer slots,
 * ISNs (RFC 6528) and SYN cookies (RFC 4987 3.6).
 *
 * States (RFC 9293 3.3.2; passive open only, so no SYN_SENT):
 *
 *            SYN (backlog room)          SYN (backlog full)
 *  LISTEN ------------------> SYN_RECEIVED    LISTEN --SYN-ACK(cookie)-->
 *  (port)                        | ACK of SYN      ACK with a valid cookie
 *                                v                 (straight to ESTABLISHED)
 *                           ESTABLISHED <----------------------'
 *             tcp_close: FIN /       \ FIN rcvd: ACK
 *                           v         v
 *                   FIN_WAIT_1      CLOSE_WAIT
 *   ACK of FIN /   FIN rcvd \             | tcp_close: FIN
 *            v               v            v
 *      FIN_WAIT_2         CLOSING       LAST_ACK
 *   FIN rcvd \     ACK of FIN /           | ACK of FIN
 *             v              v            v
 *               TIME_WAIT ------2MSL--> CLOSED (entry freed)
 *
 * Invariants per state:
 *  SYN_RECEIVED: counted in n_synrcvd (<= syn_backlog); snd_nxt = iss + 1;
 *    no buffers; upper layer not yet told (accept() runs on the ACK).
 *  ESTABLISHED, CLOSE_WAIT: upper layer attached unless it called tcp_close
 *    (then the state has moved on) or accept refused (entry reset instead).
 *    snd_una <= snd_nxt <= snd_max; slen bytes queued from snd_una.
 *  FIN_WAIT_1, CLOSING, LAST_ACK: TF_FIN_QUEUED; our FIN is sent once the
 *    queued data is (TF_FIN_SENT, fin_seq); upper layer detached.
 *  FIN_WAIT_2: our FIN acked; t_close = fin_wait2 timeout.
 *  CLOSE_WAIT, CLOSING, LAST_ACK, TIME_WAIT: TF_RCV_FIN.
 *  TIME_WAIT: both FINs acked or sent; no buffers held; t_close = 2*MSL;
 *    only a retransmitted FIN is answered (ACK, timer restarted).
 *  CLOSED: the entry is on the free list, in no table and no timer slot.
 */
#include <string.h>

#include "finaldot/log.h"
#include "net/net_priv.h"

static const char *const state_names[] = {
	[TCPS_CLOSED] = "CLOSED",
	[TCPS_LISTEN] = "LISTEN",
	[TCPS_SYN_RECEIVED] = "SYN_RECEIVED",
	[TCPS_ESTABLISHED] = "ESTABLISHED",
	[TCPS_FIN_WAIT_1] = "FIN_WAIT_1",
	[TCPS_FIN_WAIT_2] = "FIN_WAIT_2",
	[TCPS_CLOSING] = "CLOSING",
	[TCPS_TIME_WAIT] = "TIME_WAIT",
	[TCPS_CLOSE_WAIT] = "CLOSE_WAIT",
	[TCPS_LAST_ACK] = "LAST_ACK",
};

const char *
tcp_state_name(enum tcp_state s)
{
	if ((unsigned)s >= FD_ARRAY_SIZE(state_names) || !state_names[s])
		return "?";
	return state_names[s];
}

enum tcp_state
tcp_conn_state(const struct tcp_conn *c)
{
	return (enum tcp_state)c->state;
}

size_t
tcp_conn_rcv_held(const struct tcp_conn *c)
{
	return c->rheld;
}

size_t
tcp_conn_snd_queued(const struct tcp_conn *c)
{
	return c->slen;
}

static uint32_t
bucket_of(struct net_stack *st, uint32_t raddr, uint16_t rport,
	  uint16_t lport)
{
	uint8_t k[8];

	net_wr32(k, raddr);
	net_wr16(k + 4, rport);
	net_wr16(k + 6, lport);
	return (uint32_t)net_siphash(st->secret, k, sizeof(k)) &
	       st->bucket_mask;
}

struct tcp_conn *
tcp_lookup(struct net_stack *st, uint32_t raddr, uint16_t rport,
	   uint16_t lport)
{
	uint32_t i = st->buckets[bucket_of(st, raddr, rport, lport)];

	while (i != NET_NIL) {
		struct tcp_conn *c = &st->conns[i];
		if (c->raddr == raddr && c->rport == rport &&
		    c->lport == lport)
			return c;
		i = c->hnext;
	}
	return NULL;
}

static void
tw_remove(struct net_stack *st, struct tcp_conn *c)
{
	if (c->twprev != NET_NIL)
		st->conns[c->twprev].twnext = c->twnext;
	else if (st->tw_head == c->idx)
		st->tw_head = c->twnext;
	else
		return; /* not on the list */
	if (c->twnext != NET_NIL)
		st->conns[c->twnext].twprev = c->twprev;
	else
		st->tw_tail = c->twprev;
	c->twprev = c->twnext = NET_NIL;
}

static void
tw_append(struct net_stack *st, struct tcp_conn *c)
{
	c->twnext = NET_NIL;
	c->twprev = st->tw_tail;
	if (st->tw_tail != NET_NIL)
		st->conns[st->tw_tail].twnext = c->idx;
	else
		st->tw_head = c->idx;
	st->tw_tail = c->idx;
}

bool
tcp_conn_room(const struct net_stack *st)
{
	return st->free_head != NET_NIL || st->tw_head != NET_NIL;
}

struct tcp_conn *
tcp_conn_alloc(struct net_stack *st, uint32_t raddr, uint16_t rport,
	       uint16_t lport)
{
	struct tcp_conn *c;
	uint32_t b;

	if (st->free_head == NET_NIL && st->tw_head != NET_NIL) {
		/* table full: the oldest TIME_WAIT entry makes room (other user-space
		 * stacks learned it: short SMTP sessions, and we close first, fill tables with
		 * TIME_WAIT). XXX: an old duplicate could then reach a new
		 * incarnation of that 4-tuple; PAWS and the ISN clock make it
		 * unlikely. */
		st->ctr.tcp_time_wait_recycled++;
		tcp_conn_free(&st->conns[st->tw_head]);
	}
	if (st->free_head == NET_NIL) {
		st->ctr.tcp_conn_full++;
		return NULL;
	}
	c = &st->conns[st->free_head];
	st->free_head = c->hnext;
	memset(c, 0, sizeof(*c));
	c->st = st;
	c->idx = (uint32_t)(c - st->conns);
	c->raddr = raddr;
	c->rport = rport;
	c->lport = lport;
	c->rslot = c->sslot = NET_NIL;
	c->wprev = c->wnext = c->swnext = NET_NIL;
	c->twprev = c->twnext = NET_NIL;
	c->rto_ms = st->cfg.rto_init_ms;
	c->state = TCPS_CLOSED;
	b = bucket_of(st, raddr, rport, lport);
	c->hnext = st->buckets[b];
	st->buckets[b] = c->idx;
	st->n_used++;
	return c;
}

static void
swait_remove(struct net_stack *st, struct tcp_conn *c)
{
	uint32_t prev = NET_NIL, i = st->swait_head;

	while (i != NET_NIL && i != c->idx) {
		prev = i;
		i = st->conns[i].swnext;
	}
	if (i == NET_NIL)
		return;
	if (prev == NET_NIL)
		st->swait_head = c->swnext;
	else
		st->conns[prev].swnext = c->swnext;
	if (st->swait_tail == c->idx)
		st->swait_tail = prev;
	c->swnext = NET_NIL;
	c->flags &= ~TF_SND_WAIT;
}

void
tcp_conn_free(struct tcp_conn *c)
{
	struct net_stack *st = c->st;
	uint32_t *pp = &st->buckets[bucket_of(st, c->raddr, c->rport,
					      c->lport)];

	while (*pp != NET_NIL && *pp != c->idx)
		pp = &st->conns[*pp].hnext;
	if (*pp == c->idx)
		*pp = c->hnext;
	tcp_timer_remove(c);
	tw_remove(st, c);
	if (c->flags & TF_SND_WAIT)
		swait_remove(st, c);
	tcp_rcv_buf_put(c);
	tcp_snd_buf_put(c);
	if (c->state != TCPS_CLOSED)
		tcp_enter_state(c, TCPS_CLOSED);
	st->n_used--;
	st->ctr.tcp_closed++;
	memset(c, 0, sizeof(*c));
	c->st = st;
	c->idx = (uint32_t)(c - st->conns);
	c->rslot = c->sslot = NET_NIL;
	c->wprev = c->wnext = c->swnext = NET_NIL;
	c->twprev = c->twnext = NET_NIL;
	c->hnext = st->free_head;
	st->free_head = c->idx;
}

void
tcp_drop(struct tcp_conn *c, enum tcp_close_reason why)
{
	struct net_stack *st = c->st;
	void *uctx = c->uctx;
	bool tell = !(c->flags & TF_DETACHED) && uctx &&
		    c->state != TCPS_SYN_RECEIVED;
	size_t unacked = c->slen; /* before the entry is wiped */

	c->flags |= TF_DETACHED;
	tcp_conn_free(c);
	if (tell && st->cfg.ops->closed)
		st->cfg.ops->closed(uctx, why, unacked);
}

void
tcp_enter_state(struct tcp_conn *c, enum tcp_state s)
{
	struct net_stack *st = c->st;
	enum tcp_state old = (enum tcp_state)c->state;

	fd_debug("net", "tcp conn=%u state=%s->%s", c->idx,
		 tcp_state_name(old), tcp_state_name(s));
	if (old == TCPS_SYN_RECEIVED)
		st->n_synrcvd--;
	/* Counted by state, not by the TIME_WAIT list: an entry leaves
	 * TIME_WAIT only through tcp_conn_free(), which enters CLOSED. */
	if (old == TCPS_TIME_WAIT)
		st->n_time_wait--;
	c->state = (uint8_t)s;
	switch (s) {
	case TCPS_SYN_RECEIVED:
		st->n_synrcvd++;
		break;
	case TCPS_FIN_WAIT_2:
		c->t_close = st->now_ms + st->cfg.fin_wait2_ms;
		break;
	case TCPS_TIME_WAIT:
		/* nothing more to send or deliver: give buffers back */
		c->t_rexmt = c->t_persist = c->t_delack = c->t_idle = 0;
		c->rheld = 0;
		c->n_ooo = 0;
		c->slen = 0;
		tcp_rcv_buf_put(c);
		tcp_snd_buf_put(c);
		c->flags |= TF_DETACHED;
		c->t_close = st->now_ms + st->cfg.time_wait_ms;
		tw_append(st, c);
		st->n_time_wait++;
		break;
	case TCPS_CLOSED:
	case TCPS_LISTEN:
	case TCPS_ESTABLISHED:
	case TCPS_FIN_WAIT_1:
	case TCPS_CLOSING:
	case TCPS_CLOSE_WAIT:
	case TCPS_LAST_ACK:
		break;
	}
	tcp_timer_update(c);
}

/* ---- ISN, timestamp offset, SYN cookies ---- */

static uint64_t
tuple_hash(struct net_stack *st, uint32_t raddr, uint16_t rport,
	   uint16_t lport, uint32_t extra, uint8_t tag)
{
	uint8_t k[17];

	net_wr32(k, raddr);
	net_wr16(k + 4, rport);
	net_wr16(k + 6, lport);
	net_wr32(k + 8, st->cfg.addr);
	net_wr32(k + 12, extra);
	k[16] = tag;
	return net_siphash(st->secret, k, sizeof(k));
}

uint32_t
tcp_iss(struct net_stack *st, uint32_t raddr, uint16_t rport, uint16_t lport)
{
	/* RFC 6528: ISN = M + F(4-tuple, secret), M a 4 us clock */
	return (uint32_t)(st->now_us / 4) +
	       (uint32_t)tuple_hash(st, raddr, rport, lport, 0, 'i');
}

uint32_t
tcp_ts_offset(struct net_stack *st, uint32_t raddr, uint16_t rport,
	      uint16_t lport)
{
	return (uint32_t)tuple_hash(st, raddr, rport, lport, 0, 't');
}

void
tcp_init_cookie_table(struct net_stack *st)
{
	static const uint32_t mss[8] = {536,  1024, 1220, 1300,
					1360, 1400, 1440, 1460};
	memcpy(st->cookie_mss, mss, sizeof(mss));
}

/*
 * Cookie layout (RFC 4987 3.6, as in Bernstein's design):
 *   bits 31..27: t, a 64-second counter mod 32
 *   bits 26..24: index of the MSS in cookie_mss
 *   bits 23..0 : SipHash(secret, 4-tuple, peer ISN, t)
 * Valid for the current and previous period (64..128 s). Options other than
 * the MSS are not encoded: a cookie SYN-ACK offers no WS, TS nor SACK.
 */
static uint32_t
cookie_period(const struct net_stack *st)
{
	return (uint32_t)(st->now_ms / 64000);
}

uint32_t
tcp_cookie_make(struct net_stack *st, uint32_t raddr, uint16_t rport,
		uint16_t lport, uint32_t peer_isn, uint16_t mss)
{
	uint32_t t = cookie_period(st) & 31;
	uint32_t idx = 0;

	for (uint32_t i = 0; i < 8; i++)
		if (st->cookie_mss[i] <= mss)
			idx = i;
	return (t << 27) | (idx << 24) |
	       ((uint32_t)tuple_hash(st, raddr, rport, lport, peer_isn,
				     (uint8_t)('A' + t)) &
		0xffffffu);
}

uint16_t
tcp_cookie_check(struct net_stack *st, uint32_t raddr, uint16_t rport,
		 uint16_t lport, uint32_t peer_isn, uint32_t cookie)
{
	uint32_t now = cookie_period(st);

	for (uint32_t age = 0; age < 2; age++) {
		uint32_t t = (now - age) & 31;
		uint32_t h;

		if ((cookie >> 27) != t)
			continue;
		h = (uint32_t)tuple_hash(st, raddr, rport, lport, peer_isn,
					 (uint8_t)('A' + t)) &
		    0xffffffu;
		if (h == (cookie & 0xffffffu))
			return (uint16_t)st->cookie_mss[(cookie >> 24) & 7];
	}
	return 0;
}

/* ---- buffer slots ---- */

uint8_t *
tcp_rcv_base(const struct tcp_conn *c)
{
	return c->st->rcv_mem + (size_t)c->rslot * c->st->cfg.limits.rcv_buf;
}

uint8_t *
tcp_snd_base(const struct tcp_conn *c)
{
	return c->st->snd_mem + (size_t)c->sslot * c->st->cfg.limits.snd_buf;
}

bool
tcp_rcv_buf_get(struct tcp_conn *c)
{
	struct net_stack *st = c->st;

	if (c->rslot != NET_NIL)
		return true;
	if (st->n_rcv_free == 0)
		return false;
	c->rslot = st->rcv_free[--st->n_rcv_free];
	c->rhead = 0;
	return true;
}

void
tcp_rcv_buf_put(struct tcp_conn *c)
{
	struct net_stack *st = c->st;

	if (c->rslot == NET_NIL)
		return;
	st->rcv_free[st->n_rcv_free++] = c->rslot;
	c->rslot = NET_NIL;
}

bool
tcp_snd_buf_get(struct tcp_conn *c)
{
	struct net_stack *st = c->st;

	if (c->sslot != NET_NIL)
		return true;
	if (st->n_snd_free == 0) {
		if (!(c->flags & TF_SND_WAIT)) {
			c->flags |= TF_SND_WAIT;
			c->swnext = NET_NIL;
			if (st->swait_tail == NET_NIL)
				st->swait_head = c->idx;
			else
				st->conns[st->swait_tail].swnext = c->idx;
			st->swait_tail = c->idx;
		}
		return false;
	}
	c->sslot = st->snd_free[--st->n_snd_free];
	c->shead = 0;
	return true;
}

void
tcp_snd_buf_put(struct tcp_conn *c)
{
	struct net_stack *st = c->st;

	if (c->sslot == NET_NIL)
		return;
	st->snd_free[st->n_snd_free++] = c->sslot;
	c->sslot = NET_NIL;
	/* waiters are woken at the end of the entry point: tcp_wake_senders */
}
