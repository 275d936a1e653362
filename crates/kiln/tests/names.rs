//! One name table for weight formats and dtypes: every spelling
//! `kiln_model::names` lists is taken alike by `--quantize` (the model
//! arguments of `serve`, `generate` and `bench`), `option.quantize` in
//! `serving.properties` and `kiln inspect --quantize`.

use std::path::Path;
use std::process::{Command, Output};

use kiln_model::names::{quantize_name, QUANTIZE_NAMES};
use kiln_model::WeightDtype;
use kiln_server::properties::ModelProperties;

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .output()
        .expect("run kiln")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn properties(text: &str) -> ModelProperties {
    match ModelProperties::parse(text, Path::new("serving.properties"), &|_: &str| None) {
        Ok(p) => p,
        Err(e) => panic!("{text}: {e}"),
    }
}

/// Every spelling, in lower and upper case, on all three surfaces.
#[test]
fn every_quantize_spelling_works_on_every_surface() {
    for (name, ty) in QUANTIZE_NAMES {
        for spelling in [name.to_string(), name.to_ascii_uppercase()] {
            let p = properties(&format!("option.quantize={spelling}"));
            assert_eq!(p.quantize, Some(*ty), "option.quantize={spelling}");

            let out = kiln(&[
                "inspect",
                "testdata/configs/opt-13b",
                "--quantize",
                &spelling,
                "--json",
            ]);
            assert!(out.status.success(), "inspect {spelling}: {}", text(&out));
            let v: serde_json::Value =
                serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("json");
            assert_eq!(v["dtype"], quantize_name(*ty), "inspect {spelling}");

            // The argument parses: the run gets as far as the model path.
            let out = kiln(&[
                "generate",
                "hi",
                "--model",
                "/nonexistent/model.gguf",
                "--quantize",
                &spelling,
            ]);
            let t = text(&out);
            assert!(!out.status.success(), "{t}");
            assert!(
                t.contains("/nonexistent/model.gguf"),
                "--quantize {spelling}: {t}"
            );
            assert!(!t.contains("invalid value"), "--quantize {spelling}: {t}");
        }
    }
}

/// An unknown name is refused on each surface with the same list of names.
#[test]
fn unknown_quantize_names_list_the_same_formats_everywhere() {
    let list = kiln_model::names::target_list();
    let err = match ModelProperties::parse(
        "option.quantize=int3",
        Path::new("serving.properties"),
        &|_: &str| None,
    ) {
        Ok(p) => panic!("int3 was taken: {p:?}"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&list), "{err}");
    for args in [
        &["inspect", "testdata/configs/opt-13b", "--quantize", "int3"][..],
        &["generate", "hi", "--quantize", "int3"][..],
    ] {
        let out = kiln(args);
        assert!(!out.status.success());
        assert!(text(&out).contains(&list), "{args:?}: {}", text(&out));
    }
}

/// The dtype aliases (`f16` and `half` alike) on the CLI and in the file.
#[test]
fn dtype_aliases_work_on_every_surface() {
    for spelling in ["f16", "half", "fp16", "float16"] {
        assert_eq!(WeightDtype::parse(spelling), Some(WeightDtype::F16));
        let p = properties(&format!("option.dtype={spelling}"));
        assert_eq!(p.dtype, WeightDtype::F16, "option.dtype={spelling}");
        let out = kiln(&["inspect", "testdata/configs/opt-13b", "--dtype", spelling]);
        assert!(
            out.status.success(),
            "inspect --dtype {spelling}: {}",
            text(&out)
        );
    }
}
