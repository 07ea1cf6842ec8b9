//! Local training with candle on real data (the digits set beside the
//! checkout) and on the built-in synthetic set.

#![allow(clippy::unwrap_used)]

use tapestry_core::data::{self, Scaler};
use tapestry_core::model::*;

fn digits() -> (data::Dataset, data::Dataset) {
    tapestry_testkit::digits_split()
}

fn sgd(lr: f32) -> TrainConfig {
    TrainConfig {
        local_steps: 400,
        batch_size: 32,
        optimizer: InnerOptimizer::SgdMomentum { lr, momentum: 0.9 },
    }
}

#[test]
fn logistic_regression_learns_digits() {
    let (train, test) = digits();
    let spec = ModelSpec::Logistic {
        inputs: 64,
        classes: 10,
    };
    let p0 = spec.init(1);
    let (_, acc0) = evaluate(&spec, &p0, &test).unwrap();
    let (p, report) = train_local(
        &spec,
        &p0,
        &train,
        &sgd(0.05),
        &mut InnerState::default(),
        7,
    )
    .unwrap();
    let (loss, acc) = evaluate(&spec, &p, &test).unwrap();
    eprintln!(
        "logistic on digits: accuracy {acc0:.3} -> {acc:.3}, test loss {loss:.3}, train loss {:.3}",
        report.mean_loss
    );
    assert!(acc0 < 0.3);
    assert!(acc >= 0.93, "accuracy {acc}");
    assert_eq!(report.samples, 400 * 32);
}

#[test]
fn mlp_learns_digits_with_adamw() {
    let (train, test) = digits();
    let spec = ModelSpec::Mlp {
        inputs: 64,
        hidden: vec![64],
        classes: 10,
    };
    let config = TrainConfig {
        local_steps: 400,
        batch_size: 32,
        optimizer: InnerOptimizer::AdamW {
            lr: 3e-3,
            weight_decay: 1e-4,
            eps: tapestry_core::model::ADAM_EPS,
        },
    };
    let (p, _) = train_local(
        &spec,
        &spec.init(2),
        &train,
        &config,
        &mut InnerState::default(),
        3,
    )
    .unwrap();
    let (_, acc) = evaluate(&spec, &p, &test).unwrap();
    eprintln!("mlp on digits: accuracy {acc:.3}");
    assert!(acc >= 0.94, "accuracy {acc}");
}

#[test]
fn mlp_learns_the_synthetic_set() {
    let mut all = data::synthetic(5, 2000, 20, 5);
    let scaler = Scaler::fit(&all);
    scaler.apply(&mut all);
    let (train, test) = all.split(0.25, 1).unwrap();
    let spec = ModelSpec::Mlp {
        inputs: 20,
        hidden: vec![32, 16],
        classes: 5,
    };
    let (p, _) = train_local(
        &spec,
        &spec.init(3),
        &train,
        &sgd(0.05),
        &mut InnerState::default(),
        4,
    )
    .unwrap();
    let (_, acc) = evaluate(&spec, &p, &test).unwrap();
    assert!(acc >= 0.95, "accuracy {acc}");
}

#[test]
fn same_seed_same_bits() {
    let (train, _) = digits();
    let spec = ModelSpec::Mlp {
        inputs: 64,
        hidden: vec![32],
        classes: 10,
    };
    let run = || {
        let mut state = InnerState::default();
        let (p, _) = train_local(&spec, &spec.init(9), &train, &sgd(0.05), &mut state, 11).unwrap();
        p.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
    };
    assert_eq!(run(), run());
    let mut state = InnerState::default();
    let (other, _) = train_local(&spec, &spec.init(9), &train, &sgd(0.05), &mut state, 12).unwrap();
    assert_ne!(
        run(),
        other.iter().map(|v| v.to_bits()).collect::<Vec<u32>>(),
        "the seed matters"
    );
}

#[test]
fn safetensors_round_trip_is_bit_exact() {
    let spec = ModelSpec::Mlp {
        inputs: 64,
        hidden: vec![16, 8],
        classes: 10,
    };
    let mut p = spec.init(4);
    p[3] = f32::MIN_POSITIVE / 2.0; // a subnormal survives too
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    export_safetensors(&spec, &p, &file).unwrap();
    let back = import_safetensors(&spec, &file).unwrap();
    assert_eq!(
        p.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        back.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // The names and shapes are the layout's, as another framework sees them.
    let raw = std::fs::read(&file).unwrap();
    let header_len = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&raw[8..8 + header_len]).unwrap();
    for t in spec.layout() {
        assert_eq!(
            header[&t.name]["shape"],
            serde_json::json!(t.shape),
            "{}",
            t.name
        );
        assert_eq!(header[&t.name]["dtype"], "F32");
    }
    // Another model's file is refused.
    let other = ModelSpec::Logistic {
        inputs: 64,
        classes: 10,
    };
    assert!(matches!(
        import_safetensors(&other, &file),
        Err(ModelError::Import(_))
    ));
}

#[test]
fn wrong_inputs_are_errors() {
    let spec = ModelSpec::Logistic {
        inputs: 3,
        classes: 2,
    };
    let data = data::synthetic(1, 10, 4, 2);
    assert!(matches!(
        train_local(
            &spec,
            &spec.init(0),
            &data,
            &sgd(0.1),
            &mut InnerState::default(),
            0
        ),
        Err(ModelError::DataMismatch(_))
    ));
    assert!(matches!(
        evaluate(&spec, &[0.0; 3], &data),
        Err(ModelError::WrongLength { .. })
    ));
}
