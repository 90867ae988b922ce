/*
 * sock_listen_strangers(): the check that every listener on an address is
 * one of ours, which keeps a program that joins a worker group's
 * SO_REUSEPORT group during finaldot's binds from sharing its port.
 * Loopback only.
 */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sock/owner.h"

static int
bound(int family, const char *host, unsigned port, bool reuseport,
      bool do_listen, struct sockaddr_storage *out)
{
	struct sockaddr_storage ss;
	socklen_t len;
	int one = 1;
	int fd = socket(family, SOCK_STREAM, 0);

	if (fd < 0)
		return -errno; /* no such family here (IPv6 disabled) */
	memset(&ss, 0, sizeof(ss));
	if (family == AF_INET) {
		struct sockaddr_in *a = (void *)&ss;
		a->sin_family = AF_INET;
		a->sin_port = htons((uint16_t)port);
		inet_pton(AF_INET, host, &a->sin_addr);
		len = sizeof(*a);
	} else {
		struct sockaddr_in6 *a = (void *)&ss;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons((uint16_t)port);
		inet_pton(AF_INET6, host, &a->sin6_addr);
		len = sizeof(*a);
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	}
	if (reuseport)
		setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&ss, len) != 0) {
		close(fd);
		return -errno;
	}
	if (do_listen)
		cr_assert(listen(fd, 8) == 0);
	if (out) {
		len = sizeof(*out);
		cr_assert(getsockname(fd, (struct sockaddr *)out, &len) == 0);
	}
	return fd;
}

static unsigned
port_of(const struct sockaddr_storage *ss)
{
	return ss->ss_family == AF_INET
		       ? ntohs(((const struct sockaddr_in *)ss)->sin_port)
		       : ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
}

static unsigned long
inode_of(int fd)
{
	struct stat sb;

	cr_assert(fstat(fd, &sb) == 0);
	return (unsigned long)sb.st_ino;
}

Test(owner, our_group_alone_has_no_stranger)
{
	struct sockaddr_storage a;
	unsigned long ino = 99;
	int fds[3];

	fds[0] = bound(AF_INET, "127.0.0.1", 0, true, true, &a);
	cr_assert(fds[0] >= 0);
	fds[1] = bound(AF_INET, "127.0.0.1", port_of(&a), true, true, NULL);
	fds[2] = bound(AF_INET, "127.0.0.1", port_of(&a), true, true, NULL);
	cr_assert(fds[1] >= 0 && fds[2] >= 0);
	cr_expect_eq(sock_listen_strangers(&a, fds, 3, &ino), 0);
	cr_expect_eq(ino, 0);
	/* Leaving one of ours out of the list makes it a stranger. */
	cr_expect_eq(sock_listen_strangers(&a, fds, 2, &ino), 1);
	cr_expect_eq(ino, inode_of(fds[2]));
	for (int k = 0; k < 3; k++)
		close(fds[k]);
}

Test(owner, a_joiner_of_the_group_is_a_stranger)
{
	struct sockaddr_storage a;
	unsigned long ino = 0;
	int fds[2], joiner;

	fds[0] = bound(AF_INET, "127.0.0.1", 0, true, true, &a);
	cr_assert(fds[0] >= 0);
	joiner = bound(AF_INET, "127.0.0.1", port_of(&a), true, true, NULL);
	fds[1] = bound(AF_INET, "127.0.0.1", port_of(&a), true, true, NULL);
	cr_assert(joiner >= 0 && fds[1] >= 0,
		  "the kernel refused the group (SO_REUSEPORT, same user)");
	cr_expect_eq(sock_listen_strangers(&a, fds, 2, &ino), 1);
	cr_expect_eq(ino, inode_of(joiner));
	close(joiner);
	cr_expect_eq(sock_listen_strangers(&a, fds, 2, &ino), 0);
	close(fds[0]);
	close(fds[1]);
}

Test(owner, only_listeners_on_exactly_this_address_count)
{
	struct sockaddr_storage a;
	unsigned long ino = 0;
	int fd, other, quiet, peer, acc;

	fd = bound(AF_INET, "127.0.0.1", 0, true, true, &a);
	cr_assert(fd >= 0);
	/* The same port on another address: its own group. */
	other = bound(AF_INET, "127.0.0.2", port_of(&a), true, true, NULL);
	cr_assert(other >= 0);
	/* Bound but not listening: not in any group yet. */
	quiet = bound(AF_INET, "127.0.0.1", port_of(&a), true, false, NULL);
	cr_assert(quiet >= 0);
	/* A connection accepted on our port: ESTABLISHED, not LISTEN. */
	peer = socket(AF_INET, SOCK_STREAM, 0);
	cr_assert(connect(peer, (struct sockaddr *)&a,
			  sizeof(struct sockaddr_in)) == 0);
	acc = accept(fd, NULL, NULL);
	cr_assert(acc >= 0);
	cr_expect_eq(sock_listen_strangers(&a, &fd, 1, &ino), 0);
	cr_expect_eq(ino, 0);
	close(acc);
	close(peer);
	close(quiet);
	close(other);
	close(fd);
}

Test(owner, ipv6_addresses_are_compared_whole)
{
	struct sockaddr_storage a;
	unsigned long ino = 0;
	int fd, joiner;

	fd = bound(AF_INET6, "::1", 0, true, true, &a);
	if (fd < 0)
		cr_skip_test("no IPv6 loopback here (%s)", strerror(-fd));
	joiner = bound(AF_INET6, "::1", port_of(&a), true, true, NULL);
	cr_assert(joiner >= 0);
	cr_expect_eq(sock_listen_strangers(&a, &fd, 1, &ino), 1);
	cr_expect_eq(ino, inode_of(joiner));
	close(joiner);
	cr_expect_eq(sock_listen_strangers(&a, &fd, 1, &ino), 0);
	close(fd);
}

Test(owner, an_address_family_it_cannot_read_is_an_error)
{
	struct sockaddr_storage a;
	unsigned long ino = 5;
	int fd = -1;

	memset(&a, 0, sizeof(a));
	a.ss_family = AF_UNIX;
	cr_expect_eq(sock_listen_strangers(&a, &fd, 0, &ino), -EAFNOSUPPORT);
	cr_expect_eq(ino, 0);
}
