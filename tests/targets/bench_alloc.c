/*
 * Benchmark target: waits for a line on stdin (so a tracer can attach first), then runs
 * PAIRS malloc/free pairs of SIZE bytes and prints the nanoseconds per pair. With `keep`, it
 * frees nothing: PAIRS blocks stay live (to measure what the collector holds per block).
 * Usage: bench_alloc PAIRS SIZE [free|keep]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void *volatile sink;

int main(int argc, char **argv)
{
	long pairs = argc > 1 ? atol(argv[1]) : 1000000;
	size_t size = argc > 2 ? (size_t)atol(argv[2]) : 64;
	int keep = argc > 3 && !strcmp(argv[3], "keep");
	char line[16];
	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < pairs; i++) {
		sink = malloc(size);
		if (!keep)
			free(sink);
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
	printf("%.1f\n", ns / pairs);
	fflush(stdout);
	/* stay until told to go, so the tracer sees every event before the process ends */
	fgets(line, sizeof(line), stdin);
	return 0;
}
