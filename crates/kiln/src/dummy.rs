//! `kiln bench --dummy-weights --arch NAME`: a model of a published shape
//! with random weights, put on the device by the same launch path a file
//! takes ([`kiln_engine::launch::load_from`]); the shapes and the weights
//! are [`kiln_model::dummy`]'s.

use anyhow::{bail, Context};
use kiln_backend::Backend;
use kiln_engine::launch::{self, DeviceModel, LaunchError, ModelSource};
use kiln_model::dummy::{self, Shape};
use kiln_model::{LoadOptions, LoadedModel};

use crate::model_args::ModelArgs;

/// The generated model as a [`ModelSource`].
struct Generated<'a> {
    shape: &'static Shape,
    opts: &'a LoadOptions,
    tokenizer: &'a std::path::Path,
}

impl ModelSource for Generated<'_> {
    fn load_onto<B: Backend>(&self, backend: &B) -> Result<LoadedModel<B>, LaunchError> {
        Ok(dummy::load(backend, self.shape, self.opts, self.tokenizer)?)
    }
}

/// Builds `arch`'s model with random weights on `model`'s device, in its
/// `--quantize`/`--dtype` format; `--model` must not be given.
pub fn load(arch: &str, model: &ModelArgs) -> anyhow::Result<(DeviceModel, &'static Shape)> {
    if model.model.is_some() {
        bail!("--dummy-weights builds the model from --arch; leave out --model");
    }
    let shape = dummy::shape(arch)?;
    let tokenizer = kiln_model::default_model::default_model_path()
        .context("--dummy-weights takes the default model's tokenizer, which is missing")?;
    let opts = model.options();
    let source = Generated {
        shape,
        opts: &opts,
        tokenizer: &tokenizer,
    };
    let m = launch::load_from(model.device, &source)
        .with_context(|| format!("cannot build the {arch} shape"))?;
    Ok((m, shape))
}

/// Bytes of weights one decoded token reads in `shape` built with `opts`.
pub fn bytes_read_per_token(shape: &Shape, opts: &LoadOptions) -> anyhow::Result<u64> {
    let cfg = shape.config()?;
    let tensors = dummy::tensors(&cfg, opts);
    Ok(dummy::bytes_read_per_token(
        &cfg,
        tensors.iter().map(|t| (t.name.as_str(), t.bytes())),
    ))
}
