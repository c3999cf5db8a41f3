/* The floor for the shim: a minimal C client of brokerd's socket protocol (docs/architecture.md).
 *
 * Same request as client_shim/protocol.py (magic, N<program>, A<arg>..., forwarded E<NAME>=<value>, T<tty>, then an
 * empty field), same reply handling for the lines a cached token produces (M -> stderr, O -> stdout, X -> exit
 * code).  No prompts, no autostart: this only measures the cost of a process that talks to the socket.
 * Socket path: $BROKERD_SOCKET (the benchmark always sets it).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* BROKERD_MAGIC and BROKERD_FORWARDED come from client_shim/protocol.py (bench/rig.py passes them with -D). */
static const char *FORWARDED[] = {BROKERD_FORWARDED};

static char req[65536];
static size_t len;

static int put(char tag, const char *a, const char *b) {
    size_t la = strlen(a), lb = b ? strlen(b) : 0;
    if (len + la + lb + 4 > sizeof req) return -1;
    if (tag) req[len++] = tag;
    memcpy(req + len, a, la), len += la;
    if (b) req[len++] = '=', memcpy(req + len, b, lb), len += lb;
    req[len++] = '\0';
    return 0;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w <= 0) return -1;
        p += w, n -= (size_t)w;
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *path = getenv("BROKERD_SOCKET");
    if (!path || strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) return 3;
    if (put(0, BROKERD_MAGIC, NULL) || put('N', "kubectl-oidc_login", NULL)) return 3;
    for (int i = 1; i < argc; i++)
        if (put('A', argv[i], NULL)) return 3;
    for (size_t i = 0; i < sizeof FORWARDED / sizeof *FORWARDED; i++) {
        const char *v = getenv(FORWARDED[i]);
        if (v && put('E', FORWARDED[i], v)) return 3;
    }
    if (put('T', isatty(0) ? "1" : "0", NULL)) return 3;
    req[len++] = '\0';

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strcpy(sa.sun_path, path);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || write_all(fd, req, len)) return 3;

    static char buf[1 << 20];
    size_t have = 0, start = 0;
    for (;;) {
        char *nl = memchr(buf + start, '\n', have - start);
        if (!nl) {
            if (have == sizeof buf) return 3;
            ssize_t r = read(fd, buf + have, sizeof buf - have);
            if (r <= 0) return 3;
            have += (size_t)r;
            continue;
        }
        char *line = buf + start;
        size_t n = (size_t)(nl - line);
        start += n + 1;
        if (line[0] == 'O') return write_all(1, line + 1, n) ? 3 : 0;
        if (line[0] == 'M') { write_all(2, line + 1, n); continue; }
        if (line[0] == 'X') { write_all(2, line + 1, n); return 1; }
        return 3;
    }
}
