/* Message ids: see finaldot/msgid.h for the layout and the guarantees. */
#include <time.h>

#include "finaldot/msgid.h"

void
fd_msgid_init(struct fd_msgid_gen *g, uint8_t worker, uint64_t seed_id)
{
	g->worker = worker;
	g->last_us = fd_msgid_time_us(seed_id);
}

uint64_t
fd_msgid_next(struct fd_msgid_gen *g, uint64_t now_us)
{
	uint64_t us = now_us > g->last_us ? now_us : g->last_us + 1;

	g->last_us = us;
	return us << 8 | g->worker;
}

char *
fd_msgid_format(uint64_t id, char *buf)
{
	static const char hex[] = "0123456789ABCDEF";

	for (int i = FD_MSGID_TEXT_LEN - 1; i >= 0; i--) {
		buf[i] = hex[id & 0xf];
		id >>= 4;
	}
	buf[FD_MSGID_TEXT_LEN] = '\0';
	return buf;
}

bool
fd_msgid_parse(const char *s, uint64_t *id)
{
	uint64_t v = 0;

	for (int i = 0; i < FD_MSGID_TEXT_LEN; i++) {
		char c = s[i];
		unsigned d;
		if (c >= '0' && c <= '9')
			d = (unsigned)(c - '0');
		else if (c >= 'a' && c <= 'f')
			d = (unsigned)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			d = (unsigned)(c - 'A' + 10);
		else
			return false;
		v = v << 4 | d;
	}
	if (s[FD_MSGID_TEXT_LEN] != '\0')
		return false;
	*id = v;
	return true;
}

static uint64_t
now_us(clockid_t clk)
{
	struct timespec ts;

	clock_gettime(clk, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t
fd_now_realtime_us(void)
{
	return now_us(CLOCK_REALTIME);
}

uint64_t
fd_now_monotonic_us(void)
{
	return now_us(CLOCK_MONOTONIC);
}

uint64_t
fd_now_monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
