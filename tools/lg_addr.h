/*
 * Addresses of the measuring tools: "HOST:PORT" or "[V6]:PORT", numeric
 * (no DNS), and the loopback test both tools refuse other addresses with.
 */
#ifndef FD_TOOLS_LG_ADDR_H
#define FD_TOOLS_LG_ADDR_H

#include <stdbool.h>
#include <sys/socket.h>

/* 0, or -1 when S is not a numeric address with a port 1..65535. */
int lg_parse_addr(const char *s, struct sockaddr_storage *ss, socklen_t *len);
/* 127.0.0.0/8, ::1, or ::ffff:127.0.0.0/104. */
bool lg_is_loopback(const struct sockaddr_storage *ss);

#endif
