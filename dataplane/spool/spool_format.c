/*
 * The spool record codec and the segment walk (finaldot/spool_format.h has
 * the byte layout; docs/spool-format.md the rules). Pure C, no I/O of its
 * own: the walk reads through the caller's function.
 *
 * Decoders trust nothing: every length is checked against what is available
 * before it is used, and every reserved field must be zero, so that a record
 * is either exactly what a writer produced or rejected.
 */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "finaldot/crc32c.h"
#include "finaldot/spool_format.h"

const char *
spool_dec_name(enum spool_dec d)
{
	switch (d) {
	case SPOOL_DEC_OK:
		return "ok";
	case SPOOL_DEC_AGAIN:
		return "again";
	case SPOOL_DEC_ERR_MAGIC:
		return "magic";
	case SPOOL_DEC_ERR_VERSION:
		return "version";
	case SPOOL_DEC_ERR_TYPE:
		return "type";
	case SPOOL_DEC_ERR_LEN:
		return "len";
	case SPOOL_DEC_ERR_FIELD:
		return "field";
	case SPOOL_DEC_ERR_PAD:
		return "pad";
	case SPOOL_DEC_ERR_CRC:
		return "crc";
	case SPOOL_DEC_ERR_EPOCH:
		return "epoch";
	case SPOOL_DEC_ERR_ITEM:
		return "item";
	}
	return "?";
}

/* ---- segment header ---------------------------------------------------- */

void
spool_seg_hdr_encode(const struct spool_seg_hdr *h, uint8_t *out)
{
	memset(out, 0, SPOOL_SEG_HDR_LEN);
	spool_put32(out, SPOOL_SEG_MAGIC);
	spool_put16(out + 4, SPOOL_FORMAT_VERSION);
	spool_put16(out + 6, SPOOL_SEG_HDR_LEN);
	spool_put32(out + 8, h->worker);
	spool_put64(out + 16, h->file_no);
	spool_put64(out + 24, h->use_seq);
	spool_put64(out + 32, h->epoch);
	spool_put64(out + 40, h->created_us);
	spool_put64(out + 48, h->size);
	spool_put32(out + 60, fd_crc32c(0, out, 60));
}

enum spool_dec
spool_seg_hdr_decode(const uint8_t *p, size_t n, struct spool_seg_hdr *h)
{
	if (n < SPOOL_SEG_HDR_LEN)
		return SPOOL_DEC_AGAIN;
	if (spool_get32(p) != SPOOL_SEG_MAGIC)
		return SPOOL_DEC_ERR_MAGIC;
	if (spool_get16(p + 4) != SPOOL_FORMAT_VERSION)
		return SPOOL_DEC_ERR_VERSION;
	if (spool_get32(p + 60) != fd_crc32c(0, p, 60))
		return SPOOL_DEC_ERR_CRC;
	if (spool_get16(p + 6) != SPOOL_SEG_HDR_LEN || spool_get32(p + 12) ||
	    spool_get32(p + 56))
		return SPOOL_DEC_ERR_FIELD;
	h->worker = spool_get32(p + 8);
	h->file_no = spool_get64(p + 16);
	h->use_seq = spool_get64(p + 24);
	h->epoch = spool_get64(p + 32);
	h->created_us = spool_get64(p + 40);
	h->size = spool_get64(p + 48);
	if (h->size < 2 * SPOOL_BLOCK || h->size % SPOOL_BLOCK)
		return SPOOL_DEC_ERR_LEN;
	return SPOOL_DEC_OK;
}

/* ---- record header ----------------------------------------------------- */

void
spool_rec_hdr_encode(const struct spool_rec_hdr *h, uint8_t *out)
{
	spool_put32(out, SPOOL_REC_MAGIC);
	out[4] = SPOOL_FORMAT_VERSION;
	out[5] = h->type;
	spool_put16(out + 6, 0);
	spool_put32(out + 8, h->len);
	spool_put32(out + 12, h->crc);
	spool_put64(out + 16, h->epoch);
	spool_put64(out + 24, h->msgid);
	spool_put64(out + 32, h->offset);
	spool_put32(out + 40, h->aux);
	spool_put32(out + 44, 0);
}

uint32_t
spool_rec_crc(const uint8_t *hdr, uint32_t payload_crc)
{
	static const uint8_t zero[4];
	uint32_t c = fd_crc32c(payload_crc, hdr, 12);

	c = fd_crc32c(c, zero, 4);
	return fd_crc32c(c, hdr + 16, SPOOL_REC_HDR_LEN - 16);
}

void
spool_rec_seal(uint8_t *hdr, uint32_t payload_crc)
{
	spool_put32(hdr + 12, spool_rec_crc(hdr, payload_crc));
}

size_t
spool_rec_encode(const struct spool_rec_hdr *h, const void *payload,
		 size_t len, uint8_t *out, size_t cap)
{
	struct spool_rec_hdr t = *h;
	uint64_t sz = spool_rec_size(len);

	if (len > SPOOL_REC_MAX || sz > cap)
		return 0;
	t.len = (uint32_t)len;
	t.crc = 0;
	spool_rec_hdr_encode(&t, out);
	if (len)
		memcpy(out + SPOOL_REC_HDR_LEN, payload, len);
	memset(out + SPOOL_REC_HDR_LEN + len, 0, (size_t)sz - len -
						     SPOOL_REC_HDR_LEN);
	spool_rec_seal(out, fd_crc32c(0, payload, len));
	return (size_t)sz;
}

enum spool_dec
spool_rec_hdr_decode(const uint8_t *p, size_t n, struct spool_rec_hdr *h)
{
	if (n < SPOOL_REC_HDR_LEN) {
		/* A prefix that already contradicts the magic is an error. */
		uint8_t m[4];
		spool_put32(m, SPOOL_REC_MAGIC);
		if (memcmp(p, m, n < 4 ? n : 4) != 0)
			return SPOOL_DEC_ERR_MAGIC;
		return SPOOL_DEC_AGAIN;
	}
	if (spool_get32(p) != SPOOL_REC_MAGIC)
		return SPOOL_DEC_ERR_MAGIC;
	if (p[4] != SPOOL_FORMAT_VERSION)
		return SPOOL_DEC_ERR_VERSION;
	h->type = p[5];
	h->len = spool_get32(p + 8);
	h->crc = spool_get32(p + 12);
	h->epoch = spool_get64(p + 16);
	h->msgid = spool_get64(p + 24);
	h->offset = spool_get64(p + 32);
	h->aux = spool_get32(p + 40);
	if (spool_get16(p + 6) != 0 || spool_get32(p + 44) != 0)
		return SPOOL_DEC_ERR_FIELD;
	switch ((enum spool_rec_type)h->type) {
	case SPOOL_REC_ENV:
		if (h->len < SPOOL_ITEM_HDR_LEN || h->len > SPOOL_ENV_MAX)
			return SPOOL_DEC_ERR_LEN;
		if (h->offset || h->aux)
			return SPOOL_DEC_ERR_FIELD;
		break;
	case SPOOL_REC_DATA:
		if (h->len == 0 || h->len > SPOOL_REC_MAX)
			return SPOOL_DEC_ERR_LEN;
		if (h->aux || h->offset > UINT64_MAX - h->len)
			return SPOOL_DEC_ERR_FIELD;
		break;
	case SPOOL_REC_END:
		if (h->len)
			return SPOOL_DEC_ERR_LEN;
		break;
	default:
		return SPOOL_DEC_ERR_TYPE;
	}
	return SPOOL_DEC_OK;
}

static bool
all_zero(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

enum spool_dec
spool_rec_decode(const uint8_t *p, size_t n, uint64_t epoch,
		 struct spool_rec_hdr *h, const uint8_t **payload, size_t *used)
{
	enum spool_dec d = spool_rec_hdr_decode(p, n, h);
	uint64_t sz;

	if (d != SPOOL_DEC_OK)
		return d;
	sz = spool_rec_size(h->len);
	if (n < sz)
		return SPOOL_DEC_AGAIN;
	if (!all_zero(p + SPOOL_REC_HDR_LEN + h->len,
		      (size_t)sz - SPOOL_REC_HDR_LEN - h->len))
		return SPOOL_DEC_ERR_PAD;
	if (spool_rec_crc(p, fd_crc32c(0, p + SPOOL_REC_HDR_LEN, h->len)) !=
	    h->crc)
		return SPOOL_DEC_ERR_CRC;
	if (h->epoch != epoch)
		return SPOOL_DEC_ERR_EPOCH;
	*payload = p + SPOOL_REC_HDR_LEN;
	*used = (size_t)sz;
	return SPOOL_DEC_OK;
}

/* ---- envelope items ---------------------------------------------------- */

static size_t
item_len(const char *s, size_t *total, bool *ok)
{
	size_t n = strlen(s);

	if (n > SPOOL_ITEM_MAX)
		*ok = false;
	*total += SPOOL_ITEM_HDR_LEN + n;
	return n;
}

/* RFC 3461 4.1: NEVER alone, or a non-empty set of the other three. */
static bool
notify_valid(unsigned v)
{
	return v == FD_NOTIFY_NEVER ||
	       (v != 0 && (v & ~(unsigned)(FD_NOTIFY_SUCCESS |
					  FD_NOTIFY_FAILURE |
					  FD_NOTIFY_DELAY)) == 0);
}

/* The optional DSN strings: written only when present and not empty. */
static bool
has_str(const char *s)
{
	return s && s[0];
}

size_t
spool_env_encoded_len(const struct fd_envelope *e)
{
	size_t t = 0;
	bool ok = true;

	item_len(e->mail_from, &t, &ok);
	for (unsigned i = 0; i < e->n_rcpts; i++) {
		item_len(e->rcpts[i], &t, &ok);
		if (e->notify && e->notify[i] != FD_NOTIFY_NONE) {
			ok &= notify_valid(e->notify[i]);
			t += SPOOL_ITEM_HDR_LEN + 1;
		}
		if (e->orcpts && has_str(e->orcpts[i]))
			item_len(e->orcpts[i], &t, &ok);
	}
	item_len(e->helo, &t, &ok);
	item_len(e->client_addr, &t, &ok);
	item_len(e->proto, &t, &ok);
	t += 2 * (SPOOL_ITEM_HDR_LEN + 8) + 2 * (SPOOL_ITEM_HDR_LEN + 1) +
	     SPOOL_ITEM_HDR_LEN;
	if (has_str(e->envid))
		item_len(e->envid, &t, &ok);
	if (e->ret != FD_RET_NONE) {
		ok &= (unsigned)e->ret <= FD_RET_HDRS;
		t += SPOOL_ITEM_HDR_LEN + 1;
	}
	if (!ok || t > SPOOL_ENV_MAX)
		return 0;
	return t;
}

static uint8_t *
put_item(uint8_t *o, enum spool_item_type type, const void *v, size_t n)
{
	o[0] = (uint8_t)type;
	spool_put16(o + 1, (uint16_t)n);
	if (n)
		memcpy(o + SPOOL_ITEM_HDR_LEN, v, n);
	return o + SPOOL_ITEM_HDR_LEN + n;
}

static uint8_t *
put_str(uint8_t *o, enum spool_item_type type, const char *s)
{
	return put_item(o, type, s, strlen(s));
}

size_t
spool_env_encode(const struct fd_envelope *e, uint8_t *out, size_t cap)
{
	size_t need = spool_env_encoded_len(e);
	uint8_t *o = out, v8[8], b;

	if (need == 0 || need > cap)
		return 0;
	o = put_str(o, SPOOL_ITEM_MAIL_FROM, e->mail_from);
	for (unsigned i = 0; i < e->n_rcpts; i++) {
		o = put_str(o, SPOOL_ITEM_RCPT, e->rcpts[i]);
		if (e->notify && e->notify[i] != FD_NOTIFY_NONE)
			o = put_item(o, SPOOL_ITEM_RCPT_NOTIFY, &e->notify[i], 1);
		if (e->orcpts && has_str(e->orcpts[i]))
			o = put_str(o, SPOOL_ITEM_RCPT_ORCPT, e->orcpts[i]);
	}
	o = put_str(o, SPOOL_ITEM_HELO, e->helo);
	o = put_str(o, SPOOL_ITEM_CLIENT_ADDR, e->client_addr);
	o = put_str(o, SPOOL_ITEM_PROTO, e->proto);
	spool_put64(v8, e->arrival_us);
	o = put_item(o, SPOOL_ITEM_ARRIVAL_US, v8, 8);
	spool_put64(v8, e->size_param);
	o = put_item(o, SPOOL_ITEM_SIZE, v8, 8);
	b = (uint8_t)e->body;
	o = put_item(o, SPOOL_ITEM_BODY, &b, 1);
	b = e->smtputf8 ? 1 : 0;
	o = put_item(o, SPOOL_ITEM_SMTPUTF8, &b, 1);
	if (has_str(e->envid))
		o = put_str(o, SPOOL_ITEM_ENVID, e->envid);
	if (e->ret != FD_RET_NONE) {
		b = (uint8_t)e->ret;
		o = put_item(o, SPOOL_ITEM_RET, &b, 1);
	}
	o = put_item(o, SPOOL_ITEM_END, NULL, 0);
	return (size_t)(o - out);
}

size_t
spool_env_scratch_len(size_t n)
{
	/*
	 * Each item costs >= 3 input bytes, so at most n/3 of them: per item
	 * one NUL, and per recipient two pointers (rcpts, orcpts) and one
	 * notify byte; the strings themselves are at most n bytes.
	 */
	return n + (n / SPOOL_ITEM_HDR_LEN + 1) * (2 + 2 * sizeof(char *)) +
	       sizeof(char *) + 8;
}

/*
 * Two passes: the first validates and counts, the second copies. scratch
 * layout: the rcpts pointer array (aligned), the orcpts pointer array (if
 * any ORCPT), the strings, then the notify bytes (if any NOTIFY).
 */
enum spool_dec
spool_env_decode(const uint8_t *p, size_t n, struct fd_envelope *env,
		 void *scratch, size_t scratch_len)
{
	unsigned seen = 0, n_rcpts = 0;
	unsigned rcpt_dsn = 0; /* DSN items seen for the current RCPT */
	size_t off = 0, strbytes = 0;
	bool ended = false, in_rcpt = false;
	bool any_notify = false, any_orcpt = false;

	while (off < n) {
		unsigned type;
		size_t len;

		if (n - off < SPOOL_ITEM_HDR_LEN)
			return SPOOL_DEC_ERR_ITEM;
		type = p[off];
		len = spool_get16(p + off + 1);
		off += SPOOL_ITEM_HDR_LEN;
		if (len > n - off)
			return SPOOL_DEC_ERR_ITEM;
		switch (type) {
		case SPOOL_ITEM_END:
			if (len)
				return SPOOL_DEC_ERR_ITEM;
			ended = true;
			break;
		case SPOOL_ITEM_ENVID:
		case SPOOL_ITEM_RCPT_ORCPT:
			if (len == 0) /* the writer omits empty ones */
				return SPOOL_DEC_ERR_ITEM;
			/* fall through */
		case SPOOL_ITEM_MAIL_FROM:
		case SPOOL_ITEM_RCPT:
		case SPOOL_ITEM_HELO:
		case SPOOL_ITEM_CLIENT_ADDR:
		case SPOOL_ITEM_PROTO:
			if (memchr(p + off, 0, len))
				return SPOOL_DEC_ERR_ITEM;
			strbytes += len + 1;
			break;
		case SPOOL_ITEM_RET:
			if (len != 1 || p[off] < FD_RET_FULL ||
			    p[off] > FD_RET_HDRS)
				return SPOOL_DEC_ERR_ITEM;
			break;
		case SPOOL_ITEM_RCPT_NOTIFY:
			if (len != 1 || !notify_valid(p[off]))
				return SPOOL_DEC_ERR_ITEM;
			break;
		case SPOOL_ITEM_ARRIVAL_US:
		case SPOOL_ITEM_SIZE:
			if (len != 8)
				return SPOOL_DEC_ERR_ITEM;
			break;
		case SPOOL_ITEM_BODY:
			if (len != 1 || p[off] > FD_BODY_BINARYMIME)
				return SPOOL_DEC_ERR_ITEM;
			break;
		case SPOOL_ITEM_SMTPUTF8:
			if (len != 1 || p[off] > 1)
				return SPOOL_DEC_ERR_ITEM;
			break;
		default:
			return SPOOL_DEC_ERR_ITEM;
		}
		if (type == SPOOL_ITEM_RCPT) {
			n_rcpts++;
			in_rcpt = true;
			rcpt_dsn = 0;
		} else if (type == SPOOL_ITEM_RCPT_NOTIFY ||
			   type == SPOOL_ITEM_RCPT_ORCPT) {
			/* Only right after its RCPT (or that RCPT's other
			 * DSN item), once each. */
			if (!in_rcpt || (rcpt_dsn & (1u << type)))
				return SPOOL_DEC_ERR_ITEM;
			rcpt_dsn |= 1u << type;
			any_notify |= type == SPOOL_ITEM_RCPT_NOTIFY;
			any_orcpt |= type == SPOOL_ITEM_RCPT_ORCPT;
		} else {
			in_rcpt = false;
			if (seen & (1u << type))
				return SPOOL_DEC_ERR_ITEM; /* duplicate */
			seen |= 1u << type;
		}
		off += len;
		if (ended)
			break;
	}
	if (!ended || off != n || !(seen & (1u << SPOOL_ITEM_MAIL_FROM)))
		return SPOOL_DEC_ERR_ITEM;

	/* Pass 2. */
	uintptr_t base = (uintptr_t)scratch;
	size_t pad = (sizeof(char *) - base % sizeof(char *)) % sizeof(char *);
	size_t n_ptrs = (size_t)n_rcpts * (any_orcpt ? 2 : 1);
	size_t need = pad + n_ptrs * sizeof(char *) + strbytes +
		      (any_notify ? n_rcpts : 0);
	if (need > scratch_len)
		return SPOOL_DEC_ERR_LEN;
	const char **rc = (const char **)(void *)((char *)scratch + pad);
	const char **oc = any_orcpt ? rc + n_rcpts : NULL;
	char *s = (char *)(rc + n_ptrs);
	uint8_t *nt = any_notify ? (uint8_t *)s + strbytes : NULL;
	static const char empty[] = "";
	unsigned ri = 0;

	memset(env, 0, sizeof(*env));
	env->mail_from = env->helo = env->client_addr = env->proto = empty;
	env->envid = empty;
	env->rcpts = rc;
	env->n_rcpts = n_rcpts;
	env->notify = nt;
	env->orcpts = oc;
	off = 0;
	for (;;) {
		unsigned type = p[off];
		size_t len = spool_get16(p + off + 1);
		const uint8_t *v = p + off + SPOOL_ITEM_HDR_LEN;
		const char *str = s;

		off += SPOOL_ITEM_HDR_LEN + len;
		switch (type) {
		case SPOOL_ITEM_MAIL_FROM:
		case SPOOL_ITEM_RCPT:
		case SPOOL_ITEM_HELO:
		case SPOOL_ITEM_CLIENT_ADDR:
		case SPOOL_ITEM_PROTO:
		case SPOOL_ITEM_ENVID:
		case SPOOL_ITEM_RCPT_ORCPT:
			memcpy(s, v, len);
			s[len] = '\0';
			s += len + 1;
			break;
		default:
			break;
		}
		switch (type) {
		case SPOOL_ITEM_END:
			return SPOOL_DEC_OK;
		case SPOOL_ITEM_MAIL_FROM:
			env->mail_from = str;
			break;
		case SPOOL_ITEM_RCPT:
			if (oc)
				oc[ri] = empty;
			if (nt)
				nt[ri] = FD_NOTIFY_NONE;
			rc[ri++] = str;
			break;
		case SPOOL_ITEM_RCPT_NOTIFY:
			/* pass 1: ri >= 1 and nt != NULL here */
			if (ri == 0 || !nt)
				return SPOOL_DEC_ERR_ITEM;
			nt[ri - 1] = v[0];
			break;
		case SPOOL_ITEM_RCPT_ORCPT:
			if (ri == 0 || !oc)
				return SPOOL_DEC_ERR_ITEM;
			oc[ri - 1] = str;
			break;
		case SPOOL_ITEM_ENVID:
			env->envid = str;
			break;
		case SPOOL_ITEM_RET:
			env->ret = (enum fd_dsn_ret)v[0];
			break;
		case SPOOL_ITEM_HELO:
			env->helo = str;
			break;
		case SPOOL_ITEM_CLIENT_ADDR:
			env->client_addr = str;
			break;
		case SPOOL_ITEM_PROTO:
			env->proto = str;
			break;
		case SPOOL_ITEM_ARRIVAL_US:
			env->arrival_us = spool_get64(v);
			break;
		case SPOOL_ITEM_SIZE:
			env->size_param = spool_get64(v);
			break;
		case SPOOL_ITEM_BODY:
			env->body = (enum fd_body_type)v[0];
			break;
		case SPOOL_ITEM_SMTPUTF8:
			env->smtputf8 = v[0] != 0;
			break;
		default:
			return SPOOL_DEC_ERR_ITEM; /* pass 1 made this impossible */
		}
	}
}

/* ---- CRC combination --------------------------------------------------- */

/*
 * In the reflected representation bit 31 is x^0 and bit 0 is x^31.
 * crc(A||B) = crc(A) * x^(8|B|) + crc(B)  (mod P): the pre- and post-
 * inversion cancel because both use all ones.
 */
#define CRC32C_POLY 0x82F63B78u

static uint32_t
gf2_mulmod(uint32_t a, uint32_t b)
{
	uint32_t prod = 0;

	for (int i = 0; i < 32; i++) {
		if (a & 0x80000000u)
			prod ^= b;
		a <<= 1;
		b = (b & 1) ? (b >> 1) ^ CRC32C_POLY : b >> 1;
	}
	return prod;
}

#if defined(__x86_64__)
#include <immintrin.h>

/*
 * The same product with one carry-less multiply: clmul(a, b) has the
 * coefficient of x^(62-k) at bit k; shifted left by one, bit k holds
 * x^(63-k), so its low half is L * x^32 and its high half H, each a
 * reflected 32-bit polynomial. The CRC instruction on L from zero gives
 * L * x^32 mod P: the product mod P is that plus H.
 */
__attribute__((target("pclmul,sse4.2"))) static uint32_t
clmul_mulmod(uint32_t a, uint32_t b)
{
	__m128i p = _mm_clmulepi64_si128(_mm_cvtsi32_si128((int)a),
					 _mm_cvtsi32_si128((int)b), 0x00);
	uint64_t v = (uint64_t)_mm_cvtsi128_si64(p) << 1;

	return _mm_crc32_u32(0, (uint32_t)v) ^ (uint32_t)(v >> 32);
}
#endif

/* x^(8 * 2^k) mod P, k = 0..63, and the multiplication to use. */
static uint32_t pow8[64];
static uint32_t (*mulmod)(uint32_t, uint32_t) = gf2_mulmod;
static pthread_once_t pow8_once = PTHREAD_ONCE_INIT;

static void
pow8_init(void)
{
	uint32_t x = 0x40000000u; /* x^1 */

	for (int i = 0; i < 3; i++)
		x = gf2_mulmod(x, x); /* x^8 */
	for (int k = 0; k < 64; k++) {
		pow8[k] = x;
		x = gf2_mulmod(x, x);
	}
#if defined(__x86_64__)
	if (__builtin_cpu_supports("pclmul") &&
	    __builtin_cpu_supports("sse4.2"))
		mulmod = clmul_mulmod;
#endif
}

uint32_t
spool_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b)
{
	uint32_t m = 0x80000000u; /* x^0 */

	pthread_once(&pow8_once, pow8_init);
	for (int k = 0; len_b; k++, len_b >>= 1)
		if (len_b & 1)
			m = mulmod(m, pow8[k]);
	return mulmod(m, crc_a) ^ crc_b;
}

/* ---- segment walk ------------------------------------------------------ */

/* Make [off, off+n) available in the window; n <= win_len - SPOOL_BLOCK. */
static int
win_get(struct spool_walk *w, uint64_t off, size_t n, const uint8_t **out)
{
	if (off < w->win_off || off + n > w->win_off + w->win_have) {
		uint64_t start = off & ~(uint64_t)(SPOOL_BLOCK - 1);
		size_t want = w->win_len;
		long r;

		if (start + want > w->size)
			want = (size_t)(w->size - start);
		r = w->read(w->read_ctx, start, w->win, want);
		if (r < 0)
			return (int)r;
		w->win_off = start;
		w->win_have = (size_t)r;
		if (off + n > start + (uint64_t)r)
			return -EIO; /* the source is shorter than it said */
	}
	*out = w->win + (off - w->win_off);
	return 0;
}

static uint64_t
next_block(uint64_t pos)
{
	return (pos / SPOOL_BLOCK + 1) * SPOOL_BLOCK;
}

int
spool_walk_segment(struct spool_walk *w, spool_walk_fn on_rec, void *ctx)
{
	uint64_t pos = w->start > SPOOL_BLOCK ? w->start : SPOOL_BLOCK;
	size_t chunk_max;
	int r = 0;

	if (w->win_len < SPOOL_WALK_WIN_MIN)
		return -EINVAL;
	chunk_max = w->win_len - SPOOL_BLOCK;
	w->win_off = 0;
	w->win_have = 0;
	while (pos + SPOOL_REC_HDR_LEN <= w->size &&
	       (!w->stop_at || pos < w->stop_at)) {
		struct spool_walk_rec rec;
		const uint8_t *p;
		uint8_t hdr[SPOOL_REC_HDR_LEN];
		uint64_t sz, padlen;
		uint32_t pcrc = 0;

		r = win_get(w, pos, SPOOL_REC_HDR_LEN, &p);
		if (r)
			goto out;
		if (spool_get32(p) == 0) { /* padding up to the block end */
			pos = next_block(pos);
			continue;
		}
		if (spool_rec_hdr_decode(p, SPOOL_REC_HDR_LEN, &rec.h) !=
		    SPOOL_DEC_OK)
			goto bad;
		sz = spool_rec_size(rec.h.len);
		if (sz > w->size - pos)
			goto bad;
		memcpy(hdr, p, sizeof(hdr));
		padlen = sz - SPOOL_REC_HDR_LEN - rec.h.len;
		rec.payload = NULL;
		if (sz <= chunk_max) {
			r = win_get(w, pos, (size_t)sz, &p);
			if (r)
				goto out;
			rec.payload = p + SPOOL_REC_HDR_LEN;
			pcrc = fd_crc32c(0, rec.payload, rec.h.len);
			if (!all_zero(rec.payload + rec.h.len, (size_t)padlen))
				goto bad;
		} else {
			uint64_t o = pos + SPOOL_REC_HDR_LEN, left = rec.h.len;
			while (left) {
				size_t k = left < chunk_max ? (size_t)left
							    : chunk_max;
				r = win_get(w, o, k, &p);
				if (r)
					goto out;
				pcrc = fd_crc32c(pcrc, p, k);
				o += k;
				left -= k;
			}
			r = win_get(w, o, (size_t)padlen, &p);
			if (r)
				goto out;
			if (!all_zero(p, (size_t)padlen))
				goto bad;
		}
		if (spool_rec_crc(hdr, pcrc) != rec.h.crc)
			goto bad;
		if (rec.h.epoch != w->epoch) {
			/* Intact, but from an earlier use of the segment or
			 * forged inside a body: never valid here. */
			w->records_stale++;
			pos = next_block(pos);
			continue;
		}
		w->records_ok++;
		rec.off = pos;
		rec.payload_crc = pcrc;
		r = on_rec(ctx, &rec);
		pos += sz;
		if (r)
			goto out;
		continue;
bad:
		w->records_bad++;
		pos = next_block(pos);
	}
out:
	w->end = pos;
	return r;
}

long
spool_read_fd(void *ctx, uint64_t off, void *buf, size_t n)
{
	int fd = *(const int *)ctx;
	size_t got = 0;

	while (got < n) {
		ssize_t r = pread(fd, (char *)buf + got, n - got,
				  (off_t)(off + got));
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			break;
		got += (size_t)r;
	}
	return (long)got;
}
