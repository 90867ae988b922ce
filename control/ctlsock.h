/*
 * The control socket: a unix stream socket where finaldotctl (or any
 * script) asks the running daemon for its status, lists and changes the
 * queue, pauses and resumes the listener and asks for a reload. The
 * protocol, one JSON text per line each way, is docs/control-protocol.md.
 *
 * One thread serves every client (poll(), non-blocking sockets), started
 * with the control plane's CPU set: never a worker thread, never a
 * busy-polled lcore. The queue is reached only through the control plane's
 * operator API (cplane.h), so acceptance never waits for an operator; a
 * request waits at most for one queue-manager iteration.
 *
 * Access is the socket file's: mode 0600 (the daemon's user) or, with a
 * group, 0660 and that group. The file is made under a temporary name,
 * given its mode and group, then renamed into place, so it is never
 * reachable with looser permissions. A socket file left by a daemon that
 * died is replaced; one where a daemon still answers is an error.
 *
 * Limits: CTL_MAX_CLIENTS at once (more get an error line and are closed),
 * CTL_MAX_LINE bytes per request, a client idle for CTL_IDLE_S seconds is
 * closed. A streaming reply (queue.list, queue.cat) holds a few chunks in
 * memory whatever its size; a queue.cat keeps the message's spool segments
 * from being reclaimed until it ends (at most CTL_IDLE_S after its client
 * stops reading).
 */
#ifndef FINALDOT_CONTROL_CTLSOCK_H
#define FINALDOT_CONTROL_CTLSOCK_H

#include <sched.h>
#include <stddef.h>

#include "metrics.h"

#define CTL_MAX_CLIENTS 32
#define CTL_MAX_LINE (1u << 20)
#define CTL_IDLE_S 60

struct ctl_server;

/*
 * Make the socket at path (group: a group name or "" for none) and start
 * serving src. NULL with *err = -errno and a log line saying why.
 */
struct ctl_server *ctl_start(const char *path, const char *group,
			     const struct ctl_sources *src,
			     const cpu_set_t *cpus, int *err);
/* Stop the thread, close every client, remove the socket file. */
void ctl_stop(struct ctl_server *s);

/*
 * What a start would check, without making anything (--check-config): the
 * group exists, the socket's directory is there (or can be made) and is
 * writable, and no daemon answers at path. 0, or -errno with why filled.
 */
int ctl_check(const char *path, const char *group, char *why, size_t n);

/*
 * Both operator servers from the daemon's settings: the control socket
 * (unless control = off) and /metrics (when metrics is set). A control
 * socket the operator named (or gave a group) must start; the default one
 * (beside the spool) only warns when it cannot. NULL with *err = -errno when a server that
 * must run did not (logged); the pointer otherwise, even if neither runs.
 */
struct fd_config;
struct ctl_ops;
struct ctl_ops *ctl_ops_start(const struct fd_config *cfg,
			      const struct ctl_sources *src,
			      const cpu_set_t *cpus, int *err);
void ctl_ops_stop(struct ctl_ops *o);
/* --check-config: what ctl_ops_start() would refuse. 0, 1 (a warning in
 * why: the default control socket cannot be used) or -errno (why). */
int ctl_ops_check(const struct fd_config *cfg, char *why, size_t n);

#endif
