/*
 * fd-loadgen: an SMTP load generator that measures what finaldot promises.
 *
 * For every message it takes the time from handing the kernel the last byte
 * of the end of data (the "\r\n.\r\n" after DATA, or the last byte of a
 * BDAT LAST chunk, RFC 3030) to reading the complete reply: the
 * final-dot-to-250 latency, which for finaldot is dominated by one durable
 * write of its group commit (RFC 1047). It also counts replies by
 * class, messages/s over the wall time, and its own CPU time, so a run that
 * is limited by the generator rather than the server can be recognised.
 *
 * One thread, nonblocking kernel sockets, epoll edge-triggered, C
 * connections. Messages are handed out from one global counter, so fast
 * connections take more of them; a connection QUITs and reconnects after
 * --per-session messages. Per connection the client state is a FIFO of
 * expected replies (tags): without PIPELINING one command is outstanding at
 * a time; with it MAIL, RCPT and DATA (or BDAT LAST with its chunk) go out in
 * one write, as RFC 2920 3.1 allows, and the replies are matched in order.
 * After any failed transaction the connection sends RSET before the next
 * MAIL, so a half-open transaction never leaks into the next message.
 *
 * Message text: lg_msg.c (deterministic, exact size, unique Message-ID,
 * lines <= 998 octets, dot-stuffed per RFC 5321 4.5.2 for DATA).
 *
 * Policy: it connects only to the one numeric address given, and refuses
 * (exit 2) anything but loopback (127.0.0.0/8, ::1) unless --allow-nonlocal.
 *
 * Exit: 0 every message accepted; 1 some message not accepted (unless
 * --allow-failures) or the server lacks a requested extension; 2 usage.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "finaldot/msgid.h"
#include "lg_msg.h"

#define LG_IN_MAX 8192
#define LG_CMD_MAX 2048
#define LG_SEGS 8
#define LG_EXPECT 8
#define LG_MAX_CONN_FAILS 3
#define LG_ERR_LOG_MAX 10

enum lg_tag {
	LG_TAG_GREETING,
	LG_TAG_EHLO,
	LG_TAG_MAIL,
	LG_TAG_RCPT,
	LG_TAG_DATA,
	LG_TAG_FINAL, /* reply to the final dot or to BDAT LAST */
	LG_TAG_RSET,
	LG_TAG_QUIT,
};

enum lg_cstate {
	LG_CS_CONNECTING,
	LG_CS_OPEN,
	LG_CS_DONE,
};

struct lg_seg {
	const char *p;
	size_t len;
};

struct lg_conn {
	int fd;
	unsigned gen; /* bumped at every close: stale work stops */
	enum lg_cstate state;

	/* output: segments into cmd[], head, the shared body, or constants */
	struct lg_seg seg[LG_SEGS];
	unsigned seg_first, seg_n;
	bool eod_last; /* the queue's last byte ends a message's data */
	char cmd[LG_CMD_MAX];
	size_t cmd_len;
	char *head; /* this connection's copy of the message head */

	/* input */
	char in[LG_IN_MAX];
	size_t in_len;
	uint64_t t_rx; /* time of the read that brought the latest bytes */
	bool ext_pipelining, ext_chunking;

	enum lg_tag expect[LG_EXPECT];
	unsigned exp_first, exp_n;

	/* the message in flight */
	bool in_msg;
	int fail_class; /* 0, or 4/5: first failed reply of the transaction */
	uint64_t t_eod;
	unsigned session_msgs;
	unsigned fails; /* consecutive connection failures */
	uint64_t deadline;
};

struct lg_opts {
	const char *server;
	unsigned connections;
	unsigned messages;
	unsigned per_session;
	size_t size;
	bool pipelining, bdat, json, allow_failures, allow_nonlocal;
	const char *from, *to, *ehlo;
	unsigned timeout_s;
};

struct lg_run {
	struct lg_opts o;
	struct sockaddr_storage addr;
	socklen_t addr_len;
	int epfd;
	struct lg_msg msg;
	struct lg_conn *conns;
	unsigned nconns, active;
	uint64_t to_start, next_seq;
	uint64_t started, accepted, tempfail, rejected, errors;
	unsigned err_logged;
	bool fatal;
	uint64_t *lat_ns;
	size_t lat_n;
};

static const char lg_eod_dot[] = ".\r\n";

static uint64_t
lg_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

__attribute__((format(printf, 3, 4))) static void
lg_err(struct lg_run *r, struct lg_conn *c, const char *fmt, ...)
{
	if (r->err_logged++ >= LG_ERR_LOG_MAX) {
		if (r->err_logged == LG_ERR_LOG_MAX + 1)
			fprintf(stderr, "fd-loadgen: (further errors not "
			                "shown)\n");
		return;
	}
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "fd-loadgen: conn %ld: ", (long)(c - r->conns));
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

/* ---- output queue ---------------------------------------------------- */

static int
lg_out(struct lg_conn *c, const char *p, size_t len)
{
	if (c->seg_n == LG_SEGS)
		return -ENOBUFS;
	c->seg[(c->seg_first + c->seg_n) % LG_SEGS] = (struct lg_seg){p, len};
	c->seg_n++;
	c->eod_last = false;
	return 0;
}

__attribute__((format(printf, 2, 3))) static int
lg_cmd(struct lg_conn *c, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(c->cmd + c->cmd_len, sizeof(c->cmd) - c->cmd_len, fmt,
	                  ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(c->cmd) - c->cmd_len)
		return -ENOBUFS;
	int rc = lg_out(c, c->cmd + c->cmd_len, (size_t)n);
	c->cmd_len += (size_t)n;
	return rc;
}

static void
lg_expect(struct lg_conn *c, enum lg_tag t)
{
	/* callers never queue more than LG_EXPECT replies */
	c->expect[(c->exp_first + c->exp_n) % LG_EXPECT] = t;
	c->exp_n++;
}

/* Write what can be written. Returns bytes written, or -errno. */
static ssize_t
lg_flush(struct lg_conn *c)
{
	ssize_t total = 0;
	while (c->seg_n > 0) {
		struct iovec iov[LG_SEGS];
		unsigned n = 0;
		for (; n < c->seg_n; n++) {
			const struct lg_seg *s =
			        &c->seg[(c->seg_first + n) % LG_SEGS];
			iov[n].iov_base = (void *)(uintptr_t)s->p;
			iov[n].iov_len = s->len;
		}
		struct msghdr mh = {.msg_iov = iov, .msg_iovlen = n};
		ssize_t w = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return total;
			if (errno == EINTR)
				continue;
			return -errno;
		}
		total += w;
		size_t left = (size_t)w;
		while (left > 0 ||
		       (c->seg_n > 0 && c->seg[c->seg_first].len == 0)) {
			struct lg_seg *s = &c->seg[c->seg_first];
			size_t take = left < s->len ? left : s->len;
			s->p += take;
			s->len -= take;
			left -= take;
			if (s->len == 0) {
				c->seg_first = (c->seg_first + 1) % LG_SEGS;
				c->seg_n--;
			}
		}
		if (c->seg_n == 0) {
			c->cmd_len = 0;
			if (c->eod_last) {
				c->t_eod = lg_now_ns();
				c->eod_last = false;
			}
		}
	}
	return total;
}

/* ---- connections ----------------------------------------------------- */

static void lg_conn_open(struct lg_run *r, struct lg_conn *c);

static void
lg_conn_close(struct lg_run *r, struct lg_conn *c, bool reconnect)
{
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	c->gen++;
	c->seg_n = 0;
	c->seg_first = 0;
	c->cmd_len = 0;
	c->eod_last = false;
	c->in_len = 0;
	c->exp_n = 0;
	c->exp_first = 0;
	c->session_msgs = 0;
	if (reconnect && r->to_start > 0 && !r->fatal &&
	    c->fails < LG_MAX_CONN_FAILS) {
		lg_conn_open(r, c);
		return;
	}
	c->state = LG_CS_DONE;
	r->active--;
}

static void
lg_msg_done(struct lg_run *r, struct lg_conn *c, int cls)
{
	if (!c->in_msg)
		return;
	c->in_msg = false;
	switch (cls) {
	case 2:
		r->accepted++;
		break;
	case 4:
		r->tempfail++;
		break;
	case 5:
		r->rejected++;
		break;
	default:
		r->errors++;
		break;
	}
}

static void
lg_conn_fail(struct lg_run *r, struct lg_conn *c, const char *why, int err)
{
	if (err)
		lg_err(r, c, "%s: %s", why, strerror(err));
	else
		lg_err(r, c, "%s", why);
	lg_msg_done(r, c, 0);
	c->fails++;
	lg_conn_close(r, c, true);
}

static void
lg_conn_open(struct lg_run *r, struct lg_conn *c)
{
	c->state = LG_CS_CONNECTING;
	c->fd = socket(r->addr.ss_family,
	               SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->fd < 0)
		goto out_fail;
	int one = 1;
	/* replies must not wait for Nagle: we measure their latency */
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(c->fd, (const struct sockaddr *)&r->addr, r->addr_len) <
	            0 &&
	    errno != EINPROGRESS)
		goto out_fail;
	struct epoll_event ev = {
	        .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
	        .data.ptr = c,
	};
	if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
		goto out_fail;
	c->deadline = lg_now_ns() + (uint64_t)r->o.timeout_s * 1000000000u;
	return;
out_fail:
	/* reconnecting at once would fail the same way: give up this one */
	lg_err(r, c, "connect: %s", strerror(errno));
	c->fails = LG_MAX_CONN_FAILS;
	lg_conn_close(r, c, false);
}

/* ---- the client state machine ---------------------------------------- */

static int
lg_queue_payload(struct lg_run *r, struct lg_conn *c)
{
	const struct lg_msg *m = &r->msg;
	int rc;
	if (r->o.bdat) {
		rc = lg_cmd(c, "BDAT %zu LAST\r\n",
		            m->head_len + m->body_raw_len);
		rc = rc ? rc : lg_out(c, c->head, m->head_len);
		if (!rc && m->body_raw_len)
			rc = lg_out(c, m->body_raw, m->body_raw_len);
	} else {
		rc = lg_out(c, c->head, m->head_len);
		if (!rc && m->body_stuffed_len)
			rc = lg_out(c, m->body_stuffed, m->body_stuffed_len);
		rc = rc ? rc : lg_out(c, lg_eod_dot, sizeof(lg_eod_dot) - 1);
	}
	c->eod_last = true;
	lg_expect(c, LG_TAG_FINAL);
	return rc;
}

static int
lg_start_message(struct lg_run *r, struct lg_conn *c)
{
	r->to_start--;
	r->started++;
	lg_msg_set_id(&r->msg, c->head, r->next_seq++);
	c->in_msg = true;
	c->fail_class = 0;
	c->t_eod = 0;
	c->session_msgs++;
	int rc = lg_cmd(c, "MAIL FROM:<%s>\r\n", r->o.from);
	lg_expect(c, LG_TAG_MAIL);
	if (!r->o.pipelining || rc)
		return rc;
	rc = lg_cmd(c, "RCPT TO:<%s>\r\n", r->o.to);
	lg_expect(c, LG_TAG_RCPT);
	if (rc)
		return rc;
	if (r->o.bdat)
		return lg_queue_payload(r, c);
	lg_expect(c, LG_TAG_DATA);
	return lg_cmd(c, "DATA\r\n");
}

/* What a connection does when it is idle between messages. */
static int
lg_next(struct lg_run *r, struct lg_conn *c)
{
	if (r->to_start > 0 && !r->fatal &&
	    (r->o.per_session == 0 || c->session_msgs < r->o.per_session))
		return lg_start_message(r, c);
	lg_expect(c, LG_TAG_QUIT);
	return lg_cmd(c, "QUIT\r\n");
}

static int
lg_rset(struct lg_conn *c)
{
	lg_expect(c, LG_TAG_RSET);
	return lg_cmd(c, "RSET\r\n");
}

static int
lg_class(int code)
{
	int cls = code / 100;
	return cls == 2 || cls == 4 ? cls : 5; /* 1xx/3xx out of place: 5 */
}

/*
 * One complete reply with its tag. Returns 0, or -1 when the connection was
 * closed (the caller must stop touching it).
 */
static int
lg_on_reply(struct lg_run *r, struct lg_conn *c, enum lg_tag tag, int code)
{
	int rc = 0;
	if (code == 421) {
		/* the server is closing: RFC 5321 3.8 */
		if (c->in_msg) {
			lg_msg_done(r, c, 4);
		}
		lg_err(r, c, "421 from server, reconnecting");
		c->fails++;
		lg_conn_close(r, c, true);
		return -1;
	}
	switch (tag) {
	case LG_TAG_GREETING:
		if (code / 100 != 2)
			goto out_bad;
		lg_expect(c, LG_TAG_EHLO);
		rc = lg_cmd(c, "EHLO %s\r\n", r->o.ehlo);
		break;
	case LG_TAG_EHLO:
		if (code / 100 != 2)
			goto out_bad;
		if (((r->o.pipelining && !c->ext_pipelining) ||
		     (r->o.bdat && !c->ext_chunking)) &&
		    !r->fatal) {
			fprintf(stderr,
			        "fd-loadgen: the server does not "
			        "advertise %s\n",
			        r->o.bdat && !c->ext_chunking ? "CHUNKING"
			                                      : "PIPELINING");
			r->fatal = true;
		} else if (r->o.pipelining && !c->ext_pipelining) {
			r->fatal = true;
		}
		rc = lg_next(r, c);
		break;
	case LG_TAG_MAIL:
	case LG_TAG_RCPT:
		if (code / 100 != 2) {
			if (!c->fail_class)
				c->fail_class = lg_class(code);
			if (!r->o.pipelining) {
				lg_msg_done(r, c, c->fail_class);
				rc = lg_rset(c);
			}
		} else if (!r->o.pipelining) {
			if (tag == LG_TAG_MAIL) {
				lg_expect(c, LG_TAG_RCPT);
				rc = lg_cmd(c, "RCPT TO:<%s>\r\n", r->o.to);
			} else if (r->o.bdat) {
				rc = lg_queue_payload(r, c);
			} else {
				lg_expect(c, LG_TAG_DATA);
				rc = lg_cmd(c, "DATA\r\n");
			}
		}
		break;
	case LG_TAG_DATA:
		if (code == 354) {
			/* even after a failed RCPT: the server asked for it */
			rc = lg_queue_payload(r, c);
			break;
		}
		if (!c->fail_class)
			c->fail_class = lg_class(code);
		lg_msg_done(r, c, c->fail_class);
		rc = lg_rset(c);
		break;
	case LG_TAG_FINAL:
		if (code / 100 == 2 && !c->fail_class) {
			if (c->t_eod && c->t_rx >= c->t_eod)
				r->lat_ns[r->lat_n++] = c->t_rx - c->t_eod;
			lg_msg_done(r, c, 2);
			c->fails = 0;
			rc = lg_next(r, c);
			break;
		}
		if (!c->fail_class)
			c->fail_class = lg_class(code);
		lg_msg_done(r, c, c->fail_class);
		rc = lg_rset(c);
		break;
	case LG_TAG_RSET:
		if (code / 100 != 2)
			goto out_bad;
		rc = lg_next(r, c);
		break;
	case LG_TAG_QUIT:
		lg_conn_close(r, c, true);
		return -1;
	}
	if (rc < 0) {
		lg_conn_fail(r, c, "internal: output queue full", 0);
		return -1;
	}
	return 0;
out_bad:;
	char why[64];
	snprintf(why, sizeof(why), "unexpected reply %d (tag %d)", code,
	         (int)tag);
	lg_conn_fail(r, c, why, 0);
	return -1;
}

static void
lg_ehlo_keyword(struct lg_conn *c, const char *p, size_t n)
{
	/* p: the text after "250-" or "250 " */
	size_t k = 0;
	while (k < n && p[k] != ' ' && p[k] != '\r' && p[k] != '\n')
		k++;
	if (k == 10 && strncasecmp(p, "PIPELINING", 10) == 0)
		c->ext_pipelining = true;
	if (k == 8 && strncasecmp(p, "CHUNKING", 8) == 0)
		c->ext_chunking = true;
}

/* Parse complete replies in c->in. Returns -1 if c was closed. */
static int
lg_parse(struct lg_run *r, struct lg_conn *c)
{
	size_t pos = 0;
	for (;;) {
		char *nl = memchr(c->in + pos, '\n', c->in_len - pos);
		if (!nl)
			break;
		char *line = c->in + pos;
		size_t len = (size_t)(nl - line) + 1;
		pos += len;
		if (len < 5 || line[0] < '1' || line[0] > '5' ||
		    line[1] < '0' || line[1] > '9' || line[2] < '0' ||
		    line[2] > '9' ||
		    (line[3] != ' ' && line[3] != '-' && line[3] != '\r')) {
			lg_conn_fail(r, c, "malformed reply line", 0);
			return -1;
		}
		int code = (line[0] - '0') * 100 + (line[1] - '0') * 10 +
		           (line[2] - '0');
		if (c->exp_n == 0) {
			lg_conn_fail(r, c, "reply nobody asked for", 0);
			return -1;
		}
		enum lg_tag tag = c->expect[c->exp_first];
		if (tag == LG_TAG_EHLO && line[3] != '\r')
			lg_ehlo_keyword(c, line + 4, len - 4);
		if (line[3] == '-')
			continue; /* multiline reply goes on */
		c->exp_first = (c->exp_first + 1) % LG_EXPECT;
		c->exp_n--;
		if (lg_on_reply(r, c, tag, code) < 0)
			return -1;
	}
	if (pos > 0) {
		memmove(c->in, c->in + pos, c->in_len - pos);
		c->in_len -= pos;
	}
	if (c->in_len == sizeof(c->in)) {
		lg_conn_fail(r, c, "reply line too long", 0);
		return -1;
	}
	return 0;
}

static void
lg_pump(struct lg_run *r, struct lg_conn *c)
{
	unsigned gen = c->gen;
	if (c->state == LG_CS_CONNECTING) {
		int err = 0;
		socklen_t el = sizeof(err);
		if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0)
			err = errno;
		if (err == EINPROGRESS || err == EALREADY)
			return;
		if (err) {
			lg_conn_fail(r, c, "connect", err);
			return;
		}
		c->state = LG_CS_OPEN;
		c->ext_pipelining = c->ext_chunking = false;
		lg_expect(c, LG_TAG_GREETING);
	}
	/*
	 * Edge-triggered: each side must be worked until the kernel says
	 * "no more". A recv that returned less than it asked for has emptied
	 * the socket (new data raises a new edge), and lg_flush() stops only
	 * when the queue is empty or the socket is full: so per reply this is
	 * one send and one recv, not a third call that returns EAGAIN.
	 */
	bool drained = false;
	for (;;) {
		ssize_t w = lg_flush(c);
		if (w < 0) {
			lg_conn_fail(r, c, "send", (int)-w);
			return;
		}
		if (w > 0)
			c->deadline = lg_now_ns() +
			              (uint64_t)r->o.timeout_s * 1000000000u;
		if (drained)
			return;
		size_t room = sizeof(c->in) - c->in_len;
		ssize_t n = recv(c->fd, c->in + c->in_len, room, MSG_DONTWAIT);
		if (n > 0) {
			c->t_rx = lg_now_ns();
			c->deadline = c->t_rx +
			              (uint64_t)r->o.timeout_s * 1000000000u;
			c->in_len += (size_t)n;
			drained = (size_t)n < room;
			if (lg_parse(r, c) < 0 || gen != c->gen)
				return;
			continue; /* replies may have queued commands */
		}
		if (n == 0) {
			lg_conn_fail(r, c, "server closed the connection", 0);
			return;
		}
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			lg_conn_fail(r, c, "recv", errno);
		return; /* output was flushed at the top of this pass */
	}
}

/* ---- options, address policy, report --------------------------------- */

static int
lg_parse_addr(const char *s, struct sockaddr_storage *ss, socklen_t *len)
{
	char host[128];
	const char *port;
	memset(ss, 0, sizeof(*ss));
	if (s[0] == '[') {
		const char *e = strchr(s, ']');
		if (!e || e[1] != ':' || (size_t)(e - s - 1) >= sizeof(host))
			return -1;
		memcpy(host, s + 1, (size_t)(e - s - 1));
		host[e - s - 1] = '\0';
		port = e + 2;
	} else {
		const char *e = strrchr(s, ':');
		if (!e || (size_t)(e - s) >= sizeof(host))
			return -1;
		memcpy(host, s, (size_t)(e - s));
		host[e - s] = '\0';
		port = e + 1;
	}
	char *end;
	unsigned long p = strtoul(port, &end, 10);
	if (end == port || *end || p == 0 || p > 65535)
		return -1;
	struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
	if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
		a4->sin_family = AF_INET;
		a4->sin_port = htons((uint16_t)p);
		*len = sizeof(*a4);
		return 0;
	}
	if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
		a6->sin6_family = AF_INET6;
		a6->sin6_port = htons((uint16_t)p);
		*len = sizeof(*a6);
		return 0;
	}
	return -1;
}

static bool
lg_is_loopback(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *a4 = (const struct sockaddr_in *)ss;
		return (ntohl(a4->sin_addr.s_addr) >> 24) == 127;
	}
	const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)ss;
	if (IN6_IS_ADDR_LOOPBACK(&a6->sin6_addr))
		return true;
	return IN6_IS_ADDR_V4MAPPED(&a6->sin6_addr) &&
	       a6->sin6_addr.s6_addr[12] == 127;
}

static void
lg_usage(FILE *f)
{
	fprintf(f,
	        "usage: fd-loadgen [options]\n"
	        "\n"
	        "SMTP load generator: C connections send N messages in total "
	        "(MAIL, RCPT,\nDATA or BDAT LAST) and time each final dot "
	        "(or last BDAT byte) to its reply.\n"
	        "\n"
	        "  --server HOST:PORT   numeric IPv4 or [IPv6] address "
	        "(default 127.0.0.1:2525)\n"
	        "  --connections C      concurrent connections (default 1)\n"
	        "  --messages N         messages in total (default 1000)\n"
	        "  --per-session M      QUIT and reconnect after M messages "
	        "(default 0: never)\n"
	        "  --size S             message size in octets, headers "
	        "included (default 4096)\n"
	        "  --pipelining         send MAIL+RCPT+DATA together "
	        "(RFC 2920)\n"
	        "  --bdat               BDAT n LAST instead of DATA "
	        "(RFC 3030)\n"
	        "  --from ADDR          envelope sender (default "
	        "loadgen@localhost)\n"
	        "  --to ADDR            recipient (default user@localhost)\n"
	        "  --ehlo NAME          EHLO name (default loadgen.localhost)\n"
	        "  --timeout SEC        give up on a silent connection "
	        "(default 30)\n"
	        "  --json               one flat JSON object on stdout\n"
	        "  --allow-failures     exit 0 even if some message was not "
	        "accepted\n"
	        "  --allow-nonlocal     permit a non-loopback server "
	        "(test namespaces only)\n"
	        "  --help               this text\n"
	        "\n"
	        "Exit: 0 all accepted, 1 some not accepted (or a missing "
	        "extension), 2 usage.\n");
}

static int
lg_parse_uint(const char *s, unsigned long max, unsigned long *out)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v > max || s[0] == '-')
		return -1;
	*out = v;
	return 0;
}

static int
lg_cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

static double
lg_pct_us(const uint64_t *v, size_t n, unsigned pct)
{
	if (n == 0)
		return 0;
	size_t rank = (n * pct + 99) / 100;
	return (double)v[rank ? rank - 1 : 0] / 1e3;
}

static double
lg_tv_s(struct timeval tv)
{
	return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

static void
lg_report(struct lg_run *r, double wall_s)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	double cu = lg_tv_s(ru.ru_utime), cs = lg_tv_s(ru.ru_stime);
	qsort(r->lat_ns, r->lat_n, sizeof(r->lat_ns[0]), lg_cmp_u64);
	double sum = 0;
	for (size_t i = 0; i < r->lat_n; i++)
		sum += (double)r->lat_ns[i];
	double mean = r->lat_n ? sum / (double)r->lat_n / 1e3 : 0;
	double p50 = lg_pct_us(r->lat_ns, r->lat_n, 50);
	double p90 = lg_pct_us(r->lat_ns, r->lat_n, 90);
	double p99 = lg_pct_us(r->lat_ns, r->lat_n, 99);
	double mx = lg_pct_us(r->lat_ns, r->lat_n, 100);
	double rate = wall_s > 0 ? (double)r->accepted / wall_s : 0;
	double cpu_per = r->started ? (cu + cs) * 1e6 / (double)r->started : 0;
	uint64_t not_sent = r->o.messages - r->started;
	size_t msize = r->msg.head_len + r->msg.body_raw_len;
	const char *mode = r->o.bdat ? "BDAT" : "DATA";

	if (r->o.json) {
		printf("{\"server\":\"%s\",\"connections\":%u,\"messages\":%u,"
		       "\"per_session\":%u,\"size\":%zu,\"mode\":\"%s\","
		       "\"pipelining\":%s,\"sent\":%" PRIu64
		       ",\"accepted\":%" PRIu64 ",\"tempfail\":%" PRIu64
		       ",\"rejected\":%" PRIu64 ",\"errors\":%" PRIu64
		       ",\"not_sent\":%" PRIu64 ",\"wall_s\":%.3f,"
		       "\"msgs_per_s\":%.1f,\"lat_p50_us\":%.1f,"
		       "\"lat_p90_us\":%.1f,\"lat_p99_us\":%.1f,"
		       "\"lat_max_us\":%.1f,\"lat_mean_us\":%.1f,"
		       "\"cpu_user_s\":%.3f,\"cpu_sys_s\":%.3f,"
		       "\"cpu_us_per_msg\":%.1f}\n",
		       r->o.server, r->o.connections, r->o.messages,
		       r->o.per_session, msize, mode,
		       r->o.pipelining ? "true" : "false", r->started,
		       r->accepted, r->tempfail, r->rejected, r->errors,
		       not_sent, wall_s, rate, p50, p90, p99, mx, mean, cu, cs,
		       cpu_per);
		return;
	}
	printf("fd-loadgen: server=%s connections=%u messages=%u size=%zu "
	       "mode=%s pipelining=%s per_session=%u\n",
	       r->o.server, r->o.connections, r->o.messages, msize, mode,
	       r->o.pipelining ? "yes" : "no", r->o.per_session);
	printf("  sent %" PRIu64 "  accepted %" PRIu64
	       "  tempfail (4xx) %" PRIu64 "  rejected (5xx) %" PRIu64
	       "  errors %" PRIu64 "  not sent %" PRIu64 "\n",
	       r->started, r->accepted, r->tempfail, r->rejected, r->errors,
	       not_sent);
	printf("  wall %.3f s  %.1f msgs/s\n", wall_s, rate);
	printf("  final-dot-to-reply (accepted) us: p50 %.1f  p90 %.1f  "
	       "p99 %.1f  max %.1f  mean %.1f\n",
	       p50, p90, p99, mx, mean);
	printf("  loadgen cpu: user %.3f s  sys %.3f s  %.1f us/msg\n", cu, cs,
	       cpu_per);
}

static int
lg_parse_opts(int argc, char **argv, struct lg_opts *o)
{
	static const struct option lopts[] = {
	        {"server", required_argument, NULL, 's'},
	        {"connections", required_argument, NULL, 'c'},
	        {"messages", required_argument, NULL, 'n'},
	        {"per-session", required_argument, NULL, 'm'},
	        {"size", required_argument, NULL, 'S'},
	        {"pipelining", no_argument, NULL, 'P'},
	        {"bdat", no_argument, NULL, 'B'},
	        {"from", required_argument, NULL, 'f'},
	        {"to", required_argument, NULL, 't'},
	        {"ehlo", required_argument, NULL, 'e'},
	        {"timeout", required_argument, NULL, 'T'},
	        {"json", no_argument, NULL, 'j'},
	        {"allow-failures", no_argument, NULL, 'F'},
	        {"allow-nonlocal", no_argument, NULL, 'N'},
	        {"help", no_argument, NULL, 'h'},
	        {NULL, 0, NULL, 0},
	};
	int ch;
	unsigned long v;
	while ((ch = getopt_long(argc, argv, "", lopts, NULL)) != -1) {
		switch (ch) {
		case 's':
			o->server = optarg;
			break;
		case 'c':
			if (lg_parse_uint(optarg, 100000, &v) || v == 0)
				goto out_bad;
			o->connections = (unsigned)v;
			break;
		case 'n':
			if (lg_parse_uint(optarg, 100000000, &v) || v == 0)
				goto out_bad;
			o->messages = (unsigned)v;
			break;
		case 'm':
			if (lg_parse_uint(optarg, 100000000, &v))
				goto out_bad;
			o->per_session = (unsigned)v;
			break;
		case 'S':
			if (lg_parse_uint(optarg, 1ul << 30, &v))
				goto out_bad;
			o->size = v;
			break;
		case 'P':
			o->pipelining = true;
			break;
		case 'B':
			o->bdat = true;
			break;
		case 'f':
			o->from = optarg;
			break;
		case 't':
			o->to = optarg;
			break;
		case 'e':
			o->ehlo = optarg;
			break;
		case 'T':
			if (lg_parse_uint(optarg, 86400, &v) || v == 0)
				goto out_bad;
			o->timeout_s = (unsigned)v;
			break;
		case 'j':
			o->json = true;
			break;
		case 'F':
			o->allow_failures = true;
			break;
		case 'N':
			o->allow_nonlocal = true;
			break;
		case 'h':
			lg_usage(stdout);
			exit(0);
		default:
			lg_usage(stderr);
			return -1;
		}
	}
	if (optind != argc)
		goto out_bad;
	if (strlen(o->from) > 256 || strlen(o->to) > 256 ||
	    strlen(o->ehlo) > 255 || strpbrk(o->from, "\r\n<>") ||
	    strpbrk(o->to, "\r\n<>") || strpbrk(o->ehlo, "\r\n ")) {
		fprintf(stderr, "fd-loadgen: --from/--to/--ehlo too long or "
		                "with forbidden characters\n");
		return -1;
	}
	return 0;
out_bad:
	fprintf(stderr, "fd-loadgen: bad option value%s%s\n",
	        optind <= argc && optind > 0 ? " near " : "",
	        optind <= argc && optind > 0 ? argv[optind - 1] : "");
	return -1;
}

int
main(int argc, char **argv)
{
	struct lg_run r = {
	        .o = {.server = "127.0.0.1:2525",
	              .connections = 1,
	              .messages = 1000,
	              .size = 4096,
	              .from = "loadgen@localhost",
	              .to = "user@localhost",
	              .ehlo = "loadgen.localhost",
	              .timeout_s = 30},
	        .epfd = -1,
	};
	int rc = 1;
	if (lg_parse_opts(argc, argv, &r.o) < 0)
		return 2;
	if (lg_parse_addr(r.o.server, &r.addr, &r.addr_len) < 0) {
		fprintf(stderr,
		        "fd-loadgen: --server wants a numeric "
		        "HOST:PORT or [IPv6]:PORT, not '%s'\n",
		        r.o.server);
		return 2;
	}
	if (!lg_is_loopback(&r.addr) && !r.o.allow_nonlocal) {
		fprintf(stderr,
		        "fd-loadgen: refusing %s: not a loopback "
		        "address (policy: no traffic leaves this "
		        "machine; --allow-nonlocal for test "
		        "namespaces)\n",
		        r.o.server);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);

	r.nconns =
	        r.o.connections < r.o.messages ? r.o.connections : r.o.messages;
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < r.nconns + 16) {
		rl.rlim_cur = rl.rlim_max < r.nconns + 64 ? rl.rlim_max
		                                          : r.nconns + 64;
		setrlimit(RLIMIT_NOFILE, &rl);
	}

	char date[64];
	time_t now = time(NULL);
	struct tm tm;
	gmtime_r(&now, &tm);
	strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S +0000", &tm);
	uint64_t run_id = fd_now_realtime_us() ^ ((uint64_t)getpid() << 40);
	int e = lg_msg_build(&r.msg, r.o.size, r.o.from, r.o.to, r.o.ehlo, date,
	                     run_id);
	if (e < 0) {
		fprintf(stderr, "fd-loadgen: building the message: %s\n",
		        strerror(-e));
		return 1;
	}
	r.conns = calloc(r.nconns, sizeof(*r.conns));
	r.lat_ns = calloc(r.o.messages, sizeof(*r.lat_ns));
	if (!r.conns || !r.lat_ns)
		goto out_oom;
	for (unsigned i = 0; i < r.nconns; i++) {
		r.conns[i].fd = -1;
		r.conns[i].head = malloc(r.msg.head_len);
		if (!r.conns[i].head)
			goto out_oom;
		memcpy(r.conns[i].head, r.msg.head, r.msg.head_len);
	}
	r.epfd = epoll_create1(EPOLL_CLOEXEC);
	if (r.epfd < 0) {
		perror("fd-loadgen: epoll_create1");
		goto out_free;
	}

	r.to_start = r.o.messages;
	uint64_t t0 = lg_now_ns();
	r.active = r.nconns;
	for (unsigned i = 0; i < r.nconns; i++)
		lg_conn_open(&r, &r.conns[i]);

	struct epoll_event evs[256];
	uint64_t next_check = t0 + 100000000u;
	while (r.active > 0) {
		int n = epoll_wait(r.epfd, evs, 256, 100);
		if (n < 0 && errno != EINTR) {
			perror("fd-loadgen: epoll_wait");
			break;
		}
		for (int i = 0; i < n; i++) {
			struct lg_conn *c = evs[i].data.ptr;
			if (c->state != LG_CS_DONE && c->fd >= 0)
				lg_pump(&r, c);
		}
		uint64_t t = lg_now_ns();
		if (t < next_check)
			continue;
		next_check = t + 100000000u;
		for (unsigned i = 0; i < r.nconns; i++) {
			struct lg_conn *c = &r.conns[i];
			if (c->state != LG_CS_DONE && t > c->deadline)
				lg_conn_fail(&r, c, "timeout", 0);
		}
	}
	double wall_s = (double)(lg_now_ns() - t0) / 1e9;
	lg_report(&r, wall_s);
	if (r.fatal)
		rc = 1;
	else if (r.accepted == r.o.messages || r.o.allow_failures)
		rc = 0;
	else
		rc = 1;
	goto out_free;
out_oom:
	fprintf(stderr, "fd-loadgen: out of memory\n");
out_free:
	if (r.epfd >= 0)
		close(r.epfd);
	for (unsigned i = 0; r.conns && i < r.nconns; i++) {
		if (r.conns[i].fd >= 0)
			close(r.conns[i].fd);
		free(r.conns[i].head);
	}
	free(r.conns);
	free(r.lat_ns);
	lg_msg_free(&r.msg);
	return rc;
}
