/*
 * Recipient verification by probe (contract in verify.h).
 *
 * States of a cache slot: EMPTY; PENDING (queued or being probed: checks
 * answer -1 and queue nothing more); VALID, UNKNOWN, TEMPFAIL with an
 * expiry. An expired VALID/UNKNOWN entry is probed again, and answered
 * from its old value meanwhile (an address that was valid an hour ago is
 * very likely valid now; the refresh keeps the cache honest without
 * making a client wait). An expired TEMPFAIL is simply probed again.
 *
 * The probe queue is a ring of slot indexes; a probe thread takes one,
 * copies the address out under the mutex, probes with the mutex released,
 * and writes the outcome back if the slot still holds that address (it may
 * have been overwritten by then: the result is dropped).
 *
 * Next hops (struct vhop, by a hash of the route's key) keep one slow or
 * dead next hop from holding up every other route's probes: a thread
 * takes the oldest queued probe whose next hop no other thread is probing
 * (one at a time per next hop), and a next hop that gave no answer (no
 * connection, a timeout) is not asked again for tempfail_ttl_ms: probes
 * for it meanwhile are answered "could not tell" at once. Without this, a
 * blackholed next hop (30 s per connect) took every thread and filled the
 * queue, and valid users of healthy routes got 450 until it came back.
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "control/smtpc.h"
#include "control/verify.h"
#include "finaldot/compiler.h"
#include "finaldot/log.h"

#define ADDR_MAX 320
#define PROBE_WINDOW 8 /* slots looked at from the hash position */
#define HOPS_MAX 64     /* next hops remembered (threads are capped to it) */

enum vstate { V_EMPTY = 0, V_PENDING, V_VALID, V_UNKNOWN, V_TEMPFAIL };

struct vslot {
	uint64_t hash;
	uint64_t expires_ms; /* V_VALID/UNKNOWN/TEMPFAIL */
	uint64_t touched_ms; /* for eviction */
	uint64_t hop;        /* hash of its route's key, when queued */
	uint8_t state;
	uint8_t prev; /* PENDING refresh: the old answer meanwhile */
	char addr[ADDR_MAX];
};

struct vhop {
	uint64_t hop;        /* 0: unused */
	uint64_t dead_until; /* no answer: not asked again before then */
	uint64_t used_ms;    /* for reuse of the entry */
	unsigned busy;       /* threads probing it now */
};

struct verify {
	struct verify_opts o;
	verify_open_fn open;
	void *ctx;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	bool stop;
	struct vslot *slots;
	size_t nslots; /* a power of two */
	uint32_t *queue; /* ring of slot indexes */
	unsigned qhead, qlen;
	pthread_t *thr;
	unsigned nthr;
	unsigned running; /* probe threads not yet returned */
	struct vhop hops[HOPS_MAX];
	struct verify_stats st;
};

static uint64_t
mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t
now(const struct verify *v)
{
	return v->o.now_ms ? v->o.now_ms() : mono_ms();
}

void
verify_opts_defaults(struct verify_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->threads = 2;
	o->max_entries = 65536;
	o->queue_max = 1024;
	o->positive_ttl_ms = 7ull * 86400000;
	o->negative_ttl_ms = 3ull * 3600000;
	o->tempfail_ttl_ms = 60000;
}

/* FNV-1a, mixed; never 0. */
static uint64_t
fnv(const char *a)
{
	uint64_t h = 0xcbf29ce484222325ull;

	for (; *a; a++) {
		h ^= (uint8_t)*a;
		h *= 0x100000001b3ull;
	}
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdull;
	h ^= h >> 33;
	return h ? h : 1;
}

/*
 * The cache's spelling of an address, which is also what is probed: the
 * domain lower-cased (domains are case-insensitive), the local part as the
 * client wrote it. RFC 5321 2.4 leaves a local part's meaning to its own
 * host, and some are case-sensitive: a probe of "bob" says nothing of
 * "Bob" there (until 2026-12-05 both were probed and cached as "bob").
 */
static uint64_t
addr_key(const char *a, char *key, size_t n)
{
	const char *at = strrchr(a, '@');
	size_t i;

	for (i = 0; a[i] && i + 1 < n; i++)
		key[i] = at && a + i > at ? (char)tolower((unsigned char)a[i])
					  : a[i];
	key[i] = '\0';
	return fnv(key);
}

/* The slot for addr: its own, or the one to take (empty or oldest). */
static size_t
slot_find(struct verify *v, uint64_t h, uint64_t hop, const char *addr,
	  bool *found)
{
	size_t mask = v->nslots - 1, pick = SIZE_MAX;

	for (size_t k = 0; k < PROBE_WINDOW; k++) {
		size_t i = (h + k) & mask;
		struct vslot *s = &v->slots[i];
		if (s->state != V_EMPTY && s->hash == h && s->hop == hop &&
		    strcmp(s->addr, addr) == 0) {
			*found = true;
			return i;
		}
		if (s->state == V_EMPTY) {
			if (pick == SIZE_MAX || v->slots[pick].state != V_EMPTY)
				pick = i;
		} else if (s->state != V_PENDING &&
			   (pick == SIZE_MAX ||
			    (v->slots[pick].state != V_EMPTY &&
			     s->touched_ms < v->slots[pick].touched_ms))) {
			pick = i;
		}
	}
	*found = false;
	return pick; /* SIZE_MAX: every slot of the window is pending */
}

static bool
enqueue(struct verify *v, size_t i, uint64_t hop)
{
	unsigned mine = 0, cap = FD_MAX(1u, v->o.queue_max / VERIFY_HOP_SHARE);

	if (v->qlen >= v->o.queue_max) {
		v->st.queue_full++;
		return false;
	}
	/* A next hop's share of the queue: one that hangs must not take
	 * all of it (a miss only: a walk of at most queue_max entries) */
	for (unsigned k = 0; k < v->qlen && mine < cap; k++)
		mine += v->slots[v->queue[(v->qhead + k) % v->o.queue_max]]
				.hop == hop;
	if (mine >= cap) {
		v->st.queue_full++;
		return false;
	}
	v->slots[i].hop = hop;
	v->queue[(v->qhead + v->qlen) % v->o.queue_max] = (uint32_t)i;
	v->qlen++;
	pthread_cond_broadcast(&v->cv);
	return true;
}

static int
answer(uint8_t state)
{
	return state == V_VALID ? 1 : state == V_UNKNOWN ? 0 : -1;
}

int
verify_check(struct verify *v, const char *addr)
{
	char key[ADDR_MAX], hop_key[600];
	uint64_t h, t, hop;
	bool found, local = false;
	size_t i;
	int r;

	if (strlen(addr) >= ADDR_MAX)
		return -1;
	h = addr_key(addr, key, sizeof(key));
	/* A local route needs no probe (and no cache slot). */
	v->open(v->ctx, key, false, hop_key, sizeof(hop_key), &local, NULL);
	if (local)
		return 1;
	/* An answer is the next hop's: part of the entry's identity (a
	 * reload may move the domain to another one). */
	hop = fnv(hop_key);
	pthread_mutex_lock(&v->mu);
	t = now(v);
	i = slot_find(v, h, hop, key, &found);
	if (found) {
		struct vslot *s = &v->slots[i];
		s->touched_ms = t;
		if (s->state == V_PENDING) {
			r = answer(s->prev);
		} else if (t < s->expires_ms) {
			v->st.hits++;
			r = answer(s->state);
		} else {
			/* Expired: refresh, answering the old value meanwhile
			 * (a TEMPFAIL stays "not known"). */
			r = answer(s->state);
			s->prev = s->state == V_TEMPFAIL ? V_EMPTY : s->state;
			s->state = V_PENDING;
			if (!enqueue(v, i, hop)) {
				s->state = s->prev == V_EMPTY ? V_TEMPFAIL
							      : s->prev;
			}
		}
		pthread_mutex_unlock(&v->mu);
		return r;
	}
	v->st.misses++;
	if (i != SIZE_MAX) {
		struct vslot *s = &v->slots[i];
		if (s->state == V_EMPTY)
			v->st.entries++;
		memset(s, 0, sizeof(*s) - sizeof(s->addr));
		snprintf(s->addr, sizeof(s->addr), "%s", key);
		s->hash = h;
		s->touched_ms = t;
		s->state = V_PENDING;
		s->prev = V_EMPTY;
		if (!enqueue(v, i, hop)) {
			s->state = V_EMPTY;
			s->addr[0] = '\0';
			v->st.entries--;
		}
	}
	pthread_mutex_unlock(&v->mu);
	return -1;
}

/* hop's entry, made when absent (reusing an idle one, least recently used
 * first); NULL when all are busy, which threads <= HOPS_MAX rules out. */
static struct vhop *
hop_get(struct verify *v, uint64_t hop)
{
	struct vhop *pick = NULL;

	for (unsigned k = 0; k < HOPS_MAX; k++) {
		struct vhop *e = &v->hops[k];
		if (e->hop == hop)
			return e;
		if (e->busy == 0 && (!pick || e->used_ms < pick->used_ms))
			pick = e;
	}
	if (pick)
		*pick = (struct vhop){ .hop = hop };
	return pick;
}

/*
 * The next probe to make: the oldest queued one whose next hop no other
 * thread is probing, taken out of the queue, its next hop marked busy.
 * false: none can be taken now (the queue is empty or all of it waits for
 * busy next hops).
 */
static bool
take(struct verify *v, size_t *slot, struct vhop **hp)
{
	unsigned qm = v->o.queue_max, nbusy = 0;
	uint64_t busy[HOPS_MAX];

	/* The next hops being probed now: at most one per thread. */
	for (unsigned k = 0; k < HOPS_MAX; k++)
		if (v->hops[k].busy)
			busy[nbusy++] = v->hops[k].hop;
	for (unsigned k = 0; k < v->qlen; k++) {
		uint32_t i = v->queue[(v->qhead + k) % qm];
		unsigned b = 0;
		while (b < nbusy && busy[b] != v->slots[i].hop)
			b++;
		if (b < nbusy)
			continue;
		/* Close the gap: the ones before it move up one place. */
		for (unsigned j = k; j > 0; j--)
			v->queue[(v->qhead + j) % qm] =
				v->queue[(v->qhead + j - 1) % qm];
		v->qhead = (v->qhead + 1) % qm;
		v->qlen--;
		*hp = hop_get(v, v->slots[i].hop);
		if (*hp) {
			(*hp)->busy++;
			(*hp)->used_ms = now(v);
		}
		*slot = i;
		return true;
	}
	return false;
}

/* What a probe's reply means for the address: smtpc_probe()'s result. */
static uint8_t
outcome(int rc, const struct smtpc_reply *r)
{
	/* rc 1: MAIL FROM:<> was refused, which says nothing about the
	 * address (its reply shows in the log); rc < 0: no answer. */
	if (rc != 0 || r->local)
		return V_TEMPFAIL;
	if (r->code / 100 == 2)
		return V_VALID;
	/* "No such user" only when the 5xx says it is about the address
	 * (RFC 3463 5.1.x; without an enhanced code, RFC 5321's mailbox
	 * replies 550, 551, 553): a policy refusal (530 5.7.0 STARTTLS
	 * first, 554 5.7.1 relaying denied, 553 5.6.7 SMTPUTF8 needed) or
	 * 552 would otherwise be cached for hours and answered 550 5.1.1
	 * for every user of the route. Those stay undecided (450). */
	if (r->code / 100 != 5)
		return V_TEMPFAIL;
	if (r->enh[0])
		/* 5.1.7 and 5.1.8 are about the sender (RFC 3463 3.2) */
		return strncmp(r->enh, "5.1.", 4) == 0 &&
				       strcmp(r->enh, "5.1.7") != 0 &&
				       strcmp(r->enh, "5.1.8") != 0
			       ? V_UNKNOWN
			       : V_TEMPFAIL;
	return r->code == 550 || r->code == 551 || r->code == 553
		       ? V_UNKNOWN
		       : V_TEMPFAIL;
}

static void *
probe_main(void *arg)
{
	struct verify *v = arg;
	struct smtpc *c = NULL;
	char key[600] = "";

	pthread_mutex_lock(&v->mu);
	for (;;) {
		char addr[ADDR_MAX], nkey[600] = "", esc[ADDR_MAX * 4];
		struct smtpc_reply r;
		struct vhop *hop = NULL;
		uint64_t h, dead_ms = 0;
		uint8_t st;
		bool local = false;
		size_t i = 0;
		int rc = 0;

		while (!v->stop && !take(v, &i, &hop))
			pthread_cond_wait(&v->cv, &v->mu);
		if (v->stop)
			break;
		memcpy(addr, v->slots[i].addr, sizeof(addr));
		h = v->slots[i].hash;
		if (hop && hop->dead_until > now(v))
			dead_ms = hop->dead_until - now(v);
		pthread_mutex_unlock(&v->mu);

		memset(&r, 0, sizeof(r));
		v->open(v->ctx, addr, false, nkey, sizeof(nkey), &local, NULL);
		if (dead_ms && !local) {
			/* It gave no answer a moment ago: not asked again
			 * until then (a blackholed next hop would hold this
			 * thread for a connect timeout per address). */
			rc = -EHOSTUNREACH;
			r.local = true;
			snprintf(r.text, sizeof(r.text),
				 "not probed: %s gave no answer, asked again "
				 "in %" PRIu64 " s",
				 nkey, (dead_ms + 999) / 1000);
		}
		/* One connection per thread, kept while the next hop is the
		 * same; a kept one that broke is replaced once. */
		for (int attempt = 0; !dead_ms && !local && attempt < 2;
		     attempt++) {
			bool kept = c && strcmp(key, nkey) == 0;
			if (!kept) {
				smtpc_quit(c);
				key[0] = '\0';
				c = v->open(v->ctx, addr, true, key, sizeof(key),
					    &local, &r);
				if (!c) {
					rc = -ECONNREFUSED;
					break;
				}
			}
			rc = smtpc_probe(c, addr, &r);
			if (rc >= 0)
				break;
			smtpc_abort(c);
			c = NULL;
			key[0] = '\0';
			if (!kept)
				break; /* a fresh connection failed: tempfail */
		}
		st = local ? V_VALID : outcome(rc, &r);
		fd_log(FD_LOG_INFO, "verify",
		       "event=probe rcpt=%s result=%s reply=\"%s\"",
		       fd_log_escape(esc, sizeof(esc), addr, strlen(addr)),
		       st == V_VALID ? "valid" : st == V_UNKNOWN ? "unknown"
								: "tempfail",
		       local ? "local route" : r.text);

		pthread_mutex_lock(&v->mu);
		if (hop) {
			hop->busy--;
			/* No answer at all (rc < 0: no connection, a timeout,
			 * the connection lost): rest the next hop. */
			if (!dead_ms && !local && rc < 0)
				hop->dead_until = now(v) + v->o.tempfail_ttl_ms;
			pthread_cond_broadcast(&v->cv);
		}
		if (dead_ms)
			v->st.not_probed++;
		else
			v->st.probes++;
		if (st == V_VALID)
			v->st.valid++;
		else if (st == V_UNKNOWN)
			v->st.unknown++;
		else
			v->st.tempfail++;
		struct vslot *s = &v->slots[i];
		if (s->state == V_PENDING && s->hash == h &&
		    strcmp(s->addr, addr) == 0) {
			uint64_t ttl = st == V_VALID     ? v->o.positive_ttl_ms
				       : st == V_UNKNOWN ? v->o.negative_ttl_ms
							 : v->o.tempfail_ttl_ms;
			/* A refresh that could not tell keeps the old answer
			 * for another tempfail period. */
			if (st == V_TEMPFAIL && s->prev != V_EMPTY)
				st = s->prev;
			s->state = st;
			s->expires_ms = now(v) + ttl;
		}
	}
	pthread_mutex_unlock(&v->mu);
	smtpc_abort(c); /* stopping: no QUIT round trip */
	pthread_mutex_lock(&v->mu);
	v->running--;
	pthread_cond_broadcast(&v->cv);
	pthread_mutex_unlock(&v->mu);
	return NULL;
}

struct verify *
verify_new(const struct verify_opts *o, verify_open_fn open, void *ctx)
{
	struct verify *v = calloc(1, sizeof(*v));
	size_t n = 1;

	if (!v)
		return NULL;
	v->o = *o;
	if (v->o.threads == 0)
		v->o.threads = 1;
	if (v->o.threads > HOPS_MAX)
		v->o.threads = HOPS_MAX;
	if (v->o.queue_max == 0)
		v->o.queue_max = 1;
	while (n < v->o.max_entries || n < PROBE_WINDOW)
		n <<= 1;
	v->nslots = n;
	v->open = open;
	v->ctx = ctx;
	v->slots = calloc(n, sizeof(*v->slots));
	v->queue = calloc(v->o.queue_max, sizeof(*v->queue));
	v->thr = calloc(v->o.threads, sizeof(*v->thr));
	if (!v->slots || !v->queue || !v->thr)
		goto fail;
	pthread_mutex_init(&v->mu, NULL);
	pthread_cond_init(&v->cv, NULL);
	for (; v->nthr < v->o.threads; v->nthr++) {
		pthread_mutex_lock(&v->mu);
		v->running++;
		pthread_mutex_unlock(&v->mu);
		if (pthread_create(&v->thr[v->nthr], NULL, probe_main, v) != 0) {
			v->running--;
			break;
		}
		pthread_setname_np(v->thr[v->nthr], "fd-verify");
	}
	if (v->nthr == 0) {
		pthread_mutex_destroy(&v->mu);
		pthread_cond_destroy(&v->cv);
		goto fail;
	}
	return v;
fail:
	free(v->slots);
	free(v->queue);
	free(v->thr);
	free(v);
	return NULL;
}

void
verify_free(struct verify *v)
{
	struct timespec until;

	if (!v)
		return;
	/* A probe may be waiting on a next hop for minutes (its timeouts are
	 * the delivery's): wait 2 s for the threads, then leave them and
	 * their memory to the exiting process rather than delay the stop. */
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += 2;
	pthread_mutex_lock(&v->mu);
	v->stop = true;
	pthread_cond_broadcast(&v->cv);
	while (v->running > 0)
		if (pthread_cond_timedwait(&v->cv, &v->mu, &until) != 0)
			break;
	if (v->running > 0) {
		pthread_mutex_unlock(&v->mu);
		for (unsigned i = 0; i < v->nthr; i++)
			pthread_detach(v->thr[i]);
		return;
	}
	pthread_mutex_unlock(&v->mu);
	for (unsigned i = 0; i < v->nthr; i++)
		pthread_join(v->thr[i], NULL);
	pthread_mutex_destroy(&v->mu);
	pthread_cond_destroy(&v->cv);
	free(v->slots);
	free(v->queue);
	free(v->thr);
	free(v);
}

void
verify_get_stats(struct verify *v, struct verify_stats *out)
{
	pthread_mutex_lock(&v->mu);
	*out = v->st;
	pthread_mutex_unlock(&v->mu);
}
