//! `--device`: parsed once for `serve`, `generate` and `bench`; a GPU that
//! this build or this machine cannot use is a clear error before any model
//! is read, never a panic.

use std::process::Command;

fn kiln(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("KILN_DEVICE")
        .env_remove("KILN_CUDA_UNVERIFIED")
        .output()
        .expect("run kiln");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// What `--device cuda` says on this build and machine. Without the
/// feature: how to build it. With it, on a machine without the NVIDIA
/// driver (CI): that libcuda.so is missing. (With a driver and a GPU: that
/// the backend is unverified, naming the device.)
fn assert_cuda_refused(code: Option<i32>, out: &str) {
    assert_eq!(code, Some(1), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    assert!(
        !out.contains("/nonexistent"),
        "the model was looked at: {out}"
    );
    #[cfg(not(feature = "cuda"))]
    assert!(
        out.contains("this kiln was built without the cuda feature")
            && out.contains("--features cuda"),
        "{out}"
    );
    #[cfg(feature = "cuda")]
    assert!(
        out.contains("libcuda.so (the NVIDIA driver)")
            || out.contains("has not been verified on a GPU"),
        "{out}"
    );
}

#[test]
fn generate_and_bench_refuse_an_unusable_gpu_before_loading() {
    for cmd in [
        vec![
            "generate",
            "--device",
            "cuda",
            "--model",
            "/nonexistent/m.gguf",
            "hi",
        ],
        vec![
            "bench",
            "--device",
            "cuda:1",
            "--model",
            "/nonexistent/m.gguf",
        ],
    ] {
        let (code, out) = kiln(&cmd);
        assert_cuda_refused(code, &out);
    }
}

#[test]
fn serve_refuses_an_unusable_gpu_at_start() {
    let (code, out) = kiln(&[
        "serve",
        "--device",
        "cuda",
        "--port",
        "0",
        "--models",
        "m=/nonexistent",
    ]);
    assert_cuda_refused(code, &out);
}

#[test]
fn a_malformed_device_is_a_usage_error_naming_the_choices() {
    let (code, out) = kiln(&["generate", "--device", "cuda:x", "hi"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("expected cpu, cuda or cuda:N"), "{out}");
}
