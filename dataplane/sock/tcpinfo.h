/* How many octets the peer's TCP acknowledged (tcpinfo.c). */
#ifndef FINALDOT_SOCK_TCPINFO_H
#define FINALDOT_SOCK_TCPINFO_H

#include <stdint.h>

/* 0 and *out, or -errno (-EOPNOTSUPP: the kernel lacks the counter). */
int sock_bytes_acked(int fd, uint64_t *out);

#endif
