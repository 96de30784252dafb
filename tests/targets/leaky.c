/*
 * A process that leaks on command, for psleak's tests and demo.
 *
 * It reads commands from stdin, one per line, and answers "ok" once the command is done,
 * so a tracer can be attached first and the exact number of leaks is known:
 *   malloc N SIZE | calloc N SIZE | realloc N SIZE | memalign N SIZE | mmap N SIZE
 *   file N | socket N | pipe N | thread N        -- leak N of them
 *   churn N SIZE                                  -- create and release N of everything
 *   threaded_malloc N SIZE                        -- a second thread leaks N blocks
 *   dup2_over N                                   -- N fds, each replaced in place by dup2
 *   close_range N                                 -- open N fds, then close_range() them
 *   exec PATH                                     -- become PATH (another leaky, say), same stdin
 *   quit
 * Each leak has its own function, so a tracer must name it.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

/* Keeps the leaked pointers reachable from nowhere the compiler could see through. */
static void *volatile sink;

__attribute__((noinline)) static void leak_malloc(size_t size) { sink = malloc(size); }

__attribute__((noinline)) static void leak_calloc(size_t size) { sink = calloc(1, size); }

__attribute__((noinline)) static void leak_realloc(size_t size)
{
	void *p = malloc(8);
	sink = realloc(p, size);
}

__attribute__((noinline)) static void leak_memalign(size_t size)
{
	void *p = NULL;
	if (posix_memalign(&p, 64, size) == 0)
		sink = p;
}

__attribute__((noinline)) static void leak_mmap(size_t size)
{
	sink = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

__attribute__((noinline)) static void leak_file(void) { open("/dev/null", O_RDONLY); }

__attribute__((noinline)) static void leak_socket(void) { socket(AF_INET, SOCK_STREAM, 0); }

__attribute__((noinline)) static void leak_pipe(void)
{
	int fds[2];
	pipe(fds);
}

static void *sleep_forever(void *arg)
{
	(void)arg;
	for (;;)
		pause();
	return NULL;
}

__attribute__((noinline)) static void leak_thread(void)
{
	pthread_t t;
	pthread_create(&t, NULL, sleep_forever, NULL);
}

static void *return_at_once(void *arg) { return arg; }

static long threaded_count, threaded_size;

static void *leak_from_thread(void *arg)
{
	for (long i = 0; i < threaded_count; i++)
		leak_malloc(threaded_size);
	return arg;
}

__attribute__((noinline)) static void threaded_malloc(long n, long size)
{
	pthread_t t;
	threaded_count = n;
	threaded_size = size;
	if (pthread_create(&t, NULL, leak_from_thread, NULL) == 0)
		pthread_join(t, NULL);
}

/* Leaves one fd open, a pipe's read end: the /dev/null it first held is closed by dup2. */
__attribute__((noinline)) static void dup2_over(void)
{
	int fd = open("/dev/null", O_RDONLY), fds[2];
	if (pipe(fds) == 0) {
		dup2(fds[0], fd);
		close(fds[0]);
		close(fds[1]);
	}
}

__attribute__((noinline)) static void close_range_of(long n)
{
	int first = open("/dev/null", O_RDONLY);
	for (long i = 1; i < n; i++)
		open("/dev/null", O_RDONLY);
	close_range(first, ~0U, 0);
}

/* Everything created here is released before it returns: a tracer must report nothing. */
__attribute__((noinline)) static void churn(long n, size_t size)
{
	for (long i = 0; i < n; i++) {
		void *a = malloc(size), *b = calloc(2, size), *c = NULL;
		a = realloc(a, size * 2);
		if (posix_memalign(&c, 64, size) == 0)
			free(c);
		free(a);
		free(b);
		void *m = mmap(NULL, size + 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		munmap(m, size + 4096);
		int fd = open("/dev/null", O_RDONLY), fds[2];
		close(fd);
		if (pipe(fds) == 0) {
			close(fds[0]);
			close(fds[1]);
		}
	}
	for (long i = 0; i < n && i < 64; i++) {
		pthread_t t;
		if (pthread_create(&t, NULL, return_at_once, NULL) == 0)
			pthread_join(t, NULL);
	}
	free(malloc(1 << 20)); /* a large malloc: mmap'd inside glibc, released by free */
}

int main(void)
{
	char cmd[32], path[256];
	long n, size;
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", getpid());
	char line[128];
	while (fgets(line, sizeof(line), stdin)) {
		size = 0;
		n = 0;
		if (sscanf(line, "%31s %ld %ld", cmd, &n, &size) < 1)
			continue;
		if (!strcmp(cmd, "quit"))
			break;
		if (!strcmp(cmd, "exec") && sscanf(line, "%*s %255s", path) == 1) {
			execl(path, path, (char *)NULL);
			printf("exec failed\n");
			continue;
		}
		for (long i = 0; i < n; i++) {
			if (!strcmp(cmd, "malloc")) leak_malloc(size);
			else if (!strcmp(cmd, "calloc")) leak_calloc(size);
			else if (!strcmp(cmd, "realloc")) leak_realloc(size);
			else if (!strcmp(cmd, "memalign")) leak_memalign(size);
			else if (!strcmp(cmd, "mmap")) leak_mmap(size);
			else if (!strcmp(cmd, "file")) leak_file();
			else if (!strcmp(cmd, "socket")) leak_socket();
			else if (!strcmp(cmd, "pipe")) leak_pipe();
			else if (!strcmp(cmd, "thread")) leak_thread();
			else if (!strcmp(cmd, "dup2_over")) dup2_over();
		}
		if (!strcmp(cmd, "churn"))
			churn(n, size);
		else if (!strcmp(cmd, "threaded_malloc"))
			threaded_malloc(n, size);
		else if (!strcmp(cmd, "close_range"))
			close_range_of(n);
		printf("ok\n");
	}
	return 0;
}
