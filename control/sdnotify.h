/*
 * The service manager's readiness protocol (systemd's sd_notify, done here
 * without libsystemd): one datagram of "KEY=VALUE" lines to the unix
 * socket named by $NOTIFY_SOCKET (a path, or "@name" in the abstract
 * namespace). Without $NOTIFY_SOCKET every call does nothing, so the
 * daemon behaves the same outside systemd.
 *
 * finaldot sends READY=1 once every worker listens, RELOADING=1 (with
 * MONOTONIC_USEC, as Type=notify-reload asks) when a reload is asked for
 * and READY=1 when it is done, and STOPPING=1 when it starts to stop.
 * Safe from any thread; not async-signal-safe (it formats).
 */
#ifndef FINALDOT_CONTROL_SDNOTIFY_H
#define FINALDOT_CONTROL_SDNOTIFY_H

/* Send state ("READY=1\nSTATUS=..."). 0 sent, 1 no $NOTIFY_SOCKET, or
 * -errno (logged once by the caller if it cares). */
int sdnotify(const char *state);
/* "RELOADING=1" with MONOTONIC_USEC=now. */
int sdnotify_reloading(void);

#endif
