"""The Triton kernels of ``triton_rows`` (kept apart because ``triton.jit`` decides at
definition time whether to compile or interpret: this module is imported on first use,
after a CPU test has set ``TRITON_INTERPRET=1``).

Each update kernel program takes BLOCK_R segments (touched rows) u < n_valid: it sums
each row's lookups' bag gradients in registers and applies the rule to the rows in
place, with the same float32 arithmetic as ``csrc/fused_rows_cpu.cpp``.
"""

import triton
import triton.language as tl


@triton.jit
def _rows_grad(ROW_OFF, BAGS, LW, BAG_GRADS, N_VALID, D, HAS_LW: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_D: tl.constexpr):
    # This program's segments u (umask: u < n_valid), the columns, and the summed gradients
    # [BLOCK_R, BLOCK_D]: segment u's j-th lookup adds lw[i] * bag_grads[bags[i]], i = row_offsets[u] + j.
    u = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    umask = u < tl.load(N_VALID)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    start = tl.load(ROW_OFF + u, mask=umask, other=0)
    count = tl.load(ROW_OFF + u + 1, mask=umask, other=0) - start
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    most = tl.max(count, axis=0)
    j = 0
    while j < most:  # a while loop: the interpreter cannot range() over loaded bounds
        has = j < count
        bag = tl.load(BAGS + start + j, mask=has, other=0).to(tl.int64)
        g = tl.load(BAG_GRADS + bag[:, None] * D + cols[None, :], mask=has[:, None] & cmask[None, :], other=0.0)
        if HAS_LW:
            g = g * tl.load(LW + start + j, mask=has, other=0.0)[:, None]
        acc += g
        j += 1
    return u, umask, cols, cmask, acc


@triton.jit
def adam_rows(W, M, V, ROWS, ROW_OFF, BAGS, LW, BAG_GRADS, LR, KEEP, N_VALID, D,
              one_b1, beta2, one_b2, eps, inv_bc1, inv_bc2s,
              HAS_LW: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    u, umask, cols, cmask, g = _rows_grad(ROW_OFF, BAGS, LW, BAG_GRADS, N_VALID, D, HAS_LW, BLOCK_R, BLOCK_D)
    off = tl.load(ROWS + u, mask=umask, other=0).to(tl.int64)[:, None] * D + cols[None, :]
    mask = umask[:, None] & cmask[None, :]
    w = tl.load(W + off, mask=mask, other=0.0)
    m = tl.load(M + off, mask=mask, other=0.0)
    v = tl.load(V + off, mask=mask, other=0.0)
    m = m + one_b1 * (g - m)
    v = beta2 * v + one_b2 * g * g
    if HAS_KEEP:
        w = tl.load(KEEP + u, mask=umask, other=1.0)[:, None] * w
    step = tl.load(LR + u, mask=umask, other=0.0) * inv_bc1
    w = w - step[:, None] * m / (tl.sqrt(v) * inv_bc2s + eps)
    tl.store(M + off, m, mask=mask)
    tl.store(V + off, v, mask=mask)
    tl.store(W + off, w, mask=mask)


@triton.jit
def rowwise_adagrad_rows(W, ACC, ROWS, ROW_OFF, BAGS, LW, BAG_GRADS, LR, KEEP, N_VALID, D,
                         eps, l2, acc_decay, sq_scale,
                         HAS_LW: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    u, umask, cols, cmask, g = _rows_grad(ROW_OFF, BAGS, LW, BAG_GRADS, N_VALID, D, HAS_LW, BLOCK_R, BLOCK_D)
    row = tl.load(ROWS + u, mask=umask, other=0).to(tl.int64)
    off = row[:, None] * D + cols[None, :]
    mask = umask[:, None] & cmask[None, :]
    w = tl.load(W + off, mask=mask, other=0.0)
    g = g + l2 * w
    a = acc_decay * tl.load(ACC + row, mask=umask, other=0.0) + sq_scale * (tl.sum(g * g, axis=1) / D)
    tl.store(ACC + row, a, mask=umask)
    if HAS_KEEP:
        w = tl.load(KEEP + u, mask=umask, other=1.0)[:, None] * w
    w = w - (tl.load(LR + u, mask=umask, other=0.0) / (tl.sqrt(a) + eps))[:, None] * g
    tl.store(W + off, w, mask=mask)


@triton.jit
def store_rows(DST, ROWS, VALUES, N_VALID, BLOCK: tl.constexpr):
    # DST[ROWS[i]] = VALUES[i] for i < n_valid: the padded entries write nothing.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < tl.load(N_VALID)
    rows = tl.load(ROWS + i, mask=mask, other=0)
    tl.store(DST + rows, tl.load(VALUES + i, mask=mask), mask=mask)
