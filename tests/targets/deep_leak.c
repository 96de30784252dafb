/* Leaks one block 12 calls deep, each call's frame ~200 bytes: how much of the stack the
 * probes copy (psleak trace --stack-depth) decides how many of those calls a site shows. */
#include <stdlib.h>

static void *kept;

__attribute__((noinline)) static void leak_deep(int depth) {
    volatile char pad[200];
    pad[0] = (char)depth;
    if (depth == 0)
        kept = malloc(100); /* LEAK_LINE */
    else
        leak_deep(depth - 1);
    pad[1] = pad[0];
}

int main(void) {
    leak_deep(12);
    return 0;
}
