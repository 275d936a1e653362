//! The batch sizes decode steps are captured as CUDA graphs for.
//!
//! A decode step launches a few hundred small kernels; replaying a captured
//! graph removes their launch cost. A graph is fixed to its batch size, so
//! kiln captures a few sizes ("buckets") and runs a batch in the smallest
//! bucket that holds it, the extra rows padded (their sequences have no
//! context, so attention skips them and their logits are not read). Batches
//! larger than every bucket run without a graph.

/// The captured batch sizes, ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphBuckets {
    sizes: Vec<usize>,
}

impl GraphBuckets {
    /// Buckets 1, 2, 4, 8, then every multiple of 8 up to 64, every multiple
    /// of 32 up to `max_batch` (the last bucket is `max_batch` itself, so
    /// every batch the engine can form has one). At most `limit` buckets
    /// (each costs capture time and a little memory); the largest are
    /// dropped first.
    pub fn new(max_batch: usize, limit: usize) -> Self {
        let mut sizes = Vec::new();
        let mut s = 1;
        while s <= max_batch {
            sizes.push(s);
            s = match s {
                1 | 2 | 4 => s * 2,
                8..=63 => s + 8,
                _ => s + 32,
            };
        }
        if max_batch > 0 && sizes.last() != Some(&max_batch) {
            sizes.push(max_batch);
        }
        sizes.truncate(limit);
        Self { sizes }
    }

    /// Buckets from an explicit list (deduplicated and sorted; zeros dropped).
    pub fn from_sizes(mut sizes: Vec<usize>) -> Self {
        sizes.retain(|&s| s > 0);
        sizes.sort_unstable();
        sizes.dedup();
        Self { sizes }
    }

    /// The sizes, ascending.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// The bucket a decode batch of `batch` sequences runs in: the smallest
    /// that holds it, or `None` (run without a graph) when none does or the
    /// batch is empty.
    pub fn bucket_for(&self, batch: usize) -> Option<usize> {
        if batch == 0 {
            return None;
        }
        let i = self.sizes.partition_point(|&s| s < batch);
        self.sizes.get(i).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_buckets_cover_every_batch_up_to_the_maximum() {
        let b = GraphBuckets::new(256, 64);
        assert_eq!(
            b.sizes(),
            &[1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 128, 160, 192, 224, 256]
        );
        let odd = GraphBuckets::new(100, 64);
        assert_eq!(odd.sizes().last(), Some(&100));
        assert_eq!(odd.sizes()[odd.sizes().len() - 2], 96);
        for batch in 1..=100 {
            let bucket = odd.bucket_for(batch).expect("covered");
            assert!(bucket >= batch);
            // The smallest that holds it: the bucket below is too small.
            let i = odd
                .sizes()
                .iter()
                .position(|&s| s == bucket)
                .expect("listed");
            assert!(i == 0 || odd.sizes()[i - 1] < batch, "{batch} -> {bucket}");
        }
        assert_eq!(odd.bucket_for(101), None);
        assert_eq!(odd.bucket_for(0), None);
        assert_eq!(GraphBuckets::new(1, 8).sizes(), &[1]);
        assert!(GraphBuckets::new(0, 8).sizes().is_empty());
    }

    #[test]
    fn the_limit_drops_the_largest_buckets() {
        let b = GraphBuckets::new(256, 5);
        assert_eq!(b.sizes(), &[1, 2, 4, 8, 16]);
        assert_eq!(b.bucket_for(16), Some(16));
        assert_eq!(b.bucket_for(17), None);
        assert_eq!(b.bucket_for(3), Some(4));
    }

    #[test]
    fn explicit_sizes_are_sorted_and_deduplicated() {
        let b = GraphBuckets::from_sizes(vec![8, 0, 2, 8, 32]);
        assert_eq!(b.sizes(), &[2, 8, 32]);
        assert_eq!(b.bucket_for(1), Some(2));
        assert_eq!(b.bucket_for(9), Some(32));
    }
}
