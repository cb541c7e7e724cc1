"""Fused dense kernels: GEMM + bias + activation epilogue, and the fused backward prologue.

Forward (``dense_fwd_kernel``): out = f(x @ W^T + b), f applied to the float32 accumulator before
the cast (Triton tutorial 03), the pre-activation stored only when backward needs it.

Backward (``dense_bwd_kernel``): the activation derivative is applied while the (grad_out, saved)
tiles are loaded as the A operand of grad_x = (grad_out * f'(saved)) @ W, so there is no separate
elementwise pass over the (M, N) gradient. The programs of the first K-column block also write
grad_pre (read by the grad_w GEMM) and its per-row-block column sums (the bias gradient, finished
by a (cdiv(M, BLOCK_M), N) -> (N,) sum). Gated layers (GATED) do the same with two accumulators
in the forward and both halves of grad_pre ([gate, up]) in the backward.
"""

import triton
import triton.language as tl

from nnfast.kernels import activations as act


@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row blocks share their W tiles in L2 (Triton tutorial 03).
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# M_BUCKET (M rounded up to a power of two) is read by the autotuner's key only.
@triton.jit(do_not_specialize=["M_BUCKET"])
def dense_fwd_kernel(
    x_ptr,  # (M, K), any strides
    w_ptr,  # (N, K), any strides
    b_ptr,  # (N,), or (2N,) when GATED; any stride (stride 0: an expanded bias)
    out_ptr,  # (M, N), contiguous
    pre_ptr,  # (M, N), or (M, 2N) [gate, up] when GATED; contiguous; written when STORE_PRE
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_b,
    param,  # leaky_relu's negative_slope
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
    GATED: tl.constexpr,  # y = act(x W_g^T + b_g) * (x W_u^T + b_u); W rows [0, N) gate, [N, 2N) up
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    # int64 offsets: tensors over 2^31 elements must not wrap.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge are clamped by modulo so the K loop needs only the K mask;
    # their results are masked at the store.
    rows = offs_m % M
    cols = offs_n % N
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # used when GATED
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if GATED:  # the up rows sit N rows below the gate rows
            b_up = tl.load(w_ptrs + N * stride_wn, mask=offs_k[:, None] < k_left, other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * stride_b).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b_ptr + (N + cols) * stride_b).to(tl.float32)[None, :]
    out = act.apply(acc, param, ACT)
    if GATED:
        out = out * acc_up
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(
        out_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask
    )
    if STORE_PRE:
        pre_n = 2 * N if GATED else N  # row length of pre
        pre_ptrs = pre_ptr + offs_m[:, None] * pre_n + offs_n[None, :]
        tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(pre_ptrs + N, acc_up.to(pre_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M_BUCKET"])
def dense_bwd_kernel(
    go_ptr,  # (M, N) grad of the output, any strides
    s_ptr,  # (M, R) saved output or pre-activation, contiguous; R = 2N [gate, up] when GATED
    w_ptr,  # (R, K), any strides
    gx_ptr,  # (M, K) grad_x, contiguous; written when COMPUTE_GX
    gp_ptr,  # (M, R) grad_pre, contiguous; written when STORE_GP
    gb_ptr,  # (cdiv(M, BLOCK_M), R) float32 bias-gradient partial sums; written when HAS_BIAS
    M,
    N,
    K,
    M_BUCKET,
    stride_gom,
    stride_gon,
    stride_wn,
    stride_wk,
    param,
    ACT: tl.constexpr,
    COMPUTE_GX: tl.constexpr,
    STORE_GP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Without grad_x the grid has one program per row block (num_pid_k = 1).
    num_pid_k = tl.cdiv(K, BLOCK_K) if COMPUTE_GX else 1
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_pid_k, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    R = 2 * N if GATED else N  # row length of saved, grad_pre and the bias partials
    go_ptrs = go_ptr + offs_m[:, None] * stride_gom + offs_n[None, :] * stride_gon
    s_ptrs = s_ptr + offs_m[:, None] * R + offs_n[None, :]
    gp_ptrs = gp_ptr + offs_m[:, None] * R + offs_n[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + (offs_k % K)[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        n_left = N - n * BLOCK_N
        mask = m_mask[:, None] & (offs_n[None, :] < n_left)
        go = tl.load(go_ptrs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            # y = f(gate) * up:  dL/dgate = dL/dy * up * f'(gate),  dL/dup = dL/dy * f(gate)
            up = tl.load(s_ptrs + N, mask=mask, other=0.0).to(tl.float32)
            gp = (go * up * act.grad(s, param, ACT)).to(gp_ptr.dtype.element_ty)
            gp_up = (go * act.apply(s, param, ACT)).to(gp_ptr.dtype.element_ty)
        else:
            gp = (go * act.grad(s, param, ACT)).to(gp_ptr.dtype.element_ty)
        if pid_k == 0:  # one program per row block writes grad_pre and the bias partials
            gb_ptrs = gb_ptr + pid_m * R + n * BLOCK_N + offs_n
            if STORE_GP:
                tl.store(gp_ptrs, gp, mask=mask)
                if GATED:
                    tl.store(gp_ptrs + N, gp_up, mask=mask)
            if HAS_BIAS:
                tl.store(gb_ptrs, tl.sum(gp.to(tl.float32), axis=0), mask=offs_n < n_left)
                if GATED:
                    tl.store(
                        gb_ptrs + N, tl.sum(gp_up.to(tl.float32), axis=0), mask=offs_n < n_left
                    )
        if COMPUTE_GX:
            w = tl.load(w_ptrs, mask=offs_n[:, None] < n_left, other=0.0)
            acc = tl.dot(gp, w, acc, input_precision=INPUT_PRECISION)
            if GATED:  # the up rows of W sit N rows below the gate rows
                w_up = tl.load(w_ptrs + N * stride_wn, mask=offs_n[:, None] < n_left, other=0.0)
                acc = tl.dot(gp_up, w_up, acc, input_precision=INPUT_PRECISION)
        go_ptrs += BLOCK_N * stride_gon
        s_ptrs += BLOCK_N
        gp_ptrs += BLOCK_N
        w_ptrs += BLOCK_N * stride_wn
    if COMPUTE_GX:
        offs = offs_m[:, None] * K + offs_k[None, :]
        tl.store(
            gx_ptr + offs,
            acc.to(gx_ptr.dtype.element_ty),
            mask=m_mask[:, None] & (offs_k[None, :] < K),
        )
