/*
 * The verification cache (verify.h) with a fake route table: addresses at
 * @local.test have a local route (valid, no probe), at @down.test a next
 * hop that cannot be reached (the probe cannot tell). The probe path to a
 * real next hop (smtpc_probe) is tests/integration/test_verify.py's.
 */
#include <criterion/criterion.h>
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
start(unsigned queue_max)
{
	struct verify_opts o;

	verify_opts_defaults(&o);
	o.threads = 1;
	o.queue_max = queue_max;
	o.max_entries = 64;
	o.tempfail_ttl_ms = 1000;
	o.now_ms = fake_now;
	atomic_store(&clock_ms, 1000000);
	atomic_store(&connects, 0);
	return verify_new(&o, fake_open, NULL);
}

/* Wait (real time) until the probe thread made n connection attempts and
 * stored the outcome. */
static void
wait_probes(struct verify *v, uint64_t n)
{
	struct verify_stats st;

	for (int i = 0; i < 2000; i++) {
		verify_get_stats(v, &st);
		if (st.probes >= n)
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
	cr_assert_eq(verify_check(v, "U@Down.Test"), -1);
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
