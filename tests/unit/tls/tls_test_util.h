/*
 * Helpers for the TLS layer's tests and its fuzz target (no Criterion
 * here: the fuzz target includes this too).
 *
 *  - Certificates made with the OpenSSL API at test time in a temp dir
 *    (EC P-256 or RSA-2048, self-signed, subjectAltName DNS names, dates
 *    relative to now so an expired one is easy), never committed files
 *    that expire on their own one day.
 *  - A real OpenSSL client over its own BIO pair (struct tt_client).
 *  - A link (struct tt_link) that moves octets between that client and an
 *    fd_tls_conn in memory, with the SMTP engine and the fake spool of the
 *    engine's tests (smtp_test_sink.h) behind the fd_tls_conn, the way a
 *    transport does it. The server's ciphertext is kept whole and handed
 *    to the client one record at a time, each record's end (in TCP stream
 *    offsets) noted with the client's plaintext total then: that is what
 *    fd_tls_conn_wire_end() is checked against.
 */
#ifndef TLS_TEST_UTIL_H
#define TLS_TEST_UTIL_H

#include <dirent.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "../smtp/smtp_test_sink.h"
#include "tls/tls.h"

/* ---- temp dir ---- */

struct tt_dir {
	char path[256];
};

static inline int
tt_dir_make(struct tt_dir *d)
{
	const char *tmp = getenv("TMPDIR");

	snprintf(d->path, sizeof(d->path), "%s/fdtls-XXXXXX",
		 tmp && *tmp ? tmp : "/tmp");
	return mkdtemp(d->path) ? 0 : -1;
}

/* Everything in it (flat: the helpers make no subdirectories), then it. */
static inline void
tt_dir_remove(struct tt_dir *d)
{
	DIR *dir;
	struct dirent *e;

	if (!d->path[0])
		return;
	dir = opendir(d->path);
	while (dir && (e = readdir(dir))) {
		char p[512];
		if (e->d_name[0] == '.')
			continue;
		snprintf(p, sizeof(p), "%s/%s", d->path, e->d_name);
		unlink(p);
	}
	if (dir)
		closedir(dir);
	rmdir(d->path);
	d->path[0] = '\0';
}

/* ---- keys and certificates ---- */

enum tt_kind { TT_EC, TT_RSA };

static inline EVP_PKEY *
tt_key(enum tt_kind kind)
{
	if (kind == TT_RSA)
		return EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
	return EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
}

/*
 * Self-signed, subject CN=cn, subjectAltName san ("DNS:a,DNS:b"), valid
 * from now+from_s to now+to_s (negative: in the past).
 */
static inline X509 *
tt_cert(EVP_PKEY *k, const char *cn, const char *san, long from_s, long to_s)
{
	X509 *x = X509_new();
	X509_NAME *nm;
	X509V3_CTX v3;
	X509_EXTENSION *ext;
	uint64_t serial = 0;

	if (!x)
		return NULL;
	/* A random serial: two certificates of one test never look alike
	 * to anything that keys on issuer and serial. */
	if (RAND_bytes((unsigned char *)&serial, sizeof(serial)) != 1)
		goto fail;
	if (!X509_set_version(x, X509_VERSION_3) ||
	    !ASN1_INTEGER_set_uint64(X509_get_serialNumber(x),
				     serial >> 1) ||
	    !X509_gmtime_adj(X509_getm_notBefore(x), from_s) ||
	    !X509_gmtime_adj(X509_getm_notAfter(x), to_s) ||
	    !X509_set_pubkey(x, k))
		goto fail;
	nm = X509_get_subject_name(x);
	if (!X509_NAME_add_entry_by_txt(nm, "CN", MBSTRING_ASC,
					(const unsigned char *)cn, -1, -1, 0) ||
	    !X509_set_issuer_name(x, nm))
		goto fail;
	X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
	ext = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name, san);
	if (!ext)
		goto fail;
	if (!X509_add_ext(x, ext, -1)) {
		X509_EXTENSION_free(ext);
		goto fail;
	}
	X509_EXTENSION_free(ext);
	if (X509_sign(x, k, EVP_sha256()) <= 0)
		goto fail;
	return x;
fail:
	X509_free(x);
	return NULL;
}

static inline int
tt_write_cert(const char *path, X509 *x)
{
	FILE *f = fopen(path, "w");
	int ok;

	if (!f)
		return -1;
	ok = PEM_write_X509(f, x);
	return fclose(f) == 0 && ok ? 0 : -1;
}

static inline int
tt_write_key(const char *path, EVP_PKEY *k)
{
	FILE *f = fopen(path, "w");
	int ok;

	if (!f)
		return -1;
	ok = PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL);
	return fclose(f) == 0 && ok ? 0 : -1;
}

/* A certificate and its key, in memory and in DIR/NAME.crt, NAME.key. */
struct tt_pair {
	char cert[300], key[300];
	X509 *x;
	EVP_PKEY *k;
};

static inline void
tt_pair_free(struct tt_pair *p)
{
	X509_free(p->x);
	EVP_PKEY_free(p->k);
	p->x = NULL;
	p->k = NULL;
}

/* name: the CN and the one DNS name. 0 or -1. */
static inline int
tt_pair_make(struct tt_pair *p, const struct tt_dir *d, const char *file,
	     enum tt_kind kind, const char *name, long from_s, long to_s)
{
	char san[300];

	memset(p, 0, sizeof(*p));
	snprintf(p->cert, sizeof(p->cert), "%s/%s.crt", d->path, file);
	snprintf(p->key, sizeof(p->key), "%s/%s.key", d->path, file);
	snprintf(san, sizeof(san), "DNS:%s", name);
	p->k = tt_key(kind);
	if (!p->k)
		return -1;
	p->x = tt_cert(p->k, name, san, from_s, to_s);
	if (!p->x || tt_write_cert(p->cert, p->x) != 0 ||
	    tt_write_key(p->key, p->k) != 0) {
		tt_pair_free(p);
		return -1;
	}
	return 0;
}

#define TT_DAY (24L * 3600L)

/* Options naming the pairs, defaults otherwise. */
static inline void
tt_opts(struct fd_tls_opts *o, struct tt_pair *const *pairs, unsigned n)
{
	fd_tls_opts_defaults(o);
	for (unsigned i = 0; i < n && i < FD_TLS_MAX_PAIRS; i++) {
		o->cert[i] = pairs[i]->cert;
		o->key[i] = pairs[i]->key;
	}
	o->npairs = n;
}

/* ---- the client ---- */

struct tt_client_opts {
	const char *sni;          /* NULL: no server_name extension */
	const char *sigalgs;      /* NULL: OpenSSL's default list */
	SSL_SESSION *resume;      /* offer this ticket */
	int min_version, max_version; /* 0: OpenSSL's defaults */
};

struct tt_client {
	SSL_CTX *ctx;
	SSL *ssl;
	BIO *net;            /* the client's end of its pair: our side */
	SSL_SESSION *ticket; /* the newest ticket the server issued */
	struct tbuf tosend;  /* plaintext queued by tt_send() */
	size_t sent;         /* of which handed to SSL_write */
	struct tbuf got;     /* plaintext received */
	bool done;           /* handshake complete */
	bool failed;
	bool closed;         /* SSL_read said SSL_ERROR_ZERO_RETURN */
	int last_error;      /* SSL_get_error() of the last failing call */
};

static inline int
tt_client_ticket_cb(SSL *ssl, SSL_SESSION *sess)
{
	struct tt_client *cl = SSL_get_app_data(ssl);

	SSL_SESSION_free(cl->ticket);
	cl->ticket = sess;
	return 1; /* the reference is ours */
}

/* 0 or -1. The client's ring is large enough for a server flight. */
static inline int
tt_client_new(struct tt_client *cl, const struct tt_client_opts *o)
{
	BIO *inner = NULL;

	memset(cl, 0, sizeof(*cl));
	cl->ctx = SSL_CTX_new(TLS_client_method());
	if (!cl->ctx)
		return -1;
	/* Certificates are compared with the expected ones by the tests,
	 * not verified against a CA. */
	SSL_CTX_set_verify(cl->ctx, SSL_VERIFY_NONE, NULL);
	SSL_CTX_set_mode(cl->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
					  SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	SSL_CTX_set_session_cache_mode(cl->ctx,
				       SSL_SESS_CACHE_CLIENT |
					       SSL_SESS_CACHE_NO_INTERNAL_STORE);
	SSL_CTX_sess_set_new_cb(cl->ctx, tt_client_ticket_cb);
	if (o && o->min_version)
		SSL_CTX_set_min_proto_version(cl->ctx, o->min_version);
	if (o && o->max_version)
		SSL_CTX_set_max_proto_version(cl->ctx, o->max_version);
	cl->ssl = SSL_new(cl->ctx);
	if (!cl->ssl || BIO_new_bio_pair(&inner, 65536, &cl->net, 65536) != 1)
		return -1;
	SSL_set_bio(cl->ssl, inner, inner);
	SSL_set_app_data(cl->ssl, cl);
	SSL_set_connect_state(cl->ssl);
	if (o && o->sni && SSL_set_tlsext_host_name(cl->ssl, o->sni) != 1)
		return -1;
	if (o && o->sigalgs && SSL_set1_sigalgs_list(cl->ssl, o->sigalgs) != 1)
		return -1;
	if (o && o->resume) {
		/* A copy each time: the tests offer one ticket on several
		 * connections, and OpenSSL's client does not offer a TLS 1.3
		 * session a second time. */
		SSL_SESSION *copy = SSL_SESSION_dup(o->resume);
		int ok = copy && SSL_set_session(cl->ssl, copy) == 1;
		SSL_SESSION_free(copy);
		if (!ok)
			return -1;
	}
	return 0;
}

static inline void
tt_client_free(struct tt_client *cl)
{
	SSL_free(cl->ssl);
	BIO_free(cl->net);
	SSL_CTX_free(cl->ctx);
	SSL_SESSION_free(cl->ticket);
	tbuf_free(&cl->tosend);
	tbuf_free(&cl->got);
	memset(cl, 0, sizeof(*cl));
}

static inline void
tt_send(struct tt_client *cl, const void *p, size_t n)
{
	tbuf_put(&cl->tosend, p, n);
}

static inline void
tt_sends(struct tt_client *cl, const char *s)
{
	tt_send(cl, s, strlen(s));
}

/* An SSL call on the client returned r <= 0. */
static inline void
tt_client_result(struct tt_client *cl, int r)
{
	int e = SSL_get_error(cl->ssl, r);

	if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
		return;
	cl->last_error = e;
	if (e == SSL_ERROR_ZERO_RETURN)
		cl->closed = true;
	else
		cl->failed = true;
	ERR_clear_error();
}

/* Do what the client can: the handshake, its writes, its reads. */
static inline void
tt_client_run(struct tt_client *cl)
{
	uint8_t buf[16384];
	int r;

	if (cl->failed)
		return;
	if (!cl->done) {
		r = SSL_do_handshake(cl->ssl);
		if (r != 1) {
			tt_client_result(cl, r);
			return;
		}
		cl->done = true;
	}
	while (cl->sent < cl->tosend.len) {
		size_t n = cl->tosend.len - cl->sent;
		r = SSL_write(cl->ssl, cl->tosend.p + cl->sent,
			      (int)(n < sizeof(buf) ? n : sizeof(buf)));
		if (r <= 0) {
			tt_client_result(cl, r);
			break;
		}
		cl->sent += (size_t)r;
	}
	while (!cl->closed && !cl->failed) {
		r = SSL_read(cl->ssl, buf, (int)sizeof(buf));
		if (r <= 0) {
			tt_client_result(cl, r);
			break;
		}
		tbuf_put(&cl->got, buf, (size_t)r);
	}
}

/* ---- the link: client <-> fd_tls_conn <-> session ---- */

struct tt_rec {
	uint64_t wire_end;  /* TCP stream offset just past the record */
	uint64_t plain_end; /* the client's plaintext (from the session's
			     * start) once it had read that record */
};

struct tt_link {
	struct td *t;
	struct fd_tls_conn *c;
	struct tt_client *cl;
	uint64_t now_us;
	enum fd_tls_status st;
	bool auto_commit;   /* complete a pending commit with status 0 */
	bool stop_out;      /* leave the server's ciphertext in its ring */
	bool hold_s2c;      /* take it, but do not give it to the client */
	uint64_t wire_base; /* the session's octets sent in the clear */
	struct tbuf c2s;    /* client ciphertext the server has not taken */
	size_t c2s_off;
	uint64_t c2s_cut;   /* give the server no more than this many */
	bool in_short;      /* fd_tls_conn_in() took less than offered */
	struct tbuf s2c;    /* every octet of server ciphertext */
	size_t s2c_fed;     /* given to the client */
	struct tt_rec *recs;
	size_t nrec, caprec;
	unsigned commits;
};

/*
 * Open the session and take it in the clear up to the 220 to STARTTLS
 * (EHLO, STARTTLS): TLS starts with the next octet. false if it did not
 * get there.
 */
static inline bool
tt_session_to_starttls(struct td *t, const struct smtp_config *cfg)
{
	if (!td_open(t, cfg, NULL))
		return false;
	td_feeds(t, "EHLO client.example.net\r\nSTARTTLS\r\n");
	return smtp_session_tls_wanted(t->s) &&
	       strstr(t->out.p, "220 2.0.0 Ready to start TLS\r\n") != NULL;
}

static inline void
tt_config(struct smtp_config *cfg)
{
	td_config(cfg);
	cfg->starttls = true;
}

/* 0 or -1 (no memory for the fd_tls_conn). */
static inline int
tt_link_init(struct tt_link *l, struct td *t, struct fd_tls_server *srv,
	     struct tt_client *cl, uint64_t now_us)
{
	memset(l, 0, sizeof(*l));
	l->t = t;
	l->cl = cl;
	l->now_us = now_us;
	l->auto_commit = true;
	l->c2s_cut = UINT64_MAX;
	l->wire_base = smtp_session_output_total(t->s);
	l->c = fd_tls_conn_new(srv, smtp_session_id(t->s), l->wire_base,
			       now_us);
	return l->c ? 0 : -1;
}

static inline void
tt_link_free(struct tt_link *l)
{
	fd_tls_conn_free(l->c);
	l->c = NULL;
	tbuf_free(&l->c2s);
	tbuf_free(&l->s2c);
	free(l->recs);
	l->recs = NULL;
	l->nrec = l->caprec = 0;
}

static inline void
tt_link_note(struct tt_link *l)
{
	if (l->nrec == l->caprec) {
		l->caprec = l->caprec ? 2 * l->caprec : 64;
		l->recs = realloc(l->recs, l->caprec * sizeof(*l->recs));
		if (!l->recs)
			abort();
	}
	l->recs[l->nrec++] = (struct tt_rec){
		.wire_end = l->wire_base + l->s2c_fed,
		.plain_end = l->wire_base + l->cl->got.len,
	};
}

/* One round each way. Returns whether anything moved. */
static inline bool
tt_step(struct tt_link *l)
{
	struct tt_client *cl = l->cl;
	size_t got0 = cl->got.len;
	bool moved = false;
	const uint8_t *p;
	char *q;
	size_t n;
	int k;

	tt_client_run(cl);
	while ((k = BIO_nread0(cl->net, &q)) > 0) {
		tbuf_put(&l->c2s, q, (size_t)k);
		BIO_nread(cl->net, &q, k);
		moved = true;
	}
	n = l->c2s.len - l->c2s_off;
	if (l->c2s_off + n > l->c2s_cut)
		n = l->c2s_cut > l->c2s_off ? (size_t)(l->c2s_cut - l->c2s_off)
					    : 0;
	if (n) {
		size_t used = fd_tls_conn_in(
			l->c, (const uint8_t *)l->c2s.p + l->c2s_off, n);
		if (used < n)
			l->in_short = true;
		l->c2s_off += used;
		moved |= used > 0;
	}
	l->st = fd_tls_conn_pump(l->c, l->t->s, l->now_us);
	if (l->auto_commit && l->t->fs.pending) {
		struct fake_msg *m = l->t->fs.pending;
		l->t->fs.pending = NULL;
		l->commits++;
		smtp_session_commit_done(m->sctx, m->id, 0);
		moved = true;
	}
	while (!l->stop_out && (n = fd_tls_conn_out(l->c, &p)) > 0) {
		tbuf_put(&l->s2c, p, n);
		fd_tls_conn_out_done(l->c, n);
		moved = true;
	}
	/* To the client a whole record at a time (5-octet header: type,
	 * version, length). */
	while (!l->hold_s2c && l->s2c_fed + 5 <= l->s2c.len) {
		const uint8_t *h = (const uint8_t *)l->s2c.p + l->s2c_fed;
		size_t rl = 5 + ((size_t)h[3] << 8 | h[4]);
		if (l->s2c_fed + rl > l->s2c.len ||
		    BIO_ctrl_get_write_guarantee(cl->net) < rl)
			break;
		BIO_write(cl->net, h, (int)rl);
		l->s2c_fed += rl;
		tt_client_run(cl);
		tt_link_note(l);
		moved = true;
	}
	return moved || cl->got.len != got0;
}

/* Step until nothing moves (twice in a row). false: it never settled. */
static inline bool
tt_run(struct tt_link *l)
{
	unsigned idle = 0;

	for (unsigned i = 0; i < 200000; i++) {
		if (tt_step(l))
			idle = 0;
		else if (++idle == 2)
			return true;
	}
	return false;
}

/* The client's plaintext received since offset *from (advanced). */
static inline const char *
tt_got_since(struct tt_client *cl, size_t *from)
{
	const char *s = cl->got.p ? cl->got.p + *from : "";

	*from = cl->got.len;
	return s;
}

#endif
