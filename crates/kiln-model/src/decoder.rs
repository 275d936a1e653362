//! The one decoder-only transformer every architecture is expressed as.
//!
//! Layout quirks of checkpoints are absorbed when weights are loaded, so
//! [`Decoder::forward`] is a short, branch-light walk over the layers. A
//! forward step takes any batch the scheduler built (a [`StepInput`]: prefill
//! chunks and decode tokens of many sequences, concatenated) and returns the
//! logits of the rows it asked for.

use kiln_backend::{AttentionParams, Backend, StepInput};

use crate::config::{DecoderConfig, NormKind};
use crate::weights::WeightSource;
use crate::{ModelError, Result};

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
    o: Linear<B>,
    ffn_norm: Norm<B>,
    gate: Option<Linear<B>>,
    up: Linear<B>,
    down: Linear<B>,
}

/// A loaded model on backend `B`.
pub struct Decoder<B: Backend> {
    cfg: DecoderConfig,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    final_norm: Norm<B>,
    /// `None` when the output projection is the (tied) embedding matrix.
    lm_head: Option<B::Weight>,
    rope_table: Option<B::Tensor>,
    /// Positions the rotary table covers.
    max_positions: usize,
}

/// Loads tensors, checking each against the shape the config implies.
struct Loader<'a, B: Backend> {
    backend: &'a B,
    src: &'a dyn WeightSource,
}

impl<B: Backend> Loader<'_, B> {
    fn check_shape(&self, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
        if got != want {
            return Err(ModelError::Tensor {
                path: self.src.describe().into(),
                tensor: name.to_string(),
                msg: format!("shape {got:?}, but the config implies {want:?}"),
            });
        }
        Ok(())
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<B::Tensor> {
        let t = self.src.get(name)?;
        self.check_shape(name, &t.shape, shape)?;
        Ok(self.backend.upload(shape, t.data)?)
    }

    /// A `[rows, cols]` matrix, kept in the checkpoint's encoding where the backend can use it.
    fn weight(&self, name: &str, rows: usize, cols: usize) -> Result<B::Weight> {
        let (shape, data) = self.src.get_weight(name)?;
        self.check_shape(name, &shape, &[rows, cols])?;
        self.backend
            .upload_weight(rows, cols, data)
            .map_err(|e| ModelError::Tensor {
                path: self.src.describe().into(),
                tensor: name.to_string(),
                msg: e.to_string(),
            })
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear<B>> {
        let bias_name = format!("{name}.bias");
        Ok(Linear {
            w: self.weight(&format!("{name}.weight"), out, inp)?,
            b: if self.src.contains(&bias_name) {
                Some(self.tensor(&bias_name, &[out])?)
            } else {
                None
            },
        })
    }

    fn norm(&self, kind: NormKind, name: &str, dim: usize) -> Result<Norm<B>> {
        let w = self.tensor(&format!("{name}.weight"), &[dim])?;
        Ok(match kind {
            NormKind::Rms => Norm::Rms(w),
            NormKind::Layer => Norm::Layer(w, self.tensor(&format!("{name}.bias"), &[dim])?),
        })
    }
}

impl<B: Backend> Decoder<B> {
    /// Loads every weight the config calls for from `src` onto `backend`.
    /// `max_positions` bounds the context (and the rotary table).
    pub fn load(
        backend: &B,
        cfg: DecoderConfig,
        src: &dyn WeightSource,
        max_positions: usize,
    ) -> Result<Self> {
        let l = Loader { backend, src };
        let h = cfg.hidden_size;
        let q_dim = cfg.n_heads * cfg.head_dim;
        let kv_dim = cfg.n_kv_heads * cfg.head_dim;
        let ff = cfg.intermediate_size;
        let embed = l.weight("token_embd.weight", cfg.vocab_size, h)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: l.norm(cfg.norm, &p("attn_norm"), h)?,
                q: l.linear(&p("attn_q"), q_dim, h)?,
                k: l.linear(&p("attn_k"), kv_dim, h)?,
                v: l.linear(&p("attn_v"), kv_dim, h)?,
                o: l.linear(&p("attn_output"), h, q_dim)?,
                ffn_norm: l.norm(cfg.norm, &p("ffn_norm"), h)?,
                gate: if cfg.gated_ffn {
                    Some(l.linear(&p("ffn_gate"), ff, h)?)
                } else {
                    None
                },
                up: l.linear(&p("ffn_up"), ff, h)?,
                down: l.linear(&p("ffn_down"), h, ff)?,
            });
        }
        let final_norm = l.norm(cfg.norm, "output_norm", h)?;
        let lm_head = if cfg.tie_word_embeddings && !src.contains("output.weight") {
            None
        } else {
            Some(l.weight("output.weight", cfg.vocab_size, h)?)
        };
        let rope_table = match (&cfg.rope, cfg.rope_table(max_positions)) {
            (Some(r), Some(t)) => Some(backend.upload(&[max_positions, r.rot_dim], t)?),
            _ => None,
        };
        Ok(Self {
            cfg,
            embed,
            layers,
            final_norm,
            lm_head,
            rope_table,
            max_positions,
        })
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

    /// Runs one step and returns the logits of `input.logit_rows`, row after
    /// row (`logit_rows.len() * vocab_size` values).
    pub fn forward(&self, be: &B, kv: &mut B::KvCache, input: &StepInput) -> Result<Vec<f32>> {
        be.execute(|| self.forward_inner(be, kv, input))
    }

    fn forward_inner(&self, be: &B, kv: &mut B::KvCache, input: &StepInput) -> Result<Vec<f32>> {
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
        let attn = AttentionParams {
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            scale: 1.0 / (cfg.head_dim as f32).sqrt(),
            window: cfg.sliding_window,
        };
        let mut x = be.embedding(&self.embed, &step)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = self.norm(be, &layer.attn_norm, &x)?;
            let mut q = Self::linear(be, &layer.q, &h)?;
            let mut k = Self::linear(be, &layer.k, &h)?;
            let v = Self::linear(be, &layer.v, &h)?;
            if let (Some(r), Some(table)) = (&cfg.rope, &self.rope_table) {
                be.rope_inplace(
                    &mut q,
                    table,
                    &step,
                    cfg.n_heads,
                    cfg.head_dim,
                    r.rot_dim,
                    r.layout,
                )?;
                be.rope_inplace(
                    &mut k,
                    table,
                    &step,
                    cfg.n_kv_heads,
                    cfg.head_dim,
                    r.rot_dim,
                    r.layout,
                )?;
            }
            be.write_kv(kv, i, &k, &v, &step)?;
            let a = be.attention(&q, kv, i, &step, &attn)?;
            let a = Self::linear(be, &layer.o, &a)?;
            be.add_inplace(&mut x, &a)?;

            let h = self.norm(be, &layer.ffn_norm, &x)?;
            let up = Self::linear(be, &layer.up, &h)?;
            let act = match &layer.gate {
                Some(g) => be.gated_activation(&Self::linear(be, g, &h)?, &up, cfg.activation)?,
                None => {
                    let mut up = up;
                    be.activation_inplace(&mut up, cfg.activation)?;
                    up
                }
            };
            let f = Self::linear(be, &layer.down, &act)?;
            be.add_inplace(&mut x, &f)?;
        }
        // Only the requested rows go through the final norm and the (large) output projection.
        let x = be.select_logit_rows(&x, &step)?;
        let x = self.norm(be, &self.final_norm, &x)?;
        let logits = be.linear(&x, self.lm_head.as_ref().unwrap_or(&self.embed), None)?;
        Ok(be.to_host(&logits)?)
    }
}
