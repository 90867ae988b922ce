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

/* What the SMTP engine bounds a transaction's recipients by is the most
 * a recipient adds to the encoding, with NOTIFY and ORCPT or without. */
Test(record, a_recipient_adds_at_most_spool_env_rcpt_max)
{
	static const char *const rc[2] = { "a@example.org",
					   "bb@example.net" };
	static const char *const oc[2] = { "rfc822;a@example.org",
					   "rfc822;bb@example.net" };
	static const uint8_t nf[2] = { FD_NOTIFY_FAILURE, FD_NOTIFY_NEVER };
	struct fd_envelope e = sample_env();

	for (int with = 0; with < 2; with++) {
		size_t one, two;

		e.rcpts = rc;
		e.notify = with ? nf : NULL;
		e.orcpts = with ? oc : NULL;
		e.n_rcpts = 1;
		one = spool_env_encoded_len(&e);
		e.n_rcpts = 2;
		two = spool_env_encoded_len(&e);
		cr_assert(one && two);
		cr_assert_leq(two - one,
			      spool_env_rcpt_max(strlen(rc[1]),
						 with ? strlen(oc[1]) : 0));
		if (with) /* every item there: the bound is exact */
			cr_assert_eq(two - one,
				     spool_env_rcpt_max(strlen(rc[1]),
							strlen(oc[1])));
	}
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

/* ---- DSN items (RFC 3461) ---- */

static const uint8_t dsn_notify[] = { FD_NOTIFY_SUCCESS | FD_NOTIFY_FAILURE,
				      FD_NOTIFY_NONE, FD_NOTIFY_NEVER };
static const char *const dsn_orcpts[] = { "rfc822;a+2B1@example.org", "",
					  "utf-8;\\x{E9}t\\x{E9}@example.com" };

static struct fd_envelope
dsn_env(void)
{
	struct fd_envelope e = sample_env();

	e.envid = "QQ314159+2Bx";
	e.ret = FD_RET_HDRS;
	e.notify = dsn_notify;
	e.orcpts = dsn_orcpts;
	return e;
}

Test(record, envelope_dsn_round_trip)
{
	struct fd_envelope e = dsn_env(), d;
	uint8_t pl[1024];
	size_t n = spool_env_encode(&e, pl, sizeof(pl));
	size_t sl = spool_env_scratch_len(n);
	void *scr = malloc(sl);

	cr_assert_gt(n, 0);
	cr_assert_eq(n, spool_env_encoded_len(&e));
	cr_assert_eq(spool_env_decode(pl, n, &d, scr, sl), SPOOL_DEC_OK);
	cr_assert_str_eq(d.envid, "QQ314159+2Bx");
	cr_assert_eq(d.ret, FD_RET_HDRS);
	cr_assert_eq(d.n_rcpts, 3);
	cr_assert_not_null(d.notify);
	cr_assert_not_null(d.orcpts);
	for (unsigned i = 0; i < 3; i++) {
		cr_assert_str_eq(d.rcpts[i], rcpts[i]);
		cr_assert_eq(d.notify[i], dsn_notify[i], "rcpt %u", i);
		cr_assert_str_eq(d.orcpts[i], dsn_orcpts[i], "rcpt %u", i);
	}
	cr_assert_str_eq(d.mail_from, e.mail_from);
	cr_assert_eq(d.arrival_us, e.arrival_us);
	free(scr);

	/* Only NOTIFY, only on the last recipient: orcpts stays NULL. */
	static const uint8_t last_only[] = { 0, 0, FD_NOTIFY_DELAY };
	e = sample_env();
	e.notify = last_only;
	n = spool_env_encode(&e, pl, sizeof(pl));
	scr = malloc(spool_env_scratch_len(n));
	cr_assert_eq(spool_env_decode(pl, n, &d, scr, spool_env_scratch_len(n)),
		     SPOOL_DEC_OK);
	cr_assert_null(d.orcpts);
	cr_assert_eq(d.notify[0], FD_NOTIFY_NONE);
	cr_assert_eq(d.notify[2], FD_NOTIFY_DELAY);
	cr_assert_str_eq(d.envid, "");
	cr_assert_eq(d.ret, FD_RET_NONE);
	free(scr);
}

/* Without DSN parameters the payload is what it was before items 10-13:
 * this golden was made by the encoder that predates them. */
Test(record, envelope_without_dsn_is_byte_identical)
{
	static const char *const one[] = { "b" };
	static const uint8_t golden[] = {
		1, 1, 0, 'a', 2, 1, 0, 'b', 3, 1, 0, 'h', 4, 1, 0, 'c',
		5, 1, 0, 'P', 6, 8, 0, 1, 0, 0, 0, 0, 0, 0, 0,
		7, 8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 8, 1, 0, 2, 9, 1, 0, 1,
		0, 0, 0,
	};
	static const uint8_t none[] = { FD_NOTIFY_NONE };
	static const char *const empty[] = { "" };
	struct fd_envelope e = {
		.mail_from = "a", .rcpts = one, .n_rcpts = 1, .helo = "h",
		.client_addr = "c", .proto = "P", .arrival_us = 1,
		.size_param = 2, .body = FD_BODY_8BITMIME, .smtputf8 = true,
	};
	uint8_t pl[256], scr[1024];
	struct fd_envelope d;

	cr_assert_eq(spool_env_encode(&e, pl, sizeof(pl)), sizeof(golden));
	cr_assert_eq(memcmp(pl, golden, sizeof(golden)), 0);
	/* Present but empty DSN fields are not written either. */
	e.envid = "";
	e.notify = none;
	e.orcpts = empty;
	cr_assert_eq(spool_env_encode(&e, pl, sizeof(pl)), sizeof(golden));
	cr_assert_eq(memcmp(pl, golden, sizeof(golden)), 0);
	cr_assert_eq(spool_env_decode(golden, sizeof(golden), &d, scr,
				      sizeof(scr)),
		     SPOOL_DEC_OK);
	cr_assert_str_eq(d.envid, "");
	cr_assert_eq(d.ret, FD_RET_NONE);
	cr_assert_null(d.notify);
	cr_assert_null(d.orcpts);
}

Test(record, envelope_dsn_values_outside_their_enum_not_encoded)
{
	static const uint8_t bad_notify[] = { 0, FD_NOTIFY_NEVER |
						       FD_NOTIFY_DELAY, 0 };
	struct fd_envelope e = sample_env();
	uint8_t out[1024];

	e.notify = bad_notify;
	cr_assert_eq(spool_env_encoded_len(&e), 0);
	cr_assert_eq(spool_env_encode(&e, out, sizeof(out)), 0);
	e = sample_env();
	e.ret = (enum fd_dsn_ret)3;
	cr_assert_eq(spool_env_encoded_len(&e), 0);
}

static enum spool_dec
dec(const uint8_t *p, size_t n)
{
	static uint8_t scr[4096];
	struct fd_envelope d;

	return spool_env_decode(p, n, &d, scr, sizeof(scr));
}

Test(record, envelope_dsn_items_malformed_rejected)
{
	/* RCPT b, NOTIFY, ORCPT (either order) are fine. */
	uint8_t ok1[] = { 1, 1, 0, 'a', 2, 1, 0, 'b', 12, 1, 0, 2,
			  13, 3, 0, 'x', ';', 'y', 0, 0, 0 };
	uint8_t ok2[] = { 1, 1, 0, 'a', 2, 1, 0, 'b', 13, 3, 0, 'x', ';', 'y',
			  12, 1, 0, 1, 0, 0, 0 };
	cr_assert_eq(dec(ok1, sizeof(ok1)), SPOOL_DEC_OK);
	cr_assert_eq(dec(ok2, sizeof(ok2)), SPOOL_DEC_OK);
	/* NOTIFY before any RCPT */
	uint8_t first[] = { 12, 1, 0, 2, 1, 1, 0, 'a', 2, 1, 0, 'b', 0, 0, 0 };
	cr_assert_eq(dec(first, sizeof(first)), SPOOL_DEC_ERR_ITEM);
	/* NOTIFY after another item that followed the RCPT */
	uint8_t late[] = { 1, 1, 0, 'a', 2, 1, 0, 'b', 3, 1, 0, 'h',
			   12, 1, 0, 2, 0, 0, 0 };
	cr_assert_eq(dec(late, sizeof(late)), SPOOL_DEC_ERR_ITEM);
	/* ORCPT right after MAIL_FROM */
	uint8_t orc[] = { 2, 1, 0, 'b', 1, 1, 0, 'a', 13, 1, 0, 'x', 0, 0, 0 };
	cr_assert_eq(dec(orc, sizeof(orc)), SPOOL_DEC_ERR_ITEM);
	/* Two NOTIFYs for one RCPT; two ORCPTs for one RCPT */
	uint8_t dn[] = { 1, 1, 0, 'a', 2, 1, 0, 'b', 12, 1, 0, 2, 12, 1, 0, 4,
			 0, 0, 0 };
	cr_assert_eq(dec(dn, sizeof(dn)), SPOOL_DEC_ERR_ITEM);
	uint8_t dor[] = { 1, 1, 0, 'a', 2, 1, 0, 'b', 13, 1, 0, 'x', 12, 1, 0,
			  2, 13, 1, 0, 'y', 0, 0, 0 };
	cr_assert_eq(dec(dor, sizeof(dor)), SPOOL_DEC_ERR_ITEM);
	/* NOTIFY values: 0, NEVER|SUCCESS, an unknown bit; wrong length */
	uint8_t nv[] = { 1, 1, 0, 'a', 2, 1, 0, 'b', 12, 1, 0, 0, 0, 0, 0 };
	static const uint8_t bad_bits[] = { 0, 3, 16, 0x80 };
	for (size_t i = 0; i < sizeof(bad_bits); i++) {
		nv[11] = bad_bits[i];
		cr_assert_eq(dec(nv, sizeof(nv)), SPOOL_DEC_ERR_ITEM, "%u",
			     bad_bits[i]);
	}
	nv[11] = 14;
	cr_assert_eq(dec(nv, sizeof(nv)), SPOOL_DEC_OK);
	uint8_t nl[] = { 1, 1, 0, 'a', 2, 1, 0, 'b', 12, 2, 0, 2, 2, 0, 0, 0 };
	cr_assert_eq(dec(nl, sizeof(nl)), SPOOL_DEC_ERR_ITEM);
	/* RET: 0, 3, length 2, twice */
	uint8_t rt[] = { 1, 1, 0, 'a', 11, 1, 0, 0, 0, 0, 0 };
	cr_assert_eq(dec(rt, sizeof(rt)), SPOOL_DEC_ERR_ITEM);
	rt[7] = 3;
	cr_assert_eq(dec(rt, sizeof(rt)), SPOOL_DEC_ERR_ITEM);
	rt[7] = 2;
	cr_assert_eq(dec(rt, sizeof(rt)), SPOOL_DEC_OK);
	uint8_t r2[] = { 1, 1, 0, 'a', 11, 1, 0, 1, 11, 1, 0, 1, 0, 0, 0 };
	cr_assert_eq(dec(r2, sizeof(r2)), SPOOL_DEC_ERR_ITEM);
	uint8_t rl[] = { 1, 1, 0, 'a', 11, 2, 0, 1, 1, 0, 0, 0 };
	cr_assert_eq(dec(rl, sizeof(rl)), SPOOL_DEC_ERR_ITEM);
	/* ENVID / ORCPT: empty, NUL inside, ENVID twice */
	uint8_t ee[] = { 1, 1, 0, 'a', 10, 0, 0, 0, 0, 0 };
	cr_assert_eq(dec(ee, sizeof(ee)), SPOOL_DEC_ERR_ITEM);
	uint8_t oe[] = { 1, 1, 0, 'a', 2, 1, 0, 'b', 13, 0, 0, 0, 0, 0 };
	cr_assert_eq(dec(oe, sizeof(oe)), SPOOL_DEC_ERR_ITEM);
	uint8_t en[] = { 1, 1, 0, 'a', 10, 2, 0, 'x', 0, 0, 0, 0 };
	cr_assert_eq(dec(en, sizeof(en)), SPOOL_DEC_ERR_ITEM);
	uint8_t on[] = { 1, 1, 0, 'a', 2, 1, 0, 'b', 13, 2, 0, 0, 'x', 0, 0, 0 };
	cr_assert_eq(dec(on, sizeof(on)), SPOOL_DEC_ERR_ITEM);
	uint8_t e2[] = { 1, 1, 0, 'a', 10, 1, 0, 'x', 10, 1, 0, 'y', 0, 0, 0 };
	cr_assert_eq(dec(e2, sizeof(e2)), SPOOL_DEC_ERR_ITEM);

	/* A DSN envelope truncated anywhere is never OK. */
	struct fd_envelope e = dsn_env(), d;
	uint8_t pl[1024], scr[8192];
	size_t n = spool_env_encode(&e, pl, sizeof(pl));
	for (size_t k = 0; k < n; k++)
		cr_assert_neq(spool_env_decode(pl, k, &d, scr, sizeof(scr)),
			      SPOOL_DEC_OK, "prefix %zu", k);
}

/* spool_env_scratch_len() bounds the worst case: every item a recipient
 * (3 octets) with a NOTIFY and an ORCPT somewhere. ASan checks the bound. */
Test(record, envelope_dsn_scratch_bound_holds)
{
	static uint8_t pl[SPOOL_ENV_MAX];
	size_t n = 0;
	struct fd_envelope d;

	pl[n++] = 1, pl[n++] = 0, pl[n++] = 0; /* MAIL_FROM "" */
	pl[n++] = 2, pl[n++] = 0, pl[n++] = 0;
	pl[n++] = 12, pl[n++] = 1, pl[n++] = 0, pl[n++] = 8;
	pl[n++] = 13, pl[n++] = 1, pl[n++] = 0, pl[n++] = 'x';
	while (n + 6 <= sizeof(pl)) {
		pl[n++] = 2, pl[n++] = 0, pl[n++] = 0;
	}
	pl[n++] = 0, pl[n++] = 0, pl[n++] = 0;
	size_t sl = spool_env_scratch_len(n);
	uint8_t *scr = malloc(sl);
	cr_assert_eq(spool_env_decode(pl, n, &d, scr, sl), SPOOL_DEC_OK);
	cr_assert_eq(d.n_rcpts, (n - 17) / 3 + 1);
	cr_assert_str_eq(d.orcpts[0], "x");
	cr_assert_str_eq(d.orcpts[d.n_rcpts - 1], "");
	cr_assert_eq(d.notify[0], FD_NOTIFY_DELAY);
	cr_assert_eq(d.notify[d.n_rcpts - 1], FD_NOTIFY_NONE);
	free(scr);
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

/* Lengths far beyond one message (every bit of the length used): joining
 * A, B, C as (AB)C and as A(BC) gives one CRC. */
Test(record, crc_combine_is_associative_at_any_length)
{
	unsigned seed = 7;

	for (int i = 0; i < 200; i++) {
		uint32_t a = (uint32_t)rand_r(&seed), b = (uint32_t)rand_r(&seed);
		uint32_t c = (uint32_t)rand_r(&seed);
		uint64_t nb = (uint64_t)rand_r(&seed) << 31 |
			      (uint64_t)rand_r(&seed);
		uint64_t nc = (uint64_t)rand_r(&seed) << 17 ^
			      (uint64_t)rand_r(&seed);

		nb >>= i % 40;
		uint32_t left = spool_crc32c_combine(
			spool_crc32c_combine(a, b, nb), c, nc);
		uint32_t right = spool_crc32c_combine(
			a, spool_crc32c_combine(b, c, nc), nb + nc);
		cr_assert_eq(left, right, "lengths %llu %llu",
			     (unsigned long long)nb, (unsigned long long)nc);
	}
}

Test(record, dec_names_distinct)
{
	cr_assert_str_eq(spool_dec_name(SPOOL_DEC_OK), "ok");
	cr_assert_str_eq(spool_dec_name(SPOOL_DEC_AGAIN), "again");
	cr_assert_str_neq(spool_dec_name(SPOOL_DEC_ERR_CRC),
			  spool_dec_name(SPOOL_DEC_ERR_EPOCH));
}
