/*
 * User requests (RFC 9293 3.10.2-3.10.6, passive side): SEND, CLOSE, ABORT,
 * and the flow-control hook tcp_resume(). These are what the SMTP glue
 * calls; see tcp.h for the contract. Also the wake-up of connections that
 * waited for a send buffer from the shard's pool.
 */
#include <string.h>

#include "net/net_priv.h"

static bool
can_send(const struct tcp_conn *c)
{
	if (c->flags & (TF_DETACHED | TF_FIN_QUEUED))
		return false;
	return c->state == TCPS_ESTABLISHED || c->state == TCPS_CLOSE_WAIT;
}

size_t
tcp_send_room(const struct tcp_conn *c)
{
	if (!can_send(c))
		return 0;
	return c->st->cfg.limits.snd_buf - c->slen;
}

size_t
tcp_send(struct tcp_conn *c, const void *p, size_t n)
{
	struct net_stack *st = c->st;
	uint32_t size = st->cfg.limits.snd_buf, room, k, pos, first;

	if (!can_send(c) || n == 0)
		return 0;
	if (!tcp_snd_buf_get(c)) {
		st->ctr.tcp_snd_nobuf++;
		c->flags |= TF_WANT_SENT;
		return 0;
	}
	room = size - c->slen;
	k = (uint32_t)FD_MIN(n, (size_t)room);
	pos = (c->shead + c->slen) & st->snd_mask;
	first = FD_MIN(k, size - pos);
	memcpy(tcp_snd_base(c) + pos, p, first);
	memcpy(tcp_snd_base(c), (const uint8_t *)p + first, k - first);
	c->slen += k;
	if (k < n)
		c->flags |= TF_WANT_SENT;
	if (!k && !c->slen)
		tcp_snd_buf_put(c);
	tcp_output(c);
	tcp_timer_update(c);
	return k;
}

void
tcp_close(struct tcp_conn *c)
{
	if (c->flags & TF_DETACHED)
		return;
	c->flags |= TF_DETACHED | TF_FIN_QUEUED;
	c->flags &= ~(TF_WANT_SENT | TF_BLOCKED);
	c->uctx = NULL;
	/* unread bytes are discarded (counted); later ones are ACKed and
	 * discarded too */
	if (c->rheld)
		c->st->ctr.tcp_data_after_close++;
	c->rheld = 0;
	c->n_ooo = 0;
	tcp_rcv_buf_put(c);
	switch ((enum tcp_state)c->state) {
	case TCPS_ESTABLISHED:
		tcp_enter_state(c, TCPS_FIN_WAIT_1);
		break;
	case TCPS_CLOSE_WAIT:
		tcp_enter_state(c, TCPS_LAST_ACK);
		break;
	case TCPS_CLOSED:
	case TCPS_LISTEN:
	case TCPS_SYN_RECEIVED:
	case TCPS_FIN_WAIT_1:
	case TCPS_FIN_WAIT_2:
	case TCPS_CLOSING:
	case TCPS_TIME_WAIT:
	case TCPS_LAST_ACK:
		break;
	}
	if (c->flags & TF_IN_RECV)
		return; /* tcp_input sends it on the way out */
	tcp_output(c);
	tcp_timer_update(c);
}

void
tcp_abort(struct tcp_conn *c)
{
	if (c->state == TCPS_CLOSED)
		return;
	c->flags |= TF_DETACHED;
	c->uctx = NULL;
	tcp_send_rst(c);
	tcp_conn_free(c);
}

void
tcp_resume(struct tcp_conn *c)
{
	if (c->state == TCPS_CLOSED || (c->flags & TF_IN_RECV))
		return;
	c->flags &= ~TF_BLOCKED;
	tcp_deliver(c);
	if (c->state == TCPS_CLOSED)
		return;
	tcp_output(c);
	tcp_timer_update(c);
}

void
tcp_wake_senders(struct net_stack *st)
{
	while (st->swait_head != NET_NIL && st->n_snd_free > 0) {
		struct tcp_conn *c = &st->conns[st->swait_head];

		st->swait_head = c->swnext;
		if (st->swait_head == NET_NIL)
			st->swait_tail = NET_NIL;
		c->swnext = NET_NIL;
		c->flags &= ~(TF_SND_WAIT | TF_WANT_SENT);
		if (!(c->flags & TF_DETACHED) && c->uctx && st->cfg.ops->sent)
			st->cfg.ops->sent(c->uctx, st->cfg.limits.snd_buf);
	}
}
