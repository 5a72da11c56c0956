/* Tight loop of BPF_PROG_TEST_RUN calls with repeat=1, built as a shared
 * object and called through ctypes: the kernel copies a fresh packet for
 * every call, so a rewriting program never sees its own output, and no
 * Python runs between calls.
 *
 * Flow variation (vary != 0): before each call, a 32-bit counter c =
 * flow_base + (i mod flow_mod) is written into the frame: its low 16 bits as
 * the source port (at sport_off), its high 16 bits into the low half of the
 * IPv4 source address (at saddr_off + 2). The IPv4 header checksum is not
 * fixed up: the data plane does not check it. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/bpf.h>

struct xdp_ctx {
	uint32_t data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex;
};

static void put16(uint8_t *p, uint32_t v)
{
	p[0] = (v >> 8) & 0xff;
	p[1] = v & 0xff;
}

/* Returns 0, or -errno of the first failing call. durations[i] gets the
 * kernel-reported time of call i in ns; *unexpected counts calls whose
 * return value was not expect_action. */
int bench_run(int prog_fd, const uint8_t *frame, uint32_t len, uint32_t ingress_ifindex, uint32_t n,
	      int vary, uint32_t sport_off, uint32_t saddr_off, uint64_t flow_base, uint64_t flow_mod,
	      uint64_t *flow_index, uint32_t *durations, uint32_t expect_action, uint32_t *unexpected)
{
	uint8_t buf[2048], out[2048 + 256];
	struct xdp_ctx ctx = { .data = 0, .data_end = len, .ingress_ifindex = ingress_ifindex };
	union bpf_attr attr;
	uint32_t bad = 0;

	if (len > sizeof(buf))
		return -EINVAL;
	memcpy(buf, frame, len);
	for (uint32_t i = 0; i < n; i++) {
		if (vary) {
			uint64_t c = flow_base + (flow_mod ? (*flow_index % flow_mod) : *flow_index);

			(*flow_index)++;
			put16(buf + sport_off, (uint32_t)c);
			put16(buf + saddr_off + 2, (uint32_t)(c >> 16));
		}
		memset(&attr, 0, sizeof(attr));
		attr.test.prog_fd = prog_fd;
		attr.test.data_in = (uint64_t)(uintptr_t)buf;
		attr.test.data_size_in = len;
		attr.test.data_out = (uint64_t)(uintptr_t)out;
		attr.test.data_size_out = sizeof(out);
		attr.test.ctx_in = (uint64_t)(uintptr_t)&ctx;
		attr.test.ctx_size_in = sizeof(ctx);
		attr.test.repeat = 1;
		if (syscall(__NR_bpf, BPF_PROG_TEST_RUN, &attr, sizeof(attr)) < 0)
			return -errno;
		durations[i] = attr.test.duration;
		if (attr.test.retval != expect_action)
			bad++;
	}
	*unexpected = bad;
	return 0;
}
