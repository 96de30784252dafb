/*
 * A leak from inside a function the compiler inlined (built -O1 -g): a tracer that names only
 * the symbol of the call blames the function it was inlined into.
 *   sessions N   -- open N sessions, each remembered with a block never freed
 *   quit
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *volatile sink;

static inline __attribute__((always_inline)) void remember_session(size_t size)
{
	sink = malloc(size); /* REMEMBER_SESSION_LINE */
}

__attribute__((noinline)) static void open_sessions(long count)
{
	for (long i = 0; i < count; i++)
		remember_session(64);
}

int main(void)
{
	char line[64];
	long n;
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	while (fgets(line, sizeof(line), stdin)) {
		if (sscanf(line, "sessions %ld", &n) == 1)
			open_sessions(n);
		else if (!strncmp(line, "quit", 4))
			break;
		printf("ok\n");
	}
	return 0;
}
