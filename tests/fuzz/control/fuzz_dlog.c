/*
 * The delivery log's decoders on arbitrary bytes. Byte 0 picks the mode:
 *   0  records back to back (salt 0): each OK must re-encode to the same
 *      bytes, and its prefixes must not decode OK;
 *   1  a file header: OK must re-encode to the same bytes;
 *   2  a whole file image through the replay scanner, as is;
 *   3  the same after sealing: header CRCs and every plausible record
 *      re-encoded with the header's salt, so the fuzzer reaches the
 *      scanner's checkpoint and resync logic without forging CRCs (in
 *      the version 2 layout when byte 4 of the image is 2 and it holds
 *      8 KiB, else in version 1's).
 * Scanner invariants: only public records come out, with sane text; the
 * end lies within the image; and the image cut at that end replays the
 * same records (what follows the end held nothing valid).
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dlog.h"
#include "finaldot/log.h"
#include "finaldot/spool_format.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
records(const uint8_t *p, size_t n)
{
	uint8_t out[DLOG_REC_MAX];

	for (size_t off = 0; off < n;) {
		struct dlog_rec r, r2;
		size_t used, k;

		if (dlog_decode(p + off, n - off, &r, &used) != DLOG_DEC_OK) {
			off += 8;
			continue;
		}
		k = dlog_encode(&r, out, sizeof(out));
		if (k != used || memcmp(out, p + off, used) != 0)
			abort();
		if (dlog_decode(p + off, used - 1, &r2, &k) == DLOG_DEC_OK)
			abort();
		off += used;
	}
}

static void
header(const uint8_t *p, size_t n)
{
	struct dlog_file_hdr h;
	uint8_t out[DLOG_FILE_HDR_LEN];

	if (dlog_file_hdr_decode(p, n, &h) != DLOG_DEC_OK)
		return;
	dlog_file_hdr_encode(&h, out);
	if (memcmp(out, p, sizeof(out)) != 0)
		abort();
}

struct seen {
	uint64_t n;
	uint64_t sum; /* of msgid ^ type ^ text_len, order-sensitive mix */
};

static int
check(void *ctx, const struct dlog_rec *r)
{
	struct seen *s = ctx;

	if (!dlog_type_is_public(r->type) || r->text_len > DLOG_TEXT_MAX ||
	    (r->text_len == 0) != (r->text == NULL))
		abort();
	s->n++;
	s->sum = s->sum * 31 + (r->msgid ^ (uint64_t)r->type ^ r->text_len);
	return 0;
}

static void
image(const uint8_t *p, size_t n)
{
	struct dlog_scan_result res, res2;
	struct seen a = { 0 }, b = { 0 };

	if (dlog_scan_mem(p, n, check, &a, &res) != 0)
		return; /* out of memory */
	if (!res.hdr_ok) {
		if (a.n || res.records)
			abort();
		return;
	}
	if (a.n != res.records || res.records_bad > n / 8 ||
	    res.end < res.data_off || (a.n && res.end > n))
		abort();
	if (res.end > n)
		return;
	if (dlog_scan_mem(p, (size_t)res.end, check, &b, &res2) != 0)
		return;
	if (b.n != a.n || b.sum != a.sum || res2.records_bad != res.records_bad)
		abort();
}

static void
seal(uint8_t *p, size_t n)
{
	uint64_t salt;
	/* the layout byte 4 names: 2 (an image of 8 KiB or more), else 1 */
	bool v2 = n >= DLOG_FILE_DATA_OFF && p[4] == 2;
	size_t hdr1 = v2 ? DLOG_FILE_HDR1_OFF : DLOG_FILE_V1_HDR1_OFF;
	size_t data = v2 ? DLOG_FILE_DATA_OFF : DLOG_FILE_V1_DATA_OFF;

	if (n < data)
		return;
	for (unsigned c = 0; c < 2; c++) {
		uint8_t *h = p + (c ? hdr1 : 0);
		uint64_t g = spool_get64(h + 8);
		struct dlog_file_hdr fh = {
			.version = v2 ? 2 : 1,
			.generation = g ? g : 1,
			.prev_generation = spool_get64(h + 16),
			.created_us = spool_get64(h + 24),
			.salt = spool_get64(h + 32),
		};
		dlog_file_hdr_encode(&fh, h);
	}
	salt = spool_get64(p + 32);
	/* from the end, so a record's text holds its inner records sealed */
	for (size_t off = (n - 8) & ~(size_t)7; off >= data; off -= 8) {
		uint8_t *q = p + off, text[DLOG_TEXT_MAX];
		struct dlog_rec r;
		size_t tlen;

		if (n - off < DLOG_REC_HDR_LEN || memcmp(q, "FDDL", 4) != 0)
			continue;
		tlen = spool_get16(q + 6);
		if (tlen > DLOG_TEXT_MAX || dlog_rec_size(tlen) > n - off)
			continue;
		memset(&r, 0, sizeof(r));
		r.type = (enum dlog_type)q[5];
		r.rcpt = spool_get32(q + 12);
		r.msgid = spool_get64(q + 16);
		r.time_us = spool_get64(q + 24);
		r.next_us = spool_get64(q + 32);
		r.aux = spool_get64(q + 40);
		r.attempts = spool_get32(q + 48);
		memcpy(text, q + DLOG_REC_HDR_LEN, tlen); /* no overlap */
		r.text = (const char *)text;
		r.text_len = (uint16_t)tlen;
		/* invalid types are refused and stay as they are */
		(void)dlog_encode_salted(&r, salt, q, n - off);
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint8_t *copy;

	fd_log_set_level(FD_LOG_ERR); /* damage warnings are the point */
	if (size < 1)
		return 0;
	switch (data[0] & 3) {
	case 0:
		records(data + 1, size - 1);
		break;
	case 1:
		header(data + 1, size - 1);
		break;
	case 2:
		image(data + 1, size - 1);
		break;
	default:
		copy = malloc(size);
		if (!copy)
			return 0;
		memcpy(copy, data + 1, size - 1);
		seal(copy, size - 1);
		image(copy, size - 1);
		free(copy);
		break;
	}
	return 0;
}
