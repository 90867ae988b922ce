/*
 * The SMTP (RFC 5321) / LMTP (RFC 2033) delivery client: hands one queued
 * message at a time to a next hop over one connection.
 *
 * Blocking, for one delivery thread: a struct smtpc is used by one thread at
 * a time and the module has no global state, so threads each own theirs.
 * Every socket operation is bounded by a timeout; nothing waits forever,
 * except name resolution (getaddrinfo has no timeout: use literals or a
 * local resolver when that matters).
 *
 * Memory: one allocation per connection (about 140 KiB: an 8 KiB reply
 * buffer and two 64 KiB body buffers); bodies are streamed, never held whole.
 * Nothing is logged above debug level: the caller logs outcomes.
 *
 * Replies (struct smtpc_reply) are written by the calls below into storage
 * the caller owns; no pointer into a struct smtpc outlives it.
 */
#ifndef FINALDOT_CONTROL_SMTPC_H
#define FINALDOT_CONTROL_SMTPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum smtpc_proto { SMTPC_SMTP = 0, SMTPC_LMTP = 1 };

struct smtpc_target {
	enum smtpc_proto proto;
	/* IPv4/IPv6 literal ("[::1]" accepted) or a name (getaddrinfo, every
	 * address tried in order); empty when unix_path is set */
	char host[256];
	uint16_t port; /* 0: 25 for SMTP; required for LMTP over TCP */
	char unix_path[108]; /* a unix socket when non-empty (LMTP usually) */
};

/*
 * STARTTLS to the next hop (RFC 3207), after the EHLO exchange:
 *  NONE     never
 *  MAY      when offered, any certificate; in the clear when not offered or
 *           refused; a failed handshake makes smtpc_connect() connect once
 *           more and go on in the clear (opportunistic TLS, RFC 7435)
 *  ENCRYPT  required (else -EPROTO, a local 4.7.10 reply), any certificate
 *  VERIFY   required, and the certificate chains to tls_ctx's CA store and
 *           names the target host (SNI is sent for names)
 */
enum smtpc_tls {
	SMTPC_TLS_NONE = 0,
	SMTPC_TLS_MAY,
	SMTPC_TLS_ENCRYPT,
	SMTPC_TLS_VERIFY,
};

/* A client TLS context (OpenSSL SSL_CTX) with the CA store for VERIFY:
 * ca_file, or the system store when NULL or "". Shared by any number of
 * threads; made once per CA file. NULL with a reason in err. */
void *smtpc_tls_ctx_new(const char *ca_file, char *err, size_t errlen);
void smtpc_tls_ctx_free(void *ctx);

/* A timeout of 0 means its default. */
struct smtpc_params {
	const char *helo_name;       /* our name for EHLO/LHLO; copied */
	uint64_t connect_timeout_ms; /* per address tried; default 30 s */
	/* the greeting and each reply to a command (RFC 5321 4.5.3.2: 5
	 * minutes), and each write of at most 64 KiB of commands or body */
	uint64_t cmd_timeout_ms;
	/* the reply (LMTP: each reply) after the final dot / BDAT LAST:
	 * 10 minutes (RFC 5321 4.5.3.2.6) */
	uint64_t data_timeout_ms;
	enum smtpc_tls tls; /* with tls_ctx; NONE when tls_ctx is NULL */
	void *tls_ctx;      /* smtpc_tls_ctx_new() */
};

void smtpc_params_defaults(struct smtpc_params *p);

#define SMTPC_TEXT_MAX 512

struct smtpc_reply {
	int code;    /* 200..599, or 0 if none was received */
	char enh[16]; /* "5.1.1" if the reply had an RFC 3463 code, else "" */
	/* the reply as one printable ASCII line for logs and DSNs:
	 * "550 5.1.1 <u@x> unknown". Lines of a multi-line reply are joined
	 * with ' ' (a continuation line's repeated enhanced code dropped);
	 * control and non-ASCII octets become '?'; cut with "..." when over
	 * SMTPC_TEXT_MAX - 1 octets. Always NUL-terminated. */
	char text[SMTPC_TEXT_MAX];
	bool local; /* synthesized by us (timeout, connection lost, ...) */
};

/* EHLO/LHLO keywords the peer advertised (case-insensitive). */
enum smtpc_ext {
	SMTPC_EXT_PIPELINING = 1,
	SMTPC_EXT_SIZE = 2,
	SMTPC_EXT_8BITMIME = 4,
	SMTPC_EXT_SMTPUTF8 = 8,
	SMTPC_EXT_CHUNKING = 16,
	SMTPC_EXT_DSN = 32,
	SMTPC_EXT_STARTTLS = 64,
	SMTPC_EXT_ENHANCEDSTATUSCODES = 128,
	SMTPC_EXT_BINARYMIME = 256,
};

struct smtpc;

/*
 * Connect, read the greeting, EHLO (LHLO for LMTP; SMTP falls back to HELO,
 * with no extensions, when EHLO gets a 5xx). NULL on failure with
 * *err = -errno and *why = the peer's reply, or a local one (local = true):
 *   -ETIMEDOUT     connect, greeting or EHLO reply not in time
 *   -ECONNREFUSED  (and other connect errors) no address accepted
 *   -EHOSTUNREACH  the name did not resolve
 *   -ECONNRESET    peer closed before the EHLO exchange ended
 *   -EPROTO        a non-2xx greeting or EHLO/HELO/LHLO reply, or garbage
 *   -EINVAL        bad target or helo_name (control octet, too long)
 * p may be NULL (defaults, helo_name "localhost"). why and err may be NULL.
 */
struct smtpc *smtpc_connect(const struct smtpc_target *t,
			    const struct smtpc_params *p,
			    struct smtpc_reply *why, int *err);

/* As smtpc_connect() on a socket already connected to the peer (tests,
 * fuzzing, a socket made elsewhere). Consumes fd: it is closed on failure. */
struct smtpc *smtpc_connect_fd(int fd, enum smtpc_proto proto,
			       const struct smtpc_params *p,
			       struct smtpc_reply *why, int *err);

unsigned smtpc_exts(const struct smtpc *c);      /* enum smtpc_ext bits */
/* "TLSv1.3 with cipher NAME (256/256 bits)" ("verified" appended when the
 * certificate was checked), or "" in the clear: for logs. */
const char *smtpc_tls_desc(const struct smtpc *c);
uint64_t smtpc_size_limit(const struct smtpc *c); /* "SIZE n": n; 0 none */
/* The first word of the greeting (the peer's domain), printable, "" when
 * absent; valid until smtpc_quit()/smtpc_abort(). For logs and the DSN
 * Remote-MTA field. */
const char *smtpc_peer_name(const struct smtpc *c);

/* Copy up to n body bytes from offset off into buf: the count, 0 at the
 * end, or -errno. Called with increasing off, never past the end twice. */
typedef long (*smtpc_body_fn)(void *ctx, uint64_t off, void *buf, size_t n);

struct smtpc_msg {
	const char *mail_from;    /* without <>, "" = null sender */
	const char *const *rcpts; /* without <> */
	unsigned n_rcpts;         /* 1 or more */
	/* per rcpt RFC 3461 NOTIFY bits or NULL: 0 absent, 1 NEVER (alone),
	 * 2 SUCCESS, 4 FAILURE, 8 DELAY */
	const uint8_t *notify;
	/* per rcpt ORCPT as received ("rfc822;u@x", xtext), NULL or ""
	 * when absent; orcpts itself may be NULL */
	const char *const *orcpts;
	const char *envid; /* ENVID xtext or NULL/"" */
	int ret;           /* 0 absent, 1 FULL, 2 HDRS */
	/* body bytes (SIZE=). With CHUNKING it must be exact: the body source
	 * giving more or fewer bytes is a body source error (-EIO). */
	uint64_t size;
	int body_type; /* 0 none, 1 7BIT, 2 8BITMIME, 3 BINARYMIME */
	bool smtputf8;
	smtpc_body_fn body;
	void *body_ctx;
};

/*
 * One mail transaction. Parameters are sent only where the peer advertised
 * them: SIZE=, BODY= (7BIT/8BITMIME with 8BITMIME, BINARYMIME with
 * BINARYMIME), SMTPUTF8, DSN's RET/ENVID/NOTIFY/ORCPT. Addresses go out as
 * <addr>, the null sender as MAIL FROM:<>.
 *
 * With PIPELINING, MAIL and every RCPT go in one write (RFC 2920; more than
 * 64 KiB of commands go in several, each followed by its replies), then
 * their replies are read in order; without it, each command waits for its
 * reply. If no RCPT was accepted the body is not sent (RSET then, so the
 * connection stays usable).
 *
 * Body: with CHUNKING, sent verbatim as BDAT chunks of at most 1 MiB, the
 * last one "BDAT n LAST", each waiting for its reply. Otherwise DATA, then
 * the body as it streams with every bare CR or bare LF made CRLF (RFC 5321
 * 2.3.8: BDAT may have brought them in) and dot-stuffed (4.5.2), CRLF
 * added if a non-empty body does not end with one, then ".". The body is
 * read from m->body in pieces of at most 64 KiB.
 *
 * Replies (arrays of m->n_rcpts): *mail = MAIL's reply; rcpt[i] = RCPT i's
 * reply; data[i] = the final reply that applies to recipient i, the one to
 * act on:
 *   SMTP: the one reply after the data, copied to every accepted recipient;
 *   LMTP: one reply per accepted recipient, in RCPT order (RFC 2033 4.2);
 *   a recipient refused at RCPT: its RCPT reply;
 *   MAIL refused: MAIL's reply (also in rcpt[i] for RCPTs not sent);
 *   a 4xx/5xx to DATA (before 354) or to a BDAT chunk: that reply for the
 *   accepted recipients; no more body is sent, RSET follows.
 * A recipient address holding a control octet, or making a command line
 * over 2000 octets, is not sent: its rcpt[i] and data[i] are a local
 * "553 5.1.3". Such a sender: every reply is a local "553 5.1.7" and
 * nothing is sent. A malformed ENVID or ORCPT (a space or control octet,
 * an ORCPT without "type;") is left out of the command.
 *
 * Returns 0 when the transaction ran to its end, whatever the codes: the
 * connection is usable for the next one. Also 0, with nothing sent and
 * every reply a local 5xx, when m needs what the peer lacks: SMTPUTF8
 * (554 5.6.7; the caller should check smtpc_exts() first) or BINARYMIME
 * with CHUNKING (554 5.6.3). -EINVAL (nothing sent) for no recipient or a
 * NULL body source.
 * Otherwise -errno, the connection is broken (call smtpc_abort()):
 *   -ETIMEDOUT a reply or a write not in time; -ECONNRESET / -EPIPE the
 *   peer closed (also after a 421 from the peer, RFC 5321 3.8); -EPROTO a
 *   reply that is not one; the body source's -errno, or -EIO for a body
 *   not m->size long with CHUNKING; -ENOTCONN: c was already broken.
 * Then every reply not received is a local 4xx: "421 4.4.2 timeout waiting
 * for reply to DATA", "421 4.4.2 connection lost during RCPT TO", "421
 * 4.5.0 invalid reply to ...", "451 4.3.0 error reading message body", or
 * (after a peer's 421) that 421 copied, so the caller defers those.
 */
/*
 * Ask whether the next hop takes mail for rcpt, without sending any:
 * MAIL FROM:<> (the null sender: a probe must not cause a bounce), RCPT
 * TO:<rcpt>, RSET (RFC 5321 3.3: what Postfix's address verification does).
 * 0 with *reply the reply to RCPT (the connection READY again, or unusable
 * when the RSET failed: smtpc_reusable() says); 1 with *reply the reply to
 * MAIL, which was refused (it says nothing about rcpt), the connection
 * READY again. -errno with *reply a local one (the connection is then
 * unusable: smtpc_abort()).
 */
int smtpc_probe(struct smtpc *c, const char *rcpt, struct smtpc_reply *reply);

int smtpc_send(struct smtpc *c, const struct smtpc_msg *m,
	       struct smtpc_reply *mail, struct smtpc_reply *rcpt,
	       struct smtpc_reply *data);

/* One transaction of smtpc_send_many(): the message, where its replies go
 * (rcpt and data: arrays of m->n_rcpts, as smtpc_send()), and after the
 * call its result. */
struct smtpc_tx {
	const struct smtpc_msg *m;
	struct smtpc_reply mail;
	struct smtpc_reply *rcpt, *data;
	int rc; /* what smtpc_send() would have returned for it */
	/* its final octets (the final dot, the BDAT LAST chunk) were handed
	 * to the connection: when no final reply came (rc < 0) the peer may
	 * have the message anyway (RFC 1047) */
	bool last_out;
	uint64_t out_end; /* internal: where those octets end in the stream */
};

/*
 * Several transactions over one connection, in order, each with the
 * outcome smtpc_send() would give it (tx[i].rc and its replies), for
 * fewer round trips. Without PIPELINING, or for one message, it is
 * smtpc_send() for each. With PIPELINING (RFC 2920) and CHUNKING (RFC
 * 3030): for each message whose body is at most 64 KiB, RSET (from the
 * second on: whatever a refusal left open is closed), MAIL, RCPTs, "BDAT n
 * LAST" and the body, all in as few writes as the output buffer allows,
 * then the replies; once 256 KiB or 128 commands are queued (the message
 * crossing the line goes whole) the replies are read before any more, so
 * no peer can deadlock us. The body is read whole before any of its
 * message is queued: a body that cannot be read fails that message alone
 * (451 4.3.0, rc < 0), the connection stays usable. With
 * PIPELINING and no CHUNKING: message i's MAIL, RCPTs and DATA go in the
 * write that carries message i-1's body and final dot (RFC 2920 3.1: the
 * data may start a group, DATA ends one): one round trip per message. A
 * message that does not fit that (over 64 KiB with BDAT, or over 16 KiB of
 * commands) is sent alone with smtpc_send() in its turn (its body read
 * by smtpc_send() only), and the next one starts with an RSET.
 *
 * Returns 0 when the connection is usable (READY) after the last one, or
 * the -errno that broke it: every transaction without a final answer then
 * has that rc and local 4xx replies as smtpc_send() gives them; those with
 * last_out false never reached the peer and can be tried elsewhere.
 */
int smtpc_send_many(struct smtpc *c, struct smtpc_tx *tx, unsigned n);

/* Whether a cached connection may carry the next transaction: READY with
 * nothing waiting to be read (no octet buffered or on the socket, no EOF).
 * False breaks it: the caller closes it and connects anew, charging no
 * message. No I/O beyond a poll(). */
bool smtpc_reusable(struct smtpc *c);

/* Liveness check of a cached connection: RSET, expect 2xx. 0 or -errno
 * (-EPROTO for a non-2xx reply); on error the connection is broken. */
int smtpc_rset(struct smtpc *c);

/* QUIT (reply awaited at most 5 s, or cmd_timeout_ms if shorter), close,
 * free. A broken connection is closed without QUIT. NULL is allowed. */
void smtpc_quit(struct smtpc *c);

/* Close at once, free. NULL is allowed. */
void smtpc_abort(struct smtpc *c);

/*
 * One complete reply (possibly multi-line) at p[0..n). Lines end in CRLF
 * (a bare LF is accepted); each is a code 200..599, then ' ' (last line),
 * '-' (more follow) or the line end (last line), then text.
 *   OK: *used = octets up to and including the last line's LF, r filled.
 *   AGAIN: a valid prefix; more bytes are needed.
 *   ERR_SYNTAX: a code not 3 digits or not 2xx..5xx, codes differ between
 *     lines, separator not ' '/'-'. Reported as soon as the bytes show it.
 *   ERR_TOOLONG: a line over 2048 octets (CRLF excluded) or more than 1000
 *     lines.
 * r is only meaningful on OK (it may be partly written otherwise).
 */
enum smtpc_parse {
	SMTPC_PARSE_OK,
	SMTPC_PARSE_AGAIN,
	SMTPC_PARSE_ERR_SYNTAX,
	SMTPC_PARSE_ERR_TOOLONG,
};

enum smtpc_parse smtpc_parse_reply(const uint8_t *p, size_t n,
				   struct smtpc_reply *r, size_t *used);

#endif
