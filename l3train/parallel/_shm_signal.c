/* Sequence numbers in shared memory between the ranks of one host (l3train.parallel.shared_memory).

A rank publishes that its data for exchange n is in place by storing n with release order
(everything it wrote before is visible to a rank that reads n with acquire order) and waking
any rank asleep on the word. A waiting rank spins briefly, for the common case of a peer a
few microseconds behind, then sleeps on the word (futex: no CPU used while it waits, which
matters when ranks outnumber cores) until it changes or the slice ends. Linux only. */
#define _GNU_SOURCE
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* About 20-60 microseconds of polling before sleeping. */
#define SPINS 2000

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Sequence numbers wrap: n is reached once the word is at most 2^31 - 1 ahead of it. */
static inline int reached(uint32_t *word, uint32_t n) {
    return (int32_t)(__atomic_load_n(word, __ATOMIC_ACQUIRE) - n) >= 0;
}

void shm_publish(uint32_t *word, uint32_t n) {
    __atomic_store_n(word, n, __ATOMIC_RELEASE);
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* 1 once the word has reached n, 0 if it has not within about slice_ns nanoseconds. */
int shm_wait(uint32_t *word, uint32_t n, int64_t slice_ns) {
    for (int i = 0; i < SPINS; i++) {
        if (reached(word, n)) return 1;
        relax();
    }
    struct timespec now, end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += slice_ns / 1000000000;
    end.tv_nsec += slice_ns % 1000000000;
    if (end.tv_nsec >= 1000000000) { end.tv_sec += 1; end.tv_nsec -= 1000000000; }
    for (;;) {
        uint32_t seen = __atomic_load_n(word, __ATOMIC_ACQUIRE);
        if ((int32_t)(seen - n) >= 0) return 1;
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t left = (int64_t)(end.tv_sec - now.tv_sec) * 1000000000 + (end.tv_nsec - now.tv_nsec);
        if (left <= 0) return 0;
        struct timespec wait = {left / 1000000000, left % 1000000000};
        /* Returns at once if the word is no longer `seen` (so no wake-up is missed), on a
           wake-up, a signal or the end of the wait. */
        syscall(SYS_futex, word, FUTEX_WAIT, seen, &wait, NULL, 0);
    }
}
