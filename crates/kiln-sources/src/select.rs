//! Which of a repository's files a model needs: its config, tokenizer,
//! generation config and chat template, and one set of weights (safetensors
//! before PyTorch `.bin`, GGUF only when neither is there). READMEs, images,
//! other formats' copies and subdirectories (Llama's `original/`) are left.

/// Small files used when present.
const SMALL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// The subset of `names` (paths relative to the model's root) to download,
/// or `None` when there are no weights among them.
pub(crate) fn model_files(names: &[String]) -> Option<Vec<String>> {
    let top: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !n.contains('/'))
        .collect();
    let ends = |suffix: &'static str| move |n: &&str| n.ends_with(suffix);
    let safetensors: Vec<&str> = top.iter().copied().filter(ends(".safetensors")).collect();
    let bins: Vec<&str> = top
        .iter()
        .copied()
        .filter(|n| n.starts_with("pytorch_model") && n.ends_with(".bin"))
        .collect();
    let ggufs: Vec<&str> = top.iter().copied().filter(ends(".gguf")).collect();
    let mut out: Vec<String> = top
        .iter()
        .filter(|n| SMALL_FILES.contains(n))
        .map(|n| n.to_string())
        .collect();
    if !safetensors.is_empty() {
        out.extend(safetensors.iter().map(|n| n.to_string()));
        if top.contains(&"model.safetensors.index.json") {
            out.push("model.safetensors.index.json".into());
        }
    } else if !bins.is_empty() {
        out.extend(bins.iter().map(|n| n.to_string()));
        if top.contains(&"pytorch_model.bin.index.json") {
            out.push("pytorch_model.bin.index.json".into());
        }
    } else if !ggufs.is_empty() {
        out.extend(ggufs.iter().map(|n| n.to_string()));
    } else {
        return None;
    }
    out.sort();
    out.dedup();
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn safetensors_win_and_extras_are_left() {
        let got = model_files(&names(&[
            "README.md",
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "original/consolidated.00.pth",
            "tokenizer.json",
            "onnx/model.onnx",
            "chat_template.jinja",
        ]))
        .unwrap();
        assert_eq!(
            got,
            names(&[
                "chat_template.jinja",
                "config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "tokenizer.json",
            ])
        );
    }

    #[test]
    fn bin_when_no_safetensors_then_gguf() {
        let got = model_files(&names(&[
            "config.json",
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json",
            "training_args.bin",
        ]))
        .unwrap();
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(!got.contains(&"training_args.bin".to_string()));
        assert_eq!(
            model_files(&names(&["m.Q4_1.gguf", "README.md"])).unwrap(),
            names(&["m.Q4_1.gguf"])
        );
    }

    #[test]
    fn no_weights_is_none() {
        assert_eq!(model_files(&names(&["config.json", "README.md"])), None);
        assert_eq!(model_files(&[]), None);
    }
}
