//! What `kd generate` prints when its output is not a terminal (a script or CI log): one line per
//! image with its path, seed and size, then a summary; `--json` prints the same as JSON lines;
//! a failure is one line with the status code and message, no backtrace.

use kd_e2e::Stack;
use std::process::Output;

async fn kd(gateway: &str, dir: &std::path::Path, extra: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kd"))
        .args(["generate", "a red cat", "--gateway", gateway])
        .args(["--width", "64", "--height", "64", "--prior-steps", "2"])
        .args(["--steps", "2", "--timeout", "60", "-o"])
        .arg(dir.join("out.png"))
        .args(extra)
        .env_remove("RUST_BACKTRACE")
        .output()
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn piped_output_names_every_image_and_its_seed() {
    let stack = Stack::start(&[]).await;
    let url = format!("http://{}", stack.gateway.grpc);
    let dir = tempfile::tempdir().unwrap();

    let out = kd(&url, dir.path(), &["-n", "2", "--seed", "5,6"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for (i, seed) in [(0, 5), (1, 6)] {
        let path = dir.path().join(format!("out-{i}.png"));
        assert_eq!(
            lines[i],
            format!("wrote {} seed={seed} size=64x64", path.display())
        );
        assert!(path.is_file());
    }
    assert!(
        lines[2].starts_with("done: 2 image(s) from kandinsky-2-2 in "),
        "{}",
        lines[2]
    );

    // A random seed is printed, so the image can be made again.
    let out = kd(&url, dir.path(), &["--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let events: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["event"], "image");
    assert_eq!(events[0]["width"], 64);
    assert!(events[0]["seed"].as_u64().is_some());
    assert_eq!(events[1]["event"], "done");
    assert_eq!(events[1]["images"], 1);
    assert_eq!(events[1]["model"], "kandinsky-2-2");

    // A refusal: one line, the code and the message naming the field.
    let out = kd(&url, dir.path(), &["--guidance=-1"]).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: InvalidArgument: invalid `decoder.guidance_scale`"),
        "{stderr}"
    );
    assert!(!stderr.contains("backtrace"), "{stderr}");
    assert!(text(&out.stdout).is_empty());
}
