// Launcher of the operand split of the three-TF32 product (GemmSplitTf32 in blas.h): an fp32
// value x as hi = tf32(x) and lo = tf32(x - hi), both rounded to nearest (cvt.rna), so that
// hi + lo carries about 22 of x's 24 significand bits and every product of two parts is exact in
// fp32. Returns the launch's cudaError_t and runs on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// For src [rows, cols] (row-major, row stride ld_src), writes three copies of it into dst (row
// stride ld_dst): copy p at dst + p·part_stride, the low part in copy `lo_copy` and the high part
// in the other two. The A operand uses part_stride = cols (copies side by side: [lo | hi | hi]),
// the B operand part_stride = rows·ld_dst (stacked: [hi; lo; hi]), so that the product of depth
// 3k is lo_A·hi_B + hi_A·lo_B + hi_A·hi_B.
cudaError_t LaunchSplitTf32(const float* src, int64_t rows, int64_t cols, int64_t ld_src,
                            float* dst, int64_t ld_dst, int64_t part_stride, int lo_copy,
                            cudaStream_t stream);

}  // namespace qcal::kernels::cuda
