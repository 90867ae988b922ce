/*
 * The control protocol's JSON reader (and base64) on arbitrary bytes: what
 * a client may send the daemon's control socket. Whatever parses must
 * describe itself consistently (token ends nest, strings decode to exactly
 * their length with no NUL inside), and written back with the writer it
 * must parse again to the same shape; base64 that decodes must encode back
 * to the same text (only canonical base64 is accepted).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ctljson.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Write token t (and its children) with the writer; the next token. */
static uint32_t
rewrite(const struct ctl_json *j, uint32_t t, struct ctl_jw *w, char *sbuf,
	size_t sbuf_len)
{
	const struct ctl_json_tok *k = &j->tok[t];
	uint32_t c = t + 1;
	long n;

	switch (k->type) {
	case CTL_JSON_OBJECT:
	case CTL_JSON_ARRAY:
		if (k->type == CTL_JSON_OBJECT)
			ctl_jw_obj(w);
		else
			ctl_jw_arr(w);
		for (uint32_t i = 0; i < k->count; i++) {
			if (k->type == CTL_JSON_OBJECT) {
				n = ctl_json_string(j, c, sbuf, sbuf_len);
				if (n < 0)
					abort();
				ctl_jw_key(w, sbuf);
				c++;
			}
			c = rewrite(j, c, w, sbuf, sbuf_len);
		}
		if (k->type == CTL_JSON_OBJECT)
			ctl_jw_obj_end(w);
		else
			ctl_jw_arr_end(w);
		if (c != k->end)
			abort();
		return c;
	case CTL_JSON_STRING:
		n = ctl_json_string(j, t, sbuf, sbuf_len);
		if (n < 0 || strlen(sbuf) != (size_t)n)
			abort(); /* no NUL can hide inside */
		ctl_jw_strn(w, sbuf, (size_t)n);
		return c;
	case CTL_JSON_NUMBER:
	case CTL_JSON_TRUE:
	case CTL_JSON_FALSE:
	case CTL_JSON_NULL:
		ctl_jw_raw(w, j->text + k->start, k->len);
		return c;
	}
	abort();
}

static void
fuzz_b64(const uint8_t *data, size_t size)
{
	uint8_t *bin = malloc(size / 4 * 3 + 1);
	char *enc = malloc(ctl_b64_len(size) + 1);
	long n;

	if (!bin || !enc)
		goto out;
	if (size % 4 == 0) {
		n = ctl_b64_decode((const char *)data, size, bin);
		if (n >= 0) {
			if (ctl_b64_len((size_t)n) != size)
				abort();
			ctl_b64_encode(bin, (size_t)n, enc);
			if (memcmp(enc, data, size) != 0)
				abort();
		}
	}
	ctl_b64_encode(data, size, enc);
	free(bin);
	bin = malloc(size + 3);
	if (!bin)
		goto out;
	n = ctl_b64_decode(enc, ctl_b64_len(size), bin);
	if (n != (long)size || (size && memcmp(bin, data, size) != 0))
		abort();
out:
	free(bin);
	free(enc);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint32_t cap = (uint32_t)(size / 2 + 4);
	struct ctl_json_tok *tok = malloc(cap * sizeof(*tok));
	struct ctl_json_tok *tok2 = malloc((cap * 2 + 8) * sizeof(*tok2));
	char *sbuf = malloc(size + 1);
	struct ctl_json j, j2;
	struct ctl_jw w;

	if (!tok || !tok2 || !sbuf)
		goto out;
	if (ctl_json_parse(&j, (const char *)data, size, tok, cap) == 0) {
		for (uint32_t i = 0; i < j.n; i++)
			if (tok[i].end <= i || tok[i].end > j.n ||
			    (size_t)tok[i].start + tok[i].len > size)
				abort();
		if (tok[0].end != j.n)
			abort();
		ctl_jw_init(&w, 0);
		if (rewrite(&j, 0, &w, sbuf, size + 1) != j.n || w.err)
			abort();
		/* What the writer made is JSON of the same shape. */
		if (ctl_json_parse(&j2, w.buf, w.len, tok2, cap * 2 + 8) != 0 ||
		    j2.n != j.n)
			abort();
		for (uint32_t i = 0; i < j.n; i++)
			if (tok2[i].type != tok[i].type ||
			    tok2[i].count != tok[i].count ||
			    tok2[i].end != tok[i].end)
				abort();
		ctl_jw_free(&w);
	} else if (!j.err || j.err_off > size) {
		abort();
	}
	fuzz_b64(data, size);
out:
	free(tok);
	free(tok2);
	free(sbuf);
	return 0;
}
