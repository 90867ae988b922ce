/*
 * The queue manager: the control plane's one owner thread (contracts in
 * cplane.h, qmgr.h and queue.h).
 *
 * Its loop, every iteration (at most every 10 ms when idle, at once when a
 * delivery thread hands a result back):
 *   1. drain every worker's port: the tailers turn durable records into
 *      queued messages (due now; a tailer reads what became durable in
 *      batches of up to 512 KiB or 5 ms, tail.h);
 *   2. apply delivery results: per-recipient outcomes, destination
 *      feedback, DSNs, the delivery log;
 *   3. schedule what is due (a min-heap of messages by next attempt):
 *      recipients grouped by destination into jobs, jobs queued per
 *      destination (first attempts and retries in two lists, taken in
 *      turn, so new mail is not starved behind a backlog of retries);
 *   4. dispatch: each destination gets jobs handed to the delivery threads
 *      while it has fewer out than its concurrency window (connections)
 *      times QJ_BATCH; a thread takes a batch of them (cp_job_take);
 *   5. release finished messages whose last log record is durable (their
 *      segment references drop), and send reclaim requests for sealed
 *      segments nothing references any more;
 *   6. checkpoint the delivery log when it is large.
 *
 * Destination scheduling follows Postfix's qmgr (SCHEDULER_README): a
 * concurrency window per next hop that starts at 5 (or the maximum, if
 * lower), grows by 1/window per success up to dest_concurrency, shrinks by
 * one per connection-level failure; two such failures in a row without a
 * success mark the next hop dead for retry_min: its queued recipients are
 * deferred at once ("delivery temporarily suspended") instead of waiting
 * for connections that will fail. The window counts connections (delivery
 * threads working for the next hop, each with up to QJ_BATCH jobs): a slow
 * next hop holds at most its window of delivery threads, never the
 * acceptance path.
 *
 * Retries: the n-th deferral waits retry_min * 2^(n-1), at most retry_max,
 * with +-25% jitter; a recipient still deferred after queue_lifetime
 * expires and is bounced.
 *
 * Crash rules (docs/delivery.md): a recipient is recorded DELIVERED only
 * after the next hop accepted it; an ATTEMPT record is durable before the
 * final dot goes out, so an attempt cut short by a crash is known and
 * counted (event=possible_duplicates at start); a message's segments are
 * handed back only once its final records are durable.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <fcntl.h>
#include <dirent.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "control/cplane.h"
#include "control/deliver.h"
#include "control/dlog.h"
#include "control/qmgr.h"
#include "control/rcptdb.h"
#include "control/verify.h"
#include "control/metrics.h"
#include "control/moved.h"
#include "control/route.h"
#include "control/spool_reader.h"
#include "control/tail.h"
#include <openssl/evp.h>

#include "finaldot/compiler.h"
#include "finaldot/crc32c.h"
#include "finaldot/fsync.h"
#include "finaldot/ctlport.h"
#include "finaldot/log.h"
#include "finaldot/msgid.h"

#define SEG_BUCKETS 4096u
#define DEST_BUCKETS 1024u
#define INIT_WINDOW 5.0
/* A next hop that takes a whole batch (QJ_BATCH jobs at its moving average
 * per job, the wait for the delivery log not counted) in less than this is
 * fast: its jobs wait for a thread already working for it and go in whole
 * batches, and a job waits at most this long for that before another
 * thread is woken for it (coalesce_stale). */
#define COALESCE_US 10000.0

struct cp_routing {
	struct route_table *rt;
	struct route_target def;    /* --relay, or the default route */
	struct route_target bounce; /* --bounce-relay */
	bool have_bounce;
	bool have_def;              /* false: routes, no relay */
	int def_tls;                /* enum route_tls: --smtp-tls */
	char tls_ca[256];           /* --smtp-tls-ca */
	/* The domain of a bare <postmaster> (RFC 5321 4.5.1: accepted
	 * without one): the first accepted domain, "" if there is none. */
	char pm_domain[256];
};

static void
routing_free(struct cp_routing *rg)
{
	if (!rg)
		return;
	route_table_free(rg->rt);
	free(rg);
}

static inline struct cp_routing *
routing_of(const struct cplane *cp);

struct cplane {
	struct cp_config cfg;
	char spool_dir[4096];
	uint64_t ckpt_not_before; /* no delivery-log checkpoint before this
				   * (monotonic us): one failed */
	uint64_t replay_max_id[256]; /* per worker: largest id replayed */
	/* when the routing / the recipients table was last swapped by a
	 * reload (monotonic us): see retire_grace() */
	uint64_t routing_swapped_us, rcpts_swapped_us;
	char hostname[256];
	struct route_table *routes;
	/* Where mail goes (routes, relay, bounce relay, TLS default): one
	 * object, swapped whole by a reload (cp_reload) and read by the
	 * queue manager and by worker and probe threads (verify_open); the
	 * replaced one is retired until the next reload. route_gen counts
	 * swaps: a message re-resolves its recipients' next hops when its
	 * route_gen is older. */
	struct cp_routing *_Atomic routing;
	struct cp_routing *routing_retired;
	uint32_t route_gen;
	/* The accepted domains after a reload (cfg.domains points here; only
	 * this thread reads them: bounces to senders in them are routed like
	 * mail to them). NULL until the first reload. */
	char *dom_store;
	const char **dom_ptrs;
	/* --recipients: read by every worker at RCPT time. A reload swaps
	 * in a new table and keeps the one it replaced until the next
	 * reload: a check that loaded the old pointer a moment ago has long
	 * finished by then (reloads are an operator's, seconds apart). */
	struct rcptdb *_Atomic rcpts;
	struct rcptdb *rcpts_retired;
	char rcpts_path[4096]; /* a reload's recipients file */
	struct verify *verify; /* --verify-recipients: probes */
	struct dlog *log;

	unsigned nworkers;
	struct fd_ctl_port *ports;
	struct tail **tails;

	struct q_seg *seg_h[SEG_BUCKETS];
	size_t n_segs;
	struct q_seg **reclaimable; /* candidates to re-check */
	size_t n_reclaimable, cap_reclaimable;
	/* moved messages: the delivery threads' pseudo next hop for QJ_MOVE
	 * jobs (not in dest_h: no route, no metrics), moves out now, the
	 * next look for segments to empty (monotonic) */
	struct q_dest *mover;
	unsigned moves_out;
	uint64_t move_next_us;

	struct q_msg **msg_h;
	size_t msg_cap, n_msgs;
	/* heap_set() could not grow the heap: some message waiting for a
	 * delivery is in no heap; heap_recover() finds it */
	bool heap_lost;
	bool heap_fault_done; /* test seam heap-grow-fail: fired once */
	size_t n_class[3]; /* unfinished messages by msg_class() */
	struct q_msg **heap;
	size_t heap_n, heap_cap;
	struct q_msg *fin_head;     /* finished, waiting for the log */
	struct q_msg *rel_head;     /* released, waiting for reclaim */
	bool reclaims_heard;        /* RECLAIMED since the last sweep */

	struct q_dest *dest_h[DEST_BUCKETS];
	struct q_dest *ready_head, *ready_tail;

	/* hand-off with the delivery threads */
	pthread_mutex_t mu;
	struct job_waiter *idle; /* waiting for jobs, latest first */
	pthread_cond_t res_cv;
	struct q_job *jobs_head, *jobs_tail;
	struct q_job *res_head, *res_tail;
	bool quit;          /* delivery threads: exit when idle */
	unsigned jobs_out;  /* handed out, result not yet applied */
	struct cp_call *calls_head, *calls_tail; /* operator requests */
	pthread_cond_t call_cv;
	uint64_t started_us;
	/* published by the queue manager each iteration (under mu) */
	struct cp_stats pub;

	pthread_t thr;
	bool thr_started;
	pthread_t *dthr;
	unsigned n_dthr;
	_Atomic bool stop;
	_Atomic bool stopped; /* qmgr loop ended */
	uint64_t rng;

	struct deliver_ctx dctx;

	/* RFC 1047: messages whose 250 may not have arrived (fingerprint
	 * table, chained by the fingerprint's first bytes), and the
	 * fingerprints of recently freed messages (a table by message id)
	 * for in-doubt news that comes after a message was delivered and
	 * freed. */
	struct indoubt *id_h[1024];
	size_t n_indoubt;
	struct recent_fp *recent;
	/* queued messages by env_key() (EKEY_BUCKETS chains through enext):
	 * in-doubt news looks for resends of the same envelope there, not
	 * in the whole queue (with dedup only) */
#define EKEY_BUCKETS (1u << 16)
	struct q_msg **ekey_h;
	uint64_t st_indoubt, st_suppressed, st_indoubt_unknown;

	/* counters */
	uint64_t st_queued, st_delivered, st_deferred, st_bounced;
	uint64_t st_expired, st_dsn_sent, st_dsn_dropped, st_released;
	uint64_t st_damaged; /* held: body checksum mismatch */
	bool log_failure_told; /* event=delivery_stopped logged */
	uint64_t st_reclaim_sent, st_reclaimed;
	uint64_t st_moved, st_move_failed;
	unsigned n_pub; /* routes with a /metrics series of their own */
};


const char *
q_rstate_name(enum q_rstate s)
{
	switch (s) {
	case QR_PENDING: return "pending";
	case QR_DELIVERED: return "delivered";
	case QR_BOUNCED: return "bounced";
	case QR_EXPIRED: return "expired";
	case QR_DELETED: return "deleted";
	case QR_SUPPRESSED: return "suppressed";
	}
	return "?";
}

/* A route key's hash (FNV-1a): its bucket, and the tag of a key cut for
 * /metrics. */
static uint32_t
key_hash(const char *k)
{
	uint32_t h = 2166136261u;

	for (; *k; k++)
		h = (h ^ (unsigned char)*k) * 16777619u;
	return h;
}

static uint64_t
hash64(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33;
	return x;
}

static uint64_t
rnd(struct cplane *cp)
{
	cp->rng ^= cp->rng << 13;
	cp->rng ^= cp->rng >> 7;
	cp->rng ^= cp->rng << 17;
	return cp->rng;
}

/* ---- segments ---------------------------------------------------------- */

static size_t
seg_bucket(unsigned worker, uint64_t use_seq)
{
	return (size_t)(hash64(use_seq * 256 + worker) & (SEG_BUCKETS - 1));
}

static struct q_seg *
seg_lookup(struct cplane *cp, unsigned worker, uint64_t use_seq)
{
	for (struct q_seg *s = cp->seg_h[seg_bucket(worker, use_seq)]; s;
	     s = s->hnext)
		if (s->worker == worker && s->use_seq == use_seq)
			return s;
	return NULL;
}

struct q_seg *
qm_seg_get(struct cplane *cp, unsigned worker, uint64_t file_no,
	   uint64_t use_seq)
{
	struct q_seg *s = seg_lookup(cp, worker, use_seq);
	size_t b;

	if (s)
		return s;
	s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->worker = worker;
	s->file_no = file_no;
	s->use_seq = use_seq;
	snprintf(s->path, sizeof(s->path), "%s/w%02x/%08" PRIx64 ".seg",
		 cp->spool_dir, worker, file_no);
	s->fd = fd_open_noatime(s->path, O_RDONLY | O_CLOEXEC);
	if (s->fd < 0)
		fd_log(FD_LOG_ERR, "qmgr",
		       "event=segment_open_failed path=%s error=\"%s\"",
		       s->path, strerror(errno));
	else /* read where told, nothing ahead: the rest may be unwritten */
		posix_fadvise(s->fd, 0, 0, POSIX_FADV_RANDOM);
	b = seg_bucket(worker, use_seq);
	s->hnext = cp->seg_h[b];
	cp->seg_h[b] = s;
	cp->n_segs++;
	return s;
}

static void
seg_consider(struct cplane *cp, struct q_seg *s)
{
	if (!s->sealed || s->refs || s->reclaim_sent || s->reclaimed)
		return;
	if (cp->n_reclaimable == cp->cap_reclaimable) {
		size_t cap = cp->cap_reclaimable ? cp->cap_reclaimable * 2 : 64;
		struct q_seg **n = realloc(cp->reclaimable, cap * sizeof(*n));
		if (!n)
			return;
		cp->reclaimable = n;
		cp->cap_reclaimable = cap;
	}
	for (size_t i = 0; i < cp->n_reclaimable; i++)
		if (cp->reclaimable[i] == s)
			return;
	cp->reclaimable[cp->n_reclaimable++] = s;
}

/*
 * A reclaimed segment's object is freed once nothing names it: no
 * reference, and no message object (a released message keeps pointing at
 * its segments until they are all reclaimed, then it is freed). Every use
 * of a file gets an object of its own (a new use_seq), so without this
 * they pile up for as long as the process runs: ~4 KiB each, one per
 * segment written, and the lookup chains grow with them.
 */
static void
seg_free_if_unused(struct cplane *cp, struct q_seg *s)
{
	struct q_seg **pp;
	size_t keep = 0;

	if (!s->reclaimed || s->refs || s->msgs)
		return;
	for (pp = &cp->seg_h[seg_bucket(s->worker, s->use_seq)]; *pp;
	     pp = &(*pp)->hnext)
		if (*pp == s) {
			*pp = s->hnext;
			break;
		}
	for (size_t i = 0; i < cp->n_reclaimable; i++)
		if (cp->reclaimable[i] != s)
			cp->reclaimable[keep++] = cp->reclaimable[i];
	cp->n_reclaimable = keep;
	if (s->fd >= 0)
		close(s->fd);
	cp->n_segs--;
	free(s);
}

void
qm_seg_ref(struct cplane *cp, struct q_seg *s)
{
	(void)cp;
	s->refs++;
}

static void moved_seg_done(struct cplane *cp, struct q_seg *s);

void
qm_seg_unref(struct cplane *cp, struct q_seg *s)
{
	if (s->refs)
		s->refs--;
	if (s->refs == 0 && s->moved) {
		moved_seg_done(cp, s);
		return;
	}
	if (s->refs == 0) {
		seg_consider(cp, s);
		seg_free_if_unused(cp, s);
	}
}

void
qm_seg_seal(struct cplane *cp, struct q_seg *s)
{
	if (!s->sealed)
		s->sealed_us = fd_now_monotonic_us();
	s->sealed = true;
	seg_consider(cp, s);
}

void
qm_seg_reclaimed(struct cplane *cp, unsigned worker, uint64_t file_no,
		 uint64_t use_seq)
{
	struct q_seg *s = seg_lookup(cp, worker, use_seq);

	cp->st_reclaimed++;
	if (!s || s->file_no != file_no)
		return;
	s->reclaimed = true;
	cp->reclaims_heard = true;
	if (s->fd >= 0) {
		close(s->fd);
		s->fd = -1;
	}
	seg_free_if_unused(cp, s);
}

/* Send reclaim requests: sealed, unreferenced, not yet sent. A full ring
 * keeps the rest for the next iteration. */
static void
send_reclaims(struct cplane *cp)
{
	size_t keep = 0;

	for (size_t i = 0; i < cp->n_reclaimable; i++) {
		struct q_seg *s = cp->reclaimable[i];
		struct fd_ctl_reclaim rq = {.file_no = s->file_no,
					    .use_seq = s->use_seq};
		if (!s->sealed || s->refs || s->reclaim_sent || s->reclaimed)
			continue;
		if (s->worker >= cp->nworkers ||
		    !fd_ring_push(&cp->ports[s->worker].down, &rq)) {
			cp->reclaimable[keep++] = s;
			continue;
		}
		s->reclaim_sent = true;
		cp->st_reclaim_sent++;
	}
	cp->n_reclaimable = keep;
}

/* ---- messages ---------------------------------------------------------- */

static void dedup_new(struct cplane *cp, struct q_msg *m);
static uint64_t env_key(const struct q_msg *m);
static bool msg_fp(struct q_msg *m);
static void recent_remember(struct cplane *cp, const struct q_msg *m);

static struct q_msg **
msg_slot(struct cplane *cp, uint64_t id)
{
	return &cp->msg_h[hash64(id) & (cp->msg_cap - 1)];
}

static struct q_msg *
msg_find(struct cplane *cp, uint64_t id)
{
	for (struct q_msg *m = *msg_slot(cp, id); m; m = m->hnext)
		if (m->id == id)
			return m;
	return NULL;
}

static int
msg_hash_grow(struct cplane *cp)
{
	size_t cap = cp->msg_cap * 2;
	struct q_msg **h = calloc(cap, sizeof(*h));

	if (!h)
		return -ENOMEM;
	for (size_t i = 0; i < cp->msg_cap; i++) {
		struct q_msg *m = cp->msg_h[i], *next;
		for (; m; m = next) {
			next = m->hnext;
			size_t b = hash64(m->id) & (cap - 1);
			m->hnext = h[b];
			h[b] = m;
		}
	}
	free(cp->msg_h);
	cp->msg_h = h;
	cp->msg_cap = cap;
	return 0;
}

static void
heap_swap(struct cplane *cp, size_t a, size_t b)
{
	struct q_msg *t = cp->heap[a];

	cp->heap[a] = cp->heap[b];
	cp->heap[b] = t;
	cp->heap[a]->heap_idx = a + 1;
	cp->heap[b]->heap_idx = b + 1;
}

static void
heap_up(struct cplane *cp, size_t i)
{
	while (i > 0) {
		size_t p = (i - 1) / 2;
		if (cp->heap[p]->next_us <= cp->heap[i]->next_us)
			break;
		heap_swap(cp, p, i);
		i = p;
	}
}

static void
heap_down(struct cplane *cp, size_t i)
{
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		if (l < cp->heap_n &&
		    cp->heap[l]->next_us < cp->heap[m]->next_us)
			m = l;
		if (r < cp->heap_n &&
		    cp->heap[r]->next_us < cp->heap[m]->next_us)
			m = r;
		if (m == i)
			break;
		heap_swap(cp, m, i);
		i = m;
	}
}

static void
heap_remove(struct cplane *cp, struct q_msg *m)
{
	size_t i;

	if (!m->heap_idx)
		return;
	i = m->heap_idx - 1;
	m->heap_idx = 0;
	cp->heap_n--;
	if (i == cp->heap_n)
		return;
	cp->heap[i] = cp->heap[cp->heap_n];
	cp->heap[i]->heap_idx = i + 1;
	heap_down(cp, i);
	heap_up(cp, i);
}

/* (Re)insert m at m->next_us. */
static void
heap_set(struct cplane *cp, struct q_msg *m, uint64_t at)
{
	heap_remove(cp, m);
	m->next_us = at;
	if (cp->heap_n == cp->heap_cap) {
		size_t cap = cp->heap_cap ? cp->heap_cap * 2 : 1024;
		struct q_msg **n = NULL;

		if (cp->heap_fault_done || !fd_delivery_fault("heap-grow-fail"))
			n = realloc(cp->heap, cap * sizeof(*n));
		cp->heap_fault_done = true;
		if (!n) {
			/* Out of memory: m is scheduled nowhere until
			 * heap_recover() puts it back (it was left there,
			 * never delivered nor expired). */
			if (!cp->heap_lost)
				fd_log(FD_LOG_ERR, "qmgr",
				       "event=heap_alloc_failed messages=%zu "
				       "note=\"rescheduled within a second\"",
				       cp->heap_n + 1);
			cp->heap_lost = true;
			return;
		}
		cp->heap = n;
		cp->heap_cap = cap;
	}
	cp->heap[cp->heap_n] = m;
	m->heap_idx = ++cp->heap_n;
	heap_up(cp, cp->heap_n - 1);
}

static bool
domain_accepted(const struct cplane *cp, const char *domain)
{
	for (unsigned i = 0; i < cp->cfg.n_domains; i++)
		if (route_same_domain(cp->cfg.domains[i], domain))
			return true;
	return false;
}

/* The route's TLS policy, or the daemon's (--smtp-tls). */
static void
dest_policy(struct cplane *cp, struct q_dest *d, const struct route_target *t)
{
	const struct cp_routing *rg = routing_of(cp);

	d->tls = t->tls ? (int)t->tls : rg->def_tls;
	snprintf(d->tls_ca, sizeof(d->tls_ca), "%s",
		 t->tls_ca[0] ? t->tls_ca : rg->tls_ca);
}

static struct q_dest *
dest_get(struct cplane *cp, const struct route_target *t)
{
	size_t b = key_hash(t->text) & (DEST_BUCKETS - 1);
	struct q_dest *d;

	for (d = cp->dest_h[b]; d; d = d->hnext)
		if (strcmp(d->key, t->text) == 0)
			return d;
	d = calloc(1, sizeof(*d));
	if (!d)
		return NULL;
	snprintf(d->key, sizeof(d->key), "%s", t->text);
	d->kind = (int)t->kind;
	snprintf(d->host, sizeof(d->host), "%s", t->host);
	d->port = t->port;
	snprintf(d->path, sizeof(d->path), "%s", t->path);
	/* The route's TLS policy, or the daemon's (--smtp-tls). */
	dest_policy(cp, d, t);
	d->job_us = COALESCE_US; /* not fast until it shows it */
	d->limit = INIT_WINDOW < cp->cfg.dest_concurrency
			   ? INIT_WINDOW
			   : (double)cp->cfg.dest_concurrency;
	if (t->kind == ROUTE_MAILDIR) /* local disk: no feedback needed */
		d->limit = (double)cp->cfg.dest_concurrency;
	d->hnext = cp->dest_h[b];
	cp->dest_h[b] = d;
	return d;
}

/* Where mail for this address goes: its route, the relay, the default
 * (a bare postmaster: the first accepted domain's). */
static struct q_dest *
dest_for_rcpt(struct cplane *cp, const char *addr)
{
	const struct cp_routing *rg = routing_of(cp);
	const char *dom = route_addr_domain(addr);
	const struct route_target *t =
		route_lookup(rg->rt, *dom ? dom : rg->pm_domain);

	if (!t && !rg->have_def)
		return NULL; /* deferred: 4.3.5 no route for this domain */
	return dest_get(cp, t ? t : &rg->def);
}

const char *
cp_postmaster_domain(const struct cplane *cp)
{
	/* The routing in use stays valid until the reload after next
	 * (retired, not freed), and reloads are at least a second apart. */
	return routing_of(cp)->pm_domain;
}

/* Where a DSN to this sender goes, or NULL (no route for it). */
static struct q_dest *
dest_for_bounce(struct cplane *cp, const char *sender)
{
	const char *dom = route_addr_domain(sender);

	if (*dom && domain_accepted(cp, dom))
		return dest_for_rcpt(cp, sender);
	if (routing_of(cp)->have_bounce)
		return dest_get(cp, &routing_of(cp)->bounce);
	return NULL;
}

static size_t
str_size(const char *s)
{
	return s ? strlen(s) + 1 : 1;
}

static char *
arena_str(char **ap, const char *s)
{
	char *d = *ap;
	size_t n = s ? strlen(s) : 0;

	if (n)
		memcpy(d, s, n);
	d[n] = '\0';
	*ap += n + 1;
	return d;
}

/* The state /metrics and `finaldotctl stats` count a message in, kept per
 * change (a walk over a queue of millions, four times a second, would
 * cost the queue manager a core). -1: finished, not counted. */
enum { MC_HELD, MC_ACTIVE, MC_DEFERRED };

static int
msg_class(const struct q_msg *m)
{
	if (m->finished)
		return -1;
	return m->held ? MC_HELD : m->jobs ? MC_ACTIVE : MC_DEFERRED;
}

static void
msg_reclass(struct cplane *cp, const struct q_msg *m, int was)
{
	int now = msg_class(m);

	if (now == was)
		return;
	if (was >= 0)
		cp->n_class[was]--;
	if (now >= 0)
		cp->n_class[now]++;
}

static void
msg_set_held(struct cplane *cp, struct q_msg *m, bool held)
{
	int was = msg_class(m);

	m->held = held;
	msg_reclass(cp, m, was);
}

static void
msg_jobs_add(struct cplane *cp, struct q_msg *m, int delta)
{
	int was = msg_class(m);

	m->jobs = (unsigned)((int)m->jobs + delta);
	msg_reclass(cp, m, was);
}

/* The message object, its segments referenced, in the hash tables; *out
 * NULL when the id is queued already (found twice: scan and tailer; one
 * is enough). */
static int
msg_add(struct cplane *cp, unsigned worker, uint64_t id,
	const struct fd_envelope *env, uint64_t body_len, uint32_t body_crc,
	const struct q_piece *pieces, size_t n_pieces, struct q_seg *env_seg,
	struct q_seg *end_seg, struct q_msg **out)
{
	struct q_msg *m;
	size_t sz = sizeof(*m), nsegs = 0;
	char *a;
	struct q_seg **segs;

	*out = NULL;
	if (msg_find(cp, id))
		return 0;
	if ((cp->n_msgs + 1) * 2 > cp->msg_cap && msg_hash_grow(cp) != 0)
		return -ENOMEM;
	sz += env->n_rcpts * sizeof(struct q_rcpt);
	sz += n_pieces * sizeof(struct q_piece);
	sz += (n_pieces + 2) * sizeof(struct q_seg *);
	sz += str_size(env->mail_from) + str_size(env->envid) +
	      str_size(env->helo) + str_size(env->client_addr);
	for (unsigned i = 0; i < env->n_rcpts; i++)
		sz += str_size(env->rcpts[i]) +
		      str_size(env->orcpts ? env->orcpts[i] : NULL);
	m = calloc(1, sz);
	if (!m)
		return -ENOMEM;
	m->rcpts = (struct q_rcpt *)(void *)(m + 1);
	m->pieces = (struct q_piece *)(void *)(m->rcpts + env->n_rcpts);
	segs = (struct q_seg **)(void *)(m->pieces + n_pieces);
	a = (char *)(segs + n_pieces + 2);
	m->id = id;
	m->worker = worker;
	m->arrival_us = env->arrival_us;
	m->body_len = body_len;
	m->body_crc = body_crc;
	m->sender = arena_str(&a, env->mail_from);
	m->envid = arena_str(&a, env->envid);
	m->helo = arena_str(&a, env->helo);
	m->client = arena_str(&a, env->client_addr);
	m->ret = (uint8_t)env->ret;
	m->body_type = (uint8_t)env->body;
	m->smtputf8 = env->smtputf8;
	m->n_rcpts = env->n_rcpts;
	for (unsigned i = 0; i < env->n_rcpts; i++) {
		struct q_rcpt *r = &m->rcpts[i];
		r->addr = arena_str(&a, env->rcpts[i]);
		r->orcpt = arena_str(&a, env->orcpts ? env->orcpts[i] : NULL);
		r->notify = env->notify ? env->notify[i] : 0;
		r->dest = dest_for_rcpt(cp, r->addr);
	}
	m->route_gen = cp->route_gen;
	m->n_pieces = n_pieces;
	if (n_pieces)
		memcpy(m->pieces, pieces, n_pieces * sizeof(*pieces));
	/* Distinct segments: pieces come in segment order. */
	if (env_seg)
		segs[nsegs++] = env_seg;
	for (size_t i = 0; i < n_pieces; i++)
		if (!nsegs || segs[nsegs - 1] != pieces[i].seg)
			segs[nsegs++] = pieces[i].seg;
	if (end_seg && segs[nsegs - 1] != end_seg)
		segs[nsegs++] = end_seg;
	m->segs = segs;
	m->n_segs = (unsigned)nsegs;
	for (unsigned i = 0; i < m->n_segs; i++) {
		qm_seg_ref(cp, m->segs[i]);
		m->segs[i]->msgs++;
	}
	m->hnext = *msg_slot(cp, id);
	*msg_slot(cp, id) = m;
	m->ekey = env_key(m);
	if (cp->ekey_h) {
		struct q_msg **eb = &cp->ekey_h[m->ekey & (EKEY_BUCKETS - 1)];
		m->enext = *eb;
		if (m->enext)
			m->enext->eprev = &m->enext;
		m->eprev = eb;
		*eb = m;
	}
	cp->n_msgs++;
	cp->n_class[MC_DEFERRED]++;
	*out = m;
	return 0;
}

int
qm_msg_add(struct cplane *cp, unsigned worker, uint64_t id,
	   const struct fd_envelope *env, uint64_t body_len,
	   uint32_t body_crc, const struct q_piece *pieces, size_t n_pieces,
	   struct q_seg *env_seg, struct q_seg *end_seg)
{
	struct q_msg *m;
	int r = msg_add(cp, worker, id, env, body_len, body_crc, pieces,
			n_pieces, env_seg, end_seg, &m);

	if (r || !m)
		return r;
	cp->st_queued++;
	heap_set(cp, m, 0); /* due now */
	dedup_new(cp, m);
	return 0;
}

static void
msg_free(struct cplane *cp, struct q_msg *m)
{
	struct q_msg **pp = msg_slot(cp, m->id);

	while (*pp && *pp != m)
		pp = &(*pp)->hnext;
	if (*pp)
		*pp = m->hnext;
	if (m->eprev) {
		*m->eprev = m->enext;
		if (m->enext)
			m->enext->eprev = m->eprev;
		m->eprev = NULL;
	}
	heap_remove(cp, m);
	recent_remember(cp, m);
	for (unsigned i = 0; i < m->n_rcpts; i++)
		free(m->rcpts[i].reason);
	if (msg_class(m) >= 0)
		cp->n_class[msg_class(m)]--;
	cp->n_msgs--;
	for (unsigned i = 0; i < m->n_segs; i++) {
		struct q_seg *s = m->segs[i];
		if (s->msgs)
			s->msgs--;
		seg_free_if_unused(cp, s);
	}
	free(m->old_segs);
	free(m);
}

static void
set_reason(struct q_rcpt *r, const char *text)
{
	char *n;

	if (text == r->reason)
		return; /* its own reason: nothing to do (and not to free) */
	n = text && *text ? strdup(text) : NULL;
	free(r->reason);
	r->reason = n;
	r->remote = false; /* a reason of ours unless the caller says */
}

/* The host that gave r's reason, for a DSN's Remote-MTA: the route's host
 * (the next hop's name as configured, like Postfix's MX host name), or
 * NULL for a reason of ours or a next hop reached by a unix socket. Dests
 * live until the queue manager ends. */
static const char *
remote_mta(const struct q_rcpt *r)
{
	if (!r->remote || !r->dest || !r->dest->host[0])
		return NULL;
	return r->dest->host;
}

static uint64_t
log_rec(struct cplane *cp, enum dlog_type type, const struct q_msg *m,
	uint32_t rcpt, uint32_t attempts, uint64_t next_us, uint64_t aux,
	const char *text)
{
	size_t tl = text ? strlen(text) : 0;
	struct dlog_rec r = {
		.type = type,
		.msgid = m->id,
		.rcpt = rcpt,
		.attempts = attempts,
		.time_us = fd_now_realtime_us(),
		.next_us = next_us,
		.aux = aux,
		.text = text,
		.text_len = (uint16_t)(tl < DLOG_TEXT_MAX ? tl : DLOG_TEXT_MAX),
	};

	if (!cp->log)
		return 0;
	/* What deliveries find out goes with the next flush (an ATTEMPT's,
	 * or within the log's lazy delay): a flush of its own per result
	 * was a second device cache flush per message that the spool's
	 * writes queued behind. A crash before it is the in-flight case
	 * (the ATTEMPT is durable: counted as a possible duplicate). What
	 * an operator ordered is flushed at once. */
	if (type == DLOG_DELETED || type == DLOG_HELD ||
	    type == DLOG_RELEASED)
		return dlog_append(cp->log, &r);
	return dlog_append_lazy(cp->log, &r);
}

static bool
dsn_wanted(const struct q_msg *m, const struct q_rcpt *r)
{
	if (!*m->sender)
		return false; /* never to the null sender (RFC 5321 6.1) */
	if (r->notify & FD_NOTIFY_NEVER)
		return false;
	if (r->state == QR_DELIVERED)
		return (r->notify & FD_NOTIFY_SUCCESS) && r->success;
	return r->notify == 0 || (r->notify & FD_NOTIFY_FAILURE);
}

static bool
rcpt_final(const struct q_rcpt *r)
{
	return r->state != QR_PENDING;
}

static bool
needs_dsn(const struct q_msg *m, const struct q_rcpt *r)
{
	(void)m;
	return (r->state == QR_BOUNCED || r->state == QR_EXPIRED ||
		(r->state == QR_DELIVERED && r->success)) &&
	       !r->dsn_done;
}

static void msg_update(struct cplane *cp, struct q_msg *m, uint64_t lsn);

/* After heap_set() failed to grow the heap: every message still open that
 * is in no heap is decided again (msg_update() puts each where it
 * belongs). A walk of the whole queue, only after an allocation failed;
 * a new failure leaves heap_lost set for the next try. */
static void
heap_recover(struct cplane *cp)
{
	size_t again = 0;

	cp->heap_lost = false;
	for (size_t b = 0; b < cp->msg_cap; b++)
		for (struct q_msg *m = cp->msg_h[b]; m; m = m->hnext)
			if (!m->finished && !m->heap_idx) {
				msg_update(cp, m, 0);
				again += m->heap_idx != 0;
			}
	fd_log(cp->heap_lost ? FD_LOG_ERR : FD_LOG_INFO, "qmgr",
	       "event=heap_recovered rescheduled=%zu still_failing=%s", again,
	       cp->heap_lost ? "yes" : "no");
}

/* Decide what m waits for now; finish it or put it in the heap. */
static void
msg_update(struct cplane *cp, struct q_msg *m, uint64_t lsn)
{
	uint64_t next = UINT64_MAX;
	bool open = false;
	int was;

	if (m->finished)
		return;
	for (unsigned i = 0; i < m->n_rcpts; i++) {
		struct q_rcpt *r = &m->rcpts[i];
		if (r->busy) {
			open = true;
			continue;
		}
		if (!rcpt_final(r)) {
			open = true;
			if (r->next_us < next)
				next = r->next_us;
		} else if (needs_dsn(m, r)) {
			if (!dsn_wanted(m, r)) {
				r->dsn_done = true;
				continue;
			}
			open = true;
			if (!m->bounce_busy && m->bounce_next_us < next)
				next = m->bounce_next_us;
		}
	}
	if (open || m->jobs || m->bounce_busy) {
		/* Held for a resend to be matched (RFC 1047): not before. */
		if (next != UINT64_MAX && m->settle_until > next)
			next = m->settle_until;
		if (next != UINT64_MAX && !m->held)
			heap_set(cp, m, next);
		else
			heap_remove(cp, m);
		return;
	}
	was = msg_class(m);
	m->finished = true;
	msg_reclass(cp, m, was);
	heap_remove(cp, m);
	/* Without the LSN of its last record (a deferral that turned into
	 * an EXPIRED, a DELETED...): everything appended so far, so that no
	 * outcome of it is still only in memory when it is released. It was
	 * the durable point, which let a message whose DELIVERED was still
	 * pending be released at once. */
	m->final_lsn = lsn ? lsn : (cp->log ? dlog_appended(cp->log) : 0);
	m->fnext = cp->fin_head;
	cp->fin_head = m;
}

int
qm_msg_refused(struct cplane *cp, unsigned worker, uint64_t id,
	       const struct fd_envelope *env, uint64_t body_len,
	       uint32_t body_crc, const struct q_piece *pieces,
	       size_t n_pieces, struct q_seg *env_seg, struct q_seg *end_seg)
{
	struct q_msg *m;
	uint64_t lsn;
	int r = msg_add(cp, worker, id, env, body_len, body_crc, pieces,
			n_pieces, env_seg, end_seg, &m);

	if (r || !m)
		return r;
	for (unsigned i = 0; i < m->n_rcpts; i++) {
		m->rcpts[i].state = QR_DELETED;
		set_reason(&m->rcpts[i], "not delivered: its client was "
					 "answered 4xx at acceptance");
	}
	lsn = log_rec(cp, DLOG_DELETED, m, DLOG_ALL, 0, 0, 0,
		      "refused at acceptance");
	fd_log(FD_LOG_WARN, "qmgr",
	       "%016" PRIx64 " event=not_delivered rcpts=%u reason=\"its "
	       "client was answered 4xx (a write or flush failed) and sends "
	       "it again: this copy, whole on disk, never goes out\"",
	       m->id, m->n_rcpts);
	msg_update(cp, m, lsn);
	return 0;
}

/* Release finished messages whose records are durable; free released
 * ones whose segments all have a new epoch (a checkpoint no longer needs
 * to remember them). */
static void
release_finished(struct cplane *cp)
{
	uint64_t durable = cp->log ? dlog_durable(cp->log) : UINT64_MAX;
	struct q_msg **pp = &cp->fin_head;

	while (*pp) {
		struct q_msg *m = *pp;
		if (m->final_lsn > durable) {
			pp = &m->fnext;
			continue;
		}
		*pp = m->fnext;
		/* Its fingerprint for the table of recent ones (in-doubt news
		 * may still come), while the body can still be read; not for
		 * a message older than the dedup window, whose news would
		 * match nothing: a mass expiry (5 days) read every expired
		 * body on this thread. */
		if (cp->recent &&
		    fd_now_realtime_us() - m->arrival_us <
			    cp->cfg.dedup_window_ms * 1000)
			msg_fp(m);
		m->released = true;
		cp->st_released++;
		for (unsigned i = 0; i < m->n_segs; i++)
			qm_seg_unref(cp, m->segs[i]);
		m->fnext = cp->rel_head;
		cp->rel_head = m;
	}
	/* Released messages wait for their segments' new epochs; the list is
	 * long (a segment's worth), so it is walked only after a RECLAIMED. */
	if (!cp->reclaims_heard)
		return;
	cp->reclaims_heard = false;
	pp = &cp->rel_head;
	while (*pp) {
		struct q_msg *m = *pp;
		bool gone = true;
		for (unsigned i = 0; i < m->n_segs && gone; i++)
			gone = m->segs[i]->reclaimed;
		for (unsigned i = 0; i < m->n_old_segs && gone; i++) {
			/* freed only once reclaimed (seg_free_if_unused) */
			struct q_seg *o = seg_lookup(cp, m->old_segs[i].worker,
						     m->old_segs[i].use_seq);
			gone = !o || o->reclaimed;
		}
		if (!gone) {
			pp = &m->fnext;
			continue;
		}
		*pp = m->fnext;
		msg_free(cp, m);
	}
}

/* ---- RFC 1047: in-doubt acknowledgements and their resends ---------------
 *
 * A worker tells us when a session ended while the bytes of a 250 to a
 * final dot were not acknowledged by the client's TCP: the client may not
 * have seen it and may send the message again. The message's fingerprint
 * (SHA-256 over the sender, the recipients in order and the body after our
 * own Received header, which differs between copies) is remembered for
 * dedup_window, durably (a DLOG_INDOUBT record; checkpoints keep the live
 * ones). A message arriving later with the same fingerprint is a resend:
 * it got its 250 like any other (the client must stop retrying), and is
 * suppressed instead of delivered (DLOG_SUPPRESSED, aux = the original).
 * The in-doubt message itself is held back dedup_settle (never longer) so
 * that a quick resend is matched before the first copy goes out; once a
 * resend is matched the original goes at once.
 *
 * Limits: only in-doubt messages are remembered, so a second copy of a
 * message whose 250 was acknowledged is delivered. In-doubt news about a
 * message already freed is matched through a ring of the last RECENT_FP
 * fingerprints; older than that it is counted (indoubt_unknown) and the
 * resend, if any, is delivered.
 */
#define RECENT_FP (1u << 18)

struct indoubt {
	uint8_t fp[32];
	uint64_t msgid;
	uint64_t at_us;
	struct indoubt *next;
};

struct recent_fp {
	uint64_t msgid;
	uint64_t ekey; /* env_key() */
	uint64_t arrival_us;
	uint8_t fp[32];
};
#define RECENT_BYTES ((size_t)RECENT_FP * sizeof(struct recent_fp))

static size_t
fp_bucket(const uint8_t *fp)
{
	return ((size_t)fp[0] | (size_t)fp[1] << 8) & 1023;
}

static void
fp_hex(const uint8_t *fp, char *out)
{
	static const char hx[] = "0123456789abcdef";

	for (int i = 0; i < 32; i++) {
		out[2 * i] = hx[fp[i] >> 4];
		out[2 * i + 1] = hx[fp[i] & 15];
	}
	out[64] = '\0';
}

static bool
fp_unhex(const char *s, size_t n, uint8_t *fp)
{
	if (n < 64)
		return false;
	for (int i = 0; i < 64; i++) {
		int c = s[i], v = c >= '0' && c <= '9'	 ? c - '0'
				  : c >= 'a' && c <= 'f' ? c - 'a' + 10
							 : -1;
		if (v < 0)
			return false;
		if (i % 2)
			fp[i / 2] = (uint8_t)(fp[i / 2] | v);
		else
			fp[i / 2] = (uint8_t)(v << 4);
	}
	return true;
}

/* The fingerprint of m, read from its segments: 0, or -errno (body
 * unreadable or damaged). */
static int
fingerprint(const struct q_msg *m, uint8_t *fp)
{
	struct q_fp f;
	struct q_body body;
	uint8_t buf[16384];
	uint64_t off = 0;
	int r;

	if ((r = q_fp_begin(&f, m)) != 0)
		return r;
	q_body_init(&body, m);
	body.fp = &f;
	while (off < m->body_len || (m->body_len == 0 && !body.last_done)) {
		long n = q_body_read(&body, off, buf, sizeof(buf));
		if (n < 0 || (n == 0 && off < m->body_len)) {
			q_body_fini(&body);
			return n < 0 ? (int)n : -EIO;
		}
		off += (uint64_t)n;
		if (n == 0)
			break;
	}
	if (!body.fp_ok) {
		q_body_fini(&body);
		return -EIO;
	}
	memcpy(fp, body.fp_out, 32);
	q_body_fini(&body);
	return 0;
}

/* m's fingerprint, computed the first time it is needed (a delivery
 * thread usually computed it already while the body went out): new
 * messages are fingerprinted only while some message is in doubt, and
 * the rest when they are released (their body still readable), for the
 * ring of recent ones. true when m->fp holds it. */
static bool
msg_fp(struct q_msg *m)
{
	if (!m->fp_ok && !m->fp_tried && !m->released) {
		m->fp_tried = true;
		m->fp_ok = fingerprint(m, m->fp) == 0;
	}
	return m->fp_ok;
}

/* A cheap key of the envelope (FNV-1a over the sender and recipients, as
 * the fingerprint hashes them): two messages with the same fingerprint
 * have the same key, so a different key rules a candidate out without
 * reading its body. */
static uint64_t
env_key(const struct q_msg *m)
{
	uint64_t h = 1469598103934665603ull;
	const char *s = m->sender;

	for (unsigned i = 0;; i++) {
		for (; *s; s++)
			h = (h ^ (uint8_t)*s) * 1099511628211ull;
		h = (h ^ 0xff) * 1099511628211ull;
		if (i >= m->n_rcpts)
			break;
		s = m->rcpts[i].addr;
	}
	return h;
}

static struct indoubt *
indoubt_find(struct cplane *cp, const uint8_t *fp, uint64_t now_rt)
{
	struct indoubt **pp = &cp->id_h[fp_bucket(fp)];
	uint64_t win = cp->cfg.dedup_window_ms * 1000;

	while (*pp) {
		struct indoubt *e = *pp;
		if (e->at_us + win < now_rt) { /* out of the window */
			*pp = e->next;
			free(e);
			cp->n_indoubt--;
			continue;
		}
		if (memcmp(e->fp, fp, 32) == 0)
			return e;
		pp = &e->next;
	}
	return NULL;
}

static void
indoubt_add(struct cplane *cp, const uint8_t *fp, uint64_t msgid,
	    uint64_t at_us)
{
	struct indoubt *e = indoubt_find(cp, fp, fd_now_realtime_us());

	if (e) {
		if (at_us < e->at_us) { /* keep the first copy */
			e->at_us = at_us;
			e->msgid = msgid;
		}
		return;
	}
	if (!(e = calloc(1, sizeof(*e))))
		return;
	memcpy(e->fp, fp, 32);
	e->msgid = msgid;
	e->at_us = at_us;
	e->next = cp->id_h[fp_bucket(fp)];
	cp->id_h[fp_bucket(fp)] = e;
	cp->n_indoubt++;
}

static void msg_update(struct cplane *cp, struct q_msg *m, uint64_t lsn);

/* m is a resend of orig: answered 250 already, not delivered again. */
static void
suppress(struct cplane *cp, struct q_msg *m, uint64_t orig)
{
	char why[128];
	uint64_t lsn = 0;

	snprintf(why, sizeof(why),
		 "250 2.0.0 suppressed: a resend of %016" PRIx64
		 " (RFC 1047), delivered once",
		 orig);
	for (unsigned i = 0; i < m->n_rcpts; i++) {
		struct q_rcpt *r = &m->rcpts[i];
		if (r->state != QR_PENDING || r->busy)
			continue;
		r->state = QR_SUPPRESSED;
		r->dsn_done = true;
		set_reason(r, why);
		lsn = log_rec(cp, DLOG_SUPPRESSED, m, i, r->attempts, 0, orig,
			      why);
	}
	m->dup_of = orig;
	cp->st_suppressed++;
	fd_log(FD_LOG_INFO, "qmgr",
	       "%016" PRIx64 " event=suppressed duplicate_of=%016" PRIx64
	       " rcpts=%u reason=rfc1047_resend",
	       m->id, orig, m->n_rcpts);
	msg_update(cp, m, lsn);
}

/* The original of a matched resend need not wait any longer. */
static void
settle_release(struct cplane *cp, uint64_t orig)
{
	struct q_msg *o = msg_find(cp, orig);

	if (o && o->settle_until) {
		o->settle_until = 0;
		msg_update(cp, o, 0);
	}
}

/* A newly queued message: is it the resend of an in-doubt one? */
static void
dedup_new(struct cplane *cp, struct q_msg *m)
{
	uint64_t now = fd_now_realtime_us();
	struct indoubt *e;

	if (!cp->cfg.dedup_window_ms || !cp->n_indoubt || !msg_fp(m))
		return;
	e = indoubt_find(cp, m->fp, now);
	if (!e || e->msgid == m->id || m->arrival_us < e->at_us)
		return;
	suppress(cp, m, e->msgid);
	settle_release(cp, e->msgid);
}

/* The recent table is direct-mapped by message id: a lookup is one slot,
 * where it was a walk of all RECENT_FP (262,144) entries per in-doubt
 * notice; a newer message may take an older one's slot. */
static struct recent_fp *
recent_slot(struct cplane *cp, uint64_t msgid)
{
	return &cp->recent[hash64(msgid) & (RECENT_FP - 1)];
}

static void
recent_remember(struct cplane *cp, const struct q_msg *m)
{
	struct recent_fp *r;

	if (!cp->recent || !m->fp_ok)
		return;
	r = recent_slot(cp, m->id);
	r->msgid = m->id;
	r->ekey = m->ekey;
	r->arrival_us = m->arrival_us;
	memcpy(r->fp, m->fp, 32);
}

void
qm_indoubt(struct cplane *cp, unsigned worker, uint64_t msgid)
{
	struct q_msg *m = msg_find(cp, msgid);
	uint64_t now = fd_now_realtime_us();
	uint8_t fp[32];
	uint64_t ekey = 0, arrival = 0;
	char hex[65];
	bool have = false;

	(void)worker;
	if (!cp->cfg.dedup_window_ms)
		return;
	if (m && msg_fp(m)) {
		memcpy(fp, m->fp, 32);
		ekey = m->ekey;
		arrival = m->arrival_us;
		have = true;
	}
	const struct recent_fp *r = cp->recent ? recent_slot(cp, msgid) : NULL;
	if (!have && r && r->msgid == msgid) {
		memcpy(fp, r->fp, 32);
		ekey = r->ekey;
		arrival = r->arrival_us;
		have = true;
	}
	cp->st_indoubt++;
	if (!have) {
		cp->st_indoubt_unknown++;
		fd_log(FD_LOG_WARN, "qmgr",
		       "%016" PRIx64 " event=indoubt fingerprint=unknown "
		       "note=\"too old to remember: a resend is delivered\"",
		       msgid);
		return;
	}
	fp_hex(fp, hex);
	if (m)
		log_rec(cp, DLOG_INDOUBT, m, DLOG_ALL, 0, 0, 0, hex);
	else {
		struct q_msg tmp = {.id = msgid};
		log_rec(cp, DLOG_INDOUBT, &tmp, DLOG_ALL, 0, 0, 0, hex);
	}
	indoubt_add(cp, fp, msgid, now);
	fd_log(FD_LOG_INFO, "qmgr",
	       "%016" PRIx64 " event=indoubt settle_s=%" PRIu64
	       " delivered=%s",
	       msgid, cp->cfg.dedup_settle_ms / 1000,
	       m && !m->finished ? "not_yet" : "yes");
	/* A resend that came before this news (a quick reconnect) and is
	 * not out yet: suppressed now, and the original goes at once. Only
	 * messages newer than the original are fingerprinted (each may be
	 * a read of its body on this thread): also when the original is
	 * known only from the recent table, where every queued message
	 * with its envelope was read (a backlog from one sender to one
	 * recipient, all of it). */
	bool matched = false;
	for (struct q_msg *o = cp->ekey_h[ekey & (EKEY_BUCKETS - 1)]; o;
	     o = o->enext) {
		if (o == m || o->finished || o->dup_of ||
		    o->arrival_us < arrival || o->ekey != ekey ||
		    !msg_fp(o) || memcmp(o->fp, fp, 32) != 0)
			continue;
		suppress(cp, o, msgid);
		matched = true;
	}
	if (m && !m->finished && !m->dup_of) {
		m->indoubt = true;
		if (matched) {
			settle_release(cp, msgid);
		} else if (m->settle_until == 0 && !m->jobs) {
			m->settle_until = now + cp->cfg.dedup_settle_ms * 1000;
			msg_update(cp, m, 0);
		}
	}
}

/* ---- scheduling -------------------------------------------------------- */

static uint64_t
backoff_us(struct cplane *cp, uint32_t attempts)
{
	double base = (double)cp->cfg.retry_min_ms * 1000.0;
	double cap = (double)cp->cfg.retry_max_ms * 1000.0;
	double d = base;

	for (uint32_t i = 1; i < attempts && d < cap; i++)
		d *= 2;
	if (d > cap)
		d = cap;
	/* +-25% so that a burst deferred together does not retry together,
	 * then within [retry_min, retry_max]: the options' words are
	 * "shortest" and "longest" (the cap came before the jitter, and
	 * waits reached 5,000 s with a retry_max of 4,000) */
	d *= 0.75 + 0.5 * (double)(rnd(cp) % 1000001) / 1000000.0;
	if (d > cap)
		d = cap;
	if (d < base)
		d = base;
	return (uint64_t)d;
}

static bool
expired(const struct cplane *cp, const struct q_msg *m, uint64_t now_rt)
{
	return now_rt >= m->arrival_us + cp->cfg.queue_lifetime_ms * 1000;
}

/* A DSN is tried again until twice the lifetime after its message's
 * arrival: at least one whole lifetime after an expiry (the commonest
 * bounce), so that a greylisting or briefly unreachable sender's MX still
 * gets it. It was bound to the message's own lifetime, which for an
 * expired message is over before the DSN's first try: its first 4xx
 * dropped it. Restart-proof: no state but the arrival. */
static bool
dsn_expired(const struct cplane *cp, const struct q_msg *m, uint64_t now_rt)
{
	return now_rt >= m->arrival_us + 2 * cp->cfg.queue_lifetime_ms * 1000;
}

static struct q_job *
job_new(struct q_msg *m, struct q_dest *d, enum q_job_kind kind, unsigned n)
{
	size_t head = sizeof(struct q_job) + n * sizeof(unsigned);
	size_t sz = head;
	struct q_job *j;

	if (kind == QJ_BOUNCE) {
		head = (head + _Alignof(const char *) - 1) &
		       ~(_Alignof(const char *) - 1);
		sz = head + 2 * n * sizeof(const char *);
	}
	j = calloc(1, sz);
	if (!j)
		return NULL;
	j->kind = kind;
	j->m = m;
	j->dest = d;
	if (kind == QJ_BOUNCE) {
		j->reasons = (const char **)(void *)((char *)j + head);
		j->mtas = j->reasons + n;
	}
	return j;
}

static void
job_free(struct q_job *j)
{
	if (!j)
		return;
	free(j->res);
	free(j);
}

static void
dest_enqueue(struct cplane *cp, struct q_dest *d, struct q_job *j)
{
	struct q_job **head = j->fresh ? &d->fresh_head : &d->retry_head;
	struct q_job **tail = j->fresh ? &d->fresh_tail : &d->retry_tail;

	j->next = NULL;
	if (*tail)
		(*tail)->next = j;
	else
		*head = j;
	*tail = j;
	if (!d->listed) {
		d->listed = true;
		d->next_ready = NULL;
		if (cp->ready_tail)
			cp->ready_tail->next_ready = d;
		else
			cp->ready_head = d;
		cp->ready_tail = d;
	}
}

static void
log_outcome(const struct q_msg *m, const struct q_rcpt *r, const char *dest,
	    const char *relay, const char *tls, const char *status,
	    const char *text)
{
	char esc[700];
	size_t k = 0;
	double delay =
		(double)(fd_now_realtime_us() - m->arrival_us) / 1e6;

	/* The reply is printable already; quote it for key=value. */
	for (const char *p = text ? text : ""; *p && k + 3 < sizeof(esc);
	     p++) {
		if (*p == '"' || *p == '\\')
			esc[k++] = '\\';
		esc[k++] = *p;
	}
	esc[k] = '\0';
	fd_log(FD_LOG_INFO, "qmgr",
	       "%016" PRIx64 " event=delivery to=<%s> route=%s relay=%s "
	       "tls=\"%s\" delay=%.3f attempts=%u status=%s reply=\"%s\"",
	       m->id, r->addr, dest, relay && *relay ? relay : "none",
	       tls && *tls ? tls : "none", delay, r->attempts, status, esc);
}

/* A recipient will not be tried now: defer it to `at`. */
static void
defer_rcpt(struct cplane *cp, struct q_msg *m, unsigned i, uint64_t at,
	   const char *why, bool remote, bool count)
{
	struct q_rcpt *r = &m->rcpts[i];
	uint64_t now_rt = fd_now_realtime_us();
	char last[520];

	/* why may be r->reason itself: keep a copy before replacing it. */
	snprintf(last, sizeof(last), "%.*s", (int)sizeof(last) - 1,
		 why ? why : "none");
	if (count)
		r->attempts++;
	set_reason(r, why);
	if (expired(cp, m, now_rt)) {
		char buf[600];
		r->state = QR_EXPIRED;
		snprintf(buf, sizeof(buf), "4.4.7 queue lifetime exceeded; "
			 "last: %s", last);
		set_reason(r, buf);
		/* Remote-MTA: who gave the last reply the reason ends with */
		r->remote = remote;
		cp->st_expired++;
		log_rec(cp, DLOG_EXPIRED, m, i, r->attempts, 0,
			remote ? DLOG_AUX_REMOTE : 0, buf);
		log_outcome(m, r, r->dest ? r->dest->key : "none", NULL, NULL,
			    "expired", buf);
		return;
	}
	r->remote = remote;
	r->next_us = at;
	cp->st_deferred++;
	log_rec(cp, DLOG_DEFERRED, m, i, r->attempts, at,
		remote ? DLOG_AUX_REMOTE : 0, r->reason);
}

/*
 * A recipient whose next hop is dead: deferred without an attempt, and
 * counted as a deferral all the same, as Postfix's "delivery temporarily
 * suspended" is. Its next try backs off like a failed one (never before
 * the next hop's dead period ends, jittered past it): one record per
 * recipient every retry_min for the lifetime of a long outage was a
 * million records every few minutes for a million queued, and with no
 * count it stayed a first attempt, queued after the outage in front of
 * mail that arrived after it.
 */
static void
suspend_rcpt(struct cplane *cp, struct q_msg *m, unsigned i,
	     const struct q_dest *d, uint64_t now_rt)
{
	uint64_t at = d->dead_until + backoff_us(cp, 1) / 4;
	uint64_t b = now_rt + backoff_us(cp, m->rcpts[i].attempts + 1);

	defer_rcpt(cp, m, i, at > b ? at : b,
		   d->dead_reason ? d->dead_reason
				  : "4.4.1 delivery temporarily suspended",
		   false, true);
}

/* Recipient r goes in the job being made for destination d. */
static bool
rcpt_joins(const struct q_rcpt *r, const struct q_dest *d, uint64_t now_rt)
{
	return r->dest == d && !r->busy && !rcpt_final(r) &&
	       r->next_us <= now_rt;
}

/* Make m's due recipients (and its due DSN) into jobs. */
static void
schedule_msg(struct cplane *cp, struct q_msg *m, uint64_t now_rt)
{
	bool bounce_due = false;

	if (m->held || m->finished || m->moving)
		return;
	if (m->settle_until > now_rt) {
		msg_update(cp, m, 0);
		return;
	}
	/* The routes were reloaded since: the next hops again (a recipient
	 * in a job keeps the one it is being tried at). */
	if (m->route_gen != cp->route_gen) {
		for (unsigned i = 0; i < m->n_rcpts; i++)
			if (!m->rcpts[i].busy && !rcpt_final(&m->rcpts[i]))
				m->rcpts[i].dest =
					dest_for_rcpt(cp, m->rcpts[i].addr);
		m->route_gen = cp->route_gen;
	}
	for (unsigned i = 0; i < m->n_rcpts; i++) {
		struct q_rcpt *r = &m->rcpts[i];
		struct q_dest *d = r->dest;
		struct q_job *j;

		if (r->busy || rcpt_final(r)) {
			if (!r->busy && needs_dsn(m, r) && dsn_wanted(m, r))
				bounce_due = true;
			continue;
		}
		if (r->next_us > now_rt)
			continue;
		if (!d) {
			defer_rcpt(cp, m, i, now_rt + backoff_us(cp, 1),
				   "4.3.5 no route for this domain", false,
				   true);
			/* one line as for an attempt, so that an operator
			 * grepping by queue id sees why nothing goes */
			if (r->state == QR_PENDING)
				log_outcome(m, r, "none", NULL, NULL,
					    "deferred", r->reason);
			continue;
		}
		if (expired(cp, m, now_rt)) {
			defer_rcpt(cp, m, i, 0, r->reason, r->remote, false);
			continue;
		}
		if (d->dead_until > now_rt) {
			suspend_rcpt(cp, m, i, d, now_rt);
			continue;
		}
		/* Other recipients for the same destination join this job
		 * (counted first: the job is made to size). */
		unsigned cnt = 0;
		for (unsigned k = i; k < m->n_rcpts && cnt < QJ_MAX_RCPTS; k++)
			cnt += rcpt_joins(&m->rcpts[k], d, now_rt);
		j = job_new(m, d, QJ_DELIVER, cnt);
		if (!j)
			break;
		j->fresh = r->attempts == 0;
		for (unsigned k = i; k < m->n_rcpts && j->n < cnt; k++) {
			struct q_rcpt *rk = &m->rcpts[k];
			if (!rcpt_joins(rk, d, now_rt))
				continue;
			rk->busy = true;
			j->idx[j->n++] = k;
		}
		msg_jobs_add(cp, m, 1);
		dest_enqueue(cp, d, j);
	}
	if (bounce_due && !m->bounce_busy && m->bounce_next_us <= now_rt) {
		struct q_dest *d = dest_for_bounce(cp, m->sender);
		unsigned cnt = 0;
		struct q_job *j = NULL;

		for (unsigned i = 0; d && i < m->n_rcpts && cnt < QJ_MAX_RCPTS;
		     i++)
			cnt += needs_dsn(m, &m->rcpts[i]) &&
			       dsn_wanted(m, &m->rcpts[i]);
		if (d)
			j = job_new(m, d, QJ_BOUNCE, cnt ? cnt : 1);

		if (!d) {
			/* No way back to this sender: said and counted. */
			for (unsigned i = 0; i < m->n_rcpts; i++) {
				struct q_rcpt *r = &m->rcpts[i];
				if (!needs_dsn(m, r))
					continue;
				r->dsn_done = true;
				log_rec(cp, DLOG_DSN_DONE, m, i, 0, 0, 0,
					"no route for the bounce");
			}
			cp->st_dsn_dropped++;
			fd_log(FD_LOG_WARN, "qmgr",
			       "%016" PRIx64 " event=bounce_dropped "
			       "reason=no_bounce_relay",
			       m->id);
		} else if (j) {
			for (unsigned i = 0; i < m->n_rcpts && j->n < cnt;
			     i++) {
				struct q_rcpt *r = &m->rcpts[i];
				if (!needs_dsn(m, r) || !dsn_wanted(m, r))
					continue;
				j->reasons[j->n] = r->reason;
				j->mtas[j->n] = remote_mta(r);
				j->idx[j->n++] = i;
			}
			m->bounce_busy = true;
			msg_jobs_add(cp, m, 1);
			dest_enqueue(cp, d, j);
		}
	}
	msg_update(cp, m, 0);
}

/*
 * A delivery thread waiting for jobs (cp_job_take), on cp->idle, the one
 * that began waiting last first. Each has a condition of its own, so that
 * the one woken can be chosen: for a next hop, a thread holding a
 * connection to it, else the one idle the shortest time. With one shared
 * condition any waiter woke, and every delivery thread in turn opened a
 * connection of its own to a busy next hop (fd-sink saw 33 connections
 * from 32 threads where two at a time did the work) and kept it open;
 * now the threads that work keep their connections busy and the others'
 * close when idle (CONN_IDLE_US). Under cp->mu.
 */
struct job_waiter {
	pthread_cond_t cv;
	const char *prefer; /* the next hop it holds a connection to, or NULL */
	bool woken;
	struct job_waiter *next, **pprev;
};

static void
waiter_unlink(struct job_waiter *w)
{
	*w->pprev = w->next;
	if (w->next)
		w->next->pprev = w->pprev;
	w->next = NULL;
	w->pprev = NULL;
}

/* Wake one waiting thread for d (NULL: any): false if none waits. */
static bool
wake_one(struct cplane *cp, const struct q_dest *d)
{
	struct job_waiter *w = cp->idle;

	for (struct job_waiter *x = cp->idle; d && x; x = x->next)
		if (x->prefer && strcmp(x->prefer, d->key) == 0) {
			w = x;
			break;
		}
	if (!w)
		return false;
	waiter_unlink(w);
	w->woken = true;
	pthread_cond_signal(&w->cv);
	return true;
}

/* A destination one more thread may work for now: under its window
 * (conn_cap is set, >= 1, when dispatch lists its first job). Under
 * cp->mu, like the rest of the hand-out list's bookkeeping. */
static bool
dest_open(const struct q_dest *d)
{
	return d->conns < d->conn_cap;
}

/*
 * Whether jobs of d waiting in the hand-out list call for one more thread.
 * A slow next hop: yes while its window allows (its messages go out side
 * by side, over as many connections as it takes). A fast one (coalesce):
 * only when no thread works for it or a whole batch waits; the threads
 * working for it take the rest with their next batch. One thread then
 * sends up to 32 messages in one pipelined exchange, with one wait for
 * the delivery log, one wake-up and one lock round, where one thread
 * woken a message paid each of those for few messages (measured on
 * loopback, fd-sink, in batches of up to 16: 15 attempts a batch instead
 * of 6, 0.37 context switches a message instead of 0.95, a quarter less
 * delivery CPU; up to 32: 28-29 a batch, 0.15 context switches).
 * coalesce_stale() bounds how long a job waits for that.
 */
static bool
dest_wants_thread(const struct q_dest *d)
{
	return dest_open(d) && d->listed_jobs &&
	       (!d->coalesce || d->conns == 0 ||
		d->listed_jobs >= QJ_BATCH_FAST);
}

/* Whether a thread without a connection to j's next hop may take j now:
 * dest_wants_thread(), or j waited COALESCE_US for the threads working for
 * its next hop. */
static bool
job_takeable(const struct q_job *j, uint64_t now)
{
	return dest_wants_thread(j->dest) ||
	       (dest_open(j->dest) &&
		now > j->listed_us + (uint64_t)COALESCE_US);
}

/* Threads to wake for d after n of its jobs were listed. */
static unsigned
dest_wake(const struct q_dest *d, unsigned n)
{
	if (!d->coalesce)
		return n;
	if (!dest_wants_thread(d))
		return 0;
	return FD_MAX(1u, d->listed_jobs / QJ_BATCH_FAST);
}

/* A fast next hop's jobs wait for the threads working for it; one that has
 * waited COALESCE_US gets a thread of its own after all (the thread it
 * waits for may be stuck on a next hop that stopped answering, for as long
 * as the client's timeouts). A job listed longest ago is first in the
 * list: one wake-up per pass, for the oldest such job that can go. Jobs
 * that waited that long and cannot go are for next hops at their window:
 * at most STALE_SCAN jobs are looked at per pass, under the lock; one
 * behind more is found by an idle thread's periodic look (cp_job_take,
 * every second). */
#define STALE_SCAN 256u
static void
coalesce_stale(struct cplane *cp, uint64_t now)
{
	unsigned k = 0;

	pthread_mutex_lock(&cp->mu);
	for (struct q_job *j = cp->jobs_head;
	     j && k < STALE_SCAN &&
	     now > j->listed_us + (uint64_t)COALESCE_US;
	     j = j->next, k++)
		if (dest_open(j->dest)) {
			wake_one(cp, j->dest);
			break;
		}
	pthread_mutex_unlock(&cp->mu);
}

/* The first job of one of d's lists, taken off it. */
static struct q_job *
dest_pop(struct q_dest *d, bool fresh)
{
	struct q_job *j;

	if (fresh) {
		j = d->fresh_head;
		d->fresh_head = j->next;
		if (!d->fresh_head)
			d->fresh_tail = NULL;
	} else {
		j = d->retry_head;
		d->retry_head = j->next;
		if (!d->retry_head)
			d->retry_tail = NULL;
	}
	j->next = NULL;
	return j;
}

/*
 * An operator's hold or delete came after the job was made: a job waiting
 * in its next hop's list is not handed out (a slow next hop's whole
 * backlog waits there, and `queue delete` answered "deleted" while every
 * message of it was still sent). A job left with some of its recipients
 * goes on with those. Those already handed to a delivery thread (at most
 * the next hop's window of batches) finish as they are.
 */
static bool
job_unwanted(struct q_job *j)
{
	struct q_msg *m = j->m;
	unsigned k = 0;

	if (j->kind == QJ_MOVE)
		return false; /* a held message is moved all the same */
	if (m->held)
		return true;
	if (j->kind == QJ_BOUNCE)
		return false;
	for (unsigned i = 0; i < j->n; i++) {
		struct q_rcpt *r = &m->rcpts[j->idx[i]];
		if (r->state == QR_PENDING)
			j->idx[k++] = j->idx[i];
		else
			r->busy = false;
	}
	j->n = k;
	return k == 0;
}

/* A job taken off its list and not handed out: its recipients wait for
 * the next scheduling of their message (a release, or never). */
static void
job_drop(struct cplane *cp, struct q_job *j)
{
	struct q_msg *m = j->m;

	if (j->kind == QJ_BOUNCE)
		m->bounce_busy = false;
	else
		for (unsigned i = 0; i < j->n; i++)
			m->rcpts[j->idx[i]].busy = false;
	msg_jobs_add(cp, m, -1);
	job_free(j);
	msg_update(cp, m, 0);
}

/* Hand out jobs while each destination is under its window. */
static void
dispatch(struct cplane *cp)
{
	struct q_dest **pp = &cp->ready_head, *prev = NULL;
	struct q_job *out_head = NULL, *out_tail = NULL;
	uint64_t now = fd_now_monotonic_us();
	unsigned n_out = 0;

	while (*pp) {
		struct q_dest *d = *pp;
		while ((double)d->active < d->limit * QJ_BATCH &&
		       (d->fresh_head || d->retry_head)) {
			struct q_job *j;
			bool take_fresh = d->fresh_head &&
					  (!d->retry_head || !d->flip);
			/* The results' storage, only for jobs in flight. */
			struct q_job *next =
				take_fresh ? d->fresh_head : d->retry_head;
			if (job_unwanted(next)) {
				dest_pop(d, take_fresh);
				job_drop(cp, next);
				continue;
			}
			unsigned nout = next->kind == QJ_BOUNCE ? 1 : next->n;
			struct q_result *res = calloc(
				1, sizeof(*res) +
					   (nout ? nout : 1) *
						   sizeof(struct q_outcome));
			if (!res)
				break; /* tried again on the next pass */
			d->flip = !d->flip;
			j = dest_pop(d, take_fresh);
			j->res = res;
			j->listed_us = now;
			/* computed on the way out, not read again later */
			j->want_fp = cp->recent && !j->m->fp_ok &&
				     !j->m->fp_tried && j->kind == QJ_DELIVER;
			d->active++;
			if (j->kind == QJ_DELIVER)
				for (unsigned i = 0; i < j->n; i++)
					j->m->rcpts[j->idx[i]].inflight = true;
			if (out_tail)
				out_tail->next = j;
			else
				out_head = j;
			out_tail = j;
			n_out++;
		}
		if (!d->fresh_head && !d->retry_head) {
			*pp = d->next_ready;
			d->listed = false;
			if (cp->ready_tail == d)
				cp->ready_tail = prev;
			continue;
		}
		prev = d;
		pp = &d->next_ready;
	}
	if (!out_head)
		return;
	pthread_mutex_lock(&cp->mu);
	if (cp->jobs_tail)
		cp->jobs_tail->next = out_head;
	else
		cp->jobs_head = out_head;
	cp->jobs_tail = out_tail;
	cp->jobs_out += n_out;
	/* One waiter per connection the jobs can use (dest_wake): each
	 * thread takes its share of a next hop's jobs (cp_job_take), and a
	 * thread woken for a next hop at its window only goes back to sleep
	 * (measured: with one wake-up per job, 5.7 context switches per
	 * delivered message). The jobs of one next hop are adjacent in
	 * out_head. */
	for (struct q_job *j = out_head; j;) {
		struct q_dest *d = j->dest;
		unsigned n = 0, wake = 0;
		d->conn_cap = (unsigned)d->limit; /* limit >= 1 */
		d->coalesce = d->kind != ROUTE_MAILDIR &&
			      d->job_us * QJ_BATCH < COALESCE_US;
		for (; j && j->dest == d; j = j->next, n++)
			d->listed_jobs++;
		if (d->conn_cap > d->conns)
			wake = FD_MIN(dest_wake(d, n), d->conn_cap - d->conns);
		while (wake-- > 0 && wake_one(cp, d))
			;
	}
	pthread_mutex_unlock(&cp->mu);
}

/* A dead destination: its queued jobs are deferred now, not tried. */
static void
dest_drain_dead(struct cplane *cp, struct q_dest *d)
{
	struct q_job *lists[2] = {d->fresh_head, d->retry_head};

	d->fresh_head = d->fresh_tail = d->retry_head = d->retry_tail = NULL;
	for (int l = 0; l < 2; l++) {
		struct q_job *j = lists[l], *next;
		for (; j; j = next) {
			struct q_msg *m = j->m;
			next = j->next;
			if (j->kind == QJ_BOUNCE) {
				m->bounce_busy = false;
				m->bounce_next_us = d->dead_until;
			} else {
				uint64_t now_rt = fd_now_realtime_us();
				for (unsigned i = 0; i < j->n; i++) {
					m->rcpts[j->idx[i]].busy = false;
					/* deleted meanwhile: nothing to defer
					 * (nor to expire, and bounce) */
					if (m->rcpts[j->idx[i]].state !=
					    QR_PENDING)
						continue;
					suspend_rcpt(cp, m, j->idx[i], d,
						     now_rt);
				}
			}
			msg_jobs_add(cp, m, -1);
			job_free(j);
			msg_update(cp, m, 0);
		}
	}
}

static void
dest_feedback(struct cplane *cp, struct q_dest *d, const struct q_job *j)
{
	double max = (double)cp->cfg.dest_concurrency;

	if (j->no_feedback)
		return;
	if (!j->conn_failed) {
		d->fail_streak = 0;
		d->limit += 1.0 / (d->limit > 1 ? d->limit : 1);
		if (d->limit > max)
			d->limit = max;
		return;
	}
	/* Dead after a whole window's worth of failures in a row with no
	 * success between (Postfix's failed pseudo-cohort): a next hop that
	 * turns away a few connections over its own limit (421 too many
	 * connections) is busy, not dead. Two in a row did it, and suspended
	 * its whole queue for retry_min. */
	if (d->fail_streak == 0)
		d->cohort = d->limit > 2 ? (unsigned)ceil(d->limit) : 2;
	d->fail_streak++;
	d->limit = d->limit - 1 < 1 ? 1 : d->limit - 1;
	if (d->fail_streak >= d->cohort && d->kind != ROUTE_MAILDIR) {
		const char *why =
			j->n ? j->res->out[0].text : "connection failed";
		char buf[600];
		d->dead_until = fd_now_realtime_us() +
				cp->cfg.retry_min_ms * 1000;
		snprintf(buf, sizeof(buf),
			 "4.4.1 delivery temporarily suspended: %s", why);
		free(d->dead_reason);
		d->dead_reason = strdup(buf);
		fd_log(FD_LOG_WARN, "qmgr",
		       "event=destination_dead route=%s for_s=%" PRIu64
		       " reason=\"%s\"",
		       d->key, cp->cfg.retry_min_ms / 1000, why);
		d->fail_streak = 0;
		dest_drain_dead(cp, d);
	}
}

/*
 * The body read back from the spool does not match its checksum: the copy
 * we own is damaged (a disk error, a bug). Retrying would fail the same
 * way until the queue lifetime, then bounce a message we can no longer
 * quote. Hold it instead, at once and durably: nothing more is tried, the
 * operator sees it (finaldotctl queue show: held, the reason in the log and
 * /metrics) and decides (release to try again after a repair, delete).
 */
static void
hold_damaged(struct cplane *cp, struct q_msg *m)
{
	if (m->held || m->finished)
		return;
	msg_set_held(cp, m, true);
	heap_remove(cp, m);
	log_rec(cp, DLOG_HELD, m, DLOG_ALL, 0, 0, 0,
		"damaged: body checksum mismatch");
	cp->st_damaged++;
	fd_log(FD_LOG_ERR, "qmgr",
	       "%016" PRIx64 " event=held reason=damaged detail=\"the body "
	       "read back from the spool does not match its checksum; held "
	       "for the operator (finaldotctl queue release|delete)\"",
	       m->id);
}

static void move_applied(struct cplane *cp, struct q_job *j);

static void
apply_result(struct cplane *cp, struct q_job *j)
{
	struct q_msg *m = j->m;
	struct q_dest *d = j->dest;
	uint64_t now_rt = fd_now_realtime_us(), lsn = 0;

	if (d->active)
		d->active--;
	if (j->kind == QJ_MOVE) {
		move_applied(cp, j);
		return;
	}
	if (j->taken_us) {
		uint64_t ns = (fd_now_monotonic_us() - j->taken_us) * 1000;
		d->lat[ctl_lat_bucket(ns)]++;
		d->lat_sum_ns += ns;
	}
	if (j->batch_first)
		d->batches++;
	if (j->kind == QJ_DELIVER && !j->conn_failed && !j->no_feedback)
		d->job_us += ((double)j->wire_us - d->job_us) / 8.0;
	if (j->kind == QJ_BOUNCE) {
		struct q_outcome *o = &j->res->out[0];
		m->bounce_busy = false;
		if (o->out == QO_DEFERRED && !dsn_expired(cp, m, now_rt)) {
			m->bounce_attempts++;
			m->bounce_next_us =
				now_rt + backoff_us(cp, m->bounce_attempts);
			fd_log(FD_LOG_INFO, "qmgr",
			       "%016" PRIx64 " event=bounce status=deferred "
			       "to=<%s> route=%s reply=\"%s\"",
			       m->id, m->sender, d->key, o->text);
		} else {
			const char *st = o->out == QO_DELIVERED ? "sent"
					 : o->out == QO_BOUNCED ? "bounced"
								: "expired";
			for (unsigned i = 0; i < j->n; i++) {
				m->rcpts[j->idx[i]].dsn_done = true;
				lsn = log_rec(cp, DLOG_DSN_DONE, m, j->idx[i],
					      0, 0, 0, o->text);
			}
			if (o->out == QO_DELIVERED)
				cp->st_dsn_sent++;
			else
				cp->st_dsn_dropped++;
			fd_log(o->out == QO_DELIVERED ? FD_LOG_INFO
						      : FD_LOG_WARN,
			       "qmgr",
			       "%016" PRIx64 " event=bounce status=%s to=<%s> "
			       "route=%s reply=\"%s\"",
			       m->id, st, m->sender, d->key, o->text);
		}
	} else {
		for (unsigned i = 0; i < j->n; i++) {
			unsigned k = j->idx[i];
			struct q_rcpt *r = &m->rcpts[k];
			struct q_outcome *o = &j->res->out[i];
			r->busy = false;
			r->inflight = false;
			r->last_us = now_rt;
			if (r->state == QR_DELETED) {
				/* Deleted by the operator meanwhile: said in
				 * the log, nothing more to do. */
				log_outcome(m, r, d->key, j->res->relay,
					    j->res->tls,
					    o->out == QO_DELIVERED ? "sent"
								   : "deleted",
					    o->text);
				continue;
			}
			switch ((enum q_out)o->out) {
			case QO_DELIVERED:
				r->attempts++;
				r->state = QR_DELIVERED;
				set_reason(r, o->text);
				/* NOTIFY=SUCCESS and nobody further reports
				 * it: we do (RFC 3461 6.2.6.3) */
				r->success =
					!(r->notify & FD_NOTIFY_SUCCESS) ||
							!*m->sender ||
							o->dsn_passed
						? Q_SUCCESS_NONE
					: d->kind == ROUTE_SMTP
						? Q_SUCCESS_RELAYED
						: Q_SUCCESS_DELIVERED;
				lsn = log_rec(cp, DLOG_DELIVERED, m, k,
					      r->attempts, 0, r->success,
					      o->text);
				cp->st_delivered++;
				d->delivered++;
				log_outcome(m, r, d->key, j->res->relay,
					    j->res->tls, "sent", o->text);
				break;
			case QO_BOUNCED:
				r->attempts++;
				r->state = QR_BOUNCED;
				set_reason(r, o->text);
				r->remote = o->remote;
				lsn = log_rec(cp, DLOG_BOUNCED, m, k,
					      r->attempts, 0,
					      o->remote ? DLOG_AUX_REMOTE : 0,
					      o->text);
				cp->st_bounced++;
				d->bounced++;
				log_outcome(m, r, d->key, j->res->relay,
					    j->res->tls, "bounced", o->text);
				if (!dsn_wanted(m, r))
					r->dsn_done = true;
				break;
			case QO_DEFERRED:
			default:
				d->deferred++;
				defer_rcpt(cp, m, k,
					   now_rt + backoff_us(cp, r->attempts +
									   1),
					   o->text, o->remote, true);
				if (r->state == QR_PENDING)
					log_outcome(m, r, d->key, j->res->relay,
						    j->res->tls, "deferred",
						    o->text);
				else
					lsn = 0;
				break;
			}
		}
		dest_feedback(cp, d, j);
	}
	if (j->res->fp_ok && !m->fp_ok) {
		memcpy(m->fp, j->res->fp, 32);
		m->fp_ok = m->fp_tried = true;
	}
	if (j->damaged)
		hold_damaged(cp, m);
	msg_jobs_add(cp, m, -1);
	job_free(j);
	msg_update(cp, m, lsn);
}

/* ---- moved messages ------------------------------------------------------
 *
 * A segment goes back to its worker only when no queued message has a
 * record in it, so one message deferred for days kept its whole segment
 * (and every delivered message in it) on disk: with 1% of the mail for a
 * dead next hop, almost every segment stayed, and the disk filled (found
 * in review: 1 MiB segments, max 6, 6 deferred messages of 132 got every
 * client 452). Now a message still queued in a segment that was sealed
 * move_after ago is copied to its own file in spool/moved/ (moved.h) by a
 * delivery thread (QJ_MOVE), and once that is durable the message points
 * at the file and lets go of its segments. Only messages not due in the
 * next MOVE_DUE_SLACK are moved: one about to be tried again would only
 * be read twice. Recovery imports spool/moved/ after the spool scan (a
 * message found in both keeps its segment copy; the file is deleted).
 */
#define MOVES_MAX 64u                /* QJ_MOVE jobs out at once */
#define MOVE_DUE_SLACK 10000000ull   /* us */
#define MOVE_AFTER_DEFAULT 60000ull  /* ms */

static void
moved_dir(const struct cplane *cp, char *buf, size_t n)
{
	snprintf(buf, n, "%s/" MOVED_DIR, cp->spool_dir);
}

/* The pseudo-segment for message id's file (NULL, logged, when the file
 * cannot be read). */
static struct q_seg *
moved_seg_open(struct cplane *cp, uint64_t id)
{
	struct q_seg *s = calloc(1, sizeof(*s));
	size_t b;

	if (!s)
		return NULL;
	s->worker = Q_MOVED_WORKER;
	s->file_no = id;
	s->use_seq = id;
	s->moved = true;
	s->sealed = true;
	moved_path(s->path, sizeof(s->path), cp->spool_dir, id, 0);
	/* No descriptor kept: each reader opens the file (q_body_read,
	 * the cat); there may be a million of them. Here it must exist. */
	s->fd = -1;
	if (access(s->path, R_OK) != 0) {
		fd_log(FD_LOG_ERR, "qmgr",
		       "event=moved_open_failed path=%s error=\"%s\"", s->path,
		       strerror(errno));
		free(s);
		return NULL;
	}
	b = seg_bucket(s->worker, s->use_seq);
	s->hnext = cp->seg_h[b];
	cp->seg_h[b] = s;
	cp->n_segs++;
	return s;
}

/* Nothing references a moved message's file: its message is finished and
 * its outcome durable (release_finished), or it was never used. The file
 * goes, durably: a file that came back after the delivery log forgot the
 * message (a checkpoint) would be delivered again. */
static void
moved_seg_done(struct cplane *cp, struct q_seg *s)
{
	char dir[4300];
	int r = 0;

	if (s->reclaimed)
		return;
	if (unlink(s->path) != 0 && errno != ENOENT)
		r = -errno;
	moved_dir(cp, dir, sizeof(dir));
	if (r == 0)
		r = fd_fsync_dir(dir);
	if (r != 0) {
		/* Kept (its message object too, so that a checkpoint
		 * keeps its record): a restart deletes it. */
		fd_log(FD_LOG_ERR, "qmgr",
		       "event=moved_delete_failed path=%s error=\"%s\"",
		       s->path, strerror(-r));
		return;
	}
	s->reclaimed = true; /* (it holds no descriptor: moved_seg_open()) */
	cp->reclaims_heard = true; /* released messages may go now */
	seg_free_if_unused(cp, s);
}

static bool
seg_pinned(const struct q_seg *s, uint64_t now, uint64_t after_us)
{
	return !s->moved && s->sealed && s->refs && !s->reclaim_sent &&
	       !s->reclaimed && now - s->sealed_us >= after_us;
}

/* Every message still queued in a segment sealed move_after ago and not
 * due soon gets a QJ_MOVE job (at most MOVES_MAX out). Looked for once a
 * second, and the queue walked only when such a segment exists. */
static void
move_pinned(struct cplane *cp)
{
	uint64_t now = fd_now_monotonic_us(), now_rt = fd_now_realtime_us();
	uint64_t after = (cp->cfg.move_after_ms ? cp->cfg.move_after_ms
						: MOVE_AFTER_DEFAULT) *
			 1000;
	bool any = false;

	if (now < cp->move_next_us || cp->moves_out >= MOVES_MAX ||
	    !cp->mover)
		return;
	cp->move_next_us = now + 1000000;
	for (size_t b = 0; b < SEG_BUCKETS && !any; b++)
		for (struct q_seg *g = cp->seg_h[b]; g && !any; g = g->hnext)
			any = seg_pinned(g, now, after);
	if (!any)
		return;
	for (size_t b = 0; b < cp->msg_cap && cp->moves_out < MOVES_MAX; b++)
		for (struct q_msg *m = cp->msg_h[b];
		     m && cp->moves_out < MOVES_MAX; m = m->hnext) {
			bool pinned = false;
			struct q_job *j;
			if (m->finished || m->released || m->moving ||
			    m->jobs || m->bounce_busy ||
			    m->body_len > UINT32_MAX)
				continue;
			if (!m->held && (!m->heap_idx ||
					 m->next_us < now_rt + MOVE_DUE_SLACK))
				continue;
			for (unsigned i = 0; i < m->n_segs && !pinned; i++)
				pinned = seg_pinned(m->segs[i], now, after);
			if (!pinned || !(j = job_new(m, cp->mover, QJ_MOVE, 0)))
				continue;
			m->moving = true;
			heap_remove(cp, m);
			msg_jobs_add(cp, m, 1);
			dest_enqueue(cp, cp->mover, j);
			cp->moves_out++;
		}
}

/* A QJ_MOVE job came back: the message now lives in its file, or stays
 * where it was. */
static void
move_applied(struct cplane *cp, struct q_job *j)
{
	struct q_msg *m = j->m;
	struct q_seg *s = NULL;

	m->moving = false;
	if (cp->moves_out)
		cp->moves_out--;
	struct q_seg_id *old = malloc(m->n_segs * sizeof(*old));

	if (old && j->res->move_err == 0 && !j->damaged)
		s = moved_seg_open(cp, m->id);
	if (s) {
		/* Every old reference dropped (a segment whose last one this
		 * was goes back to its worker), then the file's taken; a
		 * large message may span many segments. Until they are
		 * reclaimed they still hold the message: it is not freed
		 * (nor forgotten by a checkpoint) before (old_segs). */
		for (unsigned i = 0; i < m->n_segs; i++) {
			struct q_seg *o = m->segs[i];
			old[i] = (struct q_seg_id){o->worker, o->use_seq};
			if (o->msgs)
				o->msgs--;
			qm_seg_unref(cp, o); /* held: not reclaimed, not freed */
		}
		m->old_segs = old;
		m->n_old_segs = m->n_segs;
		old = NULL;
		qm_seg_ref(cp, s);
		s->msgs++;
		m->segs[0] = s;
		m->n_segs = 1;
		if (m->body_len) {
			m->pieces[0] = (struct q_piece){
				.seg = s,
				.file_off = j->res->move_body_off,
				.len = (uint32_t)m->body_len};
			m->n_pieces = 1;
		} else {
			m->n_pieces = 0;
		}
		cp->st_moved++;
		fd_log(FD_LOG_INFO, "qmgr",
		       "%016" PRIx64 " event=moved path=%s size=%" PRIu64,
		       m->id, s->path, m->body_len);
	} else {
		int e = j->res->move_err ? -j->res->move_err : EIO;

		/* No new moves for a minute: a full disk (ENOSPC) would
		 * otherwise fail them all again every second, a log line
		 * each. */
		cp->move_next_us = fd_now_monotonic_us() + 60000000ull;
		cp->st_move_failed++;
		fd_log(FD_LOG_ERR, "qmgr",
		       "%016" PRIx64 " event=move_failed error=\"%s\"", m->id,
		       j->damaged ? "body damaged" : strerror(e));
	}
	free(old);
	if (j->damaged)
		hold_damaged(cp, m);
	msg_jobs_add(cp, m, -1);
	job_free(j);
	msg_update(cp, m, 0);
}

/*
 * At start, after the spool scan's messages: those in spool/moved/. A
 * message the scan found too keeps its segment copy (the move was not
 * done with it, or its segment not reclaimed yet): the file goes. Half
 * written files (.tmp-) go. A file that does not check out is kept and
 * reported, never deleted: it may be the only copy.
 */
static int
moved_recover(struct cplane *cp)
{
	char dir[4300], path[4600];
	size_t n_ok = 0, n_dup = 0, n_bad = 0;
	void *scratch = malloc(moved_scratch_max());
	bool removed = false;
	struct dirent *e;
	DIR *d;
	int r = 0;

	moved_dir(cp, dir, sizeof(dir));
	if (!scratch)
		return -ENOMEM;
	if ((r = fd_mkdir_durable(dir, 0700)) != 0 || !(d = opendir(dir))) {
		r = r ? r : -errno;
		free(scratch);
		fd_log(FD_LOG_ERR, "qmgr",
		       "event=moved_dir_failed path=%s error=\"%s\"", dir,
		       strerror(-r));
		return r;
	}
	while ((e = readdir(d))) {
		struct moved_info mi;
		struct q_seg *s;
		struct q_piece pc;
		struct stat st;
		int fd, k;

		if (e->d_name[0] == '.' && strncmp(e->d_name, ".tmp-", 5))
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		if (!strncmp(e->d_name, ".tmp-", 5)) {
			removed |= unlink(path) == 0;
			continue;
		}
		if (strlen(e->d_name) != 20 ||
		    strcmp(e->d_name + 16, ".msg") != 0)
			continue;
		fd = fd_open_noatime(path, O_RDONLY | O_CLOEXEC);
		k = fd < 0 ? -errno : fstat(fd, &st) != 0 ? -errno : 0;
		if (k == 0)
			k = moved_read(fd, (uint64_t)st.st_size, &mi, scratch,
				       moved_scratch_max());
		if (fd >= 0)
			close(fd);
		if (k == 0 && mi.worker >= 256)
			k = -EBADMSG;
		if (k != 0) {
			n_bad++;
			fd_log(FD_LOG_ERR, "qmgr",
			       "event=damage what=moved_file path=%s "
			       "error=\"%s\" action=\"kept, not queued\"",
			       path, strerror(-k));
			continue;
		}
		if (msg_find(cp, mi.id)) {
			n_dup++;
			removed |= unlink(path) == 0;
			continue;
		}
		if (!(s = moved_seg_open(cp, mi.id))) {
			n_bad++;
			continue;
		}
		pc = (struct q_piece){.seg = s, .file_off = mi.body_off,
				      .len = (uint32_t)mi.body_len};
		k = qm_msg_add(cp, mi.worker, mi.id, &mi.env, mi.body_len,
			       mi.body_crc, &pc, mi.body_len ? 1 : 0, s, s);
		if (k != 0) {
			r = k;
			break;
		}
		/* New ids stay past it (msgid seeds: the log may not name
		 * every moved message). */
		if (mi.id > cp->replay_max_id[mi.worker])
			cp->replay_max_id[mi.worker] = mi.id;
		n_ok++;
	}
	closedir(d);
	free(scratch);
	if (removed && r == 0)
		r = fd_fsync_dir(dir);
	if (n_ok || n_dup || n_bad)
		fd_log(n_bad ? FD_LOG_WARN : FD_LOG_INFO, "qmgr",
		       "event=moved_recovered messages=%zu "
		       "in_segments_too=%zu bad=%zu",
		       n_ok, n_dup, n_bad);
	return r;
}

/* ---- delivery log replay and checkpoints -------------------------------- */

struct replay_stats {
	uint64_t applied, unknown;
};

static int
replay_rec(void *ctx, const struct dlog_rec *rec)
{
	struct cplane *cp = ctx;
	struct q_msg *m = msg_find(cp, rec->msgid);
	unsigned lo, hi, w = fd_msgid_worker(rec->msgid);

	/* every record names a message id (checkpoint marks are not
	 * replayed) */
	if (rec->msgid > cp->replay_max_id[w])
		cp->replay_max_id[w] = rec->msgid;
	if (rec->type == DLOG_INDOUBT) {
		uint8_t fp[32];
		uint64_t now = fd_now_realtime_us();
		if (!cp->cfg.dedup_window_ms || !rec->text ||
		    !fp_unhex(rec->text, rec->text_len, fp) ||
		    rec->time_us + cp->cfg.dedup_window_ms * 1000 < now)
			return 0;
		indoubt_add(cp, fp, rec->msgid, rec->time_us);
		if (m && !m->indoubt) {
			uint64_t until = rec->time_us +
					 cp->cfg.dedup_settle_ms * 1000;
			m->indoubt = true;
			m->settle_until = until > now ? until : 0;
		}
		return 0;
	}
	if (!m)
		return 0; /* its segments were reclaimed: history */
	if (rec->rcpt == DLOG_ALL) {
		lo = 0;
		hi = m->n_rcpts;
	} else if (rec->rcpt < m->n_rcpts) {
		lo = rec->rcpt;
		hi = lo + 1;
	} else {
		return 0;
	}
	for (unsigned i = lo; i < hi; i++) {
		struct q_rcpt *r = &m->rcpts[i];
		char text[DLOG_TEXT_MAX + 1];
		size_t tl = rec->text_len < DLOG_TEXT_MAX ? rec->text_len
							 : DLOG_TEXT_MAX;
		if (rec->text && tl)
			memcpy(text, rec->text, tl);
		text[tl] = '\0';
		switch (rec->type) {
		case DLOG_ATTEMPT:
			r->attempt_open = true;
			break;
		case DLOG_DELIVERED:
		case DLOG_BOUNCED:
		case DLOG_EXPIRED:
		case DLOG_DELETED:
		case DLOG_SUPPRESSED:
			r->state = rec->type == DLOG_DELIVERED ? QR_DELIVERED
				   : rec->type == DLOG_BOUNCED ? QR_BOUNCED
				   : rec->type == DLOG_EXPIRED ? QR_EXPIRED
				   : rec->type == DLOG_DELETED ? QR_DELETED
							       : QR_SUPPRESSED;
			r->attempt_open = false;
			if (rec->attempts)
				r->attempts = rec->attempts;
			r->success = rec->type == DLOG_DELIVERED &&
						     rec->aux <= Q_SUCCESS_RELAYED
					     ? (uint8_t)rec->aux
					     : Q_SUCCESS_NONE;
			set_reason(r, text);
			r->remote = (rec->type == DLOG_BOUNCED ||
				     rec->type == DLOG_EXPIRED) &&
				    (rec->aux & DLOG_AUX_REMOTE);
			break;
		case DLOG_DEFERRED:
			r->attempt_open = false;
			r->attempts = rec->attempts;
			r->next_us = rec->next_us;
			set_reason(r, text);
			r->remote = (rec->aux & DLOG_AUX_REMOTE) != 0;
			break;
		case DLOG_HELD:
			msg_set_held(cp, m, true);
			break;
		case DLOG_RELEASED:
			msg_set_held(cp, m, false);
			break;
		case DLOG_DSN_DONE:
			r->dsn_done = true;
			r->attempt_open = false; /* its DSN's attempt ended */
			break;
		case DLOG_NOTE:
		case DLOG_INDOUBT:
		case DLOG_CKPT_BEGIN:
		case DLOG_CKPT_END:
			break;
		}
		if (rec->type == DLOG_SUPPRESSED)
			m->dup_of = rec->aux;
	}
	return 0;
}

struct snap_ctx {
	struct cplane *cp;
	dlog_emit_fn emit;
	void *ectx;
};

static int
snap_emit(struct snap_ctx *sc, enum dlog_type type, const struct q_msg *m,
	  uint32_t rcpt, const struct q_rcpt *r)
{
	struct dlog_rec rec = {
		.type = type,
		.msgid = m->id,
		.rcpt = rcpt,
		.attempts = r ? r->attempts : 0,
		.time_us = fd_now_realtime_us(),
		.next_us = r && type == DLOG_DEFERRED ? r->next_us : 0,
		.aux = !r ? 0
		       : type == DLOG_DELIVERED ? r->success
		       : (type == DLOG_DEFERRED || type == DLOG_BOUNCED ||
			  type == DLOG_EXPIRED) && r->remote
			       ? DLOG_AUX_REMOTE
			       : 0,
		.text = r ? r->reason : NULL,
		.text_len = (uint16_t)(r && r->reason
					       ? strnlen(r->reason,
							 DLOG_TEXT_MAX)
					       : 0),
	};

	return sc->emit(sc->ectx, &rec);
}

/* The state of every message still in the queue, released ones too (their
 * segments may still hold them until reclaimed). */
static int
snapshot(void *ctx, dlog_emit_fn emit, void *ectx)
{
	struct snap_ctx sc = {.cp = ctx, .emit = emit, .ectx = ectx};
	struct cplane *cp = ctx;
	uint64_t now = fd_now_realtime_us();

	/* The in-doubt fingerprints still in their window, whether or not
	 * their messages are. */
	for (size_t b = 0; b < 1024; b++)
		for (struct indoubt *e = cp->id_h[b]; e; e = e->next) {
			char hex[65];
			struct dlog_rec rec = {
				.type = DLOG_INDOUBT,
				.msgid = e->msgid,
				.rcpt = DLOG_ALL,
				.time_us = e->at_us,
				.text = hex,
				.text_len = 64,
			};
			int r;
			if (e->at_us + cp->cfg.dedup_window_ms * 1000 < now)
				continue;
			fp_hex(e->fp, hex);
			if ((r = emit(ectx, &rec)) != 0)
				return r;
		}

	for (size_t b = 0; b < cp->msg_cap; b++) {
		for (struct q_msg *m = cp->msg_h[b]; m; m = m->hnext) {
			int r = 0;
			if (m->held)
				r = snap_emit(&sc, DLOG_HELD, m, DLOG_ALL,
					      NULL);
			for (unsigned i = 0; i < m->n_rcpts && !r; i++) {
				const struct q_rcpt *rc = &m->rcpts[i];
				static const enum dlog_type map[] = {
					[QR_PENDING] = DLOG_DEFERRED,
					[QR_DELIVERED] = DLOG_DELIVERED,
					[QR_BOUNCED] = DLOG_BOUNCED,
					[QR_EXPIRED] = DLOG_EXPIRED,
					[QR_DELETED] = DLOG_DELETED,
					[QR_SUPPRESSED] = DLOG_SUPPRESSED,
				};
				/* A recipient whose job is out to a delivery
				 * thread may have had its ATTEMPT appended before
				 * this checkpoint: the snapshot says so itself,
				 * or a crash would hide a possible duplicate
				 * (over-counting is safe; jobs still queued have
				 * appended nothing). After its state record:
				 * replay closes an open attempt at a DEFERRED or
				 * a BOUNCED, so an ATTEMPT before them counted
				 * nothing for a retry or a DSN in flight. */
				bool attempt = rc->inflight ||
					       (m->bounce_busy &&
						needs_dsn(m, rc));
				if (rc->state == QR_PENDING &&
				    rc->attempts == 0) {
					/* nothing to say but the attempt */
				} else if (rc->state == QR_SUPPRESSED) {
					struct dlog_rec sr = {
						.type = DLOG_SUPPRESSED,
						.msgid = m->id,
						.rcpt = i,
						.time_us = now,
						.aux = m->dup_of,
					};
					r = emit(ectx, &sr);
				} else {
					r = snap_emit(&sc, map[rc->state], m, i,
						      rc);
					if (!r && rc->dsn_done)
						r = snap_emit(&sc,
							      DLOG_DSN_DONE, m,
							      i, NULL);
				}
				if (!r && attempt)
					r = snap_emit(&sc, DLOG_ATTEMPT, m, i,
						      NULL);
			}
			if (r)
				return r;
		}
	}
	return 0;
}

/* ---- the loop ---------------------------------------------------------- */

static bool
drain_ports(struct cplane *cp)
{
	bool any = false;

	for (unsigned w = 0; w < cp->nworkers; w++) {
		struct fd_ctl_event e;
		unsigned n = 0;
		while (n < 4096 && fd_ring_pop(&cp->ports[w].up, &e)) {
			tail_event(cp->tails[w], &e);
			n++;
		}
		any |= n > 0;
	}
	return any;
}

static bool
apply_results(struct cplane *cp)
{
	struct q_job *list, *next;

	pthread_mutex_lock(&cp->mu);
	list = cp->res_head;
	cp->res_head = cp->res_tail = NULL;
	pthread_mutex_unlock(&cp->mu);
	if (!list)
		return false;
	for (; list; list = next) {
		next = list->next;
		pthread_mutex_lock(&cp->mu);
		cp->jobs_out--;
		pthread_mutex_unlock(&cp->mu);
		apply_result(cp, list);
	}
	return true;
}

static bool
schedule_due(struct cplane *cp)
{
	uint64_t now_rt = fd_now_realtime_us();
	unsigned n = 0;

	/* Bounded per iteration so results and the ports are not starved
	 * when a large backlog falls due at once. */
	while (cp->heap_n && cp->heap[0]->next_us <= now_rt && n < 2048) {
		struct q_msg *m = cp->heap[0];
		heap_remove(cp, m);
		schedule_msg(cp, m, now_rt);
		n++;
	}
	return n > 0;
}

/* ---- operator requests (cplane.h: cp_call) ------------------------------- */

struct cp_call {
	cp_call_fn fn;
	void *arg;
	int ret;
	bool done;
	struct cp_call *next;
};

static bool drain_ports(struct cplane *cp);

static bool
run_calls(struct cplane *cp)
{
	struct cp_call *list;

	pthread_mutex_lock(&cp->mu);
	list = cp->calls_head;
	cp->calls_head = cp->calls_tail = NULL;
	pthread_mutex_unlock(&cp->mu);
	if (!list)
		return false;
	/* An operator sees every message answered 250 before the call. */
	drain_ports(cp);
	for (unsigned w = 0; w < cp->nworkers; w++)
		tail_flush(cp->tails[w]);
	while (list) {
		struct cp_call *c = list;
		list = c->next;
		c->ret = c->fn(cp, c->arg);
		pthread_mutex_lock(&cp->mu);
		c->done = true;
		pthread_cond_broadcast(&cp->call_cv);
		pthread_mutex_unlock(&cp->mu);
	}
	return true;
}

int
cp_call(struct cplane *cp, cp_call_fn fn, void *arg)
{
	struct cp_call c = {.fn = fn, .arg = arg};

	pthread_mutex_lock(&cp->mu);
	if (!cp->thr_started || atomic_load(&cp->stop)) {
		pthread_mutex_unlock(&cp->mu);
		return -ESHUTDOWN;
	}
	if (cp->calls_tail)
		cp->calls_tail->next = &c;
	else
		cp->calls_head = &c;
	cp->calls_tail = &c;
	pthread_cond_signal(&cp->res_cv); /* the queue manager's wake-up */
	while (!c.done)
		pthread_cond_wait(&cp->call_cv, &cp->mu);
	pthread_mutex_unlock(&cp->mu);
	return c.ret;
}

/* ---- the operator's view and actions ------------------------------------ */

static const char *
msg_state(const struct q_msg *m)
{
	return m->finished ? "finished" : m->held ? "held"
			 : m->jobs	 ? "active"
					 : "deferred";
}

static int
view_msg(struct cplane *cp, const struct q_msg *m, cp_msg_view_fn fn,
	 void *ctx)
{
	struct cp_rcpt_view rv[64], *rp = rv;
	struct cp_msg_view v;
	int r;

	(void)cp;
	if (m->n_rcpts > 64 &&
	    !(rp = calloc(m->n_rcpts, sizeof(*rp))))
		return -ENOMEM;
	for (unsigned i = 0; i < m->n_rcpts; i++) {
		const struct q_rcpt *rc = &m->rcpts[i];
		rp[i] = (struct cp_rcpt_view){
			.addr = rc->addr,
			.orcpt = rc->orcpt,
			.state = q_rstate_name(rc->state),
			.reason = rc->reason ? rc->reason : "",
			.route = rc->dest ? rc->dest->key : "",
			.attempts = rc->attempts,
			.next_us = rc->state == QR_PENDING ? rc->next_us : 0,
			.last_us = rc->last_us,
			.busy = rc->busy,
		};
	}
	v = (struct cp_msg_view){
		.id = m->id,
		.worker = m->worker,
		.arrival_us = m->arrival_us,
		.size = m->body_len,
		.sender = m->sender,
		.helo = m->helo,
		.client = m->client,
		.envid = m->envid,
		.held = m->held,
		.finished = m->finished,
		.state = msg_state(m),
		.indoubt = m->indoubt,
		.dup_of = m->dup_of,
		.settle_until = m->settle_until,
		.n_rcpts = m->n_rcpts,
		.rcpts = rp,
	};
	r = fn(ctx, &v);
	if (rp != rv)
		free(rp);
	return r;
}

struct list_call {
	uint64_t *cursor;
	unsigned max;
	cp_msg_view_fn fn;
	void *ctx;
	uint64_t id;
};

static int
list_fn(struct cplane *cp, void *arg)
{
	struct list_call *lc = arg;
	unsigned n = 0;
	size_t b = (size_t)*lc->cursor;

	for (; b < cp->msg_cap && n < lc->max; b++) {
		for (struct q_msg *m = cp->msg_h[b]; m; m = m->hnext) {
			int r;
			if (m->finished)
				continue;
			if ((r = view_msg(cp, m, lc->fn, lc->ctx)) != 0)
				return r;
			n++;
		}
	}
	*lc->cursor = b;
	return b < cp->msg_cap ? 1 : 0;
}

int
cp_queue_list(struct cplane *cp, uint64_t *cursor, unsigned max,
	      cp_msg_view_fn fn, void *ctx)
{
	struct list_call lc = {.cursor = cursor, .max = max ? max : 1,
			       .fn = fn, .ctx = ctx};

	return cp_call(cp, list_fn, &lc);
}

static int
show_fn(struct cplane *cp, void *arg)
{
	struct list_call *lc = arg;
	struct q_msg *m = msg_find(cp, lc->id);

	return m ? view_msg(cp, m, lc->fn, lc->ctx) : -ENOENT;
}

int
cp_queue_show(struct cplane *cp, uint64_t id, cp_msg_view_fn fn, void *ctx)
{
	struct list_call lc = {.id = id, .fn = fn, .ctx = ctx};

	return cp_call(cp, show_fn, &lc);
}

/* ---- queue.cat: found here, read on the caller's thread -----------------
 *
 * The queue manager only finds the message and pins its segments, one
 * reference each, as a queued message holds them: a referenced segment is
 * never offered for reclaim, so its worker cannot write another epoch's
 * records over this message's bytes however long the reading takes (a
 * client that stops reading is closed after CTL_IDLE_S, which ends the
 * pin). The reading itself, tens of MiB to a client of any speed, is the
 * caller's, with descriptors of its own: this loop never waits for a disk
 * or a socket on its behalf.
 */
struct cp_cat_piece {
	int fd;            /* one of k->fds */
	uint32_t len;
	uint64_t file_off; /* of the payload in the segment file */
};

struct cp_cat {
	uint64_t id;
	uint64_t body_len;
	uint32_t body_crc;
	bool was_queued;   /* not finished at open */
	/* the queue manager's: the pinned segments; fds[j] is a dup of
	 * segs[j]'s descriptor if a piece lies in it, else -1 */
	unsigned n_segs;
	struct q_seg **segs;
	int *fds;
	/* the reader's */
	uint64_t pos;      /* body bytes returned so far */
	uint32_t crc;      /* CRC32C of those */
	int err;           /* sticky: once a read failed, every read does */
	bool checked;      /* the whole body matched body_crc */
	size_t piece;      /* the piece holding pos */
	uint64_t piece_off; /* body offset where that piece starts */
	size_t n_pieces;
	struct cp_cat_piece pieces[];
};

struct cat_open {
	uint64_t id;
	struct cp_cat *k;
};

static void
cat_close_fds(struct cp_cat *k, unsigned n)
{
	for (unsigned j = 0; j < n; j++)
		if (k->fds[j] >= 0)
			close(k->fds[j]);
}

static int
cat_open_fn(struct cplane *cp, void *arg)
{
	struct cat_open *co = arg;
	struct q_msg *m = msg_find(cp, co->id);
	struct cp_cat *k;
	unsigned j;
	int r;

	/* Released: its references are gone, its segments may be reused. */
	if (!m || m->released)
		return -ENOENT;
	k = calloc(1, sizeof(*k) + m->n_pieces * sizeof(k->pieces[0]) +
			      m->n_segs * (sizeof(*k->segs) + sizeof(*k->fds)));
	if (!k)
		return -ENOMEM;
	k->segs = (struct q_seg **)(void *)(k->pieces + m->n_pieces);
	k->fds = (int *)(void *)(k->segs + m->n_segs);
	for (j = 0; j < m->n_segs; j++) {
		k->segs[j] = m->segs[j];
		k->fds[j] = -1;
	}
	for (size_t i = 0; i < m->n_pieces; i++) {
		const struct q_piece *p = &m->pieces[i];
		for (j = 0; j < m->n_segs && m->segs[j] != p->seg; j++)
			;
		if (j == m->n_segs) {
			r = -EIO; /* qm_msg_add() lists every piece's */
			goto out_close;
		}
		if (k->fds[j] < 0 && p->seg->moved) {
			k->fds[j] = fd_open_noatime(p->seg->path,
						    O_RDONLY | O_CLOEXEC);
			if (k->fds[j] < 0) {
				r = -errno;
				goto out_close;
			}
		}
		if (k->fds[j] < 0) {
			if (p->seg->fd < 0) {
				r = -EBADF; /* logged when it failed to open */
				goto out_close;
			}
			k->fds[j] = fcntl(p->seg->fd, F_DUPFD_CLOEXEC, 0);
			if (k->fds[j] < 0) {
				r = -errno;
				goto out_close;
			}
		}
		k->pieces[i] = (struct cp_cat_piece){
			.fd = k->fds[j], .len = p->len, .file_off = p->file_off};
	}
	k->id = m->id;
	k->body_len = m->body_len;
	k->body_crc = m->body_crc;
	k->was_queued = !m->finished;
	k->n_pieces = m->n_pieces;
	k->n_segs = m->n_segs;
	for (j = 0; j < k->n_segs; j++)
		qm_seg_ref(cp, k->segs[j]);
	co->k = k;
	return 0;

out_close:
	cat_close_fds(k, m->n_segs);
	free(k);
	return r;
}

int
cp_queue_cat_open(struct cplane *cp, uint64_t id, struct cp_cat **out)
{
	struct cat_open co = {.id = id};
	int r = cp_call(cp, cat_open_fn, &co);

	*out = r == 0 ? co.k : NULL;
	return r;
}

long
cp_queue_cat_read(struct cp_cat *k, void *buf, size_t n)
{
	uint8_t *out = buf;
	size_t got = 0;

	if (k->err)
		return k->err;
	if (n > k->body_len - k->pos)
		n = (size_t)(k->body_len - k->pos);
	while (got < n) {
		const struct cp_cat_piece *p;
		uint64_t in;
		size_t want;
		ssize_t r;

		if (k->piece >= k->n_pieces)
			return k->err = -EIO; /* pieces short of body_len */
		p = &k->pieces[k->piece];
		in = k->pos - k->piece_off;
		if (in == p->len) { /* an empty piece */
			k->piece_off += p->len;
			k->piece++;
			continue;
		}
		want = (size_t)(p->len - in);
		if (want > n - got)
			want = n - got;
		r = pread(p->fd, out + got, want, (off_t)(p->file_off + in));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return k->err = -errno;
		if (r == 0)
			return k->err = -EIO; /* shorter than recorded */
		k->crc = fd_crc32c(k->crc, out + got, (size_t)r);
		got += (size_t)r;
		k->pos += (uint64_t)r;
		if (k->pos - k->piece_off == p->len) {
			k->piece_off += p->len;
			k->piece++;
		}
	}
	/* The bytes that complete the body are only returned if it is the
	 * body that was accepted: the caller's last piece is never damage. */
	if (k->pos == k->body_len && !k->checked) {
		if (k->crc != k->body_crc) {
			fd_log(FD_LOG_ERR, "qmgr", "%016" PRIx64 " event=body_"
			       "damaged reader=cat expected_crc=%08x got=%08x",
			       k->id, k->body_crc, k->crc);
			return k->err = -EIO;
		}
		k->checked = true;
	}
	return (long)got;
}

static int
cat_close_fn(struct cplane *cp, void *arg)
{
	struct cp_cat *k = arg;
	struct q_msg *m = msg_find(cp, k->id);
	bool left = k->was_queued && (!m || m->finished);

	for (unsigned j = 0; j < k->n_segs; j++)
		qm_seg_unref(cp, k->segs[j]);
	return left ? -ESTALE : 0;
}

int
cp_queue_cat_close(struct cplane *cp, struct cp_cat *k)
{
	int r;

	if (!k)
		return 0;
	/* Failing only once the queue manager stopped: the references then
	 * go with its segments in cp_free(). */
	r = cp_call(cp, cat_close_fn, k);
	cat_close_fds(k, k->n_segs);
	free(k);
	return r;
}

/* One action on one message; true if it changed anything. */
static bool
act_one(struct cplane *cp, struct q_msg *m, enum cp_action a,
	const char *to_domain, uint64_t *lsn_out)
{
	bool changed = false;
	uint64_t lsn = 0;

	if (m->finished)
		return false;
	switch (a) {
	case CP_HOLD:
		if (m->held)
			return false;
		msg_set_held(cp, m, true);
		heap_remove(cp, m);
		*lsn_out = log_rec(cp, DLOG_HELD, m, DLOG_ALL, 0, 0, 0,
				   "operator");
		fd_log(FD_LOG_INFO, "qmgr", "%016" PRIx64 " event=held",
		       m->id);
		return true;
	case CP_RELEASE:
		if (!m->held)
			return false;
		msg_set_held(cp, m, false);
		*lsn_out = log_rec(cp, DLOG_RELEASED, m, DLOG_ALL, 0, 0, 0,
				   "operator");
		fd_log(FD_LOG_INFO, "qmgr", "%016" PRIx64 " event=released",
		       m->id);
		msg_update(cp, m, 0);
		return true;
	case CP_DELETE:
		for (unsigned i = 0; i < m->n_rcpts; i++) {
			struct q_rcpt *r = &m->rcpts[i];
			if (r->state != QR_PENDING)
				continue;
			r->state = QR_DELETED;
			set_reason(r, "deleted by the operator");
			lsn = log_rec(cp, DLOG_DELETED, m, i, r->attempts, 0, 0,
				      "operator");
			changed = true;
		}
		if (changed) {
			*lsn_out = lsn;
			fd_log(FD_LOG_INFO, "qmgr",
			       "%016" PRIx64 " event=deleted", m->id);
			msg_update(cp, m, lsn);
		}
		return changed;
	case CP_FLUSH:
		for (unsigned i = 0; i < m->n_rcpts; i++) {
			struct q_rcpt *r = &m->rcpts[i];
			if (r->state != QR_PENDING || r->busy)
				continue;
			if (to_domain && *to_domain &&
			    !route_same_domain(route_addr_domain(r->addr),
					       to_domain))
				continue;
			r->next_us = 0;
			if (r->dest)
				r->dest->dead_until = 0;
			changed = true;
		}
		if (!to_domain || !*to_domain)
			m->bounce_next_us = 0;
		if (changed && !m->held)
			heap_set(cp, m, 0);
		return changed;
	}
	return false;
}

struct action_call {
	enum cp_action a;
	const uint64_t *ids;
	size_t n;
	const char *to_domain;
	size_t affected, unknown;
	uint64_t lsn; /* the last record appended */
};

static int
action_fn(struct cplane *cp, void *arg)
{
	struct action_call *ac = arg;

	/* Hold, release and delete are kept in the delivery log (they
	 * survive a restart): with the log failed they would not be, and a
	 * delete would come back. Refused, said why; flush records nothing. */
	if (ac->a != CP_FLUSH && cp->log && dlog_error(cp->log))
		return -ENOTRECOVERABLE;
	if (ac->n) {
		for (size_t i = 0; i < ac->n; i++) {
			struct q_msg *m = msg_find(cp, ac->ids[i]);
			if (!m || m->finished)
				ac->unknown++;
			else if (act_one(cp, m, ac->a, ac->to_domain, &ac->lsn))
				ac->affected++;
		}
		return 0;
	}
	for (size_t b = 0; b < cp->msg_cap; b++) {
		struct q_msg *m = cp->msg_h[b], *next;
		for (; m; m = next) {
			next = m->hnext;
			if (act_one(cp, m, ac->a, ac->to_domain, &ac->lsn))
				ac->affected++;
		}
	}
	return 0;
}

int
cp_queue_action(struct cplane *cp, enum cp_action a, const uint64_t *ids,
		size_t n, const char *to_domain, size_t *affected,
		size_t *unknown)
{
	struct action_call ac = {.a = a, .ids = ids, .n = n,
				 .to_domain = to_domain};
	int r;

	if (a < CP_HOLD || a > CP_FLUSH)
		return -EINVAL;
	r = cp_call(cp, action_fn, &ac);
	/* durable before the operator is answered (on the caller's thread) */
	if (r == 0 && ac.lsn && cp->log)
		r = dlog_wait(cp->log, ac.lsn);
	if (affected)
		*affected = ac.affected;
	if (unknown)
		*unknown = ac.unknown;
	return r;
}

static uint64_t
dest_attempts(const struct q_dest *d)
{
	uint64_t n = 0;

	for (unsigned i = 0; i <= CTL_LAT_BUCKETS; i++)
		n += d->lat[i];
	return n;
}

static void
route_add(struct cp_route_stats *r, const struct q_dest *d)
{
	for (unsigned x = 0; x <= CTL_LAT_BUCKETS; x++)
		r->lat[x] += d->lat[x];
	r->lat_sum_ns += d->lat_sum_ns;
	r->batches += d->batches;
	r->delivered += d->delivered;
	r->deferred += d->deferred;
	r->bounced += d->bounced;
}

/*
 * The first CP_ROUTES_PUB destinations to have traffic by name, the rest
 * summed as "other". Destinations are routes from the configuration: a
 * handful, so in practice every one has its own series. Each keeps the
 * series it got (q_dest.pub) for the life of the process: with the
 * busiest by name (as before), a route that overtook a named one took its
 * place, and what the two had counted moved between series; "other" and
 * the histogram's buckets went down, which Prometheus reads as a reset.
 */
static void
publish_routes(struct cplane *cp, struct cp_stats *s)
{
	bool other = false;

	_Static_assert(sizeof(s->routes[0].lat) ==
			       (CTL_LAT_BUCKETS + 1) * sizeof(uint64_t),
		       "latency buckets");
	for (size_t b = 0; b < DEST_BUCKETS; b++)
		for (struct q_dest *d = cp->dest_h[b]; d; d = d->hnext) {
			struct cp_route_stats *r;

			if (!d->pub) {
				if (!dest_attempts(d) && !d->delivered &&
				    !d->deferred && !d->bounced)
					continue;
				d->pub = cp->n_pub < CP_ROUTES_PUB
						 ? ++cp->n_pub
						 : CP_ROUTES_PUB + 1;
			}
			r = &s->routes[d->pub - 1];
			if (d->pub > CP_ROUTES_PUB) {
				other = true;
			} else {
				const char *k = d->key;
				size_t kl = strlen(k);

				/* A long key (ca=PATH) is cut, and ends in a
				 * hash of all of it: two keys that differ only
				 * after the cut stay two series, not one name
				 * for both. */
				if (kl < sizeof(r->route))
					memcpy(r->route, k, kl + 1);
				else
					snprintf(r->route, sizeof(r->route),
						 "%.*s~%08" PRIx32,
						 (int)sizeof(r->route) - 10,
						 k, key_hash(k));
			}
			route_add(r, d);
		}
	s->n_routes = cp->n_pub;
	if (other)
		snprintf(s->routes[CP_ROUTES_PUB].route,
			 sizeof(s->routes[CP_ROUTES_PUB].route), "other");
}

/* The delivery log failed: say once, loudly, what it means and what to
 * do (the log's own line has only the errno). */
static void
log_failed_once(struct cplane *cp)
{
	int e = cp->log ? dlog_error(cp->log) : 0;

	if (!e || cp->log_failure_told)
		return;
	cp->log_failure_told = true;
	fd_log(FD_LOG_ERR, "qmgr",
	       "event=delivery_stopped reason=\"delivery log failed: %s\" "
	       "queued=%zu action=\"mail is still accepted and kept in the "
	       "spool; fix the disk under the spool, then restart finaldot\"",
	       strerror(-e), cp->n_msgs);
}

static void
publish_stats(struct cplane *cp)
{
	struct cp_stats s;

	memset(&s, 0, sizeof(s));
	s.messages = cp->n_msgs;
	s.queued_total = cp->st_queued;
	s.delivered_total = cp->st_delivered;
	s.deferred_total = cp->st_deferred;
	s.bounced_total = cp->st_bounced;
	s.expired_total = cp->st_expired;
	s.dsn_sent_total = cp->st_dsn_sent;
	s.dsn_dropped_total = cp->st_dsn_dropped;
	s.damaged_total = cp->st_damaged;
	s.reclaimed_total = cp->st_reclaimed;
	s.moved_total = cp->st_moved;
	s.move_failed_total = cp->st_move_failed;
	s.segments = cp->n_segs;
	s.started_us = cp->started_us;
	s.indoubt_total = cp->st_indoubt;
	s.suppressed_total = cp->st_suppressed;
	s.indoubt_unknown_total = cp->st_indoubt_unknown;
	s.indoubt_entries = cp->n_indoubt;
	s.log_error = cp->log ? (uint64_t)-dlog_error(cp->log) : 0;
	if (cp->log) {
		struct dlog_stats ds;

		dlog_get_stats(cp->log, &ds);
		s.log_no_space = ds.no_space;
	}
	publish_routes(cp, &s);
	s.held = cp->n_class[MC_HELD];
	s.active = cp->n_class[MC_ACTIVE];
	s.deferred = cp->n_class[MC_DEFERRED];
#ifdef FINALDOT_FAULT_INJECTION
	/* Test builds (-Dfault_injection=true, as tools/test and CI build):
	 * the counts kept per change equal a count by walking, or the test
	 * dies here (small queues only: the walk is what the counts replace).
	 * A production build trusts the counts and never aborts for them. */
	if (cp->n_msgs <= 20000) {
		size_t n[3] = {0};
		for (size_t b = 0; b < cp->msg_cap; b++)
			for (struct q_msg *m = cp->msg_h[b]; m; m = m->hnext)
				if (msg_class(m) >= 0)
					n[msg_class(m)]++;
		if (n[MC_HELD] != s.held || n[MC_ACTIVE] != s.active ||
		    n[MC_DEFERRED] != s.deferred) {
			fd_log(FD_LOG_ERR, "qmgr",
			       "event=bug held=%zu/%" PRIu64 " active=%zu/%"
			       PRIu64 " deferred=%zu/%" PRIu64,
			       n[MC_HELD], s.held, n[MC_ACTIVE], s.active,
			       n[MC_DEFERRED], s.deferred);
			abort();
		}
	}
#endif
	pthread_mutex_lock(&cp->mu);
	cp->pub = s;
	pthread_mutex_unlock(&cp->mu);
}

void
cp_get_stats(struct cplane *cp, struct cp_stats *st)
{
	pthread_mutex_lock(&cp->mu);
	*st = cp->pub;
	pthread_mutex_unlock(&cp->mu);
}

/* CLOCK_REALTIME ms from now, for pthread_cond_timedwait(). */
static void
deadline_after_ms(struct timespec *ts, uint64_t ms)
{
	clock_gettime(CLOCK_REALTIME, ts);
	ts->tv_sec += (time_t)(ms / 1000);
	ts->tv_nsec += (long)((ms % 1000) * 1000000);
	if (ts->tv_nsec >= 1000000000) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000;
	}
}

static void *
qmgr_main(void *arg)
{
	struct cplane *cp = arg;
	uint64_t idle_ms = 1, last_stats = fd_now_monotonic_us();
	uint64_t last_pub = 0;

	while (!atomic_load(&cp->stop)) {
		bool busy = false;
		struct timespec ts;

		uint64_t walk_us = UINT64_MAX, now_us;

		busy |= run_calls(cp);
		busy |= drain_ports(cp);
		now_us = fd_now_monotonic_us();
		for (unsigned w = 0; w < cp->nworkers; w++)
			busy |= tail_tick(cp->tails[w], now_us, &walk_us);
		busy |= apply_results(cp);
		if (cp->cfg.delivery) {
			busy |= schedule_due(cp);
			move_pinned(cp);
			dispatch(cp);
			coalesce_stale(cp, now_us);
		}
		release_finished(cp);
		send_reclaims(cp);
		/* A full pass over the queue: at most 4 times a second. */
		if (fd_now_monotonic_us() - last_pub > 250000) {
			last_pub = fd_now_monotonic_us();
			publish_stats(cp);
			log_failed_once(cp);
			if (cp->heap_lost)
				heap_recover(cp);
		}
		if (cp->log && fd_now_monotonic_us() >= cp->ckpt_not_before &&
		    dlog_want_checkpoint(cp->log)) {
			int r = dlog_checkpoint(cp->log, snapshot, cp);
			fd_log(r ? FD_LOG_ERR : FD_LOG_INFO, "qmgr",
			       "event=dlog_checkpoint messages=%zu err=%d%s",
			       cp->n_msgs, -r,
			       r ? " retry_s=60" : "");
			/* A failed one (a full disk: its new file found no
			 * room) is not retried at once: each try writes the
			 * whole queue's state. The log goes on meanwhile. */
			cp->ckpt_not_before =
				r ? fd_now_monotonic_us() + 60000000ull : 0;
		}
		if (fd_now_monotonic_us() - last_stats > 60000000ull) {
			last_stats = fd_now_monotonic_us();
			fd_log(FD_LOG_INFO, "qmgr",
			       "event=queue_stats messages=%zu queued=%" PRIu64
			       " delivered=%" PRIu64 " deferred=%" PRIu64
			       " bounced=%" PRIu64 " expired=%" PRIu64
			       " reclaimed=%" PRIu64,
			       cp->n_msgs, cp->st_queued, cp->st_delivered,
			       cp->st_deferred, cp->st_bounced, cp->st_expired,
			       cp->st_reclaimed);
		}
		idle_ms = busy ? 1 : (idle_ms < 8 ? idle_ms * 2 : 10);
		/* A tailer's waiting DURABLE point is walked on time. */
		if (walk_us != UINT64_MAX && walk_us / 1000 + 1 < idle_ms)
			idle_ms = walk_us / 1000 + 1;
		deadline_after_ms(&ts, idle_ms);
		pthread_mutex_lock(&cp->mu);
		if (!cp->res_head && !cp->calls_head && !atomic_load(&cp->stop))
			pthread_cond_timedwait(&cp->res_cv, &cp->mu, &ts);
		pthread_mutex_unlock(&cp->mu);
	}
	run_calls(cp); /* callers waiting now get their answer */
	atomic_store(&cp->stopped, true);
	return NULL;
}

/* ---- delivery threads' side of the hand-off ----------------------------- */

/* Unlink *pp (pointing into the hand-out list) whose predecessor is prev. */
static struct q_job *
jobs_unlink(struct cplane *cp, struct q_job **pp, struct q_job *prev)
{
	struct q_job *j = *pp;

	*pp = j->next;
	if (cp->jobs_tail == j)
		cp->jobs_tail = prev;
	j->next = NULL;
	j->dest->listed_jobs--;
	return j;
}

/* A batch's results back to the queue manager, with the thread's slot in
 * its next hop's window. Under cp->mu. */
static void
jobs_done_locked(struct cplane *cp, struct q_job **jobs, unsigned n)
{
	bool first = !cp->res_head;

	for (unsigned i = 0; i < n; i++) {
		struct q_job *j = jobs[i];
		j->next = NULL;
		if (cp->res_tail)
			cp->res_tail->next = j;
		else
			cp->res_head = j;
		cp->res_tail = j;
	}
	if (jobs[0]->dest->conns)
		jobs[0]->dest->conns--;
	/* The queue manager takes every result at once: wake it for the
	 * first one only. */
	if (first)
		pthread_cond_signal(&cp->res_cv);
}

unsigned
cp_job_take(struct cplane *cp, struct q_job **done, unsigned n_done,
	    const char *prefer, uint64_t wait_ms, struct q_job **out,
	    unsigned max)
{
	struct q_job **pp, *prev = NULL, *j;
	struct q_dest *d = NULL, *dd = NULL;
	struct timespec ts;
	struct job_waiter w;
	uint64_t now;
	unsigned n = 0, want;
	int rc;

	deadline_after_ms(&ts, wait_ms);
	pthread_cond_init(&w.cv, NULL);
	pthread_mutex_lock(&cp->mu);
	/* The slot of the batch handed back is this thread's to use again
	 * before any other thread can see it free: a thread that just
	 * finished a batch and holds the connection goes on with the next
	 * one, rather than a thread without one opening a new connection
	 * while the cached one idles. Had another thread been waiting for
	 * the slot, the scan below finds the same jobs for this one. */
	if (n_done) {
		dd = done[0]->dest;
		jobs_done_locked(cp, done, n_done);
	}
	for (bool timed_out = false;;) {
		/* A job for a next hop no thread works for comes first:
		 * without it a thread done with a batch went back to the
		 * next hop it holds a connection to, and two slow next hops
		 * whose windows together exceed the threads kept every
		 * thread (measured: a Maildir message waited 35 s behind two
		 * next hops answering in 1 s). Then one for the next hop
		 * this thread holds a connection to (connection reuse), else
		 * the oldest whose next hop is under its window (a fast
		 * one's: job_takeable). Scanned again after every wait, the
		 * timed-out one too: pp and prev point into a list that
		 * other threads change while this one waits (a job taken
		 * and freed, one appended for a next hop at its window). */
		for (pp = &cp->jobs_head, prev = NULL; *pp;
		     prev = *pp, pp = &(*pp)->next)
			if ((*pp)->dest->conns == 0 && dest_open((*pp)->dest))
				break;
		if (prefer && !*pp)
			for (pp = &cp->jobs_head, prev = NULL; *pp;
			     prev = *pp, pp = &(*pp)->next)
				if (strcmp((*pp)->dest->key, prefer) == 0 &&
				    dest_open((*pp)->dest))
					break;
		if (!*pp)
			for (pp = &cp->jobs_head, prev = NULL,
			    now = fd_now_monotonic_us();
			     *pp && !job_takeable(*pp, now);
			     prev = *pp, pp = &(*pp)->next)
				;
		if (*pp || cp->quit || timed_out)
			break;
		/* Nothing open: nor is there for another thread. */
		dd = NULL;
		w.prefer = prefer;
		w.woken = false;
		w.next = cp->idle;
		w.pprev = &cp->idle;
		if (cp->idle)
			cp->idle->pprev = &w.next;
		cp->idle = &w;
		rc = pthread_cond_timedwait(&w.cv, &cp->mu, &ts);
		if (!w.woken) /* timed out, or woken by no one */
			waiter_unlink(&w);
		if (rc != 0 && !w.woken)
			timed_out = true;
	}
	if (*pp) {
		unsigned free_slots;
		d = (*pp)->dest;
		free_slots = d->conn_cap - d->conns; /* > 0: dest_open() */
		/* A slow next hop's jobs shared out: at most an even share
		 * of what waits for it per connection its window still
		 * allows. A fast one's in whole batches. */
		want = (d->listed_jobs + free_slots - 1) / free_slots;
		if (want > QJ_BATCH)
			want = QJ_BATCH;
		if (d->coalesce) /* dest_wants_thread() */
			want = d->listed_jobs;
		if (want > max)
			want = max;
		if (want == 0)
			want = 1;
		/* Bounces and Maildir jobs go one at a time. */
		if ((*pp)->kind != QJ_DELIVER || d->kind == ROUTE_MAILDIR)
			want = 1;
		while (*pp && n < want) {
			if ((*pp)->dest == d &&
			    (n == 0 || (*pp)->kind == QJ_DELIVER)) {
				j = jobs_unlink(cp, pp, prev);
				j->taken_us = fd_now_monotonic_us();
				j->batch_first = n == 0;
				out[n++] = j;
				continue;
			}
			prev = *pp;
			pp = &(*pp)->next;
		}
		d->conns++;
	}
	/* Work left that another thread may take: a slot freed above and
	 * not used by this one, or the rest of an even share. */
	if (dd && dest_wants_thread(dd))
		wake_one(cp, dd);
	else if (d && dest_wants_thread(d))
		wake_one(cp, d);
	pthread_mutex_unlock(&cp->mu);
	pthread_cond_destroy(&w.cv);
	return n;
}

bool
cp_quitting(struct cplane *cp)
{
	bool q;

	pthread_mutex_lock(&cp->mu);
	q = cp->quit && !cp->jobs_head;
	pthread_mutex_unlock(&cp->mu);
	return q;
}

/* ---- life cycle -------------------------------------------------------- */


/*
 * The first-run default route's Maildir root is made at start (mkdir -p,
 * 0700): a first run must work; the mailboxes below it are made on first
 * delivery. Each directory made here is made durable in its parent:
 * maildir_deliver() fsyncs only what it creates below the root, and
 * without this a power cut took the whole root back, with every message
 * delivered into it, while the delivery log kept them as delivered
 * (found by tests/crash/test_powercut_delivery.py).
 *
 * A root the operator configured is never made (maildir.h: a root that is
 * missing is most likely a filesystem not mounted, and mail written under
 * the mount point is reported delivered and then hidden by the mount);
 * one missing at start is logged, and its deliveries are deferred until
 * it exists. Until 2026-12-05 every root was made.
 */
static void
maildir_root(const struct route_target *t, bool make, bool dflt)
{
	char buf[512];
	size_t n;
	int r;

	if (!make || t->kind != ROUTE_MAILDIR)
		return;
	n = strlen(t->path);
	if (n == 0 || n >= sizeof(buf))
		return;
	memcpy(buf, t->path, n + 1);
	for (size_t i = 1; i <= n; i++) {
		if (buf[i] != '/' && buf[i] != '\0')
			continue;
		char ch = buf[i];
		struct stat st;
		buf[i] = '\0';
		if (!dflt && (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode))) {
			fd_log(FD_LOG_ERR, "qmgr",
			       "event=maildir_root_missing path=%s "
			       "note=\"not created (an unmounted filesystem?): "
			       "deliveries there are deferred until it "
			       "exists\"",
			       t->path);
			return;
		}
		/* Made now, or found: either way synced in its parent
		 * (one found may have been made by a start that died before
		 * syncing it, or by an operator who did not sync it). */
		if (!dflt || mkdir(buf, 0700) == 0 || errno == EEXIST)
			r = fd_fsync_parent(buf);
		else
			r = -errno;
		if (r)
			fd_log(FD_LOG_WARN, "qmgr",
			       "event=maildir_root_failed path=%s error=\"%s\"",
			       buf, strerror(-r));
		buf[i] = ch;
	}
}

/* The routing of configuration c, or NULL with why (make: create the
 * Maildir roots). */
static struct cp_routing *
parse_routes(const struct cp_config *c, char *why, size_t why_len, bool make)
{
	struct cp_routing *rg = calloc(1, sizeof(*rg));

	if (!rg || !(rg->rt = route_table_new())) {
		free(rg);
		snprintf(why, why_len, "out of memory");
		return NULL;
	}
	rg->def_tls = c->smtp_tls && *c->smtp_tls
			      ? route_tls_parse(c->smtp_tls, strlen(c->smtp_tls))
			      : ROUTE_TLS_MAY;
	if (rg->def_tls < 0)
		rg->def_tls = ROUTE_TLS_MAY;
	snprintf(rg->tls_ca, sizeof(rg->tls_ca), "%s",
		 c->smtp_tls_ca ? c->smtp_tls_ca : "");
	for (unsigned i = 0; i < c->n_routes; i++) {
		char dom[256];
		struct route_target t;
		if (route_parse_rule(c->routes[i], dom, sizeof(dom), &t, why,
				     why_len) != 0)
			goto fail;
		if (route_table_add(rg->rt, dom, &t) != 0) {
			snprintf(why, why_len, "route: duplicate domain %s",
				 dom);
			goto fail;
		}
		maildir_root(&t, make, false);
	}
	if (c->n_domains && c->domains)
		snprintf(rg->pm_domain, sizeof(rg->pm_domain), "%s",
			 c->domains[0]);
	if (c->relay && *c->relay) {
		if (route_parse_target(c->relay, &rg->def, why, why_len) != 0)
			goto fail;
		rg->have_def = true;
		maildir_root(&rg->def, make, false);
	} else {
		/* The first-run default is for a configuration without
		 * routes: with some, an accepted domain left without one
		 * would silently go to ./var/maildir (relative to wherever
		 * the daemon was started). */
		for (unsigned i = 0; c->n_routes && i < c->n_domains; i++) {
			if (route_lookup(rg->rt, c->domains[i]))
				continue;
			snprintf(why, why_len,
				 "accepted domain %s has no --route and there "
				 "is no --relay (the default %s is used only "
				 "when no route is given)",
				 c->domains[i], c->default_route);
			goto fail;
		}
		if (route_parse_target(c->default_route, &rg->def, why,
				       why_len) != 0)
			goto fail;
		rg->have_def = c->n_routes == 0;
		maildir_root(&rg->def, make, true);
	}
	if (c->bounce_relay && *c->bounce_relay) {
		if (route_parse_target(c->bounce_relay, &rg->bounce, why,
				       why_len) != 0)
			goto fail;
		rg->have_bounce = true;
		maildir_root(&rg->bounce, make, false);
	}
	return rg;
fail:
	routing_free(rg);
	return NULL;
}

static inline struct cp_routing *
routing_of(const struct cplane *cp)
{
	return atomic_load_explicit(&((struct cplane *)cp)->routing,
				    memory_order_acquire);
}

int
cp_check_config(const struct cp_config *c, char *why, size_t why_len)
{
	struct cp_routing *rg;
	int r = 0;

	if (c->smtp_tls && *c->smtp_tls &&
	    route_tls_parse(c->smtp_tls, strlen(c->smtp_tls)) < 0) {
		snprintf(why, why_len,
			 "smtp_tls must be none, may, encrypt or verify");
		return -EINVAL;
	}
	rg = parse_routes(c, why, why_len, false);
	if (!rg)
		return -EINVAL;
	routing_free(rg);
	if (c->recipients && *c->recipients) {
		struct rcptdb *db = rcptdb_load(c->recipients, why, why_len);
		if (!db)
			return -EINVAL;
		rcptdb_free(db);
	}
	return r;
}

/* Import one committed message of the recovery scan. */
static int
import_msg(struct cplane *cp, const struct ctl_spool_scan *scan,
	   const struct ctl_spool_msg *sm, struct q_piece **buf, size_t *cap)
{
	const struct ctl_spool_seg *es, *ns;
	struct q_seg *env_seg, *end_seg;

	if (sm->n_pieces > *cap) {
		struct q_piece *n = realloc(*buf, sm->n_pieces * sizeof(*n));
		if (!n)
			return -ENOMEM;
		*buf = n;
		*cap = sm->n_pieces;
	}
	for (size_t i = 0; i < sm->n_pieces; i++) {
		const struct ctl_spool_piece *p = &sm->pieces[i];
		const struct ctl_spool_seg *g =
			ctl_spool_scan_segment(scan, p->seg);
		(*buf)[i] = (struct q_piece){
			.seg = qm_seg_get(cp, g->worker, g->file_no,
					  g->use_seq),
			.file_off = p->file_off,
			.len = p->len,
		};
		if (!(*buf)[i].seg)
			return -ENOMEM;
	}
	es = ctl_spool_scan_segment(scan, sm->env_seg);
	ns = ctl_spool_scan_segment(scan, sm->end_seg);
	env_seg = qm_seg_get(cp, es->worker, es->file_no, es->use_seq);
	end_seg = qm_seg_get(cp, ns->worker, ns->file_no, ns->use_seq);
	if (!env_seg || !end_seg)
		return -ENOMEM;
	return qm_msg_add(cp, sm->worker, sm->id, &sm->env, sm->body_len,
			  sm->body_crc, *buf, sm->n_pieces, env_seg, end_seg);
}

/* verify_open_fn: the route of addr, as the delivery would take it. */
static struct smtpc *
verify_open(void *ctx, const char *addr, bool connect, char *key,
	    size_t key_len, bool *local, struct smtpc_reply *why)
{
	struct cplane *cp = ctx;
	/* A worker or probe thread: the routing may be swapped meanwhile;
	 * the one loaded here stays valid (retired, not freed, until the
	 * next reload). */
	const struct cp_routing *rg = routing_of(cp);
	const struct route_target *t =
		route_lookup(rg->rt, route_addr_domain(addr));
	int tls;

	if (!t)
		t = &rg->def;
	*local = t->kind == ROUTE_MAILDIR;
	snprintf(key, key_len, "%s", t->text);
	if (*local || !connect)
		return NULL;
	tls = t->tls ? (int)t->tls : rg->def_tls;
	/* A probe waits on its next hop for --verify-timeout at most: a hung
	 * one held a probe thread for --smtp-timeout (300 s). */
	uint64_t cap = cp->cfg.verify_timeout_ms ? cp->cfg.verify_timeout_ms
						 : VERIFY_TIMEOUT_MS;

	return deliver_connect(cp, (int)t->kind, t->host, t->port, t->path,
			       tls, t->tls_ca[0] ? t->tls_ca : rg->tls_ca, cap,
			       why);
}

void
cp_raise_msgid_seeds(const struct cplane *cp, uint64_t *seeds, unsigned n)
{
	for (unsigned w = 0; w < n && w < 256; w++)
		if (cp->replay_max_id[w] > seeds[w]) {
			fd_log(FD_LOG_INFO, "qmgr",
			       "event=msgid_seed_raised worker=%u scan=%016" PRIx64
			       " dlog=%016" PRIx64,
			       w, seeds[w], cp->replay_max_id[w]);
			seeds[w] = cp->replay_max_id[w];
		}
}

struct cplane *
cp_create(const struct cp_config *c, const struct ctl_spool_scan *scan,
	  int *err)
{
	struct cplane *cp = calloc(1, sizeof(*cp));
	char why[512], dir[4200];
	struct dlog_params lp;
	struct dlog_open_stats ost;
	struct q_piece *pbuf = NULL;
	size_t pcap = 0, in_flight = 0, finished = 0;
	int r;

	if (!cp) {
		*err = -ENOMEM;
		return NULL;
	}
	cp->cfg = *c;
	snprintf(cp->spool_dir, sizeof(cp->spool_dir), "%s", c->spool_dir);
	snprintf(cp->hostname, sizeof(cp->hostname), "%s", c->hostname);
	cp->cfg.spool_dir = cp->spool_dir;
	cp->cfg.hostname = cp->hostname;
	if (cp->cfg.dest_concurrency == 0)
		cp->cfg.dest_concurrency = 1;
	cp->rng = fd_now_realtime_us() | 1;
	pthread_mutex_init(&cp->mu, NULL);
	pthread_cond_init(&cp->res_cv, NULL);
	pthread_cond_init(&cp->call_cv, NULL);
	cp->started_us = fd_now_realtime_us();
	cp->routing = parse_routes(c, why, sizeof(why), true);
	if (!cp->routing) {
		fd_log(FD_LOG_ERR, "qmgr", "event=config_error reason=\"%s\"",
		       why);
		r = -EINVAL;
		goto out_free;
	}
	if (c->recipients && *c->recipients) {
		cp->rcpts = rcptdb_load(c->recipients, why, sizeof(why));
		if (!cp->rcpts) {
			fd_log(FD_LOG_ERR, "qmgr",
			       "event=recipients_failed reason=\"%s\"", why);
			r = -EINVAL;
			goto out_free;
		}
		fd_log(FD_LOG_INFO, "qmgr",
		       "event=recipients_loaded file=%s entries=%zu",
		       c->recipients, rcptdb_count(cp->rcpts));
	}
	if (c->verify_recipients && !cp->rcpts) {
		struct verify_opts vo;
		verify_opts_defaults(&vo);
		if (c->verify_positive_ttl_ms)
			vo.positive_ttl_ms = c->verify_positive_ttl_ms;
		if (c->verify_negative_ttl_ms)
			vo.negative_ttl_ms = c->verify_negative_ttl_ms;
		cp->verify = verify_new(&vo, verify_open, cp);
		if (!cp->verify) {
			fd_log(FD_LOG_ERR, "qmgr",
			       "event=verify_failed error=\"%s\"",
			       strerror(errno));
			r = -ENOMEM;
			goto out_free;
		}
		fd_log(FD_LOG_INFO, "qmgr",
		       "event=verify_started threads=%u positive_ttl_s=%" PRIu64
		       " negative_ttl_s=%" PRIu64,
		       vo.threads, vo.positive_ttl_ms / 1000,
		       vo.negative_ttl_ms / 1000);
	}
	/* The moves' pseudo next hop: local disk (no feedback), two at a
	 * time (they read and write whole messages). */
	cp->mover = calloc(1, sizeof(*cp->mover));
	if (cp->mover) {
		snprintf(cp->mover->key, sizeof(cp->mover->key), "spool:move");
		cp->mover->kind = ROUTE_MAILDIR;
		cp->mover->limit = 2;
	}
	cp->msg_cap = 1024;
	cp->msg_h = calloc(cp->msg_cap, sizeof(*cp->msg_h));
	if (c->dedup_window_ms) {
		/* Its pages made now: the table is written at random (one
		 * slot per message freed), so left to fault in on use it
		 * took ~3,600 page faults, one every few messages, over a
		 * fresh daemon's first tens of thousands of deliveries. */
		void *t = mmap(NULL, RECENT_BYTES, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1,
			       0);
		cp->recent = t == MAP_FAILED ? NULL : t;
		cp->ekey_h = calloc(EKEY_BUCKETS, sizeof(*cp->ekey_h));
	}
	if (!cp->msg_h ||
	    (c->dedup_window_ms && (!cp->recent || !cp->ekey_h))) {
		r = -ENOMEM;
		goto out_free;
	}
	/* The scan's committed messages, then every segment holding valid
	 * records (sealed: the run that wrote them is over). */
	for (size_t i = 0; scan && i < ctl_spool_scan_count(scan); i++)
		if ((r = import_msg(cp, scan, ctl_spool_scan_msg(scan, i),
				    &pbuf, &pcap)) != 0)
			goto out_free;
	free(pbuf);
	pbuf = NULL;
	for (size_t i = 0; scan && i < ctl_spool_scan_nsegs(scan); i++) {
		const struct ctl_spool_seg *g = ctl_spool_scan_segment(scan, i);
		struct q_seg *s;
		if (!g->header_ok || g->records_ok == 0 || !g->path)
			continue; /* the writer's (spares), or unreadable */
		if (!(s = qm_seg_get(cp, g->worker, g->file_no, g->use_seq))) {
			r = -ENOMEM;
			goto out_free;
		}
		/* A segment the scan could not read to its end may hold
		 * messages nobody queued, and one holding part of a message
		 * whose rest may be in such a segment is needed when it
		 * reads again: unsealed, neither is reclaimed (the next
		 * start scans them again). */
		if (!g->read_error && !g->kept_incomplete)
			qm_seg_seal(cp, s);
	}
	/* Then the messages moved out of their segments. */
	if ((r = moved_recover(cp)) != 0)
		goto out_free;
	/* Then what the delivery log says happened to them. */
	snprintf(dir, sizeof(dir), "%s/dlog", cp->spool_dir);
	dlog_params_defaults(&lp);
	lp.nice = c->delivery_nice;
	if (c->dlog_rotate_bytes)
		lp.rotate_bytes = c->dlog_rotate_bytes;
	memset(&ost, 0, sizeof(ost));
	cp->log = dlog_open(dir, &lp, replay_rec, cp, &ost, &r);
	if (!cp->log) {
		fd_log(FD_LOG_ERR, "qmgr",
		       "event=dlog_open_failed dir=%s error=\"%s\"", dir,
		       strerror(-r));
		goto out_free;
	}
	/* Every imported message: an attempt the log saw start but not end
	 * may have reached its next hop (a possible duplicate, said once);
	 * then it is finished, or due at its own time. */
	for (size_t b = 0; b < cp->msg_cap; b++) {
		struct q_msg *m = cp->msg_h[b], *next;
		for (; m; m = next) {
			bool open = false;
			next = m->hnext;
			for (unsigned i = 0; i < m->n_rcpts; i++) {
				open |= m->rcpts[i].attempt_open;
				m->rcpts[i].attempt_open = false;
			}
			if (open) {
				in_flight++;
				log_rec(cp, DLOG_NOTE, m, DLOG_ALL, 0, 0, 0,
					"attempt in flight at a crash: "
					"possible duplicate");
			}
			heap_remove(cp, m);
			msg_update(cp, m, 0);
			finished += m->finished;
		}
	}
	if (ost.files == 0 && cp->n_msgs) {
		/* The log is made at the first start, before any mail: gone
		 * with mail in the spool means it was deleted or lost. */
		fd_log(FD_LOG_ERR, "qmgr",
		       "event=damage what=delivery_log_missing dir=%s "
		       "messages=%zu action=\"every message in the spool is "
		       "taken as undelivered: those delivered before are "
		       "delivered again, and held or deleted ones come back\"",
		       dir, cp->n_msgs);
	}
	fd_log(FD_LOG_INFO, "qmgr",
	       "event=queue_rebuilt messages=%zu finished=%zu"
	       " segments=%zu dlog_records=%" PRIu64
	       " dlog_records_bad=%" PRIu64 " possible_duplicates=%zu",
	       cp->n_msgs, finished, cp->n_segs, ost.records,
	       ost.records_bad, in_flight);
	/* The counts `finaldotctl status` shows, before the control socket
	 * can ask: until the queue manager's first pass they were zeros, and
	 * a restarted daemon with a full queue said it was empty (a
	 * power-cut test's drain wait took that for "drained"). */
	publish_stats(cp);
	cp->dctx.cp = cp;
	return cp;

out_free:
	free(pbuf);
	*err = r ? r : -EINVAL;
	cp_free(cp);
	return NULL;
}

int
cp_attach(struct cplane *cp, unsigned workers)
{
	if (cp->ports || workers == 0 || workers > 256)
		return -EINVAL;
	cp->ports = aligned_alloc(64, workers * sizeof(*cp->ports));
	cp->tails = calloc(workers, sizeof(*cp->tails));
	if (!cp->ports || !cp->tails)
		return -ENOMEM;
	for (unsigned w = 0; w < workers; w++) {
		int r = fd_ctl_port_init(&cp->ports[w], w);
		if (r)
			return r;
		cp->nworkers = w + 1;
		/* Direct reads when no delivery thread reads the bodies
		 * after the tailer (tail_new()). */
		cp->tails[w] = tail_new(cp, cp->spool_dir, w,
					!cp->cfg.delivery);
		if (!cp->tails[w])
			return -ENOMEM;
	}
	return 0;
}

struct fd_ctl_port *
cp_port(struct cplane *cp, unsigned worker)
{
	return worker < cp->nworkers ? &cp->ports[worker] : NULL;
}

/* The table answers when there is one (it is the operator's word);
 * else the probe (verify.h). */
static int
rcpt_check(void *ctx, const char *addr)
{
	struct cplane *cp = ctx;

	struct rcptdb *db =
		atomic_load_explicit(&cp->rcpts, memory_order_acquire);

	if (db)
		return rcptdb_check(db, addr);
	return verify_check(cp->verify, addr);
}

struct reload_arg {
	struct cp_routing *rg;
	const struct cp_config *nc;
};

/*
 * A reload frees the object the one before it retired: a worker or probe
 * thread that loaded that pointer just before the earlier swap (and was
 * descheduled) must be done with it by then. Reloads are an operator's,
 * but configuration management often sends two in a row: each waits until
 * the previous swap is RETIRE_GRACE_US old, on the reloading thread (never
 * a worker or the queue manager).
 */
#define RETIRE_GRACE_US 1000000u

static void
retire_grace(uint64_t *swapped_us)
{
	uint64_t now = fd_now_monotonic_us();

	if (*swapped_us && now - *swapped_us < RETIRE_GRACE_US)
		usleep((useconds_t)(RETIRE_GRACE_US - (now - *swapped_us)));
	*swapped_us = fd_now_monotonic_us();
}

/* On the queue manager's thread (cp_call): nothing else changes the queue
 * or reads cp->cfg's scalars meanwhile. */
static int
reload_apply(struct cplane *cp, void *arg)
{
	struct reload_arg *a = arg;
	const struct cp_config *nc = a->nc;
	struct cp_routing *old =
		atomic_exchange_explicit(&cp->routing, a->rg,
					 memory_order_acq_rel);

	routing_free(cp->routing_retired);
	cp->routing_retired = old;
	cp->route_gen++;
	if (nc->retry_min_ms)
		cp->cfg.retry_min_ms = nc->retry_min_ms;
	if (nc->retry_max_ms)
		cp->cfg.retry_max_ms = nc->retry_max_ms;
	if (nc->queue_lifetime_ms)
		cp->cfg.queue_lifetime_ms = nc->queue_lifetime_ms;
	if (nc->dest_concurrency)
		cp->cfg.dest_concurrency = nc->dest_concurrency;
	if (nc->n_domains && nc->domains) {
		size_t total = 0;
		char *store, *w;
		const char **ptrs;
		for (unsigned i = 0; i < nc->n_domains; i++)
			total += strlen(nc->domains[i]) + 1;
		store = malloc(total);
		ptrs = calloc(nc->n_domains, sizeof(*ptrs));
		if (store && ptrs) {
			w = store;
			for (unsigned i = 0; i < nc->n_domains; i++) {
				size_t l = strlen(nc->domains[i]) + 1;
				memcpy(w, nc->domains[i], l);
				ptrs[i] = w;
				w += l;
			}
			free(cp->dom_store);
			free((void *)cp->dom_ptrs);
			cp->dom_store = store;
			cp->dom_ptrs = ptrs;
			cp->cfg.domains = ptrs;
			cp->cfg.n_domains = nc->n_domains;
		} else {
			free(store);
			free((void *)ptrs);
		}
	}
	/* Next hops already known: their TLS policy as now configured (a
	 * route's own tls= is in its key; the default may have changed). */
	/* Delivery threads read them under mu (cp_dest_tls). */
	pthread_mutex_lock(&cp->mu);
	for (size_t b = 0; b < DEST_BUCKETS; b++)
		for (struct q_dest *d = cp->dest_h[b]; d; d = d->hnext) {
			struct route_target t;
			if (route_parse_target(d->key, &t, NULL, 0) == 0)
				dest_policy(cp, d, &t);
		}
	pthread_mutex_unlock(&cp->mu);
	/* Every message re-resolves its next hops when it is next due;
	 * the deferred ones are not made due early. */
	fd_log(FD_LOG_INFO, "qmgr",
	       "event=reloaded route_gen=%u routes=%u default_route=%s "
	       "retry_min_s=%" PRIu64 " retry_max_s=%" PRIu64
	       " queue_lifetime_s=%" PRIu64 " dest_concurrency=%u",
	       cp->route_gen, nc->n_routes,
	       a->rg->have_def ? a->rg->def.text : "none",
	       cp->cfg.retry_min_ms / 1000, cp->cfg.retry_max_ms / 1000,
	       cp->cfg.queue_lifetime_ms / 1000, cp->cfg.dest_concurrency);
	return 0;
}

int
cp_reload(struct cplane *cp, const struct cp_config *nc, char *why,
	  size_t why_len)
{
	struct reload_arg a = {.nc = nc};
	int r;

	if (nc->smtp_tls && *nc->smtp_tls &&
	    route_tls_parse(nc->smtp_tls, strlen(nc->smtp_tls)) < 0) {
		snprintf(why, why_len,
			 "smtp_tls must be none, may, encrypt or verify");
		return -EINVAL;
	}
	/* The RCPT check is chosen at start (cp_rcpt_check_fn): a table or
	 * a probe added or removed by a reload would be silently ignored. */
	if ((cp->rcpts != NULL) != (nc->recipients && *nc->recipients) ||
	    (!cp->rcpts && !cp->verify != !nc->verify_recipients)) {
		snprintf(why, why_len,
			 "recipients or verify_recipients added or removed: "
			 "that needs a restart");
		return -EINVAL;
	}
	a.rg = parse_routes(nc, why, why_len, true);
	if (!a.rg)
		return -EINVAL;
	retire_grace(&cp->routing_swapped_us);
	r = cp_call(cp, reload_apply, &a);
	if (r != 0) {
		routing_free(a.rg);
		snprintf(why, why_len, "the queue manager is stopping");
	} else if (cp->rcpts) {
		/* cp_reload_recipients(), next on this thread, reads it */
		snprintf(cp->rcpts_path, sizeof(cp->rcpts_path), "%s",
			 nc->recipients);
		cp->cfg.recipients = cp->rcpts_path;
	}
	return r;
}

struct history_ctx {
	uint64_t id;
	cp_history_fn fn;
	void *ctx;
	int stop;
};

static int
history_rec(void *ctx, const struct dlog_rec *r)
{
	struct history_ctx *h = ctx;

	if (r->msgid != h->id || h->stop)
		return 0;
	h->stop = h->fn(h->ctx, r);
	return 0;
}

static int
name_cmp(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

int
cp_history(struct cplane *cp, uint64_t id, cp_history_fn fn, void *ctx)
{
	struct history_ctx h = {.id = id, .fn = fn, .ctx = ctx};
	char dir[4200], path[4300];
	char *names[64];
	unsigned n = 0;
	struct dirent *e;
	DIR *d;

	snprintf(dir, sizeof(dir), "%s/dlog", cp->spool_dir);
	if (!(d = opendir(dir)))
		return -errno;
	while ((e = readdir(d)) && n < FD_ARRAY_SIZE(names)) {
		size_t l = strlen(e->d_name);
		if (l > 4 && strcmp(e->d_name + l - 4, ".log") == 0)
			names[n++] = strdup(e->d_name);
	}
	closedir(d);
	/* Generations are fixed-width hex: name order is log order. */
	qsort(names, n, sizeof(names[0]), name_cmp);
	for (unsigned i = 0; i < n; i++) {
		struct dlog_scan_result res;
		struct stat st;
		void *p;
		int fd;
		if (!names[i])
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
		free(names[i]);
		fd = fd_open_noatime(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || fstat(fd, &st) != 0 || st.st_size == 0) {
			if (fd >= 0)
				close(fd);
			continue; /* compacted away meanwhile: fine */
		}
		p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
		close(fd);
		if (p == MAP_FAILED)
			continue;
		if (!h.stop)
			dlog_scan_mem(p, (size_t)st.st_size, history_rec, &h,
				      &res);
		munmap(p, (size_t)st.st_size);
	}
	return 0;
}

int
cp_reload_recipients(struct cplane *cp, char *why, size_t why_len)
{
	struct rcptdb *db, *old;

	if (!cp->rcpts || !cp->cfg.recipients || !*cp->cfg.recipients)
		return 0; /* no table at start: nothing to reload */
	db = rcptdb_load(cp->cfg.recipients, why, why_len);
	if (!db)
		return -EINVAL;
	retire_grace(&cp->rcpts_swapped_us);
	old = atomic_exchange_explicit(&cp->rcpts, db, memory_order_acq_rel);
	if (cp->rcpts_retired)
		rcptdb_free(cp->rcpts_retired);
	cp->rcpts_retired = old;
	fd_log(FD_LOG_INFO, "qmgr",
	       "event=recipients_reloaded file=%s entries=%zu",
	       cp->cfg.recipients, rcptdb_count(db));
	return 0;
}

int (*cp_rcpt_check_fn(const struct cplane *cp))(void *, const char *)
{
	return cp->rcpts || cp->verify ? rcpt_check : NULL;
}

void *
cp_rcpt_ctx(const struct cplane *cp)
{
	return (void *)cp;
}


int
cp_start(struct cplane *cp, const cpu_set_t *cpus)
{
	pthread_attr_t attr;
	int r;

	if (!cp->ports)
		return -EINVAL;
	/* The delivery log's writer predates cpus (cp_open()); a failure to
	 * move it costs CPU on a polled core, not correctness. */
	if (cpus && cp->log && dlog_set_affinity(cp->log, cpus) != 0)
		fd_log(FD_LOG_WARN, "qmgr", "event=dlog_affinity_failed");
	pthread_attr_init(&attr);
	if (cpus)
		pthread_attr_setaffinity_np(&attr, sizeof(*cpus), cpus);
	r = pthread_create(&cp->thr, &attr, qmgr_main, cp);
	if (r) {
		pthread_attr_destroy(&attr);
		return -r;
	}
	cp->thr_started = true;
	pthread_setname_np(cp->thr, "fd-qmgr");
	if (cp->cfg.delivery && cp->cfg.delivery_threads) {
		cp->dthr = calloc(cp->cfg.delivery_threads, sizeof(*cp->dthr));
		for (unsigned i = 0; cp->dthr && i < cp->cfg.delivery_threads;
		     i++) {
			if (pthread_create(&cp->dthr[i], &attr, deliver_main,
					   &cp->dctx) != 0)
				break;
			pthread_setname_np(cp->dthr[i], "fd-deliver");
			cp->n_dthr++;
		}
	}
	pthread_attr_destroy(&attr);
	fd_log(FD_LOG_INFO, "qmgr",
	       "event=started delivery=%s threads=%u default_route=%s",
	       cp->cfg.delivery ? "on" : "off", cp->n_dthr,
	       routing_of(cp)->have_def ? routing_of(cp)->def.text : "none");
	return 0;
}

void
cp_stop(struct cplane *cp)
{
	uint64_t deadline;

	if (!cp->thr_started)
		return;
	/* The last announcements of the stopped workers, then no more
	 * dispatching: the loop ends, deliveries in flight finish. */
	pthread_mutex_lock(&cp->mu);
	atomic_store(&cp->stop, true); /* under mu: cp_call() sees it */
	pthread_cond_broadcast(&cp->res_cv);
	pthread_mutex_unlock(&cp->mu);
	pthread_join(cp->thr, NULL);
	pthread_mutex_lock(&cp->mu);
	cp->thr_started = false;
	pthread_mutex_unlock(&cp->mu);
	run_calls(cp); /* any caller that slipped in gets its answer */
	drain_ports(cp);
	pthread_mutex_lock(&cp->mu);
	cp->quit = true;
	/* Jobs not yet taken go back (their recipients stay pending). */
	while (cp->jobs_head) {
		struct q_job *j = cp->jobs_head;
		cp->jobs_head = j->next;
		j->dest->listed_jobs--;
		cp->jobs_out--;
		job_free(j);
	}
	cp->jobs_tail = NULL;
	while (wake_one(cp, NULL))
		;
	pthread_mutex_unlock(&cp->mu);
	deadline = fd_now_monotonic_us() + cp->cfg.shutdown_timeout_ms * 1000;
	for (;;) {
		unsigned out;
		apply_results(cp);
		pthread_mutex_lock(&cp->mu);
		out = cp->jobs_out;
		pthread_mutex_unlock(&cp->mu);
		if (out == 0 || fd_now_monotonic_us() >= deadline)
			break;
		usleep(10000);
	}
	if (cp->jobs_out == 0) {
		for (unsigned i = 0; i < cp->n_dthr; i++)
			pthread_join(cp->dthr[i], NULL);
		cp->n_dthr = 0;
	} else {
		/* Deliveries still running (a next hop that does not answer):
		 * their ATTEMPT records are durable, so the next start counts
		 * them as possible duplicates. They are not waited for. */
		fd_log(FD_LOG_WARN, "qmgr",
		       "event=stop_timeout deliveries_in_flight=%u",
		       cp->jobs_out);
	}
	fd_log(FD_LOG_INFO, "qmgr",
	       "event=stats messages=%zu queued=%" PRIu64 " delivered=%" PRIu64
	       " deferred=%" PRIu64 " bounced=%" PRIu64 " expired=%" PRIu64
	       " dsn_sent=%" PRIu64 " dsn_dropped=%" PRIu64
	       " reclaim_sent=%" PRIu64 " reclaimed=%" PRIu64,
	       cp->n_msgs, cp->st_queued, cp->st_delivered, cp->st_deferred,
	       cp->st_bounced, cp->st_expired, cp->st_dsn_sent,
	       cp->st_dsn_dropped, cp->st_reclaim_sent, cp->st_reclaimed);
	if (cp->log && cp->n_dthr == 0) {
		dlog_close(cp->log);
		cp->log = NULL;
	}
	atomic_store(&cp->stopped, true);
}

void
cp_free(struct cplane *cp)
{
	if (!cp)
		return;
	if (cp->n_dthr)
		return; /* threads still use it: the process is exiting */
	verify_free(cp->verify);
	cp->verify = NULL;
	if (cp->log)
		dlog_close(cp->log);
	for (unsigned w = 0; cp->tails && w < cp->nworkers; w++)
		tail_free(cp->tails[w]);
	for (size_t b = 0; cp->msg_h && b < cp->msg_cap; b++)
		while (cp->msg_h[b])
			msg_free(cp, cp->msg_h[b]);
	for (size_t b = 0; b < SEG_BUCKETS; b++)
		while (cp->seg_h[b]) {
			struct q_seg *s = cp->seg_h[b];
			cp->seg_h[b] = s->hnext;
			if (s->fd >= 0)
				close(s->fd);
			free(s);
		}
	if (cp->mover) { /* freed with the others (not in dest_h) */
		cp->mover->hnext = cp->dest_h[0];
		cp->dest_h[0] = cp->mover;
		cp->mover = NULL;
	}
	for (size_t b = 0; b < DEST_BUCKETS; b++)
		while (cp->dest_h[b]) {
			struct q_dest *d = cp->dest_h[b];
			cp->dest_h[b] = d->hnext;
			while (d->fresh_head) {
				struct q_job *j = d->fresh_head;
				d->fresh_head = j->next;
				job_free(j);
			}
			while (d->retry_head) {
				struct q_job *j = d->retry_head;
				d->retry_head = j->next;
				job_free(j);
			}
			free(d->dead_reason);
			free(d);
		}
	for (unsigned w = 0; cp->ports && w < cp->nworkers; w++)
		fd_ctl_port_fini(&cp->ports[w]);
	free(cp->ports);
	free(cp->tails);
	free(cp->msg_h);
	free(cp->heap);
	free(cp->reclaimable);
	free(cp->dthr);
	if (cp->recent)
		munmap(cp->recent, RECENT_BYTES);
	free(cp->ekey_h);
	for (size_t b = 0; b < 1024; b++)
		while (cp->id_h[b]) {
			struct indoubt *e = cp->id_h[b];
			cp->id_h[b] = e->next;
			free(e);
		}
	routing_free(cp->routing);
	routing_free(cp->routing_retired);
	free(cp->dom_store);
	free((void *)cp->dom_ptrs);
	if (cp->rcpts)
		rcptdb_free(cp->rcpts);
	if (cp->rcpts_retired)
		rcptdb_free(cp->rcpts_retired);
	pthread_mutex_destroy(&cp->mu);
	pthread_cond_destroy(&cp->res_cv);
	pthread_cond_destroy(&cp->call_cv);
	free(cp);
}

const char *
cp_hostname(const struct cplane *cp)
{
	return cp->hostname;
}

void
cp_dest_tls(struct cplane *cp, const struct q_dest *d, int *tls, char *ca,
	    size_t n)
{
	pthread_mutex_lock(&cp->mu);
	*tls = d->tls;
	snprintf(ca, n, "%s", d->tls_ca);
	pthread_mutex_unlock(&cp->mu);
}

const struct cp_config *
cp_config_of(const struct cplane *cp)
{
	return &cp->cfg;
}

struct dlog *
cp_log(const struct cplane *cp)
{
	return cp->log;
}
