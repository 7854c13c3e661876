/*
 * spore-poke DEVICE SECTOR: write one 512-byte sector of DEVICE ("spore\n"
 * repeated) by direct I/O, from a buffer aligned as O_DIRECT requires, so
 * that exactly 512 bytes reach the disk: less than the host's 4 KiB
 * granule, which makes the host read the rest of the granule first (busybox
 * dd's buffer is not aligned, and the kernel then goes through the page
 * cache, reading the whole page itself).
 *
 * Built static by guest/build.sh (the guest has no libc).  Exit status 0 on
 * success, 1 with a message on stderr otherwise.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	static const char pattern[] = "spore\n";
	char *end;
	void *buf;
	long long sector;
	int fd, i;

	if (argc != 3) {
		fprintf(stderr, "usage: spore-poke DEVICE SECTOR\n");
		return 1;
	}
	errno = 0;
	sector = strtoll(argv[2], &end, 10);
	if (errno || *end || sector < 0) {
		fprintf(stderr, "spore-poke: bad sector %s\n", argv[2]);
		return 1;
	}
	if (posix_memalign(&buf, 4096, 512)) {
		fprintf(stderr, "spore-poke: no memory\n");
		return 1;
	}
	for (i = 0; i < 512; i++)
		((char *)buf)[i] = pattern[i % 6];
	fd = open(argv[1], O_WRONLY | O_DIRECT);
	if (fd < 0) {
		fprintf(stderr, "spore-poke: %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	if (pwrite(fd, buf, 512, sector * 512) != 512) {
		fprintf(stderr, "spore-poke: writing sector %lld: %s\n", sector, strerror(errno));
		return 1;
	}
	if (close(fd)) {
		fprintf(stderr, "spore-poke: %s\n", strerror(errno));
		return 1;
	}
	return 0;
}
