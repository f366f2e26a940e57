/* nccl_device kernels: dispatch and combine through the peers' symmetric
 * windows (see nd_kernels.h for the protocol). Ordering as in
 * docs/design-nccl-device.md §5: weak 16-byte stores; each block fences
 * (system scope) and counts itself done; the last block publishes one
 * release flag per peer. Waiters poll with system-scope acquire loads,
 * bounded by %globaltimer, then __syncthreads before the block reads. */
#include "cuda/latch.cuh"
#include "cuda/nd_kernels.h"
#include "cuda/recv_plan.cuh"
#include "cuda/rowmath.cuh"

typedef unsigned long long u64;

#define DISCO_ND_THREADS 128
#define DISCO_BATCH 4

__device__ __forceinline__ u64 nd_now(void) {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ u64 nd_ld_acquire(const u64 *p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void nd_st_release(u64 *p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ int nd_dead(const disco_nd_params_t &nd) {
  return *(volatile u64 *)nd.fatal != 0ull;
}

/* Flag `kind` of rank q in window `base`. */
__device__ __forceinline__ u64 *nd_flag(const disco_nd_params_t &nd, char *base, int W,
                                        int kind, int q) {
  return (u64 *)(base + nd.off_flags) + (long long)kind * W + q;
}

/* Latches the fatal TIMEOUT (first one wins) and tells every peer that this
 * rank gave up, so that a peer arriving late fails fast instead of waiting
 * for flags that will never come. */
__device__ void nd_give_up(const disco_kparams_t &p, const disco_nd_params_t &nd,
                           int peer, int phase, u64 call, u64 want) {
  if (atomicCAS(nd.fatal, 0ull, 1ull) != 0ull) return;
  disco_latch(nd.hfatal, DISCO_ERR_TIMEOUT, peer, (long long)call, phase,
              (long long)(nd.timeout_ns / 1000000ull), (long long)want, p.rank);
  for (int q = 0; q < p.world; q++)
    if (q != p.rank)
      nd_st_release(nd_flag(nd, nd.peer[q], p.world, DISCO_ND_DEAD, p.rank), 1ull);
}

/* A peer that gave up: latch it (as this rank's fatal error) and return 1. */
__device__ int nd_peer_dead(const disco_kparams_t &p, const disco_nd_params_t &nd, int q,
                            u64 call) {
  if (nd_ld_acquire(nd_flag(nd, nd.local, p.world, DISCO_ND_DEAD, q)) == 0ull) return 0;
  nd_give_up(p, nd, q, DISCO_ND_PHASE_DEAD, call, 0);
  return 1;
}

/* Waits until flag's sequence (bits 8..) reaches want. Returns 1 with the
 * flag's value in *val, or 0 after latching TIMEOUT (or seeing the comm
 * dead). One thread. */
__device__ int nd_wait(const disco_kparams_t &p, const disco_nd_params_t &nd,
                       const u64 *flag, u64 want, int peer, int phase, u64 call,
                       u64 *val) {
  const u64 deadline = nd_now() + nd.timeout_ns;
  for (unsigned it = 0;; it++) {
    const u64 v = nd_ld_acquire(flag);
    if ((long long)((v >> 8) - want) >= 0) {
      *val = v;
      return 1;
    }
    if ((it & 255u) == 255u) {
      if (nd_dead(nd) || nd_peer_dead(p, nd, peer, call)) return 0;
      if (nd_now() > deadline) {
        nd_give_up(p, nd, peer, phase, call, want);
        return 0;
      }
    }
  }
}

/* Thread 0 waits for `kind` flags of every peer; 1 when all arrived. *bad:
 * lowest peer whose flag carries a failure status (-1 none), its code. */
__device__ int nd_wait_all(const disco_kparams_t &p, const disco_nd_params_t &nd,
                           int kind, u64 want, int phase, u64 call, int *bad, int *code) {
  *bad = -1;
  *code = 0;
  for (int q = 0; q < p.world; q++) /* fail fast if a peer already gave up */
    if (q != p.rank && nd_peer_dead(p, nd, q, call)) return 0;
  for (int q = 0; q < p.world; q++) {
    u64 v = 0;
    if (q == p.rank) continue;
    if (!nd_wait(p, nd, nd_flag(nd, nd.local, p.world, kind, q), want, q, phase, call,
                 &v))
      return 0;
    if ((v & 255ull) != 0ull && *bad < 0) {
      *bad = q;
      *code = (int)(v & 255ull);
    }
  }
  return 1;
}

/* Last block of the grid to get here (after its stores): returns 1 in
 * thread 0 of that block, which may then publish. Resets the counter. */
__device__ __forceinline__ int nd_last_block(unsigned *done) {
  __syncthreads();
  if (threadIdx.x != 0) return 0;
  __threadfence_system();
  const unsigned nb = gridDim.x * gridDim.y;
  if (atomicAdd(done, 1u) != nb - 1u) return 0;
  __threadfence_system();
  *done = 0u;
  return 1;
}

/* Source rank of received token i (recv_off ascending). */
__device__ __forceinline__ int nd_source(const disco_dev_plan_t &pl, int W, long long i) {
  int lo = 0, hi = W - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (pl.recv_off[mid] <= i)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

static int nd_rows_grid(const disco_kparams_t *p, long long rows, int gx) {
  long long cap = 2ll * p->max_blocks / gx + 1;
  if (rows > cap) rows = cap;
  return (int)(rows < 1 ? 1 : rows);
}

static int nd_gx(const disco_kparams_t *p) {
  return (p->row_vecs + DISCO_ND_THREADS - 1) / DISCO_ND_THREADS;
}

extern "C" unsigned long long disco_nd_window_layout(const disco_kparams_t *p,
                                                     int part_vecs,
                                                     disco_nd_params_t *nd) {
  const u64 W = (u64)p->world, M = (u64)p->max_tokens;
  u64 off = 0;
#define ND_CARVE(field, bytes, align)                 \
  do {                                                \
    nd->field = off;                                  \
    off += ((bytes) + (align)-1) / (align) * (align); \
  } while (0)
  ND_CARVE(off_flags, DISCO_ND_KINDS * W * 8u, 4096u);
  ND_CARVE(off_cnt, W * (u64)p->msg_len * 8u, 256u);
  ND_CARVE(off_meta, W * M * (u64)p->meta_ints * 4u, 256u);
  ND_CARVE(off_rows, W * M * (u64)p->row_bytes, 256u);
  ND_CARVE(off_part, W * M * (u64)part_vecs * 16u, 256u);
#undef ND_CARVE
  nd->part_vecs = part_vecs;
  const u64 gran = 2ull << 20; /* whole pages of the symmetric mapping */
  return (off + gran - 1) / gran * gran;
}

/* ---- dispatch: send --------------------------------------------------------- */
__global__ void __launch_bounds__(DISCO_ND_THREADS)
    nd_send_kernel(disco_kparams_t p, disco_nd_params_t nd, disco_dev_plan_t pl,
                   const uint4 *x, const float *w, int T, int rank_major, int rows_on,
                   int status_in) {
  __shared__ int go;
  if (nd_dead(nd)) return;
  const int W = p.world, r = p.rank, K = p.top_k, L = p.num_local, E = p.num_experts;
  const int nc = p.num_cols, C = 32 * p.layout_warps, nv = p.row_vecs, mi = p.meta_ints;
  const int ml = p.msg_len, lane = threadIdx.x & 31;
  const long long M = p.max_tokens;
  const u64 s = nd.seq[0] + 1ull;
  const u64 call = (u64)DISCO_CALL_DISPATCH << 32 | (s & 0xffffffffull);
  const int st = status_in != 0 ? status_in : (int)pl.msg[DISCO_MSG_CODE];
  if (threadIdx.x == 0) { /* the peers have read our previous rows */
    int bad, code;
    go = nd_wait_all(p, nd, DISCO_ND_DACK, s - 1ull, DISCO_ND_PHASE_DACK, call, &bad,
                     &code);
  }
  __syncthreads();
  if (!go) return;
  if (blockIdx.x == 0 && blockIdx.y == 0) { /* count messages, self included */
    for (int i = threadIdx.x; i < W * ml; i += blockDim.x) {
      const int d = i / ml, f = i % ml;
      long long v;
      if (status_in == 0)
        v = pl.msg[i];
      else
        v = f == DISCO_MSG_CODE ? status_in : f < DISCO_MSG_TOKENS ? -1 : 0;
      ((long long *)(nd.peer[d] + nd.off_cnt))[(long long)r * ml + f] = v;
    }
  }
  if (rows_on && st == 0) {
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    for (int t = blockIdx.y; t < T; t += gridDim.y) {
      const int *bb = pl.blk_base + (long long)(t / C) * nc;
      const int *dest = pl.tok_dest + (long long)t * p.kd;
      const int *dpos = pl.tok_dpos + (long long)t * p.kd;
      if (blockIdx.x == 0 && threadIdx.x < 32) {
        /* Metadata: [src_token, n_local, then (j | l << 8, pos, weight) per
         * local slot in slot order], as the nccl backend's pack. */
        for (int k = 0; k < p.kd; k++) {
          const int d = dest[k];
          if (d < 0) break;
          const int row = bb[E + d] + dpos[k];
          int *meta = (int *)(nd.peer[d] + nd.off_meta) + ((long long)r * M + row) * mi;
          int n = 0;
          for (int jb = 0; jb < K; jb += 32) {
            int j = jb + lane;
            int e = j < K ? pl.slot[(long long)t * K + j] : -1;
            int mine = e >= 0 && e / L == d;
            unsigned bal = __ballot_sync(0xffffffffu, mine);
            if (mine) {
              int i = n + __popc(bal & ((1u << lane) - 1u));
              meta[2 + 3 * i] = j | ((e - d * L) << 8);
              meta[3 + 3 * i] = bb[e] + pl.slot_pos[(long long)t * K + j];
              meta[4 + 3 * i] = __float_as_int(w ? w[(long long)t * K + j] : 1.0f);
            }
            n += __popc(bal);
          }
          if (lane == 0) {
            meta[0] = t;
            meta[1] = n;
            pl.tok_row[(long long)t * p.kd + k] = row;
          }
        }
      }
      if (v < nv) {
        const uint4 val = __ldg(x + (long long)t * nv + v);
        for (int k = 0; k < p.kd; k++) {
          const int d = dest[k];
          if (d < 0) break;
          if (d == r && !rank_major) continue; /* expand reads x */
          const long long row = bb[E + d] + dpos[k];
          ((uint4 *)(nd.peer[d] + nd.off_rows))[((long long)r * M + row) * nv + v] = val;
        }
      }
    }
  }
  if (nd_last_block(&nd.done[0]))
    for (int d = 0; d < W; d++)
      if (d != r)
        nd_st_release(nd_flag(nd, nd.peer[d], W, DISCO_ND_DFLAG, r),
                      s << 8 | (u64)(st & 255));
}

extern "C" cudaError_t disco_nd_send(const disco_kparams_t *p,
                                     const disco_nd_params_t *nd,
                                     const disco_dev_plan_t *pl, const void *x,
                                     const float *weights, int64_t num_tokens,
                                     int rank_major, int rows, int status,
                                     cudaStream_t stream) {
  const int gx = nd_gx(p);
  const long long T = status != 0 || !rows ? 0 : num_tokens;
  dim3 grid((unsigned)(T > 0 ? gx : 1), (unsigned)nd_rows_grid(p, T, gx), 1);
  nd_send_kernel<<<grid, DISCO_ND_THREADS, 0, stream>>>(
      *p, *nd, *pl, (const uint4 *)x, weights, (int)num_tokens, rank_major, rows, status);
  return cudaGetLastError();
}

/* ---- dispatch: receive plan ----------------------------------------------------- */
#define DISCO_ND_RECV_THREADS 512

__global__ void __launch_bounds__(DISCO_ND_RECV_THREADS)
    nd_recv_kernel(disco_kparams_t p, disco_nd_params_t nd, disco_dev_plan_t pl,
                   int layout, int align, int32_t *n_to, int32_t *n_from, int32_t *tpe,
                   int64_t *num_rows_out, long long cap, int call_kind) {
  __shared__ int go;
  if (nd_dead(nd)) return;
  const u64 s = nd.seq[0] + 1ull;
  const u64 call = (u64)call_kind << 32 | (s & 0xffffffffull);
  if (threadIdx.x == 0) {
    int bad, code;
    go = nd_wait_all(p, nd, DISCO_ND_DFLAG, s, DISCO_ND_PHASE_DFLAG, call, &bad, &code);
  }
  __syncthreads();
  if (!go) return;
  const int n = p.world * p.msg_len;
  const long long *cnt = (const long long *)(nd.local + nd.off_cnt);
  for (int i = threadIdx.x; i < n; i += blockDim.x) pl.msg[n + i] = __ldcg(cnt + i);
  __syncthreads();
  disco_recv_plan_body(p, pl, layout, align, n_to, n_from, tpe, num_rows_out, cap,
                       (long long)call);
}

extern "C" cudaError_t disco_nd_recv(const disco_kparams_t *p,
                                     const disco_nd_params_t *nd,
                                     const disco_dev_plan_t *pl, int layout,
                                     int alignment, int32_t *n_to, int32_t *n_from,
                                     int32_t *tokens_per_expert, int64_t *num_recv_rows,
                                     int64_t capacity, int call, cudaStream_t stream) {
  nd_recv_kernel<<<1, DISCO_ND_RECV_THREADS, 0, stream>>>(
      *p, *nd, *pl, layout, alignment, n_to, n_from, tokens_per_expert, num_recv_rows,
      (long long)capacity, call);
  return cudaGetLastError();
}

/* ---- dispatch: ack ------------------------------------------------------------ */
__global__ void nd_ack_kernel(disco_kparams_t p, disco_nd_params_t nd) {
  if (nd_dead(nd)) return;
  const u64 s = nd.seq[0] + 1ull;
  for (int q = threadIdx.x; q < p.world; q += blockDim.x)
    if (q != p.rank)
      nd_st_release(nd_flag(nd, nd.peer[q], p.world, DISCO_ND_DACK, p.rank), s << 8);
  __syncthreads();
  if (threadIdx.x == 0) nd.seq[0] = s;
}

extern "C" cudaError_t disco_nd_ack(const disco_kparams_t *p, const disco_nd_params_t *nd,
                                    cudaStream_t stream) {
  nd_ack_kernel<<<1, 128, 0, stream>>>(*p, *nd);
  return cudaGetLastError();
}

/* ---- combine: expert side --------------------------------------------------------- */
__global__ void __launch_bounds__(DISCO_ND_THREADS)
    nd_csend_kernel(disco_kparams_t p, disco_nd_params_t nd, disco_dev_plan_t pl,
                    const uint4 *y, long long y_rows, int weighted, int wire32,
                    int rank_major, int status_in) {
  __shared__ int go;
  if (nd_dead(nd)) return;
  const int W = p.world, r = p.rank, K = p.top_k, nv = p.row_vecs;
  const int V = p.dtype == DISCO_DTYPE_FP32 ? 4 : 8, nq = V / 4;
  const long long M = p.max_tokens;
  const u64 c = nd.seq[1] + 1ull;
  const u64 call = (u64)DISCO_CALL_COMBINE << 32 | (c & 0xffffffffull);
  int st = status_in;
  const long long rows = *pl.num_rows;
  if (st == 0)
    st = *pl.go == 0                    ? (int)DISCO_ERR_INVALID_USAGE
         : rows > 0 && y == NULL        ? (int)DISCO_ERR_NULL_POINTER
         : y_rows >= 0 && y_rows < rows ? (int)DISCO_ERR_CAPACITY
                                        : 0;
  if (threadIdx.x == 0) {
    if (blockIdx.x == 0 && blockIdx.y == 0) {
      *nd.cstat = st;
      if (st != 0 && status_in == 0)
        disco_latch(p.lerr, st, r, (long long)call, y_rows, rows, 0, 0);
    }
    int bad, code; /* the token owners have read our previous partials */
    go = nd_wait_all(p, nd, DISCO_ND_CACK, c - 1ull, DISCO_ND_PHASE_CACK, call, &bad,
                     &code);
  }
  __syncthreads();
  if (!go) return;
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  if (st == 0 && v < nv) {
    const long long R = pl.recv_off[W];
    for (long long i = blockIdx.y; i < R; i += gridDim.y) {
      const int q = nd_source(pl, W, i);
      uint4 *dst = (uint4 *)(nd.peer[q] + nd.off_part) +
                   ((long long)r * M + (i - pl.recv_off[q])) * nd.part_vecs;
      if (rank_major) { /* the caller reduced: the row goes back as it is */
        dst[v] = __ldg(y + i * nv + v);
        continue;
      }
      const int *rws = pl.comb_rows + i * K;
      const float *ws = pl.comb_w + i * K;
      int n = 0;
      while (n < K && rws[n] >= 0) n++;
      float acc[8], f[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int e = 0; e < 8; e++) acc[e] = 0.0f;
      for (int k0 = 0; k0 < n; k0 += DISCO_BATCH) {
        uint4 a[DISCO_BATCH];
#pragma unroll
        for (int u = 0; u < DISCO_BATCH; u++)
          if (k0 + u < n) a[u] = __ldg(y + (long long)rws[k0 + u] * nv + v);
#pragma unroll
        for (int u = 0; u < DISCO_BATCH; u++) {
          if (k0 + u >= n) break;
          disco_unpack(a[u], p.dtype, f);
          const float wk = ws[k0 + u];
#pragma unroll
          for (int e = 0; e < 8; e++) {
            float term = weighted ? __fmul_rn(wk, f[e]) : f[e];
            acc[e] = k0 + u == 0 ? term : __fadd_rn(acc[e], term);
          }
        }
      }
      disco_store_part(dst, v, wire32, nq, p.dtype, acc);
    }
  }
  if (nd_last_block(&nd.done[1]))
    for (int q = 0; q < W; q++)
      if (q != r)
        nd_st_release(nd_flag(nd, nd.peer[q], W, DISCO_ND_CFLAG, r),
                      c << 8 | (u64)(st & 255));
}

extern "C" cudaError_t disco_nd_csend(const disco_kparams_t *p,
                                      const disco_nd_params_t *nd,
                                      const disco_dev_plan_t *pl, const void *y,
                                      int64_t y_rows, int weighted, int wire32,
                                      int rank_major, int status, cudaStream_t stream) {
  const int gx = nd_gx(p);
  const long long worst = status != 0 ? 0 : (long long)p->world * p->max_tokens;
  dim3 grid((unsigned)gx, (unsigned)nd_rows_grid(p, worst, gx), 1);
  nd_csend_kernel<<<grid, DISCO_ND_THREADS, 0, stream>>>(
      *p, *nd, *pl, (const uint4 *)y, (long long)y_rows, weighted,
      wire32 && p->dtype != DISCO_DTYPE_FP32, rank_major, status);
  return cudaGetLastError();
}

/* ---- combine: token side ---------------------------------------------------------- */
__global__ void __launch_bounds__(DISCO_ND_THREADS)
    nd_ctoken_kernel(disco_kparams_t p, disco_nd_params_t nd, disco_dev_plan_t pl,
                     uint4 *out, int wire32, int T) {
  __shared__ int go, bad;
  if (nd_dead(nd)) return;
  const int W = p.world, r = p.rank, kd = p.kd, nv = p.row_vecs;
  const int V = p.dtype == DISCO_DTYPE_FP32 ? 4 : 8, nq = V / 4;
  const long long M = p.max_tokens;
  const u64 c = nd.seq[1] + 1ull;
  const u64 call = (u64)DISCO_CALL_COMBINE << 32 | (c & 0xffffffffull);
  if (threadIdx.x == 0) {
    int q, code;
    go = nd_wait_all(p, nd, DISCO_ND_CFLAG, c, DISCO_ND_PHASE_CFLAG, call, &q, &code);
    bad = *nd.cstat != 0 || q >= 0;
    if (go && *nd.cstat == 0 && q >= 0 && blockIdx.x == 0 && blockIdx.y == 0)
      disco_latch(p.lerr, DISCO_ERR_REMOTE, q, (long long)call, -1, -1, -1, code);
  }
  __syncthreads();
  if (!go) return;
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  if (!bad && v < nv) {
    const uint4 *part = (const uint4 *)(nd.local + nd.off_part);
    for (int t = blockIdx.y; t < T; t += gridDim.y) {
      const int *dest = pl.tok_dest + (long long)t * kd;
      const int *trow = pl.tok_row + (long long)t * kd;
      float acc[8], f[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int e = 0; e < 8; e++) acc[e] = 0.0f; /* +0.0 for tokens with no slot */
      int n = 0;
      while (n < kd && dest[n] >= 0) n++;
      for (int k0 = 0; k0 < n; k0 += DISCO_BATCH) {
        uint4 a[DISCO_BATCH], b[DISCO_BATCH];
#pragma unroll
        for (int u = 0; u < DISCO_BATCH; u++) {
          if (k0 + u >= n) break;
          const uint4 *row =
              part + ((long long)dest[k0 + u] * M + trow[k0 + u]) * nd.part_vecs;
          if (wire32) {
            a[u] = __ldcg(row + (long long)v * nq);
            if (nq == 2) b[u] = __ldcg(row + (long long)v * 2 + 1);
          } else {
            a[u] = __ldcg(row + v);
          }
        }
#pragma unroll
        for (int u = 0; u < DISCO_BATCH; u++) {
          if (k0 + u >= n) break;
          if (wire32) {
            f[0] = __uint_as_float(a[u].x);
            f[1] = __uint_as_float(a[u].y);
            f[2] = __uint_as_float(a[u].z);
            f[3] = __uint_as_float(a[u].w);
            if (nq == 2) {
              f[4] = __uint_as_float(b[u].x);
              f[5] = __uint_as_float(b[u].y);
              f[6] = __uint_as_float(b[u].z);
              f[7] = __uint_as_float(b[u].w);
            }
          } else {
            disco_unpack(a[u], p.dtype, f);
          }
#pragma unroll
          for (int e = 0; e < 8; e++)
            acc[e] = k0 + u == 0 ? f[e] : __fadd_rn(acc[e], f[e]);
        }
      }
      out[(long long)t * nv + v] = disco_pack(acc, p.dtype);
    }
  }
  if (nd_last_block(&nd.done[1])) {
    for (int q = 0; q < W; q++)
      if (q != r) nd_st_release(nd_flag(nd, nd.peer[q], W, DISCO_ND_CACK, r), c << 8);
    nd.seq[1] = c;
  }
}

extern "C" cudaError_t disco_nd_ctoken(const disco_kparams_t *p,
                                       const disco_nd_params_t *nd,
                                       const disco_dev_plan_t *pl, void *out, int wire32,
                                       int64_t num_tokens, cudaStream_t stream) {
  const int gx = nd_gx(p);
  dim3 grid((unsigned)gx, (unsigned)nd_rows_grid(p, num_tokens, gx), 1);
  nd_ctoken_kernel<<<grid, DISCO_ND_THREADS, 0, stream>>>(
      *p, *nd, *pl, (uint4 *)out, wire32 && p->dtype != DISCO_DTYPE_FP32,
      (int)num_tokens);
  return cudaGetLastError();
}
