//! A language model end to end through the `tapestry` binary: three real
//! nodes, each holding text in its own language, train one byte-level
//! transformer together and agree on it; bits per byte on every
//! language's held-out text falls well below the genesis model's; the
//! result is exported in GPT-2's layout, sampled and imported. The export,
//! the held-out bytes and the figures are kept for the independent NumPy
//! GPT-2 to check (`tools/gpt2-numpy/check_export.py --trained`, run by CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use tapestry_core::model::{EVAL_WINDOWS, ModelSpec, import_safetensors};
use tapestry_core::text::load_text;
use tapestry_lab::process::{NodeProcess, local_run, set_config, status};

const ARCH: &str = "transformer:1,32,2,32";
const LANGS: [&str; 3] = ["en", "de", "ru"];
/// Bytes sampled from the trained head, checked by the NumPy GPT-2.
const SAMPLED: usize = 60;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tapestry"))
}

fn tapestry(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn ok_bytes(out: &Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout.clone()
}

fn ok(out: &Output) -> String {
    String::from_utf8(ok_bytes(out)).unwrap()
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
        "2",
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
fn three_nodes_train_a_byte_transformer_on_their_own_languages_and_export_gpt2() {
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = LANGS.iter().map(|l| root.path().join(l)).collect();
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
    let mut seed = None;
    for d in &dirs {
        set_config(d, "local_steps", "8").unwrap();
        let text = std::fs::read_to_string(d.join("config.toml")).unwrap();
        assert!(text.contains("optimizer = \"adamw\""), "{text}");
        assert!(
            text.contains(&format!("architecture = \"{ARCH}\"")),
            "{text}"
        );
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        seed = Some(parsed["model"]["seed"].as_integer().unwrap() as u64);
    }
    let a = start(&dirs[0], LANGS[0], None);
    let boot = a.endpoints(Duration::from_secs(60)).unwrap()["listen"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let b = start(&dirs[1], LANGS[1], Some(&boot));
    let c = start(&dirs[2], LANGS[2], Some(&boot));
    let apis = [api(&a), api(&b), api(&c)];
    let deadline = Instant::now() + Duration::from_secs(420);
    let st: Vec<Value> = loop {
        let st: Vec<Value> = apis.iter().map(|x| status(x).unwrap()).collect();
        let done = st.iter().all(|s| {
            s["finished"].as_bool() == Some(true) && s["bits_per_byte"].as_f64().is_some()
        });
        if done && st.iter().all(|s| s["head_params"] == st[0]["head_params"]) {
            break st;
        }
        if Instant::now() > deadline {
            panic!(
                "no agreement on a trained head: {st:#?}\n{}\n{}\n{}",
                a.log(),
                b.log(),
                c.log()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    for (s, lang) in st.iter().zip(LANGS) {
        let own = s["bits_per_byte_by_part"][lang].as_f64().unwrap();
        eprintln!(
            "{lang}: round {} bits per byte {own:.3} (/status)",
            s["round"]
        );
        assert!(s["accuracy"].is_null(), "a language model has no accuracy");
    }
    drop((a, b, c));

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
    let shape = "1,32,2,32".parse().unwrap();
    let spec = ModelSpec::Transformer(shape);
    let exported = import_safetensors(&spec, &file).unwrap();
    let ModelSpec::Transformer(t) = &spec else {
        unreachable!()
    };

    // Training did its work on every language: held-out bits per byte of
    // the agreed head against the genesis model every node started from
    // (the region's seed), both computed here the way the node evaluates.
    let genesis = spec.init(seed.unwrap());
    let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("language-e2e");
    let _ = std::fs::remove_dir_all(&keep);
    std::fs::create_dir_all(&keep).unwrap();
    let mut expect = serde_json::Map::new();
    for lang in LANGS {
        let held_out = load_text(&corpus(lang)).unwrap().test;
        let before = t.bits_per_byte(&genesis, &held_out, EVAL_WINDOWS).unwrap();
        let after = t.bits_per_byte(&exported, &held_out, EVAL_WINDOWS).unwrap();
        eprintln!("{lang}: held-out bits per byte {before:.3} at genesis, {after:.3} trained");
        assert!(
            after < before - 0.5,
            "{lang}: {after:.3} bits per byte trained, {before:.3} at genesis"
        );
        // The bytes those windows cover, for the NumPy GPT-2 to score.
        let covered = (EVAL_WINDOWS * 32 + 1).min(held_out.len());
        std::fs::write(
            keep.join(format!("heldout-{lang}.bin")),
            &held_out[..covered],
        )
        .unwrap();
        expect.insert(lang.to_owned(), serde_json::json!(after));
    }

    // Sampling: deterministic at temperature 0, the prompt first.
    let sample = |dir: &str, bytes: usize| {
        ok_bytes(&tapestry(&[
            "model",
            "sample",
            "--data-dir",
            dir,
            "--prompt",
            "The ",
            "--bytes",
            &bytes.to_string(),
            "--temperature",
            "0",
        ]))
    };
    let s1 = sample(&a_dir, SAMPLED);
    assert!(s1.starts_with(b"The "), "{s1:?}");
    assert_eq!(s1.len(), 4 + SAMPLED + 1, "{s1:?}");
    assert_eq!(s1, sample(&a_dir, SAMPLED));
    eprintln!("sample: {:?}", String::from_utf8_lossy(&s1));
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(out.join(f), keep.join(f)).unwrap();
    }
    let expect = serde_json::json!({
        "windows": EVAL_WINDOWS,
        "bits_per_byte": expect,
        "prompt": "The ",
        "sampled": s1[4..4 + SAMPLED].to_vec(),
    });
    std::fs::write(keep.join("expect.json"), expect.to_string()).unwrap();

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
    assert_eq!(sample(&b_dir, SAMPLED), s1);

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
