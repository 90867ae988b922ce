/*
 * A fake spool for the SMTP engine's tests and fuzzers. It records every
 * call as a log ("[B]" begin, body octets as appended, "[C]" commit, "[X]"
 * abort, "[D]" detach), so two runs can be compared byte for byte, and it
 * checks the sink contract: append only within room(), only on an open
 * message, nothing after commit/abort. room() gives what is left of
 * room_cap since the last td_harvest() (like a spool batch), or unlimited.
 *
 * A driver (struct td) feeds a session the way a transport does: offers
 * the unconsumed bytes again, drains output after every call, and
 * completes commits (when auto_commit) as the spool's callback would.
 */
#ifndef SMTP_TEST_SINK_H
#define SMTP_TEST_SINK_H

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "smtp/smtp.h"

struct tbuf {
	char *p;
	size_t len, cap;
};

static inline void
tbuf_put(struct tbuf *b, const void *p, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		while (cap < b->len + n + 1)
			cap *= 2;
		b->p = realloc(b->p, cap);
		if (!b->p)
			abort();
		b->cap = cap;
	}
	memcpy(b->p + b->len, p, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static inline void
tbuf_free(struct tbuf *b)
{
	free(b->p);
	memset(b, 0, sizeof(*b));
}

struct fake_msg {
	int state; /* 1 open, 2 committed, 3 aborted, 4 detached */
	uint64_t id;
	void *sctx;
};

struct fake_sink {
	size_t room_cap;  /* 0: unlimited */
	size_t room_left; /* reset by td_harvest() */
	bool full;        /* room 0 for good: the sink's disk is full */
	int begin_err;    /* begin fails with it when != 0 */
	int append_err;
	int commit_err;
	uint64_t next_id;
	unsigned begins, appends, commits, aborts, detaches;
	unsigned violations; /* contract breaches seen */
	struct fake_msg msgs[64];
	unsigned n_msgs;
	struct fake_msg *pending; /* committed, callback not yet run */
	struct tbuf log;
	struct tbuf body; /* the current (last begun) message's octets */
	/* Copy of the last envelope. */
	char mail_from[300], rcpt0[300], helo[600], proto[16], client[64];
	unsigned n_rcpts;
	enum fd_body_type body_type;
	bool smtputf8;
	uint64_t size_param, arrival_us;
	/* DSN (RFC 3461): the first FS_DSN_RCPTS recipients' parameters. */
	char envid[128];
	enum fd_dsn_ret ret;
	bool has_notify, has_orcpts;
	uint8_t notify[4];
	char orcpt[4][520];
	char rcpt_last[300], orcpt_last[520]; /* the last recipient's */
};
#define FS_DSN_RCPTS 4

static inline void *
fs_begin(void *sink, const struct fd_envelope *env, void *sctx,
	 uint64_t *msgid, int *err)
{
	struct fake_sink *fs = sink;
	struct fake_msg *m;

	if (fs->begin_err) {
		*err = fs->begin_err;
		return NULL;
	}
	if (fs->n_msgs == 64)
		fs->n_msgs = 0; /* recycle: old ones are closed by now */
	m = &fs->msgs[fs->n_msgs++];
	m->state = 1;
	m->id = ++fs->next_id;
	m->sctx = sctx;
	*msgid = m->id;
	fs->begins++;
	snprintf(fs->mail_from, sizeof(fs->mail_from), "%s", env->mail_from);
	snprintf(fs->rcpt0, sizeof(fs->rcpt0), "%s",
		 env->n_rcpts ? env->rcpts[0] : "");
	snprintf(fs->helo, sizeof(fs->helo), "%s", env->helo);
	snprintf(fs->proto, sizeof(fs->proto), "%s", env->proto);
	snprintf(fs->client, sizeof(fs->client), "%s", env->client_addr);
	fs->n_rcpts = env->n_rcpts;
	fs->body_type = env->body;
	fs->smtputf8 = env->smtputf8;
	fs->size_param = env->size_param;
	fs->arrival_us = env->arrival_us;
	if (!env->envid)
		fs->violations++; /* the engine always sets it */
	snprintf(fs->envid, sizeof(fs->envid), "%s",
		 env->envid ? env->envid : "");
	fs->ret = env->ret;
	fs->has_notify = env->notify != NULL;
	fs->has_orcpts = env->orcpts != NULL;
	for (unsigned i = 0; i < FS_DSN_RCPTS; i++) {
		bool in = i < env->n_rcpts;
		fs->notify[i] = in && env->notify ? env->notify[i] : 0;
		snprintf(fs->orcpt[i], sizeof(fs->orcpt[i]), "%s",
			 in && env->orcpts ? env->orcpts[i] : "");
		if (in && env->orcpts && !env->orcpts[i])
			fs->violations++;
	}
	snprintf(fs->rcpt_last, sizeof(fs->rcpt_last), "%s",
		 env->n_rcpts ? env->rcpts[env->n_rcpts - 1] : "");
	snprintf(fs->orcpt_last, sizeof(fs->orcpt_last), "%s",
		 env->n_rcpts && env->orcpts ? env->orcpts[env->n_rcpts - 1]
					     : "");
	if (env->n_rcpts == 0 || !env->mail_from)
		fs->violations++;
	fs->body.len = 0;
	tbuf_put(&fs->log, "[B]", 3);
	return m;
}

static inline size_t
fs_room(void *sink)
{
	struct fake_sink *fs = sink;

	return fs->room_cap ? fs->room_left : SIZE_MAX / 2;
}

static inline bool
fs_full(void *sink)
{
	struct fake_sink *fs = sink;

	return fs->full;
}

static inline int
fs_append(void *sink, void *msg, const void *p, size_t n)
{
	struct fake_sink *fs = sink;
	struct fake_msg *m = msg;

	if (m->state != 1 || n == 0 || n > fs_room(sink))
		fs->violations++;
	if (fs->append_err)
		return fs->append_err;
	if (fs->room_cap)
		fs->room_left -= n;
	fs->appends++;
	tbuf_put(&fs->log, p, n);
	tbuf_put(&fs->body, p, n);
	return 0;
}

static inline int
fs_commit(void *sink, void *msg)
{
	struct fake_sink *fs = sink;
	struct fake_msg *m = msg;

	if (m->state != 1 || fs->pending)
		fs->violations++;
	if (fs->commit_err)
		return fs->commit_err;
	m->state = 2;
	fs->commits++;
	fs->pending = m;
	tbuf_put(&fs->log, "[C]", 3);
	return 0;
}

static inline void
fs_abort(void *sink, void *msg)
{
	struct fake_sink *fs = sink;
	struct fake_msg *m = msg;

	if (m->state != 1)
		fs->violations++;
	m->state = 3;
	fs->aborts++;
	tbuf_put(&fs->log, "[X]", 3);
}

static inline void
fs_detach(void *sink, void *msg)
{
	struct fake_sink *fs = sink;
	struct fake_msg *m = msg;

	if (m->state != 2 || fs->pending != m)
		fs->violations++;
	m->state = 4;
	fs->detaches++;
	fs->pending = NULL;
	tbuf_put(&fs->log, "[D]", 3);
}

__attribute__((unused)) static const struct smtp_sink_ops fs_ops = {
	.begin = fs_begin,
	.append = fs_append,
	.commit = fs_commit,
	.abort = fs_abort,
	.detach = fs_detach,
	.room = fs_room,
	.full = fs_full,
};

/* ---- driver ---- */

__attribute__((unused)) static const char *const td_domains[] = {"example.com", "example.org"};

static inline uint64_t
td_clock(void)
{
	return 1700000000000000ull; /* Tue, 14 Nov 2023 22:13:20 +0000 */
}

static inline void
td_config(struct smtp_config *cfg)
{
	smtp_config_defaults(cfg);
	cfg->hostname = "mx.example.com";
	cfg->domains = td_domains;
	cfg->n_domains = 2;
	cfg->max_sessions = 4;
	cfg->now_us = td_clock;
}

struct td {
	struct fake_sink fs;
	struct smtp_server *srv;
	struct smtp_session *s;
	struct tbuf out;
	bool auto_commit;  /* complete a commit as soon as it is pending */
	int commit_status; /* what auto_commit reports */
	bool no_drain;     /* leave output in the session */
	unsigned stalls;
};

static inline void
td_drain(struct td *t)
{
	const uint8_t *p;
	size_t n;

	if (t->no_drain)
		return;
	n = smtp_session_output(t->s, &p);
	tbuf_put(&t->out, p, n);
	smtp_session_output_done(t->s, n);
}

/* The spool harvested its completions: fresh room, run the callback. */
static inline void
td_harvest(struct td *t)
{
	t->fs.room_left = t->fs.room_cap;
	if (t->auto_commit && t->fs.pending) {
		struct fake_msg *m = t->fs.pending;
		t->fs.pending = NULL;
		smtp_session_commit_done(m->sctx, m->id, t->commit_status);
	}
}

static inline bool
td_open(struct td *t, const struct smtp_config *cfg, const char *addr)
{
	memset(t, 0, sizeof(*t));
	t->auto_commit = true;
	t->srv = smtp_server_create(cfg, &fs_ops, &t->fs);
	if (!t->srv)
		return false;
	t->s = smtp_session_open(t->srv, t, addr ? addr : "192.0.2.1", 42);
	if (!t->s)
		return false;
	td_drain(t);
	return true;
}

static inline void
td_close(struct td *t)
{
	if (t->s)
		smtp_session_close(t->s);
	t->s = NULL;
	smtp_server_destroy(t->srv);
	t->srv = NULL;
	tbuf_free(&t->out);
	tbuf_free(&t->fs.log);
	tbuf_free(&t->fs.body);
}

/*
 * Offer p[0..n) until all of it is consumed, the session closes, or it
 * stalls (a commit pending without auto_commit, output not drained).
 * Returns the octets consumed.
 */
static inline size_t
td_feed(struct td *t, const void *p, size_t n)
{
	const uint8_t *b = p;
	size_t off = 0;
	unsigned idle = 0;

	while (off < n && !smtp_session_want_close(t->s)) {
		size_t log_len = t->fs.log.len, out_len = t->out.len;
		size_t used = smtp_session_input(t->s, b + off, n - off);
		off += used;
		td_drain(t);
		/* Progress: input consumed, or header octets / replies out. */
		if (used == 0 && log_len == t->fs.log.len &&
		    out_len == t->out.len) {
			if (++idle > 2) {
				t->stalls++;
				break;
			}
		} else {
			idle = 0;
		}
		td_harvest(t);
		td_drain(t);
	}
	return off;
}

static inline size_t
td_feeds(struct td *t, const char *s)
{
	return td_feed(t, s, strlen(s));
}

static inline unsigned
count_str(const char *hay, const char *needle)
{
	unsigned n = 0;
	size_t l = strlen(needle);

	for (const char *p = hay ? strstr(hay, needle) : NULL; p;
	     p = strstr(p + l, needle))
		n++;
	return n;
}

#endif
