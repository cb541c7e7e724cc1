"""Fully fused small-width MLP: every layer of a row block in one program, activations on chip.

For widths up to 128 (zero-padded to P, a power of two >= 16) and up to MAX_HIDDEN hidden layers
the whole forward runs in one kernel: a BLOCK_M-row tile of x goes through every layer in
registers, and only the output and, for training, each hidden layer's saved tensor (pre-activation,
or output where f' reads the output; (M, h_i) like the layer-by-layer path keeps) are written. The backward walks the same tile back through the layers: grad_pre stays on chip,
each layer's input is reloaded or recomputed from what the forward saved. The backward grid is
persistent: program p walks row blocks p, p + G, p + 2G, ... and adds each block's weight and bias
gradients into its own float32 slot (plain loads and stores, no atomics), and the G slots are
summed afterwards in a fixed order: deterministic, and no contention on one buffer at large M.
Zero padding is exact: padded weight rows and columns are zero, so padded units never reach a
real one, in either direction.
"""

import triton
import triton.language as tl

from nnfast.kernels import activations as act

MAX_HIDDEN = 8  # saved-tensor pointer arguments s0..s7


@triton.jit
def _pick(i: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    # the i-th of eight arguments, chosen at compile time
    if i == 0:
        r = a0
    elif i == 1:
        r = a1
    elif i == 2:
        r = a2
    elif i == 3:
        r = a3
    elif i == 4:
        r = a4
    elif i == 5:
        r = a5
    elif i == 6:
        r = a6
    else:
        r = a7
    return r


@triton.jit
def _tile(ptr, offs_m, offs_p, stride_m, stride_p, M, cols):
    # rows offs_m x columns offs_p of a (M, cols) matrix; zeros past either edge
    return tl.load(
        ptr + offs_m[:, None] * stride_m + offs_p[None, :] * stride_p,
        mask=(offs_m[:, None] < M) & (offs_p[None, :] < cols),
        other=0.0,
    )


@triton.jit
def mlp_fused_fwd_kernel(
    x_ptr,  # (M, D_IN), any strides
    w_ptr,  # (L, P, P) zero-padded weights, w[l, n, k] = W_l[n, k]
    b_ptr,  # (L, P) zero-padded biases
    out_ptr,  # (M, D_OUT), contiguous
    # hidden layer i keeps s_i (M, h_i), contiguous: its output if FROM_OUTPUT else its
    # pre-activation; unused pointers and widths are placeholders
    s0,
    s1,
    s2,
    s3,
    s4,
    s5,
    s6,
    s7,
    h0,
    h1,
    h2,
    h3,
    h4,
    h5,
    h6,
    h7,
    M,
    D_IN,
    D_OUT,
    stride_xm,
    stride_xk,
    param,
    L: tl.constexpr,
    P: tl.constexpr,
    ACT: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAVE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, P)
    m_mask = offs_m < M
    h = _tile(x_ptr, offs_m, offs_p, stride_xm, stride_xk, M, D_IN)
    dtype = h.dtype
    for layer in tl.static_range(L):
        # W_l^T tile (k, n): the layer's weight read transposed from the packed buffer
        w_t = tl.load(w_ptr + layer * P * P + offs_p[None, :] * P + offs_p[:, None])
        acc = tl.dot(h, w_t, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + layer * P + offs_p).to(tl.float32)[None, :]
        if layer < L - 1:
            y = act.apply(acc, param, ACT)
            if SAVE:
                kept = y if FROM_OUTPUT else acc
                h_i = _pick(layer, h0, h1, h2, h3, h4, h5, h6, h7)
                tl.store(
                    _pick(layer, s0, s1, s2, s3, s4, s5, s6, s7)
                    + offs_m[:, None] * h_i
                    + offs_p[None, :],
                    kept.to(dtype),
                    mask=m_mask[:, None] & (offs_p[None, :] < h_i),
                )
            h = y.to(dtype)  # rounded like a layer-by-layer output
        else:
            tl.store(
                out_ptr + offs_m[:, None] * D_OUT + offs_p[None, :],
                acc.to(dtype),
                mask=m_mask[:, None] & (offs_p[None, :] < D_OUT),
            )


@triton.jit
def mlp_fused_bwd_kernel(
    go_ptr,  # (M, D_OUT), any strides
    x_ptr,  # (M, D_IN), any strides
    w_ptr,  # (L, P, P) zero-padded weights
    s0,
    s1,
    s2,
    s3,
    s4,
    s5,
    s6,
    s7,  # what the forward saved, (M, h_i) each
    h0,
    h1,
    h2,
    h3,
    h4,
    h5,
    h6,
    h7,
    gx_ptr,  # (M, D_IN) grad_x, contiguous; written when NEED_X
    gw_ptr,  # (G, L, P, P) float32, zeroed; program p adds its blocks' grad_w into slot p
    gb_ptr,  # (G, L, P) float32, zeroed; the same for grad_b when HAS_BIAS
    M,
    D_IN,
    D_OUT,
    stride_gom,
    stride_gon,
    stride_xm,
    stride_xk,
    param,
    L: tl.constexpr,
    P: tl.constexpr,
    ACT: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NEED_X: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_p = tl.arange(0, P)
    square = offs_p[:, None] * P + offs_p[None, :]
    gw_slot = gw_ptr + pid.to(tl.int64) * L * P * P
    gb_slot = gb_ptr + pid.to(tl.int64) * L * P
    for blk in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        # blk * BLOCK_M < M + BLOCK_M fits M's integer type; the offsets themselves are int64
        offs_m = tl.arange(0, BLOCK_M).to(tl.int64) + blk * BLOCK_M
        m_mask = offs_m < M
        # grad of the last layer's pre-activation (no activation there): grad_out itself
        g = _tile(go_ptr, offs_m, offs_p, stride_gom, stride_gon, M, D_OUT)
        dtype = g.dtype
        for i in tl.static_range(L):
            layer = L - 1 - i
            # this layer's input: x, or the previous layer's output (saved, or f(saved pre));
            # s_prev is bound on both branches (the compiler scopes names per branch)
            if layer == 0:
                xin = _tile(x_ptr, offs_m, offs_p, stride_xm, stride_xk, M, D_IN)
                s_prev = xin
            else:
                # padded units read as 0: f(0) = 0 for every activation that keeps its
                # pre-activation, and their gradients are 0 since the padded weights are
                h_p = _pick(layer - 1, h0, h1, h2, h3, h4, h5, h6, h7)
                s_prev = _tile(
                    _pick(layer - 1, s0, s1, s2, s3, s4, s5, s6, s7), offs_m, offs_p, h_p, 1, M, h_p
                )
                if FROM_OUTPUT:
                    xin = s_prev
                else:
                    xin = act.apply(s_prev.to(tl.float32), param, ACT).to(dtype)
            # grad_w[l] += g^T @ xin ; grad_b[l] += column sums of g (this program's slot)
            gw_ptrs = gw_slot + layer * P * P + square
            gw_tile = tl.dot(tl.trans(g), xin, input_precision=INPUT_PRECISION)
            tl.store(gw_ptrs, tl.load(gw_ptrs) + gw_tile)
            if HAS_BIAS:
                gb_ptrs = gb_slot + layer * P + offs_p
                tl.store(gb_ptrs, tl.load(gb_ptrs) + tl.sum(g.to(tl.float32), axis=0))
            if layer > 0 or NEED_X:
                w = tl.load(w_ptr + layer * P * P + square)  # (n, k)
                gin = tl.dot(g, w, input_precision=INPUT_PRECISION)
                if layer > 0:
                    # to the previous layer's pre-activation: times f'(saved)
                    g = (gin * act.grad(s_prev.to(tl.float32), param, ACT)).to(dtype)
                else:
                    tl.store(
                        gx_ptr + offs_m[:, None] * D_IN + offs_p[None, :],
                        gin.to(dtype),
                        mask=m_mask[:, None] & (offs_p[None, :] < D_IN),
                    )
