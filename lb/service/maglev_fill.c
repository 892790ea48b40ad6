/* The population loop of Maglev (Eisenbud et al., NSDI 2016, section 3.4), the
 * one part of lb/service/maglev.py that is too slow in Python: a table of
 * 131,071 slots takes 0.2 s there. It computes exactly what maglev._fill does
 * (tests hold them equal); the hashes and permutation parameters stay in
 * Python, where the cross-node contract is written down.
 *
 * Built into a shared library at install (tools/setup.sh, the image's build
 * stage) and opened through cffi, as loader/libbpf.py opens libbpf. */
#include <stdint.h>
#include <stdlib.h>

/* Backend k (the k-th turn) claims its most preferred free slot in turn,
 * starting at offsets[k] and stepping by skips[k], and writes labels[k] there,
 * until all `size` slots are filled. Returns 0, or -1 when out of memory. */
int xdplb_maglev_fill(const uint32_t *offsets, const uint32_t *skips,
		      const uint32_t *labels, uint32_t n, uint32_t size,
		      uint32_t *entry)
{
	uint8_t *taken;
	uint32_t *pos;
	uint32_t filled = 0;

	if (n == 0 || size == 0)
		return 0;
	taken = calloc(size, 1);
	pos = malloc((size_t)n * sizeof(*pos));
	if (!taken || !pos) {
		free(taken);
		free(pos);
		return -1;
	}
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
	free(taken);
	free(pos);
	return 0;
}
