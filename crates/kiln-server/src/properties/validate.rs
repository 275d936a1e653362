//! What each key kiln reads means, and whether its value can be used: the
//! [`Builder`]'s typed values become a [`ModelProperties`], one function per
//! concern (where the model is, how it is loaded, how requests are batched,
//! DJL's worker settings, timeouts), or the list of every bad value.

use std::path::Path;
use std::time::Duration;

use super::builder::{env_secs, Builder};
use super::defaults::{self, MAX_JOB_QUEUE_SIZE};
use super::error::PropertiesError;
use super::keys::{ignored_reason, suggest, TYPED_KEYS};
use super::model::ModelProperties;
use super::raw::{RawProperties, RawProperty};
use super::values::{
    Dtype, Engine, ModelSource, OutputFormatter, RollingBatch, Streaming, TensorParallelDegree,
};

/// `option.model_id` as read: its value with where it was set, the
/// `option.revision` that goes with it, and the classified source.
struct ModelId {
    entry: Option<RawProperty>,
    revision: Option<String>,
    source: ModelSource,
}

impl Builder {
    /// Turns the gathered entries into the model's properties, or every bad
    /// value found (warnings are kept either way, in the order the keys are
    /// read here).
    pub(super) fn validate(
        mut self,
        model_dir: &Path,
        properties_file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ModelProperties, PropertiesError> {
        self.warn_unknown_and_ignored();
        let engine = self.engine();
        let entry_point = self.entry_point();
        let model_id = self.model_id(model_dir);
        let trust_remote_code = self.trust_remote_code();
        let dtype = self
            .choice("option.dtype", Dtype::parse, Dtype::ALLOWED)
            .map_or(Dtype::Auto, |(d, _)| d);
        let quantize = self.quantize();
        let device = self
            .choice(
                "option.device",
                |v| kiln_backend::Device::parse(v).ok(),
                kiln_backend::Device::ALLOWED,
            )
            .map(|(d, _)| d);
        let tensor_parallel_degree = self.parallelism();
        let rolling_batch = self.rolling_batch();
        let (max_rolling_batch_size, max_rolling_batch_prefill_tokens) =
            self.rolling_batch_limits(rolling_batch);
        let max_model_len = self.max_model_len();
        let kv_cache_dtype = self.kv_cache_dtype();
        let kv_cache_memory_bytes = self.kv_cache_memory_bytes();
        let max_input_len = self
            .count_at_least("option.max_input_len", 1)
            .map(|(n, _)| n);
        let max_output_len = self
            .count_at_least("option.max_output_len", 1)
            .map(|(n, _)| n);
        let enable_streaming = self.enable_streaming(rolling_batch);
        let chat = self.chat_options();
        let speculative = self.speculative(model_dir);
        self.refuse_chat_template();
        let prefill_first_token = self
            .boolean("option.prefill_first_token")
            .is_some_and(|(on, _)| on);
        let output_formatter = self.output_formatter();
        let lora = self.lora_options();
        let (batch_size, max_batch_delay) = self.static_batching();
        let job_queue_size = self.job_queue_size();
        let (min_workers, max_workers) = self.workers();
        let (model_loading_timeout, predict_timeout) = self.timeouts(env);

        if !self.problems.is_empty() {
            return Err(PropertiesError::Invalid {
                problems: self.problems,
            });
        }
        Ok(ModelProperties {
            model_dir: model_dir.to_path_buf(),
            properties_file: properties_file.map(Path::to_path_buf),
            engine,
            model_source: model_id.source,
            revision: model_id.revision,
            trust_remote_code,
            dtype,
            quantize,
            device,
            tensor_parallel_degree,
            rolling_batch,
            max_rolling_batch_size,
            max_rolling_batch_prefill_tokens,
            max_model_len,
            kv_cache_dtype,
            kv_cache_memory_bytes,
            max_input_len,
            max_output_len,
            enable_streaming,
            output_formatter,
            chat,
            batch_size,
            max_batch_delay,
            job_queue_size,
            min_workers,
            max_workers,
            model_loading_timeout,
            predict_timeout,
            entry_point,
            prefill_first_token,
            lora,
            speculative,
            raw: RawProperties(self.raw),
            warnings: self.warnings,
            model_id_origin: model_id.entry.map(|p| p.origin),
        })
    }

    /// `engine`: kiln always runs its own; the value decides the warning.
    fn engine(&mut self) -> Engine {
        let Some(p) = self.entry("engine") else {
            return Engine::Python;
        };
        let engine = Engine::parse(&p.value);
        match &engine {
            Engine::Python => {}
            Engine::Mpi | Engine::DeepSpeed => self.warn(
                &p,
                "kiln runs one engine per model on one device in its own process; \
                 no MPI or DeepSpeed launcher is used",
            ),
            Engine::Other(_) => self.warn(
                &p,
                "not an LMI engine; kiln serves the model as a large language model \
                 with its own engine",
            ),
        }
        engine
    }

    /// `option.entryPoint`: kept, with a warning that no Python runs.
    fn entry_point(&mut self) -> Option<String> {
        self.entry("option.entryPoint").map(|p| {
            self.warn(
                &p,
                "kiln serves every model with its built-in handler and runs no Python entry point",
            );
            p.value
        })
    }

    /// `option.model_id` with `option.revision`, classified from `model_dir`.
    fn model_id(&mut self, model_dir: &Path) -> ModelId {
        let revision = self.entry("option.revision").map(|p| p.value);
        let entry = self.entry("option.model_id");
        let source = match &entry {
            None => ModelSource::InDirectory,
            Some(p) => match ModelSource::classify(&p.value, revision.as_deref(), model_dir) {
                Ok(source) => source,
                Err(why) => {
                    self.problem(p, &why);
                    ModelSource::InDirectory
                }
            },
        };
        if let (Some(p), false) = (
            self.entry("option.revision"),
            matches!(source, ModelSource::HuggingFace { .. }),
        ) {
            self.warn(
                &p,
                "only applies to a Hugging Face model id, and option.model_id is not one",
            );
        }
        ModelId {
            entry,
            revision,
            source,
        }
    }

    /// `option.trust_remote_code`: accepted; kiln runs no model code.
    fn trust_remote_code(&mut self) -> bool {
        match self.boolean("option.trust_remote_code") {
            Some((true, p)) => {
                self.warn(
                    &p,
                    "kiln never runs code from the model; its architectures are built in",
                );
                true
            }
            other => other.is_some_and(|(v, _)| v),
        }
    }

    /// `option.tensor_parallel_degree` (kept) and
    /// `option.pipeline_parallel_degree`: kiln runs a model on one device.
    fn parallelism(&mut self) -> Option<TensorParallelDegree> {
        let tensor = self.degree("option.tensor_parallel_degree").map(|(d, p)| {
            if matches!(d, TensorParallelDegree::Degree(n) if n > 1) {
                self.warn(
                    &p,
                    "kiln runs each model on one device; the model is not sharded",
                );
            }
            d
        });
        if let Some((TensorParallelDegree::Degree(n), p)) =
            self.degree("option.pipeline_parallel_degree")
        {
            if n > 1 {
                self.warn(
                    &p,
                    "kiln runs each model on one device; the model is not split into stages",
                );
            }
        }
        tensor
    }

    /// `option.rolling_batch`: every value is served by kiln's engine.
    fn rolling_batch(&mut self) -> RollingBatch {
        let Some((rb, p)) = self.choice(
            "option.rolling_batch",
            RollingBatch::parse,
            RollingBatch::ALLOWED,
        ) else {
            return RollingBatch::Auto;
        };
        match rb {
            RollingBatch::Auto => {}
            RollingBatch::Disable => self.warn(
                &p,
                "kiln batches continuously all the same; a request's output does not \
                 depend on what it is batched with",
            ),
            _ => self.warn(&p, "served by kiln's own continuous-batching engine"),
        }
        rb
    }

    /// `option.max_rolling_batch_size` (DJL's default depends on the
    /// rolling batch named) and `option.max_rolling_batch_prefill_tokens`
    /// (or its vLLM alias `option.max_num_batched_tokens`, which DJL's vLLM
    /// properties also take).
    fn rolling_batch_limits(&mut self, rolling_batch: RollingBatch) -> (usize, Option<usize>) {
        let default_batch = match rolling_batch {
            RollingBatch::Vllm | RollingBatch::TrtLlm => {
                defaults::MAX_ROLLING_BATCH_SIZE_VLLM_TRTLLM
            }
            _ => defaults::MAX_ROLLING_BATCH_SIZE,
        };
        let size = self
            .count_at_least("option.max_rolling_batch_size", 1)
            .map_or(default_batch, |(n, _)| n);
        let alias = self.count_at_least("option.max_num_batched_tokens", 1);
        let prefill_tokens = match (
            self.count_at_least("option.max_rolling_batch_prefill_tokens", 1),
            alias,
        ) {
            (Some((n, _)), Some((m, a))) if m != n => {
                self.warn(
                    &a,
                    &format!(
                        "not used: option.max_rolling_batch_prefill_tokens={n} is set too and wins"
                    ),
                );
                Some(n)
            }
            (lmi, alias) => lmi.or(alias).map(|(n, _)| n),
        };
        (size, prefill_tokens)
    }

    /// `option.max_model_len`, or else `option.n_positions`.
    fn max_model_len(&mut self) -> Option<usize> {
        let n_positions = self.count_at_least("option.n_positions", 1);
        match (self.count_at_least("option.max_model_len", 1), n_positions) {
            (Some((len, p)), Some((n, _))) if len != n => {
                self.warn(&p, &format!("used instead of option.n_positions={n}"));
                Some(len)
            }
            (Some((len, _)), _) => Some(len),
            (None, n) => n.map(|(n, _)| n),
        }
    }

    /// `option.enable_streaming`: only `rolling_batch=disable` reads it.
    fn enable_streaming(&mut self, rolling_batch: RollingBatch) -> Streaming {
        let Some((s, p)) = self.choice(
            "option.enable_streaming",
            Streaming::parse,
            Streaming::ALLOWED,
        ) else {
            return Streaming::False;
        };
        if rolling_batch != RollingBatch::Disable {
            self.warn(
                &p,
                "deprecated in DJL and not needed: kiln streams a response when the \
                 request asks for it (\"stream\": true)",
            );
        }
        s
    }

    /// `option.speculative_config` (vLLM's JSON: the ngram and draft_model
    /// methods) or DJL's `option.speculative_draft_model` with
    /// `option.speculative_length`; a method kiln lacks is refused, not
    /// silently dropped. A draft model is a local path (relative ones start
    /// at the model directory), made absolute here.
    fn speculative(&mut self, model_dir: &Path) -> Option<kiln_engine::SpecConfig> {
        let vllm = self.entry("option.speculative_config");
        let djl = self.entry("option.speculative_draft_model");
        let length = self.count_at_least("option.speculative_length", 1);
        if let (Some((_, lp)), None) = (&length, &djl) {
            self.warn(
                lp,
                "ignored: it sets the tokens option.speculative_draft_model guesses per step, \
                 and that is not set (option.speculative_config has num_speculative_tokens)",
            );
        }
        let length = length.map(|(n, _)| n);
        let (p, parsed) = match (vllm, djl) {
            (Some(v), Some(d)) => {
                self.problem(
                    &d,
                    "and option.speculative_config both ask for speculative decoding; set one",
                );
                let _ = v;
                return None;
            }
            (Some(v), None) => {
                let c = kiln_engine::SpecConfig::from_vllm_json(&v.value);
                (v, c)
            }
            (None, Some(d)) => {
                let c = kiln_engine::SpecConfig::from_djl(&d.value, length);
                (d, c)
            }
            (None, None) => return None,
        };
        let mut c = match parsed {
            Ok(c) => c,
            Err(e) => {
                self.problem(
                    &p,
                    &format!("is not a speculative decoding setting kiln can serve: {e}"),
                );
                return None;
            }
        };
        if let kiln_engine::SpecMethod::DraftModel { model } = &mut c.method {
            let path = model_dir.join(model.as_str());
            if !path.exists() {
                self.problem(
                    &p,
                    &format!(
                        "asks for speculative decoding with the draft model '{model}', which is \
                         not a local file or directory ({} does not exist); kiln does not \
                         implement fetching draft models yet",
                        path.display()
                    ),
                );
                return None;
            }
            *model = path.to_string_lossy().into_owned();
        }
        Some(c)
    }

    /// `option.chat_template` (DJL's tool-calling guide sets it to a template
    /// file): refused, since kiln renders the template stored with the model
    /// and a replacement ignored silently would change every prompt.
    fn refuse_chat_template(&mut self) {
        if let Some(p) = self.entry("option.chat_template") {
            self.problem(
                &p,
                "asks for a chat template other than the model's, which kiln cannot take from \
                 serving.properties yet; put the template in the model directory as \
                 chat_template.jinja (kiln renders the template stored with the model: that \
                 file, tokenizer_config.json's chat_template, or a GGUF's \
                 tokenizer.chat_template) and remove option.chat_template",
            );
        }
    }

    /// `option.output_formatter`: kiln's formatters, DJL's others warned.
    fn output_formatter(&mut self) -> Option<OutputFormatter> {
        let p = self.entry("option.output_formatter")?;
        if let Some(formatter) = OutputFormatter::parse(&p.value) {
            return Some(formatter);
        }
        if OutputFormatter::DJL_ONLY.contains(&p.value.as_str()) {
            self.warn(&p, "kiln does not implement this DJL formatter; using the default (json, or jsonlines when streaming)");
        } else {
            self.problem(
                &p,
                &format!(
                    "is not one of {} (custom formatters from a model.py cannot run in kiln)",
                    OutputFormatter::ALLOWED
                ),
            );
        }
        None
    }

    /// DJL's static batching: `batch_size` (or `max_dynamic_batch_size`)
    /// and `max_batch_delay`, kept and reported as not used.
    fn static_batching(&mut self) -> (usize, Duration) {
        let dynamic = self.count_at_least("max_dynamic_batch_size", 1);
        let batch_size = match self.count_at_least("batch_size", 1).or(dynamic) {
            None => defaults::BATCH_SIZE,
            Some((n, p)) => {
                if n > 1 {
                    self.warn(
                        &p,
                        "kiln batches continuously (up to option.max_rolling_batch_size \
                         sequences), so static batching is not needed and not used",
                    );
                }
                n
            }
        };
        let max_batch_delay = match self.int(
            "max_batch_delay",
            0,
            i64::from(u32::MAX),
            "a whole number of milliseconds",
        ) {
            None => Duration::from_millis(defaults::MAX_BATCH_DELAY_MS),
            Some((ms, p)) => {
                self.warn(
                    &p,
                    "kiln does not wait to fill a batch: a request joins at the next engine step",
                );
                Duration::from_millis(ms.unsigned_abs())
            }
        };
        (batch_size, max_batch_delay)
    }

    /// `job_queue_size`, bounded by [`MAX_JOB_QUEUE_SIZE`].
    fn job_queue_size(&mut self) -> usize {
        self.int(
            "job_queue_size",
            1,
            MAX_JOB_QUEUE_SIZE as i64,
            &format!("a whole number from 1 to {MAX_JOB_QUEUE_SIZE}"),
        )
        .map_or(defaults::JOB_QUEUE_SIZE, |(n, _)| {
            usize::try_from(n).unwrap_or(MAX_JOB_QUEUE_SIZE)
        })
    }

    /// `option.model_loading_timeout` and `option.predict_timeout`, whose
    /// defaults `MODEL_LOADING_TIMEOUT` and `PREDICT_TIMEOUT` replace.
    fn timeouts(&mut self, env: &dyn Fn(&str) -> Option<String>) -> (Duration, Duration) {
        let loading = self
            .seconds("option.model_loading_timeout")
            .unwrap_or_else(|| {
                Duration::from_secs(
                    env_secs(env, "MODEL_LOADING_TIMEOUT")
                        .unwrap_or(defaults::MODEL_LOADING_TIMEOUT_S),
                )
            });
        let predict = self.seconds("option.predict_timeout").unwrap_or_else(|| {
            Duration::from_secs(
                env_secs(env, "PREDICT_TIMEOUT").unwrap_or(defaults::PREDICT_TIMEOUT_S),
            )
        });
        (loading, predict)
    }

    /// `minWorkers`/`maxWorkers`: -1 means DJL's default.
    fn workers(&mut self) -> (usize, usize) {
        let range = i64::from(u32::MAX);
        let min = self.int(
            "minWorkers",
            -1,
            range,
            "-1 or a whole number of at least 0",
        );
        let max = self.int(
            "maxWorkers",
            -1,
            range,
            "-1 or a whole number of at least 1",
        );
        let min_workers = match &min {
            Some((n, p)) if *n >= 0 => {
                self.note_workers(p, *n);
                usize::try_from(*n).unwrap_or(usize::MAX)
            }
            _ => defaults::MIN_WORKERS,
        };
        let max_workers = match &max {
            Some((0, p)) => {
                self.problem(p, "is not -1 or a whole number of at least 1");
                None
            }
            Some((n, p)) if *n > 0 => {
                self.note_workers(p, *n);
                Some(usize::try_from(*n).unwrap_or(usize::MAX))
            }
            _ => None,
        };
        if let (Some(max_n), Some((_, p))) = (max_workers, &min) {
            if min_workers > max_n {
                self.problem(p, &format!("is more than maxWorkers = {max_n}"));
            }
        }
        (min_workers, max_workers.unwrap_or(min_workers.max(1)))
    }

    /// Notes that more than one worker is not needed.
    fn note_workers(&mut self, p: &RawProperty, n: i64) {
        if n > 1 {
            self.warn(
                p,
                "kiln runs one engine per model, which serves concurrent requests by \
                 batching them; more workers are not needed",
            );
        }
    }

    /// Warns of each key kiln does not read: ignored ones with why, unknown
    /// ones with the nearest known key.
    fn warn_unknown_and_ignored(&mut self) {
        let raw = self.raw.clone();
        for p in &raw {
            if TYPED_KEYS.contains(&p.key.as_str()) {
                continue;
            }
            if let Some(reason) = ignored_reason(&p.key) {
                self.warnings
                    .push(format!("{}: {} is ignored: {reason}", p.origin, p.key));
                continue;
            }
            let hint = match suggest(&p.key) {
                Some(known) => format!(" (did you mean {known}?)"),
                None => String::new(),
            };
            self.warnings.push(format!(
                "{}: unknown key '{}' is ignored{hint}",
                p.origin, p.key
            ));
        }
    }
}
