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
//!
//! An adapter's expert matrices ([`LoraExperts`]) are not applied here:
//! the mixture-of-experts layer asks [`LoraStep::experts`] which groups
//! adapt its experts and runs those rows' experts itself, adding each
//! expert's deltas with [`LoraExperts::apply`].

use kiln_backend::{Backend, BackendError, WeightData};

use super::{ExpertPart, HostLora, LoraError, LoraMatrix, LoraResult, Proj, N_PROJ};

/// One projection's matrices on the backend.
struct Pair<B: Backend> {
    a: B::Weight,
    b: B::Weight,
    scale: f32,
}

impl<B: Backend> Pair<B> {
    fn upload(be: &B, m: &LoraMatrix) -> LoraResult<Self> {
        Ok(Pair {
            a: be.upload_weight(m.rank, m.in_dim, WeightData::F32(m.a.clone()))?,
            b: be.upload_weight(m.out_dim, m.rank, WeightData::F32(m.b.clone()))?,
            scale: m.scale,
        })
    }

    /// Adds `scale * B·(A·x)` to every row of `out`.
    fn add_to(&self, be: &B, x: &B::Tensor, out: &mut B::Tensor) -> Result<(), BackendError> {
        let t = be.linear(x, &self.a, None)?;
        let y = be.linear(&t, &self.b, None)?;
        let rows = be.shape(x).first().copied().unwrap_or(0) as u32;
        let all: Vec<u32> = (0..rows).collect();
        be.add_rows_scaled(out, &y, &all, &vec![self.scale; all.len()])
    }
}

/// One layer's expert matrices of an adapter on a backend: per expert, its
/// gate, up and down pairs (in [`ExpertPart`] order).
pub struct LoraExperts<B: Backend> {
    experts: Vec<[Option<Pair<B>>; 3]>,
}

impl<B: Backend> LoraExperts<B> {
    /// Adds expert `expert`'s delta for `part` to every row of `out`, `x`
    /// being that matrix's input for the same rows; nothing when the adapter
    /// leaves that matrix alone.
    pub fn apply(
        &self,
        be: &B,
        expert: usize,
        part: ExpertPart,
        x: &B::Tensor,
        out: &mut B::Tensor,
    ) -> Result<(), BackendError> {
        match self
            .experts
            .get(expert)
            .and_then(|e| e[part.index()].as_ref())
        {
            Some(p) => p.add_to(be, x, out),
            None => Ok(()),
        }
    }
}

/// An adapter uploaded to a backend, ready for [`LoraStep`].
pub struct LoraAdapter<B: Backend> {
    layers: Vec<[Option<Pair<B>>; N_PROJ]>,
    /// Per layer, the experts' matrices, or `None` where the adapter leaves
    /// the layer's experts alone.
    experts: Vec<Option<LoraExperts<B>>>,
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
            let mut row: [Option<Pair<B>>; N_PROJ] = Default::default();
            for (slot, m) in row.iter_mut().zip(l) {
                if let Some(m) = m {
                    *slot = Some(Pair::upload(be, m)?);
                }
            }
            layers.push(row);
        }
        let mut experts = Vec::with_capacity(host.layers.len());
        for i in 0..host.layers.len() {
            let layer = host.experts.get(i).map_or(&[][..], Vec::as_slice);
            if layer.iter().flatten().all(Option::is_none) {
                experts.push(None);
                continue;
            }
            let mut per_expert = Vec::with_capacity(layer.len());
            for e in layer {
                let mut parts: [Option<Pair<B>>; 3] = Default::default();
                for (slot, m) in parts.iter_mut().zip(e) {
                    if let Some(m) = m {
                        *slot = Some(Pair::upload(be, m)?);
                    }
                }
                per_expert.push(parts);
            }
            experts.push(Some(LoraExperts {
                experts: per_expert,
            }));
        }
        Ok(Self {
            layers,
            experts,
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

    /// The groups whose adapter adapts `layer`'s experts, each with its rows:
    /// the mixture-of-experts layer runs those rows' experts with the deltas.
    pub fn experts(&self, layer: usize) -> Vec<(&'a LoraExperts<B>, &[u32])> {
        self.groups
            .iter()
            .filter_map(|(a, rows)| {
                let e = a.experts.get(layer)?.as_ref()?;
                Some((e, rows.as_slice()))
            })
            .collect()
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
