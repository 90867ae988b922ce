/*
 * Kernel-socket transport: one io_uring per worker thread carries accepts,
 * receives, sends and the spool's durable writes, so that one
 * io_uring_submit_and_wait() per loop iteration serves network and disk.
 *
 * Per iteration:
 *   1. submit what is queued and wait (bounded by the next timer) for a CQE;
 *   2. handle every CQE that is ready: accept -> new session; recv -> feed
 *      the session; send -> next piece of output; spool -> completions, which
 *      produce the 250s (worker.c);
 *   3. service "dirty" connections: offer held input again, start sends,
 *      close the ones that are done;
 *   4. timers: greeting delay, idle timeout (the command and message
 *      deadlines are the engine's, checked as input arrives);
 *   5. spool_flush(): the loop is idle, so the batch being filled closes and
 *      goes out with the next submit (natural batching);
 *   6. stopping: at the force point 421 to everyone, at the deadline exit
 *      (begin_stop()).
 *
 * Receives use single-shot recv with a provided-buffer ring (buffer
 * selection): an idle connection holds no buffer. A buffer the session did
 * not fully consume (it is waiting for a commit, for spool room, or for its
 * output to drain) stays held by the connection and no new recv is armed, so
 * the kernel's receive window, not our memory, absorbs a client that talks
 * ahead. Multishot accept keeps one accept armed per listener.
 *
 * user_data: a pointer to a connection, a listener or the loop (all 8-byte
 * aligned) with the operation in the low 3 bits. The spool's CQEs carry the
 * top bit (spool_owns_cqe()). Never set here.
 *
 * Lifetime of a connection: in use from accept until it is closing AND has
 * no operation in flight; the smtp session is closed (returned to its pool)
 * as soon as the connection starts closing.
 *
 * STARTTLS: after the 220 to STARTTLS went out in the clear, the connection
 * gets a struct fd_tls_conn (tls/tls.h) and from then on received octets go
 * to it, and what it produces is sent; it feeds the session. Octets the
 * client pipelined behind STARTTLS never reach the session as commands: the
 * engine drops what came with the command, and while it waits for TLS no
 * input is offered to it (what arrives then is for the handshake). At most
 * tls_max_handshakes handshakes run at once per worker; a connection beyond
 * that waits, its ClientHello held, until one ends.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "finaldot/log.h"
#include "finaldot/msgid.h"
#include "smtp/smtp.h"
#include "sock/sock.h"
#include "sock/tcpinfo.h"
#include "spool/spool.h"
#include "tls/tls.h"
#include "worker.h"

#define RING_ENTRIES 4096u
#define BUF_GROUP 1
#define BUF_SIZE (16u * 1024u)
#define TICK_US 100000u /* longest wait without a timer due */

enum op {
	OP_NONE = 0,
	OP_RECV = 1,
	OP_SEND = 2,
	OP_ACCEPT = 3,
	OP_WAKE = 4,
	OP_IGNORE = 5, /* cancels: result not needed */
	OP_SPOOL = 6,  /* the spool's wake eventfd: a spare is ready */
};

struct sock_loop;

struct sock_conn {
	struct sock_loop *loop;
	struct smtp_session *s;
	int fd;
	unsigned inflight;     /* recv + send SQEs not yet completed */
	bool in_use;
	bool recv_armed;
	bool send_armed;
	bool peer_eof;
	bool closing;
	bool dirty;
	bool starved;          /* last recv found no provided buffer */
	bool held;             /* holds provided buffer held_bid */
	uint16_t held_bid;
	uint32_t held_off;
	uint32_t held_len;
	uint64_t last_active_us;
	uint64_t greet_due_us; /* 0: greeted */
	struct fd_tls_conn *tls; /* after STARTTLS; freed with the slot */
	bool hs_running;        /* counted in loop->handshakes */
	bool hs_waiting;        /* waits for a handshake slot */
	bool tls_closing;       /* close_notify queued */
	uint64_t hs_wait_us;    /* since when (oldest goes first) */
	struct sock_conn *idle_prev, *idle_next; /* LRU, oldest first */
	struct sock_conn *dirty_next;
	struct sock_conn *free_next;
	char addr[INET6_ADDRSTRLEN];
} __attribute__((aligned(64)));

struct sock_listener {
	struct sock_loop *loop;
	int fd;
	unsigned idx;
	bool armed;
} __attribute__((aligned(8)));

struct sock_loop {
	struct fd_worker *w;
	struct io_uring ring;
	struct io_uring_buf_ring *br;
	size_t br_bytes;
	uint8_t *bufs;
	unsigned nbufs;
	struct sock_conn *conns;
	struct sock_conn *free;
	unsigned nconns;
	unsigned in_use;
	struct sock_listener listeners[FD_CONFIG_MAX_LISTEN];
	unsigned nlisteners;
	struct sock_conn *idle_head, *idle_tail;
	struct sock_conn *dirty;
	uint64_t wake_val;
	uint64_t spool_wake_val;
	bool wake_armed;
	bool stopping;
	uint64_t stop_force_us;    /* shutdown: 421 to whoever still waits */
	uint64_t stop_deadline_us; /* shutdown: close everything, exit */
	bool stop_forced;
	uint64_t sid_next;
	uint64_t now_us;
	uint64_t next_accept_rearm_us;
	uint64_t next_accept_log_us;
	uint64_t accept_errors;
	bool buffers_returned; /* re-arm starved connections */
	unsigned nstarved;     /* connections with starved set */
	unsigned nheld;        /* connections with held set */
	bool spool_progress;   /* spool completions this round */
	unsigned handshakes;   /* TLS handshakes running */
	unsigned hs_waiting;   /* connections waiting for one */
} __attribute__((aligned(64)));

static inline uint64_t
ud(const void *p, enum op op)
{
	return (uint64_t)(uintptr_t)p | (uint64_t)op;
}

static inline enum op
ud_op(uint64_t u)
{
	return (enum op)(u & 7u);
}

static inline void *
ud_ptr(uint64_t u)
{
	return (void *)(uintptr_t)(u & ~(uint64_t)7);
}

static struct io_uring_sqe *
get_sqe(struct sock_loop *l)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&l->ring);

	if (!sqe) {
		/* SQ full: submit what is there and try again. */
		io_uring_submit(&l->ring);
		sqe = io_uring_get_sqe(&l->ring);
	}
	return sqe;
}

/* ---- connection bookkeeping ------------------------------------------ */

static void
idle_unlink(struct sock_loop *l, struct sock_conn *c)
{
	if (c->idle_prev)
		c->idle_prev->idle_next = c->idle_next;
	else if (l->idle_head == c)
		l->idle_head = c->idle_next;
	if (c->idle_next)
		c->idle_next->idle_prev = c->idle_prev;
	else if (l->idle_tail == c)
		l->idle_tail = c->idle_prev;
	c->idle_prev = c->idle_next = NULL;
}

static void
idle_touch(struct sock_loop *l, struct sock_conn *c)
{
	c->last_active_us = l->now_us;
	if (l->idle_tail == c)
		return;
	idle_unlink(l, c);
	c->idle_prev = l->idle_tail;
	if (l->idle_tail)
		l->idle_tail->idle_next = c;
	else
		l->idle_head = c;
	l->idle_tail = c;
}

static void
mark_dirty(struct sock_conn *c)
{
	if (c->dirty || !c->in_use)
		return;
	c->dirty = true;
	c->dirty_next = c->loop->dirty;
	c->loop->dirty = c;
}

static void
buf_return(struct sock_loop *l, uint16_t bid)
{
	io_uring_buf_ring_add(l->br, l->bufs + (size_t)bid * BUF_SIZE,
			      BUF_SIZE, bid,
			      io_uring_buf_ring_mask(l->nbufs), 0);
	io_uring_buf_ring_advance(l->br, 1);
	l->buffers_returned = true;
}

static void
conn_release_held(struct sock_conn *c)
{
	if (c->held) {
		buf_return(c->loop, c->held_bid);
		c->held = false;
		c->loop->nheld--;
	}
}

static void
conn_finalize(struct sock_conn *c)
{
	struct sock_loop *l = c->loop;

	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	/* Only now: a send in flight may point into its buffers. */
	fd_tls_conn_free(c->tls);
	c->tls = NULL;
	if (c->starved) {
		c->starved = false;
		l->nstarved--;
	}
	c->in_use = false;
	c->free_next = l->free;
	l->free = c;
	l->in_use--;
}

/*
 * RFC 1047: the session ends. A 250 to a final dot whose octets the
 * client's TCP has not acknowledged may never have been read: the client
 * will send the message again, and the control plane must know. A session
 * that ended with QUIT is taken as read (the client read its replies
 * before it said QUIT; a client that pipelined QUIT behind the final dot
 * and lost the connection right then is the case this misses).
 */
static void
conn_check_indoubt(struct sock_conn *c)
{
	struct smtp_ackpoint ap[SMTP_ACKPOINTS];
	unsigned n = smtp_session_ackpoints(c->s, ap);
	uint64_t acked;

	if (n == 0 || smtp_session_quit_seen(c->s) || c->fd < 0 ||
	    sock_bytes_acked(c->fd, &acked) != 0)
		return;
	/* Under TLS the client acknowledges ciphertext: compare with where
	 * the record that carried the reply ends in the TCP stream. */
	for (unsigned i = 0; i < n; i++) {
		uint64_t end = c->tls ? fd_tls_conn_wire_end(c->tls, ap[i].end)
				      : ap[i].end;
		if (end > acked)
			fd_worker_indoubt(c->loop->w, ap[i].msgid);
	}
}

/*
 * A handshake ended (done, failed, or the connection closes): its slot goes
 * to the connection that has waited longest. XXX a scan of the table, once
 * per handshake, and only while some wait.
 */
static void
hs_release(struct sock_conn *c)
{
	struct sock_loop *l = c->loop;
	struct sock_conn *next = NULL;

	if (c->hs_waiting) {
		c->hs_waiting = false;
		l->hs_waiting--;
	}
	if (!c->hs_running)
		return;
	c->hs_running = false;
	l->handshakes--;
	if (l->hs_waiting == 0)
		return;
	for (unsigned i = 0; i < l->nconns; i++) {
		struct sock_conn *w = &l->conns[i];
		if (w->in_use && w->hs_waiting &&
		    (!next || w->hs_wait_us < next->hs_wait_us))
			next = w;
	}
	if (next)
		mark_dirty(next);
}

/* Start closing: the session goes back to its pool now; the slot when the
 * last operation in flight has completed. */
static void
conn_close(struct sock_conn *c, const char *why)
{
	struct sock_loop *l = c->loop;

	if (c->closing)
		return;
	c->closing = true;
	if (c->s)
		conn_check_indoubt(c);
	if (c->s) {
		fd_debug("sock", "%016" PRIx64 " event=close reason=%s",
			 smtp_session_id(c->s), why);
		smtp_session_close(c->s);
		c->s = NULL;
	}
	(void)why;
	/* A handshake that never completed, whatever ended it (a bad
	 * record, its deadline, the client gone): counted once, here. */
	if (c->tls && !fd_tls_conn_established(c->tls))
		l->w->tls_failed++;
	hs_release(c);
	idle_unlink(l, c);
	conn_release_held(c);
	if (c->inflight == 0) {
		conn_finalize(c);
		return;
	}
	/* Wake a pending recv (it completes with 0 or an error). */
	shutdown(c->fd, SHUT_RDWR);
}

static void
conn_arm_recv(struct sock_conn *c)
{
	struct io_uring_sqe *sqe = get_sqe(c->loop);

	if (!sqe)
		return; /* retried when the connection is next dirty */
	io_uring_prep_recv(sqe, c->fd, NULL, BUF_SIZE, 0);
	sqe->flags |= IOSQE_BUFFER_SELECT;
	sqe->buf_group = BUF_GROUP;
	io_uring_sqe_set_data64(sqe, ud(c, OP_RECV));
	c->recv_armed = true;
	if (c->starved)
		c->loop->nstarved--;
	c->starved = false;
	c->inflight++;
}

static void
conn_send_output(struct sock_conn *c)
{
	const uint8_t *p;
	size_t n;
	struct io_uring_sqe *sqe;

	if (c->send_armed || !c->s)
		return;
	n = smtp_session_output(c->s, &p);
	if (n == 0)
		return;
	sqe = get_sqe(c->loop);
	if (!sqe)
		return;
	/* p stays valid until output_done (the engine appends behind it
	 * and never moves bytes that were handed out). */
	io_uring_prep_send(sqe, c->fd, p, n, MSG_NOSIGNAL);
	io_uring_sqe_set_data64(sqe, ud(c, OP_SEND));
	c->send_armed = true;
	c->inflight++;
}

/*
 * Offer held input, send what the session produced, re-arm the receive,
 * close when done. The one place that decides what a connection does next.
 */
static void conn_service_tls(struct sock_conn *c);

static void
conn_service(struct sock_conn *c)
{
	struct sock_loop *l = c->loop;

	if (c->closing || !c->s)
		return;
	if (c->tls) {
		conn_service_tls(c);
		return;
	}
	/* Waiting for TLS: what arrives now is the handshake's. */
	if (c->held && !smtp_session_tls_wanted(c->s)) {
		const uint8_t *p = l->bufs + (size_t)c->held_bid * BUF_SIZE +
				   c->held_off;
		size_t used = smtp_session_input(c->s, p, c->held_len);
		c->held_off += (uint32_t)used;
		c->held_len -= (uint32_t)used;
		if (c->held_len == 0)
			conn_release_held(c);
	}
	conn_send_output(c);
	if (smtp_session_want_close(c->s)) {
		if (!c->send_armed)
			conn_close(c, "done");
		return;
	}
	if (smtp_session_tls_wanted(c->s) && !c->send_armed) {
		const uint8_t *p;
		if (smtp_session_output(c->s, &p) == 0) {
			/* The 220 is out: TLS from the next octet on. */
			c->tls = fd_tls_conn_new(fd_tls, smtp_session_id(c->s),
						 smtp_session_output_total(c->s),
						 l->now_us);
			if (!c->tls) {
				fd_log(FD_LOG_WARN, "sock",
				       "%016" PRIx64 " event=tls_no_memory",
				       smtp_session_id(c->s));
				conn_close(c, "tls_no_memory");
				return;
			}
			conn_service_tls(c);
			return;
		}
	}
	if (c->held)
		return; /* paused: the session will be offered it again */
	if (c->peer_eof) {
		conn_close(c, "peer_closed");
		return;
	}
	if (!c->recv_armed && !c->starved)
		conn_arm_recv(c);
}

/* Send what TLS produced (one send in flight at a time, as in the clear). */
static void
conn_send_tls(struct sock_conn *c)
{
	const uint8_t *p;
	size_t n;
	struct io_uring_sqe *sqe;

	if (c->send_armed)
		return;
	n = fd_tls_conn_out(c->tls, &p);
	if (n == 0)
		return;
	sqe = get_sqe(c->loop);
	if (!sqe)
		return;
	/* p stays valid until fd_tls_conn_out_done() (the ring's writer
	 * only fills the free part). */
	io_uring_prep_send(sqe, c->fd, p, n, MSG_NOSIGNAL);
	io_uring_sqe_set_data64(sqe, ud(c, OP_SEND));
	c->send_armed = true;
	c->inflight++;
}

/* conn_service() once TLS has started. */
static void
conn_service_tls(struct sock_conn *c)
{
	struct sock_loop *l = c->loop;
	const struct fd_config *cfg = l->w->cfg;
	enum fd_tls_status st = FD_TLS_OK;
	bool hs = !fd_tls_conn_established(c->tls);

	if (c->held) {
		const uint8_t *p = l->bufs + (size_t)c->held_bid * BUF_SIZE +
				   c->held_off;
		size_t used = fd_tls_conn_in(c->tls, p, c->held_len);
		c->held_off += (uint32_t)used;
		c->held_len -= (uint32_t)used;
		if (c->held_len == 0)
			conn_release_held(c);
	}
	if (hs && !c->hs_running) {
		if (l->handshakes >= cfg->tls_max_handshakes) {
			if (!c->hs_waiting) {
				c->hs_waiting = true;
				c->hs_wait_us = l->now_us;
				l->hs_waiting++;
			}
			goto recv; /* its turn comes in hs_release() */
		}
		if (c->hs_waiting) {
			c->hs_waiting = false;
			l->hs_waiting--;
		}
		c->hs_running = true;
		l->handshakes++;
	}
	st = fd_tls_conn_pump(c->tls, c->s, l->now_us);
	if (hs && fd_tls_conn_established(c->tls)) {
		hs_release(c);
		if (fd_tls_conn_resumed(c->tls))
			l->w->tls_resumed++;
	}
	if (st == FD_TLS_FAILED) {
		/* The alert OpenSSL queued goes out if the socket takes it
		 * now; nothing waits for it. */
		const uint8_t *p;
		size_t n = fd_tls_conn_out(c->tls, &p);
		if (n && !c->send_armed)
			(void)send(c->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
		conn_close(c, "tls_failed");
		return;
	}
	if (smtp_session_want_close(c->s) && !c->tls_closing) {
		c->tls_closing = true;
		fd_tls_conn_shutdown(c->tls);
	}
	conn_send_tls(c);
	if (c->tls_closing || st == FD_TLS_CLOSED) {
		const uint8_t *p;
		if (!c->send_armed && fd_tls_conn_out(c->tls, &p) == 0)
			conn_close(c, st == FD_TLS_CLOSED ? "peer_closed"
							  : "done");
		return;
	}
recv:
	if (c->held)
		return; /* paused: offered again when TLS has room */
	if (c->peer_eof) {
		conn_close(c, "peer_closed");
		return;
	}
	if (!c->recv_armed && !c->starved)
		conn_arm_recv(c);
}

static void
busy_refuse(struct sock_loop *l, int fd)
{
	size_t len;
	const char *msg = smtp_busy_reply(l->w->smtp, &len);

	/* Best effort on a fresh socket: the reply fits its send buffer. */
	if (send(fd, msg, len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
		fd_debug("sock", "event=busy_send_failed errno=%d", errno);
	close(fd);
	l->w->sessions_refused++;
}

static void
on_accept(struct sock_loop *l, struct sock_listener *ls, int fd)
{
	struct sock_conn *c = l->free;
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	int one = 1;

	/* Paused (finaldotctl pause): 421 4.3.2 and close, like busy_refuse;
	 * the sessions already open go on. */
	if (atomic_load_explicit(&fd_paused, memory_order_relaxed)) {
		if (send(fd, l->w->paused_reply, l->w->paused_len,
			 MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
			fd_debug("sock", "event=paused_send_failed errno=%d",
				 errno);
		close(fd);
		l->w->paused_refused++;
		return;
	}
	if (!c || l->stopping) {
		busy_refuse(l, fd);
		return;
	}
	(void)ls;
	l->free = c->free_next;
	/* A slot freed in this round may still sit on the dirty list: keep
	 * its link intact (service_dirty skips slots not in use). */
	bool was_dirty = c->dirty;
	struct sock_conn *dnext = c->dirty_next;
	memset(c, 0, sizeof(*c));
	c->dirty = was_dirty;
	c->dirty_next = dnext;
	c->loop = l;
	c->fd = fd;
	c->in_use = true;
	l->in_use++;
	strcpy(c->addr, "unknown");
	if (getpeername(fd, (struct sockaddr *)&ss, &sl) == 0) {
		if (ss.ss_family == AF_INET) {
			inet_ntop(AF_INET,
				  &((struct sockaddr_in *)&ss)->sin_addr,
				  c->addr, sizeof(c->addr));
		} else if (ss.ss_family == AF_INET6) {
			struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
			if (IN6_IS_ADDR_V4MAPPED(&a6->sin6_addr))
				inet_ntop(AF_INET, &a6->sin6_addr.s6_addr[12],
					  c->addr, sizeof(c->addr));
			else
				inet_ntop(AF_INET6, &a6->sin6_addr, c->addr,
					  sizeof(c->addr));
		}
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	c->s = smtp_session_open(l->w->smtp, c, c->addr,
				 (uint64_t)l->w->id << 56 | l->sid_next++);
	if (!c->s) {
		c->fd = -1;
		conn_finalize(c);
		busy_refuse(l, fd);
		return;
	}
	if (l->w->cfg->greet_delay_ms)
		c->greet_due_us = l->now_us + l->w->cfg->greet_delay_ms * 1000;
	idle_touch(l, c);
	mark_dirty(c);
}

static void
arm_accept(struct sock_loop *l, struct sock_listener *ls)
{
	struct io_uring_sqe *sqe = get_sqe(l);

	if (!sqe)
		return;
	io_uring_prep_multishot_accept(sqe, ls->fd, NULL, NULL, SOCK_CLOEXEC);
	io_uring_sqe_set_data64(sqe, ud(ls, OP_ACCEPT));
	ls->armed = true;
}

static void
arm_wake(struct sock_loop *l)
{
	struct io_uring_sqe *sqe = get_sqe(l);

	if (!sqe)
		return;
	io_uring_prep_read(sqe, l->w->wake_fd, &l->wake_val,
			   sizeof(l->wake_val), 0);
	io_uring_sqe_set_data64(sqe, ud(l, OP_WAKE));
	l->wake_armed = true;
}

/* The spool made room without a write completion (a spare segment is
 * ready): held sessions get their input offered again (retry_held). */
static void
arm_spool_wake(struct sock_loop *l)
{
	struct io_uring_sqe *sqe = get_sqe(l);

	if (!sqe)
		return;
	io_uring_prep_read(sqe, spool_wake_fd(l->w->spool), &l->spool_wake_val,
			   sizeof(l->spool_wake_val), 0);
	io_uring_sqe_set_data64(sqe, ud(l, OP_SPOOL));
}

/* Called by worker.c after a commit verdict reached a session. */
static void
wake_session(void *tctx)
{
	mark_dirty(tctx);
}

/*
 * Shutdown is bounded by shutdown_timeout (issue 10), whatever the disk
 * does. Until the force point sessions end on their own: a commit in
 * flight gets its verdict (250 or 451/452), then 421 4.3.2. At the force
 * point (a quarter of the timeout, at most 1 s, before the deadline) every
 * session still open is answered 421 4.3.2 at once, a commit still in
 * flight included (smtp_session_shutdown_now()): the remaining time lets
 * those replies go out. At the deadline the loop ends, with spool writes
 * still in flight or not: no session waits for them any more.
 */
static void
begin_stop(struct sock_loop *l)
{
	uint64_t t = l->w->cfg->shutdown_timeout_ms * 1000, grace = t / 4;

	if (l->stopping)
		return;
	l->stopping = true;
	if (grace > 1000000)
		grace = 1000000;
	l->stop_force_us = l->now_us + t - grace;
	l->stop_deadline_us = l->now_us + t;
	if (l->stop_deadline_us < l->stop_force_us + 100000)
		l->stop_deadline_us = l->stop_force_us + 100000;
	for (unsigned i = 0; i < l->nlisteners; i++) {
		/* Stop taking connections: the multishot accept ends. */
		shutdown(l->listeners[i].fd, SHUT_RD);
	}
	for (unsigned i = 0; i < l->nconns; i++) {
		struct sock_conn *c = &l->conns[i];
		if (c->in_use && !c->closing && c->s) {
			smtp_session_shutdown(c->s);
			mark_dirty(c);
		}
	}
	fd_log(FD_LOG_INFO, "sock", "worker=%u event=stopping sessions=%u",
	       l->w->id, l->in_use);
}

static void
on_cqe(struct sock_loop *l, const struct io_uring_cqe *cqe)
{
	uint64_t u = io_uring_cqe_get_data64(cqe);
	struct sock_conn *c;

	if (spool_owns_cqe(cqe)) {
		spool_handle_cqe(l->w->spool, cqe);
		l->spool_progress = true;
		return;
	}
	switch (ud_op(u)) {
	case OP_RECV:
		c = ud_ptr(u);
		c->inflight--;
		c->recv_armed = false;
		if (cqe->res > 0 && (cqe->flags & IORING_CQE_F_BUFFER)) {
			uint16_t bid =
				(uint16_t)(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
			if (c->closing) {
				buf_return(l, bid);
			} else {
				c->held = true;
				l->nheld++;
				c->held_bid = bid;
				c->held_off = 0;
				c->held_len = (uint32_t)cqe->res;
				idle_touch(l, c);
			}
		} else if (cqe->res == -ENOBUFS) {
			if (!c->starved)
				l->nstarved++;
			c->starved = true; /* re-armed when a buffer returns */
		} else if (cqe->res == 0 || cqe->res != -EINTR) {
			c->peer_eof = true;
		}
		break;
	case OP_SEND:
		c = ud_ptr(u);
		c->inflight--;
		c->send_armed = false;
		if (cqe->res > 0 && c->tls && !c->closing) {
			fd_tls_conn_out_done(c->tls, (size_t)cqe->res);
		} else if (cqe->res > 0 && c->s && !c->closing) {
			smtp_session_output_done(c->s, (size_t)cqe->res);
		} else if (cqe->res < 0 && !c->closing) {
			conn_close(c, "send_error");
		}
		break;
	case OP_ACCEPT: {
		struct sock_listener *ls = ud_ptr(u);
		if (!(cqe->flags & IORING_CQE_F_MORE))
			ls->armed = false;
		if (cqe->res >= 0) {
			on_accept(l, ls, cqe->res);
		} else if (cqe->res != -EINVAL && cqe->res != -ECANCELED &&
			   !l->stopping) {
			/* One line a second at most, with the count. */
			l->accept_errors++;
			if (l->now_us >= l->next_accept_log_us) {
				l->next_accept_log_us = l->now_us + 1000000;
				fd_log(FD_LOG_WARN, "sock",
				       "worker=%u event=accept_error "
				       "error=\"%s\" count=%" PRIu64,
				       l->w->id, strerror(-cqe->res),
				       l->accept_errors);
			}
		}
		return;
	}
	case OP_WAKE:
		l->wake_armed = false;
		if (atomic_load(&l->w->stop))
			begin_stop(l);
		else
			arm_wake(l);
		return;
	case OP_SPOOL:
		l->spool_progress = true;
		if (cqe->res >= 0 || cqe->res == -EAGAIN || cqe->res == -EINTR)
			arm_spool_wake(l);
		return;
	case OP_NONE:
	case OP_IGNORE:
		return;
	}
	c = ud_ptr(u);
	if (c->closing) {
		if (c->inflight == 0)
			conn_finalize(c);
		return;
	}
	mark_dirty(c);
}

static void
run_timers(struct sock_loop *l)
{
	const struct fd_config *cfg = l->w->cfg;
	uint64_t idle_us = cfg->idle_timeout_ms * 1000;

	/* A multishot accept the kernel ended (an error such as EMFILE, or
	 * a CQE without F_MORE for any reason) is armed again here, at most
	 * once per tick, so a lasting error cannot spin the loop. */
	if (!l->stopping && l->now_us >= l->next_accept_rearm_us) {
		l->next_accept_rearm_us = l->now_us + TICK_US;
		for (unsigned i = 0; i < l->nlisteners; i++)
			if (!l->listeners[i].armed)
				arm_accept(l, &l->listeners[i]);
	}

	/* Oldest first: stop at the first connection that is not due. */
	while (l->idle_head &&
	       l->idle_head->last_active_us + idle_us <= l->now_us) {
		struct sock_conn *c = l->idle_head;
		idle_unlink(l, c);
		if (c->s && !c->closing) {
			smtp_session_timeout(c->s);
			mark_dirty(c);
		}
	}
	/* TLS handshakes have a deadline of their own (a client sending a
	 * byte at a time never lets the idle timer fire); one waiting for
	 * its turn too. */
	if (l->handshakes + l->hs_waiting > 0) {
		for (unsigned i = 0; i < l->nconns; i++) {
			struct sock_conn *c = &l->conns[i];
			uint64_t d = c->in_use && c->tls && !c->closing
					     ? fd_tls_conn_deadline_us(c->tls)
					     : 0;
			if (d == 0 || d > l->now_us)
				continue;
			if (c->hs_running) {
				mark_dirty(c); /* the pump says why */
			} else {
				fd_log(FD_LOG_INFO, "sock",
				       "%016" PRIx64 " event=tls_failed "
				       "reason=\"handshake timeout (waited "
				       "for a handshake slot)\"",
				       smtp_session_id(c->s));
				conn_close(c, "tls_timeout");
			}
		}
	}
	if (cfg->greet_delay_ms == 0)
		return;
	for (unsigned i = 0; i < l->nconns; i++) {
		struct sock_conn *c = &l->conns[i];
		if (c->in_use && c->greet_due_us &&
		    c->greet_due_us <= l->now_us) {
			c->greet_due_us = 0;
			if (c->s && !c->closing) {
				smtp_session_greet(c->s);
				mark_dirty(c);
			}
		}
	}
}

static void
service_dirty(struct sock_loop *l)
{
	/* Connections starved of receive buffers try again once some came
	 * back; conn_service() re-arms them. */
	if (l->buffers_returned && l->nstarved) {
		for (unsigned i = 0; i < l->nconns; i++) {
			struct sock_conn *c = &l->conns[i];
			if (c->in_use && c->starved) {
				c->starved = false;
				l->nstarved--;
				mark_dirty(c);
			}
		}
	}
	l->buffers_returned = false;
	while (l->dirty) {
		struct sock_conn *c = l->dirty;
		l->dirty = c->dirty_next;
		c->dirty = false;
		if (c->in_use)
			conn_service(c);
	}
}

/*
 * Connections blocked on spool room get offered their input again after a
 * round that saw spool completions (a buffer may have come free) or the
 * spool's wake eventfd (a spare segment became ready: OP_SPOOL). Commit
 * verdicts wake their own session (wake_session), so this is only for room.
 * XXX: a scan of the connection table; a list of blocked connections would
 * make it proportional to the blocked ones.
 */
static void
retry_held(struct sock_loop *l)
{
	if (!l->spool_progress)
		return;
	l->spool_progress = false;
	if (l->nheld == 0)
		return;
	for (unsigned i = 0; i < l->nconns; i++) {
		struct sock_conn *c = &l->conns[i];
		bool holding = c->held || (c->tls && fd_tls_conn_holding(c->tls));
		if (c->in_use && holding && !c->closing &&
		    !smtp_session_commit_pending(c->s))
			mark_dirty(c);
	}
}

/*
 * One owner per port (issue 10). Every worker binds its own listener with
 * SO_REUSEPORT, and the kernel lets any socket of the same user join such a
 * group: a second finaldot started on our port would silently take part of
 * our connections. So before any worker binds, the first one to get here
 * claims every configured address for the process:
 *  1. it binds an abstract unix socket named after the address
 *     ("@finaldot-listen 127.0.0.1:25") and keeps it open for the life of the
 *     process. The name is unique per network namespace (as ports are),
 *     taken atomically and released when the process ends, kill -9
 *     included: of two finaldots started together exactly one gets it;
 *  2. it binds a probe socket to the address WITHOUT SO_REUSEPORT and
 *     closes it: that fails (EADDRINUSE) if anything listens there already,
 *     with or without SO_REUSEPORT: another program, or a finaldot on an
 *     overlapping address (0.0.0.0:25 against 127.0.0.1:25).
 * Then every worker binds as before, and they share the port among
 * themselves. The other workers wait for the claim and share its verdict.
 * XXX a program other than finaldot that binds the port with SO_REUSEPORT,
 * as our user, between the probe and our bind still joins the group: a
 * window of two system calls, for a program that could hijack us anyway.
 */
static pthread_mutex_t claim_mu = PTHREAD_MUTEX_INITIALIZER;
static bool claim_done;
static int claim_err;
static int claim_fds[FD_CONFIG_MAX_LISTEN];

static int
claim_one(const struct fd_listen *li, int *lock_fd)
{
	struct sockaddr_un un;
	char host[INET6_ADDRSTRLEN] = "?";
	unsigned port = 0;
	socklen_t ulen;
	int one = 1, fd, r = 0;

	if (li->addr.ss_family == AF_INET) {
		const struct sockaddr_in *a = (const void *)&li->addr;
		inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
		port = ntohs(a->sin_port);
	} else if (li->addr.ss_family == AF_INET6) {
		const struct sockaddr_in6 *a = (const void *)&li->addr;
		inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
		port = ntohs(a->sin6_port);
	}
	memset(&un, 0, sizeof(un));
	un.sun_family = AF_UNIX;
	/* sun_path[0] = 0: the abstract namespace (no file). */
	int n = snprintf(un.sun_path + 1, sizeof(un.sun_path) - 1,
			 "finaldot-listen %s%s%s:%u",
			 li->addr.ss_family == AF_INET6 ? "[" : "", host,
			 li->addr.ss_family == AF_INET6 ? "]" : "", port);
	ulen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 +
			   (size_t)n);
	*lock_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (*lock_fd < 0)
		return -errno;
	if (bind(*lock_fd, (const struct sockaddr *)&un, ulen) != 0) {
		r = -errno;
		fd_log(FD_LOG_ERR, "sock",
		       "event=listen_failed addr=%s error=\"%s\"", li->text,
		       r == -EADDRINUSE
			       ? "another finaldot listens on this address"
			       : strerror(-r));
		close(*lock_fd);
		*lock_fd = -1;
		return r;
	}
	fd = socket(li->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	/* SO_REUSEADDR as the listeners have it: a port whose last
	 * connections sit in TIME_WAIT is free for a listener. */
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (li->addr.ss_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (bind(fd, (const struct sockaddr *)&li->addr, li->addrlen) != 0) {
		r = -errno;
		fd_log(FD_LOG_ERR, "sock",
		       "event=listen_failed addr=%s error=\"%s\"", li->text,
		       r == -EADDRINUSE
			       ? "address in use by another process"
			       : strerror(-r));
	}
	close(fd);
	return r;
}

static int
claim_ports(const struct fd_config *cfg)
{
	int r;

	pthread_mutex_lock(&claim_mu);
	if (!claim_done) {
		claim_done = true;
		for (unsigned i = 0; i < cfg->n_listen && claim_err == 0; i++)
			claim_err = claim_one(&cfg->listen[i], &claim_fds[i]);
	}
	r = claim_err;
	pthread_mutex_unlock(&claim_mu);
	return r;
}

static int
open_listener(const struct fd_listen *li)
{
	int one = 1;
	int fd = socket(li->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -errno;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (li->addr.ss_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (bind(fd, (const struct sockaddr *)&li->addr, li->addrlen) != 0 ||
	    listen(fd, 4096) != 0) {
		int e = -errno;
		close(fd);
		return e;
	}
	return fd;
}

static int
loop_init(struct sock_loop *l, struct fd_worker *w)
{
	struct io_uring_params p;
	struct io_uring_buf_reg reg;
	int r;

	memset(l, 0, sizeof(*l));
	l->w = w;
	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN |
		  IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
	r = io_uring_queue_init_params(RING_ENTRIES, &l->ring, &p);
	if (r == -EINVAL) {
		memset(&p, 0, sizeof(p));
		r = io_uring_queue_init_params(RING_ENTRIES, &l->ring, &p);
	}
	if (r < 0) {
		fd_log(FD_LOG_ERR, "sock", "worker=%u event=io_uring_failed "
		       "error=\"%s\"", w->id, strerror(-r));
		return r;
	}

	/* Receive buffers: enough for every connection to hold one while
	 * the rest keep flowing, a power of two as the ring requires. */
	l->nbufs = 256;
	while (l->nbufs < w->cfg->max_connections + 64 && l->nbufs < 32768)
		l->nbufs <<= 1;
	l->br_bytes = l->nbufs * sizeof(struct io_uring_buf);
	l->br = mmap(NULL, l->br_bytes, PROT_READ | PROT_WRITE,
		     MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
	l->bufs = mmap(NULL, (size_t)l->nbufs * BUF_SIZE,
		       PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE,
		       -1, 0);
	if (l->br == MAP_FAILED || l->bufs == MAP_FAILED) {
		r = -ENOMEM;
		goto out_unmap;
	}
	memset(&reg, 0, sizeof(reg));
	reg.ring_addr = (unsigned long)l->br;
	reg.ring_entries = l->nbufs;
	reg.bgid = BUF_GROUP;
	r = io_uring_register_buf_ring(&l->ring, &reg, 0);
	if (r < 0) {
		fd_log(FD_LOG_ERR, "sock", "worker=%u event=buf_ring_failed "
		       "error=\"%s\"", w->id, strerror(-r));
		goto out_unmap;
	}
	io_uring_buf_ring_init(l->br);
	for (unsigned i = 0; i < l->nbufs; i++)
		io_uring_buf_ring_add(l->br, l->bufs + (size_t)i * BUF_SIZE,
				      BUF_SIZE, (unsigned short)i,
				      io_uring_buf_ring_mask(l->nbufs),
				      (int)i);
	io_uring_buf_ring_advance(l->br, (int)l->nbufs);

	l->nconns = w->cfg->max_connections;
	l->conns = aligned_alloc(64, sizeof(*l->conns) * l->nconns);
	if (!l->conns) {
		r = -ENOMEM;
		goto out_unmap;
	}
	memset(l->conns, 0, sizeof(*l->conns) * l->nconns);
	for (unsigned i = l->nconns; i-- > 0;) {
		l->conns[i].fd = -1;
		l->conns[i].free_next = l->free;
		l->free = &l->conns[i];
	}
	return 0;

out_unmap:
	if (l->br != MAP_FAILED && l->br)
		munmap(l->br, l->br_bytes);
	if (l->bufs != MAP_FAILED && l->bufs)
		munmap(l->bufs, (size_t)l->nbufs * BUF_SIZE);
	io_uring_queue_exit(&l->ring);
	return r;
}

static void
loop_fini(struct sock_loop *l)
{
	for (unsigned i = 0; i < l->nlisteners; i++)
		close(l->listeners[i].fd);
	for (unsigned i = 0; i < l->nconns; i++)
		if (l->conns[i].in_use && l->conns[i].fd >= 0)
			close(l->conns[i].fd);
	free(l->conns);
	io_uring_queue_exit(&l->ring);
	munmap(l->br, l->br_bytes);
	munmap(l->bufs, (size_t)l->nbufs * BUF_SIZE);
}

/* The shutdown's force point: nobody waits past it for the spool. */
static void
force_stop(struct sock_loop *l)
{
	unsigned n = 0;

	l->stop_forced = true;
	for (unsigned i = 0; i < l->nconns; i++) {
		struct sock_conn *c = &l->conns[i];
		if (c->in_use && !c->closing && c->s) {
			smtp_session_shutdown_now(c->s);
			mark_dirty(c);
			n++;
		}
	}
	if (n)
		fd_log(FD_LOG_WARN, "sock",
		       "worker=%u event=stop_forced sessions=%u inflight=%u",
		       l->w->id, n, spool_inflight(l->w->spool));
}

static bool
loop_done(struct sock_loop *l)
{
	if (!l->stopping)
		return false;
	if (l->in_use == 0 && spool_inflight(l->w->spool) == 0)
		return true;
	return l->now_us >= l->stop_deadline_us;
}

int
sock_worker_run(struct fd_worker *w)
{
	struct sock_loop *l = aligned_alloc(64, sizeof(*l));
	int r;

	if (!l)
		return w->exit_status = -ENOMEM;
	if ((r = claim_ports(w->cfg)) < 0)
		goto out_free;
	if ((r = loop_init(l, w)) < 0)
		goto out_free;
	if ((r = fd_worker_start(w, &l->ring, wake_session)) < 0)
		goto out_fini;
	for (unsigned i = 0; i < w->cfg->n_listen; i++) {
		int fd = open_listener(&w->cfg->listen[i]);
		if (fd < 0) {
			r = fd;
			fd_log(FD_LOG_ERR, "sock",
			       "worker=%u event=listen_failed addr=%s "
			       "error=\"%s\"",
			       w->id, w->cfg->listen[i].text, strerror(-r));
			goto out_worker;
		}
		l->listeners[i] = (struct sock_listener){
			.loop = l, .fd = fd, .idx = i};
		l->nlisteners++;
		arm_accept(l, &l->listeners[i]);
	}
	arm_wake(l);
	arm_spool_wake(l);
	atomic_store(&w->ready, true);

	l->now_us = fd_now_monotonic_us();
	while (!loop_done(l)) {
		struct io_uring_cqe *cqe;
		struct __kernel_timespec ts = {.tv_sec = 0,
					       .tv_nsec = TICK_US * 1000};
		unsigned head, seen = 0;

		if (l->w->cfg->greet_delay_ms && l->w->cfg->greet_delay_ms < 100)
			ts.tv_nsec = (long long)l->w->cfg->greet_delay_ms *
				     250000; /* a quarter of the delay */
		r = io_uring_submit_and_wait_timeout(&l->ring, &cqe, 1, &ts,
						     NULL);
		if (r < 0 && r != -ETIME && r != -EINTR && r != -EBUSY) {
			fd_log(FD_LOG_ERR, "sock", "worker=%u event=wait_failed "
			       "error=\"%s\"", w->id, strerror(-r));
			break;
		}
		l->now_us = fd_now_monotonic_us();
		/* Handle everything ready; new CQEs may arrive while we do,
		 * and are taken in the same iteration. */
		do {
			seen = 0;
			io_uring_for_each_cqe(&l->ring, head, cqe)
			{
				on_cqe(l, cqe);
				seen++;
			}
			io_uring_cq_advance(&l->ring, seen);
			retry_held(l);
			service_dirty(l);
		} while (seen);
		run_timers(l);
		service_dirty(l);
		w->conns_current = l->in_use;
		fd_worker_poll(w);
		/* Idle: close the batch being filled (natural batching). */
		spool_flush(w->spool);
		/* A verdict the flush produced (a commit that could not get a
		 * segment) goes out now, not after the next wait. */
		if (l->dirty)
			service_dirty(l);
		if (atomic_load(&w->stop) && !l->stopping)
			begin_stop(l);
		if (l->stopping && !l->stop_forced &&
		    l->now_us >= l->stop_force_us) {
			force_stop(l);
			service_dirty(l);
		}
	}
	r = 0;
	if (l->in_use)
		fd_log(FD_LOG_WARN, "sock",
		       "worker=%u event=stop_timeout sessions=%u", w->id,
		       l->in_use);
	for (unsigned i = 0; i < l->nconns; i++)
		if (l->conns[i].in_use && !l->conns[i].closing)
			conn_close(&l->conns[i], "shutdown");
out_worker:
	/* Drain: every batch with a commit in it is written and completes,
	 * and its callbacks run; but not past the shutdown deadline (the
	 * sessions were answered 421: a write that never ends must not keep
	 * the daemon; spool_destroy() logs what was left). */
	while (w->spool && (spool_flush(w->spool), spool_inflight(w->spool))) {
		struct io_uring_cqe *cqe;
		struct __kernel_timespec ts = {.tv_nsec = TICK_US * 1000};
		unsigned head, seen = 0;
		if (l->stopping && fd_now_monotonic_us() >= l->stop_deadline_us)
			break;
		io_uring_submit_and_wait_timeout(&l->ring, &cqe, 1, &ts, NULL);
		io_uring_for_each_cqe(&l->ring, head, cqe)
		{
			if (spool_owns_cqe(cqe))
				spool_handle_cqe(w->spool, cqe);
			seen++;
		}
		io_uring_cq_advance(&l->ring, seen);
	}
	fd_worker_finish(w);
out_fini:
	loop_fini(l);
out_free:
	free(l);
	return w->exit_status = r;
}
