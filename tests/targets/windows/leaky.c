/* A Windows process that leaks (built with mingw-w64, run under Wine by `cargo xtask test`):
 * prints its pid, then every 50 ms starts a thread that never ends, opens an event handle it
 * never closes, and allocates and touches 64 KiB it never frees. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <windows.h>

static DWORD WINAPI wait_forever(LPVOID unused) {
    (void)unused;
    Sleep(INFINITE);
    return 0;
}

int main(void) {
    printf("%lu\n", GetCurrentProcessId());
    fflush(stdout);
    for (int i = 0; i < 1200; i++) {
        CreateThread(NULL, 0, wait_forever, NULL, 0, NULL);
        CreateEventW(NULL, FALSE, FALSE, NULL);
        memset(malloc(64 << 10), 1, 64 << 10);
        Sleep(50);
    }
    return 0;
}
