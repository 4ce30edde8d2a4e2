//! An HTTP model server over one gpushare runtime, hosting more models than fit at once.
//!
//! - `POST /v1/models/{name}/infer` with `{"input": [numbers]}` awaits a session on the
//!   model's context (restoring its weights if they were evicted) and answers
//!   `{"model": .., "output": ..}`;
//! - `GET /v1/status`: the runtime's snapshot as JSON;
//! - `GET /metrics`: Prometheus text (memory per context, queue depth, evictions, requests
//!   abandoned while they waited, latency histograms).
//!
//! Unknown models get 404, malformed bodies 400, an input whose output is not a finite
//! number 422, requests that get no session within `app::SESSION_WAIT` (or otherwise
//! cannot get memory now) 503 with the reason and `Retry-After`, and failures that waiting
//! cannot cure 500. Ctrl-C shuts it down gracefully.
//!
//! ```text
//! cargo run --release --example model_server -- [--addr 127.0.0.1:8080] [--mib 512]
//! curl -s localhost:8080/v1/models/llm/infer -d '{"input": [1, 2, 3]}'
//! ```

mod app;
#[path = "../common/mod.rs"]
mod common;

use std::sync::Arc;

#[tokio::main]
async fn main() {
    common::init_tracing("info");
    let f = common::Flags::parse(
        &["--addr", "--mib"],
        "usage: model_server [--addr HOST:PORT] [--mib M]",
    );
    let addr = f.text("--addr", "127.0.0.1:8080");
    let mib = f.count("--mib", 512);
    if mib < 64 {
        common::fail("--mib must be at least 64");
    }
    if let Err(e) = run(&addr, mib).await {
        eprintln!("model_server failed: {e}");
        std::process::exit(1);
    }
}

async fn run(addr: &str, mib: u64) -> Result<(), Box<dyn std::error::Error>> {
    let dev = gpushare::device::open(gpushare::Config::device_from_env()?)?;
    let total = dev.info().total_memory;
    let bytes = match mib.checked_mul(1 << 20) {
        Some(b) if b <= total => b,
        _ => {
            return Err(format!(
                "--mib {mib} is more than the device's {} MiB; give a smaller --mib",
                total >> 20
            )
            .into())
        }
    };
    let rt = gpushare::Runtime::builder()
        .with_device(dev)
        .memory_fraction(1.0)
        .memory_limit(bytes)
        .overcommit(4.0)
        // The server answers from its weights after every restore: their bytes must come
        // back, whatever GPUSHARE_OFFLOAD says.
        .evict_policy(gpushare::EvictPolicy::Offload)
        .build()?;
    // The runtime takes at most what the device has free now: the models are sized from
    // that.
    if rt.capacity() < 64 << 20 {
        return Err(format!(
            "the runtime got {} MiB, as little is free on the device now; the models need at least 64 MiB: free some device memory, or use the simulated device (GPUSHARE_DEVICE=sim)",
            rt.capacity() >> 20
        )
        .into());
    }
    let models = app::default_models(rt.capacity());
    let app = Arc::new(app::App::new(rt, &models)?);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, models = models.len(), "model server listening");
    axum::serve(listener, app::router(app))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        })
        .await?;
    Ok(())
}
