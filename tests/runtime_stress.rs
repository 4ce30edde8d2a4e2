//! 64 tasks over 3 contexts, 10k sessions with random scratch sizes. The contexts'
//! buffers add up to more than the device holds, so sessions of different contexts evict
//! and restore each other's buffers throughout. Checks: no budget exceeded, restored bytes
//! equal the originals, pool back to zero, no task starved (each waits for a session at
//! most 20 s, and gets at least half of its sessions). Scratch requests may be refused
//! while a BestEffort context's working set fills all unreserved memory; that is an error
//! returned to the caller, counted, not a failure.

use gpushare::device::{CudaDevice, Device, SimConfig, SimDevice};
use gpushare::qos::ContextSpec;
use gpushare::{Buffer, Context, Runtime, RuntimeError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const WINDOW: u64 = 16 << 10;
/// A task that waits this long for one session is starved.
const STARVED: Duration = Duration::from_secs(60);

fn byte(buf: usize, i: u64) -> u8 {
    (i as u8).wrapping_mul(31) ^ (buf as u8).wrapping_mul(97) ^ ((i >> 8) as u8)
}

fn expected(buf: usize, off: u64, len: u64) -> Vec<u8> {
    (off..off + len).map(|i| byte(buf, i)).collect()
}

struct Model {
    ctx: Context,
    bufs: Vec<(usize, Buffer)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_tasks_ten_thousand_sessions() {
    let sim = SimDevice::with_config(SimConfig::default().total_memory(264 * MIB)).unwrap();
    stress(Arc::new(sim)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CUDA GPU"]
async fn sixty_four_tasks_ten_thousand_sessions_cuda() {
    stress(Arc::new(
        CudaDevice::new(0).expect("this test needs a CUDA GPU"),
    ))
    .await
}

/// The runtime uses 264 MiB of `dev`.
async fn stress(dev: Arc<dyn Device>) {
    let rt = Runtime::builder()
        .with_device(dev)
        .memory_fraction(1.0)
        .memory_limit(264 * MIB)
        .overcommit(4.0)
        .aging(Duration::from_millis(20))
        .build()
        .unwrap();
    let specs = [
        (
            ContextSpec::new("llm", 72 * MIB).base(72 * MIB),
            vec![32 * MIB, 32 * MIB],
        ),
        (
            ContextSpec::new("tts", 128 * MIB).base(32 * MIB),
            vec![32 * MIB, 32 * MIB],
        ),
        (ContextSpec::new("vision", 192 * MIB), vec![32 * MIB; 5]),
    ];
    let mut models = Vec::new();
    let mut next = 0usize;
    for (spec, sizes) in specs {
        let ctx = rt.create_context(spec).unwrap();
        let mut bufs = Vec::new();
        for size in sizes {
            let b = ctx.create_buffer(size).unwrap();
            let mut s = ctx.session().unwrap();
            s.write(&b, 0, &expected(next, 0, size)).unwrap();
            drop(s);
            bufs.push((next, b));
            next += 1;
        }
        models.push(Arc::new(Model { ctx, bufs }));
    }
    let sessions = Arc::new(AtomicU64::new(0));
    let short = Arc::new(AtomicU64::new(0));
    let worst_wait_us = Arc::new(AtomicU64::new(0));
    let tasks = 64;
    let per_task = 10_000 / tasks + 1;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let models = models.clone();
        let (sessions, worst, short) = (sessions.clone(), worst_wait_us.clone(), short.clone());
        handles.push(tokio::spawn(async move {
            let mut r = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
            let mut rand = move || {
                r ^= r << 13;
                r ^= r >> 7;
                r ^= r << 17;
                r
            };
            let mut served = 0;
            for _ in 0..per_task {
                let m = &models[(rand() % 3) as usize];
                let t0 = Instant::now();
                // A starved task fails the test rather than hang it.
                let session = tokio::time::timeout(STARVED, m.ctx.session_async()).await;
                worst.fetch_max(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                let mut s = match session {
                    Ok(Ok(s)) => s,
                    // Memory that only a live session could free ran out with none live.
                    Ok(Err(RuntimeError::OutOfMemory { .. })) => {
                        short.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(Err(e)) => panic!("{e}"),
                    Err(_) => panic!("task {t} waited over {STARVED:?} for a session"),
                };
                // Scratch of a random size, used; with 64 tasks it may run short, which is
                // an error for the caller, not a failure of the runtime.
                let size = 64 * 1024 + rand() % MIB;
                match s.alloc(size) {
                    Ok(sc) => {
                        let dev = m.ctx.session_device();
                        dev.memset(sc.range, 0xA5, s.stream()).unwrap();
                    }
                    Err(
                        RuntimeError::OutOfMemory { .. }
                        | RuntimeError::BudgetExceeded { .. }
                        | RuntimeError::ReservedElsewhere { .. },
                    ) => {
                        short.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => panic!("{e}"),
                }
                // A window of a random buffer holds its original bytes, even after any
                // number of evictions and restores.
                let (id, b) = &m.bufs[(rand() % m.bufs.len() as u64) as usize];
                let off = rand() % (b.size() - WINDOW);
                let mut got = vec![0u8; WINDOW as usize];
                s.read(b, off, &mut got).unwrap();
                assert!(
                    got == expected(*id, off, WINDOW),
                    "buffer {id} changed at {off}"
                );
                let u = m.ctx.usage();
                assert!(u.used <= u.max, "budget exceeded: {u:?}");
                drop(s);
                sessions.fetch_add(1, Ordering::Relaxed);
                served += 1;
                if rand() % 8 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            served
        }));
    }
    // Every task got most of its sessions: none was starved of memory by the others.
    for (t, h) in handles.into_iter().enumerate() {
        let served = h.await.unwrap();
        assert!(
            served * 2 >= per_task,
            "task {t} got {served} of {per_task} sessions"
        );
    }
    let done = sessions.load(Ordering::Relaxed);
    let short = short.load(Ordering::Relaxed);
    assert!(
        done + short >= 10_000 && done >= 9_000,
        "{done} sessions, {short} short of memory"
    );
    let snap = rt.snapshot();
    let evictions: u64 = snap.contexts.iter().map(|c| c.evictions).sum();
    let restores: u64 = snap.contexts.iter().map(|c| c.restores).sum();
    assert!(
        evictions > 0 && restores > 0,
        "the working sets did not compete: {snap}"
    );
    let worst = Duration::from_micros(worst_wait_us.load(Ordering::Relaxed));
    assert!(
        worst < Duration::from_secs(20),
        "a task waited {worst:?} for a session"
    );
    // No context ever held more than its budget, nor the pool more than the runtime's
    // memory.
    for m in &models {
        let u = m.ctx.usage();
        assert!(u.peak <= u.max, "{}'s budget exceeded: {u:?}", m.ctx.name());
    }
    let st = rt.pool_stats();
    assert!(
        st.peak_in_use_bytes.max(st.peak_mapped_bytes) <= rt.capacity(),
        "{st:?}"
    );
    println!("{snap}\n{done} sessions ({short} short of memory); worst wait {worst:?}; evictions {evictions}, restores {restores}");
    drop(models);
    let stats = rt.pool_stats();
    assert_eq!((stats.live_bytes, stats.in_use_bytes), (0, 0), "{stats:?}");
}
