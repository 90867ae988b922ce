/*
 * Delivery threads (contract in deliver.h).
 *
 * A thread takes a batch: up to QJ_BATCH jobs for one next hop
 * (QJ_BATCH_FAST for a fast one; cp_job_take), or one bounce or Maildir
 * job. A job's life on it:
 *   1. an ATTEMPT record per recipient goes to the delivery log (those of
 *      the whole batch first, so that one wait covers them all);
 *   2. the body is read from the spool segments (q_body_read: pread, the
 *      body CRC32C checked as the last bytes are read); before those last
 *      bytes are handed to the next hop (so before the final dot, the BDAT
 *      LAST chunk or the Maildir rename) the ATTEMPT records must be
 *      durable: a crash from then on is counted as a possible duplicate;
 *   3. the transaction: Maildir per recipient, or one SMTP/LMTP
 *      transaction for all the job's recipients, the batch's transactions
 *      pipelined over one connection (smtpc_send_many);
 *   4. each recipient's outcome: 2xx delivered, 5xx bounced, anything else
 *      (4xx, timeout, lost connection, local trouble) deferred.
 *
 * Rules taken from RFC 6531 and RFC 3030: a message that needs SMTPUTF8
 * is bounced 5.6.7 when the next hop does not offer it (never downgraded);
 * a BINARYMIME body needs CHUNKING (5.6.3 otherwise); a message larger
 * than the next hop's SIZE is bounced 5.3.4.
 *
 * Connection reuse: a thread keeps the connection of its last job and asks
 * the queue manager for another job to the same next hop first; an idle
 * cached connection is closed after 5 s. A cached connection the next hop
 * closed meanwhile fails at once: the batch's messages that never reached
 * the next hop are then retried once on a new connection.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "control/cplane.h"
#include "control/deliver.h"
#include "control/dlog.h"
#include "control/dsn.h"
#include "control/maildir.h"
#include "control/moved.h"
#include "control/queue.h"
#include "control/route.h"
#include "control/smtpc.h"
#include "finaldot/compiler.h"
#include "finaldot/crc32c.h"
#include "finaldot/fsync.h"
#include "finaldot/log.h"
#include "finaldot/mailbox.h"
#include "finaldot/msgid.h"
#include "finaldot/thread.h"

#include <openssl/evp.h>

#define CONN_IDLE_US 5000000ull

/* ---- fingerprint ------------------------------------------------------- */

/* SHA-256 fetched from the provider once for the process. Handing
 * EVP_sha256() to each digest made OpenSSL 3 fetch it again per message
 * (a name lookup and a lock: ~0.4 us, 12% of a 4 KiB fingerprint here).
 * Never freed: it lives as long as the process. */
static const EVP_MD *fp_md;
static pthread_once_t fp_md_once = PTHREAD_ONCE_INIT;

static void
fp_md_fetch(void)
{
	EVP_MD *md = EVP_MD_fetch(NULL, "SHA2-256", NULL);

	fp_md = md ? md : EVP_sha256(); /* the implicit fetch, as before */
}

int
q_fp_begin(struct q_fp *f, const struct q_msg *m)
{
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();

	memset(f, 0, sizeof(*f));
	(void)pthread_once(&fp_md_once, fp_md_fetch);
	if (!ctx || EVP_DigestInit_ex(ctx, fp_md, NULL) != 1) {
		EVP_MD_CTX_free(ctx);
		return -ENOMEM;
	}
	EVP_DigestUpdate(ctx, m->sender, strlen(m->sender) + 1);
	for (unsigned i = 0; i < m->n_rcpts; i++)
		EVP_DigestUpdate(ctx, m->rcpts[i].addr,
				 strlen(m->rcpts[i].addr) + 1);
	EVP_DigestUpdate(ctx, "", 1);
	f->ctx = ctx;
	return 0;
}

void
q_fp_feed(struct q_fp *f, const uint8_t *p, size_t n)
{
	size_t i = 0;

	if (!f->ctx)
		return;
	/* Our Received header: its first line and the lines continuing it
	 * (starting with SP or HT) are skipped. */
	while (f->st < 2 && i < n) {
		uint8_t c = p[i];
		if (f->st == 1) {
			if (c == ' ' || c == '\t') {
				f->st = 0;
			} else {
				f->st = 2;
				break;
			}
		}
		if (c == '\n' && f->cr)
			f->st = 1;
		f->cr = c == '\r';
		i++;
	}
	if (f->st == 2 && i < n)
		EVP_DigestUpdate(f->ctx, p + i, n - i);
}

int
q_fp_end(struct q_fp *f, uint8_t *out32)
{
	unsigned int len = 0;
	int r = f->ctx && EVP_DigestFinal_ex(f->ctx, out32, &len) == 1 &&
			len == 32
		? 0
		: -EIO;

	q_fp_abort(f);
	return r;
}

void
q_fp_abort(struct q_fp *f)
{
	EVP_MD_CTX_free(f->ctx);
	f->ctx = NULL;
}

/* ---- body reader -------------------------------------------------------- */

void
q_body_init(struct q_body *b, const struct q_msg *m)
{
	memset(b, 0, sizeof(*b));
	b->m = m;
}

void
q_body_fini(struct q_body *b)
{
	if (b->fp)
		q_fp_abort(b->fp);
	b->fp = NULL;
	if (b->own_fd1 > 0)
		close(b->own_fd1 - 1);
	b->own_fd1 = 0;
}

long
q_body_read(void *ctx, uint64_t off, void *buf, size_t n)
{
	struct q_body *b = ctx;
	const struct q_msg *m = b->m;
	uint8_t *out = buf;
	size_t got = 0;

	if (off != b->pos) {
		/* Not where the last read ended: find the piece again. From
		 * the start the check starts over; elsewhere it cannot be
		 * made for this pass. */
		b->piece = 0;
		b->piece_off = 0;
		while (b->piece < m->n_pieces &&
		       off >= b->piece_off + m->pieces[b->piece].len) {
			b->piece_off += m->pieces[b->piece].len;
			b->piece++;
		}
		b->pos = off;
		b->crc = 0;
		b->unchecked = off != 0;
		if (b->fp) {
			/* From the start the fingerprint starts over too;
			 * out of order, there is none. */
			q_fp_abort(b->fp);
			if (off != 0 || q_fp_begin(b->fp, m) != 0)
				b->fp = NULL;
		}
	}
	if (off >= m->body_len) {
		if (m->body_len == 0 && !b->last_done) {
			if (b->before_last &&
			    b->before_last(b->before_last_ctx) != 0)
				return -EIO;
			b->last_done = true;
			if (b->fp) {
				b->fp_ok = q_fp_end(b->fp, b->fp_out) == 0;
				b->fp = NULL;
			}
		}
		return 0;
	}
	if (n > m->body_len - off)
		n = (size_t)(m->body_len - off);
	while (got < n) {
		const struct q_piece *p;
		uint64_t in;
		size_t k;
		ssize_t r;
		int fd;

		if (b->piece >= m->n_pieces)
			return -EIO; /* pieces shorter than the body length */
		p = &m->pieces[b->piece];
		in = b->pos - b->piece_off;
		k = (size_t)(p->len - in);
		if (k > n - got)
			k = n - got;
		fd = p->seg->fd;
		if (fd < 0 && p->seg->moved) {
			/* its own file, opened here (q_body.own_fd1) */
			if (b->own_fd1 == 0) {
				int o = fd_open_noatime(p->seg->path,
							O_RDONLY | O_CLOEXEC);
				if (o < 0)
					return -errno;
				b->own_fd1 = o + 1;
			}
			fd = b->own_fd1 - 1;
		}
		if (fd < 0)
			return -EBADF;
		r = pread(fd, out + got, k, (off_t)(p->file_off + in));
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			return -EIO; /* the segment is shorter than recorded */
		b->crc = fd_crc32c(b->crc, out + got, (size_t)r);
		if (b->fp)
			q_fp_feed(b->fp, out + got, (size_t)r);
		got += (size_t)r;
		b->pos += (uint64_t)r;
		if (b->pos - b->piece_off == p->len) {
			b->piece_off += p->len;
			b->piece++;
		}
	}
	if (b->pos == m->body_len && !b->last_done) {
		/* The last bytes: the point of no return for the caller. */
		if (!b->unchecked && b->crc != m->body_crc) {
			fd_log(FD_LOG_ERR, "deliver",
			       "%016" PRIx64 " event=body_damaged "
			       "expected_crc=%08x got=%08x",
			       m->id, m->body_crc, b->crc);
			b->damaged = true;
			return -EIO;
		}
		if (b->before_last && b->before_last(b->before_last_ctx) != 0)
			return -EIO;
		b->last_done = true;
		if (b->fp && !b->unchecked) {
			b->fp_ok = q_fp_end(b->fp, b->fp_out) == 0;
			b->fp = NULL;
		}
	}
	return (long)got;
}

/* An in-memory body (the DSN). */
struct mem_body {
	const char *p;
	size_t len;
	int (*before_last)(void *ctx);
	void *ctx;
};

static long
mem_body_read(void *ctx, uint64_t off, void *buf, size_t n)
{
	struct mem_body *mb = ctx;

	if (off >= mb->len)
		return 0;
	if (n > mb->len - off)
		n = (size_t)(mb->len - off);
	if (off + n == mb->len && mb->before_last &&
	    mb->before_last(mb->ctx) != 0)
		return -EIO;
	memcpy(buf, mb->p + off, n);
	return (long)n;
}

/* ---- outcomes ----------------------------------------------------------- */

static void
outcome_set(struct q_outcome *o, enum q_out out, const char *text)
{
	o->out = (uint8_t)out;
	o->dsn_passed = false;
	o->remote = false;
	snprintf(o->text, sizeof(o->text), "%.*s", (int)sizeof(o->text) - 1,
		 text ? text : "");
}

static void
outcome_reply(struct q_outcome *o, const struct smtpc_reply *r)
{
	enum q_out out = r->code >= 200 && r->code < 300 ? QO_DELIVERED
			 : r->code >= 500 && r->code < 600 && !r->local
				 ? QO_BOUNCED
				 : QO_DEFERRED;

	outcome_set(o, out, r->text);
	o->remote = r->code != 0 && !r->local;
	snprintf(o->enh, sizeof(o->enh), "%s", r->enh);
}

struct attempt_wait {
	struct dlog *log;
	uint64_t lsn;
	bool called;
	/* an ATTEMPT could not be logged (the log failed): run_jobs() then
	 * defers the batch before anything waits here */
	bool refused;
	uint64_t waited_us; /* in dlog_wait: not the next hop's time */
};

static int
wait_attempt(void *ctx)
{
	struct attempt_wait *aw = ctx;
	uint64_t t0;
	int r;

	aw->called = true;
	if (!aw->log || !aw->lsn)
		return 0;
	t0 = fd_now_monotonic_us();
	r = dlog_wait(aw->log, aw->lsn);
	aw->waited_us += fd_now_monotonic_us() - t0;
	return r;
}

/* ---- connections -------------------------------------------------------- */

/*
 * Client TLS contexts, one per CA file ("" the system store), made on
 * first use and kept for the life of the process: loading a CA store
 * costs milliseconds, a connection must not pay it. A handful at most
 * (one per distinct ca= of the routes); shared by the delivery threads.
 */
#define TLS_CTX_MAX 16
static pthread_mutex_t tls_ctx_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
	char ca[256];
	void *ctx;
} tls_ctxs[TLS_CTX_MAX];

static void *
tls_ctx_for(const char *ca, char *err, size_t errlen)
{
	void *ctx = NULL;
	unsigned i;

	pthread_mutex_lock(&tls_ctx_mu);
	for (i = 0; i < TLS_CTX_MAX && tls_ctxs[i].ctx; i++)
		if (strcmp(tls_ctxs[i].ca, ca) == 0) {
			ctx = tls_ctxs[i].ctx;
			break;
		}
	if (!ctx && i < TLS_CTX_MAX) {
		ctx = smtpc_tls_ctx_new(ca, err, errlen);
		if (ctx) {
			snprintf(tls_ctxs[i].ca, sizeof(tls_ctxs[i].ca), "%s",
				 ca);
			tls_ctxs[i].ctx = ctx;
		}
	} else if (!ctx) {
		snprintf(err, errlen, "too many distinct ca= files");
	}
	pthread_mutex_unlock(&tls_ctx_mu);
	return ctx;
}

struct conn_cache {
	struct smtpc *c;
	char key[600];
	uint64_t last_us;
	unsigned uses;
};

static void
cache_drop(struct conn_cache *cc, bool polite)
{
	if (!cc->c)
		return;
	if (polite)
		smtpc_quit(cc->c);
	else
		smtpc_abort(cc->c);
	cc->c = NULL;
	cc->key[0] = '\0';
}

struct smtpc *
deliver_connect(struct cplane *cp, int kind, const char *host, uint16_t port,
		const char *path, int tls, const char *tls_ca, uint64_t cap_ms,
		struct smtpc_reply *why)
{
	const struct cp_config *cfg = cp_config_of(cp);
	struct smtpc_target t;
	struct smtpc_params p;
	int err = 0;

	memset(&t, 0, sizeof(t));
	t.proto = kind == ROUTE_SMTP ? SMTPC_SMTP : SMTPC_LMTP;
	if (kind == ROUTE_LMTP_UNIX) {
		snprintf(t.unix_path, sizeof(t.unix_path), "%.*s",
			 (int)sizeof(t.unix_path) - 1, path);
	} else {
		snprintf(t.host, sizeof(t.host), "%s", host);
		t.port = port;
	}
	smtpc_params_defaults(&p);
	p.helo_name = cp_hostname(cp);
	if (cfg->connect_timeout_ms)
		p.connect_timeout_ms = cfg->connect_timeout_ms;
	if (cfg->cmd_timeout_ms)
		p.cmd_timeout_ms = cfg->cmd_timeout_ms;
	if (cfg->data_timeout_ms)
		p.data_timeout_ms = cfg->data_timeout_ms;
	if (cap_ms) {
		p.connect_timeout_ms = FD_MIN(p.connect_timeout_ms, cap_ms);
		p.cmd_timeout_ms = FD_MIN(p.cmd_timeout_ms, cap_ms);
		p.data_timeout_ms = FD_MIN(p.data_timeout_ms, cap_ms);
	}
	/* STARTTLS per the route (queue.h: resolved against --smtp-tls);
	 * not over a unix socket, which never leaves the machine. */
	if (kind != ROUTE_LMTP_UNIX && tls != ROUTE_TLS_NONE) {
		char err_text[300];
		p.tls = tls == ROUTE_TLS_VERIFY	   ? SMTPC_TLS_VERIFY
			: tls == ROUTE_TLS_ENCRYPT ? SMTPC_TLS_ENCRYPT
						   : SMTPC_TLS_MAY;
		p.tls_ctx = tls_ctx_for(tls_ca, err_text, sizeof(err_text));
		if (!p.tls_ctx && p.tls != SMTPC_TLS_MAY) {
			memset(why, 0, sizeof(*why));
			why->code = 451;
			why->local = true;
			snprintf(why->enh, sizeof(why->enh), "4.7.5");
			snprintf(why->text, sizeof(why->text),
				 "451 4.7.5 TLS required: %s", err_text);
			return NULL;
		}
	}
	return smtpc_connect(&t, &p, why, &err);
}

static struct smtpc *
conn_get(struct cplane *cp, const struct q_dest *d, struct conn_cache *cc,
	 struct smtpc_reply *why, bool *reused)
{
	*reused = false;
	if (cc->c && strcmp(cc->key, d->key) == 0) {
		if (smtpc_reusable(cc->c)) {
			*reused = true;
			return cc->c;
		}
		cache_drop(cc, false); /* closed by the peer, or out of step */
	}
	cache_drop(cc, true);
	int tls;
	char ca[sizeof(d->tls_ca)];
	cp_dest_tls(cp, d, &tls, ca, sizeof(ca)); /* a reload rewrites them */
	cc->c = deliver_connect(cp, d->kind, d->host, d->port, d->path, tls,
				ca, 0, why);
	if (!cc->c)
		return NULL;
	snprintf(cc->key, sizeof(cc->key), "%s", d->key);
	cc->uses = 0;
	return cc->c;
}

/* ---- jobs --------------------------------------------------------------- */

/* SMTP/LMTP rules that bounce before anything is sent; true if it did. */
static bool
precheck(const struct q_msg *m, struct smtpc *c, struct q_job *j)
{
	unsigned ext = smtpc_exts(c);
	uint64_t lim = smtpc_size_limit(c);
	const char *why = NULL;

	if (m->smtputf8 && !(ext & SMTPC_EXT_SMTPUTF8))
		why = "550 5.6.7 the next hop does not support SMTPUTF8, "
		      "which this message requires";
	else if (m->body_type == FD_BODY_BINARYMIME &&
		 (~ext & (SMTPC_EXT_CHUNKING | SMTPC_EXT_BINARYMIME)))
		why = "554 5.6.3 the next hop does not support CHUNKING and "
		      "BINARYMIME, which a BINARYMIME message requires";
	else if (lim && m->body_len > lim)
		why = "552 5.3.4 message larger than the next hop accepts";
	if (!why)
		return false;
	for (unsigned i = 0; i < j->n; i++)
		outcome_set(&j->res->out[i], QO_BOUNCED, why);
	return true;
}

/* One job of a batch on its way through smtpc_send_many(). */
struct sjob {
	const char *rcpts[QJ_MAX_RCPTS], *orcpts[QJ_MAX_RCPTS];
	uint8_t notify[QJ_MAX_RCPTS];
	struct smtpc_msg sm;
	struct q_body body;
	struct q_fp fp;
	struct smtpc_reply *rcpt, *data; /* its n replies each */
	bool final; /* outcome set; not in (another) round */
	bool retry; /* never reached the peer: once more on a new connection */
};

/*
 * SMTP/LMTP for jobs[0..nj) (one next hop): one transaction each over the
 * thread's connection, pipelined (smtpc_send_many). If the cached
 * connection turns out dead (the peer closed it while idle) before a
 * message reached the peer, those messages go once more on a new one.
 */
static void
run_smtp(struct cplane *cp, struct q_job **jobs, unsigned nj,
	 struct conn_cache *cc, struct attempt_wait *aw)
{
	struct sjob *sj = calloc(nj, sizeof(*sj));
	struct smtpc_tx *tx = calloc(nj, sizeof(*tx));
	unsigned *txj = calloc(nj, sizeof(*txj)), total = 0, ntx;
	struct smtpc_reply *reps, why;
	struct q_dest *d = jobs[0]->dest;
	bool reused;
	int r = 0;

	for (unsigned k = 0; k < nj; k++)
		total += jobs[k]->n;
	reps = calloc(total * 2 + 1, sizeof(*reps));
	if (!sj || !tx || !txj || !reps) {
		for (unsigned k = 0; k < nj; k++)
			for (unsigned i = 0; i < jobs[k]->n; i++)
				outcome_set(&jobs[k]->res->out[i], QO_DEFERRED,
					    "4.3.0 out of memory");
		goto out;
	}
	total = 0;
	for (unsigned k = 0; k < nj; k++) {
		struct q_job *j = jobs[k];
		const struct q_msg *m = j->m;
		struct sjob *s = &sj[k];
		for (unsigned i = 0; i < j->n; i++) {
			const struct q_rcpt *rc = &m->rcpts[j->idx[i]];
			s->rcpts[i] = rc->addr;
			s->orcpts[i] = rc->orcpt;
			s->notify[i] = rc->notify;
		}
		s->sm.mail_from = m->sender;
		s->sm.rcpts = s->rcpts;
		s->sm.n_rcpts = j->n;
		s->sm.notify = s->notify;
		s->sm.orcpts = s->orcpts;
		s->sm.envid = m->envid;
		s->sm.ret = m->ret;
		s->sm.size = m->body_len;
		s->sm.body_type = m->body_type;
		s->sm.smtputf8 = m->smtputf8;
		s->sm.body = q_body_read;
		s->sm.body_ctx = &s->body;
		s->retry = true;
		s->rcpt = reps + total;
		s->data = reps + total + j->n;
		total += 2 * j->n;
	}
	for (int round = 0; round < 2; round++) {
		struct smtpc *c = conn_get(cp, d, cc, &why, &reused);
		bool again = false;

		if (!c) {
			char buf[600];
			bool first = true;
			snprintf(buf, sizeof(buf), "%s%s",
				 why.local ? "4.4.1 " : "", why.text);
			/* No session, whatever the greeting said (even a
			 * 5xx: like Postfix skipping a 5xx greeting, the
			 * recipients are retried, never bounced for it).
			 * One failure for the window, however many jobs. */
			for (unsigned k = 0; k < nj; k++) {
				if (sj[k].final || !sj[k].retry)
					continue;
				for (unsigned i = 0; i < jobs[k]->n; i++)
					outcome_set(&jobs[k]->res->out[i],
						    QO_DEFERRED, buf);
				jobs[k]->conn_failed = true;
				jobs[k]->no_feedback = !first;
				first = false;
				sj[k].final = true;
			}
			break;
		}
		ntx = 0;
		for (unsigned k = 0; k < nj; k++) {
			struct q_job *j = jobs[k];
			if (sj[k].final || !sj[k].retry)
				continue;
			snprintf(j->res->relay, sizeof(j->res->relay), "%s",
				 smtpc_peer_name(c));
			snprintf(j->res->tls, sizeof(j->res->tls), "%s",
				 smtpc_tls_desc(c));
			if (precheck(j->m, c, j)) {
				sj[k].final = true;
				continue;
			}
			q_body_fini(&sj[k].body);
			q_body_init(&sj[k].body, j->m);
			sj[k].body.before_last = wait_attempt;
			sj[k].body.before_last_ctx = aw;
			if (j->want_fp && q_fp_begin(&sj[k].fp, j->m) == 0)
				sj[k].body.fp = &sj[k].fp;
			tx[ntx].m = &sj[k].sm;
			tx[ntx].rcpt = sj[k].rcpt;
			tx[ntx].data = sj[k].data;
			txj[ntx++] = k;
		}
		if (ntx == 0)
			break;
		r = smtpc_send_many(c, tx, ntx);
		cc->last_us = fd_now_monotonic_us();
		cc->uses += ntx;
		for (unsigned t = 0; t < ntx; t++) {
			struct q_job *j = jobs[txj[t]];
			struct sjob *s = &sj[txj[t]];
			j->damaged |= s->body.damaged;
			if (s->body.fp_ok) {
				memcpy(j->res->fp, s->body.fp_out, 32);
				j->res->fp_ok = true;
			}
			s->retry = r != 0 && reused && round == 0 &&
				   tx[t].rc < 0 && !tx[t].last_out &&
				   (tx[t].mail.code == 0 || tx[t].mail.local) &&
				   !s->body.damaged;
			again |= s->retry;
			if (s->retry)
				continue;
			s->final = true;
			j->dup_risk = tx[t].rc < 0 && tx[t].last_out;
			if (tx[t].mail.code && tx[t].mail.code / 100 != 2) {
				/* MAIL refused: the same answer for all. */
				for (unsigned i = 0; i < j->n; i++)
					outcome_reply(&j->res->out[i],
						      &tx[t].mail);
				continue;
			}
			for (unsigned i = 0; i < j->n; i++) {
				outcome_reply(&j->res->out[i], &tx[t].data[i]);
				/* smtpc passes NOTIFY/ORCPT/RET/ENVID where
				 * DSN is offered: the next hop reports */
				j->res->out[i].dsn_passed =
					(smtpc_exts(c) & SMTPC_EXT_DSN) != 0;
			}
		}
		if (r != 0)
			cache_drop(cc, false);
		if (!again)
			break;
	}
out:
	for (unsigned k = 0; sj && k < nj; k++)
		q_body_fini(&sj[k].body);
	free(reps);
	free(txj);
	free(tx);
	free(sj);
}

/*
 * The Maildir mailbox of an address, as the SMTP engine understood it:
 * the local part without its quotes ("bob" is bob, RFC 5322 3.2.4: the
 * quotes and backslashes are not part of it), the domain without the one
 * trailing dot the engine tolerates, a bare postmaster at the first
 * accepted domain. Until 2026-12-05 each spelling made a mailbox of its
 * own ("bob", example.com.) that nobody reads.
 */
static void
split_addr(struct cplane *cp, const char *addr, char *local, size_t llen,
	   char *domain, size_t dlen)
{
	const char *at = strrchr(addr, '@');
	size_t n = at ? (size_t)(at - addr) : strlen(addr);
	const char *dom = at ? at + 1 : cp_postmaster_domain(cp);
	size_t dn = fd_domain_len(dom, strlen(dom));

	fd_local_part(addr, n, local, llen);
	snprintf(domain, dlen, "%.*s", (int)dn, dom);
}

static void
run_maildir(struct cplane *cp, struct q_job *j, struct attempt_wait *aw)
{
	const struct q_msg *m = j->m;

	snprintf(j->res->relay, sizeof(j->res->relay), "maildir");
	for (unsigned i = 0; i < j->n; i++) {
		const struct q_rcpt *rc = &m->rcpts[j->idx[i]];
		struct maildir_result res;
		struct q_body body;
		char prefix[1200], local[512], domain[256];
		char text[600];

		split_addr(cp, rc->addr, local, sizeof(local), domain,
			   sizeof(domain));
		snprintf(prefix, sizeof(prefix),
			 "Return-Path: <%s>\r\nDelivered-To: %s\r\n",
			 m->sender, rc->addr);
		struct q_fp fp;

		q_body_init(&body, m);
		body.before_last = wait_attempt;
		body.before_last_ctx = aw;
		if (j->want_fp && !j->res->fp_ok && q_fp_begin(&fp, m) == 0)
			body.fp = &fp;
		maildir_deliver(j->dest->path, domain, local, prefix,
				q_body_read, &body, m->body_len, &res);
		j->damaged |= body.damaged;
		if (body.fp_ok) {
			memcpy(j->res->fp, body.fp_out, 32);
			j->res->fp_ok = true;
		}
		q_body_fini(&body);
		snprintf(text, sizeof(text), "%s %s",
			 res.status == 0 ? "250" : res.permanent ? "550"
								  : "451",
			 res.text);
		if (!strstr(res.text, res.enh))
			snprintf(text, sizeof(text), "%s %s %s",
				 res.status == 0	? "250"
				 : res.permanent ? "550"
						 : "451",
				 res.enh, res.text);
		outcome_set(&j->res->out[i],
			    res.status == 0 ? QO_DELIVERED
			    : res.permanent ? QO_BOUNCED
					    : QO_DEFERRED,
			    text);
		snprintf(j->res->out[i].enh, sizeof(j->res->out[i].enh), "%s",
			 res.enh);
	}
}

/* An RFC 3463 code "C.S.D" (C 4 or 5, S and D 1-3 digits) at p, ended by
 * a space or the end: its length, else 0. */
static size_t
enh_at(const char *p)
{
	size_t i = 0;

	if (p[0] != '4' && p[0] != '5')
		return 0;
	i = 1;
	for (int part = 0; part < 2; part++) {
		size_t d = 0;
		if (p[i++] != '.')
			return 0;
		while (d < 4 && p[i] >= '0' && p[i] <= '9') {
			i++;
			d++;
		}
		if (d == 0 || d > 3)
			return 0;
	}
	return p[i] == '\0' || p[i] == ' ' ? i : 0;
}

/*
 * The Status of a failed recipient from its reason: the enhanced code
 * where a reply carries one, first ("4.4.1 421 ...", our own) or right
 * after the reply code ("550 5.1.1 ..."); else 5.0.0. Not a d.d.d found
 * anywhere: "550 Your IP 45.12.3.9 is listed" was Status 5.12.3.
 */
static void
status_of(const char *reason, bool expired, char *out, size_t len)
{
	const char *p = reason ? reason : "";
	size_t n;

	if (expired) {
		snprintf(out, len, "4.4.7");
		return;
	}
	while (*p == ' ')
		p++;
	if (p[0] >= '2' && p[0] <= '5' && p[1] >= '0' && p[1] <= '9' &&
	    p[2] >= '0' && p[2] <= '9' && (p[3] == ' ' || p[3] == '-'))
		p += 4;
	n = enh_at(p);
	if (n) {
		snprintf(out, len, "%.*s", (int)n, p);
		return;
	}
	snprintf(out, len, "5.0.0");
}

static bool
memchr_8bit(const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)p[i] >= 0x80)
			return true;
	return false;
}

static void
run_bounce(struct cplane *cp, struct q_job *j, struct conn_cache *cc,
	   struct attempt_wait *aw)
{
	const struct q_msg *m = j->m;
	struct dsn_rcpt dr[QJ_MAX_RCPTS];
	char status[QJ_MAX_RCPTS][16];
	struct dsn_params dp;
	struct dsn_buf out = {0};
	struct q_body body;
	struct mem_body mb;
	bool any_failed = false;
	int r;

	for (unsigned i = 0; i < j->n; i++) {
		const struct q_rcpt *rc = &m->rcpts[j->idx[i]];
		enum dsn_action a = DSN_ACTION_FAILED;

		if (rc->state == QR_DELIVERED) {
			/* NOTIFY=SUCCESS (qmgr: success owed) */
			a = rc->success == Q_SUCCESS_RELAYED
				    ? DSN_ACTION_RELAYED
				    : DSN_ACTION_DELIVERED;
			snprintf(status[i], sizeof(status[i]), "2.0.0");
		} else {
			status_of(j->reasons[i], rc->state == QR_EXPIRED,
				  status[i], sizeof(status[i]));
			any_failed = true;
		}
		dr[i] = (struct dsn_rcpt){
			.addr = rc->addr,
			.orcpt = rc->orcpt,
			.action = a,
			.status = status[i],
			.remote_mta = j->mtas[i],
			.diag = j->reasons[i],
			.last_attempt_us = rc->last_us,
		};
	}
	memset(&dp, 0, sizeof(dp));
	dp.reporting_mta = cp_hostname(cp);
	dp.orig_sender = m->sender;
	dp.envid = m->envid;
	/* RET=FULL asks for the message in a "failed" report only (RFC 3461
	 * 4.3): a report of successes returns its headers. */
	dp.ret = any_failed ? m->ret : FD_RET_HDRS;
	dp.arrival_us = m->arrival_us;
	dp.now_us = fd_now_realtime_us();
	dp.msgid = m->id;
	dp.full_limit = 64 * 1024;
	q_body_init(&body, m);
	r = dsn_build(&dp, dr, j->n, q_body_read, &body, m->body_len, &out);
	j->damaged |= body.damaged;
	q_body_fini(&body);
	if (r != 0) {
		outcome_set(&j->res->out[0], QO_DEFERRED,
			    "451 4.3.0 could not build the DSN");
		dsn_buf_free(&out);
		return;
	}
	mb = (struct mem_body){.p = out.p, .len = out.len,
			       .before_last = wait_attempt, .ctx = aw};
	if (j->dest->kind == ROUTE_MAILDIR) {
		struct maildir_result res;
		char local[512], text[600], domain[256];
		split_addr(cp, m->sender, local, sizeof(local), domain,
			   sizeof(domain));
		maildir_deliver(j->dest->path, domain, local,
				"Return-Path: <>\r\n", mem_body_read, &mb,
				out.len, &res);
		snprintf(text, sizeof(text), "%s %s",
			 res.status == 0 ? "250" : res.permanent ? "550"
								  : "451",
			 res.text);
		outcome_set(&j->res->out[0],
			    res.status == 0 ? QO_DELIVERED
			    : res.permanent ? QO_BOUNCED
					    : QO_DEFERRED,
			    text);
	} else {
		const char *rcpt = m->sender;
		struct smtpc_reply rr, drr, why;
		struct smtpc_msg sm;
		struct smtpc_tx tx;
		bool reused;
		struct smtpc *c = conn_get(cp, j->dest, cc, &why, &reused);
		if (!c) {
			outcome_set(&j->res->out[0], QO_DEFERRED, why.text);
			j->conn_failed = true;
		} else {
			memset(&sm, 0, sizeof(sm));
			sm.mail_from = "";
			sm.rcpts = &rcpt;
			sm.n_rcpts = 1;
			sm.size = out.len;
			/* A report quoting 8-bit headers says 8bit: say so. */
			sm.body_type = memchr_8bit(out.p, out.len)
					       ? FD_BODY_8BITMIME
					       : FD_BODY_NONE;
			/* A UTF-8 envelope sender (RFC 6531) is a recipient
			 * only SMTPUTF8 can name: ask for it (without it the
			 * next hop refuses the address, 553 5.6.7). */
			sm.smtputf8 = memchr_8bit(rcpt, strlen(rcpt));
			sm.body = mem_body_read;
			sm.body_ctx = &mb;
			/* One transaction, as smtpc_send(), with last_out:
			 * the report went out and no reply came (RFC 1047)
			 * is a possible duplicate, logged as a message's. */
			memset(&tx, 0, sizeof(tx));
			tx.m = &sm;
			tx.rcpt = &rr;
			tx.data = &drr;
			r = smtpc_send_many(c, &tx, 1);
			if (r != 0)
				cache_drop(cc, false);
			j->dup_risk = tx.rc < 0 && tx.last_out;
			if (tx.mail.code &&
			    (tx.mail.code < 200 || tx.mail.code >= 300))
				outcome_reply(&j->res->out[0], &tx.mail);
			else
				outcome_reply(&j->res->out[0], &drr);
			snprintf(j->res->relay, sizeof(j->res->relay), "%s",
				 c && r == 0 ? smtpc_peer_name(c) : "");
			snprintf(j->res->tls, sizeof(j->res->tls), "%s",
				 c && r == 0 ? smtpc_tls_desc(c) : "");
		}
	}
	dsn_buf_free(&out);
}

/* The attempt of each job on record (one ATTEMPT per recipient, one for a
 * bounce) before anything can reach the next hop's disk; aw gets the
 * newest record, waited for just before the first final bytes go out. */
static void
log_attempts(struct cplane *cp, struct q_job **jobs, unsigned nj,
	     struct attempt_wait *aw)
{
	struct dlog *log = cp_log(cp);
	uint64_t now = fd_now_realtime_us();

	aw->log = log;
	for (unsigned k = 0; k < nj; k++) {
		struct q_job *j = jobs[k];
		for (unsigned i = 0; i < j->n && log; i++) {
			/* a DSN's too: one per recipient it reports on, so
			 * that its DSN_DONE closes it (an ATTEMPT for ALL
			 * left every other recipient looking in flight at
			 * the next start: possible duplicates over-counted) */
			struct dlog_rec rec = {
				.type = DLOG_ATTEMPT,
				.msgid = j->m->id,
				.rcpt = j->idx[i],
				.time_us = now,
				.text = j->dest->key,
				.text_len = (uint16_t)strlen(j->dest->key),
			};
			j->attempt_lsn = dlog_append(log, &rec);
			if (!j->attempt_lsn)
				aw->refused = true;
			aw->lsn = j->attempt_lsn;
		}
	}
}

/*
 * The delivery log failed (an I/O error is permanent until a restart
 * reopens it): no attempt can be put on record, so none is made. Without
 * the record a delivery would be sent again after the restart, and not
 * counted as a possible duplicate. Every job is deferred without contacting
 * its next hop; the mail stays queued (and in the spool) for the restart.
 */
static void
defer_unlogged(struct q_job **jobs, unsigned nj)
{
	for (unsigned k = 0; k < nj; k++) {
		struct q_job *j = jobs[k];
		unsigned nout = j->kind == QJ_BOUNCE ? 1 : j->n;

		j->no_feedback = true; /* the next hop was not asked */
		for (unsigned i = 0; i < nout; i++) {
			outcome_set(&j->res->out[i], QO_DEFERRED,
				    "451 4.3.0 delivery log failed: not "
				    "attempted until finaldot is restarted");
			snprintf(j->res->out[i].enh,
				 sizeof(j->res->out[i].enh), "4.3.0");
		}
	}
}

/*
 * QJ_MOVE: the message into its own file in spool/moved/ (moved.h), read
 * through the same body reader as a delivery (its CRC checked: a damaged
 * copy is not moved). The queue manager points the message at the file
 * once this says it is durable.
 */
static void
run_move(struct cplane *cp, struct q_job *j)
{
	const struct q_msg *m = j->m;
	const char **rcpts = calloc(m->n_rcpts ? m->n_rcpts : 1,
				    sizeof(*rcpts));
	const char **orcpts = calloc(m->n_rcpts ? m->n_rcpts : 1,
				     sizeof(*orcpts));
	uint8_t *notify = calloc(m->n_rcpts ? m->n_rcpts : 1, 1);
	bool any_notify = false, any_orcpt = false;
	struct fd_envelope env;
	struct q_body body;

	if (!rcpts || !orcpts || !notify) {
		j->res->move_err = -ENOMEM;
		goto out;
	}
	for (unsigned i = 0; i < m->n_rcpts; i++) {
		rcpts[i] = m->rcpts[i].addr;
		orcpts[i] = m->rcpts[i].orcpt;
		notify[i] = m->rcpts[i].notify;
		any_notify |= notify[i] != 0;
		any_orcpt |= orcpts[i][0] != '\0';
	}
	memset(&env, 0, sizeof(env));
	env.mail_from = m->sender;
	env.rcpts = rcpts;
	env.n_rcpts = m->n_rcpts;
	env.helo = m->helo;
	env.client_addr = m->client;
	env.proto = "ESMTP";
	env.arrival_us = m->arrival_us;
	env.body = (enum fd_body_type)m->body_type;
	env.smtputf8 = m->smtputf8;
	env.envid = m->envid;
	env.ret = (enum fd_dsn_ret)m->ret;
	env.notify = any_notify ? notify : NULL;
	env.orcpts = any_orcpt ? orcpts : NULL;
	q_body_init(&body, m);
	j->res->move_err = moved_write(cp_config_of(cp)->spool_dir, m->id,
				       m->worker, &env, m->body_len,
				       m->body_crc, q_body_read, &body,
				       &j->res->move_body_off);
	j->damaged |= body.damaged;
	q_body_fini(&body);
out:
	free(rcpts);
	free(orcpts);
	free(notify);
}

/* Jobs taken together (cp_job_take: one next hop; a bounce or a Maildir
 * job alone). */
static void
run_jobs(struct cplane *cp, struct q_job **jobs, unsigned nj,
	 struct conn_cache *cc)
{
	struct attempt_wait aw = {0};
	uint64_t t0 = fd_now_monotonic_us(), wire;

	if (jobs[0]->kind == QJ_MOVE) {
		/* no attempt: nothing leaves the machine */
		for (unsigned k = 0; k < nj; k++)
			run_move(cp, jobs[k]);
		return;
	}
	log_attempts(cp, jobs, nj, &aw);
	if (aw.refused || (aw.log && dlog_error(aw.log))) {
		defer_unlogged(jobs, nj);
		return;
	}
	if (jobs[0]->kind == QJ_BOUNCE) {
		for (unsigned k = 0; k < nj; k++)
			run_bounce(cp, jobs[k], cc, &aw);
	} else if (jobs[0]->dest->kind == ROUTE_MAILDIR) {
		for (unsigned k = 0; k < nj; k++)
			run_maildir(cp, jobs[k], &aw);
	} else {
		run_smtp(cp, jobs, nj, cc, &aw);
	}
	/* The next hop's share of the batch per job, the wait for the
	 * delivery log taken out (the queue manager's measure of a fast next
	 * hop: q_dest.job_us). */
	wire = fd_now_monotonic_us() - t0;
	wire = wire > aw.waited_us ? wire - aw.waited_us : 0;
	for (unsigned k = 0; k < nj; k++)
		jobs[k]->wire_us = wire / nj;
	for (unsigned k = 0; k < nj; k++)
		if (jobs[k]->dup_risk)
			fd_log(FD_LOG_WARN, "deliver",
			       "%016" PRIx64 " event=reply_lost route=%s "
			       "note=\"the message may have been delivered; "
			       "it is deferred and will be sent again\"",
			       jobs[k]->m->id, jobs[k]->dest->key);
}

void *
deliver_main(void *arg)
{
	struct deliver_ctx *dc = arg;
	struct cplane *cp = dc->cp;
	struct conn_cache cc;
	struct q_job *jobs[QJ_BATCH_FAST];

	memset(&cc, 0, sizeof(cc));
	/* Below acceptance when asked (delivery_nice): when a load fills
	 * the CPUs, the workers and the kernel work behind each spool flush
	 * get them first and delivery takes what is left. */
	(void)fd_thread_nice_by(cp_config_of(cp)->delivery_nice, "deliver");
	for (unsigned nj = 0;;) {
		/* The last batch goes back in the same call that takes
		 * the next one (the thread keeps its slot). */
		nj = cp_job_take(cp, jobs, nj, cc.c ? cc.key : NULL, 1000,
				 jobs, QJ_BATCH_FAST);
		if (nj == 0) {
			if (cc.c &&
			    fd_now_monotonic_us() - cc.last_us > CONN_IDLE_US)
				cache_drop(&cc, true);
			if (cp_quitting(cp))
				break;
			continue;
		}
		run_jobs(cp, jobs, nj, &cc);
	}
	cache_drop(&cc, true);
	return NULL;
}
