/*
 * spore-reseed HEX: mix fresh entropy into the kernel's pool and reseed the
 * CRNG at once.
 *
 * A clone resumes with its template's CRNG state, so without a reseed every
 * clone would return the same "random" bytes.  A kernel with the vmgenid
 * driver reseeds by itself when the VM generation ID changes; the demo
 * guest's kernel (Debian cloud) has no such driver, so the guest channel
 * hook calls this with the seed the agent sends each clone.
 *
 * Built static by guest/build.sh (the guest has no libc).  Exit status 0 on
 * success, 1 with a message on stderr otherwise.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MAX_SEED 256

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

int main(int argc, char **argv)
{
	struct {
		struct rand_pool_info info;
		unsigned char buf[MAX_SEED];
	} req;
	size_t len, i;
	int fd;

	if (argc != 2) {
		fprintf(stderr, "usage: spore-reseed HEXSEED\n");
		return 1;
	}
	len = strlen(argv[1]);
	if (len == 0 || len % 2 != 0 || len / 2 > MAX_SEED) {
		fprintf(stderr, "spore-reseed: seed must be 2..%d hex digits, even\n", 2 * MAX_SEED);
		return 1;
	}
	for (i = 0; i < len / 2; i++) {
		int hi = hexval(argv[1][2 * i]), lo = hexval(argv[1][2 * i + 1]);
		if (hi < 0 || lo < 0) {
			fprintf(stderr, "spore-reseed: seed is not hex\n");
			return 1;
		}
		req.buf[i] = (unsigned char)(hi << 4 | lo);
	}
	req.info.buf_size = (int)(len / 2);
	req.info.entropy_count = (int)(len / 2 * 8);
	fd = open("/dev/urandom", O_RDWR);
	if (fd < 0) {
		perror("spore-reseed: /dev/urandom");
		return 1;
	}
	if (ioctl(fd, RNDADDENTROPY, &req.info) != 0) {
		perror("spore-reseed: RNDADDENTROPY");
		return 1;
	}
	/* ENODATA: the CRNG is not initialised yet; it will be seeded from
	 * the pool (which now holds the seed) when it is. */
	if (ioctl(fd, RNDRESEEDCRNG) != 0 && errno != ENODATA) {
		perror("spore-reseed: RNDRESEEDCRNG");
		return 1;
	}
	close(fd);
	return 0;
}
