"""@triton.jit activation functions and derivatives, switched on the table's ``code``.

Codes and formulas match ``nnfast/activations.py`` (the reference) and ``csrc/activations.h``.
All math runs on float32 values (the GEMM accumulator or loaded tiles upcast to float32).
"""

import triton
import triton.language as tl

IDENTITY: tl.constexpr = tl.constexpr(0)
RELU: tl.constexpr = tl.constexpr(1)
LEAKY_RELU: tl.constexpr = tl.constexpr(2)
GELU: tl.constexpr = tl.constexpr(3)
GELU_TANH: tl.constexpr = tl.constexpr(4)
SILU: tl.constexpr = tl.constexpr(5)
SIGMOID: tl.constexpr = tl.constexpr(6)
TANH: tl.constexpr = tl.constexpr(7)
SQUARED_RELU: tl.constexpr = tl.constexpr(8)
QUICK_GELU: tl.constexpr = tl.constexpr(12)  # 9-11 are the gated rows (their base is applied)

# Float constants are written as literals in the functions below: a module-level constexpr
# multiplied with a tensor is mis-typed by the Triton 3.9 interpreter.
# sqrt(2/pi) = 0.7978845608028654, 1/sqrt(2) = 0.7071067811865476,
# 1/sqrt(2 pi) = 0.3989422804014327, gelu_tanh's kappa = 0.044715, quick_gelu's alpha = 1.702.


@triton.jit
def tanh(x):
    # tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): never overflows; portable across
    # Triton versions and backends (no libdevice). Below |x| = 0.25, where 1 - e cancels
    # (tanh(1e-8) came out 0), the odd Taylor series through x^11: the first term left out is
    # 2e-10 of the result there.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -t, t)
    x2 = x * x
    p = -0.008863235529902197 * x2 + 0.021869488536155203  # -1382/155925, 62/2835
    p = p * x2 - 0.05396825396825397  # -17/315
    p = p * x2 + 0.13333333333333333  # 2/15
    p = p * x2 - 0.3333333333333333  # -1/3
    return tl.where(tl.abs(x) < 0.25, x + x * x2 * p, big)


@triton.jit
def apply(x, param, ACT: tl.constexpr):
    """f(x) for float32 x; ``param`` is leaky_relu's negative_slope."""
    # relu via where, not tl.maximum: maximum drops NaN, PyTorch's relu propagates it.
    if ACT == RELU:
        y = tl.where(x < 0, 0.0, x)
    elif ACT == LEAKY_RELU:
        y = tl.where(x > 0, x, x * param)
    elif ACT == GELU:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == GELU_TANH:
        y = 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == SILU:
        y = x * tl.sigmoid(x)
    elif ACT == SIGMOID:
        y = tl.sigmoid(x)
    elif ACT == TANH:
        y = tanh(x)
    elif ACT == SQUARED_RELU:
        r = tl.where(x < 0, 0.0, x)
        y = r * r
    elif ACT == QUICK_GELU:
        y = x * tl.sigmoid(1.702 * x)
    else:
        y = x
    return y


@triton.jit
def grad(s, param, ACT: tl.constexpr):
    """f'(pre) from the saved float32 tensor s: the output for relu, leaky_relu (slope >= 0),
    sigmoid and tanh; the pre-activation otherwise (see ``Activation.from_output``)."""
    if ACT == RELU:
        # relu'(x) = [y > 0]
        d = tl.where(s > 0, 1.0, 0.0)
    elif ACT == LEAKY_RELU:
        # leaky_relu'(x) = 1 if x > 0 else slope (sign of s = sign of x)
        d = tl.where(s > 0, 1.0, param)
    elif ACT == GELU:
        # d/dx gelu(x) = Phi(x) + x * phi(x)
        cdf = 0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476))
        d = cdf + s * tl.exp(-0.5 * s * s) * 0.3989422804014327
    elif ACT == GELU_TANH:
        # d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 kappa x^2)
        t = tanh(0.7978845608028654 * (s + 0.044715 * s * s * s))
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * s * s)
        d = 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * du
    elif ACT == SILU:
        # d/dx x sigma(x) = sigma (1 + x (1 - sigma))
        sg = tl.sigmoid(s)
        d = sg * (1.0 + s * (1.0 - sg))
    elif ACT == SIGMOID:
        # sigma' = y (1 - y)
        d = s * (1.0 - s)
    elif ACT == TANH:
        # tanh' = 1 - y^2
        d = 1.0 - s * s
    elif ACT == SQUARED_RELU:
        # d/dx relu(x)^2 = 2 relu(x)
        d = 2.0 * tl.maximum(s, 0.0)
    elif ACT == QUICK_GELU:
        # d/dx x sigma(a x) = sigma (1 + a x (1 - sigma)), a = 1.702
        sg = tl.sigmoid(1.702 * s)
        d = sg * (1.0 + 1.702 * s * (1.0 - sg))
    else:
        d = s * 0.0 + 1.0
    return d
