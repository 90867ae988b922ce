/*
 * Logging: one line per event, key=value, to stderr (the service manager
 * takes it from there). Format of every line:
 *
 *   2026-11-23T01:02:03.456789Z LEVEL component key=value key=value ...
 *
 * Session-scoped lines put the 16-hex-digit session id first (so one grep finds a
 * whole session): fd_log(FD_LOG_INFO, "smtp", "%016" PRIx64 " event=queued id=%s", ...).
 * Values that come from the network must go through fd_log_escape() first.
 *
 * fd_debug() compiles to nothing unless FINALDOT_DEBUG is defined (debug
 * builds). Nothing may be logged per packet on the data path.
 */
#ifndef FINALDOT_LOG_H
#define FINALDOT_LOG_H

#include <sched.h>
#include <stddef.h>

enum fd_log_level {
	FD_LOG_ERR = 0,
	FD_LOG_WARN = 1,
	FD_LOG_INFO = 2,
	FD_LOG_DEBUG = 3,
};

/*
 * Off the hot path (once started): fd_log() formats the line on the
 * calling thread into that thread's own buffer (a lock-free byte ring,
 * no system call) and a writer thread drains every buffer with one
 * write(2) per batch, every few milliseconds. Lines of one thread keep
 * their order; lines of different threads may be written up to a batch
 * out of order (each carries its own timestamp), but once a line is in
 * the file, so is every line any thread logged before it (a reader that
 * waits for one line may then look for its causes); not so for a thread
 * whose buffer is full: it writes its buffer and its line directly
 * (counted, never lost). Before fd_log_start() and after fd_log_stop()
 * every line is one write(2), as tools and start-up errors need. After
 * kill -9 the last few milliseconds of lines may be missing.
 *
 * fd_log_start(): 0 or -errno. fd_log_stop(): writes everything pending,
 * stops the thread. fd_log_open_file(): lines go to PATH (appended, made
 * 0640 if new) instead of stderr; 0 or -errno (the old destination stays).
 * fd_log_reopen(): ask the writer to reopen that file (logrotate; SIGUSR1):
 * async-signal-safe.
 */
int fd_log_start(void);
void fd_log_stop(void);
/* Move the writer thread to cpus: it starts before the DPDK EAL pins the
 * process's threads, and must then leave the busy-polled cores. 0 or
 * -errno (no writer running: 0, nothing to move). */
int fd_log_set_affinity(const cpu_set_t *cpus);
int fd_log_open_file(const char *path);
void fd_log_reopen(void);
/* Lines that found their buffer full and were written directly. */
unsigned long fd_log_direct_writes(void);
#ifdef FINALDOT_FAULT_INJECTION
/* Test builds: called on the writer thread before it looks at ring i of
 * a pass (i >= 0: rings in the order threads first logged) and after each
 * write of a batch (-1), with the write lock held. */
extern void (*_Atomic fd_log_test_hook)(int what);
#endif

/* Lines above this level are dropped. Default FD_LOG_INFO. Set at start. */
void fd_log_set_level(enum fd_log_level level);
enum fd_log_level fd_log_get_level(void);

__attribute__((format(printf, 3, 4))) void
fd_log(enum fd_log_level level, const char *component, const char *fmt, ...);

/*
 * Copy untrusted bytes into dst (size dstsz, always NUL-terminated) so they
 * are safe as one log value: printable ASCII other than space, '"', '\\' and
 * '=' is kept; anything else becomes \xHH. Truncates with "..." when dst is
 * too small. Returns dst.
 */
char *fd_log_escape(char *dst, size_t dstsz, const void *src, size_t len);

#ifdef FINALDOT_DEBUG
#define fd_debug(component, ...) fd_log(FD_LOG_DEBUG, component, __VA_ARGS__)
#else
#define fd_debug(component, ...) ((void)0)
#endif

#endif
