/*
 * Fuzz target: one SMTP session driven by the input, against the fake
 * spool of the unit tests. Byte 0 picks the configuration (greet delay,
 * spool room, size limit, a recipient checker), bytes 1-4 seed the split
 * points and the commit verdicts; the rest is what the client sends.
 * Invariants checked:
 *  - every reply line is "ddd" + SP or "-", printable, CRLF-terminated;
 *  - "queued as" appears exactly as often as commit_done(0) was called;
 *  - the sink contract holds (append within room, on an open message...);
 *  - with unlimited room, the split of the input changes nothing the
 *    client or the spool keeps: the replies, and the octets of every
 *    message that is not aborted. An aborted message's octets are thrown
 *    away, and how many of them reached the sink before the reason to
 *    refuse it showed may depend on the split (step_bdat() looks for a
 *    NUL in each piece of a chunk, so a NUL in a later piece comes after
 *    the earlier pieces were appended): the log keeps "[B][X]" for it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../unit/smtp/smtp_test_sink.h"
#include "finaldot/log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct run {
	struct tbuf out, log;
	unsigned ok_commits;
	bool stalled;
};

/* The fake spool, but an aborted message leaves only "[B][X]" in the log.
 * A session has one message open at most: the last one begun. */
static size_t open_msg_at;

static void *
norm_begin(void *sink, const struct fd_envelope *env, void *sctx,
	   uint64_t *msgid, int *err)
{
	open_msg_at = ((struct fake_sink *)sink)->log.len;
	return fs_begin(sink, env, sctx, msgid, err);
}

static void
norm_abort(void *sink, void *msg)
{
	struct fake_sink *fs = sink;

	fs_abort(sink, msg);
	fs->log.len = open_msg_at;
	tbuf_put(&fs->log, "[B][X]", 6);
}

static const struct smtp_sink_ops norm_ops = {
	.begin = norm_begin,
	.append = fs_append,
	.commit = fs_commit,
	.abort = norm_abort,
	.detach = fs_detach,
	.room = fs_room,
};

/* td_open() with norm_ops. */
static bool
norm_open(struct td *t, const struct smtp_config *cfg, const char *addr)
{
	memset(t, 0, sizeof(*t));
	t->auto_commit = true;
	t->srv = smtp_server_create(cfg, &norm_ops, &t->fs);
	if (!t->srv)
		return false;
	t->s = smtp_session_open(t->srv, t, addr, 42);
	if (!t->s)
		return false;
	td_drain(t);
	return true;
}

static uint32_t
rnd(uint32_t *st)
{
	*st ^= *st << 13;
	*st ^= *st >> 17;
	*st ^= *st << 5;
	return *st;
}

/* A recipient checker that depends on the address only: local parts
 * starting with 'u' are unknown, with 't' a temporary failure. */
static int
fuzz_rcpt_check(void *ctx, const char *addr)
{
	(void)ctx;
	if (addr[0] == 'u')
		return 0;
	return addr[0] == 't' ? -1 : 1;
}

static void
check_replies(const struct tbuf *out)
{
	size_t i = 0;

	while (i < out->len) {
		const char *l = out->p + i;
		const char *e = memchr(l, '\n', out->len - i);
		size_t n;
		if (!e)
			abort(); /* a reply not ended by CRLF */
		n = (size_t)(e - l) + 1;
		if (n < 6 || n > 512 || l[n - 2] != '\r')
			abort();
		if (l[0] < '2' || l[0] > '5' || l[1] < '0' || l[1] > '9' ||
		    l[2] < '0' || l[2] > '9' || (l[3] != ' ' && l[3] != '-'))
			abort();
		for (size_t k = 0; k < n - 2; k++)
			if ((unsigned char)l[k] < 0x20 || l[k] == 0x7f)
				abort();
		i += n;
	}
}

static void
run_once(const uint8_t *cfgb, const uint8_t *in, size_t n, bool split,
	 size_t room, struct run *r)
{
	struct smtp_config cfg;
	struct td t;
	uint32_t st = (uint32_t)cfgb[1] | (uint32_t)cfgb[2] << 8 |
		      (uint32_t)cfgb[3] << 16 | (uint32_t)cfgb[4] << 24 | 1u;
	unsigned commits = 0;
	size_t off = 0;
	unsigned idle = 0;

	td_config(&cfg);
	cfg.greet_delay = cfgb[0] & 1;
	cfg.max_message_size = (cfgb[0] & 2) ? 64 : 33554432;
	cfg.max_recipients = (cfgb[0] & 4) ? 2 : 100;
	cfg.max_errors = (cfgb[0] & 8) ? 3 : 20;
	if (cfgb[0] & 128)
		cfg.rcpt_check = fuzz_rcpt_check;
	if (!norm_open(&t, &cfg, (cfgb[0] & 16) ? "2001:db8::5" : "192.0.2.5"))
		abort();
	t.auto_commit = false;
	t.fs.room_cap = t.fs.room_left = room;
	if (cfg.greet_delay && (cfgb[0] & 32)) {
		smtp_session_greet(t.s);
		td_drain(&t);
	}
	while (off < n && !smtp_session_want_close(t.s)) {
		size_t piece = split ? 1 + rnd(&st) % 64 : n - off;
		size_t log_len = t.fs.log.len, out_len = t.out.len;
		size_t used;
		if (piece > n - off)
			piece = n - off;
		used = smtp_session_input(t.s, in + off, piece);
		off += used;
		td_drain(&t);
		t.fs.room_left = t.fs.room_cap;
		if (t.fs.pending) {
			struct fake_msg *m = t.fs.pending;
			/* The k-th commit's verdict depends on k only. */
			int status = (cfgb[1] + commits) % 5 == 4 ? -EIO
				   : (cfgb[1] + commits) % 7 == 6 ? -ENOSPC
								    : 0;
			t.fs.pending = NULL;
			commits++;
			if (status == 0)
				r->ok_commits++;
			smtp_session_commit_done(m->sctx, m->id, status);
			td_drain(&t);
		}
		if (used == 0 && log_len == t.fs.log.len &&
		    out_len == t.out.len) {
			if (++idle > 2) {
				r->stalled = true;
				break;
			}
		} else if (used) {
			idle = 0;
		}
	}
	if ((cfgb[0] & 64) && !smtp_session_want_close(t.s)) {
		smtp_session_timeout(t.s);
		td_drain(&t);
	}
	if (t.fs.violations)
		abort();
	check_replies(&t.out);
	if (count_str(t.out.p, "queued as") != r->ok_commits)
		abort();
	tbuf_put(&r->out, t.out.p ? t.out.p : "", t.out.len);
	tbuf_put(&r->log, t.fs.log.p ? t.fs.log.p : "", t.fs.log.len);
	td_close(&t);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct run a = {0}, b = {0}, c = {0};

	if (size < 5)
		return 0;
	fd_log_set_level(FD_LOG_ERR);
	run_once(data, data + 5, size - 5, false, 0, &a);
	run_once(data, data + 5, size - 5, true, 0, &b);
	run_once(data, data + 5, size - 5, true, 1 + data[2] % 16, &c);
	if (!a.stalled && !b.stalled &&
	    (a.out.len != b.out.len || memcmp(a.out.p, b.out.p, a.out.len) ||
	     a.log.len != b.log.len || memcmp(a.log.p, b.log.p, a.log.len)))
		abort();
	tbuf_free(&a.out);
	tbuf_free(&a.log);
	tbuf_free(&b.out);
	tbuf_free(&b.log);
	tbuf_free(&c.out);
	tbuf_free(&c.log);
	return 0;
}
