/*
 * Maildir delivery (contract in maildir.h; the format is D. J. Bernstein's
 * Maildir: tmp/ for files being written, new/ for delivered ones, cur/ for
 * the reader).
 *
 * Everything below ROOT is reached with *at() calls from directory fds
 * opened with O_NOFOLLOW, so a symlink planted as DOMAIN or LOCALPART (or
 * tmp/new) makes delivery fail instead of writing elsewhere, and the
 * validated names are the only path components ever used.
 *
 * Durability (why each fsync): the message is durable once its bytes
 * (fsync of the file) and its name in new/ (fsync of new/) are; a
 * directory created by this call is durable only once its parent is
 * fsynced, so each parent that got a new entry is fsynced before the
 * file is written. link() rather than rename() moves tmp/ to new/: it
 * fails rather than replace an existing file (qmail's convention).
 *
 * Test seam (test builds only, -Dfault_injection=true; a release build
 * never reads it): FINALDOT_DELIVERY_FAULT names one of these durability
 * points to leave out, a mutant the power-cut test must catch
 * (docs/powercut.md): "no-maildir-fsync", the file is linked into new/
 * without its fsync; "no-maildir-dirsync", new/ is not fsynced after the
 * link.
 *
 * Directories. A mailbox's directories (domain, mailbox, tmp/new/cur) are
 * durable in their parents before the first message is reported
 * delivered into them: each one this call made is synced in its parent,
 * and so is each one it found, unless this process already knows the
 * mailbox durable (a small table of mailboxes it synced, each with the
 * identity of its directories: one removed and made again is not the one
 * synced). Finding a directory is not knowing it durable: another thread
 * may have made it a moment ago and not yet synced its parent, an earlier
 * call may have failed to, or another program made it.
 *
 * Limits: filesystems without hard links are not supported.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "finaldot/fsync.h"
#include "finaldot/log.h"
#include "maildir.h"

#define CHUNK 65536
#define NAME_MAX_BYTES 255
#define HOST_MAX 64

static atomic_ulong seq;



static char
lower(char c)
{
	return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

/* A safe single path component: 0, or what is wrong with it. */
static const char *
name_error(const char *s)
{
	size_t n;

	if (!s || !*s)
		return "empty";
	if (s[0] == '.')
		return "starts with '.'";
	n = strnlen(s, NAME_MAX_BYTES + 1);
	if (n > NAME_MAX_BYTES)
		return "longer than 255 bytes";
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '/')
			return "holds '/'";
		if (c < 0x20 || c == 0x7f)
			return "holds a control character";
	}
	return NULL;
}

static void
lower_copy(char *dst, const char *s)
{
	size_t i;

	for (i = 0; s[i]; i++)
		dst[i] = lower(s[i]);
	dst[i] = '\0';
}

/* The host name as a Maildir name part: '/' and ':' as \057 and \072 (the
 * Maildir specification), anything else outside [A-Za-z0-9._-] as '_'. */
static void
host_part(char *dst, size_t dstsz)
{
	char h[256];
	size_t o = 0;

	if (gethostname(h, sizeof(h)) != 0)
		h[0] = '\0';
	h[sizeof(h) - 1] = '\0';
	for (size_t i = 0; h[i] && o + 5 < dstsz && o < HOST_MAX; i++) {
		char c = h[i];
		if (c == '/' || c == ':') {
			memcpy(dst + o, c == '/' ? "\\057" : "\\072", 4);
			o += 4;
		} else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			   (c >= '0' && c <= '9') || c == '.' || c == '-' ||
			   c == '_') {
			dst[o++] = c;
		} else {
			dst[o++] = '_';
		}
	}
	if (o == 0) {
		snprintf(dst, dstsz, "localhost");
		return;
	}
	dst[o] = '\0';
}

static void
set_ok(struct maildir_result *res, const char *name)
{
	res->status = 0;
	res->permanent = false;
	snprintf(res->enh, sizeof(res->enh), "2.0.0");
	snprintf(res->text, sizeof(res->text), "delivered to maildir (new/%s)",
		 name);
}

/* A failure: status -err; the enhanced code from the errno (RFC 3463
 * section 3.3 and 3.5), unless enh is given. */
static void
set_fail(struct maildir_result *res, int err, bool permanent,
	 const char *enh, const char *what)
{
	res->status = -err;
	res->permanent = permanent;
	if (!enh) {
		switch (err) {
		case EDQUOT:
			enh = "4.2.2";
			break;
		case ENOSPC:
			enh = "4.3.1";
			break;
		case EROFS:
			enh = "4.3.2";
			break;
		default:
			enh = "4.3.0";
			break;
		}
	}
	snprintf(res->enh, sizeof(res->enh), "%s", enh);
	snprintf(res->text, sizeof(res->text), "maildir: %.160s: %.80s", what,
		 strerror(err));
	res->path[0] = '\0';
}

/*
 * Mailboxes known durable (above): a 64-bit hash of root, domain and local
 * part per slot, with the identity of each directory that was synced: a
 * mailbox removed and made again (by an operator, an IMAP server creating
 * it at login, another thread) is other directories under the same
 * names, not yet in their parents, and is synced again. The identity is
 * device, inode and birth time: a new directory may be given the inode
 * number just freed, never the same birth time. Where the filesystem
 * keeps no birth time, nothing is taken as known. A slot taken by another
 * mailbox only costs that mailbox its directory syncs once more.
 */
#define KNOWN_SLOTS 4096
struct dir_id {
	uint64_t dev, ino;
	int64_t btime_s;
	uint32_t btime_ns;
	bool ok; /* all of the above read */
};
struct known_box {
	uint64_t h;
	struct dir_id dom, mbox, tmp, new;
};
static struct known_box known[KNOWN_SLOTS];
static pthread_mutex_t known_mu = PTHREAD_MUTEX_INITIALIZER;

static uint64_t
mailbox_hash(const char *root, const char *dom, const char *lp)
{
	const char *parts[3] = {root, dom, lp};
	uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */

	for (unsigned i = 0; i < 3; i++) {
		for (const char *p = parts[i]; *p; p++) {
			h ^= (uint8_t)*p; /* dom and lp come lower-cased */
			h *= 0x100000001b3ull;
		}
		h ^= 0xff; /* a separator no name holds */
		h *= 0x100000001b3ull;
	}
	return h ? h : 1;
}

static struct dir_id
dir_id_of(int fd)
{
	struct statx st;
	struct dir_id id = {0};

	if (statx(fd, "", AT_EMPTY_PATH, STATX_INO | STATX_BTIME, &st) != 0 ||
	    !(st.stx_mask & STATX_INO) || !(st.stx_mask & STATX_BTIME))
		return id;
	id.dev = (uint64_t)st.stx_dev_major << 32 | st.stx_dev_minor;
	id.ino = st.stx_ino;
	id.btime_s = st.stx_btime.tv_sec;
	id.btime_ns = st.stx_btime.tv_nsec;
	id.ok = true;
	return id;
}

static bool
same_dir(const struct dir_id *a, const struct dir_id *b)
{
	return a->ok && b->ok && a->dev == b->dev && a->ino == b->ino &&
	       a->btime_s == b->btime_s && a->btime_ns == b->btime_ns;
}

/* What this process knows of mailbox h: false if nothing. */
static bool
known_get(uint64_t h, struct known_box *out)
{
	bool r;

	pthread_mutex_lock(&known_mu);
	*out = known[h % KNOWN_SLOTS];
	pthread_mutex_unlock(&known_mu);
	r = out->h == h;
	if (!r)
		memset(out, 0, sizeof(*out));
	return r;
}

static void
known_put(const struct known_box *k)
{
	if (!k->dom.ok || !k->mbox.ok || !k->tmp.ok || !k->new.ok)
		return;
	pthread_mutex_lock(&known_mu);
	known[k->h % KNOWN_SLOTS] = *k;
	pthread_mutex_unlock(&known_mu);
}

/* mkdir parent/name (0700) unless it exists, then open it as a directory
 * that is not a symlink. An fd, or -errno. */
static int
subdir(int parent, const char *name, bool *made)
{
	int fd;

	if (mkdirat(parent, name, 0700) == 0)
		*made = true;
	else if (errno != EEXIST)
		return -errno;
	fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW |
					  O_CLOEXEC);
	return fd < 0 ? -errno : fd;
}

static int
write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -errno;
		if (w == 0)
			return -EIO;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/*
 * CRLF -> LF over a stream given in pieces: *cr says the previous piece
 * ended with a CR not yet written. out must hold n + 1 bytes. Returns the
 * bytes put in out.
 */
static size_t
crlf_to_lf(const char *p, size_t n, char *out, bool *cr)
{
	size_t o = 0;

	for (size_t i = 0; i < n; i++) {
		char c = p[i];
		if (*cr) {
			*cr = false;
			if (c != '\n')
				out[o++] = '\r';
		}
		if (c == '\r')
			*cr = true;
		else
			out[o++] = c;
	}
	return o;
}

struct copy {
	int fd;
	bool cr;
	char *in, *out;
	const char *what; /* on failure */
	bool source;      /* the failure is the body source's */
	uint64_t off;
};

static int
put(struct copy *c, const char *p, size_t n)
{
	size_t o = crlf_to_lf(p, n, c->out, &c->cr);
	int r = write_all(c->fd, c->out, o);

	if (r != 0)
		c->what = "write";
	return r;
}

static int
copy_message(struct copy *c, const char *prefix, maildir_read_fn rd,
	     void *rctx, uint64_t len)
{
	size_t plen = prefix ? strlen(prefix) : 0;
	int r;

	for (size_t i = 0; i < plen; i += CHUNK) {
		size_t n = plen - i < CHUNK ? plen - i : CHUNK;
		if ((r = put(c, prefix + i, n)) != 0)
			return r;
	}
	for (c->off = 0; c->off < len;) {
		size_t want = len - c->off < CHUNK ? (size_t)(len - c->off)
						   : CHUNK;
		long got = rd(rctx, c->off, c->in, want);
		if (got <= 0 || (unsigned long)got > want) {
			c->source = true;
			c->what = got == 0 ? "body ended early" : "body read";
			if (got < 0 && got >= -4095)
				return (int)got;
			return -EIO;
		}
		if ((r = put(c, c->in, (size_t)got)) != 0)
			return r;
		c->off += (uint64_t)got;
	}
	if (c->cr && (r = write_all(c->fd, "\r", 1)) != 0) {
		c->what = "write";
		return r;
	}
	return 0;
}

int
maildir_deliver(const char *root, const char *domain, const char *localpart,
		const char *prefix, maildir_read_fn rd, void *rctx,
		uint64_t len, struct maildir_result *res)
{
	char dom[NAME_MAX_BYTES + 1], lp[NAME_MAX_BYTES + 1];
	char host[HOST_MAX + 8], name[160], path[sizeof(res->path)];
	char what[sizeof(res->text)];
	struct copy c = { .fd = -1 };
	bool made = false, made_sub = false, sure;
	struct known_box was, now;
	struct timespec ts;
	const char *e;
	int r, rootfd, dfd, mfd, tmpfd, newfd;

	if (!res)
		return -EINVAL;
	memset(res, 0, sizeof(*res));
	if (!root || !*root || !rd) {
		set_fail(res, EINVAL, false, "4.3.5", "no root or body source");
		return res->status;
	}
	if ((e = name_error(domain))) {
		snprintf(what, sizeof(what), "domain %s", e);
		set_fail(res, EINVAL, true, "5.1.3", what);
		return res->status;
	}
	if ((e = name_error(localpart))) {
		snprintf(what, sizeof(what), "local part %s", e);
		set_fail(res, EINVAL, true, "5.1.3", what);
		return res->status;
	}
	lower_copy(dom, domain);
	lower_copy(lp, localpart);

	host_part(host, sizeof(host));
	clock_gettime(CLOCK_REALTIME, &ts);
	snprintf(name, sizeof(name), "%lld.M%06ldP%ldQ%lu.%s",
		 (long long)ts.tv_sec, ts.tv_nsec / 1000, (long)getpid(),
		 atomic_fetch_add(&seq, 1) + 1, host);
	r = snprintf(path, sizeof(path), "%s/%s/%s/new/%s", root, dom, lp,
		     name);
	if (r < 0 || (size_t)r >= sizeof(path)) {
		set_fail(res, ENAMETOOLONG, false, "4.3.5",
			 "mailbox path too long");
		return res->status;
	}

	c.in = malloc(2 * CHUNK + 1);
	if (!c.in) {
		set_fail(res, ENOMEM, false, NULL, "buffer");
		return res->status;
	}
	c.out = c.in + CHUNK;

	now = (struct known_box){.h = mailbox_hash(root, dom, lp)};
	(void)known_get(now.h, &was);
	rootfd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (rootfd < 0) {
		r = errno;
		snprintf(what, sizeof(what), "open root %.120s", root);
		set_fail(res, r, false, NULL, what);
		goto out_free_buf;
	}
	if ((dfd = subdir(rootfd, dom, &made)) < 0) {
		snprintf(what, sizeof(what), "mkdir %.100s", dom);
		set_fail(res, -dfd, false, NULL, what);
		goto out_close_root;
	}
	/* Each directory is synced in its parent unless it is the very one
	 * this process synced there before. */
	now.dom = dir_id_of(dfd);
	sure = same_dir(&now.dom, &was.dom);
	if ((made || !sure) && fsync(rootfd) != 0) {
		set_fail(res, errno, false, NULL, "fsync root");
		goto out_close_dom;
	}
	made = false;
	if ((mfd = subdir(dfd, lp, &made)) < 0) {
		snprintf(what, sizeof(what), "mkdir %.100s/%.100s", dom, lp);
		set_fail(res, -mfd, false, NULL, what);
		goto out_close_dom;
	}
	now.mbox = dir_id_of(mfd);
	sure = same_dir(&now.mbox, &was.mbox);
	if ((made || !sure) && fsync(dfd) != 0) {
		snprintf(what, sizeof(what), "fsync %.100s", dom);
		set_fail(res, errno, false, NULL, what);
		goto out_close_mbox;
	}
	if ((tmpfd = subdir(mfd, "tmp", &made_sub)) < 0) {
		set_fail(res, -tmpfd, false, NULL, "mkdir tmp");
		goto out_close_mbox;
	}
	if ((newfd = subdir(mfd, "new", &made_sub)) < 0) {
		set_fail(res, -newfd, false, NULL, "mkdir new");
		goto out_close_tmp;
	}
	if (mkdirat(mfd, "cur", 0700) == 0) {
		made_sub = true;
	} else if (errno != EEXIST) {
		set_fail(res, errno, false, NULL, "mkdir cur");
		goto out_close_new;
	}
	now.tmp = dir_id_of(tmpfd);
	now.new = dir_id_of(newfd);
	sure = same_dir(&now.tmp, &was.tmp) && same_dir(&now.new, &was.new);
	if ((made_sub || !sure) && fsync(mfd) != 0) {
		snprintf(what, sizeof(what), "fsync %.100s/%.100s", dom, lp);
		set_fail(res, errno, false, NULL, what);
		goto out_close_new;
	}

	c.fd = openat(tmpfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW |
					   O_CLOEXEC,
		      0600);
	if (c.fd < 0) {
		set_fail(res, errno, false, NULL, "create in tmp");
		goto out_close_new;
	}
	if ((r = copy_message(&c, prefix, rd, rctx, len)) != 0) {
		if (c.source)
			snprintf(what, sizeof(what), "%s at offset %llu",
				 c.what, (unsigned long long)c.off);
		else
			snprintf(what, sizeof(what), "%s tmp file", c.what);
		set_fail(res, -r, false, c.source ? "4.3.0" : NULL, what);
		goto out_close_file;
	}
	if (!fd_delivery_fault("no-maildir-fsync") && fsync(c.fd) != 0) {
		set_fail(res, errno, false, NULL, "fsync tmp file");
		goto out_close_file;
	}
	/* Delayed write errors (NFS) are reported by close(). */
	r = close(c.fd);
	c.fd = -1;
	if (r != 0) {
		set_fail(res, errno, false, NULL, "close tmp file");
		goto out_unlink_tmp;
	}
	if (linkat(tmpfd, name, newfd, name, 0) != 0) {
		set_fail(res, errno, false, NULL, "link into new");
		goto out_unlink_tmp;
	}
	if (!fd_delivery_fault("no-maildir-dirsync") && fsync(newfd) != 0) {
		set_fail(res, errno, false, NULL, "fsync new");
		/* Not reported delivered: do not leave it to be read and then
		 * delivered again on retry. */
		unlinkat(newfd, name, 0);
		goto out_unlink_tmp;
	}
	known_put(&now);
	/* Delivered. A stale tmp/ name is harmless (readers clean tmp/ of
	 * old files, and a power cut that brings one back leaves a second
	 * link to a complete file): no fsync of tmp/ for its removal, and no
	 * failure. */
	if (unlinkat(tmpfd, name, 0) != 0) {
		char esc[256];
		fd_log(FD_LOG_WARN, "maildir",
		       "event=tmp_cleanup_failed file=%s err=%d",
		       fd_log_escape(esc, sizeof(esc), name, strlen(name)),
		       errno);
	}
	memcpy(res->path, path, sizeof(path));
	set_ok(res, name);
	goto out_close_new;

out_close_file:
	close(c.fd);
out_unlink_tmp:
	unlinkat(tmpfd, name, 0);
out_close_new:
	close(newfd);
out_close_tmp:
	close(tmpfd);
out_close_mbox:
	close(mfd);
out_close_dom:
	close(dfd);
out_close_root:
	close(rootfd);
out_free_buf:
	free(c.in);
	return res->status;
}
