/*
 * The spool reader (contract in spool_reader.h; format in
 * finaldot/spool_format.h and docs/spool-format.md).
 *
 * Order of work: list wNN directories and their *.seg files; read each
 * header; compare the listing with the worker's segment list (a file the
 * writer made and never deleted that is gone: segment_missing); salvage
 * damaged headers where the epoch can be found; sort the valid segments of
 * a worker by use sequence (the order the writer used them, whatever their
 * file numbers), a copy right after its original; walk each with
 * spool_walk_segment(); feed every valid record to the message table; then
 * keep the messages that pass the commit rule.
 *
 * Assembly does not depend on the order records are met: a message's DATA
 * pieces are sorted by body offset at the end and must cover [0, length)
 * exactly; a record met twice (the same ENV bytes, the same DATA offset and
 * length, the same END) is a duplicate from a copy of a segment, counted
 * and skipped; two different ones for the same place break the message.
 * Every record was validated with its segment's epoch, and the END's body
 * CRC32C checks the assembled body, so order independence costs nothing in
 * safety and recovers what a misordered (salvaged) or copied segment holds.
 * The body CRC is assembled from the records' payload CRCs with
 * spool_crc32c_combine(), so no body byte is read twice during a scan.
 *
 * Salvaging a damaged segment header (block 0 unreadable as a header: a
 * flipped or zeroed byte, or worse). The epoch is what makes its records
 * trustworthy, so it must be established, never guessed:
 *  1. the damaged header's own epoch field, if a walk with it finds valid
 *     records (the damage was elsewhere in the header);
 *  2. else the epoch of a record at a block boundary that differs from that
 *     field in exactly one byte (the damage was in the epoch field), again
 *     confirmed by a walk. A client cannot forge a record with our epoch
 *     (it never learns it), nor with one that close to it.
 * The file number is then taken from the file name and the size from the
 * file; the use sequence from the damaged field (XXX if the damage hit it,
 * the segment may sort in the wrong place: only messages spanning its
 * boundary suffer, and order-independent assembly still finds those whose
 * records are all present). When nothing confirms an epoch (a zeroed
 * header block and more), the segment is reported and its records are not
 * used; the writer keeps the file (spool_seg.c) for a person to examine.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "finaldot/crc32c.h"
#include "finaldot/fsync.h"
#include "finaldot/log.h"
#include "finaldot/spool_format.h"
#include "spool/spool_ledger.h"
#include "spool_reader.h"

#define WIN_LEN (1u << 20)

enum { MS_ENV = 1, MS_END = 2, MS_BROKEN = 4 };

/* A DATA record's place, and its payload CRC for the body CRC. */
struct rpiece {
	struct ctl_spool_piece p;
	uint32_t crc;
};

struct mstate {
	uint64_t id;
	unsigned worker;
	unsigned flags;
	uint8_t *env_raw;
	size_t env_len;
	uint64_t next_off; /* end of the furthest piece so far */
	uint32_t crc;
	uint64_t total;
	uint32_t end_crc;
	uint32_t env_seg, end_seg;
	uint64_t env_off, end_off;
	struct rpiece *rp;
	size_t n_rp, cap_rp;
	struct ctl_spool_piece *pieces; /* finish(): sorted, for out[] */
	size_t n_pieces;
};

struct segent {
	struct ctl_spool_seg pub;
	char *path;
	uint64_t epoch;
	uint64_t walk_size;
	bool damaged;     /* a file whose header did not decode */
	uint64_t name_no; /* the number in its file name */
	unsigned hdr_worker; /* the worker its header names */
	uint64_t avail;   /* file size */
};

struct ctl_spool_scan {
	struct ctl_spool_summary sum;
	struct segent *segs;
	size_t nsegs, cap_segs;
	const uint8_t *mem; /* in-memory segment */
	size_t mem_len;

	struct mstate *ms;
	size_t nms, cap_ms;
	size_t *hash; /* index + 1, 0 empty */
	size_t hash_cap;

	struct ctl_spool_msg *out; /* committed, sorted by id */
	void **scratch;            /* their envelope storage */
	size_t nout;
	uint32_t cur_seg;
};

/* ---- message table ----------------------------------------------------- */

static size_t
hash_id(uint64_t id, size_t cap)
{
	id ^= id >> 33;
	id *= 0xff51afd7ed558ccdull;
	id ^= id >> 33;
	return (size_t)id & (cap - 1);
}

static int
hash_grow(struct ctl_spool_scan *s)
{
	size_t cap = s->hash_cap ? s->hash_cap * 2 : 1024;
	size_t *h = calloc(cap, sizeof(*h));

	if (!h)
		return -ENOMEM;
	for (size_t i = 0; i < s->nms; i++) {
		size_t j = hash_id(s->ms[i].id, cap);
		while (h[j])
			j = (j + 1) & (cap - 1);
		h[j] = i + 1;
	}
	free(s->hash);
	s->hash = h;
	s->hash_cap = cap;
	return 0;
}

static struct mstate *
mstate_get(struct ctl_spool_scan *s, uint64_t id, unsigned worker)
{
	size_t j;

	if ((s->nms + 1) * 2 > s->hash_cap && hash_grow(s) != 0)
		return NULL;
	j = hash_id(id, s->hash_cap);
	while (s->hash[j]) {
		struct mstate *m = &s->ms[s->hash[j] - 1];
		if (m->id == id)
			return m;
		j = (j + 1) & (s->hash_cap - 1);
	}
	if (s->nms == s->cap_ms) {
		size_t cap = s->cap_ms ? s->cap_ms * 2 : 256;
		struct mstate *n = realloc(s->ms, cap * sizeof(*n));
		if (!n)
			return NULL;
		s->ms = n;
		s->cap_ms = cap;
	}
	struct mstate *m = &s->ms[s->nms];
	memset(m, 0, sizeof(*m));
	m->id = id;
	m->worker = worker;
	s->hash[j] = ++s->nms;
	return m;
}

static int
on_record(void *ctx, const struct spool_walk_rec *r)
{
	struct ctl_spool_scan *s = ctx;
	struct segent *seg = &s->segs[s->cur_seg];
	unsigned w = seg->pub.worker;
	struct mstate *m = mstate_get(s, r->h.msgid, w);

	if (!m)
		return -ENOMEM;
	if (w < 256 && r->h.msgid > s->sum.max_msgid[w])
		s->sum.max_msgid[w] = r->h.msgid;
	switch ((enum spool_rec_type)r->h.type) {
	case SPOOL_REC_ENV:
		if (m->flags & MS_ENV) {
			/* The same envelope again: a copy's record. */
			if (r->payload && m->env_len == r->h.len &&
			    memcmp(m->env_raw, r->payload, r->h.len) == 0)
				s->sum.records_dup++;
			else
				m->flags |= MS_BROKEN;
			break;
		}
		m->env_raw = malloc(r->h.len ? r->h.len : 1);
		if (!m->env_raw)
			return -ENOMEM;
		memcpy(m->env_raw, r->payload, r->h.len);
		m->env_len = r->h.len;
		m->flags |= MS_ENV;
		m->env_seg = s->cur_seg;
		m->env_off = r->off;
		break;
	case SPOOL_REC_DATA:
		if (r->h.offset < m->next_off) {
			/* Behind the furthest piece: the same piece again
			 * (a copy) or an overlap (broken); finish() finds
			 * holes and overlaps among the rest. */
			bool dup = false;
			for (size_t k = m->n_rp; k-- > 0 && !dup;)
				dup = m->rp[k].p.body_off == r->h.offset &&
				      m->rp[k].p.len == r->h.len &&
				      m->rp[k].crc == r->payload_crc;
			if (dup) {
				s->sum.records_dup++;
				break;
			}
		}
		if (m->n_rp == m->cap_rp) {
			size_t cap = m->cap_rp ? m->cap_rp * 2 : 2;
			struct rpiece *n = realloc(m->rp, cap * sizeof(*n));
			if (!n)
				return -ENOMEM;
			m->rp = n;
			m->cap_rp = cap;
		}
		m->rp[m->n_rp++] = (struct rpiece){
			.p = {
				.seg = s->cur_seg,
				.len = r->h.len,
				.file_off = r->off + SPOOL_REC_HDR_LEN,
				.body_off = r->h.offset,
			},
			.crc = r->payload_crc,
		};
		if (r->h.offset + r->h.len > m->next_off)
			m->next_off = r->h.offset + r->h.len;
		break;
	case SPOOL_REC_END:
		if (m->flags & MS_END) {
			if (m->total == r->h.offset && m->end_crc == r->h.aux)
				s->sum.records_dup++;
			else
				m->flags |= MS_BROKEN;
			break;
		}
		m->flags |= MS_END;
		m->total = r->h.offset;
		m->end_crc = r->h.aux;
		m->end_seg = s->cur_seg;
		m->end_off = r->off;
		break;
	}
	return 0;
}

/* ---- sources ----------------------------------------------------------- */

struct src {
	int fd;
	const uint8_t *mem;
	size_t mem_len;
	const char *path; /* the walk's file, for the test seam */
};

/* Test seam: a bad sector past the first MiB of every segment
 * (scan-read-fail), or only of a worker's first file, 00000000.seg
 * (scan-read-fail-first). */
static bool
bad_sector(const struct src *sr, uint64_t off)
{
	size_t l;

	if (off < (1u << 20))
		return false;
	if (fd_delivery_fault("scan-read-fail"))
		return true;
	if (!sr->path || !fd_delivery_fault("scan-read-fail-first"))
		return false;
	l = strlen(sr->path);
	return l >= 13 && strcmp(sr->path + l - 13, "/00000000.seg") == 0;
}

static long
src_read(void *ctx, uint64_t off, void *buf, size_t n)
{
	struct src *sr = ctx;

	if (!sr->mem) {
		if (bad_sector(sr, off))
			return -EIO;
		return spool_read_fd(&sr->fd, off, buf, n);
	}
	if (off >= sr->mem_len)
		return 0;
	if (n > sr->mem_len - off)
		n = (size_t)(sr->mem_len - off);
	memcpy(buf, sr->mem + off, n);
	return (long)n;
}

/* ---- scanning ---------------------------------------------------------- */

static struct segent *
seg_add(struct ctl_spool_scan *s)
{
	if (s->nsegs == s->cap_segs) {
		size_t cap = s->cap_segs ? s->cap_segs * 2 : 16;
		struct segent *n = realloc(s->segs, cap * sizeof(*n));
		if (!n)
			return NULL;
		s->segs = n;
		s->cap_segs = cap;
	}
	struct segent *e = &s->segs[s->nsegs++];
	memset(e, 0, sizeof(*e));
	return e;
}

/* Read and check one header; fills e. */
static void
seg_probe(struct segent *e, struct src *sr, uint64_t avail)
{
	uint8_t hb[SPOOL_SEG_HDR_LEN];
	struct spool_seg_hdr h;

	e->avail = avail;
	if (src_read(sr, 0, hb, sizeof(hb)) != (long)sizeof(hb) ||
	    spool_seg_hdr_decode(hb, sizeof(hb), &h) != SPOOL_DEC_OK) {
		/* Salvaged later if a file long enough to hold records. */
		e->damaged = avail > SPOOL_BLOCK;
		return;
	}
	e->pub.header_ok = true;
	e->pub.file_no = h.file_no;
	e->pub.use_seq = h.use_seq;
	e->pub.size = h.size;
	e->pub.created_us = h.created_us;
	e->hdr_worker = h.worker;
	if (!e->path)
		e->pub.worker = h.worker;
	e->epoch = h.epoch;
	e->walk_size = h.size < avail ? h.size : avail;
}

/* A segment file that could not be opened (err): said, and marked so that
 * it is never given back this run (the next start scans it again). */
static void
seg_unopened(struct segent *e, const char *path, int err)
{
	fd_log(FD_LOG_ERR, "spool",
	       "event=segment_unreadable path=%s error=\"%s\" "
	       "action=\"its messages are not queued; the segment is kept "
	       "for the next start\"",
	       path, strerror(err));
	e->pub.read_error = true;
}

/* The number in a segment's file name (NNNNNNNN.seg), or UINT64_MAX. */
static uint64_t
name_number(const char *name)
{
	char *end;
	uint64_t no;

	if (strlen(name) != 12 || strcmp(name + 8, ".seg") != 0)
		return UINT64_MAX;
	no = strtoull(name, &end, 16);
	return end == name + 8 ? no : UINT64_MAX;
}

/*
 * Files the writer listed in wdir/segments (spool_ledger.h) that the
 * listing did not show: deleted or lost outside finaldot, with every
 * message in them. The list is read after the directory, and a file is
 * listed only once it exists and delisted before it is deleted, so a scan
 * of a live spool cannot report a file the writer removed; one it made
 * since the listing is found by the stat().
 */
static void
check_ledger(struct ctl_spool_scan *s, const char *wdir, unsigned worker,
	     size_t first)
{
	char path[4400], line[128];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", wdir, SPOOL_LEDGER_NAME);
	if (!(f = fopen(path, "r")))
		return; /* none yet (an older spool, or a new worker) */
	if (!fgets(line, sizeof(line), f) ||
	    strncmp(line, SPOOL_LEDGER_MAGIC, strlen(SPOOL_LEDGER_MAGIC)) != 0) {
		fd_log(FD_LOG_WARN, "spool",
		       "event=segment_list_bad worker=%u path=%s", worker, path);
		fclose(f);
		return;
	}
	while (fgets(line, sizeof(line), f)) {
		uint64_t no, use;
		struct stat st;
		bool seen = false;
		char fpath[4400];

		if (sscanf(line, "%" SCNx64 " %" SCNu64, &no, &use) != 2)
			continue;
		for (size_t i = first; i < s->nsegs && !seen; i++)
			seen = s->segs[i].name_no == no;
		snprintf(fpath, sizeof(fpath), "%s/%08" PRIx64 ".seg", wdir,
			 no);
		if (seen || stat(fpath, &st) == 0)
			continue;
		s->sum.segments_missing++;
		fd_log(FD_LOG_WARN, "spool",
		       "event=segment_missing worker=%u file=%08" PRIx64
		       " use_seq=%" PRIu64 " error=\"listed in %s but not on "
		       "disk: the messages it held are lost unless it is "
		       "restored\"",
		       worker, no, use, SPOOL_LEDGER_NAME);
	}
	fclose(f);
}

static int
list_worker(struct ctl_spool_scan *s, const char *root, const char *wname,
	    unsigned worker)
{
	char wdir[4096];
	DIR *d;
	struct dirent *e;
	size_t first = s->nsegs;

	snprintf(wdir, sizeof(wdir), "%s/%s", root, wname);
	d = opendir(wdir);
	if (!d)
		return 0;
	s->sum.workers++;
	while ((e = readdir(d))) {
		size_t l = strlen(e->d_name);
		char path[4400];
		struct segent *se;
		struct stat st;
		struct src sr = { .fd = -1 };

		if (l < 5 || strcmp(e->d_name + l - 4, ".seg") != 0)
			continue;
		snprintf(path, sizeof(path), "%s/%s", wdir, e->d_name);
		if (!(se = seg_add(s))) {
			closedir(d);
			return -ENOMEM;
		}
		se->path = strdup(path);
		se->pub.path = se->path;
		se->pub.worker = worker;
		se->name_no = name_number(e->d_name);
		sr.fd = fd_open_noatime(path, O_RDONLY | O_CLOEXEC);
		if (sr.fd >= 0 && fstat(sr.fd, &st) == 0) {
			seg_probe(se, &sr, (uint64_t)st.st_size);
		} else {
			/* Not even its header: what it holds is unknown, and
			 * the scan says so (counted bad, never given back). */
			seg_unopened(se, path, errno);
		}
		if (sr.fd >= 0)
			close(sr.fd);
		if (se->pub.header_ok && se->hdr_worker != worker) {
			/* Another worker's file: its records would be taken
			 * for this worker's (and its use sequence may be one
			 * of this worker's own). Not used, never given back;
			 * the operator moves it home. */
			fd_log(FD_LOG_ERR, "spool",
			       "event=segment_misplaced path=%s worker=%u "
			       "header_worker=%u error=\"a segment of another "
			       "worker: its records are not used; move it to "
			       "w%02x/ and restart\"",
			       path, worker, se->hdr_worker, se->hdr_worker);
			se->pub.header_ok = false;
		}
	}
	closedir(d);
	check_ledger(s, wdir, worker, first);
	return 0;
}

static int
stop_first(void *ctx, const struct spool_walk_rec *r)
{
	(void)ctx;
	(void)r;
	return 1;
}

/* Does a walk with this epoch find a valid record? */
static bool
epoch_confirmed(struct segent *e, struct src *sr, uint64_t epoch,
		uint8_t *win)
{
	struct spool_walk w;

	if (epoch == 0)
		return false; /* never an epoch */
	memset(&w, 0, sizeof(w));
	w.read = src_read;
	w.read_ctx = sr;
	w.size = e->avail;
	w.epoch = epoch;
	w.win = win;
	w.win_len = WIN_LEN;
	return spool_walk_segment(&w, stop_first, NULL) == 1;
}

static unsigned
bytes_differ(uint64_t a, uint64_t b)
{
	unsigned n = 0;

	for (uint64_t x = a ^ b; x; x >>= 8)
		n += (x & 0xff) != 0;
	return n;
}

/* A damaged header: establish the epoch from the records (see the top of
 * the file) or report the segment unusable. */
static void
salvage(struct ctl_spool_scan *s, struct segent *e, uint8_t *win)
{
	struct src sr = { .fd = -1, .mem = s->mem, .mem_len = s->mem_len };
	uint8_t hb[SPOOL_SEG_HDR_LEN];
	uint64_t raw_epoch, epoch = 0;
	bool ok = false;

	s->sum.segments_damaged++;
	if (e->path &&
	    (sr.fd = fd_open_noatime(e->path, O_RDONLY | O_CLOEXEC)) < 0)
		goto out_log;
	if (src_read(&sr, 0, hb, sizeof(hb)) != (long)sizeof(hb))
		goto out_close;
	raw_epoch = spool_get64(hb + 32);
	if (epoch_confirmed(e, &sr, raw_epoch, win)) {
		epoch = raw_epoch;
		ok = true;
	}
	/* Each try walks the segment: a few distinct candidates at most (our
	 * own records all carry one epoch; only crafted input has more). */
	uint64_t tried = 0;
	unsigned tries = 0;
	for (uint64_t off = SPOOL_BLOCK; !ok && tries < 4 &&
	     off + SPOOL_REC_HDR_LEN <= e->avail; off += SPOOL_BLOCK) {
		uint8_t rb[SPOOL_REC_HDR_LEN];
		struct spool_rec_hdr h;

		if (src_read(&sr, off, rb, sizeof(rb)) != (long)sizeof(rb))
			break;
		if (spool_rec_hdr_decode(rb, sizeof(rb), &h) != SPOOL_DEC_OK ||
		    bytes_differ(h.epoch, raw_epoch) != 1 || h.epoch == tried)
			continue;
		tried = h.epoch;
		tries++;
		if (epoch_confirmed(e, &sr, h.epoch, win)) {
			epoch = h.epoch;
			ok = true;
		}
	}
	if (ok) {
		e->pub.header_ok = true;
		e->pub.salvaged = true;
		e->epoch = epoch;
		e->pub.use_seq = spool_get64(hb + 24);
		e->pub.file_no = e->path ? e->name_no : spool_get64(hb + 16);
		e->pub.created_us = spool_get64(hb + 40);
		e->pub.size = e->avail;
		e->walk_size = e->avail;
		s->sum.segments_salvaged++;
	}
out_close:
	if (sr.fd >= 0)
		close(sr.fd);
out_log:
	fd_log(ok ? FD_LOG_WARN : FD_LOG_ERR, "spool",
	       "event=segment_damaged worker=%u path=%s salvaged=%s%s",
	       e->pub.worker, e->path ? e->path : "(memory)", ok ? "yes" : "no",
	       ok ? ""
		  : " error=\"header damaged and no epoch confirmed: its "
		    "records are not used; the file is kept\"");
}

static int
seg_cmp(const void *a, const void *b)
{
	const struct segent *x = a, *y = b;

	if (x->pub.header_ok != y->pub.header_ok)
		return x->pub.header_ok ? -1 : 1;
	if (x->pub.worker != y->pub.worker)
		return x->pub.worker < y->pub.worker ? -1 : 1;
	if (x->pub.use_seq != y->pub.use_seq)
		return x->pub.use_seq < y->pub.use_seq ? -1 : 1;
	/* The same use twice: a copy has the original's header, file
	 * number included. The file named as its header says is the
	 * original and sorts first (the one after it is reported as the
	 * copy to remove); then by name, not by directory order. */
	if ((x->name_no == x->pub.file_no) != (y->name_no == y->pub.file_no))
		return x->name_no == x->pub.file_no ? -1 : 1;
	if (x->pub.file_no != y->pub.file_no)
		return x->pub.file_no < y->pub.file_no ? -1 : 1;
	if (x->name_no != y->name_no)
		return x->name_no < y->name_no ? -1 : 1;
	if (x->path && y->path)
		return strcmp(x->path, y->path);
	return 0;
}

static int
msg_cmp(const void *a, const void *b)
{
	const struct ctl_spool_msg *x = a, *y = b;

	return x->id < y->id ? -1 : x->id > y->id ? 1 : 0;
}

static int
walk_all(struct ctl_spool_scan *s)
{
	uint8_t *win = malloc(WIN_LEN);
	int r = 0;

	if (!win)
		return -ENOMEM;
	for (size_t i = 0; i < s->nsegs; i++)
		if (s->segs[i].damaged)
			salvage(s, &s->segs[i], win);
	if (s->nsegs > 1)
		qsort(s->segs, s->nsegs, sizeof(*s->segs), seg_cmp);
	for (size_t i = 0; i < s->nsegs; i++) {
		struct segent *e = &s->segs[i];
		struct src sr = {.fd = -1,
				 .mem = s->mem,
				 .mem_len = s->mem_len,
				 .path = e->path};
		struct spool_walk w;

		e->pub.path = e->path;
		s->sum.segments++;
		if (!e->pub.header_ok) {
			s->sum.segments_bad++;
			continue;
		}
		/* A copy sorts right after its original (same use, equal
		 * epoch; the file number breaks the tie). Still walked: if
		 * the original is damaged, its records fill in. */
		for (size_t k = i; k-- > 0;) {
			struct segent *o = &s->segs[k];
			if (!o->pub.header_ok || o->pub.worker != e->pub.worker ||
			    o->pub.use_seq != e->pub.use_seq)
				break;
			if (o->epoch == e->epoch && !o->pub.duplicate) {
				e->pub.duplicate = true;
				s->sum.segments_duplicate++;
				fd_log(FD_LOG_WARN, "spool",
				       "event=segment_duplicate worker=%u "
				       "path=%s copy_of=%s error=\"the same "
				       "segment under two names: its messages "
				       "are kept once; remove the copy\"",
				       e->pub.worker,
				       e->path ? e->path : "(memory)",
				       o->path ? o->path : "(memory)");
				break;
			}
		}
		if (e->path &&
		    (sr.fd = fd_open_noatime(e->path,
					     O_RDONLY | O_CLOEXEC)) < 0) {
			seg_unopened(e, e->path, errno);
			s->sum.segments_bad++;
			continue;
		}
		memset(&w, 0, sizeof(w));
		w.read = src_read;
		w.read_ctx = &sr;
		w.size = e->walk_size;
		w.epoch = e->epoch;
		w.win = win;
		w.win_len = WIN_LEN;
		s->cur_seg = (uint32_t)i;
		r = spool_walk_segment(&w, on_record, s);
		if (sr.fd >= 0)
			close(sr.fd);
		e->pub.records_ok = w.records_ok;
		e->pub.records_bad = w.records_bad;
		e->pub.records_stale = w.records_stale;
		s->sum.records_ok += w.records_ok;
		s->sum.records_bad += w.records_bad;
		s->sum.records_stale += w.records_stale;
		if (w.records_ok == 0)
			s->sum.segments_empty++;
		if (r == -ENOMEM)
			break;
		if (r < 0) {
			/* A read failed: what lies past it was not scanned,
			 * so the segment must outlive this run (never sealed,
			 * never given back: the next start scans it again). */
			fd_log(FD_LOG_ERR, "spool",
			       "event=segment_unreadable path=%s off=%" PRIu64
			       " error=\"%s\" action=\"messages past it are "
			       "not queued; the segment is kept for the next "
			       "start\"",
			       e->path ? e->path : "(memory)", w.end,
			       strerror(-r));
			e->pub.read_error = true;
			s->sum.segments_bad++;
			r = 0;
		}
	}
	free(win);
	return r;
}

static void
mark_seg(struct ctl_spool_scan *s, uint32_t seg, uint32_t *last)
{
	if (seg != *last) {
		s->segs[seg].pub.committed++;
		*last = seg;
	}
}

static int
rp_cmp(const void *a, const void *b)
{
	const struct rpiece *x = a, *y = b;

	if (x->p.body_off != y->p.body_off)
		return x->p.body_off < y->p.body_off ? -1 : 1;
	return x->p.len < y->p.len ? -1 : x->p.len > y->p.len ? 1 : 0;
}

/*
 * The body of m from its DATA pieces, whatever order they came in: sorted
 * by offset, they must tile [0, total) exactly. Fills m->pieces and m->crc.
 * 0, 1 (not a whole body), -ENOMEM.
 */
static int
assemble(struct mstate *m)
{
	uint64_t at = 0;
	uint32_t crc = 0;

	if (m->n_rp > 1)
		qsort(m->rp, m->n_rp, sizeof(*m->rp), rp_cmp);
	for (size_t k = 0; k < m->n_rp; k++) {
		if (m->rp[k].p.body_off != at)
			return 1; /* a hole or an overlap */
		crc = spool_crc32c_combine(crc, m->rp[k].crc, m->rp[k].p.len);
		at += m->rp[k].p.len;
	}
	if (at != m->total)
		return 1;
	m->pieces = malloc((m->n_rp ? m->n_rp : 1) * sizeof(*m->pieces));
	if (!m->pieces)
		return -ENOMEM;
	for (size_t k = 0; k < m->n_rp; k++)
		m->pieces[k] = m->rp[k].p;
	m->n_pieces = m->n_rp;
	m->crc = crc;
	return 0;
}

/* Workers with a segment the scan could not read whole (header or
 * records): a calloc'd flag per worker number up to *n, or NULL when
 * there is none (or no memory: then nothing is kept, as before). */
static bool *
workers_unsure(const struct ctl_spool_scan *s, unsigned *n)
{
	unsigned max = 0;
	bool any = false, *u;

	for (size_t i = 0; i < s->nsegs; i++) {
		const struct ctl_spool_seg *g = &s->segs[i].pub;

		if (!g->header_ok || g->read_error) {
			any = true;
			if (g->worker > max)
				max = g->worker;
		}
	}
	if (!any || !(u = calloc((size_t)max + 1, sizeof(*u))))
		return NULL;
	for (size_t i = 0; i < s->nsegs; i++) {
		const struct ctl_spool_seg *g = &s->segs[i].pub;

		if (!g->header_ok || g->read_error)
			u[g->worker] = true;
	}
	*n = max + 1;
	return u;
}

static void
keep_seg(struct ctl_spool_scan *s, uint32_t seg)
{
	struct segent *e = &s->segs[seg];

	if (e->pub.kept_incomplete || e->pub.read_error)
		return;
	e->pub.kept_incomplete = true;
	fd_log(FD_LOG_WARN, "spool",
	       "event=segment_kept path=%s worker=%u reason=\"records of a "
	       "message left incomplete while another segment of this "
	       "worker could not be read\" action=\"not given back; the "
	       "next start scans it again\"",
	       e->path ? e->path : "(memory)", e->pub.worker);
}

/*
 * A message found in part may have the rest of its records in a segment
 * the scan could not read. Its segments are then kept: given back, their
 * records would be gone when the unreadable segment reads again at the
 * next start, and the message with them (acknowledged mail). A message
 * cut short by a crash (never acknowledged) is kept only as long as its
 * worker has such a segment.
 */
static void
keep_incomplete(struct ctl_spool_scan *s, const struct mstate *m,
		const bool *unsure, unsigned n_unsure)
{
	if (!unsure || m->worker >= n_unsure || !unsure[m->worker])
		return;
	if (m->flags & MS_ENV)
		keep_seg(s, m->env_seg);
	if (m->flags & MS_END)
		keep_seg(s, m->end_seg);
	for (size_t k = 0; k < m->n_rp; k++)
		keep_seg(s, m->rp[k].p.seg);
}

static int
finish(struct ctl_spool_scan *s)
{
	unsigned n_unsure = 0;
	bool *unsure = workers_unsure(s, &n_unsure);

	s->out = calloc(s->nms ? s->nms : 1, sizeof(*s->out));
	s->scratch = calloc(s->nms ? s->nms : 1, sizeof(*s->scratch));
	if (!s->out || !s->scratch) {
		free(unsure);
		return -ENOMEM;
	}
	for (size_t i = 0; i < s->nms; i++) {
		struct mstate *m = &s->ms[i];
		struct ctl_spool_msg *o = &s->out[s->nout];
		size_t sl;
		void *scr;

		int ar = m->flags == (MS_ENV | MS_END) ? assemble(m) : 1;
		if (ar < 0) {
			free(unsure);
			return ar;
		}
		if (ar || m->crc != m->end_crc) {
			s->sum.msgs_incomplete++;
			keep_incomplete(s, m, unsure, n_unsure);
			continue;
		}
		sl = spool_env_scratch_len(m->env_len);
		scr = malloc(sl);
		if (!scr) {
			free(unsure);
			return -ENOMEM;
		}
		if (spool_env_decode(m->env_raw, m->env_len, &o->env, scr, sl) !=
		    SPOOL_DEC_OK) {
			free(scr);
			s->sum.msgs_incomplete++;
			continue;
		}
		s->scratch[s->nout] = scr;
		o->id = m->id;
		o->worker = m->worker;
		o->body_len = m->total;
		o->body_crc = m->crc;
		o->env_seg = m->env_seg;
		o->env_off = m->env_off;
		o->end_seg = m->end_seg;
		o->end_off = m->end_off;
		o->n_pieces = m->n_pieces;
		o->pieces = m->pieces;
		s->nout++;
		s->sum.msgs_committed++;
		s->sum.body_bytes += m->total;
		uint32_t last = UINT32_MAX;
		mark_seg(s, m->env_seg, &last);
		for (size_t k = 0; k < m->n_pieces; k++)
			mark_seg(s, m->pieces[k].seg, &last);
		mark_seg(s, m->end_seg, &last);
	}
	free(unsure);
	/* Keep the pieces of committed messages only (now owned via out). */
	for (size_t i = 0; i < s->nms; i++) {
		free(s->ms[i].env_raw);
		s->ms[i].env_raw = NULL;
	}
	if (s->nout > 1)
		qsort(s->out, s->nout, sizeof(*s->out), msg_cmp);
	/* scratch[] no longer lines up with out[] after the sort; it is only
	 * a list of blocks to free. */
	free(s->hash);
	s->hash = NULL;
	s->hash_cap = 0;
	return 0;
}

void
ctl_spool_scan_free(struct ctl_spool_scan *s)
{
	if (!s)
		return;
	for (size_t i = 0; i < s->nms; i++) {
		free(s->ms[i].env_raw);
		free(s->ms[i].rp);
		free(s->ms[i].pieces);
	}
	for (size_t i = 0; s->scratch && i < s->nout; i++)
		free(s->scratch[i]);
	for (size_t i = 0; i < s->nsegs; i++)
		free(s->segs[i].path);
	free(s->scratch);
	free(s->out);
	free(s->ms);
	free(s->hash);
	free(s->segs);
	free(s);
}

struct ctl_spool_scan *
ctl_spool_scan_dir(const char *root, int *err)
{
	struct ctl_spool_scan *s = calloc(1, sizeof(*s));
	DIR *d;
	struct dirent *e;
	int r = 0;

	if (!s) {
		*err = -ENOMEM;
		return NULL;
	}
	d = opendir(root);
	if (!d) {
		*err = -errno;
		free(s);
		return NULL;
	}
	while ((e = readdir(d))) {
		char *end;
		unsigned long w;

		if (e->d_name[0] != 'w' || strlen(e->d_name) != 3)
			continue;
		w = strtoul(e->d_name + 1, &end, 16);
		if (*end || w > 255)
			continue;
		if ((r = list_worker(s, root, e->d_name, (unsigned)w)) != 0)
			break;
	}
	closedir(d);
	if (r == 0)
		r = walk_all(s);
	if (r == 0)
		r = finish(s);
	if (r) {
		ctl_spool_scan_free(s);
		*err = r;
		return NULL;
	}
	return s;
}

struct ctl_spool_scan *
ctl_spool_scan_mem(const void *p, size_t n)
{
	struct ctl_spool_scan *s = calloc(1, sizeof(*s));
	struct segent *e;
	struct src sr = { .fd = -1, .mem = p, .mem_len = n };

	if (!s)
		return NULL;
	s->mem = p;
	s->mem_len = n;
	if (!(e = seg_add(s)))
		goto fail;
	seg_probe(e, &sr, n);
	s->sum.workers = 1;
	if (walk_all(s) != 0 || finish(s) != 0)
		goto fail;
	return s;
fail:
	ctl_spool_scan_free(s);
	return NULL;
}

/* ---- queries ----------------------------------------------------------- */

const struct ctl_spool_summary *
ctl_spool_scan_summary(const struct ctl_spool_scan *s)
{
	return &s->sum;
}

void
ctl_spool_scan_log(const struct ctl_spool_scan *s)
{
	const struct ctl_spool_summary *m = &s->sum;

	fd_log(FD_LOG_INFO, "spool",
	       "event=recovery workers=%u segments=%" PRIu64
	       " segments_bad=%" PRIu64 " segments_empty=%" PRIu64
	       " segments_damaged=%" PRIu64 " segments_salvaged=%" PRIu64
	       " segments_duplicate=%" PRIu64 " segments_missing=%" PRIu64
	       " records_ok=%" PRIu64 " records_bad=%" PRIu64
	       " records_stale=%" PRIu64 " records_dup=%" PRIu64
	       " committed=%" PRIu64 " incomplete=%" PRIu64
	       " bytes=%" PRIu64,
	       m->workers, m->segments, m->segments_bad, m->segments_empty,
	       m->segments_damaged, m->segments_salvaged,
	       m->segments_duplicate, m->segments_missing, m->records_ok,
	       m->records_bad, m->records_stale, m->records_dup,
	       m->msgs_committed, m->msgs_incomplete, m->body_bytes);
}

size_t
ctl_spool_scan_count(const struct ctl_spool_scan *s)
{
	return s->nout;
}

const struct ctl_spool_msg *
ctl_spool_scan_msg(const struct ctl_spool_scan *s, size_t i)
{
	return i < s->nout ? &s->out[i] : NULL;
}

const struct ctl_spool_msg *
ctl_spool_scan_find(const struct ctl_spool_scan *s, uint64_t id)
{
	size_t lo = 0, hi = s->nout;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (s->out[mid].id == id)
			return &s->out[mid];
		if (s->out[mid].id < id)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

size_t
ctl_spool_scan_nsegs(const struct ctl_spool_scan *s)
{
	return s->nsegs;
}

const struct ctl_spool_seg *
ctl_spool_scan_segment(const struct ctl_spool_scan *s, size_t i)
{
	return i < s->nsegs ? &s->segs[i].pub : NULL;
}

int
ctl_spool_read_body(const struct ctl_spool_scan *s,
		    const struct ctl_spool_msg *m, ctl_spool_body_fn fn,
		    void *ctx)
{
	uint8_t *buf = malloc(1u << 16);
	struct src sr = { .fd = -1, .mem = s->mem, .mem_len = s->mem_len };
	uint32_t open_seg = UINT32_MAX, crc = 0;
	int r = 0;

	if (!buf)
		return -ENOMEM;
	for (size_t i = 0; i < m->n_pieces && r == 0; i++) {
		const struct ctl_spool_piece *pc = &m->pieces[i];
		uint64_t off = pc->file_off, left = pc->len;

		if (!s->mem && pc->seg != open_seg) {
			if (sr.fd >= 0)
				close(sr.fd);
			sr.fd = fd_open_noatime(s->segs[pc->seg].path,
						       O_RDONLY | O_CLOEXEC);
			if (sr.fd < 0) {
				r = -errno;
				break;
			}
			open_seg = pc->seg;
		}
		while (left && r == 0) {
			size_t k = left < (1u << 16) ? (size_t)left : (1u << 16);
			long got = src_read(&sr, off, buf, k);
			if (got < 0) {
				r = (int)got;
				break;
			}
			if ((size_t)got != k) {
				r = -EIO;
				break;
			}
			crc = fd_crc32c(crc, buf, k);
			r = fn(ctx, buf, k);
			off += k;
			left -= k;
		}
	}
	if (sr.fd >= 0)
		close(sr.fd);
	free(buf);
	if (r == 0 && crc != m->body_crc)
		r = -EIO;
	return r;
}
