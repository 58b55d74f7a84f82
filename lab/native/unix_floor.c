/*
 * unix_floor: the in-kernel IPC floor for the pod benchmark.
 *
 * Measures an AF_UNIX stream socketpair between two processes the way qperf
 * measures TCP, so the numbers sit side by side with qperf's:
 *   lat: ping-pong of msg_size bytes; prints one-way latency (round trip / 2)
 *   bw:  one side writes msg_size messages, the other reads; prints the
 *        receiver's rate in bytes per second
 * The two ends are pinned to two different CPUs (when there are two), as qperf's
 * client and server end up: left to the scheduler, a ping-pong pair on a VM bounces
 * between CPUs and the figure swings 2-3x from run to run (measured: 5 vs 14 us).
 * Usage: unix_floor lat|bw MSG_SIZE SECONDS   -> one JSON object on stdout
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Pin the calling process to one CPU (quietly a no-op on a single-CPU machine). */
static void pin_to(int cpu)
{
	cpu_set_t set;
	if (cpu >= sysconf(_SC_NPROCESSORS_ONLN))
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	sched_setaffinity(0, sizeof(set), &set);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Read exactly n bytes; 0 on EOF. */
static int read_full(int fd, char *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);
		if (r <= 0)
			return 0;
		got += r;
	}
	return 1;
}

static int write_full(int fd, const char *buf, size_t n)
{
	size_t put = 0;
	while (put < n) {
		ssize_t w = write(fd, buf + put, n - put);
		if (w <= 0)
			return 0;
		put += w;
	}
	return 1;
}

int main(int argc, char **argv)
{
	if (argc != 4 || (strcmp(argv[1], "lat") && strcmp(argv[1], "bw"))) {
		fprintf(stderr, "usage: %s lat|bw MSG_SIZE SECONDS\n", argv[0]);
		return 2;
	}
	int lat = !strcmp(argv[1], "lat");
	size_t size = strtoul(argv[2], NULL, 10);
	double seconds = atof(argv[3]);
	if (size == 0 || seconds <= 0) {
		fprintf(stderr, "MSG_SIZE and SECONDS must be positive\n");
		return 2;
	}
	int sv[2], report[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) || pipe(report)) {
		perror("socketpair");
		return 1;
	}
	char *buf = calloc(1, size);
	pid_t child = fork();
	pin_to(child == 0 ? 1 : 0);
	if (child == 0) {
		/* Peer: echo (lat) or sink (bw) until EOF, then report bytes read. */
		close(sv[0]);
		unsigned long long total = 0;
		double first = 0, last = 0;
		if (lat) {
			while (read_full(sv[1], buf, size) && write_full(sv[1], buf, size))
				;
		} else {
			ssize_t r;
			while ((r = read(sv[1], buf, size)) > 0) {
				if (!first)
					first = now();
				total += r;
				last = now();
			}
		}
		double rate = last > first ? total / (last - first) : 0;
		if (write(report[1], &rate, sizeof(rate)) != sizeof(rate))
			_exit(1);
		_exit(0);
	}
	close(sv[1]);
	double start = now(), end = start + seconds;
	unsigned long long rounds = 0;
	if (lat) {
		while (now() < end) {
			if (!write_full(sv[0], buf, size) || !read_full(sv[0], buf, size))
				break;
			rounds++;
		}
	} else {
		while (now() < end)
			if (!write_full(sv[0], buf, size))
				break;
	}
	double elapsed = now() - start;
	shutdown(sv[0], SHUT_WR);
	double rate = 0;
	if (read(report[0], &rate, sizeof(rate)) != sizeof(rate))
		rate = 0;
	waitpid(child, NULL, 0);
	if (lat)
		printf("{\"test\": \"lat\", \"msg_size\": %zu, \"latency_us\": %.3f}\n", size,
		       rounds ? elapsed / rounds / 2 * 1e6 : -1.0);
	else
		printf("{\"test\": \"bw\", \"msg_size\": %zu, \"bytes_per_sec\": %.0f}\n", size, rate);
	return 0;
}
