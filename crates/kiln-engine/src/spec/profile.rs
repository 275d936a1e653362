//! A timer profile of the engine's steps, for finding where speculative
//! decoding's time goes (issue 26: "per-phase timings, not guesses").
//!
//! Off unless `KILN_STEP_PROFILE=1` is set when the engine starts; then
//! every step adds the wall time of each of its phases, and when the engine
//! runs out of work it logs one line per profile (`tracing` at info level,
//! target `kiln_engine::profile`) and starts counting again. The bench
//! script `scripts/bench/speculative.sh` sets it and prints those lines.
//! Off, each phase costs one `Instant::now()`.

use std::time::{Duration, Instant};

/// The environment variable that turns the profile on.
pub const STEP_PROFILE_ENV: &str = "KILN_STEP_PROFILE";

/// Whether [`STEP_PROFILE_ENV`] asks for a profile.
pub fn profile_requested() -> bool {
    std::env::var(STEP_PROFILE_ENV).is_ok_and(|v| v.trim() == "1")
}

/// Wall time per named phase, summed over steps.
#[derive(Debug)]
pub struct PhaseTimes {
    /// What is profiled (`engine`, `draft`), first in the log line.
    label: &'static str,
    names: &'static [&'static str],
    on: bool,
    total: Vec<Duration>,
    steps: u64,
    /// Tokens the profiled steps produced (for a per-token figure).
    tokens: u64,
}

impl PhaseTimes {
    /// A profile of the phases `names`, recording only when `on`.
    pub fn new(label: &'static str, names: &'static [&'static str], on: bool) -> Self {
        Self {
            label,
            names,
            on,
            total: vec![Duration::ZERO; names.len()],
            steps: 0,
            tokens: 0,
        }
    }

    /// Whether it records.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Adds the time since `since` to phase `i` and returns now, so phases
    /// can be chained: `t = p.lap(0, t); ...; t = p.lap(1, t);`.
    pub fn lap(&mut self, i: usize, since: Instant) -> Instant {
        let now = Instant::now();
        if self.on {
            if let Some(d) = self.total.get_mut(i) {
                *d += now - since;
            }
        }
        now
    }

    /// Counts one step that produced `tokens` tokens.
    pub fn step_done(&mut self, tokens: u64) {
        if self.on {
            self.steps += 1;
            self.tokens += tokens;
        }
    }

    /// The summary line (`None` when off or nothing was recorded since the
    /// last one), and the counters start again.
    pub fn take_summary(&mut self) -> Option<String> {
        if !self.on || self.steps == 0 {
            return None;
        }
        let sum: Duration = self.total.iter().sum();
        let per = |d: Duration, n: u64| d.as_secs_f64() * 1e3 / n.max(1) as f64;
        let mut line = format!(
            "{} profile: {} steps, {} tokens, {:.3} ms/step, {:.3} ms/token;",
            self.label,
            self.steps,
            self.tokens,
            per(sum, self.steps),
            per(sum, self.tokens)
        );
        for (name, d) in self.names.iter().zip(&self.total) {
            line.push_str(&format!(
                " {name} {:.3} ms/step ({:.0}%)",
                per(*d, self.steps),
                100.0 * d.as_secs_f64() / sum.as_secs_f64().max(1e-12)
            ));
        }
        self.total.iter_mut().for_each(|d| *d = Duration::ZERO);
        self.steps = 0;
        self.tokens = 0;
        Some(line)
    }

    /// Logs [`Self::take_summary`]'s line, if any.
    pub fn log(&mut self) {
        if let Some(line) = self.take_summary() {
            tracing::info!(target: "kiln_engine::profile", "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_per_step_and_reset_after_a_summary() {
        let mut p = PhaseTimes::new("engine", &["a", "b"], true);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        let t1 = p.lap(0, t0);
        p.lap(1, t1);
        p.step_done(3);
        let s = p.take_summary().unwrap();
        assert!(s.starts_with("engine profile: 1 steps, 3 tokens,"), "{s}");
        assert!(s.contains(" a ") && s.contains(" b "), "{s}");
        assert!(p.take_summary().is_none(), "counters start again");
        let mut off = PhaseTimes::new("engine", &["a"], false);
        off.lap(0, t0);
        off.step_done(1);
        assert!(off.take_summary().is_none());
    }
}
