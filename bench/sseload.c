/*
 * sseload: the concurrent-stream load of the bench, in C, so that the load
 * generator costs a few microseconds an event instead of the proxy's tens
 * (bench/streamload.py and bench/slowmock.py, in Python, took about half a
 * core at 1,000 streams of 50 events a second, and a whole one beyond:
 * their own delays then showed in the figures, and with two workers on two
 * cores they took the second worker's core).
 *
 *   sseload mock PORT [--events 64] [--gap-ms 20] [--delay-ms 20]
 *       An upstream provider: POST .../chat/completions answers a fixed
 *       chat.completion after --delay-ms, or with "stream":true in the body
 *       a chunked text/event-stream of --events content chunks --gap-ms
 *       apart (the first at once), a usage chunk and data: [DONE];
 *       POST .../messages the same as an Anthropic Messages stream
 *       (message_start, content_block_start, the deltas, content_block_stop,
 *       message_delta with usage, message_stop).  Each stream keeps the
 *       phase it started with: a 1 ms ticker serves one millisecond slot of
 *       the gap at a time, so a thousand streams are spread over the gap as
 *       real providers' are.  Keep-alive, no limits.
 *
 *   sseload client PORT PATH BODYFILE TOKEN --streams N --hold S
 *          [--batch 50] [--batch-gap-ms 20] [--extra S] [--pids P1,P2]
 *       N keep-alive connections (opened in batches), each sending
 *       streaming requests back to back until --hold seconds after the
 *       ramp; times every stream: first complete SSE event, the gaps
 *       between events (several events in one read are 0 ms gaps), whether
 *       it ended (the chunked terminator).  Mid-hold it counts the streams
 *       in flight and reads the RSS and CPU time of --pids from /proc.
 *       Prints one JSON object.
 *
 * One thread, epoll, level-triggered reads, writes straight to the socket
 * (a write the kernel does not take whole is kept and sent on EPOLLOUT).
 * Linux only; built by bench/sseload.py with the system's C compiler.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL, 0);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl");
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* A growable byte buffer. */
typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

static void buf_add(buf_t *b, const char *data, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n) cap *= 2;
        b->p = realloc(b->p, cap);
        if (!b->p) die("realloc");
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void buf_drop(buf_t *b, size_t n) {
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
}

/* Write what the kernel takes; keep the rest in out (sent on EPOLLOUT). */
static int epfd;

static void want_out(int fd, int on, void *ptr) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = ptr};
    epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
}

static int send_all(int fd, buf_t *out, const char *data, size_t n, void *ptr) {
    if (out->len == 0) {
        ssize_t w = send(fd, data, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
            w = 0;
        }
        if ((size_t)w == n) return 0;
        buf_add(out, data + w, n - w);
        want_out(fd, 1, ptr);
        return 0;
    }
    buf_add(out, data, n);
    return 0;
}

static int flush_out(int fd, buf_t *out, void *ptr) {
    while (out->len) {
        ssize_t w = send(fd, out->p, out->len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -1;
        }
        buf_drop(out, (size_t)w);
    }
    want_out(fd, 0, ptr);
    return 0;
}

/* ------------------------------------------------------------------ mock */

#define MOCK_ID "chatcmpl-benchmock"
#define MSG_ID "msg_benchmock"

typedef struct conn {
    int fd;
    buf_t in, out;
    int streaming;  /* 0, or 1 while a stream is being sent */
    int anthropic;
    int next;       /* next event index */
    int slot;       /* its slot in the wheel while streaming */
    double answer_at; /* a JSON answer due at this time (0: none) */
    struct conn *snext, *sprev; /* wheel slot list */
    struct conn *jnext;         /* pending JSON answers */
    int closed;
} conn_t;

static int n_events = 64, gap_ms = 20, delay_ms = 20;
static conn_t **slots;
static int n_slots, cur_slot;
static conn_t *json_pending;

static void chunk(buf_t *b, const char *data, size_t n) {
    char head[32];
    int h = snprintf(head, sizeof head, "%zx\r\n", n);
    buf_add(b, head, h);
    buf_add(b, data, n);
    buf_add(b, "\r\n", 2);
}

static size_t openai_event(char *dst, size_t cap, int i) {
    return snprintf(dst, cap,
                    "data: {\"id\":\"" MOCK_ID "\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,"
                    "\"model\":\"slow-mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" w%d\"},"
                    "\"finish_reason\":null}]}\n\n",
                    i);
}

static size_t anthropic_event(char *dst, size_t cap, int i) {
    return snprintf(dst, cap,
                    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,"
                    "\"delta\":{\"type\":\"text_delta\",\"text\":\" w%d\"}}\n\n",
                    i);
}

static void slot_add(conn_t *c, int slot) {
    c->slot = slot;
    c->sprev = NULL;
    c->snext = slots[slot];
    if (slots[slot]) slots[slot]->sprev = c;
    slots[slot] = c;
}

static void slot_remove(conn_t *c) {
    if (c->sprev) c->sprev->snext = c->snext;
    else if (slots[c->slot] == c) slots[c->slot] = c->snext;
    if (c->snext) c->snext->sprev = c->sprev;
    c->snext = c->sprev = NULL;
}

static void mock_close(conn_t *c) {
    if (c->closed) return;
    c->closed = 1;
    if (c->streaming) slot_remove(c);
    c->streaming = 0;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    /* freed lazily: a pending JSON answer may still point at it */
}

static void mock_send_event(conn_t *c) {
    char ev[512];
    buf_t b = {0};
    if (c->next < n_events) {
        size_t n = c->anthropic ? anthropic_event(ev, sizeof ev, c->next) : openai_event(ev, sizeof ev, c->next);
        chunk(&b, ev, n);
        c->next++;
    } else {
        const char *tail;
        if (c->anthropic)
            tail = "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n"
                   "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\","
                   "\"stop_sequence\":null},\"usage\":{\"output_tokens\":64}}\n\n"
                   "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        else
            tail = "data: {\"id\":\"" MOCK_ID "\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,"
                   "\"model\":\"slow-mock\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":64,"
                   "\"total_tokens\":73}}\n\ndata: [DONE]\n\n";
        chunk(&b, tail, strlen(tail));
        buf_add(&b, "0\r\n\r\n", 5);
        slot_remove(c);
        c->streaming = 0;
    }
    if (send_all(c->fd, &c->out, b.p, b.len, c) < 0) mock_close(c);
    free(b.p);
}

static const char JSON_BODY[] =
    "{\"id\":\"" MOCK_ID "\",\"object\":\"chat.completion\",\"created\":1700000000,\"model\":\"slow-mock\","
    "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Hello from the slow mock.\"},"
    "\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":7,"
    "\"total_tokens\":16}}";

static void mock_answer_json(conn_t *c) {
    char head[256];
    int h = snprintf(head, sizeof head,
                     "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
                     sizeof JSON_BODY - 1);
    buf_t b = {0};
    buf_add(&b, head, h);
    buf_add(&b, JSON_BODY, sizeof JSON_BODY - 1);
    if (send_all(c->fd, &c->out, b.p, b.len, c) < 0) mock_close(c);
    free(b.p);
}

static void mock_request(conn_t *c, const char *head, size_t head_len, const char *body, size_t body_len) {
    int stream = memmem(body, body_len, "\"stream\":true", 13) != NULL ||
                 memmem(body, body_len, "\"stream\": true", 14) != NULL;
    const char *sp = memchr(head, ' ', head_len);
    const char *sp2 = sp ? memchr(sp + 1, ' ', head_len - (sp + 1 - head)) : NULL;
    int anthropic = sp && sp2 && memmem(sp, sp2 - sp, "/messages", 9) != NULL;
    if (!stream) {
        c->answer_at = now() + delay_ms / 1000.0;
        c->jnext = json_pending;
        json_pending = c;
        return;
    }
    c->anthropic = anthropic;
    c->next = 0;
    buf_t b = {0};
    const char *h = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n";
    buf_add(&b, h, strlen(h));
    char ev[512];
    if (anthropic) {
        const char *start =
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"" MSG_ID "\","
            "\"type\":\"message\",\"role\":\"assistant\",\"model\":\"slow-mock\",\"content\":[],\"stop_reason\":null,"
            "\"stop_sequence\":null,\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n"
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,"
            "\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n";
        chunk(&b, start, strlen(start));
    }
    size_t n = anthropic ? anthropic_event(ev, sizeof ev, 0) : openai_event(ev, sizeof ev, 0);
    chunk(&b, ev, n);
    c->next = 1;
    c->streaming = 1;
    /* its next event one gap from now: the slot just served */
    slot_add(c, (cur_slot + n_slots - 1) % n_slots);
    if (send_all(c->fd, &c->out, b.p, b.len, c) < 0) mock_close(c);
    free(b.p);
}

static void mock_read(conn_t *c) {
    char tmp[65536];
    for (;;) {
        ssize_t r = recv(c->fd, tmp, sizeof tmp, 0);
        if (r == 0) {
            mock_close(c);
            return;
        }
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            mock_close(c);
            return;
        }
        buf_add(&c->in, tmp, (size_t)r);
        if ((size_t)r < sizeof tmp) break;
    }
    for (;;) {
        char *end = memmem(c->in.p, c->in.len, "\r\n\r\n", 4);
        if (!end) return;
        size_t head_len = end - c->in.p;
        size_t length = 0;
        for (char *line = memchr(c->in.p, '\n', head_len); line && line < end; line = memchr(line + 1, '\n', end - line - 1)) {
            if (strncasecmp(line + 1, "content-length:", 15) == 0) length = strtoul(line + 16, NULL, 10);
        }
        if (c->in.len < head_len + 4 + length) return;
        mock_request(c, c->in.p, head_len, c->in.p + head_len + 4, length);
        if (c->closed) return;
        buf_drop(&c->in, head_len + 4 + length);
    }
}

static _Noreturn void mock_main(int port) {
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    nonblock(ls);
    epfd = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, ls, &lev);
    n_slots = gap_ms > 0 ? gap_ms : 1;
    slots = calloc(n_slots, sizeof *slots);
    double tick = 0.001, next_tick = now();
    struct epoll_event evs[512];
    for (;;) {
        double t = now();
        int wait = (int)((next_tick - t) * 1000.0 + 0.999);
        if (wait < 0) wait = 0;
        int n = epoll_wait(epfd, evs, 512, wait);
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c == NULL) {
                for (;;) {
                    int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    nodelay(fd);
                    conn_t *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if (c->closed) continue;
            if (evs[i].events & EPOLLOUT && flush_out(c->fd, &c->out, c) < 0) {
                mock_close(c);
                continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) mock_read(c);
        }
        t = now();
        while (t >= next_tick) {
            next_tick += tick;
            conn_t *c = slots[cur_slot];
            cur_slot = (cur_slot + 1) % n_slots;
            while (c) {
                conn_t *nx = c->snext;
                if (!c->closed && c->streaming) mock_send_event(c); /* it keeps its slot until the end */
                c = nx;
            }
        }
        if (json_pending) {
            conn_t **pp = &json_pending;
            while (*pp) {
                conn_t *c = *pp;
                if (c->answer_at <= t) {
                    *pp = c->jnext;
                    if (!c->closed) mock_answer_json(c);
                } else {
                    pp = &c->jnext;
                }
            }
        }
    }
}

/* ---------------------------------------------------------------- client */

typedef struct {
    uint32_t *v;
    size_t len, cap;
} vec_t;

static void vec_add(vec_t *x, uint32_t v) {
    if (x->len == x->cap) {
        x->cap = x->cap ? x->cap * 2 : 4096;
        x->v = realloc(x->v, x->cap * sizeof *x->v);
        if (!x->v) die("realloc");
    }
    x->v[x->len++] = v;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(vec_t *x, double q) {
    if (!x->len) return -1;
    size_t i = (size_t)(q * x->len);
    if (i >= x->len) i = x->len - 1;
    return x->v[i] / 1000.0; /* ms */
}

typedef struct client {
    int fd;
    int open;
    int active;      /* a stream in flight */
    int headers_done;
    double t0, first, last;
    double opened_at; /* when its connection was opened (0 once its first stream began) */
    int events;
    char tail;       /* the last byte seen (an event ends in "\n\n") */
    char end[8];     /* the last bytes (the chunked terminator) */
    buf_t head;
    buf_t out;
} client_t;

static const char *request;
static size_t request_len;
static vec_t ttfb, gaps, first_ttfb; /* first_ttfb: a connection's first stream (its connect included) */
static long completed, bad_status, total_events, connect_errors;
static int active_streams;
static double until;

static void client_send(client_t *c) {
    c->t0 = now();
    c->first = c->last = 0;
    c->events = 0;
    c->tail = 0;
    memset(c->end, 0, sizeof c->end);
    c->headers_done = 0;
    c->head.len = 0;
    c->active = 1;
    active_streams++;
    if (send_all(c->fd, &c->out, request, request_len, c) < 0) {
        c->open = 0;
        close(c->fd);
    }
}

static void client_body(client_t *c, const char *data, size_t n, double t) {
    int k = 0;
    char prev = c->tail;
    for (size_t i = 0; i < n; i++) {
        if (data[i] == '\n' && prev == '\n') k++;
        prev = data[i];
    }
    c->tail = prev;
    if (k) {
        if (c->first == 0) {
            c->first = t;
            vec_add(&ttfb, (uint32_t)((t - c->t0) * 1e6));
            if (c->opened_at > 0) {
                vec_add(&first_ttfb, (uint32_t)((t - c->opened_at) * 1e6));
                c->opened_at = 0;
            }
        } else {
            vec_add(&gaps, (uint32_t)((t - c->last) * 1e6));
        }
        for (int j = 1; j < k; j++) vec_add(&gaps, 0);
        c->last = t;
        c->events += k;
    }
    /* keep the last 5 bytes: the terminator "0\r\n\r\n" */
    if (n >= 5) {
        memcpy(c->end, data + n - 5, 5);
    } else {
        memmove(c->end, c->end + n, 5 - n);
        memcpy(c->end + 5 - n, data, n);
    }
    if (memcmp(c->end, "0\r\n\r\n", 5) == 0 && c->events > 0) {
        c->active = 0;
        active_streams--;
        completed++;
        total_events += c->events;
        if (now() < until) {
            client_send(c);
        } else {
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->open = 0;
        }
    }
}

static void client_read(client_t *c) {
    char tmp[65536];
    for (;;) {
        ssize_t r = recv(c->fd, tmp, sizeof tmp, 0);
        if (r <= 0) {
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
            if (c->active) active_streams--;
            c->active = 0;
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->open = 0;
            return;
        }
        double t = now();
        const char *data = tmp;
        size_t n = (size_t)r;
        if (!c->headers_done) {
            buf_add(&c->head, data, n);
            char *e = memmem(c->head.p, c->head.len, "\r\n\r\n", 4);
            if (!e) continue;
            c->headers_done = 1;
            if (c->head.len < 12 || memcmp(c->head.p, "HTTP/1.1 200", 12) != 0) bad_status++;
            size_t skip = e + 4 - c->head.p;
            client_body(c, c->head.p + skip, c->head.len - skip, t);
        } else {
            client_body(c, data, n, t);
        }
        if (!c->open || (size_t)r < sizeof tmp) return;
    }
}

static long read_rss_kib(int pid) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long kib = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) kib = strtol(line + 6, NULL, 10);
    fclose(f);
    return kib;
}

static int client_main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: sseload client PORT PATH BODYFILE TOKEN --streams N --hold S\n");
        return 2;
    }
    int port = atoi(argv[2]);
    const char *path = argv[3], *bodyfile = argv[4], *token = argv[5];
    int streams = 100, batch = 50;
    double hold = 4, batch_gap = 0.02, extra = 15;
    char *pids = NULL;
    for (int i = 6; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--streams")) streams = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--hold")) hold = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--batch-gap-ms")) batch_gap = atof(argv[i + 1]) / 1000.0;
        else if (!strcmp(argv[i], "--extra")) extra = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--pids")) pids = argv[i + 1];
    }
    FILE *bf = fopen(bodyfile, "rb");
    if (!bf) die("body file");
    char body[65536];
    size_t blen = fread(body, 1, sizeof body, bf);
    fclose(bf);
    char *req = malloc(blen + 1024);
    request_len = snprintf(req, 1024,
                           "POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
                           "Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: %zu\r\n\r\n",
                           path, port, token, blen);
    memcpy(req + request_len, body, blen);
    request_len += blen;
    request = req;
    until = 1e18;
    epfd = epoll_create1(0);
    client_t *cs = calloc(streams, sizeof *cs);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct epoll_event evs[1024];
    double t_start = now();
    int opened = 0;
    /* the ramp: batches of connections, reading between them */
    for (int i = 0; i < streams; i += batch) {
        for (int j = i; j < streams && j < i + batch; j++) {
            int fd = socket(AF_INET, SOCK_STREAM, 0);
            cs[j].opened_at = now();
            if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
                connect_errors++;
                close(fd);
                continue;
            }
            nonblock(fd);
            nodelay(fd);
            cs[j].fd = fd;
            cs[j].open = 1;
            opened++;
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &cs[j]};
            epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
            client_send(&cs[j]);
        }
        double t_next = now() + batch_gap;
        while (now() < t_next) {
            int n = epoll_wait(epfd, evs, 1024, 1);
            for (int k = 0; k < n; k++) {
                client_t *c = evs[k].data.ptr;
                if (evs[k].events & EPOLLOUT) flush_out(c->fd, &c->out, c);
                if (c->open && evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) client_read(c);
            }
        }
    }
    double ramp_s = now() - t_start;
    until = now() + hold;
    double sample_at = now() + hold / 2, hard = until + extra;
    int sampled = 0, active_at_sample = 0;
    long rss_sample = -1;
    for (;;) {
        double t = now();
        if (!sampled && t >= sample_at) {
            sampled = 1;
            active_at_sample = active_streams;
            if (pids) {
                rss_sample = 0;
                char *copy = strdup(pids);
                for (char *p = strtok(copy, ","); p; p = strtok(NULL, ",")) {
                    long k = read_rss_kib(atoi(p));
                    if (k > 0) rss_sample += k;
                }
                free(copy);
            }
        }
        int open_left = 0;
        for (int i = 0; i < streams; i++) open_left += cs[i].open;
        if (t > until && open_left == 0) break;
        if (t > hard) break;
        int n = epoll_wait(epfd, evs, 1024, 5);
        for (int k = 0; k < n; k++) {
            client_t *c = evs[k].data.ptr;
            if (evs[k].events & EPOLLOUT) flush_out(c->fd, &c->out, c);
            if (c->open && evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) client_read(c);
        }
    }
    int unfinished = 0;
    for (int i = 0; i < streams; i++)
        if (cs[i].open) {
            unfinished++;
            close(cs[i].fd);
        }
    qsort(ttfb.v, ttfb.len, sizeof *ttfb.v, cmp_u32);
    qsort(gaps.v, gaps.len, sizeof *gaps.v, cmp_u32);
    qsort(first_ttfb.v, first_ttfb.len, sizeof *first_ttfb.v, cmp_u32);
    printf("{\"n\": %d, \"opened\": %d, \"connect_errors\": %ld, \"bad_status\": %ld, \"completed\": %ld, "
           "\"events\": %ld, \"streams\": %zu, \"unfinished\": %d, \"active_at_sample\": %d, \"rss_sample_kib\": %ld, "
           "\"ramp_s\": %.3f, \"wall_s\": %.3f, \"ttfb_p50_ms\": %.3f, \"ttfb_p99_ms\": %.3f, \"ttfb_max_ms\": %.3f, "
           "\"gap_p50_ms\": %.3f, \"gap_p99_ms\": %.3f, \"gap_max_ms\": %.3f, "
           "\"first_ttfb_p50_ms\": %.3f, \"first_ttfb_p99_ms\": %.3f, \"first_ttfb_max_ms\": %.3f}\n",
           streams, opened, connect_errors, bad_status, completed, total_events, ttfb.len, unfinished,
           active_at_sample, rss_sample, ramp_s, now() - t_start, pct(&ttfb, 0.5), pct(&ttfb, 0.99),
           pct(&ttfb, 1.0), pct(&gaps, 0.5), pct(&gaps, 0.99), pct(&gaps, 1.0), pct(&first_ttfb, 0.5),
           pct(&first_ttfb, 0.99), pct(&first_ttfb, 1.0));
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 3 && !strcmp(argv[1], "mock")) {
        for (int i = 3; i + 1 < argc; i += 2) {
            if (!strcmp(argv[i], "--events")) n_events = atoi(argv[i + 1]);
            else if (!strcmp(argv[i], "--gap-ms")) gap_ms = atoi(argv[i + 1]);
            else if (!strcmp(argv[i], "--delay-ms")) delay_ms = atoi(argv[i + 1]);
        }
        mock_main(atoi(argv[2]));
    }
    if (argc >= 2 && !strcmp(argv[1], "client")) return client_main(argc, argv);
    fprintf(stderr, "usage: sseload mock PORT [...] | sseload client PORT PATH BODYFILE TOKEN [...]\n");
    return 2;
}
