//! Adapters on a backend, and adding their deltas to a step's rows.
//!
//! For each adapter in a step, in the order the step lists them, and each
//! projection it targets: its rows of the projection's input are gathered
//! ([`Backend::gather_rows`]), multiplied by `A` then `B` (two
//! [`Backend::linear`] calls on f32 matrices), and added back, scaled, to
//! the same rows of the projection's output ([`Backend::add_rows_scaled`]).
//! A row is in at most one adapter's group and the backend's `linear` is
//! row-independent, so a row gets the same bits alone or batched with rows
//! of other adapters (or none).

use kiln_backend::{Backend, BackendError, WeightData};

use super::{HostLora, LoraError, LoraResult, Proj};

/// One projection's matrices on the backend.
struct Pair<B: Backend> {
    a: B::Weight,
    b: B::Weight,
    scale: f32,
}

/// An adapter uploaded to a backend, ready for [`LoraStep`].
pub struct LoraAdapter<B: Backend> {
    layers: Vec<[Option<Pair<B>>; 7]>,
    rank: usize,
}

impl<B: Backend> LoraAdapter<B> {
    /// Uploads `host`'s matrices. Refused on CUDA, where adapters are not
    /// implemented yet.
    pub fn upload(be: &B, host: &HostLora) -> LoraResult<Self> {
        if be.name().starts_with("cuda") {
            return Err(LoraError::Unsupported {
                path: host.path.clone(),
                what: format!(
                    "a LoRA adapter on {} (adapters are not implemented on CUDA yet)",
                    be.name()
                ),
            });
        }
        let mut layers = Vec::with_capacity(host.layers.len());
        for l in &host.layers {
            let mut row: [Option<Pair<B>>; 7] = Default::default();
            for (slot, m) in row.iter_mut().zip(l) {
                if let Some(m) = m {
                    *slot = Some(Pair {
                        a: be.upload_weight(m.rank, m.in_dim, WeightData::F32(m.a.clone()))?,
                        b: be.upload_weight(m.out_dim, m.rank, WeightData::F32(m.b.clone()))?,
                        scale: m.scale,
                    });
                }
            }
            layers.push(row);
        }
        Ok(Self {
            layers,
            rank: host.rank,
        })
    }

    /// The adapter's largest rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// How many layers it was built for.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }
}

/// The adapters a step uses, each with the rows (token indices) that use it.
/// Rows in no group use the base model alone.
pub struct LoraStep<'a, B: Backend> {
    groups: Vec<(&'a LoraAdapter<B>, Vec<u32>)>,
}

impl<B: Backend> Default for LoraStep<'_, B> {
    fn default() -> Self {
        Self { groups: Vec::new() }
    }
}

impl<'a, B: Backend> LoraStep<'a, B> {
    /// No adapter: every row uses the base model.
    pub fn none() -> Self {
        Self::default()
    }

    /// The step's adapters and their rows (each ascending or not; a row may
    /// be in one group at most, which [`LoraStep::check`] enforces).
    pub fn new(groups: Vec<(&'a LoraAdapter<B>, Vec<u32>)>) -> Self {
        Self {
            groups: groups.into_iter().filter(|(_, r)| !r.is_empty()).collect(),
        }
    }

    /// The same adapters for a step cut down to `rows` (row `k` of the cut
    /// step is row `rows[k]` of this one; a row may be taken twice), as the
    /// decoder's last layer does after attention.
    pub fn select(&self, rows: &[u32]) -> Self {
        let groups = self
            .groups
            .iter()
            .map(|(adapter, own)| {
                let picked = (0u32..)
                    .zip(rows)
                    .filter(|(_, r)| own.contains(r))
                    .map(|(k, _)| k)
                    .collect();
                (*adapter, picked)
            })
            .collect();
        Self::new(groups)
    }

    /// Whether no row uses an adapter.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Checks the groups against a step of `tokens` rows and a model of
    /// `n_layers` layers: rows in range, none in two groups.
    pub fn check(&self, tokens: usize, n_layers: usize) -> Result<(), BackendError> {
        if self.groups.is_empty() {
            return Ok(());
        }
        let bad = |msg: String| BackendError::Invalid { op: "lora", msg };
        let mut seen = vec![false; tokens];
        for (a, rows) in &self.groups {
            if a.n_layers() != n_layers {
                return Err(bad(format!(
                    "an adapter of {} layers for a model of {n_layers}",
                    a.n_layers()
                )));
            }
            for &r in rows {
                match seen.get_mut(r as usize) {
                    None => return Err(bad(format!("row {r} beyond the step's {tokens} tokens"))),
                    Some(true) => return Err(bad(format!("row {r} is in two adapters' groups"))),
                    Some(s) => *s = true,
                }
            }
        }
        Ok(())
    }

    /// Adds every adapter's delta for `layer`'s `proj` to its rows of `out`,
    /// `x` being the projection's input.
    pub(crate) fn apply(
        &self,
        be: &B,
        layer: usize,
        proj: Proj,
        x: &B::Tensor,
        out: &mut B::Tensor,
    ) -> Result<(), BackendError> {
        for (adapter, rows) in &self.groups {
            let Some(p) = adapter
                .layers
                .get(layer)
                .and_then(|l| l[proj.index()].as_ref())
            else {
                continue;
            };
            let xs = be.gather_rows(x, rows)?;
            let t = be.linear(&xs, &p.a, None)?;
            let y = be.linear(&t, &p.b, None)?;
            be.add_rows_scaled(out, &y, rows, &vec![p.scale; rows.len()])?;
        }
        Ok(())
    }
}
