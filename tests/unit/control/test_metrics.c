/*
 * metrics: the exposition text from known counters (two fake workers, a
 * fake queue, fake DPDK counters), the latency buckets' edges, and the
 * workers' publish/load copy.
 */
#include <criterion/criterion.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../fdexhaust.h"
#include "cplane.h"
#include "metrics.h"

/* The route the fake queue manager reports (NULL: none). */
static const char *fake_route;

/* The queue manager is not linked: this stands in for its stats. */
void
cp_get_stats(struct cplane *cp, struct cp_stats *st)
{
	(void)cp;
	memset(st, 0, sizeof(*st));
	st->active = 1;
	st->deferred = 7;
	st->held = 2;
	st->delivered_total = 40;
	st->bounced_total = 3;
	if (fake_route) {
		snprintf(st->routes[0].route, sizeof(st->routes[0].route),
			 "%s", fake_route);
		st->routes[0].batches = 6;
		st->n_routes = 1;
	}
}

static struct ctl_worker_stats fake[2];

static void
fake_stats(void *ctx, unsigned i, struct ctl_worker_stats *out)
{
	(void)ctx;
	*out = fake[i];
}

static void
fake_net(void *ctx, struct ctl_net_stats *out)
{
	(void)ctx;
	out->rx_packets = 1000;
	out->tx_packets = 900;
	out->drops[CTL_DROP_TCP_NO_PORT] = 5;
}

static atomic_bool paused;

static struct ctl_sources
sources(bool net)
{
	static const char *listen[] = {"127.0.0.1:25"};
	struct ctl_sources s = {
		.cp = (struct cplane *)&paused, /* not dereferenced */
		.version = "9.9.9", .transport = "kernel", .hostname = "mx",
		.listen = listen, .n_listen = 1, .started_us = 1700000000000000,
		.n_workers = 2, .worker_stats = fake_stats, .paused = &paused,
	};
	if (net) {
		s.transport = "dpdk";
		s.net_stats = fake_net;
	}
	return s;
}

/* The value of the sample line that starts with key followed by a space. */
static const char *
sample(const char *text, const char *key)
{
	size_t n = strlen(key);

	for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1
								       : NULL)
		if (strncmp(p, key, n) == 0 && p[n] == ' ')
			return p + n + 1;
	return NULL;
}

static long long
num(const char *text, const char *key)
{
	const char *v = sample(text, key);

	cr_assert_not_null(v, "no sample %s", key);
	return atoll(v);
}

TestSuite(metrics);

Test(metrics, totals_and_names)
{
	struct ctl_sources s = sources(false);
	char *text = NULL;
	size_t len = 0;

	memset(fake, 0, sizeof(fake));
	fake[0].messages = 10;
	fake[1].messages = 5;
	fake[0].message_bytes = 1000;
	fake[1].relay_denied = 2;
	fake[0].conns_current = 3;
	fake[1].refused_paused = 4;
	fake[0].lat[0] = 1;  /* <= 50 us */
	fake[1].lat[5] = 2;  /* <= 2.5 ms */
	fake[1].lat[CTL_LAT_BUCKETS] = 1; /* > 10 s */
	fake[0].lat_sum_ns = 1500000000ull;
	atomic_store(&paused, true);
	cr_assert_eq(metrics_render(&s, &text, &len), 0);
	cr_assert_eq(strlen(text), len);
	cr_assert_eq(num(text, "finaldot_messages_accepted_total"), 15);
	cr_assert_eq(num(text, "finaldot_accepted_message_bytes_total"), 1000);
	cr_assert_eq(num(text, "finaldot_listener_paused"), 1);
	cr_assert_eq(num(text, "finaldot_connections_open{transport=\"kernel\"}"),
		     3);
	cr_assert_eq(num(text, "finaldot_smtp_rejections_total{class=\"5xx\","
			       "reason=\"relay_denied\"}"), 2);
	cr_assert_eq(num(text, "finaldot_connections_refused_total{transport="
			       "\"kernel\",reason=\"paused\"}"), 4);
	cr_assert_eq(num(text, "finaldot_queue_messages{state=\"deferred\"}"),
		     7);
	cr_assert_eq(num(text, "finaldot_deliveries_total{outcome=\"bounced\"}"),
		     3);
	/* Cumulative buckets, +Inf == count, the sum in seconds. */
	cr_assert_eq(num(text, "finaldot_final_dot_latency_seconds_bucket"
			       "{le=\"5e-05\"}"), 1);
	cr_assert_eq(num(text, "finaldot_final_dot_latency_seconds_bucket"
			       "{le=\"0.001\"}"), 1);
	cr_assert_eq(num(text, "finaldot_final_dot_latency_seconds_bucket"
			       "{le=\"0.0025\"}"), 3);
	cr_assert_eq(num(text, "finaldot_final_dot_latency_seconds_bucket"
			       "{le=\"10\"}"), 3);
	cr_assert_eq(num(text, "finaldot_final_dot_latency_seconds_bucket"
			       "{le=\"+Inf\"}"), 4);
	cr_assert_eq(num(text, "finaldot_final_dot_latency_seconds_count"), 4);
	cr_assert_eq(strncmp(sample(text,
				    "finaldot_final_dot_latency_seconds_sum"),
			     "1.500000000\n", 12), 0);
	/* No DPDK section on the kernel transport. */
	cr_assert_null(strstr(text, "finaldot_dpdk_"));
	/* Every sample's family is declared, and every counter ends in
	 * _total. */
	for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
		if (strncmp(line, "# TYPE ", 7) == 0 &&
		    strstr(line, " counter"))
			cr_assert(strstr(line, "_total counter"), "%s", line);
		cr_assert(strncmp(line, "finaldot_", 9) == 0 ||
			  strncmp(line, "# HELP finaldot_", 16) == 0 ||
			  strncmp(line, "# TYPE finaldot_", 16) == 0,
			  "%s", line);
	}
	free(text);
}

Test(metrics, dpdk_counters)
{
	struct ctl_sources s = sources(true);
	char *text = NULL;
	size_t len = 0;

	memset(fake, 0, sizeof(fake));
	cr_assert_eq(metrics_render(&s, &text, &len), 0);
	cr_assert_eq(num(text, "finaldot_dpdk_port_packets_total{direction="
			       "\"rx\"}"), 1000);
	cr_assert_eq(num(text, "finaldot_net_drops_total{reason=\"tcp_no_port\"}"),
		     5);
	cr_assert_eq(num(text, "finaldot_connections_total{transport=\"dpdk\"}"),
		     0);
	free(text);
	/* Every drop reason has its own name. */
	for (int i = 0; i < CTL_DROP_N; i++) {
		cr_assert_str_neq(ctl_net_drop_name((enum ctl_net_drop)i),
				  "other");
		for (int k = 0; k < i; k++)
			cr_assert_str_neq(ctl_net_drop_name((enum ctl_net_drop)i),
					  ctl_net_drop_name((enum ctl_net_drop)k));
	}
}

/* Whether s is well-formed UTF-8 (no overlong forms, no surrogates). */
static bool
valid_utf8(const unsigned char *s)
{
	while (*s) {
		unsigned n = *s < 0x80 ? 1 : *s >= 0xc2 && *s <= 0xdf ? 2
			   : *s >= 0xe0 && *s <= 0xef ? 3
			   : *s >= 0xf0 && *s <= 0xf4 ? 4 : 0;
		uint32_t cp = n == 1 ? *s : n == 2 ? *s & 0x1f
			    : n == 3 ? *s & 0x0f : *s & 0x07;

		if (!n)
			return false;
		for (unsigned i = 1; i < n; i++) {
			if ((s[i] & 0xc0) != 0x80)
				return false;
			cp = cp << 6 | (s[i] & 0x3f);
		}
		if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) ||
		    (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff)
			return false;
		s += n;
	}
	return true;
}

/* A route key is configuration (a Maildir path, ca=PATH): any bytes, cut
 * at 127 by the queue manager. Its label value must still be one that
 * Prometheus parses, or the whole scrape fails. */
Test(metrics, route_label_values)
{
	static const struct {
		const char *route, *label;
	} cases[] = {
		/* a two-byte character cut in half */
		{"maildir:/m/x\xc3", "maildir:/m/x?"},
		/* Latin-1, a surrogate, an overlong NUL, above U+10FFFF */
		{"maildir:/m/M\xfcller", "maildir:/m/M?ller"},
		{"maildir:/m/\xed\xa0\x80", "maildir:/m/???"},
		{"maildir:/m/\xc0\x80", "maildir:/m/??"},
		{"maildir:/m/\xf4\x90\x80\x80", "maildir:/m/????"},
		/* well-formed UTF-8 as it is; the text format's escapes */
		{"maildir:/m/M\xc3\xbcller", "maildir:/m/M\xc3\xbcller"},
		{"maildir:/m/\xf0\x9f\x93\xa8", "maildir:/m/\xf0\x9f\x93\xa8"},
		{"maildir:/m/a\"b\\c\nd", "maildir:/m/a\\\"b\\\\c\\nd"},
	};
	struct ctl_sources s = sources(false);

	memset(fake, 0, sizeof(fake));
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char key[300], *text = NULL;
		size_t len = 0;

		fake_route = cases[i].route;
		cr_assert_eq(metrics_render(&s, &text, &len), 0);
		fake_route = NULL;
		cr_assert(valid_utf8((const unsigned char *)text),
			  "case %zu: not UTF-8", i);
		snprintf(key, sizeof(key),
			 "finaldot_route_batches_total{route=\"%s\"}",
			 cases[i].label);
		cr_assert_eq(num(text, key), 6, "case %zu", i);
		free(text);
	}
}

Test(metrics, latency_bucket_edges)
{
	cr_assert_eq(ctl_lat_bucket(0), 0);
	cr_assert_eq(ctl_lat_bucket(50000), 0, "50 us is in the first");
	cr_assert_eq(ctl_lat_bucket(50001), 1);
	cr_assert_eq(ctl_lat_bucket(1000000), 4, "1 ms: le 0.001");
	cr_assert_eq(ctl_lat_bucket(10000000000ull), CTL_LAT_BUCKETS - 1,
		     "10 s: the last bound");
	cr_assert_eq(ctl_lat_bucket(10000000001ull), CTL_LAT_BUCKETS, "+Inf");
	for (unsigned i = 1; i < CTL_LAT_BUCKETS; i++)
		cr_assert_gt(ctl_lat_bound_us(i), ctl_lat_bound_us(i - 1));
}

Test(metrics, publish_and_load)
{
	struct ctl_worker_pub pub;
	struct ctl_worker_stats a, b;
	uint64_t *p = (uint64_t *)(void *)&a;

	for (size_t i = 0; i < sizeof(a) / sizeof(uint64_t); i++)
		p[i] = i * 1000003u + 7;
	ctl_worker_pub_store(&pub, &a);
	ctl_worker_pub_load(&pub, &b);
	cr_assert_eq(memcmp(&a, &b, sizeof(a)), 0);
}

/* Out of descriptors (EMFILE): the /metrics thread must not spin on the
 * listener that a failed accept4() leaves readable, and serves the scraper
 * once a descriptor is free again. */
Test(metrics, accept_out_of_descriptors_does_not_spin)
{
	struct ctl_sources src = sources(false);
	struct sockaddr_in sa = {.sin_family = AF_INET};
	socklen_t sl = sizeof(sa);
	struct metrics_server *m;
	struct fd_exhaust x;
	int probe, c, err = 0;
	char buf[256];
	double cpu;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	probe = socket(AF_INET, SOCK_STREAM, 0);
	cr_assert_eq(bind(probe, (struct sockaddr *)&sa, sizeof(sa)), 0);
	getsockname(probe, (struct sockaddr *)&sa, &sl);
	close(probe);
	m = metrics_start((struct sockaddr *)&sa, sizeof(sa), "test", &src,
			  NULL, &err);
	cr_assert_not_null(m, "metrics_start: %d", err);
	c = socket(AF_INET, SOCK_STREAM, 0);
	cr_assert_geq(c, 0);
	fd_exhaust_begin(&x);
	cr_assert_eq(connect(c, (struct sockaddr *)&sa, sizeof(sa)), 0);
	usleep(100000);
	cpu = fd_cpu_over(1000000);
	cr_assert_lt(cpu, 0.3, "the /metrics thread spun: %.2f s", cpu);
	fd_exhaust_end(&x);
	static const char get[] = "GET /metrics HTTP/1.0\r\n\r\n";
	cr_assert_eq(write(c, get, sizeof(get) - 1), (ssize_t)sizeof(get) - 1);
	struct timeval tv = {.tv_sec = 5};
	setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	cr_assert_gt(read(c, buf, sizeof(buf) - 1), 0, "not served");
	buf[sizeof(buf) - 1] = '\0';
	cr_assert(strncmp(buf, "HTTP/1.", 7) == 0, "%s", buf);
	close(c);
	metrics_stop(m);
}

/* The request line as the server reads it (any bytes: the network's). */
static enum metrics_req
req(const char *s, bool *head)
{
	return metrics_parse_request(s, strlen(s), head);
}

static enum metrics_req
req_n(const char *s, size_t n, bool *head)
{
	return metrics_parse_request(s, n, head);
}

Test(metrics, request_line)
{
	bool h;

	cr_assert_eq(req("GET /metrics HTTP/1.1\r\n\r\n", &h), METRICS_REQ_OK);
	cr_assert(!h);
	cr_assert_eq(req("HEAD /metrics HTTP/1.0\n\n", &h), METRICS_REQ_OK);
	cr_assert(h);
	cr_assert_eq(req("GET /metrics?x=1 HTTP/1.1\r\n", &h), METRICS_REQ_OK);
	cr_assert_eq(req("GET /metricsx HTTP/1.1\r\n", &h),
		     METRICS_REQ_NOT_FOUND);
	cr_assert_eq(req("GET /metric HTTP/1.1\r\n", &h),
		     METRICS_REQ_NOT_FOUND);
	cr_assert_eq(req("GET / HTTP/1.1\r\n", &h), METRICS_REQ_NOT_FOUND);
	cr_assert_eq(req("POST /metrics HTTP/1.1\r\n", &h),
		     METRICS_REQ_METHOD);
	cr_assert_eq(req("GETS /metrics HTTP/1.1\r\n", &h),
		     METRICS_REQ_METHOD);
	cr_assert_eq(req("get /metrics HTTP/1.1\r\n", &h), METRICS_REQ_METHOD);
	/* malformed: 400 */
	cr_assert_eq(req("GET /metrics HTTP/2.0\r\n", &h), METRICS_REQ_BAD);
	cr_assert_eq(req("GET /metrics HTTP/1.\r\n", &h), METRICS_REQ_BAD);
	cr_assert_eq(req("GET /metrics HTTP/1.11\r\n", &h), METRICS_REQ_BAD);
	cr_assert_eq(req("GET /metrics\r\n", &h), METRICS_REQ_BAD);
	cr_assert_eq(req("GET  /metrics HTTP/1.1\r\n", &h), METRICS_REQ_BAD);
	cr_assert_eq(req("GET /metrics HTTP/1.1", &h), METRICS_REQ_BAD);
	cr_assert_eq(req("\r\n", &h), METRICS_REQ_BAD);
	cr_assert_eq(req(" /metrics HTTP/1.1\r\n", &h), METRICS_REQ_BAD);
	cr_assert_eq(req("GETGETGETGETGETG /metrics HTTP/1.1\r\n", &h),
		     METRICS_REQ_BAD); /* a 16-octet method */
	cr_assert_eq(req("GETGETGETGETGET /metrics HTTP/1.1\r\n", &h),
		     METRICS_REQ_METHOD); /* 15 */
	/* NULs in the line are octets like any other, never an end */
	cr_assert_eq(req_n("GET\0 /metrics HTTP/1.1\r\n", 25, &h),
		     METRICS_REQ_METHOD);
	cr_assert_eq(req_n("GET /metrics\0x HTTP/1.1\r\n", 26, &h),
		     METRICS_REQ_NOT_FOUND);
	cr_assert_eq(req_n("GET /metrics HTTP/1.1\0x\r\n", 26, &h),
		     METRICS_REQ_BAD);
}

Test(metrics, request_target_length_limit)
{
	char line[300];
	bool h;

	/* "/metrics?" and a query up to 255 octets of target in all */
	snprintf(line, sizeof(line), "GET /metrics?%0*d HTTP/1.1\r\n",
		 255 - 9, 0);
	cr_assert_eq(req(line, &h), METRICS_REQ_OK);
	snprintf(line, sizeof(line), "GET /metrics?%0*d HTTP/1.1\r\n",
		 256 - 9, 0);
	cr_assert_eq(req(line, &h), METRICS_REQ_BAD);
}

Test(metrics, head_complete)
{
	cr_assert(metrics_head_complete("GET / HTTP/1.1\r\n\r\n", 18));
	cr_assert(metrics_head_complete("GET / HTTP/1.1\n\n", 16));
	cr_assert(metrics_head_complete("GET / HTTP/1.1\n\r\n", 17));
	cr_assert(!metrics_head_complete("GET / HTTP/1.1\r\n", 16));
	cr_assert(!metrics_head_complete("GET / HTTP/1.1\r\nA: b\r\n\r", 23));
	cr_assert(!metrics_head_complete("", 0));
	cr_assert(!metrics_head_complete("\n", 1));
	/* only the octets given count: the LF after them is not there yet */
	cr_assert(!metrics_head_complete("GET / HTTP/1.1\n\r\n", 16));
	cr_assert(!metrics_head_complete("GET / HTTP/1.1\n\n", 15));
}
