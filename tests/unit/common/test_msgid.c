/* Message ids: monotonic, unique across workers, seeded, text form. */
#include <criterion/criterion.h>
#include <string.h>

#include "finaldot/msgid.h"

TestSuite(msgid);

Test(msgid, monotonic_same_microsecond)
{
	struct fd_msgid_gen g;
	uint64_t prev = 0;

	fd_msgid_init(&g, 3, 0);
	for (int i = 0; i < 1000; i++) {
		uint64_t id = fd_msgid_next(&g, 1000000); /* frozen clock */
		cr_assert_gt(id, prev);
		cr_assert_eq(fd_msgid_worker(id), 3u);
		prev = id;
	}
}

Test(msgid, clock_backwards_still_monotonic)
{
	struct fd_msgid_gen g;

	fd_msgid_init(&g, 0, 0);
	uint64_t a = fd_msgid_next(&g, 5000);
	uint64_t b = fd_msgid_next(&g, 10);
	cr_assert_gt(b, a);
}

Test(msgid, unique_across_workers)
{
	struct fd_msgid_gen g1, g2;

	fd_msgid_init(&g1, 1, 0);
	fd_msgid_init(&g2, 2, 0);
	for (uint64_t t = 100; t < 200; t++) {
		uint64_t a = fd_msgid_next(&g1, t), b = fd_msgid_next(&g2, t);
		cr_assert_neq(a, b);
		cr_assert_eq(fd_msgid_time_us(a), fd_msgid_time_us(b));
	}
}

Test(msgid, seeded_exceeds_seed)
{
	struct fd_msgid_gen g;
	uint64_t seed = (uint64_t)9000000 << 8 | 4;

	fd_msgid_init(&g, 4, seed);
	uint64_t id = fd_msgid_next(&g, 10); /* clock far behind the seed */
	cr_assert_gt(id, seed);
	cr_assert_eq(fd_msgid_worker(id), 4u);
}

Test(msgid, format_parse_round_trip)
{
	char buf[FD_MSGID_TEXT_LEN + 1];
	uint64_t v = 0;
	const uint64_t ids[] = { 0, 1, 0x0123456789ABCDEFull, UINT64_MAX };

	for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
		fd_msgid_format(ids[i], buf);
		cr_assert_eq(strlen(buf), FD_MSGID_TEXT_LEN);
		cr_assert(fd_msgid_parse(buf, &v));
		cr_assert_eq(v, ids[i]);
	}
	cr_assert_str_eq(fd_msgid_format(0xABCull, buf), "0000000000000ABC");
	cr_assert(fd_msgid_parse("0000000000000abc", &v));
	cr_assert_eq(v, 0xABCull);
}

Test(msgid, parse_rejects)
{
	uint64_t v;

	cr_assert_not(fd_msgid_parse("", &v));
	cr_assert_not(fd_msgid_parse("000000000000ABC", &v));   /* 15 */
	cr_assert_not(fd_msgid_parse("00000000000000ABC", &v)); /* 17 */
	cr_assert_not(fd_msgid_parse("000000000000ABCG", &v));
	cr_assert_not(fd_msgid_parse("000000000000 ABC", &v));
}
