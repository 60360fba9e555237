/* Load generator and minimal HTTP server for `scripts/bench datapath`.
 *
 * Built at run time by equilibriumd/lab/bench/datapath.py (cc -O2 -pthread).
 * Every client mode prints exactly one JSON line on stdout; latencies in µs.
 *
 *   loadgen serve [-t THREADS] IP:PORT...
 *       epoll HTTP/1.1 server on each address (port 0 = ephemeral). Prints
 *       {"listen": ["ip:port", ...]} once bound, then serves until SIGTERM.
 *       Answers every request with 200 "ok"; keeps the connection open
 *       unless the request says "Connection: close" (then it closes after
 *       the response), so a proxy in front may pool its server connections.
 *
 *   loadgen connect [-c CGROUP] [-w WARMUP] -n N TARGET[,TARGET...]
 *       N sequential blocking connect()s, round-robin over the targets; each
 *       socket is closed with SO_LINGER {1,0} (RST: no TIME_WAIT pile-up).
 *       Latency = the connect() call alone (SYN → SYN-ACK → ACK on loopback).
 *
 *   loadgen http [-c CGROUP] [-t THREADS] -d SECONDS TARGET[,TARGET...]
 *       THREADS closed loops for SECONDS: connect, send a small GET with
 *       "Connection: close", read the whole response, close with RST.
 *       Latency = connect() to last response byte.
 *
 * -c CGROUP: write our pid to CGROUP/cgroup.procs before doing anything, so
 * every socket (and thread) of the run belongs to that cgroup.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_TARGETS 64

static void die(const char *msg) {
    fprintf(stderr, "loadgen: %s: %s\n", msg, strerror(errno));
    exit(1);
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int parse_addr(const char *s, struct sockaddr_in *a) {
    char ip[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof ip) return -1;
    memcpy(ip, s, colon - s);
    ip[colon - s] = 0;
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)atoi(colon + 1));
    return inet_pton(AF_INET, ip, &a->sin_addr) == 1 ? 0 : -1;
}

static int parse_targets(char *list, struct sockaddr_in *out) {
    int n = 0;
    for (char *tok = strtok(list, ","); tok && n < MAX_TARGETS; tok = strtok(NULL, ",")) {
        if (parse_addr(tok, &out[n]) != 0) {
            fprintf(stderr, "loadgen: bad target %s\n", tok);
            exit(2);
        }
        n++;
    }
    if (n == 0) {
        fprintf(stderr, "loadgen: no target\n");
        exit(2);
    }
    return n;
}

static void join_cgroup(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    FILE *f = fopen(path, "w");
    if (!f) die("open cgroup.procs");
    if (fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0) die("join cgroup");
}

static void rst_close(int fd) {
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

/* ---- samples and percentiles ------------------------------------------- */

struct samples {
    int64_t *v;
    size_t n, cap;
};

static void push(struct samples *s, int64_t x) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 65536;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v) die("realloc");
    }
    s->v[s->n++] = x;
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double pct_us(const struct samples *s, double q) {
    if (!s->n) return 0;
    size_t i = (size_t)(q * (double)s->n);
    if (i >= s->n) i = s->n - 1;
    return s->v[i] / 1e3;
}

/* First errno seen, for the report ("" when none): enough to tell a refused
 * connect from an exhausted port range. */
static int first_errno;
static void note_errno(int e) { __atomic_compare_exchange_n(&first_errno, &(int){0}, e, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED); }

static void print_stats(const char *mode, struct samples *s, long errors, double seconds, const char *extra) {
    qsort(s->v, s->n, sizeof *s->v, cmp64);
    double sum = 0;
    for (size_t i = 0; i < s->n; i++) sum += (double)s->v[i];
    printf("{\"mode\":\"%s\",\"n\":%zu,\"errors\":%ld,\"seconds\":%.4f,\"rps\":%.1f,"
           "\"p50_us\":%.2f,\"p90_us\":%.2f,\"p99_us\":%.2f,\"p999_us\":%.2f,\"mean_us\":%.2f,\"max_us\":%.2f,"
           "\"first_error\":\"%s\"%s}\n",
           mode, s->n, errors, seconds, seconds > 0 ? s->n / seconds : 0.0, pct_us(s, 0.50), pct_us(s, 0.90),
           pct_us(s, 0.99), pct_us(s, 0.999), s->n ? sum / s->n / 1e3 : 0.0, s->n ? s->v[s->n - 1] / 1e3 : 0.0,
           first_errno ? strerrorname_np(first_errno) : "", extra ? extra : "");
    fflush(stdout);
}

/* ---- connect mode --------------------------------------------------------- */

static int run_connect(int n, int warmup, struct sockaddr_in *tg, int ntg) {
    struct samples s = {0};
    long errors = 0;
    int64_t t_start = 0;
    for (int i = -warmup; i < n; i++) {
        if (i == 0) t_start = now_ns();
        struct sockaddr_in *a = &tg[(unsigned)(i + warmup) % ntg];
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) die("socket");
        int64_t t0 = now_ns();
        int r = connect(fd, (struct sockaddr *)a, sizeof *a);
        int64_t t1 = now_ns();
        if (i >= 0) {
            if (r == 0) push(&s, t1 - t0);
            else {
                errors++;
                note_errno(errno);
            }
        }
        rst_close(fd);
    }
    print_stats("connect", &s, errors, (now_ns() - t_start) / 1e9, NULL);
    return 0;
}

/* ---- http client mode ----------------------------------------------------- */

static const char REQUEST[] = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

struct http_thread {
    pthread_t th;
    int id;
    struct sockaddr_in *tg;
    int ntg;
    int64_t start, deadline, end;
    struct samples s;
    long errors;
};

static pthread_barrier_t barrier;

/* One request; returns 0 when a complete 200 response arrived. */
static int one_request(const struct sockaddr_in *a) {
    char buf[4096];
    int ok = -1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct timeval tv = {2, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (const struct sockaddr *)a, sizeof *a) != 0) goto fail;
    if (send(fd, REQUEST, sizeof REQUEST - 1, MSG_NOSIGNAL) != (ssize_t)(sizeof REQUEST - 1)) goto fail;
    size_t got = 0;
    long need = -1; /* total bytes of the response once headers are parsed */
    for (;;) {
        ssize_t r = recv(fd, buf + got, sizeof buf - 1 - got, 0);
        if (r < 0) goto fail;
        if (r == 0) { /* EOF: complete if headers arrived and no length promised more */
            ok = (need < 0 && strstr(buf, "\r\n\r\n")) || (need >= 0 && (long)got >= need) ? 0 : -1;
            break;
        }
        got += (size_t)r;
        buf[got] = 0;
        if (need < 0) {
            char *eoh = strstr(buf, "\r\n\r\n");
            if (eoh) {
                char *cl = strcasestr(buf, "\r\ncontent-length:");
                if (cl && cl < eoh) need = (eoh + 4 - buf) + atol(cl + 17);
            }
        }
        if (need >= 0 && (long)got >= need) {
            ok = 0;
            break;
        }
        if (got >= sizeof buf - 1) goto out; /* our server never sends this much */
    }
    if (ok == 0 && strncmp(buf, "HTTP/1.1 200", 12) != 0 && strncmp(buf, "HTTP/1.0 200", 12) != 0) ok = -1;
    goto out;
fail:
    note_errno(errno);
out:
    rst_close(fd);
    return ok;
}

static void *http_worker(void *arg) {
    struct http_thread *t = arg;
    pthread_barrier_wait(&barrier);
    t->start = now_ns();
    unsigned k = (unsigned)t->id;
    for (;;) {
        int64_t t0 = now_ns();
        if (t0 >= t->deadline) break;
        int r = one_request(&t->tg[k++ % t->ntg]);
        int64_t t1 = now_ns();
        if (r == 0) push(&t->s, t1 - t0);
        else t->errors++;
    }
    t->end = now_ns();
    return NULL;
}

static int run_http(int nthreads, double seconds, struct sockaddr_in *tg, int ntg) {
    struct http_thread *ts = calloc((size_t)nthreads, sizeof *ts);
    if (!ts) die("calloc");
    pthread_barrier_init(&barrier, NULL, (unsigned)nthreads + 1);
    for (int i = 0; i < nthreads; i++) {
        ts[i].id = i;
        ts[i].tg = tg;
        ts[i].ntg = ntg;
        if (pthread_create(&ts[i].th, NULL, http_worker, &ts[i]) != 0) die("pthread_create");
    }
    int64_t start = now_ns();
    int64_t deadline = start + (int64_t)(seconds * 1e9);
    for (int i = 0; i < nthreads; i++) ts[i].deadline = deadline;
    pthread_barrier_wait(&barrier);
    struct samples all = {0};
    long errors = 0;
    int64_t end = start;
    for (int i = 0; i < nthreads; i++) {
        pthread_join(ts[i].th, NULL);
        for (size_t j = 0; j < ts[i].s.n; j++) push(&all, ts[i].s.v[j]);
        errors += ts[i].errors;
        if (ts[i].end > end) end = ts[i].end;
    }
    char extra[64];
    snprintf(extra, sizeof extra, ",\"threads\":%d", nthreads);
    print_stats("http", &all, errors, (end - start) / 1e9, extra);
    return 0;
}

/* ---- server mode ---------------------------------------------------------- */

static const char RESP_KEEP[] = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";
static const char RESP_CLOSE[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

struct conn {
    int fd;       /* -1 marks a listener entry */
    int lfd;
    size_t len;
    char buf[2048];
};

static volatile sig_atomic_t stopping;
static void on_term(int sig) { (void)sig; stopping = 1; }

static struct conn *listeners[MAX_TARGETS];
static int nlisteners;

static void conn_close(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

/* Serve whatever complete requests are buffered; returns -1 when the
 * connection is finished (closed by us). */
static int serve_requests(int ep, struct conn *c) {
    for (;;) {
        c->buf[c->len] = 0;
        char *eoh = strstr(c->buf, "\r\n\r\n");
        if (!eoh) return 0;
        *eoh = 0;
        int close_after = strcasestr(c->buf, "\r\nconnection: close") != NULL;
        const char *resp = close_after ? RESP_CLOSE : RESP_KEEP;
        size_t rlen = close_after ? sizeof RESP_CLOSE - 1 : sizeof RESP_KEEP - 1;
        if (send(c->fd, resp, rlen, MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)rlen || close_after) {
            conn_close(ep, c);
            return -1;
        }
        size_t used = (size_t)(eoh + 4 - c->buf); /* GET requests carry no body */
        memmove(c->buf, c->buf + used, c->len - used);
        c->len -= used;
    }
}

static void *serve_loop(void *arg) {
    (void)arg;
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < nlisteners; i++) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = listeners[i]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, listeners[i]->lfd, &ev) != 0) die("epoll_ctl listener");
    }
    struct epoll_event evs[256];
    while (!stopping) {
        int n = epoll_wait(ep, evs, 256, 200);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->fd < 0) {
                for (;;) {
                    int fd = accept4(c->lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    struct conn *nc = malloc(sizeof *nc);
                    if (!nc) die("malloc");
                    nc->fd = fd;
                    nc->lfd = c->lfd;
                    nc->len = 0;
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = nc};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
                        close(fd);
                        free(nc);
                    }
                }
                continue;
            }
            for (;;) {
                ssize_t r = recv(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len, 0);
                if (r > 0) {
                    c->len += (size_t)r;
                    if (serve_requests(ep, c) < 0) break;
                    if (c->len >= sizeof c->buf - 1) { /* oversized request: drop */
                        conn_close(ep, c);
                        break;
                    }
                    continue;
                }
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
                conn_close(ep, c); /* EOF or reset */
                break;
            }
        }
    }
    return NULL;
}

static int run_serve(int nthreads, char **addrs, int naddrs) {
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    signal(SIGPIPE, SIG_IGN);
    printf("{\"listen\":[");
    for (int i = 0; i < naddrs && i < MAX_TARGETS; i++) {
        struct sockaddr_in a;
        if (parse_addr(addrs[i], &a) != 0) {
            fprintf(stderr, "loadgen: bad address %s\n", addrs[i]);
            return 2;
        }
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0) die("bind");
        if (listen(fd, 4096) != 0) die("listen");
        socklen_t al = sizeof a;
        getsockname(fd, (struct sockaddr *)&a, &al);
        char ip[32];
        inet_ntop(AF_INET, &a.sin_addr, ip, sizeof ip);
        printf("%s\"%s:%d\"", i ? "," : "", ip, ntohs(a.sin_port));
        struct conn *l = calloc(1, sizeof *l);
        if (!l) die("calloc");
        l->fd = -1;
        l->lfd = fd;
        listeners[nlisteners++] = l;
    }
    printf("]}\n");
    fflush(stdout);
    pthread_t th[64];
    if (nthreads > 64) nthreads = 64;
    for (int i = 1; i < nthreads; i++)
        if (pthread_create(&th[i], NULL, serve_loop, NULL) != 0) die("pthread_create");
    serve_loop(NULL);
    for (int i = 1; i < nthreads; i++) pthread_join(th[i], NULL);
    return 0;
}

/* ---- main ------------------------------------------------------------------ */

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen serve [-t THREADS] IP:PORT...\n"
            "       loadgen connect [-c CGROUP] [-w WARMUP] -n N TARGET[,TARGET...]\n"
            "       loadgen http [-c CGROUP] [-t THREADS] -d SECONDS TARGET[,TARGET...]\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *mode = argv[1];
    const char *cgroup = NULL;
    int n = 10000, warmup = 0, threads = 1, opt;
    double seconds = 1.0;
    optind = 2;
    while ((opt = getopt(argc, argv, "c:n:w:t:d:")) != -1) {
        switch (opt) {
        case 'c': cgroup = optarg; break;
        case 'n': n = atoi(optarg); break;
        case 'w': warmup = atoi(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 'd': seconds = atof(optarg); break;
        default: usage();
        }
    }
    if (optind >= argc || threads < 1 || n < 1) usage();
    if (cgroup) join_cgroup(cgroup);
    if (strcmp(mode, "serve") == 0) return run_serve(threads, argv + optind, argc - optind);
    struct sockaddr_in tg[MAX_TARGETS];
    int ntg = parse_targets(argv[optind], tg);
    if (strcmp(mode, "connect") == 0) return run_connect(n, warmup, tg, ntg);
    if (strcmp(mode, "http") == 0) return run_http(threads, seconds, tg, ntg);
    usage();
    return 2;
}
