/*
 * Worker glue: the SMTP engine's sink operations implemented by the spool,
 * and the spool's completion routed to the session. This file holds the
 * single path by which a durable write becomes a 250: spool completion ->
 * worker_commit_done() -> smtp_session_commit_done() (STYLE.md 10).
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

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

static void *
sink_begin(void *sink, const struct fd_envelope *env, void *sctx,
	   uint64_t *msgid, int *err)
{
	return spool_msg_begin(sink, env, sctx, msgid, err);
}

static int
sink_append(void *sink, void *msg, const void *p, size_t n)
{
	return spool_msg_append(sink, msg, p, n);
}

static int
sink_commit(void *sink, void *msg)
{
	return spool_msg_commit(sink, msg);
}

static void
sink_abort(void *sink, void *msg)
{
	spool_msg_abort(sink, msg);
}

static void
sink_detach(void *sink, void *msg)
{
	spool_msg_detach(sink, msg);
}

static size_t
sink_room(void *sink)
{
	return spool_room(sink);
}

static const struct smtp_sink_ops spool_sink_ops = {
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
	struct smtp_session *s = ctx;
	void *tctx = smtp_session_tctx(s);

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

void
fd_worker_poll(struct fd_worker *w)
{
	struct fd_ctl_reclaim rq;

	if (!w->port || !w->spool)
		return;
	if (w->port->n_backlog)
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

	spool_params_defaults(&sp);
	sp.dir = c->spool_dir;
	sp.worker = w->id;
	sp.segment_size = c->segment_size;
	sp.batch_size = (size_t)c->batch_size;
	sp.batches = c->batches;
	sp.flush_inflight = c->flush_inflight;
	sp.helper_cpus = w->helper_cpus;
	sp.max_msgs = c->max_connections;
	sp.spare_segments = c->spare_segments;
	sp.max_segments = c->max_segments;
	sp.seed_msgid = w->seed_msgid;
	sp.ring = ring;
	sp.done = worker_commit_done;
	if (w->port) {
		sp.announce = worker_announce;
		sp.announce_ctx = w;
	}
	w->spool = spool_create(&sp);
	if (!w->spool) {
		r = errno ? -errno : -EIO;
		fd_log(FD_LOG_ERR, "worker", "worker=%u event=spool_failed "
		       "dir=%s error=\"%s\"", w->id, c->spool_dir,
		       strerror(-r));
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
	sc.rcpt_check = w->rcpt_check;
	sc.rcpt_ctx = w->rcpt_ctx;
	w->smtp = smtp_server_create(&sc, &spool_sink_ops, w->spool);
	if (!w->smtp) {
		spool_destroy(w->spool);
		w->spool = NULL;
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
	if (w->spool) {
		f->spool = *spool_get_stats(w->spool);
		spool_destroy(w->spool);
	}
	if (w->port) {
		fd_ctl_port_flush(w->port);
		if (w->port->n_backlog || w->port->lost)
			fd_log(FD_LOG_WARN, "worker",
			       "worker=%u event=announcements_lost "
			       "backlog=%u lost=%" PRIu64,
			       w->id, w->port->n_backlog, w->port->lost);
	}
	if (w->smtp)
		f->smtp = *smtp_server_stats(w->smtp);
	fd_log(FD_LOG_INFO, "worker",
	       "worker=%u event=stats sessions=%" PRIu64 " messages=%" PRIu64
	       " failed=%" PRIu64 " rejected=%" PRIu64 " flushes=%" PRIu64
	       " batches=%" PRIu64 " bytes=%" PRIu64 " refused=%" PRIu64,
	       w->id, f->smtp.sessions, f->smtp.messages_committed,
	       f->smtp.messages_failed, f->smtp.messages_rejected,
	       f->spool.flushes, f->spool.batches, f->spool.bytes,
	       w->sessions_refused);
	if (w->smtp)
		smtp_server_destroy(w->smtp);
	w->smtp = NULL;
	w->spool = NULL;
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
