/*
 * A process that never stops allocating, for the tests of tracing under load.
 * Usage: busy THREADS [LEAK_EVERY]
 *
 * Each of THREADS threads mallocs and frees in a loop at full speed, and leaks one 24-byte
 * block every LEAK_EVERY turns (default 1000) from a function of its own, leak_in_thread_N
 * (N = its index modulo 8), so that a tracer that goes blind to one thread misses its site.
 * It prints "ready PID" once every thread runs, then allocates until killed.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void *volatile sink;

#define LEAKER(n) \
	__attribute__((noinline)) static void leak_in_thread_##n(void) { sink = malloc(24); }
LEAKER(0)
LEAKER(1)
LEAKER(2)
LEAKER(3)
LEAKER(4)
LEAKER(5)
LEAKER(6)
LEAKER(7)

static void (*const leakers[8])(void) = {
	leak_in_thread_0, leak_in_thread_1, leak_in_thread_2, leak_in_thread_3,
	leak_in_thread_4, leak_in_thread_5, leak_in_thread_6, leak_in_thread_7,
};

static long leak_every = 1000;
static pthread_barrier_t started;

static void *allocate_forever(void *arg)
{
	void (*leak)(void) = leakers[(long)arg % 8];
	pthread_barrier_wait(&started);
	for (long turn = 1;; turn++) {
		void *p = malloc(64 + turn % 512);
		sink = p;
		free(p);
		if (turn % leak_every == 0)
			leak();
	}
	return NULL;
}

int main(int argc, char **argv)
{
	long threads = argc > 1 ? atol(argv[1]) : 1;
	if (argc > 2)
		leak_every = atol(argv[2]);
	if (threads < 1 || leak_every < 1) {
		fprintf(stderr, "usage: busy THREADS [LEAK_EVERY]\n");
		return 2;
	}
	pthread_barrier_init(&started, NULL, threads + 1);
	for (long i = 0; i < threads; i++) {
		pthread_t t;
		if (pthread_create(&t, NULL, allocate_forever, (void *)i) != 0) {
			perror("pthread_create");
			return 1;
		}
	}
	pthread_barrier_wait(&started);
	printf("ready %d\n", getpid());
	fflush(stdout);
	for (;;)
		pause();
}
