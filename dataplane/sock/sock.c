/*
 * Kernel-socket transport: one io_uring per worker thread carries accepts,
 * receives, sends and the spool's durable writes, so that one
 * io_uring_submit_and_wait() per loop iteration serves network and disk.
 * What a connection does with its octets (the session, TLS, timers,
 * shutdown) is the connection layer's (conn/conn.h); this file holds the
 * sockets, the ring, the receive buffers and the loop.
 *
 * Per iteration:
 *   1. submit what is queued and wait (bounded by the next tick) for a CQE;
 *   2. handle every CQE that is ready: accept -> conn_open(); recv ->
 *      conn_input(); send -> conn_send_done(); spool -> completions, which
 *      produce the 250s (worker.c) and wake their sessions;
 *   3. the connection layer services the connections it marked (woken,
 *      spool room, timers: conn_set_service(), conn_set_tick());
 *   4. spool_flush(): the loop is idle, so the batch being filled closes and
 *      goes out with the next submit (natural batching);
 *   5. stopping: conn_set_begin_stop() answers everyone 421 by the force
 *      point; the loop ends at the deadline.
 *
 * Receives use single-shot recv with a provided-buffer ring (buffer
 * selection): an idle connection holds no buffer. The ring holds only as
 * many buffers as the connections in use plus a margin (ring_fill()), the
 * most recently returned first, so that receives cycle through a small,
 * warm set instead of through the whole pool (max_connections + 64
 * buffers of 16 KiB: 128 MiB by default), which cost a page fault per
 * fresh page and a cache miss per line. A buffer the session did not
 * fully consume (it is waiting for a commit, for spool room, or for its
 * output to drain) stays held by the connection and no new recv is armed,
 * so the kernel's receive window, not our memory, absorbs a client that
 * talks ahead; the layer asks for it again (ops->resume). Sends are
 * asynchronous: one in flight per connection, from the session's (or
 * TLS's) output buffer, which stays put until the completion. Multishot
 * accept keeps one accept armed per listener.
 *
 * user_data: a pointer to a connection, a listener or the loop (all 8-byte
 * aligned) with the operation in the low 3 bits. The spool's CQEs carry the
 * top bit (spool_owns_cqe()). Never set here.
 *
 * Lifetime of a slot: in use from accept until the layer closed it AND no
 * operation is in flight (a send may point into the session's or TLS's
 * buffers until then: conn_release() comes last).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <linux/filter.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "conn/conn.h"
#include "finaldot/log.h"
#include "finaldot/msgid.h"
#include "finaldot/seam.h"
#include "sock/sock.h"
#include "sock/owner.h"
#include "sock/tcpinfo.h"
#include "spool/spool.h"
#include "worker.h"

#define RING_ENTRIES 4096u
#define BUF_GROUP 1
#define BUF_SIZE (16u * 1024u)
/* Buffers in the ring beyond one per connection in use (each arms at most
 * one receive, so this is room to spare, not a limit). */
#define BUF_RING_SLACK 64u
#define TICK_US 100000u /* longest wait without a timer due */

enum op {
	OP_NONE = 0,
	OP_RECV = 1,
	OP_SEND = 2,
	OP_ACCEPT = 3,
	OP_WAKE = 4,
	OP_IGNORE = 5, /* cancels: result not needed */
	OP_SPOOL = 6,  /* the spool's wake eventfd: a spare is ready */
};

struct sock_loop;

struct sock_conn {
	struct conn conn;      /* the connection layer's part */
	struct sock_loop *loop;
	int fd;
	unsigned inflight;     /* recv + send SQEs not yet completed */
	bool in_use;
	bool recv_armed;
	bool send_armed;
	bool closing;          /* the layer closed it (sock_close) */
	bool starved;          /* last recv found no provided buffer */
	bool held;             /* holds provided buffer held_bid */
	uint16_t held_bid;
	uint32_t held_off;
	uint32_t held_len;
	struct sock_conn *free_next;
} __attribute__((aligned(64)));

struct sock_listener {
	struct sock_loop *loop;
	int fd;
	unsigned idx;
	bool armed;
} __attribute__((aligned(8)));

struct sock_loop {
	struct fd_worker *w;
	struct conn_set cs;
	struct io_uring ring;
	struct io_uring_buf_ring *br;
	size_t br_bytes;
	uint8_t *bufs;
	unsigned nbufs;        /* the pool: bids 0 .. nbufs-1 */
	unsigned ring_avail;   /* buffers in the ring, not taken yet */
	unsigned fresh;        /* bids from here on never used */
	uint16_t *spare;       /* returned bids out of the ring, a stack */
	unsigned nspare;
	struct sock_conn *conns;
	struct sock_conn *free;
	unsigned nconns;
	unsigned in_use;
	struct sock_listener listeners[FD_CONFIG_MAX_LISTEN];
	unsigned nlisteners;
	uint64_t wake_val;
	uint64_t spool_wake_val;
	bool wake_armed;
	uint64_t next_accept_rearm_us;
	uint64_t next_accept_log_us;
	uint64_t accept_errors;
	bool buffers_returned; /* re-arm starved connections */
	unsigned nstarved;     /* connections with starved set */
	bool spool_progress;   /* spool completions this round */
} __attribute__((aligned(64)));

static inline uint64_t
ud(const void *p, enum op op)
{
	return (uint64_t)(uintptr_t)p | (uint64_t)op;
}

static inline enum op
ud_op(uint64_t u)
{
	return (enum op)(u & 7u);
}

static inline void *
ud_ptr(uint64_t u)
{
	return (void *)(uintptr_t)(u & ~(uint64_t)7);
}

static inline struct sock_conn *
sock_of(struct conn *c)
{
	return (struct sock_conn *)(void *)((char *)c -
					    offsetof(struct sock_conn, conn));
}

/* A buffer the kernel filled comes back: onto the spare stack, from which
 * ring_fill() puts it back in the ring before the next submit. */
static void
buf_return(struct sock_loop *l, uint16_t bid)
{
	l->spare[l->nspare++] = bid;
	l->buffers_returned = true;
}

/*
 * Keep the ring at one buffer per connection in use plus BUF_RING_SLACK,
 * taking the most recently returned buffers first (warm in the cache and
 * already mapped), then pool buffers never used. A ring above its target
 * (connections gone) shrinks as the kernel takes from it. Called before
 * every submit (a connection may take several buffers in one iteration)
 * and before starved connections are re-armed.
 */
static void
ring_fill(struct sock_loop *l)
{
	unsigned target = l->in_use + BUF_RING_SLACK, n = 0;

	if (target > l->nbufs)
		target = l->nbufs;
	while (l->ring_avail + n < target) {
		unsigned bid;

		if (l->nspare)
			bid = l->spare[--l->nspare];
		else if (l->fresh < l->nbufs)
			bid = l->fresh++;
		else
			break;
		io_uring_buf_ring_add(l->br, l->bufs + (size_t)bid * BUF_SIZE,
				      BUF_SIZE, (unsigned short)bid,
				      io_uring_buf_ring_mask(l->nbufs),
				      (int)n);
		n++;
	}
	if (n) {
		io_uring_buf_ring_advance(l->br, (int)n);
		l->ring_avail += n;
		l->buffers_returned = true; /* for starved connections */
	}
}

static struct io_uring_sqe *
get_sqe(struct sock_loop *l)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&l->ring);

	if (!sqe) {
		/* SQ full: submit what is there and try again. */
		ring_fill(l);
		io_uring_submit(&l->ring);
		sqe = io_uring_get_sqe(&l->ring);
	}
	return sqe;
}

/* ---- connection bookkeeping ------------------------------------------ */

static void
conn_release_held(struct sock_conn *c)
{
	if (c->held) {
		buf_return(c->loop, c->held_bid);
		c->held = false;
	}
}

static void
conn_finalize(struct sock_conn *c)
{
	struct sock_loop *l = c->loop;

	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	/* Only now: a send in flight may point into TLS's buffers. */
	conn_release(&c->conn);
	if (c->starved) {
		c->starved = false;
		l->nstarved--;
	}
	c->in_use = false;
	c->free_next = l->free;
	l->free = c;
	l->in_use--;
}

static void
conn_arm_recv(struct sock_conn *c)
{
	struct sock_loop *l = c->loop;
	struct io_uring_sqe *sqe;

	if (c->closing || c->held || c->recv_armed || c->starved)
		return;
	sqe = get_sqe(l);
	if (!sqe) {
		/* Retried with the starved ones, next round. */
		c->starved = true;
		l->nstarved++;
		l->buffers_returned = true;
		return;
	}
	io_uring_prep_recv(sqe, c->fd, NULL, BUF_SIZE, 0);
	sqe->flags |= IOSQE_BUFFER_SELECT;
	sqe->buf_group = BUF_GROUP;
	io_uring_sqe_set_data64(sqe, ud(c, OP_RECV));
	c->recv_armed = true;
	c->inflight++;
}

/*
 * Offer the held buffer to the connection layer; what it did not take
 * stays held (it asks again: sock_resume). Once it took everything, the
 * buffer goes back and the next receive is armed.
 */
static void
conn_offer(struct sock_conn *c)
{
	struct sock_loop *l = c->loop;

	if (c->held) {
		const uint8_t *p = l->bufs + (size_t)c->held_bid * BUF_SIZE +
				   c->held_off;
		size_t used = conn_input(&c->conn, p, c->held_len);
		if (c->closing)
			return; /* sock_close() returned the buffer */
		c->held_off += (uint32_t)used;
		c->held_len -= (uint32_t)used;
		if (c->held_len)
			return;
		conn_release_held(c);
	}
	conn_arm_recv(c);
}

/* ---- the connection layer's operations (conn/conn.h) ------------------ */

static size_t
sock_send(struct conn *cn, const uint8_t *p, size_t n, bool final)
{
	struct sock_conn *c = sock_of(cn);
	struct io_uring_sqe *sqe;

	if (final) {
		ssize_t r = send(c->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
		return r > 0 ? (size_t)r : 0;
	}
	sqe = get_sqe(c->loop);
	if (!sqe)
		return 0; /* tried again when the connection next moves */
	io_uring_prep_send(sqe, c->fd, p, n, MSG_NOSIGNAL);
	io_uring_sqe_set_data64(sqe, ud(c, OP_SEND));
	c->send_armed = true;
	c->inflight++;
	return CONN_SEND_ARMED;
}

static void
sock_resume(struct conn *cn)
{
	conn_offer(sock_of(cn));
}

static int
sock_acked(struct conn *cn, uint64_t sent, uint64_t *acked)
{
	struct sock_conn *c = sock_of(cn);

	(void)sent;
	if (c->fd < 0)
		return -EBADF;
	return sock_bytes_acked(c->fd, acked);
}

/* The session ended: the slot goes when the last operation in flight has
 * completed. */
static void
sock_close(struct conn *cn, enum conn_close_how how, const char *why)
{
	struct sock_conn *c = sock_of(cn);

	(void)how; /* the kernel sends what it has, then FIN, either way */
	(void)why;
	if (c->closing)
		return;
	c->closing = true;
	conn_release_held(c);
	if (c->inflight == 0) {
		conn_finalize(c);
		return;
	}
	/* Wake a pending recv (it completes with 0 or an error). */
	shutdown(c->fd, SHUT_RDWR);
}

/* The sends armed so far go to the kernel now, before the sessions parse
 * their held input: one submission for all the 250s a group commit
 * released (conn_set_service()). */
static void
sock_push(struct conn_set *cs)
{
	struct sock_loop *l = (struct sock_loop *)(void *)((char *)cs -
						offsetof(struct sock_loop, cs));

	ring_fill(l);
	if (io_uring_sq_ready(&l->ring))
		io_uring_submit(&l->ring);
}

static const struct conn_ops sock_conn_ops = {
	.send = sock_send,
	.resume = sock_resume,
	.push = sock_push,
	.acked = sock_acked,
	.close = sock_close,
};

static void
on_accept(struct sock_loop *l, struct sock_listener *ls, int fd)
{
	struct sock_conn *c = l->free;
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char addr[INET6_ADDRSTRLEN] = "unknown";
	const char *reply;
	size_t len;
	int one = 1;

	(void)ls;
	if (getpeername(fd, (struct sockaddr *)&ss, &sl) == 0) {
		if (ss.ss_family == AF_INET) {
			inet_ntop(AF_INET,
				  &((struct sockaddr_in *)&ss)->sin_addr,
				  addr, sizeof(addr));
		} else if (ss.ss_family == AF_INET6) {
			struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
			if (IN6_IS_ADDR_V4MAPPED(&a6->sin6_addr))
				inet_ntop(AF_INET, &a6->sin6_addr.s6_addr[12],
					  addr, sizeof(addr));
			else
				inet_ntop(AF_INET6, &a6->sin6_addr, addr,
					  sizeof(addr));
		}
	}
	if (c) {
		struct sock_conn *next = c->free_next;
		memset(c, 0, sizeof(*c));
		c->free_next = next;
		c->fd = -1;
	}
	if (conn_open(&l->cs, c ? &c->conn : NULL, addr, &reply, &len) != 0) {
		/* Paused, busy or stopping: best effort on a fresh socket,
		 * the reply fits its send buffer. */
		if (send(fd, reply, len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
			fd_debug("sock", "event=refuse_send_failed errno=%d",
				 errno);
		close(fd);
		return;
	}
	l->free = c->free_next;
	c->loop = l;
	c->fd = fd;
	c->in_use = true;
	l->in_use++;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	conn_arm_recv(c);
}

static void
arm_accept(struct sock_loop *l, struct sock_listener *ls)
{
	struct io_uring_sqe *sqe = get_sqe(l);

	if (!sqe)
		return;
	io_uring_prep_multishot_accept(sqe, ls->fd, NULL, NULL, SOCK_CLOEXEC);
	io_uring_sqe_set_data64(sqe, ud(ls, OP_ACCEPT));
	ls->armed = true;
}

static void
arm_wake(struct sock_loop *l)
{
	struct io_uring_sqe *sqe = get_sqe(l);

	if (!sqe)
		return;
	io_uring_prep_read(sqe, l->w->wake_fd, &l->wake_val,
			   sizeof(l->wake_val), 0);
	io_uring_sqe_set_data64(sqe, ud(l, OP_WAKE));
	l->wake_armed = true;
}

/* The spool made room without a write completion (a spare segment is
 * ready): held sessions get their input offered again (conn_set_room). */
static void
arm_spool_wake(struct sock_loop *l)
{
	struct io_uring_sqe *sqe = get_sqe(l);

	if (!sqe)
		return;
	io_uring_prep_read(sqe, spool_wake_fd(l->w->spool), &l->spool_wake_val,
			   sizeof(l->spool_wake_val), 0);
	io_uring_sqe_set_data64(sqe, ud(l, OP_SPOOL));
}

/* Shutdown (conn/conn.h has the bounds): no new connections, every session
 * told. */
static void
begin_stop(struct sock_loop *l)
{
	if (conn_set_stopping(&l->cs))
		return;
	conn_set_begin_stop(&l->cs);
	for (unsigned i = 0; i < l->nlisteners; i++) {
		/* Stop taking connections: the multishot accept ends. */
		shutdown(l->listeners[i].fd, SHUT_RD);
	}
}

static void
on_recv(struct sock_loop *l, struct sock_conn *c,
	const struct io_uring_cqe *cqe)
{
	bool has_buf = cqe->flags & IORING_CQE_F_BUFFER;
	uint16_t bid = (uint16_t)(cqe->flags >> IORING_CQE_BUFFER_SHIFT);

	/* A buffer reported is a buffer taken from the ring, whatever the
	 * result: one not kept goes back, or the ring would shrink. */
	if (has_buf)
		l->ring_avail--;
	if (has_buf && (cqe->res <= 0 || c->closing))
		buf_return(l, bid);
	if (cqe->res > 0 && has_buf) {
		if (c->closing)
			return;
		c->held = true;
		c->held_bid = bid;
		c->held_off = 0;
		c->held_len = (uint32_t)cqe->res;
		conn_offer(c);
	} else if (c->closing) {
		return;
	} else if (cqe->res == -ENOBUFS) {
		if (!c->starved)
			l->nstarved++;
		c->starved = true; /* re-armed when a buffer returns */
	} else if (cqe->res == -EINTR) {
		conn_arm_recv(c);
	} else {
		conn_eof(&c->conn); /* 0, or an error: the peer is gone */
	}
}

static void
on_cqe(struct sock_loop *l, const struct io_uring_cqe *cqe)
{
	uint64_t u = io_uring_cqe_get_data64(cqe);
	struct sock_conn *c = NULL;

	if (spool_owns_cqe(cqe)) {
		spool_handle_cqe(l->w->spool, cqe);
		l->spool_progress = true;
		return;
	}
	switch (ud_op(u)) {
	case OP_RECV:
		c = ud_ptr(u);
		c->inflight--;
		c->recv_armed = false;
		on_recv(l, c, cqe);
		break;
	case OP_SEND:
		c = ud_ptr(u);
		c->inflight--;
		c->send_armed = false;
		if (!c->closing)
			conn_send_done(&c->conn, cqe->res);
		break;
	case OP_ACCEPT: {
		struct sock_listener *ls = ud_ptr(u);
		if (!(cqe->flags & IORING_CQE_F_MORE))
			ls->armed = false;
		if (cqe->res >= 0) {
			on_accept(l, ls, cqe->res);
		} else if (cqe->res != -EINVAL && cqe->res != -ECANCELED &&
			   !conn_set_stopping(&l->cs)) {
			/* One line a second at most, with the count. */
			l->accept_errors++;
			if (l->cs.now_us >= l->next_accept_log_us) {
				l->next_accept_log_us = l->cs.now_us + 1000000;
				fd_log(FD_LOG_WARN, "sock",
				       "worker=%u event=accept_error "
				       "error=\"%s\" count=%" PRIu64,
				       l->w->id, strerror(-cqe->res),
				       l->accept_errors);
			}
		}
		return;
	}
	case OP_WAKE:
		l->wake_armed = false;
		if (atomic_load(&l->w->stop))
			begin_stop(l);
		else
			arm_wake(l);
		return;
	case OP_SPOOL:
		l->spool_progress = true;
		if (cqe->res >= 0 || cqe->res == -EAGAIN || cqe->res == -EINTR)
			arm_spool_wake(l);
		return;
	case OP_NONE:
	case OP_IGNORE:
		return;
	}
	/* A closed connection's slot goes with its last operation. */
	if (c && c->closing && c->in_use && c->inflight == 0)
		conn_finalize(c);
}

static void
run_timers(struct sock_loop *l)
{
	/* A multishot accept the kernel ended (an error such as EMFILE, or
	 * a CQE without F_MORE for any reason) is armed again here, at most
	 * once per tick, so a lasting error cannot spin the loop. */
	if (!conn_set_stopping(&l->cs) &&
	    l->cs.now_us >= l->next_accept_rearm_us) {
		l->next_accept_rearm_us = l->cs.now_us + TICK_US;
		for (unsigned i = 0; i < l->nlisteners; i++)
			if (!l->listeners[i].armed)
				arm_accept(l, &l->listeners[i]);
	}
	/* Greeting delay, idle timeout, handshake deadlines, the force
	 * point of a shutdown. */
	conn_set_tick(&l->cs);
}

static void
service(struct sock_loop *l)
{
	/* Connections starved of receive buffers try again once some came
	 * back. */
	ring_fill(l);
	if (l->buffers_returned && l->nstarved) {
		for (unsigned i = 0; i < l->nconns; i++) {
			struct sock_conn *c = &l->conns[i];
			if (c->in_use && c->starved) {
				c->starved = false;
				l->nstarved--;
				conn_arm_recv(c);
			}
		}
	}
	l->buffers_returned = false;
	/* Sessions blocked on spool room are offered their input again
	 * after a round that saw spool completions (a buffer may have come
	 * free) or the spool's wake eventfd (OP_SPOOL). */
	if (l->spool_progress) {
		l->spool_progress = false;
		conn_set_room(&l->cs);
	}
	conn_set_service(&l->cs);
}

/*
 * One owner per port (issue 10). The workers share each address through a
 * SO_REUSEPORT group, and the kernel lets any socket of the same user join
 * such a group at any time: a second finaldot (or any program) started on
 * our port would silently take part of our connections. So the first
 * worker to get here makes every worker's listener, per address:
 *  1. it binds an abstract unix socket named after the address
 *     ("@finaldot-listen 127.0.0.1:25") and keeps it open for the life of the
 *     process. The name is unique per network namespace (as ports are),
 *     taken atomically and released when the process ends, kill -9
 *     included: of two finaldots started together exactly one gets it, and
 *     the other says "another finaldot listens on this address";
 *  2. it binds the first listener WITHOUT SO_REUSEPORT: that fails
 *     (EADDRINUSE) if anything is bound there already, with or without
 *     SO_REUSEPORT: another program, or a finaldot on an overlapping
 *     address (0.0.0.0:25 against 127.0.0.1:25). Only then does it set
 *     SO_REUSEPORT on it and listen, which makes the group with this
 *     socket first;
 *  3. it attaches a classic BPF program to the group that picks the
 *     listener for a new connection among the first `threads` members by a
 *     hash of the client's address and port: ours, bound next, one per
 *     worker. A socket that joins later (same user, SO_REUSEPORT) is never
 *     picked: it gets no connection.
 *  4. once all are bound it reads the kernel's list of listening sockets
 *     (owner.c): a program of our user that joined with SO_REUSEPORT in
 *     the microseconds between our own binds took one of the first
 *     `threads` slots (a share of the connections); then the start fails
 *     and says so. One that joins after this check is never picked (3).
 */
static pthread_mutex_t claim_mu = PTHREAD_MUTEX_INITIALIZER;
static bool claim_done;
static int claim_err;
static int claim_fds[FD_CONFIG_MAX_LISTEN];
static int *listen_fds; /* [address * threads + worker]; -1 once taken */

/*
 * The group's choice (SO_ATTACH_REUSEPORT_CBPF: the program's return is the
 * member's index; one at or above the group's size would let the kernel
 * choose among all members). It reads the headers relative to the network
 * header (SKF_NET_OFF): source port and the last 32 bits of the source
 * address, mixed, modulo n.
 */
static int
attach_choice(int fd, unsigned n)
{
	struct sock_filter code[] = {
		/* 0: A = IP version */
		BPF_STMT(BPF_LD | BPF_B | BPF_ABS, (uint32_t)SKF_NET_OFF + 0),
		BPF_STMT(BPF_ALU | BPF_RSH | BPF_K, 4),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 6, 0, 4),
		/* 3: IPv6: X = source port (after the 40-octet header),
		 * A = the source address's last word */
		BPF_STMT(BPF_LD | BPF_H | BPF_ABS, (uint32_t)SKF_NET_OFF + 40),
		BPF_STMT(BPF_MISC | BPF_TAX, 0),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, (uint32_t)SKF_NET_OFF + 20),
		BPF_JUMP(BPF_JMP | BPF_JA, 7, 0, 0),
		/* 7: IPv4: X = IHL * 4, then X = source port, A = address */
		BPF_STMT(BPF_LD | BPF_B | BPF_ABS, (uint32_t)SKF_NET_OFF + 0),
		BPF_STMT(BPF_ALU | BPF_AND | BPF_K, 0xf),
		BPF_STMT(BPF_ALU | BPF_LSH | BPF_K, 2),
		BPF_STMT(BPF_MISC | BPF_TAX, 0),
		BPF_STMT(BPF_LD | BPF_H | BPF_IND, (uint32_t)SKF_NET_OFF + 0),
		BPF_STMT(BPF_MISC | BPF_TAX, 0),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, (uint32_t)SKF_NET_OFF + 12),
		/* 14: mix, keep the well-mixed high half, modulo n */
		BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),
		BPF_STMT(BPF_ALU | BPF_MUL | BPF_K, 0x9e3779b1u),
		BPF_STMT(BPF_ALU | BPF_RSH | BPF_K, 16),
		BPF_STMT(BPF_ALU | BPF_MOD | BPF_K, n),
		BPF_STMT(BPF_RET | BPF_A, 0),
	};
	struct sock_fprog prog = {
		.len = (unsigned short)(sizeof(code) / sizeof(code[0])),
		.filter = code,
	};

	if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog,
		       sizeof(prog)) != 0)
		return -errno;
	return 0;
}

/* A listener for li; first: bound without SO_REUSEPORT (see above). */
static int
open_listener(const struct fd_listen *li, bool first)
{
	int one = 1, r = 0;
	int fd = socket(li->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -errno;
	/* SO_REUSEADDR: a port whose last connections sit in TIME_WAIT is
	 * free for a listener. */
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (li->addr.ss_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (!first)
		setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (bind(fd, (const struct sockaddr *)&li->addr, li->addrlen) != 0)
		r = -errno;
	if (!r && first &&
	    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)
		r = -errno;
	if (!r && listen(fd, 4096) != 0)
		r = -errno;
	if (r) {
		close(fd);
		return r;
	}
	return fd;
}

/*
 * The test seam (a test build only: -Dfault_injection=true):
 * FINALDOT_SOCK_FAULT=join-between-binds makes this process itself join
 * the group after the first bind, as another program of our user could in
 * that window; the socket is left open, a stranger to the check below.
 */
static void
join_between_binds(const struct fd_listen *li)
{
#ifdef FINALDOT_FAULT_INJECTION
	int one = 1, fd;

	if (!fd_seam("FINALDOT_SOCK_FAULT", "join-between-binds"))
		return;
	fd = socket(li->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return;
	setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (li->addr.ss_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (bind(fd, (const struct sockaddr *)&li->addr, li->addrlen) != 0 ||
	    listen(fd, 8) != 0)
		close(fd);
#else
	(void)li;
#endif
}

/* Step 4 above: every listener on li's address is one of fds[0..n). Not
 * being able to read the list is said, not fatal (no /proc: the filter of
 * step 3 still keeps later joiners out). */
static int
check_owned(const struct fd_listen *li, int *fds, unsigned n)
{
	unsigned long inode;
	int r = sock_listen_strangers(&li->addr, fds, n, &inode);

	if (r < 0) {
		fd_log(FD_LOG_WARN, "sock",
		       "event=listen_owner_unchecked addr=%s error=\"%s\"",
		       li->text, strerror(-r));
		return 0;
	}
	if (r == 0)
		return 0;
	fd_log(FD_LOG_ERR, "sock",
	       "event=listen_failed addr=%s error=\"another process joined "
	       "this address's SO_REUSEPORT group while finaldot was binding "
	       "it\" strangers=%d socket_inode=%lu", li->text, r, inode);
	for (unsigned k = 0; k < n; k++) {
		close(fds[k]);
		fds[k] = -1;
	}
	return -EADDRINUSE;
}

static int
claim_one(const struct fd_listen *li, int *lock_fd, int *fds, unsigned n)
{
	struct sockaddr_un un;
	char host[INET6_ADDRSTRLEN] = "?";
	unsigned port = 0;
	socklen_t ulen;
	int r = 0;

	if (li->addr.ss_family == AF_INET) {
		const struct sockaddr_in *a = (const void *)&li->addr;
		inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
		port = ntohs(a->sin_port);
	} else if (li->addr.ss_family == AF_INET6) {
		const struct sockaddr_in6 *a = (const void *)&li->addr;
		inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
		port = ntohs(a->sin6_port);
	}
	memset(&un, 0, sizeof(un));
	un.sun_family = AF_UNIX;
	/* sun_path[0] = 0: the abstract namespace (no file). */
	int len = snprintf(un.sun_path + 1, sizeof(un.sun_path) - 1,
			   "finaldot-listen %s%s%s:%u",
			   li->addr.ss_family == AF_INET6 ? "[" : "", host,
			   li->addr.ss_family == AF_INET6 ? "]" : "", port);
	ulen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 +
			   (size_t)len);
	*lock_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (*lock_fd < 0)
		return -errno;
	if (bind(*lock_fd, (const struct sockaddr *)&un, ulen) != 0) {
		r = -errno;
		fd_log(FD_LOG_ERR, "sock",
		       "event=listen_failed addr=%s error=\"%s\"", li->text,
		       r == -EADDRINUSE
			       ? "another finaldot listens on this address"
			       : strerror(-r));
		close(*lock_fd);
		*lock_fd = -1;
		return r;
	}
	for (unsigned k = 0; k < n; k++) {
		fds[k] = open_listener(li, k == 0);
		if (fds[k] < 0) {
			r = fds[k];
			fd_log(FD_LOG_ERR, "sock",
			       "event=listen_failed addr=%s error=\"%s\"",
			       li->text,
			       r == -EADDRINUSE && k == 0
				       ? "address in use by another process"
				       : strerror(-r));
			while (k--) {
				close(fds[k]);
				fds[k] = -1;
			}
			return r;
		}
		if (k == 0 && (r = attach_choice(fds[0], n)) != 0)
			/* Connections still reach us; a later joiner of our
			 * user could take a share: said, not fatal. */
			fd_log(FD_LOG_WARN, "sock",
			       "event=reuseport_filter_failed addr=%s "
			       "error=\"%s\"", li->text, strerror(-r));
		if (k == 0)
			join_between_binds(li);
	}
	return check_owned(li, fds, n);
}

/* Every address claimed, with one listener per worker; the first caller
 * does it, the others share its verdict. */
static int
claim_ports(const struct fd_config *cfg)
{
	int r;

	pthread_mutex_lock(&claim_mu);
	if (!claim_done) {
		claim_done = true;
		listen_fds = malloc((size_t)cfg->n_listen * cfg->threads *
				    sizeof(*listen_fds));
		if (!listen_fds && cfg->n_listen)
			claim_err = -ENOMEM;
		for (size_t k = 0; listen_fds &&
				   k < (size_t)cfg->n_listen * cfg->threads;
		     k++)
			listen_fds[k] = -1;
		for (unsigned i = 0; i < cfg->n_listen && claim_err == 0; i++)
			claim_err = claim_one(&cfg->listen[i], &claim_fds[i],
					      listen_fds + i * cfg->threads,
					      cfg->threads);
	}
	r = claim_err;
	pthread_mutex_unlock(&claim_mu);
	return r;
}

/* Worker `id`'s listener for address i (made by claim_ports()); it is the
 * worker's from now on. */
static int
take_listener(const struct fd_config *cfg, unsigned i, unsigned id)
{
	int fd;

	pthread_mutex_lock(&claim_mu);
	fd = listen_fds[i * cfg->threads + id];
	listen_fds[i * cfg->threads + id] = -1;
	pthread_mutex_unlock(&claim_mu);
	return fd;
}

/* A worker that ends before it took its listeners closes them: left in
 * the group they would be picked for connections nobody accepts. */
static void
drop_listeners(const struct fd_config *cfg, unsigned id)
{
	if (!listen_fds)
		return;
	for (unsigned i = 0; i < cfg->n_listen; i++) {
		int fd = take_listener(cfg, i, id);
		if (fd >= 0)
			close(fd);
	}
}

/*
 * io_uring's rings and registered buffers count against RLIMIT_MEMLOCK
 * for a process without CAP_IPC_LOCK, and the kernel says only ENOMEM:
 * a container's or a login's default limit (64 KiB here and there) stops
 * the start with nothing to go on. The log line names the limit.
 */
static void
log_ring_failed(unsigned worker, const char *event, int err)
{
	struct rlimit rl;

	if (err == -ENOMEM && getrlimit(RLIMIT_MEMLOCK, &rl) == 0 &&
	    rl.rlim_cur != RLIM_INFINITY)
		fd_log(FD_LOG_ERR, "sock", "worker=%u event=%s error=\"%s\" "
		       "memlock_kib=%llu note=\"io_uring counts its rings "
		       "against RLIMIT_MEMLOCK: raise it (LimitMEMLOCK=, "
		       "ulimit -l, docker --ulimit memlock=)\"",
		       worker, event, strerror(-err),
		       (unsigned long long)rl.rlim_cur / 1024);
	else
		fd_log(FD_LOG_ERR, "sock", "worker=%u event=%s error=\"%s\"",
		       worker, event, strerror(-err));
}

static int
loop_init(struct sock_loop *l, struct fd_worker *w)
{
	struct io_uring_params p;
	struct io_uring_buf_reg reg;
	int r;

	memset(l, 0, sizeof(*l));
	l->w = w;
	conn_set_init(&l->cs, w, &sock_conn_ops, fd_now_monotonic_us());
	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN |
		  IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
	r = io_uring_queue_init_params(RING_ENTRIES, &l->ring, &p);
	if (r == -EINVAL) {
		memset(&p, 0, sizeof(p));
		r = io_uring_queue_init_params(RING_ENTRIES, &l->ring, &p);
	}
	if (r < 0) {
		log_ring_failed(w->id, "io_uring_failed", r);
		return r;
	}

	/* Receive buffers: enough for every connection to hold one while
	 * the rest keep flowing, a power of two as the ring requires. */
	l->nbufs = 256;
	while (l->nbufs < w->cfg->max_connections + 64 && l->nbufs < 32768)
		l->nbufs <<= 1;
	l->br_bytes = l->nbufs * sizeof(struct io_uring_buf);
	l->br = mmap(NULL, l->br_bytes, PROT_READ | PROT_WRITE,
		     MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
	/* Address space for the whole pool; pages are touched only as
	 * ring_fill() first hands a buffer out. */
	l->bufs = mmap(NULL, (size_t)l->nbufs * BUF_SIZE,
		       PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE,
		       -1, 0);
	l->spare = calloc(l->nbufs, sizeof(*l->spare));
	if (l->br == MAP_FAILED || l->bufs == MAP_FAILED || !l->spare) {
		r = -ENOMEM;
		goto out_unmap;
	}
	memset(&reg, 0, sizeof(reg));
	reg.ring_addr = (unsigned long)l->br;
	reg.ring_entries = l->nbufs;
	reg.bgid = BUF_GROUP;
	r = io_uring_register_buf_ring(&l->ring, &reg, 0);
	if (r < 0) {
		log_ring_failed(w->id, "buf_ring_failed", r);
		goto out_unmap;
	}
	io_uring_buf_ring_init(l->br);
	ring_fill(l);

	l->nconns = w->cfg->max_connections;
	l->conns = aligned_alloc(64, sizeof(*l->conns) * l->nconns);
	if (!l->conns) {
		r = -ENOMEM;
		goto out_unmap;
	}
	memset(l->conns, 0, sizeof(*l->conns) * l->nconns);
	for (unsigned i = l->nconns; i-- > 0;) {
		l->conns[i].fd = -1;
		l->conns[i].free_next = l->free;
		l->free = &l->conns[i];
	}
	return 0;

out_unmap:
	free(l->spare);
	if (l->br != MAP_FAILED && l->br)
		munmap(l->br, l->br_bytes);
	if (l->bufs != MAP_FAILED && l->bufs)
		munmap(l->bufs, (size_t)l->nbufs * BUF_SIZE);
	io_uring_queue_exit(&l->ring);
	return r;
}

static void
loop_fini(struct sock_loop *l)
{
	for (unsigned i = 0; i < l->nlisteners; i++)
		close(l->listeners[i].fd);
	for (unsigned i = 0; i < l->nconns; i++)
		if (l->conns[i].in_use && l->conns[i].fd >= 0)
			close(l->conns[i].fd);
	free(l->conns);
	io_uring_queue_exit(&l->ring);
	munmap(l->br, l->br_bytes);
	munmap(l->bufs, (size_t)l->nbufs * BUF_SIZE);
	free(l->spare);
}

int
sock_worker_run(struct fd_worker *w)
{
	struct sock_loop *l = aligned_alloc(64, sizeof(*l));
	int r;

	if (!l)
		return w->exit_status = -ENOMEM;
	if ((r = claim_ports(w->cfg)) < 0)
		goto out_free;
	if ((r = loop_init(l, w)) < 0)
		goto out_free;
	if ((r = fd_worker_start(w, &l->ring, conn_wake)) < 0)
		goto out_fini;
	for (unsigned i = 0; i < w->cfg->n_listen; i++) {
		int fd = take_listener(w->cfg, i, w->id);
		if (fd < 0) {
			r = -EBADF;
			fd_log(FD_LOG_ERR, "sock",
			       "worker=%u event=listen_failed addr=%s "
			       "error=\"no listener for this worker\"",
			       w->id, w->cfg->listen[i].text);
			goto out_worker;
		}
		l->listeners[i] = (struct sock_listener){
			.loop = l, .fd = fd, .idx = i};
		l->nlisteners++;
		arm_accept(l, &l->listeners[i]);
	}
	arm_wake(l);
	arm_spool_wake(l);
	atomic_store(&w->ready, true);

	conn_set_clock(&l->cs, fd_now_monotonic_us());
	/* Until every session and every operation in flight is done, or the
	 * shutdown deadline. */
	while (!conn_set_done(&l->cs, l->in_use == 0)) {
		struct io_uring_cqe *cqe;
		struct __kernel_timespec ts = {.tv_sec = 0,
					       .tv_nsec = TICK_US * 1000};
		unsigned head, seen = 0;

		if (l->cs.greet_ms && l->cs.greet_ms < 100)
			ts.tv_nsec = (long long)l->cs.greet_ms *
				     250000; /* a quarter of the delay */
		ring_fill(l);
		r = io_uring_submit_and_wait_timeout(&l->ring, &cqe, 1, &ts,
						     NULL);
		if (r < 0 && r != -ETIME && r != -EINTR && r != -EBUSY) {
			fd_log(FD_LOG_ERR, "sock", "worker=%u event=wait_failed "
			       "error=\"%s\"", w->id, strerror(-r));
			break;
		}
		conn_set_clock(&l->cs, fd_now_monotonic_us());
		/* Handle everything ready; new CQEs may arrive while we do,
		 * and are taken in the same iteration. */
		do {
			seen = 0;
			io_uring_for_each_cqe(&l->ring, head, cqe)
			{
				on_cqe(l, cqe);
				seen++;
			}
			io_uring_cq_advance(&l->ring, seen);
			service(l);
		} while (seen);
		run_timers(l);
		service(l);
		w->conns_current = l->in_use;
		fd_worker_poll(w);
		/* Idle: close the batch being filled (natural batching). */
		spool_flush(w->spool);
		/* A verdict the flush produced (a commit that could not get a
		 * segment) goes out now, not after the next wait. */
		if (conn_set_pending(&l->cs))
			service(l);
		if (atomic_load(&w->stop))
			begin_stop(l);
		/* The force point, as soon as it is reached. */
		if (conn_set_stopping(&l->cs))
			conn_set_tick(&l->cs);
	}
	r = 0;
	conn_set_close_all(&l->cs);
out_worker:
	/* Drain: every batch with a commit in it is written and completes,
	 * and its callbacks run; but not past the shutdown deadline (the
	 * sessions were answered 421: a write that never ends must not keep
	 * the daemon; spool_destroy() logs what was left). */
	while (w->spool && (spool_flush(w->spool), spool_inflight(w->spool))) {
		struct io_uring_cqe *cqe;
		struct __kernel_timespec ts = {.tv_nsec = TICK_US * 1000};
		unsigned head, seen = 0;
		conn_set_clock(&l->cs, fd_now_monotonic_us());
		if (conn_set_past_deadline(&l->cs))
			break;
		io_uring_submit_and_wait_timeout(&l->ring, &cqe, 1, &ts, NULL);
		io_uring_for_each_cqe(&l->ring, head, cqe)
		{
			if (spool_owns_cqe(cqe))
				spool_handle_cqe(w->spool, cqe);
			seen++;
		}
		io_uring_cq_advance(&l->ring, seen);
	}
	fd_worker_finish(w);
out_fini:
	loop_fini(l);
out_free:
	drop_listeners(w->cfg, w->id);
	free(l);
	return w->exit_status = r;
}
