/* Loads a library once running (dlopen, as CPython loads an extension module), leaks from it
 * and exits at once: the library's frames can be named only from the target's own mappings,
 * which are gone with it (psleak trace -- CMD holds the command at its exit until it has read
 * every event). Built twice: with -DLIBRARY -shared -fPIC as the library, and as the program,
 * which is given the library's path, and `thread` to do it all from a thread of its own while
 * its main thread waits (the process then exits from that thread). */
#ifdef LIBRARY
#include <stdlib.h>

void *kept[5];

void leak_late(void) {
    for (int i = 0; i < 5; i++)
        kept[i] = malloc(3000); /* LEAK_LINE */
}
#else
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void load_and_leak(const char *path) {
    void *library = dlopen(path, RTLD_NOW);
    if (!library) {
        fprintf(stderr, "%s\n", dlerror());
        exit(1);
    }
    void (*leak_late)(void) = (void (*)(void))dlsym(library, "leak_late");
    leak_late(); /* CALL_LINE */
}

static void *from_a_thread(void *path) {
    load_and_leak(path);
    exit(0);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: loads_late LIBRARY [thread]\n");
        return 1;
    }
    if (argc > 2 && !strcmp(argv[2], "thread")) {
        pthread_t thread;
        pthread_create(&thread, NULL, from_a_thread, argv[1]);
        pause();
    }
    load_and_leak(argv[1]);
    return 0;
}
#endif
