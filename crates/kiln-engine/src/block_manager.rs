//! The paged KV cache's bookkeeping: which physical blocks are free, which
//! sequences hold which blocks, and which full blocks hold a known prefix.
//!
//! A block holds the keys and values of `block_size` consecutive tokens of one
//! sequence. Blocks are reference-counted so that sequences sharing a prompt
//! prefix share its full blocks. A full block is identified by a hash of its
//! tokens chained with the hash of the block before it, so a hash names a
//! whole prefix, not just a block's contents; the tokens are kept beside the
//! hash and compared on every hit, so a hash collision can never hand a
//! sequence another prefix's keys.
//!
//! Free blocks wait in least-recently-freed order. A free block that still
//! holds a cached prefix can be revived by a later request with that prefix;
//! it is only overwritten (and its hash forgotten) when the free list reaches
//! it.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Hash of a full block's tokens, chained with its predecessor's hash.
pub type BlockHash = u64;

/// Content hash of a block: `parent` is the previous block's hash (0 for the first block).
pub fn block_hash(parent: BlockHash, tokens: &[u32]) -> BlockHash {
    // SipHash with fixed keys: deterministic across runs and processes.
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// What a cached block holds, to check hits exactly.
#[derive(Debug, Clone)]
struct CachedPrefix {
    hash: BlockHash,
    parent: BlockHash,
    tokens: Vec<u32>,
}

/// Sentinel for "no block" in the free list's links.
const NIL: u32 = u32::MAX;

/// Counters of prefix-cache use, in tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompt tokens looked up in the cache.
    pub queried_tokens: u64,
    /// Of those, tokens whose keys and values were found and reused.
    pub hit_tokens: u64,
}

/// Allocator of KV-cache blocks with a prefix cache.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    ref_count: Vec<u32>,
    /// Doubly-linked free list over block ids (least recently freed at `head`).
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    free_count: usize,
    cached: Vec<Option<CachedPrefix>>,
    by_hash: HashMap<BlockHash, u32>,
    stats: PrefixStats,
}

impl BlockManager {
    /// A manager of `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(num_blocks < NIL as usize, "too many KV blocks");
        let n = num_blocks as u32;
        let mut m = Self {
            block_size,
            ref_count: vec![0; num_blocks],
            prev: vec![NIL; num_blocks],
            next: vec![NIL; num_blocks],
            head: NIL,
            tail: NIL,
            free_count: 0,
            cached: vec![None; num_blocks],
            by_hash: HashMap::new(),
            stats: PrefixStats::default(),
        };
        for b in 0..n {
            m.push_free(b);
        }
        m
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.ref_count.len()
    }

    /// Blocks no sequence holds (some may still cache a prefix).
    pub fn num_free(&self) -> usize {
        self.free_count
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.free_count
    }

    /// Prefix-cache counters.
    pub fn prefix_stats(&self) -> PrefixStats {
        self.stats
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn push_free(&mut self, b: u32) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.free_count += 1;
    }

    fn unlink_free(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.free_count -= 1;
    }

    /// Takes a fresh block, evicting the cached prefix it held if any.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = self.head;
        if b == NIL {
            return None;
        }
        self.unlink_free(b);
        if let Some(c) = self.cached[b as usize].take() {
            self.by_hash.remove(&c.hash);
        }
        self.ref_count[b as usize] = 1;
        Some(b)
    }

    /// Takes `n` fresh blocks, or none at all if fewer are free.
    pub fn allocate_n(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free_count {
            return None;
        }
        (0..n).map(|_| self.allocate()).collect()
    }

    /// Finds the longest run of cached full blocks that starts `tokens`,
    /// takes a reference to each and returns them with their hashes. At most
    /// `max_tokens` tokens are matched (the caller keeps at least one prompt
    /// token to compute, since its logits are needed).
    pub fn match_prefix(
        &mut self,
        tokens: &[u32],
        max_tokens: usize,
    ) -> (Vec<u32>, Vec<BlockHash>) {
        self.match_prefix_salted(tokens, max_tokens, 0)
    }

    /// [`Self::match_prefix`] of a prefix whose chain starts at `root`
    /// rather than 0 (a LoRA adapter's salt: its keys and values differ
    /// from the base model's for the same tokens).
    pub fn match_prefix_salted(
        &mut self,
        tokens: &[u32],
        max_tokens: usize,
        root: BlockHash,
    ) -> (Vec<u32>, Vec<BlockHash>) {
        let bs = self.block_size;
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        let mut parent = root;
        for chunk in tokens[..max_tokens.min(tokens.len())].chunks_exact(bs) {
            let h = block_hash(parent, chunk);
            let Some(&b) = self.by_hash.get(&h) else {
                break;
            };
            let exact = self.cached[b as usize]
                .as_ref()
                .is_some_and(|c| c.parent == parent && c.tokens == chunk);
            if !exact {
                break;
            }
            if self.ref_count[b as usize] == 0 {
                self.unlink_free(b);
            }
            self.ref_count[b as usize] += 1;
            blocks.push(b);
            hashes.push(h);
            parent = h;
        }
        self.stats.queried_tokens += tokens.len() as u64;
        self.stats.hit_tokens += (blocks.len() * bs) as u64;
        (blocks, hashes)
    }

    /// Records that `block` is full and holds `tokens` after the prefix hashed
    /// `parent`; returns the block's hash. If another block already caches the
    /// same prefix, that one stays the cached copy.
    pub fn register_full(&mut self, block: u32, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        let hash = block_hash(parent, tokens);
        if let std::collections::hash_map::Entry::Vacant(e) = self.by_hash.entry(hash) {
            e.insert(block);
            self.cached[block as usize] = Some(CachedPrefix {
                hash,
                parent,
                tokens: tokens.to_vec(),
            });
        }
        hash
    }

    /// Drops one reference to each block. Blocks nobody holds go to the free
    /// list in reverse order, so a sequence's last blocks (the least likely to
    /// be shared) are reused first.
    pub fn free(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let rc = &mut self.ref_count[b as usize];
            debug_assert!(*rc > 0, "block {b} freed twice");
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                self.push_free(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_exhausts_and_free_returns_blocks() {
        let mut m = BlockManager::new(4, 16);
        let a = m.allocate_n(3).unwrap();
        assert_eq!(m.num_free(), 1);
        assert!(m.allocate_n(2).is_none(), "all-or-nothing");
        assert_eq!(m.num_free(), 1);
        m.free(&a);
        assert_eq!(m.num_free(), 4);
        assert_eq!(m.num_used(), 0);
    }

    #[test]
    fn shared_prefix_blocks_are_reused_and_verified() {
        let mut m = BlockManager::new(8, 4);
        let prompt: Vec<u32> = (0..10).collect();
        let blocks = m.allocate_n(3).unwrap();
        let h0 = m.register_full(blocks[0], 0, &prompt[0..4]);
        m.register_full(blocks[1], h0, &prompt[4..8]);

        // Same first 8 tokens: both full blocks hit, referenced twice now.
        let (hit, hashes) = m.match_prefix(&prompt, prompt.len() - 1);
        assert_eq!(hit, &blocks[..2]);
        assert_eq!(hashes[0], h0);
        // Different second block: only the first hits.
        let other: Vec<u32> = vec![0, 1, 2, 3, 9, 9, 9, 9, 9];
        let (hit2, _) = m.match_prefix(&other, 8);
        assert_eq!(hit2, &blocks[..1]);
        assert_eq!(m.prefix_stats().hit_tokens, 8 + 4);

        // The original owner leaves: shared blocks stay held by the others.
        m.free(&blocks);
        assert_eq!(m.num_used(), 2);
        m.free(&hit);
        m.free(&hit2);
        assert_eq!(m.num_used(), 0);

        // Freed blocks still serve hits until they are reallocated.
        let (again, _) = m.match_prefix(&prompt, 9);
        assert_eq!(again.len(), 2);
        m.free(&again);
        // Reallocating everything evicts the cached prefixes.
        let all = m.allocate_n(8).unwrap();
        m.free(&all);
        let (none, _) = m.match_prefix(&prompt, 9);
        assert!(none.is_empty());
    }

    #[test]
    fn match_is_capped_so_a_token_is_left_to_compute() {
        let mut m = BlockManager::new(4, 4);
        let prompt: Vec<u32> = (0..8).collect();
        let b = m.allocate_n(2).unwrap();
        let h = m.register_full(b[0], 0, &prompt[..4]);
        m.register_full(b[1], h, &prompt[4..]);
        let (hit, _) = m.match_prefix(&prompt, prompt.len() - 1);
        assert_eq!(
            hit.len(),
            1,
            "the whole prompt is cached, but its last token must be recomputed"
        );
    }

    #[test]
    fn a_colliding_hash_with_other_tokens_is_not_a_hit() {
        let mut m = BlockManager::new(4, 2);
        let b = m.allocate().unwrap();
        let h = m.register_full(b, 0, &[1, 2]);
        // Forge the cache so that hash h claims other tokens: the lookup must reject it.
        m.cached[b as usize].as_mut().unwrap().tokens = vec![7, 7];
        assert_eq!(m.by_hash.get(&h), Some(&b));
        let (hit, _) = m.match_prefix(&[1, 2, 3], 2);
        assert!(hit.is_empty());
    }
}
