/* The fill loop of lb/maglev.py build_table, in C: the same algorithm, the same table.
 * Python walks 65,537 slots in about 30 ms; this takes well under 1 ms, which keeps a
 * daemon's add-backend answer short. tests/test_maglev.py checks both agree. */
#include <stdint.h>

/* table[size] is filled with values of order[]; -1 stays nowhere once n > 0 and a weight > 0.
 * slots[] (each backend's next candidate) and credit[] are scratch, n entries each. */
void maglev_fill(int32_t *table, uint32_t size, uint32_t n, const int32_t *order, uint32_t *slots,
		 const uint32_t *skips, const uint32_t *weights, uint32_t max_weight, uint32_t *credit)
{
	uint32_t filled = 0;

	for (uint32_t s = 0; s < size; s++)
		table[s] = -1;
	for (;;) {
		for (uint32_t j = 0; j < n; j++) {
			credit[j] += weights[j];
			if (credit[j] < max_weight)
				continue;
			credit[j] -= max_weight;
			uint32_t slot = slots[j], skip = skips[j];

			while (table[slot] >= 0) {
				slot += skip;
				if (slot >= size)
					slot -= size;
			}
			table[slot] = order[j];
			slot += skip;
			slots[j] = slot >= size ? slot - size : slot;
			if (++filled == size)
				return;
		}
	}
}
