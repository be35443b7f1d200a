/* netagent udp backend: the compiled packet loop (TUN <-> UDP), run as a child of the agent.
 *
 * flannel's udp backend did its per-packet work in C for speed; this is the same idea with the
 * agent's trust rules. Python keeps control: it opens the TUN (IFF_VNET_HDR) and the UDP
 * socket, passes them here, pushes the forwarding table over the control socket, and reads
 * the counters this loop sends back. The wire format is flannel's: one plain IPv4 packet per
 * UDP datagram. The checks are those of backends/udptrust.py and the Python loop
 * (backends/udpfwd.py), drop reasons in the same order as udpstats.DROP_REASONS.
 *
 * Usage: udpfast TUN_FD SOCK_FD CTL_FD FLAGS   (FLAGS: bit 0 gro, 1 tso, 2 udp gro, 3 gso)
 *
 * Control stream (native byte order, every message: u32 type, u32 payload length):
 *   agent -> loop  1 TABLE: u32 generation, own_net, own_mask, subnet_mask, own_address,
 *                           count, then count x u32 net, count x u32 mask, and count x
 *                           struct sockaddr_in (the peer, as the Python table holds it)
 *   loop -> agent  2 HELLO: u32 features on (the FLAGS bits the kernel allows), u32 pid
 *                  3 ACK:   u32 generation (the table is in use)
 *                  4 STATS: NCOUNT x u64, cumulative since this process started
 * The loop forwards nothing before the first TABLE. End of file on the control socket: stop. Addresses are host-order integers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#define UDP_SEGMENT_OPT 103
#define UDP_GRO_OPT 104

#define F_GRO 1
#define F_TSO 2
#define F_UDPGRO 4
#define F_GSO 8

#define VNET_LEN 10             /* struct virtio_net_hdr (linux/virtio_net.h), native order */
#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_TCPV4 1
#define BUF_SIZE 65536
#define BATCH 64
#define GSO_SEND_LIMIT 65000
#define GSO_MAX_SEGS 64
#define MAX_RUN_IOV 256
#define GRO_LIMIT (65535 - 20 - 60)

enum { M_TABLE = 1, M_HELLO = 2, M_ACK = 3, M_STATS = 4 };

/* counters: the order the agent reads them in (backends/udpfast.py COUNTERS) */
enum {
    C_RX_PACKETS, C_TX_PACKETS, C_RX_BYTES, C_TX_BYTES, C_RX_GRO_MERGED, C_TX_TSO_PACKETS,
    D_UNKNOWN_SOURCE, D_SPOOFED_INNER_SOURCE, D_MALFORMED, D_NOT_FOR_US, D_NO_ROUTE,
    D_TTL_EXPIRED, D_NOT_IPV4, D_SEND_ERROR, D_TUN_WRITE_ERROR, NCOUNT
};
static uint64_t counts[NCOUNT];

/* ------------------------------------------------------------------ forwarding table */

struct route { uint32_t net; uint32_t peer; };            /* peer: index into peers[] */
struct group { uint32_t mask; uint32_t start, len; };    /* routes[start..start+len) */
struct source { uint32_t ip, net, mask; };
struct table {
    uint32_t own_net, own_mask, subnet_mask, own_address;
    uint32_t ngroups, nsources;
    struct group *groups;         /* longest prefix first, each sorted by net */
    struct route *routes;
    struct sockaddr_in *peers;
    struct source *sources;       /* sorted by ip */
};
static struct table empty_table = {0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0, 0, 0,
                                   NULL, NULL, NULL, NULL};
static struct table *tbl = &empty_table;

static void free_table(struct table *t) {
    if (t == &empty_table) return;
    free(t->groups); free(t->routes); free(t->peers); free(t->sources); free(t);
}

static int cmp_route_entry(const void *a, const void *b) {
    /* entries as built: mask (descending), then net (ascending) */
    const uint32_t *x = a, *y = b;
    if (x[1] != y[1]) return x[1] > y[1] ? -1 : 1;
    if (x[0] != y[0]) return x[0] < y[0] ? -1 : 1;
    return 0;
}

static int cmp_source(const void *a, const void *b) {
    const struct source *x = a, *y = b;
    return x->ip < y->ip ? -1 : x->ip > y->ip;
}

/* payload: 6 words, nets, masks, sockaddrs (see the top of this file); NULL on bad input */
static struct table *parse_table(const uint32_t *w, uint32_t nwords, uint32_t *gen) {
    if (nwords < 6) return NULL;
    uint32_t count = w[5];
    if ((uint64_t)count * 6 + 6 != nwords) return NULL;
    struct table *t = calloc(1, sizeof *t);
    uint32_t (*ent)[4] = malloc(((size_t)count + 1) * sizeof *ent);
    if (!t || !ent) { free(t); free(ent); return NULL; }
    *gen = w[0];
    t->own_net = w[1]; t->own_mask = w[2]; t->subnet_mask = w[3]; t->own_address = w[4];
    t->routes = malloc(((size_t)count + 1) * sizeof *t->routes);
    t->peers = malloc(((size_t)count + 1) * sizeof *t->peers);
    t->sources = malloc(((size_t)count + 1) * sizeof *t->sources);
    t->groups = malloc(33 * sizeof *t->groups);
    if (!t->routes || !t->peers || !t->sources || !t->groups) {
        free(ent); free_table(t); return NULL;
    }
    const uint32_t *nets = w + 6, *masks = w + 6 + count;
    const uint8_t *addrs = (const uint8_t *)(w + 6 + 2 * (size_t)count);
    for (uint32_t i = 0; i < count; i++) {
        struct sockaddr_in sa;
        memcpy(&sa, addrs + 16 * (size_t)i, sizeof sa);
        ent[i][0] = nets[i] & masks[i]; ent[i][1] = masks[i];
        ent[i][2] = ntohl(sa.sin_addr.s_addr); ent[i][3] = ntohs(sa.sin_port);
    }
    qsort(ent, count, sizeof *ent, cmp_route_entry);
    uint32_t n = 0;
    for (uint32_t i = 0; i < count; i++) {
        /* the same subnet twice: the later one wins (as a dict would have it) */
        if (n && t->groups[t->ngroups - 1].mask == ent[i][1] && t->routes[n - 1].net == ent[i][0]) n--;
        else if (!t->ngroups || t->groups[t->ngroups - 1].mask != ent[i][1]) {
            if (t->ngroups == 33) { free(ent); free_table(t); return NULL; }
            t->groups[t->ngroups++] = (struct group){ent[i][1], n, 0};
        }
        t->routes[n].net = ent[i][0];
        t->routes[n].peer = n;
        struct sockaddr_in *sa = &t->peers[n];
        memset(sa, 0, sizeof *sa);
        sa->sin_family = AF_INET;
        sa->sin_port = htons((uint16_t)ent[i][3]);
        sa->sin_addr.s_addr = htonl(ent[i][2]);
        n++;
        t->groups[t->ngroups - 1].len = n - t->groups[t->ngroups - 1].start;
    }
    for (uint32_t i = 0; i < count; i++) {
        t->sources[i] = (struct source){ent[i][2], ent[i][0], ent[i][1]};
    }
    t->nsources = count;
    qsort(t->sources, count, sizeof *t->sources, cmp_source);
    free(ent);
    return t;
}

/* longest-prefix match: the peer's address, or NULL */
static const struct sockaddr_in *lookup(const struct table *t, uint32_t dst) {
    for (uint32_t g = 0; g < t->ngroups; g++) {
        uint32_t key = dst & t->groups[g].mask;
        const struct route *r = t->routes + t->groups[g].start;
        uint32_t lo = 0, hi = t->groups[g].len;
        while (lo < hi) {
            uint32_t mid = (lo + hi) / 2;
            if (r[mid].net < key) lo = mid + 1; else hi = mid;
        }
        if (lo < t->groups[g].len && r[lo].net == key) return &t->peers[r[lo].peer];
    }
    return NULL;
}

/* the subnets a peer's PublicIP covers: first index and count in sources[] (count 0: unknown) */
static uint32_t peer_nets(const struct table *t, uint32_t ip, uint32_t *first) {
    uint32_t lo = 0, hi = t->nsources;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (t->sources[mid].ip < ip) lo = mid + 1; else hi = mid;
    }
    uint32_t end = lo;
    while (end < t->nsources && t->sources[end].ip == ip) end++;
    *first = lo;
    return end - lo;
}

static int inner_source_ok(const struct table *t, uint32_t first, uint32_t n, uint32_t src) {
    for (uint32_t i = first; i < first + n; i++)
        if ((src & t->sources[i].mask) == t->sources[i].net) return 1;
    return 0;
}

/* ------------------------------------------------------------------ checksums */

static uint32_t sum16(const uint8_t *p, size_t n, uint32_t acc) {
    uint64_t s = acc;
    while (n >= 8) {
        uint32_t a, b;
        memcpy(&a, p, 4); memcpy(&b, p + 4, 4);
        s += a; s += b; p += 8; n -= 8;
    }
    if (n >= 4) { uint32_t a; memcpy(&a, p, 4); s += a; p += 4; n -= 4; }
    if (n >= 2) { uint16_t a; memcpy(&a, p, 2); s += a; p += 2; n -= 2; }
    if (n) { uint16_t a = 0; memcpy(&a, p, 1); s += a; }
    while (s >> 16) s = (s & 0xFFFF) + (s >> 16);
    return (uint32_t)s;  /* native byte order, folded to 16 bits */
}

static uint16_t fold_final(uint32_t s) {  /* native-order partial sum -> network-order checksum */
    while (s >> 16) s = (s & 0xFFFF) + (s >> 16);
    return (uint16_t)~s;
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static void wr16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v & 0xFF; }
static void wr32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }

static int header_ok(const uint8_t *p, size_t ihl) {
    uint32_t s = sum16(p, ihl, 0);
    return s == 0xFFFF || s == 0;  /* sum ≡ 0 (mod 0xFFFF), as udptrust.header_ok */
}

static void ip_csum_set(uint8_t *ip, size_t ihl) {
    ip[10] = ip[11] = 0;
    uint16_t c = fold_final(sum16(ip, ihl, 0));
    memcpy(ip + 10, &c, 2);
}

/* TTL - 1 with the RFC 1624 update (as udptrust.decrement_ttl); 0 when it would hit 0 */
static int decrement_ttl(uint8_t *p) {
    if (p[8] <= 1) return 0;
    p[8]--;
    uint32_t c = (uint32_t)rd16(p + 10) + 0x0100;
    c = (c & 0xFFFF) + (c >> 16);
    wr16(p + 10, (uint16_t)c);
    return 1;
}

/* ------------------------------------------------------------------ I/O state */

static int tun_fd, sock_fd, ctl_fd;
static int features;
static uint8_t *tx_buf;                 /* BATCH slots of VNET_LEN + BUF_SIZE */
static struct iovec tx_iov[BATCH];
static struct mmsghdr tx_msgs[BATCH];
static struct sockaddr_in tx_names[BATCH];
static uint8_t *rx_buf;
static struct iovec rx_iov[BATCH];
static struct mmsghdr rx_msgs[BATCH];
static struct sockaddr_in rx_names[BATCH];
static char rx_ctl[BATCH][64];
static uint8_t tso_hdrs[GSO_MAX_SEGS * 120];
static const uint8_t zero_vnet[VNET_LEN];

static void tun_write(struct iovec *iov, int n) {
    if (writev(tun_fd, iov, n) < 0) counts[D_TUN_WRITE_ERROR]++;
}

/* flannel's ICMP net unreachable for a packet no lease covers (udptrust.net_unreachable) */
static void net_unreachable(const uint8_t *p, size_t n, uint32_t dst) {
    size_t ihl = (size_t)(p[0] & 0x0F) * 4;
    if (ihl < 20 || n < ihl || p[9] == 1 || (rd16(p + 6) & 0x1FFF)) return;
    size_t quote = ihl + 8 < n ? ihl + 8 : n;
    uint8_t out[VNET_LEN + 28 + 68];
    memset(out, 0, sizeof out);
    uint8_t *ip = out + VNET_LEN, *icmp = ip + 20;
    icmp[0] = 3;
    memcpy(icmp + 8, p, quote);
    uint16_t c = fold_final(sum16(icmp, 8 + quote, 0));
    memcpy(icmp + 2, &c, 2);
    uint32_t source = dst & tbl->subnet_mask;
    if (source == tbl->own_address) source = dst;
    ip[0] = 0x45; wr16(ip + 2, (uint16_t)(28 + quote)); ip[8] = 8; ip[9] = 1;
    wr32(ip + 12, source); memcpy(ip + 16, p + 12, 4);
    ip_csum_set(ip, 20);
    struct iovec v = {out, VNET_LEN + 28 + quote};
    tun_write(&v, 1);
}

/* complete a CHECKSUM_PARTIAL packet (udpoffload.complete_checksum) */
static int complete_checksum(uint8_t *p, size_t n, size_t start, size_t off) {
    if (start + off + 2 > n || start >= n) return 0;
    uint32_t s = sum16(p + start, n - start, 0);
    uint16_t c = fold_final(s);
    if (c == 0) c = 0xFFFF;  /* 0 means "no checksum" to UDP; 0xFFFF is the same sum */
    memcpy(p + start + off, &c, 2);
    return 1;
}

static void send_queue(int *nq) {
    int done = 0;
    while (done < *nq) {
        int r = sendmmsg(sock_fd, tx_msgs + done, (unsigned)(*nq - done), 0);
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            counts[D_SEND_ERROR] += (uint64_t)(*nq - done);
            break;
        }
        for (int i = done; i < done + r; i++) counts[C_TX_BYTES] += tx_iov[i].iov_len;
        counts[C_TX_PACKETS] += (uint64_t)r;
        done += r;
    }
    *nq = 0;
}

/* TSO in user space: cut the TCP super-packet p[:n] into segments of mss payload bytes
 * (Linux's tcp_gso_segment: ID + 1 each, CWR on the first only, FIN/PSH on the last only) and
 * send them with UDP_SEGMENT, up to GSO_MAX_SEGS and 64 kB per sendmsg. */
static void send_tso(uint8_t *p, size_t n, size_t mss, const struct sockaddr_in *to) {
    size_t ihl = (size_t)(p[0] & 0x0F) * 4;
    size_t thl = ihl + 13 <= n ? (size_t)(p[ihl + 12] >> 4) * 4 : 0;
    size_t hlen = ihl + thl;
    if (ihl < 20 || thl < 20 || hlen >= n || mss < 48 || hlen > 120) {
        counts[D_NOT_IPV4]++;
        return;
    }
    size_t payload = n - hlen;
    size_t count = (payload + mss - 1) / mss;
    uint8_t flags = p[ihl + 13];
    uint16_t id0 = rd16(p + 4);
    uint32_t seq0 = rd32(p + ihl + 4);
    size_t per_call = GSO_SEND_LIMIT / (hlen + mss);
    if (per_call > GSO_MAX_SEGS) per_call = GSO_MAX_SEGS;
    if (per_call < 1) per_call = 1;
    struct iovec iov[2 * GSO_MAX_SEGS];
    char cbuf[CMSG_SPACE(sizeof(uint16_t))];
    for (size_t a = 0; a < count; a += per_call) {
        size_t b = a + per_call < count ? a + per_call : count;
        for (size_t k = a; k < b; k++) {
            uint8_t *h = tso_hdrs + (k - a) * hlen;
            size_t len = k + 1 < count ? mss : payload - k * mss;
            memcpy(h, p, hlen);
            wr16(h + 2, (uint16_t)(hlen + len));
            wr16(h + 4, (uint16_t)(id0 + k));
            ip_csum_set(h, ihl);
            uint8_t *t = h + ihl;
            wr32(t + 4, seq0 + (uint32_t)(k * mss));
            uint8_t f = flags;
            if (k + 1 < count) f &= (uint8_t)~0x09;  /* FIN, PSH: last only */
            if (k > 0) f &= (uint8_t)~0x80;          /* CWR: first only */
            t[13] = f;
            t[16] = t[17] = 0;
            uint32_t s = sum16(p + hlen + k * mss, len, 0);
            s = sum16(t, thl, s);
            s = sum16(h + 12, 8, s);
            uint8_t ph[4] = {0, 6, (uint8_t)((thl + len) >> 8), (uint8_t)((thl + len) & 0xFF)};
            s = sum16(ph, 4, s);
            uint16_t c = fold_final(s);
            memcpy(t + 16, &c, 2);
            iov[2 * (k - a)] = (struct iovec){h, hlen};
            iov[2 * (k - a) + 1] = (struct iovec){p + hlen + k * mss, len};
        }
        struct msghdr m = {0};
        m.msg_name = (void *)to;
        m.msg_namelen = sizeof *to;
        m.msg_iov = iov;
        m.msg_iovlen = 2 * (b - a);
        if (b - a > 1) {
            memset(cbuf, 0, sizeof cbuf);
            m.msg_control = cbuf;
            m.msg_controllen = sizeof cbuf;
            struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
            cm->cmsg_level = SOL_UDP;
            cm->cmsg_type = UDP_SEGMENT_OPT;
            cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t seg = (uint16_t)(hlen + mss);
            memcpy(CMSG_DATA(cm), &seg, sizeof seg);
        }
        ssize_t r;
        do r = sendmsg(sock_fd, &m, 0); while (r < 0 && errno == EINTR);
        if (r < 0) {
            counts[D_SEND_ERROR] += b - a;
        } else {
            counts[C_TX_PACKETS] += b - a;
            counts[C_TX_BYTES] += (uint64_t)r;
            counts[C_TX_TSO_PACKETS]++;
        }
    }
}

/* TUN -> UDP: one batch; returns 1 when the TUN had nothing more to read */
static int tun_to_udp(void) {
    int nq = 0;
    const struct table *t = tbl;
    for (int budget = BATCH; budget > 0 && nq < BATCH; budget--) {
        uint8_t *slot = tx_buf + (size_t)nq * (VNET_LEN + BUF_SIZE);
        ssize_t r = read(tun_fd, slot, VNET_LEN + BUF_SIZE);
        if (r < 0) {
            if (errno == EINTR) continue;
            send_queue(&nq);
            return 1;  /* EAGAIN, or an error poll() will show again */
        }
        uint8_t *p = slot + VNET_LEN;
        size_t n = r >= VNET_LEN ? (size_t)r - VNET_LEN : 0;
        if (n < 20 || p[0] >> 4 != 4) { counts[D_NOT_IPV4]++; continue; }
        uint32_t dst = rd32(p + 16);
        const struct sockaddr_in *to = lookup(t, dst);
        if (!to) {
            counts[D_NO_ROUTE]++;
            net_unreachable(p, n, dst);
            continue;
        }
        if (!decrement_ttl(p)) { counts[D_TTL_EXPIRED]++; continue; }
        uint8_t vflags = slot[0], gso = slot[1];
        uint16_t gso_size, cstart, coff;
        memcpy(&gso_size, slot + 4, 2); memcpy(&cstart, slot + 6, 2); memcpy(&coff, slot + 8, 2);
        if ((gso & 0x7F) == VNET_GSO_TCPV4 && gso_size && p[9] == 6) {
            send_queue(&nq);  /* packets leave in the order they came */
            send_tso(p, n, gso_size, to);
            continue;
        }
        if ((vflags & VNET_F_NEEDS_CSUM) && !complete_checksum(p, n, cstart, coff)) {
            counts[D_NOT_IPV4]++;
            continue;
        }
        tx_iov[nq] = (struct iovec){p, n};
        tx_names[nq] = *to;
        nq++;
    }
    send_queue(&nq);
    return 0;
}

/* ------------------------------------------------------------------ UDP -> TUN */

/* a pending super-packet: header (vnet + IP/TCP of its first segment) + payload iovecs that
 * point into the receive buffers (written before the next recvmmsg reuses them) */
static struct {
    int count;                    /* segments held; 0 = nothing pending */
    int closed;                   /* PSH or a short segment: nothing more joins */
    size_t hlen, mss, size;       /* size: IP bytes held */
    uint32_t next_seq;
    uint8_t hdr[VNET_LEN + 120];
    struct iovec iov[MAX_RUN_IOV + 1];
} gro;

static void gro_flush(void) {
    if (!gro.count) return;
    uint8_t *ip = gro.hdr + VNET_LEN;
    if (gro.count == 1) {
        memset(gro.hdr, 0, VNET_LEN);
    } else {
        wr16(ip + 2, (uint16_t)gro.size);
        ip_csum_set(ip, 20);
        /* partial TCP checksum: the pseudo-header sum, not inverted (CHECKSUM_PARTIAL) */
        uint8_t ph[4] = {0, 6, (uint8_t)((gro.size - 20) >> 8), (uint8_t)((gro.size - 20) & 0xFF)};
        uint32_t s = sum16(ip + 12, 8, sum16(ph, 4, 0));
        while (s >> 16) s = (s & 0xFFFF) + (s >> 16);
        uint16_t ps = (uint16_t)s;
        memcpy(ip + 36, &ps, 2);
        uint16_t v[4] = {(uint16_t)gro.hlen, (uint16_t)gro.mss, 20, 16};
        gro.hdr[0] = VNET_F_NEEDS_CSUM;
        gro.hdr[1] = VNET_GSO_TCPV4;
        memcpy(gro.hdr + 2, v, sizeof v);  /* hdr_len, gso_size, csum_start, csum_offset */
        counts[C_RX_GRO_MERGED] += (uint64_t)gro.count - 1;
    }
    gro.iov[0] = (struct iovec){gro.hdr, VNET_LEN + gro.hlen};
    tun_write(gro.iov, gro.count + 1);
    gro.count = 0;
}

/* add a checked packet (TCP, IHL 5, no fragment, flags ACK or PSH|ACK) to the pending
 * super-packet when it continues it (Linux GRO's rules), else flush and start anew */
static void gro_add(uint8_t *p, size_t n) {
    size_t thl = (size_t)(p[32] >> 4) * 4, hlen = 20 + thl;
    if (thl < 20 || hlen >= n || hlen > 80) {  /* pure ACKs and odd headers go out alone */
        gro_flush();
        struct iovec v[2] = {{(void *)zero_vnet, VNET_LEN}, {p, n}};
        tun_write(v, 2);
        return;
    }
    size_t plen = n - hlen;
    uint32_t seq = rd32(p + 24);
    uint8_t *h = gro.hdr + VNET_LEN;
    if (gro.count && !gro.closed && gro.count < MAX_RUN_IOV && seq == gro.next_seq &&
        hlen == gro.hlen && plen <= gro.mss && gro.size + plen <= GRO_LIMIT &&
        memcmp(p + 12, h + 12, 12) == 0 && p[1] == h[1] && p[8] == h[8] && p[6] == h[6] &&
        memcmp(p + 28, h + 28, 5) == 0 && memcmp(p + 34, h + 34, 2) == 0 &&
        memcmp(p + 40, h + 40, hlen - 40) == 0) {
        gro.iov[++gro.count] = (struct iovec){p + hlen, plen};
        gro.size += plen;
        gro.next_seq = seq + (uint32_t)plen;
        if (p[33] & 0x08) { h[33] |= 0x08; gro.closed = 1; }
        else if (plen < gro.mss) gro.closed = 1;
        return;
    }
    gro_flush();
    memcpy(h, p, hlen);
    gro.iov[1] = (struct iovec){p + hlen, plen};
    gro.count = 1;
    gro.hlen = hlen; gro.mss = plen; gro.size = n;
    gro.next_seq = seq + (uint32_t)plen;
    gro.closed = (p[33] & 0x08) != 0;
}

/* the receive checks for one inner packet from a known peer, then on to the TUN */
static void receive_one(const struct table *t, uint32_t first, uint32_t nn, uint8_t *p,
                        size_t n) {
    if (n < 20) { counts[D_MALFORMED]++; return; }
    size_t ihl = (size_t)(p[0] & 0x0F) * 4;
    if (p[0] >> 4 != 4 || ihl < 20 || ihl > n || rd16(p + 2) != n || !header_ok(p, ihl)) {
        counts[D_MALFORMED]++;
        return;
    }
    if (!inner_source_ok(t, first, nn, rd32(p + 12))) { counts[D_SPOOFED_INNER_SOURCE]++; return; }
    if ((rd32(p + 16) & t->own_mask) != t->own_net) { counts[D_NOT_FOR_US]++; return; }
    if (!decrement_ttl(p)) { counts[D_TTL_EXPIRED]++; return; }
    counts[C_RX_PACKETS]++;
    counts[C_RX_BYTES] += n;
    if ((features & F_GRO) && p[9] == 6 && ihl == 20 && !((p[6] & 0x3F) || p[7]) && n >= 40 &&
        (p[33] == 0x10 || p[33] == 0x18)) {
        gro_add(p, n);
        return;
    }
    gro_flush();
    struct iovec v[2] = {{(void *)zero_vnet, VNET_LEN}, {p, n}};
    tun_write(v, 2);
}

static int udp_to_tun(void) {
    for (int i = 0; i < BATCH; i++) {
        rx_msgs[i].msg_hdr.msg_namelen = sizeof rx_names[i];
        rx_msgs[i].msg_hdr.msg_control = (features & F_UDPGRO) ? rx_ctl[i] : NULL;
        rx_msgs[i].msg_hdr.msg_controllen = (features & F_UDPGRO) ? sizeof rx_ctl[i] : 0;
    }
    int got = recvmmsg(sock_fd, rx_msgs, BATCH, MSG_DONTWAIT, NULL);
    if (got <= 0) return 1;
    const struct table *t = tbl;
    for (int i = 0; i < got; i++) {
        size_t total = rx_msgs[i].msg_len, seg = total;
        struct msghdr *m = &rx_msgs[i].msg_hdr;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c && (features & F_UDPGRO);
             c = CMSG_NXTHDR(m, c)) {
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO_OPT) {
                int v = 0;
                memcpy(&v, CMSG_DATA(c), c->cmsg_len - CMSG_LEN(0) < sizeof v
                       ? c->cmsg_len - CMSG_LEN(0) : sizeof v);
                if (v > 0 && (size_t)v < total) seg = (size_t)v;
            }
        }
        uint32_t first, nn = 0;
        if (m->msg_namelen >= sizeof(struct sockaddr_in) && rx_names[i].sin_family == AF_INET)
            nn = peer_nets(t, ntohl(rx_names[i].sin_addr.s_addr), &first);
        if (!nn) {
            counts[D_UNKNOWN_SOURCE] += seg ? (total + seg - 1) / seg : 1;
            continue;
        }
        uint8_t *whole = rx_iov[i].iov_base;
        if (!total) { counts[D_MALFORMED]++; continue; }
        for (size_t off = 0; off < total; off += seg) {
            size_t n = total - off < seg ? total - off : seg;
            receive_one(t, first, nn, whole + off, n);
        }
    }
    gro_flush();  /* before recvmmsg reuses the buffers */
    return 0;
}

/* ------------------------------------------------------------------ control */

static uint8_t *ctl_in;
static int have_table;  /* nothing is forwarded before the agent's first table */
static size_t ctl_len, ctl_cap;

static int ctl_send(uint32_t type, const void *data, uint32_t len) {
    uint8_t buf[8 + 8 * NCOUNT];
    if (len > sizeof buf - 8) return -1;
    memcpy(buf, &type, 4); memcpy(buf + 4, &len, 4); memcpy(buf + 8, data, len);
    size_t done = 0;
    while (done < 8 + len) {
        ssize_t r = write(ctl_fd, buf + done, 8 + len - done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        done += (size_t)r;
    }
    return 0;
}

/* read what the agent sent; -1 at end of file (stop) or on a protocol error */
static int ctl_read(void) {
    if (ctl_cap - ctl_len < 65536) {
        size_t cap = ctl_cap ? ctl_cap * 2 : 1 << 20;
        uint8_t *nb = realloc(ctl_in, cap);
        if (!nb) return -1;
        ctl_in = nb; ctl_cap = cap;
    }
    ssize_t r = read(ctl_fd, ctl_in + ctl_len, ctl_cap - ctl_len);
    if (r < 0) return errno == EINTR || errno == EAGAIN ? 0 : -1;
    if (r == 0) return -1;
    ctl_len += (size_t)r;
    size_t pos = 0;
    while (ctl_len - pos >= 8) {
        uint32_t type, len;
        memcpy(&type, ctl_in + pos, 4); memcpy(&len, ctl_in + pos + 4, 4);
        if (len > (64u << 20) || len % 4) return -1;
        if (ctl_len - pos - 8 < len) break;
        if (type == M_TABLE) {
            uint32_t gen = 0;
            uint32_t *words = malloc(len ? len : 4);
            if (!words) return -1;
            memcpy(words, ctl_in + pos + 8, len);
            struct table *nt = parse_table(words, len / 4, &gen);
            free(words);
            if (!nt) {
                fprintf(stderr, "udpfast: bad table message (%u bytes)\n", len);
                return -1;
            }
            struct table *old = tbl;
            tbl = nt;
            have_table = 1;
            free_table(old);
            if (ctl_send(M_ACK, &gen, 4) < 0) return -1;
        } else {
            fprintf(stderr, "udpfast: unknown control message %u\n", type);
            return -1;
        }
        pos += 8 + len;
    }
    memmove(ctl_in, ctl_in + pos, ctl_len - pos);
    ctl_len -= pos;
    return 0;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t sent_counts[NCOUNT];

static int flush_counts(void) {
    if (!memcmp(sent_counts, counts, sizeof counts)) return 0;
    memcpy(sent_counts, counts, sizeof counts);
    return ctl_send(M_STATS, counts, sizeof counts);
}

/* ------------------------------------------------------------------ main */

static int parse_fd(const char *s) {
    char *end;
    long v = strtol(s, &end, 10);
    return *s && !*end && v >= 0 && v < 65536 ? (int)v : -1;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: udpfast TUN_FD SOCK_FD CTL_FD FLAGS\n");
        return 2;
    }
    tun_fd = parse_fd(argv[1]); sock_fd = parse_fd(argv[2]); ctl_fd = parse_fd(argv[3]);
    int want = parse_fd(argv[4]);
    if (tun_fd < 0 || sock_fd < 0 || ctl_fd < 0 || want < 0) {
        fprintf(stderr, "udpfast: bad arguments\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    /* sends block (back-pressure, as the Python loop); reads use MSG_DONTWAIT / O_NONBLOCK */
    int fl = fcntl(sock_fd, F_GETFL);
    if (fl < 0 || fcntl(sock_fd, F_SETFL, fl & ~O_NONBLOCK) < 0) { perror("udpfast: socket"); return 2; }
    fl = fcntl(tun_fd, F_GETFL);
    if (fl < 0 || fcntl(tun_fd, F_SETFL, fl | O_NONBLOCK) < 0) { perror("udpfast: tun"); return 2; }
    /* what the kernel can do (as the Python Forwarder's constructor finds out) */
    features = want & F_GRO;
    int one = 1, v = 0;
    socklen_t vl = sizeof v;
    if ((want & F_GSO) && getsockopt(sock_fd, SOL_UDP, UDP_SEGMENT_OPT, &v, &vl) == 0)
        features |= F_GSO;
    if ((want & F_UDPGRO) && setsockopt(sock_fd, SOL_UDP, UDP_GRO_OPT, &one, sizeof one) == 0)
        features |= F_UDPGRO;
    if ((want & F_TSO) && (features & F_GSO) &&
        ioctl(tun_fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4) == 0)
        features |= F_TSO;
    if (!(features & F_TSO)) ioctl(tun_fd, TUNSETOFFLOAD, 0);
    if (!(features & F_UDPGRO)) { int zero = 0; setsockopt(sock_fd, SOL_UDP, UDP_GRO_OPT, &zero, sizeof zero); }

    tx_buf = malloc((size_t)BATCH * (VNET_LEN + BUF_SIZE));
    rx_buf = malloc((size_t)BATCH * BUF_SIZE);
    if (!tx_buf || !rx_buf) { fprintf(stderr, "udpfast: out of memory\n"); return 2; }
    for (int i = 0; i < BATCH; i++) {
        tx_msgs[i].msg_hdr = (struct msghdr){.msg_name = &tx_names[i], .msg_namelen = sizeof tx_names[i],
                                             .msg_iov = &tx_iov[i], .msg_iovlen = 1};
        rx_iov[i] = (struct iovec){rx_buf + (size_t)i * BUF_SIZE, BUF_SIZE};
        rx_msgs[i].msg_hdr = (struct msghdr){.msg_name = &rx_names[i], .msg_namelen = sizeof rx_names[i],
                                             .msg_iov = &rx_iov[i], .msg_iovlen = 1};
    }
    uint32_t hello[2] = {(uint32_t)features, (uint32_t)getpid()};
    if (ctl_send(M_HELLO, hello, sizeof hello) < 0) return 1;
    while (!have_table)  /* blocking: the control socket is */
        if (ctl_read() < 0) return 0;

    struct pollfd pfd[3] = {{tun_fd, POLLIN, 0}, {sock_fd, POLLIN, 0}, {ctl_fd, POLLIN, 0}};
    int tun_busy = 1, udp_busy = 1;
    double flush_at = 0, ctl_at = 0;
    for (;;) {
        if (tun_busy) tun_busy = !tun_to_udp();
        if (udp_busy) udp_busy = !udp_to_tun();
        double t = now();
        if (t >= flush_at) {
            if (flush_counts() < 0) return 1;
            flush_at = t + 0.05;
        }
        if (tun_busy || udp_busy) {
            if (t >= ctl_at) {  /* a busy loop still answers the agent, every few ms */
                struct pollfd c = {ctl_fd, POLLIN, 0};
                if (poll(&c, 1, 0) > 0 && ctl_read() < 0) break;
                ctl_at = t + 0.005;
            }
            continue;
        }
        int dirty = memcmp(sent_counts, counts, sizeof counts) != 0;
        int r = poll(pfd, 3, dirty ? 50 : -1);
        if (r < 0) {
            if (errno == EINTR) continue;
            perror("udpfast: poll");
            return 1;
        }
        if (r == 0) { tun_busy = udp_busy = 1; continue; }
        if (pfd[2].revents && ctl_read() < 0) break;
        if (pfd[0].revents & (POLLERR | POLLNVAL)) {
            fprintf(stderr, "udpfast: TUN device gone\n");
            flush_counts();
            return 3;
        }
        if (pfd[0].revents) tun_busy = 1;
        if (pfd[1].revents) udp_busy = 1;
    }
    flush_counts();
    return 0;
}
