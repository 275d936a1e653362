//! A rotary table that grows as positions are reached.
//!
//! A model's context can be far longer than what it is ever asked to hold: a
//! Llama 3 file states 131,072 positions, whose `[positions, rot_dim]` f32
//! table is 64 MiB, resident from the load for the process's life although a
//! server that sees 2,000-token conversations reads 1 MiB of it. The table
//! here starts at [`FIRST_ROWS`] rows and doubles (up to the model's
//! positions) when a step reaches past it. Row `p` depends on `p` alone, so a
//! grown table holds the same bits in the rows it had: answers do not depend
//! on when it grew.

use std::sync::{Arc, Mutex, PoisonError};

use kiln_backend::Backend;

use crate::config::RopeConfig;
use crate::Result;

/// Rows a table holds before any step asks for more: 1,024 positions of a
/// 128-wide rotary are 512 KiB.
pub(crate) const FIRST_ROWS: usize = 1024;

/// One rotary configuration's table, as long as the furthest position seen.
pub(crate) struct RopeTable<B: Backend> {
    rope: RopeConfig,
    /// The model instance's positions: the table never grows past them.
    max_positions: usize,
    /// The table as it stands (`None` before the first step), and its rows.
    /// Steps hold an `Arc` of it, so a step running while another grows it
    /// keeps the one it took.
    table: Mutex<Option<(usize, Arc<B::Tensor>)>>,
}

impl<B: Backend> RopeTable<B> {
    /// A table for `rope` that can grow to `max_positions` rows; nothing is
    /// computed until a step asks for it.
    pub(crate) fn new(rope: RopeConfig, max_positions: usize) -> Self {
        Self {
            rope,
            max_positions,
            table: Mutex::new(None),
        }
    }

    /// The table with at least `end` rows (one past the step's furthest
    /// position), grown first where it is shorter. `end` past the model's
    /// positions is the caller's error to report; the table stops at them.
    pub(crate) fn covering(&self, be: &B, end: usize) -> Result<Arc<B::Tensor>> {
        // A panic while growing leaves the old table in place: still valid.
        let mut slot = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let held = match slot.as_ref() {
            Some((rows, t)) if *rows >= end => return Ok(Arc::clone(t)),
            Some((rows, _)) => *rows,
            None => 0,
        };
        let rows = end
            .max(held.saturating_mul(2))
            .max(FIRST_ROWS)
            .min(self.max_positions);
        let t = Arc::new(be.upload(&[rows, self.rope.rot_dim], self.rope.table(rows))?);
        *slot = Some((rows, Arc::clone(&t)));
        Ok(t)
    }

    /// Rows the table holds now (0 before the first step).
    #[cfg(test)]
    fn rows(&self) -> usize {
        let slot = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        slot.as_ref().map_or(0, |(rows, _)| *rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RopeScaling;
    use kiln_backend::cpu::CpuBackend;
    use kiln_backend::RopeLayout;

    fn llama3_rope() -> RopeConfig {
        RopeConfig {
            theta: 500_000.0,
            rot_dim: 64,
            layout: RopeLayout::HalfSplit,
            scaling: RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position: 8192.0,
            },
        }
    }

    #[test]
    fn the_table_grows_only_as_far_as_steps_reach_and_keeps_its_rows_bit_for_bit() {
        let be = CpuBackend::new();
        let rope = llama3_rope();
        let max = 131_072;
        let full = rope.table(max);
        let t = RopeTable::<CpuBackend>::new(rope.clone(), max);
        assert_eq!(t.rows(), 0, "nothing is computed at load");

        let first = t.covering(&be, 17).unwrap();
        assert_eq!(t.rows(), FIRST_ROWS);
        let host = be.to_host(&first).unwrap();
        assert_eq!(host.len(), FIRST_ROWS * 64);
        assert_eq!(
            host,
            full[..FIRST_ROWS * 64],
            "same rows as the whole table"
        );

        // A step inside the table takes the same one.
        let again = t.covering(&be, FIRST_ROWS).unwrap();
        assert!(Arc::ptr_eq(&first, &again));

        // One position past it doubles the table; a far one goes straight there.
        t.covering(&be, FIRST_ROWS + 1).unwrap();
        assert_eq!(t.rows(), 2 * FIRST_ROWS);
        let far = t.covering(&be, 70_000).unwrap();
        assert_eq!(t.rows(), 70_000);
        assert_eq!(be.to_host(&far).unwrap(), full[..70_000 * 64]);

        // Doubling stops at the model's positions.
        t.covering(&be, 70_001).unwrap();
        assert_eq!(t.rows(), max);
        // The step that took the old table still holds it whole.
        assert_eq!(be.to_host(&first).unwrap().len(), FIRST_ROWS * 64);
    }

    #[test]
    fn a_model_shorter_than_the_first_rows_gets_a_table_of_its_own_length() {
        let be = CpuBackend::new();
        let t = RopeTable::<CpuBackend>::new(llama3_rope(), 100);
        let table = t.covering(&be, 3).unwrap();
        assert_eq!(t.rows(), 100);
        assert_eq!(be.shape(&table), vec![100, 64]);
    }
}
