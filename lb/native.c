/* The agent's one userspace C library, for the loops that are too slow in
 * Python at 10k services and more: whole Maglev tables, and the
 * pre-filter's bit counting. Each computes exactly what its Python twin
 * computes (lb/service/maglev.py, _python_populate; lb/prefilter.py,
 * _count_py), and tests hold them equal.
 *
 * Built into a shared library at install (tools/native.sh, run by
 * tools/setup.sh and the image's build) and opened through cffi by
 * lb/native.py, as loader/libbpf.py opens libbpf. */
#include <arpa/inet.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../bpf/lib/filter_hash.h"

/* --- Maglev ----------------------------------------------------------------
 *
 * A whole table, as lb/service/maglev.py's populate_array computes it in
 * Python (tests hold the two equal): the backends sorted by name, each
 * name's permutation from its keyed BLAKE2b digest, then the population
 * loop of Eisenbud et al., NSDI 2016, section 3.4. maglev.py writes the
 * cross-node contract down; this is the same contract, compiled. */

/* BLAKE2b (RFC 7693) of a message up to any length, 16-byte digest, no
 * key, with a 16-byte personalization: what Python's hashlib.blake2b
 * computes with digest_size=16 and person=. */
static const uint64_t blake2b_iv[8] = {
	0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
	0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
	0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t blake2b_sigma[12][16] = {
	{ 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 },
	{ 14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3 },
	{ 11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4 },
	{ 7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8 },
	{ 9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13 },
	{ 2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9 },
	{ 12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11 },
	{ 13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10 },
	{ 6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5 },
	{ 10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0 },
	{ 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 },
	{ 14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3 },
};

static uint64_t load64(const uint8_t *p)
{
	uint64_t v = 0;

	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static uint64_t rotr64(uint64_t w, unsigned c)
{
	return w >> c | w << (64 - c);
}

#define B2B_G(a, b, c, d, x, y)                 \
	do {                                    \
		v[a] += v[b] + (x);             \
		v[d] = rotr64(v[d] ^ v[a], 32); \
		v[c] += v[d];                   \
		v[b] = rotr64(v[b] ^ v[c], 24); \
		v[a] += v[b] + (y);             \
		v[d] = rotr64(v[d] ^ v[a], 16); \
		v[c] += v[d];                   \
		v[b] = rotr64(v[b] ^ v[c], 63); \
	} while (0)

static void blake2b_compress(uint64_t h[8], const uint8_t block[128],
			     uint64_t t, int last)
{
	uint64_t v[16], m[16];

	for (int i = 0; i < 8; i++) {
		v[i] = h[i];
		v[i + 8] = blake2b_iv[i];
	}
	v[12] ^= t;
	if (last)
		v[14] = ~v[14];
	for (int i = 0; i < 16; i++)
		m[i] = load64(block + 8 * i);
	for (int r = 0; r < 12; r++) {
		const uint8_t *s = blake2b_sigma[r];

		B2B_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
		B2B_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
		B2B_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
		B2B_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
		B2B_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
		B2B_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
		B2B_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
		B2B_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
	}
	for (int i = 0; i < 8; i++)
		h[i] ^= v[i] ^ v[i + 8];
}

/* The digest's two little-endian halves, as maglev.name_hashes reads them. */
static void blake2b_16(const uint8_t *msg, size_t len,
		       const uint8_t person[16], uint64_t out[2])
{
	uint64_t h[8];
	uint8_t block[128];
	uint64_t t = 0;

	for (int i = 0; i < 8; i++)
		h[i] = blake2b_iv[i];
	/* The parameter block: digest length 16, no key, fanout 1, depth 1;
	 * the personalization in its last 16 bytes. */
	h[0] ^= 0x01010000ULL | 16;
	h[6] ^= load64(person);
	h[7] ^= load64(person + 8);
	while (len > 128) {
		t += 128;
		blake2b_compress(h, msg, t, 0);
		msg += 128;
		len -= 128;
	}
	memset(block, 0, sizeof(block));
	memcpy(block, msg, len);
	t += len;
	blake2b_compress(h, block, t, 1);
	out[0] = h[0];
	out[1] = h[1];
}

struct named {
	const uint8_t *name;
	uint32_t len;
	uint32_t index;
};

/* Code point order of the names: the byte order of their UTF-8. */
static int by_name(const void *a, const void *b)
{
	const struct named *x = a, *y = b;
	uint32_t common = x->len < y->len ? x->len : y->len;
	int c = memcmp(x->name, y->name, common);

	if (c)
		return c;
	return x->len < y->len ? -1 : x->len > y->len;
}

/* Backend k (the k-th turn) claims its most preferred free slot in turn,
 * starting at offsets[k] and stepping by skips[k], and writes labels[k]
 * there, until all `size` slots are filled. */
static void fill(const uint32_t *offsets, const uint32_t *skips,
		 const uint32_t *labels, uint32_t n, uint32_t size,
		 uint8_t *taken, uint32_t *pos, uint32_t *entry)
{
	uint32_t filled = 0;

	for (uint32_t k = 0; k < n; k++)
		pos[k] = offsets[k];
	while (filled < size) {
		for (uint32_t k = 0; k < n && filled < size; k++) {
			uint32_t c = pos[k];

			while (taken[c]) {
				c += skips[k];
				if (c >= size)
					c -= size;
			}
			taken[c] = 1;
			entry[c] = labels[k];
			filled++;
			c += skips[k];
			pos[k] = c >= size ? c - size : c;
		}
	}
}

/* A Maglev table of prime `size` >= n slots for n > 0 backends named by
 * the UTF-8 strings of lens[i] bytes one after another in names: per slot,
 * labels[i] of the backend it goes to. `person` is the hashes'
 * personalization (16 bytes, zero-padded). Returns 0, -1 when out of
 * memory (or for sizes it cannot fill), or -2 - i when backend i's name is
 * another's too. */
long xdplb_maglev_populate(const uint8_t *names, const uint32_t *lens,
			   const uint32_t *labels, uint32_t n, uint32_t size,
			   const uint8_t *person, uint32_t *entry)
{
	struct named *order = malloc((size_t)n * sizeof(*order));
	uint32_t *params = malloc((size_t)n * 4 * sizeof(*params));
	uint8_t *taken = calloc(size, 1);
	long ret = 0;

	if (!order || !params || !taken || n == 0 || size < 2 || size < n) {
		ret = -1;
		goto out;
	}
	for (uint32_t i = 0, at = 0; i < n; at += lens[i], i++)
		order[i] = (struct named){ names + at, lens[i], i };
	qsort(order, n, sizeof(*order), by_name);
	for (uint32_t k = 0; k < n; k++) {
		uint64_t h[2];

		if (k && by_name(&order[k - 1], &order[k]) == 0) {
			ret = -2 - (long)order[k].index;
			goto out;
		}
		blake2b_16(order[k].name, order[k].len, person, h);
		params[k] = h[0] % size;                 /* offset */
		params[n + k] = h[1] % (size - 1) + 1;   /* skip */
		params[2 * n + k] = labels[order[k].index];
	}
	fill(params, params + n, params + 2 * n, n, size, taken, params + 3 * n,
	     entry);
out:
	free(order);
	free(params);
	free(taken);
	return ret;
}

/* A bit's count stops here and the bit stays set for good, which the
 * filter allows: it may say "maybe" about traffic that is no service's,
 * never "no" about traffic that is. A byte per bit keeps the counts small
 * (4 MiB at the largest filter, in pages touched only as bits are used). */
#define FILTER_STUCK 255

/* Count n members in (delta > 0) or out of their bits in a filter of
 * `words` words (a power of two): member i is kinds[i], ports[i] and the
 * i-th of the NUL-terminated dotted quads in addrs. counts holds a count per
 * bit, values the words as counted. The word of each bit that flips goes to
 * out (room for n; a word may come more than once). Returns how many, -1
 * when out of memory, or -2 - i when member i's address does not parse
 * (then nothing is counted). */
long xdplb_filter_count(const char *addrs, const uint32_t *kinds,
			const uint32_t *ports, uint32_t n, int delta,
			uint32_t words, uint8_t *counts, uint64_t *values,
			uint32_t *out)
{
	uint32_t *bits = malloc((size_t)n * sizeof(*bits) + 1);
	const char *addr = addrs;
	long reported = 0;

	if (!bits)
		return -1;
	for (uint32_t i = 0; i < n; i++) {
		struct in_addr a;

		if (inet_pton(AF_INET, addr, &a) != 1) {
			free(bits);
			return -2 - (long)i;
		}
		bits[i] = lb_filter_hash(kinds[i], ntohl(a.s_addr), ports[i]) &
			  (words * 64 - 1);
		addr += strlen(addr) + 1;
	}
	for (uint32_t i = 0; i < n; i++) {
		uint32_t bit = bits[i];
		uint8_t c = counts[bit];

		if (c == FILTER_STUCK || (delta < 0 && c == 0))
			continue;
		counts[bit] = delta > 0 ? c + 1 : c - 1;
		if (c != (delta > 0 ? 0 : 1))
			continue;
		values[bit >> 6] ^= 1ULL << (bit & 63);
		out[reported++] = bit >> 6;
	}
	free(bits);
	return reported;
}
