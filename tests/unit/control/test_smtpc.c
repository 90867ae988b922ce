/*
 * The SMTP/LMTP delivery client against a scripted fake server: a thread on
 * a 127.0.0.1 ephemeral port (or a unix socket in a temp dir) that reads
 * what the client sends, checks each command against its script, records
 * the command lines and the raw DATA/BDAT bytes, and answers per script.
 * For smtpc_send_many()'s limits, a second peer that answers only when
 * the client falls silent. Plus the reply parser on byte strings, and one
 * delivery to Postfix's smtp-sink when it is installed.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "smtpc.h"

extern char **environ;

TestSuite(smtpc, .timeout = 60);

/* ---- the fake server ----------------------------------------------------- */

#define MAX_STEPS 64
#define MAX_LINES 128
#define MAX_BODIES 8

struct step {
	/* NULL: send reply at once (the greeting). Otherwise the prefix the
	 * next command line must have, or: "." read DATA content up to the
	 * final dot; "<cut:N>" read N octets of DATA content and close;
	 * "<hang>" read to EOF, answer nothing; "<close>" close */
	const char *expect;
	const char *reply; /* NULL: answer later (pipelining) */
};

struct srv {
	int lfd;
	char dir[64], path[108]; /* unix socket */
	uint16_t port;
	const struct step *steps;
	pthread_t th;
	int fd;
	uint8_t *buf; /* received, not yet consumed: buf[pos..len) */
	size_t pos, len, cap;
	char lines[MAX_LINES][1100];
	unsigned n_lines;
	unsigned ahead[MAX_STEPS]; /* lines already buffered after step i's */
	uint8_t *body[MAX_BODIES];
	size_t body_len[MAX_BODIES];
	unsigned n_bodies;
	bool in_bdat;
	char err[512];
};

static void
srv_fail(struct srv *s, const char *fmt, const char *a, unsigned i)
{
	if (!s->err[0])
		snprintf(s->err, sizeof(s->err), fmt, a, i);
}

static bool
srv_fill(struct srv *s)
{
	if (s->pos == s->len)
		s->pos = s->len = 0;
	if (s->cap - s->len < 65536) {
		s->cap = s->cap * 2 + 65536;
		s->buf = realloc(s->buf, s->cap);
	}
	ssize_t k = recv(s->fd, s->buf + s->len, s->cap - s->len, 0);
	if (k <= 0)
		return false;
	s->len += (size_t)k;
	return true;
}

static bool
srv_line(struct srv *s, char *out, size_t outsz)
{
	for (;;) {
		uint8_t *nl = s->len > s->pos
				      ? memchr(s->buf + s->pos, '\n',
					       s->len - s->pos)
				      : NULL;
		if (nl) {
			size_t n = (size_t)(nl - (s->buf + s->pos)) + 1;
			size_t k = n < outsz ? n : outsz - 1;
			memcpy(out, s->buf + s->pos, k);
			out[k] = '\0';
			s->pos += n;
			return true;
		}
		if (!srv_fill(s))
			return false;
	}
}

static bool
srv_bytes(struct srv *s, size_t n, uint8_t **dst, size_t *dlen)
{
	while (s->len - s->pos < n)
		if (!srv_fill(s))
			return false;
	*dst = realloc(*dst, *dlen + n + 1);
	memcpy(*dst + *dlen, s->buf + s->pos, n);
	*dlen += n;
	s->pos += n;
	return true;
}

/* DATA content as sent (still dot-stuffed), up to the final "." line. */
static bool
srv_data(struct srv *s, uint8_t **dst, size_t *dlen)
{
	size_t scan = 0; /* from s->pos */

	for (;;) {
		size_t have = s->len - s->pos;
		const uint8_t *b = s->buf + s->pos;
		if (have >= 3 && memcmp(b, ".\r\n", 3) == 0)
			return srv_bytes(s, 0, dst, dlen) &&
			       (s->pos += 3, true);
		for (; scan + 5 <= have; scan++) {
			if (memcmp(b + scan, "\r\n.\r\n", 5) == 0) {
				bool ok = srv_bytes(s, scan + 2, dst, dlen);
				s->pos += 3;
				return ok;
			}
		}
		if (!srv_fill(s))
			return false;
	}
}

static unsigned
count_lines(const struct srv *s)
{
	unsigned n = 0;
	for (size_t i = s->pos; i < s->len; i++)
		n += s->buf[i] == '\n';
	return n;
}

static void
srv_send(struct srv *s, const char *r)
{
	if (r && send(s->fd, r, strlen(r), MSG_NOSIGNAL) < 0)
		srv_fail(s, "send failed%s at %u", "", 0);
}

static void *
srv_main(void *arg)
{
	struct srv *s = arg;
	struct pollfd pfd = { .fd = s->lfd, .events = POLLIN };
	struct timeval tv = { .tv_sec = 10 };
	char line[1100];
	unsigned i;

	if (poll(&pfd, 1, 10000) != 1) {
		srv_fail(s, "no client%s %u", "", 0);
		return NULL;
	}
	s->fd = accept(s->lfd, NULL, NULL);
	if (s->fd < 0) {
		srv_fail(s, "accept%s %u", "", 0);
		return NULL;
	}
	setsockopt(s->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	for (i = 0; s->steps[i].expect || s->steps[i].reply; i++) {
		const struct step *st = &s->steps[i];
		if (!st->expect) {
			srv_send(s, st->reply);
			continue;
		}
		if (!strcmp(st->expect, "<close>"))
			goto out_close;
		if (!strcmp(st->expect, "<hang>")) {
			while (srv_fill(s))
				s->pos = s->len;
			goto out_close;
		}
		if (!strncmp(st->expect, "<cut:", 5)) {
			unsigned b = s->n_bodies++;
			srv_bytes(s, strtoul(st->expect + 5, NULL, 10),
				  &s->body[b], &s->body_len[b]);
			goto out_close;
		}
		if (!strcmp(st->expect, ".")) {
			unsigned b = s->n_bodies++;
			if (!srv_data(s, &s->body[b], &s->body_len[b])) {
				srv_fail(s, "%sEOF in DATA at step %u", "", i);
				goto out_close;
			}
		} else {
			if (!srv_line(s, line, sizeof(line))) {
				srv_fail(s, "%sEOF before step %u", "", i);
				goto out_close;
			}
			if (s->n_lines < MAX_LINES)
				strcpy(s->lines[s->n_lines++], line);
			if (strncmp(line, st->expect, strlen(st->expect))) {
				srv_fail(s, "unexpected \"%.400s\" at step %u",
					 line, i);
				srv_send(s, "500 unexpected\r\n");
				continue;
			}
			if (!strncmp(line, "BDAT ", 5)) {
				unsigned b = s->n_bodies;
				size_t n = strtoull(line + 5, NULL, 10);
				if (!srv_bytes(s, n, &s->body[b],
					       &s->body_len[b]))
					srv_fail(s, "%sEOF in BDAT %u", "", i);
				if (strstr(line, "LAST"))
					s->n_bodies++;
			}
		}
		s->ahead[i] = count_lines(s);
		srv_send(s, st->reply);
	}
	/* what else the client says, until it closes */
	while (srv_line(s, line, sizeof(line)))
		if (s->n_lines < MAX_LINES)
			strcpy(s->lines[s->n_lines++], line);
out_close:
	close(s->fd);
	return NULL;
}

static struct srv *
srv_start(const struct step *steps, bool unix_sock)
{
	struct srv *s = calloc(1, sizeof(*s));

	s->steps = steps;
	if (unix_sock) {
		struct sockaddr_un sun = { .sun_family = AF_UNIX };
		strcpy(s->dir, "/tmp/smtpc.XXXXXX");
		cr_assert_not_null(mkdtemp(s->dir));
		snprintf(s->path, sizeof(s->path), "%s/lmtp", s->dir);
		strcpy(sun.sun_path, s->path);
		s->lfd = socket(AF_UNIX, SOCK_STREAM, 0);
		cr_assert_eq(bind(s->lfd, (struct sockaddr *)&sun,
				  sizeof(sun)), 0);
	} else {
		struct sockaddr_in sin = { .sin_family = AF_INET };
		socklen_t sl = sizeof(sin);
		sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		s->lfd = socket(AF_INET, SOCK_STREAM, 0);
		cr_assert_eq(bind(s->lfd, (struct sockaddr *)&sin,
				  sizeof(sin)), 0);
		getsockname(s->lfd, (struct sockaddr *)&sin, &sl);
		s->port = ntohs(sin.sin_port);
	}
	cr_assert_eq(listen(s->lfd, 4), 0);
	cr_assert_eq(pthread_create(&s->th, NULL, srv_main, s), 0);
	return s;
}

/* Waits for the server to finish; asserts it saw what its script said. */
static void
srv_end(struct srv *s)
{
	pthread_join(s->th, NULL);
	close(s->lfd);
	if (s->path[0]) {
		unlink(s->path);
		rmdir(s->dir);
	}
	cr_assert_str_empty(s->err, "server: %s", s->err);
}

static void
srv_free(struct srv *s)
{
	for (unsigned i = 0; i < MAX_BODIES; i++)
		free(s->body[i]);
	free(s->buf);
	free(s);
}

static void
target_of(const struct srv *s, enum smtpc_proto proto, struct smtpc_target *t)
{
	memset(t, 0, sizeof(*t));
	t->proto = proto;
	if (s->path[0]) {
		strcpy(t->unix_path, s->path);
	} else {
		strcpy(t->host, "127.0.0.1");
		t->port = s->port;
	}
}

static struct smtpc_params
params(uint64_t cmd_ms, uint64_t data_ms)
{
	struct smtpc_params p;
	smtpc_params_defaults(&p);
	p.helo_name = "client.test";
	p.connect_timeout_ms = 2000;
	p.cmd_timeout_ms = cmd_ms;
	p.data_timeout_ms = data_ms;
	return p;
}

static struct smtpc *
open_to(struct srv *s, enum smtpc_proto proto)
{
	struct smtpc_target t;
	struct smtpc_params p = params(5000, 5000);
	struct smtpc_reply why;
	int err = 0;

	target_of(s, proto, &t);
	struct smtpc *c = smtpc_connect(&t, &p, &why, &err);
	cr_assert_not_null(c, "connect: %d %s", err, why.text);
	return c;
}

static uint64_t
ms_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* ---- bodies -------------------------------------------------------------- */

struct mem_body {
	const uint8_t *p;
	size_t n;
	size_t piece; /* most octets per call; 0 = as asked */
	long fail;    /* returned at fail_at when non-zero */
	size_t fail_at;
};

static long
mem_read(void *ctx, uint64_t off, void *buf, size_t n)
{
	struct mem_body *b = ctx;
	if (b->fail && off >= b->fail_at)
		return b->fail;
	if (off >= b->n)
		return 0;
	if (n > b->n - off)
		n = b->n - off;
	if (b->piece && n > b->piece)
		n = b->piece;
	if (b->fail && off + n > b->fail_at)
		n = b->fail_at - off;
	memcpy(buf, b->p + off, n);
	return (long)n;
}

/* Lines of more than 998 octets folded: CRLF SP after 998, moved back to
 * the start of a UTF-8 character (at most 3 octets). */
static size_t
ref_fold(const uint8_t *t, size_t m, uint8_t *out)
{
	size_t k = 0, len = 0;

	for (size_t i = 0; i < m; i++) {
		if (t[i] != '\r' && t[i] != '\n' && len == 998) {
			size_t back = 0;
			while (back < 3 && back < len &&
			       (t[i - back] & 0xc0) == 0x80)
				back++;
			if ((t[i - back] & 0xc0) == 0x80)
				back = 0;
			k -= back;
			i -= back;
			memcpy(out + k, "\r\n ", 3);
			k += 3;
			len = 1;
		}
		out[k++] = t[i];
		len = t[i] == '\n' ? 0 : t[i] == '\r' ? len : len + 1;
	}
	return k;
}

/* The body as DATA done the obvious way, in passes: the reference the
 * streaming code must match. First every line end CRLF (CRLF, a bare CR, a
 * bare LF: RFC 5321 2.3.8), then '.' at a line's start doubled (4.5.2),
 * and CRLF added to a non-empty body that does not end with one; then
 * lines over 998 octets folded (4.5.3.1.6). */
static size_t
ref_stuff(const uint8_t *p, size_t n, uint8_t *out)
{
	uint8_t *t = malloc(2 * n + 1), *u = malloc(2 * n + 3);
	size_t k = 0, m = 0;

	cr_assert_not_null(t);
	for (size_t i = 0; i < n; i++) {
		if (p[i] == '\r' || p[i] == '\n') {
			t[m++] = '\r';
			t[m++] = '\n';
			if (p[i] == '\r' && i + 1 < n && p[i + 1] == '\n')
				i++;
		} else {
			t[m++] = p[i];
		}
	}
	cr_assert_not_null(u);
	for (size_t i = 0; i < m; i++) {
		if (t[i] == '.' && (i == 0 || t[i - 1] == '\n'))
			u[k++] = '.';
		u[k++] = t[i];
	}
	if (m && t[m - 1] != '\n') {
		u[k++] = '\r';
		u[k++] = '\n';
	}
	k = ref_fold(u, k, out);
	free(t);
	free(u);
	return k;
}

/* The longest line of p, its CRLF included. */
static size_t
longest_line(const uint8_t *p, size_t n)
{
	size_t max = 0, len = 0;

	for (size_t i = 0; i < n; i++) {
		len++;
		if (p[i] == '\n') {
			max = len > max ? len : max;
			len = 0;
		}
	}
	return len > max ? len : max;
}

/* The receiver's side (RFC 5321 4.5.2): drop the first '.' of each line. */
static size_t
unstuff(const uint8_t *p, size_t n, uint8_t *out)
{
	size_t k = 0;
	for (size_t i = 0; i < n; i++) {
		if (p[i] == '.' && (i == 0 || (i >= 2 && p[i - 2] == '\r' &&
						p[i - 1] == '\n')))
			continue;
		out[k++] = p[i];
	}
	return k;
}

static struct smtpc_msg
msg1(const char *from, const char *const *rcpts, unsigned n,
     struct mem_body *b)
{
	struct smtpc_msg m = {
		.mail_from = from,
		.rcpts = rcpts,
		.n_rcpts = n,
		.size = b->n,
		.body = mem_read,
		.body_ctx = b,
	};
	return m;
}

#define GREET { NULL, "220 mx.test ESMTP fake\r\n" }
#define EHLO_PLAIN { "EHLO client.test", "250 mx.test\r\n" }
#define QUIT { "QUIT", "221 2.0.0 bye\r\n" }
#define END { NULL, NULL }

static const char *const R1[] = { "r@y.test" };
static const char *const R3[] = { "a@y.test", "b@y.test", "c@y.test" };

/* ---- the reply parser ---------------------------------------------------- */

static enum smtpc_parse
parse(const char *s, struct smtpc_reply *r, size_t *used)
{
	return smtpc_parse_reply((const uint8_t *)s, strlen(s), r, used);
}

Test(smtpc, parse_single_line)
{
	struct smtpc_reply r;
	size_t used = 99;

	cr_assert_eq(parse("250 2.1.0 Ok\r\n354 next", &r, &used),
		     SMTPC_PARSE_OK);
	cr_assert_eq(used, 14);
	cr_assert_eq(r.code, 250);
	cr_assert_str_eq(r.enh, "2.1.0");
	cr_assert_str_eq(r.text, "250 2.1.0 Ok");
	cr_assert_not(r.local);
	cr_assert_eq(parse("221\r\n", &r, &used), SMTPC_PARSE_OK);
	cr_assert_str_eq(r.text, "221");
	cr_assert_eq(parse("250 bare lf\n", &r, &used), SMTPC_PARSE_OK);
	cr_assert_eq(used, 12);
	cr_assert_str_eq(r.text, "250 bare lf");
}

Test(smtpc, parse_multiline_joined_enh_once)
{
	struct smtpc_reply r;
	size_t used;
	const char *g = "550-5.1.1 The email account does not exist.\r\n"
			"550-5.1.1 Please check\r\n"
			"550 5.1.1 the address. x - gsmtp\r\n";

	cr_assert_eq(parse(g, &r, &used), SMTPC_PARSE_OK);
	cr_assert_eq(used, strlen(g));
	cr_assert_eq(r.code, 550);
	cr_assert_str_eq(r.enh, "5.1.1");
	cr_assert_str_eq(r.text, "550 5.1.1 The email account does not "
				 "exist. Please check the address. x - gsmtp");
	cr_assert_eq(parse("250-mx\r\n250-\r\n250 SIZE 1\r\n", &r, &used),
		     SMTPC_PARSE_OK);
	cr_assert_str_eq(r.text, "250 mx SIZE 1");
	cr_assert_str_eq(r.enh, "");
}

Test(smtpc, parse_enhanced_code_forms)
{
	struct smtpc_reply r;
	size_t used;

	cr_assert_eq(parse("452 4.5.3 too many\r\n", &r, &used),
		     SMTPC_PARSE_OK);
	cr_assert_str_eq(r.enh, "4.5.3");
	cr_assert_eq(parse("250 2.0.0\r\n", &r, &used), SMTPC_PARSE_OK);
	cr_assert_str_eq(r.enh, "2.0.0");
	cr_assert_eq(parse("550 4.1.1 class differs\r\n", &r, &used),
		     SMTPC_PARSE_OK);
	cr_assert_str_eq(r.enh, "");
	cr_assert_eq(parse("550 5.1 short\r\n", &r, &used), SMTPC_PARSE_OK);
	cr_assert_str_eq(r.enh, "");
	cr_assert_eq(parse("550 5.1.1234 long\r\n", &r, &used),
		     SMTPC_PARSE_OK);
	cr_assert_str_eq(r.enh, "");
	cr_assert_eq(parse("550 5.1.1x\r\n", &r, &used), SMTPC_PARSE_OK);
	cr_assert_str_eq(r.enh, "");
	cr_assert_eq(parse("354 3.0.0 no class 3\r\n", &r, &used),
		     SMTPC_PARSE_OK);
	cr_assert_str_eq(r.enh, "");
}

/* A complete reply split anywhere: every strict prefix is AGAIN, and the
 * bytes after the reply are not consumed. */
Test(smtpc, parse_again_at_every_split)
{
	const char *g = "250-mx.test Hello\r\n250-PIPELINING\r\n"
			"250-SIZE 1000\r\n250 CHUNKING\r\n";
	char buf[256];
	struct smtpc_reply r;
	size_t used, n = strlen(g);

	for (size_t k = 0; k < n; k++) {
		cr_assert_eq(smtpc_parse_reply((const uint8_t *)g, k, &r,
					       &used),
			     SMTPC_PARSE_AGAIN, "split at %zu", k);
	}
	snprintf(buf, sizeof(buf), "%s250 next\r\n", g);
	cr_assert_eq(parse(buf, &r, &used), SMTPC_PARSE_OK);
	cr_assert_eq(used, n);
	cr_assert_str_eq(r.text, "250 mx.test Hello PIPELINING SIZE 1000 "
				 "CHUNKING");
	cr_assert_eq(smtpc_parse_reply(NULL, 0, &r, &used), SMTPC_PARSE_AGAIN);
}

Test(smtpc, parse_syntax_errors)
{
	static const char *const bad[] = {
		"250-a\r\n251 b\r\n", /* codes differ */
		"250x\r\n",           /* separator */
		"25\r\n",             /* short code */
		"2a0 x\r\n",
		"199 x\r\n",          /* not 2xx..5xx */
		"600 x\r\n",
		"\r\n",
		"250\r\r\n",
		"HTTP/1.1 400",       /* seen before any line end */
		"250-ok\r\nxyz",
	};
	struct smtpc_reply r;
	size_t used;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		cr_assert_eq(parse(bad[i], &r, &used), SMTPC_PARSE_ERR_SYNTAX,
			     "case %zu", i);
	/* prefixes that may still become valid are not errors */
	cr_assert_eq(parse("250\r", &r, &used), SMTPC_PARSE_AGAIN);
	cr_assert_eq(parse("25", &r, &used), SMTPC_PARSE_AGAIN);
	cr_assert_eq(parse("250-a\r\n25", &r, &used), SMTPC_PARSE_AGAIN);
}

Test(smtpc, parse_overlong_line_and_too_many_lines)
{
	static char b[16384]; /* not malloc: GCC's -Warray-bounds with the
			       * sanitizers takes it for NULL */
	struct smtpc_reply r;
	size_t used;

	/* 2048 octets before CRLF: fine; 2049: too long */
	memset(b, 'x', 2100);
	memcpy(b, "250 ", 4);
	memcpy(b + 2048, "\r\n", 3);
	cr_assert_eq(parse(b, &r, &used), SMTPC_PARSE_OK);
	cr_assert_eq(strlen(r.text), SMTPC_TEXT_MAX - 1);
	cr_assert_str_eq(r.text + SMTPC_TEXT_MAX - 4, "...");
	memset(b, 'x', 2100);
	memcpy(b, "250 ", 4);
	memcpy(b + 2049, "\r\n", 3);
	cr_assert_eq(parse(b, &r, &used), SMTPC_PARSE_ERR_TOOLONG);
	/* without a line end: too long as soon as it cannot end in time */
	b[2049] = 'x';
	cr_assert_eq(smtpc_parse_reply((uint8_t *)b, 2050, &r, &used),
		     SMTPC_PARSE_ERR_TOOLONG);
	cr_assert_eq(smtpc_parse_reply((uint8_t *)b, 2049, &r, &used),
		     SMTPC_PARSE_AGAIN);
	/* 1000 lines: fine; 1001: too many */
	size_t k = 0;
	for (int i = 0; i < 999; i++)
		k += (size_t)sprintf(b + k, "250-l\r\n");
	strcpy(b + k, "250 end\r\n");
	cr_assert_eq(parse(b, &r, &used), SMTPC_PARSE_OK);
	sprintf(b + k, "250-l\r\n250 end\r\n");
	cr_assert_eq(parse(b, &r, &used), SMTPC_PARSE_ERR_TOOLONG);
}

Test(smtpc, parse_text_made_printable)
{
	struct smtpc_reply r;
	size_t used;
	const uint8_t in[] = "550 a\tb\x1b[31m\xc3\xa9\x7f\x00z\r\n";

	cr_assert_eq(smtpc_parse_reply(in, sizeof(in) - 1, &r, &used),
		     SMTPC_PARSE_OK);
	cr_assert_str_eq(r.text, "550 a?b?[31m????z");
}

/* ---- connecting ---------------------------------------------------------- */

Test(smtpc, ehlo_capabilities_multiline_any_case)
{
	static const struct step st[] = {
		{ NULL, "220-mx.example.org ESMTP\r\n220 second line\r\n" },
		{ "EHLO client.test",
		  "250-mx.example.org greets you\r\n250-pipelining\r\n"
		  "250-Size 10240000\r\n250-8bitmime\r\n250-SmtpUtf8\r\n"
		  "250-chunking\r\n250-DSN\r\n250-STARTTLS\r\n"
		  "250-ENHANCEDSTATUSCODES\r\n250-BINARYMIME\r\n"
		  "250-X-SIZE 5\r\n250-SIZEX\r\n250 AUTH PLAIN LOGIN\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);

	cr_assert_eq(smtpc_exts(c),
		     SMTPC_EXT_PIPELINING | SMTPC_EXT_SIZE |
			     SMTPC_EXT_8BITMIME | SMTPC_EXT_SMTPUTF8 |
			     SMTPC_EXT_CHUNKING | SMTPC_EXT_DSN |
			     SMTPC_EXT_STARTTLS |
			     SMTPC_EXT_ENHANCEDSTATUSCODES |
			     SMTPC_EXT_BINARYMIME);
	cr_assert_eq(smtpc_size_limit(c), 10240000);
	cr_assert_str_eq(smtpc_peer_name(c), "mx.example.org");
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->n_lines, 2);
	cr_assert_str_eq(s->lines[0], "EHLO client.test\r\n");
	cr_assert_str_eq(s->lines[1], "QUIT\r\n");
	srv_free(s);
}

Test(smtpc, ehlo_size_without_limit)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250 SIZE\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);

	cr_assert_eq(smtpc_exts(c), SMTPC_EXT_SIZE);
	cr_assert_eq(smtpc_size_limit(c), 0);
	smtpc_quit(c);
	srv_end(s);
	srv_free(s);
}

Test(smtpc, helo_fallback_after_ehlo_5xx)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO client.test", "502 5.5.1 command not recognized\r\n" },
		{ "HELO client.test", "250 mx.test\r\n" },
		{ "MAIL FROM:<s@x.test>", "250 ok\r\n" },
		{ "RCPT TO:<r@y.test>", "250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 queued\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct mem_body b = { .p = (const uint8_t *)"hi\r\n", .n = 4 };
	struct smtpc_msg m = msg1("s@x.test", R1, 1, &b);
	struct smtpc_reply mail, rcpt[1], data[1];

	cr_assert_eq(smtpc_exts(c), 0);
	m.body_type = 2;
	m.ret = 1;
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_eq(data[0].code, 250);
	smtpc_quit(c);
	srv_end(s);
	cr_assert_str_eq(s->lines[2], "MAIL FROM:<s@x.test>\r\n");
	srv_free(s);
}

Test(smtpc, ehlo_4xx_no_fallback)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "421 4.3.2 busy\r\n" },
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc_target t;
	struct smtpc_params p = params(2000, 2000);
	struct smtpc_reply why;
	int err = 0;

	target_of(s, SMTPC_SMTP, &t);
	cr_assert_null(smtpc_connect(&t, &p, &why, &err));
	cr_assert_eq(err, -EPROTO);
	cr_assert_eq(why.code, 421);
	cr_assert_not(why.local);
	srv_end(s);
	srv_free(s);
}

Test(smtpc, greeting_5xx)
{
	static const struct step st[] = {
		{ NULL, "554 5.7.1 go away\r\n" },
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc_target t;
	struct smtpc_params p = params(2000, 2000);
	struct smtpc_reply why;
	int err = 0;

	target_of(s, SMTPC_SMTP, &t);
	cr_assert_null(smtpc_connect(&t, &p, &why, &err));
	cr_assert_eq(err, -EPROTO);
	cr_assert_eq(why.code, 554);
	cr_assert_str_eq(why.text, "554 5.7.1 go away");
	cr_assert_not(why.local);
	srv_end(s);
	cr_assert_eq(s->n_lines, 0, "sent something after a 554 greeting");
	srv_free(s);
}

Test(smtpc, greeting_garbage)
{
	static const struct step st[] = {
		{ NULL, "SSH-2.0-OpenSSH_9.6\r\n" },
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc_target t;
	struct smtpc_params p = params(2000, 2000);
	struct smtpc_reply why;
	int err = 0;

	target_of(s, SMTPC_SMTP, &t);
	cr_assert_null(smtpc_connect(&t, &p, &why, &err));
	cr_assert_eq(err, -EPROTO);
	cr_assert(why.local);
	cr_assert_eq(why.code / 100, 4);
	srv_end(s);
	srv_free(s);
}

Test(smtpc, greeting_timeout)
{
	static const struct step st[] = {
		{ "<hang>", NULL },
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc_target t;
	struct smtpc_params p = params(300, 300);
	struct smtpc_reply why;
	int err = 0;
	uint64_t t0 = ms_now();

	target_of(s, SMTPC_SMTP, &t);
	cr_assert_null(smtpc_connect(&t, &p, &why, &err));
	cr_assert_eq(err, -ETIMEDOUT);
	cr_assert_geq(ms_now() - t0, 250);
	cr_assert_lt(ms_now() - t0, 3000);
	cr_assert(why.local);
	cr_assert_str_eq(why.text, "421 4.4.2 timeout waiting for greeting");
	srv_end(s);
	srv_free(s);
}

Test(smtpc, connect_refused)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t sl = sizeof(sin);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct smtpc_target t = { .proto = SMTPC_SMTP };
	struct smtpc_params p = params(2000, 2000);
	struct smtpc_reply why;
	int err = 0;

	/* a port just bound and released: nobody listens there */
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	cr_assert_eq(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
	getsockname(fd, (struct sockaddr *)&sin, &sl);
	close(fd);
	strcpy(t.host, "127.0.0.1");
	t.port = ntohs(sin.sin_port);
	cr_assert_null(smtpc_connect(&t, &p, &why, &err));
	cr_assert_eq(err, -ECONNREFUSED);
	cr_assert(why.local);
	cr_assert_eq(why.code, 421);
	cr_assert_str_eq(why.enh, "4.4.1");
}

/* A name resolving to several addresses: each is tried in turn (the
 * server listens on 127.0.0.1 only, "localhost" may give ::1 first). */
Test(smtpc, name_resolved_addresses_tried)
{
	static const struct step st[] = { GREET, EHLO_PLAIN, QUIT, END };
	struct srv *s = srv_start(st, false);
	struct smtpc_target t = { .proto = SMTPC_SMTP, .host = "localhost" };
	struct smtpc_params p = params(2000, 2000);
	struct smtpc_reply why;
	int err = 0;

	t.port = s->port;
	struct smtpc *c = smtpc_connect(&t, &p, &why, &err);
	cr_assert_not_null(c, "%d %s", err, why.text);
	smtpc_quit(c);
	srv_end(s);
	srv_free(s);
}

Test(smtpc, ipv6_literal_in_brackets)
{
	struct sockaddr_in6 sin6 = { .sin6_family = AF_INET6,
				     .sin6_addr = IN6ADDR_LOOPBACK_INIT };
	socklen_t sl = sizeof(sin6);
	int fd = socket(AF_INET6, SOCK_STREAM, 0);
	struct smtpc_target t = { .proto = SMTPC_SMTP, .host = "[::1]" };
	struct smtpc_params p = params(2000, 2000);
	struct smtpc_reply why;
	int err = 0;

	if (fd < 0 || bind(fd, (struct sockaddr *)&sin6, sizeof(sin6)) != 0)
		cr_skip_test("no IPv6 loopback");
	getsockname(fd, (struct sockaddr *)&sin6, &sl);
	cr_assert_eq(listen(fd, 1), 0);
	t.port = ntohs(sin6.sin6_port);
	/* a child process plays the server: greeting, EHLO, QUIT replies */
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		int cfd = accept(fd, NULL, NULL);
		const char *g = "220 v6\r\n250 v6\r\n221 bye\r\n";
		if (write(cfd, g, strlen(g)) < 0)
			_exit(1);
		char sink[256];
		while (read(cfd, sink, sizeof(sink)) > 0)
			;
		_exit(0);
	}
	struct smtpc *c = smtpc_connect(&t, &p, &why, &err);
	cr_assert_not_null(c, "%d %s", err, why.text);
	cr_assert_str_eq(smtpc_peer_name(c), "v6");
	smtpc_quit(c);
	int status = 1;
	waitpid(pid, &status, 0);
	cr_assert_eq(status, 0);
	close(fd);
}

Test(smtpc, bad_parameters_rejected)
{
	struct smtpc_target t = { .proto = SMTPC_SMTP, .host = "127.0.0.1",
				  .port = 1 };
	struct smtpc_params p = params(2000, 2000);
	struct smtpc_reply why;
	int err = 0;

	p.helo_name = "evil\r\nMAIL FROM:<x>";
	cr_assert_null(smtpc_connect(&t, &p, &why, &err));
	cr_assert_eq(err, -EINVAL);
	p.helo_name = "ok.test";
	t.proto = SMTPC_LMTP;
	t.port = 0;
	cr_assert_null(smtpc_connect(&t, &p, &why, &err));
	cr_assert_eq(err, -EINVAL);
}

/* ---- DATA ---------------------------------------------------------------- */

static const struct step data_script[] = {
	GREET,
	EHLO_PLAIN,
	{ "MAIL FROM:<s@x.test>\r\n", "250 2.1.0 ok\r\n" },
	{ "RCPT TO:<r@y.test>\r\n", "250 2.1.5 ok\r\n" },
	{ "DATA\r\n", "354 go ahead\r\n" },
	{ ".", "250 2.0.0 queued as A1\r\n" },
	QUIT,
	END,
};

/* One DATA transaction of body b; returns the server (body 0 = raw). */
static struct srv *
deliver_data(struct mem_body *b)
{
	struct srv *s = srv_start(data_script, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_msg m = msg1("s@x.test", R1, 1, b);
	struct smtpc_reply mail, rcpt[1], data[1];

	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_eq(mail.code, 250);
	cr_assert_eq(rcpt[0].code, 250);
	cr_assert_eq(data[0].code, 250);
	cr_assert_str_eq(data[0].text, "250 2.0.0 queued as A1");
	cr_assert_not(data[0].local);
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->n_bodies, 1);
	return s;
}

/* The body as DATA from b's pieces is exactly want[0..wn). */
static void
delivered_as(struct mem_body *b, const uint8_t *want, size_t wn)
{
	struct srv *s = deliver_data(b);

	cr_assert_eq(s->body_len[0], wn, "piece %zu", b->piece);
	cr_assert_arr_eq(s->body[0], want, wn, "piece %zu", b->piece);
	srv_free(s);
}

Test(smtpc, data_dot_stuffing_golden)
{
	static const char body[] = ".a\r\n..b\r\nc.d\r\n.\r\n\r\n.\r\nend\r\n";
	static const char want[] =
		"..a\r\n...b\r\nc.d\r\n..\r\n\r\n..\r\nend\r\n";
	struct mem_body b = { .p = (const uint8_t *)body,
			      .n = sizeof(body) - 1 };
	struct srv *s = deliver_data(&b);

	cr_assert_eq(s->body_len[0], sizeof(want) - 1);
	cr_assert_arr_eq(s->body[0], want, sizeof(want) - 1);
	/* no PIPELINING: MAIL waited for its reply, nothing sent ahead */
	cr_assert_eq(s->ahead[2], 0);
	cr_assert_eq(s->ahead[3], 0);
	srv_free(s);
}

/* The body source hands out 1..7 octets at a time: a '.' opening a line
 * at the start of a piece, CRLF split between pieces. */
Test(smtpc, data_dot_stuffing_across_pieces)
{
	static const char body[] =
		"x\r\n.\r\n..\r\n.x\r\nab.\r\n\r\n.\r\n.a.b.\r\n."
		"\r\n..\r\r\n\n.bare\r.cr\r\n.";
	uint8_t want[256], back[256];
	size_t wn = ref_stuff((const uint8_t *)body, sizeof(body) - 1, want);

	for (size_t piece = 1; piece <= 7; piece++) {
		struct mem_body b = { .p = (const uint8_t *)body,
				      .n = sizeof(body) - 1,
				      .piece = piece };
		struct srv *s = deliver_data(&b);
		cr_assert_eq(s->body_len[0], wn, "piece %zu", piece);
		cr_assert_arr_eq(s->body[0], want, wn, "piece %zu", piece);
		srv_free(s);
	}
	/* and the golden form of the awkward corners: bare CR and LF made
	 * CRLF (they went out bare, with a '.' after them that a receiver
	 * ending lines at CRLF only kept) */
	cr_assert(memmem(want, wn, "\r\n\r\n\r\n..bare\r\n..cr\r\n..\r\n",
			 24));
	for (size_t i = 0; i < wn; i++)
		cr_assert(want[i] == '\r' ? i + 1 < wn && want[i + 1] == '\n'
		          : want[i] != '\n' || (i > 0 && want[i - 1] == '\r'),
			  "a bare CR or LF at %zu", i);
	/* a CRLF body comes back whole through RFC 5321 unstuffing */
	static const char crlf[] = ".\r\n..\r\n.x\r\nab.\r\n\r\n.\r\n.";
	wn = ref_stuff((const uint8_t *)crlf, sizeof(crlf) - 1, want);
	size_t un = unstuff(want, wn, back);
	cr_assert_eq(un, sizeof(crlf) - 1 + 2);
	cr_assert_arr_eq(back, crlf, sizeof(crlf) - 1);
}

/* Random bodies of CR, LF, '.' and letters, cut into random pieces: the
 * streaming code (a line at a time, by memchr) matches the two-pass
 * reference every time. */
Test(smtpc, data_stuffing_matches_the_reference_on_random_bodies)
{
	static const char al[] = "ab.\r\n";
	uint8_t body[48], want[256];
	unsigned seed = 12345;

	for (int it = 0; it < 300; it++) {
		size_t n = 1 + rand_r(&seed) % sizeof(body), wn;
		for (size_t i = 0; i < n; i++)
			body[i] = (uint8_t)al[rand_r(&seed) % 5];
		wn = ref_stuff(body, n, want);
		struct mem_body b = { .p = body, .n = n,
				      .piece = 1 + rand_r(&seed) % 7 };
		struct srv *s = deliver_data(&b);
		cr_assert_eq(s->body_len[0], wn, "case %d", it);
		cr_assert_arr_eq(s->body[0], want, wn, "case %d", it);
		srv_free(s);
	}
}

/* The client's own 64 KiB read unit: a '.' opening the line right at a
 * piece boundary, and a CRLF split across one. */
Test(smtpc, data_dot_stuffing_at_64k_boundary)
{
	size_t n = 3 * 65536 + 10;
	uint8_t *body = malloc(n), *want = malloc(2 * n + 2);

	for (size_t i = 0; i < n; i++)
		body[i] = (uint8_t)('a' + i % 26);
	memcpy(body + 65534, "\r\n.", 3);  /* '.' at 65536 */
	memcpy(body + 131071, "\r\n.", 3); /* CR | LF . */
	memcpy(body + 196606, "\r\n..", 4);
	body[n - 1] = '.';
	struct mem_body b = { .p = body, .n = n };
	size_t wn = ref_stuff(body, n, want);
	/* three dots, the final CRLF, and a fold each 997 octets or so */
	cr_assert_gt(wn, n + 3 + 2 + 3 * 190);
	cr_assert_leq(longest_line(want, wn), 1000);
	delivered_as(&b, want, wn);
	free(body);
	free(want);
}

/* Lines over 998 octets (BDAT takes them in) are folded when sent as
 * DATA: CRLF SP after 998 octets, the stuffing '.' counted, a UTF-8
 * character never split when its first octet is in the same read (here:
 * the whole body in one). They went out whole, and a receiver keeping to
 * RFC 5321 4.5.3.1.6 (finaldot's own engine: 550 5.6.0) refused them. */
Test(smtpc, data_long_lines_folded)
{
	static const size_t lens[] = {997, 998, 999, 1000, 2500, 1996};
	size_t n = 0, wn;
	uint8_t *body = malloc(16384), *want = malloc(32768);
	const uint8_t *euro = (const uint8_t *)"\xe2\x82\xac";

	for (size_t l = 0; l < sizeof(lens) / sizeof(lens[0]); l++) {
		for (size_t i = 0; i < lens[l]; i++)
			body[n + i] = (uint8_t)('a' + (l + i) % 26);
		if (l == 4)
			body[n] = '.'; /* stuffed: 2501 octets on the wire */
		n += lens[l];
		memcpy(body + n, l == 2 ? "\n" : "\r\n", 2 - (l == 2));
		n += 2 - (l == 2);
	}
	/* ASCII: the same in any pieces (1..7 octets per read) */
	wn = ref_stuff(body, n, want);
	cr_assert_leq(longest_line(want, wn), 1000);
	for (size_t piece = 1; piece <= 7; piece++) {
		struct mem_body b = { .p = body, .n = n, .piece = piece };
		delivered_as(&b, want, wn);
	}
	/* a euro sign over octets 997..999 of a line: folded before it */
	memset(body + n, 'u', 997);
	memcpy(body + n + 997, euro, 3);
	memset(body + n + 1000, 'v', 10);
	n += 1010; /* and no final line end */
	wn = ref_stuff(body, n, want);
	cr_assert_leq(longest_line(want, wn), 1000);
	cr_assert(memmem(want, wn, "u\r\n \xe2\x82\xacvvvv", 10),
		  "the euro sign was split");
	/* the golden form of the 1000-octet line */
	cr_assert(memmem(want, wn, "\r\n no\r\n", 7));
	struct mem_body b = { .p = body, .n = n };
	delivered_as(&b, want, wn);
	free(body);
	free(want);
}

Test(smtpc, data_body_without_final_crlf)
{
	static const char *const bodies[] = { "abc", ".x", "line\r\nlast\r",
					      "a\n" };
	static const char *const want[] = { "abc\r\n", "..x\r\n",
					    "line\r\nlast\r\n", "a\r\n" };

	for (size_t i = 0; i < 4; i++) {
		struct mem_body b = { .p = (const uint8_t *)bodies[i],
				      .n = strlen(bodies[i]) };
		struct srv *s = deliver_data(&b);
		cr_assert_eq(s->body_len[0], strlen(want[i]), "case %zu", i);
		cr_assert_arr_eq(s->body[0], want[i], strlen(want[i]));
		srv_free(s);
	}
}

Test(smtpc, data_empty_body)
{
	struct mem_body b = { .p = (const uint8_t *)"", .n = 0 };
	struct srv *s = deliver_data(&b);

	cr_assert_eq(s->body_len[0], 0);
	srv_free(s);
}

Test(smtpc, data_refused_before_354)
{
	static const struct step st[] = {
		GREET,
		EHLO_PLAIN,
		{ "MAIL", "250 ok\r\n" },
		{ "RCPT", "250 ok\r\n" },
		{ "RCPT", "550 5.1.1 nope\r\n" },
		{ "DATA", "554 5.7.1 not today\r\n" },
		{ "RSET", "250 ok\r\n" },
		{ "RSET", "250 ok\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	static const char *const r2[] = { "a@y.test", "b@y.test" };
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", r2, 2, &b);
	struct smtpc_reply mail, rcpt[2], data[2];

	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_eq(data[0].code, 554);
	cr_assert_eq(data[1].code, 550);
	cr_assert_eq(smtpc_rset(c), 0); /* still usable */
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->n_bodies, 0);
	srv_free(s);
}

/* ---- BDAT ---------------------------------------------------------------- */

Test(smtpc, bdat_verbatim_multichunk)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250-CHUNKING\r\n250 8BITMIME\r\n" },
		{ "MAIL FROM:<s@x.test> BODY=8BITMIME\r\n", "250 ok\r\n" },
		{ "RCPT", "250 ok\r\n" },
		{ "BDAT ", "250 2.0.0 chunk 1\r\n" },
		{ "BDAT ", "250 2.0.0 chunk 2\r\n" },
		{ "BDAT ", "250 2.0.0 chunk 3\r\n" },
		{ "BDAT ", "250 2.0.0 chunk 4\r\n" },
		{ "BDAT ", "250 2.0.0 queued as B\r\n" },
		QUIT,
		END,
	};
	size_t n = 3 * 1048576 + 70000 + 123;
	uint8_t *body = malloc(n);
	unsigned seed = 7;

	for (size_t i = 0; i < n; i++)
		body[i] = (uint8_t)rand_r(&seed);
	memcpy(body, ".\r\n.\n", 5);
	struct mem_body b = { .p = body, .n = n, .piece = 10000 };
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_msg m = msg1("s@x.test", R1, 1, &b);
	struct smtpc_reply mail, rcpt[1], data[1];

	m.body_type = 2;
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_str_eq(data[0].text, "250 2.0.0 queued as B");
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->n_bodies, 1);
	cr_assert_eq(s->body_len[0], n);
	cr_assert_arr_eq(s->body[0], body, n);
	size_t sum = 0;
	for (unsigned i = 3; i < 8; i++) {
		size_t k = strtoull(s->lines[i] + 5, NULL, 10);
		cr_assert_leq(k, 1048576);
		cr_assert_eq(strstr(s->lines[i], "LAST") != NULL, i == 7,
			     "%s", s->lines[i]);
		sum += k;
	}
	cr_assert_eq(sum, n);
	for (unsigned i = 0; i < s->n_lines; i++)
		cr_assert_neq(strncmp(s->lines[i], "DATA", 4), 0);
	free(body);
	srv_free(s);
}

Test(smtpc, bdat_empty_body_and_lmtp_replies)
{
	static const struct step st[] = {
		GREET,
		{ "LHLO client.test", "250-mx\r\n250 CHUNKING\r\n" },
		{ "MAIL", "250 ok\r\n" },
		{ "RCPT TO:<a@", "250 ok\r\n" },
		{ "RCPT TO:<b@", "250 ok\r\n" },
		{ "RCPT TO:<c@", "250 ok\r\n" },
		{ "BDAT 0 LAST\r\n",
		  "250 2.0.0 a ok\r\n550 5.1.1 b gone\r\n250 2.0.0 c ok\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, true);
	struct smtpc *c = open_to(s, SMTPC_LMTP);
	struct mem_body b = { .p = (const uint8_t *)"", .n = 0 };
	struct smtpc_msg m = msg1("s@x.test", R3, 3, &b);
	struct smtpc_reply mail, rcpt[3], data[3];

	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_str_eq(data[0].text, "250 2.0.0 a ok");
	cr_assert_str_eq(data[1].text, "550 5.1.1 b gone");
	cr_assert_str_eq(data[2].text, "250 2.0.0 c ok");
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->n_bodies, 1);
	cr_assert_eq(s->body_len[0], 0);
	srv_free(s);
}

Test(smtpc, bdat_chunk_refused_then_rset)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250-CHUNKING\r\n250 BINARYMIME\r\n" },
		{ "MAIL FROM:<s@x.test> BODY=BINARYMIME\r\n", "250 ok\r\n" },
		{ "RCPT", "250 ok\r\n" },
		{ "BDAT 1048576\r\n", "552 5.3.4 too big\r\n" },
		{ "RSET", "250 ok\r\n" },
		QUIT,
		END,
	};
	size_t n = 2 * 1048576;
	uint8_t *body = calloc(1, n);
	struct mem_body b = { .p = body, .n = n };
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_msg m = msg1("s@x.test", R1, 1, &b);
	struct smtpc_reply mail, rcpt[1], data[1];

	m.body_type = 3;
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_str_eq(data[0].text, "552 5.3.4 too big");
	smtpc_quit(c);
	srv_end(s);
	free(body);
	srv_free(s);
}

/* With CHUNKING the size is promised up front: a source shorter or longer
 * than m->size breaks the connection before a wrong message is complete. */
Test(smtpc, bdat_body_length_mismatch)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250 CHUNKING\r\n" },
		{ "MAIL", "250 ok\r\n" },
		{ "RCPT", "250 ok\r\n" },
		{ "<hang>", NULL },
		END,
	};
	uint8_t body[100] = { 0 };

	for (int longer = 0; longer < 2; longer++) {
		struct mem_body b = { .p = body, .n = 100 };
		struct srv *s = srv_start(st, false);
		struct smtpc *c = open_to(s, SMTPC_SMTP);
		struct smtpc_msg m = msg1("s@x.test", R1, 1, &b);
		struct smtpc_reply mail, rcpt[1], data[1];

		m.size = longer ? 50 : 150;
		cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), -EIO);
		cr_assert(data[0].local);
		cr_assert_str_eq(data[0].text,
				 "451 4.3.0 error reading message body");
		smtpc_abort(c);
		srv_end(s);
		srv_free(s);
	}
}

/* ---- PIPELINING and recipients ------------------------------------------- */

Test(smtpc, pipelining_one_write_mixed_rcpt_replies)
{
	/* the server answers nothing until it holds MAIL and all three
	 * RCPTs: a client waiting for MAIL's reply would time out */
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250 PIPELINING\r\n" },
		{ "MAIL FROM:<s@x.test>\r\n", NULL },
		{ "RCPT TO:<a@y.test>\r\n", NULL },
		{ "RCPT TO:<b@y.test>\r\n", NULL },
		{ "RCPT TO:<c@y.test>\r\n",
		  "250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 b unknown\r\n"
		  "452 4.5.3 too many recipients\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 2.0.0 queued\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", R3, 3, &b);
	struct smtpc_reply mail, rcpt[3], data[3];

	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_eq(mail.code, 250);
	cr_assert_eq(rcpt[0].code, 250);
	cr_assert_str_eq(rcpt[1].text, "550 5.1.1 b unknown");
	cr_assert_str_eq(rcpt[2].enh, "4.5.3");
	cr_assert_str_eq(data[0].text, "250 2.0.0 queued");
	cr_assert_str_eq(data[1].text, "550 5.1.1 b unknown");
	cr_assert_str_eq(data[2].text, "452 4.5.3 too many recipients");
	smtpc_quit(c);
	srv_end(s);
	/* all three RCPTs were already there when MAIL was read: one write */
	cr_assert_eq(s->ahead[2], 3);
	srv_free(s);
}

Test(smtpc, all_rcpts_refused_no_data_connection_reusable)
{
	static const struct step st[] = {
		GREET,
		EHLO_PLAIN,
		{ "MAIL", "250 ok\r\n" },
		{ "RCPT", "550 5.1.1 no\r\n" },
		{ "RCPT", "450 4.2.1 later\r\n" },
		{ "RSET", "250 ok\r\n" },
		{ "MAIL", "250 ok\r\n" },
		{ "RCPT", "250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 2.0.0 second\r\n" },
		QUIT,
		END,
	};
	static const char *const r2[] = { "a@y.test", "b@y.test" };
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", r2, 2, &b);
	struct smtpc_reply mail, rcpt[2], data[2];

	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_eq(data[0].code, 550);
	cr_assert_eq(data[1].code, 450);
	cr_assert_eq(b.n, 3);
	m.n_rcpts = 1;
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_str_eq(data[0].text, "250 2.0.0 second");
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->n_bodies, 1);
	cr_assert_str_eq(s->lines[4], "RSET\r\n");
	srv_free(s);
}

Test(smtpc, mail_refused_no_rcpt_sent)
{
	static const struct step st[] = {
		GREET,
		EHLO_PLAIN,
		{ "MAIL", "550 5.7.1 sender rejected\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", R3, 3, &b);
	struct smtpc_reply mail, rcpt[3], data[3];

	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	for (int i = 0; i < 3; i++) {
		cr_assert_str_eq(rcpt[i].text, "550 5.7.1 sender rejected");
		cr_assert_str_eq(data[i].text, "550 5.7.1 sender rejected");
	}
	smtpc_quit(c);
	srv_end(s);
	cr_assert_str_eq(s->lines[2], "QUIT\r\n");
	srv_free(s);
}

Test(smtpc, pipelined_mail_refused)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250 PIPELINING\r\n" },
		{ "MAIL", NULL },
		{ "RCPT", "451 4.3.0 try later\r\n503 5.5.1 need MAIL\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", R1, 1, &b);
	struct smtpc_reply mail, rcpt[1], data[1];

	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_eq(rcpt[0].code, 503);
	cr_assert_str_eq(data[0].text, "451 4.3.0 try later");
	smtpc_quit(c);
	srv_end(s);
	srv_free(s);
}

/* An address that would smuggle a command is refused here, not sent. */
Test(smtpc, control_octets_in_address_not_sent)
{
	static const struct step st[] = {
		GREET,
		EHLO_PLAIN,
		{ "MAIL", "250 ok\r\n" },
		{ "RCPT TO:<ok@y.test>\r\n", "250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 done\r\n" },
		QUIT,
		END,
	};
	static const char *const r2[] = { "a@b>\r\nRCPT TO:<evil@x",
					  "ok@y.test" };
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", r2, 2, &b);
	struct smtpc_reply mail, rcpt[2], data[2];

	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert(rcpt[0].local);
	cr_assert_eq(data[0].code, 553);
	cr_assert_eq(data[1].code, 250);
	/* the sender too: nothing at all is sent */
	m.mail_from = "x\n@y";
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_eq(mail.code, 553);
	cr_assert_eq(data[1].code, 553);
	smtpc_quit(c);
	srv_end(s);
	for (unsigned i = 0; i < s->n_lines; i++)
		cr_assert_null(strstr(s->lines[i], "evil"));
	cr_assert_str_eq(s->lines[s->n_lines - 1], "QUIT\r\n");
	srv_free(s);
}

/* A command line over 2,000 octets (CRLF included) is not sent: the
 * recipient gets a local 553; one of exactly 2,000 goes out whole. */
Test(smtpc, command_line_limit_exact)
{
	static const struct step st[] = {
		GREET,
		EHLO_PLAIN,
		{ "MAIL FROM:<s@x.test>\r\n", "250 ok\r\n" },
		{ "RCPT TO:<aaaa", "250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 done\r\n" },
		QUIT,
		END,
	};
	static char fits[1989], over[1990];
	const char *r2[2] = { over, fits };
	struct srv *s;
	struct smtpc *c;
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m;
	struct smtpc_reply mail, rcpt[2], data[2];

	/* "RCPT TO:<" + address + ">\r\n": 12 octets around it */
	memset(fits, 'a', sizeof(fits) - 1);
	memcpy(fits + sizeof(fits) - 8, "@y.test", 8);
	memset(over, 'a', sizeof(over) - 1);
	memcpy(over + sizeof(over) - 8, "@y.test", 8);
	cr_assert_eq(strlen(fits) + 12, 2000);
	s = srv_start(st, false);
	c = open_to(s, SMTPC_SMTP);
	m = msg1("s@x.test", r2, 2, &b);
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert(rcpt[0].local);
	cr_assert_eq(data[0].code, 553);
	cr_assert_eq(data[1].code, 250);
	smtpc_quit(c);
	srv_end(s);
	srv_free(s);
}

/* ---- LMTP ---------------------------------------------------------------- */

Test(smtpc, lmtp_per_recipient_replies_after_dot)
{
	static const struct step st[] = {
		GREET,
		{ "LHLO client.test", "250-mx\r\n250 PIPELINING\r\n" },
		{ "MAIL", NULL },
		{ "RCPT TO:<a@", NULL },
		{ "RCPT TO:<b@", NULL },
		{ "RCPT TO:<c@", NULL },
		{ "RCPT TO:<d@",
		  "250 ok\r\n250 ok\r\n550 5.1.1 b unknown\r\n250 ok\r\n"
		  "250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 2.0.0 a delivered\r\n"
		       "452 4.2.2 c mailbox full\r\n"
		       "550 5.2.1 d disabled\r\n" },
		QUIT,
		END,
	};
	static const char *const r4[] = { "a@y", "b@y", "c@y", "d@y" };
	struct srv *s = srv_start(st, true);
	struct smtpc *c = open_to(s, SMTPC_LMTP);
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", r4, 4, &b);
	struct smtpc_reply mail, rcpt[4], data[4];

	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_str_eq(data[0].text, "250 2.0.0 a delivered");
	cr_assert_str_eq(data[1].text, "550 5.1.1 b unknown");
	cr_assert_str_eq(data[2].text, "452 4.2.2 c mailbox full");
	cr_assert_str_eq(data[3].text, "550 5.2.1 d disabled");
	smtpc_quit(c);
	srv_end(s);
	srv_free(s);
}

/* ---- parameters ---------------------------------------------------------- */

static const uint8_t notify2[] = { 2 | 4, 1 | 8 };
static const char *const orcpts2[] = { "rfc822;a+2Bx@y.test", "bad orcpt" };
static const char *const rcpts2[] = { "a+x@y.test", "b@y.test" };

static void
send_params(const struct step *st, bool utf8)
{
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", rcpts2, 2, &b);
	struct smtpc_reply mail, rcpt[2], data[2];

	m.notify = notify2;
	m.orcpts = orcpts2;
	m.envid = "id+3D1";
	m.ret = 2;
	m.body_type = 2;
	m.smtputf8 = utf8;
	m.size = 123;
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_eq(data[0].code, 250);
	cr_assert_eq(data[1].code, 250);
	smtpc_quit(c);
	srv_end(s);
	srv_free(s);
}

Test(smtpc, parameters_when_advertised)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
			  "250-SMTPUTF8\r\n250 DSN\r\n" },
		{ "MAIL FROM:<s@x.test> SIZE=123 BODY=8BITMIME SMTPUTF8 "
		  "RET=HDRS ENVID=id+3D1\r\n",
		  "250 ok\r\n" },
		{ "RCPT TO:<a+x@y.test> NOTIFY=SUCCESS,FAILURE "
		  "ORCPT=rfc822;a+2Bx@y.test\r\n",
		  "250 ok\r\n" },
		{ "RCPT TO:<b@y.test> NOTIFY=NEVER\r\n", "250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 ok\r\n" },
		QUIT,
		END,
	};
	send_params(st, true);
}

/* An ORCPT in raw UTF-8 (RFC 6533 unitext, as the SMTP engine takes it):
 * as is in an SMTPUTF8 transaction, in its 7-bit utf-8-addr-xtext form
 * without one (it went out 8-bit, and a next hop refusing that bounced
 * the recipient); 8-bit under another type is left out. */
static void
send_orcpt8(const struct step *st, bool utf8)
{
	static const char *const rcpts[] = { "b@y.test", "c@y.test" };
	static const char *const orcpts[] = {
		"utf-8;b\xc3\xa9" "b\\x{2B}1@y.test",
		"rfc822;c\xc3\xa9@y.test" };
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", rcpts, 2, &b);
	struct smtpc_reply mail, rcpt[2], data[2];

	m.orcpts = orcpts;
	m.smtputf8 = utf8;
	m.envid = "id\xc3\xa9"; /* not xtext: left out, SMTPUTF8 or not */
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_eq(data[0].code, 250);
	smtpc_quit(c);
	srv_end(s);
	srv_free(s);
}

Test(smtpc, orcpt_8bit_without_smtputf8_goes_as_xtext)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250 DSN\r\n" },
		{ "MAIL FROM:<s@x.test>\r\n", "250 ok\r\n" },
		{ "RCPT TO:<b@y.test> ORCPT=utf-8;b\\x{E9}b\\x{2B}1@y.test\r\n",
		  "250 ok\r\n" },
		{ "RCPT TO:<c@y.test>\r\n", "250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 ok\r\n" },
		QUIT,
		END,
	};
	send_orcpt8(st, false);
}

Test(smtpc, orcpt_8bit_with_smtputf8_goes_as_is)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250-SMTPUTF8\r\n250 DSN\r\n" },
		{ "MAIL FROM:<s@x.test> SMTPUTF8\r\n", "250 ok\r\n" },
		{ "RCPT TO:<b@y.test> ORCPT=utf-8;b\xc3\xa9"
		  "b\\x{2B}1@y.test\r\n",
		  "250 ok\r\n" },
		{ "RCPT TO:<c@y.test> ORCPT=rfc822;c\xc3\xa9@y.test\r\n",
		  "250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 ok\r\n" },
		QUIT,
		END,
	};
	send_orcpt8(st, true);
}

Test(smtpc, parameters_left_out_when_not_advertised)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250 ENHANCEDSTATUSCODES\r\n" },
		{ "MAIL FROM:<s@x.test>\r\n", "250 ok\r\n" },
		{ "RCPT TO:<a+x@y.test>\r\n", "250 ok\r\n" },
		{ "RCPT TO:<b@y.test>\r\n", "250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 ok\r\n" },
		QUIT,
		END,
	};
	send_params(st, false);
}

Test(smtpc, null_sender_and_7bit)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250 8BITMIME\r\n" },
		{ "MAIL FROM:<> BODY=7BIT\r\n", "250 ok\r\n" },
		{ "RCPT", "250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 ok\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("", R1, 1, &b);
	struct smtpc_reply mail, rcpt[1], data[1];

	m.body_type = 1;
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_eq(data[0].code, 250);
	smtpc_quit(c);
	srv_end(s);
	srv_free(s);
}

Test(smtpc, smtputf8_or_binarymime_unadvertised_nothing_sent)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250 8BITMIME\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", R1, 1, &b);
	struct smtpc_reply mail, rcpt[1], data[1];

	m.smtputf8 = true;
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert(data[0].local);
	cr_assert_str_eq(data[0].enh, "5.6.7");
	m.smtputf8 = false;
	m.body_type = 3;
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
	cr_assert_str_eq(data[0].enh, "5.6.3");
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->n_lines, 2); /* EHLO, QUIT */
	srv_free(s);
}

/* ---- broken connections -------------------------------------------------- */

Test(smtpc, peer_closes_mid_data)
{
	static const struct step st[] = {
		GREET,
		EHLO_PLAIN,
		{ "MAIL", "250 ok\r\n" },
		{ "RCPT", "250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ "<cut:1000>", NULL },
		END,
	};
	size_t n = 32u << 20;
	uint8_t *body = malloc(n);
	memset(body, 'a', n);
	struct mem_body b = { .p = body, .n = n };
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_msg m = msg1("s@x.test", R1, 1, &b);
	struct smtpc_reply mail, rcpt[1], data[1];

	int rc = smtpc_send(c, &m, &mail, rcpt, data);
	cr_assert(rc == -ECONNRESET || rc == -EPIPE, "rc %d", rc);
	cr_assert_eq(mail.code, 250);
	cr_assert_eq(rcpt[0].code, 250);
	cr_assert(data[0].local);
	cr_assert_eq(data[0].code, 421);
	cr_assert_str_eq(data[0].text,
			 "421 4.4.2 connection lost during message body");
	/* broken: the next transaction is refused at once */
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), -ENOTCONN);
	cr_assert_eq(data[0].code, 421);
	cr_assert_eq(smtpc_rset(c), -ENOTCONN);
	smtpc_quit(c);
	srv_end(s);
	free(body);
	srv_free(s);
}

Test(smtpc, peer_never_answers_the_dot)
{
	static const struct step st[] = {
		GREET,
		{ "LHLO", "250 mx\r\n" },
		{ "MAIL", "250 ok\r\n" },
		{ "RCPT", "250 ok\r\n" },
		{ "RCPT", "250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 2.0.0 first only\r\n" },
		{ "<hang>", NULL },
		END,
	};
	static const char *const r2[] = { "a@y.test", "b@y.test" };
	struct srv *s = srv_start(st, false);
	struct smtpc_target t;
	struct smtpc_params p = params(2000, 300);
	struct smtpc_reply why, mail, rcpt[2], data[2];
	int err = 0;
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", r2, 2, &b);

	target_of(s, SMTPC_LMTP, &t);
	t.port = s->port;
	struct smtpc *c = smtpc_connect(&t, &p, &why, &err);
	cr_assert_not_null(c, "%d %s", err, why.text);
	uint64_t t0 = ms_now();
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), -ETIMEDOUT);
	cr_assert_geq(ms_now() - t0, 250);
	cr_assert_lt(ms_now() - t0, 2000);
	cr_assert_str_eq(data[0].text, "250 2.0.0 first only");
	cr_assert(data[1].local);
	cr_assert_str_eq(data[1].text,
			 "421 4.4.2 timeout waiting for reply to end of data");
	smtpc_quit(c); /* broken: closes without QUIT */
	srv_end(s);
	srv_free(s);
}

Test(smtpc, rcpt_reply_timeout)
{
	static const struct step st[] = {
		GREET,
		EHLO_PLAIN,
		{ "MAIL", "250 ok\r\n" },
		{ "<hang>", NULL },
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc_target t;
	struct smtpc_params p = params(300, 300);
	struct smtpc_reply why, mail, rcpt[1], data[1];
	int err = 0;
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", R1, 1, &b);

	target_of(s, SMTPC_SMTP, &t);
	struct smtpc *c = smtpc_connect(&t, &p, &why, &err);
	cr_assert_not_null(c);
	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), -ETIMEDOUT);
	cr_assert_str_eq(rcpt[0].text,
			 "421 4.4.2 timeout waiting for reply to RCPT TO");
	cr_assert_str_eq(data[0].text, rcpt[0].text);
	smtpc_abort(c);
	srv_end(s);
	srv_free(s);
}

Test(smtpc, garbage_reply_mid_transaction)
{
	static const struct step st[] = {
		GREET,
		EHLO_PLAIN,
		{ "MAIL", "250 ok\r\n" },
		{ "RCPT", "2x0 what\r\n" },
		{ "<hang>", NULL },
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", R1, 1, &b);
	struct smtpc_reply mail, rcpt[1], data[1];

	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), -EPROTO);
	cr_assert(rcpt[0].local);
	cr_assert_str_eq(rcpt[0].text, "421 4.5.0 invalid reply to RCPT TO");
	cr_assert_eq(data[0].code, 421);
	smtpc_abort(c);
	srv_end(s);
	srv_free(s);
}

/* A 354 to RCPT is no final answer: the caller never sees a 3xx. */
Test(smtpc, intermediate_reply_where_final_expected)
{
	static const struct step st[] = {
		GREET,
		EHLO_PLAIN,
		{ "MAIL", "250 ok\r\n" },
		{ "RCPT", "354 go ahead\r\n" },
		{ "<hang>", NULL },
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", R1, 1, &b);
	struct smtpc_reply mail, rcpt[1], data[1];

	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), -EPROTO);
	cr_assert_str_eq(rcpt[0].text, "421 4.5.0 invalid reply to RCPT TO");
	cr_assert_str_eq(data[0].text, rcpt[0].text);
	smtpc_abort(c);
	srv_end(s);
	srv_free(s);
}

Test(smtpc, peer_421_closes)
{
	static const struct step st[] = {
		GREET,
		EHLO_PLAIN,
		{ "MAIL", "250 ok\r\n" },
		{ "RCPT", "250 ok\r\n" },
		{ "RCPT", "421 4.7.0 too many errors\r\n" },
		{ "<close>", NULL },
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct mem_body b = { .p = (const uint8_t *)"x\r\n", .n = 3 };
	struct smtpc_msg m = msg1("s@x.test", R3, 3, &b);
	struct smtpc_reply mail, rcpt[3], data[3];

	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), -ECONNRESET);
	cr_assert_eq(rcpt[0].code, 250);
	cr_assert_str_eq(rcpt[1].text, "421 4.7.0 too many errors");
	for (int i = 0; i < 3; i++)
		cr_assert_str_eq(data[i].text, "421 4.7.0 too many errors");
	cr_assert_eq(rcpt[2].code, 421);
	smtpc_quit(c);
	srv_end(s);
	srv_free(s);
}

Test(smtpc, body_source_error)
{
	static const struct step st[] = {
		GREET,
		EHLO_PLAIN,
		{ "MAIL", "250 ok\r\n" },
		{ "RCPT", "250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ "<hang>", NULL },
		END,
	};
	static uint8_t body[200000];
	struct mem_body b = { .p = body, .n = sizeof(body), .fail = -EBADMSG,
			      .fail_at = 70000 };
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_msg m = msg1("s@x.test", R1, 1, &b);
	struct smtpc_reply mail, rcpt[1], data[1];

	cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), -EBADMSG);
	cr_assert_str_eq(data[0].text, "451 4.3.0 error reading message body");
	smtpc_abort(c);
	srv_end(s);
	srv_free(s);
}

/* ---- reuse --------------------------------------------------------------- */

Test(smtpc, one_connection_three_messages_and_rset)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250 PIPELINING\r\n" },
		{ "MAIL", NULL },
		{ "RCPT", "250 ok\r\n250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 2.0.0 id 1\r\n" },
		{ "RSET", "250 ok\r\n" },
		{ "MAIL", NULL },
		{ "RCPT", "250 ok\r\n250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 2.0.0 id 2\r\n" },
		{ "MAIL", NULL },
		{ "RCPT", "250 ok\r\n250 ok\r\n" },
		{ "DATA", "354 go\r\n" },
		{ ".", "250 2.0.0 id 3\r\n" },
		{ "RSET", "500 what\r\n" },
		{ "<hang>", NULL },
		END,
	};
	static const char *const bodies[] = { "one\r\n", ".two\r\n",
					      "three" };
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_reply mail, rcpt[1], data[1];
	char want[32];

	for (int i = 0; i < 3; i++) {
		struct mem_body b = { .p = (const uint8_t *)bodies[i],
				      .n = strlen(bodies[i]) };
		struct smtpc_msg m = msg1("s@x.test", R1, 1, &b);
		cr_assert_eq(smtpc_send(c, &m, &mail, rcpt, data), 0);
		snprintf(want, sizeof(want), "250 2.0.0 id %d", i + 1);
		cr_assert_str_eq(data[0].text, want);
		if (i == 0)
			cr_assert_eq(smtpc_rset(c), 0);
	}
	cr_assert_eq(smtpc_rset(c), -EPROTO); /* 500: not alive */
	smtpc_abort(c);
	srv_end(s);
	cr_assert_eq(s->n_bodies, 3);
	cr_assert_arr_eq(s->body[0], "one\r\n", 5);
	cr_assert_arr_eq(s->body[1], "..two\r\n", 7);
	cr_assert_arr_eq(s->body[2], "three\r\n", 7);
	srv_free(s);
}

Test(smtpc, connect_fd_on_socketpair)
{
	int sv[2];
	struct smtpc_reply why;
	int err = 0;

	cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	const char *script = "220 pair\r\n250-pair\r\n250 DSN\r\n"
			     "221 bye\r\n";
	cr_assert_eq(write(sv[1], script, strlen(script)),
		     (ssize_t)strlen(script));
	struct smtpc_params p = params(1000, 1000);
	struct smtpc *c = smtpc_connect_fd(sv[0], SMTPC_SMTP, &p, &why, &err);
	cr_assert_not_null(c, "%d %s", err, why.text);
	cr_assert_eq(smtpc_exts(c), SMTPC_EXT_DSN);
	cr_assert_str_eq(smtpc_peer_name(c), "pair");
	smtpc_quit(c);
	char got[64] = { 0 };
	cr_assert_gt(read(sv[1], got, sizeof(got) - 1), 0);
	cr_assert_str_eq(got, "EHLO client.test\r\nQUIT\r\n");
	close(sv[1]);
}

/* ---- against Postfix's smtp-sink ---------------------------------------- */

static pid_t
sink_start(uint16_t *port, const char *dump, bool lmtp)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t sl = sizeof(sin);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	char addr[64];
	pid_t pid;

	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	cr_assert_eq(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
	getsockname(fd, (struct sockaddr *)&sin, &sl);
	close(fd);
	*port = ntohs(sin.sin_port);
	snprintf(addr, sizeof(addr), "127.0.0.1:%u", *port);
	char *argv[] = { "smtp-sink", "-u", "nobody", "-d", (char *)dump,
			 lmtp ? "-L" : "-4", addr, "8", NULL };
	posix_spawn_file_actions_t fa;
	/* its chatter must not mix with the TAP stream on stdout */
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	cr_assert_eq(posix_spawn(&pid, "/usr/sbin/smtp-sink", &fa, NULL,
				 argv, environ),
		     0);
	posix_spawn_file_actions_destroy(&fa);
	/* wait until it listens */
	for (int i = 0; i < 200; i++) {
		fd = socket(AF_INET, SOCK_STREAM, 0);
		int rc = connect(fd, (struct sockaddr *)&sin, sizeof(sin));
		close(fd);
		if (rc == 0)
			return pid;
		usleep(10000);
	}
	kill(pid, SIGTERM);
	waitpid(pid, NULL, 0);
	cr_assert_fail("smtp-sink did not start");
	return -1;
}

static void
sink_deliver(bool lmtp)
{
	char dir[] = "/tmp/smtpc-sink.XXXXXX", tmpl[128], path[512];
	uint16_t port;
	static const char body[] = "Subject: t\r\n\r\n.dot line\r\nend";

	if (access("/usr/sbin/smtp-sink", X_OK) != 0)
		cr_skip_test("/usr/sbin/smtp-sink not installed");
	cr_assert_not_null(mkdtemp(dir));
	chmod(dir, 0777); /* smtp-sink writes as nobody */
	snprintf(tmpl, sizeof(tmpl), "%s/m.", dir);
	pid_t pid = sink_start(&port, tmpl, lmtp);

	struct smtpc_target t = { .proto = lmtp ? SMTPC_LMTP : SMTPC_SMTP,
				  .host = "127.0.0.1", .port = port };
	struct smtpc_params p = params(5000, 5000);
	struct smtpc_reply why, mail, rcpt[2], data[2];
	int err = 0;
	static const char *const r2[] = { "a@y.test", "b@y.test" };
	struct mem_body b = { .p = (const uint8_t *)body,
			      .n = sizeof(body) - 1 };
	struct smtpc_msg m = msg1("s@x.test", r2, 2, &b);
	struct smtpc *c = smtpc_connect(&t, &p, &why, &err);
	cr_assert_not_null(c, "%d %s", err, why.text);
	cr_assert(smtpc_exts(c) & SMTPC_EXT_PIPELINING);
	cr_assert(smtpc_exts(c) & SMTPC_EXT_8BITMIME);
	m.body_type = 2;
	int rc = smtpc_send(c, &m, &mail, rcpt, data);
	smtpc_quit(c);
	kill(pid, SIGTERM);
	waitpid(pid, NULL, 0);
	cr_assert_eq(rc, 0);
	cr_assert_eq(data[0].code, 250, "%s", data[0].text);
	cr_assert_eq(data[1].code, 250, "%s", data[1].text);

	/* the dump holds the body unstuffed, as sent */
	DIR *d = opendir(dir);
	struct dirent *e;
	char got[8192] = { 0 };
	unsigned files = 0;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		FILE *f = fopen(path, "r");
		fread(got, 1, sizeof(got) - 1, f);
		fclose(f);
		unlink(path);
		files++;
	}
	closedir(d);
	rmdir(dir);
	cr_assert_eq(files, 1);
	cr_assert_not_null(strstr(got, "X-Mail-Args: <s@x.test> "
				       "BODY=8BITMIME"), "%s", got);
	cr_assert_not_null(strstr(got, "X-Rcpt-Args: <b@y.test>"));
	cr_assert_not_null(strstr(got, "\n.dot line\nend\n"), "%s", got);
}

Test(smtpc, smtp_sink_delivery)
{
	sink_deliver(false);
}

Test(smtpc, smtp_sink_lmtp_delivery)
{
	sink_deliver(true);
}

/* ---- STARTTLS policies against a server that refuses or misbehaves ---- */

static struct smtpc *
open_tls(struct srv *s, enum smtpc_tls pol, struct smtpc_reply *why,
	 int *err)
{
	struct smtpc_target t;
	struct smtpc_params p = params(5000, 5000);
	char e[200];

	target_of(s, SMTPC_SMTP, &t);
	p.tls = pol;
	p.tls_ctx = smtpc_tls_ctx_new(NULL, e, sizeof(e));
	cr_assert_not_null(p.tls_ctx, "%s", e);
	struct smtpc *c = smtpc_connect(&t, &p, why, err);
	smtpc_tls_ctx_free(p.tls_ctx); /* the connection holds its own ref */
	return c;
}

Test(smtpc, starttls_may_goes_on_in_the_clear_after_454)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250 STARTTLS\r\n" },
		{ "STARTTLS", "454 4.7.0 TLS not available right now\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc_reply why;
	int err = 0;
	struct smtpc *c = open_tls(s, SMTPC_TLS_MAY, &why, &err);

	cr_assert_not_null(c, "may: %d %s", err, why.text);
	cr_assert_str_eq(smtpc_tls_desc(c), "");
	smtpc_quit(c);
	srv_end(s);
	srv_free(s);
}

Test(smtpc, starttls_encrypt_defers_after_454_or_when_not_offered)
{
	static const struct step refused[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250 STARTTLS\r\n" },
		{ "STARTTLS", "454 4.7.0 TLS not available right now\r\n" },
		{ "<hang>", NULL },
		END,
	};
	static const struct step absent[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250 PIPELINING\r\n" },
		{ "<hang>", NULL },
		END,
	};
	struct smtpc_reply why;
	int err = 0;
	struct srv *s = srv_start(refused, false);
	struct smtpc *c = open_tls(s, SMTPC_TLS_ENCRYPT, &why, &err);

	cr_assert_null(c);
	cr_assert_eq(err, -EPROTO);
	cr_assert(strstr(why.text, "4.7.10 TLS is required, but STARTTLS was "
				   "refused: 454"),
		  "%s", why.text);
	srv_end(s);
	srv_free(s);
	s = srv_start(absent, false);
	c = open_tls(s, SMTPC_TLS_VERIFY, &why, &err);
	cr_assert_null(c);
	cr_assert(strstr(why.text, "does not offer STARTTLS"), "%s", why.text);
	srv_end(s);
	srv_free(s);
}

Test(smtpc, starttls_octets_after_the_220_are_refused)
{
	/* A reply injected behind the 220 (read in the clear, then taken
	 * as if it came inside TLS): never. */
	static const struct step st[] = {
		GREET,
		{ "EHLO", "250-mx\r\n250 STARTTLS\r\n" },
		{ "STARTTLS", "220 2.0.0 go ahead\r\n250 2.1.0 injected\r\n" },
		{ "<hang>", NULL },
		END,
	};
	struct smtpc_reply why;
	int err = 0;
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_tls(s, SMTPC_TLS_ENCRYPT, &why, &err);

	cr_assert_null(c);
	cr_assert(strstr(why.text, "octets after the 220"), "%s", why.text);
	srv_end(s);
	srv_free(s);
}

/* ---- several transactions: smtpc_send_many() ----------------------------- */

#define EHLO_PC                                                              \
	{ "EHLO client.test",                                                \
	  "250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n" }
#define EHLO_P { "EHLO client.test", "250-mx.test\r\n250 PIPELINING\r\n" }

static const char *const RA[] = { "a@y.test", "b@y.test" };
static const char *const RC[] = { "c@y.test" };

/* One message of a batch: its body and its reply storage. */
struct bmsg {
	struct mem_body b;
	struct smtpc_msg m;
	struct smtpc_reply rcpt[4], data[4];
};

static void
bm_init(struct smtpc_tx *t, struct bmsg *bm, const char *from,
	const char *const *rcpts, unsigned n, const void *body, size_t len)
{
	memset(bm, 0, sizeof(*bm));
	memset(t, 0, sizeof(*t));
	bm->b.p = body;
	bm->b.n = len;
	bm->m = msg1(from, rcpts, n, &bm->b);
	t->m = &bm->m;
	t->rcpt = bm->rcpt;
	t->data = bm->data;
}

/* body: a string literal or a char array (its length without the NUL) */
#define BM(t, bm, from, r, n, body)                                          \
	bm_init(t, bm, from, r, n, body, sizeof(body) - 1)

static unsigned
lf_in(const void *p, size_t n)
{
	const uint8_t *b = p;
	unsigned k = 0;

	for (size_t i = 0; i < n; i++)
		k += b[i] == '\n';
	return k;
}

/* The server saw exactly want[0..n) after EHLO (lines[1..]). */
static void
lines_are(const struct srv *s, const char *const *want, unsigned n)
{
	cr_assert_eq(s->n_lines, n + 1, "server saw %u lines", s->n_lines);
	for (unsigned i = 0; i < n; i++)
		cr_assert_str_eq(s->lines[i + 1], want[i], "line %u", i + 1);
}

static void
body_is(const struct srv *s, unsigned i, const void *p, size_t n)
{
	cr_assert_eq(s->body_len[i], n, "body %u: %zu octets", i,
		     s->body_len[i]);
	if (n)
		cr_assert_arr_eq(s->body[i], p, n, "body %u", i);
}

/* A reply from the peer (not made up here) with this text. */
static void
peer_said(const struct smtpc_reply *r, const char *text)
{
	cr_assert_str_eq(r->text, text);
	cr_assert_not(r->local, "%s is local", r->text);
}

static void
delivered(const struct smtpc_tx *t, const char *text)
{
	cr_assert_eq(t->rc, 0);
	cr_assert(t->last_out);
	cr_assert_eq(t->mail.code, 250, "%s", t->mail.text);
	for (unsigned i = 0; i < t->m->n_rcpts; i++) {
		cr_assert_eq(t->rcpt[i].code, 250, "%s", t->rcpt[i].text);
		peer_said(&t->data[i], text);
	}
}

static const char B1[] = "Subject: one\r\n\r\n.dot line, not stuffed\r\n";
/* a NUL, a bare LF, a lone '.' line and no final CRLF: BDAT is verbatim */
static const char B2[] = "two\r\n\0nul\n.\r\nno final crlf";
static const char B3[] = "";

/* 1. Three messages, MAIL + RCPTs + BDAT LAST + body each, RSET between
 * them, in one write before any reply; all accepted. */
Test(smtpc, many_bdat_three_messages_one_write)
{
	static const struct step st[] = {
		GREET,
		EHLO_PC,
		{ "MAIL FROM:<s1@x.test>\r\n", NULL },
		{ "RCPT TO:<r@y.test>\r\n", NULL },
		{ "BDAT ", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s2@x.test>\r\n", NULL },
		{ "RCPT TO:<a@y.test>\r\n", NULL },
		{ "RCPT TO:<b@y.test>\r\n", NULL },
		{ "BDAT ", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s3@x.test>\r\n", NULL },
		{ "RCPT TO:<r@y.test>\r\n", NULL },
		{ "BDAT 0 LAST\r\n",
		  "250 2.1.0 s1 ok\r\n250 2.1.5 r ok\r\n"
		  "250 2.0.0 queued as M1\r\n"
		  "250 2.0.0 reset\r\n250 2.1.0 s2 ok\r\n250 2.1.5 a ok\r\n"
		  "250 2.1.5 b ok\r\n250 2.0.0 queued as M2\r\n"
		  "250 2.0.0 reset\r\n250 2.1.0 s3 ok\r\n250 2.1.5 r ok\r\n"
		  "250 2.0.0 queued as M3\r\n" },
		/* the next line is smtpc_rset()'s: the batch sent no RSET
		 * after the last message, every transaction being closed */
		{ "RSET\r\n", "250 2.0.0 still here\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[3];
	struct bmsg bm[3];
	char l1[32], l2[32];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, B1);
	BM(&tx[1], &bm[1], "s2@x.test", RA, 2, B2);
	BM(&tx[2], &bm[2], "s3@x.test", R1, 1, B3);
	cr_assert_eq(smtpc_send_many(c, tx, 3), 0);
	delivered(&tx[0], "250 2.0.0 queued as M1");
	delivered(&tx[1], "250 2.0.0 queued as M2");
	delivered(&tx[2], "250 2.0.0 queued as M3");
	peer_said(&tx[1].mail, "250 2.1.0 s2 ok");
	peer_said(&tx[1].rcpt[1], "250 2.1.5 b ok");
	cr_assert_eq(smtpc_rset(c), 0);
	smtpc_quit(c);
	srv_end(s);

	snprintf(l1, sizeof(l1), "BDAT %zu LAST\r\n", sizeof(B1) - 1);
	snprintf(l2, sizeof(l2), "BDAT %zu LAST\r\n", sizeof(B2) - 1);
	const char *const want[] = {
		"MAIL FROM:<s1@x.test>\r\n", "RCPT TO:<r@y.test>\r\n", l1,
		"RSET\r\n", "MAIL FROM:<s2@x.test>\r\n",
		"RCPT TO:<a@y.test>\r\n", "RCPT TO:<b@y.test>\r\n", l2,
		"RSET\r\n", "MAIL FROM:<s3@x.test>\r\n",
		"RCPT TO:<r@y.test>\r\n", "BDAT 0 LAST\r\n",
		"RSET\r\n", "QUIT\r\n",
	};
	lines_are(s, want, 14);
	/* one write: when MAIL 1 was read, every later command (and body
	 * line) was already there */
	cr_assert_eq(s->ahead[2], 11 + lf_in(B1, sizeof(B1) - 1) +
					  lf_in(B2, sizeof(B2) - 1));
	cr_assert_eq(s->ahead[13], 0);
	cr_assert_eq(s->n_bodies, 3);
	body_is(s, 0, B1, sizeof(B1) - 1);
	body_is(s, 1, B2, sizeof(B2) - 1);
	body_is(s, 2, B3, 0);
	srv_free(s);
}

/* 2. Message 2's MAIL gets a 451; its RCPTs and BDAT, already sent, get
 * 503s. What applies to its recipients is the 451 (retry later), never
 * the 503 (a bounce for a sender only deferred). */
Test(smtpc, many_bdat_mail_refused_its_recipients_get_the_mail_reply)
{
	static const struct step st[] = {
		GREET,
		EHLO_PC,
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT", NULL },
		{ "BDAT ", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s2@", NULL },
		{ "RCPT TO:<a@", NULL },
		{ "RCPT TO:<b@", NULL },
		{ "BDAT ", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s3@", NULL },
		{ "RCPT", NULL },
		{ "BDAT ",
		  "250 ok\r\n250 ok\r\n250 2.0.0 queued as M1\r\n"
		  "250 ok\r\n451 4.3.0 sender check deferred\r\n"
		  "503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
		  "503 5.5.1 need MAIL\r\n"
		  "250 ok\r\n250 ok\r\n250 ok\r\n250 2.0.0 queued as M3\r\n" },
		{ "RSET\r\n", "250 ok\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[3];
	struct bmsg bm[3];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
	BM(&tx[1], &bm[1], "s2@x.test", RA, 2, "two\r\n");
	BM(&tx[2], &bm[2], "s3@x.test", R1, 1, "three\r\n");
	cr_assert_eq(smtpc_send_many(c, tx, 3), 0);
	delivered(&tx[0], "250 2.0.0 queued as M1");
	delivered(&tx[2], "250 2.0.0 queued as M3");
	cr_assert_eq(tx[1].rc, 0);
	peer_said(&tx[1].mail, "451 4.3.0 sender check deferred");
	for (int i = 0; i < 2; i++) {
		peer_said(&tx[1].rcpt[i], "503 5.5.1 need MAIL");
		peer_said(&tx[1].data[i], "451 4.3.0 sender check deferred");
	}
	cr_assert_eq(smtpc_rset(c), 0);
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->n_bodies, 3);
	body_is(s, 0, "one\r\n", 5);
	body_is(s, 2, "three\r\n", 7);
	/* RSET before messages 2 and 3, and smtpc_rset()'s */
	cr_assert_str_eq(s->lines[4], "RSET\r\n");
	cr_assert_str_eq(s->lines[9], "RSET\r\n");
	cr_assert_str_eq(s->lines[13], "RSET\r\n");
	cr_assert_eq(s->n_lines, 15);
	srv_free(s);
}

/* 3. Every RCPT of the last message refused (its BDAT gets the 554 that
 * says so): data[] are the RCPT refusals, and the batch ends with an
 * RSET, the last transaction being possibly open. */
Test(smtpc, many_bdat_last_message_refused_rset_at_the_end)
{
	static const struct step st[] = {
		GREET,
		EHLO_PC,
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT", NULL },
		{ "BDAT ", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s2@", NULL },
		{ "RCPT TO:<a@", NULL },
		{ "RCPT TO:<b@", NULL },
		{ "BDAT ",
		  "250 ok\r\n250 ok\r\n250 2.0.0 queued as M1\r\n"
		  "250 ok\r\n250 ok\r\n550 5.1.1 a unknown\r\n"
		  "450 4.2.1 b try later\r\n"
		  "554 5.5.1 no valid recipients\r\n" },
		/* the batch's own RSET, before it returns */
		{ "RSET\r\n", "250 2.0.0 reset\r\n" },
		{ "RSET\r\n", "250 2.0.0 still here\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[2];
	struct bmsg bm[2];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
	BM(&tx[1], &bm[1], "s2@x.test", RA, 2, "two\r\n");
	cr_assert_eq(smtpc_send_many(c, tx, 2), 0);
	delivered(&tx[0], "250 2.0.0 queued as M1");
	cr_assert_eq(tx[1].rc, 0);
	peer_said(&tx[1].mail, "250 ok");
	peer_said(&tx[1].data[0], "550 5.1.1 a unknown");
	peer_said(&tx[1].data[1], "450 4.2.1 b try later");
	cr_assert_eq(smtpc_rset(c), 0);
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->n_lines, 12);
	cr_assert_str_eq(s->lines[9], "RSET\r\n");
	cr_assert_str_eq(s->lines[10], "RSET\r\n");
	cr_assert_str_eq(s->lines[11], "QUIT\r\n");
	srv_free(s);
}

/* 4. LMTP over a unix socket: after BDAT LAST one reply per accepted
 * recipient, in RCPT order (RFC 2033 4.2), message by message. */
Test(smtpc, many_bdat_lmtp_per_recipient_replies)
{
	static const struct step st[] = {
		GREET,
		{ "LHLO client.test",
		  "250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n" },
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT TO:<a@", NULL },
		{ "RCPT TO:<b@", NULL },
		{ "BDAT 5 LAST\r\n", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s2@", NULL },
		{ "RCPT TO:<c@", NULL },
		{ "BDAT 5 LAST\r\n",
		  "250 ok\r\n250 ok\r\n250 ok\r\n"
		  "250 2.0.0 a delivered\r\n452 4.2.2 b over quota\r\n"
		  "250 ok\r\n250 ok\r\n250 ok\r\n250 2.0.0 c delivered\r\n" },
		{ "RSET\r\n", "250 ok\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, true);
	struct smtpc *c = open_to(s, SMTPC_LMTP);
	struct smtpc_tx tx[2];
	struct bmsg bm[2];

	BM(&tx[0], &bm[0], "s1@x.test", RA, 2, "one\r\n");
	BM(&tx[1], &bm[1], "s2@x.test", RC, 1, "two\r\n");
	cr_assert_eq(smtpc_send_many(c, tx, 2), 0);
	cr_assert_eq(tx[0].rc, 0);
	cr_assert(tx[0].last_out);
	peer_said(&tx[0].data[0], "250 2.0.0 a delivered");
	peer_said(&tx[0].data[1], "452 4.2.2 b over quota");
	delivered(&tx[1], "250 2.0.0 c delivered");
	cr_assert_eq(smtpc_rset(c), 0);
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->ahead[2], 9); /* one write (2 body lines) */
	cr_assert_eq(s->n_bodies, 2);
	body_is(s, 0, "one\r\n", 5);
	body_is(s, 1, "two\r\n", 5);
	srv_free(s);
}

/* LMTP, a message with no recipient accepted in the middle: its BDAT gets
 * one refusal (not one per recipient), which must be read and dropped, or
 * the replies of the next message are taken one off. */
Test(smtpc, many_bdat_lmtp_message_without_recipients)
{
	static const struct step st[] = {
		GREET,
		{ "LHLO client.test",
		  "250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n" },
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT TO:<a@", NULL },
		{ "BDAT ", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s2@", NULL },
		{ "RCPT TO:<a@", NULL },
		{ "RCPT TO:<b@", NULL },
		{ "BDAT ", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s3@", NULL },
		{ "RCPT TO:<c@", NULL },
		{ "BDAT ",
		  "250 ok\r\n250 ok\r\n250 2.0.0 a delivered\r\n"
		  "250 ok\r\n250 ok\r\n550 5.1.1 a unknown\r\n"
		  "550 5.1.1 b unknown\r\n503 5.5.1 no valid recipients\r\n"
		  "250 ok\r\n250 ok\r\n250 ok\r\n250 2.0.0 c delivered\r\n" },
		{ "RSET\r\n", "250 ok\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, true);
	struct smtpc *c = open_to(s, SMTPC_LMTP);
	struct smtpc_tx tx[3];
	struct bmsg bm[3];

	BM(&tx[0], &bm[0], "s1@x.test", RA, 1, "one\r\n");
	BM(&tx[1], &bm[1], "s2@x.test", RA, 2, "two\r\n");
	BM(&tx[2], &bm[2], "s3@x.test", RC, 1, "three\r\n");
	cr_assert_eq(smtpc_send_many(c, tx, 3), 0);
	delivered(&tx[0], "250 2.0.0 a delivered");
	cr_assert_eq(tx[1].rc, 0);
	peer_said(&tx[1].data[0], "550 5.1.1 a unknown");
	peer_said(&tx[1].data[1], "550 5.1.1 b unknown");
	delivered(&tx[2], "250 2.0.0 c delivered");
	cr_assert_eq(smtpc_rset(c), 0);
	smtpc_quit(c);
	srv_end(s);
	srv_free(s);
}

/* 5. PIPELINING without CHUNKING: message i's MAIL, RCPTs and DATA go in
 * the write that carries message i-1's body and final dot. Message 2's
 * DATA is refused: RSET before message 3's MAIL. */
Test(smtpc, many_data_pipelined_with_the_previous_dot)
{
	static const struct step st[] = {
		GREET,
		EHLO_P,
		{ "MAIL FROM:<s1@x.test>\r\n", NULL },
		{ "RCPT TO:<r@y.test>\r\n", NULL },
		{ "DATA\r\n", "250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n" },
		{ ".", NULL },
		{ "MAIL FROM:<s2@x.test>\r\n", NULL },
		{ "RCPT TO:<a@y.test>\r\n", NULL },
		{ "RCPT TO:<b@y.test>\r\n", NULL },
		{ "DATA\r\n",
		  "250 2.0.0 queued as D1\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n"
		  "250 2.1.5 ok\r\n554 5.7.1 no data today\r\n" },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s3@x.test>\r\n", NULL },
		{ "RCPT TO:<r@y.test>\r\n", NULL },
		{ "DATA\r\n",
		  "250 2.0.0 reset\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n"
		  "354 go\r\n" },
		{ ".", "250 2.0.0 queued as D3\r\n" },
		{ "RSET\r\n", "250 ok\r\n" },
		QUIT,
		END,
	};
	static const char b1[] = ".hidden\r\n..two dots\r\nno final crlf";
	static const char w1[] = "..hidden\r\n...two dots\r\nno final crlf\r\n";
	static const char b3[] = ".\r\nend\r\n";
	static const char w3[] = "..\r\nend\r\n";
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[3];
	struct bmsg bm[3];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, b1);
	BM(&tx[1], &bm[1], "s2@x.test", RA, 2, "never sent\r\n");
	BM(&tx[2], &bm[2], "s3@x.test", R1, 1, b3);
	cr_assert_eq(smtpc_send_many(c, tx, 3), 0);
	delivered(&tx[0], "250 2.0.0 queued as D1");
	delivered(&tx[2], "250 2.0.0 queued as D3");
	cr_assert_eq(tx[1].rc, 0);
	cr_assert_not(tx[1].last_out);
	peer_said(&tx[1].mail, "250 2.1.0 ok");
	for (int i = 0; i < 2; i++) {
		peer_said(&tx[1].rcpt[i], "250 2.1.5 ok");
		peer_said(&tx[1].data[i], "554 5.7.1 no data today");
	}
	cr_assert_eq(smtpc_rset(c), 0);
	smtpc_quit(c);
	srv_end(s);
	const char *const want[] = {
		"MAIL FROM:<s1@x.test>\r\n", "RCPT TO:<r@y.test>\r\n",
		"DATA\r\n", "MAIL FROM:<s2@x.test>\r\n",
		"RCPT TO:<a@y.test>\r\n", "RCPT TO:<b@y.test>\r\n",
		"DATA\r\n", "RSET\r\n", "MAIL FROM:<s3@x.test>\r\n",
		"RCPT TO:<r@y.test>\r\n", "DATA\r\n", "RSET\r\n", "QUIT\r\n",
	};
	lines_are(s, want, 13);
	cr_assert_eq(s->ahead[2], 2);  /* MAIL, RCPT, DATA: one write */
	cr_assert_eq(s->ahead[5], 4);  /* message 2's envelope behind dot 1 */
	cr_assert_eq(s->ahead[10], 3); /* RSET, MAIL, RCPT, DATA */
	cr_assert_eq(s->ahead[14], 0);
	cr_assert_eq(s->n_bodies, 2);
	body_is(s, 0, w1, sizeof(w1) - 1);
	body_is(s, 1, w3, sizeof(w3) - 1);
	srv_free(s);
}

/* Without CHUNKING, a message whose recipients were all refused: DATA was
 * pipelined anyway; a peer that says 354 to it gets an empty message (its
 * reply dropped), then RSET, which goes out with the next envelope. */
Test(smtpc, many_data_no_recipient_accepted_354_anyway)
{
	static const struct step st[] = {
		GREET,
		EHLO_P,
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT", NULL },
		{ "DATA\r\n", "250 ok\r\n550 5.1.1 r unknown\r\n354 go\r\n" },
		{ ".", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s2@", NULL },
		{ "RCPT", NULL },
		{ "DATA\r\n",
		  "554 5.5.1 no valid recipients\r\n250 reset\r\n250 ok\r\n"
		  "250 ok\r\n354 go\r\n" },
		{ ".", "250 2.0.0 queued as E2\r\n" },
		{ "RSET\r\n", "250 ok\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[2];
	struct bmsg bm[2];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "not for anyone\r\n");
	BM(&tx[1], &bm[1], "s2@x.test", R1, 1, "two\r\n");
	cr_assert_eq(smtpc_send_many(c, tx, 2), 0);
	cr_assert_eq(tx[0].rc, 0);
	cr_assert_not(tx[0].last_out);
	peer_said(&tx[0].data[0], "550 5.1.1 r unknown");
	delivered(&tx[1], "250 2.0.0 queued as E2");
	cr_assert_eq(smtpc_rset(c), 0);
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->ahead[5], 4);
	cr_assert_eq(s->n_bodies, 2);
	body_is(s, 0, "", 0);
	body_is(s, 1, "two\r\n", 5);
	srv_free(s);
}

/* 6. Message 2's body cannot be read: it fails alone, before any of it
 * is sent; the others go, the connection stays usable. Also for a body
 * source shorter or longer than m->size (BDAT promises the size). */
Test(smtpc, many_bdat_unreadable_body_fails_that_message_alone)
{
	static const struct step st[] = {
		GREET,
		EHLO_PC,
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT", NULL },
		{ "BDAT 5 LAST\r\n", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s3@", NULL },
		{ "RCPT", NULL },
		{ "BDAT 7 LAST\r\n",
		  "250 ok\r\n250 ok\r\n250 2.0.0 queued as M1\r\n"
		  "250 ok\r\n250 ok\r\n250 ok\r\n250 2.0.0 queued as M3\r\n" },
		{ "RSET\r\n", "250 ok\r\n" },
		QUIT,
		END,
	};

	for (int how = 0; how < 3; how++) {
		struct srv *s = srv_start(st, false);
		struct smtpc *c = open_to(s, SMTPC_SMTP);
		struct smtpc_tx tx[3];
		struct bmsg bm[3];

		BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
		BM(&tx[1], &bm[1], "s2@x.test", RA, 2, "two two\r\n");
		BM(&tx[2], &bm[2], "s3@x.test", R1, 1, "three\r\n");
		if (how == 0) {
			bm[1].b.fail = -EIO;
			bm[1].b.fail_at = 4; /* after a first piece */
			bm[1].b.piece = 4;
		} else {
			bm[1].m.size += how == 1 ? 1 : -1;
		}
		cr_assert_eq(smtpc_send_many(c, tx, 3), 0, "case %d", how);
		delivered(&tx[0], "250 2.0.0 queued as M1");
		delivered(&tx[2], "250 2.0.0 queued as M3");
		cr_assert_eq(tx[1].rc, -EIO, "case %d: %d", how, tx[1].rc);
		cr_assert_not(tx[1].last_out);
		cr_assert(tx[1].mail.local);
		for (int i = 0; i < 2; i++) {
			cr_assert(tx[1].data[i].local);
			cr_assert_str_eq(tx[1].data[i].text,
					 "451 4.3.0 error reading message "
					 "body");
			cr_assert_eq(tx[1].rcpt[i].code, 451);
		}
		cr_assert_eq(smtpc_rset(c), 0);
		smtpc_quit(c);
		srv_end(s);
		for (unsigned i = 0; i < s->n_lines; i++)
			cr_assert_null(strstr(s->lines[i], "s2@"), "%s",
				       s->lines[i]);
		cr_assert_eq(s->n_lines, 10);
		cr_assert_eq(s->n_bodies, 2);
		body_is(s, 0, "one\r\n", 5);
		body_is(s, 1, "three\r\n", 7);
		srv_free(s);
	}
}

/* 7. The peer closes after answering message 1: message 1 has its final
 * reply, rc 0; messages 2 and 3 (their BDAT LAST sent, so maybe held by
 * the peer: last_out) fail with local 4xx replies. */
Test(smtpc, many_bdat_peer_closes_after_the_first_message)
{
	static const struct step st[] = {
		GREET,
		EHLO_PC,
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT", NULL },
		{ "BDAT ", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s2@", NULL },
		{ "RCPT", NULL },
		{ "RCPT", NULL },
		{ "BDAT ", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s3@", NULL },
		{ "RCPT", NULL },
		{ "BDAT ", "250 ok\r\n250 ok\r\n250 2.0.0 queued as M1\r\n" },
		{ "<close>", NULL },
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[3];
	struct bmsg bm[3];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
	BM(&tx[1], &bm[1], "s2@x.test", RA, 2, "two\r\n");
	BM(&tx[2], &bm[2], "s3@x.test", R1, 1, "three\r\n");
	cr_assert_eq(smtpc_send_many(c, tx, 3), -ECONNRESET);
	delivered(&tx[0], "250 2.0.0 queued as M1");
	for (int k = 1; k < 3; k++) {
		cr_assert_eq(tx[k].rc, -ECONNRESET);
		cr_assert(tx[k].last_out, "message %d", k + 1);
		cr_assert(tx[k].mail.local);
		cr_assert_eq(tx[k].mail.code, 421);
		for (unsigned i = 0; i < tx[k].m->n_rcpts; i++) {
			cr_assert(tx[k].data[i].local);
			cr_assert_str_eq(tx[k].data[i].text,
					 "421 4.4.2 connection lost during "
					 "RSET");
		}
	}
	cr_assert_eq(smtpc_rset(c), -ENOTCONN); /* broken */
	smtpc_abort(c);
	srv_end(s);
	cr_assert_eq(s->n_bodies, 3);
	srv_free(s);
}

static uint8_t *
big_body(size_t n, unsigned seed)
{
	uint8_t *p = malloc(n);

	for (size_t i = 0; i < n; i++)
		p[i] = (uint8_t)rand_r(&seed);
	return p;
}

/* The same, a message over 64 KiB (sent alone, after the batch) waiting
 * its turn: it never reached the peer, last_out false; message 2 did. */
Test(smtpc, many_bdat_peer_closes_before_the_big_message)
{
	static const struct step st[] = {
		GREET,
		EHLO_PC,
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT", NULL },
		{ "BDAT ", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s2@", NULL },
		{ "RCPT", NULL },
		{ "BDAT ", "250 ok\r\n250 ok\r\n250 2.0.0 queued as M1\r\n" },
		{ "<close>", NULL },
		END,
	};
	size_t n = 70000;
	uint8_t *big = big_body(n, 3);
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[3];
	struct bmsg bm[3];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
	BM(&tx[1], &bm[1], "s2@x.test", R1, 1, "two\r\n");
	bm_init(&tx[2], &bm[2], "s3@x.test", R1, 1, big, n);
	cr_assert_eq(smtpc_send_many(c, tx, 3), -ECONNRESET);
	delivered(&tx[0], "250 2.0.0 queued as M1");
	cr_assert(tx[1].last_out);
	cr_assert_not(tx[2].last_out);
	for (int k = 1; k < 3; k++) {
		cr_assert_eq(tx[k].rc, -ECONNRESET);
		cr_assert_eq(tx[k].mail.code, 421);
		cr_assert(tx[k].data[0].local);
		cr_assert_eq(tx[k].data[0].code / 100, 4, "%s",
			     tx[k].data[0].text);
	}
	smtpc_abort(c);
	srv_end(s);
	cr_assert_eq(s->n_lines, 8); /* nothing of message 3 */
	free(big);
	srv_free(s);
}

/* Without CHUNKING: the peer closes having read dot 1 and message 2's
 * envelope. Message 1 may have been taken (last_out), 2 and 3 not. */
Test(smtpc, many_data_peer_closes_after_the_first_dot)
{
	static const struct step st[] = {
		GREET,
		EHLO_P,
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT", NULL },
		{ "DATA\r\n", "250 ok\r\n250 ok\r\n354 go\r\n" },
		{ ".", NULL },
		{ "MAIL FROM:<s2@", NULL },
		{ "RCPT", NULL },
		{ "DATA\r\n", NULL },
		{ "<close>", NULL },
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[3];
	struct bmsg bm[3];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
	BM(&tx[1], &bm[1], "s2@x.test", R1, 1, "two\r\n");
	BM(&tx[2], &bm[2], "s3@x.test", RA, 2, "three\r\n");
	cr_assert_eq(smtpc_send_many(c, tx, 3), -ECONNRESET);
	cr_assert(tx[0].last_out);
	cr_assert_not(tx[1].last_out);
	cr_assert_not(tx[2].last_out);
	cr_assert_str_eq(tx[0].data[0].text,
			 "421 4.4.2 connection lost during end of data");
	for (int k = 0; k < 3; k++) {
		cr_assert_eq(tx[k].rc, -ECONNRESET, "message %d", k + 1);
		for (unsigned i = 0; i < tx[k].m->n_rcpts; i++) {
			cr_assert(tx[k].data[i].local);
			cr_assert_eq(tx[k].data[i].code, 421);
		}
	}
	cr_assert_eq(smtpc_rset(c), -ENOTCONN);
	smtpc_abort(c);
	srv_end(s);
	srv_free(s);
}

/* 8. A message over 64 KiB in a BDAT batch goes alone with smtpc_send()
 * (BDAT chunks, each awaiting its reply), in its turn; the batch goes on
 * after it, in order. */
Test(smtpc, many_bdat_big_message_goes_alone_in_its_turn)
{
	static const struct step st[] = {
		GREET,
		EHLO_PC,
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT", NULL },
		/* message 1 closed its transaction: no RSET */
		{ "BDAT 5 LAST\r\n",
		  "250 ok\r\n250 ok\r\n250 2.0.0 queued as M1\r\n" },
		{ "MAIL FROM:<s2@", NULL },
		{ "RCPT", "250 ok\r\n250 ok\r\n" },
		{ "BDAT 4464\r\n", "250 2.0.0 chunk\r\n" },
		{ "BDAT 65536 LAST\r\n", "250 2.0.0 queued as M2\r\n" },
		/* after one sent alone, an RSET first (as in the pipeline:
		 * a refusal may have left its transaction open) */
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s3@", NULL },
		{ "RCPT", NULL },
		{ "BDAT 7 LAST\r\n",
		  "250 ok\r\n250 ok\r\n250 ok\r\n"
		  "250 2.0.0 queued as M3\r\n" },
		{ "RSET\r\n", "250 ok\r\n" },
		QUIT,
		END,
	};
	size_t n = 70000;
	uint8_t *big = big_body(n, 5);
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[3];
	struct bmsg bm[3];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
	bm_init(&tx[1], &bm[1], "s2@x.test", R1, 1, big, n);
	BM(&tx[2], &bm[2], "s3@x.test", R1, 1, "three\r\n");
	cr_assert_eq(smtpc_send_many(c, tx, 3), 0);
	delivered(&tx[0], "250 2.0.0 queued as M1");
	delivered(&tx[1], "250 2.0.0 queued as M2");
	delivered(&tx[2], "250 2.0.0 queued as M3");
	cr_assert_eq(smtpc_rset(c), 0);
	smtpc_quit(c);
	srv_end(s);
	/* nothing of message 2 pipelined behind message 1; its BDAT waited
	 * for the envelope's replies, its last chunk for the first's */
	cr_assert_eq(s->ahead[4], 0);
	cr_assert_eq(s->ahead[5], 1);
	cr_assert_eq(s->ahead[6], 0);
	cr_assert_eq(s->ahead[7], 0);
	cr_assert_eq(s->ahead[8], 0);
	/* message 3 pipelined again: MAIL, RCPT, BDAT and its body line
	 * behind the RSET */
	cr_assert_eq(s->ahead[9], 4);
	cr_assert_str_eq(s->lines[4], "MAIL FROM:<s2@x.test>\r\n");
	cr_assert_str_eq(s->lines[8], "RSET\r\n");
	cr_assert_str_eq(s->lines[9], "MAIL FROM:<s3@x.test>\r\n");
	cr_assert_eq(s->n_bodies, 3);
	body_is(s, 0, "one\r\n", 5);
	body_is(s, 1, big, n);
	body_is(s, 2, "three\r\n", 7);
	free(big);
	srv_free(s);
}

/* A body source keeping smtpc_body_fn's promise to it: offsets only grow,
 * and the end is read once. */
struct order_body {
	struct mem_body mb;
	uint64_t next;
	unsigned ends, backwards;
};

static long
order_read(void *ctx, uint64_t off, void *buf, size_t n)
{
	struct order_body *ob = ctx;
	long k;

	if (off < ob->next)
		ob->backwards++;
	k = mem_read(&ob->mb, off, buf, n);
	if (k == 0)
		ob->ends++;
	if (k > 0)
		ob->next = off + (uint64_t)k;
	return k;
}

/* The peer's side of long_envelope_tx()'s message 2: its nine RCPTs,
 * answered (with MAIL's reply first) when the last arrives. */
#define LONG_RCPT_STEPS                                                      \
	{ "RCPT TO:<0", NULL }, { "RCPT TO:<1", NULL },                      \
	{ "RCPT TO:<2", NULL }, { "RCPT TO:<3", NULL },                      \
	{ "RCPT TO:<4", NULL }, { "RCPT TO:<5", NULL },                      \
	{ "RCPT TO:<6", NULL }, { "RCPT TO:<7", NULL },                      \
	{ "RCPT TO:<8",                                                      \
	  "250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n"                 \
	  "250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n" }

/* Message 1 to one recipient; message 2 to nine of 1,900 octets each:
 * over 16 KiB of commands, too long for one pipelined group. */
static void
long_envelope_tx(struct smtpc_tx tx[2], struct bmsg bm[2],
		 struct smtpc_reply rcpt9[9], struct smtpc_reply data9[9])
{
	static char addr[9][1901];
	static const char *r9[9];

	for (int i = 0; i < 9; i++) {
		memset(addr[i], 'a' + i, 1900);
		addr[i][0] = (char)('0' + i);
		memcpy(addr[i] + 1890, "@y.test", 8);
		r9[i] = addr[i];
	}
	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
	BM(&tx[1], &bm[1], "s2@x.test", r9, 1, "two\r\n");
	bm[1].m.n_rcpts = 9;
	tx[1].rcpt = rcpt9;
	tx[1].data = data9;
}

/* A message whose commands exceed what one pipelined group takes (over
 * 16 KiB: nine recipients of 1900 octets) goes alone too, after an RSET
 * when the transaction before it may be open (its recipient refused).
 * Its body source's calls are counted in ob. */
static void
long_envelope(struct order_body *ob)
{
	static const struct step st[] = {
		GREET,
		EHLO_PC,
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT", NULL },
		{ "BDAT 5 LAST\r\n",
		  "250 ok\r\n550 5.1.1 r unknown\r\n"
		  "554 5.5.1 no valid recipients\r\n" },
		{ "RSET\r\n", "250 ok\r\n" },
		{ "MAIL FROM:<s2@", NULL },
		LONG_RCPT_STEPS,
		{ "BDAT 5 LAST\r\n", "250 2.0.0 queued as M2\r\n" },
		{ "RSET\r\n", "250 ok\r\n" },
		QUIT,
		END,
	};
	struct smtpc_reply rcpt9[9], data9[9];
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[2];
	struct bmsg bm[2];

	long_envelope_tx(tx, bm, rcpt9, data9);
	bm[1].m.body = order_read;
	bm[1].m.body_ctx = ob;
	cr_assert_eq(smtpc_send_many(c, tx, 2), 0);
	cr_assert_eq(tx[0].rc, 0);
	peer_said(&tx[0].data[0], "550 5.1.1 r unknown");
	delivered(&tx[1], "250 2.0.0 queued as M2");
	cr_assert_eq(smtpc_rset(c), 0);
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->ahead[4], 0);  /* message 2 not behind message 1 */
	cr_assert_eq(s->ahead[5], 0);  /* the RSET awaited its reply */
	cr_assert_eq(s->ahead[6], 9);  /* smtpc_send() pipelines RCPTs */
	cr_assert_eq(s->ahead[15], 0); /* BDAT awaited their replies */
	cr_assert_eq(s->n_bodies, 2);
	body_is(s, 1, "two\r\n", 5);
	srv_free(s);
}

Test(smtpc, many_bdat_long_envelope_goes_alone)
{
	struct order_body ob = { .mb = { .p = (const uint8_t *)"two\r\n",
					 .n = 5 } };

	long_envelope(&ob);
	cr_assert_geq(ob.ends, 1);
}

/* smtpc_body_fn's promise: increasing offsets, the end read once (the
 * envelope is measured before the body is read: a message sent alone has
 * its body read by smtpc_send() only). */
Test(smtpc, many_bdat_long_envelope_body_read_once)
{
	struct order_body ob = { .mb = { .p = (const uint8_t *)"two\r\n",
					 .n = 5 } };

	long_envelope(&ob);
	cr_assert_eq(ob.backwards, 0, "body read again from the start");
	cr_assert_eq(ob.ends, 1, "end of body read %u times", ob.ends);
}

/* The same without CHUNKING: message 1's only recipient refused, its
 * pipelined DATA refused; message 2's envelope is too long for the
 * pipeline, so it goes alone, after an RSET that closes message 1's
 * transaction (MAIL was accepted). */
Test(smtpc, many_data_long_envelope_goes_alone_after_rset)
{
	static const struct step st[] = {
		GREET,
		EHLO_P,
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT", NULL },
		{ "DATA\r\n",
		  "250 ok\r\n550 5.1.1 r unknown\r\n"
		  "554 5.5.1 no valid recipients\r\n" },
		{ "RSET\r\n", "250 ok\r\n" },
		{ "MAIL FROM:<s2@", NULL },
		LONG_RCPT_STEPS,
		{ "DATA\r\n", "354 go\r\n" },
		{ ".", "250 2.0.0 queued as M2\r\n" },
		{ "RSET\r\n", "250 ok\r\n" },
		QUIT,
		END,
	};
	struct smtpc_reply rcpt9[9], data9[9];
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[2];
	struct bmsg bm[2];

	long_envelope_tx(tx, bm, rcpt9, data9);
	cr_assert_eq(smtpc_send_many(c, tx, 2), 0);
	cr_assert_eq(tx[0].rc, 0);
	cr_assert_not(tx[0].last_out);
	peer_said(&tx[0].rcpt[0], "550 5.1.1 r unknown");
	delivered(&tx[1], "250 2.0.0 queued as M2");
	cr_assert_eq(smtpc_rset(c), 0);
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->ahead[5], 0); /* the RSET awaited its reply */
	cr_assert_eq(s->n_bodies, 1);
	body_is(s, 0, "two\r\n", 5);
	srv_free(s);
}

/* 9. No PIPELINING: smtpc_send() for each message, every command waiting
 * for its reply, no RSET between them. */
Test(smtpc, many_without_pipelining_one_command_at_a_time)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO client.test", "250-mx.test\r\n250 CHUNKING\r\n" },
		{ "MAIL FROM:<s1@", "250 ok\r\n" },
		{ "RCPT TO:<r@", "250 ok\r\n" },
		{ "BDAT 5 LAST\r\n", "250 2.0.0 queued as N1\r\n" },
		{ "MAIL FROM:<s2@", "250 ok\r\n" },
		{ "RCPT TO:<a@", "250 ok\r\n" },
		{ "RCPT TO:<b@", "550 5.1.1 b unknown\r\n" },
		{ "BDAT 5 LAST\r\n", "250 2.0.0 queued as N2\r\n" },
		{ "RSET\r\n", "250 ok\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[2];
	struct bmsg bm[2];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
	BM(&tx[1], &bm[1], "s2@x.test", RA, 2, "two\r\n");
	cr_assert_eq(smtpc_send_many(c, tx, 2), 0);
	delivered(&tx[0], "250 2.0.0 queued as N1");
	cr_assert_eq(tx[1].rc, 0);
	cr_assert(tx[1].last_out);
	peer_said(&tx[1].data[0], "250 2.0.0 queued as N2");
	peer_said(&tx[1].data[1], "550 5.1.1 b unknown");
	cr_assert_eq(smtpc_rset(c), 0);
	smtpc_quit(c);
	srv_end(s);
	for (unsigned i = 2; i <= 9; i++)
		cr_assert_eq(s->ahead[i], 0, "step %u", i);
	const char *const want[] = {
		"MAIL FROM:<s1@x.test>\r\n", "RCPT TO:<r@y.test>\r\n",
		"BDAT 5 LAST\r\n", "MAIL FROM:<s2@x.test>\r\n",
		"RCPT TO:<a@y.test>\r\n", "RCPT TO:<b@y.test>\r\n",
		"BDAT 5 LAST\r\n", "RSET\r\n", "QUIT\r\n",
	};
	lines_are(s, want, 9);
	body_is(s, 0, "one\r\n", 5);
	body_is(s, 1, "two\r\n", 5);
	srv_free(s);
}

/* One message is smtpc_send(): MAIL and RCPT pipelined, BDAT after their
 * replies, no RSET. */
Test(smtpc, many_with_one_message_is_smtpc_send)
{
	static const struct step st[] = {
		GREET,
		EHLO_PC,
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT TO:<r@", "250 ok\r\n250 ok\r\n" },
		{ "BDAT 5 LAST\r\n", "250 2.0.0 queued as O1\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[1];
	struct bmsg bm[1];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
	cr_assert_eq(smtpc_send_many(c, tx, 1), 0);
	delivered(&tx[0], "250 2.0.0 queued as O1");
	cr_assert_eq(smtpc_send_many(c, tx, 0), 0); /* nothing, no I/O */
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->ahead[2], 1);
	cr_assert_eq(s->ahead[3], 0);
	cr_assert_eq(s->n_lines, 5);
	srv_free(s);
}

/* Messages answered here (SMTPUTF8 the peer lacks, a sender holding a
 * control octet) or invalid (no recipient) take no part in the batch:
 * nothing of theirs is sent, and no RSET stands for them. */
Test(smtpc, many_bdat_locally_answered_messages_send_nothing)
{
	static const struct step st[] = {
		GREET,
		EHLO_PC,
		{ "MAIL FROM:<s2@", NULL },
		{ "RCPT", NULL },
		{ "BDAT 5 LAST\r\n", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s5@", NULL },
		{ "RCPT", NULL },
		{ "BDAT 5 LAST\r\n",
		  "250 ok\r\n250 ok\r\n250 2.0.0 queued as L2\r\n"
		  "250 ok\r\n250 ok\r\n250 ok\r\n250 2.0.0 queued as L5\r\n" },
		QUIT,
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[5];
	struct bmsg bm[5];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
	bm[0].m.smtputf8 = true;
	BM(&tx[1], &bm[1], "s2@x.test", R1, 1, "two\r\n");
	BM(&tx[2], &bm[2], "s3@x.test", R1, 1, "three\r\n");
	bm[2].m.n_rcpts = 0;
	BM(&tx[3], &bm[3], "s4\r\nRSET@x.test", R1, 1, "four\r\n");
	BM(&tx[4], &bm[4], "s5@x.test", R1, 1, "fiv\r\n");
	cr_assert_eq(smtpc_send_many(c, tx, 5), 0);
	cr_assert_eq(tx[0].rc, 0);
	cr_assert_not(tx[0].last_out);
	cr_assert(tx[0].data[0].local);
	cr_assert_str_eq(tx[0].data[0].enh, "5.6.7");
	delivered(&tx[1], "250 2.0.0 queued as L2");
	cr_assert_eq(tx[2].rc, -EINVAL);
	cr_assert_eq(tx[3].rc, 0);
	cr_assert(tx[3].data[0].local);
	cr_assert_str_eq(tx[3].data[0].enh, "5.1.7");
	delivered(&tx[4], "250 2.0.0 queued as L5");
	smtpc_quit(c);
	srv_end(s);
	cr_assert_eq(s->n_lines, 9);
	srv_free(s);
}

/* Reply slots a caller reuses (deliver.c retries on a second connection
 * with the same arrays): a failure before a transaction was begun must
 * still leave local 4xx replies in its slots, not the old ones. */
Test(smtpc, many_data_failure_overwrites_stale_slots)
{
	static const struct step st[] = {
		GREET,
		EHLO_P,
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT", NULL },
		{ "DATA\r\n", "250 ok\r\n250 ok\r\n354 go\r\n" },
		{ ".", NULL },
		{ "MAIL FROM:<s2@", NULL },
		{ "RCPT", NULL },
		{ "DATA\r\n", NULL },
		{ "<close>", NULL },
		END,
	};
	struct smtpc_reply stale = { .code = 250, .text = "250 stale" };
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[3];
	struct bmsg bm[3];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
	BM(&tx[1], &bm[1], "s2@x.test", R1, 1, "two\r\n");
	BM(&tx[2], &bm[2], "s3@x.test", RA, 2, "three\r\n");
	for (int k = 0; k < 3; k++) {
		tx[k].mail = stale;
		tx[k].rc = 0;
		tx[k].last_out = true;
		for (int i = 0; i < 2; i++)
			bm[k].rcpt[i] = bm[k].data[i] = stale;
	}
	cr_assert_eq(smtpc_send_many(c, tx, 3), -ECONNRESET);
	cr_assert(tx[0].last_out);
	cr_assert_not(tx[1].last_out);
	cr_assert_not(tx[2].last_out);
	for (int k = 0; k < 3; k++) {
		cr_assert_eq(tx[k].rc, -ECONNRESET, "message %d", k + 1);
		for (unsigned i = 0; i < tx[k].m->n_rcpts; i++) {
			cr_assert(tx[k].data[i].local, "%d: %s", k,
				  tx[k].data[i].text);
			cr_assert_eq(tx[k].data[i].code, 421);
		}
	}
	cr_assert(tx[2].mail.local);
	smtpc_abort(c);
	srv_end(s);
	srv_free(s);
}

/* ---- a lazy peer: it answers only once the client stops sending ---------- */

/*
 * Pipelining without bounds fills both directions with a peer that writes
 * its replies with blocking writes (RFC 2920 3.1). This peer reads all it
 * is sent and answers only after 50 ms of silence, so each burst it sees
 * is what the client sent before waiting for replies: a batch must come
 * in several bursts, each within the limits.
 */
#define LAZY_BURSTS 64

struct lazy {
	int lfd, fd;
	uint16_t port;
	pthread_t th;
	unsigned n_mail, n_rset, n_quit, n_bursts;
	unsigned burst_cmds[LAZY_BURSTS];
	size_t burst_bytes[LAZY_BURSTS];
	uint8_t *body; /* every BDAT payload, in order */
	size_t body_len;
	char err[128];
};

/* Replies held back until the client falls silent. */
struct held {
	char *p;
	size_t len, cap;
};

static void
lazy_out(struct held *h, const char *r)
{
	size_t k = strlen(r);

	if (h->len + k > h->cap) {
		h->cap = (h->len + k) * 2;
		h->p = realloc(h->p, h->cap);
	}
	memcpy(h->p + h->len, r, k);
	h->len += k;
}

static void *
lazy_main(void *arg)
{
	struct lazy *z = arg;
	struct pollfd pfd = { .fd = z->lfd, .events = POLLIN };
	uint8_t *in = NULL;
	struct held out = { 0 };
	size_t in_len = 0, in_cap = 0;
	size_t bdat_left = 0, bytes = 0;
	unsigned cmds = 0;

	if (poll(&pfd, 1, 10000) != 1 ||
	    (z->fd = accept(z->lfd, NULL, NULL)) < 0) {
		snprintf(z->err, sizeof(z->err), "no client");
		return NULL;
	}
	send(z->fd, "220 lazy\r\n", 10, MSG_NOSIGNAL);
	for (;;) {
		struct pollfd p = { .fd = z->fd, .events = POLLIN };
		size_t pos = 0;
		ssize_t k;
		int r = poll(&p, 1, 50);

		if (r == 0) {
			if (!out.len)
				continue;
			if (z->n_bursts < LAZY_BURSTS) {
				z->burst_cmds[z->n_bursts] = cmds;
				z->burst_bytes[z->n_bursts] = bytes;
			}
			z->n_bursts++;
			send(z->fd, out.p, out.len, MSG_NOSIGNAL);
			out.len = bytes = cmds = 0;
			continue;
		}
		if (in_cap - in_len < 65536) {
			in_cap = in_cap * 2 + 65536;
			in = realloc(in, in_cap);
		}
		k = recv(z->fd, in + in_len, in_cap - in_len, 0);
		if (k <= 0)
			break;
		in_len += (size_t)k;
		bytes += (size_t)k;
		for (;;) {
			uint8_t *nl;
			const char *l;

			if (bdat_left) {
				size_t t = in_len - pos < bdat_left
						   ? in_len - pos
						   : bdat_left;
				z->body = realloc(z->body, z->body_len + t + 1);
				memcpy(z->body + z->body_len, in + pos, t);
				z->body_len += t;
				pos += t;
				bdat_left -= t;
				if (bdat_left)
					break;
				lazy_out(&out, "250 2.0.0 queued\r\n");
				continue;
			}
			nl = memchr(in + pos, '\n', in_len - pos);
			if (!nl)
				break;
			l = (const char *)in + pos;
			pos = (size_t)(nl - in) + 1;
			cmds++;
			if (!strncmp(l, "EHLO", 4)) {
				lazy_out(&out, "250-lazy\r\n250-PIPELINING\r\n"
					 "250 CHUNKING\r\n");
			} else if (!strncmp(l, "MAIL", 4)) {
				z->n_mail++;
				lazy_out(&out, "250 ok\r\n");
			} else if (!strncmp(l, "RCPT", 4)) {
				lazy_out(&out, "250 ok\r\n");
			} else if (!strncmp(l, "RSET", 4)) {
				z->n_rset++;
				lazy_out(&out, "250 ok\r\n");
			} else if (!strncmp(l, "BDAT ", 5)) {
				bdat_left = strtoull(l + 5, NULL, 10);
				if (!bdat_left)
					lazy_out(&out, "250 2.0.0 queued\r\n");
			} else if (!strncmp(l, "QUIT", 4)) {
				z->n_quit++;
				lazy_out(&out, "221 bye\r\n");
				send(z->fd, out.p, out.len, MSG_NOSIGNAL);
				goto out_close;
			} else {
				snprintf(z->err, sizeof(z->err),
					 "unexpected %.40s", l);
				lazy_out(&out, "500 what\r\n");
			}
		}
		memmove(in, in + pos, in_len - pos);
		in_len -= pos;
	}
out_close:
	close(z->fd);
	free(in);
	free(out.p);
	return NULL;
}

static struct lazy *
lazy_start(void)
{
	struct lazy *z = calloc(1, sizeof(*z));
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t sl = sizeof(sin);

	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	z->lfd = socket(AF_INET, SOCK_STREAM, 0);
	cr_assert_eq(bind(z->lfd, (struct sockaddr *)&sin, sizeof(sin)), 0);
	getsockname(z->lfd, (struct sockaddr *)&sin, &sl);
	z->port = ntohs(sin.sin_port);
	cr_assert_eq(listen(z->lfd, 1), 0);
	cr_assert_eq(pthread_create(&z->th, NULL, lazy_main, z), 0);
	return z;
}

static void
lazy_end(struct lazy *z)
{
	pthread_join(z->th, NULL);
	close(z->lfd);
	cr_assert_str_empty(z->err, "lazy peer: %s", z->err);
	cr_assert_eq(z->n_quit, 1);
}

/* n messages of size octets each to a lazy peer, all accepted; returns
 * the peer for its counts. */
static struct lazy *
lazy_batch(unsigned n, size_t size)
{
	struct lazy *z = lazy_start();
	struct smtpc_target t = { .proto = SMTPC_SMTP, .host = "127.0.0.1",
				  .port = z->port };
	struct smtpc_params p = params(5000, 5000);
	struct smtpc_reply why;
	int err = 0;
	struct smtpc *c = smtpc_connect(&t, &p, &why, &err);
	struct smtpc_tx *tx = calloc(n, sizeof(*tx));
	struct bmsg *bm = calloc(n, sizeof(*bm));
	uint8_t *all = big_body(n * size, 11);

	cr_assert_not_null(c, "%d %s", err, why.text);
	for (unsigned i = 0; i < n; i++)
		bm_init(&tx[i], &bm[i], "s@x.test", R1, 1, all + i * size,
			size);
	cr_assert_eq(smtpc_send_many(c, tx, n), 0);
	for (unsigned i = 0; i < n; i++)
		delivered(&tx[i], "250 2.0.0 queued");
	smtpc_quit(c);
	lazy_end(z);
	cr_assert_eq(z->n_mail, n);
	cr_assert_eq(z->n_rset, n - 1);
	cr_assert_eq(z->body_len, n * size);
	cr_assert_arr_eq(z->body, all, n * size);
	free(all);
	free(bm);
	free(tx);
	return z;
}

static void
lazy_free(struct lazy *z)
{
	free(z->body);
	free(z);
}

/* 100 small messages: 399 commands. Replies are awaited before 128 are
 * outstanding (give or take the message that crosses the line: 4
 * commands), so they come in at least 4 bursts after EHLO's. */
Test(smtpc, many_bdat_rounds_bounded_by_commands)
{
	struct lazy *z = lazy_batch(100, 6);
	unsigned max = 0;

	cr_assert_leq(z->n_bursts, LAZY_BURSTS);
	for (unsigned i = 1; i < z->n_bursts; i++)
		if (z->burst_cmds[i] > max)
			max = z->burst_cmds[i];
	cr_assert_eq(z->burst_cmds[0], 1); /* EHLO */
	cr_assert_geq(z->n_bursts, 5, "%u bursts", z->n_bursts);
	cr_assert_leq(max, 128 + 3, "a burst of %u commands", max);
	lazy_free(z);
}

/* 20 messages of 40000 octets: 800 KB. Replies are awaited before 256
 * KiB are outstanding (give or take the message crossing the line). */
Test(smtpc, many_bdat_rounds_bounded_by_bytes)
{
	struct lazy *z = lazy_batch(20, 40000);
	size_t max = 0;

	cr_assert_leq(z->n_bursts, LAZY_BURSTS);
	for (unsigned i = 1; i < z->n_bursts; i++)
		if (z->burst_bytes[i] > max)
			max = z->burst_bytes[i];
	cr_assert_geq(z->n_bursts, 4, "%u bursts", z->n_bursts);
	cr_assert_leq(max, 256 * 1024 + 40000 + 4096, "a burst of %zu", max);
	lazy_free(z);
}

/* ---- a cached connection, and a peer out of step (review 2026-12-05) --- */

/* The peer closed the idle connection (after a 421, or without a word):
 * smtpc_reusable() says so before anything is sent, so that the next
 * batch goes to a new connection instead of being charged the stale 421
 * or a lost write. A connection with nothing pending is reusable. */
Test(smtpc, reusable_only_with_nothing_pending)
{
	static const struct step said421[] = {
		GREET,
		EHLO_PC,
		{ NULL, "421 4.4.2 mx.test Error: timeout exceeded\r\n" },
		{ "<close>", NULL },
		END,
	};
	static const struct step quiet[] = {
		GREET,
		EHLO_PC,
		{ "<hang>", NULL },
		END,
	};
	struct srv *s = srv_start(said421, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);

	srv_end(s); /* it said 421 and closed */
	cr_assert_not(smtpc_reusable(c), "a 421 waits on the socket");
	cr_assert_eq(smtpc_rset(c), -ENOTCONN, "and it is broken now");
	smtpc_abort(c);
	srv_free(s);

	s = srv_start(quiet, false);
	c = open_to(s, SMTPC_SMTP);
	cr_assert(smtpc_reusable(c), "nothing pending: reusable");
	cr_assert(smtpc_reusable(c), "asking twice changes nothing");
	smtpc_abort(c); /* (QUIT would wait out the timeout: it hangs) */
	srv_end(s);
	srv_free(s);
}

/* A batch on a connection whose peer is gone (EPIPE on the first write):
 * nothing went out, so no message is a possible duplicate and each may be
 * tried again on a new connection (last_out false). Before, last_out was
 * set when the final octets were queued, not written. */
Test(smtpc, many_bdat_write_fails_nothing_went_out)
{
	int sv[2], err = 0;
	struct smtpc_reply why;
	struct smtpc_tx tx[2];
	struct bmsg bm[2];
	char buf[512];
	const char *script = "220 pair\r\n250-pair\r\n250-PIPELINING\r\n"
			     "250 CHUNKING\r\n";

	cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	cr_assert_eq(write(sv[1], script, strlen(script)),
		     (ssize_t)strlen(script));
	struct smtpc_params p = params(1000, 1000);
	struct smtpc *c = smtpc_connect_fd(sv[0], SMTPC_SMTP, &p, &why, &err);
	cr_assert_not_null(c, "%d %s", err, why.text);
	cr_assert_gt(read(sv[1], buf, sizeof(buf)), 0); /* its EHLO */
	close(sv[1]);
	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
	BM(&tx[1], &bm[1], "s2@x.test", R1, 1, "two\r\n");
	cr_assert_lt(smtpc_send_many(c, tx, 2), 0);
	for (int k = 0; k < 2; k++) {
		cr_assert_lt(tx[k].rc, 0);
		cr_assert_not(tx[k].last_out, "message %d: nothing was written",
			      k + 1);
		cr_assert(tx[k].mail.local);
	}
	smtpc_abort(c);
}

/* A peer that answers BDAT LAST twice: every later reply would belong to
 * the command before it (message 2's 554 read as delivered, message 3
 * bounced with it). The reply nothing asked for, still waiting when the
 * batch ends, breaks the connection and defers the whole batch, each
 * message counted as possibly delivered; none is taken as delivered or
 * bounced on such replies. */
Test(smtpc, many_bdat_reply_too_many_defers_the_batch)
{
	static const struct step st[] = {
		GREET,
		EHLO_PC,
		{ "MAIL FROM:<s1@", NULL },
		{ "RCPT", NULL },
		{ "BDAT ", NULL },
		{ "RSET\r\n", NULL },
		{ "MAIL FROM:<s2@", NULL },
		{ "RCPT", NULL },
		{ "BDAT ",
		  "250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.0.0 queued as M1\r\n"
		  "250 2.0.0 queued as M1 (again)\r\n"
		  "250 2.0.0 reset\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n"
		  "554 5.7.1 message 2 rejected\r\n" },
		{ "<hang>", NULL },
		END,
	};
	struct srv *s = srv_start(st, false);
	struct smtpc *c = open_to(s, SMTPC_SMTP);
	struct smtpc_tx tx[2];
	struct bmsg bm[2];

	BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
	BM(&tx[1], &bm[1], "s2@x.test", R1, 1, "two\r\n");
	/* let every reply arrive before the client reads them */
	cr_assert_eq(smtpc_send_many(c, tx, 2), -EPROTO);
	for (int k = 0; k < 2; k++) {
		cr_assert_eq(tx[k].rc, -EPROTO, "message %d", k + 1);
		cr_assert(tx[k].last_out, "message %d went out", k + 1);
		cr_assert(tx[k].data[0].local);
		cr_assert_eq(tx[k].data[0].code, 451, "%s",
			     tx[k].data[0].text);
		cr_assert(strstr(tx[k].data[0].text, "out of step"), "%s",
			  tx[k].data[0].text);
	}
	cr_assert_not(smtpc_reusable(c));
	smtpc_abort(c);
	srv_end(s);
	srv_free(s);
}

/* A reply nothing asked for already waiting behind the EHLO reply (a peer
 * or middlebox that answers twice): nothing is sent, every recipient gets
 * a local 451, the connection is done. Before, each reply was read as the
 * one to the command before it: MAIL took the stray line, BDAT LAST its
 * RCPT's 250, and the message the peer refused (554) counted delivered. */
Test(smtpc, a_reply_before_the_first_command_sends_nothing)
{
	static const struct step st[] = {
		GREET,
		{ "EHLO client.test",
		  "250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
		  "250 2.0.0 stray\r\n" },
		{ "<hang>", NULL },
		END,
	};

	for (unsigned many = 0; many < 2; many++) {
		struct srv *s = srv_start(st, false);
		struct smtpc *c = open_to(s, SMTPC_SMTP);
		struct smtpc_tx tx[2];
		struct bmsg bm[2];

		BM(&tx[0], &bm[0], "s1@x.test", R1, 1, "one\r\n");
		BM(&tx[1], &bm[1], "s2@x.test", R1, 1, "two\r\n");
		if (many) {
			cr_assert_eq(smtpc_send_many(c, tx, 2), -EPROTO);
		} else {
			tx[0].rc = smtpc_send(c, tx[0].m, &tx[0].mail,
					      tx[0].rcpt, tx[0].data);
			cr_assert_eq(tx[0].rc, -EPROTO);
		}
		cr_assert(tx[0].data[0].local);
		cr_assert_eq(tx[0].data[0].code, 451, "%s", tx[0].data[0].text);
		cr_assert(strstr(tx[0].data[0].text, "out of step"));
		/* the next one finds the connection done: deferred too */
		cr_assert(!many || (tx[1].data[0].local &&
				    tx[1].data[0].code / 100 == 4));
		cr_assert_not(smtpc_reusable(c));
		smtpc_abort(c);
		srv_end(s);
		cr_assert_eq(s->n_lines, 1, "sent after the EHLO: %s",
			     s->n_lines > 1 ? s->lines[1] : "");
		srv_free(s);
	}
}

/* LMTP over TCP follows the route's TLS policy as SMTP does: with encrypt
 * or verify and no STARTTLS offered nothing is sent in the clear. (It went
 * out in the clear, logged tls="none".) */
Test(smtpc, lmtp_over_tcp_required_tls_not_offered_defers)
{
	static const struct step st[] = {
		GREET,
		{ "LHLO client.test", "250-mx.test\r\n250 PIPELINING\r\n" },
		{ "<hang>", NULL },
		END,
	};
	const enum smtpc_tls pols[] = { SMTPC_TLS_ENCRYPT, SMTPC_TLS_VERIFY };

	for (unsigned k = 0; k < 2; k++) {
		struct srv *s = srv_start(st, false);
		struct smtpc_target t;
		struct smtpc_params p = params(5000, 5000);
		struct smtpc_reply why;
		char e[200];
		int err = 0;

		target_of(s, SMTPC_LMTP, &t);
		p.tls = pols[k];
		p.tls_ctx = smtpc_tls_ctx_new(NULL, e, sizeof(e));
		cr_assert_not_null(p.tls_ctx, "%s", e);
		struct smtpc *c = smtpc_connect(&t, &p, &why, &err);
		smtpc_tls_ctx_free(p.tls_ctx);
		cr_assert_null(c, "policy %d: connected in the clear", pols[k]);
		cr_assert_eq(err, -EPROTO);
		cr_assert(strstr(why.text, "4.7.10") &&
			  strstr(why.text, "does not offer STARTTLS"),
			  "%s", why.text);
		srv_end(s);
		srv_free(s);
	}
}
