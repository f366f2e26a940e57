#!/bin/sh
# Print the NCCL header lines cited by docs/design-nccl-device.md (2.28.9 numbering),
# so the same command on another NCCL shows whether they moved.
# usage: cited-lines.sh [INCLUDE_DIR]   (default /usr/include)
d=${1:-/usr/include}
grep -n '#define NCCL_VERSION_CODE' "$d/nccl.h"
for spec in nccl.h:59 nccl.h:61 nccl.h:141 nccl.h:144 nccl.h:151 nccl.h:197 \
  nccl.h:273 nccl.h:277 nccl_device/core.h:39,41 nccl_device/core.h:62,78 \
  nccl_device/core.h:97,98 nccl_device/core.h:106 nccl_device/core.h:111 \
  nccl_device/core.h:113,114 nccl_device/core.h:152,153 \
  nccl_device/impl/core__funcs.h:43,57 nccl_device/impl/core__funcs.h:113 \
  nccl_device/impl/comm__types.h:29 nccl_device/impl/lsa_barrier__funcs.h:94 \
  nccl_device/impl/lsa_barrier__funcs.h:107 nccl_device/lsa_barrier.h:23 \
  nccl_device/lsa_barrier.h:31; do
  f=${spec%%:*}
  echo "== $f:${spec#*:}"
  sed -n "${spec#*:}p" "$d/$f" 2>&1
done
