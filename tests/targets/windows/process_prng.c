/* bcryptprimitives.dll for Wine 8.0, which lacks it (Wine 9 has it): Rust's standard library
 * takes its random numbers from ProcessPrng there. Test harness only, beside psleak.exe. */
#include <windows.h>
#include <ntsecapi.h>

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    return RtlGenRandom(data, (ULONG)len);
}
