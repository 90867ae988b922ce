/*
 * The kernel-socket transport: the same SMTP engine and spool as the DPDK
 * path, over the kernel's TCP, driven by one io_uring per worker thread.
 * It is the default transport and the baseline the kernel-bypass path is
 * measured against.
 */
#ifndef FINALDOT_SOCK_H
#define FINALDOT_SOCK_H

struct fd_worker;

/*
 * Run worker w until w->stop is set and its sessions have ended (or the
 * shutdown timeout passed: then whatever is left, spool writes included,
 * is abandoned after a 421 to every session). Opens its own SO_REUSEPORT
 * listeners on every configured address, once the first worker has
 * claimed each address for this process (another finaldot there: every
 * worker fails with -EADDRINUSE). Sets w->exit_status; returns it.
 */
int sock_worker_run(struct fd_worker *w);

#endif
