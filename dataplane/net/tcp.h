/*
 * The TCP upper-layer interface: what the SMTP glue uses. Passive open only.
 *
 * Life of a connection as the upper layer sees it:
 *   accept(arg, conn, remote)  handshake complete (ESTABLISHED). Return the
 *                              upper context, or NULL to refuse (RST sent).
 *   recv(uctx, p, n)           in-order bytes (p points into the
 *                              connection's receive ring, valid only
 *                              during the call); returns how many it
 *                              consumed.
 *                              The rest STAYS in the connection's receive
 *                              buffer and the advertised window shrinks by
 *                              that much: nothing the window admitted is
 *                              dropped. recv is not called again for this
 *                              connection until tcp_resume().
 *   eof(uctx)                  the peer's FIN, after every byte before it
 *                              was consumed.
 *   sent(uctx, room)           send-buffer space was freed (ACKs): room
 *                              bytes can be queued now.
 *   closed(uctx, reason)       the stack ended the connection by itself
 *                              (RST received, retransmission or idle
 *                              timeout). Last call; conn is invalid after.
 * The upper layer ends a connection with tcp_close() (graceful FIN after the
 * queued bytes) or tcp_abort() (RST now). After either, no callback reaches
 * uctx any more and the conn pointer must not be used.
 *
 * Callbacks run on the shard's thread from inside net_stack_input() or
 * net_stack_poll_timers(). A callback may call tcp_send(), tcp_close(),
 * tcp_abort() and tcp_resume() on its own connection (accept() included:
 * e.g. send the greeting, or close after a 421; after tcp_close() or
 * tcp_abort() there its return value is ignored). A call to tcp_resume()
 * from inside recv() is ignored: return short and resume later.
 */
#ifndef FINALDOT_TCP_H
#define FINALDOT_TCP_H

#include <stddef.h>
#include <stdint.h>

struct tcp_conn;

/*
 * States (RFC 9293 3.3.2). No SYN_SENT: passive open only. LISTEN is the
 * listening port itself, never a connection entry's state.
 */
enum tcp_state {
	TCPS_CLOSED = 0,
	TCPS_LISTEN,
	TCPS_SYN_RECEIVED,
	TCPS_ESTABLISHED,
	TCPS_FIN_WAIT_1,
	TCPS_FIN_WAIT_2,
	TCPS_CLOSING,
	TCPS_TIME_WAIT,
	TCPS_CLOSE_WAIT,
	TCPS_LAST_ACK,
};

enum tcp_close_reason {
	TCP_CLOSE_RESET = 1,   /* peer sent an acceptable RST */
	TCP_CLOSE_TIMEOUT,     /* retransmissions exhausted */
	TCP_CLOSE_IDLE,        /* nothing received for cfg.idle_ms */
	TCP_CLOSE_DONE,        /* both FINs exchanged (LAST_ACK completed) */
};

struct tcp_endpoint {
	uint32_t addr; /* host order */
	uint16_t port;
};

struct tcp_upcall_ops {
	void *(*accept)(void *arg, struct tcp_conn *c,
			const struct tcp_endpoint *remote, uint16_t local_port);
	size_t (*recv)(void *uctx, const uint8_t *p, size_t n);
	void (*eof)(void *uctx);
	void (*sent)(void *uctx, size_t room);
	/* unacked: octets the upper layer gave tcp_send() that the peer had
	 * not acknowledged when the connection ended (RFC 1047: a reply in
	 * them may never have been read). */
	void (*closed)(void *uctx, enum tcp_close_reason reason,
		       size_t unacked);
};

const char *tcp_state_name(enum tcp_state s);

/* Copy up to n bytes into the send buffer and transmit what the windows
 * allow. Returns the bytes taken (0: buffer full, or no send buffer free in
 * the shard: sent() is called when there is room). */
size_t tcp_send(struct tcp_conn *c, const void *p, size_t n);
/* Free bytes in the send buffer now. */
size_t tcp_send_room(const struct tcp_conn *c);
/* Graceful close: FIN after the queued bytes. Detaches the upper layer. */
void tcp_close(struct tcp_conn *c);
/* RST now, connection freed. Detaches the upper layer. */
void tcp_abort(struct tcp_conn *c);
/* The upper layer can consume again: re-offer the held bytes (from inside
 * this call) and reopen the window. */
void tcp_resume(struct tcp_conn *c);

enum tcp_state tcp_conn_state(const struct tcp_conn *c);
/* Bytes received, held, not yet consumed by the upper layer. */
size_t tcp_conn_rcv_held(const struct tcp_conn *c);
/* Bytes queued and not yet acknowledged by the peer. */
size_t tcp_conn_snd_queued(const struct tcp_conn *c);

#endif
