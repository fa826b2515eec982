//! The numerical kernels: matrix products (through `matrixmultiply::sgemm`), LayerNorm, GELU,
//! one post-LayerNorm BERT layer forward and backward over a block of concatenated sequences.
//!
//! Every buffer is row-major. A block holds several sequences back to back: `seqs` gives each
//! one's first token and token count; the per-token layers run on the whole block at once,
//! attention runs per sequence and head.

use std::ops::Range;

/// LayerNorm epsilon of BERT (`layer_norm_eps` of all-MiniLM-L6-v2).
pub(crate) const LAYER_NORM_EPS: f32 = 1e-12;

/// Where each parameter of one layer lives in its flat `f32` vector. Dense weights are stored
/// `[in, out]` row-major (the transpose of PyTorch's `[out, in]`: `matrixmultiply` packs a
/// row-major right operand much faster, which is most of the cost for short sequences). Query,
/// key and value are fused into one `[hidden, 3·hidden]` matrix (query columns first) so one
/// product computes all three.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub hidden: usize,
    pub intermediate: usize,
}

/// The parameter kinds of a layer, in storage order.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const PARAMETER_KINDS: [&str; 12] = [
    "qkv.weight",
    "qkv.bias",
    "attention_output.weight",
    "attention_output.bias",
    "attention_norm.gain",
    "attention_norm.bias",
    "intermediate.weight",
    "intermediate.bias",
    "output.weight",
    "output.bias",
    "output_norm.gain",
    "output_norm.bias",
];

impl Layout {
    /// The sizes of the parameter kinds, in the order of [`PARAMETER_KINDS`].
    pub fn sizes(&self) -> [usize; 12] {
        let (h, i) = (self.hidden, self.intermediate);
        [h * 3 * h, 3 * h, h * h, h, h, h, h * i, i, i * h, h, h, h]
    }

    /// Number of `f32` parameters in one layer.
    pub fn len(&self) -> usize {
        self.sizes().iter().sum()
    }

    #[cfg_attr(not(test), allow(dead_code))]
    /// The range of parameter kind `kind` (index into [`PARAMETER_KINDS`]) in a layer's vector.
    pub fn range(&self, kind: usize) -> Range<usize> {
        let sizes = self.sizes();
        let start: usize = sizes[..kind].iter().sum();
        start..start + sizes[kind]
    }
}

/// Borrowed views of one layer's parameters (or of their gradients).
pub(crate) struct LayerParams<'a, T> {
    pub qkv_w: T,
    pub qkv_b: T,
    pub o_w: T,
    pub o_b: T,
    pub ln1_g: T,
    pub ln1_b: T,
    pub i_w: T,
    pub i_b: T,
    pub out_w: T,
    pub out_b: T,
    pub ln2_g: T,
    pub ln2_b: T,
    _life: std::marker::PhantomData<&'a ()>,
}

/// Cuts one layer's parameters into its twelve tensors, with `split_at` (shared) or
/// `split_at_mut` (exclusive): one body for [`split`] and [`split_mut`].
macro_rules! split_layer {
    ($layer:expr, $layout:expr, $split_at:ident) => {{
        let layer = $layer;
        let layout: Layout = $layout;
        assert_eq!(layer.len(), layout.len());
        let s = layout.sizes();
        let (qkv_w, r) = layer.$split_at(s[0]);
        let (qkv_b, r) = r.$split_at(s[1]);
        let (o_w, r) = r.$split_at(s[2]);
        let (o_b, r) = r.$split_at(s[3]);
        let (ln1_g, r) = r.$split_at(s[4]);
        let (ln1_b, r) = r.$split_at(s[5]);
        let (i_w, r) = r.$split_at(s[6]);
        let (i_b, r) = r.$split_at(s[7]);
        let (out_w, r) = r.$split_at(s[8]);
        let (out_b, r) = r.$split_at(s[9]);
        let (ln2_g, ln2_b) = r.$split_at(s[10]);
        LayerParams {
            qkv_w,
            qkv_b,
            o_w,
            o_b,
            ln1_g,
            ln1_b,
            i_w,
            i_b,
            out_w,
            out_b,
            ln2_g,
            ln2_b,
            _life: std::marker::PhantomData,
        }
    }};
}

pub(crate) fn split(layer: &[f32], layout: Layout) -> LayerParams<'_, &[f32]> {
    split_layer!(layer, layout, split_at)
}

pub(crate) fn split_mut(layer: &mut [f32], layout: Layout) -> LayerParams<'_, &mut [f32]> {
    split_layer!(layer, layout, split_at_mut)
}

/// One sequence inside a block: its first token and token count.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Seq {
    pub start: usize,
    pub tokens: usize,
}

/// Grows `buffer` to at least `len` values (never shrinks) and returns its first `len`.
pub(crate) fn sized(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

fn span(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * row_stride + (cols - 1) * col_stride + 1
    }
}

/// `c = alpha · a · b + beta · c` with `a` an `m×k` and `b` a `k×n` strided view and `c` an
/// `m×n` view with row stride `rsc` (column stride 1). Bounds are checked before the unsafe call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    rsc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(span(m, k, rsa, csa) <= a.len(), "gemm: a out of bounds");
    assert!(span(k, n, rsb, csb) <= b.len(), "gemm: b out of bounds");
    assert!(span(m, n, rsc, 1) <= c.len(), "gemm: c out of bounds");
    assert!(rsc >= n, "gemm: c rows overlap");
    // SAFETY: the three views were checked to lie inside their slices; `c` is borrowed mutably
    // and its rows do not overlap, so nothing aliases it.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            1,
        );
    }
}

/// Which product [`forward_layer`] uses for its dense layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `matrixmultiply` always: what training uses, so a run's weights do not depend on how
    /// many tokens a thread's share of a batch happens to hold.
    Packed,
    /// [`streamed`] for up to [`STREAMED_MAX_TOKENS`] tokens (one query at inference).
    Streamed,
}

/// `y[t, :] = x[t, :] · W + bias` for an `[in, out]` weight `w`; `y` is `[tokens, out]`.
pub(crate) fn linear(
    x: &[f32],
    tokens: usize,
    w: &[f32],
    bias: &[f32],
    y: &mut [f32],
    kernel: Kernel,
) {
    let out = bias.len();
    let inp = w.len() / out;
    for row in y[..tokens * out].chunks_exact_mut(out) {
        row.copy_from_slice(bias);
    }
    if kernel == Kernel::Streamed
        && tokens <= STREAMED_MAX_TOKENS
        && streamed::accumulate(x, tokens, w, out, y)
    {
        return;
    }
    gemm(tokens, inp, out, 1.0, x, (inp, 1), w, (out, 1), 1.0, y, out);
}

/// Up to this many tokens (a chat message) [`linear`] streams the weights instead of packing
/// them (see [`streamed`]).
pub(crate) const STREAMED_MAX_TOKENS: usize = 24;

/// `y += x · W` for a few rows of `x`, reading `W` (`[in, out]`, row-major) in place.
///
/// Why not `matrixmultiply`: it copies ("packs") both operands into its own layout on every
/// call. For one query's 10-20 tokens against layer 5's 1.8 M weights, packing `W` costs as much
/// as the products (22% of the layer's time in `perf`, see the module `finetune`), and the
/// tuned layer put the query's p99 over the 25 ms budget (`kb eval`, models/README.md). Here
/// each 16-column slab of `W` is read straight from the weights once, and used by every block
/// of 6 rows of `x` (6 × 2 AVX2 accumulators) while it is in cache.
pub(crate) mod streamed {
    /// Adds `x · W` to `y` (`x`: `[rows, in]`, `W`: `[in, out]`, `y`: `[rows, out]`); false (and
    /// nothing done) when the CPU lacks AVX2 + FMA or `out` is not a multiple of 16.
    pub(crate) fn accumulate(x: &[f32], rows: usize, w: &[f32], out: usize, y: &mut [f32]) -> bool {
        let inp = w.len() / out;
        let fits = |len: usize, a: usize, b: usize| a.checked_mul(b).is_some_and(|n| len >= n);
        assert!(fits(x.len(), rows, inp) && fits(y.len(), rows, out) && w.len() == inp * out);
        #[cfg(target_arch = "x86_64")]
        if out.is_multiple_of(16)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked above). The kernel reads `x` up to
            // `rows · inp`, `w` up to `inp · out` and writes `y` up to `rows · out`, in 16-column
            // slabs that end at `out` because `out` is a multiple of 16; the lengths were
            // asserted above. `y` is the only mutable borrow, so it aliases neither `x` nor `w`.
            unsafe { avx2(x, rows, w, inp, out, y) };
            return true;
        }
        let _ = (x, rows, w, out, y);
        false
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(x: &[f32], rows: usize, w: &[f32], inp: usize, out: usize, y: &mut [f32]) {
        // Column slabs outside, row blocks inside: a slab (`in` × 16 floats, 24-96 KB) comes
        // from memory once and stays in L1/L2 while every block of rows uses it.
        for col in (0..out).step_by(16) {
            let mut row = 0;
            while row < rows {
                match rows - row {
                    1 => block::<1>(x, row, col, w, inp, out, y),
                    2 => block::<2>(x, row, col, w, inp, out, y),
                    3 => block::<3>(x, row, col, w, inp, out, y),
                    4 => block::<4>(x, row, col, w, inp, out, y),
                    5 => block::<5>(x, row, col, w, inp, out, y),
                    _ => block::<6>(x, row, col, w, inp, out, y),
                }
                row += 6;
            }
        }
    }

    /// Rows `first .. first + R`, columns `col .. col + 16` of `y` += those of `x · W`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const R: usize>(
        x: &[f32],
        first: usize,
        col: usize,
        w: &[f32],
        inp: usize,
        out: usize,
        y: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let xp = x.as_ptr().add(first * inp);
        let yp = y.as_mut_ptr().add(first * out + col);
        let wp = w.as_ptr().add(col);
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        for r in 0..R {
            lo[r] = _mm256_loadu_ps(yp.add(r * out));
            hi[r] = _mm256_loadu_ps(yp.add(r * out + 8));
        }
        for k in 0..inp {
            let w_lo = _mm256_loadu_ps(wp.add(k * out));
            let w_hi = _mm256_loadu_ps(wp.add(k * out + 8));
            for r in 0..R {
                let a = _mm256_broadcast_ss(&*xp.add(r * inp + k));
                lo[r] = _mm256_fmadd_ps(a, w_lo, lo[r]);
                hi[r] = _mm256_fmadd_ps(a, w_hi, hi[r]);
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(yp.add(r * out), lo[r]);
            _mm256_storeu_ps(yp.add(r * out + 8), hi[r]);
        }
    }
}

/// In place over each row of `x` (`[rows, width]`): `x ← LayerNorm(x)`; keeps the normalised
/// values in `xhat` and each row's 1/σ in `rstd` for the backward pass.
pub(crate) fn layer_norm(
    x: &mut [f32],
    gain: &[f32],
    bias: &[f32],
    xhat: &mut [f32],
    rstd: &mut [f32],
) {
    let width = gain.len();
    for ((row, hat), r) in x
        .chunks_exact_mut(width)
        .zip(xhat.chunks_exact_mut(width))
        .zip(rstd.iter_mut())
    {
        let mean = row.iter().sum::<f32>() / width as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
        let inv = 1.0 / (var + LAYER_NORM_EPS).sqrt();
        *r = inv;
        for j in 0..width {
            let h = (row[j] - mean) * inv;
            hat[j] = h;
            row[j] = h * gain[j] + bias[j];
        }
    }
}

/// Backward of [`layer_norm`]: from `dy` to `dx` (both `[rows, width]`), accumulating the
/// gain and bias gradients.
pub(crate) fn layer_norm_backward(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    gain: &[f32],
    d_gain: &mut [f32],
    d_bias: &mut [f32],
    dx: &mut [f32],
) {
    let width = gain.len();
    for (((dy, hat), r), dx) in dy
        .chunks_exact(width)
        .zip(xhat.chunks_exact(width))
        .zip(rstd.iter())
        .zip(dx.chunks_exact_mut(width))
    {
        let mut mean_d = 0.0f32;
        let mut mean_dh = 0.0f32;
        for j in 0..width {
            let d = dy[j] * gain[j];
            d_gain[j] += dy[j] * hat[j];
            d_bias[j] += dy[j];
            mean_d += d;
            mean_dh += d * hat[j];
        }
        mean_d /= width as f32;
        mean_dh /= width as f32;
        for j in 0..width {
            dx[j] = r * (dy[j] * gain[j] - mean_d - hat[j] * mean_dh);
        }
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// The exact GELU, `x·Φ(x)`.
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * FRAC_1_SQRT_2))
}

/// d GELU / dx = Φ(x) + x·φ(x).
pub(crate) fn gelu_derivative(x: f32) -> f32 {
    0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2)) + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
}

fn softmax_rows(s: &mut [f32], width: usize) {
    for row in s.chunks_exact_mut(width) {
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// Add each column of `rows` (`[n, width]`) into `acc` (`width`).
fn add_column_sums(rows: &[f32], acc: &mut [f32]) {
    let width = acc.len();
    for row in rows.chunks_exact(width) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
}

/// What one layer's forward pass keeps for its backward pass (and its output), for a block of
/// `tokens` tokens. Buffers only grow; the first `tokens · width` values are the live ones.
#[derive(Default)]
pub(crate) struct LayerActivations {
    pub input: Vec<f32>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    ctx: Vec<f32>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    x1: Vec<f32>,
    pre: Vec<f32>,
    act: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
    pub output: Vec<f32>,
}

/// Sum over the block's sequences of `heads · tokens²` (the attention probabilities' size).
fn probs_len(seqs: &[Seq], heads: usize) -> usize {
    seqs.iter().map(|s| heads * s.tokens * s.tokens).sum()
}

/// One BERT layer over the block whose input is in `acts.input`; the result goes to
/// `acts.output`.
pub(crate) fn forward_layer(
    p: &LayerParams<&[f32]>,
    layout: Layout,
    heads: usize,
    seqs: &[Seq],
    tokens: usize,
    acts: &mut LayerActivations,
    kernel: Kernel,
) {
    let (h, inter) = (layout.hidden, layout.intermediate);
    let d = h / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let input = &acts.input[..tokens * h];
    let qkv = sized(&mut acts.qkv, tokens * 3 * h);
    linear(input, tokens, p.qkv_w, p.qkv_b, qkv, kernel);

    let probs = sized(&mut acts.probs, probs_len(seqs, heads));
    let ctx = sized(&mut acts.ctx, tokens * h);
    let mut offset = 0;
    for seq in seqs {
        let n = seq.tokens;
        for head in 0..heads {
            let q = &qkv[seq.start * 3 * h + head * d..];
            let k = &qkv[seq.start * 3 * h + h + head * d..];
            let v = &qkv[seq.start * 3 * h + 2 * h + head * d..];
            let s = &mut probs[offset..offset + n * n];
            gemm(n, d, n, scale, q, (3 * h, 1), k, (1, 3 * h), 0.0, s, n);
            softmax_rows(s, n);
            let c = &mut ctx[seq.start * h + head * d..];
            gemm(n, n, d, 1.0, s, (n, 1), v, (3 * h, 1), 0.0, c, h);
            offset += n * n;
        }
    }

    let x1 = sized(&mut acts.x1, tokens * h);
    linear(ctx, tokens, p.o_w, p.o_b, x1, kernel);
    for (a, x) in x1.iter_mut().zip(input) {
        *a += x;
    }
    let xhat1 = sized(&mut acts.xhat1, tokens * h);
    let rstd1 = sized(&mut acts.rstd1, tokens);
    layer_norm(x1, p.ln1_g, p.ln1_b, xhat1, rstd1);

    let pre = sized(&mut acts.pre, tokens * inter);
    linear(x1, tokens, p.i_w, p.i_b, pre, kernel);
    let act = sized(&mut acts.act, tokens * inter);
    for (a, &x) in act.iter_mut().zip(pre.iter()) {
        *a = gelu(x);
    }

    let out = sized(&mut acts.output, tokens * h);
    linear(act, tokens, p.out_w, p.out_b, out, kernel);
    for (o, x) in out.iter_mut().zip(x1.iter()) {
        *o += x;
    }
    let xhat2 = sized(&mut acts.xhat2, tokens * h);
    let rstd2 = sized(&mut acts.rstd2, tokens);
    layer_norm(out, p.ln2_g, p.ln2_b, xhat2, rstd2);
}

/// Scratch of the backward pass, shared by the layers of a block.
#[derive(Default)]
pub(crate) struct BackwardBuffers {
    d_b: Vec<f32>,
    d_pre: Vec<f32>,
    d_x1: Vec<f32>,
    d_a: Vec<f32>,
    d_ctx: Vec<f32>,
    d_qkv: Vec<f32>,
    d_scores: Vec<f32>,
}

/// Backward of [`forward_layer`]: from `d_out` (`[tokens, hidden]`, the loss gradient with
/// respect to the layer's output) accumulates the parameter gradients into `g` and, when
/// `d_input` is given, writes the gradient with respect to the layer's input into it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_layer(
    p: &LayerParams<&[f32]>,
    g: &mut LayerParams<&mut [f32]>,
    layout: Layout,
    heads: usize,
    seqs: &[Seq],
    tokens: usize,
    acts: &LayerActivations,
    d_out: &[f32],
    buffers: &mut BackwardBuffers,
    d_input: Option<&mut [f32]>,
) {
    let (h, inter) = (layout.hidden, layout.intermediate);
    let d = h / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let t = tokens;
    let input = &acts.input[..t * h];
    let qkv = &acts.qkv[..t * 3 * h];
    let ctx = &acts.ctx[..t * h];
    let x1 = &acts.x1[..t * h];
    let pre = &acts.pre[..t * inter];
    let act = &acts.act[..t * inter];

    // Output LayerNorm.
    let d_b = sized(&mut buffers.d_b, t * h);
    layer_norm_backward(
        &d_out[..t * h],
        &acts.xhat2[..t * h],
        &acts.rstd2[..t],
        p.ln2_g,
        g.ln2_g,
        g.ln2_b,
        d_b,
    );
    // Output dense: b = act·W_out + b_out + x1 (W_out is [inter, h]).
    add_column_sums(d_b, g.out_b);
    gemm(
        inter,
        t,
        h,
        1.0,
        act,
        (1, inter),
        d_b,
        (h, 1),
        1.0,
        g.out_w,
        h,
    );
    let d_pre = sized(&mut buffers.d_pre, t * inter);
    gemm(
        t,
        h,
        inter,
        1.0,
        d_b,
        (h, 1),
        p.out_w,
        (1, h),
        0.0,
        d_pre,
        inter,
    );
    for (dp, &x) in d_pre.iter_mut().zip(pre) {
        *dp *= gelu_derivative(x);
    }
    // Intermediate dense: pre = x1·W_i + b_i; x1 also feeds the residual.
    let d_x1 = sized(&mut buffers.d_x1, t * h);
    d_x1.copy_from_slice(d_b);
    add_column_sums(d_pre, g.i_b);
    gemm(
        h,
        t,
        inter,
        1.0,
        x1,
        (1, h),
        d_pre,
        (inter, 1),
        1.0,
        g.i_w,
        inter,
    );
    gemm(
        t,
        inter,
        h,
        1.0,
        d_pre,
        (inter, 1),
        p.i_w,
        (1, inter),
        1.0,
        d_x1,
        h,
    );
    // Attention LayerNorm.
    let d_a = sized(&mut buffers.d_a, t * h);
    layer_norm_backward(
        d_x1,
        &acts.xhat1[..t * h],
        &acts.rstd1[..t],
        p.ln1_g,
        g.ln1_g,
        g.ln1_b,
        d_a,
    );
    // Attention output dense: a = ctx·W_o + b_o + input.
    add_column_sums(d_a, g.o_b);
    gemm(h, t, h, 1.0, ctx, (1, h), d_a, (h, 1), 1.0, g.o_w, h);
    let d_ctx = sized(&mut buffers.d_ctx, t * h);
    gemm(t, h, h, 1.0, d_a, (h, 1), p.o_w, (1, h), 0.0, d_ctx, h);

    // Attention, per sequence and head.
    let d_qkv = sized(&mut buffers.d_qkv, t * 3 * h);
    let mut offset = 0;
    for seq in seqs {
        let n = seq.tokens;
        let d_s = sized(&mut buffers.d_scores, n * n);
        for head in 0..heads {
            let probs = &acts.probs[offset..offset + n * n];
            offset += n * n;
            let base = seq.start * 3 * h + head * d;
            let dc = &d_ctx[seq.start * h + head * d..];
            // dP = dctx · Vᵀ; dV = Pᵀ · dctx.
            gemm(
                n,
                d,
                n,
                1.0,
                dc,
                (h, 1),
                &qkv[base + 2 * h..],
                (1, 3 * h),
                0.0,
                d_s,
                n,
            );
            gemm(
                n,
                n,
                d,
                1.0,
                probs,
                (1, n),
                dc,
                (h, 1),
                0.0,
                &mut d_qkv[base + 2 * h..],
                3 * h,
            );
            // Softmax backward: dS = P ⊙ (dP − Σ_j dP·P), times the 1/√d of the scores.
            for (ds, pr) in d_s.chunks_exact_mut(n).zip(probs.chunks_exact(n)) {
                let dot: f32 = ds.iter().zip(pr).map(|(a, b)| a * b).sum();
                for (x, &pv) in ds.iter_mut().zip(pr) {
                    *x = pv * (*x - dot) * scale;
                }
            }
            // S = Q·Kᵀ: dQ = dS·K, dK = dSᵀ·Q.
            gemm(
                n,
                n,
                d,
                1.0,
                d_s,
                (n, 1),
                &qkv[base + h..],
                (3 * h, 1),
                0.0,
                &mut d_qkv[base..],
                3 * h,
            );
            gemm(
                n,
                n,
                d,
                1.0,
                d_s,
                (1, n),
                &qkv[base..],
                (3 * h, 1),
                0.0,
                &mut d_qkv[base + h..],
                3 * h,
            );
        }
    }
    // qkv = input·W_qkv + b_qkv.
    add_column_sums(d_qkv, g.qkv_b);
    gemm(
        h,
        t,
        3 * h,
        1.0,
        input,
        (1, h),
        d_qkv,
        (3 * h, 1),
        1.0,
        g.qkv_w,
        3 * h,
    );
    if let Some(d_input) = d_input {
        let d_input = &mut d_input[..t * h];
        d_input.copy_from_slice(d_a);
        gemm(
            t,
            3 * h,
            h,
            1.0,
            d_qkv,
            (3 * h, 1),
            p.qkv_w,
            (1, 3 * h),
            1.0,
            d_input,
            h,
        );
    }
}
