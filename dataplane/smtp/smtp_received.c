/*
 * The Received: header (RFC 5321 4.4): who sent the message (EHLO name and
 * address), who received it (our hostname), how (the RFC 3848 / RFC 6531
 * "with" keyword), the message id, the recipient when there is exactly one
 * (a list would disclose Bcc recipients, RFC 5321 7.2), and when.
 *
 *   Received: from HELO ([192.0.2.1])
 *   	by HOST (finaldot) with ESMTP id 0123456789ABCDEF
 *   	for <user@example.com>; Thu, 01 Jan 2026 00:00:00 +0000
 *
 * Without a single recipient the ";" ends the "by" line and the date gets
 * a line of its own. Over TLS a comment line after "from" says how, in the
 * style operators know from Postfix:
 *
 *   	(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))
 * Contract: the EHLO name is client data; it is reduced
 * to [A-Za-z0-9.-_:[]] (others become '?') and capped at 255 octets, so no
 * CR, LF, ';' or comment can be smuggled into the header. Our hostname is
 * configuration and only capped. The date is UTC (+0000), computed without
 * the locale.
 */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "smtp/smtp_received.h"

#define NAME_CAP 255

size_t
smtp_rfc5322_date(char *buf, size_t size, uint64_t now_us)
{
	static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed",
					"Thu", "Fri", "Sat"};
	static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr",
					   "May", "Jun", "Jul", "Aug",
					   "Sep", "Oct", "Nov", "Dec"};
	time_t t = (time_t)(now_us / 1000000u);
	struct tm tm;
	int r;

	if (!gmtime_r(&t, &tm) || tm.tm_wday < 0 || tm.tm_wday > 6 ||
	    tm.tm_mon < 0 || tm.tm_mon > 11)
		memset(&tm, 0, sizeof(tm)), tm.tm_year = 70, tm.tm_mday = 1,
					    tm.tm_wday = 4;
	r = snprintf(buf, size, "%s, %02d %s %04d %02d:%02d:%02d +0000",
		     days[tm.tm_wday], tm.tm_mday, months[tm.tm_mon],
		     tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
	if (r < 0)
		return 0;
	return (size_t)r < size ? (size_t)r : size - 1;
}

static size_t
sanitize(char *dst, const char *src, size_t len)
{
	size_t n = len < NAME_CAP ? len : NAME_CAP;

	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)src[i];
		bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			  (c >= '0' && c <= '9') || c == '.' || c == '-' ||
			  c == '_' || c == ':' || c == '[' || c == ']';
		dst[i] = ok ? (char)c : '?';
	}
	dst[n] = '\0';
	return n;
}

size_t
smtp_received_format(char *buf, size_t size,
		     const struct smtp_received_info *ri)
{
	char helo[NAME_CAP + 1], addr[NAME_CAP + 1], date[64], id[17];
	char tls[SMTP_RECEIVED_TLS_MAX + 16] = "";
	bool v6 = strchr(ri->client_addr, ':') != NULL;
	int r;

	if (ri->tls)
		snprintf(tls, sizeof(tls), "\r\n\t(using %.*s)",
			 SMTP_RECEIVED_TLS_MAX, ri->tls);
	sanitize(helo, ri->helo, ri->helo_len);
	sanitize(addr, ri->client_addr, strlen(ri->client_addr));
	smtp_rfc5322_date(date, sizeof(date), ri->now_us);
	snprintf(id, sizeof(id), "%016llX", (unsigned long long)ri->msgid);
	if (ri->rcpt)
		r = snprintf(buf, size,
			     "Received: from %s ([%s%s])%s\r\n"
			     "\tby %.255s (finaldot) with %s id %s\r\n"
			     "\tfor <%.256s>; %s\r\n",
			     helo, v6 ? "IPv6:" : "", addr, tls, ri->hostname,
			     ri->proto, id, ri->rcpt, date);
	else
		r = snprintf(buf, size,
			     "Received: from %s ([%s%s])%s\r\n"
			     "\tby %.255s (finaldot) with %s id %s;\r\n"
			     "\t%s\r\n",
			     helo, v6 ? "IPv6:" : "", addr, tls, ri->hostname,
			     ri->proto, id, date);
	if (r < 0)
		return 0;
	/* Cannot happen with size >= SMTP_RECEIVED_MAX (all parts capped). */
	return (size_t)r < size ? (size_t)r : size - 1;
}
