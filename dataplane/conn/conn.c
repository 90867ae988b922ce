/*
 * The connection layer both transports drive (conn.h): the policy of a
 * connection between the transport's octets and the SMTP engine, so that
 * the kernel-socket and the DPDK transports cannot drift apart.
 *
 * One function decides what a connection does next: conn_drive(). It
 * moves the session's output (or TLS's) to the transport, ends the
 * connection when the session is done and its output has left, switches
 * to TLS once the 220 to STARTTLS has left, runs the handshake within the
 * worker's cap, and closes on the peer's EOF. conn_input() offers octets
 * and drives; conn_service() drives and then asks the transport for the
 * input it holds (ops->resume()). Every event that is not the transport's
 * own (a commit verdict, a timer, spool room, a handshake slot, shutdown)
 * only marks the connection "dirty"; conn_set_service() services those,
 * outside the spool's and the stack's callbacks.
 *
 * Input is held by the transport, never copied here: a provided buffer on
 * the kernel transport, the TCP receive ring on DPDK (whose window then
 * shrinks). A connection holding input is on the "blocked" list, the one
 * conn_set_room() walks when spool room may have come back: O(blocked).
 *
 * Pipelining (RFC 2920). The session stops taking input when its replies
 * fill its output buffer. When the transport takes them at once (DPDK's
 * tcp_send), nothing else would offer the rest (no send completion comes,
 * no spool event: the session would hang until its idle timeout), so
 * conn_input() offers the rest again while an offer takes input or moves
 * replies. An asynchronous send (io_uring) moves nothing until it
 * completes: the loop stops, and the completion offers the rest.
 *
 * STARTTLS (RFC 3207). Octets the client pipelined behind STARTTLS never
 * reach the session as commands (CVE-2011-0411): the engine discards what
 * came with the command, and while it waits for TLS (its 220 not yet
 * handed over) nothing is offered to it: what arrives then is the
 * handshake's and stays held until TLS starts. At most tls_max_handshakes
 * handshakes run at once per worker; the others wait their turn, oldest
 * first, each under its handshake deadline.
 *
 * Timers. The greeting delay, the idle timeout and the handshake deadline
 * each have a constant length, so each list stays ordered by due time when
 * a connection is appended at its tail (the idle list is an LRU: input
 * moves a connection to the tail). A tick looks at the heads only: O(due).
 *
 * Lifetime. A connection is open from conn_open() until conn_close()
 * (which returns its session to the pool and calls ops->close()); its TLS
 * memory stays until conn_release(), since an asynchronous send may still
 * point into it.
 */
#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <string.h>

#include "conn/conn.h"
#include "finaldot/log.h"
#include "smtp/smtp.h"
#include "spool/spool.h"
#include "tls/tls.h"
#include "worker.h"

#define CONN_OF(node, member)                                                  \
	((struct conn *)(void *)((char *)(node) -                              \
				 offsetof(struct conn, member)))

/* ---- lists -------------------------------------------------------------- */

static void
list_push(struct conn_list *l, struct conn_node *n)
{
	n->prev = l->tail;
	n->next = NULL;
	if (l->tail)
		l->tail->next = n;
	else
		l->head = n;
	l->tail = n;
	n->linked = true;
}

static void
list_del(struct conn_list *l, struct conn_node *n)
{
	if (!n->linked)
		return;
	if (n->prev)
		n->prev->next = n->next;
	else
		l->head = n->next;
	if (n->next)
		n->next->prev = n->prev;
	else
		l->tail = n->prev;
	n->prev = n->next = NULL;
	n->linked = false;
}

/*
 * Arm a timer: due order. Each list's delay is constant and the clock does
 * not go back, so the walk from the tail stops at once; it is there so
 * that an out-of-order due still fires in order.
 */
static void
timer_arm(struct conn_list *l, struct conn_node *n, uint64_t due_us)
{
	struct conn_node *at;

	/* Unlinked first: n may be the tail (input again on the connection
	 * that had the last input), and must not be its own neighbour. */
	list_del(l, n);
	at = l->tail;
	n->due_us = due_us;
	while (at && at->due_us > due_us)
		at = at->prev;
	if (!at) {
		n->prev = NULL;
		n->next = l->head;
		if (l->head)
			l->head->prev = n;
		else
			l->tail = n;
		l->head = n;
	} else {
		n->prev = at;
		n->next = at->next;
		if (at->next)
			at->next->prev = n;
		else
			l->tail = n;
		at->next = n;
	}
	n->linked = true;
}

/* ---- marks -------------------------------------------------------------- */

static void
mark_dirty(struct conn *c)
{
	/* Marked again after conn_set_service()'s first pass drove it: the
	 * news needs a whole service, not just its held input. */
	c->driven = false;
	if (c->open && !c->n_dirty.linked)
		list_push(&c->cs->dirty, &c->n_dirty);
}

/* Input held here or in TLS: the connection waits for the session. */
static void
blocked_update(struct conn *c)
{
	struct conn_set *cs = c->cs;
	bool b = c->open &&
		 (c->held || (c->tls && fd_tls_conn_holding(c->tls)));

	if (b && !c->n_blocked.linked)
		list_push(&cs->blocked, &c->n_blocked);
	else if (!b)
		list_del(&cs->blocked, &c->n_blocked);
}

static void
idle_touch(struct conn *c)
{
	struct conn_set *cs = c->cs;

	timer_arm(&cs->idle, &c->t_idle, cs->now_us + cs->idle_ms * 1000);
}

/* ---- TLS handshake slots ------------------------------------------------ */

/*
 * A handshake ended (done, failed, or its connection): the slot goes to the
 * connection that has waited longest.
 */
static void
hs_release(struct conn *c)
{
	struct conn_set *cs = c->cs;

	if (c->hs_waiting) {
		c->hs_waiting = false;
		list_del(&cs->hswait, &c->n_hswait);
	}
	if (!c->hs_running)
		return;
	c->hs_running = false;
	cs->handshakes--;
	if (cs->hswait.head)
		mark_dirty(CONN_OF(cs->hswait.head, n_hswait));
}

/* True: c may run its handshake now. Otherwise it waits in line (a
 * newcomer never overtakes a connection already waiting). */
static bool
hs_take(struct conn *c)
{
	struct conn_set *cs = c->cs;
	unsigned cap = cs->w->cfg->tls_max_handshakes;
	bool first = cs->hswait.head == NULL ||
		     cs->hswait.head == &c->n_hswait;

	if (cs->handshakes >= cap || !first) {
		if (!c->hs_waiting) {
			c->hs_waiting = true;
			list_push(&cs->hswait, &c->n_hswait);
		}
		return false;
	}
	if (c->hs_waiting) {
		c->hs_waiting = false;
		list_del(&cs->hswait, &c->n_hswait);
	}
	c->hs_running = true;
	cs->handshakes++;
	/* Several slots came free at once: the next in line goes too. */
	if (cs->hswait.head && cs->handshakes < cap)
		mark_dirty(CONN_OF(cs->hswait.head, n_hswait));
	return true;
}

/* ---- closing ------------------------------------------------------------ */

/*
 * RFC 1047: the session ends. A 250 to a final dot whose octets the
 * client's TCP has not acknowledged may never have been read: the client
 * will send the message again, and the control plane must know. A session
 * that ended with QUIT is taken as read (the client read its replies
 * before it said QUIT; a client that pipelined QUIT behind the final dot
 * and lost the connection right then is the case this misses). Under TLS
 * the client acknowledges ciphertext: compare with where the record that
 * carried the reply ends in the TCP stream.
 */
static void
check_indoubt(struct conn *c)
{
	struct smtp_ackpoint ap[SMTP_ACKPOINTS];
	uint64_t sent, acked;
	unsigned n;

	if (smtp_session_quit_seen(c->s))
		return;
	n = smtp_session_ackpoints(c->s, ap);
	if (n == 0)
		return;
	sent = c->tls ? fd_tls_conn_wire_sent(c->tls)
		      : smtp_session_output_total(c->s);
	if (c->cs->ops->acked(c, sent, &acked) != 0)
		return;
	for (unsigned i = 0; i < n; i++) {
		uint64_t end = c->tls ? fd_tls_conn_wire_end(c->tls, ap[i].end)
				      : ap[i].end;
		if (end > acked)
			fd_worker_indoubt(c->cs->w, ap[i].msgid);
	}
}

void
conn_close(struct conn *c, const char *why, enum conn_close_how how)
{
	struct conn_set *cs = c->cs;

	if (!c->open)
		return;
	check_indoubt(c);
	fd_debug("conn", "%016" PRIx64 " event=close reason=%s",
		 smtp_session_id(c->s), why);
	smtp_session_close(c->s);
	c->s = NULL;
	/* A handshake that never completed, whatever ended it (a bad
	 * record, its deadline, the client gone): counted once, here. */
	if (c->tls && !fd_tls_conn_established(c->tls))
		cs->w->tls_failed++;
	hs_release(c);
	c->open = false;
	c->driven = false;
	list_del(&cs->open, &c->n_open);
	list_del(&cs->dirty, &c->n_dirty);
	list_del(&cs->blocked, &c->n_blocked);
	list_del(&cs->idle, &c->t_idle);
	list_del(&cs->greet, &c->t_greet);
	list_del(&cs->hsdl, &c->t_hs);
	cs->nopen--;
	cs->ops->close(c, how, why);
}

void
conn_release(struct conn *c)
{
	fd_tls_conn_free(c->tls);
	c->tls = NULL;
}

/* ---- output ------------------------------------------------------------- */

/* The session's replies to the transport. True: all of them are out. */
static bool
drain_plain(struct conn *c)
{
	const uint8_t *p;
	size_t n, k;

	while (!c->send_busy && (n = smtp_session_output(c->s, &p)) > 0) {
		/* p stays valid until output_done (the engine appends
		 * behind it and never moves octets it handed out). */
		k = c->cs->ops->send(c, p, n, false);
		if (k == CONN_SEND_ARMED) {
			c->send_busy = true;
			break;
		}
		if (k)
			smtp_session_output_done(c->s, k);
		if (k < n)
			return false; /* conn_writable() comes */
	}
	return !c->send_busy;
}

/* TLS's ciphertext to the transport. True: all of it is out. */
static bool
drain_tls(struct conn *c)
{
	const uint8_t *p;
	size_t n, k;

	while (!c->send_busy && (n = fd_tls_conn_out(c->tls, &p)) > 0) {
		/* p stays valid until out_done (the ring's writer only
		 * fills its free part). */
		k = c->cs->ops->send(c, p, n, false);
		if (k == CONN_SEND_ARMED) {
			c->send_busy = true;
			break;
		}
		if (k)
			fd_tls_conn_out_done(c->tls, k);
		if (k < n)
			return false;
	}
	return !c->send_busy;
}

/* The alert OpenSSL queued goes if the transport takes it now; nothing
 * waits for it. */
static void
drain_final(struct conn *c)
{
	const uint8_t *p;
	size_t n, k;

	while (!c->send_busy && (n = fd_tls_conn_out(c->tls, &p)) > 0) {
		k = c->cs->ops->send(c, p, n, true);
		if (k == CONN_SEND_ARMED || k == 0)
			break;
		fd_tls_conn_out_done(c->tls, k);
		if (k < n)
			break;
	}
}

/* ---- the decision ------------------------------------------------------- */

/* The client closed its side, and nothing it sent is left to take and no
 * reply it waits for is still to come: the connection may close. A client
 * that half-closed after its final dot (shutdown(SHUT_WR)) still reads;
 * closed during the commit, its message was stored and the client, with
 * no 250, sent it again. */
static bool
peer_done(const struct conn *c)
{
	return c->peer_eof && !c->held && !smtp_session_commit_pending(c->s);
}

/*
 * conn_drive() once TLS has started: the handshake (within the worker's
 * cap), what TLS decrypted to the session, its replies encrypted and out.
 */
static void
drive_tls(struct conn *c)
{
	struct conn_set *cs = c->cs;
	bool hs = !fd_tls_conn_established(c->tls);
	enum fd_tls_status st;
	bool drained;
	uint64_t sent0;

	if (hs && !c->hs_running && !hs_take(c))
		goto input; /* its turn comes in hs_release() */
again:
	st = fd_tls_conn_pump(c->tls, c->s, cs->now_us);
	if (hs && fd_tls_conn_established(c->tls)) {
		hs = false;
		hs_release(c);
		list_del(&cs->hsdl, &c->t_hs);
		if (fd_tls_conn_resumed(c->tls))
			cs->w->tls_resumed++;
	}
	if (st == FD_TLS_FAILED) {
		drain_final(c);
		conn_close(c, "tls_failed", CONN_CLOSE_FIN);
		return;
	}
	if (smtp_session_want_close(c->s) && !c->tls_closing) {
		c->tls_closing = true;
		fd_tls_conn_shutdown(c->tls);
	}
	sent0 = fd_tls_conn_wire_sent(c->tls);
	drained = drain_tls(c);
	/* Everything went at once: TLS's ring has room again, and the pump
	 * may have stopped for it (replies waiting to be encrypted, input
	 * waiting for them, or, once the session is done, its last replies
	 * and the close_notify behind them): pump once more, as conn_input()
	 * does in the clear. */
	if (drained && fd_tls_conn_wire_sent(c->tls) != sent0 &&
	    st == FD_TLS_OK)
		goto again;
	if (c->tls_closing ||
	    (st == FD_TLS_CLOSED && !smtp_session_commit_pending(c->s))) {
		/* Drained after a pump that added nothing: the session's
		 * replies and the close_notify are all out. (A peer that
		 * closed after its final dot waits for its reply.) */
		if (drained)
			conn_close(c, st == FD_TLS_CLOSED ? "peer_closed" : "done",
				   CONN_CLOSE_FIN);
		return;
	}
input:
	if (peer_done(c))
		conn_close(c, "peer_closed", CONN_CLOSE_FIN);
}

/* The 220 to STARTTLS is out: the stream is TLS from the next octet on,
 * both ways. */
static void
start_tls(struct conn *c)
{
	struct conn_set *cs = c->cs;

	c->tls = fd_tls_conn_new(fd_tls, smtp_session_id(c->s),
				 smtp_session_output_total(c->s), cs->now_us);
	if (!c->tls) {
		fd_log(FD_LOG_WARN, "conn", "%016" PRIx64 " event=tls_no_memory",
		       smtp_session_id(c->s));
		conn_close(c, "tls_no_memory", CONN_CLOSE_FIN);
		return;
	}
	timer_arm(&cs->hsdl, &c->t_hs, fd_tls_conn_deadline_us(c->tls));
	drive_tls(c);
}

/*
 * Send what the session produced, end the connection when it is done,
 * start TLS, close on EOF. The one place that decides what a connection
 * does next (but for asking the transport for held input: conn_service).
 */
static void
conn_drive(struct conn *c)
{
	bool drained;

	if (!c->open)
		return;
	if (c->tls) {
		drive_tls(c);
		return;
	}
	drained = drain_plain(c);
	if (smtp_session_want_close(c->s)) {
		if (drained)
			conn_close(c, "done", CONN_CLOSE_FIN);
		return;
	}
	if (smtp_session_tls_wanted(c->s) && drained) {
		start_tls(c);
		return;
	}
	if (drained && peer_done(c))
		conn_close(c, "peer_closed", CONN_CLOSE_FIN);
}

/* Whether held input may be offered: not while the session waits for TLS
 * to start (it is the handshake's). */
static bool
can_take(const struct conn *c)
{
	return c->tls || !smtp_session_tls_wanted(c->s);
}

/* The input the transport holds for c, offered again. */
static void
conn_take_held(struct conn *c)
{
	if (c->open && c->held && can_take(c)) {
		c->resuming = true;
		c->cs->ops->resume(c);
		c->resuming = false;
	}
	if (c->open)
		blocked_update(c);
}

static void
conn_service(struct conn *c)
{
	if (!c->open)
		return;
	conn_drive(c);
	conn_take_held(c);
}

/* ---- transport events --------------------------------------------------- */

size_t
conn_input(struct conn *c, const uint8_t *p, size_t n)
{
	size_t used = 0;

	if (!c->open)
		return n;
	/* Idle means: nothing new from the peer. An offer of held input
	 * is not activity. */
	if (!c->resuming)
		idle_touch(c);
	if (!c->tls && smtp_session_tls_wanted(c->s)) {
		/* The 220 to STARTTLS has not left: maybe it can now. */
		conn_drive(c);
		if (!c->open)
			return n;
	}
	if (c->tls) {
		/* The ring may take less than offered; once the pump has
		 * drained it (the session took the plaintext) it takes more:
		 * go on while it does, as the clear path does, since nothing
		 * else would offer the rest. */
		for (;;) {
			size_t k = fd_tls_conn_in(c->tls, p + used, n - used);
			used += k;
			conn_drive(c);
			if (!c->open || !c->tls || used == n || k == 0)
				break;
		}
	} else if (!smtp_session_tls_wanted(c->s)) {
		for (;;) {
			uint64_t out0 = smtp_session_output_total(c->s);
			size_t k = smtp_session_input(c->s, p + used, n - used);
			used += k;
			conn_drive(c);
			if (!c->open || used == n || c->tls ||
			    (k == 0 && smtp_session_output_total(c->s) == out0))
				break;
		}
	}
	if (!c->open)
		return n; /* ended: nothing more will be read */
	c->held = used < n;
	blocked_update(c);
	return used;
}

void
conn_eof(struct conn *c)
{
	if (!c->open)
		return;
	c->peer_eof = true;
	conn_drive(c);
	if (c->open)
		blocked_update(c);
}

void
conn_writable(struct conn *c)
{
	conn_service(c);
}

void
conn_send_done(struct conn *c, int res)
{
	c->send_busy = false;
	if (!c->open)
		return;
	if (res < 0) {
		conn_close(c, "send_error", CONN_CLOSE_ABORT);
		return;
	}
	if (res > 0 && c->tls)
		fd_tls_conn_out_done(c->tls, (size_t)res);
	else if (res > 0)
		smtp_session_output_done(c->s, (size_t)res);
	conn_service(c);
}

bool
conn_is_open(const struct conn *c)
{
	return c->open;
}

bool
conn_tls_started(const struct conn *c)
{
	return c->tls != NULL;
}

/*
 * Called by worker.c after a commit verdict reached the session, from
 * inside the spool's completion loop: only note it.
 */
void
conn_wake(void *tctx)
{
	mark_dirty(tctx);
}

/* ---- the set ------------------------------------------------------------ */

/*
 * Every timer on l moves by the same amount: from a timer of old_ms to one
 * of new_ms. The list stays in due order (each entry's start is kept), and
 * a connection already past the new length is due now.
 */
static void
timers_retime(struct conn_list *l, uint64_t old_ms, uint64_t new_ms)
{
	for (struct conn_node *n = l->head; n; n = n->next) {
		uint64_t start = n->due_us - old_ms * 1000;
		n->due_us = start + new_ms * 1000;
		if (n->due_us < start) /* new_ms absurdly large */
			n->due_us = UINT64_MAX;
	}
}

/* A reload's idle timeout and greeting delay (fd_worker_poll() took the
 * policy on this thread): for the connections open now too. */
static void
policy_update(struct conn_set *cs)
{
	const struct fd_policy *p = cs->w->policy_seen;

	if (!p || p == cs->policy_seen)
		return;
	cs->policy_seen = p;
	if (p->idle_timeout_ms != cs->idle_ms) {
		timers_retime(&cs->idle, cs->idle_ms, p->idle_timeout_ms);
		cs->idle_ms = p->idle_timeout_ms;
	}
	if (p->greet_delay_ms != cs->greet_ms) {
		timers_retime(&cs->greet, cs->greet_ms,
			      p->greet_delay_ms);
		cs->greet_ms = p->greet_delay_ms;
	}
}

void
conn_set_init(struct conn_set *cs, struct fd_worker *w,
	      const struct conn_ops *ops, uint64_t now_us)
{
	memset(cs, 0, sizeof(*cs));
	cs->w = w;
	cs->ops = ops;
	cs->now_us = now_us;
	cs->idle_ms = w->cfg->idle_timeout_ms;
	cs->greet_ms = w->cfg->greet_delay_ms;
}

int
conn_open(struct conn_set *cs, struct conn *c, const char *addr,
	  const char **reply, size_t *len)
{
	struct fd_worker *w = cs->w;

	/* Paused (finaldotctl pause): 421 4.3.2 and close; the sessions
	 * already open go on. */
	if (atomic_load_explicit(&fd_paused, memory_order_relaxed)) {
		*reply = w->paused_reply;
		*len = w->paused_len;
		w->paused_refused++;
		return -EAGAIN;
	}
	if (!c || cs->stopping)
		goto busy;
	fd_tls_conn_free(c->tls); /* a slot the transport did not release */
	/* The engine took a reload's greeting delay already (it greets at
	 * open or not): the timer must agree with it. */
	policy_update(cs);
	memset(c, 0, sizeof(*c));
	c->cs = cs;
	c->s = smtp_session_open(w->smtp, c, addr,
				 (uint64_t)w->id << 56 | cs->sid_next++);
	if (!c->s)
		goto busy;
	c->open = true;
	cs->nopen++;
	list_push(&cs->open, &c->n_open);
	idle_touch(c);
	if (cs->greet_ms)
		timer_arm(&cs->greet, &c->t_greet,
			  cs->now_us + cs->greet_ms * 1000);
	mark_dirty(c); /* the greeting */
	return 0;
busy:
	/* Best effort on a fresh connection: the reply fits its buffer. */
	*reply = smtp_busy_reply(w->smtp, len);
	w->sessions_refused++;
	return -EBUSY;
}

void
conn_set_room(struct conn_set *cs)
{
	for (struct conn_node *n = cs->blocked.head; n; n = n->next) {
		struct conn *c = CONN_OF(n, n_blocked);
		/* A verdict wakes its own session (conn_wake). */
		if (!smtp_session_commit_pending(c->s))
			mark_dirty(c);
	}
}

/*
 * Two passes. First every marked connection's replies go to the transport
 * and the transport pushes them out (ops->push): a group commit wakes many
 * sessions at once, and a 250 must not wait while the sessions before it
 * parse the messages their clients pipelined behind the dot (RFC 1047's
 * gap: the 250 is the one reply that has to race the link). Then each
 * one's held input. conn_drive() may close a connection (it leaves the
 * list, the next one stays) or mark another (appended: driven in the
 * second pass).
 */
void
conn_set_service(struct conn_set *cs)
{
	struct conn_node *n, *next;

	if (!cs->dirty.head)
		return;
	for (n = cs->dirty.head; n; n = next) {
		struct conn *c = CONN_OF(n, n_dirty);

		next = n->next;
		conn_drive(c);
		if (c->open)
			c->driven = true;
	}
	if (cs->ops->push)
		cs->ops->push(cs);
	while (cs->dirty.head) {
		struct conn *c = CONN_OF(cs->dirty.head, n_dirty);

		list_del(&cs->dirty, &c->n_dirty);
		if (c->driven) {
			/* Driven once already: a second drive would send
			 * again after a short send (the transport says when
			 * it has room). */
			c->driven = false;
			conn_take_held(c);
		} else {
			conn_service(c);
		}
	}
}

bool
conn_set_pending(const struct conn_set *cs)
{
	return cs->dirty.head != NULL;
}

/* The shutdown's force point: nobody waits past it for the spool. */
static void
force_stop(struct conn_set *cs)
{
	unsigned n = 0;

	cs->stop_forced = true;
	for (struct conn_node *o = cs->open.head; o; o = o->next) {
		struct conn *c = CONN_OF(o, n_open);
		smtp_session_shutdown_now(c->s);
		mark_dirty(c);
		n++;
	}
	if (n)
		fd_log(FD_LOG_WARN, "conn",
		       "worker=%u event=stop_forced sessions=%u inflight=%u",
		       cs->w->id, n, spool_inflight(cs->w->spool));
}

/* The timer list whose head is due first, if one is due. */
static struct conn_list *
timer_next(struct conn_set *cs)
{
	struct conn_list *ls[3] = {&cs->idle, &cs->greet, &cs->hsdl};
	struct conn_list *best = NULL;

	for (unsigned i = 0; i < 3; i++)
		if (ls[i]->head && ls[i]->head->due_us <= cs->now_us &&
		    (!best || ls[i]->head->due_us < best->head->due_us))
			best = ls[i];
	return best;
}

void
conn_set_tick(struct conn_set *cs)
{
	struct conn_list *l;

	policy_update(cs);

	while ((l = timer_next(cs))) {
		struct conn_node *n = l->head;
		struct conn *c;

		list_del(l, n);
		if (l == &cs->idle) {
			c = CONN_OF(n, t_idle);
			if (smtp_session_want_close(c->s)) {
				/* Its last replies (the 421 below, a 221)
				 * did not leave in a whole period: a client
				 * that reads nothing (a zero window) held
				 * its slot for good. */
				conn_close(c, "send_timeout",
					   CONN_CLOSE_ABORT);
				continue;
			}
			smtp_session_timeout(c->s);
			idle_touch(c); /* input re-arms it; else once more */
			mark_dirty(c);
		} else if (l == &cs->greet) {
			c = CONN_OF(n, t_greet);
			smtp_session_greet(c->s);
			mark_dirty(c);
		} else {
			/* TLS handshakes have a deadline of their own (a
			 * client sending a byte at a time never lets the idle
			 * timer fire); one waiting for its turn too. */
			c = CONN_OF(n, t_hs);
			if (c->hs_running) {
				mark_dirty(c); /* the pump says why */
				continue;
			}
			fd_log(FD_LOG_INFO, "conn",
			       "%016" PRIx64 " event=tls_failed "
			       "reason=\"handshake timeout (waited for a "
			       "handshake slot)\"",
			       smtp_session_id(c->s));
			conn_close(c, "tls_timeout", CONN_CLOSE_FIN);
		}
	}
	if (cs->stopping && !cs->stop_forced &&
	    cs->now_us >= cs->stop_force_us)
		force_stop(cs);
	conn_set_service(cs);
}

void
conn_set_begin_stop(struct conn_set *cs)
{
	uint64_t t = cs->w->cfg->shutdown_timeout_ms * 1000, grace = t / 4;

	if (cs->stopping)
		return;
	cs->stopping = true;
	if (grace > 1000000)
		grace = 1000000;
	cs->stop_force_us = cs->now_us + t - grace;
	cs->stop_deadline_us = cs->now_us + t;
	if (cs->stop_deadline_us < cs->stop_force_us + 100000)
		cs->stop_deadline_us = cs->stop_force_us + 100000;
	for (struct conn_node *o = cs->open.head; o; o = o->next) {
		struct conn *c = CONN_OF(o, n_open);
		smtp_session_shutdown(c->s);
		mark_dirty(c);
	}
	fd_log(FD_LOG_INFO, "conn", "worker=%u event=stopping sessions=%u",
	       cs->w->id, cs->nopen);
}

bool
conn_set_stopping(const struct conn_set *cs)
{
	return cs->stopping;
}

bool
conn_set_past_deadline(const struct conn_set *cs)
{
	return cs->stopping && cs->now_us >= cs->stop_deadline_us;
}

bool
conn_set_done(const struct conn_set *cs, bool transport_idle)
{
	if (!cs->stopping)
		return false;
	if (cs->nopen == 0 && transport_idle &&
	    spool_inflight(cs->w->spool) == 0)
		return true;
	return cs->now_us >= cs->stop_deadline_us;
}

void
conn_set_close_all(struct conn_set *cs)
{
	if (cs->nopen)
		fd_log(FD_LOG_WARN, "conn",
		       "worker=%u event=stop_timeout sessions=%u", cs->w->id,
		       cs->nopen);
	while (cs->open.head)
		conn_close(CONN_OF(cs->open.head, n_open), "shutdown",
			   CONN_CLOSE_ABORT);
}

unsigned
conn_set_open_count(const struct conn_set *cs)
{
	return cs->nopen;
}
