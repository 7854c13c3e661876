/*
 * spore-ioloop FILE BLOCKS: a guest that reads and writes its disk without
 * pause and checks every byte, for the agent-restart tests and benchmark.
 *
 * Overwrites FILE (an existing file, e.g. /data/filler-000, whose blocks
 * come from the image: the first pass allocates the host's overlay) in
 * place, 4 KiB at a time with O_DIRECT (no guest page cache: every read
 * and write reaches the disk), never calling fsync: what the host
 * acknowledged must read back whether it flushed or not.  Block b of pass
 * g holds (magic, b, g) repeated.  Each write is read back at once, and a
 * random block written before is read and checked too; every full pass
 * ends with a check of every block written so far.
 *
 * Prints to stdout once a second:
 *   SPORE-IO ops=N max_ms=M errors=E bad=B
 * (M: the longest single read or write in that second; E: reads or writes
 * that failed; B: blocks that read back other than last written), and
 *   SPORE-IO-VERIFIED pass=G blocks=N bad=B
 * after each full check.  Runs until killed.
 *
 * Built static by guest/build.sh (the guest has no libc).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define MAGIC 0x73706f72652d696fULL /* "spore-io" */

static uint64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void fill(uint64_t *buf, uint64_t block, uint64_t pass)
{
	for (int i = 0; i < BLOCK / 8; i += 3) {
		buf[i] = MAGIC;
		if (i + 1 < BLOCK / 8)
			buf[i + 1] = block;
		if (i + 2 < BLOCK / 8)
			buf[i + 2] = pass;
	}
}

static long long ops, errors, bad;
static uint64_t max_us;

/* One timed pread or pwrite of a whole block; 0 on success. */
static int io(int fd, int write, uint64_t *buf, uint64_t block)
{
	uint64_t t = now_us();
	ssize_t n = write ? pwrite(fd, buf, BLOCK, block * BLOCK)
			  : pread(fd, buf, BLOCK, block * BLOCK);
	uint64_t took = now_us() - t;
	if (took > max_us)
		max_us = took;
	ops++;
	if (n != BLOCK) {
		errors++;
		printf("SPORE-IO-ERROR %s block=%llu: %s\n", write ? "write" : "read",
		       (unsigned long long)block, n < 0 ? strerror(errno) : "short");
		fflush(stdout);
		return -1;
	}
	return 0;
}

/* Reads block b back and compares it with what was last written there. */
static void check(int fd, uint64_t *buf, uint64_t *want, uint64_t b, uint64_t *expect)
{
	if (io(fd, 0, buf, b))
		return;
	fill(want, b, expect[b]);
	if (memcmp(buf, want, BLOCK)) {
		bad++;
		printf("SPORE-IO-BAD block=%llu pass=%llu\n", (unsigned long long)b,
		       (unsigned long long)expect[b]);
		fflush(stdout);
	}
}

int main(int argc, char **argv)
{
	uint64_t *buf, *want, *expect;
	uint64_t blocks, written = 0, pass = 1, last_report;
	int fd;

	if (argc != 3) {
		fprintf(stderr, "usage: spore-ioloop FILE BLOCKS\n");
		return 1;
	}
	blocks = strtoull(argv[2], NULL, 10);
	fd = open(argv[1], O_RDWR | O_DIRECT);
	if (fd < 0 || blocks == 0) {
		fprintf(stderr, "spore-ioloop: %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	if (posix_memalign((void **)&buf, BLOCK, BLOCK) || posix_memalign((void **)&want, BLOCK, BLOCK)
	    || !(expect = calloc(blocks, sizeof(uint64_t)))) {
		fprintf(stderr, "spore-ioloop: no memory\n");
		return 1;
	}
	srand(1);
	last_report = now_us();
	for (uint64_t i = 0;; i++) {
		uint64_t b = i % blocks;
		if (b == 0 && i > 0) {
			long long before = bad;
			for (uint64_t k = 0; k < blocks; k++)
				check(fd, buf, want, k, expect);
			printf("SPORE-IO-VERIFIED pass=%llu blocks=%llu bad=%lld\n",
			       (unsigned long long)pass, (unsigned long long)blocks, bad - before);
			fflush(stdout);
			pass++;
		}
		fill(buf, b, pass);
		if (io(fd, 1, buf, b) == 0) {
			expect[b] = pass;
			if (written < b + 1)
				written = b + 1;
		}
		check(fd, buf, want, b, expect);
		if (written > 1 || pass > 1) {
			uint64_t r = (uint64_t)rand() % (pass > 1 ? blocks : written);
			if (expect[r])
				check(fd, buf, want, r, expect);
		}
		uint64_t t = now_us();
		if (t - last_report >= 1000000) {
			printf("SPORE-IO ops=%lld max_ms=%llu errors=%lld bad=%lld\n", ops,
			       (unsigned long long)(max_us / 1000), errors, bad);
			fflush(stdout);
			max_us = 0;
			last_report = t;
		}
	}
}
