/*
 * The control socket's server (ctlsock.h; the protocol is
 * docs/control-protocol.md).
 *
 * One thread, one poll() loop: the listener, a wake-up eventfd (stop), and
 * up to CTL_MAX_CLIENTS clients, every socket non-blocking. A client sends
 * requests, one JSON object per line; they are answered in order, one at a
 * time: the next line is not read while a reply is still streaming (queue
 * list) or while more than CTL_OUT_HIGH bytes wait to be sent to it, so a
 * client that does not read costs the daemon at most that much memory and
 * holds up nobody else. Every reply ends with exactly one line that has an
 * "ok" member; streaming replies send "item"/"chunk" lines before it.
 * A streaming reply is resumable: the client keeps a cursor (queue.list:
 * its position in the queue; queue.cat: the open message and its offset)
 * and the next part is produced only once the output has drained below
 * CTL_OUT_HIGH, so a reply of any size costs a few chunks of memory.
 *
 * The queue is only reached through cplane.h's operator API. Its callbacks
 * run on the queue manager's thread while this thread waits in cp_call(),
 * and only append to the client's output buffer (memory, never a socket).
 * queue.cat's bytes are read here, not there (cp_queue_cat_read()): the
 * queue manager only pins the message's segments for the read.
 *
 * A request that cannot be parsed, names an unknown command or argument,
 * or gives a bad value gets an error reply and the connection goes on; a
 * line longer than CTL_MAX_LINE gets an error and the connection is closed
 * (the rest of that line cannot be told from the next request).
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "cplane.h"
#include "ctljson.h"
#include "ctlsock.h"
#include "dlog.h"
#include "finaldot/config.h"
#include "finaldot/log.h"
#include "finaldot/msgid.h"

#define CTL_OUT_HIGH (256u * 1024u) /* stop producing for a client above */
#define CTL_LIST_CHUNK 256          /* messages per cp_queue_list() call */
#define CTL_CAT_PIECE (48u * 1024u) /* raw bytes per queue.cat chunk line */
#define CTL_OUT_LIMIT ((size_t)512 << 20)

struct ctl_client {
	int fd;
	bool in_use;
	bool eof;        /* the peer sent EOF: answer what came, then close */
	bool closing;    /* close once the output is sent */
	uid_t uid;       /* SO_PEERCRED, for the log */
	char *in;
	size_t in_len, in_cap;
	struct ctl_jw out;
	size_t out_off;  /* bytes of out already sent */
	uint64_t last_us;
	/* a queue.list being streamed */
	bool listing;
	uint64_t cursor, count;
	char f_state[16], f_from[256], f_to[256];
	/* a queue.cat being streamed: its segments stay pinned until
	 * cat_end() (or client_close()) gives cat back */
	struct cp_cat *cat;
	uint64_t cat_id, cat_sent;
};

#define ACCEPT_PAUSE_US 100000u /* after a failed accept4() */

struct ctl_server {
	struct ctl_sources src;
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	ino_t ino;       /* of our socket file: only that one is removed */
	int lfd;
	int wake_fd;
	pthread_t thr;
	atomic_bool stop;
	/* accept4() failed (EMFILE...): the listener stays readable with the
	 * connection still queued, so it is left out of poll() until then,
	 * or the thread would spin */
	uint64_t accept_pause_until_us;
	uint64_t accept_errors, accept_logged_us;
	struct ctl_client cl[CTL_MAX_CLIENTS];
	struct ctl_json_tok *tok;
	uint32_t tok_cap;
	uint8_t cat_buf[CTL_CAT_PIECE]; /* one piece at a time, any client */
};

enum ctl_err {
	E_BAD_JSON,
	E_BAD_REQUEST,
	E_UNKNOWN_COMMAND,
	E_UNKNOWN_ID,
	E_TOO_LONG,
	E_BUSY,
	E_SHUTTING_DOWN,
	E_DAMAGED,
	E_NOT_SUPPORTED,
	E_FAILED,
};

static const char *
err_code(enum ctl_err e)
{
	switch (e) {
	case E_BAD_JSON: return "bad_json";
	case E_BAD_REQUEST: return "bad_request";
	case E_UNKNOWN_COMMAND: return "unknown_command";
	case E_UNKNOWN_ID: return "unknown_id";
	case E_TOO_LONG: return "too_long";
	case E_BUSY: return "busy";
	case E_SHUTTING_DOWN: return "shutting_down";
	case E_DAMAGED: return "damaged";
	case E_NOT_SUPPORTED: return "not_supported";
	case E_FAILED: return "failed";
	}
	return "failed";
}

/* ---- replies ---------------------------------------------------------- */

static void
iso8601(uint64_t us, char *buf, size_t len)
{
	time_t t = (time_t)(us / 1000000u);
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static void
jw_time(struct ctl_jw *w, const char *key, uint64_t us)
{
	char t[40];

	ctl_jw_key(w, key);
	if (!us) {
		ctl_jw_null(w);
		return;
	}
	iso8601(us, t, sizeof(t));
	ctl_jw_str(w, t);
}

static void
jw_id(struct ctl_jw *w, const char *key, uint64_t id)
{
	char t[FD_MSGID_TEXT_LEN + 1];

	ctl_jw_kstr(w, key, fd_msgid_format(id, t));
}

/* {"ok":true,"data": ... then the caller's value, then ok_end(). */
static void
ok_begin(struct ctl_jw *w)
{
	ctl_jw_obj(w);
	ctl_jw_kbool(w, "ok", true);
	ctl_jw_key(w, "data");
}

static void
ok_end(struct ctl_jw *w)
{
	ctl_jw_obj_end(w);
	ctl_jw_nl(w);
}

/* The error object, without closing the reply (data may follow). */
__attribute__((format(printf, 3, 0))) static void
err_vbegin(struct ctl_jw *w, enum ctl_err e, const char *fmt, va_list ap)
{
	char msg[512];

	vsnprintf(msg, sizeof(msg), fmt, ap);
	ctl_jw_obj(w);
	ctl_jw_kbool(w, "ok", false);
	ctl_jw_key(w, "error");
	ctl_jw_obj(w);
	ctl_jw_kstr(w, "code", err_code(e));
	ctl_jw_kstr(w, "message", msg);
	ctl_jw_obj_end(w);
}

__attribute__((format(printf, 3, 4))) static int
reply_err(struct ctl_client *c, enum ctl_err e, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	err_vbegin(&c->out, e, fmt, ap);
	va_end(ap);
	ok_end(&c->out);
	return -1;
}

/* A cp_* error as a reply. */
static int
reply_cp_err(struct ctl_client *c, const char *what, int r)
{
	if (r == -ESHUTDOWN)
		return reply_err(c, E_SHUTTING_DOWN, "%s: the daemon is "
				 "stopping", what);
	if (r == -ENOENT)
		return reply_err(c, E_UNKNOWN_ID, "%s: no such message in "
				 "the queue", what);
	if (r == -EIO)
		return reply_err(c, E_DAMAGED, "%s: the stored message is "
				 "damaged (checksum mismatch)", what);
	if (r == -ENOTRECOVERABLE)
		return reply_err(c, E_FAILED, "%s: the delivery log failed, "
				 "nothing can be recorded until finaldot is "
				 "restarted", what);
	return reply_err(c, E_FAILED, "%s: %s", what, strerror(r < 0 ? -r
								   : EIO));
}

/* ---- requests ------------------------------------------------------- */

struct req {
	struct ctl_json j;
	const char *cmd;
	int args;       /* the args object's token, or -1 */
};

/* Argument name as a string (1), absent (0), or a bad value: an error
 * reply was written (-1). buf is "" unless 1: a buffer that outlives the
 * request (queue.list's filters) kept the last request's value, and a
 * plain queue.list after a filtered one on the same connection listed
 * with the old filter. */
static int
arg_str(struct ctl_client *c, const struct req *rq, const char *name,
	char *buf, size_t n)
{
	int t = rq->args >= 0 ? ctl_json_get(&rq->j, (uint32_t)rq->args, name)
			      : -1;
	long r;

	if (n)
		buf[0] = '\0';
	if (t < 0)
		return 0;
	r = ctl_json_string(&rq->j, (uint32_t)t, buf, n);
	if (r < 0 && n)
		buf[0] = '\0';
	if (r == -ENOSPC)
		return reply_err(c, E_BAD_REQUEST, "%s: %s is too long",
				 rq->cmd, name);
	if (r < 0)
		return reply_err(c, E_BAD_REQUEST, "%s: %s must be a string",
				 rq->cmd, name);
	return 1;
}

static int
arg_bool(struct ctl_client *c, const struct req *rq, const char *name,
	 bool *v)
{
	int t = rq->args >= 0 ? ctl_json_get(&rq->j, (uint32_t)rq->args, name)
			      : -1;

	if (t < 0)
		return 0;
	if (!ctl_json_bool(&rq->j, (uint32_t)t, v))
		return reply_err(c, E_BAD_REQUEST, "%s: %s must be true or "
				 "false", rq->cmd, name);
	return 1;
}

static int
arg_id(struct ctl_client *c, const struct req *rq, uint64_t *id)
{
	char t[64];
	int r = arg_str(c, rq, "id", t, sizeof(t));

	if (r < 0)
		return -1;
	if (r == 0)
		return reply_err(c, E_BAD_REQUEST, "%s: needs an id",
				 rq->cmd);
	if (!fd_msgid_parse(t, id))
		return reply_err(c, E_BAD_REQUEST, "%s: \"%.40s\" is not a "
				 "queue id (16 hex digits)", rq->cmd, t);
	return 0;
}

/* "ids": an array of queue ids, into a malloc'd array (*n of them; NULL
 * when absent). 1 present, 0 absent, -1 error written. */
static int
arg_ids(struct ctl_client *c, const struct req *rq, uint64_t **ids,
	size_t *n)
{
	int t = rq->args >= 0 ? ctl_json_get(&rq->j, (uint32_t)rq->args, "ids")
			      : -1;
	const struct ctl_json_tok *a;
	uint32_t k;

	*ids = NULL;
	*n = 0;
	if (t < 0)
		return 0;
	a = &rq->j.tok[t];
	if (a->type != CTL_JSON_ARRAY)
		return reply_err(c, E_BAD_REQUEST, "%s: ids must be an array "
				 "of queue ids", rq->cmd);
	if (a->count == 0)
		return reply_err(c, E_BAD_REQUEST, "%s: ids is empty (use "
				 "\"all\": true for every message)", rq->cmd);
	if (!(*ids = calloc(a->count, sizeof(**ids))))
		return reply_err(c, E_FAILED, "%s: out of memory", rq->cmd);
	k = ctl_json_child((uint32_t)t);
	for (uint32_t i = 0; i < a->count; i++) {
		char s[64];
		if (ctl_json_string(&rq->j, k, s, sizeof(s)) < 0 ||
		    !fd_msgid_parse(s, &(*ids)[i])) {
			free(*ids);
			*ids = NULL;
			return reply_err(c, E_BAD_REQUEST, "%s: ids[%u] is not "
					 "a queue id (16 hex digits)",
					 rq->cmd, i);
		}
		k = ctl_json_next(&rq->j, k);
	}
	*n = a->count;
	return 1;
}

/* ---- status ----------------------------------------------------------- */

static void
jw_worker(struct ctl_jw *w, const struct ctl_worker_stats *s)
{
	ctl_jw_ku64(w, "sessions", s->conns_current);
	ctl_jw_ku64(w, "sessions_total", s->sessions);
	ctl_jw_ku64(w, "messages", s->messages);
	ctl_jw_ku64(w, "bytes", s->message_bytes);
	ctl_jw_ku64(w, "flushes", s->flushes);
	/* The spool disk's durable writes since the start, submission to
	 * completion: what every final dot waits for. */
	ctl_jw_ku64(w, "flush_mean_us",
		    fd_lat_mean_us(s->flush_lat_sum_ns,
				   s->batches - s->unflushed));
	ctl_jw_ku64(w, "failed", s->failed);
	ctl_jw_ku64(w, "rejected", s->rejected);
	ctl_jw_ku64(w, "refused_busy", s->refused_busy);
	ctl_jw_ku64(w, "refused_paused", s->refused_paused);
	/* DPDK only: where the busy-polled lcore's time went. */
	if (s->lcore_busy_ns || s->lcore_idle_ns) {
		ctl_jw_ku64(w, "lcore_busy_us", s->lcore_busy_ns / 1000u);
		ctl_jw_ku64(w, "lcore_idle_us", s->lcore_idle_ns / 1000u);
	}
}

static int
cmd_status(struct ctl_server *sv, struct ctl_client *c, struct req *rq)
{
	const struct ctl_sources *src = &sv->src;
	struct ctl_worker_stats ws, tot;
	struct cp_stats cs;
	struct ctl_jw *w = &c->out;
	uint64_t now = fd_now_realtime_us();
	bool paused = src->paused && atomic_load(src->paused);

	(void)rq;
	memset(&cs, 0, sizeof(cs));
	if (src->cp)
		cp_get_stats(src->cp, &cs);
	ok_begin(w);
	ctl_jw_obj(w);
	ctl_jw_kstr(w, "version", src->version);
	ctl_jw_ku64(w, "pid", (uint64_t)getpid());
	ctl_jw_kstr(w, "hostname", src->hostname);
	ctl_jw_kstr(w, "transport", src->transport);
	jw_time(w, "started", src->started_us);
	ctl_jw_ku64(w, "uptime_s", now > src->started_us
					   ? (now - src->started_us) / 1000000u
					   : 0);
	ctl_jw_kstr(w, "listener", paused ? "paused" : "accepting");
	ctl_jw_key(w, "listen");
	ctl_jw_arr(w);
	for (unsigned i = 0; i < src->n_listen; i++)
		ctl_jw_str(w, src->listen[i]);
	ctl_jw_arr_end(w);
	ctl_jw_key(w, "workers");
	ctl_jw_arr(w);
	for (unsigned i = 0; i < src->n_workers; i++) {
		memset(&ws, 0, sizeof(ws));
		if (src->worker_stats)
			src->worker_stats(src->worker_ctx, i, &ws);
		ctl_jw_obj(w);
		ctl_jw_ku64(w, "id", i);
		jw_worker(w, &ws);
		ctl_jw_obj_end(w);
	}
	ctl_jw_arr_end(w);
	ctl_sources_totals(src, &tot);
	ctl_jw_key(w, "totals");
	ctl_jw_obj(w);
	jw_worker(w, &tot);
	ctl_jw_obj_end(w);
	ctl_jw_key(w, "queue");
	ctl_jw_obj(w);
	ctl_jw_ku64(w, "queued", cs.active + cs.deferred + cs.held);
	ctl_jw_ku64(w, "active", cs.active);
	ctl_jw_ku64(w, "deferred", cs.deferred);
	ctl_jw_ku64(w, "held", cs.held);
	ctl_jw_ku64(w, "in_memory", cs.messages);
	ctl_jw_ku64(w, "segments", cs.segments);
	ctl_jw_obj_end(w);
	ctl_jw_key(w, "delivery");
	ctl_jw_obj(w);
	ctl_jw_ku64(w, "queued_total", cs.queued_total);
	ctl_jw_ku64(w, "delivered_total", cs.delivered_total);
	ctl_jw_ku64(w, "deferred_total", cs.deferred_total);
	ctl_jw_ku64(w, "bounced_total", cs.bounced_total);
	ctl_jw_ku64(w, "expired_total", cs.expired_total);
	ctl_jw_ku64(w, "dsn_sent_total", cs.dsn_sent_total);
	ctl_jw_ku64(w, "dsn_dropped_total", cs.dsn_dropped_total);
	ctl_jw_ku64(w, "reclaimed_total", cs.reclaimed_total);
	ctl_jw_ku64(w, "moved_total", cs.moved_total);
	ctl_jw_ku64(w, "move_failed_total", cs.move_failed_total);
	ctl_jw_ku64(w, "indoubt_total", cs.indoubt_total);
	ctl_jw_ku64(w, "suppressed_total", cs.suppressed_total);
	ctl_jw_ku64(w, "log_error", cs.log_error);
	ctl_jw_ku64(w, "log_no_space", cs.log_no_space);
	ctl_jw_obj_end(w);
	ctl_jw_obj_end(w);
	ok_end(w);
	return 0;
}

/* ---- the queue ------------------------------------------------------ */

/* One message as JSON; full: queue.show's extra fields. */
static void
jw_msg(struct ctl_jw *w, const struct cp_msg_view *v, bool full)
{
	char t[40], id[FD_MSGID_TEXT_LEN + 1];

	ctl_jw_obj(w);
	jw_id(w, "id", v->id);
	iso8601(v->arrival_us, t, sizeof(t));
	ctl_jw_kstr(w, "arrival", t);
	ctl_jw_ku64(w, "arrival_time", v->arrival_us / 1000000u);
	ctl_jw_ku64(w, "size", v->size);
	ctl_jw_kstr(w, "sender", v->sender);
	ctl_jw_kstr(w, "state", v->state);
	ctl_jw_kbool(w, "held", v->held);
	if (full) {
		ctl_jw_ku64(w, "worker", v->worker);
		ctl_jw_kstr(w, "helo", v->helo);
		ctl_jw_kstr(w, "client", v->client);
		ctl_jw_kstr(w, "envid", v->envid);
		/* RFC 1047: its 250 may not have arrived; or it is a
		 * resend of dup_of, not delivered again. */
		ctl_jw_kbool(w, "indoubt", v->indoubt);
		ctl_jw_key(w, "duplicate_of");
		if (v->dup_of)
			ctl_jw_str(w, fd_msgid_format(v->dup_of, id));
		else
			ctl_jw_null(w);
	}
	ctl_jw_key(w, "recipients");
	ctl_jw_arr(w);
	for (unsigned i = 0; i < v->n_rcpts; i++) {
		const struct cp_rcpt_view *r = &v->rcpts[i];
		ctl_jw_obj(w);
		ctl_jw_kstr(w, "address", r->addr);
		ctl_jw_kstr(w, "status", r->state);
		ctl_jw_kstr(w, "reason", r->reason);
		jw_time(w, "next_attempt",
			strcmp(r->state, "pending") == 0 ? r->next_us : 0);
		ctl_jw_ku64(w, "attempts", r->attempts);
		if (full) {
			ctl_jw_kstr(w, "orcpt", r->orcpt);
			ctl_jw_kstr(w, "route", r->route);
			jw_time(w, "last_attempt", r->last_us);
			ctl_jw_kbool(w, "busy", r->busy);
		}
		ctl_jw_obj_end(w);
	}
	ctl_jw_arr_end(w);
	if (!full)
		ctl_jw_obj_end(w); /* queue.show adds its history first */
}

static bool
list_match(const struct ctl_client *c, const struct cp_msg_view *v)
{
	if (c->f_state[0] && strcmp(c->f_state, v->state) != 0)
		return false;
	if (c->f_from[0]) {
		if (strcmp(c->f_from, "<>") == 0) {
			if (v->sender[0])
				return false;
		} else if (!strcasestr(v->sender, c->f_from)) {
			return false;
		}
	}
	if (c->f_to[0]) {
		unsigned i;
		for (i = 0; i < v->n_rcpts; i++)
			if (strcasestr(v->rcpts[i].addr, c->f_to))
				break;
		if (i == v->n_rcpts)
			return false;
	}
	return true;
}

/* On the queue manager's thread: only appends to memory. */
static int
list_item(void *ctx, const struct cp_msg_view *v)
{
	struct ctl_client *c = ctx;

	if (!list_match(c, v))
		return 0;
	ctl_jw_obj(&c->out);
	ctl_jw_key(&c->out, "item");
	jw_msg(&c->out, v, false);
	ctl_jw_obj_end(&c->out);
	ctl_jw_nl(&c->out);
	c->count++;
	return c->out.err;
}

/* The next chunk of a listing; the terminator once it is done. */
static void
list_more(struct ctl_server *sv, struct ctl_client *c)
{
	size_t mark = c->out.len;
	int r = cp_queue_list(sv->src.cp, &c->cursor, CTL_LIST_CHUNK,
			      list_item, c);

	if (r == 1)
		return;
	c->listing = false;
	if (r == 0) {
		ok_begin(&c->out);
		ctl_jw_obj(&c->out);
		ctl_jw_ku64(&c->out, "count", c->count);
		ctl_jw_obj_end(&c->out);
		ok_end(&c->out);
		return;
	}
	ctl_jw_rewind(&c->out, mark); /* a partial item line, if any */
	reply_cp_err(c, "queue.list", r);
}

static int
cmd_list(struct ctl_server *sv, struct ctl_client *c, struct req *rq)
{
	if (arg_str(c, rq, "state", c->f_state, sizeof(c->f_state)) < 0 ||
	    arg_str(c, rq, "from", c->f_from, sizeof(c->f_from)) < 0 ||
	    arg_str(c, rq, "to", c->f_to, sizeof(c->f_to)) < 0)
		return -1;
	if (c->f_state[0] && strcmp(c->f_state, "active") != 0 &&
	    strcmp(c->f_state, "deferred") != 0 &&
	    strcmp(c->f_state, "held") != 0) {
		c->f_state[0] = '\0';
		return reply_err(c, E_BAD_REQUEST, "queue.list: state must be "
				 "active, deferred or held");
	}
	c->listing = true;
	c->cursor = 0;
	c->count = 0;
	list_more(sv, c);
	return 0;
}

/* On the queue manager's thread: the reply up to the message's history,
 * which cmd_show() adds and closes. */
static int
show_one(void *ctx, const struct cp_msg_view *v)
{
	struct ctl_client *c = ctx;

	ok_begin(&c->out);
	jw_msg(&c->out, v, true);
	return c->out.err;
}

/* The latest HISTORY_MAX records of a message: a message retried for
 * days has hundreds; the newest are the ones an operator needs. */
#define HISTORY_MAX 200

struct history {
	struct hist_rec {
		uint64_t time_us;
		enum dlog_type type;
		uint32_t rcpt, attempts;
		uint16_t text_len;
		char text[DLOG_TEXT_MAX];
	} *ring;
	unsigned n; /* records seen; the ring holds the last HISTORY_MAX */
};

/* One delivery-log record of the message, on this (control) thread. */
static int
history_one(void *ctx, const struct dlog_rec *r)
{
	struct history *h = ctx;
	struct hist_rec *e;

	if (!dlog_type_is_public(r->type))
		return 0;
	e = &h->ring[h->n++ % HISTORY_MAX];
	e->time_us = r->time_us;
	e->type = r->type;
	e->rcpt = r->rcpt;
	e->attempts = r->attempts;
	e->text_len = (uint16_t)(r->text_len < DLOG_TEXT_MAX ? r->text_len
							     : DLOG_TEXT_MAX);
	if (e->text_len)
		memcpy(e->text, r->text, e->text_len);
	return 0;
}

static void
history_write(struct ctl_jw *w, const struct history *h)
{
	unsigned n = h->n < HISTORY_MAX ? h->n : HISTORY_MAX;
	char t[40];

	for (unsigned i = 0; i < n; i++) {
		const struct hist_rec *e = &h->ring[(h->n - n + i) % HISTORY_MAX];
		ctl_jw_obj(w);
		iso8601(e->time_us, t, sizeof(t));
		ctl_jw_kstr(w, "time", t);
		ctl_jw_kstr(w, "event", dlog_type_name(e->type));
		ctl_jw_key(w, "rcpt");
		if (e->rcpt == DLOG_ALL)
			ctl_jw_null(w);
		else
			ctl_jw_u64(w, e->rcpt);
		ctl_jw_ku64(w, "attempts", e->attempts);
		ctl_jw_key(w, "text");
		ctl_jw_strn(w, e->text, e->text_len);
		ctl_jw_obj_end(w);
	}
}

static int
cmd_show(struct ctl_server *sv, struct ctl_client *c, struct req *rq)
{
	size_t mark = c->out.len;
	uint64_t id;
	int r;

	if (arg_id(c, rq, &id) < 0)
		return -1;
	r = cp_queue_show(sv->src.cp, id, show_one, c);
	if (r != 0) {
		ctl_jw_rewind(&c->out, mark);
		return reply_cp_err(c, "queue.show", r);
	}
	/* The message's object is still open: its delivery history, read
	 * from the log files here, not on the queue manager's thread. */
	ctl_jw_key(&c->out, "history");
	ctl_jw_arr(&c->out);
	{
		struct history h = {
			.ring = malloc(HISTORY_MAX * sizeof(*h.ring))};
		if (h.ring) {
			cp_history(sv->src.cp, id, history_one, &h);
			history_write(&c->out, &h);
			free(h.ring);
		}
	}
	ctl_jw_arr_end(&c->out);
	ctl_jw_obj_end(&c->out);
	ok_end(&c->out);
	return 0;
}

/* The end of a cat: the pin dropped, then the terminating line. r: the
 * read's result (0: the whole body was sent). */
static void
cat_end(struct ctl_server *sv, struct ctl_client *c, int r)
{
	char t[FD_MSGID_TEXT_LEN + 1];
	int rc = cp_queue_cat_close(sv->src.cp, c->cat);

	c->cat = NULL;
	if (r == 0 && rc == -ESTALE) {
		/* Every byte sent was the message's (its segments were
		 * pinned), but it is not in the queue any more: a script
		 * must not take that for a successful cat. */
		reply_err(c, E_UNKNOWN_ID, "queue.cat: %s left the queue "
			  "(delivered, bounced or deleted) while it was being "
			  "sent", fd_msgid_format(c->cat_id, t));
		return;
	}
	if (r == 0 && rc != 0)
		r = rc;
	if (r == 0) {
		ok_begin(&c->out);
		ctl_jw_obj(&c->out);
		ctl_jw_ku64(&c->out, "size", c->cat_sent);
		ctl_jw_obj_end(&c->out);
		ok_end(&c->out);
		return;
	}
	fd_log(FD_LOG_WARN, "ctl", "%016" PRIx64 " event=cat_failed uid=%u "
	       "sent=%" PRIu64 " error=\"%s\"", c->cat_id, (unsigned)c->uid,
	       c->cat_sent, strerror(-r));
	reply_cp_err(c, "queue.cat", r);
}

/* The next piece of a cat as one chunk line; the terminator after the
 * last. Called only while the client's output is below CTL_OUT_HIGH. */
static void
cat_more(struct ctl_server *sv, struct ctl_client *c)
{
	size_t mark = c->out.len;
	long n = cp_queue_cat_read(c->cat, sv->cat_buf, CTL_CAT_PIECE);

	if (n <= 0) {
		cat_end(sv, c, (int)n);
		return;
	}
	ctl_jw_obj(&c->out);
	ctl_jw_key(&c->out, "chunk");
	ctl_jw_b64(&c->out, sv->cat_buf, (size_t)n);
	ctl_jw_obj_end(&c->out);
	ctl_jw_nl(&c->out);
	if (c->out.err) {
		ctl_jw_rewind(&c->out, mark);
		cat_end(sv, c, -ENOMEM);
		return;
	}
	c->cat_sent += (uint64_t)n;
}

static int
cmd_cat(struct ctl_server *sv, struct ctl_client *c, struct req *rq)
{
	uint64_t id;
	int r;

	if (arg_id(c, rq, &id) < 0)
		return -1;
	r = cp_queue_cat_open(sv->src.cp, id, &c->cat);
	if (r != 0)
		return reply_cp_err(c, "queue.cat", r);
	c->cat_id = id;
	c->cat_sent = 0;
	cat_more(sv, c);
	return 0;
}

static const char *
action_name(enum cp_action a)
{
	switch (a) {
	case CP_HOLD: return "queue.hold";
	case CP_RELEASE: return "queue.release";
	case CP_DELETE: return "queue.delete";
	case CP_FLUSH: return "queue.flush";
	}
	return "?";
}

static int
do_action(struct ctl_server *sv, struct ctl_client *c, struct req *rq,
	  enum cp_action a)
{
	char dom[256] = "", esc[1100];
	uint64_t *ids = NULL;
	size_t n = 0, affected = 0, unknown = 0;
	bool all = false;
	int hi, ha = 0, hd = 0, r;

	if ((hi = arg_ids(c, rq, &ids, &n)) < 0 ||
	    (ha = arg_bool(c, rq, "all", &all)) < 0)
		goto out;
	if (a == CP_FLUSH &&
	    (hd = arg_str(c, rq, "to_domain", dom, sizeof(dom))) < 0)
		goto out;
	if (ha && !all) {
		hi = reply_err(c, E_BAD_REQUEST, "%s: \"all\" can only be "
			       "true", rq->cmd);
		goto out;
	}
	if (hi + ha + hd > 1) {
		hi = reply_err(c, E_BAD_REQUEST, "%s: give one of ids, all%s",
			       rq->cmd, a == CP_FLUSH ? ", to_domain" : "");
		goto out;
	}
	if (hi + ha + hd == 0 && a != CP_FLUSH) {
		hi = reply_err(c, E_BAD_REQUEST, "%s: needs ids, or \"all\": "
			       "true", rq->cmd);
		goto out;
	}
	if (hd && !dom[0]) {
		hi = reply_err(c, E_BAD_REQUEST, "%s: to_domain is empty",
			       rq->cmd);
		goto out;
	}
	r = cp_queue_action(sv->src.cp, a, ids, n, hd ? dom : NULL,
			    &affected, &unknown);
	if (r != 0) {
		hi = reply_cp_err(c, rq->cmd, r);
		goto out;
	}
	/* to_domain is the client's: escaped (a newline in it wrote a line
	 * of its own, an audit entry in another uid's name) */
	fd_log(FD_LOG_INFO, "ctl", "event=command cmd=%s uid=%u ids=%zu "
	       "to_domain=%s affected=%zu unknown=%zu", action_name(a),
	       (unsigned)c->uid, n,
	       hd ? fd_log_escape(esc, sizeof(esc), dom, strlen(dom)) : "-",
	       affected, unknown);
	if (unknown) {
		char msg[160];
		ctl_jw_obj(&c->out);
		ctl_jw_kbool(&c->out, "ok", false);
		ctl_jw_key(&c->out, "error");
		ctl_jw_obj(&c->out);
		ctl_jw_kstr(&c->out, "code", err_code(E_UNKNOWN_ID));
		snprintf(msg, sizeof(msg), "%zu of %zu ids are not in the "
			 "queue (%zu messages changed)", unknown, n, affected);
		ctl_jw_kstr(&c->out, "message", msg);
		ctl_jw_obj_end(&c->out);
	} else {
		ctl_jw_obj(&c->out);
		ctl_jw_kbool(&c->out, "ok", true);
	}
	ctl_jw_key(&c->out, "data");
	ctl_jw_obj(&c->out);
	ctl_jw_ku64(&c->out, "affected", affected);
	ctl_jw_ku64(&c->out, "unknown", unknown);
	ctl_jw_obj_end(&c->out);
	ok_end(&c->out);
	hi = 0;
out:
	free(ids);
	return hi < 0 ? -1 : 0;
}

static int
cmd_hold(struct ctl_server *sv, struct ctl_client *c, struct req *rq)
{
	return do_action(sv, c, rq, CP_HOLD);
}

static int
cmd_release(struct ctl_server *sv, struct ctl_client *c, struct req *rq)
{
	return do_action(sv, c, rq, CP_RELEASE);
}

static int
cmd_delete(struct ctl_server *sv, struct ctl_client *c, struct req *rq)
{
	return do_action(sv, c, rq, CP_DELETE);
}

static int
cmd_flush(struct ctl_server *sv, struct ctl_client *c, struct req *rq)
{
	return do_action(sv, c, rq, CP_FLUSH);
}

/* ---- the listener and reload ---------------------------------------- */

static int
set_paused(struct ctl_server *sv, struct ctl_client *c, bool paused)
{
	bool was;

	if (!sv->src.paused)
		return reply_err(c, E_NOT_SUPPORTED, "this daemon cannot "
				 "pause its listener");
	was = atomic_exchange(sv->src.paused, paused);
	if (was != paused)
		fd_log(FD_LOG_INFO, "ctl", "event=%s uid=%u",
		       paused ? "paused" : "resumed", (unsigned)c->uid);
	ok_begin(&c->out);
	ctl_jw_obj(&c->out);
	ctl_jw_kstr(&c->out, "listener", paused ? "paused" : "accepting");
	ctl_jw_kbool(&c->out, "changed", was != paused);
	ctl_jw_obj_end(&c->out);
	ok_end(&c->out);
	return 0;
}

static int
cmd_pause(struct ctl_server *sv, struct ctl_client *c, struct req *rq)
{
	(void)rq;
	return set_paused(sv, c, true);
}

static int
cmd_resume(struct ctl_server *sv, struct ctl_client *c, struct req *rq)
{
	(void)rq;
	return set_paused(sv, c, false);
}

static int
cmd_reload(struct ctl_server *sv, struct ctl_client *c, struct req *rq)
{
	int r;

	(void)rq;
	if (!sv->src.reload)
		return reply_err(c, E_NOT_SUPPORTED, "this daemon cannot "
				 "reload");
	fd_log(FD_LOG_INFO, "ctl", "event=reload_asked uid=%u",
	       (unsigned)c->uid);
	r = sv->src.reload(sv->src.reload_ctx);
	if (r != 0)
		return reply_err(c, E_FAILED, "reload: %s", strerror(-r));
	ok_begin(&c->out);
	ctl_jw_obj(&c->out);
	ctl_jw_obj_end(&c->out);
	ok_end(&c->out);
	return 0;
}

/* ---- dispatch ------------------------------------------------------- */

typedef int (*ctl_cmd_fn)(struct ctl_server *sv, struct ctl_client *c,
			  struct req *rq);

static const struct ctl_cmd {
	const char *name;
	ctl_cmd_fn fn;
	const char *args[4];
	bool queue; /* needs the control plane */
} cmds[] = {
	{"status", cmd_status, {NULL}, false},
	{"queue.list", cmd_list, {"state", "from", "to", NULL}, true},
	{"queue.show", cmd_show, {"id", NULL}, true},
	{"queue.cat", cmd_cat, {"id", NULL}, true},
	{"queue.hold", cmd_hold, {"ids", "all", NULL}, true},
	{"queue.release", cmd_release, {"ids", "all", NULL}, true},
	{"queue.delete", cmd_delete, {"ids", "all", NULL}, true},
	{"queue.flush", cmd_flush, {"ids", "all", "to_domain", NULL}, true},
	{"pause", cmd_pause, {NULL}, false},
	{"resume", cmd_resume, {NULL}, false},
	{"reload", cmd_reload, {NULL}, false},
};

static void
handle_line(struct ctl_server *sv, struct ctl_client *c, const char *line,
	    size_t len)
{
	struct req rq = {.args = -1};
	const struct ctl_cmd *cmd = NULL;
	char name[64];
	uint32_t need = (uint32_t)(len / 2 + 4), k;
	int r, ct;

	if (need > sv->tok_cap) {
		struct ctl_json_tok *t = realloc(sv->tok, need * sizeof(*t));
		if (!t) {
			reply_err(c, E_FAILED, "out of memory");
			return;
		}
		sv->tok = t;
		sv->tok_cap = need;
	}
	r = ctl_json_parse(&rq.j, line, len, sv->tok, sv->tok_cap);
	if (r != 0) {
		reply_err(c, E_BAD_JSON, "bad JSON at byte %zu: %s",
			  rq.j.err_off, rq.j.err ? rq.j.err : "?");
		return;
	}
	if (sv->tok[0].type != CTL_JSON_OBJECT) {
		reply_err(c, E_BAD_REQUEST, "a request is a JSON object "
			  "with \"cmd\" (and \"args\")");
		return;
	}
	/* Only cmd and args at the top: a typo is an error, not ignored. */
	k = ctl_json_child(0);
	for (uint32_t i = 0; i < sv->tok[0].count; i++) {
		uint32_t v = k + 1;
		if (ctl_json_streq(&rq.j, k, "args")) {
			if (sv->tok[v].type != CTL_JSON_OBJECT) {
				reply_err(c, E_BAD_REQUEST, "\"args\" must be "
					  "an object");
				return;
			}
			rq.args = (int)v;
		} else if (!ctl_json_streq(&rq.j, k, "cmd")) {
			char key[64];
			if (ctl_json_string(&rq.j, k, key, sizeof(key)) < 0)
				strcpy(key, "...");
			reply_err(c, E_BAD_REQUEST, "unknown member \"%s\" (a "
				  "request has \"cmd\" and \"args\")", key);
			return;
		}
		k = ctl_json_next(&rq.j, v);
	}
	ct = ctl_json_get(&rq.j, 0, "cmd");
	if (ct < 0 || ctl_json_string(&rq.j, (uint32_t)ct, name,
				      sizeof(name)) < 0) {
		reply_err(c, E_BAD_REQUEST, "a request needs \"cmd\", a "
			  "string");
		return;
	}
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		if (strcmp(cmds[i].name, name) == 0)
			cmd = &cmds[i];
	if (!cmd) {
		reply_err(c, E_UNKNOWN_COMMAND, "unknown command \"%s\"",
			  name);
		return;
	}
	rq.cmd = cmd->name;
	if (rq.args >= 0) {
		k = ctl_json_child((uint32_t)rq.args);
		for (uint32_t i = 0; i < sv->tok[rq.args].count; i++) {
			bool known = false;
			for (int a = 0; cmd->args[a]; a++)
				if (ctl_json_streq(&rq.j, k, cmd->args[a]))
					known = true;
			if (!known) {
				char key[64];
				if (ctl_json_string(&rq.j, k, key,
						    sizeof(key)) < 0)
					strcpy(key, "...");
				reply_err(c, E_BAD_REQUEST, "%s: unknown "
					  "argument \"%s\"", cmd->name, key);
				return;
			}
			k = ctl_json_next(&rq.j, k + 1);
		}
	}
	if (cmd->queue && !sv->src.cp) {
		reply_err(c, E_NOT_SUPPORTED, "%s: no queue in this daemon",
			  cmd->name);
		return;
	}
	cmd->fn(sv, c, &rq);
}

/* ---- clients -------------------------------------------------------- */

static size_t
out_pending(const struct ctl_client *c)
{
	return c->out.len - c->out_off;
}

static void
client_close(struct ctl_server *sv, struct ctl_client *c)
{
	/* A cat cut short (the client left, the server stops): unpin. */
	cp_queue_cat_close(sv->src.cp, c->cat);
	close(c->fd);
	free(c->in);
	ctl_jw_free(&c->out);
	memset(c, 0, sizeof(*c));
	c->fd = -1;
}

/* Answer complete lines while the client's output is small. */
static void
client_process(struct ctl_server *sv, struct ctl_client *c)
{
	while (!c->closing && out_pending(c) < CTL_OUT_HIGH) {
		if (c->listing) {
			list_more(sv, c);
			continue;
		}
		if (c->cat) {
			cat_more(sv, c);
			continue;
		}
		char *nl = c->in_len ? memchr(c->in, '\n', c->in_len) : NULL;
		size_t n, used;
		if (!nl) {
			if (c->in_len >= CTL_MAX_LINE) {
				reply_err(c, E_TOO_LONG, "request longer than "
					  "%u bytes", CTL_MAX_LINE);
				c->closing = true;
				c->in_len = 0;
				break;
			}
			if (!c->eof || c->in_len == 0)
				break;
			/* EOF after a last line without a newline. */
			n = used = c->in_len;
		} else {
			n = (size_t)(nl - c->in);
			used = n + 1;
		}
		size_t l = n;
		if (l && c->in[l - 1] == '\r')
			l--;
		bool blank = true;
		for (size_t i = 0; i < l && blank; i++)
			if (c->in[i] != ' ' && c->in[i] != '\t')
				blank = false;
		if (!blank)
			handle_line(sv, c, c->in, l);
		if (c->in_len > used)
			memmove(c->in, c->in + used, c->in_len - used);
		c->in_len -= used;
	}
	if (c->out.err) {
		/* Even the error line could not be written: give up. */
		fd_log(FD_LOG_WARN, "ctl", "event=client_dropped "
		       "reason=out_of_memory");
		c->closing = true;
		c->out.len = c->out_off = 0;
	}
}

static void
client_read(struct ctl_server *sv, struct ctl_client *c)
{
	for (;;) {
		if (c->in_len == c->in_cap) {
			size_t cap = c->in_cap ? c->in_cap * 2 : 4096;
			char *p;
			if (c->in_cap >= CTL_MAX_LINE)
				break; /* full: client_process decides */
			if (cap > CTL_MAX_LINE)
				cap = CTL_MAX_LINE;
			if (!(p = realloc(c->in, cap))) {
				c->closing = true;
				return;
			}
			c->in = p;
			c->in_cap = cap;
		}
		ssize_t r = read(c->fd, c->in + c->in_len,
				 c->in_cap - c->in_len);
		if (r > 0) {
			c->in_len += (size_t)r;
			c->last_us = fd_now_monotonic_us();
			/* Stop reading once a request is complete. */
			if (memchr(c->in + c->in_len - (size_t)r, '\n',
				   (size_t)r))
				break;
			continue;
		}
		if (r == 0) {
			c->eof = true;
			break;
		}
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK) {
			c->eof = true;
			c->closing = true;
			c->out.len = c->out_off = 0;
		}
		break;
	}
	client_process(sv, c);
}

static void
client_write(struct ctl_client *c)
{
	while (out_pending(c)) {
		ssize_t r = send(c->fd, c->out.buf + c->out_off,
				 out_pending(c), MSG_NOSIGNAL | MSG_DONTWAIT);
		if (r > 0) {
			c->out_off += (size_t)r;
			c->last_us = fd_now_monotonic_us();
			continue;
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			/* The buffer is emptied only once all of it went out,
			 * and a client that reads as fast as the next chunk
			 * comes may never let it: drop what was sent, or a
			 * long stream would grow it to its whole size. */
			if (c->out_off >= CTL_OUT_HIGH) {
				ctl_jw_consume(&c->out, c->out_off);
				c->out_off = 0;
			}
			return;
		}
		/* The peer is gone: nothing more to say to it. */
		c->closing = true;
		c->out.len = c->out_off = 0;
		return;
	}
	ctl_jw_rewind(&c->out, 0);
	c->out_off = 0;
}

static void
accept_clients(struct ctl_server *sv)
{
	for (;;) {
		int fd = accept4(sv->lfd, NULL, NULL,
				 SOCK_NONBLOCK | SOCK_CLOEXEC);
		struct ctl_client *c = NULL;
		struct ucred cr;
		socklen_t cl = sizeof(cr);

		if (fd < 0) {
			uint64_t now = fd_now_monotonic_us();

			if (errno == EAGAIN || errno == EWOULDBLOCK ||
			    errno == EINTR || errno == ECONNABORTED)
				return;
			sv->accept_pause_until_us = now + ACCEPT_PAUSE_US;
			sv->accept_errors++;
			if (now - sv->accept_logged_us >= 10000000u) {
				sv->accept_logged_us = now;
				fd_log(FD_LOG_WARN, "ctl",
				       "event=accept_error error=\"%s\" "
				       "count=%" PRIu64 " note=\"retried every "
				       "100 ms\"",
				       strerror(errno), sv->accept_errors);
			}
			return;
		}
		for (unsigned i = 0; i < CTL_MAX_CLIENTS && !c; i++)
			if (!sv->cl[i].in_use)
				c = &sv->cl[i];
		if (!c) {
			static const char busy[] =
				"{\"ok\":false,\"error\":{\"code\":\"busy\","
				"\"message\":\"too many control clients\"}}\n";
			if (send(fd, busy, sizeof(busy) - 1,
				 MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
				fd_debug("ctl", "event=busy_send_failed");
			close(fd);
			continue;
		}
		memset(c, 0, sizeof(*c));
		c->fd = fd;
		c->in_use = true;
		c->uid = (uid_t)-1;
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) == 0)
			c->uid = cr.uid;
		ctl_jw_init(&c->out, CTL_OUT_LIMIT);
		c->last_us = fd_now_monotonic_us();
	}
}

static void *
ctl_main(void *arg)
{
	struct ctl_server *sv = arg;
	struct pollfd pfd[CTL_MAX_CLIENTS + 2];
	struct ctl_client *who[CTL_MAX_CLIENTS + 2];
	sigset_t all;

	/* Signals belong to the main thread. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	while (!atomic_load(&sv->stop)) {
		unsigned n = 0;
		uint64_t now = fd_now_monotonic_us();

		pfd[n++] = (struct pollfd){.fd = sv->wake_fd, .events = POLLIN};
		/* a negative fd is skipped by poll(): paused after a failure */
		pfd[n++] = (struct pollfd){
			.fd = now < sv->accept_pause_until_us ? -1 : sv->lfd,
			.events = POLLIN};
		for (unsigned i = 0; i < CTL_MAX_CLIENTS; i++) {
			struct ctl_client *c = &sv->cl[i];
			short ev = 0;
			if (!c->in_use)
				continue;
			if (c->last_us + CTL_IDLE_S * 1000000ull < now ||
			    (c->closing && !out_pending(c)) ||
			    (c->eof && !c->listing && !c->cat &&
			     !out_pending(c) && c->in_len == 0)) {
				client_close(sv, c);
				continue;
			}
			if (!c->eof && !c->closing && !c->listing && !c->cat &&
			    out_pending(c) < CTL_OUT_HIGH)
				ev |= POLLIN;
			/* A stream whose output drained to nothing in the
			 * last pass has no byte to wait for: wait for room,
			 * and the pass after it produces the next part. */
			if (out_pending(c) ||
			    ((c->listing || c->cat) && !c->closing))
				ev |= POLLOUT;
			if (!ev)
				ev = POLLIN; /* EOF, errors */
			who[n] = c;
			pfd[n++] = (struct pollfd){.fd = c->fd, .events = ev};
		}
		if (poll(pfd, n, pfd[1].fd < 0 ? ACCEPT_PAUSE_US / 1000 : 1000) <
		    0)
			continue;
		if (pfd[1].revents & POLLIN)
			accept_clients(sv);
		for (unsigned i = 2; i < n; i++) {
			struct ctl_client *c = who[i];
			if (pfd[i].revents & POLLOUT)
				client_write(c);
			if (pfd[i].revents & (POLLIN | POLLHUP | POLLERR))
				client_read(sv, c);
			else if (!c->closing)
				client_process(sv, c); /* output drained */
			client_write(c);
		}
	}
	for (unsigned i = 0; i < CTL_MAX_CLIENTS; i++)
		if (sv->cl[i].in_use)
			client_close(sv, &sv->cl[i]);
	return NULL;
}

/* ---- set-up --------------------------------------------------------- */

static int
resolve_group(const char *group, gid_t *gid, char *why, size_t n)
{
	struct group gr, *res = NULL;
	char buf[4096];
	int r;

	r = getgrnam_r(group, &gr, buf, sizeof(buf), &res);
	if (r != 0 || !res) {
		snprintf(why, n, "control group \"%s\": %s", group,
			 r ? strerror(r) : "no such group");
		return r ? -r : -ENOENT;
	}
	*gid = res->gr_gid;
	return 0;
}

/* A daemon answering at path (-EADDRINUSE), a file there that is not a
 * socket (-EEXIST), or 0: nothing there, or a stale socket. */
static int
probe(const char *path, char *why, size_t n)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct stat st;
	int fd, r = 0;

	if (lstat(path, &st) != 0)
		return 0;
	if (!S_ISSOCK(st.st_mode)) {
		snprintf(why, n, "control socket %s: exists and is not a "
			 "socket", path);
		return -EEXIST;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	strcpy(sa.sun_path, path);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
		snprintf(why, n, "control socket %s: another daemon answers "
			 "there", path);
		r = -EADDRINUSE;
	}
	close(fd);
	return r;
}

static void
dir_of(const char *path, char *dir, size_t n)
{
	const char *sl = strrchr(path, '/');

	if (!sl)
		snprintf(dir, n, ".");
	else if (sl == path)
		snprintf(dir, n, "/");
	else
		snprintf(dir, n, "%.*s", (int)(sl - path), path);
}

/* Whether a socket may be given to group gid: root may, else only a
 * member (chown(2) with CAP_CHOWN alone is not looked for). */
static bool
may_chown_to(gid_t gid)
{
	gid_t gs[256];
	int n;

	if (geteuid() == 0 || getegid() == gid)
		return true;
	n = getgroups((int)(sizeof(gs) / sizeof(gs[0])), gs);
	for (int i = 0; i < n; i++)
		if (gs[i] == gid)
			return true;
	return false;
}

int
ctl_check(const char *path, const char *group, char *why, size_t n)
{
	char dir[sizeof(((struct sockaddr_un *)0)->sun_path)];
	gid_t gid;
	int r;

	if (!path[0] || strlen(path) + 16 >= sizeof(dir)) {
		snprintf(why, n, "control socket path \"%s\": empty or longer "
			 "than %zu bytes", path, sizeof(dir) - 17);
		return -ENAMETOOLONG;
	}
	if (group[0] && (r = resolve_group(group, &gid, why, n)) != 0)
		return r;
	if (group[0] && !may_chown_to(gid)) {
		/* chown(2) of the socket to a group the process is not in
		 * fails (EPERM) unless it is root: say so before the start
		 * fails on it */
		snprintf(why, n, "control group \"%s\": this process is not a "
			 "member (systemd: SupplementaryGroups=%s)", group,
			 group);
		return -EPERM;
	}
	dir_of(path, dir, sizeof(dir));
	if (access(dir, W_OK | X_OK) != 0) {
		char parent[sizeof(dir)];
		r = errno;
		dir_of(dir, parent, sizeof(parent));
		/* A missing directory is made at start if its parent lets
		 * us. */
		if (r != ENOENT || access(parent, W_OK | X_OK) != 0) {
			snprintf(why, n, "control socket directory %s: %s", dir,
				 strerror(r));
			return -r;
		}
	}
	return probe(path, why, n);
}

struct ctl_server *
ctl_start(const char *path, const char *group, const struct ctl_sources *src,
	  const cpu_set_t *cpus, int *err)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	char tmp[sizeof(sa.sun_path)], dir[sizeof(sa.sun_path)], why[300];
	struct ctl_server *sv;
	pthread_attr_t attr;
	struct stat st;
	gid_t gid = (gid_t)-1;
	int r;

	why[0] = '\0';
	if ((r = ctl_check(path, group, why, sizeof(why))) != 0)
		goto out_log;
	if (group[0] && (r = resolve_group(group, &gid, why, sizeof(why))))
		goto out_log;
	dir_of(path, dir, sizeof(dir));
	if (mkdir(dir, 0750) == 0) {
		/* Made here: the control group must get through it to the
		 * socket (it was the daemon's own group's alone). */
		if (group[0] && chown(dir, (uid_t)-1, gid) != 0) {
			r = -errno;
			snprintf(why, sizeof(why), "chown %s: %s", dir,
				 strerror(-r));
			goto out_log;
		}
	} else if (errno != EEXIST) {
		r = -errno;
		snprintf(why, sizeof(why), "mkdir %s: %s", dir, strerror(-r));
		goto out_log;
	}
	if (!(sv = calloc(1, sizeof(*sv)))) {
		r = -ENOMEM;
		goto out_log;
	}
	sv->src = *src;
	snprintf(sv->path, sizeof(sv->path), "%s", path);
	for (unsigned i = 0; i < CTL_MAX_CLIENTS; i++)
		sv->cl[i].fd = -1;
	sv->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK,
			 0);
	sv->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (sv->lfd < 0 || sv->wake_fd < 0) {
		r = -errno;
		snprintf(why, sizeof(why), "socket: %s", strerror(-r));
		goto out_close;
	}
	/* Bound under a temporary name, given its mode (and group) before
	 * it listens, then renamed into place: never reachable with a
	 * looser mode, and a stale socket is replaced in one step. */
	snprintf(tmp, sizeof(tmp), "%s.%d", path, (int)getpid());
	unlink(tmp);
	strcpy(sa.sun_path, tmp);
	if (bind(sv->lfd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
	    chmod(tmp, group[0] ? 0660 : 0600) != 0 ||
	    (group[0] && chown(tmp, (uid_t)-1, gid) != 0) ||
	    listen(sv->lfd, 64) != 0 || rename(tmp, path) != 0 ||
	    stat(path, &st) != 0) {
		r = -errno;
		snprintf(why, sizeof(why), "control socket %s: %s", path,
			 strerror(-r));
		unlink(tmp);
		goto out_close;
	}
	sv->ino = st.st_ino;
	pthread_attr_init(&attr);
	if (cpus)
		pthread_attr_setaffinity_np(&attr, sizeof(*cpus), cpus);
	r = -pthread_create(&sv->thr, &attr, ctl_main, sv);
	pthread_attr_destroy(&attr);
	if (r != 0) {
		snprintf(why, sizeof(why), "thread: %s", strerror(-r));
		unlink(path);
		goto out_close;
	}
	pthread_setname_np(sv->thr, "fd-ctl");
	fd_log(FD_LOG_INFO, "ctl", "event=listening path=%s mode=%s%s%s",
	       path, group[0] ? "0660" : "0600", group[0] ? " group=" : "",
	       group);
	return sv;

out_close:
	if (sv->lfd >= 0)
		close(sv->lfd);
	if (sv->wake_fd >= 0)
		close(sv->wake_fd);
	free(sv);
out_log:
	fd_log(FD_LOG_ERR, "ctl", "event=control_socket_failed path=%s "
	       "error=\"%s\"", path, why[0] ? why : strerror(-r));
	*err = r;
	return NULL;
}

void
ctl_stop(struct ctl_server *sv)
{
	uint64_t one = 1;
	struct stat st;

	if (!sv)
		return;
	atomic_store(&sv->stop, true);
	if (write(sv->wake_fd, &one, sizeof(one)) < 0)
		fd_log(FD_LOG_WARN, "ctl", "event=wake_failed");
	pthread_join(sv->thr, NULL);
	/* Remove the file only if it is still ours (not a later daemon's). */
	if (stat(sv->path, &st) == 0 && st.st_ino == sv->ino)
		unlink(sv->path);
	close(sv->lfd);
	close(sv->wake_fd);
	free(sv->tok);
	free(sv);
}

/* ---- both servers, from the daemon's settings ------------------------- */

struct ctl_ops {
	struct ctl_server *ctl;
	struct metrics_server *metrics;
};

struct ctl_ops *
ctl_ops_start(const struct fd_config *cfg, const struct ctl_sources *src,
	      const cpu_set_t *cpus, int *err)
{
	struct ctl_ops *o = calloc(1, sizeof(*o));

	if (!o) {
		*err = -ENOMEM;
		return NULL;
	}
	if (strcmp(cfg->control, "off") != 0) {
		o->ctl = ctl_start(cfg->control, cfg->control_group, src, cpus,
				   err);
		/* Only the default path, with no group asked for, may
		 * fail without stopping the start. */
		if (!o->ctl && (!cfg->control_derived ||
				cfg->control_group[0]))
			goto out_free;
		if (!o->ctl)
			fd_log(FD_LOG_WARN, "ctl", "event=no_control_socket "
			       "note=\"finaldotctl cannot reach this daemon; "
			       "set --control PATH\"");
	} else if (cfg->control_derived) {
		fd_log(FD_LOG_WARN, "ctl", "event=no_control_socket "
		       "note=\"the path beside the spool is too long; set "
		       "--control PATH\"");
	}
	if (cfg->metrics[0] && strcmp(cfg->metrics, "off") != 0) {
		o->metrics = metrics_start(
			(const struct sockaddr *)&cfg->metrics_addr.addr,
			cfg->metrics_addr.addrlen, cfg->metrics, src, cpus,
			err);
		if (!o->metrics)
			goto out_ctl;
	}
	return o;

out_ctl:
	ctl_stop(o->ctl);
out_free:
	free(o);
	return NULL;
}

void
ctl_ops_stop(struct ctl_ops *o)
{
	if (!o)
		return;
	metrics_stop(o->metrics);
	ctl_stop(o->ctl);
	free(o);
}

int
ctl_ops_check(const struct fd_config *cfg, char *why, size_t n)
{
	int r = 0, fd, one = 1;

	if (cfg->metrics[0] && strcmp(cfg->metrics, "off") != 0) {
		fd = socket(cfg->metrics_addr.addr.ss_family,
			    SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			r = -errno;
		else {
			setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one,
				   sizeof(one));
			if (bind(fd, (const struct sockaddr *)&cfg->metrics_addr
					     .addr,
				 cfg->metrics_addr.addrlen) != 0)
				r = -errno;
			close(fd);
		}
		if (r) {
			snprintf(why, n, "metrics %s: %s", cfg->metrics,
				 strerror(-r));
			return r;
		}
	}
	if (strcmp(cfg->control, "off") == 0)
		return 0;
	r = ctl_check(cfg->control, cfg->control_group, why, n);
	if (r && cfg->control_derived && !cfg->control_group[0]) {
		/* The default socket is best effort: say so, go on. */
		size_t l = strlen(why);
		snprintf(why + l, n - l, " (the daemon would run without a "
			 "control socket)");
		return 1;
	}
	return r;
}
