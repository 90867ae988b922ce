/*
 * The SMTP session state machine, the verb table and every reply
 * (RFC 5321; RFC 2920 PIPELINING, 1870 SIZE, 6152 8BITMIME, 2034/3463
 * enhanced codes, 6531 SMTPUTF8, 3030 CHUNKING, 3461 DSN). Contract: smtp.h.
 *
 *                 greet_delay                    any input: 554, close
 *   open ──────► GREET_WAIT ───────────────────────────────────────┐
 *     │              │ smtp_session_greet(): 220                    │
 *     │ 220          ▼                                              ▼
 *     └─────────► INIT ──EHLO/HELO──► READY ◄────────────┐       CLOSING
 *                                      │ MAIL            │      (QUIT, 421,
 *                                      ▼                 │       max errors)
 *                                     MAIL ──RCPT ok──► RCPT     │
 *                                                        │ │     │
 *                         ┌───────DATA (354)─────────────┘ │     │
 *                         ▼                                │BDAT │
 *                        DATA ──CRLF.CRLF──┐               ▼     │
 *                                          │     ┌─────── BDAT ◄─┴─ CHUNKING
 *                           bad message:   │     │ chunk   │  ▲ (non-LAST)
 *                           5xx ──► READY  │     │ LAST ok │  └──────┘
 *                                          ▼     ▼
 *                                         COMMIT ──commit_done()──► READY
 *                                         (250 / 451 / 452 from there only)
 *
 * Invariants per state:
 *  GREET_WAIT  nothing queued; input = early talker.
 *  INIT        no HELO name; no transaction.
 *  READY       helo set; no MAIL, no recipient, no sink message.
 *  MAIL        mail_from set, n_rcpts == 0, no sink message.
 *  RCPT        n_rcpts >= 1, no sink message.
 *  DATA        a sink message is open unless fail != NONE (then aborted);
 *              the Received header is appended before any body octet.
 *  BDAT        bdat_left octets of the chunk still to read; they are
 *              appended only if bdat_err == NONE and fail == NONE.
 *  CHUNKING    a sink message is open (BDAT accepted, LAST not seen).
 *  COMMIT      the sink message is committed; input is not consumed;
 *              smtp_session_commit_done() is the only way out.
 *  CLOSING     the last reply is queued; input is not consumed.
 * Commands are taken only in INIT, READY, MAIL, RCPT and CHUNKING, one
 * complete line at a time, and only with SMTP_OUT_RESERVE octets free in the
 * output buffer, so every reply of one command always fits.
 *
 * Limits: SMTP_OUT_SIZE output octets, SMTP_ARENA_SIZE octets of envelope
 * (sender, ENVID, recipients and their ORCPTs) per transaction in the
 * session, beyond that an overflow made when needed (max_recipients RCPT
 * lines' worth, freed with the session), cfg.max_recipients per message;
 * deadlines cfg.command_timeout_ms (one command line) and
 * cfg.data_timeout_ms (one message's data), checked as input arrives
 * (deadline_passed()). A NUL in the data rejects the message
 * like a bare CR/LF. A command line is 512 octets with its
 * CRLF, MAIL and RCPT lines SMTP_PARAM_LINE_MAX (their DSN parameters).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "finaldot/compiler.h"
#include "finaldot/lathist.h"
#include "finaldot/log.h"
#include "finaldot/mailbox.h"
#include "finaldot/msgid.h"
#include "finaldot/spool_format.h"
#include "smtp/smtp.h"
#include "smtp/smtp_data.h"
#include "smtp/smtp_parse.h"
#include "smtp/smtp_received.h"

#define SMTP_OUT_SIZE 4096
#define SMTP_REPLY_MAX 512
#define SMTP_OUT_RESERVE (3 * SMTP_REPLY_MAX)
#define SMTP_ARENA_SIZE 8192
#define SMTP_ADDR_MAX 64

/* ---- RFC 1047's gap: durable completion to the 250 handed out ---------- */

enum smtp_state {
	SMTP_S_FREE = 0, /* in the pool */
	SMTP_S_GREET_WAIT,
	SMTP_S_INIT,
	SMTP_S_READY,
	SMTP_S_MAIL,
	SMTP_S_RCPT,
	SMTP_S_DATA,
	SMTP_S_BDAT,
	SMTP_S_CHUNKING,
	SMTP_S_COMMIT,
	SMTP_S_TLS_WAIT, /* 220 to STARTTLS queued: the handshake is next */
	SMTP_S_CLOSING,
};

/* Why the current message (or BDAT chunk) will not be queued. */
enum smtp_fail {
	SMTP_FAIL_NONE = 0,
	SMTP_FAIL_SIZE,      /* 552 5.3.4 */
	SMTP_FAIL_BARE,      /* 550 5.6.0 bare CR or LF */
	SMTP_FAIL_LONG_LINE, /* 550 5.6.0 line > 1000 */
	SMTP_FAIL_WRITE,     /* 451 4.3.0 append failed */
	SMTP_FAIL_NOSPACE,   /* 452 4.3.1 begin/commit -ENOSPC */
	SMTP_FAIL_LOCAL,     /* 451 4.3.0 begin/commit other error */
	SMTP_FAIL_SEQUENCE,  /* 503 5.5.1 BDAT outside a transaction */
	SMTP_FAIL_NO_RCPT,   /* 554 5.5.1 BDAT after every RCPT failed */
	SMTP_FAIL_NUL,       /* 550 5.6.0 NUL octet in the data */
};

#define SMTP_SUMMARY_VERBS 16 /* entries of smtp_verbs[] */

struct smtp_session {
	struct smtp_server *srv;
	void *tctx;
	uint64_t sid;
	enum smtp_state state;
	struct smtp_session *next_free;
	unsigned errors;
	bool esmtp;
	bool shutdown_pending; /* 421 4.3.2 once the commit is done */
	bool timeout_pending;  /* 421 4.4.2 once the commit is done */
	bool cmd_started;      /* an octet of the next command line came */
	uint64_t cmd_t0_us;    /* when it came (cfg.command_timeout_ms) */
	uint64_t msg_t0_us;    /* 354 or first BDAT (cfg.data_timeout_ms) */
	char client_addr[SMTP_ADDR_MAX];
	char helo[SMTP_LINE_MAX];
	size_t helo_len;
	/* RFC 1047: where the recent 250s to a final dot end in the output
	 * stream (octets handed to the transport since the session began),
	 * for the transport's in-doubt check when the session ends. */
	uint64_t out_total;
	struct smtp_ackpoint ack[SMTP_ACKPOINTS];
	unsigned n_ack;
	bool quit_seen;
	bool tls;          /* TLS is up (smtp_session_tls_ready) */
	/* The session's summary line (smtp_session_close): commands per
	 * verb (smtp_verbs order, then "unknown"), how many got a 2xx/3xx,
	 * messages queued and refused, why it ended. */
	uint16_t cmd_n[SMTP_SUMMARY_VERBS + 1], cmd_ok[SMTP_SUMMARY_VERBS + 1];
	unsigned msgs_queued, msgs_refused;
	int last_code;        /* of the last reply queued */
	const char *end_why;  /* set where the session decides to end */
	uint64_t open_mono_us;
	uint64_t tls_discarded; /* plaintext dropped after STARTTLS */
	char tls_desc[SMTP_RECEIVED_TLS_MAX + 1];
	uint64_t gap_t0_ns;  /* the last 250's durable completion, 0 none */
	uint64_t gap_end;    /* its end in the output stream */

	struct smtp_line line;

	size_t out_head, out_tail;
	uint8_t out[SMTP_OUT_SIZE];

	/* Transaction (reset by RSET, EHLO/HELO, end of message). */
	const char *mail_from; /* in arena */
	const char **rcpts;    /* cfg.max_recipients slots, in arena */
	uint8_t *notify;       /* cfg.max_recipients slots: NOTIFY per RCPT */
	const char **orcpts;   /* cfg.max_recipients slots, in arena or "" */
	unsigned n_rcpts;
	unsigned rcpt_attempts;
	uint64_t size_param;
	enum fd_body_type body;
	bool smtputf8;
	const char *envid; /* in arena, or "" */
	enum fd_dsn_ret ret;
	bool any_notify; /* some accepted RCPT had NOTIFY */
	bool any_orcpt;  /* some accepted RCPT had ORCPT */
	size_t env_rcpt_bytes; /* the accepted RCPTs' share of the envelope */
	size_t arena_used;
	char arena[SMTP_ARENA_SIZE];
	/* Beyond the arena (long addresses with ORCPTs: RFC 5321 4.5.3.1.8
	 * asks for 100 recipients buffered whatever their length): one
	 * buffer for the rest of the session, made when first needed. */
	char *ovf;
	size_t ovf_used, ovf_cap;

	/* Message. */
	void *msg; /* sink handle; NULL when none is open */
	uint64_t msgid;
	enum smtp_fail fail;
	uint64_t body_size;
	struct fd_envelope env;
	struct smtp_data data;
	size_t hdr_len, hdr_off;
	char hdr[SMTP_RECEIVED_MAX];

	/* BDAT chunk being read. */
	uint64_t bdat_size, bdat_left;
	bool bdat_last;
	enum smtp_fail bdat_err;
	enum smtp_state bdat_prev;
};

struct smtp_server {
	struct smtp_config cfg;
	unsigned rcpt_cap; /* recipient slots per session (allocated) */
	uint64_t sid_epoch; /* added to session ids: unique across restarts */
	struct smtp_sink_ops ops;
	void *sink;
	struct smtp_stats stats;
	struct smtp_session *sessions;
	const char **rcpt_slots;
	const char **orcpt_slots;
	uint8_t *notify_slots;
	struct smtp_session *free_list;
	/* sessions[n_fresh..max_sessions) were never opened: untouched, so
	 * a worker's session table (16 KiB a session, max_connections of
	 * them) costs neither start-up time nor memory until it is used. */
	unsigned n_fresh;
	size_t busy_len;
	char busy[SMTP_REPLY_MAX];
	/* RFC 1047's gap measured to the wire (smtp_server_gap_staged()):
	 * the durable-completion times of 250s the transport took but has
	 * not yet put on the wire. */
	bool gap_staged;
	unsigned n_gap_stage;
	uint64_t gap_stage[SMTP_GAP_STAGE];
	/* A full spool refuses every message: one line per 10 s of them. */
	uint64_t full_logged_us;
	uint64_t full_unlogged;
};

static void
gap_record(struct smtp_server *srv, uint64_t t0_ns, uint64_t now_ns)
{
	uint64_t us = now_ns > t0_ns ? (now_ns - t0_ns) / 1000 : 0;

	srv->stats.gap_hist[fd_qlat_bucket(us)]++;
}

static const char *
smtp_state_name(enum smtp_state st)
{
	switch (st) {
	case SMTP_S_FREE:
		return "free";
	case SMTP_S_GREET_WAIT:
		return "greet-wait";
	case SMTP_S_INIT:
		return "init";
	case SMTP_S_READY:
		return "ready";
	case SMTP_S_MAIL:
		return "mail";
	case SMTP_S_RCPT:
		return "rcpt";
	case SMTP_S_DATA:
		return "data";
	case SMTP_S_BDAT:
		return "bdat";
	case SMTP_S_CHUNKING:
		return "chunking";
	case SMTP_S_COMMIT:
		return "commit";
	case SMTP_S_TLS_WAIT:
		return "tls-wait";
	case SMTP_S_CLOSING:
		return "closing";
	}
	return "?";
}

static void
smtp_enter_state(struct smtp_session *s, enum smtp_state st)
{
	fd_debug("smtp", "%016" PRIx64 " event=state from=%s to=%s", s->sid,
		 smtp_state_name(s->state), smtp_state_name(st));
	s->state = st;
}

static const char *
smtp_fail_name(enum smtp_fail f)
{
	switch (f) {
	case SMTP_FAIL_NONE:
		return "none";
	case SMTP_FAIL_SIZE:
		return "size";
	case SMTP_FAIL_BARE:
		return "bare-cr-lf";
	case SMTP_FAIL_LONG_LINE:
		return "line-too-long";
	case SMTP_FAIL_WRITE:
		return "write-error";
	case SMTP_FAIL_NOSPACE:
		return "no-space";
	case SMTP_FAIL_LOCAL:
		return "local-error";
	case SMTP_FAIL_SEQUENCE:
		return "bad-sequence";
	case SMTP_FAIL_NO_RCPT:
		return "no-valid-recipients";
	case SMTP_FAIL_NUL:
		return "nul";
	}
	return "?";
}

static uint64_t
smtp_now(const struct smtp_server *srv)
{
	return srv->cfg.now_us ? srv->cfg.now_us() : fd_now_realtime_us();
}

/* For the deadlines: CLOCK_MONOTONIC, or the test's clock. */
static uint64_t
smtp_mono(const struct smtp_server *srv)
{
	return srv->cfg.mono_us ? srv->cfg.mono_us() : fd_now_monotonic_us();
}

/* ---- output ---- */

static size_t
out_free(const struct smtp_session *s)
{
	return SMTP_OUT_SIZE - (s->out_tail - s->out_head);
}

/* Queue one reply (CRLF added). False if the output buffer is full. */
__attribute__((format(printf, 2, 3))) static bool
reply(struct smtp_session *s, const char *fmt, ...)
{
	char buf[SMTP_REPLY_MAX];
	va_list ap;
	int r;
	size_t n;

	va_start(ap, fmt);
	r = vsnprintf(buf, sizeof(buf) - 2, fmt, ap);
	va_end(ap);
	if (r < 0)
		return false;
	n = FD_MIN((size_t)r, sizeof(buf) - 3);
	buf[n++] = '\r';
	buf[n++] = '\n';
	if (out_free(s) < n) {
		fd_log(FD_LOG_WARN, "smtp",
		       "%016" PRIx64 " event=output_full dropped=%zu", s->sid,
		       n);
		return false;
	}
	if (s->out_tail + n > SMTP_OUT_SIZE) {
		memmove(s->out, s->out + s->out_head,
			s->out_tail - s->out_head);
		s->out_tail -= s->out_head;
		s->out_head = 0;
	}
	memcpy(s->out + s->out_tail, buf, n);
	s->out_tail += n;
	s->last_code = (buf[0] - '0') * 100 + (buf[1] - '0') * 10 +
		       (buf[2] - '0');
	return true;
}

static void
smtp_close_after(struct smtp_session *s)
{
	smtp_enter_state(s, SMTP_S_CLOSING);
}

/*
 * A command the client got wrong, or a rejected recipient: counted; after
 * cfg.max_errors of them the session ends with 421 4.7.0 (like Postfix's
 * hard error limit, which also counts rejected RCPTs: it is what stops a
 * directory harvest).
 */
static void
count_error(struct smtp_session *s)
{
	s->errors++;
	if (s->srv->cfg.max_errors && s->errors >= s->srv->cfg.max_errors) {
		fd_log(FD_LOG_INFO, "smtp",
		       "%016" PRIx64 " event=too_many_errors errors=%u",
		       s->sid, s->errors);
		reply(s, "421 4.7.0 %.255s Error: too many errors",
		      s->srv->cfg.hostname);
		s->end_why = "errors";
		smtp_close_after(s);
	}
}

/* A command the client got wrong: a syntax error, counted as such. */
__attribute__((format(printf, 2, 3))) static void
error_reply(struct smtp_session *s, const char *fmt, ...)
{
	char buf[SMTP_REPLY_MAX];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	reply(s, "%s", buf);
	s->srv->stats.syntax_errors++;
	count_error(s);
}

/* ---- transaction and message ---- */

/* A copy of p[0..n) with a NUL, in the arena or else its overflow
 * (room for max_recipients RCPT lines' worth); NULL when neither has
 * room. Nothing ever moves: earlier copies stay where they are. */
static const char *
arena_put(struct smtp_session *s, const char *p, size_t n)
{
	char *d;

	if (SMTP_ARENA_SIZE - s->arena_used >= n + 1) {
		d = s->arena + s->arena_used;
		s->arena_used += n + 1;
	} else {
		if (!s->ovf) {
			size_t cap = ((size_t)s->srv->cfg.max_recipients + 1) *
				     (SMTP_PARAM_LINE_MAX + 2);
			if (!(s->ovf = malloc(cap)))
				return NULL;
			s->ovf_cap = cap;
			s->ovf_used = 0;
		}
		if (s->ovf_cap - s->ovf_used < n + 1)
			return NULL;
		d = s->ovf + s->ovf_used;
		s->ovf_used += n + 1;
	}
	memcpy(d, p, n);
	d[n] = '\0';
	return d;
}

/* Drop the sink message if one is open and not committed. */
static void
msg_abort(struct smtp_session *s)
{
	if (s->msg && s->state != SMTP_S_COMMIT)
		s->srv->ops.abort(s->srv->sink, s->msg);
	s->msg = NULL;
}

static void
txn_reset(struct smtp_session *s)
{
	msg_abort(s);
	s->mail_from = NULL;
	s->n_rcpts = 0;
	s->rcpt_attempts = 0;
	s->size_param = 0;
	s->body = FD_BODY_NONE;
	s->smtputf8 = false;
	s->envid = "";
	s->ret = FD_RET_NONE;
	s->any_notify = false;
	s->any_orcpt = false;
	s->env_rcpt_bytes = 0;
	s->arena_used = s->ovf_used = 0;
	s->fail = SMTP_FAIL_NONE;
	s->body_size = 0;
	s->hdr_len = s->hdr_off = 0;
	s->bdat_err = SMTP_FAIL_NONE;
}

/* The message will not be queued: abort it now, answer at its end. */
static void
msg_fail(struct smtp_session *s, enum smtp_fail why)
{
	if (s->fail != SMTP_FAIL_NONE)
		return;
	s->fail = why;
	msg_abort(s);
}

/* The RFC 3848 / RFC 6531 "with" keyword. HELO over TLS has no keyword of
 * its own; it says SMTP, and the comment line says TLS. */
static const char *
received_proto(const struct smtp_session *s)
{
	if (s->smtputf8)
		return s->tls ? "UTF8SMTPS" : "UTF8SMTP"; /* RFC 6531 3.7.3 */
	if (!s->esmtp)
		return "SMTP";
	return s->tls ? "ESMTPS" : "ESMTP";
}

static size_t
received_build(struct smtp_session *s, uint64_t msgid, uint64_t now)
{
	struct smtp_received_info ri = {
		.helo = s->helo,
		.helo_len = s->helo_len,
		.client_addr = s->client_addr,
		.hostname = s->srv->cfg.hostname,
		.proto = received_proto(s),
		.tls = s->tls ? s->tls_desc : NULL,
		.msgid = msgid,
		.rcpt = s->n_rcpts == 1 ? s->rcpts[0] : NULL,
		.now_us = now,
	};
	return smtp_received_format(s->hdr, sizeof(s->hdr), &ri);
}

/* sink begin() for DATA / the first BDAT. 0 or the sink's -errno. */
static int
msg_open(struct smtp_session *s)
{
	struct smtp_server *srv = s->srv;
	int err = -EIO;
	uint64_t now = smtp_now(srv);

	s->env = (struct fd_envelope){
		.mail_from = s->mail_from,
		.rcpts = s->rcpts,
		.n_rcpts = s->n_rcpts,
		.helo = s->helo,
		.client_addr = s->client_addr,
		.proto = !s->esmtp ? "SMTP" : s->tls ? "ESMTPS" : "ESMTP",
		.arrival_us = now,
		.size_param = s->size_param,
		.body = s->body,
		.smtputf8 = s->smtputf8,
		.envid = s->envid,
		.ret = s->ret,
		.notify = s->any_notify ? s->notify : NULL,
		.orcpts = s->any_orcpt ? s->orcpts : NULL,
	};
	s->msgid = 0;
	s->msg = srv->ops.begin(srv->sink, &s->env, s, &s->msgid, &err);
	if (!s->msg && err == -EAGAIN)
		return err; /* no room right now: the caller holds the command */
	if (!s->msg) {
		/* A full spool (452 4.3.1) is a state the spool logs itself,
		 * and every message meets it: a line per message would
		 * flood the log, often on the same full disk. */
		uint64_t mono = smtp_mono(srv);

		if (err != -ENOSPC || !srv->full_logged_us ||
		    mono - srv->full_logged_us >= 10000000u) {
			fd_log(FD_LOG_WARN, "smtp",
			       "%016" PRIx64 " event=spool_begin_failed err=%d"
			       " suppressed=%" PRIu64,
			       s->sid, err, srv->full_unlogged);
			if (err == -ENOSPC) {
				srv->full_logged_us = mono ? mono : 1;
				srv->full_unlogged = 0;
			}
		} else {
			srv->full_unlogged++;
		}
		return err < 0 ? err : -EIO;
	}
	s->fail = SMTP_FAIL_NONE;
	s->body_size = 0;
	s->hdr_len = received_build(s, s->msgid, now);
	s->hdr_off = 0;
	return 0;
}

static void
sink_append(struct smtp_session *s, const void *p, size_t n)
{
	if (n == 0 || s->fail != SMTP_FAIL_NONE)
		return;
	if (s->srv->ops.append(s->srv->sink, s->msg, p, n) != 0)
		msg_fail(s, SMTP_FAIL_WRITE);
}

/*
 * Body octets (unstuffed DATA run or BDAT octets). Up to the size limit
 * they are appended; the first octet beyond fails the message: the excess
 * is never appended (RFC 1870 6.3: 552 at the end of data).
 */
static void
body_append(struct smtp_session *s, const uint8_t *p, size_t n)
{
	uint64_t max = s->srv->cfg.max_message_size;

	if (s->fail != SMTP_FAIL_NONE)
		return;
	if (n > max - s->body_size) {
		size_t k = (size_t)(max - s->body_size);
		sink_append(s, p, k);
		s->body_size += k;
		msg_fail(s, SMTP_FAIL_SIZE);
		return;
	}
	sink_append(s, p, n);
	s->body_size += n;
}

/*
 * The sink's room. 0 with the sink saying no room will come (its disk is
 * full): the message fails (452 4.3.1) and its octets are read and
 * dropped, instead of the session waiting for room until its data
 * timeout.
 */
static size_t
room_or_fail(struct smtp_session *s)
{
	size_t r = s->srv->ops.room(s->srv->sink);

	if (r == 0 && s->srv->ops.full && s->srv->ops.full(s->srv->sink))
		msg_fail(s, SMTP_FAIL_NOSPACE);
	return r;
}

/*
 * Append what room() allows of the Received header. True if it is all
 * out (or the message failed); false if the spool has no room now.
 */
static bool
header_flush(struct smtp_session *s)
{
	while (s->fail == SMTP_FAIL_NONE && s->hdr_off < s->hdr_len) {
		size_t room = room_or_fail(s);
		size_t k = FD_MIN(room, s->hdr_len - s->hdr_off);
		if (s->fail != SMTP_FAIL_NONE)
			break;
		if (k == 0)
			return false;
		sink_append(s, s->hdr + s->hdr_off, k);
		s->hdr_off += k;
	}
	return true;
}

/* The reply to a message that will not be queued, and the bookkeeping. */
static void
msg_reject(struct smtp_session *s, enum smtp_fail why)
{
	struct smtp_server *srv = s->srv;
	const char *host = srv->cfg.hostname;

	switch (why) {
	case SMTP_FAIL_SIZE:
		reply(s, "552 5.3.4 Error: message size exceeds fixed limit");
		break;
	case SMTP_FAIL_BARE:
		/* RFC 5321 2.3.8; the 2023 SMTP smuggling attacks. */
		reply(s, "550 5.6.0 Error: bare CR or LF in message data "
			 "(CRLF line endings required)");
		break;
	case SMTP_FAIL_LONG_LINE:
		reply(s, "550 5.6.0 Error: text line longer than %d octets",
		      SMTP_TEXT_LINE_MAX);
		break;
	case SMTP_FAIL_NUL:
		/* A next hop that strips NULs would see "\r\n\0.\r\n" as
		 * the end of data: smuggling one hop later (issue 10). */
		reply(s, "550 5.6.0 Error: NUL octet in message data");
		break;
	case SMTP_FAIL_WRITE:
	case SMTP_FAIL_LOCAL:
		reply(s, "451 4.3.0 %.255s Error: local error in processing",
		      host);
		break;
	case SMTP_FAIL_NOSPACE:
		reply(s, "452 4.3.1 %.255s Error: insufficient system storage",
		      host);
		break;
	case SMTP_FAIL_SEQUENCE:
	case SMTP_FAIL_NO_RCPT:
	case SMTP_FAIL_NONE:
		reply(s, "451 4.3.0 Error: internal error");
		break;
	}
	if (why == SMTP_FAIL_WRITE || why == SMTP_FAIL_LOCAL ||
	    why == SMTP_FAIL_NOSPACE)
		srv->stats.messages_failed++;
	else
		srv->stats.messages_rejected++;
	s->msgs_refused++;
	fd_log(FD_LOG_INFO, "smtp",
	       "%016" PRIx64 " event=rejected reason=%s size=%" PRIu64, s->sid,
	       smtp_fail_name(why), s->body_size);
	txn_reset(s);
	smtp_enter_state(s, SMTP_S_READY);
}

/* End of data (final dot or BDAT LAST) of a message still good. */
static void
msg_commit(struct smtp_session *s)
{
	struct smtp_server *srv = s->srv;
	int r;

	if (s->fail != SMTP_FAIL_NONE) {
		msg_reject(s, s->fail);
		return;
	}
	r = srv->ops.commit(srv->sink, s->msg);
	if (r != 0) {
		/* XXX the sink refused the commit: take the message as
		 * still ours and uncommitted, so abort it. */
		msg_fail(s, r == -ENOSPC ? SMTP_FAIL_NOSPACE : SMTP_FAIL_LOCAL);
		msg_reject(s, s->fail);
		return;
	}
	/* The reply comes from smtp_session_commit_done() only. */
	smtp_enter_state(s, SMTP_S_COMMIT);
}

static void line_reset(struct smtp_session *s);

/* ---- verbs ---- */

typedef bool (*smtp_verb_fn)(struct smtp_session *s, const struct smtp_cmd *c);

struct smtp_verb {
	const char *name;
	unsigned states; /* bit (1 << state) set: allowed there */
	smtp_verb_fn fn;
};

static bool
check_no_arg(struct smtp_session *s, const struct smtp_cmd *c,
	     const char *verb)
{
	if (c->arg_len == 0)
		return true;
	error_reply(s, "501 5.5.4 Syntax: %s", verb);
	return false;
}

static bool
smtp_cmd_helo_common(struct smtp_session *s, const struct smtp_cmd *c,
		     bool esmtp)
{
	struct smtp_server *srv = s->srv;

	if (c->arg_len == 0) {
		error_reply(s, "501 5.5.4 Syntax: %s hostname",
			    esmtp ? "EHLO" : "HELO");
		return true;
	}
	/* RFC 5321 4.1.4: EHLO/HELO resets any transaction. */
	txn_reset(s);
	/* The line limit (512) keeps the argument within helo[]. */
	s->helo_len = FD_MIN(c->arg_len, sizeof(s->helo) - 1);
	memcpy(s->helo, c->arg, s->helo_len);
	s->helo[s->helo_len] = '\0';
	s->esmtp = esmtp;
	smtp_enter_state(s, SMTP_S_READY);
	/* RFC 2034 3: no enhanced code in the EHLO/HELO reply. RFC 3207
	 * 4.2: STARTTLS is not offered again once TLS is up. */
	if (!esmtp)
		reply(s, "250 %.255s", srv->cfg.hostname);
	else
		reply(s,
		      "250-%.255s\r\n"
		      "250-PIPELINING\r\n"
		      "250-SIZE %" PRIu64 "\r\n"
		      "250-8BITMIME\r\n"
		      "250-ENHANCEDSTATUSCODES\r\n"
		      "%s"
		      "250-DSN\r\n"
		      "250-SMTPUTF8\r\n"
		      "250 CHUNKING",
		      srv->cfg.hostname, srv->cfg.max_message_size,
		      srv->cfg.starttls && !s->tls ? "250-STARTTLS\r\n" : "");
	return true;
}

static bool
smtp_cmd_helo(struct smtp_session *s, const struct smtp_cmd *c)
{
	return smtp_cmd_helo_common(s, c, false);
}

static bool
smtp_cmd_ehlo(struct smtp_session *s, const struct smtp_cmd *c)
{
	return smtp_cmd_helo_common(s, c, true);
}

static bool
smtp_cmd_mail(struct smtp_session *s, const struct smtp_cmd *c)
{
	struct smtp_mail_args m;
	enum smtp_parse_result r = smtp_parse_mail(c->arg, c->arg_len, &m);

	switch (r) {
	case SMTP_PARSE_OK:
		break;
	case SMTP_PARSE_ERR_SYNTAX:
	case SMTP_PARSE_ERR_CHAR:
	case SMTP_PARSE_AGAIN:
		if (m.path_ok)
			error_reply(s, "501 5.5.4 Syntax error in MAIL "
				       "parameters");
		else
			error_reply(s, "501 5.1.7 Bad sender address syntax");
		return true;
	case SMTP_PARSE_ERR_TOO_LONG:
		error_reply(s, "501 5.1.7 Sender address too long");
		return true;
	case SMTP_PARSE_ERR_UTF8:
		error_reply(s, "553 5.6.7 Malformed UTF-8 in MAIL command");
		return true;
	case SMTP_PARSE_ERR_PARAM_UNKNOWN:
		error_reply(s, "555 5.5.4 Unsupported MAIL parameter");
		return true;
	case SMTP_PARSE_ERR_PARAM_VALUE:
		error_reply(s, "555 5.5.4 Unsupported MAIL parameter value");
		return true;
	}
	if (s->srv->cfg.tls_required && !s->tls) {
		/* RFC 3207 4: 530 to any command but NOOP, EHLO, STARTTLS
		 * and QUIT; MAIL is the one that matters (RCPT and DATA
		 * cannot come without it). */
		s->srv->stats.tls_required_refused++;
		reply(s, "530 5.7.0 Must issue a STARTTLS command first");
		return true;
	}
	if (!s->esmtp && m.n_params > 0) {
		error_reply(s, "555 5.5.4 MAIL parameters require EHLO");
		return true;
	}
	if (m.path.non_ascii && !m.smtputf8) {
		reply(s, "553 5.6.7 Non-ASCII address requires SMTPUTF8");
		return true;
	}
	if (m.has_size && m.size > s->srv->cfg.max_message_size) {
		reply(s, "552 5.3.4 Message size exceeds fixed limit");
		return true;
	}
	txn_reset(s);
	s->mail_from = arena_put(s, m.path.mailbox, m.path.mailbox_len);
	if (m.envid && s->mail_from)
		s->envid = arena_put(s, m.envid, m.envid_len);
	if (!s->mail_from || !s->envid) { /* cannot happen: 256+101 < arena */
		txn_reset(s);
		reply(s, "452 4.3.1 Error: out of memory");
		return true;
	}
	s->size_param = m.has_size ? m.size : 0;
	s->body = m.body;
	s->smtputf8 = m.smtputf8;
	s->ret = m.ret;
	smtp_enter_state(s, SMTP_S_MAIL);
	reply(s, "250 2.1.0 Ok");
	return true;
}

static bool
equal_postmaster(const char *local, size_t n)
{
	return n == 10 && strncasecmp(local, "postmaster", 10) == 0;
}

/* The local part local[0..n) names postmaster: bare, or quoted
 * ("postmaster", "post\master": RFC 5322 3.2.4 makes them the same
 * mailbox, and delivery strips the quotes: fd_local_part()). */
static bool
names_postmaster(const char *local, size_t n)
{
	char d[11];

	return equal_postmaster(d, fd_local_part(local, n, d, sizeof(d)));
}

static bool
rcpt_domain_is_ours(const struct smtp_server *srv, const struct smtp_path *p)
{
	if (p->domain_literal)
		return false;
	for (unsigned i = 0; i < srv->cfg.n_domains; i++) {
		const char *d = srv->cfg.domains[i];
		if (smtp_domain_equal(p->domain, p->domain_len, d, strlen(d)))
			return true;
	}
	return false;
}

/*
 * cfg.rcpt_check on a recipient of an accepted domain. postmaster, bare or
 * at any accepted domain, is never asked about: RFC 5321 4.5.1 requires
 * accepting it. True: accept; false: the reply is queued. A 550 counts
 * toward max_errors (see count_error()), a 450 does not: it is our failure.
 */
static bool
rcpt_check(struct smtp_session *s, const struct smtp_path *p,
	   const char *addr)
{
	struct smtp_server *srv = s->srv;
	char esc[128];
	int r;

	if (!srv->cfg.rcpt_check || p->postmaster ||
	    names_postmaster(p->mailbox, p->local_len))
		return true;
	r = srv->cfg.rcpt_check(srv->cfg.rcpt_ctx, addr);
	if (r > 0)
		return true;
	fd_log(FD_LOG_INFO, "smtp", "%016" PRIx64 " event=%s rcpt=%s",
	       s->sid, r == 0 ? "rcpt_unknown" : "rcpt_check_failed",
	       fd_log_escape(esc, sizeof(esc), addr, strlen(addr)));
	if (r == 0) {
		srv->stats.rcpt_unknown++;
		/* addr passed the path grammar: no CR, LF or control octet,
		 * at most 256 octets, so the reply stays one line. */
		reply(s,
		      "550 5.1.1 <%s>: Recipient address rejected: User "
		      "unknown",
		      addr);
		count_error(s);
	} else {
		reply(s,
		      "450 4.1.1 <%s>: Recipient address rejected: try again "
		      "later",
		      addr);
	}
	return false;
}

/*
 * The spool keeps a message's envelope in one record of at most
 * SPOOL_ENV_MAX octets: each recipient takes up to spool_env_rcpt_max();
 * everything else (sender, HELO name, client address, ENVID and the fixed
 * fields) stays well under the reserve. Past it the spool
 * refuses the message at DATA (a 451 at every retry, the mail stuck), so
 * the RCPT that would pass it gets 452 4.5.3 instead: the client sends
 * the other recipients in another transaction (RFC 5321 4.5.3.1.10).
 */
#define ENV_OTHER_RESERVE 2048u

static bool
smtp_cmd_rcpt(struct smtp_session *s, const struct smtp_cmd *c)
{
	struct smtp_server *srv = s->srv;
	struct smtp_rcpt_args ra;
	enum smtp_parse_result r;
	char esc[128];
	size_t mark, omark, env_add;
	const char *addr, *orcpt = "";

	s->rcpt_attempts++;
	if (s->n_rcpts >= srv->cfg.max_recipients) {
		reply(s, "452 4.5.3 Error: too many recipients");
		return true;
	}
	r = smtp_parse_rcpt(c->arg, c->arg_len, &ra);
	switch (r) {
	case SMTP_PARSE_OK:
		break;
	case SMTP_PARSE_ERR_SYNTAX:
	case SMTP_PARSE_ERR_CHAR:
	case SMTP_PARSE_AGAIN:
		if (ra.path_ok)
			error_reply(s, "501 5.5.4 Syntax error in RCPT "
				       "parameters");
		else
			error_reply(s,
				    "501 5.1.3 Bad recipient address syntax");
		return true;
	case SMTP_PARSE_ERR_TOO_LONG:
		error_reply(s, "501 5.1.3 Recipient address too long");
		return true;
	case SMTP_PARSE_ERR_UTF8:
		error_reply(s, "553 5.6.7 Malformed UTF-8 in RCPT command");
		return true;
	case SMTP_PARSE_ERR_PARAM_UNKNOWN:
	case SMTP_PARSE_ERR_PARAM_VALUE:
		error_reply(s, "555 5.5.4 Unsupported RCPT parameter");
		return true;
	}
	if (!s->esmtp && ra.n_params > 0) {
		error_reply(s, "555 5.5.4 RCPT parameters require EHLO");
		return true;
	}
	if (ra.path.non_ascii && !s->smtputf8) {
		reply(s, "553 5.6.7 Non-ASCII address requires SMTPUTF8");
		return true;
	}
	/*
	 * Not an open relay: the mailbox's own domain decides (a source
	 * route is ignored, RFC 5321 3.3). '%', '!' and a quoted '@' are
	 * old relay syntaxes some backends still honour: refused outright.
	 */
	if (!ra.path.postmaster &&
	    (ra.path.local_special || !rcpt_domain_is_ours(srv, &ra.path))) {
		srv->stats.relay_denied++;
		fd_log(FD_LOG_INFO, "smtp",
		       "%016" PRIx64 " event=relay_denied rcpt=%s", s->sid,
		       fd_log_escape(esc, sizeof(esc), ra.path.mailbox,
				     ra.path.mailbox_len));
		error_reply(s, "550 5.7.1 Relay access denied");
		return true;
	}
	env_add = spool_env_rcpt_max(ra.path.mailbox_len,
				     ra.orcpt ? ra.orcpt_len : 0);
	if (s->env_rcpt_bytes + env_add > SPOOL_ENV_MAX - ENV_OTHER_RESERVE) {
		reply(s, "452 4.5.3 Error: too many recipients");
		return true;
	}
	/* The arena copy is what the checker sees; undone if refused. */
	mark = s->arena_used;
	omark = s->ovf_used;
	addr = arena_put(s, ra.path.mailbox, ra.path.mailbox_len);
	if (addr && ra.orcpt)
		orcpt = arena_put(s, ra.orcpt, ra.orcpt_len);
	if (!addr || !orcpt) {
		s->arena_used = mark;
		s->ovf_used = omark;
		reply(s, "452 4.5.3 Error: too many recipients");
		return true;
	}
	if (!rcpt_check(s, &ra.path, addr)) {
		s->arena_used = mark;
		s->ovf_used = omark;
		return true;
	}
	s->rcpts[s->n_rcpts] = addr;
	s->notify[s->n_rcpts] = ra.notify;
	s->orcpts[s->n_rcpts] = orcpt;
	s->any_notify |= ra.notify != FD_NOTIFY_NONE;
	s->any_orcpt |= ra.orcpt != NULL;
	s->env_rcpt_bytes += env_add;
	s->n_rcpts++;
	smtp_enter_state(s, SMTP_S_RCPT);
	reply(s, "250 2.1.5 Ok");
	return true;
}

static bool
smtp_cmd_data(struct smtp_session *s, const struct smtp_cmd *c)
{
	int err;

	if (!check_no_arg(s, c, "DATA"))
		return true;
	if (s->n_rcpts == 0) {
		/* RFC 2920 3.1: after all pipelined RCPTs failed. */
		if (s->rcpt_attempts > 0)
			reply(s, "554 5.5.1 Error: no valid recipients");
		else
			error_reply(s, "503 5.5.1 Error: need RCPT command");
		return true;
	}
	err = msg_open(s);
	if (err == -EAGAIN)
		return false; /* every spool buffer in flight: hold DATA */
	if (err != 0) {
		/* Our failure, not the client's: the transaction ends here
		 * (as after a 4xx to the final dot), so the client may try
		 * again at once with MAIL without a 503 (issue 10). */
		if (err == -ENOSPC)
			reply(s, "452 4.3.1 %.255s Error: insufficient system "
				 "storage",
			      s->srv->cfg.hostname);
		else
			reply(s, "451 4.3.0 %.255s Error: local error in "
				 "processing",
			      s->srv->cfg.hostname);
		s->srv->stats.messages_failed++;
		s->msgs_refused++;
		txn_reset(s);
		smtp_enter_state(s, SMTP_S_READY);
		return true;
	}
	smtp_data_init(&s->data);
	s->msg_t0_us = smtp_mono(s->srv);
	smtp_enter_state(s, SMTP_S_DATA);
	/* 354 is an intermediate reply: no enhanced code (RFC 2034 3). */
	reply(s, "354 End data with <CR><LF>.<CR><LF>");
	return true;
}

/*
 * BDAT (RFC 3030 2). Whatever the verdict, the chunk's octets are read as
 * data, never as commands: a client that pipelines BDAT and its octets
 * must not get them interpreted. The reply comes at the chunk's end.
 */
static bool
smtp_cmd_bdat(struct smtp_session *s, const struct smtp_cmd *c)
{
	struct smtp_server *srv = s->srv;
	uint64_t size;
	bool last;
	int err;

	if (smtp_parse_bdat(c->arg, c->arg_len, &size, &last) !=
	    SMTP_PARSE_OK) {
		error_reply(s, "501 5.5.4 Syntax: BDAT size [LAST]");
		return true;
	}
	/*
	 * "BDAT 0 [LAST]" has no octets to wait on: a Received header still
	 * to append must fit now, or the command is held (its LF left
	 * unconsumed, offered again by the transport). XXX this needs
	 * room() >= header length; other chunks flush it in steps. Not
	 * with the spool out of space: no room comes, and the command
	 * goes on to its 452 4.3.1 as DATA does (held, it waited for the
	 * idle timeout without a reply).
	 */
	if (size == 0 && s->bdat_err == SMTP_FAIL_NONE &&
	    s->esmtp && !(srv->ops.full && srv->ops.full(srv->sink)) &&
	    ((s->state == SMTP_S_RCPT &&
	      size <= srv->cfg.max_message_size &&
	      srv->ops.room(srv->sink) <
		      received_build(s, 0, smtp_now(srv))) ||
	     (s->state == SMTP_S_CHUNKING && s->fail == SMTP_FAIL_NONE &&
	      srv->ops.room(srv->sink) < s->hdr_len - s->hdr_off)))
		return false;

	s->bdat_size = s->bdat_left = size;
	s->bdat_last = last;
	s->bdat_err = SMTP_FAIL_NONE;
	s->bdat_prev = s->state;
	if (s->state != SMTP_S_CHUNKING)
		s->msg_t0_us = smtp_mono(srv); /* a message transfer starts */
	switch (s->state) {
	case SMTP_S_RCPT:
		if (!s->esmtp) {
			s->bdat_err = SMTP_FAIL_SEQUENCE;
		} else if (size > srv->cfg.max_message_size) {
			s->fail = SMTP_FAIL_SIZE;
		} else if ((err = msg_open(s)) == -EAGAIN) {
			/* Every spool buffer in flight: hold the command
			 * (nothing above changed what a retry sees). */
			return false;
		} else if (err != 0) {
			s->fail = err == -ENOSPC ? SMTP_FAIL_NOSPACE
						 : SMTP_FAIL_LOCAL;
		}
		break;
	case SMTP_S_CHUNKING:
		if (size > srv->cfg.max_message_size - s->body_size)
			msg_fail(s, SMTP_FAIL_SIZE);
		break;
	case SMTP_S_MAIL:
		s->bdat_err = s->rcpt_attempts ? SMTP_FAIL_NO_RCPT
					       : SMTP_FAIL_SEQUENCE;
		break;
	case SMTP_S_INIT:
	case SMTP_S_READY:
		s->bdat_err = SMTP_FAIL_SEQUENCE;
		break;
	case SMTP_S_FREE:
	case SMTP_S_GREET_WAIT:
	case SMTP_S_DATA:
	case SMTP_S_BDAT:
	case SMTP_S_COMMIT:
	case SMTP_S_TLS_WAIT:
	case SMTP_S_CLOSING:
		s->bdat_err = SMTP_FAIL_SEQUENCE; /* not reached: verb table */
		break;
	}
	smtp_enter_state(s, SMTP_S_BDAT);
	return true;
}

static void
bdat_chunk_end(struct smtp_session *s)
{
	enum smtp_fail e = s->bdat_err;

	if (e != SMTP_FAIL_NONE) {
		s->bdat_err = SMTP_FAIL_NONE;
		smtp_enter_state(s, s->bdat_prev);
		if (e == SMTP_FAIL_NO_RCPT)
			reply(s, "554 5.5.1 Error: no valid recipients");
		else
			error_reply(s, "503 5.5.1 Error: BDAT without a "
				       "valid MAIL/RCPT transaction");
		return;
	}
	if (s->fail != SMTP_FAIL_NONE) {
		msg_reject(s, s->fail);
		return;
	}
	if (!s->bdat_last) {
		smtp_enter_state(s, SMTP_S_CHUNKING);
		reply(s, "250 2.0.0 Ok: %" PRIu64 " octets received",
		      s->bdat_size);
		return;
	}
	msg_commit(s);
}

static bool
smtp_cmd_rset(struct smtp_session *s, const struct smtp_cmd *c)
{
	if (!check_no_arg(s, c, "RSET"))
		return true;
	txn_reset(s);
	if (s->state != SMTP_S_INIT)
		smtp_enter_state(s, SMTP_S_READY);
	reply(s, "250 2.0.0 Ok");
	return true;
}

static bool
smtp_cmd_noop(struct smtp_session *s, const struct smtp_cmd *c)
{
	(void)c; /* RFC 5321 4.1.1.9: an argument is allowed, ignored. */
	reply(s, "250 2.0.0 Ok");
	return true;
}

static bool
smtp_cmd_quit(struct smtp_session *s, const struct smtp_cmd *c)
{
	if (!check_no_arg(s, c, "QUIT"))
		return true;
	txn_reset(s);
	s->quit_seen = true;
	reply(s, "221 2.0.0 Bye");
	s->end_why = "quit";
	smtp_close_after(s);
	return true;
}

/*
 * RFC 3207. Not offered (no certificate): 502, as for any command we do not
 * implement. Offered: only after EHLO and outside a transaction (the
 * session is reset anyway, and a client that started a transaction in the
 * clear is confused), never twice.
 */
static bool
smtp_cmd_starttls(struct smtp_session *s, const struct smtp_cmd *c)
{
	if (!s->srv->cfg.starttls) {
		error_reply(s, "502 5.5.1 Error: command not implemented");
		return true;
	}
	if (s->tls) {
		error_reply(s, "503 5.5.1 Error: TLS already active");
		return true;
	}
	if (!check_no_arg(s, c, "STARTTLS"))
		return true;
	if (s->state == SMTP_S_INIT) {
		error_reply(s, "503 5.5.1 Error: send EHLO first");
		return true;
	}
	if (s->state != SMTP_S_READY) {
		error_reply(s, "503 5.5.1 Error: MAIL transaction in progress");
		return true;
	}
	txn_reset(s);
	s->srv->stats.tls_started++;
	reply(s, "220 2.0.0 Ready to start TLS");
	smtp_enter_state(s, SMTP_S_TLS_WAIT);
	return true;
}

static bool
smtp_cmd_vrfy(struct smtp_session *s, const struct smtp_cmd *c)
{
	if (c->arg_len == 0) {
		error_reply(s, "501 5.5.4 Syntax: VRFY address");
		return true;
	}
	/* RFC 5321 3.5.3: 252 when we will not say. */
	reply(s, "252 2.5.2 Cannot VRFY user, but will accept message and "
		 "attempt delivery");
	return true;
}

static bool
smtp_cmd_help(struct smtp_session *s, const struct smtp_cmd *c)
{
	(void)c;
	reply(s, "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET "
		 "NOOP QUIT VRFY HELP");
	return true;
}

static bool
smtp_cmd_not_implemented(struct smtp_session *s, const struct smtp_cmd *c)
{
	(void)c;
	error_reply(s, "502 5.5.1 Error: command not implemented");
	return true;
}

#define ST(x) (1u << SMTP_S_##x)
#define ST_CMD (ST(INIT) | ST(READY) | ST(MAIL) | ST(RCPT) | ST(CHUNKING))

/* The verbs, where each is allowed, and what it does (RFC 5321 4.1.4). */
static const struct smtp_verb smtp_verbs[SMTP_SUMMARY_VERBS] = {
	{"EHLO", ST_CMD, smtp_cmd_ehlo},
	{"HELO", ST_CMD, smtp_cmd_helo},
	{"MAIL", ST(READY), smtp_cmd_mail},
	{"RCPT", ST(MAIL) | ST(RCPT), smtp_cmd_rcpt},
	{"DATA", ST(MAIL) | ST(RCPT), smtp_cmd_data},
	{"BDAT", ST_CMD, smtp_cmd_bdat},
	{"RSET", ST_CMD, smtp_cmd_rset},
	{"NOOP", ST_CMD, smtp_cmd_noop},
	{"QUIT", ST_CMD, smtp_cmd_quit},
	{"VRFY", ST_CMD, smtp_cmd_vrfy},
	{"HELP", ST_CMD, smtp_cmd_help},
	{"EXPN", ST_CMD, smtp_cmd_not_implemented},
	{"STARTTLS", ST_CMD, smtp_cmd_starttls},
	{"AUTH", ST_CMD, smtp_cmd_not_implemented},
	{"TURN", ST_CMD, smtp_cmd_not_implemented},
	{"ETRN", ST_CMD, smtp_cmd_not_implemented},
};

static void
bad_sequence(struct smtp_session *s, const struct smtp_verb *v)
{
	const char *why;

	if (s->state == SMTP_S_INIT)
		why = "send HELO/EHLO first";
	else if (s->state == SMTP_S_CHUNKING)
		why = "only BDAT, RSET, NOOP, QUIT during BDAT transfer";
	else if (strcmp(v->name, "MAIL") == 0)
		why = "nested MAIL command";
	else
		why = "need MAIL command";
	error_reply(s, "503 5.5.1 Error: %s", why);
}

/* Execute the complete line. False: cannot now, hold it (no effect). */
static bool
smtp_execute(struct smtp_session *s)
{
	struct smtp_cmd c;
	const char *line;
	size_t len = smtp_line_content(&s->line, &line);
	enum smtp_parse_result r = smtp_parse_command(line, len, &c);
	const struct smtp_verb *v = NULL;

	if (r == SMTP_PARSE_ERR_CHAR) {
		s->srv->stats.commands++;
		s->cmd_n[SMTP_SUMMARY_VERBS]++;
		error_reply(s, "500 5.5.2 Error: bad character in command");
		return true;
	}
	if (r == SMTP_PARSE_OK) {
		for (size_t i = 0; i < FD_ARRAY_SIZE(smtp_verbs); i++) {
			if (strlen(smtp_verbs[i].name) == c.verb_len &&
			    strncasecmp(smtp_verbs[i].name, c.verb,
					c.verb_len) == 0) {
				v = &smtp_verbs[i];
				break;
			}
		}
	}
	if (!v) {
		s->srv->stats.commands++;
		s->cmd_n[SMTP_SUMMARY_VERBS]++;
		error_reply(s, "500 5.5.2 Error: command not recognized");
		return true;
	}
	fd_debug("smtp", "%016" PRIx64 " event=command verb=%s state=%s",
		 s->sid, v->name, smtp_state_name(s->state));
	size_t vi = (size_t)(v - smtp_verbs);
	if (!(v->states & (1u << s->state))) {
		s->srv->stats.commands++;
		s->cmd_n[vi]++;
		bad_sequence(s, v);
		return true;
	}
	s->last_code = 0;
	if (!v->fn(s, &c))
		return false;
	s->srv->stats.commands++;
	s->cmd_n[vi]++;
	/* A 2xx or 3xx to the command (a BDAT or DATA whose verdict comes
	 * later counts by its 354 or its acceptance of the chunk). */
	if (s->last_code >= 200 && s->last_code < 400)
		s->cmd_ok[vi]++;
	return true;
}

/* ---- input ---- */

static void
line_reset(struct smtp_session *s)
{
	smtp_line_reset(&s->line);
	smtp_line_set_max(&s->line, SMTP_PARAM_LINE_MAX);
	s->cmd_started = false;
}

static bool
step_command(struct smtp_session *s, const uint8_t *p, size_t n, size_t *off)
{
	size_t used;
	enum smtp_parse_result r;

	if (*off == n)
		return false;
	if (!s->cmd_started) {
		s->cmd_started = true;
		s->cmd_t0_us = smtp_mono(s->srv);
	}
	r = smtp_line_feed(&s->line, p + *off, n - *off, &used);
	*off += used;
	if (r == SMTP_PARSE_AGAIN)
		return false;
	/* p[*off] is the LF: consumed only once the line is executed. */
	if (out_free(s) < SMTP_OUT_RESERVE)
		return false;
	if (r == SMTP_PARSE_OK) {
		/* The reader took up to SMTP_PARAM_LINE_MAX: now the verb's
		 * own limit applies (512 for all but MAIL and RCPT). */
		const char *line;
		size_t len = smtp_line_content(&s->line, &line);
		if (smtp_line_wire_len(&s->line) > smtp_line_limit(line, len))
			r = SMTP_PARSE_ERR_TOO_LONG;
	}
	if (r == SMTP_PARSE_ERR_TOO_LONG) {
		s->srv->stats.commands++;
		error_reply(s, "500 5.5.2 Error: line too long");
	} else if (!smtp_execute(s)) {
		return false;
	}
	(*off)++;
	line_reset(s);
	return true;
}

static bool
step_data(struct smtp_session *s, const uint8_t *p, size_t n, size_t *off)
{
	struct smtp_data_run run;
	enum smtp_data_result r;
	size_t budget;

	/* RFC 5321 4.4: the trace header precedes the body. */
	if (*off == n || !header_flush(s))
		return false;
	budget = s->fail == SMTP_FAIL_NONE ? room_or_fail(s) : 0;
	if (s->fail != SMTP_FAIL_NONE)
		budget = SIZE_MAX; /* failed, before or now: read on, drop */
	r = smtp_data_scan(&s->data, p + *off, n - *off, budget, &run);
	*off += run.used;
	if (s->fail == SMTP_FAIL_NONE) {
		/* A new flag always comes with an empty run (smtp_data.h). */
		if (s->data.bare)
			msg_fail(s, SMTP_FAIL_BARE);
		else if (s->data.nul)
			msg_fail(s, SMTP_FAIL_NUL);
		else if (s->data.long_line)
			msg_fail(s, SMTP_FAIL_LONG_LINE);
	}
	body_append(s, run.p, run.len);
	switch (r) {
	case SMTP_DATA_CONTINUE:
		return true;
	case SMTP_DATA_AGAIN:
	case SMTP_DATA_BLOCKED:
		return false;
	case SMTP_DATA_END:
		msg_commit(s);
		return true;
	}
	return false;
}

static bool
step_bdat(struct smtp_session *s, const uint8_t *p, size_t n, size_t *off)
{
	bool keep = s->bdat_err == SMTP_FAIL_NONE;
	size_t take;

	if (keep && !header_flush(s))
		return false;
	if (s->bdat_left == 0) {
		bdat_chunk_end(s);
		return true;
	}
	if (*off == n)
		return false;
	take = (size_t)FD_MIN((uint64_t)(n - *off), s->bdat_left);
	if (keep && s->fail == SMTP_FAIL_NONE) {
		size_t room = room_or_fail(s);

		if (s->fail != SMTP_FAIL_NONE)
			goto skip; /* failed now: read on, drop */
		take = FD_MIN(take, room);
		if (take == 0)
			return false;
		/* A chunk is binary for the transfer (RFC 3030), but without
		 * BINARYMIME a NUL is not message content, and a next hop
		 * may strip it (see SMTP_FAIL_NUL). */
		if (memchr(p + *off, 0, take))
			msg_fail(s, SMTP_FAIL_NUL);
		else
			body_append(s, p + *off, take);
	}
skip:
	*off += take;
	s->bdat_left -= take;
	return true;
}

static void
early_talker(struct smtp_session *s)
{
	s->srv->stats.early_talkers++;
	fd_log(FD_LOG_INFO, "smtp", "%016" PRIx64 " event=early_talker",
	       s->sid);
	/* RFC 5321 3.1: 554 may replace the 220 greeting. */
	reply(s, "554 5.5.0 %.255s Error: SMTP protocol synchronization",
	      s->srv->cfg.hostname);
	s->end_why = "early_talker";
	smtp_close_after(s);
}

/*
 * The deadlines of cfg (see smtp.h), checked when input arrives: a client
 * that trickles octets never lets the idle timer fire, so the check sits
 * where its octets come in. True: exceeded, 421 4.4.2 queued, closing.
 */
static bool
deadline_passed(struct smtp_session *s)
{
	const struct smtp_config *cfg = &s->srv->cfg;
	uint64_t limit_ms, t0;
	const char *what;

	switch (s->state) {
	case SMTP_S_DATA:
	case SMTP_S_BDAT:
	case SMTP_S_CHUNKING:
		limit_ms = cfg->data_timeout_ms;
		t0 = s->msg_t0_us;
		what = "data";
		break;
	case SMTP_S_INIT:
	case SMTP_S_READY:
	case SMTP_S_MAIL:
	case SMTP_S_RCPT:
		if (!s->cmd_started)
			return false;
		limit_ms = cfg->command_timeout_ms;
		t0 = s->cmd_t0_us;
		what = "command";
		break;
	case SMTP_S_FREE:
	case SMTP_S_GREET_WAIT:
	case SMTP_S_COMMIT:
	case SMTP_S_TLS_WAIT:
	case SMTP_S_CLOSING:
	default:
		return false;
	}
	if (limit_ms == 0 || smtp_mono(s->srv) - t0 <= limit_ms * 1000)
		return false;
	s->srv->stats.timeouts++;
	fd_log(FD_LOG_INFO, "smtp",
	       "%016" PRIx64 " event=timeout reason=%s state=%s", s->sid, what,
	       smtp_state_name(s->state));
	txn_reset(s); /* aborts a message being received */
	reply(s, "421 4.4.2 %.255s Error: timeout exceeded",
	      s->srv->cfg.hostname);
	s->end_why = "timeout";
	smtp_close_after(s);
	return true;
}

size_t
smtp_session_input(struct smtp_session *s, const uint8_t *p, size_t n)
{
	size_t off = 0;
	bool more = true;

	if (n > 0 && deadline_passed(s))
		return 0;
	if (s->state == SMTP_S_GREET_WAIT) {
		if (n > 0)
			early_talker(s);
		return 0;
	}
	while (more) {
		switch (s->state) {
		case SMTP_S_INIT:
		case SMTP_S_READY:
		case SMTP_S_MAIL:
		case SMTP_S_RCPT:
		case SMTP_S_CHUNKING:
			more = step_command(s, p, n, &off);
			break;
		case SMTP_S_DATA:
			more = step_data(s, p, n, &off);
			break;
		case SMTP_S_BDAT:
			more = step_bdat(s, p, n, &off);
			break;
		case SMTP_S_TLS_WAIT:
			/* Pipelined behind STARTTLS: never a command. */
			if (off < n) {
				if (s->tls_discarded == 0) {
					s->srv->stats.tls_injected++;
					fd_log(FD_LOG_WARN, "smtp",
					       "%016" PRIx64
					       " event=starttls_pipelining "
					       "discarded=%zu",
					       s->sid, n - off);
				}
				s->tls_discarded += n - off;
				off = n;
			}
			more = false;
			break;
		case SMTP_S_FREE:
		case SMTP_S_GREET_WAIT:
		case SMTP_S_COMMIT:
		case SMTP_S_CLOSING:
			more = false;
			break;
		}
	}
	return off;
}

/* ---- commit completion: the one place that sends the 250 ---- */

void
smtp_session_commit_done(struct smtp_session *s, uint64_t msgid, int status)
{
	struct smtp_server *srv = s->srv;
	char id[FD_MSGID_TEXT_LEN + 1];

	if (s->state != SMTP_S_COMMIT) {
		fd_log(FD_LOG_ERR, "smtp",
		       "%016" PRIx64 " event=unexpected_commit_done state=%s",
		       s->sid, smtp_state_name(s->state));
		return;
	}
	s->msg = NULL; /* the sink is done with it */
	fd_msgid_format(msgid, id);
	if (status == 0) {
		/* RFC 1047: durable now, and only now, 250. */
		reply(s, "250 2.0.0 Ok: queued as %s", id);
		s->ack[s->n_ack % SMTP_ACKPOINTS] = (struct smtp_ackpoint){
			.msgid = msgid,
			.end = s->out_total + (s->out_tail - s->out_head),
		};
		s->n_ack++;
		s->gap_t0_ns = fd_now_monotonic_ns();
		s->gap_end = s->ack[(s->n_ack - 1) % SMTP_ACKPOINTS].end;
		srv->stats.messages_committed++;
		s->msgs_queued++;
		fd_log(FD_LOG_INFO, "smtp",
		       "%016" PRIx64 " event=queued id=%s size=%" PRIu64
		       " rcpts=%u",
		       s->sid, id, s->body_size, s->n_rcpts);
	} else {
		if (status == -ENOSPC)
			reply(s, "452 4.3.1 %.255s Error: insufficient "
				 "system storage",
			      srv->cfg.hostname);
		else
			reply(s, "451 4.3.0 %.255s Error: local error in "
				 "processing",
			      srv->cfg.hostname);
		srv->stats.messages_failed++;
		s->msgs_refused++;
		fd_log(FD_LOG_WARN, "smtp",
		       "%016" PRIx64 " event=commit_failed id=%s status=%d",
		       s->sid, id, status);
	}
	txn_reset(s);
	smtp_enter_state(s, SMTP_S_READY);
	if (s->shutdown_pending) {
		reply(s, "421 4.3.2 %.255s Service shutting down",
		      srv->cfg.hostname);
		s->end_why = "shutdown";
		smtp_close_after(s);
	} else if (s->timeout_pending) {
		reply(s, "421 4.4.2 %.255s Error: timeout exceeded",
		      srv->cfg.hostname);
		s->end_why = "timeout";
		smtp_close_after(s);
	}
}

/* ---- session life ---- */

void
smtp_session_greet(struct smtp_session *s)
{
	if (s->state != SMTP_S_GREET_WAIT)
		return;
	/* RFC 2034 3: the greeting carries no enhanced code. */
	reply(s, "220 %.255s ESMTP finaldot", s->srv->cfg.hostname);
	smtp_enter_state(s, SMTP_S_INIT);
}

/*
 * A 421 that ends the session (timeout, shutdown) can go out now, or must
 * wait for the commit in flight (its 250/451 first: *pending is set and
 * commit_done sends the 421), or has nothing to do (closing already).
 */
static bool
end_now(struct smtp_session *s, bool *pending)
{
	switch (s->state) {
	case SMTP_S_COMMIT:
		*pending = true;
		return false;
	case SMTP_S_FREE:
	case SMTP_S_CLOSING:
		return false;
	case SMTP_S_GREET_WAIT:
	case SMTP_S_INIT:
	case SMTP_S_READY:
	case SMTP_S_MAIL:
	case SMTP_S_RCPT:
	case SMTP_S_DATA:
	case SMTP_S_BDAT:
	case SMTP_S_CHUNKING:
	case SMTP_S_TLS_WAIT:
		break;
	}
	txn_reset(s);
	return true;
}

void
smtp_session_timeout(struct smtp_session *s)
{
	if (!end_now(s, &s->timeout_pending))
		return;
	s->srv->stats.timeouts++;
	fd_log(FD_LOG_INFO, "smtp",
	       "%016" PRIx64 " event=timeout reason=idle state=%s", s->sid,
	       smtp_state_name(s->state));
	reply(s, "421 4.4.2 %.255s Error: timeout exceeded",
	      s->srv->cfg.hostname);
	s->end_why = "timeout";
	smtp_close_after(s);
}

void
smtp_session_shutdown(struct smtp_session *s)
{
	if (!end_now(s, &s->shutdown_pending))
		return;
	reply(s, "421 4.3.2 %.255s Service shutting down",
	      s->srv->cfg.hostname);
	s->end_why = "shutdown";
	smtp_close_after(s);
}

void
smtp_session_shutdown_now(struct smtp_session *s)
{
	struct smtp_server *srv = s->srv;
	char id[FD_MSGID_TEXT_LEN + 1];

	if (s->state != SMTP_S_COMMIT) {
		smtp_session_shutdown(s);
		return;
	}
	/* No 250 can come from here: only the spool's completion may send
	 * it, and it has not come. The client hears 421 and retries. */
	srv->ops.detach(srv->sink, s->msg);
	s->msg = NULL;
	fd_msgid_format(s->msgid, id);
	fd_log(FD_LOG_WARN, "smtp",
	       "%016" PRIx64 " event=commit_abandoned id=%s reason=shutdown",
	       s->sid, id);
	smtp_enter_state(s, SMTP_S_READY);
	txn_reset(s);
	reply(s, "421 4.3.2 %.255s Service shutting down", srv->cfg.hostname);
	s->end_why = "shutdown";
	smtp_close_after(s);
}

bool
smtp_session_tls_wanted(const struct smtp_session *s)
{
	return s->state == SMTP_S_TLS_WAIT;
}

bool
smtp_session_tls_active(const struct smtp_session *s)
{
	return s->tls;
}

void
smtp_session_tls_ready(struct smtp_session *s, const char *desc)
{
	size_t i;

	if (s->state != SMTP_S_TLS_WAIT)
		return;
	/* RFC 3207 4.2: forget everything learned before TLS, the EHLO
	 * name included; the client must say EHLO again. */
	txn_reset(s);
	line_reset(s);
	s->helo_len = 0;
	s->helo[0] = '\0';
	s->esmtp = false;
	s->tls = true;
	for (i = 0; desc && desc[i] && i < SMTP_RECEIVED_TLS_MAX; i++)
		s->tls_desc[i] =
			desc[i] >= 0x20 && desc[i] < 0x7f && desc[i] != '\\'
				? desc[i]
				: '?';
	s->tls_desc[i] = '\0';
	s->srv->stats.tls_established++;
	smtp_enter_state(s, SMTP_S_INIT);
}

bool
smtp_session_want_close(const struct smtp_session *s)
{
	return s->state == SMTP_S_CLOSING;
}

bool
smtp_session_commit_pending(const struct smtp_session *s)
{
	return s->state == SMTP_S_COMMIT;
}

size_t
smtp_session_output(struct smtp_session *s, const uint8_t **p)
{
	*p = s->out + s->out_head;
	return s->out_tail - s->out_head;
}

void
smtp_session_output_done(struct smtp_session *s, size_t n)
{
	n = FD_MIN(n, s->out_tail - s->out_head);
	s->out_head += n;
	s->out_total += n;
	if (s->gap_t0_ns && s->out_total >= s->gap_end) {
		struct smtp_server *srv = s->srv;

		if (srv->gap_staged && srv->n_gap_stage < SMTP_GAP_STAGE)
			srv->gap_stage[srv->n_gap_stage++] = s->gap_t0_ns;
		else
			gap_record(srv, s->gap_t0_ns, fd_now_monotonic_ns());
		s->gap_t0_ns = 0;
	}
	if (s->out_head == s->out_tail)
		s->out_head = s->out_tail = 0;
}

unsigned
smtp_session_ackpoints(const struct smtp_session *s,
		       struct smtp_ackpoint *out)
{
	unsigned n = s->n_ack < SMTP_ACKPOINTS ? s->n_ack : SMTP_ACKPOINTS;

	for (unsigned i = 0; i < n; i++)
		out[i] = s->ack[(s->n_ack - n + i) % SMTP_ACKPOINTS];
	return n;
}

uint64_t
smtp_session_output_total(const struct smtp_session *s)
{
	return s->out_total;
}

bool
smtp_session_quit_seen(const struct smtp_session *s)
{
	return s->quit_seen;
}

void *
smtp_session_tctx(const struct smtp_session *s)
{
	return s->tctx;
}

uint64_t
smtp_session_id(const struct smtp_session *s)
{
	return s->sid;
}

struct smtp_session *
smtp_session_open(struct smtp_server *srv, void *tctx,
		  const char *client_addr, uint64_t sid)
{
	struct smtp_session *s = srv->free_list;
	const char **rcpts;
	char esc[SMTP_ADDR_MAX * 4];

	if (s) {
		srv->free_list = s->next_free;
	} else if (srv->n_fresh < srv->cfg.max_sessions) {
		size_t i = srv->n_fresh++;
		s = &srv->sessions[i];
		s->rcpts = srv->rcpt_slots + i * srv->rcpt_cap;
		s->orcpts = srv->orcpt_slots + i * srv->rcpt_cap;
		s->notify = srv->notify_slots + i * srv->rcpt_cap;
	} else {
		return NULL;
	}
	rcpts = s->rcpts;
	/* Only the fixed part; buffers are reset by their lengths. */
	memset(s, 0, offsetof(struct smtp_session, line));
	s->rcpts = rcpts;
	s->srv = srv;
	s->tctx = tctx;
	/* Unique across restarts: the transport's worker byte stays on top,
	 * its counter is offset by the server's start time in us. */
	s->sid = (sid & (0xffull << 56)) |
		 ((sid + srv->sid_epoch) & ((1ull << 56) - 1));
	s->open_mono_us = smtp_mono(srv);
	snprintf(s->client_addr, sizeof(s->client_addr), "%s",
		 client_addr ? client_addr : "");
	line_reset(s);
	s->out_head = s->out_tail = 0;
	s->msg = NULL;
	txn_reset(s);
	srv->stats.sessions++;
	fd_log(FD_LOG_INFO, "smtp", "%016" PRIx64 " event=connect client=%s",
	       sid,
	       fd_log_escape(esc, sizeof(esc), s->client_addr,
			     strlen(s->client_addr)));
	smtp_enter_state(s, SMTP_S_GREET_WAIT);
	if (!srv->cfg.greet_delay)
		smtp_session_greet(s);
	return s;
}

/*
 * One line per session, like Postfix's "disconnect" line, so that "what
 * happened to this client" is one grep: where from, who it said it was,
 * how long, what it sent (commands per verb, "rcpt=1/2" when only some got
 * a 2xx/3xx), messages queued and refused, TLS, and why it ended (quit,
 * timeout, errors, early_talker, shutdown; "lost" when the connection ended
 * without one of those, "closed" for a TLS failure or the like).
 */
static void
log_summary(const struct smtp_session *s)
{
	char cmds[SMTP_SUMMARY_VERBS * 24 + 32], helo[SMTP_LINE_MAX * 4],
		addr[SMTP_ADDR_MAX * 4], tls[SMTP_RECEIVED_TLS_MAX + 1];
	size_t k = 0;
	uint64_t ms = (smtp_mono(s->srv) - s->open_mono_us) / 1000;

	cmds[0] = '\0';
	for (size_t i = 0; i <= SMTP_SUMMARY_VERBS; i++) {
		char name[16];
		int r;
		if (!s->cmd_n[i])
			continue;
		snprintf(name, sizeof(name), "%s",
			 i < SMTP_SUMMARY_VERBS ? smtp_verbs[i].name : "unknown");
		for (char *c = name; *c; c++)
			*c = (char)(*c >= 'A' && *c <= 'Z' ? *c + 32 : *c);
		if (i < SMTP_SUMMARY_VERBS && s->cmd_ok[i] != s->cmd_n[i])
			r = snprintf(cmds + k, sizeof(cmds) - k, " %s=%u/%u",
				     name, s->cmd_ok[i], s->cmd_n[i]);
		else
			r = snprintf(cmds + k, sizeof(cmds) - k, " %s=%u",
				     name, s->cmd_n[i]);
		if (r > 0 && (size_t)r < sizeof(cmds) - k)
			k += (size_t)r;
	}
	/* "TLSv1.3 with cipher X (...)" -> "TLSv1.3/X" for a key=value. */
	snprintf(tls, sizeof(tls), "%s", s->tls ? s->tls_desc : "none");
	if (s->tls) {
		char *w = strstr(tls, " with cipher ");
		if (w) {
			char *e;
			memmove(w + 1, w + 13, strlen(w + 13) + 1);
			*w = '/';
			e = strchr(w, ' ');
			if (e)
				*e = '\0';
		}
	}
	fd_log(FD_LOG_INFO, "smtp",
	       "%016" PRIx64 " event=disconnect client=%s helo=%s "
	       "duration_ms=%" PRIu64 " messages=%u refused=%u tls=%s "
	       "end=%s state=%s errors=%u%s",
	       s->sid,
	       fd_log_escape(addr, sizeof(addr), s->client_addr,
			     strlen(s->client_addr)),
	       s->helo_len ? fd_log_escape(helo, sizeof(helo), s->helo,
					   s->helo_len)
			   : "-",
	       ms, s->msgs_queued, s->msgs_refused, tls,
	       s->end_why ? s->end_why
			  : s->state == SMTP_S_CLOSING ? "closed" : "lost",
	       smtp_state_name(s->state), s->errors, cmds);
}

void
smtp_session_close(struct smtp_session *s)
{
	struct smtp_server *srv = s->srv;

	if (s->state == SMTP_S_FREE)
		return;
	if (s->msg) {
		if (s->state == SMTP_S_COMMIT)
			srv->ops.detach(srv->sink, s->msg);
		else
			srv->ops.abort(srv->sink, s->msg);
		s->msg = NULL;
	}
	log_summary(s);
	free(s->ovf);
	s->ovf = NULL;
	s->ovf_cap = s->ovf_used = 0;
	smtp_enter_state(s, SMTP_S_FREE);
	s->next_free = srv->free_list;
	srv->free_list = s;
}

/* ---- server ---- */

void
smtp_config_defaults(struct smtp_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->hostname = "localhost";
	cfg->max_message_size = 33554432;
	cfg->max_recipients = 100;
	cfg->max_errors = 20;
	cfg->max_sessions = 1024;
	cfg->greet_delay = false;
	cfg->now_us = NULL;
	cfg->command_timeout_ms = 300000; /* RFC 5321 4.5.3.2.7 */
	cfg->data_timeout_ms = 600000;
	cfg->mono_us = NULL;
}

struct smtp_server *
smtp_server_create(const struct smtp_config *cfg,
		   const struct smtp_sink_ops *ops, void *sink)
{
	struct smtp_server *srv;
	int r;

	if (!cfg || !ops || cfg->max_sessions == 0 || !cfg->hostname ||
	    (cfg->n_domains && !cfg->domains))
		return NULL;
	srv = calloc(1, sizeof(*srv));
	if (!srv)
		return NULL;
	srv->cfg = *cfg;
	/* A test clock keeps ids as given (reproducible logs). */
	srv->sid_epoch = cfg->now_us ? 0 : fd_now_realtime_us();
	if (srv->cfg.max_recipients == 0)
		srv->cfg.max_recipients = 1;
	srv->rcpt_cap = srv->cfg.max_recipients;
	srv->ops = *ops;
	srv->sink = sink;
	srv->sessions = calloc(cfg->max_sessions, sizeof(*srv->sessions));
	if (!srv->sessions)
		goto out_free_srv;
	srv->rcpt_slots = calloc((size_t)cfg->max_sessions *
					 srv->cfg.max_recipients,
				 sizeof(*srv->rcpt_slots));
	if (!srv->rcpt_slots)
		goto out_free_sessions;
	srv->orcpt_slots = calloc((size_t)cfg->max_sessions *
					  srv->cfg.max_recipients,
				  sizeof(*srv->orcpt_slots));
	if (!srv->orcpt_slots)
		goto out_free_rcpt_slots;
	srv->notify_slots = calloc((size_t)cfg->max_sessions *
					   srv->cfg.max_recipients,
				   sizeof(*srv->notify_slots));
	if (!srv->notify_slots)
		goto out_free_orcpt_slots;
	r = snprintf(srv->busy, sizeof(srv->busy),
		     "421 4.7.0 %.255s Too many connections, try again "
		     "later\r\n",
		     cfg->hostname);
	srv->busy_len = r > 0 ? (size_t)r : 0;
	return srv;

out_free_orcpt_slots:
	free(srv->orcpt_slots);
out_free_rcpt_slots:
	free(srv->rcpt_slots);
out_free_sessions:
	free(srv->sessions);
out_free_srv:
	free(srv);
	return NULL;
}

void
smtp_server_destroy(struct smtp_server *srv)
{
	if (!srv)
		return;
	for (unsigned i = 0; i < srv->n_fresh; i++)
		smtp_session_close(&srv->sessions[i]);
	free(srv->notify_slots);
	free(srv->orcpt_slots);
	free(srv->rcpt_slots);
	free(srv->sessions);
	free(srv);
}

void
smtp_server_set_policy(struct smtp_server *srv, const char *const *domains,
		       unsigned n_domains, uint64_t max_message_size,
		       unsigned max_recipients, unsigned max_errors,
		       uint64_t command_timeout_ms, uint64_t data_timeout_ms,
		       bool greet_delay)
{
	srv->cfg.domains = domains;
	srv->cfg.n_domains = n_domains;
	srv->cfg.max_message_size = max_message_size;
	srv->cfg.max_recipients = max_recipients == 0 ? 1
				  : max_recipients > srv->rcpt_cap
					  ? srv->rcpt_cap
					  : max_recipients;
	srv->cfg.max_errors = max_errors;
	srv->cfg.command_timeout_ms = command_timeout_ms;
	srv->cfg.data_timeout_ms = data_timeout_ms;
	srv->cfg.greet_delay = greet_delay;
}

const struct smtp_stats *
smtp_server_stats(const struct smtp_server *srv)
{
	return &srv->stats;
}

void
smtp_server_gap_staged(struct smtp_server *srv, bool on)
{
	smtp_server_gap_settle(srv);
	srv->gap_staged = on;
}

void
smtp_server_gap_settle(struct smtp_server *srv)
{
	uint64_t now;

	if (!srv->n_gap_stage)
		return;
	now = fd_now_monotonic_ns();
	for (unsigned i = 0; i < srv->n_gap_stage; i++)
		gap_record(srv, srv->gap_stage[i], now);
	srv->n_gap_stage = 0;
}

const char *
smtp_busy_reply(const struct smtp_server *srv, size_t *len)
{
	*len = srv->busy_len;
	return srv->busy;
}
