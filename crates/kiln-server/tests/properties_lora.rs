//! `option.enable_lora` and its limits in `serving.properties`: defaults,
//! values, the limits without `enable_lora` (no effect, said so), and
//! `max_cpu_loras` below `max_loras` (an error, as in vLLM).

use std::path::Path;

use kiln_engine::AdapterLimits;
use kiln_server::properties::ModelProperties;

const FILE: &str = "/models/m/serving.properties";

fn parse(text: &str) -> Result<ModelProperties, String> {
    ModelProperties::parse(text, Path::new(FILE), &|_: &str| None).map_err(|e| e.to_string())
}

#[test]
fn lora_settings_are_read_with_vllm_defaults() {
    let p = parse("option.enable_lora=true\n").unwrap();
    assert_eq!(p.lora, Some(AdapterLimits::default()));
    assert_eq!(
        AdapterLimits::default(),
        AdapterLimits {
            max_loras: 4,
            max_lora_rank: 16,
            max_cpu_loras: 4
        }
    );
    let p = parse(
        "option.enable_lora=true\noption.max_loras=3\noption.max_lora_rank=64\noption.max_cpu_loras=8\n",
    )
    .unwrap();
    assert_eq!(
        p.lora,
        Some(AdapterLimits {
            max_loras: 3,
            max_lora_rank: 64,
            max_cpu_loras: 8
        })
    );
    // max_cpu_loras defaults to max_loras.
    let p = parse("option.enable_lora=true\noption.max_loras=6\n").unwrap();
    assert_eq!(p.lora.map(|l| l.max_cpu_loras), Some(6));
}

#[test]
fn lora_limits_without_enable_lora_have_no_effect_and_bad_values_are_errors() {
    let p = parse("option.max_loras=3\n").unwrap();
    assert_eq!(p.lora, None);
    assert!(
        p.warnings.iter().any(
            |w| w.contains("option.max_loras=3: has no effect without option.enable_lora=true")
        ),
        "{:?}",
        p.warnings
    );
    let e =
        parse("option.enable_lora=true\noption.max_loras=4\noption.max_cpu_loras=2\n").unwrap_err();
    assert!(e.contains("must be at least option.max_loras (4)"), "{e}");
    let e = parse("option.enable_lora=true\noption.max_lora_rank=1024\n").unwrap_err();
    assert!(e.contains("a whole number from 1 to 512"), "{e}");
    let e = parse("option.enable_lora=maybe\n").unwrap_err();
    assert!(e.contains("is not true or false"), "{e}");
}
