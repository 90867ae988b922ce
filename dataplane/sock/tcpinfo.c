/*
 * The octets a peer's TCP has acknowledged on a socket, from the kernel's
 * TCP_INFO (tcpi_bytes_acked, RFC 4898 tcpEStatsAppHCThruOctetsAcked,
 * Linux 4.1+). Kept in its own file: it needs <linux/tcp.h>, whose
 * struct tcp_info clashes with glibc's older one in <netinet/tcp.h>.
 *
 * The counter survives a reset (the kernel keeps it until the socket is
 * closed), unlike SIOCOUTQ, whose queue a RST purges: so it answers "was
 * this reply acknowledged?" however the connection ended.
 */
#include <errno.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>

#include "sock/tcpinfo.h"

int
sock_bytes_acked(int fd, uint64_t *out)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);

	memset(&ti, 0, sizeof(ti));
	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0)
		return -errno;
	if (len < offsetof(struct tcp_info, tcpi_bytes_acked) +
			  sizeof(ti.tcpi_bytes_acked))
		return -EOPNOTSUPP; /* a kernel without the counter */
	*out = ti.tcpi_bytes_acked;
	return 0;
}
