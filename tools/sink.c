/*
 * fd-sink: an SMTP server that stores nothing, for the delivery benchmark.
 *
 * tools/bench measures what delivering costs acceptance with a next hop on
 * the same machine. Postfix's smtp-sink offers PIPELINING but not CHUNKING,
 * so finaldot's client makes one round trip per message to it; the next
 * hops it meets in production (Postfix since 3.4, Exim, Dovecot's LMTP)
 * take BDAT, and a batch of messages then goes in one write and one round
 * trip. This sink offers both, so that the benchmark can show each case.
 * It answers every transaction 250 and keeps only counts.
 *
 * One thread, epoll, non-blocking sockets. Per connection: an input buffer
 * parsed as far as it goes, the replies to everything a read brought
 * gathered and written at once (a pipelining client gets one segment per
 * group). DATA ends at CRLF.CRLF (found across reads); BDAT consumes its
 * octet count. Lines longer than the buffer are answered 500 and skipped.
 *
 * --stall N:MS (tests): the connection that carries the N-th message
 * stops for MS milliseconds after its data ended: the final reply held,
 * nothing read or written on it, the other connections served meanwhile
 * (a next hop stuck on one connection).
 *
 * Binds loopback only (127.0.0.0/8, ::1): it is an instrument, not a
 * server. SIGTERM or SIGINT ends it; it then prints one JSON object with
 * the counts on stdout.
 *
 * Exit: 0 ok, 1 error, 2 usage.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "lg_addr.h"

#define IN_CAP (64u * 1024u)
#define OUT_CAP (16u * 1024u)
#define OUT_ROOM 512u /* more than any one command's replies */
#define MAX_EVENTS 64

enum state { S_CMD, S_DATA, S_BDAT };

struct conn {
	int fd;
	enum state st;
	uint8_t in[IN_CAP];
	size_t in_len;
	char out[OUT_CAP];
	size_t out_len, out_off;
	bool skipping;     /* discarding the rest of an overlong line */
	unsigned match;    /* DATA: octets of "\r\n.\r\n" matched so far */
	uint64_t bdat_left;
	bool bdat_last;
	bool closing;      /* close once the output is written */
	struct conn *next, *prev; /* every open connection (g.conns) */
};

static struct {
	uint64_t sessions, messages, data_msgs, bdat_msgs, bytes;
	bool chunking;
	uint64_t stall_n, stall_ms;  /* --stall N:MS, 0: none */
	struct conn *stalled;        /* the connection stopped, until */
	struct conn *conns;          /* open ones, freed at the end too */
	uint64_t stall_until_ms;
	volatile sig_atomic_t stop;
} g = {.chunking = true};

static uint64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void
on_signal(int sig)
{
	(void)sig;
	g.stop = 1;
}

static void
reply(struct conn *c, const char *s)
{
	size_t n = strlen(s);

	/* parse() stops while less than OUT_ROOM is left, and no single
	 * command's reply is longer. */
	if (c->out_len + n > OUT_CAP)
		abort();
	memcpy(c->out + c->out_len, s, n);
	c->out_len += n;
}

static void
message_done(struct conn *c, bool bdat)
{
	g.messages++;
	if (bdat)
		g.bdat_msgs++;
	else
		g.data_msgs++;
	reply(c, "250 2.0.0 Ok: discarded\r\n");
	if (g.stall_n && g.messages == g.stall_n) {
		g.stalled = c;
		g.stall_until_ms = now_ms() + g.stall_ms;
	}
}

static bool
verb(const uint8_t *line, size_t len, const char *v)
{
	size_t n = strlen(v);

	return len >= n && strncasecmp((const char *)line, v, n) == 0 &&
	       (len == n || line[n] == ' ' || line[n] == '\r');
}

/* One command line (without its CRLF). */
static void
command(struct conn *c, const uint8_t *line, size_t len)
{
	if (verb(line, len, "EHLO")) {
		reply(c, "250-fd-sink\r\n250-PIPELINING\r\n250-SIZE 0\r\n"
			 "250-8BITMIME\r\n250-SMTPUTF8\r\n");
		if (g.chunking)
			reply(c, "250-CHUNKING\r\n");
		reply(c, "250 ENHANCEDSTATUSCODES\r\n");
	} else if (verb(line, len, "HELO")) {
		reply(c, "250 fd-sink\r\n");
	} else if (verb(line, len, "MAIL") || verb(line, len, "RCPT") ||
		   verb(line, len, "RSET") || verb(line, len, "NOOP")) {
		reply(c, "250 2.0.0 Ok\r\n");
	} else if (verb(line, len, "DATA")) {
		reply(c, "354 End data with <CR><LF>.<CR><LF>\r\n");
		c->st = S_DATA;
		c->match = 2; /* the command's CRLF starts the terminator */
	} else if (g.chunking && verb(line, len, "BDAT")) {
		char tmp[64], *end;
		unsigned long long sz;
		size_t n = len - 4;

		if (n > sizeof(tmp) - 1)
			n = sizeof(tmp) - 1;
		memcpy(tmp, line + 4, n);
		tmp[n] = 0;
		errno = 0;
		sz = strtoull(tmp, &end, 10);
		if (end == tmp || errno || strchr(tmp, '-')) {
			reply(c, "501 5.5.4 BDAT needs a size\r\n");
			return;
		}
		while (*end == ' ')
			end++;
		c->bdat_last = strncasecmp(end, "LAST", 4) == 0;
		c->bdat_left = sz;
		if (sz == 0) { /* nothing follows: done now */
			if (c->bdat_last)
				message_done(c, true);
			else
				reply(c, "250 2.0.0 Ok: chunk\r\n");
			return;
		}
		c->st = S_BDAT;
	} else if (verb(line, len, "QUIT")) {
		reply(c, "221 2.0.0 Bye\r\n");
		c->closing = true;
	} else {
		reply(c, "500 5.5.2 Unknown command\r\n");
	}
}

/* Consume what the input buffer holds, leaving a partial line in it; or
 * stop early for room to reply (true: call again after a write). */
static bool
parse(struct conn *c)
{
	size_t off = 0;
	bool full = false;

	while (off < c->in_len && !c->closing && g.stalled != c) {
		if (OUT_CAP - c->out_len < OUT_ROOM) {
			full = true;
			break;
		}
		const uint8_t *p = c->in + off;
		size_t n = c->in_len - off;

		if (c->st == S_BDAT) {
			size_t take = n;

			if (take > c->bdat_left)
				take = (size_t)c->bdat_left;

			c->bdat_left -= take;
			g.bytes += take;
			off += take;
			if (c->bdat_left == 0) {
				c->st = S_CMD;
				if (c->bdat_last)
					message_done(c, true);
				else
					reply(c, "250 2.0.0 Ok: chunk\r\n");
			}
			continue;
		}
		if (c->st == S_DATA) {
			static const char term[] = "\r\n.\r\n";
			size_t i;

			for (i = 0; i < n; i++) {
				if (p[i] == (uint8_t)term[c->match])
					c->match++;
				else
					c->match = p[i] == '\r' ? 1 : 0;
				if (c->match == 5)
					break;
			}
			if (i == n) {
				g.bytes += n;
				off += n;
				continue;
			}
			g.bytes += i + 1;
			off += i + 1;
			c->st = S_CMD;
			message_done(c, false);
			continue;
		}
		const uint8_t *lf = memchr(p, '\n', n);
		if (!lf) {
			if (n == IN_CAP) { /* a line longer than we hold */
				if (!c->skipping)
					reply(c, "500 5.5.2 Line too long\r\n");
				c->skipping = true;
				off += n;
			}
			break;
		}
		size_t len = (size_t)(lf - p);
		if (len && p[len - 1] == '\r')
			len--;
		if (c->skipping)
			c->skipping = false;
		else
			command(c, p, len);
		off += (size_t)(lf - p) + 1;
	}
	memmove(c->in, c->in + off, c->in_len - off);
	c->in_len -= off;
	return full;
}

static int
flush_out(struct conn *c)
{
	while (c->out_off < c->out_len) {
		ssize_t w = send(c->fd, c->out + c->out_off,
				 c->out_len - c->out_off, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 1; /* more to write: wait for EPOLLOUT */
			if (errno == EINTR)
				continue;
			return -1;
		}
		c->out_off += (size_t)w;
	}
	c->out_len = c->out_off = 0;
	return 0;
}

static void
conn_close(int ep, struct conn *c)
{
	if (ep >= 0)
		epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	if (c->prev)
		c->prev->next = c->next;
	else
		g.conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	if (g.stalled == c)
		g.stalled = NULL;
	free(c);
}

/* Parse, write the replies, read more, until the socket would block. */
static void
conn_event(int ep, struct conn *c)
{
	for (;;) {
		bool more = parse(c);
		int r;
		uint32_t want = EPOLLIN;

		if (g.stalled == c) {
			/* Out of the epoll set (a hang-up would still be
			 * reported) until main() resumes it. */
			epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
			return;
		}
		r = flush_out(c);
		if (r < 0 || (r == 0 && c->closing)) {
			conn_close(ep, c);
			return;
		}
		if (r > 0)
			want = EPOLLOUT; /* the client is not reading */
		else if (more)
			continue;         /* input left, room again */
		else {
			ssize_t n = recv(c->fd, c->in + c->in_len,
					 IN_CAP - c->in_len, 0);
			if (n > 0) {
				c->in_len += (size_t)n;
				continue;
			}
			if (n < 0 && errno == EINTR)
				continue;
			if (n == 0 ||
			    (errno != EAGAIN && errno != EWOULDBLOCK)) {
				conn_close(ep, c);
				return;
			}
		}
		struct epoll_event e = {.events = want, .data.ptr = c};
		epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
		return;
	}
}

static void
usage(FILE *f)
{
	fprintf(f,
		"usage: fd-sink --listen HOST:PORT [--no-chunking] "
		"[--stall N:MS]\n"
		"\n"
		"An SMTP server that stores nothing (tools/bench's delivery "
		"next hop):\n"
		"every transaction is answered 250 and counted. Offers "
		"PIPELINING,\n"
		"8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES and CHUNKING (BDAT).\n"
		"\n"
		"  --listen HOST:PORT  numeric loopback address (127.0.0.0/8, "
		"::1) to bind\n"
		"  --no-chunking       do not offer CHUNKING (as Postfix's "
		"smtp-sink)\n"
		"  --stall N:MS        hold the final reply to the N-th "
		"message, and its\n"
		"                      connection, for MS milliseconds "
		"(tests: a next hop\n"
		"                      stuck on one connection)\n"
		"  --help              this text\n"
		"\n"
		"SIGTERM or SIGINT ends it; it then prints one JSON object: "
		"sessions,\n"
		"messages, data_messages, bdat_messages, bytes.\n"
		"Exit: 0 ok, 1 error, 2 usage.\n");
}

int
main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"listen", required_argument, NULL, 'l'},
		{"no-chunking", no_argument, NULL, 'C'},
		{"stall", required_argument, NULL, 'S'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	struct sockaddr_storage ss;
	socklen_t sl = 0;
	const char *listen_at = NULL;
	struct epoll_event evs[MAX_EVENTS];
	int o, lfd, ep, one = 1;

	while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (o) {
		case 'l':
			listen_at = optarg;
			break;
		case 'C':
			g.chunking = false;
			break;
		case 'S': {
			char *end;
			errno = 0;
			g.stall_n = strtoull(optarg, &end, 10);
			if (*end == ':')
				g.stall_ms = strtoull(end + 1, &end, 10);
			if (errno || *end || !g.stall_n || !g.stall_ms ||
			    strchr(optarg, '-')) {
				usage(stderr);
				return 2;
			}
			break;
		}
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc || !listen_at ||
	    lg_parse_addr(listen_at, &ss, &sl) != 0) {
		usage(stderr);
		return 2;
	}
	if (!lg_is_loopback(&ss)) {
		fprintf(stderr,
			"fd-sink: refusing %s: not a loopback address\n",
			listen_at);
		return 2;
	}
	lfd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
		     0);
	if (lfd < 0 ||
	    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(lfd, (struct sockaddr *)&ss, sl) || listen(lfd, 1024)) {
		fprintf(stderr, "fd-sink: %s: %s\n", listen_at,
			strerror(errno));
		return 1;
	}
	ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event le = {.events = EPOLLIN, .data.ptr = NULL};
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &le)) {
		fprintf(stderr, "fd-sink: epoll: %s\n", strerror(errno));
		return 1;
	}
	struct sigaction sa = {.sa_handler = on_signal};
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	while (!g.stop) {
		int wait_ms = 200, n;

		if (g.stalled) {
			uint64_t t = now_ms();
			if (t >= g.stall_until_ms) {
				struct conn *c = g.stalled;
				struct epoll_event e = {.events = EPOLLIN,
							.data.ptr = c};
				g.stalled = NULL;
				g.stall_n = 0;
				if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e)) {
					conn_close(-1, c);
					continue;
				}
				conn_event(ep, c);
				continue;
			}
			if (g.stall_until_ms - t < (uint64_t)wait_ms)
				wait_ms = (int)(g.stall_until_ms - t);
		}
		n = epoll_wait(ep, evs, MAX_EVENTS, wait_ms);

		for (int i = 0; i < n; i++) {
			struct conn *c = evs[i].data.ptr;

			if (c) {
				conn_event(ep, c);
				continue;
			}
			for (;;) {
				int fd = accept4(lfd, NULL, NULL,
						 SOCK_NONBLOCK | SOCK_CLOEXEC);
				if (fd < 0)
					break;
				c = calloc(1, sizeof(*c));
				if (!c) {
					close(fd);
					continue;
				}
				c->fd = fd;
				c->next = g.conns;
				if (g.conns)
					g.conns->prev = c;
				g.conns = c;
				setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one,
					   sizeof(one));
				g.sessions++;
				reply(c, "220 fd-sink ESMTP\r\n");
				struct epoll_event e = {.events = EPOLLIN,
							.data.ptr = c};
				if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e)) {
					conn_close(-1, c);
					continue;
				}
				conn_event(ep, c);
			}
		}
	}
	while (g.conns) /* sessions still open at the end */
		conn_close(-1, g.conns);
	printf("{\"sessions\":%llu,\"messages\":%llu,\"data_messages\":%llu,"
	       "\"bdat_messages\":%llu,\"bytes\":%llu}\n",
	       (unsigned long long)g.sessions, (unsigned long long)g.messages,
	       (unsigned long long)g.data_msgs,
	       (unsigned long long)g.bdat_msgs, (unsigned long long)g.bytes);
	return 0;
}
