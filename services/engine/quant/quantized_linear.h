// A quantized linear layer (codes, scales, zero points, column groups) as every quantizer
// produces it and the exporter consumes it, plus round-to-nearest quantization (RTN) and the
// layer output error used to compare quantizers.
//
// All of it is the CPU reference of the backends' solver ops, kernels/cpu/quant_ref.h, and the
// grid rules (fitting, code <-> value) are kernels/quant_grid.h, shared with the CUDA kernels; this
// header re-exports their names into qcal::engine.
#pragma once

#include "kernels/cpu/quant_ref.h"
#include "kernels/quant_grid.h"
#include "kernels/quant_ops.h"

namespace qcal::engine {

using kernels::GridKind;
using kernels::GroupParams;
using kernels::QuantizedLinear;
using kernels::QuantSpec;

// OK when bits is 2..8 and group_size is -1 or >= 1; otherwise InvalidArgument naming the field.
using kernels::ValidateQuantSpec;

// RTN: QuantizeRtn<T>(w, d_out, d_in, spec), every group of every row fitted and rounded on its
// own in precision T (float or double). Errors (InvalidArgument): an invalid spec or shape, a
// non-finite weight (naming row and column), a group whose range overflows an fp16 scale.
using kernels::ref::QuantizeRtn;

// OutputError(w, w_hat, gram, d_out, d_in): the layer output error ||(W - W^) X^T||_F from the
// Gram matrix G = X^T X [d_in][d_in] (upper triangle read), in double precision.
using kernels::ref::OutputError;

}  // namespace qcal::engine
