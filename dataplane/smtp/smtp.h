/*
 * The SMTP server engine: RFC 5321 with PIPELINING (2920), SIZE (1870),
 * 8BITMIME (6152), ENHANCEDSTATUSCODES (2034, 3463), SMTPUTF8 (6531),
 * CHUNKING (3030), DSN (3461: its parameters are taken and handed to the
 * spool in the envelope; the reports are the control plane's) and STARTTLS
 * (3207: the engine speaks the command and resets the session; the
 * transport runs the handshake and the records, see smtp_session_tls_*).
 * Pure C: no DPDK, no liburing, no sockets, no threads, no OpenSSL.
 *
 * Two boundaries, so the engine is built and tested alone:
 *
 *  - Transport -> engine. A transport (kernel sockets, or the DPDK TCP stack)
 *    owns the connection. It feeds received bytes with smtp_session_input(),
 *    in pieces of any size split anywhere, and pulls the bytes to send with
 *    smtp_session_output() / smtp_session_output_done(). The engine never
 *    knows which transport it is on and never blocks.
 *
 *  - Engine -> spool. Through struct smtp_sink_ops (below). The engine opens
 *    a message when DATA (or the first BDAT) starts, appends the Received
 *    header and the dot-unstuffed body, then commits. The spool later calls
 *    smtp_session_commit_done() exactly once per commit; that function is the
 *    only place that produces the 250 reply to the final dot / BDAT LAST
 *    (one place to check that no 250 precedes a durable write).
 *
 * Flow control. smtp_session_input() returns how many bytes it consumed. It
 * consumes everything it is given except when it cannot go on:
 *   - a commit is in flight (replies must stay in order, RFC 2920), or
 *   - the spool has no room for what is being appended (sink room() says so),
 *   - the output buffer lacks room for another reply (the peer is not
 *     reading), or
 *   - the session is closing.
 * The transport keeps the unconsumed bytes and offers them again later: after
 * the spool's completions were harvested and after output was drained. A
 * partial command line at the end of the input IS consumed (the engine keeps
 * it in its own line buffer), so the transport never has to hold one.
 *
 * Memory. smtp_server_create() allocates every session up front
 * (max_sessions); smtp_session_open() takes one from that pool and returns
 * NULL when it is empty. No allocation afterwards.
 */
#ifndef FINALDOT_SMTP_H
#define FINALDOT_SMTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "finaldot/envelope.h"
#include "finaldot/lathist.h"

struct smtp_server;
struct smtp_session;

/*
 * The spool as the engine sees it. Every function is called on the worker
 * thread that owns the session; none may block.
 *
 * begin: open a message for this envelope. Returns an opaque handle and the
 *   message id, or NULL with *err = -EAGAIN (no room right now: the DATA or
 *   BDAT command is held and retried when input is offered again, like any
 *   other pause), -ENOSPC (spool full: 452 4.3.1) or another -errno
 *   (451 4.3.0). sctx is handed back in the completion.
 * append: copy n bytes into the message. Never partial: the engine asks
 *   room() first and only appends what room() allowed. 0 or -errno (the
 *   message is then failed: the engine aborts it and answers 451 4.3.0 at the
 *   end of its data).
 * commit: the message is complete; the sink will call
 *   smtp_session_commit_done(sctx, status) exactly once, later (never from
 *   inside commit()).
 * abort: forget an uncommitted message (RSET, bad data, connection lost).
 * detach: the session is going away while a commit is in flight: the
 *   message stays committed (or not) but no callback may reach sctx.
 * room: how many body bytes append() would take right now.
 */
struct smtp_sink_ops {
	void *(*begin)(void *sink, const struct fd_envelope *env, void *sctx,
		       uint64_t *msgid, int *err);
	int (*append)(void *sink, void *msg, const void *p, size_t n);
	int (*commit)(void *sink, void *msg);
	void (*abort)(void *sink, void *msg);
	void (*detach)(void *sink, void *msg);
	size_t (*room)(void *sink);
	/* room() is 0 for good (the disk is full), or NULL: the message then
	 * fails with 452 4.3.1, its octets read and dropped */
	bool (*full)(void *sink);
};

struct smtp_config {
	const char *hostname;        /* ours: greeting, EHLO, Received */
	const char *const *domains;  /* accepted recipient domains */
	unsigned n_domains;
	uint64_t max_message_size;   /* octets; SIZE advertised; 552 5.3.4 */
	unsigned max_recipients;     /* per message; 452 4.5.3 beyond */
	unsigned max_errors;         /* bad commands before 421 4.7.0 + close */
	unsigned max_sessions;       /* pool size */
	bool greet_delay;            /* transport calls smtp_session_greet()
				      * later; input before it = early talker */
	/* Clock for the Received date and arrival_us (CLOCK_REALTIME, us).
	 * NULL: the real clock. Tests set a fixed one. */
	uint64_t (*now_us)(void);
	/*
	 * Recipient check, or NULL to accept every local part of an accepted
	 * domain. Called on the worker thread (it must not block) for each
	 * RCPT that passed the relay check, except postmaster (bare or at an
	 * accepted domain: RFC 5321 4.5.1), with the mailbox as given
	 * ("local@domain", valid during the call). Returns 1: valid; 0:
	 * unknown (550 5.1.1, counted in rcpt_unknown and toward max_errors);
	 * negative: cannot tell now (450 4.1.1).
	 */
	int (*rcpt_check)(void *ctx, const char *addr);
	void *rcpt_ctx;
	/*
	 * Deadlines (RFC 5321 4.5.3.2; issue 10: a client sending a byte a
	 * second kept its slot forever, each byte resetting the transport's
	 * idle timer). command_timeout_ms: from the first octet of a command
	 * line to its LF. data_timeout_ms: from the 354 (or the first BDAT)
	 * to the end of the message's data. Checked whenever input arrives
	 * (silence is the transport's idle timeout); exceeded: 421 4.4.2 and
	 * close. 0: no limit. mono_us: the clock (CLOCK_MONOTONIC us); NULL
	 * is the real one (tests set their own).
	 */
	uint64_t command_timeout_ms;
	uint64_t data_timeout_ms;
	uint64_t (*mono_us)(void);
	/*
	 * STARTTLS (RFC 3207). starttls: the transport can run TLS (a
	 * certificate is configured): advertise it before TLS, accept the
	 * command. tls_required: MAIL before STARTTLS gets 530 5.7.0 (off by
	 * default: RFC 3207 4 advises a public MX not to require it).
	 */
	bool starttls;
	bool tls_required;
};

/* Defaults used by the daemon: 32 MiB, 100 recipients, 20 errors,
 * 5 minutes per command line, 10 minutes per message's data. */
void smtp_config_defaults(struct smtp_config *cfg);

#define SMTP_GAP_BUCKETS FD_QLAT_BUCKETS
#define SMTP_GAP_STAGE 256 /* staged samples; more are recorded at once */

/* Counters, per server (per worker thread). Plain integers: one writer. */
struct smtp_stats {
	uint64_t sessions;
	uint64_t messages_committed; /* 250 sent after the spool said ok */
	uint64_t messages_failed;    /* 451/452 after the spool said no */
	uint64_t messages_rejected;  /* 5xx at end of data (size, bare LF..) */
	uint64_t commands;
	uint64_t syntax_errors;
	uint64_t relay_denied;
	uint64_t rcpt_unknown; /* 550 5.1.1 from cfg.rcpt_check */
	uint64_t early_talkers;
	uint64_t timeouts; /* idle, command and data deadlines */
	uint64_t tls_started;     /* STARTTLS accepted (220 sent) */
	uint64_t tls_established; /* handshakes completed */
	uint64_t tls_injected;    /* sessions that pipelined after STARTTLS */
	uint64_t tls_required_refused; /* 530 5.7.0: MAIL before STARTTLS */
	/* RFC 1047's gap as we can shorten it: from the durable write's
	 * completion (smtp_session_commit_done) to the 250's last octet
	 * handed to the transport (smtp_session_output_done), or, staged
	 * (smtp_server_gap_staged()), to the transport's word that it is on
	 * the wire; in quarter-octave buckets of microseconds. */
	uint64_t gap_hist[SMTP_GAP_BUCKETS];
};

/* gap_hist is a finaldot/lathist.h quarter-octave histogram: bucket b
 * holds values up to fd_qlat_upper_us(b); fd_qlat_percentile_us() reads
 * a percentile from it. */

/*
 * A reload: new policy for the commands that come from now on, on the
 * server's own thread: accepted domains (referenced: keep them alive),
 * message size, recipients per message (at most what the server was
 * created with: its slots are allocated then; more is capped), errors
 * before 421, the command and data deadlines, and whether sessions opened
 * from now on wait for smtp_session_greet() (greet_delay). Sessions keep
 * their state.
 */
void smtp_server_set_policy(struct smtp_server *srv,
			    const char *const *domains, unsigned n_domains,
			    uint64_t max_message_size, unsigned max_recipients,
			    unsigned max_errors, uint64_t command_timeout_ms,
			    uint64_t data_timeout_ms, bool greet_delay);

/*
 * Where the gap ends. Off (the default): when the transport takes the
 * 250's last octet (kernel sockets: the send completed, the kernel has
 * it). On: the sample waits until the transport calls
 * smtp_server_gap_settle() after the octets left (DPDK: after the tx burst
 * that carried them), so the gap includes whatever the loop did between
 * taking the reply and sending the frame.
 */
void smtp_server_gap_staged(struct smtp_server *srv, bool on);
void smtp_server_gap_settle(struct smtp_server *srv);

/* Copies cfg (strings are referenced, not copied: keep them alive). */
struct smtp_server *smtp_server_create(const struct smtp_config *cfg,
				       const struct smtp_sink_ops *ops,
				       void *sink);
void smtp_server_destroy(struct smtp_server *srv);
const struct smtp_stats *smtp_server_stats(const struct smtp_server *srv);

/*
 * Take a session from the pool for a new connection. tctx is the transport's
 * (smtp_session_tctx() gives it back); client_addr is copied (text, no
 * port); sid is the session id used in logs. Queues the 220 greeting unless
 * cfg.greet_delay is set. NULL when the pool is empty: the transport then
 * sends smtp_busy_reply() and closes.
 */
struct smtp_session *smtp_session_open(struct smtp_server *srv, void *tctx,
				       const char *client_addr, uint64_t sid);
/* "421 4.7.0 <host> Too many connections, try again later\r\n" */
const char *smtp_busy_reply(const struct smtp_server *srv, size_t *len);

/*
 * Connection gone (or transport done with it). Aborts an uncommitted message,
 * detaches a commit in flight, returns the session to the pool. The session
 * pointer is invalid afterwards.
 */
void smtp_session_close(struct smtp_session *s);

void *smtp_session_tctx(const struct smtp_session *s);
uint64_t smtp_session_id(const struct smtp_session *s);

/* Feed received bytes; returns how many were consumed (see flow control). */
size_t smtp_session_input(struct smtp_session *s, const uint8_t *p, size_t n);

/*
 * Bytes waiting to be sent: *p points into the session's output buffer,
 * valid until the next call into this session. Returns the count (0: none).
 * smtp_session_output_done() says n of them were sent (n <= count).
 */
size_t smtp_session_output(struct smtp_session *s, const uint8_t **p);
void smtp_session_output_done(struct smtp_session *s, size_t n);

/* Greeting delay elapsed (cfg.greet_delay): queue the 220. */
void smtp_session_greet(struct smtp_session *s);
/* Idle timeout fired: queue 421 4.4.2 and close once output is drained. */
void smtp_session_timeout(struct smtp_session *s);
/*
 * The daemon is stopping: queue 421 4.3.2 and close. A commit in flight is
 * let finish first (its 250 or 451 goes out before the 421).
 */
void smtp_session_shutdown(struct smtp_session *s);
/*
 * The shutdown deadline: the daemon will not wait any longer. A session
 * whose commit is still in flight gets 421 4.3.2 now instead of its verdict
 * (the message is detached: it may still become durable, so the client's
 * retry may make a duplicate, which RFC 1047 allows; nothing acknowledged
 * is lost). Any other session: as smtp_session_shutdown(). The transport
 * closes once the output is drained.
 */
void smtp_session_shutdown_now(struct smtp_session *s);

/*
 * The spool's verdict on the message committed by this session: status 0 =
 * durable, -ENOSPC = 452 4.3.1, other -errno = 451 4.3.0. Called by the
 * sink's owner from its completion path, never from inside the engine.
 */
void smtp_session_commit_done(struct smtp_session *s, uint64_t msgid,
			      int status);

/*
 * RFC 1047's gap. Between the durable write and the client reading the
 * 250 both sides hold the message; if the connection ends in that gap the
 * client will send it again. The engine remembers its recent 250 replies
 * to a final dot / BDAT LAST (at most SMTP_ACKPOINTS, oldest first): the
 * message id, and the offset just past the reply in the session's output
 * stream (octets handed out through smtp_session_output_done() since the
 * session began, plus what is queued). When the session ends, the
 * transport compares each end with the octets the client's TCP
 * acknowledged: a reply not wholly acknowledged is in doubt.
 */
#define SMTP_ACKPOINTS 8
struct smtp_ackpoint {
	uint64_t msgid;
	uint64_t end;
};
unsigned smtp_session_ackpoints(const struct smtp_session *s,
				struct smtp_ackpoint *out);
/* Octets the transport has been given so far (smtp_session_output_done). */
uint64_t smtp_session_output_total(const struct smtp_session *s);
/* The client said QUIT (it read its replies before: no doubt then). */
bool smtp_session_quit_seen(const struct smtp_session *s);

/*
 * STARTTLS. After the 220 to STARTTLS the session waits for TLS: it discards
 * every octet it is offered (plaintext the client pipelined behind the
 * command must never be read as commands inside TLS: CVE-2011-0411), and
 * smtp_session_tls_wanted() is true. The transport sends the pending output
 * (the 220) in the clear, then feeds only what TLS decrypts. When the
 * handshake is done it calls smtp_session_tls_ready() with a description
 * for the Received header ("TLSv1.3 with cipher NAME (256/256 bits)"; it is
 * copied, capped and reduced to printable ASCII): the session is back where
 * it was after the greeting, needs a new EHLO, and says ESMTPS. A failed
 * handshake: the transport closes the connection.
 */
bool smtp_session_tls_wanted(const struct smtp_session *s);
void smtp_session_tls_ready(struct smtp_session *s, const char *desc);
bool smtp_session_tls_active(const struct smtp_session *s);

/* The transport should close once output is drained and this is true. */
bool smtp_session_want_close(const struct smtp_session *s);
/* A commit is in flight: input is paused until commit_done. */
bool smtp_session_commit_pending(const struct smtp_session *s);

#endif
