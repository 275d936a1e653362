//! Which device a model runs on: the one value `--device` and
//! `option.device` are parsed into, so that everything above the backend
//! (the engine's launcher, the server, the CLI) passes it along without
//! knowing what each device needs.

use std::fmt;
use std::str::FromStr;

/// A device to load a model onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory and the CPU backend (always available).
    #[default]
    Cpu,
    /// The NVIDIA GPU with this ordinal (`cuda:N`; `cuda` is `cuda:0`).
    Cuda(usize),
}

/// Why a device name could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device '{0}': expected cpu, cuda or cuda:N (N a GPU number such as 0)")]
pub struct DeviceParseError(pub String);

impl Device {
    /// The accepted spellings, for messages that list them.
    pub const ALLOWED: &'static str = "cpu, cuda, cuda:N";

    /// Parses `cpu`, `cuda` or `cuda:N` (case and surrounding blanks ignored).
    pub fn parse(s: &str) -> Result<Self, DeviceParseError> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => return Ok(Device::Cpu),
            "cuda" => return Ok(Device::Cuda(0)),
            _ => {}
        }
        let ordinal = lower
            .strip_prefix("cuda:")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<usize>().ok());
        match ordinal {
            // Far more GPUs than any machine has is a typo, not an ordinal.
            Some(n) if n < 1024 => Ok(Device::Cuda(n)),
            _ => Err(DeviceParseError(s.to_string())),
        }
    }

    /// Whether this device is a GPU.
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl FromStr for Device {
    type Err = DeviceParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Device::parse(s)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_prints_the_canonical_one() {
        let cases = [
            ("cpu", Device::Cpu),
            (" CPU ", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:0", Device::Cuda(0)),
            ("CUDA:3", Device::Cuda(3)),
        ];
        for (text, want) in cases {
            assert_eq!(Device::parse(text), Ok(want), "{text}");
        }
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        assert_eq!(Device::Cpu.to_string(), "cpu");
        assert_eq!("cuda:2".parse::<Device>(), Ok(Device::Cuda(2)));
    }

    #[test]
    fn refuses_malformed_names_with_the_accepted_ones() {
        for bad in [
            "",
            "cuda:",
            "cuda:-1",
            "cuda:x",
            "cuda:+1",
            "tpu",
            "cuda:99999",
            "cuda0",
        ] {
            let err = Device::parse(bad).expect_err(bad);
            assert!(err.to_string().contains("cpu, cuda or cuda:N"), "{err}");
            assert!(err.to_string().contains(&format!("'{bad}'")), "{err}");
        }
    }
}
