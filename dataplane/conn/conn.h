/*
 * The connection layer: what a transport does with an SMTP session once it
 * has a byte stream, written once for both transports (sock/ over the
 * kernel's TCP, dpdk/ over finaldot's own). Pure C: no liburing, no DPDK.
 *
 *   transport --octets--> conn_input()  --> session, or TLS after STARTTLS
 *   transport <--ops->send()--  output drain  <-- session, or TLS
 *
 * What lives here: session open and close (with the busy and paused
 * refusals), offering input (the rest the session did not take stays with
 * the transport: "held", offered again through ops->resume()), draining
 * output, the STARTTLS switch and the TLS handshake cap, the greeting
 * delay, the idle timeout and the handshake deadline (one timer mechanism:
 * lists ordered by due time, O(due) per tick), the sessions woken by a
 * commit verdict or by spool room, RFC 1047's in-doubt check, and the
 * bounded shutdown.
 *
 * What stays with the transport: its sockets or TCP stack, its buffers,
 * accepting, and its loop. The transport embeds a struct conn in each of
 * its connection slots, gives the layer a struct conn_ops, and calls:
 *
 *   conn_open()        a connection arrived (may refuse it: a reply to send)
 *   conn_input()       octets arrived, or held ones offered again
 *   conn_eof()         the peer closed its side
 *   conn_writable()    a synchronous transport has room to send again
 *   conn_send_done()   an asynchronous send completed
 *   conn_set_tick()    with the clock (conn_set_clock()) every loop round
 *   conn_set_room()    the spool made progress: room may have come free
 *   conn_set_service() connections the layer marked (woken, timers) move
 *
 * Re-entrancy. The layer calls ops->resume() only from conn_set_service(),
 * conn_writable() and conn_send_done(), never from inside conn_input(): a
 * transport may call conn_input() from inside resume(). ops->close() is
 * the last call the layer makes about a connection; the transport may
 * reuse the slot once it has called conn_release().
 */
#ifndef FINALDOT_CONN_H
#define FINALDOT_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct conn;
struct conn_set;
struct fd_policy;
struct fd_tls_conn;
struct fd_worker;
struct smtp_session;

/* A link in one of the layer's lists; on a timer list, due_us orders it. */
struct conn_node {
	struct conn_node *prev, *next;
	uint64_t due_us;
	bool linked;
};

struct conn_list {
	struct conn_node *head, *tail;
};

enum conn_close_how {
	CONN_CLOSE_FIN,   /* after the output already handed over */
	CONN_CLOSE_ABORT, /* now: a send failed, or the shutdown deadline */
	CONN_CLOSE_GONE,  /* the transport's connection already ended */
};

/* ops->send(): an asynchronous send of all n octets is under way. */
#define CONN_SEND_ARMED SIZE_MAX

struct conn_ops {
	/*
	 * Hand n octets at p to the network. A transport that copies them
	 * returns how many it took now (0..n; short: it calls
	 * conn_writable() once it has room). One that sends asynchronously
	 * returns CONN_SEND_ARMED: p stays valid and unchanged until it
	 * reports the result with conn_send_done(), and the layer keeps one
	 * such send in flight. final: nothing will wait for these octets
	 * (the TLS alert before a close): take what fits now, synchronously.
	 */
	size_t (*send)(struct conn *c, const uint8_t *p, size_t n, bool final);
	/* Offer the held input again by calling conn_input() from inside
	 * (or later, when the transport cannot now). */
	void (*resume)(struct conn *c);
	/* Optional: put what send() took so far on the wire now, before the
	 * layer offers the sessions their held input (conn_set_service()).
	 * NULL: the transport sends at its own time. */
	void (*push)(struct conn_set *cs);
	/* RFC 1047: octets of this connection's stream the peer's TCP
	 * acknowledged. sent: octets handed over (send()) so far. 0, or
	 * -errno when the transport cannot tell (no check then). */
	int (*acked)(struct conn *c, uint64_t sent, uint64_t *acked);
	/* The session has ended: close the connection as told. The layer's
	 * last call about c; the transport calls conn_release() once no
	 * send of its own points into c's buffers any more. why: for logs. */
	void (*close)(struct conn *c, enum conn_close_how how, const char *why);
};

/* Per connection, embedded in the transport's slot. Private to conn.c. */
struct conn {
	struct conn_set *cs;
	struct smtp_session *s;  /* NULL once closed */
	struct fd_tls_conn *tls; /* after STARTTLS; freed by conn_release() */
	bool open;
	bool held;        /* the transport holds input the session has not
			   * taken (offered again with ops->resume()) */
	bool peer_eof;
	bool send_busy;   /* an asynchronous send in flight */
	bool resuming;    /* inside ops->resume() */
	bool hs_running;  /* counted in cs->handshakes */
	bool hs_waiting;  /* on cs->hswait, for a handshake slot */
	bool tls_closing; /* close_notify queued */
	bool driven;      /* conn_set_service(): its replies went out in the
			   * first pass, its held input waits for the second */
	struct conn_node n_open, n_dirty, n_blocked, n_hswait;
	struct conn_node t_idle, t_greet, t_hs;
};

/* Per worker, embedded in the transport's loop. Private to conn.c but
 * for the accessors below. */
struct conn_set {
	struct fd_worker *w;
	const struct conn_ops *ops;
	uint64_t now_us;      /* CLOCK_MONOTONIC, set by the transport */
	uint64_t sid_next;
	unsigned nopen;       /* sessions open */
	unsigned handshakes;  /* TLS handshakes running */
	struct conn_list open;    /* every open connection */
	struct conn_list dirty;   /* to service */
	struct conn_list blocked; /* input held: waits for room or a verdict */
	struct conn_list hswait;  /* for a handshake slot, oldest first */
	struct conn_list idle, greet, hsdl; /* timers, earliest first */
	/* The idle timeout and greeting delay now: the start configuration's,
	 * then a reload's (policy_seen: the worker's policy they came from). */
	uint64_t idle_ms, greet_ms;
	const struct fd_policy *policy_seen;
	bool stopping, stop_forced;
	uint64_t stop_force_us;    /* shutdown: 421 to whoever still waits */
	uint64_t stop_deadline_us; /* shutdown: close everything */
};

/*
 * w: the worker (its configuration, SMTP server, spool and counters; the
 * sessions' wake callback given to fd_worker_start() is conn_wake). ops:
 * the transport's, kept.
 */
void conn_set_init(struct conn_set *cs, struct fd_worker *w,
		   const struct conn_ops *ops, uint64_t now_us);

static inline void
conn_set_clock(struct conn_set *cs, uint64_t now_us)
{
	cs->now_us = now_us;
}

/*
 * A connection arrived; addr: the client's, as text. c: a free slot, or
 * NULL when the transport has none. 0: the session is open on c (its
 * greeting goes out at the next conn_set_service(), or after the
 * greeting delay). Otherwise the connection is refused and counted, and c
 * stays free: -EAGAIN (the listener is paused: 421 4.3.2) or -EBUSY (no
 * slot, no session, or stopping: 421 4.7.0), *reply and *len the reply
 * to send it, best effort, before closing it.
 */
int conn_open(struct conn_set *cs, struct conn *c, const char *addr,
	      const char **reply, size_t *len);

/*
 * Octets from the peer (p valid during the call). Returns how many were
 * taken; the transport holds the rest and is asked for them again
 * (ops->resume()). A connection closed meanwhile takes everything.
 */
size_t conn_input(struct conn *c, const uint8_t *p, size_t n);
/* The peer closed its side, after the last octet was taken. */
void conn_eof(struct conn *c);
/* A synchronous transport has room again after a short send(). */
void conn_writable(struct conn *c);
/* An asynchronous send completed: res octets sent, 0, or -errno. Also on
 * a closed connection (it only notes that nothing is in flight). */
void conn_send_done(struct conn *c, int res);
/* End the session now (a transport error). */
void conn_close(struct conn *c, const char *why, enum conn_close_how how);
/* The transport is done with c's buffers: TLS memory goes. */
void conn_release(struct conn *c);
bool conn_is_open(const struct conn *c);
/* TLS: true once STARTTLS switched the stream (tests, metrics). */
bool conn_tls_started(const struct conn *c);

/* fd_worker_wake_fn: the spool's verdict reached the session of tctx (a
 * struct conn): it is serviced at the next conn_set_service(). */
void conn_wake(void *tctx);

/* The spool made progress (a completion, a spare segment ready): the
 * connections whose input waits for room are serviced again. */
void conn_set_room(struct conn_set *cs);
/* Timers due by cs->now_us fire, in due order (idle timeout, greeting,
 * handshake deadline); the shutdown's force point; then a service. */
void conn_set_tick(struct conn_set *cs);
/* Service every connection marked since the last call. */
void conn_set_service(struct conn_set *cs);
bool conn_set_pending(const struct conn_set *cs);

/*
 * Shutdown, bounded by shutdown_timeout whatever the disk does. Until the
 * force point sessions end on their own (a commit in flight gets its
 * verdict, then 421 4.3.2); at the force point (a quarter of the timeout,
 * at most 1 s, before the deadline) each session still open is answered
 * 421 4.3.2 at once, a commit in flight included; at the deadline the
 * transport closes whatever is left (conn_set_close_all()).
 */
void conn_set_begin_stop(struct conn_set *cs);
bool conn_set_stopping(const struct conn_set *cs);
/* Stopping and either every session, the transport's own connections
 * (transport_idle) and the spool are done, or the deadline passed. */
bool conn_set_done(const struct conn_set *cs, bool transport_idle);
bool conn_set_past_deadline(const struct conn_set *cs);
/* Close every session still open (CONN_CLOSE_ABORT), logged. */
void conn_set_close_all(struct conn_set *cs);
unsigned conn_set_open_count(const struct conn_set *cs);

#endif
