//! Bounded reads of the small files that come with a model (configs,
//! tokenizers, chat templates, shard indexes), so that an oversized or
//! endless file (a sparse 2 GB `config.json`, `/dev/zero`) is refused before
//! it is read, with an error naming the limit, instead of filling memory.

use std::io::Read;
use std::path::Path;

use crate::{ModelError, Result};

/// Largest `config.json`, `generation_config.json` or `tokenizer_config.json`.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Largest `tokenizer.json` (the largest real ones are a few tens of MB).
pub const MAX_TOKENIZER_BYTES: u64 = 128 << 20;
/// Largest `chat_template.jinja`.
pub const MAX_TEMPLATE_BYTES: u64 = 1 << 20;
/// Largest shard index (`*.index.json`).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Reads at most `limit` bytes of `path`; a longer file is an error that
/// names `what` and the limit, found before reading when the size is known.
pub fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let too_big = |size: String| ModelError::Format {
        path: path.to_path_buf(),
        msg: format!("{size}, more than the {limit}-byte limit for {what}"),
    };
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let meta = file.metadata().map_err(|e| ModelError::io(path, e))?;
    if meta.is_file() && meta.len() > limit {
        return Err(too_big(format!("the file is {} bytes", meta.len())));
    }
    let mut bytes = Vec::with_capacity(meta.len().min(limit) as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ModelError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_big("the file is larger".to_string()));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text_bounded(path: &Path, limit: u64, what: &str) -> Result<String> {
    String::from_utf8(read_bounded(path, limit, what)?).map_err(|e| ModelError::Format {
        path: path.to_path_buf(),
        msg: format!("{what} is not UTF-8 text: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_over_the_limit_is_refused_without_reading_it() {
        let dir = std::env::temp_dir().join(format!("kiln-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        let f = std::fs::File::create(&path).unwrap();
        // Sparse: 2 GB that take no disk and, refused, no memory.
        f.set_len(2 << 30).unwrap();
        let e = read_bounded(&path, MAX_CONFIG_BYTES, "a config.json").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("2147483648 bytes")
                && msg.contains("16777216-byte limit for a config.json"),
            "{msg}"
        );
        std::fs::write(&path, b"{}").unwrap();
        assert_eq!(read_text_bounded(&path, 2, "x").unwrap(), "{}");
        assert!(read_bounded(&path, 1, "x").is_err());
        // A device that never ends.
        if Path::new("/dev/zero").exists() {
            let e = read_bounded(Path::new("/dev/zero"), 1024, "a tokenizer.json").unwrap_err();
            assert!(e.to_string().contains("1024-byte limit"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
