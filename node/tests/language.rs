//! A language model end to end through the `tapestry` binary: two real
//! nodes, each holding text in its own language, train one byte-level
//! transformer together, agree on it, report bits per byte per language,
//! and the result is exported in GPT-2's layout, sampled and imported.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use tapestry_core::model::{ModelSpec, import_safetensors};
use tapestry_lab::process::{NodeProcess, local_run, set_config, status};

const ARCH: &str = "transformer:1,32,2,32";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tapestry"))
}

fn tapestry(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn corpus(lang: &str) -> PathBuf {
    tapestry_testkit::fortunes_dir().join(format!("{lang}.txt.gz"))
}

fn start(dir: &Path, lang: &str, boot: Option<&str>) -> NodeProcess {
    let data = corpus(lang).display().to_string();
    let args = [
        "--data",
        &data,
        "--start-peers",
        "1",
        "--rounds",
        "6",
        "--min-round-ms",
        "0",
    ];
    let mut cmd = local_run(bin(), dir, &args);
    if let Some(b) = boot {
        cmd.args(["--bootstrap", b]);
    }
    NodeProcess::spawn(cmd, dir).unwrap()
}

fn api(n: &NodeProcess) -> String {
    let e = n
        .endpoints(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no endpoints: {}", n.log()));
    e["api"].as_str().unwrap().to_owned()
}

#[test]
fn two_nodes_train_a_byte_transformer_on_their_own_languages_and_export_gpt2() {
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = ["en", "de"].iter().map(|l| root.path().join(l)).collect();
    for d in &dirs {
        let d = d.display().to_string();
        ok(&tapestry(&[
            "init",
            "--data-dir",
            &d,
            "--region",
            "test",
            "--architecture",
            ARCH,
        ]));
    }
    for d in &dirs {
        set_config(d, "local_steps", "8").unwrap();
        let text = std::fs::read_to_string(d.join("config.toml")).unwrap();
        assert!(text.contains("optimizer = \"adamw\""), "{text}");
        assert!(
            text.contains(&format!("architecture = \"{ARCH}\"")),
            "{text}"
        );
    }
    let a = start(&dirs[0], "en", None);
    let boot = a.endpoints(Duration::from_secs(60)).unwrap()["listen"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let b = start(&dirs[1], "de", Some(&boot));
    let apis = [api(&a), api(&b)];
    let deadline = Instant::now() + Duration::from_secs(300);
    let st: Vec<Value> = loop {
        let st: Vec<Value> = apis.iter().map(|x| status(x).unwrap()).collect();
        let done = st.iter().all(|s| {
            s["finished"].as_bool() == Some(true) && s["bits_per_byte"].as_f64().is_some()
        });
        if done && st[0]["head_params"] == st[1]["head_params"] {
            break st;
        }
        if Instant::now() > deadline {
            panic!(
                "no agreement on a trained head: {st:#?}\n{}\n{}",
                a.log(),
                b.log()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    for (s, lang) in st.iter().zip(["en", "de"]) {
        let bpb = s["bits_per_byte"].as_f64().unwrap();
        let own = s["bits_per_byte_by_part"][lang].as_f64().unwrap();
        eprintln!("{lang}: round {} bits per byte {bpb:.3}", s["round"]);
        // A uniform guess is 8 bits per byte; the untrained model is about
        // that. Six rounds of training must have learned something.
        assert!(own < 6.5, "{lang}: {own} bits per byte after training");
        assert!(s["accuracy"].is_null(), "a language model has no accuracy");
    }
    drop((a, b));

    // Export: GPT-2 names in a safetensors file and a config.json beside it.
    let out = root.path().join("gpt2");
    std::fs::create_dir_all(&out).unwrap();
    let file = out.join("model.safetensors");
    let (a_dir, b_dir) = (dirs[0].display().to_string(), dirs[1].display().to_string());
    let f = file.display().to_string();
    ok(&tapestry(&[
        "model",
        "export",
        "--data-dir",
        &a_dir,
        "--out",
        &f,
    ]));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["n_layer"], 1);
    assert_eq!(config["n_embd"], 32);
    assert_eq!(config["n_head"], 2);
    assert_eq!(config["n_positions"], 32);
    assert_eq!(config["vocab_size"], 256);
    let spec = ModelSpec::Transformer("1,32,2,32".parse().unwrap());
    let exported = import_safetensors(&spec, &file).unwrap();

    // Sampling: deterministic at temperature 0, the prompt first.
    let sample = |dir: &str| {
        ok(&tapestry(&[
            "model",
            "sample",
            "--data-dir",
            dir,
            "--prompt",
            "The ",
            "--bytes",
            "40",
            "--temperature",
            "0",
        ]))
    };
    let s1 = sample(&a_dir);
    assert!(s1.starts_with("The "), "{s1:?}");
    assert!(s1.len() > 30, "{s1:?}");
    assert_eq!(s1, sample(&a_dir));
    eprintln!("sample: {s1:?}");

    // Import into B: its head becomes those parameters, bit for bit.
    ok(&tapestry(&[
        "model",
        "import",
        "--data-dir",
        &b_dir,
        "--file",
        &f,
    ]));
    let again = root.path().join("again.safetensors");
    ok(&tapestry(&[
        "model",
        "export",
        "--data-dir",
        &b_dir,
        "--out",
        &again.display().to_string(),
    ]));
    assert_eq!(import_safetensors(&spec, &again).unwrap(), exported);
    assert_eq!(sample(&b_dir), s1);

    // A config.json describing another model is refused, naming it.
    let wrong = root.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::copy(&file, wrong.join("model.safetensors")).unwrap();
    std::fs::write(
        wrong.join("config.json"),
        serde_json::to_string(&serde_json::json!({
            "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32, "vocab_size": 256
        }))
        .unwrap(),
    )
    .unwrap();
    let out = tapestry(&[
        "model",
        "import",
        "--data-dir",
        &b_dir,
        "--file",
        &wrong.join("model.safetensors").display().to_string(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.json") && err.contains("2,32,2,32"),
        "{err}"
    );

    // A classifier node has nothing to sample from.
    let digits = root.path().join("digits");
    ok(&tapestry(&[
        "init",
        "--data-dir",
        &digits.display().to_string(),
    ]));
    let out = tapestry(&[
        "model",
        "sample",
        "--data-dir",
        &digits.display().to_string(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a language model"), "{err}");
}
