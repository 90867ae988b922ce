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
#include "finaldot/log.h"

#define ADDR_MAX 320
#define PROBE_WINDOW 8 /* slots looked at from the hash position */

enum vstate { V_EMPTY = 0, V_PENDING, V_VALID, V_UNKNOWN, V_TEMPFAIL };

struct vslot {
	uint64_t hash;
	uint64_t expires_ms; /* V_VALID/UNKNOWN/TEMPFAIL */
	uint64_t touched_ms; /* for eviction */
	uint8_t state;
	uint8_t prev; /* PENDING refresh: the old answer meanwhile */
	char addr[ADDR_MAX];
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

/* FNV-1a over the lower-cased address (ASCII letters), mixed. */
static uint64_t
addr_hash(const char *a, char *lower, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;
	size_t i;

	for (i = 0; a[i] && i + 1 < n; i++) {
		lower[i] = (char)tolower((unsigned char)a[i]);
		h ^= (uint8_t)lower[i];
		h *= 0x100000001b3ull;
	}
	lower[i] = '\0';
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdull;
	h ^= h >> 33;
	return h ? h : 1;
}

/* The slot for addr: its own, or the one to take (empty or oldest). */
static size_t
slot_find(struct verify *v, uint64_t h, const char *addr, bool *found)
{
	size_t mask = v->nslots - 1, pick = SIZE_MAX;

	for (size_t k = 0; k < PROBE_WINDOW; k++) {
		size_t i = (h + k) & mask;
		struct vslot *s = &v->slots[i];
		if (s->state != V_EMPTY && s->hash == h &&
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
enqueue(struct verify *v, size_t i)
{
	if (v->qlen >= v->o.queue_max) {
		v->st.queue_full++;
		return false;
	}
	v->queue[(v->qhead + v->qlen) % v->o.queue_max] = (uint32_t)i;
	v->qlen++;
	pthread_cond_signal(&v->cv);
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
	char lower[ADDR_MAX];
	uint64_t h, t;
	size_t i;
	bool found;
	int r;

	if (strlen(addr) >= ADDR_MAX)
		return -1;
	{
		/* A local route needs no probe (and no cache slot). */
		char key[600];
		bool local = false;
		v->open(v->ctx, addr, false, key, sizeof(key), &local, NULL);
		if (local)
			return 1;
	}
	h = addr_hash(addr, lower, sizeof(lower));
	pthread_mutex_lock(&v->mu);
	t = now(v);
	i = slot_find(v, h, lower, &found);
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
			if (!enqueue(v, i)) {
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
		snprintf(s->addr, sizeof(s->addr), "%s", lower);
		s->hash = h;
		s->touched_ms = t;
		s->state = V_PENDING;
		s->prev = V_EMPTY;
		if (!enqueue(v, i)) {
			s->state = V_EMPTY;
			s->addr[0] = '\0';
			v->st.entries--;
		}
	}
	pthread_mutex_unlock(&v->mu);
	return -1;
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
		return strncmp(r->enh, "5.1.", 4) == 0 ? V_UNKNOWN : V_TEMPFAIL;
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
		uint64_t h;
		uint8_t st;
		bool local = false;
		size_t i;
		int rc = 0;

		while (!v->stop && v->qlen == 0)
			pthread_cond_wait(&v->cv, &v->mu);
		if (v->stop)
			break;
		i = v->queue[v->qhead];
		v->qhead = (v->qhead + 1) % v->o.queue_max;
		v->qlen--;
		memcpy(addr, v->slots[i].addr, sizeof(addr));
		h = v->slots[i].hash;
		pthread_mutex_unlock(&v->mu);

		memset(&r, 0, sizeof(r));
		v->open(v->ctx, addr, false, nkey, sizeof(nkey), &local, NULL);
		/* One connection per thread, kept while the next hop is the
		 * same; a kept one that broke is replaced once. */
		for (int attempt = 0; !local && attempt < 2; attempt++) {
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
