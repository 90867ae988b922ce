/*
 * Deterministic message text for fd-loadgen (see lg_msg.h for the
 * contract). Body lines come from a fixed-seed xorshift generator: mostly
 * 40..78 printable characters, every 5th line long (up to LG_MSG_LINE_MAX),
 * every 7th starting with '.', every 11th a lone "." — the shapes that break
 * careless dot-stuffing and line-length handling. The last line is sized so
 * the total is exact.
 */
#include "lg_msg.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t
lg_rand(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

static const char lg_alphabet[] =
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        "     ,;:!?-_=+*/()<>[]{}'\"#%&@~";

static void
lg_fill_line(char *p, size_t n, unsigned idx, uint64_t *rs)
{
	for (size_t i = 0; i < n; i++)
		p[i] = lg_alphabet[lg_rand(rs) % (sizeof(lg_alphabet) - 1)];
	if (n > 0 && idx % 7 == 3)
		p[0] = '.';
}

/* Content length of body line idx, before fitting to what remains. */
static size_t
lg_line_len(unsigned idx, uint64_t *rs)
{
	if (idx % 11 == 5)
		return 1; /* a lone "." */
	if (idx % 5 == 4)
		return 200 + (size_t)(lg_rand(rs) % (LG_MSG_LINE_MAX - 199));
	return 40 + (size_t)(lg_rand(rs) % 39);
}

static size_t
lg_make_body(char *b, size_t len)
{
	uint64_t rs = 0x9e3779b97f4a7c15ull;
	size_t used = 0;
	for (unsigned idx = 0; used < len; idx++) {
		size_t left = len - used;
		size_t n = lg_line_len(idx, &rs);
		if (left <= LG_MSG_LINE_MAX + 2) {
			/* the last line: take exactly what is left */
			n = left >= 2 ? left - 2 : 0;
		} else if (left - (n + 2) < 2) {
			/* never leave 1 octet, which cannot be a line */
			n = n > 1 ? n - 1 : n + 1;
		}
		if (left < 2) {
			/* only when len == 1: cannot happen, see caller */
			break;
		}
		lg_fill_line(b + used, n, idx, &rs);
		if (idx % 11 == 5 && n == 1)
			b[used] = '.';
		used += n;
		b[used++] = '\r';
		b[used++] = '\n';
	}
	return used;
}

int
lg_msg_build(struct lg_msg *m, size_t size, const char *from, const char *to,
             const char *host, const char *date, uint64_t run_id)
{
	memset(m, 0, sizeof(*m));
	char head[2048];
	int n = snprintf(head, sizeof(head),
	                 "From: <%s>\r\n"
	                 "To: <%s>\r\n"
	                 "Subject: finaldot load test\r\n"
	                 "Date: %s\r\n"
	                 "MIME-Version: 1.0\r\n"
	                 "Content-Type: text/plain; charset=us-ascii\r\n"
	                 "Message-ID: <%016" PRIx64 ".",
	                 from, to, date, run_id);
	if (n < 0 || (size_t)n + LG_MSG_ID_DIGITS + 300 > sizeof(head))
		return -EINVAL;
	size_t id_off = (size_t)n;
	int k = snprintf(head + n, sizeof(head) - (size_t)n, "%0*d@%s>\r\n\r\n",
	                 LG_MSG_ID_DIGITS, 0, host);
	if (k < 0 || (size_t)n + (size_t)k >= sizeof(head))
		return -EINVAL;
	size_t head_len = (size_t)n + (size_t)k;

	size_t body_len = size > head_len ? size - head_len : 0;
	if (body_len == 1) {
		/* one octet is not a line: make the empty line a body line */
		body_len = 2;
	}
	m->head = malloc(head_len);
	m->body_raw = malloc(body_len + 1);
	m->body_stuffed = malloc(lg_dotstuff_bound(body_len) + 1);
	if (!m->head || !m->body_raw || !m->body_stuffed) {
		lg_msg_free(m);
		return -ENOMEM;
	}
	memcpy(m->head, head, head_len);
	m->head_len = head_len;
	m->id_off = id_off;
	m->body_raw_len = lg_make_body(m->body_raw, body_len);
	m->body_stuffed_len =
	        lg_dotstuff(m->body_stuffed, m->body_raw, m->body_raw_len);
	return 0;
}

void
lg_msg_free(struct lg_msg *m)
{
	free(m->head);
	free(m->body_raw);
	free(m->body_stuffed);
	memset(m, 0, sizeof(*m));
}

void
lg_msg_set_id(const struct lg_msg *m, char *head, uint64_t seq)
{
	static const char hex[] = "0123456789abcdef";
	char *p = head + m->id_off;
	for (int i = LG_MSG_ID_DIGITS - 1; i >= 0; i--) {
		p[i] = hex[seq & 0xf];
		seq >>= 4;
	}
}

size_t
lg_dotstuff_bound(size_t len)
{
	/* a stuffed line is at least ".\r\n": one extra octet per 3 */
	return len + len / 3 + 1;
}

size_t
lg_dotstuff(char *dst, const char *src, size_t len)
{
	size_t o = 0;
	int at_line_start = 1;
	for (size_t i = 0; i < len; i++) {
		if (at_line_start && src[i] == '.')
			dst[o++] = '.';
		dst[o++] = src[i];
		at_line_start = src[i] == '\n';
	}
	return o;
}
