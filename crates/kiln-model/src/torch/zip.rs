//! The ZIP container of a `torch.save` file: just enough of it for torch's
//! STORED archives, ZIP64 included (files over 4 GiB). CRCs are not checked.

use std::collections::HashMap;
use std::ops::Range;

use super::{printable, to_usize};

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;

/// One member of the archive.
#[derive(Clone, Debug)]
struct ZipEntry {
    /// 0 = STORED; anything else is compressed and unreadable here.
    method: u16,
    /// The member's (stored) bytes, as a range of the file.
    data: Range<usize>,
}

/// Where the central directory is and how many entries it has.
struct CentralDir {
    offset: usize,
    count: u64,
}

/// The members of a torch.save archive and the prefix they share.
pub(super) struct Archive {
    entries: HashMap<String, ZipEntry>,
    /// `<archive>` in `<archive>/data.pkl`.
    pub(super) prefix: String,
}

impl Archive {
    /// Reads the central directory and finds `<archive>/data.pkl`.
    pub(super) fn read(bytes: &[u8]) -> std::result::Result<Self, String> {
        let dir = find_central_dir(bytes)?;
        let mut entries = HashMap::new();
        let mut pickle_prefix = None;
        let mut at = dir.offset;
        for i in 0..dir.count {
            let (name, entry, next) = read_central_entry(bytes, at)
                .map_err(|e| format!("ZIP central directory entry {i}: {e}"))?;
            at = next;
            if pickle_prefix.is_none() {
                if let Some(p) = name.strip_suffix("/data.pkl") {
                    if !p.contains('/') {
                        pickle_prefix = Some(p.to_string());
                    }
                }
            }
            entries.entry(name).or_insert(entry);
        }
        let prefix = pickle_prefix.ok_or(
            "this ZIP archive has no <archive>/data.pkl, so it is not a PyTorch checkpoint",
        )?;
        let archive = Self { entries, prefix };
        archive.check_byteorder(bytes)?;
        Ok(archive)
    }

    /// Where the bytes of `<archive>/<name>` are, if the archive has that
    /// member (within the file: checked when the directory was read).
    pub(super) fn member(&self, name: &str) -> std::result::Result<Option<Range<usize>>, String> {
        let full = format!("{}/{name}", self.prefix);
        let Some(entry) = self.entries.get(&full) else {
            return Ok(None);
        };
        if entry.method != 0 {
            return Err(format!(
                "ZIP member {full} is compressed (method {}); torch.save stores members \
                 uncompressed and kiln reads only those",
                entry.method
            ));
        }
        Ok(Some(entry.data.clone()))
    }

    fn check_byteorder(&self, bytes: &[u8]) -> std::result::Result<(), String> {
        let Some(range) = self.member("byteorder")? else {
            return Ok(()); // older torch versions wrote none; they were little-endian
        };
        match bytes.get(range) {
            Some(b"little") => Ok(()),
            Some(b"big") => Err("this checkpoint was saved on a big-endian machine; \
                                 kiln reads only little-endian ones"
                .into()),
            other => Err(format!(
                "unknown byteorder '{}'",
                printable(&String::from_utf8_lossy(other.unwrap_or_default()))
            )),
        }
    }
}

/// Finds the end-of-central-directory record (and its ZIP64 form).
fn find_central_dir(b: &[u8]) -> std::result::Result<CentralDir, String> {
    let not_zip = || "not a valid ZIP archive: no end-of-central-directory record".to_string();
    let last = b.len().checked_sub(22).ok_or_else(not_zip)?;
    let first = last.saturating_sub(0xFFFF);
    let eocd = (first..=last)
        .rev()
        .find(|&i| le_u32(b, i) == Some(EOCD_SIG))
        .ok_or_else(not_zip)?;
    let truncated = || "ZIP end-of-central-directory record is truncated".to_string();
    let count = le_u16(b, eocd + 10).ok_or_else(truncated)?;
    let offset = le_u32(b, eocd + 16).ok_or_else(truncated)?;
    let zip64 = eocd
        .checked_sub(20)
        .filter(|&loc| le_u32(b, loc) == Some(ZIP64_LOCATOR_SIG));
    let Some(locator) = zip64 else {
        return Ok(CentralDir {
            offset: offset as usize,
            count: count.into(),
        });
    };
    let bad64 = || "ZIP64 end-of-central-directory record is missing or truncated".to_string();
    let rec = le_u64(b, locator + 8)
        .and_then(to_usize)
        .ok_or_else(bad64)?;
    if le_u32(b, rec) != Some(ZIP64_EOCD_SIG) {
        return Err(bad64());
    }
    Ok(CentralDir {
        count: le_u64(b, rec + 32).ok_or_else(bad64)?,
        offset: le_u64(b, rec + 48).and_then(to_usize).ok_or_else(bad64)?,
    })
}

/// Reads the central directory entry at `at`: its name, where its data is,
/// and where the next entry starts.
fn read_central_entry(
    b: &[u8],
    at: usize,
) -> std::result::Result<(String, ZipEntry, usize), &'static str> {
    const TRUNC: &str = "truncated";
    if le_u32(b, at) != Some(CENTRAL_SIG) {
        return Err("bad signature");
    }
    let flags = le_u16(b, at + 8).ok_or(TRUNC)?;
    let method = le_u16(b, at + 10).ok_or(TRUNC)?;
    let mut csize = u64::from(le_u32(b, at + 20).ok_or(TRUNC)?);
    let mut usize_ = u64::from(le_u32(b, at + 24).ok_or(TRUNC)?);
    let name_len = usize::from(le_u16(b, at + 28).ok_or(TRUNC)?);
    let extra_len = usize::from(le_u16(b, at + 30).ok_or(TRUNC)?);
    let comment_len = usize::from(le_u16(b, at + 32).ok_or(TRUNC)?);
    let mut local = u64::from(le_u32(b, at + 42).ok_or(TRUNC)?);
    let name_at = at + 46;
    let name = b.get(name_at..name_at + name_len).ok_or(TRUNC)?;
    let extra = b
        .get(name_at + name_len..name_at + name_len + extra_len)
        .ok_or(TRUNC)?;
    if flags & 1 != 0 {
        return Err("member is encrypted");
    }
    apply_zip64_extra(extra, &mut usize_, &mut csize, &mut local)?;
    if method == 0 && csize != usize_ {
        return Err("stored member's sizes disagree");
    }
    let data = local_data(b, local, csize)?;
    let next = name_at + name_len + extra_len + comment_len;
    let name = String::from_utf8_lossy(name).into_owned();
    Ok((name, ZipEntry { method, data }, next))
}

/// Replaces the 0xFFFFFFFF sizes and offset of a central entry by the 64-bit
/// values of its ZIP64 extra field, which lists them in this order.
fn apply_zip64_extra(
    mut extra: &[u8],
    usize_: &mut u64,
    csize: &mut u64,
    local: &mut u64,
) -> std::result::Result<(), &'static str> {
    while extra.len() >= 4 {
        let id = le_u16(extra, 0).ok_or("truncated extra field")?;
        let len = usize::from(le_u16(extra, 2).ok_or("truncated extra field")?);
        let body = extra.get(4..4 + len).ok_or("truncated extra field")?;
        if id == 1 {
            let mut at = 0;
            for field in [usize_, csize, local] {
                if *field == u64::from(u32::MAX) {
                    *field = le_u64(body, at).ok_or("truncated ZIP64 extra field")?;
                    at += 8;
                }
            }
            return Ok(());
        }
        extra = &extra[4 + len..];
    }
    Ok(())
}

/// The data range of the member whose local header is at `local`.
fn local_data(b: &[u8], local: u64, size: u64) -> std::result::Result<Range<usize>, &'static str> {
    let local = to_usize(local).ok_or("local header offset too large")?;
    if le_u32(b, local) != Some(LOCAL_SIG) {
        return Err("no local header where the directory says");
    }
    let name_len = usize::from(le_u16(b, local + 26).ok_or("truncated local header")?);
    let extra_len = usize::from(le_u16(b, local + 28).ok_or("truncated local header")?);
    let start = local + 30 + name_len + extra_len;
    let end = to_usize(size)
        .and_then(|s| start.checked_add(s))
        .filter(|&end| end <= b.len())
        .ok_or("member data runs past the end of the file")?;
    Ok(start..end)
}
