//! The mixture-of-experts feed-forward block of a decoder layer.
//!
//! A router (a linear layer, `[n_experts, hidden]`) scores every expert for
//! every token; its logits come to the host (tokens x experts floats, small)
//! and each token's experts and weights are chosen there, token by token
//! ([`crate::moe::route`]), so they never depend on what else is in the step.
//! The step's tokens are then grouped by expert: each expert with at least
//! one token runs once, as one SwiGLU over exactly its tokens' rows (so its
//! weights are read once per step, and a decode step reads only the chosen
//! experts), and its outputs, scaled by the router's weights, are added back
//! to those rows. The chosen experts go to the backend in one call
//! ([`Backend::moe_experts`], which the CPU spreads over its cores), in
//! index order, and their outputs are added in that order, so every token
//! accumulates its experts' outputs in the same order whatever shares the
//! step: with the backend's row-independent `linear`, a token's result is
//! bit-identical alone or batched. A shared expert (Qwen2-MoE) then adds its output,
//! scaled by its sigmoid gate.
//!
//! LoRA adapters: a row's adapter may move the router's logits (its delta
//! is added to that row's logits before routing) and its chosen experts'
//! gate, up and down projections. Rows whose adapter adapts this layer's
//! experts leave the backend's expert call; per adapter, each expert runs
//! once over that adapter's rows routed to it, each projection followed by
//! its delta, and the outputs are added to those rows in expert order. A
//! row's result thus depends on its own adapter (or none) only, never on
//! what else is in the step.

use kiln_backend::{Activation, Backend, MoeExpert, WeightData};

use super::Loader;
use crate::config::DecoderConfig;
use crate::lora::{ExpertPart, LoraExperts, LoraStep, Proj};
use crate::moe::{route, MoeConfig};
use crate::{ModelError, Result};

/// One SwiGLU expert: `down(act(gate(x)) * up(x))`, with gate, up and
/// down biases where the model has them (gpt-oss).
struct Expert<B: Backend> {
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
    biases: Option<[B::Tensor; 3]>,
}

impl<B: Backend> Expert<B> {
    fn forward(&self, be: &B, act: Activation, x: &B::Tensor) -> Result<B::Tensor> {
        let (g, u) = self.gate_up(be, x)?;
        // `g` goes here, before the down projection runs.
        let a = be.gated_activation_into(&g, u, act)?;
        drop(g);
        Ok(be.linear(&a, &self.down, self.bias(2))?)
    }

    /// Bias `i` (gate, up, down) where the model has them.
    fn bias(&self, i: usize) -> Option<&B::Tensor> {
        self.biases.as_ref().map(|b| &b[i])
    }

    /// The gate and up projections of `x`, as one backend operation.
    fn gate_up(&self, be: &B, x: &B::Tensor) -> Result<(B::Tensor, B::Tensor)> {
        let [g, u] = super::linear_array(
            be,
            x,
            [(&self.gate, self.bias(0)), (&self.up, self.bias(1))],
        )?;
        Ok((g, u))
    }

    /// [`Expert::forward`] for rows of one adapter, each projection followed
    /// by the adapter's delta for this expert (`index`).
    fn forward_lora(
        &self,
        be: &B,
        act: Activation,
        x: &B::Tensor,
        lora: &LoraExperts<B>,
        index: usize,
    ) -> Result<B::Tensor> {
        let (mut g, mut u) = self.gate_up(be, x)?;
        lora.apply(be, index, ExpertPart::Gate, x, &mut g)?;
        lora.apply(be, index, ExpertPart::Up, x, &mut u)?;
        let a = be.gated_activation_into(&g, u, act)?;
        drop(g);
        let mut y = be.linear(&a, &self.down, self.bias(2))?;
        lora.apply(be, index, ExpertPart::Down, &a, &mut y)?;
        Ok(y)
    }
}

/// The `[n, rows]` bias `name` of `n` experts as one `[rows]` tensor each,
/// or `None` when the checkpoint has none.
fn expert_biases<B: Backend>(
    l: &Loader<'_, B>,
    name: &str,
    n: usize,
    rows: usize,
) -> Result<Option<Vec<B::Tensor>>> {
    if !l.src.contains(name) {
        return Ok(None);
    }
    let t = l.src.get(name)?;
    l.check_shape(name, &t.shape, &[n, rows])?;
    let biases = t
        .data
        .chunks_exact(rows)
        .map(|b| l.backend.upload(&[rows], b.to_vec()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Some(biases))
}

/// The expert every token goes through, and its optional sigmoid gate (`[1, hidden]`).
struct Shared<B: Backend> {
    expert: Expert<B>,
    gate: Option<B::Weight>,
}

/// A layer's router, experts and optional shared expert.
pub(super) struct MoeFfn<B: Backend> {
    router: B::Weight,
    router_bias: Option<B::Tensor>,
    experts: Vec<Expert<B>>,
    shared: Option<Shared<B>>,
}

/// The `n` matrices of `rows x cols` of one kind (`ffn_gate`, `ffn_up`,
/// `ffn_down`) of layer `i`'s experts: from the 3-D `blk.i.{part}_exps.weight`
/// (`[n, rows, cols]`, GGUF's form; one expert's rows are contiguous, so a
/// quantized tensor splits into row bands that stay quantized), or from one
/// `blk.i.{part}.E.weight` per expert (Hugging Face's saved form).
fn expert_matrices<B: Backend>(
    l: &Loader<'_, B>,
    i: usize,
    part: &str,
    n: usize,
    rows: usize,
    cols: usize,
) -> Result<Vec<B::Weight>> {
    let stacked = format!("blk.{i}.{part}_exps.weight");
    if l.src.contains(&stacked) {
        return bands(l, &stacked, n, rows, cols, 1);
    }
    (0..n)
        .map(|e| l.weight(&format!("blk.{i}.{part}.{e}.weight"), rows, cols))
        .collect()
}

/// The `[n, parts * rows, cols]` tensor `name` split into `n * parts`
/// matrices of `rows x cols`, in order (expert 0's parts, then expert 1's…).
fn bands<B: Backend>(
    l: &Loader<'_, B>,
    name: &str,
    n: usize,
    rows: usize,
    cols: usize,
    parts: usize,
) -> Result<Vec<B::Weight>> {
    let (shape, data) = l.src.get_weight(name)?;
    l.check_shape(name, &shape, &[n, parts * rows, cols])?;
    let pieces = data
        .split_rows(cols, &vec![rows; n * parts])
        .map_err(|e| l.tensor_err(name, e))?;
    pieces
        .into_iter()
        .map(|w: WeightData| l.upload_weight(name, rows, cols, w))
        .collect()
}

impl<B: Backend> MoeFfn<B> {
    /// Layer `i`'s mixture-of-experts block, or `None` when the model has
    /// none or the layer is dense.
    pub(super) fn load(l: &Loader<'_, B>, cfg: &DecoderConfig, i: usize) -> Result<Option<Self>> {
        let Some(m) = cfg.moe.as_ref().filter(|m| m.is_sparse(i)) else {
            return Ok(None);
        };
        let h = cfg.hidden_size;
        let (n, ff) = (m.n_experts, m.expert_ff);
        let p = |s: &str| format!("blk.{i}.{s}");
        let router = l.weight(&p("ffn_gate_inp.weight"), n, h)?;
        let router_bias = l.bias(&p("ffn_gate_inp"), n)?;
        let fused = p("ffn_gate_up_exps.weight");
        let (gates, ups) = if l.src.contains(&fused) {
            // transformers 5's `experts.gate_up_proj`: each expert's gate rows, then its up rows.
            let mut gates = Vec::with_capacity(n);
            let mut ups = Vec::with_capacity(n);
            let mut it = bands(l, &fused, n, ff, h, 2)?.into_iter();
            while let (Some(g), Some(u)) = (it.next(), it.next()) {
                gates.push(g);
                ups.push(u);
            }
            (gates, ups)
        } else {
            (
                expert_matrices(l, i, "ffn_gate", n, ff, h)?,
                expert_matrices(l, i, "ffn_up", n, ff, h)?,
            )
        };
        let downs = expert_matrices(l, i, "ffn_down", n, h, ff)?;
        // gpt-oss's expert biases (llama.cpp's `ffn_{gate,up,down}_exps.bias`).
        let biases: Vec<Option<[B::Tensor; 3]>> = match (
            expert_biases(l, &p("ffn_gate_exps.bias"), n, ff)?,
            expert_biases(l, &p("ffn_up_exps.bias"), n, ff)?,
            expert_biases(l, &p("ffn_down_exps.bias"), n, h)?,
        ) {
            (Some(g), Some(u), Some(d)) => g
                .into_iter()
                .zip(u)
                .zip(d)
                .map(|((g, u), d)| Some([g, u, d]))
                .collect(),
            (None, None, None) if !m.expert_bias => (0..n).map(|_| None).collect(),
            _ => {
                return Err(l.tensor_err(
                    &p("ffn_gate_exps.bias"),
                    "the experts' gate, up and down biases must all be present \
                     (gpt-oss has them)"
                        .into(),
                ))
            }
        };
        let experts = gates
            .into_iter()
            .zip(ups)
            .zip(downs)
            .zip(biases)
            .map(|(((gate, up), down), biases)| Expert {
                gate,
                up,
                down,
                biases,
            })
            .collect();
        let shared = match m.shared_expert_ff {
            Some(sff) => Some(Shared {
                expert: Expert {
                    gate: l.weight(&p("ffn_gate_shexp.weight"), sff, h)?,
                    up: l.weight(&p("ffn_up_shexp.weight"), sff, h)?,
                    down: l.weight(&p("ffn_down_shexp.weight"), h, sff)?,
                    biases: None,
                },
                gate: if m.shared_expert_gate {
                    Some(shared_gate(l, &p("ffn_gate_inp_shexp.weight"), h)?)
                } else {
                    None
                },
            }),
            None => None,
        };
        Ok(Some(Self {
            router,
            router_bias,
            experts,
            shared,
        }))
    }

    /// The block's output for the normalised hidden states `x: [tokens, hidden]`
    /// of layer `layer`, each of `lora`'s rows with its own adapter.
    pub(super) fn forward(
        &self,
        be: &B,
        cfg: &DecoderConfig,
        x: &B::Tensor,
        layer: usize,
        lora: &LoraStep<'_, B>,
    ) -> Result<B::Tensor> {
        let m: &MoeConfig = cfg
            .moe
            .as_ref()
            .ok_or_else(|| invalid("no expert settings".into()))?;
        let tokens = match be.shape(x)[..] {
            [t, _] => t,
            ref s => return Err(invalid(format!("input of shape {s:?}"))),
        };
        let n = self.experts.len();
        let mut logits = be.linear(x, &self.router, self.router_bias.as_ref())?;
        lora.apply(be, layer, Proj::Router, x, &mut logits)?;
        let logits = be.to_host(&logits)?;
        if logits.len() != tokens * n {
            return Err(invalid(format!(
                "{} router logits for {tokens} tokens and {n} experts",
                logits.len()
            )));
        }
        // Which adapter group (of those adapting these experts) owns each token.
        let adapted = lora.experts(layer);
        let mut owner: Vec<Option<usize>> = vec![None; tokens];
        for (g, (_, group_rows)) in adapted.iter().enumerate() {
            for &r in group_rows.iter() {
                if let Some(o) = owner.get_mut(r as usize) {
                    *o = Some(g);
                }
            }
        }
        // Each expert's tokens (ascending) and their weights: the base
        // model's tokens, then each adapter group's.
        let groups = adapted.len() + 1;
        let mut rows: Vec<Vec<Vec<u32>>> = vec![vec![Vec::new(); n]; groups];
        let mut scales: Vec<Vec<Vec<f32>>> = vec![vec![Vec::new(); n]; groups];
        for (t, l) in logits.chunks_exact(n.max(1)).enumerate() {
            let g = owner[t].map_or(0, |g| g + 1);
            for (e, w) in route(l, m.n_experts_used, m.routing) {
                rows[g][e as usize].push(t as u32);
                scales[g][e as usize].push(w);
            }
        }
        let routed: Vec<MoeExpert<'_, B::Weight, B::Tensor>> = self
            .experts
            .iter()
            .zip(&rows[0])
            .zip(&scales[0])
            .filter(|((_, rows), _)| !rows.is_empty())
            .map(|((e, rows), scales)| MoeExpert {
                gate: &e.gate,
                up: &e.up,
                down: &e.down,
                rows,
                scales,
                biases: e.biases.as_ref().map(|[g, u, d]| [g, u, d]),
            })
            .collect();
        let mut out = be.moe_experts(x, &routed, cfg.activation)?;
        for (g, (deltas, _)) in adapted.iter().enumerate() {
            for (e, expert) in self.experts.iter().enumerate() {
                let (rows, scales) = (&rows[g + 1][e], &scales[g + 1][e]);
                if rows.is_empty() {
                    continue;
                }
                let xs = be.gather_rows(x, rows)?;
                let y = expert.forward_lora(be, cfg.activation, &xs, deltas, e)?;
                be.add_rows_scaled(&mut out, &y, rows, scales)?;
            }
        }
        if let Some(s) = &self.shared {
            let y = s.expert.forward(be, cfg.activation, x)?;
            let weights = match &s.gate {
                Some(g) => be
                    .to_host(&be.linear(x, g, None)?)?
                    .into_iter()
                    .map(|v| 1.0 / (1.0 + (-v).exp()))
                    .collect(),
                None => vec![1.0; tokens],
            };
            let all: Vec<u32> = (0..tokens as u32).collect();
            be.add_rows_scaled(&mut out, &y, &all, &weights)?;
        }
        Ok(out)
    }
}

/// The shared expert's gate, `[hidden]` in GGUF and `[1, hidden]` in
/// Hugging Face checkpoints, as a one-row matrix.
fn shared_gate<B: Backend>(l: &Loader<'_, B>, name: &str, h: usize) -> Result<B::Weight> {
    let (shape, data) = l.src.get_weight(name)?;
    if shape != [h] && shape != [1, h] {
        return Err(l.tensor_err(
            name,
            format!("shape {shape:?}, but the config implies [{h}] or [1, {h}]"),
        ));
    }
    l.upload_weight(name, 1, h, data)
}

fn invalid(msg: String) -> ModelError {
    ModelError::Backend(kiln_backend::BackendError::Invalid { op: "moe", msg })
}
