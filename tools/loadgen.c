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
 * TLS (--starttls, RFC 3207): EHLO, STARTTLS, a client handshake (OpenSSL,
 * on the same nonblocking socket, driven by the same epoll edges), EHLO
 * again inside TLS, then the same message loop. The server's certificate is
 * not verified: this measures, it does not authenticate. Output goes
 * through a fixed staging buffer per connection (tx[], one record's worth),
 * so pipelined commands share a record as a buffered client's would and
 * nothing is allocated per message; the end of data counts as handed to
 * the kernel when the SSL_write holding its last byte has returned. With
 * --tls-resume each connection slot keeps the first resumable session it
 * was given (a TLS 1.2 ticket or a TLS 1.3 NewSessionTicket, which arrives
 * with the first reply inside TLS) and offers a copy of it on every
 * reconnection.
 * --handshakes N: each slot does N times connect, EHLO, STARTTLS,
 * handshake, QUIT, and the report counts handshakes (full and resumed)
 * and their latency, from the 220 to STARTTLS to the client's handshake
 * done. --hold SEC: every connection stops once it is ready for MAIL (after
 * the EHLO inside TLS with --starttls), says "holding N idle sessions" on
 * stderr when all are, and after SEC seconds or SIGTERM/SIGINT QUITs: for
 * the server's memory per idle session.
 *
 * Policy: it connects only to the one numeric address given, and refuses
 * (exit 2) anything but loopback (127.0.0.0/8, ::1) unless --allow-nonlocal.
 *
 * Exit: 0 every message accepted (--handshakes: every handshake done;
 * --hold: every session held); 1 otherwise (unless --allow-failures), or the
 * server lacks a requested extension (STARTTLS included); 2 usage.
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

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "finaldot/msgid.h"
#include "lg_addr.h"
#include "lg_msg.h"

#define LG_IN_MAX 8192
/* one TLS record's plaintext at most: what is staged for one SSL_write */
#define LG_TX_MAX 16384
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
	LG_TAG_STARTTLS,
	LG_TAG_QUIT,
};

/*
 * CONNECTING -> OPEN (SMTP in the clear) -> HANDSHAKE (after the 220 to
 * STARTTLS; c->ssl set, no SMTP bytes move) -> OPEN (SMTP inside TLS) ->
 * DONE (no more reconnections). Any state goes back to CONNECTING on a
 * reconnection.
 */
enum lg_cstate {
	LG_CS_CONNECTING,
	LG_CS_OPEN,
	LG_CS_HANDSHAKE,
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
	bool ext_pipelining, ext_chunking, ext_starttls;

	/* TLS: ssl from the 220 to STARTTLS to the close */
	SSL *ssl;
	SSL_SESSION *sess; /* --tls-resume: this slot's session, owned */
	bool tls_broken;   /* a fatal TLS error: no close_notify */
	uint64_t t_starttls;
	char tx[LG_TX_MAX]; /* staged plaintext, stable across retries */
	size_t tx_len;
	bool tx_eod; /* tx ends a message's data */
	char err[160];

	unsigned hs_left; /* --handshakes: this slot's handshakes to go */
	bool holding;     /* --hold: idle, ready for MAIL */

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
	bool starttls, tls_resume;
	int tls_version;     /* 0: OpenSSL's range, else pinned */
	unsigned handshakes; /* per connection slot; 0: send messages */
	unsigned hold_s;     /* 0: no holding */
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
	uint64_t *lat_ns; /* final dot, or handshake with --handshakes */
	size_t lat_n, lat_cap;

	SSL_CTX *ssl_ctx;
	uint64_t hs_done, hs_full, hs_resumed, hs_failed;
	const char *tls_version, *tls_cipher; /* OpenSSL's static text */
	char peer_key[32];

	unsigned holding, held_max;
	bool hold_announced, hold_over;
	uint64_t hold_until;
};

static volatile sig_atomic_t lg_stop; /* --hold: SIGTERM or SIGINT seen */

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

/* ---- TLS I/O ---------------------------------------------------------- */

/*
 * A fatal TLS error (SSL_get_error() result e) into c->err, with OpenSSL's
 * first queued reason; the connection must not send close_notify after it.
 */
static const char *
lg_tls_reason(struct lg_conn *c, const char *what, int e)
{
	unsigned long q = ERR_get_error();
	char why[120];

	if (q)
		ERR_error_string_n(q, why, sizeof(why));
	else if (e == SSL_ERROR_SYSCALL && errno)
		snprintf(why, sizeof(why), "%s", strerror(errno));
	else
		snprintf(why, sizeof(why), "SSL error %d", e);
	ERR_clear_error();
	snprintf(c->err, sizeof(c->err), "TLS %s: %s", what, why);
	c->tls_broken = true;
	return c->err;
}

/* Copy queued segments into tx[] (empty) as far as they fit. */
static void
lg_stage(struct lg_conn *c)
{
	while (c->seg_n > 0 && c->tx_len < sizeof(c->tx)) {
		struct lg_seg *s = &c->seg[c->seg_first];
		size_t take = sizeof(c->tx) - c->tx_len;
		if (take > s->len)
			take = s->len;
		memcpy(c->tx + c->tx_len, s->p, take);
		c->tx_len += take;
		s->p += take;
		s->len -= take;
		if (s->len == 0) {
			c->seg_first = (c->seg_first + 1) % LG_SEGS;
			c->seg_n--;
		}
	}
	if (c->seg_n == 0) {
		c->cmd_len = 0; /* nothing points into cmd[] any more */
		c->tx_eod = c->eod_last;
		c->eod_last = false;
	}
}

/*
 * lg_flush() inside TLS. SSL_write is retried with the same tx[] and
 * length after WANT_WRITE (OpenSSL requires it), so tx[] is refilled only
 * once it went out whole. Returns plaintext bytes written, or -EPROTO with
 * the reason in c->err.
 */
static ssize_t
lg_tls_flush(struct lg_conn *c)
{
	ssize_t total = 0;
	for (;;) {
		if (c->tx_len == 0) {
			if (c->seg_n == 0)
				return total;
			lg_stage(c);
		}
		ERR_clear_error();
		int w = SSL_write(c->ssl, c->tx, (int)c->tx_len);
		if (w <= 0) {
			int e = SSL_get_error(c->ssl, w);
			if (e == SSL_ERROR_WANT_WRITE ||
			    e == SSL_ERROR_WANT_READ)
				return total;
			lg_tls_reason(c, "write", e);
			return -EPROTO;
		}
		total += w;
		c->tx_len = 0;
		if (c->tx_eod) {
			c->t_eod = lg_now_ns();
			c->tx_eod = false;
		}
	}
}

static ssize_t
lg_send(struct lg_conn *c)
{
	return c->ssl ? lg_tls_flush(c) : lg_flush(c);
}

/*
 * Read into c->in: bytes read, 0 at the end of the stream, -EAGAIN when
 * nothing is there yet, -EINTR, or -errno / -EPROTO (reason in c->err).
 */
static ssize_t
lg_recv(struct lg_conn *c, size_t room)
{
	if (!c->ssl) {
		ssize_t n = recv(c->fd, c->in + c->in_len, room, MSG_DONTWAIT);
		if (n >= 0)
			return n;
		return errno == EWOULDBLOCK ? -EAGAIN : -errno;
	}
	ERR_clear_error();
	int n = SSL_read(c->ssl, c->in + c->in_len, (int)room);
	if (n > 0)
		return n;
	int e = SSL_get_error(c->ssl, n);
	switch (e) {
	case SSL_ERROR_WANT_READ:
	case SSL_ERROR_WANT_WRITE:
		return -EAGAIN; /* the edge that unblocks it comes by epoll */
	case SSL_ERROR_ZERO_RETURN:
		return 0;
	default:
		lg_tls_reason(c, "read", e);
		return -EPROTO;
	}
}

/* A slot's session, kept the first time the server gives a resumable one
 * (only installed with --tls-resume). Returns 1: the reference is ours. */
static int
lg_new_session(SSL *ssl, SSL_SESSION *sess)
{
	struct lg_conn *c = SSL_get_app_data(ssl);

	if (!c || c->sess || !SSL_SESSION_is_resumable(sess))
		return 0;
	c->sess = sess;
	return 1;
}

/* ---- connections ----------------------------------------------------- */

static void lg_conn_open(struct lg_run *r, struct lg_conn *c);

/* Whether a slot whose connection ended should connect again. */
static bool
lg_more(const struct lg_run *r, const struct lg_conn *c)
{
	if (r->fatal || c->fails >= LG_MAX_CONN_FAILS)
		return false;
	if (r->o.handshakes)
		return c->hs_left > 0;
	if (r->o.hold_s)
		return !r->hold_over;
	return r->to_start > 0;
}

static void
lg_conn_close(struct lg_run *r, struct lg_conn *c, bool reconnect)
{
	if (c->ssl) {
		/* close_notify, best effort (one nonblocking write), so the
		 * server sees an orderly end rather than a truncation */
		if (c->state == LG_CS_OPEN && !c->tls_broken)
			SSL_shutdown(c->ssl);
		ERR_clear_error();
		SSL_free(c->ssl); /* the socket BIO leaves the fd open */
		c->ssl = NULL;
	}
	c->tls_broken = false;
	c->tx_len = 0;
	c->tx_eod = false;
	if (c->holding) {
		c->holding = false;
		r->holding--;
	}
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
	if (reconnect && lg_more(r, c)) {
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
	if (c->state == LG_CS_HANDSHAKE)
		r->hs_failed++;
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

static void
lg_hold_check(struct lg_run *r)
{
	if (r->holding > r->held_max)
		r->held_max = r->holding;
	if (r->hold_announced || r->holding == 0 || r->holding < r->active)
		return;
	r->hold_announced = true;
	r->hold_until = lg_now_ns() + (uint64_t)r->o.hold_s * 1000000000u;
	fprintf(stderr, "fd-loadgen: holding %u idle sessions\n", r->holding);
	fflush(stderr);
}

/* What a connection does when it is idle between messages. */
static int
lg_next(struct lg_run *r, struct lg_conn *c)
{
	if (r->o.hold_s && !r->hold_over && !r->fatal) {
		c->holding = true;
		r->holding++;
		lg_hold_check(r);
		return 0;
	}
	if (!r->o.handshakes && !r->o.hold_s && r->to_start > 0 && !r->fatal &&
	    (r->o.per_session == 0 || c->session_msgs < r->o.per_session))
		return lg_start_message(r, c);
	lg_expect(c, LG_TAG_QUIT);
	return lg_cmd(c, "QUIT\r\n");
}

/* The 220 to STARTTLS: the TLS layer takes over the socket. */
static int
lg_tls_start(struct lg_run *r, struct lg_conn *c)
{
	c->ssl = SSL_new(r->ssl_ctx);
	if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) {
		ERR_clear_error();
		c->tls_broken = true; /* nothing to shut down */
		return -ENOMEM;
	}
	SSL_set_app_data(c->ssl, c);
	/*
	 * A copy is offered, never the kept session itself: OpenSSL's TLS 1.3
	 * client marks a session it resumed as no longer resumable (tickets are
	 * single use, RFC 8446 C.4), which would make every handshake after a
	 * slot's first resumption a full one. The server's work is the same
	 * either way: one ticket to decrypt and one to issue per resumption.
	 */
	if (c->sess) {
		SSL_SESSION *copy = SSL_SESSION_dup(c->sess);
		if (copy) {
			SSL_set_session(c->ssl, copy); /* takes a reference */
			SSL_SESSION_free(copy);
		}
	}
	SSL_set_connect_state(c->ssl);
	c->state = LG_CS_HANDSHAKE;
	c->t_starttls = c->t_rx;
	c->deadline = c->t_rx + (uint64_t)r->o.timeout_s * 1000000000u;
	return 0;
}

static void
lg_tls_note_peer(struct lg_run *r, struct lg_conn *c)
{
	const SSL_CIPHER *ci = SSL_get_current_cipher(c->ssl);
	X509 *x = SSL_get0_peer_certificate(c->ssl);
	EVP_PKEY *k = x ? X509_get0_pubkey(x) : NULL;

	r->tls_version = SSL_get_version(c->ssl);
	r->tls_cipher = ci ? SSL_CIPHER_get_name(ci) : "?";
	if (k) {
		int id = EVP_PKEY_get_base_id(k);
		const char *kind = id == EVP_PKEY_EC    ? "EC"
		                   : id == EVP_PKEY_RSA ? "RSA"
		                                        : OBJ_nid2sn(id);
		snprintf(r->peer_key, sizeof(r->peer_key), "%s-%d", kind,
		         EVP_PKEY_get_bits(k));
	}
}

/*
 * Drive the client handshake. Returns 1 when it is done (EHLO, or QUIT with
 * --handshakes, queued), 0 while it waits for the socket, -1 when the
 * connection was closed.
 */
static int
lg_tls_handshake(struct lg_run *r, struct lg_conn *c)
{
	ERR_clear_error();
	int h = SSL_do_handshake(c->ssl);
	if (h != 1) {
		int e = SSL_get_error(c->ssl, h);
		if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
			return 0;
		lg_conn_fail(r, c, lg_tls_reason(c, "handshake", e), 0);
		return -1;
	}
	uint64_t t = lg_now_ns();
	c->state = LG_CS_OPEN;
	r->hs_done++;
	if (SSL_session_reused(c->ssl) == 1)
		r->hs_resumed++;
	else
		r->hs_full++;
	if (!r->tls_version)
		lg_tls_note_peer(r, c);
	c->fails = 0;
	c->deadline = t + (uint64_t)r->o.timeout_s * 1000000000u;
	/* RFC 3207 4.2: what the server said before TLS is forgotten */
	c->ext_pipelining = c->ext_chunking = c->ext_starttls = false;
	int rc;
	if (r->o.handshakes) {
		if (r->lat_n < r->lat_cap)
			r->lat_ns[r->lat_n++] = t - c->t_starttls;
		c->hs_left--;
		lg_expect(c, LG_TAG_QUIT);
		rc = lg_cmd(c, "QUIT\r\n");
	} else {
		lg_expect(c, LG_TAG_EHLO);
		rc = lg_cmd(c, "EHLO %s\r\n", r->o.ehlo);
	}
	if (rc < 0) {
		lg_conn_fail(r, c, "internal: output queue full", 0);
		return -1;
	}
	return 1;
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
		if (r->o.starttls && !c->ssl) {
			if (c->ext_starttls) {
				lg_expect(c, LG_TAG_STARTTLS);
				rc = lg_cmd(c, "STARTTLS\r\n");
				break;
			}
			if (!r->fatal)
				fprintf(stderr, "fd-loadgen: the server does "
				                "not advertise STARTTLS\n");
			r->fatal = true;
			rc = lg_next(r, c);
			break;
		}
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
	case LG_TAG_STARTTLS:
		if (code != 220) {
			r->hs_failed++;
			goto out_bad;
		}
		if (lg_tls_start(r, c) < 0) {
			r->fatal = true;
			lg_conn_fail(r, c, "SSL_new failed", ENOMEM);
			return -1;
		}
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
	if (k == 8 && strncasecmp(p, "STARTTLS", 8) == 0)
		c->ext_starttls = true;
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
		if (c->state == LG_CS_HANDSHAKE) {
			/* octets after the 220 came in the clear and must not
			 * be taken as if from inside TLS (command injection) */
			if (pos != c->in_len) {
				lg_conn_fail(r, c,
				             "octets after the 220 to "
				             "STARTTLS",
				             0);
				return -1;
			}
			c->in_len = 0;
			return 0;
		}
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
		c->ext_pipelining = c->ext_chunking = c->ext_starttls = false;
		lg_expect(c, LG_TAG_GREETING);
	}
	/*
	 * Edge-triggered: each side must be worked until the kernel says
	 * "no more". A recv that returned less than it asked for has emptied
	 * the socket (new data raises a new edge), and lg_flush() stops only
	 * when the queue is empty or the socket is full: so per reply this is
	 * one send and one recv, not a third call that returns EAGAIN. Inside
	 * TLS a read returns one record at most, so reads go on until OpenSSL
	 * wants the socket (its read-ahead has taken all the kernel had).
	 * The handshake is driven here too: after the 220 to STARTTLS at once
	 * (the socket is writable and no new edge would come), then on edges.
	 */
	bool drained = false;
	for (;;) {
		if (c->state == LG_CS_HANDSHAKE &&
		    (lg_tls_handshake(r, c) <= 0 || gen != c->gen))
			return;
		ssize_t w = lg_send(c);
		if (w == -EPROTO) {
			lg_conn_fail(r, c, c->err, 0);
			return;
		}
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
		ssize_t n = lg_recv(c, room);
		if (n > 0) {
			c->t_rx = lg_now_ns();
			c->deadline = c->t_rx +
			              (uint64_t)r->o.timeout_s * 1000000000u;
			c->in_len += (size_t)n;
			drained = !c->ssl && (size_t)n < room;
			if (lg_parse(r, c) < 0 || gen != c->gen)
				return;
			continue; /* replies may have queued commands */
		}
		if (n == 0) {
			lg_conn_fail(r, c, "server closed the connection", 0);
			return;
		}
		if (n == -EINTR)
			continue;
		if (n == -EPROTO)
			lg_conn_fail(r, c, c->err, 0);
		else if (n != -EAGAIN)
			lg_conn_fail(r, c, "recv", (int)-n);
		return; /* output was flushed at the top of this pass */
	}
}

/* --hold is over: every idle session QUITs (and nothing reconnects). */
static void
lg_hold_end(struct lg_run *r)
{
	r->hold_over = true;
	for (unsigned i = 0; i < r->nconns; i++) {
		struct lg_conn *c = &r->conns[i];
		if (!c->holding)
			continue;
		c->holding = false;
		r->holding--;
		lg_expect(c, LG_TAG_QUIT);
		if (lg_cmd(c, "QUIT\r\n") < 0) {
			lg_conn_fail(r, c, "internal: output queue full", 0);
			continue;
		}
		lg_pump(r, c); /* no edge would come: the socket is idle */
	}
}

/* ---- options, address policy, report --------------------------------- */

static void
lg_on_stop(int sig)
{
	(void)sig;
	lg_stop = 1;
}

/*
 * The client context: no verification (a self-signed bench certificate is
 * the normal case here), read-ahead so a record comes in one recv rather
 * than header and body apart, an unexpected EOF reported as the end of the
 * stream (the server's close after 221 may race our close_notify), and
 * with --tls-resume the client cache's callback without its internal store
 * (each slot keeps its own session).
 */
static int
lg_tls_ctx(struct lg_run *r)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());

	if (!ctx)
		goto out_err;
	SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
	SSL_CTX_set_read_ahead(ctx, 1);
	SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
	if (r->o.tls_version &&
	    (SSL_CTX_set_min_proto_version(ctx, r->o.tls_version) != 1 ||
	     SSL_CTX_set_max_proto_version(ctx, r->o.tls_version) != 1))
		goto out_free_ctx;
	if (r->o.tls_resume) {
		SSL_CTX_set_session_cache_mode(
		        ctx, SSL_SESS_CACHE_CLIENT |
		                     SSL_SESS_CACHE_NO_INTERNAL_STORE);
		SSL_CTX_sess_set_new_cb(ctx, lg_new_session);
	} else {
		SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
	}
	r->ssl_ctx = ctx;
	return 0;
out_free_ctx:
	SSL_CTX_free(ctx);
out_err:;
	char why[120];
	ERR_error_string_n(ERR_get_error(), why, sizeof(why));
	fprintf(stderr, "fd-loadgen: TLS client context: %s\n", why);
	return -1;
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
	        "  --starttls           STARTTLS (RFC 3207) and EHLO again "
	        "before the messages\n"
	        "  --tls-resume         offer each slot's first session on "
	        "reconnections\n"
	        "  --tls-version V      1.2 or 1.3 only (default: "
	        "whatever is negotiated)\n"
	        "  --handshakes N       no messages: per connection slot N "
	        "times connect,\n"
	        "                       EHLO, STARTTLS, handshake, QUIT "
	        "(implies --starttls)\n"
	        "  --hold SEC           no messages: open the sessions, "
	        "hold them idle for SEC\n"
	        "                       seconds (or until SIGTERM), then "
	        "QUIT\n"
	        "  --json               one flat JSON object on stdout\n"
	        "  --allow-failures     exit 0 even if some message was not "
	        "accepted\n"
	        "  --allow-nonlocal     permit a server outside loopback (a "
	        "test namespace,\n"
	        "                       or a lab host of your own)\n"
	        "  --help               this text\n"
	        "\n"
	        "Exit: 0 all accepted (or all handshakes done, all sessions "
	        "held), 1 not,\nor a missing extension, 2 usage.\n");
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
	/* --handshakes: the latencies are the handshakes', not final dots' */
	bool hs = r->o.handshakes > 0;
	double hs_rate = wall_s > 0 ? (double)r->hs_done / wall_s : 0;
	double hs_cpu = r->hs_done ? (cu + cs) * 1e6 / (double)r->hs_done : 0;

	if (hs || r->o.hold_s) {
		rate = cpu_per = 0;
		not_sent = 0;
		mode = hs ? "handshakes" : "hold";
	}
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
		       "\"cpu_us_per_msg\":%.1f",
		       r->o.server, r->o.connections,
		       hs || r->o.hold_s ? 0 : r->o.messages, r->o.per_session,
		       msize, mode, r->o.pipelining ? "true" : "false",
		       r->started, r->accepted, r->tempfail, r->rejected,
		       r->errors, not_sent, wall_s, rate, hs ? 0 : p50,
		       hs ? 0 : p90, hs ? 0 : p99, hs ? 0 : mx, hs ? 0 : mean,
		       cu, cs, cpu_per);
		if (r->o.starttls)
			printf(",\"tls_version\":\"%s\",\"tls_cipher\":\"%s\","
			       "\"peer_key\":\"%s\",\"tls_resume\":%s,"
			       "\"handshakes\":%" PRIu64 ",\"hs_full\":%" PRIu64
			       ",\"hs_resumed\":%" PRIu64
			       ",\"hs_failed\":%" PRIu64,
			       r->tls_version ? r->tls_version : "-",
			       r->tls_cipher ? r->tls_cipher : "-",
			       r->peer_key[0] ? r->peer_key : "-",
			       r->o.tls_resume ? "true" : "false", r->hs_done,
			       r->hs_full, r->hs_resumed, r->hs_failed);
		if (hs)
			printf(",\"hs_per_s\":%.1f,\"hs_p50_us\":%.1f,"
			       "\"hs_p99_us\":%.1f,\"cpu_us_per_hs\":%.1f",
			       hs_rate, p50, p99, hs_cpu);
		if (r->o.hold_s)
			printf(",\"held\":%u", r->held_max);
		printf("}\n");
		return;
	}
	printf("fd-loadgen: server=%s connections=%u messages=%u size=%zu "
	       "mode=%s pipelining=%s per_session=%u\n",
	       r->o.server, r->o.connections,
	       hs || r->o.hold_s ? 0 : r->o.messages, msize, mode,
	       r->o.pipelining ? "yes" : "no", r->o.per_session);
	if (r->o.starttls)
		printf("  TLS %s %s, server key %s%s: handshakes %" PRIu64
		       " (full %" PRIu64 ", resumed %" PRIu64
		       ", failed %" PRIu64 ")\n",
		       r->tls_version ? r->tls_version : "-",
		       r->tls_cipher ? r->tls_cipher : "-",
		       r->peer_key[0] ? r->peer_key : "-",
		       r->o.tls_resume ? ", resumption offered" : "",
		       r->hs_done, r->hs_full, r->hs_resumed, r->hs_failed);
	if (hs) {
		printf("  wall %.3f s  %.1f handshakes/s\n", wall_s, hs_rate);
		printf("  220-to-STARTTLS-to-handshake-done us: p50 %.1f  "
		       "p90 %.1f  p99 %.1f  max %.1f  mean %.1f\n",
		       p50, p90, p99, mx, mean);
		printf("  loadgen cpu: user %.3f s  sys %.3f s  %.1f "
		       "us/handshake\n",
		       cu, cs, hs_cpu);
		return;
	}
	if (r->o.hold_s) {
		printf("  held %u sessions at most, wall %.3f s\n", r->held_max,
		       wall_s);
		return;
	}
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
	        {"starttls", no_argument, NULL, 'L'},
	        {"tls-resume", no_argument, NULL, 'R'},
	        {"tls-version", required_argument, NULL, 'V'},
	        {"handshakes", required_argument, NULL, 'H'},
	        {"hold", required_argument, NULL, 'O'},
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
		case 'L':
			o->starttls = true;
			break;
		case 'R':
			o->tls_resume = true;
			break;
		case 'V':
			if (strcmp(optarg, "1.2") == 0)
				o->tls_version = TLS1_2_VERSION;
			else if (strcmp(optarg, "1.3") == 0)
				o->tls_version = TLS1_3_VERSION;
			else
				goto out_bad;
			break;
		case 'H':
			if (lg_parse_uint(optarg, 10000000, &v) || v == 0)
				goto out_bad;
			o->handshakes = (unsigned)v;
			break;
		case 'O':
			if (lg_parse_uint(optarg, 86400, &v) || v == 0)
				goto out_bad;
			o->hold_s = (unsigned)v;
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
	if (o->handshakes && o->hold_s) {
		fprintf(stderr, "fd-loadgen: --handshakes and --hold do not "
		                "go together\n");
		return -1;
	}
	if (o->handshakes)
		o->starttls = true;
	if ((o->tls_resume || o->tls_version) && !o->starttls) {
		fprintf(stderr, "fd-loadgen: --tls-resume and --tls-version "
		                "need --starttls\n");
		return -1;
	}
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
	bool no_msgs = r.o.handshakes || r.o.hold_s;
	if (r.o.hold_s) {
		/* no SA_RESTART: epoll_wait returns and the loop sees it */
		struct sigaction sa = {.sa_handler = lg_on_stop};
		sigaction(SIGTERM, &sa, NULL);
		sigaction(SIGINT, &sa, NULL);
	}

	r.nconns = no_msgs || r.o.connections < r.o.messages ? r.o.connections
	                                                     : r.o.messages;
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
	r.lat_cap = r.o.handshakes ? (size_t)r.nconns * r.o.handshakes
	                           : r.o.messages;
	r.conns = calloc(r.nconns, sizeof(*r.conns));
	r.lat_ns = calloc(r.lat_cap, sizeof(*r.lat_ns));
	if (!r.conns || !r.lat_ns)
		goto out_oom;
	if (r.o.starttls && lg_tls_ctx(&r) < 0)
		goto out_free;
	for (unsigned i = 0; i < r.nconns; i++) {
		r.conns[i].fd = -1;
		r.conns[i].hs_left = r.o.handshakes;
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

	r.to_start = no_msgs ? 0 : r.o.messages;
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
		if (r.o.hold_s && !r.hold_over &&
		    (lg_stop || (r.hold_announced && t >= r.hold_until)))
			lg_hold_end(&r);
		if (t < next_check)
			continue;
		next_check = t + 100000000u;
		for (unsigned i = 0; i < r.nconns; i++) {
			struct lg_conn *c = &r.conns[i];
			if (c->state != LG_CS_DONE && !c->holding &&
			    t > c->deadline)
				lg_conn_fail(&r, c, "timeout", 0);
		}
	}
	double wall_s = (double)(lg_now_ns() - t0) / 1e9;
	lg_report(&r, wall_s);
	bool all;
	if (r.o.handshakes)
		all = r.hs_done == (uint64_t)r.nconns * r.o.handshakes;
	else if (r.o.hold_s)
		all = r.held_max == r.nconns;
	else
		all = r.accepted == r.o.messages;
	if (r.fatal)
		rc = 1;
	else if (all || r.o.allow_failures)
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
		SSL_free(r.conns[i].ssl);
		SSL_SESSION_free(r.conns[i].sess);
		if (r.conns[i].fd >= 0)
			close(r.conns[i].fd);
		free(r.conns[i].head);
	}
	SSL_CTX_free(r.ssl_ctx);
	free(r.conns);
	free(r.lat_ns);
	lg_msg_free(&r.msg);
	return rc;
}
