/*
 * The verification cache (verify.h) with a fake route table: addresses at
 * @local.test have a local route (valid, no probe), at @down.test a next
 * hop that cannot be reached (the probe cannot tell). The probe path to a
 * real next hop (smtpc_probe) is tests/integration/test_verify.py's.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "smtpc.h"
#include "verify.h"

TestSuite(verify);

static atomic_uint connects;
static atomic_ullong clock_ms;
/* A probe's connection waits while this is false: a test can keep a
 * probe pending as long as it needs to (the probe thread could otherwise
 * finish before the test's next call). */
static atomic_bool probes_go = true;

static uint64_t
fake_now(void)
{
	return atomic_load(&clock_ms);
}

/* Connections to @slow.test wait while this is false (a next hop that
 * hangs), whatever probes_go says. */
static atomic_bool slow_go = true;
/* The address of the last connection's probe. */
static char last_probed[64];
static pthread_mutex_t last_mu = PTHREAD_MUTEX_INITIALIZER;

static struct smtpc *
fake_open(void *ctx, const char *addr, bool connect, char *key, size_t n,
	  bool *local, struct smtpc_reply *why)
{
	(void)ctx;
	*local = strstr(addr, "@local.test") != NULL;
	snprintf(key, n, "smtp:%s:25", strchr(addr, '@') + 1);
	if (connect) {
		while (!atomic_load(&probes_go))
			usleep(1000);
		while (strstr(addr, "@slow.test") && !atomic_load(&slow_go))
			usleep(1000);
		pthread_mutex_lock(&last_mu);
		snprintf(last_probed, sizeof(last_probed), "%s", addr);
		pthread_mutex_unlock(&last_mu);
		atomic_fetch_add(&connects, 1);
		if (why) {
			memset(why, 0, sizeof(*why));
			why->code = 421;
			why->local = true;
			snprintf(why->text, sizeof(why->text),
				 "421 4.4.1 connect failed");
		}
	}
	return NULL;
}

static struct verify *
start_n(unsigned queue_max, unsigned threads)
{
	struct verify_opts o;

	verify_opts_defaults(&o);
	o.threads = threads;
	o.queue_max = queue_max;
	o.max_entries = 64;
	o.tempfail_ttl_ms = 1000;
	o.now_ms = fake_now;
	atomic_store(&clock_ms, 1000000);
	atomic_store(&connects, 0);
	return verify_new(&o, fake_open, NULL);
}

static struct verify *
start(unsigned queue_max)
{
	return start_n(queue_max, 1);
}

/* Wait (real time) until the probe threads stored n outcomes (probes made
 * or answered at once for a next hop that is resting). */
static void
wait_probes(struct verify *v, uint64_t n)
{
	struct verify_stats st;

	for (int i = 0; i < 2000; i++) {
		verify_get_stats(v, &st);
		if (st.probes + st.not_probed >= n)
			return;
		usleep(1000);
	}
	cr_assert_fail("probes: %llu of %llu", (unsigned long long)st.probes,
		       (unsigned long long)n);
}

Test(verify, local_route_is_valid_without_a_probe)
{
	struct verify *v = start(16);
	struct verify_stats st;

	cr_assert_eq(verify_check(v, "anyone@local.test"), 1);
	verify_get_stats(v, &st);
	cr_assert_eq(st.misses, 0);
	cr_assert_eq(st.entries, 0);
	cr_assert_eq(atomic_load(&connects), 0);
	verify_free(v);
}

Test(verify, unreachable_next_hop_stays_not_known_and_is_cached)
{
	struct verify *v = start(16);
	struct verify_stats st;

	atomic_store(&probes_go, false);
	cr_assert_eq(verify_check(v, "u@down.test"), -1);
	/* While pending: no second probe queued, no answer from the cache. */
	cr_assert_eq(verify_check(v, "u@Down.Test"), -1);
	atomic_store(&probes_go, true);
	wait_probes(v, 1);
	cr_assert_eq(verify_check(v, "u@down.test"), -1);
	verify_get_stats(v, &st);
	cr_assert_eq(st.probes, 1);
	cr_assert_eq(st.tempfail, 1);
	cr_assert_eq(st.hits, 1, "the tempfail answer came from the cache");
	cr_assert_eq(atomic_load(&connects), 1);
	/* After tempfail_ttl the address is probed again. */
	atomic_fetch_add(&clock_ms, 1001);
	cr_assert_eq(verify_check(v, "u@down.test"), -1);
	wait_probes(v, 2);
	cr_assert_eq(atomic_load(&connects), 2);
	verify_free(v);
}

Test(verify, full_queue_queues_nothing_and_counts)
{
	struct verify *v = start(1);
	struct verify_stats st;
	char a[64];

	/* The single probe thread may take the first one at once; either way
	 * some of 50 distinct addresses find the one-slot queue full. */
	for (int i = 0; i < 50; i++) {
		snprintf(a, sizeof(a), "u%d@down.test", i);
		cr_assert_eq(verify_check(v, a), -1);
	}
	verify_get_stats(v, &st);
	cr_assert_gt(st.queue_full, 0);
	cr_assert_eq(st.misses, 50);
	verify_free(v);
}

Test(verify, bounded_table_evicts)
{
	struct verify *v = start(4096);
	struct verify_stats st;
	char a[64];

	for (int i = 0; i < 1000; i++) {
		snprintf(a, sizeof(a), "u%d@down.test", i);
		verify_check(v, a);
	}
	wait_probes(v, 10);
	verify_get_stats(v, &st);
	cr_assert_leq(st.entries, 64, "%llu entries",
		      (unsigned long long)st.entries);
	verify_free(v);
}

Test(verify, a_hung_next_hop_does_not_hold_up_other_routes)
{
	struct verify *v = start_n(64, 2);
	struct verify_stats st;
	char a[64];

	/* Three probes for a next hop that hangs, then one for another. */
	atomic_store(&slow_go, false);
	for (int i = 0; i < 3; i++) {
		snprintf(a, sizeof(a), "u%d@slow.test", i);
		cr_assert_eq(verify_check(v, a), -1);
	}
	cr_assert_eq(verify_check(v, "x@down.test"), -1);
	/* One thread waits on slow.test; the other must not take the second
	 * slow.test probe (FIFO did: both threads hung, nothing else was
	 * asked) but the one for down.test. */
	wait_probes(v, 1);
	verify_get_stats(v, &st);
	cr_assert_eq(st.tempfail, 1);
	pthread_mutex_lock(&last_mu);
	cr_assert_str_eq(last_probed, "x@down.test");
	pthread_mutex_unlock(&last_mu);
	atomic_store(&slow_go, true);
	wait_probes(v, 4);
	verify_free(v);
}

/* A next hop that hangs while its addresses keep coming takes at most its
 * share of the queue (queue_max / VERIFY_HOP_SHARE): another route's
 * address is still queued. It filled the whole queue, and every other
 * route's addresses got 450 until the hung probe timed out. */
Test(verify, a_hung_next_hop_takes_only_its_share_of_the_queue)
{
	struct verify *v = start_n(64, 1);
	struct verify_stats st;
	uint64_t refused;
	char a[64];

	atomic_store(&slow_go, false);
	for (int i = 0; i < 100; i++) {
		snprintf(a, sizeof(a), "u%d@slow.test", i);
		cr_assert_eq(verify_check(v, a), -1);
	}
	verify_get_stats(v, &st);
	refused = st.queue_full;
	/* 64 / 8 queued, and perhaps one more taken by the thread */
	cr_assert_geq(refused, 100 - 64 / VERIFY_HOP_SHARE - 1);
	cr_assert_eq(verify_check(v, "x@down.test"), -1);
	verify_get_stats(v, &st);
	cr_assert_eq(st.queue_full, refused, "another route's probe refused");
	atomic_store(&slow_go, true);
	verify_free(v);
}

Test(verify, a_next_hop_without_answer_rests)
{
	struct verify *v = start(64);
	struct verify_stats st;

	cr_assert_eq(verify_check(v, "a@down.test"), -1);
	wait_probes(v, 1);
	cr_assert_eq(atomic_load(&connects), 1);
	/* Within tempfail_ttl: answered "could not tell" without a probe. */
	cr_assert_eq(verify_check(v, "b@down.test"), -1);
	cr_assert_eq(verify_check(v, "c@down.test"), -1);
	wait_probes(v, 3);
	verify_get_stats(v, &st);
	cr_assert_eq(st.not_probed, 2);
	cr_assert_eq(st.probes, 1);
	cr_assert_eq(st.tempfail, 3);
	cr_assert_eq(atomic_load(&connects), 1);
	/* After it, the next hop is asked again. */
	atomic_fetch_add(&clock_ms, 1001);
	cr_assert_eq(verify_check(v, "d@down.test"), -1);
	wait_probes(v, 4);
	cr_assert_eq(atomic_load(&connects), 2);
	verify_free(v);
}

Test(verify, the_local_part_keeps_its_case)
{
	struct verify *v = start(64);
	struct verify_stats st;

	cr_assert_eq(verify_check(v, "Bob@Down.Test"), -1);
	wait_probes(v, 1);
	/* Probed as written, the domain lower-cased. */
	pthread_mutex_lock(&last_mu);
	cr_assert_str_eq(last_probed, "Bob@down.test");
	pthread_mutex_unlock(&last_mu);
	/* The domain's case is the same address: a cache hit. */
	cr_assert_eq(verify_check(v, "Bob@DOWN.test"), -1);
	verify_get_stats(v, &st);
	cr_assert_eq(st.misses, 1);
	cr_assert_eq(st.hits, 1);
	/* Another local part's case is another address. */
	cr_assert_eq(verify_check(v, "bob@down.test"), -1);
	verify_get_stats(v, &st);
	cr_assert_eq(st.misses, 2);
	verify_free(v);
}
