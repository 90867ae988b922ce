/*
 * key=value logging to stderr, one write(2) per line so lines from several
 * worker threads never interleave. See finaldot/log.h for the format.
 */
#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "finaldot/log.h"

static enum fd_log_level cur_level = FD_LOG_INFO;

void
fd_log_set_level(enum fd_log_level level)
{
	cur_level = level;
}

enum fd_log_level
fd_log_get_level(void)
{
	return cur_level;
}

static const char *
level_name(enum fd_log_level l)
{
	switch (l) {
	case FD_LOG_ERR:
		return "error";
	case FD_LOG_WARN:
		return "warn";
	case FD_LOG_INFO:
		return "info";
	case FD_LOG_DEBUG:
		return "debug";
	}
	return "?";
}

void
fd_log(enum fd_log_level level, const char *component, const char *fmt, ...)
{
	char line[1024];
	struct timespec ts;
	struct tm tm;
	size_t n;
	int r;
	va_list ap;

	if (level > cur_level)
		return;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
	r = snprintf(line + n, sizeof(line) - n, ".%06ldZ %s %s ",
		     ts.tv_nsec / 1000, level_name(level), component);
	if (r > 0)
		n += (size_t)r;
	va_start(ap, fmt);
	r = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
	va_end(ap);
	if (r > 0)
		n += (size_t)r;
	if (n > sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	/* A short write of a log line is not worth failing anything for. */
	if (write(STDERR_FILENO, line, n) < 0)
		return;
}

char *
fd_log_escape(char *dst, size_t dstsz, const void *src, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	const unsigned char *s = src;
	size_t o = 0;

	if (dstsz == 0)
		return dst;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = s[i];
		int plain = c > 0x20 && c < 0x7f && c != '"' && c != '\\' &&
			    c != '=';
		size_t need = plain ? 1 : 4;
		if (o + need + 4 > dstsz) {
			if (o + 4 <= dstsz) {
				dst[o++] = '.';
				dst[o++] = '.';
				dst[o++] = '.';
			}
			break;
		}
		if (plain) {
			dst[o++] = (char)c;
		} else {
			dst[o++] = '\\';
			dst[o++] = 'x';
			dst[o++] = hex[c >> 4];
			dst[o++] = hex[c & 0xf];
		}
	}
	dst[o] = '\0';
	return dst;
}
