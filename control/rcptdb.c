/*
 * The valid-recipients table (contract and file format in rcptdb.h).
 *
 * Layout: every distinct entry, lower-cased, is appended NUL-terminated to
 * one arena; a slot of the open-addressing table (linear probing,
 * power-of-two size, at most half full) holds the entry's 64-bit hash, its
 * arena offset and its length. Length 0 marks an empty slot (no entry is
 * shorter than "@d"). Growing rehashes from the stored hashes without
 * touching the strings. A lookup lower-cases the address into a stack
 * buffer, hashes it once as "local@domain" and once as "@domain", and
 * compares strings only on a full 64-bit hash match.
 *
 * 1,000,000 addresses of ~25 bytes: ~26 MB of arena, 2^21 slots of 16
 * bytes (32 MB), loaded in a fraction of a second.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "finaldot/mailbox.h"
#include "rcptdb.h"

#define LINE_MAX_BYTES 512
/* Whole-file limit: the arena's offsets are 32-bit. */
#define FILE_MAX ((size_t)UINT32_MAX)

struct slot {
	uint64_t hash;
	uint32_t off;
	uint32_t len; /* 0: empty */
};

struct rcptdb {
	struct slot *slots;
	size_t cap; /* power of two */
	size_t n;
	char *arena;
	size_t arena_len, arena_cap;
};

static char
lower(char c)
{
	return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

static uint64_t
mix(uint64_t h)
{
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdull;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ull;
	h ^= h >> 33;
	return h;
}

/* Eight bytes at a time; quality comes from the final mix. */
static uint64_t
hash_bytes(const char *p, size_t n)
{
	uint64_t h = 0x9e3779b97f4a7c15ull ^ (n * 0xbf58476d1ce4e5b9ull);
	uint64_t w;

	for (; n >= 8; n -= 8, p += 8) {
		memcpy(&w, p, 8);
		h = (h ^ w) * 0x94d049bb133111ebull;
		h ^= h >> 29;
	}
	w = 0;
	memcpy(&w, p, n);
	h = (h ^ w) * 0x94d049bb133111ebull;
	return mix(h);
}

static const struct slot *
find(const struct rcptdb *db, const char *s, size_t n, uint64_t h)
{
	for (size_t j = (size_t)h & (db->cap - 1); db->slots[j].len;
	     j = (j + 1) & (db->cap - 1)) {
		const struct slot *sl = &db->slots[j];
		if (sl->hash == h && sl->len == n &&
		    memcmp(db->arena + sl->off, s, n) == 0)
			return sl;
	}
	return NULL;
}

static int
grow_table(struct rcptdb *db)
{
	size_t cap = db->cap ? db->cap * 2 : 1024;
	struct slot *s = calloc(cap, sizeof(*s));

	if (!s)
		return -ENOMEM;
	for (size_t i = 0; i < db->cap; i++) {
		size_t j;
		if (!db->slots[i].len)
			continue;
		for (j = (size_t)db->slots[i].hash & (cap - 1); s[j].len;
		     j = (j + 1) & (cap - 1))
			;
		s[j] = db->slots[i];
	}
	free(db->slots);
	db->slots = s;
	db->cap = cap;
	return 0;
}

/* Add s[0..n), already lower-cased, unless present. */
static int
add(struct rcptdb *db, const char *s, size_t n)
{
	uint64_t h = hash_bytes(s, n);
	size_t j;

	if (find(db, s, n, h))
		return 0;
	if ((db->n + 1) * 2 > db->cap && grow_table(db) != 0)
		return -ENOMEM;
	if (db->arena_len + n + 1 > db->arena_cap) {
		size_t cap = db->arena_cap ? db->arena_cap * 2 : 65536;
		char *a;
		while (cap < db->arena_len + n + 1)
			cap *= 2;
		if (cap > FILE_MAX) {
			if (db->arena_len + n + 1 > FILE_MAX)
				return -EFBIG;
			cap = FILE_MAX;
		}
		a = realloc(db->arena, cap);
		if (!a)
			return -ENOMEM;
		db->arena = a;
		db->arena_cap = cap;
	}
	for (j = (size_t)h & (db->cap - 1); db->slots[j].len;
	     j = (j + 1) & (db->cap - 1))
		;
	db->slots[j].hash = h;
	db->slots[j].off = (uint32_t)db->arena_len;
	db->slots[j].len = (uint32_t)n;
	memcpy(db->arena + db->arena_len, s, n);
	db->arena[db->arena_len + n] = '\0';
	db->arena_len += n + 1;
	db->n++;
	return 0;
}

__attribute__((format(printf, 4, 5))) static void
reason(char *why, size_t why_len, int err, const char *fmt, ...)
{
	va_list ap;

	if (why && why_len) {
		va_start(ap, fmt);
		vsnprintf(why, why_len, fmt, ap);
		va_end(ap);
	}
	errno = err;
}

static bool
blank(char c)
{
	return c == ' ' || c == '\t' || c == '\r';
}

/*
 * s[0..n) as the table keys it, into out (n + 1 octets): the mailbox as the
 * SMTP engine and delivery understand it. The local part as
 * fd_local_part() reads it ("bob" and "b\ob" are bob), the domain (after
 * the last '@') without one trailing dot (example.com. is example.com),
 * ASCII letters lowered. Before 2026-12-05 those spellings were looked up
 * as written: 550 5.1.1 for users that exist. Returns the length; *at the
 * offset of the '@' in out, or n when there is none.
 */
static size_t
canon(const char *s, size_t n, char *out, size_t *at)
{
	const char *a = NULL;
	size_t k, ln, dn;

	for (size_t i = n; i > 0; i--)
		if (s[i - 1] == '@') {
			a = s + i - 1;
			break;
		}
	ln = a ? (size_t)(a - s) : n;
	k = fd_local_part(s, ln, out, ln + 1); /* never longer than ln */
	for (size_t i = 0; i < k; i++)
		out[i] = lower(out[i]);
	*at = a ? k : n;
	if (!a)
		return k;
	dn = fd_domain_len(a + 1, n - ln - 1);
	out[k++] = '@';
	for (size_t i = 0; i < dn; i++)
		out[k++] = lower(a[1 + i]);
	return k;
}

/*
 * One line p[0..n) (without its LF). "" if it is fine (entry added, or
 * blank, or comment), else the reason; *err is the errno for a failure
 * that is not the line's fault.
 */
static const char *
parse_line(struct rcptdb *db, const char *p, size_t n, int *err)
{
	const char *s = p, *e = p + n, *at = NULL;
	char buf[LINE_MAX_BYTES + 1]; /* canon(): n + 1 */
	size_t len;

	*err = EINVAL;
	if (memchr(p, '\0', n))
		return "NUL byte";
	if (n && p[n - 1] == '\r')
		n--;
	if (n > LINE_MAX_BYTES)
		return "line longer than 512 bytes";
	while (s < e && blank(*s))
		s++;
	while (e > s && blank(e[-1]))
		e--;
	if (s == e || *s == '#')
		return "";
	len = (size_t)(e - s);
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == ' ' || c == '\t')
			return "space inside entry";
		if (c < 0x20 || c == 0x7f)
			return "control character";
		/* "<a@x>" or "Name <a@x>" would load and never match: the
		 * user gets 550 with no word at the reload */
		if (c == '<' || c == '>')
			return "angle bracket: write the bare address";
		if (c == '@')
			at = s + i;
	}
	if (!at)
		return "no '@'";
	if (s[0] == '@' && at != s)
		return "'@' inside domain";
	if (at == e - 1)
		return "empty domain";
	{
		size_t k;
		len = canon(s, len, buf, &k);
	}
	switch (add(db, buf, len)) {
	case 0:
		return "";
	case -EFBIG:
		*err = EFBIG;
		return "more than 4 GiB of entries";
	default:
		*err = ENOMEM;
		return "out of memory";
	}
}

static struct rcptdb *
load(const char *name, const char *text, size_t len, char *why,
     size_t why_len)
{
	struct rcptdb *db = calloc(1, sizeof(*db));
	const char *p = text, *end = text + len;
	unsigned long line = 1;

	if (!db || grow_table(db) != 0) {
		reason(why, why_len, ENOMEM, "%s: out of memory", name);
		goto out_free_db;
	}
	/* a UTF-8 byte order mark (some editors write one) is not part of
	 * the first entry */
	if (len >= 3 && memcmp(p, "\xef\xbb\xbf", 3) == 0)
		p += 3;
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		const char *le = nl ? nl : end;
		int err;
		const char *r = parse_line(db, p, (size_t)(le - p), &err);
		if (*r) {
			reason(why, why_len, err, "%s:%lu: %s", name, line, r);
			goto out_free_db;
		}
		if (!nl)
			break;
		p = nl + 1;
		line++;
	}
	if (why && why_len)
		why[0] = '\0';
	return db;

out_free_db:
	rcptdb_free(db);
	return NULL;
}

struct rcptdb *
rcptdb_load_mem(const char *text, size_t len, char *why, size_t why_len)
{
	if (!text)
		len = 0;
	return load("<memory>", text ? text : "", len, why, why_len);
}

struct rcptdb *
rcptdb_load(const char *path, char *why, size_t why_len)
{
	struct rcptdb *db = NULL;
	struct stat st;
	char *buf;
	size_t len = 0, cap;
	int fd, err;

	if (!path) {
		reason(why, why_len, EINVAL, "no recipients file");
		return NULL;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		err = errno;
		reason(why, why_len, err, "%s: %s", path, strerror(err));
		return NULL;
	}
	if (fstat(fd, &st) != 0) {
		err = errno;
		reason(why, why_len, err, "%s: %s", path, strerror(err));
		goto out_close_fd;
	}
	/* The size is a hint (the file may be a pipe or still growing). */
	cap = S_ISREG(st.st_mode) && st.st_size > 0 &&
			      (uint64_t)st.st_size < FILE_MAX
		      ? (size_t)st.st_size + 1
		      : 65536;
	buf = malloc(cap);
	if (!buf) {
		err = ENOMEM;
		reason(why, why_len, err, "%s: out of memory", path);
		goto out_close_fd;
	}
	for (;;) {
		ssize_t r;
		if (len == cap) {
			char *nb;
			if (cap >= FILE_MAX) {
				err = EFBIG;
				reason(why, why_len, err,
				       "%s: larger than 4 GiB", path);
				goto out_free_buf;
			}
			cap = cap > FILE_MAX / 2 ? FILE_MAX : cap * 2;
			nb = realloc(buf, cap);
			if (!nb) {
				err = ENOMEM;
				reason(why, why_len, err, "%s: out of memory",
				       path);
				goto out_free_buf;
			}
			buf = nb;
		}
		r = read(fd, buf + len, cap - len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			err = errno;
			reason(why, why_len, err, "%s: read: %s", path,
			       strerror(err));
			goto out_free_buf;
		}
		if (r == 0)
			break;
		len += (size_t)r;
	}
	db = load(path, buf, len, why, why_len);
	err = errno;

out_free_buf:
	free(buf);
out_close_fd:
	close(fd);
	if (!db)
		errno = err;
	return db;
}

void
rcptdb_free(struct rcptdb *db)
{
	if (!db)
		return;
	free(db->slots);
	free(db->arena);
	free(db);
}

int
rcptdb_check(const struct rcptdb *db, const char *addr)
{
	char buf[LINE_MAX_BYTES + 1]; /* canon(): n + 1 */
	size_t n, local = 0;

	if (!db || !addr)
		return 0;
	n = strnlen(addr, LINE_MAX_BYTES + 1);
	if (n > LINE_MAX_BYTES)
		return 0;
	n = canon(addr, n, buf, &local);
	if (local == 0 || local >= n || local == n - 1)
		return 0; /* no local part, no '@', or no domain */
	if (find(db, buf, n, hash_bytes(buf, n)))
		return 1;
	return find(db, buf + local, n - local,
		    hash_bytes(buf + local, n - local)) != NULL;
}

size_t
rcptdb_count(const struct rcptdb *db)
{
	return db ? db->n : 0;
}
