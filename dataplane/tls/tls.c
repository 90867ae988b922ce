/*
 * Server-side TLS over a BIO pair (see tls.h for the shape).
 *
 * Buffers per connection, allocated once when TLS starts: the BIO pair's
 * two rings, the one in holding a full record with its header and MAC
 * (TLS_BIO_SIZE: a record never waits for room in the middle), the one out
 * 8 KiB (replies are small; a larger write waits for the send), and 4 KiB
 * of plaintext the session has not taken yet (OpenSSL keeps the rest of a
 * record). Measured: an idle TLS session costs 65 KB of RSS against 77 KB
 * with two full rings and a record of plaintext.
 * OpenSSL's own record buffers are released while a connection is idle
 * (SSL_MODE_RELEASE_BUFFERS), so an idle TLS session holds the two rings,
 * the plaintext buffer and the SSL object.
 *
 * Flow control. Plaintext the session did not take stays in plain[] and no
 * more is decrypted until it is taken; ciphertext then stays in the input
 * ring, and fd_tls_conn_in() takes less: the transport keeps the rest and
 * the peer's TCP window absorbs the client.
 *
 * Certificates. Each --tls-cert/--tls-key pair is loaded into a context;
 * a pair whose leaf has the subject of an earlier context's leaf and a key
 * type that context lacks joins it (ECDSA and RSA served together, OpenSSL
 * picking by the client's signature algorithms); any other pair gets a
 * context of its own, chosen by SNI (X509_check_host on its leaf). The set
 * of contexts is reference counted: a reload swaps in a new set and a
 * connection keeps the set it started with until it ends.
 *
 * Session tickets. One key set for the process, so a ticket from one
 * worker resumes on another: AES-256-CBC and HMAC-SHA256 keys (the scheme
 * OpenSSL's own ticket callback contract asks for), a current key used to
 * issue and the previous one still accepted (a ticket under it is renewed),
 * rotated every ticket_lifetime_s.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "finaldot/compiler.h"
#include "finaldot/log.h"
#include "smtp/smtp.h"
#include "smtp/smtp_received.h"
#include "tls/tls.h"

#define TLS_BIO_SIZE (16384 + 2048) /* ciphertext in: a full record */
#define TLS_OUT_SIZE 8192           /* ciphertext out: replies are small */
#define TLS_PLAIN_SIZE 4096
#define TLS_WIRE_MAP 16

struct tls_certset {
	atomic_uint refs;
	SSL_CTX *ctx[FD_TLS_MAX_PAIRS];
	X509 *leaf[FD_TLS_MAX_PAIRS]; /* the first leaf of each context */
	int key_types[FD_TLS_MAX_PAIRS][2]; /* EVP_PKEY ids in the ctx */
	unsigned nctx;
};

struct tls_ticket_key {
	uint8_t name[16];
	uint8_t aes[32];
	uint8_t hmac[32];
	uint64_t born_s;
	bool valid;
};

struct fd_tls_server {
	struct fd_tls_opts opts;
	pthread_mutex_t mu; /* set, keys */
	struct tls_certset *set;
	struct tls_ticket_key cur, prev;
	atomic_uint_fast64_t handshakes, resumed, failed;
};

struct tls_wire_point {
	uint64_t plain_end, wire_end;
};

struct fd_tls_conn {
	struct fd_tls_server *srv;
	struct tls_certset *set;
	SSL *ssl;
	BIO *net; /* our end of the pair */
	uint64_t sid;
	uint64_t deadline_us; /* handshake; 0 once established */
	bool established;
	bool failed;
	bool peer_closed;
	bool out_waiting;  /* session output the last pump could not write */
	bool close_wanted; /* fd_tls_conn_shutdown() was called */
	bool close_sent;
	uint64_t wire_base;    /* octets sent in the clear before TLS */
	uint64_t wire_taken;   /* ciphertext handed to the transport */
	uint64_t plain_total;  /* session output so far (from its start) */
	struct tls_wire_point map[TLS_WIRE_MAP];
	unsigned nmap;
	size_t plain_off, plain_len;
	char err[128];
	uint8_t plain[TLS_PLAIN_SIZE];
};

static int srv_index = -1; /* SSL_CTX ex_data slot: the fd_tls_server */
static pthread_once_t srv_index_once = PTHREAD_ONCE_INIT;

static void
srv_index_init(void)
{
	srv_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

static uint64_t
wall_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec;
}

void
fd_tls_opts_defaults(struct fd_tls_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->min_version = TLS1_2_VERSION;
	o->ticket_lifetime_s = 12 * 3600;
	o->handshake_timeout_ms = 30000;
}

/* The first OpenSSL error, as text, and the queue cleared. */
static const char *
ssl_reason(char *buf, size_t len)
{
	unsigned long e = ERR_get_error();

	if (e == 0)
		snprintf(buf, len, "unknown error");
	else
		ERR_error_string_n(e, buf, len);
	ERR_clear_error();
	return buf;
}

/* ---- session tickets ---- */

static int
ticket_key_new(struct tls_ticket_key *k)
{
	if (RAND_bytes(k->name, sizeof(k->name)) != 1 ||
	    RAND_bytes(k->aes, sizeof(k->aes)) != 1 ||
	    RAND_bytes(k->hmac, sizeof(k->hmac)) != 1)
		return -1;
	k->born_s = wall_s();
	k->valid = true;
	return 0;
}

static int
ticket_cb(SSL *ssl, unsigned char name[16], unsigned char *iv,
	  EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx, int enc)
{
	struct fd_tls_server *t =
		SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), srv_index);
	struct tls_ticket_key k;
	OSSL_PARAM params[3];
	int ret = 1;

	if (!t)
		return -1;
	pthread_mutex_lock(&t->mu);
	if (enc) {
		if (!t->cur.valid ||
		    wall_s() - t->cur.born_s >= t->opts.ticket_lifetime_s) {
			struct tls_ticket_key n;
			if (ticket_key_new(&n) == 0) {
				t->prev = t->cur;
				t->cur = n;
			}
		}
		k = t->cur;
	} else if (t->cur.valid && memcmp(name, t->cur.name, 16) == 0) {
		k = t->cur;
		/* A TLS 1.3 client uses a ticket once (RFC 8446 C.4): renew
		 * it, or a resumed session leaves the client none for the
		 * next connection. */
		if (SSL_version(ssl) >= TLS1_3_VERSION)
			ret = 2;
	} else if (t->prev.valid && memcmp(name, t->prev.name, 16) == 0 &&
		   wall_s() - t->prev.born_s < 2 * t->opts.ticket_lifetime_s) {
		k = t->prev;
		ret = 2; /* accepted; issue a ticket under the current key */
	} else {
		pthread_mutex_unlock(&t->mu);
		return 0; /* unknown key: a full handshake */
	}
	pthread_mutex_unlock(&t->mu);

	params[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, k.hmac,
						      sizeof(k.hmac));
	params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
						     (char *)"SHA256", 0);
	params[2] = OSSL_PARAM_construct_end();
	if (enc) {
		memcpy(name, k.name, 16);
		if (RAND_bytes(iv, EVP_MAX_IV_LENGTH) != 1 ||
		    !EVP_EncryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k.aes,
					iv) ||
		    !EVP_MAC_CTX_set_params(hctx, params))
			ret = -1;
	} else if (!EVP_DecryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k.aes,
				       iv) ||
		   !EVP_MAC_CTX_set_params(hctx, params)) {
		ret = -1;
	}
	OPENSSL_cleanse(&k, sizeof(k));
	return ret;
}

/* ---- certificates ---- */

static void
set_put(struct tls_certset *set)
{
	if (!set || atomic_fetch_sub(&set->refs, 1) != 1)
		return;
	for (unsigned i = 0; i < set->nctx; i++) {
		SSL_CTX_free(set->ctx[i]);
		X509_free(set->leaf[i]);
	}
	free(set);
}

/*
 * SNI picks the context, from the ClientHello callback: it runs before
 * OpenSSL looks for a session to resume, so a session (ticket) made under
 * one name's context is checked against the context of the name the client
 * asks for now, and its session id context (one per context) refuses it
 * when they differ (RFC 6066 3: no resumption across names). The
 * server_name extension: list length (2), then entries of type (1), name
 * length (2), name; only host_name entries (type 0) count.
 */
static int
client_hello_cb(SSL *ssl, int *alert, void *arg)
{
	struct tls_certset *set = arg;
	const unsigned char *p;
	size_t len, list;
	char name[256];

	(void)alert;
	if (!set || set->nctx < 2 ||
	    SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_server_name, &p,
				      &len) != 1 ||
	    len < 2)
		return SSL_CLIENT_HELLO_SUCCESS;
	list = (size_t)p[0] << 8 | p[1];
	if (list + 2 != len)
		return SSL_CLIENT_HELLO_SUCCESS; /* malformed: OpenSSL says */
	for (size_t off = 2; off + 3 <= len;) {
		unsigned type = p[off];
		size_t n = (size_t)p[off + 1] << 8 | p[off + 2];
		off += 3;
		if (off + n > len)
			break;
		if (type == TLSEXT_NAMETYPE_host_name && n > 0 &&
		    n < sizeof(name) && !memchr(p + off, 0, n)) {
			memcpy(name, p + off, n);
			name[n] = '\0';
			for (unsigned i = 1; i < set->nctx; i++)
				if (X509_check_host(set->leaf[i], name, n, 0,
						    NULL) == 1 &&
				    X509_check_host(set->leaf[0], name, n, 0,
						    NULL) != 1) {
					SSL_set_SSL_CTX(ssl, set->ctx[i]);
					break;
				}
			break;
		}
		off += n;
	}
	return SSL_CLIENT_HELLO_SUCCESS; /* no match: the default */
}

static X509 *
read_leaf(const char *path)
{
	FILE *f = fopen(path, "r");
	X509 *x;

	if (!f)
		return NULL; /* errno says why */
	x = PEM_read_X509(f, NULL, NULL, NULL);
	fclose(f);
	return x;
}

static int
check_dates(X509 *x, const char *path, char *err, size_t errlen)
{
	char when[64] = "?";
	BIO *b;

	if (X509_cmp_current_time(X509_get0_notAfter(x)) < 0) {
		b = BIO_new(BIO_s_mem());
		if (b && ASN1_TIME_print(b, X509_get0_notAfter(x)) > 0) {
			int n = BIO_read(b, when, (int)sizeof(when) - 1);
			when[n > 0 ? n : 0] = '\0';
		}
		BIO_free(b);
		snprintf(err, errlen, "certificate %s expired on %s", path,
			 when);
		return -1;
	}
	if (X509_cmp_current_time(X509_get0_notBefore(x)) > 0) {
		snprintf(err, errlen, "certificate %s is not valid yet",
			 path);
		return -1;
	}
	return 0;
}

static SSL_CTX *
ctx_new(struct fd_tls_server *t, struct tls_certset *set, char *err,
	size_t errlen)
{
	char why[160];
	SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());

	if (!ctx) {
		snprintf(err, errlen, "SSL_CTX_new: %s",
			 ssl_reason(why, sizeof(why)));
		return NULL;
	}
	SSL_CTX_set_ex_data(ctx, srv_index, t);
	SSL_CTX_set_min_proto_version(ctx, t->opts.min_version);
	/* No renegotiation (a client could make us do handshakes at will),
	 * our cipher order, no compression (CRIME). */
	SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION |
					 SSL_OP_CIPHER_SERVER_PREFERENCE |
					 SSL_OP_NO_COMPRESSION);
	/* The session's output buffer may move between retries (the engine
	 * compacts it), and a write may be partial (the BIO ring is full). */
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
				      SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
				      SSL_MODE_RELEASE_BUFFERS);
	/* Stateless resumption only: no server-side session cache to share
	 * between workers. One ticket per handshake (a resumed TLS 1.3
	 * session gets a fresh one: ticket_cb). */
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
	SSL_CTX_set_num_tickets(ctx, 1);
	SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticket_cb);
	SSL_CTX_set_client_hello_cb(ctx, client_hello_cb, set);
	if (t->opts.ciphers &&
	    SSL_CTX_set_cipher_list(ctx, t->opts.ciphers) != 1) {
		snprintf(err, errlen, "--tls-ciphers '%s': no usable cipher",
			 t->opts.ciphers);
		ERR_clear_error();
		SSL_CTX_free(ctx);
		return NULL;
	}
	return ctx;
}

static struct tls_certset *
set_load(struct fd_tls_server *t, char *err, size_t errlen)
{
	struct tls_certset *set = calloc(1, sizeof(*set));
	char why[160];

	if (!set) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	atomic_init(&set->refs, 1);
	for (unsigned i = 0; i < t->opts.npairs; i++) {
		const char *cp = t->opts.cert[i], *kp = t->opts.key[i];
		X509 *leaf = read_leaf(cp);
		EVP_PKEY *pub;
		int type;
		unsigned c;
		SSL_CTX *ctx;

		if (!leaf) {
			int e = errno;
			snprintf(err, errlen, "cannot read certificate %s: %s",
				 cp, ERR_peek_error() ? ssl_reason(why, sizeof(why))
						      : strerror(e));
			goto fail;
		}
		if (check_dates(leaf, cp, err, errlen) != 0) {
			X509_free(leaf);
			goto fail;
		}
		pub = X509_get0_pubkey(leaf);
		type = pub ? EVP_PKEY_get_base_id(pub) : 0;
		/* Join a context with the same subject and no key of this
		 * type; else start a new one. */
		for (c = 0; c < set->nctx; c++)
			if (X509_NAME_cmp(X509_get_subject_name(set->leaf[c]),
					  X509_get_subject_name(leaf)) == 0 &&
			    set->key_types[c][0] != type &&
			    set->key_types[c][1] == 0)
				break;
		if (c == set->nctx) {
			ctx = ctx_new(t, set, err, errlen);
			if (!ctx) {
				X509_free(leaf);
				goto fail;
			}
			set->ctx[c] = ctx;
			set->leaf[c] = leaf;
			/* Sessions resume only in the context (name) that
			 * made them: a digest of the leaf's subject. */
			{
				unsigned char md[EVP_MAX_MD_SIZE];
				unsigned mdlen = 0;
				if (X509_NAME_digest(X509_get_subject_name(leaf),
						     EVP_sha256(), md,
						     &mdlen) != 1 ||
				    SSL_CTX_set_session_id_context(
					    ctx, md,
					    FD_MIN(mdlen,
						   (unsigned)SSL_MAX_SID_CTX_LENGTH)) != 1) {
					snprintf(err, errlen,
						 "session id context for %s",
						 cp);
					goto fail;
				}
			}
			set->key_types[c][0] = type;
			set->nctx++;
		} else {
			ctx = set->ctx[c];
			set->key_types[c][1] = type;
			X509_free(leaf);
		}
		if (SSL_CTX_use_certificate_chain_file(ctx, cp) != 1) {
			snprintf(err, errlen, "certificate %s: %s", cp,
				 ssl_reason(why, sizeof(why)));
			goto fail;
		}
		if (SSL_CTX_use_PrivateKey_file(ctx, kp, SSL_FILETYPE_PEM) !=
		    1) {
			/* A key of the certificate's type is checked against
			 * it right here (one of another type below). */
			unsigned long e = ERR_peek_error();
			if (ERR_GET_LIB(e) == ERR_LIB_X509 &&
			    ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH) {
				snprintf(err, errlen,
					 "key %s does not match certificate %s",
					 kp, cp);
				ERR_clear_error();
			} else {
				snprintf(err, errlen, "key %s: %s", kp,
					 ssl_reason(why, sizeof(why)));
			}
			goto fail;
		}
		if (SSL_CTX_check_private_key(ctx) != 1) {
			snprintf(err, errlen,
				 "key %s does not match certificate %s", kp,
				 cp);
			ERR_clear_error();
			goto fail;
		}
	}
	return set;
fail:
	set_put(set);
	return NULL;
}

int
fd_tls_server_new(const struct fd_tls_opts *o, struct fd_tls_server **out,
		  char *err, size_t errlen)
{
	struct fd_tls_server *t;

	*out = NULL;
	if (o->npairs == 0 || o->npairs > FD_TLS_MAX_PAIRS) {
		snprintf(err, errlen, "between 1 and %d certificate pairs",
			 FD_TLS_MAX_PAIRS);
		return -1;
	}
	pthread_once(&srv_index_once, srv_index_init);
	if (srv_index < 0) {
		snprintf(err, errlen, "SSL_CTX_get_ex_new_index failed");
		return -1;
	}
	t = calloc(1, sizeof(*t));
	if (!t) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	t->opts = *o;
	pthread_mutex_init(&t->mu, NULL);
	if (ticket_key_new(&t->cur) != 0) {
		snprintf(err, errlen, "no randomness for ticket keys");
		free(t);
		return -1;
	}
	t->set = set_load(t, err, errlen);
	if (!t->set) {
		pthread_mutex_destroy(&t->mu);
		free(t);
		return -1;
	}
	*out = t;
	return 0;
}

int
fd_tls_server_reload(struct fd_tls_server *t, char *err, size_t errlen)
{
	struct tls_certset *set = set_load(t, err, errlen), *old;

	if (!set)
		return -1;
	pthread_mutex_lock(&t->mu);
	old = t->set;
	t->set = set;
	pthread_mutex_unlock(&t->mu);
	set_put(old);
	return 0;
}

void
fd_tls_server_free(struct fd_tls_server *t)
{
	if (!t)
		return;
	set_put(t->set);
	OPENSSL_cleanse(&t->cur, sizeof(t->cur));
	OPENSSL_cleanse(&t->prev, sizeof(t->prev));
	pthread_mutex_destroy(&t->mu);
	free(t);
}

uint64_t
fd_tls_server_handshake_timeout_ms(const struct fd_tls_server *t)
{
	return t->opts.handshake_timeout_ms;
}

void
fd_tls_server_stats(const struct fd_tls_server *t, struct fd_tls_stats *out)
{
	out->handshakes = atomic_load(&t->handshakes);
	out->resumed = atomic_load(&t->resumed);
	out->failed = atomic_load(&t->failed);
}

/* ---- connections ---- */

struct fd_tls_conn *
fd_tls_conn_new(struct fd_tls_server *t, uint64_t sid, uint64_t wire_base,
		uint64_t now_us)
{
	struct fd_tls_conn *c = calloc(1, sizeof(*c));
	BIO *inner = NULL;

	if (!c)
		return NULL;
	c->srv = t;
	c->sid = sid;
	c->wire_base = wire_base;
	c->plain_total = wire_base; /* the engine counts from its start */
	pthread_mutex_lock(&t->mu);
	c->set = t->set;
	atomic_fetch_add(&c->set->refs, 1);
	pthread_mutex_unlock(&t->mu);
	c->ssl = SSL_new(c->set->ctx[0]);
	if (!c->ssl ||
	    BIO_new_bio_pair(&inner, TLS_OUT_SIZE, &c->net, TLS_BIO_SIZE) !=
		    1) {
		ERR_clear_error();
		if (c->ssl)
			SSL_free(c->ssl);
		set_put(c->set);
		free(c);
		return NULL;
	}
	SSL_set_bio(c->ssl, inner, inner);
	SSL_set_accept_state(c->ssl);
	c->deadline_us = now_us + t->opts.handshake_timeout_ms * 1000;
	return c;
}

void
fd_tls_conn_free(struct fd_tls_conn *c)
{
	if (!c)
		return;
	SSL_free(c->ssl); /* frees the inner BIO */
	BIO_free(c->net);
	set_put(c->set);
	free(c);
}

size_t
fd_tls_conn_in(struct fd_tls_conn *c, const uint8_t *p, size_t n)
{
	size_t room = BIO_ctrl_get_write_guarantee(c->net);
	int w;

	n = FD_MIN(n, room);
	if (n == 0 || c->failed)
		return c->failed ? n : 0;
	w = BIO_write(c->net, p, (int)n);
	return w > 0 ? (size_t)w : 0;
}

size_t
fd_tls_conn_out(struct fd_tls_conn *c, const uint8_t **p)
{
	char *q = NULL;
	int n = BIO_nread0(c->net, &q);

	if (n <= 0)
		return 0;
	*p = (const uint8_t *)q;
	return (size_t)n;
}

void
fd_tls_conn_out_done(struct fd_tls_conn *c, size_t n)
{
	char *q;

	if (n == 0)
		return;
	BIO_nread(c->net, &q, (int)n);
	c->wire_taken += n;
}

static enum fd_tls_status
conn_fail(struct fd_tls_conn *c, const char *why)
{
	if (!c->failed) {
		c->failed = true;
		snprintf(c->err, sizeof(c->err), "%s", why);
		if (!c->established)
			atomic_fetch_add(&c->srv->failed, 1);
		/* OpenSSL's reason text or ours: not the peer's octets. */
		fd_log(FD_LOG_INFO, "tls",
		       "%016" PRIx64 " event=tls_failed established=%d "
		       "reason=\"%s\"",
		       c->sid, c->established, c->err);
	}
	return FD_TLS_FAILED;
}

/* An SSL call returned r <= 0: go on (want I/O), or fail. */
static enum fd_tls_status
ssl_result(struct fd_tls_conn *c, int r)
{
	char why[160];
	int e = SSL_get_error(c->ssl, r);

	switch (e) {
	case SSL_ERROR_WANT_READ:
	case SSL_ERROR_WANT_WRITE:
		return FD_TLS_OK;
	case SSL_ERROR_ZERO_RETURN:
		c->peer_closed = true;
		return FD_TLS_CLOSED;
	case SSL_ERROR_SYSCALL:
		return conn_fail(c, "unexpected end of TLS stream");
	default:
		return conn_fail(c, ssl_reason(why, sizeof(why)));
	}
}

static void
established(struct fd_tls_conn *c, struct smtp_session *s)
{
	const SSL_CIPHER *ci = SSL_get_current_cipher(c->ssl);
	const char *ver = SSL_get_version(c->ssl);
	const char *name = ci ? SSL_CIPHER_get_name(ci) : "?";
	const char *sni = SSL_get_servername(c->ssl, TLSEXT_NAMETYPE_host_name);
	int alg_bits = 0, bits = ci ? SSL_CIPHER_get_bits(ci, &alg_bits) : 0;
	bool resumed = SSL_session_reused(c->ssl) == 1;
	char desc[SMTP_RECEIVED_TLS_MAX + 1], esc[300];

	c->established = true;
	c->deadline_us = 0;
	atomic_fetch_add(&c->srv->handshakes, 1);
	if (resumed)
		atomic_fetch_add(&c->srv->resumed, 1);
	snprintf(desc, sizeof(desc), "%s with cipher %s (%d/%d bits)", ver,
		 name, bits, alg_bits);
	smtp_session_tls_ready(s, desc);
	fd_log(FD_LOG_INFO, "tls",
	       "%016" PRIx64 " event=tls_established version=%s cipher=%s "
	       "bits=%d resumed=%d sni=%s",
	       c->sid, ver, name, bits, resumed,
	       sni ? fd_log_escape(esc, sizeof(esc), sni, strlen(sni)) : "-");
}

/* Remember where in the TCP stream the plaintext so far ends. */
static void
wire_mark(struct fd_tls_conn *c)
{
	struct tls_wire_point *m = &c->map[c->nmap % TLS_WIRE_MAP];

	m->plain_end = c->plain_total;
	m->wire_end =
		c->wire_base + c->wire_taken + BIO_ctrl_pending(c->net);
	c->nmap++;
}

/* After SSL_shutdown() OpenSSL refuses SSL_write() ("protocol is
 * shutdown"): close_notify goes out only behind the session's last reply. */
static void
close_notify(struct fd_tls_conn *c)
{
	if (c->close_sent || !c->established || c->failed)
		return;
	c->close_sent = true;
	ERR_clear_error();
	SSL_shutdown(c->ssl);
	ERR_clear_error();
}

enum fd_tls_status
fd_tls_conn_pump(struct fd_tls_conn *c, struct smtp_session *s,
		 uint64_t now_us)
{
	bool progress = true;
	int r;

	if (c->failed)
		return FD_TLS_FAILED;
	if (!c->established) {
		if (now_us >= c->deadline_us)
			return conn_fail(c, "handshake timeout");
		if (smtp_session_want_close(s))
			return conn_fail(c, "session ended during handshake");
		ERR_clear_error();
		r = SSL_do_handshake(c->ssl);
		if (r != 1)
			return ssl_result(c, r);
		established(c, s);
	}
	while (progress) {
		progress = false;
		/* Input: decrypt only when the session took what it had. */
		if (c->plain_len == 0 && !c->peer_closed) {
			ERR_clear_error();
			r = SSL_read(c->ssl, c->plain, sizeof(c->plain));
			if (r > 0) {
				c->plain_off = 0;
				c->plain_len = (size_t)r;
			} else {
				enum fd_tls_status st = ssl_result(c, r);
				if (st == FD_TLS_FAILED)
					return st;
			}
		}
		if (c->plain_len) {
			size_t used = smtp_session_input(
				s, c->plain + c->plain_off, c->plain_len);
			c->plain_off += used;
			c->plain_len -= used;
			progress = used > 0;
		}
		/* Output. */
		for (;;) {
			const uint8_t *p;
			size_t n = smtp_session_output(s, &p);
			if (n == 0)
				break;
			ERR_clear_error();
			r = SSL_write(c->ssl, p,
				      (int)FD_MIN(n, (size_t)TLS_PLAIN_SIZE));
			if (r <= 0) {
				enum fd_tls_status st = ssl_result(c, r);
				if (st == FD_TLS_FAILED)
					return st;
				break; /* the ring is full: after a send */
			}
			smtp_session_output_done(s, (size_t)r);
			c->plain_total += (uint64_t)r;
			wire_mark(c);
			progress = true;
		}
	}
	{
		const uint8_t *p;
		c->out_waiting = smtp_session_output(s, &p) > 0;
	}
	if (c->close_wanted && !c->out_waiting)
		close_notify(c);
	return c->peer_closed && c->plain_len == 0 ? FD_TLS_CLOSED : FD_TLS_OK;
}

void
fd_tls_conn_shutdown(struct fd_tls_conn *c)
{
	c->close_wanted = true;
	if (!c->out_waiting)
		close_notify(c);
}

bool
fd_tls_conn_established(const struct fd_tls_conn *c)
{
	return c->established;
}

bool
fd_tls_conn_resumed(const struct fd_tls_conn *c)
{
	return c->established && SSL_session_reused(c->ssl) == 1;
}

bool
fd_tls_conn_holding(const struct fd_tls_conn *c)
{
	return c->plain_len > 0;
}

uint64_t
fd_tls_conn_deadline_us(const struct fd_tls_conn *c)
{
	return c->established ? 0 : c->deadline_us;
}

const char *
fd_tls_conn_error(const struct fd_tls_conn *c)
{
	return c->err;
}

uint64_t
fd_tls_conn_wire_end(const struct fd_tls_conn *c, uint64_t plain_end)
{
	unsigned n = FD_MIN(c->nmap, (unsigned)TLS_WIRE_MAP);

	if (plain_end <= c->wire_base)
		return plain_end; /* sent in the clear, before TLS */
	/* Oldest first: the first point at or past plain_end. */
	for (unsigned i = 0; i < n; i++) {
		const struct tls_wire_point *m =
			&c->map[(c->nmap - n + i) % TLS_WIRE_MAP];
		if (m->plain_end >= plain_end)
			return m->wire_end;
	}
	/* Not recorded (cannot be newer than the newest point): the end of
	 * everything produced, the conservative answer. */
	return c->wire_base + c->wire_taken + BIO_ctrl_pending(c->net);
}

uint64_t
fd_tls_conn_wire_sent(const struct fd_tls_conn *c)
{
	return c->wire_base + c->wire_taken;
}

size_t
fd_tls_conn_buffer_bytes(void)
{
	return sizeof(struct fd_tls_conn) + TLS_BIO_SIZE + TLS_OUT_SIZE;
}
