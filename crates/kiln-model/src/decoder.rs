//! The one decoder-only transformer every architecture is expressed as.
//!
//! Layout quirks of checkpoints are absorbed when weights are loaded, so
//! [`Decoder::forward`] is a short, branch-light walk over the layers. A
//! forward step takes any batch the scheduler built (a [`StepInput`]: prefill
//! chunks and decode tokens of many sequences, concatenated) and returns the
//! logits of the rows it asked for.

use std::sync::Arc;

use kiln_backend::{AttentionParams, Backend, BackendError, StepInput};

use crate::config::{DecoderConfig, NormKind};
use kiln_backend::WeightData;

use crate::layouts::Layouts;
use crate::lora::{LoraStep, Proj};
use crate::weights::WeightSource;
use crate::{ModelError, Result};

mod moe;
mod rope_table;

use rope_table::RopeTable;

/// A weight matrix with its optional bias.
struct Linear<B: Backend> {
    w: B::Weight,
    b: Option<B::Tensor>,
}

enum Norm<B: Backend> {
    Rms(B::Tensor),
    Layer(B::Tensor, B::Tensor),
}

struct Layer<B: Backend> {
    attn_norm: Norm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    /// Per-head RMSNorm weights of queries and keys (Qwen3).
    qk_norm: Option<(B::Tensor, B::Tensor)>,
    o: Linear<B>,
    ffn_norm: Norm<B>,
    ffn: Ffn<B>,
    /// Norms on the attention and feed-forward outputs (Gemma).
    post_norms: Option<(Norm<B>, Norm<B>)>,
    /// One attention-sink logit per query head (gpt-oss), kept on the host.
    sinks: Option<Vec<f32>>,
}

/// A layer's feed-forward block.
enum Ffn<B: Backend> {
    Dense {
        gate: Option<Linear<B>>,
        up: Linear<B>,
        down: Linear<B>,
    },
    /// Mixture of experts (`decoder/moe.rs`).
    Moe(Box<moe::MoeFfn<B>>),
}

/// [`Backend::linear_many`] of `x` against `N` weights (with their
/// biases), as an array of `N` outputs: an error, not a panic, if the
/// backend gave another count.
fn linear_array<B: Backend, const N: usize>(
    be: &B,
    x: &B::Tensor,
    ws: [(&B::Weight, Option<&B::Tensor>); N],
) -> Result<[B::Tensor; N]> {
    be.linear_many(x, &ws)?.try_into().map_err(|got: Vec<_>| {
        ModelError::Backend(BackendError::Invalid {
            op: "linear_many",
            msg: format!("{} outputs for {N} weights", got.len()),
        })
    })
}

/// The projections of a [`Ffn::Dense`]: gate (if gated), up, down.
type DenseFfn<'a, B> = (Option<&'a Linear<B>>, &'a Linear<B>, &'a Linear<B>);

/// A loaded model on backend `B`.
pub struct Decoder<B: Backend> {
    cfg: DecoderConfig,
    embed: B::Weight,
    /// Learned absolute positions (GPT-2, OPT).
    positions: Option<B::Tensor>,
    /// Projections between the embedding width and the hidden size (OPT).
    proj_in: Option<B::Weight>,
    proj_out: Option<B::Weight>,
    layers: Vec<Layer<B>>,
    final_norm: Option<Norm<B>>,
    /// `None` when the output projection is the (tied) embedding matrix.
    lm_head: Option<B::Weight>,
    /// The rotary table, grown as positions are reached (boxed: it holds
    /// its own copy of the rotary's settings and a lock).
    rope_table: Option<Box<RopeTable<B>>>,
    /// The rotary table of layers marked `local_rope` (Gemma 3).
    local_rope_table: Option<Box<RopeTable<B>>>,
    /// Positions the model instance can hold.
    max_positions: usize,
    /// [`Decoder::forward`] returns final hidden states, not logits
    /// (decoder embedders; see [`Decoder::output_hidden_states`]).
    hidden_out: bool,
}

/// The rotary tables one step reads, taken once for all its layers.
struct StepRopes<B: Backend> {
    global: Option<Arc<B::Tensor>>,
    local: Option<Arc<B::Tensor>>,
}

/// Loads tensors, checking each against the shape the config implies, and
/// absorbs checkpoint layouts (fused projections are split here).
struct Loader<'a, B: Backend> {
    backend: &'a B,
    src: &'a dyn WeightSource,
    /// Where matrices already in the backend's layout come from, or go.
    layouts: &'a Layouts,
    /// Added to RMSNorm weights (`DecoderConfig::norm_offset`).
    norm_offset: f32,
}

impl<B: Backend> Loader<'_, B> {
    fn tensor_err(&self, name: &str, msg: String) -> ModelError {
        ModelError::Tensor {
            path: self.src.describe().into(),
            tensor: name.to_string(),
            msg,
        }
    }

    fn check_shape(&self, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
        if got != want {
            return Err(self.tensor_err(
                name,
                format!("shape {got:?}, but the config implies {want:?}"),
            ));
        }
        Ok(())
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<B::Tensor> {
        let t = self.src.get(name)?;
        self.check_shape(name, &t.shape, shape)?;
        Ok(self.backend.upload(shape, t.data)?)
    }

    fn upload_weight(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        data: WeightData,
    ) -> Result<B::Weight> {
        self.layouts
            .upload(self.backend, name, rows, cols, data)
            .map_err(|e| self.tensor_err(name, e.to_string()))
    }

    /// A `[rows, cols]` matrix, kept in the checkpoint's encoding where the backend can use it.
    fn weight(&self, name: &str, rows: usize, cols: usize) -> Result<B::Weight> {
        let (shape, data) = self.src.get_weight(name)?;
        self.check_shape(name, &shape, &[rows, cols])?;
        self.upload_weight(name, rows, cols, data)
    }

    /// A `[rows, cols]` matrix only read by rows (`Backend::upload_table`),
    /// not kept in the stored layouts: the backend may leave it in the file.
    fn table(&self, name: &str, rows: usize, cols: usize) -> Result<B::Weight> {
        let (shape, data) = self.src.get_weight(name)?;
        self.check_shape(name, &shape, &[rows, cols])?;
        self.backend
            .upload_table(rows, cols, data)
            .map_err(|e| self.tensor_err(name, e.to_string()))
    }

    fn bias(&self, name: &str, n: usize) -> Result<Option<B::Tensor>> {
        let b = format!("{name}.bias");
        if self.src.contains(&b) {
            Ok(Some(self.tensor(&b, &[n])?))
        } else {
            Ok(None)
        }
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear<B>> {
        Ok(Linear {
            w: self.weight(&format!("{name}.weight"), out, inp)?,
            b: self.bias(name, out)?,
        })
    }

    /// Linear layers stored as one matrix (`fused`) of `rows[0] + rows[1] + …`
    /// rows (and bias), split into one layer per band.
    fn split_linear(&self, fused: &str, rows: &[usize], inp: usize) -> Result<Vec<Linear<B>>> {
        let total: usize = rows.iter().sum();
        let wname = format!("{fused}.weight");
        let (shape, data) = self.src.get_weight(&wname)?;
        self.check_shape(&wname, &shape, &[total, inp])?;
        let parts = data
            .split_rows(inp, rows)
            .map_err(|e| self.tensor_err(&wname, e))?;
        let bname = format!("{fused}.bias");
        let mut biases: Vec<Option<Vec<f32>>> = vec![None; rows.len()];
        if self.src.contains(&bname) {
            let b = self.src.get(&bname)?;
            self.check_shape(&bname, &b.shape, &[total])?;
            let mut start = 0;
            for (slot, &r) in biases.iter_mut().zip(rows) {
                *slot = Some(b.data[start..start + r].to_vec());
                start += r;
            }
        }
        parts
            .into_iter()
            .zip(biases)
            .zip(rows)
            .map(|((w, b), &r)| {
                Ok(Linear {
                    w: self.upload_weight(&wname, r, inp, w)?,
                    b: b.map(|b| self.backend.upload(&[r], b)).transpose()?,
                })
            })
            .collect()
    }

    /// An RMSNorm weight, `norm_offset` added (Gemma's `1 + w`).
    fn rms_weight(&self, name: &str, dim: usize) -> Result<B::Tensor> {
        if self.norm_offset == 0.0 {
            return self.tensor(name, &[dim]);
        }
        let mut t = self.src.get(name)?;
        self.check_shape(name, &t.shape, &[dim])?;
        t.data.iter_mut().for_each(|w| *w += self.norm_offset);
        Ok(self.backend.upload(&[dim], t.data)?)
    }

    fn norm(&self, kind: NormKind, name: &str, dim: usize) -> Result<Norm<B>> {
        let w = format!("{name}.weight");
        Ok(match kind {
            NormKind::Rms => Norm::Rms(self.rms_weight(&w, dim)?),
            NormKind::Layer => Norm::Layer(
                self.tensor(&w, &[dim])?,
                self.tensor(&format!("{name}.bias"), &[dim])?,
            ),
        })
    }

    fn layer(&self, cfg: &DecoderConfig, i: usize) -> Result<Layer<B>> {
        let h = cfg.hidden_size;
        let q_dim = cfg.n_heads * cfg.head_dim;
        let kv_dim = cfg.n_kv_heads * cfg.head_dim;
        let p = |s: &str| format!("blk.{i}.{s}");
        let [q, k, v] = if self.src.contains(&p("attn_q.weight")) {
            [
                self.linear(&p("attn_q"), q_dim, h)?,
                self.linear(&p("attn_k"), kv_dim, h)?,
                self.linear(&p("attn_v"), kv_dim, h)?,
            ]
        } else {
            let parts = self.split_linear(&p("attn_qkv"), &[q_dim, kv_dim, kv_dim], h)?;
            <[Linear<B>; 3]>::try_from(parts)
                .map_err(|_| self.tensor_err(&p("attn_qkv"), "not three parts".into()))?
        };
        let qk_norm = if cfg.qk_norm {
            Some((
                self.rms_weight(&p("attn_q_norm.weight"), cfg.head_dim)?,
                self.rms_weight(&p("attn_k_norm.weight"), cfg.head_dim)?,
            ))
        } else {
            None
        };
        let sinks = if cfg.attn_sinks {
            let name = p("attn_sinks.weight");
            let t = self.src.get(&name)?;
            self.check_shape(&name, &t.shape, &[cfg.n_heads])?;
            Some(t.data)
        } else {
            None
        };
        let ffn = if let Some(m) = moe::MoeFfn::load(self, cfg, i)? {
            Ffn::Moe(Box::new(m))
        } else {
            self.dense_ffn(cfg, i)?
        };
        Ok(Layer {
            attn_norm: self.norm(cfg.norm, &p("attn_norm"), h)?,
            q,
            k,
            v,
            qk_norm,
            o: self.linear(&p("attn_output"), h, q_dim)?,
            ffn_norm: self.norm(cfg.norm, &p("ffn_norm"), h)?,
            ffn,
            post_norms: if cfg.post_norms {
                Some((
                    self.norm(cfg.norm, &p("post_attention_norm"), h)?,
                    self.norm(cfg.norm, &p("post_ffw_norm"), h)?,
                ))
            } else {
                None
            },
            sinks,
        })
    }

    fn dense_ffn(&self, cfg: &DecoderConfig, i: usize) -> Result<Ffn<B>> {
        let h = cfg.hidden_size;
        let ff = cfg.intermediate_size;
        let p = |s: &str| format!("blk.{i}.{s}");
        let (gate, up) = if !cfg.gated_ffn {
            (None, self.linear(&p("ffn_up"), ff, h)?)
        } else if self.src.contains(&p("ffn_gate.weight")) {
            (
                Some(self.linear(&p("ffn_gate"), ff, h)?),
                self.linear(&p("ffn_up"), ff, h)?,
            )
        } else {
            // Gate and up projections stored as one matrix, gate first (Phi-3).
            let fused = if self.src.contains(&p("ffn_gate_up.weight")) {
                p("ffn_gate_up")
            } else {
                p("ffn_up")
            };
            let mut parts = self.split_linear(&fused, &[ff, ff], h)?.into_iter();
            match (parts.next(), parts.next()) {
                (Some(g), Some(u)) => (Some(g), u),
                _ => return Err(self.tensor_err(&fused, "not two parts".into())),
            }
        };
        Ok(Ffn::Dense {
            gate,
            up,
            down: self.linear(&p("ffn_down"), h, ff)?,
        })
    }
}

impl<B: Backend> Decoder<B> {
    /// Loads every weight the config calls for from `src` onto `backend`.
    /// `max_positions` bounds the context (and the position tables).
    pub fn load(
        backend: &B,
        cfg: DecoderConfig,
        src: &dyn WeightSource,
        max_positions: usize,
    ) -> Result<Self> {
        Self::load_with(backend, cfg, src, max_positions, &Layouts::Off)
    }

    /// [`Decoder::load`], taking matrices already in the backend's layout
    /// from `layouts` where it has them (or recording them there).
    pub fn load_with(
        backend: &B,
        cfg: DecoderConfig,
        src: &dyn WeightSource,
        max_positions: usize,
        layouts: &Layouts,
    ) -> Result<Self> {
        let l = Loader {
            backend,
            src,
            layouts,
            norm_offset: cfg.norm_offset,
        };
        let (h, e) = (cfg.hidden_size, cfg.embed_dim);
        // With an output matrix of its own, the embedding is only looked up by rows.
        let embed = if cfg.tie_word_embeddings && !src.contains("output.weight") {
            l.weight("token_embd.weight", cfg.vocab_size, e)?
        } else {
            l.table("token_embd.weight", cfg.vocab_size, e)?
        };
        let positions = match cfg.learned_positions {
            Some(offset) => {
                let name = "pos_embd.weight";
                let t = src.get(name)?;
                let rows = t.shape.first().copied().unwrap_or(0);
                l.check_shape(name, &t.shape, &[rows, h])?;
                if rows < max_positions + offset {
                    return Err(l.tensor_err(
                        name,
                        format!(
                            "{rows} rows cannot hold {max_positions} positions at offset {offset}"
                        ),
                    ));
                }
                Some(backend.upload(&[rows, h], t.data)?)
            }
            None => None,
        };
        let (proj_in, proj_out) = if e != h {
            (
                Some(l.weight("proj_in.weight", h, e)?),
                Some(l.weight("proj_out.weight", e, h)?),
            )
        } else {
            (None, None)
        };
        let layers = (0..cfg.n_layers)
            .map(|i| l.layer(&cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = if cfg.final_norm {
            Some(l.norm(cfg.norm, "output_norm", h)?)
        } else {
            None
        };
        let lm_head = if cfg.tie_word_embeddings && !src.contains("output.weight") {
            None
        } else {
            Some(l.weight("output.weight", cfg.vocab_size, e)?)
        };
        let rope_table = cfg
            .rope
            .clone()
            .map(|r| Box::new(RopeTable::new(r, max_positions)));
        let local_rope_table = cfg
            .local_rope
            .clone()
            .map(|r| Box::new(RopeTable::new(r, max_positions)));
        Ok(Self {
            cfg,
            embed,
            positions,
            proj_in,
            proj_out,
            layers,
            final_norm,
            lm_head,
            rope_table,
            local_rope_table,
            max_positions,
            hidden_out: false,
        })
    }

    /// With `on`, [`Decoder::forward`] returns the hidden states of
    /// `input.logit_rows` after the final norm (`rows * hidden_size`
    /// values) instead of logits: what a decoder embedder (Qwen3-Embedding)
    /// pools. The output projection is then never used.
    pub fn output_hidden_states(&mut self, on: bool) {
        self.hidden_out = on;
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// Longest sequence (prompt + output) this instance can hold.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    fn norm(&self, be: &B, n: &Norm<B>, x: &B::Tensor) -> Result<B::Tensor> {
        Ok(match n {
            Norm::Rms(w) => be.rms_norm(x, w, self.cfg.norm_eps)?,
            Norm::Layer(w, b) => be.layer_norm(x, w, b, self.cfg.norm_eps)?,
        })
    }

    fn linear(be: &B, l: &Linear<B>, x: &B::Tensor) -> Result<B::Tensor> {
        Ok(be.linear(x, &l.w, l.b.as_ref())?)
    }

    /// [`Decoder::linear`] of `x` against each of `ls`, as one backend
    /// operation ([`Backend::linear_many`]).
    fn linears<const N: usize>(
        be: &B,
        ls: [&Linear<B>; N],
        x: &B::Tensor,
    ) -> Result<[B::Tensor; N]> {
        linear_array(be, x, ls.map(|l| (&l.w, l.b.as_ref())))
    }

    /// RMSNorm of every `heads`-wide head of `x: [tokens, heads * head_dim]`.
    fn head_norm(&self, be: &B, x: B::Tensor, w: &B::Tensor, heads: usize) -> Result<B::Tensor> {
        let hd = self.cfg.head_dim;
        let tokens = be.shape(&x).first().copied().unwrap_or(0);
        let x = be.reshape(x, &[tokens * heads, hd])?;
        let x = be.rms_norm(&x, w, self.cfg.norm_eps)?;
        Ok(be.reshape(x, &[tokens, heads * hd])?)
    }

    /// Runs one step and returns the logits of `input.logit_rows`, row after
    /// row (`logit_rows.len() * vocab_size` values).
    pub fn forward(&self, be: &B, kv: &mut B::KvCache, input: &StepInput) -> Result<Vec<f32>> {
        be.execute(|| self.forward_inner(be, kv, input, &LoraStep::none()))
    }

    /// [`Decoder::forward`] with LoRA adapters: each of `lora`'s groups of
    /// rows gets its adapter's delta on the projections it targets.
    pub fn forward_lora(
        &self,
        be: &B,
        kv: &mut B::KvCache,
        input: &StepInput,
        lora: &LoraStep<'_, B>,
    ) -> Result<Vec<f32>> {
        lora.check(input.tokens.len(), self.layers.len())?;
        be.execute(|| self.forward_inner(be, kv, input, lora))
    }

    // The step's context (cache, step, params) travels as separate borrows
    // because the cache is borrowed mutably while the rest is shared.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        be: &B,
        layer: &Layer<B>,
        i: usize,
        h: &B::Tensor,
        kv: &mut B::KvCache,
        step: &B::Step,
        attn: &AttentionParams,
        ropes: &StepRopes<B>,
        lora: &LoraStep<'_, B>,
        cut: Option<&LoraStep<'_, B>>,
    ) -> Result<B::Tensor> {
        let cfg = &self.cfg;
        let [mut q, mut k, mut v] = Self::linears(be, [&layer.q, &layer.k, &layer.v], h)?;
        lora.apply(be, i, Proj::Q, h, &mut q)?;
        lora.apply(be, i, Proj::K, h, &mut k)?;
        lora.apply(be, i, Proj::V, h, &mut v)?;
        if let Some((qn, kn)) = &layer.qk_norm {
            q = self.head_norm(be, q, qn, cfg.n_heads)?;
            k = self.head_norm(be, k, kn, cfg.n_kv_heads)?;
        }
        let kind = cfg.layer_attention(i);
        let (rope, table) = if kind.local_rope {
            (&cfg.local_rope, &ropes.local)
        } else {
            (&cfg.rope, &ropes.global)
        };
        if let (Some(r), Some(table)) = (rope, table.as_deref()) {
            be.rope_inplace(
                &mut q,
                table,
                step,
                cfg.n_heads,
                cfg.head_dim,
                r.rot_dim,
                r.layout,
            )?;
            be.rope_inplace(
                &mut k,
                table,
                step,
                cfg.n_kv_heads,
                cfg.head_dim,
                r.rot_dim,
                r.layout,
            )?;
        }
        be.write_kv(kv, i, &k, &v, step)?;
        let attn = AttentionParams {
            window: kind.window,
            sinks: layer.sinks.as_deref().or(attn.sinks),
            ..*attn
        };
        let a = be.attention(&q, kv, i, step, &attn)?;
        // `cut`: only the logit rows go on, with their adapters renumbered.
        let (a, lora) = match cut {
            Some(selected) => (be.select_logit_rows(&a, step)?, selected),
            None => (a, lora),
        };
        let mut o = Self::linear(be, &layer.o, &a)?;
        lora.apply(be, i, Proj::O, &a, &mut o)?;
        Ok(o)
    }

    fn ffn(
        &self,
        be: &B,
        layer: &Layer<B>,
        i: usize,
        h: &B::Tensor,
        lora: &LoraStep<'_, B>,
    ) -> Result<B::Tensor> {
        let dense = match &layer.ffn {
            Ffn::Dense { gate, up, down } => (gate.as_ref(), up, down),
            Ffn::Moe(m) => return m.forward(be, &self.cfg, h, i, lora),
        };
        let shape = be.shape(h);
        let rows = shape.first().copied().unwrap_or(0);
        let piece = match be.feed_forward_rows() {
            Some(p) if p > 0 && rows > p => p,
            _ => return self.dense_ffn(be, dense, i, h, lora),
        };
        // In pieces of rows (the backend's bound on intermediates): each
        // piece's rows are added into zeros, so every row ends with its
        // own result.
        let cols = shape.last().copied().unwrap_or(0);
        let mut out = be.upload(&[rows, cols], vec![0.0; rows * cols])?;
        let ones = vec![1.0f32; piece];
        for r0 in (0..rows).step_by(piece) {
            let r1 = (r0 + piece).min(rows);
            let idx: Vec<u32> = (r0 as u32..r1 as u32).collect();
            let part = be.gather_rows(h, &idx)?;
            let y = self.dense_ffn(be, dense, i, &part, &lora.select(&idx))?;
            be.add_rows_scaled(&mut out, &y, &idx, &ones[..idx.len()])?;
        }
        Ok(out)
    }

    /// [`Decoder::ffn`] of layer `i`'s dense feed-forward (its gate, up
    /// and down projections) on all of `h`'s rows at once.
    fn dense_ffn(
        &self,
        be: &B,
        (gate, up, down): DenseFfn<'_, B>,
        i: usize,
        h: &B::Tensor,
        lora: &LoraStep<'_, B>,
    ) -> Result<B::Tensor> {
        let act = match gate {
            Some(g) => {
                let [mut g, mut up] = Self::linears(be, [g, up], h)?;
                lora.apply(be, i, Proj::Up, h, &mut up)?;
                lora.apply(be, i, Proj::Gate, h, &mut g)?;
                // Over `up`, and `g` is dropped here: the down projection
                // runs with one tensor of the feed-forward's width alive.
                be.gated_activation_into(&g, up, self.cfg.activation)?
            }
            None => {
                let mut up = Self::linear(be, up, h)?;
                lora.apply(be, i, Proj::Up, h, &mut up)?;
                be.activation_inplace(&mut up, self.cfg.activation)?;
                up
            }
        };
        let mut out = Self::linear(be, down, &act)?;
        lora.apply(be, i, Proj::Down, &act, &mut out)?;
        Ok(out)
    }

    fn forward_inner(
        &self,
        be: &B,
        kv: &mut B::KvCache,
        input: &StepInput,
        lora: &LoraStep<'_, B>,
    ) -> Result<Vec<f32>> {
        if let Some(&p) = input
            .positions
            .iter()
            .find(|&&p| p as usize >= self.max_positions)
        {
            return Err(ModelError::Backend(kiln_backend::BackendError::Invalid {
                op: "forward",
                msg: format!(
                    "position {p} beyond the model's {} positions",
                    self.max_positions
                ),
            }));
        }
        let cfg = &self.cfg;
        let step = be.prepare_step(input)?;
        let end = input.positions.iter().max().map_or(0, |&p| p as usize + 1);
        let covering =
            |t: &Option<Box<RopeTable<B>>>| t.as_ref().map(|t| t.covering(be, end)).transpose();
        let ropes = StepRopes {
            global: covering(&self.rope_table)?,
            local: covering(&self.local_rope_table)?,
        };
        let attn = AttentionParams {
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            scale: cfg
                .attn_scale
                .unwrap_or_else(|| 1.0 / (cfg.head_dim as f32).sqrt()),
            window: cfg.sliding_window,
            softcap: cfg.attn_logit_softcap,
            sinks: None,
        };
        let mut x = be.embedding(&self.embed, &step)?;
        if let Some(s) = cfg.embed_scale {
            be.scale_inplace(&mut x, s)?;
        }
        if let Some(p) = &self.proj_in {
            x = be.linear(&x, p, None)?;
        }
        if let (Some(table), Some(offset)) = (&self.positions, cfg.learned_positions) {
            be.add_position_embedding(&mut x, table, offset, &step)?;
        }
        // The last layer writes its keys and values and attends for every
        // row, then goes on with only the rows whose logits are wanted (as
        // llama.cpp does); when those are all rows, in order, nothing is cut.
        let all_rows = input.logit_rows.len() == input.tokens.len()
            && (0..).zip(&input.logit_rows).all(|(i, &r)| i == r);
        let cut_at = (!all_rows)
            .then(|| self.layers.len().checked_sub(1))
            .flatten();
        // After the cut, row k is the step's row `logit_rows[k]`: the
        // adapters' row groups are renumbered to match.
        let cut_lora = match cut_at {
            Some(_) => lora.select(&input.logit_rows),
            None => LoraStep::none(),
        };
        let mut lora = lora;
        for (i, layer) in self.layers.iter().enumerate() {
            let cut = cut_at == Some(i);
            if cfg.pre_norm {
                let h = self.norm(be, &layer.attn_norm, &x)?;
                let mut a = self.attention(
                    be,
                    layer,
                    i,
                    &h,
                    kv,
                    &step,
                    &attn,
                    &ropes,
                    lora,
                    cut.then_some(&cut_lora),
                )?;
                if cut {
                    if input.logit_rows.is_empty() {
                        return Ok(Vec::new());
                    }
                    x = be.select_logit_rows(&x, &step)?;
                    lora = &cut_lora;
                }
                if let Some((post, _)) = &layer.post_norms {
                    a = self.norm(be, post, &a)?;
                }
                be.add_inplace(&mut x, &a)?;
                let h = self.norm(be, &layer.ffn_norm, &x)?;
                let mut f = self.ffn(be, layer, i, &h, lora)?;
                if let Some((_, post)) = &layer.post_norms {
                    f = self.norm(be, post, &f)?;
                }
                be.add_inplace(&mut x, &f)?;
            } else {
                // Post-norm blocks (OPT-350m): normalise after each residual add.
                let a = self.attention(
                    be,
                    layer,
                    i,
                    &x,
                    kv,
                    &step,
                    &attn,
                    &ropes,
                    lora,
                    cut.then_some(&cut_lora),
                )?;
                if cut {
                    if input.logit_rows.is_empty() {
                        return Ok(Vec::new());
                    }
                    x = be.select_logit_rows(&x, &step)?;
                    lora = &cut_lora;
                }
                be.add_inplace(&mut x, &a)?;
                x = self.norm(be, &layer.attn_norm, &x)?;
                let f = self.ffn(be, layer, i, &x, lora)?;
                be.add_inplace(&mut x, &f)?;
                x = self.norm(be, &layer.ffn_norm, &x)?;
            }
        }
        // Only the requested rows go through the final norm and the (large) output projection.
        let mut x = if cut_at.is_some() || all_rows {
            x
        } else {
            be.select_logit_rows(&x, &step)?
        };
        if let Some(n) = &self.final_norm {
            x = self.norm(be, n, &x)?;
        }
        if self.hidden_out {
            return Ok(be.to_host(&x)?);
        }
        if let Some(p) = &self.proj_out {
            x = be.linear(&x, p, None)?;
        }
        let logits = be.linear(&x, self.lm_head.as_ref().unwrap_or(&self.embed), None)?;
        let mut logits = be.to_host(&logits)?;
        if let Some(cap) = cfg.final_logit_softcap {
            logits.iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap);
        }
        Ok(logits)
    }
}
