/*
 * The control socket's queue.cat stream (control/ctlsock.c), against a
 * real server on a unix socket in a temporary directory and a fake queue:
 * the cp_* functions ctlsock calls are defined here, and the message is a
 * byte pattern produced by cp_queue_cat_read(), which counts what it was
 * asked for. So the tests see what a client sees (chunk lines, then one
 * terminating line) and what the server did behind it (how far it read
 * ahead of its client, whether it gave the message back).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "../fdexhaust.h"
#include "cplane.h"
#include "ctljson.h"
#include "ctlsock.h"
#include "dlog.h"

TestSuite(ctlsock);

#define PIECE (48u * 1024u) /* CTL_CAT_PIECE: a chunk line's raw bytes */

/* ---- the fake queue ------------------------------------------------- */

/* One message, MSG_ID; its byte at offset i is pat(i). */
#define MSG_ID 0x0123456789abcdefull

static struct {
	uint64_t size;
	int open_err;          /* cp_queue_cat_open() fails with it */
	uint64_t fail_at;      /* a read reaching this offset fails... */
	int fail_err;          /* ...with this (0: never) */
	int close_err;         /* cp_queue_cat_close()'s result */
	atomic_uint opens, closes;
	atomic_ullong served;  /* bytes handed to the server */
} q;

struct cp_cat {
	uint64_t pos;
};

static uint8_t
pat(uint64_t i)
{
	return (uint8_t)(i * 131u + (i >> 12) + 7u);
}

int
cp_queue_cat_open(struct cplane *cp, uint64_t id, struct cp_cat **out)
{
	(void)cp;
	*out = NULL;
	if (id != MSG_ID)
		return -ENOENT;
	if (q.open_err)
		return q.open_err;
	if (!(*out = calloc(1, sizeof(**out))))
		return -ENOMEM;
	atomic_fetch_add(&q.opens, 1);
	return 0;
}

long
cp_queue_cat_read(struct cp_cat *k, void *buf, size_t n)
{
	uint8_t *b = buf;

	if (n > q.size - k->pos)
		n = (size_t)(q.size - k->pos);
	if (q.fail_err && k->pos + n >= q.fail_at)
		return q.fail_err;
	for (size_t i = 0; i < n; i++)
		b[i] = pat(k->pos + i);
	k->pos += n;
	atomic_fetch_add(&q.served, n);
	return (long)n;
}

int
cp_queue_cat_close(struct cplane *cp, struct cp_cat *k)
{
	(void)cp;
	if (!k)
		return 0;
	free(k);
	atomic_fetch_add(&q.closes, 1);
	return q.close_err;
}

/* The rest of what ctlsock calls: not exercised here. */
void
cp_get_stats(struct cplane *cp, struct cp_stats *st)
{
	(void)cp;
	memset(st, 0, sizeof(*st));
}

/* Two messages: one held (from a@held.test), one deferred. */
int
cp_queue_list(struct cplane *cp, uint64_t *cursor, unsigned max,
	      cp_msg_view_fn fn, void *ctx)
{
	struct cp_msg_view v[2] = {
		{.id = 1, .sender = "a@held.test", .helo = "", .client = "",
		 .envid = "", .held = true, .state = "held"},
		{.id = 2, .sender = "b@other.test", .helo = "", .client = "",
		 .envid = "", .state = "deferred"},
	};
	int r = 0;

	(void)cp, (void)max;
	for (unsigned i = (unsigned)*cursor; i < 2 && r == 0; i++)
		r = fn(ctx, &v[i]);
	*cursor = 2;
	return r;
}

int
cp_queue_show(struct cplane *cp, uint64_t id, cp_msg_view_fn fn, void *ctx)
{
	(void)cp, (void)id, (void)fn, (void)ctx;
	return -ENOENT;
}

int
cp_history(struct cplane *cp, uint64_t id, cp_history_fn fn, void *ctx)
{
	(void)cp, (void)id, (void)fn, (void)ctx;
	return 0;
}

int
cp_queue_action(struct cplane *cp, enum cp_action a, const uint64_t *ids,
		size_t n, const char *to_domain, size_t *affected,
		size_t *unknown)
{
	(void)cp, (void)a, (void)ids, (void)n, (void)to_domain;
	*affected = 0;
	if (unknown)
		*unknown = 0;
	return 0;
}

void
ctl_sources_totals(const struct ctl_sources *src, struct ctl_worker_stats *t)
{
	(void)src;
	memset(t, 0, sizeof(*t));
}

bool
dlog_type_is_public(enum dlog_type t)
{
	(void)t;
	return false;
}

const char *
dlog_type_name(enum dlog_type t)
{
	(void)t;
	return "?";
}

struct metrics_server *
metrics_start(const struct sockaddr *addr, socklen_t addrlen,
	      const char *text, const struct ctl_sources *src,
	      const cpu_set_t *cpus, int *err)
{
	(void)addr, (void)addrlen, (void)text, (void)src, (void)cpus;
	*err = -ENOTSUP;
	return NULL;
}

void
metrics_stop(struct metrics_server *m)
{
	(void)m;
}

/* ---- a server and a client ------------------------------------------ */

static char dir[64], path[96];
static struct ctl_server *sv;

static void
start(uint64_t size)
{
	struct ctl_sources src = {
		.cp = (struct cplane *)&q, /* never dereferenced: the fake */
		.version = "test",
		.transport = "kernel",
		.hostname = "mx.test",
	};
	int err = 0;

	q.size = size;
	strcpy(dir, "/tmp/fd-ctlsock-XXXXXX");
	cr_assert_not_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/c.sock", dir);
	sv = ctl_start(path, "", &src, NULL, &err);
	cr_assert_not_null(sv, "ctl_start: %s", strerror(-err));
}

static void
stop(void)
{
	ctl_stop(sv);
	rmdir(dir);
}

struct client {
	int fd;
	char *buf;
	size_t len, cap;
	struct ctl_json_tok tok[512];
	struct ctl_json j;
};

static void
client_open(struct client *c, int rcvbuf)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};

	memset(c, 0, sizeof(*c));
	c->fd = socket(AF_UNIX, SOCK_STREAM, 0);
	cr_assert_geq(c->fd, 0);
	if (rcvbuf)
		setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf,
			   sizeof(rcvbuf));
	strcpy(sa.sun_path, path);
	cr_assert_eq(connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)), 0,
		     "connect: %s", strerror(errno));
}

static void
client_send(struct client *c, const char *s)
{
	cr_assert_eq(write(c->fd, s, strlen(s)), (ssize_t)strlen(s));
}

/* The next line, parsed into c->j (valid until the next call). */
static void
client_line(struct client *c)
{
	for (;;) {
		char *nl = c->len ? memchr(c->buf, '\n', c->len) : NULL;
		if (nl) {
			static char line[200000];
			size_t n = (size_t)(nl - c->buf);
			cr_assert_lt(n, sizeof(line), "line of %zu bytes", n);
			memcpy(line, c->buf, n);
			memmove(c->buf, nl + 1, c->len - n - 1);
			c->len -= n + 1;
			cr_assert_eq(ctl_json_parse(&c->j, line, n, c->tok, 512),
				     0, "not JSON: %.80s", line);
			return;
		}
		if (c->cap - c->len < 65536) {
			c->cap = c->cap ? c->cap * 2 : 262144;
			c->buf = realloc(c->buf, c->cap);
			cr_assert_not_null(c->buf);
		}
		struct pollfd p = {.fd = c->fd, .events = POLLIN};
		cr_assert_eq(poll(&p, 1, 10000), 1, "no reply within 10 s");
		ssize_t r = read(c->fd, c->buf + c->len, c->cap - c->len);
		cr_assert_gt(r, 0, "the server closed the connection");
		c->len += (size_t)r;
	}
}

static void
client_close(struct client *c)
{
	close(c->fd);
	free(c->buf);
}

/* The current line is a chunk: check its bytes are the message's from
 * *off on, and advance *off. false: not a chunk line. */
static bool
chunk(struct client *c, uint64_t *off)
{
	static uint8_t bin[PIECE + 3];
	int t = ctl_json_get(&c->j, 0, "chunk");
	long n;

	if (t < 0)
		return false;
	cr_assert_eq(c->j.tok[t].type, CTL_JSON_STRING);
	cr_assert_leq(c->j.tok[t].len, ctl_b64_len(PIECE),
		      "a chunk of more than 48 KiB");
	n = ctl_b64_decode(c->j.text + c->j.tok[t].start, c->j.tok[t].len,
			   bin);
	cr_assert_gt(n, 0, "bad base64");
	for (long i = 0; i < n; i++)
		cr_assert_eq(bin[i], pat(*off + (uint64_t)i),
			     "byte %" PRIu64 " differs", *off + (uint64_t)i);
	*off += (uint64_t)n;
	return true;
}

/* Read a reply to its terminating line; the bytes streamed before it.
 * The terminator stays in c->j. */
static uint64_t
read_reply(struct client *c)
{
	uint64_t off = 0;

	for (;;) {
		client_line(c);
		if (!chunk(c, &off))
			break;
	}
	cr_assert_geq(ctl_json_get(&c->j, 0, "ok"), 0,
		      "a line that is neither a chunk nor a terminator");
	return off;
}

static bool
reply_ok(struct client *c)
{
	bool v = false;

	ctl_json_bool(&c->j, (uint32_t)ctl_json_get(&c->j, 0, "ok"), &v);
	return v;
}

static void
error_is(struct client *c, const char *code, const char *in_message)
{
	char s[512];
	int e = ctl_json_get(&c->j, 0, "error");

	cr_assert(!reply_ok(c), "an ok reply, want error %s", code);
	cr_assert_geq(e, 0);
	ctl_json_string(&c->j, (uint32_t)ctl_json_get(&c->j, (uint32_t)e,
						      "code"), s, sizeof(s));
	cr_assert_str_eq(s, code);
	ctl_json_string(&c->j, (uint32_t)ctl_json_get(&c->j, (uint32_t)e,
						      "message"), s, sizeof(s));
	cr_assert(strstr(s, in_message), "message \"%s\", want \"%s\" in it",
		  s, in_message);
}

static uint64_t
data_size(struct client *c)
{
	int d = ctl_json_get(&c->j, 0, "data");
	uint64_t v = 0;

	cr_assert_geq(d, 0);
	cr_assert(ctl_json_u64(&c->j, (uint32_t)ctl_json_get(&c->j,
							     (uint32_t)d,
							     "size"), &v));
	return v;
}

/* Wait (at most 5 s) for a counter the server's thread moves. */
static bool
eventually(atomic_uint *v, unsigned want)
{
	for (int i = 0; i < 500; i++) {
		if (atomic_load(v) == want)
			return true;
		usleep(10000);
	}
	return false;
}

#define CAT "{\"cmd\":\"queue.cat\",\"args\":{\"id\":\"0123456789ABCDEF\"}}\n"

/* ---- tests ---------------------------------------------------------- */

Test(ctlsock, cat_streams_every_byte_then_the_size)
{
	struct client c;
	uint64_t size = 3 * PIECE * 7 + 5; /* not a whole number of pieces */

	start(size);
	client_open(&c, 0);
	client_send(&c, CAT);
	cr_assert_eq(read_reply(&c), size);
	cr_assert(reply_ok(&c));
	cr_assert_eq(data_size(&c), size);
	cr_assert(eventually(&q.closes, 1), "the message was not given back");
	cr_assert_eq(atomic_load(&q.opens), 1);
	client_close(&c);
	stop();
}

Test(ctlsock, cat_of_an_empty_message)
{
	struct client c;

	start(0);
	client_open(&c, 0);
	client_send(&c, CAT);
	cr_assert_eq(read_reply(&c), 0);
	cr_assert(reply_ok(&c));
	cr_assert_eq(data_size(&c), 0);
	client_close(&c);
	stop();
}

/* The server reads a piece only once its client's output has drained
 * below its bound: a client that does not read holds a few pieces of the
 * message in the daemon, not the message. */
Test(ctlsock, cat_reads_no_further_than_its_client)
{
	struct client c;
	uint64_t size = 16u << 20;
	unsigned long long ahead;

	start(size);
	client_open(&c, 4096);
	client_send(&c, CAT);
	usleep(300000);
	ahead = atomic_load(&q.served);
	/* 256 KiB of output, the socket buffers and a piece at most. */
	cr_assert_leq(ahead, 2u << 20, "read %llu bytes ahead of a client "
		      "that reads nothing", ahead);
	cr_assert_gt(ahead, 0);
	cr_assert_eq(read_reply(&c), size);
	cr_assert(reply_ok(&c));
	cr_assert_eq(atomic_load(&q.served), size);
	client_close(&c);
	stop();
}

/* A requests after a cat waits for it, and the cat's lines are not
 * interleaved with its reply. */
Test(ctlsock, cat_then_another_request_on_the_connection)
{
	struct client c;
	uint64_t size = 1u << 20;

	start(size);
	client_open(&c, 0);
	client_send(&c, CAT "{\"cmd\":\"queue.show\",\"args\":{\"id\":"
			    "\"0000000000000001\"}}\n" CAT);
	cr_assert_eq(read_reply(&c), size);
	cr_assert(reply_ok(&c));
	cr_assert_eq(read_reply(&c), 0);
	error_is(&c, "unknown_id", "no such message");
	cr_assert_eq(read_reply(&c), size);
	cr_assert(reply_ok(&c));
	cr_assert(eventually(&q.closes, 2));
	client_close(&c);
	stop();
}

/* queue.list's items, and its count, until its terminating line
 * (UINT64_MAX: an error reply). */
static uint64_t
list_count(struct client *c)
{
	uint64_t items = 0, count = 0;
	int res;

	for (;;) {
		client_line(c);
		if (ctl_json_get(&c->j, 0, "item") < 0)
			break;
		items++;
	}
	if (!reply_ok(c))
		return UINT64_MAX;
	res = ctl_json_get(&c->j, 0, "data");
	cr_assert_geq(res, 0);
	cr_assert(ctl_json_u64(&c->j,
			       (uint32_t)ctl_json_get(&c->j, (uint32_t)res,
						      "count"),
			       &count));
	cr_assert_eq(items, count);
	return count;
}

/* A filter is the request's own: a plain queue.list after a filtered (or
 * refused) one on the same connection lists everything. The filters
 * outlived their request, so it listed with the old one. */
Test(ctlsock, list_filters_do_not_outlive_their_request)
{
	struct client c;

	start(1);
	client_open(&c, 0);
	client_send(&c, "{\"cmd\":\"queue.list\",\"args\":{\"state\":"
			"\"held\"}}\n{\"cmd\":\"queue.list\"}\n");
	cr_assert_eq(list_count(&c), 1);
	cr_assert_eq(list_count(&c), 2);
	client_send(&c, "{\"cmd\":\"queue.list\",\"args\":{\"from\":"
			"\"held.test\"}}\n{\"cmd\":\"queue.list\"}\n");
	cr_assert_eq(list_count(&c), 1);
	cr_assert_eq(list_count(&c), 2);
	client_send(&c, "{\"cmd\":\"queue.list\",\"args\":{\"state\":"
			"\"bogus\"}}\n{\"cmd\":\"queue.list\"}\n");
	cr_assert_eq(list_count(&c), UINT64_MAX);
	error_is(&c, "bad_request", "state must be");
	cr_assert_eq(list_count(&c), 2);
	client_close(&c);
	stop();
}

static long
rss_kib(void)
{
	char line[256];
	long v = -1;
	FILE *f = fopen("/proc/self/status", "r");

	cr_assert_not_null(f);
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %ld", &v) == 1)
			break;
	fclose(f);
	cr_assert_geq(v, 0);
	return v;
}

/* A client that reads as fast as the chunks come rarely lets the output
 * drain to nothing: what was sent must still be dropped, or the buffer
 * grows to the whole message. (The server is in this process: its
 * memory is ours.) */
Test(ctlsock, cat_to_a_steady_reader_stays_small)
{
	struct client c;
	uint64_t size = 48u << 20, off = 0;
	long base, most = 0;
	unsigned lines = 0;

	start(size);
	client_open(&c, 0);
	/* A first reply sets the client's own buffers up. */
	client_send(&c, "{\"cmd\":\"status\"}\n");
	client_line(&c);
	base = rss_kib();
	client_send(&c, CAT);
	for (;;) {
		client_line(&c);
		if (!chunk(&c, &off))
			break;
		if (++lines % 16 == 0 && rss_kib() - base > most)
			most = rss_kib() - base;
	}
	cr_assert(reply_ok(&c));
	cr_assert_eq(off, size);
	cr_assert_lt(most, 8 * 1024, "RSS grew by %ld KiB during the cat",
		     most);
	client_close(&c);
	stop();
}

Test(ctlsock, cat_of_an_unknown_id)
{
	struct client c;

	start(100);
	client_open(&c, 0);
	client_send(&c, "{\"cmd\":\"queue.cat\",\"args\":{\"id\":"
			"\"0000000000000002\"}}\n");
	cr_assert_eq(read_reply(&c), 0);
	error_is(&c, "unknown_id", "no such message");
	cr_assert_eq(atomic_load(&q.opens), 0);
	client_close(&c);
	stop();
}

/* Damage found as the last bytes are read: what went out before stays
 * out, but the reply ends in an error, never in ok. */
Test(ctlsock, cat_of_a_damaged_body_ends_in_an_error)
{
	struct client c;
	uint64_t size = 10 * PIECE + 100;

	q.fail_at = size;
	q.fail_err = -EIO;
	start(size);
	client_open(&c, 0);
	client_send(&c, CAT);
	cr_assert_eq(read_reply(&c), 10 * PIECE);
	error_is(&c, "damaged", "checksum");
	cr_assert(eventually(&q.closes, 1), "the message was not given back");
	/* The connection goes on. */
	client_send(&c, CAT);
	read_reply(&c);
	error_is(&c, "damaged", "checksum");
	client_close(&c);
	stop();
}

/* Every byte was read, but the message was delivered or deleted
 * meanwhile: an error, not ok. */
Test(ctlsock, cat_of_a_message_that_left_the_queue_ends_in_an_error)
{
	struct client c;
	uint64_t size = 3 * PIECE;

	q.close_err = -ESTALE;
	start(size);
	client_open(&c, 0);
	client_send(&c, CAT);
	cr_assert_eq(read_reply(&c), size);
	error_is(&c, "unknown_id", "left the queue");
	client_close(&c);
	stop();
}

Test(ctlsock, cat_open_failures_are_errors)
{
	struct client c;

	q.open_err = -ESHUTDOWN;
	start(100);
	client_open(&c, 0);
	client_send(&c, CAT);
	cr_assert_eq(read_reply(&c), 0);
	error_is(&c, "shutting_down", "stopping");
	client_close(&c);
	stop();
}

/* A client that leaves mid-cat: the message is given back (its segments
 * unpinned) at once, not at the idle timeout. */
Test(ctlsock, cat_cut_short_gives_the_message_back)
{
	struct client c;
	uint64_t off = 0;

	start(32u << 20);
	client_open(&c, 4096);
	client_send(&c, CAT);
	client_line(&c);
	cr_assert(chunk(&c, &off));
	client_close(&c);
	cr_assert(eventually(&q.closes, 1), "a cat cut short kept its "
		  "message");
	cr_assert_lt(atomic_load(&q.served), 32u << 20,
		     "the whole message was read for a client that left");
	stop();
}

/* The server stops mid-cat: the message is given back too. */
Test(ctlsock, cat_at_stop_gives_the_message_back)
{
	struct client c;

	start(32u << 20);
	client_open(&c, 4096);
	client_send(&c, CAT);
	cr_assert(eventually(&q.opens, 1));
	stop();
	cr_assert_eq(atomic_load(&q.closes), 1);
	client_close(&c);
}

/* Out of descriptors (EMFILE): a failed accept4() leaves the connection
 * queued and the listener readable. The control thread must not spin on
 * it (it did: 100% of a CPU, and finaldotctl hung), and takes the client
 * once a descriptor is free again. */
Test(ctlsock, accept_out_of_descriptors_does_not_spin)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct fd_exhaust x;
	struct client c;
	double cpu;

	start(100);
	memset(&c, 0, sizeof(c));
	c.fd = socket(AF_UNIX, SOCK_STREAM, 0);
	cr_assert_geq(c.fd, 0);
	fd_exhaust_begin(&x);
	strcpy(sa.sun_path, path);
	cr_assert_eq(connect(c.fd, (struct sockaddr *)&sa, sizeof(sa)), 0,
		     "connect: %s", strerror(errno));
	usleep(100000);
	cpu = fd_cpu_over(1000000);
	cr_assert_lt(cpu, 0.3, "the control thread spun: %.2f s of CPU in 1 s",
		     cpu);
	fd_exhaust_end(&x);
	client_send(&c, "{\"cmd\":\"queue.cat\",\"args\":{\"id\":"
			"\"0000000000000002\"}}\n");
	cr_assert_eq(read_reply(&c), 0);
	error_is(&c, "unknown_id", "no such message");
	client_close(&c);
	stop();
}
