/*
 * Worker glue: the SMTP engine's sink operations implemented by the spool,
 * and the spool's completion routed to the session. This file holds the
 * single path by which a durable write becomes a 250: spool completion ->
 * worker_commit_done() -> smtp_session_commit_done(), and no other.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <signal.h>
#include <unistd.h>

#include "control/ctlsock.h"
#include "finaldot/ctlport.h"
#include "finaldot/log.h"
#include "finaldot/msgid.h"
#include "smtp/smtp.h"
#include "spool/spool.h"
#include "worker.h"

/* Counters of a finished worker, kept for fd_worker_add_totals(). */
struct worker_final {
	struct smtp_stats smtp;
	struct spool_stats spool;
};
static struct worker_final finals[256];

atomic_bool fd_paused;
struct fd_tls_server *fd_tls;
struct fd_policy *_Atomic fd_policy_live;
const struct fd_policy *_Atomic fd_policy_held[FD_POLICY_HOLDERS];
const char fd_version[] = FINALDOT_VERSION;

/*
 * The sink the engine sees is the worker: each open message is one of these
 * (a pool of max_connections made at start, no allocation per message),
 * wrapping the spool's message with what the operator's view needs: when
 * its commit started and how many bytes it stored. The spool's completion
 * comes back with this record as its context.
 */
struct fd_wmsg {
	struct fd_worker *w;
	struct spool_msg *m;
	void *sctx;          /* the session */
	uint64_t bytes;
	uint64_t t0_ns;      /* commit started */
	struct fd_wmsg *next_free;
};

static void
wmsg_put(struct fd_worker *w, struct fd_wmsg *wm)
{
	wm->next_free = w->wmsg_free;
	w->wmsg_free = wm;
}

static void *
sink_begin(void *sink, const struct fd_envelope *env, void *sctx,
	   uint64_t *msgid, int *err)
{
	struct fd_worker *w = sink;
	struct fd_wmsg *wm = w->wmsg_free;

	if (!wm) {
		*err = -EMFILE; /* as the spool would: one per session */
		return NULL;
	}
	wm->m = spool_msg_begin(w->spool, env, wm, msgid, err);
	if (!wm->m)
		return NULL;
	w->wmsg_free = wm->next_free;
	wm->sctx = sctx;
	wm->bytes = 0;
	return wm;
}

static int
sink_append(void *sink, void *msg, const void *p, size_t n)
{
	struct fd_worker *w = sink;
	struct fd_wmsg *wm = msg;

	wm->bytes += n;
	return spool_msg_append(w->spool, wm->m, p, n);
}

static int
sink_commit(void *sink, void *msg)
{
	struct fd_worker *w = sink;
	struct fd_wmsg *wm = msg;

	wm->t0_ns = fd_now_monotonic_ns(); /* final-dot-to-250 starts here */
	return spool_msg_commit(w->spool, wm->m);
}

static void
sink_abort(void *sink, void *msg)
{
	struct fd_worker *w = sink;
	struct fd_wmsg *wm = msg;

	spool_msg_abort(w->spool, wm->m);
	wmsg_put(w, wm);
}

/* The spool will not call back for a detached message: the record goes
 * back now (its latency is not counted; nobody got the reply). */
static void
sink_detach(void *sink, void *msg)
{
	struct fd_worker *w = sink;
	struct fd_wmsg *wm = msg;

	spool_msg_detach(w->spool, wm->m);
	wmsg_put(w, wm);
}

static size_t
sink_room(void *sink)
{
	struct fd_worker *w = sink;

	return spool_room(w->spool);
}

static bool
sink_full(void *sink)
{
	struct fd_worker *w = sink;

	return spool_out_of_space(w->spool);
}

static const struct smtp_sink_ops spool_sink_ops = {
	.full = sink_full,
	.begin = sink_begin,
	.append = sink_append,
	.commit = sink_commit,
	.abort = sink_abort,
	.detach = sink_detach,
	.room = sink_room,
};

/* The worker each thread runs, for the spool's completion callback. */
static __thread struct fd_worker *cur_worker;

static void
worker_commit_done(void *ctx, uint64_t msgid, int status)
{
	struct fd_wmsg *wm = ctx;
	struct fd_worker *w = wm->w;
	struct smtp_session *s = wm->sctx;
	void *tctx = smtp_session_tctx(s);

	if (status == 0) {
		/* ... and ends here */
		uint64_t ns = fd_now_monotonic_ns() - wm->t0_ns;
		w->priv.lat[ctl_lat_bucket(ns)]++;
		w->priv.lat_sum_ns += ns;
		w->priv.message_bytes += wm->bytes;
	}
	wmsg_put(w, wm);
	smtp_session_commit_done(s, msgid, status);
	if (cur_worker && cur_worker->wake)
		cur_worker->wake(tctx);
}

/* The spool's announcements go to the control plane's ring (ctlport.h). */
static void
worker_announce(void *actx, const struct spool_announce *a)
{
	struct fd_worker *w = actx;
	struct fd_ctl_event e = {
		.type = (uint32_t)a->type,
		.file_no = a->file_no,
		.use_seq = a->use_seq,
		.off = a->off,
		.msgid = a->msgid,
	};

	fd_ctl_port_publish(w->port, &e);
}

/* A message whose session ended while its commit was pending (reset,
 * timed out, the worker stopping): on disk now, and its client, who got
 * no reply, will send it again. Told after the DURABLE that covers it, so
 * the control plane finds the message when the news comes. */
static void
worker_orphan_done(void *ctx, uint64_t msgid, int status)
{
	if (status == 0)
		fd_worker_indoubt(ctx, msgid);
}

/* Copy this thread's counters where other threads read them. */
static void
worker_publish(struct fd_worker *w)
{
	struct ctl_worker_stats *p = &w->priv;

	if (w->smtp) {
		const struct smtp_stats *ss = smtp_server_stats(w->smtp);
		p->sessions = ss->sessions;
		p->messages = ss->messages_committed;
		p->failed = ss->messages_failed;
		p->rejected = ss->messages_rejected;
		/* The engine counts a relay denial as a syntax error too. */
		p->syntax_errors = ss->syntax_errors >= ss->relay_denied
					   ? ss->syntax_errors - ss->relay_denied
					   : 0;
		p->relay_denied = ss->relay_denied;
		p->rcpt_unknown = ss->rcpt_unknown;
		p->early_talkers = ss->early_talkers;
		p->timeouts = ss->timeouts;
		p->starttls = ss->tls_started;
		p->tls_ok = ss->tls_established;
		p->tls_injected = ss->tls_injected;
		p->tls_required = ss->tls_required_refused;
	}
	p->tls_failed = w->tls_failed;
	p->tls_resumed = w->tls_resumed;
	if (w->spool) {
		const struct spool_stats *sp = spool_get_stats(w->spool);
		p->flushes = sp->flushes;
		p->batches = sp->batches;
		p->batch_errors = sp->batch_errors;
		p->unflushed = sp->unflushed;
		p->spool_bytes = sp->bytes;
		p->spool_payload = sp->payload_bytes;
		p->segments = sp->segments_used;
		p->reclaimed = sp->reclaimed;
		p->room_waits = sp->room_waits;
		_Static_assert(CTL_FLUSH_MSG_BUCKETS == SPOOL_FLUSH_MSG_BUCKETS &&
			       CTL_FLUSH_BYTE_BUCKETS == SPOOL_FLUSH_BYTE_BUCKETS,
			       "the flush histograms share their buckets");
		memcpy(p->flush_msgs, sp->flush_msgs, sizeof(p->flush_msgs));
		p->flush_msgs_sum = sp->flush_msgs_sum;
		memcpy(p->flush_bytes, sp->flush_bytes, sizeof(p->flush_bytes));
		_Static_assert(sizeof(p->flush_lat) == sizeof(sp->flush_lat),
			       "the flush latency buckets are lathist.h's");
		memcpy(p->flush_lat, sp->flush_lat, sizeof(p->flush_lat));
		p->flush_lat_sum_ns = sp->flush_lat_sum_ns;
	}
	p->conns_current = w->conns_current;
	p->refused_busy = w->sessions_refused;
	p->refused_paused = w->paused_refused;
	ctl_worker_pub_store(&w->pub, p);
}

void
fd_worker_read_stats(const struct fd_worker *w, struct ctl_worker_stats *out)
{
	ctl_worker_pub_load(&w->pub, out);
}

void
fd_worker_poll(struct fd_worker *w)
{
	struct fd_ctl_reclaim rq;
	uint64_t now = fd_now_monotonic_us();

	/* Readers see counters at most 5 ms old while the loop is busy (it
	 * comes here at least every 100 ms when idle). */
	if (now >= w->pub_due_us) {
		w->pub_due_us = now + 5000;
		worker_publish(w);
	}
	/* A reload: the new policy, on this thread, between commands. */
	const struct fd_policy *pol = atomic_load(&fd_policy_live), *cur;
	if (pol && pol != w->policy_seen && w->smtp) {
		/* Named first, then checked to be still the live one (both
		 * sequentially consistent, as main's exchange and its look
		 * at the names): main either sees the name and keeps it, or
		 * has published a newer one, taken here instead. */
		for (;;) {
			atomic_store(&fd_policy_held[w->id % FD_POLICY_HOLDERS],
				     pol);
			cur = atomic_load(&fd_policy_live);
			if (cur == pol)
				break;
			pol = cur;
		}
		w->policy_seen = pol;
		smtp_server_set_policy(w->smtp, pol->domains, pol->n_domains,
				       pol->max_message_size,
				       pol->max_recipients, pol->max_errors,
				       pol->command_timeout_ms,
				       pol->data_timeout_ms,
				       pol->greet_delay_ms > 0);
		fd_log(FD_LOG_INFO, "worker",
		       "worker=%u event=policy_reloaded domains=%u "
		       "max_message_size=%" PRIu64 " max_recipients=%u "
		       "idle_timeout_ms=%" PRIu64 " greet_delay_ms=%" PRIu64,
		       w->id, pol->n_domains, pol->max_message_size,
		       pol->max_recipients, pol->idle_timeout_ms,
		       pol->greet_delay_ms);
	}
	if (!w->port || !w->spool)
		return;
	if (fd_ctl_port_pending(w->port))
		fd_ctl_port_flush(w->port);
	while (fd_ring_pop(&w->port->down, &rq))
		if (spool_reclaim(w->spool, rq.file_no, rq.use_seq) != 0)
			fd_log(FD_LOG_ERR, "worker",
			       "worker=%u event=reclaim_dropped file=%08" PRIx64,
			       w->id, rq.file_no);
}

int
fd_worker_start(struct fd_worker *w, struct io_uring *ring,
		fd_worker_wake_fn wake)
{
	const struct fd_config *c = w->cfg;
	struct smtp_config sc;
	struct spool_params sp;
	int r;

	cur_worker = w;
	w->wake = wake;
	for (unsigned i = 0; i < c->n_domains; i++)
		w->domains[i] = c->domains[i];
	snprintf(w->paused_reply, sizeof(w->paused_reply),
		 "421 4.3.2 %.255s Service not available, closing "
		 "transmission channel\r\n", c->hostname);
	w->paused_len = strlen(w->paused_reply);
	w->wmsgs = calloc(c->max_connections, sizeof(*w->wmsgs));
	if (!w->wmsgs)
		return -ENOMEM;
	for (unsigned i = c->max_connections; i-- > 0;) {
		w->wmsgs[i].w = w;
		wmsg_put(w, &w->wmsgs[i]);
	}

	spool_params_defaults(&sp);
	sp.dir = c->spool_dir;
	sp.worker = w->id;
	sp.segment_size = c->segment_size;
	sp.batch_size = (size_t)c->batch_size;
	sp.batches = c->batches;
	sp.flush_inflight = c->flush_inflight;
	sp.linked_fdatasync = c->spool_fdatasync;
	sp.fallocate_segments = c->spool_fallocate;
	sp.helper_cpus = w->helper_cpus;
	sp.max_msgs = c->max_connections;
	sp.spare_segments = c->spare_segments;
	sp.max_segments = c->max_segments;
	sp.min_free = c->spool_min_free;
	sp.seed_msgid = w->seed_msgid;
	sp.ring = ring;
	sp.done = worker_commit_done;
	if (w->port) {
		sp.announce = worker_announce;
		sp.announce_ctx = w;
		sp.orphan_done = worker_orphan_done;
		sp.orphan_ctx = w;
	}
	w->spool = spool_create(&sp);
	if (!w->spool) {
		r = errno ? -errno : -EIO;
		fd_log(FD_LOG_ERR, "worker", "worker=%u event=spool_failed "
		       "dir=%s error=\"%s\"", w->id, c->spool_dir,
		       strerror(-r));
		free(w->wmsgs);
		w->wmsgs = w->wmsg_free = NULL;
		return r;
	}

	smtp_config_defaults(&sc);
	sc.hostname = c->hostname;
	sc.domains = w->domains;
	sc.n_domains = c->n_domains;
	sc.max_message_size = c->max_message_size;
	sc.max_recipients = c->max_recipients;
	sc.max_errors = c->max_errors;
	sc.max_sessions = c->max_connections;
	sc.greet_delay = c->greet_delay_ms > 0;
	sc.command_timeout_ms = c->command_timeout_ms;
	sc.data_timeout_ms = c->data_timeout_ms;
	sc.rcpt_check = w->rcpt_check;
	sc.rcpt_ctx = w->rcpt_ctx;
	sc.starttls = fd_tls != NULL;
	sc.tls_required = c->tls_required;
	w->smtp = smtp_server_create(&sc, &spool_sink_ops, w);
	if (!w->smtp) {
		spool_destroy(w->spool);
		w->spool = NULL;
		free(w->wmsgs);
		w->wmsgs = w->wmsg_free = NULL;
		return -ENOMEM;
	}
	return 0;
}

void
fd_worker_finish(struct fd_worker *w)
{
	struct worker_final *f = &finals[w->id & 0xff];

	/* The loop has drained the spool (spool_inflight() == 0), so these
	 * counters are final; destroy still waits, to be safe. */
	worker_publish(w);
	if (w->spool) {
		f->spool = *spool_get_stats(w->spool);
		spool_destroy(w->spool);
	}
	if (w->port) {
		fd_ctl_port_flush(w->port);
		if (fd_ctl_port_pending(w->port) || w->port->lost)
			fd_log(FD_LOG_WARN, "worker",
			       "worker=%u event=announcements_lost "
			       "backlog=%u lost=%" PRIu64,
			       w->id, w->port->n_backlog + w->port->has_late,
			       w->port->lost);
	}
	if (w->smtp)
		f->smtp = *smtp_server_stats(w->smtp);
	fd_log(FD_LOG_INFO, "worker",
	       "worker=%u event=stats sessions=%" PRIu64 " messages=%" PRIu64
	       " failed=%" PRIu64 " rejected=%" PRIu64 " flushes=%" PRIu64
	       " batches=%" PRIu64 " bytes=%" PRIu64 " refused=%" PRIu64
	       " gap_p50_us=%" PRIu64 " gap_p99_us=%" PRIu64
	       " flush_mean_us=%" PRIu64 " flush_p50_us=%" PRIu64
	       " flush_p99_us=%" PRIu64,
	       w->id, f->smtp.sessions, f->smtp.messages_committed,
	       f->smtp.messages_failed, f->smtp.messages_rejected,
	       f->spool.flushes, f->spool.batches, f->spool.bytes,
	       w->sessions_refused,
	       fd_qlat_percentile_us(f->smtp.gap_hist, 50),
	       fd_qlat_percentile_us(f->smtp.gap_hist, 99),
	       fd_lat_mean_us(f->spool.flush_lat_sum_ns,
			      f->spool.batches - f->spool.unflushed),
	       fd_qlat_percentile_us(f->spool.flush_qlat, 50),
	       fd_qlat_percentile_us(f->spool.flush_qlat, 99));
	if (w->smtp)
		smtp_server_destroy(w->smtp);
	w->smtp = NULL;
	w->spool = NULL;
	/* After the spool and the sessions: neither refers to these now. */
	free(w->wmsgs);
	w->wmsgs = w->wmsg_free = NULL;
	cur_worker = NULL;
}

void
fd_worker_add_totals(const struct fd_worker *w, struct fd_worker_totals *t)
{
	const struct worker_final *f = &finals[w->id & 0xff];

	t->messages += f->smtp.messages_committed;
	t->failed += f->smtp.messages_failed;
	t->rejected += f->smtp.messages_rejected;
	t->sessions += f->smtp.sessions;
	t->flushes += f->spool.flushes;
	t->batches += f->spool.batches;
	t->bytes += f->spool.bytes;
}

void
fd_worker_log_totals(unsigned workers, const struct fd_worker_totals *t)
{
	fd_log(FD_LOG_INFO, "main",
	       "event=stats workers=%u sessions=%" PRIu64 " messages=%" PRIu64
	       " failed=%" PRIu64 " rejected=%" PRIu64 " flushes=%" PRIu64
	       " batches=%" PRIu64 " bytes=%" PRIu64
	       " flushes_per_message=%.4f",
	       workers, t->sessions, t->messages, t->failed, t->rejected,
	       t->flushes, t->batches, t->bytes,
	       t->messages ? (double)t->flushes / (double)t->messages : 0.0);
}

void
fd_worker_indoubt(struct fd_worker *w, uint64_t msgid)
{
	struct fd_ctl_event e = {.type = FD_CTL_INDOUBT, .msgid = msgid};
	char id[FD_MSGID_TEXT_LEN + 1];

	fd_msgid_format(msgid, id);
	fd_log(FD_LOG_INFO, "worker",
	       "worker=%u event=reply_unacknowledged id=%s", w->id, id);
	if (w->port)
		fd_ctl_port_publish(w->port, &e);
}

/* finaldotctl reload: the same as SIGHUP (each transport's signal path
 * takes it from there). */
static int
reload_raise(void *ctx)
{
	(void)ctx;
	return kill(getpid(), SIGHUP) == 0 ? 0 : -errno;
}

struct ctl_ops *
fd_ctl_start(const struct fd_config *cfg, struct cplane *cp,
	     const char *transport, unsigned n_workers,
	     void (*worker_stats)(void *ctx, unsigned i,
				  struct ctl_worker_stats *out),
	     void *worker_ctx,
	     void (*net_stats)(void *ctx, struct ctl_net_stats *out),
	     const cpu_set_t *cpus, int *err)
{
	/* Static: the control socket and /metrics read them until the end. */
	static const char *ltext[FD_CONFIG_MAX_LISTEN];
	static struct ctl_sources src;

	for (unsigned i = 0; i < cfg->n_listen; i++)
		ltext[i] = cfg->listen[i].text;
	src = (struct ctl_sources){
		.cp = cp, .version = fd_version, .transport = transport,
		.hostname = cfg->hostname, .listen = ltext,
		.n_listen = cfg->n_listen, .started_us = fd_now_realtime_us(),
		.n_workers = n_workers, .worker_stats = worker_stats,
		.worker_ctx = worker_ctx, .net_stats = net_stats,
		.paused = &fd_paused, .reload = reload_raise,
	};
	*err = 0;
	return ctl_ops_start(cfg, &src, cpus, err);
}
