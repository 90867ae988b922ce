/*
 * Configuration: defaults, config file and flags from one option table.
 *
 * Every option appears once in `options[]` below. Its config-file key is the
 * table name; its flag is "--" + the name with '_' turned into '-'. Adding an
 * option means adding one row (and the field in struct fd_config): the file
 * parser, the flag parser, --help and --check-config follow.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "finaldot/config.h"
#include "finaldot/duration.h"
#include "finaldot/log.h"

enum opt_type {
	OPT_STR,      /* char[FD_CONFIG_STR] (or sized by .size) */
	OPT_UINT,     /* unsigned */
	OPT_SIZE,     /* uint64_t bytes, k/M/G suffix */
	OPT_U64,      /* uint64_t plain count */
	OPT_DURATION, /* uint64_t milliseconds, ms/s/m/h suffix */
	OPT_DURATION_US, /* uint64_t microseconds, us/ms/s suffix */
	OPT_LISTEN,   /* repeatable: listen[] */
	OPT_DOMAIN,   /* repeatable: domains[] */
	OPT_ROUTE,    /* repeatable: routes[] "DOMAIN=TARGET" */
	OPT_TLS_CERT, /* repeatable: tls_cert[] */
	OPT_TLS_KEY,  /* repeatable: tls_key[] */
	OPT_BOOL,     /* bool with a value: on/off, yes/no, true/false, 1/0 */
	OPT_TRANSPORT,
	OPT_LOGLEVEL,
	OPT_FLAG,     /* bool, flag only, no value */
	OPT_DPDK,     /* --dpdk: transport = dpdk, flag only */
	OPT_CONFIG,   /* --config FILE */
};

struct opt {
	const char *name;
	const char *alias; /* a second flag name (flags only), or NULL */
	enum opt_type type;
	size_t off;
	size_t size; /* OPT_STR: buffer size */
	const char *arg;
	const char *help;
};

#define F(field) offsetof(struct fd_config, field)
#define S(field) sizeof(((struct fd_config *)0)->field)

static const struct opt options[] = {
	{"config", NULL, OPT_CONFIG, F(config_file), S(config_file), "FILE",
	 "read settings from FILE (\"key = value\" lines); flags override it"},
	{"listen", NULL, OPT_LISTEN, 0, 0, "ADDR:PORT",
	 "listen on ADDR:PORT, repeatable; [::1]:25 for IPv6, :25 for all "
	 "IPv4 (default 127.0.0.1:2525)"},
	{"accept_domain", NULL, OPT_DOMAIN, 0, 0, "DOMAIN",
	 "accept mail for DOMAIN, repeatable; any other recipient domain gets "
	 "550 5.7.1 (default localhost)"},
	{"spool", NULL, OPT_STR, F(spool_dir), S(spool_dir), "DIR",
	 "spool directory, made if missing (default ./var/spool)"},
	{"threads", NULL, OPT_UINT, F(threads), 0, "N",
	 "worker threads, each with its own sessions and spool (default: one "
	 "per online CPU)"},
	{"hostname", NULL, OPT_STR, F(hostname), S(hostname), "NAME",
	 "our name in the greeting and Received headers (default: "
	 "gethostname())"},
	{"transport", NULL, OPT_TRANSPORT, F(transport), 0, "kernel|dpdk",
	 "network transport (default kernel)"},
	{"max_message_size", NULL, OPT_SIZE, F(max_message_size), 0, "BYTES",
	 "largest message accepted, advertised as SIZE (default 32M)"},
	{"max_recipients", NULL, OPT_UINT, F(max_recipients), 0, "N",
	 "recipients per message; more get 452 4.5.3 (default 100)"},
	{"max_errors", NULL, OPT_UINT, F(max_errors), 0, "N",
	 "bad commands before 421 and disconnect (default 20)"},
	{"max_connections", NULL, OPT_UINT, F(max_connections), 0, "N",
	 "concurrent sessions per worker; more get 421 4.7.0 (default 4096)"},
	{"idle_timeout", NULL, OPT_DURATION, F(idle_timeout_ms), 0, "DURATION",
	 "close a session that sent nothing for DURATION with 421 4.4.2 "
	 "(default 300s)"},
	{"command_timeout", NULL, OPT_DURATION, F(command_timeout_ms), 0,
	 "DURATION",
	 "a command line must be complete within DURATION of its first octet, "
	 "or 421 4.4.2 (RFC 5321 4.5.3.2; stops clients that trickle a byte "
	 "at a time; 0: no limit; default 300s)"},
	{"data_timeout", NULL, OPT_DURATION, F(data_timeout_ms), 0, "DURATION",
	 "a message's data (DATA or BDAT chunks) must be complete within "
	 "DURATION of its start, or 421 4.4.2 (0: no limit; default 600s)"},
	{"greet_delay", NULL, OPT_DURATION, F(greet_delay_ms), 0, "DURATION",
	 "wait DURATION before the 220 greeting; clients that talk first are "
	 "rejected with 554 (default 0: greet at once)"},
	{"shutdown_timeout", NULL, OPT_DURATION, F(shutdown_timeout_ms), 0,
	 "DURATION",
	 "on SIGTERM, wait at most DURATION for sessions to end (default 10s)"},
	{"tls_cert", NULL, OPT_TLS_CERT, 0, 0, "FILE",
	 "PEM certificate chain for STARTTLS, repeatable, paired by position "
	 "with --tls-key (an ECDSA and an RSA pair for one name serve "
	 "together; other names are chosen by SNI, the first is the "
	 "default); without one STARTTLS is not offered"},
	{"tls_key", NULL, OPT_TLS_KEY, 0, 0, "FILE",
	 "PEM private key of the --tls-cert at the same position"},
	{"tls_ciphers", NULL, OPT_STR, F(tls_ciphers), S(tls_ciphers),
	 "LIST", "TLS 1.2 cipher list in OpenSSL syntax (default OpenSSL's)"},
	{"tls_min_version", NULL, OPT_STR, F(tls_min_version),
	 S(tls_min_version), "1.2|1.3", "lowest TLS version (default 1.2)"},
	{"tls_required", NULL, OPT_BOOL, F(tls_required), 0, "on|off",
	 "answer MAIL before STARTTLS with 530 5.7.0 (default off: a public "
	 "MX should not require it, RFC 3207 4)"},
	{"tls_handshake_timeout", NULL, OPT_DURATION,
	 F(tls_handshake_timeout_ms), 0, "DURATION",
	 "a TLS handshake must be done within this (default 30s)"},
	{"tls_max_handshakes", NULL, OPT_UINT, F(tls_max_handshakes), 0, "N",
	 "TLS handshakes running at once per worker; more wait their turn "
	 "(default 32)"},
	{"tls_ticket_lifetime", NULL, OPT_DURATION, F(tls_ticket_lifetime_ms),
	 0, "DURATION",
	 "session-ticket keys rotate this often; a ticket under the "
	 "previous key still resumes (default 12h)"},
	{"segment_size", NULL, OPT_SIZE, F(segment_size), 0, "BYTES",
	 "spool segment file size, multiple of 4096 (default 64M)"},
	{"batch_size", NULL, OPT_SIZE, F(batch_size), 0, "BYTES",
	 "a spool batch closes at this size (default 256k, at most 256m)"},
	{"batches", NULL, OPT_UINT, F(batches), 0, "N",
	 "spool batch buffers per worker, bounds writes in flight "
	 "(default 32)"},
	{"flush_inflight", NULL, OPT_UINT, F(flush_inflight), 0, "N",
	 "group commit: while N durable writes are in flight, arriving "
	 "messages wait to share the next one (default 1)"},
	{"spool_sync", NULL, OPT_STR, F(spool_sync), S(spool_sync),
	 "auto|dsync|fdatasync",
	 "how a spool write is made durable: RWF_DSYNC on the write, or a "
	 "linked fdatasync after it; auto: fdatasync where the spool's disk "
	 "has no FUA, dsync otherwise (default auto)"},
	{"spool_prepare", NULL, OPT_STR, F(spool_prepare), S(spool_prepare),
	 "auto|zero|fallocate",
	 "how a new spool segment is made: zeros over the whole file (each "
	 "later write an overwrite), or fallocate (unwritten extents, no "
	 "zeros: the first write into each block also updates the extent "
	 "tree); auto: fallocate on ext4 without a journal, zero otherwise "
	 "(default auto)"},
	{"spare_segments", NULL, OPT_UINT, F(spare_segments), 0, "N",
	 "segments kept ready per worker (default 2)"},
	{"max_segments", NULL, OPT_U64, F(max_segments), 0, "N",
	 "segments per worker, 0 = until the disk is full; then 452 4.3.1 "
	 "(default 0)"},
	{"spool_min_free", NULL, OPT_SIZE, F(spool_min_free), 0, "BYTES",
	 "no new spool segment while the spool's filesystem has less than "
	 "this free (at most a tenth of its size): new mail gets 452 4.3.1 "
	 "and the room left is the delivery log's, so that delivery goes on "
	 "and frees space (0: none; default 1G)"},
	{"route", NULL, OPT_ROUTE, 0, 0, "DOMAIN=TARGET",
	 "deliver mail for DOMAIN to TARGET, repeatable; TARGET is "
	 "smtp:HOST:PORT, lmtp:HOST:PORT, lmtp:unix:PATH or maildir:DIR"},
	{"relay", NULL, OPT_STR, F(relay), S(relay), "TARGET",
	 "deliver mail for every accepted domain without its own route to "
	 "TARGET (default: maildir:./var/maildir when no route is given; "
	 "with --route and no --relay, every accepted domain needs a route)"},
	{"bounce_relay", NULL, OPT_STR, F(bounce_relay), S(bounce_relay),
	 "TARGET",
	 "send DSNs (bounces) for senders outside the accepted domains to "
	 "TARGET; without it such bounces are logged and dropped"},
	{"recipients", NULL, OPT_STR, F(recipients), S(recipients), "FILE",
	 "valid recipients, one user@domain or @domain per line; others get "
	 "550 5.1.1 at RCPT (default: every local part is accepted)"},
	{"delivery", NULL, OPT_BOOL, F(delivery), 0, "on|off",
	 "deliver queued mail (default on; off only queues, for maintenance "
	 "and benchmarks)"},
	{"delivery_threads", NULL, OPT_UINT, F(delivery_threads), 0, "N",
	 "delivery threads, each with at most one connection (default 32)"},
	{"delivery_nice", NULL, OPT_UINT, F(delivery_nice), 0, "N",
	 "run the delivery threads and the delivery log's writer N nice "
	 "steps (0-19) below the daemon; above 0 they give the CPUs to "
	 "acceptance when both want them, and the queue absorbs the "
	 "difference (default 0)"},
	{"dest_concurrency", NULL, OPT_UINT, F(dest_concurrency), 0, "N",
	 "connections to one next hop at once, at most, each carrying up "
	 "to 16 pipelined messages; starts at 5 and grows with success "
	 "(default 20)"},
	{"retry_min", NULL, OPT_DURATION, F(retry_min_ms), 0, "DURATION",
	 "first retry after a temporary failure; doubles per attempt "
	 "(default 300s)"},
	{"retry_max", NULL, OPT_DURATION, F(retry_max_ms), 0, "DURATION",
	 "longest wait between retries (default 4000s)"},
	{"move_after", NULL, OPT_DURATION, F(move_after_ms), 0, "DURATION",
	 "a message still queued in a spool segment that was full this long "
	 "ago is copied to spool/moved/, so that deferred mail does not keep "
	 "whole segments on disk (default 60s)"},
	{"queue_lifetime", NULL, OPT_DURATION, F(queue_lifetime_ms), 0,
	 "DURATION",
	 "a recipient still undelivered after DURATION is bounced (default "
	 "5d)"},
	{"smtp_connect_timeout", NULL, OPT_DURATION,
	 F(smtp_connect_timeout_ms), 0, "DURATION",
	 "delivery: connecting to a next hop (default 30s)"},
	{"smtp_timeout", NULL, OPT_DURATION, F(smtp_timeout_ms), 0,
	 "DURATION",
	 "delivery: each reply from a next hop (RFC 5321 4.5.3.2; default "
	 "300s)"},
	{"smtp_data_timeout", NULL, OPT_DURATION, F(smtp_data_timeout_ms), 0,
	 "DURATION",
	 "delivery: the reply to the final dot (default 600s)"},
	{"smtp_tls", NULL, OPT_STR, F(smtp_tls), S(smtp_tls),
	 "none|may|encrypt|verify",
	 "STARTTLS to next hops whose route has no tls= of its own: may "
	 "uses it when offered (default), encrypt defers without it, verify "
	 "also checks the certificate and the host name"},
	{"smtp_tls_ca", NULL, OPT_STR, F(smtp_tls_ca), S(smtp_tls_ca), "FILE",
	 "PEM CA certificates for verify (default: the system store)"},
	{"verify_recipients", NULL, OPT_BOOL, F(verify_recipients), 0,
	 "on|off",
	 "without --recipients, ask the route's next hop at RCPT time "
	 "(MAIL FROM:<>, RCPT TO, RSET) whether it takes the address; "
	 "unknown users get 550 5.1.1, a first or undecided answer 450 4.1.1 "
	 "while the probe runs (default off)"},
	{"verify_positive_ttl", NULL, OPT_DURATION, F(verify_positive_ttl_ms),
	 0, "DURATION", "how long a valid answer is kept (default 7d)"},
	{"verify_negative_ttl", NULL, OPT_DURATION, F(verify_negative_ttl_ms),
	 0, "DURATION", "how long an unknown-user answer is kept (default 3h)"},
	{"verify_timeout", NULL, OPT_DURATION, F(verify_timeout_ms), 0,
	 "DURATION",
	 "a probe waits this long at most for its next hop: connect, "
	 "greeting, each reply (default 30s; the route's own timeouts when "
	 "they are shorter)"},
	{"dedup_window", NULL, OPT_DURATION, F(dedup_window_ms), 0, "DURATION",
	 "RFC 1047: remember a message whose 250 may not have reached its "
	 "client this long, and deliver a resend of it once (default 24h; "
	 "0 turns it off)"},
	{"dedup_settle", NULL, OPT_DURATION, F(dedup_settle_ms), 0, "DURATION",
	 "hold such a message back this long (never longer) so that a quick "
	 "resend is matched before it goes out (default 3m)"},
	{"dlog_rotate", NULL, OPT_SIZE, F(dlog_rotate), 0, "BYTES",
	 "the delivery log is compacted past this size (default 64M)"},
	{"dpdk", NULL, OPT_DPDK, 0, 0, NULL,
	 "same as --transport dpdk"},
	{"dpdk_eal", "eal", OPT_STR, F(dpdk_eal), S(dpdk_eal), "\"ARGS\"",
	 "DPDK EAL arguments (transport dpdk)"},
	{"dpdk_ip", "ip", OPT_STR, F(dpdk_ip), S(dpdk_ip), "ADDR/PREFIX",
	 "our IPv4 address on the DPDK port (transport dpdk)"},
	{"dpdk_gateway", "gateway", OPT_STR, F(dpdk_gateway), S(dpdk_gateway), "ADDR",
	 "IPv4 next hop for off-link peers (transport dpdk)"},
	{"dpdk_offloads", NULL, OPT_STR, F(dpdk_offloads), S(dpdk_offloads),
	 "auto|none|ip|l4|all",
	 "checksum offloads to use where the port offers them; none computes "
	 "every checksum in software (default auto = all offered)"},
	{"dpdk_idle_sleep", NULL, OPT_DURATION_US, F(dpdk_idle_sleep_us), 0,
	 "DURATION",
	 "sleep this long when a poll loop found nothing to do 100 times in a "
	 "row, giving the core back to the kernel; for shared or small "
	 "machines (default 0: poll without pause, the lowest latency on "
	 "dedicated cores)"},
	{"log_file", NULL, OPT_STR, F(log_file), S(log_file), "PATH",
	 "write the log to PATH (appended) instead of stderr; SIGUSR1 "
	 "reopens it (logrotate); keep it off the spool's filesystem"},
	{"log_level", NULL, OPT_LOGLEVEL, F(log_level), 0, "LEVEL",
	 "error, warn, info or debug (default info)"},
	{"control", NULL, OPT_STR, F(control), S(control), "PATH",
	 "the control socket finaldotctl talks to, mode 0600 (default: "
	 "control.sock beside the spool directory, ./var/control.sock; off: "
	 "none)"},
	{"control_group", NULL, OPT_STR, F(control_group), S(control_group),
	 "GROUP",
	 "members of GROUP may use the control socket too (mode 0660; "
	 "default: its owner only)"},
	{"metrics", NULL, OPT_STR, F(metrics), S(metrics), "ADDR:PORT",
	 "serve Prometheus metrics at http://ADDR:PORT/metrics, e.g. "
	 "127.0.0.1:9125 (default off; use a loopback address unless the "
	 "network is trusted)"},
	{"check_config", NULL, OPT_FLAG, F(check), 0, NULL,
	 "check what a start would (the spool is writable and not in use, "
	 "the listen addresses can be bound, the control socket and "
	 "/metrics), print the effective configuration and exit; 1 on a "
	 "problem"},
	{"version", NULL, OPT_FLAG, F(version), 0, NULL, "print the version and exit"},
	{"help", NULL, OPT_FLAG, F(help), 0, NULL, "print this help and exit"},
};

void
fd_config_defaults(struct fd_config *c)
{
	memset(c, 0, sizeof(*c));
	c->transport = FD_TRANSPORT_KERNEL;
	c->threads = 0;
	if (gethostname(c->hostname, sizeof(c->hostname) - 1) != 0 ||
	    c->hostname[0] == '\0')
		strcpy(c->hostname, "localhost");
	c->max_message_size = 32u << 20;
	c->max_recipients = 100;
	c->max_errors = 20;
	c->max_connections = 4096;
	c->idle_timeout_ms = 300000;
	c->command_timeout_ms = 300000;
	c->data_timeout_ms = 600000;
	c->greet_delay_ms = 0;
	c->shutdown_timeout_ms = 10000;
	strcpy(c->tls_min_version, "1.2");
	strcpy(c->smtp_tls, "may");
	c->verify_positive_ttl_ms = 7ull * 86400000;
	c->verify_negative_ttl_ms = 3ull * 3600000;
	c->verify_timeout_ms = 30000;
	c->tls_handshake_timeout_ms = 30000;
	c->tls_max_handshakes = 32;
	c->tls_ticket_lifetime_ms = 12ull * 3600000;
	strcpy(c->spool_dir, "./var/spool");
	c->segment_size = 64u << 20;
	c->batch_size = 256u << 10;
	c->batches = 32;
	c->flush_inflight = 1;
	strcpy(c->spool_sync, "auto");
	strcpy(c->spool_prepare, "auto");
	c->spare_segments = 2;
	c->max_segments = 0;
	c->spool_min_free = 1ull << 30;
	c->log_level = FD_LOG_INFO;
	strcpy(c->dpdk_offloads, "auto");
	c->delivery = true;
	c->delivery_threads = 32;
	c->dest_concurrency = 20;
	c->retry_min_ms = 300000;
	c->move_after_ms = 60000;
	c->retry_max_ms = 4000000;
	c->queue_lifetime_ms = 5ull * 86400000;
	c->smtp_connect_timeout_ms = 30000;
	c->smtp_timeout_ms = 300000;
	c->smtp_data_timeout_ms = 600000;
	c->dlog_rotate = 64u << 20;
	c->dedup_window_ms = 24ull * 3600000;
	c->dedup_settle_ms = 180000;
}

int
fd_config_parse_listen(const char *s, struct fd_listen *l)
{
	char host[64];
	const char *port_s;
	size_t hlen;
	char *end;
	unsigned long port;

	memset(l, 0, sizeof(*l));
	if (s[0] == '[') {
		const char *rb = strchr(s, ']');
		if (!rb || rb[1] != ':')
			return -EINVAL;
		hlen = (size_t)(rb - s - 1);
		if (hlen >= sizeof(host))
			return -EINVAL;
		memcpy(host, s + 1, hlen);
		host[hlen] = '\0';
		port_s = rb + 2;
	} else {
		const char *colon = strrchr(s, ':');
		if (!colon || strchr(s, ':') != colon)
			return -EINVAL;
		hlen = (size_t)(colon - s);
		if (hlen >= sizeof(host))
			return -EINVAL;
		memcpy(host, s, hlen);
		host[hlen] = '\0';
		port_s = colon + 1;
	}
	errno = 0;
	port = strtoul(port_s, &end, 10);
	if (errno || *port_s == '\0' || *end != '\0' || port == 0 ||
	    port > 65535)
		return -EINVAL;
	if (s[0] == '[') {
		struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&l->addr;
		a6->sin6_family = AF_INET6;
		a6->sin6_port = htons((uint16_t)port);
		if (inet_pton(AF_INET6, host, &a6->sin6_addr) != 1)
			return -EINVAL;
		l->addrlen = sizeof(*a6);
	} else {
		struct sockaddr_in *a4 = (struct sockaddr_in *)&l->addr;
		a4->sin_family = AF_INET;
		a4->sin_port = htons((uint16_t)port);
		if (host[0] == '\0')
			a4->sin_addr.s_addr = htonl(INADDR_ANY);
		else if (inet_pton(AF_INET, host, &a4->sin_addr) != 1)
			return -EINVAL;
		l->addrlen = sizeof(*a4);
	}
	snprintf(l->text, sizeof(l->text), "%s", s);
	return 0;
}

static int
parse_u64(const char *v, uint64_t *out, int kind)
{
	char *end;
	uint64_t n, mul = 1;

	if (kind == OPT_DURATION)
		return fd_parse_duration_ms(v, out) ? 0 : -EINVAL;
	if (!isdigit((unsigned char)v[0]))
		return -EINVAL;
	errno = 0;
	n = strtoull(v, &end, 10);
	if (errno)
		return -EINVAL;
	if (kind == OPT_SIZE) {
		if (*end == 'k' || *end == 'K')
			mul = 1u << 10, end++;
		else if (*end == 'm' || *end == 'M')
			mul = 1u << 20, end++;
		else if (*end == 'g' || *end == 'G')
			mul = 1u << 30, end++;
		if (*end == 'B' || *end == 'b')
			end++;
	} else if (kind == OPT_DURATION_US) {
		if (strcmp(end, "us") == 0)
			mul = 1, end += 2;
		else if (strcmp(end, "ms") == 0)
			mul = 1000, end += 2;
		else if (*end == 's')
			mul = 1000000, end++;
		else if (*end == '\0')
			mul = 1;
	}
	if (*end != '\0' || (n != 0 && mul > UINT64_MAX / n))
		return -EINVAL;
	*out = n * mul;
	return 0;
}

static bool
name_is(const char *o, const char *name, size_t len)
{
	if (!o || strlen(o) != len)
		return false;
	for (size_t j = 0; j < len; j++) {
		char c = name[j] == '-' ? '_' : name[j];
		if (c != o[j])
			return false;
	}
	return true;
}

/* By name; with flag set, aliases count too (they are flags only). */
static const struct opt *
find_opt(const char *name, size_t len, bool flag)
{
	for (size_t i = 0; i < sizeof(options) / sizeof(options[0]); i++)
		if (name_is(options[i].name, name, len) ||
		    (flag && name_is(options[i].alias, name, len)))
			return &options[i];
	return NULL;
}

/* Lists given on the command line replace the file's (and the defaults). */
struct list_state {
	bool listen_reset;
	bool domain_reset;
	bool route_reset;
	bool tls_cert_reset;
	bool tls_key_reset;
};

static int
add_tls_file(char (*list)[FD_CONFIG_STR], unsigned *n, bool *reset,
	     const char *v, const char *name, FILE *err, const char *where)
{
	if (reset && !*reset) {
		*n = 0;
		*reset = true;
	}
	if (v[0] == '\0')
		return 0; /* "tls_cert =": none (the default) */
	if (*n >= FD_CONFIG_MAX_TLS || strlen(v) >= FD_CONFIG_STR) {
		fprintf(err, "%s: %s: too long, or more than %d\n",
			where, name, FD_CONFIG_MAX_TLS);
		return -EINVAL;
	}
	strcpy(list[(*n)++], v);
	return 0;
}

static int
apply(struct fd_config *c, const struct opt *o, const char *v,
      struct list_state *ls, FILE *err, const char *where)
{
	char *base = (char *)c;
	uint64_t n;
	int r = 0;

	switch (o->type) {
	case OPT_CONFIG:
	case OPT_STR:
		if (strlen(v) >= o->size) {
			fprintf(err, "%s: %s: value too long\n", where, o->name);
			return -EINVAL;
		}
		strcpy(base + o->off, v);
		return 0;
	case OPT_UINT:
		r = parse_u64(v, &n, OPT_U64);
		if (r == 0 && n > UINT_MAX)
			r = -EINVAL;
		if (r == 0)
			*(unsigned *)(void *)(base + o->off) = (unsigned)n;
		break;
	case OPT_SIZE:
	case OPT_U64:
	case OPT_DURATION:
	case OPT_DURATION_US:
		r = parse_u64(v, &n, o->type);
		/* ms are used as ms * 1000 us, added to clocks: no wrap */
		if (r == 0 && o->type == OPT_DURATION && n > UINT64_MAX / 4000)
			r = -EINVAL;
		if (r == 0)
			*(uint64_t *)(void *)(base + o->off) = n;
		break;
	case OPT_LISTEN:
		if (ls && !ls->listen_reset) {
			c->n_listen = 0;
			ls->listen_reset = true;
		}
		if (c->n_listen >= FD_CONFIG_MAX_LISTEN) {
			fprintf(err, "%s: too many listen addresses (max %d)\n",
				where, FD_CONFIG_MAX_LISTEN);
			return -EINVAL;
		}
		r = fd_config_parse_listen(v, &c->listen[c->n_listen]);
		if (r == 0)
			c->n_listen++;
		break;
	case OPT_DOMAIN:
		if (ls && !ls->domain_reset) {
			c->n_domains = 0;
			ls->domain_reset = true;
		}
		if (c->n_domains >= FD_CONFIG_MAX_DOMAINS ||
		    strlen(v) >= FD_CONFIG_STR || v[0] == '\0') {
			fprintf(err, "%s: bad or too many accept domains\n",
				where);
			return -EINVAL;
		}
		strcpy(c->domains[c->n_domains++], v);
		break;
	case OPT_ROUTE:
		if (ls && !ls->route_reset) {
			c->n_routes = 0;
			ls->route_reset = true;
		}
		if (c->n_routes >= FD_CONFIG_MAX_ROUTES ||
		    strlen(v) >= sizeof(c->routes[0]) || !strchr(v, '=')) {
			fprintf(err, "%s: route: expected DOMAIN=TARGET (at "
				"most %d routes)\n",
				where, FD_CONFIG_MAX_ROUTES);
			return -EINVAL;
		}
		strcpy(c->routes[c->n_routes++], v);
		break;
	case OPT_TLS_CERT:
		return add_tls_file(c->tls_cert, &c->n_tls_cert,
				    ls ? &ls->tls_cert_reset : NULL, v,
				    o->name, err, where);
	case OPT_TLS_KEY:
		return add_tls_file(c->tls_key, &c->n_tls_key,
				    ls ? &ls->tls_key_reset : NULL, v, o->name,
				    err, where);
	case OPT_BOOL: {
		static const char *yes[] = {"on", "yes", "true", "1"};
		static const char *no[] = {"off", "no", "false", "0"};
		r = -EINVAL;
		for (int i = 0; i < 4; i++) {
			if (strcmp(v, yes[i]) == 0) {
				*(bool *)(void *)(base + o->off) = true;
				r = 0;
			}
			if (strcmp(v, no[i]) == 0) {
				*(bool *)(void *)(base + o->off) = false;
				r = 0;
			}
		}
		break;
	}
	case OPT_TRANSPORT:
		if (strcmp(v, "kernel") == 0)
			c->transport = FD_TRANSPORT_KERNEL;
		else if (strcmp(v, "dpdk") == 0)
			c->transport = FD_TRANSPORT_DPDK;
		else
			r = -EINVAL;
		break;
	case OPT_LOGLEVEL: {
		static const char *names[] = {"error", "warn", "info",
					      "debug"};
		r = -EINVAL;
		for (int i = 0; i < 4; i++)
			if (strcmp(v, names[i]) == 0) {
				c->log_level = i;
				r = 0;
			}
		break;
	}
	case OPT_FLAG:
		*(bool *)(void *)(base + o->off) = true;
		break;
	case OPT_DPDK:
		c->transport = FD_TRANSPORT_DPDK;
		break;
	}
	if (r)
		fprintf(err, "%s: %s: bad value \"%s\"\n", where, o->name, v);
	return r;
}

static char *
trim(char *s)
{
	char *e;

	while (isspace((unsigned char)*s))
		s++;
	e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = '\0';
	return s;
}

/*
 * A config file is a regular file (or a pipe, /dev/stdin) of text lines.
 * A directory reads as empty on some systems and fails with EISDIR on
 * others: either way it is an error, as is a read error midway and a NUL
 * octet (it would silently cut the line short: "listen = a\0b").
 */
static int
parse_file(struct fd_config *c, const char *path, struct list_state *file_ls,
	   FILE *err)
{
	FILE *f = fopen(path, "r");
	char *line = NULL, where[FD_CONFIG_STR + 32];
	size_t cap = 0;
	ssize_t got;
	unsigned lineno = 0;
	struct stat st;
	int r = 0;

	if (!f) {
		r = -errno;
		fprintf(err, "%s: %s\n", path, strerror(-r));
		return r;
	}
	if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
		fprintf(err, "%s: %s\n", path, strerror(EISDIR));
		fclose(f);
		return -EISDIR;
	}
	while ((got = getline(&line, &cap, f)) > 0) {
		char *hash, *eq, *key, *val;
		const struct opt *o;
		lineno++;
		snprintf(where, sizeof(where), "%s:%u", path, lineno);
		if (memchr(line, '\0', (size_t)got)) {
			fprintf(err, "%s: NUL octet in the line\n", where);
			r = -EINVAL;
			break;
		}
		/* A comment starts at a '#' outside double quotes: a quoted
		 * value may hold one (a path, a route's CA file), and
		 * --check-config's dump quotes every value. */
		bool quoted = false;
		for (hash = line; *hash; hash++) {
			if (*hash == '"')
				quoted = !quoted;
			else if (*hash == '#' && !quoted)
				break;
		}
		*hash = '\0';
		key = trim(line);
		if (*key == '\0')
			continue;
		eq = strchr(key, '=');
		if (!eq) {
			fprintf(err, "%s: expected \"key = value\"\n", where);
			r = -EINVAL;
			break;
		}
		*eq = '\0';
		val = trim(eq + 1);
		key = trim(key);
		o = find_opt(key, strlen(key), false);
		if (!o || o->type == OPT_FLAG || o->type == OPT_CONFIG ||
		    o->type == OPT_DPDK) {
			fprintf(err, "%s: unknown setting \"%s\"\n", where, key);
			r = -EINVAL;
			break;
		}
		/* Strip one pair of double quotes around a value. */
		size_t vl = strlen(val);
		if (vl >= 2 && val[0] == '"' && val[vl - 1] == '"') {
			val[vl - 1] = '\0';
			val++;
		}
		if ((r = apply(c, o, val, file_ls, err, where)) != 0)
			break;
	}
	if (r == 0 && ferror(f)) {
		r = errno ? -errno : -EIO;
		fprintf(err, "%s: read error after line %u: %s\n", path,
			lineno, strerror(-r));
	}
	free(line);
	fclose(f);
	return r;
}

int
fd_config_parse_file(struct fd_config *c, const char *path, FILE *err)
{
	struct list_state ls = {0};

	return parse_file(c, path, &ls, err);
}

int
fd_config_parse_args(struct fd_config *c, int argc, char **argv, FILE *err)
{
	struct list_state file_ls = {0}, arg_ls = {0};
	int r;

	/* The config file first, wherever --config stands. */
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (strncmp(a, "--config=", 9) == 0)
			r = parse_file(c, a + 9, &file_ls, err);
		else if (strcmp(a, "--config") == 0 && i + 1 < argc)
			r = parse_file(c, argv[++i], &file_ls, err);
		else
			continue;
		if (r)
			return -EINVAL;
	}
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *val = NULL, *eq;
		const struct opt *o;
		size_t len;

		if (strncmp(a, "--", 2) != 0) {
			fprintf(err, "unexpected argument \"%s\" (see --help)\n",
				a);
			return -EINVAL;
		}
		a += 2;
		eq = strchr(a, '=');
		len = eq ? (size_t)(eq - a) : strlen(a);
		o = find_opt(a, len, true);
		if (!o) {
			fprintf(err, "unknown option \"%s\" (see --help)\n",
				argv[i]);
			return -EINVAL;
		}
		if (o->type == OPT_FLAG || o->type == OPT_DPDK) {
			if (eq) {
				fprintf(err, "--%s takes no value\n", o->name);
				return -EINVAL;
			}
		} else if (eq) {
			val = eq + 1;
		} else if (i + 1 < argc) {
			val = argv[++i];
		} else {
			fprintf(err, "%s needs a value (%s)\n", argv[i],
				o->arg);
			return -EINVAL;
		}
		if (o->type == OPT_CONFIG)
			continue; /* done above */
		if (apply(c, o, val ? val : "", &arg_ls, err, "command line"))
			return -EINVAL;
	}
	if (c->n_listen == 0) {
		fd_config_parse_listen("127.0.0.1:2525", &c->listen[0]);
		c->n_listen = 1;
	}
	if (c->n_domains == 0) {
		strcpy(c->domains[0], "localhost");
		c->n_domains = 1;
	}
	if (c->segment_size % 4096 || c->segment_size < (1u << 20)) {
		fprintf(err, "segment_size must be a multiple of 4096 and at "
			     "least 1M\n");
		return -EINVAL;
	}
	/* A batch's DATA record must stay under SPOOL_REC_MAX (1 GiB),
	 * which readers refuse past, and one write under the kernel's 2 GiB
	 * cap: 256 MiB is far above any batch worth gathering. */
	if (c->batch_size < 4096 || c->batch_size * 2 > c->segment_size ||
	    c->batch_size > (256u << 20)) {
		fprintf(err, "batch_size must be at least 4k and at most half "
			     "of segment_size and 256m\n");
		return -EINVAL;
	}
	if (c->batches < 2 || c->flush_inflight == 0 ||
	    c->flush_inflight > c->batches || c->max_connections == 0 ||
	    c->max_recipients == 0) {
		fprintf(err, "batches must be >= 2, flush_inflight between 1 "
			     "and batches, max_connections and max_recipients "
			     ">= 1\n");
		return -EINVAL;
	}
	if (c->delivery_nice > 19) {
		fprintf(err, "delivery_nice must be between 0 and 19\n");
		return -EINVAL;
	}
	if (strcmp(c->spool_sync, "auto") && strcmp(c->spool_sync, "dsync") &&
	    strcmp(c->spool_sync, "fdatasync")) {
		fprintf(err, "spool_sync must be auto, dsync or fdatasync\n");
		return -EINVAL;
	}
	if (strcmp(c->spool_prepare, "auto") &&
	    strcmp(c->spool_prepare, "zero") &&
	    strcmp(c->spool_prepare, "fallocate")) {
		fprintf(err, "spool_prepare must be auto, zero or fallocate\n");
		return -EINVAL;
	}
	if (strcmp(c->dpdk_offloads, "auto") && strcmp(c->dpdk_offloads, "none") &&
	    strcmp(c->dpdk_offloads, "ip") && strcmp(c->dpdk_offloads, "l4") &&
	    strcmp(c->dpdk_offloads, "all")) {
		fprintf(err, "dpdk_offloads must be auto, none, ip, l4 or all\n");
		return -EINVAL;
	}
	if (c->n_tls_cert != c->n_tls_key) {
		fprintf(err, "tls_cert and tls_key come in pairs: %u "
			     "certificates, %u keys\n",
			c->n_tls_cert, c->n_tls_key);
		return -EINVAL;
	}
	if (strcmp(c->tls_min_version, "1.2") &&
	    strcmp(c->tls_min_version, "1.3")) {
		fprintf(err, "tls_min_version must be 1.2 or 1.3\n");
		return -EINVAL;
	}
	if (c->tls_max_handshakes == 0 || c->tls_handshake_timeout_ms == 0) {
		fprintf(err, "tls_max_handshakes and tls_handshake_timeout "
			     "must be above 0\n");
		return -EINVAL;
	}
	if (c->tls_required && c->n_tls_cert == 0) {
		fprintf(err, "tls_required needs a --tls-cert/--tls-key "
			     "pair\n");
		return -EINVAL;
	}
	if (c->threads > 255) {
		fprintf(err, "threads must be at most 255\n");
		return -EINVAL;
	}
	if (c->metrics[0] && strcmp(c->metrics, "off") != 0 &&
	    fd_config_parse_listen(c->metrics, &c->metrics_addr) != 0) {
		fprintf(err, "metrics: expected ADDR:PORT (127.0.0.1:9125, "
			     "[::1]:9125), got \"%s\"\n", c->metrics);
		return -EINVAL;
	}
	if (c->control[0] == '\0') {
		/* Beside the spool: ./var/spool gives ./var/control.sock,
		 * and two daemons never share one (they cannot share a
		 * spool). Too long a path: none (the start logs it). */
		const char *sl = strrchr(c->spool_dir, '/');
		int n = sl ? (int)(sl - c->spool_dir) : 0;
		c->control_derived = true;
		if (snprintf(c->control, sizeof(c->control), "%.*s%scontrol.sock",
			     n, c->spool_dir, sl ? "/" : "") >=
		    (int)sizeof(c->control))
			strcpy(c->control, "off");
	}
	return 0;
}

/* "  FLAG  help text", the text wrapped at 79 columns under column 33. */
static void
print_wrapped(FILE *out, const char *flag, const char *text)
{
	const int indent = 33, width = 79;
	int col = fprintf(out, "  %s", flag);

	if (col >= indent) {
		fputc('\n', out);
		col = 0;
	}
	fprintf(out, "%*s", indent - col, "");
	col = indent;
	while (*text) {
		size_t w = strcspn(text, " ");
		if (col > indent && col + 1 + (int)w > width) {
			fprintf(out, "\n%*s", indent, "");
			col = indent;
		} else if (col > indent) {
			fputc(' ', out);
			col++;
		}
		fwrite(text, 1, w, out);
		col += (int)w;
		text += w;
		while (*text == ' ')
			text++;
	}
	fputc('\n', out);
}

void
fd_config_usage(FILE *out, const char *prog)
{
	fprintf(out,
		"Usage: %s [OPTION]...\n"
		"finaldot: an SMTP acceptor that answers 250 to the final dot "
		"only once the\nmessage is durable on disk (RFC 1047), "
		"batching many messages per write.\n\n"
		"Every option can also be set in the config file as "
		"\"name = value\", with\nthe name spelled with underscores "
		"(max_message_size = 10M).\nSizes take k/M/G; durations take "
		"ms/s/m/h (plain numbers are seconds).\n\n",
		prog);
	for (size_t i = 0; i < sizeof(options) / sizeof(options[0]); i++) {
		const struct opt *o = &options[i];
		char flag[64];
		size_t k;
		snprintf(flag, sizeof(flag), "--%s", o->name);
		for (k = 2; flag[k]; k++)
			if (flag[k] == '_')
				flag[k] = '-';
		if (o->alias)
			k += (size_t)snprintf(flag + k, sizeof(flag) - k,
					      ", --%s", o->alias);
		if (o->arg)
			snprintf(flag + k, sizeof(flag) - k, " %s", o->arg);
		print_wrapped(out, flag, o->help);
	}
	fprintf(out,
		"\nSignals: SIGTERM/SIGINT stop accepting, let commits in "
		"flight finish (their\n250s go out), answer 421 to open "
		"sessions and exit 0. SIGHUP asks for a reload\n"
		"(as finaldotctl reload does).\n");
#ifdef FINALDOT_FAULT_INJECTION
	/* Only a test build (-Dfault_injection=true) reads it; tests use
	 * this line to tell the two builds apart. */
	fprintf(out, "Environment: FINALDOT_SPOOL_FAULT injects spool I/O "
		     "faults (test build; see\ndocs/spool-format.md).\n");
#endif
}

void
fd_config_dump(const struct fd_config *c, FILE *out)
{
	static const char *levels[] = {"error", "warn", "info", "debug"};
	const char *base = (const char *)c;

	for (size_t i = 0; i < sizeof(options) / sizeof(options[0]); i++) {
		const struct opt *o = &options[i];
		const void *p = base + o->off;
		switch (o->type) {
		case OPT_STR:
			fprintf(out, "%s = \"%s\"\n", o->name,
				(const char *)p);
			break;
		case OPT_UINT:
			fprintf(out, "%s = %u\n", o->name,
				*(const unsigned *)p);
			break;
		case OPT_SIZE:
		case OPT_U64:
			fprintf(out, "%s = %" PRIu64 "\n", o->name,
				*(const uint64_t *)p);
			break;
		case OPT_DURATION:
			fprintf(out, "%s = %" PRIu64 "ms\n", o->name,
				*(const uint64_t *)p);
			break;
		case OPT_DURATION_US:
			fprintf(out, "%s = %" PRIu64 "us\n", o->name,
				*(const uint64_t *)p);
			break;
		case OPT_LISTEN:
			for (unsigned k = 0; k < c->n_listen; k++)
				fprintf(out, "listen = \"%s\"\n",
					c->listen[k].text);
			break;
		case OPT_DOMAIN:
			for (unsigned k = 0; k < c->n_domains; k++)
				fprintf(out, "accept_domain = \"%s\"\n",
					c->domains[k]);
			break;
		case OPT_ROUTE:
			for (unsigned k = 0; k < c->n_routes; k++)
				fprintf(out, "route = \"%s\"\n",
					c->routes[k]);
			break;
		case OPT_TLS_CERT:
			for (unsigned k = 0; k < c->n_tls_cert; k++)
				fprintf(out, "tls_cert = \"%s\"\n",
					c->tls_cert[k]);
			break;
		case OPT_TLS_KEY:
			for (unsigned k = 0; k < c->n_tls_key; k++)
				fprintf(out, "tls_key = \"%s\"\n",
					c->tls_key[k]);
			break;
		case OPT_BOOL:
			fprintf(out, "%s = %s\n", o->name,
				*(const bool *)p ? "on" : "off");
			break;
		case OPT_TRANSPORT:
			fprintf(out, "transport = %s\n",
				c->transport == FD_TRANSPORT_DPDK ? "dpdk"
								  : "kernel");
			break;
		case OPT_LOGLEVEL:
			fprintf(out, "log_level = %s\n",
				levels[c->log_level & 3]);
			break;
		case OPT_FLAG:
		case OPT_CONFIG:
		case OPT_DPDK:
			break;
		}
	}
}
