"""Real next hops for finaldot's delivery integration tests.

Each peer is started by the test itself, listens only on 127.0.0.1 (or ::1,
or a unix socket inside its own temp dir), keeps every file it writes in its
own temp dir, never reads or changes system-wide configuration, and is
stopped by its own PIDs at the end, also when the test fails:

  PostfixPeer   a private Postfix instance: SMTP in, virtual(8) Maildirs out
  DovecotLMTP   Dovecot's LMTP server (unix socket and TCP), Maildirs out
  SmtpSink      Postfix's smtp-sink test server, with its fault options
  ScriptedHop   a scripted SMTP/LMTP server in Python for the faults the
                others cannot produce: hangs, garbage, closes mid-DATA,
                chosen extensions, per-recipient LMTP replies, ...

Every peer is a context manager with these attributes:
  port     its TCP port (None for a unix-socket-only peer)
  addr     ("127.0.0.1", port)
  target   finaldot's route target text: "smtp:127.0.0.1:PORT",
           "lmtp:127.0.0.1:PORT" or "lmtp:unix:PATH"
  tmp      its temp dir (removed at exit unless the caller passed it)
and log() -> str, the peer's log text for failure messages.

A peer whose program is missing (or that needs root and does not have it)
calls fdtest.skip(), which exits 77 with the reason. A peer that does not
come up within its start timeout raises PeerError carrying its log text.
A port chosen by the peer (port=None) is retried on "address in use".

Stopping: stop() is idempotent, runs at __exit__ and again at interpreter
exit (atexit). SIGTERM (what meson sends on a timeout) is turned into
SystemExit when nobody else handles it, so the with-blocks still unwind and
no daemon outlives its test.
"""
import atexit
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

from fdtest import free_port, skip

CRLF = b"\r\n"
START_TIMEOUT = 20.0
DEFAULT_USERS = ("alice", "bob", "carol")


class PeerError(RuntimeError):
    """A peer failed to start or to stop; the message carries its log."""


# ---------------------------------------------------------------- helpers

_sigterm_installed = False


def _sigterm_to_exit():
    """Let SIGTERM unwind with-blocks (so peers are stopped) instead of
    killing the interpreter on the spot. Only when nobody else handles it."""
    global _sigterm_installed
    if _sigterm_installed:
        return
    _sigterm_installed = True
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _need_binary(path, what):
    if not os.access(path, os.X_OK):
        skip(f"{what}: {path} is not installed")
    return path


def _need_root(what):
    if os.geteuid() != 0:
        skip(f"{what} needs root (it switches to unprivileged users)")


def _need_user(name, what):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        skip(f"{what}: no '{name}' user on this machine")


def _unprivileged():
    """uid, gid for mail files: nobody and its primary group."""
    pw = _need_user("nobody", "mail storage")
    return pw.pw_uid, pw.pw_gid


def _check_traversable(path):
    """Daemons that dropped root must reach the peer's dir: every ancestor
    needs the x bit for others."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    while True:
        mode = os.stat(parent).st_mode
        if not mode & 0o001:
            raise PeerError(f"{parent} is not searchable by other users "
                            f"(mode {mode & 0o7777:o}); unprivileged mail "
                            f"daemons cannot reach {path}: use another "
                            f"TMPDIR or tmpdir=")
        if parent == "/":
            return
        parent = os.path.dirname(parent)


def _wait(cond, timeout, interval=0.02):
    """Poll cond() until true or timeout; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def _stat(pid):
    """(state, start time) of pid from /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2:].split()
    return rest[0], rest[19]


def _ident(pid):
    """A process identity that PID reuse cannot fake: (pid, start time)."""
    st = _stat(pid)
    return (pid, st[1]) if st else None


def _alive(ident):
    """True while the process ident names exists and is not a zombie."""
    st = _stat(ident[0])
    return st is not None and st[1] == ident[1] and st[0] != "Z"


def _children(ident):
    """Identities of the direct children of a process (from /proc)."""
    out = set()
    if not _alive(ident):
        return out
    pid = ident[0]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        out.update(i for i in map(_ident, kids) if i)
    return out


def _kill_and_reap(idents, timeout):
    """Wait for the processes to exit; SIGKILL (each by its PID, after
    checking it is still the same process) those that don't."""
    idents = set(idents)
    if _wait(lambda: not any(_alive(i) for i in idents), timeout):
        return True
    for i in idents:
        if _alive(i):
            try:
                os.kill(i[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
    return _wait(lambda: not any(_alive(i) for i in idents), 5)


def _socket_inodes(pid):
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


def _listens(pid, port=None, path=None):
    """True if process pid holds a listening socket on TCP port (any local
    address) or on the unix socket path. Checked in /proc, so it costs the
    peer no session (smtp-sink -n counts sessions)."""
    mine = _socket_inodes(pid)
    if not mine:
        return False
    if port is not None:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    rows = f.read().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                col = row.split()
                if (len(col) > 9 and col[3] == "0A"
                        and int(col[1].rsplit(":", 1)[1], 16) == port
                        and col[9] in mine):
                    return True
        return False
    with open("/proc/net/unix") as f:
        rows = f.read().splitlines()[1:]
    for row in rows:
        col = row.split()
        if (len(col) >= 8 and col[7] == path and col[6] in mine
                and int(col[3], 16) & 0x10000):
            return True
    return False


def _hex_addr(h):
    """/proc/net/tcp{,6} address text -> printable IP."""
    raw = bytes.fromhex(h)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listeners(pid):
    """Every listening socket process pid holds: ("tcp", ip, port) and
    ("unix", path) tuples (a relative path, as Postfix binds them, is
    resolved against the process's current directory). For tests that
    check a peer listens nowhere else."""
    mine = _socket_inodes(pid)
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = "/"
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            col = row.split()
            if len(col) > 9 and col[3] == "0A" and col[9] in mine:
                ip, port = col[1].rsplit(":", 1)
                out.add(("tcp", _hex_addr(ip), int(port, 16)))
    with open("/proc/net/unix") as f:
        for row in f.read().splitlines()[1:]:
            col = row.split()
            if col[6] in mine and int(col[3], 16) & 0x10000:
                path = col[7] if len(col) >= 8 else ""
                if path and not path.startswith(("/", "@")):
                    path = os.path.join(cwd, path)
                out.add(("unix", path))
    return out


def _banner(addr=None, path=None, timeout=5.0):
    """Connect, read the first reply line, say QUIT. Returns the line."""
    if path:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = path
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = addr
    with s:
        s.settimeout(timeout)
        s.connect(target)
        buf = b""
        while CRLF not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        try:
            s.sendall(b"QUIT\r\n")
            s.recv(4096)
        except OSError:
            pass
    return buf.split(CRLF, 1)[0].decode("utf-8", "replace")


def _maildir_files(mdir):
    """Message files of one Maildir (new/ and cur/), oldest first."""
    files = []
    for sub in ("new", "cur"):
        d = os.path.join(mdir, sub)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        for n in names:
            p = os.path.join(d, n)
            try:
                files.append((os.stat(p).st_mtime_ns, n, p))
            except FileNotFoundError:
                pass
    files.sort()
    return [p for _, _, p in files]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _header(raw, name):
    """First value of header name in a stored message (LF or CRLF)."""
    head = raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    m = re.search(rb"(?im)^" + re.escape(name.encode()) +
                  rb":[ \t]*([^\r\n]*)", head)
    return m.group(1).decode("utf-8", "replace").strip() if m else None


TRACE_HEADERS = (b"return-path", b"delivered-to", b"x-original-to",
                 b"received")


def delivered_content(raw, crlf=True):
    """The message as the client sent it, from a file a peer stored: drops
    the trace headers the delivering peer put on top (Return-Path,
    Delivered-To, X-Original-To, Received, with continuation lines), and
    turns the bare LF line ends Postfix and Dovecot store back into CRLF
    (crlf=False keeps them)."""
    lines = raw.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        name = lines[i].split(b":", 1)[0].lower()
        if name not in TRACE_HEADERS:
            break
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    out = b"".join(lines[i:])
    if crlf and b"\r\n" not in out:
        out = out.replace(b"\n", b"\r\n")
    return out


# ------------------------------------------------------------- base class

class _Peer:
    kind = "peer"
    port = None
    target = None
    tmp = None

    @property
    def addr(self):
        return ("127.0.0.1", self.port)

    def _init_tmp(self, tmpdir):
        _sigterm_to_exit()
        self._stopped = False
        if tmpdir is None:
            self.tmp = tempfile.mkdtemp(prefix=f"fdpeer-{self.kind}-")
            self._own_tmp = True
        else:
            self.tmp = os.path.abspath(tmpdir)
            os.makedirs(self.tmp, exist_ok=True)
            self._own_tmp = False
        # Daemons that dropped root (postfix, nobody) must traverse it.
        os.chmod(self.tmp, 0o755)
        _check_traversable(self.tmp)
        atexit.register(self.close)

    def _start_on_free_port(self, port, launch):
        """launch(port) starts the peer; with port None, a port someone
        grabbed meanwhile is retried with another one."""
        for attempt in range(4):
            p = port if port is not None else free_port()
            try:
                launch(p)
                return
            except PeerError:
                busy = "in use" in self.log()
                self._stop_processes()
                if port is not None or not busy or attempt == 3:
                    raise

    def log(self):
        return ""

    def _stop_processes(self):
        raise NotImplementedError

    def stop(self):
        """Stop the peer's processes (by their PIDs) and wait for them.
        Idempotent. Files stay until close() / the end of the with-block."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_processes()

    def close(self):
        """stop(), then remove the temp dir if the peer made it."""
        self.stop()
        if self._own_tmp and self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        failed = exc_type is not None and exc_type is not SystemExit
        if exc_type is SystemExit and exc is not None and exc.code not in (
                0, None, 77):
            failed = True
        try:
            self.stop()
        finally:
            if failed:
                print(f"---- {self.kind} log (tail) ----")
                print(self.log()[-4000:])
            self.close()
        return False


# ------------------------------------------------------------- Postfix

class PostfixPeer(_Peer):
    """A private Postfix instance as an SMTP next hop on 127.0.0.1:PORT.

    It accepts mail for `domain` and delivers each recipient with the
    virtual(8) agent into a Maildir under the temp dir, owned by nobody:
      users        local parts with their own Maildir,
                   TMP/mail/DOMAIN/LOCAL/ (default alice, bob, carol)
      catch_all    True: every other local part of the domain is accepted
                   too, into the shared Maildir TMP/mail/DOMAIN/@catchall/,
                   told apart by the Delivered-To header virtual(8) adds
                   (one file per recipient). False: unknown users get
                   "550 5.1.1 ... User unknown in virtual mailbox table"
                   at RCPT.
    (Per-recipient Maildirs for any address would need a $1 substitution
    from a regexp map, which virtual(8) refuses for security reasons.)
    Other domains get "554 5.7.1 Relay access denied" at RCPT (no
    permit_mynetworks); default/relay/local transports are error:, so
    nothing can leave the machine even if a bounce is generated.

    How a private instance works on Debian 12 (Postfix 3.7), as found here:
      - `postfix -c DIR start` run by root needs neither
        alternate_config_directories nor multi_instance_directories (those
        gate only the set-gid postdrop/postqueue and postmulti); a missing
        /etc/postfix/main.cf does not matter either.
      - DIR/main.cf points queue_directory (root-owned; `postfix start`
        creates the postfix-owned subdirs through post-install),
        data_directory (postfix-owned) and maillog_file (with
        maillog_file_prefixes = TMP, and the postlog service in master.cf,
        since there is no syslog) into the temp dir.
      - DIR/master.cf is written from scratch: one "127.0.0.1:PORT inet"
        smtpd, no port 25, no pickup/showq/smtp client; every service
        unchrooted, so nothing needs copying into a chroot.
      - setgid_group must name an existing group; postdrop when it exists,
        else nogroup (then only the set-gid injection tools, which this
        peer never uses, would not work).
      - compatibility_level = 3.7 silences the backwards-compatibility
        warnings. alias_maps is emptied (Debian's default reads
        /etc/aliases.db and NIS).
      - `postfix start` forks the master into its own session; its PID is
        read from TMP/queue/pid/master.pid and checked (its cwd is our
        queue directory) before anything signals it.
    Stopping: `postfix -c DIR stop`, then waiting for the master and the
    children it had; a process still there after 15 s is SIGKILLed by PID.

    main={param: value} adds or overrides main.cf settings.
    """
    kind = "postfix"

    def __init__(self, tmpdir=None, port=None, domain="dest.test",
                 users=DEFAULT_USERS, catch_all=True, main=None,
                 hostname="peer.test", start_timeout=START_TIMEOUT):
        self.postfix = _need_binary("/usr/sbin/postfix", "PostfixPeer")
        postconf = _need_binary("/usr/sbin/postconf", "PostfixPeer")
        _need_root("PostfixPeer")
        out = subprocess.run([postconf, "-dh", "daemon_directory"],
                             capture_output=True, text=True, timeout=30)
        _need_binary(os.path.join(out.stdout.strip() or
                                  "/usr/lib/postfix/sbin", "master"),
                     "PostfixPeer")
        _need_user("postfix", "PostfixPeer")
        self.domain = domain.lower()
        self.users = tuple(u.lower() for u in users)
        self.catch_all = catch_all
        self.hostname = hostname
        self.extra_main = dict(main or {})
        self.start_timeout = start_timeout
        self.master_pid = None
        self._master = None
        self._init_tmp(tmpdir)
        self.etc = os.path.join(self.tmp, "etc")
        self.queue = os.path.join(self.tmp, "queue")
        self.data = os.path.join(self.tmp, "data")
        self.maildir_base = os.path.join(self.tmp, "mail")
        self.maillog = os.path.join(self.tmp, "maillog")
        try:
            self._prepare_dirs()
            self._start_on_free_port(port, self._launch)
        except BaseException:
            self.close()
            raise

    def _setgid_group(self):
        owner_gid = pwd.getpwnam("postfix").pw_gid
        for g in ("postdrop", "nogroup"):
            try:
                if grp.getgrnam(g).gr_gid not in (0, owner_gid):
                    return g
            except KeyError:
                pass
        skip("PostfixPeer: neither a postdrop nor a nogroup group exists "
             "for setgid_group")

    def _prepare_dirs(self):
        pf = pwd.getpwnam("postfix")
        uid, gid = _unprivileged()
        os.makedirs(self.etc, exist_ok=True)
        os.makedirs(self.queue, exist_ok=True)
        os.chmod(self.queue, 0o755)
        os.makedirs(self.data, mode=0o700, exist_ok=True)
        os.chown(self.data, pf.pw_uid, pf.pw_gid)
        os.makedirs(self.maildir_base, exist_ok=True)
        os.chown(self.maildir_base, uid, gid)
        os.chmod(self.maildir_base, 0o755)
        self.uid, self.gid = uid, gid

    def _write_config(self):
        t = self.tmp
        params = {
            "compatibility_level": "3.7",
            "queue_directory": self.queue,
            "data_directory": self.data,
            "mail_owner": "postfix",
            "setgid_group": self._setgid_group(),
            "maillog_file": self.maillog,
            "maillog_file_prefixes": t,
            "myhostname": self.hostname,
            "mydomain": self.hostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relay_domains": "",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "default_transport": "error:5.7.1 this test peer relays nowhere",
            "relay_transport": "error:5.7.1 this test peer relays nowhere",
            "local_transport": "error:5.1.1 no local delivery here",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": self.maildir_base,
            "virtual_mailbox_maps": f"texthash:{self.etc}/vmailbox",
            "virtual_uid_maps": f"static:{self.uid}",
            "virtual_gid_maps": f"static:{self.gid}",
            # store what the client sent: no Message-ID/Date/From added,
            # no address rewriting (127.0.0.1 would count as local)
            "local_header_rewrite_clients": "",
            "smtpd_banner": "$myhostname ESMTP",
            "biff": "no",
            "smtpd_error_sleep_time": "0",
            "in_flow_delay": "0",
            "delay_warning_time": "0",
        }
        params.update(self.extra_main)
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            for k, v in params.items():
                f.write(f"{k} = {v}\n")
        with open(os.path.join(self.etc, "vmailbox"), "w") as f:
            for u in self.users:
                f.write(f"{u}@{self.domain} {self.domain}/{u}/\n")
            if self.catch_all:
                f.write(f"@{self.domain} {self.domain}/@catchall/\n")
        # service type private unpriv chroot wakeup maxproc command
        services = [
            f"127.0.0.1:{self.port} inet n - n - - smtpd",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "virtual unix - n n - - virtual",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write("\n".join(services) + "\n")

    def _env(self):
        env = dict(os.environ)
        for k in ("MAIL_CONFIG", "MAIL_DEBUG", "MAIL_VERBOSE"):
            env.pop(k, None)
        return env

    def _launch(self, port):
        self.port = port
        self.target = f"smtp:127.0.0.1:{port}"
        self._write_config()
        r = subprocess.run([self.postfix, "-c", self.etc, "start"],
                           capture_output=True, text=True, env=self._env(),
                           timeout=60, stdin=subprocess.DEVNULL)
        self.master_pid = self._read_master_pid()
        self._master = _ident(self.master_pid) if self.master_pid else None
        if r.returncode != 0 or not self._master:
            raise PeerError(f"postfix -c {self.etc} start failed "
                            f"({r.returncode}): {r.stdout}{r.stderr}\n"
                            f"{self.log()[-3000:]}")
        ok = _wait(lambda: _listens(self.master_pid, port=port)
                   or not _alive(self._master), self.start_timeout)
        if not ok or not _alive(self._master):
            raise PeerError(f"postfix master did not listen on port {port}:"
                            f"\n{self.log()[-3000:]}")
        try:
            line = _banner(self.addr, timeout=self.start_timeout)
        except OSError as e:
            line = f"({e})"
        if not line.startswith("220"):
            raise PeerError(f"postfix on port {port} greeted {line!r}:\n"
                            f"{self.log()[-3000:]}")

    def _read_master_pid(self):
        """The master's PID from our pid file, only if that process is
        really this instance's master (its cwd is our queue dir)."""
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            if os.path.realpath(os.readlink(f"/proc/{pid}/cwd")) != \
                    os.path.realpath(self.queue):
                return None
        except OSError:
            return None
        return pid

    def _stop_processes(self):
        master = self._master
        if master is None or not _alive(master):
            return
        procs = {master} | _children(master)
        subprocess.run([self.postfix, "-c", self.etc, "stop"],
                       capture_output=True, env=self._env(), timeout=60,
                       stdin=subprocess.DEVNULL)
        if not _kill_and_reap(procs, 15):
            raise PeerError(f"postfix processes {sorted(procs)} survived "
                            f"SIGKILL")

    def log(self):
        """The instance's maillog."""
        try:
            with open(self.maillog, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    RELAYED = re.compile(r"status=sent \(250 2\.0\.0 Ok: queued as "
                         r"([0-9A-F]{16})\)")

    def relayed_id(self, line, relay, what=""):
        """Postfix's delivery line `line` says it sent the message to relay
        (HOST[ADDR]:PORT) and finaldot answered 250: finaldot's queue id.
        Fails the test otherwise; what names the message in the reason."""
        from fdtest import check
        check("status=sent" in line, f"postfix did not deliver{what}: "
              f"{line}\n{self.log()[-3000:]}")
        check(f"relay={relay}" in line, f"{what.strip()} relayed elsewhere: "
              f"{line}".lstrip())
        m = self.RELAYED.search(line)
        check(m is not None, f"finaldot's queue id in {line}")
        return m.group(1)

    def _split(self, addr):
        local, _, dom = addr.lower().rpartition("@")
        if dom != self.domain:
            raise ValueError(f"{addr} is not in {self.domain}")
        return local

    def messages(self, addr=None):
        """File contents of the messages delivered to addr (any case), oldest
        first; addr None: every message delivered by this peer."""
        base = os.path.join(self.maildir_base, self.domain)
        if addr is None:
            try:
                dirs = sorted(os.listdir(base))
            except FileNotFoundError:
                return []
            return [_read(p) for d in dirs
                    for p in _maildir_files(os.path.join(base, d))]
        local = self._split(addr)
        if local in self.users:
            return [_read(p) for p in
                    _maildir_files(os.path.join(base, local))]
        out = []
        for p in _maildir_files(os.path.join(base, "@catchall")):
            raw = _read(p)
            to = _header(raw, "Delivered-To")
            if to is not None and to.lower() == addr.lower():
                out.append(raw)
        return out

    def wait_for(self, count, timeout=20.0, addr=None):
        """Wait until at least count messages were delivered (to addr, or in
        all), at most timeout seconds. Returns messages(addr) as it is then:
        the caller checks the length."""
        _wait(lambda: len(self.messages(addr)) >= count, timeout, 0.05)
        return self.messages(addr)


# ------------------------------------------------------------- Dovecot

class DovecotLMTP(_Peer):
    """Dovecot's LMTP server as a next hop (RFC 2033).

    Runs `dovecot -F -c TMP/dovecot.conf` (foreground, so its PID is our
    child's) with base_dir, state_dir and log_path in the temp dir,
    protocols = lmtp and nothing else: its one inet listener is
    127.0.0.1:PORT (port chosen when None), and with unix=True also the
    unix socket TMP/run/lmtp. target is "lmtp:unix:PATH" when unix, else
    "lmtp:127.0.0.1:PORT"; target_tcp and target_unix give each.

    Users: `users` (default alice, bob, carol) @ `domain` (lmtp.test) exist,
    from a passwd-file userdb; every other address gets
    "550 5.1.1 <x> User doesn't exist" at RCPT. all_users=True uses a
    static userdb instead: every local part of every domain exists.
    Mail is stored as nobody in mail_location =
    maildir:TMP/mail/%d/%n (lower-cased user), with LF line ends and
    Return-Path, Received (and Delivered-To only when the transaction had
    one recipient) on top: see delivered_content.

    Stopping: SIGTERM to the master's PID, wait (it stops its children),
    then SIGKILL by PID whatever of it is left after 15 s.
    """
    kind = "dovecot"

    def __init__(self, tmpdir=None, port=None, unix=True, domain="lmtp.test",
                 users=DEFAULT_USERS, all_users=False, hostname="lmtp.test",
                 start_timeout=START_TIMEOUT):
        self.dovecot = _need_binary("/usr/sbin/dovecot", "DovecotLMTP")
        lmtp = "/usr/lib/dovecot/lmtp"
        _need_binary(lmtp, "DovecotLMTP (dovecot-lmtpd)")
        _need_root("DovecotLMTP")
        for u in ("dovecot", "dovenull"):
            _need_user(u, "DovecotLMTP")
        self.domain = domain.lower()
        self.users = tuple(u.lower() for u in users)
        self.all_users = all_users
        self.hostname = hostname
        self.unix = unix
        self.start_timeout = start_timeout
        self.proc = None
        self._init_tmp(tmpdir)
        self.run_dir = os.path.join(self.tmp, "run")
        self.conf = os.path.join(self.tmp, "dovecot.conf")
        self.logpath = os.path.join(self.tmp, "dovecot.log")
        self.maildir_base = os.path.join(self.tmp, "mail")
        self.unix_path = os.path.join(self.run_dir, "lmtp") if unix else None
        if self.unix_path and len(self.unix_path.encode()) > 107:
            self.close()
            raise PeerError(f"unix socket path too long: {self.unix_path}")
        try:
            uid, gid = _unprivileged()
            for d in (self.maildir_base, os.path.join(self.tmp, "home")):
                os.makedirs(d, exist_ok=True)
                os.chown(d, uid, gid)
            os.makedirs(os.path.join(self.tmp, "state"), exist_ok=True)
            self.uid, self.gid = uid, gid
            self._start_on_free_port(port, self._launch)
        except BaseException:
            self.close()
            raise

    def _write_config(self):
        t = self.tmp
        home = f"{t}/home/%d/%n"
        if self.all_users:
            dbs = (f"passdb {{\n  driver = static\n  args = nopassword=y\n}}\n"
                   f"userdb {{\n  driver = static\n  args = uid={self.uid} "
                   f"gid={self.gid} home={home} allow_all_users=yes\n}}\n")
        else:
            users = os.path.join(t, "users")
            with open(users, "w") as f:
                for u in self.users:
                    f.write(f"{u}@{self.domain}::{self.uid}:{self.gid}::"
                            f"{t}/home/{self.domain}/{u}::\n")
            dbs = "".join(f"{db} {{\n  driver = passwd-file\n"
                          f"  args = {users}\n}}\n"
                          for db in ("passdb", "userdb"))
        unix = ("  unix_listener lmtp {\n    mode = 0666\n  }\n"
                if self.unix else "")
        with open(self.conf, "w") as f:
            f.write(f"""# private LMTP peer for finaldot's tests
base_dir = {self.run_dir}
state_dir = {t}/state
log_path = {self.logpath}
info_log_path = {self.logpath}
instance_name = fdpeer-dovecot-{self.port}
hostname = {self.hostname}
protocols = lmtp
listen = 127.0.0.1
ssl = no
mail_location = maildir:{t}/mail/%d/%n
{dbs}service lmtp {{
{unix}  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
""")

    def _launch(self, port):
        self.port = port
        self.target_tcp = f"lmtp:127.0.0.1:{port}"
        self.target_unix = f"lmtp:unix:{self.unix_path}" if self.unix \
            else None
        self.target = self.target_unix or self.target_tcp
        self._write_config()
        with open(os.path.join(self.tmp, "dovecot.stderr"), "ab") as err:
            self.proc = subprocess.Popen(
                [self.dovecot, "-F", "-c", self.conf], stdout=err,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        pid = self.proc.pid

        def up():
            if self.proc.poll() is not None:
                return True
            return (_listens(pid, port=port) and
                    (not self.unix or _listens(pid, path=self.unix_path)))
        _wait(up, self.start_timeout)
        if self.proc.poll() is not None:
            raise PeerError(f"dovecot exited ({self.proc.returncode}):\n"
                            f"{self.log()[-3000:]}")
        checks = [(self.addr, None)] + ([(None, self.unix_path)]
                                        if self.unix else [])
        for addr, path in checks:
            try:
                line = _banner(addr, path, timeout=self.start_timeout)
            except OSError as e:
                line = f"({e})"
            if not line.startswith("220"):
                raise PeerError(f"dovecot LMTP at {addr or path} greeted "
                                f"{line!r}:\n{self.log()[-3000:]}")

    def _stop_processes(self):
        if self.proc is None:
            return
        kids = _children(_ident(self.proc.pid) or (0, ""))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _kill_and_reap(kids, 10)

    def log(self):
        """Dovecot's log file (and whatever it printed before opening it)."""
        out = ""
        for p in (os.path.join(self.tmp, "dovecot.stderr"), self.logpath):
            try:
                with open(p, errors="replace") as f:
                    out += f.read()
            except OSError:
                pass
        return out

    def messages(self, addr=None):
        """File contents of the messages stored for addr (any case), oldest
        first; addr None: every stored message."""
        if addr is None:
            out = []
            for dom in sorted(os.listdir(self.maildir_base)):
                ddir = os.path.join(self.maildir_base, dom)
                for u in sorted(os.listdir(ddir)):
                    out += [_read(p) for p in
                            _maildir_files(os.path.join(ddir, u))]
            return out
        local, _, dom = addr.lower().rpartition("@")
        return [_read(p) for p in _maildir_files(
            os.path.join(self.maildir_base, dom, local))]

    def wait_for(self, addr, n, timeout=20.0):
        """Wait until addr (None: anyone) has at least n messages, at most
        timeout seconds; returns messages(addr) as it is then."""
        _wait(lambda: len(self.messages(addr)) >= n, timeout, 0.05)
        return self.messages(addr)


# ------------------------------------------------------------- smtp-sink

class SmtpSink(_Peer):
    """Postfix's smtp-sink(1) as a (possibly faulty) next hop.

    SmtpSink(port=None, lmtp=False, options=(), unix=False) runs
      smtp-sink -v [-u nobody] -h HOSTNAME -d TMP/dump/ [-L] OPTIONS
                127.0.0.1:PORT 64
    (or unix:TMP/sink.sock with unix=True, LMTP only). OPTIONS are passed
    as given, e.g. ['-r', 'rcpt'] (4xx to RCPT), ['-f', '.'] (5xx at the
    end of data), ['-q', 'data'] (hang up after DATA), ['-Q', 'mail'] (421
    and hang up), ['-w', '5'] (slow DATA reply), ['-p'] (no PIPELINING),
    ['-A', '0'] (550 right after 354); see smtp-sink(1).

    Recording: each transaction that reached the end of data is a dump file
    (written even when the reply to "." is a rejection; removed when the
    client hangs up mid-transaction). messages() returns the complete dump
    files, transactions() parses them, count() counts the "." the verbose
    log saw. Readiness is checked in /proc (the listening socket belongs to
    the process), so no probe session is spent (-n counts sessions).
    Stopping: SIGTERM to its PID, SIGKILL after 10 s.
    """
    kind = "smtp-sink"

    def __init__(self, port=None, lmtp=False, options=(), tmpdir=None,
                 unix=False, hostname="sink.test",
                 start_timeout=START_TIMEOUT):
        self.binary = _need_binary("/usr/sbin/smtp-sink", "SmtpSink")
        if unix and not lmtp:
            raise ValueError("SmtpSink: a unix socket needs lmtp=True "
                             "(finaldot speaks LMTP only over unix sockets)")
        self.lmtp = lmtp
        self.options = [str(o) for o in options]
        self.hostname = hostname
        self.unix = unix
        self.start_timeout = start_timeout
        self.proc = None
        self._init_tmp(tmpdir)
        self.dump = os.path.join(self.tmp, "dump")
        self.logpath = os.path.join(self.tmp, "smtp-sink.log")
        self.unix_path = os.path.join(self.tmp, "sink.sock") if unix \
            else None
        try:
            os.makedirs(self.dump, exist_ok=True)
            if os.geteuid() == 0:
                uid, gid = _unprivileged()
                os.chown(self.dump, uid, gid)
            if unix:
                self._launch(None)
            else:
                self._start_on_free_port(port, self._launch)
        except BaseException:
            self.close()
            raise

    def _launch(self, port):
        self.port = port
        proto = "lmtp" if self.lmtp else "smtp"
        if self.unix:
            self.target = f"lmtp:unix:{self.unix_path}"
            listen = f"unix:{self.unix_path}"
        else:
            self.target = f"{proto}:127.0.0.1:{port}"
            listen = f"127.0.0.1:{port}"
        argv = [self.binary, "-v"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # required when run as root
        argv += ["-h", self.hostname, "-d", self.dump + "/"]
        if self.lmtp:
            argv.append("-L")
        argv += self.options + [listen, "64"]
        self.argv = argv
        with open(self.logpath, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        pid = self.proc.pid
        _wait(lambda: self.proc.poll() is not None or
              _listens(pid, port=port, path=self.unix_path),
              self.start_timeout)
        if self.proc.poll() is not None or not _listens(
                pid, port=port, path=self.unix_path):
            raise PeerError(f"smtp-sink {' '.join(argv)} did not come up "
                            f"(exit {self.proc.poll()}):\n"
                            f"{self.log()[-3000:]}")

    def _stop_processes(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self):
        """smtp-sink's verbose output (every command it read)."""
        try:
            with open(self.logpath, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def count(self):
        """How many "." (end of data) commands smtp-sink has read."""
        # -v lines are "ARGV0: COMMAND"; -c counters may share the line,
        # separated by a CR.
        return sum(1 for line in re.split(r"[\r\n]", self.log())
                   if re.fullmatch(r"\S*smtp-sink: \.", line))

    def messages(self):
        """Complete dump files (smtp-sink headers, then the message with LF
        line ends, then an empty line), oldest first."""
        files = []
        for n in os.listdir(self.dump):
            p = os.path.join(self.dump, n)
            try:
                files.append((os.stat(p).st_mtime_ns, n, p))
            except FileNotFoundError:
                pass
        out = []
        for _, _, p in sorted(files):
            try:
                raw = _read(p)
            except FileNotFoundError:
                continue
            if raw.endswith(b"\n\n") and b"\nReceived: " in raw:
                out.append(raw)
        return out

    def transactions(self):
        """The dumps parsed: dicts with helo, mail (the MAIL arguments),
        rcpts (each RCPT's arguments), proto and body (CRLF line ends)."""
        out = []
        for raw in self.messages():
            head, _, rest = raw.partition(b"\nReceived: ")
            fields = {"helo": None, "mail": None, "rcpts": [],
                      "proto": None}
            for line in head.decode("utf-8", "replace").split("\n"):
                k, _, v = line.partition(": ")
                if k == "X-Helo-Args":
                    fields["helo"] = v
                elif k == "X-Mail-Args":
                    fields["mail"] = v
                elif k == "X-Rcpt-Args":
                    fields["rcpts"].append(v)
                elif k == "X-Client-Proto":
                    fields["proto"] = v
            # Received: is three lines: skip its two continuations.
            body = rest.split(b"\n", 3)[3] if rest.count(b"\n") >= 3 else b""
            body = body[:-1]  # the empty line smtp-sink appends
            fields["body"] = body.replace(b"\n", b"\r\n")
            out.append(fields)
        return out

    def wait_for(self, count, timeout=20.0):
        """Wait until count transactions were dumped (and their "." read),
        at most timeout seconds; returns messages() as it is then."""
        _wait(lambda: self.count() >= count and
              len(self.messages()) >= count, timeout, 0.05)
        return self.messages()


# ------------------------------------------------------------- ScriptedHop

class _Action:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


HANG = _Action("HANG")        # never reply; read and drop until the client
#                               leaves or the hop stops
CLOSE = _Action("CLOSE")      # close the connection (FIN) without a reply
RESET = _Action("RESET")      # abort the connection (RST) without a reply
GARBAGE = _Action("GARBAGE")  # send GARBAGE_BYTES instead of a reply
GARBAGE_BYTES = b"\x00\xff\xfe this is not an SMTP reply \x07\r\n"


class Raw:
    """A reply sent as these exact bytes (no CRLF added): malformed,
    partial, oddly split multi-line replies... The command succeeds if the
    bytes start with the code a success would have (250, 354)."""

    def __init__(self, data):
        self.data = data.encode() if isinstance(data, str) else bytes(data)

    def __repr__(self):
        return f"Raw({self.data!r})"


class Delay:
    """Wait `seconds` (cut short when the hop stops), then do `reply`."""

    def __init__(self, seconds, reply):
        self.seconds = seconds
        self.reply = reply

    def __repr__(self):
        return f"Delay({self.seconds}, {self.reply!r})"


DEFAULT_EXTENSIONS = ("PIPELINING", "SIZE 10485760", "8BITMIME", "SMTPUTF8",
                      "DSN", "CHUNKING", "ENHANCEDSTATUSCODES")


def fail_first(n, reply="451 4.3.0 Try again later", then=None):
    """A dot= rule: the first n transactions to reach the end of data (over
    the hop's life, all connections; Transaction.number < n) get reply, the
    others then (None: the default 250). Works for LMTP too: every
    recipient of such a transaction gets reply."""
    def rule(session, *rcpt):
        return reply if session.txn.number < n else then
    return rule


class Script:
    """What a ScriptedHop answers, step by step.

    Each reply spec below is one of:
      None       the default (shown in brackets)
      "250 ok"   a reply; several lines separated by "\\n", each complete
                 ("451-4.3.0 a\\n451 4.3.0 b"); CRLF is added
      Raw(b)     exact bytes;  Delay(s, spec)  wait, then spec
      HANG, CLOSE, RESET, GARBAGE   (see their definitions)
      a callable returning any of these; it gets the Session (attributes
      conn, helo, txn, hop, peer) and the arguments noted below.
    A command succeeds when its reply has the success code (2xx, 354 for
    DATA); GARBAGE and replies without a code count as failures.

      greeting  on connect [220 NAME ESMTP scripted hop]
      extensions  EHLO/LHLO keywords advertised after NAME
                [DEFAULT_EXTENSIONS: PIPELINING, SIZE 10485760, 8BITMIME,
                SMTPUTF8, DSN, CHUNKING, ENHANCEDSTATUSCODES]
      ehlo      replaces the whole EHLO/LHLO reply; helo the HELO reply
      mail      callable(session, addr, params) [250 2.1.0 Ok]
      rcpt      dict {addr: spec} (keys any case) or
                callable(session, addr, params) [250 2.1.5 Ok]
      data      reply to DATA [354 End data with <CR><LF>.<CR><LF>]
      dot       after the final dot or BDAT LAST. SMTP: callable(session)
                [250 2.0.0 Ok: queued as N]. LMTP: one reply per accepted
                recipient, in RCPT order (RFC 2033 4.2): dict {addr: spec}
                or callable(session, addr) [250 2.0.0 <addr> delivered].
                An action (HANG, CLOSE...) for one recipient cuts the rest.
      bdat      reply to each BDAT chunk but the LAST [250 2.0.0 N octets]
      rset, noop, quit   [250 2.0.0 Ok / 250 2.0.0 Ok / 221 2.0.0 Bye]
      close_mid_data  None, or a byte count: once that many bytes of the
                message (DATA: as on the wire, BDAT: chunk bytes) were read,
                do mid_data (default CLOSE; RESET or HANG also work)
      strict    True: the defaults answer like a careful server: 555 to a
                MAIL/RCPT parameter whose extension was not advertised
                (SIZE, BODY=8BITMIME/BINARYMIME, SMTPUTF8, RET, ENVID,
                NOTIFY, ORCPT) or is unknown, 553 to a non-ASCII address
                without SMTPUTF8, 552 to a SIZE= or message over the
                advertised SIZE. BDAT without CHUNKING is always 500.
      name      the host name in the greeting and EHLO reply
    """

    def __init__(self, greeting=None, extensions=DEFAULT_EXTENSIONS,
                 ehlo=None, helo=None, mail=None, rcpt=None, data=None,
                 dot=None, bdat=None, rset=None, noop=None, quit=None,
                 close_mid_data=None, mid_data=CLOSE, strict=True,
                 name="hop.test"):
        self.greeting = greeting
        self.extensions = tuple(extensions)
        self.ehlo = ehlo
        self.helo = helo
        self.mail = mail
        self.rcpt = rcpt
        self.data = data
        self.dot = dot
        self.bdat = bdat
        self.rset = rset
        self.noop = noop
        self.quit = quit
        self.close_mid_data = close_mid_data
        self.mid_data = mid_data
        self.strict = strict
        self.name = name

    def has(self, keyword):
        return any(e.split()[0].upper() == keyword
                   for e in self.extensions if e.split())

    def size_limit(self):
        for e in self.extensions:
            w = e.split()
            if w and w[0].upper() == "SIZE" and len(w) > 1 and w[1].isdigit():
                return int(w[1]) or None
        return None


class Transaction:
    """One mail transaction as the hop saw it (from an accepted MAIL on).

      conn         connection number (0-based)
      number       order among transactions that reached the end of data,
                   over the hop's life (0-based); None before that
      helo         the EHLO/HELO/LHLO argument of the session
      mail_from    reverse path without <>;  mail_params  list of "K=V"
      rcpts        accepted recipients: [(addr, [params])]
      rejected     [(addr, [params], reply text)]
      method       "DATA" or "BDAT" (None before the data phase)
      body         the message: DATA dot-unstuffed, without the final
                   ".\\r\\n"; BDAT the chunks concatenated
      chunks       sizes of the BDAT chunks
      complete     the end of data was read (final dot / BDAT LAST)
      replies      reply lines sent after the end of data (LMTP: one per
                   recipient, those sent before a cut-off)
      oversize     more than MAX_BODY bytes came; body holds the first ones
    """

    def __init__(self, conn, helo, mail_from, mail_params):
        self.conn = conn
        self.number = None
        self.helo = helo
        self.mail_from = mail_from
        self.mail_params = mail_params
        self.rcpts = []
        self.rejected = []
        self.method = None
        self.body = b""
        self.chunks = []
        self.complete = False
        self.replies = []
        self.oversize = False

    def __repr__(self):
        return (f"<Transaction conn={self.conn} n={self.number} "
                f"from={self.mail_from!r} rcpts={self.rcpts} "
                f"{self.method} {len(self.body)}B "
                f"{'complete' if self.complete else 'incomplete'} "
                f"replies={self.replies}>")


class _Gone(Exception):
    """The session is over (client left, hop stopping, or our action)."""


MAX_LINE = 4096        # command line; longer ones get 500
MAX_BODY = 64 << 20    # body bytes kept per transaction
_RECV_POLL = 0.2


class Session:
    """One connection of a ScriptedHop; what reply callables receive.

      conn      connection number (0-based, in accept order)
      peer      the client's address
      helo      EHLO/HELO/LHLO argument (None before)
      txn       the current Transaction (None outside one)
      commands  command lines received (cut at 200 chars)
      pipelined commands that arrived before the reply to the previous one
                was sent (the client pipelined; RFC 2920)
      hop       the ScriptedHop
    """

    def __init__(self, hop, conn, sock, peer, script):
        self.hop = hop
        self.conn = conn
        self.sock = sock
        self.peer = peer
        self.script = script
        self.helo = None
        self.txn = None
        self.commands = []
        self.pipelined = 0
        self.end = None      # why the session ended
        self._buf = bytearray()
        self._pos = 0
        self._bdat = False   # a BDAT transfer is in progress
        self._reset = False

    # -- I/O
    def _recv(self):
        idle = 0.0
        while True:
            if self.hop._stopping.is_set():
                raise _Gone("hop stopped")
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                idle += _RECV_POLL
                if idle >= self.hop.idle_timeout:
                    self._send_line("421 4.4.2 idle timeout")
                    raise _Gone("idle timeout")
                continue
            except OSError as e:
                raise _Gone(f"recv: {e}")
            if not chunk:
                raise _Gone("client closed")
            return chunk

    def _fill(self):
        if self._pos > 65536:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += self._recv()

    def _pending(self):
        return len(self._buf) - self._pos

    def _readline(self):
        """One command line without its line end; None if over MAX_LINE
        (the rest of it is dropped)."""
        while True:
            i = self._buf.find(b"\n", self._pos)
            if i >= 0:
                line = bytes(self._buf[self._pos:i])
                self._pos = i + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                return line if len(line) <= MAX_LINE else None
            if self._pending() > MAX_LINE + 2:
                # drop the overlong line up to its end
                while True:
                    self._pos = len(self._buf)
                    self._fill()
                    i = self._buf.find(b"\n", self._pos)
                    if i >= 0:
                        self._pos = i + 1
                        return None
            self._fill()

    def _send(self, data):
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise _Gone(f"send: {e}")

    def _send_line(self, text):
        try:
            self.sock.sendall(text.encode("utf-8", "surrogateescape") + CRLF)
        except OSError:
            pass

    # -- replies
    def _do(self, spec, default, *args, record=None):
        """Carry out one reply spec; returns the reply code sent (None if
        there was none), raises _Gone for actions that end the session.
        What is sent is appended to record first (so a client that got
        the reply finds it recorded)."""
        while True:
            if spec is None:
                spec = default
            if isinstance(spec, Delay):
                if self.hop._stopping.wait(spec.seconds):
                    raise _Gone("hop stopped")
                spec = spec.reply
                continue
            if callable(spec) and not isinstance(spec, (_Action, Raw)):
                spec = spec(self, *args)
                if spec is None:
                    spec = default
                continue
            break
        self.hop._note(self.conn, ">", repr(spec) if not isinstance(
            spec, str) else spec)
        if spec is HANG:
            self._hang()
        if spec is CLOSE:
            raise _Gone("closed by script")
        if spec is RESET:
            self._reset = True
            raise _Gone("reset by script")
        if spec is GARBAGE:
            data = GARBAGE_BYTES
        elif isinstance(spec, Raw):
            data = spec.data
        else:
            data = b"".join(line.rstrip("\r").encode("utf-8",
                                                     "surrogateescape") + CRLF
                            for line in str(spec).split("\n"))
        if record is not None:
            with self.hop._cond:
                record.append(data.decode("utf-8", "replace").rstrip("\r\n"))
                self.hop._cond.notify_all()
        self._send(data)
        if spec is GARBAGE:
            return None
        head = data[:3]
        return int(head) if head.isdigit() else None

    def _hang(self):
        """Never answer: read and drop until the client leaves, the hop
        stops or the idle timeout (then the connection just closes)."""
        self.hop._note(self.conn, "=", "hanging")
        deadline = time.monotonic() + self.hop.idle_timeout
        while time.monotonic() < deadline:
            if self.hop._stopping.is_set():
                raise _Gone("hop stopped while hanging")
            try:
                if not self.sock.recv(65536):
                    raise _Gone("client closed while we hung")
            except socket.timeout:
                continue
            except OSError as e:
                raise _Gone(f"recv while hanging: {e}")
        raise _Gone("hang ended by idle timeout")

    # -- the protocol
    def run(self):
        sc = self.script
        self._reset = False
        try:
            self._do(sc.greeting, f"220 {sc.name} ESMTP scripted hop")
            while True:
                line = self._readline()
                if line is None:
                    self.hop._note(self.conn, "<", "(overlong line)")
                    self._do(None, "500 5.5.2 Line too long")
                    continue
                text = line.decode("utf-8", "surrogateescape")
                if len(self.commands) < 10000:
                    self.commands.append(text[:200])
                self.hop._note(self.conn, "<", text)
                # (a BDAT chunk follows its command by design)
                if self._pending() > 0 and text[:4].upper() != "BDAT":
                    self.pipelined += 1
                if not self._command(text):
                    break
            self.end = "quit"
        except _Gone as e:
            self.end = str(e)
            self.hop._note(self.conn, "=", f"end: {e}")
        finally:
            try:
                if self._reset:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.sock.close()
            except OSError:
                pass

    def _command(self, text):
        """Handle one command line; False after QUIT."""
        sc = self.script
        lmtp = self.hop.lmtp
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb in ("EHLO", "LHLO"):
            if (verb == "LHLO") != lmtp:
                self._do(None, "500 5.5.1 Command unrecognized: "
                         f"{'LMTP needs LHLO' if lmtp else 'LHLO is LMTP'}")
                return True
            self._abort_txn()
            lines = [sc.name] + list(sc.extensions)
            default = "\n".join(
                ("250 " if i == len(lines) - 1 else "250-") + l
                for i, l in enumerate(lines))
            if self._do(sc.ehlo, default) == 250:
                self.helo = arg.strip()
        elif verb == "HELO":
            if lmtp:
                self._do(None, "500 5.5.1 LMTP needs LHLO")
                return True
            self._abort_txn()
            if self._do(sc.helo, f"250 {sc.name}") == 250:
                self.helo = arg.strip()
        elif verb == "MAIL":
            self._mail(arg)
        elif verb == "RCPT":
            self._rcpt(arg)
        elif verb == "DATA":
            self._data(arg)
        elif verb == "BDAT":
            self._bdat_cmd(arg)
        elif verb == "RSET":
            self._abort_txn()
            self._do(sc.rset, "250 2.0.0 Ok")
        elif verb == "NOOP":
            self._do(sc.noop, "250 2.0.0 Ok")
        elif verb == "VRFY":
            self._do(None, "252 2.0.0 Cannot VRFY, send some mail")
        elif verb == "QUIT":
            self._do(sc.quit, "221 2.0.0 Bye")
            return False
        else:
            self._do(None, "500 5.5.2 Command unrecognized")
        return True

    def _abort_txn(self):
        self.txn = None
        self._bdat = False

    _PATH = re.compile(r"^(?:FROM|TO):\s*<([^>]*)>(.*)$", re.I | re.S)

    def _path(self, arg):
        m = self._PATH.match(arg.strip())
        if not m:
            return None, None
        return m.group(1), m.group(2).split()

    def _check_params(self, params, allowed):
        """The strict default: None if every parameter is allowed by an
        advertised extension, else the rejection."""
        sc = self.script
        for p in params:
            k, _, v = p.partition("=")
            k = k.upper()
            need = allowed.get(k)
            if k == "BODY":
                need = {"7BIT": None, "8BITMIME": "8BITMIME",
                        "BINARYMIME": "BINARYMIME"}.get(v.upper(), "?")
                if need is None:
                    continue
            if need is None or need == "?" or not sc.has(need):
                return f"555 5.5.4 Unsupported parameter {p}"
            if k == "SIZE":
                if not v.isdigit():
                    return f"501 5.5.4 Bad SIZE {v}"
                lim = sc.size_limit()
                if lim and int(v) > lim:
                    return "552 5.3.4 Message size exceeds fixed limit"
        return None

    def _mail(self, arg):
        sc = self.script
        if self.txn is not None:
            self._do(None, "503 5.5.1 Error: nested MAIL command")
            return
        addr, params = self._path(arg)
        if addr is None:
            self._do(None, "501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        default = "250 2.1.0 Ok"
        if sc.strict:
            bad = self._check_params(params, {
                "SIZE": "SIZE", "BODY": "", "SMTPUTF8": "SMTPUTF8",
                "RET": "DSN", "ENVID": "DSN"})
            if bad is None and not addr.isascii() and not any(
                    p.upper() == "SMTPUTF8" for p in params):
                bad = "553 5.6.7 Non-ASCII address needs SMTPUTF8"
            default = bad or default
        code = self._do(sc.mail, default, addr, params)
        if code is not None and 200 <= code < 300:
            self.txn = Transaction(self.conn, self.helo, addr, params)
            self.hop._add(self.txn)

    def _rcpt(self, arg):
        sc = self.script
        if self.txn is None:
            self._do(None, "503 5.5.1 Error: need MAIL command")
            return
        addr, params = self._path(arg)
        if addr is None:
            self._do(None, "501 5.5.4 Syntax: RCPT TO:<address>")
            return
        default = "250 2.1.5 Ok"
        if sc.strict:
            bad = self._check_params(params, {"NOTIFY": "DSN",
                                              "ORCPT": "DSN"})
            smtputf8 = any(p.upper() == "SMTPUTF8"
                           for p in self.txn.mail_params)
            if bad is None and not addr.isascii() and not smtputf8:
                bad = "553 5.6.7 Non-ASCII address needs SMTPUTF8"
            default = bad or default
        spec = sc.rcpt
        if isinstance(spec, dict):
            spec = {k.lower(): v for k, v in spec.items()}.get(addr.lower())
        code = self._do(spec, default, addr, params)
        with self.hop._cond:
            if code is not None and 200 <= code < 300:
                self.txn.rcpts.append((addr, params))
            else:
                self.txn.rejected.append((addr, params, code))

    def _data(self, arg):
        sc = self.script
        if self.txn is None or self._bdat:
            self._do(None, "503 5.5.1 Error: need MAIL command"
                     if self.txn is None else "503 5.5.1 DATA after BDAT")
            return
        if not self.txn.rcpts:
            self._do(None, "554 5.5.1 Error: no valid recipients")
            return
        if self._do(sc.data, "354 End data with <CR><LF>.<CR><LF>") != 354:
            return
        txn = self.txn
        txn.method = "DATA"
        body = bytearray()
        wire = 0
        at_start = True
        limit = sc.close_mid_data
        while True:
            i = self._buf.find(CRLF, self._pos)
            if i < 0:
                n = self._pending()
                if n > 65536:
                    # a long line: take it in pieces, keeping a final CR
                    # that may start the CRLF
                    end = len(self._buf) - (1 if self._buf.endswith(b"\r")
                                            else 0)
                    piece = bytes(self._buf[self._pos:end])
                    self._pos = end
                    wire += len(piece)
                    if at_start and piece.startswith(b"."):
                        piece = piece[1:]
                    self._keep(txn, body, piece)
                    at_start = False
                    if limit is not None and wire >= limit:
                        self._mid_data(txn, body)
                    continue
                try:
                    self._fill()
                except _Gone:
                    txn.body = bytes(body)
                    raise
                continue
            line = bytes(self._buf[self._pos:i + 2])
            self._pos = i + 2
            wire += len(line)
            if at_start and line == b".\r\n":
                break
            if at_start and line.startswith(b"."):
                line = line[1:]  # RFC 5321 4.5.2
            at_start = True
            self._keep(txn, body, line)
            if limit is not None and wire >= limit:
                self._mid_data(txn, body)
        txn.body = bytes(body)
        self._end_of_data(txn)

    def _keep(self, txn, body, data):
        room = MAX_BODY - len(body)
        if len(data) > room:
            txn.oversize = True
            data = data[:max(room, 0)]
        body += data

    def _mid_data(self, txn, body):
        txn.body = bytes(body)
        self.hop._note(self.conn, "=", f"mid-data fault after "
                       f"{len(body)} bytes")
        self._do(self.script.mid_data, CLOSE)
        raise _Gone("mid-data action ended the session")

    def _bdat_cmd(self, arg):
        sc = self.script
        if not sc.has("CHUNKING"):
            self._do(None, "500 5.5.1 Command unrecognized: BDAT")
            return
        words = arg.split()
        if not words or not words[0].isdigit() or len(words) > 2 or (
                len(words) == 2 and words[1].upper() != "LAST"):
            self._do(None, "501 5.5.4 Syntax: BDAT size [LAST]")
            return
        size = int(words[0])
        last = len(words) == 2
        txn = self.txn if self.txn is not None and self.txn.rcpts else None
        if txn is not None and txn.method == "DATA":
            txn = None
        body = bytearray(txn.body) if txn is not None else None
        if txn is not None:
            txn.method = "BDAT"
            self._bdat = True
        # RFC 3030 2: the chunk is read even when the command is refused
        limit = sc.close_mid_data
        done_before = sum(txn.chunks) if txn is not None else 0
        left = size
        got = 0
        while left > 0:
            if self._pending() == 0:
                try:
                    self._fill()
                except _Gone:
                    if txn is not None:
                        txn.body = bytes(body)
                    raise
            n = min(left, self._pending())
            if limit is not None and txn is not None:
                n = min(n, max(limit - done_before - got, 1))
            piece = bytes(self._buf[self._pos:self._pos + n])
            self._pos += n
            left -= n
            got += n
            if txn is not None:
                self._keep(txn, body, piece)
                if limit is not None and done_before + got >= limit:
                    self._mid_data(txn, body)
        if txn is None:
            self._do(None, "503 5.5.1 Error: need MAIL and RCPT"
                     if self.txn is None or not self.txn.rcpts else
                     "503 5.5.1 BDAT after DATA")
            return
        txn.chunks.append(size)
        txn.body = bytes(body)
        if not last:
            self._do(sc.bdat, f"250 2.0.0 {size} octets received")
            return
        self._bdat = False
        self._end_of_data(txn)

    def _end_of_data(self, txn):
        """The final reply (LMTP: replies). session.txn stays the ended
        transaction while the dot rules run, then the session is back to
        "no transaction" whatever was answered (RFC 5321 4.1.1.4)."""
        sc = self.script
        self.hop._finish(txn)
        self._bdat = False
        lim = sc.size_limit() if sc.strict else None
        big = txn.oversize or (lim is not None and len(txn.body) > lim)
        try:
            if not self.hop.lmtp:
                default = ("552 5.3.4 Message too big" if big else
                           f"250 2.0.0 Ok: queued as H{txn.number:08X}")
                self._final(txn, sc.dot, default)
                return
            for addr, _ in list(txn.rcpts):
                spec = sc.dot
                if isinstance(spec, dict):
                    spec = {k.lower(): v for k, v in spec.items()}.get(
                        addr.lower())
                default = (f"552 5.3.4 <{addr}> Message too big" if big
                           else f"250 2.0.0 <{addr}> delivered")
                self._final(txn, spec, default, addr)
        finally:
            self.txn = None

    def _final(self, txn, spec, default, *args):
        """One reply after the end of data, recorded in txn.replies."""
        self._do(spec, default, *args, record=txn.replies)


class ScriptedHop:
    """A scripted SMTP or LMTP server in Python (threads and sockets) for
    the next-hop faults real servers cannot be told to produce.

    ScriptedHop(port=None, script=None, lmtp=False, host="127.0.0.1",
                unix=False, idle_timeout=300)
      script   a Script (see its docstring for every knob), a list of
               Scripts (connection i uses script[i], the last one repeats),
               or a callable(conn_number) -> Script. None: Script().
      lmtp     speak LMTP (LHLO; per-recipient replies after the data)
      host     "127.0.0.1" or "::1" (target "smtp:[::1]:PORT")
      unix     listen on TMP/hop.sock instead (LMTP only)
    It binds before the constructor returns (port 0 when None: no race),
    then serves each connection in its own thread.

    Recorded, all thread-safe to read:
      transactions   every Transaction (see its docstring), in MAIL order
      completed()    the ones that reached the end of data
      sessions       every Session (commands, pipelined, helo, end)
      connections    number of connections accepted
      wait_for(n, timeout)            until n transactions completed
      wait_connections(n, timeout)    until n connections were accepted
      log()          the transcript ("<" read, ">" sent, "=" events)
    stop() closes the listener and every connection and joins the threads;
    it is idempotent and also runs at __exit__ and at interpreter exit.
    """
    kind = "scripted-hop"

    def __init__(self, port=None, script=None, lmtp=False, host="127.0.0.1",
                 unix=False, idle_timeout=300.0):
        _sigterm_to_exit()
        if unix and not lmtp:
            raise ValueError("ScriptedHop: a unix socket needs lmtp=True")
        self.lmtp = lmtp
        self.script = script if script is not None else Script()
        self.idle_timeout = idle_timeout
        self.tmp = None
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._stopped = False
        self._transactions = []
        self._sessions = []
        self._threads = []
        self._socks = set()
        self._transcript = []
        self._done = 0
        self.connections = 0
        proto = "lmtp" if lmtp else "smtp"
        if unix:
            self.tmp = tempfile.mkdtemp(prefix="fdpeer-hop-")
            self.unix_path = os.path.join(self.tmp, "hop.sock")
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(self.unix_path)
            self.port = None
            self.target = f"lmtp:unix:{self.unix_path}"
        else:
            self.unix_path = None
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.listener = socket.socket(fam, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,
                                     1)
            try:
                self.listener.bind((host, port or 0))
            except OSError:
                self.listener.close()
                raise
            self.port = self.listener.getsockname()[1]
            self.host = host
            self.target = (f"{proto}:[{host}]:{self.port}" if ":" in host
                           else f"{proto}:{host}:{self.port}")
        try:
            self.listener.listen(128)
        except OSError:
            self.listener.close()
            raise
        self.listener.settimeout(_RECV_POLL)
        self._acceptor = threading.Thread(target=self._accept_loop,
                                          name="scripted-hop-accept",
                                          daemon=True)
        self._acceptor.start()
        atexit.register(self.stop)

    @property
    def addr(self):
        return (getattr(self, "host", "127.0.0.1"), self.port)

    # -- recording
    def _note(self, conn, direction, text):
        with self._cond:
            if len(self._transcript) < 100000:
                self._transcript.append(f"{conn} {direction} {text[:300]}")

    def _add(self, txn):
        with self._cond:
            self._transactions.append(txn)
            self._cond.notify_all()

    def _finish(self, txn):
        with self._cond:
            txn.number = self._done
            self._done += 1
            txn.complete = True
            self._cond.notify_all()

    @property
    def transactions(self):
        with self._cond:
            return list(self._transactions)

    def completed(self):
        with self._cond:
            return [t for t in self._transactions if t.complete]

    @property
    def sessions(self):
        with self._cond:
            return list(self._sessions)

    def wait_for(self, count, timeout=20.0):
        """Wait until count transactions reached the end of data; returns
        completed() as it is then (the caller checks the length)."""
        with self._cond:
            self._cond.wait_for(lambda: self._done >= count, timeout)
        return self.completed()

    def wait_connections(self, n, timeout=20.0):
        with self._cond:
            self._cond.wait_for(lambda: self.connections >= n, timeout)
            return self.connections

    def log(self):
        with self._cond:
            return "\n".join(self._transcript) + "\n"

    # -- serving
    def _script_for(self, n):
        s = self.script
        if isinstance(s, (list, tuple)):
            return s[min(n, len(s) - 1)]
        if callable(s) and not isinstance(s, Script):
            return s(n)
        return s

    def _accept_loop(self):
        while not self._stopping.is_set():
            try:
                sock, peer = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(_RECV_POLL)
            with self._cond:
                n = self.connections
                self.connections += 1
                self._socks.add(sock)
                try:
                    script = self._script_for(n)
                except Exception as e:  # a broken script must not kill us
                    self._transcript.append(f"{n} = script error {e!r}")
                    script = Script()
                sess = Session(self, n, sock, peer, script)
                self._sessions.append(sess)
                t = threading.Thread(target=self._serve, args=(sess,),
                                     name=f"scripted-hop-{n}", daemon=True)
                self._threads.append(t)
                self._cond.notify_all()
            self._note(n, "=", f"connect from {peer}")
            t.start()

    def _serve(self, sess):
        try:
            sess.run()
        except Exception as e:  # a bug or a callable that raised
            self._note(sess.conn, "=", f"session error {e!r}")
            sess.end = f"error {e!r}"
            try:
                sess.sock.close()
            except OSError:
                pass
        finally:
            with self._cond:
                self._socks.discard(sess.sock)
                self._cond.notify_all()

    def stop(self):
        """Close the listener and every connection, join the threads."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        try:
            self.listener.close()
        except OSError:
            pass
        self._acceptor.join(5)
        with self._cond:
            socks = list(self._socks)
            threads = list(self._threads)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(5)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    close = stop

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        failed = exc_type is not None and exc_type is not SystemExit
        if exc_type is SystemExit and exc is not None and exc.code not in (
                0, None, 77):
            failed = True
        self.stop()
        if failed:
            print("---- scripted hop transcript (tail) ----")
            print(self.log()[-4000:])
        return False
