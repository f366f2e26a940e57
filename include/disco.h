/*
 * disco: Mixture-of-Experts dispatch and combine for expert parallelism.
 *
 * This header needs no CUDA, MPI or NCCL header. Backend constructors live in
 * disco_mpi.h and disco_nccl.h; the built-in local backend is declared here.
 *
 * Conventions for every function below:
 * - Returns a disco_result_t. On failure disco_last_error() (thread-local) says
 *   which argument, which rank and which row; nothing was written to outputs.
 * - "Collective" means every rank of the communicator must make the same call
 *   in the same order (each local-backend rank from its own thread).
 * - A communicator and its handles are used by one thread at a time; distinct
 *   communicators may be used concurrently.
 * - Structs passed in start with size/magic/version and must be initialised
 *   with their DISCO_*_INIT macro; fields beyond a caller's `size` take their
 *   defaults, so code compiled against an older header keeps working.
 * - Destroy functions accept NULL. No function asserts, exits or aborts on
 *   user input.
 *
 * Semantics are those of DESIGN.md (docs/semantics.md summarises them).
 */
#ifndef DISCO_H_
#define DISCO_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define DISCO_API
#else
#define DISCO_API __attribute__((visibility("default")))
#endif

/* ---- version ------------------------------------------------------------ */
#define DISCO_VERSION_MAJOR 0
#define DISCO_VERSION_MINOR 1
#define DISCO_VERSION_PATCH 0
#define DISCO_VERSION \
  (DISCO_VERSION_MAJOR * 10000 + DISCO_VERSION_MINOR * 100 + DISCO_VERSION_PATCH)
/* Version of the struct layouts below; bumped when a field is appended. */
#define DISCO_STRUCT_VERSION 1

/* DISCO_VERSION of the library actually loaded (may differ from the header). */
DISCO_API int disco_get_version(void);

/* ---- results ------------------------------------------------------------ */
/* X(name, value, description): the single list of result codes. */
#define DISCO_RESULT_LIST(X)                                                           \
  X(DISCO_SUCCESS, 0, "success")                                                       \
  X(DISCO_ERR_INVALID_ARGUMENT, 1, "invalid argument")                                 \
  X(DISCO_ERR_NULL_POINTER, 2, "required pointer is NULL")                             \
  X(DISCO_ERR_MISALIGNED, 3, "buffer is not aligned for its element type")             \
  X(DISCO_ERR_BAD_STRUCT, 4, "struct not initialised by its DISCO_*_INIT macro")       \
  X(DISCO_ERR_EXPERT_OUT_OF_RANGE, 5, "expert id outside [-1, num_experts)")           \
  X(DISCO_ERR_DUPLICATE_EXPERT, 6, "same expert twice in one token's top-k")           \
  X(DISCO_ERR_TOO_MANY_TOKENS, 7, "num_tokens outside [0, max_tokens]")                \
  X(DISCO_ERR_EXPERT_DIVISIBILITY, 8, "num_experts not a multiple of world size")      \
  X(DISCO_ERR_HIDDEN_ALIGNMENT, 9, "hidden * element size not a multiple of 16 bytes") \
  X(DISCO_ERR_CAPACITY, 10, "output capacity too small")                               \
  X(DISCO_ERR_INVALID_USAGE, 11, "call not valid in this state")                       \
  X(DISCO_ERR_OUT_OF_MEMORY, 12, "allocation failed")                                  \
  X(DISCO_ERR_TIMEOUT, 13, "a peer did not arrive in time")                            \
  X(DISCO_ERR_REMOTE, 14, "another rank failed this collective call")                  \
  X(DISCO_ERR_BACKEND, 15, "transport (MPI/NCCL) call failed")                         \
  X(DISCO_ERR_CUDA, 16, "CUDA runtime call failed")                                    \
  X(DISCO_ERR_NOT_SUPPORTED, 17, "not supported by this build or backend")             \
  X(DISCO_ERR_INTERNAL, 18, "internal error (a bug in disco)")

typedef enum disco_result {
#define DISCO_X_ENUM_(name, value, desc) name = value,
  DISCO_RESULT_LIST(DISCO_X_ENUM_)
#undef DISCO_X_ENUM_
      DISCO_RESULT_COUNT_
} disco_result_t;

/* Short description of a code ("output capacity too small"); never NULL. */
DISCO_API const char *disco_result_string(disco_result_t result);
/* Name of a code ("DISCO_ERR_CAPACITY"); never NULL. */
DISCO_API const char *disco_result_name(disco_result_t result);
/* Message of the last failed call on this thread ("" if none); never NULL.
 * Valid until the next disco call on the same thread. */
DISCO_API const char *disco_last_error(void);

/* ---- enums -------------------------------------------------------------- */
typedef enum disco_dtype {
  DISCO_DTYPE_BF16 = 0, /* default */
  DISCO_DTYPE_FP16 = 1,
  DISCO_DTYPE_FP32 = 2
} disco_dtype_t;

typedef enum disco_index_type {
  DISCO_INDEX_INT64 = 0, /* default */
  DISCO_INDEX_INT32 = 1
} disco_index_type_t;

typedef enum disco_layout {
  /* One row per (token, local expert), grouped by local expert ascending,
   * then source rank, then source token. Ready for a grouped GEMM. */
  DISCO_LAYOUT_EXPERT_MAJOR = 0, /* default */
  /* One row per received token, by source rank then source token; each row
   * carries K local expert ids (-1 where not local) and K weights. */
  DISCO_LAYOUT_RANK_MAJOR = 1
} disco_layout_t;

/* How the expert-side partial sums of combine (EXPERT_MAJOR) cross the link. */
typedef enum disco_combine_wire {
  /* fp32 partials: exactly DESIGN.md's order, one cast at the very end. */
  DISCO_COMBINE_WIRE_FP32 = 0, /* default */
  /* Partials rounded once to the data dtype before they cross (half the
   * bytes for bf16/fp16, as DeepEP does); still deterministic and identical on
   * every backend, but two roundings instead of one. Same as FP32 for fp32. */
  DISCO_COMBINE_WIRE_DTYPE = 1
} disco_combine_wire_t;

#define DISCO_MAX_TOP_K 64
#define DISCO_DEFAULT_TIMEOUT_MS 10000

/* ---- config ------------------------------------------------------------- */
#define DISCO_CONFIG_MAGIC 0x44434647u /* "DCFG" */

typedef struct disco_config {
  size_t size;         /* sizeof(disco_config_t), set by DISCO_CONFIG_INIT */
  uint32_t magic;      /* DISCO_CONFIG_MAGIC */
  uint32_t version;    /* DISCO_STRUCT_VERSION */
  int32_t num_experts; /* E, required, E % world_size == 0 */
  int32_t top_k;       /* K, required, 1..DISCO_MAX_TOP_K */
  int64_t hidden;      /* H, required, H * elem_size % 16 == 0 */
  int64_t max_tokens;  /* per-rank token capacity, required, >= 0 */
  disco_dtype_t dtype; /* element type of x, expert outputs and out */
  int32_t timeout_ms;  /* bound on every wait; 0 = env DISCO_TIMEOUT_MS or 10000 */
  int32_t max_sms;     /* GPU backends: cap on SMs used by kernels; 0 = auto */
  disco_combine_wire_t combine_wire;
} disco_config_t;

#define DISCO_CONFIG_INIT                                                         \
  {                                                                               \
    sizeof(disco_config_t), DISCO_CONFIG_MAGIC, DISCO_STRUCT_VERSION, 0, 0, 0, 0, \
        DISCO_DTYPE_BF16, 0, 0, DISCO_COMBINE_WIRE_FP32                           \
  }

/* ---- communicator and handle -------------------------------------------- */
typedef struct disco_comm disco_comm_t;
typedef struct disco_handle disco_handle_t;

/*
 * Local backend: `world_size` ranks as threads of one process over shared host
 * memory. Fills comms[0..world_size-1]; comm i is rank i and must be driven by
 * its own thread for collective calls. Not collective (one thread calls it).
 * Errors: INVALID_ARGUMENT, BAD_STRUCT, EXPERT_DIVISIBILITY, HIDDEN_ALIGNMENT,
 * OUT_OF_MEMORY. On failure no comm is returned (all entries set to NULL).
 */
DISCO_API disco_result_t disco_comm_create_local(int world_size,
                                                 const disco_config_t *config,
                                                 disco_comm_t **comms);

/* Frees a communicator of any backend and its workspaces. Not collective, but
 * a peer still inside a collective call with it will time out. NULL is a no-op.
 * Handles must be destroyed first (destroying the comm invalidates them). */
DISCO_API void disco_comm_destroy(disco_comm_t *comm);

DISCO_API int disco_comm_rank(const disco_comm_t *comm); /* -1 if NULL */
DISCO_API int disco_comm_size(const disco_comm_t *comm); /* -1 if NULL */
DISCO_API int disco_comm_num_local_experts(const disco_comm_t *comm);
DISCO_API const char *disco_comm_backend(const disco_comm_t *comm); /* "local"... */
/* Copy of the normalised config (defaults filled in). */
DISCO_API disco_result_t disco_comm_get_config(const disco_comm_t *comm,
                                               disco_config_t *config);
/* 1 if buffers passed to this comm are device (CUDA) pointers, else 0. */
DISCO_API int disco_comm_uses_device_memory(const disco_comm_t *comm);

/* Capabilities of a comm's backend (bit set; 0 for NULL). */
#define DISCO_CAP_NO_HOST_SYNC 0x1u /* dispatch and combine never wait on the host */
#define DISCO_CAP_GRAPH 0x2u        /* dispatch + combine capturable in a CUDA graph */
DISCO_API uint32_t disco_comm_caps(const disco_comm_t *comm);

/* Worst-case rows one dispatch can produce on this comm for `layout` (the
 * recv_capacity that never overflows): world_size * max_tokens *
 * min(top_k, num_local_experts) + num_local_experts * (expert_alignment - 1)
 * for EXPERT_MAJOR, world_size * max_tokens for RANK_MAJOR. Not collective.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (layout or alignment). */
DISCO_API disco_result_t disco_comm_max_recv_rows(const disco_comm_t *comm,
                                                  disco_layout_t layout,
                                                  int32_t expert_alignment,
                                                  int64_t *rows);

/*
 * Errors of this comm's earlier device work that the calls themselves could
 * not return, because they do not wait for the device (backends with
 * DISCO_CAP_NO_HOST_SYNC: bad expert ids found on the device, CAPACITY,
 * REMOTE, TIMEOUT). Returns the first such error since the last check (its
 * message in disco_last_error()) and forgets it, or DISCO_SUCCESS. A TIMEOUT
 * (or INTERNAL) is fatal: it stays, and every later call returns it at once.
 * wait != 0: first waits, at most the comm's timeout_ms, until the device has
 * finished the comm's last enqueued (not graph-captured) call. Not
 * collective. Host backends and the nccl backend report every error from the
 * call itself, and this returns DISCO_SUCCESS.
 */
DISCO_API disco_result_t disco_comm_check(disco_comm_t *comm, int32_t wait);

/* A handle holds one dispatch's routing plan for the matching combine. Its
 * memory is sized from the config here, never per call. Not collective. */
DISCO_API disco_result_t disco_handle_create(disco_comm_t *comm, disco_handle_t **handle);
DISCO_API void disco_handle_destroy(disco_handle_t *handle);

/* After a successful dispatch or dispatch_layout: rows this rank receives
 * (padding rows included), as a host value. */
DISCO_API disco_result_t disco_handle_num_recv_rows(const disco_handle_t *handle,
                                                    int64_t *num_rows);

/* ---- dispatch ----------------------------------------------------------- */
#define DISCO_DISPATCH_ARGS_MAGIC 0x44445350u /* "DDSP" */

/* flags */
/* Use the routing plan already in the handle (from dispatch_layout or an
 * earlier dispatch with the same topk_idx and num_tokens) instead of
 * recomputing it: no count exchange and no host read-back. */
#define DISCO_DISPATCH_REUSE_LAYOUT 0x1u

typedef struct disco_dispatch_args {
  size_t size;
  uint32_t magic;
  uint32_t version;
  /* inputs; on GPU backends these are device pointers */
  const void *x;                 /* [num_tokens, H] of config dtype */
  const void *topk_idx;          /* [num_tokens, K]; -1 = unused slot */
  disco_index_type_t index_type; /* int64 (default) or int32 */
  const float *topk_weights;     /* [num_tokens, K] fp32, or NULL = unweighted */
  int64_t num_tokens;            /* 0 <= num_tokens <= max_tokens */
  disco_layout_t layout;
  int32_t expert_alignment; /* EXPERT_MAJOR: pad each expert's rows to a
                               multiple of this (0 or 1: no padding) */
  uint32_t flags;           /* DISCO_DISPATCH_* */
  void *stream;             /* cudaStream_t on GPU backends; ignored on host */
  /* outputs; recv_capacity rows each. Only recv_x is required (when rows > 0);
   * metadata pointers may be NULL when not wanted. */
  int64_t recv_capacity;
  void *recv_x;            /* [cap, H] */
  int32_t *recv_src_rank;  /* [cap] */
  int32_t *recv_src_token; /* [cap] */
  int32_t
      *recv_expert;   /* EXPERT_MAJOR: [cap] global id; RANK_MAJOR: [cap, K] local ids */
  float *recv_weight; /* EXPERT_MAJOR: [cap]; RANK_MAJOR: [cap, K] */
  int32_t *n_tokens_to_rank;   /* [world_size] */
  int32_t *n_tokens_from_rank; /* [world_size] */
  int32_t *tokens_per_expert;  /* [num_local_experts], rows per expert incl. padding */
  int64_t *num_recv_rows;      /* [1] rows received (same memory space as outputs) */
} disco_dispatch_args_t;

#define DISCO_DISPATCH_ARGS_INIT                                                        \
  {                                                                                     \
    sizeof(disco_dispatch_args_t), DISCO_DISPATCH_ARGS_MAGIC, DISCO_STRUCT_VERSION,     \
        NULL, NULL, DISCO_INDEX_INT64, NULL, 0, DISCO_LAYOUT_EXPERT_MAJOR, 1, 0u, NULL, \
        0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL                         \
  }

/*
 * Computes the routing plan into `handle` and exchanges counts, without moving
 * token data; returns in *num_recv_rows (host memory) the exact number of rows
 * this rank will receive, so the caller can allocate outputs of that size and
 * then call disco_dispatch with DISCO_DISPATCH_REUSE_LAYOUT. Output pointers in
 * args are not read. Collective.
 * GPU backends: one device-to-host read of counts (blocks the host until the
 * count exchange on `stream` completes). Not CUDA-graph capturable.
 * Errors: as disco_dispatch, except CAPACITY.
 */
DISCO_API disco_result_t disco_dispatch_layout(disco_comm_t *comm, disco_handle_t *handle,
                                               const disco_dispatch_args_t *args,
                                               int64_t *num_recv_rows);

/*
 * Sends every token to each rank holding one of its experts (once per rank),
 * and writes the receive layout and metadata. Collective. The handle is then
 * ready for disco_combine. Deterministic: outputs are a pure function of all
 * ranks' inputs, identical on every backend.
 * Host backends: synchronous. GPU backends: enqueued on args->stream.
 * Errors: NULL_POINTER, MISALIGNED, BAD_STRUCT, INVALID_ARGUMENT,
 * EXPERT_OUT_OF_RANGE, DUPLICATE_EXPERT, TOO_MANY_TOKENS, CAPACITY (this rank's
 * outputs hold fewer than the rows it receives; nothing written, peers
 * unaffected), REMOTE (another rank's input was rejected: no data moved
 * anywhere), TIMEOUT, BACKEND, CUDA. After any error the communicator stays
 * usable; the handle holds no plan until the next successful dispatch.
 */
DISCO_API disco_result_t disco_dispatch(disco_comm_t *comm, disco_handle_t *handle,
                                        const disco_dispatch_args_t *args);

/* ---- combine ------------------------------------------------------------ */
#define DISCO_COMBINE_ARGS_MAGIC 0x44434d42u /* "DCMB" */

typedef struct disco_combine_args {
  size_t size;
  uint32_t magic;
  uint32_t version;
  const void *y;    /* one row per dispatch output row, same order, config dtype */
  int64_t y_rows;   /* rows y holds; checked >= received rows; -1 = not checked */
  void *out;        /* [num_tokens of the dispatch, H] of config dtype */
  int32_t weighted; /* EXPERT_MAJOR: 1 = apply the dispatch's topk_weights (if it
                       had any), 0 = plain sum. Ignored for RANK_MAJOR. */
  void *stream;
} disco_combine_args_t;

#define DISCO_COMBINE_ARGS_INIT                                                         \
  {                                                                                     \
    sizeof(disco_combine_args_t), DISCO_COMBINE_ARGS_MAGIC, DISCO_STRUCT_VERSION, NULL, \
        -1, NULL, 1, NULL                                                               \
  }

/*
 * out[t] = sum over valid slots j of w[t,j] * y[row(t,j)] in DESIGN.md's fixed
 * order (expert side: local experts ascending, fp32; token side: source ranks
 * ascending, fp32; one cast at the end). Tokens with no valid slot get zeros.
 * RANK_MAJOR: y rows are already reduced per received token; only the token
 * side runs. Collective. Host backends: synchronous; GPU backends: enqueued on
 * args->stream, no host sync. The handle may be combined several times.
 * Errors: NULL_POINTER, MISALIGNED, BAD_STRUCT, INVALID_USAGE (handle holds no
 * successful dispatch of this comm), CAPACITY (y_rows too small), TIMEOUT,
 * BACKEND, CUDA.
 */
DISCO_API disco_result_t disco_combine(disco_comm_t *comm, disco_handle_t *handle,
                                       const disco_combine_args_t *args);

#ifdef __cplusplus
}
#endif

#endif /* DISCO_H_ */
