//! Training throughput of the byte-level transformer: tokens per second of
//! one training step (forward, backward, AdamW), the step a node takes in
//! its local training, for a few shapes and batch sizes, on windows of
//! real text (the fortunes corpus). Also gives the step's rough FLOP
//! count, so the figure can be set against what the CPU could do and
//! against the same step in PyTorch (`tools/torch-throughput`).
//!
//! `cargo bench -p tapestry-core --bench transformer` (one kernel thread:
//! `.cargo/config.toml` sets `RAYON_NUM_THREADS=1`; set it to 2 for two)
//! (needs the fortunes corpus at `../shared/data/fortunes/`).

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use tapestry_core::model::{InnerOptimizer, InnerState, TrainConfig};
use tapestry_core::text::load_text;
use tapestry_core::transformer::Transformer;

/// (layers, width, heads, context, batch).
const CASES: [(usize, usize, usize, usize, usize); 4] = [
    (1, 32, 2, 32, 8),
    (4, 144, 4, 64, 8),
    (4, 144, 4, 64, 32),
    (4, 256, 4, 128, 8),
];

/// Timed repetitions per case (the median is reported).
const REPEATS: usize = 5;
/// Each repetition runs steps for at least this long.
const MIN_TIME: Duration = Duration::from_secs(3);

/// Multiply-adds of one window's forward pass, ×2 for FLOPs, ×3 for the
/// forward and backward passes: the weight matrices (every parameter but
/// the embeddings and norms is used once per token, the tied head once
/// more) and attention's two products (causal: half of the full square).
fn flops_per_window(t: &Transformer, layers: usize, width: usize, context: usize) -> f64 {
    let n = t.n_params() as f64;
    let embeddings = (256 * width + context * width) as f64;
    let matmul_params = n - embeddings + (256 * width) as f64;
    let tokens = context as f64;
    let attention = layers as f64 * 2.0 * (tokens * tokens / 2.0) * width as f64;
    3.0 * 2.0 * (matmul_params * tokens + attention)
}

fn main() {
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    let text = load_text(&tapestry_testkit::fortunes_dir().join("en.txt.gz"))
        .unwrap()
        .train;
    println!("kernel threads: {threads}");
    println!(
        "{:<18} {:>6} {:>10} {:>12} {:>12} {:>10}",
        "shape", "batch", "params", "tokens/s", "ms/step", "GFLOP/s"
    );
    for (layers, width, heads, context, batch) in CASES {
        let t = Transformer::new(layers, width, heads, context).unwrap();
        let cfg = TrainConfig {
            local_steps: 1,
            batch_size: batch,
            optimizer: InnerOptimizer::AdamW {
                lr: 1e-3,
                weight_decay: 0.0,
                eps: 1e-8,
            },
        };
        let mut params = t.init(1);
        let mut state = InnerState::default();
        let mut seed = 0u64;
        let mut step = |params: &mut Vec<f32>| {
            seed += 1;
            *params = t
                .train_local(params, &text, &cfg, &mut state, seed)
                .unwrap()
                .0;
        };
        for _ in 0..2 {
            step(&mut params);
        }
        let mut rates: Vec<f64> = (0..REPEATS)
            .map(|_| {
                let started = Instant::now();
                let mut steps = 0usize;
                while started.elapsed() < MIN_TIME {
                    step(&mut params);
                    steps += 1;
                }
                steps as f64 / started.elapsed().as_secs_f64()
            })
            .collect();
        rates.sort_by(f64::total_cmp);
        let steps_per_s = rates[REPEATS / 2];
        let tokens = (batch * context) as f64 * steps_per_s;
        let gflops =
            flops_per_window(&t, layers, width, context) * batch as f64 * steps_per_s / 1e9;
        println!(
            "{:<18} {:>6} {:>10} {:>12.0} {:>12.1} {:>10.2}",
            format!("{layers},{width},{heads},{context}"),
            batch,
            t.n_params(),
            tokens,
            1e3 / steps_per_s,
            gflops
        );
    }
}
