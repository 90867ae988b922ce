/* Config: defaults, flags, file, precedence, errors, --help coverage. */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "finaldot/config.h"

static struct fd_config c;
static char errbuf[4096];
static FILE *err;

static void
setup(void)
{
	fd_config_defaults(&c);
	err = fmemopen(errbuf, sizeof(errbuf), "w");
	memset(errbuf, 0, sizeof(errbuf));
}

static void
teardown(void)
{
	fclose(err);
}

TestSuite(config, .init = setup, .fini = teardown);

static int
parse(int argc, char **argv)
{
	int r = fd_config_parse_args(&c, argc, argv, err);
	fflush(err);
	return r;
}

Test(config, embedded_defaults_serve_a_first_run)
{
	char *argv[] = {"finaldot"};
	cr_assert_eq(parse(1, argv), 0);
	cr_assert_eq(c.n_listen, 1);
	cr_assert_str_eq(c.listen[0].text, "127.0.0.1:2525");
	cr_assert_str_eq(c.spool_dir, "./var/spool");
	cr_assert_eq(c.n_domains, 1);
	cr_assert_str_eq(c.domains[0], "localhost");
	cr_assert_eq(c.idle_timeout_ms, 300000);
	cr_assert_eq(c.max_message_size, 32u << 20);
	cr_assert_eq(c.transport, FD_TRANSPORT_KERNEL);
}

Test(config, repeatable_flags_and_suffixes)
{
	char *argv[] = {"finaldot", "--listen", "127.0.0.2:25",
			"--listen=[::1]:26", "--accept-domain", "a.test",
			"--accept-domain", "b.test", "--max-message-size", "10M",
			"--idle-timeout", "90s", "--greet-delay", "250ms",
			"--threads", "3"};
	cr_assert_eq(parse(sizeof(argv) / sizeof(argv[0]), argv), 0, "%s",
		     errbuf);
	cr_assert_eq(c.n_listen, 2);
	cr_assert_eq(c.listen[1].addr.ss_family, AF_INET6);
	cr_assert_eq(c.n_domains, 2);
	cr_assert_str_eq(c.domains[1], "b.test");
	cr_assert_eq(c.max_message_size, 10u << 20);
	cr_assert_eq(c.idle_timeout_ms, 90000);
	cr_assert_eq(c.greet_delay_ms, 250);
	cr_assert_eq(c.threads, 3);
}

Test(config, listen_forms)
{
	struct fd_listen l;
	cr_assert_eq(fd_config_parse_listen(":25", &l), 0);
	cr_assert_eq(((struct sockaddr_in *)&l.addr)->sin_addr.s_addr,
		     htonl(INADDR_ANY));
	cr_assert_eq(fd_config_parse_listen("[::]:2525", &l), 0);
	cr_assert_eq(ntohs(((struct sockaddr_in6 *)&l.addr)->sin6_port), 2525);
	cr_assert_neq(fd_config_parse_listen("127.0.0.1", &l), 0);
	cr_assert_neq(fd_config_parse_listen("127.0.0.1:0", &l), 0);
	cr_assert_neq(fd_config_parse_listen("127.0.0.1:65536", &l), 0);
	cr_assert_neq(fd_config_parse_listen("::1:25", &l), 0);
	cr_assert_neq(fd_config_parse_listen("[::1]25", &l), 0);
	cr_assert_neq(fd_config_parse_listen("host.example:25", &l), 0);
}

Test(config, file_then_flags_override)
{
	char path[] = "/tmp/fdconfXXXXXX";
	int fd = mkstemp(path);
	FILE *f = fdopen(fd, "w");
	fprintf(f, "# comment\n\nlisten = 127.0.0.9:2600\n"
		   "accept_domain = file.test   # trailing comment\n"
		   "spool = \"/tmp/from file\"\nmax_recipients = 7\n");
	fclose(f);
	char *argv[] = {"finaldot", "--max-recipients", "9", "--config", path};
	cr_assert_eq(parse(5, argv), 0, "%s", errbuf);
	cr_assert_str_eq(c.listen[0].text, "127.0.0.9:2600");
	cr_assert_str_eq(c.domains[0], "file.test");
	cr_assert_str_eq(c.spool_dir, "/tmp/from file");
	cr_assert_eq(c.max_recipients, 9, "the flag wins over the file");
	unlink(path);
}

Test(config, flag_lists_replace_file_lists)
{
	char path[] = "/tmp/fdconfXXXXXX";
	int fd = mkstemp(path);
	FILE *f = fdopen(fd, "w");
	fprintf(f, "accept_domain = a.test\naccept_domain = b.test\n");
	fclose(f);
	char *argv[] = {"finaldot", "--config", path, "--accept-domain",
			"c.test"};
	cr_assert_eq(parse(5, argv), 0, "%s", errbuf);
	cr_assert_eq(c.n_domains, 1);
	cr_assert_str_eq(c.domains[0], "c.test");
	unlink(path);
}

Test(config, file_errors_name_the_line)
{
	char path[] = "/tmp/fdconfXXXXXX";
	int fd = mkstemp(path);
	FILE *f = fdopen(fd, "w");
	fprintf(f, "threads = 2\nbogus_key = 1\n");
	fclose(f);
	char *argv[] = {"finaldot", "--config", path};
	cr_assert_neq(parse(3, argv), 0);
	cr_assert(strstr(errbuf, ":2: unknown setting \"bogus_key\""), "%s",
		  errbuf);
	unlink(path);
}

/*
 * A setting with named choices: def by default, each of good taken as
 * given (field: where c keeps it), bad refused with an error naming the
 * choices (msg).
 */
static void
check_choices(const char *flag, const char *field, const char *def,
	      const char *const good[2], const char *bad, const char *msg)
{
	char *a0[] = {"finaldot"};
	cr_assert_eq(parse(1, a0), 0);
	cr_assert_str_eq(field, def);
	for (unsigned i = 0; i < 2; i++) {
		setup();
		char *a[] = {"finaldot", (char *)flag, (char *)good[i]};
		cr_assert_eq(parse(3, a), 0, "%s", errbuf);
		cr_assert_str_eq(field, good[i]);
	}
	setup();
	char *a3[] = {"finaldot", (char *)flag, (char *)bad};
	cr_assert_neq(parse(3, a3), 0);
	fflush(err);
	cr_assert(strstr(errbuf, msg), "%s", errbuf);
}

/* The spool's durable write: auto by default, the two modes by name,
 * anything else an error naming the choices. */
Test(config, spool_sync_modes)
{
	static const char *const good[2] = {"fdatasync", "dsync"};

	check_choices("--spool-sync", c.spool_sync, "auto", good, "fsync",
		      "spool_sync must be auto, dsync or fdatasync");
}

/* How new segments are made: auto by default, zero or fallocate by name,
 * anything else an error naming the choices. */
Test(config, spool_prepare_modes)
{
	static const char *const good[2] = {"fallocate", "zero"};

	check_choices("--spool-prepare", c.spool_prepare, "auto", good,
		      "zeros", "spool_prepare must be auto, zero or fallocate");
}

Test(config, delivery_nice_range)
{
	char *a0[] = {"finaldot"};
	cr_assert_eq(parse(1, a0), 0);
	cr_assert_eq(c.delivery_nice, 0u);
	setup();
	char *a1[] = {"finaldot", "--delivery-nice", "19"};
	cr_assert_eq(parse(3, a1), 0, "%s", errbuf);
	cr_assert_eq(c.delivery_nice, 19u);
	setup();
	char *a2[] = {"finaldot", "--delivery-nice", "20"};
	cr_assert_neq(parse(3, a2), 0);
	fflush(err);
	cr_assert(strstr(errbuf, "delivery_nice must be between 0 and 19"),
		  "%s", errbuf);
	setup();
	char *a3[] = {"finaldot", "--delivery-nice", "-1"};
	cr_assert_neq(parse(3, a3), 0);
}

Test(config, bad_values_are_errors)
{
	char *a1[] = {"finaldot", "--threads", "many"};
	cr_assert_neq(parse(3, a1), 0);
	setup();
	char *a2[] = {"finaldot", "--max-message-size", "10Q"};
	cr_assert_neq(parse(3, a2), 0);
	setup();
	char *a3[] = {"finaldot", "--segment-size", "1000"};
	cr_assert_neq(parse(3, a3), 0);
	setup();
	char *a4[] = {"finaldot", "--idle-timeout"};
	cr_assert_neq(parse(2, a4), 0);
	cr_assert(strstr(errbuf, "needs a value"), "%s", errbuf);
	setup();
	char *a5[] = {"finaldot", "--help=yes"};
	cr_assert_neq(parse(2, a5), 0);
	setup();
	char *a6[] = {"finaldot", "stray"};
	cr_assert_neq(parse(2, a6), 0);
	setup();
	char *a7[] = {"finaldot", "--transport", "carrier-pigeon"};
	cr_assert_neq(parse(3, a7), 0);
	/* a batch past 256 MiB (its DATA record past what readers take) */
	setup();
	char *a8[] = {"finaldot", "--segment-size", "4g", "--batch-size",
		      "1100m"};
	cr_assert_neq(parse(5, a8), 0);
	cr_assert(strstr(errbuf, "256m"), "%s", errbuf);
	setup();
	char *a9[] = {"finaldot", "--segment-size", "1g", "--batch-size",
		      "256m"};
	cr_assert_eq(parse(5, a9), 0, "%s", errbuf);
}

Test(config, help_documents_every_option_and_dump_round_trips)
{
	char buf[16384] = {0};
	FILE *out = fmemopen(buf, sizeof(buf), "w");
	fd_config_usage(out, "finaldot");
	fclose(out);
	const char *must[] = {"--listen", "--spool", "--accept-domain",
			      "--threads", "--config", "--max-message-size",
			      "--idle-timeout", "--greet-delay", "--help"};
	for (size_t i = 0; i < sizeof(must) / sizeof(must[0]); i++)
		cr_assert(strstr(buf, must[i]), "%s missing from --help",
			  must[i]);

	/* The dump is a valid config file giving the same settings. */
	char *argv[] = {"finaldot", "--listen", "127.0.0.3:2700",
			"--max-errors", "5", "--log-level", "debug"};
	cr_assert_eq(parse(7, argv), 0);
	char path[] = "/tmp/fdconfXXXXXX";
	int fd = mkstemp(path);
	FILE *f = fdopen(fd, "w");
	fd_config_dump(&c, f);
	fclose(f);
	struct fd_config d;
	fd_config_defaults(&d);
	cr_assert_eq(fd_config_parse_file(&d, path, err), 0, "%s", errbuf);
	cr_assert_str_eq(d.listen[0].text, "127.0.0.3:2700");
	cr_assert_eq(d.max_errors, 5);
	cr_assert_eq(d.log_level, c.log_level);
	cr_assert_eq(d.segment_size, c.segment_size);
	unlink(path);
}

/* Values with '#' and spaces: quoted in the file they are values, not
 * comments, and the dump (every value quoted) reads back the same. */
Test(config, quoted_values_keep_hash_and_dump_round_trips)
{
	char path[] = "/tmp/fdconfXXXXXX", path2[] = "/tmp/fdconfXXXXXX";
	int fd = mkstemp(path);
	FILE *f = fdopen(fd, "w");
	fprintf(f, "spool = \"/var/spool/fd #1\"   # the spool\n"
		   "tls_cert = \"/etc/fd/a#b.pem\"\n"
		   "tls_key = \"/etc/fd/a#b.key\" # its key\n"
		   "route = \"x.test=maildir:/srv/mail #x\"\n"
		   "relay = smtp:127.0.0.1:2525 # unquoted: comment\n");
	fclose(f);
	cr_assert_eq(fd_config_parse_file(&c, path, err), 0, "%s", errbuf);
	cr_assert_str_eq(c.spool_dir, "/var/spool/fd #1");
	cr_assert_eq(c.n_tls_cert, 1);
	cr_assert_str_eq(c.tls_cert[0], "/etc/fd/a#b.pem");
	cr_assert_str_eq(c.tls_key[0], "/etc/fd/a#b.key");
	cr_assert_eq(c.n_routes, 1);
	cr_assert_str_eq(c.routes[0], "x.test=maildir:/srv/mail #x");
	cr_assert_str_eq(c.relay, "smtp:127.0.0.1:2525");

	fd = mkstemp(path2);
	f = fdopen(fd, "w");
	fd_config_dump(&c, f);
	fclose(f);
	struct fd_config d;
	fd_config_defaults(&d);
	cr_assert_eq(fd_config_parse_file(&d, path2, err), 0, "%s", errbuf);
	cr_assert_str_eq(d.spool_dir, c.spool_dir);
	cr_assert_str_eq(d.tls_cert[0], c.tls_cert[0]);
	cr_assert_str_eq(d.tls_key[0], c.tls_key[0]);
	cr_assert_eq(d.n_routes, 1);
	cr_assert_str_eq(d.routes[0], c.routes[0]);
	cr_assert_str_eq(d.relay, c.relay);
	unlink(path);
	unlink(path2);
}

Test(config, dpdk_flag_and_aliases)
{
	char *argv[] = {"finaldot", "--dpdk", "--eal", "-l 0 --no-huge",
			"--ip", "198.18.0.2/24", "--gateway=198.18.0.1"};
	cr_assert_eq(parse(7, argv), 0, "%s", errbuf);
	cr_assert_eq(c.transport, FD_TRANSPORT_DPDK);
	cr_assert_str_eq(c.dpdk_eal, "-l 0 --no-huge");
	cr_assert_str_eq(c.dpdk_ip, "198.18.0.2/24");
	cr_assert_str_eq(c.dpdk_gateway, "198.18.0.1");
}

Test(config, aliases_are_flags_only)
{
	char path[] = "/tmp/fdconfXXXXXX";
	int fd = mkstemp(path);
	FILE *f = fdopen(fd, "w");
	fprintf(f, "eal = -l 0\n");
	fclose(f);
	char *argv[] = {"finaldot", "--config", path};
	cr_assert_neq(parse(3, argv), 0, "the file spells it dpdk_eal");
	unlink(path);
}

/* Issue 10: --config DIR is an error, not an empty config. */
Test(config, config_directory_is_an_error)
{
	char dir[] = "/tmp/fdconfdirXXXXXX";
	cr_assert_not_null(mkdtemp(dir));
	char *argv[] = {"finaldot", "--config", dir};
	cr_assert_neq(parse(3, argv), 0, "a directory read as a config");
	cr_assert(strstr(errbuf, dir) && strstr(errbuf, "directory"), "%s",
		  errbuf);
	rmdir(dir);
}

/* Issue 10: a NUL octet cut "listen = 127.0.0.1:2600\0junk" short and the
 * rest of the line went unread; now the line is an error naming it. */
Test(config, nul_in_a_line_is_an_error_naming_it)
{
	char path[] = "/tmp/fdconfXXXXXX";
	int fd = mkstemp(path);
	static const char text[] = "threads = 2\nlisten = 127.0.0.1:2600\0x\n";
	cr_assert_eq(write(fd, text, sizeof(text) - 1),
		     (ssize_t)sizeof(text) - 1);
	close(fd);
	char *argv[] = {"finaldot", "--config", path};
	cr_assert_neq(parse(3, argv), 0, "a NUL was taken as the end of line");
	cr_assert(strstr(errbuf, ":2: NUL"), "%s", errbuf);
	unlink(path);
}

/* A line longer than any buffer is one line, not several. */
Test(config, long_line_is_one_line)
{
	char path[] = "/tmp/fdconfXXXXXX";
	int fd = mkstemp(path);
	FILE *f = fdopen(fd, "w");
	fprintf(f, "hostname = ");
	for (int i = 0; i < 3000; i++)
		fputc('a', f);
	fprintf(f, "\nthreads = 2\n");
	fclose(f);
	char *argv[] = {"finaldot", "--config", path};
	cr_assert_neq(parse(3, argv), 0);
	cr_assert(strstr(errbuf, ":1: hostname: value too long"), "%s",
		  errbuf);
	unlink(path);
}

/* Issue 10: the command and message deadlines are options. */
Test(config, command_and_data_timeouts)
{
	char *argv[] = {"finaldot", "--command-timeout", "90s",
			"--data-timeout", "20m"};
	cr_assert_eq(c.command_timeout_ms, 300000, "RFC 5321 4.5.3.2");
	cr_assert_eq(c.data_timeout_ms, 600000);
	cr_assert_eq(parse(5, argv), 0, "%s", errbuf);
	cr_assert_eq(c.command_timeout_ms, 90000);
	cr_assert_eq(c.data_timeout_ms, 1200000);
}
