/*
 * Fuzz target: what a client sends once the 220 to STARTTLS went out, as
 * ciphertext into fd_tls_conn_in(), with the real SMTP engine and the
 * fake spool behind the fd_tls_conn. Byte 0 seeds the split of the rest
 * into pieces (0: one piece); the rest is the client's octet stream.
 * Each piece is offered until taken (the pump between offers), the
 * server's output is drained and dropped, a pending commit completed; at
 * the end the handshake deadline passes and everything is freed.
 * Checked: no crash, no leak (the sanitizers), and the layer's answers
 * stay coherent: a failed connection stays failed with a reason, and a
 * connection that never completed its handshake fails at its deadline.
 *
 * One fd_tls_server for the process (certificates made once, with the
 * OpenSSL API, in a temp dir removed right after loading): an EC and an
 * RSA pair for mx.example.com and an EC pair for a second name, so a
 * ClientHello can reach both the key-type choice and SNI.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../unit/tls/tls_test_util.h"
#include "finaldot/log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define T0 1000000ull

static struct fd_tls_server *srv;

static void
server_once(void)
{
	struct tt_dir d;
	struct tt_pair p[3];
	struct fd_tls_opts o;
	char err[512];
	int r;

	if (srv)
		return;
	/* The engine and the layer log every session: not per input. */
	fd_log_set_level(FD_LOG_ERR);
	if (tt_dir_make(&d) != 0 ||
	    tt_pair_make(&p[0], &d, "ec", TT_EC, "mx.example.com", -TT_DAY,
			 30 * TT_DAY) != 0 ||
	    tt_pair_make(&p[1], &d, "rsa", TT_RSA, "mx.example.com", -TT_DAY,
			 30 * TT_DAY) != 0 ||
	    tt_pair_make(&p[2], &d, "two", TT_EC, "mx2.example.com", -TT_DAY,
			 30 * TT_DAY) != 0) {
		fprintf(stderr, "fuzz_tls_input: cannot make certificates\n");
		abort();
	}
	tt_opts(&o, (struct tt_pair *[]){&p[0], &p[1], &p[2]}, 3);
	o.handshake_timeout_ms = 1000;
	r = fd_tls_server_new(&o, &srv, err, sizeof(err));
	for (unsigned i = 0; i < 3; i++)
		tt_pair_free(&p[i]);
	tt_dir_remove(&d);
	if (r != 0) {
		fprintf(stderr, "fuzz_tls_input: %s\n", err);
		abort();
	}
}

static uint32_t
rnd(uint32_t *st)
{
	*st ^= *st << 13;
	*st ^= *st >> 17;
	*st ^= *st << 5;
	return *st;
}

/* Drop what the server sends; complete a pending commit. */
static void
drain(struct td *t, struct fd_tls_conn *c)
{
	const uint8_t *p;
	size_t n;

	while ((n = fd_tls_conn_out(c, &p)) > 0)
		fd_tls_conn_out_done(c, n);
	if (t->fs.pending) {
		struct fake_msg *m = t->fs.pending;
		t->fs.pending = NULL;
		smtp_session_commit_done(m->sctx, m->id, 0);
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct smtp_config cfg;
	struct td t;
	struct fd_tls_conn *c;
	enum fd_tls_status st = FD_TLS_OK;
	uint32_t seed;
	uint64_t now = T0;
	size_t off = 1;

	if (size < 1)
		return 0;
	server_once();
	seed = data[0] | 0x100u;
	tt_config(&cfg);
	if (!tt_session_to_starttls(&t, &cfg))
		abort();
	c = fd_tls_conn_new(srv, 1, smtp_session_output_total(t.s), now);
	if (!c)
		abort();
	while (off < size && st == FD_TLS_OK) {
		size_t piece = data[0] ? 1 + rnd(&seed) % 512 : size - off;
		size_t end = piece < size - off ? off + piece : size;
		unsigned stuck = 0;

		while (off < end && st == FD_TLS_OK && stuck < 3) {
			size_t used = fd_tls_conn_in(c, data + off, end - off);
			off += used;
			now += 1000;
			st = fd_tls_conn_pump(c, t.s, now);
			drain(&t, c);
			stuck = used ? 0 : stuck + 1;
		}
		if (stuck == 3)
			break; /* the layer holds what the session won't take */
	}
	if (st == FD_TLS_FAILED) {
		if (fd_tls_conn_error(c)[0] == '\0' ||
		    fd_tls_conn_pump(c, t.s, now) != FD_TLS_FAILED)
			abort();
	} else if (!fd_tls_conn_established(c)) {
		uint64_t d = fd_tls_conn_deadline_us(c);
		if (d == 0 || fd_tls_conn_pump(c, t.s, d) != FD_TLS_FAILED)
			abort();
	} else {
		fd_tls_conn_shutdown(c);
		fd_tls_conn_pump(c, t.s, now);
		drain(&t, c);
	}
	if (t.fs.violations)
		abort();
	fd_tls_conn_free(c);
	td_close(&t);
	return 0;
}
