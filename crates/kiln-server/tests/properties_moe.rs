//! Issue 23, point 6: the `serving.properties` keys that DJL's LMI documents
//! for mixture-of-experts, gpt-oss and Gemma deployments (the vLLM user
//! guide's sample configurations and its table of LMI/vLLM aliases, the
//! tool-calling guide, and vLLM's parser names for these models) are each
//! used, accepted with a warning that says what kiln does instead, or
//! refused with an error naming the key and why: none is an "unknown key".

use std::collections::HashMap;
use std::path::Path;

use kiln_server::properties::{ModelProperties, TensorParallelDegree};

const FILE: &str = "models/moe/serving.properties";

fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name: &str| map.get(name).cloned()
}

fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<ModelProperties, String> {
    ModelProperties::parse(text, Path::new(FILE), &env_of(vars)).map_err(|e| e.to_string())
}

fn parse(text: &str) -> ModelProperties {
    parse_env(text, &[]).unwrap_or_else(|e| panic!("unexpected error: {e}"))
}

fn parse_err(text: &str) -> String {
    match parse_env(text, &[]) {
        Ok(p) => panic!("expected an error, got {p:?}"),
        Err(e) => e,
    }
}

fn warning<'a>(p: &'a ModelProperties, needle: &str) -> &'a str {
    p.warnings
        .iter()
        .find(|w| w.contains(needle))
        .unwrap_or_else(|| panic!("no warning with '{needle}' in {:?}", p.warnings))
}

fn no_unknown_keys(p: &ModelProperties) {
    assert!(
        !p.warnings.iter().any(|w| w.contains("unknown key")),
        "{:?}",
        p.warnings
    );
}

/// The vLLM user guide's MiniMax-M2 (mixture of experts) configuration, as
/// the environment variables it lists.
#[test]
fn lmi_moe_sample_configuration_is_accepted() {
    let p = parse_env(
        "option.model_id=MiniMaxAI/MiniMax-M2\n",
        &[
            ("OPTION_TENSOR_PARALLEL_DEGREE", "max"),
            ("OPTION_ENABLE_EXPERT_PARALLEL", "true"),
            ("OPTION_MAX_ROLLING_BATCH_SIZE", "128"),
            ("OPTION_MAX_MODEL_LEN", "16384"),
            ("OPTION_GPU_MEMORY_UTILIZATION", "0.9"),
        ],
    )
    .unwrap();
    no_unknown_keys(&p);
    assert_eq!(p.tensor_parallel_degree, Some(TensorParallelDegree::Max));
    assert_eq!(p.max_rolling_batch_size, 128);
    assert_eq!(p.max_model_len, Some(16384));
    let w = warning(&p, "option.enable_expert_parallel is ignored");
    assert!(w.contains("OPTION_ENABLE_EXPERT_PARALLEL"), "{w}");
    assert!(w.contains("all its experts"), "{w}");
}

/// vLLM's other expert-parallel settings (its expert-parallel deployment
/// guide) say the same, from the file too.
#[test]
fn expert_parallel_settings_say_why_they_do_nothing() {
    let p = parse(
        "option.enable_expert_parallel=true\noption.enable_eplb=true\n\
         option.num_redundant_experts=32\noption.data_parallel_size=8\n\
         option.expert_placement_strategy=round_robin\noption.eplb_config={\"window_size\": 1000}\n",
    );
    no_unknown_keys(&p);
    for key in [
        "option.enable_expert_parallel",
        "option.enable_eplb",
        "option.num_redundant_experts",
        "option.data_parallel_size",
        "option.expert_placement_strategy",
        "option.eplb_config",
    ] {
        let w = warning(&p, &format!("{key} is ignored"));
        assert!(w.contains("one device") && w.contains(FILE), "{w}");
    }
}

/// The guide's gpt-oss-20b and Qwen3-Coder-30B-A3B configurations (with
/// LoRA adapters: read; `long_lora_scaling_factors` ignored, said so by name).
#[test]
fn lmi_gpt_oss_and_qwen3_moe_sample_configurations_are_accepted() {
    for model in ["openai/gpt-oss-20b", "Qwen/Qwen3-Coder-30B-A3B-Instruct"] {
        let p = parse(&format!(
            "option.model_id={model}\noption.tensor_parallel_degree=max\n\
             option.enable_lora=True\noption.max_loras=2\noption.max_lora_rank=64\n\
             option.long_lora_scaling_factors=4.0\noption.gpu_memory_utilization=0.9\n\
             option.max_model_len=16384\n"
        ));
        no_unknown_keys(&p);
        assert_eq!(p.max_model_len, Some(16384));
        assert_eq!(
            p.lora,
            Some(kiln_engine::AdapterLimits {
                max_loras: 2,
                max_lora_rank: 64,
                max_cpu_loras: 2,
            })
        );
        assert!(warning(&p, "option.long_lora_scaling_factors is ignored")
            .contains("does not support this yet"));
        warning(&p, "option.gpu_memory_utilization is ignored");
    }
    // The guide's EAGLE3 configuration for gpt-oss-20b: refused by name.
    let e = parse_env(
        "option.model_id=openai/gpt-oss-20b\n",
        &[(
            "OPTION_SPECULATIVE_CONFIG",
            r#"{"method": "eagle3", "model": "x", "num_speculative_tokens": 4}"#,
        )],
    )
    .unwrap_err();
    assert!(
        e.contains("OPTION_SPECULATIVE_CONFIG") && e.contains("speculative decoding"),
        "{e}"
    );
}

/// Gemma 3 checkpoints above 1B are image-text models; the guide's
/// multimodal setting is accepted and explained, the offload one too.
#[test]
fn multimodal_and_offload_settings_say_why_they_do_nothing() {
    let p = parse(
        "option.limit_mm_per_prompt={\"image\": 4, \"video\": 0}\noption.cpu_offload_gb_per_gpu=4\n\
         option.cpu_offload_gb=4\noption.lora_extra_vocab_size=256\n",
    );
    no_unknown_keys(&p);
    assert!(warning(&p, "option.limit_mm_per_prompt is ignored").contains("text generation only"));
    for key in ["option.cpu_offload_gb_per_gpu", "option.cpu_offload_gb"] {
        assert!(warning(&p, &format!("{key} is ignored")).contains("does not offload"));
    }
    warning(&p, "option.lora_extra_vocab_size is ignored");
}

/// The guide's table of aliases: `option.quantization` is
/// `option.quantize`, from the file or as OPTION_QUANTIZATION.
#[test]
fn quantization_is_an_alias_of_quantize() {
    use kiln_backend::GgmlType;
    let p = parse("option.quantization=q8_0\n");
    assert_eq!(p.quantize, Some(GgmlType::Q8_0));
    no_unknown_keys(&p);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let p = parse_env("", &[("OPTION_QUANTIZATION", "q4_k_m")]).unwrap();
    assert_eq!(p.quantize, Some(GgmlType::Q4K));
    // Both: option.quantize wins, and the other is reported.
    let p = parse("option.quantize=q4_0\noption.quantization=q8_0\n");
    assert_eq!(p.quantize, Some(GgmlType::Q4_0));
    let w = warning(&p, "option.quantization=q8_0");
    assert!(
        w.contains("option.quantize=q4_0") && w.contains("wins"),
        "{w}"
    );
    // The same value twice says nothing.
    assert!(parse("option.quantize=q8_0\noption.quantization=Q8_0\n")
        .warnings
        .is_empty());
    // A bad value names the key it came from.
    let e = parse_err("option.quantization=awq\n");
    assert!(
        e.contains("option.quantization = 'awq'") && e.contains("DJL's Python engines"),
        "{e}"
    );
    let e = parse_err("option.quantization=q9\n");
    assert!(
        e.contains("option.quantization = 'q9'") && e.contains("q8_0"),
        "{e}"
    );
}

/// vLLM's `mxfp4`, which gpt-oss deployments pass: the checkpoint's own
/// format, so nothing is quantized while loading (or, should MXFP4 become a
/// format kiln quantizes to, that format).
#[test]
fn mxfp4_names_the_checkpoint_format() {
    for text in ["option.quantize=mxfp4\n", "option.quantization=MXFP4\n"] {
        let p = parse(text);
        match p.quantize {
            None => {
                let w = warning(&p, "option.quantiz");
                assert!(
                    w.to_ascii_lowercase().contains("=mxfp4")
                        && w.contains("stored in")
                        && w.contains("no weight is quantized"),
                    "{w}"
                );
            }
            Some(ty) => assert_eq!(kiln_model::names::format_name(ty), "mxfp4"),
        }
    }
}

/// The guide's table of aliases: `option.max_num_batched_tokens` is
/// `option.max_rolling_batch_prefill_tokens`.
#[test]
fn max_num_batched_tokens_is_an_alias_of_the_prefill_limit() {
    let p = parse("option.max_num_batched_tokens=8192\n");
    assert_eq!(p.max_rolling_batch_prefill_tokens, Some(8192));
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let p = parse_env("", &[("OPTION_MAX_NUM_BATCHED_TOKENS", "4096")]).unwrap();
    assert_eq!(p.max_rolling_batch_prefill_tokens, Some(4096));
    let p =
        parse("option.max_rolling_batch_prefill_tokens=2048\noption.max_num_batched_tokens=8192\n");
    assert_eq!(p.max_rolling_batch_prefill_tokens, Some(2048));
    let w = warning(&p, "option.max_num_batched_tokens=8192");
    assert!(w.contains("wins"), "{w}");
    let e = parse_err("option.max_num_batched_tokens=0\n");
    assert!(e.contains("option.max_num_batched_tokens = '0'"), "{e}");
}

/// The tool-calling guide's OPTION_CHAT_TEMPLATE: refused with the way to
/// give kiln another template.
#[test]
fn chat_template_is_refused_with_the_way_to_replace_it() {
    let e = parse_err("option.chat_template=/opt/ml/model/tool_chat_template.jinja\n");
    assert!(
        e.contains("option.chat_template") && e.contains("chat_template.jinja"),
        "{e}"
    );
    let e = parse_env("", &[("OPTION_CHAT_TEMPLATE", "/opt/template.jinja")]).unwrap_err();
    assert!(e.contains("OPTION_CHAT_TEMPLATE"), "{e}");
}

/// vLLM's parsers for these models: Qwen3-MoE's `qwen3` reasoning and
/// `hermes` tools, Mixtral's `mistral` tools, are used; gpt-oss's
/// `openai_gptoss` reasoning and `openai` tools are used once kiln
/// implements the harmony format, and until then refused as vLLM parsers
/// kiln does not implement (never "not one of").
#[test]
fn parsers_of_these_models() {
    use kiln_server::reasoning::ReasoningParser;
    use kiln_server::tool_parse::ToolSyntax;
    let p = parse(
        "option.reasoning_parser=qwen3\noption.enable_auto_tool_choice=true\n\
         option.tool_call_parser=hermes\n",
    );
    assert_eq!(p.chat.reasoning_parser, Some(ReasoningParser::Qwen3));
    assert_eq!(
        p.chat.tool_call_parser.as_ref().map(|t| t.syntax()),
        Some(ToolSyntax::Hermes)
    );
    let p = parse("option.enable_auto_tool_choice=true\noption.tool_call_parser=mistral\n");
    assert_eq!(
        p.chat.tool_call_parser.as_ref().map(|t| t.syntax()),
        Some(ToolSyntax::Mistral)
    );

    match parse_env("option.reasoning_parser=openai_gptoss\n", &[]) {
        Ok(p) => assert!(p.chat.reasoning_parser.is_some()),
        Err(e) => assert!(
            e.contains("openai_gptoss")
                && e.contains("vLLM reasoning parser that kiln does not implement"),
            "{e}"
        ),
    }
    match parse_env(
        "option.enable_auto_tool_choice=true\noption.tool_call_parser=openai\n",
        &[],
    ) {
        Ok(p) => assert_eq!(
            p.chat.tool_call_parser.as_ref().map(|t| t.as_str()),
            Some("openai")
        ),
        Err(e) => assert!(
            e.contains("'openai'")
                && e.contains("vLLM tool-call parser that kiln does not implement"),
            "{e}"
        ),
    }
}
