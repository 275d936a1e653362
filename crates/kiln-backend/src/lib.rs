//! kiln-backend placeholder
#[derive(Debug, thiserror::Error)]
pub enum BackendError { #[error("{0}")] Msg(String) }
