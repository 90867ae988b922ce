/*
 * finaldotctl: the operator's command line.
 *
 *   finaldotctl spool scan DIR [--json]   committed messages in a spool
 *   finaldotctl spool cat DIR ID          one message's stored bytes
 *
 * The spool commands read the files directly (spool_reader.h) and need no
 * running daemon. Commands that talk to the daemon over its control socket
 * will sit beside "spool" in the command table.
 *
 * Exit codes: 0 ok, 1 failure (unreadable spool, unknown id), 2 usage.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>

#include "finaldot/msgid.h"
#include "spool_reader.h"

#define EXIT_USAGE 2

static const char usage_main[] =
	"usage: finaldotctl COMMAND ...\n"
	"\n"
	"commands:\n"
	"  spool scan DIR [--json]  list the committed messages in the spool\n"
	"                           at DIR (no daemon needed)\n"
	"  spool cat DIR ID         write message ID's stored bytes (Received\n"
	"                           header and body) to stdout\n"
	"  spool export DIR OUTDIR  write every committed message to\n"
	"                           OUTDIR/ID.eml\n"
	"\n"
	"  finaldotctl COMMAND --help   help on one command\n";

static const char usage_spool[] =
	"usage: finaldotctl spool scan DIR [--json]\n"
	"       finaldotctl spool cat DIR ID\n"
	"       finaldotctl spool export DIR OUTDIR\n"
	"\n"
	"Reads a spool root (DIR/wNN/*.seg) directly; the daemon need not run.\n"
	"\n"
	"scan  one line per committed message: id, arrival (ISO 8601 UTC),\n"
	"      size in bytes, sender (<> for the null sender), recipients\n"
	"      (comma-separated), SHA-256 of the stored body. The scan summary\n"
	"      (segments, records ok/bad/stale, messages committed/incomplete)\n"
	"      goes to stderr. With --json: one JSON object on stdout,\n"
	"      {\"messages\":[...],\"summary\":{...}}.\n"
	"cat   the stored bytes of message ID (16 hex digits), exactly as\n"
	"      spooled. Exit 1 if no committed message has that id.\n"
	"export every committed message, as cat prints it, into OUTDIR/ID.eml\n"
	"      (OUTDIR must exist); one scan for all. Prints the count.\n"
	"\n"
	"Exit status: 0 ok, 1 failure, 2 usage error.\n";

/* ---- output helpers ---------------------------------------------------- */

static void
iso8601(uint64_t us, char *buf, size_t len)
{
	time_t t = (time_t)(us / 1000000u);
	struct tm tm;
	size_t n;

	gmtime_r(&t, &tm);
	n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(buf + n, len - n, ".%06uZ", (unsigned)(us % 1000000u));
}

/* Text output: anything not printable ASCII as \xHH, so a line stays one
 * line whatever a client put in its envelope. */
static void
put_text(FILE *f, const char *s)
{
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p > 0x20 && *p < 0x7f && *p != '\\')
			fputc(*p, f);
		else
			fprintf(f, "\\x%02x", *p);
	}
}

/* Length of a valid UTF-8 sequence at p (RFC 3629), 0 if invalid. */
static size_t
utf8_len(const unsigned char *p)
{
	unsigned c = p[0];
	size_t n;
	unsigned min;

	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf)
		n = 2, min = 0x80;
	else if (c >= 0xe0 && c <= 0xef)
		n = 3, min = 0x800;
	else if (c >= 0xf0 && c <= 0xf4)
		n = 4, min = 0x10000;
	else
		return 0;
	unsigned v = c & (0x3fu >> (n - 1));
	for (size_t i = 1; i < n; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		v = v << 6 | (p[i] & 0x3fu);
	}
	if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
		return 0;
	return n;
}

/* A JSON string (RFC 8259 7); bytes that are not valid UTF-8 are emitted
 * as the code point of the same value (\u00HH) so the output stays valid. */
static void
put_json(FILE *f, const char *s)
{
	const unsigned char *p = (const unsigned char *)s;

	fputc('"', f);
	while (*p) {
		size_t n = utf8_len(p);
		if (n == 0) {
			fprintf(f, "\\u%04x", *p++);
			continue;
		}
		if (n > 1) {
			fwrite(p, 1, n, f);
			p += n;
			continue;
		}
		switch (*p) {
		case '"':
			fputs("\\\"", f);
			break;
		case '\\':
			fputs("\\\\", f);
			break;
		case '\n':
			fputs("\\n", f);
			break;
		case '\r':
			fputs("\\r", f);
			break;
		case '\t':
			fputs("\\t", f);
			break;
		default:
			if (*p < 0x20 || *p == 0x7f)
				fprintf(f, "\\u%04x", *p);
			else
				fputc(*p, f);
		}
		p++;
	}
	fputc('"', f);
}

/* ---- spool scan -------------------------------------------------------- */

static int
sha_feed(void *ctx, const void *p, size_t n)
{
	return EVP_DigestUpdate(ctx, p, n) == 1 ? 0 : -EIO;
}

static int
body_sha256(const struct ctl_spool_scan *s, const struct ctl_spool_msg *m,
	    char hex[65])
{
	EVP_MD_CTX *c = EVP_MD_CTX_new();
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned mdlen = 0;
	int r = -ENOMEM;

	if (!c)
		return r;
	if (EVP_DigestInit_ex(c, EVP_sha256(), NULL) != 1)
		goto out;
	r = ctl_spool_read_body(s, m, sha_feed, c);
	if (r == 0 && EVP_DigestFinal_ex(c, md, &mdlen) != 1)
		r = -EIO;
	for (unsigned i = 0; r == 0 && i < mdlen && i < 32; i++)
		snprintf(hex + 2 * i, 3, "%02x", md[i]);
out:
	EVP_MD_CTX_free(c);
	return r;
}

static void
summary_text(const struct ctl_spool_summary *m)
{
	fprintf(stderr,
		"segments=%" PRIu64 " segments_bad=%" PRIu64
		" segments_empty=%" PRIu64 " records_ok=%" PRIu64
		" records_bad=%" PRIu64 " records_stale=%" PRIu64
		" committed=%" PRIu64 " incomplete=%" PRIu64
		" bytes=%" PRIu64 "\n",
		m->segments, m->segments_bad, m->segments_empty, m->records_ok,
		m->records_bad, m->records_stale, m->msgs_committed,
		m->msgs_incomplete, m->body_bytes);
}

static void
summary_json(FILE *f, const struct ctl_spool_summary *m)
{
	char id[FD_MSGID_TEXT_LEN + 1];
	bool first = true;

	fprintf(f,
		"{\"workers\":%u,\"segments\":%" PRIu64
		",\"segments_bad\":%" PRIu64 ",\"segments_empty\":%" PRIu64
		",\"records_ok\":%" PRIu64 ",\"records_bad\":%" PRIu64
		",\"records_stale\":%" PRIu64 ",\"committed\":%" PRIu64
		",\"incomplete\":%" PRIu64 ",\"bytes\":%" PRIu64
		",\"max_msgid\":{",
		m->workers, m->segments, m->segments_bad, m->segments_empty,
		m->records_ok, m->records_bad, m->records_stale,
		m->msgs_committed, m->msgs_incomplete, m->body_bytes);
	for (unsigned w = 0; w < 256; w++) {
		if (!m->max_msgid[w])
			continue;
		fprintf(f, "%s\"%u\":\"%s\"", first ? "" : ",", w,
			fd_msgid_format(m->max_msgid[w], id));
		first = false;
	}
	fputs("}}", f);
}

static int
cmd_spool_scan(const char *dir, bool json)
{
	struct ctl_spool_scan *s;
	int err = 0, rc = 0;

	s = ctl_spool_scan_dir(dir, &err);
	if (!s) {
		fprintf(stderr, "finaldotctl: %s: %s\n", dir, strerror(-err));
		return 1;
	}
	if (json)
		fputs("{\"messages\":[", stdout);
	for (size_t i = 0; i < ctl_spool_scan_count(s); i++) {
		const struct ctl_spool_msg *m = ctl_spool_scan_msg(s, i);
		char id[FD_MSGID_TEXT_LEN + 1], when[40], sha[65] = "";
		int r = body_sha256(s, m, sha);

		if (r) {
			fprintf(stderr, "finaldotctl: %s: body: %s\n",
				fd_msgid_format(m->id, id), strerror(-r));
			rc = 1;
		}
		fd_msgid_format(m->id, id);
		iso8601(m->env.arrival_us, when, sizeof(when));
		if (json) {
			printf("%s{\"id\":\"%s\",\"worker\":%u,\"arrival\":\"%s\""
			       ",\"size\":%" PRIu64 ",\"sender\":",
			       i ? "," : "", id, m->worker, when, m->body_len);
			put_json(stdout, m->env.mail_from);
			fputs(",\"recipients\":[", stdout);
			for (unsigned k = 0; k < m->env.n_rcpts; k++) {
				if (k)
					fputc(',', stdout);
				put_json(stdout, m->env.rcpts[k]);
			}
			printf("],\"sha256\":\"%s\"}", sha);
		} else {
			printf("%s %s %" PRIu64 " <", id, when, m->body_len);
			put_text(stdout, m->env.mail_from);
			fputs("> ", stdout);
			for (unsigned k = 0; k < m->env.n_rcpts; k++) {
				if (k)
					fputc(',', stdout);
				put_text(stdout, m->env.rcpts[k]);
			}
			printf(" %s\n", sha);
		}
	}
	if (json) {
		fputs("],\"summary\":", stdout);
		summary_json(stdout, ctl_spool_scan_summary(s));
		fputs("}\n", stdout);
	} else {
		summary_text(ctl_spool_scan_summary(s));
	}
	ctl_spool_scan_free(s);
	if (fflush(stdout) != 0)
		rc = 1;
	return rc;
}

static int
out_feed(void *ctx, const void *p, size_t n)
{
	return fwrite(p, 1, n, ctx) == n ? 0 : -EIO;
}

static int
cmd_spool_cat(const char *dir, const char *idtext)
{
	struct ctl_spool_scan *s;
	const struct ctl_spool_msg *m;
	uint64_t id;
	int err = 0, r;

	if (!fd_msgid_parse(idtext, &id)) {
		fprintf(stderr, "finaldotctl: %s: not a message id "
				"(16 hex digits)\n", idtext);
		return EXIT_USAGE;
	}
	s = ctl_spool_scan_dir(dir, &err);
	if (!s) {
		fprintf(stderr, "finaldotctl: %s: %s\n", dir, strerror(-err));
		return 1;
	}
	m = ctl_spool_scan_find(s, id);
	if (!m) {
		fprintf(stderr, "finaldotctl: %s: no committed message with "
				"this id\n", idtext);
		ctl_spool_scan_free(s);
		return 1;
	}
	r = ctl_spool_read_body(s, m, out_feed, stdout);
	ctl_spool_scan_free(s);
	if (fflush(stdout) != 0 && r == 0)
		r = -EIO;
	if (r) {
		fprintf(stderr, "finaldotctl: %s: %s\n", idtext,
			strerror(r < 0 ? -r : EIO));
		return 1;
	}
	return 0;
}

static int
cmd_spool_export(const char *dir, const char *outdir)
{
	struct ctl_spool_scan *s;
	size_t n, done = 0;
	int err = 0, rc = 0;

	s = ctl_spool_scan_dir(dir, &err);
	if (!s) {
		fprintf(stderr, "finaldotctl: %s: %s\n", dir, strerror(-err));
		return 1;
	}
	n = ctl_spool_scan_count(s);
	for (size_t i = 0; i < n && rc == 0; i++) {
		const struct ctl_spool_msg *m = ctl_spool_scan_msg(s, i);
		char id[FD_MSGID_TEXT_LEN + 1], path[4096];
		FILE *f;
		int r;

		fd_msgid_format(m->id, id);
		snprintf(path, sizeof(path), "%s/%s.eml", outdir, id);
		f = fopen(path, "wb");
		if (!f) {
			fprintf(stderr, "finaldotctl: %s: %s\n", path,
				strerror(errno));
			rc = 1;
			break;
		}
		r = ctl_spool_read_body(s, m, out_feed, f);
		if (fclose(f) != 0 && r == 0)
			r = -EIO;
		if (r) {
			fprintf(stderr, "finaldotctl: %s: %s\n", id,
				strerror(r < 0 ? -r : EIO));
			rc = 1;
		} else {
			done++;
		}
	}
	ctl_spool_scan_free(s);
	printf("%zu messages exported to %s\n", done, outdir);
	return rc;
}

/* ---- dispatch ---------------------------------------------------------- */

static bool
is_help(const char *a)
{
	return strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0;
}

static int
cmd_spool(int argc, char **argv)
{
	if (argc < 1 || is_help(argv[0])) {
		fputs(usage_spool, argc < 1 ? stderr : stdout);
		return argc < 1 ? EXIT_USAGE : 0;
	}
	for (int i = 1; i < argc; i++) {
		if (is_help(argv[i])) {
			fputs(usage_spool, stdout);
			return 0;
		}
	}
	if (strcmp(argv[0], "scan") == 0) {
		if (argc == 2 && argv[1][0] != '-')
			return cmd_spool_scan(argv[1], false);
		if (argc == 3 && strcmp(argv[2], "--json") == 0)
			return cmd_spool_scan(argv[1], true);
		if (argc == 3 && strcmp(argv[1], "--json") == 0)
			return cmd_spool_scan(argv[2], true);
	} else if (strcmp(argv[0], "cat") == 0) {
		if (argc == 3)
			return cmd_spool_cat(argv[1], argv[2]);
	} else if (strcmp(argv[0], "export") == 0) {
		if (argc == 3)
			return cmd_spool_export(argv[1], argv[2]);
	}
	fputs(usage_spool, stderr);
	return EXIT_USAGE;
}

static const struct {
	const char *name;
	int (*fn)(int argc, char **argv);
} commands[] = {
	{ "spool", cmd_spool },
	/* control-socket commands (status, queue, ...) will go here */
};

int
main(int argc, char **argv)
{
	if (argc < 2) {
		fputs(usage_main, stderr);
		return EXIT_USAGE;
	}
	if (is_help(argv[1])) {
		fputs(usage_main, stdout);
		return 0;
	}
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (strcmp(argv[1], commands[i].name) == 0)
			return commands[i].fn(argc - 2, argv + 2);
	fprintf(stderr, "finaldotctl: unknown command '%s'\n", argv[1]);
	fputs(usage_main, stderr);
	return EXIT_USAGE;
}
