//! The model server on 127.0.0.1 under a bounded concurrent load of 2,400 requests across
//! four models whose weights do not all fit: over the simulated device, and over CUDA with
//! `--ignored`.

#[path = "../examples/model_server/app.rs"]
mod app;

use gpushare::device::{CudaDevice, Device, SimConfig, SimDevice};
use gpushare::Runtime;
use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_correctly_under_load() {
    let sim = SimDevice::with_config(SimConfig::default().total_memory(256 * MIB)).unwrap();
    serve_under_load(Arc::new(sim)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CUDA GPU"]
async fn the_server_answers_correctly_under_load_cuda() {
    serve_under_load(Arc::new(
        CudaDevice::new(0).expect("this test needs a CUDA GPU"),
    ))
    .await
}

/// The server over a runtime that uses 256 MiB of `dev`.
async fn serve_under_load(dev: Arc<dyn Device>) {
    let rt = Runtime::builder()
        .with_device(dev)
        .memory_fraction(1.0)
        .memory_limit(256 * MIB)
        .overcommit(4.0)
        .evict_policy(gpushare::EvictPolicy::Offload)
        .build()
        .unwrap();
    let models = app::default_models(rt.capacity());
    let total: u64 = models.iter().map(|m| m.weights).sum();
    assert!(total > rt.capacity(), "the models must not all fit");
    let app = Arc::new(app::App::new(rt, &models).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        axum::serve(listener, app::router(app.clone()))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    let base = format!("http://{addr}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let get_status = || async {
        let r = client.get(format!("{base}/v1/status")).send().await;
        r.unwrap().json::<serde_json::Value>().await.unwrap()
    };
    let get_metrics = || async {
        let r = client.get(format!("{base}/metrics")).send().await;
        r.unwrap().text().await.unwrap()
    };

    // Bad requests get the error they deserve.
    let r = client
        .post(format!("{base}/v1/models/nope/infer"))
        .body(r#"{"input": [1]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client
        .post(format!("{base}/v1/models/llm/infer"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client
        .post(format!("{base}/v1/models/llm/infer"))
        .body(r#"{"input": []}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // A bounded concurrent load across all models.
    let seeds: HashMap<String, (u8, u64)> = models
        .iter()
        .map(|m| (m.name.clone(), (m.seed, m.weights)))
        .collect();
    let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
    let limit = Arc::new(Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..2400u64 {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let (client, base) = (client.clone(), base.clone());
        let name = names[(i as usize * 7 + i as usize / 5) % names.len()].clone();
        let (seed, size) = seeds[&name];
        tasks.spawn(async move {
            let _permit = permit;
            let input: Vec<f64> = (0..(1 + i % 97)).map(|k| (k as f64) - 3.5).collect();
            let r = client
                .post(format!("{base}/v1/models/{name}/infer"))
                .json(&serde_json::json!({ "input": input }))
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            if status == 200 {
                let body: app::InferResponse = r.json().await.expect("json");
                let want = app::expected(seed, size, &input);
                assert!(
                    (body.output - want).abs() < 1e-6,
                    "{name}: {} != {want}",
                    body.output
                );
            }
            (name, status)
        });
    }
    let mut by_status: HashMap<u16, u32> = HashMap::new();
    // Per model: requests answered, and requests that failed.
    let mut per_model: HashMap<String, (u64, u64)> = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        let (name, status) = r.unwrap();
        *by_status.entry(status).or_default() += 1;
        let e = per_model.entry(name).or_default();
        if status == 200 {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    // Every request is served: a session waits for memory (up to `SESSION_WAIT`), and
    // each model's weights fit once others are evicted.
    assert_eq!(by_status.get(&200), Some(&2400), "{by_status:?}");

    // Evictions happened, and no budget was ever exceeded.
    let status = get_status().await;
    let contexts = status["snapshot"]["contexts"].as_array().unwrap();
    let evictions: u64 = contexts
        .iter()
        .map(|c| c["evictions"].as_u64().unwrap())
        .sum();
    assert!(evictions > 0, "{status}");
    let restores: u64 = contexts
        .iter()
        .map(|c| c["restores"].as_u64().unwrap())
        .sum();
    assert!(restores > 0, "{status}");
    for c in contexts {
        let (peak, max) = (c["peak_bytes"].as_u64(), c["max_bytes"].as_u64());
        assert!(peak.is_some() && peak <= max, "a budget was exceeded: {c}");
    }
    let metrics_then = get_metrics().await;
    // The metrics agree with what the clients saw, model by model.
    let value = |line: &str| -> u64 {
        metrics_then
            .lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in\n{metrics_then}"))
    };
    for (name, &(ok, failed)) in &per_model {
        let q = format!("{{model=\"{name}\"}}");
        assert_eq!(
            value(&format!("gpushare_request_duration_ms_count{q} ")),
            ok
        );
        assert_eq!(
            value(&format!(
                "gpushare_request_duration_ms_bucket{{model=\"{name}\",le=\"+Inf\"}} "
            )),
            ok
        );
        assert_eq!(value(&format!("gpushare_request_errors_total{q} ")), failed);
    }
    let evicted: u64 = names
        .iter()
        .map(|n| {
            value(&format!(
                "gpushare_context_evictions_total{{context=\"{n}\"}} "
            ))
        })
        .sum();
    assert_eq!(
        evicted, evictions,
        "the metrics and the snapshot count the same evictions"
    );
    assert!(metrics_then.contains("gpushare_waiting_sessions"));

    // Every byte of every model's weights survived the evictions and restores (the
    // requests read small windows of them).
    let checked = app.clone();
    tokio::task::spawn_blocking(move || checked.check_weights())
        .await
        .unwrap()
        .unwrap();

    // A result that is not a finite number is refused, not sent as null.
    let r = client
        .post(format!("{base}/v1/models/llm/infer"))
        .body(r#"{"input": [1e308, 1e308, 1e308]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);

    // A request whose client gives up leaves the line at once. The other three models'
    // sessions hold the memory that `embed`'s weights need.
    let held: Vec<_> = ["llm", "chat", "vision"]
        .iter()
        .map(|n| app.context(n).unwrap().session().unwrap())
        .collect();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let r = impatient
        .post(format!("{base}/v1/models/embed/infer"))
        .body(r#"{"input": [1]}"#)
        .send()
        .await;
    assert!(r.is_err(), "the request was served: {r:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get_status().await["waiting_sessions"].as_u64().unwrap() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a request whose client went still waits for a session"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    let metrics_now = get_metrics().await;
    assert!(
        metrics_now.contains("gpushare_requests_abandoned_total{model=\"embed\"} 1\n"),
        "{metrics_now}"
    );

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    println!("{by_status:?}, {evictions} evictions");
}
