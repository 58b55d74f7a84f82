// io_uring on an inherited socket, for tests/kernel/test_bypass_api.py and test_bypass_splice.py.
// Built with gcc -luring (liburing-dev) into a cache directory by tests/kernel/helpers.py.
//
//   uring recv FD     IORING_OP_RECV until end of file; the bytes go to stdout
//   uring send FD     stdin, to end of file, through IORING_OP_SEND
//   uring splice FD [N]  IORING_OP_SPLICE socket -> pipe (then read(2) pipe -> stdout) until
//                     end of file or, given N, until N bytes; then it answers "ok" (write(2))
//   uring splice-sqpoll FD [N]  the same on an IORING_SETUP_SQPOLL ring (the kernel's SQ
//                     thread submits)
//   uring splice-fixed FD [N]   the same with FD registered as a fixed file
//                     (SPLICE_F_FD_IN_FIXED)
//   uring recv-waitall FD N  one IORING_OP_RECV of N bytes with MSG_WAITALL; the bytes to
//                     stdout
//
// Exit 0 at end of file (recv, splice) or when all is sent; on an error from the ring it
// prints "error <errno>" on stderr and exits 3.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK (64 * 1024)

static struct io_uring ring;

static int submit_wait(void) {
	struct io_uring_cqe *cqe;
	int ret = io_uring_submit(&ring);
	if (ret < 0) {
		fprintf(stderr, "submit %s\n", strerror(-ret));
		exit(4);
	}
	ret = io_uring_wait_cqe(&ring, &cqe);
	if (ret < 0) {
		fprintf(stderr, "wait %s\n", strerror(-ret));
		exit(4);
	}
	int res = cqe->res;
	io_uring_cqe_seen(&ring, cqe);
	return res;
}

static void fail(int res) {
	fprintf(stderr, "error %d\n", -res);
	exit(3);
}

static void write_all(int fd, const char *p, size_t n) {
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			perror("write");
			exit(4);
		}
		p += w;
		n -= (size_t)w;
	}
}

int main(int argc, char **argv) {
	static char buf[CHUNK];
	if (argc != 3 && argc != 4) {
		fprintf(stderr, "usage: uring recv|recv-waitall|send|splice|splice-sqpoll|splice-fixed FD [N]\n");
		return 2;
	}
	int fd = atoi(argv[2]);
	int sqpoll = !strcmp(argv[1], "splice-sqpoll"), fixed = !strcmp(argv[1], "splice-fixed");
	int ret = io_uring_queue_init(8, &ring, sqpoll ? IORING_SETUP_SQPOLL : 0);
	if (ret < 0) {
		fprintf(stderr, "io_uring_queue_init %s\n", strerror(-ret));
		return 5;
	}
	if (fixed && (ret = io_uring_register_files(&ring, &fd, 1)) < 0) {
		fprintf(stderr, "io_uring_register_files %s\n", strerror(-ret));
		return 5;
	}
	if (!strcmp(argv[1], "recv")) {
		for (;;) {
			io_uring_prep_recv(io_uring_get_sqe(&ring), fd, buf, CHUNK, 0);
			int res = submit_wait();
			if (res < 0)
				fail(res);
			if (res == 0)
				return 0;
			write_all(1, buf, (size_t)res);
		}
	} else if (!strcmp(argv[1], "recv-waitall")) {
		size_t n = argc == 4 ? (size_t)atol(argv[3]) : 0;
		char *big = malloc(n ? n : 1);
		io_uring_prep_recv(io_uring_get_sqe(&ring), fd, big, n, MSG_WAITALL);
		int res = submit_wait();
		if (res < 0)
			fail(res);
		write_all(1, big, (size_t)res);
		return 0;
	} else if (!strcmp(argv[1], "send")) {
		for (;;) {
			ssize_t n = read(0, buf, CHUNK);
			if (n < 0) {
				perror("read");
				return 4;
			}
			if (n == 0)
				return 0;
			for (ssize_t off = 0; off < n;) {
				io_uring_prep_send(io_uring_get_sqe(&ring), fd, buf + off, (size_t)(n - off),
						   MSG_NOSIGNAL);
				int res = submit_wait();
				if (res < 0)
					fail(res);
				off += res;
			}
		}
	} else if (!strcmp(argv[1], "splice") || sqpoll || fixed) {
		int p[2];
		if (pipe(p) < 0) {
			perror("pipe");
			return 4;
		}
		fcntl(p[1], F_SETPIPE_SZ, CHUNK);
		long want = argc == 4 ? atol(argv[3]) : -1, got = 0;
		for (;;) {
			if (want >= 0 && got == want) {
				if (write(fd, "ok", 2) != 2)
					perror("write ok");
				return 0;
			}
			unsigned int n = want >= 0 && want - got < CHUNK ? (unsigned int)(want - got)
									  : CHUNK;
			if (fixed)
				io_uring_prep_splice(io_uring_get_sqe(&ring), 0, -1, p[1], -1, n,
						     SPLICE_F_FD_IN_FIXED);
			else
				io_uring_prep_splice(io_uring_get_sqe(&ring), fd, -1, p[1], -1, n, 0);
			int res = submit_wait();
			if (res < 0)
				fail(res);
			if (res == 0)
				return 0;
			got += res;
			for (int left = res; left;) {
				ssize_t n = read(p[0], buf, (size_t)left);
				if (n <= 0) {
					perror("read pipe");
					return 4;
				}
				write_all(1, buf, (size_t)n);
				left -= (int)n;
			}
		}
	}
	fprintf(stderr, "unknown mode %s\n", argv[1]);
	return 2;
}
