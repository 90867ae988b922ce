/*
 * Fuzz target: the delivery client on the receiving end of whatever a peer
 * may send. Input: one flags octet, then the peer's bytes.
 *
 * 1. smtpc_parse_reply() on the peer's bytes: a result must not depend on
 *    where the bytes are cut (every strict prefix of an OK reply is AGAIN,
 *    every prefix of an erroneous one is AGAIN or the same error), *used
 *    stays inside the input, the text is printable and NUL-terminated.
 * 2. A whole session over a socketpair, the peer's bytes queued up front
 *    and then end of file: connect, one transaction (smtpc_send) or two
 *    pipelined ones (smtpc_send_many, as the delivery threads send
 *    batches), RSET, QUIT. Nothing may crash or hang, and after either
 *    every reply slot must hold a reply (received or local): the caller
 *    acts on each.
 *
 * Flags: bit 0 LMTP; bits 1-2 recipients - 1; bit 3 empty body; bit 4 two
 * transactions, pipelined; bit 5 SMTPUTF8; bit 6 null sender; bit 7 DSN
 * fields.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "smtpc.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* need: 0 anything, 1 a parsed reply (200..599), 2 a reply the caller
 * acts on (2xx, 4xx or 5xx, never a 3xx) */
static void
check_reply(const struct smtpc_reply *r, int need)
{
	size_t n = strnlen(r->text, sizeof(r->text));

	if (n == sizeof(r->text) || strnlen(r->enh, sizeof(r->enh)) >=
					    sizeof(r->enh))
		abort();
	if (need == 1 && (r->code < 200 || r->code > 599))
		abort();
	if (need == 2 && r->code / 100 != 2 && r->code / 100 != 4 &&
	    r->code / 100 != 5)
		abort();
	for (size_t i = 0; i < n; i++)
		if (r->text[i] < 0x20 || r->text[i] == 0x7f)
			abort();
}

static void
parse_checks(const uint8_t *p, size_t n)
{
	struct smtpc_reply r;
	size_t used = 0, u2;
	enum smtpc_parse full = smtpc_parse_reply(p, n, &r, &used), pr;

	if (full == SMTPC_PARSE_OK) {
		if (used == 0 || used > n)
			abort();
		check_reply(&r, 1);
	}
	/* prefixes: at most 64 cut points, so long inputs stay fast */
	size_t step = n / 64 + 1;
	size_t lim = full == SMTPC_PARSE_OK ? used : n;
	for (size_t k = 0; k < lim; k += step) {
		pr = smtpc_parse_reply(p, k, &r, &u2);
		if (pr != SMTPC_PARSE_AGAIN &&
		    (full == SMTPC_PARSE_OK || pr != full))
			abort();
	}
}

static long
body_read(void *ctx, uint64_t off, void *buf, size_t n)
{
	const char *b = ctx;
	size_t len = strlen(b);

	if (off >= len)
		return 0;
	if (n > len - off)
		n = len - off;
	if (n > 3)
		n = 3; /* small pieces: stuffing across boundaries */
	memcpy(buf, b + off, n);
	return (long)n;
}

static void
session(unsigned flags, const uint8_t *p, size_t n)
{
	static const char *const rcpts[] = { "a@y.test", "b@y.test",
					     "c@y.test", "d@y.test" };
	static const uint8_t notify[] = { 2, 1, 14, 0 };
	static const char *const orcpts[] = { "rfc822;a@y.test", "", NULL,
					      "rfc822;d@y.test" };
	static const char body[] = ".x\r\n..\r\nline\r\n.";
	struct smtpc_params prm;
	struct smtpc_reply why, mail, rcpt[4], dat[4];
	struct smtpc_msg m;
	int sv[2], err = 0;
	unsigned nr = ((flags >> 1) & 3) + 1;

	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
		return;
	if (n > 65536)
		n = 65536;
	if (n && send(sv[1], p, n, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
		close(sv[0]);
		close(sv[1]);
		return;
	}
	shutdown(sv[1], SHUT_WR);
	smtpc_params_defaults(&prm);
	prm.helo_name = "fuzz.test";
	prm.cmd_timeout_ms = prm.data_timeout_ms = 1000;
	struct smtpc *c = smtpc_connect_fd(sv[0], flags & 1 ? SMTPC_LMTP
							    : SMTPC_SMTP,
					   &prm, &why, &err);
	if (!c) {
		if (err >= 0)
			abort();
		check_reply(&why, 0);
		close(sv[1]);
		return;
	}
	memset(&m, 0, sizeof(m));
	m.mail_from = flags & 64 ? "" : "s@x.test";
	m.rcpts = rcpts;
	m.n_rcpts = nr;
	m.body = body_read;
	m.body_ctx = (void *)(flags & 8 ? "" : body);
	m.size = flags & 8 ? 0 : sizeof(body) - 1;
	m.smtputf8 = flags & 32;
	m.body_type = 2;
	if (flags & 128) {
		m.notify = notify;
		m.orcpts = orcpts;
		m.envid = "e+2B1";
		m.ret = 1;
	}
	if (flags & 16) {
		struct smtpc_reply r2[2][2][4];
		struct smtpc_tx tx[2];
		int rc;

		memset(tx, 0, sizeof(tx));
		for (int t = 0; t < 2; t++) {
			tx[t].m = &m;
			tx[t].rcpt = r2[t][0];
			tx[t].data = r2[t][1];
		}
		rc = smtpc_send_many(c, tx, 2);
		if (rc == -EINVAL || rc > 0)
			abort();
		for (int t = 0; t < 2; t++) {
			if (tx[t].rc == -EINVAL || tx[t].rc > 0)
				abort();
			check_reply(&tx[t].mail, 2);
			for (unsigned i = 0; i < nr; i++) {
				check_reply(&tx[t].rcpt[i], 2);
				check_reply(&tx[t].data[i], 2);
			}
		}
	} else {
		int rc = smtpc_send(c, &m, &mail, rcpt, dat);
		if (rc == -EINVAL)
			abort();
		check_reply(&mail, 2);
		for (unsigned i = 0; i < nr; i++) {
			check_reply(&rcpt[i], 2);
			check_reply(&dat[i], 2);
		}
	}
	(void)smtpc_rset(c);
	smtpc_quit(c);
	close(sv[1]);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size == 0)
		return 0;
	parse_checks(data + 1, size - 1);
	session(data[0], data + 1, size - 1);
	return 0;
}
