//! The byte-level transformer against an independent GPT-2 (NumPy, in
//! tools/gpt2-numpy), its export in GPT-2's layout, and the text path
//! through the model-agnostic training and evaluation entry points.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tapestry_core::model::{
    Architecture, Examples, InnerOptimizer, InnerState, ModelSpec, TrainConfig, evaluate_on,
    export_safetensors, import_safetensors, train_on,
};
use tapestry_core::text::Text;
use tapestry_core::transformer::Transformer;

/// The parameters `gpt2.py`'s `formula` makes: value k of the layout is
/// ((k · 7919) mod 1000 − 500) / 5000 in f64, rounded to f32; LayerNorm
/// gains get 1 added first.
fn formula(t: &Transformer) -> Vec<f32> {
    let mut out = Vec::with_capacity(t.n_params());
    let mut k: u64 = 0;
    for spec in t.layout() {
        let n: u64 = spec.shape.iter().product();
        let gain = spec.name.contains("ln_") && spec.name.ends_with(".weight");
        for _ in 0..n {
            let mut v = ((k * 7919) % 1000) as f64 - 500.0;
            v /= 5000.0;
            if gain {
                v += 1.0;
            }
            out.push(v as f32);
            k += 1;
        }
    }
    out
}

#[test]
fn the_forward_pass_matches_an_independent_numpy_gpt2() {
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("data/gpt2_golden.json")).unwrap();
    let t: Transformer = golden["shape"].as_str().unwrap().parse().unwrap();
    let text = golden["text"].as_str().unwrap();
    let expected: Vec<Vec<f64>> = serde_json::from_value(golden["logits"].clone()).unwrap();
    let got = t.logits_of(&formula(&t), text.as_bytes()).unwrap();
    assert_eq!(got.len(), text.len());
    let mut worst = 0f64;
    for (row, want) in got.iter().zip(&expected) {
        assert_eq!(row.len(), 256);
        for (g, w) in row.iter().zip(want) {
            worst = worst.max((f64::from(*g) - w).abs());
        }
    }
    eprintln!("largest difference from NumPy's float64 logits: {worst:e}");
    assert!(worst < 1e-4, "logits differ from GPT-2's by up to {worst}");
    // And the check can fail: a different parameter changes the logits.
    let mut p = formula(&t);
    p[300] += 0.5;
    let other = t.logits_of(&p, text.as_bytes()).unwrap();
    let moved = other
        .iter()
        .flatten()
        .zip(expected.iter().flatten())
        .map(|(g, w)| (f64::from(*g) - w).abs())
        .fold(0f64, f64::max);
    assert!(moved > 1e-3, "{moved}");
}

#[test]
fn export_writes_gpt2_names_and_shapes_and_import_round_trips_bit_for_bit() {
    let t: Transformer = "2,16,2,8".parse().unwrap();
    let spec = ModelSpec::Transformer(t);
    let params = t.init(5);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    export_safetensors(&spec, &params, &path).unwrap();
    let back = import_safetensors(&spec, &path).unwrap();
    assert_eq!(
        back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        params.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // The file's own header: GPT-2's names, Conv1D shapes (in × out), F32.
    let raw = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&raw[8..8 + n]).unwrap();
    let shape = |name: &str| -> Vec<u64> {
        assert_eq!(header[name]["dtype"], "F32", "{name}");
        serde_json::from_value(header[name]["shape"].clone()).unwrap()
    };
    assert_eq!(shape("wte.weight"), [256, 16]);
    assert_eq!(shape("wpe.weight"), [8, 16]);
    for i in 0..2 {
        assert_eq!(shape(&format!("h.{i}.ln_1.weight")), [16]);
        assert_eq!(shape(&format!("h.{i}.ln_1.bias")), [16]);
        assert_eq!(shape(&format!("h.{i}.attn.c_attn.weight")), [16, 48]);
        assert_eq!(shape(&format!("h.{i}.attn.c_attn.bias")), [48]);
        assert_eq!(shape(&format!("h.{i}.attn.c_proj.weight")), [16, 16]);
        assert_eq!(shape(&format!("h.{i}.ln_2.bias")), [16]);
        assert_eq!(shape(&format!("h.{i}.mlp.c_fc.weight")), [16, 64]);
        assert_eq!(shape(&format!("h.{i}.mlp.c_fc.bias")), [64]);
        assert_eq!(shape(&format!("h.{i}.mlp.c_proj.weight")), [64, 16]);
        assert_eq!(shape(&format!("h.{i}.mlp.c_proj.bias")), [16]);
    }
    assert_eq!(shape("ln_f.weight"), [16]);
    let tensors = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .count();
    assert_eq!(tensors, 2 + 2 * 12 + 2);
    // A model of another shape is refused, naming the tensor.
    let other = ModelSpec::Transformer("2,16,4,16".parse().unwrap());
    let err = import_safetensors(&other, &path).unwrap_err().to_string();
    assert!(err.contains("wpe.weight"), "{err}");
    // The config.json describes the same model and is read back.
    let json = t.gpt2_config_json();
    let config: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(config["n_layer"], 2);
    assert_eq!(config["n_embd"], 16);
    assert_eq!(config["n_head"], 2);
    assert_eq!(config["n_positions"], 8);
    assert_eq!(config["vocab_size"], 256);
    assert_eq!(Transformer::from_gpt2_config(&json).unwrap(), t);
    let gpt2 = json.replace("\"vocab_size\": 256", "\"vocab_size\": 50257");
    assert!(Transformer::from_gpt2_config(&gpt2).is_err());
    assert!(Transformer::from_gpt2_config("{").is_err());
}

#[test]
fn text_trains_a_transformer_and_is_scored_per_part() {
    let arch: Architecture = "transformer:1,16,2,16".parse().unwrap();
    assert!(arch.is_text());
    assert_eq!(arch.to_string(), "transformer:1,16,2,16");
    let spec = arch.spec(0, 0);
    let mut train = Text::default();
    let mut test = Text::default();
    train.push("ab", "abababababab\n".repeat(40).as_bytes());
    train.push("xy", "xyzxyzxyzxyz\n".repeat(40).as_bytes());
    test.push("ab", "abababababab\n".repeat(4).as_bytes());
    test.push("xy", "xyzxyzxyzxyz\n".repeat(4).as_bytes());
    let (train, test) = (Examples::Text(train), Examples::Text(test));
    let p0 = spec.init(1);
    let before = evaluate_on(&spec, &p0, &test).unwrap();
    assert_eq!(before.accuracy, None);
    assert_eq!(before.parts.len(), 2);
    assert_eq!(before.parts[0].0, "ab");
    let config = TrainConfig {
        local_steps: 40,
        batch_size: 8,
        optimizer: InnerOptimizer::AdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            eps: tapestry_core::model::ADAM_EPS,
        },
    };
    let (p1, _) = train_on(&spec, &p0, &train, &config, &mut InnerState::default(), 3).unwrap();
    let after = evaluate_on(&spec, &p1, &test).unwrap();
    eprintln!("{before:?} → {after:?}");
    for ((name, b), (_, a)) in before.parts.iter().zip(&after.parts) {
        assert!(a < &(b / 2.0), "{name}: {b} → {a}");
    }
    let overall = after.bits_per_byte.unwrap();
    let (lo, hi) = (
        after.parts[0].1.min(after.parts[1].1),
        after.parts[0].1.max(after.parts[1].1),
    );
    assert!(
        lo <= overall && overall <= hi,
        "{overall} outside [{lo}, {hi}]"
    );
    assert!((f64::from(after.loss) - overall * std::f64::consts::LN_2).abs() < 1e-4);
    // Rows for a transformer and text for a classifier are refused.
    let rows = tapestry_core::data::synthetic(1, 20, 4, 2);
    let err = train_on(
        &spec,
        &p0,
        &Examples::Rows(rows.clone()),
        &config,
        &mut InnerState::default(),
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("text"), "{err}");
    let mlp = ModelSpec::Logistic {
        inputs: 4,
        classes: 2,
    };
    let err = evaluate_on(&mlp, &mlp.init(1), &test)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rows"), "{err}");
    assert!(
        evaluate_on(&mlp, &mlp.init(1), &Examples::Rows(rows))
            .unwrap()
            .accuracy
            .is_some()
    );
}

#[test]
fn the_genesis_is_the_one_the_protocol_specifies() {
    // node/PROTOCOL.md, "The genesis parameters": the worked values for
    // transformer:1,16,2,16 and seed 1, computed by the independent
    // Python client (tools/tapestry-py, `transformer_genesis`).
    let t: Transformer = "1,16,2,16".parse().unwrap();
    let p = t.init(1);
    assert_eq!(p.len(), 7664);
    let bits: Vec<u32> = p[..3].iter().map(|v| v.to_bits()).collect();
    assert_eq!(bits, [0x3b60_1a8f, 0xbbe7_a68f, 0x3c16_9085]);
    // The first residual projection weight (σ 0.02/√2).
    assert_eq!(p[5200].to_bits(), 0xbca0_7960);
    let bytes = tapestry_protocol::f32_le_bytes(&p);
    assert_eq!(
        tapestry_protocol::ContentId::of(&bytes).to_string(),
        "4126146bf588df3c2f99c127b1802eb329935380137e4c439c68a785e6f3bd41"
    );
}
