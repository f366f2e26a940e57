/* The pipelined-group cut of the NCCL backend (src/cuda/kernels.h): host and
 * kernels share disco_piece / disco_piece_of, and both ends of a pair must
 * cut a segment alike. Checks that the pieces tile the segment in order,
 * respect the least piece size and the chunk cap, and that piece_of finds
 * the piece holding each row. Built where the CUDA headers are. */
#include "cuda/kernels.h"
#include "unit_util.h"

int main(void) {
  const long long splits[] = {1, 2, 3, 7, 64, 1ll << 47};
  for (int chunks = 1; chunks <= DISCO_MAX_CHUNKS; chunks++) {
    for (size_t si = 0; si < sizeof(splits) / sizeof(splits[0]); si++) {
      const long long split = splits[si];
      for (long long n = 0; n <= 300; n++) {
        long long lo, hi, next = 0;
        const long long P = disco_pieces(n, chunks, split);
        CHECK(P >= 1 && P <= chunks, "n %lld chunks %d split %lld: P %lld", n, chunks,
              split, P);
        disco_piece(n, -1, chunks, split, &lo, &hi);
        CHECK(lo == 0 && hi == n, "n %lld: whole segment [%lld, %lld)", n, lo, hi);
        for (int c = 0; c < DISCO_MAX_CHUNKS + 1; c++) {
          disco_piece(n, c, chunks, split, &lo, &hi);
          CHECK(lo == next && hi >= lo && hi <= n, "n %lld c %d: [%lld, %lld) after %lld",
                n, c, lo, hi, next);
          if (c >= P) CHECK(lo == hi, "n %lld c %d >= P %lld not empty", n, c, P);
          if (P > 1 && c < P)
            CHECK(hi - lo >= split, "n %lld c %d: %lld rows < split %lld", n, c, hi - lo,
                  split);
          for (long long row = lo; row < hi; row++) {
            const int got = disco_piece_of(n, row, chunks, split);
            CHECK(got == c, "n %lld row %lld: piece_of %d, want %d", n, row, got, c);
          }
          next = hi;
        }
        CHECK(next == n, "n %lld chunks %d split %lld: pieces end at %lld", n, chunks,
              split, next);
      }
    }
  }
  if (unit_failures == 0) printf("test_pieces: ok\n");
  return unit_failures != 0;
}
