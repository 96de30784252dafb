/*
 * A process that looks like CPython to psleak (its name starts with "python" and it defines
 * PyObject_Malloc) and whose PyObject_Free is a pyenv build's: `mov %rdi,%rsi; mov ctx,%rdi;
 * jmp *free`, through a table in its own memory. psleak follows that jump to place the probe
 * (ebpf/src/dispatch.rs); this process forges the table, as any traced process can.
 *
 * It prints "ready", then reads commands on stdin, answering "ok" to each:
 *   point entry    the table's free is own_free, a function of this binary (the real case)
 *   point middle   one byte into own_free: no function starts there
 *   point libc     libc's free, another binary's function
 *   point nowhere  an address nothing is mapped at
 * Nothing here ever calls PyObject_Free: the table is only read.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((noinline, used)) void own_free(void *ctx, void *ptr)
{
	(void)ctx;
	free(ptr);
}

/* { ctx, free }, as CPython's PyMemAllocatorEx ends. */
void *allocator_table[2] = { NULL, (void *)own_free };

void *PyObject_Malloc(size_t size)
{
	return malloc(size);
}

__asm__(".globl PyObject_Free\n"
	".type PyObject_Free, @function\n"
	"PyObject_Free:\n"
	"	mov %rdi, %rsi\n"
	"	mov allocator_table(%rip), %rdi\n"
	"	jmp *allocator_table+8(%rip)\n"
	".size PyObject_Free, .-PyObject_Free\n");

int main(void)
{
	char line[64];
	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		line[strcspn(line, "\n")] = 0;
		if (strcmp(line, "point entry") == 0)
			allocator_table[1] = (void *)own_free;
		else if (strcmp(line, "point middle") == 0)
			allocator_table[1] = (char *)own_free + 1;
		else if (strcmp(line, "point libc") == 0)
			allocator_table[1] = (void *)free;
		else if (strcmp(line, "point nowhere") == 0)
			allocator_table[1] = (void *)(uintptr_t)0x10;
		else
			continue;
		printf("ok\n");
		fflush(stdout);
	}
	return 0;
}
