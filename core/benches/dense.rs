//! One inner training step of an MLP, side by side: the core's hand-written
//! passes on the flat parameter vector (`tapestry_core::model::train_local_owned`)
//! against the same step through candle's autograd (parameters made tensors,
//! `backward`, each gradient read from candle's storage and applied: what
//! the core did before). Median time per step and the most heap either
//! holds during a step beyond what it held before (a counting allocator).
//!
//! `cargo bench -p tapestry-core --bench dense` (digits-shaped synthetic
//! rows: 64 features, 10 classes; batch 16; SGD with momentum 0.9).

#![allow(clippy::unwrap_used, missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{D, Device, Tensor, Var};
use tapestry_core::data::{Dataset, synthetic};
use tapestry_core::model::{InnerOptimizer, InnerState, ModelSpec, TrainConfig, train_local_owned};

/// The system allocator, counting the bytes held and the most held.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[allow(unsafe_code)]
// SAFETY: every call is forwarded to the system allocator unchanged; the
// counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let now = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        if new > layout.size() {
            let now = HELD.fetch_add(new - layout.size(), Ordering::Relaxed) + new - layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        } else {
            HELD.fetch_sub(layout.size() - new, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const LR: f32 = 0.05;
const MOMENTUM: f32 = 0.9;
const BATCH: usize = 16;

/// One step through candle's autograd, as the core took it before.
fn candle_step(spec: &ModelSpec, p: &mut [f32], m: &mut [f32], data: &Dataset, rows: &[usize]) {
    let dev = Device::Cpu;
    let mut x = Vec::with_capacity(rows.len() * data.n_features);
    let mut onehot = vec![0f32; rows.len() * spec.classes()];
    for (k, r) in rows.iter().enumerate() {
        x.extend_from_slice(data.row(*r));
        onehot[k * spec.classes() + data.labels[*r] as usize] = 1.0;
    }
    let x = Tensor::from_vec(x, (rows.len(), data.n_features), &dev).unwrap();
    let y = Tensor::from_vec(onehot, (rows.len(), spec.classes()), &dev).unwrap();
    let mut vars = Vec::new();
    let mut at = 0;
    for t in spec.layout() {
        let shape: Vec<usize> = t.shape.iter().map(|d| *d as usize).collect();
        let n: usize = shape.iter().product();
        vars.push(Var::from_slice(&p[at..at + n], shape, &dev).unwrap());
        at += n;
    }
    let mut h = x;
    let layers = vars.len() / 2;
    for i in 0..layers {
        h = h
            .matmul(&vars[2 * i].as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(vars[2 * i + 1].as_tensor())
            .unwrap();
        if i + 1 < layers {
            h = h.relu().unwrap();
        }
    }
    let max = h.max_keepdim(D::Minus1).unwrap();
    let shifted = h.broadcast_sub(&max).unwrap();
    let lse = shifted
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .log()
        .unwrap();
    let logp = shifted.broadcast_sub(&lse).unwrap();
    let loss =
        (logp.mul(&y).unwrap().sum_all().unwrap().neg().unwrap() / rows.len() as f64).unwrap();
    let grads = loss.backward().unwrap();
    let mut at = 0;
    for v in &vars {
        let n = v.elem_count();
        let g = grads.get(v).unwrap();
        let (storage, layout) = g.storage_and_layout();
        let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(values)), Some((s, e))) =
            (&*storage, layout.contiguous_offsets())
        else {
            panic!("a gradient that is not a contiguous f32 CPU tensor");
        };
        for ((p, g), m) in p[at..at + n]
            .iter_mut()
            .zip(&values[s..e])
            .zip(&mut m[at..at + n])
        {
            *m = MOMENTUM * *m + g;
            *p -= LR * *m;
        }
        at += n;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let data = synthetic(3, 512, 64, 10);
    let config = TrainConfig {
        local_steps: 1,
        batch_size: BATCH,
        optimizer: InnerOptimizer::SgdMomentum {
            lr: LR,
            momentum: MOMENTUM,
        },
    };
    println!("one inner step, batch {BATCH}, SGD with momentum (median of 21 steps after 3)");
    println!(
        "| model | parameters | candle autograd | hand-written | ratio | heap over the step: candle | hand-written |"
    );
    println!("|---|---|---|---|---|---|---|");
    for hidden in [vec![64], vec![2048, 2048], vec![4096, 4096]] {
        let spec = ModelSpec::Mlp {
            inputs: 64,
            hidden: hidden.clone(),
            classes: 10,
        };
        let n = spec.n_params();
        let (mut candle_ms, mut hand_ms) = (Vec::new(), Vec::new());
        let (mut candle_peak, mut hand_peak) = (0usize, 0usize);
        let mut p = spec.init(1);
        let mut m = vec![0f32; n];
        let mut q = Some(spec.init(1));
        let mut state = InnerState::default();
        for step in 0..24 {
            let rows: Vec<usize> = (0..BATCH)
                .map(|k| (step * BATCH + k) % data.len())
                .collect();
            // Alternating, so both see the same machine.
            let base = HELD.load(Ordering::Relaxed);
            PEAK.store(base, Ordering::Relaxed);
            let t = Instant::now();
            candle_step(&spec, &mut p, &mut m, &data, &rows);
            let candle = t.elapsed().as_secs_f64() * 1e3;
            let candle_over = PEAK.load(Ordering::Relaxed) - base;

            let params = q.take().unwrap();
            let base = HELD.load(Ordering::Relaxed);
            PEAK.store(base, Ordering::Relaxed);
            let t = Instant::now();
            let (trained, _) =
                train_local_owned(&spec, params, &data, &config, &mut state, step as u64).unwrap();
            let hand = t.elapsed().as_secs_f64() * 1e3;
            let hand_over = PEAK.load(Ordering::Relaxed) - base;
            q = Some(trained);
            if step >= 3 {
                candle_ms.push(candle);
                hand_ms.push(hand);
                candle_peak = candle_peak.max(candle_over);
                hand_peak = hand_peak.max(hand_over);
            }
        }
        let (c, h) = (median(candle_ms), median(hand_ms));
        let model_mb = (n * 4) as f64 / 1e6;
        println!(
            "| {} | {n} | {c:.2} ms | {h:.2} ms | {:.2}× | {:.1} MB ({:.1} models) | {:.1} MB ({:.1} models) |",
            hidden
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join("-"),
            c / h,
            candle_peak as f64 / 1e6,
            candle_peak as f64 / 1e6 / model_mb,
            hand_peak as f64 / 1e6,
            hand_peak as f64 / 1e6 / model_mb,
        );
    }
}
