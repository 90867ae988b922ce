/*
 * finaldot: the program's entry point.
 *
 * Start-up: configuration (defaults, file, flags) -> the spool directory ->
 * recovery (a scan of every segment: what is committed, what was torn) ->
 * the control plane rebuilds its queue from that scan and the delivery log
 * and starts delivering -> one worker thread per configured thread, each
 * with its own listeners, sessions and spool, and a port to the control
 * plane -> "ready". The main thread then only waits for SIGTERM/SIGINT,
 * tells the workers to stop, joins them, stops the control plane (after
 * the workers, so it hears their last announcements) and prints the totals
 * (one event=stats line, the one tools/bench reads).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "control/cplane.h"
#include "control/ctlsock.h"
#include "control/sdnotify.h"
#include "control/spool_reader.h"
#include "finaldot/config.h"
#include "finaldot/fsync.h"
#include "finaldot/log.h"
#include "finaldot/msgid.h"
#include "sock/sock.h"
#include "spool/spool.h"
#include "spool/spool_lock.h"
#include "tls/tls.h"
#include "worker.h"
#ifdef FINALDOT_HAVE_DPDK
#include "dpdk/dpdk.h"
#endif

static int
mkdir_p(const char *path)
{
	char buf[FD_CONFIG_STR];
	size_t n = strlen(path);

	if (n == 0 || n >= sizeof(buf))
		return -EINVAL;
	memcpy(buf, path, n + 1);
	for (size_t i = 1; i <= n; i++) {
		if (buf[i] != '/' && buf[i] != '\0')
			continue;
		char c = buf[i];
		buf[i] = '\0';
		/* A new directory is durable only once its parent is
		 * fsynced: a power cut could take it back, with the spool
		 * in it. */
		int r = fd_mkdir_durable(buf, 0750);
		if (r != 0)
			return r;
		buf[i] = c;
	}
	return 0;
}

/*
 * Recovery: scan every segment of every worker before taking new mail, log
 * what was found (committed messages, torn or stale records), and seed each
 * worker's message-id generator past the largest id on disk.
 */
static struct ctl_spool_scan *
recover(const char *dir, uint64_t *seeds)
{
	int err = 0;
	uint64_t t0 = fd_now_monotonic_us();
	struct ctl_spool_scan *scan = ctl_spool_scan_dir(dir, &err);
	const struct ctl_spool_summary *sum;

	if (!scan) {
		fd_log(FD_LOG_ERR, "main", "event=recovery_failed dir=%s "
		       "error=\"%s\"", dir, strerror(-err));
		return NULL;
	}
	sum = ctl_spool_scan_summary(scan);
	memcpy(seeds, sum->max_msgid, sizeof(sum->max_msgid));
	fd_log(FD_LOG_INFO, "main",
	       "event=recovered dir=%s segments=%" PRIu64
	       " segments_bad=%" PRIu64 " messages=%" PRIu64
	       " incomplete=%" PRIu64 " records_bad=%" PRIu64
	       " records_stale=%" PRIu64 " bytes=%" PRIu64 " ms=%" PRIu64,
	       dir, sum->segments, sum->segments_bad, sum->msgs_committed,
	       sum->msgs_incomplete, sum->records_bad, sum->records_stale,
	       sum->body_bytes,
	       (fd_now_monotonic_us() - t0) / 1000);
	return scan;
}

/*
 * The kernel transport holds one descriptor per connection: max_connections
 * per worker, plus listeners, rings, eventfds and segment files; the
 * control plane adds its delivery connections and files. Below that the
 * accepts fail with EMFILE under load (issue 10), so raise the soft limit
 * as far as the hard one allows, and say so when even that is short.
 */
static void
fd_limit_check(const struct fd_config *cfg)
{
	struct rlimit rl;
	rlim_t need = (rlim_t)cfg->threads * (cfg->max_connections + 64u) +
		      2u * (rlim_t)cfg->delivery_threads + 256u;
	rlim_t was;

	if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY ||
	    rl.rlim_cur >= need)
		return;
	was = rl.rlim_cur;
	rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= need
			      ? need
			      : rl.rlim_max;
	if (rl.rlim_cur > was && setrlimit(RLIMIT_NOFILE, &rl) == 0)
		fd_log(FD_LOG_INFO, "main",
		       "event=fd_limit_raised from=%llu to=%llu need=%llu",
		       (unsigned long long)was,
		       (unsigned long long)rl.rlim_cur,
		       (unsigned long long)need);
	else
		rl.rlim_cur = was;
	if (rl.rlim_cur < need)
		fd_log(FD_LOG_WARN, "main",
		       "event=fd_limit_low have=%llu need=%llu "
		       "error=\"max_connections x threads needs more open "
		       "files than the hard limit allows: accepts will fail "
		       "with EMFILE under load; raise it (ulimit -Hn, "
		       "LimitNOFILE=) or lower max_connections\"",
		       (unsigned long long)rl.rlim_cur,
		       (unsigned long long)need);
}

/* The control plane's settings, from ours; the arrays hold the pointers. */
static void
cp_config_from(struct cp_config *cc, const struct fd_config *cfg,
	       const char **doms, const char **routes)
{
	memset(cc, 0, sizeof(*cc));
	for (unsigned i = 0; i < cfg->n_domains; i++)
		doms[i] = cfg->domains[i];
	for (unsigned i = 0; i < cfg->n_routes; i++)
		routes[i] = cfg->routes[i];
	cc->spool_dir = cfg->spool_dir;
	cc->hostname = cfg->hostname;
	cc->domains = doms;
	cc->n_domains = cfg->n_domains;
	cc->routes = routes;
	cc->n_routes = cfg->n_routes;
	cc->relay = cfg->relay;
	cc->bounce_relay = cfg->bounce_relay;
	cc->default_route = "maildir:./var/maildir";
	cc->recipients = cfg->recipients;
	cc->delivery_threads = cfg->delivery_threads;
	cc->delivery_nice = cfg->delivery_nice;
	cc->dest_concurrency = cfg->dest_concurrency;
	cc->retry_min_ms = cfg->retry_min_ms;
	cc->retry_max_ms = cfg->retry_max_ms;
	cc->move_after_ms = cfg->move_after_ms;
	cc->queue_lifetime_ms = cfg->queue_lifetime_ms;
	cc->connect_timeout_ms = cfg->smtp_connect_timeout_ms;
	cc->cmd_timeout_ms = cfg->smtp_timeout_ms;
	cc->data_timeout_ms = cfg->smtp_data_timeout_ms;
	cc->dlog_rotate_bytes = cfg->dlog_rotate;
	cc->shutdown_timeout_ms = cfg->shutdown_timeout_ms;
	cc->delivery = cfg->delivery;
	cc->dedup_window_ms = cfg->dedup_window_ms;
	cc->dedup_settle_ms = cfg->dedup_settle_ms;
	cc->smtp_tls = cfg->smtp_tls;
	cc->smtp_tls_ca = cfg->smtp_tls_ca;
	cc->verify_recipients = cfg->verify_recipients;
	cc->verify_positive_ttl_ms = cfg->verify_positive_ttl_ms;
	cc->verify_negative_ttl_ms = cfg->verify_negative_ttl_ms;
	cc->verify_timeout_ms = cfg->verify_timeout_ms;
}

/* The workers as the control socket and /metrics see them. */
static void
workers_stats(void *ctx, unsigned i, struct ctl_worker_stats *out)
{
	fd_worker_read_stats(&((const struct fd_worker *)ctx)[i], out);
}


/* Whether a worker names p as the policy it applies (worker.h). */
static bool
policy_held(const struct fd_policy *p)
{
	for (unsigned i = 0; i < FD_POLICY_HOLDERS; i++)
		if (atomic_load(&fd_policy_held[i]) == p)
			return true;
	return false;
}

/*
 * The SMTP policy of a reloaded configuration, for the workers (worker.h).
 * The ones it replaces are freed once no worker names them: a worker
 * copies the scalars and the domain pointers into its server, which point
 * into the policy it applied until it applies the next one, however long
 * it takes to come round (a stalled thread, a busy CPU).
 */
static void
policy_publish(const struct fd_config *nc)
{
	static struct fd_policy *retired;
	struct fd_policy *p = calloc(1, sizeof(*p)), *old, **pp;

	if (!p)
		return;
	for (unsigned i = 0; i < nc->n_domains; i++) {
		memcpy(p->store[i], nc->domains[i], sizeof(p->store[i]));
		p->domains[i] = p->store[i];
	}
	p->n_domains = nc->n_domains;
	p->max_message_size = nc->max_message_size;
	p->max_recipients = nc->max_recipients;
	p->max_errors = nc->max_errors;
	p->command_timeout_ms = nc->command_timeout_ms;
	p->data_timeout_ms = nc->data_timeout_ms;
	p->idle_timeout_ms = nc->idle_timeout_ms;
	p->greet_delay_ms = nc->greet_delay_ms;
	old = atomic_exchange(&fd_policy_live, p);
	if (old) {
		old->retired_next = retired;
		retired = old;
	}
	for (pp = &retired; *pp;) {
		struct fd_policy *r = *pp;

		if (policy_held(r)) {
			pp = &r->retired_next;
			continue;
		}
		*pp = r->retired_next;
		free(r);
	}
}

/*
 * SIGHUP: read the configuration again (the same command line, so the same
 * --config file): the delivery settings go to the control plane
 * (cp_reload: routes, relay, retries, ...), the SMTP policy to the workers
 * (accepted domains, message size, recipients, errors, command and data
 * deadlines, the idle timeout and the greeting delay). A file that does
 * not parse is refused with its line, and nothing changes. Listen
 * addresses, threads, the spool and the transport are the process's
 * shape: read at start only (a restart changes them; docs/operations.md).
 */
static void
config_reload(int argc, char **argv, struct cplane *cp)
{
	struct fd_config *nc = malloc(sizeof(*nc));
	static const char *doms[FD_CONFIG_MAX_DOMAINS];
	static const char *routes[FD_CONFIG_MAX_ROUTES];
	char *msg = NULL, why[600];
	size_t msg_len = 0;
	struct cp_config cc;
	FILE *err;
	int r;

	if (!nc)
		return;
	fd_config_defaults(nc);
	err = open_memstream(&msg, &msg_len);
	r = err ? fd_config_parse_args(nc, argc, argv, err) : -ENOMEM;
	if (err)
		fclose(err);
	if (r != 0) {
		/* The parser's own words (FILE:LINE: reason), one line. */
		while (msg_len && (msg[msg_len - 1] == '\n'))
			msg[--msg_len] = '\0';
		for (size_t i = 0; i < msg_len; i++)
			if (msg[i] == '\n' || msg[i] == '"')
				msg[i] = msg[i] == '"' ? '\'' : ';';
		fd_log(FD_LOG_ERR, "main",
		       "event=reload_failed kept=previous error=\"%s\"",
		       msg ? msg : "");
		goto out;
	}
	cp_config_from(&cc, nc, doms, routes);
	if (cp_reload(cp, &cc, why, sizeof(why)) != 0) {
		fd_log(FD_LOG_ERR, "main",
		       "event=reload_failed kept=previous error=\"%s\"", why);
		goto out;
	}
	policy_publish(nc);
out:
	free(msg);
	free(nc);
}

static void tls_reload(void);

/* What a reload needs, kept by main() for reload_all(). */
static struct {
	int argc;
	char **argv;
	struct cplane *cp;
} rl;

/*
 * SIGHUP / finaldotctl reload, on the kernel transport's signal thread or
 * on a thread of its own (DPDK: never on a polled core): certificates, the
 * configuration, the recipients table.
 */
static void
reload_all(void)
{
	char why[600];

	sdnotify_reloading();
	fd_log(FD_LOG_INFO, "main", "event=reload_requested");
	tls_reload();
	config_reload(rl.argc, rl.argv, rl.cp);
	if (cp_reload_recipients(rl.cp, why, sizeof(why)) != 0)
		fd_log(FD_LOG_ERR, "main",
		       "event=recipients_reload_failed kept=previous "
		       "error=\"%s\"",
		       why);
	sdnotify("READY=1\nSTATUS=accepting mail");
}

/* --tls-cert/--tls-key: load and check every pair (fd_tls). 0 or -1. */
static int
tls_load(const struct fd_config *cfg)
{
	struct fd_tls_opts o;
	char err[600];

	if (cfg->n_tls_cert == 0)
		return 0;
	fd_tls_opts_defaults(&o);
	for (unsigned i = 0; i < cfg->n_tls_cert && i < FD_TLS_MAX_PAIRS; i++) {
		o.cert[i] = cfg->tls_cert[i];
		o.key[i] = cfg->tls_key[i];
	}
	o.npairs = cfg->n_tls_cert;
	o.ciphers = cfg->tls_ciphers[0] ? cfg->tls_ciphers : NULL;
	o.min_version = strcmp(cfg->tls_min_version, "1.3") == 0
				? 0x0304
				: 0x0303;
	o.ticket_lifetime_s = cfg->tls_ticket_lifetime_ms / 1000;
	if (o.ticket_lifetime_s == 0)
		o.ticket_lifetime_s = 1;
	o.handshake_timeout_ms = cfg->tls_handshake_timeout_ms;
	if (fd_tls_server_new(&o, &fd_tls, err, sizeof(err)) != 0) {
		fprintf(stderr, "finaldot: TLS: %s\n", err);
		return -1;
	}
	return 0;
}

static void
tls_reload(void)
{
	char err[600], esc[1300];

	if (!fd_tls)
		return;
	if (fd_tls_server_reload(fd_tls, err, sizeof(err)) == 0)
		fd_log(FD_LOG_INFO, "main", "event=tls_reloaded");
	else
		fd_log(FD_LOG_ERR, "main",
		       "event=tls_reload_failed kept=previous error=\"%s\"",
		       fd_log_escape(esc, sizeof(esc), err, strlen(err)));
}

/*
 * --check-config: beyond the settings, what a start would refuse: a spool
 * that cannot be written or is in use by another daemon, a listen address
 * that cannot be bound, the control socket and /metrics. One line per
 * problem on stderr; 0 when a start would get past them.
 */
static int
check_start(const struct fd_config *cfg)
{
	char path[FD_CONFIG_STR + 32], why[600];
	struct stat st;
	pid_t holder = 0;
	int bad = 0, r, fd;

	if (stat(cfg->spool_dir, &st) == 0) {
		snprintf(path, sizeof(path), "%s/.check-XXXXXX", cfg->spool_dir);
		if ((fd = mkstemp(path)) < 0) {
			fprintf(stderr, "finaldot: spool %s: not writable: %s\n",
				cfg->spool_dir, strerror(errno));
			bad = 1;
		} else {
			close(fd);
			unlink(path);
			/* Released when we exit, a moment from now. */
			r = spool_lock_take(cfg->spool_dir, &holder);
			if (r == -EWOULDBLOCK) {
				fprintf(stderr, "finaldot: spool %s: in use by "
					"another finaldot (pid %ld)\n",
					cfg->spool_dir, (long)holder);
				bad = 1;
			}
		}
	} else {
		const char *sl = strrchr(cfg->spool_dir, '/');
		snprintf(path, sizeof(path), "%.*s",
			 sl ? (int)(sl - cfg->spool_dir) + (sl == cfg->spool_dir)
			    : 1,
			 sl ? cfg->spool_dir : ".");
		if (access(path, W_OK | X_OK) != 0 && errno != ENOENT) {
			fprintf(stderr, "finaldot: spool %s cannot be made in "
				"%s: %s\n", cfg->spool_dir, path,
				strerror(errno));
			bad = 1;
		}
	}
	/* DPDK listens on its own port: nothing to bind here. */
	for (unsigned i = 0; cfg->transport == FD_TRANSPORT_KERNEL &&
			     i < cfg->n_listen; i++) {
		const struct fd_listen *li = &cfg->listen[i];
		int one = 1;
		fd = socket(li->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
		r = fd < 0 ? errno : 0;
		if (fd >= 0) {
			setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one,
				   sizeof(one));
			if (li->addr.ss_family == AF_INET6)
				setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one,
					   sizeof(one));
			if (bind(fd, (const struct sockaddr *)&li->addr,
				 li->addrlen) != 0)
				r = errno;
			close(fd);
		}
		if (r) {
			fprintf(stderr, "finaldot: listen %s: %s\n", li->text,
				strerror(r));
			bad = 1;
		}
	}
	r = ctl_ops_check(cfg, why, sizeof(why));
	if (r) {
		fprintf(stderr, "finaldot: %s%s\n", r > 0 ? "warning: " : "",
			why);
		bad |= r < 0;
	}
	return bad;
}

static void *
worker_main(void *arg)
{
	struct fd_worker *w = arg;

	sock_worker_run(w);
	return NULL;
}

int
main(int argc, char **argv)
{
	static struct fd_config cfg;
	struct fd_worker *workers;
	static uint64_t seeds[256];
	static const char *doms[FD_CONFIG_MAX_DOMAINS];
	static const char *routes[FD_CONFIG_MAX_ROUTES];
	struct fd_worker_totals tot = {0};
	struct ctl_spool_scan *scan;
	struct cp_config cc;
	struct cplane *cp;
	char why[600];
	int err = 0;
	sigset_t sigs;
	int sig = 0, status = 0;
	pid_t holder = 0;
	unsigned started = 0;
	struct ctl_ops *ops = NULL;
	int cerr = 0;

	fd_config_defaults(&cfg);
	if (fd_config_parse_args(&cfg, argc, argv, stderr) != 0)
		return 2;
	if (cfg.help) {
		fd_config_usage(stdout, "finaldot");
		return 0;
	}
	if (cfg.version) {
		printf("finaldot %s\n", FINALDOT_VERSION);
		return 0;
	}
	if (cfg.threads == 0) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		cfg.threads = n > 0 && n < 255 ? (unsigned)n : 1;
	}
#ifndef FINALDOT_HAVE_DPDK
	if (cfg.transport == FD_TRANSPORT_DPDK) {
		fprintf(stderr, "finaldot: built without DPDK; use "
				"--transport kernel\n");
		return 2;
	}
#endif
	cp_config_from(&cc, &cfg, doms, routes);
	if (cp_check_config(&cc, why, sizeof(why)) != 0) {
		fprintf(stderr, "finaldot: %s\n", why);
		return 2;
	}
	/* Certificates are checked before anything starts: a missing file,
	 * a key that does not match, an expired certificate end the start
	 * with the reason, not the first client's handshake. */
	if (tls_load(&cfg) != 0)
		return 2;
	if (cfg.check) {
		if (check_start(&cfg) != 0)
			return 1;
		fd_config_dump(&cfg, stdout);
		return 0;
	}
	fd_log_set_level((enum fd_log_level)cfg.log_level);
	if (cfg.log_file[0] && (err = fd_log_open_file(cfg.log_file)) != 0) {
		fprintf(stderr, "finaldot: --log-file %s: %s\n", cfg.log_file,
			strerror(-err));
		return 1;
	}
	/* Signals go to the main thread's sigwait only: blocked before any
	 * thread starts (the log writer's and the control plane's too), so
	 * that none of them takes SIGHUP's or SIGTERM's default action (and
	 * dies with the process). The DPDK transport installs handlers. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGPIPE);
	sigaddset(&sigs, SIGUSR1); /* log reopen (logrotate) */
	sigaddset(&sigs, SIGHUP);  /* reload */
	if (cfg.transport == FD_TRANSPORT_KERNEL)
		pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	/* From here on a worker's log line is a copy into its own buffer,
	 * not a system call (finaldot/log.h). */
	if (fd_log_start() != 0)
		fd_log(FD_LOG_WARN, "main", "event=log_writer_failed");

	if (mkdir_p(cfg.spool_dir) != 0) {
		fd_log(FD_LOG_ERR, "main", "event=spool_dir_failed dir=%s "
		       "error=\"%s\"", cfg.spool_dir, strerror(errno));
		return 1;
	}
	/* One daemon per spool (issue 10): the lock comes before recovery
	 * reads anything, and is held until the process ends. */
	if ((err = spool_lock_take(cfg.spool_dir, &holder)) < 0) {
		if (err == -EWOULDBLOCK)
			fd_log(FD_LOG_ERR, "main",
			       "event=spool_locked dir=%s pid=%ld error=\"the "
			       "spool is in use by another finaldot (pid %ld)\"",
			       cfg.spool_dir, (long)holder, (long)holder);
		else
			fd_log(FD_LOG_ERR, "main",
			       "event=spool_lock_failed dir=%s error=\"%s\"",
			       cfg.spool_dir, strerror(-err));
		fd_log_stop();
		return 1;
	}
	if (cfg.transport == FD_TRANSPORT_KERNEL)
		fd_limit_check(&cfg);
	{
		char sync_why[96];
		cfg.spool_fdatasync =
			spool_sync_linked(cfg.spool_dir, cfg.spool_sync,
					  sync_why, sizeof(sync_why));
		fd_log(FD_LOG_INFO, "main",
		       "event=spool_sync mode=%s reason=\"%s\"",
		       cfg.spool_fdatasync ? "fdatasync" : "dsync", sync_why);
		cfg.spool_fallocate =
			spool_prepare_fallocate(cfg.spool_dir,
						cfg.spool_prepare, sync_why,
						sizeof(sync_why));
		fd_log(FD_LOG_INFO, "main",
		       "event=spool_prepare mode=%s reason=\"%s\"",
		       cfg.spool_fallocate ? "fallocate" : "zero", sync_why);
	}
	if (!(scan = recover(cfg.spool_dir, seeds)))
		return 1;
	cp = cp_create(&cc, scan, &err);
	ctl_spool_scan_free(scan);
	if (!cp)
		return 1;
	cp_raise_msgid_seeds(cp, seeds, 256);
	rl.argc = argc;
	rl.argv = argv;
	rl.cp = cp;
#ifdef FINALDOT_HAVE_DPDK
	if (cfg.transport == FD_TRANSPORT_DPDK) {
		status = dpdk_transport_main(&cfg, seeds, cp, reload_all) == 0
				 ? 0
				 : 1;
		cp_free(cp);
		fd_log_stop();
		return status;
	}
#endif
	if (cp_attach(cp, cfg.threads) != 0 || cp_start(cp, NULL) != 0) {
		fd_log(FD_LOG_ERR, "main", "event=control_plane_failed");
		cp_free(cp);
		return 1;
	}


	workers = calloc(cfg.threads, sizeof(*workers));
	if (!workers)
		return 1;
	for (unsigned i = 0; i < cfg.threads; i++) {
		struct fd_worker *w = &workers[i];
		w->id = i;
		w->cfg = &cfg;
		w->seed_msgid = seeds[i];
		w->port = cp_port(cp, i);
		w->rcpt_check = cp_rcpt_check_fn(cp);
		w->rcpt_ctx = cp_rcpt_ctx(cp);
		w->wake_fd = eventfd(0, EFD_CLOEXEC);
		if (w->wake_fd < 0 ||
		    pthread_create(&w->thread, NULL, worker_main, w) != 0) {
			status = 1;
			break;
		}
		char tname[16];
		snprintf(tname, sizeof(tname), "fd-worker%u", i & 0xff);
		pthread_setname_np(w->thread, tname);
		started++;
	}
	/* Wait until every worker listens, or one of them failed. */
	for (bool all = false; !all && status == 0;) {
		all = true;
		for (unsigned i = 0; i < started; i++) {
			if (workers[i].exit_status != 0)
				status = 1;
			if (!atomic_load(&workers[i].ready))
				all = false;
		}
		if (!all)
			usleep(1000);
	}
	if (status == 0 && !(ops = fd_ctl_start(&cfg, cp, "kernel", started,
						workers_stats, workers, NULL,
						NULL, &cerr)))
		status = 1;
	if (status == 0) {
		char lbuf[512] = "";
		for (unsigned i = 0; i < cfg.n_listen; i++) {
			strncat(lbuf, i ? "," : "", sizeof(lbuf) - strlen(lbuf) - 1);
			strncat(lbuf, cfg.listen[i].text,
				sizeof(lbuf) - strlen(lbuf) - 1);
		}
		fd_log(FD_LOG_INFO, "main",
		       "event=ready version=%s transport=kernel listen=%s "
		       "threads=%u spool=%s hostname=%s",
		       FINALDOT_VERSION, lbuf, cfg.threads, cfg.spool_dir,
		       cfg.hostname);
		sdnotify("READY=1\nSTATUS=accepting mail");
		sigdelset(&sigs, SIGPIPE);
		for (;;) {
			sigwait(&sigs, &sig);
			if (sig == SIGHUP) {
				/* Reload: certificates, configuration,
				 * recipients (reload_all()). */
				reload_all();
				continue;
			}
			if (sig != SIGUSR1)
				break;
			fd_log_reopen();
			fd_log(FD_LOG_INFO, "main", "event=log_reopen");
		}
		sdnotify("STOPPING=1");
		fd_log(FD_LOG_INFO, "main", "event=signal signal=%s",
		       sig == SIGTERM ? "TERM" : "INT");
	}
	for (unsigned i = 0; i < started; i++) {
		uint64_t one = 1;
		atomic_store(&workers[i].stop, true);
		if (write(workers[i].wake_fd, &one, sizeof(one)) < 0)
			status = 1;
	}
	for (unsigned i = 0; i < started; i++) {
		pthread_join(workers[i].thread, NULL);
		if (workers[i].exit_status != 0)
			status = 1;
		fd_worker_add_totals(&workers[i], &tot);
		close(workers[i].wake_fd);
	}
	ctl_ops_stop(ops); /* before the workers' memory and the queue go */
	fd_tls_server_free(fd_tls);
	fd_tls = NULL;
	cp_stop(cp);
	fd_worker_log_totals(started, &tot);
	fd_log(FD_LOG_INFO, "main", "event=exit status=%d", status);
	free(workers);
	cp_free(cp);
	fd_log_stop();
	return status;
}
