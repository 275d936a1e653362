//! Java's `.properties` text format, as `java.util.Properties.load` reads
//! it (DJL Serving reads `serving.properties` with it): entries, escapes,
//! continuation lines, and the file's encoding. Knows nothing of the keys.

use std::path::Path;

/// One `key=value` entry of a `.properties` file, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    /// The key.
    pub key: String,
    /// The value, with surrounding (unescaped) whitespace removed.
    pub value: String,
    /// The 1-based line on which the entry starts.
    pub line: usize,
}

/// A syntax error in a `.properties` text (only malformed `\u` escapes are).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// The 1-based line on which the entry starts.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses Java `.properties` text into its entries, in file order (a key set
/// twice appears twice; the later one wins when they are applied).
///
/// Follows `java.util.Properties.load`: `key=value`, `key:value` and
/// `key value`; `#` and `!` comment lines; blank lines; a line ending in an odd
/// number of backslashes continues on the next, whose leading whitespace is
/// dropped; escapes `\t \n \r \f \uXXXX` (UTF-16 surrogate pairs included) and
/// `\` before any other character for that character. Unlike Java, trailing
/// unescaped whitespace of a value is removed too.
pub fn parse_properties(text: &str) -> Result<Vec<Property>, ParseError> {
    let mut entries = Vec::new();
    // (first line, text so far) of a logical line being continued.
    let mut pending: Option<(usize, String)> = None;
    for (index, physical) in physical_lines(text).into_iter().enumerate() {
        let stripped = physical.trim_start_matches(is_blank);
        let (start, mut logical) = match pending.take() {
            Some(p) => p,
            None => {
                if stripped.is_empty() || stripped.starts_with('#') || stripped.starts_with('!') {
                    continue;
                }
                (index + 1, String::new())
            }
        };
        let backslashes = stripped.chars().rev().take_while(|&c| c == '\\').count();
        if backslashes % 2 == 1 {
            logical.push_str(&stripped[..stripped.len() - 1]);
            pending = Some((start, logical));
        } else {
            logical.push_str(stripped);
            entries.push(parse_entry(start, &logical)?);
        }
    }
    if let Some((start, logical)) = pending {
        entries.push(parse_entry(start, &logical)?);
    }
    Ok(entries)
}

/// Whitespace as `.properties` counts it.
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\x0c')
}

/// Splits on `\n`, `\r\n` and `\r`.
fn physical_lines(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut lines = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                lines.push(&text[start..i]);
                i += 1;
                start = i;
            }
            b'\r' => {
                lines.push(&text[start..i]);
                i += 1;
                if bytes.get(i) == Some(&b'\n') {
                    i += 1;
                }
                start = i;
            }
            _ => i += 1,
        }
    }
    if start < bytes.len() {
        lines.push(&text[start..]);
    }
    lines
}

/// Splits one logical line (escapes still in place) into key and value.
fn parse_entry(line: usize, logical: &str) -> Result<Property, ParseError> {
    let chars: Vec<char> = logical.chars().collect();
    let mut key_end = chars.len();
    let mut has_separator = false;
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '=' | ':' => {
                key_end = i;
                has_separator = true;
                break;
            }
            c if is_blank(c) => {
                key_end = i;
                break;
            }
            _ => i += 1,
        }
    }
    let mut value_start = if has_separator { key_end + 1 } else { key_end };
    // Whitespace and at most one separator lie between key and value.
    while let Some(&c) = chars.get(value_start) {
        if is_blank(c) {
            value_start += 1;
        } else if !has_separator && (c == '=' || c == ':') {
            has_separator = true;
            value_start += 1;
        } else {
            break;
        }
    }
    let key: String = unescape(&chars[..key_end], line)?
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    let mut value = unescape(&chars[value_start.min(chars.len())..], line)?;
    while matches!(value.last(), Some(&(c, false)) if c.is_whitespace()) {
        value.pop();
    }
    Ok(Property {
        key,
        value: value.into_iter().map(|(c, _)| c).collect(),
        line,
    })
}

/// Resolves escapes; each character comes with whether it was escaped.
fn unescape(chars: &[char], line: usize) -> Result<Vec<(char, bool)>, ParseError> {
    let error = |message: &str| ParseError {
        line,
        message: message.to_string(),
    };
    let mut out = Vec::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '\\' {
            out.push((chars[i], false));
            i += 1;
            continue;
        }
        let Some(&next) = chars.get(i + 1) else {
            out.push(('\\', false));
            break;
        };
        i += 2;
        let c = match next {
            't' => '\t',
            'n' => '\n',
            'r' => '\r',
            'f' => '\x0c',
            'u' => {
                let high = hex4(chars, i).ok_or_else(|| error("malformed \\uXXXX escape"))?;
                i += 4;
                if (0xD800..0xDC00).contains(&high) {
                    let low = (chars.get(i) == Some(&'\\') && chars.get(i + 1) == Some(&'u'))
                        .then(|| hex4(chars, i + 2))
                        .flatten()
                        .filter(|low| (0xDC00..0xE000).contains(low))
                        .ok_or_else(|| error("unpaired UTF-16 surrogate in \\u escape"))?;
                    i += 6;
                    let code = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
                    char::from_u32(code).ok_or_else(|| error("invalid \\u escape"))?
                } else {
                    char::from_u32(high)
                        .ok_or_else(|| error("unpaired UTF-16 surrogate in \\u escape"))?
                }
            }
            other => other,
        };
        out.push((c, true));
    }
    Ok(out)
}

/// Four hex digits at `at`.
fn hex4(chars: &[char], at: usize) -> Option<u32> {
    let digits = chars.get(at..at + 4)?;
    digits
        .iter()
        .try_fold(0u32, |acc, c| Some(acc * 16 + c.to_digit(16)?))
}

/// Decodes a properties file: UTF-8 (a byte-order mark is dropped), or
/// ISO-8859-1 (what Java's `Properties.load(InputStream)` assumes) when the
/// bytes are not valid UTF-8.
pub(super) fn decode(bytes: &[u8]) -> String {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

/// Largest `serving.properties` read (real ones are a few hundred bytes).
pub const MAX_PROPERTIES_BYTES: u64 = 1 << 20;

/// Reads a properties file, refusing one over [`MAX_PROPERTIES_BYTES`]
/// before reading it (or, when its size is unknown, once past the limit).
pub(super) fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let too_big = |size: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{size}, more than the {MAX_PROPERTIES_BYTES}-byte limit for a serving.properties"
            ),
        )
    };
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_file() && meta.len() > MAX_PROPERTIES_BYTES {
        return Err(too_big(format!("the file is {} bytes", meta.len())));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PROPERTIES_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_PROPERTIES_BYTES {
        return Err(too_big("the file is larger".into()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(text: &str) -> Vec<(String, String)> {
        parse_properties(text)
            .expect("parses")
            .into_iter()
            .map(|p| (p.key, p.value))
            .collect()
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn separators_and_whitespace() {
        assert_eq!(
            kv("a=1\nb:2\nc 3\n  d  =  4  \ne\t:\t5\nf\n"),
            vec![
                pair("a", "1"),
                pair("b", "2"),
                pair("c", "3"),
                pair("d", "4"),
                pair("e", "5"),
                pair("f", "")
            ]
        );
    }

    #[test]
    fn only_one_separator_is_skipped() {
        assert_eq!(
            kv("a = = b\nc:=d\ne==f"),
            vec![pair("a", "= b"), pair("c", "=d"), pair("e", "=f")]
        );
    }

    #[test]
    fn comments_and_blank_lines() {
        let entries =
            parse_properties("# c\n\n   ! bang\n\t\nkey=v # not a comment\n").expect("parses");
        assert_eq!(
            entries,
            vec![Property {
                key: "key".into(),
                value: "v # not a comment".into(),
                line: 5
            }]
        );
    }

    #[test]
    fn continuation_lines() {
        let entries = parse_properties("a=one \\\n    two \\\n\tthree\nb=x").expect("parses");
        assert_eq!(entries[0].value, "one two three");
        assert_eq!(entries[0].line, 1);
        assert_eq!(
            entries[1],
            Property {
                key: "b".into(),
                value: "x".into(),
                line: 4
            }
        );
    }

    #[test]
    fn even_backslashes_do_not_continue() {
        assert_eq!(kv("a=x\\\\\nb=y"), vec![pair("a", "x\\"), pair("b", "y")]);
    }

    #[test]
    fn comment_lines_never_continue_and_continued_hash_is_text() {
        assert_eq!(kv("# comment \\\na=1"), vec![pair("a", "1")]);
        assert_eq!(
            kv("a=1\\\n# not a comment"),
            vec![pair("a", "1# not a comment")]
        );
    }

    #[test]
    fn blank_continuation_line_ends_the_entry() {
        assert_eq!(kv("a=1\\\n\nb=2"), vec![pair("a", "1"), pair("b", "2")]);
    }

    #[test]
    fn continuation_at_end_of_file() {
        assert_eq!(kv("a=1\\"), vec![pair("a", "1")]);
    }

    #[test]
    fn line_endings() {
        let entries = parse_properties("a=1\r\nb=2\rc=3\r\n\r\nd=4").expect("parses");
        let lines: Vec<usize> = entries.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![1, 2, 3, 5]);
    }

    #[test]
    fn escapes() {
        assert_eq!(
            kv(r"a=tab\there\nnl\r\f\q\\"),
            vec![pair("a", "tab\there\nnl\r\x0cq\\")]
        );
        assert_eq!(kv(r"k\ey\=x\:y\ z=v"), vec![pair("key=x:y z", "v")]);
        assert_eq!(kv(r"u=\u00e9\u65E5\uD83D\uDE00"), vec![pair("u", "é日😀")]);
    }

    #[test]
    fn escaped_trailing_whitespace_is_kept() {
        assert_eq!(
            kv("a=x\\ \nb=\\u0020"),
            vec![pair("a", "x "), pair("b", " ")]
        );
    }

    #[test]
    fn malformed_unicode_escape_is_an_error_with_its_line() {
        let err = parse_properties("a=1\nb=\\u12G4").expect_err("malformed");
        assert_eq!(err.line, 2);
        assert!(err.message.contains("\\uXXXX"), "{err}");
        assert!(parse_properties("a=\\u12").is_err());
        assert!(parse_properties("a=\\uD83D").is_err());
        assert!(parse_properties("a=\\uDE00").is_err());
    }

    #[test]
    fn decode_falls_back_to_latin1_and_drops_bom() {
        assert_eq!(decode(b"\xEF\xBB\xBFa=1"), "a=1");
        assert_eq!(decode(b"a=caf\xE9"), "a=café");
        assert_eq!(decode("a=日本".as_bytes()), "a=日本");
    }
}
