//! Whether a draft model setting (DJL's `option.speculative_draft_model`,
//! vLLM's `speculative_config` `model`) names the target model itself.
//!
//! A model drafting for itself measures speculation's overhead (every
//! guess is accepted). Loaded as a second model it would double the
//! weights' memory; recognised here, the engine runs the draft on the
//! target's own weights instead ([`kiln_engine::Engine::start_self_draft`]).

use std::path::Path;

/// Whether the draft at `draft` is the same weights as the target loaded
/// from `target`: both paths name the same file or directory once symbolic
/// links and relative parts are resolved, and the target is not quantized
/// at load (`target_quantized`; the draft is loaded as stored, so a target
/// quantized at load is different weights). A path that does not resolve
/// is not the target (loading it then reports the error).
pub fn is_target(draft: &str, target: &Path, target_quantized: bool) -> bool {
    if target_quantized {
        return false;
    }
    match (std::fs::canonicalize(draft), std::fs::canonicalize(target)) {
        (Ok(d), Ok(t)) => d == t,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_file_by_any_path_is_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"x").unwrap();
        let other = dir.path().join("n.gguf");
        std::fs::write(&other, b"x").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let dotted = dir.path().join("sub").join("..").join("m.gguf");
        let link = dir.path().join("link.gguf");
        std::os::unix::fs::symlink(&model, &link).unwrap();

        let s = |p: &Path| p.to_str().unwrap().to_string();
        assert!(is_target(&s(&model), &model, false));
        assert!(is_target(&s(&dotted), &model, false));
        assert!(is_target(&s(&link), &model, false));
        assert!(is_target(&s(dir.path()), dir.path(), false));
        // Another file, a missing one, and a target quantized at load.
        assert!(!is_target(&s(&other), &model, false));
        assert!(!is_target(&s(&dir.path().join("gone")), &model, false));
        assert!(!is_target(&s(&model), &model, true));
    }
}
