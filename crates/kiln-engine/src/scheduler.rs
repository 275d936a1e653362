//! Decides, step by step, which tokens of which sequences the model computes.
//!
//! Continuous batching: sequences join the running batch as soon as there is
//! room and leave the moment they finish, so a step mixes decode tokens of
//! running sequences with prefill chunks of new ones and there is never any
//! padding. Each step is bounded by a token budget (long prompts are
//! prefilled in chunks) and the batch by a maximum number of sequences.
//!
//! Running sequences are served first, oldest first; then waiting ones are
//! admitted in arrival order (FIFO: a request that does not fit is not
//! overtaken). When the KV cache runs out of blocks, the most recently
//! arrived running sequence is preempted: its blocks are freed and it goes
//! back to the head of the queue, to be recomputed from its tokens (prompt
//! and output so far) when there is room again, usually with most of its
//! prefix still in the prefix cache. Nothing is dropped.
//!
//! The scheduler only plans and keeps the KV bookkeeping; it knows nothing
//! of sampling, text or clients (that is the engine's part).

use std::collections::VecDeque;

use kiln_backend::{SeqSlice, StepInput};

use crate::block_manager::{BlockHash, BlockManager};

/// Limits the scheduler works within.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most sequences in the running batch (`max_rolling_batch_size`).
    pub max_running: usize,
    /// Most tokens computed per step (`max_rolling_batch_prefill_tokens`).
    pub max_step_tokens: usize,
}

/// One sequence's tokens and KV-cache state.
#[derive(Debug)]
pub(crate) struct SeqKv {
    pub id: u64,
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    /// Leading tokens whose keys and values are in the cache.
    pub computed: usize,
    pub blocks: Vec<u32>,
    /// Hashes of the leading full, registered blocks.
    pub hashes: Vec<BlockHash>,
    /// Prompt tokens found in the prefix cache at the last admission (never
    /// more than the prompt: a preempted sequence readmitted with its
    /// generated tokens may match more than its prompt in the cache).
    pub cached_tokens: usize,
    /// Length of the prompt (`tokens` also holds the generated tokens).
    pub prompt_len: usize,
    /// The prompt's length while its tokens' log-probabilities are wanted
    /// (0 otherwise): every prompt position then gets a logits row, and the
    /// prefix cache is not used, so that every position is computed.
    pub prompt_logprobs_len: usize,
    /// The LoRA adapter (registration id) its rows use; 0 for the base model.
    pub adapter: u32,
    /// Root of its prefix-cache hash chain (0 for the base model).
    pub salt: BlockHash,
    /// Guessed tokens to check in the next decode step (speculative
    /// decoding, `crate::spec`); not part of `tokens` until accepted.
    pub draft: Vec<u32>,
}

impl SeqKv {
    pub fn new(id: u64, prompt: Vec<u32>) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            cached_tokens: 0,
            prompt_logprobs_len: 0,
            adapter: 0,
            salt: 0,
            draft: Vec::new(),
        }
    }

    /// Asks for a logits row at every prompt position.
    pub fn with_prompt_logprobs(mut self) -> Self {
        self.prompt_logprobs_len = self.tokens.len();
        self
    }
}

/// What one logits row of a step is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowUse {
    /// The next token of sequence `id` is sampled from it.
    Sample(u64),
    /// It gives the log-probability of the prompt token at this position.
    Prompt(u64, usize),
    /// It checks guess `j` of sequence `id`'s draft: the next token after
    /// that guess, should the guesses up to it be accepted.
    Draft(u64, usize),
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scheduled {
    pub id: u64,
    /// First token computed (the sequence's `computed` before the step).
    pub start: usize,
    pub len: usize,
    /// The step reaches the sequence's last token, so it yields next-token logits.
    pub sample: bool,
}

/// A step's plan.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub seqs: Vec<Scheduled>,
    /// Sequences moved back to the queue this step.
    pub preempted: Vec<u64>,
    /// Sequences admitted to the running batch this step.
    pub admitted: Vec<u64>,
}

/// The queue, the running batch and the KV cache's blocks.
#[derive(Debug)]
pub(crate) struct Scheduler {
    cfg: SchedulerConfig,
    pub blocks: BlockManager,
    waiting: VecDeque<SeqKv>,
    running: Vec<SeqKv>,
    /// Most distinct LoRA adapters in the running batch (`max_loras`); a
    /// waiting sequence on another adapter is passed over until one leaves.
    pub max_adapters: usize,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Self {
        Self {
            cfg,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            max_adapters: usize::MAX,
        }
    }

    /// Whether a sequence on `adapter` may join the running batch.
    fn adapter_fits(&self, adapter: u32) -> bool {
        if adapter == 0 || self.running.iter().any(|s| s.adapter == adapter) {
            return true;
        }
        let mut ids: Vec<u32> = self
            .running
            .iter()
            .map(|s| s.adapter)
            .filter(|&a| a != 0)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len() < self.max_adapters
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Ids of the waiting sequences, in queue order.
    pub fn waiting_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.waiting.iter().map(|s| s.id)
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Queues a new sequence.
    pub fn add(&mut self, seq: SeqKv) {
        self.waiting.push_back(seq);
    }

    /// Ids of every sequence, running or waiting.
    pub fn ids(&self) -> Vec<u64> {
        self.running
            .iter()
            .chain(&self.waiting)
            .map(|s| s.id)
            .collect()
    }

    pub fn get(&self, id: u64) -> Option<&SeqKv> {
        self.running
            .iter()
            .chain(&self.waiting)
            .find(|s| s.id == id)
    }

    fn running_mut(&mut self, id: u64) -> Option<&mut SeqKv> {
        self.running.iter_mut().find(|s| s.id == id)
    }

    /// Removes a sequence (finished or cancelled) and frees its blocks.
    pub fn remove(&mut self, id: u64) -> Option<SeqKv> {
        let seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        self.blocks.free(&seq.blocks);
        Some(seq)
    }

    /// Frees a running sequence's blocks and puts it back at the head of the queue.
    fn preempt_last(&mut self) -> Option<u64> {
        let mut seq = self.running.pop()?;
        self.blocks.free(&seq.blocks);
        seq.blocks.clear();
        seq.hashes.clear();
        seq.computed = 0;
        seq.draft.clear();
        let id = seq.id;
        self.waiting.push_front(seq);
        Some(id)
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> Plan {
        let mut plan = Plan::default();
        let mut budget = self.cfg.max_step_tokens;
        let mut i = 0;
        'running: while i < self.running.len() && budget > 0 {
            let s = &self.running[i];
            let computed = s.computed;
            let n = (s.tokens.len() - computed).min(budget);
            let d = self.fit_draft(i, n, budget);
            let s = &self.running[i];
            let extra = self
                .blocks
                .blocks_for(computed + n + d)
                .saturating_sub(s.blocks.len());
            // Make room, evicting the newest sequences, possibly this one.
            loop {
                if let Some(new) = self.blocks.allocate_n(extra) {
                    self.running[i].blocks.extend(new);
                    break;
                }
                let victim_is_self = self.running.len() == i + 1;
                if let Some(id) = self.preempt_last() {
                    plan.preempted.push(id);
                }
                if victim_is_self {
                    break 'running;
                }
            }
            let s = &self.running[i];
            plan.seqs.push(Scheduled {
                id: s.id,
                start: computed,
                len: n,
                sample: computed + n == s.tokens.len(),
            });
            budget -= n + d;
            i += 1;
        }
        // Admit waiting sequences in order, unless this step had to preempt.
        let mut deferred = Vec::new();
        while plan.preempted.is_empty()
            && budget > 0
            && self.running.len() < self.cfg.max_running
            && !self.waiting.is_empty()
        {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if !self.adapter_fits(seq.adapter) {
                deferred.push(seq);
                continue;
            }
            if seq.blocks.is_empty() && seq.prompt_logprobs_len == 0 {
                // Reuse cached full blocks of the prefix; at least one token stays to compute.
                let (blocks, hashes) =
                    self.blocks
                        .match_prefix_salted(&seq.tokens, seq.tokens.len() - 1, seq.salt);
                seq.computed = blocks.len() * self.blocks.block_size();
                seq.cached_tokens = seq.computed.min(seq.prompt_len);
                seq.blocks = blocks;
                seq.hashes = hashes;
            }
            let n = (seq.tokens.len() - seq.computed).min(budget);
            let extra = self
                .blocks
                .blocks_for(seq.computed + n)
                .saturating_sub(seq.blocks.len());
            match self.blocks.allocate_n(extra) {
                Some(new) => seq.blocks.extend(new),
                None => {
                    // Not enough room: give back the cached blocks and wait (FIFO).
                    self.blocks.free(&seq.blocks);
                    seq.blocks.clear();
                    seq.hashes.clear();
                    seq.computed = 0;
                    self.waiting.push_front(seq);
                    break;
                }
            }
            plan.seqs.push(Scheduled {
                id: seq.id,
                start: seq.computed,
                len: n,
                sample: seq.computed + n == seq.tokens.len(),
            });
            plan.admitted.push(seq.id);
            budget -= n;
            self.running.push(seq);
        }
        for seq in deferred.into_iter().rev() {
            self.waiting.push_front(seq);
        }
        plan
    }

    /// The backend's description of a plan: tokens, positions, cache slots,
    /// block tables, and the rows whose logits are needed (in plan order),
    /// with what each row is for.
    pub fn step_input(&self, plan: &Plan) -> (StepInput, Vec<RowUse>) {
        let bs = self.blocks.block_size();
        let mut step = StepInput::default();
        let mut uses = Vec::new();
        for p in &plan.seqs {
            let Some(s) = self.get(p.id) else { continue };
            let query_start = step.tokens.len();
            for pos in p.start..p.start + p.len {
                if pos + 1 < s.prompt_logprobs_len {
                    // This row predicts prompt token pos + 1.
                    step.logit_rows.push(step.tokens.len() as u32);
                    uses.push(RowUse::Prompt(p.id, pos + 1));
                }
                step.tokens.push(s.tokens[pos]);
                step.positions.push(pos as u32);
                step.slots
                    .push(s.blocks[pos / bs] * bs as u32 + (pos % bs) as u32);
            }
            let draft: &[u32] = if p.sample { &s.draft } else { &[] };
            step.seqs.push(SeqSlice {
                query_start,
                query_len: p.len + draft.len(),
                context_len: p.start + p.len + draft.len(),
                block_table: s.blocks.clone(),
            });
            if p.sample {
                step.logit_rows.push((step.tokens.len() - 1) as u32);
                uses.push(RowUse::Sample(p.id));
            }
            for (j, &t) in draft.iter().enumerate() {
                let pos = p.start + p.len + j;
                step.logit_rows.push(step.tokens.len() as u32);
                uses.push(RowUse::Draft(p.id, j));
                step.tokens.push(t);
                step.positions.push(pos as u32);
                step.slots
                    .push(s.blocks[pos / bs] * bs as u32 + (pos % bs) as u32);
            }
        }
        (step, uses)
    }

    /// Stops asking for prompt rows for `id` (its values have been delivered).
    pub fn clear_prompt_logprobs(&mut self, id: u64) {
        if let Some(s) = self.running_mut(id) {
            s.prompt_logprobs_len = 0;
        }
    }

    /// Records that the plan's tokens are now in the cache, and registers the
    /// blocks that became full in the prefix cache.
    pub fn commit(&mut self, plan: &Plan) {
        let bs = self.blocks.block_size();
        for p in &plan.seqs {
            let Some(i) = self.running.iter().position(|s| s.id == p.id) else {
                continue;
            };
            let s = &mut self.running[i];
            s.computed = p.start + p.len;
            while s.hashes.len() < s.computed / bs {
                let b = s.hashes.len();
                let parent = s.hashes.last().copied().unwrap_or(s.salt);
                let h =
                    self.blocks
                        .register_full(s.blocks[b], parent, &s.tokens[b * bs..(b + 1) * bs]);
                s.hashes.push(h);
            }
        }
    }

    /// How many of running sequence `i`'s guesses ride along with its `n`
    /// tokens this step: none unless the step reaches its last token; no
    /// more than the budget and the free blocks allow (a draft never causes
    /// a preemption). Cuts the draft to that.
    fn fit_draft(&mut self, i: usize, n: usize, budget: usize) -> usize {
        let s = &self.running[i];
        let mut d = if s.computed + n == s.tokens.len() {
            s.draft.len().min(budget - n)
        } else {
            0
        };
        let extra = |d: usize| {
            self.blocks
                .blocks_for(s.computed + n + d)
                .saturating_sub(s.blocks.len())
        };
        while d > 0 && extra(d) > self.blocks.num_free() {
            d -= 1;
        }
        self.running[i].draft.truncate(d);
        d
    }

    /// Running sequences whose next step is one decode token and that want
    /// no prompt rows: those a draft may be guessed for.
    pub fn decode_ready(&self) -> Vec<u64> {
        self.running
            .iter()
            .filter(|s| s.computed + 1 == s.tokens.len() && s.prompt_logprobs_len == 0)
            .map(|s| s.id)
            .collect()
    }

    /// Sets the guesses to check in sequence `id`'s next decode step.
    pub fn set_draft(&mut self, id: u64, draft: Vec<u32>) {
        if let Some(s) = self.running_mut(id) {
            s.draft = draft;
        }
    }

    /// Takes sequence `id`'s draft (checked in the step just run).
    pub fn take_draft(&mut self, id: u64) -> Vec<u32> {
        self.running_mut(id)
            .map(|s| std::mem::take(&mut s.draft))
            .unwrap_or_default()
    }

    /// Records that the first `accepted` guesses of sequence `id`'s last
    /// draft were kept (they are its newest tokens but the last, appended
    /// since): their keys and values, computed in the step, count as cached
    /// now, and the blocks they fill join the prefix cache.
    pub fn accept_draft(&mut self, id: u64, accepted: usize) {
        let bs = self.blocks.block_size();
        let Some(i) = self.running.iter().position(|s| s.id == id) else {
            return;
        };
        let s = &mut self.running[i];
        s.computed = (s.computed + accepted).min(s.tokens.len().saturating_sub(1));
        while s.hashes.len() < s.computed / bs {
            let b = s.hashes.len();
            let parent = s.hashes.last().copied().unwrap_or(0);
            let h = self
                .blocks
                .register_full(s.blocks[b], parent, &s.tokens[b * bs..(b + 1) * bs]);
            s.hashes.push(h);
        }
    }

    /// Appends an output token to a sequence: a sampled one (running), or
    /// one a grammar forces before the first step (waiting, computed with
    /// the prompt when it is admitted).
    pub fn append(&mut self, id: u64, token: u32) {
        let waiting = self.waiting.iter_mut();
        if let Some(s) = self.running.iter_mut().chain(waiting).find(|s| s.id == id) {
            s.tokens.push(token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(blocks: usize, max_running: usize, budget: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_running,
                max_step_tokens: budget,
            },
            BlockManager::new(blocks, 4),
        )
    }

    /// Runs a plan as if the model produced `next` for every sampled sequence.
    fn step(s: &mut Scheduler, next: u32) -> Plan {
        let plan = s.schedule();
        let (input, _) = s.step_input(&plan);
        assert!(input
            .validate(&kiln_backend::KvSpec {
                n_layers: 1,
                num_blocks: s.blocks.num_blocks(),
                block_size: 4,
                n_kv_heads: 1,
                head_dim: 1,
            })
            .is_ok());
        s.commit(&plan);
        for p in &plan.seqs {
            if p.sample {
                s.append(p.id, next);
            }
        }
        plan
    }

    #[test]
    fn long_prompts_are_prefilled_in_chunks_beside_decodes() {
        let mut s = sched(64, 8, 6);
        s.add(SeqKv::new(1, vec![1, 2, 3]));
        let p = step(&mut s, 9);
        assert_eq!(
            p.seqs,
            vec![Scheduled {
                id: 1,
                start: 0,
                len: 3,
                sample: true
            }]
        );
        s.add(SeqKv::new(2, (0..10).collect()));
        // Step: seq 1 decodes 1 token, seq 2 prefills 5 of its 10 (budget 6).
        let p = step(&mut s, 9);
        assert_eq!(
            p.seqs[0],
            Scheduled {
                id: 1,
                start: 3,
                len: 1,
                sample: true
            }
        );
        assert_eq!(
            p.seqs[1],
            Scheduled {
                id: 2,
                start: 0,
                len: 5,
                sample: false
            }
        );
        let p = step(&mut s, 9);
        assert_eq!(
            p.seqs[1],
            Scheduled {
                id: 2,
                start: 5,
                len: 5,
                sample: true
            }
        );
        assert_eq!(s.get(2).unwrap().tokens.len(), 11);
    }

    #[test]
    fn the_running_batch_is_capped_and_fifo() {
        let mut s = sched(64, 2, 100);
        for id in 1..=3 {
            s.add(SeqKv::new(id, vec![1, 2]));
        }
        let p = step(&mut s, 5);
        assert_eq!(p.admitted, vec![1, 2]);
        assert_eq!(s.num_waiting(), 1);
        s.remove(1);
        let p = step(&mut s, 5);
        assert_eq!(p.admitted, vec![3]);
    }

    #[test]
    fn running_out_of_blocks_preempts_the_newest_and_recomputes_it_later() {
        // 4 blocks of 4 tokens: two sequences of 7 tokens fill 2 blocks each.
        let mut s = sched(4, 8, 100);
        s.add(SeqKv::new(1, (0..7).collect()));
        s.add(SeqKv::new(2, (10..17).collect()));
        step(&mut s, 1); // prefill: 7 tokens each in cache, 8 tokens long
        step(&mut s, 1); // decode: 8 in cache (2 full blocks each), 9 long
        assert_eq!(s.blocks.num_free(), 0);
        let p = step(&mut s, 1); // both need a third block: seq 2 is preempted
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(p.seqs.len(), 1);
        assert_eq!(s.get(2).unwrap().computed, 0);
        assert_eq!(
            s.get(2).unwrap().tokens.len(),
            9,
            "its generated tokens are kept"
        );
        // Seq 1 took seq 2's last block (freed blocks are reused last-first), so
        // when seq 1 finishes, seq 2 is readmitted with its first block still
        // cached and recomputes the other 5 tokens.
        s.remove(1);
        let p = step(&mut s, 1);
        assert_eq!(p.admitted, vec![2]);
        assert_eq!(
            p.seqs[0],
            Scheduled {
                id: 2,
                start: 4,
                len: 5,
                sample: true
            }
        );
        assert_eq!(s.get(2).unwrap().cached_tokens, 4);
    }

    /// Property: over random prompts that share random prefixes, on a cache
    /// small enough to preempt (readmitted sequences carry their generated
    /// tokens, which the prefix cache may also hold), the cached tokens a
    /// sequence reports never exceed its prompt (issue 24: 48 cached tokens
    /// were reported for a 37-token prompt).
    #[test]
    fn cached_tokens_never_exceed_the_prompt() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let base: Vec<u32> = (0..64).map(|i| i * 7 % 23).collect();
        let mut checked = 0;
        for _case in 0..200 {
            let mut s = sched(
                6 + rand(10) as usize,
                1 + rand(4) as usize,
                4 + rand(16) as usize,
            );
            let mut next_id = 1;
            let mut prompts = std::collections::HashMap::new();
            for _ in 0..60 {
                if rand(3) == 0 {
                    // A prompt sharing a random prefix of the base (or of a
                    // generated continuation: tokens 1 are what `step` appends).
                    let keep = rand(base.len() as u64) as usize;
                    let mut p = base[..keep].to_vec();
                    if rand(2) == 0 {
                        p.extend(std::iter::repeat_n(1, rand(9) as usize));
                    }
                    p.extend((0..1 + rand(6)).map(|_| 100 + rand(5) as u32));
                    prompts.insert(next_id, p.len());
                    s.add(SeqKv::new(next_id, p));
                    next_id += 1;
                }
                step(&mut s, 1);
                for id in s.ids() {
                    let seq = s.get(id).unwrap();
                    assert!(
                        seq.cached_tokens <= prompts[&id],
                        "seq {id}: {} cached tokens for a {}-token prompt",
                        seq.cached_tokens,
                        prompts[&id]
                    );
                    checked += usize::from(seq.cached_tokens > 0);
                }
                let ids = s.ids();
                if !ids.is_empty() && rand(4) == 0 {
                    s.remove(ids[rand(ids.len() as u64) as usize]);
                }
            }
        }
        assert!(checked > 0, "no case hit the prefix cache");
    }

    #[test]
    fn shared_prefixes_hit_the_cache() {
        let mut s = sched(16, 8, 100);
        let prompt: Vec<u32> = (0..9).collect();
        s.add(SeqKv::new(1, prompt.clone()));
        step(&mut s, 1);
        s.add(SeqKv::new(2, prompt));
        let p = step(&mut s, 1);
        // Two full blocks (8 tokens) are reused; only the 9th token is computed.
        assert_eq!(
            p.seqs[1],
            Scheduled {
                id: 2,
                start: 8,
                len: 1,
                sample: true
            }
        );
        assert_eq!(s.get(2).unwrap().cached_tokens, 8);
        assert_eq!(s.get(1).unwrap().blocks[..2], s.get(2).unwrap().blocks[..2]);
    }

    /// A request asking for prompt log-probabilities gets a row at every
    /// prompt position but the last (which is the sampling row), across
    /// chunks, and bypasses the prefix cache; a request beside it, or the
    /// same prompt without asking, gets one row and the cache as before.
    #[test]
    fn prompt_rows_only_for_the_request_that_asks() {
        let mut s = sched(32, 8, 6);
        let prompt: Vec<u32> = (0..9).collect();
        s.add(SeqKv::new(1, prompt.clone()));
        step(&mut s, 1); // 6 of 9
        step(&mut s, 1); // the last 3: the prefix cache now holds 2 blocks
        s.add(SeqKv::new(2, prompt.clone()).with_prompt_logprobs());
        let plan = s.schedule();
        let (input, uses) = s.step_input(&plan);
        // Seq 1 decodes one token; seq 2 computes 5 tokens from position 0.
        assert_eq!(plan.seqs[1].start, 0);
        assert_eq!(s.get(2).unwrap().cached_tokens, 0);
        assert_eq!(
            uses,
            vec![
                RowUse::Sample(1),
                RowUse::Prompt(2, 1),
                RowUse::Prompt(2, 2),
                RowUse::Prompt(2, 3),
                RowUse::Prompt(2, 4),
                RowUse::Prompt(2, 5),
            ]
        );
        assert_eq!(input.logit_rows, vec![0, 1, 2, 3, 4, 5]);
        s.commit(&plan);
        s.append(1, 1);
        let plan = s.schedule();
        let (input, uses) = s.step_input(&plan);
        // The rest of seq 2's prompt: positions 5..9, rows for tokens 6..9,
        // its sampling row last.
        assert_eq!(
            uses,
            vec![
                RowUse::Sample(1),
                RowUse::Prompt(2, 6),
                RowUse::Prompt(2, 7),
                RowUse::Prompt(2, 8),
                RowUse::Sample(2),
            ]
        );
        assert_eq!(input.logit_rows, vec![0, 1, 2, 3, 4]);
        s.commit(&plan);
        s.append(1, 1);
        s.append(2, 1);
        // Without asking, the same prompt reuses the cache: one row.
        s.add(SeqKv::new(3, prompt));
        let plan = s.schedule();
        let (input, uses) = s.step_input(&plan);
        assert_eq!(s.get(3).unwrap().cached_tokens, 8);
        assert_eq!(
            uses,
            vec![RowUse::Sample(1), RowUse::Sample(2), RowUse::Sample(3)]
        );
        assert_eq!(input.logit_rows.len(), 3);
    }
}
