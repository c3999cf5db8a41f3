/* Load generator for the socket benchmark: keeps CONCURRENCY requests in flight, each on a new connection (the
 * shim's pattern), for SECONDS or MAX requests, whichever comes first, and prints one JSON line of results.
 *
 *   loadgen SOCKET_PATH CONCURRENCY SECONDS MAX < request-bytes
 *
 * The request (which holds a client secret) comes on stdin, never argv.  One thread and epoll, so the generator
 * uses at most one core and little of it per request; its own CPU time is reported so the reader can check that it
 * was not the bottleneck.  A request is done when a line starting with 'O' (success) or 'X' (error) has arrived;
 * latency runs from socket() to that line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

struct conn {
    int fd;
    uint64_t t0;
    size_t sent, got;
    char buf[8192];
};

static char *request;
static size_t request_len;
static struct sockaddr_un addr;
static uint32_t *lat_us;
static size_t done, errors, max_req, started, connect_retries, reply_bytes;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Open a connection and send as much of the request as the socket takes; 0 on success. */
static int start(int ep, struct conn *c) {
    for (int attempt = 0; attempt < 1000; attempt++) {
        c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0) return -1;
        c->t0 = now_ns();
        if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) == 0) break;
        close(c->fd);
        c->fd = -1;
        if (errno != EAGAIN) return -1;
        connect_retries++; /* listen backlog full: the server is behind; back off a little */
        struct timespec pause = {0, 100000};
        nanosleep(&pause, NULL);
    }
    if (c->fd < 0) return -1;
    c->sent = c->got = 0;
    ssize_t w = write(c->fd, request, request_len);
    if (w > 0) c->sent = (size_t)w;
    struct epoll_event ev = {.events = c->sent < request_len ? EPOLLOUT : EPOLLIN, .data.ptr = c};
    started++;
    return epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

/* 1 when the request finished (ok or not), 0 when more I/O is needed. */
static int step(int ep, struct conn *c, uint32_t events) {
    if (c->sent < request_len) {
        ssize_t w = write(c->fd, request + c->sent, request_len - c->sent);
        if (w < 0 && errno != EAGAIN) return errors++, 1;
        if (w > 0) c->sent += (size_t)w;
        if (c->sent == request_len) {
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        }
        return 0;
    }
    (void)events;
    for (;;) {
        if (c->got == sizeof c->buf) return errors++, 1;
        ssize_t r = read(c->fd, c->buf + c->got, sizeof c->buf - c->got);
        if (r < 0 && errno == EAGAIN) return 0;
        if (r <= 0) return errors++, 1;
        c->got += (size_t)r;
        size_t line = 0;
        for (size_t i = 0; i < c->got; i++) {
            if (c->buf[i] != '\n') continue;
            char kind = c->buf[line];
            if (kind == 'O' || kind == 'X') {
                if (kind == 'X') errors++;
                else {
                    if (done < max_req) lat_us[done] = (uint32_t)((now_ns() - c->t0) / 1000);
                    done++;
                    reply_bytes = i + 1;
                }
                return 1;
            }
            line = i + 1;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: loadgen SOCKET CONCURRENCY SECONDS MAX < request\n");
        return 2;
    }
    int conc = atoi(argv[2]);
    double seconds = atof(argv[3]);
    max_req = (size_t)atol(argv[4]);
    if (conc < 1 || conc > 4096 || seconds <= 0 || max_req < 1 || strlen(argv[1]) >= sizeof addr.sun_path) return 2;
    addr.sun_family = AF_UNIX;
    strcpy(addr.sun_path, argv[1]);
    size_t cap = 65536;
    request = malloc(cap);
    for (ssize_t r; (r = read(0, request + request_len, cap - request_len)) > 0;)
        if ((request_len += (size_t)r) == cap) return 2;
    lat_us = calloc(max_req, sizeof *lat_us);
    struct conn *conns = calloc((size_t)conc, sizeof *conns);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (!request_len || !lat_us || !conns || ep < 0) return 2;

    uint64_t t_start = now_ns(), deadline = t_start + (uint64_t)(seconds * 1e9);
    uint64_t hard_stop = deadline + 10000000000u; /* in-flight requests get 10 s more, then we give up */
    int inflight = 0;
    for (int i = 0; i < conc; i++) {
        if (start(ep, &conns[i]) == 0) inflight++;
        else errors++, conns[i].fd = -1;
    }
    struct epoll_event evs[256];
    while (inflight > 0 && now_ns() < hard_stop) {
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!step(ep, c, evs[i].events)) continue;
            close(c->fd);
            c->fd = -1;
            inflight--;
            if (now_ns() < deadline && started < max_req) {
                if (start(ep, c) == 0) inflight++;
                else errors++;
            }
        }
    }
    double elapsed = (double)(now_ns() - t_start) / 1e9;
    size_t n = done < max_req ? done : max_req;
    qsort(lat_us, n, sizeof *lat_us, cmp_u32);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    printf("{\"requests\":%zu,\"errors\":%zu,\"unfinished\":%d,\"elapsed\":%.6f,\"p50_us\":%u,\"p99_us\":%u,"
           "\"max_us\":%u,\"cpu_s\":%.6f,\"connect_retries\":%zu,\"reply_bytes\":%zu}\n",
           done, errors, inflight, elapsed, n ? lat_us[n / 2] : 0, n ? lat_us[(size_t)(n * 0.99)] : 0,
           n ? lat_us[n - 1] : 0, cpu, connect_retries, reply_bytes);
    return 0;
}
