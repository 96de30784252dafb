/*
 * The demo's target: a toy request handler with two bugs, running until killed.
 * Every request parses into a buffer that is freed; one request in ten keeps a session
 * record nobody frees, and every fiftieth opens a log file and forgets to close it.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct session {
	char user[48];
	long id;
};

static struct session *last_session;
static char *volatile last_body; /* keeps the compiler from eliding the body's malloc/free */

__attribute__((noinline)) static struct session *remember_session(long id)
{
	struct session *s = malloc(sizeof(*s)); /* bug: never freed */
	snprintf(s->user, sizeof(s->user), "user-%ld", id);
	s->id = id;
	return s;
}

__attribute__((noinline)) static void rotate_log(void)
{
	open("/dev/null", O_WRONLY); /* bug: the fd is dropped */
}

__attribute__((noinline)) static void handle_request(long id)
{
	char *body = malloc(4096);
	memset(body, 'x', 4096);
	last_body = body;
	if (id % 10 == 0)
		last_session = remember_session(id);
	if (id % 50 == 0)
		rotate_log();
	free(body);
}

int main(void)
{
	printf("demo server %d handling requests\n", getpid());
	fflush(stdout);
	for (long id = 1;; id++) {
		handle_request(id);
		usleep(2000);
	}
}
