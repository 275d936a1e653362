//! The BERT / XLM-RoBERTa encoder stack: embeddings (word + token type +
//! absolute position, then LayerNorm), then post-LayerNorm blocks of
//! bidirectional self-attention and a GELU feed-forward, on the
//! [`Backend`] ops. Its output is the last hidden state of every token.

use super::config::EncoderConfig;
use crate::weights::{SafetensorsSource, WeightSource};
use crate::{HostTensor, ModelError, Result};
use kiln_backend::{Backend, BidirParams, WeightData};
use std::path::Path;

/// One encoder block's weights.
struct Layer<B: Backend> {
    q: (B::Weight, B::Tensor),
    k: (B::Weight, B::Tensor),
    v: (B::Weight, B::Tensor),
    attn_out: (B::Weight, B::Tensor),
    attn_norm: (B::Tensor, B::Tensor),
    up: (B::Weight, B::Tensor),
    down: (B::Weight, B::Tensor),
    out_norm: (B::Tensor, B::Tensor),
}

/// A loaded BERT-style encoder on backend `B`.
pub struct BertEncoder<B: Backend> {
    pub config: EncoderConfig,
    /// Embedding tables stay on the host: a lookup is a row copy, and the
    /// sum of the three is uploaded once per call.
    word: HostTensor,
    position: HostTensor,
    token_type: HostTensor,
    emb_norm: (B::Tensor, B::Tensor),
    layers: Vec<Layer<B>>,
}

/// Reads tensors under one of the prefixes checkpoints use (`bert.`,
/// `roberta.` in task heads; none in a bare `BertModel`), checking shapes.
struct Reader<'a> {
    src: &'a SafetensorsSource,
    prefix: &'static str,
    dir: &'a Path,
}

fn identity(name: &str) -> Option<String> {
    Some(name.to_string())
}

impl Reader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let full = format!("{}{name}", self.prefix);
        if !self.src.contains(&full) {
            return Err(ModelError::MissingTensor {
                path: self.dir.to_path_buf(),
                tensor: full,
            });
        }
        let t = self.src.get(&full)?;
        if t.shape != shape {
            return Err(ModelError::Tensor {
                path: self.dir.to_path_buf(),
                tensor: full,
                msg: format!("shape {:?}, the config says {shape:?}", t.shape),
            });
        }
        Ok(t)
    }
}

impl<B: Backend> BertEncoder<B> {
    /// Loads the encoder's weights from the safetensors checkpoint in `dir`.
    pub fn load(dir: &Path, config: EncoderConfig, backend: &B) -> Result<Self> {
        let src = SafetensorsSource::open_dir(dir, identity)?;
        let prefix = ["", "bert.", "roberta."]
            .into_iter()
            .find(|p| src.contains(&format!("{p}embeddings.word_embeddings.weight")))
            .ok_or_else(|| ModelError::MissingTensor {
                path: dir.to_path_buf(),
                tensor: "embeddings.word_embeddings.weight".into(),
            })?;
        let r = Reader {
            src: &src,
            prefix,
            dir,
        };
        let d = config.hidden_size;
        let ff = config.intermediate_size;
        let vec = |name: &str, n: usize| -> Result<B::Tensor> {
            Ok(backend.upload(&[n], r.get(name, &[n])?.data)?)
        };
        let lin = |name: &str, out: usize, inp: usize| -> Result<(B::Weight, B::Tensor)> {
            let w = r.get(&format!("{name}.weight"), &[out, inp])?;
            Ok((
                backend.upload_weight(out, inp, WeightData::F32(w.data))?,
                vec(&format!("{name}.bias"), out)?,
            ))
        };
        let norm = |name: &str| -> Result<(B::Tensor, B::Tensor)> {
            Ok((
                vec(&format!("{name}.weight"), d)?,
                vec(&format!("{name}.bias"), d)?,
            ))
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: lin(&format!("{p}.attention.self.query"), d, d)?,
                k: lin(&format!("{p}.attention.self.key"), d, d)?,
                v: lin(&format!("{p}.attention.self.value"), d, d)?,
                attn_out: lin(&format!("{p}.attention.output.dense"), d, d)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                up: lin(&format!("{p}.intermediate.dense"), ff, d)?,
                down: lin(&format!("{p}.output.dense"), d, ff)?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(Self {
            word: r.get("embeddings.word_embeddings.weight", &[config.vocab_size, d])?,
            position: r.get(
                "embeddings.position_embeddings.weight",
                &[config.max_positions, d],
            )?,
            token_type: r.get(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, d],
            )?,
            emb_norm: norm("embeddings.LayerNorm")?,
            layers,
            config,
        })
    }

    /// The last hidden state (`[len, hidden]`, row-major) of each sequence
    /// of token ids, all run as one batch. Token type ids are 0. The caller
    /// has checked the ids ([`super::check_ids`]).
    pub fn forward(&self, backend: &B, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        self.forward_typed(backend, seqs, None)
    }

    /// [`Self::forward`] with token type ids (segment A / B of a
    /// cross-encoder's pair), one list per sequence; ids beyond the type
    /// table are an error.
    pub fn forward_typed(
        &self,
        backend: &B,
        seqs: &[&[u32]],
        types: Option<&[&[u32]]>,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let d = c.hidden_size;
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let total: usize = lens.iter().sum();
        let mut x = Vec::with_capacity(total * d);
        for (s, seq) in seqs.iter().enumerate() {
            for (i, &id) in seq.iter().enumerate() {
                let word = &self.word.data[id as usize * d..(id as usize + 1) * d];
                let t = types
                    .and_then(|t| t.get(s).and_then(|t| t.get(i)))
                    .copied()
                    .unwrap_or(0) as usize;
                if t >= c.type_vocab_size {
                    return Err(kiln_backend::BackendError::Invalid {
                        op: "encoder embeddings",
                        msg: format!(
                            "token type {t} is outside the type table ({})",
                            c.type_vocab_size
                        ),
                    }
                    .into());
                }
                let ty = &self.token_type.data[t * d..(t + 1) * d];
                let pos = c.position_offset + i;
                let pos = &self.position.data[pos * d..(pos + 1) * d];
                // transformers' order: (inputs + token types) + positions.
                x.extend(word.iter().zip(ty).zip(pos).map(|((w, t), p)| (w + t) + p));
            }
        }
        let eps = c.layer_norm_eps;
        let x = backend.upload(&[total, d], x)?;
        let mut x = backend.layer_norm(&x, &self.emb_norm.0, &self.emb_norm.1, eps)?;
        let params = BidirParams {
            n_heads: c.num_heads,
            head_dim: c.head_dim(),
            scale: 1.0 / (c.head_dim() as f32).sqrt(),
        };
        for l in &self.layers {
            let q = backend.linear(&x, &l.q.0, Some(&l.q.1))?;
            let k = backend.linear(&x, &l.k.0, Some(&l.k.1))?;
            let v = backend.linear(&x, &l.v.0, Some(&l.v.1))?;
            let a = backend.attention_bidirectional(&q, &k, &v, &lens, &params)?;
            let mut a = backend.linear(&a, &l.attn_out.0, Some(&l.attn_out.1))?;
            backend.add_inplace(&mut a, &x)?;
            x = backend.layer_norm(&a, &l.attn_norm.0, &l.attn_norm.1, eps)?;
            let mut h = backend.linear(&x, &l.up.0, Some(&l.up.1))?;
            backend.activation_inplace(&mut h, c.act)?;
            let mut h = backend.linear(&h, &l.down.0, Some(&l.down.1))?;
            backend.add_inplace(&mut h, &x)?;
            x = backend.layer_norm(&h, &l.out_norm.0, &l.out_norm.1, eps)?;
        }
        let host = backend.to_host(&x)?;
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for n in lens {
            out.push(host[start * d..(start + n) * d].to_vec());
            start += n;
        }
        Ok(out)
    }
}
