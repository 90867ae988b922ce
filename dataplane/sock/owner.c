/*
 * Who listens on an address. The kernel lists every TCP socket of the
 * network namespace in /proc/net/tcp (IPv4) and /proc/net/tcp6, one line
 * each:
 *
 *   sl  local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
 *   0: 0100007F:0019 00000000:0000 0A ...                            4711
 *
 * The address is printed as the 32-bit words of its network-order bytes,
 * each with %08X of its value on this machine, and the port in host order;
 * state 0A is LISTEN. Reading a word back with strtoul gives the same
 * in-memory word, so it is compared with the address as stored.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "sock/owner.h"

#define TCP_LISTEN 0x0a

/* The words of addr's address and its port; the number of words (1 or 4)
 * or 0 for another family. */
static unsigned
addr_words(const struct sockaddr_storage *addr, uint32_t w[4], unsigned *port)
{
	if (addr->ss_family == AF_INET) {
		const struct sockaddr_in *a = (const void *)addr;
		memcpy(w, &a->sin_addr, 4);
		*port = ntohs(a->sin_port);
		return 1;
	}
	if (addr->ss_family == AF_INET6) {
		const struct sockaddr_in6 *a = (const void *)addr;
		memcpy(w, &a->sin6_addr, 16);
		*port = ntohs(a->sin6_port);
		return 4;
	}
	return 0;
}

/* One line's local address equals w/port and its state is LISTEN: its
 * inode, else 0. */
static unsigned long
line_listener(const char *line, const uint32_t *w, unsigned nw, unsigned port)
{
	char hex[33], word[9];
	unsigned lport, st;
	unsigned long inode;

	if (sscanf(line, " %*s %32[0-9A-Fa-f]:%x %*s %x %*s %*s %*s %*u %*u %lu",
		   hex, &lport, &st, &inode) != 4)
		return 0;
	if (st != TCP_LISTEN || lport != port || strlen(hex) != nw * 8)
		return 0;
	for (unsigned i = 0; i < nw; i++) {
		memcpy(word, hex + i * 8, 8);
		word[8] = '\0';
		if ((uint32_t)strtoul(word, NULL, 16) != w[i])
			return 0;
	}
	return inode;
}

int
sock_listen_strangers(const struct sockaddr_storage *addr, const int *fds,
		      unsigned n, unsigned long *stranger)
{
	uint32_t w[4];
	unsigned port, nw = addr_words(addr, w, &port);
	char line[512];
	int count = 0;
	FILE *f;

	*stranger = 0;
	if (!nw)
		return -EAFNOSUPPORT;
	f = fopen(nw == 1 ? "/proc/net/tcp" : "/proc/net/tcp6", "re");
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		unsigned long inode = line_listener(line, w, nw, port);
		bool ours = false;

		if (!inode)
			continue;
		for (unsigned k = 0; k < n && !ours; k++) {
			struct stat sb;
			ours = fstat(fds[k], &sb) == 0 &&
			       (unsigned long)sb.st_ino == inode;
		}
		if (!ours) {
			count++;
			*stranger = inode;
		}
	}
	if (ferror(f))
		count = -EIO;
	fclose(f);
	return count;
}
