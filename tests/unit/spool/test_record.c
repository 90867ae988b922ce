/*
 * The record codec: round trips, and every corruption or truncation of an
 * encoded record is detected (AGAIN for a valid prefix, ERR otherwise).
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "finaldot/crc32c.h"
#include "finaldot/spool_format.h"

TestSuite(record);

#define EPOCH 0x1122334455667788ull

static const char *const rcpts[] = { "a@example.org", "b@example.net",
				     "\xc3\xa9t\xc3\xa9@example.com" };

static struct fd_envelope
sample_env(void)
{
	struct fd_envelope e = {
		.mail_from = "sender@example.org",
		.rcpts = rcpts,
		.n_rcpts = 3,
		.helo = "mx.example.org",
		.client_addr = "2001:db8::1",
		.proto = "ESMTP",
		.arrival_us = 1700000000123456ull,
		.size_param = 12345,
		.body = FD_BODY_8BITMIME,
		.smtputf8 = true,
	};
	return e;
}

static size_t
make_record(uint8_t type, const void *payload, size_t len, uint8_t *out,
	    size_t cap)
{
	struct spool_rec_hdr h = {
		.type = type,
		.epoch = EPOCH,
		.msgid = 0xABCDEF0102030405ull,
		.offset = type == SPOOL_REC_DATA ? 4096 : type == SPOOL_REC_END ? 777 : 0,
		.aux = type == SPOOL_REC_END ? 0xDEADBEEF : 0,
	};
	return spool_rec_encode(&h, payload, len, out, cap);
}

static size_t
make_env_record(uint8_t *out, size_t cap)
{
	struct fd_envelope e = sample_env();
	uint8_t pl[1024];
	size_t n = spool_env_encode(&e, pl, sizeof(pl));

	cr_assert_gt(n, 0);
	return make_record(SPOOL_REC_ENV, pl, n, out, cap);
}

Test(record, envelope_round_trip)
{
	struct fd_envelope e = sample_env(), d;
	uint8_t pl[1024];
	size_t n = spool_env_encode(&e, pl, sizeof(pl));
	size_t sl = spool_env_scratch_len(n);
	void *scr = malloc(sl);

	cr_assert_eq(n, spool_env_encoded_len(&e));
	cr_assert_eq(spool_env_decode(pl, n, &d, scr, sl), SPOOL_DEC_OK);
	cr_assert_str_eq(d.mail_from, e.mail_from);
	cr_assert_eq(d.n_rcpts, 3);
	for (unsigned i = 0; i < 3; i++)
		cr_assert_str_eq(d.rcpts[i], rcpts[i]);
	cr_assert_str_eq(d.helo, e.helo);
	cr_assert_str_eq(d.client_addr, e.client_addr);
	cr_assert_str_eq(d.proto, e.proto);
	cr_assert_eq(d.arrival_us, e.arrival_us);
	cr_assert_eq(d.size_param, e.size_param);
	cr_assert_eq(d.body, e.body);
	cr_assert_eq(d.smtputf8, true);
	free(scr);
}

Test(record, envelope_null_sender_every_body_type)
{
	for (int b = FD_BODY_NONE; b <= FD_BODY_BINARYMIME; b++) {
		struct fd_envelope e = sample_env(), d;
		e.mail_from = "";
		e.n_rcpts = 1;
		e.body = (enum fd_body_type)b;
		e.smtputf8 = false;
		uint8_t pl[512], scr[2048];
		size_t n = spool_env_encode(&e, pl, sizeof(pl));
		cr_assert_eq(spool_env_decode(pl, n, &d, scr, sizeof(scr)),
			     SPOOL_DEC_OK);
		cr_assert_str_eq(d.mail_from, "");
		cr_assert_eq(d.body, b);
		cr_assert_eq(d.smtputf8, false);
		cr_assert_eq(d.n_rcpts, 1);
	}
}

Test(record, envelope_too_big_refused)
{
	static char big[SPOOL_ITEM_MAX + 2];
	struct fd_envelope e = sample_env();

	memset(big, 'x', sizeof(big) - 1);
	e.helo = big;
	cr_assert_eq(spool_env_encoded_len(&e), 0);
	uint8_t out[64];
	cr_assert_eq(spool_env_encode(&e, out, sizeof(out)), 0);
}

Test(record, envelope_malformed_rejected)
{
	struct fd_envelope e = sample_env(), d;
	uint8_t pl[1024], scr[8192];
	size_t n = spool_env_encode(&e, pl, sizeof(pl));

	/* truncated at every point */
	for (size_t k = 0; k < n; k++)
		cr_assert_neq(spool_env_decode(pl, k, &d, scr, sizeof(scr)),
			      SPOOL_DEC_OK, "prefix %zu", k);
	/* trailing garbage */
	pl[n] = 0;
	cr_assert_neq(spool_env_decode(pl, n + 1, &d, scr, sizeof(scr)),
		      SPOOL_DEC_OK);
	/* unknown item type */
	uint8_t bad[] = { 1, 1, 0, 'a', 99, 0, 0, 0, 0, 0 };
	cr_assert_eq(spool_env_decode(bad, sizeof(bad), &d, scr, sizeof(scr)),
		     SPOOL_DEC_ERR_ITEM);
	/* duplicate MAIL_FROM */
	uint8_t dup[] = { 1, 1, 0, 'a', 1, 1, 0, 'b', 0, 0, 0 };
	cr_assert_eq(spool_env_decode(dup, sizeof(dup), &d, scr, sizeof(scr)),
		     SPOOL_DEC_ERR_ITEM);
	/* missing MAIL_FROM */
	uint8_t nomf[] = { 2, 1, 0, 'a', 0, 0, 0 };
	cr_assert_eq(spool_env_decode(nomf, sizeof(nomf), &d, scr, sizeof(scr)),
		     SPOOL_DEC_ERR_ITEM);
	/* NUL inside a string */
	uint8_t nul[] = { 1, 2, 0, 'a', 0, 0, 0, 0 };
	cr_assert_eq(spool_env_decode(nul, sizeof(nul), &d, scr, sizeof(scr)),
		     SPOOL_DEC_ERR_ITEM);
	/* scratch too small */
	cr_assert_neq(spool_env_decode(pl, n, &d, scr, 8), SPOOL_DEC_OK);
}

Test(record, round_trip_every_type)
{
	uint8_t rec[2048], body[100];
	struct spool_rec_hdr h;
	const uint8_t *pl;
	size_t used;

	for (size_t i = 0; i < sizeof(body); i++)
		body[i] = (uint8_t)(i * 7);
	size_t n = make_env_record(rec, sizeof(rec));
	cr_assert_eq(n % 8, 0);
	cr_assert_eq(spool_rec_decode(rec, n, EPOCH, &h, &pl, &used), SPOOL_DEC_OK);
	cr_assert_eq(h.type, SPOOL_REC_ENV);
	cr_assert_eq(used, n);
	cr_assert_eq(h.msgid, 0xABCDEF0102030405ull);

	for (size_t len = 1; len <= 17; len++) {
		n = make_record(SPOOL_REC_DATA, body, len, rec, sizeof(rec));
		cr_assert_eq(n, spool_rec_size(len));
		cr_assert_eq(spool_rec_decode(rec, n, EPOCH, &h, &pl, &used),
			     SPOOL_DEC_OK);
		cr_assert_eq(h.type, SPOOL_REC_DATA);
		cr_assert_eq(h.len, len);
		cr_assert_eq(h.offset, 4096);
		cr_assert_eq(memcmp(pl, body, len), 0);
	}
	n = make_record(SPOOL_REC_END, NULL, 0, rec, sizeof(rec));
	cr_assert_eq(n, SPOOL_REC_HDR_LEN);
	cr_assert_eq(spool_rec_decode(rec, n, EPOCH, &h, &pl, &used), SPOOL_DEC_OK);
	cr_assert_eq(h.type, SPOOL_REC_END);
	cr_assert_eq(h.offset, 777);
	cr_assert_eq(h.aux, 0xDEADBEEF);
	cr_assert_eq(spool_rec_encode(&h, NULL, 0, rec, 47), 0, "cap too small");
}

static void
check_all_corruptions(const uint8_t *rec, size_t n)
{
	uint8_t c[2048];
	struct spool_rec_hdr h;
	const uint8_t *pl;
	size_t used;

	for (size_t i = 0; i < n; i++) {
		for (unsigned bit = 0; bit < 8; bit++) {
			memcpy(c, rec, n);
			c[i] ^= (uint8_t)(1u << bit);
			enum spool_dec d =
				spool_rec_decode(c, n, EPOCH, &h, &pl, &used);
			/* A corrupted length may look like "need more": that
			 * is still not OK, and with all bytes present the
			 * walker treats it as invalid. */
			cr_assert_neq(d, SPOOL_DEC_OK, "byte %zu bit %u", i, bit);
		}
		for (unsigned v = 0; v < 256; v += 37) {
			memcpy(c, rec, n);
			if (c[i] == (uint8_t)v)
				continue;
			c[i] = (uint8_t)v;
			cr_assert_neq(spool_rec_decode(c, n, EPOCH, &h, &pl, &used),
				      SPOOL_DEC_OK, "byte %zu = %u", i, v);
		}
	}
}

Test(record, every_single_byte_corruption_detected)
{
	uint8_t rec[2048], body[29];

	for (size_t i = 0; i < sizeof(body); i++)
		body[i] = (uint8_t)(0x41 + i);
	check_all_corruptions(rec, make_env_record(rec, sizeof(rec)));
	/* 29 bytes: 3 padding bytes must be zero too */
	check_all_corruptions(rec, make_record(SPOOL_REC_DATA, body, 29, rec,
					       sizeof(rec)));
	check_all_corruptions(rec, make_record(SPOOL_REC_END, NULL, 0, rec,
					       sizeof(rec)));
}

Test(record, every_truncation_is_again)
{
	uint8_t rec[2048], body[50];
	struct spool_rec_hdr h;
	const uint8_t *pl;
	size_t used;

	memset(body, 'z', sizeof(body));
	size_t sizes[3];
	uint8_t recs[3][2048];
	sizes[0] = make_env_record(recs[0], sizeof(recs[0]));
	sizes[1] = make_record(SPOOL_REC_DATA, body, 50, recs[1], 2048);
	sizes[2] = make_record(SPOOL_REC_END, NULL, 0, recs[2], 2048);
	for (int r = 0; r < 3; r++)
		for (size_t k = 0; k < sizes[r]; k++)
			cr_assert_eq(spool_rec_decode(recs[r], k, EPOCH, &h, &pl,
						      &used),
				     SPOOL_DEC_AGAIN, "rec %d prefix %zu", r, k);
	/* A prefix that is not a record is an error, not AGAIN. */
	memcpy(rec, "XXXX", 4);
	cr_assert_eq(spool_rec_decode(rec, 3, EPOCH, &h, &pl, &used),
		     SPOOL_DEC_ERR_MAGIC);
	cr_assert_eq(spool_rec_decode(rec, 48, EPOCH, &h, &pl, &used),
		     SPOOL_DEC_ERR_MAGIC);
}

Test(record, stale_epoch_rejected)
{
	uint8_t rec[2048];
	struct spool_rec_hdr h;
	const uint8_t *pl;
	size_t used, n = make_env_record(rec, sizeof(rec));

	cr_assert_eq(spool_rec_decode(rec, n, EPOCH + 1, &h, &pl, &used),
		     SPOOL_DEC_ERR_EPOCH);
	cr_assert_eq(spool_rec_decode(rec, n, EPOCH, &h, &pl, &used),
		     SPOOL_DEC_OK);
}

Test(record, type_rules)
{
	uint8_t rec[256], body[8] = { 1 };
	struct spool_rec_hdr h = { .type = 9, .epoch = EPOCH };
	const uint8_t *pl;
	size_t used;

	size_t n = spool_rec_encode(&h, body, 8, rec, sizeof(rec));
	cr_assert_eq(spool_rec_decode(rec, n, EPOCH, &h, &pl, &used),
		     SPOOL_DEC_ERR_TYPE);
	struct spool_rec_hdr e = { .type = SPOOL_REC_END, .epoch = EPOCH };
	n = spool_rec_encode(&e, body, 8, rec, sizeof(rec)); /* END + payload */
	cr_assert_eq(spool_rec_decode(rec, n, EPOCH, &e, &pl, &used),
		     SPOOL_DEC_ERR_LEN);
	struct spool_rec_hdr d = { .type = SPOOL_REC_DATA, .epoch = EPOCH };
	n = spool_rec_encode(&d, body, 0, rec, sizeof(rec)); /* empty DATA */
	cr_assert_eq(spool_rec_decode(rec, n, EPOCH, &d, &pl, &used),
		     SPOOL_DEC_ERR_LEN);
}

Test(record, segment_header_round_trip_and_corruption)
{
	struct spool_seg_hdr h = { .worker = 7, .file_no = 3, .use_seq = 9,
				   .epoch = EPOCH, .created_us = 123,
				   .size = 1 << 20 }, d;
	uint8_t b[SPOOL_SEG_HDR_LEN], c[SPOOL_SEG_HDR_LEN];

	spool_seg_hdr_encode(&h, b);
	cr_assert_eq(spool_seg_hdr_decode(b, sizeof(b), &d), SPOOL_DEC_OK);
	cr_assert_eq(d.worker, 7);
	cr_assert_eq(d.file_no, 3);
	cr_assert_eq(d.use_seq, 9);
	cr_assert_eq(d.epoch, EPOCH);
	cr_assert_eq(d.created_us, 123);
	cr_assert_eq(d.size, 1 << 20);
	for (size_t i = 0; i < sizeof(b); i++) {
		memcpy(c, b, sizeof(b));
		c[i] ^= 0x10;
		cr_assert_neq(spool_seg_hdr_decode(c, sizeof(c), &d), SPOOL_DEC_OK,
			      "byte %zu", i);
	}
	cr_assert_eq(spool_seg_hdr_decode(b, 63, &d), SPOOL_DEC_AGAIN);
}

Test(record, crc_combine_matches_oneshot)
{
	uint8_t b[5000];
	unsigned seed = 99;

	for (size_t i = 0; i < sizeof(b); i++)
		b[i] = (uint8_t)rand_r(&seed);
	for (size_t cut = 0; cut <= sizeof(b); cut += 97) {
		uint32_t a = fd_crc32c(0, b, cut);
		uint32_t c = fd_crc32c(0, b + cut, sizeof(b) - cut);
		cr_assert_eq(spool_crc32c_combine(a, c, sizeof(b) - cut),
			     fd_crc32c(0, b, sizeof(b)), "cut %zu", cut);
	}
	cr_assert_eq(spool_crc32c_combine(0, fd_crc32c(0, b, 10), 10),
		     fd_crc32c(0, b, 10));
}

Test(record, dec_names_distinct)
{
	cr_assert_str_eq(spool_dec_name(SPOOL_DEC_OK), "ok");
	cr_assert_str_eq(spool_dec_name(SPOOL_DEC_AGAIN), "again");
	cr_assert_str_neq(spool_dec_name(SPOOL_DEC_ERR_CRC),
			  spool_dec_name(SPOOL_DEC_ERR_EPOCH));
}
