/* When the nccl_device kernels pipeline (src/cuda/nd_kernels.h,
 * disco_nd_pipe_mode): from the token threshold, or from half of it when the
 * tokens bring twice as many rows (min(K, W) per token). Checks the cases
 * run 66 measured (4 GPUs: 512 tokens K 8 pipelined, K 1 plain; 1024 K 8
 * combine pipelined, K 1 plain), the edges, and that the mode never depends
 * on more than T, min(K, W) and the threshold. Built where the CUDA headers
 * are. */
#include "cuda/nd_kernels.h"
#include "unit_util.h"

int main(void) {
  /* dispatch, threshold 1024, 4 GPUs */
  CHECK(disco_nd_pipe_mode(1024, 1, 4, 1024) == 1, "1024 K 1: by tokens");
  CHECK(disco_nd_pipe_mode(4096, 8, 4, 1024) == 1, "4096 K 8: by tokens");
  CHECK(disco_nd_pipe_mode(512, 8, 4, 1024) == 2, "512 K 8: by rows");
  CHECK(disco_nd_pipe_mode(512, 4, 4, 1024) == 2, "512 K 4: by rows");
  CHECK(disco_nd_pipe_mode(512, 1, 4, 1024) == 0, "512 K 1: plain");
  CHECK(disco_nd_pipe_mode(512, 2, 4, 1024) == 0, "512 K 2: plain");
  CHECK(disco_nd_pipe_mode(511, 8, 4, 1024) == 0, "511 K 8: under half the tokens");
  CHECK(disco_nd_pipe_mode(256, 32, 8, 1024) == 0, "256 K 32 W 8: under half");
  /* 2 GPUs: min(K, W) <= 2, so half the tokens never bring twice the rows */
  CHECK(disco_nd_pipe_mode(512, 8, 2, 1024) == 0, "512 K 8 W 2: plain");
  CHECK(disco_nd_pipe_mode(1023, 32, 2, 1024) == 0, "1023 K 32 W 2: plain");
  /* combine, threshold 2048 */
  CHECK(disco_nd_pipe_mode(1024, 8, 4, 2048) == 2, "combine 1024 K 8: by rows");
  CHECK(disco_nd_pipe_mode(1024, 1, 4, 2048) == 0, "combine 1024 K 1: plain");
  CHECK(disco_nd_pipe_mode(2048, 1, 4, 2048) == 1, "combine 2048 K 1: by tokens");
  CHECK(disco_nd_pipe_mode(0, 8, 4, 2048) == 0, "T 0: plain");
  /* the tests' thresholds (run.sh: from 1 and from 40 tokens) */
  CHECK(disco_nd_pipe_mode(1, 1, 4, 1) == 1, "threshold 1");
  CHECK(disco_nd_pipe_mode(20, 4, 4, 40) == 2, "threshold 40: 20 K 4");
  CHECK(disco_nd_pipe_mode(19, 8, 4, 40) == 0, "threshold 40: 19 K 8");
  /* monotone in T and in K for a fixed world and threshold */
  for (int W = 1; W <= 8; W++)
    for (int K = 1; K <= 32; K++)
      for (long long T = 1; T < 3000; T++) {
        const int m = disco_nd_pipe_mode(T, K, W, 1024) != 0;
        CHECK(m <= (disco_nd_pipe_mode(T + 1, K, W, 1024) != 0), "T %lld K %d W %d", T, K,
              W);
        if (K < 32)
          CHECK(m <= (disco_nd_pipe_mode(T, K + 1, W, 1024) != 0), "T %lld K %d W %d", T,
                K, W);
      }
  if (unit_failures == 0) printf("test_pipe_mode: ok\n");
  return unit_failures != 0;
}
