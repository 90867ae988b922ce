/*
 * TLS for the SMTP server side (RFC 3207 STARTTLS), written once for both
 * transports. It sits between the transport's octets and the SMTP engine:
 *
 *   transport --ciphertext--> fd_tls_conn_in()    --plaintext--> session
 *   transport <--ciphertext-- fd_tls_conn_out()   <--plaintext-- session
 *
 * OpenSSL runs over a BIO pair: two fixed buffers per connection, allocated
 * when TLS starts, so the transport never hands OpenSSL a socket and no
 * record costs an allocation of ours. The engine stays TLS-agnostic: it
 * only learns that TLS is up (smtp_session_tls_ready()).
 *
 * Threads. One struct fd_tls_server is shared by every worker (OpenSSL's
 * SSL_CTX is safe to share); a connection belongs to the worker that runs
 * it. The session-ticket keys are the server's, so a ticket issued by one
 * worker resumes on any other; they rotate (a ticket under the previous key
 * is still accepted and renewed). fd_tls_server_reload() re-reads the
 * certificate files for new connections; connections already running keep
 * what they started with.
 */
#ifndef FINALDOT_TLS_H
#define FINALDOT_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct smtp_session;
struct fd_tls_server;
struct fd_tls_conn;

#define FD_TLS_MAX_PAIRS 8

struct fd_tls_opts {
	const char *cert[FD_TLS_MAX_PAIRS]; /* PEM chain, leaf first */
	const char *key[FD_TLS_MAX_PAIRS];  /* PEM private key */
	unsigned npairs;
	const char *ciphers;  /* TLS 1.2 cipher list (OpenSSL syntax), or NULL */
	int min_version;      /* 0x0303 (TLS 1.2) or 0x0304 (TLS 1.3) */
	uint64_t ticket_lifetime_s; /* ticket key rotation period */
	uint64_t handshake_timeout_ms;
};

/* Defaults: TLS 1.2 minimum, keys rotated every 12 hours, a handshake has
 * 30 seconds. */
void fd_tls_opts_defaults(struct fd_tls_opts *o);

/*
 * Load every pair and check it: readable, the key matches the certificate,
 * the certificate is valid now (an expired or not-yet-valid certificate is
 * refused at start, with its dates, rather than discovered by clients).
 * Pairs whose leaf certificates have the same subject and different key
 * types (ECDSA and RSA) serve together, the client's offer choosing; pairs
 * with other names are chosen by SNI, the first pair being the default.
 * 0 or -1 with a message in err.
 */
int fd_tls_server_new(const struct fd_tls_opts *o, struct fd_tls_server **out,
		      char *err, size_t errlen);
/* Re-read the same files; on failure the old certificates stay. */
int fd_tls_server_reload(struct fd_tls_server *t, char *err, size_t errlen);
void fd_tls_server_free(struct fd_tls_server *t);
uint64_t fd_tls_server_handshake_timeout_ms(const struct fd_tls_server *t);

/* Counters, summed over every connection (atomics: any worker adds). */
struct fd_tls_stats {
	uint64_t handshakes;         /* completed */
	uint64_t resumed;            /* of which by ticket */
	uint64_t failed;             /* handshake failed or timed out */
};
void fd_tls_server_stats(const struct fd_tls_server *t,
			 struct fd_tls_stats *out);

/*
 * A connection's TLS, started after the 220 to STARTTLS went out in the
 * clear. wire_base: the octets the transport sent on this connection before
 * (so fd_tls_conn_wire_end() speaks in the TCP stream's offsets). sid: the
 * session id, for logs. NULL when memory is short.
 */
struct fd_tls_conn *fd_tls_conn_new(struct fd_tls_server *t, uint64_t sid,
				    uint64_t wire_base, uint64_t now_us);
void fd_tls_conn_free(struct fd_tls_conn *c);

/* Ciphertext received: how much was taken (less than n when the input
 * buffer is full: offer the rest after the next pump). */
size_t fd_tls_conn_in(struct fd_tls_conn *c, const uint8_t *p, size_t n);

enum fd_tls_status {
	FD_TLS_OK,     /* go on: send fd_tls_conn_out(), read more */
	FD_TLS_CLOSED, /* the peer sent close_notify */
	FD_TLS_FAILED, /* handshake failed or protocol error: close now */
};

/*
 * Do what can be done now: the handshake (tells the session when it is up),
 * decrypt and feed the session (plaintext it did not take is held here and
 * offered again by the next pump), encrypt the session's output. Call after
 * input arrived, after output was sent, and whenever the session may go on
 * (a commit verdict, spool room). now_us: CLOCK_MONOTONIC, for the
 * handshake deadline.
 */
enum fd_tls_status fd_tls_conn_pump(struct fd_tls_conn *c,
				    struct smtp_session *s, uint64_t now_us);

/* Ciphertext to send: *p valid until the next call on c. */
size_t fd_tls_conn_out(struct fd_tls_conn *c, const uint8_t **p);
void fd_tls_conn_out_done(struct fd_tls_conn *c, size_t n);

/* Queue close_notify (the session is done): send fd_tls_conn_out(). */
void fd_tls_conn_shutdown(struct fd_tls_conn *c);

bool fd_tls_conn_established(const struct fd_tls_conn *c);
/* Established by resuming a session (a ticket). */
bool fd_tls_conn_resumed(const struct fd_tls_conn *c);
/* Plaintext decrypted but not yet taken by the session. */
bool fd_tls_conn_holding(const struct fd_tls_conn *c);
/* While the handshake runs: when it must be done by (0 once it is). */
uint64_t fd_tls_conn_deadline_us(const struct fd_tls_conn *c);
/* Why the connection failed ("" if it did not). */
const char *fd_tls_conn_error(const struct fd_tls_conn *c);

/*
 * RFC 1047 under TLS. The engine's ack points are offsets in its plaintext
 * output; the client's TCP acknowledges ciphertext. The octet offset in the
 * TCP stream by which the plaintext up to plain_end had been sent (an upper
 * bound: compare it with the octets acknowledged).
 */
uint64_t fd_tls_conn_wire_end(const struct fd_tls_conn *c, uint64_t plain_end);

/* Octets of the TCP stream handed to the transport so far (the clear part
 * before TLS included). */
uint64_t fd_tls_conn_wire_sent(const struct fd_tls_conn *c);

/* Memory a connection holds besides OpenSSL's own objects (for the docs'
 * bytes-per-idle-session figure). */
size_t fd_tls_conn_buffer_bytes(void);

#endif
