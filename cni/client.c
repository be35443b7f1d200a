/* netagent CNI client: the `netagent` executable that runtimes exec once per container and verb.
 *
 * Starting Python costs ~7 ms before the plugin's first line runs; this client starts in well
 * under 1 ms and hands the call to a warm server (cni/server.py) that forks a child running
 * cni.plugin.main() with our environment, our stdin/stdout/stderr and our network namespace.
 *
 * Protocol (cni/server.py has the full description; every server answer is one 4-byte word):
 *   connect; server says HELLO "NAH1" (or REFUSE "NAR1"); we send the header "NAQ1", flags,
 *   umask, env length, then the environment as NUL-terminated K=V entries, with fds 0, 1, 2,
 *   our netns and our working directory attached (SCM_RIGHTS); server says ACK "NAA1" just
 *   before it forks the child; the status word follows: 'X' exit code, 'K' killed by a signal,
 *   'F' not run.
 *
 * Safety: until ACK nothing has read our stdin or touched the system, so any failure before it
 * (no socket, refused, server gone, no HELLO in time, 'F') runs the Python launcher instead: ADD
 * never depends on the server being up. After ACK the call may be half done, so we never run it
 * again: a lost status becomes CNI error 11 ("try again later") on stdout; the runtime then
 * runs DEL and retries, as for any failed ADD.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef NETAGENT_CNI_SOCKET
#define NETAGENT_CNI_SOCKET "/run/netagent/cni.sock"
#endif
#ifndef NETAGENT_LAUNCHER
#define NETAGENT_LAUNCHER "/opt/cni/bin/netagent.py"
#endif
#define DEFAULT_TIMEOUT_MS 5000 /* HELLO and ACK; the plugin itself has its own deadline */
#define MAX_ENV (1 << 20)       /* the server refuses more */
#define HDR 16

extern char **environ;

/* Append `s` to `out` as JSON string content (quotes, backslashes, control bytes escaped). */
static size_t json_escape(char *out, size_t n, size_t cap, const char *s)
{
    for (; *s && n + 7 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[n++] = '\\';
            out[n++] = (char)c;
        } else if (c < 0x20) {
            n += (size_t)snprintf(out + n, cap - n, "\\u%04x", c);
        } else {
            out[n++] = (char)c;
        }
    }
    return n;
}

/* A CNI error object on stdout (where libcni reads it), then exit 1. */
static void fail(int code, const char *msg, const char *details)
{
    char buf[2048];
    size_t n = (size_t)snprintf(buf, sizeof buf, "{\"code\":%d,\"msg\":\"", code);
    n = json_escape(buf, n, sizeof buf - 32, msg);
    n += (size_t)snprintf(buf + n, sizeof buf - n, "\",\"details\":\"");
    n = json_escape(buf, n, sizeof buf - 8, details);
    n += (size_t)snprintf(buf + n, sizeof buf - n, "\"}");
    for (size_t off = 0; off < n;) {
        ssize_t w = write(1, buf + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        off += (size_t)w;
    }
    exit(1);
}

/* Nothing was handed over: run the plugin ourselves, exactly as before there was a server. */
static void fallback(int sock, char **argv)
{
    char details[512];
    char *bare[] = {(char *)NETAGENT_LAUNCHER, NULL};
    if (sock >= 0)
        close(sock);
    if (argv[0] == NULL) /* argc 0: what follows argv is envp, not arguments */
        argv = bare;
    argv[0] = (char *)NETAGENT_LAUNCHER;
    execv(NETAGENT_LAUNCHER, argv);
    snprintf(details, sizeof details, "execv %s: %s", NETAGENT_LAUNCHER, strerror(errno));
    fail(11, "netagent: CNI server unavailable and the Python launcher cannot run", details);
}

/* 1: got 4 bytes; 0: EOF or error (errno says which, 0 for EOF). */
static int read_word(int s, unsigned char w[4])
{
    size_t got = 0;
    while (got < 4) {
        ssize_t r = recv(s, w + got, 4 - got, 0);
        if (r > 0) {
            got += (size_t)r;
        } else if (r == 0) {
            errno = 0;
            return 0;
        } else if (errno != EINTR) {
            return 0;
        }
    }
    return 1;
}

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

int main(int argc, char **argv)
{
    (void)argc;
    /* fds 0-2 travel to the server, so they must be open (a runtime may close stdin) */
    for (int fd = 0; fd < 3; fd++) {
        if (fcntl(fd, F_GETFD) < 0 && errno == EBADF && open("/dev/null", O_RDWR) != fd)
            fail(11, "netagent: cannot open /dev/null for a closed standard fd", strerror(errno));
    }
    const char *path = getenv("NETAGENT_CNI_SOCKET");
    if (path == NULL || *path == '\0')
        path = NETAGENT_CNI_SOCKET;
    long timeout_ms = DEFAULT_TIMEOUT_MS;
    const char *t = getenv("NETAGENT_CNI_CONNECT_TIMEOUT_MS");
    if (t != NULL && *t != '\0') {
        char *end;
        long v = strtol(t, &end, 10);
        if (*end == '\0' && v > 0 && v < 3600000)
            timeout_ms = v;
    }

    /* the request: header + every environment entry, NUL-terminated */
    size_t env_len = 0;
    for (char **e = environ; *e != NULL; e++) {
        env_len += strlen(*e) + 1;
        if (env_len > MAX_ENV)
            fallback(-1, argv);
    }
    unsigned char *req = malloc(HDR + env_len);
    if (req == NULL)
        fallback(-1, argv);
    size_t off = HDR;
    for (char **e = environ; *e != NULL; e++) {
        size_t l = strlen(*e) + 1;
        memcpy(req + off, *e, l);
        off += l;
    }
    mode_t mask = umask(0);
    umask(mask);
    int fds[5] = {0, 1, 2, -1, -1}, nfds = 3;
    uint32_t flags = 0;
    int netns = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (netns >= 0) {
        fds[nfds++] = netns;
        flags |= 1;
    }
    int cwd = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (cwd >= 0) {
        fds[nfds++] = cwd;
        flags |= 2;
    }
    memcpy(req, "NAQ1", 4);
    put32(req + 4, flags);
    put32(req + 8, (uint32_t)mask);
    put32(req + 12, (uint32_t)env_len);

    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sa.sun_path)
        fallback(-1, argv);
    strcpy(sa.sun_path, path);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        fallback(-1, argv);
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    /* SO_SNDTIMEO also bounds connect() when the server's listen backlog is full */
    if (setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 ||
        setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
        fallback(s, argv);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0)
        fallback(s, argv);
    unsigned char w[4];
    if (!read_word(s, w))
        fallback(s, argv); /* no HELLO in time, or the server went away: nothing handed over */
    if (memcmp(w, "NAR1", 4) == 0) {
        fprintf(stderr, "netagent-cni: the CNI server at %s refused this uid %u; running the "
                        "plugin directly\n", path, (unsigned)getuid());
        fallback(s, argv);
    }
    if (memcmp(w, "NAH1", 4) != 0)
        fallback(s, argv);

    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof fds)];
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = {req, HDR + env_len};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    size_t sent = 0, total = HDR + env_len;
    while (sent < total) {
        ssize_t r = sendmsg(s, &msg, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            fallback(s, argv); /* the server acts only on a whole request */
        sent += (size_t)r;
        iov.iov_base = req + sent; /* the fds went with the first bytes */
        iov.iov_len = total - sent;
        msg.msg_control = NULL;
        msg.msg_controllen = 0;
    }
    if (netns >= 0)
        close(netns);
    if (cwd >= 0)
        close(cwd);
    free(req);

    if (!read_word(s, w)) {
        if (errno == 0)
            fallback(s, argv); /* closed without ACK: the server dropped the request unread */
        /* no ACK in time: the server may still take it, so do not run it here as well */
        fail(11, "netagent: the CNI server did not take the request in time", strerror(errno));
    }
    if (memcmp(w, "NAA1", 4) != 0)
        fail(11, "netagent: unexpected answer from the CNI server", path);
    struct timeval none = {0, 0}; /* from here the plugin's own deadline bounds the call */
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
    if (!read_word(s, w))
        fail(11, "netagent: the CNI server went away while running the request",
             "the call may be partly done; it was not retried");
    if (w[0] == 'X')
        return w[1];
    if (w[0] == 'F')
        fallback(s, argv); /* taken but never started: nothing ran */
    if (w[0] == 'K') {
        char details[64];
        snprintf(details, sizeof details, "signal %u", (unsigned)w[1]);
        fail(11, "netagent: the plugin process was killed", details);
    }
    fail(11, "netagent: unexpected status from the CNI server", path);
    return 1;
}
