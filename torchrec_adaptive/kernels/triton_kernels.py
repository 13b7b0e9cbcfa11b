"""The Triton kernels of ``triton_rows`` (kept apart because ``triton.jit`` decides at
definition time whether to compile or interpret: this module is imported on first use,
after a CPU test has set ``TRITON_INTERPRET=1``).

Each update kernel is one program per segment (touched row) u < n_valid: it sums the
row's lookups' bag gradients in registers and applies the rule to the row in place,
with the same float32 arithmetic as ``csrc/fused_rows_cpu.cpp``.
"""

import triton
import triton.language as tl


@triton.jit
def _row_grad(u, ROW_OFF, BAGS, LW, BAG_GRADS, D, cols, cmask, HAS_LW: tl.constexpr, BLOCK_D: tl.constexpr):
    # The summed gradient of segment u: sum over its lookups i of lw[i] * bag_grads[bags[i]].
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    i = tl.load(ROW_OFF + u)
    end = tl.load(ROW_OFF + u + 1)
    while i < end:  # a while loop: the interpreter cannot range() over loaded bounds
        bag = tl.load(BAGS + i).to(tl.int64)
        g = tl.load(BAG_GRADS + bag * D + cols, mask=cmask, other=0.0)
        if HAS_LW:
            g = g * tl.load(LW + i)
        acc += g
        i += 1
    return acc

@triton.jit
def adam_rows(W, M, V, ROWS, ROW_OFF, BAGS, LW, BAG_GRADS, LR, KEEP, N_VALID, D,
              one_b1, beta2, one_b2, eps, inv_bc1, inv_bc2s,
              HAS_LW: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_D: tl.constexpr):
    u = tl.program_id(0)
    if u < tl.load(N_VALID):
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        g = _row_grad(u, ROW_OFF, BAGS, LW, BAG_GRADS, D, cols, cmask, HAS_LW, BLOCK_D)
        off = tl.load(ROWS + u).to(tl.int64) * D + cols
        w = tl.load(W + off, mask=cmask, other=0.0)
        m = tl.load(M + off, mask=cmask, other=0.0)
        v = tl.load(V + off, mask=cmask, other=0.0)
        m = m + one_b1 * (g - m)
        v = beta2 * v + one_b2 * g * g
        if HAS_KEEP:
            w = tl.load(KEEP + u) * w
        w = w - (tl.load(LR + u) * inv_bc1) * m / (tl.sqrt(v) * inv_bc2s + eps)
        tl.store(M + off, m, mask=cmask)
        tl.store(V + off, v, mask=cmask)
        tl.store(W + off, w, mask=cmask)

@triton.jit
def rowwise_adagrad_rows(W, ACC, ROWS, ROW_OFF, BAGS, LW, BAG_GRADS, LR, KEEP, N_VALID, D,
                         eps, l2, acc_decay, sq_scale,
                         HAS_LW: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_D: tl.constexpr):
    u = tl.program_id(0)
    if u < tl.load(N_VALID):
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        g = _row_grad(u, ROW_OFF, BAGS, LW, BAG_GRADS, D, cols, cmask, HAS_LW, BLOCK_D)
        row = tl.load(ROWS + u).to(tl.int64)
        off = row * D + cols
        w = tl.load(W + off, mask=cmask, other=0.0)
        g = g + l2 * w
        a = acc_decay * tl.load(ACC + row) + sq_scale * (tl.sum(g * g, axis=0) / D)
        tl.store(ACC + row, a)
        if HAS_KEEP:
            w = tl.load(KEEP + u) * w
        w = w - (tl.load(LR + u) / (tl.sqrt(a) + eps)) * g
        tl.store(W + off, w, mask=cmask)

@triton.jit
def store_rows(DST, ROWS, VALUES, N_VALID, BLOCK: tl.constexpr):
    # DST[ROWS[i]] = VALUES[i] for i < n_valid: the padded entries write nothing.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < tl.load(N_VALID)
    rows = tl.load(ROWS + i, mask=mask, other=0)
    tl.store(DST + rows, tl.load(VALUES + i, mask=mask), mask=mask)
