/*
 * finaldot: the program's entry point.
 *
 * Start-up: configuration (defaults, file, flags) -> the spool directory ->
 * recovery (a scan of every segment: what is committed, what was torn) ->
 * one worker thread per configured thread, each with its own listeners,
 * sessions and spool -> "ready". The main thread then only waits for
 * SIGTERM/SIGINT, tells the workers to stop, joins them and prints the
 * totals (one event=stats line, the one tools/bench reads).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "control/spool_reader.h"
#include "finaldot/config.h"
#include "finaldot/log.h"
#include "finaldot/msgid.h"
#include "sock/sock.h"
#include "worker.h"
#ifdef FINALDOT_HAVE_DPDK
#include "net/dpdk.h"
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
		if (mkdir(buf, 0750) != 0 && errno != EEXIST)
			return -errno;
		buf[i] = c;
	}
	return 0;
}

/*
 * Recovery: scan every segment of every worker before taking new mail, log
 * what was found (committed messages, torn or stale records), and seed each
 * worker's message-id generator past the largest id on disk.
 */
static int
recover(const char *dir, uint64_t *seeds)
{
	int err = 0;
	uint64_t t0 = fd_now_monotonic_us();
	struct ctl_spool_scan *scan = ctl_spool_scan_dir(dir, &err);
	const struct ctl_spool_summary *sum;

	if (!scan) {
		fd_log(FD_LOG_ERR, "main", "event=recovery_failed dir=%s "
		       "error=\"%s\"", dir, strerror(-err));
		return -1;
	}
	sum = ctl_spool_scan_summary(scan);
	memcpy(seeds, sum->max_msgid, sizeof(sum->max_msgid));
	fd_log(FD_LOG_INFO, "main",
	       "event=recovered dir=%s segments=%" PRIu64 " messages=%" PRIu64
	       " incomplete=%" PRIu64 " records_bad=%" PRIu64
	       " records_stale=%" PRIu64 " bytes=%" PRIu64 " ms=%" PRIu64,
	       dir, sum->segments, sum->msgs_committed, sum->msgs_incomplete,
	       sum->records_bad, sum->records_stale, sum->body_bytes,
	       (fd_now_monotonic_us() - t0) / 1000);
	ctl_spool_scan_free(scan);
	return 0;
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
	struct fd_worker_totals tot = {0};
	sigset_t sigs;
	int sig = 0, status = 0;
	unsigned started = 0;

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
	if (cfg.check) {
		fd_config_dump(&cfg, stdout);
		return 0;
	}
	fd_log_set_level((enum fd_log_level)cfg.log_level);

	if (mkdir_p(cfg.spool_dir) != 0) {
		fd_log(FD_LOG_ERR, "main", "event=spool_dir_failed dir=%s "
		       "error=\"%s\"", cfg.spool_dir, strerror(errno));
		return 1;
	}
	if (recover(cfg.spool_dir, seeds) != 0)
		return 1;
#ifdef FINALDOT_HAVE_DPDK
	if (cfg.transport == FD_TRANSPORT_DPDK)
		return net_dpdk_main(&cfg, seeds) == 0 ? 0 : 1;
#endif

	/* Signals go to the main thread only: block them before threads. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGPIPE);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);

	workers = calloc(cfg.threads, sizeof(*workers));
	if (!workers)
		return 1;
	for (unsigned i = 0; i < cfg.threads; i++) {
		struct fd_worker *w = &workers[i];
		w->id = i;
		w->cfg = &cfg;
		w->seed_msgid = seeds[i];
		w->wake_fd = eventfd(0, EFD_CLOEXEC);
		if (w->wake_fd < 0 ||
		    pthread_create(&w->thread, NULL, worker_main, w) != 0) {
			status = 1;
			break;
		}
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
		sigaddset(&sigs, SIGUSR1); /* unused; keeps the set explicit */
		sigdelset(&sigs, SIGPIPE);
		sigdelset(&sigs, SIGUSR1);
		sigwait(&sigs, &sig);
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
	fd_log(FD_LOG_INFO, "main",
	       "event=stats workers=%u sessions=%" PRIu64 " messages=%" PRIu64
	       " failed=%" PRIu64 " rejected=%" PRIu64 " flushes=%" PRIu64
	       " batches=%" PRIu64 " bytes=%" PRIu64
	       " flushes_per_message=%.4f",
	       started, tot.sessions, tot.messages, tot.failed, tot.rejected,
	       tot.flushes, tot.batches, tot.bytes,
	       tot.messages ? (double)tot.flushes / (double)tot.messages : 0.0);
	fd_log(FD_LOG_INFO, "main", "event=exit status=%d", status);
	free(workers);
	return status;
}
