/*
 * The SMTP/LMTP delivery client (contract in smtpc.h).
 *
 * One connection, driven by one thread, blocking but never unbounded: every
 * read and write goes through io_read()/io_write(), which wait with poll()
 * until a deadline. Those two are the only places that touch the socket's
 * bytes, so that a TLS layer (STARTTLS, whose capability is already parsed)
 * can be slotted in there later.
 *
 * Replies are parsed incrementally, line by line, out of a fixed 8 KiB
 * buffer: a line may not exceed 2048 octets, so a reply of any number of
 * lines (up to 1000) passes through that buffer without ever having to fit
 * in it whole. Commands and body bytes leave through a 64 KiB output buffer;
 * the body is read from the caller's source in 64 KiB pieces and, for DATA,
 * dot-stuffed on the way (RFC 5321 4.5.2) with the line state carried across
 * pieces.
 *
 * Connection states:
 *
 *   CONNECT -> GREETING -> EHLO --(5xx, SMTP only)--> HELO
 *                            |                          |
 *                            +--------> READY <---------+
 *
 *   READY -> MAIL -> RCPT -+-> DATA -> BODY -> DOT --------+-> READY
 *                          +-> BDAT (chunk ... LAST) ------+
 *                          +-> RSET (nothing accepted, DATA or BDAT
 *                                    refused) -> READY
 *   READY -> RSET -> READY          READY -> QUIT
 *   any state -> BROKEN  (I/O error, timeout, garbage, a 421 from the peer)
 *
 * Invariants: in READY the server holds no open transaction and no reply is
 * owed to us; in BROKEN nothing more is sent, the only way out is to close.
 * The state at the moment of a failure names the step in the local reply
 * ("421 4.4.2 timeout waiting for reply to RCPT TO").
 *
 * STARTTLS (smtpc.h): after EHLO, then EHLO again inside TLS; io_read()
 * and io_write() go through OpenSSL on the same non-blocking socket once
 * it is up, waiting with poll() on whatever OpenSSL wants.
 *
 * Pipelining: smtpc_send() pipelines MAIL and the RCPTs; smtpc_send_many()
 * pipelines whole transactions (RSET/MAIL/RCPT/BDAT LAST with the body, or
 * the body and dot of one message with the next one's MAIL/RCPT/DATA).
 *
 * Limits: no AUTH; chunks of a body over 64 KiB are not pipelined (BDAT
 * chunks are 1 MiB, so a round trip per chunk costs little); getaddrinfo()
 * is not bounded by a timeout.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "finaldot/log.h"
#include "smtpc.h"
#include "utf8addr.h"

#define RBUF_LEN 8192u
#define LINE_MAX_LEN 2048u /* reply line, CRLF excluded */
#define LINES_MAX 1000u
#define PIECE_LEN 65536u   /* body read and write unit */
#define HDR_ROOM 64u       /* a BDAT command line ahead of a piece */
#define OBUF_LEN (PIECE_LEN + HDR_ROOM)
#define CHUNK_MAX (1u << 20)
#define CMD_LINE_MAX 2000u /* a command line we send, CRLF included */
#define QUIT_TIMEOUT_MS 5000u
#define TIMEOUT_CAP_MS (UINT64_C(1) << 40) /* keeps deadlines in int64 */

enum state {
	ST_CONNECT,
	ST_GREETING,
	ST_EHLO,
	ST_HELO,
	ST_READY,
	ST_MAIL,
	ST_RCPT,
	ST_DATA,
	ST_BODY,
	ST_DOT,
	ST_BDAT,
	ST_RSET,
	ST_QUIT,
	ST_BROKEN,
};

struct smtpc {
	int fd;
	enum smtpc_proto proto;
	enum state st;
	unsigned exts;
	uint64_t size_limit;
	uint64_t connect_to, cmd_to, data_to;
	/* what the last failure was, for the local reply */
	bool fail_write;  /* in io_write (else in io_read) */
	bool fail_body;   /* the body source */
	bool got_421;     /* the peer announced it closes */
	/* smtpc_send(): the message's final octets (its final dot, its
	 * BDAT LAST chunk) were queued to go out, ending at stream
	 * position last_end; they went out once sent >= last_end */
	bool last_out;
	uint64_t last_end;
	uint64_t sent; /* octets handed to the kernel (or to TLS) so far */
	/* the last socket operation was a write: the next read waits for
	 * the peer first (a recv then would only say EAGAIN) */
	bool wrote;
	struct smtpc_reply r421;
	char helo[256];
	char peer[256];
	char host[256];     /* the target's host, for SNI and VERIFY */
	enum smtpc_tls tls;
	SSL_CTX *tls_ctx;
	SSL *ssl;           /* TLS is up */
	bool tls_failed;    /* the handshake failed (MAY: retry in clear) */
	char tls_desc[200];
	size_t roff, rlen; /* unread reply bytes: rbuf[roff..rlen) */
	size_t olen;       /* queued output: obuf[0..olen) */
	uint8_t rbuf[RBUF_LEN];
	uint8_t obuf[OBUF_LEN];
	uint8_t bbuf[PIECE_LEN];
};

static const char *
state_name(enum state s)
{
	switch (s) {
	case ST_CONNECT:
		return "connect";
	case ST_GREETING:
		return "greeting";
	case ST_EHLO:
		return "EHLO";
	case ST_HELO:
		return "HELO";
	case ST_READY:
		return "ready";
	case ST_MAIL:
		return "MAIL FROM";
	case ST_RCPT:
		return "RCPT TO";
	case ST_DATA:
		return "DATA";
	case ST_BODY:
		return "message body";
	case ST_DOT:
		return "end of data";
	case ST_BDAT:
		return "BDAT";
	case ST_RSET:
		return "RSET";
	case ST_QUIT:
		return "QUIT";
	case ST_BROKEN:
		return "broken";
	}
	return "?";
}

static void
enter_state(struct smtpc *c, enum state s)
{
	fd_debug("smtpc", "fd=%d event=state from=%s to=%s", c->fd,
		 state_name(c->st), state_name(s));
	c->st = s;
}

/* ---- replies: parsing ---------------------------------------------------- */

/* Parse state of one (multi-line) reply being assembled into r. */
struct rparse {
	int code;
	unsigned lines;
	size_t tlen; /* of r->text */
	size_t enh_len;
	bool cut;
};

typedef void (*line_hook_fn)(struct smtpc *c, const struct rparse *ps,
			     const uint8_t *txt, size_t len);

static void
reply_clear(struct smtpc_reply *r)
{
	r->code = 0;
	r->enh[0] = '\0';
	r->text[0] = '\0';
	r->local = false;
}

static void
text_put(struct rparse *ps, struct smtpc_reply *r, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (ps->tlen >= SMTPC_TEXT_MAX - 1) {
			ps->cut = true;
			break;
		}
		r->text[ps->tlen++] =
			p[i] >= 0x20 && p[i] < 0x7f ? (char)p[i] : '?';
	}
	r->text[ps->tlen] = '\0';
}

static void
text_finish(struct rparse *ps, struct smtpc_reply *r)
{
	if (ps->cut)
		memcpy(r->text + SMTPC_TEXT_MAX - 4, "...", 4);
}

/* RFC 3463 2: class "." subject "." detail, class matching the reply's
 * (RFC 2034 4), then a space or the end. Length of the code, 0 if none. */
static size_t
enh_len(const uint8_t *p, size_t n, int code)
{
	size_t i = 0;

	if (n < 5 || p[0] != (uint8_t)('0' + code / 100) ||
	    (p[0] != '2' && p[0] != '4' && p[0] != '5') || p[1] != '.')
		return 0;
	i = 2;
	for (int part = 0; part < 2; part++) {
		size_t d = 0;
		while (i < n && d < 4 && p[i] >= '0' && p[i] <= '9') {
			i++;
			d++;
		}
		if (d == 0 || d > 3)
			return 0;
		if (part == 0) {
			if (i >= n || p[i] != '.')
				return 0;
			i++;
		}
	}
	return i == n || p[i] == ' ' ? i : 0;
}

static int
code3(const uint8_t *p)
{
	return (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
}

/* The first min(n, 4) octets of a line: those the syntax depends on. A
 * prefix that could still become a valid line passes (a partial line
 * "250\r" may be "250\r\n"). */
static enum smtpc_parse
check_head(const struct rparse *ps, const uint8_t *p, size_t n, bool complete)
{
	for (size_t i = 0; i < n && i < 3; i++) {
		uint8_t lo = i == 0 ? '2' : '0', hi = i == 0 ? '5' : '9';
		if (p[i] < lo || p[i] > hi)
			return SMTPC_PARSE_ERR_SYNTAX;
	}
	if (complete && n < 3)
		return SMTPC_PARSE_ERR_SYNTAX;
	if (n >= 3 && ps->lines && code3(p) != ps->code)
		return SMTPC_PARSE_ERR_SYNTAX;
	if (n >= 4 && p[3] != ' ' && p[3] != '-' &&
	    !(!complete && n == 4 && p[3] == '\r'))
		return SMTPC_PARSE_ERR_SYNTAX;
	return SMTPC_PARSE_OK;
}

/* One complete line, CRLF stripped. OK on the last line, AGAIN before. */
static enum smtpc_parse
rparse_line(struct rparse *ps, struct smtpc_reply *r, const uint8_t *p,
	    size_t n, const uint8_t **txt, size_t *txt_len)
{
	enum smtpc_parse pr;
	const uint8_t *t;
	size_t tl;

	if (ps->lines >= LINES_MAX)
		return SMTPC_PARSE_ERR_TOOLONG;
	pr = check_head(ps, p, n, true);
	if (pr != SMTPC_PARSE_OK)
		return pr;
	if (n > LINE_MAX_LEN)
		return SMTPC_PARSE_ERR_TOOLONG;
	t = p + (n > 4 ? 4 : n);
	tl = n > 4 ? n - 4 : 0;
	*txt = t;
	*txt_len = tl;
	if (ps->lines == 0) {
		ps->code = code3(p);
		r->code = ps->code;
		text_put(ps, r, p, 3);
		ps->enh_len = enh_len(t, tl, ps->code);
		memcpy(r->enh, t, ps->enh_len);
		r->enh[ps->enh_len] = '\0';
	} else if (ps->enh_len && tl >= ps->enh_len &&
		   memcmp(t, r->enh, ps->enh_len) == 0 &&
		   (tl == ps->enh_len || t[ps->enh_len] == ' ')) {
		/* RFC 2034 4: every line repeats the code; keep one */
		t += ps->enh_len;
		tl -= ps->enh_len;
		while (tl && *t == ' ') {
			t++;
			tl--;
		}
	}
	if (tl) {
		text_put(ps, r, (const uint8_t *)" ", 1);
		text_put(ps, r, t, tl);
	}
	ps->lines++;
	if (n == 3 || p[3] == ' ') {
		text_finish(ps, r);
		return SMTPC_PARSE_OK;
	}
	return SMTPC_PARSE_AGAIN;
}

/*
 * Consume the complete lines of p[0..n). OK: the reply ended, *used octets
 * through its last LF. AGAIN: *used octets of complete lines consumed, the
 * rest is a valid partial line. Errors as smtpc_parse_reply().
 */
static enum smtpc_parse
rparse_feed(struct rparse *ps, struct smtpc_reply *r, const uint8_t *p,
	    size_t n, size_t *used, line_hook_fn hook, struct smtpc *c)
{
	size_t off = 0;

	*used = 0;
	for (;;) {
		const uint8_t *nl = n > off ? memchr(p + off, '\n', n - off)
					    : NULL;
		const uint8_t *txt = NULL;
		size_t len, txt_len = 0;
		enum smtpc_parse pr;

		if (!nl) {
			len = n - off;
			if (len && ps->lines >= LINES_MAX)
				return SMTPC_PARSE_ERR_TOOLONG;
			pr = check_head(ps, p + off, len, false);
			if (pr != SMTPC_PARSE_OK)
				return pr;
			if (len > LINE_MAX_LEN + 1) /* room for the CR */
				return SMTPC_PARSE_ERR_TOOLONG;
			return SMTPC_PARSE_AGAIN;
		}
		len = (size_t)(nl - (p + off));
		pr = rparse_line(ps, r, p + off,
				 len && nl[-1] == '\r' ? len - 1 : len, &txt,
				 &txt_len);
		if (pr != SMTPC_PARSE_OK && pr != SMTPC_PARSE_AGAIN)
			return pr;
		if (hook)
			hook(c, ps, txt, txt_len);
		off += len + 1;
		*used = off;
		if (pr == SMTPC_PARSE_OK)
			return pr;
	}
}

enum smtpc_parse
smtpc_parse_reply(const uint8_t *p, size_t n, struct smtpc_reply *r,
		  size_t *used)
{
	static const uint8_t none[1];
	struct rparse ps;
	size_t u = 0;
	enum smtpc_parse pr;

	memset(&ps, 0, sizeof(ps));
	reply_clear(r);
	if (!p) {
		p = none;
		n = 0;
	}
	pr = rparse_feed(&ps, r, p, n, &u, NULL, NULL);
	if (used)
		*used = pr == SMTPC_PARSE_OK ? u : 0;
	return pr;
}

/* ---- replies: local ones ------------------------------------------------- */

__attribute__((format(printf, 4, 5))) static void
reply_local(struct smtpc_reply *r, int code, const char *enh, const char *fmt,
	    ...)
{
	va_list ap;
	int k;

	reply_clear(r);
	r->code = code;
	r->local = true;
	snprintf(r->enh, sizeof(r->enh), "%s", enh);
	k = snprintf(r->text, sizeof(r->text), "%d %s ", code, enh);
	if (k < 0 || (size_t)k >= sizeof(r->text))
		return;
	va_start(ap, fmt);
	vsnprintf(r->text + k, sizeof(r->text) - (size_t)k, fmt, ap);
	va_end(ap);
}

/* The reply standing for one not received because of failure rc. */
static void
failure_reply(const struct smtpc *c, int rc, struct smtpc_reply *r)
{
	const char *what = state_name(c->st);

	if (c->got_421) {
		*r = c->r421;
	} else if (c->fail_body) {
		reply_local(r, 451, "4.3.0", "error reading message body");
	} else if (rc == -ETIMEDOUT && c->fail_write) {
		reply_local(r, 421, "4.4.2", "timeout sending %s", what);
	} else if (rc == -ETIMEDOUT && c->st == ST_GREETING) {
		reply_local(r, 421, "4.4.2", "timeout waiting for greeting");
	} else if (rc == -ETIMEDOUT) {
		reply_local(r, 421, "4.4.2", "timeout waiting for reply to %s",
			    what);
	} else if (rc == -EPROTO) {
		reply_local(r, 421, "4.5.0", "invalid reply to %s", what);
	} else if (rc == -ENOTCONN) {
		reply_local(r, 421, "4.4.2", "connection not usable");
	} else {
		/* RFC 3463 X.4.2: established, then unable to complete */
		reply_local(r, 421, "4.4.2", "connection lost during %s", what);
	}
}

/* ---- I/O: the only functions touching the socket's bytes ----------------- */

static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t
deadline_in(uint64_t ms)
{
	return now_ms() + (int64_t)(ms < TIMEOUT_CAP_MS ? ms : TIMEOUT_CAP_MS);
}

static int
wait_fd(int fd, short events, int64_t deadline)
{
	for (;;) {
		int64_t left = deadline - now_ms();
		struct pollfd pfd = { .fd = fd, .events = events };
		int rc;

		if (left <= 0)
			return -ETIMEDOUT;
		rc = poll(&pfd, 1, left > INT_MAX ? INT_MAX : (int)left);
		if (rc > 0)
			return 0; /* POLLERR/POLLHUP too: the next call says */
		if (rc < 0 && errno != EINTR)
			return -errno;
	}
}

/* An SSL call returned r <= 0: wait for what it wants (0: call again),
 * or the failure as -errno (1: a clean close). */
static int
ssl_wait(struct smtpc *c, int r, int64_t deadline)
{
	int e = SSL_get_error(c->ssl, r);

	switch (e) {
	case SSL_ERROR_WANT_READ:
		return wait_fd(c->fd, POLLIN, deadline);
	case SSL_ERROR_WANT_WRITE:
		return wait_fd(c->fd, POLLOUT, deadline);
	case SSL_ERROR_ZERO_RETURN:
		return 1;
	case SSL_ERROR_SYSCALL:
		return errno && errno != EAGAIN ? -errno : -ECONNRESET;
	default:
		ERR_clear_error();
		return -EPROTO;
	}
}

/* Some bytes (> 0), 0 when the peer closed, or -errno. */
static long
io_read(struct smtpc *c, void *buf, size_t n, int64_t deadline)
{
	while (c->ssl) {
		int k, rc;

		ERR_clear_error();
		k = SSL_read(c->ssl, buf, n > INT_MAX ? INT_MAX : (int)n);
		if (k > 0)
			return k;
		rc = ssl_wait(c, k, deadline);
		if (rc == 1)
			return 0;
		if (rc < 0) {
			c->fail_write = false;
			return rc;
		}
	}
	if (c->wrote) {
		int rc = wait_fd(c->fd, POLLIN, deadline);
		c->wrote = false;
		if (rc < 0) {
			c->fail_write = false;
			return rc;
		}
	}
	for (;;) {
		ssize_t k = recv(c->fd, buf, n, MSG_DONTWAIT);
		int rc;

		if (k >= 0)
			return (long)k;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK) {
			rc = -errno;
			c->fail_write = false;
			return rc;
		}
		rc = wait_fd(c->fd, POLLIN, deadline);
		if (rc < 0) {
			c->fail_write = false;
			return rc;
		}
	}
}

/* All of buf[0..n) within timeout_ms, or -errno. */
static int
io_write(struct smtpc *c, const void *buf, size_t n, uint64_t timeout_ms)
{
	const uint8_t *p = buf;
	int64_t deadline = deadline_in(timeout_ms);

	while (n && c->ssl) {
		int k, rc;

		ERR_clear_error();
		k = SSL_write(c->ssl, p, n > INT_MAX ? INT_MAX : (int)n);
		if (k > 0) {
			p += k;
			n -= (size_t)k;
			c->sent += (uint64_t)k;
			continue;
		}
		rc = ssl_wait(c, k, deadline);
		if (rc != 0) {
			c->fail_write = true;
			return rc < 0 ? rc : -ECONNRESET;
		}
	}
	while (n) {
		ssize_t k = send(c->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
		int rc;

		if (k > 0) {
			p += k;
			n -= (size_t)k;
			c->sent += (uint64_t)k;
			c->wrote = true;
			continue;
		}
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
			c->fail_write = true;
			return -errno;
		}
		rc = wait_fd(c->fd, POLLOUT, deadline);
		if (rc < 0) {
			c->fail_write = true;
			return rc;
		}
	}
	return 0;
}

static int
out_flush(struct smtpc *c)
{
	int rc = c->olen ? io_write(c, c->obuf, c->olen, c->cmd_to) : 0;

	c->olen = 0;
	return rc;
}

/* Queue p[0..n), writing out every full buffer. */
static int
out_put(struct smtpc *c, const void *p, size_t n)
{
	const uint8_t *s = p;

	while (n) {
		size_t k = OBUF_LEN - c->olen;
		if (k > n)
			k = n;
		memcpy(c->obuf + c->olen, s, k);
		c->olen += k;
		s += k;
		n -= k;
		if (c->olen == OBUF_LEN) {
			int rc = out_flush(c);
			if (rc < 0)
				return rc;
		}
	}
	return 0;
}

/* The current message's final octets are queued (in obuf or gone). */
static void
final_queued(struct smtpc *c)
{
	c->last_out = true;
	c->last_end = c->sent + c->olen;
}

/* Did they go out? A write that failed before them (a peer that closed
 * the connection while it sat idle in the cache: EPIPE on the first
 * write) sent nothing the peer could take as a message: it may be tried
 * again elsewhere, and is no possible duplicate. */
static bool
final_sent(const struct smtpc *c)
{
	return c->last_out && c->sent >= c->last_end;
}

/*
 * Read one reply within timeout_ms into r. 0, or -errno with r cleared;
 * except a complete 421 from the peer (RFC 5321 3.8: it closes): r holds it
 * and -ECONNRESET is returned, the connection being as good as gone.
 */
static int
read_reply(struct smtpc *c, uint64_t timeout_ms, struct smtpc_reply *r,
	   line_hook_fn hook)
{
	int64_t deadline = deadline_in(timeout_ms);
	struct rparse ps;

	memset(&ps, 0, sizeof(ps));
	reply_clear(r);
	for (;;) {
		size_t used = 0;
		enum smtpc_parse pr = rparse_feed(&ps, r, c->rbuf + c->roff,
						  c->rlen - c->roff, &used,
						  hook, c);
		long k;

		c->roff += used;
		switch (pr) {
		case SMTPC_PARSE_OK:
			fd_debug("smtpc", "fd=%d event=reply code=%d",
				 c->fd, r->code);
			if (r->code == 421) {
				c->got_421 = true;
				c->r421 = *r;
				return -ECONNRESET;
			}
			return 0;
		case SMTPC_PARSE_AGAIN:
			break;
		case SMTPC_PARSE_ERR_SYNTAX:
		case SMTPC_PARSE_ERR_TOOLONG:
			c->fail_write = false;
			reply_clear(r);
			return -EPROTO;
		}
		/* the partial line to the front; it is at most 2049 octets */
		memmove(c->rbuf, c->rbuf + c->roff, c->rlen - c->roff);
		c->rlen -= c->roff;
		c->roff = 0;
		k = io_read(c, c->rbuf + c->rlen, RBUF_LEN - c->rlen, deadline);
		if (k <= 0) {
			reply_clear(r);
			c->fail_write = false;
			return k == 0 ? -ECONNRESET : (int)k;
		}
		c->rlen += (size_t)k;
	}
}

static int
send_cmd(struct smtpc *c, const char *line)
{
	int rc = out_put(c, line, strlen(line));

	return rc < 0 ? rc : out_flush(c);
}

/* ---- session: greeting and EHLO ------------------------------------------ */

static void
greeting_hook(struct smtpc *c, const struct rparse *ps, const uint8_t *txt,
	      size_t len)
{
	size_t i;

	if (ps->lines != 1)
		return;
	for (i = 0; i < len && i < sizeof(c->peer) - 1 && txt[i] != ' '; i++) {
		uint8_t o = txt[i];
		c->peer[i] = o > 0x20 && o < 0x7f ? (char)o : '?';
	}
	c->peer[i] = '\0';
}

static bool
keyword_is(const uint8_t *p, size_t n, const char *kw)
{
	size_t k = strlen(kw);

	return n == k && strncasecmp((const char *)p, kw, k) == 0;
}

/* RFC 5321 4.1.1.1: lines after the first are "keyword [params]". */
static void
ehlo_hook(struct smtpc *c, const struct rparse *ps, const uint8_t *txt,
	  size_t len)
{
	static const struct {
		const char *kw;
		unsigned bit;
	} kws[] = {
		{ "PIPELINING", SMTPC_EXT_PIPELINING },
		{ "SIZE", SMTPC_EXT_SIZE },
		{ "8BITMIME", SMTPC_EXT_8BITMIME },
		{ "SMTPUTF8", SMTPC_EXT_SMTPUTF8 },
		{ "CHUNKING", SMTPC_EXT_CHUNKING },
		{ "DSN", SMTPC_EXT_DSN },
		{ "STARTTLS", SMTPC_EXT_STARTTLS },
		{ "ENHANCEDSTATUSCODES", SMTPC_EXT_ENHANCEDSTATUSCODES },
		{ "BINARYMIME", SMTPC_EXT_BINARYMIME },
	};
	size_t kl = 0;

	if (ps->lines < 2 || ps->code / 100 != 2)
		return;
	while (kl < len && txt[kl] != ' ')
		kl++;
	for (size_t i = 0; i < sizeof(kws) / sizeof(kws[0]); i++) {
		if (!keyword_is(txt, kl, kws[i].kw))
			continue;
		c->exts |= kws[i].bit;
		if (kws[i].bit == SMTPC_EXT_SIZE) {
			/* RFC 1870 4: "SIZE" alone or "SIZE 0": no limit */
			uint64_t v = 0;
			size_t j = kl;
			while (j < len && txt[j] == ' ')
				j++;
			for (; j < len && txt[j] >= '0' && txt[j] <= '9'; j++) {
				unsigned d = (unsigned)(txt[j] - '0');
				v = v > (UINT64_MAX - d) / 10 ? UINT64_MAX
							      : v * 10 + d;
			}
			c->size_limit = v;
		}
	}
}

static bool
is_ip_literal(const char *h)
{
	unsigned char a[16];

	return inet_pton(AF_INET, h, a) == 1 || inet_pton(AF_INET6, h, a) == 1;
}

/*
 * STARTTLS and the handshake (READY, after EHLO). 0: TLS is up (a new EHLO
 * is due) or, for MAY, the session goes on in the clear (c->ssl NULL);
 * -errno with why set otherwise.
 */
static int
starttls(struct smtpc *c, struct smtpc_reply *why)
{
	int64_t deadline;
	int rc;

	if (!(c->exts & SMTPC_EXT_STARTTLS)) {
		if (c->tls == SMTPC_TLS_MAY)
			return 0;
		reply_local(why, 451, "4.7.10",
			    "TLS is required, but the next hop does not "
			    "offer STARTTLS");
		return -EPROTO;
	}
	rc = send_cmd(c, "STARTTLS\r\n");
	if (rc == 0)
		rc = read_reply(c, c->cmd_to, why, NULL);
	if (rc < 0) {
		failure_reply(c, rc, why);
		return rc;
	}
	if (why->code != 220) {
		char text[SMTPC_TEXT_MAX];
		/* Opportunistic: a refusal (454 TLS not available, a 5xx)
		 * leaves the session as it was; go on in the clear. */
		if (c->tls == SMTPC_TLS_MAY)
			return 0;
		snprintf(text, sizeof(text), "%s", why->text);
		reply_local(why, 451, "4.7.10",
			    "TLS is required, but STARTTLS was refused: %s",
			    text);
		return -EPROTO;
	}
	/* Octets after the 220, before the handshake: a server (or a
	 * man in the middle) injecting replies (CVE-2011-0411's mirror). */
	if (c->roff != c->rlen) {
		reply_local(why, 421, "4.7.0",
			    "octets after the 220 to STARTTLS, before TLS");
		return -EPROTO;
	}
	c->ssl = SSL_new(c->tls_ctx);
	if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) {
		ERR_clear_error();
		reply_local(why, 421, "4.3.0", "cannot set up TLS");
		return -ENOMEM;
	}
	if (c->host[0] && !is_ip_literal(c->host))
		SSL_set_tlsext_host_name(c->ssl, c->host);
	if (c->tls == SMTPC_TLS_VERIFY) {
		SSL_set_verify(c->ssl, SSL_VERIFY_PEER, NULL);
		if (!c->host[0] ||
		    (is_ip_literal(c->host)
			     ? X509_VERIFY_PARAM_set1_ip_asc(
				       SSL_get0_param(c->ssl), c->host) != 1
			     : SSL_set1_host(c->ssl, c->host) != 1)) {
			reply_local(why, 421, "4.7.0",
				    "no host name to verify the certificate "
				    "against");
			return -EPROTO;
		}
	} else {
		SSL_set_verify(c->ssl, SSL_VERIFY_NONE, NULL);
	}
	deadline = deadline_in(c->cmd_to);
	for (;;) {
		int r;
		ERR_clear_error();
		r = SSL_connect(c->ssl);
		if (r == 1)
			break;
		rc = ssl_wait(c, r, deadline);
		if (rc == 0)
			continue;
		long v = SSL_get_verify_result(c->ssl);
		c->tls_failed = true;
		if (c->tls == SMTPC_TLS_VERIFY && v != X509_V_OK)
			reply_local(why, 421, "4.7.5",
				    "certificate verification failed: %s",
				    X509_verify_cert_error_string(v));
		else if (rc == -ETIMEDOUT)
			reply_local(why, 421, "4.4.2",
				    "timeout in the TLS handshake");
		else
			reply_local(why, 421, "4.7.0", "TLS handshake failed");
		SSL_free(c->ssl);
		c->ssl = NULL;
		return rc < 0 ? rc : -ECONNRESET;
	}
	{
		const SSL_CIPHER *ci = SSL_get_current_cipher(c->ssl);
		int alg = 0, bits = ci ? SSL_CIPHER_get_bits(ci, &alg) : 0;
		snprintf(c->tls_desc, sizeof(c->tls_desc),
			 "%s with cipher %s (%d/%d bits)%s",
			 SSL_get_version(c->ssl),
			 ci ? SSL_CIPHER_get_name(ci) : "?", bits, alg,
			 c->tls == SMTPC_TLS_VERIFY ? " verified" : "");
	}
	return 0;
}

/*
 * One greeting command (EHLO, LHLO or HELO) in state st: its reply in why.
 * 0 with why->code set (2xx or not: the caller decides), -EPROTO when the
 * peer said 421 (why holds it), or -errno with a local reply in why.
 */
static int
hello(struct smtpc *c, enum state st, const char *verb, line_hook_fn hook,
      struct smtpc_reply *why)
{
	char line[300];
	int rc;

	enter_state(c, st);
	c->exts = 0;
	c->size_limit = 0;
	snprintf(line, sizeof(line), "%s %s\r\n", verb, c->helo);
	rc = send_cmd(c, line);
	if (rc == 0)
		rc = read_reply(c, c->cmd_to, why, hook);
	if (rc == -ECONNRESET && c->got_421)
		return -EPROTO;
	if (rc < 0)
		failure_reply(c, rc, why);
	return rc;
}

static int
session_open(struct smtpc *c, struct smtpc_reply *why)
{
	int rc;

	enter_state(c, ST_GREETING);
	rc = read_reply(c, c->cmd_to, why, greeting_hook);
	if (rc == -ECONNRESET && c->got_421)
		return -EPROTO; /* why holds the 421 */
	if (rc < 0) {
		failure_reply(c, rc, why);
		return rc;
	}
	if (why->code / 100 != 2)
		return -EPROTO;

	rc = hello(c, ST_EHLO, c->proto == SMTPC_LMTP ? "LHLO" : "EHLO",
		   ehlo_hook, why);
	if (rc < 0)
		return rc;
	if (why->code / 100 != 2) {
		if (why->code / 100 != 5 || c->proto == SMTPC_LMTP)
			return -EPROTO;
		/* RFC 5321 4.1.4: a server not knowing EHLO answers 5xx;
		 * HELO then */
		rc = hello(c, ST_HELO, "HELO", NULL, why);
		if (rc < 0)
			return rc;
		if (why->code / 100 != 2)
			return -EPROTO;
	}
	enter_state(c, ST_READY);
	/* LMTP over TCP too (RFC 2033 4.1 keeps ESMTP's extensions; Dovecot
	 * offers STARTTLS): a route's tls=encrypt|verify must not go out in
	 * the clear. The caller asks for none over a unix socket. */
	if (c->tls != SMTPC_TLS_NONE && !c->ssl) {
		rc = starttls(c, why);
		if (rc < 0 || !c->ssl)
			return rc;
		/* RFC 3207 4.2: what EHLO said before TLS is void. */
		rc = hello(c, ST_EHLO,
			   c->proto == SMTPC_LMTP ? "LHLO" : "EHLO", ehlo_hook,
			   why);
		if (rc < 0)
			return rc;
		if (why->code / 100 != 2)
			return -EPROTO;
		enter_state(c, ST_READY);
	}
	return 0;
}

void
smtpc_params_defaults(struct smtpc_params *p)
{
	p->helo_name = "localhost";
	p->connect_timeout_ms = 30000;
	p->cmd_timeout_ms = 300000;
	p->data_timeout_ms = 600000;
	p->tls = SMTPC_TLS_NONE;
	p->tls_ctx = NULL;
}

/* Octets a command line may carry from the caller: no control octet (no
 * command injection through CR/LF), and for an xtext no space either. */
static bool
printable(const char *s, bool allow_space)
{
	for (const unsigned char *u = (const unsigned char *)s; *u; u++)
		if (*u < 0x20 || *u == 0x7f || (*u == ' ' && !allow_space))
			return false;
	return true;
}

static struct smtpc *
session_new(enum smtpc_proto proto, const struct smtpc_params *p, int *err)
{
	struct smtpc_params d;
	struct smtpc *c;

	smtpc_params_defaults(&d);
	if (p) {
		if (p->helo_name && p->helo_name[0])
			d.helo_name = p->helo_name;
		if (p->connect_timeout_ms)
			d.connect_timeout_ms = p->connect_timeout_ms;
		if (p->cmd_timeout_ms)
			d.cmd_timeout_ms = p->cmd_timeout_ms;
		if (p->data_timeout_ms)
			d.data_timeout_ms = p->data_timeout_ms;
	}
	if (strlen(d.helo_name) >= sizeof(c->helo) ||
	    !printable(d.helo_name, false) ||
	    (proto != SMTPC_SMTP && proto != SMTPC_LMTP)) {
		*err = -EINVAL;
		return NULL;
	}
	c = malloc(sizeof(*c));
	if (!c) {
		*err = -ENOMEM;
		return NULL;
	}
	memset(c, 0, offsetof(struct smtpc, rbuf));
	c->fd = -1;
	c->proto = proto;
	c->st = ST_CONNECT;
	c->connect_to = d.connect_timeout_ms;
	c->cmd_to = d.cmd_timeout_ms;
	c->data_to = d.data_timeout_ms;
	if (p && p->tls_ctx && p->tls != SMTPC_TLS_NONE) {
		c->tls = p->tls;
		c->tls_ctx = p->tls_ctx;
	}
	snprintf(c->helo, sizeof(c->helo), "%s", d.helo_name);
	return c;
}

struct smtpc *
smtpc_connect_fd(int fd, enum smtpc_proto proto, const struct smtpc_params *p,
		 struct smtpc_reply *why, int *err)
{
	struct smtpc_reply why_buf;
	int err_buf;
	struct smtpc *c;

	if (!why)
		why = &why_buf;
	if (!err)
		err = &err_buf;
	reply_clear(why);
	c = session_new(proto, p, err);
	if (!c) {
		reply_local(why, 421, "4.3.0", "cannot set up a connection");
		goto out_close_fd;
	}
	c->fd = fd;
	*err = session_open(c, why);
	if (*err < 0) {
		/* TLS may be up (the EHLO inside it failed): free it too. */
		c->st = ST_BROKEN;
		smtpc_abort(c);
		return NULL;
	}
	return c;
out_close_fd:
	close(fd);
	return NULL;
}

/* A connected socket to sa within timeout_ms: the fd, or -errno. */
static int
connect_one(const struct sockaddr *sa, socklen_t len, uint64_t timeout_ms)
{
	int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK |
						SOCK_CLOEXEC, 0);
	int rc = 0, one = 1;
	int soerr = 0;
	socklen_t sl = sizeof(soerr);

	if (fd < 0)
		return -errno;
	if (connect(fd, sa, len) == 0)
		goto out_ok;
	/* EINTR: the connection still completes in the background */
	if (errno != EINPROGRESS && errno != EINTR) {
		rc = -errno;
		goto out_close_fd;
	}
	rc = wait_fd(fd, POLLOUT, deadline_in(timeout_ms));
	if (rc < 0)
		goto out_close_fd;
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0) {
		rc = -errno;
		goto out_close_fd;
	}
	if (soerr) {
		rc = -soerr;
		goto out_close_fd;
	}
out_ok:
	/* commands go out whole in one write each: no Nagle delay wanted */
	if (sa->sa_family != AF_UNIX)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
out_close_fd:
	close(fd);
	return rc;
}

static int
connect_target(const struct smtpc_target *t, uint64_t timeout_ms)
{
	struct addrinfo hints, *res = NULL;
	char host[sizeof(t->host)], port[8];
	size_t hl;
	int rc;

	if (t->unix_path[0]) {
		struct sockaddr_un sun;
		size_t pl = strnlen(t->unix_path, sizeof(t->unix_path));
		if (pl >= sizeof(sun.sun_path))
			return -EINVAL;
		memset(&sun, 0, sizeof(sun));
		sun.sun_family = AF_UNIX;
		memcpy(sun.sun_path, t->unix_path, pl);
		/* a full backlog fails at once (EAGAIN): never waits */
		return connect_one((const struct sockaddr *)&sun,
				   (socklen_t)sizeof(sun), timeout_ms);
	}
	hl = strnlen(t->host, sizeof(t->host));
	if (hl == 0 || hl == sizeof(t->host))
		return -EINVAL;
	memcpy(host, t->host, hl + 1);
	if (host[0] == '[' && host[hl - 1] == ']') {
		memmove(host, host + 1, hl - 2);
		host[hl - 2] = '\0';
	}
	if (t->port == 0 && t->proto == SMTPC_LMTP)
		return -EINVAL; /* RFC 2033 5: LMTP has no port of its own */
	snprintf(port, sizeof(port), "%u", t->port ? t->port : 25u);
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_NUMERICSERV;
	/* XXX getaddrinfo() has no timeout; the route layer is expected to
	 * pass addresses for remote hops */
	rc = getaddrinfo(host, port, &hints, &res);
	if (rc != 0)
		return rc == EAI_SYSTEM ? -errno : -EHOSTUNREACH;
	rc = -EHOSTUNREACH;
	for (struct addrinfo *a = res; a; a = a->ai_next) {
		rc = connect_one(a->ai_addr, a->ai_addrlen, timeout_ms);
		if (rc >= 0)
			break;
	}
	freeaddrinfo(res);
	return rc;
}

struct smtpc *
smtpc_connect(const struct smtpc_target *t, const struct smtpc_params *p,
	      struct smtpc_reply *why, int *err)
{
	struct smtpc_reply why_buf;
	int err_buf, fd;
	struct smtpc *c;
	char eb[128];

	if (!why)
		why = &why_buf;
	if (!err)
		err = &err_buf;
	reply_clear(why);
	if (!t) {
		*err = -EINVAL;
		reply_local(why, 421, "4.3.5", "no target");
		return NULL;
	}
	/* the parameters are checked before any packet leaves */
	c = session_new(t->proto, p, err);
	if (!c) {
		reply_local(why, 421, "4.3.5", "bad client parameters");
		return NULL;
	}
	snprintf(c->host, sizeof(c->host), "%s", t->host);
	if (c->host[0] == '[') { /* "[::1]" */
		size_t hl = strlen(c->host);
		memmove(c->host, c->host + 1, hl);
		if (hl >= 2 && c->host[hl - 2] == ']')
			c->host[hl - 2] = '\0';
	}
again:
	fd = connect_target(t, c->connect_to);
	if (fd < 0) {
		*err = fd;
		if (fd == -ETIMEDOUT)
			reply_local(why, 421, "4.4.1", "connect timeout");
		else
			reply_local(why, 421, "4.4.1", "connect failed: %s",
				    strerror_r(-fd, eb, sizeof(eb)));
		free(c);
		return NULL;
	}
	c->fd = fd;
	*err = session_open(c, why);
	if (*err < 0 && c->tls_failed && c->tls == SMTPC_TLS_MAY) {
		/* Opportunistic: the handshake failed, the clear is better
		 * than no delivery (RFC 7435). Once. */
		close(fd);
		c->fd = -1;
		c->tls = SMTPC_TLS_NONE;
		c->tls_failed = false;
		c->got_421 = false;
		c->roff = c->rlen = c->olen = 0;
		c->st = ST_CONNECT;
		reply_clear(why);
		goto again;
	}
	if (*err < 0) {
		/* TLS may be up (the EHLO inside it failed): free it too. */
		c->st = ST_BROKEN;
		smtpc_abort(c);
		return NULL;
	}
	return c;
}

unsigned
smtpc_exts(const struct smtpc *c)
{
	return c->exts;
}

uint64_t
smtpc_size_limit(const struct smtpc *c)
{
	return c->size_limit;
}

const char *
smtpc_peer_name(const struct smtpc *c)
{
	return c->peer;
}

/* ---- the transaction ----------------------------------------------------- */

/* A command line being built; over CMD_LINE_MAX it is marked bad. */
struct cmdline {
	char s[CMD_LINE_MAX + 1];
	size_t len;
	bool bad;
};

__attribute__((format(printf, 2, 3))) static void
cl_add(struct cmdline *l, const char *fmt, ...)
{
	va_list ap;
	int k;

	if (l->bad)
		return;
	va_start(ap, fmt);
	k = vsnprintf(l->s + l->len, sizeof(l->s) - l->len, fmt, ap);
	va_end(ap);
	if (k < 0 || (size_t)k >= sizeof(l->s) - l->len)
		l->bad = true;
	else
		l->len += (size_t)k;
}

/* cl_add() without the format: MAIL and RCPT are built for every message
 * delivered, and a vsnprintf() per piece was ~7% of a delivery thread's
 * CPU (perf, 4 KiB messages in batches). The same rule: a line that would
 * not fit with its NUL is marked bad. */
static void
cl_put(struct cmdline *l, const char *s)
{
	size_t n = strlen(s);

	if (l->bad)
		return;
	if (n >= sizeof(l->s) - l->len) {
		l->bad = true;
		return;
	}
	memcpy(l->s + l->len, s, n + 1);
	l->len += n;
}

static void
cl_u64(struct cmdline *l, uint64_t v)
{
	char d[21];
	size_t k = sizeof(d) - 1;

	d[k] = '\0';
	do {
		d[--k] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	cl_put(l, d + k);
}

/* RFC 3461 4.4, 4.2: "addr-type;xtext", and xtext has neither space nor
 * control octet. Anything else is left out rather than sent. */
static bool
xtext_ok(const char *s, bool need_type)
{
	return s && s[0] && printable(s, false) &&
	       (!need_type || (strchr(s, ';') && s[0] != ';'));
}

static bool
ascii_only(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s >= 0x80)
			return false;
	return true;
}

/*
 * The ORCPT to send, into buf: as given, or NULL (left out). Raw UTF-8
 * (RFC 6533's utf-8-addr-unitext, which the SMTP engine takes) goes as is
 * only in an SMTPUTF8 transaction; otherwise a utf-8 one is written in its
 * 7-bit utf-8-addr-xtext form, and any other type with 8-bit octets is
 * left out. An 8-bit ORCPT went to next hops without SMTPUTF8, and one
 * that refused it bounced the recipient.
 */
static const char *
orcpt_out(const struct smtpc *c, const struct smtpc_msg *m, const char *o,
	  char *buf, size_t len)
{
	if (!o || ascii_only(o))
		return xtext_ok(o, true) ? o : NULL;
	if (m->smtputf8 && c->exts & SMTPC_EXT_SMTPUTF8)
		return xtext_ok(o, true) ? o : NULL; /* 8-bit octets pass */
	if (strncasecmp(o, "utf-8;", 6) != 0 || len < 7)
		return NULL;
	memcpy(buf, o, 6);
	if (utf8addr_xtext(buf + 6, len - 6, o + 6, len, true) == 0)
		return NULL;
	return xtext_ok(buf, true) ? buf : NULL;
}

static void
build_mail(const struct smtpc *c, const struct smtpc_msg *m,
	   struct cmdline *l)
{
	l->s[0] = '\0';
	l->len = 0;
	l->bad = !printable(m->mail_from, true);
	cl_put(l, "MAIL FROM:<");
	cl_put(l, m->mail_from);
	cl_put(l, ">");
	if (c->exts & SMTPC_EXT_SIZE) {
		cl_put(l, " SIZE=");
		cl_u64(l, m->size);
	}
	if (m->body_type == 3 && c->exts & SMTPC_EXT_BINARYMIME)
		cl_put(l, " BODY=BINARYMIME");
	else if (m->body_type == 2 && c->exts & SMTPC_EXT_8BITMIME)
		cl_put(l, " BODY=8BITMIME");
	else if (m->body_type == 1 && c->exts & SMTPC_EXT_8BITMIME)
		cl_put(l, " BODY=7BIT");
	if (m->smtputf8 && c->exts & SMTPC_EXT_SMTPUTF8)
		cl_put(l, " SMTPUTF8");
	if (c->exts & SMTPC_EXT_DSN) {
		if (m->ret == 1 || m->ret == 2)
			cl_add(l, " RET=%s", m->ret == 1 ? "FULL" : "HDRS");
		/* xtext is 7-bit (RFC 3461 4): the SMTP engine takes no
		 * other ENVID, and none other goes out */
		if (xtext_ok(m->envid, false) && ascii_only(m->envid))
			cl_add(l, " ENVID=%s", m->envid);
	}
	cl_put(l, "\r\n");
}

static void
build_rcpt(const struct smtpc *c, const struct smtpc_msg *m, unsigned i,
	   struct cmdline *l)
{
	const char *a = m->rcpts[i];

	l->s[0] = '\0';
	l->len = 0;
	l->bad = !a || !printable(a, true);
	cl_put(l, "RCPT TO:<");
	cl_put(l, a ? a : "");
	cl_put(l, ">");
	if (c->exts & SMTPC_EXT_DSN) {
		unsigned nb = m->notify ? m->notify[i] : 0;
		const char *o = m->orcpts ? m->orcpts[i] : NULL;
		if (nb & 1) {
			/* RFC 3461 4.1: NEVER stands alone */
			cl_add(l, " NOTIFY=NEVER");
		} else if (nb & 14) {
			const char *sep = "=";
			cl_add(l, " NOTIFY");
			if (nb & 2) {
				cl_add(l, "%sSUCCESS", sep);
				sep = ",";
			}
			if (nb & 4) {
				cl_add(l, "%sFAILURE", sep);
				sep = ",";
			}
			if (nb & 8)
				cl_add(l, "%sDELAY", sep);
		}
		char ob[CMD_LINE_MAX];
		if ((o = orcpt_out(c, m, o, ob, sizeof(ob))))
			cl_add(l, " ORCPT=%s", o);
	}
	cl_put(l, "\r\n");
}

static bool
is2xx(const struct smtpc_reply *r)
{
	return r->code / 100 == 2;
}

/* A 3xx where only a final answer may come is no answer at all: it is
 * dropped, so that a local reply takes its place. */
static int
final_class(struct smtpc_reply *r)
{
	if (r->code / 100 != 3)
		return 0;
	reply_clear(r);
	return -EPROTO;
}

/* data[i] for every recipient not yet given one, from what is known:
 * refused at RCPT or by MAIL -> that reply, otherwise (on failure) fail. */
static void
resolve_data(unsigned n, const struct smtpc_reply *mail,
	     struct smtpc_reply *rcpt, struct smtpc_reply *data,
	     const struct smtpc_reply *fail)
{
	for (unsigned i = 0; i < n; i++) {
		if (rcpt[i].code == 0 && mail->code && !is2xx(mail))
			rcpt[i] = *mail; /* not sent */
		else if (rcpt[i].code == 0 && fail)
			rcpt[i] = *fail;
		if (data[i].code)
			continue;
		if (rcpt[i].local)
			data[i] = rcpt[i];
		else if (mail->code && !is2xx(mail))
			data[i] = *mail;
		else if (rcpt[i].code && !is2xx(&rcpt[i]))
			data[i] = rcpt[i];
		else if (fail)
			data[i] = *fail;
	}
}

static void
fill_all(unsigned n, struct smtpc_reply *mail, struct smtpc_reply *rcpt,
	 struct smtpc_reply *data, const struct smtpc_reply *r)
{
	*mail = *r;
	for (unsigned i = 0; i < n; i++)
		rcpt[i] = data[i] = *r;
}

/* In a transaction: RSET so that the connection is READY again. */
static int
do_rset(struct smtpc *c)
{
	struct smtpc_reply r;
	int rc;

	enter_state(c, ST_RSET);
	rc = send_cmd(c, "RSET\r\n");
	if (rc == 0)
		rc = read_reply(c, c->cmd_to, &r, NULL);
	if (rc == 0 && !is2xx(&r))
		rc = -EPROTO;
	if (rc < 0) {
		enter_state(c, ST_BROKEN);
		return rc;
	}
	enter_state(c, ST_READY);
	return 0;
}

int
smtpc_probe(struct smtpc *c, const char *rcpt, struct smtpc_reply *reply)
{
	char line[CMD_LINE_MAX];
	int rc;

	reply_clear(reply);
	if (c->st != ST_READY) {
		reply_local(reply, 421, "4.4.2", "connection not usable");
		return -ENOTCONN;
	}
	if (!rcpt || !*rcpt || strlen(rcpt) > 512 || !printable(rcpt, true)) {
		reply_local(reply, 501, "5.1.3", "bad recipient address");
		return -EINVAL;
	}
	enter_state(c, ST_MAIL);
	/* A UTF-8 address can only be named with SMTPUTF8 (RFC 6531 3.4);
	 * a next hop without it says 553 5.6.7, which says nothing about
	 * the mailbox (verify: undecided). */
	rc = send_cmd(c, (c->exts & SMTPC_EXT_SMTPUTF8) && !ascii_only(rcpt)
				 ? "MAIL FROM:<> SMTPUTF8\r\n"
				 : "MAIL FROM:<>\r\n");
	if (rc == 0)
		rc = read_reply(c, c->cmd_to, reply, NULL);
	if (rc < 0)
		goto fail;
	if (!is2xx(reply)) {
		/* The sender refused: the answer says nothing about rcpt. */
		struct smtpc_reply mail = *reply;
		rc = do_rset(c);
		*reply = mail;
		return rc < 0 ? rc : 1;
	}
	enter_state(c, ST_RCPT);
	snprintf(line, sizeof(line), "RCPT TO:<%s>\r\n", rcpt);
	rc = send_cmd(c, line);
	if (rc == 0)
		rc = read_reply(c, c->cmd_to, reply, NULL);
	if (rc < 0)
		goto fail;
	/* The RCPT's answer stands even if the RSET fails (a next hop that
	 * closes after answering, or says 421 to RSET): the connection is
	 * then broken (do_rset), and the next probe makes a new one. The
	 * answer was thrown away, and the next hop rested as if it had
	 * given none. */
	(void)do_rset(c);
	return 0;
fail:
	failure_reply(c, rc, reply);
	enter_state(c, ST_BROKEN);
	return rc;
}

/* MAIL and RCPTs: with PIPELINING as many as fit in one write, then their
 * replies in order (RFC 2920 3.1); without, one command per round trip. */
static int
envelope(struct smtpc *c, const struct smtpc_msg *m, struct smtpc_reply *mail,
	 struct smtpc_reply *rcpt)
{
	bool pipe = c->exts & SMTPC_EXT_PIPELINING;
	unsigned next = 0, rd = 0, n = m->n_rcpts;
	bool mail_read = false;
	struct cmdline l;
	int rc;

	build_mail(c, m, &l);
	rc = out_put(c, l.s, l.len);
	for (;;) {
		unsigned queued = mail_read ? 0 : 1;
		while (rc == 0 && next < n && (pipe || queued == 0) &&
		       (!mail_read || is2xx(mail))) {
			build_rcpt(c, m, next, &l);
			if (l.bad) {
				reply_local(&rcpt[next], 553, "5.1.3",
					    "invalid recipient address "
					    "(not sent)");
				next++;
				continue;
			}
			if (c->olen + l.len > OBUF_LEN)
				break;
			rc = out_put(c, l.s, l.len);
			next++;
			queued++;
		}
		if (rc == 0)
			rc = out_flush(c);
		if (rc == 0 && !mail_read) {
			enter_state(c, ST_MAIL);
			rc = read_reply(c, c->cmd_to, mail, NULL);
			if (rc == 0)
				rc = final_class(mail);
			mail_read = true;
		}
		for (; rc == 0 && rd < next; rd++) {
			if (rcpt[rd].code)
				continue; /* refused here, not sent */
			enter_state(c, ST_RCPT);
			rc = read_reply(c, c->cmd_to, &rcpt[rd], NULL);
			if (rc == 0)
				rc = final_class(&rcpt[rd]);
		}
		if (rc < 0)
			return rc;
		if (next == n || !is2xx(mail))
			return 0;
	}
}

/* A piece of body: > 0 octets, 0 at the end, or -errno (body failure). */
static long
body_read(struct smtpc *c, const struct smtpc_msg *m, uint64_t off,
	  void *buf, size_t n)
{
	long k = m->body(m->body_ctx, off, buf, n);

	if (k < 0 || (unsigned long)k > n) {
		c->fail_body = true;
		return k < 0 && k >= -4095 ? k : -EIO;
	}
	return k;
}

struct stuff {
	bool line_start; /* what was sent ends a line (or nothing was) */
	bool cr_pending; /* the last octet read was a CR, sent as CRLF */
	uint64_t total;  /* body octets read */
	size_t line_len; /* octets of the line on the wire so far (<= 998) */
};

/*
 * RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF,
 * and a receiver may refuse a longer one (finaldot's own engine answers
 * 550 5.6.0). BDAT brings such lines in; sent as DATA they are folded
 * after 998 octets with CRLF SP, as Postfix does (smtp_line_length_limit):
 * in a header that is a continuation, in a body one space more, less harm
 * than a bounce. A fold moves back (at most 3 octets, within the run) to
 * the start of a UTF-8 character rather than split it. `p` holds whole
 * CRLFs only (stuff_put() makes every line end one).
 */
#define TEXT_LINE_MAX 998u

static int
fold_put(struct smtpc *c, struct stuff *st, const void *buf, size_t n)
{
	const uint8_t *p = buf;
	int rc = 0;

	while (n && rc == 0) {
		const uint8_t *lf = memchr(p, '\n', n);
		size_t k = lf ? (size_t)(lf - p) + 1 : n;
		size_t text = !lf ? k : k >= 2 && p[k - 2] == '\r' ? k - 2
								: k - 1;
		size_t room = TEXT_LINE_MAX - st->line_len;

		if (text <= room) {
			rc = out_put(c, p, k);
			st->line_len = lf ? 0 : st->line_len + k;
		} else {
			k = room;
			for (unsigned b = 0; b < 3 && k > 0 &&
					     (p[k] & 0xc0) == 0x80; b++)
				k--;
			if ((p[k] & 0xc0) == 0x80)
				k = room; /* not UTF-8 after all: cut here */
			rc = out_put(c, p, k);
			if (rc == 0)
				rc = out_put(c, "\r\n ", 3);
			st->line_len = 1;
		}
		p += k;
		n -= k;
	}
	return rc;
}

/*
 * The body as DATA: every line end CRLF, a bare CR or bare LF (which BDAT
 * may have brought in) made one (RFC 5321 2.3.8: a client sends no bare
 * CR or LF), and a line starting with '.' gets one more (4.5.2). Every
 * receiver then reads the same lines, and none finds "CRLF.CRLF" inside
 * the body. Bare ones went out as they were, with a '.' added after
 * them: a receiver that ends lines at CRLF only kept that '.' (the
 * message changed), and one that refuses bare LF refused the message.
 */
static int
stuff_put(struct smtpc *c, const uint8_t *p, size_t n, struct stuff *st)
{
	size_t from = 0, pos = 0;
	int rc = 0;

	/* A line at a time, by memchr: a CRLF stays in the run being copied
	 * (0.4 us for 4 KiB of 76-octet lines here; octet by octet, with a
	 * write per line end, it was 3.2). */
	if (n && st->cr_pending) {
		st->cr_pending = false;
		if (p[0] == '\n')
			from = pos = 1; /* the CR's own LF: sent with it */
	}
	while (pos < n && rc == 0) {
		const uint8_t *lf, *cr;
		size_t e; /* where the line's end starts, or n */

		if (st->line_start && p[pos] == '.') {
			rc = fold_put(c, st, p + from, pos - from);
			if (rc == 0)
				rc = fold_put(c, st, ".", 1);
			/* the original '.' goes with the next run */
			from = pos;
			if (rc != 0)
				break;
		}
		lf = memchr(p + pos, '\n', n - pos);
		e = lf ? (size_t)(lf - p) : n;
		cr = memchr(p + pos, '\r', e - pos);
		if (lf && cr && (size_t)(cr - p) + 1 == e) {
			pos = e + 1; /* CRLF: stays in the run */
			st->line_start = true;
			continue;
		}
		if (cr || lf) {
			/* a bare CR (or one ending the piece: its LF, if it
			 * has one, starts the next), else a bare LF */
			e = cr ? (size_t)(cr - p) : e;
			rc = fold_put(c, st, p + from, e - from);
			if (rc == 0)
				rc = fold_put(c, st, "\r\n", 2);
			from = pos = e + 1;
			st->line_start = true;
			st->cr_pending = cr && pos == n;
			continue;
		}
		st->line_start = false; /* the rest of the piece ends no line */
		pos = n;
	}
	if (rc == 0 && from < n)
		rc = fold_put(c, st, p + from, n - from);
	st->total += n;
	return rc;
}

/* The reply(ies) after the final dot or BDAT LAST: SMTP one for all
 * accepted recipients, LMTP one each in RCPT order (RFC 2033 4.2). */
static int
read_final(struct smtpc *c, unsigned n, const struct smtpc_reply *rcpt,
	   struct smtpc_reply *data)
{
	struct smtpc_reply r;
	int rc;

	if (c->proto == SMTPC_LMTP) {
		for (unsigned i = 0; i < n; i++) {
			if (!is2xx(&rcpt[i]))
				continue;
			rc = read_reply(c, c->data_to, &data[i], NULL);
			if (rc == 0)
				rc = final_class(&data[i]);
			if (rc < 0)
				return rc;
		}
		return 0;
	}
	rc = read_reply(c, c->data_to, &r, NULL);
	if (rc == 0)
		rc = final_class(&r);
	for (unsigned i = 0; rc == 0 && i < n; i++)
		if (is2xx(&rcpt[i]))
			data[i] = r;
	return rc;
}

/* A refusal of DATA or of a BDAT chunk stands for every accepted
 * recipient; the transaction is then reset (RFC 3030 2). */
static int
refused(struct smtpc *c, unsigned n, const struct smtpc_reply *rcpt,
	struct smtpc_reply *data, const struct smtpc_reply *r)
{
	if (r->code / 100 != 4 && r->code / 100 != 5)
		return -EPROTO;
	for (unsigned i = 0; i < n; i++)
		if (is2xx(&rcpt[i]))
			data[i] = *r;
	return do_rset(c);
}

static int
body_data(struct smtpc *c, const struct smtpc_msg *m,
	  const struct smtpc_reply *rcpt, struct smtpc_reply *data)
{
	struct stuff st = { .line_start = true }; /* the body starts a line */
	struct smtpc_reply r;
	int rc;

	enter_state(c, ST_DATA);
	rc = send_cmd(c, "DATA\r\n");
	if (rc == 0)
		rc = read_reply(c, c->cmd_to, &r, NULL);
	if (rc < 0)
		return rc;
	if (r.code != 354)
		return refused(c, m->n_rcpts, rcpt, data, &r);

	enter_state(c, ST_BODY);
	for (;;) {
		long k = body_read(c, m, st.total, c->bbuf, PIECE_LEN);
		if (k < 0)
			return (int)k;
		if (k == 0)
			break;
		rc = stuff_put(c, c->bbuf, (size_t)k, &st);
		if (rc < 0)
			return rc;
	}
	/* RFC 5321 4.1.1.4: the data ends with CRLF "." CRLF; an empty body
	 * is just the "." line */
	if (st.total && !st.line_start)
		rc = out_put(c, "\r\n", 2);
	if (rc == 0)
		rc = out_put(c, ".\r\n", 3);
	if (rc == 0)
		final_queued(c);
	if (rc == 0)
		rc = out_flush(c);
	if (rc < 0)
		return rc;
	enter_state(c, ST_DOT);
	return read_final(c, m->n_rcpts, rcpt, data);
}

/*
 * RFC 3030: chunks of at most 1 MiB, verbatim. The last chunk is kept to
 * at most one piece, read whole before "BDAT n LAST" is sent, and followed
 * by a probe for more: a source shorter or longer than m->size is caught
 * before the peer could take a wrong message as complete.
 */
static int
body_bdat(struct smtpc *c, const struct smtpc_msg *m,
	  const struct smtpc_reply *rcpt, struct smtpc_reply *data)
{
	uint64_t off = 0, total = m->size;
	struct smtpc_reply r;
	int rc;

	enter_state(c, ST_BDAT);
	for (;;) {
		uint64_t rem = total - off, len, got = 0;
		bool last = rem <= PIECE_LEN;
		uint8_t probe;
		long k;

		len = last ? rem : rem - PIECE_LEN;
		if (len > CHUNK_MAX)
			len = CHUNK_MAX;
		c->olen = (size_t)snprintf((char *)c->obuf, HDR_ROOM,
					   "BDAT %" PRIu64 "%s\r\n", len,
					   last ? " LAST" : "");
		while (got < len) {
			size_t want = OBUF_LEN - c->olen;
			if (want > len - got)
				want = (size_t)(len - got);
			k = body_read(c, m, off + got, c->obuf + c->olen, want);
			if (k == 0) {
				c->fail_body = true;
				k = -EIO; /* shorter than m->size */
			}
			if (k < 0)
				return (int)k;
			c->olen += (size_t)k;
			got += (uint64_t)k;
			/* never true for the last chunk: it fits whole */
			if (c->olen == OBUF_LEN && (rc = out_flush(c)) < 0)
				return rc;
		}
		off += len;
		if (last) {
			k = body_read(c, m, off, &probe, 1);
			if (k != 0) {
				c->fail_body = true;
				return k < 0 ? (int)k : -EIO;
			}
			final_queued(c);
		}
		rc = out_flush(c);
		if (rc < 0)
			return rc;
		if (last)
			break;
		rc = read_reply(c, c->cmd_to, &r, NULL);
		if (rc < 0)
			return rc;
		if (!is2xx(&r))
			return refused(c, m->n_rcpts, rcpt, data, &r);
	}
	enter_state(c, ST_DOT);
	return read_final(c, m->n_rcpts, rcpt, data);
}

/* In READY nothing is owed to us: octets waiting, in our buffer or (in
 * the clear) already on the socket, are a reply nothing asked for. An EOF
 * alone is no reply (the next write or read says what it means). */
static bool
stray_input(struct smtpc *c)
{
	char b;

	return c->roff != c->rlen ||
	       (!c->ssl && recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) == 1);
}

int
smtpc_send(struct smtpc *c, const struct smtpc_msg *m, struct smtpc_reply *mail,
	   struct smtpc_reply *rcpt, struct smtpc_reply *data)
{
	struct smtpc_reply fail;
	unsigned n, n_ok = 0;
	int rc;

	if (!c || !m || !mail || !rcpt || !data)
		return -EINVAL;
	n = m->n_rcpts;
	reply_clear(mail);
	for (unsigned i = 0; i < n; i++) {
		reply_clear(&rcpt[i]);
		reply_clear(&data[i]);
	}
	if (n == 0 || !m->rcpts || !m->body || !m->mail_from)
		return -EINVAL;
	if (c->st != ST_READY) {
		failure_reply(c, -ENOTCONN, &fail);
		fill_all(n, mail, rcpt, data, &fail);
		return -ENOTCONN;
	}
	if (stray_input(c)) {
		/* A reply too many already (behind the EHLO reply, say): each
		 * reply would be read as the one to the command before it,
		 * BDAT LAST taking its RCPT's 250 for a refused message.
		 * Nothing is sent; the connection is done. */
		enter_state(c, ST_BROKEN);
		reply_local(&fail, 451, "4.5.0",
			    "next hop out of step (a reply nothing asked "
			    "for): nothing sent");
		fill_all(n, mail, rcpt, data, &fail);
		return -EPROTO;
	}
	/* RFC 6531 3.4 (no SMTPUTF8 to a peer without it), RFC 3030 3 */
	if (m->smtputf8 && !(c->exts & SMTPC_EXT_SMTPUTF8)) {
		reply_local(&fail, 554, "5.6.7",
			    "next hop does not support SMTPUTF8");
		fill_all(n, mail, rcpt, data, &fail);
		return 0;
	}
	if (m->body_type == 3 &&
	    (~c->exts & (SMTPC_EXT_BINARYMIME | SMTPC_EXT_CHUNKING))) {
		reply_local(&fail, 554, "5.6.3",
			    "next hop does not support BINARYMIME");
		fill_all(n, mail, rcpt, data, &fail);
		return 0;
	}
	{
		struct cmdline l;
		build_mail(c, m, &l);
		if (l.bad) {
			reply_local(&fail, 553, "5.1.7",
				    "invalid sender address (not sent)");
			fill_all(n, mail, rcpt, data, &fail);
			return 0;
		}
	}
	c->fail_write = c->fail_body = c->last_out = false;

	rc = envelope(c, m, mail, rcpt);
	if (rc < 0)
		goto out_broken;
	if (!is2xx(mail)) {
		resolve_data(n, mail, rcpt, data, NULL);
		enter_state(c, ST_READY);
		return 0;
	}
	for (unsigned i = 0; i < n; i++)
		n_ok += is2xx(&rcpt[i]);
	resolve_data(n, mail, rcpt, data, NULL);
	if (n_ok == 0)
		return do_rset(c); /* no body; RSET ends the transaction */
	if (c->exts & SMTPC_EXT_CHUNKING)
		rc = body_bdat(c, m, rcpt, data);
	else
		rc = body_data(c, m, rcpt, data);
	if (rc < 0)
		goto out_broken;
	if (c->st == ST_DOT)
		enter_state(c, ST_READY);
	return 0;
out_broken:
	failure_reply(c, rc, &fail);
	enter_state(c, ST_BROKEN);
	if (mail->code == 0)
		*mail = fail;
	resolve_data(n, mail, rcpt, data, &fail);
	return rc;
}

/* ---- several transactions, pipelined ------------------------------------ */

/*
 * Limits of a pipelined batch (smtpc.h smtpc_send_many): a message whose
 * commands take more than ENV_MAX octets goes alone (smtpc_send()), and
 * replies are read before more than PIPE_BYTES octets or PIPE_CMDS
 * commands are outstanding, so that a peer which writes its replies with
 * blocking writes cannot fill both directions and deadlock us (RFC 2920
 * 3.1): their replies stay far below any socket buffer.
 */
#define ENV_MAX 16384u
#define PIPE_BYTES (256u * 1024u)
#define PIPE_CMDS 128u

/* What smtpc_send() checks before sending anything: 1 when the message was
 * answered locally (replies filled, rc 0), -EINVAL, or 0 to go on. Replies
 * cleared either way. */
static int
tx_begin(const struct smtpc *c, struct smtpc_tx *t)
{
	const struct smtpc_msg *m = t->m;
	struct smtpc_reply fail;
	struct cmdline l;
	unsigned n = m ? m->n_rcpts : 0;

	reply_clear(&t->mail);
	for (unsigned i = 0; t->rcpt && t->data && i < n; i++) {
		reply_clear(&t->rcpt[i]);
		reply_clear(&t->data[i]);
	}
	t->last_out = false;
	t->rc = 0;
	if (!m || !t->rcpt || !t->data || n == 0 || !m->rcpts || !m->body ||
	    !m->mail_from)
		return t->rc = -EINVAL;
	if (m->smtputf8 && !(c->exts & SMTPC_EXT_SMTPUTF8))
		reply_local(&fail, 554, "5.6.7",
			    "next hop does not support SMTPUTF8");
	else if (m->body_type == 3 &&
		 (~c->exts & (SMTPC_EXT_BINARYMIME | SMTPC_EXT_CHUNKING)))
		reply_local(&fail, 554, "5.6.3",
			    "next hop does not support BINARYMIME");
	else {
		build_mail(c, m, &l);
		if (!l.bad)
			return 0;
		reply_local(&fail, 553, "5.1.7",
			    "invalid sender address (not sent)");
	}
	fill_all(n, &t->mail, t->rcpt, t->data, &fail);
	return 1;
}

/* t's RSET (when rset), MAIL and RCPT lines take at most ENV_MAX octets:
 * what one pipelined group may carry. */
static bool
tx_envelope_fits(const struct smtpc *c, const struct smtpc_tx *t, bool rset)
{
	const struct smtpc_msg *m = t->m;
	struct cmdline l;
	size_t total = rset ? 6 : 0;

	build_mail(c, m, &l);
	total += l.len;
	for (unsigned i = 0; i < m->n_rcpts; i++) {
		build_rcpt(c, m, i, &l);
		total += l.bad ? 0 : l.len;
	}
	return total <= ENV_MAX;
}

/* Queue MAIL and the RCPTs of t (an unsendable address: its local 553 in
 * rcpt[i], not sent) after an RSET when rset. The number of commands
 * queued, or 0 when they would take more than ENV_MAX octets (then nothing
 * is queued). */
static unsigned
tx_queue_envelope(struct smtpc *c, struct smtpc_tx *t, bool rset, int *rc)
{
	const struct smtpc_msg *m = t->m;
	struct cmdline l;
	unsigned cmds = 1u + (rset ? 1u : 0u);

	if (!tx_envelope_fits(c, t, rset))
		return 0;
	*rc = rset ? out_put(c, "RSET\r\n", 6) : 0;
	build_mail(c, m, &l);
	if (*rc == 0)
		*rc = out_put(c, l.s, l.len);
	for (unsigned i = 0; *rc == 0 && i < m->n_rcpts; i++) {
		build_rcpt(c, m, i, &l);
		if (l.bad) {
			reply_local(&t->rcpt[i], 553, "5.1.3",
				    "invalid recipient address (not sent)");
			continue;
		}
		*rc = out_put(c, l.s, l.len);
		cmds++;
	}
	return cmds;
}

/* The replies to what tx_queue_envelope() queued, in order; the number of
 * recipients accepted (0 also when MAIL was refused). */
static int
tx_read_envelope(struct smtpc *c, struct smtpc_tx *t, bool rset,
		 unsigned *n_ok)
{
	struct smtpc_reply r;
	int rc;

	*n_ok = 0;
	if (rset) {
		enter_state(c, ST_RSET);
		rc = read_reply(c, c->cmd_to, &r, NULL);
		if (rc == 0 && !is2xx(&r))
			rc = -EPROTO;
		if (rc < 0)
			return rc;
	}
	enter_state(c, ST_MAIL);
	rc = read_reply(c, c->cmd_to, &t->mail, NULL);
	if (rc == 0)
		rc = final_class(&t->mail);
	enter_state(c, ST_RCPT);
	for (unsigned i = 0; rc == 0 && i < t->m->n_rcpts; i++) {
		if (t->rcpt[i].code)
			continue; /* refused here, not sent */
		rc = read_reply(c, c->cmd_to, &t->rcpt[i], NULL);
		if (rc == 0)
			rc = final_class(&t->rcpt[i]);
		if (rc == 0 && is2xx(&t->mail))
			*n_ok += is2xx(&t->rcpt[i]);
	}
	return rc;
}

/* The reply(ies) to the final dot or BDAT LAST of t: with n_ok accepted
 * recipients as read_final(); with none (MAIL or every RCPT refused) the
 * one refusal the peer owes, dropped: the envelope's replies stand. */
static int
tx_read_final(struct smtpc *c, struct smtpc_tx *t, unsigned n_ok)
{
	struct smtpc_reply r;
	int rc;

	enter_state(c, ST_DOT);
	if (n_ok)
		rc = read_final(c, t->m->n_rcpts, t->rcpt, t->data);
	else
		rc = read_reply(c, c->data_to, &r, NULL);
	if (rc == 0)
		resolve_data(t->m->n_rcpts, &t->mail, t->rcpt, t->data, NULL);
	return rc;
}

/* The whole body of m into c->bbuf (it fits: m->size <= PIECE_LEN), and
 * checked to end there. Calls the source's last-bytes hook. */
static int
tx_read_body(struct smtpc *c, const struct smtpc_msg *m)
{
	uint64_t got = 0;
	uint8_t probe;
	long k;

	while (got < m->size) {
		k = body_read(c, m, got, c->bbuf + got, m->size - got);
		if (k <= 0) {
			c->fail_body = true;
			return k < 0 ? (int)k : -EIO;
		}
		got += (uint64_t)k;
	}
	k = body_read(c, m, got, &probe, 1);
	if (k != 0) {
		c->fail_body = true;
		return k < 0 ? (int)k : -EIO;
	}
	return 0;
}

/* A failure rc broke the connection: every transaction from first on
 * that has no final answer gets the local reply standing for rc. */
static void
tx_broken(struct smtpc *c, struct smtpc_tx *tx, unsigned n, const bool *done,
	  int rc)
{
	struct smtpc_reply fail;

	/* (already BROKEN: a message sent alone failed and said why) */
	failure_reply(c, c->st == ST_BROKEN ? -ENOTCONN : rc, &fail);
	enter_state(c, ST_BROKEN);
	for (unsigned i = 0; i < n; i++) {
		struct smtpc_tx *t = &tx[i];
		if (done[i] || !t->m || !t->rcpt || !t->data)
			continue;
		if (t->mail.code == 0)
			t->mail = fail;
		resolve_data(t->m->n_rcpts, &t->mail, t->rcpt, t->data, &fail);
		t->rc = rc;
	}
}

/* Recipients of t accepted at RCPT after MAIL was. */
static unsigned
tx_accepted(const struct smtpc_tx *t)
{
	unsigned n = 0;

	for (unsigned i = 0; is2xx(&t->mail) && i < t->m->n_rcpts; i++)
		n += is2xx(&t->rcpt[i]);
	return n;
}

/* Every accepted recipient of t got a 2xx after its data: the peer holds
 * no open transaction. */
static bool
tx_all_ok(const struct smtpc_tx *t, unsigned n_ok)
{
	if (n_ok == 0)
		return false;
	for (unsigned i = 0; i < t->m->n_rcpts; i++)
		if (is2xx(&t->rcpt[i]) && !is2xx(&t->data[i]))
			return false;
	return true;
}

/* Message t on its own, from READY (too big for the pipeline: its
 * envelope, or a body over PIECE_LEN that smtpc_send() streams); open: the
 * last transaction was left open, an RSET closes it first. *done is set
 * once smtpc_send() ran (its outcome is in t, and its error, < 0, is
 * returned: the connection is gone); an error before that leaves it. */
static int
send_alone(struct smtpc *c, struct smtpc_tx *t, bool open, bool *done)
{
	int rc = open ? do_rset(c) : 0;

	if (rc < 0)
		return rc;
	enter_state(c, ST_READY);
	t->rc = smtpc_send(c, t->m, &t->mail, t->rcpt, t->data);
	t->last_out = final_sent(c);
	*done = true;
	return t->rc < 0 ? t->rc : 0;
}

/* With CHUNKING: RSET (between transactions), MAIL, RCPTs, BDAT n LAST and
 * the body of every message, as many as the limits allow in one write,
 * then all their replies. A body that cannot be read whole is found before
 * any of its message is queued: that message alone fails (451 4.3.0). */
static int
many_bdat(struct smtpc *c, struct smtpc_tx *tx, unsigned n, bool *done)
{
	unsigned i = 0, rd = 0, n_ok;
	bool rset = false, open = false;
	bool *rs = calloc(n ? n : 1, sizeof(*rs));
	int rc = 0;

	if (!rs)
		return -ENOMEM;
	while (rc == 0 && rd < n) {
		size_t bytes = 0;
		unsigned cmds = 0;
		bool alone = false;

		/* queue */
		for (; rc == 0 && i < n && bytes < PIPE_BYTES &&
		       cmds < PIPE_CMDS;
		     i++) {
			struct smtpc_tx *t = &tx[i];
			char hdr[HDR_ROOM];
			int hl, b = tx_begin(c, t);
			unsigned k;

			if (b != 0) {
				done[i] = true;
				continue;
			}
			/* before its body is read: smtpc_send() reads it */
			if (t->m->size > PIECE_LEN ||
			    !tx_envelope_fits(c, t, rset)) {
				alone = true; /* below */
				break;
			}
			c->fail_body = false;
			rc = tx_read_body(c, t->m);
			if (rc < 0) {
				struct smtpc_reply f;
				failure_reply(c, rc, &f);
				fill_all(t->m->n_rcpts, &t->mail, t->rcpt,
					 t->data, &f);
				t->rc = rc;
				c->fail_body = false;
				rc = 0;
				done[i] = true;
				continue;
			}
			k = tx_queue_envelope(c, t, rset, &rc);
			if (k == 0) {
				alone = true; /* below */
				break;
			}
			hl = snprintf(hdr, sizeof(hdr),
				      "BDAT %" PRIu64 " LAST\r\n", t->m->size);
			if (rc == 0)
				rc = out_put(c, hdr, (size_t)hl);
			if (rc == 0)
				rc = out_put(c, c->bbuf, (size_t)t->m->size);
			t->last_out = rc == 0;
			t->out_end = c->sent + c->olen;
			rs[i] = rset;
			rset = true;
			bytes += (size_t)t->m->size + ENV_MAX / 16;
			cmds += k + 1;
		}
		if (rc == 0)
			rc = out_flush(c);
		/* read */
		for (; rc == 0 && rd < i; rd++) {
			if (done[rd])
				continue;
			rc = tx_read_envelope(c, &tx[rd], rs[rd], &n_ok);
			if (rc == 0)
				rc = tx_read_final(c, &tx[rd], n_ok);
			if (rc == 0) {
				done[rd] = true;
				open = !tx_all_ok(&tx[rd], n_ok);
			}
		}
		if (rc == 0 && alone) {
			rc = send_alone(c, &tx[i], open, &done[i]);
			if (done[i]) {
				/* A refusal may have left it open, as in the
				 * pipeline: the next one starts with an RSET
				 * (pipelined, free), the batch ends with one. */
				rset = true;
				open = !tx_all_ok(&tx[i], tx_accepted(&tx[i]));
			}
			i++;
			rd = i;
			if (rc < 0) {
				free(rs);
				return rc; /* smtpc_send() said it all */
			}
		}
	}
	/* The last transaction may have been refused and left open. */
	if (rc == 0 && open)
		rc = do_rset(c);
	free(rs);
	return rc;
}

/* Without CHUNKING: message i's RSET (after a refusal), MAIL, RCPTs and
 * DATA go in the write that carries message i-1's body and final dot;
 * then i-1's final reply and i's envelope replies are read. One round
 * trip per message. */
static int
many_data(struct smtpc *c, struct smtpc_tx *tx, unsigned n, bool *done)
{
	int pend = -1; /* body and dot queued, final reply not read */
	unsigned pend_ok = 0, n_ok;
	bool need_rset = false;
	int rc = 0;

	for (unsigned i = 0; rc == 0 && i < n; i++) {
		struct smtpc_tx *t = &tx[i];
		struct smtpc_reply r;
		bool rset = need_rset;
		unsigned k;
		int b = tx_begin(c, t);

		if (b != 0) {
			done[i] = true;
			continue;
		}
		k = tx_queue_envelope(c, t, rset, &rc);
		if (k == 0) {
			/* Too big for the pipeline: what is queued goes and
			 * is answered first. */
			rc = out_flush(c);
			if (rc == 0 && pend >= 0) {
				rc = tx_read_final(c, &tx[pend], pend_ok);
				done[pend] = rc == 0;
				pend = -1;
			}
			if (rc == 0)
				rc = send_alone(c, t, need_rset, &done[i]);
			if (rc < 0 && done[i])
				return rc; /* smtpc_send() said it all */
			if (rc < 0)
				break;
			need_rset = false;
			continue;
		}
		if (rc == 0)
			rc = out_put(c, "DATA\r\n", 6);
		if (rc == 0)
			rc = out_flush(c);
		if (rc == 0 && pend >= 0) {
			rc = tx_read_final(c, &tx[pend], pend_ok);
			if (rc == 0)
				done[pend] = true;
			pend = -1;
		}
		if (rc == 0)
			rc = tx_read_envelope(c, t, rset, &n_ok);
		if (rc < 0)
			break;
		enter_state(c, ST_DATA);
		rc = read_reply(c, c->cmd_to, &r, NULL);
		if (rc < 0)
			break;
		need_rset = false;
		if (r.code == 354) {
			/* With nobody to deliver to, an empty message whose
			 * reply is dropped (a peer that says 354 anyway). */
			struct stuff st = { .line_start = true };
			enter_state(c, ST_BODY);
			c->fail_body = false;
			for (; n_ok;) {
				long kk = body_read(c, t->m, st.total, c->bbuf,
						    PIECE_LEN);
				if (kk < 0) {
					rc = (int)kk;
					break;
				}
				if (kk == 0)
					break;
				rc = stuff_put(c, c->bbuf, (size_t)kk, &st);
				if (rc < 0)
					break;
			}
			if (rc == 0 && st.total && !st.line_start)
				rc = out_put(c, "\r\n", 2);
			if (rc == 0)
				rc = out_put(c, ".\r\n", 3);
			if (rc < 0)
				break;
			t->last_out = n_ok > 0;
			t->out_end = c->sent + c->olen;
			need_rset = n_ok == 0;
			pend = (int)i;
			pend_ok = n_ok;
			continue;
		}
		if (r.code / 100 != 4 && r.code / 100 != 5) {
			rc = -EPROTO;
			break;
		}
		/* DATA refused: it stands for the accepted recipients; the
		 * transaction MAIL opened is closed by the next RSET. */
		for (unsigned j = 0; n_ok && j < t->m->n_rcpts; j++)
			if (is2xx(&t->rcpt[j]))
				t->data[j] = r;
		resolve_data(t->m->n_rcpts, &t->mail, t->rcpt, t->data, NULL);
		need_rset = is2xx(&t->mail);
		done[i] = true;
	}
	if (rc == 0 && pend >= 0) {
		rc = out_flush(c);
		if (rc == 0)
			rc = tx_read_final(c, &tx[pend], pend_ok);
		if (rc == 0)
			done[pend] = true;
	}
	if (rc == 0 && need_rset)
		rc = do_rset(c);
	return rc;
}

/*
 * After a batch, READY: a reply already waiting that no command asked for
 * means the peer answered something twice (or a middlebox did), and every
 * reply read may have been the one to the command before it: a message
 * taken as delivered may have been refused, another bounced with its
 * neighbour's reply. None of the batch's outcomes is trusted: each is
 * deferred, those whose final octets went out counted as possibly
 * delivered (a duplicate at worst, never a loss). 0 or -EPROTO.
 */
static int
out_of_step(struct smtpc *c, struct smtpc_tx *tx, unsigned n)
{
	struct smtpc_reply f;

	if (c->st != ST_READY || !stray_input(c))
		return 0;
	reply_local(&f, 451, "4.5.0",
		    "next hop out of step (a reply nothing asked for): "
		    "outcome unknown");
	for (unsigned i = 0; i < n; i++) {
		struct smtpc_tx *t = &tx[i];

		if (!t->m || !t->rcpt || !t->data || t->rc == -EINVAL)
			continue;
		fill_all(t->m->n_rcpts, &t->mail, t->rcpt, t->data, &f);
		t->rc = -EPROTO;
	}
	enter_state(c, ST_BROKEN);
	return -EPROTO;
}

int
smtpc_send_many(struct smtpc *c, struct smtpc_tx *tx, unsigned n)
{
	bool *done;
	int rc = 0;

	if (!c || (!tx && n))
		return -EINVAL;
	if (n == 0)
		return 0;
	if (c->st != ST_READY || !(c->exts & SMTPC_EXT_PIPELINING) || n == 1 ||
	    stray_input(c)) {
		/* One at a time: smtpc_send() says everything (also that
		 * the peer is out of step before anything was sent). */
		for (unsigned i = 0; i < n; i++) {
			struct smtpc_tx *t = &tx[i];
			c->last_out = false;
			t->rc = smtpc_send(c, t->m, &t->mail, t->rcpt, t->data);
			t->last_out = final_sent(c);
			if (t->rc < 0 && rc == 0 && t->rc != -EINVAL)
				rc = t->rc;
		}
		return rc == 0 ? out_of_step(c, tx, n) : rc;
	}
	/* Every slot holds a reply when this returns, also those of
	 * transactions a failure kept from being started. */
	for (unsigned i = 0; i < n; i++) {
		struct smtpc_tx *t = &tx[i];
		reply_clear(&t->mail);
		for (unsigned k = 0; t->m && t->rcpt && t->data &&
				     k < t->m->n_rcpts;
		     k++) {
			reply_clear(&t->rcpt[k]);
			reply_clear(&t->data[k]);
		}
		t->rc = 0;
		t->last_out = false;
		t->out_end = 0;
	}
	done = calloc(n, sizeof(*done));
	if (!done)
		return -ENOMEM;
	c->fail_write = c->fail_body = false;
	rc = (c->exts & SMTPC_EXT_CHUNKING) ? many_bdat(c, tx, n, done)
					    : many_data(c, tx, n, done);
	/* Final octets queued but never written (the write carrying them
	 * failed) did not go out. */
	for (unsigned i = 0; i < n; i++)
		if (tx[i].last_out && tx[i].out_end && tx[i].out_end > c->sent)
			tx[i].last_out = false;
	if (rc < 0)
		tx_broken(c, tx, n, done, rc);
	else
		enter_state(c, ST_READY);
	free(done);
	return rc == 0 ? out_of_step(c, tx, n) : rc;
}

bool
smtpc_reusable(struct smtpc *c)
{
	struct pollfd pfd;

	if (!c || c->st != ST_READY || c->fd < 0)
		return false;
	pfd.fd = c->fd;
	pfd.events = POLLIN;
	pfd.revents = 0;
	if (c->roff != c->rlen || (c->ssl && SSL_pending(c->ssl) > 0) ||
	    poll(&pfd, 1, 0) != 0) {
		/* In READY nothing is owed to us: octets waiting (a 421
		 * before the peer closed, its FIN, a reply too many) mean
		 * the connection is gone or out of step. Reading them as
		 * the next MAIL's reply would charge that message, or
		 * shift every later reply by one. */
		enter_state(c, ST_BROKEN);
		return false;
	}
	return true;
}

int
smtpc_rset(struct smtpc *c)
{
	if (!c || c->st != ST_READY)
		return -ENOTCONN;
	return do_rset(c);
}

void
smtpc_quit(struct smtpc *c)
{
	struct smtpc_reply r;

	if (!c)
		return;
	if (c->st != ST_BROKEN && c->fd >= 0) {
		uint64_t to = c->cmd_to < QUIT_TIMEOUT_MS ? c->cmd_to
							  : QUIT_TIMEOUT_MS;
		enter_state(c, ST_QUIT);
		if (io_write(c, "QUIT\r\n", 6, to) == 0)
			(void)read_reply(c, to, &r, NULL);
	}
	smtpc_abort(c);
}

void
smtpc_abort(struct smtpc *c)
{
	if (!c)
		return;
	if (c->ssl) {
		/* close_notify if the socket takes it now; no waiting. */
		if (c->st != ST_BROKEN)
			(void)SSL_shutdown(c->ssl);
		SSL_free(c->ssl);
		ERR_clear_error();
	}
	if (c->fd >= 0)
		close(c->fd);
	free(c);
}

void *
smtpc_tls_ctx_new(const char *ca_file, char *err, size_t errlen)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	int ok;

	if (!ctx) {
		snprintf(err, errlen, "SSL_CTX_new failed");
		return NULL;
	}
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
				      SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	ok = ca_file && *ca_file
		     ? SSL_CTX_load_verify_locations(ctx, ca_file, NULL)
		     : SSL_CTX_set_default_verify_paths(ctx);
	if (ok != 1) {
		snprintf(err, errlen, "cannot load CA certificates from %s",
			 ca_file && *ca_file ? ca_file : "the system store");
		ERR_clear_error();
		SSL_CTX_free(ctx);
		return NULL;
	}
	return ctx;
}

void
smtpc_tls_ctx_free(void *ctx)
{
	SSL_CTX_free(ctx);
}

const char *
smtpc_tls_desc(const struct smtpc *c)
{
	return c->ssl ? c->tls_desc : "";
}
