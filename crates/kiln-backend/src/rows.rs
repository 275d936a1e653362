//! Row gathers and scattered, scaled row adds: what a mixture-of-experts
//! layer needs to run each expert on only the tokens routed to it.
//!
//! These are the host-memory forms; [`crate::Backend::gather_rows`] and
//! [`crate::Backend::add_rows_scaled`] default to them through
//! `to_host`/`upload`, and the CPU backend calls them on its tensors directly.

use crate::{BackendError, Result};

fn shape_err(op: &'static str, msg: String) -> BackendError {
    BackendError::Shape { op, msg }
}

/// Rows `rows[i]` of the row-major `data` (`cols` values a row), one after another.
pub fn gather_rows(data: &[f32], cols: usize, rows: &[u32]) -> Result<Vec<f32>> {
    let n = data.len().checked_div(cols).unwrap_or(0);
    let mut out = Vec::with_capacity(rows.len() * cols);
    for &r in rows {
        let r = r as usize;
        if r >= n {
            return Err(shape_err("gather_rows", format!("row {r} of {n}")));
        }
        out.extend_from_slice(&data[r * cols..(r + 1) * cols]);
    }
    Ok(out)
}

/// `out[rows[i]] += scales[i] * y[i]` for every `i` in order, each element
/// as one rounded product then one rounded add (no fused multiply-add), so
/// a row's result depends only on what is added to it and in which order.
pub fn add_rows_scaled(
    out: &mut [f32],
    cols: usize,
    y: &[f32],
    rows: &[u32],
    scales: &[f32],
) -> Result<()> {
    let n = out.len().checked_div(cols).unwrap_or(0);
    if rows.len() != scales.len() || y.len() != rows.len() * cols {
        return Err(shape_err(
            "add_rows_scaled",
            format!(
                "{} rows, {} scales and {} values of {cols} columns",
                rows.len(),
                scales.len(),
                y.len()
            ),
        ));
    }
    for ((&r, &s), src) in rows.iter().zip(scales).zip(y.chunks_exact(cols.max(1))) {
        let r = r as usize;
        if r >= n {
            return Err(shape_err("add_rows_scaled", format!("row {r} of {n}")));
        }
        for (o, &v) in out[r * cols..(r + 1) * cols].iter_mut().zip(src) {
            let p = s * v;
            *o += p;
        }
    }
    Ok(())
}

/// One routed expert of a mixture-of-experts layer for one step: its
/// SwiGLU matrices and the rows (tokens, ascending) routed to it with the
/// router's weight for each. What [`crate::Backend::moe_experts`] takes, so a
/// backend can run a layer's chosen experts in one call (in parallel across
/// experts) instead of one small product at a time.
#[derive(Debug, Clone, Copy)]
pub struct MoeExpert<'a, W, T> {
    /// `[ff, hidden]`: the gate projection.
    pub gate: &'a W,
    /// `[ff, hidden]`: the up projection.
    pub up: &'a W,
    /// `[hidden, ff]`: the down projection.
    pub down: &'a W,
    /// The input rows routed to this expert.
    pub rows: &'a [u32],
    /// The router's weight of each of `rows`, in the same order.
    pub scales: &'a [f32],
    /// Gate, up and down biases, where the model has them (gpt-oss).
    pub biases: Option<[&'a T; 3]>,
}

impl<W, T> MoeExpert<'_, W, T> {
    /// The gate (0), up (1) or down (2) bias, if any.
    pub fn bias(&self, i: usize) -> Option<&T> {
        self.biases.map(|b| b[i])
    }

    /// Refuses rows past `n` input rows and a scale count that differs
    /// from the row count: checked before any work, so a bad route is an
    /// error rather than a panic inside a parallel task.
    pub fn check(&self, n: usize) -> Result<()> {
        if self.rows.len() != self.scales.len() {
            return Err(shape_err(
                "moe_experts",
                format!("{} rows and {} scales", self.rows.len(), self.scales.len()),
            ));
        }
        match self.rows.iter().find(|&&r| r as usize >= n) {
            Some(r) => Err(shape_err("moe_experts", format!("row {r} of {n}"))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_rows_in_the_order_asked() {
        let x = [0., 1., 2., 3., 4., 5.];
        assert_eq!(
            gather_rows(&x, 2, &[2, 0, 2]).unwrap(),
            [4., 5., 0., 1., 4., 5.]
        );
        assert!(gather_rows(&x, 2, &[3]).is_err());
    }

    #[test]
    fn adds_scaled_rows_where_told_and_refuses_bad_shapes() {
        let mut out = vec![1.0f32; 6];
        add_rows_scaled(&mut out, 2, &[1., 2., 3., 4.], &[2, 0], &[0.5, 2.0]).unwrap();
        assert_eq!(out, [7., 9., 1., 1., 1.5, 2.]);
        assert!(add_rows_scaled(&mut out, 2, &[1., 2.], &[5], &[1.0]).is_err());
        assert!(add_rows_scaled(&mut out, 2, &[1., 2.], &[0, 1], &[1.0, 1.0]).is_err());
    }
}
