//! `option.enable_lora` and its limits (`option.max_loras`,
//! `option.max_lora_rank`, `option.max_cpu_loras`), as DJL's LMI and vLLM
//! name them: adapters are served only when `option.enable_lora=true`; the
//! limits default to vLLM's (4 adapters per batch, rank 16, as many in
//! memory as per batch), and `max_cpu_loras` may not be below `max_loras`
//! (vLLM refuses that too).

use super::builder::Builder;
use kiln_engine::AdapterLimits;

/// The largest `option.max_lora_rank` accepted (vLLM's largest choice).
const MAX_RANK: i64 = 512;

impl Builder {
    /// The adapter limits, or `None` when adapters are off (the limit keys
    /// are then reported as having no effect).
    pub(super) fn lora_options(&mut self) -> Option<AdapterLimits> {
        let enabled = self.boolean("option.enable_lora");
        let d = AdapterLimits::default();
        let max_loras = self.count_at_least("option.max_loras", 1);
        let rank = self.int(
            "option.max_lora_rank",
            1,
            MAX_RANK,
            &format!("a whole number from 1 to {MAX_RANK}"),
        );
        let cpu = self.count_at_least("option.max_cpu_loras", 1);
        if !enabled.as_ref().is_some_and(|(on, _)| *on) {
            for p in [&max_loras, &cpu]
                .into_iter()
                .flatten()
                .map(|(_, p)| p.clone())
                .chain(rank.as_ref().map(|(_, p)| p.clone()))
            {
                self.warn(&p, "has no effect without option.enable_lora=true");
            }
            return None;
        }
        let max_loras_n = max_loras.as_ref().map_or(d.max_loras, |(n, _)| *n);
        let max_cpu_loras = match cpu {
            Some((n, p)) if n < max_loras_n => {
                self.problem(
                    &p,
                    &format!("must be at least option.max_loras ({max_loras_n})"),
                );
                max_loras_n
            }
            Some((n, _)) => n,
            None => max_loras_n,
        };
        Some(AdapterLimits {
            max_loras: max_loras_n,
            max_lora_rank: rank.map_or(d.max_lora_rank, |(r, _)| r as usize),
            max_cpu_loras,
        })
    }
}
