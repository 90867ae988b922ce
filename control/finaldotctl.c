/*
 * finaldotctl: the operator's command line.
 *
 *   finaldotctl [--control PATH] [--timeout DURATION] status [--json]
 *   finaldotctl [...] queue list|show|cat|hold|release|delete|flush
 *   finaldotctl [...] pause|resume|reload
 *   finaldotctl spool scan|cat|export DIR ...
 *
 * status, queue, pause, resume and reload talk to the running daemon over
 * its control socket (ctlsock.h; the protocol is docs/control-protocol.md,
 * one JSON object per line each way). The spool commands read the files
 * directly (spool_reader.h) and need no running daemon.
 *
 * The socket: --control PATH, else $FINALDOT_CONTROL, else
 * ./var/control.sock (the daemon's default beside ./var/spool) if it
 * exists, else /run/finaldot/control.sock (the systemd unit's).
 *
 * A daemon that does not take the connection, or does not answer, is given
 * up on after --timeout (default 60 s, the daemon's own silence limit):
 * the connect, and each wait for reply bytes, is bounded by it. After the
 * request went out, an action's outcome is then unknown, and said so.
 *
 * Errors are one line on stderr. Exit codes: 0 ok, 1 failure (the daemon
 * refused: unknown id...; unreadable spool), 2 usage, 3 the daemon cannot
 * be reached (not running, permission denied, no answer in time).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "ctljson.h"
#include "finaldot/duration.h"
#include "finaldot/msgid.h"
#include "spool_reader.h"

#define EXIT_FAIL 1
#define EXIT_USAGE 2
#define EXIT_UNREACHABLE 3

static const char usage_main[] =
	"usage: finaldotctl [--control PATH] [--timeout DURATION] COMMAND ...\n"
	"\n"
	"commands (the running daemon, over its control socket):\n"
	"  status [--json]          version, uptime, listener, workers, queue\n"
	"  queue list [--json] [--state S] [--from X] [--to Y]\n"
	"                           the queue, like postqueue -p (-j)\n"
	"  queue show ID [--json]   one message and its recipients\n"
	"  queue cat ID             one message's stored bytes\n"
	"  queue hold ID...|ALL     stop delivering (postsuper -h)\n"
	"  queue release ID...|ALL  deliver again (postsuper -H)\n"
	"  queue delete ID...|ALL   drop, no bounce (postsuper -d)\n"
	"  queue flush [ID...|ALL|--to-domain D]\n"
	"                           retry now (postqueue -f, -i, -s)\n"
	"  pause                    new connections get 421 4.3.2\n"
	"  resume                   accept again\n"
	"  reload                   reload the configuration (as SIGHUP)\n"
	"\n"
	"commands (no daemon needed):\n"
	"  spool scan DIR [--json]  list the committed messages in the spool\n"
	"                           at DIR\n"
	"  spool cat DIR ID         write message ID's stored bytes (Received\n"
	"                           header and body) to stdout\n"
	"  spool export DIR OUTDIR  write every committed message to\n"
	"                           OUTDIR/ID.eml\n"
	"\n"
	"options:\n"
	"  --control PATH           the daemon's control socket (default:\n"
	"                           $FINALDOT_CONTROL, ./var/control.sock if it\n"
	"                           exists, /run/finaldot/control.sock)\n"
	"  --timeout DURATION       give up on a daemon that does not take\n"
	"                           the connection or stops answering for\n"
	"                           this long (exit 3): 500ms, 30s, 2m...; a\n"
	"                           bare number is seconds; default 60s, 0\n"
	"                           never\n"
	"  --version                print the version and exit\n"
	"  --help                   print this help and exit\n"
	"\n"
	"  finaldotctl COMMAND --help   help on one command\n"
	"Exit status: 0 ok, 1 failure, 2 usage, 3 the daemon cannot be "
	"reached\n(or did not answer within the timeout: an action's outcome "
	"is then unknown).\n";

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
	"      {\"messages\":[...],\"summary\":{...}}. Segments that could\n"
	"      not be read whole add a warning line on stderr (scan and\n"
	"      export): their messages are missing from the output.\n"
	"cat   the stored bytes of message ID (16 hex digits), exactly as\n"
	"      spooled. Exit 1 if no committed message has that id.\n"
	"export every committed message, as cat prints it, into OUTDIR/ID.eml\n"
	"      (OUTDIR must exist); one scan for all. Prints the count.\n"
	"\n"
	"Exit status: 0 ok, 1 failure, 2 usage error.\n";

/* ---- output helpers ---------------------------------------------------- */

static bool
is_help(const char *a)
{
	return strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0;
}

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

/* The same, keeping spaces: for free text such as a reply. */
static void
put_line(FILE *f, const char *s)
{
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p >= 0x20 && *p < 0x7f && *p != '\\')
			fputc(*p, f);
		else
			fprintf(f, "\\x%02x", *p);
	}
}

/* A JSON string (RFC 8259 7), written by the daemon's own JSON writer
 * (ctl_jw_str(): bytes that are not UTF-8 as the code point of the same
 * value, \u00HH, and the C0 and C1 controls escaped). It had a writer of
 * its own, which let the C1 controls through raw. */
static void
put_json(FILE *f, const char *s)
{
	struct ctl_jw w;

	ctl_jw_init(&w, 0);
	ctl_jw_str(&w, s);
	if (w.err) { /* out of memory: no half a document */
		fprintf(stderr, "finaldotctl: out of memory\n");
		exit(EXIT_FAIL);
	}
	fwrite(w.buf, 1, w.len, f);
	ctl_jw_free(&w);
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

/* Segments not read whole (an unreadable or misplaced file, a header
 * nothing could be salvaged from): the messages in them are missing from
 * what follows, and stderr says so whatever the format. */
static void
warn_bad(const struct ctl_spool_summary *m)
{
	if (m->segments_bad || m->segments_missing)
		fprintf(stderr,
			"finaldotctl: warning: %" PRIu64 " segment(s) could "
			"not be read whole and %" PRIu64 " listed segment(s) "
			"are gone (see the lines above): their messages are "
			"not in this output\n",
			m->segments_bad, m->segments_missing);
}

static void
summary_text(const struct ctl_spool_summary *m)
{
	fprintf(stderr,
		"segments=%" PRIu64 " segments_bad=%" PRIu64
		" segments_empty=%" PRIu64 " segments_damaged=%" PRIu64
		" segments_salvaged=%" PRIu64 " segments_duplicate=%" PRIu64
		" segments_missing=%" PRIu64 " records_ok=%" PRIu64
		" records_bad=%" PRIu64 " records_stale=%" PRIu64
		" records_dup=%" PRIu64
		" committed=%" PRIu64 " incomplete=%" PRIu64
		" bytes=%" PRIu64 "\n",
		m->segments, m->segments_bad, m->segments_empty,
		m->segments_damaged, m->segments_salvaged,
		m->segments_duplicate, m->segments_missing, m->records_ok,
		m->records_bad, m->records_stale, m->records_dup,
		m->msgs_committed, m->msgs_incomplete, m->body_bytes);
	warn_bad(m);
}

static void
summary_json(FILE *f, const struct ctl_spool_summary *m)
{
	char id[FD_MSGID_TEXT_LEN + 1];
	bool first = true;

	fprintf(f,
		"{\"workers\":%u,\"segments\":%" PRIu64
		",\"segments_bad\":%" PRIu64 ",\"segments_empty\":%" PRIu64
		",\"segments_damaged\":%" PRIu64
		",\"segments_salvaged\":%" PRIu64
		",\"segments_duplicate\":%" PRIu64
		",\"segments_missing\":%" PRIu64
		",\"records_ok\":%" PRIu64 ",\"records_bad\":%" PRIu64
		",\"records_stale\":%" PRIu64 ",\"records_dup\":%" PRIu64
		",\"committed\":%" PRIu64
		",\"incomplete\":%" PRIu64 ",\"bytes\":%" PRIu64
		",\"max_msgid\":{",
		m->workers, m->segments, m->segments_bad, m->segments_empty,
		m->segments_damaged, m->segments_salvaged,
		m->segments_duplicate, m->segments_missing,
		m->records_ok, m->records_bad, m->records_stale,
		m->records_dup, m->msgs_committed, m->msgs_incomplete,
		m->body_bytes);
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
		warn_bad(ctl_spool_scan_summary(s));
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
	warn_bad(ctl_spool_scan_summary(s));
	ctl_spool_scan_free(s);
	printf("%zu messages exported to %s\n", done, outdir);
	return rc;
}

/* ---- talking to the running daemon ------------------------------------- */

static const char usage_status[] =
	"usage: finaldotctl [--control PATH] status [--json]\n"
	"\n"
	"The running daemon's state: version, pid, uptime, transport, whether\n"
	"the listener accepts or is paused, per worker sessions (open and\n"
	"total), messages, flushes and their mean time in microseconds from\n"
	"submission to completion (flush_us: the spool disk's side of every\n"
	"final dot), the queue by state and the delivery totals. --json\n"
	"prints the daemon's reply data as one JSON object.\n";

static const char usage_queue[] =
	"usage: finaldotctl [--control PATH] queue COMMAND ...\n"
	"\n"
	"  list [--json] [--state S] [--from X] [--to Y]\n"
	"        every queued message, like postqueue -p: id (* active,\n"
	"        ! held), size, arrival, sender, then each recipient not yet\n"
	"        delivered with its last reason. --json: one JSON object per\n"
	"        message per line, like postqueue -j. --state active, deferred\n"
	"        or held; --from/--to: the sender/a recipient contains X/Y\n"
	"        (case-insensitive; --from '<>' is the null sender). Streams.\n"
	"  show ID [--json]\n"
	"        one message: envelope, client, HELO, and per recipient its\n"
	"        state, attempts, last reason, route, last and next attempt\n"
	"  cat ID\n"
	"        the stored bytes (finaldot's Received header, then the\n"
	"        message as received) to stdout, like postcat -bh -q\n"
	"  hold ID...|ALL      no delivery until released (postsuper -h)\n"
	"  release ID...|ALL   undo hold (postsuper -H)\n"
	"  delete ID...|ALL    drop the recipients not yet delivered, no\n"
	"                      bounce (postsuper -d)\n"
	"  flush [ID...|ALL|--to-domain D]\n"
	"                      retry now (postqueue -f / -i / -s D); no\n"
	"                      argument means ALL\n"
	"\n"
	"ID is a queue id, 16 hex digits (the \"queued as\" of the 250).\n"
	"Exit status: 0 ok, 1 the daemon refused (unknown id...), 2 usage,\n"
	"3 the daemon cannot be reached or did not answer in time.\n";

static const char usage_pause[] =
	"usage: finaldotctl [--control PATH] pause\n"
	"       finaldotctl [--control PATH] resume\n"
	"\n"
	"pause: new connections get \"421 4.3.2 ... Service not available\"\n"
	"and are closed; sessions already open go on. resume: accept again.\n"
	"The queue is delivered either way.\n";

static const char usage_reload[] =
	"usage: finaldotctl [--control PATH] reload\n"
	"\n"
	"Ask the daemon to reload its configuration, as SIGHUP does.\n";

/*
 * Room for a decoded string an operator reads in full: an address (from
 * an SMTP command line, at most 1024 octets), a reason or a history text
 * (the delivery log keeps 1024 octets, DLOG_TEXT_MAX), an error message.
 * An octet that is not UTF-8 comes as \u00HH and decodes to two, so 2048
 * is the most the daemon sends; get_str() cuts anything longer visibly.
 */
#define CTL_TEXT_MAX 4096

/*
 * The longest reply line read. The daemon's longest is a queue.show: the
 * envelope (SPOOL_ENV_MAX, 64 KiB, six times that if every octet is
 * escaped as \u00HH), each recipient's reason and the 200 history records'
 * texts (1024 octets each, as much escaped): about 2.5 MiB at the default
 * max_recipients of 100, 8 MiB at 1000. A queue.cat chunk is 64 KiB. A
 * line costs about ten times its length in parse tokens, so it is bounded
 * well short of the 1 GiB it once was.
 */
#define CTL_REPLY_LINE_MAX ((size_t)16 << 20)

/* Set by main: --control, $FINALDOT_CONTROL, or the default. */
static const char *ctl_path;
/* Neither default exists: ctl_path is the first, and "not running" names
 * both. */
static bool ctl_path_guessed;
/* --timeout: in milliseconds, 0 never. */
static uint64_t ctl_timeout_ms = 60000;
/* The action the request asks for ("queue hold", "reload"...), NULL for a
 * query: whether it was done is what a timeout leaves unknown. */
static const char *ctl_action;

struct client {
	int fd;
	char *buf;
	size_t len, cap, off;
	struct ctl_json_tok *tok;
	uint32_t tok_cap;
	struct ctl_json j;
};

static void
client_close(struct client *c)
{
	if (c->fd >= 0)
		close(c->fd);
	free(c->buf);
	free(c->tok);
	memset(c, 0, sizeof(*c));
	c->fd = -1;
}

static void
timeout_text(char *buf, size_t n)
{
	if (ctl_timeout_ms % 1000)
		snprintf(buf, n, "%" PRIu64 "ms", ctl_timeout_ms);
	else
		snprintf(buf, n, "%" PRIu64 "s", ctl_timeout_ms / 1000);
}

/*
 * A wait bounded by --timeout ran out: EXIT_UNREACHABLE after one line.
 * The request may have been read and acted on, or not.
 */
static int
client_timed_out(void)
{
	char t[32];

	timeout_text(t, sizeof(t));
	if (ctl_action)
		fprintf(stderr, "finaldotctl: no reply from the daemon at %s "
				"within %s: the outcome of %s is unknown (it "
				"may or may not have been done; see "
				"--timeout)\n", ctl_path, t, ctl_action);
	else
		fprintf(stderr, "finaldotctl: no reply from the daemon at %s "
				"within %s (see --timeout)\n",
			ctl_path, t);
	return EXIT_UNREACHABLE;
}

/* SO_SNDTIMEO bounds connect() on a unix socket (a listener whose backlog
 * is full) as well as send(); SO_RCVTIMEO each read(). Either gives
 * EAGAIN once it runs out. */
static int
client_set_timeout(int fd)
{
	struct timeval tv = {
		.tv_sec = (time_t)(ctl_timeout_ms / 1000),
		.tv_usec = (suseconds_t)(ctl_timeout_ms % 1000 * 1000),
	};

	if (ctl_timeout_ms == 0)
		return 0;
	if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0)
		return -1;
	return 0;
}

/* Connect; on failure one line on stderr and EXIT_UNREACHABLE. */
static int
client_open(struct client *c)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	char t[32];

	memset(c, 0, sizeof(*c));
	c->fd = -1;
	if (strlen(ctl_path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "finaldotctl: %s: path too long for a unix "
				"socket\n", ctl_path);
		return EXIT_USAGE;
	}
	strcpy(sa.sun_path, ctl_path);
	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c->fd >= 0 && client_set_timeout(c->fd) == 0 &&
	    connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
		return 0;
	switch (errno) {
	case EAGAIN: /* SO_SNDTIMEO ran out: its backlog stayed full */
		timeout_text(t, sizeof(t));
		fprintf(stderr, "finaldotctl: the daemon at %s did not take "
				"the connection within %s (stuck or "
				"overloaded; see --timeout); nothing was "
				"sent\n", ctl_path, t);
		break;
	case ENOENT:
		fprintf(stderr, "finaldotctl: finaldot is not running (no "
				"control socket at %s%s; see --control)\n",
			ctl_path, ctl_path_guessed
				  ? " or /run/finaldot/control.sock" : "");
		break;
	case ECONNREFUSED:
		fprintf(stderr, "finaldotctl: finaldot is not running "
				"(connection refused at %s)\n", ctl_path);
		break;
	case EACCES:
	case EPERM:
		fprintf(stderr, "finaldotctl: %s: permission denied (the "
				"control socket is for the daemon's user and "
				"its control_group)\n", ctl_path);
		break;
	default:
		fprintf(stderr, "finaldotctl: %s: %s\n", ctl_path,
			strerror(errno));
	}
	client_close(c);
	return EXIT_UNREACHABLE;
}

static int
client_send(struct client *c, struct ctl_jw *w)
{
	size_t off = 0;

	ctl_jw_nl(w);
	if (w->err) {
		fprintf(stderr, "finaldotctl: request too large\n");
		return EXIT_FAIL;
	}
	while (off < w->len) {
		ssize_t r = send(c->fd, w->buf + off, w->len - off,
				 MSG_NOSIGNAL);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == EAGAIN)
			return client_timed_out();
		if (r <= 0) {
			fprintf(stderr, "finaldotctl: %s: %s\n", ctl_path,
				strerror(errno));
			return EXIT_FAIL;
		}
		off += (size_t)r;
	}
	return 0;
}

/*
 * The next reply line, parsed into c->j (valid until the next call).
 * 0, or an exit status after one line on stderr.
 */
static int
client_next(struct client *c)
{
	for (;;) {
		char *nl = c->len > c->off
				   ? memchr(c->buf + c->off, '\n',
					    c->len - c->off)
				   : NULL;
		if (nl) {
			char *line = c->buf + c->off;
			size_t n = (size_t)(nl - line);
			uint32_t need = (uint32_t)(n / 2 + 4);
			c->off += n + 1;
			if (need > c->tok_cap) {
				struct ctl_json_tok *t =
					realloc(c->tok, need * sizeof(*t));
				if (!t) {
					fprintf(stderr, "finaldotctl: out of "
							"memory\n");
					return EXIT_FAIL;
				}
				c->tok = t;
				c->tok_cap = need;
			}
			if (ctl_json_parse(&c->j, line, n, c->tok,
					   c->tok_cap) != 0 ||
			    c->tok[0].type != CTL_JSON_OBJECT) {
				fprintf(stderr, "finaldotctl: bad reply from "
						"the daemon (%s)\n",
					c->j.err ? c->j.err : "not an object");
				return EXIT_FAIL;
			}
			return 0;
		}
		if (c->off) {
			memmove(c->buf, c->buf + c->off, c->len - c->off);
			c->len -= c->off;
			c->off = 0;
		}
		if (c->len > CTL_REPLY_LINE_MAX) {
			fprintf(stderr, "finaldotctl: a reply line from the "
					"daemon is over %zu MiB, more than it "
					"ever sends; not read\n",
				CTL_REPLY_LINE_MAX >> 20);
			return EXIT_FAIL;
		}
		if (c->len == c->cap) {
			size_t cap = c->cap ? c->cap * 2 : 65536;
			char *b;
			if (cap > CTL_REPLY_LINE_MAX + 1)
				cap = CTL_REPLY_LINE_MAX + 1; /* and its \n */
			if (!(b = realloc(c->buf, cap))) {
				fprintf(stderr, "finaldotctl: out of memory "
						"for a reply line of %zu "
						"octets\n", c->len);
				return EXIT_FAIL;
			}
			c->buf = b;
			c->cap = cap;
		}
		ssize_t r = read(c->fd, c->buf + c->len, c->cap - c->len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == EAGAIN)
			return client_timed_out();
		if (r <= 0) {
			fprintf(stderr, "finaldotctl: the daemon closed the "
					"connection before answering%s%s\n",
				r < 0 ? ": " : "", r < 0 ? strerror(errno) : "");
			return EXIT_FAIL;
		}
		c->len += (size_t)r;
	}
}

static const struct ctl_json_tok *
tok_of(const struct client *c, int t)
{
	return &c->j.tok[t];
}

/* Member helpers on an object token; absent or wrong type: the default. */
static uint64_t
get_u64(const struct client *c, int obj, const char *key)
{
	int t = obj >= 0 ? ctl_json_get(&c->j, (uint32_t)obj, key) : -1;
	uint64_t v = 0;

	if (t >= 0)
		ctl_json_u64(&c->j, (uint32_t)t, &v);
	return v;
}

/* A string that does not fit in buf[0..n) (n >= 4) is cut, visibly: its
 * first n - 4 octets, then "..." (it used to come out as "", which read
 * as no sender, no reason). */
static const char *
get_str(const struct client *c, int obj, const char *key, char *buf,
	size_t n)
{
	int t = obj >= 0 ? ctl_json_get(&c->j, (uint32_t)obj, key) : -1;
	size_t all_len;
	char *all;
	long r;

	buf[0] = '\0';
	if (t < 0)
		return buf;
	r = ctl_json_string(&c->j, (uint32_t)t, buf, n);
	if (r != -ENOSPC) {
		if (r < 0)
			buf[0] = '\0';
		return buf;
	}
	/* Decoding never lengthens: the escaped text's length is room. */
	all_len = (size_t)tok_of(c, t)->len + 1;
	all = malloc(all_len);
	if (all && ctl_json_string(&c->j, (uint32_t)t, all, all_len) >= 0) {
		memcpy(buf, all, n - 4);
		memcpy(buf + n - 4, "...", 4);
	} else {
		strcpy(buf, "..."); /* out of memory */
	}
	free(all);
	return buf;
}

static bool
get_bool(const struct client *c, int obj, const char *key)
{
	int t = obj >= 0 ? ctl_json_get(&c->j, (uint32_t)obj, key) : -1;
	bool v = false;

	if (t >= 0)
		ctl_json_bool(&c->j, (uint32_t)t, &v);
	return v;
}

/*
 * A line with "ok" ends a reply. Returns 0 for such a line that says ok
 * (*data: its data token; the daemon always sends one, and a reply without
 * it is refused here, so callers need not check), -1 for a line without
 * "ok" (an item of a streaming reply), or an exit status after printing
 * the daemon's error.
 */
static int
terminator(const struct client *c, int *data)
{
	int ok = ctl_json_get(&c->j, 0, "ok");
	bool v = false;
	char msg[CTL_TEXT_MAX], code[64];

	*data = -1;
	if (ok < 0)
		return -1;
	if (ctl_json_bool(&c->j, (uint32_t)ok, &v) && v) {
		*data = ctl_json_get(&c->j, 0, "data");
		if (*data >= 0)
			return 0;
		fprintf(stderr, "finaldotctl: unexpected reply from the "
				"daemon (\"ok\" without \"data\")\n");
		return EXIT_FAIL;
	}
	int e = ctl_json_get(&c->j, 0, "error");
	get_str(c, e, "message", msg, sizeof(msg));
	get_str(c, e, "code", code, sizeof(code));
	if (!msg[0] && !code[0]) {
		fprintf(stderr, "finaldotctl: unexpected reply from the "
				"daemon (not ok, and no error)\n");
		return EXIT_FAIL;
	}
	/* The daemon's message may quote what a client sent: escaped like
	 * every other string from it, so it cannot drive the terminal. */
	fputs("finaldotctl: ", stderr);
	put_line(stderr, msg[0] ? msg : code);
	fputc('\n', stderr);
	return strcmp(code, "bad_request") == 0 ? EXIT_USAGE : EXIT_FAIL;
}

/* Send a request and wait for its one-line reply: 0 with *data, or an
 * exit status (the client is closed then). */
static int
call(struct client *c, struct ctl_jw *req, int *data)
{
	int r = client_open(c);

	if (r == 0)
		r = client_send(c, req);
	if (r == 0)
		r = client_next(c);
	if (r == 0) {
		r = terminator(c, data);
		if (r == 0)
			return 0;
		if (r < 0) {
			fprintf(stderr, "finaldotctl: unexpected reply from "
					"the daemon\n");
			r = EXIT_FAIL;
		}
	}
	client_close(c);
	return r;
}

/* {"cmd":NAME,"args":{ ... the caller's members, then req_end(). */
static void
req_begin(struct ctl_jw *w, const char *cmd)
{
	ctl_jw_init(w, 0);
	ctl_jw_obj(w);
	ctl_jw_kstr(w, "cmd", cmd);
	ctl_jw_key(w, "args");
	ctl_jw_obj(w);
}

static void
req_end(struct ctl_jw *w)
{
	ctl_jw_obj_end(w);
	ctl_jw_obj_end(w);
}

/* A value token's JSON text, exactly as the daemon sent it. */
static void
print_raw(const struct client *c, int t)
{
	const struct ctl_json_tok *k = tok_of(c, t);

	if (k->type == CTL_JSON_STRING)
		fwrite(c->j.text + k->start - 1, 1, k->len + 2, stdout);
	else
		fwrite(c->j.text + k->start, 1, k->len, stdout);
	fputc('\n', stdout);
}

static int
finish_output(int rc)
{
	if (fflush(stdout) != 0 && rc == 0) {
		fprintf(stderr, "finaldotctl: stdout: %s\n", strerror(errno));
		rc = EXIT_FAIL;
	}
	return rc;
}

/* ---- status ------------------------------------------------------------ */

static void
duration(uint64_t s, char *buf, size_t n)
{
	if (s >= 86400)
		snprintf(buf, n, "%" PRIu64 "d %02" PRIu64 ":%02" PRIu64
			 ":%02" PRIu64, s / 86400, s / 3600 % 24, s / 60 % 60,
			 s % 60);
	else
		snprintf(buf, n, "%02" PRIu64 ":%02" PRIu64 ":%02" PRIu64,
			 s / 3600, s / 60 % 60, s % 60);
}

static int
cmd_status(int argc, char **argv)
{
	struct client c;
	struct ctl_jw req;
	bool json = false;
	char a[256], host[256], tr[32], since[64], up[64];
	int data, r;

	for (int i = 0; i < argc; i++) {
		if (is_help(argv[i])) {
			fputs(usage_status, stdout);
			return 0;
		}
		if (strcmp(argv[i], "--json") != 0) {
			fprintf(stderr, "finaldotctl: status: unknown "
					"argument '%s' (see status --help)\n",
				argv[i]);
			return EXIT_USAGE;
		}
		json = true;
	}
	req_begin(&req, "status");
	req_end(&req);
	r = call(&c, &req, &data);
	ctl_jw_free(&req);
	if (r)
		return r;
	if (json) {
		print_raw(&c, data);
		client_close(&c);
		return finish_output(0);
	}
	duration(get_u64(&c, data, "uptime_s"), up, sizeof(up));
	printf("finaldot %s, pid %" PRIu64 ", %s, transport %s, up %s "
	       "(since %s)\n",
	       get_str(&c, data, "version", a, sizeof(a)),
	       get_u64(&c, data, "pid"),
	       get_str(&c, data, "hostname", host, sizeof(host)),
	       get_str(&c, data, "transport", tr, sizeof(tr)), up,
	       get_str(&c, data, "started", since, sizeof(since)));
	printf("listener: %s on", get_str(&c, data, "listener", a,
					  sizeof(a)));
	int l = ctl_json_get(&c.j, (uint32_t)data, "listen");
	if (l >= 0 && tok_of(&c, l)->type == CTL_JSON_ARRAY) {
		uint32_t k = ctl_json_child((uint32_t)l);
		for (uint32_t i = 0; i < tok_of(&c, l)->count; i++) {
			if (ctl_json_string(&c.j, k, a, sizeof(a)) >= 0)
				printf(" %s", a);
			k = ctl_json_next(&c.j, k);
		}
	}
	fputc('\n', stdout);
	int q = ctl_json_get(&c.j, (uint32_t)data, "queue");
	printf("queue: %" PRIu64 " messages (%" PRIu64 " active, %" PRIu64
	       " deferred, %" PRIu64 " held), %" PRIu64 " spool segments\n",
	       get_u64(&c, q, "queued"), get_u64(&c, q, "active"),
	       get_u64(&c, q, "deferred"), get_u64(&c, q, "held"),
	       get_u64(&c, q, "segments"));
	int d = ctl_json_get(&c.j, (uint32_t)data, "delivery");
	printf("delivery: %" PRIu64 " delivered, %" PRIu64 " deferred, %" PRIu64
	       " bounced, %" PRIu64 " expired; DSNs %" PRIu64 " sent, %" PRIu64
	       " dropped\n",
	       get_u64(&c, d, "delivered_total"),
	       get_u64(&c, d, "deferred_total"),
	       get_u64(&c, d, "bounced_total"),
	       get_u64(&c, d, "expired_total"),
	       get_u64(&c, d, "dsn_sent_total"),
	       get_u64(&c, d, "dsn_dropped_total"));
	if (get_u64(&c, d, "log_error"))
		printf("delivery STOPPED: the delivery log failed (%s); mail is "
		       "accepted and kept, restart once the disk is fixed\n",
		       strerror((int)get_u64(&c, d, "log_error")));
	else if (get_u64(&c, d, "log_no_space"))
		printf("delivery WAITING: the spool's filesystem is full and the "
		       "delivery log waits for room; it goes on by itself once "
		       "there is\n");
	printf("%-7s %9s %14s %10s %10s %8s %8s %8s\n", "worker", "sessions",
	       "sessions_total", "messages", "flushes", "flush_us", "failed",
	       "refused");
	int w = ctl_json_get(&c.j, (uint32_t)data, "workers");
	if (w >= 0 && tok_of(&c, w)->type == CTL_JSON_ARRAY) {
		uint32_t k = ctl_json_child((uint32_t)w);
		for (uint32_t i = 0; i < tok_of(&c, w)->count; i++) {
			int o = (int)k;
			printf("%-7" PRIu64 " %9" PRIu64 " %14" PRIu64
			       " %10" PRIu64 " %10" PRIu64 " %8" PRIu64
			       " %8" PRIu64 " %8" PRIu64 "\n",
			       get_u64(&c, o, "id"), get_u64(&c, o, "sessions"),
			       get_u64(&c, o, "sessions_total"),
			       get_u64(&c, o, "messages"),
			       get_u64(&c, o, "flushes"),
			       get_u64(&c, o, "flush_mean_us"),
			       get_u64(&c, o, "failed"),
			       get_u64(&c, o, "refused_busy") +
				       get_u64(&c, o, "refused_paused"));
			k = ctl_json_next(&c.j, k);
		}
	}
	int t = ctl_json_get(&c.j, (uint32_t)data, "totals");
	printf("%-7s %9" PRIu64 " %14" PRIu64 " %10" PRIu64 " %10" PRIu64
	       " %8" PRIu64 " %8" PRIu64 " %8" PRIu64 "\n",
	       "total", get_u64(&c, t, "sessions"),
	       get_u64(&c, t, "sessions_total"), get_u64(&c, t, "messages"),
	       get_u64(&c, t, "flushes"), get_u64(&c, t, "flush_mean_us"),
	       get_u64(&c, t, "failed"),
	       get_u64(&c, t, "refused_busy") +
		       get_u64(&c, t, "refused_paused"));
	/* DPDK: how much of each busy-polled lcore's time did work. */
	if (w >= 0 && tok_of(&c, w)->type == CTL_JSON_ARRAY) {
		uint32_t k = ctl_json_child((uint32_t)w);
		for (uint32_t i = 0; i < tok_of(&c, w)->count; i++) {
			uint64_t b = get_u64(&c, (int)k, "lcore_busy_us");
			uint64_t n = b + get_u64(&c, (int)k, "lcore_idle_us");
			if (n > 0)
				printf("lcore of worker %" PRIu64 ": busy "
				       "%.1f%% of %.1f s polled\n",
				       get_u64(&c, (int)k, "id"),
				       100.0 * (double)b / (double)n,
				       (double)n / 1e6);
			k = ctl_json_next(&c.j, k);
		}
	}
	client_close(&c);
	return finish_output(0);
}

/* ---- queue ------------------------------------------------------------- */

static bool
check_ids(int argc, char **argv, const char *cmd)
{
	uint64_t id;

	for (int i = 0; i < argc; i++)
		if (!fd_msgid_parse(argv[i], &id)) {
			fprintf(stderr, "finaldotctl: queue %s: '%s' is not a "
					"queue id (16 hex digits)\n", cmd,
				argv[i]);
			return false;
		}
	return true;
}

/* One message, postqueue -p style; *bytes and *n for the footer. */
static void
list_human(const struct client *c, int m, uint64_t *bytes, uint64_t *n)
{
	char id[32], sender[CTL_TEXT_MAX], state[32], when[64];
	time_t t = (time_t)get_u64(c, m, "arrival_time");
	uint64_t size = get_u64(c, m, "size");
	struct tm tm;
	int rc;

	localtime_r(&t, &tm);
	strftime(when, sizeof(when), "%a %b %e %H:%M:%S", &tm);
	get_str(c, m, "state", state, sizeof(state));
	get_str(c, m, "sender", sender, sizeof(sender));
	printf("%-16s%c %8" PRIu64 " %s  ", get_str(c, m, "id", id, sizeof(id)),
	       get_bool(c, m, "held") ? '!'
	       : strcmp(state, "active") == 0 ? '*'
					      : ' ',
	       size, when);
	if (sender[0])
		put_text(stdout, sender);
	else
		fputs("MAILER-DAEMON", stdout);
	fputc('\n', stdout);
	rc = ctl_json_get(&c->j, (uint32_t)m, "recipients");
	if (rc >= 0 && tok_of(c, rc)->type == CTL_JSON_ARRAY) {
		uint32_t k = ctl_json_child((uint32_t)rc);
		for (uint32_t i = 0; i < tok_of(c, rc)->count; i++) {
			char addr[CTL_TEXT_MAX], status[32];
			char reason[CTL_TEXT_MAX];
			get_str(c, (int)k, "status", status, sizeof(status));
			if (strcmp(status, "pending") == 0) {
				get_str(c, (int)k, "reason", reason,
					sizeof(reason));
				if (reason[0]) {
					fputc('(', stdout);
					put_line(stdout, reason);
					fputs(")\n", stdout);
				}
				printf("%47s", "");
				put_text(stdout, get_str(c, (int)k, "address",
							 addr, sizeof(addr)));
				fputc('\n', stdout);
			}
			k = ctl_json_next(&c->j, k);
		}
	}
	fputc('\n', stdout);
	*bytes += size;
	(*n)++;
}

static int
queue_list(int argc, char **argv)
{
	static const char *const opts[] = {"--state", "--from", "--to"};
	static const char *const keys[] = {"state", "from", "to"};
	const char *val[3] = {NULL, NULL, NULL};
	uint64_t bytes = 0, n = 0;
	struct ctl_jw req;
	struct client c;
	bool json = false, done = false;
	int data, r;

	for (int i = 0; i < argc; i++) {
		int o;
		if (strcmp(argv[i], "--json") == 0) {
			json = true;
			continue;
		}
		for (o = 0; o < 3; o++)
			if (strcmp(argv[i], opts[o]) == 0)
				break;
		if (o == 3 || i + 1 >= argc) {
			fprintf(stderr, "finaldotctl: queue list: %s '%s' (see "
					"queue --help)\n",
				o == 3 ? "unknown argument" : "no value for",
				argv[i]);
			return EXIT_USAGE;
		}
		val[o] = argv[++i];
	}
	if (val[0] && strcmp(val[0], "active") && strcmp(val[0], "deferred") &&
	    strcmp(val[0], "held")) {
		fprintf(stderr, "finaldotctl: queue list: --state is active, "
				"deferred or held\n");
		return EXIT_USAGE;
	}
	req_begin(&req, "queue.list");
	for (int o = 0; o < 3; o++)
		if (val[o])
			ctl_jw_kstr(&req, keys[o], val[o]);
	req_end(&req);
	r = client_open(&c);
	if (r == 0)
		r = client_send(&c, &req);
	ctl_jw_free(&req);
	while (r == 0 && (r = client_next(&c)) == 0) {
		int item = ctl_json_get(&c.j, 0, "item");
		if (item < 0) {
			r = terminator(&c, &data);
			if (r < 0) {
				fprintf(stderr, "finaldotctl: unexpected line "
						"from the daemon\n");
				r = EXIT_FAIL;
			}
			done = r == 0;
			break;
		}
		if (json) {
			print_raw(&c, item);
			continue;
		}
		if (n == 0) /* like postqueue -p: no header when empty */
			printf("%-17s %8s %-20s  %s\n", "-Queue ID--------",
			       "--Size--", "----Arrival Time----",
			       "-Sender/Recipient-------");
		list_human(&c, item, &bytes, &n);
	}
	if (done) {
		if (!json && n == 0)
			printf("Mail queue is empty\n");
		else if (!json)
			printf("-- %" PRIu64 " Kbytes in %" PRIu64
			       " Request%s.\n",
			       (bytes + 1023) / 1024, n, n == 1 ? "" : "s");
	}
	client_close(&c);
	return finish_output(r);
}

static void
show_time(const struct client *c, int o, const char *key, const char *label)
{
	char t[64];

	get_str(c, o, key, t, sizeof(t));
	if (t[0])
		printf(" %s=%s", label, t);
}

/* The delivery log's record of the message, oldest first: what was
 * tried when, and what the next hop said. rcpts: the recipients array
 * (a record names a recipient by its index). */
static void
show_history(struct client *c, int data, int rcpts)
{
	char t[64], ev[32], addr[CTL_TEXT_MAX], text[CTL_TEXT_MAX];
	int h = ctl_json_get(&c->j, (uint32_t)data, "history");

	if (h < 0 || tok_of(c, h)->type != CTL_JSON_ARRAY ||
	    tok_of(c, h)->count == 0)
		return;
	fputs("history (delivery log, since its last compaction):\n", stdout);
	for (uint32_t i = 0, k = ctl_json_child((uint32_t)h);
	     i < tok_of(c, h)->count; i++, k = ctl_json_next(&c->j, k)) {
		int o = (int)k, r = ctl_json_get(&c->j, k, "rcpt");
		addr[0] = '\0';
		if (r >= 0 && tok_of(c, r)->type == CTL_JSON_NUMBER &&
		    rcpts >= 0) {
			uint64_t idx = get_u64(c, o, "rcpt");
			uint32_t e = ctl_json_child((uint32_t)rcpts);
			for (uint64_t x = 0; x < idx && x < tok_of(c, rcpts)->count;
			     x++)
				e = ctl_json_next(&c->j, e);
			if (idx < tok_of(c, rcpts)->count)
				get_str(c, (int)e, "address", addr, sizeof(addr));
		}
		printf("  %s %-10s ", get_str(c, o, "time", t, sizeof(t)),
		       get_str(c, o, "event", ev, sizeof(ev)));
		if (addr[0]) {
			fputc('<', stdout);
			put_text(stdout, addr);
			fputs("> ", stdout);
		} else {
			fputs("(message) ", stdout);
		}
		if (get_u64(c, o, "attempts"))
			printf("attempt %" PRIu64 " ", get_u64(c, o, "attempts"));
		if (get_str(c, o, "text", text, sizeof(text))[0])
			put_line(stdout, text);
		fputc('\n', stdout);
	}
}

static int
queue_show(int argc, char **argv)
{
	char id[64], s[CTL_TEXT_MAX];
	struct ctl_jw req;
	struct client c;
	bool json = false;
	int data, r, rc;

	if (argc == 2 && strcmp(argv[1], "--json") == 0)
		json = true;
	else if (argc == 2 && strcmp(argv[0], "--json") == 0)
		json = true, argv++;
	else if (argc != 1) {
		fputs("usage: finaldotctl queue show ID [--json]\n", stderr);
		return EXIT_USAGE;
	}
	if (!check_ids(1, argv, "show"))
		return EXIT_USAGE;
	req_begin(&req, "queue.show");
	ctl_jw_kstr(&req, "id", argv[0]);
	req_end(&req);
	r = call(&c, &req, &data);
	ctl_jw_free(&req);
	if (r)
		return r;
	if (json) {
		print_raw(&c, data);
		client_close(&c);
		return finish_output(0);
	}
	printf("id:       %s\n", get_str(&c, data, "id", id, sizeof(id)));
	printf("state:    %s%s\n", get_str(&c, data, "state", s, sizeof(s)),
	       get_bool(&c, data, "held") ? " (held)" : "");
	printf("arrival:  %s\n", get_str(&c, data, "arrival", s, sizeof(s)));
	printf("size:     %" PRIu64 "\n", get_u64(&c, data, "size"));
	fputs("sender:   <", stdout);
	put_text(stdout, get_str(&c, data, "sender", s, sizeof(s)));
	fputs(">\nclient:   ", stdout);
	put_text(stdout, get_str(&c, data, "client", s, sizeof(s)));
	fputs(" helo=", stdout);
	put_text(stdout, get_str(&c, data, "helo", s, sizeof(s)));
	if (get_str(&c, data, "envid", s, sizeof(s))[0]) {
		fputs("\nenvid:    ", stdout);
		put_text(stdout, s);
	}
	/* RFC 1047 (docs/rfc1047.md): the link between a resend and its
	 * original, and a 250 that may not have arrived. */
	if (get_str(&c, data, "duplicate_of", s, sizeof(s))[0]) {
		fputs("\nresend:   of ", stdout);
		put_text(stdout, s);
		fputs(" (RFC 1047: suppressed, delivered once as that id)",
		      stdout);
	}
	if (get_bool(&c, data, "indoubt"))
		fputs("\nin doubt: its 250 may not have reached the client",
		      stdout);
	printf("\nworker:   %" PRIu64 "\nrecipients:\n",
	       get_u64(&c, data, "worker"));
	rc = ctl_json_get(&c.j, (uint32_t)data, "recipients");
	if (rc >= 0 && tok_of(&c, rc)->type == CTL_JSON_ARRAY) {
		uint32_t k = ctl_json_child((uint32_t)rc);
		for (uint32_t i = 0; i < tok_of(&c, rc)->count; i++) {
			int o = (int)k;
			fputs("  <", stdout);
			put_text(stdout, get_str(&c, o, "address", s,
						 sizeof(s)));
			printf("> %s attempts=%" PRIu64,
			       get_str(&c, o, "status", id, sizeof(id)),
			       get_u64(&c, o, "attempts"));
			if (get_bool(&c, o, "busy"))
				fputs(" (delivering now)", stdout);
			show_time(&c, o, "last_attempt", "last");
			show_time(&c, o, "next_attempt", "next");
			if (get_str(&c, o, "route", s, sizeof(s))[0]) {
				fputs(" route=", stdout);
				put_text(stdout, s);
			}
			if (get_str(&c, o, "orcpt", s, sizeof(s))[0]) {
				fputs(" orcpt=", stdout);
				put_text(stdout, s);
			}
			if (get_str(&c, o, "reason", s, sizeof(s))[0]) {
				fputs("\n      ", stdout);
				put_line(stdout, s);
			}
			fputc('\n', stdout);
			k = ctl_json_next(&c.j, k);
		}
	}
	show_history(&c, data, rc);
	client_close(&c);
	return finish_output(0);
}

/* The chunks go to stdout as they come (a message may be larger than we
 * care to hold); so a failure after some of them is told by the exit
 * status and stderr, never by stdout alone. */
static int
queue_cat(int argc, char **argv)
{
	struct ctl_jw req;
	struct client c;
	char *bin = NULL;
	size_t bin_cap = 0;
	uint64_t total = 0;
	int data, r;

	if (argc != 1) {
		fputs("usage: finaldotctl queue cat ID\n", stderr);
		return EXIT_USAGE;
	}
	if (!check_ids(1, argv, "cat"))
		return EXIT_USAGE;
	req_begin(&req, "queue.cat");
	ctl_jw_kstr(&req, "id", argv[0]);
	req_end(&req);
	r = client_open(&c);
	if (r == 0)
		r = client_send(&c, &req);
	ctl_jw_free(&req);
	while (r == 0 && (r = client_next(&c)) == 0) {
		int ch = ctl_json_get(&c.j, 0, "chunk");
		const struct ctl_json_tok *k;
		long n;
		if (ch < 0) {
			r = terminator(&c, &data);
			if (r < 0)
				r = EXIT_FAIL;
			if (r == 0 && get_u64(&c, data, "size") != total) {
				fprintf(stderr, "finaldotctl: queue cat: %" PRIu64
					" bytes received, the daemon says it "
					"sent %" PRIu64 "\n", total,
					get_u64(&c, data, "size"));
				r = EXIT_FAIL;
			}
			break;
		}
		k = tok_of(&c, ch);
		if (k->type != CTL_JSON_STRING) {
			r = EXIT_FAIL;
			break;
		}
		if (k->len > bin_cap) {
			char *nb = realloc(bin, k->len);
			if (!nb) {
				r = EXIT_FAIL;
				break;
			}
			bin = nb;
			bin_cap = k->len;
		}
		n = ctl_b64_decode(c.j.text + k->start, k->len, bin);
		if (n < 0) {
			fprintf(stderr, "finaldotctl: bad chunk from the "
					"daemon\n");
			r = EXIT_FAIL;
			break;
		}
		if (fwrite(bin, 1, (size_t)n, stdout) != (size_t)n) {
			fprintf(stderr, "finaldotctl: stdout: %s\n",
				strerror(errno));
			r = EXIT_FAIL;
			break;
		}
		total += (uint64_t)n;
	}
	free(bin);
	client_close(&c);
	return finish_output(r);
}

static int
queue_action(int argc, char **argv, const char *cmd, const char *done)
{
	bool flush = strcmp(cmd, "flush") == 0, all = false;
	const char *dom = NULL;
	char name[32], action[32];
	struct ctl_jw req;
	struct client c;
	int data, r, nids = 0;

	for (int i = 0; i < argc; i++) {
		if (flush && strcmp(argv[i], "--to-domain") == 0) {
			if (i + 1 >= argc || dom) {
				fputs("usage: finaldotctl queue flush "
				      "--to-domain DOMAIN\n", stderr);
				return EXIT_USAGE;
			}
			dom = argv[++i];
		} else if (strcmp(argv[i], "ALL") == 0) {
			all = true;
		} else {
			nids++;
		}
	}
	if (!flush && !all && nids == 0) {
		fprintf(stderr, "usage: finaldotctl queue %s ID...|ALL\n", cmd);
		return EXIT_USAGE;
	}
	if ((all && nids) || (dom && (all || nids))) {
		fprintf(stderr, "finaldotctl: queue %s: give ids, ALL%s, not "
				"several\n", cmd, flush ? " or --to-domain" : "");
		return EXIT_USAGE;
	}
	snprintf(name, sizeof(name), "queue.%s", cmd);
	snprintf(action, sizeof(action), "queue %s", cmd);
	ctl_action = action;
	req_begin(&req, name);
	if (dom) {
		ctl_jw_kstr(&req, "to_domain", dom);
	} else if (nids) {
		ctl_jw_key(&req, "ids");
		ctl_jw_arr(&req);
		for (int i = 0; i < argc; i++) {
			if (!check_ids(1, &argv[i], cmd)) {
				ctl_jw_free(&req);
				return EXIT_USAGE;
			}
			ctl_jw_str(&req, argv[i]);
		}
		ctl_jw_arr_end(&req);
	} else {
		ctl_jw_kbool(&req, "all", true);
	}
	req_end(&req);
	r = call(&c, &req, &data);
	ctl_jw_free(&req);
	if (r)
		return r;
	uint64_t n = get_u64(&c, data, "affected");
	printf("%" PRIu64 " message%s %s\n", n, n == 1 ? "" : "s", done);
	client_close(&c);
	return finish_output(0);
}

static int
cmd_queue(int argc, char **argv)
{
	static const struct {
		const char *name, *done;
	} acts[] = {
		{"hold", "held"},
		{"release", "released"},
		{"delete", "deleted"},
		{"flush", "scheduled for delivery now"},
	};

	if (argc < 1) {
		fprintf(stderr, "finaldotctl: queue: which command? (see queue "
				"--help)\n");
		return EXIT_USAGE;
	}
	for (int i = 0; i < argc; i++)
		if (is_help(argv[i])) {
			fputs(usage_queue, stdout);
			return 0;
		}
	if (strcmp(argv[0], "list") == 0)
		return queue_list(argc - 1, argv + 1);
	if (strcmp(argv[0], "show") == 0)
		return queue_show(argc - 1, argv + 1);
	if (strcmp(argv[0], "cat") == 0)
		return queue_cat(argc - 1, argv + 1);
	for (size_t i = 0; i < sizeof(acts) / sizeof(acts[0]); i++)
		if (strcmp(argv[0], acts[i].name) == 0)
			return queue_action(argc - 1, argv + 1, acts[i].name,
					    acts[i].done);
	fprintf(stderr, "finaldotctl: unknown queue command '%s' (see queue "
			"--help)\n", argv[0]);
	return EXIT_USAGE;
}

/* pause, resume, reload: no arguments, one line of answer. */
static int
simple(int argc, char **argv, const char *cmd, const char *usage)
{
	struct ctl_jw req;
	struct client c;
	char s[64];
	int data, r;

	for (int i = 0; i < argc; i++) {
		if (is_help(argv[i])) {
			fputs(usage, stdout);
			return 0;
		}
	}
	if (argc) {
		fprintf(stderr, "finaldotctl: %s takes no arguments (see %s "
				"--help)\n", cmd, cmd);
		return EXIT_USAGE;
	}
	ctl_action = cmd;
	req_begin(&req, cmd);
	req_end(&req);
	r = call(&c, &req, &data);
	ctl_jw_free(&req);
	if (r)
		return r;
	if (strcmp(cmd, "reload") == 0)
		printf("reload requested\n");
	else
		printf("listener %s\n",
		       get_str(&c, data, "listener", s, sizeof(s)));
	client_close(&c);
	return finish_output(0);
}

static int
cmd_pause(int argc, char **argv)
{
	return simple(argc, argv, "pause", usage_pause);
}

static int
cmd_resume(int argc, char **argv)
{
	return simple(argc, argv, "resume", usage_pause);
}

static int
cmd_reload(int argc, char **argv)
{
	return simple(argc, argv, "reload", usage_reload);
}

/* ---- dispatch ---------------------------------------------------------- */

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
	{ "status", cmd_status },
	{ "queue", cmd_queue },
	{ "pause", cmd_pause },
	{ "resume", cmd_resume },
	{ "reload", cmd_reload },
	{ "spool", cmd_spool },
};

static const char *
default_path(void)
{
	const char *env = getenv("FINALDOT_CONTROL");
	struct stat st;

	if (env && env[0])
		return env;
	if (stat("./var/control.sock", &st) == 0)
		return "./var/control.sock";
	if (stat("/run/finaldot/control.sock", &st) == 0)
		return "/run/finaldot/control.sock";
	ctl_path_guessed = true;
	return "./var/control.sock";
}

/* Whether argv[*i] is option name, as "NAME VALUE" (then *i moves on to
 * the value) or "NAME=VALUE"; *v is the value, NULL when none follows. */
static bool
opt_value(int argc, char **argv, int *i, const char *name, const char **v)
{
	size_t n = strlen(name);

	if (strncmp(argv[*i], name, n) != 0)
		return false;
	if (argv[*i][n] == '=')
		*v = argv[*i] + n + 1;
	else if (argv[*i][n] == '\0')
		*v = *i + 1 < argc ? argv[++*i] : NULL;
	else
		return false;
	return true;
}

int
main(int argc, char **argv)
{
	int i = 1;

	ctl_path = NULL;
	for (; i < argc && argv[i][0] == '-'; i++) {
		if (is_help(argv[i])) {
			fputs(usage_main, stdout);
			return 0;
		}
		if (strcmp(argv[i], "--version") == 0) {
			printf("finaldotctl %s\n", FINALDOT_VERSION);
			return 0;
		}
		const char *v;

		if (opt_value(argc, argv, &i, "--control", &v)) {
			if (!v || !v[0]) {
				fprintf(stderr, "finaldotctl: --control needs "
						"a value, the control socket's "
						"path (see --help)\n");
				return EXIT_USAGE;
			}
			ctl_path = v;
		} else if (opt_value(argc, argv, &i, "--timeout", &v)) {
			if (!v) {
				fprintf(stderr, "finaldotctl: --timeout needs "
						"a value (see --help)\n");
				return EXIT_USAGE;
			}
			if (!fd_parse_duration_ms(v, &ctl_timeout_ms)) {
				fprintf(stderr, "finaldotctl: --timeout '%s': "
						"not a duration (500ms, 30s, "
						"2m; 0 never)\n", v);
				return EXIT_USAGE;
			}
		} else {
			fprintf(stderr, "finaldotctl: unknown option '%s' (see "
					"--help)\n", argv[i]);
			return EXIT_USAGE;
		}
	}
	if (!ctl_path)
		ctl_path = default_path();
	if (i >= argc) {
		fprintf(stderr, "finaldotctl: which command? (see --help)\n");
		return EXIT_USAGE;
	}
	for (size_t k = 0; k < sizeof(commands) / sizeof(commands[0]); k++)
		if (strcmp(argv[i], commands[k].name) == 0)
			return commands[k].fn(argc - i - 1, argv + i + 1);
	fprintf(stderr, "finaldotctl: unknown command '%s' (see --help)\n",
		argv[i]);
	return EXIT_USAGE;
}
