//! The protocol end to end on one machine, until the node exists: make an
//! identity (key file 0600), encode a delta with each codec, cut the int8
//! payload into content-addressed chunks, sign a delta manifest, write it,
//! read it back and verify it, and show that tampering is caught.
//!
//! `cargo run -p tapestry-protocol --example signed-manifest [-- OUT_DIR]`

use std::error::Error;
use std::path::PathBuf;

use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, RngCore, SeedableRng};
use tapestry_protocol::*;

fn main() -> Result<(), Box<dyn Error>> {
    let keep;
    let out: PathBuf = match std::env::args_os().nth(1) {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            dir.into()
        }
        None => {
            keep = tempfile::tempdir()?;
            keep.path().to_owned()
        }
    };

    let key = identity(&out)?;
    let (layout, delta, norm) = delta_of_an_mlp();
    compare_codecs(&delta, norm)?;

    // 3. Chunks: content-addressed pieces of the int8 payload.
    let codec = Codec::Int8 { block: 256 };
    let payload = codec.encode(&delta)?;
    let chunk_size = 16 << 10;
    let chunk_ids: Vec<ContentId> = payload.chunks(chunk_size).map(ContentId::of).collect();
    println!(
        "chunks       {} × ≤{} bytes, first {}",
        chunk_ids.len(),
        chunk_size,
        chunk_ids[0]
    );

    // 4. Sign the manifest, write it, read it back and verify.
    let manifest = DeltaManifest {
        model_id: "demo-mlp".into(),
        region: "local".into(),
        round: 1,
        base_version: ContentId::of(b"initial model"),
        author: key.node_id(),
        seq: 1,
        codec,
        layout,
        payload_bytes: payload.len() as u64,
        chunk_size: chunk_size as u32,
        chunk_ids,
        sample_count: 600,
        l2_norm: norm as f32,
        created_unix_ms: 0,
    };
    let signed = Signed::sign(manifest, &key)?;
    let path = out.join("delta-manifest.cbor");
    std::fs::write(&path, signed.envelope_bytes())?;
    let bytes = std::fs::read(&path)?;
    let opened = Signed::<DeltaManifest>::open(&bytes)?;
    println!(
        "manifest     {} bytes, id {}, verified: signer {}, round {}",
        bytes.len(),
        opened.id().short(),
        opened.signer().short(),
        opened.message().round
    );

    // 5. Tampering: flip one bit of the body, and relabel the kind.
    let mut tampered = bytes.clone();
    let last = tampered.len() - 70; // inside the body, before signer and signature
    tampered[last] ^= 1;
    match Signed::<DeltaManifest>::open(&tampered) {
        Err(e) => println!("tampered     rejected: {e}"),
        Ok(_) => return Err("a tampered manifest was accepted".into()),
    }
    match Signed::<ModelManifest>::open(&bytes) {
        Err(e) => println!("wrong kind   rejected: {e}"),
        Ok(_) => return Err("a delta manifest opened as a model manifest".into()),
    }
    println!("ok");
    Ok(())
}

/// 1. Identity: the key file in `out`, made if missing.
fn identity(out: &std::path::Path) -> Result<Keypair, Box<dyn Error>> {
    let key_path = out.join("node.key");
    let key = if key_path.exists() {
        Keypair::read_key_file(&key_path)?
    } else {
        let k = Keypair::generate(&mut OsRng);
        k.write_key_file(&key_path)?;
        k
    };
    println!(
        "node id      {}  (key file {}, mode 0600)",
        key.node_id(),
        key_path.display()
    );
    Ok(key)
}

/// 2. A delta for a 784-128-10 MLP (101,770 parameters), seeded noise
///    standing in for θ − θ′ after a round of training: its layout, values
///    and L2 norm.
fn delta_of_an_mlp() -> (Vec<TensorSpec>, Vec<f32>, f64) {
    let layout = vec![
        TensorSpec {
            name: "l0.weight".into(),
            shape: vec![128, 784],
            dtype: DType::F32,
        },
        TensorSpec {
            name: "l0.bias".into(),
            shape: vec![128],
            dtype: DType::F32,
        },
        TensorSpec {
            name: "l1.weight".into(),
            shape: vec![10, 128],
            dtype: DType::F32,
        },
        TensorSpec {
            name: "l1.bias".into(),
            shape: vec![10],
            dtype: DType::F32,
        },
    ];
    let n = 128 * 784 + 128 + 10 * 128 + 10;
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let delta: Vec<f32> = (0..n)
        .map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 1e-2)
        .collect();
    let norm = delta
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt();
    println!("delta        {n} values, L2 norm {norm:.4}");
    (layout, delta, norm)
}

/// Encodes the delta with each codec and prints size and error.
fn compare_codecs(delta: &[f32], norm: f64) -> Result<(), Box<dyn Error>> {
    let n = delta.len();
    for codec in [
        Codec::F32,
        Codec::Bf16,
        Codec::Int8 { block: 256 },
        Codec::TopK { fraction: 0.01 },
    ] {
        let bytes = codec.encode(delta)?;
        let back = codec.decode(&bytes, n)?;
        let err = delta
            .iter()
            .zip(&back)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        println!(
            "  {:<10} {:>8} bytes ({:>5.1}% of f32), relative L2 error {:.2e}",
            codec.to_string(),
            bytes.len(),
            100.0 * bytes.len() as f64 / (4 * n) as f64,
            err / norm
        );
    }
    Ok(())
}
