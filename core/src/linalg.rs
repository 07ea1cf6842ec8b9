//! Matrix products on plain f32 slices for the hand-written training
//! passes (`dense`, `transformer_passes`): strided views over the flat
//! parameter vector and the activations, multiplied by the `gemm` crate
//! (the products candle itself runs, with candle's thread count).

/// A read-only matrix view: `rows × cols` values of `data`, element
/// `(r, c)` at `r · rs + c · cs`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix.
    pub(crate) fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major `cols × rows` matrix.
    pub(crate) fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs: 1,
            cs: rows,
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.rs)
            .and_then(|a| (self.cols - 1).checked_mul(self.cs).map(|b| (a, b)))
            .and_then(|(a, b)| a.checked_add(b));
        last.is_some_and(|l| l < self.data.len())
    }
}

/// `dst = lhs · rhs`, `dst` row-major `lhs.rows × rhs.cols`.
///
/// # Panics
/// If the shapes do not agree or a view reaches outside its slice: the
/// callers build every view from the model's sizes, so this is a bug,
/// never input, and it is checked before any pointer is used.
pub(crate) fn matmul(dst: &mut [f32], lhs: View<'_>, rhs: View<'_>) {
    product(dst, rhs.cols, lhs, rhs, false);
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` with `accumulate`), `dst` a
/// matrix of `lhs.rows × rhs.cols` whose rows start `dst_rs` values apart
/// (a block of columns of a wider row-major matrix).
///
/// # Panics
/// As [`matmul`].
pub(crate) fn product(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: View<'_>,
    rhs: View<'_>,
    accumulate: bool,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let dst_fits = m == 0 || n == 0 || ((m - 1) * dst_rs + n <= dst.len() && n <= dst_rs);
    assert!(
        rhs.rows == k && dst_fits && lhs.in_bounds() && rhs.in_bounds(),
        "matmul: {m}×{k} · {}×{n} into {} values, rows {dst_rs} apart",
        rhs.rows,
        dst.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    #[allow(unsafe_code)]
    // SAFETY: the assertion above keeps every element `gemm` reads or
    // writes inside its slice (`dst`: m rows of n values, `dst_rs` apart;
    // the views checked by `in_bounds`); `dst` is borrowed mutably, so it
    // aliases neither input. With `read_dst = false`, `dst := 1 · lhs ·
    // rhs`; with `read_dst = true`, `dst := 1 · dst + 1 · lhs · rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The largest absolute difference between two equally long vectors.
#[cfg(test)]
pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
