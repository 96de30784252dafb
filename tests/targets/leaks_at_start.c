/* Leaks before it does anything else, then exits 3: what only a tracer in from the first
 * instruction sees (psleak trace -- CMD). */
#include <fcntl.h>
#include <stdlib.h>

static void *kept[5];

int main(void) {
    for (int i = 0; i < 5; i++)
        kept[i] = malloc(1000); /* LEAK_LINE */
    open("/dev/null", O_RDONLY);
    return 3;
}
