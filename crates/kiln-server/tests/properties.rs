//! `serving.properties` as DJL LMI deployments write it: parsing, defaults,
//! validation messages, environment forms and precedence, warnings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_server::properties::{
    defaults, Dtype, Engine, ModelLocation, ModelProperties, ModelSource, Origin, OutputFormatter,
    PropertiesError, RollingBatch, Streaming, TensorParallelDegree,
};
use kiln_sources::Source;

/// An environment made of the given variables only.
fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name: &str| map.get(name).cloned()
}

fn no_env(_: &str) -> Option<String> {
    None
}

const FILE: &str = "models/opt13b/serving.properties";

fn parse(text: &str) -> ModelProperties {
    parse_env(text, &[])
}

fn parse_env(text: &str, vars: &[(&str, &str)]) -> ModelProperties {
    match ModelProperties::parse(text, Path::new(FILE), &env_of(vars)) {
        Ok(p) => p,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn parse_err(text: &str) -> String {
    parse_err_env(text, &[])
}

fn parse_err_env(text: &str, vars: &[(&str, &str)]) -> String {
    match ModelProperties::parse(text, Path::new(FILE), &env_of(vars)) {
        Ok(p) => panic!("expected an error, got {p:?}"),
        Err(e) => e.to_string(),
    }
}

fn has_warning(p: &ModelProperties, needle: &str) -> bool {
    p.warnings.iter().any(|w| w.contains(needle))
}

/// The reference deployment: OPT-13B on Inferentia with transformers-neuronx.
const REFERENCE: &str = "\
# OPT-13B on inf2 (transformers-neuronx)
engine=Python
option.entryPoint=djl_python.transformers_neuronx
option.model_id=facebook/opt-13b
option.tensor_parallel_degree=2
option.n_positions=512
option.rolling_batch=auto
option.dtype=fp16
option.model_loading_timeout=1500
batch_size=4
max_batch_delay=100
";

#[test]
fn reference_deployment_file() {
    let p = parse(REFERENCE);
    assert_eq!(p.engine, Engine::Python);
    assert_eq!(
        p.entry_point.as_deref(),
        Some("djl_python.transformers_neuronx")
    );
    assert_eq!(
        p.model_source,
        ModelSource::HuggingFace {
            id: "facebook/opt-13b".into(),
            revision: None
        }
    );
    assert_eq!(
        p.tensor_parallel_degree,
        Some(TensorParallelDegree::Degree(2))
    );
    assert_eq!(p.max_model_len, Some(512));
    assert_eq!(p.rolling_batch, RollingBatch::Auto);
    assert_eq!(p.dtype, Dtype::F16);
    assert_eq!(p.model_loading_timeout, Duration::from_secs(1500));
    assert_eq!(p.batch_size, 4);
    assert_eq!(p.max_batch_delay, Duration::from_millis(100));
    assert_eq!(p.max_rolling_batch_size, 32);
    assert_eq!(p.model_dir, Path::new("models/opt13b"));
    assert_eq!(p.properties_file.as_deref(), Some(Path::new(FILE)));

    // What kiln does differently is said, each with its line.
    assert!(has_warning(
        &p,
        &format!("{FILE}:3: option.entryPoint=djl_python.transformers_neuronx")
    ));
    assert!(has_warning(
        &p,
        &format!("{FILE}:5: option.tensor_parallel_degree=2: kiln runs each model on one device")
    ));
    assert!(has_warning(
        &p,
        &format!("{FILE}:10: batch_size=4: kiln batches continuously")
    ));
    assert!(has_warning(&p, &format!("{FILE}:11: max_batch_delay=100")));
    assert_eq!(p.warnings.len(), 4, "{:#?}", p.warnings);

    assert_eq!(
        p.resolve().expect("a Hugging Face id is a remote source"),
        ModelLocation::Remote(Source::Hub {
            repo: "facebook/opt-13b".into(),
            revision: None
        })
    );
}

#[test]
fn no_file_means_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = ModelProperties::load(dir.path(), &no_env).expect("loads");
    assert_eq!(p.properties_file, None);
    assert_eq!(p.engine, Engine::Python);
    assert_eq!(p.model_source, ModelSource::InDirectory);
    assert_eq!(p.dtype, Dtype::Auto);
    assert_eq!(p.rolling_batch, RollingBatch::Auto);
    assert_eq!(p.max_rolling_batch_size, 32);
    assert_eq!(p.max_rolling_batch_prefill_tokens, None);
    assert_eq!(p.max_model_len, None);
    assert_eq!(p.enable_streaming, Streaming::False);
    assert_eq!(p.output_formatter, None);
    assert_eq!(p.batch_size, 1);
    assert_eq!(p.max_batch_delay, Duration::from_millis(100));
    assert_eq!(p.job_queue_size, 1000);
    assert_eq!(p.min_workers, 1);
    assert_eq!(p.max_workers, 1);
    assert_eq!(p.model_loading_timeout, Duration::from_secs(1200));
    assert_eq!(p.predict_timeout, Duration::from_secs(240));
    assert!(!p.trust_remote_code);
    assert!(p.raw.is_empty());
    assert!(p.warnings.is_empty());
    assert_eq!(
        p.resolve().expect("in directory"),
        ModelLocation::Local(dir.path().to_path_buf())
    );

    let d = ModelProperties::default();
    assert_eq!(
        (
            d.max_rolling_batch_size,
            d.job_queue_size,
            d.batch_size,
            d.max_workers
        ),
        (
            p.max_rolling_batch_size,
            p.job_queue_size,
            p.batch_size,
            p.max_workers
        )
    );
}

#[test]
fn load_reads_the_file_in_the_model_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("serving.properties"), "option.dtype=bf16\n").expect("write");
    let p = ModelProperties::load(dir.path(), &no_env).expect("loads");
    assert_eq!(p.dtype, Dtype::Bf16);
    assert_eq!(
        p.properties_file,
        Some(dir.path().join("serving.properties"))
    );
}

#[test]
fn load_accepts_latin1_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("serving.properties"),
        b"option.dtype=fp16\nnote=caf\xe9\n",
    )
    .expect("write");
    let p = ModelProperties::load(dir.path(), &no_env).expect("loads");
    assert_eq!(p.get("note"), Some("café"));
}

#[test]
fn dtype_values() {
    for (value, dtype) in [
        ("auto", Dtype::Auto),
        ("fp32", Dtype::F32),
        ("float32", Dtype::F32),
        ("fp16", Dtype::F16),
        ("FP16", Dtype::F16),
        ("float16", Dtype::F16),
        ("half", Dtype::F16),
        ("bf16", Dtype::Bf16),
        ("bfloat16", Dtype::Bf16),
        // The CLI's spellings: one table serves --dtype, option.dtype and
        // kiln inspect.
        ("f16", Dtype::F16),
        ("f32", Dtype::F32),
        ("float", Dtype::F32),
    ] {
        assert_eq!(
            parse(&format!("option.dtype={value}")).dtype,
            dtype,
            "{value}"
        );
    }
}

#[test]
fn bad_dtype_names_file_line_key_and_allowed_values() {
    let text = "engine=Python\noption.model_id=/tmp\n\noption.dtype=fp8\n";
    assert_eq!(
        parse_err(text),
        "models/opt13b/serving.properties:4: option.dtype = 'fp8' is not one of auto, fp32, fp16, bf16"
    );
    assert!(parse_err("option.dtype=int8").contains("is not one of auto, fp32, fp16, bf16"));
}

#[test]
fn device_values_and_the_environment_form() {
    use kiln_backend::Device;
    assert_eq!(
        parse("engine=Python\n").device,
        None,
        "unset: the server's --device"
    );
    for (value, device) in [
        ("cpu", Device::Cpu),
        ("cuda", Device::Cuda(0)),
        ("cuda:1", Device::Cuda(1)),
        ("CUDA:0", Device::Cuda(0)),
    ] {
        assert_eq!(
            parse(&format!("option.device={value}")).device,
            Some(device),
            "{value}"
        );
    }
    let p = parse_env("engine=Python\n", &[("OPTION_DEVICE", "cuda:2")]);
    assert_eq!(p.device, Some(Device::Cuda(2)));
    assert!(!has_warning(&p, "option.device"), "{:?}", p.warnings);
    assert_eq!(
        parse_err("option.device=tpu\n"),
        "models/opt13b/serving.properties:1: option.device = 'tpu' is not one of cpu, cuda, cuda:N"
    );
}

#[test]
fn rolling_batch_values() {
    for (value, rb) in [
        ("auto", RollingBatch::Auto),
        ("disable", RollingBatch::Disable),
        ("scheduler", RollingBatch::Scheduler),
        ("lmi-dist", RollingBatch::LmiDist),
        ("vllm", RollingBatch::Vllm),
        ("deepspeed", RollingBatch::DeepSpeed),
        ("trtllm", RollingBatch::TrtLlm),
        ("tnx", RollingBatch::Tnx),
    ] {
        let p = parse(&format!("option.rolling_batch={value}"));
        assert_eq!(p.rolling_batch, rb, "{value}");
        assert_eq!(
            p.warnings.is_empty(),
            rb == RollingBatch::Auto,
            "{value}: {:?}",
            p.warnings
        );
    }
    assert!(parse_err("option.rolling_batch=tgi").ends_with(
        "option.rolling_batch = 'tgi' is not one of auto, disable, scheduler, lmi-dist, vllm, deepspeed, trtllm, tnx"
    ));
}

#[test]
fn max_rolling_batch_size_default_follows_djl() {
    assert_eq!(
        parse("option.rolling_batch=lmi-dist").max_rolling_batch_size,
        32
    );
    assert_eq!(
        parse("option.rolling_batch=vllm").max_rolling_batch_size,
        256
    );
    assert_eq!(
        parse("option.rolling_batch=trtllm").max_rolling_batch_size,
        256
    );
    assert_eq!(
        parse("option.rolling_batch=vllm\noption.max_rolling_batch_size=8").max_rolling_batch_size,
        8
    );
    assert_eq!(defaults::MAX_ROLLING_BATCH_SIZE, 32);
}

#[test]
fn whole_number_keys() {
    let p = parse(
        "option.max_rolling_batch_size=64\n\
         option.max_rolling_batch_prefill_tokens=4096\n\
         option.max_model_len=2048\n\
         option.max_input_len=1024\n\
         option.max_output_len=512\n\
         job_queue_size=10\n\
         option.predict_timeout=30\n",
    );
    assert_eq!(p.max_rolling_batch_size, 64);
    assert_eq!(p.max_rolling_batch_prefill_tokens, Some(4096));
    assert_eq!(p.max_model_len, Some(2048));
    assert_eq!(p.max_input_len, Some(1024));
    assert_eq!(p.max_output_len, Some(512));
    assert_eq!(p.job_queue_size, 10);
    assert_eq!(p.predict_timeout, Duration::from_secs(30));
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);

    for key in [
        "option.max_rolling_batch_size",
        "option.max_rolling_batch_prefill_tokens",
        "option.max_model_len",
        "option.n_positions",
        "option.max_input_len",
        "option.max_output_len",
        "batch_size",
    ] {
        for bad in ["0", "-3", "abc", "1.5", "99999999999"] {
            assert_eq!(
                parse_err(&format!("{key}={bad}")),
                format!("{FILE}:1: {key} = '{bad}' is not a whole number of at least 1"),
            );
        }
    }
    for key in ["option.model_loading_timeout", "option.predict_timeout"] {
        assert_eq!(
            parse_err(&format!("{key}=0")),
            format!("{FILE}:1: {key} = '0' is not a whole number of seconds of at least 1"),
        );
    }
    assert_eq!(
        parse_err("max_batch_delay=-1"),
        format!("{FILE}:1: max_batch_delay = '-1' is not a whole number of milliseconds")
    );
}

/// Issue 21, point 12: a `job_queue_size` near 2^64 overflowed the
/// engine's admission limit (`job_queue_size + max_rolling_batch_size`) and
/// refused every request; it is refused where it is read, in the file and
/// in both environment forms.
#[test]
fn job_queue_size_is_bounded_wherever_it_is_given() {
    let max = kiln_server::properties::MAX_JOB_QUEUE_SIZE;
    assert_eq!(parse(&format!("job_queue_size={max}")).job_queue_size, max);
    for bad in ["0", "-3", "abc", "4294967296", "18446744073709551615"] {
        assert_eq!(
            parse_err(&format!("job_queue_size={bad}")),
            format!("{FILE}:1: job_queue_size = '{bad}' is not a whole number from 1 to {max}"),
        );
        for var in ["SERVING_JOB_QUEUE_SIZE", "MAX_CONCURRENT_REQUESTS"] {
            let e = parse_err_env("", &[(var, bad)]);
            assert!(
                e.contains(var) && e.contains(&format!("from 1 to {max}")),
                "{var}: {e}"
            );
        }
    }
}

/// Issue 21, point 5: the keys DJL's configuration builder writes are
/// known, and speculative decoding is refused rather than ignored.
#[test]
fn djl_builder_keys_and_speculative_decoding() {
    let p = parse(
        "option.enable_reasoning=true\noption.reasoning_parser=deepseek_r1\n\
         option.sessions_path=/tmp/djl_sessions\noption.max_sessions_per_client=5\n\
         option.prefill_first_token=true\n",
    );
    assert!(p.chat.reasoning_parser.is_some());
    assert_eq!(p.chat.sessions.max_per_client, 5);
    assert!(p.prefill_first_token);
    assert!(!has_warning(&p, "unknown key"), "{:?}", p.warnings);
    assert!(has_warning(&p, "option.sessions_path"), "{:?}", p.warnings);
    let p = parse("option.enable_reasoning=false\noption.reasoning_parser=qwen3\n");
    assert!(
        p.chat.reasoning_parser.is_some(),
        "the parser decides, as in DJL's vLLM handler"
    );
    assert!(!parse("").prefill_first_token);
    let e = parse_err("option.enable_reasoning=true\n");
    assert!(e.contains("needs option.reasoning_parser"), "{e}");
    let e = parse_err("option.speculative_config={\"num_speculative_tokens\": 5}\n");
    assert!(
        e.contains("option.speculative_config") && e.contains("needs a \"method\""),
        "{e}"
    );
    let e =
        parse_err("option.speculative_config={\"model\": \"m\", \"num_speculative_tokens\": 5}\n");
    assert!(
        e.contains("draft model 'm', which is not a local file or directory"),
        "{e}"
    );
    // DJL's spelling, and vLLM's, with a local draft (relative paths start
    // at the model directory; here an absolute one).
    let dir = env!("CARGO_MANIFEST_DIR");
    let p = parse(&format!(
        "option.speculative_draft_model={dir}\noption.speculative_length=3\n"
    ));
    let want = kiln_engine::SpecConfig {
        method: kiln_engine::SpecMethod::DraftModel {
            model: dir.to_string(),
        },
        num_speculative_tokens: 3,
    };
    assert_eq!(p.speculative.as_ref(), Some(&want));
    assert!(
        !has_warning(&p, "option.speculative_draft_model"),
        "{:?}",
        p.warnings
    );
    let p = parse(&format!(
        "option.speculative_config={{\"model\": \"{dir}\", \"num_speculative_tokens\": 3}}\n"
    ));
    assert_eq!(p.speculative, Some(want));
    let e = parse_err(&format!(
        "option.speculative_draft_model={dir}\noption.speculative_config={{\"method\": \"ngram\", \"num_speculative_tokens\": 3}}\n"
    ));
    assert!(e.contains("both ask for speculative decoding"), "{e}");
    let p = parse("option.speculative_length=3\n");
    assert_eq!(p.speculative, None);
    assert!(
        has_warning(&p, "option.speculative_length") && has_warning(&p, "ignored"),
        "{:?}",
        p.warnings
    );
    // vLLM's n-gram prompt lookup is served.
    let p = parse(
        "option.speculative_config={\"method\": \"ngram\", \"num_speculative_tokens\": 4, \"prompt_lookup_max\": 3}\n",
    );
    assert_eq!(p.speculative, Some(kiln_engine::SpecConfig::ngram(4, 3, 3)));
    assert_eq!(parse("").speculative, None);
    let e = parse_err("option.max_sessions_per_client=0\n");
    assert!(e.contains("from 1 to 100000"), "{e}");
}

#[test]
fn n_positions_and_max_model_len() {
    assert_eq!(parse("option.n_positions=512").max_model_len, Some(512));
    let p = parse("option.n_positions=512\noption.max_model_len=1024");
    assert_eq!(p.max_model_len, Some(1024));
    assert!(has_warning(&p, "used instead of option.n_positions=512"));
    assert!(parse("option.n_positions=512\noption.max_model_len=512")
        .warnings
        .is_empty());
}

#[test]
fn streaming_values() {
    for (value, s) in [
        ("true", Streaming::True),
        ("false", Streaming::False),
        ("huggingface", Streaming::HuggingFace),
        ("True", Streaming::True),
    ] {
        let p = parse(&format!("option.enable_streaming={value}"));
        assert_eq!(p.enable_streaming, s);
        assert!(has_warning(&p, "deprecated in DJL"));
    }
    assert!(parse_err("option.enable_streaming=yes")
        .ends_with("is not one of true, false, huggingface"));
}

#[test]
fn output_formatter_values() {
    for (value, f) in [
        ("json", OutputFormatter::Json),
        ("jsonlines", OutputFormatter::JsonLines),
        ("sse", OutputFormatter::Sse),
    ] {
        let p = parse(&format!("option.output_formatter={value}"));
        assert_eq!(p.output_formatter, Some(f));
        assert_eq!(p.output_formatter_for(true), f);
        assert_eq!(p.output_formatter_for(false), f);
    }
    let p = parse("");
    assert_eq!(p.output_formatter_for(false), OutputFormatter::Json);
    assert_eq!(p.output_formatter_for(true), OutputFormatter::JsonLines);
    assert_eq!(OutputFormatter::Sse.content_type(), "text/event-stream");

    // DJL formatters kiln does not have: the default, with a warning.
    let p = parse("option.output_formatter=3p");
    assert_eq!(p.output_formatter, None);
    assert!(has_warning(
        &p,
        "kiln does not implement this DJL formatter"
    ));

    assert!(parse_err("option.output_formatter=my_formatter")
        .contains("option.output_formatter = 'my_formatter' is not one of json, jsonlines, sse"));
}

#[test]
fn engine_values() {
    assert_eq!(parse("engine=Python").engine, Engine::Python);
    assert!(parse("engine=Python").warnings.is_empty());
    let p = parse("engine=MPI");
    assert_eq!(p.engine, Engine::Mpi);
    assert!(has_warning(
        &p,
        "engine=MPI: kiln runs one engine per model on one device"
    ));
    assert_eq!(parse("engine=DeepSpeed").engine, Engine::DeepSpeed);
    let p = parse("engine=PyTorch");
    assert_eq!(p.engine, Engine::Other("PyTorch".into()));
    assert!(has_warning(&p, "not an LMI engine"));
}

#[test]
fn tensor_parallel_degree_values() {
    let p = parse("option.tensor_parallel_degree=max");
    assert_eq!(p.tensor_parallel_degree, Some(TensorParallelDegree::Max));
    assert!(p.warnings.is_empty());
    assert_eq!(
        parse("option.tensor_parallel_degree=-1").tensor_parallel_degree,
        Some(TensorParallelDegree::Max)
    );
    let p = parse("option.tensor_parallel_degree=1");
    assert_eq!(
        p.tensor_parallel_degree,
        Some(TensorParallelDegree::Degree(1))
    );
    assert!(p.warnings.is_empty());
    assert!(parse_err("option.tensor_parallel_degree=0").ends_with(
        "option.tensor_parallel_degree = '0' is not max or a whole number of at least 1"
    ));
    assert!(has_warning(
        &parse("option.pipeline_parallel_degree=2"),
        "not split into stages"
    ));
}

#[test]
fn booleans() {
    for (value, expected) in [
        ("true", true),
        ("TRUE", true),
        ("false", false),
        ("0", false),
    ] {
        assert_eq!(
            parse(&format!("option.trust_remote_code={value}")).trust_remote_code,
            expected
        );
    }
    assert!(has_warning(
        &parse("option.trust_remote_code=true"),
        "kiln never runs code from the model"
    ));
    assert!(parse_err("option.trust_remote_code=maybe")
        .ends_with("option.trust_remote_code = 'maybe' is not true or false"));
}

#[test]
fn workers() {
    let p = parse("minWorkers=1\nmaxWorkers=1");
    assert_eq!((p.min_workers, p.max_workers), (1, 1));
    assert!(p.warnings.is_empty());
    let p = parse("minWorkers=2\nmaxWorkers=4");
    assert_eq!((p.min_workers, p.max_workers), (2, 4));
    assert!(has_warning(
        &p,
        "minWorkers=2: kiln runs one engine per model"
    ));
    assert!(has_warning(
        &p,
        "maxWorkers=4: kiln runs one engine per model"
    ));
    assert_eq!(parse("minWorkers=3").max_workers, 3);
    assert_eq!(parse("maxWorkers=-1").max_workers, 1);
    assert_eq!(parse("minWorkers=0").min_workers, 0);
    assert!(parse_err("minWorkers=4\nmaxWorkers=2")
        .ends_with("minWorkers = '4' is more than maxWorkers = 2"));
    assert!(parse_err("maxWorkers=0")
        .ends_with("maxWorkers = '0' is not -1 or a whole number of at least 1"));
    assert!(parse_err("minWorkers=x")
        .ends_with("minWorkers = 'x' is not -1 or a whole number of at least 0"));
}

#[test]
fn static_batching_is_accepted_and_explained() {
    let p = parse("batch_size=1");
    assert!(p.warnings.is_empty());
    let p = parse("max_dynamic_batch_size=8");
    assert_eq!(p.batch_size, 8);
    assert!(has_warning(&p, "static batching is not needed"));
    assert_eq!(
        parse("max_dynamic_batch_size=8\nbatch_size=2").batch_size,
        2
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = parse_err("option.dtype=fp8\nok=1\njob_queue_size=none\n");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].starts_with(&format!("{FILE}:1: option.dtype")));
    assert!(lines[1].starts_with(&format!("{FILE}:3: job_queue_size")));
    let Err(PropertiesError::Invalid { problems }) =
        ModelProperties::parse("option.dtype=fp8", Path::new(FILE), &no_env)
    else {
        panic!("expected Invalid");
    };
    assert_eq!(problems[0].key, "option.dtype");
    assert_eq!(
        problems[0].origin,
        Origin::File {
            path: PathBuf::from(FILE),
            line: 1
        }
    );
}

#[test]
fn unknown_keys_are_warned_by_name_and_line() {
    let p =
        parse("option.dtype=fp16\noption.frobnicate=1\noption.dtpye=fp16\nrolling_batch=auto\n");
    assert!(p.warnings.contains(&format!(
        "{FILE}:2: unknown key 'option.frobnicate' is ignored"
    )));
    assert!(p.warnings.contains(&format!(
        "{FILE}:3: unknown key 'option.dtpye' is ignored (did you mean option.dtype?)"
    )));
    assert!(p.warnings.contains(&format!(
        "{FILE}:4: unknown key 'rolling_batch' is ignored (did you mean option.rolling_batch?)"
    )));
    // Unknown keys are still shown as set.
    assert_eq!(p.get("option.frobnicate"), Some("1"));
}

#[test]
fn known_but_ignored_keys_say_what_kiln_does() {
    let p = parse("option.load_in_8bit=true\noption.neuron_optimize_level=2\nmax_idle_time=60\noption.enable_venv=true");
    assert!(has_warning(
        &p,
        &format!("{FILE}:1: option.load_in_8bit is ignored: kiln reads no bitsandbytes settings; use option.quantize=q8_0")
    ));
    assert!(has_warning(
        &p,
        &format!("{FILE}:2: option.neuron_optimize_level is ignored: this is an AWS Neuron")
    ));
    assert!(has_warning(
        &p,
        &format!("{FILE}:3: max_idle_time is ignored: kiln runs one engine per model")
    ));
    assert!(has_warning(
        &p,
        &format!("{FILE}:4: option.enable_venv is ignored: kiln runs no Python")
    ));
}

#[test]
fn a_key_set_twice_takes_the_later_value() {
    let p = parse("option.dtype=fp16\noption.dtype=bf16");
    assert_eq!(p.dtype, Dtype::Bf16);
    assert!(has_warning(
        &p,
        &format!("{FILE}:2: option.dtype is set again; this value replaces the one from {FILE}:1")
    ));
    assert_eq!(p.raw.len(), 1);
}

#[test]
fn continuation_lines_and_escapes() {
    let text = "option.model_id=/opt/ml/\\\n    models/\\\n    opt\\u002D13b\n\
                option.dtype = \\\n  fp16\n\
                option.revision\\\n=main\n";
    let p = parse(text);
    assert_eq!(
        p.model_source,
        ModelSource::LocalPath(PathBuf::from("/opt/ml/models/opt-13b"))
    );
    assert_eq!(p.dtype, Dtype::F16);
    assert_eq!(p.revision.as_deref(), Some("main"));
    let origin = &p.raw.entry("option.dtype").expect("set").origin;
    assert_eq!(
        origin,
        &Origin::File {
            path: PathBuf::from(FILE),
            line: 4
        }
    );
    assert!(has_warning(
        &p,
        "option.revision=main: only applies to a Hugging Face model id"
    ));
}

#[test]
fn syntax_errors_name_file_and_line() {
    let err = parse_err("option.dtype=fp16\noption.model_id=\\u00zz");
    assert_eq!(err, format!("{FILE}:2: malformed \\uXXXX escape"));
}

#[test]
fn comments_separators_and_whitespace() {
    let p = parse(
        "# comment\n! also a comment\n\n   option.dtype   :   bf16   \n\
         option.rolling_batch vllm\njob_queue_size=\t 12 \t\n",
    );
    assert_eq!(p.dtype, Dtype::Bf16);
    assert_eq!(p.rolling_batch, RollingBatch::Vllm);
    assert_eq!(p.job_queue_size, 12);
}

// --- Environment ----------------------------------------------------------

#[test]
fn file_wins_over_option_env_as_in_djl() {
    let p = parse_env(
        "option.max_rolling_batch_size=32\n",
        &[("OPTION_MAX_ROLLING_BATCH_SIZE", "8")],
    );
    assert_eq!(p.max_rolling_batch_size, 32);
    assert!(p.warnings.contains(&format!(
        "environment variable OPTION_MAX_ROLLING_BATCH_SIZE=8 is not used: {FILE}:1 sets \
         option.max_rolling_batch_size=32 (serving.properties wins over the environment, as in DJL Serving)"
    )));
}

#[test]
fn option_env_fills_keys_the_file_does_not_set() {
    let p = parse_env(
        "option.dtype=fp16\n",
        &[
            ("OPTION_MAX_ROLLING_BATCH_SIZE", "8"),
            ("OPTION_ROLLING_BATCH", "lmi-dist"),
            ("OPTION_ENTRYPOINT", "djl_python.huggingface"),
            ("OPTION_ENGINE", "MPI"),
            ("OPTION_DTYPE", "fp16"),
            ("SERVING_JOB_QUEUE_SIZE", "7"),
            ("OPTION_N_POSITIONS", ""),
        ],
    );
    assert_eq!(p.max_rolling_batch_size, 8);
    assert_eq!(p.rolling_batch, RollingBatch::LmiDist);
    assert_eq!(p.entry_point.as_deref(), Some("djl_python.huggingface"));
    assert_eq!(p.engine, Engine::Mpi);
    assert_eq!(p.job_queue_size, 7);
    assert_eq!(p.max_model_len, None, "empty values are ignored");
    // The same value in both places is not worth a warning.
    assert!(!has_warning(&p, "OPTION_DTYPE"));
    let origin = &p
        .raw
        .entry("option.max_rolling_batch_size")
        .expect("set")
        .origin;
    assert_eq!(
        origin,
        &Origin::Env {
            var: "OPTION_MAX_ROLLING_BATCH_SIZE".into()
        }
    );
    assert!(has_warning(
        &p,
        "environment variable OPTION_ENTRYPOINT: option.entryPoint=djl_python.huggingface"
    ));
}

#[test]
fn env_values_are_validated_and_name_the_variable() {
    assert_eq!(
        parse_err_env("", &[("OPTION_DTYPE", "fp8")]),
        "environment variable OPTION_DTYPE: option.dtype = 'fp8' is not one of auto, fp32, fp16, bf16"
    );
    assert_eq!(
        parse_err_env("", &[("MAX_BATCH_SIZE", "lots")]),
        "environment variable MAX_BATCH_SIZE: option.max_rolling_batch_size = 'lots' is not a whole number of at least 1"
    );
}

#[test]
fn lmi_aliases_come_after_option_variables() {
    let p = parse_env(
        "",
        &[
            ("MAX_BATCH_SIZE", "16"),
            ("MAX_CONCURRENT_REQUESTS", "50"),
            ("MAX_BATCH_PREFILL_TOKENS", "2048"),
            ("HF_MODEL_TRUST_REMOTE_CODE", "true"),
            ("TENSOR_PARALLEL_DEGREE", "max"),
        ],
    );
    assert_eq!(p.max_rolling_batch_size, 16);
    assert_eq!(p.job_queue_size, 50);
    assert_eq!(p.max_rolling_batch_prefill_tokens, Some(2048));
    assert!(p.trust_remote_code);
    assert_eq!(p.tensor_parallel_degree, Some(TensorParallelDegree::Max));

    let p = parse_env(
        "",
        &[
            ("MAX_BATCH_SIZE", "16"),
            ("OPTION_MAX_ROLLING_BATCH_SIZE", "4"),
        ],
    );
    assert_eq!(p.max_rolling_batch_size, 4);
    let p = parse_env("", &[("SM_NUM_GPUS", "4"), ("TENSOR_PARALLEL_DEGREE", "1")]);
    assert_eq!(
        p.tensor_parallel_degree,
        Some(TensorParallelDegree::Degree(1))
    );
}

#[test]
fn sagemaker_variables_override_the_file_as_in_djl() {
    let p = parse_env(
        "option.model_loading_timeout=1500\n",
        &[
            ("SAGEMAKER_STARTUP_TIMEOUT", "600"),
            ("SAGEMAKER_NUM_MODEL_WORKERS", "1"),
        ],
    );
    assert_eq!(p.model_loading_timeout, Duration::from_secs(600));
    assert_eq!((p.min_workers, p.max_workers), (1, 1));
    assert!(has_warning(
        &p,
        "SAGEMAKER_STARTUP_TIMEOUT=600 replaces option.model_loading_timeout=1500"
    ));
}

#[test]
fn timeout_defaults_come_from_the_environment() {
    let p = parse_env(
        "",
        &[("MODEL_LOADING_TIMEOUT", "99"), ("PREDICT_TIMEOUT", "5")],
    );
    assert_eq!(p.model_loading_timeout, Duration::from_secs(99));
    assert_eq!(p.predict_timeout, Duration::from_secs(5));
    let p = parse_env(
        "option.model_loading_timeout=7",
        &[("MODEL_LOADING_TIMEOUT", "99")],
    );
    assert_eq!(p.model_loading_timeout, Duration::from_secs(7));
}

#[test]
fn hf_model_id_builds_the_extra_model() {
    let env = env_of(&[
        ("HF_MODEL_ID", "facebook/opt-13b"),
        ("HF_REVISION", "abc123"),
        ("OPTION_MODEL_ID", "ignored/other"),
        ("OPTION_DTYPE", "bf16"),
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    let p = ModelProperties::from_hf_model_id(dir.path(), &env)
        .expect("valid")
        .expect("HF_MODEL_ID is set");
    assert_eq!(
        p.model_source,
        ModelSource::HuggingFace {
            id: "facebook/opt-13b".into(),
            revision: Some("abc123".into())
        }
    );
    assert_eq!(p.dtype, Dtype::Bf16);
    assert!(has_warning(&p, "OPTION_MODEL_ID=ignored/other is not used"));
    assert_eq!(
        p.resolve().expect("remote"),
        ModelLocation::Remote(Source::Hub {
            repo: "facebook/opt-13b".into(),
            revision: Some("abc123".into())
        })
    );

    assert!(ModelProperties::from_hf_model_id(dir.path(), &no_env)
        .expect("ok")
        .is_none());
    assert!(
        ModelProperties::from_hf_model_id(dir.path(), &env_of(&[("HF_MODEL_ID", "")]))
            .expect("ok")
            .is_none()
    );
}

#[test]
fn hf_model_id_does_not_touch_store_models() {
    let p = parse_env("option.dtype=fp16", &[("HF_MODEL_ID", "facebook/opt-13b")]);
    assert_eq!(p.model_source, ModelSource::InDirectory);
}

// --- option.model_id ------------------------------------------------------

#[test]
fn model_id_classification_and_resolution() {
    let store = tempfile::tempdir().expect("tempdir");
    let model_dir = store.path().join("m");
    std::fs::create_dir_all(model_dir.join("weights/opt")).expect("mkdir");
    let file = model_dir.join("serving.properties");
    let load = |model_id: &str| {
        ModelProperties::parse(&format!("option.model_id={model_id}"), &file, &no_env)
    };

    // Relative paths start at the model directory, even when shaped like an id.
    let p = load("weights/opt").expect("valid");
    assert_eq!(
        p.model_source,
        ModelSource::LocalPath(model_dir.join("weights/opt"))
    );
    assert_eq!(
        p.resolve().expect("exists"),
        ModelLocation::Local(model_dir.join("weights/opt"))
    );
    let p = load("./weights").expect("valid");
    assert_eq!(
        p.resolve().expect("exists"),
        ModelLocation::Local(model_dir.join("./weights"))
    );

    let abs = model_dir.join("weights").display().to_string();
    let p = load(&abs).expect("valid");
    assert_eq!(p.model_source, ModelSource::LocalPath(PathBuf::from(&abs)));
    let p = load(&format!("file://{abs}")).expect("valid");
    assert_eq!(
        p.resolve().expect("exists"),
        ModelLocation::Local(PathBuf::from(&abs))
    );

    let p = load("/no/such/dir").expect("valid");
    let err = p.resolve().expect_err("missing");
    assert_eq!(
        err.to_string(),
        format!(
            "{}:1: option.model_id = '/no/such/dir': /no/such/dir does not exist",
            file.display()
        )
    );

    let p = load("gpt2").expect("valid");
    assert_eq!(
        p.model_source,
        ModelSource::HuggingFace {
            id: "gpt2".into(),
            revision: None
        }
    );

    let p = load("s3://bucket/models/opt-13b/").expect("valid");
    assert_eq!(
        p.model_source,
        ModelSource::S3("s3://bucket/models/opt-13b/".into())
    );
    assert_eq!(
        p.resolve().expect("remote"),
        ModelLocation::Remote(Source::S3 {
            bucket: "bucket".into(),
            prefix: "models/opt-13b".into()
        })
    );
    // A bucket name S3 would refuse is an error naming the setting and the URL.
    let p = load("s3://Bad_Bucket/m").expect("classified");
    assert_eq!(
        p.resolve().expect_err("bad bucket").to_string(),
        format!(
            "{}:1: option.model_id = 's3://Bad_Bucket/m': s3://Bad_Bucket/m: the bucket name \
             must be 3-63 characters of a-z, 0-9, '.' and '-'",
            file.display()
        )
    );

    let p = load("").expect("valid");
    assert_eq!(p.model_source, ModelSource::InDirectory);
    assert_eq!(p.resolve().expect("dir"), ModelLocation::Local(model_dir));

    for (bad, why) in [
        ("djl://ai.djl.zoo/mlp", "is a DJL model zoo URL"),
        ("https://example.com/model", "is a https:// URL"),
        ("s3://", "is an S3 URL without a bucket"),
    ] {
        let err = load(bad).expect_err(bad).to_string();
        assert!(
            err.contains(&format!("option.model_id = '{bad}' {why}")),
            "{err}"
        );
    }
}

// --- Display --------------------------------------------------------------

#[test]
fn raw_properties_serialize_as_an_ordered_object() {
    let p = parse_env(
        "option.dtype=fp16\nbatch_size=1\n",
        &[("OPTION_ROLLING_BATCH", "auto")],
    );
    let json = serde_json::to_string(&p.raw).expect("serializes");
    assert_eq!(
        json,
        r#"{"option.dtype":"fp16","batch_size":"1","option.rolling_batch":"auto"}"#
    );
    let keys: Vec<&str> = p.raw.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["option.dtype", "batch_size", "option.rolling_batch"]);
}

#[test]
fn model_id_from_option_env_is_a_remote_source() {
    let p = parse_env("", &[("OPTION_MODEL_ID", "s3://bucket/opt")]);
    assert_eq!(
        p.resolve().expect("remote"),
        ModelLocation::Remote(Source::S3 {
            bucket: "bucket".into(),
            prefix: "opt".into()
        })
    );
}

#[test]
fn an_oversized_properties_file_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(dir.path().join("serving.properties")).unwrap();
    f.set_len(2 << 30).unwrap();
    let e = ModelProperties::load(dir.path(), &no_env).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("serving.properties") && msg.contains("1048576-byte limit"),
        "{msg}"
    );
}

/// Any file, mutated from real ones, parses to properties or an error naming
/// the problem, never a panic.
#[test]
fn mutated_properties_files_never_panic() {
    use kiln_model::fuzz::{cases, run};
    let seeds: Vec<Vec<u8>> = [
        "# OPT-13B on inf2\nengine=Python\noption.entryPoint=djl_python.transformers_neuronx\n\
         option.model_id=/models/opt\noption.tensor_parallel_degree=2\noption.n_positions=512\n\
         option.rolling_batch=auto\noption.dtype=fp16\noption.model_loading_timeout=1500\n\
         batch_size=4\nmax_batch_delay=100\n",
        "engine=Python\noption.max_rolling_batch_size=8\njob_queue_size=1\n\
         option.output_formatter=jsonlines\noption.max_model_len=2048\nminWorkers=1\nmaxWorkers=2\n\
         key\\:with\\=escapes = value \\\n  continued\n! comment\n\\u00e9t\\u00e9=summer\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let env = env_of(&[("SERVING_JOB_QUEUE_SIZE", "7"), ("OPTION_DTYPE", "bf16")]);
    let report = run(
        "serving.properties",
        &seeds,
        cases(5000),
        1 << 14,
        |bytes| {
            let text = String::from_utf8_lossy(bytes);
            let _ = kiln_server::properties::parse_properties(&text);
            ModelProperties::parse(&text, Path::new(FILE), &env).is_ok()
        },
    )
    // (Both seeds parse, which `run` checks; with the default cases and
    // seed 3886 of the 5000 mutations still do.)
    .and_then(|r| r.require_accepted("serving.properties", 0.2))
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("serving.properties: {report:?}");
}

/// gpt-oss's parsers by vLLM's names: `openai_gptoss` (reasoning) and
/// `openai` (tool calls, harmony).
#[test]
fn gpt_oss_parser_names_are_read() {
    use kiln_server::reasoning::ReasoningParser;
    let p = parse("option.reasoning_parser=openai_gptoss\noption.tool_call_parser=openai\noption.enable_auto_tool_choice=true\n");
    assert_eq!(p.chat.reasoning_parser, Some(ReasoningParser::GptOss));
    assert_eq!(
        p.chat.tool_call_parser.as_ref().map(|t| t.syntax()),
        Some(kiln_server::tool_parse::ToolSyntax::Harmony)
    );
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

/// Issue 13, point 6: the chat-side keys of DJL's vLLM handler
/// (`djl_python/properties_manager/vllm_rb_properties.py`).
#[test]
fn chat_keys_are_read_or_refused_by_name() {
    use kiln_server::reasoning::ReasoningParser;
    let p = parse("option.reasoning_parser=qwen3\noption.tool_call_parser=llama3_json\n");
    assert_eq!(p.chat.reasoning_parser, Some(ReasoningParser::Qwen3));
    assert_eq!(
        p.chat.tool_call_parser.as_ref().map(|t| t.as_str()),
        Some("llama3_json")
    );
    // The parser also shapes `required` and named tool choices, so it is
    // used without auto tool choice too (no warning).
    assert!(!p.chat.auto_tool_choice);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let p = parse("option.reasoning_parser=deepseek_r1\noption.enable_auto_tool_choice=false\noption.enable_stateful_sessions=false\n");
    assert_eq!(p.chat.reasoning_parser, Some(ReasoningParser::DeepSeekR1));
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    // Without the keys: nothing.
    assert_eq!(parse("").chat.reasoning_parser, None);

    let p = parse("option.enable_auto_tool_choice=true\noption.tool_call_parser=hermes\n");
    assert!(p.chat.auto_tool_choice);
    assert_eq!(
        p.chat.tool_call_parser.as_ref().map(|t| t.syntax()),
        Some(kiln_server::tool_parse::ToolSyntax::Hermes)
    );
    let e = parse_err("option.tool_call_parser=pythonic\n");
    assert!(
        e.contains("pythonic") && e.contains("does not implement") && e.contains("mistral"),
        "{e}"
    );
    let e = parse_err("option.tool_call_parser=hermes3\n");
    assert!(e.contains("hermes3") && e.contains("llama3_json"), "{e}");
    let e = parse_err("option.reasoning_parser=granite\n");
    assert!(
        e.contains("does not implement") && e.contains("qwen3, deepseek_r1"),
        "{e}"
    );
    let e = parse_err("option.reasoning_parser=thinky\n");
    assert!(e.contains("is not one of qwen3, deepseek_r1"), "{e}");
    // Sessions are on by default, as in DJL, for 20 minutes.
    assert!(parse("").chat.sessions.enabled);
    assert_eq!(parse("").chat.sessions.expiration_s, 1200);
    let p = parse("option.enable_stateful_sessions=false\noption.sessions_expiration=60\n");
    assert!(!p.chat.sessions.enabled);
    assert_eq!(p.chat.sessions.expiration_s, 60);
    let e = parse_err("option.enable_stateful_sessions=maybe\n");
    assert!(e.contains("true or false"), "{e}");
    let e = parse_err("option.sessions_expiration=0\n");
    assert!(e.contains("option.sessions_expiration"), "{e}");
    // DJL's static-batch streaming: rolling batch off and streaming on.
    for v in ["true", "huggingface"] {
        let p = parse(&format!(
            "option.rolling_batch=disable\noption.enable_streaming={v}\n"
        ));
        assert!(p.static_batch_streaming(), "{v}");
        let p = parse(&format!("option.enable_streaming={v}\n"));
        assert!(!p.static_batch_streaming(), "{v} with rolling batch");
    }
    let p = parse("option.rolling_batch=disable\noption.enable_streaming=false\n");
    assert_eq!(p.enable_streaming, Streaming::False);
    assert!(!p.static_batch_streaming());
}

#[test]
fn quantize_takes_kiln_formats_and_the_environment_form() {
    use kiln_backend::GgmlType;
    assert_eq!(parse("").quantize, None);
    for (value, ty) in [
        ("q8_0", GgmlType::Q8_0),
        ("Q4_K", GgmlType::Q4K),
        ("q4_k_m", GgmlType::Q4K),
        ("q4_0", GgmlType::Q4_0),
        ("q4_1", GgmlType::Q4_1),
        ("q6_k", GgmlType::Q6K),
    ] {
        let p = parse(&format!("option.quantize={value}"));
        assert_eq!(p.quantize, Some(ty), "{value}");
        assert!(p.warnings.is_empty(), "{value}: {:?}", p.warnings);
    }
    assert_eq!(
        parse_env("", &[("HF_MODEL_QUANTIZE", "q8_0")]).quantize,
        Some(GgmlType::Q8_0)
    );
}

#[test]
fn quantize_methods_kiln_cannot_run_are_errors_naming_what_it_can() {
    let awq = parse_err("option.quantize=awq\n");
    assert_eq!(
        awq,
        "models/opt13b/serving.properties:1: option.quantize = 'awq' is a quantization method of \
         DJL's Python engines, which kiln cannot run; kiln quantizes 16/32-bit weights while \
         loading, to one of q8_0, q4_0, q4_1, q4_k, q6_k"
    );
    for v in ["gptq", "fp8", "bitsandbytes8", "smoothquant"] {
        assert!(
            parse_err(&format!("option.quantize={v}")).contains("DJL's Python engines"),
            "{v}"
        );
    }
    assert!(parse_err("option.quantize=int3")
        .contains("option.quantize = 'int3' is not one of q8_0, q4_0, q4_1, q4_k, q6_k"));
}

/// `option.kv_cache_dtype` in vLLM's key: kiln's types are taken, vLLM's
/// fp8 spellings are refused naming q8_0, kiln's 8-bit cache, and unset
/// leaves the server's `--kv-cache-dtype`.
#[test]
fn kv_cache_dtype_takes_kilns_types_and_refuses_fp8_by_name() {
    use kiln_backend::KvDtype;
    for (v, d) in [
        ("q8_0", KvDtype::Q8_0),
        ("auto", KvDtype::Auto),
        ("float16", KvDtype::F16),
        ("f32", KvDtype::F32),
    ] {
        assert_eq!(
            parse(&format!("option.kv_cache_dtype={v}\n")).kv_cache_dtype,
            Some(d)
        );
    }
    assert_eq!(parse("option.dtype=fp16\n").kv_cache_dtype, None);
    let e = parse_err("option.kv_cache_dtype=fp8_e4m3\n");
    assert!(
        e.contains(
            "models/opt13b/serving.properties:1: option.kv_cache_dtype = 'fp8_e4m3' is refused: \
             kv_cache_dtype \"fp8_e4m3\" is not supported by kiln"
        ) && e.contains("kiln's 8-bit cache is q8_0"),
        "{e}"
    );
    let e = parse_err("option.kv_cache_dtype=int4\n");
    assert!(
        e.contains("expected auto, f16 (float16), f32 (float32) or q8_0"),
        "{e}"
    );
}

/// `option.kv_cache_memory_bytes` in vLLM's key and spelling sets the
/// model's KV cache size; a value that is not a byte count is refused
/// saying how to write one; `option.gpu_memory_utilization` is ignored
/// with a warning that names the settings kiln sizes the cache from.
#[test]
fn kv_cache_memory_bytes_reads_vllms_byte_counts() {
    for (v, b) in [("4G", 4u64 << 30), ("25.6k", 25_600), ("1048576", 1 << 20)] {
        assert_eq!(
            parse(&format!("option.kv_cache_memory_bytes={v}\n")).kv_cache_memory_bytes,
            Some(b),
            "{v}"
        );
    }
    assert_eq!(parse("option.dtype=fp16\n").kv_cache_memory_bytes, None);
    let e = parse_err("option.kv_cache_memory_bytes=4 GB\n");
    assert!(
        e.contains("models/opt13b/serving.properties:1: option.kv_cache_memory_bytes = '4 GB' is refused: '4 GB' is not a byte count")
            && e.contains("K/M/G/T (powers of 1024, e.g. 4G)"),
        "{e}"
    );
    let p = parse("option.gpu_memory_utilization=0.9\n");
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("option.gpu_memory_utilization is ignored")
                && w.contains("option.kv_cache_memory_bytes")
                && w.contains("VLLM_CPU_KVCACHE_SPACE")),
        "{:?}",
        p.warnings
    );
}
