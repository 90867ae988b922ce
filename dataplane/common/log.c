/*
 * key=value logging (format in finaldot/log.h).
 *
 * Two modes. Direct (before fd_log_start(), after fd_log_stop()): one
 * write(2) per line, so lines from several threads never interleave.
 * Buffered (between): each thread that logs gets its own byte ring the
 * first time (registered under a mutex: once per thread), fd_log() formats
 * on the caller's stack and copies the line in (single producer: the
 * thread; single consumer: the writer), and the writer thread drains all
 * rings into one batch and writes it with one write(2) every WRITER_TICK
 * (doubling up to WRITER_IDLE while there is nothing to write).
 * A worker thread thus makes no system call per line (issue: one write(2)
 * per log line was ~3 system calls per message on the hot path).
 *
 * Limits: a ring holds RING_SIZE bytes; a thread that finds its ring full
 * (more than RING_SIZE of lines within one WRITER_TICK) writes the ring's
 * content out itself, then its line, keeping the order (counted).
 * Rings are never freed (a thread may outlive fd_log_stop()); a thread
 * that registers after MAX_RINGS writes directly.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "finaldot/log.h"

#define RING_SIZE (256u << 10) /* power of two */
#define MAX_RINGS 1024u
#define BATCH_MAX (1u << 20)
#define WRITER_TICK_NS 3000000L /* 3 ms */
/* With nothing to write the tick doubles up to this (an idle daemon's
 * writer woke 333 times a second): 20 ms of lines at 30,000 messages a
 * second (~600 octets each) fit in two workers' rings. */
#define WRITER_IDLE_NS 20000000L

static enum fd_log_level cur_level = FD_LOG_INFO;

struct log_ring {
	pthread_mutex_t drain_mu; /* consumers: the writer, or the owner of
				   * a full ring flushing it itself */
	_Alignas(64) _Atomic uint64_t head; /* bytes written (producer) */
	_Alignas(64) _Atomic uint64_t tail; /* bytes drained (writer) */
	_Alignas(64) uint8_t buf[RING_SIZE];
};

static struct {
	pthread_mutex_t mu;
	/* Held from copying lines out of the rings until they are written,
	 * by the writer and by a thread flushing its full ring, so no line
	 * overtakes an older one of the same thread. Order: write_mu, then
	 * a ring's drain_mu. */
	pthread_mutex_t write_mu;
	pthread_t thr;
	_Atomic bool running;
	_Atomic bool stop;
	_Atomic bool reopen;
	_Atomic int fd; /* destination */
	char path[4096];
	struct log_ring *rings[MAX_RINGS];
	_Atomic unsigned n_rings;
	_Atomic unsigned long direct;
	_Atomic unsigned generation; /* bumped by fd_log_start() */
} g = {
	.mu = PTHREAD_MUTEX_INITIALIZER,
	.write_mu = PTHREAD_MUTEX_INITIALIZER,
	.fd = STDERR_FILENO,
};

static __thread struct log_ring *my_ring;
static __thread unsigned my_generation;
/* The line's date and time to the second, made once a second per thread
 * ("YYYY-MM-DDTHH:MM:SS", 19 octets): gmtime_r(), strftime() and a
 * snprintf() for the head of every line were a third of a line's cost
 * (a delivery line: 440-950 ns with them, 290-600 without). */
static __thread time_t stamp_sec = -1;
static __thread char stamp[24];

#ifdef FINALDOT_FAULT_INJECTION
void (*_Atomic fd_log_test_hook)(int what);
#define TEST_HOOK(w)                                                         \
	do {                                                                 \
		void (*h_)(int) = atomic_load(&fd_log_test_hook);            \
		if (h_)                                                      \
			h_(w);                                               \
	} while (0)
#else
#define TEST_HOOK(w) ((void)0)
#endif

void
fd_log_set_level(enum fd_log_level level)
{
	cur_level = level;
}

enum fd_log_level
fd_log_get_level(void)
{
	return cur_level;
}

static const char *
level_name(enum fd_log_level l)
{
	switch (l) {
	case FD_LOG_ERR:
		return "error";
	case FD_LOG_WARN:
		return "warn";
	case FD_LOG_INFO:
		return "info";
	case FD_LOG_DEBUG:
		return "debug";
	}
	return "?";
}

static void
write_all(int fd, const uint8_t *p, size_t n)
{
	while (n) {
		ssize_t r = write(fd, p, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return; /* nothing sensible to do about a log error */
		p += r;
		n -= (size_t)r;
	}
}

/* This thread's ring, registered on first use; NULL: write directly. */
static struct log_ring *
ring_get(void)
{
	unsigned gen = atomic_load_explicit(&g.generation,
					    memory_order_acquire);

	if (!atomic_load_explicit(&g.running, memory_order_acquire))
		return NULL;
	if (my_ring && my_generation == gen)
		return my_ring;
	my_ring = NULL;
	pthread_mutex_lock(&g.mu);
	unsigned n = atomic_load(&g.n_rings);
	if (atomic_load(&g.running) && n < MAX_RINGS) {
		struct log_ring *r = aligned_alloc(64, sizeof(*r));
		if (r) {
			pthread_mutex_init(&r->drain_mu, NULL);
			atomic_init(&r->head, 0);
			atomic_init(&r->tail, 0);
			g.rings[n] = r;
			atomic_store_explicit(&g.n_rings, n + 1,
					      memory_order_release);
			my_ring = r;
			my_generation = gen;
		}
	}
	pthread_mutex_unlock(&g.mu);
	return my_ring;
}

static bool
ring_put(struct log_ring *r, const char *p, size_t n)
{
	uint64_t h = atomic_load_explicit(&r->head, memory_order_relaxed);
	uint64_t t = atomic_load_explicit(&r->tail, memory_order_acquire);
	size_t off, first;

	if (n > RING_SIZE - (h - t))
		return false;
	off = (size_t)(h & (RING_SIZE - 1));
	first = RING_SIZE - off < n ? RING_SIZE - off : n;
	memcpy(r->buf + off, p, first);
	memcpy(r->buf, p + first, n - first);
	atomic_store_explicit(&r->head, h + n, memory_order_release);
	return true;
}

/* Write out everything in r now (its owner, when it is full). */
static void
ring_flush(struct log_ring *r)
{
	int fd = atomic_load_explicit(&g.fd, memory_order_relaxed);
	uint64_t t, h;
	size_t k, off, first;

	pthread_mutex_lock(&g.write_mu);
	pthread_mutex_lock(&r->drain_mu);
	t = atomic_load_explicit(&r->tail, memory_order_relaxed);
	h = atomic_load_explicit(&r->head, memory_order_acquire);
	k = (size_t)(h - t);
	off = (size_t)(t & (RING_SIZE - 1));
	first = RING_SIZE - off < k ? RING_SIZE - off : k;
	write_all(fd, r->buf + off, first);
	write_all(fd, r->buf, k - first);
	atomic_store_explicit(&r->tail, h, memory_order_release);
	pthread_mutex_unlock(&r->drain_mu);
	pthread_mutex_unlock(&g.write_mu);
}

#define STAMP_LEN 19u
#define LINE_MAX_LEN 1024u /* fd_log()'s line, its newline included */

void
fd_log(enum fd_log_level level, const char *component, const char *fmt, ...)
{
	char line[LINE_MAX_LEN];
	struct timespec ts;
	struct tm tm;
	struct log_ring *ring;
	const char *lv;
	size_t n, k;
	int r;
	va_list ap;

	if (level > cur_level)
		return;
	clock_gettime(CLOCK_REALTIME, &ts);
	if (ts.tv_sec != stamp_sec) {
		gmtime_r(&ts.tv_sec, &tm);
		if (strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S",
			     &tm) != STAMP_LEN)
			memset(stamp, '?', STAMP_LEN);
		stamp_sec = ts.tv_sec;
	}
	memcpy(line, stamp, STAMP_LEN);
	n = STAMP_LEN;
	line[n++] = '.';
	for (long us = ts.tv_nsec / 1000, i = 5; i >= 0; i--, us /= 10)
		line[n + (size_t)i] = (char)('0' + us % 10);
	n += 6;
	line[n++] = 'Z';
	line[n++] = ' ';
	lv = level_name(level);
	k = strlen(lv);
	memcpy(line + n, lv, k);
	n += k;
	line[n++] = ' ';
	k = strnlen(component, 64);
	memcpy(line + n, component, k);
	n += k;
	line[n++] = ' ';
	va_start(ap, fmt);
	r = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
	va_end(ap);
	if (r > 0)
		n += (size_t)r;
	if (n > sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	ring = ring_get();
	if (ring && ring_put(ring, line, n))
		return;
	if (ring) {
		/* Full: write out what it holds first, so this thread's
		 * lines stay in order; then the line goes in. */
		atomic_fetch_add_explicit(&g.direct, 1, memory_order_relaxed);
		ring_flush(ring);
		if (ring_put(ring, line, n))
			return;
	}
	write_all(atomic_load_explicit(&g.fd, memory_order_relaxed),
		  (const uint8_t *)line, n);
}

/* ---- the writer --------------------------------------------------------- */

static size_t
drain_into(uint8_t *batch, size_t cap)
{
	unsigned n = atomic_load_explicit(&g.n_rings, memory_order_acquire);
	size_t len = 0;

	for (unsigned i = 0; i < n && len < cap; i++) {
		struct log_ring *r = g.rings[i];
		uint64_t t, h;
		size_t k, off, first;

		TEST_HOOK((int)i);
		if (atomic_load_explicit(&r->head, memory_order_relaxed) ==
		    atomic_load_explicit(&r->tail, memory_order_relaxed))
			continue;
		pthread_mutex_lock(&r->drain_mu);
		t = atomic_load_explicit(&r->tail, memory_order_relaxed);
		h = atomic_load_explicit(&r->head, memory_order_acquire);
		k = (size_t)(h - t);
		if (k == 0) {
			pthread_mutex_unlock(&r->drain_mu);
			continue;
		}
		if (k > cap - len) {
			/* Whole lines only: cut at the last newline that
			 * fits (a line is at most LINE_MAX_LEN, and
			 * drain_all() leaves at least that much room). */
			k = cap - len;
		}
		off = (size_t)(t & (RING_SIZE - 1));
		first = RING_SIZE - off < k ? RING_SIZE - off : k;
		memcpy(batch + len, r->buf + off, first);
		memcpy(batch + len + first, r->buf, k - first);
		if (h - t != k) {
			size_t keep = k;
			while (keep && batch[len + keep - 1] != '\n')
				keep--;
			k = keep;
		}
		len += k;
		atomic_store_explicit(&r->tail, t + k, memory_order_release);
		pthread_mutex_unlock(&r->drain_mu);
	}
	return len;
}

/*
 * What the rings hold, pass after pass until one finds nothing: then a
 * line logged before any line in the batch is in the batch too (or was
 * written before), whichever threads logged them. A pass looks at the
 * rings one after another; with one pass per write, a line put into a
 * ring just after its turn, followed by a line it caused in a ring whose
 * turn was still to come (a delivery thread's outcome, then the queue
 * manager's line about it), went out without its cause, and a reader
 * that saw the second line (a test, an operator's grep) found no first.
 * It stops early only when the batch is full.
 */
static size_t
drain_all(uint8_t *batch, size_t cap)
{
	size_t len = 0, k;

	/* A pass with less room than a line takes nothing: it would look
	 * like an empty one. */
	while (cap - len >= LINE_MAX_LEN &&
	       (k = drain_into(batch + len, cap - len)) > 0)
		len += k;
	return len;
}

static void
do_reopen(void)
{
	int fd, old;

	if (!g.path[0])
		return;
	fd = open(g.path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	if (fd < 0)
		return; /* keep writing to the old file */
	old = atomic_exchange(&g.fd, fd);
	if (old != STDERR_FILENO)
		close(old);
}

static void *
writer_main(void *arg)
{
	uint8_t *batch = arg;
	long tick = WRITER_TICK_NS;

	for (;;) {
		bool stopping = atomic_load(&g.stop);
		size_t n, total = 0;
		struct timespec d = {.tv_sec = 0};

		if (atomic_exchange(&g.reopen, false))
			do_reopen();
		do {
			pthread_mutex_lock(&g.write_mu);
			n = drain_all(batch, BATCH_MAX);
			write_all(atomic_load(&g.fd), batch, n);
			TEST_HOOK(-1);
			pthread_mutex_unlock(&g.write_mu);
			total += n;
		} while (n > 0);
		if (stopping)
			break;
		tick = total ? WRITER_TICK_NS
			     : (tick * 2 < WRITER_IDLE_NS ? tick * 2
							  : WRITER_IDLE_NS);
		d.tv_nsec = tick;
		nanosleep(&d, NULL);
	}
	free(batch);
	return NULL;
}

int
fd_log_start(void)
{
	uint8_t *batch;
	int r;

	if (atomic_load(&g.running))
		return 0;
	batch = malloc(BATCH_MAX);
	if (!batch)
		return -ENOMEM;
	pthread_mutex_lock(&g.mu);
	atomic_store(&g.stop, false);
	atomic_fetch_add(&g.generation, 1);
	r = pthread_create(&g.thr, NULL, writer_main, batch);
	if (r == 0) {
		pthread_setname_np(g.thr, "fd-log");
		atomic_store(&g.running, true);
	}
	pthread_mutex_unlock(&g.mu);
	if (r) {
		free(batch);
		return -r;
	}
	return 0;
}

int
fd_log_set_affinity(const cpu_set_t *cpus)
{
	int r = 0;

	pthread_mutex_lock(&g.mu);
	if (atomic_load(&g.running))
		r = -pthread_setaffinity_np(g.thr, sizeof(*cpus), cpus);
	pthread_mutex_unlock(&g.mu);
	return r;
}

void
fd_log_stop(void)
{
	pthread_mutex_lock(&g.mu);
	if (!atomic_load(&g.running)) {
		pthread_mutex_unlock(&g.mu);
		return;
	}
	/* New lines go direct from here on; the writer drains the rest. */
	atomic_store(&g.running, false);
	atomic_store(&g.stop, true);
	pthread_mutex_unlock(&g.mu);
	pthread_join(g.thr, NULL);
	pthread_mutex_lock(&g.mu);
	/* A line put in a ring between the writer's last drain and now
	 * (a thread that saw running just before it changed). */
	{
		uint8_t *b = malloc(BATCH_MAX);
		size_t n = 1;
		pthread_mutex_lock(&g.write_mu);
		while (b && n > 0) {
			n = drain_all(b, BATCH_MAX);
			write_all(atomic_load(&g.fd), b, n);
		}
		pthread_mutex_unlock(&g.write_mu);
		free(b);
	}
	/* The rings stay (reachable from g.rings): a thread still running
	 * (a delivery abandoned at a stop timeout) may hold a pointer to its
	 * ring; from now on it writes directly. */
	pthread_mutex_unlock(&g.mu);
}

int
fd_log_open_file(const char *path)
{
	int fd;

	if (strlen(path) >= sizeof(g.path))
		return -ENAMETOOLONG;
	fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	if (fd < 0)
		return -errno;
	strcpy(g.path, path);
	fd = atomic_exchange(&g.fd, fd);
	if (fd != STDERR_FILENO)
		close(fd);
	return 0;
}

void
fd_log_reopen(void)
{
	atomic_store(&g.reopen, true);
}

unsigned long
fd_log_direct_writes(void)
{
	return atomic_load(&g.direct);
}

char *
fd_log_escape(char *dst, size_t dstsz, const void *src, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	const unsigned char *s = src;
	size_t o = 0;

	if (dstsz == 0)
		return dst;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = s[i];
		int plain = c > 0x20 && c < 0x7f && c != '"' && c != '\\' &&
			    c != '=';
		size_t need = plain ? 1 : 4;
		if (o + need + 4 > dstsz) {
			if (o + 4 <= dstsz) {
				dst[o++] = '.';
				dst[o++] = '.';
				dst[o++] = '.';
			}
			break;
		}
		if (plain) {
			dst[o++] = (char)c;
		} else {
			dst[o++] = '\\';
			dst[o++] = 'x';
			dst[o++] = hex[c >> 4];
			dst[o++] = hex[c & 0xf];
		}
	}
	dst[o] = '\0';
	return dst;
}
