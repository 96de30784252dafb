/* Loads a library once running (dlopen, as CPython loads an extension module), leaks from it
 * and exits at once: the library's frames can be named only from the target's own mappings,
 * which are gone with it (psleak trace -- CMD holds the command at its exit until it has read
 * every event). Built twice: with -DLIBRARY -shared -fPIC as the library, and as the program,
 * which is given the library's path. */
#ifdef LIBRARY
#include <stdlib.h>

void *kept[5];

void leak_late(void) {
    for (int i = 0; i < 5; i++)
        kept[i] = malloc(3000); /* LEAK_LINE */
}
#else
#include <dlfcn.h>
#include <stdio.h>

int main(int argc, char **argv) {
    void *library = argc > 1 ? dlopen(argv[1], RTLD_NOW) : NULL;
    if (!library) {
        fprintf(stderr, "usage: loads_late LIBRARY (%s)\n", dlerror());
        return 1;
    }
    void (*leak_late)(void) = (void (*)(void))dlsym(library, "leak_late");
    leak_late(); /* CALL_LINE */
    return 0;
}
#endif
