//! Runtime costs on whichever device `GPUSHARE_DEVICE` selects: session acquire+release
//! (sync and async, uncontended), event record + cross-context wait beside the device
//! layer's pair and (on CUDA) the bare driver calls, and a buffer's offload+restore round
//! trip.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gpushare::device::EventFlags;
use gpushare::qos::ContextSpec;
use gpushare::{EvictPolicy, Runtime};

/// A runtime of at most 1 GiB: the offload bench fills the whole runtime on every
/// iteration, which on an 80 GB device took criterion's warm-up alone past minutes.
fn rt() -> Runtime {
    Runtime::builder()
        .memory_fraction(0.9)
        .memory_limit(1 << 30)
        .overcommit(4.0)
        .build()
        .expect("runtime")
}

fn sessions(c: &mut Criterion) {
    let rt = rt();
    let ctx = rt
        .create_context(ContextSpec::new("bench", 64 << 20))
        .unwrap();
    let _w = ctx.create_buffer(1 << 20).unwrap();
    let mut g = c.benchmark_group("session");
    g.bench_function("acquire+release, sync", |b| {
        b.iter(|| drop(ctx.session().unwrap()))
    });
    let tokio = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // Inside one task, as a server awaits sessions; entering the executor is not counted.
    g.bench_function("acquire+release, async", |b| {
        b.iter_custom(|iters| {
            tokio.block_on(async {
                let t = std::time::Instant::now();
                for _ in 0..iters {
                    drop(ctx.session_async().await.unwrap());
                }
                t.elapsed()
            })
        })
    });
    g.finish();
}

fn events(c: &mut Criterion) {
    let rt = rt();
    let a = rt.create_context(ContextSpec::new("a", 16 << 20)).unwrap();
    let b = rt.create_context(ContextSpec::new("b", 16 << 20)).unwrap();
    let (sa, sb) = (a.session().unwrap(), b.session().unwrap());
    let mut g = c.benchmark_group("event");
    g.bench_function("gpushare record + cross-context wait", |bch| {
        bch.iter(|| {
            let e = sa.record_event().unwrap();
            sb.wait_event(&e).unwrap();
        })
    });
    let dev = rt.device().clone();
    let (s1, s2) = (dev.create_stream(0).unwrap(), dev.create_stream(0).unwrap());
    let ev = dev.create_event(EventFlags::default()).unwrap();
    g.bench_function("raw device record + wait", |bch| {
        bch.iter(|| {
            dev.record_event(&ev, &s1).unwrap();
            dev.wait_event(&s2, &ev).unwrap();
        })
    });
    // The bare driver calls, with nothing of gpushare's around them.
    if let Some(cuda) = dev.as_cuda() {
        let pair = cuda.raw_event_pair().unwrap();
        g.bench_function("raw CUDA cuEventRecord + cuStreamWaitEvent", |bch| {
            bch.iter(|| pair.record_and_wait().unwrap())
        });
        pair.synchronize().unwrap();
    }
    g.finish();
    sa.synchronize().unwrap();
    sb.synchronize().unwrap();
}

fn offload(c: &mut Criterion) {
    let rt = rt();
    let size = 64u64 << 20;
    let victim = rt.create_context(ContextSpec::new("victim", size)).unwrap();
    let buf = victim
        .create_buffer_with(size, EvictPolicy::Offload)
        .unwrap();
    // A Guaranteed neighbour that needs what is left plus the victim's buffer.
    let cap = rt.capacity();
    let hog = rt
        .create_context(ContextSpec::new("hog", cap).base(cap))
        .unwrap();
    let mut g = c.benchmark_group("offload");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(2 * size));
    g.bench_function("offload+restore 64 MiB", |b| {
        b.iter(|| {
            // Offload: the Guaranteed context takes the whole pool. Its buffer is Discard:
            // an Offload buffer pins host staging of its own size when made (about 1.3 s
            // per GiB on the H100's host), which the bench would time instead.
            let big = hog
                .create_buffer_with(cap - (2 << 20), EvictPolicy::Discard)
                .unwrap();
            drop(big);
            // Restore: the victim's next session brings its buffer back.
            drop(victim.session().unwrap());
        })
    });
    g.finish();
    drop(buf);
}

criterion_group!(benches, sessions, events, offload);
criterion_main!(benches);
