/*
 * finaldot's configuration: embedded defaults, then the config file, then
 * command-line flags, later ones winning (repeatable list options: a list
 * given on the command line replaces the file's list).
 *
 * One table (config.c) names every option once: its config-file key
 * ("max_message_size"), its flag ("--max-message-size"), its type and its
 * help text; the parser and --help are both driven by it.
 *
 * Config file syntax: one "key = value" per line, '#' starts a comment,
 * blank lines ignored, list options repeated ("listen = 127.0.0.1:2525").
 * Sizes take k/M/G suffixes (powers of 1024); durations take ms/s/m/h
 * (default seconds).
 */
#ifndef FINALDOT_CONFIG_H
#define FINALDOT_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>

#define FD_CONFIG_MAX_LISTEN 16
#define FD_CONFIG_MAX_DOMAINS 64
#define FD_CONFIG_MAX_ROUTES 64
#define FD_CONFIG_STR 256
#define FD_CONFIG_MAX_TLS 8

enum fd_transport {
	FD_TRANSPORT_KERNEL = 0,
	FD_TRANSPORT_DPDK = 1,
};

struct fd_listen {
	struct sockaddr_storage addr;
	socklen_t addrlen;
	char text[64]; /* as given, for logs */
};

struct fd_config {
	/* where and how */
	enum fd_transport transport;
	struct fd_listen listen[FD_CONFIG_MAX_LISTEN];
	unsigned n_listen;
	unsigned threads; /* workers; 0 = one per online CPU */
	char hostname[FD_CONFIG_STR];
	char config_file[FD_CONFIG_STR];

	/* policy */
	char domains[FD_CONFIG_MAX_DOMAINS][FD_CONFIG_STR];
	unsigned n_domains;
	uint64_t max_message_size;
	unsigned max_recipients;
	unsigned max_errors;
	unsigned max_connections; /* per worker */
	uint64_t idle_timeout_ms;
	uint64_t command_timeout_ms; /* one command line, first octet to LF */
	uint64_t data_timeout_ms;    /* one message's data, 354 to the end */
	uint64_t greet_delay_ms;
	uint64_t shutdown_timeout_ms;

	/* STARTTLS (RFC 3207): pairs by position, cert[i] with key[i] */
	char tls_cert[FD_CONFIG_MAX_TLS][FD_CONFIG_STR];
	unsigned n_tls_cert;
	char tls_key[FD_CONFIG_MAX_TLS][FD_CONFIG_STR];
	unsigned n_tls_key;
	char tls_ciphers[512];
	char tls_min_version[8]; /* "1.2" or "1.3" */
	bool tls_required;
	uint64_t tls_handshake_timeout_ms;
	unsigned tls_max_handshakes; /* per worker; more wait */
	uint64_t tls_ticket_lifetime_ms;

	/* spool */
	char spool_dir[FD_CONFIG_STR];
	uint64_t segment_size;
	uint64_t batch_size;
	unsigned batches;
	unsigned flush_inflight;
	char spool_sync[16]; /* auto|dsync|fdatasync */
	bool spool_fdatasync; /* spool_sync resolved at start (not an option) */
	char spool_prepare[16]; /* auto|zero|fallocate */
	bool spool_fallocate; /* spool_prepare resolved at start (no option) */
	unsigned spare_segments;
	uint64_t max_segments;
	uint64_t spool_min_free; /* bytes kept free on the spool's fs */

	/* DPDK transport (issue 3) */
	char dpdk_eal[1024];
	char dpdk_ip[64];      /* ADDR/PREFIX */
	char dpdk_gateway[64];
	char dpdk_offloads[16]; /* auto|none|ip|l4|all */
	uint64_t dpdk_idle_sleep_us; /* 0: poll without pause */

	/* delivery (the control plane) */
	char routes[FD_CONFIG_MAX_ROUTES][640]; /* "DOMAIN=TARGET" */
	unsigned n_routes;
	char relay[640];
	char bounce_relay[640];
	char recipients[FD_CONFIG_STR];
	bool delivery;
	unsigned delivery_threads;
	unsigned delivery_nice;    /* +0..19 nice: delivery, dlog writer */
	unsigned dest_concurrency;
	uint64_t retry_min_ms;
	uint64_t retry_max_ms;
	uint64_t move_after_ms;
	uint64_t queue_lifetime_ms;
	uint64_t smtp_connect_timeout_ms;
	uint64_t smtp_timeout_ms;
	uint64_t smtp_data_timeout_ms;
	char smtp_tls[16];                /* none|may|encrypt|verify */
	char smtp_tls_ca[FD_CONFIG_STR];  /* "" : the system CA store */
	bool verify_recipients;           /* RCPT-time probe of the next hop */
	uint64_t verify_positive_ttl_ms;
	uint64_t verify_negative_ttl_ms;
	uint64_t verify_timeout_ms; /* a probe's wait on its next hop */
	uint64_t dlog_rotate;
	uint64_t dedup_window_ms;
	uint64_t dedup_settle_ms;

	/* operations */
	char log_file[FD_CONFIG_STR];
	int log_level; /* enum fd_log_level */
	char control[FD_CONFIG_STR];      /* control socket path, or "off" */
	bool control_derived;             /* not given: beside the spool */
	char control_group[64];           /* "" none */
	char metrics[64];                 /* ADDR:PORT, "" or "off": none */
	struct fd_listen metrics_addr;    /* parsed, when metrics is on */
	bool help;
	bool version;
	bool check;    /* --check-config: parse, print, exit */
};

/* Embedded defaults: 127.0.0.1:2525, ./var/spool, domain localhost. */
void fd_config_defaults(struct fd_config *c);

/*
 * Parse argv (a --config FILE among the flags is read first, wherever it
 * stands, so flags override the file). On error writes one line to err and
 * returns -EINVAL. Fills in defaults for lists left empty.
 */
int fd_config_parse_args(struct fd_config *c, int argc, char **argv,
			 FILE *err);
int fd_config_parse_file(struct fd_config *c, const char *path, FILE *err);

/* --help text, generated from the option table. */
void fd_config_usage(FILE *out, const char *prog);
/* Every effective setting as "key = value" lines (a valid config file). */
void fd_config_dump(const struct fd_config *c, FILE *out);

/* "127.0.0.1:25", "[::1]:25", ":25" (all IPv4), "[::]:25". 0 or -EINVAL. */
int fd_config_parse_listen(const char *s, struct fd_listen *l);

#endif
