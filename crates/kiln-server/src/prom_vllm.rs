//! The series that Kubernetes LLM routers read, under vLLM's names.
//!
//! The Gateway API Inference Extension's endpoint picker and llm-d choose a
//! replica from its Prometheus metrics, and by default they look for the
//! names vLLM exports: queue length, running requests, KV-cache use and the
//! cache's shape. kiln writes those series beside its own (which keep their
//! names), with vLLM's meaning and labels (`model_name`, `engine`), so that
//! a kiln pod can join an `InferencePool` unchanged.

use std::fmt::Write;

use kiln_engine::spec::SpecSnapshot;
use kiln_engine::MetricsSnapshot;

/// What one ready model contributes to the vLLM-named series.
pub struct ModelFigures<'a> {
    /// The model's name, already escaped for a label value.
    pub name: &'a str,
    /// The engine's counters.
    pub metrics: &'a MetricsSnapshot,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// KV-cache blocks the engine allocated.
    pub num_blocks: usize,
}

/// Fraction of the KV cache's blocks that sequences hold (0 to 1), as
/// vLLM's `kv_cache_usage_perc` (blocks that only cache a prefix are free).
pub fn kv_usage(m: &MetricsSnapshot) -> f64 {
    if m.kv_blocks_total == 0 {
        return 0.0;
    }
    (m.kv_blocks_used as f64 / m.kv_blocks_total as f64).clamp(0.0, 1.0)
}

/// One series: its name, Prometheus type, help text, and how to read its
/// value from a model's `T` (its engine counters, or their speculative part).
struct Series<T> {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    get: fn(&T) -> f64,
}

/// A gauge: a value that goes up and down.
const fn gauge<T>(name: &'static str, help: &'static str, get: fn(&T) -> f64) -> Series<T> {
    Series {
        name,
        kind: "gauge",
        help,
        get,
    }
}

/// A counter: a total since start.
const fn counter<T>(name: &'static str, help: &'static str, get: fn(&T) -> f64) -> Series<T> {
    Series {
        name,
        kind: "counter",
        help,
        get,
    }
}

/// The engine's gauges and counters under vLLM's names.
const SERIES: [Series<MetricsSnapshot>; 9] = [
    gauge(
        "vllm:num_requests_running",
        "Requests in the running batch (kiln_running_sequences).",
        |m| m.running as f64,
    ),
    gauge(
        "vllm:num_requests_waiting",
        "Requests waiting to run, preempted ones included (kiln_queue_length).",
        |m| m.waiting as f64,
    ),
    gauge(
        "vllm:kv_cache_usage_perc",
        "Fraction of KV-cache blocks held by sequences; 1 means full.",
        kv_usage,
    ),
    gauge(
        "vllm:gpu_cache_usage_perc",
        "The same as vllm:kv_cache_usage_perc, under the name older routers read.",
        kv_usage,
    ),
    counter(
        "vllm:prefix_cache_queries_total",
        "Prompt tokens looked up in the prefix cache.",
        |m| m.prefix_queried_tokens as f64,
    ),
    counter(
        "vllm:prefix_cache_hits_total",
        "Prompt tokens found in the prefix cache.",
        |m| m.prefix_hit_tokens as f64,
    ),
    counter(
        "vllm:prompt_tokens_total",
        "Prompt tokens of requests started.",
        |m| m.prompt_tokens as f64,
    ),
    counter("vllm:generation_tokens_total", "Tokens generated.", |m| {
        m.generated_tokens as f64
    }),
    counter(
        "vllm:num_preemptions_total",
        "Sequences preempted to free KV-cache blocks.",
        |m| m.preemptions as f64,
    ),
];

/// Speculative decoding's series: vLLM's counters and kiln's acceptance rate.
const SPEC_SERIES: [Series<SpecSnapshot>; 4] = [
    counter(
        "vllm:spec_decode_num_drafts_total",
        "Drafts checked: one per sequence and step that had guesses.",
        |s| s.num_drafts as f64,
    ),
    counter(
        "vllm:spec_decode_num_draft_tokens_total",
        "Guessed tokens checked by the model.",
        |s| s.num_draft_tokens as f64,
    ),
    counter(
        "vllm:spec_decode_num_accepted_tokens_total",
        "Guessed tokens accepted.",
        |s| s.num_accepted_tokens as f64,
    ),
    gauge(
        "kiln_spec_decode_acceptance_rate",
        "Accepted over checked guesses since start (0 before any).",
        |s| s.acceptance_rate(),
    ),
];

/// A series' `# HELP` and `# TYPE` lines.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Each of `series` with one line per model (`of` picks what its getter reads).
fn render_series<T>(
    out: &mut String,
    series: &[Series<T>],
    models: &[&ModelFigures<'_>],
    of: fn(&MetricsSnapshot) -> &T,
) {
    for s in series {
        header(out, s.name, s.kind, s.help);
        for m in models {
            let _ = writeln!(
                out,
                "{}{{model_name=\"{}\",engine=\"0\"}} {}",
                s.name,
                m.name,
                (s.get)(of(m.metrics))
            );
        }
    }
}

/// Appends the vLLM-named series of every ready model to `out`.
pub fn render(out: &mut String, models: &[ModelFigures<'_>]) {
    let all: Vec<&ModelFigures<'_>> = models.iter().collect();
    render_series(out, &SERIES, &all, |m| m);
    // An "info" metric: a gauge fixed at 1 whose labels carry the facts.
    header(
        out,
        "vllm:cache_config_info",
        "gauge",
        "The KV cache's configuration, in labels.",
    );
    for m in models {
        let _ = writeln!(
            out,
            "vllm:cache_config_info{{model_name=\"{}\",engine=\"0\",block_size=\"{}\",num_gpu_blocks=\"{}\",enable_prefix_caching=\"True\"}} 1",
            m.name, m.block_size, m.num_blocks
        );
    }
    render_speculative(out, &all);
}

/// Speculative decoding's series, for the models that speculate: vLLM's
/// counters (drafts, draft tokens, accepted tokens, accepted tokens by
/// position in the draft) and kiln's acceptance rate.
fn render_speculative(out: &mut String, models: &[&ModelFigures<'_>]) {
    let spec: Vec<&ModelFigures<'_>> = models
        .iter()
        .copied()
        .filter(|m| m.metrics.speculative.method.is_some())
        .collect();
    if spec.is_empty() {
        return;
    }
    render_series(out, &SPEC_SERIES, &spec, |m| &m.speculative);
    let name = "vllm:spec_decode_num_accepted_tokens_per_pos_total";
    header(
        out,
        name,
        "counter",
        "Guessed tokens accepted, by position in the draft (0 = first).",
    );
    for m in &spec {
        for (pos, n) in m.metrics.speculative.accepted_per_pos.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{model_name=\"{}\",engine=\"0\",position=\"{pos}\"}} {n}",
                m.name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_engine::metrics::EngineMetrics;

    fn snapshot() -> MetricsSnapshot {
        let mut m = EngineMetrics::default().snapshot();
        m.waiting = 3;
        m.running = 2;
        m.kv_blocks_total = 200;
        m.kv_blocks_used = 50;
        m.prefix_queried_tokens = 96;
        m.prefix_hit_tokens = 32;
        m.prompt_tokens = 120;
        m.generated_tokens = 7;
        m
    }

    /// The series of one model "opt" with `m`'s counters (16-token blocks, 200 of them).
    fn rendered(m: &MetricsSnapshot) -> String {
        let mut out = String::new();
        render(
            &mut out,
            &[ModelFigures {
                name: "opt",
                metrics: m,
                block_size: 16,
                num_blocks: 200,
            }],
        );
        out
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse().ok())?
        })
    }

    #[test]
    fn series_carry_the_engine_figures_under_vllm_names() {
        let m = snapshot();
        let out = rendered(&m);
        let l = r#"{model_name="opt",engine="0"}"#;
        let get = |n: &str| value(&out, &format!("{n}{l}"));
        assert_eq!(get("vllm:num_requests_waiting"), Some(3.0));
        assert_eq!(get("vllm:num_requests_running"), Some(2.0));
        assert_eq!(get("vllm:kv_cache_usage_perc"), Some(0.25));
        assert_eq!(get("vllm:gpu_cache_usage_perc"), Some(0.25));
        assert_eq!(get("vllm:prefix_cache_queries_total"), Some(96.0));
        assert_eq!(get("vllm:prefix_cache_hits_total"), Some(32.0));
        assert_eq!(get("vllm:prompt_tokens_total"), Some(120.0));
        assert_eq!(get("vllm:generation_tokens_total"), Some(7.0));
        assert_eq!(
            value(
                &out,
                r#"vllm:cache_config_info{model_name="opt",engine="0",block_size="16",num_gpu_blocks="200",enable_prefix_caching="True"}"#
            ),
            Some(1.0)
        );
        assert!(out.contains("# TYPE vllm:prefix_cache_hits_total counter"));
        assert!(out.contains("# TYPE vllm:kv_cache_usage_perc gauge"));
        assert!(
            !out.contains("spec_decode"),
            "no speculative series for a model that does not speculate"
        );
    }

    #[test]
    fn speculative_decoding_series_under_vllm_names() {
        let mut m = snapshot();
        m.speculative = kiln_engine::spec::SpecSnapshot {
            method: Some("ngram"),
            num_speculative_tokens: 3,
            num_drafts: 10,
            num_draft_tokens: 28,
            num_accepted_tokens: 21,
            accepted_per_pos: vec![9, 7, 5],
        };
        let out = rendered(&m);
        let l = r#"{model_name="opt",engine="0"}"#;
        let get = |n: &str| value(&out, &format!("{n}{l}"));
        assert_eq!(get("vllm:spec_decode_num_drafts_total"), Some(10.0));
        assert_eq!(get("vllm:spec_decode_num_draft_tokens_total"), Some(28.0));
        assert_eq!(
            get("vllm:spec_decode_num_accepted_tokens_total"),
            Some(21.0)
        );
        assert_eq!(get("kiln_spec_decode_acceptance_rate"), Some(0.75));
        let per_pos = |p: usize| {
            value(
                &out,
                &format!(
                    r#"vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="opt",engine="0",position="{p}"}}"#
                ),
            )
        };
        assert_eq!(
            (per_pos(0), per_pos(1), per_pos(2), per_pos(3)),
            (Some(9.0), Some(7.0), Some(5.0), None)
        );
        assert!(out.contains("# TYPE vllm:spec_decode_num_drafts_total counter"));
    }

    #[test]
    fn usage_is_a_fraction_even_for_an_empty_cache() {
        let mut m = snapshot();
        assert_eq!(kv_usage(&m), 0.25);
        m.kv_blocks_used = m.kv_blocks_total;
        assert_eq!(kv_usage(&m), 1.0);
        m.kv_blocks_total = 0;
        assert_eq!(kv_usage(&m), 0.0);
    }
}
