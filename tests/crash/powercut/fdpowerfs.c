/*
 * fdpowerfs: a FUSE filesystem for power-cut tests (issue 10). Test-only.
 *
 * It holds everything in memory, twice: what a reader sees now ("cur")
 * and what would survive a power cut ("dur"). A write changes cur only and
 * marks its 512-byte sectors dirty; a flush copies them to dur:
 *
 *   fsync/fdatasync(file)   all of the file's dirty sectors and its size;
 *   a write flagged O_DSYNC or O_SYNC (RWF_DSYNC, an O_DSYNC open): that
 *                           write's sectors, and the size up to its end;
 *   fsync(directory)        the directory's entries (create, link, unlink,
 *                           rename in it), as they are now.
 *
 * Nothing else is durable: not a file's name without an fsync of its
 * directory (fsync of the file does not publish its name), not a rename
 * without an fsync of both directories it touches, not a size change
 * without an fsync of the file. This is stricter than ext4 or XFS, which
 * often persist more (POSIX promises no more than this).
 *
 * "Cutting the power" (a write of "cut MODE SEED" to the control file
 * /.powercut, once the programs using the filesystem are killed): every
 * inode's contents become dur, with unflushed sectors dropped or, in the
 * torn modes, each unflushed 512-byte or 4 KiB unit kept at random (a
 * subset of the sectors of the unflushed writes, in no order: torn and
 * reordered writes, as a disk with a volatile cache may leave them). In
 * the torn modes a directory's unsynced changes also persist as a whole
 * with probability 1/2, and a grown file keeps its new size with 1/2; or,
 * in mode keep, every unflushed sector kept and no unsynced size or
 * directory change (a disk's cache that made it, metadata that did not).
 * Then the durable state is saved to the image file and the filesystem
 * answers EIO to everything until it is unmounted. Mounting the image
 * again is the reboot.
 *
 * A clean unmount (no cut) saves everything, as a clean shutdown would.
 *
 * Reading /.powercut returns counters: which durability points reached
 * the filesystem (tests assert on them before trusting a run).
 *
 * Limits: one thread; no symlinks, xattrs or mmap (files are opened
 * direct_io so every write arrives here as a request, never through the
 * kernel's page cache); attributes other than size (mode, times) are
 * durable at once; a write in flight when the power goes is either whole
 * (processed before the cut) or refused; deleted inodes keep their memory
 * until the next cut.
 *
 * Usage: fdpowerfs IMAGE MOUNTPOINT   (IMAGE is loaded if it exists)
 */
#define FUSE_USE_VERSION 34
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PF_SECTOR 512u
#define PF_DIRTY_WRITE 1 /* dirty[]: written since the last flush */
#define PF_DIRTY_SIZE 2  /* zeroed or exposed by a size change only */
#define PF_CTL_INO 2u
#define PF_CTL_NAME ".powercut"
#define PF_MAGIC "FDPWRFS1"

struct pf_dent {
	char *name;
	uint64_t ino;
	struct pf_dent *next;
};

struct pf_ino {
	bool used;
	mode_t mode;
	uid_t uid;
	gid_t gid;
	struct timespec mtime;
	uint32_t nlink; /* names in cur */
	/* regular files */
	uint8_t *cur, *dur, *dirty; /* dirty: one byte per sector */
	size_t cur_len, dur_len, cap, dirty_cap;
	/* directories */
	struct pf_dent *ents, *dents; /* cur, dur */
	bool dir_dirty;
	bool reach; /* cut: reachable from the root through dur entries */
};

struct pf_stats {
	uint64_t writes, dsync_writes, bytes, fsyncs, fdatasyncs, fsyncdirs;
	uint64_t creates, unlinks, renames, links, direct_opens, eio;
	uint64_t cut_sectors_lost, cut_sectors_kept, cut_dirs_lost,
		cut_dirs_kept;
};

static struct {
	struct pf_ino *t;
	uint64_t n; /* entries in t; inode numbers are indexes */
	const char *image;
	bool dead;
	uint64_t rng;
	struct pf_stats st;
	char ctl_out[2048];
} fs;

static void *
xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);

	if (!q) {
		fprintf(stderr, "fdpowerfs: out of memory\n");
		exit(2);
	}
	return q;
}

static uint64_t
rnd(void)
{
	/* xorshift64*: reproducible from the seed of the cut command */
	fs.rng ^= fs.rng >> 12;
	fs.rng ^= fs.rng << 25;
	fs.rng ^= fs.rng >> 27;
	return fs.rng * 2685821657736338717ull;
}

static struct pf_ino *
get(fuse_ino_t ino)
{
	if (ino >= fs.n || !fs.t[ino].used)
		return NULL;
	return &fs.t[ino];
}

static uint64_t
new_ino(mode_t mode)
{
	uint64_t i = fs.n;
	struct pf_ino *n;

	fs.t = xrealloc(fs.t, (fs.n + 1) * sizeof(*fs.t));
	fs.n++;
	n = &fs.t[i];
	memset(n, 0, sizeof(*n));
	n->used = true;
	n->mode = mode;
	clock_gettime(CLOCK_REALTIME, &n->mtime);
	return i;
}

/* ---- file contents ----------------------------------------------------- */

static void
reserve(struct pf_ino *n, size_t len)
{
	size_t sec = (len + PF_SECTOR - 1) / PF_SECTOR;

	if (len > n->cap) {
		size_t c = n->cap ? n->cap : 65536;
		while (c < len)
			c *= 2;
		n->cur = xrealloc(n->cur, c);
		n->dur = xrealloc(n->dur, c);
		memset(n->cur + n->cap, 0, c - n->cap);
		memset(n->dur + n->cap, 0, c - n->cap);
		n->cap = c;
	}
	if (sec > n->dirty_cap) {
		size_t c = n->dirty_cap ? n->dirty_cap : 128;
		while (c < sec)
			c *= 2;
		n->dirty = xrealloc(n->dirty, c);
		memset(n->dirty + n->dirty_cap, 0, c - n->dirty_cap);
		n->dirty_cap = c;
	}
}

static void
set_len(struct pf_ino *n, size_t len)
{
	reserve(n, len);
	if (len < n->cur_len)
		memset(n->cur + len, 0, n->cur_len - len);
	/* The sectors of the change are dirty: a shrink zeroes their tail,
	 * a growth exposes zeros where dur may hold older bytes (dirtied by
	 * a size change only: cut keep leaves them as they were). */
	for (size_t s = (len < n->cur_len ? len : n->cur_len) / PF_SECTOR;
	     s * PF_SECTOR < (len > n->cur_len ? len : n->cur_len); s++)
		if (!n->dirty[s])
			n->dirty[s] = PF_DIRTY_SIZE;
	n->cur_len = len;
}

static void
flush_range(struct pf_ino *n, size_t off, size_t len)
{
	for (size_t s = off / PF_SECTOR; s * PF_SECTOR < off + len; s++) {
		if (s >= n->dirty_cap || !n->dirty[s])
			continue;
		memcpy(n->dur + s * PF_SECTOR, n->cur + s * PF_SECTOR,
		       PF_SECTOR);
		n->dirty[s] = 0;
	}
}

static void
flush_file(struct pf_ino *n)
{
	if (!S_ISREG(n->mode))
		return;
	reserve(n, n->cur_len > n->dur_len ? n->cur_len : n->dur_len);
	flush_range(n, 0, n->cap);
	n->dur_len = n->cur_len;
}

static void
free_dents(struct pf_dent *d)
{
	while (d) {
		struct pf_dent *x = d->next;
		free(d->name);
		free(d);
		d = x;
	}
}

static struct pf_dent *
copy_dents(const struct pf_dent *d)
{
	struct pf_dent *h = NULL, **tail = &h;

	for (; d; d = d->next) {
		struct pf_dent *c = xrealloc(NULL, sizeof(*c));
		c->name = strdup(d->name);
		if (!c->name)
			exit(2);
		c->ino = d->ino;
		c->next = NULL;
		*tail = c;
		tail = &c->next;
	}
	return h;
}

static void
flush_dir(struct pf_ino *n)
{
	if (!S_ISDIR(n->mode))
		return;
	free_dents(n->dents);
	n->dents = copy_dents(n->ents);
	n->dir_dirty = false;
}

/* ---- directories ------------------------------------------------------- */

static struct pf_dent **
find(struct pf_ino *dir, const char *name)
{
	struct pf_dent **p;

	for (p = &dir->ents; *p; p = &(*p)->next)
		if (strcmp((*p)->name, name) == 0)
			return p;
	return NULL;
}

static void
add_ent(struct pf_ino *dir, const char *name, uint64_t ino)
{
	struct pf_dent *d = xrealloc(NULL, sizeof(*d));

	d->name = strdup(name);
	if (!d->name)
		exit(2);
	d->ino = ino;
	d->next = dir->ents;
	dir->ents = d;
	dir->dir_dirty = true;
	fs.t[ino].nlink++;
	clock_gettime(CLOCK_REALTIME, &dir->mtime);
}

static void
del_ent(struct pf_ino *dir, struct pf_dent **p)
{
	struct pf_dent *d = *p;

	*p = d->next;
	fs.t[d->ino].nlink--;
	free(d->name);
	free(d);
	dir->dir_dirty = true;
	clock_gettime(CLOCK_REALTIME, &dir->mtime);
}

/* ---- image ------------------------------------------------------------- */

static void
mark(uint64_t ino)
{
	struct pf_ino *n = &fs.t[ino];

	if (n->reach)
		return;
	n->reach = true;
	if (S_ISDIR(n->mode))
		for (struct pf_dent *d = n->dents; d; d = d->next)
			if (d->ino < fs.n && fs.t[d->ino].used)
				mark(d->ino);
}

static int
put(FILE *f, const void *p, size_t n)
{
	return fwrite(p, 1, n, f) == n ? 0 : -EIO;
}

/* The durable state (dur, dents) of every inode a durable name reaches. */
static int
save_image(void)
{
	char tmp[PATH_MAX];
	FILE *f;
	int r = 0;

	for (uint64_t i = 0; i < fs.n; i++)
		fs.t[i].reach = false;
	mark(FUSE_ROOT_ID);
	snprintf(tmp, sizeof(tmp), "%s.tmp", fs.image);
	f = fopen(tmp, "wb");
	if (!f)
		return -errno;
	r |= put(f, PF_MAGIC, 8);
	for (uint64_t i = 0; i < fs.n; i++) {
		struct pf_ino *n = &fs.t[i];
		uint32_t hdr[4];
		uint64_t len = n->dur_len, ne = 0;
		int64_t mt[2] = {n->mtime.tv_sec, n->mtime.tv_nsec};

		if (!n->used || !n->reach || i == PF_CTL_INO)
			continue;
		hdr[0] = (uint32_t)n->mode;
		hdr[1] = (uint32_t)n->uid;
		hdr[2] = (uint32_t)n->gid;
		hdr[3] = 0;
		r |= put(f, &i, 8);
		r |= put(f, hdr, sizeof(hdr));
		r |= put(f, mt, sizeof(mt));
		if (S_ISREG(n->mode)) {
			r |= put(f, &len, 8);
			if (len)
				r |= put(f, n->dur, len);
			continue;
		}
		for (struct pf_dent *d = n->dents; d; d = d->next)
			ne++;
		r |= put(f, &ne, 8);
		for (struct pf_dent *d = n->dents; d; d = d->next) {
			uint64_t nl = strlen(d->name);
			r |= put(f, &nl, 8);
			r |= put(f, d->name, nl);
			r |= put(f, &d->ino, 8);
		}
	}
	if (fflush(f) != 0 || fsync(fileno(f)) != 0)
		r = -EIO;
	if (fclose(f) != 0)
		r = -EIO;
	if (r == 0 && rename(tmp, fs.image) != 0)
		r = -errno;
	return r;
}

static int
get_(FILE *f, void *p, size_t n)
{
	return fread(p, 1, n, f) == n ? 0 : -1;
}

static int
load_image(void)
{
	FILE *f = fopen(fs.image, "rb");
	char magic[8];
	uint64_t ino;

	if (!f)
		return errno == ENOENT ? 0 : -errno;
	if (get_(f, magic, 8) || memcmp(magic, PF_MAGIC, 8))
		goto bad;
	while (get_(f, &ino, 8) == 0) {
		uint32_t hdr[4];
		int64_t mt[2];
		uint64_t len;
		struct pf_ino *n;

		if (ino > (1u << 28) || get_(f, hdr, sizeof(hdr)) ||
		    get_(f, mt, sizeof(mt)) || get_(f, &len, 8))
			goto bad;
		while (fs.n <= ino)
			new_ino(0);
		n = &fs.t[ino];
		n->mode = (mode_t)hdr[0];
		n->uid = (uid_t)hdr[1];
		n->gid = (gid_t)hdr[2];
		n->mtime.tv_sec = mt[0];
		n->mtime.tv_nsec = mt[1];
		if (S_ISREG(n->mode)) {
			if (len > (1ull << 34))
				goto bad;
			reserve(n, (size_t)len);
			if (len && get_(f, n->cur, (size_t)len))
				goto bad;
			if (len)
				memcpy(n->dur, n->cur, (size_t)len);
			n->cur_len = n->dur_len = (size_t)len;
			continue;
		}
		for (uint64_t k = 0; k < len; k++) {
			uint64_t nl, child;
			char name[NAME_MAX + 1];
			if (get_(f, &nl, 8) || nl > NAME_MAX ||
			    get_(f, name, (size_t)nl) || get_(f, &child, 8))
				goto bad;
			name[nl] = 0;
			while (fs.n <= child)
				new_ino(0);
			n = &fs.t[ino]; /* fs.t may have moved */
			add_ent(n, name, child);
		}
		flush_dir(n);
	}
	fclose(f);
	for (uint64_t i = PF_CTL_INO + 1; i < fs.n; i++)
		if (fs.t[i].mode == 0)
			fs.t[i].used = false; /* a gap, or a name without inode */
	return 0;
bad:
	fclose(f);
	return -EBADMSG;
}

/* ---- the power cut ----------------------------------------------------- */

/* unit 0: every unflushed sector lost; 512 or 4096: each unit kept at
 * random; keep_all: every sector written since its last flush kept, and
 * nothing else (no unsynced size or directory change, no zeros of a
 * shrink), as a disk whose cache made it while the filesystem's metadata
 * did not. */
static void
cut(unsigned unit, bool keep_all, uint64_t seed)
{
	fs.rng = seed * 0x9e3779b97f4a7c15ull + 1;
	for (uint64_t i = 0; i < fs.n; i++) {
		struct pf_ino *n = &fs.t[i];

		if (!n->used)
			continue;
		if (S_ISDIR(n->mode) && n->dir_dirty) {
			if (unit && !keep_all && (rnd() & 1)) {
				flush_dir(n);
				fs.st.cut_dirs_kept++;
			} else {
				fs.st.cut_dirs_lost++;
			}
		}
		if (!S_ISREG(n->mode))
			continue;
		reserve(n, n->cur_len > n->dur_len ? n->cur_len : n->dur_len);
		for (size_t s = 0; s < n->dirty_cap; s += unit ? unit / PF_SECTOR : 1) {
			bool keep = keep_all || (unit && (rnd() & 1));
			size_t k = unit ? unit / PF_SECTOR : 1;
			for (size_t j = s; j < s + k && j < n->dirty_cap; j++) {
				if (!n->dirty[j])
					continue;
				if (keep && (!keep_all ||
					     n->dirty[j] == PF_DIRTY_WRITE)) {
					memcpy(n->dur + j * PF_SECTOR,
					       n->cur + j * PF_SECTOR, PF_SECTOR);
					fs.st.cut_sectors_kept++;
				} else {
					fs.st.cut_sectors_lost++;
				}
				n->dirty[j] = 0;
			}
		}
		if (unit && !keep_all && n->cur_len > n->dur_len &&
		    (rnd() & 1))
			n->dur_len = n->cur_len;
	}
}

/* ---- requests ---------------------------------------------------------- */

static void
fill_stat(uint64_t ino, struct stat *st)
{
	struct pf_ino *n = &fs.t[ino];

	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_mode = n->mode;
	st->st_nlink = S_ISDIR(n->mode) ? 2 : n->nlink;
	st->st_uid = n->uid;
	st->st_gid = n->gid;
	st->st_size = ino == PF_CTL_INO ? 0 : (off_t)n->cur_len;
	st->st_blksize = 4096;
	st->st_blocks = (blkcnt_t)((n->cur_len + 511) / 512);
	st->st_mtim = n->mtime;
	st->st_ctim = n->mtime;
	st->st_atim = n->mtime;
}

static void
reply_entry(fuse_req_t req, uint64_t ino)
{
	struct fuse_entry_param e;

	memset(&e, 0, sizeof(e));
	e.ino = ino;
	e.generation = 1;
	e.attr_timeout = 1.0;
	e.entry_timeout = 1.0;
	fill_stat(ino, &e.attr);
	fuse_reply_entry(req, &e);
}

/* Refuse everything once the power is off (but the control file). */
static bool
dead(fuse_req_t req)
{
	if (!fs.dead)
		return false;
	fs.st.eio++;
	fuse_reply_err(req, EIO);
	return true;
}

static void
pf_init(void *ud, struct fuse_conn_info *conn)
{
	(void)ud;
	/* No writeback cache: every write is a request, in order. */
	conn->want &= ~(unsigned)FUSE_CAP_WRITEBACK_CACHE;
}

static void
pf_destroy(void *ud)
{
	(void)ud;
	if (fs.dead)
		return;
	/* A clean unmount: everything is written, as at a clean shutdown. */
	for (uint64_t i = 0; i < fs.n; i++) {
		if (!fs.t[i].used)
			continue;
		flush_file(&fs.t[i]);
		flush_dir(&fs.t[i]);
	}
	if (save_image() != 0)
		fprintf(stderr, "fdpowerfs: cannot save %s\n", fs.image);
}

static void
pf_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct pf_ino *d = get(parent);
	struct pf_dent **p;

	if (parent == FUSE_ROOT_ID && strcmp(name, PF_CTL_NAME) == 0) {
		reply_entry(req, PF_CTL_INO);
		return;
	}
	if (dead(req))
		return;
	if (!d || !S_ISDIR(d->mode)) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	p = find(d, name);
	if (!p) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	reply_entry(req, (*p)->ino);
}

static void
pf_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;

	(void)fi;
	if (ino != PF_CTL_INO && dead(req))
		return;
	if (!get(ino)) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fill_stat(ino, &st);
	fuse_reply_attr(req, &st, 1.0);
}

static void
pf_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *a, int to_set,
	   struct fuse_file_info *fi)
{
	struct pf_ino *n = get(ino);
	struct stat st;

	(void)fi;
	if (ino != PF_CTL_INO && dead(req))
		return;
	if (!n) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if (to_set & FUSE_SET_ATTR_MODE)
		n->mode = (n->mode & S_IFMT) | (a->st_mode & 07777);
	if (to_set & FUSE_SET_ATTR_UID)
		n->uid = a->st_uid;
	if (to_set & FUSE_SET_ATTR_GID)
		n->gid = a->st_gid;
	if (to_set & FUSE_SET_ATTR_SIZE && ino != PF_CTL_INO) {
		if (!S_ISREG(n->mode) || a->st_size < 0) {
			fuse_reply_err(req, EINVAL);
			return;
		}
		set_len(n, (size_t)a->st_size);
	}
	if (to_set & FUSE_SET_ATTR_MTIME)
		n->mtime = a->st_mtim;
	if (to_set & FUSE_SET_ATTR_MTIME_NOW)
		clock_gettime(CLOCK_REALTIME, &n->mtime);
	fill_stat(ino, &st);
	fuse_reply_attr(req, &st, 1.0);
}

/* Make a node named `name` in `parent`: 0 and *ino, or an errno. */
static int
make(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
     uint64_t *ino)
{
	struct pf_ino *d = get(parent);
	const struct fuse_ctx *c = fuse_req_ctx(req);

	if (!d || !S_ISDIR(d->mode))
		return ENOTDIR;
	if (strlen(name) > NAME_MAX)
		return ENAMETOOLONG;
	if (find(d, name) ||
	    (parent == FUSE_ROOT_ID && strcmp(name, PF_CTL_NAME) == 0))
		return EEXIST;
	*ino = new_ino(mode);
	fs.t[*ino].uid = c->uid;
	fs.t[*ino].gid = c->gid;
	add_ent(&fs.t[parent], name, *ino); /* fs.t may have moved */
	fs.st.creates++;
	return 0;
}

static void
pf_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
	 dev_t rdev)
{
	uint64_t ino;
	int e;

	(void)rdev;
	if (dead(req))
		return;
	if (!S_ISREG(mode) && !S_ISSOCK(mode) && !S_ISFIFO(mode)) {
		fuse_reply_err(req, EPERM);
		return;
	}
	if ((e = make(req, parent, name, mode, &ino)) != 0) {
		fuse_reply_err(req, e);
		return;
	}
	reply_entry(req, ino);
}

static void
pf_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	uint64_t ino;
	int e;

	if (dead(req))
		return;
	if ((e = make(req, parent, name, S_IFDIR | (mode & 07777), &ino)) != 0) {
		fuse_reply_err(req, e);
		return;
	}
	reply_entry(req, ino);
}

static void
pf_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
	  struct fuse_file_info *fi)
{
	struct fuse_entry_param e;
	uint64_t ino;
	int r;

	if (dead(req))
		return;
	if ((r = make(req, parent, name, S_IFREG | (mode & 07777), &ino)) != 0) {
		fuse_reply_err(req, r);
		return;
	}
	memset(&e, 0, sizeof(e));
	e.ino = ino;
	e.generation = 1;
	e.attr_timeout = 1.0;
	e.entry_timeout = 1.0;
	fill_stat(ino, &e.attr);
	fi->direct_io = 1;
	if (fi->flags & O_DIRECT)
		fs.st.direct_opens++;
	fuse_reply_create(req, &e, fi);
}

static void
remove_name(fuse_req_t req, fuse_ino_t parent, const char *name, bool dir)
{
	struct pf_ino *d = get(parent);
	struct pf_dent **p;
	struct pf_ino *n;

	if (dead(req))
		return;
	if (!d || !S_ISDIR(d->mode) || !(p = find(d, name))) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	n = &fs.t[(*p)->ino];
	if (dir && !S_ISDIR(n->mode)) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	if (!dir && S_ISDIR(n->mode)) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	if (dir && n->ents) {
		fuse_reply_err(req, ENOTEMPTY);
		return;
	}
	del_ent(d, p);
	fs.st.unlinks++;
	fuse_reply_err(req, 0);
}

static void
pf_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	remove_name(req, parent, name, false);
}

static void
pf_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	remove_name(req, parent, name, true);
}

static void
pf_rename(fuse_req_t req, fuse_ino_t parent, const char *name,
	  fuse_ino_t newparent, const char *newname, unsigned int flags)
{
	struct pf_ino *d = get(parent), *nd = get(newparent);
	struct pf_dent **p, **q;
	uint64_t ino;

	if (dead(req))
		return;
	if (flags & ~(unsigned)RENAME_NOREPLACE) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (!d || !nd || !S_ISDIR(d->mode) || !S_ISDIR(nd->mode) ||
	    !(p = find(d, name))) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	ino = (*p)->ino;
	if ((q = find(nd, newname)) != NULL) {
		if ((*q)->ino == ino) {
			fuse_reply_err(req, 0);
			return;
		}
		if (flags & RENAME_NOREPLACE) {
			fuse_reply_err(req, EEXIST);
			return;
		}
		if (S_ISDIR(fs.t[(*q)->ino].mode) &&
		    fs.t[(*q)->ino].ents) {
			fuse_reply_err(req, ENOTEMPTY);
			return;
		}
		del_ent(nd, q);
	}
	add_ent(nd, newname, ino);
	p = find(d, name); /* the list changed if d == nd */
	del_ent(d, p);
	fs.st.renames++;
	fuse_reply_err(req, 0);
}

static void
pf_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent,
	const char *newname)
{
	struct pf_ino *n = get(ino), *nd = get(newparent);

	if (dead(req))
		return;
	if (!n || !nd || !S_ISDIR(nd->mode) || S_ISDIR(n->mode)) {
		fuse_reply_err(req, n ? EPERM : ENOENT);
		return;
	}
	if (find(nd, newname)) {
		fuse_reply_err(req, EEXIST);
		return;
	}
	add_ent(nd, newname, ino);
	fs.st.links++;
	reply_entry(req, ino);
}

static void
pf_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ino != PF_CTL_INO && dead(req))
		return;
	if (!get(ino)) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	/* direct_io: every write reaches us as a request, O_DIRECT or not,
	 * so nothing is durable by sitting in the kernel's page cache. */
	fi->direct_io = 1;
	if (fi->flags & O_DIRECT)
		fs.st.direct_opens++;
	if (ino == PF_CTL_INO) {
		const struct pf_stats *s = &fs.st;
		snprintf(fs.ctl_out, sizeof(fs.ctl_out),
			 "dead=%d writes=%" PRIu64 " dsync_writes=%" PRIu64
			 " bytes=%" PRIu64 " fsyncs=%" PRIu64
			 " fdatasyncs=%" PRIu64 " fsyncdirs=%" PRIu64
			 " creates=%" PRIu64 " unlinks=%" PRIu64
			 " renames=%" PRIu64 " links=%" PRIu64
			 " direct_opens=%" PRIu64 " eio=%" PRIu64
			 " cut_sectors_lost=%" PRIu64
			 " cut_sectors_kept=%" PRIu64 " cut_dirs_lost=%" PRIu64
			 " cut_dirs_kept=%" PRIu64 "\n",
			 fs.dead, s->writes, s->dsync_writes, s->bytes,
			 s->fsyncs, s->fdatasyncs, s->fsyncdirs, s->creates,
			 s->unlinks, s->renames, s->links, s->direct_opens,
			 s->eio, s->cut_sectors_lost, s->cut_sectors_kept,
			 s->cut_dirs_lost, s->cut_dirs_kept);
	}
	fuse_reply_open(req, fi);
}

static void
pf_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
	struct fuse_file_info *fi)
{
	struct pf_ino *n = get(ino);
	const uint8_t *src;
	size_t len;

	(void)fi;
	if (ino != PF_CTL_INO && dead(req))
		return;
	if (!n || off < 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (ino == PF_CTL_INO) {
		src = (const uint8_t *)fs.ctl_out;
		len = strlen(fs.ctl_out);
	} else {
		src = n->cur;
		len = n->cur_len;
	}
	if ((size_t)off >= len) {
		fuse_reply_buf(req, NULL, 0);
		return;
	}
	if (size > len - (size_t)off)
		size = len - (size_t)off;
	fuse_reply_buf(req, (const char *)src + off, size);
}

/* "cut drop SEED", "cut torn512 SEED", "cut torn4k SEED", "cut keep". */
static void
ctl_write(fuse_req_t req, const char *buf, size_t size)
{
	char cmd[128], mode[32];
	unsigned long long seed = 0;
	unsigned unit;
	bool keep_all = false;
	int r;

	if (size >= sizeof(cmd) || fs.dead) {
		fuse_reply_err(req, fs.dead ? EIO : EINVAL);
		return;
	}
	memcpy(cmd, buf, size);
	cmd[size] = 0;
	if (sscanf(cmd, "cut %31s %llu", mode, &seed) < 1) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (strcmp(mode, "drop") == 0)
		unit = 0;
	else if (strcmp(mode, "torn512") == 0)
		unit = 512;
	else if (strcmp(mode, "torn4k") == 0)
		unit = 4096;
	else if (strcmp(mode, "keep") == 0) {
		unit = 512;
		keep_all = true;
	} else {
		fuse_reply_err(req, EINVAL);
		return;
	}
	cut(unit, keep_all, seed);
	fs.dead = true;
	r = save_image();
	fprintf(stderr,
		"fdpowerfs: power cut mode=%s seed=%llu sectors_lost=%" PRIu64
		" sectors_kept=%" PRIu64 " dirs_lost=%" PRIu64
		" dirs_kept=%" PRIu64 " saved=%d\n",
		mode, seed, fs.st.cut_sectors_lost, fs.st.cut_sectors_kept,
		fs.st.cut_dirs_lost, fs.st.cut_dirs_kept, r);
	if (r) {
		fuse_reply_err(req, -r);
		return;
	}
	fuse_reply_write(req, size);
}

static void
pf_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
	 off_t off, struct fuse_file_info *fi)
{
	struct pf_ino *n = get(ino);

	if (ino == PF_CTL_INO) {
		ctl_write(req, buf, size);
		return;
	}
	if (dead(req))
		return;
	if (!n || !S_ISREG(n->mode) || off < 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if ((size_t)off + size > n->cur_len)
		set_len(n, (size_t)off + size);
	if (size)
		memcpy(n->cur + off, buf, size);
	for (size_t s = (size_t)off / PF_SECTOR;
	     s * PF_SECTOR < (size_t)off + size; s++)
		n->dirty[s] = PF_DIRTY_WRITE;
	clock_gettime(CLOCK_REALTIME, &n->mtime);
	fs.st.writes++;
	fs.st.bytes += size;
	/* The kernel passes the file's flags plus O_DSYNC for an RWF_DSYNC
	 * (IOCB_DSYNC) write, in fuse_write_in.flags (fi->flags here). */
	if (fi->flags & (O_DSYNC | O_SYNC)) {
		fs.st.dsync_writes++;
		flush_range(n, (size_t)off, size);
		if ((size_t)off + size > n->dur_len)
			n->dur_len = (size_t)off + size;
	}
	fuse_reply_write(req, size);
}

static void
pf_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
	 struct fuse_file_info *fi)
{
	struct pf_ino *n = get(ino);

	(void)fi;
	if (dead(req))
		return;
	if (!n) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if (datasync)
		fs.st.fdatasyncs++;
	else
		fs.st.fsyncs++;
	flush_file(n);
	fuse_reply_err(req, 0);
}

static void
pf_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync,
	    struct fuse_file_info *fi)
{
	struct pf_ino *n = get(ino);

	(void)datasync;
	(void)fi;
	if (dead(req))
		return;
	if (!n) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fs.st.fsyncdirs++;
	flush_dir(n);
	fuse_reply_err(req, 0);
}

static void
pf_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
	   struct fuse_file_info *fi)
{
	struct pf_ino *d = get(ino);
	char *buf;
	size_t used = 0;
	off_t i = 0;

	(void)fi;
	if (dead(req))
		return;
	if (!d || !S_ISDIR(d->mode)) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	buf = xrealloc(NULL, size);
	/* Offsets: 1 after ".", 2 after "..", then one per entry. */
	for (struct pf_dent *e = d->ents; i < 2 || e; i++) {
		struct stat st;
		const char *name;
		size_t k;

		if (i < 2) {
			name = i == 0 ? "." : "..";
			memset(&st, 0, sizeof(st));
			st.st_ino = ino;
			st.st_mode = S_IFDIR;
		} else {
			name = e->name;
			fill_stat(e->ino, &st);
			e = e->next;
		}
		if (i < off)
			continue;
		k = fuse_add_direntry(req, buf + used, size - used, name, &st,
				      i + 1);
		if (k > size - used)
			break;
		used += k;
	}
	fuse_reply_buf(req, buf, used);
	free(buf);
}

static void
pf_statfs(fuse_req_t req, fuse_ino_t ino)
{
	struct statvfs sv;

	(void)ino;
	if (dead(req))
		return;
	memset(&sv, 0, sizeof(sv));
	sv.f_bsize = 4096;
	sv.f_frsize = 4096;
	sv.f_blocks = 1u << 22; /* 16 GiB: memory is the real limit */
	sv.f_bfree = sv.f_blocks;
	sv.f_bavail = sv.f_blocks;
	sv.f_files = 1u << 20;
	sv.f_ffree = 1u << 20;
	sv.f_namemax = NAME_MAX;
	fuse_reply_statfs(req, &sv);
}

static void
pf_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
	     struct fuse_file_info *fi)
{
	struct pf_ino *n = get(ino);

	(void)fi;
	if (dead(req))
		return;
	if (!n || !S_ISREG(n->mode) || off < 0 || len <= 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (mode & ~FALLOC_FL_KEEP_SIZE) {
		fuse_reply_err(req, EOPNOTSUPP);
		return;
	}
	if (!(mode & FALLOC_FL_KEEP_SIZE) &&
	    (size_t)(off + len) > n->cur_len)
		set_len(n, (size_t)(off + len));
	fuse_reply_err(req, 0);
}

static const struct fuse_lowlevel_ops pf_ops = {
	.init = pf_init,
	.destroy = pf_destroy,
	.lookup = pf_lookup,
	.getattr = pf_getattr,
	.setattr = pf_setattr,
	.mknod = pf_mknod,
	.mkdir = pf_mkdir,
	.unlink = pf_unlink,
	.rmdir = pf_rmdir,
	.rename = pf_rename,
	.link = pf_link,
	.open = pf_open,
	.read = pf_read,
	.write = pf_write,
	.fsync = pf_fsync,
	.readdir = pf_readdir,
	.fsyncdir = pf_fsyncdir,
	.statfs = pf_statfs,
	.create = pf_create,
	.fallocate = pf_fallocate,
};

int
main(int argc, char **argv)
{
	char *fargv[] = {argv[0], "-o", "fsname=fdpowerfs,subtype=fdpowerfs",
			 NULL};
	struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
	struct fuse_session *se;
	int r;

	if (argc != 3) {
		fprintf(stderr, "usage: fdpowerfs IMAGE MOUNTPOINT\n");
		return 2;
	}
	fs.image = argv[1];
	new_ino(0);                           /* 0: unused */
	new_ino(S_IFDIR | 0755);              /* 1: the root */
	new_ino(S_IFREG | 0600);              /* 2: the control file */
	fs.t[0].used = false;
	if ((r = load_image()) != 0) {
		fprintf(stderr, "fdpowerfs: bad image %s: %s\n", fs.image,
			strerror(-r));
		return 2;
	}
	se = fuse_session_new(&args, &pf_ops, sizeof(pf_ops), NULL);
	if (!se)
		goto out_args;
	if (fuse_set_signal_handlers(se) != 0)
		goto out_destroy;
	if (fuse_session_mount(se, argv[2]) != 0)
		goto out_signals;
	r = fuse_session_loop(se);
	fuse_session_unmount(se);
	fuse_remove_signal_handlers(se);
	fuse_session_destroy(se);
	fuse_opt_free_args(&args);
	return r ? 1 : 0;

out_signals:
	fuse_remove_signal_handlers(se);
out_destroy:
	fuse_session_destroy(se);
out_args:
	fuse_opt_free_args(&args);
	return 2;
}
