/* Who listens on an address: the check that a listening group is ours
 * (owner.c). */
#ifndef FINALDOT_SOCK_OWNER_H
#define FINALDOT_SOCK_OWNER_H

#include <sys/socket.h>

/*
 * Count the TCP sockets in LISTEN on exactly addr (same address, same
 * port) that are none of fds[0..n): the kernel's list of sockets in this
 * network namespace (/proc/net/tcp or tcp6) against the inodes of fds.
 * *stranger: the inode of one of them (0 when none). Returns the count, or
 * -errno when the list cannot be read.
 */
int sock_listen_strangers(const struct sockaddr_storage *addr, const int *fds,
			  unsigned n, unsigned long *stranger);

#endif
