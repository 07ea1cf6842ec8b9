//! Training throughput of the byte-level transformer: tokens per second of
//! one training step (forward, backward, AdamW), the step a node takes in
//! its local training (hand-written passes), against the same step through
//! candle's autograd, alternating in one run, for a few shapes and batch sizes, on windows of
//! real text (the fortunes corpus). Also gives the step's rough FLOP
//! count, so the figure can be set against what the CPU could do and
//! against the same step in PyTorch (`tools/torch-throughput`).
//!
//! `cargo bench -p tapestry-core --bench transformer [-- SHAPE]` (one kernel thread:
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
        "{:<18} {:>6} {:>10} {:>16} {:>12} {:>12} {:>10}",
        "shape", "batch", "params", "step", "tokens/s", "ms/step", "GFLOP/s"
    );
    // `-- SHAPE` runs only the cases of that shape (e.g. `4,144,4,64`).
    let only: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    for (layers, width, heads, context, batch) in CASES {
        let shape = format!("{layers},{width},{heads},{context}");
        if only.as_ref().is_some_and(|o| *o != shape) {
            continue;
        }
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
        // The core's step (hand-written passes) and the step through
        // candle's autograd, alternating, each from its own parameters.
        let mut params = [t.init(1), t.init(1)];
        let mut states = [InnerState::default(), InnerState::default()];
        let mut seed = 0u64;
        let mut step = |which: usize, params: &mut [Vec<f32>; 2], states: &mut [InnerState; 2]| {
            seed += 1;
            let p = std::mem::take(&mut params[which]);
            params[which] = if which == 0 {
                t.train_local_owned(p, &text, &cfg, &mut states[which], seed)
            } else {
                t.train_local_autograd(p, &text, &cfg, &mut states[which], seed)
            }
            .unwrap()
            .0;
        };
        for which in [0, 1, 0, 1] {
            step(which, &mut params, &mut states);
        }
        let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..REPEATS {
            for which in [0, 1] {
                let started = Instant::now();
                let mut steps = 0usize;
                while started.elapsed() < MIN_TIME {
                    step(which, &mut params, &mut states);
                    steps += 1;
                }
                rates[which].push(steps as f64 / started.elapsed().as_secs_f64());
            }
        }
        let mut medians = [0f64; 2];
        for (m, r) in medians.iter_mut().zip(rates.iter_mut()) {
            r.sort_by(f64::total_cmp);
            *m = r[REPEATS / 2];
        }
        for (name, steps_per_s) in [
            ("hand-written", medians[0]),
            ("candle autograd", medians[1]),
        ] {
            let tokens = (batch * context) as f64 * steps_per_s;
            let gflops =
                flops_per_window(&t, layers, width, context) * batch as f64 * steps_per_s / 1e9;
            println!(
                "{:<18} {:>6} {:>10} {:>16} {:>12.0} {:>12.1} {:>10.2}",
                format!("{layers},{width},{heads},{context}"),
                batch,
                t.n_params(),
                name,
                tokens,
                1e3 / steps_per_s,
                gflops
            );
        }
        println!("  hand-written / autograd: {:.2}×", medians[0] / medians[1]);
    }
}
